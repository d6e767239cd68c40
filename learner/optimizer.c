#include "optimizer.h"

#include "alloc.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#ifdef _OPENMP
#define OMP_PRAGMA(x) _Pragma(#x)
#else
#define OMP_PRAGMA(x)
#endif

/* Elements per partial sum of the gradient norm: the sum order is fixed whatever the threads. */
#define OPTIM_NORM_CHUNK 65536
/* Below this many elements a loop runs on one thread: a fork-join of the OpenMP team costs a
 * scheduler time slice on a loaded machine (see GEMM_PARALLEL_MIN_WORK in gemm.c). */
#define OPTIM_PARALLEL_MIN (1 << 20)

struct optim {
    optim_config_t cfg;
    size_t n;
    real *m, *v;
    long steps, skipped;
    double *partial; /* [n_chunks] */
    size_t n_chunks;
};

void optim_config_default(optim_config_t *c) {
    *c = (optim_config_t){.lr = 1e-4,
                          .warmup_steps = 0,
                          .schedule = OPTIM_LR_CONSTANT,
                          .total_steps = 1000,
                          .weight_decay = 0.01,
                          .beta1 = 0.9,
                          .beta2 = 0.95,
                          .eps = 1e-8,
                          .grad_clip = 1.0};
}

double optim_lr_at(const optim_config_t *c, long step) {
    if (step < c->warmup_steps)
        return c->lr * (double)(step + 1) / (double)c->warmup_steps;
    if (c->schedule == OPTIM_LR_CONSTANT)
        return c->lr;
    const double span = (double)c->total_steps - c->warmup_steps;
    double prog = span > 0 ? ((double)step - c->warmup_steps) / span : 1.0;
    if (prog > 1)
        prog = 1;
    return c->lr * 0.5 * (1 + cos(M_PI * prog));
}

int optim_config_check(const optim_config_t *cfg, qerr_t *err) {
    if (!(cfg->lr >= 0) || cfg->warmup_steps < 0 || cfg->total_steps < 1 ||
        !(cfg->beta1 >= 0 && cfg->beta1 < 1) || !(cfg->beta2 >= 0 && cfg->beta2 < 1) ||
        !(cfg->eps > 0) || !(cfg->weight_decay >= 0) || (int)cfg->schedule < 0 ||
        cfg->schedule >= OPTIM_LR_COUNT)
        return qerr_set(err, QERR_RANGE,
                        "optimizer: invalid settings (lr %g, warmup %d, total %d, betas %g/%g, "
                        "eps %g, weight decay %g)",
                        cfg->lr, cfg->warmup_steps, cfg->total_steps, cfg->beta1, cfg->beta2,
                        cfg->eps, cfg->weight_decay);
    return 0;
}

optim_t *optim_new(const optim_config_t *cfg, const model_t *model, qerr_t *err) {
    if (optim_config_check(cfg, err))
        return NULL;
    optim_t *o = calloc(1, sizeof *o);
    if (!o)
        return qerr_set(err, QERR_NOMEM, "optimizer: out of memory"), NULL;
    o->cfg = *cfg;
    o->n = model_num_reals(model);
    o->m = q_aligned_calloc(o->n, sizeof(real));
    o->v = q_aligned_calloc(o->n, sizeof(real));
    o->n_chunks = (o->n + OPTIM_NORM_CHUNK - 1) / OPTIM_NORM_CHUNK;
    o->partial = calloc(o->n_chunks ? o->n_chunks : 1, sizeof *o->partial);
    if (!o->m || !o->v || !o->partial) {
        optim_destroy(&o);
        return qerr_set(err, QERR_NOMEM, "optimizer: out of memory for the Adam moments"), NULL;
    }
    return o;
}

void optim_destroy(optim_t **po) {
    optim_t *o = *po;
    if (!o)
        return;
    q_aligned_free(o->m);
    q_aligned_free(o->v);
    free(o->partial);
    free(o);
    *po = NULL;
}

/* Sum of squared gradients over the trainable tensors. Buffers have zero gradients by
 * construction, so the whole buffer can be summed in fixed chunks. */
static double grad_norm2(optim_t *o, const real *g) {
    const long nc = (long)o->n_chunks;
    OMP_PRAGMA(omp parallel for schedule(static) if (o->n >= OPTIM_PARALLEL_MIN))
    for (long c = 0; c < nc; c++) {
        const size_t lo = (size_t)c * OPTIM_NORM_CHUNK;
        const size_t hi = lo + OPTIM_NORM_CHUNK < o->n ? lo + OPTIM_NORM_CHUNK : o->n;
        double s = 0;
        for (size_t i = lo; i < hi; i++)
            s += (double)g[i] * (double)g[i];
        o->partial[c] = s;
    }
    double s = 0;
    for (long c = 0; c < nc; c++)
        s += o->partial[c];
    return s;
}

int optim_step(optim_t *o, model_t *model, double loss, optim_result_t *res) {
    Q_ASSERT(model_num_reals(model) == o->n);
    real *p = model_params(model);
    const real *g = model_grads(model);
    const double norm = sqrt(grad_norm2(o, g));
    optim_result_t r = {.applied = 0, .grad_norm = norm, .lr = 0};
    if (!isfinite(loss) || !isfinite(norm)) {
        o->skipped++;
        if (res)
            *res = r;
        return 0;
    }
    const optim_config_t *c = &o->cfg;
    const double lr = optim_lr_at(c, o->steps);
    const double clip = c->grad_clip > 0 && norm > c->grad_clip ? c->grad_clip / norm : 1.0;
    const long t = o->steps + 1;
    const double bc1 = 1 - pow(c->beta1, (double)t), bc2 = 1 - pow(c->beta2, (double)t);
    const real b1 = (real)c->beta1, b2 = (real)c->beta2, sc = (real)clip;
    const real step_size = (real)(lr / bc1), inv_bc2 = (real)(1 / bc2), eps = (real)c->eps;
    for (size_t ti = 0; ti < model_tensor_count(model); ti++) {
        const model_tensor_t *tt = model_tensor(model, ti);
        if (tt->kind == MODEL_PARAM_BUFFER)
            continue;
        const real decay = tt->kind == MODEL_PARAM_MATRIX ? (real)(1 - lr * c->weight_decay) : 1;
        real *pp = p + tt->offset, *mm = o->m + tt->offset, *vv = o->v + tt->offset;
        const real *gg = g + tt->offset;
        const long n = (long)tt->numel;
        OMP_PRAGMA(omp parallel for schedule(static) if (n >= OPTIM_PARALLEL_MIN))
        for (long i = 0; i < n; i++) {
            const real gi = gg[i] * sc;
            mm[i] = b1 * mm[i] + (1 - b1) * gi;
            vv[i] = b2 * vv[i] + (1 - b2) * gi * gi;
            pp[i] = pp[i] * decay - step_size * mm[i] / (R_SQRT(vv[i] * inv_bc2) + eps);
        }
    }
    o->steps++;
    model_params_changed(model);
    r.applied = 1;
    r.lr = lr;
    if (res)
        *res = r;
    return 1;
}

long optim_steps(const optim_t *o) {
    return o->steps;
}

long optim_skipped(const optim_t *o) {
    return o->skipped;
}

void optim_set_counts(optim_t *o, long steps, long skipped) {
    o->steps = steps;
    o->skipped = skipped;
}

real *optim_m(optim_t *o) {
    return o->m;
}

real *optim_v(optim_t *o) {
    return o->v;
}

size_t optim_len(const optim_t *o) {
    return o->n;
}

const optim_config_t *optim_config(const optim_t *o) {
    return &o->cfg;
}
