# `quillan quantize` / `quillan generate`: a good policy and the bad-input cases (missing file,
# another format, truncated policy, prompt longer than the context).
add_test(NAME e2e.engine_cli COMMAND ${CMAKE_CURRENT_LIST_DIR}/engine_test.sh $<TARGET_FILE:quillan>
         $<TARGET_FILE:generate_example>)
set_tests_properties(e2e.engine_cli PROPERTIES TIMEOUT 120)

# Learner agreement on a checkpoint the test trains (issue 4, acceptance 2): bench_engine agree
# --check over a few thousand sampled and greedy tokens of held-out addition prompts.
add_test(NAME e2e.engine_agree
         COMMAND ${CMAKE_CURRENT_LIST_DIR}/engine_agree_test.sh $<TARGET_FILE:quillan>
                 $<TARGET_FILE:bench_engine> ${PROJECT_SOURCE_DIR}/configs)
set_tests_properties(e2e.engine_agree PROPERTIES TIMEOUT 300)
