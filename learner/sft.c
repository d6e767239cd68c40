#include "sft.h"

#include "alloc.h"
#include "checkpoint.h"
#include "dp.h"
#include "gemm.h"
#include "jsonl.h"
#include "log.h"
#include "model.h"
#include "optimizer.h"
#include "rng.h"
#include "tokenizer.h"

#include <limits.h>
#include <math.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#define SFT_DATA_TAG 0x44415441ULL /* "DATA": epoch permutations */
#define SFT_GREEDY_BATCH 64        /* test sequences decoded together */

/* One tokenized example: ids = BOS + prompt + completion + EOS. */
typedef struct {
    int32_t *ids;
    int len;  /* tokens in ids */
    int plen; /* BOS + prompt tokens */
    char *completion;
    size_t completion_len;
} example_t;

typedef struct {
    example_t *ex;
    size_t n;
    uint64_t fingerprint;
} dataset_t;

static void dataset_free(dataset_t *d) {
    for (size_t i = 0; i < d->n; i++) {
        free(d->ex[i].ids);
        free(d->ex[i].completion);
    }
    free(d->ex);
    memset(d, 0, sizeof *d);
}

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* Tokenizes and checks every line of an SFT JSONL file. */
static int dataset_load(dataset_t *d, const char *path, const tokenizer_t *tok,
                        const model_config_t *mc, qerr_t *err) {
    memset(d, 0, sizeof *d);
    jsonl_reader_t *r = jsonl_reader_new(path, 0, err);
    if (!r)
        return -1;
    const size_t n = jsonl_reader_count(r);
    d->fingerprint = jsonl_reader_fingerprint(r);
    d->ex = calloc(n, sizeof *d->ex);
    if (!d->ex) {
        jsonl_reader_destroy(&r);
        return qerr_set(err, QERR_NOMEM, "%s: out of memory", path);
    }
    const int V = mc->vocab_size;
    int rc = 0;
    tokenizer_ids_t ids;
    tokenizer_ids_init(&ids);
    for (size_t i = 0; i < n && rc == 0; i++) {
        jsonl_example_t je;
        if (jsonl_reader_example(r, i, JSONL_TASK_SFT, &je, err)) {
            rc = -1;
            break;
        }
        ids.len = 0;
        const int32_t bos = tokenizer_bos_id(tok), eos = tokenizer_eos_id(tok);
        rc = tokenizer_encode_append(tok, je.prompt, strlen(je.prompt), &ids, err);
        const size_t plen = ids.len;
        if (rc == 0)
            rc = tokenizer_encode_append(tok, je.completion, strlen(je.completion), &ids, err);
        const size_t len = ids.len + 2;
        example_t *e = &d->ex[i];
        if (rc == 0 && len - 1 > (size_t)mc->context)
            rc = qerr_set(err, QERR_RANGE,
                          "%s:%zu: example is %zu tokens long; model.context allows %d", path,
                          je.line, len, mc->context + 1);
        if (rc == 0) {
            e->ids = malloc(len * sizeof *e->ids);
            e->completion = malloc(strlen(je.completion) + 1);
            if (!e->ids || !e->completion)
                rc = qerr_set(err, QERR_NOMEM, "%s: out of memory", path);
        }
        if (rc == 0) {
            e->ids[0] = bos;
            memcpy(e->ids + 1, ids.data, ids.len * sizeof *e->ids);
            e->ids[len - 1] = eos;
            e->len = (int)len;
            e->plen = (int)plen + 1;
            e->completion_len = strlen(je.completion);
            memcpy(e->completion, je.completion, e->completion_len + 1);
            d->n = i + 1;
            for (size_t k = 0; k < len && rc == 0; k++)
                if (e->ids[k] < 0 || e->ids[k] >= V)
                    rc = qerr_set(err, QERR_RANGE,
                                  "%s:%zu: token id %d (%s) is outside the model's vocabulary "
                                  "[0, %d): the tokenizer does not fit model.vocab_size",
                                  path, je.line, e->ids[k],
                                  k == 0 || k == len - 1 ? "special token"
                                  : (int)k < e->plen     ? "in the prompt"
                                                         : "in the completion",
                                  V);
        }
        jsonl_example_free(&je);
    }
    tokenizer_ids_free(&ids);
    jsonl_reader_destroy(&r);
    if (rc)
        dataset_free(d);
    return rc;
}

/* Epoch permutation of n examples from (seed, epoch); the stream state afterwards goes into
 * checkpoints as the data-order RNG state. */
static void epoch_order(size_t *order, size_t n, uint64_t seed, uint64_t epoch, int shuffle,
                        rng_stream_t *s) {
    for (size_t i = 0; i < n; i++)
        order[i] = i;
    rng_stream_init(s, SFT_DATA_TAG, seed, epoch);
    if (!shuffle)
        return;
    for (size_t i = n - 1; i > 0; i--) {
        const size_t j = (size_t)(rng_stream_next_u64(s) % (uint64_t)(i + 1));
        const size_t t = order[i];
        order[i] = order[j];
        order[j] = t;
    }
}

/* Buffers of one padded batch. */
typedef struct {
    int32_t *tokens, *targets; /* [B, T] */
    real *weights;             /* [B, T] */
    int B, T;
    long tokens_in; /* non-padding input positions */
} batch_buf_t;

/* Fills bb with examples ex[idx[0..B)], right-padded to the longest. */
static void batch_fill(batch_buf_t *bb, const dataset_t *d, const size_t *idx, int B, int32_t pad) {
    int T = 1;
    for (int b = 0; b < B; b++)
        if (d->ex[idx[b]].len - 1 > T)
            T = d->ex[idx[b]].len - 1;
    bb->B = B;
    bb->T = T;
    bb->tokens_in = 0;
    for (int b = 0; b < B; b++) {
        const example_t *e = &d->ex[idx[b]];
        for (int t = 0; t < T; t++) {
            const size_t i = (size_t)b * T + t;
            const int in = t < e->len - 1;
            bb->tokens[i] = in ? e->ids[t] : pad;
            bb->targets[i] = in ? e->ids[t + 1] : pad;
            bb->weights[i] = in && t + 1 >= e->plen ? 1 : 0;
            bb->tokens_in += in;
        }
    }
}

static int batch_alloc(batch_buf_t *bb, int B, int T) {
    const size_t n = (size_t)B * T;
    bb->tokens = malloc(n * sizeof *bb->tokens);
    bb->targets = malloc(n * sizeof *bb->targets);
    bb->weights = malloc(n * sizeof *bb->weights);
    return bb->tokens && bb->targets && bb->weights ? 0 : -1;
}

static void batch_free(batch_buf_t *bb) {
    free(bb->tokens);
    free(bb->targets);
    free(bb->weights);
}

/* Test loss (token mean over completion tokens) and greedy exact-match accuracy over the first
 * n examples of the test set. */
static int evaluate(model_t *m, const dataset_t *test, size_t n, int B, batch_buf_t *bb,
                    const tokenizer_t *tok, double *loss, double *acc, qerr_t *err) {
    const int32_t eos = tokenizer_eos_id(tok), pad = tokenizer_pad_id(tok);
    const int ctx = model_config(m)->context;
    double wsum = 0, lsum = 0;
    size_t *idx = malloc((size_t)(B > SFT_GREEDY_BATCH ? B : SFT_GREEDY_BATCH) * sizeof *idx);
    if (!idx)
        return qerr_set(err, QERR_NOMEM, "out of memory");
    for (size_t i0 = 0; i0 < n; i0 += (size_t)B) {
        const int nb = (int)(n - i0 < (size_t)B ? n - i0 : (size_t)B);
        for (int b = 0; b < nb; b++)
            idx[b] = i0 + (size_t)b;
        batch_fill(bb, test, idx, nb, pad);
        model_batch_t mb = {.B = nb,
                            .T = bb->T,
                            .tokens = bb->tokens,
                            .targets = bb->targets,
                            .weights = bb->weights,
                            .temperature = 1};
        model_stats_t st;
        if (model_forward(m, &mb, &st, err)) {
            free(idx);
            return -1;
        }
        lsum += st.ce * st.weight_sum;
        wsum += st.weight_sum;
    }
    *loss = wsum > 0 ? lsum / wsum : NAN;

    /* Greedy decoding, SFT_GREEDY_BATCH sequences at a time. A row may stop after its reference
     * length + 1 tokens: by then it either produced the completion and EOS or it is wrong. */
    const int G = SFT_GREEDY_BATCH;
    int32_t *gen = NULL, *packed = NULL, *next = NULL;
    int *cur = NULL, *cap = NULL, *pos = NULL, *done = NULL;
    size_t correct = 0;
    int rc = 0;
    gen = malloc((size_t)G * (size_t)(ctx + 1) * sizeof *gen);
    packed = malloc((size_t)G * (size_t)(ctx + 1) * sizeof *packed);
    next = malloc((size_t)G * sizeof *next);
    cur = malloc((size_t)G * sizeof *cur);
    cap = malloc((size_t)G * sizeof *cap);
    pos = malloc((size_t)G * sizeof *pos);
    done = malloc((size_t)G * sizeof *done);
    if (!gen || !packed || !next || !cur || !cap || !pos || !done)
        rc = qerr_set(err, QERR_NOMEM, "out of memory");
    char text[1024];
    for (size_t i0 = 0; rc == 0 && i0 < n; i0 += (size_t)G) {
        const int ng = (int)(n - i0 < (size_t)G ? n - i0 : (size_t)G);
        for (int g = 0; g < ng; g++) {
            const example_t *e = &test->ex[i0 + (size_t)g];
            memcpy(gen + (size_t)g * (ctx + 1), e->ids, (size_t)e->plen * sizeof *gen);
            cur[g] = e->plen;
            cap[g] = e->len - e->plen + 1;
            if (e->plen + cap[g] > ctx)
                cap[g] = ctx - e->plen;
            done[g] = cap[g] <= 0;
        }
        for (;;) {
            int T = 0, active = 0;
            for (int g = 0; g < ng; g++) {
                if (cur[g] > T)
                    T = cur[g];
                active += !done[g];
            }
            if (!active)
                break;
            for (int g = 0; g < ng; g++) {
                for (int t = 0; t < T; t++)
                    packed[(size_t)g * T + t] = t < cur[g] ? gen[(size_t)g * (ctx + 1) + t] : pad;
                pos[g] = cur[g] - 1;
            }
            if (model_greedy(m, packed, ng, T, pos, next, err)) {
                rc = -1;
                break;
            }
            for (int g = 0; g < ng; g++) {
                if (done[g])
                    continue;
                const example_t *e = &test->ex[i0 + (size_t)g];
                gen[(size_t)g * (ctx + 1) + cur[g]++] = next[g];
                if (next[g] == eos || cur[g] - e->plen >= cap[g])
                    done[g] = 1;
            }
        }
        for (int g = 0; rc == 0 && g < ng; g++) {
            const example_t *e = &test->ex[i0 + (size_t)g];
            const int32_t *out = gen + (size_t)g * (ctx + 1) + e->plen;
            const int nout = cur[g] - e->plen;
            if (nout < 1 || out[nout - 1] != eos)
                continue;
            const ptrdiff_t len =
                tokenizer_decode(tok, out, (size_t)(nout - 1), 0, text, sizeof text, NULL);
            if (len >= 0 && (size_t)len == e->completion_len && (size_t)len <= sizeof text &&
                memcmp(text, e->completion, (size_t)len) == 0)
                correct++;
        }
    }
    *acc = n ? (double)correct / (double)n : 0;
    free(gen);
    free(packed);
    free(next);
    free(cur);
    free(cap);
    free(pos);
    free(done);
    free(idx);
    return rc;
}

void sft_options_default(sft_options_t *o) {
    *o = (sft_options_t){.batch_size = 32,
                         .eval_interval = 100,
                         .eval_examples = 500,
                         .log_interval = 10,
                         .replicas = 1};
}

static void fmt_eta(char *buf, size_t cap, double s) {
    if (!(s >= 0) || s > 1e8)
        s = 0;
    const long t = (long)(s + 0.5);
    snprintf(buf, cap, "%ld:%02ld:%02ld", t / 3600, t / 60 % 60, t % 60);
}

/* What the ranks share: read-only while they run, except res (written by the root only). */
typedef struct {
    const quillan_config_t *cfg;
    const sft_options_t *opt;
    tokenizer_t *tok;
    dataset_t train, test;
    int rank_threads; /* OpenMP threads of each replica when there are several */
    sft_result_t res;
    /* Steps to run before stopping on opt->stop (LONG_MAX until asked). The root sets it; every
     * rank reads it at the top of each step. With several replicas the root sets it one step
     * ahead, so that the step's gradient exchange, which every rank passes, orders the write
     * before any rank's read of the stopping step. */
    atomic_long stop_at;
} sft_shared_t;

/* One rank's replica and buffers. */
typedef struct {
    model_t *m;
    optim_t *o;
    size_t *order; /* the epoch's permutation of the training set */
    size_t *idx;   /* [batch_size] the step's examples (the whole batch, on every rank) */
    batch_buf_t bb;
    real *dlogp; /* CE gradient of this rank's shard (several replicas only) */
} sft_rank_t;

static void rank_free(sft_rank_t *c) {
    model_destroy(&c->m);
    optim_destroy(&c->o);
    free(c->order);
    free(c->idx);
    batch_free(&c->bb);
    free(c->dlogp);
}

/* The replica, its optimizer and buffers. The root's batch buffers also serve evaluation. */
static int rank_alloc(sft_rank_t *c, const sft_shared_t *sh, dp_comm_t *comm, qerr_t *err) {
    const config_learner_t *lc = &sh->cfg->learner;
    const model_config_t *mc = &sh->cfg->model;
    c->m = model_new(mc, err);
    if (!c->m)
        return -1;
    optim_config_t oc = {.lr = lc->lr,
                         .warmup_steps = lc->warmup_steps,
                         .schedule = lc->lr_schedule == CONFIG_LR_COSINE ? OPTIM_LR_COSINE
                                                                         : OPTIM_LR_CONSTANT,
                         .total_steps = lc->total_steps,
                         .weight_decay = lc->weight_decay,
                         .beta1 = lc->beta1,
                         .beta2 = lc->beta2,
                         .eps = lc->adam_eps,
                         .grad_clip = lc->grad_clip};
    c->o = optim_new(&oc, c->m, err);
    if (!c->o)
        return -1;
    const int B = sh->opt->batch_size, R = dp_world(comm);
    const int rows =
        dp_is_root(comm) ? (B > SFT_GREEDY_BATCH ? B : SFT_GREEDY_BATCH) : (B + R - 1) / R;
    c->order = malloc(sh->train.n * sizeof *c->order);
    c->idx = malloc((size_t)B * sizeof *c->idx);
    if (R > 1)
        c->dlogp = malloc((size_t)rows * (size_t)(mc->context + 1) * sizeof *c->dlogp);
    if (!c->order || !c->idx || (R > 1 && !c->dlogp) || batch_alloc(&c->bb, rows, mc->context + 1))
        return qerr_set(err, QERR_NOMEM, "out of memory");
    return 0;
}

/* The root loads the checkpoint (or keeps its fresh model); with several replicas the others
 * then receive its parameters, moments, counters and state, so all start from the same bits. */
static int rank_start(sft_rank_t *c, const sft_shared_t *sh, dp_comm_t *comm,
                      checkpoint_state_t *st, qerr_t *err) {
    const quillan_config_t *cfg = sh->cfg;
    *st =
        (checkpoint_state_t){.seed = cfg->learner.seed, .data_fingerprint = sh->train.fingerprint};
    if (sh->opt->resume && dp_is_root(comm)) {
        char dir[4096];
        if (checkpoint_resolve(sh->opt->resume, dir, sizeof dir, err) ||
            checkpoint_load(dir, c->m, c->o, st, err))
            return -1;
        if (st->data_fingerprint != sh->train.fingerprint)
            return qerr_set(err, QERR_INVALID,
                            "%s: the training set %s changed since this "
                            "checkpoint was written",
                            dir, cfg->data.train);
        if (st->data_position > sh->train.n)
            return qerr_set(err, QERR_INVALID,
                            "%s: data position %llu is beyond the %zu "
                            "examples of %s",
                            dir, (unsigned long long)st->data_position, sh->train.n,
                            cfg->data.train);
        log_info("sft/resume", "resumed from %s at step %ld", dir, st->step);
    }
    if (dp_world(comm) == 1)
        return 0;
    long counts[2] = {optim_steps(c->o), optim_skipped(c->o)};
    const size_t np = model_num_reals(c->m) * sizeof(real), no = optim_len(c->o) * sizeof(real);
    if (dp_broadcast(comm, model_params(c->m), np, err) ||
        dp_broadcast(comm, optim_m(c->o), no, err) || dp_broadcast(comm, optim_v(c->o), no, err) ||
        dp_broadcast(comm, counts, sizeof counts, err) || dp_broadcast(comm, st, sizeof *st, err))
        return -1;
    model_params_changed(c->m);
    optim_set_counts(c->o, counts[0], counts[1]);
    return 0;
}

/* A training batch over the filled bb, its aux weights scaled by share (balance, z) and wshare
 * (diffusion): exactly the configured weights when both are 1. */
static model_batch_t train_batch(const batch_buf_t *bb, const config_learner_t *lc,
                                 uint64_t noise_key, double share, double wshare) {
    return (model_batch_t){.B = bb->B,
                           .T = bb->T,
                           .tokens = bb->tokens,
                           .targets = bb->targets,
                           .weights = bb->weights,
                           .training = 1,
                           .count_load = 1,
                           .noise_key = noise_key,
                           .temperature = 1,
                           .aux_balance = (real)(lc->aux.balance * share),
                           .aux_z = (real)(lc->aux.z_loss * share),
                           .aux_diffusion = (real)(lc->aux.diffusion * wshare)};
}

/* Sums every layer's routing counts over the ranks (exact in doubles below 2^53), so that each
 * replica's loss-free balancing step sees the whole batch's counts and the biases stay equal. */
static int loads_allreduce(dp_comm_t *comm, model_t *m, qerr_t *err) {
    for (int l = 0; l < model_config(m)->num_layers; l++) {
        moe_load_t *ld = model_load(m, l);
        const size_t n = (size_t)ld->M * (size_t)(1 + ld->E + ld->N);
        double *v = malloc(n * sizeof *v);
        if (!v)
            return qerr_set(err, QERR_NOMEM, "sft: out of memory");
        size_t k = 0;
        for (int i = 0; i < ld->M; i++)
            v[k++] = (double)ld->gate[i];
        for (int i = 0; i < ld->M * ld->E; i++)
            v[k++] = (double)ld->router[i];
        for (int i = 0; i < ld->M * ld->N; i++)
            v[k++] = (double)ld->micro[i];
        const int rc = dp_allreduce(comm, v, n, DP_F64, DP_SUM, err);
        k = 0;
        for (int i = 0; i < ld->M; i++)
            ld->gate[i] = (int64_t)v[k++];
        for (int i = 0; i < ld->M * ld->E; i++)
            ld->router[i] = (int64_t)v[k++];
        for (int i = 0; i < ld->M * ld->N; i++)
            ld->micro[i] = (int64_t)v[k++];
        free(v);
        if (rc)
            return -1;
    }
    return 0;
}

/* Forward and backward of one step; fills the gradients (all-reduced with several replicas),
 * *ms (loss, ce, balance, diffusion of the whole batch) and *tokens (input positions).
 *
 * One replica: the whole batch, noise keyed (seed, step), model_backward's own CE gradient.
 * R replicas: rank r takes rows dp_shard(B, R, r), padded to its own longest row, with noise
 * keyed (seed, step, r). Its CE gradient is -w / W with W the whole batch's weight sum, so the
 * ranks' gradients add up to the whole batch's token mean. Its aux weights are scaled by its
 * share: of the batch's positions for balance and z (each a mean over the shard's positions),
 * of the CE-weighted positions for diffusion (a mean over those). */
static int rank_grads(sft_rank_t *c, const sft_shared_t *sh, dp_comm_t *comm, int B, long step,
                      model_stats_t *ms, long *tokens, qerr_t *err) {
    const config_learner_t *lc = &sh->cfg->learner;
    const int32_t pad = tokenizer_pad_id(sh->tok);
    const int R = dp_world(comm), r = dp_rank(comm);
    model_grads_zero(c->m);
    if (R == 1) {
        batch_fill(&c->bb, &sh->train, c->idx, B, pad);
        const uint64_t keys[2] = {lc->seed, (uint64_t)step};
        const model_batch_t mb = train_batch(&c->bb, lc, rng_hash(keys, 2), 1, 1);
        if (model_forward(c->m, &mb, ms, err))
            return -1;
        model_backward(c->m, NULL, NULL);
        *tokens = c->bb.tokens_in;
        return 0;
    }
    /* The whole batch's CE weight and positions, from the example lengths: every rank knows
     * them without asking the others. */
    double W = 0, P = 0;
    for (int b = 0; b < B; b++) {
        const example_t *e = &sh->train.ex[c->idx[b]];
        W += e->len - e->plen;
    }
    for (int k = 0; k < R; k++) {
        long kb, kn;
        dp_shard(B, R, k, &kb, &kn);
        int T = 1;
        for (long b = kb; b < kb + kn; b++)
            if (sh->train.ex[c->idx[b]].len - 1 > T)
                T = sh->train.ex[c->idx[b]].len - 1;
        P += kn > 0 ? (double)kn * T : 0;
    }
    long b0, nb;
    dp_shard(B, R, r, &b0, &nb);
    double part[6] = {0}; /* loss, ce, balance, z, diffusion, tokens: this rank's share */
    if (nb > 0) {
        batch_fill(&c->bb, &sh->train, c->idx + b0, (int)nb, pad);
        const size_t n = (size_t)nb * (size_t)c->bb.T;
        double wr = 0;
        for (size_t i = 0; i < n; i++)
            wr += c->bb.weights[i];
        const double share = (double)n / P, wshare = W > 0 ? wr / W : 0;
        const uint64_t keys[3] = {lc->seed, (uint64_t)step, (uint64_t)r};
        const model_batch_t mb = train_batch(&c->bb, lc, rng_hash(keys, 3), share, wshare);
        model_stats_t st;
        if (model_forward(c->m, &mb, &st, err))
            return -1;
        for (size_t i = 0; i < n; i++)
            c->dlogp[i] = W > 0 ? (real)(-(double)c->bb.weights[i] / W) : 0;
        model_backward(c->m, c->dlogp, NULL);
        part[0] = st.ce * wshare + (st.loss - st.ce);
        part[1] = st.ce * wshare;
        part[2] = st.balance * share;
        part[3] = st.z * share;
        part[4] = st.diffusion * wshare;
        part[5] = (double)c->bb.tokens_in;
    }
    if (dp_allreduce(comm, model_grads(c->m), model_num_reals(c->m), DP_F32, DP_SUM, err) ||
        dp_allreduce(comm, part, Q_ARRAY_LEN(part), DP_F64, DP_SUM, err))
        return -1;
    *ms = (model_stats_t){.loss = part[0],
                          .ce = part[1],
                          .balance = part[2],
                          .z = part[3],
                          .diffusion = part[4],
                          .weight_sum = W};
    *tokens = (long)part[5];
    return 0;
}

/* The root's bookkeeping between steps. */
typedef struct {
    double t0, tlog;
    long tok_log, start, last;
    size_t n_eval;
} sft_clock_t;

/* Rank 0's duties after a step: loss trace, progress record, evaluation, checkpoint. */
static int root_report(sft_rank_t *c, sft_shared_t *sh, sft_clock_t *ck,
                       const checkpoint_state_t *st, long step, const model_stats_t *ms,
                       const optim_result_t *orr, long tokens, qerr_t *err) {
    const sft_options_t *opt = sh->opt;
    const config_learner_t *lc = &sh->cfg->learner;
    sft_result_t *res = &sh->res;
    long stop_at = atomic_load_explicit(&sh->stop_at, memory_order_relaxed);
    if (opt->stop && *opt->stop && stop_at == LONG_MAX) {
        stop_at = step + (opt->replicas > 1 ? 2 : 1);
        atomic_store_explicit(&sh->stop_at, stop_at, memory_order_release);
        log_info("sft/stop", "stop requested at step %ld: stopping after step %ld", step + 1,
                 stop_at);
    }
    const int stopping = step + 1 == stop_at && stop_at < ck->last;
    const long last = stopping ? stop_at : ck->last;
    if (opt->loss_trace && (size_t)step < opt->trace_cap)
        opt->loss_trace[step] = ms->loss;
    if (isnan(res->first_loss))
        res->first_loss = ms->loss;
    res->last_loss = ms->loss;
    res->tokens += tokens;
    ck->tok_log += tokens;
    if ((step + 1) % opt->log_interval == 0 || step + 1 == last) {
        const double t = now_s(), el = t - ck->t0;
        const double tps = ck->tok_log / (t - ck->tlog > 0 ? t - ck->tlog : 1e-9);
        const double eta = el / (double)(step + 1 - ck->start) * (double)(last - step - 1);
        char etas[32];
        fmt_eta(etas, sizeof etas, eta);
        const log_field_t f[] = {{"step", (double)(step + 1)},
                                 {"loss", ms->loss},
                                 {"ce", ms->ce},
                                 {"loss/balance", ms->balance},
                                 {"loss/diffusion", ms->diffusion},
                                 {"lr", orr->lr},
                                 {"grad_norm", orr->grad_norm},
                                 {"tokens_per_s", tps},
                                 {"eta_s", eta}};
        log_emit(LOG_INFO, "sft/step", f, Q_ARRAY_LEN(f),
                 "step %ld/%ld loss %.4f ce %.4f lr %.2e tok/s %.0f ETA %s", step + 1, last,
                 ms->loss, ms->ce, orr->lr, tps, etas);
        ck->tlog = t;
        ck->tok_log = 0;
    }
    const int eval_now =
        sh->test.n > 0 && !stopping &&
        ((opt->eval_interval > 0 && (step + 1) % opt->eval_interval == 0) || step + 1 == last);
    if (eval_now) {
        if (evaluate(c->m, &sh->test, ck->n_eval, opt->batch_size, &c->bb, sh->tok, &res->eval_loss,
                     &res->eval_accuracy, err))
            return -1;
        const log_field_t f[] = {{"step", (double)(step + 1)},
                                 {"eval/loss", res->eval_loss},
                                 {"eval/exact_match", res->eval_accuracy},
                                 {"elapsed_s", now_s() - ck->t0}};
        log_emit(LOG_INFO, "sft/eval", f, Q_ARRAY_LEN(f),
                 "step %ld eval loss %.4f exact match %.1f%% (%zu examples) at %.1f s", step + 1,
                 res->eval_loss, 100 * res->eval_accuracy, ck->n_eval, now_s() - ck->t0);
    }
    const int ckpt_now =
        lc->checkpoint_dir[0] &&
        ((lc->checkpoint_interval > 0 && (step + 1) % lc->checkpoint_interval == 0) ||
         step + 1 == last);
    if (ckpt_now) {
        char dir[4096];
        if (checkpoint_save(lc->checkpoint_dir, sh->cfg, c->m, c->o, st, dir, sizeof dir, err))
            return -1;
        log_info("sft/checkpoint", "step %ld: wrote %s", step + 1, dir);
    }
    return 0;
}

/* One rank's training loop (dp_rank_fn). Every rank walks the same data order and takes the
 * same optimizer step from the same reduced gradient; the root also reports. */
static int rank_main(dp_comm_t *comm, void *arg, qerr_t *err) {
    sft_shared_t *sh = arg;
    const quillan_config_t *cfg = sh->cfg;
    const sft_options_t *opt = sh->opt;
    const config_learner_t *lc = &cfg->learner;
    const int root = dp_is_root(comm);
#ifdef _OPENMP
    if (dp_world(comm) > 1)
        omp_set_num_threads(sh->rank_threads);
#endif
    sft_rank_t c = {0};
    checkpoint_state_t st = {0};
    int rc = rank_alloc(&c, sh, comm, err) || rank_start(&c, sh, comm, &st, err) ? -1 : 0;
    rng_stream_t ds;
    if (rc == 0)
        epoch_order(c.order, sh->train.n, cfg->data.seed, st.data_epoch, cfg->data.shuffle, &ds);
    const int B = opt->batch_size;
    sft_clock_t ck = {.t0 = now_s(),
                      .start = st.step,
                      .last = opt->max_steps > 0 ? opt->max_steps : lc->total_steps,
                      .n_eval = opt->eval_examples > 0 && (size_t)opt->eval_examples < sh->test.n
                                    ? (size_t)opt->eval_examples
                                    : sh->test.n};
    ck.tlog = ck.t0;
    for (long step = st.step; rc == 0 && step < ck.last &&
                              step < atomic_load_explicit(&sh->stop_at, memory_order_acquire);
         step++) {
        for (int b = 0; b < B; b++) {
            if (st.data_position >= sh->train.n) {
                st.data_epoch++;
                st.data_position = 0;
                epoch_order(c.order, sh->train.n, cfg->data.seed, st.data_epoch, cfg->data.shuffle,
                            &ds);
            }
            c.idx[b] = c.order[st.data_position++];
        }
        st.rng_key = ds.key;
        st.rng_counter = ds.counter;
        model_stats_t ms;
        long tokens = 0;
        if ((rc = rank_grads(&c, sh, comm, B, step, &ms, &tokens, err)) != 0)
            break;
        optim_result_t orr;
        const int applied = optim_step(c.o, c.m, ms.loss, &orr);
        if (dp_world(comm) > 1 && opt->balance_bias && (rc = loads_allreduce(comm, c.m, err)))
            break;
        model_balance_update(c.m, applied && opt->balance_bias);
        st.step = step + 1;
        if (!root)
            continue;
        if (!applied)
            log_warn("sft/skip",
                     "step %ld: non-finite loss or gradient (loss %g, grad norm %g): "
                     "skipped",
                     step, ms.loss, orr.grad_norm);
        rc = root_report(&c, sh, &ck, &st, step, &ms, &orr, tokens, err);
    }
    if (root && c.o) {
        const long stop_at = atomic_load_explicit(&sh->stop_at, memory_order_relaxed);
        sh->res.stopped = rc == 0 && st.step == stop_at && stop_at < ck.last;
        sh->res.steps = st.step;
        sh->res.skipped = optim_skipped(c.o);
        sh->res.seconds = now_s() - ck.t0;
    }
    rank_free(&c);
    return rc;
}

/* The training and test sets and the tokenizer, shared by the ranks. */
static int shared_load(sft_shared_t *sh, qerr_t *err) {
    const quillan_config_t *cfg = sh->cfg;
    const model_config_t *mc = &cfg->model;
    sh->tok = tokenizer_new_for_config(&mc->tokenizer, err);
    if (!sh->tok)
        return -1;
    if (!cfg->data.train[0])
        return qerr_set(err, QERR_INVALID,
                        "data.train: SFT needs a training set (JSONL of "
                        "prompt/completion pairs)");
    if (dataset_load(&sh->train, cfg->data.train, sh->tok, mc, err))
        return -1;
    if (cfg->data.test[0] && dataset_load(&sh->test, cfg->data.test, sh->tok, mc, err))
        return -1;
    return 0;
}

static int cores(void) {
#ifdef _OPENMP
    return omp_get_num_procs();
#else
    const long n = sysconf(_SC_NPROCESSORS_ONLN);
    return n > 0 ? (int)n : 1;
#endif
}

int sft_run(const quillan_config_t *cfg, const sft_options_t *opt, sft_result_t *res, qerr_t *err) {
    if (opt->batch_size < 1 || opt->log_interval < 1 || opt->eval_interval < 0 ||
        opt->eval_examples < 0 || opt->max_steps < 0)
        return qerr_set(err, QERR_RANGE,
                        "sft: batch size and log interval must be >= 1, eval "
                        "settings and max steps >= 0");
    const int R = opt->replicas;
    if (R < 1 || R > DP_LOCAL_MAX)
        return qerr_set(err, QERR_RANGE, "sft: replicas %d outside [1, %d]", R, DP_LOCAL_MAX);
    sft_shared_t sh = {.cfg = cfg, .opt = opt};
    if (R == 1 && cfg->learner.threads > 0) {
#ifdef _OPENMP
        omp_set_num_threads(cfg->learner.threads);
#endif
        gemm_threads_set(cfg->learner.threads);
    } else if (R > 1) {
        const int all = cfg->learner.threads > 0 ? cfg->learner.threads : cores();
        sh.rank_threads = all / R > 1 ? all / R : 1;
        gemm_threads_set(sh.rank_threads);
    }
    atomic_init(&sh.stop_at, LONG_MAX);
    sh.res.first_loss = NAN;
    sh.res.eval_loss = sh.res.eval_accuracy = NAN;
    int rc = shared_load(&sh, err);
    dp_local_t *g = rc == 0 ? dp_local_new(R, 0, err) : NULL;
    if (rc == 0 && !g)
        rc = -1;
    if (rc == 0)
        rc = dp_local_run(g, rank_main, &sh, err);
    dp_local_destroy(&g);
    tokenizer_destroy(&sh.tok);
    dataset_free(&sh.train);
    dataset_free(&sh.test);
    if (res)
        *res = sh.res;
    return rc;
}
