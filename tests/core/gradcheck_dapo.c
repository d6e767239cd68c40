/* Finite-difference check of the DAPO loss's gradient with respect to the current policy's
 * log-probs (double core), for every aggregation, with TIS weights on both sides of the cap, a
 * k3 KL term, a mask with prompt, padding and no-reward rows, and ratios spread over all clip
 * regions but kept away from the kinks (where the loss is not differentiable). */
#include <math.h>
#include <stdio.h>
#include <string.h>

#include "dapo.h"
#include "gradcheck.h"
#include "qtest.h"

/* The loss is a smooth function of each logp away from the kinks, so central differences in
 * double match the analytic gradient far below the model's GC_TOL. */
#define DAPO_GC_TOL 1e-6
/* Smallest distance |r - kink| / kink kept between a ratio and a clip boundary: the central
 * difference (step GC_STEP in logp) must not cross it. */
#define DAPO_GC_KINK_MARGIN 1e-3

enum { B = 5, T = 7, N = B * T };

typedef struct {
    real lp[N], old[N], beh[N], ref[N], adv[N], mask[N];
    dapo_loss_config_t cfg;
} ctx_t;

static double loss_fn(void *p) {
    ctx_t *c = p;
    dapo_metrics_t m;
    dapo_loss_forward(&m, c->lp, c->old, c->beh, c->ref, c->adv, c->mask, B, T, &c->cfg);
    return m.loss;
}

static int near_kink(double r, const dapo_loss_config_t *cfg) {
    const double kinks[3] = {1 - cfg->eps_low, 1 + cfg->eps_high, cfg->dual_clip};
    for (int k = 0; k < 3; k++)
        if (kinks[k] > 0 && fabs(r - kinks[k]) < DAPO_GC_KINK_MARGIN * kinks[k])
            return 1;
    return 0;
}

/* Ratios ln r ~ 0.9 N(0, 1) reach r < 0.8, 0.8..1.28, 1.28..3 and > 3; advantages of both signs
 * (one row all 0, as a kept group with equal rewards may be), TIS ratios around the cap. */
static void setup(ctx_t *c, dapo_agg_t agg, double beta, unsigned long long seed) {
    memset(c, 0, sizeof *c);
    dapo_loss_config_default(&c->cfg);
    c->cfg.agg = agg;
    c->cfg.kl_beta = beta;
    c->cfg.max_new_tokens = T;
    real z[N], zb[N], zr[N], za[B];
    gc_fill(c->old, N, seed, 1.0);
    gc_fill(z, N, seed + 1, 0.9);
    gc_fill(zb, N, seed + 2, 0.5);
    gc_fill(zr, N, seed + 3, 0.5);
    gc_fill(za, B, seed + 4, 1.0);
    for (int i = 0; i < N; i++) {
        c->old[i] = -fabs(c->old[i]) - 0.1;
        double x = z[i];
        while (near_kink(exp(x), &c->cfg))
            x += 5 * DAPO_GC_KINK_MARGIN;
        c->lp[i] = c->old[i] + x;
        c->beh[i] = c->old[i] - zb[i] * 1.5;
        c->ref[i] = c->lp[i] + zr[i];
    }
    for (int b = 0; b < B; b++) {
        const int prompt = 1 + b % 2;
        const int len = b == 3 ? 0 : T - prompt - (b % 3); /* row 3: no reward, fully masked */
        for (int t = 0; t < T; t++) {
            const int in = t >= prompt && t < prompt + len;
            c->mask[b * T + t] = in;
            c->adv[b * T + t] = b == 1 ? 0 : za[b] + (za[b] > 0 ? 0.1 : -0.1);
        }
    }
}

static void check(dapo_agg_t agg, double beta, const char *name) {
    ctx_t c;
    gc_report_t rep = {0};
    for (unsigned long long seed = 1; seed <= 4; seed++) {
        setup(&c, agg, beta, 10 * seed);
        dapo_metrics_t m;
        dapo_loss_forward(&m, c.lp, c.old, c.beh, c.ref, c.adv, c.mask, B, T, &c.cfg);
        cr_assert(isfinite(m.loss), "%s: loss %g", name, m.loss);
        cr_assert_gt(m.pg_tokens, 0, "%s: no policy-gradient token", name);
        real g[N];
        dapo_loss_backward(g, c.lp, c.old, c.beh, c.ref, c.adv, c.mask, B, T, &c.cfg, 1.0);
        char label[64];
        snprintf(label, sizeof label, "%s seed %llu dlogp", name, seed);
        gc_tensor(&rep, label, c.lp, N, g, loss_fn, &c);
    }
    fprintf(stderr, "gradcheck dapo %s: worst %s, rel err %.3e (tolerance %.0e)\n", name,
            rep.worst_name, rep.worst, DAPO_GC_TOL);
    cr_assert_leq(rep.worst, DAPO_GC_TOL, "%s: %s rel err %g", name, rep.worst_name, rep.worst);
}

Test(gradcheck_dapo, token_mean) {
    check(DAPO_AGG_TOKEN_MEAN, 0, "token-mean");
}
Test(gradcheck_dapo, seq_mean_token_mean) {
    check(DAPO_AGG_SEQ_MEAN_TOKEN_MEAN, 0, "seq-mean-token-mean");
}
Test(gradcheck_dapo, seq_mean_token_sum_norm) {
    check(DAPO_AGG_SEQ_MEAN_TOKEN_SUM_NORM, 0, "seq-mean-token-sum-norm");
}
Test(gradcheck_dapo, token_mean_kl) {
    check(DAPO_AGG_TOKEN_MEAN, 0.05, "token-mean+kl");
}
Test(gradcheck_dapo, seq_mean_token_mean_kl) {
    check(DAPO_AGG_SEQ_MEAN_TOKEN_MEAN, 0.05, "seq-mean-token-mean+kl");
}

/* The test data must actually visit every region, or the check proves less than it says. */
Test(gradcheck_dapo, regions_visited) {
    long low = 0, high = 0, dual = 0, free_ = 0, capped = 0;
    for (unsigned long long seed = 1; seed <= 4; seed++) {
        ctx_t c;
        setup(&c, DAPO_AGG_TOKEN_MEAN, 0, 10 * seed);
        for (int i = 0; i < N; i++) {
            if (!c.mask[i] || c.adv[i] == 0)
                continue;
            const double r = exp((double)c.lp[i] - c.old[i]);
            const double A = c.adv[i];
            low += A < 0 && r < 1 - c.cfg.eps_low;
            high += A > 0 && r > 1 + c.cfg.eps_high;
            dual += A < 0 && r > c.cfg.dual_clip;
            free_ += (A > 0 && r <= 1 + c.cfg.eps_high) ||
                     (A < 0 && r >= 1 - c.cfg.eps_low && r <= c.cfg.dual_clip);
            capped += exp((double)c.old[i] - c.beh[i]) > c.cfg.tis_cap;
        }
    }
    fprintf(stderr,
            "gradcheck dapo regions: free %ld, clip-low %ld, clip-high %ld, dual %ld, "
            "tis-capped %ld\n",
            free_, low, high, dual, capped);
    cr_assert_gt(free_, 0);
    cr_assert_gt(low, 0);
    cr_assert_gt(high, 0);
    cr_assert_gt(dual, 0);
    cr_assert_gt(capped, 0);
}
