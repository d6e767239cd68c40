/* The rollout worker (`quillan-rollout`, ARCHITECTURE.md §2 steps 1-4): asks the learner for
 * work, keeps the newest snapshot loaded, generates every leased prompt's G samples with the
 * quantized engine, scores them with the reward services and returns TrajectoryGroups.
 *
 * Three threads, each owning its sockets (one thread per ZeroMQ socket):
 *   network (the caller of rollout_worker_run): the dispatch client (credits = rollout.credits,
 *       heartbeats, acks, learner restarts); sends finished groups and keeps each until its Ack
 *       (resent when the Ack does not come in time);
 *   generation: the snapshot client and the engine. Between batches (and while idle) it fetches
 *       the latest version as soon as the learner announces a newer one (a delta against the
 *       snapshot it holds when the server has one), loads it from memory and switches; a batch is
 * every waiting lease whose min_version the loaded snapshot satisfies, generated together
 * (continuous batching across leases) with one snapshot, so a group never mixes versions. Snapshots
 * are reference-counted: the policy of a finished batch is released only after the next one is
 * loaded; reward: the reward client. A group whose rewards cannot be had (services down:
 * QERR_TIMEOUT) is kept and retried after a back-off (reward.backoff_max_s), counted and logged,
 * never scored 0; if its lease expires meanwhile the learner drops the late copy. A service that
 *       answers with an error is retried REWARD_ERROR_ATTEMPTS times, then the lease is given up
 *       (the learner re-leases it after its time-out).
 * On a learner restart (new incarnation) every lease is dropped, groups in progress are thrown
 * away when they finish, groups sent and not yet acknowledged are forgotten (the restarted
 * learner re-leases every unit its checkpoint does not hold as accepted), and the next batch
 * waits for a fresh full snapshot of the restarted learner (its versions may repeat numbers of
 * the old incarnation with other bytes).
 *
 * Sampling: each lease's own SamplingParams; sample s of prompt p draws its token at position
 * t from rng_sample_uniform(sampling.seed, prompt id, s, t) (MODEL.md), so a re-leased prompt
 * samples the same tokens on any worker with the same snapshot.
 *
 * Logs (common/log.h, published to the hub by the caller's log_pub): `rollout.group` per group
 * sent (tokens_per_s, groups_done, snapshot_version, ...), `rollout.snapshot` per switch,
 * `rollout.reward_failed`, `rollout.restart`, `rollout.lease_dropped`. */
#ifndef QUILLAN_ROLLOUT_WORKER_H
#define QUILLAN_ROLLOUT_WORKER_H

#include "config.h"
#include "dispatch_codec.h"
#include "quillan.h"
#include "reward_client.h"

#include <signal.h>
#include <stdbool.h>
#include <stdint.h>

/* Scoring attempts of a group whose reward services answer with an error before its lease is
 * given up. Timeouts (services down) are retried without limit. */
#define REWARD_ERROR_ATTEMPTS 3

typedef struct {
    const quillan_config_t *cfg; /* the run config (copied): network.*, rollout.*, reward.* */
    const char *worker_id;       /* stable name in every Envelope and group; copied */
    int threads;                 /* engine threads; 0 = every online core */
    /* Stops rollout_worker_run when non-zero (a signal handler sets it); required. */
    const volatile sig_atomic_t *stop;
} rollout_worker_options_t;

typedef struct {
    uint64_t leases;            /* RolloutRequests received */
    uint64_t groups_generated;  /* groups the engine finished */
    uint64_t groups_sent;       /* groups handed to the dispatch client (resends excluded) */
    uint64_t acks[5];           /* Acks by AckStatus ([0]: none in time, resent) */
    uint64_t reward_failures;   /* reward calls that failed (each is retried or gives up) */
    uint64_t leases_dropped;    /* leases given up: bad request, reward errors, restart */
    uint64_t snapshots;         /* snapshots loaded */
    uint64_t delta_snapshots;   /* ... of which arrived as deltas */
    uint64_t snapshot_failures; /* fetches or loads that failed (retried) */
    uint64_t learner_restarts;
    uint64_t tokens;           /* completion tokens generated */
    double gen_seconds;        /* wall time inside the engine */
    uint64_t snapshot_version; /* version loaded now; 0 before the first */
} rollout_worker_stats_t;

typedef struct rollout_worker rollout_worker_t;

/* Checks the options (QERR_INVALID: CURVE asked for, no reward service; QERR_RANGE), connects
 * the sockets (libzmq connects in the background: peers need not be up yet) and makes the
 * engine. zctx is used for the dispatch and snapshot sockets and must outlive the worker. NULL
 * with err. */
rollout_worker_t *rollout_worker_new(void *zctx, const rollout_worker_options_t *o, qerr_t *err);

/* Runs the worker until *stop becomes non-zero; returns 0 then, or -1 with err on a socket
 * failure. The generation and reward threads live only inside this call; a batch being
 * generated when stop comes is finished first (the engine cannot be interrupted). */
int rollout_worker_run(rollout_worker_t *w, qerr_t *err);

/* Counters; safe from any thread. */
void rollout_worker_stats(rollout_worker_t *w, rollout_worker_stats_t *out);

/* Frees the worker and sets *w to NULL; safe on NULL. Not during rollout_worker_run. */
void rollout_worker_destroy(rollout_worker_t **w);

/* ---- Pieces, exposed for tests ---- */

/* The engine's sampling parameters of a lease. stop (room for s->n_stop_tokens ids) receives
 * the stop tokens. top_p 0 means off, as in proto/dispatch.proto. -1 with QERR_RANGE naming the
 * field when a value is out of the engine's range or a stop token is >= vocab. */
int rollout_sampling_from_proto(const Quillan__SamplingParams *s, int vocab, int32_t *stop,
                                quillan_sampling_t *out, qerr_t *err);

/* A copy of len bytes of detokenized text that is valid UTF-8 without NUL bytes (what protobuf
 * strings and C strings need): every byte that does not start a well-formed UTF-8 sequence
 * (overlong forms, surrogates and code points above U+10FFFF included) and every NUL becomes
 * U+FFFD, as Python's errors="replace" does per byte. A byte-level model can emit any bytes.
 * malloc'd (the caller frees), NUL-terminated, length in *out_len (may be NULL); NULL when out
 * of memory. */
char *rollout_text_utf8(const char *s, size_t len, size_t *out_len);

/* The router shape of a policy, for routing records. */
typedef struct {
    int num_layers, top_k_minis, top_k_experts, top_k_micros;
    int plan_words; /* 64-bit words of a diffusion plan; 0 without the stage */
} rollout_route_shape_t;

/* Everything one generated group needs to become a TrajectoryGroup. Borrowed. */
typedef struct {
    const Quillan__RolloutRequest *rq;
    const quillan_group_t *group;     /* rq->group_size samples */
    const char *const *texts;         /* [n_samples] detokenized completions */
    uint64_t policy_version;          /* the snapshot the whole group was sampled with */
    bool kept_counts;                 /* truncation on: record kept_counts */
    rollout_route_shape_t route;      /* used when the samples carry routing records */
    const reward_result_t *rewards;   /* total[i] and parts[j * n + i]; NULL: every sample
                                         has no reward */
    const char *const *service_names; /* [rewards->n_services], keys of reward_parts */
    double gen_seconds, reward_seconds;
} rollout_group_src_t;

/* Builds a heap TrajectoryGroup (free with rollout_group_free). Routing: the record of
 * completion token t is the forward at position n_prompt - 1 + t, the one whose logits drew
 * token t (MODEL.md routing replay), and its plan the z0 half of that position's diffusion
 * plan. A sample without a reward (rewards NULL or total[i].has false) has maybe_reward unset
 * and no reward_parts. NULL with err (QERR_NOMEM, QERR_INVALID on inconsistent sizes). */
Quillan__TrajectoryGroup *rollout_group_build(const rollout_group_src_t *src, qerr_t *err);

/* Frees a group made by rollout_group_build and sets *g to NULL; safe on NULL. */
void rollout_group_free(Quillan__TrajectoryGroup **g);

#endif
