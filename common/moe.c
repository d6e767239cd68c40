#include "moe.h"

#include "alloc.h"
#include "gemm.h"

#include <math.h>
#include <string.h>

/* ---- small helpers ---- */

/* out[n, o] = x[n, i] w[o, i]^T (ASSIGNED). */
static void lin(real *out, const real *x, const real *w, int n, int i, int o) {
    gemm(GEMM_N, GEMM_T, n, o, i, 1, x, i, w, i, 0, out, o);
}

/* dx[n, i] += dy[n, o] w[o, i]. */
static void lin_dx(real *dx, const real *dy, const real *w, int n, int i, int o) {
    gemm(GEMM_N, GEMM_N, n, i, o, 1, dy, o, w, i, 1, dx, i);
}

/* dw[o, i] += dy[n, o]^T x[n, i]. */
static void lin_dw(real *dw, const real *dy, const real *x, int n, int i, int o) {
    gemm(GEMM_T, GEMM_N, o, i, n, 1, dy, o, x, i, 1, dw, i);
}

static real sigm(real x) {
    return 1 / (1 + R_EXP(-x));
}

static real silu(real x) {
    return x * sigm(x);
}

static real silu_grad(real x) {
    real s = sigm(x);
    return s * (1 + x * (1 - s));
}

static real dot(const real *a, const real *b, int n) {
    real s = 0;
    for (int i = 0; i < n; i++)
        s += a[i] * b[i];
    return s;
}

static void axpy(real *y, real a, const real *x, int n) {
    for (int i = 0; i < n; i++)
        y[i] += a * x[i];
}

/* Sorts a short index list ascending (insertion sort; k is a handful). */
static void sort_small(int32_t *a, int k) {
    for (int i = 1; i < k; i++) {
        int32_t v = a[i];
        int j = i - 1;
        for (; j >= 0 && a[j] > v; j--)
            a[j + 1] = a[j];
        a[j + 1] = v;
    }
}

/* 1 when the two k-sets differ (order ignored). */
static int sets_differ(const int32_t *a, const int32_t *b, int k) {
    int32_t sa[64], sb[64];
    Q_ASSERT(k <= 64);
    memcpy(sa, a, (size_t)k * sizeof *sa);
    memcpy(sb, b, (size_t)k * sizeof *sb);
    sort_small(sa, k);
    sort_small(sb, k);
    return memcmp(sa, sb, (size_t)k * sizeof *sa) != 0;
}

/* ---- sizes, params, loads, biases ---- */

void moe_dims_from_config(moe_dims_t *d, const model_config_t *cfg) {
    *d = (moe_dims_t){
        .C = cfg->dim,
        .OH = cfg->overseer_hidden,
        .M = cfg->num_mini_moes,
        .KM = cfg->top_k_minis,
        .E = cfg->num_experts_per_mini,
        .KE = cfg->top_k_experts,
        .EH = cfg->expert_hidden,
        .N = cfg->num_micros_per_mini,
        .KN = cfg->top_k_micros,
    };
}

size_t moe_params_sizes(const moe_dims_t *d, size_t s[9]) {
    size_t C = (size_t)d->C, M = (size_t)d->M, E = (size_t)d->E, N = (size_t)d->N;
    s[0] = (size_t)d->OH * C;
    s[1] = C * (size_t)d->OH;
    s[2] = M * C;
    s[3] = M * E * C;
    s[4] = M * E * (size_t)d->EH * C;
    s[5] = M * E * C * (size_t)d->EH;
    s[6] = M * N * C;
    s[7] = M * N * C;
    s[8] = M * N * C;
    size_t total = 0;
    for (int i = 0; i < 9; i++)
        total += s[i];
    return total;
}

void moe_params_map(moe_params_t *p, real *buf, const moe_dims_t *d) {
    size_t s[9];
    moe_params_sizes(d, s);
    real **slots[9] = {&p->ov_w1,  &p->ov_w2,      &p->gate,     &p->router, &p->exp_w1,
                       &p->exp_w2, &p->mic_router, &p->mic_down, &p->mic_up};
    for (int i = 0; i < 9; i++) {
        *slots[i] = buf;
        buf += s[i];
    }
}

int moe_load_init(moe_load_t *load, const moe_dims_t *d, qerr_t *err) {
    memset(load, 0, sizeof *load);
    load->M = d->M;
    load->E = d->E;
    load->N = d->N;
    load->gate = q_aligned_calloc((size_t)d->M, sizeof(int64_t));
    load->router = q_aligned_calloc((size_t)d->M * (size_t)d->E, sizeof(int64_t));
    load->micro = q_aligned_calloc((size_t)d->M * (size_t)d->N, sizeof(int64_t));
    if (!load->gate || !load->router || !load->micro) {
        moe_load_free(load);
        return qerr_set(err, QERR_NOMEM, "moe: out of memory for load counters");
    }
    return 0;
}

void moe_load_reset(moe_load_t *load) {
    memset(load->gate, 0, (size_t)load->M * sizeof(int64_t));
    memset(load->router, 0, (size_t)load->M * (size_t)load->E * sizeof(int64_t));
    memset(load->micro, 0, (size_t)load->M * (size_t)load->N * sizeof(int64_t));
}

void moe_load_free(moe_load_t *load) {
    q_aligned_free(load->gate);
    q_aligned_free(load->router);
    q_aligned_free(load->micro);
    load->gate = load->router = load->micro = NULL;
}

/* One router: b_k += rate * sign(mean - load_k). */
static void bias_update_one(real *b, const int64_t *load, int n, real rate) {
    int64_t total = 0;
    for (int k = 0; k < n; k++)
        total += load[k];
    /* Compare n * load_k with the total instead of dividing, so the sign is exact. */
    for (int k = 0; k < n; k++) {
        int64_t diff = total - (int64_t)n * load[k];
        b[k] += diff > 0 ? rate : diff < 0 ? -rate : 0;
    }
}

void moe_bias_update(moe_bias_t *bias, const moe_load_t *load, real rate) {
    bias_update_one(bias->gate, load->gate, load->M, rate);
    for (int j = 0; j < load->M; j++) {
        bias_update_one(bias->router + (size_t)j * load->E, load->router + (size_t)j * load->E,
                        load->E, rate);
        bias_update_one(bias->micro + (size_t)j * load->N, load->micro + (size_t)j * load->N,
                        load->N, rate);
    }
}

/* ---- routing records ---- */

int moe_route_init(moe_route_t *r, const moe_dims_t *d, int max_BT, qerr_t *err) {
    memset(r, 0, sizeof *r);
    r->max_BT = max_BT;
    r->KM = d->KM;
    r->KE = d->KE;
    r->KN = d->KN;
    size_t slots = (size_t)max_BT * (size_t)d->KM;
    r->mini = q_aligned_calloc(slots, sizeof(int32_t));
    r->expert = q_aligned_calloc(slots * (size_t)d->KE, sizeof(int32_t));
    r->micro = q_aligned_calloc(slots * (size_t)d->KN, sizeof(int32_t));
    if (!r->mini || !r->expert || !r->micro) {
        moe_route_free(r);
        return qerr_set(err, QERR_NOMEM, "moe: out of memory for a routing record of %d tokens",
                        max_BT);
    }
    return 0;
}

void moe_route_free(moe_route_t *r) {
    q_aligned_free(r->mini);
    q_aligned_free(r->expert);
    q_aligned_free(r->micro);
    r->mini = r->expert = r->micro = NULL;
}

/* Indices of one router decision in [0, n) and pairwise distinct. */
static int check_choice(const int32_t *idx, int k, int n, int t, const char *what, int j,
                        qerr_t *err) {
    for (int i = 0; i < k; i++) {
        if (idx[i] < 0 || idx[i] >= n)
            return qerr_set(err, QERR_INVALID,
                            "routing record: token %d, %s %d: index %d outside [0, %d)", t, what, j,
                            (int)idx[i], n);
        for (int i2 = 0; i2 < i; i2++)
            if (idx[i2] == idx[i])
                return qerr_set(err, QERR_INVALID,
                                "routing record: token %d, %s %d: index %d kept twice", t, what, j,
                                (int)idx[i]);
    }
    return 0;
}

int moe_route_validate(const moe_route_t *r, const moe_dims_t *d, int BT, qerr_t *err) {
    if (r->BT != BT || r->KM != d->KM || r->KE != d->KE || r->KN != d->KN)
        return qerr_set(err, QERR_INVALID,
                        "routing record: shape (tokens %d, top-k %d/%d/%d) does not match the "
                        "layer (tokens %d, top-k %d/%d/%d)",
                        r->BT, r->KM, r->KE, r->KN, BT, d->KM, d->KE, d->KN);
    if (!r->mini || !r->expert || !r->micro)
        return qerr_set(err, QERR_INVALID, "routing record: missing index arrays");
    for (int t = 0; t < BT; t++) {
        const int32_t *mi = r->mini + (size_t)t * d->KM;
        if (check_choice(mi, d->KM, d->M, t, "gate", 0, err))
            return -1;
        for (int m = 0; m < d->KM; m++) {
            size_t s = (size_t)t * d->KM + m;
            if (check_choice(r->expert + s * d->KE, d->KE, d->E, t, "expert router of mini", mi[m],
                             err) ||
                check_choice(r->micro + s * d->KN, d->KN, d->N, t, "micro router of mini", mi[m],
                             err))
                return -1;
        }
    }
    return 0;
}

/* ---- routers ---- */

void moe_topk(int32_t *idx, const real *logits, const real *bias, int n, int k) {
    Q_ASSERT(k >= 1 && k <= n);
    for (int s = 0; s < k; s++) {
        int best = -1;
        real best_v = 0;
        for (int i = 0; i < n; i++) {
            int taken = 0;
            for (int s2 = 0; s2 < s; s2++)
                taken |= idx[s2] == i;
            if (taken)
                continue;
            real v = bias ? logits[i] + bias[i] : logits[i];
            /* Strictly greater: an equal score never displaces a lower index. */
            if (best < 0 || v > best_v) {
                best = i;
                best_v = v;
            }
        }
        idx[s] = best;
    }
}

void moe_gate_forward(real *w, const real *logits, const int32_t *idx, int k) {
    real mx = logits[idx[0]];
    for (int i = 1; i < k; i++)
        mx = R_FMAX(mx, logits[idx[i]]);
    real sum = 0;
    for (int i = 0; i < k; i++) {
        w[i] = R_EXP(logits[idx[i]] - mx);
        sum += w[i];
    }
    for (int i = 0; i < k; i++)
        w[i] /= sum;
}

void moe_gate_backward(real *dlogits, const real *dw, const real *w, const int32_t *idx, int k) {
    real s = 0;
    for (int i = 0; i < k; i++)
        s += w[i] * dw[i];
    for (int i = 0; i < k; i++)
        dlogits[idx[i]] += w[i] * (dw[i] - s);
}

/* max and sum of exp(l - max) of one row, so softmax_i = exp(l_i - mx) / sum and
 * logsumexp = mx + log(sum). */
static void row_softmax_stats(real *mx, real *sum, const real *l, int n) {
    real m = l[0];
    for (int i = 1; i < n; i++)
        m = R_FMAX(m, l[i]);
    real s = 0;
    for (int i = 0; i < n; i++)
        s += R_EXP(l[i] - m);
    *mx = m;
    *sum = s;
}

real moe_balance_forward(real *f, real *P, const real *logits, const int32_t *idx, int T, int n,
                         int k) {
    memset(f, 0, (size_t)n * sizeof *f);
    memset(P, 0, (size_t)n * sizeof *P);
    if (T == 0)
        return 0;
    for (int t = 0; t < T; t++) {
        const real *l = logits + (size_t)t * n;
        real mx, sum;
        row_softmax_stats(&mx, &sum, l, n);
        for (int i = 0; i < n; i++)
            P[i] += R_EXP(l[i] - mx) / sum;
        for (int i = 0; i < k; i++)
            f[idx[(size_t)t * k + i]] += 1;
    }
    real loss = 0;
    for (int i = 0; i < n; i++) {
        f[i] /= (real)T * k;
        P[i] /= T;
        loss += f[i] * P[i];
    }
    return n * loss;
}

void moe_balance_backward(real *dlogits, real dloss, const real *f, const real *logits, int T,
                          int n) {
    if (T == 0 || dloss == 0)
        return;
    /* loss = n/T sum_t sum_i f_i p_ti and dp_ti/dl_tj = p_ti (delta_ij - p_tj), so
     * dl_tj = n/T p_tj (f_j - sum_i f_i p_ti). */
    real scale = dloss * n / T;
    for (int t = 0; t < T; t++) {
        const real *l = logits + (size_t)t * n;
        real mx, sum;
        row_softmax_stats(&mx, &sum, l, n);
        real fp = 0;
        for (int i = 0; i < n; i++)
            fp += f[i] * R_EXP(l[i] - mx) / sum;
        real *dl = dlogits + (size_t)t * n;
        for (int j = 0; j < n; j++)
            dl[j] += scale * (R_EXP(l[j] - mx) / sum) * (f[j] - fp);
    }
}

real moe_zloss_forward(const real *logits, int T, int n) {
    if (T == 0)
        return 0;
    real acc = 0;
    for (int t = 0; t < T; t++) {
        real mx, sum;
        row_softmax_stats(&mx, &sum, logits + (size_t)t * n, n);
        real lse = mx + R_LOG(sum);
        acc += lse * lse;
    }
    return acc / T;
}

void moe_zloss_backward(real *dlogits, real dloss, const real *logits, int T, int n) {
    if (T == 0 || dloss == 0)
        return;
    for (int t = 0; t < T; t++) {
        const real *l = logits + (size_t)t * n;
        real mx, sum;
        row_softmax_stats(&mx, &sum, l, n);
        real g = dloss * 2 * (mx + R_LOG(sum)) / T;
        real *dl = dlogits + (size_t)t * n;
        for (int j = 0; j < n; j++)
            dl[j] += g * R_EXP(l[j] - mx) / sum;
    }
}

/* ---- experts ---- */

void moe_expert_forward(real *out, real *pre, real *scratch, const real *x, const real *w1,
                        const real *w2, int n, int C, int EH) {
    lin(pre, x, w1, n, C, EH);
    size_t nh = (size_t)n * EH;
    for (size_t i = 0; i < nh; i++) {
        const real v = real_keep_or_zero(pre[i], pre[i] > 0);
        scratch[i] = v * v;
    }
    lin(out, scratch, w2, n, EH, C);
}

void moe_expert_backward(real *dx, real *dw1, real *dw2, real *scratch, const real *dout,
                         const real *pre, const real *x, const real *w1, const real *w2, int n,
                         int C, int EH) {
    size_t nh = (size_t)n * EH;
    for (size_t i = 0; i < nh; i++) {
        const real v = real_keep_or_zero(pre[i], pre[i] > 0);
        scratch[i] = v * v;
    }
    lin_dw(dw2, dout, scratch, n, EH, C);
    gemm(GEMM_N, GEMM_N, n, EH, C, 1, dout, C, w2, EH, 0, scratch, EH);
    for (size_t i = 0; i < nh; i++)
        scratch[i] *= real_keep_or_zero(2 * pre[i], pre[i] > 0);
    lin_dw(dw1, scratch, x, n, C, EH);
    lin_dx(dx, scratch, w1, n, C, EH);
}

/* ---- the layer ---- */

/* Slot s = t*KM + m is token t's m-th kept mini; expert slot es = s*KE + i its i-th kept expert;
 * micro slot s*KN + i its i-th kept micro agent. Router logits of the minis are stored in
 * "grouped rows": the slots of mini 0 first, then mini 1, ..., so that each mini's router
 * products and losses run on one contiguous block. */
struct moe_acts {
    moe_dims_t d;
    int max_BT, BT;
    moe_route_t route; /* the routing used by the last forward */
    real *ov_pre;      /* [BT, OH] W1s u */
    real *ov_act;      /* [BT, OH] SiLU(ov_pre) */
    real *gate_logits; /* [BT, M] */
    real *gate_w;      /* [BT, KM] p */
    int *mini_off;     /* [M + 1] first grouped row of each mini */
    int *mini_slot;    /* [BT*KM] slot of each grouped row */
    int *slot_row;     /* [BT*KM] grouped row of each slot */
    real *r_logits;    /* [BT*KM, E] grouped rows */
    real *m_logits;    /* [BT*KM, N] grouped rows */
    real *r_w;         /* [BT*KM, KE] q, slot order */
    real *m_w;         /* [BT*KM, KN] w, slot order */
    real *m_s;         /* [BT*KM, KN] down_i . u */
    int *exp_off;      /* [M*E + 1] first grouped expert row of each expert */
    int *exp_slot;     /* [BT*KM*KE] expert slot of each grouped expert row */
    int *exp_key;      /* [BT*KM*KE] global expert (j*E + e) of each expert slot */
    real *e_pre;       /* [BT*KM*KE, EH] expert hidden pre-activation, expert-slot order */
    real *e_out;       /* [BT*KM*KE, C] expert outputs, expert-slot order */
    real *mini_out;    /* [BT*KM, C] mini_j(u) */
    real *f_gate;      /* [M] balance shares f of the gate */
    real *f_router;    /* [M, E] */
    real *f_micro;     /* [M, N] */
    /* scratch */
    int32_t *own;  /* [max(KM, KE, KN)] own top-k under replay */
    int32_t *gidx; /* [BT, max(KE, KN)] kept indices of one mini's rows */
    real *P;       /* [max(M, E, N)] */
    real *dq;      /* [max(KM, KE, KN)] */
    real *gx;      /* [BT, C] gathered inputs */
    real *gy;      /* [BT, C] gathered outputs / output gradients */
    real *gz;      /* [BT, C] gathered input gradients */
    real *gh;      /* [BT, max(EH, OH)] */
    real *gh2;     /* [BT, EH] */
    real *dmini;   /* [BT*KM, C] */
    real *de_out;  /* [BT*KM*KE, C] */
    real *dr;      /* [BT*KM, E] grouped rows */
    real *dm;      /* [BT*KM, N] grouped rows */
    real *dgl;     /* [BT, M] */
};

static int imax3(int a, int b, int c) {
    int m = a > b ? a : b;
    return m > c ? m : c;
}

moe_acts_t *moe_acts_new(const moe_dims_t *d, int max_BT, qerr_t *err) {
    Q_ASSERT(d->KM >= 1 && d->KM <= d->M && d->KE >= 1 && d->KE <= d->E && d->KN >= 1 &&
             d->KN <= d->N && d->KN <= 64 && d->KE <= 64 && d->KM <= 64 && max_BT >= 1);
    moe_acts_t *a = q_aligned_calloc(1, sizeof *a);
    if (!a)
        return qerr_set(err, QERR_NOMEM, "moe: out of memory"), NULL;
    a->d = *d;
    a->max_BT = max_BT;
    if (moe_route_init(&a->route, d, max_BT, err)) {
        q_aligned_free(a);
        return NULL;
    }
    size_t BT = (size_t)max_BT, S = BT * d->KM, SE = S * d->KE, SN = S * d->KN;
    size_t C = (size_t)d->C, M = (size_t)d->M, E = (size_t)d->E, N = (size_t)d->N;
    size_t kmax = (size_t)imax3(d->KM, d->KE, d->KN);
    int ok = 1;
#define ALLOC(field, count)                                                                        \
    do {                                                                                           \
        a->field = q_aligned_calloc((count), sizeof *a->field);                                    \
        ok = ok && a->field != NULL;                                                               \
    } while (0)
    ALLOC(ov_pre, BT * d->OH);
    ALLOC(ov_act, BT * d->OH);
    ALLOC(gate_logits, BT * M);
    ALLOC(gate_w, S);
    ALLOC(mini_off, M + 1);
    ALLOC(mini_slot, S);
    ALLOC(slot_row, S);
    ALLOC(r_logits, S * E);
    ALLOC(m_logits, S * N);
    ALLOC(r_w, SE);
    ALLOC(m_w, SN);
    ALLOC(m_s, SN);
    ALLOC(exp_off, M * E + 1);
    ALLOC(exp_slot, SE);
    ALLOC(exp_key, SE);
    ALLOC(e_pre, SE * d->EH);
    ALLOC(e_out, SE * C);
    ALLOC(mini_out, S * C);
    ALLOC(f_gate, M);
    ALLOC(f_router, M * E);
    ALLOC(f_micro, M * N);
    ALLOC(own, kmax);
    ALLOC(gidx, BT * (size_t)(d->KE > d->KN ? d->KE : d->KN));
    ALLOC(P, (size_t)imax3(d->M, d->E, d->N));
    ALLOC(dq, kmax);
    ALLOC(gx, BT * C);
    ALLOC(gy, BT * C);
    ALLOC(gz, BT * C);
    ALLOC(gh, BT * (size_t)(d->EH > d->OH ? d->EH : d->OH));
    ALLOC(gh2, BT * d->EH);
    ALLOC(dmini, S * C);
    ALLOC(de_out, SE * C);
    ALLOC(dr, S * E);
    ALLOC(dm, S * N);
    ALLOC(dgl, BT * M);
#undef ALLOC
    if (!ok) {
        moe_acts_destroy(&a);
        qerr_set(err, QERR_NOMEM, "moe: out of memory for the activations of %d tokens", max_BT);
        return NULL;
    }
    return a;
}

void moe_acts_destroy(moe_acts_t **pa) {
    moe_acts_t *a = *pa;
    if (!a)
        return;
    moe_route_free(&a->route);
    void *bufs[] = {a->ov_pre,   a->ov_act,   a->gate_logits, a->gate_w, a->mini_off, a->mini_slot,
                    a->slot_row, a->r_logits, a->m_logits,    a->r_w,    a->m_w,      a->m_s,
                    a->exp_off,  a->exp_slot, a->exp_key,     a->e_pre,  a->e_out,    a->mini_out,
                    a->f_gate,   a->f_router, a->f_micro,     a->own,    a->gidx,     a->P,
                    a->dq,       a->gx,       a->gy,          a->gz,     a->gh,       a->gh2,
                    a->dmini,    a->de_out,   a->dr,          a->dm,     a->dgl};
    for (size_t i = 0; i < Q_ARRAY_LEN(bufs); i++)
        q_aligned_free(bufs[i]);
    q_aligned_free(a);
    *pa = NULL;
}

const moe_route_t *moe_acts_route(const moe_acts_t *acts) {
    return &acts->route;
}

/* The kept indices of one router decision: own top-k, or the record's under replay (then
 * counting a differing own choice). */
static void route_decide(int32_t *kept, int32_t *own, const int32_t *replayed, const real *logits,
                         const real *bias, int n, int k, moe_aux_t *aux) {
    moe_topk(own, logits, bias, n, k);
    if (replayed) {
        memcpy(kept, replayed, (size_t)k * sizeof *kept);
        aux->mismatches += sets_differ(own, kept, k);
    } else {
        memcpy(kept, own, (size_t)k * sizeof *kept);
    }
    aux->decisions++;
}

/* Counting sort of n items by key[i] in [0, nk): off[nk + 1] and order[n] (item ids by key,
 * ascending item id within a key). */
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

int moe_forward(moe_acts_t *acts, real *y, moe_aux_t *aux, moe_load_t *load, const real *u,
                const moe_params_t *p, const moe_bias_t *bias, const moe_route_t *replay,
                const moe_dims_t *d, int BT, qerr_t *err) {
    Q_ASSERT(BT >= 0 && BT <= acts->max_BT && memcmp(d, &acts->d, sizeof *d) == 0);
    if (replay && moe_route_validate(replay, d, BT, err))
        return -1;
    const int C = d->C, OH = d->OH, M = d->M, KM = d->KM, E = d->E, KE = d->KE, EH = d->EH,
              N = d->N, KN = d->KN, S = BT * KM;
    moe_acts_t *a = acts;
    moe_route_t *rt = &a->route;
    a->BT = rt->BT = BT;
    memset(aux, 0, sizeof *aux);

    /* Overseer shared expert: y = W2s SiLU(W1s u). */
    lin(a->ov_pre, u, p->ov_w1, BT, C, OH);
    for (size_t i = 0; i < (size_t)BT * OH; i++)
        a->ov_act[i] = silu(a->ov_pre[i]);
    lin(y, a->ov_act, p->ov_w2, BT, OH, C);

    /* Primary gate over the minis. */
    lin(a->gate_logits, u, p->gate, BT, C, M);
    for (int t = 0; t < BT; t++) {
        const real *l = a->gate_logits + (size_t)t * M;
        int32_t *kept = rt->mini + (size_t)t * KM;
        route_decide(kept, a->own, replay ? replay->mini + (size_t)t * KM : NULL, l,
                     bias ? bias->gate : NULL, M, KM, aux);
        moe_gate_forward(a->gate_w + (size_t)t * KM, l, kept, KM);
    }
    if (BT > 0) {
        aux->balance += moe_balance_forward(a->f_gate, a->P, a->gate_logits, rt->mini, BT, M, KM);
        aux->z += moe_zloss_forward(a->gate_logits, BT, M);
        aux->routers++;
    }

    /* Group the slots by mini; each mini's routers run on its block of rows. */
    for (int s = 0; s < S; s++)
        a->exp_key[s] = rt->mini[s]; /* exp_key (size S*KE >= S) doubles as the sort key here */
    group_by(a->mini_off, a->mini_slot, a->exp_key, S, M);
    for (int r = 0; r < S; r++)
        a->slot_row[a->mini_slot[r]] = r;
    for (int j = 0; j < M; j++) {
        int off = a->mini_off[j], n = a->mini_off[j + 1] - off;
        if (n == 0) {
            memset(a->f_router + (size_t)j * E, 0, (size_t)E * sizeof(real));
            memset(a->f_micro + (size_t)j * N, 0, (size_t)N * sizeof(real));
            continue;
        }
        for (int r = 0; r < n; r++) {
            int t = a->mini_slot[off + r] / KM;
            memcpy(a->gx + (size_t)r * C, u + (size_t)t * C, (size_t)C * sizeof(real));
        }
        real *rl = a->r_logits + (size_t)off * E, *ml = a->m_logits + (size_t)off * N;
        lin(rl, a->gx, p->router + (size_t)j * E * C, n, C, E);
        lin(ml, a->gx, p->mic_router + (size_t)j * N * C, n, C, N);

        for (int r = 0; r < n; r++) {
            size_t s = (size_t)a->mini_slot[off + r];
            int32_t *kept = rt->expert + s * KE;
            route_decide(kept, a->own, replay ? replay->expert + s * KE : NULL, rl + (size_t)r * E,
                         bias ? bias->router + (size_t)j * E : NULL, E, KE, aux);
            moe_gate_forward(a->r_w + s * KE, rl + (size_t)r * E, kept, KE);
            memcpy(a->gidx + (size_t)r * KE, kept, (size_t)KE * sizeof(int32_t));
        }
        aux->balance +=
            moe_balance_forward(a->f_router + (size_t)j * E, a->P, rl, a->gidx, n, E, KE);
        aux->z += moe_zloss_forward(rl, n, E);

        for (int r = 0; r < n; r++) {
            size_t s = (size_t)a->mini_slot[off + r];
            int32_t *kept = rt->micro + s * KN;
            route_decide(kept, a->own, replay ? replay->micro + s * KN : NULL, ml + (size_t)r * N,
                         bias ? bias->micro + (size_t)j * N : NULL, N, KN, aux);
            moe_gate_forward(a->m_w + s * KN, ml + (size_t)r * N, kept, KN);
            memcpy(a->gidx + (size_t)r * KN, kept, (size_t)KN * sizeof(int32_t));
        }
        aux->balance +=
            moe_balance_forward(a->f_micro + (size_t)j * N, a->P, ml, a->gidx, n, N, KN);
        aux->z += moe_zloss_forward(ml, n, N);
        aux->routers += 2;
    }

    /* Experts, grouped: each expert's weights are read once for all its rows. */
    const int SE = S * KE;
    for (int es = 0; es < SE; es++)
        a->exp_key[es] = rt->mini[es / KE] * E + rt->expert[es];
    group_by(a->exp_off, a->exp_slot, a->exp_key, SE, M * E);
    for (int g = 0; g < M * E; g++) {
        int off = a->exp_off[g], n = a->exp_off[g + 1] - off;
        if (n == 0)
            continue;
        for (int r = 0; r < n; r++) {
            int t = a->exp_slot[off + r] / (KE * KM);
            memcpy(a->gx + (size_t)r * C, u + (size_t)t * C, (size_t)C * sizeof(real));
        }
        moe_expert_forward(a->gy, a->gh, a->gh2, a->gx, p->exp_w1 + (size_t)g * EH * C,
                           p->exp_w2 + (size_t)g * C * EH, n, C, EH);
        for (int r = 0; r < n; r++) {
            size_t es = (size_t)a->exp_slot[off + r];
            memcpy(a->e_pre + es * EH, a->gh + (size_t)r * EH, (size_t)EH * sizeof(real));
            memcpy(a->e_out + es * C, a->gy + (size_t)r * C, (size_t)C * sizeof(real));
        }
    }

    /* Micro agents, the mini outputs and the weighted sum over the kept minis, per slot in
     * a fixed order (so the result does not depend on the grouping). */
    for (int s = 0; s < S; s++) {
        int t = s / KM, j = rt->mini[s];
        const real *ut = u + (size_t)t * C;
        real *mo = a->mini_out + (size_t)s * C;
        memset(mo, 0, (size_t)C * sizeof(real));
        for (int i = 0; i < KE; i++) {
            size_t es = (size_t)s * KE + i;
            axpy(mo, a->r_w[es], a->e_out + es * C, C);
        }
        for (int i = 0; i < KN; i++) {
            size_t ms = (size_t)s * KN + i, agent = (size_t)j * N + rt->micro[ms];
            real sv = dot(p->mic_down + agent * C, ut, C);
            a->m_s[ms] = sv;
            axpy(mo, a->m_w[ms] * silu(sv), p->mic_up + agent * C, C);
        }
        axpy(y + (size_t)t * C, a->gate_w[s], mo, C);
    }

    if (load) {
        Q_ASSERT(load->M == M && load->E == E && load->N == N);
        for (int s = 0; s < S; s++) {
            int j = rt->mini[s];
            load->gate[j]++;
            for (int i = 0; i < KE; i++)
                load->router[(size_t)j * E + rt->expert[(size_t)s * KE + i]]++;
            for (int i = 0; i < KN; i++)
                load->micro[(size_t)j * N + rt->micro[(size_t)s * KN + i]]++;
        }
    }
    return 0;
}

void moe_backward(moe_params_t *dp, real *du, const real *dy, moe_acts_t *acts, const real *u,
                  const moe_params_t *p, real dbalance, real dz, const moe_dims_t *d, int BT) {
    moe_acts_t *a = acts;
    Q_ASSERT(BT == a->BT && memcmp(d, &a->d, sizeof *d) == 0);
    const int C = d->C, OH = d->OH, M = d->M, KM = d->KM, E = d->E, KE = d->KE, EH = d->EH,
              N = d->N, KN = d->KN, S = BT * KM;
    const moe_route_t *rt = &a->route;

    /* Overseer: y = W2s act, act = SiLU(W1s u). gh = dact, then dpre. */
    gemm(GEMM_N, GEMM_N, BT, OH, C, 1, dy, C, p->ov_w2, OH, 0, a->gh, OH);
    lin_dw(dp->ov_w2, dy, a->ov_act, BT, OH, C);
    for (size_t i = 0; i < (size_t)BT * OH; i++)
        a->gh[i] *= silu_grad(a->ov_pre[i]);
    lin_dw(dp->ov_w1, a->gh, u, BT, C, OH);
    lin_dx(du, a->gh, p->ov_w1, BT, C, OH);

    /* y += sum_m p_m mini_out: gradients of the mini outputs and of the gate. */
    memset(a->dgl, 0, (size_t)BT * M * sizeof(real));
    for (int t = 0; t < BT; t++) {
        const real *dyt = dy + (size_t)t * C;
        for (int m = 0; m < KM; m++) {
            size_t s = (size_t)t * KM + m;
            real *dmo = a->dmini + s * C;
            for (int c = 0; c < C; c++)
                dmo[c] = a->gate_w[s] * dyt[c];
            a->dq[m] = dot(dyt, a->mini_out + s * C, C);
        }
        moe_gate_backward(a->dgl + (size_t)t * M, a->dq, a->gate_w + (size_t)t * KM,
                          rt->mini + (size_t)t * KM, KM);
    }
    moe_balance_backward(a->dgl, dbalance, a->f_gate, a->gate_logits, BT, M);
    moe_zloss_backward(a->dgl, dz, a->gate_logits, BT, M);
    lin_dw(dp->gate, a->dgl, u, BT, C, M);
    lin_dx(du, a->dgl, p->gate, BT, C, M);

    /* Per slot: expert gate weights, micro agents and their gate weights. */
    memset(a->dr, 0, (size_t)S * E * sizeof(real));
    memset(a->dm, 0, (size_t)S * N * sizeof(real));
    for (int s = 0; s < S; s++) {
        int t = s / KM, j = rt->mini[s];
        size_t row = (size_t)a->slot_row[s];
        const real *ut = u + (size_t)t * C, *dmo = a->dmini + (size_t)s * C;
        for (int i = 0; i < KE; i++) {
            size_t es = (size_t)s * KE + i;
            a->dq[i] = dot(dmo, a->e_out + es * C, C);
            real *de = a->de_out + es * C;
            for (int c = 0; c < C; c++)
                de[c] = a->r_w[es] * dmo[c];
        }
        moe_gate_backward(a->dr + row * E, a->dq, a->r_w + (size_t)s * KE,
                          rt->expert + (size_t)s * KE, KE);
        for (int i = 0; i < KN; i++) {
            size_t ms = (size_t)s * KN + i, agent = (size_t)j * N + rt->micro[ms];
            const real *down = p->mic_down + agent * C, *up = p->mic_up + agent * C;
            real sv = a->m_s[ms], sg = silu(sv), g = dot(dmo, up, C), w = a->m_w[ms];
            a->dq[i] = sg * g;
            axpy(dp->mic_up + agent * C, w * sg, dmo, C);
            real ds = w * g * silu_grad(sv);
            axpy(dp->mic_down + agent * C, ds, ut, C);
            axpy(du + (size_t)t * C, ds, down, C);
        }
        moe_gate_backward(a->dm + row * N, a->dq, a->m_w + (size_t)s * KN,
                          rt->micro + (size_t)s * KN, KN);
    }

    /* Routers of each mini on its block of grouped rows. */
    for (int j = 0; j < M; j++) {
        int off = a->mini_off[j], n = a->mini_off[j + 1] - off;
        if (n == 0)
            continue;
        for (int r = 0; r < n; r++) {
            int t = a->mini_slot[off + r] / KM;
            memcpy(a->gx + (size_t)r * C, u + (size_t)t * C, (size_t)C * sizeof(real));
        }
        real *dr = a->dr + (size_t)off * E, *dm = a->dm + (size_t)off * N;
        moe_balance_backward(dr, dbalance, a->f_router + (size_t)j * E,
                             a->r_logits + (size_t)off * E, n, E);
        moe_zloss_backward(dr, dz, a->r_logits + (size_t)off * E, n, E);
        moe_balance_backward(dm, dbalance, a->f_micro + (size_t)j * N,
                             a->m_logits + (size_t)off * N, n, N);
        moe_zloss_backward(dm, dz, a->m_logits + (size_t)off * N, n, N);
        lin_dw(dp->router + (size_t)j * E * C, dr, a->gx, n, C, E);
        lin_dw(dp->mic_router + (size_t)j * N * C, dm, a->gx, n, C, N);
        memset(a->gz, 0, (size_t)n * C * sizeof(real));
        lin_dx(a->gz, dr, p->router + (size_t)j * E * C, n, C, E);
        lin_dx(a->gz, dm, p->mic_router + (size_t)j * N * C, n, C, N);
        for (int r = 0; r < n; r++) {
            int t = a->mini_slot[off + r] / KM;
            axpy(du + (size_t)t * C, 1, a->gz + (size_t)r * C, C);
        }
    }

    /* Experts, grouped as in the forward. */
    for (int g = 0; g < M * E; g++) {
        int off = a->exp_off[g], n = a->exp_off[g + 1] - off;
        if (n == 0)
            continue;
        for (int r = 0; r < n; r++) {
            size_t es = (size_t)a->exp_slot[off + r];
            int t = (int)(es / ((size_t)KE * KM));
            memcpy(a->gx + (size_t)r * C, u + (size_t)t * C, (size_t)C * sizeof(real));
            memcpy(a->gy + (size_t)r * C, a->de_out + es * C, (size_t)C * sizeof(real));
            memcpy(a->gh + (size_t)r * EH, a->e_pre + es * EH, (size_t)EH * sizeof(real));
        }
        memset(a->gz, 0, (size_t)n * C * sizeof(real));
        moe_expert_backward(a->gz, dp->exp_w1 + (size_t)g * EH * C, dp->exp_w2 + (size_t)g * C * EH,
                            a->gh2, a->gy, a->gh, a->gx, p->exp_w1 + (size_t)g * EH * C,
                            p->exp_w2 + (size_t)g * C * EH, n, C, EH);
        for (int r = 0; r < n; r++) {
            int t = a->exp_slot[off + r] / (KE * KM);
            axpy(du + (size_t)t * C, 1, a->gz + (size_t)r * C, C);
        }
    }
}
