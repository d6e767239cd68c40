/* Frozen (forward-only) models (common/model.h) on the tiny preset.
 *
 * - A frozen copy runs the forward of a full clone bit for bit, with and without head_int8:
 *   the own routing and diffusion plan (the learner's replay record), and under a replayed
 *   record of another model the log-probs, entropies, routing and greedy tokens. The source's
 *   balancing biases are taken as moved by model_balance_update (no refresh of its quantized
 *   copy), and a second freeze after an update replaces everything the forward reads (the
 *   diffusion stage's cached codes included).
 * - Loading latent FP32 weights fake-quantizes them as a full model's forward does; loading a
 *   frozen model's own weights round-trips them.
 * - What a frozen model cannot do: a forward before it has weights, with count_load, or with
 *   the diffusion training loss is an error naming why; backward, params_changed and
 *   model_params are bugs (abort). */
#include <criterion/criterion.h>

#include "model.h"
#include "moe.h"

#include <signal.h>
#include <stdlib.h>
#include <string.h>

#define NB 3  /* rows */
#define NT 12 /* positions */
#define NBT (NB * NT)
#define TEMPERATURE 0.9f
#define AUX_DIFFUSION 0.2f /* the learner's default RL weight */

typedef struct {
    int32_t tokens[NBT], targets[NBT];
    real weights[NBT];
} batch_data_t;

static void tiny(model_config_t *c, int head_int8) {
    qerr_t err = {0};
    cr_assert(model_config_preset("tiny", c, &err) == 0, "%s", err.msg);
    c->head_int8 = head_int8;
    cr_assert(model_config_validate(c, &err) == 0, "%s", err.msg);
}

static void batch_data(batch_data_t *d, const model_config_t *c, unsigned seed) {
    for (int i = 0; i < NBT; i++) {
        d->tokens[i] = (int32_t)((seed * 131u + (unsigned)i * 37u) % (unsigned)c->vocab_size);
        d->targets[i] = (int32_t)((seed * 17u + (unsigned)i * 53u) % (unsigned)c->vocab_size);
        d->weights[i] = i % NT < 3 ? 0 : 1; /* a prompt of 3 positions per row */
    }
}

static model_batch_t batch_of(const batch_data_t *d, int with_targets) {
    return (model_batch_t){.B = NB,
                           .T = NT,
                           .tokens = d->tokens,
                           .targets = with_targets ? d->targets : NULL,
                           .weights = d->weights,
                           .temperature = TEMPERATURE,
                           .aux_balance = 0.01f,
                           .aux_z = 0.001f};
}

static void forward(model_t *m, const model_batch_t *b, model_stats_t *st) {
    qerr_t err = {0};
    cr_assert(model_forward(m, b, st, &err) == 0, "model_forward: %s", err.msg);
}

/* Moves every trained weight by a deterministic amount, as an optimizer step would. */
static void perturb(model_t *m, unsigned seed) {
    real *p = model_params(m);
    for (size_t i = 0; i < model_tensor_count(m); i++) {
        const model_tensor_t *t = model_tensor(m, i);
        if (t->kind == MODEL_PARAM_BUFFER)
            continue;
        for (size_t j = 0; j < t->numel; j++)
            p[t->offset + j] += 0.004f * (real)((int)((j * 2654435761u + seed) % 201u) - 100) / 100;
    }
    model_params_changed(m);
}

static model_t *clone_of(model_t *src) {
    qerr_t err = {0};
    model_t *m = model_new(model_config(src), &err);
    cr_assert(m, "%s", err.msg);
    memcpy(model_params(m), model_params_const(src), model_num_reals(src) * sizeof(real));
    model_params_changed(m);
    return m;
}

/* A deep copy of a model's last routing and plan, to replay into others. */
typedef struct {
    moe_route_t r[16];
    diffusion_plan_t plan;
    int L;
} record_t;

static void record_take(record_t *rec, const model_t *m) {
    const model_config_t *c = model_config(m);
    moe_dims_t d;
    moe_dims_from_config(&d, c);
    qerr_t err = {0};
    rec->L = c->num_layers;
    cr_assert(rec->L <= 16);
    for (int l = 0; l < rec->L; l++) {
        const moe_route_t *own = model_route(m, l);
        cr_assert(moe_route_init(&rec->r[l], &d, NBT, &err) == 0, "%s", err.msg);
        rec->r[l].BT = NBT;
        memcpy(rec->r[l].mini, own->mini, (size_t)NBT * d.KM * sizeof(int32_t));
        memcpy(rec->r[l].expert, own->expert, (size_t)NBT * d.KM * d.KE * sizeof(int32_t));
        memcpy(rec->r[l].micro, own->micro, (size_t)NBT * d.KM * d.KN * sizeof(int32_t));
    }
    const diffusion_plan_t *p = model_plan_record(m);
    cr_assert(diffusion_plan_init(&rec->plan, c->diffusion_bits, NBT, &err) == 0, "%s", err.msg);
    rec->plan.BT = NBT;
    memcpy(rec->plan.z1, p->z1, (size_t)NBT * p->Lw * sizeof(uint64_t));
    memcpy(rec->plan.z0, p->z0, (size_t)NBT * p->Lw * sizeof(uint64_t));
}

static void record_free(record_t *rec) {
    for (int l = 0; l < rec->L; l++)
        moe_route_free(&rec->r[l]);
    diffusion_plan_free(&rec->plan);
}

/* 1 when a's and b's last forwards routed and planned alike. */
static int same_routing(const model_t *a, const model_t *b) {
    const model_config_t *c = model_config(a);
    moe_dims_t d;
    moe_dims_from_config(&d, c);
    for (int l = 0; l < c->num_layers; l++) {
        const moe_route_t *ra = model_route(a, l), *rb = model_route(b, l);
        if (memcmp(ra->mini, rb->mini, (size_t)NBT * d.KM * sizeof(int32_t)) ||
            memcmp(ra->expert, rb->expert, (size_t)NBT * d.KM * d.KE * sizeof(int32_t)) ||
            memcmp(ra->micro, rb->micro, (size_t)NBT * d.KM * d.KN * sizeof(int32_t)))
            return 0;
    }
    const diffusion_plan_t *pa = model_plan_record(a), *pb = model_plan_record(b);
    return memcmp(pa->z1, pb->z1, (size_t)NBT * pa->Lw * sizeof(uint64_t)) == 0 &&
           memcmp(pa->z0, pb->z0, (size_t)NBT * pa->Lw * sizeof(uint64_t)) == 0;
}

/* The learner's two forwards of the old policy, on the clone and on the frozen copy: the own
 * routing (the replay record), then the log-probs under a replayed record `rec` of another
 * model. The clone runs the diffusion loss as the learner did before its old policy was
 * frozen; the log-probs must not depend on it. */
static void expect_same_forward(model_t *clone, model_t *fz, const batch_data_t *d,
                                const record_t *rec) {
    model_batch_t own = batch_of(d, 0);
    forward(clone, &own, NULL);
    forward(fz, &own, NULL);
    cr_expect(same_routing(clone, fz), "own routing / plan differ");

    model_batch_t full = batch_of(d, 1);
    full.replay = rec->r;
    full.plan_replay = &rec->plan;
    model_batch_t frozen = full;
    full.aux_diffusion = AUX_DIFFUSION;
    model_stats_t sc, sf;
    forward(clone, &full, &sc);
    forward(fz, &frozen, &sf);
    cr_expect(sc.mismatches > 0, "the record replays choices of its own");
    cr_expect_eq(sc.mismatches, sf.mismatches);
    cr_expect_eq(sc.plan_mismatches, sf.plan_mismatches);
    cr_expect_eq(sc.ce, sf.ce, "ce %.17g vs %.17g", sc.ce, sf.ce);
    cr_expect(memcmp(model_logp(clone), model_logp(fz), NBT * sizeof(real)) == 0,
              "log-probs differ");
    cr_expect(memcmp(model_entropy(clone), model_entropy(fz), NBT * sizeof(real)) == 0,
              "entropies differ");
    cr_expect(same_routing(clone, fz), "replayed routing differs");

    int pos[NB];
    int32_t gc[NB], gf[NB];
    for (int b = 0; b < NB; b++)
        pos[b] = NT - 1 - b;
    qerr_t err = {0};
    cr_assert(model_greedy(clone, d->tokens, NB, NT, pos, gc, &err) == 0, "%s", err.msg);
    cr_assert(model_greedy(fz, d->tokens, NB, NT, pos, gf, &err) == 0, "%s", err.msg);
    cr_expect(memcmp(gc, gf, sizeof gc) == 0, "greedy tokens differ");
}

static void frozen_equals_clone(int head_int8) {
    model_config_t c;
    tiny(&c, head_int8);
    qerr_t err = {0};
    model_t *other = model_new(&c, &err), *m = model_new(&c, &err);
    model_t *fz = model_new_frozen(&c, &err);
    cr_assert(other && m && fz, "%s", err.msg);
    cr_expect(model_is_frozen(fz) && !model_is_frozen(m));
    batch_data_t d1, d2;
    batch_data(&d1, &c, 1);
    batch_data(&d2, &c, 2);

    /* The record to replay: another model's own routing (its initial weights). */
    model_batch_t own = batch_of(&d1, 0);
    forward(other, &own, NULL);
    record_t rec;
    record_take(&rec, other);

    /* m trains: a weight update, a counted forward, then the loss-free balancing moves its
     * biases without a refresh of its quantized copy. */
    perturb(m, 7);
    model_batch_t counted = batch_of(&d2, 1);
    counted.count_load = 1;
    forward(m, &counted, NULL);
    model_balance_update(m, 1);
    const model_tensor_t *bias = model_tensor_find(m, "layers.0.overseer.gate.bias_balance");
    cr_assert(bias);
    int moved = 0;
    for (size_t i = 0; i < bias->numel; i++)
        moved |= model_params_const(m)[bias->offset + i] != 0;
    cr_assert(moved, "the balancing update moved no bias");

    model_t *clone = clone_of(m);
    model_freeze_from(fz, m);
    expect_same_forward(clone, fz, &d1, &rec);
    model_destroy(&clone);

    /* Another update, frozen again into the same model: every weight it reads is replaced. */
    perturb(m, 11);
    clone = clone_of(m);
    model_freeze_from(fz, m);
    expect_same_forward(clone, fz, &d1, &rec);

    /* The source's forward is unchanged by the freeze (its refreshed copy is the one it uses). */
    model_batch_t full = batch_of(&d1, 1);
    forward(m, &full, NULL);
    forward(clone, &full, NULL);
    cr_expect(memcmp(model_logp(clone), model_logp(m), NBT * sizeof(real)) == 0);

    record_free(&rec);
    model_destroy(&clone);
    model_destroy(&fz);
    model_destroy(&m);
    model_destroy(&other);
    cr_expect_null(fz);
}

Test(frozen, forward_equals_full_clone) {
    frozen_equals_clone(0);
}

Test(frozen, forward_equals_full_clone_head_int8) {
    frozen_equals_clone(1);
}

Test(frozen, loads_latent_and_own_weights) {
    model_config_t c;
    tiny(&c, 1);
    qerr_t err = {0};
    model_t *m = model_new(&c, &err), *a = model_new_frozen(&c, &err);
    model_t *b = model_new_frozen(&c, &err), *r = model_new_frozen(&c, &err);
    cr_assert(m && a && b && r, "%s", err.msg);
    cr_expect_null(model_frozen_weights(a), "weights before any were given");
    perturb(m, 3);
    model_params(m)[model_tensor_find(m, "layers.1.minis.0.router.bias_balance")->offset] = 0.5f;
    model_freeze_from(a, m);
    model_frozen_load_latent(b, model_params_const(m));
    const size_t n = model_num_reals(m);
    cr_expect(memcmp(model_frozen_weights(a), model_frozen_weights(b), n * sizeof(real)) == 0,
              "latent weights load other values than a freeze of the same weights");
    /* The load quantized: the quantized tensors no longer hold the latent values. */
    const model_tensor_t *h = model_tensor_find(m, "head.weight");
    cr_expect(memcmp(model_frozen_weights(b) + h->offset, model_params_const(m) + h->offset,
                     h->numel * sizeof(real)) != 0,
              "the INT8 head was not quantized");
    model_frozen_load(r, model_frozen_weights(a));
    cr_expect(memcmp(model_frozen_weights(a), model_frozen_weights(r), n * sizeof(real)) == 0);

    batch_data_t d;
    batch_data(&d, &c, 5);
    model_batch_t full = batch_of(&d, 1);
    forward(m, &full, NULL);
    forward(r, &full, NULL);
    cr_expect(memcmp(model_logp(m), model_logp(r), NBT * sizeof(real)) == 0);
    model_destroy(&m);
    model_destroy(&a);
    model_destroy(&b);
    model_destroy(&r);
}

Test(frozen, refuses_what_needs_latent_weights) {
    model_config_t c;
    tiny(&c, 0);
    qerr_t err = {0};
    model_t *m = model_new(&c, &err), *fz = model_new_frozen(&c, &err);
    cr_assert(m && fz, "%s", err.msg);
    batch_data_t d;
    batch_data(&d, &c, 9);
    model_batch_t b = batch_of(&d, 1);
    cr_expect(model_forward(fz, &b, NULL, &err) == -1);
    cr_expect(err.code == QERR_INVALID && strstr(err.msg, "no weights"), "%s", err.msg);

    model_freeze_from(fz, m);
    b.count_load = 1;
    cr_expect(model_forward(fz, &b, NULL, &err) == -1);
    cr_expect(strstr(err.msg, "count_load") != NULL, "%s", err.msg);
    b.count_load = 0;
    b.aux_diffusion = AUX_DIFFUSION;
    cr_expect(model_forward(fz, &b, NULL, &err) == -1);
    cr_expect(strstr(err.msg, "aux_diffusion") != NULL, "%s", err.msg);
    /* Without targets there is no loss to run: accepted. */
    b.targets = NULL;
    cr_expect(model_forward(fz, &b, NULL, &err) == 0, "%s", err.msg);
    model_destroy(&m);
    model_destroy(&fz);
}

/* A forward that a backward could follow, on a frozen copy of a fresh model. */
static model_t *frozen_after_forward(void) {
    model_config_t c;
    tiny(&c, 0);
    qerr_t err = {0};
    model_t *m = model_new(&c, &err), *fz = model_new_frozen(&c, &err);
    cr_assert(m && fz, "%s", err.msg);
    model_freeze_from(fz, m);
    model_destroy(&m);
    static batch_data_t d;
    batch_data(&d, &c, 4);
    model_batch_t b = batch_of(&d, 1);
    forward(fz, &b, NULL);
    return fz;
}

Test(frozen, backward_is_a_bug, .signal = SIGABRT) {
    model_t *fz = frozen_after_forward();
    model_backward(fz, NULL, NULL);
}

Test(frozen, params_changed_is_a_bug, .signal = SIGABRT) {
    model_t *fz = frozen_after_forward();
    model_params_changed(fz);
}

Test(frozen, latent_params_are_a_bug, .signal = SIGABRT) {
    model_t *fz = frozen_after_forward();
    (void)model_params(fz);
}
