/* Device memory for the CUDA learner: plain allocations with live/peak accounting, and an
 * arena for activations.
 *
 * Every byte the CUDA backend allocates goes through cuda_buf_alloc (the arena included), so
 * cuda_buf_stats() reports the backend's own live and peak device bytes; cudaMemGetInfo would
 * also count cuBLAS workspaces, other processes and the context itself. Counters are atomic
 * (any host thread may allocate). No function here synchronises the device except
 * cuda_buf_alloc / cuda_buf_free themselves (cudaMalloc / cudaFree do).
 *
 * Usable from C and CUDA. */
#ifndef QUILLAN_CUDA_BUF_H
#define QUILLAN_CUDA_BUF_H

#include <stddef.h>

#include <cuda_runtime_api.h>

#include "cuda_check.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Alignment of every pointer cuda_buf_alloc and cuda_arena_alloc return, in bytes (covers
 * float4/double2 and cuBLAS's preferred 256-byte alignment). */
#define CUDA_BUF_ALIGN 256

/* ---- Plain device allocations ---- */

/* cudaMalloc of `bytes` (> 0), not initialised. NULL with err filled (QERR_NOMEM when the
 * device is out of memory, QERR_RANGE for bytes == 0, QERR_IO for other CUDA errors). The
 * caller owns the buffer and frees it with cuda_buf_free. */
void *cuda_buf_alloc(size_t bytes, qerr_t *err);
/* cuda_buf_alloc, then zeroed (synchronously, so the buffer is ready on any stream). */
void *cuda_buf_calloc(size_t bytes, qerr_t *err);
/* Frees *p (from cuda_buf_alloc) and NULLs it; safe on NULL and twice. */
void cuda_buf_free(void **p);

/* Host <-> device copies of `bytes`, ordered on stream s (asynchronous: for truly async copies
 * the host side must be pinned memory; pageable memory makes CUDA stage the copy). 0, or -1
 * with err filled. */
int cuda_buf_upload(void *dst_dev, const void *src_host, size_t bytes, cudaStream_t s, qerr_t *err);
int cuda_buf_download(void *dst_host, const void *src_dev, size_t bytes, cudaStream_t s,
                      qerr_t *err);
/* Sets `bytes` of device memory to zero on stream s. 0, or -1 with err filled. */
int cuda_buf_zero(void *dst_dev, size_t bytes, cudaStream_t s, qerr_t *err);

/* Bytes currently allocated through cuda_buf_alloc and the most ever live at once since the
 * last cuda_buf_stats_reset_peak (either pointer may be NULL). */
void cuda_buf_stats(size_t *live, size_t *peak);
/* Resets the peak to the current live bytes (e.g. before a measured step). */
void cuda_buf_stats_reset_peak(void);

/* ---- Arena: bump allocation for activations ---- */

/* One device allocation of a fixed capacity handed out in CUDA_BUF_ALIGN-aligned pieces;
 * pieces are released all at once by cuda_arena_reset (or back to a mark). Used by one host
 * thread at a time. */
typedef struct cuda_arena cuda_arena_t;

/* An arena of `capacity` bytes (> 0). NULL with err filled (as cuda_buf_alloc, or QERR_NOMEM
 * for the host struct). */
cuda_arena_t *cuda_arena_new(size_t capacity, qerr_t *err);
/* Frees the arena and its device memory and NULLs *a; safe on NULL and twice. The caller
 * ensures no queued work still uses it. */
void cuda_arena_destroy(cuda_arena_t **a);
/* `bytes` from the arena (0 bytes gives a valid, unique-offset pointer of no size). NULL with
 * err filled (QERR_NOMEM naming the capacity and the request) when it does not fit. Owned by
 * the arena. */
void *cuda_arena_alloc(cuda_arena_t *a, size_t bytes, qerr_t *err);
/* The current fill, to pass to cuda_arena_rewind later (stack discipline). */
size_t cuda_arena_mark(const cuda_arena_t *a);
/* Releases everything allocated after `mark` (a value cuda_arena_mark returned). */
void cuda_arena_rewind(cuda_arena_t *a, size_t mark);
/* Releases everything. */
void cuda_arena_reset(cuda_arena_t *a);
/* Capacity, and the highest fill reached since creation, in bytes. */
size_t cuda_arena_capacity(const cuda_arena_t *a);
size_t cuda_arena_peak(const cuda_arena_t *a);

#ifdef __cplusplus
}
#endif

#endif
