/* The options under which the state seeds of tests/fuzz/corpus were saved (make_seeds.c) and
 * under which fuzz_state.c restores them: a restore checks them, so both must agree. */
#ifndef QUILLAN_FUZZ_SEED_CONFIG_H
#define QUILLAN_FUZZ_SEED_CONFIG_H

#include "batcher.h"
#include "dispatcher.h"

#define FUZZ_SEED_PROMPTS 12
#define FUZZ_SEED_FINGERPRINT 0x5eedf00dcafe1234ull

static inline void fuzz_seed_lease_options(lease_table_options_t *o) {
    *o = (lease_table_options_t){.n_prompts = FUZZ_SEED_PROMPTS,
                                 .shuffle = true,
                                 .seed = 1234,
                                 .fingerprint = FUZZ_SEED_FINGERPRINT,
                                 .max_epochs = 3};
}

static inline void fuzz_seed_batcher_config(batcher_config_t *cfg) {
    batcher_config_default(cfg);
    cfg->batch_groups = 4;
    cfg->group_size = 2;
    cfg->max_new_tokens = 8;
    cfg->context = 64;
    cfg->vocab_size = 300;
}

#endif
