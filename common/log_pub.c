#include "log_pub.h"

#include "log_codec.h"

#include <pthread.h>
#include <stdlib.h>
#include <zmq.h>

/* Records with up to this many fields are published without a heap allocation. */
#define LOG_PUB_STACK_FIELDS 32

struct log_pub {
    net_socket_t *sock;
    pthread_mutex_t lock; /* guards stats: log_pub_stats may run beside a logging thread */
    log_pub_stats_t stats;
};

/* Subscription messages arrive on an XPUB's receive side; read and discard them so they never
 * fill its queue. Only the hub's XSUB sends them. */
static void subscriptions_discard(void *zsock) {
    for (;;) {
        zmq_msg_t m;
        zmq_msg_init(&m);
        int rc = zmq_msg_recv(&m, zsock, ZMQ_DONTWAIT);
        zmq_msg_close(&m);
        if (rc < 0)
            return;
    }
}

/* The log sink. It runs under the log lock and must not log, so failures are only counted. */
static void pub_sink(void *ctx, const log_record_t *rec) {
    log_pub_t *p = ctx;
    subscriptions_discard(net_socket_handle(p->sock));
    Quillan__LogRecord__FieldsEntry stack_entries[LOG_PUB_STACK_FIELDS];
    Quillan__LogRecord__FieldsEntry *stack_ptrs[LOG_PUB_STACK_FIELDS];
    Quillan__LogRecord__FieldsEntry *entries = stack_entries;
    Quillan__LogRecord__FieldsEntry **ptrs = stack_ptrs;
    int ok = 1;
    if (rec->n_fields > LOG_PUB_STACK_FIELDS) {
        entries = calloc(rec->n_fields, sizeof *entries);
        ptrs = calloc(rec->n_fields, sizeof *ptrs);
        ok = entries != NULL && ptrs != NULL;
    }
    if (ok) {
        Quillan__LogRecord lr;
        log_codec_record_fill(&lr, rec, entries, ptrs);
        Quillan__Envelope env = QUILLAN__ENVELOPE__INIT;
        env.body_case = QUILLAN__ENVELOPE__BODY_LOG_RECORD;
        env.log_record = &lr;
        ok = net_send(p->sock, NULL, &env, NULL, 0, NULL, NULL) == 0;
    }
    if (entries != stack_entries) {
        free(entries);
        free(ptrs);
    }
    pthread_mutex_lock(&p->lock);
    if (ok)
        p->stats.published++;
    else
        p->stats.dropped++;
    pthread_mutex_unlock(&p->lock);
}

log_pub_t *log_pub_new(void *zctx, const char *hub_endpoint, const net_options_t *opt,
                       const net_security_t *sec, const char *sender_id, uint64_t incarnation_id,
                       qerr_t *err) {
    Q_ASSERT(zctx && hub_endpoint && opt && sec && sender_id);
    log_pub_t *p = calloc(1, sizeof *p);
    if (p == NULL) {
        qerr_set(err, QERR_NOMEM, "log publisher: out of memory");
        return NULL;
    }
    pthread_mutex_init(&p->lock, NULL);
    net_socket_spec_t spec = {
        .type = ZMQ_XPUB,
        .protocol = WIRE_PROTOCOL_LOG,
        .name = "log-pub",
        .sender_id = sender_id,
        .incarnation_id = incarnation_id,
    };
    p->sock = net_socket_new(zctx, &spec, opt, sec, err);
    if (p->sock == NULL || net_socket_connect(p->sock, hub_endpoint, err) != 0) {
        log_pub_destroy(&p);
        return NULL;
    }
    if (log_sink_add(pub_sink, p) != 0) {
        qerr_set(err, QERR_RANGE, "log publisher: the log sink table is full");
        log_pub_destroy(&p);
        return NULL;
    }
    return p;
}

void log_pub_stats(log_pub_t *p, log_pub_stats_t *out) {
    pthread_mutex_lock(&p->lock);
    *out = p->stats;
    pthread_mutex_unlock(&p->lock);
}

void log_pub_destroy(log_pub_t **pp) {
    if (pp == NULL || *pp == NULL)
        return;
    log_pub_t *p = *pp;
    log_sink_remove(pub_sink, p); /* waits for a sink call in progress: it holds the log lock */
    net_socket_destroy(&p->sock);
    pthread_mutex_destroy(&p->lock);
    free(p);
    *pp = NULL;
}
