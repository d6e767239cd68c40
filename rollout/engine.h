/* Internals of the quantized CPU inference engine behind rollout/quillan.h, shared by its
 * files: engine_policy.c (a loaded policy's weight views), engine_kern.c (threaded matrix
 * products over packed rows), engine_forward.c (the network over a set of token rows with a KV
 * cache), engine.c (the continuous-batching scheduler), sampler.c (sampling).
 *
 * Agreement with the learner (docs/ENGINE.md): every weight is used at exactly the value the
 * learner's fake quantization gives it; activations stay FP32 except where the learner itself
 * quantizes them (the BitLinears of the diffusion stage, whose ternary x int8 products are
 * exact integer sums and so bit-identical); router top-k, gate softmax, RMSNorm, RoPE,
 * attention over the cache, the plan sampler and the sinusoid are the learner's own functions
 * from common/. */
#ifndef QUILLAN_ENGINE_H
#define QUILLAN_ENGINE_H

#include "diffusion.h"
#include "kern_pool.h"
#include "kernels.h"
#include "model_config.h"
#include "moe.h"
#include "qpolicy.h"
#include "quillan.h"
#include "tokenizer.h"

#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>

/* A weight matrix [rows, cols] of packed rows (qtypes.h). */
typedef struct {
    const unsigned char *w;
    qtype_t qt;
    size_t rows, cols, row_bytes;
} eng_mat_t;

/* One layer's weights. Mini j's matrices are views into the stacked tensors. */
typedef struct {
    const float *attn_norm, *moe_norm; /* [C] */
    eng_mat_t wq, wk, wv, wo;          /* F16 [C, C] */
    eng_mat_t ov_w1, ov_w2, gate;      /* F16 [OH, C], [C, OH], [M, C] */
    eng_mat_t *router;                 /* [M] F16 [E, C] */
    eng_mat_t *exp_w1;                 /* [M] INT4 [E * EH, C] */
    eng_mat_t *exp_w2;                 /* [M] INT4 [E * C, EH] */
    eng_mat_t *mic_router;             /* [M] F16 [N, C] */
    eng_mat_t *mic_down, *mic_up;      /* [M] INT8 [N, C] */
    const float *bias_gate;            /* [M] */
    const float **bias_router;         /* [M] -> [E] */
    const float **bias_micro;          /* [M] -> [N] */
} eng_layer_t;

/* The diffusion stage's weights: BitLinears (ternary) and their input norms. */
typedef struct {
    const float *norm;                    /* diffusion.norm.weight [C] */
    eng_mat_t in_z, in_c, time, out, dec; /* [W, Lb], [W, C], [W, D], [Lb, W], [C, Lb] */
    const float *in_z_norm, *in_c_norm, *time_norm, *out_norm, *dec_norm;
    eng_mat_t *up, *down;                           /* [NB] [F, W], [W, F] */
    const float **blk_norm, **up_norm, **down_norm; /* [NB] */
    float *time_emb; /* [K, W]: BL_time(sinusoid(k / K)) for k = 1..K (row k-1), the same for
                      * every position, computed once at load with the learner's arithmetic */
} eng_diff_t;

struct quillan_policy {
    atomic_int refs;
    qpolicy_t *q;
    model_config_t cfg;
    moe_dims_t md;
    diffusion_dims_t dd;
    int route_ints; /* KM * (1 + KE + KN) */
    int Lw;
    const float *embed; /* [V, C] */
    const float *final_norm;
    eng_mat_t head; /* F32 or INT8 [V, C] */
    eng_layer_t *layers;
    eng_diff_t diff;
    size_t weight_bytes;
    /* Snapshot bytes handed over by quillan_policy_load_bytes, released after q. */
    void (*release)(void *ctx, const void *data, size_t len);
    void *release_ctx;
    const void *release_data;
    size_t release_len;
    tokenizer_t *tok; /* NULL when the config's tokenizer could not be loaded */
    qerr_t tok_err;   /* why */
};

/* Resolves every weight view of a parsed policy; computes the time embeddings with ops. Takes
 * q on success. NULL with err naming the tensor on failure. */
quillan_policy_t *eng_policy_new(qpolicy_t *q, qerr_t *err);

/* ---- threaded products (engine_kern.c) ---- */

/* y[s * ldy + r] = sum_i W[r, i] x[s, i] for every row r of W and s < n, rows split over the
 * pool. F32/F16 weights and INT4/INT8 weights take FP32 activations x [n, ldx] (the INT4/INT8
 * rows are dequantised to exactly the learner's fake-quantized values, then multiplied in FP32:
 * the learner simulates no activation quantization there). TERNARY weights take int8
 * activations act (kern_act_t, quantized by the caller) and give the exact integer product
 * times s_w times s_x. */
void eng_matmul(kern_pool_t *pool, const kern_ops_t *ops, const eng_mat_t *W, const float *x,
                size_t ldx, const kern_act_t *act, size_t n, float *y, size_t ldy);

/* Dequantises row r of W into out[cols] (the learner's fake-quantized values). */
void eng_row_dequant(const eng_mat_t *W, size_t r, float *out);

/* Dot product of row r of an INT8 or F16/F32 matrix with x[cols], in FP32 on the dequantised
 * values. */
float eng_row_dot(const eng_mat_t *W, size_t r, const float *x);

/* ---- forward (engine_forward.c) ---- */

/* One token row of a forward: its input token, absolute position, KV cache ([L, cap, C] for K
 * and for V, position p of layer l at (l * cap + p) * C), and where its routing record goes
 * (route [L, route_ints] and plan [2, Lw], either NULL to skip). */
typedef struct {
    int32_t token;
    int pos;
    float *kc, *vc;
    int cap;
    int32_t *route;
    uint64_t *plan;
    float *logits; /* [V] output logits, or NULL when the row needs no head */
} eng_row_t;

typedef struct eng_fwd eng_fwd_t;

/* Scratch for forwards of up to max_rows rows of policy p's shape. */
eng_fwd_t *eng_fwd_new(const quillan_policy_t *p, int max_rows, qerr_t *err);
void eng_fwd_destroy(eng_fwd_t **f);
int eng_fwd_max_rows(const eng_fwd_t *f);
/* 1 when f was made for a policy of p's shape. */
int eng_fwd_fits(const eng_fwd_t *f, const quillan_policy_t *p);

/* Runs the network over n rows (n <= max_rows): writes each row's K and V at its position of
 * every layer, attends over positions 0..pos of its cache (rows of one sequence in one call must
 * come in position order: each sees the K/V the earlier ones wrote), records routing and plan,
 * and writes logits for the rows that ask. Adds stage times to *st. */
void eng_forward(eng_fwd_t *f, const quillan_policy_t *p, kern_pool_t *pool, eng_row_t *rows, int n,
                 quillan_stats_t *st);

/* Monotonic seconds. */
double eng_now(void);

#endif
