/* Writes the binary seeds of tests/fuzz/corpus (run by make_seeds.sh): valid messages of every
 * body type per protocol, a safetensors image, a quantized policy of a small model, a snapshot
 * delta, a batcher state and a lease table state. Usage: make_seeds CORPUS_DIR. */
#include "../unit/test_proto_fixtures.h"
#include "fuzz_seed_config.h"
#include "model.h"
#include "qpolicy.h"
#include "safetensors.h"
#include "snapshot_store.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

static const char *corpus;

static void put(const char *target, const char *name, const void *prefix, size_t prefix_len,
                const void *data, size_t len) {
    char path[1024];
    snprintf(path, sizeof path, "%s/%s", corpus, target);
    mkdir(path, 0755);
    snprintf(path, sizeof path, "%s/%s/%s", corpus, target, name);
    FILE *f = fopen(path, "wb");
    if (f == NULL || fwrite(prefix, 1, prefix_len, f) != prefix_len ||
        fwrite(data, 1, len, f) != len || fclose(f) != 0) {
        fprintf(stderr, "make_seeds: cannot write %s\n", path);
        exit(1);
    }
}

static void fail(const qerr_t *e) {
    fprintf(stderr, "make_seeds: %s\n", e->msg);
    exit(1);
}

static void proto_seeds(void) {
    static fixture_t fx;
    fixture_init(&fx);
    static const char *const target[WIRE_PROTOCOL_COUNT] = {
        [WIRE_PROTOCOL_DISPATCH] = "fuzz_proto_dispatch",
        [WIRE_PROTOCOL_WEIGHTS] = "fuzz_proto_weights",
        [WIRE_PROTOCOL_REWARD] = "fuzz_proto_reward",
        [WIRE_PROTOCOL_LOG] = "fuzz_proto_log"};
    const wire_header_t hdr = {"seed", 1, 1};
    for (size_t i = 0; i < sizeof fx_bodies / sizeof fx_bodies[0]; i++) {
        Quillan__Envelope env;
        fixture_envelope(&fx, fx_bodies[i].body, &env);
        wire_buf_t buf = {0};
        qerr_t e;
        if (wire_codec_pack(fx_bodies[i].protocol, &hdr, &env, &buf, &e) != 0)
            fail(&e);
        size_t pl = fixture_payload_len(&fx, fx_bodies[i].body);
        uint8_t prefix[2] = {(uint8_t)pl, (uint8_t)(pl >> 8)};
        char name[64];
        snprintf(name, sizeof name, "%s.bin", wire_body_name(fx_bodies[i].body));
        put(target[fx_bodies[i].protocol], name, prefix, 2, buf.data, buf.len);
        wire_buf_free(&buf);
    }
}

static void safetensors_seed(void) {
    safetensors_writer_t *w = safetensors_writer_new();
    float a[6] = {1, 2, 3, 4, 5, 6};
    uint8_t b[4] = {1, 2, 3, 4};
    uint64_t sa[2] = {2, 3}, sb[1] = {4};
    void *out = NULL;
    size_t len = 0;
    qerr_t e;
    if (safetensors_writer_add(w, "a", SAFETENSORS_F32, 2, sa, a, &e) != 0 ||
        safetensors_writer_add(w, "b", SAFETENSORS_U8, 1, sb, b, &e) != 0 ||
        safetensors_writer_set_metadata(w, "format", "seed", &e) != 0 ||
        safetensors_writer_serialize(w, &out, &len, &e) != 0)
        fail(&e);
    put("fuzz_safetensors", "two_tensors.safetensors", NULL, 0, out, len);
    free(out);
    safetensors_writer_destroy(&w);
}

static void qpolicy_seed(void) {
    model_config_t c;
    qerr_t e;
    if (model_config_preset("tiny", &c, &e) != 0)
        fail(&e);
    /* Small enough for a seed (libFuzzer's -max_len), every kind of tensor still present. */
    c.dim = 32;
    c.num_layers = 2;
    c.num_heads = 2;
    c.context = 32;
    c.overseer_hidden = 32;
    c.num_mini_moes = 2;
    c.top_k_minis = 1;
    c.num_experts_per_mini = 2;
    c.top_k_experts = 1;
    c.expert_hidden = 32;
    c.num_micros_per_mini = 4;
    c.top_k_micros = 2;
    c.diffusion_bits = 32;
    c.diffusion_width = 32;
    c.diffusion_blocks = 1;
    c.diffusion_ffn = 32;
    c.diffusion_time_dim = 8;
    c.diffusion_steps = 2;
    c.diffusion_layer = -1;
    model_t *m = model_new(&c, &e);
    qpolicy_t *q = m ? qpolicy_build(m, 1, &e) : NULL;
    if (q == NULL)
        fail(&e);
    size_t len;
    const void *bytes = qpolicy_bytes(q, &len);
    put("fuzz_qpolicy", "micro.qst", NULL, 0, bytes, len);
    qpolicy_destroy(&q);
    model_destroy(&m);
}

static void delta_seed(void) {
    enum { LEN = 2048 };
    uint8_t *buf = malloc(LEN);
    for (size_t i = 0; i < LEN; i++)
        buf[i] = (uint8_t)(i * 31 + 7); /* fuzz_snapshot_delta.c's base */
    snapshot_store_options_t so;
    snapshot_store_options_init(&so);
    qerr_t e;
    snapshot_store_t *s = snapshot_store_new(&so, &e);
    uint64_t shape[1] = {LEN};
    snapshot_tensor_t t = {"blob", "u8", shape, 1, 0, LEN};
    if (s == NULL || snapshot_store_publish(s, 1, buf, LEN, 0, &t, 1, NULL, &e) != 0)
        fail(&e);
    buf[100] ^= 0xff;
    buf[1500] ^= 0x0f;
    if (snapshot_store_publish(s, 2, buf, LEN, 0, &t, 1, NULL, &e) != 0)
        fail(&e);
    snapshot_entry_t *en = snapshot_store_get(s, 2);
    size_t dlen = 0;
    const uint8_t *d = en ? snapshot_entry_delta(en, &dlen) : NULL;
    if (d == NULL) {
        fprintf(stderr, "make_seeds: the store kept no delta\n");
        exit(1);
    }
    uint8_t prefix[2] = {LEN & 0xff, LEN >> 8};
    put("fuzz_snapshot_delta", "two_blocks.bin", prefix, 2, d, dlen);
    snapshot_entry_unref(&en);
    snapshot_store_destroy(&s);
    free(buf);
}

static void batcher_seed(void) {
    batcher_config_t cfg;
    fuzz_seed_batcher_config(&cfg);
    qerr_t e;
    batcher_t *b = batcher_new(&cfg, &e);
    if (b == NULL)
        fail(&e);
    int32_t prompt[3] = {256, 10, 20}, toks[2][3] = {{1, 2, 257}, {3, 257, 0}};
    float logp[3] = {-0.5f, -0.25f, -1.0f};
    for (uint64_t gid = 1; gid <= 2; gid++) {
        batcher_sample_t s[2] = {
            {.tokens = toks[0], .logp = logp, .len = 3, .has_reward = 1, .reward = 1.0},
            {.tokens = toks[1], .logp = logp, .len = 2, .has_reward = 1, .reward = 0.0}};
        batcher_group_in_t g = {.group_id = gid,
                                .version = 1,
                                .prompt = prompt,
                                .prompt_len = 3,
                                .samples = s,
                                .n_samples = 2};
        batcher_verdict_t v;
        if (batcher_add(b, &g, 1, &v, &e) != 0)
            fail(&e);
    }
    uint8_t *buf;
    size_t len;
    if (batcher_save(b, &buf, &len, &e) != 0)
        fail(&e);
    put("fuzz_batcher_load", "two_groups.bin", NULL, 0, buf, len);
    free(buf);
    batcher_destroy(&b);
}

static void lease_seed(void) {
    lease_table_options_t o;
    fuzz_seed_lease_options(&o);
    qerr_t e;
    lease_table_t *t = lease_table_new(&o, &e);
    if (t == NULL)
        fail(&e);
    lease_table_set_limit(t, 6);
    lease_grant_t g[6];
    size_t n = lease_table_grant(t, 1, 6, 0.0, 5.0, 1, g);
    lease_table_submit(t, g[0].lease_id, g[0].prompt_id, g[0].epoch, true, 1.0, NULL, NULL);
    lease_table_submit(t, g[1].lease_id, g[1].prompt_id, g[1].epoch, false, 1.0, NULL, NULL);
    lease_table_expire(t, 10.0);
    if (n > 2)
        lease_table_grant(t, 2, 2, 11.0, 5.0, 2, g);
    uint8_t *buf;
    size_t len;
    if (lease_table_save(t, &buf, &len, &e) != 0)
        fail(&e);
    put("fuzz_lease_restore", "mixed.bin", NULL, 0, buf, len);
    free(buf);
    lease_table_destroy(&t);
}

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: make_seeds CORPUS_DIR\n");
        return 2;
    }
    corpus = argv[1];
    mkdir(corpus, 0755);
    proto_seeds();
    safetensors_seed();
    qpolicy_seed();
    delta_seed();
    batcher_seed();
    lease_seed();
    return 0;
}
