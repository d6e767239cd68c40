# Rollout kernels: 4096 x 4096 products and the quillan-512m shapes streamed from DRAM vs
# bandwidth and compute probes.
# Run: build/bench/bench_kernels [--shapes] [--isa avx2]; results in bench/RESULTS.md ("Kernels").
add_executable(bench_kernels ${CMAKE_CURRENT_SOURCE_DIR}/bench_kernels.c)
target_link_libraries(bench_kernels PRIVATE quillan_kernels quillan_warnings)
