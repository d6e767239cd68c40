/* AdamW, gradient norm and loss scaler on the device: see cuda_optim.h. */
#include "cuda_optim.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "cuda_buf.h"
#include "cuda_reduce.cuh"

/* Elements per block of the update kernel (a tensor is split into pieces of at most this). */
#define OPTIM_UPDATE_PIECE 16384

namespace {

/* One piece of one trained tensor: elements [off, off + n), decayed or not. */
struct piece {
    size_t off;
    int n;
    int decay; /* 1 for MODEL_PARAM_MATRIX */
};

/* Sum of g^2 over chunk blockIdx.x of CUDA_OPTIM_NORM_CHUNK elements, in double. */
__global__ void norm_partial_kernel(double *partial, const float *g, size_t n) {
    const size_t lo = (size_t)blockIdx.x * CUDA_OPTIM_NORM_CHUNK;
    const size_t hi = lo + CUDA_OPTIM_NORM_CHUNK < n ? lo + CUDA_OPTIM_NORM_CHUNK : n;
    double s = 0.0;
    for (size_t i = lo + threadIdx.x; i < hi; i += blockDim.x)
        s += (double)g[i] * (double)g[i];
    s = cuda_block_reduce<cuda_op_sum<double>>(s, 0.0);
    if (threadIdx.x == 0)
        partial[blockIdx.x] = s;
}

/* The scalars of one update, as optim_step rounds them to real. */
struct adam_scalars {
    float sc;        /* clip factor / grad_scale */
    float b1, b2;    /* betas */
    float step_size; /* lr / (1 - beta1^t) */
    float inv_bc2;   /* 1 / (1 - beta2^t) */
    float eps;
    float decay; /* 1 - lr wd, for matrices */
};

/* optim_step's inner loop, one piece per block, the same FP32 operations in the same order. */
__global__ void adamw_kernel(float *p, float *m, float *v, const float *g, const piece *pieces,
                             adam_scalars k) {
    const piece pc = pieces[blockIdx.x];
    const float decay = pc.decay ? k.decay : 1.0f;
    const float one_b1 = 1.0f - k.b1, one_b2 = 1.0f - k.b2;
    for (int j = threadIdx.x; j < pc.n; j += blockDim.x) {
        const size_t i = pc.off + (size_t)j;
        const float gi = __fmul_rn(g[i], k.sc);
        const float mi = __fadd_rn(__fmul_rn(k.b1, m[i]), __fmul_rn(one_b1, gi));
        const float vi = __fadd_rn(__fmul_rn(k.b2, v[i]), __fmul_rn(__fmul_rn(one_b2, gi), gi));
        m[i] = mi;
        v[i] = vi;
        const float den = __fadd_rn(sqrtf(__fmul_rn(vi, k.inv_bc2)), k.eps);
        p[i] = __fsub_rn(__fmul_rn(p[i], decay), __fmul_rn(k.step_size, mi) / den);
    }
}

} // namespace

struct cuda_optim {
    optim_config_t cfg;
    size_t n;
    float *m, *v;  /* device [n] */
    piece *pieces; /* device [n_pieces] */
    int n_pieces;
    double *partial;   /* device [n_chunks] */
    double *partial_h; /* host [n_chunks] */
    size_t n_chunks;
    long steps, skipped;
};

extern "C" {

cuda_optim_t *cuda_optim_new(const optim_config_t *cfg, const model_t *model, qerr_t *err) {
    if (optim_config_check(cfg, err))
        return qerr_wrap(err, "cuda optimizer"), nullptr;
    cuda_optim_t *o = (cuda_optim_t *)calloc(1, sizeof *o);
    if (!o)
        return qerr_set(err, QERR_NOMEM, "cuda optimizer: out of host memory"), nullptr;
    o->cfg = *cfg;
    o->n = model_num_reals(model);
    o->n_chunks = (o->n + CUDA_OPTIM_NORM_CHUNK - 1) / CUDA_OPTIM_NORM_CHUNK;

    /* The update pieces: every trained tensor in table order, split at OPTIM_UPDATE_PIECE. */
    size_t np = 0;
    for (size_t ti = 0; ti < model_tensor_count(model); ti++) {
        const model_tensor_t *t = model_tensor(model, ti);
        if (t->kind != MODEL_PARAM_BUFFER)
            np += (t->numel + OPTIM_UPDATE_PIECE - 1) / OPTIM_UPDATE_PIECE;
    }
    piece *host = (piece *)calloc(np ? np : 1, sizeof *host);
    o->partial_h = (double *)calloc(o->n_chunks ? o->n_chunks : 1, sizeof(double));
    if (!host || !o->partial_h) {
        free(host);
        cuda_optim_destroy(&o);
        return qerr_set(err, QERR_NOMEM, "cuda optimizer: out of host memory"), nullptr;
    }
    size_t k = 0;
    for (size_t ti = 0; ti < model_tensor_count(model); ti++) {
        const model_tensor_t *t = model_tensor(model, ti);
        if (t->kind == MODEL_PARAM_BUFFER)
            continue;
        for (size_t j = 0; j < t->numel; j += OPTIM_UPDATE_PIECE) {
            host[k].off = t->offset + j;
            host[k].n =
                (int)(t->numel - j < OPTIM_UPDATE_PIECE ? t->numel - j : OPTIM_UPDATE_PIECE);
            host[k].decay = t->kind == MODEL_PARAM_MATRIX;
            k++;
        }
    }
    o->n_pieces = (int)np;
    o->m = (float *)cuda_buf_calloc(o->n * sizeof(float), err);
    o->v = o->m ? (float *)cuda_buf_calloc(o->n * sizeof(float), err) : nullptr;
    o->pieces = o->v ? (piece *)cuda_buf_alloc((np ? np : 1) * sizeof(piece), err) : nullptr;
    o->partial =
        o->pieces ? (double *)cuda_buf_alloc((o->n_chunks ? o->n_chunks : 1) * sizeof(double), err)
                  : nullptr;
    if (!o->partial) {
        free(host);
        cuda_optim_destroy(&o);
        return nullptr;
    }
    const cudaError_t e = cudaMemcpy(o->pieces, host, np * sizeof(piece), cudaMemcpyHostToDevice);
    free(host);
    if (e != cudaSuccess) {
        (void)cudaGetLastError();
        cuda_optim_destroy(&o);
        return qerr_set(err, QERR_IO, "cuda optimizer: uploading the tensor table: %s",
                        cudaGetErrorString(e)),
               nullptr;
    }
    return o;
}

void cuda_optim_destroy(cuda_optim_t **po) {
    if (!po || !*po)
        return;
    cuda_optim_t *o = *po;
    cuda_buf_free((void **)&o->m);
    cuda_buf_free((void **)&o->v);
    cuda_buf_free((void **)&o->pieces);
    cuda_buf_free((void **)&o->partial);
    free(o->partial_h);
    free(o);
    *po = nullptr;
}

int cuda_optim_grad_norm(cuda_optim_t *o, const float *grads, double grad_scale, double *norm,
                         cudaStream_t s, qerr_t *err) {
    Q_ASSERT(grad_scale > 0);
    if (o->n_chunks == 0) {
        *norm = 0;
        return 0;
    }
    norm_partial_kernel<<<(unsigned)o->n_chunks, CUDA_THREADS, 0, s>>>(o->partial, grads, o->n);
    CUDA_LAUNCH_CHECK();
    CUDA_TRY(err, cudaMemcpyAsync(o->partial_h, o->partial, o->n_chunks * sizeof(double),
                                  cudaMemcpyDeviceToHost, s));
    CUDA_TRY(err, cudaStreamSynchronize(s));
    /* The chunk sums in order, as the CPU's grad_norm2. */
    double sum = 0;
    for (size_t c = 0; c < o->n_chunks; c++)
        sum += o->partial_h[c];
    *norm = sqrt(sum) / grad_scale;
    return 0;
}

int cuda_optim_step(cuda_optim_t *o, float *params, const float *grads, double grad_scale,
                    double loss, optim_result_t *res, cudaStream_t s, qerr_t *err) {
    double norm;
    if (cuda_optim_grad_norm(o, grads, grad_scale, &norm, s, err) != 0)
        return -1;
    optim_result_t r = {0, norm, 0};
    if (!isfinite(loss) || !isfinite(norm)) {
        o->skipped++;
        if (res)
            *res = r;
        return 0;
    }
    /* optim_step's scalars, rounded to float where it rounds them to real. */
    const optim_config_t *c = &o->cfg;
    const double lr = optim_lr_at(c, o->steps);
    const double clip = c->grad_clip > 0 && norm > c->grad_clip ? c->grad_clip / norm : 1.0;
    const long t = o->steps + 1;
    const double bc1 = 1 - pow(c->beta1, (double)t), bc2 = 1 - pow(c->beta2, (double)t);
    adam_scalars k;
    k.sc = (float)(clip / grad_scale);
    k.b1 = (float)c->beta1;
    k.b2 = (float)c->beta2;
    k.step_size = (float)(lr / bc1);
    k.inv_bc2 = (float)(1 / bc2);
    k.eps = (float)c->eps;
    k.decay = (float)(1 - lr * c->weight_decay);
    if (o->n_pieces > 0) {
        adamw_kernel<<<o->n_pieces, CUDA_THREADS, 0, s>>>(params, o->m, o->v, grads, o->pieces, k);
        CUDA_LAUNCH_CHECK();
    }
    o->steps++;
    r.applied = 1;
    r.lr = lr;
    if (res)
        *res = r;
    return 1;
}

long cuda_optim_steps(const cuda_optim_t *o) {
    return o->steps;
}

long cuda_optim_skipped(const cuda_optim_t *o) {
    return o->skipped;
}

void cuda_optim_set_counts(cuda_optim_t *o, long steps, long skipped) {
    o->steps = steps;
    o->skipped = skipped;
}

float *cuda_optim_m(cuda_optim_t *o) {
    return o->m;
}

float *cuda_optim_v(cuda_optim_t *o) {
    return o->v;
}

size_t cuda_optim_len(const cuda_optim_t *o) {
    return o->n;
}

const optim_config_t *cuda_optim_config(const cuda_optim_t *o) {
    return &o->cfg;
}

void cuda_loss_scaler_init(cuda_loss_scaler_t *ls, double init_scale, int growth_interval) {
    Q_ASSERT(growth_interval >= 1);
    double sc = 1;
    while (sc * 2 <= init_scale && sc * 2 <= CUDA_LOSS_SCALE_MAX)
        sc *= 2;
    ls->scale = sc;
    ls->growth_interval = growth_interval;
    ls->good_steps = 0;
    ls->overflows = 0;
}

void cuda_loss_scaler_update(cuda_loss_scaler_t *ls, int finite) {
    if (!finite) {
        ls->overflows++;
        ls->good_steps = 0;
        if (ls->scale > 1)
            ls->scale /= 2;
        return;
    }
    if (++ls->good_steps >= ls->growth_interval) {
        ls->good_steps = 0;
        if (ls->scale < CUDA_LOSS_SCALE_MAX)
            ls->scale *= 2;
    }
}

} /* extern "C" */
