/* The three-level hierarchical MoE of MODEL.md on the device: forward and backward of
 * common/moe.h's moe_forward / moe_backward, term for term, for one layer.
 *
 * Sizes, parameters and records are the CPU's types: moe_dims_t, moe_params_t (here holding
 * DEVICE pointers to FP32 tensors, the caller's fake-quantized weights, laid out as
 * moe_params_map does), moe_bias_t (DEVICE pointers), moe_route_t and moe_aux_t (host). Every
 * STE is the identity, so the gradients accumulated into a moe_params_t of device gradients are
 * those of the latent weights, as on the CPU.
 *
 * Data flow of a forward (slot s = t*KM + m is token t's m-th kept mini, as in moe.c):
 *   overseer      ov_pre = u W1s^T, y = SiLU(ov_pre) W2s^T           cuda_gemm
 *   gate          logits u Wg^T (FP32), top-KM of logits + bias, softmax over the kept
 *   grouping      slots sorted by mini with a stable radix sort (ascending slot id within a
 *                 mini, the CPU's grouped-row order); offsets copied to the host
 *   mini routers  per mini, on its grouped rows: router and micro-router logits (FP32 GEMMs),
 *                 top-KE / top-KN with the bias, softmax over the kept
 *   experts       expert slots sorted by global expert j*E + e (stable), offsets to the host,
 *                 per expert one GEMM pair on its gathered rows: W2 ReLU²(W1 x)
 *   micro agents  per slot: s_i = down_i . u, sum_i w_i SiLU(s_i) up_i
 *   combine       mini_out = sum q_e E_e + micro part; y += sum_m p_m mini_out, per token in a
 *                 fixed order
 * Top-k: the largest score logits + bias, ties to the LOWEST index (moe_topk's rule, computed
 * from FP32 logits as on the CPU). Sums over tokens (balance and z losses, gradients of shared
 * vectors) run in a fixed order: results do not depend on scheduling, run to run. Per-token
 * scatter-adds are done by the owner of each output row (no floating-point atomics).
 *
 * Precision (dt of cuda_moe_new): CUDA_DT_F32 runs every GEMM in FP32. CUDA_DT_F16 / BF16 run
 * the overseer and expert GEMMs (forward and backward) on that type with FP32 accumulation,
 * reading the weights from a cuda_moe_lowp_t copy the caller keeps, and rounding activations
 * and upstream gradients to it as they are gathered; router logits, softmaxes, the micro agents,
 * losses and all parameter gradients stay FP32.
 *
 * Synchronisation: cuda_moe_forward synchronises its stream three times (mini offsets, expert
 * offsets, the aux results), because the grouped GEMMs are launched with host-side sizes; the
 * backward reuses the forward's offsets and does not synchronise. Not thread-safe per object. */
#ifndef QUILLAN_CUDA_MOE_H
#define QUILLAN_CUDA_MOE_H

#include <stddef.h>
#include <stdint.h>

#include <cuda_runtime_api.h>

#include "cuda_gemm.h"

#ifdef __cplusplus
extern "C" {
#endif

#include "error.h"
#include "moe.h"

/* The overseer and expert weights in the compute type of a F16 / BF16 layer (device pointers,
 * the same values as the FP32 tensors, laid out like them). Unused by a F32 layer. */
typedef struct {
    const void *ov_w1;  /* [OH, C] */
    const void *ov_w2;  /* [C, OH] */
    const void *exp_w1; /* [M, E, EH, C] */
    const void *exp_w2; /* [M, E, C, EH] */
} cuda_moe_lowp_t;

/* Saved activations, routing and scratch of one layer for up to max_BT tokens (device buffers
 * and their small host mirrors). Opaque, heap. */
typedef struct cuda_moe cuda_moe_t;

/* NULL with err filled: QERR_RANGE for sizes outside moe_acts_new's limits (k's in 1..n, at most
 * 64, max_BT >= 1), or dt out of range; QERR_NOMEM for device or host memory. */
cuda_moe_t *cuda_moe_new(const moe_dims_t *d, int max_BT, cuda_dtype_t dt, qerr_t *err);
/* Frees everything and NULLs *m; safe on NULL and twice. Queued work must be finished. */
void cuda_moe_destroy(cuda_moe_t **m);
/* Device bytes the layer holds (for memory reports). */
size_t cuda_moe_bytes(const cuda_moe_t *m);

/* ---- loads and loss-free balancing ---- */

/* Counters of one layer's selection counts on the device: cuda_moe_load_len(d) unsigned 64-bit
 * integers laid out as moe_load_t's arrays back to back: gate [M], router [M, E], micro [M, N].
 * The caller allocates and zeroes them (cuda_buf_calloc) and passes them to each forward. */
size_t cuda_moe_load_len(const moe_dims_t *d);
/* host->gate/router/micro := the device counters (ASSIGNED; synchronous). 0, or -1 with err. */
int cuda_moe_load_download(moe_load_t *host, const unsigned long long *load, cudaStream_t s,
                           qerr_t *err);
/* b_k += rate * sign(mean load - load_k) for every router, as moe_bias_update (a router that saw
 * no token is unchanged); bias: device moe_bias_t. Does not reset the counters. */
void cuda_moe_bias_update(const moe_bias_t *bias, const unsigned long long *load,
                          const moe_dims_t *d, float rate, cudaStream_t s);

/* ---- the layer ---- */

/* y [BT, C] = HierMoE(u [BT, C]) (ASSIGNED; device pointers), as moe_forward. p: device FP32
 * tensors; lp: the compute-type copies (NULL for a F32 layer); bias: device biases or NULL (no
 * loss-free balancing); load: device counters to add this forward's selections to, or NULL.
 * replay: a HOST record (validated here with moe_route_validate, then uploaded) or NULL, as
 * on the CPU: kept indices from the record, gate weights from the logits of those indices,
 * aux->mismatches counting own choices that differ. *aux (host) is ASSIGNED. g runs the GEMMs
 * on stream s. 0, or -1 with err (QERR_INVALID for a malformed record, QERR_RANGE for BT
 * outside [0, max_BT], QERR_IO for a failed copy). */
int cuda_moe_forward(cuda_moe_t *m, cuda_gemm_t *g, float *y, moe_aux_t *aux,
                     unsigned long long *load, const float *u, const moe_params_t *p,
                     const cuda_moe_lowp_t *lp, const moe_bias_t *bias, const moe_route_t *replay,
                     int BT, cudaStream_t s, qerr_t *err);

/* Backward of the last cuda_moe_forward on m with the same u, p and lp: the loss is
 * L(y) + dbalance * aux.balance + dz * aux.z (moe_backward's convention). ACCUMULATES into
 * du [BT, C] and every tensor of *dp (device FP32 gradients). dy [BT, C] device. */
void cuda_moe_backward(cuda_moe_t *m, cuda_gemm_t *g, moe_params_t *dp, float *du, const float *dy,
                       const float *u, const moe_params_t *p, const cuda_moe_lowp_t *lp,
                       float dbalance, float dz, cudaStream_t s);

/* The routing the last forward used (its own choice or the replayed record) into *out, a host
 * moe_route_t initialised for at least that forward's BT tokens (out->BT is set). Synchronous.
 * 0, or -1 with err (QERR_RANGE when out is too small). */
int cuda_moe_route_download(const cuda_moe_t *m, moe_route_t *out, cudaStream_t s, qerr_t *err);

#ifdef __cplusplus
}
#endif

#endif
