/* Element-wise and row-wise kernels of the CUDA learner, each mirroring its CPU reference in
 * common/ (the oracle): embedding and RMSNorm (layers.c), RoPE (attention.c), residual and
 * dropout (layers.c, same counter RNG as rng.h), fake quantization and BitLinear (quant.c, same
 * rounding rules), the chunked output head with log-prob, entropy and cross-entropy (layers.c)
 * and the router z-loss (moe.c).
 *
 * Conventions: every pointer is device memory unless said otherwise; tensors are FP32 unless a
 * cuda_dtype_t says otherwise; shape letters as in layers.h (BT rows, C channels, OC outputs,
 * V vocabulary). Everything is queued on the caller's stream s and returns without waiting.
 * Backward functions say whether they ASSIGN or ACCUMULATE, as on the CPU. Sizes and shapes are
 * the caller's contract (asserted on the host); token ids outside [0, V) are bugs and trap the
 * kernel (the next CUDA_CHECK reports it), as the CPU asserts.
 *
 * Exactness: where the CPU result depends only on rounding rules (fake quantization, BitLinear,
 * FP16 rounding, dropout masks, RoPE angles, embedding scatter order) these kernels use the same
 * operations in the same order with the same IEEE roundings (no FMA contraction where the CPU
 * has separate multiply and add) and give the same bits. Reductions (RMSNorm sums, head
 * logsumexp, cross-entropy) sum in another order than the CPU and agree to rounding: the
 * parity tests (tests/gpu/gpu_parity_ops.cu) hold them to named tolerances.
 *
 * quant.h's surrogate mode is a CPU gradient-check device: these kernels always quantize. */
#ifndef QUILLAN_CUDA_OPS_H
#define QUILLAN_CUDA_OPS_H

#include <stddef.h>
#include <stdint.h>

#include <cuda_runtime_api.h>

#include "cuda_check.h"
#include "cuda_gemm.h"

#ifdef __cplusplus
extern "C" {
#endif

#include "quant.h"
#include "rng.h"

/* ---- Conversions ---- */

/* dst[n] = src[n] converted: to FP16 and BF16 by round-to-nearest-even (FP16 bit-identical to
 * fp16_from_float, NaN payloads included), widening conversions exact, equal types copied. */
void cuda_convert(void *dst, cuda_dtype_t dst_dt, const void *src, cuda_dtype_t src_dt, size_t n,
                  cudaStream_t s);

/* ---- Embedding ---- */

/* out[BT, C] = wte[tokens[t]] (wte [V, C]). */
void cuda_embedding_forward(float *out, const int32_t *tokens, const float *wte, int BT, int C,
                            int V, cudaStream_t s);
/* dwte[V, C] += scatter of dout[BT, C] (ACCUMULATED). Each channel is summed over t in
 * increasing order, as the CPU does: deterministic and bit-identical to embedding_backward. */
void cuda_embedding_backward(float *dwte, const float *dout, const int32_t *tokens, int BT, int C,
                             int V, cudaStream_t s);

/* ---- RMSNorm ---- */

/* out[BT, C] = weight[C] * (inp * rstd), rstd[BT] = 1 / sqrt(mean(inp^2) + RMSNORM_EPS). */
void cuda_rmsnorm_forward(float *out, float *rstd, const float *inp, const float *weight, int BT,
                          int C, cudaStream_t s);
/* dinp[BT, C] += ..., dweight[C] += ... (both ACCUMULATED; dinp may be NULL), from the
 * forward's rstd. Deterministic (fixed summation order). */
void cuda_rmsnorm_backward(float *dinp, float *dweight, const float *dout, const float *inp,
                           const float *weight, const float *rstd, int BT, int C, cudaStream_t s);

/* ---- RoPE (attention.h) ---- */

/* Rotates each interleaved pair (2i, 2i+1) of every head of inp[B, T, C] (NH heads of
 * HS = C / NH channels, HS even, <= ATTN_MAX_HS) by pos * ROPE_THETA^(-2i/HS), pos = pos0 + t;
 * angles in double, rotation in FP32 exactly as rope_forward. out may equal inp. */
void cuda_rope_forward(float *out, const float *inp, int B, int T, int C, int NH, int pos0,
                       cudaStream_t s);
/* dinp = rotation of dout by -angle (ASSIGNED; dinp may equal dout). */
void cuda_rope_backward(float *dinp, const float *dout, int B, int T, int C, int NH, int pos0,
                        cudaStream_t s);

/* ---- Residual and dropout ---- */

/* out[N] = a + b (out may equal a or b). */
void cuda_residual_forward(float *out, const float *a, const float *b, size_t N, cudaStream_t s);
/* da[N] += dout, db[N] += dout (ACCUMULATED; either may be NULL). */
void cuda_residual_backward(float *da, float *db, const float *dout, size_t N, cudaStream_t s);

/* Inverted dropout with dropout_forward's mask: element i is dropped when the top 24 bits of
 * hash(rng.key, rng.counter + i) / 2^24 < p, else scaled by 1 / (1 - p); a copy when !training
 * or p == 0. p in [0, 1). out may equal inp. rng is passed by value (host struct). */
void cuda_dropout_forward(float *out, const float *inp, float p, int training, rng_stream_t rng,
                          size_t N, cudaStream_t s);
/* dinp[N] += dout * mask / (1 - p) with the forward's mask (ACCUMULATED). */
void cuda_dropout_backward(float *dinp, const float *dout, float p, int training, rng_stream_t rng,
                           size_t N, cudaStream_t s);

/* ---- Fake quantization (quant.h; STE backward = identity, nothing to launch) ---- */

/* out[rows, cols] = value of w[rows, cols] in format `type` (QUANT_F32 copies), computed in
 * FP32 exactly as quant_fake_forward, then stored as out_dt (FP16/BF16 round to nearest even:
 * the GEMM copy of the weights in one pass). out may equal w only when out_dt is F32. */
void cuda_quant_fake_forward(quant_type_t type, void *out, cuda_dtype_t out_dt, const float *w,
                             int rows, int cols, cudaStream_t s);
/* out[rows, cols] = s_x * code per row of x (int8 activations, quant_fake_act_forward), stored
 * as out_dt. out may equal x only when out_dt is F32. */
void cuda_quant_fake_act_forward(void *out, cuda_dtype_t out_dt, const float *x, int rows, int cols,
                                 cudaStream_t s);

/* ---- BitLinear (quant.h: bitlinear_weight_codes / bitlinear_forward_codes) ---- */

/* wcode[OC, C] = ternary codes of weight[OC, C] stored as code_dt (any type holds -1..1
 * exactly), wq[OC, C] = s_w * code (FP32), sw[OC] = s_w = mean|w| summed in index order as the
 * CPU does. All ASSIGNED, bit-identical to bitlinear_weight_codes. */
void cuda_bitlinear_weight_codes(void *wcode, cuda_dtype_t code_dt, float *wq, float *sw,
                                 const float *weight, int C, int OC, cudaStream_t s);
/* out[BT, OC] = (integer dot of the activation codes of inp[BT, C] and wcode) * sw[o] * sx[t],
 * xq[BT, C] = sx * code, sx[BT] = max|x| / 127: bitlinear_forward_codes bit for bit. The
 * integer dot runs as a cuda_gemm_run of code_dt operands with FP32 accumulation, exact while
 * C * 128 < 2^24 (asserted). xcode is caller scratch of BT * C elements of code_dt (the
 * activation codes; left holding them). All outputs ASSIGNED. */
void cuda_bitlinear_forward_codes(cuda_gemm_t *g, float *out, float *xq, float *sx, void *xcode,
                                  const float *inp, const void *wcode, const float *sw, int BT,
                                  int C, int OC, cuda_dtype_t code_dt, cudaStream_t s);
/* STE backward: dinp[BT, C] += dout wq, dweight[OC, C] += dout^T xq (FP32 GEMMs, both
 * ACCUMULATED; either may be NULL). */
void cuda_bitlinear_backward(cuda_gemm_t *g, float *dinp, float *dweight, const float *dout,
                             const float *wq, const float *xq, int BT, int C, int OC,
                             cudaStream_t s);

/* ---- Output head (layers.h head_forward / head_backward) ---- */

/* Device scratch, in bytes, that cuda_head_forward / cuda_head_backward need for up to R
 * active rows, C channels, vocabulary chunks of vchunk entries and weights of type wdt: the
 * gathered rows [R, C] (wdt), their gradient [R, C] (FP32), one logit tile [R, vchunk] (FP32)
 * and its gradient (wdt), and per-row online-softmax state. */
size_t cuda_head_scratch_bytes(int R, int C, int vchunk, cuda_dtype_t wdt);

/* For each active row t = rows[r] (r < R; rows are distinct indices in [0, BT); rows == NULL
 * means rows[r] = r with R == BT), with z = weight[V, C] inp[t] / temperature:
 *   lse[t] = logsumexp(z), logp[t] = z[targets[t]] - lse[t],
 *   entropy[t] = -sum_v p_v log p_v (entropy may be NULL).
 * Other rows get 0 in every output (all outputs [BT], ASSIGNED). Logits exist only as
 * [R, vchunk] tiles (cuda_gemm_run of wdt operands, FP32 out); the softmax state is accumulated in
 * double with an online logsumexp, as on the CPU. weight has type wdt (the model's GEMM copy of
 * the head); inp is FP32 and is converted to wdt on gathering. temperature > 0; targets [BT] in
 * [0, V) on active rows. scratch has cuda_head_scratch_bytes(R, C, vchunk, wdt) bytes. */
void cuda_head_forward(cuda_gemm_t *g, float *logp, float *entropy, float *lse, const float *inp,
                       const void *weight, cuda_dtype_t wdt, const int32_t *targets,
                       const int32_t *rows, int R, float temperature, int BT, int C, int V,
                       int vchunk, void *scratch, cudaStream_t s);
/* Backward of cuda_head_forward given dlogp[BT] and dentropy[BT] (either may be NULL for zero;
 * entropy must be the forward's when dentropy is given), over the same active rows: recomputes
 * each tile's logits, then dinp[BT, C] += ... (may be NULL) and dweight[V, C] += ... (FP32
 * master gradient), both ACCUMULATED. The logit gradients are stored as wdt for the two GEMMs,
 * so with FP16 the caller scales the loss (dynamic loss scaling) to keep them normal. */
void cuda_head_backward(cuda_gemm_t *g, float *dinp, float *dweight, const float *dlogp,
                        const float *dentropy, const float *inp, const void *weight,
                        cuda_dtype_t wdt, const int32_t *targets, const float *lse,
                        const float *entropy, const int32_t *rows, int R, float temperature, int BT,
                        int C, int V, int vchunk, void *scratch, cudaStream_t s);

/* Weighted mean cross-entropy, crossentropy_forward: *loss = sum_t w[t] * -logp[t] / sum_t w[t]
 * (0 when sum w == 0), summed in double; loss is one device double, ASSIGNED. */
void cuda_crossentropy_forward(double *loss, const float *logp, const float *w, int BT,
                               cudaStream_t s);
/* dlogp[t] = -dloss * w[t] / sum w (ASSIGNED; all 0 when sum w == 0). dloss is a host value
 * (the loss scale under dynamic loss scaling). */
void cuda_crossentropy_backward(float *dlogp, float dloss, const float *w, int BT, cudaStream_t s);

/* ---- Router z-loss (moe.h moe_zloss_forward / moe_zloss_backward) ---- */

/* *out = mean over the T rows of logits[T, n] of logsumexp(row)^2 (0 when T == 0); out is one
 * device float, ASSIGNED. Deterministic. */
void cuda_zloss_forward(float *out, const float *logits, int T, int n, cudaStream_t s);
/* dlogits[T, n] += dloss * 2 lse_t / T * softmax(row t) (ACCUMULATED; nothing when T == 0 or
 * dloss == 0). dloss is a host value. */
void cuda_zloss_backward(float *dlogits, float dloss, const float *logits, int T, int n,
                         cudaStream_t s);

#ifdef __cplusplus
}
#endif

#endif
