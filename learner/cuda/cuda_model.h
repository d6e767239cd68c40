/* The whole Quillan policy network on one CUDA device: common/model.h's API with parameters,
 * gradients and AdamW state in device memory.
 *
 * Parameter table: the CPU's own (model_new_table), so names, shapes, kinds and offsets are
 * the same; the FP32 master parameters, gradients and both Adam moments are device buffers of
 * model_num_reals floats in that layout, so a download is byte for byte what model_params()
 * would hold (checkpoints and snapshots are written from it unchanged).
 *
 * Math: the CPU reference's, term for term (common/model.c). Before a forward the latent
 * weights are fake-quantized (quant.h formats: FP16 attention / overseer / routers, INT4
 * experts, INT8 micro agents, INT8 head when head_int8; BitLinears quantize themselves),
 * redone after cuda_model_params_changed or an optimizer step; every STE is the identity, so
 * gradients accumulate into the latent weights' gradients.
 *
 * Precision (cuda_model_options_t.precision):
 *   FP32  every GEMM in FP32 (TF32 off): the parity path against the CPU.
 *   FP16  the fake-quantized weights are held as FP16, GEMM inputs (weights and activations)
 *         are FP16 with FP32 accumulation and FP32 outputs; the residual stream, norms,
 *         softmaxes, router logits, losses and every gradient sum stay FP32. The backward
 *         seeds the upstream gradient multiplied by a dynamic loss scale (so FP16 activation
 *         gradients do not flush to zero); the optimizer step unscales, and a step whose
 *         gradients are not finite is skipped and halves the scale. The sm_75 (T4) path.
 *   BF16  as FP16 with BF16 inputs and no loss scaling (BF16 has FP32's range); sm_80+.
 *   AUTO  BF16 on sm_80+, FP16 below.
 * force_sm75 forces the FP16 path (FP16 tensor-core products, FP16 weight copy, dynamic loss
 * scaling) on any card, so the T4's arithmetic runs on an A100/H100/H200; each kernel still runs
 * its own build for the card's architecture (nvcc builds sm_75, sm_80 and sm_90), so it is the
 * T4's numerics and memory footprint that are exercised, not its instruction schedule.
 *
 * Gradient checkpointing (options.checkpointing): each transformer block keeps only its
 * input x; the backward re-runs the block's forward (same routing, same dropout masks: both are
 * functions of the forward's record and noise key) before differentiating it.
 *
 * Streams and threads: every call is ordered on the model's own stream (cuda_model_stream);
 * functions that return host results synchronise it. A cuda_model_t is used by one host thread
 * at a time. CUDA errors inside kernels are device bugs and abort (cuda_check.h); failures a
 * caller can handle (bad batch, out of memory, unsupported precision) return -1 / NULL and fill
 * err. */
#ifndef QUILLAN_CUDA_MODEL_H
#define QUILLAN_CUDA_MODEL_H

#include <cuda_runtime_api.h>
#include <stddef.h>
#include <stdint.h>

#include "cuda_check.h" /* error.h, made usable from CUDA C++ */

#ifdef __cplusplus
extern "C" {
#endif

/* The compute core's C headers, with C linkage when this header is compiled as CUDA C++. */
#include "diffusion.h"
#include "error.h"
#include "model.h"
#include "moe.h"
#include "optimizer.h"

typedef enum {
    CUDA_MODEL_PREC_AUTO = 0,
    CUDA_MODEL_PREC_FP32,
    CUDA_MODEL_PREC_FP16,
    CUDA_MODEL_PREC_BF16,
    CUDA_MODEL_PREC_COUNT
} cuda_model_precision_t;

typedef struct {
    cuda_model_precision_t precision;
    int force_sm75;        /* 1: FP16 + loss scaling and the sm_75 kernel paths on any card */
    int checkpointing;     /* 1: recompute each block's forward in the backward */
    int device;            /* CUDA device ordinal */
    float loss_scale_init; /* FP16 dynamic loss scale: start value (e.g. 65536) */
    int loss_scale_growth_interval; /* finite steps before the scale doubles (e.g. 2000) */
} cuda_model_options_t;

/* AUTO precision, no forcing, no checkpointing, device 0, loss scale 2^16 doubling every 2000
 * finite steps. */
void cuda_model_options_default(cuda_model_options_t *opt);

/* "auto" | "fp32" | "fp16" | "bf16"; NULL out of range. */
const char *cuda_model_precision_name(cuda_model_precision_t p);

typedef struct cuda_model cuda_model_t;

/* Builds the model of a config on opt->device: the CPU tensor table, device parameters
 * initialised from cfg->seed by the CPU's streams (MODEL_RNG_TAG_INIT per tensor and chunk of
 * 4096, N(0, std^2); gains 1, balancing biases 0, R from diffusion_seed), gradients zeroed.
 * The device computes the normal draws with its own libm, so a value may differ from
 * model_new's in the last bit: upload the CPU's parameters where bit equality matters. No
 * activation or optimizer memory yet. NULL with err set: QERR_INVALID (config, or BF16 asked
 * on a card below sm_80, or force_sm75 with BF16), QERR_NOMEM (device memory), QERR_IO (no
 * such device). */
cuda_model_t *cuda_model_new(const model_config_t *cfg, const cuda_model_options_t *opt,
                             qerr_t *err);
/* Frees all device and host memory and NULLs *m; safe on NULL and twice. */
void cuda_model_destroy(cuda_model_t **m);

const model_config_t *cuda_model_config(const cuda_model_t *m);
/* The tensor table (a model_new_table model: only the table accessors of model.h apply). */
const model_t *cuda_model_table(const cuda_model_t *m);
size_t cuda_model_num_reals(const cuda_model_t *m);
/* The precision actually used (never AUTO). */
cuda_model_precision_t cuda_model_precision(const cuda_model_t *m);
cudaStream_t cuda_model_stream(const cuda_model_t *m);

/* ---- Parameters, gradients, optimizer state (host arrays of cuda_model_num_reals floats, in
 * the table's layout) ---- */

/* Device parameters := host[] (marks them changed). Returns 0, or -1 with err (QERR_IO). */
int cuda_model_params_upload(cuda_model_t *m, const float *host, qerr_t *err);
/* host[] := device parameters (synchronous). */
int cuda_model_params_download(const cuda_model_t *m, float *host, qerr_t *err);
/* host[] := the gradients accumulated since the last zeroing, divided by the loss scale of the
 * backwards that produced them (i.e. the true gradients in every precision). */
int cuda_model_grads_download(const cuda_model_t *m, float *host, qerr_t *err);
void cuda_model_grads_zero(cuda_model_t *m);
/* The next forward re-runs the fake quantization. Call after writing parameters in place. */
void cuda_model_params_changed(cuda_model_t *m);
/* The device buffers themselves [cuda_model_num_reals] (for a data-parallel reducer that
 * all-reduces gradients in place). Gradients are held multiplied by cuda_model_loss_scale. */
float *cuda_model_params_device(cuda_model_t *m);
float *cuda_model_grads_device(cuda_model_t *m);
/* The current dynamic loss scale (1 outside FP16). */
float cuda_model_loss_scale(const cuda_model_t *m);

/* ---- Forward / backward ---- */

/* Sizes the activation memory for batches of up to B x T tokens, as model_plan. Returns 0, or
 * -1 with err (QERR_RANGE, QERR_NOMEM naming the bytes asked). */
int cuda_model_plan(cuda_model_t *m, int B, int T, qerr_t *err);

/* The forward of model_forward on a host batch (model_batch_t: host arrays; the same checks,
 * errors and replay validation). Copies the batch to the device, runs, and fills *stats (may
 * be NULL; synchronises). */
int cuda_model_forward(cuda_model_t *m, const model_batch_t *batch, model_stats_t *stats,
                       qerr_t *err);

/* Per-token results of the last forward on the device [B * T] (log p(target) and entropy at
 * the forward's temperature; 0 on rows with weight 0). Owned by the model, valid until the next
 * forward. */
const float *cuda_model_logp_device(const cuda_model_t *m);
const float *cuda_model_entropy_device(const cuda_model_t *m);
/* Host copies of the same [B * T] (either may be NULL). Synchronous. */
int cuda_model_logp_download(const cuda_model_t *m, float *logp, float *entropy, qerr_t *err);
/* Layer l's routing of the last forward into *out (a moe_route_t initialised for at least
 * B * T tokens) and the diffusion plan into *plan (diffusion_plan_init'ed for B * T):
 * what model_route / model_plan_record give. Synchronous. */
int cuda_model_route_download(const cuda_model_t *m, int l, moe_route_t *out, qerr_t *err);
int cuda_model_plan_download(const cuda_model_t *m, diffusion_plan_t *plan, qerr_t *err);

/* Backward of the last forward, as model_backward: dlogp and dentropy are DEVICE arrays
 * [B * T] (either may be NULL for zero; both NULL: the weighted CE of the batch) that ALREADY
 * CARRY the factor cuda_model_loss_scale (pass it as dloss to cuda_dapo_loss_backward); the
 * model scales its own CE seed and aux terms the same way. ACCUMULATES into the gradients (so
 * they hold the loss scale times the true gradients; cuda_model_grads_download divides it out).
 * Covers the rows of the forward that had a CE weight != 0. */
void cuda_model_backward(cuda_model_t *m, const float *dlogp, const float *dentropy);

/* ---- Optimizer (learner/optimizer.h's AdamW on the device) ---- */

/* Allocates and zeroes both moments for cfg (validated as optim_new does). Returns 0, or -1
 * with err (QERR_RANGE, QERR_NOMEM). */
int cuda_model_optim_init(cuda_model_t *m, const optim_config_t *cfg, qerr_t *err);
/* One AdamW update from the gradients, as optim_step: unscales by the loss scale, global norm,
 * clip, skip when the loss or the norm is not finite (FP16: a non-finite norm halves the loss
 * scale; growth_interval finite steps in a row double it), decoupled decay on matrices only,
 * buffers untouched. Marks the parameters changed; does not zero the gradients. Synchronous
 * (the norm decides the skip). Fills *res (may be NULL). Returns 1 applied, 0 skipped, -1 with
 * err on a CUDA error or when cuda_model_optim_init was not called (QERR_INVALID). */
int cuda_model_optim_step(cuda_model_t *m, double loss, optim_result_t *res, qerr_t *err);
long cuda_model_optim_steps(const cuda_model_t *m);
long cuda_model_optim_skipped(const cuda_model_t *m);
void cuda_model_optim_set_counts(cuda_model_t *m, long steps, long skipped);
/* Moments to and from host arrays [cuda_model_num_reals] (checkpoints). */
int cuda_model_optim_upload(cuda_model_t *m, const float *mom1, const float *mom2, qerr_t *err);
int cuda_model_optim_download(const cuda_model_t *m, float *mom1, float *mom2, qerr_t *err);

/* Loss-free balancing after a step, as model_balance_update. */
void cuda_model_balance_update(cuda_model_t *m, int apply);

/* ---- Memory and profiling ---- */

typedef struct {
    size_t params;      /* master parameters, gradients */
    size_t optim;       /* Adam moments */
    size_t weights_q;   /* fake-quantized compute copy of the weights */
    size_t activations; /* planned activation memory */
} cuda_model_memory_t;

void cuda_model_memory(const cuda_model_t *m, cuda_model_memory_t *out);

/* Phases timed with cudaEvents when profiling is on. */
typedef enum {
    CUDA_MODEL_PHASE_QUANT = 0, /* fake quantization of the weights */
    CUDA_MODEL_PHASE_EMBED,     /* embedding forward and backward */
    CUDA_MODEL_PHASE_ATTN_FWD,  /* norm, qkv, RoPE, flash attention, wo, residual */
    CUDA_MODEL_PHASE_MOE_FWD,   /* norm, hierarchical MoE, residual */
    CUDA_MODEL_PHASE_DIFF_FWD,  /* diffusion stage and its loss */
    CUDA_MODEL_PHASE_HEAD_FWD,  /* final norm, chunked log-probs and entropy */
    CUDA_MODEL_PHASE_HEAD_BWD,
    CUDA_MODEL_PHASE_DIFF_BWD,
    CUDA_MODEL_PHASE_MOE_BWD,
    CUDA_MODEL_PHASE_ATTN_BWD,
    CUDA_MODEL_PHASE_RECOMPUTE, /* checkpointing: a block's forward re-run in the backward */
    CUDA_MODEL_PHASE_OPTIM,     /* unscale, norm, AdamW */
    CUDA_MODEL_PHASE_COUNT
} cuda_model_phase_t;

const char *cuda_model_phase_name(cuda_model_phase_t p);

/* Turns event timing on (1) or off (0); timing adds events but no synchronisation. */
void cuda_model_profile_enable(cuda_model_t *m, int on);
/* Milliseconds per phase summed since the last reset (synchronises), then resets. */
void cuda_model_profile_read(cuda_model_t *m, double ms[CUDA_MODEL_PHASE_COUNT]);

#ifdef __cplusplus
}
#endif

#endif
