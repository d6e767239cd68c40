/* GEMM against the triple loop, the chunked head against a full-vocabulary computation, and
 * the pointwise layers (float core). */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "gemm.h"
#include "layers.h"
#include "qtest.h"
#include "rng.h"

#ifdef _OPENMP
#include <omp.h>
#endif

/* Normalised error ||a - b|| / ||b|| allowed between float results and a double oracle. */
#define GEMM_TOL 1e-5
#define HEAD_TOL 1e-5
#define HEAD_GRAD_TOL 1e-4

static void fill(float *x, size_t n, uint64_t seed, float sd) {
    rng_stream_t s;
    rng_stream_init(&s, 0x4C415952, seed, 0);
    for (size_t i = 0; i < n; i++)
        x[i] = sd * rng_stream_normal(&s);
}

static double nerr(const float *a, const float *b, size_t n) {
    double e = 0, r = 0;
    for (size_t i = 0; i < n; i++) {
        cr_assert(isfinite(a[i]), "non-finite at %zu", i);
        e += ((double)a[i] - b[i]) * ((double)a[i] - b[i]);
        r += (double)b[i] * b[i];
    }
    return r > 0 ? sqrt(e / r) : sqrt(e);
}

static double nerr_d(const float *a, const double *b, size_t n) {
    double e = 0, r = 0;
    for (size_t i = 0; i < n; i++) {
        cr_assert(isfinite(a[i]), "non-finite at %zu", i);
        e += ((double)a[i] - b[i]) * ((double)a[i] - b[i]);
        r += b[i] * b[i];
    }
    return r > 0 ? sqrt(e / r) : sqrt(e);
}

typedef void (*gemm_fn)(gemm_trans_t, gemm_trans_t, int, int, int, real, const real *, int,
                        const real *, int, real, real *, int);

/* One product through fn vs gemm_naive, with padded leading dimensions and NaN in C for
 * beta == 0 (BLAS semantics: C is not read). */
static double gemm_case(gemm_fn fn, gemm_trans_t ta, gemm_trans_t tb, int M, int N, int K,
                        float alpha, float beta) {
    const int lda = (ta == GEMM_N ? K : M) + 3, ldb = (tb == GEMM_N ? N : K) + 1, ldc = N + 2;
    const int ar = ta == GEMM_N ? M : K, br = tb == GEMM_N ? K : N;
    float *A = malloc(sizeof(float) * ((size_t)ar * lda + 1));
    float *B = malloc(sizeof(float) * ((size_t)br * ldb + 1));
    float *C1 = malloc(sizeof(float) * ((size_t)M * ldc + 1));
    float *C2 = malloc(sizeof(float) * ((size_t)M * ldc + 1));
    fill(A, (size_t)ar * lda, 10 + M, 1);
    fill(B, (size_t)br * ldb, 20 + N, 1);
    fill(C1, (size_t)M * ldc, 30 + K, 1);
    if (beta == 0)
        for (size_t i = 0; i < (size_t)M * ldc; i++)
            C1[i] = NAN;
    memcpy(C2, C1, sizeof(float) * (size_t)M * ldc);
    fn(ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C1, ldc);
    gemm_naive(ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C2, ldc);
    double e = 0, r = 0;
    for (int i = 0; i < M; i++)
        for (int j = 0; j < N; j++) {
            const double a = C1[(size_t)i * ldc + j], b = C2[(size_t)i * ldc + j];
            cr_assert(isfinite(a), "non-finite C[%d][%d]", i, j);
            e += (a - b) * (a - b);
            r += b * b;
        }
    free(A), free(B), free(C1), free(C2);
    return r > 0 ? sqrt(e / r) : sqrt(e);
}

static void gemm_sweep(gemm_fn fn, const char *name) {
    /* Sizes straddle the fallback's blocks (32 x 128 tiles, 128-deep slices). */
    const int shapes[][3] = {{1, 1, 1}, {37, 129, 130}, {64, 256, 300}, {5, 3, 257}, {130, 7, 2}};
    for (int ta = 0; ta < 2; ta++)
        for (int tb = 0; tb < 2; tb++)
            for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++) {
                const int M = shapes[s][0], N = shapes[s][1], K = shapes[s][2];
                const double e1 = gemm_case(fn, ta, tb, M, N, K, 1.0f, 0.0f);
                const double e2 = gemm_case(fn, ta, tb, M, N, K, 0.5f, -1.25f);
                cr_assert_leq(e1, GEMM_TOL, "%s ta %d tb %d %dx%dx%d: %g", name, ta, tb, M, N, K,
                              e1);
                cr_assert_leq(e2, GEMM_TOL, "%s alpha/beta %dx%dx%d: %g", name, M, N, K, e2);
            }
}

Test(gemm, fallback_matches_naive) {
    gemm_sweep(gemm_fallback, "fallback");
}

Test(gemm, dispatch_matches_naive) {
    cr_log_info("gemm through %s", gemm_has_blas() ? "CBLAS" : "the C fallback");
    cr_assert(gemm_nests_safely(), "we build against the OpenMP flavour of OpenBLAS");
    gemm_sweep(gemm, "gemm");
}

Test(gemm, k_zero_scales_c) {
    float C[6] = {1, 2, 3, 4, 5, 6};
    const float A[1] = {0}, B[1] = {0};
    gemm(GEMM_N, GEMM_N, 2, 3, 0, 1, A, 1, B, 3, 2, C, 3);
    cr_assert(C[0] == 2 && C[5] == 12);
    gemm_fallback(GEMM_N, GEMM_N, 2, 3, 0, 1, A, 1, B, 3, 0, C, 3);
    cr_assert(C[0] == 0 && C[5] == 0);
}

/* Inside our own parallel region every thread's gemm runs on that thread and gives the same
 * bits as the serial call. */
Test(gemm, inside_parallel_region) {
    enum { M = 40, N = 70, K = 90, J = 4 };
    float *A = malloc(sizeof(float) * M * K), *B = malloc(sizeof(float) * K * N);
    float *C = malloc(sizeof(float) * J * M * N), *R = malloc(sizeof(float) * M * N);
    fill(A, M * K, 1, 1);
    fill(B, K * N, 2, 1);
    gemm(GEMM_N, GEMM_N, M, N, K, 1, A, K, B, N, 0, R, N);
#ifdef _OPENMP
#pragma omp parallel for num_threads(2)
#endif
    for (int j = 0; j < J; j++)
        gemm(GEMM_N, GEMM_N, M, N, K, 1, A, K, B, N, 0, C + (size_t)j * M * N, N);
    for (int j = 0; j < J; j++)
        cr_assert_leq(nerr(C + (size_t)j * M * N, R, M * N), GEMM_TOL);
    free(A), free(B), free(C), free(R);
}

Test(gemm, threads_set_returns_previous) {
    const int before = gemm_threads_get();
    cr_assert_geq(before, 1);
    cr_assert_eq(gemm_threads_set(1), before);
    cr_assert_eq(gemm_threads_get(), 1);
    gemm_threads_set(before);
    cr_assert_eq(gemm_threads_get(), before);
}

/* ---- Head: chunked vs full vocabulary ---- */

typedef struct {
    double *logp, *ent, *lse, *dinp, *dw;
} head_ref_t;

/* Full [V] logits per row in double: forward values and the gradients for upstream dlogp and
 * dent. */
static void head_ref(head_ref_t *o, const float *x, const float *W, const int32_t *y,
                     const float *mask, const float *dlogp, const float *dent, double temp, int BT,
                     int C, int V) {
    double *z = malloc(sizeof(double) * V), *p = malloc(sizeof(double) * V);
    for (int t = 0; t < BT; t++) {
        o->logp[t] = o->ent[t] = o->lse[t] = 0;
        if (mask && mask[t] == 0)
            continue;
        double mx = -INFINITY, s = 0;
        for (int v = 0; v < V; v++) {
            double a = 0;
            for (int c = 0; c < C; c++)
                a += (double)W[(size_t)v * C + c] * x[(size_t)t * C + c];
            z[v] = a / temp;
            mx = fmax(mx, z[v]);
        }
        for (int v = 0; v < V; v++)
            s += exp(z[v] - mx);
        const double lse = mx + log(s);
        double H = 0, ez = 0;
        for (int v = 0; v < V; v++) {
            p[v] = exp(z[v] - lse);
            H -= p[v] * (z[v] - lse);
            ez += p[v] * z[v];
        }
        o->lse[t] = lse;
        o->logp[t] = z[y[t]] - lse;
        o->ent[t] = H;
        for (int v = 0; v < V; v++) {
            /* dH/dz_v = -p_v (z_v - E z); dlogp/dz_v = [v == y] - p_v */
            const double g =
                ((double)dlogp[t] * ((v == y[t]) - p[v]) - (double)dent[t] * p[v] * (z[v] - ez)) /
                temp;
            for (int c = 0; c < C; c++) {
                o->dinp[(size_t)t * C + c] += g * W[(size_t)v * C + c];
                o->dw[(size_t)v * C + c] += g * x[(size_t)t * C + c];
            }
        }
    }
    free(z), free(p);
}

Test(head, chunked_matches_full_vocabulary) {
    /* V not a multiple of HEAD_VCHUNK, BT above HEAD_ROWS, some rows masked out. */
    enum { BT = 150, C = 24, V = 2500 };
    const float temp = 0.7f;
    float *x = malloc(sizeof(float) * BT * C), *W = malloc(sizeof(float) * V * C);
    float mask[BT], dlogp[BT], dent[BT], logp[BT], ent[BT], lse[BT];
    int32_t y[BT];
    fill(x, BT * C, 7, 1);
    fill(W, (size_t)V * C, 8, 0.6f);
    rng_stream_t s;
    rng_stream_init(&s, 1, 2, 3);
    for (int t = 0; t < BT; t++) {
        y[t] = (int32_t)(rng_stream_next_u64(&s) % V);
        mask[t] = t % 3 == 0 ? 0.0f : 1.0f;
        dlogp[t] = mask[t] * (rng_stream_uniform(&s) - 0.5f);
        dent[t] = mask[t] * (rng_stream_uniform(&s) - 0.5f);
    }
    y[1] = V - 1; /* the last entry of the short last chunk */
    real *scratch = malloc(sizeof(real) * head_scratch_len(C));
    head_forward(logp, ent, lse, x, W, y, mask, temp, BT, C, V, scratch);
    head_ref_t r = {calloc(BT, sizeof(double)), calloc(BT, sizeof(double)),
                    calloc(BT, sizeof(double)), calloc(BT * C, sizeof(double)),
                    calloc((size_t)V * C, sizeof(double))};
    head_ref(&r, x, W, y, mask, dlogp, dent, temp, BT, C, V);
    const double el = nerr_d(logp, r.logp, BT), ee = nerr_d(ent, r.ent, BT),
                 es = nerr_d(lse, r.lse, BT);
    cr_log_info("head forward: logp %.2e entropy %.2e lse %.2e", el, ee, es);
    cr_assert_leq(el, HEAD_TOL);
    cr_assert_leq(ee, HEAD_TOL);
    cr_assert_leq(es, HEAD_TOL);
    for (int t = 0; t < BT; t += 3)
        cr_assert(logp[t] == 0 && ent[t] == 0 && lse[t] == 0, "masked row %d untouched", t);

    float *dx = calloc(BT * C, sizeof(float)), *dW = calloc((size_t)V * C, sizeof(float));
    head_backward(dx, dW, dlogp, dent, x, W, y, lse, ent, temp, BT, C, V, scratch);
    const double edx = nerr_d(dx, r.dinp, BT * C), edw = nerr_d(dW, r.dw, (size_t)V * C);
    cr_log_info("head backward: dinp %.2e dweight %.2e", edx, edw);
    cr_assert_leq(edx, HEAD_GRAD_TOL);
    cr_assert_leq(edw, HEAD_GRAD_TOL);

    /* Without a mask every row is computed. */
    head_forward(logp, NULL, lse, x, W, y, NULL, temp, BT, C, V, scratch);
    cr_assert_lt(logp[0], 0);
    free(x), free(W), free(scratch), free(dx), free(dW);
    free(r.logp), free(r.ent), free(r.lse), free(r.dinp), free(r.dw);
}

Test(head, argmax_lowest_index_on_ties) {
    enum { BT = 3, C = 2, V = 2100 };
    float *W = calloc((size_t)V * C, sizeof(float));
    const float x[BT * C] = {1, 0, 0, 1, -1, 0};
    W[5 * C] = 2;           /* row 0: entry 5 wins */
    W[1500 * C] = 2;        /* ... tied by 1500 in a later chunk: lowest index stays */
    W[2099 * C + 1] = 0.5f; /* row 1: the last entry */
    int32_t out[BT];
    real *scratch = malloc(sizeof(real) * head_scratch_len(C));
    head_argmax(out, x, W, BT, C, V, scratch);
    cr_assert_eq(out[0], 5);
    cr_assert_eq(out[1], 2099);
    cr_assert_eq(out[2], 0, "all other logits are 0 > -2: index 0 (tie)");
    free(W), free(scratch);
}

Test(head, crossentropy_weighted_mean) {
    const float logp[3] = {-1, -2, -3}, w[3] = {0, 1, 1};
    cr_assert_float_eq(crossentropy_forward(logp, w, 3), 2.5f, 1e-6f);
    float d[3];
    crossentropy_backward(d, 2.0f, w, 3);
    cr_assert(d[0] == 0 && d[1] == -1.0f && d[2] == -1.0f);
    const float z[3] = {0};
    cr_assert_eq(crossentropy_forward(logp, z, 3), 0.0f);
}

/* ---- Small layers ---- */

Test(layers, embedding_and_rmsnorm_values) {
    const float wte[3 * 2] = {1, 2, 3, 4, 5, 6};
    const int32_t tok[3] = {2, 0, 2};
    float out[6], dwte[6] = {0};
    embedding_forward(out, tok, wte, 3, 2, 3);
    cr_assert(out[0] == 5 && out[1] == 6 && out[2] == 1 && out[5] == 6);
    const float g[6] = {1, 1, 1, 1, 1, 1};
    embedding_backward(dwte, g, tok, 3, 2, 3);
    cr_assert(dwte[0] == 1 && dwte[2] == 0 && dwte[4] == 2 && dwte[5] == 2);

    const float x[2] = {3, 4}, w[2] = {1, 2};
    float y[2], rstd[1];
    rmsnorm_forward(y, rstd, x, w, 1, 2);
    const double r = 1.0 / sqrt(12.5 + 1e-6);
    cr_assert_float_eq(rstd[0], r, 1e-7);
    cr_assert_float_eq(y[0], 3 * r, 1e-6);
    cr_assert_float_eq(y[1], 8 * r, 1e-6);
}

/* Each row's RMSNorm, in the documented order (16 lanes, then a pairwise tree), for every
 * width around the lane count and a long row: the same bits alone, inside a batch, and in a
 * batch above the size that runs on OpenMP threads; close to a double computation. */
Test(layers, rmsnorm_rows_fixed_order) {
    const int widths[] = {1, 2, 15, 16, 17, 31, 33, 1000, 3968};
    for (size_t wi = 0; wi < sizeof widths / sizeof *widths; wi++) {
        const int C = widths[wi], BT = (1 << 20) / C + 3;
        const size_t n = (size_t)BT * C;
        float *x = malloc(n * sizeof *x), *y = malloc(n * sizeof *y), *w = malloc((size_t)C * 4);
        float *rs = malloc((size_t)BT * sizeof *rs), *y1 = malloc((size_t)C * sizeof *y1);
        cr_assert(x && y && w && rs && y1);
        fill(x, n, 11 + (uint64_t)C, 3.0f);
        fill(w, (size_t)C, 12, 1.0f);
        rmsnorm_forward(y, rs, x, w, BT, C);
        for (int t = 0; t < BT; t += BT / 7 + 1) {
            const float *xt = x + (size_t)t * C;
            float acc[16] = {0}, r1;
            for (int c = 0; c < C; c++)
                acc[c % 16] += xt[c] * xt[c];
            for (int h = 8; h >= 1; h /= 2)
                for (int j = 0; j < h; j++)
                    acc[j] += acc[j + h];
            const float r = 1 / sqrtf(acc[0] / (float)C + (float)RMSNORM_EPS);
            double ss = 0;
            for (int c = 0; c < C; c++)
                ss += (double)xt[c] * xt[c];
            cr_assert(fabs(r - 1 / sqrt(ss / C + RMSNORM_EPS)) <= 1e-5 * r, "C %d row %d", C, t);
            cr_assert(memcmp(&rs[t], &r, sizeof r) == 0, "C %d row %d: rstd order", C, t);
            rmsnorm_forward(y1, &r1, xt, w, 1, C);
            cr_assert(memcmp(&r1, &r, sizeof r) == 0 &&
                          memcmp(y1, y + (size_t)t * C, (size_t)C * sizeof *y1) == 0,
                      "C %d row %d: alone vs batch", C, t);
            for (int c = 0; c < C; c++)
                cr_assert(y1[c] == w[c] * (xt[c] * r), "C %d row %d col %d", C, t, c);
        }
        free(x);
        free(y);
        free(w);
        free(rs);
        free(y1);
    }
}

Test(layers, pointwise_values) {
    const float x[4] = {-2, 0, 0.5f, 3};
    float s[4], r[4];
    silu_forward(s, x, 4);
    relu2_forward(r, x, 4);
    for (int i = 0; i < 4; i++) {
        cr_assert_float_eq(s[i], x[i] / (1 + exp(-x[i])), 1e-6);
        cr_assert_float_eq(r[i], x[i] > 0 ? x[i] * x[i] : 0, 1e-7);
    }
    float a[2] = {1, 2}, b[2] = {10, 20}, o[2], da[2] = {0}, db[2] = {1, 1};
    residual_forward(o, a, b, 2);
    cr_assert(o[0] == 11 && o[1] == 22);
    const float g[2] = {3, 4};
    residual_backward(da, db, g, 2);
    cr_assert(da[0] == 3 && db[1] == 5);
}

Test(layers, dropout_reproducible_and_inverted) {
    enum { N = 200000 };
    const float p = 0.25f;
    float *x = malloc(sizeof(float) * N), *y1 = malloc(sizeof(float) * N);
    float *y2 = malloc(sizeof(float) * N), *dx = calloc(N, sizeof(float));
    for (int i = 0; i < N; i++)
        x[i] = 1.0f + (float)(i % 7);
    rng_stream_t s;
    rng_stream_init(&s, 0x44524F50, 42, 3);
    const rng_stream_t saved = s;
    dropout_forward(y1, x, p, 1, &s, N);
    dropout_forward(y2, x, p, 1, &s, N);
    cr_assert(memcmp(y1, y2, sizeof(float) * N) == 0, "same stream, same mask");
    cr_assert(memcmp(&s, &saved, sizeof s) == 0, "the stream is not advanced");
    size_t dropped = 0;
    for (int i = 0; i < N; i++) {
        if (y1[i] == 0)
            dropped++;
        else
            cr_assert_float_eq(y1[i], x[i] / (1 - p), 1e-6);
    }
    /* Binomial(N, p): 6 standard deviations. */
    const double sd = sqrt(N * p * (1 - p));
    cr_assert_lt(fabs((double)dropped - N * p), 6 * sd, "dropped %zu of %d", dropped, N);
    /* The backward reuses the forward's mask. */
    float *ones = malloc(sizeof(float) * N);
    for (int i = 0; i < N; i++)
        ones[i] = 1;
    dropout_backward(dx, ones, p, 1, &s, N);
    for (int i = 0; i < N; i++)
        cr_assert_float_eq(dx[i] * x[i], y1[i], 1e-5);
    /* Another stream gives another mask; evaluation mode is the identity. */
    rng_stream_t other;
    rng_stream_init(&other, 0x44524F50, 42, 4);
    dropout_forward(y2, x, p, 1, &other, N);
    cr_assert(memcmp(y1, y2, sizeof(float) * N) != 0);
    dropout_forward(y2, x, p, 0, &s, N);
    cr_assert(memcmp(x, y2, sizeof(float) * N) == 0);
    free(x), free(y1), free(y2), free(dx), free(ones);
}
