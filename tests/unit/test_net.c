/* common/net.h and common/log_pub.h over real TCP loopback sockets in one process: options,
 * ROUTER/DEALER/REQ framing, payload frames, drops by reason, send failures, log publishing.
 * The two-process exchange with hostile frames lives in tests/e2e/net_*.c. */
#include "test_proto_fixtures.h"

#include "log_pub.h"
#include "model.h"
#include "net.h"
#include "qpolicy.h"

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

/* ---- decode budget vs network.max_msg_bytes ---- */

/* A TrajectoryGroup of one model shape. Every trajectory points at the same arrays: the wire
 * form repeats them, the sender's memory does not. */
typedef struct {
    uint32_t vocab, G, T, L, km, ke, ku, pw; /* model shape, group size, completion tokens */
    uint32_t n_minis, n_experts, n_micros;   /* router widths */
    int spread; /* 0: every id takes one varint byte, the worst decoded/wire ratio; 1: ids
                   spread over their whole range, as sampled text and routers give */
} group_shape_t;

/* The shape of a built-in model preset with G completions of T tokens. */
static group_shape_t preset_shape(const char *preset, uint32_t G, uint32_t T, int spread) {
    model_config_t mc;
    qerr_t e;
    cr_assert_eq(model_config_preset(preset, &mc, &e), 0, "%s", e.msg);
    return (group_shape_t){.vocab = (uint32_t)mc.vocab_size,
                           .G = G,
                           .T = T,
                           .L = (uint32_t)mc.num_layers,
                           .km = (uint32_t)mc.top_k_minis,
                           .ke = (uint32_t)mc.top_k_experts,
                           .ku = (uint32_t)mc.top_k_micros,
                           .pw = (uint32_t)(mc.diffusion_bits + 63) / 64,
                           .n_minis = (uint32_t)mc.num_mini_moes,
                           .n_experts = (uint32_t)mc.num_experts_per_mini,
                           .n_micros = (uint32_t)mc.num_micros_per_mini,
                           .spread = spread};
}

typedef struct {
    uint32_t prompt[4];
    uint32_t *tokens, *kept, *minis, *experts, *micros;
    float *lp;
    uint64_t *plan;
    Quillan__SamplingParams sampling;
    Quillan__RoutingRecord routing;
    Quillan__Trajectory traj;
    Quillan__Trajectory **trajp;
    Quillan__TrajectoryGroup group;
} big_group_t;

static uint32_t shape_id(const group_shape_t *s, size_t i, uint32_t width) {
    uint32_t cap = s->spread || width < 128 ? width : 127;
    return (uint32_t)((s->spread ? i * 7919u : i) % cap);
}

static void big_group_init(big_group_t *b, const group_shape_t *s) {
    memset(b, 0, sizeof *b);
    const size_t T = s->T, n_minis = T * s->L * s->km;
    b->tokens = calloc(T, sizeof *b->tokens);
    b->kept = calloc(T, sizeof *b->kept);
    b->lp = calloc(T, sizeof *b->lp);
    b->minis = calloc(n_minis, sizeof *b->minis);
    b->experts = calloc(n_minis * s->ke, sizeof *b->experts);
    b->micros = calloc(n_minis * s->ku, sizeof *b->micros);
    b->plan = calloc(T * s->pw, sizeof *b->plan);
    b->trajp = calloc(s->G, sizeof *b->trajp);
    cr_assert(b->tokens && b->kept && b->lp && b->minis && b->experts && b->micros && b->plan &&
              b->trajp);
    for (size_t t = 0; t < T; t++) {
        b->tokens[t] = shape_id(s, t, s->vocab);
        b->kept[t] = 1 + shape_id(s, t, s->vocab - 1);
        b->lp[t] = -0.5f - (float)(t % 7);
    }
    for (size_t i = 0; i < n_minis; i++)
        b->minis[i] = shape_id(s, i, s->n_minis);
    for (size_t i = 0; i < n_minis * s->ke; i++)
        b->experts[i] = shape_id(s, i, s->n_experts);
    for (size_t i = 0; i < n_minis * s->ku; i++)
        b->micros[i] = shape_id(s, i, s->n_micros);
    for (size_t i = 0; i < T * s->pw; i++)
        b->plan[i] = 0x9E3779B97F4A7C15ull * (i + 1);
    Quillan__RoutingRecord rr = QUILLAN__ROUTING_RECORD__INIT;
    rr.num_layers = s->L, rr.top_k_minis = s->km, rr.top_k_experts = s->ke;
    rr.top_k_micros = s->ku, rr.plan_words = s->pw;
    rr.n_minis = n_minis, rr.minis = b->minis;
    rr.n_experts = n_minis * s->ke, rr.experts = b->experts;
    rr.n_micros = n_minis * s->ku, rr.micros = b->micros;
    rr.n_plan = T * s->pw, rr.plan = b->plan;
    b->routing = rr;
    Quillan__Trajectory tr = QUILLAN__TRAJECTORY__INIT;
    tr.n_completion_tokens = T, tr.completion_tokens = b->tokens;
    tr.n_behaviour_logprobs = T, tr.behaviour_logprobs = b->lp;
    tr.n_kept_counts = T, tr.kept_counts = b->kept;
    tr.maybe_reward_case = QUILLAN__TRAJECTORY__MAYBE_REWARD_REWARD, tr.reward = 1.0;
    tr.finish_reason = QUILLAN__FINISH_REASON__FINISH_REASON_LENGTH;
    tr.routing = &b->routing;
    b->traj = tr;
    for (uint32_t g = 0; g < s->G; g++)
        b->trajp[g] = &b->traj;
    b->prompt[0] = s->vocab - 1, b->prompt[1] = 72, b->prompt[2] = 105, b->prompt[3] = 33;
    Quillan__SamplingParams sp = QUILLAN__SAMPLING_PARAMS__INIT;
    sp.temperature = 1.0f, sp.top_p = 1.0f, sp.max_new_tokens = s->T, sp.seed = 1234;
    b->sampling = sp;
    Quillan__TrajectoryGroup grp = QUILLAN__TRAJECTORY_GROUP__INIT;
    grp.lease_id = 7, grp.prompt_id = 42, grp.epoch = 1;
    grp.n_prompt_tokens = 4, grp.prompt_tokens = b->prompt;
    grp.policy_version = 3, grp.n_trajectories = s->G, grp.trajectories = b->trajp;
    grp.worker_id = "rollout-1", grp.gen_seconds = 30.0, grp.reward_seconds = 0.5;
    grp.sampling = &b->sampling;
    b->group = grp;
}

static void big_group_free(big_group_t *b) {
    free(b->tokens);
    free(b->kept);
    free(b->lp);
    free(b->minis);
    free(b->experts);
    free(b->micros);
    free(b->plan);
    free(b->trajp);
    memset(b, 0, sizeof *b);
}

/* What the dispatcher of a run of this shape checks groups against. */
static dispatch_codec_limits_t shape_limits(const group_shape_t *s) {
    return (dispatch_codec_limits_t){.vocab_size = s->vocab,
                                     .max_group_size = s->G,
                                     .max_prompt_tokens = 16,
                                     .max_new_tokens = s->T,
                                     .num_layers = s->L,
                                     .top_k_minis = s->km,
                                     .top_k_experts = s->ke,
                                     .top_k_micros = s->ku,
                                     .plan_words = s->pw,
                                     .num_mini_moes = s->n_minis,
                                     .num_experts_per_mini = s->n_experts,
                                     .num_micros_per_mini = s->n_micros};
}

static Quillan__Envelope group_envelope(big_group_t *b) {
    Quillan__Envelope env = QUILLAN__ENVELOPE__INIT;
    env.body_case = QUILLAN__ENVELOPE__BODY_TRAJECTORY_GROUP;
    env.trajectory_group = &b->group;
    return env;
}

static const wire_header_t budget_hdr = {"rollout-1", 77, 1};

/* Packs env, decodes it with room to spare and returns the decoder's peak in bytes; *len gets
 * the wire bytes. */
static size_t decode_peak(wire_protocol_t p, Quillan__Envelope *env, size_t *len) {
    wire_buf_t b;
    qerr_t e;
    cr_assert_eq(wire_codec_pack(p, &budget_hdr, env, &b, &e), 0, "%s", e.msg);
    wire_msg_t *m = wire_codec_unpack(p, b.data, b.len, (size_t)1 << 30, &e);
    cr_assert_not_null(m, "%s", e.msg);
    size_t peak = wire_msg_peak_bytes(m);
    *len = b.len;
    wire_msg_destroy(&m);
    wire_buf_free(&b);
    return peak;
}

static void ratio_print(const char *what, size_t len, size_t peak) {
    printf("%-38s %9zu wire bytes, %10zu decoded: %.2f\n", what, len, peak,
           (double)peak / (double)len);
}

Test(net, decode_budget_follows_max_msg_bytes) {
    cr_assert_eq(wire_decode_budget(4u << 20), (size_t)WIRE_DECODE_RATIO << 22);
    cr_assert_eq(wire_decode_budget(0), 0);
    cr_assert_eq(wire_decode_budget((size_t)32 << 20), (size_t)WIRE_DECODE_RATIO << 25);
    cr_assert_eq(wire_decode_budget((size_t)1 << 30), (size_t)WIRE_DECODE_RATIO << 30);
    cr_assert_eq(wire_decode_budget(SIZE_MAX / 2), SIZE_MAX);

    cr_assert_eq(net_options_decode_budget(&opt, WIRE_PROTOCOL_DISPATCH),
                 WIRE_DECODE_BUDGET_DEFAULT);
    /* The floor is decode_budget_bytes alone: a lower one lets the scaled figure through. */
    opt.decode_budget_bytes = (size_t)16 << 20;
    cr_assert_eq(net_options_decode_budget(&opt, WIRE_PROTOCOL_DISPATCH),
                 wire_decode_budget(4u << 20));
    cr_assert_eq(net_options_decode_budget(&opt, WIRE_PROTOCOL_WEIGHTS), (size_t)16 << 20);
    opt.decode_budget_bytes = WIRE_DECODE_BUDGET_DEFAULT;
    opt.control_max_msg_bytes = (int64_t)32 << 20;
    for (int p = 0; p < WIRE_PROTOCOL_COUNT; p++)
        cr_assert_eq(net_options_decode_budget(&opt, (wire_protocol_t)p),
                     p == WIRE_PROTOCOL_WEIGHTS ? WIRE_DECODE_BUDGET_DEFAULT
                                                : wire_decode_budget((size_t)32 << 20),
                     "%s", wire_protocol_name((wire_protocol_t)p));
    /* decode_budget_bytes is a floor: above the scaled figure it wins. */
    opt.decode_budget_bytes = (size_t)1 << 30;
    cr_assert_eq(net_options_decode_budget(&opt, WIRE_PROTOCOL_REWARD), (size_t)1 << 30);
    cr_assert_eq(net_options_decode_budget(&opt, WIRE_PROTOCOL_WEIGHTS), (size_t)1 << 30);
    opt.decode_budget_bytes = WIRE_DECODE_BUDGET_DEFAULT;
    net_socket_t *s = sock_new(ZMQ_DEALER, WIRE_PROTOCOL_LOG, "log", NULL, NULL);
    cr_assert_eq(net_socket_decode_budget(s), wire_decode_budget((size_t)32 << 20));
    net_socket_destroy(&s);
}

/* Decoder bytes per wire byte of legitimate messages at their largest shapes. One that grows
 * with G and T must stay within half of WIRE_DECODE_RATIO, the margin the rule promises (its
 * budget scales with the frame); one bounded otherwise (a tensor table, a record, a score
 * list) must fit half the floor, which is all a weights socket gets. Hostile empty
 * sub-messages must stay far above the ratio. */
Test(net, legitimate_messages_fit_the_decode_ratio) {
    fixture_init(&fx);
    Quillan__Envelope env;
    size_t len, peak;
    /* G and T of the presets' configs: groups of 8, 2047 of 2048 and 255 of 256 context
     * tokens. */
    const struct {
        const char *name;
        group_shape_t shape;
    } shapes[] = {
        {"group 512m, ids of 1 byte", preset_shape("quillan-512m", 8, 2047, 0)},
        {"group 512m, ids spread", preset_shape("quillan-512m", 8, 2047, 1)},
        {"group tiny, ids of 1 byte", preset_shape("tiny", 8, 255, 0)},
        {"group tiny, ids spread", preset_shape("tiny", 8, 255, 1)},
    };
    char what[64];
    for (size_t i = 0; i < Q_ARRAY_LEN(shapes); i++) {
        big_group_t b;
        big_group_init(&b, &shapes[i].shape);
        env = group_envelope(&b);
        peak = decode_peak(WIRE_PROTOCOL_DISPATCH, &env, &len);
        ratio_print(shapes[i].name, len, peak);
        cr_assert_leq(2 * peak, WIRE_DECODE_RATIO * len, "%s", shapes[i].name);
        b.traj.routing = NULL;
        peak = decode_peak(WIRE_PROTOCOL_DISPATCH, &env, &len);
        snprintf(what, sizeof what, "%s, no routing", shapes[i].name);
        ratio_print(what, len, peak);
        cr_assert_leq(2 * peak, WIRE_DECODE_RATIO * len, "%s", what);
        big_group_free(&b);
    }

    /* A reward request of a 512m group as the worker sends it: completion text and tokens. */
    enum { G = 8, T = 2047 };
    static char text[T + 1];
    static uint32_t toks[T];
    for (int t = 0; t < T; t++) {
        text[t] = (char)('a' + t % 26);
        toks[t] = (uint32_t)(t * 7919u) % 50257u;
    }
    Quillan__RewardSample rs[G];
    Quillan__RewardSample *rsp[G];
    Quillan__ScoreEntry se[G];
    Quillan__ScoreEntry *sep[G];
    for (int g = 0; g < G; g++) {
        rs[g] = fx.sample;
        rs[g].completion = text, rs[g].n_completion_tokens = T, rs[g].completion_tokens = toks;
        rsp[g] = &rs[g];
        se[g] = fx.score, sep[g] = &se[g];
    }
    fx.reward_req.n_samples = G, fx.reward_req.samples = rsp;
    fx.reward_resp.n_scores = G, fx.reward_resp.scores = sep;
    /* A lease of G requests with prompts of T tokens and their text. */
    Quillan__RolloutRequest *rqp[G];
    fx.rollout.n_prompt_tokens = T, fx.rollout.prompt_tokens = toks, fx.rollout.prompt_text = text;
    for (int g = 0; g < G; g++)
        rqp[g] = &fx.rollout;
    fx.lease.n_requests = G, fx.lease.requests = rqp;

    /* Snapshot info: the 512m preset's tensor table. */
    model_config_t mc;
    qerr_t e;
    cr_assert_eq(model_config_preset("quillan-512m", &mc, &e), 0, "%s", e.msg);
    model_t *model = model_new_table(&mc, &e);
    cr_assert_not_null(model, "%s", e.msg);
    const size_t n_tensors = model_tensor_count(model);
    Quillan__TensorEntry *te = calloc(n_tensors, sizeof *te);
    Quillan__TensorEntry **tep = calloc(n_tensors, sizeof *tep);
    uint64_t(*dims)[MODEL_MAX_NDIM] = calloc(n_tensors, sizeof *dims);
    cr_assert(te && tep && dims);
    size_t n_info = 0;
    uint64_t offset = 0;
    for (size_t i = 0; i < n_tensors; i++) {
        const model_tensor_t *t = model_tensor(model, i);
        if (!t->in_rollout)
            continue;
        quillan__tensor_entry__init(&te[n_info]);
        te[n_info].name = (char *)t->name;
        te[n_info].qtype = (char *)qtype_name(qpolicy_qtype_of(t->rollout));
        for (int k = 0; k < t->ndim; k++)
            dims[n_info][k] = (uint64_t)t->shape[k];
        te[n_info].n_shape = (size_t)t->ndim, te[n_info].shape = dims[n_info];
        te[n_info].offset = offset;
        te[n_info].bytes = model_tensor_rollout_bytes(t);
        offset += te[n_info].bytes;
        tep[n_info] = &te[n_info];
        n_info++;
    }
    fx.info.n_tensors = n_info, fx.info.tensors = tep;

    /* A log record with the most fields a publisher sends and its longest text. */
    static Quillan__LogRecord__FieldsEntry fe[32];
    static Quillan__LogRecord__FieldsEntry *fep[32];
    static char keys[32][24];
    for (int i = 0; i < 32; i++) {
        snprintf(keys[i], sizeof keys[i], "train/field_%d", i);
        fe[i] = fx.field, fe[i].key = keys[i], fep[i] = &fe[i];
    }
    static char log_text[2048];
    memset(log_text, 'x', sizeof log_text - 1);
    fx.log.n_fields = 32, fx.log.fields = fep, fx.log.text = log_text;

    const struct {
        Quillan__Envelope__BodyCase body;
        wire_protocol_t p;
        int scales;
    } msgs[] = {
        {QUILLAN__ENVELOPE__BODY_REWARD_REQUEST, WIRE_PROTOCOL_REWARD, 1},
        {QUILLAN__ENVELOPE__BODY_REWARD_RESPONSE, WIRE_PROTOCOL_REWARD, 0},
        {QUILLAN__ENVELOPE__BODY_SNAPSHOT_INFO, WIRE_PROTOCOL_WEIGHTS, 0},
        {QUILLAN__ENVELOPE__BODY_CHUNK_REPLY, WIRE_PROTOCOL_WEIGHTS, 0},
        {QUILLAN__ENVELOPE__BODY_CHUNK_REQUEST, WIRE_PROTOCOL_WEIGHTS, 0},
        {QUILLAN__ENVELOPE__BODY_LOG_RECORD, WIRE_PROTOCOL_LOG, 0},
        {QUILLAN__ENVELOPE__BODY_LEASE, WIRE_PROTOCOL_DISPATCH, 1},
        {QUILLAN__ENVELOPE__BODY_HEARTBEAT, WIRE_PROTOCOL_DISPATCH, 0},
    };
    for (size_t i = 0; i < Q_ARRAY_LEN(msgs); i++) {
        fixture_envelope(&fx, msgs[i].body, &env);
        peak = decode_peak(msgs[i].p, &env, &len);
        snprintf(what, sizeof what, "%s%s", wire_body_name(msgs[i].body),
                 msgs[i].body == QUILLAN__ENVELOPE__BODY_SNAPSHOT_INFO ? " (512m tensors)" : "");
        ratio_print(what, len, peak);
        cr_assert_leq(2 * peak,
                      msgs[i].scales ? WIRE_DECODE_RATIO * len : WIRE_DECODE_BUDGET_DEFAULT, "%s",
                      what);
    }
    free(te);
    free(tep);
    free(dims);
    model_destroy(&model);

    /* Hostile: empty trajectories, two bytes each on the wire. */
    static Quillan__Trajectory empty = QUILLAN__TRAJECTORY__INIT;
    static Quillan__Trajectory *emptyp[32768];
    for (size_t i = 0; i < Q_ARRAY_LEN(emptyp); i++)
        emptyp[i] = &empty;
    fx.group.n_trajectories = Q_ARRAY_LEN(emptyp), fx.group.trajectories = emptyp;
    fixture_envelope(&fx, QUILLAN__ENVELOPE__BODY_TRAJECTORY_GROUP, &env);
    peak = decode_peak(WIRE_PROTOCOL_DISPATCH, &env, &len);
    ratio_print("hostile: empty trajectories", len, peak);
    cr_assert_gt(peak, 4 * WIRE_DECODE_RATIO * len);
}

/* A 512m group of 64 x 2047 tokens with routing replay takes ~22 MB on the wire (config.c
 * asks network.max_msg_bytes >= 64 x 2047 x 169 B for it) and ~75 MB decoded: more than the
 * fixed 64 MiB budget, inside the budget of a 32 MiB frame limit. */
Test(net, large_group_is_accepted_with_a_larger_max_msg_bytes) {
    const group_shape_t shape = preset_shape("quillan-512m", 64, 2047, 0);
    const dispatch_codec_limits_t lim = shape_limits(&shape);
    big_group_t b;
    big_group_init(&b, &shape);
    Quillan__Envelope env = group_envelope(&b);
    wire_buf_t packed;
    qerr_t e;
    cr_assert_eq(dispatch_codec_pack(&budget_hdr, &env, &packed, &e), 0, "%s", e.msg);
    cr_assert_gt(packed.len, (size_t)16 << 20);
    cr_assert_lt(packed.len, (size_t)32 << 20);
    wire_msg_t *m = wire_codec_unpack(WIRE_PROTOCOL_DISPATCH, packed.data, packed.len,
                                      WIRE_DECODE_BUDGET_DEFAULT, &e);
    cr_assert_null(m, "the group must need more than the fixed budget");
    cr_assert_eq(e.code, QERR_NOMEM, "%s", e.msg);
    wire_buf_free(&packed);

    opt.control_max_msg_bytes = (int64_t)32 << 20;
    net_socket_t *r, *d;
    pair_new(WIRE_PROTOCOL_DISPATCH, dispatch_codec_net_validate, &lim, &r, &d);
    env = group_envelope(&b);
    cr_assert_eq(net_send(d, NULL, &env, NULL, 0, NULL, &e), 0, "%s", e.msg);
    net_msg_t *got = NULL;
    int rc = net_recv(r, RECV_MS, &got, &e);
    net_stats_t st;
    net_socket_stats(r, &st);
    if (rc != 1) { /* close first: zmq_ctx_term in the teardown waits for open sockets */
        net_socket_destroy(&d);
        net_socket_destroy(&r);
    }
    cr_assert_eq(rc, 1, "the group was not delivered (rc %d, budget drops %llu)", rc,
                 (unsigned long long)st.dropped[NET_DROP_BUDGET]);
    const Quillan__TrajectoryGroup *g = net_msg_envelope(got)->trajectory_group;
    cr_assert_not_null(g);
    cr_assert_eq(g->n_trajectories, shape.G);
    const Quillan__Trajectory *last = g->trajectories[shape.G - 1];
    cr_assert_eq(last->n_completion_tokens, shape.T);
    cr_assert_eq(last->routing->n_micros, b.routing.n_micros);
    cr_assert_arr_eq(last->routing->micros, b.micros, b.routing.n_micros * sizeof *b.micros);
    net_msg_destroy(&got);
    cr_assert_eq(st.received, 1);
    for (int k = 0; k < NET_DROP_COUNT; k++)
        cr_assert_eq(st.dropped[k], 0, "%s drops", net_drop_name((net_drop_t)k));
    net_socket_destroy(&d);
    net_socket_destroy(&r);
    big_group_free(&b);
}

/* ~4 MB of empty trajectories (2 bytes each on the wire, ~108 decoder bytes each) in one
 * frame of the default 4 MiB limit: dropped for its budget, and the next message arrives. */
Test(net, hostile_message_at_the_default_frame_is_dropped) {
    fixture_init(&fx);
    net_socket_t *r, *d;
    pair_new(WIRE_PROTOCOL_DISPATCH, dispatch_codec_net_validate, &fx_dispatch_limits, &r, &d);
    cr_assert_eq(net_socket_decode_budget(r), WIRE_DECODE_BUDGET_DEFAULT);
    enum { N = 2000000 };
    static Quillan__Trajectory empty = QUILLAN__TRAJECTORY__INIT;
    Quillan__Trajectory **emptyp = malloc(N * sizeof *emptyp);
    cr_assert_not_null(emptyp);
    for (size_t i = 0; i < N; i++)
        emptyp[i] = &empty;
    fx.group.n_trajectories = N, fx.group.trajectories = emptyp;
    Quillan__Envelope env;
    fixture_envelope(&fx, QUILLAN__ENVELOPE__BODY_TRAJECTORY_GROUP, &env);
    qerr_t e;
    cr_assert_eq(net_send(d, NULL, &env, NULL, 0, NULL, &e), 0, "%s", e.msg);
    free(emptyp);
    fixture_envelope(&fx, QUILLAN__ENVELOPE__BODY_HEARTBEAT, &env);
    cr_assert_eq(net_send(d, NULL, &env, NULL, 0, NULL, &e), 0, "%s", e.msg);
    net_msg_t *m = recv_one(r);
    cr_assert_eq(net_msg_envelope(m)->body_case, QUILLAN__ENVELOPE__BODY_HEARTBEAT);
    net_msg_destroy(&m);
    net_stats_t st;
    net_socket_stats(r, &st);
    cr_assert_eq(st.dropped[NET_DROP_BUDGET], 1);
    cr_assert_eq(st.received, 1);
    cr_assert_eq(st.disconnects, 0, "the frame fits ZMQ_MAXMSGSIZE: no cut connection");
    net_socket_destroy(&d);
    net_socket_destroy(&r);
}
