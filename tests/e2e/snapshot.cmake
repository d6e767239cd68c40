# Snapshot transfer between two real processes on loopback: the client fork/execs itself as the
# server (learner/weights_server.h) and pulls through a fault-injecting proxy thread.
quillan_add_test_exe(e2e_snapshot ${CMAKE_CURRENT_LIST_DIR}/snapshot_e2e.c
                     quillan_learner_net quillan_rollout_net quillan_net)
add_test(NAME e2e.snapshot_transfer COMMAND $<TARGET_FILE:e2e_snapshot> client)
set_tests_properties(e2e.snapshot_transfer PROPERTIES TIMEOUT 120)
