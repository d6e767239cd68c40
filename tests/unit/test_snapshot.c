/* Snapshot store (learner/snapshot_store.h): digests, delta encode (store) vs apply (worker)
 * round trips, changed fractions on known edits, eviction and the full-snapshot interval; and
 * one in-process pull through the weights server and the snapshot client. */
#include "snapshot_client.h"
#include "snapshot_store.h"
#include "weights_server.h"

#include <criterion/criterion.h>
#include <pthread.h>
#include <sodium.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <zmq.h>

#define BLOCK 256u

static uint64_t rng_state;

static uint8_t rand_byte(void) {
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return (uint8_t)(rng_state >> 24);
}

static uint8_t *random_buf(size_t len, uint64_t seed) {
    rng_state = seed;
    uint8_t *b = malloc(len);
    cr_assert(b);
    for (size_t i = 0; i < len; i++)
        b[i] = rand_byte();
    return b;
}

/* Changes n_bytes bytes (each to a different value) inside block `block` of buf. */
static void block_edit(uint8_t *buf, size_t len, size_t block, size_t n_bytes) {
    size_t off = block * BLOCK;
    cr_assert(off + n_bytes <= len);
    for (size_t i = 0; i < n_bytes; i++)
        buf[off + i] ^= 0x5a;
}

static snapshot_store_t *store_new(int kept, int interval) {
    snapshot_store_options_t o;
    snapshot_store_options_init(&o);
    o.snapshots_kept = kept;
    o.full_snapshot_interval = interval;
    o.block_bytes = BLOCK;
    qerr_t err;
    snapshot_store_t *s = snapshot_store_new(&o, &err);
    cr_assert(s, "%s", err.msg);
    return s;
}

Test(snapshot_store, digest_and_frozen_copy) {
    size_t len = 10000;
    uint8_t *buf = random_buf(len, 1);
    snapshot_store_t *s = store_new(3, 10);
    qerr_t err;
    cr_assert_eq(snapshot_store_publish(s, 1, buf, len, 1, NULL, 0, NULL, &err), 0, "%s", err.msg);
    uint8_t want[32];
    crypto_generichash(want, 32, buf, len, NULL, 0);
    buf[0] ^= 1; /* the store holds a copy */
    snapshot_entry_t *e = snapshot_store_get(s, 0);
    cr_assert(e);
    size_t n = 0;
    const uint8_t *data = snapshot_entry_data(e, &n);
    cr_assert_eq(n, len);
    cr_assert_eq(memcmp(snapshot_entry_digest(e), want, 32), 0);
    cr_assert_eq(data[0], (uint8_t)(buf[0] ^ 1));
    cr_assert_eq(memcmp(data + 1, buf + 1, len - 1), 0);
    cr_assert_eq(snapshot_entry_version(e), 1);
    cr_assert_eq(snapshot_entry_is_old_policy(e), 1);
    cr_assert_null(snapshot_entry_delta(e, NULL));
    cr_assert_eq(snapshot_entry_delta_base(e), 0);
    snapshot_entry_unref(&e);
    cr_assert_null(e);
    snapshot_store_destroy(&s);
    cr_assert_null(s);
    free(buf);
}

Test(snapshot_store, delta_round_trip_equals_full_bytes) {
    /* Not a multiple of the block: the last block is partial and edited too. */
    size_t len = 100 * BLOCK + 37;
    uint8_t *base = random_buf(len, 2);
    uint8_t *cur = malloc(len);
    memcpy(cur, base, len);
    size_t blocks[] = {0, 1, 2, 7, 50, 51, 99, 100}; /* runs of 3, 1, 2, 2 (100 is partial) */
    size_t bytes_per[] = {1, BLOCK, 3, 10, 20, 1, BLOCK, 37};
    size_t want_bytes = 0;
    for (size_t i = 0; i < Q_ARRAY_LEN(blocks); i++) {
        block_edit(cur, len, blocks[i], bytes_per[i]);
        want_bytes += bytes_per[i];
    }
    qerr_t err;
    size_t dlen = 0;
    uint64_t cb = 0, cbytes = 0;
    uint8_t *delta = snapshot_delta_encode(base, cur, len, BLOCK, &dlen, &cb, &cbytes, &err);
    cr_assert(delta, "%s", err.msg);
    cr_assert_eq(cb, Q_ARRAY_LEN(blocks));
    cr_assert_eq(cbytes, want_bytes);
    /* Header + 4 runs of one-byte varints + 7 whole blocks + the 37-byte tail. */
    cr_assert_eq(dlen, SNAPSHOT_DELTA_HEADER_BYTES + 4 * 2 + 7 * BLOCK + 37);
    uint8_t *out = malloc(len);
    cr_assert_eq(snapshot_delta_apply(base, len, delta, dlen, out, &err), 0, "%s", err.msg);
    cr_assert_eq(memcmp(out, cur, len), 0);
    /* In place onto a copy of the base, as a worker may do. */
    memcpy(out, base, len);
    cr_assert_eq(snapshot_delta_apply(out, len, delta, dlen, out, &err), 0, "%s", err.msg);
    cr_assert_eq(memcmp(out, cur, len), 0);
    free(delta);
    free(out);
    free(base);
    free(cur);
}

Test(snapshot_store, identical_buffers_give_an_empty_delta) {
    size_t len = 4096;
    uint8_t *a = random_buf(len, 3);
    qerr_t err;
    size_t dlen = 0;
    uint64_t cb = 1, cbytes = 1;
    uint8_t *delta = snapshot_delta_encode(a, a, len, BLOCK, &dlen, &cb, &cbytes, &err);
    cr_assert(delta);
    cr_assert_eq(dlen, SNAPSHOT_DELTA_HEADER_BYTES);
    cr_assert_eq(cb, 0);
    cr_assert_eq(cbytes, 0);
    uint8_t *out = malloc(len);
    cr_assert_eq(snapshot_delta_apply(a, len, delta, dlen, out, &err), 0, "%s", err.msg);
    cr_assert_eq(memcmp(out, a, len), 0);
    free(out);
    free(delta);
    free(a);
}

/* A corrupted delta is refused and the output left untouched. */
static void apply_refused(const uint8_t *base, size_t len, const uint8_t *delta, size_t dlen,
                          const char *what) {
    uint8_t *out = malloc(len);
    memset(out, 0xee, len);
    qerr_t err = {0};
    cr_assert_eq(snapshot_delta_apply(base, len, delta, dlen, out, &err), -1, "%s accepted", what);
    cr_assert_neq(err.msg[0], '\0');
    for (size_t i = 0; i < len; i++)
        cr_assert_eq(out[i], 0xee, "%s: out written at %zu", what, i);
    free(out);
}

Test(snapshot_store, malformed_deltas_are_refused) {
    size_t len = 20 * BLOCK;
    uint8_t *base = random_buf(len, 4);
    uint8_t *cur = malloc(len);
    memcpy(cur, base, len);
    block_edit(cur, len, 3, 5);
    block_edit(cur, len, 19, BLOCK);
    qerr_t err;
    size_t dlen = 0;
    uint8_t *delta = snapshot_delta_encode(base, cur, len, BLOCK, &dlen, NULL, NULL, &err);
    cr_assert(delta);
    uint8_t *bad = malloc(dlen + 1);

    memcpy(bad, delta, dlen);
    bad[0] = 'X';
    apply_refused(base, len, bad, dlen, "bad magic");
    apply_refused(base, len, delta, dlen - 1, "truncated data");
    memcpy(bad, delta, dlen);
    bad[dlen] = 0;
    apply_refused(base, len, bad, dlen + 1, "trailing byte");
    apply_refused(base, len - 1, delta, dlen, "base of another size");
    memcpy(bad, delta, dlen);
    bad[4] = 100; /* block_bytes 100: not a power of two */
    apply_refused(base, len, bad, dlen, "odd block size");
    memcpy(bad, delta, dlen);
    bad[SNAPSHOT_DELTA_HEADER_BYTES + 2] = 30; /* second run's gap leaves the 20 blocks */
    apply_refused(base, len, bad, dlen, "run out of range");
    memcpy(bad, delta, dlen);
    bad[SNAPSHOT_DELTA_HEADER_BYTES + 1] = 0; /* a run of zero blocks */
    apply_refused(base, len, bad, dlen, "empty run");
    memcpy(bad, delta, dlen);
    bad[17] = 0xff; /* n_runs far beyond the payload */
    apply_refused(base, len, bad, dlen, "run count");
    apply_refused(base, len, delta, 10, "header cut");
    free(bad);
    free(delta);
    free(base);
    free(cur);
}

/* snapshot/changed_frac counts only the tensors' bytes: a header that names the version changes
 * every publish, and must not make an unchanged policy look changed. */
Test(snapshot_store, changed_data_frac_leaves_the_header_out) {
    size_t len = 16 * BLOCK;
    uint8_t *buf = random_buf(len, 6);
    const uint64_t shape_a[1] = {4 * BLOCK}, shape_b[1] = {8 * BLOCK};
    snapshot_tensor_t t[2] = {
        {.name = "a",
         .qtype = "u8",
         .shape = shape_a,
         .n_dims = 1,
         .offset = 2 * BLOCK,
         .bytes = 4 * BLOCK},
        {.name = "b",
         .qtype = "u8",
         .shape = shape_b,
         .n_dims = 1,
         .offset = 8 * BLOCK,
         .bytes = 8 * BLOCK},
    };
    snapshot_store_t *s = store_new(3, 10);
    qerr_t err;
    snapshot_publish_stats_t st;
    cr_assert_eq(snapshot_store_publish(s, 1, buf, len, 0, t, 2, &st, &err), 0, "%s", err.msg);
    cr_assert_eq(st.changed_data_frac, 1.0);
    buf[0] ^= 1; /* the "header" */
    cr_assert_eq(snapshot_store_publish(s, 2, buf, len, 0, t, 2, &st, &err), 0, "%s", err.msg);
    cr_assert_eq(st.changed_blocks, 1);
    cr_assert_eq(st.changed_data_frac, 0.0);
    buf[3 * BLOCK] ^= 1;      /* in tensor a */
    buf[15 * BLOCK + 7] ^= 1; /* in tensor b */
    buf[7 * BLOCK] ^= 1;      /* between the tensors */
    cr_assert_eq(snapshot_store_publish(s, 3, buf, len, 0, t, 2, &st, &err), 0, "%s", err.msg);
    cr_assert_float_eq(st.changed_data_frac, 2.0 / (12.0 * BLOCK), 1e-15);
    snapshot_store_destroy(&s);
    free(buf);
}

Test(snapshot_store, changed_frac_on_known_edits) {
    size_t n_blocks = 400, len = n_blocks * BLOCK;
    uint8_t *buf = random_buf(len, 5);
    snapshot_store_t *s = store_new(3, 10);
    qerr_t err;
    snapshot_publish_stats_t st;
    cr_assert_eq(snapshot_store_publish(s, 1, buf, len, 0, NULL, 0, &st, &err), 0, "%s", err.msg);
    cr_assert_eq(st.changed_frac, 1.0);
    cr_assert_eq(st.delta_bytes, 0);
    cr_assert_eq(st.sync_bytes, len);
    /* 8 blocks of 400 (2%), 100 bytes each. */
    for (size_t i = 0; i < 8; i++)
        block_edit(buf, len, 17 + 41 * i, 100);
    cr_assert_eq(snapshot_store_publish(s, 2, buf, len, 0, NULL, 0, &st, &err), 0, "%s", err.msg);
    cr_assert_eq(st.blocks, n_blocks);
    cr_assert_eq(st.changed_blocks, 8);
    cr_assert_float_eq(st.changed_frac, 8.0 / 400.0, 1e-12);
    cr_assert_eq(st.changed_bytes, 800);
    cr_assert_float_eq(st.changed_bytes_frac, 800.0 / (double)len, 1e-12);
    cr_assert_eq(st.delta_base, 1);
    cr_assert_eq(st.sync_bytes, st.delta_bytes);
    cr_assert_eq(st.delta_bytes, SNAPSHOT_DELTA_HEADER_BYTES + 8 * 2 + 8 * BLOCK);
    snapshot_publish_stats_t last;
    snapshot_store_last_stats(s, &last);
    cr_assert_eq(last.version, 2);
    cr_assert_eq(last.changed_blocks, 8);

    /* The entry's delta applied to v1 gives v2, and its digest is the payload's. */
    snapshot_entry_t *e1 = snapshot_store_get(s, 1), *e2 = snapshot_store_get(s, 2);
    size_t dlen = 0, l1 = 0;
    const uint8_t *delta = snapshot_entry_delta(e2, &dlen);
    cr_assert(delta);
    uint8_t dd[32];
    crypto_generichash(dd, 32, delta, dlen, NULL, 0);
    cr_assert_eq(memcmp(dd, snapshot_entry_delta_digest(e2), 32), 0);
    const uint8_t *d1 = snapshot_entry_data(e1, &l1);
    uint8_t *out = malloc(len);
    cr_assert_eq(snapshot_delta_apply(d1, l1, delta, dlen, out, &err), 0, "%s", err.msg);
    cr_assert_eq(memcmp(out, buf, len), 0);
    free(out);
    snapshot_entry_unref(&e1);
    snapshot_entry_unref(&e2);

    /* Unchanged bytes: no change at all (lr 0 gives identical snapshots). */
    cr_assert_eq(snapshot_store_publish(s, 3, buf, len, 0, NULL, 0, &st, &err), 0, "%s", err.msg);
    cr_assert_eq(st.changed_blocks, 0);
    cr_assert_eq(st.changed_frac, 0.0);
    cr_assert_eq(st.delta_bytes, SNAPSHOT_DELTA_HEADER_BYTES);
    snapshot_store_destroy(&s);
    free(buf);
}

Test(snapshot_store, full_interval_resize_and_large_changes_skip_the_delta) {
    size_t len = 64 * BLOCK;
    uint8_t *buf = random_buf(len, 6);
    snapshot_store_t *s = store_new(8, 3);
    qerr_t err;
    snapshot_publish_stats_t st;
    cr_assert_eq(snapshot_store_publish(s, 1, buf, len, 0, NULL, 0, &st, &err), 0);
    block_edit(buf, len, 5, 1);
    cr_assert_eq(snapshot_store_publish(s, 2, buf, len, 0, NULL, 0, &st, &err), 0);
    cr_assert_eq(st.delta_base, 1);
    block_edit(buf, len, 6, 1);
    cr_assert_eq(snapshot_store_publish(s, 3, buf, len, 0, NULL, 0, &st, &err), 0);
    cr_assert_eq(st.delta_base, 0, "3 %% full_snapshot_interval 3 == 0: full only");
    cr_assert_eq(st.changed_blocks, 1, "changed_frac is still measured");
    block_edit(buf, len, 7, 1);
    cr_assert_eq(snapshot_store_publish(s, 4, buf, len, 0, NULL, 0, &st, &err), 0);
    cr_assert_eq(st.delta_base, 3);
    /* Every block changed: the delta would be larger than the buffer. */
    for (size_t i = 0; i < len; i++)
        buf[i] ^= 0xff;
    cr_assert_eq(snapshot_store_publish(s, 5, buf, len, 0, NULL, 0, &st, &err), 0);
    cr_assert_eq(st.delta_base, 0);
    cr_assert_eq(st.changed_frac, 1.0);
    cr_assert_eq(st.sync_bytes, len);
    /* Another size: no delta. */
    cr_assert_eq(snapshot_store_publish(s, 7, buf, len - 1, 0, NULL, 0, &st, &err), 0);
    cr_assert_eq(st.delta_base, 0);
    cr_assert_eq(st.changed_frac, 1.0);
    snapshot_store_destroy(&s);
    free(buf);
}

Test(snapshot_store, eviction_keeps_the_last_versions_and_held_entries) {
    size_t len = 3000;
    uint8_t *buf = random_buf(len, 7);
    snapshot_store_t *s = store_new(2, 10);
    qerr_t err;
    cr_assert_eq(snapshot_store_publish(s, 1, buf, len, 0, NULL, 0, NULL, &err), 0);
    snapshot_entry_t *held = snapshot_store_get(s, 1);
    uint8_t d1[32];
    memcpy(d1, snapshot_entry_digest(held), 32);
    buf[5] ^= 1;
    cr_assert_eq(snapshot_store_publish(s, 2, buf, len, 0, NULL, 0, NULL, &err), 0);
    buf[6] ^= 1;
    cr_assert_eq(snapshot_store_publish(s, 3, buf, len, 0, NULL, 0, NULL, &err), 0);
    cr_assert_null(snapshot_store_get(s, 1), "v1 is evicted with snapshots_kept 2");
    snapshot_entry_t *e = snapshot_store_get(s, 2);
    cr_assert(e);
    snapshot_entry_unref(&e);
    e = snapshot_store_get(s, 0);
    cr_assert_eq(snapshot_entry_version(e), 3);
    snapshot_entry_unref(&e);
    cr_assert_null(snapshot_store_get(s, 4));
    cr_assert_eq(snapshot_store_latest(s), 3);
    /* The reference taken before eviction still reads v1's bytes. */
    size_t n = 0;
    const uint8_t *data = snapshot_entry_data(held, &n);
    uint8_t d[32];
    crypto_generichash(d, 32, data, n, NULL, 0);
    cr_assert_eq(memcmp(d, d1, 32), 0);
    snapshot_entry_unref(&held);
    snapshot_store_destroy(&s);
    free(buf);
}

Test(snapshot_store, bad_publishes_are_refused) {
    uint8_t buf[512] = {0};
    snapshot_store_t *s = store_new(2, 10);
    qerr_t err;
    cr_assert_eq(snapshot_store_publish(s, 0, buf, sizeof(buf), 0, NULL, 0, NULL, &err), -1);
    cr_assert_eq(err.code, QERR_INVALID);
    cr_assert_eq(snapshot_store_publish(s, 2, buf, sizeof(buf), 0, NULL, 0, NULL, &err), 0);
    cr_assert_eq(snapshot_store_publish(s, 2, buf, sizeof(buf), 0, NULL, 0, NULL, &err), -1);
    cr_assert(strstr(err.msg, "not newer"), "%s", err.msg);
    cr_assert_eq(snapshot_store_publish(s, 3, buf, 0, 0, NULL, 0, NULL, &err), -1);
    uint64_t shape[] = {4, 64};
    snapshot_tensor_t t = {"w", "int4_g32", shape, 2, 300, 256};
    cr_assert_eq(snapshot_store_publish(s, 3, buf, sizeof(buf), 0, &t, 1, NULL, &err), -1);
    cr_assert(strstr(err.msg, "'w'"), "%s", err.msg);
    t.qtype = "";
    t.offset = 0;
    cr_assert_eq(snapshot_store_publish(s, 3, buf, sizeof(buf), 0, &t, 1, NULL, &err), -1);
    cr_assert_eq(snapshot_store_latest(s), 2);

    snapshot_store_options_t o;
    snapshot_store_options_init(&o);
    o.block_bytes = 300;
    cr_assert_null(snapshot_store_new(&o, &err));
    cr_assert_eq(err.code, QERR_RANGE);
    snapshot_store_options_init(&o);
    o.snapshots_kept = 0;
    cr_assert_null(snapshot_store_new(&o, &err));
    snapshot_store_destroy(&s);
}

/* ---- one pull in process: server on its own thread, client here ---- */

typedef struct {
    weights_server_t *server;
    atomic_int stop;
} serve_ctx_t;

static void *serve(void *arg) {
    serve_ctx_t *ctx = arg;
    while (!atomic_load(&ctx->stop)) {
        qerr_t err;
        if (weights_server_poll(ctx->server, 20, &err) < 0)
            break;
    }
    return NULL;
}

Test(snapshot_store, pull_through_server_and_client_with_tensors) {
    size_t len = 300000;
    uint8_t *buf = random_buf(len, 8);
    snapshot_store_t *store = store_new(3, 10);
    uint64_t sh_a[] = {16, 32}, sh_b[] = {1000};
    snapshot_tensor_t t[] = {{"blocks.0.w", "int4_g32", sh_a, 2, 0, 256},
                             {"embed.weight", "f32", sh_b, 1, 256, 4000}};
    qerr_t err;
    cr_assert_eq(snapshot_store_publish(store, 1, buf, len, 1, t, 2, NULL, &err), 0, "%s", err.msg);
    for (size_t i = 0; i < 5; i++)
        block_edit(buf, len, 10 + 97 * i, 3);
    cr_assert_eq(snapshot_store_publish(store, 2, buf, len, 0, t, 2, NULL, &err), 0);

    void *zctx = zmq_ctx_new();
    weights_server_options_t so;
    weights_server_options_init(&so);
    so.endpoint = "tcp://127.0.0.1:*";
    so.net.chunk_bytes = 16384;
    so.net.linger_ms = 0;
    serve_ctx_t ctx = {.server = weights_server_new(zctx, store, &so, &err)};
    cr_assert(ctx.server, "%s", err.msg);
    atomic_init(&ctx.stop, 0);
    pthread_t th;
    pthread_create(&th, NULL, serve, &ctx);

    snapshot_client_options_t co;
    snapshot_client_options_init(&co);
    co.endpoint = weights_server_endpoint(ctx.server);
    co.net.chunk_bytes = 16384;
    co.net.linger_ms = 0;
    co.request_timeout_ms = 500;
    snapshot_client_t *c = snapshot_client_new(zctx, &co, &err);
    cr_assert(c, "%s", err.msg);
    snapshot_t *v1 = snapshot_client_fetch(c, 1, NULL, 30000, &err);
    cr_assert(v1, "%s", err.msg);
    cr_assert_eq(snapshot_version(v1), 1);
    cr_assert_eq(snapshot_is_old_policy(v1), 1);
    cr_assert_eq(snapshot_tensor_count(v1), 2);
    const snapshot_client_tensor_t *te = snapshot_tensor_find(v1, "embed.weight");
    cr_assert(te);
    cr_assert_str_eq(te->qtype, "f32");
    cr_assert_eq(te->n_dims, 1);
    cr_assert_eq(te->shape[0], 1000);
    cr_assert_eq(te->offset, 256);
    cr_assert_eq(te->bytes, 4000);
    cr_assert_null(snapshot_tensor_find(v1, "nope"));

    snapshot_t *v2 = snapshot_client_fetch(c, 0, v1, 30000, &err);
    cr_assert(v2, "%s", err.msg);
    size_t n = 0;
    const uint8_t *data = snapshot_data(v2, &n);
    cr_assert_eq(n, len);
    cr_assert_eq(memcmp(data, buf, len), 0);
    cr_assert_eq(snapshot_version(v2), 2);
    snapshot_client_stats_t cs;
    snapshot_client_stats(c, &cs);
    cr_assert_eq(cs.full_transfers, 1);
    cr_assert_eq(cs.delta_transfers, 1);
    cr_assert_eq(cs.fetched, 2);
    cr_assert_lt(cs.bytes, len + len / 10, "the second pull is a small delta");

    cr_assert_null(snapshot_client_fetch(c, 9, NULL, 30000, &err));
    cr_assert_eq(err.code, QERR_NOTFOUND, "%s", err.msg);

    /* References outlive the client; a second ref keeps v1 after the first is dropped. */
    snapshot_t *again = snapshot_ref(v1);
    snapshot_unref(&v1);
    cr_assert_null(v1);
    cr_assert_eq(snapshot_version(again), 1);
    snapshot_unref(&again);

    atomic_store(&ctx.stop, 1);
    pthread_join(th, NULL);
    weights_server_stats_t ss;
    weights_server_stats(ctx.server, &ss);
    cr_assert_eq(ss.delta_infos, 1);
    cr_assert_geq(ss.full_infos, 1);
    cr_assert_geq(ss.errors_sent, 1, "the unknown version was refused");
    cr_assert_eq(ss.malformed, 0);
    snapshot_client_destroy(&c);
    weights_server_destroy(&ctx.server);
    snapshot_unref(&v2);
    zmq_ctx_term(zctx);
    snapshot_store_destroy(&store);
    free(buf);
}
