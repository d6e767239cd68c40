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
    /* TERNARY where the kernels have matmul_ilv[QTYPE_TERNARY]: the kern_ilv(QTYPE_TERNARY)
     * copy of w that the products read (bit-identical results, faster tiles); NULL otherwise. */
    const unsigned char *wx;
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
    unsigned char *ternx; /* the diffusion matrices' interleaved copies (eng_mat_t.wx), owned */
    size_t weight_bytes;  /* of the policy's tensors, without the copies */
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

/* ---- products (engine_kern.c) ---- */

/* One product y[s * ldy + r] = sum_i W[r, i] x[s, i] for every row r of W and s < n. F32, F16,
 * INT4 and INT8 weights take FP32 activations x [n, ldx] (INT4/INT8 rows dequantised to exactly
 * the learner's fake-quantized values inside the kernel, then multiplied in FP32: the learner
 * simulates no activation quantization there). TERNARY weights take int8 activations act
 * (quantized by the caller, act->n == n) and give the exact integer product times s_w times
 * s_x. Views only: nothing is owned. */
typedef struct {
    const eng_mat_t *W;
    const float *x;
    size_t ldx;
    const kern_act_t *act;
    size_t n;
    float *y;
    size_t ldy;
} eng_prod_t;

/* Rows [r0, r1) of one product, on the calling thread. */
void eng_matmul_rows(const kern_ops_t *ops, const eng_prod_t *pr, size_t r0, size_t r1);

/* The chunks of one product (a function of its shape and n only) and chunk c of them on the
 * calling thread: for regions that mix products with other work. */
size_t eng_prod_nchunks(const eng_prod_t *pr);
void eng_prod_chunk(const kern_ops_t *ops, const eng_prod_t *pr, size_t c);

/* nprod (<= 96) products in one parallel region of the pool: the products must be independent
 * (none reads what another writes). Their rows are cut into chunks that depend on the shapes
 * and n only, so results do not depend on the pool's size. */
void eng_matmul_many(kern_pool_t *pool, const kern_ops_t *ops, const eng_prod_t *prods, int nprod);

/* One product as one parallel region. */
void eng_matmul(kern_pool_t *pool, const kern_ops_t *ops, const eng_mat_t *W, const float *x,
                size_t ldx, const kern_act_t *act, size_t n, float *y, size_t ldy);

/* Dequantises row r of W into out[cols] (the learner's fake-quantized values). */
void eng_row_dequant(const eng_mat_t *W, size_t r, float *out);

/* Dot product of row r of a non-ternary matrix with x[cols] (the kernel of eng_matmul_rows on
 * one row, so the same value a product gives). */
float eng_row_dot(const kern_ops_t *ops, const eng_mat_t *W, size_t r, const float *x);

/* ---- time per stage ---- */

typedef enum {
    ENG_STAGE_ATTENTION,
    ENG_STAGE_MOE,
    ENG_STAGE_DIFFUSION,
    ENG_STAGE_HEAD,
    ENG_STAGE_SAMPLE,
    ENG_STAGE_COUNT
} eng_stage_t;

/* Wall-clock seconds per stage (as quillan_stats_t, kept apart so that the public struct
 * stays as it is), and with the pool's timing on (kern_pool_set_timing) the wall seconds the
 * calling thread spent inside parallel regions and their model for the pool's model thread
 * count: the rest of a stage's time is serial. Only clock reads that cost no system call (a
 * CPU-time clock read is one, several microseconds on a virtual machine); benchmarks split
 * the process's CPU time by these fractions. */
typedef struct {
    double wall_s[ENG_STAGE_COUNT], region_s[ENG_STAGE_COUNT], model_s[ENG_STAGE_COUNT];
} eng_time_stats_t;

/* Wall-clock and pool region times of the last lap. */
typedef struct {
    const kern_pool_t *pool;
    double wall, region, model;
} eng_clock_t;

void eng_clock_start(eng_clock_t *c, const kern_pool_t *pool);
/* Adds the times since the last start or lap to *wall_s and to stage `stage` of *ts. */
void eng_clock_lap(eng_clock_t *c, double *wall_s, eng_time_stats_t *ts, eng_stage_t stage);

/* The engine's times per stage since it was made or its stats were reset. */
void eng_engine_time_stats(const quillan_engine_t *e, eng_time_stats_t *out);

/* The engine's thread pool (benchmarks: kern_pool_set_timing). */
kern_pool_t *eng_engine_pool(quillan_engine_t *e);

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
 * and writes logits for the rows that ask. Adds stage wall times to *st and to *ts. */
void eng_forward(eng_fwd_t *f, const quillan_policy_t *p, kern_pool_t *pool, eng_row_t *rows, int n,
                 quillan_stats_t *st, eng_time_stats_t *ts);

/* Monotonic seconds. */
double eng_now(void);

/* ---- routing records as the learner replays them (engine.c) ---- */

/* Unpacks positions [0, n) of sample s's routing and plan records (quillan.h layout, recorded by
 * policy p's engine with record_routing on) into rows [row, row + n) of the learner's replay
 * records: routes[num_layers] (one moe_route_t per layer, made with p's moe_dims_t) and plan
 * (made with p's diffusion bits); each record's BT is raised to row + n where it is less. Here
 * rather than in quillan.h: these are the learner's types (common/moe.h, common/diffusion.h),
 * which the engine's public API does not expose, and only the engine-vs-learner checks
 * (tests/unit/test_engine.c, bench_engine agree) read samples back this way; the learner gets
 * its records through the dispatch codec. Returns 0, or -1 with err (QERR_INVALID: no record in
 * s, or records whose sizes are not p's; QERR_RANGE: n beyond s->n_route, rows beyond a record's
 * max_BT). */
int eng_sample_replay(moe_route_t *routes, diffusion_plan_t *plan, int row,
                      const quillan_policy_t *p, const quillan_sample_t *s, int n, qerr_t *err);

#endif
