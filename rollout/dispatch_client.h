/* The worker's side of the dispatch protocol (proto/dispatch.proto, learner/dispatcher.h): a
 * DEALER connected to the learner's dispatcher. No generation logic: the worker runs the
 * leases it is given and hands finished groups back through this client.
 *
 * What it does on its own, inside dispatch_client_poll:
 *   - asks for work: one WorkRequest at a time, credits = capacity - leases held, sent when
 *     credits > 0 and no WorkRequest is unanswered (then Lease.retry_after_ms later after an
 *     empty Lease; again after heartbeat_liveness intervals without an answer);
 *   - heartbeats: a Heartbeat{snapshot_version, leases held} every heartbeat interval;
 *   - learner liveness (Paranoid Pirate): silence for heartbeat_liveness intervals closes the
 *     socket and connects a fresh one (leases are kept: the learner may still be there);
 *   - learner restart: a changed Envelope incarnation id drops every lease held (the learner's
 *     restored table re-leases them), calls on_restart (re-fetch the weights) and asks for
 *     work again;
 *   - acks: every Ack is passed to on_ack; a group without an Ack within heartbeat_liveness
 *     intervals is reported as on_ack(lease, ACK_STATUS_UNSPECIFIED): resend it if you still
 *     hold it (the learner counts a copy it already has as a DUPLICATE).
 *
 * Callbacks run on the polling thread during dispatch_client_poll and may call the other
 * functions here. Messages passed to them are valid only during the call. One thread at a
 * time uses a client (ZeroMQ socket rule). */
#ifndef QUILLAN_DISPATCH_CLIENT_H
#define QUILLAN_DISPATCH_CLIENT_H

#include "dispatch_codec.h"
#include "net.h"

#include <stdbool.h>
#include <stdint.h>

typedef struct {
    /* A lease of work: run rq (rq->group_size samples of rq->prompt_tokens with rq->sampling
     * and a snapshot at least rq->min_version) and return the group before timeout_ms. The
     * lease stays held until dispatch_client_send_group or dispatch_client_lease_drop. */
    void (*on_work)(void *ctx, const Quillan__RolloutRequest *rq, uint32_t timeout_ms);
    /* The learner's answer to a group (see the file comment for UNSPECIFIED). */
    void (*on_ack)(void *ctx, uint64_t lease_id, Quillan__AckStatus status);
    /* The learner announced another latest snapshot or old policy version. */
    void (*on_version)(void *ctx, uint64_t latest, uint64_t old_policy);
    /* The learner restarted: leases are dropped; fetch its weights again. */
    void (*on_restart)(void *ctx);
    void *ctx;
} dispatch_client_callbacks_t;

typedef struct {
    const char *endpoint;    /* the learner's dispatcher (network.dispatcher) */
    const char *worker_id;   /* stable worker name (Envelope.sender_id); copied */
    const char *host;        /* reported in WorkRequests; copied */
    uint64_t incarnation_id; /* net_incarnation_new() of this worker process */
    net_options_t net;
    net_security_t security;
    dispatch_codec_limits_t limits; /* checks received Leases (dispatch_codec_validate) */
    uint32_t capacity;              /* groups held at once (rollout.credits), >= 1 */
    double heartbeat_ivl_s;         /* network.heartbeat_ivl_s, > 0 */
    int heartbeat_liveness;         /* network.heartbeat_liveness, >= 1 */
    dispatch_client_callbacks_t cb; /* on_work is required, the rest may be NULL */
} dispatch_client_options_t;

typedef struct {
    uint64_t leases; /* RolloutRequests received */
    uint64_t groups_sent;
    uint64_t acks[5];       /* by AckStatus; [0] counts groups without an Ack in time */
    uint64_t work_requests; /* WorkRequests sent */
    uint64_t heartbeats_sent, heartbeats_received;
    uint64_t reconnects; /* learner silence: fresh socket */
    uint64_t learner_restarts;
    uint64_t dropped_leases; /* dropped on a learner restart */
    uint64_t malformed;      /* received messages failing validation or of unexpected bodies */
    uint64_t send_failed;
    uint64_t held;                /* gauge: leases held now */
    uint64_t learner_incarnation; /* 0 before the first message from the learner */
    uint64_t latest_version;      /* as the learner last announced */
    net_stats_t net;
} dispatch_client_stats_t;

typedef struct dispatch_client dispatch_client_t;

/* Defaults: endpoint "tcp://127.0.0.1:5555", worker id "worker", host "", a fresh incarnation,
 * net_options_init, capacity 1, heartbeat 1 s x 5; limits and callbacks are the caller's. */
void dispatch_client_options_init(dispatch_client_options_t *o);

/* Connects (libzmq connects in the background) and sends the first WorkRequest at the first
 * poll. NULL with err (bad options, socket failure). */
dispatch_client_t *dispatch_client_new(void *zctx, const dispatch_client_options_t *o, qerr_t *err);
void dispatch_client_destroy(dispatch_client_t **c);

/* Does the protocol's work for up to timeout_ms (0: check once; -1: until one message is
 * handled), calling the callbacks. Returns the number of messages handled (>= 0), or -1 with
 * err on a socket failure. Call it at least every heartbeat interval. */
int dispatch_client_poll(dispatch_client_t *c, int timeout_ms, qerr_t *err);

/* Sends a finished group (g->lease_id names the lease; worker_id is filled here) and releases
 * the lease's credit; the Ack comes through on_ack. Groups of leases dropped on a learner
 * restart may still be sent: the learner accepts them when their unit is not yet done.
 * -1 with err when libzmq refuses the message (the credit is released anyway, and the group
 * waits for an Ack as a sent one does: on_ack reports it UNSPECIFIED after the time-out, so
 * the caller sends it again then). */
int dispatch_client_send_group(dispatch_client_t *c, Quillan__TrajectoryGroup *g, qerr_t *err);

/* Gives a lease up without a group (the worker cannot run it); its credit is released and the
 * learner re-leases it when it times out. */
void dispatch_client_lease_drop(dispatch_client_t *c, uint64_t lease_id);

/* The snapshot version this worker samples with, reported in heartbeats and WorkRequests. */
void dispatch_client_set_version(dispatch_client_t *c, uint64_t version);

void dispatch_client_stats(dispatch_client_t *c, dispatch_client_stats_t *out);

#endif
