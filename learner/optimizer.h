/* AdamW for the model's parameter buffer (TRAINING.md §Update).
 *
 * beta1 0.9, beta2 0.95, eps 1e-8 by default; weight decay decoupled (p *= 1 - lr wd, as
 * PyTorch's AdamW) and applied to matrices only, never to RMSNorm gains or buffers; buffers get
 * no update at all. Learning rate: linear warm-up over warmup_steps, then constant, or a cosine
 * from lr down to 0 at total_steps. Global gradient-norm clipping. A step whose loss or gradient
 * norm is not finite is skipped (nothing changes but the skip count).
 *
 * Compute core (libc + libm): the moments live in `real` buffers laid out like the model's
 * parameters. Bit-identical for a fixed thread count: the gradient norm is summed in fixed
 * chunks, then the chunk sums in order. */
#ifndef QUILLAN_OPTIMIZER_H
#define QUILLAN_OPTIMIZER_H

#include "error.h"
#include "model.h"
#include "real.h"

#include <stddef.h>

typedef enum { OPTIM_LR_CONSTANT = 0, OPTIM_LR_COSINE, OPTIM_LR_COUNT } optim_schedule_t;

typedef struct {
    double lr;        /* peak learning rate (> 0) */
    int warmup_steps; /* >= 0 */
    optim_schedule_t schedule;
    int total_steps;     /* cosine reaches 0 here (>= 1) */
    double weight_decay; /* decoupled, matrices only */
    double beta1, beta2, eps;
    double grad_clip; /* global L2 norm bound; <= 0 = off */
} optim_config_t;

/* Defaults of TRAINING.md: lr 1e-4, no warm-up, constant, wd 0.01, betas 0.9/0.95, eps 1e-8,
 * clip 1.0, total 1000. */
void optim_config_default(optim_config_t *cfg);

/* The learning rate of update number `step` (0-based count of updates applied before it). */
double optim_lr_at(const optim_config_t *cfg, long step);

/* 0 when cfg is usable (lr >= 0, warm-up >= 0, total >= 1, betas in [0, 1), eps > 0, decay >= 0,
 * a known schedule); else -1 with QERR_RANGE naming the settings. optim_new and the CUDA
 * optimizer check with it. */
int optim_config_check(const optim_config_t *cfg, qerr_t *err);

typedef struct optim optim_t;

/* Moments zeroed, for model m (its tensor table decides what decays and what is skipped).
 * NULL with err set (QERR_RANGE for a bad config, QERR_NOMEM). */
optim_t *optim_new(const optim_config_t *cfg, const model_t *m, qerr_t *err);
void optim_destroy(optim_t **o);

typedef struct {
    int applied;      /* 1 updated, 0 skipped as non-finite */
    double grad_norm; /* before clipping (may be inf/nan when skipped) */
    double lr;        /* the rate used (0 when skipped) */
} optim_result_t;

/* One update of m's parameters from m's gradients, unless loss or the gradient norm is not
 * finite (then skipped and counted). Marks m's parameters changed. Does not zero the
 * gradients. Returns res->applied. */
int optim_step(optim_t *o, model_t *m, double loss, optim_result_t *res);

long optim_steps(const optim_t *o);   /* updates applied */
long optim_skipped(const optim_t *o); /* steps skipped */
/* Restores the counters (checkpoint load). */
void optim_set_counts(optim_t *o, long steps, long skipped);
/* First and second moments [optim_len], laid out like the model's parameters. */
real *optim_m(optim_t *o);
real *optim_v(optim_t *o);
size_t optim_len(const optim_t *o);
const optim_config_t *optim_config(const optim_t *o);

#endif
