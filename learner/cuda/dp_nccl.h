/* The NCCL reducer of dp.h: data parallel across GPUs, one rank per GPU, in one process (a
 * host thread per GPU) or in several processes on one or more machines.
 *
 * Rendezvous: rank 0 draws an NCCL unique id (dp_nccl_id_new) and hands it to the others,
 * either in memory (threads of one process), through a file on a path every rank can read
 * (dp_nccl_id_write / dp_nccl_id_read, e.g. on a shared filesystem), or as the 128 bytes of
 * dp_nccl_id_t over the existing control channel. Then every rank calls dp_nccl_comm_new with
 * its rank, the world size and its device; the call returns once all ranks have joined.
 *
 * Buffers: device memory (cudaMalloc, managed) is reduced in place by NCCL on the
 * communicator's stream: the call returns once the work is enqueued, and the result is there
 * for whatever runs next on that stream (synchronise the stream before reading it on the
 * host). Host memory (pageable or pinned: the loss and token counts of a step) is staged
 * through a device bucket and the call returns with the result in it. dp_barrier waits for the
 * stream. Reductions follow NCCL's order (ring or tree), deterministic for a fixed topology
 * and NCCL version; DP_MEAN is ncclAvg.
 *
 * Failure: a rank that stops calls dp_abort (or its process dies); waiting ranks poll NCCL's
 * asynchronous error and the abort flag rather than block in a synchronise, abort the NCCL
 * communicator (ncclCommAbort) and return -1 (QERR_IO naming the NCCL error).
 *
 * Usable from C and CUDA. Needs the library built with NCCL (QUILLAN_HAVE_NCCL). */
#ifndef QUILLAN_DP_NCCL_H
#define QUILLAN_DP_NCCL_H

#include <stddef.h>
#include <stdint.h>

#include <cuda_runtime_api.h>

#include "cuda_check.h"

#ifdef __cplusplus
extern "C" {
#endif

#include "dp.h"

#define DP_NCCL_ID_BYTES 128 /* NCCL_UNIQUE_ID_BYTES */

/* An NCCL unique id: opaque bytes, safe to copy and to send over any channel. */
typedef struct {
    char bytes[DP_NCCL_ID_BYTES];
} dp_nccl_id_t;

/* Draws a new unique id (rank 0 only). 0, or -1 with err set (QERR_IO). */
int dp_nccl_id_new(dp_nccl_id_t *id, qerr_t *err);

/* Writes the id with `tag` to path atomically (a temporary file renamed over it), so a reader
 * never sees half an id. tag is a value unique to this launch (a job id, the launcher's start
 * time): a reader given another tag takes the file for one left by an earlier run and keeps
 * waiting. 0, or -1 with err set (QERR_IO naming the path). */
int dp_nccl_id_write(const char *path, uint64_t tag, const dp_nccl_id_t *id, qerr_t *err);

/* Waits up to timeout_s seconds (> 0) for path to hold an id written with `tag`, polling every
 * 10 ms, and reads it. 0, or -1 with err set (QERR_TIMEOUT naming the path and what it held,
 * QERR_PARSE for a file that is not an id file, QERR_IO). */
int dp_nccl_id_read(const char *path, uint64_t tag, double timeout_s, dp_nccl_id_t *id,
                    qerr_t *err);

/* Rank `rank` of `world` on CUDA device `device`, collectives on `stream` (the caller's; it
 * must outlive the communicator), host buffers staged through bucket_bytes of device memory
 * (0 = DP_BUCKET_BYTES_DEFAULT). Sets the calling thread's current device. Blocks until every
 * rank has called it with the same id. NULL with err set (QERR_RANGE for a bad rank or device,
 * QERR_IO for an NCCL or CUDA failure, QERR_NOMEM). Free with dp_comm_destroy, which destroys
 * the NCCL communicator (or aborts it after a failure) and the staging bucket. */
dp_comm_t *dp_nccl_comm_new(const dp_nccl_id_t *id, int rank, int world, int device,
                            cudaStream_t stream, size_t bucket_bytes, qerr_t *err);

/* The file rendezvous in one call: rank 0 draws an id and writes it to path with tag, the
 * others wait up to timeout_s for it; then dp_nccl_comm_new. */
dp_comm_t *dp_nccl_comm_from_file(const char *path, uint64_t tag, double timeout_s, int rank,
                                  int world, int device, cudaStream_t stream, size_t bucket_bytes,
                                  qerr_t *err);

#ifdef __cplusplus
}
#endif

#endif
