#include "sft.h"

#include "alloc.h"
#include "checkpoint.h"
#include "gemm.h"
#include "jsonl.h"
#include "log.h"
#include "model.h"
#include "optimizer.h"
#include "rng.h"
#include "tokenizer.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

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

static tokenizer_t *tokenizer_for(const model_config_t *mc, qerr_t *err) {
    const model_tokenizer_config_t *t = &mc->tokenizer;
    if (t->kind == MODEL_TOKENIZER_BYTE) {
        tokenizer_t *tok = tokenizer_new_byte();
        if (!tok)
            qerr_set(err, QERR_NOMEM, "out of memory");
        return tok;
    }
    if (t->json[0])
        return tokenizer_new_hf_json(t->json, err);
    if (!t->vocab[0])
        return qerr_set(err, QERR_INVALID,
                        "model.tokenizer: kind gpt2 needs vocab + merges or "
                        "json"),
               NULL;
    return tokenizer_new_bpe_files(t->vocab, t->merges, err);
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
    *o = (sft_options_t){
        .batch_size = 32, .eval_interval = 100, .eval_examples = 500, .log_interval = 10};
}

static void fmt_eta(char *buf, size_t cap, double s) {
    if (!(s >= 0) || s > 1e8)
        s = 0;
    const long t = (long)(s + 0.5);
    snprintf(buf, cap, "%ld:%02ld:%02ld", t / 3600, t / 60 % 60, t % 60);
}

typedef struct {
    model_t *m;
    optim_t *o;
    tokenizer_t *tok;
    dataset_t train, test;
    size_t *order;
    batch_buf_t bb;
} sft_ctx_t;

static void ctx_free(sft_ctx_t *c) {
    model_destroy(&c->m);
    optim_destroy(&c->o);
    tokenizer_destroy(&c->tok);
    dataset_free(&c->train);
    dataset_free(&c->test);
    free(c->order);
    batch_free(&c->bb);
}

static int run(sft_ctx_t *c, const quillan_config_t *cfg, const sft_options_t *opt,
               sft_result_t *res, qerr_t *err) {
    const config_learner_t *lc = &cfg->learner;
    const model_config_t *mc = &cfg->model;
    c->tok = tokenizer_for(mc, err);
    if (!c->tok)
        return -1;
    if (!cfg->data.train[0])
        return qerr_set(err, QERR_INVALID,
                        "data.train: SFT needs a training set (JSONL of "
                        "prompt/completion pairs)");
    if (dataset_load(&c->train, cfg->data.train, c->tok, mc, err))
        return -1;
    if (cfg->data.test[0] && dataset_load(&c->test, cfg->data.test, c->tok, mc, err))
        return -1;
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
    const int B = opt->batch_size;
    c->order = malloc(c->train.n * sizeof *c->order);
    if (!c->order ||
        batch_alloc(&c->bb, B > SFT_GREEDY_BATCH ? B : SFT_GREEDY_BATCH, mc->context + 1))
        return qerr_set(err, QERR_NOMEM, "out of memory");

    checkpoint_state_t st = {.seed = lc->seed, .data_fingerprint = c->train.fingerprint};
    if (opt->resume) {
        char dir[4096];
        if (checkpoint_resolve(opt->resume, dir, sizeof dir, err) ||
            checkpoint_load(dir, c->m, c->o, &st, err))
            return -1;
        if (st.data_fingerprint != c->train.fingerprint)
            return qerr_set(err, QERR_INVALID,
                            "%s: the training set %s changed since this "
                            "checkpoint was written",
                            dir, cfg->data.train);
        if (st.data_position > c->train.n)
            return qerr_set(err, QERR_INVALID,
                            "%s: data position %llu is beyond the %zu "
                            "examples of %s",
                            dir, (unsigned long long)st.data_position, c->train.n, cfg->data.train);
        log_info("sft/resume", "resumed from %s at step %ld", dir, st.step);
    }
    rng_stream_t ds;
    epoch_order(c->order, c->train.n, cfg->data.seed, st.data_epoch, cfg->data.shuffle, &ds);

    const long last = opt->max_steps > 0 ? opt->max_steps : lc->total_steps;
    const size_t n_eval = opt->eval_examples > 0 && (size_t)opt->eval_examples < c->test.n
                              ? (size_t)opt->eval_examples
                              : c->test.n;
    size_t *idx = malloc((size_t)B * sizeof *idx);
    if (!idx)
        return qerr_set(err, QERR_NOMEM, "out of memory");
    const double t0 = now_s();
    double tlog = t0;
    long tok_log = 0;
    int rc = 0;
    res->first_loss = NAN;
    res->eval_loss = res->eval_accuracy = NAN;
    const int32_t pad = tokenizer_pad_id(c->tok);
    const long start = st.step;
    long step = st.step;
    for (; step < last; step++) {
        for (int b = 0; b < B; b++) {
            if (st.data_position >= c->train.n) {
                st.data_epoch++;
                st.data_position = 0;
                epoch_order(c->order, c->train.n, cfg->data.seed, st.data_epoch, cfg->data.shuffle,
                            &ds);
            }
            idx[b] = c->order[st.data_position++];
        }
        st.rng_key = ds.key;
        st.rng_counter = ds.counter;
        batch_fill(&c->bb, &c->train, idx, B, pad);
        const uint64_t keys[2] = {lc->seed, (uint64_t)step};
        model_batch_t mb = {.B = B,
                            .T = c->bb.T,
                            .tokens = c->bb.tokens,
                            .targets = c->bb.targets,
                            .weights = c->bb.weights,
                            .training = 1,
                            .count_load = 1,
                            .noise_key = rng_hash(keys, 2),
                            .temperature = 1,
                            .aux_balance = (real)lc->aux.balance,
                            .aux_z = (real)lc->aux.z_loss,
                            .aux_diffusion = (real)lc->aux.diffusion};
        model_stats_t ms;
        model_grads_zero(c->m);
        if ((rc = model_forward(c->m, &mb, &ms, err)) != 0)
            break;
        model_backward(c->m, NULL, NULL);
        optim_result_t orr;
        const int applied = optim_step(c->o, c->m, ms.loss, &orr);
        model_balance_update(c->m, applied && opt->balance_bias);
        if (!applied)
            log_warn("sft/skip",
                     "step %ld: non-finite loss or gradient (loss %g, grad norm %g): "
                     "skipped",
                     step, ms.loss, orr.grad_norm);
        st.step = step + 1;
        if (opt->loss_trace && (size_t)step < opt->trace_cap)
            opt->loss_trace[step] = ms.loss;
        if (isnan(res->first_loss))
            res->first_loss = ms.loss;
        res->last_loss = ms.loss;
        res->tokens += c->bb.tokens_in;
        tok_log += c->bb.tokens_in;
        if ((step + 1) % opt->log_interval == 0 || step + 1 == last) {
            const double t = now_s(), el = t - t0;
            const double tps = tok_log / (t - tlog > 0 ? t - tlog : 1e-9);
            const double eta = el / (double)(step + 1 - start) * (double)(last - step - 1);
            char etas[32];
            fmt_eta(etas, sizeof etas, eta);
            const log_field_t f[] = {{"step", (double)(step + 1)},
                                     {"loss", ms.loss},
                                     {"ce", ms.ce},
                                     {"loss/balance", ms.balance},
                                     {"loss/diffusion", ms.diffusion},
                                     {"lr", orr.lr},
                                     {"grad_norm", orr.grad_norm},
                                     {"tokens_per_s", tps},
                                     {"eta_s", eta}};
            log_emit(LOG_INFO, "sft/step", f, Q_ARRAY_LEN(f),
                     "step %ld/%ld loss %.4f ce %.4f lr %.2e tok/s %.0f ETA %s", step + 1, last,
                     ms.loss, ms.ce, orr.lr, tps, etas);
            tlog = t;
            tok_log = 0;
        }
        const int eval_now =
            c->test.n > 0 &&
            ((opt->eval_interval > 0 && (step + 1) % opt->eval_interval == 0) || step + 1 == last);
        if (eval_now) {
            if ((rc = evaluate(c->m, &c->test, n_eval, B, &c->bb, c->tok, &res->eval_loss,
                               &res->eval_accuracy, err)) != 0)
                break;
            const log_field_t f[] = {{"step", (double)(step + 1)},
                                     {"eval/loss", res->eval_loss},
                                     {"eval/exact_match", res->eval_accuracy},
                                     {"elapsed_s", now_s() - t0}};
            log_emit(LOG_INFO, "sft/eval", f, Q_ARRAY_LEN(f),
                     "step %ld eval loss %.4f exact match %.1f%% (%zu examples) at %.1f s",
                     step + 1, res->eval_loss, 100 * res->eval_accuracy, n_eval, now_s() - t0);
        }
        const int ckpt_now =
            lc->checkpoint_dir[0] &&
            ((lc->checkpoint_interval > 0 && (step + 1) % lc->checkpoint_interval == 0) ||
             step + 1 == last);
        if (ckpt_now) {
            char dir[4096];
            if ((rc = checkpoint_save(lc->checkpoint_dir, cfg, c->m, c->o, &st, dir, sizeof dir,
                                      err)) != 0)
                break;
            log_info("sft/checkpoint", "step %ld: wrote %s", step + 1, dir);
        }
    }
    free(idx);
    res->steps = st.step;
    res->skipped = optim_skipped(c->o);
    res->seconds = now_s() - t0;
    return rc;
}

int sft_run(const quillan_config_t *cfg, const sft_options_t *opt, sft_result_t *res, qerr_t *err) {
    if (opt->batch_size < 1 || opt->log_interval < 1 || opt->eval_interval < 0 ||
        opt->eval_examples < 0 || opt->max_steps < 0)
        return qerr_set(err, QERR_RANGE,
                        "sft: batch size and log interval must be >= 1, eval "
                        "settings and max steps >= 0");
    if (cfg->learner.threads > 0) {
#ifdef _OPENMP
        omp_set_num_threads(cfg->learner.threads);
#endif
        gemm_threads_set(cfg->learner.threads);
    }
    sft_result_t r = {0};
    sft_ctx_t c = {0};
    const int rc = run(&c, cfg, opt, &r, err);
    ctx_free(&c);
    if (res)
        *res = r;
    return rc;
}
