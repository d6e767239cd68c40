#include "gemm.h"

#include <stddef.h>
#include <string.h>

#include "error.h"

#ifdef _OPENMP
#include <omp.h>
#define OMP_PRAGMA(x) _Pragma(#x)
#else
#define OMP_PRAGMA(x)
#endif

#ifdef QUILLAN_HAVE_BLAS
#include <cblas.h>
#endif

/* Fallback blocking: a tile of C is MC x NC, summed over K in slices of KC. The packed blocks
 * (A MC x KC, B KC x NC) and the tile accumulator live on the thread's stack: 96 KiB in float,
 * 192 KiB in double. */
enum { MC = 32, NC = 128, KC = 128 };
/* Below this many multiply-adds (about 1 ms on one idle core) a product runs on one thread,
 * in the fallback and in OpenBLAS alike. Every threaded product is a fork-join of the OpenMP
 * team, and a join needs every thread on a core: on a loaded machine a descheduled partner
 * costs a scheduler time slice per product while the others spin (2 threads made the tiny
 * model's step 30 times costlier in CPU time), and the model's small products gain little
 * from a second thread even on an idle one. */
#define GEMM_PARALLEL_MIN_WORK (1 << 25)

static int g_threads_recorded; /* the value gemm_threads_set recorded; 0 = never set */

/* op(X)[r][c] of a row-major X with leading dimension ld. */
static inline real at(const real *X, int ld, gemm_trans_t t, int r, int c) {
    return t == GEMM_N ? X[(size_t)r * ld + c] : X[(size_t)c * ld + r];
}

static void scale_c(int M, int N, real beta, real *C, int ldc) {
    for (int i = 0; i < M; i++) {
        real *row = C + (size_t)i * ldc;
        if (beta == 0)
            memset(row, 0, sizeof(real) * (size_t)N);
        else if (beta != 1)
            for (int j = 0; j < N; j++)
                row[j] *= beta;
    }
}

static void check_args(gemm_trans_t ta, gemm_trans_t tb, int M, int N, int K, int lda, int ldb,
                       int ldc) {
    Q_ASSERT(M >= 0 && N >= 0 && K >= 0);
    Q_ASSERT(ta < GEMM_TRANS_COUNT && tb < GEMM_TRANS_COUNT);
    Q_ASSERT(lda >= (ta == GEMM_N ? K : M) && ldb >= (tb == GEMM_N ? N : K) && ldc >= N);
}

void gemm_naive(gemm_trans_t ta, gemm_trans_t tb, int M, int N, int K, real alpha, const real *A,
                int lda, const real *B, int ldb, real beta, real *C, int ldc) {
    check_args(ta, tb, M, N, K, lda, ldb, ldc);
    for (int i = 0; i < M; i++)
        for (int j = 0; j < N; j++) {
            double s = 0;
            for (int p = 0; p < K; p++)
                s += (double)at(A, lda, ta, i, p) * (double)at(B, ldb, tb, p, j);
            real *c = C + (size_t)i * ldc + j;
            *c = (real)((double)alpha * s + (beta == 0 ? 0.0 : (double)beta * (double)*c));
        }
}

/* Ct[mc][NC] += Ap[mc][KC] * Bp[kc][NC] over the first kc columns of Ap. The j loops run over
 * all NC columns (Bp is zero-padded past the tile's width): a compile-time trip count lets
 * compilers vectorise them at -O2, and an axpy never reassociates a sum. Four rows at a time
 * so each loaded B row feeds four accumulator rows. */
static void micro(real *restrict Ct, const real *restrict Ap, const real *restrict Bp, int mc,
                  int kc) {
    int i = 0;
    for (; i + 4 <= mc; i += 4) {
        real *restrict c0 = Ct + (size_t)i * NC;
        real *restrict c1 = c0 + NC;
        real *restrict c2 = c1 + NC;
        real *restrict c3 = c2 + NC;
        const real *a = Ap + (size_t)i * KC;
        for (int p = 0; p < kc; p++) {
            const real a0 = a[p], a1 = a[KC + p], a2 = a[2 * KC + p], a3 = a[3 * KC + p];
            const real *restrict b = Bp + (size_t)p * NC;
            for (int j = 0; j < NC; j++) {
                c0[j] += a0 * b[j];
                c1[j] += a1 * b[j];
                c2[j] += a2 * b[j];
                c3[j] += a3 * b[j];
            }
        }
    }
    for (; i < mc; i++) {
        real *restrict c0 = Ct + (size_t)i * NC;
        const real *a = Ap + (size_t)i * KC;
        for (int p = 0; p < kc; p++) {
            const real a0 = a[p];
            const real *restrict b = Bp + (size_t)p * NC;
            for (int j = 0; j < NC; j++)
                c0[j] += a0 * b[j];
        }
    }
}

/* One MC x NC tile of C at (i0, j0), summed over all of K in increasing order. */
static void tile(gemm_trans_t ta, gemm_trans_t tb, int M, int N, int K, real alpha, const real *A,
                 int lda, const real *B, int ldb, real beta, real *C, int ldc, int i0, int j0) {
    _Alignas(64) real Ap[MC * KC];
    _Alignas(64) real Bp[KC * NC];
    _Alignas(64) real Ct[MC * NC];
    const int mc = M - i0 < MC ? M - i0 : MC;
    const int nc = N - j0 < NC ? N - j0 : NC;
    memset(Ct, 0, sizeof(real) * (size_t)mc * NC);
    if (nc < NC) /* padding columns stay zero through every slice */
        memset(Bp, 0, sizeof Bp);
    for (int k0 = 0; k0 < K; k0 += KC) {
        const int kc = K - k0 < KC ? K - k0 : KC;
        for (int i = 0; i < mc; i++)
            for (int p = 0; p < kc; p++)
                Ap[(size_t)i * KC + p] = at(A, lda, ta, i0 + i, k0 + p);
        if (tb == GEMM_N) {
            for (int p = 0; p < kc; p++)
                memcpy(Bp + (size_t)p * NC, B + (size_t)(k0 + p) * ldb + j0,
                       sizeof(real) * (size_t)nc);
        } else {
            for (int j = 0; j < nc; j++) {
                const real *src = B + (size_t)(j0 + j) * ldb + k0;
                for (int p = 0; p < kc; p++)
                    Bp[(size_t)p * NC + j] = src[p];
            }
        }
        micro(Ct, Ap, Bp, mc, kc);
    }
    for (int i = 0; i < mc; i++) {
        real *c = C + (size_t)(i0 + i) * ldc + j0;
        const real *t = Ct + (size_t)i * NC;
        if (beta == 0)
            for (int j = 0; j < nc; j++)
                c[j] = alpha * t[j];
        else
            for (int j = 0; j < nc; j++)
                c[j] = alpha * t[j] + beta * c[j];
    }
}

void gemm_fallback(gemm_trans_t ta, gemm_trans_t tb, int M, int N, int K, real alpha, const real *A,
                   int lda, const real *B, int ldb, real beta, real *C, int ldc) {
    check_args(ta, tb, M, N, K, lda, ldb, ldc);
    if (M == 0 || N == 0)
        return;
    if (K == 0) {
        scale_c(M, N, beta, C, ldc);
        return;
    }
    const int mt = (M + MC - 1) / MC, nt = (N + NC - 1) / NC;
    const int ntiles = mt * nt;
    int parallel = (double)M * N * K >= GEMM_PARALLEL_MIN_WORK && ntiles > 1;
#ifdef _OPENMP
    parallel = parallel && !omp_in_parallel();
#endif
    (void)parallel;
    OMP_PRAGMA(omp parallel for schedule(static) if (parallel))
    for (int t = 0; t < ntiles; t++)
        tile(ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc, (t / nt) * MC, (t % nt) * NC);
}

void gemm(gemm_trans_t ta, gemm_trans_t tb, int M, int N, int K, real alpha, const real *A, int lda,
          const real *B, int ldb, real beta, real *C, int ldc) {
#ifdef QUILLAN_HAVE_BLAS
    check_args(ta, tb, M, N, K, lda, ldb, ldc);
    if (M == 0 || N == 0)
        return;
    if (K == 0) {
        scale_c(M, N, beta, C, ldc);
        return;
    }
    const enum CBLAS_TRANSPOSE cta = ta == GEMM_N ? CblasNoTrans : CblasTrans;
    const enum CBLAS_TRANSPOSE ctb = tb == GEMM_N ? CblasNoTrans : CblasTrans;
#ifdef _OPENMP
    /* OpenBLAS's OpenMP build takes its thread count from the caller's OpenMP setting at each
     * call: a small product gets one thread by lowering that setting around the call. */
    const int nt = (double)M * N * K < GEMM_PARALLEL_MIN_WORK && !omp_in_parallel()
                       ? omp_get_max_threads()
                       : 1;
    if (nt > 1)
        omp_set_num_threads(1);
#endif
#if REAL_IS_DOUBLE
    cblas_dgemm(CblasRowMajor, cta, ctb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
#else
    cblas_sgemm(CblasRowMajor, cta, ctb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
#endif
#ifdef _OPENMP
    if (nt > 1)
        omp_set_num_threads(nt);
#endif
#else
    gemm_fallback(ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
#endif
}

int gemm_has_blas(void) {
#ifdef QUILLAN_HAVE_BLAS
    return 1;
#else
    return 0;
#endif
}

int gemm_nests_safely(void) {
#ifdef QUILLAN_HAVE_BLAS
    return openblas_get_parallel() != 1; /* 0 sequential, 1 pthreads, 2 OpenMP */
#else
    return 1;
#endif
}

int gemm_threads_get(void) {
#ifdef QUILLAN_HAVE_BLAS
    return openblas_get_num_threads();
#elif defined(_OPENMP)
    return g_threads_recorded ? g_threads_recorded : omp_get_max_threads();
#else
    return g_threads_recorded ? g_threads_recorded : 1;
#endif
}

int gemm_threads_set(int n) {
    Q_ASSERT(n >= 1);
    const int prev = gemm_threads_get();
#ifdef QUILLAN_HAVE_BLAS
    openblas_set_num_threads(n);
#endif
    g_threads_recorded = n;
    return prev;
}
