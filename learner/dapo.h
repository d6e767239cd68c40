/* The DAPO algorithm math of TRAINING.md: overlong shaping, group advantages, the
 * dynamic-sampling filter, and the token-level clipped policy loss with its forward (value and
 * metrics) and backward (d loss / d log pi_theta per token).
 *
 * Compute core (libc + libm), written against `real` (float normally, double in the
 * gradient-check build). Group-level quantities (rewards, advantages) are doubles; the
 * per-token arrays are `real`. Every accumulation is in double, in a fixed order, so results
 * are bit-identical run to run.
 *
 * Token layout of the loss: B rows (one sequence each: prompt and completion) of T positions,
 * row-major [B, T], exactly the layout of model_logp(). Position (b, t) is in the loss when
 * mask[b*T + t] != 0; the mask is 0 on prompt positions, padding, samples without a reward and
 * tokens the sampler drew outside the learner's own truncation. */
#ifndef QUILLAN_DAPO_H
#define QUILLAN_DAPO_H

#include "error.h"
#include "real.h"

#include <stdint.h>

/* Added to the standard deviation of a group's rewards before dividing (TRAINING.md). */
#define DAPO_STD_EPS 1e-6

/* ---- Overlong shaping ---- */

/* The overlong penalty of a completion of L tokens (TRAINING.md §Batch assembly), in [-1, 0]:
 *   0                                   if L <= max_len - cache,
 *   ((max_len - cache) - L) / cache     if max_len - cache < L <= max_len,
 *   -1                                  if the completion was truncated (hit the token limit
 *                                       without ending) or L > max_len.
 * Requires 1 <= cache <= max_len and L >= 0 (asserted: the caller validated its config). It is
 * added to the reward before advantages. */
double dapo_overlong_penalty(int L, int truncated, int max_len, int cache);

/* ---- Advantages ---- */

typedef struct {
    int normalize_std; /* 1: divide by (std + DAPO_STD_EPS) (GRPO/DAPO); 0: Dr. GRPO, no std */
    int clip;          /* 1: clamp A to [clip_lo, clip_hi]. Off by default: a clip to [0, 1]
                        * throws away the negative half of the signal (wrong answers are never
                        * pushed down), so use it only knowingly */
    double clip_lo, clip_hi;
} dapo_adv_config_t;

/* normalize_std 1, no clip. */
void dapo_adv_config_default(dapo_adv_config_t *cfg);

/* Advantages of one group of G samples: A_i = (R_i - mean) / (std + DAPO_STD_EPS) over the
 * valid rewards, std with N - 1 (as veRL and TRL), or R_i - mean when normalize_std is 0, then
 * the optional clamp. A sample has no reward when has_reward[i] == 0 (has_reward may be NULL)
 * or reward[i] is NaN: it is excluded from the mean and std and gets A = 0 (the caller masks
 * its tokens out of the loss). A group with fewer than 2 valid rewards gets A = 0 everywhere.
 * adv[G] is ASSIGNED. Returns the number of valid rewards. G >= 1. */
int dapo_group_advantages(double *adv, const double *reward, const uint8_t *has_reward, int G,
                          const dapo_adv_config_t *cfg);

/* ---- Dynamic sampling ---- */

typedef enum {
    DAPO_GROUP_KEEP = 0,  /* at least two different valid rewards: carries a gradient */
    DAPO_GROUP_EQUAL,     /* every valid reward equal (compared exactly): no gradient */
    DAPO_GROUP_FEW_VALID, /* fewer than 2 valid rewards: A = 0, no gradient */
    DAPO_GROUP_COUNT
} dapo_group_verdict_t;

/* The dynamic-sampling verdict of a group from its SHAPED rewards (after overlong shaping,
 * since those are what the advantages see); "no reward" samples as in dapo_group_advantages
 * are ignored. With dynamic sampling on, every verdict but KEEP drops the group. */
dapo_group_verdict_t dapo_group_classify(const double *shaped, const uint8_t *has_reward, int G);

/* ---- Token-level loss ---- */

typedef enum {
    DAPO_AGG_TOKEN_MEAN = 0,          /* DAPO: sum / (loss tokens of the mini-batch) */
    DAPO_AGG_SEQ_MEAN_TOKEN_MEAN,     /* GRPO: mean over sequences of per-sequence means */
    DAPO_AGG_SEQ_MEAN_TOKEN_SUM_NORM, /* Dr. GRPO: sum / (sequences x max_new_tokens) */
    DAPO_AGG_COUNT
} dapo_agg_t;

typedef struct {
    double eps_low, eps_high; /* clip(r, 1 - eps_low, 1 + eps_high): 0.2 and 0.28 (Clip-Higher) */
    double dual_clip;         /* > 1: for A < 0 the loss is capped at -A * dual_clip (3.0);
                               * 0: off */
    double tis_cap;           /* w = min(exp(logp_old - logp_b), tis_cap), > 0 (2.0) */
    double kl_beta;           /* >= 0; > 0 adds beta x k3 KL to the reference (logp_ref) */
    dapo_agg_t agg;
    int max_new_tokens; /* Dr. GRPO's normaliser (>= 1) */
} dapo_loss_config_t;

/* TRAINING.md defaults: 0.2 / 0.28, dual clip 3.0, TIS cap 2.0, no KL, token-mean; the caller
 * sets max_new_tokens (default 1 here only so the struct validates). */
void dapo_loss_config_default(dapo_loss_config_t *cfg);

/* Checks the ranges above; -1 with QERR_RANGE naming the field. */
int dapo_loss_config_check(const dapo_loss_config_t *cfg, qerr_t *err);

/* Forward results. Fractions and means are over the loss tokens (mask != 0); all 0 when there
 * are none. */
typedef struct {
    double loss;         /* pg + kl_beta * kl: the value the backward differentiates */
    double pg;           /* aggregated w * pg (loss/pg) */
    double kl;           /* aggregated k3 KL to the reference, before beta (0 when beta == 0) */
    long tokens;         /* loss tokens */
    long pg_tokens;      /* loss tokens with A != 0; 0 means the step carries no policy gradient and
                          * the caller must skip it (never step on aux losses alone) */
    int seqs;            /* rows with at least one loss token */
    double clipfrac_low; /* policy/clipfrac_low: A < 0 and r < 1 - eps_low (gradient cut) */
    double clipfrac_high;    /* policy/clipfrac_high: A > 0 and r > 1 + eps_high (gradient cut) */
    double clipfrac_dual;    /* A < 0 and r > dual_clip (gradient cut by the dual clip) */
    double approx_kl;        /* policy/approx_kl: mean k3 estimate of KL(old || theta) on the
                              * sampled tokens, rho - 1 - log rho with rho = exp(logp - logp_old):
                              * non-negative, unbiased for tokens drawn from the old policy */
    double ratio_mean;       /* mean r: collapses far below 1 on a silent weight-sync failure */
    double tis_mean_weight;  /* tis/mean_weight: mean w after the cap */
    double tis_clipped_frac; /* tis/clipped_frac: exp(logp_old - logp_b) > tis_cap */
    double mismatch_kl;      /* mismatch/kl: mean k3 estimate of KL(behaviour || old), rho - 1 -
                              * log rho with rho = exp(logp_old - logp_b); 0 at equal log-probs */
    double is_min, is_max;   /* mismatch/is_min, is_max: extremes of exp(logp_old - logp_b) */
} dapo_metrics_t;

/* The loss of a mini-batch [B, T] and its metrics. Per loss token, with A = adv:
 *   r  = exp(logp - logp_old)
 *   pg = -min(r A, clip(r, 1 - eps_low, 1 + eps_high) A); if A < 0: pg = min(pg, -A dual_clip)
 *   w  = min(exp(logp_old - logp_b), tis_cap), a constant (1 when logp_b is NULL)
 *   l  = w pg;  k3 = exp(logp_ref - logp) - (logp_ref - logp) - 1 (when kl_beta > 0)
 * aggregated per cfg->agg with weights c_t: token-mean 1/N (N loss tokens), seq-mean-token-mean
 * 1/(S n_b) (S rows with a loss token, n_b the row's loss tokens), seq-mean-token-sum-norm
 * 1/(S max_new_tokens); loss = sum c_t l_t + kl_beta sum c_t k3_t. Rows without loss tokens
 * (no reward, prompt only) count in no denominator. Tokens with A == 0 contribute 0 but stay
 * in the denominators (the group was kept).
 * Inputs [B*T]: logp (current policy), logp_old, logp_b (behaviour, may be NULL), logp_ref
 * (required iff kl_beta > 0, else ignored), adv, mask. cfg must pass dapo_loss_config_check. */
void dapo_loss_forward(dapo_metrics_t *out, const real *logp, const real *logp_old,
                       const real *logp_b, const real *logp_ref, const real *adv, const real *mask,
                       int B, int T, const dapo_loss_config_t *cfg);

/* Gradient of dloss x (the forward's loss) with respect to logp: dlogp[B*T] is ASSIGNED (0 off
 * the loss tokens), ready for model_backward. Per loss token c_t (w dpg/dlogp + kl_beta
 * dk3/dlogp) dloss, where dpg/dlogp = -A r except where a clip makes pg constant in r (A > 0
 * and r > 1 + eps_high; A < 0 and r < 1 - eps_low; A < 0 and r > dual_clip): there 0. At a
 * kink the one-sided gradient of the unclipped side is used. */
void dapo_loss_backward(real *dlogp, const real *logp, const real *logp_old, const real *logp_b,
                        const real *logp_ref, const real *adv, const real *mask, int B, int T,
                        const dapo_loss_config_t *cfg, double dloss);

#endif
