# Multi-host fault test on one machine (issue 8, acceptance 3; docs/TESTING-netns.md): learner,
# two rollout workers and quillan-reward in network namespaces joined by a bridge, with packet
# loss (nftables), a bandwidth cap (tbf), a 10 s link cut and a worker frozen past its lease.
# Needs root (CAP_NET_ADMIN), iproute2 and nftables; exits 77 (SKIP) without them.
# netns_ledger reads the learner's final checkpoint back (lease table and batcher counters) so
# that tests/e2e/netns_check.py can hold it against the JSON logs; bench/soak.sh uses both too.
quillan_add_test_exe(netns_ledger ${CMAKE_CURRENT_LIST_DIR}/netns_ledger.c quillan_learner_net
                     quillan_net)
add_test(NAME e2e.netns
         COMMAND ${CMAKE_CURRENT_LIST_DIR}/netns_test.sh ${CMAKE_BINARY_DIR} ${CMAKE_SOURCE_DIR}
                 ${CMAKE_CURRENT_BINARY_DIR}/e2e_netns
                 $<TARGET_FILE:netns_ledger>)
set_tests_properties(e2e.netns PROPERTIES TIMEOUT 420 SKIP_RETURN_CODE 77 LABELS netns
                     RUN_SERIAL TRUE)
