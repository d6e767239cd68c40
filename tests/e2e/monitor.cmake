# Monitoring (issue 6): quillan monitor against a real log hub (late hub, garbage, learner
# restart), and tests/e2e/monitor_test.sh: a short real run watched under tmux, --jsonl,
# quillan plot, TensorBoard files read back by Python, systemd unit files.
quillan_add_test_exe(e2e_monitor ${CMAKE_CURRENT_LIST_DIR}/monitor_e2e.c quillan_net)
add_test(NAME e2e.monitor_robust
         COMMAND ${CMAKE_COMMAND} -E env LANG=C.UTF-8 sh -c
                 "rm -rf \"$1\" && mkdir -p \"$1\" && exec \"$0\" \"$2\" \"$1\""
                 $<TARGET_FILE:e2e_monitor> ${CMAKE_CURRENT_BINARY_DIR}/e2e_monitor_robust
                 $<TARGET_FILE:quillan>)
set_tests_properties(e2e.monitor_robust PROPERTIES TIMEOUT 300)
