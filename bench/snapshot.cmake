# bench_snapshot: publish-to-applied time and bytes of full and delta snapshot transfers over
# loopback. Not a test; run it by hand and record the figures in bench/RESULTS.md.
if(TARGET quillan_learner_net AND TARGET quillan_rollout_net)
    add_executable(bench_snapshot ${CMAKE_CURRENT_LIST_DIR}/bench_snapshot.c)
    target_link_libraries(bench_snapshot PRIVATE quillan_learner_net quillan_rollout_net
                          quillan_net quillan_warnings)
endif()
