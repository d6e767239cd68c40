/* The RL learner's training side (TRAINING.md, ARCHITECTURE.md §2 steps 5-7), without sockets:
 * the policy, its old-policy copy, the optimizer, the batcher, the routing records of waiting
 * groups, the snapshot store and the version counters. learner/learner_main.c puts the
 * dispatcher, the weights server and the log hub around it; tests drive it in process.
 *
 * Versions. learner_new publishes version 1 (the starting weights, quantized by qpolicy_build)
 * and makes it the old policy. Every learner.sync_interval optimizer steps the version goes up
 * by one and the weights are quantized and published; every learner.old_policy_interval
 * versions that snapshot also becomes the old policy.
 *
 * Old log-probs (learner.old_logprobs):
 *   recompute  the learner keeps a frozen model (model_new_frozen) holding the fake-quantized
 *              weights of the policy when it became the old policy, and runs its forward over
 *              each batch before the first update. With quantization-aware training that
 *              forward is the forward of the published snapshot's codes (MODEL.md), so this
 *              equals "run the old-policy snapshot"; it costs one more FP32 parameter buffer
 *              (not the three of a full model; the snapshot's codes would be a quarter of
 *              that, but the learner's forward reads FP32 values). The KL reference
 *              (learner.kl.beta > 0) is a frozen model of the starting policy.
 *   behaviour  the sampler's recorded log-probs; the TIS weight is then 1.
 *
 * Routing replay (model.routing_replay). A trajectory's routing record (proto/dispatch.proto
 * RoutingRecord) has one entry per completion token j: the kept indices of every router and
 * the diffusion plan z_0 of the forward at position prompt_len - 1 + j, the one whose logits
 * sampled token j. Prompt positions carry no record, and neither does the plan's z_1, so the
 * learner first runs the forward that computes old log-probs without replay over the batch,
 * keeps its routing for the prompt positions and its z_1, writes the worker's indices and z_0
 * over the completion positions, and replays that record in every forward of the batch (old
 * log-probs, every update). A group without records (replay off at the worker, or restored
 * from a checkpoint, whose state holds no records) runs on the learner's own routing.
 *
 * Steps. A batch is learner.ppo_epochs x learner.minibatches optimizer steps; mini-batch k of
 * n groups is groups [n k / M, n (k + 1) / M). Each step: forward at the sampling temperature
 * with dropout 0 and routing replay, the DAPO loss (learner/dapo.h), its backward, the model's
 * backward, AdamW with clipping, the loss-free balancing update. A step is skipped (counted,
 * parameters untouched) when its mini-batch has no policy-gradient token, or when the loss or
 * the gradient norm is not finite. At learning rate 0 the balancing biases stay too, so such a
 * step changes no weight and the next snapshot has the same bytes. Every step (skipped ones
 * included) logs one `learner.step` record with the metrics of TRAINING.md (snapshot/changed_frac
 * is the fraction of the snapshot's bytes that changed, snapshot/changed_blocks_frac that of its
 * delta blocks).
 *
 * Threads: learner_add_group, learner_lease_room and learner_waiting may be called from any
 * thread (the dispatcher's); everything else from one training thread. */
#ifndef QUILLAN_LEARNER_H
#define QUILLAN_LEARNER_H

#include "batcher.h"
#include "config.h"
#include "dapo.h"
#include "error.h"
#include "model.h"
#include "snapshot_store.h"
#include "tokenizer.h"

#include <stddef.h>
#include <stdint.h>

/* A step whose mismatch/kl (sampler vs the learner's old policy, per token) exceeds this logs a
 * `learner.alert` warning: the workers are likely not running the published weights (a silent
 * weight-sync failure, TRAINING.md), since an honest sampler sits near 0. */
#define LEARNER_ALERT_MISMATCH_KL 0.5

/* Format string of the learner's own checkpoint file. */
#define LEARNER_STATE_FORMAT "quillan-learner-state-1"
/* The learner's file in a checkpoint step directory, beside checkpoint.h's two: the
 * dispatcher's lease table, the batcher's waiting groups, the latest snapshot's bytes, the
 * old-policy (and reference) weights as their frozen models hold them ("old_weights",
 * "ref_weights"; a state with latent "old_params" / "ref_params", written before they were
 * frozen, still loads), the versions. */
#define LEARNER_STATE_FILE "learner.safetensors"

/* One trajectory's routing record in the dispatch protocol's layout (borrowed), len = the
 * sample's completion length:
 *   minis   [len, L, KM]       experts [len, L, KM, KE]   micros [len, L, KM, KN]
 *   plan    [len, Lw] (z_0, Lw = ceil(diffusion_bits / 64)) */
typedef struct {
    const uint32_t *minis, *experts, *micros;
    const uint64_t *plan;
} learner_route_in_t;

typedef struct learner learner_t;

/* Builds the learner for a validated RL config and publishes version 1. resume: NULL for a
 * fresh start (weights from learner.init_checkpoint when set, else initialised from
 * model.seed); a checkpoint step directory or root to continue from; or "auto": the latest
 * checkpoint under learner.checkpoint_dir when there is one, else a fresh start. A resumed
 * learner continues at the checkpoint's step and version and republishes that version's exact
 * bytes. Loads data.test when learner.eval_interval > 0. Sets the OpenMP thread count to
 * learner.threads when > 0. NULL with err naming the key, file or tensor at fault. */
learner_t *learner_new(const quillan_config_t *cfg, const char *resume, qerr_t *err);

/* The batcher settings of a run (learner.batch_groups, group_size, staleness, dynamic sampling,
 * overlong shaping, advantages, and the model's context and vocabulary): the ones the learner
 * uses, for tools that read its checkpointed batcher state back. */
void learner_batcher_config(batcher_config_t *b, const quillan_config_t *c);

void learner_destroy(learner_t **l);

/* The dispatcher state stored in the resumed checkpoint (for dispatcher_new), or NULL and 0 on a
 * fresh start. Owned by l. */
const uint8_t *learner_dispatcher_state(const learner_t *l, size_t *len);
/* The checkpoint directory resumed from, or "" on a fresh start. */
const char *learner_resumed_from(const learner_t *l);

/* The run's tokenizer (model.tokenizer), owned by the learner: the dispatcher encodes prompts
 * with it. */
const tokenizer_t *learner_tokenizer(const learner_t *l);
/* The snapshot store every version is published into (the weights server serves it). */
snapshot_store_t *learner_store(learner_t *l);
/* The policy being trained (tests; do not use while learner_train runs). */
model_t *learner_model(learner_t *l);
uint64_t learner_version(const learner_t *l);
uint64_t learner_old_version(const learner_t *l);
/* Optimizer steps taken (applied and skipped), and the run's limit (learner.max_steps, else
 * learner.total_steps). */
long learner_steps(const learner_t *l);
long learner_step_limit(const learner_t *l);

/* Thread-safe. Groups the dispatcher may still lease (batcher_lease_room(b, 0)). */
int learner_lease_room(learner_t *l);
/* Thread-safe. Groups waiting in the batcher. */
int learner_waiting(learner_t *l);

/* Thread-safe. Hands a returned group to the batcher at the current version (batcher_add) and
 * keeps its routing records (routes [n_samples], or NULL: none) for replay while it waits.
 * Malformed records are an error like a malformed group (nothing is kept). Returns 0 with
 * *verdict, or -1 with err. */
int learner_add_group(learner_t *l, const batcher_group_in_t *g, const learner_route_in_t *routes,
                      batcher_verdict_t *verdict, qerr_t *err);

/* Figures from outside the learner, for the step records. */
typedef struct {
    double wait_seconds;         /* perf/wait_seconds: time spent waiting for this batch */
    double rollout_tokens_per_s; /* perf/rollout_tokens_per_s: the workers' sum */
} learner_perf_t;

/* What one learner_train call did. */
typedef struct {
    int steps;             /* optimizer steps run (applied and skipped) */
    int applied;           /* ... of which updated the weights */
    int skipped_no_pg;     /* ... skipped: no policy-gradient token */
    int skipped_nonfinite; /* ... skipped: loss or gradient norm not finite */
    int published;         /* versions published */
    int evaluated;         /* periodic evaluations run */
    dapo_metrics_t first;  /* the loss metrics of the batch's first step (before any update) */
    dapo_metrics_t last;   /* ... of its last step */
    double routing_mismatch_frac; /* mismatch/routing_frac over the batch's replayed forwards */
} learner_train_result_t;

/* Takes a batch when the batcher has one (batcher_take at the current version) and trains on
 * it, never beyond the step limit, publishing and evaluating when due. Returns 1 when it
 * trained (res filled), 0 when no batch is ready (res zeroed), -1 with err when the batcher is
 * starved (dataset too easy or too hard: the message says why) or on a failure. perf may be
 * NULL. */
int learner_train(learner_t *l, const learner_perf_t *perf, learner_train_result_t *res,
                  qerr_t *err);

/* Greedy exact match of the current policy on the first learner.eval_samples examples of
 * data.test: the completion decoded up to EOS (at most rollout.max_new_tokens tokens), with
 * surrounding white space trimmed, equals the trimmed `answer`. Logs an `eval` record (fields
 * step, policy/version, eval/accuracy, eval/samples, eval/seconds). -1 with err when no test
 * set was loaded (learner.eval_interval 0 or data.test empty) or on a failure. */
int learner_eval(learner_t *l, double *accuracy, qerr_t *err);

/* 1 when a checkpoint is due: learner.checkpoint_interval > 0 and a multiple of it was passed
 * since the last checkpoint. */
int learner_checkpoint_due(const learner_t *l);

/* The step of the last checkpoint written or resumed from (0 before any). */
long learner_checkpoint_step(const learner_t *l);

/* Thread-safe. The batcher's state (batcher_save; *buf malloc'd, the caller frees). Take it at
 * the same moment as the dispatcher's (dispatcher_save) with the dispatcher paused, so that
 * together they hold every accepted group exactly once; call it between learner_train calls,
 * when no batch is in training. */
int learner_batcher_save(learner_t *l, uint8_t **buf, size_t *len, qerr_t *err);

/* Writes a checkpoint of the current step under learner.checkpoint_dir: LEARNER_STATE_FILE
 * first (the two states given here, the latest snapshot's bytes, the old-policy and reference
 * weights, the versions), then the model and optimizer (checkpoint_save, which moves `latest`
 * last, so a crash in between leaves the previous checkpoint in use). The step directory is
 * copied to out_dir (may be NULL). */
int learner_checkpoint(learner_t *l, const uint8_t *dispatcher_state, size_t dispatcher_len,
                       const uint8_t *batcher_state, size_t batcher_len, char *out_dir, size_t cap,
                       qerr_t *err);

#endif
