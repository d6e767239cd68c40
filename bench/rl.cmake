# bench/bench_rl.sh: the RL loop with real processes on loopback (snapshot publish-to-applied on
# the 512m preset; learner wait fraction and rollout tokens/s with 1 and 2 workers). Not a test
# and not built by default: `cmake --build BUILD --target bench_rl_throughput` (or
# bench_rl_snapshot, ~20 min and ~20 GB on 2 cores), then record the rows in bench/RESULTS.md.
if(TARGET quillan-learner AND TARGET quillan-rollout AND TARGET quillan-reward)
    foreach(mode snapshot throughput)
        add_custom_target(bench_rl_${mode}
                          COMMAND ${CMAKE_CURRENT_LIST_DIR}/bench_rl.sh ${mode} ${CMAKE_BINARY_DIR}
                                  ${CMAKE_CURRENT_BINARY_DIR}/bench_rl
                          DEPENDS quillan-learner quillan-rollout quillan-reward
                          USES_TERMINAL
                          COMMENT "bench_rl.sh ${mode}")
    endforeach()
endif()
