# `quillan launch` and `quillan eval` driven as a user would (tests/e2e/launch_test.sh): bad
# configs refused before anything starts, eval of a tiny checkpoint, process management, and a
# short real run (skipped while the learner or worker daemon is not built).
foreach(case config eval procs run)
    add_test(NAME e2e.launch_${case}
             COMMAND ${CMAKE_CURRENT_LIST_DIR}/launch_test.sh ${case} $<TARGET_FILE:quillan>
                     ${CMAKE_SOURCE_DIR} ${CMAKE_CURRENT_BINARY_DIR}/e2e_launch)
    set_tests_properties(e2e.launch_${case} PROPERTIES TIMEOUT 600 SKIP_RETURN_CODE 77)
endforeach()
