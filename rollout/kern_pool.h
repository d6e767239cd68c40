/* A small persistent thread pool for the kernels and the engine: the calling thread and
 * nthreads - 1 workers.
 *
 * Two ways to run work:
 * - kern_pool_run: every thread runs fn once with its own tid, each on a static share of the
 *   rows (kern_split_rows). For benchmarks and probes that need every thread at once.
 * - kern_pool_for: chunks 0..n-1 claimed dynamically by whichever threads are running. The
 *   caller never waits for a worker to wake up or to be scheduled: it runs every chunk no
 *   worker has claimed, and waits only for chunks already in a worker's hands. Results do not
 *   depend on the thread count as long as a chunk's result does not depend on which thread
 *   runs it. This is what the engine uses: on a shared machine a descheduled worker costs at
 *   most the chunk it holds, not its whole static share.
 *
 * Idle workers spin for about KERN_POOL_SPIN_US then sleep on a futex (Linux; elsewhere they
 * yield), so a pool does not burn a core between bursts of work, and the caller's wait for an
 * in-flight chunk sleeps the same way. One pool serves one caller thread at a time. */
#ifndef QUILLAN_KERN_POOL_H
#define QUILLAN_KERN_POOL_H

#include <stddef.h>

#include "error.h"

typedef struct kern_pool kern_pool_t;

/* fn(ctx, tid, nthreads) with tid in 0..nthreads-1; tid 0 is the calling thread. */
typedef void (*kern_pool_fn)(void *ctx, int tid, int nthreads);

/* fn(ctx, chunk, tid): runs chunk `chunk` on pool thread tid (0 = the caller); tid only
 * selects per-thread scratch. */
typedef void (*kern_pool_chunk_fn)(void *ctx, size_t chunk, int tid);

/* A pool of nthreads (1..KERN_POOL_MAX) threads in all; NULL with err on failure. */
#define KERN_POOL_MAX 256
/* Microseconds an idle thread spins before it sleeps (also the caller's wait for chunks). */
#define KERN_POOL_SPIN_US 30
kern_pool_t *kern_pool_new(int nthreads, qerr_t *err);

/* Stops and joins the workers, frees the pool and sets *pool to NULL; safe on NULL. */
void kern_pool_destroy(kern_pool_t **pool);

int kern_pool_size(const kern_pool_t *pool);

/* Runs fn on every thread of the pool and returns when all have finished. */
void kern_pool_run(kern_pool_t *pool, kern_pool_fn fn, void *ctx);

/* Runs fn(ctx, c, tid) exactly once for every chunk c in 0..nchunks-1 (in claim order, on any
 * threads, the caller included) and returns when all have finished. nchunks == 0 returns at
 * once; a 1-thread pool runs the chunks in order on the caller. */
void kern_pool_for(kern_pool_t *pool, size_t nchunks, kern_pool_chunk_fn fn, void *ctx);

/* Benchmarks, to tell the serial and the parallel parts of a caller's work apart: with timing
 * on (model_threads >= 1; 0 = off, the default) the pool adds up the wall-clock seconds the
 * calling thread spends inside kern_pool_run and kern_pool_for into *region_s, and into
 * *model_s the same times scaled for model_threads threads: a kern_pool_for call's time times
 * ceil(nchunks / model_threads) / nchunks (equal chunks, no overhead); kern_pool_run calls
 * count whole. Wall clock (a vDSO read) because a thread CPU clock read is a system call,
 * which costs microseconds on a virtual machine: on a busy machine use the fraction of the
 * caller's wall time spent inside, not the seconds. */
void kern_pool_set_timing(kern_pool_t *pool, int model_threads);
void kern_pool_region_time(const kern_pool_t *pool, double *region_s, double *model_s);

/* Thread tid's share [*r0, *r1) of `rows` rows: contiguous, in order, boundaries on multiples
 * of `align` (>= 1) except the final end, sizes differing by at most one `align` unit. */
void kern_split_rows(size_t rows, int tid, int nthreads, size_t align, size_t *r0, size_t *r1);

#endif
