/* Dense matrix products for the CPU reference model.
 *
 * One entry point, gemm(), in row-major BLAS semantics over `real` (real.h): CBLAS sgemm for
 * float and dgemm for double when the core is built with QUILLAN_HAVE_BLAS, otherwise a plain C
 * fallback (packed, cache-blocked, OpenMP-parallel over output tiles). The fallback is always
 * compiled as gemm_fallback() so tests can compare it with BLAS, and gemm_naive() is the
 * triple-loop oracle.
 *
 * Threads: BLAS threads and our own OpenMP threads must not fight (on 2 cores an oversubscribed
 * run was 2x slower). Inside one of our parallel regions gemm() must run on the calling thread:
 *  - the fallback never opens a nested region;
 *  - the OpenMP flavour of OpenBLAS (Debian libopenblas-openmp-dev, what we build against;
 *    openblas_get_parallel() == 2) runs serially whenever omp_in_parallel(), and outside our
 *    regions uses the OpenMP thread count. Its openblas_set_num_threads(n) also calls
 *    omp_set_num_threads(n) (checked on this machine), so gemm_threads_set(1) would serialise
 *    our own regions as well: with this flavour leave the count at the core count;
 *  - a pthreads flavour would oversubscribe: call gemm_threads_set(1) before regions that call
 *    gemm() and restore the returned value after. */
#ifndef QUILLAN_GEMM_H
#define QUILLAN_GEMM_H

#include "real.h"

typedef enum {
    GEMM_N = 0, /* use the matrix as stored */
    GEMM_T = 1, /* use its transpose */
    GEMM_TRANS_COUNT
} gemm_trans_t;

/* C = alpha * op(A) * op(B) + beta * C, all row-major.
 * op(A) is M x K: A is [M, lda>=K] (GEMM_N) or [K, lda>=M] (GEMM_T).
 * op(B) is K x N: B is [K, ldb>=N] (GEMM_N) or [N, ldb>=K] (GEMM_T).
 * C is [M, ldc>=N]. beta == 0 overwrites C (NaNs already in C are ignored, as in BLAS).
 * M, N or K == 0 is allowed (K == 0 scales C by beta). C must not alias A or B.
 * The linear layer y = x W^T with W stored [out, in] is gemm(GEMM_N, GEMM_T, ...). */
void gemm(gemm_trans_t ta, gemm_trans_t tb, int M, int N, int K, real alpha, const real *A, int lda,
          const real *B, int ldb, real beta, real *C, int ldc);

/* Same contract, always the plain C code. Each element of C is summed over k in increasing
 * order, independent of the thread count, so it is deterministic run to run. */
void gemm_fallback(gemm_trans_t ta, gemm_trans_t tb, int M, int N, int K, real alpha, const real *A,
                   int lda, const real *B, int ldb, real beta, real *C, int ldc);

/* Same contract, a naive triple loop accumulating in double: the test oracle. */
void gemm_naive(gemm_trans_t ta, gemm_trans_t tb, int M, int N, int K, real alpha, const real *A,
                int lda, const real *B, int ldb, real beta, real *C, int ldc);

/* 1 when gemm() goes through CBLAS, 0 when it uses the fallback. */
int gemm_has_blas(void);

/* 1 when gemm() runs serially inside our parallel regions by itself (the fallback, or the
 * OpenMP flavour of OpenBLAS); 0 for a BLAS that needs gemm_threads_set(1) around them. */
int gemm_nests_safely(void);

/* Sets the number of threads BLAS may use and returns the previous value (n >= 1); see the
 * file comment for the OpenMP flavour, where this is also the OpenMP thread count. Without
 * BLAS it only records n (the fallback follows OpenMP's own setting) and returns the previous
 * record. Not thread-safe: call it from the main thread between parallel phases. */
int gemm_threads_set(int n);

/* The current BLAS thread count (or the recorded value without BLAS). */
int gemm_threads_get(void);

#endif
