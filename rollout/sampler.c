#include "sampler.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

int sampler_params_check(const sampler_params_t *p, qerr_t *err) {
    if (!(p->temperature >= 0) || !isfinite(p->temperature))
        return qerr_set(err, QERR_RANGE, "temperature %g must be >= 0 (0 = greedy)",
                        (double)p->temperature);
    if (p->top_k < 0)
        return qerr_set(err, QERR_RANGE, "top_k %d must be >= 0 (0 = off)", p->top_k);
    if (!(p->top_p > 0 && p->top_p <= 1))
        return qerr_set(err, QERR_RANGE, "top_p %g must be in (0, 1]", (double)p->top_p);
    return 0;
}

#define RADIX_N (1u << SAMPLER_RADIX_BITS)

int sampler_scratch_init(sampler_scratch_t *s, int V, qerr_t *err) {
    memset(s, 0, sizeof *s);
    s->p = malloc((size_t)V * sizeof *s->p);
    s->z = malloc((size_t)V * sizeof *s->z);
    s->order = malloc((size_t)V * sizeof *s->order);
    s->tmp = malloc((size_t)V * sizeof *s->tmp);
    s->key = malloc(2 * (size_t)V * sizeof *s->key);
    s->hist = malloc((size_t)SAMPLER_RADIX_PASSES * RADIX_N * sizeof *s->hist);
    if (!s->p || !s->z || !s->order || !s->tmp || !s->key || !s->hist) {
        sampler_scratch_free(s);
        return qerr_set(err, QERR_NOMEM, "sampler: out of memory for %d probabilities", V);
    }
    s->V = V;
    return 0;
}

void sampler_scratch_free(sampler_scratch_t *s) {
    free(s->p);
    free(s->z);
    free(s->order);
    free(s->tmp);
    free(s->key);
    free(s->hist);
    memset(s, 0, sizeof *s);
}

/* ---- weights ---- */

/* e^d for d <= 0 (+-0 included), within 1 ulp. Branch-free, so that the loop over a vocabulary
 * vectorises: d is clamped at -746 (e^-746 rounds to 0) on its bits (for negative floats a
 * larger magnitude has larger bits; an unsigned minimum vectorises where a float comparison
 * is kept as a branch without -ffast-math); d = n ln2 + r, |r| <= ln2 / 2 (Cody-Waite, n
 * rounded by the 1.5 * 2^52 shift); e^r = 1 + (r + r^2 P(r)) with the Taylor terms up to
 * r^13 / 13! (truncation below 1e-17); then times 2^(-a) 2^(-b), a + b = -n, two factors so
 * that subnormal results round once. */
static inline double exp_nonpos(float d) {
    const uint32_t lim = 0xC43A8000u; /* bits of -746.0f */
    uint32_t u;
    memcpy(&u, &d, sizeof u);
    u = u < lim ? u : lim;
    memcpy(&d, &u, sizeof d);
    const double x = (double)d;
    const double shift = 0x1.8p52, log2e = 0x1.71547652b82fep0;
    const double ln2_hi = 0x1.62e42fefa3800p-1, ln2_lo = 0x1.ef35793c76730p-45;
    const double t = x * log2e + shift;
    const double n = t - shift;
    const double r = (x - n * ln2_hi) - n * ln2_lo;
    double q = 1.0 / 6227020800.0;
    q = q * r + 1.0 / 479001600.0;
    q = q * r + 1.0 / 39916800.0;
    q = q * r + 1.0 / 3628800.0;
    q = q * r + 1.0 / 362880.0;
    q = q * r + 1.0 / 40320.0;
    q = q * r + 1.0 / 5040.0;
    q = q * r + 1.0 / 720.0;
    q = q * r + 1.0 / 120.0;
    q = q * r + 1.0 / 24.0;
    q = q * r + 1.0 / 6.0;
    q = q * r + 0.5;
    q = 1.0 + (r + r * r * q);
    /* The low bits of t hold n (<= 0): -n = bits(shift) - bits(t), at most 1077. */
    uint64_t tb, sb;
    memcpy(&tb, &t, sizeof tb);
    memcpy(&sb, &shift, sizeof sb);
    const uint64_t m = sb - tb, a = m >> 1, b = m - a;
    const uint64_t ea = (1023 - a) << 52, eb = (1023 - b) << 52;
    double fa, fb;
    memcpy(&fa, &ea, sizeof fa);
    memcpy(&fb, &eb, sizeof fb);
    return q * fa * fb;
}

/* Lanes of the maximum and of the sum below: element i in lane i % SUM_LANES, the lanes
 * combined by a fixed pairwise tree, so both vectorise and the sum's bits depend on p alone. */
#define SUM_LANES 8

/* max z[V] (the value does not depend on the order: the logits are finite). */
static float lane_max(const float *z, int V) {
    float m[SUM_LANES];
    for (int j = 0; j < SUM_LANES; j++)
        m[j] = z[0];
    int i = 0;
    for (; i + SUM_LANES <= V; i += SUM_LANES)
        for (int j = 0; j < SUM_LANES; j++)
            m[j] = z[i + j] > m[j] ? z[i + j] : m[j];
    for (int j = 0; i + j < V; j++)
        m[j] = z[i + j] > m[j] ? z[i + j] : m[j];
    for (int w = SUM_LANES / 2; w >= 1; w /= 2)
        for (int j = 0; j < w; j++)
            m[j] = m[j + w] > m[j] ? m[j + w] : m[j];
    return m[0];
}

static double lane_sum(const double *p, int V) {
    double acc[SUM_LANES] = {0};
    int i = 0;
    for (; i + SUM_LANES <= V; i += SUM_LANES)
        for (int j = 0; j < SUM_LANES; j++)
            acc[j] += p[i + j];
    for (int j = 0; i + j < V; j++)
        acc[j] += p[i + j];
    for (int w = SUM_LANES / 2; w >= 1; w /= 2)
        for (int j = 0; j < w; j++)
            acc[j] += acc[j + w];
    return acc[0];
}

double sampler_weights(double *p, float *z, const float *logits, int V, float T) {
    Q_ASSERT(V >= 1 && T >= 0);
    if (T == 0)
        memcpy(z, logits, (size_t)V * sizeof *z);
    else
        for (int i = 0; i < V; i++)
            z[i] = logits[i] / T;
    const float mx = lane_max(z, V);
    for (int i = 0; i < V; i++)
        p[i] = exp_nonpos(z[i] - mx);
    return lane_sum(p, V);
}

/* ---- order by probability ---- */

/* order[V] = every id by decreasing p, equal p by increasing id: a stable radix sort of the
 * keys ~bits(p) (p >= +0, whose bits grow with its value), started in id order. Passes whose
 * digit is the same for every key are skipped. */
static void sort_by_prob(int32_t *order, const double *p, int V, sampler_scratch_t *s) {
    uint64_t *ka = s->key, *kb = s->key + V;
    int32_t *oa = order, *ob = s->tmp;
    uint32_t *h = s->hist;
    memset(h, 0, (size_t)SAMPLER_RADIX_PASSES * RADIX_N * sizeof *h);
    for (int i = 0; i < V; i++) {
        uint64_t bits;
        memcpy(&bits, &p[i], sizeof bits);
        ka[i] = ~bits;
        oa[i] = i;
        for (int ps = 0; ps < SAMPLER_RADIX_PASSES; ps++)
            h[ps * RADIX_N + ((ka[i] >> (ps * SAMPLER_RADIX_BITS)) & (RADIX_N - 1))]++;
    }
    for (int ps = 0; ps < SAMPLER_RADIX_PASSES; ps++) {
        const int sh = ps * SAMPLER_RADIX_BITS;
        uint32_t *hp = h + ps * RADIX_N;
        if (hp[(ka[0] >> sh) & (RADIX_N - 1)] == (uint32_t)V)
            continue;
        uint32_t at = 0;
        for (uint32_t d = 0; d < RADIX_N; d++) {
            const uint32_t c = hp[d];
            hp[d] = at;
            at += c;
        }
        for (int i = 0; i < V; i++) {
            const uint32_t o = hp[(ka[i] >> sh) & (RADIX_N - 1)]++;
            kb[o] = ka[i];
            ob[o] = oa[i];
        }
        uint64_t *tk = ka;
        ka = kb;
        kb = tk;
        int32_t *to = oa;
        oa = ob;
        ob = to;
    }
    if (oa != order)
        memcpy(order, oa, (size_t)V * sizeof *order);
}

/* Largest k served by insertion into a sorted list (one comparison per id once the list is
 * full, plus a binary search and a move per insertion); beyond, a whole sort. */
#define TOPK_INSERT_MAX 256

/* order[0, k) = the k most probable ids in the order above; returns min(k, V). */
static int select_top(sampler_scratch_t *s, const double *p, int V, int k) {
    int32_t *order = s->order;
    if (k >= V || k > TOPK_INSERT_MAX) {
        sort_by_prob(order, p, V, s);
        return k < V ? k : V;
    }
    int m = 0;
    for (int i = 0; i < V; i++) {
        if (m == k && !(p[i] > p[order[k - 1]]))
            continue;
        /* After every listed id with p >= p[i]: those with equal p have lower ids. */
        int lo = 0, hi = m;
        while (lo < hi) {
            const int mid = (lo + hi) / 2;
            if (p[order[mid]] >= p[i])
                lo = mid + 1;
            else
                hi = mid;
        }
        const int end = m < k ? m : k - 1;
        memmove(order + lo + 1, order + lo, (size_t)(end - lo) * sizeof *order);
        order[lo] = i;
        m += m < k;
    }
    return k;
}

/* ---- sampling ---- */

void sampler_sample(sampler_result_t *out, const float *logits, int V, const sampler_params_t *prm,
                    float u, sampler_scratch_t *s) {
    Q_ASSERT(V >= 1 && V <= s->V);
    double *p = s->p;
    const double sum = sampler_weights(p, s->z, logits, V, prm->temperature);
    if (prm->temperature == 0) {
        int best = 0;
        for (int i = 1; i < V; i++)
            if (logits[i] > logits[best])
                best = i;
        out->token = best;
        out->logprob = 0;
        out->logprob_full = (float)(-log(sum));
        out->kept = 1;
        return;
    }
    const int truncate = (prm->top_k > 0 && prm->top_k < V) || prm->top_p < 1;
    int32_t tok = V - 1;
    double kept_mass = sum;
    int kept = V;
    if (!truncate) {
        const double target = (double)u * sum;
        double c = 0;
        for (int i = 0; i < V; i++) {
            c += p[i];
            if (c > target) {
                tok = i;
                break;
            }
        }
        /* Rounding can leave c <= target at the end: the last token with p > 0 then. */
        if (c <= target)
            while (tok > 0 && p[tok] == 0)
                tok--;
    } else {
        const int32_t *order = s->order;
        kept = select_top(s, p, V, prm->top_k > 0 ? prm->top_k : V);
        kept_mass = 0;
        for (int i = 0; i < kept; i++)
            kept_mass += p[order[i]];
        if (prm->top_p < 1) {
            const double need = (double)prm->top_p * kept_mass;
            double c = 0;
            int n = 0;
            while (n < kept) {
                c += p[order[n++]];
                if (c >= need)
                    break;
            }
            kept = n;
            kept_mass = c;
        }
        const double target = (double)u * kept_mass;
        double c = 0;
        tok = order[kept - 1];
        for (int i = 0; i < kept; i++) {
            c += p[order[i]];
            if (c > target) {
                tok = order[i];
                break;
            }
        }
    }
    out->token = tok;
    out->logprob = (float)log(p[tok] / kept_mass);
    out->logprob_full = (float)log(p[tok] / sum);
    out->kept = kept;
}
