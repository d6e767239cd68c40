/* Data parallelism on CPU with the in-process reducer: sharding, the reduction (rank order,
 * buckets, types), broadcast, failure without hangs, and the real tiny model trained by 1, 2
 * and 3 ranks on shards of a batch against one rank on the whole batch.
 *
 * Rank functions run on threads, where a failed assertion cannot end the test: they record
 * what they saw and the checks run on the test's own thread after dp_local_run. */
#include "qtest.h"

#include "dp.h"
#include "model.h"
#include "optimizer.h"
#include "rng.h"

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#define MAX_RANKS 3

Test(dp, shard_covers_contiguously) {
    for (long n = 0; n <= 11; n++)
        for (int w = 1; w <= 5; w++) {
            long next = 0;
            for (int r = 0; r < w; r++) {
                long b, c;
                dp_shard(n, w, r, &b, &c);
                cr_assert_eq(b, next, "n %ld world %d rank %d begins at %ld", n, w, r, b);
                cr_assert(c == n / w || c == n / w + 1, "n %ld world %d rank %d: %ld items", n, w,
                          r, c);
                next = b + c;
            }
            cr_assert_eq(next, n, "n %ld world %d: shards cover %ld", n, w, next);
        }
}

/* ---- The reducer ---- */

#define RED_N 1001 /* not a multiple of the world or of the small bucket */

typedef struct {
    float *f[MAX_RANKS];
    double *d[MAX_RANKS];
    dp_op_t op;
} red_arg_t;

static int red_rank(dp_comm_t *c, void *p, qerr_t *err) {
    red_arg_t *a = p;
    const int r = dp_rank(c);
    if (dp_allreduce(c, a->f[r], RED_N, DP_F32, a->op, err) ||
        dp_allreduce(c, a->d[r], RED_N, DP_F64, a->op, err))
        return -1;
    return 0;
}

static void red_fill(red_arg_t *a, int world, uint64_t seed) {
    rng_stream_t s;
    rng_stream_init(&s, 1, seed, 0);
    for (int r = 0; r < world; r++)
        for (int i = 0; i < RED_N; i++) {
            /* magnitudes over 8 decades, so the summation order shows in the bits */
            const float x = (rng_stream_uniform(&s) - 0.5f) * powf(10.f, (float)(i % 9) - 4);
            a->f[r][i] = x;
            a->d[r][i] = (double)x * (1 + 1e-9 * r);
        }
}

Test(dp, allreduce_sums_in_rank_order_whatever_the_bucket) {
    for (int world = 1; world <= MAX_RANKS; world++)
        for (int op = 0; op < DP_OP_COUNT; op++) {
            float want_f[RED_N];
            double want_d[RED_N];
            red_arg_t a = {.op = (dp_op_t)op};
            for (int r = 0; r < world; r++) {
                a.f[r] = malloc(RED_N * sizeof(float));
                a.d[r] = malloc(RED_N * sizeof(double));
            }
            red_fill(&a, world, 42);
            for (int i = 0; i < RED_N; i++) {
                float sf = a.f[0][i];
                double sd = a.d[0][i];
                for (int r = 1; r < world; r++) {
                    sf += a.f[r][i];
                    sd += a.d[r][i];
                }
                want_f[i] = op == DP_MEAN ? sf / (float)world : sf;
                want_d[i] = op == DP_MEAN ? sd / (double)world : sd;
            }
            /* default bucket, then 20-byte buckets (5 floats, 2.5 doubles: rounded down) */
            const size_t buckets[2] = {0, 20};
            for (int bk = 0; bk < 2; bk++) {
                if (bk)
                    red_fill(&a, world, 42);
                qerr_t err;
                dp_local_t *g = dp_local_new(world, buckets[bk], &err);
                cr_assert(g, "%s", err.msg);
                cr_assert(dp_local_run(g, red_rank, &a, &err) == 0, "%s", err.msg);
                for (int r = 0; r < world; r++) {
                    cr_assert(memcmp(a.f[r], want_f, sizeof want_f) == 0,
                              "world %d op %d bucket %zu: rank %d float sums differ", world, op,
                              buckets[bk], r);
                    cr_assert(memcmp(a.d[r], want_d, sizeof want_d) == 0,
                              "world %d op %d bucket %zu: rank %d double sums differ", world, op,
                              buckets[bk], r);
                }
                dp_local_destroy(&g);
                cr_assert_null(g);
            }
            for (int r = 0; r < world; r++) {
                free(a.f[r]);
                free(a.d[r]);
            }
        }
}

typedef struct {
    int mode; /* 0 broadcast, 1 count mismatch, 2 rank 1 fails before a collective */
    unsigned char data[MAX_RANKS][300];
    int rc[MAX_RANKS];
    qerr_code_t code[MAX_RANKS];
} misc_arg_t;

static int misc_rank(dp_comm_t *c, void *p, qerr_t *err) {
    misc_arg_t *a = p;
    const int r = dp_rank(c);
    int rc = 0;
    if (a->mode == 0) {
        rc = dp_broadcast(c, a->data[r], sizeof a->data[r], err) || dp_barrier(c, err);
    } else if (a->mode == 1) {
        float x[4] = {0};
        rc = dp_allreduce(c, x, r == 1 ? 3 : 4, DP_F32, DP_SUM, err);
    } else {
        if (r == 1) {
            a->rc[r] = -1;
            return qerr_set(err, QERR_IO, "rank 1 could not read its shard");
        }
        float x[4] = {0};
        rc = dp_barrier(c, err) || dp_allreduce(c, x, 4, DP_F32, DP_SUM, err);
    }
    a->rc[r] = rc;
    a->code[r] = rc ? err->code : QERR_OK;
    return rc ? -1 : 0;
}

Test(dp, broadcast_from_root) {
    misc_arg_t a = {.mode = 0};
    for (int r = 0; r < MAX_RANKS; r++)
        for (size_t i = 0; i < sizeof a.data[r]; i++)
            a.data[r][i] = (unsigned char)(i * 7 + (size_t)r * 101);
    unsigned char root[300];
    memcpy(root, a.data[0], sizeof root);
    qerr_t err;
    dp_local_t *g = dp_local_new(MAX_RANKS, 64, &err); /* 300 bytes: 5 buckets */
    cr_assert(g, "%s", err.msg);
    cr_assert(dp_is_root(dp_local_comm(g, 0)) && !dp_is_root(dp_local_comm(g, 2)));
    cr_assert_eq(dp_world(dp_local_comm(g, 1)), MAX_RANKS);
    cr_assert(dp_local_run(g, misc_rank, &a, &err) == 0, "%s", err.msg);
    for (int r = 0; r < MAX_RANKS; r++)
        cr_assert(memcmp(a.data[r], root, sizeof root) == 0, "rank %d", r);
    dp_local_destroy(&g);
}

Test(dp, mismatch_and_failure_end_every_rank) {
    for (int mode = 1; mode <= 2; mode++) {
        misc_arg_t a = {.mode = mode};
        qerr_t err;
        dp_local_t *g = dp_local_new(MAX_RANKS, 0, &err);
        cr_assert(g, "%s", err.msg);
        cr_assert(dp_local_run(g, misc_rank, &a, &err) == -1);
        for (int r = 0; r < MAX_RANKS; r++)
            cr_assert(a.rc[r] != 0, "mode %d: rank %d returned 0", mode, r);
        if (mode == 1) {
            cr_assert_eq(err.code, QERR_INVALID, "%s", err.msg);
            cr_assert(strstr(err.msg, "rank 1 called all-reduce of 3"), "%s", err.msg);
        } else {
            /* the rank that failed on its own is reported, not the ranks it stopped */
            cr_assert_eq(err.code, QERR_IO, "%s", err.msg);
            cr_assert(strstr(err.msg, "rank 1 could not read"), "%s", err.msg);
            cr_assert(a.code[0] == QERR_INVALID && a.code[2] == QERR_INVALID);
        }
        dp_local_destroy(&g);
    }
}

/* ---- The tiny model on shards ---- */

#define BT_B 5
#define BT_T 12

typedef struct {
    model_config_t cfg;
    const int32_t *tokens, *targets;
    const real *weights;
    int B;
    double wsum;            /* sum of the whole batch's weights, in position order */
    model_t *m[MAX_RANKS];  /* one replica per rank */
    optim_t *o[MAX_RANKS];  /* one optimizer per rank: identical steps */
    real *grad[MAX_RANKS];  /* the all-reduced gradient each rank saw */
    double loss[MAX_RANKS]; /* the all-reduced loss each rank saw */
    long rows[MAX_RANKS];   /* rows of each shard */
    int applied[MAX_RANKS];
} shard_arg_t;

static void tiny_config(model_config_t *c) {
    qerr_t err;
    cr_assert(model_config_preset("tiny", c, &err) == 0, "%s", err.msg);
    c->dim = 32;
    c->num_heads = 2;
    c->expert_hidden = 32;
    c->diffusion_width = 16;
    c->diffusion_ffn = 16;
    c->diffusion_time_dim = 8;
}

/* What every data-parallel learner does with its shard: CE gradient scaled by the global
 * weight sum (so the ranks' sum is the whole batch's mean), all-reduce, one AdamW step. */
static int shard_rank(dp_comm_t *c, void *p, qerr_t *err) {
#ifdef _OPENMP
    omp_set_num_threads(1);
#endif
    shard_arg_t *a = p;
    const int r = dp_rank(c);
    model_t *m = a->m[r];
    long b0, nb;
    dp_shard(a->B, dp_world(c), r, &b0, &nb);
    a->rows[r] = nb;
    model_grads_zero(m);
    double loss = 0;
    if (nb > 0) {
        const size_t off = (size_t)b0 * BT_T, n = (size_t)nb * BT_T;
        model_batch_t mb = {.B = (int)nb,
                            .T = BT_T,
                            .tokens = a->tokens + off,
                            .targets = a->targets + off,
                            .weights = a->weights + off,
                            .temperature = 1};
        model_stats_t st;
        if (model_forward(m, &mb, &st, err))
            return -1;
        real *dlogp = malloc(n * sizeof *dlogp);
        if (!dlogp)
            return qerr_set(err, QERR_NOMEM, "out of memory");
        /* crossentropy_backward's formula with the whole batch's denominator */
        for (size_t i = 0; i < n; i++)
            dlogp[i] = a->wsum > 0 ? (real)(-(double)mb.weights[i] / a->wsum) : 0;
        model_backward(m, dlogp, NULL);
        free(dlogp);
        loss = st.ce * st.weight_sum / a->wsum;
    }
    if (dp_allreduce(c, model_grads(m), model_num_reals(m), DP_F32, DP_SUM, err) ||
        dp_allreduce(c, &loss, 1, DP_F64, DP_SUM, err))
        return -1;
    memcpy(a->grad[r], model_grads(m), model_num_reals(m) * sizeof(real));
    a->loss[r] = loss;
    optim_result_t orr;
    a->applied[r] = optim_step(a->o[r], m, loss, &orr);
    return 0;
}

typedef struct {
    int32_t tokens[BT_B * BT_T], targets[BT_B * BT_T];
    real weights[BT_B * BT_T];
} batch_t;

/* Random tokens; completion weights from a per-row prompt length; rows listed in zero_rows
 * (a bit mask) carry no weight at all. */
static void make_batch(batch_t *bt, int V, unsigned zero_rows) {
    rng_stream_t s;
    rng_stream_init(&s, 2, 7, zero_rows);
    for (int b = 0; b < BT_B; b++) {
        const int plen = 1 + (int)(rng_stream_next_u64(&s) % (BT_T / 2));
        for (int t = 0; t < BT_T; t++) {
            const int i = b * BT_T + t;
            bt->tokens[i] = (int32_t)(rng_stream_next_u64(&s) % (uint64_t)V);
            bt->targets[i] = (int32_t)(rng_stream_next_u64(&s) % (uint64_t)V);
            bt->weights[i] = (zero_rows >> b & 1) || t + 1 < plen ? 0 : 1;
        }
    }
}

static double rel_l2(const real *a, const real *b, size_t n) {
    double num = 0, den = 0;
    for (size_t i = 0; i < n; i++) {
        num += ((double)a[i] - b[i]) * ((double)a[i] - b[i]);
        den += (double)b[i] * b[i];
    }
    return den > 0 ? sqrt(num / den) : sqrt(num);
}

/* Trains one step with `world` ranks on B rows and compares with one model on all of them. */
static void check_shards(int world, int B, unsigned zero_rows) {
    qerr_t err;
    shard_arg_t a = {.B = B};
    tiny_config(&a.cfg);
    batch_t bt;
    make_batch(&bt, a.cfg.vocab_size, zero_rows);
    a.tokens = bt.tokens;
    a.targets = bt.targets;
    a.weights = bt.weights;
    for (int i = 0; i < B * BT_T; i++)
        a.wsum += bt.weights[i];
    optim_config_t oc;
    optim_config_default(&oc);
    oc.lr = 1e-3;

    /* one rank on the whole batch: model_backward's own CE gradient */
    model_t *ref = model_new(&a.cfg, &err);
    cr_assert(ref, "%s", err.msg);
    optim_t *ro = optim_new(&oc, ref, &err);
    cr_assert(ro, "%s", err.msg);
#ifdef _OPENMP
    omp_set_num_threads(1);
#endif
    model_batch_t mb = {.B = B,
                        .T = BT_T,
                        .tokens = bt.tokens,
                        .targets = bt.targets,
                        .weights = bt.weights,
                        .temperature = 1};
    model_stats_t st;
    model_grads_zero(ref);
    cr_assert(model_forward(ref, &mb, &st, &err) == 0, "%s", err.msg);
    model_backward(ref, NULL, NULL);
    const size_t n = model_num_reals(ref);
    real *gref = malloc(n * sizeof *gref);
    memcpy(gref, model_grads(ref), n * sizeof *gref);
    optim_result_t orr;
    const int ref_applied = optim_step(ro, ref, st.loss, &orr);
    cr_assert(ref_applied);

    for (int r = 0; r < world; r++) {
        a.m[r] = model_new(&a.cfg, &err);
        cr_assert(a.m[r], "%s", err.msg);
        a.o[r] = optim_new(&oc, a.m[r], &err);
        cr_assert(a.o[r], "%s", err.msg);
        a.grad[r] = malloc(n * sizeof(real));
    }
    dp_local_t *g = dp_local_new(world, 0, &err);
    cr_assert(g, "%s", err.msg);
    cr_assert(dp_local_run(g, shard_rank, &a, &err) == 0, "%s", err.msg);
    dp_local_destroy(&g);

    const double gerr = rel_l2(a.grad[0], gref, n);
    const real *pref = model_params_const(ref);
    const real *p0 = model_params_const(a.m[0]);
    double dmax = 0;
    for (size_t i = 0; i < n; i++)
        dmax = fmax(dmax, fabs((double)p0[i] - pref[i]));
    cr_log_info("world %d, B %d, rows %ld/%ld/%ld, zero rows %#x: loss %.9g vs %.9g, gradient "
                "rel. L2 error %.3g, max |param diff| %.3g (lr %.0e)",
                world, B, a.rows[0], world > 1 ? a.rows[1] : 0, world > 2 ? a.rows[2] : 0,
                zero_rows, a.loss[0], st.loss, gerr, dmax, oc.lr);
    /* every rank saw the same reduced gradient and took the same step */
    for (int r = 1; r < world; r++) {
        cr_assert(memcmp(a.grad[r], a.grad[0], n * sizeof(real)) == 0, "rank %d gradient", r);
        cr_assert(memcmp(model_params_const(a.m[r]), p0, n * sizeof(real)) == 0,
                  "rank %d parameters", r);
        cr_assert(memcmp(&a.loss[r], &a.loss[0], sizeof(double)) == 0, "rank %d loss", r);
    }
    cr_assert(a.applied[0]);
    if (world == 1) {
        /* Nothing is regrouped: the scaled CE gradient is crossentropy_backward's, bit for
         * bit, and so is everything after it. */
        cr_assert(memcmp(a.grad[0], gref, n * sizeof(real)) == 0, "world 1 gradient");
        cr_assert(memcmp(p0, pref, n * sizeof(real)) == 0, "world 1 parameters");
    } else {
        /* Shards regroup the sums over tokens (weight gradients, the CE mean): equal up to
         * float rounding of those sums. */
        cr_assert_lt(gerr, 1e-5, "world %d: gradient rel. L2 error %.3g", world, gerr);
        cr_assert_float_eq(a.loss[0], st.loss, 1e-6 * fabs(st.loss), "loss %.9g vs %.9g", a.loss[0],
                           st.loss);
        /* AdamW's first step moves each parameter by at most lr (plus decay); a rounding
         * difference in a gradient that is itself at rounding level can flip its sign, but
         * everywhere else the step is the same up to rounding. */
        size_t far = 0;
        for (size_t i = 0; i < n; i++)
            far += fabs((double)p0[i] - pref[i]) > 1e-3 * oc.lr;
        cr_assert_leq(dmax, 2.01 * oc.lr, "max parameter difference %.3g", dmax);
        cr_assert_lt((double)far, 1e-4 * (double)n, "%zu of %zu parameters differ by > lr/1000",
                     far, n);
    }
    for (int r = 0; r < world; r++) {
        model_destroy(&a.m[r]);
        optim_destroy(&a.o[r]);
        free(a.grad[r]);
    }
    model_destroy(&ref);
    optim_destroy(&ro);
    free(gref);
}

Test(dp, one_rank_is_bit_identical, .timeout = 120) {
    check_shards(1, BT_B, 0);
}

Test(dp, two_ranks_uneven_shards, .timeout = 120) {
    check_shards(2, BT_B, 0); /* 3 + 2 rows */
}

Test(dp, three_ranks_uneven_shards, .timeout = 120) {
    check_shards(3, BT_B, 0); /* 2 + 2 + 1 rows */
}

Test(dp, rank_with_zero_weighted_tokens, .timeout = 120) {
    check_shards(2, 4, 0xCu); /* rank 1's rows 2 and 3 carry no CE weight */
}

Test(dp, rank_with_no_rows, .timeout = 120) {
    check_shards(3, 2, 0); /* 1 + 1 + 0 rows */
}
