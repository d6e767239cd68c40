/* Dense GEMMs on the device through cuBLAS (cublasGemmEx / cublasGemmStridedBatchedEx), in the
 * row-major semantics of common/gemm.h so that CUDA code reads like the CPU reference:
 *
 *   C = alpha * op(A) * op(B) + beta * C,   op(A) M x K, op(B) K x N, C [M, ldc >= N]
 *   A is [M, lda >= K] (GEMM_N) or [K, lda >= M] (GEMM_T); B is [K, ldb >= N] (GEMM_N) or
 *   [N, ldb >= K] (GEMM_T). The linear layer y = x W^T (W stored [out, in]) is
 *   cuda_gemm_run(g, s, GEMM_N, GEMM_T, BT, OC, C, 1, x, C, W, C, 0, y, OC, ...).
 *
 * Precisions (A and B share one type; accumulation is always FP32):
 *   CUDA_DT_F32   FP32 in, FP32 out, CUBLAS_COMPUTE_32F (no TF32): the checking path
 *   CUDA_DT_F16   FP16 in (tensor cores on sm_75+), C FP32 or FP16
 *   CUDA_DT_BF16  BF16 in (tensor cores on sm_80+; sm_75 runs it slowly), C FP32 or BF16
 * alpha and beta are FP32 scalars on the host. beta == 0 overwrites C without reading it.
 *
 * A handle (cuda_gemm_t) owns one cuBLAS handle and its workspace; it is used by one host thread
 * at a time and may switch streams between calls. Errors in the arguments are bugs (asserted);
 * cuBLAS failures abort through CUBLAS_CHECK (cuda_check.h). */
#ifndef QUILLAN_CUDA_GEMM_H
#define QUILLAN_CUDA_GEMM_H

#include <stddef.h>

#include <cuda_runtime_api.h>

#include "cuda_check.h"

#ifdef __cplusplus
extern "C" {
#endif

#include "gemm.h"

/* Element types of device tensors. */
typedef enum { CUDA_DT_F32 = 0, CUDA_DT_F16, CUDA_DT_BF16, CUDA_DT_COUNT } cuda_dtype_t;

/* Bytes per element (4, 2, 2). */
size_t cuda_dtype_size(cuda_dtype_t dt);
/* "f32", "f16", "bf16"; "?" when out of range. */
const char *cuda_dtype_name(cuda_dtype_t dt);

typedef struct cuda_gemm cuda_gemm_t;

/* A cuBLAS handle with `workspace_bytes` of device workspace (0 lets cuBLAS use its default
 * pool; 32 MiB is plenty for Hopper). NULL with err filled (no device, out of memory). */
cuda_gemm_t *cuda_gemm_new(size_t workspace_bytes, qerr_t *err);
/* Frees the handle and its workspace and NULLs *g; safe on NULL and twice. The caller ensures
 * no queued GEMM still uses it. */
void cuda_gemm_destroy(cuda_gemm_t **g);

/* C = alpha op(A) op(B) + beta C on stream s (see the file comment). A and B have type ab_dt,
 * C has type c_dt, which is CUDA_DT_F32 or equal to ab_dt. M, N or K == 0 is allowed (K == 0
 * scales C by beta, M or N == 0 does nothing). C must not alias A or B. */
void cuda_gemm_run(cuda_gemm_t *g, cudaStream_t s, gemm_trans_t ta, gemm_trans_t tb, int M, int N,
                   int K, float alpha, const void *A, int lda, const void *B, int ldb, float beta,
                   void *C, int ldc, cuda_dtype_t ab_dt, cuda_dtype_t c_dt);

/* `batch` independent GEMMs of one shape: matrix i of A starts at A + i * strideA elements
 * (likewise B, C). Strides are in elements of each operand's type. Same rules as cuda_gemm_run;
 * batch >= 0. */
void cuda_gemm_run_batched(cuda_gemm_t *g, cudaStream_t s, gemm_trans_t ta, gemm_trans_t tb, int M,
                           int N, int K, float alpha, const void *A, int lda, long long strideA,
                           const void *B, int ldb, long long strideB, float beta, void *C, int ldc,
                           long long strideC, int batch, cuda_dtype_t ab_dt, cuda_dtype_t c_dt);

#ifdef __cplusplus
}
#endif

#endif
