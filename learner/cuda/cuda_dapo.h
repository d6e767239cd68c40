/* The DAPO token-level loss on the device (learner/dapo.h is the oracle): decoupled clip
 * (eps_low / eps_high), dual clip, the TIS weight capped at tis_cap, k3 KL to a reference, and
 * the three aggregations, forward (value and every metric of dapo_metrics_t) and backward
 * (d loss / d logp per token).
 *
 * Inputs are FP32 device arrays [B * T] in model_logp()'s layout (row b, position t at
 * b * T + t): logp, logp_old, logp_b (may be NULL: w = 1), logp_ref (required iff
 * cfg->kl_beta > 0), adv, mask (position in the loss when != 0). Per-token math is in double
 * with the same formulas and branches as dapo.c; each launch is one block that sums in a fixed
 * order, so results are deterministic and agree with the CPU to double rounding. One block is
 * plenty: the loss sees B * T log-probs, not logits. */
#ifndef QUILLAN_CUDA_DAPO_H
#define QUILLAN_CUDA_DAPO_H

#include <cuda_runtime_api.h>

#include "cuda_check.h"

#ifdef __cplusplus
extern "C" {
#endif

#include "dapo.h"

/* Most rows (sequences) one call takes: the per-row token counts live in shared memory. */
#define CUDA_DAPO_MAX_ROWS 8192

/* The loss of a mini-batch and its metrics into *out (one dapo_metrics_t in DEVICE memory,
 * ASSIGNED; copy it back with cuda_buf_download). Same contract as dapo_loss_forward.
 * -1 with err filled (QERR_RANGE) when B > CUDA_DAPO_MAX_ROWS, B or T < 0, a required input is
 * NULL, or cfg fails dapo_loss_config_check; 0 when queued. */
int cuda_dapo_loss_forward(dapo_metrics_t *out, const float *logp, const float *logp_old,
                           const float *logp_b, const float *logp_ref, const float *adv,
                           const float *mask, int B, int T, const dapo_loss_config_t *cfg,
                           cudaStream_t s, qerr_t *err);

/* dlogp[B * T] = gradient of dloss x the forward's loss with respect to logp (ASSIGNED, 0 off
 * the loss tokens), as dapo_loss_backward. dloss is the host-side upstream factor (the loss
 * scale under dynamic loss scaling). Errors as cuda_dapo_loss_forward. */
int cuda_dapo_loss_backward(float *dlogp, const float *logp, const float *logp_old,
                            const float *logp_b, const float *logp_ref, const float *adv,
                            const float *mask, int B, int T, const dapo_loss_config_t *cfg,
                            double dloss, cudaStream_t s, qerr_t *err);

#ifdef __cplusplus
}
#endif

#endif
