/* End-to-end test of common/net.h between two real processes on loopback.
 *
 * `e2e_net router` binds a dispatch ROUTER on tcp://127.0.0.1:* and fork/execs itself as
 * `e2e_net peer <endpoint>`, a DEALER. Both apply the socket options through net_socket_new.
 * The peer walks through STEPS: before each good Heartbeat (lease_ids[0] = step number) it
 * sends one bad message through its libzmq socket on the same connection; it resends the good
 * message until the router acks it (Lazy Pirate). The router acks every good Heartbeat and
 * records its drop counters when each step's good message first arrives, then asserts that
 * every bad message was dropped and counted under its reason, and that the good message behind
 * it still arrived. The oversize frame (ZMQ_MAXMSGSIZE + 1) makes libzmq cut the connection:
 * it must show up as exactly one disconnect, and the peer's reconnection carries the next good
 * message. Exit status 0 means pass. */
#include "dispatch_codec.h"
#include "e2e.h"
#include "log.h"
#include "net.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>
#include <zmq.h>

/* Small frame limit so the oversize frame stays small; the minimum net_options_validate takes. */
#define E2E_MAX_FRAME (64 << 10)
#define E2E_ACK_WAIT_MS 250
#define E2E_ATTEMPTS 80      /* resends of one good message before the peer gives up */
#define E2E_ROUTER_POLLS 600 /* 100 ms polls: a hung peer fails the test instead of hanging it */
#define E2E_DONE_LEASE 1000  /* lease id of the final Ack */

typedef enum {
    BAD_NONE,
    BAD_FRAMES,
    BAD_VERSION,
    BAD_DECODE,
    BAD_BODY,
    BAD_INVALID,
    BAD_OVERSIZE
} bad_t;

/* Step s (1-based) sends steps[s - 1] before its good message. */
static const bad_t steps[] = {BAD_NONE, BAD_FRAMES,  BAD_VERSION,  BAD_DECODE,
                              BAD_BODY, BAD_INVALID, BAD_OVERSIZE, BAD_NONE};
#define N_STEPS ((int)Q_ARRAY_LEN(steps))

static const dispatch_codec_limits_t limits = {
    .vocab_size = 256, .max_group_size = 16, .max_prompt_tokens = 64, .max_new_tokens = 64};

static void options_init(net_options_t *o) {
    net_options_init(o);
    o->control_max_msg_bytes = E2E_MAX_FRAME;
    o->reconnect_ivl_ms = 50;
    o->linger_ms = 0;
}

static net_socket_t *socket_open(void *zctx, int type, const char *name, qerr_t *err) {
    net_options_t o;
    options_init(&o);
    net_security_t sec = {NET_SECURITY_NONE};
    net_socket_spec_t spec = {.type = type,
                              .protocol = WIRE_PROTOCOL_DISPATCH,
                              .name = name,
                              .sender_id = name,
                              .incarnation_id = net_incarnation_new(),
                              .validate = dispatch_codec_net_validate,
                              .validate_ctx = (void *)&limits};
    return net_socket_new(zctx, &spec, &o, &sec, err);
}

/* The options of §3 really are on the socket. */
static void options_check(net_socket_t *s) {
    net_options_t o;
    options_init(&o);
    int64_t max = 0;
    size_t n = sizeof max;
    zmq_getsockopt(net_socket_handle(s), ZMQ_MAXMSGSIZE, &max, &n);
    E2E_CHECK(max == E2E_MAX_FRAME, "ZMQ_MAXMSGSIZE %lld", (long long)max);
    int v = 0;
    n = sizeof v;
    zmq_getsockopt(net_socket_handle(s), ZMQ_HEARTBEAT_IVL, &v, &n);
    E2E_CHECK(v == o.heartbeat_ivl_ms, "ZMQ_HEARTBEAT_IVL %d", v);
    n = sizeof v;
    zmq_getsockopt(net_socket_handle(s), ZMQ_HEARTBEAT_TIMEOUT, &v, &n);
    E2E_CHECK(v == o.heartbeat_timeout_ms, "ZMQ_HEARTBEAT_TIMEOUT %d", v);
    n = sizeof v;
    zmq_getsockopt(net_socket_handle(s), ZMQ_LINGER, &v, &n);
    E2E_CHECK(v == 0, "ZMQ_LINGER %d", v);
    n = sizeof v;
    zmq_getsockopt(net_socket_handle(s), ZMQ_RCVHWM, &v, &n);
    E2E_CHECK(v == o.rcvhwm, "ZMQ_RCVHWM %d", v);
}

/* ---- peer ---- */

/* Packs a Heartbeat for step, bypassing the codec when version != 1 (a foreign peer). */
static wire_buf_t heartbeat_bytes(uint64_t step, uint32_t version, int with_zero_lease) {
    uint64_t ids[2] = {step, with_zero_lease ? 0 : step};
    Quillan__Heartbeat hb = QUILLAN__HEARTBEAT__INIT;
    hb.n_lease_ids = 2;
    hb.lease_ids = ids;
    Quillan__Envelope env = QUILLAN__ENVELOPE__INIT;
    env.protocol_version = version;
    env.sender_id = "raw-peer";
    env.body_case = QUILLAN__ENVELOPE__BODY_HEARTBEAT;
    env.heartbeat = &hb;
    wire_buf_t b;
    b.len = protobuf_c_message_get_packed_size(&env.base);
    b.data = malloc(b.len);
    protobuf_c_message_pack(&env.base, b.data);
    return b;
}

static int raw_send(void *zsock, const void *data, size_t len, int more) {
    return zmq_send(zsock, data, len, more ? ZMQ_SNDMORE : 0) < 0 ? -1 : 0;
}

static int bad_send(void *zsock, bad_t bad, uint64_t step) {
    int rc = 0;
    wire_buf_t b = {0};
    switch (bad) {
    case BAD_NONE: break;
    case BAD_FRAMES: /* [Envelope][payload][extra] */
        b = heartbeat_bytes(step, QUILLAN_DISPATCH_PROTOCOL_VERSION, 0);
        rc = raw_send(zsock, b.data, b.len, 1) || raw_send(zsock, "x", 1, 1) ||
             raw_send(zsock, "y", 1, 0);
        break;
    case BAD_VERSION:
        b = heartbeat_bytes(step, QUILLAN_DISPATCH_PROTOCOL_VERSION + 1, 0);
        rc = raw_send(zsock, b.data, b.len, 0);
        break;
    case BAD_DECODE: {
        const uint8_t garbage[] = {0x08, 0x01, 0xB2, 0x01, 0x40, 0x01};
        rc = raw_send(zsock, garbage, sizeof garbage, 0);
        break;
    }
    case BAD_BODY: {
        Quillan__ChunkRequest cr = QUILLAN__CHUNK_REQUEST__INIT;
        cr.version = 1;
        Quillan__Envelope env = QUILLAN__ENVELOPE__INIT;
        env.protocol_version = QUILLAN_DISPATCH_PROTOCOL_VERSION;
        env.body_case = QUILLAN__ENVELOPE__BODY_CHUNK_REQUEST;
        env.chunk_request = &cr;
        b.len = protobuf_c_message_get_packed_size(&env.base);
        b.data = malloc(b.len);
        protobuf_c_message_pack(&env.base, b.data);
        rc = raw_send(zsock, b.data, b.len, 0);
        break;
    }
    case BAD_INVALID: /* a lease id of 0 breaks a dispatch invariant */
        b = heartbeat_bytes(step, QUILLAN_DISPATCH_PROTOCOL_VERSION, 1);
        rc = raw_send(zsock, b.data, b.len, 0);
        break;
    case BAD_OVERSIZE:
        b.len = E2E_MAX_FRAME + 1;
        b.data = calloc(1, b.len);
        rc = raw_send(zsock, b.data, b.len, 0);
        break;
    }
    wire_buf_free(&b);
    return rc;
}

/* Sends env until an Ack for lease arrives; returns 0, or -1 after E2E_ATTEMPTS tries. */
static int send_until_acked(net_socket_t *s, Quillan__Envelope *env, uint64_t lease) {
    for (int attempt = 0; attempt < E2E_ATTEMPTS; attempt++) {
        qerr_t e;
        if (net_send(s, NULL, env, NULL, 0, NULL, &e) != 0) {
            fprintf(stderr, "peer: send: %s\n", e.msg);
            continue;
        }
        for (;;) {
            net_msg_t *m = NULL;
            int rc = net_recv(s, E2E_ACK_WAIT_MS, &m, &e);
            if (rc <= 0)
                break; /* no answer in time: the message was lost, send it again */
            const Quillan__Envelope *r = net_msg_envelope(m);
            int acked = r->body_case == QUILLAN__ENVELOPE__BODY_ACK && r->ack->lease_id == lease;
            net_msg_destroy(&m);
            if (acked)
                return 0;
        }
    }
    return -1;
}

static int peer_main(const char *endpoint) {
    log_init("e2e-net-peer");
    void *zctx = zmq_ctx_new();
    qerr_t e;
    net_socket_t *s = socket_open(zctx, ZMQ_DEALER, "e2e-peer", &e);
    if (s == NULL || net_socket_connect(s, endpoint, &e) != 0) {
        fprintf(stderr, "peer: %s\n", e.msg);
        return 2;
    }
    options_check(s);
    for (int step = 1; step <= N_STEPS && !e2e_failures; step++) {
        E2E_CHECK(bad_send(net_socket_handle(s), steps[step - 1], (uint64_t)step) == 0,
                  "step %d: sending the bad message: %s", step, zmq_strerror(zmq_errno()));
        uint64_t ids[2] = {(uint64_t)step, (uint64_t)step};
        Quillan__Heartbeat hb = QUILLAN__HEARTBEAT__INIT;
        hb.n_lease_ids = 2;
        hb.lease_ids = ids;
        Quillan__Envelope env = QUILLAN__ENVELOPE__INIT;
        env.body_case = QUILLAN__ENVELOPE__BODY_HEARTBEAT;
        env.heartbeat = &hb;
        E2E_CHECK(send_until_acked(s, &env, (uint64_t)step) == 0, "step %d: never acked", step);
    }
    Quillan__WorkRequest done = QUILLAN__WORK_REQUEST__INIT;
    done.worker_id = "e2e-peer";
    Quillan__Envelope env = QUILLAN__ENVELOPE__INIT;
    env.body_case = QUILLAN__ENVELOPE__BODY_WORK_REQUEST;
    env.work_request = &done;
    E2E_CHECK(send_until_acked(s, &env, E2E_DONE_LEASE) == 0, "the final message was never acked");
    net_socket_destroy(&s);
    zmq_ctx_term(zctx);
    return e2e_failures ? 1 : 0;
}

/* ---- router ---- */

static int ack_send(net_socket_t *s, const net_msg_t *m, uint64_t lease) {
    Quillan__Ack ack = QUILLAN__ACK__INIT;
    ack.lease_id = lease;
    ack.status = QUILLAN__ACK_STATUS__ACK_STATUS_ACCEPTED;
    ack.in_reply_to = net_msg_envelope(m)->message_id;
    Quillan__Envelope env = QUILLAN__ENVELOPE__INIT;
    env.body_case = QUILLAN__ENVELOPE__BODY_ACK;
    env.ack = &ack;
    qerr_t e;
    if (net_reply(s, m, &env, NULL, 0, &e) != 0) {
        fprintf(stderr, "router: ack %llu: %s\n", (unsigned long long)lease, e.msg);
        return -1;
    }
    return 0;
}

static const net_drop_t drop_of[] = {
    [BAD_FRAMES] = NET_DROP_FRAMES,   [BAD_VERSION] = NET_DROP_VERSION,
    [BAD_DECODE] = NET_DROP_DECODE,   [BAD_BODY] = NET_DROP_BODY,
    [BAD_INVALID] = NET_DROP_INVALID,
};

static int router_main(const char *self) {
    log_init("e2e-net-router");
    void *zctx = zmq_ctx_new();
    qerr_t e;
    net_socket_t *s = socket_open(zctx, ZMQ_ROUTER, "e2e-router", &e);
    if (s == NULL || net_socket_bind(s, "tcp://127.0.0.1:*", &e) != 0) {
        fprintf(stderr, "router: %s\n", e.msg);
        return 2;
    }
    options_check(s);
    char *peer_argv[] = {(char *)self, "peer", (char *)net_socket_endpoint(s), NULL};
    pid_t pid = e2e_spawn(peer_argv, NULL, NULL);
    E2E_CHECK(pid > 0, "fork: %s", strerror(errno));

    net_stats_t at[N_STEPS + 1]; /* counters when step's good message first arrived */
    int seen[N_STEPS + 1] = {0};
    net_stats_t at_done = {0};
    int done = 0;
    for (int poll = 0; poll < E2E_ROUTER_POLLS && !done && pid > 0; poll++) {
        net_msg_t *m = NULL;
        int rc = net_recv(s, 100, &m, &e);
        E2E_CHECK(rc >= 0, "router: %s", e.msg);
        if (rc <= 0)
            continue;
        const Quillan__Envelope *env = net_msg_envelope(m);
        if (env->body_case == QUILLAN__ENVELOPE__BODY_HEARTBEAT) {
            uint64_t step = env->heartbeat->lease_ids[0];
            E2E_CHECK(step >= 1 && step <= N_STEPS, "step %llu", (unsigned long long)step);
            if (step >= 1 && step <= N_STEPS && !seen[step]) {
                seen[step] = 1;
                net_socket_stats(s, &at[step]);
            }
            ack_send(s, m, step);
        } else if (env->body_case == QUILLAN__ENVELOPE__BODY_WORK_REQUEST) {
            net_socket_stats(s, &at_done);
            done = 1;
            ack_send(s, m, E2E_DONE_LEASE);
        }
        net_msg_destroy(&m);
    }
    int status = -1;
    if (pid > 0)
        waitpid(pid, &status, 0);
    E2E_CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0, "peer exit status 0x%x", status);
    E2E_CHECK(done, "the peer never finished");

    uint64_t expect[NET_DROP_COUNT] = {0};
    uint64_t expect_disconnects = 0;
    for (int step = 1; step <= N_STEPS; step++) {
        bad_t bad = steps[step - 1];
        if (bad == BAD_OVERSIZE)
            expect_disconnects++;
        else if (bad != BAD_NONE)
            expect[drop_of[bad]]++;
        E2E_CHECK(seen[step], "step %d: the good message never arrived", step);
        if (!seen[step])
            continue;
        for (int k = 0; k < NET_DROP_COUNT; k++)
            E2E_CHECK(at[step].dropped[k] == expect[k], "step %d: %s drops %llu, expected %llu",
                      step, net_drop_name((net_drop_t)k), (unsigned long long)at[step].dropped[k],
                      (unsigned long long)expect[k]);
        E2E_CHECK(at[step].disconnects == expect_disconnects,
                  "step %d: %llu disconnects, expected %llu", step,
                  (unsigned long long)at[step].disconnects, (unsigned long long)expect_disconnects);
    }
    E2E_CHECK(at_done.disconnects == 1,
              "%llu disconnects by the end, expected 1 (the oversize frame)",
              (unsigned long long)at_done.disconnects);
    printf("e2e net: %d steps, drops frames=%llu version=%llu decode=%llu body=%llu "
           "invalid=%llu, disconnects=%llu, received=%llu sent=%llu\n",
           N_STEPS, (unsigned long long)at_done.dropped[NET_DROP_FRAMES],
           (unsigned long long)at_done.dropped[NET_DROP_VERSION],
           (unsigned long long)at_done.dropped[NET_DROP_DECODE],
           (unsigned long long)at_done.dropped[NET_DROP_BODY],
           (unsigned long long)at_done.dropped[NET_DROP_INVALID],
           (unsigned long long)at_done.disconnects, (unsigned long long)at_done.received,
           (unsigned long long)at_done.sent);
    net_socket_destroy(&s);
    zmq_ctx_term(zctx);
    return e2e_failures ? 1 : 0;
}

int main(int argc, char **argv) {
    if (argc == 3 && strcmp(argv[1], "peer") == 0)
        return peer_main(argv[2]);
    if (argc == 2 && strcmp(argv[1], "router") == 0)
        return router_main(argv[0]);
    fprintf(stderr, "usage: %s router | peer ENDPOINT\n", argv[0]);
    return 2;
}
