/* End-to-end decoding benchmark of the inference engine (issue 4, acceptance 3d) and the
 * learner agreement on a large model (acceptance 2).
 *
 *   bench_engine throughput POLICY.qst [--tokens 16]
 *       streaming-read bandwidth probe (1 GiB, 1 and 2 threads), then tokens/s of decoding at
 *       batch 1, 8 and 32 on 1 and 2 threads, time per token by stage, the batch-1 roof
 *       (bandwidth / weight bytes read per token) and the file size.
 *   bench_engine memory POLICY.qst [--context 1024] [--batch 16]
 *       peak resident memory while decoding `batch` sequences whose contexts reach `context`
 *       tokens (one shared prompt of context - 8 tokens, 8 new tokens each).
 *   bench_engine agree PRESET|CHECKPOINT [--data TEST.jsonl] [--seed 1] [--prompts 1]
 *                      [--samples 4] [--tokens 24] [--temperature 1] [--head-int8] [--check]
 *       builds a random model of the preset (or loads a trained checkpoint directory),
 *       quantizes it in memory, decodes `samples` sampled and one greedy completion of each
 *       prompt (lines of the data file tokenized by the policy, or random ids), and recomputes
 *       every token's log-prob with the learner's forward, with and without routing replay:
 *       mean and worst |delta log p| of sampled tokens; for greedy tokens the fraction equal to
 *       the learner's argmax where its top-1/top-2 logit margin exceeds 0.01 (the others
 *       reported apart); router and plan mismatch counts. --check exits 1 unless the bounds
 *       of tests/unit/test_engine.c hold (the e2e.engine_agree test runs it on a checkpoint it
 *       trains).
 *
 * Prompts are token ids (no tokenizer files needed). Results go to bench/RESULTS.md
 * ("Engine"). */
#include "checkpoint.h"
#include "config.h"
#include "engine.h"
#include "jsonl.h"
#include "model.h"
#include "qpolicy.h"
#include "quillan.h"

#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>

static void die(const char *what, const qerr_t *err) {
    fprintf(stderr, "bench_engine: %s: %s\n", what, err->msg);
    exit(1);
}

/* ---- bandwidth probe ---- */

typedef struct {
    const uint64_t *p;
    size_t n;
    uint64_t sum;
    double cpu_s; /* the thread's CPU time for its share */
} probe_t;

static void *probe_run(void *arg) {
    probe_t *pr = arg;
    struct timespec a, b;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &a);
    uint64_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
    for (size_t i = 0; i + 4 <= pr->n; i += 4) {
        s0 += pr->p[i];
        s1 += pr->p[i + 1];
        s2 += pr->p[i + 2];
        s3 += pr->p[i + 3];
    }
    pr->sum = s0 + s1 + s2 + s3;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &b);
    pr->cpu_s = (double)(b.tv_sec - a.tv_sec) + 1e-9 * (double)(b.tv_nsec - a.tv_nsec);
    return NULL;
}

/* GB/s of a streaming read of a 1 GiB buffer with nt threads (best of 3), from each thread's
 * CPU time for its share (the slowest thread), as the engine's figures: on a shared machine a
 * wall-clock probe also counts the time other programs hold the cores. */
static double probe_bandwidth(int nt) {
    const size_t bytes = (size_t)1 << 30, n = bytes / 8;
    uint64_t *buf = malloc(bytes);
    if (!buf)
        return 0;
    for (size_t i = 0; i < n; i++)
        buf[i] = i;
    double best = 0;
    for (int rep = 0; rep < 3; rep++) {
        pthread_t th[8];
        probe_t pr[8];
        for (int t = 0; t < nt; t++) {
            pr[t] = (probe_t){buf + (size_t)t * (n / nt), n / nt, 0, 0};
            pthread_create(&th[t], NULL, probe_run, &pr[t]);
        }
        double slowest = 0;
        for (int t = 0; t < nt; t++) {
            pthread_join(th[t], NULL);
            slowest = pr[t].cpu_s > slowest ? pr[t].cpu_s : slowest;
        }
        const double gbs = (double)bytes / slowest / 1e9;
        best = gbs > best ? gbs : best;
    }
    free(buf);
    return best;
}

/* Weight bytes one token reads at batch 1: everything dense, the kept minis' routers, the kept
 * experts and micro agents, one embedding row. */
static double bytes_per_token(const quillan_policy_t *p) {
    const moe_dims_t *d = &p->md;
    double b = (double)p->head.rows * p->head.row_bytes + (double)p->cfg.dim * 4;
    for (int l = 0; l < p->cfg.num_layers; l++) {
        const eng_layer_t *L = &p->layers[l];
        const eng_mat_t *dense[] = {&L->wq, &L->wk, &L->wv, &L->wo, &L->ov_w1, &L->ov_w2, &L->gate};
        for (size_t i = 0; i < Q_ARRAY_LEN(dense); i++)
            b += (double)dense[i]->rows * dense[i]->row_bytes;
        b += d->KM * ((double)L->router[0].rows * L->router[0].row_bytes +
                      (double)L->mic_router[0].rows * L->mic_router[0].row_bytes +
                      d->KE * ((double)d->EH * L->exp_w1[0].row_bytes +
                               (double)d->C * L->exp_w2[0].row_bytes) +
                      d->KN * 2.0 * L->mic_down[0].row_bytes);
    }
    const eng_diff_t *D = &p->diff;
    const eng_mat_t *dm[] = {&D->in_z, &D->in_c, &D->out, &D->dec};
    for (size_t i = 0; i < Q_ARRAY_LEN(dm); i++)
        b += (double)dm[i]->rows * dm[i]->row_bytes;
    for (int n = 0; n < p->dd.NB; n++)
        b += (double)D->up[n].rows * D->up[n].row_bytes +
             (double)D->down[n].rows * D->down[n].row_bytes;
    return b;
}

static quillan_engine_t *engine(int threads, int batch, int record) {
    quillan_engine_params_t ep;
    quillan_engine_params_default(&ep);
    ep.threads = threads;
    ep.max_batch = batch;
    ep.record_routing = record;
    qerr_t err;
    quillan_engine_t *e = quillan_engine_new(&ep, &err);
    if (!e)
        die("engine", &err);
    return e;
}

static int32_t *random_tokens(int n, int V, uint64_t seed) {
    int32_t *t = malloc((size_t)n * sizeof *t);
    uint64_t x = seed;
    for (int i = 0; i < n; i++) {
        x = x * 6364136223846793005ULL + 1442695040888963407ULL;
        t[i] = (int32_t)((x >> 33) % (uint64_t)V);
    }
    return t;
}

/* A comma-separated list of positive integers ("1,8,32") into out[max]; returns the count. */
static int parse_list(const char *s, int *out, int max) {
    int n = 0;
    while (*s && n < max) {
        char *end;
        const long v = strtol(s, &end, 10);
        if (end == s || v < 1 || v > 4096) {
            fprintf(stderr, "bench_engine: bad list '%s' (positive integers, commas)\n", s);
            exit(2);
        }
        out[n++] = (int)v;
        s = *end == ',' ? end + 1 : end;
    }
    return n;
}

static double cpu_clock(clockid_t id) {
    struct timespec ts;
    clock_gettime(id, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static long n_new(const quillan_group_t *g, int B) {
    long n = 0;
    for (int i = 0; i < B; i++)
        n += g[i].samples[0].n_tokens;
    return n;
}

typedef struct {
    const char *threads, *batches;
    int tokens, repeat, probe;
} tp_opts_t;

static int cmd_throughput(const char *path, const tp_opts_t *o) {
    qerr_t err;
    quillan_policy_t *p = quillan_policy_load_file(path, &err);
    if (!p)
        die(path, &err);
    quillan_policy_info_t info;
    quillan_policy_info(p, &info);
    int ths[8], bs[8];
    const int nth = parse_list(o->threads, ths, 8), nb = parse_list(o->batches, bs, 8);
    double bw[9] = {0};
    const double bpt = bytes_per_token(p);
    printf("policy %s: %.1f MB file, head %s, %.1f MB of weights read per token at batch 1\n", path,
           (double)info.bytes / 1e6, qtype_name(p->head.qt), bpt / 1e6);
    if (o->probe) {
        printf("bandwidth probe (1 GiB streaming read, slowest thread's CPU time):");
        for (int i = 0; i < nth; i++) {
            bw[i] = probe_bandwidth(ths[i] < 8 ? ths[i] : 8);
            printf(" %.1f GB/s on %d thread%s", bw[i], ths[i], ths[i] > 1 ? "s" : "");
        }
        printf("\n");
    }
    printf("tok/s wall = new tokens / elapsed; tok/s main = new tokens / CPU time of the calling "
           "thread (on an idle machine about the wall figure; on a busy one a descheduled worker "
           "leaves its chunks to the caller, so this is pessimistic); 2-thread model (1-thread "
           "runs) = new tokens / (serial CPU + parallel CPU split over 2 threads by chunks, no "
           "overhead); cpu ms/tok = process CPU (all threads) per token through the network, "
           "split by stage in proportion to the stages' wall time on the right\n");
    printf(
        "| threads | batch | run | tok/s wall | tok/s main | 2-thread model tok/s | batch-1 roof "
        "tok/s | cpu ms/tok | attn | moe | diffusion | head | sample |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|\n");
    char model[32][160];
    int nmodel = 0;
    for (int ti = 0; ti < nth; ti++)
        for (int bi = 0; bi < nb; bi++)
            for (int rep = 0; rep < o->repeat; rep++) {
                const int th = ths[ti], B = bs[bi];
                quillan_engine_t *e = engine(th, B, 1);
                quillan_prompt_t *pr = calloc((size_t)B, sizeof *pr);
                quillan_group_t *g = calloc((size_t)B, sizeof *g);
                int32_t bos = info.bos;
                for (int i = 0; i < B; i++) {
                    quillan_sampling_default(&pr[i].sampling);
                    pr[i].prompt_id = (uint64_t)i;
                    pr[i].tokens = &bos;
                    pr[i].n_tokens = 1;
                    pr[i].n_samples = 1;
                    /* The EOS of a random model is as likely as any token: no other stops. */
                    pr[i].sampling.max_new_tokens = 2;
                }
                /* Warm-up: the engine's buffers and the first touch of every weight page. */
                if (quillan_generate(e, p, pr, B, g, NULL, NULL, &err) < 0)
                    die("generate", &err);
                for (int i = 0; i < B; i++) {
                    quillan_group_free(&g[i]);
                    pr[i].sampling.max_new_tokens = o->tokens;
                }
                quillan_engine_stats_reset(e);
                kern_pool_t *pool = eng_engine_pool(e);
                double reg0, mod0, reg1, mod1;
                kern_pool_set_timing(pool, 2);
                kern_pool_region_time(pool, &reg0, &mod0);
                const double t0 = eng_now(), c0 = cpu_clock(CLOCK_THREAD_CPUTIME_ID),
                             p0 = cpu_clock(CLOCK_PROCESS_CPUTIME_ID);
                if (quillan_generate(e, p, pr, B, g, NULL, NULL, &err) < 0)
                    die("generate", &err);
                const double secs = eng_now() - t0,
                             main_cpu = cpu_clock(CLOCK_THREAD_CPUTIME_ID) - c0,
                             proc_cpu = cpu_clock(CLOCK_PROCESS_CPUTIME_ID) - p0;
                kern_pool_region_time(pool, &reg1, &mod1);
                const long n = n_new(g, B);
                /* One thread: the caller's time outside the pool is serial; inside, its chunks
                 * shared by two threads at best. Fractions of the wall time, applied to the
                 * CPU time. */
                char amdahl[64] = "";
                if (th == 1) {
                    const double serial = 1 - (reg1 - reg0) / secs;
                    snprintf(amdahl, sizeof amdahl, "%.1f (%.0f%% serial)",
                             (double)n / (main_cpu * (serial + (mod1 - mod0) / secs)),
                             100 * serial);
                }
                eng_time_stats_t ts;
                eng_engine_time_stats(e, &ts);
                quillan_stats_t st;
                quillan_engine_stats(e, &st);
                /* Process CPU per token through the network, split by the stages' wall time. */
                const double per =
                    1e3 * proc_cpu / secs / (double)(st.decode_tokens + st.prefill_tokens);
                char roof[32] = "";
                if (o->probe)
                    snprintf(roof, sizeof roof, "%.1f", bw[ti] * 1e9 / bpt);
                printf(
                    "| %d | %d | %d | %.1f | %.1f | %s | %s | %.2f | %.2f | %.2f | %.2f | %.2f | "
                    "%.2f |\n",
                    th, B, rep + 1, (double)n / secs, (double)n / main_cpu, amdahl, roof,
                    secs * per, ts.wall_s[ENG_STAGE_ATTENTION] * per,
                    ts.wall_s[ENG_STAGE_MOE] * per, ts.wall_s[ENG_STAGE_DIFFUSION] * per,
                    ts.wall_s[ENG_STAGE_HEAD] * per, ts.wall_s[ENG_STAGE_SAMPLE] * per);
                fflush(stdout);
                if (th == 1 && nmodel < (int)Q_ARRAY_LEN(model)) {
                    char *m = model[nmodel++];
                    int len = snprintf(m, sizeof model[0], "| %d | %d |", B, rep + 1);
                    for (int k = 0; k < ENG_STAGE_COUNT; k++)
                        len += snprintf(m + len, sizeof model[0] - (size_t)len, " %.2f / %.2f |",
                                        (ts.wall_s[k] - ts.region_s[k]) * per,
                                        (ts.wall_s[k] - ts.region_s[k] + ts.model_s[k]) * per);
                }
                for (int i = 0; i < B; i++)
                    quillan_group_free(&g[i]);
                free(g);
                free(pr);
                quillan_engine_destroy(&e);
            }
    if (nmodel > 0) {
        printf("\n1-thread runs by stage: serial CPU ms/token (outside parallel regions) / the "
               "2-thread model's ms/token\n| batch | run | attn | moe | diffusion | head | sample "
               "|\n|---|---|---|---|---|---|---|\n");
        for (int i = 0; i < nmodel; i++)
            printf("%s\n", model[i]);
    }
    quillan_policy_release(&p);
    return 0;
}

static int cmd_memory(const char *path, int ctx, int batch) {
    qerr_t err;
    quillan_policy_t *p = quillan_policy_load_file(path, &err);
    if (!p)
        die(path, &err);
    quillan_policy_info_t info;
    quillan_policy_info(p, &info);
    quillan_engine_t *e = engine(0, batch, 1);
    const int P = ctx - 8;
    int32_t *toks = random_tokens(P, info.vocab_size, 7);
    quillan_prompt_t pr;
    memset(&pr, 0, sizeof pr);
    quillan_sampling_default(&pr.sampling);
    pr.tokens = toks;
    pr.n_tokens = P;
    pr.n_samples = batch;
    pr.sampling.max_new_tokens = 8;
    quillan_group_t g;
    const double t0 = eng_now();
    if (quillan_generate(e, p, &pr, 1, &g, NULL, NULL, &err) < 0)
        die("generate", &err);
    quillan_stats_t st;
    quillan_engine_stats(e, &st);
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    printf("batch %d, contexts of %d tokens: peak RSS %.1f MB (file %.1f MB, KV cache %.1f MB), "
           "%.1f s (prefill %d tokens)\n",
           batch, ctx, (double)ru.ru_maxrss / 1024, (double)info.bytes / 1e6,
           (double)st.kv_bytes / 1e6, eng_now() - t0, P);
    quillan_group_free(&g);
    free(toks);
    quillan_engine_destroy(&e);
    quillan_policy_release(&p);
    return 0;
}

/* ---- agreement ---- */

typedef struct {
    const char *what; /* preset name or checkpoint directory */
    const char *data; /* JSONL prompts (RL or SFT lines) or NULL for random token prompts */
    uint64_t seed;
    int prompts, samples, tokens, head_int8, check;
    double temperature;
} agree_opts_t;

/* A preset's random model, or a trained checkpoint's model (its own config). */
static model_t *agree_model(const agree_opts_t *o, qerr_t *err) {
    model_config_t c;
    if (model_config_preset(o->what, &c, NULL) == 0) {
        c.seed = o->seed;
        c.head_int8 = o->head_int8;
        return model_new(&c, err);
    }
    char dir[4096];
    quillan_config_t *cfg = calloc(1, sizeof *cfg);
    model_t *m = NULL;
    if (!cfg) {
        qerr_set(err, QERR_NOMEM, "out of memory");
        return NULL;
    }
    config_defaults(cfg);
    if (checkpoint_config_read(o->what, cfg, dir, sizeof dir, err) == 0 &&
        config_validate(cfg, err) == 0) {
        cfg->model.head_int8 = cfg->model.head_int8 || o->head_int8;
        m = checkpoint_model_load(dir, &cfg->model, NULL, err);
    }
    free(cfg);
    return m;
}

/* Prompt i: line i of the data file tokenized by the policy (BOS first), or 8 random ids. */
static int32_t *agree_prompt(const agree_opts_t *o, const jsonl_reader_t *rd,
                             const quillan_policy_t *p, int i, int *n) {
    quillan_policy_info_t info;
    quillan_policy_info(p, &info);
    qerr_t err;
    if (!rd) {
        int32_t *t = random_tokens(8, info.vocab_size, o->seed + 1 + (uint64_t)i);
        t[0] = info.bos;
        *n = 8;
        return t;
    }
    jsonl_example_t ex;
    if (jsonl_reader_example(rd, (size_t)i, JSONL_TASK_RL, &ex, &err) < 0)
        die("prompt", &err);
    int32_t *ids;
    size_t len;
    if (quillan_tokenize(p, ex.prompt, strlen(ex.prompt), 1, &ids, &len, &err) < 0)
        die("tokenize", &err);
    jsonl_example_free(&ex);
    *n = (int)len;
    return ids;
}

typedef struct {
    double sum[2], worst[2]; /* |delta log p| of sampled tokens: [own routing, replay] */
    long n;
    double gsum[2]; /* the same for greedy tokens */
    long gn;
    /* greedy tokens where the learner's top-1 / top-2 logit margin exceeds AGREE_MARGIN:
     * counted, and how many the engine chose as the learner's top-1; low: margin <= it */
    long counted[2], agree[2], low[2], low_agree[2];
    long dec, mis, pmis, npos; /* learner decisions that differed from the record (replay run) */
} agree_stats_t;

#define AGREE_MARGIN 0.01
/* --check bounds, those of tests/unit/test_engine.c: with routing replay the greedy agreement
 * and the mean |delta log p| of sampled and greedy tokens; with each side routing on its own
 * the mean |delta log p| (near-ties may flip a few discrete decisions). */
#define BOUND_GREEDY 0.995
#define BOUND_DLOGP_REPLAY 5e-3
#define BOUND_DLOGP_OWN 5e-2

/* Recomputes every token of sample sm with the learner, own routing and replayed. */
static void agree_sample(model_t *m, const quillan_policy_t *p, const int32_t *prompt, int P,
                         const quillan_sample_t *sm, double temperature, int greedy,
                         agree_stats_t *st) {
    if (sm->n_tokens < 2)
        return;
    const model_config_t *c = model_config(m);
    moe_dims_t d;
    moe_dims_from_config(&d, c);
    const int L = c->num_layers, T = P + sm->n_tokens - 1, V = c->vocab_size;
    qerr_t err;
    int32_t *tk = malloc((size_t)T * 4), *tg = malloc((size_t)T * 4);
    real *w = malloc((size_t)T * sizeof *w), *logits = malloc((size_t)V * sizeof *logits);
    moe_route_t *rt = calloc((size_t)L, sizeof *rt);
    diffusion_plan_t plan;
    if (!tk || !tg || !w || !logits || !rt)
        die("agree", &(qerr_t){.msg = "out of memory"});
    for (int l = 0; l < L; l++)
        if (moe_route_init(&rt[l], &d, T, &err) < 0)
            die("routes", &err);
    if (diffusion_plan_init(&plan, c->diffusion_bits, T, &err) < 0)
        die("plan", &err);
    for (int t = 0; t < T; t++) {
        tk[t] = t < P ? prompt[t] : sm->tokens[t - P];
        tg[t] = t + 1 < P ? prompt[t + 1] : sm->tokens[t + 1 - P];
        w[t] = t >= P - 1 ? 1 : 0;
    }
    if (eng_sample_replay(rt, &plan, 0, p, sm, T, &err) < 0)
        die("replay", &err);
    for (int replay = 0; replay <= 1; replay++) {
        model_batch_t b = {.B = 1,
                           .T = T,
                           .tokens = tk,
                           .targets = tg,
                           .weights = w,
                           .replay = replay ? rt : NULL,
                           .plan_replay = replay ? &plan : NULL,
                           .temperature = (real)temperature};
        model_stats_t ms;
        if (model_forward(m, &b, &ms, &err) < 0)
            die("learner forward", &err);
        const real *lp = model_logp(m);
        for (int k = 0; k < sm->n_tokens; k++) {
            const double dl = fabs((double)sm->logprobs_full[k] - lp[P - 1 + k]);
            if (!greedy) {
                st->sum[replay] += dl;
                st->worst[replay] = dl > st->worst[replay] ? dl : st->worst[replay];
                continue;
            }
            st->gsum[replay] += dl;
            model_logits_at(m, 0, P - 1 + k, logits);
            int best = 0, second = V > 1 ? 1 : 0;
            if (V > 1 && logits[1] > logits[0])
                best = 1, second = 0;
            for (int v = 2; v < V; v++)
                if (logits[v] > logits[best])
                    second = best, best = v;
                else if (logits[v] > logits[second])
                    second = v;
            const int same = best == sm->tokens[k];
            if ((double)logits[best] - logits[second] > AGREE_MARGIN) {
                st->counted[replay]++;
                st->agree[replay] += same;
            } else {
                st->low[replay]++;
                st->low_agree[replay] += same;
            }
        }
        if (replay) {
            st->dec += ms.decisions;
            st->mis += ms.mismatches;
            st->pmis += ms.plan_mismatches;
            st->npos += T;
        }
    }
    if (greedy)
        st->gn += sm->n_tokens;
    else
        st->n += sm->n_tokens;
    for (int l = 0; l < L; l++)
        moe_route_free(&rt[l]);
    free(rt);
    diffusion_plan_free(&plan);
    free(tk);
    free(tg);
    free(w);
    free(logits);
}

static int cmd_agree(const agree_opts_t *o) {
    qerr_t err;
    model_t *m = agree_model(o, &err);
    if (!m)
        die(o->what, &err);
    qpolicy_t *q = qpolicy_build(m, 1, &err);
    if (!q)
        die("quantize", &err);
    size_t len;
    const void *bytes = qpolicy_bytes(q, &len);
    quillan_policy_t *p = quillan_policy_load_bytes(bytes, len, "snapshot", NULL, NULL, &err);
    if (!p)
        die("load", &err);
    jsonl_reader_t *rd = NULL;
    if (o->data && !(rd = jsonl_reader_new(o->data, JSONL_MAX_LINE_DEFAULT, &err)))
        die(o->data, &err);
    if (rd && jsonl_reader_count(rd) < (size_t)o->prompts)
        die(o->data, &(qerr_t){.msg = "fewer lines than --prompts"});
    quillan_engine_t *e = engine(0, o->samples > 8 ? o->samples : 8, 1);
    agree_stats_t st;
    memset(&st, 0, sizeof st);
    for (int i = 0; i < o->prompts; i++) {
        int P;
        int32_t *toks = agree_prompt(o, rd, p, i, &P);
        for (int greedy = 0; greedy <= 1; greedy++) {
            quillan_prompt_t pr;
            memset(&pr, 0, sizeof pr);
            quillan_sampling_default(&pr.sampling);
            pr.prompt_id = (uint64_t)i;
            pr.tokens = toks;
            pr.n_tokens = P;
            pr.n_samples = greedy ? 1 : o->samples;
            pr.sampling.max_new_tokens = o->tokens;
            pr.sampling.seed = o->seed;
            pr.sampling.temperature = greedy ? 0.0f : (float)o->temperature;
            quillan_group_t g;
            if (quillan_generate(e, p, &pr, 1, &g, NULL, NULL, &err) < 0)
                die("generate", &err);
            for (int s = 0; s < g.n_samples; s++)
                agree_sample(m, p, toks, P, &g.samples[s], greedy ? 1.0 : o->temperature, greedy,
                             &st);
            quillan_group_free(&g);
        }
        free(toks);
    }
    printf("%s (seed %llu%s; %d prompts%s): sampled at T %.2f: %ld tokens, mean |dlogp| own "
           "routing %.2e (worst %.2e), replay %.2e (worst %.2e)\n",
           o->what, (unsigned long long)o->seed, o->head_int8 ? ", head_int8" : "", o->prompts,
           rd ? " from the data file" : " of random ids", o->temperature, st.n,
           st.n ? st.sum[0] / st.n : 0.0, st.worst[0], st.n ? st.sum[1] / st.n : 0.0, st.worst[1]);
    for (int r = 0; r <= 1; r++)
        printf("greedy, %s: %ld tokens, mean |dlogp| %.2e; agreement %ld / %ld = %.4f where the "
               "learner's top-1/top-2 margin > %.2g; margin <= %.2g: %ld tokens, %ld agree\n",
               r ? "routing replay" : "own routing", st.gn, st.gn ? st.gsum[r] / st.gn : 0.0,
               st.agree[r], st.counted[r],
               st.counted[r] ? (double)st.agree[r] / st.counted[r] : 0.0, AGREE_MARGIN,
               AGREE_MARGIN, st.low[r], st.low_agree[r]);
    printf("learner's own choice differed on %ld of %ld router decisions and %ld of %ld plans\n",
           st.mis, st.dec, st.pmis, st.npos);
    int rc = 0;
    if (o->check) {
        const double own = (st.sum[0] + st.gsum[0]) / (double)(st.n + st.gn),
                     rep = (st.sum[1] + st.gsum[1]) / (double)(st.n + st.gn),
                     agree = st.counted[1] ? (double)st.agree[1] / st.counted[1] : 0.0;
        rc = !(agree >= BOUND_GREEDY && rep <= BOUND_DLOGP_REPLAY && own <= BOUND_DLOGP_OWN) ||
             st.counted[1] == 0;
        printf("check: greedy agreement with replay %.4f (>= %.3f), mean |dlogp| replay %.2e "
               "(<= %.0e), own routing %.2e (<= %.0e): %s\n",
               agree, BOUND_GREEDY, rep, BOUND_DLOGP_REPLAY, own, BOUND_DLOGP_OWN,
               rc ? "FAILED" : "ok");
    }
    jsonl_reader_destroy(&rd);
    quillan_engine_destroy(&e);
    quillan_policy_release(&p);
    qpolicy_destroy(&q);
    model_destroy(&m);
    return rc;
}

static long opt(int argc, char **argv, const char *name, long def) {
    for (int i = 0; i + 1 < argc; i++)
        if (!strcmp(argv[i], name))
            return strtol(argv[i + 1], NULL, 10);
    return def;
}

static const char *sopt(int argc, char **argv, const char *name, const char *def) {
    for (int i = 0; i + 1 < argc; i++)
        if (!strcmp(argv[i], name))
            return argv[i + 1];
    return def;
}

static double dopt(int argc, char **argv, const char *name, double def) {
    for (int i = 0; i + 1 < argc; i++)
        if (!strcmp(argv[i], name))
            return strtod(argv[i + 1], NULL);
    return def;
}

static int has(int argc, char **argv, const char *name) {
    for (int i = 0; i < argc; i++)
        if (!strcmp(argv[i], name))
            return 1;
    return 0;
}

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr,
                "usage: bench_engine throughput POLICY.qst [--tokens 16] [--threads 1,2] "
                "[--batches 1,8,32] [--repeat 1] [--no-probe]\n"
                "       bench_engine memory POLICY.qst [--context 1024] [--batch 16]\n"
                "       bench_engine agree PRESET|CHECKPOINT [--data TEST.jsonl] [--seed 1] "
                "[--prompts 1] [--samples 4] [--tokens 24] [--temperature 1] "
                "[--head-int8] [--check]\n");
        return 2;
    }
    if (!strcmp(argv[1], "throughput")) {
        const tp_opts_t o = {sopt(argc, argv, "--threads", "1,2"),
                             sopt(argc, argv, "--batches", "1,8,32"),
                             (int)opt(argc, argv, "--tokens", 16),
                             (int)opt(argc, argv, "--repeat", 1), !has(argc, argv, "--no-probe")};
        return cmd_throughput(argv[2], &o);
    }
    if (!strcmp(argv[1], "memory"))
        return cmd_memory(argv[2], (int)opt(argc, argv, "--context", 1024),
                          (int)opt(argc, argv, "--batch", 16));
    if (!strcmp(argv[1], "agree")) {
        const agree_opts_t o = {argv[2],
                                sopt(argc, argv, "--data", NULL),
                                (uint64_t)opt(argc, argv, "--seed", 1),
                                (int)opt(argc, argv, "--prompts", 1),
                                (int)opt(argc, argv, "--samples", 4),
                                (int)opt(argc, argv, "--tokens", 24),
                                has(argc, argv, "--head-int8"),
                                has(argc, argv, "--check"),
                                dopt(argc, argv, "--temperature", 1.0)};
        if (o.prompts < 1 || o.samples < 1 || o.tokens < 1 || !(o.temperature > 0)) {
            fprintf(stderr, "bench_engine: --prompts, --samples, --tokens and --temperature must "
                            "be positive\n");
            return 2;
        }
        return cmd_agree(&o);
    }
    fprintf(stderr, "bench_engine: unknown command '%s'\n", argv[1]);
    return 2;
}
