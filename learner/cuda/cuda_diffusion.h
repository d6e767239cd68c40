/* The bit-level diffusion plan stage of MODEL.md on the device: common/diffusion.h's
 * diffusion_forward / _backward (K-step deterministic plan sampler, write-back with
 * straight-through soft bits on the last step, truncated backprop), its training loss
 * diffusion_loss_forward / _backward, the SimHash codes and the noise draw.
 *
 * Shapes and parameters are the CPU's: diffusion_dims_t; diffusion_params_t holding DEVICE
 * pointers to the FP32 latent tensors (diffusion_params_map layout); packed codes [BT, Lw]
 * of 64-bit words (bit b is bit b%64 of word b/64, bits at and above Lb zero); plans in
 * diffusion_plan_t (host). The device stage always quantizes (there is no surrogate mode: the
 * finite-difference checks run on the CPU).
 *
 * Exactness, where learner and worker must agree:
 *   - Plan noise z_K is rng_plan_word(seed, pos, w), the splitmix64 chain of common/rng.h
 *     evaluated on the device in 64-bit integers: identical bits.
 *   - Training noise m: the caller's rng_stream_t is consumed exactly as diffusion_noise_draw
 *     does (1 + Lb values per position, in order); tau and p(tau) are computed on the host with
 *     the CPU's own functions, the Lb uniforms of each position on the device by counter:
 *     identical bits.
 *   - Sinusoids of tau and the sampler's n_k ratios p_{k-1}/p_k come from the CPU functions
 *     (diffusion_sinusoid, diffusion_flip_prob) on the host, uploaded per call.
 *   - BitLinear: ternary weight codes and scales (sequential sums per row, true division) and
 *     int8 activation codes follow quant.h's rules; the products are integer dot products
 *     (exact in FP32 accumulation), scaled by s_w then s_x, as bitlinear_forward_codes. The
 *     activations entering each quantizer come from RMSNorm sums whose order differs from the
 *     CPU's, so an activation code can differ by one where x / s_x lies within rounding of a
 *     half; the parity program bounds the effect.
 *   - The sampler step (e = [pi > 1/2], n_k, re-noising the n_k least confident flips, ties to
 *     the lowest bit) is diffusion_plan_step's rule.
 *
 * Precision (dt of cuda_diffusion_new): the type of the forward's code products, exact in every
 * dt (codes are small integers, exactly representable in FP16 and BF16, summed in FP32); the
 * backward's products (cuda_bitlinear_backward) and everything else are FP32.
 *
 * Calls are asynchronous on the caller's stream except where a host result is returned. */
#ifndef QUILLAN_CUDA_DIFFUSION_H
#define QUILLAN_CUDA_DIFFUSION_H

#include <stddef.h>
#include <stdint.h>

#include <cuda_runtime_api.h>

#include "cuda_gemm.h"

#ifdef __cplusplus
extern "C" {
#endif

#include "diffusion.h"
#include "error.h"
#include "rng.h"

/* Saved activations (the last sampler step and the loss path), weight codes and scratch for up
 * to max_BT positions, on the device with small host staging. Opaque, heap. */
typedef struct cuda_diffusion cuda_diffusion_t;

/* NULL with err filled: QERR_RANGE for sizes diffusion_acts_new would reject (Lb a multiple of 32
 * up to DIFFUSION_MAX_BITS, D even, K, NB, max_BT >= 1) or a width whose integer products would
 * not be exact in FP32 (127 * width >= 2^24); QERR_NOMEM. */
cuda_diffusion_t *cuda_diffusion_new(const diffusion_dims_t *d, int max_BT, cuda_dtype_t dt,
                                     qerr_t *err);
/* Frees everything and NULLs *a; safe on NULL and twice. Queued work must be finished. */
void cuda_diffusion_destroy(cuda_diffusion_t **a);
size_t cuda_diffusion_bytes(const cuda_diffusion_t *a);

/* As diffusion_acts_weights_version: with version >= 1 the ternary codes are made by the first
 * call that sees the version and reused until it changes; 0 (default) requantizes every call. */
void cuda_diffusion_weights_version(cuda_diffusion_t *a, uint64_t version);

/* ---- codes and noise ---- */

/* code [BT, Lw] (ASSIGNED, device) = c(targets[t]) = [R head[targets[t]] > 0] on rows with
 * mask[t] != 0, zero elsewhere, as diffusion_code (each dot product summed in index order by
 * one thread). R [Lb, C], head [V, C], targets [BT] (in [0, V) where mask != 0), mask [BT]:
 * device. */
void cuda_diffusion_code(uint64_t *code, const float *R, const float *head, const int32_t *targets,
                         const float *mask, int BT, int Lb, int C, cudaStream_t s);

/* The training noise of diffusion_noise_draw for BT positions from *rng (host; advanced by
 * BT * (1 + Lb) draws exactly as the CPU): tau [BT] and m [BT, Lw], device, ASSIGNED.
 * Uses the object's host staging (so a is not const) and synchronises the stream before
 * returning, so the staging is free for the next call. 0, or -1 with err (QERR_RANGE for BT
 * outside [0, max_BT], QERR_IO for a failed copy). */
int cuda_diffusion_noise_draw(cuda_diffusion_t *a, float *tau, uint64_t *m, rng_stream_t *rng,
                              int BT, cudaStream_t s, qerr_t *err);

/* ---- the stage ---- */

/* out [BT, C] = BL_dec(2 c_hat - 1) (ASSIGNED) for u [BT, C] at absolute positions pos [BT]
 * (device), as diffusion_forward: without replay the K sampler steps from z_K of
 * diffusion_plan_noise(seed, pos[t]) (earlier steps detached), c_hat = z_0; with a HOST replay
 * record (validated with diffusion_plan_validate, then uploaded) z_1 and z_0 come from it, only
 * the last step runs, and aux->mismatches counts positions whose own z_0 differs. *aux (host)
 * ASSIGNED; under replay the stream is synchronised once for the mismatch count, otherwise
 * the call is asynchronous. g runs the GEMMs. 0, or -1 with err
 * (QERR_INVALID malformed record, QERR_RANGE BT outside [0, max_BT], QERR_IO copy failure). */
int cuda_diffusion_forward(cuda_diffusion_t *a, cuda_gemm_t *g, float *out, diffusion_aux_t *aux,
                           const float *u, const int32_t *pos, const diffusion_params_t *p,
                           const diffusion_plan_t *replay, uint64_t diffusion_seed, int BT,
                           cudaStream_t s, qerr_t *err);

/* Backward of the last cuda_diffusion_forward with the same u and p: straight-through soft bits
 * x~ = z_1 + pi - 2 z_1 pi on the last step, z_1 detached. ACCUMULATES into du [BT, C] and *dp
 * (device FP32 gradients). dout [BT, C] device. */
void cuda_diffusion_backward(cuda_diffusion_t *a, cuda_gemm_t *g, diffusion_params_t *dp, float *du,
                             const float *dout, const float *u, const diffusion_params_t *p,
                             cudaStream_t s);

/* Training loss of diffusion_loss_forward: z = code XOR m, l = f(z, tau, u), *loss (device, one
 * float, ASSIGNED) = sum_t mask[t] mean_b BCE(l_tb, m_tb) / sum_t mask[t] (0 when no mask > 0).
 * code, m [BT, Lw]; tau, mask [BT]; all device. Synchronises once: tau comes to the host so that
 * the time sinusoids are the CPU's diffusion_sinusoid bits. 0, or -1 with err (QERR_RANGE for
 * BT outside [0, max_BT], QERR_IO for a failed copy). */
int cuda_diffusion_loss_forward(cuda_diffusion_t *a, cuda_gemm_t *g, float *loss,
                                const uint64_t *code, const uint64_t *m, const float *tau,
                                const float *mask, const float *u, const diffusion_params_t *p,
                                int BT, cudaStream_t s, qerr_t *err);

/* Backward of the last cuda_diffusion_loss_forward with upstream gradient dloss (host scalar).
 * ACCUMULATES into du [BT, C] and *dp. */
void cuda_diffusion_loss_backward(cuda_diffusion_t *a, cuda_gemm_t *g, diffusion_params_t *dp,
                                  float *du, float dloss, const float *u,
                                  const diffusion_params_t *p, cudaStream_t s);

/* The plan the last forward used (own or replayed) into *plan (host, diffusion_plan_init'ed for
 * at least BT positions and the same Lb; plan->BT is set). Synchronous. 0, or -1 with err
 * (QERR_RANGE too small or wrong Lb, QERR_IO). */
int cuda_diffusion_plan_download(const cuda_diffusion_t *a, diffusion_plan_t *plan, cudaStream_t s,
                                 qerr_t *err);

#ifdef __cplusplus
}
#endif

#endif
