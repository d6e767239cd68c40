#include "loghub.h"

#include "log.h"
#include "log_pub.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <zmq.h>

/* Poll period of the hub thread: how soon it notices loghub_destroy. */
#define LOGHUB_POLL_MS 100
/* Messages moved per direction per wake-up, so neither direction starves the other. */
#define LOGHUB_BATCH 256
#define LOGHUB_ENDPOINT_MAX 256

struct loghub {
    net_socket_t *xsub, *xpub;
    log_pub_t *self; /* this process's publisher (publish_self) */
    pthread_t thread;
    bool started;
    atomic_bool stop;
    atomic_uint_fast64_t forwarded, dropped, subscriptions;
    char in_endpoint[LOGHUB_ENDPOINT_MAX], out_endpoint[LOGHUB_ENDPOINT_MAX];
};

void loghub_options_init(loghub_options_t *o) {
    memset(o, 0, sizeof(*o));
    o->in_endpoint = "tcp://127.0.0.1:5559";
    o->out_endpoint = "tcp://127.0.0.1:5558";
    o->sender_id = "learner";
    o->incarnation_id = net_incarnation_new();
    net_options_init(&o->net);
    o->security.mode = NET_SECURITY_NONE;
    o->publish_self = true;
}

/* Moves up to LOGHUB_BATCH whole messages from src to dst without waiting. Frames of a message
 * that dst refuses are dropped up to the message's end. Returns how many messages moved and
 * adds the refused ones to *refused. */
static int relay(void *src, void *dst, uint64_t *refused) {
    int moved = 0;
    for (int n = 0; n < LOGHUB_BATCH; n++) {
        zmq_msg_t f;
        zmq_msg_init(&f);
        if (zmq_msg_recv(&f, src, ZMQ_DONTWAIT) < 0) {
            zmq_msg_close(&f);
            break;
        }
        bool ok = true;
        for (;;) {
            int more = zmq_msg_more(&f);
            if (ok && zmq_msg_send(&f, dst, ZMQ_DONTWAIT | (more ? ZMQ_SNDMORE : 0)) < 0)
                ok = false;
            zmq_msg_close(&f);
            if (!more)
                break;
            zmq_msg_init(&f);
            if (zmq_msg_recv(&f, src, ZMQ_DONTWAIT) < 0) {
                zmq_msg_close(&f);
                break;
            }
        }
        if (ok)
            moved++;
        else
            (*refused)++;
    }
    return moved;
}

static void *hub_main(void *arg) {
    loghub_t *h = arg;
    void *xsub = net_socket_handle(h->xsub), *xpub = net_socket_handle(h->xpub);
    while (!atomic_load(&h->stop)) {
        zmq_pollitem_t items[2] = {{xsub, 0, ZMQ_POLLIN, 0}, {xpub, 0, ZMQ_POLLIN, 0}};
        if (zmq_poll(items, 2, LOGHUB_POLL_MS) < 0)
            break; /* context terminated */
        uint64_t refused = 0;
        if (items[1].revents & ZMQ_POLLIN) {
            int n = relay(xpub, xsub, &refused);
            atomic_fetch_add(&h->subscriptions, (uint64_t)n);
        }
        if (items[0].revents & ZMQ_POLLIN) {
            int n = relay(xsub, xpub, &refused);
            atomic_fetch_add(&h->forwarded, (uint64_t)n);
        }
        if (refused)
            atomic_fetch_add(&h->dropped, refused);
    }
    return NULL;
}

static net_socket_t *hub_socket(void *zctx, int type, const char *name, const loghub_options_t *o,
                                const char *endpoint, qerr_t *err) {
    net_socket_spec_t spec = {.type = type,
                              .protocol = WIRE_PROTOCOL_LOG,
                              .name = name,
                              .sender_id = o->sender_id,
                              .incarnation_id = o->incarnation_id};
    net_socket_t *s = net_socket_new(zctx, &spec, &o->net, &o->security, err);
    if (s == NULL || net_socket_bind(s, endpoint, err) != 0) {
        net_socket_destroy(&s);
        qerr_wrap(err, "log hub");
        return NULL;
    }
    return s;
}

loghub_t *loghub_new(void *zctx, const loghub_options_t *o, qerr_t *err) {
    Q_ASSERT(zctx && o && o->in_endpoint && o->out_endpoint && o->sender_id);
    loghub_t *h = calloc(1, sizeof *h);
    if (h == NULL) {
        qerr_set(err, QERR_NOMEM, "log hub: out of memory");
        return NULL;
    }
    atomic_init(&h->stop, false);
    atomic_init(&h->forwarded, 0);
    atomic_init(&h->dropped, 0);
    atomic_init(&h->subscriptions, 0);
    h->xsub = hub_socket(zctx, ZMQ_XSUB, "log-hub-in", o, o->in_endpoint, err);
    if (h->xsub)
        snprintf(h->in_endpoint, sizeof h->in_endpoint, "%s", net_socket_endpoint(h->xsub));
    h->xpub = h->xsub ? hub_socket(zctx, ZMQ_XPUB, "log-hub-out", o, o->out_endpoint, err) : NULL;
    if (h->xpub == NULL) {
        loghub_destroy(&h);
        return NULL;
    }
    snprintf(h->out_endpoint, sizeof h->out_endpoint, "%s", net_socket_endpoint(h->xpub));
    if (o->publish_self) {
        static atomic_uint_fast64_t serial;
        char inproc[96];
        snprintf(inproc, sizeof inproc, "inproc://quillan-loghub-%llu",
                 (unsigned long long)atomic_fetch_add(&serial, 1));
        qerr_t e;
        if (zmq_bind(net_socket_handle(h->xsub), inproc) != 0) {
            qerr_set(err, QERR_IO, "log hub: binding %s: %s", inproc, zmq_strerror(zmq_errno()));
            loghub_destroy(&h);
            return NULL;
        }
        h->self =
            log_pub_new(zctx, inproc, &o->net, &o->security, o->sender_id, o->incarnation_id, &e);
        if (h->self == NULL) {
            qerr_set(err, e.code, "log hub: own publisher: %s", e.msg);
            loghub_destroy(&h);
            return NULL;
        }
    }
    if (pthread_create(&h->thread, NULL, hub_main, h) != 0) {
        qerr_set(err, QERR_IO, "log hub: cannot start its thread");
        loghub_destroy(&h);
        return NULL;
    }
    h->started = true;
    log_info("loghub.listen", "log hub: publishers -> %s, monitors <- %s", h->in_endpoint,
             h->out_endpoint);
    return h;
}

void loghub_destroy(loghub_t **hp) {
    if (hp == NULL || *hp == NULL)
        return;
    loghub_t *h = *hp;
    log_pub_destroy(&h->self);
    if (h->started) {
        atomic_store(&h->stop, true);
        pthread_join(h->thread, NULL);
    }
    net_socket_destroy(&h->xsub);
    net_socket_destroy(&h->xpub);
    free(h);
    *hp = NULL;
}

const char *loghub_in_endpoint(const loghub_t *h) {
    return h->in_endpoint;
}

const char *loghub_out_endpoint(const loghub_t *h) {
    return h->out_endpoint;
}

void loghub_stats(loghub_t *h, loghub_stats_t *out) {
    out->forwarded = atomic_load(&h->forwarded);
    out->dropped = atomic_load(&h->dropped);
    out->subscriptions = atomic_load(&h->subscriptions);
}
