#include "qtest.h"

#include "rng.h"

/* splitmix64 reference values: the first outputs of the canonical splitmix64 generator seeded
 * with 0 (state advances by the golden gamma; each output is mix(state)). */
Test(rng, splitmix64_reference_values) {
    cr_assert_eq(rng_splitmix64(0), 0xE220A8397B1DCDAFULL);
    cr_assert_eq(rng_splitmix64(0x9E3779B97F4A7C15ULL), 0x6E789E6AA1B965F4ULL);
}

Test(rng, hash_chain_matches_definition) {
    uint64_t k[3] = {1, 2, 3};
    uint64_t h = rng_splitmix64(rng_splitmix64(rng_splitmix64(0 ^ 1) ^ 2) ^ 3);
    cr_assert_eq(rng_hash(k, 3), h);
    cr_assert_eq(rng_hash(k, 0), 0);
}

Test(rng, plan_word_and_sample_uniform_follow_model_md) {
    uint64_t k4[4] = {RNG_TAG_PLAN, 42, 7, 3};
    cr_assert_eq(rng_plan_word(42, 7, 3), rng_hash(k4, 4));
    uint64_t k5[5] = {RNG_TAG_SAMP, 9, 100, 2, 17};
    float u = rng_sample_uniform(9, 100, 2, 17);
    cr_assert_eq(u, (float)(rng_hash(k5, 5) >> 40) / 16777216.0f);
    cr_assert(u >= 0.0f && u < 1.0f);
}

Test(rng, stream_is_reproducible_and_roughly_normal) {
    rng_stream_t a, b;
    rng_stream_init(&a, 1, 2, 3);
    rng_stream_init(&b, 1, 2, 3);
    double sum = 0, sum2 = 0;
    const int n = 20000;
    for (int i = 0; i < n; i++) {
        float x = rng_stream_normal(&a);
        cr_assert_eq(x, rng_stream_normal(&b));
        sum += x;
        sum2 += (double)x * x;
    }
    double mean = sum / n, var = sum2 / n - mean * mean;
    cr_assert(mean > -0.05 && mean < 0.05, "mean %f", mean);
    cr_assert(var > 0.95 && var < 1.05, "var %f", var);
    rng_stream_t c;
    rng_stream_init(&c, 1, 2, 4);
    cr_assert_neq(rng_stream_next_u64(&c), rng_stream_next_u64(&b));
}
