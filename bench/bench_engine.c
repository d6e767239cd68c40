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
 *   bench_engine agree PRESET [--seed 1] [--samples 4] [--tokens 24] [--head-int8]
 *       builds a random model of the preset, quantizes it in memory, decodes, and recomputes
 *       every sampled token's log-prob with the learner's forward, with and without routing
 *       replay: mean and worst |delta log p|, router and plan mismatch counts.
 *
 * Prompts are token ids (no tokenizer files needed). Results go to bench/RESULTS.md
 * ("Engine"). */
#include "engine.h"
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

static int cmd_agree(const char *preset, uint64_t seed, int nsamples, int ntok, int head_int8) {
    model_config_t c;
    qerr_t err;
    if (model_config_preset(preset, &c, &err) < 0)
        die("preset", &err);
    c.seed = seed;
    c.head_int8 = head_int8;
    model_t *m = model_new(&c, &err);
    if (!m)
        die("model", &err);
    qpolicy_t *q = qpolicy_build(m, 1, &err);
    if (!q)
        die("quantize", &err);
    size_t len;
    const void *bytes = qpolicy_bytes(q, &len);
    quillan_policy_t *p = quillan_policy_load_bytes(bytes, len, "snapshot", NULL, NULL, &err);
    if (!p)
        die("load", &err);
    quillan_policy_info_t info;
    quillan_policy_info(p, &info);
    quillan_engine_t *e = engine(0, nsamples, 1);
    const int P = 8;
    int32_t *toks = random_tokens(P, c.vocab_size, seed + 1);
    toks[0] = info.bos;
    quillan_prompt_t pr;
    memset(&pr, 0, sizeof pr);
    quillan_sampling_default(&pr.sampling);
    pr.tokens = toks;
    pr.n_tokens = P;
    pr.n_samples = nsamples;
    pr.sampling.max_new_tokens = ntok;
    pr.sampling.seed = seed;
    quillan_group_t g;
    if (quillan_generate(e, p, &pr, 1, &g, NULL, NULL, &err) < 0)
        die("generate", &err);
    moe_dims_t d;
    moe_dims_from_config(&d, model_config(m));
    const int L = c.num_layers, Lw = info.plan_words;
    double sum[2] = {0, 0}, worst[2] = {0, 0};
    long n = 0, dec = 0, mis = 0, pmis = 0, npos = 0;
    for (int s = 0; s < nsamples; s++) {
        const quillan_sample_t *sm = &g.samples[s];
        const int T = P + sm->n_tokens - 1;
        if (sm->n_tokens < 2)
            continue;
        int32_t *tk = malloc((size_t)T * 4), *tg = malloc((size_t)T * 4);
        real *w = malloc((size_t)T * sizeof *w);
        moe_route_t *rt = calloc((size_t)L, sizeof *rt);
        diffusion_plan_t plan;
        for (int l = 0; l < L; l++)
            moe_route_init(&rt[l], &d, T, &err);
        diffusion_plan_init(&plan, c.diffusion_bits, T, &err);
        for (int t = 0; t < T; t++) {
            tk[t] = t < P ? toks[t] : sm->tokens[t - P];
            tg[t] = t + 1 < P ? toks[t + 1] : sm->tokens[t + 1 - P];
            w[t] = t >= P - 1 ? 1 : 0;
            for (int l = 0; l < L; l++) {
                const int32_t *rec = sm->route + ((size_t)t * L + l) * info.route_ints;
                memcpy(rt[l].mini + (size_t)t * d.KM, rec, (size_t)d.KM * 4);
                memcpy(rt[l].expert + (size_t)t * d.KM * d.KE, rec + d.KM, (size_t)d.KM * d.KE * 4);
                memcpy(rt[l].micro + (size_t)t * d.KM * d.KN, rec + d.KM + d.KM * d.KE,
                       (size_t)d.KM * d.KN * 4);
            }
            memcpy(plan.z1 + (size_t)t * Lw, sm->plan + (size_t)t * 2 * Lw, (size_t)Lw * 8);
            memcpy(plan.z0 + (size_t)t * Lw, sm->plan + ((size_t)t * 2 + 1) * Lw, (size_t)Lw * 8);
        }
        for (int l = 0; l < L; l++)
            rt[l].BT = T;
        plan.BT = T;
        for (int replay = 0; replay <= 1; replay++) {
            model_batch_t b = {.B = 1,
                               .T = T,
                               .tokens = tk,
                               .targets = tg,
                               .weights = w,
                               .replay = replay ? rt : NULL,
                               .plan_replay = replay ? &plan : NULL,
                               .temperature = 1};
            model_stats_t st;
            if (model_forward(m, &b, &st, &err) < 0)
                die("learner forward", &err);
            const real *lp = model_logp(m);
            for (int k = 0; k < sm->n_tokens; k++) {
                const double dl = fabs((double)sm->logprobs_full[k] - lp[P - 1 + k]);
                sum[replay] += dl;
                worst[replay] = dl > worst[replay] ? dl : worst[replay];
            }
            if (replay) {
                dec += st.decisions;
                mis += st.mismatches;
                pmis += st.plan_mismatches;
                npos += T;
            }
        }
        n += sm->n_tokens;
        for (int l = 0; l < L; l++)
            moe_route_free(&rt[l]);
        free(rt);
        diffusion_plan_free(&plan);
        free(tk);
        free(tg);
        free(w);
    }
    printf("%s (seed %llu%s): %ld sampled tokens; mean |dlogp| own routing %.2e (worst %.2e), "
           "replay %.2e (worst %.2e); learner's own choice differed on %ld of %ld router "
           "decisions and %ld of %ld plans\n",
           preset, (unsigned long long)seed, head_int8 ? ", head_int8" : "", n,
           n ? sum[0] / n : 0.0, worst[0], n ? sum[1] / n : 0.0, worst[1], mis, dec, pmis, npos);
    quillan_group_free(&g);
    free(toks);
    quillan_engine_destroy(&e);
    quillan_policy_release(&p);
    qpolicy_destroy(&q);
    model_destroy(&m);
    return 0;
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

static int has(int argc, char **argv, const char *name) {
    for (int i = 0; i < argc; i++)
        if (!strcmp(argv[i], name))
            return 1;
    return 0;
}

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: bench_engine throughput POLICY.qst [--tokens 16] [--threads 1,2] "
                        "[--batches 1,8,32] [--repeat 1] [--no-probe]\n"
                        "       bench_engine memory POLICY.qst [--context 1024] [--batch 16]\n"
                        "       bench_engine agree PRESET [--seed 1] [--samples 4] [--tokens 24] "
                        "[--head-int8]\n");
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
    if (!strcmp(argv[1], "agree"))
        return cmd_agree(argv[2], (uint64_t)opt(argc, argv, "--seed", 1),
                         (int)opt(argc, argv, "--samples", 4), (int)opt(argc, argv, "--tokens", 24),
                         has(argc, argv, "--head-int8"));
    fprintf(stderr, "bench_engine: unknown command '%s'\n", argv[1]);
    return 2;
}
