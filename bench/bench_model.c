/* Whole-model forward+backward throughput (issue 3, acceptance 6).
 *
 * For each preset: one warm-up step, then --iters timed steps of forward + backward (CE on
 * every position, SFT aux weights) at batch 1 x 256 tokens. Reports tokens/s, the share of the
 * wall time spent inside sgemm and the GFLOP/s sgemm achieved there, OpenBLAS's own sgemm peak
 * on a 1024^3 product measured in the same process and thread setting, and the peak RSS.
 *
 * GEMM time is measured by interposing cblas_sgemm: this executable defines the symbol, so the
 * model's calls (gemm.c is linked in statically) come here first; we time them and forward to
 * OpenBLAS through dlsym(RTLD_NEXT). Calls made from inside OpenMP parallel regions would be
 * double-counted per thread, so the counters are updated only by the outermost caller. */
#include "gemm.h"
#include "model.h"
#include "rng.h"

#include <dlfcn.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#ifdef QUILLAN_HAVE_BLAS
#include <cblas.h>
#endif

#define BENCH_T 256
#define BENCH_PEAK_N 1024

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static double g_gemm_s, g_gemm_flop;
static long g_gemm_calls;

#ifdef QUILLAN_HAVE_BLAS
typedef void (*sgemm_fn)(const enum CBLAS_ORDER, const enum CBLAS_TRANSPOSE,
                         const enum CBLAS_TRANSPOSE, const blasint, const blasint, const blasint,
                         const float, const float *, const blasint, const float *, const blasint,
                         const float, float *, const blasint);

void cblas_sgemm(const enum CBLAS_ORDER order, const enum CBLAS_TRANSPOSE ta,
                 const enum CBLAS_TRANSPOSE tb, const blasint M, const blasint N, const blasint K,
                 const float alpha, const float *A, const blasint lda, const float *B,
                 const blasint ldb, const float beta, float *C, const blasint ldc) {
    static sgemm_fn real_sgemm;
    if (!real_sgemm)
        *(void **)&real_sgemm = dlsym(RTLD_NEXT, "cblas_sgemm");
#ifdef _OPENMP
    const int outer = !omp_in_parallel();
#else
    const int outer = 1;
#endif
    const double t0 = outer ? now_s() : 0;
    real_sgemm(order, ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
    if (outer) {
        g_gemm_s += now_s() - t0;
        g_gemm_flop += 2.0 * (double)M * (double)N * (double)K;
        g_gemm_calls++;
    }
}
#endif

static long peak_rss_mb(void) {
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return ru.ru_maxrss / 1024;
}

/* sgemm GFLOP/s on a square product, best of 3, through the same gemm() entry point. */
static double gemm_peak(void) {
    const int n = BENCH_PEAK_N;
    real *a = malloc(sizeof(real) * n * n), *b = malloc(sizeof(real) * n * n),
         *c = malloc(sizeof(real) * n * n);
    for (int i = 0; i < n * n; i++) {
        a[i] = (real)((i % 13) - 6) * 0.01f;
        b[i] = (real)((i % 7) - 3) * 0.01f;
    }
    double best = 0;
    for (int r = 0; r < 3; r++) {
        const double t0 = now_s();
        gemm(GEMM_N, GEMM_N, n, n, n, 1, a, n, b, n, 0, c, n);
        const double dt = now_s() - t0;
        const double gf = 2.0 * n * n * (double)n / dt / 1e9;
        if (gf > best)
            best = gf;
    }
    free(a);
    free(b);
    free(c);
    return best;
}

static int bench_preset(const char *name, int iters) {
    model_config_t cfg;
    qerr_t err;
    if (model_config_preset(name, &cfg, &err) || model_config_validate(&cfg, &err)) {
        fprintf(stderr, "bench_model: %s\n", err.msg);
        return 1;
    }
    const double t_init = now_s();
    model_t *m = model_new(&cfg, &err);
    if (!m) {
        fprintf(stderr, "bench_model: %s: %s\n", name, err.msg);
        return 1;
    }
    const double init_s = now_s() - t_init;
    const int T = BENCH_T < cfg.context ? BENCH_T : cfg.context;
    int32_t *tok = malloc(sizeof *tok * (size_t)T), *tgt = malloc(sizeof *tgt * (size_t)T);
    real *w = malloc(sizeof *w * (size_t)T);
    rng_stream_t s;
    rng_stream_init(&s, 1, 2, 3);
    for (int t = 0; t < T; t++) {
        tok[t] = (int32_t)(rng_stream_next_u64(&s) % (uint64_t)cfg.vocab_size);
        w[t] = 1;
    }
    for (int t = 0; t < T; t++)
        tgt[t] = t + 1 < T ? tok[t + 1] : tok[0];
    model_batch_t b = {.B = 1,
                       .T = T,
                       .tokens = tok,
                       .targets = tgt,
                       .weights = w,
                       .training = 1,
                       .count_load = 1,
                       .temperature = 1,
                       .aux_balance = 0.01f,
                       .aux_z = 1e-3f,
                       .aux_diffusion = 0.2f};
    double total = 0, fwd = 0;
    int rc = 0;
    for (int it = -1; it < iters && rc == 0; it++) { /* it = -1: warm-up (and fake quant) */
        if (it == 0) {
            g_gemm_s = g_gemm_flop = 0;
            g_gemm_calls = 0;
        }
        model_params_changed(m); /* an optimizer step would: count the fake quantization */
        const double t0 = now_s();
        model_grads_zero(m);
        model_stats_t st;
        if (model_forward(m, &b, &st, &err)) {
            fprintf(stderr, "bench_model: %s\n", err.msg);
            rc = 1;
            break;
        }
        const double t1 = now_s();
        model_backward(m, NULL, NULL);
        const double t2 = now_s();
        if (it >= 0) {
            total += t2 - t0;
            fwd += t1 - t0;
        }
    }
    if (rc == 0) {
        const double tps = (double)T * iters / total;
        printf("| %s | %zu | %d x %d | %.3f | %.3f | %.0f | %.1f%% | %.1f | %ld | %.1f |\n", name,
               model_num_reals(m), 1, T, fwd / iters, total / iters, tps, 100 * g_gemm_s / total,
               g_gemm_s > 0 ? g_gemm_flop / g_gemm_s / 1e9 : 0, peak_rss_mb(), init_s);
        fflush(stdout);
    }
    free(tok);
    free(tgt);
    free(w);
    model_destroy(&m);
    return rc;
}

int main(int argc, char **argv) {
    int threads = 1, iters = 3, skip_big = 0;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--threads") && i + 1 < argc)
            threads = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--iters") && i + 1 < argc)
            iters = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--skip-512m"))
            skip_big = 1;
        else {
            fprintf(stderr, "usage: bench_model [--threads N] [--iters N] [--skip-512m]\n");
            return 2;
        }
    }
    if (threads < 1 || iters < 1)
        return 2;
#ifdef _OPENMP
    omp_set_num_threads(threads);
#endif
    gemm_threads_set(threads);
    const double peak = gemm_peak();
    printf("threads %d, BLAS %s, sgemm %dx%dx%d peak %.1f GFLOP/s\n\n", threads,
           gemm_has_blas() ? "OpenBLAS" : "none (C fallback)", BENCH_PEAK_N, BENCH_PEAK_N,
           BENCH_PEAK_N, peak);
    printf("| preset | reals | batch | fwd s | fwd+bwd s | tokens/s | GEMM share | GEMM "
           "GFLOP/s | peak RSS MB | init s |\n");
    printf("| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n");
    fflush(stdout);
    int rc = bench_preset("tiny", iters);
    if (rc == 0 && !skip_big)
        rc = bench_preset("quillan-512m", iters > 1 ? 1 : iters);
    return rc;
}
