/* The policy network's hyper-parameters (MODEL.md): one plain struct, the built-in presets and
 * the cross-key rules every consumer may rely on after model_config_validate.
 *
 * Compute core: libc and libm only. The YAML loader (config.h) fills the `model` section of a
 * run's config into this very struct; code that builds a model from a checkpoint or a preset
 * uses it directly. Sizes are counts (tokens, channels, experts); no field is a byte size. */
#ifndef QUILLAN_MODEL_CONFIG_H
#define QUILLAN_MODEL_CONFIG_H

#include "error.h"

#include <stdbool.h>
#include <stdint.h>

/* Byte-level vocabulary: 256 bytes, then BOS 256, EOS 257, PAD 258 (ARCHITECTURE.md §6). */
#define MODEL_BYTE_VOCAB_SIZE 259
/* INT4 expert weights are quantized in groups of 32 along the input axis (MODEL.md). */
#define MODEL_INT4_GROUP 32
/* Plan codes are whole 32-bit halves of the packed 64-bit words. */
#define MODEL_DIFFUSION_BITS_MULTIPLE 32
/* A BitLinear's integer sum (inputs x 127) must stay exact in FP32: inputs * 127 < 2^24. */
#define MODEL_BITLINEAR_MAX_IN 132104
/* Fixed capacity of a tokenizer file path, terminator included. */
#define MODEL_PATH_MAX 1024

typedef enum {
    MODEL_TOKENIZER_BYTE = 0, /* 256 bytes + BOS/EOS/PAD, no files */
    MODEL_TOKENIZER_GPT2, /* GPT-2 byte-level BPE from vocab.json + merges.txt or tokenizer.json */
    MODEL_TOKENIZER_COUNT
} model_tokenizer_kind_t;

typedef struct {
    model_tokenizer_kind_t kind;
    /* Paths used as given (relative to the working directory); "" when unset. A gpt2 tokenizer
     * takes either `json` or both `vocab` and `merges`; that the files exist is checked when the
     * tokenizer is loaded, not here. */
    char vocab[MODEL_PATH_MAX];  /* vocab.json */
    char merges[MODEL_PATH_MAX]; /* merges.txt */
    char json[MODEL_PATH_MAX];   /* Hugging Face tokenizer.json */
} model_tokenizer_config_t;

typedef struct {
    /* Transformer trunk */
    int vocab_size; /* V */
    int dim;        /* d, the residual width */
    int num_layers; /* L */
    int num_heads;  /* H; head dim = dim / num_heads, even (RoPE rotates pairs) */
    int context;    /* maximum sequence length in tokens (prompt + completion) */
    float dropout;  /* residual-branch dropout, SFT only; RL runs at 0 */
    float rope_theta;
    float norm_eps; /* RMSNorm epsilon */

    /* Hierarchical MoE */
    int overseer_hidden;      /* hidden width of the overseer's shared expert */
    int num_mini_moes;        /* M */
    int top_k_minis;          /* kept minis per token, 1..M */
    int num_experts_per_mini; /* E */
    int top_k_experts;        /* kept experts per kept mini, 1..E */
    int expert_hidden;        /* hidden width of each expert */
    int num_micros_per_mini;  /* N single-neuron micro agents per mini */
    int top_k_micros;         /* kept micro agents per kept mini, 1..N */
    float balance_bias_rate;  /* loss-free balancing bias step per optimizer step (0 = off) */
    bool routing_replay;      /* learner replays the sampler's recorded routing */

    /* Bit-level diffusion */
    int diffusion_layer;     /* block after which the stage runs; -1 = L/2 - 1 (set by validate) */
    int diffusion_bits;      /* code length Lb, a multiple of 32 */
    int diffusion_width;     /* residual width W of the denoiser */
    int diffusion_blocks;    /* residual blocks of the denoiser */
    int diffusion_ffn;       /* hidden width F of each block */
    int diffusion_time_dim;  /* D, sinusoidal time embedding width (even) */
    int diffusion_steps;     /* K, denoising steps of the plan sampler */
    uint64_t diffusion_seed; /* keys the plan noise z_K and the SimHash matrix R */

    bool head_int8; /* rollout output head in INT8 per row (learner fake-quantizes with STE) */
    model_tokenizer_config_t tokenizer;
    uint64_t seed; /* weight initialisation seed */
} model_config_t;

/* Fills *out with a built-in preset: "tiny" (~1.5M parameters, byte vocabulary) or
 * "quillan-512m" (the seed's model, GPT-2 vocabulary; tokenizer paths left empty). Every field
 * is written. Returns 0, or -1 with QERR_NOTFOUND naming the known presets. */
int model_config_preset(const char *name, model_config_t *out, qerr_t *err);

/* The names model_config_preset accepts, NULL-terminated (static storage). */
const char *const *model_config_preset_names(void);

/* Checks every single-key range and cross-key rule (head dim, top-k <= count, INT4 group
 * multiples, diffusion sizes, tokenizer kind vs vocab_size and files) and resolves
 * diffusion_layer -1 to max(L/2 - 1, 0). Returns 0, or -1 with QERR_RANGE/QERR_INVALID and a
 * message that starts with the offending key ("model.dim: ..."); *cfg is written only on
 * success. Validating an already validated config is a no-op. */
int model_config_validate(model_config_t *cfg, qerr_t *err);

/* "byte" | "gpt2"; NULL for an out-of-range kind. */
const char *model_tokenizer_kind_name(model_tokenizer_kind_t kind);
/* Parses a kind name; returns 0, or -1 (nothing written) for an unknown name. */
int model_tokenizer_kind_parse(const char *name, model_tokenizer_kind_t *out);

#endif
