#include "quant.h"

#include <math.h>
#include <string.h>

#include "error.h"
#include "fp16.h"
#include "gemm.h"

#ifdef _OPENMP
#include <omp.h>
#define OMP_PRAGMA(x) _Pragma(#x)
#else
#define OMP_PRAGMA(x)
#endif

/* Below this many elements a loop runs on one thread. */
#define QUANT_PARALLEL_MIN (1 << 15)

static int g_surrogate;

static int par_ok(size_t work) {
#ifdef _OPENMP
    return work >= QUANT_PARALLEL_MIN && !omp_in_parallel();
#else
    (void)work;
    return 0;
#endif
}

const char *quant_type_name(quant_type_t type) {
    static const char *const names[] = {"f32", "f16", "ternary", "int4", "int8"};
    _Static_assert(sizeof names / sizeof names[0] == QUANT_TYPE_COUNT, "one name per format");
    return (unsigned)type < QUANT_TYPE_COUNT ? names[type] : "?";
}

void quant_surrogate_set(int on) {
    g_surrogate = on != 0;
}
int quant_surrogate_get(void) {
    return g_surrogate;
}

real quant_round(real x) {
#if REAL_IS_DOUBLE
    return round(x);
#else
    return roundf(x);
#endif
}

/* The one code rule of every format: round_clip(x / scale, lo, hi), 0 when scale is 0. */
static inline int code_of(real x, real scale, int lo, int hi) {
    if (!(scale > 0))
        return 0;
    const real q = quant_round(x / scale);
    return q < (real)lo ? lo : q > (real)hi ? hi : (int)q;
}

static real absmax(const real *w, int n) {
    real m = 0;
    for (int i = 0; i < n; i++)
        m = R_FMAX(m, R_FABS(w[i]));
    return m;
}

static real absmean(const real *w, int n) {
    real s = 0;
    for (int i = 0; i < n; i++)
        s += R_FABS(w[i]);
    return s / (real)n;
}

/* fp16(max|g| / 7) of an INT4 group, as bits and as the value dequantisation uses. */
static real int4_scale(const real *g, int n, uint16_t *bits) {
    *bits = fp16_from_float((float)(absmax(g, n) / (real)QUANT_INT4_MAX));
    return (real)fp16_to_float(*bits);
}

void quant_ternary_row(int8_t *codes, real *scale, const real *w, int n) {
    Q_ASSERT(n >= 1);
    const real s = absmean(w, n);
    const real d = s + (real)QUANT_TERNARY_EPS;
    for (int i = 0; i < n; i++)
        codes[i] = (int8_t)code_of(w[i], d, -1, 1);
    *scale = s;
}

void quant_int8_row(int8_t *codes, real *scale, const real *w, int n) {
    Q_ASSERT(n >= 1);
    const real s = absmax(w, n) / (real)QUANT_INT8_MAX;
    for (int i = 0; i < n; i++)
        codes[i] = (int8_t)code_of(w[i], s, -QUANT_INT8_MAX, QUANT_INT8_MAX);
    *scale = s;
}

void quant_int4_row(int8_t *codes, uint16_t *scales, const real *w, int n) {
    Q_ASSERT(n >= 1);
    for (int g0 = 0, gi = 0; g0 < n; g0 += QUANT_INT4_GROUP, gi++) {
        const int len = n - g0 < QUANT_INT4_GROUP ? n - g0 : QUANT_INT4_GROUP;
        const real s = int4_scale(w + g0, len, &scales[gi]);
        for (int i = 0; i < len; i++)
            codes[g0 + i] = (int8_t)code_of(w[g0 + i], s, -QUANT_INT4_MAX, QUANT_INT4_MAX);
    }
}

void quant_act_row(int8_t *codes, real *scale, const real *x, int n) {
    Q_ASSERT(n >= 1);
    const real s = absmax(x, n) / (real)QUANT_ACT_MAX;
    for (int i = 0; i < n; i++)
        codes[i] = (int8_t)code_of(x[i], s, QUANT_ACT_MIN, QUANT_ACT_MAX);
    *scale = s;
}

/* Dequantised row in place of the codes: out[n] = value of w[n] in `type`. */
static void fake_row(quant_type_t type, real *out, const real *w, int n) {
    switch (type) {
    case QUANT_F32:
        if (out != w)
            memcpy(out, w, sizeof(real) * (size_t)n);
        break;
    case QUANT_F16:
        for (int i = 0; i < n; i++)
            out[i] = (real)fp16_round((float)w[i]);
        break;
    case QUANT_TERNARY: {
        const real s = absmean(w, n);
        const real d = s + (real)QUANT_TERNARY_EPS;
        for (int i = 0; i < n; i++)
            out[i] = s * (real)code_of(w[i], d, -1, 1);
        break;
    }
    case QUANT_INT4:
        for (int g0 = 0; g0 < n; g0 += QUANT_INT4_GROUP) {
            const int len = n - g0 < QUANT_INT4_GROUP ? n - g0 : QUANT_INT4_GROUP;
            uint16_t bits;
            const real s = int4_scale(w + g0, len, &bits);
            for (int i = g0; i < g0 + len; i++)
                out[i] = s * (real)code_of(w[i], s, -QUANT_INT4_MAX, QUANT_INT4_MAX);
        }
        break;
    case QUANT_INT8: {
        const real s = absmax(w, n) / (real)QUANT_INT8_MAX;
        for (int i = 0; i < n; i++)
            out[i] = s * (real)code_of(w[i], s, -QUANT_INT8_MAX, QUANT_INT8_MAX);
        break;
    }
    default: Q_ASSERT(!"unknown quant type");
    }
}

void quant_fake_forward(quant_type_t type, real *out, const real *w, int rows, int cols) {
    Q_ASSERT(rows >= 0 && cols >= 1 && (unsigned)type < QUANT_TYPE_COUNT);
    if (g_surrogate)
        type = QUANT_F32;
    const int par = par_ok((size_t)rows * (size_t)cols);
    (void)par;
    OMP_PRAGMA(omp parallel for schedule(static) if (par))
    for (int r = 0; r < rows; r++)
        fake_row(type, out + (size_t)r * cols, w + (size_t)r * cols, cols);
}

void quant_fake_act_forward(real *out, const real *x, int rows, int cols) {
    Q_ASSERT(rows >= 0 && cols >= 1);
    if (g_surrogate) {
        if (out != x)
            memcpy(out, x, sizeof(real) * (size_t)rows * (size_t)cols);
        return;
    }
    const int par = par_ok((size_t)rows * (size_t)cols);
    (void)par;
    OMP_PRAGMA(omp parallel for schedule(static) if (par))
    for (int r = 0; r < rows; r++) {
        const real *xr = x + (size_t)r * cols;
        real *o = out + (size_t)r * cols;
        const real s = absmax(xr, cols) / (real)QUANT_ACT_MAX;
        for (int i = 0; i < cols; i++)
            o[i] = s * (real)code_of(xr[i], s, QUANT_ACT_MIN, QUANT_ACT_MAX);
    }
}

void bitlinear_forward(real *out, real *wq, real *sw, real *xq, real *sx, const real *inp,
                       const real *weight, int BT, int C, int OC) {
    Q_ASSERT(BT >= 0 && C >= 1 && OC >= 1);
    /* The integer sums must stay exact in real: |code_x| <= 128, |code_w| <= 1. */
    Q_ASSERT((double)C * 128.0 < (REAL_IS_DOUBLE ? 9007199254740992.0 : 16777216.0));
    if (g_surrogate) {
        memcpy(wq, weight, sizeof(real) * (size_t)OC * (size_t)C);
        memcpy(xq, inp, sizeof(real) * (size_t)BT * (size_t)C);
        for (int o = 0; o < OC; o++)
            sw[o] = 1;
        for (int t = 0; t < BT; t++)
            sx[t] = 1;
        gemm(GEMM_N, GEMM_T, BT, OC, C, 1, inp, C, weight, C, 0, out, OC);
        return;
    }
    const int par = par_ok((size_t)(BT + OC) * (size_t)C);
    (void)par;
    /* Codes first, held as small integers in real: the GEMM of integer-valued operands is the
     * exact integer dot product whatever its summation order. */
    OMP_PRAGMA(omp parallel for schedule(static) if (par))
    for (int o = 0; o < OC; o++) {
        const real *w = weight + (size_t)o * C;
        real *q = wq + (size_t)o * C;
        const real s = absmean(w, C);
        const real d = s + (real)QUANT_TERNARY_EPS;
        for (int i = 0; i < C; i++)
            q[i] = (real)code_of(w[i], d, -1, 1);
        sw[o] = s;
    }
    OMP_PRAGMA(omp parallel for schedule(static) if (par))
    for (int t = 0; t < BT; t++) {
        const real *x = inp + (size_t)t * C;
        real *q = xq + (size_t)t * C;
        const real s = absmax(x, C) / (real)QUANT_ACT_MAX;
        for (int i = 0; i < C; i++)
            q[i] = (real)code_of(x[i], s, QUANT_ACT_MIN, QUANT_ACT_MAX);
        sx[t] = s;
    }
    gemm(GEMM_N, GEMM_T, BT, OC, C, 1, xq, C, wq, C, 0, out, OC);
    OMP_PRAGMA(omp parallel for schedule(static) if (par))
    for (int t = 0; t < BT; t++) {
        real *y = out + (size_t)t * OC;
        for (int o = 0; o < OC; o++)
            y[o] = y[o] * sw[o] * sx[t];
        real *q = xq + (size_t)t * C;
        for (int i = 0; i < C; i++)
            q[i] *= sx[t];
    }
    OMP_PRAGMA(omp parallel for schedule(static) if (par))
    for (int o = 0; o < OC; o++) {
        real *q = wq + (size_t)o * C;
        for (int i = 0; i < C; i++)
            q[i] *= sw[o];
    }
}

void bitlinear_backward(real *dinp, real *dweight, const real *dout, const real *wq, const real *xq,
                        int BT, int C, int OC) {
    if (dinp)
        gemm(GEMM_N, GEMM_N, BT, C, OC, 1, dout, OC, wq, C, 1, dinp, C);
    if (dweight)
        gemm(GEMM_T, GEMM_N, OC, C, BT, 1, dout, OC, xq, C, 1, dweight, C);
}
