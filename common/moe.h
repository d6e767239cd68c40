/* The three-level hierarchical mixture of experts of MODEL.md §Hierarchical MoE: forward,
 * backward, routing records for replay, balance and z losses, loss-free balancing biases.
 *
 * For one token u (the caller's RMSNorm(x), width C):
 *   S(u)      = W2s SiLU(W1s u)                                 overseer shared expert
 *   a         = Wg u; keep top KM of a + bias; p = softmax over the kept a
 *   mini_j(u) = sum_{e kept} q_e W2_e ReLU²(W1_e u)             router Wr_j, top KE, softmax
 *             + sum_{i kept} w_i SiLU(down_i . u) up_i          micro router Wm_j, top KN
 *   HierMoE(u) = S(u) + sum_{j kept} p_j mini_j(u)
 *
 * Router logits are computed in `real` (FP32 in the normal build) from the weights given. The
 * forward uses the weights exactly as passed: the caller fake-quantizes its latent weights
 * (FP16 overseer and routers, INT4 experts, INT8 micro vectors; quant.h) into the moe_params_t
 * it passes as `p`, and since every STE here is the identity, the gradients the backward
 * accumulates are the gradients of the latent weights.
 *
 * Routers are numbered for losses and loads: the primary gate (M choices), then each mini's
 * expert router (E choices), then each mini's micro router (N choices): 1 + 2M per layer.
 * Every top-k keeps the largest scores with ties broken by the LOWEST index, in both learner
 * and worker (moe_topk). */
#ifndef QUILLAN_MOE_H
#define QUILLAN_MOE_H

#include "error.h"
#include "model_config.h"
#include "real.h"

#include <stdint.h>

/* Sizes of one HierMoE layer (MODEL.md config keys in brackets). */
typedef struct {
    int C;  /* model width d [dim] */
    int OH; /* overseer hidden [overseer_hidden] */
    int M;  /* mini MoEs [num_mini_moes] */
    int KM; /* kept minis per token [top_k_minis], 1..M */
    int E;  /* experts per mini [num_experts_per_mini] */
    int KE; /* kept experts per kept mini [top_k_experts], 1..E */
    int EH; /* expert hidden [expert_hidden] */
    int N;  /* micro agents per mini [num_micros_per_mini] */
    int KN; /* kept micro agents per kept mini [top_k_micros], 1..N */
} moe_dims_t;

/* Copies the sizes out of a validated model config. */
void moe_dims_from_config(moe_dims_t *d, const model_config_t *cfg);

/* Parameter tensors of one layer (or their gradients: the same struct). Minis are stacked along
 * the first axis, so mini j's tensor of MODEL.md's name list starts at j times its size.
 * Borrowed pointers; the struct owns nothing. */
typedef struct {
    real *ov_w1;      /* [OH, C]        overseer.w1.weight */
    real *ov_w2;      /* [C, OH]        overseer.w2.weight */
    real *gate;       /* [M, C]         overseer.gate.weight */
    real *router;     /* [M, E, C]      minis.{j}.router.weight */
    real *exp_w1;     /* [M, E, EH, C]  minis.{j}.experts.w1 */
    real *exp_w2;     /* [M, E, C, EH]  minis.{j}.experts.w2 */
    real *mic_router; /* [M, N, C]      minis.{j}.micro.router.weight */
    real *mic_down;   /* [M, N, C]      minis.{j}.micro.down */
    real *mic_up;     /* [M, N, C]      minis.{j}.micro.up */
} moe_params_t;

/* Element counts of each tensor of moe_params_t, in declaration order; returns the total. */
size_t moe_params_sizes(const moe_dims_t *d, size_t sizes[9]);

/* Points the nine tensors of *p into one buffer of moe_params_sizes() reals, in declaration
 * order (the buffer stays the caller's). */
void moe_params_map(moe_params_t *p, real *buf, const moe_dims_t *d);

/* Loss-free balancing biases (buffers, not trained by gradient; they travel in snapshots),
 * added to the router logits for the top-k selection only, never to gate weights. Borrowed. */
typedef struct {
    real *gate;   /* [M]    overseer.gate.bias_balance */
    real *router; /* [M, E] minis.{j}.router.bias_balance */
    real *micro;  /* [M, N] minis.{j}.micro.router.bias_balance */
} moe_bias_t;

/* Selection counts per choice of every router, summed over forwards until reset (one
 * optimizer step). Embedded struct: _init allocates (zeroed), _free releases. */
typedef struct {
    int M, E, N;
    int64_t *gate;   /* [M] */
    int64_t *router; /* [M, E] */
    int64_t *micro;  /* [M, N] */
} moe_load_t;

int moe_load_init(moe_load_t *load, const moe_dims_t *d, qerr_t *err);
void moe_load_reset(moe_load_t *load);
void moe_load_free(moe_load_t *load);

/* b_k += rate * sign(mean load - load_k) for every router of the layer (MODEL.md, DeepSeek-V3),
 * using the counts in *load; a router that saw no token is unchanged. Does not reset *load. */
void moe_bias_update(moe_bias_t *bias, const moe_load_t *load, real rate);

/* The routing of one layer for BT tokens: the kept indices at every router, in selection
 * order. For token t and its m-th kept mini (mini[t*KM + m]), the kept experts are
 * expert[(t*KM + m)*KE + i] and the kept micro agents micro[(t*KM + m)*KN + i], both local to
 * that mini. This is what a worker records per generated token and the learner replays.
 * Embedded struct: _init allocates room for max_BT tokens, _free releases. */
typedef struct {
    int BT, max_BT;
    int KM, KE, KN;
    int32_t *mini;   /* [BT, KM] */
    int32_t *expert; /* [BT, KM, KE] */
    int32_t *micro;  /* [BT, KM, KN] */
} moe_route_t;

int moe_route_init(moe_route_t *r, const moe_dims_t *d, int max_BT, qerr_t *err);
void moe_route_free(moe_route_t *r);

/* Checks a record from outside (a worker's) against the sizes: BT and k's match, every index
 * in range and distinct within its router. Returns 0, or -1 with QERR_INVALID naming the token,
 * router and index. */
int moe_route_validate(const moe_route_t *r, const moe_dims_t *d, int BT, qerr_t *err);

/* idx[0..k) = indices of the k largest logits[i] + bias[i] (bias may be NULL), in decreasing
 * order of that score; equal scores keep the lower index first. 1 <= k <= n. */
void moe_topk(int32_t *idx, const real *logits, const real *bias, int n, int k);

/* w[i] = softmax over the kept logits: exp(logits[idx[i]]) / sum_j exp(logits[idx[j]]). */
void moe_gate_forward(real *w, const real *logits, const int32_t *idx, int k);
/* ACCUMULATES dlogits[idx[i]] += w_i (dw_i - sum_j w_j dw_j). */
void moe_gate_backward(real *dlogits, const real *dw, const real *w, const int32_t *idx, int k);

/* One router's Switch balance loss n * sum_k f_k P_k over T tokens (logits [T, n] without bias,
 * idx [T, k] the kept choices): f_k = share of the T*k slots given to k, P_k = mean softmax
 * probability; f[n] and P[n] are ASSIGNED (f is needed by the backward). Returns the loss;
 * T = 0 gives 0 (and zero f, P). */
real moe_balance_forward(real *f, real *P, const real *logits, const int32_t *idx, int T, int n,
                         int k);
/* ACCUMULATES dlogits [T, n] += dloss * d(loss)/d(logits), f [n] from the forward held
 * constant (counts carry no gradient). */
void moe_balance_backward(real *dlogits, real dloss, const real *f, const real *logits, int T,
                          int n);

/* One router's z-loss: mean over T tokens of logsumexp(logits[t])^2. T = 0 gives 0. */
real moe_zloss_forward(const real *logits, int T, int n);
/* ACCUMULATES dlogits [T, n] += dloss * 2 lse_t softmax(logits[t]) / T. */
void moe_zloss_backward(real *dlogits, real dloss, const real *logits, int T, int n);

/* One expert on n gathered rows x [n, C]: pre = x W1^T [n, EH] (saved for the backward),
 * out = ReLU²(pre) W2^T [n, C]; both ASSIGNED. w1 [EH, C], w2 [C, EH]; scratch [n, EH]. */
void moe_expert_forward(real *out, real *pre, real *scratch, const real *x, const real *w1,
                        const real *w2, int n, int C, int EH);
/* ACCUMULATES dx [n, C], dw1, dw2. Needs scratch [n, EH]. */
void moe_expert_backward(real *dx, real *dw1, real *dw2, real *scratch, const real *dout,
                         const real *pre, const real *x, const real *w1, const real *w2, int n,
                         int C, int EH);

/* The per-layer results of a forward: loss sums over the routers reached by at least one token
 * (so the caller can average over all layers' routers) and routing statistics. */
typedef struct {
    double balance;  /* sum over reached routers of n sum_k f_k P_k */
    double z;        /* sum over reached routers of mean lse^2 */
    int routers;     /* routers reached by at least one token */
    long decisions;  /* router evaluations (token x router) */
    long mismatches; /* under replay: decisions whose own top-k set differs from the record's */
} moe_aux_t;

/* Saved activations and scratch of one layer for up to max_BT tokens (opaque, heap). */
typedef struct moe_acts moe_acts_t;

moe_acts_t *moe_acts_new(const moe_dims_t *d, int max_BT, qerr_t *err);
void moe_acts_destroy(moe_acts_t **acts);

/* The routing the last forward used (its own choice, or the replayed record): valid until the
 * next forward; owned by acts. */
const moe_route_t *moe_acts_route(const moe_acts_t *acts);

/* y [BT, C] = HierMoE(u [BT, C]) (ASSIGNED); fills *aux (ASSIGNED) and adds the selection counts
 * to *load (may be NULL). bias may be NULL (no loss-free balancing). With replay == NULL every
 * router picks its own top-k; otherwise the record's indices are used instead (routing replay:
 * gate weights still come from the logits of the kept indices) and aux->mismatches counts the
 * decisions whose own choice would have differed. Experts are computed grouped: each expert's
 * weights are read once per call for all the tokens routed to it. Returns 0, or -1 with
 * QERR_INVALID when the replayed record is malformed (nothing else fails). */
int moe_forward(moe_acts_t *acts, real *y, moe_aux_t *aux, moe_load_t *load, const real *u,
                const moe_params_t *p, const moe_bias_t *bias, const moe_route_t *replay,
                const moe_dims_t *d, int BT, qerr_t *err);
/* Backward of the last moe_forward on acts with the same u and p. The loss is
 * L(y) + dbalance * aux.balance + dz * aux.z, i.e. dbalance = aux.balance weight / total routers
 * counted over all layers. ACCUMULATES into du [BT, C] and every tensor of *dp. */
void moe_backward(moe_params_t *dp, real *du, const real *dy, moe_acts_t *acts, const real *u,
                  const moe_params_t *p, real dbalance, real dz, const moe_dims_t *d, int BT);

#endif
