#include "model.h"

#include "alloc.h"
#include "attention.h"
#include "diffusion.h"
#include "gemm.h"
#include "layers.h"
#include "rng.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#ifdef _OPENMP
#define OMP_PRAGMA(x) _Pragma(#x)
#else
#define OMP_PRAGMA(x)
#endif

/* Initial standard deviation of every matrix (GPT-2); projections that write into the residual
 * stream are scaled by 1/sqrt(2L) so the stream's variance does not grow with depth. */
#define MODEL_INIT_STD 0.02
/* Elements per initialisation stream: chunks are independent, so any thread split gives the
 * same weights. */
#define MODEL_INIT_CHUNK 4096

/* Offsets (in reals) of one layer's tensors in the parameter buffer. */
typedef struct {
    size_t attn_norm, wq, wk, wv, wo, moe_norm;
    size_t moe;  /* start of the nine moe_params_t tensors, in moe_params_map order */
    size_t bias; /* gate [M], router [M, E], micro [M, N] */
} layer_ofs_t;

/* Saved activations of one layer for the planned B x T. */
typedef struct {
    real *x;     /* [BT, C] layer input */
    real *ln1;   /* [BT, C] */
    real *rstd1; /* [BT] */
    real *q;     /* [BT, C] after RoPE */
    real *k;     /* [BT, C] after RoPE */
    real *v;     /* [BT, C] */
    real *att;   /* [BT, C] attention output before wo */
    real *lse;   /* [B, NH, T] */
    real *xmid;  /* [BT, C] after the attention residual */
    real *ln2;   /* [BT, C] */
    real *rstd2; /* [BT] */
    moe_acts_t *moe;
} layer_acts_t;

/* The diffusion stage's run-time state for the planned B x T. */
typedef struct {
    real *xd;        /* [BT, C] the stage's input (residual stream after the MoE) */
    real *u;         /* [BT, C] RMSNorm(xd) with diffusion.norm.weight */
    real *rstd;      /* [BT] */
    real *tau;       /* [BT] training noise levels */
    real *mask;      /* [BT] 1 where the loss path ran */
    int32_t *pos;    /* [BT] absolute positions */
    uint64_t *code;  /* [BT, Lw] clean codes of the targets */
    uint64_t *noise; /* [BT, Lw] flip masks */
    diffusion_acts_t *acts;
    int loss_ran;
} diff_state_t;

struct model {
    model_config_t cfg;
    diffusion_dims_t dd;
    size_t diff_norm, diff_R, diff; /* diffusion.norm.weight, diffusion.R, the stage's tensors */
    diff_state_t ds;
    moe_dims_t md;

    model_tensor_t *tensors;
    size_t n_tensors, cap_tensors;
    size_t n_reals;

    real *params; /* [n_reals] latent FP32 weights and buffers; NULL when frozen */
    real *grads;  /* [n_reals]; NULL when frozen */
    real *qp;     /* [n_reals] fake-quantized copy used by the forward; a frozen model's only
                   * copy, buffers included */
    int q_dirty;
    int frozen;         /* made by model_new_frozen: forward only */
    int has_weights;    /* frozen: qp holds weights (a forward before that is refused) */
    uint64_t q_version; /* advanced on every refresh of qp: the diffusion stage's code cache */

    size_t embed, final_norm, head;
    layer_ofs_t *lofs; /* [L] */
    moe_load_t *loads; /* [L] selection counts since the last balance update */

    /* Activation memory planned for max_B x max_T; the arena holds every real buffer. */
    int max_B, max_T;
    real *arena;
    size_t arena_reals;
    layer_acts_t *la;                     /* [L] */
    real *xL;                             /* [BT, C] final residual stream */
    real *lnf;                            /* [BT, C] */
    real *rstdf;                          /* [BT] */
    real *logp, *entropy, *lse_h, *dlogp; /* [BT] */
    real *br;                             /* [BT, C] branch output / its gradient */
    real *dx;                             /* [BT, C] residual-stream gradient */
    real *d1, *d2, *d3, *d4;              /* [BT, C] gradient scratch */
    real *head_scratch;                   /* [head_scratch_len(C)] */
    real *gath;                           /* [max_B, C] gathered rows for greedy */

    /* The last forward, for the backward. */
    int fB, fT;
    int has_fwd;
    int training;
    uint64_t noise_key;
    real temperature;
    real aux_balance, aux_z, aux_diffusion;
    int routers; /* routers reached, summed over layers */
    const int32_t *tokens, *targets;
    const real *weights;
};

static void diff_state_free(diff_state_t *ds);

/* The buffer holding the tensors the forward reads unquantized (embedding, balancing biases,
 * R): the latent weights, where model_balance_update moves the biases without a refresh, or a
 * frozen model's one copy. */
static real *unquantized(const model_t *m) {
    return m->frozen ? m->qp : m->params;
}

/* ---- Tensor table ---- */

static int table_add(model_t *m, size_t offset, model_param_kind_t kind, model_component_t comp,
                     quant_type_t fake, quant_type_t rollout, int ndim, const int64_t *shape,
                     const char *fmt, ...) __attribute__((format(printf, 9, 10)));

static int table_add(model_t *m, size_t offset, model_param_kind_t kind, model_component_t comp,
                     quant_type_t fake, quant_type_t rollout, int ndim, const int64_t *shape,
                     const char *fmt, ...) {
    if (m->n_tensors == m->cap_tensors) {
        size_t cap = m->cap_tensors ? 2 * m->cap_tensors : 64;
        model_tensor_t *t = realloc(m->tensors, cap * sizeof *t);
        if (!t)
            return -1;
        m->tensors = t;
        m->cap_tensors = cap;
    }
    model_tensor_t *t = &m->tensors[m->n_tensors++];
    memset(t, 0, sizeof *t);
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(t->name, sizeof t->name, fmt, ap);
    va_end(ap);
    t->ndim = ndim;
    t->numel = 1;
    for (int i = 0; i < ndim; i++) {
        t->shape[i] = shape[i];
        t->numel *= (size_t)shape[i];
    }
    t->offset = offset;
    t->kind = kind;
    t->component = comp;
    t->fake = fake;
    t->rollout = rollout;
    t->in_rollout = 1;
    if (offset + t->numel > m->n_reals)
        m->n_reals = offset + t->numel;
    return 0;
}

#define SHAPE(...) ((const int64_t[]){__VA_ARGS__})
#define NDIM(...) ((int)(sizeof((const int64_t[]){__VA_ARGS__}) / sizeof(int64_t)))
/* Appends a tensor at the end of the buffer. */
#define ADD(kind, comp, fake, rollout, shape_list, ...)                                            \
    table_add(m, m->n_reals, kind, comp, fake, rollout, NDIM shape_list, SHAPE shape_list,         \
              __VA_ARGS__)

/* The stage's tensors in diffusion_params_map order; per-block tensors are views into the
 * stacked [NB, ...] arrays. */
static int build_diffusion_table(model_t *m) {
    const int64_t C = m->cfg.dim;
    const diffusion_dims_t *d = &m->dd;
    const int64_t Lb = d->Lb, W = d->W, F = d->F, D = d->D;
    const model_param_kind_t G = MODEL_PARAM_GAIN, X = MODEL_PARAM_MATRIX;
    const model_component_t N = MODEL_COMP_NORMS, BL = MODEL_COMP_DIFFUSION;
    const quant_type_t f32 = QUANT_F32, tern = QUANT_TERNARY;
    int rc = 0;
    m->diff_norm = m->n_reals;
    rc |= ADD(G, N, f32, f32, (C), "diffusion.norm.weight");
    m->diff_R = m->n_reals;
    rc |= ADD(MODEL_PARAM_BUFFER, MODEL_COMP_BUFFERS, f32, f32, (Lb, C), "diffusion.R");
    if (rc == 0)
        m->tensors[m->n_tensors - 1].in_rollout = 0; /* the plan sampler never needs R */
    size_t sz[DIFFUSION_NUM_TENSORS], o[DIFFUSION_NUM_TENSORS];
    diffusion_params_sizes(d, sz);
    m->diff = o[0] = m->n_reals;
    for (int i = 1; i < DIFFUSION_NUM_TENSORS; i++)
        o[i] = o[i - 1] + sz[i - 1];
    rc |= table_add(m, o[0], X, BL, f32, tern, 2, SHAPE(W, Lb), "diffusion.in_z.weight");
    rc |= table_add(m, o[1], G, N, f32, f32, 1, SHAPE(Lb), "diffusion.in_z.norm");
    rc |= table_add(m, o[2], X, BL, f32, tern, 2, SHAPE(W, C), "diffusion.in_c.weight");
    rc |= table_add(m, o[3], G, N, f32, f32, 1, SHAPE(C), "diffusion.in_c.norm");
    rc |= table_add(m, o[4], X, BL, f32, tern, 2, SHAPE(W, D), "diffusion.time.weight");
    rc |= table_add(m, o[5], G, N, f32, f32, 1, SHAPE(D), "diffusion.time.norm");
    for (int n = 0; n < d->NB; n++) {
        const size_t nn = (size_t)n;
        rc |= table_add(m, o[6] + nn * W, G, N, f32, f32, 1, SHAPE(W),
                        "diffusion.blocks.%d.norm.weight", n);
        rc |= table_add(m, o[7] + nn * F * W, X, BL, f32, tern, 2, SHAPE(F, W),
                        "diffusion.blocks.%d.up.weight", n);
        rc |= table_add(m, o[8] + nn * W, G, N, f32, f32, 1, SHAPE(W),
                        "diffusion.blocks.%d.up.norm", n);
        rc |= table_add(m, o[9] + nn * W * F, X, BL, f32, tern, 2, SHAPE(W, F),
                        "diffusion.blocks.%d.down.weight", n);
        rc |= table_add(m, o[10] + nn * F, G, N, f32, f32, 1, SHAPE(F),
                        "diffusion.blocks.%d.down.norm", n);
    }
    rc |= table_add(m, o[11], X, BL, f32, tern, 2, SHAPE(Lb, W), "diffusion.out.weight");
    rc |= table_add(m, o[12], G, N, f32, f32, 1, SHAPE(W), "diffusion.out.norm");
    rc |= table_add(m, o[13], X, BL, f32, tern, 2, SHAPE(C, Lb), "diffusion.dec.weight");
    rc |= table_add(m, o[14], G, N, f32, f32, 1, SHAPE(Lb), "diffusion.dec.norm");
    return rc;
}

static int build_table(model_t *m) {
    const model_config_t *c = &m->cfg;
    const int64_t V = c->vocab_size, C = c->dim;
    const moe_dims_t *d = &m->md;
    const quant_type_t head_q = c->head_int8 ? QUANT_INT8 : QUANT_F32;
    int rc = 0;

    m->embed = m->n_reals;
    rc |= ADD(MODEL_PARAM_MATRIX, MODEL_COMP_EMBED, QUANT_F32, QUANT_F32, (V, C), "embed.weight");
    for (int l = 0; l < c->num_layers; l++) {
        layer_ofs_t *o = &m->lofs[l];
        o->attn_norm = m->n_reals;
        rc |= ADD(MODEL_PARAM_GAIN, MODEL_COMP_NORMS, QUANT_F32, QUANT_F32, (C),
                  "layers.%d.attn_norm.weight", l);
        const char *proj[4] = {"wq", "wk", "wv", "wo"};
        size_t *po[4] = {&o->wq, &o->wk, &o->wv, &o->wo};
        for (int i = 0; i < 4; i++) {
            *po[i] = m->n_reals;
            rc |= ADD(MODEL_PARAM_MATRIX, MODEL_COMP_ATTENTION, QUANT_F16, QUANT_F16, (C, C),
                      "layers.%d.attn.%s.weight", l, proj[i]);
        }
        o->moe_norm = m->n_reals;
        rc |= ADD(MODEL_PARAM_GAIN, MODEL_COMP_NORMS, QUANT_F32, QUANT_F32, (C),
                  "layers.%d.moe_norm.weight", l);

        /* The MoE tensors in moe_params_map order; minis stacked along the first axis. */
        size_t sz[9];
        moe_params_sizes(d, sz);
        size_t base[9];
        o->moe = m->n_reals;
        base[0] = o->moe;
        for (int i = 1; i < 9; i++)
            base[i] = base[i - 1] + sz[i - 1];
        rc |= table_add(m, base[0], MODEL_PARAM_MATRIX, MODEL_COMP_OVERSEER, QUANT_F16, QUANT_F16,
                        2, SHAPE(d->OH, C), "layers.%d.overseer.w1.weight", l);
        rc |= table_add(m, base[1], MODEL_PARAM_MATRIX, MODEL_COMP_OVERSEER, QUANT_F16, QUANT_F16,
                        2, SHAPE(C, d->OH), "layers.%d.overseer.w2.weight", l);
        rc |= table_add(m, base[2], MODEL_PARAM_MATRIX, MODEL_COMP_OVERSEER, QUANT_F16, QUANT_F16,
                        2, SHAPE(d->M, C), "layers.%d.overseer.gate.weight", l);
        for (int j = 0; j < d->M; j++) {
            rc |= table_add(m, base[3] + (size_t)j * (sz[3] / d->M), MODEL_PARAM_MATRIX,
                            MODEL_COMP_ROUTERS, QUANT_F16, QUANT_F16, 2, SHAPE(d->E, C),
                            "layers.%d.minis.%d.router.weight", l, j);
            rc |= table_add(m, base[4] + (size_t)j * (sz[4] / d->M), MODEL_PARAM_MATRIX,
                            MODEL_COMP_EXPERTS, QUANT_INT4, QUANT_INT4, 3, SHAPE(d->E, d->EH, C),
                            "layers.%d.minis.%d.experts.w1", l, j);
            rc |= table_add(m, base[5] + (size_t)j * (sz[5] / d->M), MODEL_PARAM_MATRIX,
                            MODEL_COMP_EXPERTS, QUANT_INT4, QUANT_INT4, 3, SHAPE(d->E, C, d->EH),
                            "layers.%d.minis.%d.experts.w2", l, j);
            rc |= table_add(m, base[6] + (size_t)j * (sz[6] / d->M), MODEL_PARAM_MATRIX,
                            MODEL_COMP_MICRO_ROUTER, QUANT_F16, QUANT_F16, 2, SHAPE(d->N, C),
                            "layers.%d.minis.%d.micro.router.weight", l, j);
            rc |= table_add(m, base[7] + (size_t)j * (sz[7] / d->M), MODEL_PARAM_MATRIX,
                            MODEL_COMP_MICRO, QUANT_INT8, QUANT_INT8, 2, SHAPE(d->N, C),
                            "layers.%d.minis.%d.micro.down", l, j);
            rc |= table_add(m, base[8] + (size_t)j * (sz[8] / d->M), MODEL_PARAM_MATRIX,
                            MODEL_COMP_MICRO, QUANT_INT8, QUANT_INT8, 2, SHAPE(d->N, C),
                            "layers.%d.minis.%d.micro.up", l, j);
        }
        Q_ASSERT(m->n_reals == base[8] + sz[8]);

        /* Balancing biases: gate [M], then router [M, E], then micro [M, N]. */
        o->bias = m->n_reals;
        rc |= ADD(MODEL_PARAM_BUFFER, MODEL_COMP_BUFFERS, QUANT_F32, QUANT_F32, (d->M),
                  "layers.%d.overseer.gate.bias_balance", l);
        const size_t rb = m->n_reals, mb = rb + (size_t)d->M * d->E;
        for (int j = 0; j < d->M; j++)
            rc |= table_add(m, rb + (size_t)j * d->E, MODEL_PARAM_BUFFER, MODEL_COMP_BUFFERS,
                            QUANT_F32, QUANT_F32, 1, SHAPE(d->E),
                            "layers.%d.minis.%d.router.bias_balance", l, j);
        for (int j = 0; j < d->M; j++)
            rc |= table_add(m, mb + (size_t)j * d->N, MODEL_PARAM_BUFFER, MODEL_COMP_BUFFERS,
                            QUANT_F32, QUANT_F32, 1, SHAPE(d->N),
                            "layers.%d.minis.%d.micro.router.bias_balance", l, j);
    }
    rc |= build_diffusion_table(m);
    m->final_norm = m->n_reals;
    rc |= ADD(MODEL_PARAM_GAIN, MODEL_COMP_NORMS, QUANT_F32, QUANT_F32, (C), "final_norm.weight");
    m->head = m->n_reals;
    rc |= ADD(MODEL_PARAM_MATRIX, MODEL_COMP_HEAD, head_q, head_q, (V, C), "head.weight");
    return rc;
}

static int ends_with(const char *s, const char *suffix) {
    size_t n = strlen(s), k = strlen(suffix);
    return n >= k && strcmp(s + n - k, suffix) == 0;
}

/* Standard deviation of a matrix at initialisation. */
static double init_std(const model_t *m, const model_tensor_t *t) {
    static const char *const residual_out[] = {"attn.wo.weight", "overseer.w2.weight", "experts.w2",
                                               "micro.up", "diffusion.dec.weight"};
    for (size_t i = 0; i < Q_ARRAY_LEN(residual_out); i++)
        if (ends_with(t->name, residual_out[i]))
            return MODEL_INIT_STD / sqrt(2.0 * m->cfg.num_layers);
    return MODEL_INIT_STD;
}

/* Fills tensor ti: matrices N(0, std^2) from (seed, tensor index, chunk) streams, gains 1,
 * balancing biases 0, R N(0, 1) from diffusion_seed. */
static void init_tensor(model_t *m, size_t ti) {
    const model_tensor_t *t = &m->tensors[ti];
    real *p = m->params + t->offset;
    if (t->kind == MODEL_PARAM_GAIN) {
        for (size_t i = 0; i < t->numel; i++)
            p[i] = 1;
        return;
    }
    if (t->offset == m->diff_R) {
        diffusion_simhash_init(p, m->dd.Lb, m->cfg.dim, m->cfg.diffusion_seed);
        return;
    }
    if (t->kind == MODEL_PARAM_BUFFER) {
        memset(p, 0, t->numel * sizeof *p);
        return;
    }
    const double std = init_std(m, t);
    const uint64_t seed = m->cfg.seed;
    const long nchunks = (long)((t->numel + MODEL_INIT_CHUNK - 1) / MODEL_INIT_CHUNK);
    OMP_PRAGMA(omp parallel for schedule(static) if (nchunks > 16))
    for (long ch = 0; ch < nchunks; ch++) {
        rng_stream_t s;
        rng_stream_init(&s, MODEL_RNG_TAG_INIT, seed, ((uint64_t)ti << 32) | (uint64_t)ch);
        const size_t lo = (size_t)ch * MODEL_INIT_CHUNK;
        const size_t hi = lo + MODEL_INIT_CHUNK < t->numel ? lo + MODEL_INIT_CHUNK : t->numel;
        for (size_t i = lo; i < hi; i++)
            p[i] = (real)(std * rng_stream_normal(&s));
    }
}

model_t *model_new_table(const model_config_t *cfg, qerr_t *err) {
    model_config_t c = *cfg;
    if (model_config_validate(&c, err))
        return NULL;
    model_t *m = calloc(1, sizeof *m);
    if (!m)
        return qerr_set(err, QERR_NOMEM, "model: out of memory"), NULL;
    m->cfg = c;
    moe_dims_from_config(&m->md, &c);
    diffusion_dims_from_config(&m->dd, &c);
    m->lofs = calloc((size_t)c.num_layers, sizeof *m->lofs);
    m->loads = calloc((size_t)c.num_layers, sizeof *m->loads);
    m->la = calloc((size_t)c.num_layers, sizeof *m->la);
    if (!m->lofs || !m->loads || !m->la || build_table(m)) {
        model_destroy(&m);
        return qerr_set(err, QERR_NOMEM, "model: out of memory for the tensor table"), NULL;
    }
    return m;
}

model_t *model_new(const model_config_t *cfg, qerr_t *err) {
    model_t *m = model_new_table(cfg, err);
    if (!m)
        return NULL;
    for (int l = 0; l < m->cfg.num_layers; l++) {
        if (moe_load_init(&m->loads[l], &m->md, err)) {
            model_destroy(&m);
            return NULL;
        }
    }
    m->params = q_aligned_calloc(m->n_reals, sizeof(real));
    m->grads = q_aligned_calloc(m->n_reals, sizeof(real));
    m->qp = q_aligned_calloc(m->n_reals, sizeof(real));
    if (!m->params || !m->grads || !m->qp) {
        size_t n = m->n_reals;
        model_destroy(&m);
        return qerr_set(err, QERR_NOMEM, "model: out of memory for %zu parameters (%.1f GB x 3)", n,
                        (double)n * sizeof(real) / 1e9),
               NULL;
    }
    for (size_t i = 0; i < m->n_tensors; i++)
        init_tensor(m, i);
    m->q_dirty = 1;
    return m;
}

model_t *model_new_frozen(const model_config_t *cfg, qerr_t *err) {
    model_t *m = model_new_table(cfg, err);
    if (!m)
        return NULL;
    m->frozen = 1;
    m->qp = q_aligned_calloc(m->n_reals, sizeof(real));
    if (!m->qp) {
        size_t n = m->n_reals;
        model_destroy(&m);
        return qerr_set(err, QERR_NOMEM, "model: out of memory for %zu frozen weights (%.1f GB)", n,
                        (double)n * sizeof(real) / 1e9),
               NULL;
    }
    return m;
}

int model_is_frozen(const model_t *m) {
    return m->frozen;
}

static void acts_free(model_t *m) {
    for (int l = 0; l < m->cfg.num_layers && m->la; l++)
        moe_acts_destroy(&m->la[l].moe);
    diff_state_free(&m->ds);
    q_aligned_free(m->arena);
    m->arena = NULL;
    m->arena_reals = 0;
    m->max_B = m->max_T = 0;
    m->has_fwd = 0;
}

void model_destroy(model_t **pm) {
    model_t *m = *pm;
    if (!m)
        return;
    acts_free(m);
    for (int l = 0; l < m->cfg.num_layers && m->loads; l++)
        if (m->loads[l].gate)
            moe_load_free(&m->loads[l]);
    free(m->loads);
    free(m->la);
    free(m->lofs);
    free(m->tensors);
    q_aligned_free(m->params);
    q_aligned_free(m->grads);
    q_aligned_free(m->qp);
    free(m);
    *pm = NULL;
}

const model_config_t *model_config(const model_t *m) {
    return &m->cfg;
}

size_t model_tensor_count(const model_t *m) {
    return m->n_tensors;
}

const model_tensor_t *model_tensor(const model_t *m, size_t i) {
    Q_ASSERT(i < m->n_tensors);
    return &m->tensors[i];
}

const model_tensor_t *model_tensor_find(const model_t *m, const char *name) {
    for (size_t i = 0; i < m->n_tensors; i++)
        if (strcmp(m->tensors[i].name, name) == 0)
            return &m->tensors[i];
    return NULL;
}

size_t model_num_reals(const model_t *m) {
    return m->n_reals;
}

real *model_params(model_t *m) {
    Q_ASSERT(!m->frozen);
    return m->params;
}

const real *model_params_const(const model_t *m) {
    Q_ASSERT(!m->frozen);
    return m->params;
}

real *model_grads(model_t *m) {
    Q_ASSERT(!m->frozen);
    return m->grads;
}

void model_grads_zero(model_t *m) {
    Q_ASSERT(!m->frozen);
    memset(m->grads, 0, m->n_reals * sizeof(real));
}

void model_params_changed(model_t *m) {
    Q_ASSERT(!m->frozen);
    m->q_dirty = 1;
}

size_t model_tensor_rollout_bytes(const model_tensor_t *t) {
    const size_t cols = t->ndim ? (size_t)t->shape[t->ndim - 1] : 1;
    const size_t rows = cols ? t->numel / cols : 0;
    switch (t->rollout) {
    case QUANT_F32: return 4 * t->numel;
    case QUANT_F16: return 2 * t->numel;
    case QUANT_TERNARY: /* 2 bits per weight, 4 to a byte, and an FP32 scale per row */
        return rows * ((cols + 3) / 4 + 4);
    case QUANT_INT4: /* two codes per byte and an FP16 scale per group of 32 */
        return rows * ((cols + 1) / 2 + 2 * ((cols + QUANT_INT4_GROUP - 1) / QUANT_INT4_GROUP));
    case QUANT_INT8: /* a byte per weight and an FP32 scale per row */ return rows * (cols + 4);
    case QUANT_TYPE_COUNT: break;
    }
    Q_ASSERT(!"unknown rollout format");
    return 0;
}

/* out [n_reals] = what the forward reads for the latent weights w [n_reals]: each tensor
 * through its fake quantizer, the unquantized ones copied. */
static void fake_quantize(const model_t *m, real *out, const real *w) {
    for (size_t i = 0; i < m->n_tensors; i++) {
        const model_tensor_t *t = &m->tensors[i];
        const real *src = w + t->offset;
        real *dst = out + t->offset;
        if (t->fake == QUANT_F32) {
            memcpy(dst, src, t->numel * sizeof(real));
        } else {
            const int cols = (int)t->shape[t->ndim - 1];
            quant_fake_forward(t->fake, dst, src, (int)(t->numel / (size_t)cols), cols);
        }
    }
}

/* Refreshes the fake-quantized copy the forward reads. A frozen model is never dirty. */
static void quantize_weights(model_t *m) {
    if (!m->q_dirty)
        return;
    Q_ASSERT(!m->frozen);
    fake_quantize(m, m->qp, m->params);
    m->q_dirty = 0;
    m->q_version++;
}

/* ---- Frozen models ---- */

/* 1 when a and b have the same tensors at the same offsets with the same fake quantizers. */
static int same_layout(const model_t *a, const model_t *b) {
    if (a->n_reals != b->n_reals || a->n_tensors != b->n_tensors)
        return 0;
    for (size_t i = 0; i < a->n_tensors; i++)
        if (a->tensors[i].offset != b->tensors[i].offset ||
            a->tensors[i].numel != b->tensors[i].numel || a->tensors[i].fake != b->tensors[i].fake)
            return 0;
    return 1;
}

/* New weights in a frozen model's qp: the diffusion stage's cached codes are stale. */
static void frozen_loaded(model_t *m) {
    m->has_weights = 1;
    m->q_version++;
}

void model_freeze_from(model_t *dst, model_t *src) {
    Q_ASSERT(dst->frozen && !src->frozen && src->params && same_layout(dst, src));
    quantize_weights(src);
    for (size_t i = 0; i < src->n_tensors; i++) {
        const model_tensor_t *t = &src->tensors[i];
        const real *from = (t->fake == QUANT_F32 ? src->params : src->qp) + t->offset;
        memcpy(dst->qp + t->offset, from, t->numel * sizeof(real));
    }
    frozen_loaded(dst);
}

const real *model_frozen_weights(const model_t *m) {
    Q_ASSERT(m->frozen);
    return m->has_weights ? m->qp : NULL;
}

void model_frozen_load(model_t *m, const real *w) {
    Q_ASSERT(m->frozen);
    memcpy(m->qp, w, m->n_reals * sizeof(real));
    frozen_loaded(m);
}

void model_frozen_load_latent(model_t *m, const real *latent) {
    Q_ASSERT(m->frozen);
    fake_quantize(m, m->qp, latent);
    frozen_loaded(m);
}

/* ---- Diffusion stage glue ---- */

static size_t diff_acts_reals(const model_t *m, size_t BT) {
    return 2 * BT * (size_t)m->cfg.dim + 3 * BT;
}

static void diff_state_free(diff_state_t *ds) {
    free(ds->pos);
    free(ds->code);
    free(ds->noise);
    diffusion_acts_destroy(&ds->acts);
    memset(ds, 0, sizeof *ds);
}

/* Maps the stage's real buffers from the arena cursor *p and allocates the rest. */
static int diff_acts_map(model_t *m, real **p, size_t BT, qerr_t *err) {
    diff_state_t *ds = &m->ds;
    const size_t C = (size_t)m->cfg.dim, Lw = (size_t)diffusion_words(m->dd.Lb);
    ds->xd = *p;
    ds->u = ds->xd + BT * C;
    ds->rstd = ds->u + BT * C;
    ds->tau = ds->rstd + BT;
    ds->mask = ds->tau + BT;
    *p = ds->mask + BT;
    ds->pos = calloc(BT, sizeof *ds->pos);
    ds->code = calloc(BT * Lw, sizeof *ds->code);
    ds->noise = calloc(BT * Lw, sizeof *ds->noise);
    if (!ds->pos || !ds->code || !ds->noise)
        return qerr_set(err, QERR_NOMEM, "model: out of memory for the diffusion stage");
    ds->acts = diffusion_acts_new(&m->dd, (int)BT, err);
    return ds->acts ? 0 : -1;
}

/* ---- Activation memory ---- */

int model_plan(model_t *m, int B, int T, qerr_t *err) {
    if (B < 1 || T < 1 || T > m->cfg.context)
        return qerr_set(err, QERR_RANGE, "model: batch %d x %d tokens (T must be in [1, %d])", B, T,
                        m->cfg.context);
    if (B <= m->max_B && T <= m->max_T && (size_t)B * T <= (size_t)m->max_B * m->max_T)
        return 0;
    /* Grow to cover both the old and the new shape, so alternating shapes do not thrash. */
    if (B < m->max_B)
        B = m->max_B;
    if (T < m->max_T)
        T = m->max_T;
    acts_free(m);
    const size_t C = (size_t)m->cfg.dim, L = (size_t)m->cfg.num_layers;
    const size_t BT = (size_t)B * T, NH = (size_t)m->cfg.num_heads;
    const size_t per_layer = 8 * BT * C + 2 * BT + NH * BT;
    size_t total = L * per_layer + 8 * BT * C + 5 * BT + head_scratch_len(m->cfg.dim) +
                   (size_t)B * C + diff_acts_reals(m, BT);
    m->arena = q_aligned_calloc(total, sizeof(real));
    if (!m->arena)
        return qerr_set(err, QERR_NOMEM,
                        "model: out of memory for the activations of %d x %d "
                        "tokens (%.1f MB)",
                        B, T, (double)total * sizeof(real) / 1e6);
    m->arena_reals = total;
    real *p = m->arena;
#define TAKE(n) (p += (n), p - (n))
    for (size_t l = 0; l < L; l++) {
        layer_acts_t *a = &m->la[l];
        a->x = TAKE(BT * C);
        a->ln1 = TAKE(BT * C);
        a->rstd1 = TAKE(BT);
        a->q = TAKE(BT * C);
        a->k = TAKE(BT * C);
        a->v = TAKE(BT * C);
        a->att = TAKE(BT * C);
        a->lse = TAKE(NH * BT);
        a->xmid = TAKE(BT * C);
        a->ln2 = TAKE(BT * C);
        a->rstd2 = TAKE(BT);
        a->moe = moe_acts_new(&m->md, (int)BT, err);
        if (!a->moe) {
            acts_free(m);
            return -1;
        }
    }
    m->xL = TAKE(BT * C);
    m->lnf = TAKE(BT * C);
    m->rstdf = TAKE(BT);
    m->logp = TAKE(BT);
    m->entropy = TAKE(BT);
    m->lse_h = TAKE(BT);
    m->dlogp = TAKE(BT);
    m->br = TAKE(BT * C);
    m->dx = TAKE(BT * C);
    m->d1 = TAKE(BT * C);
    m->d2 = TAKE(BT * C);
    m->d3 = TAKE(BT * C);
    m->d4 = TAKE(BT * C);
    m->head_scratch = TAKE(head_scratch_len(m->cfg.dim));
    m->gath = TAKE((size_t)B * C);
    if (diff_acts_map(m, &p, BT, err)) {
        acts_free(m);
        return -1;
    }
#undef TAKE
    Q_ASSERT((size_t)(p - m->arena) <= total);
    m->max_B = B;
    m->max_T = T;
    return 0;
}

size_t model_activation_bytes(const model_t *m) {
    return m->arena_reals * sizeof(real);
}

/* ---- Forward / backward ---- */

static void moe_views(model_t *m, int l, moe_params_t *qp, moe_params_t *dp, moe_bias_t *bias) {
    const layer_ofs_t *o = &m->lofs[l];
    if (qp)
        moe_params_map(qp, m->qp + o->moe, &m->md);
    if (dp)
        moe_params_map(dp, m->grads + o->moe, &m->md);
    if (bias) {
        real *b = unquantized(m) + o->bias;
        bias->gate = b;
        bias->router = b + m->md.M;
        bias->micro = b + (size_t)m->md.M + (size_t)m->md.M * m->md.E;
    }
}

/* The dropout stream of one residual branch (site) of the current forward. */
static void dropout_stream(const model_t *m, rng_stream_t *s, int l, int branch) {
    rng_stream_init(s, MODEL_RNG_TAG_NOISE, m->noise_key, (uint64_t)(2 * l + branch));
}

int model_batch_check(const model_config_t *cfg, const model_batch_t *b, qerr_t *err) {
    if (b->B < 1 || b->T < 1 || b->T > cfg->context)
        return qerr_set(err, QERR_RANGE, "model: batch of %d x %d tokens: T must be in [1, %d]",
                        b->B, b->T, cfg->context);
    if (!(b->temperature > 0))
        return qerr_set(err, QERR_RANGE, "model: temperature must be > 0");
    const int V = cfg->vocab_size;
    const size_t BT = (size_t)b->B * b->T;
    for (size_t i = 0; i < BT; i++) {
        if (b->tokens[i] < 0 || b->tokens[i] >= V)
            return qerr_set(err, QERR_RANGE,
                            "model: token %d at row %zu position %zu is outside the "
                            "vocabulary [0, %d)",
                            b->tokens[i], i / (size_t)b->T, i % (size_t)b->T, V);
        if (b->targets && b->weights && b->weights[i] != 0 &&
            (b->targets[i] < 0 || b->targets[i] >= V))
            return qerr_set(err, QERR_RANGE,
                            "model: target %d at row %zu position %zu is outside the "
                            "vocabulary [0, %d)",
                            b->targets[i], i / (size_t)b->T, i % (size_t)b->T, V);
        if (b->weights && !(b->weights[i] >= 0))
            return qerr_set(err, QERR_RANGE,
                            "model: loss weight at row %zu position %zu is not "
                            ">= 0",
                            i / (size_t)b->T, i % (size_t)b->T);
    }
    return 0;
}

/* x_out [BT, C] = xd + BitDiffusion(RMSNorm(xd)) and, when the batch has targets and a
 * diffusion weight, the training loss on the positions with a CE weight. */
static int diff_forward(model_t *m, real *xout, const model_batch_t *b, model_stats_t *st,
                        qerr_t *err) {
    diff_state_t *ds = &m->ds;
    const int C = m->cfg.dim, BT = b->B * b->T, Lb = m->dd.Lb, Lw = diffusion_words(Lb);
    rmsnorm_forward(ds->u, ds->rstd, ds->xd, m->qp + m->diff_norm, BT, C);
    for (int t = 0; t < BT; t++)
        ds->pos[t] = t % b->T;
    diffusion_params_t qp;
    diffusion_params_map(&qp, m->qp + m->diff, &m->dd);
    diffusion_aux_t aux;
    diffusion_acts_weights_version(ds->acts, m->q_version);
    if (diffusion_forward(ds->acts, m->br, &aux, ds->u, ds->pos, &qp, b->plan_replay,
                          m->cfg.diffusion_seed, &m->dd, BT, err))
        return qerr_wrap(err, "diffusion stage");
    st->plan_mismatches += aux.mismatches;
    residual_forward(xout, ds->xd, m->br, (size_t)BT * C);
    ds->loss_ran = 0;
    if (b->targets && b->weights && b->aux_diffusion != 0) {
        memset(ds->code, 0, (size_t)BT * Lw * sizeof *ds->code);
        for (int t = 0; t < BT; t++) {
            ds->mask[t] = b->weights[t] > 0 ? 1 : 0;
            if (ds->mask[t] != 0) /* c(y) of the next token: a SimHash of its latent head
                                   * row (why a frozen model refuses this path) */
                diffusion_code(ds->code + (size_t)t * Lw, unquantized(m) + m->diff_R,
                               m->params + m->head + (size_t)b->targets[t] * C, Lb, C);
        }
        rng_stream_t rs;
        rng_stream_init(&rs, MODEL_RNG_TAG_NOISE, m->noise_key, (uint64_t)(2 * m->cfg.num_layers));
        diffusion_noise_draw(ds->tau, ds->noise, &rs, BT, Lb);
        st->diffusion = diffusion_loss_forward(ds->acts, ds->code, ds->noise, ds->tau, ds->mask,
                                               ds->u, &qp, &m->dd, BT);
        ds->loss_ran = 1;
    }
    return 0;
}

/* Turns dx from the gradient of the stage's output into that of its input xd
 * (ACCUMULATES the stage's parameter gradients). */
static void diff_backward(model_t *m, real *dx) {
    diff_state_t *ds = &m->ds;
    const int C = m->cfg.dim, BT = m->fB * m->fT;
    diffusion_params_t qp, dp;
    diffusion_params_map(&qp, m->qp + m->diff, &m->dd);
    diffusion_params_map(&dp, m->grads + m->diff, &m->dd);
    memset(m->d1, 0, (size_t)BT * C * sizeof(real));
    diffusion_backward(&dp, m->d1, dx, ds->acts, ds->u, &qp, &m->dd, BT);
    if (ds->loss_ran)
        diffusion_loss_backward(&dp, m->d1, m->aux_diffusion, ds->acts, ds->u, &qp, &m->dd, BT);
    rmsnorm_backward(dx, m->grads + m->diff_norm, m->d1, ds->xd, m->qp + m->diff_norm, ds->rstd, BT,
                     C);
}

/* What a frozen model cannot run (model.h), as a runtime error: the batch comes from a
 * caller's settings. */
static int frozen_check(const model_t *m, const model_batch_t *b, qerr_t *err) {
    if (!m->has_weights)
        return qerr_set(err, QERR_INVALID, "model: frozen model has no weights yet");
    if (b->count_load)
        return qerr_set(err, QERR_INVALID,
                        "model: a frozen model keeps no balancing counts (count_load must be 0)");
    if (b->targets && b->weights && b->aux_diffusion != 0)
        return qerr_set(err, QERR_INVALID,
                        "model: a frozen model runs no diffusion training loss (it needs the "
                        "latent head): aux_diffusion must be 0 when the batch has targets");
    return 0;
}

int model_forward(model_t *m, const model_batch_t *b, model_stats_t *stats, qerr_t *err) {
    if (model_batch_check(&m->cfg, b, err) || (m->frozen && frozen_check(m, b, err)) ||
        model_plan(m, b->B, b->T, err))
        return -1;
    quantize_weights(m);
    const int B = b->B, T = b->T, C = m->cfg.dim, NH = m->cfg.num_heads, V = m->cfg.vocab_size;
    const int L = m->cfg.num_layers, BT = B * T;
    const size_t BTC = (size_t)BT * C;
    m->has_fwd = 0;
    m->fB = B;
    m->fT = T;
    m->training = b->training;
    m->noise_key = b->noise_key;
    m->temperature = b->temperature;
    m->aux_balance = b->aux_balance;
    m->aux_z = b->aux_z;
    m->aux_diffusion = b->aux_diffusion;
    m->tokens = b->tokens;
    m->targets = b->targets;
    m->weights = b->weights;
    const real p_drop = b->training ? (real)m->cfg.dropout : 0;

    model_stats_t st = {0};
    m->routers = 0;
    double bal_sum = 0, z_sum = 0;
    embedding_forward(m->la[0].x, b->tokens, unquantized(m) + m->embed, BT, C, V);
    for (int l = 0; l < L; l++) {
        layer_acts_t *a = &m->la[l];
        const layer_ofs_t *o = &m->lofs[l];
        real *xnext = l + 1 < L ? m->la[l + 1].x : m->xL;
        rng_stream_t ds;
        /* attention branch */
        rmsnorm_forward(a->ln1, a->rstd1, a->x, m->qp + o->attn_norm, BT, C);
        linear_forward(a->q, a->ln1, m->qp + o->wq, NULL, BT, C, C);
        linear_forward(a->k, a->ln1, m->qp + o->wk, NULL, BT, C, C);
        linear_forward(a->v, a->ln1, m->qp + o->wv, NULL, BT, C, C);
        rope_forward(a->q, a->q, B, T, C, NH, 0);
        rope_forward(a->k, a->k, B, T, C, NH, 0);
        attention_forward(a->att, a->lse, a->q, a->k, a->v, B, T, C, NH);
        linear_forward(m->br, a->att, m->qp + o->wo, NULL, BT, C, C);
        dropout_stream(m, &ds, l, 0);
        dropout_forward(m->br, m->br, p_drop, b->training, &ds, BTC);
        residual_forward(a->xmid, a->x, m->br, BTC);
        /* MoE branch */
        rmsnorm_forward(a->ln2, a->rstd2, a->xmid, m->qp + o->moe_norm, BT, C);
        moe_params_t qp;
        moe_bias_t bias;
        moe_views(m, l, &qp, NULL, &bias);
        moe_aux_t aux;
        if (moe_forward(a->moe, m->br, &aux, b->count_load ? &m->loads[l] : NULL, a->ln2, &qp,
                        &bias, b->replay ? &b->replay[l] : NULL, &m->md, BT, err))
            return qerr_wrap(err, "layer %d", l);
        bal_sum += aux.balance;
        z_sum += aux.z;
        m->routers += aux.routers;
        st.decisions += aux.decisions;
        st.mismatches += aux.mismatches;
        dropout_stream(m, &ds, l, 1);
        dropout_forward(m->br, m->br, p_drop, b->training, &ds, BTC);
        if (l == m->cfg.diffusion_layer) {
            residual_forward(m->ds.xd, a->xmid, m->br, BTC);
            if (diff_forward(m, xnext, b, &st, err))
                return -1;
        } else {
            residual_forward(xnext, a->xmid, m->br, BTC);
        }
    }
    rmsnorm_forward(m->lnf, m->rstdf, m->xL, m->qp + m->final_norm, BT, C);
    memset(m->logp, 0, (size_t)BT * sizeof(real));
    memset(m->entropy, 0, (size_t)BT * sizeof(real));
    if (b->targets && b->weights) {
        head_forward(m->logp, m->entropy, m->lse_h, m->lnf, m->qp + m->head, b->targets, b->weights,
                     b->temperature, BT, C, V, m->head_scratch);
        st.ce = crossentropy_forward(m->logp, b->weights, BT);
        for (int t = 0; t < BT; t++)
            st.weight_sum += b->weights[t];
    }
    if (m->routers > 0) {
        st.balance = bal_sum / m->routers;
        st.z = z_sum / m->routers;
    }
    st.loss = st.ce + (double)b->aux_balance * st.balance + (double)b->aux_z * st.z +
              (double)b->aux_diffusion * st.diffusion;
    if (stats)
        *stats = st;
    m->has_fwd = 1;
    return 0;
}

const real *model_logp(const model_t *m) {
    return m->logp;
}

const real *model_entropy(const model_t *m) {
    return m->entropy;
}

const diffusion_plan_t *model_plan_record(const model_t *m) {
    Q_ASSERT(m->ds.acts);
    return diffusion_acts_plan(m->ds.acts);
}

const moe_route_t *model_route(const model_t *m, int l) {
    Q_ASSERT(l >= 0 && l < m->cfg.num_layers && m->la[l].moe);
    return moe_acts_route(m->la[l].moe);
}

void model_backward(model_t *m, const real *dlogp, const real *dentropy) {
    Q_ASSERT(!m->frozen && m->has_fwd);
    const int B = m->fB, T = m->fT, C = m->cfg.dim, NH = m->cfg.num_heads;
    const int V = m->cfg.vocab_size, L = m->cfg.num_layers, BT = B * T;
    const size_t BTC = (size_t)BT * C;
    const real p_drop = m->training ? (real)m->cfg.dropout : 0;
    const real dbal = m->routers > 0 ? m->aux_balance / (real)m->routers : 0;
    const real dz = m->routers > 0 ? m->aux_z / (real)m->routers : 0;

    /* head */
    memset(m->d1, 0, BTC * sizeof(real));
    if (m->targets && m->weights) {
        if (!dlogp) {
            crossentropy_backward(m->dlogp, 1, m->weights, BT);
            dlogp = m->dlogp;
        }
        head_backward(m->d1, m->grads + m->head, dlogp, dentropy, m->lnf, m->qp + m->head,
                      m->targets, m->lse_h, m->entropy, m->temperature, BT, C, V, m->head_scratch);
    }
    memset(m->dx, 0, BTC * sizeof(real));
    rmsnorm_backward(m->dx, m->grads + m->final_norm, m->d1, m->xL, m->qp + m->final_norm, m->rstdf,
                     BT, C);

    for (int l = L - 1; l >= 0; l--) {
        layer_acts_t *a = &m->la[l];
        const layer_ofs_t *o = &m->lofs[l];
        rng_stream_t ds;
        if (l == m->cfg.diffusion_layer)
            diff_backward(m, m->dx);
        /* MoE branch: xd = xmid + drop(moe(ln2)) */
        memset(m->br, 0, BTC * sizeof(real));
        dropout_stream(m, &ds, l, 1);
        dropout_backward(m->br, m->dx, p_drop, m->training, &ds, BTC);
        moe_params_t qp, dp;
        moe_views(m, l, &qp, &dp, NULL);
        memset(m->d1, 0, BTC * sizeof(real));
        moe_backward(&dp, m->d1, m->br, a->moe, a->ln2, &qp, dbal, dz, &m->md, BT);
        rmsnorm_backward(m->dx, m->grads + o->moe_norm, m->d1, a->xmid, m->qp + o->moe_norm,
                         a->rstd2, BT, C);
        /* attention branch: xmid = x + drop(wo att) */
        memset(m->br, 0, BTC * sizeof(real));
        dropout_stream(m, &ds, l, 0);
        dropout_backward(m->br, m->dx, p_drop, m->training, &ds, BTC);
        memset(m->d1, 0, BTC * sizeof(real));
        linear_backward(m->d1, m->grads + o->wo, NULL, m->br, a->att, m->qp + o->wo, BT, C, C);
        memset(m->d2, 0, BTC * sizeof(real));
        memset(m->d3, 0, BTC * sizeof(real));
        memset(m->d4, 0, BTC * sizeof(real));
        attention_backward(m->d2, m->d3, m->d4, m->d1, a->q, a->k, a->v, a->att, a->lse, B, T, C,
                           NH);
        rope_backward(m->d2, m->d2, B, T, C, NH, 0);
        rope_backward(m->d3, m->d3, B, T, C, NH, 0);
        memset(m->d1, 0, BTC * sizeof(real));
        linear_backward(m->d1, m->grads + o->wq, NULL, m->d2, a->ln1, m->qp + o->wq, BT, C, C);
        linear_backward(m->d1, m->grads + o->wk, NULL, m->d3, a->ln1, m->qp + o->wk, BT, C, C);
        linear_backward(m->d1, m->grads + o->wv, NULL, m->d4, a->ln1, m->qp + o->wv, BT, C, C);
        rmsnorm_backward(m->dx, m->grads + o->attn_norm, m->d1, a->x, m->qp + o->attn_norm,
                         a->rstd1, BT, C);
    }
    embedding_backward(m->grads + m->embed, m->dx, m->tokens, BT, C, V);
}

void model_logits_at(const model_t *m, int b, int t, real *out) {
    Q_ASSERT(m->has_fwd && b >= 0 && b < m->fB && t >= 0 && t < m->fT);
    const int C = m->cfg.dim;
    gemm(GEMM_N, GEMM_T, 1, m->cfg.vocab_size, C, 1, m->lnf + ((size_t)b * m->fT + t) * C, C,
         m->qp + m->head, C, 0, out, m->cfg.vocab_size);
}

int model_greedy(model_t *m, const int32_t *tokens, int B, int T, const int *pos, int32_t *out,
                 qerr_t *err) {
    for (int b = 0; b < B; b++)
        if (pos[b] < 0 || pos[b] >= T)
            return qerr_set(err, QERR_RANGE,
                            "model: greedy position %d of row %d is outside "
                            "[0, %d)",
                            pos[b], b, T);
    model_batch_t batch = {.B = B, .T = T, .tokens = tokens, .temperature = 1};
    if (model_forward(m, &batch, NULL, err))
        return -1;
    const int C = m->cfg.dim;
    for (int b = 0; b < B; b++)
        memcpy(m->gath + (size_t)b * C, m->lnf + ((size_t)b * T + pos[b]) * C,
               (size_t)C * sizeof(real));
    head_argmax(out, m->gath, m->qp + m->head, B, C, m->cfg.vocab_size, m->head_scratch);
    return 0;
}

void model_balance_update(model_t *m, int apply) {
    Q_ASSERT(!m->frozen);
    const real rate = (real)m->cfg.balance_bias_rate;
    for (int l = 0; l < m->cfg.num_layers; l++) {
        if (apply && rate > 0) {
            moe_bias_t bias;
            moe_views(m, l, NULL, NULL, &bias);
            moe_bias_update(&bias, &m->loads[l], rate);
        }
        moe_load_reset(&m->loads[l]);
    }
}

moe_load_t *model_load(model_t *m, int l) {
    Q_ASSERT(!m->frozen && l >= 0 && l < m->cfg.num_layers);
    return &m->loads[l];
}
