/* Wire protocol codecs: round trips, version refusal, decode budget, semantic invariants. */
#include "test_proto_fixtures.h"

#include <criterion/criterion.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static fixture_t fx;
static const wire_header_t hdr = {"rollout-1@hostA", 0x1122334455667788ull, 11};

static void setup(void) {
    fixture_init(&fx);
}

TestSuite(proto, .init = setup);

/* Packs the fixture's body for protocol p; the caller frees *out. */
static void pack_body(Quillan__Envelope__BodyCase body, wire_protocol_t p, wire_buf_t *out) {
    Quillan__Envelope env;
    fixture_envelope(&fx, body, &env);
    qerr_t e;
    int rc = wire_codec_pack(p, &hdr, &env, out, &e);
    cr_assert_eq(rc, 0, "pack %s on %s: %s", wire_body_name(body), wire_protocol_name(p), e.msg);
}

/* Expects a full decode of the fixture body, after mutate() changed it, to fail with code and
 * a message containing needle. */
static void expect_invalid(Quillan__Envelope__BodyCase body, wire_protocol_t p, qerr_code_t code,
                           const char *needle) {
    wire_buf_t b;
    pack_body(body, p, &b);
    qerr_t e;
    qerr_clear(&e);
    wire_msg_t *m = fixture_decode(p, b.data, b.len, fixture_payload_len(&fx, body),
                                   WIRE_DECODE_BUDGET_DEFAULT, &e);
    cr_assert_null(m, "decode of a broken %s should fail (%s)", wire_body_name(body), needle);
    cr_assert_eq(e.code, code, "code %s, expected %s: %s", qerr_code_name(e.code),
                 qerr_code_name(code), e.msg);
    cr_assert_not_null(strstr(e.msg, needle), "error \"%s\" should name \"%s\"", e.msg, needle);
    wire_buf_free(&b);
}

Test(proto, every_message_round_trips) {
    for (size_t i = 0; i < Q_ARRAY_LEN(fx_bodies); i++) {
        Quillan__Envelope__BodyCase body = fx_bodies[i].body;
        wire_protocol_t p = fx_bodies[i].protocol;
        wire_buf_t b;
        pack_body(body, p, &b);
        qerr_t e;
        wire_msg_t *m = fixture_decode(p, b.data, b.len, fixture_payload_len(&fx, body),
                                       WIRE_DECODE_BUDGET_DEFAULT, &e);
        cr_assert_not_null(m, "decode %s on %s: %s", wire_body_name(body), wire_protocol_name(p),
                           e.msg);
        const Quillan__Envelope *env = wire_msg_envelope(m);
        cr_assert_eq(env->body_case, body);
        cr_assert_eq(env->protocol_version, wire_protocol_version(p));
        cr_assert_str_eq(env->sender_id, hdr.sender_id);
        cr_assert_eq(env->incarnation_id, hdr.incarnation_id);
        cr_assert_eq(env->message_id, hdr.message_id);
        cr_assert_gt(wire_msg_peak_bytes(m), 0);
        /* Byte-exact: protobuf-c packs fields in a fixed order, so equal bytes mean every
         * field, nested ones included, survived the trip. */
        size_t n = protobuf_c_message_get_packed_size(&env->base);
        cr_assert_eq(n, b.len, "%s: repacked size %zu != %zu", wire_body_name(body), n, b.len);
        uint8_t *again = malloc(n);
        protobuf_c_message_pack(&env->base, again);
        cr_assert_eq(memcmp(again, b.data, n), 0, "%s: repacked bytes differ",
                     wire_body_name(body));
        free(again);
        wire_msg_destroy(&m);
        cr_assert_null(m);
        wire_msg_destroy(&m);
        wire_buf_free(&b);
    }
}

Test(proto, reward_absent_is_not_zero) {
    wire_buf_t b;
    pack_body(QUILLAN__ENVELOPE__BODY_TRAJECTORY_GROUP, WIRE_PROTOCOL_DISPATCH, &b);
    qerr_t e;
    wire_msg_t *m =
        dispatch_codec_unpack(b.data, b.len, &fx_dispatch_limits, WIRE_DECODE_BUDGET_DEFAULT, &e);
    cr_assert_not_null(m, "%s", e.msg);
    const Quillan__TrajectoryGroup *g = wire_msg_envelope(m)->trajectory_group;
    cr_assert_eq(g->n_trajectories, FX_G);
    cr_assert_eq(g->trajectories[0]->maybe_reward_case, QUILLAN__TRAJECTORY__MAYBE_REWARD_REWARD);
    cr_assert_eq(g->trajectories[0]->reward, 0.0);
    cr_assert_eq(g->trajectories[1]->maybe_reward_case, QUILLAN__TRAJECTORY__MAYBE_REWARD__NOT_SET);
    cr_assert_str_eq(g->trajectories[0]->text, "caf\xc3\xa9");
    cr_assert_eq(g->trajectories[1]->routing->plan[2], 0x0123456789ABCDEFull ^ 2);
    wire_msg_destroy(&m);
    wire_buf_free(&b);

    /* A score of 0 and "no reward" stay distinct too. */
    fx.score.maybe_score_case = QUILLAN__SCORE_ENTRY__MAYBE_SCORE__NOT_SET;
    pack_body(QUILLAN__ENVELOPE__BODY_REWARD_RESPONSE, WIRE_PROTOCOL_REWARD, &b);
    m = reward_codec_unpack(b.data, b.len, &fx_reward_limits, WIRE_DECODE_BUDGET_DEFAULT, &e);
    cr_assert_not_null(m, "%s", e.msg);
    cr_assert_eq(wire_msg_envelope(m)->reward_response->scores[0]->maybe_score_case,
                 QUILLAN__SCORE_ENTRY__MAYBE_SCORE__NOT_SET);
    wire_msg_destroy(&m);
    wire_buf_free(&b);
}

Test(proto, log_record_converts_both_ways) {
    log_field_t fields[2] = {{"loss", 0.5}, {"nan", NAN}};
    log_record_t rec = {.time = 12.5,
                        .process = "learner",
                        .host = "h",
                        .level = LOG_WARN,
                        .event = "train.step",
                        .fields = fields,
                        .n_fields = 2,
                        .text = "t"};
    wire_buf_t b;
    qerr_t e;
    cr_assert_eq(log_codec_pack_record(&hdr, &rec, &b, &e), 0, "%s", e.msg);
    wire_msg_t *m = log_codec_unpack(b.data, b.len, WIRE_DECODE_BUDGET_DEFAULT, &e);
    cr_assert_not_null(m, "%s", e.msg);
    log_record_t back;
    log_field_t bf[1];
    cr_assert_eq(log_codec_record_view(wire_msg_envelope(m)->log_record, &back, bf, 1), 1);
    cr_assert_eq(back.time, 12.5);
    cr_assert_eq(back.level, LOG_WARN);
    cr_assert_str_eq(back.event, "train.step");
    cr_assert_str_eq(back.text, "t");
    cr_assert_str_eq(bf[0].key, "loss");
    cr_assert_eq(bf[0].value, 0.5);
    cr_assert(isnan(wire_msg_envelope(m)->log_record->fields[1]->value));
    wire_msg_destroy(&m);
    wire_buf_free(&b);
}

/* Packs an Envelope claiming protocol_version v, as a peer of another build would. */
static void pack_with_version(uint32_t v, wire_buf_t *out) {
    Quillan__Envelope env;
    fixture_envelope(&fx, QUILLAN__ENVELOPE__BODY_WORK_REQUEST, &env);
    env.protocol_version = v;
    env.sender_id = "future-worker";
    out->len = protobuf_c_message_get_packed_size(&env.base);
    out->data = malloc(out->len);
    protobuf_c_message_pack(&env.base, out->data);
}

Test(proto, other_protocol_version_is_refused_clearly) {
    wire_buf_t b;
    pack_with_version(2, &b);
    qerr_t e;
    wire_msg_t *m =
        dispatch_codec_unpack(b.data, b.len, &fx_dispatch_limits, WIRE_DECODE_BUDGET_DEFAULT, &e);
    cr_assert_null(m);
    cr_assert_eq(e.code, QERR_VERSION);
    cr_assert_str_eq(e.msg, "dispatch protocol version 2, this build speaks 1");
    uint32_t v = 0;
    cr_assert_eq(wire_codec_peek_version(b.data, b.len, &v, &e), 0);
    cr_assert_eq(v, 2);
    wire_buf_free(&b);

    /* A newer peer whose envelope no longer parses as ours still gets the version error:
     * field 1 = 2, then a field with a wire type this build's decoder rejects (group end). */
    const uint8_t future[] = {0x08, 0x02, 0xA2, 0x06, 0x03, 'a', 'b', 'c'};
    m = wire_codec_unpack(WIRE_PROTOCOL_DISPATCH, future, sizeof future, 1 << 20, &e);
    cr_assert_null(m);
    cr_assert_eq(e.code, QERR_VERSION, "%s", e.msg);

    /* No version at all: not a Quillan envelope. */
    m = wire_codec_unpack(WIRE_PROTOCOL_REWARD, "", 0, 1 << 20, &e);
    cr_assert_null(m);
    cr_assert_eq(e.code, QERR_VERSION);
    cr_assert_not_null(strstr(e.msg, "reward protocol version 0"), "%s", e.msg);
}

Test(proto, body_of_another_protocol_is_refused) {
    wire_buf_t b;
    pack_body(QUILLAN__ENVELOPE__BODY_CHUNK_REQUEST, WIRE_PROTOCOL_WEIGHTS, &b);
    qerr_t e;
    /* Versions are all 1 today, so only the body tells the protocols apart. */
    wire_msg_t *m = wire_codec_unpack(WIRE_PROTOCOL_DISPATCH, b.data, b.len, 1 << 20, &e);
    cr_assert_null(m);
    cr_assert_eq(e.code, QERR_INVALID);
    cr_assert_str_eq(e.msg, "envelope body 'chunk_request' is not part of the dispatch protocol");
    wire_buf_free(&b);

    Quillan__Envelope env;
    fixture_envelope(&fx, QUILLAN__ENVELOPE__BODY_LOG_RECORD, &env);
    cr_assert_eq(wire_codec_pack(WIRE_PROTOCOL_REWARD, &hdr, &env, &b, &e), -1);
    cr_assert_eq(e.code, QERR_INVALID);
    cr_assert_null(b.data);
    fixture_envelope(&fx, QUILLAN__ENVELOPE__BODY_ERROR, &env);
    cr_assert_eq(wire_codec_pack(WIRE_PROTOCOL_LOG, &hdr, &env, &b, &e), -1);
}

/* A hostile TrajectoryGroup: n empty trajectories, 2 bytes each on the wire. */
static uint8_t *hostile_group(size_t n, size_t *len) {
    size_t inner = 2 * n;
    uint8_t *p = malloc(inner + 32);
    size_t pos = 0;
    p[pos++] = 0x08; /* protocol_version = 1 */
    p[pos++] = 0x01;
    p[pos++] = 0xBA; /* field 23 (trajectory_group), length-delimited */
    p[pos++] = 0x01;
    for (size_t v = inner;; v >>= 7) { /* length varint */
        p[pos++] = (uint8_t)((v & 0x7F) | (v >= 0x80 ? 0x80 : 0));
        if (v < 0x80)
            break;
    }
    for (size_t i = 0; i < n; i++) {
        p[pos++] = 0x32; /* field 6 (trajectories), length-delimited, empty */
        p[pos++] = 0x00;
    }
    *len = pos;
    return p;
}

Test(proto, decode_budget_stops_hostile_messages) {
    size_t len;
    uint8_t *p = hostile_group(512 * 1024, &len); /* 1 MiB on the wire */
    cr_assert_leq(len, (size_t)(1 << 20) + 16);
    qerr_t e;
    wire_msg_t *m = wire_codec_unpack(WIRE_PROTOCOL_DISPATCH, p, len, 16u << 20, &e);
    cr_assert_null(m, "1 MiB of empty sub-messages must not fit a 16 MiB budget");
    cr_assert_eq(e.code, QERR_NOMEM);
    cr_assert_not_null(strstr(e.msg, "decode budget of 16777216 bytes"), "%s", e.msg);
    m = wire_codec_unpack(WIRE_PROTOCOL_DISPATCH, p, len, WIRE_DECODE_BUDGET_DEFAULT, &e);
    cr_assert_null(m, "nor the default budget");
    cr_assert_eq(e.code, QERR_NOMEM);
    free(p);

    /* A smaller one decodes with room enough; its peak shows the amplification, and the
     * accounting is exact: one byte less of budget fails. */
    p = hostile_group(32 * 1024, &len); /* 64 KiB on the wire */
    m = wire_codec_unpack(WIRE_PROTOCOL_DISPATCH, p, len, (size_t)1 << 30, &e);
    cr_assert_not_null(m, "%s", e.msg);
    size_t peak = wire_msg_peak_bytes(m);
    cr_assert_gt(peak, 16 * len, "expected > 16x amplification, got %zu for %zu", peak, len);
    cr_assert_eq(wire_msg_envelope(m)->trajectory_group->n_trajectories, 32 * 1024);
    /* ...and the semantic validator refuses it. */
    cr_assert_eq(dispatch_codec_validate(wire_msg_envelope(m), &fx_dispatch_limits, &e), -1);
    cr_assert_not_null(strstr(e.msg, "trajectory_group."), "%s", e.msg);
    printf("%zu wire bytes of empty trajectories: %zu bytes of decoder memory\n", len, peak);
    wire_msg_destroy(&m);
    m = wire_codec_unpack(WIRE_PROTOCOL_DISPATCH, p, len, peak, &e);
    cr_assert_not_null(m, "%s", e.msg);
    wire_msg_destroy(&m);
    cr_assert_null(wire_codec_unpack(WIRE_PROTOCOL_DISPATCH, p, len, peak - 1, &e));
    cr_assert_eq(e.code, QERR_NOMEM);
    free(p);

    /* Budget smaller than one struct: fails, no leak (checked under ASan). */
    wire_buf_t b;
    pack_body(QUILLAN__ENVELOPE__BODY_TRAJECTORY_GROUP, WIRE_PROTOCOL_DISPATCH, &b);
    for (size_t budget = 0; budget < 4096; budget += 64) {
        m = wire_codec_unpack(WIRE_PROTOCOL_DISPATCH, b.data, b.len, budget, &e);
        if (m) {
            cr_assert_leq(wire_msg_peak_bytes(m), budget);
            wire_msg_destroy(&m);
        } else {
            cr_assert_eq(e.code, QERR_NOMEM, "%s", e.msg);
        }
    }
    wire_buf_free(&b);
}

Test(proto, trajectory_invariants) {
    const Quillan__Envelope__BodyCase G = QUILLAN__ENVELOPE__BODY_TRAJECTORY_GROUP;
    const wire_protocol_t D = WIRE_PROTOCOL_DISPATCH;
    fx.traj[1].n_behaviour_logprobs = FX_T - 1;
    expect_invalid(G, D, QERR_INVALID, "trajectory_group.trajectories[1].behaviour_logprobs");
    setup();
    fx.lp[0][1] = NAN;
    expect_invalid(G, D, QERR_RANGE, "trajectories[0].behaviour_logprobs[1]");
    setup();
    fx.traj[0].n_kept_counts = 1;
    expect_invalid(G, D, QERR_INVALID, "trajectories[0].kept_counts");
    setup();
    fx.kept[1][2] = 0;
    expect_invalid(G, D, QERR_RANGE, "trajectories[1].kept_counts[2]");
    setup();
    fx.comp[1][0] = FX_VOCAB;
    expect_invalid(G, D, QERR_RANGE, "trajectories[1].completion_tokens[0]: token 300");
    setup();
    fx.prompt[3] = FX_VOCAB + 5;
    expect_invalid(G, D, QERR_RANGE, "trajectory_group.prompt_tokens[3]");
    setup();
    fx.routing[0].n_micros--;
    expect_invalid(G, D, QERR_INVALID, "trajectories[0].routing.micros");
    setup();
    fx.experts[1][5] = 4;
    expect_invalid(G, D, QERR_RANGE, "trajectories[1].routing.experts[5]");
    setup();
    fx.routing[1].n_plan = 1;
    expect_invalid(G, D, QERR_INVALID, "trajectories[1].routing.plan");
    setup();
    fx.routing[0].num_layers = 3;
    expect_invalid(G, D, QERR_INVALID, "routing: shape");
    setup();
    fx.traj[0].reward = INFINITY;
    expect_invalid(G, D, QERR_RANGE, "trajectories[0].reward");
    setup();
    fx.traj[1].finish_reason = QUILLAN__FINISH_REASON__FINISH_REASON_UNSPECIFIED;
    expect_invalid(G, D, QERR_INVALID, "trajectories[1].finish_reason");
    setup();
    fx.traj[0].text = "bad \xc0\xaf utf-8";
    /* The sender refuses it; a peer that sends it anyway is refused on receipt. */
    Quillan__Envelope env;
    fixture_envelope(&fx, G, &env);
    wire_buf_t b;
    qerr_t e;
    cr_assert_eq(wire_codec_pack(D, &hdr, &env, &b, &e), -1);
    cr_assert_str_eq(e.msg, "envelope.trajectory_group.trajectories[0].text is not valid UTF-8");
    env.protocol_version = 1;
    env.sender_id = "x";
    b.len = protobuf_c_message_get_packed_size(&env.base);
    b.data = malloc(b.len);
    protobuf_c_message_pack(&env.base, b.data);
    cr_assert_null(wire_codec_unpack(D, b.data, b.len, 1 << 20, &e));
    cr_assert_str_eq(e.msg, "envelope.trajectory_group.trajectories[0].text is not valid UTF-8");
    wire_buf_free(&b);
}

Test(proto, group_and_request_invariants) {
    const wire_protocol_t D = WIRE_PROTOCOL_DISPATCH;
    fx.group.n_trajectories = 0;
    expect_invalid(QUILLAN__ENVELOPE__BODY_TRAJECTORY_GROUP, D, QERR_RANGE,
                   "trajectory_group.trajectories: group size 0");
    setup();
    fx.group.sampling = NULL;
    expect_invalid(QUILLAN__ENVELOPE__BODY_TRAJECTORY_GROUP, D, QERR_INVALID,
                   "trajectory_group.sampling is missing");
    setup();
    fx.group.lease_id = 0;
    expect_invalid(QUILLAN__ENVELOPE__BODY_TRAJECTORY_GROUP, D, QERR_INVALID, "lease_id");
    setup();
    fx.rollout.group_size = 9;
    expect_invalid(QUILLAN__ENVELOPE__BODY_LEASE, D, QERR_RANGE,
                   "lease.requests[0].group_size: group size 9");
    setup();
    fx.sampling.top_p = 1.5f;
    expect_invalid(QUILLAN__ENVELOPE__BODY_LEASE, D, QERR_RANGE,
                   "lease.requests[0].sampling.top_p");
    setup();
    fx.stop[0] = FX_VOCAB;
    expect_invalid(QUILLAN__ENVELOPE__BODY_LEASE, D, QERR_RANGE, "sampling.stop_tokens[0]");
    setup();
    fx.sampling.max_new_tokens = 9;
    expect_invalid(QUILLAN__ENVELOPE__BODY_LEASE, D, QERR_RANGE, "max_new_tokens 9");
    setup();
    fx.ack.status = QUILLAN__ACK_STATUS__ACK_STATUS_UNSPECIFIED;
    expect_invalid(QUILLAN__ENVELOPE__BODY_ACK, D, QERR_INVALID, "ack.status");
    setup();
    fx.work.worker_id = "";
    expect_invalid(QUILLAN__ENVELOPE__BODY_WORK_REQUEST, D, QERR_INVALID, "worker_id");
    setup();
    fx.error.code = QUILLAN__ERROR_CODE__ERROR_CODE_UNSPECIFIED;
    expect_invalid(QUILLAN__ENVELOPE__BODY_ERROR, WIRE_PROTOCOL_REWARD, QERR_INVALID, "error.code");
}

Test(proto, weights_invariants) {
    const wire_protocol_t W = WIRE_PROTOCOL_WEIGHTS;
    fx.chunk_reply.index = 4;
    expect_invalid(QUILLAN__ENVELOPE__BODY_CHUNK_REPLY, W, QERR_RANGE,
                   "chunk_reply.index 4 is not below chunk_count 4");
    setup();
    fx.info.chunk_count = 3;
    expect_invalid(QUILLAN__ENVELOPE__BODY_SNAPSHOT_INFO, W, QERR_INVALID,
                   "snapshot_info.chunk_count 3");
    setup();
    fx.info.digest.len = 16;
    expect_invalid(QUILLAN__ENVELOPE__BODY_SNAPSHOT_INFO, W, QERR_INVALID, "digest (16 bytes)");
    setup();
    fx.tensor.bytes = 185;
    expect_invalid(QUILLAN__ENVELOPE__BODY_SNAPSHOT_INFO, W, QERR_RANGE,
                   "snapshot_info.tensors[0]");
    setup();
    fx.info.chunk_size = FX_CHUNK + 1;
    expect_invalid(QUILLAN__ENVELOPE__BODY_SNAPSHOT_INFO, W, QERR_RANGE, "chunk_size");
    setup();
    fx.info.base_version = 3;
    expect_invalid(QUILLAN__ENVELOPE__BODY_SNAPSHOT_INFO, W, QERR_INVALID, "base_version");

    /* The payload frame must match chunk_reply.size, and only a ChunkReply carries one. */
    setup();
    Quillan__Envelope env;
    qerr_t e;
    fixture_envelope(&fx, QUILLAN__ENVELOPE__BODY_CHUNK_REPLY, &env);
    cr_assert_eq(weights_codec_validate(&env, 9, &fx_weights_limits, &e), -1);
    cr_assert_not_null(strstr(e.msg, "payload frame has 9 bytes"), "%s", e.msg);
    fixture_envelope(&fx, QUILLAN__ENVELOPE__BODY_CHUNK_REQUEST, &env);
    cr_assert_eq(weights_codec_validate(&env, 1, &fx_weights_limits, &e), -1);

    /* Against its SnapshotInfo: the last chunk holds the remainder. */
    cr_assert_eq(weights_codec_chunk_check(&fx.chunk_reply, &fx.info, &e), 0, "%s", e.msg);
    fx.chunk_reply.size = FX_CHUNK;
    cr_assert_eq(weights_codec_chunk_check(&fx.chunk_reply, &fx.info, &e), -1);
    fx.chunk_reply.index = 0;
    cr_assert_eq(weights_codec_chunk_check(&fx.chunk_reply, &fx.info, &e), 0, "%s", e.msg);
    fx.chunk_reply.version = 2;
    cr_assert_eq(weights_codec_chunk_check(&fx.chunk_reply, &fx.info, &e), -1);
}

Test(proto, reward_invariants) {
    const wire_protocol_t R = WIRE_PROTOCOL_REWARD;
    fx.score.score = NAN;
    expect_invalid(QUILLAN__ENVELOPE__BODY_REWARD_RESPONSE, R, QERR_RANGE,
                   "reward_response.scores[0].score is not finite");
    setup();
    fx.reward_resp.error = "scorer crashed";
    expect_invalid(QUILLAN__ENVELOPE__BODY_REWARD_RESPONSE, R, QERR_INVALID, "error is set");
    setup();
    fx.reward_req.n_samples = 0;
    expect_invalid(QUILLAN__ENVELOPE__BODY_REWARD_REQUEST, R, QERR_RANGE, "0 samples");
    setup();
    fx.sample.finish_reason = 7;
    expect_invalid(QUILLAN__ENVELOPE__BODY_REWARD_REQUEST, R, QERR_INVALID,
                   "samples[0].finish_reason 7");
    setup();
    qerr_t e;
    cr_assert_eq(reward_codec_response_check(&fx.reward_resp, &fx.reward_req, &e), 0);
    fx.reward_resp.request_id = 98;
    cr_assert_eq(reward_codec_response_check(&fx.reward_resp, &fx.reward_req, &e), -1);
    fx.reward_resp.request_id = 99;
    fx.reward_resp.n_scores = 0;
    cr_assert_eq(reward_codec_response_check(&fx.reward_resp, &fx.reward_req, &e), -1);
    cr_assert_not_null(strstr(e.msg, "0 entries for 1 samples"), "%s", e.msg);
}

Test(proto, utf8_validator) {
    cr_assert(wire_utf8_valid("plain", 5));
    cr_assert(wire_utf8_valid("\xe2\x82\xac \xf0\x9f\x98\x80", 8));
    cr_assert_not(wire_utf8_valid("\xc0\xaf", 2));         /* overlong '/' */
    cr_assert_not(wire_utf8_valid("\xed\xa0\x80", 3));     /* surrogate */
    cr_assert_not(wire_utf8_valid("\xf4\x90\x80\x80", 4)); /* past U+10FFFF */
    cr_assert_not(wire_utf8_valid("\xe2\x82", 2));         /* truncated */
    cr_assert_not(wire_utf8_valid("\xff", 1));
}

Test(proto, peek_rejects_garbage) {
    uint32_t v;
    qerr_t e;
    const uint8_t trunc_len[] = {0x08, 0x01, 0x12, 0x05, 'a'};
    cr_assert_eq(wire_codec_peek_version(trunc_len, sizeof trunc_len, &v, &e), -1);
    cr_assert_eq(e.code, QERR_PARSE);
    const uint8_t long_varint[] = {0x08, 0xff, 0xff, 0xff, 0xff, 0xff,
                                   0xff, 0xff, 0xff, 0xff, 0xff, 0x01};
    cr_assert_eq(wire_codec_peek_version(long_varint, sizeof long_varint, &v, &e), -1);
    const uint8_t group[] = {0x0B};
    cr_assert_eq(wire_codec_peek_version(group, sizeof group, &v, &e), -1);
}
