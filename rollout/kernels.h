/* CPU kernels of the rollout engine: int8 activation quantization, quantized and float matrix
 * products over the packed rows of common/qtypes.h, FP16 conversion and the packed-bit
 * operations of the diffusion plan sampler.
 *
 * Every kernel exists as a portable scalar reference (kernels_ref.c) and, where the CPU has
 * them, AVX2 and AVX-512 VNNI versions (kernels_avx2.c, kernels_avx512.c). The level is
 * chosen once at start-up (kern_init, cpu_features.h); kern_ops() returns its table, indexed
 * by qtype_t for the matrix products.
 *
 * Results: the quantized products compute an exact int32 sum of codes, so ternary and INT8
 * outputs are bit-identical across levels and equal ((float)isum * s_w) * s_x, the order of
 * quant.h's bitlinear_forward. INT4 (one FP16 scale per group of 32) and the float products
 * add float partial sums in a level-dependent order: equal to the reference within rounding
 * (relative error ~1e-6 of sum |terms|), not bit for bit.
 *
 * Float activations (matmul_f) take F32, F16, INT4 and INT8 weights. Every level multiplies
 * the very floats qtype_traits(type)->dequantize_row_ref gives (the stored float, the FP16
 * value, or scale * code computed by one float multiply, as the learner's fake quantizer), each
 * product d_i * x_i exact inside an FMA (or in double in the reference), so levels differ only
 * in summation order. Bound (first order, u = 2^-24): |y_level - y_ref| <= (ceil(in / 8) + 12)
 * * u * sum_i |d_i * x_i|: a SIMD level adds in fp32 lanes (>= 8 of them, each a chain of at
 * most ceil(in / 8) additions), then a tree of <= 4 levels and at most 7 scalar tail terms;
 * the reference sums in double and rounds once (<= u of the exact sum).
 *
 * Shapes: a weight matrix is W[out, in] as `out` packed rows of qtype_row_bytes(type, in)
 * bytes; a product y[n, out] = W x^T for n activation rows writes y[s * ldy + r] for rows r in
 * [r0, r1) only, so callers split the rows of one product across threads (static contiguous
 * ranges, kern_pool.h). in <= KERN_MAX_IN. */
#ifndef QUILLAN_KERNELS_H
#define QUILLAN_KERNELS_H

#include <stddef.h>
#include <stdint.h>

#include "cpu_features.h"
#include "error.h"
#include "qtypes.h"

/* Activation rows are padded with zero codes to a multiple of this (a multiple of every
 * block in qtypes.h), so kernels read whole blocks without tail handling. */
#define KERN_ACT_PAD 256
/* Least software-prefetch distance of the tiled products in bytes: one 4-row tile of 4096
 * INT8 weights. A tile of ternary rows (4 KiB at 4096 weights) fetched one tile ahead arrived
 * too late for DRAM at batch 1 (0.6 of the streaming bandwidth; 0.8-1.0 at this distance). */
#ifndef KERN_PF_BYTES
#define KERN_PF_BYTES 12288
#endif
/* Largest input width: keeps every int32 code sum exact (255 * 127 * 32768 < 2^31). */
#define KERN_MAX_IN 32768

/* int8 activations of up to `cap` tokens of width `in` (plain struct: _init/_free).
 * Codes are in -127..127: with s_x = max|x| / 127 the clip at -128 of MODEL.md never binds. */
typedef struct {
    int8_t *q;     /* [cap, stride] codes, zero from `in` to `stride`, 64-byte aligned */
    float *scale;  /* [cap] s_x = max|x| / 127 (0 for an all-zero row: codes all 0) */
    int32_t *sum;  /* [cap] sum of the codes of the row */
    float *gsum;   /* [cap, stride / 32] sum of the codes in each group of 32 (INT4) */
    size_t n;      /* rows currently held (set by quantize_act) */
    size_t in;     /* width */
    size_t stride; /* in rounded up to KERN_ACT_PAD */
    size_t cap;
} kern_act_t;

/* Row-interleaved INT4 ("int4x"), prepared once per weight matrix for batched products: the
 * rows of a qtypes.h INT4 matrix regrouped in panels of KERN_INT4X_ROWS rows so that one
 * 64-byte register holds 4 consecutive weights of each of 16 rows and one vpdpbusd against a
 * broadcast activation dword feeds 16 rows (the row-major layout yields 16 partial sums of one
 * row, each needing its own float conversion and scaling).
 *
 * With nb = ceil(in / 128), panel p (rows 16 p .. 16 p + 15) is nb blocks of
 * KERN_INT4X_BLOCK_BYTES bytes at p * nb * KERN_INT4X_BLOCK_BYTES. Block b holds groups
 * g = 4 b + k (k = 0..3, 32 weights each): 256 bytes of codes per group at 256 k, then the 4
 * groups' scales at 1024 + 32 k, FP16, row 16 p + i at + 2 i. In the codes of group g, byte
 * 64 L + 4 i + t (L = 0..3, i = 0..15, t = 0..3): low nibble = weight 32 g + 4 L + t of row
 * 16 p + i, high nibble = weight 32 g + 16 + 4 L + t, stored as code + 8 as in qtypes.h. Rows
 * past `out` and groups past `in` have nibble 8 (code 0) and scale 0. Same codes and scales as
 * the row-major matrix, so the same 4.5 bits per weight when in % 128 == 0 and out % 16 == 0. */
#define KERN_INT4X_ROWS 16
#define KERN_INT4X_BLOCK_BYTES (4 * 256 + 4 * 32)

/* Row-interleaved ternary ("ternx"), prepared once per weight matrix for batched products:
 * one 64-byte load holds 64 consecutive weights of each of KERN_TERNX_ROWS = 4 rows, so each
 * row's codes unpack with one `and` shared by every token of a tile (the row-major layout needs
 * a shift and an `and` per 64 weights and row) and a tile reads one contiguous stream.
 *
 * With nc = 4 ceil(in / 256) chunks of 64 columns, panel p (rows 4 p .. 4 p + 3) is
 * pb = nc * 64 + 16 bytes at p * pb: byte 64 c + j holds, in bits 2 r and 2 r + 1, the stored
 * code (w + 1, 0..2, as in qtypes.h) of column 64 c + j of row 4 p + r; then the 4 rows' scales
 * s_w, float32, row 4 p + r at nc * 64 + 4 r. Rows past `out` and columns past `in` have code
 * 1 (weight 0); rows past `out` have scale 0. Same codes and scales as the row-major matrix,
 * and the same bytes: 2 bits per weight plus 4 per row. (Panels are 16 bytes off 64-byte
 * alignment: one weight load per 12-24 vpdpbusd can afford the split lines.) */
#define KERN_TERNX_ROWS 4

/* Row-interleaved INT8 ("int8x"), prepared once per weight matrix for batched products: one
 * 64-byte register holds 4 consecutive weights of each of KERN_INT8X_ROWS = 16 rows, so one
 * vpdpbusd against a broadcast activation dword feeds 16 rows and the int32 lanes are the
 * rows' sums: no horizontal sums at the end, and 16 rows share each activation byte read
 * (the row-major tiles read 64 activation bytes per 4 rows).
 *
 * With nq = 64 ceil(in / 256) quads of 4 columns, panel p (rows 16 p .. 16 p + 15) is
 * pb = nq * 64 + 64 bytes at p * pb: byte 64 q + 4 i + t holds the stored byte (code + 128, as
 * in qtypes.h) of column 4 q + t of row 16 p + i; then the 16 rows' scales s_w, float32, row
 * 16 p + i at nq * 64 + 4 i. Rows past `out` and columns past `in` hold 128 (weight 0); rows
 * past `out` have scale 0. Same codes and scales as the row-major matrix, which has
 * 64 ceil(in / 64) + 4 bytes per row. */
#define KERN_INT8X_ROWS 16

/* One row-interleaved layout (int4x, ternx, int8x above) of the matrices of one qtype_t: how to
 * size and build the copy that kern_ops_t.matmul_ilv[type] reads. Packing is the same on every
 * level; whether a level has the product is its matmul_ilv entry. */
typedef struct {
    const char *name; /* "int4x", "ternx" or "int8x" */
    /* Rows per panel (KERN_INT4X_ROWS, KERN_TERNX_ROWS, KERN_INT8X_ROWS): threads split the
     * rows of a product at multiples of it. */
    size_t rows;
    /* Bytes of the interleaved copy of an out x in matrix (out, in >= 1); SIZE_MAX when that
     * overflows. */
    size_t (*bytes)(size_t out, size_t in);
    /* Writes the interleaved copy of the `out` row-major rows w (qtype_row_bytes(type, in) bytes
     * each, 1 <= in <= KERN_MAX_IN) into dst[bytes(out, in)]; any alignment (the products read
     * 64-byte aligned panels faster). */
    void (*pack)(void *dst, const void *w, size_t out, size_t in);
    /* The product is meant for batches of >= min_batch tokens; below it callers run matmul_q on
     * the row-major matrix. int4x and int8x: 2 (at one token the row-major product reads the
     * same bytes with less work per byte). ternx: 1 (at one token too it streams faster than
     * the row-major tiles: one stream per tile instead of 4). */
    size_t min_batch;
} kern_ilv_t;

/* The row-interleaved layout of `type` (TERNARY: ternx, INT4: int4x, INT8: int8x), or NULL for
 * F32 and F16. A static table: never freed. */
const kern_ilv_t *kern_ilv(qtype_t type);

/* Allocates room for `cap` rows of width `in` (1 <= in <= KERN_MAX_IN, cap >= 1); -1 with
 * err on a bad size or no memory. */
int kern_act_init(kern_act_t *act, size_t cap, size_t in, qerr_t *err);
/* Frees the buffers; safe on a zeroed or already freed struct. */
void kern_act_free(kern_act_t *act);

/* y[s * ldy + r] = sum_i W[r, i] * x[s, i] for r in [r0, r1), s < act->n. */
typedef void (*kern_matmul_q_fn)(const void *w, size_t in, const kern_act_t *act, float *y,
                                 size_t ldy, size_t r0, size_t r1);
/* Same with float activations x[n, ldx] (ldx >= in; elements in..ldx-1 never read), for F32,
 * F16, INT4 and INT8 weights: y = sum_i d_i * x[s, i] with d_i the dequantised weight. */
typedef void (*kern_matmul_f_fn)(const void *w, size_t in, const float *x, size_t ldx, size_t n,
                                 float *y, size_t ldy, size_t r0, size_t r1);

typedef struct {
    const char *name; /* cpu_isa_name of its level */
    /* Quantizes x[n, ldx] (n <= act->cap, rows of act->in floats, finite) into act; sets
     * act->n = n. Codes round half away from zero, by true division, as quant_act_row. */
    void (*quantize_act)(kern_act_t *act, const float *x, size_t ldx, size_t n);
    /* Indexed by qtype_t: TERNARY, INT4, INT8 (NULL for F32 and F16). */
    kern_matmul_q_fn matmul_q[QTYPE_COUNT];
    /* Indexed by qtype_t: F32, F16, INT4 and INT8 weights x FP32 activations (NULL for
     * TERNARY). INT4 / INT8 rows are dequantised in registers to exactly scale * code, so
     * these give the learner's weights x FP32 activations; the matmul_q entries of the same
     * types quantize the activations to int8 instead. */
    kern_matmul_f_fn matmul_f[QTYPE_COUNT];
    /* Indexed by qtype_t: TERNARY, INT4 and INT8 x int8 products on the interleaved copy w of
     * kern_ilv(type)->pack, for batches of >= kern_ilv(type)->min_batch tokens. y[s * ldy + r]
     * as matmul_q[type] on the row-major matrix, for rows r in [r0, r1) with r0 a multiple of
     * kern_ilv(type)->rows and r1 <= out (a panel cut by r1 is computed whole, stored up to r1).
     * TERNARY and INT8: bit-identical. INT4: the reference level bit for bit, SIMD levels
     * within rounding (kernels.h's first comment). NULL for F32 and F16, and for every type on
     * AVX2, where callers use matmul_q[type] on the row-major matrix: its row-major ternary
     * product is already at its own compute roof, its row-major INT4 product at 0.75-0.8 of its
     * own roofline. */
    kern_matmul_q_fn matmul_ilv[QTYPE_COUNT];
    /* FP16 conversions of n values, round to nearest even: bit-identical to fp16.h. */
    void (*f16_from_f32)(uint16_t *dst, const float *src, size_t n);
    void (*f16_to_f32)(float *dst, const uint16_t *src, size_t n);
    /* dst[i] = a[i] ^ b[i] for nwords words; dst may equal a or b. */
    void (*bits_xor)(uint64_t *dst, const uint64_t *a, const uint64_t *b, size_t nwords);
    /* Number of set bits in nwords words. */
    size_t (*bits_popcount)(const uint64_t *a, size_t nwords);
    /* Bit i of dst (bit i % 64 of word i / 64) = x[i] > thr, for i < nbits; the unused high
     * bits of the last word are cleared. */
    void (*bits_pack_gt)(uint64_t *dst, const float *x, float thr, size_t nbits);
} kern_ops_t;

/* Selects the level (cpu_isa_select) once; later calls return the first outcome. -1 with err
 * when QUILLAN_ISA is invalid. Call it at start-up, before kern_ops(). */
int kern_init(qerr_t *err);

/* The table of the selected level; asserts that kern_init succeeded. */
const kern_ops_t *kern_ops(void);

/* The table of a given level, or NULL when this build or this CPU lacks it (tests, bench). */
const kern_ops_t *kern_ops_for(cpu_isa_t isa);

/* One dot product: packed row `row` (type TERNARY, INT4 or INT8, width act->in) with
 * activation row s of act, through ops. */
float kern_dot_q(const kern_ops_t *ops, qtype_t type, const void *row, const kern_act_t *act,
                 size_t s);

#endif
