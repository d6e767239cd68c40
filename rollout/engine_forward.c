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
    float *ey_g;        /* [R * KM * KE, C] one expert's outputs */
    float *ey;          /* [R * KM * KE, C] expert outputs by (slot, i) */
    float *mo;          /* [C] */
    float *vec;         /* [C] */
    /* diffusion */
    float *u;                /* [R, C] */
    float *dn;               /* [R, max(C, W, F, Lb)] a BitLinear's normed input */
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
    float **fl[] = {&f->x,    &f->xn,   &f->q,   &f->k,      &f->v,  &f->att,  &f->br,
                    &f->rstd, &f->ov_h, &f->gl,  &f->gate_w, &f->gx, &f->rl,   &f->ml,
                    &f->rl_g, &f->ml_g, &f->r_w, &f->m_w,    &f->eh, &f->ey_g, &f->ey,
                    &f->mo,   &f->vec,  &f->u,   &f->dn,     &f->hc, &f->h,    &f->tmp,
                    &f->a,    &f->up,   &f->zin, &f->dl,     &f->hx, &f->hl};
    for (size_t i = 0; i < Q_ARRAY_LEN(fl); i++)
        q_aligned_free(*fl[i]);
    q_aligned_free(f->mini);
    q_aligned_free(f->key);
    q_aligned_free(f->order);
    q_aligned_free(f->off);
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
    f->ey_g = xalloc(&ok, SE * C, sizeof(float));
    f->ey = xalloc(&ok, SE * C, sizeof(float));
    f->mo = xalloc(&ok, C, sizeof(float));
    f->vec = xalloc(&ok, C, sizeof(float));
    f->u = xalloc(&ok, R * C, sizeof(float));
    f->dn = xalloc(&ok, R * imax(imax(C, Wd), imax(F, Lb)), sizeof(float));
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
    int n, l;
} attn_ctx_t;

static void attn_run(void *vctx, int tid, int nthreads) {
    const attn_ctx_t *c = vctx;
    const eng_fwd_t *f = c->f;
    const size_t C = (size_t)f->C;
    size_t r0, r1;
    kern_split_rows((size_t)c->n, tid, nthreads, 1, &r0, &r1);
    for (size_t r = r0; r < r1; r++) {
        const eng_row_t *row = &c->rows[r];
        const size_t base = (size_t)c->l * (size_t)row->cap * C;
        attention_decode(f->att + r * C, f->q + r * C, row->kc + base, row->vc + base, row->pos + 1,
                         (int)C, (int)C, f->NH);
    }
}

static void attention_block(eng_fwd_t *f, const quillan_policy_t *p, kern_pool_t *pool,
                            const eng_layer_t *L, eng_row_t *rows, int n, int l) {
    const kern_ops_t *ops = kern_ops();
    const size_t C = (size_t)f->C;
    rms_rows(f->xn, f->rstd, f->x, L->attn_norm, n, f->C);
    eng_matmul(pool, ops, &L->wq, f->xn, C, NULL, (size_t)n, f->q, C);
    eng_matmul(pool, ops, &L->wk, f->xn, C, NULL, (size_t)n, f->k, C);
    eng_matmul(pool, ops, &L->wv, f->xn, C, NULL, (size_t)n, f->v, C);
    for (int r = 0; r < n; r++) {
        eng_row_t *row = &rows[r];
        Q_ASSERT(row->pos >= 0 && row->pos < row->cap);
        rope_forward(f->q + (size_t)r * C, f->q + (size_t)r * C, 1, 1, f->C, f->NH, row->pos);
        rope_forward(f->k + (size_t)r * C, f->k + (size_t)r * C, 1, 1, f->C, f->NH, row->pos);
        const size_t at = ((size_t)l * (size_t)row->cap + (size_t)row->pos) * C;
        memcpy(row->kc + at, f->k + (size_t)r * C, C * sizeof(float));
        memcpy(row->vc + at, f->v + (size_t)r * C, C * sizeof(float));
    }
    attn_ctx_t ac = {f, rows, n, l};
    kern_pool_run(pool, attn_run, &ac);
    eng_matmul(pool, ops, &L->wo, f->att, C, NULL, (size_t)n, f->br, C);
    (void)p;
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

/* y [n, C] = HierMoE(u [n, C]) as moe_forward computes it (ASSIGNED), own routing, recorded. */
static void moe_block(eng_fwd_t *f, kern_pool_t *pool, const eng_layer_t *L, eng_row_t *rows, int n,
                      int l, const float *u, float *y, int route_ints) {
    const kern_ops_t *ops = kern_ops();
    const moe_dims_t *d = &f->md;
    const int C = d->C, OH = d->OH, M = d->M, KM = d->KM, E = d->E, KE = d->KE, EH = d->EH,
              N = d->N, KN = d->KN, S = n * KM, SE = S * KE;
    const size_t Cz = (size_t)C;

    /* Overseer shared expert and the primary gate (router logits in FP32 from FP16 weights). */
    eng_matmul(pool, ops, &L->ov_w1, u, Cz, NULL, (size_t)n, f->ov_h, (size_t)OH);
    for (size_t i = 0; i < (size_t)n * OH; i++)
        f->ov_h[i] = silu(f->ov_h[i]);
    eng_matmul(pool, ops, &L->ov_w2, f->ov_h, (size_t)OH, NULL, (size_t)n, y, Cz);
    eng_matmul(pool, ops, &L->gate, u, Cz, NULL, (size_t)n, f->gl, (size_t)M);
    for (int t = 0; t < n; t++) {
        const float *lg = f->gl + (size_t)t * M;
        moe_topk(f->mini + (size_t)t * KM, lg, L->bias_gate, M, KM);
        moe_gate_forward(f->gate_w + (size_t)t * KM, lg, f->mini + (size_t)t * KM, KM);
    }

    /* Each mini's two routers on its block of gathered rows. */
    for (int s = 0; s < S; s++)
        f->key[s] = f->mini[s];
    group_by(f->off, f->order, f->key, S, M);
    for (int j = 0; j < M; j++) {
        const int o = f->off[j], nj = f->off[j + 1] - o;
        if (nj == 0)
            continue;
        for (int r = 0; r < nj; r++)
            memcpy(f->gx + (size_t)r * Cz, u + (size_t)(f->order[o + r] / KM) * Cz,
                   Cz * sizeof(float));
        eng_matmul(pool, ops, &L->router[j], f->gx, Cz, NULL, (size_t)nj, f->rl_g, (size_t)E);
        eng_matmul(pool, ops, &L->mic_router[j], f->gx, Cz, NULL, (size_t)nj, f->ml_g, (size_t)N);
        for (int r = 0; r < nj; r++) {
            const size_t s = (size_t)f->order[o + r];
            const float *rl = f->rl_g + (size_t)r * E, *ml = f->ml_g + (size_t)r * N;
            moe_topk(f->expert + s * KE, rl, L->bias_router[j], E, KE);
            moe_gate_forward(f->r_w + s * KE, rl, f->expert + s * KE, KE);
            moe_topk(f->micro + s * KN, ml, L->bias_micro[j], N, KN);
            moe_gate_forward(f->m_w + s * KN, ml, f->micro + s * KN, KN);
        }
    }

    /* Experts grouped by (mini, expert): each expert's weights are read once for its rows. */
    for (int es = 0; es < SE; es++)
        f->key[es] = f->mini[es / KE] * E + f->expert[es];
    group_by(f->off, f->order, f->key, SE, M * E);
    for (int g = 0; g < M * E; g++) {
        const int o = f->off[g], ng = f->off[g + 1] - o;
        if (ng == 0)
            continue;
        const int j = g / E, e = g % E;
        for (int r = 0; r < ng; r++)
            memcpy(f->gx + (size_t)r * Cz, u + (size_t)(f->order[o + r] / (KE * KM)) * Cz,
                   Cz * sizeof(float));
        const eng_mat_t *w1 = &L->exp_w1[j], *w2 = &L->exp_w2[j];
        const eng_mat_t v1 = {w1->w + (size_t)e * EH * w1->row_bytes, w1->qt, (size_t)EH, w1->cols,
                              w1->row_bytes};
        const eng_mat_t v2 = {w2->w + (size_t)e * Cz * w2->row_bytes, w2->qt, Cz, w2->cols,
                              w2->row_bytes};
        eng_matmul(pool, ops, &v1, f->gx, Cz, NULL, (size_t)ng, f->eh, (size_t)EH);
        relu2_rows(f->eh, ng, EH);
        eng_matmul(pool, ops, &v2, f->eh, (size_t)EH, NULL, (size_t)ng, f->ey_g, Cz);
        for (int r = 0; r < ng; r++)
            memcpy(f->ey + (size_t)f->order[o + r] * Cz, f->ey_g + (size_t)r * Cz,
                   Cz * sizeof(float));
    }

    /* Per slot, in moe_forward's order: experts, then micro agents, then the mini's gate. */
    for (int s = 0; s < S; s++) {
        const int t = s / KM, j = f->mini[s];
        const float *ut = u + (size_t)t * Cz;
        memset(f->mo, 0, Cz * sizeof(float));
        for (int i = 0; i < KE; i++) {
            const size_t es = (size_t)s * KE + (size_t)i;
            const float w = f->r_w[es], *ey = f->ey + es * Cz;
            for (int c = 0; c < C; c++)
                f->mo[c] += w * ey[c];
        }
        for (int i = 0; i < KN; i++) {
            const size_t ms = (size_t)s * KN + (size_t)i, agent = (size_t)f->micro[ms];
            const float sv = eng_row_dot(&L->mic_down[j], agent, ut);
            const float a = f->m_w[ms] * silu(sv);
            eng_row_dequant(&L->mic_up[j], agent, f->vec);
            for (int c = 0; c < C; c++)
                f->mo[c] += a * f->vec[c];
        }
        float *yt = y + (size_t)t * Cz;
        for (int c = 0; c < C; c++)
            yt[c] += f->gate_w[s] * f->mo[c];
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

/* out [n, OC] = BL(RMSNorm_g(x)) with the learner's arithmetic: RMSNorm, int8 codes of each
 * row, exact integer product with the ternary codes, times s_w then s_x. */
static void bitlinear(eng_fwd_t *f, kern_pool_t *pool, kern_act_t *act, const eng_mat_t *W,
                      const float *g, const float *x, int n, float *out) {
    const int in = (int)W->cols;
    rms_rows(f->dn, f->rstd, x, g, n, in);
    kern_ops()->quantize_act(act, f->dn, (size_t)in, (size_t)n);
    eng_matmul(pool, kern_ops(), W, NULL, 0, act, (size_t)n, out, W->rows);
}

/* x [n, C] += BitDiffusion(RMSNorm(x)) as diffusion_forward computes it without replay. */
static void diffusion_block(eng_fwd_t *f, const quillan_policy_t *p, kern_pool_t *pool,
                            eng_row_t *rows, int n) {
    const eng_diff_t *D = &p->diff;
    const diffusion_dims_t *d = &f->dd;
    const int C = f->C, Lb = d->Lb, W = d->W, F = d->F, K = d->K, Lw = f->Lw;
    rms_rows(f->u, f->rstd, f->x, D->norm, n, C);
    /* BL_c(u) is the same at every step of the sampler: computed once (the learner recomputes
     * it per step and gets the same bits). */
    bitlinear(f, pool, &f->act_C, &D->in_c, D->in_c_norm, f->u, n, f->hc);
    for (int r = 0; r < n; r++)
        diffusion_plan_noise(f->z + (size_t)r * Lw, p->cfg.diffusion_seed, (uint64_t)rows[r].pos,
                             Lb);
    for (int k = K; k >= 1; k--) {
        for (int r = 0; r < n; r++)
            for (int b = 0; b < Lb; b++)
                f->zin[(size_t)r * Lb + b] =
                    diffusion_bit_get(f->z + (size_t)r * Lw, b) ? 1.0f : -1.0f;
        bitlinear(f, pool, &f->act_Lb, &D->in_z, D->in_z_norm, f->zin, n, f->h);
        /* h = (BL_z + BL_c) + BL_time, in the learner's order. */
        add_rows(f->h, f->h, f->hc, n, W);
        const float *te = D->time_emb + (size_t)(k - 1) * W;
        for (int r = 0; r < n; r++)
            for (int i = 0; i < W; i++)
                f->h[(size_t)r * W + i] = f->h[(size_t)r * W + i] + te[i];
        for (int nb = 0; nb < d->NB; nb++) {
            rms_rows(f->a, f->rstd, f->h, D->blk_norm[nb], n, W);
            bitlinear(f, pool, &f->act_W, &D->up[nb], D->up_norm[nb], f->a, n, f->up);
            relu2_rows(f->up, n, F);
            bitlinear(f, pool, &f->act_F, &D->down[nb], D->down_norm[nb], f->up, n, f->tmp);
            add_rows(f->h, f->h, f->tmp, n, W);
        }
        bitlinear(f, pool, &f->act_W, &D->out, D->out_norm, f->h, n, f->dl);
        for (int r = 0; r < n; r++) {
            uint64_t *z = f->z + (size_t)r * Lw, *zn = f->zn + (size_t)r * Lw;
            diffusion_plan_step(zn, z, f->dl + (size_t)r * Lb, k, K, Lb);
            if (k == 1 && rows[r].plan) {
                memcpy(rows[r].plan, z, (size_t)Lw * sizeof(uint64_t));
                memcpy(rows[r].plan + Lw, zn, (size_t)Lw * sizeof(uint64_t));
            }
        }
        uint64_t *sw = f->z;
        f->z = f->zn;
        f->zn = sw;
    }
    /* Write-back BL_dec(2 c_hat - 1), c_hat = z_0. */
    for (int r = 0; r < n; r++)
        for (int b = 0; b < Lb; b++)
            f->zin[(size_t)r * Lb + b] = 2 * (float)diffusion_bit_get(f->z + (size_t)r * Lw, b) - 1;
    bitlinear(f, pool, &f->act_Lb, &D->dec, D->dec_norm, f->zin, n, f->br);
    add_rows(f->x, f->x, f->br, n, f->C);
}

/* ---- the whole network ---- */

void eng_forward(eng_fwd_t *f, const quillan_policy_t *p, kern_pool_t *pool, eng_row_t *rows, int n,
                 quillan_stats_t *st) {
    Q_ASSERT(n >= 1 && n <= f->R && eng_fwd_fits(f, p));
    const size_t C = (size_t)f->C;
    double t0 = eng_now(), t1;
    for (int r = 0; r < n; r++) {
        Q_ASSERT(rows[r].token >= 0 && rows[r].token < f->V);
        memcpy(f->x + (size_t)r * C, p->embed + (size_t)rows[r].token * C, C * sizeof(float));
    }
    for (int l = 0; l < f->L; l++) {
        const eng_layer_t *L = &p->layers[l];
        attention_block(f, p, pool, L, rows, n, l);
        t1 = eng_now();
        st->attention_s += t1 - t0;
        t0 = t1;
        rms_rows(f->xn, f->rstd, f->x, L->moe_norm, n, f->C);
        moe_block(f, pool, L, rows, n, l, f->xn, f->br, p->route_ints);
        add_rows(f->x, f->x, f->br, n, f->C);
        t1 = eng_now();
        st->moe_s += t1 - t0;
        t0 = t1;
        if (l == p->cfg.diffusion_layer) {
            diffusion_block(f, p, pool, rows, n);
            t1 = eng_now();
            st->diffusion_s += t1 - t0;
            t0 = t1;
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
    st->head_s += eng_now() - t0;
}
