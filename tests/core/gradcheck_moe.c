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
    gc_layer_t b; /* params and grads in moe_params_map order; y the layer's output */
    moe_params_t p, dp;
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
    gc_layer_init(&f->b, n, nu);
    rng_stream_t r;
    rng_stream_init(&r, 21, seed, 0);
    fill(f->b.params, n, &r, 0.4);
    fill(f->b.u, nu, &r, 1.0);
    fill(f->b.G, nu, &r, 1.0);
    moe_params_map(&f->p, f->b.params, &d);
    moe_params_map(&f->dp, f->b.grads, &d);
    f->acts = moe_acts_new(&d, BT, NULL);
    cr_assert_not_null(f->acts);
    cr_assert_eq(moe_route_init(&f->route, &d, BT, NULL), 0);
    /* The layer's own routing, fixed for every later evaluation. */
    moe_aux_t aux;
    cr_assert_eq(moe_forward(f->acts, f->b.y, &aux, NULL, f->b.u, &f->p, NULL, NULL, &d, BT, NULL),
                 0);
    const moe_route_t *rt = moe_acts_route(f->acts);
    f->route.BT = BT;
    memcpy(f->route.mini, rt->mini, sizeof(int32_t) * BT * d.KM);
    memcpy(f->route.expert, rt->expert, sizeof(int32_t) * BT * d.KM * d.KE);
    memcpy(f->route.micro, rt->micro, sizeof(int32_t) * BT * d.KM * d.KN);
}

static void fixture_free(fixture_t *f) {
    moe_acts_destroy(&f->acts);
    moe_route_free(&f->route);
    gc_layer_free(&f->b);
}

static double loss_eval(void *ctx) {
    fixture_t *f = ctx;
    moe_aux_t aux;
    int rc = moe_forward(f->acts, f->b.y, &aux, NULL, f->b.u, &f->p, NULL, &f->route, &f->d, f->BT,
                         NULL);
    Q_ASSERT(rc == 0);
    return f->wy * gc_dot(f->b.y, f->b.G, f->b.nu) + f->wbal * aux.balance + f->wz * aux.z;
}

static void analytic(fixture_t *f) {
    gc_layer_seed(&f->b, f->wy);
    loss_eval(f);
    moe_backward(&f->dp, f->b.du, f->b.dy, f->acts, f->b.u, &f->p, f->wbal, f->wz, &f->d, f->BT);
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
        {"input u", f->b.u, f->b.du, f->b.nu},
    };
    gc_report_t rep = {0};
    gc_tensors(&rep, label, t, sizeof t / sizeof t[0], loss_eval, f);
    printf("gradcheck_moe [%s]: worst tensor %s, relative error %.3e (tolerance %.0e)\n", label,
           rep.worst_name, rep.worst, GC_TOL);
    return rep.worst;
}

static const moe_dims_t DIMS = {
    .C = 8, .OH = 6, .M = 4, .KM = 2, .E = 3, .KE = 2, .EH = 5, .N = 6, .KN = 3};

/* One loss mix on a fresh fixture; two_minis makes the replay send every token to minis 0 and
 * 1, so that the others stay idle. */
static void check_mix(moe_dims_t d, int BT, uint64_t seed, double wy, double wbal, double wz,
                      int two_minis, const char *label) {
    fixture_t f;
    fixture_init(&f, d, BT, seed);
    for (int t = 0; two_minis && t < BT; t++)
        f.route.mini[t] = t % 2;
    f.wy = wy;
    f.wbal = wbal;
    f.wz = wz;
    cr_assert(run_check(&f, label) <= GC_TOL);
    fixture_free(&f);
}

Test(gradcheck_moe, output_term) {
    check_mix(DIMS, 6, 1, 1, 0, 0, 0, "output");
}

Test(gradcheck_moe, balance_loss) {
    check_mix(DIMS, 6, 2, 0, 1, 0, 0, "balance");
}

Test(gradcheck_moe, z_loss) {
    check_mix(DIMS, 6, 3, 0, 0, 1, 0, "z");
}

/* Everything at once, with top-1 routers and minis that no token reaches. */
Test(gradcheck_moe, all_terms_top1_and_idle_mini) {
    moe_dims_t d = DIMS;
    d.M = 5;
    d.KM = 1;
    d.KE = 1;
    d.KN = 1;
    check_mix(d, 5, 4, 1, 0.5, 0.25, 1, "all, top-1");
}
