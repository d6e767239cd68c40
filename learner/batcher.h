/* The batcher of TRAINING.md §Batch assembly: holds accepted groups with the policy version they
 * were sampled with, and assembles training batches from them. A pure data structure (no
 * sockets, no clock, no logging): the dispatcher feeds it groups and asks it how many more it
 * may lease; the learner takes batches from it and logs the verdicts and counters it returns.
 *
 * - Admission control: at most (max_staleness + 1) x batch_groups groups leased or waiting
 *   (batcher_lease_room), so with oldest-first selection nothing handed out is trained more
 *   than max_staleness versions after the version it was sampled with.
 * - A group whose version is more than max_staleness behind v_now, on arrival or when a batch
 *   is taken, is counted as stale and never trained on (the caller logs it).
 * - Each sample's reward gets the overlong penalty (when enabled); advantages are computed per
 *   group from those shaped rewards (dapo_group_advantages). Samples with "no reward" are
 *   excluded from the baseline and masked out of the loss, and counted.
 * - Dynamic sampling: a group whose valid shaped rewards are all equal, or that has fewer than
 *   2 valid rewards, is dropped and counted. A refill round is one more batch_groups arrivals
 *   for the same batch; after the first batch_groups arrivals plus max_resample_rounds rounds
 *   without filling the batch, the batch is taken with what is there if that is at least half
 *   a batch (2 x groups >= batch_groups), else batcher_take fails with an error that says why
 *   (dataset too easy or too hard for the policy, or groups arriving stale, or no rewards).
 *   Without dynamic sampling only stale groups are dropped.
 *
 * Compute core (libc + libm). Per-token outputs are `real`. */
#ifndef QUILLAN_BATCHER_H
#define QUILLAN_BATCHER_H

#include "dapo.h"
#include "error.h"
#include "real.h"

#include <stddef.h>
#include <stdint.h>

/* Largest behaviour log-prob accepted: a log-probability is <= 0, up to float rounding. */
#define BATCHER_LOGP_MAX 1e-3

typedef struct {
    int batch_groups;        /* groups per batch (>= 1) */
    int group_size;          /* G, samples per group (>= 2) */
    int max_staleness;       /* versions (>= 0) */
    int dynamic_sampling;    /* 1: drop groups without a gradient (DAPO) */
    int max_resample_rounds; /* refill rounds before deciding (>= 0) */
    int max_new_tokens;      /* completion length limit (>= 1) */
    int context;             /* model context: prompt_len + len - 1 <= context */
    int vocab_size;          /* token ids in [0, vocab_size) (>= 1) */
    int overlong_enabled;
    int overlong_max_len, overlong_cache; /* tokens, 1 <= cache <= max_len (when enabled) */
    dapo_adv_config_t adv;
} batcher_config_t;

/* One completion as the worker returned it. Views: batcher_add copies what it keeps. */
typedef struct {
    const int32_t *tokens; /* [len] completion token ids */
    const float *logp;     /* [len] behaviour log-probs of those tokens (the sampler's) */
    const int32_t *kept;   /* [len] candidates the sampler kept per token (truncation), 0 = the
                            * full vocabulary; NULL: no truncation */
    int len;               /* 1..max_new_tokens */
    int truncated;         /* 1: hit max_new_tokens without ending (then len == max_new_tokens) */
    int has_reward;        /* 0: "no reward" (distinct from a score of 0) */
    double reward;         /* finite when has_reward */
} batcher_sample_t;

typedef struct {
    uint64_t group_id;               /* unique per lease */
    int64_t version;                 /* policy version v_b the samples were drawn with */
    const int32_t *prompt;           /* [prompt_len] */
    int prompt_len;                  /* >= 1 */
    const batcher_sample_t *samples; /* [n_samples] */
    int n_samples;                   /* must equal group_size */
} batcher_group_in_t;

typedef enum {
    BATCHER_ACCEPTED = 0,   /* waiting to be trained on */
    BATCHER_FILTERED_EQUAL, /* dynamic sampling: all valid shaped rewards equal */
    BATCHER_FILTERED_FEW,   /* dynamic sampling: fewer than 2 valid rewards */
    BATCHER_STALE,          /* beyond max_staleness: counted, never trained on */
    BATCHER_VERDICT_COUNT
} batcher_verdict_t;

typedef enum {
    BATCHER_WAIT = 0, /* not enough groups yet, rounds left */
    BATCHER_FULL,     /* batch_groups groups waiting */
    BATCHER_PARTIAL,  /* rounds exhausted, at least half a batch: train on it */
    BATCHER_STARVED,  /* rounds exhausted, less than half a batch: batcher_take fails */
    BATCHER_STATUS_COUNT
} batcher_status_t;

/* Cumulative counters since the batcher was created (restored by batcher_load). */
typedef struct {
    uint64_t arrived;        /* groups passed to batcher_add that validated */
    uint64_t accepted;       /* groups/kept: ever accepted */
    uint64_t filtered_equal; /* groups/filtered_equal */
    uint64_t filtered_few;   /* dropped for fewer than 2 valid rewards */
    uint64_t stale;          /* groups/stale: on arrival or at take */
    uint64_t no_reward;      /* samples with no reward, in accepted groups */
    uint64_t batches, partial_batches;
} batcher_counts_t;

/* A training batch: rows b = group * G + sample, each row the prompt then the completion,
 * padded to T. Position t of row b predicts targets[b*T + t] from tokens[b*T + 0..t], so
 * completion token j sits at t = prompt_len - 1 + j: exactly model_batch_t's layout, and the
 * loss arrays of dapo_loss_forward. A mini-batch is a range of whole groups: rows
 * [g0 G, g1 G), i.e. every [B, T] array offset by g0 G T with B = (g1 - g0) G and the same T.
 * Owned by the caller: batcher_batch_free. */
typedef struct {
    int B, T; /* B = n_groups x G; T = max over rows of prompt_len + len - 1 */
    int n_groups, G;
    int32_t *tokens;    /* [B, T] inputs (0 on padding) */
    int32_t *targets;   /* [B, T] next tokens on completion positions (0 on prompt, padding) */
    real *mask;         /* [B, T] 1 on completion positions of samples with a reward, else 0;
                         * usable as model_batch_t.weights */
    real *adv;          /* [B, T] the sample's advantage on its mask positions, else 0 */
    real *logp_b;       /* [B, T] behaviour log-prob on completion positions, else 0 */
    int32_t *kept;      /* [B, T] candidates kept (0 = full vocabulary), or NULL when no
                         * sample of the batch used truncation */
    uint64_t *group_id; /* [n_groups] */
    int64_t *version;   /* [n_groups] policy version of each group */
    int *prompt_len;    /* [B] */
    int *len;           /* [B] completion lengths */
    double *reward;     /* [B] shaped reward (NaN = no reward) */
    /* Metrics of TRAINING.md for this batch. */
    double reward_mean, reward_std, reward_max, reward_min; /* over the valid RAW rewards */
    double response_length_mean, response_length_max, truncated_frac; /* over all rows */
    double staleness_mean; /* mean over groups of v_now - version */
    long no_reward;        /* rows without a reward (masked out) */
    /* Since the previous batch: what arrived for this one. */
    long groups_arrived, groups_filtered_equal, groups_filtered_few, groups_stale;
    int refill_rounds; /* rounds beyond the first batch_groups arrivals */
    int partial;       /* 1: taken under the half-batch rule */
} batcher_batch_t;

void batcher_batch_free(batcher_batch_t *bt);

typedef struct batcher batcher_t;

/* Defaults of TRAINING.md: 16 groups of 8, max_staleness 2, dynamic sampling on, 10 rounds,
 * overlong shaping off, advantages with std; max_new_tokens, context and vocab_size are the
 * caller's (set here to 1, 2 and 1). */
void batcher_config_default(batcher_config_t *cfg);

/* NULL with err set: QERR_RANGE naming the bad field, QERR_NOMEM. */
batcher_t *batcher_new(const batcher_config_t *cfg, qerr_t *err);
/* Frees everything and NULLs *b; safe on NULL and twice. */
void batcher_destroy(batcher_t **b);

const batcher_config_t *batcher_config(const batcher_t *b);

/* How many more groups the dispatcher may lease now, given `leased` groups it has out:
 * max(0, (max_staleness + 1) x batch_groups - leased - waiting). */
int batcher_lease_room(const batcher_t *b, int leased);

/* Takes one returned group when the current policy version is v_now. Validates it (group size,
 * lengths, token ids, log-probs, rewards, version not ahead of v_now, group id not already
 * waiting): -1 with err (QERR_INVALID / QERR_RANGE naming the group id, sample and field, or
 * QERR_NOMEM) and nothing counted. Otherwise 0 and *verdict says what became of it (stale
 * and filtered groups are counted and forgotten). */
int batcher_add(batcher_t *b, const batcher_group_in_t *g, int64_t v_now,
                batcher_verdict_t *verdict, qerr_t *err);

/* Drops (and counts) waiting groups now beyond the staleness bound at v_now, then says whether
 * a batch can be taken. */
batcher_status_t batcher_poll(batcher_t *b, int64_t v_now);

/* Groups waiting. */
int batcher_waiting(const batcher_t *b);

/* Polls, then on FULL moves the batch_groups oldest groups (lowest version, then arrival
 * order) into *out, on PARTIAL every waiting group. Returns 1 with *out filled (release with
 * batcher_batch_free), 0 on WAIT (*out zeroed), -1 on STARVED (QERR_INVALID with the reason:
 * the dataset too easy or too hard for the policy, groups arriving stale, rewards missing) or
 * QERR_NOMEM. */
int batcher_take(batcher_t *b, int64_t v_now, batcher_batch_t *out, qerr_t *err);

void batcher_counts(const batcher_t *b, batcher_counts_t *out);

/* ---- Checkpoint state ---- */

/* Serialises the waiting groups, the counters and the refill window into a malloc'd byte
 * buffer (little-endian, versioned; store it e.g. as a U8 safetensors tensor). *buf is owned
 * by the caller (free). -1 with QERR_NOMEM. */
int batcher_save(const batcher_t *b, uint8_t **buf, size_t *len, qerr_t *err);

/* A batcher with cfg and the state of a batcher_save buffer. Validates everything (format
 * version, sizes, the group size against cfg, every group as batcher_add would); advantages
 * are recomputed from the stored rewards with cfg. NULL with err (QERR_VERSION, QERR_PARSE
 * naming the byte offset, QERR_INVALID, QERR_NOMEM). */
batcher_t *batcher_load(const batcher_config_t *cfg, const uint8_t *buf, size_t len, qerr_t *err);

#endif
