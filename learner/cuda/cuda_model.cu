#include "cuda_model.h"

#include "cuda_attn.h"
#include "cuda_buf.h"
#include "cuda_diffusion.h"
#include "cuda_gemm.h"
#include "cuda_moe.h"
#include "cuda_ops.h"
#include "cuda_optim.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

extern "C" {
#include "rng.h"
}

/* Initial standard deviation of every matrix and the init chunk length: model.c's values (the
 * streams are keyed per tensor and chunk, so any split of the work gives the same draws). */
#define CM_INIT_STD 0.02
#define CM_INIT_CHUNK 4096
/* Vocabulary entries per head tile: wider than the CPU's 1024 so the tile GEMMs fill the card. */
#define CM_HEAD_VCHUNK 2048
/* cuBLAS workspace of the model's GEMM handle. */
#define CM_GEMM_WORKSPACE (32u << 20)
#define CM_THREADS 256
#define CM_PI 3.14159265358979323846 /* M_PI, as rng_stream_normal uses it */

/* Offsets (in floats) of one layer's tensors, looked up by name in the CPU's table. */
typedef struct {
    size_t attn_norm, wq, wk, wv, wo, moe_norm;
    size_t moe;  /* the nine moe_params_t tensors back to back (moe_params_map) */
    size_t bias; /* balancing biases: gate [M], router [M, E], micro [M, N] */
} layer_ofs_t;

/* One block's saved activations for the planned B x T (device). With checkpointing every layer
 * has its own x and shares the rest (the block being recomputed). */
typedef struct {
    float *x;         /* [BT, C] block input */
    float *ln1;       /* [BT, C] */
    float *rstd1;     /* [BT] */
    float *q, *k, *v; /* [BT, C], q and k after RoPE */
    float *att;       /* [BT, C] attention output before wo */
    float *lse;       /* [B, NH, T] */
    float *xmid;      /* [BT, C] after the attention residual */
    float *ln2;       /* [BT, C] */
    float *rstd2;     /* [BT] */
} block_acts_t;

typedef struct {
    cudaEvent_t start, stop;
    int phase;
} prof_mark_t;

struct cuda_model {
    model_config_t cfg;
    model_t *table; /* the CPU's tensor table (model_new_table) */
    moe_dims_t md;
    diffusion_dims_t dd;
    size_t n;
    size_t embed, final_norm, head, diff_norm, diff_R, diff;
    layer_ofs_t *lofs; /* [L] */

    cuda_model_options_t opt;
    cuda_model_precision_t prec; /* resolved */
    cuda_dtype_t cdt;            /* GEMM operand type */
    cuda_attn_prec_t aprec;
    int device;
    cudaStream_t s;
    cuda_gemm_t *g;

    float *params, *grads; /* [n] FP32 master weights and gradients */
    float *qp;             /* [n] fake-quantized FP32 copy the forward reads */
    void *qh;              /* [n] of cdt: GEMM copy of the GEMM weights (mixed precision) */
    int q_dirty;
    uint64_t q_version;
    unsigned long long **loads; /* [L] device selection counters */

    cuda_optim_t *optim;
    cuda_loss_scaler_t ls;

    /* Activation memory planned for max_B x max_T. */
    int max_B, max_T;
    void *arena;
    size_t arena_bytes;
    block_acts_t *la;   /* [L] */
    cuda_moe_t **moe;   /* [L]: one per layer, or every entry the same object (checkpointing) */
    int n_moe;          /* objects owned in moe[0..n_moe) */
    moe_route_t *route; /* [L] host copies of each layer's routing (checkpointing) */
    cuda_diffusion_t *diffu;
    float *xL, *lnf, *rstdf;
    float *logp, *entropy, *lse_h, *dlogp;
    float *br, *dx, *d1, *d2, *d3, *d4;
    void *hA, *hB; /* [BT, C] of cdt: activations converted for a GEMM (mixed precision) */
    void *attn_ws;
    void *head_scratch;
    float *xd, *u, *drstd, *tau, *mask;
    int32_t *pos, *tokens, *targets, *rows;
    float *weights;
    uint64_t *code, *noise;
    double *ce_dev;
    float *dloss_dev;
    int32_t *rows_host; /* [max BT] */

    /* The last forward, for the backward. */
    int fB, fT, R, has_fwd, has_targets, training, diff_loss_ran, routers;
    int held; /* checkpointing: the layer whose activations the shared block buffers hold */
    uint64_t noise_key;
    float temperature, aux_balance, aux_z, aux_diffusion;

    int prof_on;
    prof_mark_t *marks;
    int n_marks, cap_marks, open_mark;
};

/* ---- small kernels ---- */

static __device__ uint64_t cm_splitmix64(uint64_t x) {
    x += 0x9E3779B97F4A7C15ULL;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ULL;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBULL;
    return x ^ (x >> 31);
}

/* rng_hash of (a, b): splitmix64(splitmix64(a) ^ b). */
static __device__ uint64_t cm_hash2(uint64_t a, uint64_t b) {
    return cm_splitmix64(cm_splitmix64(a) ^ b);
}

/* p[i] = (float)(std * rng_stream_normal) of model.c's init_tensor: element i is draw
 * i % CHUNK of stream hash(INIT, seed, (ti << 32) | chunk), each normal taking two counters. */
static __global__ void cm_init_normal_kernel(float *p, size_t n, uint64_t seed, uint64_t ti,
                                             double stdv) {
    const size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n)
        return;
    const uint64_t chunk = i / CM_INIT_CHUNK, j = i % CM_INIT_CHUNK;
    const uint64_t key = cm_splitmix64(cm_splitmix64(cm_splitmix64(MODEL_RNG_TAG_INIT) ^ seed) ^
                                       ((ti << 32) | chunk));
    const uint64_t r1 = cm_hash2(key, 2 * j), r2 = cm_hash2(key, 2 * j + 1);
    const double u1 = 1.0 - (double)(r1 >> 11) / 9007199254740992.0;
    const double u2 = (double)(r2 >> 11) / 9007199254740992.0;
    const float nrm = (float)(sqrt(-2.0 * log(u1)) * cos(2.0 * CM_PI * u2));
    p[i] = (float)(stdv * (double)nrm);
}

static __global__ void cm_fill_kernel(float *p, size_t n, float v) {
    const size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n)
        p[i] = v;
}

/* pos[t] = t % T; mask[t] = weights[t] > 0 (the diffusion loss positions). */
static __global__ void cm_pos_mask_kernel(int32_t *pos, float *mask, const float *w, int BT,
                                          int T) {
    const int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= BT)
        return;
    pos[t] = t % T;
    if (mask)
        mask[t] = w[t] > 0 ? 1.0f : 0.0f;
}

static unsigned cm_blocks(size_t n) {
    return (unsigned)((n + CM_THREADS - 1) / CM_THREADS);
}

/* ---- names, options ---- */

static const char *const prec_names[CUDA_MODEL_PREC_COUNT] = {"auto", "fp32", "fp16", "bf16"};

static const char *const phase_names[CUDA_MODEL_PHASE_COUNT] = {
    "quantize", "embedding",     "attention fwd", "moe fwd",       "diffusion fwd", "head fwd",
    "head bwd", "diffusion bwd", "moe bwd",       "attention bwd", "recompute",     "optimizer"};

const char *cuda_model_precision_name(cuda_model_precision_t p) {
    return (int)p >= 0 && p < CUDA_MODEL_PREC_COUNT ? prec_names[p] : NULL;
}

const char *cuda_model_phase_name(cuda_model_phase_t p) {
    return (int)p >= 0 && p < CUDA_MODEL_PHASE_COUNT ? phase_names[p] : "?";
}

void cuda_model_options_default(cuda_model_options_t *opt) {
    memset(opt, 0, sizeof *opt);
    opt->precision = CUDA_MODEL_PREC_AUTO;
    opt->loss_scale_init = (float)CUDA_LOSS_SCALE_INIT;
    opt->loss_scale_growth_interval = CUDA_LOSS_SCALE_GROWTH;
}

/* ---- profiling ---- */

static void prof_begin(cuda_model_t *m, cuda_model_phase_t phase) {
    if (!m->prof_on)
        return;
    if (m->n_marks == m->cap_marks) {
        const int cap = m->cap_marks ? 2 * m->cap_marks : 64;
        prof_mark_t *mk = (prof_mark_t *)realloc(m->marks, (size_t)cap * sizeof *mk);
        Q_ASSERT(mk != NULL);
        for (int i = m->cap_marks; i < cap; i++) {
            CUDA_CHECK(cudaEventCreate(&mk[i].start));
            CUDA_CHECK(cudaEventCreate(&mk[i].stop));
        }
        m->marks = mk;
        m->cap_marks = cap;
    }
    prof_mark_t *mk = &m->marks[m->n_marks];
    mk->phase = (int)phase;
    CUDA_CHECK(cudaEventRecord(mk->start, m->s));
    m->open_mark = m->n_marks++;
}

static void prof_end(cuda_model_t *m) {
    if (!m->prof_on || m->open_mark < 0)
        return;
    CUDA_CHECK(cudaEventRecord(m->marks[m->open_mark].stop, m->s));
    m->open_mark = -1;
}

void cuda_model_profile_enable(cuda_model_t *m, int on) {
    m->prof_on = on != 0;
}

void cuda_model_profile_read(cuda_model_t *m, double ms[CUDA_MODEL_PHASE_COUNT]) {
    for (int p = 0; p < CUDA_MODEL_PHASE_COUNT; p++)
        ms[p] = 0;
    CUDA_CHECK(cudaStreamSynchronize(m->s));
    for (int i = 0; i < m->n_marks; i++) {
        float t = 0;
        CUDA_CHECK(cudaEventElapsedTime(&t, m->marks[i].start, m->marks[i].stop));
        ms[m->marks[i].phase] += t;
    }
    m->n_marks = 0;
    m->open_mark = -1;
}

/* ---- construction ---- */

static size_t ofs_of(const cuda_model_t *m, const char *fmt, int l) {
    char name[MODEL_NAME_MAX];
    snprintf(name, sizeof name, fmt, l);
    const model_tensor_t *t = model_tensor_find(m->table, name);
    Q_ASSERT(t != NULL); /* the table is model.c's: every name below is in it */
    return t->offset;
}

static int ends_with(const char *s, const char *suffix) {
    const size_t n = strlen(s), k = strlen(suffix);
    return n >= k && strcmp(s + n - k, suffix) == 0;
}

/* init_std of model.c: projections into the residual stream get 1 / sqrt(2L) of the base. */
static double init_std(const cuda_model_t *m, const model_tensor_t *t) {
    static const char *const residual_out[] = {"attn.wo.weight", "overseer.w2.weight", "experts.w2",
                                               "micro.up", "diffusion.dec.weight"};
    for (size_t i = 0; i < sizeof residual_out / sizeof residual_out[0]; i++)
        if (ends_with(t->name, residual_out[i]))
            return CM_INIT_STD / sqrt(2.0 * m->cfg.num_layers);
    return CM_INIT_STD;
}

static int init_params(cuda_model_t *m, qerr_t *err) {
    for (size_t i = 0; i < model_tensor_count(m->table); i++) {
        const model_tensor_t *t = model_tensor(m->table, i);
        float *p = m->params + t->offset;
        if (t->offset == m->diff_R)
            continue; /* below, on the host */
        if (t->kind == MODEL_PARAM_GAIN) {
            cm_fill_kernel<<<cm_blocks(t->numel), CM_THREADS, 0, m->s>>>(p, t->numel, 1.0f);
            CUDA_LAUNCH_CHECK();
        } else if (t->kind == MODEL_PARAM_BUFFER) {
            CUDA_CHECK(cudaMemsetAsync(p, 0, t->numel * sizeof(float), m->s));
        } else {
            cm_init_normal_kernel<<<cm_blocks(t->numel), CM_THREADS, 0, m->s>>>(
                p, t->numel, m->cfg.seed, (uint64_t)i, init_std(m, t));
            CUDA_LAUNCH_CHECK();
        }
    }
    /* R is small (Lb x C): the CPU's own function gives its exact bits. */
    const size_t nR = (size_t)m->dd.Lb * m->cfg.dim;
    float *R = (float *)malloc(nR * sizeof *R);
    if (!R)
        return qerr_set(err, QERR_NOMEM, "cuda model: out of host memory for diffusion.R");
    diffusion_simhash_init(R, m->dd.Lb, m->cfg.dim, m->cfg.diffusion_seed);
    const int rc = cuda_buf_upload(m->params + m->diff_R, R, nR * sizeof *R, m->s, err);
    CUDA_CHECK(cudaStreamSynchronize(m->s));
    free(R);
    return rc;
}

static int resolve_precision(cuda_model_t *m, const cudaDeviceProp *prop, qerr_t *err) {
    const int sm = prop->major * 10 + prop->minor;
    cuda_model_precision_t p = m->opt.precision;
    if ((int)p < 0 || p >= CUDA_MODEL_PREC_COUNT)
        return qerr_set(err, QERR_INVALID, "cuda model: precision %d is out of range", (int)p);
    if (m->opt.force_sm75) {
        if (p == CUDA_MODEL_PREC_BF16 || p == CUDA_MODEL_PREC_FP32)
            return qerr_set(err, QERR_INVALID,
                            "cuda model: force_sm75 is the FP16 path; precision %s contradicts it",
                            prec_names[p]);
        p = CUDA_MODEL_PREC_FP16;
    }
    if (p == CUDA_MODEL_PREC_AUTO)
        p = sm >= 80 ? CUDA_MODEL_PREC_BF16 : CUDA_MODEL_PREC_FP16;
    if (p == CUDA_MODEL_PREC_BF16 && sm < 80)
        return qerr_set(err, QERR_INVALID,
                        "cuda model: BF16 needs sm_80 or newer; device %d (%s) is sm_%d", m->device,
                        prop->name, sm);
    m->prec = p;
    m->cdt = p == CUDA_MODEL_PREC_FP32   ? CUDA_DT_F32
             : p == CUDA_MODEL_PREC_FP16 ? CUDA_DT_F16
                                         : CUDA_DT_BF16;
    m->aprec = p == CUDA_MODEL_PREC_FP32   ? CUDA_ATTN_FP32
               : p == CUDA_MODEL_PREC_FP16 ? CUDA_ATTN_FP16
                                           : CUDA_ATTN_BF16;
    return 0;
}

static int lookup_offsets(cuda_model_t *m, qerr_t *err) {
    const int L = m->cfg.num_layers;
    m->lofs = (layer_ofs_t *)calloc((size_t)L, sizeof *m->lofs);
    m->loads = (unsigned long long **)calloc((size_t)L, sizeof *m->loads);
    if (!m->lofs || !m->loads)
        return qerr_set(err, QERR_NOMEM, "cuda model: out of host memory");
    m->embed = ofs_of(m, "embed.weight", 0);
    m->final_norm = ofs_of(m, "final_norm.weight", 0);
    m->head = ofs_of(m, "head.weight", 0);
    m->diff_norm = ofs_of(m, "diffusion.norm.weight", 0);
    m->diff_R = ofs_of(m, "diffusion.R", 0);
    m->diff = ofs_of(m, "diffusion.in_z.weight", 0);
    for (int l = 0; l < L; l++) {
        layer_ofs_t *o = &m->lofs[l];
        o->attn_norm = ofs_of(m, "layers.%d.attn_norm.weight", l);
        o->wq = ofs_of(m, "layers.%d.attn.wq.weight", l);
        o->wk = ofs_of(m, "layers.%d.attn.wk.weight", l);
        o->wv = ofs_of(m, "layers.%d.attn.wv.weight", l);
        o->wo = ofs_of(m, "layers.%d.attn.wo.weight", l);
        o->moe_norm = ofs_of(m, "layers.%d.moe_norm.weight", l);
        o->moe = ofs_of(m, "layers.%d.overseer.w1.weight", l);
        o->bias = ofs_of(m, "layers.%d.overseer.gate.bias_balance", l);
    }
    return 0;
}

cuda_model_t *cuda_model_new(const model_config_t *cfg, const cuda_model_options_t *opt,
                             qerr_t *err) {
    int ndev = 0;
    if (cudaGetDeviceCount(&ndev) != cudaSuccess || opt->device < 0 || opt->device >= ndev) {
        (void)cudaGetLastError();
        return qerr_set(err, QERR_IO, "cuda model: no CUDA device %d (%d visible)", opt->device,
                        ndev),
               nullptr;
    }
    cudaDeviceProp prop;
    if (cudaGetDeviceProperties(&prop, opt->device) != cudaSuccess ||
        cudaSetDevice(opt->device) != cudaSuccess) {
        (void)cudaGetLastError();
        return qerr_set(err, QERR_IO, "cuda model: cannot open CUDA device %d", opt->device),
               nullptr;
    }
    cuda_model_t *m = (cuda_model_t *)calloc(1, sizeof *m);
    if (!m)
        return qerr_set(err, QERR_NOMEM, "cuda model: out of host memory"), nullptr;
    m->opt = *opt;
    m->device = opt->device;
    m->open_mark = -1;
    if (resolve_precision(m, &prop, err)) {
        free(m);
        return NULL;
    }
    m->table = model_new_table(cfg, err);
    if (!m->table) {
        free(m);
        return NULL;
    }
    m->cfg = *model_config(m->table); /* validated: diffusion_layer resolved */
    moe_dims_from_config(&m->md, &m->cfg);
    diffusion_dims_from_config(&m->dd, &m->cfg);
    m->n = model_num_reals(m->table);
    cuda_loss_scaler_init(&m->ls, opt->loss_scale_init > 0 ? opt->loss_scale_init : 1.0,
                          opt->loss_scale_growth_interval > 0 ? opt->loss_scale_growth_interval
                                                              : CUDA_LOSS_SCALE_GROWTH);
    if (lookup_offsets(m, err)) {
        cuda_model_destroy(&m);
        return NULL;
    }
    if (cudaStreamCreateWithFlags(&m->s, cudaStreamNonBlocking) != cudaSuccess) {
        (void)cudaGetLastError();
        m->s = NULL;
        qerr_set(err, QERR_IO, "cuda model: cannot create a stream on device %d", m->device);
        cuda_model_destroy(&m);
        return NULL;
    }
    const size_t nb = m->n * sizeof(float);
    m->g = cuda_gemm_new(CM_GEMM_WORKSPACE, err);
    if (!m->g || !(m->params = (float *)cuda_buf_alloc(nb, err)) ||
        !(m->grads = (float *)cuda_buf_calloc(nb, err)) ||
        !(m->qp = (float *)cuda_buf_alloc(nb, err)) ||
        (m->cdt != CUDA_DT_F32 && !(m->qh = cuda_buf_alloc(m->n * cuda_dtype_size(m->cdt), err)))) {
        qerr_wrap(err, "cuda model: parameters of %zu floats", m->n);
        cuda_model_destroy(&m);
        return NULL;
    }
    const size_t nl = cuda_moe_load_len(&m->md) * sizeof(unsigned long long);
    for (int l = 0; l < m->cfg.num_layers; l++) {
        if (!(m->loads[l] = (unsigned long long *)cuda_buf_calloc(nl, err))) {
            cuda_model_destroy(&m);
            return NULL;
        }
    }
    if (init_params(m, err)) {
        cuda_model_destroy(&m);
        return NULL;
    }
    m->q_dirty = 1;
    return m;
}

static void acts_free(cuda_model_t *m) {
    for (int i = 0; i < m->n_moe; i++)
        cuda_moe_destroy(&m->moe[i]);
    free(m->moe);
    m->moe = NULL;
    m->n_moe = 0;
    if (m->route) {
        for (int l = 0; l < m->cfg.num_layers; l++)
            moe_route_free(&m->route[l]);
        free(m->route);
        m->route = NULL;
    }
    cuda_diffusion_destroy(&m->diffu);
    cuda_buf_free(&m->arena);
    m->arena_bytes = 0;
    free(m->la);
    m->la = NULL;
    free(m->rows_host);
    m->rows_host = NULL;
    m->max_B = m->max_T = 0;
    m->has_fwd = 0;
}

void cuda_model_destroy(cuda_model_t **pm) {
    cuda_model_t *m = *pm;
    if (!m)
        return;
    if (m->s)
        CUDA_CHECK(cudaStreamSynchronize(m->s));
    acts_free(m);
    for (int l = 0; m->loads && l < m->cfg.num_layers; l++)
        cuda_buf_free((void **)&m->loads[l]);
    free(m->loads);
    free(m->lofs);
    cuda_optim_destroy(&m->optim);
    cuda_buf_free((void **)&m->params);
    cuda_buf_free((void **)&m->grads);
    cuda_buf_free((void **)&m->qp);
    cuda_buf_free(&m->qh);
    cuda_gemm_destroy(&m->g);
    for (int i = 0; i < m->cap_marks; i++) {
        CUDA_CHECK(cudaEventDestroy(m->marks[i].start));
        CUDA_CHECK(cudaEventDestroy(m->marks[i].stop));
    }
    free(m->marks);
    if (m->s)
        CUDA_CHECK(cudaStreamDestroy(m->s));
    model_destroy(&m->table);
    free(m);
    *pm = NULL;
}

const model_config_t *cuda_model_config(const cuda_model_t *m) {
    return &m->cfg;
}

const model_t *cuda_model_table(const cuda_model_t *m) {
    return m->table;
}

size_t cuda_model_num_reals(const cuda_model_t *m) {
    return m->n;
}

cuda_model_precision_t cuda_model_precision(const cuda_model_t *m) {
    return m->prec;
}

cudaStream_t cuda_model_stream(const cuda_model_t *m) {
    return m->s;
}

/* ---- parameters ---- */

int cuda_model_params_upload(cuda_model_t *m, const float *host, qerr_t *err) {
    m->q_dirty = 1;
    if (cuda_buf_upload(m->params, host, m->n * sizeof(float), m->s, err))
        return -1;
    CUDA_TRY(err, cudaStreamSynchronize(m->s));
    return 0;
}

int cuda_model_params_download(const cuda_model_t *m, float *host, qerr_t *err) {
    if (cuda_buf_download(host, m->params, m->n * sizeof(float), m->s, err))
        return -1;
    CUDA_TRY(err, cudaStreamSynchronize(m->s));
    return 0;
}

int cuda_model_grads_download(const cuda_model_t *m, float *host, qerr_t *err) {
    if (cuda_buf_download(host, m->grads, m->n * sizeof(float), m->s, err))
        return -1;
    CUDA_TRY(err, cudaStreamSynchronize(m->s));
    const float inv = (float)(1.0 / cuda_model_loss_scale(m));
    if (inv != 1.0f)
        for (size_t i = 0; i < m->n; i++)
            host[i] *= inv; /* a power of two: exact */
    return 0;
}

void cuda_model_grads_zero(cuda_model_t *m) {
    CUDA_CHECK(cudaMemsetAsync(m->grads, 0, m->n * sizeof(float), m->s));
}

void cuda_model_params_changed(cuda_model_t *m) {
    m->q_dirty = 1;
}

float *cuda_model_params_device(cuda_model_t *m) {
    return m->params;
}

float *cuda_model_grads_device(cuda_model_t *m) {
    return m->grads;
}

float cuda_model_loss_scale(const cuda_model_t *m) {
    return m->prec == CUDA_MODEL_PREC_FP16 ? (float)m->ls.scale : 1.0f;
}

/* Whether tensor t is read by a GEMM in the compute type (attention, overseer, experts, head);
 * routers and micro agents stay FP32 (router logits are FP32 as on the CPU). */
static int gemm_weight(const model_tensor_t *t) {
    switch (t->component) {
    case MODEL_COMP_ATTENTION:
    case MODEL_COMP_EXPERTS:
    case MODEL_COMP_HEAD: return 1;
    case MODEL_COMP_OVERSEER: return !ends_with(t->name, "gate.weight");
    default: return 0;
    }
}

/* Refreshes the fake-quantized copies the forward reads (model.c quantize_weights). */
static void quantize_weights(cuda_model_t *m) {
    if (!m->q_dirty)
        return;
    prof_begin(m, CUDA_MODEL_PHASE_QUANT);
    CUDA_CHECK(
        cudaMemcpyAsync(m->qp, m->params, m->n * sizeof(float), cudaMemcpyDeviceToDevice, m->s));
    const size_t es = cuda_dtype_size(m->cdt);
    for (size_t i = 0; i < model_tensor_count(m->table); i++) {
        const model_tensor_t *t = model_tensor(m->table, i);
        const int cols = (int)t->shape[t->ndim - 1];
        const int rows = (int)(t->numel / (size_t)cols);
        if (t->fake != QUANT_F32)
            cuda_quant_fake_forward(t->fake, m->qp + t->offset, CUDA_DT_F32, m->params + t->offset,
                                    rows, cols, m->s);
        if (m->qh && gemm_weight(t))
            cuda_quant_fake_forward(t->fake, (char *)m->qh + t->offset * es, m->cdt,
                                    m->params + t->offset, rows, cols, m->s);
    }
    m->q_dirty = 0;
    m->q_version++;
    prof_end(m);
}

/* ---- activation memory ---- */

/* Carves aligned pieces out of one allocation; with base == NULL it only measures. */
typedef struct {
    char *base;
    size_t off;
} carver_t;

static void *take(carver_t *c, size_t bytes) {
    c->off = (c->off + CUDA_BUF_ALIGN - 1) / CUDA_BUF_ALIGN * CUDA_BUF_ALIGN;
    void *p = c->base ? c->base + c->off : NULL;
    c->off += bytes;
    return p;
}

static void carve(cuda_model_t *m, carver_t *c, int B, int T) {
    const size_t BT = (size_t)B * T, C = (size_t)m->cfg.dim, NH = (size_t)m->cfg.num_heads;
    const size_t BTC = BT * C * sizeof(float), BT4 = BT * sizeof(float);
    const size_t Lw = (size_t)diffusion_words(m->dd.Lb);
    const int L = m->cfg.num_layers, ck = m->opt.checkpointing;
    for (int l = 0; l < L; l++) {
        block_acts_t *a = &m->la[l];
        a->x = (float *)take(c, BTC);
        if (ck && l > 0) {
            const float *x = a->x;
            *a = m->la[0];
            a->x = (float *)x;
            continue;
        }
        a->ln1 = (float *)take(c, BTC);
        a->rstd1 = (float *)take(c, BT4);
        a->q = (float *)take(c, BTC);
        a->k = (float *)take(c, BTC);
        a->v = (float *)take(c, BTC);
        a->att = (float *)take(c, BTC);
        a->lse = (float *)take(c, NH * BT4);
        a->xmid = (float *)take(c, BTC);
        a->ln2 = (float *)take(c, BTC);
        a->rstd2 = (float *)take(c, BT4);
    }
    m->xL = (float *)take(c, BTC);
    m->lnf = (float *)take(c, BTC);
    m->rstdf = (float *)take(c, BT4);
    m->logp = (float *)take(c, BT4);
    m->entropy = (float *)take(c, BT4);
    m->lse_h = (float *)take(c, BT4);
    m->dlogp = (float *)take(c, BT4);
    m->br = (float *)take(c, BTC);
    m->dx = (float *)take(c, BTC);
    m->d1 = (float *)take(c, BTC);
    m->d2 = (float *)take(c, BTC);
    m->d3 = (float *)take(c, BTC);
    m->d4 = (float *)take(c, BTC);
    if (m->cdt != CUDA_DT_F32) {
        m->hA = take(c, BT * C * cuda_dtype_size(m->cdt));
        m->hB = take(c, BT * C * cuda_dtype_size(m->cdt));
    }
    m->attn_ws = take(c, cuda_attn_backward_workspace(B, T, m->cfg.num_heads));
    m->head_scratch = take(c, cuda_head_scratch_bytes((int)BT, m->cfg.dim, CM_HEAD_VCHUNK, m->cdt));
    m->xd = (float *)take(c, BTC);
    m->u = (float *)take(c, BTC);
    m->drstd = (float *)take(c, BT4);
    m->tau = (float *)take(c, BT4);
    m->mask = (float *)take(c, BT4);
    m->weights = (float *)take(c, BT4);
    m->pos = (int32_t *)take(c, BT * sizeof(int32_t));
    m->tokens = (int32_t *)take(c, BT * sizeof(int32_t));
    m->targets = (int32_t *)take(c, BT * sizeof(int32_t));
    m->rows = (int32_t *)take(c, BT * sizeof(int32_t));
    m->code = (uint64_t *)take(c, BT * Lw * sizeof(uint64_t));
    m->noise = (uint64_t *)take(c, BT * Lw * sizeof(uint64_t));
    m->ce_dev = (double *)take(c, sizeof(double));
    m->dloss_dev = (float *)take(c, sizeof(float));
}

int cuda_model_plan(cuda_model_t *m, int B, int T, qerr_t *err) {
    if (B < 1 || T < 1 || T > m->cfg.context || (long long)B * T > (1LL << 30))
        return qerr_set(err, QERR_RANGE, "cuda model: batch %d x %d tokens (T must be in [1, %d])",
                        B, T, m->cfg.context);
    if (B <= m->max_B && T <= m->max_T)
        return 0;
    if (B < m->max_B)
        B = m->max_B;
    if (T < m->max_T)
        T = m->max_T;
    CUDA_TRY(err, cudaStreamSynchronize(m->s));
    acts_free(m);
    const int L = m->cfg.num_layers, BT = B * T;
    m->la = (block_acts_t *)calloc((size_t)L, sizeof *m->la);
    m->moe = (cuda_moe_t **)calloc((size_t)L, sizeof *m->moe);
    m->rows_host = (int32_t *)malloc((size_t)BT * sizeof(int32_t));
    if (!m->la || !m->moe || !m->rows_host) {
        acts_free(m);
        return qerr_set(err, QERR_NOMEM, "cuda model: out of host memory");
    }
    carver_t c = {NULL, 0};
    carve(m, &c, B, T);
    m->arena = cuda_buf_alloc(c.off, err);
    if (!m->arena) {
        acts_free(m);
        return qerr_wrap(err, "cuda model: activations of %d x %d tokens (%.1f MB)", B, T,
                         (double)c.off / 1e6);
    }
    m->arena_bytes = c.off;
    c.base = (char *)m->arena;
    c.off = 0;
    carve(m, &c, B, T);
    const int ck = m->opt.checkpointing;
    const int n_moe = ck ? 1 : L;
    for (int i = 0; i < n_moe; i++) {
        m->moe[i] = cuda_moe_new(&m->md, BT, m->cdt, err);
        if (!m->moe[i]) {
            acts_free(m);
            return -1;
        }
        m->n_moe = i + 1;
    }
    if (ck) {
        for (int l = 1; l < L; l++)
            m->moe[l] = m->moe[0];
        m->route = (moe_route_t *)calloc((size_t)L, sizeof *m->route);
        if (!m->route) {
            acts_free(m);
            return qerr_set(err, QERR_NOMEM, "cuda model: out of host memory");
        }
        for (int l = 0; l < L; l++)
            if (moe_route_init(&m->route[l], &m->md, BT, err)) {
                acts_free(m);
                return -1;
            }
    }
    m->diffu = cuda_diffusion_new(&m->dd, BT, m->cdt, err);
    if (!m->diffu) {
        acts_free(m);
        return -1;
    }
    m->max_B = B;
    m->max_T = T;
    return 0;
}

void cuda_model_memory(const cuda_model_t *m, cuda_model_memory_t *out) {
    memset(out, 0, sizeof *out);
    out->params = 2 * m->n * sizeof(float);
    out->optim = m->optim ? 2 * m->n * sizeof(float) : 0;
    out->weights_q = m->n * sizeof(float) + (m->qh ? m->n * cuda_dtype_size(m->cdt) : 0);
    out->activations = m->arena_bytes + (m->diffu ? cuda_diffusion_bytes(m->diffu) : 0);
    for (int i = 0; i < m->n_moe; i++)
        out->activations += cuda_moe_bytes(m->moe[i]);
}

/* ---- layer helpers ---- */

/* x [rows, C] as a GEMM operand: itself in FP32, else converted into buf. */
static const void *operand(const cuda_model_t *m, const float *x, void *buf, size_t n) {
    if (m->cdt == CUDA_DT_F32)
        return x;
    cuda_convert(buf, m->cdt, x, CUDA_DT_F32, n, m->s);
    return buf;
}

/* The compute copy of the weight at offset off. */
static const void *weight(const cuda_model_t *m, size_t off) {
    return m->cdt == CUDA_DT_F32
               ? (const void *)(m->qp + off)
               : (const void *)((const char *)m->qh + off * cuda_dtype_size(m->cdt));
}

/* out [BT, OC] = x W^T with x already a GEMM operand. */
static void lin_fwd(cuda_model_t *m, float *out, const void *x, size_t w, int BT, int C, int OC) {
    cuda_gemm_run(m->g, m->s, GEMM_N, GEMM_T, BT, OC, C, 1.0f, x, C, weight(m, w), C, 0.0f, out, OC,
                  m->cdt, CUDA_DT_F32);
}

/* dx [BT, C] += dy W, dW += dy^T x (FP32 gradients), operands already converted. */
static void lin_bwd(cuda_model_t *m, float *dx, const void *dy, const void *x, size_t w, int BT,
                    int C, int OC) {
    cuda_gemm_run(m->g, m->s, GEMM_N, GEMM_N, BT, C, OC, 1.0f, dy, OC, weight(m, w), C, 1.0f, dx, C,
                  m->cdt, CUDA_DT_F32);
    cuda_gemm_run(m->g, m->s, GEMM_T, GEMM_N, OC, C, BT, 1.0f, dy, OC, x, C, 1.0f, m->grads + w, C,
                  m->cdt, CUDA_DT_F32);
}

static void moe_views(cuda_model_t *m, int l, moe_params_t *qp, moe_params_t *dp,
                      cuda_moe_lowp_t *lp, moe_bias_t *bias) {
    const layer_ofs_t *o = &m->lofs[l];
    moe_params_map(qp, m->qp + o->moe, &m->md);
    if (dp)
        moe_params_map(dp, m->grads + o->moe, &m->md);
    if (lp && m->qh) {
        /* The same offsets in the compute copy: map FP32 views, then re-base them. */
        moe_params_t v;
        moe_params_map(&v, m->qp + o->moe, &m->md);
        lp->ov_w1 = weight(m, (size_t)(v.ov_w1 - m->qp));
        lp->ov_w2 = weight(m, (size_t)(v.ov_w2 - m->qp));
        lp->exp_w1 = weight(m, (size_t)(v.exp_w1 - m->qp));
        lp->exp_w2 = weight(m, (size_t)(v.exp_w2 - m->qp));
    }
    if (bias) {
        float *b = m->params + o->bias;
        bias->gate = b;
        bias->router = b + m->md.M;
        bias->micro = b + (size_t)m->md.M + (size_t)m->md.M * m->md.E;
    }
}

static rng_stream_t dropout_stream(const cuda_model_t *m, int l, int branch) {
    rng_stream_t s;
    rng_stream_init(&s, MODEL_RNG_TAG_NOISE, m->noise_key, (uint64_t)(2 * l + branch));
    return s;
}

static float p_drop(const cuda_model_t *m) {
    return m->training ? m->cfg.dropout : 0.0f;
}

/* Block l's forward from la[l].x: attention branch into xmid, MoE branch (dropped) into m->br.
 * replay: the routing to use (host) or NULL; load: counters or NULL. */
static int block_forward(cuda_model_t *m, int l, const moe_route_t *replay,
                         unsigned long long *load, moe_aux_t *aux, int recompute, qerr_t *err) {
    const block_acts_t *a = &m->la[l];
    const layer_ofs_t *o = &m->lofs[l];
    const int B = m->fB, T = m->fT, BT = B * T, C = m->cfg.dim, NH = m->cfg.num_heads;
    const size_t BTC = (size_t)BT * C;
    prof_begin(m, recompute ? CUDA_MODEL_PHASE_RECOMPUTE : CUDA_MODEL_PHASE_ATTN_FWD);
    cuda_rmsnorm_forward(a->ln1, a->rstd1, a->x, m->qp + o->attn_norm, BT, C, m->s);
    const void *x1 = operand(m, a->ln1, m->hA, BTC);
    lin_fwd(m, a->q, x1, o->wq, BT, C, C);
    lin_fwd(m, a->k, x1, o->wk, BT, C, C);
    lin_fwd(m, a->v, x1, o->wv, BT, C, C);
    cuda_rope_forward(a->q, a->q, B, T, C, NH, 0, m->s);
    cuda_rope_forward(a->k, a->k, B, T, C, NH, 0, m->s);
    cuda_attn_forward(a->att, a->lse, a->q, a->k, a->v, B, T, C, NH, m->aprec, m->s);
    lin_fwd(m, m->br, operand(m, a->att, m->hA, BTC), o->wo, BT, C, C);
    cuda_dropout_forward(m->br, m->br, p_drop(m), m->training, dropout_stream(m, l, 0), BTC, m->s);
    cuda_residual_forward(a->xmid, a->x, m->br, BTC, m->s);
    if (!recompute) {
        prof_end(m);
        prof_begin(m, CUDA_MODEL_PHASE_MOE_FWD);
    }
    cuda_rmsnorm_forward(a->ln2, a->rstd2, a->xmid, m->qp + o->moe_norm, BT, C, m->s);
    moe_params_t qp;
    cuda_moe_lowp_t lp;
    moe_bias_t bias;
    moe_views(m, l, &qp, NULL, &lp, &bias);
    const int rc = cuda_moe_forward(m->moe[l], m->g, m->br, aux, load, a->ln2, &qp,
                                    m->qh ? &lp : NULL, &bias, replay, BT, m->s, err);
    prof_end(m);
    if (rc)
        return qerr_wrap(err, "layer %d", l);
    cuda_dropout_forward(m->br, m->br, p_drop(m), m->training, dropout_stream(m, l, 1), BTC, m->s);
    return 0;
}

/* xout = xd + BitDiffusion(RMSNorm xd) and, with targets and a diffusion weight, the stage's
 * training loss (model.c diff_forward). */
static int diff_forward(cuda_model_t *m, float *xout, const model_batch_t *b, model_stats_t *st,
                        qerr_t *err) {
    const int C = m->cfg.dim, BT = b->B * b->T;
    prof_begin(m, CUDA_MODEL_PHASE_DIFF_FWD);
    cuda_rmsnorm_forward(m->u, m->drstd, m->xd, m->qp + m->diff_norm, BT, C, m->s);
    const int loss = b->targets && b->weights && b->aux_diffusion != 0;
    cm_pos_mask_kernel<<<cm_blocks((size_t)BT), CM_THREADS, 0, m->s>>>(
        m->pos, loss ? m->mask : NULL, m->weights, BT, b->T);
    CUDA_LAUNCH_CHECK();
    diffusion_params_t qp;
    diffusion_params_map(&qp, m->qp + m->diff, &m->dd);
    diffusion_aux_t aux;
    cuda_diffusion_weights_version(m->diffu, m->q_version);
    if (cuda_diffusion_forward(m->diffu, m->g, m->br, &aux, m->u, m->pos, &qp, b->plan_replay,
                               m->cfg.diffusion_seed, BT, m->s, err)) {
        prof_end(m);
        return qerr_wrap(err, "diffusion stage");
    }
    st->plan_mismatches += aux.mismatches;
    cuda_residual_forward(xout, m->xd, m->br, (size_t)BT * C, m->s);
    m->diff_loss_ran = 0;
    if (loss) {
        /* c(y) of the next token from the latent head rows, as the CPU (params, not qp). */
        cuda_diffusion_code(m->code, m->params + m->diff_R, m->params + m->head, m->targets,
                            m->mask, BT, m->dd.Lb, C, m->s);
        rng_stream_t rs;
        rng_stream_init(&rs, MODEL_RNG_TAG_NOISE, m->noise_key, (uint64_t)(2 * m->cfg.num_layers));
        float dl = 0;
        if (cuda_diffusion_noise_draw(m->diffu, m->tau, m->noise, &rs, BT, m->s, err) ||
            cuda_diffusion_loss_forward(m->diffu, m->g, m->dloss_dev, m->code, m->noise, m->tau,
                                        m->mask, m->u, &qp, BT, m->s, err) ||
            cuda_buf_download(&dl, m->dloss_dev, sizeof dl, m->s, err)) {
            prof_end(m);
            return qerr_wrap(err, "diffusion loss");
        }
        CUDA_TRY(err, cudaStreamSynchronize(m->s));
        st->diffusion = dl;
        m->diff_loss_ran = 1;
    }
    prof_end(m);
    return 0;
}

/* dx: gradient of the stage's output in, of its input xd out (model.c diff_backward). */
static void diff_backward(cuda_model_t *m, float scale) {
    const int C = m->cfg.dim, BT = m->fB * m->fT;
    prof_begin(m, CUDA_MODEL_PHASE_DIFF_BWD);
    diffusion_params_t qp, dp;
    diffusion_params_map(&qp, m->qp + m->diff, &m->dd);
    diffusion_params_map(&dp, m->grads + m->diff, &m->dd);
    CUDA_CHECK(cudaMemsetAsync(m->d1, 0, (size_t)BT * C * sizeof(float), m->s));
    cuda_diffusion_backward(m->diffu, m->g, &dp, m->d1, m->dx, m->u, &qp, m->s);
    if (m->diff_loss_ran)
        cuda_diffusion_loss_backward(m->diffu, m->g, &dp, m->d1, m->aux_diffusion * scale, m->u,
                                     &qp, m->s);
    cuda_rmsnorm_backward(m->dx, m->grads + m->diff_norm, m->d1, m->xd, m->qp + m->diff_norm,
                          m->drstd, BT, C, m->s);
    prof_end(m);
}

static int upload_batch(cuda_model_t *m, const model_batch_t *b, qerr_t *err) {
    const size_t BT = (size_t)b->B * b->T;
    m->R = 0;
    if (cuda_buf_upload(m->tokens, b->tokens, BT * sizeof(int32_t), m->s, err))
        return -1;
    if (!(b->targets && b->weights))
        return 0;
    for (size_t i = 0; i < BT; i++)
        if (b->weights[i] != 0)
            m->rows_host[m->R++] = (int32_t)i;
    if (cuda_buf_upload(m->targets, b->targets, BT * sizeof(int32_t), m->s, err) ||
        cuda_buf_upload(m->weights, b->weights, BT * sizeof(float), m->s, err) ||
        cuda_buf_upload(m->rows, m->rows_host, (size_t)m->R * sizeof(int32_t), m->s, err))
        return -1;
    return 0;
}

int cuda_model_forward(cuda_model_t *m, const model_batch_t *b, model_stats_t *stats, qerr_t *err) {
    if (model_batch_check(&m->cfg, b, err) || cuda_model_plan(m, b->B, b->T, err))
        return -1;
    /* The host copies of the batch must not be rewritten while an earlier step still runs. */
    CUDA_TRY(err, cudaStreamSynchronize(m->s));
    quantize_weights(m);
    const int B = b->B, T = b->T, C = m->cfg.dim, V = m->cfg.vocab_size;
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
    m->has_targets = b->targets && b->weights;
    if (upload_batch(m, b, err))
        return -1;

    model_stats_t st;
    memset(&st, 0, sizeof st);
    m->routers = 0;
    double bal_sum = 0, z_sum = 0;
    prof_begin(m, CUDA_MODEL_PHASE_EMBED);
    cuda_embedding_forward(m->la[0].x, m->tokens, m->params + m->embed, BT, C, V, m->s);
    prof_end(m);
    for (int l = 0; l < L; l++) {
        const block_acts_t *a = &m->la[l];
        float *xnext = l + 1 < L ? m->la[l + 1].x : m->xL;
        moe_aux_t aux;
        if (block_forward(m, l, b->replay ? &b->replay[l] : NULL,
                          b->count_load ? m->loads[l] : NULL, &aux, 0, err))
            return -1;
        if (m->route && cuda_moe_route_download(m->moe[l], &m->route[l], m->s, err))
            return qerr_wrap(err, "layer %d routing", l);
        bal_sum += aux.balance;
        z_sum += aux.z;
        m->routers += aux.routers;
        st.decisions += aux.decisions;
        st.mismatches += aux.mismatches;
        if (l == m->cfg.diffusion_layer) {
            cuda_residual_forward(m->xd, a->xmid, m->br, BTC, m->s);
            if (diff_forward(m, xnext, b, &st, err))
                return -1;
        } else {
            cuda_residual_forward(xnext, a->xmid, m->br, BTC, m->s);
        }
    }
    prof_begin(m, CUDA_MODEL_PHASE_HEAD_FWD);
    cuda_rmsnorm_forward(m->lnf, m->rstdf, m->xL, m->qp + m->final_norm, BT, C, m->s);
    CUDA_CHECK(cudaMemsetAsync(m->logp, 0, (size_t)BT * sizeof(float), m->s));
    CUDA_CHECK(cudaMemsetAsync(m->entropy, 0, (size_t)BT * sizeof(float), m->s));
    if (m->has_targets && m->R > 0)
        cuda_head_forward(m->g, m->logp, m->entropy, m->lse_h, m->lnf, weight(m, m->head), m->cdt,
                          m->targets, m->rows, m->R, b->temperature, BT, C, V, CM_HEAD_VCHUNK,
                          m->head_scratch, m->s);
    if (m->has_targets) {
        cuda_crossentropy_forward(m->ce_dev, m->logp, m->weights, BT, m->s);
        if (cuda_buf_download(&st.ce, m->ce_dev, sizeof st.ce, m->s, err))
            return -1;
        for (int t = 0; t < BT; t++)
            st.weight_sum += b->weights[t];
    }
    prof_end(m);
    CUDA_TRY(err, cudaStreamSynchronize(m->s));
    m->held = L - 1;
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

const float *cuda_model_logp_device(const cuda_model_t *m) {
    return m->logp;
}

const float *cuda_model_entropy_device(const cuda_model_t *m) {
    return m->entropy;
}

int cuda_model_logp_download(const cuda_model_t *m, float *logp, float *entropy, qerr_t *err) {
    if (!m->has_fwd)
        return qerr_set(err, QERR_INVALID, "cuda model: no forward to read log-probs from");
    const size_t bytes = (size_t)m->fB * m->fT * sizeof(float);
    if ((logp && cuda_buf_download(logp, m->logp, bytes, m->s, err)) ||
        (entropy && cuda_buf_download(entropy, m->entropy, bytes, m->s, err)))
        return -1;
    CUDA_TRY(err, cudaStreamSynchronize(m->s));
    return 0;
}

int cuda_model_route_download(const cuda_model_t *m, int l, moe_route_t *out, qerr_t *err) {
    if (!m->has_fwd || l < 0 || l >= m->cfg.num_layers)
        return qerr_set(err, QERR_RANGE, "cuda model: no routing of layer %d", l);
    if (!m->route)
        return cuda_moe_route_download(m->moe[l], out, m->s, err);
    const moe_route_t *r = &m->route[l];
    if (out->max_BT < r->BT || out->KM != r->KM || out->KE != r->KE || out->KN != r->KN)
        return qerr_set(err, QERR_RANGE,
                        "cuda model: routing record for %d tokens does not fit one of %d", r->BT,
                        out->max_BT);
    const size_t n = (size_t)r->BT * r->KM;
    memcpy(out->mini, r->mini, n * sizeof(int32_t));
    memcpy(out->expert, r->expert, n * r->KE * sizeof(int32_t));
    memcpy(out->micro, r->micro, n * r->KN * sizeof(int32_t));
    out->BT = r->BT;
    return 0;
}

int cuda_model_plan_download(const cuda_model_t *m, diffusion_plan_t *plan, qerr_t *err) {
    if (!m->has_fwd)
        return qerr_set(err, QERR_INVALID, "cuda model: no forward to read the plan from");
    return cuda_diffusion_plan_download(m->diffu, plan, m->s, err);
}

/* ---- backward ---- */

/* Block l's backward: m->dx holds the gradient of the block's output (after the diffusion
 * stage's backward when l is its layer) and becomes that of its input. */
static void block_backward(cuda_model_t *m, int l, float dbal, float dz) {
    const block_acts_t *a = &m->la[l];
    const layer_ofs_t *o = &m->lofs[l];
    const int B = m->fB, T = m->fT, BT = B * T, C = m->cfg.dim, NH = m->cfg.num_heads;
    const size_t BTC = (size_t)BT * C, bytes = BTC * sizeof(float);
    prof_begin(m, CUDA_MODEL_PHASE_MOE_BWD);
    CUDA_CHECK(cudaMemsetAsync(m->br, 0, bytes, m->s));
    cuda_dropout_backward(m->br, m->dx, p_drop(m), m->training, dropout_stream(m, l, 1), BTC, m->s);
    moe_params_t qp, dp;
    cuda_moe_lowp_t lp;
    moe_views(m, l, &qp, &dp, &lp, NULL);
    CUDA_CHECK(cudaMemsetAsync(m->d1, 0, bytes, m->s));
    cuda_moe_backward(m->moe[l], m->g, &dp, m->d1, m->br, a->ln2, &qp, m->qh ? &lp : NULL, dbal, dz,
                      m->s);
    cuda_rmsnorm_backward(m->dx, m->grads + o->moe_norm, m->d1, a->xmid, m->qp + o->moe_norm,
                          a->rstd2, BT, C, m->s);
    prof_end(m);

    prof_begin(m, CUDA_MODEL_PHASE_ATTN_BWD);
    CUDA_CHECK(cudaMemsetAsync(m->br, 0, bytes, m->s));
    cuda_dropout_backward(m->br, m->dx, p_drop(m), m->training, dropout_stream(m, l, 0), BTC, m->s);
    CUDA_CHECK(cudaMemsetAsync(m->d1, 0, bytes, m->s));
    lin_bwd(m, m->d1, operand(m, m->br, m->hB, BTC), operand(m, a->att, m->hA, BTC), o->wo, BT, C,
            C);
    CUDA_CHECK(cudaMemsetAsync(m->d2, 0, bytes, m->s));
    CUDA_CHECK(cudaMemsetAsync(m->d3, 0, bytes, m->s));
    CUDA_CHECK(cudaMemsetAsync(m->d4, 0, bytes, m->s));
    cuda_attn_backward(m->d2, m->d3, m->d4, m->attn_ws, m->d1, a->q, a->k, a->v, a->att, a->lse, B,
                       T, C, NH, m->aprec, m->s);
    cuda_rope_backward(m->d2, m->d2, B, T, C, NH, 0, m->s);
    cuda_rope_backward(m->d3, m->d3, B, T, C, NH, 0, m->s);
    CUDA_CHECK(cudaMemsetAsync(m->d1, 0, bytes, m->s));
    const void *x1 = operand(m, a->ln1, m->hA, BTC);
    lin_bwd(m, m->d1, operand(m, m->d2, m->hB, BTC), x1, o->wq, BT, C, C);
    lin_bwd(m, m->d1, operand(m, m->d3, m->hB, BTC), x1, o->wk, BT, C, C);
    lin_bwd(m, m->d1, operand(m, m->d4, m->hB, BTC), x1, o->wv, BT, C, C);
    cuda_rmsnorm_backward(m->dx, m->grads + o->attn_norm, m->d1, a->x, m->qp + o->attn_norm,
                          a->rstd1, BT, C, m->s);
    prof_end(m);
}

void cuda_model_backward(cuda_model_t *m, const float *dlogp, const float *dentropy) {
    Q_ASSERT(m->has_fwd);
    const int B = m->fB, T = m->fT, C = m->cfg.dim, V = m->cfg.vocab_size;
    const int L = m->cfg.num_layers, BT = B * T;
    const size_t bytes = (size_t)BT * C * sizeof(float);
    const float scale = cuda_model_loss_scale(m);
    const float dbal = m->routers > 0 ? m->aux_balance / (float)m->routers * scale : 0.0f;
    const float dz = m->routers > 0 ? m->aux_z / (float)m->routers * scale : 0.0f;

    prof_begin(m, CUDA_MODEL_PHASE_HEAD_BWD);
    CUDA_CHECK(cudaMemsetAsync(m->d1, 0, bytes, m->s));
    if (m->has_targets && m->R > 0) {
        if (!dlogp && !dentropy) {
            cuda_crossentropy_backward(m->dlogp, scale, m->weights, BT, m->s);
            dlogp = m->dlogp;
        }
        cuda_head_backward(m->g, m->d1, m->grads + m->head, dlogp, dentropy, m->lnf,
                           weight(m, m->head), m->cdt, m->targets, m->lse_h, m->entropy, m->rows,
                           m->R, m->temperature, BT, C, V, CM_HEAD_VCHUNK, m->head_scratch, m->s);
    }
    CUDA_CHECK(cudaMemsetAsync(m->dx, 0, bytes, m->s));
    cuda_rmsnorm_backward(m->dx, m->grads + m->final_norm, m->d1, m->xL, m->qp + m->final_norm,
                          m->rstdf, BT, C, m->s);
    prof_end(m);

    for (int l = L - 1; l >= 0; l--) {
        if (l == m->cfg.diffusion_layer)
            diff_backward(m, scale);
        /* Checkpointing: recompute the block unless the shared buffers still hold it (the
         * last layer, right after the forward). */
        if (m->route && m->held != l) {
            moe_aux_t aux;
            qerr_t e;
            const int rc = block_forward(m, l, &m->route[l], NULL, &aux, 1, &e);
            /* The replayed record is the forward's own routing, already validated. */
            Q_ASSERT(rc == 0);
            (void)rc;
            m->held = l;
        }
        block_backward(m, l, dbal, dz);
    }
    prof_begin(m, CUDA_MODEL_PHASE_EMBED);
    cuda_embedding_backward(m->grads + m->embed, m->dx, m->tokens, BT, C, V, m->s);
    prof_end(m);
}

/* ---- optimizer ---- */

int cuda_model_optim_init(cuda_model_t *m, const optim_config_t *cfg, qerr_t *err) {
    cuda_optim_destroy(&m->optim);
    m->optim = cuda_optim_new(cfg, m->table, err);
    return m->optim ? 0 : -1;
}

int cuda_model_optim_step(cuda_model_t *m, double loss, optim_result_t *res, qerr_t *err) {
    if (!m->optim)
        return qerr_set(err, QERR_INVALID,
                        "cuda model: optimizer step before cuda_model_optim_init");
    optim_result_t r;
    prof_begin(m, CUDA_MODEL_PHASE_OPTIM);
    const int rc = cuda_optim_step(m->optim, m->params, m->grads, cuda_model_loss_scale(m), loss,
                                   &r, m->s, err);
    prof_end(m);
    if (rc < 0)
        return -1;
    if (m->prec == CUDA_MODEL_PREC_FP16)
        cuda_loss_scaler_update(&m->ls, isfinite(r.grad_norm));
    if (rc == 1)
        m->q_dirty = 1;
    if (res)
        *res = r;
    return rc;
}

long cuda_model_optim_steps(const cuda_model_t *m) {
    return m->optim ? cuda_optim_steps(m->optim) : 0;
}

long cuda_model_optim_skipped(const cuda_model_t *m) {
    return m->optim ? cuda_optim_skipped(m->optim) : 0;
}

void cuda_model_optim_set_counts(cuda_model_t *m, long steps, long skipped) {
    Q_ASSERT(m->optim);
    cuda_optim_set_counts(m->optim, steps, skipped);
}

int cuda_model_optim_upload(cuda_model_t *m, const float *mom1, const float *mom2, qerr_t *err) {
    if (!m->optim)
        return qerr_set(err, QERR_INVALID, "cuda model: no optimizer state to upload into");
    const size_t bytes = m->n * sizeof(float);
    if (cuda_buf_upload(cuda_optim_m(m->optim), mom1, bytes, m->s, err) ||
        cuda_buf_upload(cuda_optim_v(m->optim), mom2, bytes, m->s, err))
        return -1;
    CUDA_TRY(err, cudaStreamSynchronize(m->s));
    return 0;
}

int cuda_model_optim_download(const cuda_model_t *m, float *mom1, float *mom2, qerr_t *err) {
    if (!m->optim)
        return qerr_set(err, QERR_INVALID, "cuda model: no optimizer state to download");
    const size_t bytes = m->n * sizeof(float);
    if (cuda_buf_download(mom1, cuda_optim_m(m->optim), bytes, m->s, err) ||
        cuda_buf_download(mom2, cuda_optim_v(m->optim), bytes, m->s, err))
        return -1;
    CUDA_TRY(err, cudaStreamSynchronize(m->s));
    return 0;
}

void cuda_model_balance_update(cuda_model_t *m, int apply) {
    const float rate = m->cfg.balance_bias_rate;
    const size_t nl = cuda_moe_load_len(&m->md) * sizeof(unsigned long long);
    for (int l = 0; l < m->cfg.num_layers; l++) {
        if (apply && rate > 0) {
            moe_params_t qp;
            moe_bias_t bias;
            moe_views(m, l, &qp, NULL, NULL, &bias);
            cuda_moe_bias_update(&bias, m->loads[l], &m->md, rate, m->s);
        }
        CUDA_CHECK(cudaMemsetAsync(m->loads[l], 0, nl, m->s));
    }
}
