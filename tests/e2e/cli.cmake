# The `quillan` front door, driven as a user would.
add_test(NAME e2e.cli COMMAND ${CMAKE_CURRENT_LIST_DIR}/cli_test.sh $<TARGET_FILE:quillan>
         ${CMAKE_SOURCE_DIR})
set_tests_properties(e2e.cli PROPERTIES TIMEOUT 60)
