/* Token sampling from one row of logits: temperature, top-k, top-p, greedy, with the
 * log-probability of the sampled token under the distribution actually sampled and under the
 * untruncated tempered softmax (what the learner's forward computes).
 *
 * Given logits z[V] and temperature T > 0, p_i = softmax(z / T) (computed in double from
 * the FP32 values z_i / T, as the learner divides them; see sampler_weights for the exp and
 * the order of the sum). Truncation keeps, in order of decreasing p (equal p by lowest id),
 * the first top_k tokens (top_k > 0), then the shortest prefix of those whose mass reaches
 * top_p of the kept mass (top_p < 1; at least one token); masses of kept tokens are added in
 * that order. The token is drawn by inverse CDF with the caller's uniform u in [0, 1): over the
 * kept set in that order, or over all ids in id order when nothing is truncated. Greedy
 * (T = 0): argmax, lowest id on ties. */
#ifndef QUILLAN_SAMPLER_H
#define QUILLAN_SAMPLER_H

#include "error.h"

#include <stddef.h>
#include <stdint.h>

typedef struct {
    float temperature; /* >= 0; 0 = greedy */
    int top_k;         /* >= 0; 0 = off */
    float top_p;       /* (0, 1]; 1 = off */
} sampler_params_t;

/* Checks the ranges; -1 with err naming the field. */
int sampler_params_check(const sampler_params_t *p, qerr_t *err);

typedef struct {
    int32_t token;
    float logprob;      /* log-probability under the distribution sampled (0 for greedy) */
    float logprob_full; /* log softmax(z / T)[token] without truncation (T = 1 for greedy) */
    int32_t kept;       /* candidates kept (V when nothing was truncated, 1 for greedy) */
} sampler_result_t;

/* Scratch for vocabularies up to V (plain struct: _init / _free). */
typedef struct {
    int V;
    double *p;      /* [V] */
    float *z;       /* [V] tempered logits */
    int32_t *order; /* [V] */
    int32_t *tmp;   /* [V] radix sort scratch */
    uint64_t *key;  /* [2 V] radix sort keys */
    uint32_t *hist; /* [SAMPLER_RADIX_PASSES << SAMPLER_RADIX_BITS] digit counts */
} sampler_scratch_t;

/* Sort of a whole vocabulary by probability (top_p, large top_k): least significant digit
 * radix sort of the 64-bit keys, this many bits per pass. */
#define SAMPLER_RADIX_BITS 11
#define SAMPLER_RADIX_PASSES 6 /* ceil(64 / SAMPLER_RADIX_BITS) */

int sampler_scratch_init(sampler_scratch_t *s, int V, qerr_t *err);
void sampler_scratch_free(sampler_scratch_t *s);

/* The unnormalised tempered softmax of logits[V] (finite): z[i] = logits[i] / T in FP32
 * (logits[i] itself when T == 0), p[i] = e^(z_i - max_j z_j) in double; returns sum_i p[i].
 * e^x is a polynomial that vectorises, within 1 ulp of the exact value (libm's exp, which
 * costs ~10x more, can differ from it in the last bit). The sum runs in 8 lanes (id i in lane
 * i % 8) added by a fixed pairwise tree, so its bits depend on p alone. p and z [V] are the
 * caller's (a scratch's). */
double sampler_weights(double *p, float *z, const float *logits, int V, float T);

/* Samples one token from logits[V] (finite) with uniform u in [0, 1). */
void sampler_sample(sampler_result_t *out, const float *logits, int V, const sampler_params_t *p,
                    float u, sampler_scratch_t *s);

#endif
