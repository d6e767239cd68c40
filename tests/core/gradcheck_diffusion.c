/* Finite-difference gradient check of the bit-level diffusion stage (double build, MODEL.md
 * acceptance): surrogate mode (every BitLinear quantizer and the plan threshold replaced by the
 * identity their STEs use), the plan replayed (z_1 fixed, earlier steps detached), central
 * differences on all fifteen tensors and on u, for the write-back path through the last step,
 * the BCE loss path, and both together. */
#include "diffusion.h"
#include "gradcheck.h"
#include "qtest.h"
#include "quant.h"
#include "rng.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define NT (DIFFUSION_NUM_TENSORS + 1) /* the parameters and u */

static const char *const NAMES[NT] = {
    "in_z.weight",    "in_z.norm",          "in_c.weight",        "in_c.norm",
    "time.weight",    "time.norm",          "blocks.norm.weight", "blocks.up.weight",
    "blocks.up.norm", "blocks.down.weight", "blocks.down.norm",   "out.weight",
    "out.norm",       "dec.weight",         "dec.norm",           "input u"};

typedef struct {
    diffusion_dims_t d;
    int BT, Lw;
    gc_layer_t b; /* params and grads in diffusion_params_map order; y the stage's output */
    diffusion_params_t p, dp;
    int32_t pos[8];
    diffusion_acts_t *acts;
    diffusion_plan_t plan; /* replayed: z_1 and z_0 fixed */
    uint64_t *code, *m;
    real tau[8], mask[8];
    double w_out, w_loss; /* loss = w_out sum(y * G) + w_loss diffusion loss */
} fixture_t;

static void fixture_init(fixture_t *f, diffusion_dims_t d, int BT, uint64_t seed) {
    memset(f, 0, sizeof *f);
    Q_ASSERT(BT <= 8);
    f->d = d;
    f->BT = BT;
    f->Lw = diffusion_words(d.Lb);
    size_t sz[DIFFUSION_NUM_TENSORS], n = diffusion_params_sizes(&d, sz), nu = (size_t)BT * d.C;
    gc_layer_init(&f->b, n, nu);
    f->code = calloc((size_t)BT * f->Lw, sizeof(uint64_t));
    f->m = calloc((size_t)BT * f->Lw, sizeof(uint64_t));
    cr_assert(f->code && f->m);
    rng_stream_t r;
    rng_stream_init(&r, 41, seed, 0);
    size_t off = 0;
    for (int t = 0; t < DIFFUSION_NUM_TENSORS; t++) {
        /* Norm gains near 1, weights at a scale that keeps the sigmoids away from saturation. */
        int is_norm =
            t == 1 || t == 3 || t == 5 || t == 6 || t == 8 || t == 10 || t == 12 || t == 14;
        for (size_t i = 0; i < sz[t]; i++)
            f->b.params[off + i] =
                is_norm ? 1 + 0.2 * rng_stream_normal(&r) : 0.3 * rng_stream_normal(&r);
        off += sz[t];
    }
    for (size_t i = 0; i < nu; i++) {
        f->b.u[i] = rng_stream_normal(&r);
        f->b.G[i] = rng_stream_normal(&r);
    }
    for (int t = 0; t < BT; t++) {
        f->pos[t] = 3 * t + 1;
        f->mask[t] = t == 1 ? 0 : 1; /* one position without a known next token */
    }
    for (int i = 0; i < BT * f->Lw; i++)
        f->code[i] = rng_stream_next_u64(&r);
    for (int t = 0; t < BT; t++)
        for (int w = 0; w < f->Lw; w++)
            if (64 * (w + 1) > d.Lb)
                f->code[t * f->Lw + w] &= (1ULL << (d.Lb - 64 * w)) - 1;
    diffusion_noise_draw(f->tau, f->m, &r, BT, d.Lb);
    diffusion_params_map(&f->p, f->b.params, &d);
    diffusion_params_map(&f->dp, f->b.grads, &d);
    f->acts = diffusion_acts_new(&d, BT, NULL);
    cr_assert_not_null(f->acts);
    /* The stage's own plan, fixed for every later evaluation. */
    diffusion_aux_t aux;
    cr_assert_eq(
        diffusion_forward(f->acts, f->b.y, &aux, f->b.u, f->pos, &f->p, NULL, 99, &d, BT, NULL), 0);
    cr_assert_eq(diffusion_plan_init(&f->plan, d.Lb, BT, NULL), 0);
    const diffusion_plan_t *pl = diffusion_acts_plan(f->acts);
    f->plan.BT = BT;
    memcpy(f->plan.z1, pl->z1, sizeof(uint64_t) * BT * f->Lw);
    memcpy(f->plan.z0, pl->z0, sizeof(uint64_t) * BT * f->Lw);
}

static void fixture_free(fixture_t *f) {
    diffusion_acts_destroy(&f->acts);
    diffusion_plan_free(&f->plan);
    gc_layer_free(&f->b);
    free(f->code);
    free(f->m);
}

static double loss_eval(void *ctx) {
    fixture_t *f = ctx;
    diffusion_aux_t aux;
    int rc = diffusion_forward(f->acts, f->b.y, &aux, f->b.u, f->pos, &f->p, &f->plan, 99, &f->d,
                               f->BT, NULL);
    Q_ASSERT(rc == 0);
    double l = diffusion_loss_forward(f->acts, f->code, f->m, f->tau, f->mask, f->b.u, &f->p, &f->d,
                                      f->BT);
    return f->w_out * gc_dot(f->b.y, f->b.G, f->b.nu) + f->w_loss * l;
}

static void analytic(fixture_t *f) {
    gc_layer_seed(&f->b, f->w_out);
    loss_eval(f);
    diffusion_backward(&f->dp, f->b.du, f->b.dy, f->acts, f->b.u, &f->p, &f->d, f->BT);
    diffusion_loss_backward(&f->dp, f->b.du, f->w_loss, f->acts, f->b.u, &f->p, &f->d, f->BT);
}

/* Checks every tensor for one loss mix; returns the worst error. */
static double run_check(fixture_t *f, const char *label) {
    analytic(f);
    size_t sz[DIFFUSION_NUM_TENSORS];
    diffusion_params_sizes(&f->d, sz);
    gc_entry_t t[NT];
    real *px = f->b.params, *pg = f->b.grads;
    for (int i = 0; i < DIFFUSION_NUM_TENSORS; i++) {
        t[i] = (gc_entry_t){NAMES[i], px, pg, sz[i]};
        px += sz[i];
        pg += sz[i];
    }
    t[NT - 1] = (gc_entry_t){NAMES[NT - 1], f->b.u, f->b.du, f->b.nu};
    gc_report_t rep = {0};
    gc_tensors(&rep, label, t, NT, loss_eval, f);
    printf("gradcheck_diffusion [%s]: worst tensor %s, relative error %.3e (tolerance %.0e)\n",
           label, rep.worst_name, rep.worst, GC_TOL);
    return rep.worst;
}

/* One loss mix on a fresh fixture, in surrogate mode. */
static void check_mix(diffusion_dims_t d, int BT, uint64_t seed, double w_out, double w_loss,
                      const char *label) {
    quant_surrogate_set(1);
    fixture_t f;
    fixture_init(&f, d, BT, seed);
    f.w_out = w_out;
    f.w_loss = w_loss;
    cr_assert(run_check(&f, label) <= GC_TOL);
    fixture_free(&f);
}

static const diffusion_dims_t DIMS = {.C = 6, .Lb = 32, .W = 8, .NB = 2, .F = 10, .D = 6, .K = 3};

Test(gradcheck_diffusion, write_back_through_last_step) {
    quant_surrogate_set(1);
    fixture_t f;
    fixture_init(&f, DIMS, 3, 1);
    f.w_out = 1;
    /* The write-back must depend on the denoiser (through pi) and on u: not a vacuous check. */
    analytic(&f);
    double g2 = 0;
    for (size_t i = 0; i < (size_t)DIMS.W * DIMS.Lb; i++)
        g2 += f.dp.in_z_w[i] * f.dp.in_z_w[i];
    cr_assert(g2 > 0, "the STE must reach the denoiser");
    cr_assert(run_check(&f, "write-back") <= GC_TOL);
    fixture_free(&f);
}

Test(gradcheck_diffusion, bce_loss_path) {
    check_mix(DIMS, 3, 2, 0, 1, "loss");
}

Test(gradcheck_diffusion, both_paths_one_step_and_wide_code) {
    diffusion_dims_t d = DIMS;
    d.Lb = 96;
    d.K = 1;
    d.NB = 1;
    check_mix(d, 2, 3, 1, 0.5, "both, K 1, 96 bits");
}
