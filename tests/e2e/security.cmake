# CurveZMQ authentication end to end (tests/e2e/security_e2e.c, issue 8 acceptance 1): learner
# sockets, the real quillan-reward and clients with listed, unlisted and SIGHUP-added keys.
quillan_add_test_exe(e2e_security ${CMAKE_CURRENT_LIST_DIR}/security_e2e.c quillan_net
                     quillan_rollout_net quillan_reward)
add_test(NAME e2e.security COMMAND $<TARGET_FILE:e2e_security> run $<TARGET_FILE:quillan-reward>)
set_tests_properties(e2e.security PROPERTIES TIMEOUT 300)
