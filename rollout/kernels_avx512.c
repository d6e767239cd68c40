/* AVX-512 (F/BW/VL/DQ + VNNI) kernels. Compiled with their own flags; only reached through
 * kern_ops_for / kern_ops after cpu_features.c confirmed the CPU and OS support them.
 *
 * Register tiling: a tile is TR weight rows x S activation rows (S <= 6; 4 for INT4; INT8 at
 * n = 7, 8: 3 rows x n) held in zmm accumulators, so each unpacked weight register serves S
 * tokens and each activation register TR rows. Tiles walk the rows of [r0, r1) in order; the
 * activation blocks of a whole batch (<= 32 x in bytes) stay in L1/L2 while the weights stream from
 * memory once. While a tile computes, it prefetches the rows of the tile at least KERN_PF_BYTES
 * ahead (kernels_impl.h), at the rate it consumes its own. */
#include "kernels_impl.h"

#include <immintrin.h>

#define TR 4      /* weight rows per tile */
#define TS 6      /* tokens per tile (ternary, int8, float) */
#define TS_INT4 4 /* tokens per tile (int4: two scale registers per row) */
#ifndef KERN_PF_HINT
#define KERN_PF_HINT _MM_HINT_T0
#endif

#define INLINE static inline __attribute__((always_inline))
/* Complete unrolling of the register-tile loops before GCC's scalar replacement of the
 * accumulator arrays: otherwise every accumulator is stored to the stack after each update. */
#define UNROLL _Pragma("GCC unroll 32")

/* acc += u8 u x s8 s (vpdpbusd). GCC's intrinsic makes a register copy of the accumulator
 * around every instruction in these tiles (the builtin's tied operand); the asm form updates
 * it in place, which halves the instructions of the inner loops. */
INLINE __m512i dpbusd(__m512i acc, __m512i u, __m512i s) {
    __asm__("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(u), "v"(s));
    return acc;
}

/* ---- activation quantization ---- */

/* Round half away from zero: trunc(v) plus sign(v) where |v - trunc(v)| >= 0.5 (v - trunc(v)
 * is exact), the same integer as roundf. */
INLINE __m512 round_away(__m512 v) {
    const __m512 t = _mm512_roundscale_ps(v, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
    const __m512 frac = _mm512_abs_ps(_mm512_sub_ps(v, t));
    const __mmask16 up = _mm512_cmp_ps_mask(frac, _mm512_set1_ps(0.5f), _CMP_GE_OQ);
    const __m512 one = _mm512_or_ps(_mm512_set1_ps(1.0f), _mm512_and_ps(v, _mm512_set1_ps(-0.0f)));
    return _mm512_mask_add_ps(t, up, t, one);
}

INLINE __m512i codes16(const float *x, size_t i, size_t in, __m512 vsx) {
    const __mmask16 m = i + 16 <= in ? (__mmask16)0xffff
                        : i < in     ? (__mmask16)((1u << (in - i)) - 1)
                                     : 0;
    const __m512 v = _mm512_div_ps(_mm512_maskz_loadu_ps(m, x + i), vsx);
    __m512 r = round_away(v);
    r = _mm512_min_ps(_mm512_max_ps(r, _mm512_set1_ps(-128.0f)), _mm512_set1_ps(127.0f));
    return _mm512_cvttps_epi32(r);
}

static void quantize_act(kern_act_t *act, const float *x, size_t ldx, size_t n) {
    Q_ASSERT(n <= act->cap);
    const size_t in = act->in, ng = act->stride / QTYPE_INT4_GROUP;
    for (size_t s = 0; s < n; s++) {
        const float *xs = x + s * ldx;
        int8_t *q = act->q + s * act->stride;
        __m512 vmax = _mm512_setzero_ps();
        size_t i = 0;
        for (; i + 16 <= in; i += 16)
            vmax = _mm512_max_ps(vmax, _mm512_abs_ps(_mm512_loadu_ps(xs + i)));
        if (i < in)
            vmax = _mm512_max_ps(vmax, _mm512_abs_ps(_mm512_maskz_loadu_ps(
                                           (__mmask16)((1u << (in - i)) - 1), xs + i)));
        const float sx = _mm512_reduce_max_ps(vmax) / 127.0f;
        act->scale[s] = sx;
        if (sx == 0.0f) {
            memset(q, 0, act->stride);
            memset(act->gsum + s * ng, 0, ng * sizeof(float));
            act->sum[s] = 0;
            continue;
        }
        const __m512 vsx = _mm512_set1_ps(sx);
        __m512i vsum = _mm512_setzero_si512();
        for (size_t g = 0; g < ng; g++) {
            const size_t i0 = g * QTYPE_INT4_GROUP;
            const __m512i a = codes16(xs, i0, in, vsx), b = codes16(xs, i0 + 16, in, vsx);
            _mm_storeu_si128((__m128i *)(q + i0), _mm512_cvtepi32_epi8(a));
            _mm_storeu_si128((__m128i *)(q + i0 + 16), _mm512_cvtepi32_epi8(b));
            const __m512i ab = _mm512_add_epi32(a, b);
            act->gsum[s * ng + g] = (float)_mm512_reduce_add_epi32(ab);
            vsum = _mm512_add_epi32(vsum, ab);
        }
        act->sum[s] = _mm512_reduce_add_epi32(vsum);
    }
    act->n = n;
}

/* Software prefetch of the tile at least KERN_PF_BYTES ahead (R * rb bytes each, whole tiles),
 * spread over the token blocks of the current tile: block k of nblk fetches slice k, `len`
 * bytes per step of the tile (a step consumes `unit` bytes of each of its R rows: 64, or a
 * 72-byte INT4 block with its scales), so the memory streams through every block instead of
 * idling after the first. */
typedef struct {
    const uint8_t *p;
    size_t len;
} pf_t;

INLINE void prefetch_step(const pf_t *pf, size_t step) {
    const char *p = (const char *)pf->p + step * pf->len;
    for (size_t o = 0; o < pf->len; o += 64)
        _mm_prefetch(p + o, KERN_PF_HINT);
}

/* ---- tile sums ----
 * A tile ends with R x S horizontal sums. Reduced one register at a time they cost ~8
 * instructions each, as much as the whole loop of a short row (in = 96..512 in the 512m
 * preset's attention, overseer and expert matrices); 16 registers transposed together cost 45
 * (15 adds). Both are trees of 4 pairwise levels. sum16: lane 4 (i % 4) + i / 4 holds the sum
 * of v[i]. */

INLINE __m512 sum16_ps(const __m512 *v) {
    __m512 w[8], u[4], t[2];
    UNROLL for (int k = 0; k < 8; k++) w[k] =
        _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * k], v[2 * k + 1], 0x44),
                      _mm512_shuffle_f32x4(v[2 * k], v[2 * k + 1], 0xEE));
    UNROLL for (int k = 0; k < 4; k++) u[k] =
        _mm512_add_ps(_mm512_shuffle_f32x4(w[2 * k], w[2 * k + 1], 0x88),
                      _mm512_shuffle_f32x4(w[2 * k], w[2 * k + 1], 0xDD));
    UNROLL for (int k = 0; k < 2; k++) {
        const __m512d a = _mm512_castps_pd(u[2 * k]), b = _mm512_castps_pd(u[2 * k + 1]);
        t[k] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)),
                             _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
    }
    return _mm512_add_ps(_mm512_shuffle_ps(t[0], t[1], 0x88), _mm512_shuffle_ps(t[0], t[1], 0xDD));
}

INLINE __m512i sum16_epi32(const __m512i *v) {
    __m512i w[8], u[4], t[2];
    UNROLL for (int k = 0; k < 8; k++) w[k] =
        _mm512_add_epi32(_mm512_shuffle_i32x4(v[2 * k], v[2 * k + 1], 0x44),
                         _mm512_shuffle_i32x4(v[2 * k], v[2 * k + 1], 0xEE));
    UNROLL for (int k = 0; k < 4; k++) u[k] =
        _mm512_add_epi32(_mm512_shuffle_i32x4(w[2 * k], w[2 * k + 1], 0x88),
                         _mm512_shuffle_i32x4(w[2 * k], w[2 * k + 1], 0xDD));
    UNROLL for (int k = 0; k < 2; k++) t[k] =
        _mm512_add_epi32(_mm512_unpacklo_epi64(u[2 * k], u[2 * k + 1]),
                         _mm512_unpackhi_epi64(u[2 * k], u[2 * k + 1]));
    const __m512 a = _mm512_castsi512_ps(t[0]), b = _mm512_castsi512_ps(t[1]);
    return _mm512_add_epi32(_mm512_castps_si512(_mm512_shuffle_ps(a, b, 0x88)),
                            _mm512_castps_si512(_mm512_shuffle_ps(a, b, 0xDD)));
}

/* Tiles of up to this many registers reduce them one by one. */
#define SUM_ALONE 6

/* out[r * ostride + s] = sum of the lanes of acc[r * astride + s], r < R, s < S <= TS. */
INLINE void store_sums_ps(const int R, const int S, const __m512 *acc, int astride, float *out,
                          int ostride) {
    if (R * S <= SUM_ALONE) {
        UNROLL for (int r = 0; r < R; r++) UNROLL for (int s = 0; s < S; s++) out[r * ostride + s] =
            _mm512_reduce_add_ps(acc[r * astride + s]);
        return;
    }
    __m512 v[2 * 16];
    UNROLL for (int i = 0; i < 2 * 16; i++) v[i] =
        i < R * S ? acc[(i / S) * astride + i % S] : _mm512_setzero_ps();
    UNROLL for (int b = 0; b < R * S; b += 16) {
        float t[16];
        _mm512_storeu_ps(t, sum16_ps(v + b));
        UNROLL for (int i = 0; i < 16; i++) if (b + i < R * S)
            out[((b + i) / S) * ostride + (b + i) % S] = t[4 * (i % 4) + i / 4];
    }
}

/* A product's tiling, computed once so that no division runs per tile: balanced token blocks
 * (n >= 1 tokens in ceil(n / smax) blocks whose sizes differ by <= 1, the first `extra` ones
 * longer) and the prefetch slices of a full tile (`full` rows of rb bytes, `unit` bytes of each
 * consumed per step) and of a one-row tile. Rows are matrix rows, or 16-row INT4 panels. */
typedef struct {
    size_t nblk, base, extra;
    size_t ahead[2], stride[2], len[2]; /* [tile is full] */
} tiling_t;

INLINE tiling_t tiling_of(size_t n, size_t smax, size_t rb, size_t unit, size_t full) {
    tiling_t t;
    t.nblk = (n + smax - 1) / smax;
    t.base = n / t.nblk;
    t.extra = n % t.nblk;
    for (int i = 0; i < 2; i++) {
        const size_t R = i ? full : 1, tile = R * rb;
        t.ahead[i] = kern_pf_ahead(tile);
        t.stride[i] = tile / t.nblk;
        t.len[i] = (R * unit + t.nblk - 1) / t.nblk;
    }
    return t;
}

INLINE size_t tiling_len(const tiling_t *t, size_t k) {
    return t->base + (k < t->extra);
}

/* Prefetch slice of token block k for the tile at wr. */
INLINE pf_t tiling_pf(const tiling_t *t, const uint8_t *wr, int full, size_t k) {
    const pf_t pf = {wr + t->ahead[full] + k * t->stride[full], t->len[full]};
    return pf;
}

/* y[s * ldy + i] = lane 4 s + i of v for tokens s < ns and rows i < 4 set in `rows`: a tile's
 * sums after a 16-register transpose (lane 4 s + r), one 128-bit store per token. */
INLINE void store_token_rows(float *y, size_t ldy, __m512 v, int ns, __mmask8 rows) {
    const __m512i lanes = _mm512_setr_epi32(0, 1, 2, 3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0);
    UNROLL for (int s = 0; s < ns; s++)
        _mm_mask_storeu_ps(y + (size_t)s * ldy, rows,
                           _mm512_castps512_ps128(_mm512_permutexvar_ps(
                               _mm512_add_epi32(lanes, _mm512_set1_epi32(4 * s)), v)));
}

/* Where a single-scale tile's results go: y[s * ldy + i] = ((float)(isum - offset * xsum[s]) *
 * s_w[i]) * xscale[s] for its rows i (row scale s_w[i] at sw + i * rb) and tokens s. */
typedef struct {
    float *y;
    size_t ldy;
    const uint8_t *sw;
    size_t rb;
    int offset;
    const int32_t *xsum;
    const float *xscale;
} qout_t;

/* Lane 4 s + i = ((float)(sum of v[4 i + s] - offset * xsum[s0 + s]) * sw lane i) *
 * xscale[s0 + s] for tokens s < ns (v[4 i + s] zero for s >= ns): 4 rows x ns tokens of sums in
 * one transpose, scaled in vectors. */
INLINE __m512 scaled_sums(const __m512i *v, __m512 sw, int s0, int ns, const qout_t *o) {
    const __m512i per_token = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
    const __mmask8 m = (__mmask8)((1u << ns) - 1);
    const __m512i xs = _mm512_permutexvar_epi32(
        per_token, _mm512_castsi128_si512(_mm_maskz_loadu_epi32(m, o->xsum + s0)));
    const __m512 xsc = _mm512_permutexvar_ps(
        per_token, _mm512_castps128_ps512(_mm_maskz_loadu_ps(m, o->xscale + s0)));
    const __m512i d =
        _mm512_sub_epi32(sum16_epi32(v), _mm512_mullo_epi32(xs, _mm512_set1_epi32(o->offset)));
    return _mm512_mul_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(d), sw), xsc);
}

/* Stores the R x S sums of acc[r * astride + s] (R <= 4; the other rows are not read). The
 * tile reduces 4 tokens x 4 rows per transpose, lane 4 s + r, so each token's rows are one
 * 128-bit store after vector scaling (per tile of 1024-weight rows the scalar version cost
 * about half as much as the products); rows past R are zero in the transpose and masked off. */
INLINE void single_scale_store(const int R, const int S, const __m512i *acc, int astride,
                               const qout_t *o) {
    float swr[TR];
    UNROLL for (int i = 0; i < TR; i++) swr[i] = i < R ? kern_load_f32(o->sw + i * o->rb) : 0.0f;
    const __m128 sw4 = _mm_loadu_ps(swr);
    const __mmask8 rows = (__mmask8)((1u << R) - 1);
    if (S == 1) {
        /* One token: 4 registers reduce in ~13 operations (the 16-register transpose costs
         * ~45, as much as the loop of a 1024-weight panel at this batch). Lane i of the last
         * 128 bits is the sum of acc[i * astride]. */
        const __m512i z = _mm512_setzero_si512();
        const __m512i a0 = acc[0], a1 = R > 1 ? acc[astride] : z, a2 = R > 2 ? acc[2 * astride] : z,
                      a3 = R > 3 ? acc[3 * astride] : z;
        const __m512i t0 =
            _mm512_add_epi32(_mm512_unpacklo_epi32(a0, a1), _mm512_unpackhi_epi32(a0, a1));
        const __m512i t1 =
            _mm512_add_epi32(_mm512_unpacklo_epi32(a2, a3), _mm512_unpackhi_epi32(a2, a3));
        const __m512i u =
            _mm512_add_epi32(_mm512_unpacklo_epi64(t0, t1), _mm512_unpackhi_epi64(t0, t1));
        const __m256i v =
            _mm256_add_epi32(_mm512_castsi512_si256(u), _mm512_extracti64x4_epi64(u, 1));
        const __m128i sum =
            _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
        const __m128i d = _mm_sub_epi32(sum, _mm_set1_epi32(o->offset * o->xsum[0]));
        _mm_mask_storeu_ps(
            o->y, rows, _mm_mul_ps(_mm_mul_ps(_mm_cvtepi32_ps(d), sw4), _mm_set1_ps(o->xscale[0])));
        return;
    }
    const __m512 sw = _mm512_broadcast_f32x4(sw4);
    UNROLL for (int s0 = 0; s0 < S; s0 += 4) {
        const int ns = S - s0 < 4 ? S - s0 : 4;
        __m512i v[16];
        UNROLL for (int j = 0; j < 16; j++) v[j] =
            j / 4 < R && j % 4 < ns ? acc[(j / 4) * astride + s0 + j % 4] : _mm512_setzero_si512();
        store_token_rows(o->y + (size_t)s0 * o->ldy, o->ldy, scaled_sums(v, sw, s0, ns, o), ns,
                         rows);
    }
}

/* ---- ternary x int8 ---- */

#define TERN_STEP(K)                                                                               \
    do {                                                                                           \
        __m512i wk[TR];                                                                            \
        UNROLL for (int r = 0; r < R; r++) wk[r] =                                                 \
            _mm512_and_si512(_mm512_srli_epi16(raw[r], 2 * (K)), m3);                              \
        UNROLL for (int s = 0; s < S; s++) {                                                       \
            const __m512i xv = _mm512_load_si512((const void *)(xb + s * xs + 64 * (K)));          \
            UNROLL for (int r = 0; r < R; r++) acc[r][s] = dpbusd(acc[r][s], wk[r], xv);           \
        }                                                                                          \
    } while (0)

/* One token (batch 1): no activation reuse to amortise the unpacking over, so skip the shift.
 * Field k of a byte masked in place is code << 2k; vpdpbusd of it sums 4^k times the field's
 * products (at most 2 << 6 = 128, still a u8), so each k gets its own accumulator and is
 * divided back exactly at the end. One fused load+and and one vpdpbusd per 64 weights. */
INLINE void tern_tile_s1(const int R, const uint8_t *w, size_t rb, size_t nb, const int8_t *x,
                         const pf_t *pf, const qout_t *o) {
    __m512i acc[TR][4];
    UNROLL for (int r = 0; r < R; r++) UNROLL for (int k = 0; k < 4; k++) acc[r][k] =
        _mm512_setzero_si512();
    const __m512i mk[4] = {_mm512_set1_epi8(0x03), _mm512_set1_epi8(0x0c), _mm512_set1_epi8(0x30),
                           _mm512_set1_epi8((char)0xc0)};
    for (size_t b = 0; b < nb; b++) {
        prefetch_step(pf, b);
        UNROLL for (int k = 0; k < 4; k++) {
            const __m512i xv =
                _mm512_load_si512((const void *)(x + b * QTYPE_TERNARY_BLOCK + 64 * k));
            UNROLL for (int r = 0; r < R; r++) acc[r][k] = dpbusd(
                acc[r][k],
                _mm512_and_si512(_mm512_loadu_si512((const void *)(w + r * rb + b * 64)), mk[k]),
                xv);
        }
    }
    /* Every lane of acc[r][k] is 4^k times an integer: shift it back exactly, then one sum per
     * row (rows of 256-1024 weights run only 1-4 blocks, so the tile's end costs as much as
     * its loop). */
    __m512i tot[TR];
    UNROLL for (int r = 0; r < R; r++) tot[r] = _mm512_add_epi32(
        _mm512_add_epi32(acc[r][0], _mm512_srai_epi32(acc[r][1], 2)),
        _mm512_add_epi32(_mm512_srai_epi32(acc[r][2], 4), _mm512_srai_epi32(acc[r][3], 6)));
    single_scale_store(R, 1, tot, 1, o);
}

/* ---- ternary x int8, row-interleaved (kernels.h: ternx) ----
 * One 64-byte load per chunk holds 64 columns of the panel's 4 rows, row r in bit field r.
 * Masked in place, field r is code << 2r (<= 32 for r <= 2): one `and` per row and chunk
 * unpacks it for all S tokens, and row r's accumulator sums 4^r times its products, divided
 * back exactly at the end. Row 3 needs no `and`: the whole byte (<= 170) goes to a fourth
 * accumulator, from which rows 0-2 are subtracted. Per chunk: 1 weight load, 3 `and`, S
 * activation loads, 4 S vpdpbusd. Registers at S = 6: 24 accumulators, the byte, 3 unpacked
 * rows, 3 masks and an activation. */
INLINE void ternx_tile(const int S, const uint8_t *panel, size_t nc, const int8_t *x, size_t xs,
                       const pf_t *pf, int rows, const qout_t *o) {
    /* Few tokens give few independent vpdpbusd chains per chunk: A sets of accumulators take
     * turns by chunk (nc is a multiple of 4), so the loop is not bound by their latency. */
    const int A = S == 1 ? 4 : S == 2 ? 2 : 1;
    __m512i acc[4][TR][TS];
    UNROLL for (int a = 0; a < A; a++) UNROLL for (int r = 0; r < TR; r++)
        UNROLL for (int s = 0; s < S; s++) acc[a][r][s] = _mm512_setzero_si512();
    const __m512i m0 = _mm512_set1_epi8(0x03), m1 = _mm512_set1_epi8(0x0c),
                  m2 = _mm512_set1_epi8(0x30);
    for (size_t c0 = 0; c0 < nc; c0 += A) {
        UNROLL for (int a = 0; a < A; a++) {
            const size_t c = c0 + (size_t)a;
            if (c % 4 == 0)
                prefetch_step(pf, c / 4);
            const __m512i raw = _mm512_loadu_si512((const void *)(panel + 64 * c));
            const __m512i w0 = _mm512_and_si512(raw, m0), w1 = _mm512_and_si512(raw, m1),
                          w2 = _mm512_and_si512(raw, m2);
            UNROLL for (int s = 0; s < S; s++) {
                const __m512i xv = _mm512_load_si512((const void *)(x + s * xs + 64 * c));
                acc[a][0][s] = dpbusd(acc[a][0][s], w0, xv);
                acc[a][1][s] = dpbusd(acc[a][1][s], w1, xv);
                acc[a][2][s] = dpbusd(acc[a][2][s], w2, xv);
                acc[a][3][s] = dpbusd(acc[a][3][s], raw, xv);
            }
        }
    }
    UNROLL for (int a = 1; a < A; a++) UNROLL for (int r = 0; r < TR; r++)
        UNROLL for (int s = 0; s < S; s++) acc[0][r][s] =
            _mm512_add_epi32(acc[0][r][s], acc[a][r][s]);
    UNROLL for (int s = 0; s < S; s++) {
        const __m512i low =
            _mm512_add_epi32(_mm512_add_epi32(acc[0][0][s], acc[0][1][s]), acc[0][2][s]);
        acc[0][3][s] = _mm512_srai_epi32(_mm512_sub_epi32(acc[0][3][s], low), 6);
        acc[0][1][s] = _mm512_srai_epi32(acc[0][1][s], 2);
        acc[0][2][s] = _mm512_srai_epi32(acc[0][2][s], 4);
    }
    /* A panel cut by r1 stores its first `rows` rows (a constant R for the usual full panel). */
    if (rows == TR)
        single_scale_store(TR, S, (const __m512i *)acc[0], TS, o);
    else
        single_scale_store(rows, S, (const __m512i *)acc[0], TS, o);
}

/* np consecutive panels (pb bytes apart) for one token block of every token (n <= TS), rows
 * r0 + 4 i of y: one call for the whole range, so a short row's panel costs no call and no
 * set-up (at in = 256 and one token the call cost as much as the panel's loop). */
INLINE void ternx_panels(const int S, const uint8_t *panel, size_t pb, size_t np, size_t nc,
                         const int8_t *x, size_t xs, const pf_t *pf0, int last_rows,
                         const qout_t *o0) {
    pf_t pf = *pf0;
    qout_t o = *o0;
    for (size_t p = 0; p < np; p++) {
        o.sw = panel + nc * 64;
        ternx_tile(S, panel, nc, x, xs, &pf, p + 1 == np ? last_rows : TR, &o);
        panel += pb;
        pf.p += pb;
        o.y += TR;
    }
}

/* One panel x one token block (several blocks: each panel goes through all of them while its
 * weights are in L1). */
typedef void (*ttile_fn)(const uint8_t *, size_t, const int8_t *, size_t, const pf_t *, int,
                         const qout_t *);
typedef void (*tpanels_fn)(const uint8_t *, size_t, size_t, size_t, const int8_t *, size_t,
                           const pf_t *, int, const qout_t *);
#define DEF_TTILE(S)                                                                               \
    static void ternx_tile_##S(const uint8_t *panel, size_t nc, const int8_t *x, size_t xs,        \
                               const pf_t *pf, int rows, const qout_t *o) {                        \
        ternx_tile(S, panel, nc, x, xs, pf, rows, o);                                              \
    }                                                                                              \
    static void ternx_panels_##S(const uint8_t *panel, size_t pb, size_t np, size_t nc,            \
                                 const int8_t *x, size_t xs, const pf_t *pf, int last_rows,        \
                                 const qout_t *o) {                                                \
        ternx_panels(S, panel, pb, np, nc, x, xs, pf, last_rows, o);                               \
    }
DEF_TTILE(1)
DEF_TTILE(2)
DEF_TTILE(3)
DEF_TTILE(4)
DEF_TTILE(5)
DEF_TTILE(6)
static const ttile_fn ternx_tile_table[TS] = {ternx_tile_1, ternx_tile_2, ternx_tile_3,
                                              ternx_tile_4, ternx_tile_5, ternx_tile_6};
static const tpanels_fn ternx_panels_table[TS] = {ternx_panels_1, ternx_panels_2, ternx_panels_3,
                                                  ternx_panels_4, ternx_panels_5, ternx_panels_6};

/* Panels of [r0, r1) in order, each through balanced token blocks of <= TS tokens; while a
 * panel computes, its token blocks prefetch the panel at least KERN_PF_BYTES ahead, one slice
 * each per 4 chunks (as the row-major tiles per 256-weight block). */
static void matmul_ternx(const void *w, size_t in, const kern_act_t *act, float *y, size_t ldy,
                         size_t r0, size_t r1) {
    Q_ASSERT(in == act->in && in <= KERN_MAX_IN && r0 % KERN_TERNX_ROWS == 0);
    const size_t n = act->n;
    if (n == 0 || r0 >= r1)
        return;
    const size_t nc = kern_ternx_chunks(in), pb = kern_ternx_panel_bytes(in);
    const size_t np = (r1 - r0 + KERN_TERNX_ROWS - 1) / KERN_TERNX_ROWS;
    const int last_rows = (int)(r1 - r0 - (np - 1) * KERN_TERNX_ROWS);
    const tiling_t tl = tiling_of(n, TS, pb, 256, 1);
    const uint8_t *first = (const uint8_t *)w + r0 / KERN_TERNX_ROWS * pb;
    if (tl.nblk == 1) {
        const pf_t pf = tiling_pf(&tl, first, 1, 0);
        const qout_t o = {y + r0, ldy, NULL, 4, 1, act->sum, act->scale};
        ternx_panels_table[n - 1](first, pb, np, nc, act->q, act->stride, &pf, last_rows, &o);
        return;
    }
    for (size_t p = 0; p < np; p++) {
        const uint8_t *panel = first + p * pb;
        for (size_t s0 = 0, k = 0; s0 < n; k++) {
            const size_t S = tiling_len(&tl, k);
            const pf_t pf = tiling_pf(&tl, panel, 1, k);
            const qout_t o = {y + s0 * ldy + r0 + KERN_TERNX_ROWS * p,
                              ldy,
                              panel + nc * 64,
                              4,
                              1,
                              act->sum + s0,
                              act->scale + s0};
            ternx_tile_table[S - 1](panel, nc, act->q + s0 * act->stride, act->stride, &pf,
                                    p + 1 == np ? last_rows : TR, &o);
            s0 += S;
        }
    }
}

INLINE void tern_tile(const int R, const int S, const uint8_t *w, size_t rb, size_t nb,
                      const int8_t *x, size_t xs, const pf_t *pf, const qout_t *o) {
    if (S == 1) {
        tern_tile_s1(R, w, rb, nb, x, pf, o);
        return;
    }
    __m512i acc[TR][TS];
    UNROLL for (int r = 0; r < R; r++) UNROLL for (int s = 0; s < S; s++) acc[r][s] =
        _mm512_setzero_si512();
    const __m512i m3 = _mm512_set1_epi8(3);
    for (size_t b = 0; b < nb; b++) {
        prefetch_step(pf, b);
        const int8_t *xb = x + b * QTYPE_TERNARY_BLOCK;
        __m512i raw[TR];
        UNROLL for (int r = 0; r < R; r++) raw[r] =
            _mm512_loadu_si512((const void *)(w + r * rb + b * 64));
        TERN_STEP(0);
        TERN_STEP(1);
        TERN_STEP(2);
        TERN_STEP(3);
    }
    single_scale_store(R, S, (const __m512i *)acc, TS, o);
}

typedef void (*itile_fn)(const uint8_t *, size_t, size_t, const int8_t *, size_t, const pf_t *,
                         const qout_t *);

/* Instances with constant R and S, so the accumulators live in registers. */
#define DEF_TILE(name, R, S)                                                                       \
    static void name##_##R##_##S(const uint8_t *w, size_t rb, size_t nb, const int8_t *x,          \
                                 size_t xs, const pf_t *pf, const qout_t *o) {                     \
        name(R, S, w, rb, nb, x, xs, pf, o);                                                       \
    }
#define DEF_TILES(name)                                                                            \
    DEF_TILE(name, 4, 1)                                                                           \
    DEF_TILE(name, 4, 2)                                                                           \
    DEF_TILE(name, 4, 3)                                                                           \
    DEF_TILE(name, 4, 4)                                                                           \
    DEF_TILE(name, 4, 5)                                                                           \
    DEF_TILE(name, 4, 6)                                                                           \
    DEF_TILE(name, 1, 1)                                                                           \
    DEF_TILE(name, 1, 2)                                                                           \
    DEF_TILE(name, 1, 3)                                                                           \
    DEF_TILE(name, 1, 4)                                                                           \
    DEF_TILE(name, 1, 5)                                                                           \
    DEF_TILE(name, 1, 6)                                                                           \
    static const itile_fn name##_table[2][TS] = {                                                  \
        {name##_1_1, name##_1_2, name##_1_3, name##_1_4, name##_1_5, name##_1_6},                  \
        {name##_4_1, name##_4_2, name##_4_3, name##_4_4, name##_4_5, name##_4_6}};

DEF_TILES(tern_tile)

/* Shared driver of the single-scale types: y = ((float)(isum - offset * sum_x) * s_w) * s_x,
 * with isum the tile's sum of stored (offset) codes times activation codes. Full tiles are FR
 * rows x up to smax tokens (full[S - 1]); the last < FR rows of the range go one by one
 * (one_row[S - 1]). */
static void matmul_single_scale(const itile_fn *full, const itile_fn *one_row, int FR, size_t smax,
                                qtype_t type, int offset, const void *w, size_t in,
                                const kern_act_t *act, float *y, size_t ldy, size_t r0, size_t r1) {
    Q_ASSERT(in == act->in && in <= KERN_MAX_IN);
    const qtype_traits_t *t = qtype_traits(type);
    const size_t rb = qtype_row_bytes(type, in), nb = (in + t->block - 1) / t->block;
    const size_t cb = nb * t->block_bytes, n = act->n;
    if (n == 0)
        return;
    const tiling_t tl = tiling_of(n, smax, rb, 64, (size_t)FR);
    const uint8_t *wbase = w;
    for (size_t r = r0; r < r1;) {
        const int R = r1 - r >= (size_t)FR ? FR : 1;
        const uint8_t *wr = wbase + r * rb;
        for (size_t s0 = 0, k = 0; s0 < n; k++) {
            const size_t S = tiling_len(&tl, k);
            const pf_t pf = tiling_pf(&tl, wr, R == FR, k);
            const qout_t o = {y + s0 * ldy + r, ldy,           wr + cb,        rb,
                              offset,           act->sum + s0, act->scale + s0};
            (R == FR ? full : one_row)[S - 1](wr, rb, nb, act->q + s0 * act->stride, act->stride,
                                              &pf, &o);
            s0 += S;
        }
        r += (size_t)R;
    }
}

static void matmul_ternary(const void *w, size_t in, const kern_act_t *act, float *y, size_t ldy,
                           size_t r0, size_t r1) {
    matmul_single_scale(tern_tile_table[1], tern_tile_table[0], TR, TS, QTYPE_TERNARY, 1, w, in,
                        act, y, ldy, r0, r1);
}

/* ---- INT8 x int8 ----
 * Tiles of 4 rows x <= TS tokens as the ternary ones, except at n = 7 and 8: there one block of
 * 3 rows x n tokens (24 accumulators) replaces two blocks of 4 x 4, so each weight is loaded
 * once and one prefetch slice streams per tile; the block's activations (8 x in bytes, 32 KiB
 * at in = 4096) stay in L1 across tiles. 4096 x 4096 from DRAM, 2 threads: n = 8 went from
 * 250-278 to 354-389 GMAC/s (0.60-0.72 -> 0.76-0.89 of the bandwidth roofline, by that run's
 * DRAM probe). With more tokens, two or more 3 x 8 blocks read their activations from L2 and
 * ran slower than 4 x 6 (n = 16: 0.42 vs 0.54); so did 6 x 4 tiles at n = 32 (0.52 vs 0.60),
 * although they ran faster with the weights in L2. */

#define TS_INT8 8   /* tokens per tile, 3-row tiles */
#define TR_INT8_8 3 /* rows per tile at n = 7, 8 */

INLINE void int8_tile(const int R, const int S, const uint8_t *w, size_t rb, size_t nb,
                      const int8_t *x, size_t xs, const pf_t *pf, const qout_t *o) {
    __m512i acc[TR][TS_INT8];
    UNROLL for (int r = 0; r < R; r++) UNROLL for (int s = 0; s < S; s++) acc[r][s] =
        _mm512_setzero_si512();
    for (size_t b = 0; b < nb; b++) {
        prefetch_step(pf, b);
        __m512i wv[TR];
        UNROLL for (int r = 0; r < R; r++) wv[r] =
            _mm512_loadu_si512((const void *)(w + r * rb + b * 64));
        UNROLL for (int s = 0; s < S; s++) {
            const __m512i xv = _mm512_load_si512((const void *)(x + s * xs + b * 64));
            UNROLL for (int r = 0; r < R; r++) acc[r][s] = dpbusd(acc[r][s], wv[r], xv);
        }
    }
    single_scale_store(R, S, (const __m512i *)acc, TS_INT8, o);
}

#define DEF_I8TILE(R, S)                                                                           \
    static void int8_tile_##R##_##S(const uint8_t *w, size_t rb, size_t nb, const int8_t *x,       \
                                    size_t xs, const pf_t *pf, const qout_t *o) {                  \
        int8_tile(R, S, w, rb, nb, x, xs, pf, o);                                                  \
    }
DEF_I8TILE(4, 1)
DEF_I8TILE(4, 2)
DEF_I8TILE(4, 3)
DEF_I8TILE(4, 4)
DEF_I8TILE(4, 5)
DEF_I8TILE(4, 6)
DEF_I8TILE(3, 7)
DEF_I8TILE(3, 8)
DEF_I8TILE(1, 1)
DEF_I8TILE(1, 2)
DEF_I8TILE(1, 3)
DEF_I8TILE(1, 4)
DEF_I8TILE(1, 5)
DEF_I8TILE(1, 6)
DEF_I8TILE(1, 7)
DEF_I8TILE(1, 8)
/* [full tile][S - 1]: full tiles are 4 x S (S <= TS) or 3 x S (S = 7, 8). */
static const itile_fn int8_tile_table[2][TS_INT8] = {
    {int8_tile_1_1, int8_tile_1_2, int8_tile_1_3, int8_tile_1_4, int8_tile_1_5, int8_tile_1_6,
     int8_tile_1_7, int8_tile_1_8},
    {int8_tile_4_1, int8_tile_4_2, int8_tile_4_3, int8_tile_4_4, int8_tile_4_5, int8_tile_4_6,
     int8_tile_3_7, int8_tile_3_8}};

static void matmul_int8(const void *w, size_t in, const kern_act_t *act, float *y, size_t ldy,
                        size_t r0, size_t r1) {
    const int one_block = act->n > TS && act->n <= TS_INT8;
    matmul_single_scale(int8_tile_table[1], int8_tile_table[0], one_block ? TR_INT8_8 : TR,
                        one_block ? TS_INT8 : TS, QTYPE_INT8, QTYPE_INT8_OFFSET, w, in, act, y, ldy,
                        r0, r1);
}

/* ---- INT4 x int8 ----
 * A 64-byte block holds 128 nibbles: low nibbles = weights 0..63 (groups 0, 1), high nibbles =
 * weights 64..127 (groups 2, 3). One vpdpbusd of 64 weights gives 16 dword lanes, lanes 0-7
 * in the first group and 8-15 in the second, so they are scaled by a vector holding each
 * group's FP16 scale 8 times and accumulated in float. The stored nibble is code + 8: the
 * 8 * sum_g d_g * gsum_g correction is applied once per row and token at the end. */

#define INT4_HALF(HI)                                                                              \
    do {                                                                                           \
        __m512i wv[TR];                                                                            \
        __m512 sc[TR];                                                                             \
        UNROLL for (int r = 0; r < R; r++) {                                                       \
            const __m512i raw = _mm512_loadu_si512((const void *)(w + r * rb + b * 64));           \
            wv[r] = _mm512_and_si512(HI ? _mm512_srli_epi16(raw, 4) : raw, m4);                    \
            const __m128 d4 =                                                                      \
                _mm_cvtph_ps(_mm_loadl_epi64((const __m128i *)(w + r * rb + cb + b * 8)));         \
            sc[r] = _mm512_permutexvar_ps(HI ? idx_hi : idx_lo, _mm512_castps128_ps512(d4));       \
        }                                                                                          \
        UNROLL for (int s = 0; s < S; s++) {                                                       \
            const __m512i xv =                                                                     \
                _mm512_load_si512((const void *)(x + s * xs + b * QTYPE_INT4_BLOCK + 64 * HI));    \
            UNROLL for (int r = 0; r < R; r++) {                                                   \
                const __m512i d = dpbusd(_mm512_setzero_si512(), wv[r], xv);                       \
                acc[r][s] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), sc[r], acc[r][s]);              \
            }                                                                                      \
        }                                                                                          \
    } while (0)

INLINE void int4_tile(const int R, const int S, const uint8_t *w, size_t rb, size_t nb,
                      const int8_t *x, size_t xs, const pf_t *pf, float *out) {
    __m512 acc[TR][TS_INT4];
    UNROLL for (int r = 0; r < R; r++) UNROLL for (int s = 0; s < S; s++) acc[r][s] =
        _mm512_setzero_ps();
    const __m512i m4 = _mm512_set1_epi8(15);
    const __m512i idx_lo = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
    const __m512i idx_hi = _mm512_set_epi32(3, 3, 3, 3, 3, 3, 3, 3, 2, 2, 2, 2, 2, 2, 2, 2);
    const size_t cb = nb * 64;
    for (size_t b = 0; b < nb; b++) {
        prefetch_step(pf, b);
        INT4_HALF(0);
        INT4_HALF(1);
    }
    store_sums_ps(R, S, (const __m512 *)acc, TS_INT4, out, TS_INT4);
}

typedef void (*ftile_fn)(const uint8_t *, size_t, size_t, const int8_t *, size_t, const pf_t *,
                         float *);
#define DEF_FTILE(R, S)                                                                            \
    static void int4_tile_##R##_##S(const uint8_t *w, size_t rb, size_t nb, const int8_t *x,       \
                                    size_t xs, const pf_t *pf, float *out) {                       \
        int4_tile(R, S, w, rb, nb, x, xs, pf, out);                                                \
    }
DEF_FTILE(4, 1)
DEF_FTILE(4, 2)
DEF_FTILE(4, 3)
DEF_FTILE(4, 4)
DEF_FTILE(1, 1)
DEF_FTILE(1, 2)
DEF_FTILE(1, 3)
DEF_FTILE(1, 4)
static const ftile_fn int4_tile_table[2][TS_INT4] = {
    {int4_tile_1_1, int4_tile_1_2, int4_tile_1_3, int4_tile_1_4},
    {int4_tile_4_1, int4_tile_4_2, int4_tile_4_3, int4_tile_4_4}};

/* sum over the ng groups of a row of scale_g * gsum_g. */
static float int4_correction(const uint8_t *scales, const float *gsum, size_t ng) {
    __m512 acc = _mm512_setzero_ps();
    for (size_t g = 0; g < ng; g += 16) {
        const __mmask16 m = g + 16 <= ng ? (__mmask16)0xffff : (__mmask16)((1u << (ng - g)) - 1);
        const __m512 d = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, scales + 2 * g));
        acc = _mm512_fmadd_ps(d, _mm512_maskz_loadu_ps(m, gsum + g), acc);
    }
    return _mm512_reduce_add_ps(acc);
}

static void matmul_int4(const void *w, size_t in, const kern_act_t *act, float *y, size_t ldy,
                        size_t r0, size_t r1) {
    Q_ASSERT(in == act->in && in <= KERN_MAX_IN);
    const size_t rb = qtype_row_bytes(QTYPE_INT4, in);
    const size_t nb = (in + QTYPE_INT4_BLOCK - 1) / QTYPE_INT4_BLOCK, ng = 4 * nb;
    const size_t gstride = act->stride / QTYPE_INT4_GROUP, n = act->n;
    if (n == 0)
        return;
    const tiling_t tl = tiling_of(n, TS_INT4, rb, 72, TR);
    const uint8_t *wbase = w;
    float part[TR * TS_INT4];
    for (size_t r = r0; r < r1;) {
        const int R = r1 - r >= TR ? TR : 1;
        const uint8_t *wr = wbase + r * rb;
        for (size_t s0 = 0, k = 0; s0 < n; k++) {
            const size_t S = tiling_len(&tl, k);
            const pf_t pf = tiling_pf(&tl, wr, R == TR, k);
            int4_tile_table[R == TR][S - 1](wr, rb, nb, act->q + s0 * act->stride, act->stride, &pf,
                                            part);
            for (int i = 0; i < R; i++)
                for (size_t s = 0; s < S; s++) {
                    const float corr =
                        int4_correction(wr + i * rb + nb * 64, act->gsum + (s0 + s) * gstride, ng);
                    y[(s0 + s) * ldy + r + i] =
                        (part[i * TS_INT4 + s] - (float)QTYPE_INT4_OFFSET * corr) *
                        act->scale[s0 + s];
                }
            s0 += S;
        }
        r += (size_t)R;
    }
}

/* ---- INT4 x int8, row-interleaved (kernels.h: int4x) ----
 * A tile is P = 2 adjacent 16-row panels (1 for a last odd panel) x S <= TS_INT4X tokens. Per
 * half group (16 weights), each panel's 4 loads of 64 bytes unpack (and, or shift + and) into 4
 * registers of 16 rows x 4 consecutive weights, shared by the S tokens. Each of a token's 4
 * activation dwords of the half is broadcast once (one load) and feeds one vpdpbusd per panel,
 * token after token, so the S x P int32 sums of the group are independent chains stepped in
 * turn (one token's 8-step chain after another left the vpdpbusd latency exposed: ~6% slower
 * cache-hot). The two halves complete the group's exact int32 sums of 16 rows, then one
 * conversion and one FMA with the 16 rows' group scales (one vcvtph2ps per group and panel).
 * Each int32 sum starts at -8 * (the group's activation sum), which removes the +8 of the
 * stored nibbles exactly. The FMAs share the vpdpbusd's ports (cache-hot, the tile without
 * them ran ~9% faster; the conversions cost nothing measurable), and one per 8 vpdpbusd is
 * inherent to a scale per 32 weights.
 * Why two panels: loads, not vector operations, bound these tiles (a vpdpbusd with a broadcast
 * memory operand alone runs at ~0.88 of the register form here; in this tile, embedded
 * broadcasts instead of one broadcast per two vpdpbusd were ~10% slower). One panel x 16
 * tokens, a broadcast per vpdpbusd, reached ~0.5 of the VNNI rate (16 activation rows 4 KiB
 * apart also share L1 sets); two panels share each broadcast: ~0.84 with the weights in L2.
 * Registers: 8 weights, 2 S int32 sums, 2 S float accumulators, the broadcast and the nibble
 * mask; the scales load after the weights are dead. */

#define TS_INT4X 4     /* tokens per tile */
#define INT4X_CHUNK 32 /* groups whose -8 * gsum a tile converts to int32 at once */

/* Prefetches the lines that start in part e of `parts` equal parts of step `step` of pf (the
 * slice prefetch_step would issue at once): a few lines between the vpdpbusd of each half
 * group instead of 18 (batch 8) at the start of a block. DRAM-streamed 4096 x 4096, one
 * thread: 200 -> 260 GMAC/s at batch 8, 280 -> 320 at 32 (per group: 255, 310; cache-hot
 * unchanged). */
INLINE void prefetch_part(const pf_t *pf, size_t step, size_t e, size_t parts) {
    const uintptr_t base = (uintptr_t)pf->p + step * pf->len;
    const uintptr_t end = base + (e + 1) * pf->len / parts;
    for (uintptr_t q = (base + e * pf->len / parts + 63) & ~(uintptr_t)63; q < end; q += 64)
        _mm_prefetch((const char *)q, KERN_PF_HINT);
}

/* acc[s * P + p] (s < S, p < P) = sum over the ng groups of d_g (panel p's 16 rows) * int32 sum
 * of group g for token s (activation rows x + s * xs, group sums gsum + s * gstride); panel p
 * at panel + p * pb. */
INLINE void int4x_tile(const int P, const int S, const uint8_t *panel, size_t pb, size_t ng,
                       const int8_t *x, size_t xs, const float *gsum, size_t gstride,
                       const pf_t *pf, __m512 *out) {
    __m512 acc[TS_INT4X * 2];
    UNROLL for (int i = 0; i < S * P; i++) acc[i] = _mm512_setzero_ps();
    const __m512i m4 = _mm512_set1_epi8(15);
    int32_t bias[INT4X_CHUNK * TS_INT4X];
    for (size_t g0 = 0; g0 < ng; g0 += INT4X_CHUNK) {
        const size_t gn = ng - g0 < INT4X_CHUNK ? ng - g0 : INT4X_CHUNK;
        UNROLL for (int s = 0; s < S; s++) for (size_t g = 0; g < gn; g += 16) {
            const __mmask16 m =
                gn - g >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (gn - g)) - 1);
            const __m512 v = _mm512_maskz_loadu_ps(m, gsum + s * gstride + g0 + g);
            _mm512_storeu_si512(
                (void *)(bias + s * INT4X_CHUNK + g),
                _mm512_cvtps_epi32(_mm512_mul_ps(v, _mm512_set1_ps(-QTYPE_INT4_OFFSET))));
        }
        for (size_t g = 0; g < gn; g++) {
            const size_t gg = g0 + g, off = gg / 4 * KERN_INT4X_BLOCK_BYTES;
            const uint8_t *codes = panel + off + gg % 4 * 256;
            __m512i t[TS_INT4X][2];
            UNROLL for (int s = 0; s < S; s++) UNROLL for (int p = 0; p < P; p++) t[s][p] =
                _mm512_set1_epi32(bias[s * INT4X_CHUNK + g]);
            UNROLL for (int h = 0; h < 2; h++) {
                prefetch_part(pf, gg / 4, gg % 4 * 2 + (size_t)h, 8);
                __m512i wv[2][4];
                UNROLL for (int p = 0; p < P; p++) UNROLL for (int l = 0; l < 4; l++) {
                    const __m512i raw = _mm512_loadu_si512((const void *)(codes + p * pb + 64 * l));
                    wv[p][l] = _mm512_and_si512(h ? _mm512_srli_epi16(raw, 4) : raw, m4);
                }
                UNROLL for (int l = 0; l < 4; l++) UNROLL for (int s = 0; s < S; s++) {
                    int32_t xd;
                    memcpy(&xd, x + s * xs + gg * QTYPE_INT4_GROUP + 16 * h + 4 * l, 4);
                    const __m512i xb = _mm512_set1_epi32(xd);
                    UNROLL for (int p = 0; p < P; p++) t[s][p] = dpbusd(t[s][p], wv[p][l], xb);
                }
            }
            UNROLL for (int p = 0; p < P; p++) {
                const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256(
                    (const __m256i *)(panel + p * pb + off + 1024 + 32 * (gg % 4))));
                UNROLL for (int s = 0; s < S; s++) acc[s * P + p] =
                    _mm512_fmadd_ps(_mm512_cvtepi32_ps(t[s][p]), d, acc[s * P + p]);
            }
        }
    }
    UNROLL for (int i = 0; i < S * P; i++) out[i] = acc[i];
}

typedef void (*xtile_fn)(const uint8_t *, size_t, size_t, const int8_t *, size_t, const float *,
                         size_t, const pf_t *, __m512 *);
#define DEF_XTILE(P, S)                                                                            \
    static void int4x_tile_##P##_##S(const uint8_t *panel, size_t pb, size_t ng, const int8_t *x,  \
                                     size_t xs, const float *gsum, size_t gstride, const pf_t *pf, \
                                     __m512 *out) {                                                \
        int4x_tile(P, S, panel, pb, ng, x, xs, gsum, gstride, pf, out);                            \
    }
DEF_XTILE(1, 1)
DEF_XTILE(1, 2)
DEF_XTILE(1, 3)
DEF_XTILE(1, 4)
DEF_XTILE(2, 1)
DEF_XTILE(2, 2)
DEF_XTILE(2, 3)
DEF_XTILE(2, 4)
static const xtile_fn int4x_tile_table[2][TS_INT4X] = {
    {int4x_tile_1_1, int4x_tile_1_2, int4x_tile_1_3, int4x_tile_1_4},
    {int4x_tile_2_1, int4x_tile_2_2, int4x_tile_2_3, int4x_tile_2_4}};

/* Panel pairs of [r0, r1) in order, each through balanced token blocks of <= TS_INT4X tokens;
 * while a pair computes, its token blocks prefetch the pair at least KERN_PF_BYTES ahead, one
 * slice each (as the row-major tiles). */
static void matmul_int4x(const void *w, size_t in, const kern_act_t *act, float *y, size_t ldy,
                         size_t r0, size_t r1) {
    Q_ASSERT(in == act->in && in <= KERN_MAX_IN && r0 % KERN_INT4X_ROWS == 0);
    const size_t n = act->n;
    if (n == 0 || r0 >= r1)
        return;
    const size_t nb = (in + QTYPE_INT4_BLOCK - 1) / QTYPE_INT4_BLOCK;
    const size_t ng = (in + QTYPE_INT4_GROUP - 1) / QTYPE_INT4_GROUP;
    const size_t pb = nb * KERN_INT4X_BLOCK_BYTES, gstride = act->stride / QTYPE_INT4_GROUP;
    const tiling_t tl = tiling_of(n, TS_INT4X, pb, KERN_INT4X_BLOCK_BYTES, 2);
    for (size_t r = r0; r < r1;) {
        const int P = r1 - r > KERN_INT4X_ROWS ? 2 : 1;
        const uint8_t *panel = (const uint8_t *)w + r / KERN_INT4X_ROWS * pb;
        for (size_t s0 = 0, k = 0; s0 < n; k++) {
            const size_t S = tiling_len(&tl, k);
            const pf_t pf = tiling_pf(&tl, panel, P == 2, k);
            __m512 acc[TS_INT4X * 2];
            int4x_tile_table[P - 1][S - 1](panel, pb, ng, act->q + s0 * act->stride, act->stride,
                                           act->gsum + s0 * gstride, gstride, &pf, acc);
            for (size_t s = 0; s < S; s++) {
                const __m512 sx = _mm512_set1_ps(act->scale[s0 + s]);
                for (int p = 0; p < P; p++) {
                    const size_t rp = r + (size_t)p * KERN_INT4X_ROWS;
                    const __mmask16 m = r1 - rp >= KERN_INT4X_ROWS
                                            ? (__mmask16)0xffff
                                            : (__mmask16)((1u << (r1 - rp)) - 1);
                    _mm512_mask_storeu_ps(y + (s0 + s) * ldy + rp, m,
                                          _mm512_mul_ps(acc[s * (size_t)P + (size_t)p], sx));
                }
            }
            s0 += S;
        }
        r += (size_t)P * KERN_INT4X_ROWS;
    }
}

/* ---- INT8 x int8, row-interleaved (kernels.h: int8x) ----
 * A tile is P = 2 adjacent 16-row panels (1 for a last odd panel) x S <= TS_INT8X tokens of
 * int32 accumulators whose lanes are the panels' rows. Per quad of 4 columns: one 64-byte load
 * per panel and, per token, one broadcast activation dword feeding one vpdpbusd per panel.
 * The columns run in chunks of INT8X_KC quads (512 columns, 8 KiB per panel): every token
 * block passes over the pair's chunk before the next chunk, the other blocks' accumulators
 * waiting in a buffer, so the chunk comes from memory once (prefetched during the previous
 * chunk, a slice per block) and stays in L1 for the others. Stored bytes are
 * code + 128: 128 * (activation sum) comes off once per row and token at the end. */
#define TS_INT8X 8     /* tokens per tile */
#define INT8X_KC 128   /* quads per column chunk */
#define INT8X_GROUP 64 /* tokens whose accumulators one pass over the rows keeps */

/* Quads [q0, q1) of the pair at panel (panels pb bytes apart) for S tokens at x (rows xs
 * apart): acc[s * 2 + p] += the int32 sums, starting from zero when `fresh`. Every `every`
 * quads it prefetches the next line of panel p's slice starting at pf[p]. */
INLINE void int8x_tile(const int P, const int S, const uint8_t *panel, size_t pb, size_t q0,
                       size_t q1, const int8_t *x, size_t xs, __m512i *io, int fresh,
                       const uint8_t *const *pf, size_t every) {
    __m512i acc[TS_INT8X][2];
    UNROLL for (int s = 0; s < S; s++) UNROLL for (int p = 0; p < P; p++) acc[s][p] =
        fresh ? _mm512_setzero_si512() : io[s * 2 + p];
    size_t wait = 1, line = 0; /* no division per quad: it cost as much as the quad */
    _Pragma("GCC unroll 4") for (size_t q = q0; q < q1; q++) {
        if (--wait == 0) {
            wait = every;
            UNROLL for (int p = 0; p < P; p++)
                _mm_prefetch((const char *)pf[p] + 64 * line, KERN_PF_HINT);
            line++;
        }
        __m512i wv[2];
        UNROLL for (int p = 0; p < P; p++) wv[p] =
            _mm512_loadu_si512((const void *)(panel + p * pb + 64 * q));
        UNROLL for (int s = 0; s < S; s++) {
            int32_t xd;
            memcpy(&xd, x + s * xs + 4 * q, 4);
            const __m512i xb = _mm512_set1_epi32(xd);
            UNROLL for (int p = 0; p < P; p++) acc[s][p] = dpbusd(acc[s][p], wv[p], xb);
        }
    }
    UNROLL for (int s = 0; s < S; s++) UNROLL for (int p = 0; p < P; p++) io[s * 2 + p] = acc[s][p];
}

typedef void (*x8tile_fn)(const uint8_t *, size_t, size_t, size_t, const int8_t *, size_t,
                          __m512i *, int, const uint8_t *const *, size_t);
#define DEF_X8TILE(P, S)                                                                           \
    static void int8x_tile_##P##_##S(const uint8_t *panel, size_t pb, size_t q0, size_t q1,        \
                                     const int8_t *x, size_t xs, __m512i *io, int fresh,           \
                                     const uint8_t *const *pf, size_t every) {                     \
        int8x_tile(P, S, panel, pb, q0, q1, x, xs, io, fresh, pf, every);                          \
    }
#define DEF_X8TILES(P)                                                                             \
    DEF_X8TILE(P, 1)                                                                               \
    DEF_X8TILE(P, 2)                                                                               \
    DEF_X8TILE(P, 3)                                                                               \
    DEF_X8TILE(P, 4)                                                                               \
    DEF_X8TILE(P, 5)                                                                               \
    DEF_X8TILE(P, 6)                                                                               \
    DEF_X8TILE(P, 7)                                                                               \
    DEF_X8TILE(P, 8)
DEF_X8TILES(1)
DEF_X8TILES(2)
static const x8tile_fn int8x_tile_table[2][TS_INT8X] = {
    {int8x_tile_1_1, int8x_tile_1_2, int8x_tile_1_3, int8x_tile_1_4, int8x_tile_1_5, int8x_tile_1_6,
     int8x_tile_1_7, int8x_tile_1_8},
    {int8x_tile_2_1, int8x_tile_2_2, int8x_tile_2_3, int8x_tile_2_4, int8x_tile_2_5, int8x_tile_2_6,
     int8x_tile_2_7, int8x_tile_2_8}};

/* Panel pairs of [r0, r1) in order, for groups of <= INT8X_GROUP tokens in balanced blocks of
 * <= TS_INT8X; per pair, column chunks in order, each through every block. */
static void matmul_int8x(const void *w, size_t in, const kern_act_t *act, float *y, size_t ldy,
                         size_t r0, size_t r1) {
    Q_ASSERT(in == act->in && in <= KERN_MAX_IN && r0 % KERN_INT8X_ROWS == 0);
    const size_t n = act->n;
    if (n == 0 || r0 >= r1)
        return;
    const size_t nq = kern_int8x_quads(in), pb = kern_int8x_panel_bytes(in);
    __m512i acc[INT8X_GROUP / TS_INT8X][TS_INT8X * 2];
    for (size_t g0 = 0; g0 < n; g0 += INT8X_GROUP) {
        const size_t gn = n - g0 < INT8X_GROUP ? n - g0 : INT8X_GROUP;
        const tiling_t tl = tiling_of(gn, TS_INT8X, pb, 64, 2);
        for (size_t r = r0; r < r1;) {
            const int P = r1 - r > KERN_INT8X_ROWS ? 2 : 1;
            const uint8_t *panel = (const uint8_t *)w + r / KERN_INT8X_ROWS * pb;
            for (size_t q0 = 0; q0 < nq; q0 += INT8X_KC) {
                const size_t q1 = nq - q0 < INT8X_KC ? nq : q0 + INT8X_KC;
                /* The next chunk, or the next pair's first (prefetch never faults): block k of
                 * nblk fetches slice k of its lines, one every nblk quads, so the memory
                 * streams through every block instead of only the first. */
                const size_t slice = (q1 - q0 + tl.nblk - 1) / tl.nblk;
                for (size_t s0 = 0, k = 0; s0 < gn; k++) {
                    const size_t S = tiling_len(&tl, k);
                    const uint8_t *pf[2];
                    for (int p = 0; p < 2; p++)
                        pf[p] =
                            (q1 < nq ? panel + p * pb + 64 * q1 : panel + (size_t)(P + p) * pb) +
                            64 * k * slice;
                    int8x_tile_table[P - 1][S - 1](panel, pb, q0, q1,
                                                   act->q + (g0 + s0) * act->stride, act->stride,
                                                   acc[k], q0 == 0, pf, tl.nblk);
                    s0 += S;
                }
            }
            __m512 sw[2];
            __mmask16 m[2];
            for (int p = 0; p < P; p++) {
                const size_t rp = r + (size_t)p * KERN_INT8X_ROWS;
                sw[p] = _mm512_loadu_ps((const float *)(panel + (size_t)p * pb + nq * 64));
                m[p] = r1 - rp >= KERN_INT8X_ROWS ? (__mmask16)0xffff
                                                  : (__mmask16)((1u << (r1 - rp)) - 1);
            }
            for (size_t s0 = 0, k = 0; s0 < gn; k++) {
                const size_t S = tiling_len(&tl, k);
                for (size_t s = 0; s < S; s++) {
                    const size_t t = g0 + s0 + s;
                    const __m512i off = _mm512_set1_epi32(QTYPE_INT8_OFFSET * act->sum[t]);
                    const __m512 sx = _mm512_set1_ps(act->scale[t]);
                    for (int p = 0; p < P; p++) {
                        const __m512 v =
                            _mm512_cvtepi32_ps(_mm512_sub_epi32(acc[k][s * 2 + (size_t)p], off));
                        _mm512_mask_storeu_ps(y + t * ldy + r + (size_t)p * KERN_INT8X_ROWS, m[p],
                                              _mm512_mul_ps(_mm512_mul_ps(v, sw[p]), sx));
                    }
                }
                s0 += S;
            }
            r += (size_t)P * KERN_INT8X_ROWS;
        }
    }
}

/* y[s * ldy + r] = sum of the lanes of acc[r * TS + s]; a full tile as single_scale_store. */
INLINE void float_store(const int R, const int S, const __m512 *acc, float *y, size_t ldy) {
    if (R != TR) {
        float part[TR * TS];
        store_sums_ps(R, S, acc, TS, part, TS);
        for (int i = 0; i < R; i++)
            for (int s = 0; s < S; s++)
                y[s * ldy + i] = part[i * TS + s];
        return;
    }
    UNROLL for (int s0 = 0; s0 < S; s0 += 4) {
        const int ns = S - s0 < 4 ? S - s0 : 4;
        __m512 v[16];
        UNROLL for (int j = 0; j < 16; j++) v[j] =
            j % 4 < ns ? acc[(j / 4) * TS + s0 + j % 4] : _mm512_setzero_ps();
        store_token_rows(y + (size_t)s0 * ldy, ldy, sum16_ps(v), ns, 0xF);
    }
}

/* ---- float activations: F32, F16, INT8 and INT4 weights ----
 * Each weight register holds 16 dequantised weights, exactly the floats of dequantize_row_ref:
 * F16 by vcvtph2ps, INT8 as s_w * (float)code (one vmulps), INT4 by a 16-entry table per row
 * and group holding d_g * (float)(nibble - 8) (one vmulps per group), indexed by the nibble
 * (vpermps reads the low 4 bits of each index). Activations are loaded masked past `in`;
 * INT8 and INT4 rows are padded to whole blocks, so their weight loads never need a mask. */

INLINE __m512 load_w(qtype_t T, const uint8_t *row, size_t i, __mmask16 m, __m512 sw) {
    switch (T) {
    case QTYPE_F16: return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, row + 2 * i));
    case QTYPE_INT8: {
        const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(row + i)));
        return _mm512_mul_ps(sw, _mm512_sub_ps(_mm512_cvtepi32_ps(b), _mm512_set1_ps(128.0f)));
    }
    default: return _mm512_maskz_loadu_ps(m, row + 4 * i);
    }
}

INLINE __mmask16 tail_mask(size_t i, size_t in) {
    return i + 16 <= in ? (__mmask16)0xffff : (__mmask16)((1u << (in - i)) - 1);
}

/* acc[r][s] += wv[r] * x[s, i .. i + 15] (lanes outside m read as 0). */
INLINE void fma_step(const int R, const int S, const __m512 *wv, __mmask16 m, const float *x,
                     size_t ldx, size_t i, __m512 acc[TR][TS]) {
    UNROLL for (int s = 0; s < S; s++) {
        const __m512 xv = _mm512_maskz_loadu_ps(m, x + s * ldx + i);
        UNROLL for (int r = 0; r < R; r++) acc[r][s] = _mm512_fmadd_ps(wv[r], xv, acc[r][s]);
    }
}

INLINE void float_tile(const qtype_t T, const int R, const int S, const uint8_t *w, size_t rb,
                       size_t in, const float *x, size_t ldx, const pf_t *pf, float *y,
                       size_t ldy) {
    __m512 acc[TR][TS];
    UNROLL for (int r = 0; r < R; r++) UNROLL for (int s = 0; s < S; s++) acc[r][s] =
        _mm512_setzero_ps();
    const size_t esz = T == QTYPE_F32 ? 4 : T == QTYPE_F16 ? 2 : 1;
    float swf[TR] = {0};
    if (T == QTYPE_INT8)
        UNROLL for (int r = 0; r < R; r++) swf[r] =
            kern_load_f32(w + r * rb + kern_codes_bytes(QTYPE_INT8, in));
    for (size_t i = 0; i < in; i += 16) {
        const __mmask16 m = tail_mask(i, in);
        if ((i * esz) % 64 == 0)
            prefetch_step(pf, i * esz / 64);
        __m512 wv[TR];
        UNROLL for (int r = 0; r < R; r++) wv[r] =
            load_w(T, w + r * rb, i, m, _mm512_set1_ps(swf[r]));
        fma_step(R, S, wv, m, x, ldx, i, acc);
    }
    float_store(R, S, (const __m512 *)acc, y, ldy);
}

/* Group g of a 128-weight block: low nibbles (g < 2) or high nibbles of bytes 32 (g % 2) ..
 * 32 (g % 2) + 31; two steps of 16 weights. */
INLINE void int4f_tile(const int R, const int S, const uint8_t *w, size_t rb, size_t in,
                       const float *x, size_t ldx, const pf_t *pf, float *y, size_t ldy) {
    __m512 acc[TR][TS];
    UNROLL for (int r = 0; r < R; r++) UNROLL for (int s = 0; s < S; s++) acc[r][s] =
        _mm512_setzero_ps();
    const __m512 codes = _mm512_setr_ps(-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7);
    const size_t nb = (in + QTYPE_INT4_BLOCK - 1) / QTYPE_INT4_BLOCK, cb = nb * 64;
    for (size_t b = 0; b < nb; b++) {
        prefetch_step(pf, b);
        float d[TR][4];
        UNROLL for (int r = 0; r < R; r++) _mm_storeu_ps(
            d[r], _mm_cvtph_ps(_mm_loadl_epi64((const __m128i *)(w + r * rb + cb + b * 8))));
        UNROLL for (int g = 0; g < 4; g++) {
            const size_t ig = b * QTYPE_INT4_BLOCK + (size_t)g * QTYPE_INT4_GROUP;
            if (ig >= in)
                break;
            __m512 tab[TR];
            UNROLL for (int r = 0; r < R; r++) tab[r] =
                _mm512_mul_ps(_mm512_set1_ps(d[r][g]), codes);
            UNROLL for (int j = 0; j < 2; j++) {
                const size_t i = ig + 16 * (size_t)j;
                if (i >= in)
                    break;
                const __mmask16 m = tail_mask(i, in);
                const size_t off = b * 64 + 32 * (size_t)(g & 1) + 16 * (size_t)j;
                __m512 wv[TR];
                UNROLL for (int r = 0; r < R; r++) {
                    __m512i v =
                        _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(w + r * rb + off)));
                    if (g >= 2)
                        v = _mm512_srli_epi32(v, 4);
                    wv[r] = _mm512_permutexvar_ps(v, tab[r]);
                }
                fma_step(R, S, wv, m, x, ldx, i, acc);
            }
        }
    }
    float_store(R, S, (const __m512 *)acc, y, ldy);
}

typedef void (*fltile_fn)(const uint8_t *, size_t, size_t, const float *, size_t, const pf_t *,
                          float *, size_t);
#define DEF_FLTILE(T, R, S)                                                                        \
    static void float_tile_##T##_##R##_##S(const uint8_t *w, size_t rb, size_t in, const float *x, \
                                           size_t ldx, const pf_t *pf, float *y, size_t ldy) {     \
        float_tile(QTYPE_##T, R, S, w, rb, in, x, ldx, pf, y, ldy);                                \
    }
#define DEF_FLTILES(T)                                                                             \
    DEF_FLTILE(T, 4, 1)                                                                            \
    DEF_FLTILE(T, 4, 2)                                                                            \
    DEF_FLTILE(T, 4, 3)                                                                            \
    DEF_FLTILE(T, 4, 4)                                                                            \
    DEF_FLTILE(T, 4, 5)                                                                            \
    DEF_FLTILE(T, 4, 6)                                                                            \
    DEF_FLTILE(T, 1, 1)                                                                            \
    DEF_FLTILE(T, 1, 2)                                                                            \
    DEF_FLTILE(T, 1, 3)                                                                            \
    DEF_FLTILE(T, 1, 4)                                                                            \
    DEF_FLTILE(T, 1, 5)                                                                            \
    DEF_FLTILE(T, 1, 6)                                                                            \
    static const fltile_fn float_tile_table_##T[2][TS] = {                                         \
        {float_tile_##T##_1_1, float_tile_##T##_1_2, float_tile_##T##_1_3, float_tile_##T##_1_4,   \
         float_tile_##T##_1_5, float_tile_##T##_1_6},                                              \
        {float_tile_##T##_4_1, float_tile_##T##_4_2, float_tile_##T##_4_3, float_tile_##T##_4_4,   \
         float_tile_##T##_4_5, float_tile_##T##_4_6}};
DEF_FLTILES(F32)
DEF_FLTILES(F16)
DEF_FLTILES(INT8)

#define DEF_I4FTILE(R, S)                                                                          \
    static void int4f_tile_##R##_##S(const uint8_t *w, size_t rb, size_t in, const float *x,       \
                                     size_t ldx, const pf_t *pf, float *y, size_t ldy) {           \
        int4f_tile(R, S, w, rb, in, x, ldx, pf, y, ldy);                                           \
    }
DEF_I4FTILE(4, 1)
DEF_I4FTILE(4, 2)
DEF_I4FTILE(4, 3)
DEF_I4FTILE(4, 4)
DEF_I4FTILE(1, 1)
DEF_I4FTILE(1, 2)
DEF_I4FTILE(1, 3)
DEF_I4FTILE(1, 4)
static const fltile_fn int4f_tile_table[2][TS] = {
    {int4f_tile_1_1, int4f_tile_1_2, int4f_tile_1_3, int4f_tile_1_4, NULL, NULL},
    {int4f_tile_4_1, int4f_tile_4_2, int4f_tile_4_3, int4f_tile_4_4, NULL, NULL}};

/* Tiles of R rows x up to smax tokens over rows [r0, r1) and all n tokens. */
static void matmul_float(const fltile_fn table[2][TS], size_t smax, qtype_t type, const void *w,
                         size_t in, const float *x, size_t ldx, size_t n, float *y, size_t ldy,
                         size_t r0, size_t r1) {
    const size_t rb = qtype_row_bytes(type, in);
    if (n == 0)
        return;
    const tiling_t tl = tiling_of(n, smax, rb, type == QTYPE_INT4 ? 72 : 64, TR);
    const uint8_t *wbase = w;
    for (size_t r = r0; r < r1;) {
        const int R = r1 - r >= TR ? TR : 1;
        const uint8_t *wr = wbase + r * rb;
        for (size_t s0 = 0, k = 0; s0 < n; k++) {
            const size_t S = tiling_len(&tl, k);
            const pf_t pf = tiling_pf(&tl, wr, R == TR, k);
            table[R == TR][S - 1](wr, rb, in, x + s0 * ldx, ldx, &pf, y + s0 * ldy + r, ldy);
            s0 += S;
        }
        r += (size_t)R;
    }
}

static void matmul_f32(const void *w, size_t in, const float *x, size_t ldx, size_t n, float *y,
                       size_t ldy, size_t r0, size_t r1) {
    matmul_float(float_tile_table_F32, TS, QTYPE_F32, w, in, x, ldx, n, y, ldy, r0, r1);
}

static void matmul_f16(const void *w, size_t in, const float *x, size_t ldx, size_t n, float *y,
                       size_t ldy, size_t r0, size_t r1) {
    matmul_float(float_tile_table_F16, TS, QTYPE_F16, w, in, x, ldx, n, y, ldy, r0, r1);
}

static void matmul_int8_f(const void *w, size_t in, const float *x, size_t ldx, size_t n, float *y,
                          size_t ldy, size_t r0, size_t r1) {
    matmul_float(float_tile_table_INT8, TS, QTYPE_INT8, w, in, x, ldx, n, y, ldy, r0, r1);
}

static void matmul_int4_f(const void *w, size_t in, const float *x, size_t ldx, size_t n, float *y,
                          size_t ldy, size_t r0, size_t r1) {
    matmul_float(int4f_tile_table, TS_INT4, QTYPE_INT4, w, in, x, ldx, n, y, ldy, r0, r1);
}

/* ---- FP16 rows ---- */

static void f16_from_f32(uint16_t *dst, const float *src, size_t n) {
    size_t i = 0;
    for (; i + 16 <= n; i += 16)
        _mm256_storeu_si256((__m256i *)(dst + i),
                            _mm512_cvtps_ph(_mm512_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT));
    if (i < n) {
        const __mmask16 m = (__mmask16)((1u << (n - i)) - 1);
        _mm256_mask_storeu_epi16(
            dst + i, m,
            _mm512_cvtps_ph(_mm512_maskz_loadu_ps(m, src + i), _MM_FROUND_TO_NEAREST_INT));
    }
}

static void f16_to_f32(float *dst, const uint16_t *src, size_t n) {
    size_t i = 0;
    for (; i + 16 <= n; i += 16)
        _mm512_storeu_ps(dst + i, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(src + i))));
    if (i < n) {
        const __mmask16 m = (__mmask16)((1u << (n - i)) - 1);
        _mm512_mask_storeu_ps(dst + i, m, _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, src + i)));
    }
}

const kern_ops_t kern_ops_avx512 = {
    .name = "avx512",
    .quantize_act = quantize_act,
    .matmul_q =
        {[QTYPE_TERNARY] = matmul_ternary, [QTYPE_INT4] = matmul_int4, [QTYPE_INT8] = matmul_int8},
    .matmul_f = {[QTYPE_F32] = matmul_f32,
                 [QTYPE_F16] = matmul_f16,
                 [QTYPE_INT4] = matmul_int4_f,
                 [QTYPE_INT8] = matmul_int8_f},
    .matmul_ilv =
        {[QTYPE_TERNARY] = matmul_ternx, [QTYPE_INT4] = matmul_int4x, [QTYPE_INT8] = matmul_int8x},
    .f16_from_f32 = f16_from_f32,
    .f16_to_f32 = f16_to_f32,
    .bits_xor = kern_ref_bits_xor,
    .bits_popcount = kern_ref_bits_popcount,
    .bits_pack_gt = kern_ref_bits_pack_gt,
};
