/* bench_gemm: GFLOP/s of gemm() (CBLAS when built with it) and gemm_fallback() on the model's
 * linear shapes, then flash attention and the chunked output head, forward + backward.
 * Usage: bench_gemm [reps]   (default 5; the best of reps is reported) */
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#include "attention.h"
#include "gemm.h"
#include "layers.h"
#include "rng.h"

#ifdef _OPENMP
#include <omp.h>
#endif

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static float *randn(size_t n, uint64_t seed) {
    float *x = malloc(sizeof(float) * n);
    if (!x) {
        fprintf(stderr, "bench_gemm: out of memory (%zu floats)\n", n);
        exit(1);
    }
    rng_stream_t s;
    rng_stream_init(&s, 0x42454E43, seed, 0);
    for (size_t i = 0; i < n; i++)
        x[i] = 0.1f * rng_stream_normal(&s);
    return x;
}

typedef void (*gemm_fn)(gemm_trans_t, gemm_trans_t, int, int, int, real, const real *, int,
                        const real *, int, real, real *, int);

/* Best-of-reps GFLOP/s of the linear layer shape out[M, N] = in[M, K] W[N, K]^T. */
static double gflops(gemm_fn fn, int M, int N, int K, int reps) {
    float *A = randn((size_t)M * K, 1), *B = randn((size_t)N * K, 2), *C = randn((size_t)M * N, 3);
    double best = 1e30;
    for (int r = 0; r < reps; r++) {
        const double t0 = now();
        fn(GEMM_N, GEMM_T, M, N, K, 1, A, K, B, K, 0, C, N);
        const double dt = now() - t0;
        best = dt < best ? dt : best;
    }
    free(A), free(B), free(C);
    return 2.0 * M * N * K / best * 1e-9;
}

int main(int argc, char **argv) {
    const int reps = argc > 1 ? atoi(argv[1]) : 5;
    if (reps < 1) {
        fprintf(stderr, "usage: bench_gemm [reps >= 1]\n");
        return 2;
    }
#ifdef _OPENMP
    printf("threads: OpenMP %d, gemm %d, CBLAS %s\n", omp_get_max_threads(), gemm_threads_get(),
           gemm_has_blas() ? "yes" : "no");
#endif
    /* d = 512: attention projections, expert up/down (hidden 192), the head chunk. */
    const int shapes[][3] = {
        {256, 512, 512}, {256, 192, 512}, {256, 512, 192}, {256, 1024, 512}, {1024, 1024, 1024}};
    printf("%-22s %12s %12s\n", "M x N x K", "gemm GF/s", "fallback GF/s");
    for (size_t i = 0; i < sizeof shapes / sizeof shapes[0]; i++) {
        const int M = shapes[i][0], N = shapes[i][1], K = shapes[i][2];
        char name[32];
        snprintf(name, sizeof name, "%d x %d x %d", M, N, K);
        printf("%-22s %12.1f %12.1f\n", name, gflops(gemm, M, N, K, reps),
               gflops(gemm_fallback, M, N, K, reps));
    }

    /* Attention at the 512m shape: T 256 and 1024, d 512, 8 heads. */
    const int Ts[] = {256, 1024};
    for (size_t i = 0; i < 2; i++) {
        const int B = 1, T = Ts[i], C = 512, NH = 8;
        const size_t n = (size_t)B * T * C;
        float *q = randn(n, 4), *k = randn(n, 5), *v = randn(n, 6), *o = randn(n, 7);
        float *g = randn(n, 8), *dq = calloc(n, 4), *dk = calloc(n, 4), *dv = calloc(n, 4);
        float *lse = malloc(sizeof(float) * B * NH * T);
        double bf = 1e30, bb = 1e30;
        for (int r = 0; r < reps; r++) {
            double t0 = now();
            attention_forward(o, lse, q, k, v, B, T, C, NH);
            double t1 = now();
            attention_backward(dq, dk, dv, g, q, k, v, o, lse, B, T, C, NH);
            double t2 = now();
            bf = t1 - t0 < bf ? t1 - t0 : bf;
            bb = t2 - t1 < bb ? t2 - t1 : bb;
        }
        printf("attention T %4d d %d H %d: forward %.2f ms, backward %.2f ms\n", T, C, NH, bf * 1e3,
               bb * 1e3);
        free(q), free(k), free(v), free(o), free(g), free(dq), free(dk), free(dv), free(lse);
    }

    /* Head at the 512m shape: 256 tokens, d 512, V 50257. */
    {
        const int BT = 256, C = 512, V = 50257;
        float *x = randn((size_t)BT * C, 9), *W = randn((size_t)V * C, 10);
        float *dW = calloc((size_t)V * C, 4), *dx = calloc((size_t)BT * C, 4);
        float logp[256], ent[256], lse[256], dl[256], de[256];
        int32_t y[256];
        for (int t = 0; t < BT; t++) {
            y[t] = (int32_t)((t * 7919) % V);
            dl[t] = -1.0f / BT;
            de[t] = 0.01f;
        }
        float *scratch = malloc(sizeof(float) * head_scratch_len(C));
        double bf = 1e30, bb = 1e30;
        for (int r = 0; r < reps; r++) {
            double t0 = now();
            head_forward(logp, ent, lse, x, W, y, NULL, 1.0f, BT, C, V, scratch);
            double t1 = now();
            head_backward(dx, dW, dl, de, x, W, y, lse, ent, 1.0f, BT, C, V, scratch);
            double t2 = now();
            bf = t1 - t0 < bf ? t1 - t0 : bf;
            bb = t2 - t1 < bb ? t2 - t1 : bb;
        }
        printf("head BT %d d %d V %d: forward %.1f ms (%.1f GF/s), backward %.1f ms (%.1f GF/s)\n",
               BT, C, V, bf * 1e3, 2.0 * BT * C * V / bf * 1e-9, bb * 1e3,
               4.0 * BT * C * V / bb * 1e-9 + 2.0 * BT * C * V / bb * 1e-9);
        free(x), free(W), free(dW), free(dx), free(scratch);
    }
    return 0;
}
