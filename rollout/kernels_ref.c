/* Portable scalar reference of every kernel: the definition the SIMD levels are tested
 * against, and the path of CPUs without AVX2. Written for clarity, decoding each code with
 * the layouts of qtypes.h. */
#include "kernels_impl.h"

#include "fp16.h"

#include <math.h>

static void quantize_act(kern_act_t *act, const float *x, size_t ldx, size_t n) {
    Q_ASSERT(n <= act->cap);
    const size_t in = act->in, ng = act->stride / QTYPE_INT4_GROUP;
    for (size_t s = 0; s < n; s++) {
        const float *xs = x + s * ldx;
        int8_t *q = act->q + s * act->stride;
        float amax = 0.0f;
        for (size_t i = 0; i < in; i++)
            amax = fmaxf(amax, fabsf(xs[i]));
        const float sx = amax / 127.0f;
        int32_t sum = 0;
        for (size_t i = 0; i < act->stride; i++) {
            int c = i < in && sx != 0.0f ? qtype_round_clip(xs[i] / sx, -128, 127) : 0;
            q[i] = (int8_t)c;
            sum += c;
        }
        for (size_t g = 0; g < ng; g++) {
            int32_t gs = 0;
            for (size_t i = 0; i < QTYPE_INT4_GROUP; i++)
                gs += q[g * QTYPE_INT4_GROUP + i];
            act->gsum[s * ng + g] = (float)gs;
        }
        act->scale[s] = sx;
        act->sum[s] = sum;
    }
    act->n = n;
}

static int ternary_code(const uint8_t *row, size_t i) {
    size_t b = i / QTYPE_TERNARY_BLOCK, r = i % QTYPE_TERNARY_BLOCK;
    return (int)((row[b * 64 + r % 64] >> (2 * (r / 64))) & 3) - 1;
}

static void matmul_ternary(const void *w, size_t in, const kern_act_t *act, float *y, size_t ldy,
                           size_t r0, size_t r1) {
    const size_t rb = qtype_row_bytes(QTYPE_TERNARY, in);
    for (size_t r = r0; r < r1; r++) {
        const uint8_t *row = (const uint8_t *)w + r * rb;
        const float sw = kern_load_f32(row + kern_codes_bytes(QTYPE_TERNARY, in));
        for (size_t s = 0; s < act->n; s++) {
            const int8_t *q = act->q + s * act->stride;
            int32_t isum = 0;
            for (size_t i = 0; i < in; i++)
                isum += ternary_code(row, i) * q[i];
            y[s * ldy + r] = (float)isum * sw * act->scale[s];
        }
    }
}

static void matmul_int8(const void *w, size_t in, const kern_act_t *act, float *y, size_t ldy,
                        size_t r0, size_t r1) {
    const size_t rb = qtype_row_bytes(QTYPE_INT8, in);
    for (size_t r = r0; r < r1; r++) {
        const uint8_t *row = (const uint8_t *)w + r * rb;
        const float sw = kern_load_f32(row + kern_codes_bytes(QTYPE_INT8, in));
        for (size_t s = 0; s < act->n; s++) {
            const int8_t *q = act->q + s * act->stride;
            int32_t isum = 0;
            for (size_t i = 0; i < in; i++)
                isum += ((int)row[i] - QTYPE_INT8_OFFSET) * q[i];
            y[s * ldy + r] = (float)isum * sw * act->scale[s];
        }
    }
}

/* Per group: exact int32 sum, times the group's FP16 scale; groups added in double. */
static void matmul_int4(const void *w, size_t in, const kern_act_t *act, float *y, size_t ldy,
                        size_t r0, size_t r1) {
    const size_t rb = qtype_row_bytes(QTYPE_INT4, in);
    const size_t nb = (in + QTYPE_INT4_BLOCK - 1) / QTYPE_INT4_BLOCK;
    for (size_t r = r0; r < r1; r++) {
        const uint8_t *row = (const uint8_t *)w + r * rb;
        const uint8_t *scales = row + nb * 64;
        for (size_t s = 0; s < act->n; s++) {
            const int8_t *q = act->q + s * act->stride;
            double acc = 0.0;
            for (size_t g = 0; g * QTYPE_INT4_GROUP < in; g++) {
                int32_t isum = 0;
                for (size_t i = g * QTYPE_INT4_GROUP; i < (g + 1) * QTYPE_INT4_GROUP && i < in;
                     i++) {
                    size_t b = i / QTYPE_INT4_BLOCK, k = i % QTYPE_INT4_BLOCK;
                    int code =
                        (int)((row[b * 64 + k % 64] >> (4 * (k / 64))) & 15) - QTYPE_INT4_OFFSET;
                    isum += code * q[i];
                }
                uint16_t h;
                memcpy(&h, scales + 2 * g, 2);
                acc += (double)fp16_to_float(h) * isum;
            }
            y[s * ldy + r] = (float)(acc * act->scale[s]);
        }
    }
}

/* ---- INT4, row-interleaved (kernels.h: int4x) ---- */

/* Bytes of the panels of `rows` rows covering out rows, each n units of `unit` bytes plus
 * `tail`; SIZE_MAX when that overflows. */
static size_t panels_bytes(size_t out, size_t rows, size_t n, size_t unit, size_t tail) {
    const size_t panels = out / rows + (out % rows != 0);
    if (n > (SIZE_MAX - tail) / unit)
        return SIZE_MAX;
    const size_t pb = n * unit + tail;
    return panels > SIZE_MAX / pb ? SIZE_MAX : panels * pb;
}

size_t kern_int4x_bytes(size_t out, size_t in) {
    return panels_bytes(out, KERN_INT4X_ROWS, in / QTYPE_INT4_BLOCK + (in % QTYPE_INT4_BLOCK != 0),
                        KERN_INT4X_BLOCK_BYTES, 0);
}

/* Byte of panel `p` holding weight i (0..31) of row i16 (0..15) in group g, and the nibble's
 * shift. */
static size_t int4x_code_at(size_t nb, size_t p, size_t g, size_t i16, size_t i, int *shift) {
    *shift = i >= 16 ? 4 : 0;
    return (p * nb + g / 4) * KERN_INT4X_BLOCK_BYTES + (g % 4) * 256 + 64 * (i % 16 / 4) + 4 * i16 +
           i % 4;
}

static size_t int4x_scale_at(size_t nb, size_t p, size_t g, size_t i16) {
    return (p * nb + g / 4) * KERN_INT4X_BLOCK_BYTES + 1024 + 32 * (g % 4) + 2 * i16;
}

void kern_int4x_pack(void *dst, const void *w, size_t out, size_t in) {
    Q_ASSERT(out >= 1 && in >= 1 && in <= KERN_MAX_IN);
    const size_t rb = qtype_row_bytes(QTYPE_INT4, in);
    const size_t nb = (in + QTYPE_INT4_BLOCK - 1) / QTYPE_INT4_BLOCK, ng = 4 * nb;
    const size_t panels = (out + KERN_INT4X_ROWS - 1) / KERN_INT4X_ROWS;
    uint8_t *d = dst;
    const uint8_t nib8 = QTYPE_INT4_OFFSET | QTYPE_INT4_OFFSET << 4;
    /* Rows past `out`: code 0 and scale 0; every other byte is written below. */
    memset(d, nib8, kern_int4x_bytes(out, in));
    for (size_t p = 0; p < panels; p++)
        for (size_t g = 0; g < ng; g++)
            memset(d + int4x_scale_at(nb, p, g, 0), 0, 2 * KERN_INT4X_ROWS);
    for (size_t r = 0; r < out; r++) {
        const uint8_t *row = (const uint8_t *)w + r * rb;
        const size_t p = r / KERN_INT4X_ROWS, i16 = r % KERN_INT4X_ROWS;
        for (size_t g = 0; g < ng; g++) {
            memcpy(d + int4x_scale_at(nb, p, g, i16), row + nb * 64 + 2 * g, 2);
            for (size_t i = 0; i < QTYPE_INT4_GROUP; i++) {
                const size_t k = g * QTYPE_INT4_GROUP + i; /* weight index in the row */
                const size_t b = k / QTYPE_INT4_BLOCK, kb = k % QTYPE_INT4_BLOCK;
                const unsigned nib = (row[b * 64 + kb % 64] >> (4 * (kb / 64))) & 15;
                int shift;
                uint8_t *c = d + int4x_code_at(nb, p, g, i16, i, &shift);
                *c = (uint8_t)((*c & ~(15u << shift)) | nib << shift);
            }
        }
    }
}

/* matmul_int4 on the interleaved copy: the same sums in the same order, so the same floats. */
static void matmul_int4x(const void *w, size_t in, const kern_act_t *act, float *y, size_t ldy,
                         size_t r0, size_t r1) {
    Q_ASSERT(r0 % KERN_INT4X_ROWS == 0);
    const uint8_t *base = w;
    const size_t nb = (in + QTYPE_INT4_BLOCK - 1) / QTYPE_INT4_BLOCK;
    for (size_t r = r0; r < r1; r++) {
        const size_t p = r / KERN_INT4X_ROWS, i16 = r % KERN_INT4X_ROWS;
        for (size_t s = 0; s < act->n; s++) {
            const int8_t *q = act->q + s * act->stride;
            double acc = 0.0;
            for (size_t g = 0; g * QTYPE_INT4_GROUP < in; g++) {
                int32_t isum = 0;
                for (size_t i = 0; i < QTYPE_INT4_GROUP && g * QTYPE_INT4_GROUP + i < in; i++) {
                    int shift;
                    const uint8_t c = base[int4x_code_at(nb, p, g, i16, i, &shift)];
                    isum += ((int)((c >> shift) & 15) - QTYPE_INT4_OFFSET) *
                            q[g * QTYPE_INT4_GROUP + i];
                }
                uint16_t h;
                memcpy(&h, base + int4x_scale_at(nb, p, g, i16), 2);
                acc += (double)fp16_to_float(h) * isum;
            }
            y[s * ldy + r] = (float)(acc * act->scale[s]);
        }
    }
}

/* ---- ternary, row-interleaved (kernels.h: ternx) ---- */

size_t kern_ternx_bytes(size_t out, size_t in) {
    return panels_bytes(out, KERN_TERNX_ROWS, kern_ternx_chunks(in), 64,
                        KERN_TERNX_ROWS * sizeof(float));
}

void kern_ternx_pack(void *dst, const void *w, size_t out, size_t in) {
    Q_ASSERT(out >= 1 && in >= 1 && in <= KERN_MAX_IN);
    const size_t rb = qtype_row_bytes(QTYPE_TERNARY, in), nc = kern_ternx_chunks(in);
    const size_t pb = kern_ternx_panel_bytes(in);
    const size_t panels = (out + KERN_TERNX_ROWS - 1) / KERN_TERNX_ROWS;
    for (size_t p = 0; p < panels; p++) {
        uint8_t *panel = (uint8_t *)dst + p * pb;
        const size_t rows = out - KERN_TERNX_ROWS * p < KERN_TERNX_ROWS ? out - KERN_TERNX_ROWS * p
                                                                        : KERN_TERNX_ROWS;
        const uint8_t *row[KERN_TERNX_ROWS];
        for (size_t r = 0; r < KERN_TERNX_ROWS; r++)
            row[r] = (const uint8_t *)w + (KERN_TERNX_ROWS * p + (r < rows ? r : 0)) * rb;
        /* Chunk c is field c % 4 of each row's block c / 4 (qtypes.h); rows past `out` and
         * columns past `in` get code 1. */
        for (size_t c = 0; c < nc; c++) {
            const unsigned f = 2 * (c % 4);
            const size_t valid = 64 * c >= in ? 0 : in - 64 * c < 64 ? in - 64 * c : 64;
            if (rows == KERN_TERNX_ROWS && valid == 64) { /* all but edge panels and chunks */
                const uint8_t *s0 = row[0] + c / 4 * 64, *s1 = row[1] + c / 4 * 64,
                              *s2 = row[2] + c / 4 * 64, *s3 = row[3] + c / 4 * 64;
                for (size_t j = 0; j < 64; j++)
                    panel[64 * c + j] = (uint8_t)((s0[j] >> f & 3) | (s1[j] >> f & 3) << 2 |
                                                  (s2[j] >> f & 3) << 4 | (s3[j] >> f & 3) << 6);
                continue;
            }
            for (size_t j = 0; j < 64; j++) {
                unsigned byte = 0;
                for (size_t r = 0; r < KERN_TERNX_ROWS; r++) {
                    const unsigned code =
                        r < rows && j < valid ? row[r][c / 4 * 64 + j] >> f & 3 : 1;
                    byte |= code << (2 * r);
                }
                panel[64 * c + j] = (uint8_t)byte;
            }
        }
        for (size_t r = 0; r < KERN_TERNX_ROWS; r++) {
            const float zero = 0.0f;
            memcpy(panel + nc * 64 + 4 * r,
                   r < rows ? row[r] + kern_codes_bytes(QTYPE_TERNARY, in) : (const void *)&zero,
                   4);
        }
    }
}

/* matmul_ternary on the interleaved copy: the same integer sums, so the same floats. */
static void matmul_ternx(const void *w, size_t in, const kern_act_t *act, float *y, size_t ldy,
                         size_t r0, size_t r1) {
    Q_ASSERT(r0 % KERN_TERNX_ROWS == 0);
    const size_t nc = kern_ternx_chunks(in), pb = kern_ternx_panel_bytes(in);
    for (size_t r = r0; r < r1; r++) {
        const uint8_t *panel = (const uint8_t *)w + r / KERN_TERNX_ROWS * pb;
        const unsigned shift = 2 * (r % KERN_TERNX_ROWS);
        const float sw = kern_load_f32(panel + nc * 64 + 4 * (r % KERN_TERNX_ROWS));
        for (size_t s = 0; s < act->n; s++) {
            const int8_t *q = act->q + s * act->stride;
            int32_t isum = 0;
            for (size_t i = 0; i < in; i++)
                isum += ((int)(panel[i] >> shift & 3) - 1) * q[i];
            y[s * ldy + r] = (float)isum * sw * act->scale[s];
        }
    }
}

/* ---- INT8, row-interleaved (kernels.h: int8x) ---- */

size_t kern_int8x_bytes(size_t out, size_t in) {
    return panels_bytes(out, KERN_INT8X_ROWS, kern_int8x_quads(in), 64,
                        KERN_INT8X_ROWS * sizeof(float));
}

void kern_int8x_pack(void *dst, const void *w, size_t out, size_t in) {
    Q_ASSERT(out >= 1 && in >= 1 && in <= KERN_MAX_IN);
    const size_t rb = qtype_row_bytes(QTYPE_INT8, in), nq = kern_int8x_quads(in);
    const size_t pb = kern_int8x_panel_bytes(in);
    const size_t panels = (out + KERN_INT8X_ROWS - 1) / KERN_INT8X_ROWS;
    for (size_t p = 0; p < panels; p++) {
        uint8_t *panel = (uint8_t *)dst + p * pb;
        memset(panel, QTYPE_INT8_OFFSET, nq * 64);
        memset(panel + nq * 64, 0, KERN_INT8X_ROWS * sizeof(float));
        for (size_t i = 0; i < KERN_INT8X_ROWS && KERN_INT8X_ROWS * p + i < out; i++) {
            const uint8_t *row = (const uint8_t *)w + (KERN_INT8X_ROWS * p + i) * rb;
            for (size_t k = 0; k < in; k++)
                panel[64 * (k / 4) + 4 * i + k % 4] = row[k];
            memcpy(panel + nq * 64 + 4 * i, row + kern_codes_bytes(QTYPE_INT8, in), 4);
        }
    }
}

/* matmul_int8 on the interleaved copy: the same integer sums, so the same floats. */
static void matmul_int8x(const void *w, size_t in, const kern_act_t *act, float *y, size_t ldy,
                         size_t r0, size_t r1) {
    Q_ASSERT(r0 % KERN_INT8X_ROWS == 0);
    const size_t nq = kern_int8x_quads(in), pb = kern_int8x_panel_bytes(in);
    for (size_t r = r0; r < r1; r++) {
        const uint8_t *panel = (const uint8_t *)w + r / KERN_INT8X_ROWS * pb;
        const size_t i = r % KERN_INT8X_ROWS;
        const float sw = kern_load_f32(panel + nq * 64 + 4 * i);
        for (size_t s = 0; s < act->n; s++) {
            const int8_t *q = act->q + s * act->stride;
            int32_t isum = 0;
            for (size_t k = 0; k < in; k++)
                isum += ((int)panel[64 * (k / 4) + 4 * i + k % 4] - QTYPE_INT8_OFFSET) * q[k];
            y[s * ldy + r] = (float)isum * sw * act->scale[s];
        }
    }
}

/* Weight i of a packed row of width `in`, exactly as dequantize_row_ref gives it: the stored
 * float, the FP16 value, or scale * code (one float multiply). */
static float weight_at(qtype_t t, const uint8_t *row, size_t in, size_t i) {
    uint16_t h;
    switch (t) {
    case QTYPE_F32: return kern_load_f32(row + 4 * i);
    case QTYPE_F16: memcpy(&h, row + 2 * i, 2); return fp16_to_float(h);
    case QTYPE_INT4: {
        const size_t nb = (in + QTYPE_INT4_BLOCK - 1) / QTYPE_INT4_BLOCK;
        const size_t b = i / QTYPE_INT4_BLOCK, k = i % QTYPE_INT4_BLOCK;
        memcpy(&h, row + nb * 64 + 2 * (i / QTYPE_INT4_GROUP), 2);
        const int code = (int)((row[b * 64 + k % 64] >> (4 * (k / 64))) & 15) - QTYPE_INT4_OFFSET;
        return fp16_to_float(h) * (float)code;
    }
    case QTYPE_INT8:
        return kern_load_f32(row + kern_codes_bytes(QTYPE_INT8, in)) *
               (float)((int)row[i] - QTYPE_INT8_OFFSET);
    default: Q_ASSERT(!"no float-activation product for this type"); return 0.0f;
    }
}

/* Products with float activations: exact products of the dequantised weights, summed in
 * double, rounded once. */
static void matmul_float(qtype_t t, const void *w, size_t in, const float *x, size_t ldx, size_t n,
                         float *y, size_t ldy, size_t r0, size_t r1) {
    const size_t rb = qtype_row_bytes(t, in);
    for (size_t r = r0; r < r1; r++) {
        const uint8_t *row = (const uint8_t *)w + r * rb;
        for (size_t s = 0; s < n; s++) {
            double acc = 0.0;
            for (size_t i = 0; i < in; i++)
                acc += (double)weight_at(t, row, in, i) * x[s * ldx + i];
            y[s * ldy + r] = (float)acc;
        }
    }
}

static void matmul_f32(const void *w, size_t in, const float *x, size_t ldx, size_t n, float *y,
                       size_t ldy, size_t r0, size_t r1) {
    matmul_float(QTYPE_F32, w, in, x, ldx, n, y, ldy, r0, r1);
}

static void matmul_f16(const void *w, size_t in, const float *x, size_t ldx, size_t n, float *y,
                       size_t ldy, size_t r0, size_t r1) {
    matmul_float(QTYPE_F16, w, in, x, ldx, n, y, ldy, r0, r1);
}

static void matmul_int4_f(const void *w, size_t in, const float *x, size_t ldx, size_t n, float *y,
                          size_t ldy, size_t r0, size_t r1) {
    matmul_float(QTYPE_INT4, w, in, x, ldx, n, y, ldy, r0, r1);
}

static void matmul_int8_f(const void *w, size_t in, const float *x, size_t ldx, size_t n, float *y,
                          size_t ldy, size_t r0, size_t r1) {
    matmul_float(QTYPE_INT8, w, in, x, ldx, n, y, ldy, r0, r1);
}

void kern_ref_bits_xor(uint64_t *dst, const uint64_t *a, const uint64_t *b, size_t nwords) {
    for (size_t i = 0; i < nwords; i++)
        dst[i] = a[i] ^ b[i];
}

size_t kern_ref_bits_popcount(const uint64_t *a, size_t nwords) {
    size_t c = 0;
    for (size_t i = 0; i < nwords; i++)
        c += (size_t)__builtin_popcountll(a[i]);
    return c;
}

void kern_ref_bits_pack_gt(uint64_t *dst, const float *x, float thr, size_t nbits) {
    for (size_t w = 0; w * 64 < nbits; w++) {
        uint64_t word = 0;
        for (size_t b = 0; b < 64 && w * 64 + b < nbits; b++)
            word |= (uint64_t)(x[w * 64 + b] > thr) << b;
        dst[w] = word;
    }
}

const kern_ops_t kern_ops_ref = {
    .name = "ref",
    .quantize_act = quantize_act,
    .matmul_q =
        {[QTYPE_TERNARY] = matmul_ternary, [QTYPE_INT4] = matmul_int4, [QTYPE_INT8] = matmul_int8},
    .matmul_f = {[QTYPE_F32] = matmul_f32,
                 [QTYPE_F16] = matmul_f16,
                 [QTYPE_INT4] = matmul_int4_f,
                 [QTYPE_INT8] = matmul_int8_f},
    .matmul_ilv =
        {[QTYPE_TERNARY] = matmul_ternx, [QTYPE_INT4] = matmul_int4x, [QTYPE_INT8] = matmul_int8x},
    .f16_from_f32 = fp16_from_float_n,
    .f16_to_f32 = fp16_to_float_n,
    .bits_xor = kern_ref_bits_xor,
    .bits_popcount = kern_ref_bits_popcount,
    .bits_pack_gt = kern_ref_bits_pack_gt,
};
