/* Data parallelism (TRAINING.md, issue 7): R ranks each run the model on their shard of a
 * batch, all-reduce the gradients, and take the same optimizer step, so their parameters stay
 * identical. Rank 0 (the root) alone does the duties that must happen once: dispatching work,
 * publishing weights, writing checkpoints and logs (dp_is_root).
 *
 * A communicator (dp_comm_t) is one rank's handle on a group. Every collective
 * (dp_allreduce, dp_broadcast, dp_barrier) must be called by all ranks of the group in the same
 * order with the same count and type; it returns when this rank's buffer holds the result.
 * Implementations:
 *  - the in-process reducer (dp_local_*): R ranks that are threads of one process, buffers in
 *    host memory. Deterministic: element i of a sum is ((x_0 + x_1) + x_2) + ... in rank order,
 *    in the element type, whatever thread computes it and whatever the bucket size, so results
 *    are bit-identical run to run. Zero-copy: rank r reduces the r-th slice of every bucket
 *    straight from the ranks' buffers into all of them.
 *  - NCCL across GPUs (learner/cuda/dp_nccl.h), with device buffers.
 *
 * Buckets: a collective over more than bucket_bytes is carried out as consecutive collectives
 * over bucket_bytes pieces (the last one shorter), which bounds an implementation's staging
 * memory and lets it start on the first bucket early. Reductions are element-wise, so the
 * bucket size never changes a result.
 *
 * Failure: a rank that fails between collectives calls dp_abort; every collective of the group
 * then fails at once (QERR_INVALID, "aborted by rank r") instead of waiting forever for it. */
#ifndef QUILLAN_DP_H
#define QUILLAN_DP_H

#include "error.h"

#include <stddef.h>

typedef enum { DP_F32 = 0, DP_F64, DP_DTYPE_COUNT } dp_dtype_t;

typedef enum {
    DP_SUM = 0, /* x_0 + x_1 + ... in rank order */
    DP_MEAN,    /* the sum divided by the world size */
    DP_OP_COUNT
} dp_op_t;

/* Default bucket: 4 MiB (a million floats). */
#define DP_BUCKET_BYTES_DEFAULT ((size_t)4 << 20)

typedef struct dp_comm dp_comm_t;

int dp_rank(const dp_comm_t *c);  /* 0 .. world - 1 */
int dp_world(const dp_comm_t *c); /* ranks in the group (>= 1) */
/* 1 on rank 0: the rank that dispatches, publishes, checkpoints and logs. */
int dp_is_root(const dp_comm_t *c);
size_t dp_bucket_bytes(const dp_comm_t *c);

/* Size of an element of type t in bytes (4 or 8). */
size_t dp_dtype_size(dp_dtype_t t);

/* buf[0 .. count) of type t := the op over the ranks' buffers, on every rank. count 0 is a no-op
 * (no synchronisation). Returns 0, or -1 with err set: count or type
 * differing between ranks (QERR_INVALID, on every rank), a group aborted (QERR_INVALID), a
 * device error (QERR_IO). */
int dp_allreduce(dp_comm_t *c, void *buf, size_t count, dp_dtype_t t, dp_op_t op, qerr_t *err);

/* buf[0 .. bytes) := rank 0's bytes, on every rank (rank 0's buffer is unchanged). Same
 * errors as dp_allreduce. */
int dp_broadcast(dp_comm_t *c, void *buf, size_t bytes, qerr_t *err);

/* Returns once every rank has entered it. */
int dp_barrier(dp_comm_t *c, qerr_t *err);

/* Marks the group failed: this rank's and every other rank's pending and future collectives
 * return -1. Call it when this rank stops before its next collective. Idempotent. */
void dp_abort(dp_comm_t *c);

/* Contiguous sharding of n items (rows of a batch): rank r gets [*begin, *begin + *count).
 * The first n % world ranks get one item more; ranks past n get none (count 0). */
void dp_shard(long n, int world, int rank, long *begin, long *count);

/* ---- In-process reducer: ranks are threads of this process ---- */

typedef struct dp_local dp_local_t;

/* A group of world ranks (1 .. DP_LOCAL_MAX) with buckets of bucket_bytes (0 = the default).
 * NULL with err set (QERR_RANGE, QERR_NOMEM). */
#define DP_LOCAL_MAX 256
dp_local_t *dp_local_new(int world, size_t bucket_bytes, qerr_t *err);
/* Frees the group and its communicators; NULLs *g. No rank may still be in a collective. */
void dp_local_destroy(dp_local_t **g);

/* Rank r's communicator, owned by the group (never passed to dp_comm_destroy). */
dp_comm_t *dp_local_comm(dp_local_t *g, int rank);

/* Runs fn(dp_local_comm(g, r), arg) for every rank r at once: ranks 1.. on new threads, rank 0
 * on the calling thread; returns when all have returned. A rank whose fn returns non-zero
 * aborts the group (dp_abort), so the others' collectives fail rather than hang. Returns 0
 * when every fn returned 0; otherwise -1 with err set from the first rank that failed on its
 * own (not because of the abort), falling back to the lowest failed rank. fn fills the error
 * it is given; the group cannot be used again after a failure. */
typedef int (*dp_rank_fn)(dp_comm_t *c, void *arg, qerr_t *err);
int dp_local_run(dp_local_t *g, dp_rank_fn fn, void *arg, qerr_t *err);

/* ---- For implementations (NCCL) ---- */

/* One piece of a collective: at most bucket_bytes. The generic layer validates arguments,
 * splits into buckets and checks the abort flag; these operate on one bucket. */
typedef struct {
    int (*allreduce)(void *impl, void *buf, size_t count, dp_dtype_t t, dp_op_t op, qerr_t *err);
    int (*broadcast)(void *impl, void *buf, size_t bytes, qerr_t *err);
    int (*barrier)(void *impl, qerr_t *err);
    void (*abort)(void *impl);   /* make pending and future operations of the group fail */
    void (*destroy)(void *impl); /* frees impl (dp_comm_destroy) */
} dp_ops_t;

/* A communicator over impl for rank `rank` of `world`; it owns impl (ops->destroy frees it,
 * also when this call fails). NULL with err set (QERR_RANGE, QERR_NOMEM). */
dp_comm_t *dp_comm_new(const dp_ops_t *ops, void *impl, int rank, int world, size_t bucket_bytes,
                       qerr_t *err);
/* Frees a communicator from dp_comm_new and its impl; NULLs *c; safe on NULL. */
void dp_comm_destroy(dp_comm_t **c);

#endif
