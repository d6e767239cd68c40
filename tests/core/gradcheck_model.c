/* Whole-model gradient check (issue 3, acceptance 1): every trainable tensor of a tiny model
 * with all features on (attention with RoPE, hierarchical MoE with balance and z losses,
 * diffusion stage with its write-back and training loss, residual dropout, CE on weighted
 * tokens), in surrogate mode (quantizers replaced by the identity their STE uses) with the
 * routing and the diffusion plan replayed from a first forward. Double build: central
 * differences must match the analytic gradients per tensor to GRADCHECK_TOL. */
#include "qtest.h"

#include "model.h"
#include "quant.h"
#include "rng.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define GRADCHECK_TOL 1e-4   /* per-tensor relative error, double build (MODEL.md) */
#define GRADCHECK_EPS 1e-5   /* central-difference step */
#define GRADCHECK_SAMPLES 10 /* elements checked per tensor: largest gradients + random */
#define GRADCHECK_ZERO 1e-12 /* both norms below this: the tensor gets no gradient here */
#define GC_B 2
#define GC_T 6

static model_config_t small_config(void) {
    model_config_t c;
    qerr_t err;
    cr_assert(model_config_preset("tiny", &c, &err) == 0);
    c.dim = 32;
    c.num_layers = 2;
    c.num_heads = 4;
    c.context = 8;
    c.dropout = 0.1f;
    c.overseer_hidden = 8;
    c.num_mini_moes = 3;
    c.top_k_minis = 2;
    c.num_experts_per_mini = 3;
    c.top_k_experts = 2;
    c.expert_hidden = 32;
    c.num_micros_per_mini = 5;
    c.top_k_micros = 2;
    c.diffusion_layer = 0;
    c.diffusion_bits = 32;
    c.diffusion_width = 16;
    c.diffusion_blocks = 2;
    c.diffusion_ffn = 24;
    c.diffusion_time_dim = 8;
    c.diffusion_steps = 3;
    c.head_int8 = true; /* an INT8 head: identity in surrogate mode, like every quantizer */
    return c;
}

static double loss_at(model_t *m, const model_batch_t *b) {
    model_stats_t st;
    qerr_t err;
    model_params_changed(m);
    cr_assert(model_forward(m, b, &st, &err) == 0, "%s", err.msg);
    return st.loss;
}

Test(gradcheck, whole_model) {
    quant_surrogate_set(1);
    model_config_t cfg = small_config();
    qerr_t err;
    model_t *m = model_new(&cfg, &err);
    cr_assert(m, "%s", err.msg);
    const int L = cfg.num_layers, BT = GC_B * GC_T;

    int32_t tokens[GC_B * GC_T], targets[GC_B * GC_T];
    real weights[GC_B * GC_T];
    rng_stream_t rs;
    rng_stream_init(&rs, 1, 2, 3);
    for (int i = 0; i < BT; i++) {
        tokens[i] = (int32_t)(rng_stream_next_u64(&rs) % (uint64_t)cfg.vocab_size);
        targets[i] = (int32_t)(rng_stream_next_u64(&rs) % (uint64_t)cfg.vocab_size);
        weights[i] = (i % GC_T) < 2 ? 0 : 1; /* the first two positions are "prompt" */
    }
    model_batch_t b = {.B = GC_B,
                       .T = GC_T,
                       .tokens = tokens,
                       .targets = targets,
                       .weights = weights,
                       .training = 1,
                       .noise_key = 99,
                       .temperature = 0.8,
                       .aux_balance = 0.1,
                       .aux_z = 0.01,
                       .aux_diffusion = 0.2};

    /* Record the routing and the plan of a first forward, then replay them throughout. */
    cr_assert(model_forward(m, &b, NULL, &err) == 0, "%s", err.msg);
    moe_dims_t md;
    moe_dims_from_config(&md, model_config(m));
    moe_route_t *rec = calloc((size_t)L, sizeof *rec);
    for (int l = 0; l < L; l++) {
        const moe_route_t *r = model_route(m, l);
        cr_assert(moe_route_init(&rec[l], &md, BT, &err) == 0);
        rec[l].BT = r->BT;
        memcpy(rec[l].mini, r->mini, sizeof(int32_t) * (size_t)BT * md.KM);
        memcpy(rec[l].expert, r->expert, sizeof(int32_t) * (size_t)BT * md.KM * md.KE);
        memcpy(rec[l].micro, r->micro, sizeof(int32_t) * (size_t)BT * md.KM * md.KN);
    }
    const diffusion_plan_t *pr = model_plan_record(m);
    diffusion_plan_t plan;
    cr_assert(diffusion_plan_init(&plan, pr->Lb, BT, &err) == 0);
    plan.BT = pr->BT;
    memcpy(plan.z1, pr->z1, sizeof(uint64_t) * (size_t)BT * pr->Lw);
    memcpy(plan.z0, pr->z0, sizeof(uint64_t) * (size_t)BT * pr->Lw);
    b.replay = rec;
    b.plan_replay = &plan;

    model_stats_t st;
    model_grads_zero(m);
    cr_assert(model_forward(m, &b, &st, &err) == 0, "%s", err.msg);
    cr_assert(st.diffusion > 0 && st.balance > 0 && st.z > 0 && st.ce > 0);
    model_backward(m, NULL, NULL);
    const size_t n = model_num_reals(m);
    real *ga = malloc(n * sizeof *ga);
    memcpy(ga, model_grads(m), n * sizeof *ga);

    real *p = model_params(m);
    double worst = 0;
    const char *worst_name = "";
    int checked = 0;
    for (size_t ti = 0; ti < model_tensor_count(m); ti++) {
        const model_tensor_t *t = model_tensor(m, ti);
        if (t->kind == MODEL_PARAM_BUFFER)
            continue;
        /* Sample: the largest |g| half, the other half spread by a stream. */
        size_t idx[GRADCHECK_SAMPLES];
        int k = 0;
        const int ns = t->numel < GRADCHECK_SAMPLES ? (int)t->numel : GRADCHECK_SAMPLES;
        for (; k < ns / 2; k++) {
            size_t best = 0;
            double bv = -1;
            for (size_t i = 0; i < t->numel; i++) {
                int used = 0;
                for (int j = 0; j < k; j++)
                    used |= idx[j] == i;
                double v = fabs((double)ga[t->offset + i]);
                if (!used && v > bv) {
                    bv = v;
                    best = i;
                }
            }
            idx[k] = best;
        }
        rng_stream_t s;
        rng_stream_init(&s, 7, ti, 0);
        for (; k < ns; k++)
            idx[k] = (size_t)(rng_stream_next_u64(&s) % t->numel);
        double num = 0, na = 0, nn = 0;
        for (int j = 0; j < ns; j++) {
            const size_t i = t->offset + idx[j];
            const real keep = p[i];
            p[i] = keep + GRADCHECK_EPS;
            const double lp = loss_at(m, &b);
            p[i] = keep - GRADCHECK_EPS;
            const double lm = loss_at(m, &b);
            p[i] = keep;
            const double g = (lp - lm) / (2 * GRADCHECK_EPS);
            num += (g - ga[i]) * (g - ga[i]);
            na += (double)ga[i] * ga[i];
            nn += g * g;
        }
        const double den = fmax(sqrt(na), sqrt(nn));
        const double rel = den < GRADCHECK_ZERO ? 0 : sqrt(num) / den;
        if (den >= GRADCHECK_ZERO)
            checked++;
        if (rel > worst || worst_name[0] == '\0') {
            worst = rel;
            worst_name = t->name;
        }
        if (rel > GRADCHECK_TOL)
            printf("gradcheck: %-44s rel err %.3e  FAIL\n", t->name, rel);
    }
    printf("gradcheck: %d tensors with gradient checked; worst %s rel err %.3e (tol %.0e)\n",
           checked, worst_name, worst, GRADCHECK_TOL);
    cr_assert(checked > 40, "only %d tensors got a gradient", checked);
    cr_assert(worst <= GRADCHECK_TOL, "worst tensor %s: rel err %.3e > %.0e", worst_name, worst,
              GRADCHECK_TOL);

    free(ga);
    diffusion_plan_free(&plan);
    for (int l = 0; l < L; l++)
        moe_route_free(&rec[l]);
    free(rec);
    model_destroy(&m);
    quant_surrogate_set(0);
}
