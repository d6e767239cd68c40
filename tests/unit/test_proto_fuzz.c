/* Fuzz-style robustness of every decoder: random bytes, truncated valid messages and bit-flipped
 * valid messages must each give a clean error or a valid message, never a crash or a leak
 * (CI also runs this under ASan+UBSan). Deterministic: a fixed-seed counter RNG. */
#include "test_proto_fixtures.h"

#include "rng.h"

#include <criterion/criterion.h>
#include <stdlib.h>
#include <string.h>

#define FUZZ_CASES 10000
#define FUZZ_MAX_RANDOM_LEN 512
/* A small budget keeps hostile inputs cheap and exercises the allocator's failure path. */
#define FUZZ_BUDGET ((size_t)256 << 10)

static fixture_t fx;
static const wire_header_t hdr = {"fuzz", 1, 1};

typedef struct {
    uint64_t ok, failed;
    uint64_t by_code[QERR_COUNT];
} tally_t;

/* Feeds data to the decoder of every protocol and checks the outcome is clean. */
static void feed_all(const uint8_t *data, size_t len, size_t payload_len, tally_t *t) {
    for (int p = 0; p < WIRE_PROTOCOL_COUNT; p++) {
        qerr_t e;
        qerr_clear(&e);
        wire_msg_t *m = fixture_decode((wire_protocol_t)p, data, len, payload_len, FUZZ_BUDGET, &e);
        if (m) {
            const Quillan__Envelope *env = wire_msg_envelope(m);
            cr_assert(wire_body_allowed((wire_protocol_t)p, env->body_case));
            cr_assert_eq(env->protocol_version, wire_protocol_version((wire_protocol_t)p));
            cr_assert_eq(fixture_validate((wire_protocol_t)p, env, payload_len, &e), 0);
            wire_msg_destroy(&m);
            t->ok++;
        } else {
            cr_assert(e.code > QERR_OK && e.code < QERR_COUNT, "a failure must set a code");
            cr_assert_neq(e.msg[0], '\0', "a failure must say why");
            t->by_code[e.code]++;
            t->failed++;
        }
    }
}

/* The packed bytes of every fixture body, built once. */
static wire_buf_t valid[Q_ARRAY_LEN(fx_bodies)];

static void setup(void) {
    fixture_init(&fx);
    for (size_t i = 0; i < Q_ARRAY_LEN(fx_bodies); i++) {
        Quillan__Envelope env;
        fixture_envelope(&fx, fx_bodies[i].body, &env);
        qerr_t e;
        cr_assert_eq(wire_codec_pack(fx_bodies[i].protocol, &hdr, &env, &valid[i], &e), 0, "%s",
                     e.msg);
    }
}

static void teardown(void) {
    for (size_t i = 0; i < Q_ARRAY_LEN(fx_bodies); i++)
        wire_buf_free(&valid[i]);
}

TestSuite(proto_fuzz, .init = setup, .fini = teardown);

Test(proto_fuzz, random_bytes) {
    rng_stream_t r;
    rng_stream_init(&r, 0x46555A5A, 1, 0);
    uint8_t buf[FUZZ_MAX_RANDOM_LEN];
    tally_t t = {0};
    for (int i = 0; i < FUZZ_CASES; i++) {
        size_t len = (size_t)(rng_stream_next_u64(&r) % (FUZZ_MAX_RANDOM_LEN + 1));
        for (size_t k = 0; k < len; k++)
            buf[k] = (uint8_t)rng_stream_next_u64(&r);
        /* Half start with "protocol_version = 1" so they reach the protobuf decoder instead of
         * stopping at the version check. */
        if ((i & 1) && len >= 2) {
            buf[0] = 0x08;
            buf[1] = 0x01;
        }
        feed_all(buf, len, (size_t)(rng_stream_next_u64(&r) % 3), &t);
    }
    cr_assert_eq(t.ok + t.failed, (uint64_t)FUZZ_CASES * WIRE_PROTOCOL_COUNT);
    cr_assert_gt(t.by_code[QERR_PARSE], 0, "some random inputs must reach the decoder");
    cr_assert_gt(t.by_code[QERR_VERSION], 0);
}

Test(proto_fuzz, truncated_valid_messages) {
    rng_stream_t r;
    rng_stream_init(&r, 0x46555A5A, 2, 0);
    tally_t t = {0};
    for (int i = 0; i < FUZZ_CASES; i++) {
        size_t which = (size_t)(rng_stream_next_u64(&r) % Q_ARRAY_LEN(fx_bodies));
        const wire_buf_t *v = &valid[which];
        size_t len = (size_t)(rng_stream_next_u64(&r) % v->len); /* strictly shorter */
        /* An exact-size heap copy, so ASan sees any read past the end. */
        uint8_t *copy = malloc(len ? len : 1);
        memcpy(copy, v->data, len);
        feed_all(copy, len, fixture_payload_len(&fx, fx_bodies[which].body), &t);
        free(copy);
    }
    cr_assert_eq(t.ok + t.failed, (uint64_t)FUZZ_CASES * WIRE_PROTOCOL_COUNT);
    cr_assert_gt(t.failed, 0);
}

Test(proto_fuzz, bit_flipped_valid_messages) {
    rng_stream_t r;
    rng_stream_init(&r, 0x46555A5A, 3, 0);
    tally_t t = {0};
    for (int i = 0; i < FUZZ_CASES; i++) {
        size_t which = (size_t)(rng_stream_next_u64(&r) % Q_ARRAY_LEN(fx_bodies));
        const wire_buf_t *v = &valid[which];
        uint8_t *copy = malloc(v->len);
        memcpy(copy, v->data, v->len);
        int flips = 1 + (int)(rng_stream_next_u64(&r) % 4);
        for (int k = 0; k < flips; k++) {
            uint64_t x = rng_stream_next_u64(&r);
            copy[x % v->len] ^= (uint8_t)(1u << ((x >> 32) % 8));
        }
        feed_all(copy, v->len, fixture_payload_len(&fx, fx_bodies[which].body), &t);
        free(copy);
    }
    cr_assert_gt(t.ok, 0, "some flips leave a valid message");
    cr_assert_gt(t.failed, 0);
}
