# Reward services end to end (tests/e2e/reward_e2e.c): the C client against real quillan-reward
# and Python example processes on loopback. Logs of the services land in the build's tests/.
quillan_add_test_exe(e2e_reward ${CMAKE_CURRENT_LIST_DIR}/reward_e2e.c quillan_reward
                     Threads::Threads)
set(reward_e2e_scenarios builtin restart dead late error malformed)
if(QUILLAN_PY_GEN_DIR)
    list(APPEND reward_e2e_scenarios python combined)
else()
    message(STATUS "Reward e2e: no protoc, the Python service scenarios are not built")
endif()
foreach(s ${reward_e2e_scenarios})
    add_test(NAME e2e.reward_${s}
             COMMAND $<TARGET_FILE:e2e_reward> ${s} $<TARGET_FILE:quillan-reward>
                     ${CMAKE_SOURCE_DIR}/reward/examples/python/reward_service.py
                     ${QUILLAN_PY_GEN_DIR} ${CMAKE_CURRENT_BINARY_DIR})
    set_tests_properties(e2e.reward_${s} PROPERTIES TIMEOUT 120)
endforeach()
