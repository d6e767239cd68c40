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

/* Below this many elements (a pass of a few hundred microseconds) a loop runs on one thread:
 * each parallel loop is a fork-join, which on a loaded machine costs a scheduler time slice
 * while the other threads spin (see GEMM_PARALLEL_MIN_WORK in gemm.c). */
#define QUANT_PARALLEL_MIN (1 << 20)

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

/* The one code rule of every format, round_clip(q, lo, hi) for integers lo < hi with
 * |lo|, |hi| <= 128, without a libm call, so that the loops using it vectorise. It equals the
 * former (int)clip(roundf(q), lo, hi) for every q (checked on every float bit pattern):
 * rounding is monotone and lo, hi are integers, so clipping first gives the same result; inside
 * [lo, hi] the truncation t is exact, c - t is the exact fraction (|c| < 2^23), and half away
 * from zero is a comparison of that fraction with +-1/2. A NaN passes the clip and converts to
 * the same integer as before (x86's "integer indefinite", INT32_MIN, in scalar and vector
 * conversions alike; the fraction is NaN and adds nothing). */
static inline int32_t round_clip(real q, real lo, real hi) {
    real c = q < lo ? lo : q;
    c = c > hi ? hi : c;
    const int32_t t = (int32_t)c;
    const real f = c - (real)t;
    return t + (f >= (real)0.5) - (f <= (real)-0.5);
}

/* max|w| over the non-NaN entries, 0 for none: what the former sequential fmax gave, in any
 * order (the maximum of non-NaN values does not depend on it). The float build compares bit
 * patterns: non-negative floats, inf included, order as their bits do, and NaNs (bits above
 * inf's) are dropped, so the loop vectorises with integer compares. */
static real absmax(const real *w, int n) {
#if REAL_IS_DOUBLE
    real m = 0;
    for (int i = 0; i < n; i++) {
        const real a = R_FABS(w[i]);
        m = a > m ? a : m;
    }
    return m;
#else
    int32_t m = 0;
    for (int i = 0; i < n; i++) {
        uint32_t u;
        memcpy(&u, &w[i], sizeof u);
        int32_t a = (int32_t)(u & 0x7fffffffu);
        a = a > 0x7f800000 ? 0 : a;
        m = a > m ? a : m;
    }
    float r;
    memcpy(&r, &m, sizeof r);
    return r;
#endif
}

/* Sequential sum in index order: the order is part of the format (quant.h). */
static real absmean(const real *w, int n) {
    real s = 0;
    for (int i = 0; i < n; i++)
        s += R_FABS(w[i]);
    return s / (real)n;
}

/* The code loops keep lo and hi as run-time values: inlined with constants, GCC 12 threads the
 * clip's branches through the rounding and no longer vectorises the loop. */
#if defined(__GNUC__) && !defined(__clang__)
#define CODES_NOIPA __attribute__((noipa))
#else
#define CODES_NOIPA __attribute__((noinline))
#endif

/* codes[n] = round_clip(x / scale, lo, hi) as int8, all 0 when scale is not > 0. */
CODES_NOIPA static void codes_i8(int8_t *codes, const real *x, real scale, real lo, real hi,
                                 int n) {
    if (!(scale > 0)) {
        memset(codes, 0, (size_t)n);
        return;
    }
    for (int i = 0; i < n; i++)
        codes[i] = (int8_t)round_clip(x[i] / scale, lo, hi);
}

/* out[n] = mul * round_clip(x / scale, lo, hi), all 0 when scale is not > 0 (mul * 0 with the
 * sign of mul's zero products, as before). */
CODES_NOIPA static void codes_real(real *out, const real *x, real scale, real mul, real lo, real hi,
                                   int n) {
    if (!(scale > 0)) {
        for (int i = 0; i < n; i++)
            out[i] = mul * (real)0;
        return;
    }
    for (int i = 0; i < n; i++)
        out[i] = mul * (real)round_clip(x[i] / scale, lo, hi);
}

/* fp16_round(f) without a call per element, bit for bit (checked against fp16.c on every float
 * bit pattern): normal halves round the 13 dropped mantissa bits to nearest even (a carry bumps
 * the exponent), subnormal halves round to a multiple of 2^-24 through the float addition
 * |f| + 1/2 (whose ulp is 2^-24), 65520 and above become inf, NaN a quiet NaN keeping the sign
 * and the top payload bits. */
static inline float f16_round(float f) {
    uint32_t x;
    memcpy(&x, &f, sizeof x);
    const uint32_t sign = x & 0x80000000u, ax = x & 0x7fffffffu;
    const uint32_t rn = (ax + 0xfffu + ((ax >> 13) & 1u)) & ~0x1fffu;
    float af;
    memcpy(&af, &ax, sizeof af);
    const float sf = (af + 0.5f) - 0.5f;
    uint32_t rs;
    memcpy(&rs, &sf, sizeof rs);
    /* Selections by masks, not branches: the float addition above then runs for every element
     * and the loop vectorises (a branch would keep it, a trapping operation, conditional). */
    const uint32_t sub = 0u - (uint32_t)(ax < 0x38800000u);
    const uint32_t ovf = 0u - (uint32_t)(ax >= 0x477ff000u);
    const uint32_t nan = 0u - (uint32_t)(ax > 0x7f800000u);
    uint32_t r = (rs & sub) | (rn & ~sub);
    r = (0x7f800000u & ovf) | (r & ~ovf);
    r = ((0x7fc00000u | (ax & 0x7fe000u)) & nan) | (r & ~nan);
    r |= sign;
    float out;
    memcpy(&out, &r, sizeof out);
    return out;
}

/* fp16(max|g| / 7) of an INT4 group, as bits and as the value dequantisation uses. */
static real int4_scale(const real *g, int n, uint16_t *bits) {
    *bits = fp16_from_float((float)(absmax(g, n) / (real)QUANT_INT4_MAX));
    return (real)fp16_to_float(*bits);
}

void quant_ternary_row(int8_t *codes, real *scale, const real *w, int n) {
    Q_ASSERT(n >= 1);
    const real s = absmean(w, n);
    codes_i8(codes, w, s + (real)QUANT_TERNARY_EPS, -1, 1, n);
    *scale = s;
}

void quant_int8_row(int8_t *codes, real *scale, const real *w, int n) {
    Q_ASSERT(n >= 1);
    const real s = absmax(w, n) / (real)QUANT_INT8_MAX;
    codes_i8(codes, w, s, -QUANT_INT8_MAX, QUANT_INT8_MAX, n);
    *scale = s;
}

void quant_int4_row(int8_t *codes, uint16_t *scales, const real *w, int n) {
    Q_ASSERT(n >= 1);
    for (int g0 = 0, gi = 0; g0 < n; g0 += QUANT_INT4_GROUP, gi++) {
        const int len = n - g0 < QUANT_INT4_GROUP ? n - g0 : QUANT_INT4_GROUP;
        const real s = int4_scale(w + g0, len, &scales[gi]);
        codes_i8(codes + g0, w + g0, s, -QUANT_INT4_MAX, QUANT_INT4_MAX, len);
    }
}

void quant_act_row(int8_t *codes, real *scale, const real *x, int n) {
    Q_ASSERT(n >= 1);
    const real s = absmax(x, n) / (real)QUANT_ACT_MAX;
    codes_i8(codes, x, s, QUANT_ACT_MIN, QUANT_ACT_MAX, n);
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
#if REAL_IS_DOUBLE
            out[i] = (real)fp16_round((float)w[i]);
#else
            out[i] = f16_round(w[i]);
#endif
        break;
    case QUANT_TERNARY: {
        const real s = absmean(w, n);
        codes_real(out, w, s + (real)QUANT_TERNARY_EPS, s, -1, 1, n);
        break;
    }
    case QUANT_INT4:
        for (int g0 = 0; g0 < n; g0 += QUANT_INT4_GROUP) {
            const int len = n - g0 < QUANT_INT4_GROUP ? n - g0 : QUANT_INT4_GROUP;
            uint16_t bits;
            const real s = int4_scale(w + g0, len, &bits);
            codes_real(out + g0, w + g0, s, s, -QUANT_INT4_MAX, QUANT_INT4_MAX, len);
        }
        break;
    case QUANT_INT8: {
        const real s = absmax(w, n) / (real)QUANT_INT8_MAX;
        codes_real(out, w, s, s, -QUANT_INT8_MAX, QUANT_INT8_MAX, n);
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
        const real s = absmax(xr, cols) / (real)QUANT_ACT_MAX;
        codes_real(out + (size_t)r * cols, xr, s, s, QUANT_ACT_MIN, QUANT_ACT_MAX, cols);
    }
}

/* wcode[OC, C] = ternary codes (as reals), sw[OC] = s_w; surrogate: wcode = weight, sw = 1. */
static void ternary_codes(real *wcode, real *sw, const real *weight, int C, int OC) {
    if (g_surrogate) {
        if (wcode != weight)
            memcpy(wcode, weight, sizeof(real) * (size_t)OC * (size_t)C);
        for (int o = 0; o < OC; o++)
            sw[o] = 1;
        return;
    }
    const int par = par_ok((size_t)OC * (size_t)C);
    (void)par;
    OMP_PRAGMA(omp parallel for schedule(static) if (par))
    for (int o = 0; o < OC; o++) {
        const real *w = weight + (size_t)o * C;
        const real s = absmean(w, C);
        codes_real(wcode + (size_t)o * C, w, s + (real)QUANT_TERNARY_EPS, 1, -1, 1, C);
        sw[o] = s;
    }
}

/* wq[OC, C] = s_w * wcode, the dequantised weights (wq may equal wcode). */
static void ternary_dequant(real *wq, const real *wcode, const real *sw, int C, int OC) {
    if (g_surrogate) {
        if (wq != wcode)
            memcpy(wq, wcode, sizeof(real) * (size_t)OC * (size_t)C);
        return;
    }
    for (int o = 0; o < OC; o++) {
        real *q = wq + (size_t)o * C;
        const real *c = wcode + (size_t)o * C;
        const real s = sw[o];
        for (int i = 0; i < C; i++)
            q[i] = c[i] * s;
    }
}

void bitlinear_weight_codes(real *wcode, real *wq, real *sw, const real *weight, int C, int OC) {
    Q_ASSERT(C >= 1 && OC >= 1 && wcode != wq);
    ternary_codes(wcode, sw, weight, C, OC);
    ternary_dequant(wq, wcode, sw, C, OC);
}

void bitlinear_forward_codes(real *out, real *xq, real *sx, const real *inp, const real *wcode,
                             const real *sw, int BT, int C, int OC) {
    Q_ASSERT(BT >= 0 && C >= 1 && OC >= 1);
    /* The integer sums must stay exact in real: |code_x| <= 128, |code_w| <= 1. */
    Q_ASSERT((double)C * 128.0 < (REAL_IS_DOUBLE ? 9007199254740992.0 : 16777216.0));
    if (g_surrogate) {
        memcpy(xq, inp, sizeof(real) * (size_t)BT * (size_t)C);
        for (int t = 0; t < BT; t++)
            sx[t] = 1;
        gemm(GEMM_N, GEMM_T, BT, OC, C, 1, inp, C, wcode, C, 0, out, OC);
        return;
    }
    const int par = par_ok((size_t)BT * (size_t)(C + OC));
    (void)par;
    /* Codes first, held as small integers in real: the GEMM of integer-valued operands is the
     * exact integer dot product whatever its summation order. */
    OMP_PRAGMA(omp parallel for schedule(static) if (par))
    for (int t = 0; t < BT; t++) {
        const real *x = inp + (size_t)t * C;
        const real s = absmax(x, C) / (real)QUANT_ACT_MAX;
        codes_real(xq + (size_t)t * C, x, s, 1, QUANT_ACT_MIN, QUANT_ACT_MAX, C);
        sx[t] = s;
    }
    gemm(GEMM_N, GEMM_T, BT, OC, C, 1, xq, C, wcode, C, 0, out, OC);
    OMP_PRAGMA(omp parallel for schedule(static) if (par))
    for (int t = 0; t < BT; t++) {
        real *y = out + (size_t)t * OC;
        const real s = sx[t];
        for (int o = 0; o < OC; o++)
            y[o] = y[o] * sw[o] * s;
        real *q = xq + (size_t)t * C;
        for (int i = 0; i < C; i++)
            q[i] *= s;
    }
}

void bitlinear_forward(real *out, real *wq, real *sw, real *xq, real *sx, const real *inp,
                       const real *weight, int BT, int C, int OC) {
    Q_ASSERT(BT >= 0 && C >= 1 && OC >= 1);
    ternary_codes(wq, sw, weight, C, OC);
    bitlinear_forward_codes(out, xq, sx, inp, wq, sw, BT, C, OC);
    ternary_dequant(wq, wq, sw, C, OC);
}

void bitlinear_backward(real *dinp, real *dweight, const real *dout, const real *wq, const real *xq,
                        int BT, int C, int OC) {
    if (dinp)
        gemm(GEMM_N, GEMM_N, BT, C, OC, 1, dout, OC, wq, C, 1, dinp, C);
    if (dweight)
        gemm(GEMM_T, GEMM_N, OC, C, BT, 1, dout, OC, xq, C, 1, dweight, C);
}
