/* DAPO math (TRAINING.md): see dapo.h for the contracts. */
#include "dapo.h"

#include <math.h>
#include <stddef.h>

double dapo_overlong_penalty(int L, int truncated, int max_len, int cache) {
    Q_ASSERT(cache >= 1 && cache <= max_len && L >= 0);
    if (truncated || L > max_len)
        return -1.0;
    const int free_len = max_len - cache;
    if (L <= free_len)
        return 0.0;
    return (double)(free_len - L) / cache;
}

void dapo_adv_config_default(dapo_adv_config_t *cfg) {
    cfg->normalize_std = 1;
    cfg->clip = 0;
    cfg->clip_lo = 0;
    cfg->clip_hi = 0;
}

static int valid(const double *reward, const uint8_t *has_reward, int i) {
    return (has_reward == NULL || has_reward[i]) && !isnan(reward[i]);
}

int dapo_group_advantages(double *adv, const double *reward, const uint8_t *has_reward, int G,
                          const dapo_adv_config_t *cfg) {
    Q_ASSERT(G >= 1);
    int n = 0;
    double sum = 0;
    for (int i = 0; i < G; i++) {
        adv[i] = 0;
        if (valid(reward, has_reward, i)) {
            n++;
            sum += reward[i];
        }
    }
    if (n < 2)
        return n;
    const double mean = sum / n;
    double ss = 0;
    for (int i = 0; i < G; i++)
        if (valid(reward, has_reward, i))
            ss += (reward[i] - mean) * (reward[i] - mean);
    const double scale = cfg->normalize_std ? 1.0 / (sqrt(ss / (n - 1)) + DAPO_STD_EPS) : 1.0;
    for (int i = 0; i < G; i++) {
        if (!valid(reward, has_reward, i))
            continue;
        double a = (reward[i] - mean) * scale;
        if (cfg->clip)
            a = a < cfg->clip_lo ? cfg->clip_lo : a > cfg->clip_hi ? cfg->clip_hi : a;
        adv[i] = a;
    }
    return n;
}

dapo_group_verdict_t dapo_group_classify(const double *shaped, const uint8_t *has_reward, int G) {
    int n = 0;
    double first = 0;
    int differ = 0;
    for (int i = 0; i < G; i++) {
        if (!valid(shaped, has_reward, i))
            continue;
        if (n == 0)
            first = shaped[i];
        else if (shaped[i] != first)
            differ = 1;
        n++;
    }
    if (n < 2)
        return DAPO_GROUP_FEW_VALID;
    return differ ? DAPO_GROUP_KEEP : DAPO_GROUP_EQUAL;
}

void dapo_loss_config_default(dapo_loss_config_t *cfg) {
    cfg->eps_low = 0.2;
    cfg->eps_high = 0.28;
    cfg->dual_clip = 3.0;
    cfg->tis_cap = 2.0;
    cfg->kl_beta = 0;
    cfg->agg = DAPO_AGG_TOKEN_MEAN;
    cfg->max_new_tokens = 1;
}

int dapo_loss_config_check(const dapo_loss_config_t *cfg, qerr_t *err) {
    if (!(cfg->eps_low >= 0 && cfg->eps_low < 1))
        return qerr_set(err, QERR_RANGE, "dapo loss: clip_eps_low %g outside [0, 1)", cfg->eps_low);
    if (!(cfg->eps_high >= 0 && isfinite(cfg->eps_high)))
        return qerr_set(err, QERR_RANGE, "dapo loss: clip_eps_high %g must be >= 0", cfg->eps_high);
    if (!(cfg->dual_clip == 0 || (cfg->dual_clip > 1 && isfinite(cfg->dual_clip))))
        return qerr_set(err, QERR_RANGE, "dapo loss: dual_clip %g must be > 1 (or 0 for off)",
                        cfg->dual_clip);
    if (!(cfg->tis_cap > 0 && isfinite(cfg->tis_cap)))
        return qerr_set(err, QERR_RANGE, "dapo loss: tis_cap %g must be > 0", cfg->tis_cap);
    if (!(cfg->kl_beta >= 0 && isfinite(cfg->kl_beta)))
        return qerr_set(err, QERR_RANGE, "dapo loss: kl.beta %g must be >= 0", cfg->kl_beta);
    if ((int)cfg->agg < 0 || cfg->agg >= DAPO_AGG_COUNT)
        return qerr_set(err, QERR_RANGE, "dapo loss: loss_agg %d unknown", (int)cfg->agg);
    if (cfg->max_new_tokens < 1)
        return qerr_set(err, QERR_RANGE, "dapo loss: max_new_tokens %d must be >= 1",
                        cfg->max_new_tokens);
    return 0;
}

/* Where a token sits relative to the clips: which one (if any) makes pg constant in r. */
typedef enum { REGION_FREE = 0, REGION_HIGH, REGION_LOW, REGION_DUAL } region_t;

typedef struct {
    double r;  /* exp(logp - logp_old) */
    double pg; /* clipped policy-gradient loss, before w */
    region_t region;
} pg_token_t;

static pg_token_t pg_token(double logp, double logp_old, double A, const dapo_loss_config_t *cfg) {
    pg_token_t p = {exp(logp - logp_old), 0, REGION_FREE};
    /* A == 0 is handled apart so that an infinite r never meets 0 * inf. */
    if (A > 0) {
        if (p.r > 1 + cfg->eps_high) {
            p.region = REGION_HIGH;
            p.pg = -(1 + cfg->eps_high) * A;
        } else {
            p.pg = -p.r * A; /* r < 1 - eps_low: min picks r A, unclipped */
        }
    } else if (A < 0) {
        if (p.r < 1 - cfg->eps_low) {
            p.region = REGION_LOW;
            p.pg = -(1 - cfg->eps_low) * A;
        } else if (cfg->dual_clip > 0 && p.r > cfg->dual_clip) {
            p.region = REGION_DUAL;
            p.pg = -A * cfg->dual_clip;
        } else {
            p.pg = -p.r * A;
        }
    }
    return p;
}

static double tis_raw(const real *logp_b, const real *logp_old, size_t i) {
    return logp_b ? exp((double)logp_old[i] - logp_b[i]) : 1.0;
}

/* k3 estimator of KL(p || q) from x = log q - log p on a token drawn from p: e^x - x - 1. */
static double k3(double x) {
    return expm1(x) - x;
}

/* The aggregation weight c_t of row b's loss tokens (see dapo_loss_forward); 0 when the batch
 * has no loss token. n_row is the row's loss-token count. */
static double agg_weight(const dapo_loss_config_t *cfg, long n_total, int seqs, long n_row) {
    if (n_total == 0 || n_row == 0)
        return 0;
    switch (cfg->agg) {
    case DAPO_AGG_TOKEN_MEAN: return 1.0 / (double)n_total;
    case DAPO_AGG_SEQ_MEAN_TOKEN_MEAN: return 1.0 / ((double)seqs * (double)n_row);
    case DAPO_AGG_SEQ_MEAN_TOKEN_SUM_NORM: return 1.0 / ((double)seqs * cfg->max_new_tokens);
    case DAPO_AGG_COUNT: break;
    }
    Q_ASSERT(!"unknown aggregation");
    return 0;
}

static long row_tokens(const real *mask, int b, int T) {
    long n = 0;
    for (int t = 0; t < T; t++)
        n += mask[(size_t)b * T + t] != 0;
    return n;
}

static void count_tokens(const real *mask, int B, int T, long *n_total, int *seqs) {
    *n_total = 0;
    *seqs = 0;
    for (int b = 0; b < B; b++) {
        const long n = row_tokens(mask, b, T);
        *n_total += n;
        *seqs += n > 0;
    }
}

void dapo_loss_forward(dapo_metrics_t *out, const real *logp, const real *logp_old,
                       const real *logp_b, const real *logp_ref, const real *adv, const real *mask,
                       int B, int T, const dapo_loss_config_t *cfg) {
    Q_ASSERT(B >= 0 && T >= 0);
    Q_ASSERT(cfg->kl_beta == 0 || logp_ref != NULL);
    *out = (dapo_metrics_t){0};
    long n_total;
    int seqs;
    count_tokens(mask, B, T, &n_total, &seqs);
    out->tokens = n_total;
    out->seqs = seqs;
    if (n_total == 0)
        return;

    double pg_sum = 0, kl_sum = 0, approx_kl = 0, ratio = 0, w_sum = 0, mism = 0;
    long low = 0, high = 0, dual = 0, tis_clipped = 0;
    double is_min = INFINITY, is_max = -INFINITY;
    for (int b = 0; b < B; b++) {
        const double c = agg_weight(cfg, n_total, seqs, row_tokens(mask, b, T));
        for (int t = 0; t < T; t++) {
            const size_t i = (size_t)b * T + t;
            if (mask[i] == 0)
                continue;
            const double A = adv[i];
            const pg_token_t p = pg_token(logp[i], logp_old[i], A, cfg);
            const double raw = tis_raw(logp_b, logp_old, i);
            const double w = fmin(raw, cfg->tis_cap);
            pg_sum += c * w * p.pg;
            if (cfg->kl_beta > 0)
                kl_sum += c * k3((double)logp_ref[i] - logp[i]);
            out->pg_tokens += A != 0;
            low += p.region == REGION_LOW;
            high += p.region == REGION_HIGH;
            dual += p.region == REGION_DUAL;
            approx_kl += k3((double)logp[i] - logp_old[i]);
            ratio += p.r;
            w_sum += w;
            tis_clipped += raw > cfg->tis_cap;
            mism += logp_b ? k3((double)logp_old[i] - logp_b[i]) : 0;
            is_min = fmin(is_min, raw);
            is_max = fmax(is_max, raw);
        }
    }
    const double n = (double)n_total;
    out->pg = pg_sum;
    out->kl = kl_sum;
    out->loss = pg_sum + cfg->kl_beta * kl_sum;
    out->clipfrac_low = low / n;
    out->clipfrac_high = high / n;
    out->clipfrac_dual = dual / n;
    out->approx_kl = approx_kl / n;
    out->ratio_mean = ratio / n;
    out->tis_mean_weight = w_sum / n;
    out->tis_clipped_frac = tis_clipped / n;
    out->mismatch_kl = mism / n;
    out->is_min = is_min;
    out->is_max = is_max;
}

void dapo_loss_backward(real *dlogp, const real *logp, const real *logp_old, const real *logp_b,
                        const real *logp_ref, const real *adv, const real *mask, int B, int T,
                        const dapo_loss_config_t *cfg, double dloss) {
    Q_ASSERT(B >= 0 && T >= 0);
    Q_ASSERT(cfg->kl_beta == 0 || logp_ref != NULL);
    long n_total;
    int seqs;
    count_tokens(mask, B, T, &n_total, &seqs);
    for (int b = 0; b < B; b++) {
        const double c = agg_weight(cfg, n_total, seqs, row_tokens(mask, b, T)) * dloss;
        for (int t = 0; t < T; t++) {
            const size_t i = (size_t)b * T + t;
            if (mask[i] == 0) {
                dlogp[i] = 0;
                continue;
            }
            const double A = adv[i];
            const pg_token_t p = pg_token(logp[i], logp_old[i], A, cfg);
            const double w = fmin(tis_raw(logp_b, logp_old, i), cfg->tis_cap);
            /* d(-r A)/dlogp = -r A, since dr/dlogp = r; clipped regions are constant in r. */
            double g = (A != 0 && p.region == REGION_FREE) ? -w * A * p.r : 0;
            if (cfg->kl_beta > 0)
                g += cfg->kl_beta * -expm1((double)logp_ref[i] - logp[i]);
            dlogp[i] = (real)(c * g);
        }
    }
}
