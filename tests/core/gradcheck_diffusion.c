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
    real *params, *grads;
    diffusion_params_t p, dp;
    real *u, *du, *G, *out;
    int32_t pos[8];
    diffusion_acts_t *acts;
    diffusion_plan_t plan; /* replayed: z_1 and z_0 fixed */
    uint64_t *code, *m;
    real tau[8], mask[8];
    double w_out, w_loss; /* loss = w_out sum(out * G) + w_loss diffusion loss */
} fixture_t;

static void fixture_init(fixture_t *f, diffusion_dims_t d, int BT, uint64_t seed) {
    memset(f, 0, sizeof *f);
    Q_ASSERT(BT <= 8);
    f->d = d;
    f->BT = BT;
    f->Lw = diffusion_words(d.Lb);
    size_t sz[DIFFUSION_NUM_TENSORS], n = diffusion_params_sizes(&d, sz), nu = (size_t)BT * d.C;
    f->params = malloc(n * sizeof(real));
    f->grads = calloc(n, sizeof(real));
    f->u = malloc(nu * sizeof(real));
    f->du = calloc(nu, sizeof(real));
    f->G = malloc(nu * sizeof(real));
    f->out = malloc(nu * sizeof(real));
    f->code = calloc((size_t)BT * f->Lw, sizeof(uint64_t));
    f->m = calloc((size_t)BT * f->Lw, sizeof(uint64_t));
    cr_assert(f->params && f->grads && f->u && f->du && f->G && f->out && f->code && f->m);
    rng_stream_t r;
    rng_stream_init(&r, 41, seed, 0);
    size_t off = 0;
    for (int t = 0; t < DIFFUSION_NUM_TENSORS; t++) {
        /* Norm gains near 1, weights at a scale that keeps the sigmoids away from saturation. */
        int is_norm =
            t == 1 || t == 3 || t == 5 || t == 6 || t == 8 || t == 10 || t == 12 || t == 14;
        for (size_t i = 0; i < sz[t]; i++)
            f->params[off + i] =
                is_norm ? 1 + 0.2 * rng_stream_normal(&r) : 0.3 * rng_stream_normal(&r);
        off += sz[t];
    }
    for (size_t i = 0; i < nu; i++) {
        f->u[i] = rng_stream_normal(&r);
        f->G[i] = rng_stream_normal(&r);
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
    diffusion_params_map(&f->p, f->params, &d);
    diffusion_params_map(&f->dp, f->grads, &d);
    f->acts = diffusion_acts_new(&d, BT, NULL);
    cr_assert_not_null(f->acts);
    /* The stage's own plan, fixed for every later evaluation. */
    diffusion_aux_t aux;
    cr_assert_eq(
        diffusion_forward(f->acts, f->out, &aux, f->u, f->pos, &f->p, NULL, 99, &d, BT, NULL), 0);
    cr_assert_eq(diffusion_plan_init(&f->plan, d.Lb, BT, NULL), 0);
    const diffusion_plan_t *pl = diffusion_acts_plan(f->acts);
    f->plan.BT = BT;
    memcpy(f->plan.z1, pl->z1, sizeof(uint64_t) * BT * f->Lw);
    memcpy(f->plan.z0, pl->z0, sizeof(uint64_t) * BT * f->Lw);
}

static void fixture_free(fixture_t *f) {
    diffusion_acts_destroy(&f->acts);
    diffusion_plan_free(&f->plan);
    free(f->params);
    free(f->grads);
    free(f->u);
    free(f->du);
    free(f->G);
    free(f->out);
    free(f->code);
    free(f->m);
}

static double loss_eval(void *ctx) {
    fixture_t *f = ctx;
    diffusion_aux_t aux;
    int rc = diffusion_forward(f->acts, f->out, &aux, f->u, f->pos, &f->p, &f->plan, 99, &f->d,
                               f->BT, NULL);
    Q_ASSERT(rc == 0);
    double l =
        diffusion_loss_forward(f->acts, f->code, f->m, f->tau, f->mask, f->u, &f->p, &f->d, f->BT);
    return f->w_out * gc_dot(f->out, f->G, (size_t)f->BT * f->d.C) + f->w_loss * l;
}

static void analytic(fixture_t *f) {
    size_t sz[DIFFUSION_NUM_TENSORS], n = diffusion_params_sizes(&f->d, sz);
    size_t nu = (size_t)f->BT * f->d.C;
    memset(f->grads, 0, n * sizeof(real));
    memset(f->du, 0, nu * sizeof(real));
    loss_eval(f);
    real *dout = malloc(nu * sizeof(real));
    for (size_t i = 0; i < nu; i++)
        dout[i] = f->w_out * f->G[i];
    diffusion_backward(&f->dp, f->du, dout, f->acts, f->u, &f->p, &f->d, f->BT);
    diffusion_loss_backward(&f->dp, f->du, f->w_loss, f->acts, f->u, &f->p, &f->d, f->BT);
    free(dout);
}

/* Checks every tensor for one loss mix; returns the worst error. */
static double run_check(fixture_t *f, const char *label) {
    analytic(f);
    size_t sz[DIFFUSION_NUM_TENSORS];
    diffusion_params_sizes(&f->d, sz);
    gc_entry_t t[NT];
    real *px = f->params, *pg = f->grads;
    for (int i = 0; i < DIFFUSION_NUM_TENSORS; i++) {
        t[i] = (gc_entry_t){NAMES[i], px, pg, sz[i]};
        px += sz[i];
        pg += sz[i];
    }
    t[NT - 1] = (gc_entry_t){NAMES[NT - 1], f->u, f->du, (size_t)f->BT * f->d.C};
    gc_report_t rep = {0};
    gc_tensors(&rep, label, t, NT, loss_eval, f);
    printf("gradcheck_diffusion [%s]: worst tensor %s, relative error %.3e (tolerance %.0e)\n",
           label, rep.worst_name, rep.worst, GC_TOL);
    return rep.worst;
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
    quant_surrogate_set(1);
    fixture_t f;
    fixture_init(&f, DIMS, 3, 2);
    f.w_loss = 1;
    cr_assert(run_check(&f, "loss") <= GC_TOL);
    fixture_free(&f);
}

Test(gradcheck_diffusion, both_paths_one_step_and_wide_code) {
    quant_surrogate_set(1);
    diffusion_dims_t d = DIMS;
    d.Lb = 96;
    d.K = 1;
    d.NB = 1;
    fixture_t f;
    fixture_init(&f, d, 2, 3);
    f.w_out = 1;
    f.w_loss = 0.5;
    cr_assert(run_check(&f, "both, K 1, 96 bits") <= GC_TOL);
    fixture_free(&f);
}
