/* AdamW: schedule, decoupled decay on matrices only, buffers untouched, clipping, skipping. */
#include "qtest.h"

#include "model.h"
#include "optimizer.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

static model_t *small_model(void) {
    model_config_t c;
    qerr_t err;
    cr_assert(model_config_preset("tiny", &c, &err) == 0);
    c.dim = 32;
    c.num_heads = 2;
    c.expert_hidden = 32;
    c.diffusion_width = 16;
    c.diffusion_ffn = 16;
    c.diffusion_time_dim = 8;
    model_t *m = model_new(&c, &err);
    cr_assert(m, "%s", err.msg);
    return m;
}

Test(optimizer, schedule) {
    optim_config_t c;
    optim_config_default(&c);
    c.lr = 1.0;
    c.warmup_steps = 4;
    c.total_steps = 14;
    cr_assert_float_eq(optim_lr_at(&c, 0), 0.25, 1e-12);
    cr_assert_float_eq(optim_lr_at(&c, 3), 1.0, 1e-12);
    cr_assert_float_eq(optim_lr_at(&c, 100), 1.0, 1e-12);
    c.schedule = OPTIM_LR_COSINE;
    cr_assert_float_eq(optim_lr_at(&c, 4), 1.0, 1e-12);
    cr_assert_float_eq(optim_lr_at(&c, 9), 0.5, 1e-12);
    cr_assert_float_eq(optim_lr_at(&c, 14), 0.0, 1e-12);
    cr_assert_float_eq(optim_lr_at(&c, 20), 0.0, 1e-12);
}

Test(optimizer, decay_only_on_matrices_and_skip_non_finite) {
    model_t *m = small_model();
    optim_config_t c;
    optim_config_default(&c);
    c.lr = 0.1;
    c.weight_decay = 0.5;
    qerr_t err;
    optim_t *o = optim_new(&c, m, &err);
    cr_assert(o, "%s", err.msg);
    const size_t n = model_num_reals(m);
    real *before = malloc(n * sizeof *before);
    real *p = model_params(m);
    /* Make the balancing biases non-zero so an update would show. */
    const model_tensor_t *bias = model_tensor_find(m, "layers.0.overseer.gate.bias_balance");
    cr_assert(bias);
    p[bias->offset] = 0.5f;
    memcpy(before, p, n * sizeof *before);
    model_grads_zero(m); /* zero gradients: only the decay moves anything */
    optim_result_t r;
    cr_assert(optim_step(o, m, 1.0, &r) == 1);
    for (size_t i = 0; i < model_tensor_count(m); i++) {
        const model_tensor_t *t = model_tensor(m, i);
        for (size_t k = 0; k < t->numel; k++) {
            const real want = t->kind == MODEL_PARAM_MATRIX
                                  ? before[t->offset + k] * (real)(1 - c.lr * c.weight_decay)
                                  : before[t->offset + k];
            cr_assert(p[t->offset + k] == want, "%s[%zu]: %g, want %g", t->name, k,
                      (double)p[t->offset + k], (double)want);
        }
    }
    /* A non-finite gradient skips the step: nothing changes but the counter. */
    memcpy(before, p, n * sizeof *before);
    model_grads(m)[model_tensor_find(m, "head.weight")->offset] = NAN;
    cr_assert(optim_step(o, m, 1.0, &r) == 0);
    cr_assert(memcmp(before, p, n * sizeof *before) == 0);
    cr_assert_eq(optim_skipped(o), 1);
    cr_assert_eq(optim_steps(o), 1);
    model_grads_zero(m);
    cr_assert(optim_step(o, m, INFINITY, &r) == 0);
    cr_assert_eq(optim_skipped(o), 2);
    free(before);
    optim_destroy(&o);
    model_destroy(&m);
}

Test(optimizer, clipping_bounds_the_first_step) {
    model_t *m = small_model();
    optim_config_t c;
    optim_config_default(&c);
    c.lr = 0.01;
    c.weight_decay = 0;
    c.grad_clip = 1.0;
    qerr_t err;
    optim_t *o = optim_new(&c, m, &err);
    model_grads_zero(m);
    const model_tensor_t *t = model_tensor_find(m, "embed.weight");
    model_grads(m)[t->offset] = 30;
    model_grads(m)[t->offset + 1] = 40;
    const real p0 = model_params(m)[t->offset];
    optim_result_t r;
    cr_assert(optim_step(o, m, 0.5, &r) == 1);
    cr_assert_float_eq(r.grad_norm, 50.0, 1e-9);
    /* Adam's first step moves each element by lr (sign of its gradient), clipped or not;
     * the first moment shows the clip: m = (1 - beta1) * g * 1/50. */
    cr_assert_float_eq((double)model_params(m)[t->offset], (double)p0 - 0.01, 1e-6);
    cr_assert_float_eq((double)optim_m(o)[t->offset], 0.1 * 30 / 50, 1e-6);
    optim_destroy(&o);
    model_destroy(&m);
}
