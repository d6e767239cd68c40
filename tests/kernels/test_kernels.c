/* Rollout kernels: every SIMD level this machine has against the scalar reference, and the
 * reference against MODEL.md's definitions. Integer paths (activation codes, ternary and INT8
 * products) must agree bit for bit; INT4 x int8 within KERN_TEST_REL_TOL of the sum of |terms|;
 * products with float activations (F32, F16, INT4, INT8 weights) within kernels.h's bound
 * (ceil(in / 8) + 12) * 2^-24 * sum |terms|, and their dequantised weights bit for bit. */
#include "qtest.h"

#include "fp16.h"
#include "kern_pool.h"
#include "kernels.h"
#include "rng.h"

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define KERN_TEST_REL_TOL 1e-5
#define GUARD 7 /* extra output rows and columns checked to stay untouched */

static const size_t WIDTHS[] = {1,   7,   31,  32,  33,  64,   100,  128,
                                255, 256, 257, 511, 700, 1024, 1500, 4100};
static const size_t OUTS[] = {1, 3, 4, 5, 9, 13};
static const size_t BATCH[] = {1, 2, 5, 6, 7, 8, 13, 32, 33};

static void init_once(void) {
    qerr_t err;
    cr_assert_eq(kern_init(&err), 0, "%s", err.msg);
}

static void fill_normal(float *x, size_t n, uint64_t seed, float scale) {
    rng_stream_t r;
    rng_stream_init(&r, 0x4B45524E, seed, n);
    for (size_t i = 0; i < n; i++)
        x[i] = scale * rng_stream_normal(&r);
}

static void *xmalloc(size_t n) {
    void *p = malloc(n ? n : 1);
    cr_assert_not_null(p);
    return p;
}

/* Packed matrix of `out` rows of width `in` from random weights. */
static uint8_t *pack_matrix(qtype_t t, size_t out, size_t in, uint64_t seed) {
    size_t rb = qtype_row_bytes(t, in);
    uint8_t *w = xmalloc(out * rb);
    float *row = xmalloc(in * sizeof *row);
    for (size_t r = 0; r < out; r++) {
        fill_normal(row, in, seed * 1000 + r, 0.02f);
        qtype_traits(t)->quantize_row_ref(row, w + r * rb, in);
    }
    free(row);
    return w;
}

/* ---- level selection ---- */

Test(cpu, parse_and_env_override) {
    cpu_isa_t isa;
    qerr_t err;
    cr_assert_eq(cpu_isa_parse("avx2", &isa, &err), 0);
    cr_assert_eq(isa, CPU_ISA_AVX2);
    cr_assert_eq(cpu_isa_parse("sse9", &isa, &err), -1);
    cr_assert(strstr(err.msg, "sse9") != NULL, "%s", err.msg);
    const char *old = getenv(CPU_ISA_ENV);
    char *saved = old ? strdup(old) : NULL;
    setenv(CPU_ISA_ENV, "ref", 1);
    cr_assert_eq(cpu_isa_select(&isa, &err), 0);
    cr_assert_eq(isa, CPU_ISA_REF);
    setenv(CPU_ISA_ENV, "bogus", 1);
    cr_assert_eq(cpu_isa_select(&isa, &err), -1);
    cr_assert(strstr(err.msg, CPU_ISA_ENV) && strstr(err.msg, "bogus"), "%s", err.msg);
    if (saved)
        setenv(CPU_ISA_ENV, saved, 1);
    else
        unsetenv(CPU_ISA_ENV);
    free(saved);
    cr_assert_not_null(kern_ops_for(CPU_ISA_REF));
    cr_assert_null(kern_ops_for(CPU_ISA_COUNT));
    cr_log_info("detected SIMD level: %s", cpu_isa_name(cpu_isa_detect()));
}

/* Run under QUILLAN_ISA=ref and =avx2 by CTest too: the selected table follows the variable. */
Test(cpu, kern_init_honours_env) {
    init_once();
    const char *env = getenv(CPU_ISA_ENV);
    if (env && *env)
        cr_assert_str_eq(kern_ops()->name, env);
    else
        cr_assert_str_eq(kern_ops()->name, cpu_isa_name(cpu_isa_detect()));
}

/* ---- activation quantization ---- */

/* MODEL.md: s_x = max|x| / 127, code = round_clip(x / s_x, -128, 127), half away from zero. */
Test(act, reference_matches_model_md) {
    const kern_ops_t *ref = kern_ops_for(CPU_ISA_REF);
    const size_t in = 100, n = 3;
    float x[3 * 100];
    fill_normal(x, n * in, 5, 1.0f);
    for (size_t i = 0; i < in; i++)
        x[2 * in + i] = 0.0f; /* an all-zero token */
    kern_act_t a;
    cr_assert_eq(kern_act_init(&a, n, in, NULL), 0);
    cr_assert_eq(a.stride, 256);
    ref->quantize_act(&a, x, in, n);
    cr_assert_eq(a.n, n);
    for (size_t s = 0; s < 2; s++) {
        float amax = 0.0f;
        for (size_t i = 0; i < in; i++)
            amax = fmaxf(amax, fabsf(x[s * in + i]));
        float sx = amax / 127.0f;
        cr_assert_eq(a.scale[s], sx);
        int32_t sum = 0;
        for (size_t i = 0; i < in; i++) {
            float c = roundf(x[s * in + i] / sx);
            cr_assert_eq(a.q[s * a.stride + i], (int8_t)c);
            sum += (int32_t)c;
        }
        cr_assert_eq(a.sum[s], sum);
        for (size_t i = in; i < a.stride; i++)
            cr_assert_eq(a.q[s * a.stride + i], 0);
        float g1 = 0.0f;
        for (size_t i = 32; i < 64; i++)
            g1 += a.q[s * a.stride + i];
        cr_assert_eq(a.gsum[s * (a.stride / 32) + 1], g1);
    }
    cr_assert_eq(a.scale[2], 0.0f);
    cr_assert_eq(a.sum[2], 0);
    kern_act_free(&a);
    kern_act_free(&a);
    cr_assert_eq(kern_act_init(&a, 1, 0, NULL), -1);
    cr_assert_eq(kern_act_init(&a, 1, KERN_MAX_IN + 1, NULL), -1);
}

static void assert_act_equal(const kern_act_t *a, const kern_act_t *b, const char *lvl) {
    cr_assert_eq(a->n, b->n);
    cr_assert_eq(memcmp(a->q, b->q, a->n * a->stride), 0, "%s codes differ (in %zu)", lvl, a->in);
    cr_assert_eq(memcmp(a->scale, b->scale, a->n * sizeof(float)), 0, "%s scales", lvl);
    cr_assert_eq(memcmp(a->sum, b->sum, a->n * sizeof(int32_t)), 0, "%s sums", lvl);
    cr_assert_eq(memcmp(a->gsum, b->gsum, a->n * (a->stride / 32) * sizeof(float)), 0,
                 "%s group sums", lvl);
}

Test(act, simd_levels_match_reference) {
    for (int lvl = 1; lvl < CPU_ISA_COUNT; lvl++) {
        const kern_ops_t *ops = kern_ops_for((cpu_isa_t)lvl);
        if (!ops) {
            cr_log_info("level %s not available here: skipped", cpu_isa_name((cpu_isa_t)lvl));
            continue;
        }
        for (size_t k = 0; k < Q_ARRAY_LEN(WIDTHS); k++) {
            const size_t in = WIDTHS[k], n = 5, ldx = in + 3;
            float *x = xmalloc(n * ldx * sizeof *x);
            fill_normal(x, n * ldx, 10 + k, 3.0f);
            /* Exact ties: a row whose max is 127 has s_x = 1, so k + 0.5 rounds away. */
            x[ldx] = 127.0f;
            for (size_t i = 1; i < in; i++)
                x[ldx + i] = (float)((int)(i % 200) - 100) + 0.5f;
            for (size_t i = 0; i < in; i++)
                x[2 * ldx + i] = 0.0f;
            kern_act_t a, b;
            cr_assert_eq(kern_act_init(&a, n, in, NULL), 0);
            cr_assert_eq(kern_act_init(&b, n, in, NULL), 0);
            memset(b.q, 0x7f, b.cap * b.stride); /* padding must be rewritten to 0 */
            kern_ops_for(CPU_ISA_REF)->quantize_act(&a, x, ldx, n);
            ops->quantize_act(&b, x, ldx, n);
            assert_act_equal(&a, &b, ops->name);
            kern_act_free(&a);
            kern_act_free(&b);
            free(x);
        }
    }
}

/* ---- matrix products ---- */

/* The reference against an independent evaluation: ternary and INT8 from the unpacked row
 * (code = value / scale), y = ((float)isum * s_w) * s_x. */
Test(matmul, reference_matches_definition) {
    const kern_ops_t *ref = kern_ops_for(CPU_ISA_REF);
    const qtype_t types[2] = {QTYPE_TERNARY, QTYPE_INT8};
    const size_t in = 257, out = 5, n = 3;
    float *x = xmalloc(n * in * sizeof *x), *dq = xmalloc(in * sizeof *dq);
    fill_normal(x, n * in, 21, 1.0f);
    kern_act_t a;
    cr_assert_eq(kern_act_init(&a, n, in, NULL), 0);
    ref->quantize_act(&a, x, in, n);
    for (int t = 0; t < 2; t++) {
        uint8_t *w = pack_matrix(types[t], out, in, 22);
        size_t rb = qtype_row_bytes(types[t], in);
        float y[5 * 3];
        ref->matmul_q[types[t]](w, in, &a, y, out, 0, out);
        for (size_t r = 0; r < out; r++) {
            float sw = qtype_row_scale(types[t], w + r * rb, in);
            qtype_traits(types[t])->dequantize_row_ref(w + r * rb, dq, in);
            for (size_t s = 0; s < n; s++) {
                int32_t isum = 0;
                for (size_t i = 0; i < in; i++)
                    isum += (int32_t)lrintf(dq[i] / sw) * a.q[s * a.stride + i];
                float want = (float)isum * sw * a.scale[s];
                cr_assert_eq(y[s * out + r], want, "%s r=%zu s=%zu", qtype_name(types[t]), r, s);
            }
        }
        free(w);
    }
    kern_act_free(&a);
    free(x);
    free(dq);
}

/* Sum over i of |w_i x_i| for row r and token s, from the unpacked row: the scale of the
 * rounding error allowed to the float and INT4 paths. */
static double abs_dot(qtype_t t, const uint8_t *row, size_t in, const float *x) {
    float *dq = xmalloc(in * sizeof *dq);
    qtype_traits(t)->dequantize_row_ref(row, dq, in);
    double s = 0.0;
    for (size_t i = 0; i < in; i++)
        s += fabs((double)dq[i] * x[i]);
    free(dq);
    return s;
}

/* Checks y (ldy = out + GUARD, n + GUARD rows allocated) against the reference yr on rows
 * [r0, r1), and that everything else still holds the sentinel. */
enum { CMP_EXACT, CMP_REL_TOL, CMP_FLOAT_BOUND };

/* kernels.h's bound for products with float activations, as a fraction of sum |terms|. */
static double float_bound(size_t in) {
    return (double)((in + 7) / 8 + 12) * ldexp(1.0, -24);
}

static void check_outputs(const char *what, qtype_t t, const uint8_t *w, size_t in,
                          const float *xdeq, const float *y, const float *yr, size_t out, size_t n,
                          size_t r0, size_t r1, int cmp) {
    const size_t ldy = out + GUARD, rb = qtype_row_bytes(t, in);
    for (size_t s = 0; s < n + GUARD; s++)
        for (size_t r = 0; r < ldy; r++) {
            float v = y[s * ldy + r];
            if (s >= n || r < r0 || r >= r1) {
                cr_assert(isnan(v), "%s wrote outside its rows (r=%zu s=%zu)", what, r, s);
                continue;
            }
            float want = yr[s * ldy + r];
            cr_assert(isfinite(v), "%s produced %f at r=%zu s=%zu", what, v, r, s);
            if (cmp == CMP_EXACT) {
                cr_assert_eq(v, want, "%s in=%zu r=%zu s=%zu: %.9g vs %.9g", what, in, r, s, v,
                             want);
            } else {
                const double rel = cmp == CMP_REL_TOL ? KERN_TEST_REL_TOL : float_bound(in);
                double tol = rel * abs_dot(t, w + r * rb, in, xdeq + s * in) + 1e-30;
                cr_assert(fabs((double)v - want) <= tol, "%s in=%zu r=%zu s=%zu: %.9g vs %.9g",
                          what, in, r, s, v, want);
            }
        }
}

static float *sentinel_out(size_t out, size_t n) {
    size_t len = (out + GUARD) * (n + GUARD);
    float *y = xmalloc(len * sizeof *y);
    for (size_t i = 0; i < len; i++)
        y[i] = NAN;
    return y;
}

/* a = reference quantization of n random rows x[n, in]; xdeq = the activations a stands for
 * (s_x * code). */
static void random_act(kern_act_t *a, float *x, float *xdeq, size_t n, size_t in, uint64_t seed) {
    fill_normal(x, n * in, seed, 1.0f);
    cr_assert_eq(kern_act_init(a, n, in, NULL), 0);
    kern_ops_for(CPU_ISA_REF)->quantize_act(a, x, in, n);
    for (size_t s = 0; s < n; s++)
        for (size_t i = 0; i < in; i++)
            xdeq[s * in + i] = a->scale[s] * a->q[s * a->stride + i];
}

static void run_quantized(qtype_t t) {
    const kern_ops_t *ref = kern_ops_for(CPU_ISA_REF);
    for (size_t kw = 0; kw < Q_ARRAY_LEN(WIDTHS); kw++)
        for (size_t ko = 0; ko < Q_ARRAY_LEN(OUTS); ko++) {
            const size_t in = WIDTHS[kw], out = OUTS[ko];
            const size_t n = BATCH[(kw + ko) % Q_ARRAY_LEN(BATCH)];
            uint8_t *w = pack_matrix(t, out, in, kw * 31 + ko);
            float *x = xmalloc(n * in * sizeof *x), *xdeq = xmalloc(n * in * sizeof *x);
            kern_act_t a;
            random_act(&a, x, xdeq, n, in, 100 + kw * 7 + ko);
            float *yr = sentinel_out(out, n);
            ref->matmul_q[t](w, in, &a, yr, out + GUARD, 0, out);
            for (int lvl = 1; lvl < CPU_ISA_COUNT; lvl++) {
                const kern_ops_t *ops = kern_ops_for((cpu_isa_t)lvl);
                if (!ops)
                    continue;
                char what[64];
                snprintf(what, sizeof what, "%s %s", ops->name, qtype_name(t));
                /* Whole range, then a middle sub-range alone. */
                float *y = sentinel_out(out, n);
                ops->matmul_q[t](w, in, &a, y, out + GUARD, 0, out);
                check_outputs(what, t, w, in, xdeq, y, yr, out, n, 0, out,
                              t == QTYPE_INT4 ? CMP_REL_TOL : CMP_EXACT);
                /* A single dot product is the same computation as its entry of the product. */
                float d = kern_dot_q(ops, t, w + qtype_row_bytes(t, in) * (out - 1), &a, n - 1);
                cr_assert_eq(d, y[(n - 1) * (out + GUARD) + out - 1], "%s dot", what);
                free(y);
                if (out >= 3) {
                    y = sentinel_out(out, n);
                    ops->matmul_q[t](w, in, &a, y, out + GUARD, 1, out - 1);
                    check_outputs(what, t, w, in, xdeq, y, yr, out, n, 1, out - 1,
                                  t == QTYPE_INT4 ? CMP_REL_TOL : CMP_EXACT);
                    free(y);
                }
            }
            if (t == QTYPE_INT4) {
                /* The reference itself: sum of dequantised weights x dequantised activations. */
                for (size_t s = 0; s < n; s++)
                    for (size_t r = 0; r < out; r++) {
                        float *dq = xmalloc(in * sizeof *dq);
                        qtype_traits(t)->dequantize_row_ref(w + r * qtype_row_bytes(t, in), dq, in);
                        double want = 0.0;
                        for (size_t i = 0; i < in; i++)
                            want += (double)dq[i] * xdeq[s * in + i];
                        double tol = KERN_TEST_REL_TOL * abs_dot(t, w + r * qtype_row_bytes(t, in),
                                                                 in, xdeq + s * in) +
                                     1e-30;
                        cr_assert(fabs(yr[s * (out + GUARD) + r] - want) <= tol);
                        free(dq);
                    }
            }
            free(yr);
            kern_act_free(&a);
            free(x);
            free(xdeq);
            free(w);
        }
}

Test(matmul, ternary_levels_match_reference) {
    run_quantized(QTYPE_TERNARY);
}

Test(matmul, int4_levels_match_reference) {
    run_quantized(QTYPE_INT4);
}

Test(matmul, int8_levels_match_reference) {
    run_quantized(QTYPE_INT8);
}

/* ---- row-interleaved copies (int4x, ternx, int8x) ---- */

/* An interleaved product under test: its type (layout kern_ilv(type), product
 * matmul_ilv[type]) and how a SIMD level's results compare with the reference. */
typedef struct {
    qtype_t type;
    int simd_cmp; /* CMP_EXACT or CMP_REL_TOL */
} ilv_case_t;

static const ilv_case_t INT4X = {QTYPE_INT4, CMP_REL_TOL};
static const ilv_case_t INT8X = {QTYPE_INT8, CMP_EXACT};
static const ilv_case_t TERNX = {QTYPE_TERNARY, CMP_EXACT};

/* The table has a layout for exactly the quantized types, with the panel rows its layout text
 * (and the decoders below) use, and every level's products sit on those types only. */
Test(ilv, table_covers_the_quantized_types) {
    cr_assert_null(kern_ilv(QTYPE_F32));
    cr_assert_null(kern_ilv(QTYPE_F16));
    const struct {
        qtype_t type;
        const char *name;
        size_t rows;
    } want[] = {{QTYPE_TERNARY, "ternx", KERN_TERNX_ROWS},
                {QTYPE_INT4, "int4x", KERN_INT4X_ROWS},
                {QTYPE_INT8, "int8x", KERN_INT8X_ROWS}};
    for (size_t k = 0; k < Q_ARRAY_LEN(want); k++) {
        const kern_ilv_t *l = kern_ilv(want[k].type);
        cr_assert_not_null(l, "%s", qtype_name(want[k].type));
        cr_assert_str_eq(l->name, want[k].name);
        cr_assert_eq(l->rows, want[k].rows, "%s", l->name);
        cr_assert(l->bytes && l->pack && l->min_batch >= 1, "%s", l->name);
    }
    for (int lvl = 0; lvl < CPU_ISA_COUNT; lvl++) {
        const kern_ops_t *ops = kern_ops_for((cpu_isa_t)lvl);
        if (!ops)
            continue;
        for (int t = 0; t < QTYPE_COUNT; t++)
            if (ops->matmul_ilv[t])
                cr_assert_not_null(kern_ilv((qtype_t)t), "%s: matmul_ilv[%s] without a layout",
                                   ops->name, qtype_name((qtype_t)t));
    }
}

/* The interleaved copy of w, checked to be the same whatever dst held before. */
static uint8_t *ilv_pack_checked(const ilv_case_t *c, const uint8_t *w, size_t out, size_t in) {
    const kern_ilv_t *l = kern_ilv(c->type);
    const size_t bytes = l->bytes(out, in);
    uint8_t *x = xmalloc(bytes), *x2 = xmalloc(bytes);
    memset(x, 0xA5, bytes);
    memset(x2, 0x00, bytes);
    l->pack(x, w, out, in);
    l->pack(x2, w, out, in);
    cr_assert_eq(memcmp(x, x2, bytes), 0, "%s out=%zu in=%zu: copy depends on dst", l->name, out,
                 in);
    free(x2);
    return x;
}

/* ---- INT4, row-interleaved (int4x) ---- */

/* Nibble of weight i of row r in the interleaved copy, decoded from kernels.h's layout text. */
static unsigned int4x_nibble(const uint8_t *x, size_t in, size_t r, size_t i) {
    const size_t nb = (in + 127) / 128, g = i / 32, k = i % 32;
    const size_t off = (r / 16 * nb + g / 4) * KERN_INT4X_BLOCK_BYTES + g % 4 * 256 +
                       64 * (k % 16 / 4) + 4 * (r % 16) + k % 4;
    return (x[off] >> (k >= 16 ? 4 : 0)) & 15;
}

static uint16_t int4x_scale(const uint8_t *x, size_t in, size_t r, size_t g) {
    const size_t nb = (in + 127) / 128;
    uint16_t h;
    memcpy(&h,
           x + (r / 16 * nb + g / 4) * KERN_INT4X_BLOCK_BYTES + 1024 + 32 * (g % 4) + 2 * (r % 16),
           2);
    return h;
}

/* Every weight's nibble and every group's scale of the row-major rows sit where the layout
 * says; padding rows hold code 0 with scale 0; the copy does not depend on what dst held. */
Test(int4x, pack_places_every_code_and_scale) {
    const kern_ilv_t *l = kern_ilv(QTYPE_INT4);
    const size_t outs[] = {1, 15, 16, 17, 40};
    const size_t ins[] = {1, 31, 100, 128, 129, 300, 1500};
    for (size_t ko = 0; ko < Q_ARRAY_LEN(outs); ko++)
        for (size_t ki = 0; ki < Q_ARRAY_LEN(ins); ki++) {
            const size_t out = outs[ko], in = ins[ki], rb = qtype_row_bytes(QTYPE_INT4, in);
            const size_t nb = (in + 127) / 128, panels = (out + 15) / 16;
            const size_t bytes = l->bytes(out, in);
            cr_assert_eq(bytes, panels * 16 * rb, "out=%zu in=%zu", out, in);
            uint8_t *w = pack_matrix(QTYPE_INT4, out, in, 60 + ko * 7 + ki);
            uint8_t *x = ilv_pack_checked(&INT4X, w, out, in);
            for (size_t r = 0; r < panels * 16; r++)
                for (size_t i = 0; i < nb * 128; i++) {
                    unsigned want = 8;
                    if (r < out)
                        want = (w[r * rb + i / 128 * 64 + i % 64] >> (i % 128 >= 64 ? 4 : 0)) & 15;
                    cr_assert_eq(int4x_nibble(x, in, r, i), want, "out=%zu in=%zu r=%zu i=%zu", out,
                                 in, r, i);
                }
            for (size_t r = 0; r < panels * 16; r++)
                for (size_t g = 0; g < 4 * nb; g++) {
                    uint16_t want = 0;
                    if (r < out)
                        memcpy(&want, w + r * rb + nb * 64 + 2 * g, 2);
                    cr_assert_eq(int4x_scale(x, in, r, g), want, "out=%zu in=%zu r=%zu g=%zu", out,
                                 in, r, g);
                }
            free(w);
            free(x);
        }
    cr_assert_eq(l->bytes(4096, 4096), 4096 * qtype_row_bytes(QTYPE_INT4, 4096));
    cr_assert_eq(l->bytes(SIZE_MAX / 8, 4096), SIZE_MAX);
}

/* The product on the copy against the reference row-major product: the reference level bit
 * for bit, SIMD levels as c->simd_cmp; whole range and sub-ranges (a panel start to a row
 * inside a panel). Levels without the product are the documented ones (AVX2). */
static void check_ilv(const ilv_case_t *c, size_t out, size_t in, size_t n, uint64_t seed) {
    const kern_ops_t *ref = kern_ops_for(CPU_ISA_REF);
    const kern_ilv_t *l = kern_ilv(c->type);
    uint8_t *w = pack_matrix(c->type, out, in, seed);
    uint8_t *wx = xmalloc(l->bytes(out, in));
    l->pack(wx, w, out, in);
    float *x = xmalloc(n * in * sizeof *x), *xdeq = xmalloc(n * in * sizeof *x);
    kern_act_t a;
    random_act(&a, x, xdeq, n, in, seed + 1);
    float *yr = sentinel_out(out, n);
    ref->matmul_q[c->type](w, in, &a, yr, out + GUARD, 0, out);
    const size_t p = l->rows;
    size_t ranges[4][2] = {{0, out}, {p, out}, {0, p}, {p, out - 1}};
    for (int lvl = 0; lvl < CPU_ISA_COUNT; lvl++) {
        const kern_ops_t *ops = kern_ops_for((cpu_isa_t)lvl);
        if (!ops)
            continue;
        const kern_matmul_q_fn fn = ops->matmul_ilv[c->type];
        if (!fn) {
            cr_assert_str_eq(ops->name, "avx2", "%s lacks the %s product", ops->name, l->name);
            continue;
        }
        char what[64];
        snprintf(what, sizeof what, "%s %s out=%zu n=%zu", ops->name, l->name, out, n);
        for (int k = 0; k < (out > p + 1 ? 4 : out > p ? 3 : 1); k++) {
            float *y = sentinel_out(out, n);
            fn(wx, in, &a, y, out + GUARD, ranges[k][0], ranges[k][1]);
            check_outputs(what, c->type, w, in, xdeq, y, yr, out, n, ranges[k][0], ranges[k][1],
                          lvl == CPU_ISA_REF ? CMP_EXACT : c->simd_cmp);
            free(y);
        }
    }
    free(yr);
    kern_act_free(&a);
    free(x);
    free(xdeq);
    free(wx);
    free(w);
}

Test(int4x, levels_match_row_major_product) {
    const size_t outs[] = {1, 13, 16, 17, 40};
    for (size_t kw = 0; kw < Q_ARRAY_LEN(WIDTHS); kw++)
        for (size_t ko = 0; ko < Q_ARRAY_LEN(outs); ko++)
            check_ilv(&INT4X, outs[ko], WIDTHS[kw], BATCH[(kw + ko) % Q_ARRAY_LEN(BATCH)],
                      300 + kw * 11 + ko);
}

/* Every batch size 1..33: every tile width and the balanced split into token blocks. */
Test(int4x, every_batch_size) {
    for (size_t n = 1; n <= 33; n++)
        check_ilv(&INT4X, 35, 300, n, 900 + n);
    check_ilv(&INT4X, 48, 2100, 32, 990);
}

/* ---- ternary, row-interleaved (ternx) ---- */

/* Stored code of weight i of row r in the interleaved copy, from kernels.h's layout text. */
static unsigned ternx_code(const uint8_t *x, size_t in, size_t r, size_t i) {
    const size_t nc = 4 * ((in + 255) / 256), pb = nc * 64 + 16;
    return x[r / 4 * pb + i] >> (2 * (r % 4)) & 3;
}

static float ternx_scale(const uint8_t *x, size_t in, size_t r) {
    const size_t nc = 4 * ((in + 255) / 256), pb = nc * 64 + 16;
    float v;
    memcpy(&v, x + r / 4 * pb + nc * 64 + 4 * (r % 4), 4);
    return v;
}

/* Every weight's code and every row's scale sit where the layout says; padding rows and
 * columns hold code 1 (weight 0), padding rows scale 0; the copy does not depend on dst. */
Test(ternx, pack_places_every_code_and_scale) {
    const kern_ilv_t *l = kern_ilv(QTYPE_TERNARY);
    const size_t outs[] = {1, 3, 4, 5, 13};
    const size_t ins[] = {1, 63, 100, 256, 257, 700};
    for (size_t ko = 0; ko < Q_ARRAY_LEN(outs); ko++)
        for (size_t ki = 0; ki < Q_ARRAY_LEN(ins); ki++) {
            const size_t out = outs[ko], in = ins[ki], rb = qtype_row_bytes(QTYPE_TERNARY, in);
            const size_t nb = (in + 255) / 256, panels = (out + 3) / 4;
            const size_t bytes = l->bytes(out, in);
            cr_assert_eq(bytes, panels * 4 * rb, "out=%zu in=%zu", out, in);
            uint8_t *w = pack_matrix(QTYPE_TERNARY, out, in, 70 + ko * 7 + ki);
            uint8_t *x = ilv_pack_checked(&TERNX, w, out, in);
            for (size_t r = 0; r < panels * 4; r++) {
                for (size_t i = 0; i < nb * 256; i++) {
                    unsigned want = 1;
                    if (r < out && i < in)
                        want = w[r * rb + i / 256 * 64 + i % 64] >> (2 * (i % 256 / 64)) & 3;
                    cr_assert_eq(ternx_code(x, in, r, i), want, "out=%zu in=%zu r=%zu i=%zu", out,
                                 in, r, i);
                }
                const float want = r < out ? qtype_row_scale(QTYPE_TERNARY, w + r * rb, in) : 0.0f;
                cr_assert_eq(ternx_scale(x, in, r), want, "out=%zu in=%zu r=%zu", out, in, r);
            }
            free(w);
            free(x);
        }
    cr_assert_eq(l->bytes(4096, 4096), 4096 * qtype_row_bytes(QTYPE_TERNARY, 4096));
    cr_assert_eq(l->bytes(SIZE_MAX / 8, 4096), SIZE_MAX);
}

Test(ternx, levels_match_row_major_product) {
    const size_t outs[] = {1, 3, 4, 5, 9, 13};
    for (size_t kw = 0; kw < Q_ARRAY_LEN(WIDTHS); kw++)
        for (size_t ko = 0; ko < Q_ARRAY_LEN(outs); ko++)
            check_ilv(&TERNX, outs[ko], WIDTHS[kw], BATCH[(kw + ko) % Q_ARRAY_LEN(BATCH)],
                      400 + kw * 11 + ko);
}

/* Every batch size 1..33: every tile width and the balanced split into token blocks. */
Test(ternx, every_batch_size) {
    for (size_t n = 1; n <= 33; n++)
        check_ilv(&TERNX, 11, 300, n, 950 + n);
    check_ilv(&TERNX, 24, 4100, 32, 995);
}

/* ---- INT8, row-interleaved (int8x) ---- */

/* Every stored byte and every row's scale sit where kernels.h's layout text says; padding rows
 * and columns hold 128 (weight 0), padding rows scale 0; the copy does not depend on dst. */
Test(int8x, pack_places_every_code_and_scale) {
    const kern_ilv_t *l = kern_ilv(QTYPE_INT8);
    const size_t outs[] = {1, 15, 16, 17, 40};
    const size_t ins[] = {1, 63, 100, 256, 257, 700};
    for (size_t ko = 0; ko < Q_ARRAY_LEN(outs); ko++)
        for (size_t ki = 0; ki < Q_ARRAY_LEN(ins); ki++) {
            const size_t out = outs[ko], in = ins[ki], rb = qtype_row_bytes(QTYPE_INT8, in);
            const size_t nq = 64 * ((in + 255) / 256), pb = nq * 64 + 64;
            const size_t panels = (out + 15) / 16, bytes = l->bytes(out, in);
            cr_assert_eq(bytes, panels * pb, "out=%zu in=%zu", out, in);
            uint8_t *w = pack_matrix(QTYPE_INT8, out, in, 80 + ko * 7 + ki);
            uint8_t *x = ilv_pack_checked(&INT8X, w, out, in);
            for (size_t r = 0; r < panels * 16; r++) {
                const uint8_t *panel = x + r / 16 * pb;
                for (size_t k = 0; k < 4 * nq; k++) {
                    const unsigned want = r < out && k < in ? w[r * rb + k] : 128;
                    cr_assert_eq(panel[64 * (k / 4) + 4 * (r % 16) + k % 4], want,
                                 "out=%zu in=%zu r=%zu k=%zu", out, in, r, k);
                }
                float sw;
                memcpy(&sw, panel + nq * 64 + 4 * (r % 16), 4);
                const float want = r < out ? qtype_row_scale(QTYPE_INT8, w + r * rb, in) : 0.0f;
                cr_assert_eq(sw, want, "out=%zu in=%zu r=%zu", out, in, r);
            }
            free(w);
            free(x);
        }
    cr_assert_eq(l->bytes(SIZE_MAX / 8, 4096), SIZE_MAX);
}

Test(int8x, levels_match_row_major_product) {
    const size_t outs[] = {1, 13, 16, 17, 40};
    for (size_t kw = 0; kw < Q_ARRAY_LEN(WIDTHS); kw++)
        for (size_t ko = 0; ko < Q_ARRAY_LEN(outs); ko++)
            check_ilv(&INT8X, outs[ko], WIDTHS[kw], BATCH[(kw + ko) % Q_ARRAY_LEN(BATCH)],
                      500 + kw * 11 + ko);
}

/* Every batch size 1..70: every tile width, the balanced split into token blocks and more
 * tokens than one pass keeps (64); widths of several column chunks (512 columns each). */
Test(int8x, every_batch_size) {
    for (size_t n = 1; n <= 70; n++)
        check_ilv(&INT8X, 35, 300, n, 1000 + n);
    check_ilv(&INT8X, 48, 2100, 32, 1090);
    check_ilv(&INT8X, 33, 4100, 8, 1091);
}

static void run_float(qtype_t t) {
    const kern_ops_t *ref = kern_ops_for(CPU_ISA_REF);
    for (size_t kw = 0; kw < Q_ARRAY_LEN(WIDTHS); kw++)
        for (size_t ko = 0; ko < Q_ARRAY_LEN(OUTS); ko++) {
            const size_t in = WIDTHS[kw], out = OUTS[ko], ldx = in + 5;
            const size_t n = BATCH[(kw + 2 * ko) % Q_ARRAY_LEN(BATCH)];
            uint8_t *w = pack_matrix(t, out, in, 500 + kw * 31 + ko);
            float *x = xmalloc(n * ldx * sizeof *x), *xd = xmalloc(n * in * sizeof *x);
            fill_normal(x, n * ldx, 700 + kw * 7 + ko, 1.0f);
            for (size_t s = 0; s < n; s++)
                memcpy(xd + s * in, x + s * ldx, in * sizeof *x);
            float *yr = sentinel_out(out, n);
            ref->matmul_f[t](w, in, x, ldx, n, yr, out + GUARD, 0, out);
            for (size_t s = 0; s < n; s++)
                for (size_t r = 0; r < out; r++) {
                    float *dq = xmalloc(in * sizeof *dq);
                    qtype_traits(t)->dequantize_row_ref(w + r * qtype_row_bytes(t, in), dq, in);
                    double want = 0.0;
                    for (size_t i = 0; i < in; i++)
                        want += (double)dq[i] * xd[s * in + i];
                    cr_assert_eq(yr[s * (out + GUARD) + r], (float)want);
                    free(dq);
                }
            for (int lvl = 1; lvl < CPU_ISA_COUNT; lvl++) {
                const kern_ops_t *ops = kern_ops_for((cpu_isa_t)lvl);
                if (!ops)
                    continue;
                char what[64];
                snprintf(what, sizeof what, "%s %s", ops->name, qtype_name(t));
                float *y = sentinel_out(out, n);
                size_t r0 = out >= 3 ? 1 : 0, r1 = out >= 3 ? out - 1 : out;
                ops->matmul_f[t](w, in, x, ldx, n, y, out + GUARD, r0, r1);
                check_outputs(what, t, w, in, xd, y, yr, out, n, r0, r1, CMP_FLOAT_BOUND);
                free(y);
            }
            free(yr);
            free(x);
            free(xd);
            free(w);
        }
}

Test(matmul, f32_levels_match_reference) {
    run_float(QTYPE_F32);
}

Test(matmul, f16_levels_match_reference) {
    run_float(QTYPE_F16);
}

Test(matmul, int4_float_levels_match_reference) {
    run_float(QTYPE_INT4);
}

Test(matmul, int8_float_levels_match_reference) {
    run_float(QTYPE_INT8);
}

/* With a one-hot activation row e_i every level must return weight i exactly as
 * dequantize_row_ref gives it (the learner's fake-quantized value): the kernels dequantise
 * in registers to the same floats, whatever the position in a block, group or tail. */
Test(matmul, float_activations_see_exact_dequantised_weights) {
    const qtype_t types[] = {QTYPE_F16, QTYPE_INT4, QTYPE_INT8};
    const size_t in = 301, out = 6, n = 7, ldx = in + 1;
    const size_t pos[7] = {0, 31, 32, 64, 127, 200, 300};
    float *x = xmalloc(n * ldx * sizeof *x), *dq = xmalloc(in * sizeof *dq);
    memset(x, 0, n * ldx * sizeof *x);
    for (size_t s = 0; s < n; s++)
        x[s * ldx + pos[s]] = 1.0f;
    for (size_t k = 0; k < Q_ARRAY_LEN(types); k++) {
        const qtype_t t = types[k];
        const size_t rb = qtype_row_bytes(t, in);
        uint8_t *w = pack_matrix(t, out, in, 40 + k);
        for (int lvl = 0; lvl < CPU_ISA_COUNT; lvl++) {
            const kern_ops_t *ops = kern_ops_for((cpu_isa_t)lvl);
            if (!ops)
                continue;
            cr_assert_not_null(ops->matmul_f[t], "%s %s", ops->name, qtype_name(t));
            float y[7 * 6];
            ops->matmul_f[t](w, in, x, ldx, n, y, out, 0, out);
            for (size_t r = 0; r < out; r++) {
                qtype_traits(t)->dequantize_row_ref(w + r * rb, dq, in);
                for (size_t s = 0; s < n; s++)
                    cr_assert(memcmp(&y[s * out + r], &dq[pos[s]], sizeof(float)) == 0,
                              "%s %s r=%zu i=%zu: %a vs %a", ops->name, qtype_name(t), r, pos[s],
                              (double)y[s * out + r], (double)dq[pos[s]]);
            }
        }
        free(w);
    }
    free(x);
    free(dq);
}

/* ---- threads ---- */

typedef struct {
    const kern_ops_t *ops;
    const uint8_t *w;
    const kern_act_t *a;
    float *y;
    size_t in, out;
} mm_job_t;

static void mm_job(void *ctx, int tid, int nthreads) {
    mm_job_t *j = ctx;
    size_t r0, r1;
    kern_split_rows(j->out, tid, nthreads, 4, &r0, &r1);
    j->ops->matmul_q[QTYPE_TERNARY](j->w, j->in, j->a, j->y, j->out, r0, r1);
}

Test(pool, split_rows_covers_everything_once) {
    for (size_t rows = 0; rows < 70; rows += 7)
        for (int nt = 1; nt <= 5; nt++) {
            size_t next = 0;
            for (int t = 0; t < nt; t++) {
                size_t r0, r1;
                kern_split_rows(rows, t, nt, 4, &r0, &r1);
                cr_assert_eq(r0, next);
                cr_assert(r1 >= r0 && (r1 == rows || r1 % 4 == 0));
                next = r1;
            }
            cr_assert_eq(next, rows);
        }
}

Test(pool, threaded_product_is_bit_identical) {
    init_once();
    const size_t in = 300, out = 37, n = 4;
    uint8_t *w = pack_matrix(QTYPE_TERNARY, out, in, 77);
    float *x = xmalloc(n * in * sizeof *x);
    fill_normal(x, n * in, 78, 1.0f);
    kern_act_t a;
    cr_assert_eq(kern_act_init(&a, n, in, NULL), 0);
    kern_ops()->quantize_act(&a, x, in, n);
    float *y1 = xmalloc(n * out * sizeof *y1), *y3 = xmalloc(n * out * sizeof *y3);
    kern_ops()->matmul_q[QTYPE_TERNARY](w, in, &a, y1, out, 0, out);
    qerr_t err;
    kern_pool_t *pool = kern_pool_new(3, &err);
    cr_assert_not_null(pool, "%s", err.msg);
    cr_assert_eq(kern_pool_size(pool), 3);
    for (int rep = 0; rep < 50; rep++) {
        memset(y3, 0xff, n * out * sizeof *y3);
        mm_job_t job = {kern_ops(), w, &a, y3, in, out};
        kern_pool_run(pool, mm_job, &job);
        cr_assert_eq(memcmp(y1, y3, n * out * sizeof *y1), 0, "round %d", rep);
    }
    kern_pool_destroy(&pool);
    cr_assert_null(pool);
    kern_pool_destroy(&pool);
    cr_assert_null(kern_pool_new(0, &err));
    kern_act_free(&a);
    free(x);
    free(y1);
    free(y3);
    free(w);
}

/* ---- FP16 conversion and packed bits ---- */

Test(f16, conversions_match_fp16_h_bit_for_bit) {
    float *f = xmalloc(65536 * sizeof *f), *g = xmalloc(65536 * sizeof *g);
    uint16_t *h = xmalloc(65536 * sizeof *h), *h2 = xmalloc(65536 * sizeof *h);
    for (uint32_t i = 0; i < 65536; i++)
        h[i] = (uint16_t)i;
    /* Floats: every half, the midpoints between neighbours (ties), near-ties and specials. */
    const size_t nf = 65536;
    rng_stream_t r;
    rng_stream_init(&r, 1, 2, 3);
    for (size_t i = 0; i < nf; i++) {
        uint32_t u = (uint32_t)rng_stream_next_u64(&r);
        switch (i % 4) {
        case 0: memcpy(&f[i], &u, 4); break;
        case 1: f[i] = fp16_to_float((uint16_t)i); break;
        case 2: {
            float a = fp16_to_float((uint16_t)i), b = fp16_to_float((uint16_t)(i + 1));
            f[i] = isfinite(a) && isfinite(b) ? 0.5f * (a + b) : a;
            break;
        }
        default: f[i] = ldexpf((float)(u & 0xffffff), (int)(u >> 27) - 40); break;
        }
    }
    f[0] = 65520.0f;
    f[4] = 65519.996f;
    f[8] = INFINITY;
    f[12] = -NAN;
    for (int lvl = 0; lvl < CPU_ISA_COUNT; lvl++) {
        const kern_ops_t *ops = kern_ops_for((cpu_isa_t)lvl);
        if (!ops)
            continue;
        ops->f16_to_f32(g, h, 65536);
        for (uint32_t i = 0; i < 65536; i++) {
            float want = fp16_to_float((uint16_t)i);
            cr_assert(memcmp(&g[i], &want, 4) == 0 || (isnan(g[i]) && isnan(want)),
                      "%s f16_to_f32(0x%04x)", ops->name, i);
        }
        ops->f16_from_f32(h2, f, nf);
        for (size_t i = 0; i < nf; i++)
            cr_assert_eq(h2[i], fp16_from_float(f[i]), "%s f16_from_f32(%a)", ops->name,
                         (double)f[i]);
    }
    free(f);
    free(g);
    free(h);
    free(h2);
}

Test(bits, xor_popcount_pack_match_bit_by_bit) {
    const size_t sizes[] = {1, 31, 63, 64, 65, 256, 1000};
    for (int lvl = 0; lvl < CPU_ISA_COUNT; lvl++) {
        const kern_ops_t *ops = kern_ops_for((cpu_isa_t)lvl);
        if (!ops)
            continue;
        for (size_t k = 0; k < Q_ARRAY_LEN(sizes); k++) {
            const size_t nbits = sizes[k], nw = (nbits + 63) / 64;
            float *x = xmalloc(nbits * sizeof *x);
            fill_normal(x, nbits, 900 + k, 1.0f);
            uint64_t a[16], b[16], c[16];
            memset(a, 0xff, sizeof a);
            ops->bits_pack_gt(a, x, 0.25f, nbits);
            size_t want_pop = 0;
            for (size_t i = 0; i < nw * 64; i++) {
                int bit = (int)((a[i / 64] >> (i % 64)) & 1);
                int want = i < nbits && x[i] > 0.25f;
                cr_assert_eq(bit, want, "%s pack bit %zu of %zu", ops->name, i, nbits);
                want_pop += (size_t)want;
            }
            cr_assert_eq(ops->bits_popcount(a, nw), want_pop);
            rng_stream_t r;
            rng_stream_init(&r, 7, k, 0);
            for (size_t i = 0; i < nw; i++)
                b[i] = rng_stream_next_u64(&r);
            ops->bits_xor(c, a, b, nw);
            size_t pop = 0;
            for (size_t i = 0; i < nw * 64; i++) {
                int x1 = (int)((a[i / 64] >> (i % 64)) & 1),
                    x2 = (int)((b[i / 64] >> (i % 64)) & 1);
                int got = (int)((c[i / 64] >> (i % 64)) & 1);
                cr_assert_eq(got, x1 != x2);
                pop += (size_t)got;
            }
            cr_assert_eq(ops->bits_popcount(c, nw), pop);
            ops->bits_xor(a, a, b, nw); /* in place */
            cr_assert_eq(memcmp(a, c, nw * 8), 0);
            free(x);
        }
    }
}
