/* The whole Quillan policy network (MODEL.md): parameter table, seeded initialisation, forward
 * and backward over a batch of B x T tokens, per-token log-probs and entropy.
 *
 * Parameters: one contiguous buffer of `real` (FP32 master weights in the normal build) holding
 * every tensor of MODEL.md §Checkpoint tensor names, buffers included (diffusion.R and the
 * loss-free balancing biases `...bias_balance`), and a gradient buffer of the same layout.
 * Tensor i of the table lives at params + tensor(i)->offset. Buffers never get gradients; the
 * optimizer skips them.
 *
 * Forward (quantization-aware, MODEL.md §Quantization): before a forward the latent weights are
 * fake-quantized into a private copy (FP16 attention / overseer / routers, INT4 experts, INT8
 * micro agents, INT8 head when head_int8; BitLinears quantize themselves), redone only after
 * model_params_changed(). The STE of every quantizer is the identity, so the backward
 * accumulates straight into the latent weights' gradients. In quant.h's surrogate mode every
 * quantizer is the identity (gradient checks).
 *
 *   x = E[tokens]
 *   for l: x += drop(Attn_l(RMSNorm x)); x += drop(HierMoE_l(RMSNorm x));
 *          if l == diffusion_layer: x += BitDiffusion(RMSNorm x)
 *   logits = W_out RMSNorm(x)   (only as [HEAD_ROWS, HEAD_VCHUNK] tiles, never B x T x V)
 *
 * Loss (what model_backward differentiates when given no upstream log-prob gradient):
 *   loss = CE + aux_balance * mean_routers(balance) + aux_z * mean_routers(lse^2)
 *        + aux_diffusion * mean_bits BCE,
 * CE the weighted mean of -log p(target) with the batch's per-token weights.
 *
 * Threads: the layers parallelise with OpenMP inside one call; a model_t is used by one thread
 * at a time. Results are bit-identical run to run for a fixed thread count. */
#ifndef QUILLAN_MODEL_H
#define QUILLAN_MODEL_H

#include "diffusion.h"
#include "error.h"
#include "model_config.h"
#include "moe.h"
#include "quant.h"
#include "real.h"

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#define MODEL_NAME_MAX 96 /* tensor name capacity, NUL included */
#define MODEL_MAX_NDIM 3

/* Init stream tags (rng_stream_init): weights, and training noise (dropout, diffusion). */
#define MODEL_RNG_TAG_INIT 0x494E4954ULL  /* "INIT" */
#define MODEL_RNG_TAG_NOISE 0x4E4F4953ULL /* "NOIS" */

typedef enum {
    MODEL_PARAM_MATRIX = 0, /* trained, weight decay applies */
    MODEL_PARAM_GAIN,       /* trained, no weight decay (RMSNorm gains) */
    MODEL_PARAM_BUFFER,     /* not trained by gradient (SimHash R, balancing biases) */
    MODEL_PARAM_KIND_COUNT
} model_param_kind_t;

/* Components of the `quillan params` breakdown. */
typedef enum {
    MODEL_COMP_EMBED = 0,
    MODEL_COMP_ATTENTION,
    MODEL_COMP_OVERSEER, /* shared expert + primary gate */
    MODEL_COMP_ROUTERS,  /* mini-MoE expert routers */
    MODEL_COMP_EXPERTS,
    MODEL_COMP_MICRO,        /* micro agents' down/up vectors */
    MODEL_COMP_MICRO_ROUTER, /* micro routers */
    MODEL_COMP_DIFFUSION,    /* BitLinear weights of the diffusion stage */
    MODEL_COMP_NORMS,        /* every RMSNorm gain (FP32) */
    MODEL_COMP_HEAD,
    MODEL_COMP_BUFFERS, /* R and balancing biases: not parameters */
    MODEL_COMP_COUNT
} model_component_t;

typedef struct {
    char name[MODEL_NAME_MAX];
    int ndim;
    int64_t shape[MODEL_MAX_NDIM];
    size_t offset; /* in reals, into the parameter (and gradient) buffer */
    size_t numel;
    model_param_kind_t kind;
    model_component_t component;
    quant_type_t fake;    /* what the learner forward applies (F32 = none; BitLinears: F32
                           * here, bitlinear_forward quantizes them itself) */
    quant_type_t rollout; /* the format a snapshot stores */
    int in_rollout;       /* 0 for training-only buffers (diffusion.R) */
} model_tensor_t;

typedef struct model model_t;

/* Builds the model of a validated config: the tensor table, parameters initialised from
 * cfg->seed (and R from cfg->diffusion_seed), gradients zeroed. No activation memory yet
 * (model_plan). NULL with err set (QERR_INVALID for a config that does not validate,
 * QERR_NOMEM). */
model_t *model_new(const model_config_t *cfg, qerr_t *err);
/* The tensor table of a validated config without any parameter memory: for sizes and the
 * `quillan params` breakdown. Only the table accessors may be used on it (model_params and
 * model_grads return NULL; no forward). */
model_t *model_new_table(const model_config_t *cfg, qerr_t *err);
/* Frees everything and NULLs *m; safe on NULL and twice. */
void model_destroy(model_t **m);

/* ---- Frozen (forward-only) models ----
 *
 * A frozen model holds one copy of the weights: what the forward reads (model_num_reals values
 * in the tensor table's layout, each fake-quantized tensor as quantized, the embedding, gains
 * and buffers as they are). It has no latent FP32 weights, no gradients and no balancing
 * counts, so it never re-quantizes (fake quantization is not idempotent: re-quantizing its
 * ternary or INT4 values would move the scales). It serves the learner's old policy and KL
 * reference (MODEL.md: with quantization-aware training their forward is the published
 * snapshot's), at a third of a full model's weight memory.
 *
 * It runs model_forward, model_logp / model_entropy / model_route / model_plan_record,
 * model_logits_at and model_greedy like a full model. model_forward refuses (QERR_INVALID)
 * batches with count_load (there are no counts to update) and batches that would run the
 * diffusion training loss (targets, weights and aux_diffusion != 0: that loss needs the
 * latent head), and any forward before the model got weights. model_params,
 * model_params_const, model_grads, model_grads_zero, model_params_changed, model_backward,
 * model_balance_update and model_load on a frozen model are bugs (Q_ASSERT); an optimizer
 * cannot be built on one. */

/* A frozen model of a validated config, without weights until model_freeze_from or
 * model_frozen_load / model_frozen_load_latent. NULL with err set (QERR_INVALID for a config
 * that does not validate, QERR_NOMEM). Free with model_destroy. */
model_t *model_new_frozen(const model_config_t *cfg, qerr_t *err);
/* 1 for a model made by model_new_frozen. */
int model_is_frozen(const model_t *m);
/* Makes dst's forward src's current forward, bit for bit: refreshes src's fake-quantized copy
 * when its latent weights changed (src's next forward then skips that work), and copies it,
 * with the tensors src's forward reads unquantized (embedding, balancing biases, R) taken from
 * src's latent buffer, where model_balance_update writes. dst frozen, src a full model of the
 * same tensor layout (Q_ASSERT). Nothing of src is kept. */
void model_freeze_from(model_t *dst, model_t *src);
/* The weights of a frozen model [model_num_reals], in the layout described above: what a
 * checkpoint stores. Owned by the model; NULL before it got weights. */
const real *model_frozen_weights(const model_t *m);
/* Sets a frozen model's weights to a copy of w [model_num_reals], in model_frozen_weights'
 * form. */
void model_frozen_load(model_t *m, const real *w);
/* Sets a frozen model's weights from latent FP32 weights [model_num_reals] (a full model's
 * model_params layout), fake-quantized tensor by tensor with the quantizers a full model's
 * forward applies, so the forward equals that of a full model holding `latent`. */
void model_frozen_load_latent(model_t *m, const real *latent);

const model_config_t *model_config(const model_t *m);

/* ---- Parameter table ---- */

size_t model_tensor_count(const model_t *m);
const model_tensor_t *model_tensor(const model_t *m, size_t i);
/* The tensor named `name`, or NULL. */
const model_tensor_t *model_tensor_find(const model_t *m, const char *name);
/* Total reals in the parameter buffer (buffers included). */
size_t model_num_reals(const model_t *m);
/* The parameter and gradient buffers [model_num_reals]; owned by the model. Write parameters
 * only between forwards, then call model_params_changed. Not on a frozen model (Q_ASSERT). */
real *model_params(model_t *m);
const real *model_params_const(const model_t *m);
real *model_grads(model_t *m);
void model_grads_zero(model_t *m);
/* Marks the latent weights as changed: the next forward re-runs the fake quantization. */
void model_params_changed(model_t *m);

/* Bytes the tensor occupies at rollout in its MODEL.md format: FP32 4, FP16 2, ternary 2 bits
 * + an FP32 scale per row, INT4 4 bits + an FP16 scale per group of 32, INT8 1 byte + an FP32
 * scale per row. Independent of any model instance. */
size_t model_tensor_rollout_bytes(const model_tensor_t *t);

/* Prints the `quillan params` breakdown of a config to out: one row per component with its
 * precision at rollout, parameter count, bytes at rollout precision and share of the
 * parameters, a total line, and the non-trained buffers below it. Markdown table. Returns 0,
 * or -1 with err set (config invalid, out of memory). */
int model_params_print(const model_config_t *cfg, FILE *out, qerr_t *err);

/* ---- Forward / backward ---- */

typedef struct {
    int B, T;                  /* T <= context */
    const int32_t *tokens;     /* [B, T] input ids in [0, V) */
    const int32_t *targets;    /* [B, T] next-token ids in [0, V) where weights > 0 (other rows
                                * are ignored); NULL: no log-probs and no losses */
    const real *weights;       /* [B, T] CE weight per position (1 on completion tokens, 0 on
                                * prompt and padding); rows with weight 0 get no log-prob */
    const moe_route_t *replay; /* [L] routing records to replay, or NULL (own top-k) */
    const diffusion_plan_t *plan_replay; /* diffusion plan record to replay, or NULL */
    int training;                        /* 1: residual dropout at cfg.dropout (SFT) */
    int count_load;     /* 1: add the routing to the loss-free balancing counts (training batches;
                         * 0 for evaluation and generation) */
    uint64_t noise_key; /* keys dropout masks and diffusion training noise (e.g. the
                         * optimizer step), so a resumed run draws the same noise */
    real temperature;   /* log-probs of logits / temperature (> 0; 1 in SFT) */
    real aux_balance, aux_z, aux_diffusion; /* loss weights (TRAINING.md aux.*) */
} model_batch_t;

typedef struct {
    double loss;          /* CE + weighted aux terms: what model_backward(NULL) differentiates */
    double ce;            /* weighted mean -log p over the weighted tokens */
    double balance;       /* mean over reached routers of the Switch balance loss (unweighted) */
    double z;             /* mean over reached routers of mean lse^2 (unweighted) */
    double diffusion;     /* mean BCE of the flip logits (unweighted) */
    double weight_sum;    /* sum of the CE weights */
    long decisions;       /* router decisions */
    long mismatches;      /* replayed decisions whose own choice would have differed */
    long plan_mismatches; /* replayed plan positions whose own last step differed */
} model_stats_t;

/* Validates a batch against cfg: 1 <= T <= context, B >= 1, temperature > 0, tokens (and the
 * targets of weighted positions) in [0, vocab), weights >= 0. 0, or -1 with QERR_RANGE naming
 * the row and position. model_forward and the CUDA model check with it. */
int model_batch_check(const model_config_t *cfg, const model_batch_t *b, qerr_t *err);

/* Sizes the activation memory for batches of up to B x T tokens (T <= context). Called by
 * model_forward when a batch does not fit; call it once up front to allocate early. */
int model_plan(model_t *m, int B, int T, qerr_t *err);

/* Runs the forward pass and keeps what the backward needs. Validates the batch (tokens and
 * targets in range, T <= context, replay records) and returns -1 with QERR_RANGE /
 * QERR_INVALID naming the position on bad input. Fills *stats (may be NULL). */
int model_forward(model_t *m, const model_batch_t *batch, model_stats_t *stats, qerr_t *err);

/* Per-token results of the last forward [B * T]: log p(target) and entropy at the forward's
 * temperature (0 on rows with weight 0). Owned by the model, valid until the next forward. */
const real *model_logp(const model_t *m);
const real *model_entropy(const model_t *m);
/* Layer l's routing as used by the last forward (own choice or replayed): what a worker
 * records and the learner replays. Owned by the model. */
const moe_route_t *model_route(const model_t *m, int l);

/* The diffusion plan of the last forward (own or replayed), for recording. Owned by the
 * model. */
const diffusion_plan_t *model_plan_record(const model_t *m);

/* Backward of the last forward. dlogp[B*T] and dentropy[B*T] are the gradients of the caller's
 * loss with respect to the per-token log-probs and entropies (either may be NULL for zero);
 * with dlogp == NULL the CE of the batch's weights is used, i.e. the model differentiates
 * stats.loss. The aux terms are always added with the batch's weights. ACCUMULATES into
 * model_grads (zero them once per optimizer step). */
void model_backward(model_t *m, const real *dlogp, const real *dentropy);

/* Logits at position t of row b of the last model_forward (V values into out): the final-norm
 * output times the head as that forward used it (fake-quantized when the config quantizes
 * the head), before the temperature. Asserts that a forward ran and (b, t) lies in its
 * batch. For agreement measurements (top-1 / top-2 margins). */
void model_logits_at(const model_t *m, int b, int t, real *out);

/* Greedy next tokens: runs the forward on tokens [B, T] (no dropout, no losses) and writes
 * out[b] = argmax of the logits at position pos[b] of row b (lowest id on ties). */
int model_greedy(model_t *m, const int32_t *tokens, int B, int T, const int *pos, int32_t *out,
                 qerr_t *err);

/* Loss-free balancing (MODEL.md): when apply is 1 and balance_bias_rate > 0, updates every
 * router's bias from the selection counts of the forwards (with count_load) since the last
 * call; then resets the counts. Call after each optimizer step, with apply 0 when the step was
 * skipped. */
void model_balance_update(model_t *m, int apply);

/* Layer l's routing selection counts since the last model_balance_update, owned by the model:
 * data-parallel replicas sum them across ranks before the update, so that every replica moves
 * its biases as one model that saw the whole batch would. */
moe_load_t *model_load(model_t *m, int l);

/* Bytes of activation memory currently planned. */
size_t model_activation_bytes(const model_t *m);

#endif
