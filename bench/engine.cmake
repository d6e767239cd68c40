# The inference engine end to end: decoding tokens/s by batch and threads with time per stage,
# peak memory at batch 16 x 1024-token contexts, and learner agreement on a large model.
# Run: build/bench/bench_engine throughput|memory POLICY.qst, or agree PRESET; results in
# bench/RESULTS.md ("Engine").
if(QUILLAN_NET)
    add_executable(bench_engine ${CMAKE_CURRENT_SOURCE_DIR}/bench_engine.c)
    target_link_libraries(bench_engine PRIVATE quillan_engine quillan_warnings)
endif()
