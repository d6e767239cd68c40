# The dispatch protocol (learner/dispatcher.h, rollout/dispatch_client.h) and the log hub
# (learner/loghub.h) between real processes on loopback: the driver fork/execs itself as the
# learner, the workers and a log publisher.
quillan_add_test_exe(e2e_dispatch ${CMAKE_CURRENT_LIST_DIR}/dispatch_e2e.c quillan_net)
add_test(NAME e2e.dispatch COMMAND $<TARGET_FILE:e2e_dispatch> run)
add_test(NAME e2e.loghub COMMAND $<TARGET_FILE:e2e_dispatch> loghub)
set_tests_properties(e2e.dispatch e2e.loghub PROPERTIES TIMEOUT 300)
