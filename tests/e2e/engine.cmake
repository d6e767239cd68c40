# `quillan quantize` / `quillan generate`: a good policy and the bad-input cases (missing file,
# another format, truncated policy, prompt longer than the context).
add_test(NAME e2e.engine_cli COMMAND ${CMAKE_CURRENT_LIST_DIR}/engine_test.sh $<TARGET_FILE:quillan>
         $<TARGET_FILE:generate_example>)
set_tests_properties(e2e.engine_cli PROPERTIES TIMEOUT 120)
