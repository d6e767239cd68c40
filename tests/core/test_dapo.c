/* DAPO math on hand-computed cases (TRAINING.md): overlong shaping, advantages, the
 * dynamic-sampling filter, the clipped token loss in each region, TIS, the three aggregations
 * and the k3 KL (float core). */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "dapo.h"
#include "qtest.h"

/* Float core: log-probs are stored as float, so ratios recovered from them carry ~1e-7
 * relative rounding. */
#define TOL 1e-5

static int near(double a, double b) {
    return fabs(a - b) <= TOL * fmax(1.0, fabs(b));
}

#define EXPECT_NEAR(a, b)                                                                          \
    cr_expect(near((a), (b)), "%s = %.9g, expected %.9g", #a, (double)(a), (double)(b))

/* ---- Overlong shaping ---- */

Test(dapo, overlong_three_regions) {
    /* max_len 20, cache 5: free up to 15, linear ramp over (15, 20], -1 when truncated. */
    cr_expect_eq(dapo_overlong_penalty(10, 0, 20, 5), 0.0);
    cr_expect_eq(dapo_overlong_penalty(15, 0, 20, 5), 0.0);
    EXPECT_NEAR(dapo_overlong_penalty(16, 0, 20, 5), -0.2);
    EXPECT_NEAR(dapo_overlong_penalty(18, 0, 20, 5), -0.6);
    EXPECT_NEAR(dapo_overlong_penalty(20, 0, 20, 5), -1.0);
    cr_expect_eq(dapo_overlong_penalty(20, 1, 20, 5), -1.0);
    cr_expect_eq(dapo_overlong_penalty(21, 0, 20, 5), -1.0);
    /* The config default cache = max_len / 4. */
    EXPECT_NEAR(dapo_overlong_penalty(14, 0, 16, 4), -0.5);
}

/* ---- Advantages ---- */

Test(dapo, advantages_with_std) {
    dapo_adv_config_t cfg;
    dapo_adv_config_default(&cfg);
    /* mean 4, std (N-1) = sqrt((4 + 0 + 4) / 2) = 2 */
    const double r[3] = {2, 4, 6};
    double a[3];
    cr_assert_eq(dapo_group_advantages(a, r, NULL, 3, &cfg), 3);
    EXPECT_NEAR(a[0], -2 / (2 + 1e-6));
    cr_expect_eq(a[1], 0.0);
    EXPECT_NEAR(a[2], 2 / (2 + 1e-6));
    /* {1, 0, 0, 1}: mean 0.5, std sqrt(1/3), A = +-0.5 sqrt(3) = +-0.8660254 */
    const double b[4] = {1, 0, 0, 1};
    double ab[4];
    dapo_group_advantages(ab, b, NULL, 4, &cfg);
    EXPECT_NEAR(ab[0], 0.8660254);
    EXPECT_NEAR(ab[1], -0.8660254);
    EXPECT_NEAR(ab[3], 0.8660254);
}

Test(dapo, advantages_without_std) {
    dapo_adv_config_t cfg;
    dapo_adv_config_default(&cfg);
    cfg.normalize_std = 0;
    const double r[4] = {1, 0, 0, 1};
    double a[4];
    dapo_group_advantages(a, r, NULL, 4, &cfg);
    cr_expect_eq(a[0], 0.5);
    cr_expect_eq(a[1], -0.5);
    cr_expect_eq(a[2], -0.5);
    cr_expect_eq(a[3], 0.5);
}

Test(dapo, advantages_clip) {
    dapo_adv_config_t cfg;
    dapo_adv_config_default(&cfg);
    cfg.clip = 1;
    cfg.clip_lo = -0.5;
    cfg.clip_hi = 0.25;
    const double r[3] = {2, 4, 6};
    double a[3];
    dapo_group_advantages(a, r, NULL, 3, &cfg);
    cr_expect_eq(a[0], -0.5);
    cr_expect_eq(a[1], 0.0);
    cr_expect_eq(a[2], 0.25);
}

Test(dapo, advantages_single_valid_reward) {
    dapo_adv_config_t cfg;
    dapo_adv_config_default(&cfg);
    const double r[3] = {1, NAN, NAN};
    double a[3] = {7, 7, 7};
    cr_expect_eq(dapo_group_advantages(a, r, NULL, 3, &cfg), 1);
    for (int i = 0; i < 3; i++)
        cr_expect_eq(a[i], 0.0);
    const double one[1] = {5};
    double a1[1] = {7};
    cr_expect_eq(dapo_group_advantages(a1, one, NULL, 1, &cfg), 1);
    cr_expect_eq(a1[0], 0.0);
}

Test(dapo, advantages_no_reward_excluded) {
    dapo_adv_config_t cfg;
    dapo_adv_config_default(&cfg);
    /* Valid: 3, 1, 5 (index 1 is NaN, index 4 flagged absent although it holds 100):
     * mean 3, std 2. */
    const double r[5] = {3, NAN, 1, 5, 100};
    const uint8_t has[5] = {1, 1, 1, 1, 0};
    double a[5];
    cr_expect_eq(dapo_group_advantages(a, r, has, 5, &cfg), 3);
    cr_expect_eq(a[0], 0.0);
    cr_expect_eq(a[1], 0.0);
    EXPECT_NEAR(a[2], -1.0);
    EXPECT_NEAR(a[3], 1.0);
    cr_expect_eq(a[4], 0.0);
}

/* ---- Dynamic sampling ---- */

Test(dapo, dynamic_sampling_filter) {
    const double eq[3] = {1, 1, 1}, mixed[3] = {1, 1, 0}, few[3] = {1, NAN, NAN};
    cr_expect_eq(dapo_group_classify(eq, NULL, 3), DAPO_GROUP_EQUAL);
    cr_expect_eq(dapo_group_classify(mixed, NULL, 3), DAPO_GROUP_KEEP);
    cr_expect_eq(dapo_group_classify(few, NULL, 3), DAPO_GROUP_FEW_VALID);
    /* The one different value has no reward: the rest are equal. */
    const uint8_t has[3] = {1, 1, 0};
    cr_expect_eq(dapo_group_classify(mixed, has, 3), DAPO_GROUP_EQUAL);
    /* Equal raw rewards made different by overlong shaping are kept: the filter sees shaped
     * rewards. */
    const double shaped[2] = {1 + dapo_overlong_penalty(10, 0, 20, 5),
                              1 + dapo_overlong_penalty(18, 0, 20, 5)};
    cr_expect_eq(dapo_group_classify(shaped, NULL, 2), DAPO_GROUP_KEEP);
}

/* ---- Token loss ---- */

typedef struct {
    double loss, grad;
    dapo_metrics_t m;
} one_t;

/* One loss token with ratio r = exp(logp - logp_old) and advantage A; behaviour = old. */
static one_t one_token(double r, double A, const dapo_loss_config_t *cfg) {
    const real old = -1.0f, lp = (real)(-1.0 + log(r)), adv = (real)A, mask = 1;
    one_t o;
    dapo_loss_forward(&o.m, &lp, &old, &old, NULL, &adv, &mask, 1, 1, cfg);
    real g;
    dapo_loss_backward(&g, &lp, &old, &old, NULL, &adv, &mask, 1, 1, cfg, 1.0);
    o.loss = o.m.loss;
    o.grad = g;
    return o;
}

Test(dapo, clip_regions_positive_advantage) {
    dapo_loss_config_t cfg;
    dapo_loss_config_default(&cfg);
    /* A = 2. Inside: pg = -r A, d/dlogp = -r A. */
    one_t o = one_token(1.1, 2, &cfg);
    EXPECT_NEAR(o.loss, -2.2);
    EXPECT_NEAR(o.grad, -2.2);
    cr_expect_eq(o.m.clipfrac_high, 0.0);
    /* r > 1.28: clip-high, pg = -1.28 A, no gradient. */
    o = one_token(1.5, 2, &cfg);
    EXPECT_NEAR(o.loss, -2.56);
    cr_expect_eq(o.grad, 0.0);
    cr_expect_eq(o.m.clipfrac_high, 1.0);
    cr_expect_eq(o.m.clipfrac_low, 0.0);
    /* 1.2 would be clipped by the symmetric 0.2; Clip-Higher lets it through. */
    o = one_token(1.25, 2, &cfg);
    EXPECT_NEAR(o.loss, -2.5);
    EXPECT_NEAR(o.grad, -2.5);
    /* r < 0.8 with A > 0: min picks r A, not clipped. */
    o = one_token(0.5, 2, &cfg);
    EXPECT_NEAR(o.loss, -1.0);
    EXPECT_NEAR(o.grad, -1.0);
    cr_expect_eq(o.m.clipfrac_low, 0.0);
}

Test(dapo, clip_regions_negative_advantage) {
    dapo_loss_config_t cfg;
    dapo_loss_config_default(&cfg);
    /* A = -2, r < 0.8: clip-low, pg = 0.8 * 2 = 1.6, no gradient. */
    one_t o = one_token(0.5, -2, &cfg);
    EXPECT_NEAR(o.loss, 1.6);
    cr_expect_eq(o.grad, 0.0);
    cr_expect_eq(o.m.clipfrac_low, 1.0);
    cr_expect_eq(o.m.clipfrac_high, 0.0);
    /* r = 0.9: inside, pg = -r A = 1.8, gradient 1.8. */
    o = one_token(0.9, -2, &cfg);
    EXPECT_NEAR(o.loss, 1.8);
    EXPECT_NEAR(o.grad, 1.8);
    /* r = 1.5 > 1.28 with A < 0: max(r, clip) = r, unclipped: pg = 3.0. */
    o = one_token(1.5, -2, &cfg);
    EXPECT_NEAR(o.loss, 3.0);
    EXPECT_NEAR(o.grad, 3.0);
    cr_expect_eq(o.m.clipfrac_high, 0.0);
    cr_expect_eq(o.m.clipfrac_dual, 0.0);
}

Test(dapo, dual_clip) {
    dapo_loss_config_t cfg;
    dapo_loss_config_default(&cfg);
    /* A = -2, r = 4 > 3: pg = min(8, 3 * 2) = 6, no gradient. */
    one_t o = one_token(4.0, -2, &cfg);
    EXPECT_NEAR(o.loss, 6.0);
    cr_expect_eq(o.grad, 0.0);
    cr_expect_eq(o.m.clipfrac_dual, 1.0);
    /* Without the dual clip the same token costs 8 and keeps its gradient. */
    cfg.dual_clip = 0;
    o = one_token(4.0, -2, &cfg);
    EXPECT_NEAR(o.loss, 8.0);
    EXPECT_NEAR(o.grad, 8.0);
    /* The dual clip never touches positive advantages. */
    cfg.dual_clip = 3;
    o = one_token(4.0, 2, &cfg);
    EXPECT_NEAR(o.loss, -2.56);
    cr_expect_eq(o.m.clipfrac_dual, 0.0);
}

Test(dapo, approx_kl_is_k3) {
    dapo_loss_config_t cfg;
    dapo_loss_config_default(&cfg);
    /* rho = 1.5: 0.5 - ln 1.5 = 0.0945349 */
    one_t o = one_token(1.5, 1, &cfg);
    EXPECT_NEAR(o.m.approx_kl, 0.0945349);
    EXPECT_NEAR(o.m.ratio_mean, 1.5);
    o = one_token(1.0, 1, &cfg);
    cr_expect_eq(o.m.approx_kl, 0.0);
}

Test(dapo, tis_cap_and_mismatch) {
    dapo_loss_config_t cfg;
    dapo_loss_config_default(&cfg);
    /* Two tokens, r = 1, A = 1 (pg = -1 each). exp(old - b) = 3 (capped to 2) and 0.5. */
    const real old[2] = {-1.0f, -2.0f};
    const real lp[2] = {-1.0f, -2.0f};
    const real b[2] = {(real)(-1.0 - log(3.0)), (real)(-2.0 - log(0.5))};
    const real adv[2] = {1, 1}, mask[2] = {1, 1};
    dapo_metrics_t m;
    dapo_loss_forward(&m, lp, old, b, NULL, adv, mask, 1, 2, &cfg);
    EXPECT_NEAR(m.loss, (2 * -1.0 + 0.5 * -1.0) / 2);
    EXPECT_NEAR(m.tis_mean_weight, 1.25);
    EXPECT_NEAR(m.tis_clipped_frac, 0.5);
    EXPECT_NEAR(m.is_min, 0.5);
    EXPECT_NEAR(m.is_max, 3.0);
    /* k3 of ln 3 and ln 0.5: (2 - 1.0986123 + -0.5 + 0.6931472) / 2 */
    EXPECT_NEAR(m.mismatch_kl, 0.5472674);
    real g[2];
    dapo_loss_backward(g, lp, old, b, NULL, adv, mask, 1, 2, &cfg, 1.0);
    EXPECT_NEAR(g[0], 2 * -1.0 / 2);
    EXPECT_NEAR(g[1], 0.5 * -1.0 / 2);
    /* Equal log-probs: no mismatch at all. */
    dapo_loss_forward(&m, lp, old, old, NULL, adv, mask, 1, 2, &cfg);
    cr_expect_eq(m.mismatch_kl, 0.0);
    cr_expect_eq(m.is_min, 1.0);
    cr_expect_eq(m.is_max, 1.0);
    cr_expect_eq(m.tis_mean_weight, 1.0);
}

/* Three rows of T = 3 (position 0 is the prompt): row 0 has two loss tokens (A = 1, r = 1.1 and
 * 0.9: l = -1.1, -0.9), row 1 one (A = -3, r = 1: l = 3, then padding), row 2 none (no
 * reward). */
typedef struct {
    real lp[9], old[9], adv[9], mask[9];
} agg_case_t;

static void agg_case(agg_case_t *c) {
    memset(c, 0, sizeof *c);
    for (int i = 0; i < 9; i++)
        c->old[i] = c->lp[i] = -0.5f;
    c->lp[1] = (real)(-0.5 + log(1.1));
    c->lp[2] = (real)(-0.5 + log(0.9));
    c->adv[1] = c->adv[2] = 1;
    c->mask[1] = c->mask[2] = 1;
    c->adv[4] = -3;
    c->mask[4] = 1;
    c->adv[7] = c->adv[8] = 5; /* ignored: masked */
}

static void agg_check(dapo_agg_t agg, double loss, const double grad[9]) {
    dapo_loss_config_t cfg;
    dapo_loss_config_default(&cfg);
    cfg.agg = agg;
    cfg.max_new_tokens = 4;
    agg_case_t c;
    agg_case(&c);
    dapo_metrics_t m;
    dapo_loss_forward(&m, c.lp, c.old, NULL, NULL, c.adv, c.mask, 3, 3, &cfg);
    EXPECT_NEAR(m.loss, loss);
    cr_expect_eq(m.tokens, 3);
    cr_expect_eq(m.seqs, 2);
    cr_expect_eq(m.pg_tokens, 3);
    real g[9];
    memset(g, 0x7f, sizeof g);
    dapo_loss_backward(g, c.lp, c.old, NULL, NULL, c.adv, c.mask, 3, 3, &cfg, 1.0);
    for (int i = 0; i < 9; i++)
        cr_expect(near(g[i], grad[i]), "agg %d: g[%d] = %.9g, expected %.9g", (int)agg, i, g[i],
                  grad[i]);
}

Test(dapo, aggregation_token_mean) {
    /* (-1.1 - 0.9 + 3) / 3 tokens */
    const double g[9] = {0, -1.1 / 3, -0.9 / 3, 0, 3.0 / 3, 0, 0, 0, 0};
    agg_check(DAPO_AGG_TOKEN_MEAN, 1.0 / 3, g);
}

Test(dapo, aggregation_seq_mean_token_mean) {
    /* rows: mean(-1.1, -0.9) = -1 and 3; mean over the 2 rows with tokens = 1 */
    const double g[9] = {0, -1.1 / 4, -0.9 / 4, 0, 3.0 / 2, 0, 0, 0, 0};
    agg_check(DAPO_AGG_SEQ_MEAN_TOKEN_MEAN, 1.0, g);
}

Test(dapo, aggregation_seq_mean_token_sum_norm) {
    /* (-2 + 3) / (2 sequences x max_new_tokens 4) */
    const double g[9] = {0, -1.1 / 8, -0.9 / 8, 0, 3.0 / 8, 0, 0, 0, 0};
    agg_check(DAPO_AGG_SEQ_MEAN_TOKEN_SUM_NORM, 1.0 / 8, g);
}

Test(dapo, kl_to_reference) {
    dapo_loss_config_t cfg;
    dapo_loss_config_default(&cfg);
    cfg.kl_beta = 0.1;
    /* r = 1, A = 1: pg = -1. logp_ref - logp = ln 2: k3 = 2 - ln 2 - 1 = 0.3068528,
     * dk3/dlogp = -(2 - 1) = -1. */
    const real lp = -1.0f, old = -1.0f, ref = (real)(-1.0 + log(2.0)), adv = 1, mask = 1;
    dapo_metrics_t m;
    dapo_loss_forward(&m, &lp, &old, NULL, &ref, &adv, &mask, 1, 1, &cfg);
    EXPECT_NEAR(m.kl, 0.3068528);
    EXPECT_NEAR(m.pg, -1.0);
    EXPECT_NEAR(m.loss, -1.0 + 0.1 * 0.3068528);
    real g;
    dapo_loss_backward(&g, &lp, &old, NULL, &ref, &adv, &mask, 1, 1, &cfg, 2.0);
    EXPECT_NEAR(g, 2.0 * (-1.0 + 0.1 * -1.0));
}

Test(dapo, no_policy_gradient_token_reported) {
    dapo_loss_config_t cfg;
    dapo_loss_config_default(&cfg);
    const real lp[2] = {-1, -2}, adv[2] = {0, 0}, mask[2] = {1, 1}, none[2] = {0, 0};
    dapo_metrics_t m;
    dapo_loss_forward(&m, lp, lp, NULL, NULL, adv, mask, 1, 2, &cfg);
    cr_expect_eq(m.tokens, 2);
    cr_expect_eq(m.pg_tokens, 0);
    cr_expect_eq(m.loss, 0.0);
    /* An all-masked batch: nothing at all, gradient 0. */
    const real adv1[2] = {1, 1};
    dapo_loss_forward(&m, lp, lp, NULL, NULL, adv1, none, 1, 2, &cfg);
    cr_expect_eq(m.tokens, 0);
    cr_expect_eq(m.pg_tokens, 0);
    cr_expect_eq(m.loss, 0.0);
    real g[2] = {9, 9};
    dapo_loss_backward(g, lp, lp, NULL, NULL, adv1, none, 1, 2, &cfg, 1.0);
    cr_expect_eq(g[0], 0.0);
    cr_expect_eq(g[1], 0.0);
}

Test(dapo, config_check) {
    dapo_loss_config_t cfg;
    dapo_loss_config_default(&cfg);
    qerr_t err;
    cr_expect_eq(dapo_loss_config_check(&cfg, &err), 0);
    cfg.dual_clip = 0.5;
    cr_expect_eq(dapo_loss_config_check(&cfg, &err), -1);
    cr_expect(strstr(err.msg, "dual_clip") != NULL, "%s", err.msg);
    dapo_loss_config_default(&cfg);
    cfg.tis_cap = 0;
    cr_expect_eq(dapo_loss_config_check(&cfg, &err), -1);
    cr_expect(strstr(err.msg, "tis_cap") != NULL, "%s", err.msg);
    dapo_loss_config_default(&cfg);
    cfg.max_new_tokens = 0;
    cr_expect_eq(dapo_loss_config_check(&cfg, &err), -1);
}
