/* Packed storage formats of the quantized policy: one table describing every type (ggml style).
 *
 * These are the bytes a snapshot / policy file holds per weight row and what the rollout
 * kernels (rollout/kernels.h) read. The codes and scales are exactly those of common/quant.h
 * (MODEL.md §Quantization): rounding half away from zero, scales from a sequential float sum
 * or max in index order, codes by true division, a zero scale gives zero codes. This file adds
 * only the packing. All multi-byte values are little-endian; a row starts at any byte address
 * (scales are read with memcpy), so matrices are plain arrays of rows: row r of a [out, in]
 * matrix starts at r * qtype_row_bytes(type, in).
 *
 * Row layouts for a row of n weights (nb = number of blocks = ceil(n / block)):
 *
 * QTYPE_F32      n float32.
 * QTYPE_F16      n IEEE binary16 (fp16.h, round to nearest even).
 * QTYPE_TERNARY  block 256: nb blocks of 64 bytes, then the float32 row scale s_w.
 *                In block b, byte j (0..63) holds in bits 2k..2k+1 (k = 0..3) the code of
 *                weight 256 b + 64 k + j, stored as w + 1 in {0, 1, 2} (3 never occurs).
 *                Why: one 64-byte load and four shift+mask steps give four registers of 64
 *                consecutive weights, each matching 64 consecutive activations; w + 1 >= 0 is
 *                the unsigned operand of vpdpbusd / vpmaddubsw, and sum (w+1) x = sum w x +
 *                sum x, so the activation sum is subtracted once per row. Padding weights
 *                (index >= n) have code 1 (w = 0).
 * QTYPE_INT4     block 128 (4 groups of 32): nb blocks of 64 bytes of nibbles, then 4 nb FP16
 *                group scales (group g covers weights 32 g .. 32 g + 31). In block b, byte j
 *                (0..63): low nibble = weight 128 b + j, high nibble = weight 128 b + 64 + j,
 *                stored as code + 8 in 1..15 (unsigned operand again; the kernels subtract 8
 *                times each group's activation sum). Padding: nibble 8 (code 0), scale 0.
 *                4.5 bits per weight when n is a multiple of 128.
 * QTYPE_INT8     block 64: ceil(n / 64) * 64 bytes holding code + 128 in 1..255 (excess-128,
 *                unsigned operand; padding 128 = code 0), then the float32 row scale.
 *
 * The kernels also require the activations padded with zeros to KERN_ACT_PAD (a multiple of
 * every block), which is what makes padded weights harmless. */
#ifndef QUILLAN_QTYPES_H
#define QUILLAN_QTYPES_H

#include <stddef.h>
#include <stdint.h>

typedef enum {
    QTYPE_F32 = 0,
    QTYPE_F16,
    QTYPE_TERNARY,
    QTYPE_INT4,
    QTYPE_INT8,
    QTYPE_COUNT
} qtype_t;

#define QTYPE_TERNARY_BLOCK 256
#define QTYPE_INT4_BLOCK 128
#define QTYPE_INT4_GROUP 32
#define QTYPE_INT8_BLOCK 64
#define QTYPE_TERNARY_EPS 1e-5f
#define QTYPE_INT8_OFFSET 128 /* stored byte = code + 128 */
#define QTYPE_INT4_OFFSET 8   /* stored nibble = code + 8 */

/* What the table says about one type. block: weights per block along the input axis (rows
 * are padded to whole blocks); block_bytes: bytes per block including any per-block scales;
 * row_extra: bytes after the blocks (the float32 row scale). */
typedef struct {
    const char *name; /* "f32", "f16", "ternary", "int4", "int8" */
    size_t block;
    size_t block_bytes;
    size_t row_extra;
    /* Packs src[n] (n >= 1, finite) into dst[qtype_row_bytes(type, n)], padding included. */
    void (*quantize_row_ref)(const float *src, void *dst, size_t n);
    /* Unpacks the n weights of a packed row: dst[i] = scale * code exactly as the learner's
     * fake quantizer computes it (one float multiply). */
    void (*dequantize_row_ref)(const void *src, float *dst, size_t n);
} qtype_traits_t;

/* The table entry of a valid type; asserts on an out-of-range type (a bug). */
const qtype_traits_t *qtype_traits(qtype_t type);

/* Name of a type ("?" when out of range). */
const char *qtype_name(qtype_t type);

/* Type whose name is `name`, or QTYPE_COUNT when there is none (outside input: check it). */
qtype_t qtype_from_name(const char *name);

/* Bytes of one packed row of n weights; SIZE_MAX when that overflows. */
size_t qtype_row_bytes(qtype_t type, size_t n);

/* Number of weights a packed row of n really stores (n rounded up to whole blocks). */
size_t qtype_row_padded(qtype_t type, size_t n);

/* The float32 row scale of a ternary or int8 row of n weights (unaligned read). */
float qtype_row_scale(qtype_t type, const void *row, size_t n);

/* Round half away from zero and clip to [lo, hi]: the code of every quantizer. */
int qtype_round_clip(float v, int lo, int hi);

#endif
