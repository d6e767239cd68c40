/* AdamW on the device for the model's FP32 master weights (learner/optimizer.h is the oracle),
 * the global gradient norm with clipping, the non-finite skip, and the dynamic loss scaler of
 * mixed precision (TRAINING.md: FP16 compute with dynamic loss scaling on sm_75).
 *
 * Layout: params, grads and the Adam moments are flat FP32 device buffers [n] laid out like the
 * CPU model's parameter buffer (model_num_reals reals, tensor i at model_tensor(m, i)->offset).
 * The tensor table decides the update: MODEL_PARAM_MATRIX decays (p *= 1 - lr wd, decoupled),
 * MODEL_PARAM_GAIN does not, MODEL_PARAM_BUFFER is never touched.
 *
 * One step, mirroring optim_step: the gradient norm is summed in double over fixed chunks of
 * CUDA_OPTIM_NORM_CHUNK elements (one block each), then the chunk sums in order: deterministic.
 * The norm comes back to the host (one synchronisation of the stream per step), which decides
 * skip / clip / learning rate exactly as the CPU (optim_lr_at), then one fused kernel updates
 * every tensor with the same FP32 operations in the same order as optim_step (no FMA
 * contraction), so equal gradients and norm give bit-identical parameters and moments.
 *
 * Loss scaling: the gradients may carry a factor `grad_scale` (the loss scale S); the step
 * divides it out (the norm it reports and clips with is that of grads / S). A step with a
 * non-finite loss or norm changes nothing but the skip count, like the CPU; the caller then
 * tells its cuda_loss_scaler_t. */
#ifndef QUILLAN_CUDA_OPTIM_H
#define QUILLAN_CUDA_OPTIM_H

#include <stddef.h>

#include <cuda_runtime_api.h>

#include "cuda_check.h"

#ifdef __cplusplus
extern "C" {
#endif

#include "model.h"
#include "optimizer.h"

/* Elements per block of the gradient-norm sum (the sum order is fixed by it). */
#define CUDA_OPTIM_NORM_CHUNK 65536

typedef struct cuda_optim cuda_optim_t;

/* Moments zeroed on the device, for a model with m's tensor table (m may be a
 * model_new_table() instance: only the table is read, and not kept). cfg as optim_new checks
 * it. NULL with err filled (QERR_RANGE for a bad config, QERR_NOMEM, QERR_IO for CUDA errors). */
cuda_optim_t *cuda_optim_new(const optim_config_t *cfg, const model_t *m, qerr_t *err);
/* Frees the moments and NULLs *o; safe on NULL and twice. */
void cuda_optim_destroy(cuda_optim_t **o);

/* The L2 norm of grads[n] / grad_scale, in double, into *norm (host), waiting for stream s.
 * 0, or -1 with err filled (CUDA errors). */
int cuda_optim_grad_norm(cuda_optim_t *o, const float *grads, double grad_scale, double *norm,
                         cudaStream_t s, qerr_t *err);

/* One AdamW update of params[n] from grads[n] (device) carrying the factor grad_scale (> 0; 1
 * without loss scaling), unless loss or the norm is not finite (then skipped and counted).
 * Fills *res (may be NULL) as optim_step does, with the norm of grads / grad_scale. Waits for
 * stream s once (the norm); the update itself is queued on s. Does not zero the gradients.
 * Returns 1 applied, 0 skipped, -1 with err filled on a CUDA error. */
int cuda_optim_step(cuda_optim_t *o, float *params, const float *grads, double grad_scale,
                    double loss, optim_result_t *res, cudaStream_t s, qerr_t *err);

long cuda_optim_steps(const cuda_optim_t *o);   /* updates applied */
long cuda_optim_skipped(const cuda_optim_t *o); /* steps skipped */
/* Restores the counters (checkpoint load). */
void cuda_optim_set_counts(cuda_optim_t *o, long steps, long skipped);
/* First and second moments [cuda_optim_len] on the device, owned by o (for checkpoints: copy
 * them with cuda_buf_download / cuda_buf_upload). */
float *cuda_optim_m(cuda_optim_t *o);
float *cuda_optim_v(cuda_optim_t *o);
size_t cuda_optim_len(const cuda_optim_t *o);
const optim_config_t *cuda_optim_config(const cuda_optim_t *o);

/* ---- Dynamic loss scaling ---- */

/* Plain struct, embed it. The loss (or the upstream log-prob gradient) is multiplied by
 * `scale` before the backward, and cuda_optim_step is given grad_scale = scale. */
typedef struct {
    double scale;        /* current factor, a power of two in [1, CUDA_LOSS_SCALE_MAX] */
    int growth_interval; /* finite steps in a row before the scale doubles (>= 1) */
    int good_steps;      /* finite steps since the last change */
    long overflows;      /* steps whose gradients were not finite */
} cuda_loss_scaler_t;

#define CUDA_LOSS_SCALE_INIT 65536.0   /* 2^16, as PyTorch's GradScaler */
#define CUDA_LOSS_SCALE_MAX 16777216.0 /* 2^24: beyond it FP16 gradients overflow anyway */
#define CUDA_LOSS_SCALE_GROWTH 2000    /* PyTorch's default growth interval */

/* scale = init_scale rounded down to a power of two and clamped to [1, CUDA_LOSS_SCALE_MAX];
 * growth_interval >= 1. */
void cuda_loss_scaler_init(cuda_loss_scaler_t *ls, double init_scale, int growth_interval);
/* After a step: finite == 0 halves the scale (not below 1) and restarts the count; otherwise
 * growth_interval finite steps in a row double it (not above CUDA_LOSS_SCALE_MAX). */
void cuda_loss_scaler_update(cuda_loss_scaler_t *ls, int finite);

#ifdef __cplusplus
}
#endif

#endif
