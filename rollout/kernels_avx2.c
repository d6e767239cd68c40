/* AVX2 + FMA + F16C kernels (no VNNI: the CPUs of users without AVX-512). Compiled with their
 * own flags; only reached after cpu_features.c confirmed support.
 *
 * u8 x s8 products use vpmaddubsw (pairs summed to int16) and vpmaddwd against ones (int32).
 * The unsigned operand is the stored ternary code w + 1 (<= 2) or INT4 nibble (<= 15), so the
 * int16 pair sums cannot saturate (activation codes are within -127..127). INT8 weights use
 * the sign trick instead (|w| unsigned, sign moved onto the activation), since 255 * 127 * 2
 * would saturate int16. Tiles are TR rows x up to TS tokens (16 ymm registers). */
#include "kernels_impl.h"

#include <immintrin.h>

#define TR 4
#define TS 2

#define INLINE static inline __attribute__((always_inline))
/* Complete unrolling of the register-tile loops before GCC's scalar replacement of the
 * accumulator arrays: otherwise every accumulator is stored to the stack after each update. */
#define UNROLL _Pragma("GCC unroll 8")

INLINE int32_t hsum_epi32(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
    return _mm_cvtsi128_si32(s);
}

INLINE float hsum_ps(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* ---- activation quantization ---- */

INLINE __m256 round_away(__m256 v) {
    const __m256 t = _mm256_round_ps(v, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
    const __m256 sign = _mm256_set1_ps(-0.0f);
    const __m256 frac = _mm256_andnot_ps(sign, _mm256_sub_ps(v, t));
    const __m256 up = _mm256_cmp_ps(frac, _mm256_set1_ps(0.5f), _CMP_GE_OQ);
    const __m256 one = _mm256_or_ps(_mm256_set1_ps(1.0f), _mm256_and_ps(v, sign));
    return _mm256_add_ps(t, _mm256_and_ps(up, one));
}

INLINE __m256i codes8(const float *x, __m256 vsx) {
    __m256 r = round_away(_mm256_div_ps(_mm256_loadu_ps(x), vsx));
    r = _mm256_min_ps(_mm256_max_ps(r, _mm256_set1_ps(-128.0f)), _mm256_set1_ps(127.0f));
    return _mm256_cvttps_epi32(r);
}

static void quantize_act(kern_act_t *act, const float *x, size_t ldx, size_t n) {
    Q_ASSERT(n <= act->cap);
    const size_t in = act->in, ng = act->stride / QTYPE_INT4_GROUP;
    const __m256 sign = _mm256_set1_ps(-0.0f);
    const __m256i perm = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (size_t s = 0; s < n; s++) {
        const float *xs = x + s * ldx;
        int8_t *q = act->q + s * act->stride;
        __m256 vmax = _mm256_setzero_ps();
        size_t i = 0;
        for (; i + 8 <= in; i += 8)
            vmax = _mm256_max_ps(vmax, _mm256_andnot_ps(sign, _mm256_loadu_ps(xs + i)));
        __m128 m = _mm_max_ps(_mm256_castps256_ps128(vmax), _mm256_extractf128_ps(vmax, 1));
        m = _mm_max_ps(m, _mm_movehl_ps(m, m));
        m = _mm_max_ss(m, _mm_movehdup_ps(m));
        float amax = _mm_cvtss_f32(m);
        for (; i < in; i++) {
            const float a = xs[i] < 0 ? -xs[i] : xs[i];
            amax = a > amax ? a : amax;
        }
        const float sx = amax / 127.0f;
        act->scale[s] = sx;
        if (sx == 0.0f) {
            memset(q, 0, act->stride);
            memset(act->gsum + s * ng, 0, ng * sizeof(float));
            act->sum[s] = 0;
            continue;
        }
        const __m256 vsx = _mm256_set1_ps(sx);
        __m256i vsum = _mm256_setzero_si256();
        float tail[QTYPE_INT4_GROUP];
        for (size_t g = 0; g < ng; g++) {
            const size_t i0 = g * QTYPE_INT4_GROUP;
            const float *src = xs + i0;
            if (i0 + QTYPE_INT4_GROUP > in) {
                memset(tail, 0, sizeof tail);
                if (i0 < in)
                    memcpy(tail, xs + i0, (in - i0) * sizeof(float));
                src = tail;
            }
            const __m256i a = codes8(src, vsx), b = codes8(src + 8, vsx);
            const __m256i c = codes8(src + 16, vsx), d = codes8(src + 24, vsx);
            const __m256i p =
                _mm256_packs_epi16(_mm256_packs_epi32(a, b), _mm256_packs_epi32(c, d));
            _mm256_storeu_si256((__m256i *)(q + i0), _mm256_permutevar8x32_epi32(p, perm));
            const __m256i t = _mm256_add_epi32(_mm256_add_epi32(a, b), _mm256_add_epi32(c, d));
            act->gsum[s * ng + g] = (float)hsum_epi32(t);
            vsum = _mm256_add_epi32(vsum, t);
        }
        act->sum[s] = hsum_epi32(vsum);
    }
    act->n = n;
}

INLINE size_t block_len(size_t n, size_t s0, size_t smax) {
    const size_t nblk = (n + smax - 1) / smax, base = n / nblk, extra = n % nblk;
    const size_t k = s0 < extra * (base + 1) ? s0 / (base + 1) : extra;
    return k < extra ? base + 1 : base;
}

/* u8 x s8 -> int32 lanes (4 products each). */
INLINE __m256i dot_u8s8(__m256i u, __m256i s) {
    return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
}

/* ---- ternary ---- */

INLINE void tern_tile(const int R, const int S, const uint8_t *w, size_t rb, size_t nb,
                      const int8_t *x, size_t xs, const uint8_t *pf, int32_t *out) {
    __m256i acc[TR][TS];
    UNROLL for (int r = 0; r < R; r++) UNROLL for (int s = 0; s < S; s++) acc[r][s] =
        _mm256_setzero_si256();
    const __m256i m3 = _mm256_set1_epi8(3);
    for (size_t b = 0; b < nb; b++) {
        if (pf)
            UNROLL for (int r = 0; r < R; r++)
                _mm_prefetch((const char *)pf + (b * R + r) * 64, _MM_HINT_T0);
        UNROLL for (int h = 0; h < 2; h++) UNROLL for (int k = 0; k < 4; k++)
            UNROLL for (int r = 0; r < R; r++) {
            const __m256i raw = _mm256_loadu_si256((const __m256i *)(w + r * rb + b * 64 + 32 * h));
            const __m256i wk =
                _mm256_and_si256(_mm256_srl_epi16(raw, _mm_cvtsi32_si128(2 * k)), m3);
            UNROLL for (int s = 0; s < S; s++) {
                const __m256i xv =
                    _mm256_load_si256((const __m256i *)(x + s * xs + b * 256 + 64 * k + 32 * h));
                acc[r][s] = _mm256_add_epi32(acc[r][s], dot_u8s8(wk, xv));
            }
        }
    }
    UNROLL for (int r = 0; r < R; r++) UNROLL for (int s = 0; s < S; s++) out[r * TS + s] =
        hsum_epi32(acc[r][s]);
}

/* ---- INT8: sign trick ---- */

INLINE void int8_tile(const int R, const int S, const uint8_t *w, size_t rb, size_t nb,
                      const int8_t *x, size_t xs, const uint8_t *pf, int32_t *out) {
    __m256i acc[TR][TS];
    UNROLL for (int r = 0; r < R; r++) UNROLL for (int s = 0; s < S; s++) acc[r][s] =
        _mm256_setzero_si256();
    const __m256i bias = _mm256_set1_epi8((char)0x80);
    for (size_t b = 0; b < nb; b++) {
        if (pf)
            UNROLL for (int r = 0; r < R; r++)
                _mm_prefetch((const char *)pf + (b * R + r) * 64, _MM_HINT_T0);
        UNROLL for (int h = 0; h < 2; h++) UNROLL for (int r = 0; r < R; r++) {
            const __m256i ws = _mm256_xor_si256(
                _mm256_loadu_si256((const __m256i *)(w + r * rb + b * 64 + 32 * h)), bias);
            const __m256i aw = _mm256_abs_epi8(ws);
            UNROLL for (int s = 0; s < S; s++) {
                const __m256i xv =
                    _mm256_load_si256((const __m256i *)(x + s * xs + b * 64 + 32 * h));
                acc[r][s] = _mm256_add_epi32(acc[r][s], dot_u8s8(aw, _mm256_sign_epi8(xv, ws)));
            }
        }
    }
    UNROLL for (int r = 0; r < R; r++) UNROLL for (int s = 0; s < S; s++) out[r * TS + s] =
        hsum_epi32(acc[r][s]);
}

typedef void (*itile_fn)(const uint8_t *, size_t, size_t, const int8_t *, size_t, const uint8_t *,
                         int32_t *);
#define DEF_TILE(name, R, S)                                                                       \
    static void name##_##R##_##S(const uint8_t *w, size_t rb, size_t nb, const int8_t *x,          \
                                 size_t xs, const uint8_t *pf, int32_t *out) {                     \
        name(R, S, w, rb, nb, x, xs, pf, out);                                                     \
    }
#define DEF_TILES(name)                                                                            \
    DEF_TILE(name, 4, 1)                                                                           \
    DEF_TILE(name, 4, 2)                                                                           \
    DEF_TILE(name, 1, 1)                                                                           \
    DEF_TILE(name, 1, 2)                                                                           \
    static const itile_fn name##_table[2][TS] = {{name##_1_1, name##_1_2},                         \
                                                 {name##_4_1, name##_4_2}};
DEF_TILES(tern_tile)
DEF_TILES(int8_tile)

/* y = ((float)(isum - offset * sum_x) * s_w) * s_x; offset 1 for ternary (stored w + 1), 0 for
 * INT8 (the sign trick works on the true codes). */
static void matmul_single_scale(const itile_fn table[2][TS], qtype_t type, int offset,
                                const void *w, size_t in, const kern_act_t *act, float *y,
                                size_t ldy, size_t r0, size_t r1) {
    Q_ASSERT(in == act->in && in <= KERN_MAX_IN);
    const qtype_traits_t *t = qtype_traits(type);
    const size_t rb = qtype_row_bytes(type, in), nb = (in + t->block - 1) / t->block;
    const size_t cb = nb * t->block_bytes, n = act->n;
    const uint8_t *wbase = w;
    int32_t isum[TR * TS];
    for (size_t r = r0; r < r1;) {
        const int R = r1 - r >= TR ? TR : 1;
        const uint8_t *wr = wbase + r * rb;
        for (size_t s0 = 0; s0 < n;) {
            const size_t S = block_len(n, s0, TS);
            const uint8_t *pf = s0 == 0 ? wr + kern_pf_ahead((size_t)R * rb) : NULL;
            table[R == TR][S - 1](wr, rb, nb, act->q + s0 * act->stride, act->stride, pf, isum);
            for (int i = 0; i < R; i++) {
                const float sw = kern_load_f32(wr + i * rb + cb);
                for (size_t s = 0; s < S; s++) {
                    const int32_t v = isum[i * TS + s] - offset * act->sum[s0 + s];
                    y[(s0 + s) * ldy + r + i] = (float)v * sw * act->scale[s0 + s];
                }
            }
            s0 += S;
        }
        r += (size_t)R;
    }
}

static void matmul_ternary(const void *w, size_t in, const kern_act_t *act, float *y, size_t ldy,
                           size_t r0, size_t r1) {
    matmul_single_scale(tern_tile_table, QTYPE_TERNARY, 1, w, in, act, y, ldy, r0, r1);
}

static void matmul_int8(const void *w, size_t in, const kern_act_t *act, float *y, size_t ldy,
                        size_t r0, size_t r1) {
    matmul_single_scale(int8_tile_table, QTYPE_INT8, 0, w, in, act, y, ldy, r0, r1);
}

/* ---- INT4: one ymm of 32 nibbles is exactly one group; its int32 lanes are scaled by the
 * group's scale in float. Bytes 32h..32h+31 of a block hold groups h (low nibbles) and 2 + h
 * (high nibbles). ---- */

INLINE void int4_tile(const int R, const int S, const uint8_t *w, size_t rb, size_t nb,
                      const int8_t *x, size_t xs, const uint8_t *pf, float *out) {
    __m256 acc[TR][TS];
    UNROLL for (int r = 0; r < R; r++) UNROLL for (int s = 0; s < S; s++) acc[r][s] =
        _mm256_setzero_ps();
    const __m256i m4 = _mm256_set1_epi8(15);
    const size_t cb = nb * 64;
    for (size_t b = 0; b < nb; b++) {
        if (pf)
            UNROLL for (int r = 0; r < R; r++)
                _mm_prefetch((const char *)pf + (b * R + r) * 72, _MM_HINT_T0);
        UNROLL for (int r = 0; r < R; r++) {
            float d[4];
            _mm_storeu_ps(
                d, _mm_cvtph_ps(_mm_loadl_epi64((const __m128i *)(w + r * rb + cb + b * 8))));
            UNROLL for (int h = 0; h < 2; h++) {
                const __m256i raw =
                    _mm256_loadu_si256((const __m256i *)(w + r * rb + b * 64 + 32 * h));
                const __m256i lo = _mm256_and_si256(raw, m4);
                const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), m4);
                const __m256 dlo = _mm256_set1_ps(d[h]), dhi = _mm256_set1_ps(d[2 + h]);
                UNROLL for (int s = 0; s < S; s++) {
                    const int8_t *xb = x + s * xs + b * QTYPE_INT4_BLOCK + 32 * h;
                    const __m256i xl = _mm256_load_si256((const __m256i *)xb);
                    const __m256i xh = _mm256_load_si256((const __m256i *)(xb + 64));
                    acc[r][s] =
                        _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot_u8s8(lo, xl)), dlo, acc[r][s]);
                    acc[r][s] =
                        _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot_u8s8(hi, xh)), dhi, acc[r][s]);
                }
            }
        }
    }
    UNROLL for (int r = 0; r < R; r++) UNROLL for (int s = 0; s < S; s++) out[r * TS + s] =
        hsum_ps(acc[r][s]);
}

typedef void (*ftile_fn)(const uint8_t *, size_t, size_t, const int8_t *, size_t, const uint8_t *,
                         float *);
#define DEF_FTILE(R, S)                                                                            \
    static void int4_tile_##R##_##S(const uint8_t *w, size_t rb, size_t nb, const int8_t *x,       \
                                    size_t xs, const uint8_t *pf, float *out) {                    \
        int4_tile(R, S, w, rb, nb, x, xs, pf, out);                                                \
    }
DEF_FTILE(4, 1)
DEF_FTILE(4, 2)
DEF_FTILE(1, 1)
DEF_FTILE(1, 2)
static const ftile_fn int4_tile_table[2][TS] = {{int4_tile_1_1, int4_tile_1_2},
                                                {int4_tile_4_1, int4_tile_4_2}};

/* sum over the ng (a multiple of 4) groups of a row of scale_g * gsum_g. */
static float int4_correction(const uint8_t *scales, const float *gsum, size_t ng) {
    __m256 acc = _mm256_setzero_ps();
    size_t g = 0;
    for (; g + 8 <= ng; g += 8)
        acc = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(scales + 2 * g))),
                              _mm256_loadu_ps(gsum + g), acc);
    __m128 a4 = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
    if (g < ng)
        a4 = _mm_fmadd_ps(_mm_cvtph_ps(_mm_loadl_epi64((const __m128i *)(scales + 2 * g))),
                          _mm_loadu_ps(gsum + g), a4);
    a4 = _mm_add_ps(a4, _mm_movehl_ps(a4, a4));
    a4 = _mm_add_ss(a4, _mm_movehdup_ps(a4));
    return _mm_cvtss_f32(a4);
}

static void matmul_int4(const void *w, size_t in, const kern_act_t *act, float *y, size_t ldy,
                        size_t r0, size_t r1) {
    Q_ASSERT(in == act->in && in <= KERN_MAX_IN);
    const size_t rb = qtype_row_bytes(QTYPE_INT4, in);
    const size_t nb = (in + QTYPE_INT4_BLOCK - 1) / QTYPE_INT4_BLOCK, ng = 4 * nb;
    const size_t gstride = act->stride / QTYPE_INT4_GROUP, n = act->n;
    const uint8_t *wbase = w;
    float part[TR * TS];
    for (size_t r = r0; r < r1;) {
        const int R = r1 - r >= TR ? TR : 1;
        const uint8_t *wr = wbase + r * rb;
        for (size_t s0 = 0; s0 < n;) {
            const size_t S = block_len(n, s0, TS);
            const uint8_t *pf = s0 == 0 ? wr + kern_pf_ahead((size_t)R * rb) : NULL;
            int4_tile_table[R == TR][S - 1](wr, rb, nb, act->q + s0 * act->stride, act->stride, pf,
                                            part);
            for (int i = 0; i < R; i++)
                for (size_t s = 0; s < S; s++) {
                    const float corr =
                        int4_correction(wr + i * rb + nb * 64, act->gsum + (s0 + s) * gstride, ng);
                    y[(s0 + s) * ldy + r + i] =
                        (part[i * TS + s] - (float)QTYPE_INT4_OFFSET * corr) * act->scale[s0 + s];
                }
            s0 += S;
        }
        r += (size_t)R;
    }
}

/* ---- float activations ---- */

INLINE __m256 load_w8(int f16, const uint8_t *row, size_t i) {
    if (f16)
        return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(row + 2 * i)));
    return _mm256_loadu_ps((const float *)(row + 4 * i));
}

INLINE float w_at(int f16, const uint8_t *row, size_t i) {
    if (f16) {
        uint16_t h;
        memcpy(&h, row + 2 * i, 2);
        return _cvtsh_ss(h);
    }
    return kern_load_f32(row + 4 * i);
}

INLINE void float_tile(const int f16, const int R, const int S, const uint8_t *w, size_t rb,
                       size_t in, const float *x, size_t ldx, const uint8_t *pf, float *out) {
    __m256 acc[TR][TS];
    UNROLL for (int r = 0; r < R; r++) UNROLL for (int s = 0; s < S; s++) acc[r][s] =
        _mm256_setzero_ps();
    const size_t esz = f16 ? 2 : 4;
    size_t i = 0;
    for (; i + 8 <= in; i += 8) {
        if (pf && (i * esz) % 64 == 0)
            UNROLL for (int r = 0; r < R; r++)
                _mm_prefetch((const char *)pf + i * esz * R + r * 64, _MM_HINT_T0);
        __m256 wv[TR];
        UNROLL for (int r = 0; r < R; r++) wv[r] = load_w8(f16, w + r * rb, i);
        UNROLL for (int s = 0; s < S; s++) {
            const __m256 xv = _mm256_loadu_ps(x + s * ldx + i);
            UNROLL for (int r = 0; r < R; r++) acc[r][s] = _mm256_fmadd_ps(wv[r], xv, acc[r][s]);
        }
    }
    UNROLL for (int r = 0; r < R; r++) UNROLL for (int s = 0; s < S; s++) {
        float v = hsum_ps(acc[r][s]);
        for (size_t j = i; j < in; j++)
            v += w_at(f16, w + r * rb, j) * x[s * ldx + j];
        out[r * TS + s] = v;
    }
}

typedef void (*fltile_fn)(const uint8_t *, size_t, size_t, const float *, size_t, const uint8_t *,
                          float *);
#define DEF_FLTILE(F16, R, S)                                                                      \
    static void float_tile_##F16##_##R##_##S(const uint8_t *w, size_t rb, size_t in,               \
                                             const float *x, size_t ldx, const uint8_t *pf,        \
                                             float *out) {                                         \
        float_tile(F16, R, S, w, rb, in, x, ldx, pf, out);                                         \
    }
#define DEF_FLTILES(F16)                                                                           \
    DEF_FLTILE(F16, 4, 1)                                                                          \
    DEF_FLTILE(F16, 4, 2)                                                                          \
    DEF_FLTILE(F16, 1, 1)                                                                          \
    DEF_FLTILE(F16, 1, 2)                                                                          \
    static const fltile_fn float_tile_table_##F16[2][TS] = {                                       \
        {float_tile_##F16##_1_1, float_tile_##F16##_1_2},                                          \
        {float_tile_##F16##_4_1, float_tile_##F16##_4_2}};
DEF_FLTILES(0)
DEF_FLTILES(1)

static void matmul_float(const fltile_fn table[2][TS], qtype_t type, const void *w, size_t in,
                         const float *x, size_t ldx, size_t n, float *y, size_t ldy, size_t r0,
                         size_t r1) {
    const size_t rb = qtype_row_bytes(type, in);
    const uint8_t *wbase = w;
    float part[TR * TS];
    for (size_t r = r0; r < r1;) {
        const int R = r1 - r >= TR ? TR : 1;
        const uint8_t *wr = wbase + r * rb;
        for (size_t s0 = 0; s0 < n;) {
            const size_t S = block_len(n, s0, TS);
            const uint8_t *pf = s0 == 0 ? wr + kern_pf_ahead((size_t)R * rb) : NULL;
            table[R == TR][S - 1](wr, rb, in, x + s0 * ldx, ldx, pf, part);
            for (int i = 0; i < R; i++)
                for (size_t s = 0; s < S; s++)
                    y[(s0 + s) * ldy + r + i] = part[i * TS + s];
            s0 += S;
        }
        r += (size_t)R;
    }
}

/* INT8 and INT4 weights x float activations: 8 weights per register dequantised to exactly
 * s * (float)code (INT8: one vmulps; INT4: one FMA, see int4f_tile), activations loaded masked
 * past `in` (the rows are padded to whole blocks, so weight loads need no mask). */

INLINE __m256i tail_mask8(size_t i, size_t in) {
    const int left = i + 8 <= in ? 8 : (int)(in - i);
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(left), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

INLINE void qf_step(const int R, const int S, const __m256 *wv, const float *x, size_t ldx,
                    size_t i, size_t in, __m256 acc[TR][TS]) {
    if (i + 8 <= in) {
        UNROLL for (int s = 0; s < S; s++) {
            const __m256 xv = _mm256_loadu_ps(x + s * ldx + i);
            UNROLL for (int r = 0; r < R; r++) acc[r][s] = _mm256_fmadd_ps(wv[r], xv, acc[r][s]);
        }
        return;
    }
    /* vmaskmovps only for the tail: it is slow on some CPUs (AMD). */
    const __m256i m = tail_mask8(i, in);
    UNROLL for (int s = 0; s < S; s++) {
        const __m256 xv = _mm256_maskload_ps(x + s * ldx + i, m);
        UNROLL for (int r = 0; r < R; r++) acc[r][s] = _mm256_fmadd_ps(wv[r], xv, acc[r][s]);
    }
}

INLINE void int8f_tile(const int R, const int S, const uint8_t *w, size_t rb, size_t in,
                       const float *x, size_t ldx, const uint8_t *pf, float *out) {
    __m256 acc[TR][TS];
    UNROLL for (int r = 0; r < R; r++) UNROLL for (int s = 0; s < S; s++) acc[r][s] =
        _mm256_setzero_ps();
    float sw[TR];
    UNROLL for (int r = 0; r < R; r++) sw[r] =
        kern_load_f32(w + r * rb + kern_codes_bytes(QTYPE_INT8, in));
    const __m256 off = _mm256_set1_ps((float)QTYPE_INT8_OFFSET);
    for (size_t i = 0; i < in; i += 8) {
        if (pf && i % 64 == 0)
            UNROLL for (int r = 0; r < R; r++)
                _mm_prefetch((const char *)pf + i * R + r * 64, _MM_HINT_T0);
        __m256 wv[TR];
        UNROLL for (int r = 0; r < R; r++) {
            const __m256i b =
                _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(w + r * rb + i)));
            wv[r] = _mm256_mul_ps(_mm256_set1_ps(sw[r]), _mm256_sub_ps(_mm256_cvtepi32_ps(b), off));
        }
        qf_step(R, S, wv, x, ldx, i, in, acc);
    }
    UNROLL for (int r = 0; r < R; r++) UNROLL for (int s = 0; s < S; s++) out[r * TS + s] =
        hsum_ps(acc[r][s]);
}

/* Group g of a 128-weight block: low nibbles (g < 2) or high nibbles of bytes 32 (g % 2) ..
 * 32 (g % 2) + 31; four steps of 8 weights. A weight is fma(nibble, d, -8 d): d * code needs at
 * most 11 + 4 significant bits, so it is a float, and -8 d is exact; the FMA's one rounding
 * therefore returns exactly d * (float)code, the product dequantize_row_ref computes. */
INLINE void int4f_tile(const int R, const int S, const uint8_t *w, size_t rb, size_t in,
                       const float *x, size_t ldx, const uint8_t *pf, float *out) {
    __m256 acc[TR][TS];
    UNROLL for (int r = 0; r < R; r++) UNROLL for (int s = 0; s < S; s++) acc[r][s] =
        _mm256_setzero_ps();
    const size_t nb = (in + QTYPE_INT4_BLOCK - 1) / QTYPE_INT4_BLOCK, cb = nb * 64;
    const __m256i m4 = _mm256_set1_epi32(15);
    for (size_t b = 0; b < nb; b++) {
        if (pf)
            UNROLL for (int r = 0; r < R; r++)
                _mm_prefetch((const char *)pf + (b * R + r) * 72, _MM_HINT_T0);
        float d[TR][4];
        UNROLL for (int r = 0; r < R; r++) _mm_storeu_ps(
            d[r], _mm_cvtph_ps(_mm_loadl_epi64((const __m128i *)(w + r * rb + cb + b * 8))));
        UNROLL for (int g = 0; g < 4; g++) UNROLL for (int j = 0; j < 4; j++) {
            const size_t i = b * QTYPE_INT4_BLOCK + (size_t)g * QTYPE_INT4_GROUP + 8 * (size_t)j;
            if (i >= in)
                break;
            const size_t o = b * 64 + 32 * (size_t)(g & 1) + 8 * (size_t)j;
            __m256 wv[TR];
            UNROLL for (int r = 0; r < R; r++) {
                __m256i v =
                    _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(w + r * rb + o)));
                v = g >= 2 ? _mm256_srli_epi32(v, 4) : _mm256_and_si256(v, m4);
                wv[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(v), _mm256_set1_ps(d[r][g]),
                                        _mm256_set1_ps(-8.0f * d[r][g]));
            }
            qf_step(R, S, wv, x, ldx, i, in, acc);
        }
    }
    UNROLL for (int r = 0; r < R; r++) UNROLL for (int s = 0; s < S; s++) out[r * TS + s] =
        hsum_ps(acc[r][s]);
}

#define DEF_QFTILES(name)                                                                          \
    DEF_QFTILE(name, 4, 1)                                                                         \
    DEF_QFTILE(name, 4, 2)                                                                         \
    DEF_QFTILE(name, 1, 1)                                                                         \
    DEF_QFTILE(name, 1, 2)                                                                         \
    static const fltile_fn name##_table[2][TS] = {{name##_1_1, name##_1_2},                        \
                                                  {name##_4_1, name##_4_2}};
#define DEF_QFTILE(name, R, S)                                                                     \
    static void name##_##R##_##S(const uint8_t *w, size_t rb, size_t in, const float *x,           \
                                 size_t ldx, const uint8_t *pf, float *out) {                      \
        name(R, S, w, rb, in, x, ldx, pf, out);                                                    \
    }
DEF_QFTILES(int8f_tile)
DEF_QFTILES(int4f_tile)

static void matmul_f32(const void *w, size_t in, const float *x, size_t ldx, size_t n, float *y,
                       size_t ldy, size_t r0, size_t r1) {
    matmul_float(float_tile_table_0, QTYPE_F32, w, in, x, ldx, n, y, ldy, r0, r1);
}

static void matmul_f16(const void *w, size_t in, const float *x, size_t ldx, size_t n, float *y,
                       size_t ldy, size_t r0, size_t r1) {
    matmul_float(float_tile_table_1, QTYPE_F16, w, in, x, ldx, n, y, ldy, r0, r1);
}

static void matmul_int8_f(const void *w, size_t in, const float *x, size_t ldx, size_t n, float *y,
                          size_t ldy, size_t r0, size_t r1) {
    matmul_float(int8f_tile_table, QTYPE_INT8, w, in, x, ldx, n, y, ldy, r0, r1);
}

static void matmul_int4_f(const void *w, size_t in, const float *x, size_t ldx, size_t n, float *y,
                          size_t ldy, size_t r0, size_t r1) {
    matmul_float(int4f_tile_table, QTYPE_INT4, w, in, x, ldx, n, y, ldy, r0, r1);
}

/* ---- FP16 rows ---- */

static void f16_from_f32(uint16_t *dst, const float *src, size_t n) {
    size_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm_storeu_si128((__m128i *)(dst + i),
                         _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT));
    for (; i < n; i++)
        dst[i] = _cvtss_sh(src[i], _MM_FROUND_TO_NEAREST_INT);
}

static void f16_to_f32(float *dst, const uint16_t *src, size_t n) {
    size_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(src + i))));
    for (; i < n; i++)
        dst[i] = _cvtsh_ss(src[i]);
}

const kern_ops_t kern_ops_avx2 = {
    .name = "avx2",
    .quantize_act = quantize_act,
    .matmul_q =
        {[QTYPE_TERNARY] = matmul_ternary, [QTYPE_INT4] = matmul_int4, [QTYPE_INT8] = matmul_int8},
    .matmul_f = {[QTYPE_F32] = matmul_f32,
                 [QTYPE_F16] = matmul_f16,
                 [QTYPE_INT4] = matmul_int4_f,
                 [QTYPE_INT8] = matmul_int8_f},
    .matmul_ilv = {NULL}, /* kernels.h: matmul_q[type] on the row-major rows instead */
    .f16_from_f32 = f16_from_f32,
    .f16_to_f32 = f16_to_f32,
    .bits_xor = kern_ref_bits_xor,
    .bits_popcount = kern_ref_bits_popcount,
    .bits_pack_gt = kern_ref_bits_pack_gt,
};
