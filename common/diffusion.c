#include "diffusion.h"

#include "alloc.h"
#include "layers.h"
#include "quant.h"

#include <math.h>
#include <string.h>

/* ---- sizes and parameters ---- */

void diffusion_dims_from_config(diffusion_dims_t *d, const model_config_t *cfg) {
    *d = (diffusion_dims_t){
        .C = cfg->dim,
        .Lb = cfg->diffusion_bits,
        .W = cfg->diffusion_width,
        .NB = cfg->diffusion_blocks,
        .F = cfg->diffusion_ffn,
        .D = cfg->diffusion_time_dim,
        .K = cfg->diffusion_steps,
    };
}

size_t diffusion_params_sizes(const diffusion_dims_t *d, size_t s[DIFFUSION_NUM_TENSORS]) {
    size_t C = (size_t)d->C, Lb = (size_t)d->Lb, W = (size_t)d->W, NB = (size_t)d->NB,
           F = (size_t)d->F, D = (size_t)d->D;
    const size_t v[DIFFUSION_NUM_TENSORS] = {W * Lb, Lb,     W * C,      C,      W * D,
                                             D,      NB * W, NB * F * W, NB * W, NB * W * F,
                                             NB * F, Lb * W, W,          C * Lb, Lb};
    size_t total = 0;
    for (int i = 0; i < DIFFUSION_NUM_TENSORS; i++)
        total += s[i] = v[i];
    return total;
}

void diffusion_params_map(diffusion_params_t *p, real *buf, const diffusion_dims_t *d) {
    size_t s[DIFFUSION_NUM_TENSORS];
    diffusion_params_sizes(d, s);
    real **slots[DIFFUSION_NUM_TENSORS] = {
        &p->in_z_w,    &p->in_z_norm, &p->in_c_w,   &p->in_c_norm, &p->time_w,
        &p->time_norm, &p->blk_norm,  &p->up_w,     &p->up_norm,   &p->down_w,
        &p->down_norm, &p->out_w,     &p->out_norm, &p->dec_w,     &p->dec_norm};
    for (int i = 0; i < DIFFUSION_NUM_TENSORS; i++) {
        *slots[i] = buf;
        buf += s[i];
    }
}

void diffusion_simhash_init(real *R, int Lb, int C, uint64_t diffusion_seed) {
    rng_stream_t r;
    rng_stream_init(&r, DIFFUSION_TAG_SIMHASH, diffusion_seed, 0);
    for (size_t i = 0; i < (size_t)Lb * C; i++)
        R[i] = rng_stream_normal(&r);
}

/* ---- packed bits ---- */

int diffusion_words(int Lb) {
    return (Lb + 63) / 64;
}

void diffusion_bits_xor(uint64_t *out, const uint64_t *a, const uint64_t *b, int nw) {
    for (int w = 0; w < nw; w++)
        out[w] = a[w] ^ b[w];
}

int diffusion_bits_popcount(const uint64_t *a, int nw) {
    int n = 0;
    for (int w = 0; w < nw; w++)
        n += __builtin_popcountll(a[w]);
    return n;
}

int diffusion_bit_get(const uint64_t *a, int b) {
    return (int)((a[b / 64] >> (b % 64)) & 1);
}

void diffusion_bit_set(uint64_t *a, int b, int v) {
    uint64_t m = 1ULL << (b % 64);
    a[b / 64] = v ? a[b / 64] | m : a[b / 64] & ~m;
}

/* Mask of the valid bits of word w of an Lb-bit code. */
static uint64_t word_mask(int Lb, int w) {
    int rem = Lb - 64 * w;
    return rem >= 64 ? ~0ULL : (1ULL << rem) - 1;
}

/* ---- codes, noise, schedule ---- */

void diffusion_code(uint64_t *code, const real *R, const real *w_row, int Lb, int C) {
    memset(code, 0, (size_t)diffusion_words(Lb) * sizeof *code);
    for (int b = 0; b < Lb; b++) {
        const real *r = R + (size_t)b * C;
        real s = 0;
        for (int c = 0; c < C; c++)
            s += r[c] * w_row[c];
        if (s > 0)
            diffusion_bit_set(code, b, 1);
    }
}

double diffusion_flip_prob(double tau) {
    /* cos(pi tau) written as sin(pi (1/2 - tau)): the argument is exactly 0 at tau = 1/2. */
    return (1.0 - sin(M_PI * (0.5 - tau))) / 4.0;
}

void diffusion_noise_draw(real *tau, uint64_t *m, rng_stream_t *rng, int BT, int Lb) {
    const int Lw = diffusion_words(Lb);
    for (int t = 0; t < BT; t++) {
        double ta = 1.0 - rng_stream_uniform_f64(rng);
        double p = diffusion_flip_prob(ta);
        tau[t] = (real)ta;
        uint64_t *mt = m + (size_t)t * Lw;
        memset(mt, 0, (size_t)Lw * sizeof *mt);
        for (int b = 0; b < Lb; b++)
            if (rng_stream_uniform_f64(rng) < p)
                diffusion_bit_set(mt, b, 1);
    }
}

void diffusion_plan_noise(uint64_t *z, uint64_t diffusion_seed, uint64_t pos, int Lb) {
    const int Lw = diffusion_words(Lb);
    for (int w = 0; w < Lw; w++)
        z[w] = rng_plan_word(diffusion_seed, pos, (uint64_t)w) & word_mask(Lb, w);
}

int diffusion_plan_nflip(int k, int K, int popcount) {
    Q_ASSERT(k >= 1 && k <= K);
    double pk = diffusion_flip_prob((double)k / K), pkm = diffusion_flip_prob((double)(k - 1) / K);
    return (int)round(pkm / pk * popcount);
}

static real sigm(real x) {
    return 1 / (1 + R_EXP(-x));
}

/* Confidence |2 pi - 1| of a flip logit. */
static real plan_conf(real logit) {
    return R_FABS(2 * sigm(logit) - 1);
}

/* Codes up to this length sort their candidate flips on the stack; longer ones fall back to
 * repeated minimum scans, which need no scratch. */
#define PLAN_SORT_MAX 1024

/* A predicted flip: its confidence and bit index. */
typedef struct {
    real c;
    int b;
} plan_cand_t;

/* Stable bottom-up merge sort of a[n] by increasing confidence, tmp[n] scratch; returns the
 * array (a or tmp) holding the result. a is in increasing bit order, so equal confidences stay
 * in increasing bit order: the order the minimum scans of diffusion_plan_step pick them in. */
static plan_cand_t *cand_sort(plan_cand_t *a, plan_cand_t *tmp, int n) {
    plan_cand_t *src = a, *dst = tmp;
    for (int w = 1; w < n; w *= 2) {
        for (int lo = 0; lo < n; lo += 2 * w) {
            const int mid = lo + w < n ? lo + w : n, hi = lo + 2 * w < n ? lo + 2 * w : n;
            int i = lo, j = mid, o = lo;
            while (i < mid && j < hi)
                dst[o++] = src[j].c < src[i].c ? src[j++] : src[i++];
            while (i < mid)
                dst[o++] = src[i++];
            while (j < hi)
                dst[o++] = src[j++];
        }
        plan_cand_t *t = src;
        src = dst;
        dst = t;
    }
    return src;
}

int diffusion_plan_step(uint64_t *z_prev, const uint64_t *z, const real *logits, int k, int K,
                        int Lb) {
    Q_ASSERT(Lb >= 1 && Lb <= DIFFUSION_MAX_BITS && z_prev != z);
    const int Lw = diffusion_words(Lb);
    uint64_t e[DIFFUSION_MAX_BITS / 64];
    plan_cand_t cand[PLAN_SORT_MAX], tmp[PLAN_SORT_MAX];
    const int sort = Lb <= PLAN_SORT_MAX;
    int nc = 0;
    memset(e, 0, (size_t)Lw * sizeof *e);
    for (int b = 0; b < Lb; b++) {
        const real pi = sigm(logits[b]);
        if (pi > (real)0.5) {
            diffusion_bit_set(e, b, 1);
            if (sort)
                cand[nc++] = (plan_cand_t){R_FABS(2 * pi - 1), b};
        }
    }
    diffusion_bits_xor(z_prev, z, e, Lw);
    const int n = diffusion_plan_nflip(k, K, diffusion_bits_popcount(e, Lw));
    /* Re-noise the n least confident flips, equal confidences by lowest index. The candidates
     * have pi > 1/2, so no confidence is NaN and (confidence, index) orders them totally. */
    if (sort) {
        Q_ASSERT(n <= nc);
        const plan_cand_t *by_conf = cand_sort(cand, tmp, nc);
        for (int i = 0; i < n; i++)
            z_prev[by_conf[i].b / 64] ^= 1ULL << (by_conf[i].b % 64);
        return n;
    }
    /* Repeated minimum scans over the remaining set bits of e, strict < so the lowest index
     * wins among equal confidences. */
    for (int i = 0; i < n; i++) {
        int best = -1;
        real best_c = 0;
        for (int b = 0; b < Lb; b++) {
            if (!diffusion_bit_get(e, b))
                continue;
            const real c = plan_conf(logits[b]);
            if (best < 0 || c < best_c) {
                best = b;
                best_c = c;
            }
        }
        diffusion_bit_set(e, best, 0);
        diffusion_bit_set(z_prev, best, !diffusion_bit_get(z_prev, best));
    }
    return n;
}

void diffusion_sinusoid(real *out, real tau, int D) {
    const int h = D / 2;
    for (int i = 0; i < h; i++) {
        real f = R_POW((real)10000, -(real)i / (real)h);
        out[i] = R_SIN(1000 * tau * f);
        out[h + i] = R_COS(1000 * tau * f);
    }
}

/* ---- plan records ---- */

int diffusion_plan_init(diffusion_plan_t *plan, int Lb, int max_BT, qerr_t *err) {
    memset(plan, 0, sizeof *plan);
    plan->Lb = Lb;
    plan->Lw = diffusion_words(Lb);
    plan->max_BT = max_BT;
    plan->z1 = q_aligned_calloc((size_t)max_BT * plan->Lw, sizeof(uint64_t));
    plan->z0 = q_aligned_calloc((size_t)max_BT * plan->Lw, sizeof(uint64_t));
    if (!plan->z1 || !plan->z0) {
        diffusion_plan_free(plan);
        return qerr_set(err, QERR_NOMEM, "diffusion: out of memory for a plan of %d positions",
                        max_BT);
    }
    return 0;
}

void diffusion_plan_free(diffusion_plan_t *plan) {
    q_aligned_free(plan->z1);
    q_aligned_free(plan->z0);
    plan->z1 = plan->z0 = NULL;
}

int diffusion_plan_validate(const diffusion_plan_t *plan, int Lb, int BT, qerr_t *err) {
    if (plan->Lb != Lb || plan->BT != BT || plan->Lw != diffusion_words(Lb) || !plan->z1 ||
        !plan->z0)
        return qerr_set(err, QERR_INVALID,
                        "plan record: shape (positions %d, bits %d) does not match the stage "
                        "(positions %d, bits %d)",
                        plan->BT, plan->Lb, BT, Lb);
    for (int t = 0; t < BT; t++)
        for (int w = 0; w < plan->Lw; w++) {
            uint64_t extra = ~word_mask(Lb, w);
            if ((plan->z1[(size_t)t * plan->Lw + w] | plan->z0[(size_t)t * plan->Lw + w]) & extra)
                return qerr_set(err, QERR_INVALID,
                                "plan record: position %d has bits set beyond bit %d", t, Lb);
        }
    return 0;
}

/* ---- BitLinear with its input RMSNorm ---- */

/* Saved state of one normed BitLinear over BT rows of IC inputs. */
typedef struct {
    real *n;    /* [BT, IC] RMSNorm output, the BitLinear input */
    real *rstd; /* [BT] */
    real *xq;   /* [BT, IC] dequantised int8 activations */
} blact_t;

/* out [BT, OC] = bitlinear(RMSNorm_g(x), w) (ASSIGNED) from w's ternary codes wc [OC, IC] and
 * scales sw [OC] (bitlinear_weight_codes); sx [BT] is scratch. */
static void bl_forward(real *out, blact_t *a, const real *wc, const real *sw, real *sx,
                       const real *x, const real *g, int BT, int IC, int OC) {
    rmsnorm_forward(a->n, a->rstd, x, g, BT, IC);
    bitlinear_forward_codes(out, a->xq, sx, a->n, wc, sw, BT, IC, OC);
}

/* ACCUMULATES dx [BT, IC] (may be NULL), dw, dg; dn [BT, IC] is scratch. */
static void bl_backward(real *dx, real *dw, real *dg, real *dn, const real *dout, const blact_t *a,
                        const real *wq, const real *x, const real *g, int BT, int IC, int OC) {
    memset(dn, 0, (size_t)BT * IC * sizeof(real));
    bitlinear_backward(dn, dw, dout, wq, a->xq, BT, IC, OC);
    rmsnorm_backward(dx, dg, dn, x, g, a->rstd, BT, IC);
}

/* ---- the denoiser ---- */

/* One denoiser evaluation over BT rows, everything its backward needs. */
typedef struct {
    real *zin;     /* [BT, Lb] 2z - 1 */
    real *sinus;   /* [BT, D] */
    blact_t bz;    /* IC = Lb */
    blact_t bc;    /* IC = C */
    blact_t bt;    /* IC = D */
    real *h;       /* [NB + 1, BT, W] residual stream entering each block, then the last */
    real *a;       /* [NB, BT, W] block norm outputs */
    real *rstd_a;  /* [NB, BT] */
    blact_t bup;   /* [NB, ...] IC = W */
    real *up;      /* [NB, BT, F] */
    real *r;       /* [NB, BT, F] ReLU²(up) */
    blact_t bdown; /* [NB, ...] IC = F */
    blact_t bout;  /* IC = W */
    real *logits;  /* [BT, Lb] */
} den_t;

/* The part of one block's activations inside a [NB, BT, X] array. */
static blact_t blk(const blact_t *a, int b, int BT, int IC) {
    return (blact_t){a->n + (size_t)b * BT * IC, a->rstd + (size_t)b * BT,
                     a->xq + (size_t)b * BT * IC};
}

/* Scales s_w of every BitLinear weight, one per output row. */
typedef struct {
    real *in_z, *in_c, *time; /* [W] each */
    real *up;                 /* [NB, F] */
    real *down;               /* [NB, W] */
    real *out;                /* [Lb] */
    real *dec;                /* [C] */
} wscale_t;

struct diffusion_acts {
    diffusion_dims_t d;
    int max_BT, BT, loss_BT;
    den_t den_plan; /* the last sampler step */
    den_t den_loss; /* the training loss path */
    real *wq_buf;   /* dequantised weights, diffusion_params_map layout */
    diffusion_params_t wq;
    real *wc_buf; /* ternary codes of the same weights, same layout */
    diffusion_params_t wc;
    real *ws_buf; /* the scales, wscale_t layout */
    wscale_t ws;
    uint64_t wver; /* the caller's weight version, 0 = none */
    uint64_t qver; /* the version the codes were made from, 0 = none */
    real *hc;      /* [BT, W] BL_c(u) of the current diffusion_forward */
    blact_t bdec;  /* IC = Lb */
    real *cin;     /* [BT, Lb] 2 c_hat - 1 */
    diffusion_plan_t plan;
    uint64_t *zk, *zn;         /* [BT, Lw] sampler state */
    uint64_t *m;               /* [BT, Lw] loss-path flip mask */
    real *mask;                /* [BT] loss-path position weights */
    real *tau;                 /* [BT] sampler time of the current step */
    real *dl;                  /* [BT, Lb] gradient of a denoiser's logits */
    real *sx;                  /* [BT] BitLinear activation-scale scratch */
    real *dh, *dt, *dt2, *dt3; /* [BT, max width] backward scratch */
};

static void *xcalloc(int *ok, size_t n, size_t size) {
    void *p = q_aligned_calloc(n ? n : 1, size);
    *ok = *ok && p != NULL;
    return p;
}

static void blact_alloc(blact_t *a, int *ok, size_t rows, size_t IC) {
    a->n = xcalloc(ok, rows * IC, sizeof(real));
    a->rstd = xcalloc(ok, rows, sizeof(real));
    a->xq = xcalloc(ok, rows * IC, sizeof(real));
}

static void blact_free(blact_t *a) {
    q_aligned_free(a->n);
    q_aligned_free(a->rstd);
    q_aligned_free(a->xq);
}

static void den_alloc(den_t *e, int *ok, const diffusion_dims_t *d, size_t BT) {
    size_t NB = (size_t)d->NB;
    e->zin = xcalloc(ok, BT * d->Lb, sizeof(real));
    e->sinus = xcalloc(ok, BT * d->D, sizeof(real));
    blact_alloc(&e->bz, ok, BT, (size_t)d->Lb);
    blact_alloc(&e->bc, ok, BT, (size_t)d->C);
    blact_alloc(&e->bt, ok, BT, (size_t)d->D);
    e->h = xcalloc(ok, (NB + 1) * BT * d->W, sizeof(real));
    e->a = xcalloc(ok, NB * BT * d->W, sizeof(real));
    e->rstd_a = xcalloc(ok, NB * BT, sizeof(real));
    blact_alloc(&e->bup, ok, NB * BT, (size_t)d->W);
    e->up = xcalloc(ok, NB * BT * d->F, sizeof(real));
    e->r = xcalloc(ok, NB * BT * d->F, sizeof(real));
    blact_alloc(&e->bdown, ok, NB * BT, (size_t)d->F);
    blact_alloc(&e->bout, ok, BT, (size_t)d->W);
    e->logits = xcalloc(ok, BT * d->Lb, sizeof(real));
}

static void den_free(den_t *e) {
    q_aligned_free(e->zin);
    q_aligned_free(e->sinus);
    blact_free(&e->bz);
    blact_free(&e->bc);
    blact_free(&e->bt);
    q_aligned_free(e->h);
    q_aligned_free(e->a);
    q_aligned_free(e->rstd_a);
    blact_free(&e->bup);
    q_aligned_free(e->up);
    q_aligned_free(e->r);
    blact_free(&e->bdown);
    blact_free(&e->bout);
    q_aligned_free(e->logits);
}

static int imax(int a, int b) {
    return a > b ? a : b;
}

/* The widest row any buffer of the stage holds. */
static int max_width(const diffusion_dims_t *d) {
    return imax(imax(imax(d->C, d->Lb), imax(d->W, d->F)), d->D);
}

diffusion_acts_t *diffusion_acts_new(const diffusion_dims_t *d, int max_BT, qerr_t *err) {
    Q_ASSERT(d->Lb >= 1 && d->Lb <= DIFFUSION_MAX_BITS && d->D >= 2 && d->D % 2 == 0 && d->K >= 1 &&
             d->NB >= 1 && max_BT >= 1);
    diffusion_acts_t *a = q_aligned_calloc(1, sizeof *a);
    if (!a)
        return qerr_set(err, QERR_NOMEM, "diffusion: out of memory"), NULL;
    a->d = *d;
    a->max_BT = max_BT;
    int ok = 1;
    size_t BT = (size_t)max_BT, Lw = (size_t)diffusion_words(d->Lb), mw = (size_t)max_width(d);
    den_alloc(&a->den_plan, &ok, d, BT);
    den_alloc(&a->den_loss, &ok, d, BT);
    size_t s[DIFFUSION_NUM_TENSORS];
    const size_t np = diffusion_params_sizes(d, s);
    a->wq_buf = xcalloc(&ok, np, sizeof(real));
    a->wc_buf = xcalloc(&ok, np, sizeof(real));
    const size_t W = (size_t)d->W, NB = (size_t)d->NB;
    a->ws_buf = xcalloc(&ok, 3 * W + NB * (size_t)d->F + NB * W + (size_t)d->Lb + (size_t)d->C,
                        sizeof(real));
    a->hc = xcalloc(&ok, BT * W, sizeof(real));
    blact_alloc(&a->bdec, &ok, BT, (size_t)d->Lb);
    a->cin = xcalloc(&ok, BT * d->Lb, sizeof(real));
    a->zk = xcalloc(&ok, BT * Lw, sizeof(uint64_t));
    a->zn = xcalloc(&ok, BT * Lw, sizeof(uint64_t));
    a->m = xcalloc(&ok, BT * Lw, sizeof(uint64_t));
    a->mask = xcalloc(&ok, BT, sizeof(real));
    a->tau = xcalloc(&ok, BT, sizeof(real));
    a->dl = xcalloc(&ok, BT * d->Lb, sizeof(real));
    a->sx = xcalloc(&ok, BT, sizeof(real));
    a->dh = xcalloc(&ok, BT * mw, sizeof(real));
    a->dt = xcalloc(&ok, BT * mw, sizeof(real));
    a->dt2 = xcalloc(&ok, BT * mw, sizeof(real));
    a->dt3 = xcalloc(&ok, BT * mw, sizeof(real));
    if (ok && diffusion_plan_init(&a->plan, d->Lb, max_BT, err) != 0)
        ok = 0;
    if (!ok) {
        diffusion_acts_destroy(&a);
        qerr_set(err, QERR_NOMEM, "diffusion: out of memory for the activations of %d positions",
                 max_BT);
        return NULL;
    }
    diffusion_params_map(&a->wq, a->wq_buf, d);
    diffusion_params_map(&a->wc, a->wc_buf, d);
    wscale_t *w = &a->ws;
    w->in_z = a->ws_buf;
    w->in_c = w->in_z + d->W;
    w->time = w->in_c + d->W;
    w->up = w->time + d->W;
    w->down = w->up + NB * (size_t)d->F;
    w->out = w->down + NB * W;
    w->dec = w->out + d->Lb;
    return a;
}

void diffusion_acts_destroy(diffusion_acts_t **pa) {
    diffusion_acts_t *a = *pa;
    if (!a)
        return;
    den_free(&a->den_plan);
    den_free(&a->den_loss);
    blact_free(&a->bdec);
    diffusion_plan_free(&a->plan);
    void *bufs[] = {a->wq_buf, a->wc_buf, a->ws_buf, a->hc, a->cin, a->zk, a->zn,  a->m,
                    a->mask,   a->tau,    a->dl,     a->sx, a->dh,  a->dt, a->dt2, a->dt3};
    for (size_t i = 0; i < Q_ARRAY_LEN(bufs); i++)
        q_aligned_free(bufs[i]);
    q_aligned_free(a);
    *pa = NULL;
}

const diffusion_plan_t *diffusion_acts_plan(const diffusion_acts_t *acts) {
    return &acts->plan;
}

void diffusion_acts_weights_version(diffusion_acts_t *acts, uint64_t version) {
    acts->wver = version;
}

/* Ternary codes, scales and dequantised values of every BitLinear weight of p, unless the codes
 * already belong to the caller's current weight version. Surrogate mode always recomputes (the
 * gradient checks move weights between calls). */
static void weights_prepare(diffusion_acts_t *A, const diffusion_params_t *p) {
    if (A->wver != 0 && A->wver == A->qver && !quant_surrogate_get())
        return;
    const diffusion_dims_t *d = &A->d;
    const int C = d->C, Lb = d->Lb, W = d->W, F = d->F, D = d->D;
    diffusion_params_t *c = &A->wc, *q = &A->wq;
    wscale_t *s = &A->ws;
    bitlinear_weight_codes(c->in_z_w, q->in_z_w, s->in_z, p->in_z_w, Lb, W);
    bitlinear_weight_codes(c->in_c_w, q->in_c_w, s->in_c, p->in_c_w, C, W);
    bitlinear_weight_codes(c->time_w, q->time_w, s->time, p->time_w, D, W);
    for (int nb = 0; nb < d->NB; nb++) {
        const size_t o = (size_t)nb * F * W;
        bitlinear_weight_codes(c->up_w + o, q->up_w + o, s->up + (size_t)nb * F, p->up_w + o, W, F);
        bitlinear_weight_codes(c->down_w + o, q->down_w + o, s->down + (size_t)nb * W,
                               p->down_w + o, F, W);
    }
    bitlinear_weight_codes(c->out_w, q->out_w, s->out, p->out_w, W, Lb);
    bitlinear_weight_codes(c->dec_w, q->dec_w, s->dec, p->dec_w, Lb, C);
    A->qver = A->wver;
}

/* hc [BT, W] = BL_c(u), saving its input state into e->bc: the part of the denoiser that does
 * not depend on z or tau. */
static void den_context(diffusion_acts_t *A, den_t *e, real *hc, const real *u,
                        const diffusion_params_t *p, int BT) {
    const diffusion_dims_t *d = &A->d;
    bl_forward(hc, &e->bc, A->wc.in_c_w, A->ws.in_c, A->sx, u, p->in_c_norm, BT, d->C, d->W);
}

/* logits = f(z, tau, u) over BT rows, z packed [BT, Lw], saving into e; hc is den_context's
 * BL_c(u) for this e (weights prepared by weights_prepare). */
static void den_forward(diffusion_acts_t *A, den_t *e, const uint64_t *z, const real *tau,
                        const real *hc, const diffusion_params_t *p, int BT) {
    const diffusion_dims_t *d = &A->d;
    const int Lb = d->Lb, W = d->W, F = d->F, D = d->D, Lw = diffusion_words(Lb);
    const size_t BW = (size_t)BT * W, BF = (size_t)BT * F;
    const diffusion_params_t *c = &A->wc;
    const wscale_t *s = &A->ws;
    for (int t = 0; t < BT; t++) {
        for (int b = 0; b < Lb; b++)
            e->zin[(size_t)t * Lb + b] = diffusion_bit_get(z + (size_t)t * Lw, b) ? 1 : -1;
        real *row = e->sinus + (size_t)t * D;
        /* The sampler runs every position at the same tau: one evaluation, copied. */
        if (t > 0 && memcmp(&tau[t], &tau[t - 1], sizeof *tau) == 0)
            memcpy(row, row - D, (size_t)D * sizeof *row);
        else
            diffusion_sinusoid(row, tau[t], D);
    }
    real *h = e->h, *tmp = A->dt;
    bl_forward(h, &e->bz, c->in_z_w, s->in_z, A->sx, e->zin, p->in_z_norm, BT, Lb, W);
    residual_forward(h, h, hc, BW);
    bl_forward(tmp, &e->bt, c->time_w, s->time, A->sx, e->sinus, p->time_norm, BT, D, W);
    residual_forward(h, h, tmp, BW);
    for (int nb = 0; nb < d->NB; nb++) {
        const real *hb = e->h + nb * BW;
        real *hn = e->h + (nb + 1) * BW, *a = e->a + nb * BW, *up = e->up + nb * BF,
             *r = e->r + nb * BF;
        blact_t bu = blk(&e->bup, nb, BT, W), bd = blk(&e->bdown, nb, BT, F);
        rmsnorm_forward(a, e->rstd_a + (size_t)nb * BT, hb, p->blk_norm + (size_t)nb * W, BT, W);
        bl_forward(up, &bu, c->up_w + (size_t)nb * F * W, s->up + (size_t)nb * F, A->sx, a,
                   p->up_norm + (size_t)nb * W, BT, W, F);
        relu2_forward(r, up, BF);
        bl_forward(tmp, &bd, c->down_w + (size_t)nb * W * F, s->down + (size_t)nb * W, A->sx, r,
                   p->down_norm + (size_t)nb * F, BT, F, W);
        residual_forward(hn, hb, tmp, BW);
    }
    bl_forward(e->logits, &e->bout, c->out_w, s->out, A->sx, e->h + (size_t)d->NB * BW, p->out_norm,
               BT, W, Lb);
}

/* Backward of den_forward from dlogits [BT, Lb]; ACCUMULATES du (may be NULL) and *dp. */
static void den_backward(diffusion_acts_t *A, den_t *e, diffusion_params_t *dp, real *du,
                         const real *dlogits, const real *u, const diffusion_params_t *p, int BT) {
    const diffusion_dims_t *d = &A->d;
    const int C = d->C, Lb = d->Lb, W = d->W, F = d->F, D = d->D;
    const size_t BW = (size_t)BT * W, BF = (size_t)BT * F;
    const diffusion_params_t *q = &A->wq;
    real *dh = A->dh, *dt = A->dt, *dn = A->dt2;
    memset(dh, 0, BW * sizeof(real));
    bl_backward(dh, dp->out_w, dp->out_norm, dn, dlogits, &e->bout, q->out_w,
                e->h + (size_t)d->NB * BW, p->out_norm, BT, W, Lb);
    for (int nb = d->NB - 1; nb >= 0; nb--) {
        /* h_{nb+1} = h_nb + down(...): dh passes through, plus the branch. dt holds dr, then
         * da; dn is the down BitLinear's scratch, then dup; dt3 the up BitLinear's scratch. */
        const real *hb = e->h + nb * BW, *a = e->a + nb * BW, *up = e->up + nb * BF,
                   *r = e->r + nb * BF;
        blact_t bu = blk(&e->bup, nb, BT, W), bd = blk(&e->bdown, nb, BT, F);
        memset(dt, 0, BF * sizeof(real));
        bl_backward(dt, dp->down_w + (size_t)nb * W * F, dp->down_norm + (size_t)nb * F, dn, dh,
                    &bd, q->down_w + (size_t)nb * W * F, r, p->down_norm + (size_t)nb * F, BT, F,
                    W);
        memset(dn, 0, BF * sizeof(real));
        relu2_backward(dn, dt, up, BF);
        memset(dt, 0, BW * sizeof(real));
        bl_backward(dt, dp->up_w + (size_t)nb * F * W, dp->up_norm + (size_t)nb * W, A->dt3, dn,
                    &bu, q->up_w + (size_t)nb * F * W, a, p->up_norm + (size_t)nb * W, BT, W, F);
        rmsnorm_backward(dh, dp->blk_norm + (size_t)nb * W, dt, hb, p->blk_norm + (size_t)nb * W,
                         e->rstd_a + (size_t)nb * BT, BT, W);
    }
    bl_backward(NULL, dp->in_z_w, dp->in_z_norm, dn, dh, &e->bz, q->in_z_w, e->zin, p->in_z_norm,
                BT, Lb, W);
    bl_backward(du, dp->in_c_w, dp->in_c_norm, dn, dh, &e->bc, q->in_c_w, u, p->in_c_norm, BT, C,
                W);
    bl_backward(NULL, dp->time_w, dp->time_norm, dn, dh, &e->bt, q->time_w, e->sinus, p->time_norm,
                BT, D, W);
}

/* ---- the stage ---- */

int diffusion_forward(diffusion_acts_t *acts, real *out, diffusion_aux_t *aux, const real *u,
                      const int32_t *pos, const diffusion_params_t *p,
                      const diffusion_plan_t *replay, uint64_t diffusion_seed,
                      const diffusion_dims_t *d, int BT, qerr_t *err) {
    diffusion_acts_t *A = acts;
    Q_ASSERT(BT >= 0 && BT <= A->max_BT && memcmp(d, &A->d, sizeof *d) == 0);
    if (replay && diffusion_plan_validate(replay, d->Lb, BT, err))
        return -1;
    const int Lb = d->Lb, K = d->K, Lw = diffusion_words(Lb);
    const size_t nw = (size_t)BT * Lw;
    diffusion_plan_t *plan = &A->plan;
    den_t *e = &A->den_plan;
    A->BT = plan->BT = BT;
    aux->positions = BT;
    aux->mismatches = 0;
    /* The weights and u are the same for all K denoiser evaluations: quantize the weights once
     * and evaluate BL_c(u) once. */
    weights_prepare(A, p);
    den_context(A, e, A->hc, u, p, BT);
    if (!replay) {
        for (int t = 0; t < BT; t++)
            diffusion_plan_noise(A->zk + (size_t)t * Lw, diffusion_seed, (uint64_t)pos[t], Lb);
        /* Steps K..2 only move the state; their activations are overwritten (detached). */
        for (int k = K; k >= 2; k--) {
            for (int t = 0; t < BT; t++)
                A->tau[t] = (real)k / (real)K;
            den_forward(A, e, A->zk, A->tau, A->hc, p, BT);
            for (int t = 0; t < BT; t++)
                diffusion_plan_step(A->zn + (size_t)t * Lw, A->zk + (size_t)t * Lw,
                                    e->logits + (size_t)t * Lb, k, K, Lb);
            uint64_t *sw = A->zk;
            A->zk = A->zn;
            A->zn = sw;
        }
        memcpy(plan->z1, A->zk, nw * sizeof(uint64_t));
    } else {
        memcpy(plan->z1, replay->z1, nw * sizeof(uint64_t));
    }
    for (int t = 0; t < BT; t++)
        A->tau[t] = (real)1 / (real)K;
    den_forward(A, e, plan->z1, A->tau, A->hc, p, BT);
    for (int t = 0; t < BT; t++) {
        uint64_t *own = replay ? A->zn + (size_t)t * Lw : plan->z0 + (size_t)t * Lw;
        diffusion_plan_step(own, plan->z1 + (size_t)t * Lw, e->logits + (size_t)t * Lb, 1, K, Lb);
        if (replay) {
            const uint64_t *rec = replay->z0 + (size_t)t * Lw;
            aux->mismatches += memcmp(own, rec, (size_t)Lw * sizeof(uint64_t)) != 0;
            memcpy(plan->z0 + (size_t)t * Lw, rec, (size_t)Lw * sizeof(uint64_t));
        }
    }
    /* Write-back of the plan as 2 c_hat - 1. c_hat = z_0; in surrogate mode the threshold
     * [x~ > 1/2] is replaced by the identity its straight-through estimator uses, so
     * c_hat = x~ = z_1 + pi - 2 z_1 pi and finite differences see the STE's gradient. */
    const int soft = quant_surrogate_get();
    for (int t = 0; t < BT; t++)
        for (int b = 0; b < Lb; b++) {
            size_t i = (size_t)t * Lb + b;
            real c = (real)diffusion_bit_get(plan->z0 + (size_t)t * Lw, b);
            if (soft) {
                real z = (real)diffusion_bit_get(plan->z1 + (size_t)t * Lw, b);
                real pi = sigm(e->logits[i]);
                c = z + pi - 2 * z * pi;
            }
            A->cin[i] = 2 * c - 1;
        }
    bl_forward(out, &A->bdec, A->wc.dec_w, A->ws.dec, A->sx, A->cin, p->dec_norm, BT, Lb, d->C);
    return 0;
}

void diffusion_backward(diffusion_params_t *dp, real *du, const real *dout, diffusion_acts_t *acts,
                        const real *u, const diffusion_params_t *p, const diffusion_dims_t *d,
                        int BT) {
    diffusion_acts_t *A = acts;
    Q_ASSERT(BT == A->BT && memcmp(d, &A->d, sizeof *d) == 0);
    const int Lb = d->Lb, Lw = diffusion_words(Lb);
    real *dcin = A->dt;
    memset(dcin, 0, (size_t)BT * Lb * sizeof(real));
    bl_backward(dcin, dp->dec_w, dp->dec_norm, A->dt2, dout, &A->bdec, A->wq.dec_w, A->cin,
                p->dec_norm, BT, Lb, d->C);
    /* cin = 2 c_hat - 1; c_hat carries the gradient of x~ = z + pi - 2 z pi (z = z_1 held
     * constant), so dpi = 2 dcin (1 - 2z) and dl = dpi pi (1 - pi). */
    const den_t *e = &A->den_plan;
    for (int t = 0; t < BT; t++)
        for (int b = 0; b < Lb; b++) {
            size_t i = (size_t)t * Lb + b;
            real pi = sigm(e->logits[i]);
            real z = (real)diffusion_bit_get(A->plan.z1 + (size_t)t * Lw, b);
            A->dl[i] = 2 * dcin[i] * (1 - 2 * z) * pi * (1 - pi);
        }
    den_backward(A, &A->den_plan, dp, du, A->dl, u, p, BT);
}

real diffusion_loss_forward(diffusion_acts_t *acts, const uint64_t *code, const uint64_t *m,
                            const real *tau, const real *mask, const real *u,
                            const diffusion_params_t *p, const diffusion_dims_t *d, int BT) {
    diffusion_acts_t *A = acts;
    Q_ASSERT(BT >= 0 && BT <= A->max_BT && memcmp(d, &A->d, sizeof *d) == 0);
    const int Lb = d->Lb, Lw = diffusion_words(Lb);
    const size_t nw = (size_t)BT * Lw;
    A->loss_BT = BT;
    memcpy(A->m, m, nw * sizeof(uint64_t));
    memcpy(A->mask, mask, (size_t)BT * sizeof(real));
    diffusion_bits_xor(A->zn, code, m, (int)nw);
    den_t *e = &A->den_loss;
    weights_prepare(A, p);
    den_context(A, e, A->dt3, u, p, BT);
    den_forward(A, e, A->zn, tau, A->dt3, p, BT);
    real wsum = 0, acc = 0;
    for (int t = 0; t < BT; t++) {
        if (mask[t] == 0)
            continue;
        wsum += mask[t];
        real s = 0;
        for (int b = 0; b < Lb; b++) {
            real l = e->logits[(size_t)t * Lb + b],
                 y = (real)diffusion_bit_get(m + (size_t)t * Lw, b);
            /* BCE with logits, stable form: softplus(l) - y l. */
            s += (l > 0 ? l : 0) - y * l + R_LOG(1 + R_EXP(-R_FABS(l)));
        }
        acc += mask[t] * s / Lb;
    }
    return wsum > 0 ? acc / wsum : 0;
}

void diffusion_loss_backward(diffusion_params_t *dp, real *du, real dloss, diffusion_acts_t *acts,
                             const real *u, const diffusion_params_t *p, const diffusion_dims_t *d,
                             int BT) {
    diffusion_acts_t *A = acts;
    Q_ASSERT(BT == A->loss_BT && memcmp(d, &A->d, sizeof *d) == 0);
    const int Lb = d->Lb, Lw = diffusion_words(Lb);
    real wsum = 0;
    for (int t = 0; t < BT; t++)
        wsum += A->mask[t];
    if (wsum == 0 || dloss == 0)
        return;
    const den_t *e = &A->den_loss;
    for (int t = 0; t < BT; t++)
        for (int b = 0; b < Lb; b++) {
            size_t i = (size_t)t * Lb + b;
            real y = (real)diffusion_bit_get(A->m + (size_t)t * Lw, b);
            A->dl[i] = dloss * A->mask[t] / wsum / Lb * (sigm(e->logits[i]) - y);
        }
    den_backward(A, &A->den_loss, dp, du, A->dl, u, p, BT);
}
