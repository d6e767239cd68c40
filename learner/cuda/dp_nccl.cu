#include "dp_nccl.h"

#include <nccl.h>

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#if NCCL_VERSION_CODE < NCCL_VERSION(2, 10, 0)
#error "dp_nccl needs NCCL 2.10 or newer (ncclAvg, ncclCommGetAsyncError)"
#endif
static_assert(sizeof(ncclUniqueId) == DP_NCCL_ID_BYTES, "dp_nccl_id_t must hold an ncclUniqueId");

/* id file: magic, tag (8 bytes little-endian), the id */
static const char id_magic[8] = {'Q', 'N', 'C', 'C', 'L', 'I', 'D', '1'};
#define ID_FILE_BYTES (8 + 8 + DP_NCCL_ID_BYTES)
#define ID_POLL_NS 10000000L  /* rendezvous file: 10 ms */
#define STREAM_POLL_NS 20000L /* waiting for a collective: 20 us */

typedef struct {
    ncclComm_t comm;
    cudaStream_t stream;
    int device, rank;
    void *scratch; /* staging bucket for host buffers */
    size_t scratch_bytes;
    int aborted; /* dp_abort was called (atomic: any thread may set it) */
    int broken;  /* the NCCL communicator was aborted */
} nccl_impl_t;

static void sleep_ns(long ns) {
    struct timespec ts = {0, ns};
    nanosleep(&ts, NULL);
}

static double mono_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* Aborts the NCCL communicator once (its pending work cannot complete any more). */
static void impl_break(nccl_impl_t *x) {
    if (x->broken)
        return;
    x->broken = 1;
    NCCL_CHECK(ncclCommAbort(x->comm));
}

static int nccl_fail(nccl_impl_t *x, ncclResult_t r, const char *what, qerr_t *err) {
    impl_break(x);
    return qerr_set(err, QERR_IO, "dp NCCL rank %d (device %d): %s: %s", x->rank, x->device, what,
                    ncclGetErrorString(r));
}

#define NCCL_TRY_X(x, err, call)                                                                   \
    do {                                                                                           \
        const ncclResult_t q_nccl_r_ = (call);                                                     \
        if (q_nccl_r_ != ncclSuccess)                                                              \
            return nccl_fail(x, q_nccl_r_, #call, err);                                            \
    } while (0)

static int impl_usable(nccl_impl_t *x, qerr_t *err) {
    if (__atomic_load_n(&x->aborted, __ATOMIC_ACQUIRE) || x->broken) {
        impl_break(x);
        return qerr_set(err, QERR_INVALID, "dp NCCL rank %d: the group was aborted", x->rank);
    }
    return 0;
}

/* Waits for the stream while watching NCCL's asynchronous error and the abort flag, so a peer
 * that died or a dp_abort ends the wait instead of hanging in cudaStreamSynchronize. */
static int stream_wait(nccl_impl_t *x, qerr_t *err) {
    for (;;) {
        const cudaError_t e = cudaStreamQuery(x->stream);
        if (e == cudaSuccess)
            return 0;
        if (e != cudaErrorNotReady) {
            (void)cudaGetLastError();
            impl_break(x);
            return qerr_set(err, QERR_IO, "dp NCCL rank %d (device %d): stream: %s", x->rank,
                            x->device, cudaGetErrorString(e));
        }
        ncclResult_t a = ncclSuccess;
        NCCL_TRY_X(x, err, ncclCommGetAsyncError(x->comm, &a));
        if (a != ncclSuccess && a != ncclInProgress)
            return nccl_fail(x, a, "asynchronous error", err);
        if (impl_usable(x, err))
            return -1;
        sleep_ns(STREAM_POLL_NS);
    }
}

static int on_device(const void *p) {
    cudaPointerAttributes a;
    if (cudaPointerGetAttributes(&a, p) != cudaSuccess) {
        (void)cudaGetLastError(); /* an unregistered host pointer on old runtimes */
        return 0;
    }
    return a.type == cudaMemoryTypeDevice || a.type == cudaMemoryTypeManaged;
}

static ncclDataType_t nccl_type(dp_dtype_t t) {
    return t == DP_F32 ? ncclFloat32 : ncclFloat64;
}

static int nccl_allreduce(void *impl, void *buf, size_t count, dp_dtype_t t, dp_op_t op,
                          qerr_t *err) {
    nccl_impl_t *x = (nccl_impl_t *)impl;
    if (impl_usable(x, err))
        return -1;
    CUDA_TRY(err, cudaSetDevice(x->device));
    const ncclRedOp_t rop = op == DP_MEAN ? ncclAvg : ncclSum;
    if (on_device(buf)) {
        NCCL_TRY_X(x, err, ncclAllReduce(buf, buf, count, nccl_type(t), rop, x->comm, x->stream));
        return 0;
    }
    const size_t bytes = count * dp_dtype_size(t);
    Q_ASSERT(bytes <= x->scratch_bytes); /* dp_allreduce cuts buckets of at most this */
    CUDA_TRY(err, cudaMemcpyAsync(x->scratch, buf, bytes, cudaMemcpyHostToDevice, x->stream));
    NCCL_TRY_X(x, err,
               ncclAllReduce(x->scratch, x->scratch, count, nccl_type(t), rop, x->comm, x->stream));
    CUDA_TRY(err, cudaMemcpyAsync(buf, x->scratch, bytes, cudaMemcpyDeviceToHost, x->stream));
    return stream_wait(x, err);
}

static int nccl_broadcast(void *impl, void *buf, size_t bytes, qerr_t *err) {
    nccl_impl_t *x = (nccl_impl_t *)impl;
    if (impl_usable(x, err))
        return -1;
    CUDA_TRY(err, cudaSetDevice(x->device));
    if (on_device(buf)) {
        NCCL_TRY_X(x, err, ncclBroadcast(buf, buf, bytes, ncclUint8, 0, x->comm, x->stream));
        return 0;
    }
    Q_ASSERT(bytes <= x->scratch_bytes);
    CUDA_TRY(err, cudaMemcpyAsync(x->scratch, buf, bytes, cudaMemcpyHostToDevice, x->stream));
    NCCL_TRY_X(x, err,
               ncclBroadcast(x->scratch, x->scratch, bytes, ncclUint8, 0, x->comm, x->stream));
    CUDA_TRY(err, cudaMemcpyAsync(buf, x->scratch, bytes, cudaMemcpyDeviceToHost, x->stream));
    return stream_wait(x, err);
}

/* An all-reduce of one float on the staging bucket, then the stream: every rank has reached
 * it and all earlier work on the stream is done. */
static int nccl_barrier(void *impl, qerr_t *err) {
    nccl_impl_t *x = (nccl_impl_t *)impl;
    if (impl_usable(x, err))
        return -1;
    CUDA_TRY(err, cudaSetDevice(x->device));
    NCCL_TRY_X(x, err,
               ncclAllReduce(x->scratch, x->scratch, 1, ncclFloat32, ncclSum, x->comm, x->stream));
    return stream_wait(x, err);
}

static void nccl_abort(void *impl) {
    nccl_impl_t *x = (nccl_impl_t *)impl;
    __atomic_store_n(&x->aborted, 1, __ATOMIC_RELEASE);
}

static void nccl_destroy(void *impl) {
    nccl_impl_t *x = (nccl_impl_t *)impl;
    if (!x)
        return;
    CUDA_CHECK(cudaSetDevice(x->device));
    if (x->comm) {
        if (__atomic_load_n(&x->aborted, __ATOMIC_ACQUIRE))
            impl_break(x);
        else if (!x->broken && ncclCommDestroy(x->comm) != ncclSuccess)
            impl_break(x); /* a peer is gone: destroy cannot finish, abort frees it */
    }
    if (x->scratch)
        CUDA_CHECK(cudaFree(x->scratch));
    free(x);
}

static const dp_ops_t nccl_ops = {nccl_allreduce, nccl_broadcast, nccl_barrier, nccl_abort,
                                  nccl_destroy};

int dp_nccl_id_new(dp_nccl_id_t *id, qerr_t *err) {
    ncclUniqueId u;
    const ncclResult_t r = ncclGetUniqueId(&u);
    if (r != ncclSuccess)
        return qerr_set(err, QERR_IO, "dp NCCL: ncclGetUniqueId: %s", ncclGetErrorString(r));
    memcpy(id->bytes, u.internal, DP_NCCL_ID_BYTES);
    return 0;
}

int dp_nccl_id_write(const char *path, uint64_t tag, const dp_nccl_id_t *id, qerr_t *err) {
    unsigned char rec[ID_FILE_BYTES];
    memcpy(rec, id_magic, 8);
    for (int i = 0; i < 8; i++)
        rec[8 + i] = (unsigned char)(tag >> (8 * i));
    memcpy(rec + 16, id->bytes, DP_NCCL_ID_BYTES);
    char tmp[4096];
    if (snprintf(tmp, sizeof tmp, "%s.tmp.%ld", path, (long)getpid()) >= (int)sizeof tmp)
        return qerr_set(err, QERR_RANGE, "dp NCCL id file %s: path too long", path);
    FILE *f = fopen(tmp, "wb");
    if (!f)
        return qerr_set(err, QERR_IO, "dp NCCL id file %s: %s", tmp, strerror(errno));
    const int ok =
        fwrite(rec, 1, sizeof rec, f) == sizeof rec && fflush(f) == 0 && fsync(fileno(f)) == 0;
    const int saved = errno;
    if (fclose(f) != 0 || !ok) {
        unlink(tmp);
        return qerr_set(err, QERR_IO, "dp NCCL id file %s: write: %s", tmp,
                        strerror(ok ? errno : saved));
    }
    if (rename(tmp, path) != 0) {
        const int e = errno;
        unlink(tmp);
        return qerr_set(err, QERR_IO, "dp NCCL id file %s: rename from %s: %s", path, tmp,
                        strerror(e));
    }
    return 0;
}

int dp_nccl_id_read(const char *path, uint64_t tag, double timeout_s, dp_nccl_id_t *id,
                    qerr_t *err) {
    if (!(timeout_s > 0))
        return qerr_set(err, QERR_RANGE, "dp NCCL id file %s: timeout %g s must be > 0", path,
                        timeout_s);
    const double deadline = mono_s() + timeout_s;
    int other_tag = 0;
    uint64_t seen = 0;
    for (;;) {
        FILE *f = fopen(path, "rb");
        if (!f && errno != ENOENT)
            return qerr_set(err, QERR_IO, "dp NCCL id file %s: %s", path, strerror(errno));
        if (f) {
            unsigned char rec[ID_FILE_BYTES + 1];
            const size_t n = fread(rec, 1, sizeof rec, f);
            fclose(f);
            if (n != ID_FILE_BYTES || memcmp(rec, id_magic, 8) != 0)
                return qerr_set(err, QERR_PARSE,
                                "dp NCCL id file %s: %zu bytes that are not an id file "
                                "(dp_nccl_id_write)",
                                path, n);
            seen = 0;
            for (int i = 0; i < 8; i++)
                seen |= (uint64_t)rec[8 + i] << (8 * i);
            if (seen == tag) {
                memcpy(id->bytes, rec + 16, DP_NCCL_ID_BYTES);
                return 0;
            }
            other_tag = 1;
        }
        if (mono_s() > deadline)
            break;
        sleep_ns(ID_POLL_NS);
    }
    if (other_tag)
        return qerr_set(err, QERR_TIMEOUT,
                        "dp NCCL id file %s: after %g s it still holds tag %llu, not this "
                        "launch's %llu (left by an earlier run?)",
                        path, timeout_s, (unsigned long long)seen, (unsigned long long)tag);
    return qerr_set(err, QERR_TIMEOUT, "dp NCCL id file %s: rank 0 did not write it within %g s",
                    path, timeout_s);
}

dp_comm_t *dp_nccl_comm_new(const dp_nccl_id_t *id, int rank, int world, int device,
                            cudaStream_t stream, size_t bucket_bytes, qerr_t *err) {
    int ndev = 0;
    if (cudaGetDeviceCount(&ndev) != cudaSuccess) {
        (void)cudaGetLastError();
        ndev = 0;
    }
    if (world < 1 || rank < 0 || rank >= world || device < 0 || device >= ndev) {
        qerr_set(err, QERR_RANGE, "dp NCCL: rank %d of %d on device %d (%d devices)", rank, world,
                 device, ndev);
        return NULL;
    }
    nccl_impl_t *x = (nccl_impl_t *)calloc(1, sizeof *x);
    if (!x) {
        qerr_set(err, QERR_NOMEM, "out of memory");
        return NULL;
    }
    x->stream = stream;
    x->device = device;
    x->rank = rank;
    const size_t bucket = bucket_bytes ? bucket_bytes : DP_BUCKET_BYTES_DEFAULT;
    /* dp_allreduce sends one element when a bucket is smaller than an element */
    x->scratch_bytes = bucket > sizeof(double) ? bucket : sizeof(double);
    cudaError_t ce = cudaSetDevice(device);
    if (ce == cudaSuccess)
        ce = cudaMalloc(&x->scratch, x->scratch_bytes);
    if (ce != cudaSuccess) {
        (void)cudaGetLastError();
        qerr_set(err, ce == cudaErrorMemoryAllocation ? QERR_NOMEM : QERR_IO,
                 "dp NCCL rank %d: device %d: %s", rank, device, cudaGetErrorString(ce));
        nccl_destroy(x);
        return NULL;
    }
    ncclUniqueId u;
    memcpy(u.internal, id->bytes, DP_NCCL_ID_BYTES);
    const ncclResult_t r = ncclCommInitRank(&x->comm, world, u, rank);
    if (r != ncclSuccess) {
        qerr_set(err, QERR_IO, "dp NCCL rank %d of %d (device %d): ncclCommInitRank: %s", rank,
                 world, device, ncclGetErrorString(r));
        x->comm = NULL;
        nccl_destroy(x);
        return NULL;
    }
    return dp_comm_new(&nccl_ops, x, rank, world, bucket, err);
}

dp_comm_t *dp_nccl_comm_from_file(const char *path, uint64_t tag, double timeout_s, int rank,
                                  int world, int device, cudaStream_t stream, size_t bucket_bytes,
                                  qerr_t *err) {
    dp_nccl_id_t id;
    const int rc = rank == 0 ? dp_nccl_id_new(&id, err) || dp_nccl_id_write(path, tag, &id, err)
                             : dp_nccl_id_read(path, tag, timeout_s, &id, err);
    if (rc)
        return NULL;
    return dp_nccl_comm_new(&id, rank, world, device, stream, bucket_bytes, err);
}
