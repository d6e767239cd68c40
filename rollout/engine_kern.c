/* Threaded matrix products of the engine over the packed rows of qtypes.h.
 *
 * F32, F16 and TERNARY products use the kernels of rollout/kernels.h. INT4 (experts) and INT8
 * (micro agents, head_int8) weights multiply FP32 activations here, because the learner's
 * forward multiplies their fake-quantized values with FP32 activations: a row is dequantised
 * to exactly scale * code (one float multiply, as qtypes' dequantize_row_ref and quant.h's
 * fake quantizer compute it) and then dotted in FP32, so the only difference from the learner is
 * the summation order. The kernels' INT4 x int8 / INT8 x int8 products would add an activation
 * rounding the learner does not simulate (docs/ENGINE.md). */
#include "engine.h"

#include "fp16.h"

#include <string.h>
#include <time.h>

/* Rows per thread boundary: keeps each thread's share on whole kernel row tiles. */
#define ENG_SPLIT_ALIGN 8

double eng_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* FP32 dot product with eight independent partial sums (vectorises without -ffast-math). */
static float dot_f32(const float *a, const float *b, size_t n) {
    float acc[8] = {0};
    size_t i = 0;
    for (; i + 8 <= n; i += 8)
        for (int j = 0; j < 8; j++)
            acc[j] += a[i + j] * b[i + j];
    float s = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
    for (; i < n; i++)
        s += a[i] * b[i];
    return s;
}

static void int4_row_dequant(const unsigned char *row, size_t n, float *out) {
    const size_t nb = (n + QTYPE_INT4_BLOCK - 1) / QTYPE_INT4_BLOCK;
    const unsigned char *sc = row + nb * 64;
    for (size_t b = 0; b < nb; b++) {
        const unsigned char *q = row + b * 64;
        float s[4];
        for (int g = 0; g < 4; g++) {
            uint16_t h;
            memcpy(&h, sc + 2 * (4 * b + (size_t)g), 2);
            s[g] = fp16_to_float(h);
        }
        const size_t base = b * QTYPE_INT4_BLOCK;
        if (base + QTYPE_INT4_BLOCK <= n) {
            for (int j = 0; j < 64; j++) {
                out[base + (size_t)j] = s[j / 32] * (float)((int)(q[j] & 15) - QTYPE_INT4_OFFSET);
                out[base + 64 + (size_t)j] =
                    s[2 + j / 32] * (float)((int)(q[j] >> 4) - QTYPE_INT4_OFFSET);
            }
        } else {
            for (size_t i = base; i < n; i++) {
                const size_t r = i - base;
                const int code = (int)((q[r % 64] >> (4 * (r / 64))) & 15) - QTYPE_INT4_OFFSET;
                out[i] = s[r / 32] * (float)code;
            }
        }
    }
}

static void int8_row_dequant(const unsigned char *row, size_t n, float *out) {
    const float s = qtype_row_scale(QTYPE_INT8, row, n);
    for (size_t i = 0; i < n; i++)
        out[i] = s * (float)((int)row[i] - QTYPE_INT8_OFFSET);
}

void eng_row_dequant(const eng_mat_t *W, size_t r, float *out) {
    Q_ASSERT(r < W->rows);
    const unsigned char *row = W->w + r * W->row_bytes;
    switch (W->qt) {
    case QTYPE_F32: memcpy(out, row, W->cols * sizeof(float)); break;
    case QTYPE_F16: fp16_to_float_n(out, (const uint16_t *)(const void *)row, W->cols); break;
    case QTYPE_INT4: int4_row_dequant(row, W->cols, out); break;
    case QTYPE_INT8: int8_row_dequant(row, W->cols, out); break;
    default: qtype_traits(W->qt)->dequantize_row_ref(row, out, W->cols); break;
    }
}

float eng_row_dot(const eng_mat_t *W, size_t r, const float *x) {
    float buf[KERN_MAX_IN];
    Q_ASSERT(W->cols <= KERN_MAX_IN);
    if (W->qt == QTYPE_F32)
        return dot_f32((const float *)(const void *)(W->w + r * W->row_bytes), x, W->cols);
    eng_row_dequant(W, r, buf);
    return dot_f32(buf, x, W->cols);
}

typedef struct {
    const kern_ops_t *ops;
    const eng_mat_t *W;
    const float *x;
    size_t ldx;
    const kern_act_t *act;
    size_t n;
    float *y;
    size_t ldy;
} mm_ctx_t;

static void mm_run(void *vctx, int tid, int nthreads) {
    const mm_ctx_t *c = vctx;
    const eng_mat_t *W = c->W;
    size_t r0, r1;
    kern_split_rows(W->rows, tid, nthreads, ENG_SPLIT_ALIGN, &r0, &r1);
    if (r0 >= r1)
        return;
    switch (W->qt) {
    case QTYPE_F32:
    case QTYPE_F16:
        c->ops->matmul_f[W->qt](W->w, W->cols, c->x, c->ldx, c->n, c->y, c->ldy, r0, r1);
        break;
    case QTYPE_TERNARY: c->ops->matmul_q[W->qt](W->w, W->cols, c->act, c->y, c->ldy, r0, r1); break;
    case QTYPE_INT4:
    case QTYPE_INT8: {
        float buf[KERN_MAX_IN];
        for (size_t r = r0; r < r1; r++) {
            eng_row_dequant(W, r, buf);
            for (size_t s = 0; s < c->n; s++)
                c->y[s * c->ldy + r] = dot_f32(buf, c->x + s * c->ldx, W->cols);
        }
        break;
    }
    case QTYPE_COUNT: Q_ASSERT(!"bad qtype");
    }
}

void eng_matmul(kern_pool_t *pool, const kern_ops_t *ops, const eng_mat_t *W, const float *x,
                size_t ldx, const kern_act_t *act, size_t n, float *y, size_t ldy) {
    if (n == 0)
        return;
    Q_ASSERT(W->cols <= KERN_MAX_IN);
    Q_ASSERT(W->qt == QTYPE_TERNARY ? act && act->n == n && act->in == W->cols : x != NULL);
    mm_ctx_t c = {ops, W, x, ldx, act, n, y, ldy};
    kern_pool_run(pool, mm_run, &c);
}
