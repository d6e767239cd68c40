/* The learner's weights server: the ROUTER of the weights protocol (proto/weights.proto,
 * ARCHITECTURE.md §3) in front of a snapshot store (snapshot_store.h).
 *
 *   InfoRequest{version (0 = latest), have_version}
 *       -> SnapshotInfo of that version: a delta (base_version = have_version) when the store
 *          kept a delta of it against exactly have_version, else the full buffer;
 *       -> Error NOT_FOUND when the version was never published or has been evicted,
 *          Error UNAVAILABLE when nothing is published yet.
 *   ChunkRequest{version, index, base_version}
 *       -> ChunkReply{version, index, chunk_count, size, base_version} + the chunk's bytes as a
 *          raw frame sent zero-copy from the frozen entry (the entry stays referenced until
 *          libzmq has sent it, so eviction during a transfer is safe);
 *       -> Error NOT_FOUND for an unknown or evicted version, or a delta the store does not
 *          hold (base_version mismatch).
 * Bytes [index * chunk_size, +size) of the transfer; chunk_size is net_options_t.chunk_bytes.
 * Messages that fail the codec (net.h drops and counts them), bodies that a client never
 * sends (SnapshotInfo, ChunkReply, Error) and chunk indices past chunk_count are dropped and
 * counted in `malformed`. The server never blocks: a reply refused by a full queue or a gone
 * peer is counted in send_failed; the client's timeout asks again.
 *
 * Threading: poll-driven, one thread at a time (a ZeroMQ socket rule). The learner runs
 * weights_server_poll in its own thread while its training thread publishes into the store
 * (the store is thread-safe). */
#ifndef QUILLAN_WEIGHTS_SERVER_H
#define QUILLAN_WEIGHTS_SERVER_H

#include "net.h"
#include "snapshot_store.h"

typedef struct {
    const char *endpoint;    /* bind address (network.weights), e.g. "tcp://127.0.0.1:5556" */
    const char *sender_id;   /* this process's stable id; copied */
    uint64_t incarnation_id; /* net_incarnation_new() of this process */
    net_options_t net;       /* chunk_bytes is the transfer's chunk size */
    net_security_t security;
} weights_server_options_t;

/* Counters since weights_server_new. */
typedef struct {
    uint64_t info_requests; /* InfoRequests answered with a SnapshotInfo */
    uint64_t full_infos;    /* ... of which described a full transfer */
    uint64_t delta_infos;   /* ... of which described a delta */
    uint64_t chunks_sent;   /* ChunkReplies handed to libzmq */
    uint64_t bytes_sent;    /* their payload bytes */
    uint64_t errors_sent;   /* Error replies (NOT_FOUND, UNAVAILABLE) */
    uint64_t malformed;     /* requests dropped here (see above); net.h's drops are in net */
    uint64_t send_failed;   /* replies libzmq refused */
    net_stats_t net;        /* the socket's own counters */
} weights_server_stats_t;

typedef struct weights_server weights_server_t;

/* Fills o with defaults: endpoint "tcp://127.0.0.1:5556", sender "learner", a fresh incarnation,
 * net_options_init, no security. */
void weights_server_options_init(weights_server_options_t *o);

/* Creates the ROUTER in zctx and binds it. store is borrowed and must outlive the server.
 * NULL with err (bad options, bind failure). */
weights_server_t *weights_server_new(void *zctx, snapshot_store_t *store,
                                     const weights_server_options_t *o, qerr_t *err);

/* Closes the socket and sets *s to NULL; safe when *s is NULL. Chunks still queued in libzmq
 * keep their entries referenced until libzmq drops them. */
void weights_server_destroy(weights_server_t **s);

/* The bound endpoint with its port resolved. */
const char *weights_server_endpoint(const weights_server_t *s);

/* The socket handle, to poll it beside others (ZMQ_POLLIN); then call weights_server_poll(s,
 * 0). */
void *weights_server_handle(weights_server_t *s);

/* Waits up to timeout_ms (0: do not wait, -1: forever) for the first request, then serves every
 * request already queued. Returns how many requests it handled (>= 0), or -1 with err on a
 * socket failure (context terminated). */
int weights_server_poll(weights_server_t *s, int timeout_ms, qerr_t *err);

void weights_server_stats(weights_server_t *s, weights_server_stats_t *out);

#endif
