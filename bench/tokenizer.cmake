# bench_tokenizer: single-thread encode speed of the byte-level and GPT-2 BPE tokenizers.
# Not a test; run it by hand and record the figures in bench/RESULTS.md.
if(TARGET quillan_io)
    get_filename_component(QUILLAN_BENCH_SHARED_DIR ${CMAKE_SOURCE_DIR}/../shared ABSOLUTE)
    add_executable(bench_tokenizer ${CMAKE_CURRENT_LIST_DIR}/bench_tokenizer.c)
    target_compile_definitions(bench_tokenizer PRIVATE
        QUILLAN_SHARED_DIR="${QUILLAN_BENCH_SHARED_DIR}")
    target_link_libraries(bench_tokenizer PRIVATE quillan_io quillan_warnings)
endif()
