/* Multi-head causal self-attention with rotary position embedding (MODEL.md).
 *
 * Layout: q, k, v and out are [B, T, C] with head h owning channels [h*HS, (h+1)*HS), HS = C/NH
 * (even, <= ATTN_MAX_HS). The projections (wq, wk, wv, wo) are linear layers (layers.h) around
 * these functions: q = rope(x wq^T), k = rope(x wk^T), v = x wv^T, y = attention(q, k, v) wo^T.
 *
 * The production forward is FlashAttention: queries in tiles of ATTN_TILE_Q rows stream over
 * keys in tiles of ATTN_TILE_K with an online softmax, keeping only the per-row logsumexp;
 * no T x T buffer exists. The backward recomputes scores tile by tile (FlashAttention-2). The
 * double (gradient-check) build uses tiny tiles so that finite differences on a few tokens
 * cross tile boundaries. Work is split across OpenMP threads by (batch, head, query tile);
 * gemm() calls inside run on the calling thread (gemm.h). */
#ifndef QUILLAN_ATTENTION_H
#define QUILLAN_ATTENTION_H

#include "error.h"
#include "real.h"

#define ROPE_THETA 10000.0 /* RoPE base */
#define ATTN_MAX_HS 256    /* largest head size */
#if REAL_IS_DOUBLE
#define ATTN_TILE_Q 4
#define ATTN_TILE_K 3
#else
#define ATTN_TILE_Q 32
#define ATTN_TILE_K 64
#endif

/* ---- RoPE ---- */

/* Rotates each interleaved pair (2i, 2i+1) of every head of inp[B, T, C] by the angle
 * pos * ROPE_THETA^(-2i/HS), pos = pos0 + t (angles computed in double, then applied in
 * real). out may equal inp. */
void rope_forward(real *out, const real *inp, int B, int T, int C, int NH, int pos0);
/* dinp = rotation by -angle of dout (ASSIGNED; dinp may equal dout, RoPE needs no inputs). */
void rope_backward(real *dinp, const real *dout, int B, int T, int C, int NH, int pos0);
/* rope_forward of one row in two parts, for a caller that rotates several rows at one position
 * (the engine: q and k of every layer): cs, sn [HS/2], HS = C / NH, get the cosines and sines
 * of the angles at position pos; rope_rotate applies them to one row inp[C] (out may equal
 * inp). rope_angles then rope_rotate gives rope_forward's bits. */
void rope_angles(real *cs, real *sn, int pos, int HS);
void rope_rotate(real *out, const real *inp, const real *cs, const real *sn, int C, int NH);

/* ---- Causal attention ---- */

/* out[B, T, C]: row t of head h attends to keys 0..t with softmax(q k^T / sqrt(HS)).
 * lse[B, NH, T] receives each row's logsumexp of the scaled scores, for the backward.
 * out must not alias q, k or v. */
void attention_forward(real *out, real *lse, const real *q, const real *k, const real *v, int B,
                       int T, int C, int NH);
/* dq, dk, dv [B, T, C] += gradients given dout[B, T, C] and the forward's out and lse
 * (ACCUMULATED). */
void attention_backward(real *dq, real *dk, real *dv, const real *dout, const real *q,
                        const real *k, const real *v, const real *out, const real *lse, int B,
                        int T, int C, int NH);

/* Test oracle only: the same function with a materialised T x T score matrix per head,
 * accumulated in double. Returns -1 (QERR_NOMEM) when it cannot allocate. */
int attention_forward_ref(real *out, const real *q, const real *k, const real *v, int B, int T,
                          int C, int NH, qerr_t *err);

/* ---- Decoding with a KV cache ---- */

/* One query against n cached positions: out[C] = what attention_forward gives at row n-1 of a
 * sequence whose keys/values are kcache[n, ldc] and vcache[n, ldc] (row i = position i, RoPE
 * already applied to keys) and whose query at position n-1 is q[C] (RoPE applied). The
 * caller writes the new token's k and v at row n-1 first. Same tiles and arithmetic as the
 * full forward. ldc >= C is the cache's row stride. */
void attention_decode(real *out, const real *q, const real *kcache, const real *vcache, int n,
                      int ldc, int C, int NH);

/* A KV cache for L layers of up to max_T positions of C channels: K and V per layer, each
 * [max_T, C] row-major in `real`. Owns its memory. */
typedef struct attn_kvcache attn_kvcache_t;

/* NULL with err filled (QERR_RANGE for non-positive sizes, QERR_NOMEM) on failure. */
attn_kvcache_t *attn_kvcache_new(int L, int max_T, int C, qerr_t *err);
/* Frees the cache and NULLs *cache; safe on NULL and twice. */
void attn_kvcache_destroy(attn_kvcache_t **cache);
int attn_kvcache_max_len(const attn_kvcache_t *cache);
/* Layer l's K or V buffer [max_T, C] (owned by the cache). */
real *attn_kvcache_k(attn_kvcache_t *cache, int l);
real *attn_kvcache_v(attn_kvcache_t *cache, int l);

/* Decode step of layer l at position pos (0 <= pos < max_len): stores k_new[C] and v_new[C]
 * (RoPE already applied to k_new) at row pos of the layer's cache, then
 * attention_decode(out, q, K, V, pos + 1, C, C, NH). Rows 0..pos-1 must hold earlier steps. */
void attn_kvcache_step(real *out, attn_kvcache_t *cache, int l, int pos, const real *q,
                       const real *k_new, const real *v_new, int NH);

#endif
