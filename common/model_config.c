#include "model_config.h"

#include <string.h>

/* Upper bounds that keep every size product of the model far from int and size_t overflow;
 * real models sit orders of magnitude below them. */
#define MAX_VOCAB (1 << 24)
#define MAX_WIDTH (1 << 16)
#define MAX_COUNT (1 << 16)
#define MAX_CONTEXT (1 << 20)
/* Every BitLinear input (bits, d, D, W, F) is a width, so the cap also keeps the int8 x ternary
 * integer sums exact in FP32. */
_Static_assert(MAX_WIDTH <= MODEL_BITLINEAR_MAX_IN, "BitLinear sums stay exact");

static const char *const tokenizer_names[MODEL_TOKENIZER_COUNT] = {
    [MODEL_TOKENIZER_BYTE] = "byte",
    [MODEL_TOKENIZER_GPT2] = "gpt2",
};
_Static_assert(Q_ARRAY_LEN(tokenizer_names) == MODEL_TOKENIZER_COUNT, "one name per kind");

static const char *const preset_names[] = {"tiny", "quillan-512m", NULL};

const char *model_tokenizer_kind_name(model_tokenizer_kind_t kind) {
    if ((int)kind < 0 || kind >= MODEL_TOKENIZER_COUNT)
        return NULL;
    return tokenizer_names[kind];
}

int model_tokenizer_kind_parse(const char *name, model_tokenizer_kind_t *out) {
    for (int k = 0; k < MODEL_TOKENIZER_COUNT; k++) {
        if (strcmp(name, tokenizer_names[k]) == 0) {
            *out = (model_tokenizer_kind_t)k;
            return 0;
        }
    }
    return -1;
}

const char *const *model_config_preset_names(void) {
    return preset_names;
}

/* MODEL.md §Presets, tiny: trains on 2 CPU cores in minutes. */
static void preset_tiny(model_config_t *c) {
    *c = (model_config_t){
        .vocab_size = MODEL_BYTE_VOCAB_SIZE,
        .dim = 128,
        .num_layers = 2,
        .num_heads = 4,
        .context = 256,
        .dropout = 0.0f,
        .rope_theta = 10000.0f,
        .norm_eps = 1e-6f,
        .overseer_hidden = 32,
        .num_mini_moes = 4,
        .top_k_minis = 2,
        .num_experts_per_mini = 4,
        .top_k_experts = 2,
        .expert_hidden = 128,
        .num_micros_per_mini = 24,
        .top_k_micros = 8,
        .balance_bias_rate = 1e-2f,
        .routing_replay = true,
        .diffusion_layer = -1,
        .diffusion_bits = 32,
        .diffusion_width = 128,
        .diffusion_blocks = 2,
        .diffusion_ffn = 384,
        .diffusion_time_dim = 64,
        .diffusion_steps = 4,
        .diffusion_seed = 5678,
        .head_int8 = false,
        .tokenizer = {.kind = MODEL_TOKENIZER_BYTE},
        .seed = 1234,
    };
}

/* MODEL.md §Presets, the seed's ~507M-parameter model. */
static void preset_512m(model_config_t *c) {
    preset_tiny(c);
    c->vocab_size = 50257;
    c->dim = 512;
    c->num_layers = 6;
    c->num_heads = 8;
    c->context = 2048;
    c->overseer_hidden = 96;
    c->num_mini_moes = 32;
    c->num_experts_per_mini = 8;
    c->expert_hidden = 192;
    c->num_micros_per_mini = 325;
    c->balance_bias_rate = 1e-3f;
    c->diffusion_bits = 256;
    c->diffusion_width = 1024;
    c->diffusion_blocks = 6;
    c->diffusion_ffn = 3968;
    c->diffusion_time_dim = 256;
    c->diffusion_steps = 10;
    c->tokenizer.kind = MODEL_TOKENIZER_GPT2;
}

int model_config_preset(const char *name, model_config_t *out, qerr_t *err) {
    if (strcmp(name, "tiny") == 0) {
        preset_tiny(out);
        return 0;
    }
    if (strcmp(name, "quillan-512m") == 0) {
        preset_512m(out);
        return 0;
    }
    return qerr_set(err, QERR_NOTFOUND, "unknown model preset '%s' (known: tiny, quillan-512m)",
                    name);
}

static int check_int(const char *key, int v, int lo, int hi, qerr_t *err) {
    if (v < lo || v > hi)
        return qerr_set(err, QERR_RANGE, "model.%s: %d is out of range [%d, %d]", key, v, lo, hi);
    return 0;
}

static int check_multiple(const char *key, int v, int m, qerr_t *err) {
    if (v % m != 0)
        return qerr_set(err, QERR_INVALID, "model.%s: %d is not a multiple of %d", key, v, m);
    return 0;
}

static int check_top_k(const char *key, int k, const char *count_key, int count, qerr_t *err) {
    if (k < 1 || k > count)
        return qerr_set(err, QERR_RANGE, "model.%s: %d must be between 1 and model.%s (%d)", key, k,
                        count_key, count);
    return 0;
}

static int check_tokenizer(const model_config_t *c, qerr_t *err) {
    const model_tokenizer_config_t *t = &c->tokenizer;
    const char *kind = model_tokenizer_kind_name(t->kind);
    if (!kind)
        return qerr_set(err, QERR_RANGE, "model.tokenizer.kind: unknown kind %d", (int)t->kind);
    int has_vocab = t->vocab[0] != '\0', has_merges = t->merges[0] != '\0';
    int has_json = t->json[0] != '\0';
    if (t->kind == MODEL_TOKENIZER_BYTE) {
        if (c->vocab_size != MODEL_BYTE_VOCAB_SIZE)
            return qerr_set(err, QERR_INVALID,
                            "model.vocab_size: %d does not match tokenizer kind 'byte' (%d)",
                            c->vocab_size, MODEL_BYTE_VOCAB_SIZE);
        if (has_vocab || has_merges || has_json)
            return qerr_set(err, QERR_INVALID,
                            "model.tokenizer.%s: tokenizer files are only used by kind 'gpt2'",
                            has_vocab    ? "vocab"
                            : has_merges ? "merges"
                                         : "json");
        return 0;
    }
    /* Byte-level BPE holds at least the 256 byte tokens and one special token. */
    if (c->vocab_size <= 256)
        return qerr_set(err, QERR_RANGE,
                        "model.vocab_size: %d is too small for tokenizer kind '%s' (needs > 256)",
                        c->vocab_size, kind);
    if (has_vocab != has_merges)
        return qerr_set(err, QERR_INVALID, "model.tokenizer.%s: vocab and merges go together",
                        has_vocab ? "merges" : "vocab");
    if (has_json && has_vocab)
        return qerr_set(err, QERR_INVALID,
                        "model.tokenizer.json: set either json or vocab + merges, not both");
    return 0;
}

int model_config_validate(model_config_t *cfg, qerr_t *err) {
    const model_config_t *c = cfg;
    if (check_int("vocab_size", c->vocab_size, 2, MAX_VOCAB, err) ||
        check_int("dim", c->dim, 1, MAX_WIDTH, err) ||
        check_int("num_layers", c->num_layers, 1, 1024, err) ||
        check_int("num_heads", c->num_heads, 1, c->dim, err) ||
        check_int("context", c->context, 1, MAX_CONTEXT, err) ||
        check_int("overseer_hidden", c->overseer_hidden, 1, MAX_WIDTH, err) ||
        check_int("num_mini_moes", c->num_mini_moes, 1, MAX_COUNT, err) ||
        check_int("num_experts_per_mini", c->num_experts_per_mini, 1, MAX_COUNT, err) ||
        check_int("expert_hidden", c->expert_hidden, 1, MAX_WIDTH, err) ||
        check_int("num_micros_per_mini", c->num_micros_per_mini, 1, MAX_COUNT, err) ||
        check_int("diffusion_bits", c->diffusion_bits, 1, MAX_WIDTH, err) ||
        check_int("diffusion_width", c->diffusion_width, 1, MAX_WIDTH, err) ||
        check_int("diffusion_blocks", c->diffusion_blocks, 1, 1024, err) ||
        check_int("diffusion_ffn", c->diffusion_ffn, 1, MAX_WIDTH, err) ||
        check_int("diffusion_time_dim", c->diffusion_time_dim, 2, MAX_WIDTH, err) ||
        check_int("diffusion_steps", c->diffusion_steps, 1, 1000, err) ||
        check_int("diffusion_layer", c->diffusion_layer, -1, c->num_layers - 1, err))
        return -1;
    if (!(c->dropout >= 0.0f && c->dropout < 1.0f))
        return qerr_set(err, QERR_RANGE, "model.dropout: %g is out of range [0, 1)",
                        (double)c->dropout);
    if (!(c->rope_theta > 0.0f))
        return qerr_set(err, QERR_RANGE, "model.rope_theta: %g must be positive",
                        (double)c->rope_theta);
    if (!(c->norm_eps > 0.0f && c->norm_eps < 1.0f))
        return qerr_set(err, QERR_RANGE, "model.norm_eps: %g is out of range (0, 1)",
                        (double)c->norm_eps);
    if (!(c->balance_bias_rate >= 0.0f && c->balance_bias_rate < 1.0f))
        return qerr_set(err, QERR_RANGE, "model.balance_bias_rate: %g is out of range [0, 1)",
                        (double)c->balance_bias_rate);

    if (c->dim % c->num_heads != 0)
        return qerr_set(err, QERR_INVALID,
                        "model.num_heads: model.dim (%d) is not divisible by num_heads (%d)",
                        c->dim, c->num_heads);
    if ((c->dim / c->num_heads) % 2 != 0)
        return qerr_set(err, QERR_INVALID,
                        "model.num_heads: head dim %d (dim %d / %d heads) must be even for RoPE",
                        c->dim / c->num_heads, c->dim, c->num_heads);
    if (check_top_k("top_k_minis", c->top_k_minis, "num_mini_moes", c->num_mini_moes, err) ||
        check_top_k("top_k_experts", c->top_k_experts, "num_experts_per_mini",
                    c->num_experts_per_mini, err) ||
        check_top_k("top_k_micros", c->top_k_micros, "num_micros_per_mini", c->num_micros_per_mini,
                    err))
        return -1;
    /* INT4 groups run along the input axis of both expert matrices: d for w1, hidden for w2. */
    if (check_multiple("dim", c->dim, MODEL_INT4_GROUP, err) ||
        check_multiple("expert_hidden", c->expert_hidden, MODEL_INT4_GROUP, err) ||
        check_multiple("diffusion_bits", c->diffusion_bits, MODEL_DIFFUSION_BITS_MULTIPLE, err) ||
        check_multiple("diffusion_time_dim", c->diffusion_time_dim, 2, err))
        return -1;
    if (check_tokenizer(c, err))
        return -1;

    if (cfg->diffusion_layer < 0) {
        int l = cfg->num_layers / 2 - 1;
        cfg->diffusion_layer = l < 0 ? 0 : l;
    }
    return 0;
}
