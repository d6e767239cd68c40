#include "net.h"

#include "log.h"
#include "net_security.h"

#include <errno.h>
#include <sodium.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <zmq.h>

/* Frames kept per received message: routing id, REQ delimiter, Envelope, payload, and one
 * more so a message with too many frames is recognised; further frames are only counted. */
#define FRAMES_KEPT 5

/* Drops of one reason are logged while rare: the first 10, then at every power of two, so a
 * hostile flood costs a few log lines, not one per message. */
#define DROP_LOG_ALWAYS 10

struct net_socket {
    void *zsock;
    void *monitor; /* PAIR receiving this socket's disconnect events */
    int type;
    wire_protocol_t protocol;
    int64_t max_frame; /* ZMQ_MAXMSGSIZE in force */
    size_t decode_budget;
    int require_user_id; /* a CURVE server: drop messages without a User-Id */
    void *zctx;
    net_security_t sec;
    int role;     /* 0 until the first bind/connect, then NET_ROLE_SERVER or NET_ROLE_CLIENT */
    int zap_held; /* this socket holds a reference on its context's ZAP handler */
    net_validate_fn validate;
    void *validate_ctx;
    char name[64];
    char sender_id[128];
    uint64_t incarnation_id;
    uint64_t next_message_id;
    char endpoint[256];
    net_stats_t stats;
};

struct net_msg {
    wire_msg_t *wire;
    zmq_msg_t payload;
    int has_payload;
    net_peer_t peer;
};

static const char *const drop_names[NET_DROP_COUNT] = {
    [NET_DROP_FRAMES] = "frames",
    [NET_DROP_VERSION] = "version",
    [NET_DROP_DECODE] = "decode",
    [NET_DROP_BUDGET] = "budget",
    [NET_DROP_BODY] = "body",
    [NET_DROP_INVALID] = "invalid",
    [NET_DROP_UNAUTHENTICATED] = "unauthenticated",
};
_Static_assert(Q_ARRAY_LEN(drop_names) == NET_DROP_COUNT, "one name per drop reason");

const char *net_drop_name(net_drop_t reason) {
    return (reason >= 0 && reason < NET_DROP_COUNT) ? drop_names[reason] : "unknown";
}

/* ---- options ---- */

/* libzmq before 4.3.5 can abort the whole process ("Assertion failed: !_io_error
 * (stream_engine_base.cpp:331)", libzmq issues #4364 and #3937) when its heartbeat timeout
 * fires on a connection that is already failing, e.g. a worker whose learner restarts. We saw
 * it kill a worker in our learner-restart test. On those versions libzmq's own heartbeats stay
 * off and the application heartbeats (Paranoid Pirate, dispatcher and dispatch client) detect
 * dead peers alone. */
static int zmq_heartbeats_safe(void) {
    int major, minor, patch;
    zmq_version(&major, &minor, &patch);
    return major * 10000 + minor * 100 + patch >= 40305;
}

void net_options_init(net_options_t *o) {
    *o = (net_options_t){
        .control_max_msg_bytes = (int64_t)4 << 20,
        .chunk_bytes = (int64_t)1 << 20,
        .heartbeat_ivl_ms = zmq_heartbeats_safe() ? 1000 : 0,
        .heartbeat_timeout_ms = 5000,
        .heartbeat_ttl_ms = 5000,
        .linger_ms = 500,
        .sndhwm = 1000,
        .rcvhwm = 1000,
        .reconnect_ivl_ms = 100,
        .reconnect_ivl_max_ms = 5000,
        .send_timeout_ms = 1000,
        .decode_budget_bytes = WIRE_DECODE_BUDGET_DEFAULT,
    };
}

static int range_check(const char *name, int64_t v, int64_t lo, int64_t hi, qerr_t *err) {
    if (v < lo || v > hi)
        return qerr_set(err, QERR_RANGE, "network option %s = %lld is outside [%lld, %lld]", name,
                        (long long)v, (long long)lo, (long long)hi);
    return 0;
}

int net_options_validate(const net_options_t *o, qerr_t *err) {
    if (range_check("control_max_msg_bytes", o->control_max_msg_bytes, 64 << 10, (int64_t)1 << 30,
                    err) ||
        range_check("chunk_bytes", o->chunk_bytes, 4 << 10, (int64_t)256 << 20, err) ||
        range_check("heartbeat_ivl_ms", o->heartbeat_ivl_ms, 0, 60000, err) ||
        range_check("heartbeat_timeout_ms", o->heartbeat_timeout_ms, o->heartbeat_ivl_ms, 600000,
                    err) ||
        range_check("heartbeat_ttl_ms", o->heartbeat_ttl_ms, 0, 6553500, err) ||
        range_check("linger_ms", o->linger_ms, 0, 60000, err) ||
        range_check("sndhwm", o->sndhwm, 1, 1000000, err) ||
        range_check("rcvhwm", o->rcvhwm, 1, 1000000, err) ||
        range_check("reconnect_ivl_ms", o->reconnect_ivl_ms, 10, 60000, err) ||
        range_check("reconnect_ivl_max_ms", o->reconnect_ivl_max_ms, o->reconnect_ivl_ms, 600000,
                    err) ||
        range_check("send_timeout_ms", o->send_timeout_ms, 0, 600000, err))
        return -1;
    if (o->decode_budget_bytes < ((size_t)1 << 20))
        return qerr_set(err, QERR_RANGE, "network option decode_budget_bytes = %zu is below 1 MiB",
                        o->decode_budget_bytes);
    return 0;
}

int64_t net_options_max_frame(const net_options_t *o, wire_protocol_t protocol) {
    return protocol == WIRE_PROTOCOL_WEIGHTS ? o->chunk_bytes + NET_WEIGHTS_FRAME_SLACK
                                             : o->control_max_msg_bytes;
}

size_t net_options_decode_budget(const net_options_t *o, wire_protocol_t protocol) {
    if (protocol == WIRE_PROTOCOL_WEIGHTS)
        return o->decode_budget_bytes;
    const size_t scaled = wire_decode_budget((size_t)o->control_max_msg_bytes);
    return scaled > o->decode_budget_bytes ? scaled : o->decode_budget_bytes;
}

uint64_t net_incarnation_new(void) {
    Q_ASSERT(sodium_init() >= 0);
    uint64_t id = 0;
    while (id == 0)
        randombytes_buf(&id, sizeof id);
    return id;
}

/* ---- socket creation ---- */

static int set_int(net_socket_t *s, int opt, int v, const char *name, qerr_t *err) {
    if (zmq_setsockopt(s->zsock, opt, &v, sizeof v) != 0)
        return qerr_set(err, QERR_IO, "%s: setting %s = %d: %s", s->name, name, v,
                        zmq_strerror(zmq_errno()));
    return 0;
}

static int z85_key_ok(const char *k) {
    uint8_t bin[32];
    return strlen(k) == NET_KEY_Z85_LEN && zmq_z85_decode(bin, k) != NULL;
}

/* Checks the security settings; they are applied by security_role once the socket binds or
 * connects. */
static int security_check(net_socket_t *s, const net_security_t *sec, qerr_t *err) {
    switch (sec->mode) {
    case NET_SECURITY_NONE: break;
    case NET_SECURITY_CURVE:
        if (!zmq_has("curve"))
            return qerr_set(err, QERR_INVALID, "%s: this libzmq has no CURVE support", s->name);
        const char *const keys[] = {sec->server_public, sec->server_secret, sec->client_public,
                                    sec->client_secret};
        for (size_t i = 0; i < Q_ARRAY_LEN(keys); i++)
            if (keys[i][0] && !z85_key_ok(keys[i]))
                return qerr_set(err, QERR_INVALID, "%s: a CURVE key is not 40 characters of Z85",
                                s->name);
        break;
    default:
        return qerr_set(err, QERR_INVALID, "%s: unknown security mode %d", s->name, (int)sec->mode);
    }
    s->sec = *sec;
    return 0;
}

static int set_str(net_socket_t *s, int opt, const char *v, const char *name, qerr_t *err) {
    if (zmq_setsockopt(s->zsock, opt, v, strlen(v)) != 0)
        return qerr_set(err, QERR_IO, "%s: setting %s: %s", s->name, name,
                        zmq_strerror(zmq_errno()));
    return 0;
}

static int is_loopback_host(const char *host) {
    static const char *const loopback[] = {"127.", "localhost:", "[::1]:", "lo:"};
    for (size_t i = 0; i < Q_ARRAY_LEN(loopback); i++)
        if (strncmp(host, loopback[i], strlen(loopback[i])) == 0)
            return 1;
    return 0;
}

/* The one place where transport security is switched on, before the first bind (server) or
 * connect (client); see net.h. */
static int security_role(net_socket_t *s, const char *endpoint, int bind, qerr_t *err) {
    if (strncmp(endpoint, "inproc://", 9) == 0)
        return 0; /* no handshake on inproc */
    if (s->sec.mode == NET_SECURITY_NONE) {
        if (!bind || strncmp(endpoint, "tcp://", 6) != 0 || is_loopback_host(endpoint + 6))
            return 0;
        if (!s->sec.bind_any)
            return qerr_set(err, QERR_INVALID,
                            "%s: %s is not a loopback address; without security.curve set "
                            "security.bind_any: true to serve other hosts over plain TCP",
                            s->name, endpoint);
        log_emit(LOG_WARN, "net.insecure", NULL, 0,
                 "%s: serving %s over plain TCP without authentication (security.bind_any)",
                 s->name, endpoint);
        return 0;
    }
    int role = bind ? NET_ROLE_SERVER : NET_ROLE_CLIENT;
    if (s->role == role)
        return 0;
    if (s->role != 0)
        return qerr_set(err, QERR_INVALID, "%s: a CURVE socket cannot both bind and connect",
                        s->name);
    if (bind) {
        if (!s->sec.server_secret[0] || !s->sec.allow_list[0])
            return qerr_set(err, QERR_INVALID,
                            "%s: a CURVE server needs its secret key (security.keys.server) and "
                            "an allow-list (security.allow_list)",
                            s->name);
        /* The handler runs before the bind: without it libzmq 4.3 admits any client that knows
         * the server key. */
        if (net_zap_acquire(s->zctx, s->sec.allow_list, err) != 0)
            return qerr_wrap(err, "%s", s->name);
        s->zap_held = 1;
        if (set_int(s, ZMQ_CURVE_SERVER, 1, "ZMQ_CURVE_SERVER", err) ||
            set_str(s, ZMQ_CURVE_SECRETKEY, s->sec.server_secret, "ZMQ_CURVE_SECRETKEY", err) ||
            set_str(s, ZMQ_ZAP_DOMAIN, "quillan", "ZMQ_ZAP_DOMAIN", err))
            return -1;
        s->require_user_id = 1;
    } else {
        if (!s->sec.client_secret[0] || !s->sec.client_public[0] || !s->sec.server_public[0])
            return qerr_set(err, QERR_INVALID,
                            "%s: a CURVE client needs its key pair (security.keys.client) and the "
                            "server's public key (security.keys.server)",
                            s->name);
        if (set_str(s, ZMQ_CURVE_SERVERKEY, s->sec.server_public, "ZMQ_CURVE_SERVERKEY", err) ||
            set_str(s, ZMQ_CURVE_PUBLICKEY, s->sec.client_public, "ZMQ_CURVE_PUBLICKEY", err) ||
            set_str(s, ZMQ_CURVE_SECRETKEY, s->sec.client_secret, "ZMQ_CURVE_SECRETKEY", err))
            return -1;
    }
    s->role = role;
    return 0;
}

static int options_apply(net_socket_t *s, const net_options_t *o, qerr_t *err) {
    int64_t max = s->max_frame;
    if (zmq_setsockopt(s->zsock, ZMQ_MAXMSGSIZE, &max, sizeof max) != 0)
        return qerr_set(err, QERR_IO, "%s: setting ZMQ_MAXMSGSIZE: %s", s->name,
                        zmq_strerror(zmq_errno()));
    int never_block = s->type == ZMQ_ROUTER || s->type == ZMQ_PUB || s->type == ZMQ_XPUB;
    const int heartbeat_ivl_ms = zmq_heartbeats_safe() ? o->heartbeat_ivl_ms : 0;
    if (set_int(s, ZMQ_HEARTBEAT_IVL, heartbeat_ivl_ms, "ZMQ_HEARTBEAT_IVL", err) ||
        set_int(s, ZMQ_HEARTBEAT_TIMEOUT, o->heartbeat_timeout_ms, "ZMQ_HEARTBEAT_TIMEOUT", err) ||
        set_int(s, ZMQ_HEARTBEAT_TTL, o->heartbeat_ttl_ms, "ZMQ_HEARTBEAT_TTL", err) ||
        set_int(s, ZMQ_LINGER, o->linger_ms, "ZMQ_LINGER", err) ||
        set_int(s, ZMQ_SNDHWM, o->sndhwm, "ZMQ_SNDHWM", err) ||
        set_int(s, ZMQ_RCVHWM, o->rcvhwm, "ZMQ_RCVHWM", err) ||
        set_int(s, ZMQ_RECONNECT_IVL, o->reconnect_ivl_ms, "ZMQ_RECONNECT_IVL", err) ||
        set_int(s, ZMQ_RECONNECT_IVL_MAX, o->reconnect_ivl_max_ms, "ZMQ_RECONNECT_IVL_MAX", err) ||
        set_int(s, ZMQ_SNDTIMEO, never_block ? 0 : o->send_timeout_ms, "ZMQ_SNDTIMEO", err))
        return -1;
    if (s->type == ZMQ_ROUTER) {
        /* MANDATORY: a send to a gone peer fails (EHOSTUNREACH) instead of vanishing.
         * HANDOVER: a client that reconnects under the same routing id (after libzmq cut its
         * connection, e.g. over an oversize frame) takes its id over; without it libzmq
         * silently discards the new connection's messages. */
        if (set_int(s, ZMQ_ROUTER_MANDATORY, 1, "ZMQ_ROUTER_MANDATORY", err) ||
            set_int(s, ZMQ_ROUTER_HANDOVER, 1, "ZMQ_ROUTER_HANDOVER", err))
            return -1;
    }
    if (s->type == ZMQ_XPUB && set_int(s, ZMQ_XPUB_NODROP, 1, "ZMQ_XPUB_NODROP", err))
        return -1; /* a full queue then refuses the send (EAGAIN), so drops can be counted */
    return 0;
}

static int monitor_start(net_socket_t *s, void *zctx, qerr_t *err) {
    static atomic_uint_fast64_t serial;
    char addr[96];
    snprintf(addr, sizeof addr, "inproc://quillan-net-monitor-%llu",
             (unsigned long long)atomic_fetch_add(&serial, 1));
    if (zmq_socket_monitor(s->zsock, addr, ZMQ_EVENT_DISCONNECTED) != 0)
        return qerr_set(err, QERR_IO, "%s: zmq_socket_monitor: %s", s->name,
                        zmq_strerror(zmq_errno()));
    s->monitor = zmq_socket(zctx, ZMQ_PAIR);
    int zero = 0;
    if (s->monitor == NULL || zmq_setsockopt(s->monitor, ZMQ_LINGER, &zero, sizeof zero) != 0 ||
        zmq_connect(s->monitor, addr) != 0)
        return qerr_set(err, QERR_IO, "%s: connecting the socket monitor: %s", s->name,
                        zmq_strerror(zmq_errno()));
    return 0;
}

net_socket_t *net_socket_new(void *zctx, const net_socket_spec_t *spec, const net_options_t *opt,
                             const net_security_t *sec, qerr_t *err) {
    Q_ASSERT(zctx && spec && opt && sec && spec->name && spec->sender_id);
    Q_ASSERT(spec->protocol >= 0 && spec->protocol < WIRE_PROTOCOL_COUNT);
    if (net_options_validate(opt, err) != 0)
        return NULL;
    net_socket_t *s = calloc(1, sizeof *s);
    if (s == NULL) {
        qerr_set(err, QERR_NOMEM, "%s: out of memory", spec->name);
        return NULL;
    }
    s->type = spec->type;
    s->protocol = spec->protocol;
    s->max_frame = net_options_max_frame(opt, spec->protocol);
    s->decode_budget = net_options_decode_budget(opt, spec->protocol);
    s->validate = spec->validate;
    s->validate_ctx = spec->validate_ctx;
    s->incarnation_id = spec->incarnation_id;
    s->zctx = zctx;
    snprintf(s->name, sizeof s->name, "%s", spec->name);
    snprintf(s->sender_id, sizeof s->sender_id, "%s", spec->sender_id);
    s->zsock = zmq_socket(zctx, spec->type);
    if (s->zsock == NULL) {
        qerr_set(err, QERR_IO, "%s: zmq_socket(type %d): %s", s->name, spec->type,
                 zmq_strerror(zmq_errno()));
        net_socket_destroy(&s);
        return NULL;
    }
    if (options_apply(s, opt, err) != 0 || security_check(s, sec, err) != 0 ||
        monitor_start(s, zctx, err) != 0) {
        net_socket_destroy(&s);
        return NULL;
    }
    return s;
}

void net_socket_destroy(net_socket_t **sp) {
    if (sp == NULL || *sp == NULL)
        return;
    net_socket_t *s = *sp;
    if (s->zsock) {
        if (s->monitor)
            zmq_socket_monitor(s->zsock, NULL, 0);
        zmq_close(s->zsock);
    }
    if (s->monitor)
        zmq_close(s->monitor);
    if (s->zap_held)
        net_zap_release(s->zctx);
    sodium_memzero(&s->sec, sizeof s->sec);
    free(s);
    *sp = NULL;
}

static int endpoint_op(net_socket_t *s, const char *endpoint, int bind, qerr_t *err) {
    if (security_role(s, endpoint, bind, err) != 0)
        return -1;
    int rc = bind ? zmq_bind(s->zsock, endpoint) : zmq_connect(s->zsock, endpoint);
    if (rc != 0)
        return qerr_set(err, QERR_IO, "%s: %s %s: %s", s->name, bind ? "bind" : "connect", endpoint,
                        zmq_strerror(zmq_errno()));
    size_t n = sizeof s->endpoint;
    if (zmq_getsockopt(s->zsock, ZMQ_LAST_ENDPOINT, s->endpoint, &n) != 0)
        snprintf(s->endpoint, sizeof s->endpoint, "%s", endpoint);
    return 0;
}

int net_socket_bind(net_socket_t *s, const char *endpoint, qerr_t *err) {
    return endpoint_op(s, endpoint, 1, err);
}

int net_socket_connect(net_socket_t *s, const char *endpoint, qerr_t *err) {
    return endpoint_op(s, endpoint, 0, err);
}

const char *net_socket_endpoint(const net_socket_t *s) {
    return s->endpoint;
}

size_t net_socket_decode_budget(const net_socket_t *s) {
    return s->decode_budget;
}

void *net_socket_handle(net_socket_t *s) {
    return s->zsock;
}

/* Takes in the monitor's pending events: [uint16 event, uint32 value][endpoint]. */
static void monitor_drain(net_socket_t *s) {
    for (;;) {
        zmq_msg_t ev;
        zmq_msg_init(&ev);
        if (zmq_msg_recv(&ev, s->monitor, ZMQ_DONTWAIT) < 0) {
            zmq_msg_close(&ev);
            return;
        }
        uint16_t event = 0;
        if (zmq_msg_size(&ev) >= sizeof event)
            memcpy(&event, zmq_msg_data(&ev), sizeof event);
        int more = zmq_msg_more(&ev);
        zmq_msg_close(&ev);
        char where[256] = "";
        if (more) {
            zmq_msg_t addr;
            zmq_msg_init(&addr);
            int n = zmq_msg_recv(&addr, s->monitor, 0);
            if (n > 0)
                snprintf(where, sizeof where, "%.*s", n, (const char *)zmq_msg_data(&addr));
            zmq_msg_close(&addr);
        }
        if (event == ZMQ_EVENT_DISCONNECTED) {
            s->stats.disconnects++;
            log_field_t f = {"disconnects", (double)s->stats.disconnects};
            log_emit(LOG_WARN, "net.disconnect", &f, 1,
                     "%s: connection %s closed (peer left or died, or libzmq cut it over a frame "
                     "above ZMQ_MAXMSGSIZE %lld or a protocol error)",
                     s->name, where, (long long)s->max_frame);
        }
    }
}

void net_socket_stats(net_socket_t *s, net_stats_t *out) {
    monitor_drain(s);
    *out = s->stats;
}

/* ---- receive ---- */

static void drop(net_socket_t *s, net_drop_t reason, const char *why) {
    uint64_t n = ++s->stats.dropped[reason];
    if (n <= DROP_LOG_ALWAYS || (n & (n - 1)) == 0) {
        log_field_t f = {"count", (double)n};
        log_emit(LOG_WARN, "net.drop", &f, 1, "%s: dropped a message (%s): %s", s->name,
                 net_drop_name(reason), why);
    }
}

static net_drop_t drop_reason_of(qerr_code_t code) {
    switch (code) {
    case QERR_VERSION: return NET_DROP_VERSION;
    case QERR_NOMEM: return NET_DROP_BUDGET;
    case QERR_INVALID: return NET_DROP_BODY;
    default: return NET_DROP_DECODE;
    }
}

static int64_t now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* Reads every frame of one message (the first is ready). Keeps up to FRAMES_KEPT; returns
 * the total count, or -1 on a socket error. */
static int frames_read(net_socket_t *s, zmq_msg_t *frames, int *kept) {
    int total = 0;
    *kept = 0;
    int more = 1;
    while (more) {
        zmq_msg_t f;
        zmq_msg_init(&f);
        if (zmq_msg_recv(&f, s->zsock, total == 0 ? ZMQ_DONTWAIT : 0) < 0) {
            zmq_msg_close(&f);
            return -1;
        }
        more = zmq_msg_more(&f);
        if (*kept < FRAMES_KEPT)
            frames[(*kept)++] = f; /* zmq_msg_t moves by value until it is closed */
        else
            zmq_msg_close(&f);
        total++;
    }
    return total;
}

/* Turns one received message into *out, or drops it (returns 0 then). */
static int message_take(net_socket_t *s, zmq_msg_t *frames, int kept, int total, net_msg_t **out) {
    int first = 0;
    net_peer_t peer = {0};
    char why[QERR_MSG_MAX + 64];
    if (s->type == ZMQ_ROUTER) {
        size_t idn = zmq_msg_size(&frames[0]);
        if (idn == 0 || idn > sizeof peer.id) {
            drop(s, NET_DROP_FRAMES, "routing id frame of an impossible size");
            return 0;
        }
        memcpy(peer.id, zmq_msg_data(&frames[0]), idn);
        peer.id_len = (uint8_t)idn;
        first = 1;
        /* REQ clients put an empty delimiter before their Envelope; an empty frame is never a
         * valid Envelope (protocol_version would be 0), so this is unambiguous. */
        if (total >= 3 && zmq_msg_size(&frames[1]) == 0) {
            peer.req = 1;
            first = 2;
        }
    }
    int content = total - first;
    if (content < 1 || content > 2) {
        snprintf(why, sizeof why, "%d frames where [Envelope] or [Envelope][payload] belongs",
                 content);
        drop(s, NET_DROP_FRAMES, why);
        return 0;
    }
    Q_ASSERT(first + content <= kept);
    zmq_msg_t *env_frame = &frames[first];
    if (s->require_user_id) {
        const char *uid = zmq_msg_gets(env_frame, "User-Id");
        if (uid == NULL || uid[0] == '\0') {
            drop(s, NET_DROP_UNAUTHENTICATED, "no User-Id: the peer was not authenticated");
            return 0;
        }
    }
    size_t payload_len = content == 2 ? zmq_msg_size(&frames[first + 1]) : 0;
    qerr_t e;
    qerr_clear(&e);
    wire_msg_t *wm = wire_codec_unpack(s->protocol, zmq_msg_data(env_frame),
                                       zmq_msg_size(env_frame), s->decode_budget, &e);
    if (wm == NULL) {
        drop(s, drop_reason_of(e.code), e.msg);
        return 0;
    }
    if (s->validate && s->validate(s->validate_ctx, wire_msg_envelope(wm), payload_len, &e) != 0) {
        drop(s, NET_DROP_INVALID, e.msg);
        wire_msg_destroy(&wm);
        return 0;
    }
    net_msg_t *m = calloc(1, sizeof *m);
    if (m == NULL) {
        wire_msg_destroy(&wm);
        drop(s, NET_DROP_BUDGET, "out of memory for the message");
        return 0;
    }
    m->wire = wm;
    m->peer = peer;
    zmq_msg_init(&m->payload);
    if (content == 2) {
        zmq_msg_move(&m->payload, &frames[first + 1]);
        m->has_payload = 1;
    }
    s->stats.received++;
    *out = m;
    return 1;
}

int net_recv(net_socket_t *s, int timeout_ms, net_msg_t **out, qerr_t *err) {
    Q_ASSERT(s && out);
    *out = NULL;
    int64_t deadline = timeout_ms > 0 ? now_ms() + timeout_ms : 0;
    for (;;) {
        monitor_drain(s);
        long wait = timeout_ms < 0 ? -1 : 0;
        if (timeout_ms > 0) {
            int64_t left = deadline - now_ms();
            wait = left > 0 ? (long)left : 0;
        }
        zmq_pollitem_t item = {.socket = s->zsock, .events = ZMQ_POLLIN};
        int rc = zmq_poll(&item, 1, wait);
        if (rc < 0) {
            if (zmq_errno() == EINTR) /* a signal: let the caller look at its flags */
                return 0;
            return qerr_set(err, QERR_IO, "%s: zmq_poll: %s", s->name, zmq_strerror(zmq_errno()));
        }
        if (rc == 0)
            return 0;
        zmq_msg_t frames[FRAMES_KEPT];
        int kept;
        int total = frames_read(s, frames, &kept);
        int got = 0;
        if (total < 0) {
            int e = zmq_errno();
            if (e != EAGAIN && e != EINTR)
                return qerr_set(err, QERR_IO, "%s: receive: %s", s->name, zmq_strerror(e));
        } else {
            got = message_take(s, frames, kept, total, out);
        }
        for (int i = 0; i < kept; i++)
            zmq_msg_close(&frames[i]);
        if (got)
            return 1;
        if (timeout_ms == 0) {
            zmq_pollitem_t again = {.socket = s->zsock, .events = ZMQ_POLLIN};
            if (zmq_poll(&again, 1, 0) <= 0)
                return 0;
        }
    }
}

const Quillan__Envelope *net_msg_envelope(const net_msg_t *m) {
    return wire_msg_envelope(m->wire);
}

const void *net_msg_payload(const net_msg_t *m, size_t *len) {
    if (!m->has_payload) {
        *len = 0;
        return NULL;
    }
    *len = zmq_msg_size((zmq_msg_t *)&m->payload);
    return zmq_msg_data((zmq_msg_t *)&m->payload);
}

const net_peer_t *net_msg_peer(const net_msg_t *m) {
    return &m->peer;
}

void net_msg_destroy(net_msg_t **mp) {
    if (mp == NULL || *mp == NULL)
        return;
    wire_msg_destroy(&(*mp)->wire);
    zmq_msg_close(&(*mp)->payload);
    free(*mp);
    *mp = NULL;
}

/* ---- send ---- */

static void buf_release(void *data, void *hint) {
    (void)hint;
    free(data);
}

static int send_failed(net_socket_t *s, qerr_t *err, int e, const char *what) {
    s->stats.send_failed++;
    if (e == EAGAIN)
        return qerr_set(err, QERR_TIMEOUT, "%s: %s: send queue full (high-water mark)", s->name,
                        what);
    if (e == EHOSTUNREACH)
        return qerr_set(err, QERR_NOTFOUND, "%s: %s: peer is gone", s->name, what);
    return qerr_set(err, QERR_IO, "%s: %s: %s", s->name, what, zmq_strerror(e));
}

static int frame_send(net_socket_t *s, zmq_msg_t *f, int more, qerr_t *err, const char *what) {
    if (zmq_msg_send(f, s->zsock, more ? ZMQ_SNDMORE : 0) < 0) {
        int e = zmq_errno();
        zmq_msg_close(f);
        return send_failed(s, err, e, what);
    }
    return 0;
}

/* Sends [id][delimiter?][env][payload?]; payload (may be NULL) is consumed in every case. */
static int envelope_send(net_socket_t *s, const net_peer_t *peer, Quillan__Envelope *env,
                         zmq_msg_t *payload, uint64_t *message_id, qerr_t *err) {
    wire_header_t hdr = {s->sender_id, s->incarnation_id, s->next_message_id + 1};
    wire_buf_t buf = {0};
    int rc = -1;
    if (s->type == ZMQ_ROUTER && (peer == NULL || peer->id_len == 0)) {
        qerr_set(err, QERR_INVALID, "%s: a ROUTER send needs a peer", s->name);
        s->stats.send_failed++;
    } else if (wire_codec_pack(s->protocol, &hdr, env, &buf, err) != 0) {
        s->stats.send_failed++;
    } else if ((int64_t)buf.len > s->max_frame ||
               (payload && (int64_t)zmq_msg_size(payload) > s->max_frame)) {
        qerr_set(err, QERR_RANGE, "%s: a %zu-byte frame exceeds ZMQ_MAXMSGSIZE %lld", s->name,
                 (int64_t)buf.len > s->max_frame ? buf.len : zmq_msg_size(payload),
                 (long long)s->max_frame);
        s->stats.send_failed++;
    } else {
        rc = 0;
    }
    if (rc != 0) {
        wire_buf_free(&buf);
        if (payload)
            zmq_msg_close(payload);
        return -1;
    }
    zmq_msg_t f;
    if (s->type == ZMQ_ROUTER) {
        zmq_msg_init_size(&f, peer->id_len);
        memcpy(zmq_msg_data(&f), peer->id, peer->id_len);
        /* With ROUTER_MANDATORY the routing frame is where "peer gone" and "queue full" show;
         * once it is accepted, libzmq takes the rest of the message whole. */
        if (frame_send(s, &f, 1, err, "routing frame") != 0)
            goto fail;
        if (peer->req) {
            zmq_msg_init(&f);
            if (frame_send(s, &f, 1, err, "delimiter frame") != 0)
                goto fail;
        }
    }
    zmq_msg_init_data(&f, buf.data, buf.len, buf_release, NULL);
    buf.data = NULL; /* now owned by libzmq */
    if (frame_send(s, &f, payload != NULL, err, "envelope frame") != 0)
        goto fail;
    if (payload && frame_send(s, payload, 0, err, "payload frame") != 0)
        return -1;
    s->next_message_id++;
    s->stats.sent++;
    if (message_id)
        *message_id = hdr.message_id;
    return 0;
fail:
    wire_buf_free(&buf);
    if (payload)
        zmq_msg_close(payload);
    return -1;
}

int net_send(net_socket_t *s, const net_peer_t *peer, Quillan__Envelope *env, const void *payload,
             size_t payload_len, uint64_t *message_id, qerr_t *err) {
    Q_ASSERT(s && env && (payload != NULL || payload_len == 0));
    if (payload == NULL)
        return envelope_send(s, peer, env, NULL, message_id, err);
    zmq_msg_t p;
    if (zmq_msg_init_size(&p, payload_len) != 0) {
        s->stats.send_failed++;
        return qerr_set(err, QERR_NOMEM, "%s: cannot allocate a %zu-byte payload frame", s->name,
                        payload_len);
    }
    if (payload_len)
        memcpy(zmq_msg_data(&p), payload, payload_len);
    return envelope_send(s, peer, env, &p, message_id, err);
}

int net_send_zc(net_socket_t *s, const net_peer_t *peer, Quillan__Envelope *env, void *payload,
                size_t payload_len, net_free_fn free_fn, void *hint, uint64_t *message_id,
                qerr_t *err) {
    Q_ASSERT(s && env && payload && free_fn);
    zmq_msg_t p;
    if (zmq_msg_init_data(&p, payload, payload_len, free_fn, hint) != 0) {
        free_fn(payload, hint);
        s->stats.send_failed++;
        return qerr_set(err, QERR_NOMEM, "%s: cannot wrap a %zu-byte payload frame", s->name,
                        payload_len);
    }
    return envelope_send(s, peer, env, &p, message_id, err);
}

int net_reply(net_socket_t *s, const net_msg_t *request, Quillan__Envelope *env,
              const void *payload, size_t payload_len, qerr_t *err) {
    return net_send(s, &request->peer, env, payload, payload_len, NULL, err);
}
