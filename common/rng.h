/* Counter-based RNG of MODEL.md: a splitmix64 hash chain keyed by a seed and stream ids, so
 * the learner and every worker draw identical noise without sharing state. */
#ifndef QUILLAN_RNG_H
#define QUILLAN_RNG_H

#include <stddef.h>
#include <stdint.h>

/* Domain tags of MODEL.md ("PLAN", "SAMP"), normative. */
#define RNG_TAG_PLAN 0x504C414EULL
#define RNG_TAG_SAMP 0x53414D50ULL

uint64_t rng_splitmix64(uint64_t x);

/* h = 0; for each k: h = splitmix64(h ^ k). */
uint64_t rng_hash(const uint64_t *keys, size_t n);

/* Word w (64 bits) of the initial plan noise z_K at absolute position t:
 * hash(PLAN, diffusion_seed, t, w). Bit b of the code is bit b%64 of word b/64. */
uint64_t rng_plan_word(uint64_t diffusion_seed, uint64_t t, uint64_t w);

/* Token-sampling uniform in [0,1): top 24 bits of
 * hash(SAMP, run_seed, prompt_id, sample_index, position) / 2^24. */
float rng_sample_uniform(uint64_t run_seed, uint64_t prompt_id, uint64_t sample_index,
                         uint64_t position);

/* A keyed stream for everything else that must be reproducible (initialisation, training
 * noise): value i is hash(key, i). Plain struct, embed it. */
typedef struct {
    uint64_t key;
    uint64_t counter;
} rng_stream_t;

/* key = hash(tag, a, b): e.g. (INIT tag, seed, tensor index). */
void rng_stream_init(rng_stream_t *s, uint64_t tag, uint64_t a, uint64_t b);
uint64_t rng_stream_next_u64(rng_stream_t *s);
/* Uniform in [0,1) with 24 bits, exactly representable as float. */
float rng_stream_uniform(rng_stream_t *s);
/* Uniform in [0,1) with 53 bits. */
double rng_stream_uniform_f64(rng_stream_t *s);
/* Standard normal (Box-Muller on two draws; the second value is discarded so that every draw
 * depends only on the counter). */
float rng_stream_normal(rng_stream_t *s);

#endif
