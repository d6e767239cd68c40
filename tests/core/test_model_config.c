#include "qtest.h"

#include "model_config.h"

#include <string.h>

static model_config_t tiny(void) {
    model_config_t c;
    qerr_t err;
    cr_assert_eq(model_config_preset("tiny", &c, &err), 0);
    return c;
}

/* Validates c and asserts that it fails with a message starting with the key. */
static void assert_rejects(model_config_t c, const char *key) {
    qerr_t err = {0};
    cr_assert_eq(model_config_validate(&c, &err), -1, "%s should be rejected", key);
    size_t n = strlen(key);
    cr_assert(strncmp(err.msg, key, n) == 0 && err.msg[n] == ':',
              "message '%s' should start with '%s:'", err.msg, key);
}

Test(model_config, tiny_preset_matches_model_md) {
    model_config_t c = tiny();
    cr_assert_eq(c.vocab_size, 259);
    cr_assert_eq(c.dim, 128);
    cr_assert_eq(c.num_layers, 2);
    cr_assert_eq(c.num_heads, 4);
    cr_assert_eq(c.num_mini_moes, 4);
    cr_assert_eq(c.num_experts_per_mini, 4);
    cr_assert_eq(c.expert_hidden, 128);
    cr_assert_eq(c.num_micros_per_mini, 24);
    cr_assert_eq(c.diffusion_bits, 32);
    cr_assert_eq(c.diffusion_ffn, 384);
    cr_assert_eq(c.diffusion_steps, 4);
    cr_assert_eq(c.context, 256);
    cr_assert_eq(c.tokenizer.kind, MODEL_TOKENIZER_BYTE);
    cr_assert_float_eq(c.balance_bias_rate, 1e-2, 1e-9);
    qerr_t err = {0};
    cr_assert_eq(model_config_validate(&c, &err), 0, "%s", err.msg);
    cr_assert_eq(c.diffusion_layer, 0, "L/2 - 1 for L = 2");
}

Test(model_config, preset_512m_matches_model_md) {
    model_config_t c;
    qerr_t err = {0};
    cr_assert_eq(model_config_preset("quillan-512m", &c, &err), 0);
    cr_assert_eq(c.vocab_size, 50257);
    cr_assert_eq(c.dim, 512);
    cr_assert_eq(c.num_layers, 6);
    cr_assert_eq(c.num_heads, 8);
    cr_assert_eq(c.context, 2048);
    cr_assert_eq(c.num_mini_moes, 32);
    cr_assert_eq(c.num_experts_per_mini, 8);
    cr_assert_eq(c.num_micros_per_mini, 325);
    cr_assert_eq(c.top_k_micros, 8);
    cr_assert_eq(c.diffusion_bits, 256);
    cr_assert_eq(c.diffusion_width, 1024);
    cr_assert_eq(c.diffusion_steps, 10);
    cr_assert_eq(c.tokenizer.kind, MODEL_TOKENIZER_GPT2);
    cr_assert_eq(model_config_validate(&c, &err), 0, "%s", err.msg);
    cr_assert_eq(c.diffusion_layer, 2);
    /* Validation is idempotent once diffusion_layer is resolved. */
    model_config_t again = c;
    cr_assert_eq(model_config_validate(&again, &err), 0);
    cr_assert_eq(memcmp(&again, &c, sizeof c), 0);
}

Test(model_config, unknown_preset_lists_known_ones) {
    model_config_t c;
    qerr_t err = {0};
    cr_assert_eq(model_config_preset("huge", &c, &err), -1);
    cr_assert_eq(err.code, QERR_NOTFOUND);
    cr_assert(strstr(err.msg, "huge") && strstr(err.msg, "tiny") && strstr(err.msg, "quillan-512m"),
              "%s", err.msg);
    const char *const *names = model_config_preset_names();
    for (int i = 0; names[i]; i++)
        cr_assert_eq(model_config_preset(names[i], &c, &err), 0, "%s", names[i]);
}

Test(model_config, explicit_diffusion_layer_is_kept_and_range_checked) {
    model_config_t c = tiny();
    c.diffusion_layer = 1;
    qerr_t err = {0};
    cr_assert_eq(model_config_validate(&c, &err), 0, "%s", err.msg);
    cr_assert_eq(c.diffusion_layer, 1);
    c.diffusion_layer = 2;
    assert_rejects(c, "model.diffusion_layer");
    c.diffusion_layer = -2;
    assert_rejects(c, "model.diffusion_layer");
    c = tiny();
    c.num_layers = 1;
    cr_assert_eq(model_config_validate(&c, &err), 0, "%s", err.msg);
    cr_assert_eq(c.diffusion_layer, 0, "L = 1 clamps L/2 - 1 to 0");
}

Test(model_config, head_dim_rules) {
    model_config_t c = tiny();
    c.num_heads = 3; /* 128 % 3 != 0 */
    assert_rejects(c, "model.num_heads");
    c = tiny();
    c.dim = 96;
    c.num_heads = 32; /* head dim 3: odd */
    assert_rejects(c, "model.num_heads");
    c.num_heads = 0;
    assert_rejects(c, "model.num_heads");
}

Test(model_config, top_k_bounds) {
    model_config_t c = tiny();
    c.top_k_minis = 5;
    assert_rejects(c, "model.top_k_minis");
    c = tiny();
    c.top_k_experts = 0;
    assert_rejects(c, "model.top_k_experts");
    c = tiny();
    c.top_k_micros = 25;
    assert_rejects(c, "model.top_k_micros");
    c.top_k_micros = 24;
    qerr_t err = {0};
    cr_assert_eq(model_config_validate(&c, &err), 0, "%s", err.msg);
}

Test(model_config, quantization_group_multiples) {
    model_config_t c = tiny();
    c.dim = 120; /* divisible by 4 heads, head dim 30 even, but not a multiple of 32 */
    assert_rejects(c, "model.dim");
    c = tiny();
    c.expert_hidden = 100;
    assert_rejects(c, "model.expert_hidden");
    c = tiny();
    c.diffusion_bits = 48;
    assert_rejects(c, "model.diffusion_bits");
    c = tiny();
    c.diffusion_time_dim = 63;
    assert_rejects(c, "model.diffusion_time_dim");
}

Test(model_config, scalar_ranges) {
    model_config_t c = tiny();
    c.dropout = 1.0f;
    assert_rejects(c, "model.dropout");
    c = tiny();
    c.norm_eps = 0.0f;
    assert_rejects(c, "model.norm_eps");
    c = tiny();
    c.rope_theta = -1.0f;
    assert_rejects(c, "model.rope_theta");
    c = tiny();
    c.context = 0;
    assert_rejects(c, "model.context");
    c = tiny();
    c.diffusion_steps = 0;
    assert_rejects(c, "model.diffusion_steps");
    c = tiny();
    c.vocab_size = 1 << 30;
    assert_rejects(c, "model.vocab_size");
}

Test(model_config, tokenizer_kind_and_files) {
    model_config_t c = tiny();
    c.vocab_size = 300;
    assert_rejects(c, "model.vocab_size");
    c = tiny();
    strcpy(c.tokenizer.vocab, "vocab.json");
    assert_rejects(c, "model.tokenizer.vocab");

    c = tiny();
    c.tokenizer.kind = MODEL_TOKENIZER_GPT2;
    c.vocab_size = 256; /* no room beside the 256 byte tokens */
    assert_rejects(c, "model.vocab_size");
    c.vocab_size = 50257;
    qerr_t err = {0};
    cr_assert_eq(model_config_validate(&c, &err), 0, "%s", err.msg);
    strcpy(c.tokenizer.vocab, "vocab.json");
    assert_rejects(c, "model.tokenizer.merges");
    strcpy(c.tokenizer.merges, "merges.txt");
    cr_assert_eq(model_config_validate(&c, &err), 0, "%s", err.msg);
    strcpy(c.tokenizer.json, "tokenizer.json");
    assert_rejects(c, "model.tokenizer.json");
    c.tokenizer.kind = MODEL_TOKENIZER_COUNT;
    assert_rejects(c, "model.tokenizer.kind");
}

Test(model_config, tokenizer_kind_names_round_trip) {
    for (int k = 0; k < MODEL_TOKENIZER_COUNT; k++) {
        model_tokenizer_kind_t out = MODEL_TOKENIZER_COUNT;
        const char *name = model_tokenizer_kind_name((model_tokenizer_kind_t)k);
        cr_assert_not_null(name);
        cr_assert_eq(model_tokenizer_kind_parse(name, &out), 0);
        cr_assert_eq((int)out, k);
    }
    model_tokenizer_kind_t out = MODEL_TOKENIZER_BYTE;
    cr_assert_eq(model_tokenizer_kind_parse("sentencepiece", &out), -1);
    cr_assert_null(model_tokenizer_kind_name(MODEL_TOKENIZER_COUNT));
}
