/* Finite-difference gradient check of the hierarchical MoE (double build, MODEL.md
 * acceptance): routing fixed by replaying the layer's own first choice, weights used as given
 * (the quantizers' STE identity), central differences on every parameter tensor and on the
 * input u, for the output term, the balance loss and the z-loss separately and together. */
#include "gradcheck.h"
#include "moe.h"
#include "qtest.h"
#include "rng.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    moe_dims_t d;
    int BT;
    real *params; /* every tensor, moe_params_map order */
    real *grads;
    moe_params_t p, dp;
    real *u, *du; /* [BT, C] */
    real *G;      /* [BT, C] fixed projection: the output term is sum(y * G) */
    real *y;      /* [BT, C] */
    moe_acts_t *acts;
    moe_route_t route;   /* the fixed routing */
    double wy, wbal, wz; /* loss = wy sum(y G) + wbal balance + wz z */
} fixture_t;

static void fill(real *v, size_t n, rng_stream_t *r, real scale) {
    for (size_t i = 0; i < n; i++)
        v[i] = scale * rng_stream_normal(r);
}

static void fixture_init(fixture_t *f, moe_dims_t d, int BT, uint64_t seed) {
    memset(f, 0, sizeof *f);
    f->d = d;
    f->BT = BT;
    size_t s[9], n = moe_params_sizes(&d, s), nu = (size_t)BT * d.C;
    f->params = malloc(n * sizeof(real));
    f->grads = calloc(n, sizeof(real));
    f->u = malloc(nu * sizeof(real));
    f->du = calloc(nu, sizeof(real));
    f->G = malloc(nu * sizeof(real));
    f->y = malloc(nu * sizeof(real));
    cr_assert(f->params && f->grads && f->u && f->du && f->G && f->y);
    rng_stream_t r;
    rng_stream_init(&r, 21, seed, 0);
    fill(f->params, n, &r, 0.4);
    fill(f->u, nu, &r, 1.0);
    fill(f->G, nu, &r, 1.0);
    moe_params_map(&f->p, f->params, &d);
    moe_params_map(&f->dp, f->grads, &d);
    f->acts = moe_acts_new(&d, BT, NULL);
    cr_assert_not_null(f->acts);
    cr_assert_eq(moe_route_init(&f->route, &d, BT, NULL), 0);
    /* The layer's own routing, fixed for every later evaluation. */
    moe_aux_t aux;
    cr_assert_eq(moe_forward(f->acts, f->y, &aux, NULL, f->u, &f->p, NULL, NULL, &d, BT, NULL), 0);
    const moe_route_t *rt = moe_acts_route(f->acts);
    f->route.BT = BT;
    memcpy(f->route.mini, rt->mini, sizeof(int32_t) * BT * d.KM);
    memcpy(f->route.expert, rt->expert, sizeof(int32_t) * BT * d.KM * d.KE);
    memcpy(f->route.micro, rt->micro, sizeof(int32_t) * BT * d.KM * d.KN);
}

static void fixture_free(fixture_t *f) {
    moe_acts_destroy(&f->acts);
    moe_route_free(&f->route);
    free(f->params);
    free(f->grads);
    free(f->u);
    free(f->du);
    free(f->G);
    free(f->y);
}

static double loss_eval(void *ctx) {
    fixture_t *f = ctx;
    moe_aux_t aux;
    int rc =
        moe_forward(f->acts, f->y, &aux, NULL, f->u, &f->p, NULL, &f->route, &f->d, f->BT, NULL);
    Q_ASSERT(rc == 0);
    return f->wy * gc_dot(f->y, f->G, (size_t)f->BT * f->d.C) + f->wbal * aux.balance +
           f->wz * aux.z;
}

static void analytic(fixture_t *f) {
    size_t s[9], n = moe_params_sizes(&f->d, s);
    memset(f->grads, 0, n * sizeof(real));
    memset(f->du, 0, (size_t)f->BT * f->d.C * sizeof(real));
    loss_eval(f);
    real *dy = malloc((size_t)f->BT * f->d.C * sizeof(real));
    for (size_t i = 0; i < (size_t)f->BT * f->d.C; i++)
        dy[i] = f->wy * f->G[i];
    moe_backward(&f->dp, f->du, dy, f->acts, f->u, &f->p, f->wbal, f->wz, &f->d, f->BT);
    free(dy);
}

/* Checks every tensor for one loss mix; returns the worst error. */
static double run_check(fixture_t *f, const char *label) {
    analytic(f);
    size_t s[9];
    moe_params_sizes(&f->d, s);
    const gc_entry_t t[] = {
        {"overseer.w1", f->p.ov_w1, f->dp.ov_w1, s[0]},
        {"overseer.w2", f->p.ov_w2, f->dp.ov_w2, s[1]},
        {"overseer.gate", f->p.gate, f->dp.gate, s[2]},
        {"router", f->p.router, f->dp.router, s[3]},
        {"experts.w1", f->p.exp_w1, f->dp.exp_w1, s[4]},
        {"experts.w2", f->p.exp_w2, f->dp.exp_w2, s[5]},
        {"micro.router", f->p.mic_router, f->dp.mic_router, s[6]},
        {"micro.down", f->p.mic_down, f->dp.mic_down, s[7]},
        {"micro.up", f->p.mic_up, f->dp.mic_up, s[8]},
        {"input u", f->u, f->du, (size_t)f->BT * f->d.C},
    };
    gc_report_t rep = {0};
    gc_tensors(&rep, label, t, sizeof t / sizeof t[0], loss_eval, f);
    printf("gradcheck_moe [%s]: worst tensor %s, relative error %.3e (tolerance %.0e)\n", label,
           rep.worst_name, rep.worst, GC_TOL);
    return rep.worst;
}

static const moe_dims_t DIMS = {
    .C = 8, .OH = 6, .M = 4, .KM = 2, .E = 3, .KE = 2, .EH = 5, .N = 6, .KN = 3};

Test(gradcheck_moe, output_term) {
    fixture_t f;
    fixture_init(&f, DIMS, 6, 1);
    f.wy = 1;
    cr_assert(run_check(&f, "output") <= GC_TOL);
    fixture_free(&f);
}

Test(gradcheck_moe, balance_loss) {
    fixture_t f;
    fixture_init(&f, DIMS, 6, 2);
    f.wbal = 1;
    cr_assert(run_check(&f, "balance") <= GC_TOL);
    fixture_free(&f);
}

Test(gradcheck_moe, z_loss) {
    fixture_t f;
    fixture_init(&f, DIMS, 6, 3);
    f.wz = 1;
    cr_assert(run_check(&f, "z") <= GC_TOL);
    fixture_free(&f);
}

/* Everything at once, with top-1 routers and minis that no token reaches. */
Test(gradcheck_moe, all_terms_top1_and_idle_mini) {
    moe_dims_t d = DIMS;
    d.M = 5;
    d.KM = 1;
    d.KE = 1;
    d.KN = 1;
    fixture_t f;
    fixture_init(&f, d, 5, 4);
    for (int t = 0; t < 5; t++)
        f.route.mini[t] = t % 2; /* replay sends every token to minis 0 and 1 */
    f.wy = 1;
    f.wbal = 0.5;
    f.wz = 0.25;
    cr_assert(run_check(&f, "all, top-1") <= GC_TOL);
    fixture_free(&f);
}
