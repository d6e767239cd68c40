# The RL loop end to end (issue 5, acceptance 3, 4 and 6): quillan-learner, quillan-rollout
# workers, quillan-reward and the Python reward example as real processes on free loopback
# ports, driven and checked by tests/e2e/rl_e2e.py (Debian's /usr/bin/python3 with python3-zmq
# and python3-protobuf; the wire classes come from protoc, see reward/CMakeLists.txt). Each case
# exits 77 (skipped, visibly) when its inputs are missing: gpt2 without ../shared/data/gpt2.
if(QUILLAN_PY_GEN_DIR AND TARGET quillan-learner AND TARGET quillan-rollout)
    foreach(case loop gpt2 kill_worker reward_restart malformed learner_restart learner_crash lr0 config)
        add_test(NAME e2e.rl_${case}
                 COMMAND /usr/bin/python3 ${CMAKE_CURRENT_LIST_DIR}/rl_e2e.py ${case}
                         --build ${CMAKE_BINARY_DIR} --src ${CMAKE_SOURCE_DIR}
                         --work ${CMAKE_CURRENT_BINARY_DIR}/e2e_rl --gen-dir ${QUILLAN_PY_GEN_DIR})
        set_tests_properties(e2e.rl_${case} PROPERTIES TIMEOUT 300 SKIP_RETURN_CODE 77)
    endforeach()
else()
    message(STATUS "RL e2e: no protoc or no learner/rollout targets, e2e.rl_* not added")
endif()
