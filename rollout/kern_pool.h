/* A small persistent thread pool for the kernels: the caller and nthreads - 1 workers run one
 * function together, each on its own static contiguous share of the rows (kern_split_rows).
 *
 * Workers spin briefly then yield while idle, so a product of ~100 us pays no thread start-up
 * or wake-up latency. One pool serves one caller thread at a time. */
#ifndef QUILLAN_KERN_POOL_H
#define QUILLAN_KERN_POOL_H

#include <stddef.h>

#include "error.h"

typedef struct kern_pool kern_pool_t;

/* fn(ctx, tid, nthreads) with tid in 0..nthreads-1; tid 0 is the calling thread. */
typedef void (*kern_pool_fn)(void *ctx, int tid, int nthreads);

/* A pool of nthreads (1..KERN_POOL_MAX) threads in all; NULL with err on failure. */
#define KERN_POOL_MAX 256
kern_pool_t *kern_pool_new(int nthreads, qerr_t *err);

/* Stops and joins the workers, frees the pool and sets *pool to NULL; safe on NULL. */
void kern_pool_destroy(kern_pool_t **pool);

int kern_pool_size(const kern_pool_t *pool);

/* Runs fn on every thread of the pool and returns when all have finished. */
void kern_pool_run(kern_pool_t *pool, kern_pool_fn fn, void *ctx);

/* Thread tid's share [*r0, *r1) of `rows` rows: contiguous, in order, boundaries on multiples
 * of `align` (>= 1) except the final end, sizes differing by at most one `align` unit. */
void kern_split_rows(size_t rows, int tid, int nthreads, size_t align, size_t *r0, size_t *r1);

#endif
