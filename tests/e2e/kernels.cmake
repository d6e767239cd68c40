include_guard(GLOBAL)
# Rollout kernels (rollout/kernels.h): every SIMD level of this machine against the scalar
# reference. Run three times: the detected level, and forced down to avx2 and to the portable
# reference through QUILLAN_ISA (skipped, not failed, where the machine lacks AVX2).
quillan_add_core_test(test_kernels ${CMAKE_CURRENT_SOURCE_DIR}/kernels/test_kernels.c
                      quillan_kernels)
add_test(NAME core.test_kernels_isa_ref COMMAND core_test_kernels)
set_tests_properties(core.test_kernels_isa_ref PROPERTIES ENVIRONMENT QUILLAN_ISA=ref)
add_test(NAME core.test_kernels_isa_avx2 COMMAND core_test_kernels)
set_tests_properties(core.test_kernels_isa_avx2 PROPERTIES ENVIRONMENT QUILLAN_ISA=avx2
                     SKIP_REGULAR_EXPRESSION "supports at most ref")
