#include "rng.h"

#include <math.h>

uint64_t rng_splitmix64(uint64_t x) {
    x += 0x9E3779B97F4A7C15ULL;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ULL;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBULL;
    return x ^ (x >> 31);
}

uint64_t rng_hash(const uint64_t *keys, size_t n) {
    uint64_t h = 0;
    for (size_t i = 0; i < n; i++)
        h = rng_splitmix64(h ^ keys[i]);
    return h;
}

uint64_t rng_plan_word(uint64_t diffusion_seed, uint64_t t, uint64_t w) {
    const uint64_t k[4] = {RNG_TAG_PLAN, diffusion_seed, t, w};
    return rng_hash(k, 4);
}

float rng_sample_uniform(uint64_t run_seed, uint64_t prompt_id, uint64_t sample_index,
                         uint64_t position) {
    const uint64_t k[5] = {RNG_TAG_SAMP, run_seed, prompt_id, sample_index, position};
    return (float)(rng_hash(k, 5) >> 40) / 16777216.0f;
}

void rng_stream_init(rng_stream_t *s, uint64_t tag, uint64_t a, uint64_t b) {
    const uint64_t k[3] = {tag, a, b};
    s->key = rng_hash(k, 3);
    s->counter = 0;
}

uint64_t rng_stream_next_u64(rng_stream_t *s) {
    const uint64_t k[2] = {s->key, s->counter++};
    return rng_hash(k, 2);
}

float rng_stream_uniform(rng_stream_t *s) {
    return (float)(rng_stream_next_u64(s) >> 40) / 16777216.0f;
}

double rng_stream_uniform_f64(rng_stream_t *s) {
    return (double)(rng_stream_next_u64(s) >> 11) / 9007199254740992.0;
}

float rng_stream_normal(rng_stream_t *s) {
    /* 1 - u keeps the log argument in (0, 1]. */
    double u1 = 1.0 - rng_stream_uniform_f64(s);
    double u2 = rng_stream_uniform_f64(s);
    return (float)(sqrt(-2.0 * log(u1)) * cos(2.0 * M_PI * u2));
}
