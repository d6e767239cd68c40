/* Flash attention against the T x T oracle, its backward against a full-softmax backward,
 * KV-cache decoding against the full forward, and RoPE (float core). */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "attention.h"
#include "qtest.h"
#include "rng.h"

/* Normalised error ||a - b|| / ||b|| allowed between float flash results and double oracles,
 * and between a decode step and the full forward's row. */
#define ATTN_FWD_TOL 1e-5
#define ATTN_BWD_TOL 1e-4
#define ATTN_DECODE_TOL 1e-5
#define ROPE_TOL 1e-6

static float *randn(size_t n, uint64_t seed, float sd) {
    float *x = malloc(sizeof(float) * n);
    rng_stream_t s;
    rng_stream_init(&s, 0x4154544E, seed, 0);
    for (size_t i = 0; i < n; i++)
        x[i] = sd * rng_stream_normal(&s);
    return x;
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

static double nerr(const float *a, const float *b, size_t n) {
    double *d = malloc(sizeof(double) * n);
    for (size_t i = 0; i < n; i++)
        d[i] = b[i];
    const double e = nerr_d(a, d, n);
    free(d);
    return e;
}

/* (B, T, C, NH): T below, at, and off the tile sizes (32 query rows, 64 keys). */
static const int SHAPES[][4] = {{1, 1, 8, 2},    {2, 33, 16, 2},  {1, 100, 64, 4},
                                {1, 130, 32, 1}, {2, 64, 128, 2}, {1, 97, 256, 1}};

Test(attention, flash_matches_reference) {
    for (size_t s = 0; s < sizeof SHAPES / sizeof SHAPES[0]; s++) {
        const int B = SHAPES[s][0], T = SHAPES[s][1], C = SHAPES[s][2], NH = SHAPES[s][3];
        const size_t n = (size_t)B * T * C;
        /* Scores of a few units so the softmax is far from uniform. */
        float *q = randn(n, 1 + s, 2.0f), *k = randn(n, 100 + s, 2.0f), *v = randn(n, 200 + s, 1);
        float *o = malloc(sizeof(float) * n), *r = malloc(sizeof(float) * n);
        float *lse = malloc(sizeof(float) * B * NH * T);
        attention_forward(o, lse, q, k, v, B, T, C, NH);
        cr_assert_eq(attention_forward_ref(r, q, k, v, B, T, C, NH, NULL), 0);
        const double e = nerr(o, r, n);
        cr_log_info("flash vs T x T: B %d T %d C %d NH %d: %.2e", B, T, C, NH, e);
        cr_assert_leq(e, ATTN_FWD_TOL, "B %d T %d C %d NH %d: %g", B, T, C, NH, e);
        /* Row 0 sees only key 0: out = v[0] exactly in exact arithmetic, lse = its score. */
        const int HS = C / NH;
        for (int d = 0; d < HS; d++)
            cr_assert_float_eq(o[d], v[d], 1e-6);
        double s0 = 0;
        for (int d = 0; d < HS; d++)
            s0 += (double)q[d] * k[d];
        cr_assert_float_eq(lse[0], s0 / sqrt(HS), 1e-4);
        free(q), free(k), free(v), free(o), free(r), free(lse);
    }
}

/* Full-softmax backward in double for one shape. */
static void backward_ref(double *dq, double *dk, double *dv, const float *dout, const float *q,
                         const float *k, const float *v, int B, int T, int C, int NH) {
    const int HS = C / NH;
    const double sc = 1.0 / sqrt(HS);
    double *P = malloc(sizeof(double) * T * T), *dP = malloc(sizeof(double) * T * T);
    for (int b = 0; b < B; b++)
        for (int h = 0; h < NH; h++) {
            const size_t base = (size_t)b * T * C + (size_t)h * HS;
#define AT(x, t, d) ((double)(x)[base + (size_t)(t)*C + (d)])
            for (int i = 0; i < T; i++) {
                double mx = -INFINITY, sum = 0;
                for (int j = 0; j <= i; j++) {
                    double s = 0;
                    for (int d = 0; d < HS; d++)
                        s += AT(q, i, d) * AT(k, j, d);
                    P[i * T + j] = s * sc;
                    mx = fmax(mx, s * sc);
                }
                for (int j = 0; j <= i; j++)
                    sum += (P[i * T + j] = exp(P[i * T + j] - mx));
                for (int j = 0; j <= i; j++)
                    P[i * T + j] /= sum;
                double rowdot = 0;
                for (int j = 0; j <= i; j++) {
                    double s = 0;
                    for (int d = 0; d < HS; d++)
                        s += AT(dout, i, d) * AT(v, j, d);
                    dP[i * T + j] = s;
                    rowdot += s * P[i * T + j];
                }
                for (int j = 0; j <= i; j++) {
                    const double ds = P[i * T + j] * (dP[i * T + j] - rowdot) * sc;
                    for (int d = 0; d < HS; d++) {
                        dq[base + (size_t)i * C + d] += ds * AT(k, j, d);
                        dk[base + (size_t)j * C + d] += ds * AT(q, i, d);
                        dv[base + (size_t)j * C + d] += P[i * T + j] * AT(dout, i, d);
                    }
                }
            }
#undef AT
        }
    free(P), free(dP);
}

Test(attention, flash_backward_matches_full_softmax) {
    for (size_t s = 0; s < sizeof SHAPES / sizeof SHAPES[0]; s++) {
        const int B = SHAPES[s][0], T = SHAPES[s][1], C = SHAPES[s][2], NH = SHAPES[s][3];
        const size_t n = (size_t)B * T * C;
        float *q = randn(n, 1 + s, 2.0f), *k = randn(n, 100 + s, 2.0f), *v = randn(n, 200 + s, 1);
        float *dout = randn(n, 300 + s, 1);
        float *o = malloc(sizeof(float) * n), *lse = malloc(sizeof(float) * B * NH * T);
        float *dq = calloc(n, sizeof(float)), *dk = calloc(n, sizeof(float));
        float *dv = calloc(n, sizeof(float));
        double *rq = calloc(n, sizeof(double)), *rk = calloc(n, sizeof(double));
        double *rv = calloc(n, sizeof(double));
        attention_forward(o, lse, q, k, v, B, T, C, NH);
        attention_backward(dq, dk, dv, dout, q, k, v, o, lse, B, T, C, NH);
        backward_ref(rq, rk, rv, dout, q, k, v, B, T, C, NH);
        const double eq = nerr_d(dq, rq, n), ek = nerr_d(dk, rk, n), ev = nerr_d(dv, rv, n);
        cr_log_info("flash backward T %d C %d NH %d: dq %.2e dk %.2e dv %.2e", T, C, NH, eq, ek,
                    ev);
        cr_assert_leq(eq, ATTN_BWD_TOL);
        cr_assert_leq(ek, ATTN_BWD_TOL);
        cr_assert_leq(ev, ATTN_BWD_TOL);
        free(q), free(k), free(v), free(dout), free(o), free(lse), free(dq), free(dk), free(dv);
        free(rq), free(rk), free(rv);
    }
}

/* Token-by-token decoding through the KV cache gives the full causal forward's rows. */
Test(attention, decode_step_matches_full_forward) {
    enum { T = 75, C = 64, NH = 4, L = 2 };
    const size_t n = (size_t)T * C;
    float *q = randn(n, 11, 2.0f), *k = randn(n, 12, 2.0f), *v = randn(n, 13, 1);
    float *qr = malloc(sizeof(float) * n), *kr = malloc(sizeof(float) * n);
    float *full = malloc(sizeof(float) * n), *lse = malloc(sizeof(float) * NH * T);
    rope_forward(qr, q, 1, T, C, NH, 0);
    rope_forward(kr, k, 1, T, C, NH, 0);
    attention_forward(full, lse, qr, kr, v, 1, T, C, NH);

    qerr_t err;
    attn_kvcache_t *cache = attn_kvcache_new(L, T, C, &err);
    cr_assert_not_null(cache, "%s", err.msg);
    cr_assert_eq(attn_kvcache_max_len(cache), T);
    float qs[C], ks[C], out[C];
    double worst = 0;
    for (int pos = 0; pos < T; pos++) {
        /* Layer 1 of the cache; layer 0 holds unrelated data that must not leak in. */
        rope_forward(qs, q + (size_t)pos * C, 1, 1, C, NH, pos);
        rope_forward(ks, k + (size_t)pos * C, 1, 1, C, NH, pos);
        attn_kvcache_step(out, cache, 0, pos, ks, qs, ks, NH);
        attn_kvcache_step(out, cache, 1, pos, qs, ks, v + (size_t)pos * C, NH);
        const double e = nerr(out, full + (size_t)pos * C, C);
        worst = e > worst ? e : worst;
        cr_assert_leq(e, ATTN_DECODE_TOL, "position %d: %g", pos, e);
    }
    cr_log_info("decode vs full forward: worst row %.2e", worst);
    attn_kvcache_destroy(&cache);
    cr_assert_null(cache);
    attn_kvcache_destroy(&cache);
    cr_assert_null(attn_kvcache_new(0, T, C, &err));
    cr_assert_eq(err.code, QERR_RANGE);
    free(q), free(k), free(v), free(qr), free(kr), free(full), free(lse);
}

Test(rope, rotation_values_and_inverse) {
    /* HS 2: one pair at frequency 1, so position p rotates by p radians. */
    float x[2] = {1, 0}, y[2];
    rope_forward(y, x, 1, 1, 2, 1, 3);
    cr_assert_float_eq(y[0], cos(3.0), ROPE_TOL);
    cr_assert_float_eq(y[1], sin(3.0), ROPE_TOL);
    /* HS 4: the second pair turns at 10000^(-1/2) = 0.01 rad per position. */
    float a[4] = {0, 0, 1, 0}, b[4];
    rope_forward(b, a, 1, 1, 4, 1, 50);
    cr_assert_float_eq(b[2], cos(0.5), ROPE_TOL);
    cr_assert_float_eq(b[3], sin(0.5), ROPE_TOL);
    /* Position 0 is the identity; the backward inverts the forward; pair norms are kept. */
    enum { B = 2, T = 9, C = 24, NH = 3 };
    float *in = randn(B * T * C, 5, 1), *out = malloc(sizeof(float) * B * T * C);
    float *back = malloc(sizeof(float) * B * T * C);
    rope_forward(out, in, B, T, C, NH, 0);
    for (int c = 0; c < C; c++)
        cr_assert_eq(out[c], in[c]);
    rope_forward(out, in, B, T, C, NH, 7);
    memcpy(back, out, sizeof(float) * B * T * C);
    rope_backward(back, back, B, T, C, NH, 7);
    cr_assert_leq(nerr(back, in, B * T * C), ROPE_TOL);
    for (int i = 0; i < B * T * C; i += 2) {
        const double n0 = hypot(in[i], in[i + 1]), n1 = hypot(out[i], out[i + 1]);
        cr_assert_float_eq(n0, n1, 1e-5);
    }
    free(in), free(out), free(back);
}
