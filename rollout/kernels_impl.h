/* Private to the kernels: the per-level tables and helpers the level files share. */
#ifndef QUILLAN_KERNELS_IMPL_H
#define QUILLAN_KERNELS_IMPL_H

#include "kernels.h"

#include <string.h>

extern const kern_ops_t kern_ops_ref;
#ifdef QUILLAN_KERN_AVX2
extern const kern_ops_t kern_ops_avx2;
#endif
#ifdef QUILLAN_KERN_AVX512
extern const kern_ops_t kern_ops_avx512;
#endif

/* Reference entries the SIMD tables reuse where SIMD buys nothing (a few 64-bit words). */
void kern_ref_bits_xor(uint64_t *dst, const uint64_t *a, const uint64_t *b, size_t nwords);
size_t kern_ref_bits_popcount(const uint64_t *a, size_t nwords);
void kern_ref_bits_pack_gt(uint64_t *dst, const float *x, float thr, size_t nbits);

/* The row-interleaved layouts' sizes and packs (kernels_ref.c), the same on every level: the
 * entries of kern_ilv's table (contracts: kern_ilv_t). */
size_t kern_int4x_bytes(size_t out, size_t in);
void kern_int4x_pack(void *dst, const void *w, size_t out, size_t in);
size_t kern_ternx_bytes(size_t out, size_t in);
void kern_ternx_pack(void *dst, const void *w, size_t out, size_t in);
size_t kern_int8x_bytes(size_t out, size_t in);
void kern_int8x_pack(void *dst, const void *w, size_t out, size_t in);

/* Unaligned little-endian float32 read (row scales sit right after the codes). */
static inline float kern_load_f32(const void *p) {
    float v;
    memcpy(&v, p, sizeof v);
    return v;
}

/* Bytes of codes before the row scale of a ternary / int8 row of width `in`. */
static inline size_t kern_codes_bytes(qtype_t type, size_t in) {
    const qtype_traits_t *t = qtype_traits(type);
    return (in + t->block - 1) / t->block * t->block_bytes;
}

/* Panels of the interleaved copies (kernels.h), over whole 256-column blocks as the activation
 * rows are padded: ternx has 64-column chunks of 64 bytes, int8x 4-column quads of 64 bytes;
 * the panel's row scales (float32) follow its codes. */
static inline size_t kern_ternx_chunks(size_t in) {
    return 4 * (in / 256 + (in % 256 != 0));
}
static inline size_t kern_ternx_panel_bytes(size_t in) {
    return kern_ternx_chunks(in) * 64 + KERN_TERNX_ROWS * sizeof(float);
}
static inline size_t kern_int8x_quads(size_t in) {
    return 64 * (in / 256 + (in % 256 != 0));
}
static inline size_t kern_int8x_panel_bytes(size_t in) {
    return kern_int8x_quads(in) * 64 + KERN_INT8X_ROWS * sizeof(float);
}

/* Bytes from a tile of `tile` bytes to the whole tile at least KERN_PF_BYTES ahead. */
static inline size_t kern_pf_ahead(size_t tile) {
    return tile >= KERN_PF_BYTES ? tile : (KERN_PF_BYTES + tile - 1) / tile * tile;
}

#endif
