/* Quillan's public inference API (llama.h style): load a quantized policy (.qst file or
 * snapshot bytes), tokenize, generate batches of completions with their log-probabilities and
 * routing records, free. Used by the rollout worker and by `quillan generate` alike; see
 * rollout/examples/generate_example.c.
 *
 * The engine computes the same policy as the learner's quantization-aware forward
 * (model_forward) on the same snapshot: same formats, same rounding, router logits in FP32,
 * ties by lowest index, the shared diffusion plan sampler (docs/ENGINE.md).
 *
 * Lifetimes: a policy is reference-counted (a worker may decode old groups with one snapshot
 * while new groups start on the next): quillan_policy_retain adds a reference,
 * quillan_policy_release drops one and frees the policy with the last. An engine holds the
 * scratch of one decoding batch; one thread uses an engine at a time (the engine runs its own
 * `threads` internally). Results are owned by the caller (quillan_group_free).
 *
 * Errors: functions return -1 or NULL and fill the qerr_t (may be NULL) with a message naming
 * the input at fault (file, tensor, prompt index, token position). */
#ifndef QUILLAN_H
#define QUILLAN_H

#include "error.h"

#include <stddef.h>
#include <stdint.h>

typedef struct quillan_policy quillan_policy_t;
typedef struct quillan_engine quillan_engine_t;

/* ---- Policies ---- */

/* Maps and validates a .qst file (errors start with the path; QERR_NOTFOUND when missing,
 * QERR_PARSE / QERR_INVALID / QERR_VERSION for another format or a truncated file). The
 * tokenizer named by the policy's config is loaded too when it can be (byte-level always; GPT-2
 * BPE when its files exist); otherwise quillan_tokenize reports why. One reference. */
quillan_policy_t *quillan_policy_load_file(const char *path, qerr_t *err);

/* Same from snapshot bytes (e.g. received over the network). `what` names them in errors.
 * When release is non-NULL the policy takes the buffer on success and calls
 * release(release_ctx, data, len) when the last reference goes; when NULL the buffer is
 * borrowed and must outlive the policy. On failure the buffer stays the caller's. */
quillan_policy_t *quillan_policy_load_bytes(const void *data, size_t len, const char *what,
                                            void (*release)(void *release_ctx, const void *data,
                                                            size_t len),
                                            void *release_ctx, qerr_t *err);

/* Adds a reference and returns p. Thread-safe. */
quillan_policy_t *quillan_policy_retain(quillan_policy_t *p);
/* Drops the caller's reference, frees the policy with the last one, NULLs *p; safe on NULL. */
void quillan_policy_release(quillan_policy_t **p);

typedef struct {
    uint64_t version;
    int vocab_size, dim, num_layers, context;
    int32_t bos, eos, pad;
    size_t bytes;        /* size of the container (file or snapshot) */
    size_t weight_bytes; /* bytes of weight tensors (what decoding streams) */
    /* Routing record sizes (quillan_sample_t): ints per layer and position, and 64-bit words per
     * plan code. */
    int route_ints; /* top_k_minis * (1 + top_k_experts + top_k_micros) */
    int plan_words;
} quillan_policy_info_t;

void quillan_policy_info(const quillan_policy_t *p, quillan_policy_info_t *out);

/* ---- Tokens ---- */

/* Encodes len bytes of text, BOS first when add_bos. *ids (malloc'd, the caller frees) gets
 * *n ids. -1 with err when the policy has no usable tokenizer (QERR_NOTFOUND naming the missing
 * file or key) or out of memory. */
int quillan_tokenize(const quillan_policy_t *p, const char *text, size_t len, int add_bos,
                     int32_t **ids, size_t *n, qerr_t *err);

/* Decodes n ids to text, special tokens skipped; returns a malloc'd NUL-terminated string (the
 * caller frees) with its byte count in *len (may be NULL), or NULL with err. */
char *quillan_detokenize(const quillan_policy_t *p, const int32_t *ids, size_t n, size_t *len,
                         qerr_t *err);

/* ---- Engine ---- */

typedef struct {
    int threads;        /* worker threads in all; 0 = every online core */
    int max_batch;      /* sequences decoded together (slots); 0 = QUILLAN_DEFAULT_BATCH */
    int record_routing; /* 1: fill the routing records of every sample (routing replay) */
} quillan_engine_params_t;

#define QUILLAN_DEFAULT_BATCH 32

/* threads 0, max_batch QUILLAN_DEFAULT_BATCH, record_routing 1. The KV cache is FP32, as the
 * learner's attention (docs/ENGINE.md). */
void quillan_engine_params_default(quillan_engine_params_t *params);

/* NULL with err on bad parameters (QERR_RANGE) or no memory. Scratch is sized on first use
 * for the policy it is given and re-sized when a policy of another shape comes. */
quillan_engine_t *quillan_engine_new(const quillan_engine_params_t *params, qerr_t *err);
void quillan_engine_destroy(quillan_engine_t **e);
int quillan_engine_threads(const quillan_engine_t *e);

/* ---- Generation ---- */

typedef struct {
    float temperature;  /* > 0: sample from softmax(logits / temperature); 0: greedy (argmax,
                         * lowest id on ties) */
    int top_k;          /* keep the k most likely tokens (ties by lowest id); 0 = off */
    float top_p;        /* keep the smallest most-likely set with mass >= top_p; 1 = off */
    int max_new_tokens; /* >= 1 */
    const int32_t *stop_tokens; /* a sampled stop token ends the completion (and is part of it);
                                 * the policy's EOS always stops */
    int n_stop;
    uint64_t seed; /* run seed: token t of sample s of prompt p draws
                    * rng_sample_uniform(seed, prompt_id, s, position of t) (MODEL.md) */
} quillan_sampling_t;

/* temperature 1, top_k 0, top_p 1, max_new_tokens 100, no stop tokens, seed 0. */
void quillan_sampling_default(quillan_sampling_t *s);

typedef struct {
    uint64_t prompt_id;
    const int32_t *tokens; /* the whole prompt, BOS included (ids < vocab) */
    int n_tokens;          /* 1 .. context - 1 */
    int n_samples;         /* G >= 1: samples 0..G-1 share the prompt's prefill */
    quillan_sampling_t sampling;
} quillan_prompt_t;

typedef enum {
    QUILLAN_FINISH_STOP = 0, /* sampled EOS or a stop token */
    QUILLAN_FINISH_LENGTH,   /* max_new_tokens, or the context is full */
    QUILLAN_FINISH_COUNT
} quillan_finish_t;

/* "stop" | "length". */
const char *quillan_finish_name(quillan_finish_t f);

/* One completion. Arrays are malloc'd and owned by the group. */
typedef struct {
    int n_tokens;
    int32_t *tokens;      /* [n_tokens] the completion (prompt excluded) */
    float *logprobs;      /* [n_tokens] behaviour log-prob: log-probability of the token under the
                           * distribution actually sampled (after temperature and top-k/top-p;
                           * 0 for greedy) */
    float *logprobs_full; /* [n_tokens] log softmax(logits / T) without truncation (T = the
                           * temperature, 1 for greedy): what the learner's forward computes */
    int32_t *kept;        /* [n_tokens] candidates kept by the truncation (vocab_size when none,
                           * 1 for greedy) */
    quillan_finish_t finish;
    /* Routing record (engine record_routing): one entry per position whose forward the engine
     * ran, i.e. the prompt's positions then every completion token but the last:
     * n_route = n_prompt + n_tokens - 1. route [n_route, num_layers, route_ints] holds per layer
     * mini[KM], then expert[KM * KE], then micro[KM * KN] in moe_route_t order; plan
     * [n_route, 2, plan_words] holds z1 then z0 of the diffusion plan at that position. NULL
     * when not recorded. */
    int n_route;
    int32_t *route;
    uint64_t *plan;
} quillan_sample_t;

typedef struct {
    uint64_t prompt_id;
    int n_samples;
    quillan_sample_t *samples; /* [n_samples], sample index order */
    uint64_t policy_version;
} quillan_group_t;

/* Called as soon as every sample of prompt `index` is finished (the group is groups[index],
 * complete). Runs on the caller's thread between decoding steps. */
typedef void (*quillan_group_done_fn)(void *ctx, int index, quillan_group_t *group);

/* Generates every sample of every prompt with continuous batching: up to max_batch sequences
 * decode together; a finished sequence's slot is refilled at once from the next pending
 * sample; the samples of a prompt share one prefill. Fills groups[0..n_prompts) (the caller
 * frees each with quillan_group_free, also on failure). done may be NULL. Validates every prompt
 * first (tokens in the vocabulary, prompt shorter than the context, sampling ranges) and
 * returns -1 with err naming the prompt index and field before any work. Deterministic: the
 * same policy, prompts and seeds give the same tokens whatever max_batch and threads. */
int quillan_generate(quillan_engine_t *e, quillan_policy_t *p, const quillan_prompt_t *prompts,
                     int n_prompts, quillan_group_t *groups, quillan_group_done_fn done,
                     void *done_ctx, qerr_t *err);

/* Frees a group's arrays and zeroes it; safe on a zeroed group and twice. */
void quillan_group_free(quillan_group_t *g);

/* Cumulative time per stage since the engine was made (or reset), for benchmarks. */
typedef struct {
    double attention_s; /* norms, QKV/O projections, RoPE, attention over the KV cache */
    double moe_s;       /* overseer, routers, experts, micro agents */
    double diffusion_s; /* the K-step plan sampler and write-back */
    double head_s;      /* final norm and output head */
    double sample_s;    /* sampling, log-probs, bookkeeping */
    long prefill_tokens, decode_tokens, steps;
    size_t kv_bytes; /* KV cache currently allocated */
} quillan_stats_t;

void quillan_engine_stats(const quillan_engine_t *e, quillan_stats_t *out);
void quillan_engine_stats_reset(quillan_engine_t *e);

#endif
