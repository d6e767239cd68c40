/* The DAPO token loss on the device: see cuda_dapo.h. The per-token functions are dapo.c's,
 * line for line, in double. */
#include "cuda_dapo.h"

#include <math.h>

#include "cuda_reduce.cuh"

#define DAPO_THREADS 512

namespace {

enum region_t { REGION_FREE = 0, REGION_HIGH, REGION_LOW, REGION_DUAL };

struct pg_token_t {
    double r;  /* exp(logp - logp_old) */
    double pg; /* clipped policy-gradient loss, before w */
    region_t region;
};

__device__ pg_token_t pg_token(double logp, double logp_old, double A,
                               const dapo_loss_config_t &cfg) {
    pg_token_t p = {exp(logp - logp_old), 0, REGION_FREE};
    if (A > 0) {
        if (p.r > 1 + cfg.eps_high) {
            p.region = REGION_HIGH;
            p.pg = -(1 + cfg.eps_high) * A;
        } else {
            p.pg = -p.r * A;
        }
    } else if (A < 0) {
        if (p.r < 1 - cfg.eps_low) {
            p.region = REGION_LOW;
            p.pg = -(1 - cfg.eps_low) * A;
        } else if (cfg.dual_clip > 0 && p.r > cfg.dual_clip) {
            p.region = REGION_DUAL;
            p.pg = -A * cfg.dual_clip;
        } else {
            p.pg = -p.r * A;
        }
    }
    return p;
}

__device__ inline double k3(double x) {
    return expm1(x) - x;
}

__device__ double agg_weight(const dapo_loss_config_t &cfg, long long n_total, int seqs,
                             long long n_row) {
    if (n_total == 0 || n_row == 0)
        return 0;
    switch (cfg.agg) {
    case DAPO_AGG_TOKEN_MEAN: return 1.0 / (double)n_total;
    case DAPO_AGG_SEQ_MEAN_TOKEN_MEAN: return 1.0 / ((double)seqs * (double)n_row);
    case DAPO_AGG_SEQ_MEAN_TOKEN_SUM_NORM: return 1.0 / ((double)seqs * cfg.max_new_tokens);
    case DAPO_AGG_COUNT: break;
    }
    return 0;
}

/* Loss tokens of every row into rowcnt[B] (shared), one warp per row; then the batch's total
 * and the rows with a loss token, returned to every thread. */
__device__ void count_tokens(int *rowcnt, const float *mask, int B, int T, long long *n_total,
                             int *seqs) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    for (int b = warp; b < B; b += nwarps) {
        int n = 0;
        for (int t = lane; t < T; t += 32)
            n += mask[(size_t)b * T + t] != 0;
        n = cuda_warp_reduce<cuda_op_sum<int>>(n);
        if (lane == 0)
            rowcnt[b] = n;
    }
    __syncthreads();
    long long tot = 0;
    int sq = 0;
    for (int b = threadIdx.x; b < B; b += blockDim.x) {
        tot += rowcnt[b];
        sq += rowcnt[b] > 0;
    }
    *n_total = cuda_block_reduce<cuda_op_sum<long long>>(tot, 0LL);
    *seqs = cuda_block_reduce<cuda_op_sum<int>>(sq, 0);
}

struct min_op {
    __device__ static double apply(double a, double b) { return fmin(a, b); }
};
struct max_op {
    __device__ static double apply(double a, double b) { return fmax(a, b); }
};

__global__ void dapo_forward_kernel(dapo_metrics_t *out, const float *logp, const float *logp_old,
                                    const float *logp_b, const float *logp_ref, const float *adv,
                                    const float *mask, int B, int T, dapo_loss_config_t cfg) {
    extern __shared__ int rowcnt[];
    long long n_total;
    int seqs;
    count_tokens(rowcnt, mask, B, T, &n_total, &seqs);
    if (n_total == 0) {
        if (threadIdx.x == 0) {
            *out = dapo_metrics_t{};
            out->seqs = seqs;
        }
        return;
    }
    double pg_sum = 0, kl_sum = 0, approx_kl = 0, ratio = 0, w_sum = 0, mism = 0;
    long long low = 0, high = 0, dual = 0, tis_clipped = 0, pg_tokens = 0;
    double is_min = INFINITY, is_max = -INFINITY;
    const size_t n = (size_t)B * T;
    for (size_t i = threadIdx.x; i < n; i += blockDim.x) {
        if (mask[i] == 0)
            continue;
        const int b = (int)(i / T);
        const double c = agg_weight(cfg, n_total, seqs, rowcnt[b]);
        const double A = adv[i];
        const pg_token_t p = pg_token(logp[i], logp_old[i], A, cfg);
        const double raw = logp_b ? exp((double)logp_old[i] - logp_b[i]) : 1.0;
        const double w = fmin(raw, cfg.tis_cap);
        pg_sum += c * w * p.pg;
        if (cfg.kl_beta > 0)
            kl_sum += c * k3((double)logp_ref[i] - logp[i]);
        pg_tokens += A != 0;
        low += p.region == REGION_LOW;
        high += p.region == REGION_HIGH;
        dual += p.region == REGION_DUAL;
        approx_kl += k3((double)logp[i] - logp_old[i]);
        ratio += p.r;
        w_sum += w;
        tis_clipped += raw > cfg.tis_cap;
        mism += logp_b ? k3((double)logp_old[i] - logp_b[i]) : 0;
        is_min = fmin(is_min, raw);
        is_max = fmax(is_max, raw);
    }
    typedef cuda_op_sum<double> dsum;
    typedef cuda_op_sum<long long> lsum;
    pg_sum = cuda_block_reduce<dsum>(pg_sum, 0.0);
    kl_sum = cuda_block_reduce<dsum>(kl_sum, 0.0);
    approx_kl = cuda_block_reduce<dsum>(approx_kl, 0.0);
    ratio = cuda_block_reduce<dsum>(ratio, 0.0);
    w_sum = cuda_block_reduce<dsum>(w_sum, 0.0);
    mism = cuda_block_reduce<dsum>(mism, 0.0);
    low = cuda_block_reduce<lsum>(low, 0LL);
    high = cuda_block_reduce<lsum>(high, 0LL);
    dual = cuda_block_reduce<lsum>(dual, 0LL);
    tis_clipped = cuda_block_reduce<lsum>(tis_clipped, 0LL);
    pg_tokens = cuda_block_reduce<lsum>(pg_tokens, 0LL);
    is_min = cuda_block_reduce<min_op>(is_min, (double)INFINITY);
    is_max = cuda_block_reduce<max_op>(is_max, -(double)INFINITY);
    if (threadIdx.x != 0)
        return;
    const double nt = (double)n_total;
    dapo_metrics_t m{};
    m.tokens = (long)n_total;
    m.seqs = seqs;
    m.pg_tokens = (long)pg_tokens;
    m.pg = pg_sum;
    m.kl = kl_sum;
    m.loss = pg_sum + cfg.kl_beta * kl_sum;
    m.clipfrac_low = low / nt;
    m.clipfrac_high = high / nt;
    m.clipfrac_dual = dual / nt;
    m.approx_kl = approx_kl / nt;
    m.ratio_mean = ratio / nt;
    m.tis_mean_weight = w_sum / nt;
    m.tis_clipped_frac = tis_clipped / nt;
    m.mismatch_kl = mism / nt;
    m.is_min = is_min;
    m.is_max = is_max;
    *out = m;
}

__global__ void dapo_backward_kernel(float *dlogp, const float *logp, const float *logp_old,
                                     const float *logp_b, const float *logp_ref, const float *adv,
                                     const float *mask, int B, int T, dapo_loss_config_t cfg,
                                     double dloss) {
    extern __shared__ int rowcnt[];
    long long n_total;
    int seqs;
    count_tokens(rowcnt, mask, B, T, &n_total, &seqs);
    const size_t n = (size_t)B * T;
    for (size_t i = threadIdx.x; i < n; i += blockDim.x) {
        if (mask[i] == 0) {
            dlogp[i] = 0;
            continue;
        }
        const int b = (int)(i / T);
        const double c = agg_weight(cfg, n_total, seqs, rowcnt[b]) * dloss;
        const double A = adv[i];
        const pg_token_t p = pg_token(logp[i], logp_old[i], A, cfg);
        const double w = fmin(logp_b ? exp((double)logp_old[i] - logp_b[i]) : 1.0, cfg.tis_cap);
        double g = (A != 0 && p.region == REGION_FREE) ? -w * A * p.r : 0;
        if (cfg.kl_beta > 0)
            g += cfg.kl_beta * -expm1((double)logp_ref[i] - logp[i]);
        dlogp[i] = (float)(c * g);
    }
}

int check_args(const char *what, const float *logp, const float *logp_old, const float *logp_ref,
               const float *adv, const float *mask, int B, int T, const dapo_loss_config_t *cfg,
               qerr_t *err) {
    if (B < 0 || T < 0 || B > CUDA_DAPO_MAX_ROWS)
        return qerr_set(err, QERR_RANGE, "%s: batch %d x %d outside [0, %d] x [0, inf)", what, B, T,
                        CUDA_DAPO_MAX_ROWS);
    if ((size_t)B * T > 0 && (!logp || !logp_old || !adv || !mask))
        return qerr_set(err, QERR_RANGE, "%s: logp, logp_old, adv and mask are required", what);
    if (dapo_loss_config_check(cfg, err) != 0)
        return qerr_wrap(err, "%s", what);
    if (cfg->kl_beta > 0 && (size_t)B * T > 0 && !logp_ref)
        return qerr_set(err, QERR_RANGE, "%s: kl_beta %g > 0 needs logp_ref", what, cfg->kl_beta);
    return 0;
}

} // namespace

extern "C" {

int cuda_dapo_loss_forward(dapo_metrics_t *out, const float *logp, const float *logp_old,
                           const float *logp_b, const float *logp_ref, const float *adv,
                           const float *mask, int B, int T, const dapo_loss_config_t *cfg,
                           cudaStream_t s, qerr_t *err) {
    if (check_args("cuda dapo loss forward", logp, logp_old, logp_ref, adv, mask, B, T, cfg, err))
        return -1;
    dapo_forward_kernel<<<1, DAPO_THREADS, (size_t)B * sizeof(int), s>>>(
        out, logp, logp_old, logp_b, logp_ref, adv, mask, B, T, *cfg);
    CUDA_LAUNCH_CHECK();
    return 0;
}

int cuda_dapo_loss_backward(float *dlogp, const float *logp, const float *logp_old,
                            const float *logp_b, const float *logp_ref, const float *adv,
                            const float *mask, int B, int T, const dapo_loss_config_t *cfg,
                            double dloss, cudaStream_t s, qerr_t *err) {
    if (check_args("cuda dapo loss backward", logp, logp_old, logp_ref, adv, mask, B, T, cfg, err))
        return -1;
    if ((size_t)B * T == 0)
        return 0;
    dapo_backward_kernel<<<1, DAPO_THREADS, (size_t)B * sizeof(int), s>>>(
        dlogp, logp, logp_old, logp_b, logp_ref, adv, mask, B, T, *cfg, dloss);
    CUDA_LAUNCH_CHECK();
    return 0;
}

} /* extern "C" */
