# Dense-layer benchmarks: GEMM (CBLAS vs the C fallback), flash attention and the chunked head.
add_executable(bench_gemm ${CMAKE_CURRENT_LIST_DIR}/bench_gemm.c)
target_link_libraries(bench_gemm PRIVATE quillan_core quillan_warnings)
