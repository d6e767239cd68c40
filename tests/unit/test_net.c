/* common/net.h and common/log_pub.h over real TCP loopback sockets in one process: options,
 * ROUTER/DEALER/REQ framing, payload frames, drops by reason, send failures, log publishing.
 * The two-process exchange with hostile frames lives in tests/e2e/net_*.c. */
#include "test_proto_fixtures.h"

#include "log_pub.h"
#include "net.h"

#include <criterion/criterion.h>
#include <stdlib.h>
#include <string.h>
#include <zmq.h>

/* Waits for one message, allowing the connection to come up (a bounded count of polls, not
 * a timing assertion). */
#define RECV_MS 5000

static void *zctx;
static net_options_t opt;
static const net_security_t sec = {NET_SECURITY_NONE};

static void setup(void) {
    zctx = zmq_ctx_new();
    cr_assert_not_null(zctx);
    net_options_init(&opt);
    opt.linger_ms = 0;
    log_set_stderr(0);
}

static void teardown(void) {
    zmq_ctx_term(zctx);
    log_set_stderr(1);
}

TestSuite(net, .init = setup, .fini = teardown);

static net_socket_t *sock_new(int type, wire_protocol_t p, const char *name, net_validate_fn fn,
                              const void *ctx) {
    net_socket_spec_t spec = {.type = type,
                              .protocol = p,
                              .name = name,
                              .sender_id = name,
                              .incarnation_id = net_incarnation_new(),
                              .validate = fn,
                              .validate_ctx = (void *)ctx};
    qerr_t e;
    net_socket_t *s = net_socket_new(zctx, &spec, &opt, &sec, &e);
    cr_assert_not_null(s, "%s: %s", name, e.msg);
    return s;
}

/* A bound ROUTER and a DEALER connected to it, both of protocol p. */
static void pair_new(wire_protocol_t p, net_validate_fn fn, const void *ctx, net_socket_t **router,
                     net_socket_t **dealer) {
    qerr_t e;
    *router = sock_new(ZMQ_ROUTER, p, "server", fn, ctx);
    cr_assert_eq(net_socket_bind(*router, "tcp://127.0.0.1:*", &e), 0, "%s", e.msg);
    cr_assert_not_null(strstr(net_socket_endpoint(*router), "tcp://127.0.0.1:"));
    cr_assert_neq(strcmp(net_socket_endpoint(*router), "tcp://127.0.0.1:*"), 0);
    *dealer = sock_new(ZMQ_DEALER, p, "client", fn, ctx);
    cr_assert_eq(net_socket_connect(*dealer, net_socket_endpoint(*router), &e), 0, "%s", e.msg);
}

static net_msg_t *recv_one(net_socket_t *s) {
    net_msg_t *m = NULL;
    qerr_t e;
    int rc = net_recv(s, RECV_MS, &m, &e);
    cr_assert_eq(rc, 1, "expected a message (rc %d: %s)", rc, rc < 0 ? e.msg : "timeout");
    return m;
}

static fixture_t fx;

Test(net, options_are_applied_and_validated) {
    net_options_t bad = opt;
    bad.heartbeat_ivl_ms = 1000;
    bad.heartbeat_timeout_ms = 10; /* below the interval */
    qerr_t e;
    cr_assert_eq(net_options_validate(&bad, &e), -1);
    cr_assert_not_null(strstr(e.msg, "heartbeat_timeout_ms"), "%s", e.msg);
    bad = opt;
    bad.decode_budget_bytes = 1000;
    cr_assert_eq(net_options_validate(&bad, &e), -1);
    net_socket_spec_t spec = {ZMQ_DEALER, WIRE_PROTOCOL_DISPATCH, "x", "x", 1, NULL, NULL};
    cr_assert_null(net_socket_new(zctx, &spec, &bad, &sec, &e));

    opt.sndhwm = 77;
    net_socket_t *w = sock_new(ZMQ_DEALER, WIRE_PROTOCOL_WEIGHTS, "weights", NULL, NULL);
    net_socket_t *c = sock_new(ZMQ_ROUTER, WIRE_PROTOCOL_DISPATCH, "dispatch", NULL, NULL);
    int64_t max;
    size_t n = sizeof max;
    cr_assert_eq(zmq_getsockopt(net_socket_handle(w), ZMQ_MAXMSGSIZE, &max, &n), 0);
    cr_assert_eq(max, opt.chunk_bytes + 64 * 1024);
    n = sizeof max;
    cr_assert_eq(zmq_getsockopt(net_socket_handle(c), ZMQ_MAXMSGSIZE, &max, &n), 0);
    cr_assert_eq(max, 4 << 20);
    int v;
    n = sizeof v;
    cr_assert_eq(zmq_getsockopt(net_socket_handle(w), ZMQ_SNDHWM, &v, &n), 0);
    cr_assert_eq(v, 77);
    n = sizeof v;
    zmq_getsockopt(net_socket_handle(w), ZMQ_HEARTBEAT_IVL, &v, &n);
    cr_assert_eq(v, opt.heartbeat_ivl_ms);
    n = sizeof v;
    zmq_getsockopt(net_socket_handle(w), ZMQ_SNDTIMEO, &v, &n);
    cr_assert_eq(v, opt.send_timeout_ms);
    n = sizeof v;
    zmq_getsockopt(net_socket_handle(c), ZMQ_SNDTIMEO, &v, &n);
    cr_assert_eq(v, 0, "a ROUTER never blocks on one peer");
    net_socket_destroy(&w);
    net_socket_destroy(&c);
    cr_assert_null(c);
    net_socket_destroy(&c);

    net_security_t unknown = {.mode = NET_SECURITY_MODE_COUNT};
    cr_assert_null(net_socket_new(zctx, &spec, &opt, &unknown, &e));
    cr_assert_not_null(strstr(e.msg, "security mode"), "%s", e.msg);
}

Test(net, router_dealer_round_trip_with_payload) {
    fixture_init(&fx);
    net_socket_t *r, *d;
    pair_new(WIRE_PROTOCOL_WEIGHTS, weights_codec_net_validate, &fx_weights_limits, &r, &d);
    qerr_t e;
    Quillan__Envelope env;
    fixture_envelope(&fx, QUILLAN__ENVELOPE__BODY_CHUNK_REQUEST, &env);
    uint64_t id = 0;
    cr_assert_eq(net_send(d, NULL, &env, NULL, 0, &id, &e), 0, "%s", e.msg);
    cr_assert_eq(id, 1);
    net_msg_t *req = recv_one(r);
    const Quillan__Envelope *got = net_msg_envelope(req);
    cr_assert_eq(got->body_case, QUILLAN__ENVELOPE__BODY_CHUNK_REQUEST);
    cr_assert_str_eq(got->sender_id, "client");
    cr_assert_eq(got->message_id, 1);
    cr_assert_gt(net_msg_peer(req)->id_len, 0);
    cr_assert_eq(net_msg_peer(req)->req, 0);
    size_t plen;
    cr_assert_null(net_msg_payload(req, &plen));
    cr_assert_eq(plen, 0);

    /* The chunk travels in the raw second frame. */
    uint8_t chunk[200 - 3 * FX_CHUNK];
    for (size_t i = 0; i < sizeof chunk; i++)
        chunk[i] = (uint8_t)(i * 31 + 5);
    fixture_envelope(&fx, QUILLAN__ENVELOPE__BODY_CHUNK_REPLY, &env);
    cr_assert_eq(net_reply(r, req, &env, chunk, sizeof chunk, &e), 0, "%s", e.msg);
    net_msg_destroy(&req);
    cr_assert_null(req);
    net_msg_t *rep = recv_one(d);
    const void *p = net_msg_payload(rep, &plen);
    cr_assert_eq(plen, sizeof chunk);
    cr_assert_eq(memcmp(p, chunk, plen), 0);
    cr_assert_eq(net_msg_envelope(rep)->chunk_reply->index, 3);
    net_msg_destroy(&rep);

    net_stats_t st;
    net_socket_stats(r, &st);
    cr_assert_eq(st.received, 1);
    cr_assert_eq(st.sent, 1);
    net_socket_destroy(&d);
    net_socket_destroy(&r);
}

static int zc_freed;
static void zc_free(void *data, void *hint) {
    cr_assert_eq(data, hint);
    zc_freed++;
}

Test(net, zero_copy_payload_is_released_once) {
    fixture_init(&fx);
    net_socket_t *r, *d;
    pair_new(WIRE_PROTOCOL_WEIGHTS, weights_codec_net_validate, &fx_weights_limits, &r, &d);
    static uint8_t chunk[200 - 3 * FX_CHUNK] = {1, 2, 3};
    Quillan__Envelope env;
    fixture_envelope(&fx, QUILLAN__ENVELOPE__BODY_CHUNK_REPLY, &env);
    qerr_t e;
    zc_freed = 0;
    cr_assert_eq(net_send_zc(d, NULL, &env, chunk, sizeof chunk, zc_free, chunk, NULL, &e), 0);
    net_msg_t *m = recv_one(r);
    size_t plen;
    cr_assert_eq(((const uint8_t *)net_msg_payload(m, &plen))[2], 3);
    net_msg_destroy(&m);
    /* A failing send releases it too: a frame above ZMQ_MAXMSGSIZE is refused before sending. */
    static uint8_t big[(1 << 20) + (64 << 10) + 1];
    cr_assert_eq(net_send_zc(d, NULL, &env, big, sizeof big, zc_free, big, NULL, &e), -1);
    cr_assert_eq(e.code, QERR_RANGE, "%s", e.msg);
    net_socket_destroy(&d); /* libzmq releases the sent frame by now at the latest */
    net_socket_destroy(&r);
    cr_assert_eq(zc_freed, 2);
}

Test(net, req_client_delimiter_is_accepted_and_repeated) {
    fixture_init(&fx);
    qerr_t e;
    net_socket_t *svc = sock_new(ZMQ_ROUTER, WIRE_PROTOCOL_REWARD, "reward-service",
                                 reward_codec_net_validate, &fx_reward_limits);
    cr_assert_eq(net_socket_bind(svc, "tcp://127.0.0.1:*", &e), 0, "%s", e.msg);
    net_socket_t *req = sock_new(ZMQ_REQ, WIRE_PROTOCOL_REWARD, "req-client",
                                 reward_codec_net_validate, &fx_reward_limits);
    cr_assert_eq(net_socket_connect(req, net_socket_endpoint(svc), &e), 0, "%s", e.msg);
    Quillan__Envelope env;
    fixture_envelope(&fx, QUILLAN__ENVELOPE__BODY_REWARD_REQUEST, &env);
    cr_assert_eq(net_send(req, NULL, &env, NULL, 0, NULL, &e), 0, "%s", e.msg);
    net_msg_t *m = recv_one(svc);
    cr_assert_eq(net_msg_peer(m)->req, 1, "the REQ delimiter must be seen");
    cr_assert_eq(net_msg_envelope(m)->reward_request->request_id, 99);
    fixture_envelope(&fx, QUILLAN__ENVELOPE__BODY_REWARD_RESPONSE, &env);
    cr_assert_eq(net_reply(svc, m, &env, NULL, 0, &e), 0, "%s", e.msg);
    net_msg_destroy(&m);
    m = recv_one(req); /* a REQ socket only accepts a reply with the delimiter */
    cr_assert_eq(net_msg_envelope(m)->reward_response->request_id, 99);
    net_msg_destroy(&m);
    net_socket_destroy(&req);
    net_socket_destroy(&svc);
}

/* Sends raw frames through the DEALER's libzmq socket, as a foreign or hostile peer would. */
static void raw_send(net_socket_t *d, const void *const *frames, const size_t *lens, int n) {
    for (int i = 0; i < n; i++)
        cr_assert_geq(
            zmq_send(net_socket_handle(d), frames[i], lens[i], i + 1 < n ? ZMQ_SNDMORE : 0), 0);
}

/* Packs the fixture body bypassing the codec, so the test controls the version. */
static wire_buf_t raw_envelope(Quillan__Envelope__BodyCase body, uint32_t version) {
    Quillan__Envelope env;
    fixture_envelope(&fx, body, &env);
    env.protocol_version = version;
    env.sender_id = "raw";
    wire_buf_t b;
    b.len = protobuf_c_message_get_packed_size(&env.base);
    b.data = malloc(b.len);
    protobuf_c_message_pack(&env.base, b.data);
    return b;
}

Test(net, bad_messages_are_dropped_by_reason) {
    fixture_init(&fx);
    net_socket_t *r, *d;
    pair_new(WIRE_PROTOCOL_DISPATCH, dispatch_codec_net_validate, &fx_dispatch_limits, &r, &d);
    wire_buf_t good = raw_envelope(QUILLAN__ENVELOPE__BODY_HEARTBEAT, 1);
    wire_buf_t v2 = raw_envelope(QUILLAN__ENVELOPE__BODY_HEARTBEAT, 2);
    wire_buf_t other = raw_envelope(QUILLAN__ENVELOPE__BODY_CHUNK_REQUEST, 1);
    fx.heartbeat.lease_ids[1] = 0;
    wire_buf_t invalid = raw_envelope(QUILLAN__ENVELOPE__BODY_HEARTBEAT, 1);
    const uint8_t garbage[] = {0x08, 0x01, 0x12, 0x7f, 0x00};
    struct {
        int n;
        const void *f[3];
        size_t l[3];
        net_drop_t reason;
    } bad[] = {
        {3, {good.data, "a", "b"}, {good.len, 1, 1}, NET_DROP_FRAMES},
        {1, {v2.data}, {v2.len}, NET_DROP_VERSION},
        {1, {garbage}, {sizeof garbage}, NET_DROP_DECODE},
        {1, {other.data}, {other.len}, NET_DROP_BODY},
        {1, {invalid.data}, {invalid.len}, NET_DROP_INVALID},
        {2, {good.data, "payload"}, {good.len, 7}, NET_DROP_INVALID},
    };
    uint64_t expect[NET_DROP_COUNT] = {0};
    for (size_t i = 0; i < Q_ARRAY_LEN(bad); i++) {
        raw_send(d, bad[i].f, bad[i].l, bad[i].n);
        expect[bad[i].reason]++;
        const void *f[1] = {good.data};
        size_t l[1] = {good.len};
        raw_send(d, f, l, 1);
        net_msg_t *m = recv_one(r); /* the bad one was dropped on the way to the good one */
        cr_assert_eq(net_msg_envelope(m)->body_case, QUILLAN__ENVELOPE__BODY_HEARTBEAT);
        cr_assert_eq(net_msg_envelope(m)->heartbeat->lease_ids[1], 9);
        net_msg_destroy(&m);
        net_stats_t st;
        net_socket_stats(r, &st);
        for (int k = 0; k < NET_DROP_COUNT; k++)
            cr_assert_eq(st.dropped[k], expect[k], "after case %zu: %s drops %llu, expected %llu",
                         i, net_drop_name((net_drop_t)k), (unsigned long long)st.dropped[k],
                         (unsigned long long)expect[k]);
        cr_assert_eq(st.received, i + 1);
    }
    /* Nothing else waiting: a zero timeout returns at once with 0. */
    net_msg_t *m = NULL;
    qerr_t e;
    cr_assert_eq(net_recv(r, 0, &m, &e), 0);
    cr_assert_null(m);
    wire_buf_free(&good);
    wire_buf_free(&v2);
    wire_buf_free(&other);
    wire_buf_free(&invalid);
    net_socket_destroy(&d);
    net_socket_destroy(&r);
}

Test(net, send_failures_are_reported) {
    fixture_init(&fx);
    net_socket_t *r, *d;
    pair_new(WIRE_PROTOCOL_DISPATCH, NULL, NULL, &r, &d);
    Quillan__Envelope env;
    fixture_envelope(&fx, QUILLAN__ENVELOPE__BODY_ACK, &env);
    qerr_t e;
    net_peer_t ghost = {.id = {0, 1, 2, 3}, .id_len = 4};
    cr_assert_eq(net_send(r, &ghost, &env, NULL, 0, NULL, &e), -1);
    cr_assert_eq(e.code, QERR_NOTFOUND, "%s", e.msg);
    fixture_envelope(&fx, QUILLAN__ENVELOPE__BODY_SNAPSHOT_INFO, &env);
    cr_assert_eq(net_send(d, NULL, &env, NULL, 0, NULL, &e), -1);
    cr_assert_eq(e.code, QERR_INVALID, "%s", e.msg);
    fixture_envelope(&fx, QUILLAN__ENVELOPE__BODY_ACK, &env);
    static uint8_t big[(4 << 20) + 1];
    cr_assert_eq(net_send(d, NULL, &env, big, sizeof big, NULL, &e), -1);
    cr_assert_eq(e.code, QERR_RANGE, "%s", e.msg);
    net_stats_t st;
    net_socket_stats(r, &st);
    cr_assert_eq(st.send_failed, 1);
    net_socket_stats(d, &st);
    cr_assert_eq(st.send_failed, 2);
    cr_assert_eq(st.sent, 0);
    net_socket_destroy(&d);
    net_socket_destroy(&r);
}

/* The log hub's input side: an XSUB subscribed to everything. */
static void *hub_new(char *endpoint, size_t cap) {
    void *hub = zmq_socket(zctx, ZMQ_XSUB);
    int zero = 0;
    zmq_setsockopt(hub, ZMQ_LINGER, &zero, sizeof zero);
    cr_assert_eq(zmq_bind(hub, "tcp://127.0.0.1:*"), 0);
    cr_assert_eq(zmq_getsockopt(hub, ZMQ_LAST_ENDPOINT, endpoint, &cap), 0);
    cr_assert_eq(zmq_send(hub, "\x01", 1, 0), 1);
    return hub;
}

Test(net, log_publisher_sends_records_and_counts_drops) {
    char ep[256];
    void *hub = hub_new(ep, sizeof ep);
    opt.sndhwm = 4;
    qerr_t e;
    log_pub_t *pub = log_pub_new(zctx, ep, &opt, &sec, "test-proc", 42, &e);
    cr_assert_not_null(pub, "%s", e.msg);
    /* PUB/SUB start-up: records published before the hub's subscription reaches the
     * publisher are filtered out. A bound XSUB forwards it only once the hub socket is used
     * (zmq_poll), as a proxy loop does; probe until the first record arrives. */
    int arrived = 0;
    for (int i = 0; i < 500 && !arrived; i++) {
        log_info("probe", "probe %d", i);
        zmq_pollitem_t it = {.socket = hub, .events = ZMQ_POLLIN};
        arrived = zmq_poll(&it, 1, 10) == 1;
    }
    cr_assert(arrived, "the hub never received a record");
    zmq_msg_t f;
    zmq_msg_init(&f);
    cr_assert_gt(zmq_msg_recv(&f, hub, 0), 0);
    wire_msg_t *m = log_codec_unpack(zmq_msg_data(&f), zmq_msg_size(&f), 1 << 20, &e);
    cr_assert_not_null(m, "%s", e.msg);
    const Quillan__Envelope *env = wire_msg_envelope(m);
    cr_assert_str_eq(env->sender_id, "test-proc");
    cr_assert_eq(env->incarnation_id, 42);
    cr_assert_str_eq(env->log_record->event, "probe");
    cr_assert_eq(env->log_record->level, QUILLAN__LOG_LEVEL__LOG_LEVEL_INFO);
    wire_msg_destroy(&m);
    zmq_msg_close(&f);

    /* Overload: the hub stops reading; logging never blocks and every record is counted. */
    log_pub_stats_t before, after;
    log_pub_stats(pub, &before);
    const int N = 20000;
    log_field_t field = {"i", 0};
    for (int i = 0; i < N; i++) {
        field.value = i;
        log_emit(LOG_INFO, "flood", &field, 1, "record %d", i);
    }
    log_pub_stats(pub, &after);
    cr_assert_eq((after.published - before.published) + (after.dropped - before.dropped),
                 (uint64_t)N);
    cr_assert_gt(after.dropped, before.dropped, "a bounded queue must drop under overload");
    log_pub_destroy(&pub);
    cr_assert_null(pub);
    log_info("after", "no sink left");
    zmq_close(hub);
}
