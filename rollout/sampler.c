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

int sampler_scratch_init(sampler_scratch_t *s, int V, qerr_t *err) {
    memset(s, 0, sizeof *s);
    s->p = malloc((size_t)V * sizeof *s->p);
    s->order = malloc((size_t)V * sizeof *s->order);
    if (!s->p || !s->order) {
        sampler_scratch_free(s);
        return qerr_set(err, QERR_NOMEM, "sampler: out of memory for %d probabilities", V);
    }
    s->V = V;
    return 0;
}

void sampler_scratch_free(sampler_scratch_t *s) {
    free(s->p);
    free(s->order);
    memset(s, 0, sizeof *s);
}

/* Orders candidates by decreasing probability, then increasing id (qsort_r: no global state,
 * so samplers may run on several threads). */
static int cmp_prob(const void *a, const void *b, void *ctx) {
    const double *p = ctx;
    const int32_t x = *(const int32_t *)a, y = *(const int32_t *)b;
    if (p[x] != p[y])
        return p[x] > p[y] ? -1 : 1;
    return x < y ? -1 : x > y;
}

static void sort_by_prob(int32_t *order, int n, const double *p) {
    qsort_r(order, (size_t)n, sizeof *order, cmp_prob, (void *)(uintptr_t)p);
}

/* The k most probable ids (ties by lowest id) in order, by repeated selection when k is small. */
static int select_top(int32_t *order, const double *p, int V, int k) {
    if (k >= V || k > 64) {
        for (int i = 0; i < V; i++)
            order[i] = i;
        sort_by_prob(order, V, p);
        return k < V ? k : V;
    }
    for (int s = 0; s < k; s++) {
        int best = -1;
        for (int i = 0; i < V; i++) {
            int taken = 0;
            for (int j = 0; j < s && !taken; j++)
                taken = order[j] == i;
            if (!taken && (best < 0 || p[i] > p[best]))
                best = i;
        }
        order[s] = best;
    }
    return k;
}

void sampler_sample(sampler_result_t *out, const float *logits, int V, const sampler_params_t *prm,
                    float u, sampler_scratch_t *s) {
    Q_ASSERT(V >= 1 && V <= s->V);
    double *p = s->p;
    if (prm->temperature == 0) {
        int best = 0;
        for (int i = 1; i < V; i++)
            if (logits[i] > logits[best])
                best = i;
        float mx = logits[best];
        double sum = 0;
        for (int i = 0; i < V; i++)
            sum += exp((double)(logits[i] - mx));
        out->token = best;
        out->logprob = 0;
        out->logprob_full = (float)(-log(sum));
        out->kept = 1;
        return;
    }
    /* z_i = logits_i / T in FP32, as the learner's head divides them. */
    const float T = prm->temperature;
    float mx = -INFINITY;
    for (int i = 0; i < V; i++)
        mx = fmaxf(mx, logits[i] / T);
    double sum = 0;
    for (int i = 0; i < V; i++) {
        p[i] = exp((double)(logits[i] / T - mx));
        sum += p[i];
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
        int32_t *order = s->order;
        kept = select_top(order, p, V, prm->top_k > 0 ? prm->top_k : V);
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
