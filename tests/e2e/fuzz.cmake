# libFuzzer targets (tests/fuzz): only with QUILLAN_FUZZ=ON, which needs clang. Run them with
# tests/fuzz/run_all.sh, which configures such a build.
option(QUILLAN_FUZZ "Build the libFuzzer targets of tests/fuzz (clang only)" OFF)
if(QUILLAN_FUZZ)
    if(NOT CMAKE_C_COMPILER_ID MATCHES "Clang")
        message(FATAL_ERROR "QUILLAN_FUZZ=ON needs clang (libFuzzer): -DCMAKE_C_COMPILER=clang")
    endif()
    add_subdirectory(${CMAKE_CURRENT_LIST_DIR}/../fuzz ${CMAKE_BINARY_DIR}/tests/fuzz)
endif()
