/* cuBLAS GEMMs in row-major semantics: see cuda_gemm.h.
 *
 * cuBLAS is column-major. A row-major matrix X [r, ld] is, read column-major, X^T with leading
 * dimension ld. So the row-major C = op(A) op(B) is computed as the column-major
 * C^T = op(B)^T op(A)^T: m = N, n = M, k = K, first operand B with B's own transpose flag,
 * second operand A with A's. */
#include "cuda_gemm.h"

#include <cublas_v2.h>
#include <stdlib.h>

struct cuda_gemm {
    cublasHandle_t handle;
    void *workspace; /* cudaMalloc'd, owned; NULL when workspace_bytes was 0 */
    size_t workspace_bytes;
};

namespace {

cudaDataType_t dtype_cuda(cuda_dtype_t dt) {
    switch (dt) {
    case CUDA_DT_F32: return CUDA_R_32F;
    case CUDA_DT_F16: return CUDA_R_16F;
    case CUDA_DT_BF16: return CUDA_R_16BF;
    case CUDA_DT_COUNT: break;
    }
    Q_ASSERT(!"unknown cuda_dtype_t");
    return CUDA_R_32F;
}

cublasOperation_t op_of(gemm_trans_t t) {
    Q_ASSERT(t == GEMM_N || t == GEMM_T);
    return t == GEMM_N ? CUBLAS_OP_N : CUBLAS_OP_T;
}

/* The row-major shape rules of gemm.h, asserted (bugs, not runtime failures). */
void check_shape(gemm_trans_t ta, gemm_trans_t tb, int M, int N, int K, int lda, int ldb, int ldc,
                 cuda_dtype_t ab_dt, cuda_dtype_t c_dt) {
    Q_ASSERT(M >= 0 && N >= 0 && K >= 0);
    Q_ASSERT(lda >= (ta == GEMM_N ? K : M) && lda >= 1);
    Q_ASSERT(ldb >= (tb == GEMM_N ? N : K) && ldb >= 1);
    Q_ASSERT(ldc >= N && ldc >= 1);
    Q_ASSERT((unsigned)ab_dt < CUDA_DT_COUNT && (unsigned)c_dt < CUDA_DT_COUNT);
    Q_ASSERT(c_dt == CUDA_DT_F32 || c_dt == ab_dt);
}

/* FP32 operands compute in plain FP32 (the checking path: no TF32 rounding of the inputs). */
cublasComputeType_t compute_of(cuda_dtype_t ab_dt) {
    return ab_dt == CUDA_DT_F32 ? CUBLAS_COMPUTE_32F_PEDANTIC : CUBLAS_COMPUTE_32F;
}

void bind(cuda_gemm_t *g, cudaStream_t s) {
    CUBLAS_CHECK(cublasSetStream(g->handle, s));
    /* cublasSetStream resets the workspace to the default pool: set ours again. */
    if (g->workspace)
        CUBLAS_CHECK(cublasSetWorkspace(g->handle, g->workspace, g->workspace_bytes));
}

} // namespace

extern "C" {

size_t cuda_dtype_size(cuda_dtype_t dt) {
    Q_ASSERT((unsigned)dt < CUDA_DT_COUNT);
    return dt == CUDA_DT_F32 ? 4 : 2;
}

const char *cuda_dtype_name(cuda_dtype_t dt) {
    static const char *const names[] = {"f32", "f16", "bf16"};
    static_assert(sizeof names / sizeof names[0] == CUDA_DT_COUNT, "one name per dtype");
    return (unsigned)dt < CUDA_DT_COUNT ? names[dt] : "?";
}

cuda_gemm_t *cuda_gemm_new(size_t workspace_bytes, qerr_t *err) {
    cuda_gemm_t *g = (cuda_gemm_t *)calloc(1, sizeof *g);
    if (!g)
        return qerr_set(err, QERR_NOMEM, "cuda_gemm_new: out of host memory"), nullptr;
    const cublasStatus_t st = cublasCreate(&g->handle);
    if (st != CUBLAS_STATUS_SUCCESS) {
        free(g);
        return qerr_set(err, st == CUBLAS_STATUS_ALLOC_FAILED ? QERR_NOMEM : QERR_IO,
                        "cuda_gemm_new: cublasCreate: %s", cublasGetStatusString(st)),
               nullptr;
    }
    if (workspace_bytes > 0) {
        const cudaError_t e = cudaMalloc(&g->workspace, workspace_bytes);
        if (e != cudaSuccess) {
            (void)cudaGetLastError();
            CUBLAS_CHECK(cublasDestroy(g->handle));
            free(g);
            return qerr_set(err, QERR_NOMEM, "cuda_gemm_new: %zu bytes of cuBLAS workspace: %s",
                            workspace_bytes, cudaGetErrorString(e)),
                   nullptr;
        }
        g->workspace_bytes = workspace_bytes;
    }
    return g;
}

void cuda_gemm_destroy(cuda_gemm_t **pg) {
    if (!pg || !*pg)
        return;
    cuda_gemm_t *g = *pg;
    CUBLAS_CHECK(cublasDestroy(g->handle));
    if (g->workspace)
        CUDA_CHECK(cudaFree(g->workspace));
    free(g);
    *pg = nullptr;
}

void cuda_gemm_run(cuda_gemm_t *g, cudaStream_t s, gemm_trans_t ta, gemm_trans_t tb, int M, int N,
                   int K, float alpha, const void *A, int lda, const void *B, int ldb, float beta,
                   void *C, int ldc, cuda_dtype_t ab_dt, cuda_dtype_t c_dt) {
    check_shape(ta, tb, M, N, K, lda, ldb, ldc, ab_dt, c_dt);
    if (M == 0 || N == 0)
        return;
    bind(g, s);
    CUBLAS_CHECK(cublasGemmEx(g->handle, op_of(tb), op_of(ta), N, M, K, &alpha, B,
                              dtype_cuda(ab_dt), ldb, A, dtype_cuda(ab_dt), lda, &beta, C,
                              dtype_cuda(c_dt), ldc, compute_of(ab_dt), CUBLAS_GEMM_DEFAULT));
}

void cuda_gemm_run_batched(cuda_gemm_t *g, cudaStream_t s, gemm_trans_t ta, gemm_trans_t tb, int M,
                           int N, int K, float alpha, const void *A, int lda, long long strideA,
                           const void *B, int ldb, long long strideB, float beta, void *C, int ldc,
                           long long strideC, int batch, cuda_dtype_t ab_dt, cuda_dtype_t c_dt) {
    check_shape(ta, tb, M, N, K, lda, ldb, ldc, ab_dt, c_dt);
    Q_ASSERT(batch >= 0 && strideA >= 0 && strideB >= 0 && strideC >= 0);
    if (M == 0 || N == 0 || batch == 0)
        return;
    bind(g, s);
    CUBLAS_CHECK(cublasGemmStridedBatchedEx(g->handle, op_of(tb), op_of(ta), N, M, K, &alpha, B,
                                            dtype_cuda(ab_dt), ldb, strideB, A, dtype_cuda(ab_dt),
                                            lda, strideA, &beta, C, dtype_cuda(c_dt), ldc, strideC,
                                            batch, compute_of(ab_dt), CUBLAS_GEMM_DEFAULT));
}

} /* extern "C" */
