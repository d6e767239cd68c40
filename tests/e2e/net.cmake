# common/net.h between two real processes on loopback: the router fork/execs itself as the peer.
quillan_add_test_exe(e2e_net ${CMAKE_CURRENT_LIST_DIR}/net_e2e.c quillan_net)
add_test(NAME e2e.net_router_dealer COMMAND $<TARGET_FILE:e2e_net> router)
set_tests_properties(e2e.net_router_dealer PROPERTIES TIMEOUT 120)
