/* The rollout worker's side of the weights protocol (proto/weights.proto, ARCHITECTURE.md §2
 * step 6 and §3): pulls a policy snapshot from the learner's weights server in chunks, verifies
 * it and hands back a reference-counted, read-only snapshot.
 *
 * Transfer (zguide "file transfer", credit-based): one InfoRequest (resent after
 * request_timeout_ms until answered), then ChunkRequests with at most `chunks_in_flight`
 * outstanding; each reply returns its credit and the next chunk is asked. A chunk not answered
 * within request_timeout_ms is asked again (lost, or dropped as corrupt by the codec); late
 * duplicates are ignored. When every chunk is in, the transfer's BLAKE2b-256 digest is checked;
 * a delta (learner/snapshot_store.h documents its format) is then applied to the base snapshot
 * the caller holds and the result checked against full_digest. A mismatch, or a version
 * evicted mid-transfer when the latest was asked, starts the transfer again (after a delta
 * mismatch, as a full one), up to max_attempts times. A partial or unverified snapshot is never
 * returned.
 *
 * A snapshot_t is immutable and shared: a worker decodes old groups with one version while new
 * groups start on the next; the memory goes when the last reference is dropped.
 *
 * Threading: a client is used by one thread at a time (ZeroMQ rule); snapshot_ref/unref and
 * the accessors may be called from any thread. */
#ifndef QUILLAN_SNAPSHOT_CLIENT_H
#define QUILLAN_SNAPSHOT_CLIENT_H

#include "net.h"

#include <signal.h>
#include <stddef.h>
#include <stdint.h>

#define SNAPSHOT_CLIENT_DIGEST_BYTES 32

/* One tensor of the snapshot's table (SnapshotInfo.tensors); strings owned by the snapshot. */
typedef struct {
    const char *name;
    const char *qtype;
    const uint64_t *shape;
    size_t n_dims;
    uint64_t offset; /* byte offset in snapshot_data() */
    uint64_t bytes;
} snapshot_client_tensor_t;

/* A verified snapshot (read-only memory), reference-counted. */
typedef struct snapshot snapshot_t;

/* Takes one more reference; returns s. */
snapshot_t *snapshot_ref(snapshot_t *s);
/* Drops one reference (freeing on the last) and sets *s to NULL; safe on NULL. */
void snapshot_unref(snapshot_t **s);

uint64_t snapshot_version(const snapshot_t *s);
int snapshot_is_old_policy(const snapshot_t *s);
/* The snapshot's bytes (read-only pages) and their length. */
const uint8_t *snapshot_data(const snapshot_t *s, size_t *len);
/* BLAKE2b-256 of snapshot_data, SNAPSHOT_CLIENT_DIGEST_BYTES bytes. */
const uint8_t *snapshot_digest(const snapshot_t *s);
size_t snapshot_tensor_count(const snapshot_t *s);
/* Tensor i < snapshot_tensor_count(s). */
const snapshot_client_tensor_t *snapshot_tensor(const snapshot_t *s, size_t i);
/* The tensor named name, or NULL. */
const snapshot_client_tensor_t *snapshot_tensor_find(const snapshot_t *s, const char *name);

/* Applies a delta payload (snapshot_store.h format) to base (base_len bytes) into out, which
 * has room for base_len bytes. Validates the whole payload first (magic, block size, lengths,
 * runs inside the buffer, data length exact) and writes out only when it is valid. Returns 0,
 * or -1 with QERR_PARSE/QERR_INVALID naming what is wrong. */
int snapshot_delta_apply(const uint8_t *base, size_t base_len, const uint8_t *delta,
                         size_t delta_len, uint8_t *out, qerr_t *err);

typedef struct {
    const char *endpoint;    /* the learner's weights socket (network.weights) */
    const char *sender_id;   /* this worker's stable id; copied */
    uint64_t incarnation_id; /* net_incarnation_new() of this process */
    net_options_t net;       /* chunk_bytes bounds the chunks accepted: >= the server's */
    net_security_t security;
    int chunks_in_flight;        /* network.chunks_in_flight: credit window, [1, 1024]; 4 */
    int request_timeout_ms;      /* an unanswered request is asked again after this: 2000;
                                    [10, 600000] */
    int max_attempts;            /* whole transfers tried per fetch: 3; [1, 100] */
    uint64_t max_snapshot_bytes; /* largest transfer or snapshot accepted: 4 GiB; >= 1 */
} snapshot_client_options_t;

/* Counters since snapshot_client_new. */
typedef struct {
    uint64_t fetched;         /* snapshots returned */
    uint64_t full_transfers;  /* transfers started as full */
    uint64_t delta_transfers; /* transfers started as delta */
    uint64_t chunks;          /* chunks received and used */
    uint64_t bytes;           /* their bytes */
    uint64_t rerequests;      /* chunk or info requests sent again after a timeout */
    uint64_t duplicates;      /* replies ignored: late, duplicate or of another transfer */
    uint64_t digest_failures; /* transfers whose digest or full digest did not match */
    uint64_t errors;          /* Error replies received */
    net_stats_t net;          /* the socket's own counters */
} snapshot_client_stats_t;

#define SNAPSHOT_STOP_POLL_MS 200 /* longest wait between looks at the stop flag */

typedef struct snapshot_client snapshot_client_t;

/* Fills o with the defaults above; endpoint "tcp://127.0.0.1:5556", sender "rollout". */
void snapshot_client_options_init(snapshot_client_options_t *o);

/* Creates a DEALER in zctx and connects it. NULL with err (bad options, connect failure). */
snapshot_client_t *snapshot_client_new(void *zctx, const snapshot_client_options_t *o, qerr_t *err);

/* Closes the socket and sets *c to NULL; safe when *c is NULL. Snapshots outlive the client. */
void snapshot_client_destroy(snapshot_client_t **c);

/* A flag (may be NULL: none) that ends a fetch within SNAPSHOT_STOP_POLL_MS of turning
 * non-zero, with QERR_TIMEOUT: a worker asked to stop does not wait out a dead server. */
void snapshot_client_set_stop(snapshot_client_t *c, const volatile sig_atomic_t *stop);

/* Fetches version (0 = the latest) within timeout_ms (> 0). base (may be NULL) is a snapshot
 * the caller holds: the server may then send a delta against it; base is borrowed. Returns a
 * new snapshot with one reference for the caller, or NULL with err: QERR_NOTFOUND (the server
 * does not have that version), QERR_TIMEOUT (deadline), QERR_INVALID (digest mismatches on
 * every attempt, or an answer that breaks the protocol), QERR_RANGE (larger than
 * max_snapshot_bytes), QERR_NOMEM, QERR_IO. */
snapshot_t *snapshot_client_fetch(snapshot_client_t *c, uint64_t version, const snapshot_t *base,
                                  int timeout_ms, qerr_t *err);

void snapshot_client_stats(snapshot_client_t *c, snapshot_client_stats_t *out);

#endif
