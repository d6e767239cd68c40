/* The network over a set of token rows with a per-layer KV cache (MODEL.md §Forward pass):
 * what the engine runs for a prompt chunk (prefill) and for one step of a decoding batch.
 *
 * Shape letters: n rows (tokens), C = dim, V = vocab, OH overseer hidden, M minis (KM kept),
 * E experts per mini (KE kept), EH expert hidden, N micro agents (KN kept), Lb plan bits
 * (Lw words), W / F / D / K / NB the diffusion stage's width, hidden, time width, steps and
 * blocks. Every step mirrors the learner's code in common/ (see the file comments of engine.h
 * and docs/ENGINE.md); the comments here say where the order of operations matters. */
#include "engine.h"

#include "alloc.h"
#include "attention.h"
#include "layers.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

struct eng_fwd {
    int R; /* max rows */
    int C, V, L, NH;
    moe_dims_t md;
    diffusion_dims_t dd;
    int Lw;
    float *x, *xn, *q, *k, *v, *att, *br; /* [R, C] */
    float *rstd;                          /* [R] */
    float *rc, *rs; /* [R, HS/2] RoPE cosines and sines at each row's position (all layers) */
    /* MoE */
    float *ov_h;        /* [R, OH] */
    float *gl;          /* [R, M] gate logits */
    int32_t *mini;      /* [R * KM] */
    float *gate_w;      /* [R * KM] */
    int *key, *order;   /* [R * KM * KE] sort scratch */
    int *off;           /* [M * E + 1] */
    float *gx;          /* [R * KM * KE, C] gathered rows */
    float *rl, *ml;     /* [R * KM, E], [R * KM, N] router logits, by slot */
    float *rl_g, *ml_g; /* [R * KM, E], [R * KM, N] router logits of one mini's rows */
    int32_t *expert;    /* [R * KM * KE] */
    float *r_w;         /* [R * KM * KE] */
    int32_t *micro;     /* [R * KM * KN] */
    float *m_w;         /* [R * KM * KN] */
    float *eh;          /* [R * KM * KE, EH] */
    int *pos_of;        /* [R * KM * KE] row of (slot, i) in the expert-grouped order */
    int *groups;        /* [max(M, M * E)] non-empty groups of a region */
    float *ey;          /* [R * KM * KE, C] expert outputs in the expert-grouped order */
    float *mo;          /* [R * KM, C] each slot's mini output */
    float *vec;         /* [R * KM, C] a micro agent's dequantised up row, per slot */
    /* diffusion */
    float *u;                /* [R, C] */
    size_t dmax;             /* max(C, W, F, Lb) */
    float *dn;               /* [R, dmax] a BitLinear's normed input (rows of its width) */
    float *hc, *h, *tmp, *a; /* [R, W] */
    float *up;               /* [R, F] */
    float *zin;              /* [R, Lb] */
    float *dl;               /* [R, Lb] flip logits */
    uint64_t *z, *zn;        /* [R, Lw] */
    kern_act_t act_C, act_W, act_F, act_Lb;
    /* head */
    float *hx; /* [R, C] */
    float *hl; /* [R, V] */
};

static void *xalloc(int *ok, size_t n, size_t size) {
    void *p = q_aligned_calloc(n ? n : 1, size);
    *ok = *ok && p;
    return p;
}

void eng_fwd_destroy(eng_fwd_t **pf) {
    if (!pf || !*pf)
        return;
    eng_fwd_t *f = *pf;
    float **fl[] = {&f->x,    &f->xn,   &f->q,   &f->k,      &f->v,  &f->att, &f->br,
                    &f->rstd, &f->ov_h, &f->gl,  &f->gate_w, &f->gx, &f->rl,  &f->ml,
                    &f->rl_g, &f->ml_g, &f->r_w, &f->m_w,    &f->eh, &f->ey,  &f->mo,
                    &f->vec,  &f->u,    &f->dn,  &f->hc,     &f->h,  &f->tmp, &f->a,
                    &f->up,   &f->zin,  &f->dl,  &f->hx,     &f->hl, &f->rc,  &f->rs};
    for (size_t i = 0; i < Q_ARRAY_LEN(fl); i++)
        q_aligned_free(*fl[i]);
    q_aligned_free(f->mini);
    q_aligned_free(f->key);
    q_aligned_free(f->order);
    q_aligned_free(f->off);
    q_aligned_free(f->pos_of);
    q_aligned_free(f->groups);
    q_aligned_free(f->expert);
    q_aligned_free(f->micro);
    q_aligned_free(f->z);
    q_aligned_free(f->zn);
    kern_act_free(&f->act_C);
    kern_act_free(&f->act_W);
    kern_act_free(&f->act_F);
    kern_act_free(&f->act_Lb);
    free(f);
    *pf = NULL;
}

static size_t imax(size_t a, size_t b) {
    return a > b ? a : b;
}

eng_fwd_t *eng_fwd_new(const quillan_policy_t *p, int max_rows, qerr_t *err) {
    eng_fwd_t *f = calloc(1, sizeof *f);
    if (!f) {
        qerr_set(err, QERR_NOMEM, "engine: out of memory");
        return NULL;
    }
    const size_t R = (size_t)max_rows, C = (size_t)p->cfg.dim, V = (size_t)p->cfg.vocab_size;
    f->R = max_rows;
    f->C = p->cfg.dim;
    f->V = p->cfg.vocab_size;
    f->L = p->cfg.num_layers;
    f->NH = p->cfg.num_heads;
    f->md = p->md;
    f->dd = p->dd;
    f->Lw = p->Lw;
    const moe_dims_t *m = &p->md;
    const diffusion_dims_t *d = &p->dd;
    const size_t S = R * (size_t)m->KM, SE = S * (size_t)m->KE, SN = S * (size_t)m->KN;
    const size_t Wd = (size_t)d->W, F = (size_t)d->F, Lb = (size_t)d->Lb;
    int ok = 1;
    f->x = xalloc(&ok, R * C, sizeof(float));
    f->xn = xalloc(&ok, R * C, sizeof(float));
    f->q = xalloc(&ok, R * C, sizeof(float));
    f->k = xalloc(&ok, R * C, sizeof(float));
    f->v = xalloc(&ok, R * C, sizeof(float));
    f->att = xalloc(&ok, R * C, sizeof(float));
    f->br = xalloc(&ok, R * C, sizeof(float));
    f->rstd = xalloc(&ok, R, sizeof(float));
    f->rc = xalloc(&ok, R * C / (size_t)f->NH / 2, sizeof(float));
    f->rs = xalloc(&ok, R * C / (size_t)f->NH / 2, sizeof(float));
    f->ov_h = xalloc(&ok, R * (size_t)m->OH, sizeof(float));
    f->gl = xalloc(&ok, R * (size_t)m->M, sizeof(float));
    f->mini = xalloc(&ok, S, sizeof(int32_t));
    f->gate_w = xalloc(&ok, S, sizeof(float));
    f->key = xalloc(&ok, SE, sizeof(int));
    f->order = xalloc(&ok, SE, sizeof(int));
    f->off = xalloc(&ok, (size_t)m->M * m->E + 1, sizeof(int));
    f->gx = xalloc(&ok, SE * C, sizeof(float));
    f->rl = xalloc(&ok, S * (size_t)m->E, sizeof(float));
    f->ml = xalloc(&ok, S * (size_t)m->N, sizeof(float));
    f->rl_g = xalloc(&ok, S * (size_t)m->E, sizeof(float));
    f->ml_g = xalloc(&ok, S * (size_t)m->N, sizeof(float));
    f->expert = xalloc(&ok, SE, sizeof(int32_t));
    f->r_w = xalloc(&ok, SE, sizeof(float));
    f->micro = xalloc(&ok, SN, sizeof(int32_t));
    f->m_w = xalloc(&ok, SN, sizeof(float));
    f->eh = xalloc(&ok, SE * (size_t)m->EH, sizeof(float));
    f->pos_of = xalloc(&ok, SE, sizeof(int));
    f->groups = xalloc(&ok, (size_t)m->M * m->E, sizeof(int));
    f->ey = xalloc(&ok, SE * C, sizeof(float));
    f->mo = xalloc(&ok, S * C, sizeof(float));
    f->vec = xalloc(&ok, S * C, sizeof(float));
    f->u = xalloc(&ok, R * C, sizeof(float));
    f->dmax = imax(imax(C, Wd), imax(F, Lb));
    f->dn = xalloc(&ok, R * f->dmax, sizeof(float));
    f->hc = xalloc(&ok, R * Wd, sizeof(float));
    f->h = xalloc(&ok, R * Wd, sizeof(float));
    f->tmp = xalloc(&ok, R * Wd, sizeof(float));
    f->a = xalloc(&ok, R * Wd, sizeof(float));
    f->up = xalloc(&ok, R * F, sizeof(float));
    f->zin = xalloc(&ok, R * Lb, sizeof(float));
    f->dl = xalloc(&ok, R * Lb, sizeof(float));
    f->z = xalloc(&ok, R * (size_t)f->Lw, sizeof(uint64_t));
    f->zn = xalloc(&ok, R * (size_t)f->Lw, sizeof(uint64_t));
    f->hx = xalloc(&ok, R * C, sizeof(float));
    f->hl = xalloc(&ok, R * V, sizeof(float));
    if (!ok || kern_act_init(&f->act_C, R, C, err) < 0 ||
        kern_act_init(&f->act_W, R, Wd, err) < 0 || kern_act_init(&f->act_F, R, F, err) < 0 ||
        kern_act_init(&f->act_Lb, R, Lb, err) < 0) {
        eng_fwd_destroy(&f);
        if (!ok)
            qerr_set(err, QERR_NOMEM, "engine: out of memory for %d rows of scratch", max_rows);
        return NULL;
    }
    return f;
}

int eng_fwd_max_rows(const eng_fwd_t *f) {
    return f->R;
}

int eng_fwd_fits(const eng_fwd_t *f, const quillan_policy_t *p) {
    return f->C == p->cfg.dim && f->V == p->cfg.vocab_size && f->L == p->cfg.num_layers &&
           f->NH == p->cfg.num_heads && memcmp(&f->md, &p->md, sizeof f->md) == 0 &&
           memcmp(&f->dd, &p->dd, sizeof f->dd) == 0;
}

/* ---- row-wise wrappers ----
 * layers.h's functions fork OpenMP threads above a size threshold; inside the engine, whose own
 * pool already splits the products, that oversubscribes the cores. Calling them one row at a
 * time keeps their exact per-row arithmetic on the calling thread. */

static void rms_rows(float *out, float *rstd, const float *x, const float *g, int n, int C) {
    for (int r = 0; r < n; r++)
        rmsnorm_forward(out + (size_t)r * C, rstd + r, x + (size_t)r * C, g, 1, C);
}

static void add_rows(float *out, const float *a, const float *b, int n, int C) {
    for (int r = 0; r < n; r++)
        residual_forward(out + (size_t)r * C, a + (size_t)r * C, b + (size_t)r * C, (size_t)C);
}

static void relu2_rows(float *x, int n, int C) {
    for (int r = 0; r < n; r++)
        relu2_forward(x + (size_t)r * C, x + (size_t)r * C, (size_t)C);
}

/* ---- attention ---- */

typedef struct {
    eng_fwd_t *f;
    eng_row_t *rows;
    int l;
} attn_ctx_t;

/* Chunk = (row, head): one head of one row over its cache (the learner's tiles per head). */
static void attn_chunk(void *vctx, size_t c, int tid) {
    const attn_ctx_t *a = vctx;
    const eng_fwd_t *f = a->f;
    const size_t C = (size_t)f->C, NH = (size_t)f->NH, HS = C / NH, r = c / NH, h = c % NH;
    const eng_row_t *row = &a->rows[r];
    const size_t base = (size_t)a->l * (size_t)row->cap * C + h * HS;
    (void)tid;
    attention_decode(f->att + r * C + h * HS, f->q + r * C + h * HS, row->kc + base, row->vc + base,
                     row->pos + 1, (int)C, (int)HS, 1);
}

static void attention_block(eng_fwd_t *f, kern_pool_t *pool, const eng_layer_t *L, eng_row_t *rows,
                            int n, int l) {
    const kern_ops_t *ops = kern_ops();
    const size_t C = (size_t)f->C, nz = (size_t)n;
    rms_rows(f->xn, f->rstd, f->x, L->attn_norm, n, f->C);
    const eng_prod_t qkv[3] = {{&L->wq, f->xn, C, NULL, nz, f->q, C},
                               {&L->wk, f->xn, C, NULL, nz, f->k, C},
                               {&L->wv, f->xn, C, NULL, nz, f->v, C}};
    eng_matmul_many(pool, ops, qkv, 3);
    const size_t H2 = C / (size_t)f->NH / 2;
    for (int r = 0; r < n; r++) {
        eng_row_t *row = &rows[r];
        const float *rc = f->rc + (size_t)r * H2, *rs = f->rs + (size_t)r * H2;
        rope_rotate(f->q + (size_t)r * C, f->q + (size_t)r * C, rc, rs, f->C, f->NH);
        rope_rotate(f->k + (size_t)r * C, f->k + (size_t)r * C, rc, rs, f->C, f->NH);
        const size_t at = ((size_t)l * (size_t)row->cap + (size_t)row->pos) * C;
        memcpy(row->kc + at, f->k + (size_t)r * C, C * sizeof(float));
        memcpy(row->vc + at, f->v + (size_t)r * C, C * sizeof(float));
    }
    attn_ctx_t ac = {f, rows, l};
    kern_pool_for(pool, nz * (size_t)f->NH, attn_chunk, &ac);
    eng_matmul(pool, ops, &L->wo, f->att, C, NULL, nz, f->br, C);
    add_rows(f->x, f->x, f->br, n, f->C);
}

/* ---- hierarchical MoE ---- */

static float sigm(float x) {
    return 1 / (1 + expf(-x));
}

static float silu(float x) {
    return x * sigm(x);
}

/* Counting sort of n items by key in [0, nk): off[nk + 1], order[n] (ascending item id within a
 * key), as moe.c groups them. */
static void group_by(int *off, int *order, const int *key, int n, int nk) {
    memset(off, 0, (size_t)(nk + 1) * sizeof *off);
    for (int i = 0; i < n; i++)
        off[key[i] + 1]++;
    for (int k = 0; k < nk; k++)
        off[k + 1] += off[k];
    for (int i = 0; i < n; i++)
        order[off[key[i]]++] = i;
    for (int k = nk; k > 0; k--)
        off[k] = off[k - 1];
    off[0] = 0;
}

/* The keys in [0, nk) with items, in order; returns their count. */
static int nonempty(int *groups, const int *off, int nk) {
    int ng = 0;
    for (int k = 0; k < nk; k++)
        if (off[k + 1] > off[k])
            groups[ng++] = k;
    return ng;
}

typedef struct {
    eng_fwd_t *f;
    const eng_layer_t *L;
    const float *u;
    int ngroups;
    eng_prod_t extra; /* a product whose chunks follow the groups' (or n == 0) */
} moe_ctx_t;

/* Both routers of one kept mini on its gathered rows, then each row's top-k and gates. */
static void router_chunk(void *vctx, size_t c, int tid) {
    const moe_ctx_t *m = vctx;
    eng_fwd_t *f = m->f;
    const kern_ops_t *ops = kern_ops();
    (void)tid;
    if (c >= (size_t)m->ngroups) {
        eng_prod_chunk(ops, &m->extra, c - (size_t)m->ngroups);
        return;
    }
    const moe_dims_t *d = &f->md;
    const int E = d->E, N = d->N, KE = d->KE, KN = d->KN, j = f->groups[c];
    const int o = f->off[j], nj = f->off[j + 1] - o;
    const size_t Cz = (size_t)d->C;
    const eng_prod_t rp = {&m->L->router[j], f->gx + (size_t)o * Cz,  Cz,       NULL,
                           (size_t)nj,       f->rl_g + (size_t)o * E, (size_t)E};
    const eng_prod_t mp = {&m->L->mic_router[j], f->gx + (size_t)o * Cz,  Cz,       NULL,
                           (size_t)nj,           f->ml_g + (size_t)o * N, (size_t)N};
    eng_matmul_rows(ops, &rp, 0, rp.W->rows);
    eng_matmul_rows(ops, &mp, 0, mp.W->rows);
    for (int r = o; r < o + nj; r++) {
        const size_t s = (size_t)f->order[r];
        const float *rl = f->rl_g + (size_t)r * E, *ml = f->ml_g + (size_t)r * N;
        moe_topk(f->expert + s * KE, rl, m->L->bias_router[j], E, KE);
        moe_gate_forward(f->r_w + s * KE, rl, f->expert + s * KE, KE);
        moe_topk(f->micro + s * KN, ml, m->L->bias_micro[j], N, KN);
        moe_gate_forward(f->m_w + s * KN, ml, f->micro + s * KN, KN);
    }
}

/* One (mini, expert) group: w1, ReLU², w2 over its gathered rows; each expert's weights are
 * read once for all of them. */
static void expert_chunk(void *vctx, size_t c, int tid) {
    const moe_ctx_t *m = vctx;
    eng_fwd_t *f = m->f;
    const moe_dims_t *d = &f->md;
    const int E = d->E, EH = d->EH, g = f->groups[c], j = g / E, e = g % E;
    const int o = f->off[g], ng = f->off[g + 1] - o;
    const size_t Cz = (size_t)d->C;
    const eng_mat_t *w1 = &m->L->exp_w1[j], *w2 = &m->L->exp_w2[j];
    const eng_mat_t v1 = {
        w1->w + (size_t)e * EH * w1->row_bytes, w1->qt, (size_t)EH, w1->cols, w1->row_bytes, NULL};
    const eng_mat_t v2 = {
        w2->w + (size_t)e * Cz * w2->row_bytes, w2->qt, Cz, w2->cols, w2->row_bytes, NULL};
    float *eh = f->eh + (size_t)o * EH;
    const eng_prod_t p1 = {&v1, f->gx + (size_t)o * Cz, Cz, NULL, (size_t)ng, eh, (size_t)EH};
    const eng_prod_t p2 = {&v2, eh, (size_t)EH, NULL, (size_t)ng, f->ey + (size_t)o * Cz, Cz};
    (void)tid;
    eng_matmul_rows(kern_ops(), &p1, 0, v1.rows);
    relu2_rows(eh, ng, EH);
    eng_matmul_rows(kern_ops(), &p2, 0, v2.rows);
}

/* Slot s's mini output in moe_forward's order: its experts, then its micro agents. */
static void slot_chunk(void *vctx, size_t c, int tid) {
    const moe_ctx_t *m = vctx;
    eng_fwd_t *f = m->f;
    const moe_dims_t *d = &f->md;
    const int C = d->C, KM = d->KM, KE = d->KE, KN = d->KN, s = (int)c, j = f->mini[s];
    const size_t Cz = (size_t)C;
    const float *ut = m->u + (size_t)(s / KM) * Cz;
    float *mo = f->mo + (size_t)s * Cz, *vec = f->vec + (size_t)s * Cz;
    (void)tid;
    memset(mo, 0, Cz * sizeof(float));
    for (int i = 0; i < KE; i++) {
        const size_t es = (size_t)s * KE + (size_t)i;
        const float w = f->r_w[es], *ey = f->ey + (size_t)f->pos_of[es] * Cz;
        for (int k = 0; k < C; k++)
            mo[k] += w * ey[k];
    }
    for (int i = 0; i < KN; i++) {
        const size_t ms = (size_t)s * KN + (size_t)i, agent = (size_t)f->micro[ms];
        const float sv = eng_row_dot(kern_ops(), &m->L->mic_down[j], agent, ut);
        const float a = f->m_w[ms] * silu(sv);
        eng_row_dequant(&m->L->mic_up[j], agent, vec);
        for (int k = 0; k < C; k++)
            mo[k] += a * vec[k];
    }
}

/* y [n, C] = HierMoE(u [n, C]) as moe_forward computes it (ASSIGNED), own routing, recorded.
 * Four parallel regions: overseer w1 and gate; overseer w2 and each kept mini's routers (with
 * their top-k); the experts, one (mini, expert) group per chunk; each slot's experts and micro
 * agents. */
static void moe_block(eng_fwd_t *f, kern_pool_t *pool, const eng_layer_t *L, eng_row_t *rows, int n,
                      int l, const float *u, float *y, int route_ints) {
    const kern_ops_t *ops = kern_ops();
    const moe_dims_t *d = &f->md;
    const int C = d->C, OH = d->OH, M = d->M, KM = d->KM, E = d->E, KE = d->KE, KN = d->KN,
              S = n * KM, SE = S * KE;
    const size_t Cz = (size_t)C, nz = (size_t)n;

    /* Overseer w1 and the primary gate (router logits in FP32 from FP16 weights). */
    const eng_prod_t r1[2] = {{&L->ov_w1, u, Cz, NULL, nz, f->ov_h, (size_t)OH},
                              {&L->gate, u, Cz, NULL, nz, f->gl, (size_t)M}};
    eng_matmul_many(pool, ops, r1, 2);
    for (size_t i = 0; i < nz * (size_t)OH; i++)
        f->ov_h[i] = silu(f->ov_h[i]);
    for (int t = 0; t < n; t++) {
        const float *lg = f->gl + (size_t)t * M;
        moe_topk(f->mini + (size_t)t * KM, lg, L->bias_gate, M, KM);
        moe_gate_forward(f->gate_w + (size_t)t * KM, lg, f->mini + (size_t)t * KM, KM);
    }

    /* Overseer w2 and each kept mini's two routers on its block of gathered rows. */
    for (int s = 0; s < S; s++)
        f->key[s] = f->mini[s];
    group_by(f->off, f->order, f->key, S, M);
    for (int r = 0; r < S; r++)
        memcpy(f->gx + (size_t)r * Cz, u + (size_t)(f->order[r] / KM) * Cz, Cz * sizeof(float));
    moe_ctx_t mc = {
        f, L, u, nonempty(f->groups, f->off, M), {&L->ov_w2, f->ov_h, (size_t)OH, NULL, nz, y, Cz}};
    kern_pool_for(pool, (size_t)mc.ngroups + eng_prod_nchunks(&mc.extra), router_chunk, &mc);

    /* Experts grouped by (mini, expert). */
    for (int es = 0; es < SE; es++)
        f->key[es] = f->mini[es / KE] * E + f->expert[es];
    group_by(f->off, f->order, f->key, SE, M * E);
    for (int r = 0; r < SE; r++) {
        f->pos_of[f->order[r]] = r;
        memcpy(f->gx + (size_t)r * Cz, u + (size_t)(f->order[r] / (KE * KM)) * Cz,
               Cz * sizeof(float));
    }
    mc.ngroups = nonempty(f->groups, f->off, M * E);
    kern_pool_for(pool, (size_t)mc.ngroups, expert_chunk, &mc);

    /* Each slot's mini output, then the gates in moe_forward's order. */
    kern_pool_for(pool, (size_t)S, slot_chunk, &mc);
    for (int s = 0; s < S; s++) {
        const float *mo = f->mo + (size_t)s * Cz;
        float *yt = y + (size_t)(s / KM) * Cz;
        for (int c = 0; c < C; c++)
            yt[c] += f->gate_w[s] * mo[c];
    }

    /* Routing records: per layer mini[KM], expert[KM * KE], micro[KM * KN]. */
    for (int t = 0; t < n; t++) {
        int32_t *rec = rows[t].route;
        if (!rec)
            continue;
        rec += (size_t)l * route_ints;
        memcpy(rec, f->mini + (size_t)t * KM, (size_t)KM * sizeof(int32_t));
        memcpy(rec + KM, f->expert + (size_t)t * KM * KE, (size_t)KM * KE * sizeof(int32_t));
        memcpy(rec + KM + KM * KE, f->micro + (size_t)t * KM * KN,
               (size_t)KM * KN * sizeof(int32_t));
    }
}

/* ---- diffusion ---- */

/* Rows [r0, r0 + n) of act as an act of its own (its buffers are per row). */
static kern_act_t act_rows(const kern_act_t *act, int r0, int n) {
    kern_act_t v = *act;
    const size_t r = (size_t)r0;
    v.q += r * act->stride;
    v.scale += r;
    v.sum += r;
    v.gsum += r * (act->stride / QTYPE_INT4_GROUP);
    v.cap = (size_t)n;
    v.n = 0;
    return v;
}

/* out[Lb] = +1 at the set bits of z [Lw], -1 elsewhere: the stage's 2 z - 1 (diffusion_bit_get's
 * bits, read inline). */
static void bit_signs(float *out, const uint64_t *z, int Lb) {
    for (int b = 0; b < Lb; b++)
        out[b] = (z[b / 64] >> (b % 64)) & 1 ? 1.0f : -1.0f;
}

/* out [n, OC] = BL(RMSNorm_g(x)) for rows r0.. with the learner's arithmetic: RMSNorm, int8
 * codes of each row, exact integer product with the ternary codes, times s_w then s_x. With a
 * pool the product is a parallel region; without, it runs on the calling thread. */
static void bitlinear(eng_fwd_t *f, kern_pool_t *pool, const kern_act_t *act, const eng_mat_t *W,
                      const float *g, const float *x, int r0, int n, float *out) {
    const int in = (int)W->cols;
    float *dn = f->dn + (size_t)r0 * f->dmax;
    rms_rows(dn, f->rstd + r0, x, g, n, in);
    kern_act_t a = act_rows(act, r0, n);
    kern_ops()->quantize_act(&a, dn, (size_t)in, (size_t)n);
    const eng_prod_t pr = {W, NULL, 0, &a, (size_t)n, out, W->rows};
    if (pool)
        eng_matmul_many(pool, kern_ops(), &pr, 1);
    else
        eng_matmul_rows(kern_ops(), &pr, 0, W->rows);
}

/* x [r0 .. r0 + n, C] += BitDiffusion(RMSNorm(x)) as diffusion_forward computes it without
 * replay. Every buffer is used at rows r0..r0 + n only, so disjoint row ranges may run at once
 * on different threads (pool NULL); with a pool, each product is a parallel region instead. */
static void diffusion_rows(eng_fwd_t *f, const quillan_policy_t *p, kern_pool_t *pool,
                           eng_row_t *rows, int r0, int n) {
    const eng_diff_t *D = &p->diff;
    const diffusion_dims_t *d = &f->dd;
    const int C = f->C, Lb = d->Lb, W = d->W, F = d->F, K = d->K, Lw = f->Lw;
    const size_t R = (size_t)r0;
    float *x = f->x + R * C, *u = f->u + R * C, *hc = f->hc + R * W, *h = f->h + R * W,
          *a = f->a + R * W, *tmp = f->tmp + R * W, *up = f->up + R * F, *zin = f->zin + R * Lb,
          *dl = f->dl + R * Lb, *br = f->br + R * C;
    uint64_t *z = f->z + R * Lw, *zn = f->zn + R * Lw;
    rms_rows(u, f->rstd + r0, x, D->norm, n, C);
    /* BL_c(u) is the same at every step of the sampler: computed once (the learner recomputes
     * it per step and gets the same bits). */
    bitlinear(f, pool, &f->act_C, &D->in_c, D->in_c_norm, u, r0, n, hc);
    for (int r = 0; r < n; r++)
        diffusion_plan_noise(z + (size_t)r * Lw, p->cfg.diffusion_seed, (uint64_t)rows[r0 + r].pos,
                             Lb);
    for (int k = K; k >= 1; k--) {
        for (int r = 0; r < n; r++)
            bit_signs(zin + (size_t)r * Lb, z + (size_t)r * Lw, Lb);
        bitlinear(f, pool, &f->act_Lb, &D->in_z, D->in_z_norm, zin, r0, n, h);
        /* h = (BL_z + BL_c) + BL_time, in the learner's order, in one pass. */
        const float *te = D->time_emb + (size_t)(k - 1) * W;
        for (int r = 0; r < n; r++) {
            float *hr = h + (size_t)r * W;
            const float *hcr = hc + (size_t)r * W;
            for (int i = 0; i < W; i++)
                hr[i] = (hr[i] + hcr[i]) + te[i];
        }
        for (int nb = 0; nb < d->NB; nb++) {
            rms_rows(a, f->rstd + r0, h, D->blk_norm[nb], n, W);
            bitlinear(f, pool, &f->act_W, &D->up[nb], D->up_norm[nb], a, r0, n, up);
            relu2_rows(up, n, F);
            bitlinear(f, pool, &f->act_F, &D->down[nb], D->down_norm[nb], up, r0, n, tmp);
            add_rows(h, h, tmp, n, W);
        }
        bitlinear(f, pool, &f->act_W, &D->out, D->out_norm, h, r0, n, dl);
        for (int r = 0; r < n; r++) {
            uint64_t *zr = z + (size_t)r * Lw, *znr = zn + (size_t)r * Lw;
            const eng_row_t *row = &rows[r0 + r];
            diffusion_plan_step(znr, zr, dl + (size_t)r * Lb, k, K, Lb);
            if (k == 1 && row->plan) {
                memcpy(row->plan, zr, (size_t)Lw * sizeof(uint64_t));
                memcpy(row->plan + Lw, znr, (size_t)Lw * sizeof(uint64_t));
            }
        }
        uint64_t *sw = z;
        z = zn;
        zn = sw;
    }
    /* Write-back BL_dec(2 c_hat - 1), c_hat = z_0. */
    for (int r = 0; r < n; r++)
        bit_signs(zin + (size_t)r * Lb, z + (size_t)r * Lw, Lb);
    bitlinear(f, pool, &f->act_Lb, &D->dec, D->dec_norm, zin, r0, n, br);
    add_rows(x, x, br, n, C);
}

/* Most sequences per chunk when the diffusion stage splits the batch instead of each product.
 * The ternary kernel blocks a chunk's sequences itself (6 per register tile), so each tile's
 * weights come from L3 once per chunk and from L1 for its other token blocks; chunks of 6
 * sequences re-read the stage's 12.5 MB (quillan-512m) from L3 per 6 and ran 15-20% slower at
 * batch 8-32. */
#define DIFF_TILE 32

typedef struct {
    eng_fwd_t *f;
    const quillan_policy_t *p;
    eng_row_t *rows;
    int n, nchunks;
} diff_ctx_t;

static void diff_chunk(void *vctx, size_t c, int tid) {
    const diff_ctx_t *dc = vctx;
    const int r0 = (int)((size_t)dc->n * c / (size_t)dc->nchunks),
              r1 = (int)((size_t)dc->n * (c + 1) / (size_t)dc->nchunks);
    (void)tid;
    diffusion_rows(dc->f, dc->p, NULL, dc->rows, r0, r1 - r0);
}

/* The diffusion stage over n rows. Its K steps run some 14 dependent products each; with as
 * many rows as two per thread, each thread runs the whole stage on its own sequences (no
 * synchronisation at all), otherwise every product is split over the pool. Every row's result
 * is the same either way (each row's arithmetic is independent of the others'). */
static void diffusion_block(eng_fwd_t *f, const quillan_policy_t *p, kern_pool_t *pool,
                            eng_row_t *rows, int n) {
    const int nt = kern_pool_size(pool);
    if (n < 2 * nt) {
        diffusion_rows(f, p, pool, rows, 0, n);
        return;
    }
    const int tiles = (n + DIFF_TILE - 1) / DIFF_TILE;
    diff_ctx_t dc = {f, p, rows, n, (tiles + nt - 1) / nt * nt};
    kern_pool_for(pool, (size_t)dc.nchunks, diff_chunk, &dc);
}

/* ---- the whole network ---- */

void eng_forward(eng_fwd_t *f, const quillan_policy_t *p, kern_pool_t *pool, eng_row_t *rows, int n,
                 quillan_stats_t *st, eng_time_stats_t *ts) {
    Q_ASSERT(n >= 1 && n <= f->R && eng_fwd_fits(f, p));
    const size_t C = (size_t)f->C;
    eng_clock_t clk;
    eng_clock_start(&clk, pool);
    const size_t H2 = C / (size_t)f->NH / 2;
    for (int r = 0; r < n; r++) {
        Q_ASSERT(rows[r].token >= 0 && rows[r].token < f->V);
        Q_ASSERT(rows[r].pos >= 0 && rows[r].pos < rows[r].cap);
        memcpy(f->x + (size_t)r * C, p->embed + (size_t)rows[r].token * C, C * sizeof(float));
        /* rope_forward's angles, computed once per row for the q and k of every layer. */
        rope_angles(f->rc + (size_t)r * H2, f->rs + (size_t)r * H2, rows[r].pos, f->C / f->NH);
    }
    for (int l = 0; l < f->L; l++) {
        const eng_layer_t *L = &p->layers[l];
        attention_block(f, pool, L, rows, n, l);
        eng_clock_lap(&clk, &st->attention_s, ts, ENG_STAGE_ATTENTION);
        rms_rows(f->xn, f->rstd, f->x, L->moe_norm, n, f->C);
        moe_block(f, pool, L, rows, n, l, f->xn, f->br, p->route_ints);
        add_rows(f->x, f->x, f->br, n, f->C);
        eng_clock_lap(&clk, &st->moe_s, ts, ENG_STAGE_MOE);
        if (l == p->cfg.diffusion_layer) {
            diffusion_block(f, p, pool, rows, n);
            eng_clock_lap(&clk, &st->diffusion_s, ts, ENG_STAGE_DIFFUSION);
        }
    }
    int nh = 0;
    for (int r = 0; r < n; r++)
        if (rows[r].logits) {
            rms_rows(f->hx + (size_t)nh * C, f->rstd, f->x + (size_t)r * C, p->final_norm, 1, f->C);
            nh++;
        }
    eng_matmul(pool, kern_ops(), &p->head, f->hx, C, NULL, (size_t)nh, f->hl, (size_t)f->V);
    nh = 0;
    for (int r = 0; r < n; r++)
        if (rows[r].logits)
            memcpy(rows[r].logits, f->hl + (size_t)(nh++) * f->V, (size_t)f->V * sizeof(float));
    eng_clock_lap(&clk, &st->head_s, ts, ENG_STAGE_HEAD);
}
