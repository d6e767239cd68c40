/* The RL learner in process (learner/learner.h), no sockets: hand-made groups on the tiny preset.
 *
 * - A step at lr 0 leaves the next snapshot's bytes identical, and the importance ratios and
 *   sampler mismatch of the next batch equal those of a learner that never took that step; at
 *   lr > 0 the snapshot changes (so the comparison can fail).
 * - The first step of a batch sees the old policy equal to the current one: ratio 1, KL 0.
 * - A batch without a policy-gradient token is skipped and counted; the weights stay.
 * - A non-finite loss is skipped and counted; the weights stay.
 * - old_logprobs behaviour: no mismatch, TIS weight 1; kl.beta > 0: KL 0 to the starting
 *   policy before the first update, > 0 after.
 * - Routing records equal to the learner's own routing give the same numbers as no records
 *   (so the record of completion token j is replayed at position prompt_len - 1 + j); a
 *   malformed record is refused and nothing is kept.
 * - A checkpoint restores step, versions, snapshot bytes, the dispatcher's bytes and the waiting
 *   groups, and the restored learner's next batch is bit-identical to the original's.
 * - The frozen old policy runs the current policy's forward: with head_int8 and replayed
 *   routing records the first step of every batch has ratio 1 and KL 0, after updates too.
 * - A checkpoint whose state holds the old policy and the reference as latent FP32 weights
 *   ("old_params" / "ref_params", written before they were frozen models) resumes to the same
 *   old and reference log-probs as the original run and a resume of the current form. */
#include <criterion/criterion.h>

#include "learner.h"
#include "log.h"
#include "model.h"
#include "moe.h"
#include "safetensors.h"
#include "tokenizer.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define G 4        /* samples per group */
#define PLEN 5     /* BOS + 4 prompt bytes */
#define MAX_LEN 8  /* completion tokens at most */
#define MAX_NEW 8  /* rollout.max_new_tokens */
#define CONTEXT 32 /* model.context */

static void set(quillan_config_t *cfg, const char *a) {
    qerr_t err = {0};
    cr_assert(config_set(cfg, a, &err) == 0, "%s: %s", a, err.msg);
}

static void tiny_config(quillan_config_t *cfg, const char *lr, const char *ckpt_dir) {
    config_defaults(cfg);
    set(cfg, "learner.mode=rl");
    set(cfg, "model.context=32");
    set(cfg, "rollout.max_new_tokens=8");
    set(cfg, "learner.batch_groups=2");
    set(cfg, "learner.group_size=4");
    set(cfg, "learner.minibatches=2");
    set(cfg, "learner.threads=1");
    set(cfg, "learner.warmup_steps=0");
    set(cfg, "learner.total_steps=100");
    char buf[512];
    snprintf(buf, sizeof buf, "learner.lr=%s", lr);
    set(cfg, buf);
    snprintf(buf, sizeof buf, "learner.checkpoint_dir=%s", ckpt_dir ? ckpt_dir : "/nonexistent");
    set(cfg, buf);
    qerr_t err = {0};
    cr_assert(config_validate(cfg, &err) == 0, "%s", err.msg);
}

static learner_t *make(const quillan_config_t *cfg, const char *resume) {
    qerr_t err = {0};
    learner_t *l = learner_new(cfg, resume, &err);
    cr_assert(l, "learner_new: %s", err.msg);
    return l;
}

/* A hand-made group: deterministic tokens and behaviour log-probs from `seed`; rewards 0/1 by
 * sample parity (or all `equal_reward` when >= 0). */
typedef struct {
    int32_t prompt[PLEN];
    int32_t tokens[G][MAX_LEN];
    float logp[G][MAX_LEN];
    batcher_sample_t s[G];
    batcher_group_in_t g;
} hgroup_t;

static void hgroup(hgroup_t *h, uint64_t id, int64_t version, unsigned seed, double equal_reward) {
    h->prompt[0] = 256; /* BOS */
    for (int t = 1; t < PLEN; t++)
        h->prompt[t] = (int32_t)('0' + (seed * 7 + (unsigned)t * 3) % 10);
    for (int i = 0; i < G; i++) {
        const int len = 3 + (int)((seed + (unsigned)i) % (MAX_LEN - 3));
        for (int j = 0; j < len; j++) {
            h->tokens[i][j] = (int32_t)((seed * 31 + (unsigned)i * 17 + (unsigned)j * 5) % 256);
            h->logp[i][j] = -1.0f - 0.25f * (float)((seed + (unsigned)i + (unsigned)j) % 7);
        }
        h->s[i] = (batcher_sample_t){.tokens = h->tokens[i],
                                     .logp = h->logp[i],
                                     .len = len,
                                     .has_reward = 1,
                                     .reward = equal_reward >= 0 ? equal_reward : (double)(i % 2)};
    }
    h->g = (batcher_group_in_t){.group_id = id,
                                .version = version,
                                .prompt = h->prompt,
                                .prompt_len = PLEN,
                                .samples = h->s,
                                .n_samples = G};
}

static void add(learner_t *l, uint64_t id, int64_t version, unsigned seed, double equal_reward,
                const learner_route_in_t *routes) {
    hgroup_t h;
    hgroup(&h, id, version, seed, equal_reward);
    batcher_verdict_t v;
    qerr_t err = {0};
    cr_assert(learner_add_group(l, &h.g, routes, &v, &err) == 0, "%s", err.msg);
    cr_assert_eq(v, BATCHER_ACCEPTED);
}

static void train(learner_t *l, learner_train_result_t *res) {
    qerr_t err = {0};
    cr_assert_eq(learner_train(l, NULL, res, &err), 1, "learner_train: %s", err.msg);
}

static uint8_t *snapshot_copy(learner_t *l, uint64_t version, size_t *len) {
    snapshot_entry_t *e = snapshot_store_get(learner_store(l), version);
    cr_assert(e, "snapshot v%llu missing", (unsigned long long)version);
    const uint8_t *d = snapshot_entry_data(e, len);
    uint8_t *c = malloc(*len);
    memcpy(c, d, *len);
    snapshot_entry_unref(&e);
    return c;
}

/* 1 when two snapshots hold the same tensor bytes: equal safetensors headers but for the
 * version in the metadata, so the data sections (after the 8-byte length and the header) are
 * compared. */
static int same_tensors(const uint8_t *a, size_t na, const uint8_t *b, size_t nb) {
    uint64_t ha, hb;
    memcpy(&ha, a, 8);
    memcpy(&hb, b, 8);
    cr_assert(ha < na && hb < nb);
    return na - ha == nb - hb && memcmp(a + 8 + ha, b + 8 + hb, na - 8 - ha) == 0;
}

static real *params_copy(learner_t *l) {
    model_t *m = learner_model(l);
    const size_t n = model_num_reals(m);
    real *p = malloc(n * sizeof *p);
    memcpy(p, model_params_const(m), n * sizeof *p);
    return p;
}

static void expect_same_mismatch(const dapo_metrics_t *a, const dapo_metrics_t *b) {
    cr_expect_eq(a->ratio_mean, b->ratio_mean, "ratio_mean %.17g vs %.17g", a->ratio_mean,
                 b->ratio_mean);
    cr_expect_eq(a->approx_kl, b->approx_kl);
    cr_expect_eq(a->mismatch_kl, b->mismatch_kl, "mismatch/kl %.17g vs %.17g", a->mismatch_kl,
                 b->mismatch_kl);
    cr_expect_eq(a->is_min, b->is_min);
    cr_expect_eq(a->is_max, b->is_max);
    cr_expect_eq(a->tis_mean_weight, b->tis_mean_weight);
    cr_expect_eq(a->pg, b->pg);
}

static void quiet(void) {
    log_init("test_learner");
    log_set_stderr(0);
}

Test(learner, lr0_step_changes_nothing, .init = quiet) {
    quillan_config_t *cfg = malloc(sizeof *cfg);
    tiny_config(cfg, "0", NULL);
    learner_t *a = make(cfg, NULL), *b = make(cfg, NULL);
    cr_assert_eq(learner_version(a), 1);

    add(a, 1, 1, 11, -1, NULL);
    add(a, 2, 1, 12, -1, NULL);
    learner_train_result_t r;
    train(a, &r);
    cr_assert_eq(r.steps, 2); /* minibatches 2, one epoch */
    cr_assert_eq(r.applied, 2);
    cr_assert_eq(r.published, 1); /* sync_interval = minibatches x epochs */
    cr_assert_eq(learner_version(a), 2);
    /* Old policy == current policy before the first update: ratio 1, no KL. */
    cr_expect_eq(r.first.ratio_mean, 1.0);
    cr_expect_eq(r.first.approx_kl, 0.0);
    cr_expect_eq(r.first.clipfrac_low + r.first.clipfrac_high, 0.0);
    cr_expect(r.first.pg_tokens > 0);

    size_t n1, n2;
    uint8_t *s1 = snapshot_copy(a, 1, &n1), *s2 = snapshot_copy(a, 2, &n2);
    cr_expect(same_tensors(s1, n1, s2, n2), "snapshot bytes changed at lr 0");

    /* The next batch: the same groups in both learners (b never took the lr-0 step). */
    add(a, 3, 1, 21, -1, NULL);
    add(a, 4, 1, 22, -1, NULL);
    add(b, 3, 1, 21, -1, NULL);
    add(b, 4, 1, 22, -1, NULL);
    learner_train_result_t ra, rb;
    train(a, &ra);
    train(b, &rb);
    expect_same_mismatch(&ra.first, &rb.first);
    expect_same_mismatch(&ra.last, &rb.last);
    cr_expect(rb.first.mismatch_kl > 0, "hand-made behaviour log-probs differ from the policy's");
    free(s1);
    free(s2);
    learner_destroy(&a);
    learner_destroy(&b);
    cr_assert_null(a);

    /* At lr > 0 the same step changes the snapshot: the comparison above can fail. */
    tiny_config(cfg, "1e-2", NULL);
    learner_t *c = make(cfg, NULL);
    add(c, 1, 1, 11, -1, NULL);
    add(c, 2, 1, 12, -1, NULL);
    train(c, &r);
    s1 = snapshot_copy(c, 1, &n1);
    s2 = snapshot_copy(c, 2, &n2);
    cr_expect(!same_tensors(s1, n1, s2, n2), "an lr 1e-2 step changed no snapshot byte");
    free(s1);
    free(s2);
    learner_destroy(&c);
    free(cfg);
}

Test(learner, no_policy_gradient_is_skipped, .init = quiet) {
    quillan_config_t *cfg = malloc(sizeof *cfg);
    tiny_config(cfg, "1e-2", NULL);
    set(cfg, "learner.dynamic_sampling=false");
    set(cfg, "learner.overlong.enabled=false"); /* shaping would make the rewards differ */
    learner_t *l = make(cfg, NULL);
    real *before = params_copy(l);
    add(l, 1, 1, 5, 1.0, NULL); /* every reward equal: A = 0 everywhere */
    add(l, 2, 1, 6, 0.0, NULL);
    learner_train_result_t r;
    train(l, &r);
    cr_expect_eq(r.steps, 2);
    cr_expect_eq(r.skipped_no_pg, 2);
    cr_expect_eq(r.applied, 0);
    cr_expect_eq(r.first.pg_tokens, 0);
    cr_expect(r.first.tokens > 0);
    const model_t *m = learner_model(l);
    cr_expect(memcmp(before, model_params_const(m), model_num_reals(m) * sizeof(real)) == 0,
              "a skipped step changed the weights");
    free(before);
    learner_destroy(&l);
    free(cfg);
}

Test(learner, nonfinite_loss_is_skipped, .init = quiet) {
    quillan_config_t *cfg = malloc(sizeof *cfg);
    tiny_config(cfg, "1e-2", NULL);
    set(cfg, "learner.sync_interval=1000"); /* a NaN weight cannot be quantized */
    set(cfg, "learner.total_steps=1000");
    learner_t *l = make(cfg, NULL);
    model_t *m = learner_model(l);
    const model_tensor_t *h = model_tensor_find(m, "head.weight");
    cr_assert(h);
    model_params(m)[h->offset] = NAN;
    model_params_changed(m);
    real *before = params_copy(l);
    add(l, 1, 1, 5, -1, NULL);
    add(l, 2, 1, 6, -1, NULL);
    learner_train_result_t r;
    train(l, &r);
    cr_expect_eq(r.steps, 2);
    cr_expect_eq(r.skipped_nonfinite, 2);
    cr_expect_eq(r.applied, 0);
    cr_expect(!isfinite(r.first.loss));
    for (size_t i = 0; i < model_num_reals(m); i++)
        if (i != h->offset)
            cr_assert_eq(before[i], model_params_const(m)[i], "weight %zu changed", i);
    free(before);
    learner_destroy(&l);
    free(cfg);
}

/* Routing records of a hand-made group taken from the policy's own forward, in the dispatch
 * protocol's layout: token j's record is position prompt_len - 1 + j of the sequence. */
typedef struct {
    uint32_t *minis[G], *experts[G], *micros[G];
    uint64_t *plan[G];
    learner_route_in_t r[G];
} hroutes_t;

static void own_routes(hroutes_t *hr, learner_t *l, const hgroup_t *h) {
    model_t *m = learner_model(l);
    const model_config_t *c = model_config(m);
    moe_dims_t d;
    moe_dims_from_config(&d, c);
    const int L = c->num_layers, Lw = (c->diffusion_bits + 63) / 64;
    for (int i = 0; i < G; i++) {
        const int n = h->s[i].len, T = PLEN + n - 1;
        int32_t tok[CONTEXT];
        memcpy(tok, h->prompt, sizeof h->prompt);
        memcpy(tok + PLEN, h->tokens[i], (size_t)(n - 1) * sizeof *tok);
        model_batch_t mb = {.B = 1, .T = T, .tokens = tok, .temperature = 1};
        qerr_t err = {0};
        cr_assert(model_forward(m, &mb, NULL, &err) == 0, "%s", err.msg);
        hr->minis[i] = malloc((size_t)n * L * d.KM * sizeof(uint32_t));
        hr->experts[i] = malloc((size_t)n * L * d.KM * d.KE * sizeof(uint32_t));
        hr->micros[i] = malloc((size_t)n * L * d.KM * d.KN * sizeof(uint32_t));
        hr->plan[i] = malloc((size_t)n * Lw * sizeof(uint64_t));
        for (int j = 0; j < n; j++) {
            const int pos = PLEN - 1 + j;
            for (int ly = 0; ly < L; ly++) {
                const moe_route_t *r = model_route(m, ly);
                const size_t row = (size_t)j * L + ly;
                for (int k = 0; k < d.KM; k++)
                    hr->minis[i][row * d.KM + k] = (uint32_t)r->mini[pos * d.KM + k];
                for (int k = 0; k < d.KM * d.KE; k++)
                    hr->experts[i][row * d.KM * d.KE + k] =
                        (uint32_t)r->expert[pos * d.KM * d.KE + k];
                for (int k = 0; k < d.KM * d.KN; k++)
                    hr->micros[i][row * d.KM * d.KN + k] =
                        (uint32_t)r->micro[pos * d.KM * d.KN + k];
            }
            memcpy(hr->plan[i] + (size_t)j * Lw, model_plan_record(m)->z0 + (size_t)pos * Lw,
                   (size_t)Lw * sizeof(uint64_t));
        }
        hr->r[i] = (learner_route_in_t){.minis = hr->minis[i],
                                        .experts = hr->experts[i],
                                        .micros = hr->micros[i],
                                        .plan = hr->plan[i]};
    }
}

static void hroutes_free(hroutes_t *hr) {
    for (int i = 0; i < G; i++) {
        free(hr->minis[i]);
        free(hr->experts[i]);
        free(hr->micros[i]);
        free(hr->plan[i]);
    }
}

Test(learner, routing_records_replayed_at_their_positions, .init = quiet) {
    quillan_config_t *cfg = malloc(sizeof *cfg);
    tiny_config(cfg, "0", NULL); /* the policy stays, so its own routing stays the record's */
    learner_t *a = make(cfg, NULL), *b = make(cfg, NULL);
    hgroup_t h1, h2;
    hgroup(&h1, 1, 1, 31, -1);
    hgroup(&h2, 2, 1, 32, -1);
    hroutes_t r1, r2;
    own_routes(&r1, a, &h1);
    own_routes(&r2, a, &h2);

    /* A malformed record (a mini index repeated) is refused, and nothing is kept. */
    batcher_verdict_t v;
    qerr_t err = {0};
    const uint32_t saved = r1.minis[0][1];
    r1.minis[0][1] = r1.minis[0][0];
    cr_expect(learner_add_group(a, &h1.g, r1.r, &v, &err) == -1);
    cr_expect(strstr(err.msg, "routing record") != NULL, "%s", err.msg);
    cr_expect_eq(learner_waiting(a), 0);
    r1.minis[0][1] = saved;

    cr_assert(learner_add_group(a, &h1.g, r1.r, &v, &err) == 0, "%s", err.msg);
    cr_assert(learner_add_group(a, &h2.g, r2.r, &v, &err) == 0, "%s", err.msg);
    add(b, 1, 1, 31, -1, NULL);
    add(b, 2, 1, 32, -1, NULL);
    learner_train_result_t ra, rb;
    train(a, &ra);
    train(b, &rb);
    cr_expect_eq(ra.routing_mismatch_frac, 0.0);
    expect_same_mismatch(&ra.first, &rb.first);
    expect_same_mismatch(&ra.last, &rb.last);
    hroutes_free(&r1);
    hroutes_free(&r2);
    learner_destroy(&a);
    learner_destroy(&b);
    free(cfg);
}

Test(learner, checkpoint_resume_continues_exactly, .init = quiet) {
    char dir[] = "/tmp/quillan_learner_XXXXXX";
    cr_assert(mkdtemp(dir));
    quillan_config_t *cfg = malloc(sizeof *cfg);
    tiny_config(cfg, "1e-2", dir);
    learner_t *a = make(cfg, NULL);
    add(a, 1, 1, 41, -1, NULL);
    add(a, 2, 1, 42, -1, NULL);
    learner_train_result_t r;
    train(a, &r);
    cr_assert_eq(learner_version(a), 2);
    add(a, 3, 2, 43, -1, NULL); /* waiting at the checkpoint */

    const uint8_t disp[] = "dispatcher state bytes";
    uint8_t *bs;
    size_t blen;
    qerr_t err = {0};
    cr_assert(learner_batcher_save(a, &bs, &blen, &err) == 0, "%s", err.msg);
    char out[4096];
    cr_assert(learner_checkpoint(a, disp, sizeof disp, bs, blen, out, sizeof out, &err) == 0, "%s",
              err.msg);
    free(bs);
    cr_expect(strstr(out, "step-00000002") != NULL, "%s", out);

    learner_t *b = make(cfg, "auto");
    cr_expect_eq(learner_steps(b), learner_steps(a));
    cr_expect_eq(learner_version(b), 2);
    cr_expect_eq(learner_old_version(b), 2);
    cr_expect_eq(learner_waiting(b), 1);
    size_t dlen;
    const uint8_t *d = learner_dispatcher_state(b, &dlen);
    cr_expect(dlen == sizeof disp && memcmp(d, disp, dlen) == 0);
    size_t na, nb;
    uint8_t *sa = snapshot_copy(a, 2, &na), *sb = snapshot_copy(b, 2, &nb);
    cr_expect(na == nb && memcmp(sa, sb, na) == 0, "the resumed learner republished other bytes");
    free(sa);
    free(sb);

    /* Both continue with the same group: bit-identical steps. */
    add(a, 4, 2, 44, -1, NULL);
    add(b, 4, 2, 44, -1, NULL);
    learner_train_result_t ra, rb;
    train(a, &ra);
    train(b, &rb);
    expect_same_mismatch(&ra.first, &rb.first);
    expect_same_mismatch(&ra.last, &rb.last);
    const model_t *ma = learner_model(a), *mb = learner_model(b);
    cr_expect(memcmp(model_params_const(ma), model_params_const(mb),
                     model_num_reals(ma) * sizeof(real)) == 0,
              "weights differ after the same step");
    learner_destroy(&a);
    learner_destroy(&b);

    /* A resume path that holds no checkpoint is an error naming it; "auto" starts fresh. */
    cr_expect_null(learner_new(cfg, "/nonexistent/ckpt", &err));
    tiny_config(cfg, "1e-2", "/tmp/quillan_learner_none");
    learner_t *c = make(cfg, "auto");
    cr_expect_eq(learner_steps(c), 0);
    cr_expect_eq(learner_version(c), 1);
    learner_destroy(&c);
    free(cfg);
    char cmd[256];
    snprintf(cmd, sizeof cmd, "rm -rf %s", dir);
    cr_expect(system(cmd) == 0);
}

Test(learner, behaviour_logprobs_as_old_policy, .init = quiet) {
    quillan_config_t *cfg = malloc(sizeof *cfg);
    tiny_config(cfg, "1e-2", NULL);
    set(cfg, "learner.old_logprobs=behaviour");
    learner_t *l = make(cfg, NULL);
    add(l, 1, 1, 51, -1, NULL);
    add(l, 2, 1, 52, -1, NULL);
    learner_train_result_t r;
    train(l, &r);
    /* The sampler's numbers are the old policy: no mismatch, TIS weight 1; the ratio now
     * compares the learner with the (hand-made) sampler, so it is not 1. */
    cr_expect_eq(r.first.mismatch_kl, 0.0);
    cr_expect_eq(r.first.tis_mean_weight, 1.0);
    cr_expect_neq(r.first.ratio_mean, 1.0);
    cr_expect_eq(r.applied, 2);
    learner_destroy(&l);
    free(cfg);
}

Test(learner, kl_to_frozen_reference, .init = quiet) {
    quillan_config_t *cfg = malloc(sizeof *cfg);
    tiny_config(cfg, "1e-2", NULL);
    set(cfg, "learner.kl.beta=0.1");
    learner_t *l = make(cfg, NULL);
    add(l, 1, 1, 61, -1, NULL);
    add(l, 2, 1, 62, -1, NULL);
    learner_train_result_t r;
    train(l, &r);
    cr_expect_eq(r.first.kl, 0.0); /* the reference is the starting policy */
    cr_expect(r.last.kl > 0, "after an update the policy moved away from the reference");
    add(l, 3, 2, 63, -1, NULL);
    add(l, 4, 2, 64, -1, NULL);
    train(l, &r);
    cr_expect(r.first.kl > 0);
    learner_destroy(&l);
    free(cfg);
}

Test(learner, bad_config_refused, .init = quiet) {
    quillan_config_t *cfg = malloc(sizeof *cfg);
    tiny_config(cfg, "1e-4", NULL);
    set(cfg, "rollout.top_k=5");
    qerr_t err = {0};
    cr_expect_null(learner_new(cfg, NULL, &err));
    cr_expect(strstr(err.msg, "rollout.top_k") != NULL, "%s", err.msg);
    tiny_config(cfg, "1e-4", NULL);
    set(cfg, "rollout.top_p=0.9");
    cr_expect_null(learner_new(cfg, NULL, &err));
    cr_expect(strstr(err.msg, "rollout.top_p") != NULL, "%s", err.msg);
    free(cfg);
}

Test(learner, frozen_old_policy_is_the_current_forward, .init = quiet) {
    quillan_config_t *cfg = malloc(sizeof *cfg);
    tiny_config(cfg, "1e-2", NULL);
    set(cfg, "model.head_int8=true");
    learner_t *l = make(cfg, NULL);
    for (unsigned k = 0; k < 2; k++) {
        /* Records of the current policy's own routing, replayed for old and current alike. */
        const int64_t v = (int64_t)learner_version(l);
        hgroup_t h1, h2;
        hgroup(&h1, 2 * k + 1, v, 81 + 2 * k, -1);
        hgroup(&h2, 2 * k + 2, v, 82 + 2 * k, -1);
        hroutes_t r1, r2;
        own_routes(&r1, l, &h1);
        own_routes(&r2, l, &h2);
        batcher_verdict_t vd;
        qerr_t err = {0};
        cr_assert(learner_add_group(l, &h1.g, r1.r, &vd, &err) == 0, "%s", err.msg);
        cr_assert(learner_add_group(l, &h2.g, r2.r, &vd, &err) == 0, "%s", err.msg);
        learner_train_result_t r;
        train(l, &r);
        cr_expect_eq(r.applied, 2);
        cr_expect_eq(learner_old_version(l), learner_version(l));
        cr_expect_eq(r.first.ratio_mean, 1.0, "batch %u: ratio %.17g", k, r.first.ratio_mean);
        cr_expect_eq(r.first.approx_kl, 0.0, "batch %u", k);
        cr_expect_neq(r.last.ratio_mean, 1.0, "batch %u: the update moved nothing", k);
        hroutes_free(&r1);
        hroutes_free(&r2);
    }
    learner_destroy(&l);
    free(cfg);
}

/* Rewrites the learner state file of step directory `step_dir` as the learner wrote it before
 * its old policy and reference were frozen models: "old_params" / "ref_params" holding the
 * latent weights old_latent / ref_latent in place of "old_weights" / "ref_weights"; every
 * other tensor and the metadata are kept. */
static void state_to_latent_form(const char *step_dir, const real *old_latent,
                                 const real *ref_latent) {
    char path[4200];
    snprintf(path, sizeof path, "%s/%s", step_dir, LEARNER_STATE_FILE);
    qerr_t err = {0};
    safetensors_reader_t *r = safetensors_reader_new(path, &err);
    cr_assert(r, "%s", err.msg);
    safetensors_writer_t *w = safetensors_writer_new();
    cr_assert(w);
    int replaced = 0;
    for (size_t i = 0; i < safetensors_reader_count(r); i++) {
        const safetensors_tensor_t *t = safetensors_reader_at(r, i);
        const char *name = t->name;
        const void *data = t->data;
        if (strcmp(name, "old_weights") == 0 || strcmp(name, "ref_weights") == 0) {
            const int old = name[0] == 'o';
            name = old ? "old_params" : "ref_params";
            data = old ? old_latent : ref_latent;
            replaced++;
        }
        cr_assert(safetensors_writer_add(w, name, t->dtype, t->ndim, t->shape, data, &err) == 0,
                  "%s", err.msg);
    }
    cr_assert_eq(replaced, 2, "the state holds no old_weights / ref_weights");
    for (size_t i = 0; i < safetensors_reader_metadata_count(r); i++) {
        const char *k, *v;
        safetensors_reader_metadata_at(r, i, &k, &v);
        cr_assert(safetensors_writer_set_metadata(w, k, v, &err) == 0, "%s", err.msg);
    }
    cr_assert(safetensors_writer_write(w, path, &err) == 0, "%s", err.msg);
    safetensors_writer_destroy(&w);
    safetensors_reader_destroy(&r);
}

Test(learner, latent_form_checkpoint_resumes_the_same_logprobs, .init = quiet) {
    char dir[] = "/tmp/quillan_learner_XXXXXX";
    cr_assert(mkdtemp(dir));
    quillan_config_t *cfg = malloc(sizeof *cfg);
    tiny_config(cfg, "1e-2", dir);
    set(cfg, "model.head_int8=true");
    set(cfg, "learner.old_policy_interval=2"); /* the old policy stays v1 across the resume */
    set(cfg, "learner.kl.beta=0.1");
    learner_t *a = make(cfg, NULL);
    real *start = params_copy(a); /* the weights of v1, the old policy, and of the reference */
    add(a, 1, 1, 91, -1, NULL);
    add(a, 2, 1, 92, -1, NULL);
    learner_train_result_t r;
    train(a, &r);
    cr_assert_eq(learner_version(a), 2);
    cr_assert_eq(learner_old_version(a), 1);
    uint8_t *bs;
    size_t blen;
    qerr_t err = {0};
    cr_assert(learner_batcher_save(a, &bs, &blen, &err) == 0, "%s", err.msg);
    char out[4096];
    cr_assert(learner_checkpoint(a, NULL, 0, bs, blen, out, sizeof out, &err) == 0, "%s", err.msg);
    free(bs);

    learner_t *b = make(cfg, "auto"); /* the frozen form */
    state_to_latent_form(out, start, start);
    learner_t *c = make(cfg, "auto"); /* the latent form */
    cr_expect_eq(learner_old_version(c), 1);

    learner_t *all[3] = {a, b, c};
    learner_train_result_t res[3];
    for (int i = 0; i < 3; i++) {
        add(all[i], 3, 2, 93, -1, NULL);
        add(all[i], 4, 2, 94, -1, NULL);
        train(all[i], &res[i]);
    }
    /* The old policy is not the current one, so the ratios test its log-probs. */
    cr_expect_neq(res[0].first.ratio_mean, 1.0);
    cr_expect(res[0].first.kl > 0);
    for (int i = 1; i < 3; i++) {
        expect_same_mismatch(&res[0].first, &res[i].first);
        expect_same_mismatch(&res[0].last, &res[i].last);
        cr_expect_eq(res[0].first.kl, res[i].first.kl, "learner %d: kl %.17g vs %.17g", i,
                     res[0].first.kl, res[i].first.kl);
        cr_expect_eq(res[0].last.kl, res[i].last.kl, "learner %d", i);
    }
    free(start);
    learner_destroy(&a);
    learner_destroy(&b);
    learner_destroy(&c);
    free(cfg);
    char cmd[256];
    snprintf(cmd, sizeof cmd, "rm -rf %s", dir);
    cr_expect(system(cmd) == 0);
}
