/* Causal multi-head flash attention on the device: forward and backward of common/attention.h's
 * attention_forward / attention_backward (RoPE is applied by the caller, cuda_ops.h).
 *
 * Layout (the CPU's): q, k, v, out and their gradients are [B, T, C] row-major FP32 device
 * arrays, head h owning channels [h*HS, (h+1)*HS), HS = C / NH; lse is [B, NH, T]. Row t of
 * head h attends to keys 0..t with softmax(q k^T / sqrt(HS)).
 *
 * Algorithm: FlashAttention-2. The forward streams key tiles past a tile of query rows with an
 * online softmax and keeps only each row's logsumexp; no T x T buffer exists. The backward
 * recomputes the scores tile by tile from q, k and lse: one kernel owns a tile of keys and
 * sums dk and dv over the query tiles, another owns a tile of queries and sums dq, so every
 * output element is written by exactly one thread block (no atomics: the result does not depend
 * on scheduling, run to run).
 *
 * Precision (cuda_attn_prec_t): tiles are rounded to the compute type as they are loaded into
 * shared memory (so FP32 tensors in, FP32 tensors out in every mode); the two products of each
 * tile run on that type, with FP32 accumulation; scores, the softmax statistics, the output
 * accumulator and every gradient sum stay FP32. FP32 is the checking path (plain SIMT
 * arithmetic, same tiling); FP16 uses WMMA tensor cores on sm_75+, BF16 on sm_80+.
 *
 * Supported shapes: NH >= 1, C % NH == 0, HS a multiple of 16 up to CUDA_ATTN_MAX_HS (the tiny
 * preset has HS 32, the 512m preset 64), B, T >= 1. cuda_attn_check says whether a shape and
 * precision run on the current device; the launchers assert it (a bad shape there is a bug).
 *
 * Every call is asynchronous on the caller's stream and allocates nothing. */
#ifndef QUILLAN_CUDA_ATTN_H
#define QUILLAN_CUDA_ATTN_H

#include <stddef.h>

#include <cuda_runtime_api.h>

#include "cuda_check.h" /* error.h, with C linkage from CUDA C++ */

#ifdef __cplusplus
extern "C" {
#endif

#define CUDA_ATTN_MAX_HS 128 /* largest head size */

typedef enum {
    CUDA_ATTN_FP32 = 0, /* FP32 SIMT products: the path that checks the others */
    CUDA_ATTN_FP16,     /* FP16 tensor-core products, FP32 accumulation (sm_75+) */
    CUDA_ATTN_BF16,     /* BF16 tensor-core products, FP32 accumulation (sm_80+) */
    CUDA_ATTN_PREC_COUNT
} cuda_attn_prec_t;

/* "fp32" | "fp16" | "bf16"; "?" out of range. */
const char *cuda_attn_prec_name(cuda_attn_prec_t prec);

/* 0 when attention of this shape and precision runs on the current device; -1 with err filled
 * otherwise (QERR_RANGE for a shape outside the list above, QERR_INVALID for BF16 below sm_80
 * or a device whose shared memory per block cannot hold the tiles, QERR_IO when the device
 * cannot be queried). */
int cuda_attn_check(int B, int T, int C, int NH, cuda_attn_prec_t prec, qerr_t *err);

/* out [B, T, C] (ASSIGNED) = causal attention of q, k, v [B, T, C]; lse [B, NH, T] (ASSIGNED)
 * each row's logsumexp of the scaled scores, for the backward. out must not alias q, k or v.
 * All device pointers. */
void cuda_attn_forward(float *out, float *lse, const float *q, const float *k, const float *v,
                       int B, int T, int C, int NH, cuda_attn_prec_t prec, cudaStream_t stream);

/* Bytes of device workspace cuda_attn_backward needs (one float per query row and head). */
size_t cuda_attn_backward_workspace(int B, int T, int NH);

/* dq, dk, dv [B, T, C] += the gradients given dout [B, T, C] and the forward's q, k, v, out and
 * lse (ACCUMULATED, as attention_backward). workspace: cuda_attn_backward_workspace bytes of
 * device memory, contents irrelevant, not shared with any other argument. Device pointers;
 * the gradients must not alias each other or the inputs. */
void cuda_attn_backward(float *dq, float *dk, float *dv, void *workspace, const float *dout,
                        const float *q, const float *k, const float *v, const float *out,
                        const float *lse, int B, int T, int C, int NH, cuda_attn_prec_t prec,
                        cudaStream_t stream);

#ifdef __cplusplus
}
#endif

#endif
