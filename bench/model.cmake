# Whole-model forward+backward: tokens/s for tiny and quillan-512m at batch 1 x 256 tokens,
# share of time in GEMM, GEMM GFLOP/s against OpenBLAS's own sgemm peak, peak RSS.
# Run: build/bench/bench_model [--threads N] [--iters N] [--skip-512m]; results in
# bench/RESULTS.md ("Model").
add_executable(bench_model ${CMAKE_CURRENT_LIST_DIR}/bench_model.c)
target_link_libraries(bench_model PRIVATE quillan_core quillan_warnings ${CMAKE_DL_LIBS})
