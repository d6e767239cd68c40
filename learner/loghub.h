/* The log hub (ARCHITECTURE.md §1): every process's log publisher (common/log_pub.h) connects
 * to the hub's XSUB (network.log_in, default :5559); monitors connect SUB sockets to its XPUB
 * (network.log_out, default :5558).
 *
 * It runs in a thread of its own with a hand-written proxy loop rather than zmq_proxy:
 *   - records (Envelope{LogRecord} frames) are forwarded as they are, never decoded;
 *   - the XPUB has ZMQ_XPUB_NODROP, so a monitor that does not keep up fills its queue
 *     (network HWM) and the record is dropped and COUNTED (a plain PUB drops silently);
 *     the XSUB's receive HWM bounds what waits in the hub; publishers never block either
 *     (log_pub.h). Nothing here can block the learner.
 *   - subscriptions arriving at the XPUB from monitors are forwarded upstream through the XSUB
 *     to every publisher, and the loop keeps calling into the XSUB, which is what makes a bound
 *     XSUB pass subscriptions to publishers that connect later (docs/PROTOCOL-internals.md).
 * With publish_self the hub also registers a log publisher of this process connected over
 * inproc, so the learner's own records reach monitors like everyone else's. */
#ifndef QUILLAN_LOGHUB_H
#define QUILLAN_LOGHUB_H

#include "net.h"

#include <stdbool.h>
#include <stdint.h>

typedef struct {
    const char *in_endpoint;  /* XSUB bind address (network.log_in) */
    const char *out_endpoint; /* XPUB bind address (network.log_out) */
    const char *sender_id;    /* this process's id, for publish_self; copied */
    uint64_t incarnation_id;
    net_options_t net; /* sndhwm bounds each monitor's queue, rcvhwm the incoming one */
    net_security_t security;
    bool publish_self; /* also publish this process's own log records through the hub */
} loghub_options_t;

typedef struct {
    uint64_t forwarded;     /* records passed to the XPUB */
    uint64_t dropped;       /* records (or subscriptions) refused by a full queue */
    uint64_t subscriptions; /* (un)subscribe messages forwarded upstream */
} loghub_stats_t;

typedef struct loghub loghub_t;

/* Endpoints tcp://127.0.0.1:5559 and :5558, sender "learner", a fresh incarnation,
 * net_options_init, no security, publish_self on. */
void loghub_options_init(loghub_options_t *o);

/* Binds both sockets in zctx and starts the thread. NULL with err (bind failure, options). */
loghub_t *loghub_new(void *zctx, const loghub_options_t *o, qerr_t *err);

/* Stops the thread (within about 100 ms), closes everything and sets *h to NULL; safe on NULL.
 * Call before zmq_ctx_term. */
void loghub_destroy(loghub_t **h);

/* The bound endpoints with their ports resolved. */
const char *loghub_in_endpoint(const loghub_t *h);
const char *loghub_out_endpoint(const loghub_t *h);

/* Thread-safe copy of the counters. */
void loghub_stats(loghub_t *h, loghub_stats_t *out);

#endif
