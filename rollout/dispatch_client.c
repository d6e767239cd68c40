#include "dispatch_client.h"

#include "log.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <zmq.h>

#define CLIENT_ID_MAX 128
#define CLIENT_ENDPOINT_MAX 512
/* Messages handled back to back in one poll before its deadline is looked at again. */
#define CLIENT_BATCH 1024

typedef struct {
    uint64_t lease_id;
    double sent_s;
} pending_t;

struct dispatch_client {
    dispatch_client_options_t o;
    char id[CLIENT_ID_MAX], host[CLIENT_ID_MAX], endpoint[CLIENT_ENDPOINT_MAX];
    void *zctx;
    net_socket_t *sock;
    uint64_t *held; /* lease ids held */
    size_t n_held, cap_held;
    pending_t *pending; /* groups sent and not yet acked */
    size_t n_pending, cap_pending;
    bool request_out; /* a WorkRequest is unanswered */
    double request_sent_s, next_request_s;
    double last_heard_s, next_heartbeat_s;
    uint64_t version; /* this worker's snapshot */
    uint64_t old_policy;
    dispatch_client_stats_t stats;
};

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

void dispatch_client_options_init(dispatch_client_options_t *o) {
    memset(o, 0, sizeof(*o));
    o->endpoint = "tcp://127.0.0.1:5555";
    o->worker_id = "worker";
    o->host = "";
    o->incarnation_id = net_incarnation_new();
    net_options_init(&o->net);
    o->security.mode = NET_SECURITY_NONE;
    o->capacity = 1;
    o->heartbeat_ivl_s = 1.0;
    o->heartbeat_liveness = 5;
}

static int socket_open(dispatch_client_t *c, qerr_t *err) {
    net_socket_spec_t spec = {.type = ZMQ_DEALER,
                              .protocol = WIRE_PROTOCOL_DISPATCH,
                              .name = "dispatch-client",
                              .sender_id = c->id,
                              .incarnation_id = c->o.incarnation_id};
    c->sock = net_socket_new(c->zctx, &spec, &c->o.net, &c->o.security, err);
    if (c->sock == NULL || net_socket_connect(c->sock, c->endpoint, err) != 0) {
        net_socket_destroy(&c->sock);
        return qerr_wrap(err, "dispatch client");
    }
    return 0;
}

dispatch_client_t *dispatch_client_new(void *zctx, const dispatch_client_options_t *o,
                                       qerr_t *err) {
    Q_ASSERT(zctx && o);
    if (o->endpoint == NULL || o->worker_id == NULL || o->worker_id[0] == '\0' ||
        o->cb.on_work == NULL) {
        qerr_set(err, QERR_INVALID,
                 "dispatch client: endpoint, worker_id and on_work are required");
        return NULL;
    }
    if (o->capacity < 1 || !(o->heartbeat_ivl_s > 0 && o->heartbeat_ivl_s <= 3600) ||
        o->heartbeat_liveness < 1 || o->limits.vocab_size == 0) {
        qerr_set(err, QERR_RANGE,
                 "dispatch client: capacity %u, heartbeat_ivl_s %g, heartbeat_liveness %d or "
                 "vocab_size %u out of range",
                 o->capacity, o->heartbeat_ivl_s, o->heartbeat_liveness, o->limits.vocab_size);
        return NULL;
    }
    if (strlen(o->worker_id) >= CLIENT_ID_MAX || strlen(o->endpoint) >= CLIENT_ENDPOINT_MAX ||
        (o->host && strlen(o->host) >= CLIENT_ID_MAX)) {
        qerr_set(err, QERR_RANGE, "dispatch client: worker id, host or endpoint too long");
        return NULL;
    }
    dispatch_client_t *c = calloc(1, sizeof *c);
    if (c == NULL) {
        qerr_set(err, QERR_NOMEM, "dispatch client: out of memory");
        return NULL;
    }
    c->o = *o;
    snprintf(c->id, sizeof c->id, "%s", o->worker_id);
    snprintf(c->host, sizeof c->host, "%s", o->host ? o->host : "");
    snprintf(c->endpoint, sizeof c->endpoint, "%s", o->endpoint);
    c->o.worker_id = c->id;
    c->o.host = c->host;
    c->o.endpoint = c->endpoint;
    c->zctx = zctx;
    if (socket_open(c, err) != 0) {
        dispatch_client_destroy(&c);
        return NULL;
    }
    double now = now_s();
    c->last_heard_s = now;
    c->next_heartbeat_s = now;
    return c;
}

void dispatch_client_destroy(dispatch_client_t **cp) {
    if (cp == NULL || *cp == NULL)
        return;
    dispatch_client_t *c = *cp;
    net_socket_destroy(&c->sock);
    free(c->held);
    free(c->pending);
    free(c);
    *cp = NULL;
}

static double liveness_s(const dispatch_client_t *c) {
    return c->o.heartbeat_ivl_s * c->o.heartbeat_liveness;
}

static int send_env(dispatch_client_t *c, Quillan__Envelope *env, qerr_t *err) {
    if (net_send(c->sock, NULL, env, NULL, 0, NULL, err) != 0) {
        c->stats.send_failed++;
        return -1;
    }
    return 0;
}

static int held_add(dispatch_client_t *c, uint64_t lease_id) {
    if (c->n_held == c->cap_held) {
        size_t cap = c->cap_held ? 2 * c->cap_held : 8;
        uint64_t *h = realloc(c->held, cap * sizeof *h);
        if (h == NULL)
            return -1;
        c->held = h;
        c->cap_held = cap;
    }
    c->held[c->n_held++] = lease_id;
    return 0;
}

static void held_remove(dispatch_client_t *c, uint64_t lease_id) {
    for (size_t i = 0; i < c->n_held; i++) {
        if (c->held[i] == lease_id) {
            c->held[i] = c->held[--c->n_held];
            return;
        }
    }
}

static void pending_remove(dispatch_client_t *c, size_t i) {
    c->pending[i] = c->pending[--c->n_pending];
}

static int pending_find(const dispatch_client_t *c, uint64_t lease_id) {
    for (size_t i = 0; i < c->n_pending; i++)
        if (c->pending[i].lease_id == lease_id)
            return (int)i;
    return -1;
}

/* Reports every group still waiting for an Ack as UNSPECIFIED (all of them, or the overdue).
 * Walks backwards over the entries present at the start: a group on_ack sends again is
 * appended behind the walk (pending_remove moves only visited entries), so one pass never
 * reports it twice, whatever the callback does. */
static void pending_expire(dispatch_client_t *c, double now, bool all) {
    for (size_t i = c->n_pending; i-- > 0;) {
        if (i >= c->n_pending || !(all || now - c->pending[i].sent_s > liveness_s(c)))
            continue;
        uint64_t lease = c->pending[i].lease_id;
        pending_remove(c, i);
        c->stats.acks[0]++;
        if (c->o.cb.on_ack)
            c->o.cb.on_ack(c->o.cb.ctx, lease, QUILLAN__ACK_STATUS__ACK_STATUS_UNSPECIFIED);
    }
}

static void learner_restarted(dispatch_client_t *c, uint64_t incarnation, double now) {
    log_field_t f[] = {{"leases_dropped", (double)c->n_held}};
    log_emit(LOG_WARN, "dispatch.learner_restart", f, 1,
             "learner restarted (incarnation %016llx); dropping %zu leases",
             (unsigned long long)incarnation, c->n_held);
    c->stats.dropped_leases += c->n_held;
    c->stats.learner_restarts++;
    c->n_held = 0;
    c->request_out = false;
    c->next_request_s = now;
    pending_expire(c, now, true);
    if (c->o.cb.on_restart)
        c->o.cb.on_restart(c->o.cb.ctx);
}

static void versions_note(dispatch_client_t *c, uint64_t latest, uint64_t old_policy) {
    if (latest == c->stats.latest_version && old_policy == c->old_policy)
        return;
    c->stats.latest_version = latest;
    c->old_policy = old_policy;
    if (c->o.cb.on_version)
        c->o.cb.on_version(c->o.cb.ctx, latest, old_policy);
}

static void message_handle(dispatch_client_t *c, const net_msg_t *m, double now) {
    const Quillan__Envelope *env = net_msg_envelope(m);
    size_t payload_len = 0;
    net_msg_payload(m, &payload_len);
    qerr_t e;
    if (dispatch_codec_net_validate(&c->o.limits, env, payload_len, &e) != 0) {
        c->stats.malformed++;
        log_debug("dispatch.malformed", "from the learner: %s", e.msg);
        return;
    }
    c->last_heard_s = now;
    if (c->stats.learner_incarnation == 0) {
        c->stats.learner_incarnation = env->incarnation_id;
    } else if (c->stats.learner_incarnation != env->incarnation_id) {
        c->stats.learner_incarnation = env->incarnation_id;
        learner_restarted(c, env->incarnation_id, now);
    }
    switch (env->body_case) {
    case QUILLAN__ENVELOPE__BODY_LEASE: {
        const Quillan__Lease *l = env->lease;
        c->request_out = false;
        if (l->n_requests == 0)
            c->next_request_s = now + l->retry_after_ms / 1000.0;
        versions_note(c, l->policy_version, c->old_policy);
        for (size_t i = 0; i < l->n_requests; i++) {
            c->stats.leases++;
            if (held_add(c, l->requests[i]->lease_id) != 0) {
                log_error("dispatch.oom", "out of memory holding lease %llu",
                          (unsigned long long)l->requests[i]->lease_id);
                continue;
            }
            c->o.cb.on_work(c->o.cb.ctx, l->requests[i], l->timeout_ms);
        }
        break;
    }
    case QUILLAN__ENVELOPE__BODY_HEARTBEAT:
        c->stats.heartbeats_received++;
        versions_note(c, env->heartbeat->snapshot_version, env->heartbeat->old_policy_version);
        break;
    case QUILLAN__ENVELOPE__BODY_ACK: {
        const Quillan__Ack *a = env->ack;
        int i = pending_find(c, a->lease_id);
        if (i >= 0)
            pending_remove(c, (size_t)i);
        c->stats.acks[a->status]++;
        if (c->o.cb.on_ack)
            c->o.cb.on_ack(c->o.cb.ctx, a->lease_id, a->status);
        break;
    }
    case QUILLAN__ENVELOPE__BODY_ERROR:
        log_warn("dispatch.learner_error", "learner error %d: %s", (int)env->error->code,
                 env->error->message);
        break;
    default:
        c->stats.malformed++;
        log_debug("dispatch.malformed", "the learner sent '%s'", wire_body_name(env->body_case));
        break;
    }
}

static int duties(dispatch_client_t *c, double now, qerr_t *err) {
    if (now - c->last_heard_s > liveness_s(c)) {
        /* Paranoid Pirate: a fresh socket, in case the old connection is wedged. */
        log_warn("dispatch.learner_silent",
                 "no word from the learner at %s for %.1f s; reconnecting", c->endpoint,
                 now - c->last_heard_s);
        net_socket_destroy(&c->sock);
        if (socket_open(c, err) != 0)
            return -1;
        c->stats.reconnects++;
        c->last_heard_s = now;
        c->request_out = false;
        c->next_heartbeat_s = now;
    }
    pending_expire(c, now, false);
    if (c->request_out && now - c->request_sent_s > liveness_s(c))
        c->request_out = false;
    if (!c->request_out && now >= c->next_request_s && c->n_held < c->o.capacity) {
        Quillan__WorkRequest wr = QUILLAN__WORK_REQUEST__INIT;
        wr.worker_id = c->id;
        wr.credits = c->o.capacity - (uint32_t)c->n_held;
        wr.snapshot_version = c->version;
        wr.host = c->host;
        Quillan__Envelope env = QUILLAN__ENVELOPE__INIT;
        env.body_case = QUILLAN__ENVELOPE__BODY_WORK_REQUEST;
        env.work_request = &wr;
        qerr_t e;
        if (send_env(c, &env, &e) == 0) {
            c->stats.work_requests++;
            c->request_out = true;
            c->request_sent_s = now;
        }
    }
    if (now >= c->next_heartbeat_s) {
        c->next_heartbeat_s = now + c->o.heartbeat_ivl_s;
        Quillan__Heartbeat hb = QUILLAN__HEARTBEAT__INIT;
        hb.snapshot_version = c->version;
        hb.n_lease_ids = c->n_held;
        hb.lease_ids = c->held;
        Quillan__Envelope env = QUILLAN__ENVELOPE__INIT;
        env.body_case = QUILLAN__ENVELOPE__BODY_HEARTBEAT;
        env.heartbeat = &hb;
        qerr_t e;
        if (send_env(c, &env, &e) == 0)
            c->stats.heartbeats_sent++;
    }
    return 0;
}

/* Milliseconds until the next timed duty. */
static int duty_wait_ms(const dispatch_client_t *c, double now) {
    double next = c->next_heartbeat_s;
    if (!c->request_out && c->n_held < c->o.capacity && c->next_request_s < next)
        next = c->next_request_s;
    double s = next - now;
    return s <= 0 ? 0 : (int)(s * 1000.0) + 1;
}

int dispatch_client_poll(dispatch_client_t *c, int timeout_ms, qerr_t *err) {
    double deadline = now_s() + (timeout_ms > 0 ? timeout_ms / 1000.0 : 0);
    int handled = 0;
    for (;;) {
        double now = now_s();
        if (duties(c, now, err) != 0)
            return -1;
        int wait = duty_wait_ms(c, now);
        if (timeout_ms >= 0) {
            int left = deadline > now ? (int)((deadline - now) * 1000.0) + 1 : 0;
            if (left < wait)
                wait = left;
        }
        net_msg_t *m = NULL;
        int rc = net_recv(c->sock, wait, &m, err);
        if (rc < 0)
            return -1;
        for (int burst = 0; rc == 1;) {
            message_handle(c, m, now_s());
            net_msg_destroy(&m);
            handled++;
            if (++burst == CLIENT_BATCH)
                break;
            rc = net_recv(c->sock, 0, &m, err);
            if (rc < 0)
                return -1;
        }
        if (timeout_ms < 0 ? handled > 0 : now_s() >= deadline)
            return handled;
    }
}

int dispatch_client_send_group(dispatch_client_t *c, Quillan__TrajectoryGroup *g, qerr_t *err) {
    held_remove(c, g->lease_id);
    g->worker_id = c->id;
    Quillan__Envelope env = QUILLAN__ENVELOPE__INIT;
    env.body_case = QUILLAN__ENVELOPE__BODY_TRAJECTORY_GROUP;
    env.trajectory_group = g;
    /* A refused group waits for its Ack like a sent one: the time-out report tells the
     * caller to send it again. */
    const int rc = send_env(c, &env, err);
    if (rc == 0)
        c->stats.groups_sent++;
    int i = pending_find(c, g->lease_id);
    if (i >= 0) {
        c->pending[i].sent_s = now_s();
    } else {
        if (c->n_pending == c->cap_pending) {
            size_t cap = c->cap_pending ? 2 * c->cap_pending : 8;
            pending_t *p = realloc(c->pending, cap * sizeof *p);
            if (p == NULL) /* its Ack is still reported, only the time-out report is lost */
                goto out;
            c->pending = p;
            c->cap_pending = cap;
        }
        c->pending[c->n_pending++] = (pending_t){g->lease_id, now_s()};
    }
out:
    if (rc != 0)
        return qerr_wrap(err, "dispatch client: group of lease %llu",
                         (unsigned long long)g->lease_id);
    return 0;
}

void dispatch_client_lease_drop(dispatch_client_t *c, uint64_t lease_id) {
    held_remove(c, lease_id);
}

void dispatch_client_set_version(dispatch_client_t *c, uint64_t version) {
    c->version = version;
}

void dispatch_client_stats(dispatch_client_t *c, dispatch_client_stats_t *out) {
    *out = c->stats;
    out->held = c->n_held;
    net_socket_stats(c->sock, &out->net);
}
