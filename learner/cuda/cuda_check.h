/* One check macro family for the GPU libraries (STYLE.md habit 4): CUDA_CHECK, CUBLAS_CHECK,
 * NCCL_CHECK and CUDA_LAUNCH_CHECK, all from one generator.
 *
 * These are the bug tier of error.h for device code: a failing call prints file:line, the
 * statement as written and the library's error string to stderr, then aborts. Use them where a
 * failure means a broken invariant (bad launch configuration, a kernel fault, a handle used
 * wrongly). Library-level functions whose failure a caller can recover from (an allocation
 * that does not fit, a device that is absent) use CUDA_TRY / CUBLAS_TRY instead, which fill a
 * qerr_t and return -1 from the enclosing function.
 *
 * Every kernel launch is followed by CUDA_LAUNCH_CHECK(), which catches launch-configuration
 * errors at once. Asynchronous faults surface at the next checked synchronising call; build
 * with -DQUILLAN_CUDA_SYNC_CHECK=1 to synchronise after every launch while hunting one.
 *
 * Usable from C and CUDA. NCCL_CHECK needs <nccl.h> included before its first use. */
#ifndef QUILLAN_CUDA_CHECK_H
#define QUILLAN_CUDA_CHECK_H

#include <stdio.h>
#include <stdlib.h>

#include <cublas_api.h>
#include <cuda_runtime_api.h>

/* error.h is C11: C++ translation units (.cu) see its _Noreturn as GCC's attribute, and its
 * functions with C linkage. */
#ifdef __cplusplus
#define _Noreturn __attribute__((noreturn))
extern "C" {
#endif
#include "error.h"
#ifdef __cplusplus
}
#undef _Noreturn
#endif

/* The generator: `call` evaluated once; `ok` its success value; `str` maps the status to text. */
#define QUILLAN_GPU_CHECK(lib, call, ok, str)                                                      \
    do {                                                                                           \
        const __typeof__(call) q_gpu_status_ = (call);                                             \
        if (q_gpu_status_ != (ok)) {                                                               \
            fprintf(stderr, "%s:%d: %s error %d (%s) in %s\n", __FILE__, __LINE__, lib,            \
                    (int)q_gpu_status_, str(q_gpu_status_), #call);                                \
            abort();                                                                               \
        }                                                                                          \
    } while (0)

#define CUDA_CHECK(call) QUILLAN_GPU_CHECK("CUDA", call, cudaSuccess, cudaGetErrorString)
#define CUBLAS_CHECK(call)                                                                         \
    QUILLAN_GPU_CHECK("cuBLAS", call, CUBLAS_STATUS_SUCCESS, cublasGetStatusString)
#define NCCL_CHECK(call) QUILLAN_GPU_CHECK("NCCL", call, ncclSuccess, ncclGetErrorString)

#if defined(QUILLAN_CUDA_SYNC_CHECK) && QUILLAN_CUDA_SYNC_CHECK
#define CUDA_LAUNCH_CHECK()                                                                        \
    do {                                                                                           \
        CUDA_CHECK(cudaGetLastError());                                                            \
        CUDA_CHECK(cudaDeviceSynchronize());                                                       \
    } while (0)
#else
#define CUDA_LAUNCH_CHECK() CUDA_CHECK(cudaGetLastError())
#endif

/* Runtime-failure tier: on error fill *err (QERR_NOMEM for an allocation failure, QERR_IO
 * otherwise) naming the statement, file and line, and `return -1` from the caller. */
#define CUDA_TRY(err, call)                                                                        \
    do {                                                                                           \
        const cudaError_t q_gpu_status_ = (call);                                                  \
        if (q_gpu_status_ != cudaSuccess) {                                                        \
            (void)cudaGetLastError(); /* clear the sticky-free error so later checks see ours */   \
            return qerr_set(err,                                                                   \
                            q_gpu_status_ == cudaErrorMemoryAllocation ? QERR_NOMEM : QERR_IO,     \
                            "%s:%d: CUDA error %d (%s) in %s", __FILE__, __LINE__,                 \
                            (int)q_gpu_status_, cudaGetErrorString(q_gpu_status_), #call);         \
        }                                                                                          \
    } while (0)
#define CUBLAS_TRY(err, call)                                                                      \
    do {                                                                                           \
        const cublasStatus_t q_gpu_status_ = (call);                                               \
        if (q_gpu_status_ != CUBLAS_STATUS_SUCCESS)                                                \
            return qerr_set(err,                                                                   \
                            q_gpu_status_ == CUBLAS_STATUS_ALLOC_FAILED ? QERR_NOMEM : QERR_IO,    \
                            "%s:%d: cuBLAS error %d (%s) in %s", __FILE__, __LINE__,               \
                            (int)q_gpu_status_, cublasGetStatusString(q_gpu_status_), #call);      \
    } while (0)

#endif
