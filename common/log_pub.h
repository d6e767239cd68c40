/* Log publisher: a common/log.h sink that publishes every record as Envelope{LogRecord} to the
 * log hub's XSUB address (ARCHITECTURE.md §1, default tcp://<learner>:5559).
 *
 * It never blocks the process that logs: records go out with ZMQ_DONTWAIT behind a bounded
 * high-water mark, and a record that does not fit is dropped and counted. The socket is an
 * XPUB with ZMQ_XPUB_NODROP, a PUB that reports a full queue: a plain PUB drops silently at its
 * high-water mark, so its drops could not be counted. Records published while no monitor
 * subscribes at the hub are filtered out by ZeroMQ, as with any PUB.
 *
 * The sink runs under the log module's lock, which serialises every use of the socket; the
 * publisher is safe to use from any thread that logs. */
#ifndef QUILLAN_LOG_PUB_H
#define QUILLAN_LOG_PUB_H

#include "net.h"

typedef struct log_pub log_pub_t;

typedef struct {
    uint64_t published; /* records handed to libzmq */
    uint64_t dropped;   /* records refused: queue full, oversize, or not packable */
} log_pub_stats_t;

/* Connects an XPUB socket (opt's HWM bounds the queue; sends never wait) to hub_endpoint and
 * registers the sink. sender_id and incarnation_id name this process in every Envelope.
 * Returns the publisher, or NULL with err (bad options, connect failure, sink table full).
 * Destroy before zmq_ctx_term(zctx). */
log_pub_t *log_pub_new(void *zctx, const char *hub_endpoint, const net_options_t *opt,
                       const net_security_t *sec, const char *sender_id, uint64_t incarnation_id,
                       qerr_t *err);

/* Copies the counters. */
void log_pub_stats(log_pub_t *p, log_pub_stats_t *out);

/* Unregisters the sink, closes the socket (lingering opt->linger_ms for queued records) and
 * sets *p to NULL; safe when *p is NULL. */
void log_pub_destroy(log_pub_t **p);

#endif
