/* Supervised fine-tuning on CPU (TRAINING.md §Supervised warm start): cross-entropy on the
 * completion tokens of a JSONL of {prompt, completion} pairs, with the model, optimizer,
 * checkpoints and logs of the learner.
 *
 * Sequences: BOS + prompt tokens + completion tokens + EOS (ARCHITECTURE.md §6); the loss
 * covers the positions that predict completion tokens and EOS. A batch is batch_size sequences
 * right-padded with PAD to the longest; the CE is the mean over the batch's completion tokens.
 * Data order: epoch e visits the training set in a permutation drawn from (data.seed, e)
 * (identity when data.shuffle is false). Step s draws its dropout and diffusion noise from
 * (learner.seed, s). So a run resumed from a checkpoint (weights, Adam moments, step, data
 * position) continues exactly: for a fixed number of replicas and threads, its losses are
 * bit-identical to an uninterrupted run's.
 *
 * Data parallel (replicas R > 1, learner/dp.h): R model replicas on R threads of this process,
 * each with max(1, learner.threads / R) OpenMP/BLAS threads (learner.threads 0 = all cores).
 * Every step, replica r takes rows dp_shard(B, R, r) of the batch (padded to their own longest
 * row), its dropout and diffusion noise keyed by (learner.seed, s, r); its CE gradient is
 * scaled by the whole batch's weight sum and the in-process reducer sums the gradients in rank
 * order, so all replicas take the same AdamW step and stay identical. Rank 0 logs, evaluates
 * and writes checkpoints; a resumed run's rank 0 loads the checkpoint and broadcasts it.
 * Results are bit-identical run to run for a fixed R, and resume exactly. Against one replica
 * they differ by float rounding of the regrouped sums, by the per-replica noise, and in the aux
 * terms: balance and z are taken per shard and weighted by the shard's share of positions (the
 * Switch balance loss of a shard is not that of the batch). With balance_bias the replicas sum
 * their routing counts before the bias step, so the biases move as one model's on the batch.
 *
 * Progress: a log record "sft/step" every log_interval steps (step, loss, ce, lr, grad_norm,
 * tokens/s, ETA), "sft/eval" every eval_interval steps and at the end (test loss, greedy
 * exact-match accuracy: the generated text up to EOS equals the completion), and a checkpoint
 * every learner.checkpoint_interval steps and at the end. */
#ifndef QUILLAN_SFT_H
#define QUILLAN_SFT_H

#include "config.h"
#include "error.h"

#include <signal.h>
#include <stddef.h>

typedef struct {
    int batch_size;     /* sequences per optimizer step (>= 1) */
    int eval_interval;  /* steps between evaluations; 0 = only at the end */
    int eval_examples;  /* test examples evaluated (0 = all) */
    int log_interval;   /* steps between progress records (>= 1) */
    long max_steps;     /* stop once this many steps are done (0 = learner.total_steps); the
                         * schedule still follows total_steps */
    const char *resume; /* checkpoint directory or root to continue from, or NULL */
    int balance_bias;   /* 1: loss-free balancing bias updates at model.balance_bias_rate after
                         * each step (MODEL.md: optional in SFT, off by default; the aux
                         * balance loss keeps the load even) */
    int replicas;       /* data-parallel model replicas, one thread each (1 .. DP_LOCAL_MAX;
                         * 1 = one model on the whole batch) */
    double *loss_trace; /* optional: loss_trace[s] = training loss of step s, s < trace_cap */
    size_t trace_cap;
    /* Optional stop request, e.g. set by a SIGINT/SIGTERM handler: once *stop is nonzero, SFT
     * ends within one step (two with several replicas, which must agree on where), writes a
     * checkpoint when learner.checkpoint_dir is set, skips the final evaluation and returns 0
     * with res->stopped = 1; a resume continues from that step. */
    const volatile sig_atomic_t *stop;
} sft_options_t;

/* batch 32, eval every 100 steps on 500 examples, log every 10 steps, one replica. */
void sft_options_default(sft_options_t *opt);

typedef struct {
    long steps;        /* steps done in total (including those before a resume) */
    long skipped;      /* non-finite steps skipped */
    double first_loss; /* loss of the first step this call ran */
    double last_loss;  /* loss of the last step this call ran */
    double eval_loss;  /* last evaluation (NaN when no test set) */
    double eval_accuracy;
    double seconds; /* wall time of this call */
    long tokens;    /* tokens (input positions, padding excluded) trained on in this call */
    int stopped;    /* 1: ended early on opt->stop */
} sft_result_t;

/* Runs SFT for the validated config (data.train required; data.test optional). Errors name
 * the file and line (dataset), the file and tensor (checkpoint), or the key (config). */
int sft_run(const quillan_config_t *cfg, const sft_options_t *opt, sft_result_t *res, qerr_t *err);

#endif
