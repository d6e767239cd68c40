# `quillan-rollout` between real processes on loopback: the driver stands in for the learner
# (dispatcher, snapshot store, weights server) and runs quillan-reward and two workers.
quillan_add_test_exe(e2e_rollout ${CMAKE_CURRENT_LIST_DIR}/rollout_e2e.c
                     quillan_learner_net quillan_rollout_net quillan_net)
add_dependencies(e2e_rollout quillan-rollout quillan-reward)
add_test(NAME e2e.rollout COMMAND $<TARGET_FILE:e2e_rollout>)
set_tests_properties(e2e.rollout PROPERTIES TIMEOUT 300)
