/* libFuzzer target: the learner's checkpoint state restores, read back from files a crash or an
 * attacker may have left. Built twice:
 *   FUZZ_STATE_LEASES = 1: lease_table_restore (learner/dispatcher.h) with the options the
 *                          seed corpus was saved under (tests/fuzz/make_seeds.c);
 *   FUZZ_STATE_LEASES = 0: batcher_load (learner/batcher.h) with the seeds' config. */
#include "batcher.h"
#include "dispatcher.h"
#include "fuzz_seed_config.h"
#include "fuzz_util.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    qerr_t e;
    qerr_clear(&e);
#if FUZZ_STATE_LEASES
    lease_table_options_t o;
    fuzz_seed_lease_options(&o);
    lease_table_t *t = lease_table_restore(&o, data, size, &e);
    if (t == NULL) {
        fuzz_check_error(&e);
        return 0;
    }
    lease_table_stats_t st;
    lease_table_stats(t, &st);
    lease_table_set_limit(t, 8);
    lease_grant_t g[8];
    size_t n = lease_table_grant(t, 1, 8, 1.0, 10.0, 1, g);
    for (size_t i = 0; i < n; i++)
        lease_table_submit(t, g[i].lease_id, g[i].prompt_id, g[i].epoch, true, 2.0, NULL, NULL);
    lease_table_destroy(&t);
#else
    batcher_config_t cfg;
    fuzz_seed_batcher_config(&cfg);
    batcher_t *b = batcher_load(&cfg, data, size, &e);
    if (b == NULL) {
        fuzz_check_error(&e);
        return 0;
    }
    batcher_counts_t c;
    batcher_counts(b, &c);
    batcher_destroy(&b);
#endif
    return 0;
}
