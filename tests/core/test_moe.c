/* Hierarchical MoE (float build): top-k tie rule, selection-only bias, balance loss by hand,
 * routing replay and its mismatch counter, grouped expert compute against a per-token oracle,
 * loads and the loss-free bias update, validation of records from outside. */
#include "qtest.h"

#include "moe.h"
#include "rng.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

/* A layer with its parameters in one buffer, filled from a seeded stream. */
typedef struct {
    moe_dims_t d;
    real *buf;
    moe_params_t p;
    real *bias_buf;
    moe_bias_t bias;
} layer_t;

static void layer_init(layer_t *L, moe_dims_t d, uint64_t seed, real scale) {
    L->d = d;
    size_t s[9];
    size_t n = moe_params_sizes(&d, s);
    L->buf = malloc(n * sizeof(real));
    cr_assert_not_null(L->buf);
    rng_stream_t r;
    rng_stream_init(&r, 7, seed, 0);
    for (size_t i = 0; i < n; i++)
        L->buf[i] = scale * rng_stream_normal(&r);
    moe_params_map(&L->p, L->buf, &d);
    size_t nb = (size_t)d.M + (size_t)d.M * d.E + (size_t)d.M * d.N;
    L->bias_buf = calloc(nb, sizeof(real));
    cr_assert_not_null(L->bias_buf);
    L->bias.gate = L->bias_buf;
    L->bias.router = L->bias_buf + d.M;
    L->bias.micro = L->bias_buf + d.M + (size_t)d.M * d.E;
}

static void layer_free(layer_t *L) {
    free(L->buf);
    free(L->bias_buf);
}

static real *random_vec(size_t n, uint64_t seed) {
    real *v = malloc(n * sizeof(real));
    cr_assert_not_null(v);
    rng_stream_t r;
    rng_stream_init(&r, 8, seed, 0);
    for (size_t i = 0; i < n; i++)
        v[i] = rng_stream_normal(&r);
    return v;
}

static const moe_dims_t SMALL = {
    .C = 16, .OH = 12, .M = 5, .KM = 2, .E = 4, .KE = 2, .EH = 10, .N = 9, .KN = 3};

Test(moe, topk_ties_pick_lowest_index) {
    real l[6] = {1, 3, 3, 2, 3, 3};
    int32_t idx[4];
    moe_topk(idx, l, NULL, 6, 2);
    cr_assert(idx[0] == 1 && idx[1] == 2, "got %d %d", idx[0], idx[1]);
    moe_topk(idx, l, NULL, 6, 4);
    cr_assert(idx[2] == 4 && idx[3] == 5);
    real z[5] = {0, 0, 0, 0, 0};
    moe_topk(idx, z, NULL, 5, 3);
    cr_assert(idx[0] == 0 && idx[1] == 1 && idx[2] == 2);
    /* A tie created by the bias is broken the same way. */
    real l2[3] = {1, 0, 0.5f}, b2[3] = {0, 1, 0.5f};
    moe_topk(idx, l2, b2, 3, 1);
    cr_assert_eq(idx[0], 0);
}

Test(moe, bias_changes_selection_not_gate_weights) {
    real l[3] = {2, 1, 0}, b[3] = {0, 0, 5};
    int32_t idx[2];
    real w[2];
    moe_topk(idx, l, b, 3, 2);
    cr_assert(idx[0] == 2 && idx[1] == 0, "bias must steer the choice");
    moe_gate_forward(w, l, idx, 2);
    /* Softmax over the UNBIASED kept logits {0, 2}. */
    cr_assert_float_eq(w[0], 1.0 / (1.0 + exp(2.0)), 1e-6);
    cr_assert_float_eq(w[1], exp(2.0) / (1.0 + exp(2.0)), 1e-6);

    /* Through the layer: a bias too small to change any choice leaves y bit-identical. */
    layer_t L;
    layer_init(&L, SMALL, 1, 0.3f);
    const int BT = 7;
    real *u = random_vec((size_t)BT * SMALL.C, 2);
    real *y0 = malloc(sizeof(real) * BT * SMALL.C), *y1 = malloc(sizeof(real) * BT * SMALL.C);
    moe_acts_t *a = moe_acts_new(&SMALL, BT, NULL);
    cr_assert_not_null(a);
    moe_aux_t aux;
    cr_assert_eq(moe_forward(a, y0, &aux, NULL, u, &L.p, NULL, NULL, &SMALL, BT, NULL), 0);
    moe_route_t r0;
    cr_assert_eq(moe_route_init(&r0, &SMALL, BT, NULL), 0);
    const moe_route_t *ra = moe_acts_route(a);
    r0.BT = BT;
    memcpy(r0.mini, ra->mini, sizeof(int32_t) * BT * SMALL.KM);
    memcpy(r0.expert, ra->expert, sizeof(int32_t) * BT * SMALL.KM * SMALL.KE);
    memcpy(r0.micro, ra->micro, sizeof(int32_t) * BT * SMALL.KM * SMALL.KN);
    size_t nb = (size_t)SMALL.M * (1 + SMALL.E + SMALL.N);
    for (size_t i = 0; i < nb; i++)
        L.bias_buf[i] = 1e-7f;
    cr_assert_eq(moe_forward(a, y1, &aux, NULL, u, &L.p, &L.bias, NULL, &SMALL, BT, NULL), 0);
    cr_assert(memcmp(r0.mini, ra->mini, sizeof(int32_t) * BT * SMALL.KM) == 0);
    cr_assert(memcmp(y0, y1, sizeof(real) * BT * SMALL.C) == 0, "gate weights must ignore bias");
    /* A large bias on mini 4 sends every token there. */
    L.bias.gate[4] = 1e3f;
    cr_assert_eq(moe_forward(a, y1, &aux, NULL, u, &L.p, &L.bias, NULL, &SMALL, BT, NULL), 0);
    for (int t = 0; t < BT; t++)
        cr_assert_eq(ra->mini[t * SMALL.KM], 4);
    moe_route_free(&r0);
    moe_acts_destroy(&a);
    cr_assert_null(a);
    free(u);
    free(y0);
    free(y1);
    layer_free(&L);
}

Test(moe, balance_loss_all_tokens_to_one_expert) {
    /* Function level: 3 tokens, each row softmax = {1/6, 1/6, 1/2, 1/6}, all pick choice 2.
     * f = {0, 0, 1, 0}, P_2 = 1/2: loss = 4 * 1 * 1/2 = 2. */
    real l[12];
    for (int t = 0; t < 3; t++) {
        l[t * 4 + 0] = l[t * 4 + 1] = l[t * 4 + 3] = 0;
        l[t * 4 + 2] = logf(3.0f);
    }
    int32_t idx[3] = {2, 2, 2};
    real f[4], P[4];
    real loss = moe_balance_forward(f, P, l, idx, 3, 4, 1);
    cr_assert_float_eq(loss, 2.0, 1e-6, "loss %f", (double)loss);
    cr_assert_float_eq(f[2], 1.0, 0);
    cr_assert_float_eq(P[0], 1.0 / 6.0, 1e-6);
    cr_assert_float_eq(moe_balance_forward(f, P, l, idx, 0, 4, 1), 0.0, 0);

    /* Layer level: zero router weights make every logit 0, so the tie rule sends every token to
     * mini 0, expert 0 and micro agent 0 (k = 1). Each reached router has f_0 = 1 and
     * P_0 = 1/n: balance 1 each, three routers reached; z = ln(M)^2 + ln(E)^2 + ln(N)^2. */
    moe_dims_t d = SMALL;
    d.KM = d.KE = d.KN = 1;
    layer_t L;
    layer_init(&L, d, 3, 0.3f);
    memset(L.p.gate, 0, sizeof(real) * d.M * d.C);
    memset(L.p.router, 0, sizeof(real) * d.M * d.E * d.C);
    memset(L.p.mic_router, 0, sizeof(real) * d.M * d.N * d.C);
    const int BT = 6;
    real *u = random_vec((size_t)BT * d.C, 4), *y = malloc(sizeof(real) * BT * d.C);
    moe_acts_t *a = moe_acts_new(&d, BT, NULL);
    moe_load_t load;
    cr_assert_eq(moe_load_init(&load, &d, NULL), 0);
    moe_aux_t aux;
    cr_assert_eq(moe_forward(a, y, &aux, &load, u, &L.p, NULL, NULL, &d, BT, NULL), 0);
    cr_assert_eq(aux.routers, 3);
    cr_assert_float_eq(aux.balance, 3.0, 1e-5, "balance %f", aux.balance);
    double zh = pow(log(d.M), 2) + pow(log(d.E), 2) + pow(log(d.N), 2);
    cr_assert_float_eq(aux.z, zh, 1e-5, "z %f vs %f", aux.z, zh);
    cr_assert_eq(aux.decisions, BT * 3);
    cr_assert_eq(load.gate[0], BT);
    cr_assert_eq(load.router[0], BT);
    cr_assert_eq(load.micro[0], BT);
    cr_assert_eq(load.gate[1] + load.router[1] + load.micro[1], 0);

    /* Loss-free balancing: the overloaded choice goes down, the idle ones go up; a mini that saw
     * no token keeps its biases. */
    moe_bias_update(&L.bias, &load, 0.5f);
    cr_assert_float_eq(L.bias.gate[0], -0.5, 0);
    cr_assert_float_eq(L.bias.gate[1], 0.5, 0);
    cr_assert_float_eq(L.bias.router[0], -0.5, 0);
    cr_assert_float_eq(L.bias.router[1], 0.5, 0);
    cr_assert_float_eq(L.bias.router[d.E], 0, 0);
    cr_assert_float_eq(L.bias.micro[d.N + 1], 0, 0);
    moe_load_reset(&load);
    cr_assert_eq(load.gate[0], 0);
    /* The updated bias now steers every token to mini 1 (lowest of the raised ones). */
    cr_assert_eq(moe_forward(a, y, &aux, &load, u, &L.p, &L.bias, NULL, &d, BT, NULL), 0);
    cr_assert_eq(load.gate[1], BT);
    moe_load_free(&load);
    moe_acts_destroy(&a);
    free(u);
    free(y);
    layer_free(&L);
}

Test(moe, bias_update_follows_sign_of_mean_minus_load) {
    moe_dims_t d = {.C = 4, .OH = 2, .M = 4, .KM = 1, .E = 2, .KE = 1, .EH = 2, .N = 2, .KN = 1};
    moe_load_t load;
    cr_assert_eq(moe_load_init(&load, &d, NULL), 0);
    int64_t g[4] = {3, 1, 0, 4}; /* mean 2 */
    memcpy(load.gate, g, sizeof g);
    real bg[4] = {0}, br[8] = {0}, bm[8] = {0};
    moe_bias_t b = {bg, br, bm};
    moe_bias_update(&b, &load, 0.25f);
    cr_assert(bg[0] == -0.25f && bg[1] == 0.25f && bg[2] == 0.25f && bg[3] == -0.25f);
    load.gate[0] = load.gate[1] = load.gate[2] = load.gate[3] = 5;
    moe_bias_update(&b, &load, 0.25f);
    cr_assert(bg[0] == -0.25f && bg[3] == -0.25f, "equal loads leave the bias alone");
    moe_load_free(&load);
}

/* Copies the routing the last forward used into *r. */
static void route_copy(moe_route_t *r, const moe_route_t *src, const moe_dims_t *d, int BT) {
    r->BT = BT;
    memcpy(r->mini, src->mini, sizeof(int32_t) * BT * d->KM);
    memcpy(r->expert, src->expert, sizeof(int32_t) * BT * d->KM * d->KE);
    memcpy(r->micro, src->micro, sizeof(int32_t) * BT * d->KM * d->KN);
}

Test(moe, replay_reproduces_forward_and_counts_mismatches) {
    const moe_dims_t d = SMALL;
    layer_t L;
    layer_init(&L, d, 5, 0.3f);
    const int BT = 9;
    real *u = random_vec((size_t)BT * d.C, 6);
    real *y0 = malloc(sizeof(real) * BT * d.C), *y1 = malloc(sizeof(real) * BT * d.C);
    moe_acts_t *a = moe_acts_new(&d, BT, NULL);
    moe_aux_t aux0, aux1;
    cr_assert_eq(moe_forward(a, y0, &aux0, NULL, u, &L.p, NULL, NULL, &d, BT, NULL), 0);
    cr_assert_eq(aux0.mismatches, 0);
    cr_assert_eq(aux0.decisions, BT * (1 + 2 * d.KM));
    moe_route_t rec;
    cr_assert_eq(moe_route_init(&rec, &d, BT, NULL), 0);
    route_copy(&rec, moe_acts_route(a), &d, BT);

    cr_assert_eq(moe_forward(a, y1, &aux1, NULL, u, &L.p, NULL, &rec, &d, BT, NULL), 0);
    cr_assert(memcmp(y0, y1, sizeof(real) * BT * d.C) == 0, "replay must reproduce y exactly");
    cr_assert_eq(aux1.mismatches, 0);
    cr_assert_eq(aux1.balance, aux0.balance);
    cr_assert_eq(aux1.z, aux0.z);

    /* Replace one kept expert of token 2 and one kept micro agent of token 5 by choices the
     * layer did not make: exactly two decisions differ; only those tokens change. */
    int32_t *ex = rec.expert + (2 * d.KM + 0) * d.KE;
    for (int e = 0; e < d.E; e++)
        if (e != ex[0] && e != ex[1]) {
            ex[1] = e;
            break;
        }
    int32_t *mi = rec.micro + (5 * d.KM + 1) * d.KN;
    for (int i = 0; i < d.N; i++)
        if (i != mi[0] && i != mi[1] && i != mi[2]) {
            mi[0] = i;
            break;
        }
    cr_assert_eq(moe_forward(a, y1, &aux1, NULL, u, &L.p, NULL, &rec, &d, BT, NULL), 0);
    cr_assert_eq(aux1.mismatches, 2, "mismatches %ld", aux1.mismatches);
    for (int t = 0; t < BT; t++) {
        int same = memcmp(y0 + t * d.C, y1 + t * d.C, sizeof(real) * d.C) == 0;
        cr_assert_eq(same, t != 2 && t != 5, "token %d", t);
    }
    /* The record's order within a router does not matter for the count. */
    route_copy(&rec, moe_acts_route(a), &d, BT);
    /* Swap token 0's two mini slots (with their expert and micro lists) and the order of
     * token 1's kept experts. */
    int32_t tmp = rec.mini[0], tmpv[16];
    rec.mini[0] = rec.mini[1];
    rec.mini[1] = tmp;
    memcpy(tmpv, rec.expert, sizeof(int32_t) * d.KE);
    memcpy(rec.expert, rec.expert + d.KE, sizeof(int32_t) * d.KE);
    memcpy(rec.expert + d.KE, tmpv, sizeof(int32_t) * d.KE);
    memcpy(tmpv, rec.micro, sizeof(int32_t) * d.KN);
    memcpy(rec.micro, rec.micro + d.KN, sizeof(int32_t) * d.KN);
    memcpy(rec.micro + d.KN, tmpv, sizeof(int32_t) * d.KN);
    int32_t *e1 = rec.expert + (1 * d.KM) * d.KE;
    tmp = e1[0];
    e1[0] = e1[1];
    e1[1] = tmp;
    cr_assert_eq(moe_forward(a, y1, &aux1, NULL, u, &L.p, NULL, &rec, &d, BT, NULL), 0);
    cr_assert_eq(aux1.mismatches, 2);

    moe_route_free(&rec);
    moe_acts_destroy(&a);
    free(u);
    free(y0);
    free(y1);
    layer_free(&L);
}

Test(moe, replayed_record_is_validated) {
    const moe_dims_t d = SMALL;
    layer_t L;
    layer_init(&L, d, 9, 0.3f);
    const int BT = 3;
    real *u = random_vec((size_t)BT * d.C, 10), *y = malloc(sizeof(real) * BT * d.C);
    moe_acts_t *a = moe_acts_new(&d, BT, NULL);
    moe_aux_t aux;
    cr_assert_eq(moe_forward(a, y, &aux, NULL, u, &L.p, NULL, NULL, &d, BT, NULL), 0);
    moe_route_t rec;
    cr_assert_eq(moe_route_init(&rec, &d, BT, NULL), 0);
    route_copy(&rec, moe_acts_route(a), &d, BT);
    qerr_t err = {0};
    cr_assert_eq(moe_route_validate(&rec, &d, BT, &err), 0);

    rec.expert[(1 * d.KM + 1) * d.KE] = d.E; /* out of range */
    cr_assert_eq(moe_forward(a, y, &aux, NULL, u, &L.p, NULL, &rec, &d, BT, &err), -1);
    cr_assert_eq(err.code, QERR_INVALID);
    cr_assert(strstr(err.msg, "token 1") != NULL, "%s", err.msg);
    route_copy(&rec, moe_acts_route(a), &d, BT);
    rec.micro[1] = rec.micro[0]; /* kept twice */
    cr_assert_eq(moe_route_validate(&rec, &d, BT, &err), -1);
    cr_assert(strstr(err.msg, "twice") != NULL, "%s", err.msg);
    route_copy(&rec, moe_acts_route(a), &d, BT);
    cr_assert_eq(moe_route_validate(&rec, &d, BT + 1, &err), -1, "token count must match");
    moe_route_free(&rec);
    moe_acts_destroy(&a);
    free(u);
    free(y);
    layer_free(&L);
}

/* w[i] = softmax over i < k of (W x)[idx[i]], in double. */
static void kept_softmax(double *w, const real *W, const int32_t *idx, int k, const real *x,
                         int C) {
    double lg[64], mx = -1e300, sum = 0;
    for (int i = 0; i < k; i++) {
        double v = 0;
        for (int c = 0; c < C; c++)
            v += (double)W[(size_t)idx[i] * C + c] * x[c];
        lg[i] = v;
        mx = v > mx ? v : mx;
    }
    for (int i = 0; i < k; i++)
        sum += w[i] = exp(lg[i] - mx);
    for (int i = 0; i < k; i++)
        w[i] /= sum;
}

/* Per-token oracle in double, straight from MODEL.md, using the routing of the record. */
static void oracle(double *y, const real *u, const layer_t *L, const moe_route_t *rt, int t) {
    const moe_dims_t *d = &L->d;
    const int C = d->C;
    const real *x = u + (size_t)t * C;
    double h[64], w[64];
    for (int c = 0; c < C; c++)
        y[c] = 0;
    for (int k = 0; k < d->OH; k++) {
        double s = 0;
        for (int c = 0; c < C; c++)
            s += (double)L->p.ov_w1[k * C + c] * x[c];
        h[k] = s / (1 + exp(-s));
    }
    for (int c = 0; c < C; c++)
        for (int k = 0; k < d->OH; k++)
            y[c] += (double)L->p.ov_w2[c * d->OH + k] * h[k];
    const int32_t *mk = rt->mini + (size_t)t * d->KM;
    double pw[64];
    kept_softmax(w, L->p.gate, mk, d->KM, x, C);
    memcpy(pw, w, sizeof(double) * d->KM);
    for (int m = 0; m < d->KM; m++) {
        int j = mk[m];
        size_t s = (size_t)t * d->KM + m;
        const int32_t *ek = rt->expert + s * d->KE;
        kept_softmax(w, L->p.router + (size_t)j * d->E * C, ek, d->KE, x, C);
        for (int i = 0; i < d->KE; i++) {
            size_t g = (size_t)j * d->E + ek[i];
            const real *w1 = L->p.exp_w1 + g * d->EH * C, *w2 = L->p.exp_w2 + g * C * d->EH;
            double hid[64];
            for (int k = 0; k < d->EH; k++) {
                double v = 0;
                for (int c = 0; c < C; c++)
                    v += (double)w1[k * C + c] * x[c];
                hid[k] = v > 0 ? v * v : 0;
            }
            for (int c = 0; c < C; c++) {
                double v = 0;
                for (int k = 0; k < d->EH; k++)
                    v += (double)w2[c * d->EH + k] * hid[k];
                y[c] += pw[m] * w[i] * v;
            }
        }
        const int32_t *nk = rt->micro + s * d->KN;
        kept_softmax(w, L->p.mic_router + (size_t)j * d->N * C, nk, d->KN, x, C);
        for (int i = 0; i < d->KN; i++) {
            size_t ag = (size_t)j * d->N + nk[i];
            double a = 0;
            for (int c = 0; c < C; c++)
                a += (double)L->p.mic_down[ag * C + c] * x[c];
            double sa = a / (1 + exp(-a));
            for (int c = 0; c < C; c++)
                y[c] += pw[m] * w[i] * sa * L->p.mic_up[ag * C + c];
        }
    }
}

Test(moe, grouped_expert_compute_matches_per_token_oracle) {
    const moe_dims_t d = SMALL;
    layer_t L;
    layer_init(&L, d, 11, 0.3f);
    const int BT = 23;
    real *u = random_vec((size_t)BT * d.C, 12), *y = malloc(sizeof(real) * BT * d.C);
    moe_acts_t *a = moe_acts_new(&d, BT + 4, NULL);
    moe_aux_t aux;
    cr_assert_eq(moe_forward(a, y, &aux, NULL, u, &L.p, NULL, NULL, &d, BT, NULL), 0);
    const moe_route_t *rt = moe_acts_route(a);
    double yo[64], worst = 0;
    for (int t = 0; t < BT; t++) {
        oracle(yo, u, &L, rt, t);
        for (int c = 0; c < d.C; c++) {
            double e = fabs(yo[c] - y[t * d.C + c]) / (1 + fabs(yo[c]));
            worst = e > worst ? e : worst;
        }
    }
    cr_assert(worst < 1e-5, "grouped vs per-token: worst relative error %g", worst);

    /* Each token evaluated alone (batch of 1: no grouping at all) gives the same bits as the
     * batched, grouped forward. */
    real y1[64];
    for (int t = 0; t < BT; t++) {
        cr_assert_eq(moe_forward(a, y1, &aux, NULL, u + t * d.C, &L.p, NULL, NULL, &d, 1, NULL), 0);
        for (int c = 0; c < d.C; c++)
            cr_assert_float_eq(y1[c], y[t * d.C + c], 1e-5 * (1 + fabs(y1[c])), "token %d", t);
    }
    /* The own routing is the top-k of the logits (checked against the oracle's logits of the
     * gate for every token). */
    cr_assert_eq(moe_forward(a, y, &aux, NULL, u, &L.p, NULL, NULL, &d, BT, NULL), 0);
    for (int t = 0; t < BT; t++) {
        real lg[16];
        for (int j = 0; j < d.M; j++) {
            double s = 0;
            for (int c = 0; c < d.C; c++)
                s += (double)L.p.gate[j * d.C + c] * u[t * d.C + c];
            lg[j] = (real)s;
        }
        int32_t idx[4];
        moe_topk(idx, lg, NULL, d.M, d.KM);
        cr_assert(
            !(idx[0] != rt->mini[t * d.KM] && fabs(lg[idx[0]] - lg[rt->mini[t * d.KM]]) > 1e-4),
            "token %d: top mini %d vs %d", t, idx[0], rt->mini[t * d.KM]);
    }
    moe_acts_destroy(&a);
    free(u);
    free(y);
    layer_free(&L);
}
