/* Bit-level diffusion (float build, quantized BitLinears): packed bit helpers, schedule, n_k
 * rounding, the plan noise against the RNG definition, the sampler step by hand, sampler
 * determinism across batch layouts, replay and its mismatch count, SimHash codes, the loss. */
#include "qtest.h"

#include "diffusion.h"
#include "quant.h"
#include "rng.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

Test(diffusion, packed_xor_and_popcount_match_bitwise_reference) {
    rng_stream_t r;
    rng_stream_init(&r, 31, 1, 0);
    for (int Lb = 32; Lb <= 256; Lb += 32) {
        int Lw = diffusion_words(Lb);
        cr_assert_eq(Lw, (Lb + 63) / 64);
        uint64_t a[4] = {0}, b[4] = {0}, x[4];
        int ra[256], rb[256], pop = 0;
        for (int i = 0; i < Lb; i++) {
            ra[i] = rng_stream_uniform(&r) < 0.5f;
            rb[i] = rng_stream_uniform(&r) < 0.3f;
            diffusion_bit_set(a, i, ra[i]);
            diffusion_bit_set(b, i, rb[i]);
        }
        for (int i = 0; i < Lb; i++) {
            cr_assert_eq(diffusion_bit_get(a, i), ra[i]);
            cr_assert_eq((int)((a[i / 64] >> (i % 64)) & 1), ra[i], "bit %d is bit %d of word %d",
                         i, i % 64, i / 64);
        }
        diffusion_bits_xor(x, a, b, Lw);
        for (int i = 0; i < Lb; i++) {
            cr_assert_eq(diffusion_bit_get(x, i), ra[i] ^ rb[i]);
            pop += ra[i] ^ rb[i];
        }
        cr_assert_eq(diffusion_bits_popcount(x, Lw), pop);
        diffusion_bits_xor(a, a, a, Lw);
        cr_assert_eq(diffusion_bits_popcount(a, Lw), 0);
    }
}

Test(diffusion, schedule_endpoints_and_shape) {
    cr_assert(diffusion_flip_prob(1.0) == 0.5, "p(1) = 1/2 exactly");
    cr_assert(diffusion_flip_prob(0.0) == 0.0);
    cr_assert(diffusion_flip_prob(0.5) == 0.25);
    double prev = 0;
    for (int i = 1; i <= 100; i++) {
        double tau = i / 100.0, p = diffusion_flip_prob(tau);
        double c = cos(M_PI * tau / 2), ref = (1 - c * c) / 2;
        cr_assert_float_eq(p, ref, 1e-15, "tau %f", tau);
        cr_assert(p > prev);
        prev = p;
    }
}

Test(diffusion, nflip_rounds_half_away_from_zero) {
    /* K = 2: p_1 / p_2 = 0.25 / 0.5 = 0.5 exactly, so odd popcounts land on halves. */
    cr_assert_eq(diffusion_plan_nflip(2, 2, 1), 1);
    cr_assert_eq(diffusion_plan_nflip(2, 2, 3), 2);
    cr_assert_eq(diffusion_plan_nflip(2, 2, 5), 3, "2.5 rounds to 3, not to even 2");
    cr_assert_eq(diffusion_plan_nflip(2, 2, 4), 2);
    cr_assert_eq(diffusion_plan_nflip(1, 2, 7), 0, "the last step keeps x0");
    for (int K = 1; K <= 10; K++)
        for (int k = 1; k <= K; k++)
            for (int pc = 0; pc <= 64; pc += 7) {
                double x = diffusion_flip_prob((double)(k - 1) / K) /
                           diffusion_flip_prob((double)k / K) * pc;
                int n = diffusion_plan_nflip(k, K, pc);
                cr_assert(fabs(n - x) <= 0.5 && n >= 0 && n <= pc, "K %d k %d pc %d", K, k, pc);
            }
}

Test(diffusion, plan_noise_is_the_rng_definition) {
    const uint64_t seed = 5678;
    for (int Lb = 32; Lb <= 160; Lb += 32) {
        uint64_t z[3];
        for (uint64_t pos = 0; pos < 20; pos += 3) {
            memset(z, 0xAB, sizeof z);
            diffusion_plan_noise(z, seed, pos, Lb);
            for (int b = 0; b < 64 * diffusion_words(Lb); b++) {
                uint64_t k[4] = {0x504C414EULL, seed, pos, (uint64_t)(b / 64)};
                int want = b < Lb ? (int)((rng_hash(k, 4) >> (b % 64)) & 1) : 0;
                cr_assert_eq(diffusion_bit_get(z, b), want, "Lb %d pos %d bit %d", Lb, (int)pos, b);
            }
        }
    }
}

Test(diffusion, plan_step_by_hand) {
    /* Lb 32, z has bit 0 and bit 3 set. Flips predicted (l > 0) at bits 1, 3, 5, 7 with
     * confidences from |l| = 1, 0.5, 0.5, 0.5; everything else l = -2. K = k = 2 gives
     * n = round(0.5 * 4) = 2: bits 3 and 5 (equal confidence, lowest indices) are re-noised. */
    real l[32];
    for (int b = 0; b < 32; b++)
        l[b] = -2;
    l[1] = 1;
    l[3] = l[5] = l[7] = 0.5f;
    uint64_t z[1] = {(1ULL << 0) | (1ULL << 3)}, zp[1];
    int n = diffusion_plan_step(zp, z, l, 2, 2, 32);
    cr_assert_eq(n, 2);
    /* x0 = z ^ e = {0, 1, 5, 7}; re-noising 3 and 5 gives {0, 1, 3, 7}. */
    uint64_t want = (1ULL << 0) | (1ULL << 1) | (1ULL << 3) | (1ULL << 7);
    cr_assert_eq(zp[0], want, "got %llx", (unsigned long long)zp[0]);
    /* The last step returns x0 itself. */
    n = diffusion_plan_step(zp, z, l, 1, 2, 32);
    cr_assert_eq(n, 0);
    cr_assert_eq(zp[0], (1ULL << 0) | (1ULL << 1) | (1ULL << 5) | (1ULL << 7));
}

/* diffusion_plan_step as its contract states it: n minimum scans by confidence |2 pi - 1| over
 * the remaining predicted flips, strict < so the lowest bit index wins among equal ones. */
static int plan_step_scan(uint64_t *zp, const uint64_t *z, const real *l, int k, int K, int Lb) {
    const int Lw = diffusion_words(Lb);
    uint64_t *e = calloc((size_t)Lw, sizeof *e);
    cr_assert_not_null(e);
    for (int b = 0; b < Lb; b++)
        if (1 / (1 + expf(-l[b])) > 0.5f)
            diffusion_bit_set(e, b, 1);
    diffusion_bits_xor(zp, z, e, Lw);
    const int n = diffusion_plan_nflip(k, K, diffusion_bits_popcount(e, Lw));
    for (int i = 0; i < n; i++) {
        int best = -1;
        float best_c = 0;
        for (int b = 0; b < Lb; b++) {
            const float c = fabsf(2 * (1 / (1 + expf(-l[b]))) - 1);
            if (diffusion_bit_get(e, b) && (best < 0 || c < best_c)) {
                best = b;
                best_c = c;
            }
        }
        cr_assert(best >= 0);
        diffusion_bit_set(e, best, 0);
        diffusion_bit_set(zp, best, !diffusion_bit_get(zp, best));
    }
    free(e);
    return n;
}

/* The sampler step against the scans on random logits, with many equal confidences (logits
 * from a few levels, both signs, and huge ones whose pi rounds to 1), for code lengths on both
 * sides of the word size and of the stack sort's limit, at every k. */
Test(diffusion, plan_step_matches_minimum_scans) {
    const int lens[] = {1, 2, 63, 64, 65, 256, 1024, 1025, 2100};
    const int K = 10;
    rng_stream_t r;
    rng_stream_init(&r, 33, 7, 0);
    for (size_t li = 0; li < sizeof lens / sizeof *lens; li++) {
        const int Lb = lens[li], Lw = diffusion_words(Lb);
        real *l = malloc((size_t)Lb * sizeof *l);
        uint64_t *z = calloc((size_t)Lw, 8), *zp = calloc((size_t)Lw, 8),
                 *want = calloc((size_t)Lw, 8);
        cr_assert(l && z && zp && want);
        for (int trial = 0; trial < 6; trial++) {
            for (int b = 0; b < Lb; b++) {
                const float u = rng_stream_uniform(&r);
                l[b] = trial % 3 == 0   ? 3 * rng_stream_normal(&r)
                       : trial % 3 == 1 ? (float)((int)(u * 9) - 4) * 0.25f
                                        : (u < 0.2f ? 200.0f : (float)((int)(u * 5) - 1));
            }
            diffusion_plan_noise(z, 99, (uint64_t)trial, Lb);
            for (int k = 1; k <= K; k++) {
                const int nw = plan_step_scan(want, z, l, k, K, Lb);
                const int n = diffusion_plan_step(zp, z, l, k, K, Lb);
                cr_assert_eq(n, nw, "Lb %d trial %d k %d", Lb, trial, k);
                cr_assert(memcmp(zp, want, (size_t)Lw * 8) == 0, "Lb %d trial %d k %d", Lb, trial,
                          k);
            }
        }
        free(l);
        free(z);
        free(zp);
        free(want);
    }
}

/* A stage with random weights (norm gains near 1) in one buffer. */
typedef struct {
    diffusion_dims_t d;
    real *buf;
    diffusion_params_t p;
} stage_t;

static void stage_init(stage_t *s, diffusion_dims_t d, uint64_t seed) {
    s->d = d;
    size_t sz[DIFFUSION_NUM_TENSORS], n = diffusion_params_sizes(&d, sz);
    s->buf = malloc(n * sizeof(real));
    cr_assert_not_null(s->buf);
    rng_stream_t r;
    rng_stream_init(&r, 32, seed, 0);
    size_t off = 0;
    for (int t = 0; t < DIFFUSION_NUM_TENSORS; t++) {
        int is_norm =
            t == 1 || t == 3 || t == 5 || t == 6 || t == 8 || t == 10 || t == 12 || t == 14;
        for (size_t i = 0; i < sz[t]; i++)
            s->buf[off + i] = is_norm ? 1 + 0.1f * rng_stream_normal(&r) : rng_stream_normal(&r);
        off += sz[t];
    }
    diffusion_params_map(&s->p, s->buf, &d);
}

static real *randv(size_t n, uint64_t seed) {
    real *v = malloc(n * sizeof(real));
    cr_assert_not_null(v);
    rng_stream_t r;
    rng_stream_init(&r, 33, seed, 0);
    for (size_t i = 0; i < n; i++)
        v[i] = rng_stream_normal(&r);
    return v;
}

static const diffusion_dims_t DIMS = {
    .C = 24, .Lb = 64, .W = 32, .NB = 2, .F = 48, .D = 16, .K = 4};

Test(diffusion, sampler_is_deterministic_per_position_and_replays) {
    quant_surrogate_set(0);
    const diffusion_dims_t d = DIMS;
    const int BT = 6, Lw = diffusion_words(d.Lb);
    stage_t s;
    stage_init(&s, d, 1);
    real *u = randv((size_t)BT * d.C, 2);
    real *out = malloc(sizeof(real) * BT * d.C), *out2 = malloc(sizeof(real) * BT * d.C);
    int32_t pos[6] = {0, 1, 2, 3, 4, 100};
    diffusion_acts_t *a = diffusion_acts_new(&d, BT, NULL);
    cr_assert_not_null(a);
    diffusion_aux_t aux;
    cr_assert_eq(diffusion_forward(a, out, &aux, u, pos, &s.p, NULL, 77, &d, BT, NULL), 0);
    cr_assert_eq(aux.positions, BT);
    diffusion_plan_t rec;
    cr_assert_eq(diffusion_plan_init(&rec, d.Lb, BT, NULL), 0);
    const diffusion_plan_t *pl = diffusion_acts_plan(a);
    rec.BT = BT;
    memcpy(rec.z1, pl->z1, sizeof(uint64_t) * BT * Lw);
    memcpy(rec.z0, pl->z0, sizeof(uint64_t) * BT * Lw);
    cr_assert_eq(diffusion_plan_validate(&rec, d.Lb, BT, NULL), 0);

    /* Same seed and position, alone in a batch of one: same plan and same write-back bits
     * (every BitLinear sums exact integers, so the batch layout cannot matter). */
    for (int t = 0; t < BT; t++) {
        cr_assert_eq(
            diffusion_forward(a, out2, &aux, u + t * d.C, pos + t, &s.p, NULL, 77, &d, 1, NULL), 0);
        cr_assert(memcmp(pl->z0, rec.z0 + t * Lw, sizeof(uint64_t) * Lw) == 0, "plan of pos %d", t);
        cr_assert(memcmp(pl->z1, rec.z1 + t * Lw, sizeof(uint64_t) * Lw) == 0);
        cr_assert(memcmp(out2, out + t * d.C, sizeof(real) * d.C) == 0, "write-back of pos %d", t);
    }
    /* Another seed gives other plans. */
    cr_assert_eq(diffusion_forward(a, out2, &aux, u, pos, &s.p, NULL, 78, &d, BT, NULL), 0);
    cr_assert(memcmp(pl->z0, rec.z0, sizeof(uint64_t) * BT * Lw) != 0);

    /* Replay reproduces the forward exactly with no mismatch. */
    cr_assert_eq(diffusion_forward(a, out2, &aux, u, pos, &s.p, &rec, 77, &d, BT, NULL), 0);
    cr_assert_eq(aux.mismatches, 0);
    cr_assert(memcmp(out, out2, sizeof(real) * BT * d.C) == 0);
    /* A recorded plan that differs at position 2 is used as given and counted. */
    diffusion_bit_set(rec.z0 + 2 * Lw, 5, !diffusion_bit_get(rec.z0 + 2 * Lw, 5));
    cr_assert_eq(diffusion_forward(a, out2, &aux, u, pos, &s.p, &rec, 77, &d, BT, NULL), 0);
    cr_assert_eq(aux.mismatches, 1);
    for (int t = 0; t < BT; t++)
        cr_assert_eq(memcmp(out + t * d.C, out2 + t * d.C, sizeof(real) * d.C) == 0, t != 2);
    /* Malformed records are refused. */
    qerr_t err = {0};
    rec.BT = BT + 1;
    cr_assert_eq(diffusion_forward(a, out2, &aux, u, pos, &s.p, &rec, 77, &d, BT, &err), -1);
    cr_assert_eq(err.code, QERR_INVALID);

    diffusion_plan_free(&rec);
    diffusion_acts_destroy(&a);
    cr_assert_null(a);
    free(u);
    free(out);
    free(out2);
    free(s.buf);
}

Test(diffusion, one_step_sampler_starts_from_the_plan_noise) {
    quant_surrogate_set(0);
    diffusion_dims_t d = DIMS;
    d.Lb = 96; /* a half-used last word */
    d.K = 1;
    const int BT = 3, Lw = diffusion_words(d.Lb);
    stage_t s;
    stage_init(&s, d, 3);
    real *u = randv((size_t)BT * d.C, 4), *out = malloc(sizeof(real) * BT * d.C);
    int32_t pos[3] = {7, 8, 4096};
    diffusion_acts_t *a = diffusion_acts_new(&d, BT, NULL);
    diffusion_aux_t aux;
    cr_assert_eq(diffusion_forward(a, out, &aux, u, pos, &s.p, NULL, 9, &d, BT, NULL), 0);
    const diffusion_plan_t *pl = diffusion_acts_plan(a);
    for (int t = 0; t < BT; t++) {
        uint64_t z[2];
        diffusion_plan_noise(z, 9, (uint64_t)pos[t], d.Lb);
        cr_assert(memcmp(z, pl->z1 + t * Lw, sizeof z) == 0, "z_K of position %d", pos[t]);
    }
    diffusion_plan_t bad;
    cr_assert_eq(diffusion_plan_init(&bad, d.Lb, BT, NULL), 0);
    bad.BT = BT;
    bad.z0[1] = 1ULL << 40; /* bit 104 of a 96-bit code */
    qerr_t err = {0};
    cr_assert_eq(diffusion_plan_validate(&bad, d.Lb, BT, &err), -1);
    cr_assert(strstr(err.msg, "position 0") != NULL, "%s", err.msg);
    diffusion_plan_free(&bad);
    diffusion_acts_destroy(&a);
    free(u);
    free(out);
    free(s.buf);
}

Test(diffusion, simhash_code_matches_double_reference) {
    const int Lb = 64, C = 40;
    real *R = malloc(sizeof(real) * Lb * C), *R2 = malloc(sizeof(real) * Lb * C);
    diffusion_simhash_init(R, Lb, C, 5);
    diffusion_simhash_init(R2, Lb, C, 5);
    cr_assert(memcmp(R, R2, sizeof(real) * Lb * C) == 0, "R is a function of the seed");
    real *w = randv((size_t)C, 6);
    uint64_t code[1];
    diffusion_code(code, R, w, Lb, C);
    int ones = 0;
    for (int b = 0; b < Lb; b++) {
        double s = 0;
        for (int c = 0; c < C; c++)
            s += (double)R[b * C + c] * w[c];
        if (fabs(s) > 1e-4)
            cr_assert_eq(diffusion_bit_get(code, b), s > 0, "bit %d", b);
        ones += diffusion_bit_get(code, b);
    }
    cr_assert(ones > 8 && ones < 56, "a random hyperplane hash is balanced (%d ones)", ones);
    free(R);
    free(R2);
    free(w);
}

Test(diffusion, noise_draw_is_reproducible_and_follows_p) {
    const int BT = 400, Lb = 64;
    real tau[400], tau2[400];
    uint64_t *m = calloc((size_t)BT, sizeof(uint64_t)), *m2 = calloc((size_t)BT, sizeof(uint64_t));
    rng_stream_t r, r2;
    rng_stream_init(&r, 34, 1, 2);
    rng_stream_init(&r2, 34, 1, 2);
    diffusion_noise_draw(tau, m, &r, BT, Lb);
    diffusion_noise_draw(tau2, m2, &r2, BT, Lb);
    cr_assert(memcmp(tau, tau2, sizeof tau) == 0 && memcmp(m, m2, sizeof(uint64_t) * BT) == 0);
    double flips = 0, expect = 0;
    for (int t = 0; t < BT; t++) {
        cr_assert(tau[t] > 0 && tau[t] <= 1);
        flips += diffusion_bits_popcount(m + t, 1);
        expect += Lb * diffusion_flip_prob(tau[t]);
    }
    /* Binomial count with variance < BT * Lb / 4: 6 sigma is ~480 here. */
    cr_assert(fabs(flips - expect) < 6 * sqrt(BT * Lb / 4.0), "flips %f expected %f", flips,
              expect);
    free(m);
    free(m2);
}

Test(diffusion, loss_of_a_zero_denoiser_is_ln2) {
    quant_surrogate_set(0);
    const diffusion_dims_t d = DIMS;
    const int BT = 4, Lw = diffusion_words(d.Lb);
    stage_t s;
    stage_init(&s, d, 7);
    memset(s.p.out_w, 0, sizeof(real) * d.Lb * d.W); /* flip logits all 0 */
    real *u = randv((size_t)BT * d.C, 8);
    uint64_t code[4], m[4];
    real tau[4], mask[4] = {1, 0, 1, 1};
    rng_stream_t r;
    rng_stream_init(&r, 35, 0, 0);
    diffusion_noise_draw(tau, m, &r, BT, d.Lb);
    for (int t = 0; t < BT * Lw; t++)
        code[t] = rng_stream_next_u64(&r);
    diffusion_acts_t *a = diffusion_acts_new(&d, BT, NULL);
    real loss = diffusion_loss_forward(a, code, m, tau, mask, u, &s.p, &d, BT);
    cr_assert_float_eq(loss, log(2.0), 1e-6, "loss %f", (double)loss);
    real none[4] = {0, 0, 0, 0};
    cr_assert_float_eq(diffusion_loss_forward(a, code, m, tau, none, u, &s.p, &d, BT), 0, 0);
    /* With real weights the loss is finite and positive. */
    free(s.buf);
    stage_init(&s, d, 7);
    loss = diffusion_loss_forward(a, code, m, tau, mask, u, &s.p, &d, BT);
    cr_assert(isfinite(loss) && loss > 0);
    diffusion_acts_destroy(&a);
    free(u);
    free(s.buf);
}
