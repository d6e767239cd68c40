/* The batcher on hand-built groups (float core): batch layout, staleness admission and
 * oldest-first selection, dynamic sampling with refill rounds and the half-batch rule, overlong
 * shaping, "no reward" samples, input validation and the checkpoint state round trip. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "batcher.h"
#include "qtest.h"

#define TOL 1e-6
#define MAXG 8
#define MAXL 16

/* A group under construction: prompt {1, 2, 3}, sample s of length len[s] with tokens
 * 10 + s, 11 + s, ... and behaviour log-probs -0.1 (j + 1). */
typedef struct {
    int32_t prompt[4];
    int32_t tok[MAXG][MAXL];
    float logp[MAXG][MAXL];
    batcher_sample_t s[MAXG];
    batcher_group_in_t in;
} grp_t;

static void grp(grp_t *g, uint64_t id, int64_t version, int G, const double *reward,
                const int *len) {
    memset(g, 0, sizeof *g);
    g->prompt[0] = 1;
    g->prompt[1] = 2;
    g->prompt[2] = 3;
    for (int s = 0; s < G; s++) {
        const int L = len ? len[s] : 2;
        for (int j = 0; j < L; j++) {
            g->tok[s][j] = 10 + s + j;
            g->logp[s][j] = -0.1f * (float)(j + 1);
        }
        g->s[s] = (batcher_sample_t){.tokens = g->tok[s],
                                     .logp = g->logp[s],
                                     .len = L,
                                     .has_reward = !isnan(reward[s]),
                                     .reward = isnan(reward[s]) ? 0 : reward[s]};
    }
    g->in = (batcher_group_in_t){.group_id = id,
                                 .version = version,
                                 .prompt = g->prompt,
                                 .prompt_len = 3,
                                 .samples = g->s,
                                 .n_samples = G};
}

static batcher_config_t config(int batch_groups, int G) {
    batcher_config_t c;
    batcher_config_default(&c);
    c.batch_groups = batch_groups;
    c.group_size = G;
    c.max_new_tokens = 8;
    c.context = 32;
    c.vocab_size = 64;
    return c;
}

static batcher_t *make(const batcher_config_t *c) {
    qerr_t err = {0};
    batcher_t *b = batcher_new(c, &err);
    cr_assert_not_null(b, "%s", err.msg);
    return b;
}

/* Adds a group (G from b's config) and returns its verdict; the add must succeed. */
static batcher_verdict_t add(batcher_t *b, uint64_t id, int64_t version, int64_t v_now,
                             const double *reward, const int *len) {
    grp_t g;
    grp(&g, id, version, batcher_config(b)->group_size, reward, len);
    batcher_verdict_t v = BATCHER_VERDICT_COUNT;
    qerr_t err = {0};
    cr_assert_eq(batcher_add(b, &g.in, v_now, &v, &err), 0, "%s", err.msg);
    return v;
}

static const double MIXED[2] = {1, 0}, EQUAL1[2] = {1, 1}, EQUAL0[2] = {0, 0};

Test(batcher, batch_layout) {
    batcher_config_t c = config(1, 2);
    c.dynamic_sampling = 0;
    batcher_t *b = make(&c);
    /* sample 0: 3 tokens {10, 11, 12}, reward 1; sample 1: 1 token {11}, reward 0.
     * Rewards {1, 0}: mean 0.5, std sqrt(0.5): A = +-0.5 / (0.70710678 + 1e-6). */
    const int len[2] = {3, 1};
    cr_assert_eq(add(b, 7, 4, 4, MIXED, len), BATCHER_ACCEPTED);
    batcher_batch_t bt;
    qerr_t err = {0};
    cr_assert_eq(batcher_take(b, 4, &bt, &err), 1, "%s", err.msg);
    cr_assert_eq(bt.B, 2);
    cr_assert_eq(bt.T, 5); /* 3 + 3 - 1 */
    cr_assert_eq(bt.n_groups, 1);
    cr_expect_eq(bt.group_id[0], 7);
    cr_expect_eq(bt.version[0], 4);
    const int32_t tok0[5] = {1, 2, 3, 10, 11}, tgt0[5] = {0, 0, 10, 11, 12};
    const int32_t tok1[5] = {1, 2, 3, 0, 0}, tgt1[5] = {0, 0, 11, 0, 0};
    const real m0[5] = {0, 0, 1, 1, 1}, m1[5] = {0, 0, 1, 0, 0};
    const real lb0[5] = {0, 0, -0.1f, -0.2f, -0.3f};
    const double a = 0.5 / (sqrt(0.5) + 1e-6);
    for (int t = 0; t < 5; t++) {
        cr_expect_eq(bt.tokens[t], tok0[t], "row 0 token %d", t);
        cr_expect_eq(bt.targets[t], tgt0[t], "row 0 target %d", t);
        cr_expect_eq(bt.tokens[5 + t], tok1[t], "row 1 token %d", t);
        cr_expect_eq(bt.targets[5 + t], tgt1[t], "row 1 target %d", t);
        cr_expect_eq(bt.mask[t], m0[t], "row 0 mask %d", t);
        cr_expect_eq(bt.mask[5 + t], m1[t], "row 1 mask %d", t);
        cr_expect_eq(bt.logp_b[t], lb0[t], "row 0 logp_b %d", t);
        cr_expect(fabs(bt.adv[t] - m0[t] * a) < TOL, "row 0 adv %d = %g", t, bt.adv[t]);
        cr_expect(fabs(bt.adv[5 + t] + m1[t] * a) < TOL, "row 1 adv %d = %g", t, bt.adv[5 + t]);
    }
    cr_expect(bt.kept == NULL);
    cr_expect(fabs(bt.reward_mean - 0.5) < TOL);
    cr_expect(fabs(bt.reward_std - sqrt(0.5)) < TOL);
    cr_expect_eq(bt.reward_max, 1.0);
    cr_expect_eq(bt.reward_min, 0.0);
    cr_expect_eq(bt.response_length_mean, 2.0);
    cr_expect_eq(bt.response_length_max, 3.0);
    cr_expect_eq(batcher_waiting(b), 0);
    batcher_batch_free(&bt);
    cr_expect(bt.tokens == NULL);
    batcher_destroy(&b);
    cr_expect(b == NULL);
    batcher_destroy(&b);
}

Test(batcher, staleness_admission) {
    batcher_config_t c = config(4, 2);
    c.max_staleness = 2;
    batcher_t *b = make(&c);
    /* (2 + 1) x 4 = 12 groups leased or waiting */
    cr_expect_eq(batcher_lease_room(b, 0), 12);
    cr_expect_eq(batcher_lease_room(b, 12), 0);
    cr_expect_eq(batcher_lease_room(b, 20), 0);
    for (int i = 0; i < 3; i++)
        add(b, (uint64_t)i, 5, 5, MIXED, NULL);
    cr_expect_eq(batcher_lease_room(b, 5), 4);
    /* At v_now 5: version 3 is 2 behind (allowed), version 2 is 3 behind (stale). */
    cr_expect_eq(add(b, 10, 3, 5, MIXED, NULL), BATCHER_ACCEPTED);
    cr_expect_eq(add(b, 11, 2, 5, MIXED, NULL), BATCHER_STALE);
    batcher_counts_t n;
    batcher_counts(b, &n);
    cr_expect_eq(n.stale, 1);
    cr_expect_eq(batcher_waiting(b), 4);
    /* The version moves on before the batch is taken: the version-3 group is now stale and is
     * dropped, not trained on. */
    cr_expect_eq(batcher_poll(b, 6), BATCHER_WAIT);
    batcher_counts(b, &n);
    cr_expect_eq(n.stale, 2);
    cr_expect_eq(batcher_waiting(b), 3);
    batcher_destroy(&b);
}

Test(batcher, oldest_first) {
    batcher_config_t c = config(2, 2);
    batcher_t *b = make(&c);
    add(b, 100, 3, 3, MIXED, NULL);
    add(b, 101, 1, 3, MIXED, NULL);
    add(b, 102, 2, 3, MIXED, NULL);
    add(b, 103, 1, 3, MIXED, NULL);
    batcher_batch_t bt;
    qerr_t err = {0};
    cr_assert_eq(batcher_take(b, 3, &bt, &err), 1, "%s", err.msg);
    cr_assert_eq(bt.n_groups, 2);
    /* lowest version first, arrival order within a version */
    cr_expect_eq(bt.group_id[0], 101);
    cr_expect_eq(bt.group_id[1], 103);
    cr_expect(fabs(bt.staleness_mean - 2.0) < TOL);
    batcher_batch_free(&bt);
    cr_assert_eq(batcher_take(b, 3, &bt, &err), 1, "%s", err.msg);
    cr_expect_eq(bt.group_id[0], 102);
    cr_expect_eq(bt.group_id[1], 100);
    batcher_batch_free(&bt);
    cr_expect_eq(batcher_take(b, 3, &bt, &err), 0);
    batcher_destroy(&b);
}

Test(batcher, dynamic_sampling_filter) {
    batcher_config_t c = config(2, 2);
    batcher_t *b = make(&c);
    const double few[2] = {1, NAN};
    cr_expect_eq(add(b, 1, 0, 0, EQUAL1, NULL), BATCHER_FILTERED_EQUAL);
    cr_expect_eq(add(b, 2, 0, 0, EQUAL0, NULL), BATCHER_FILTERED_EQUAL);
    cr_expect_eq(add(b, 3, 0, 0, few, NULL), BATCHER_FILTERED_FEW);
    cr_expect_eq(add(b, 4, 0, 0, MIXED, NULL), BATCHER_ACCEPTED);
    cr_expect_eq(add(b, 5, 0, 0, MIXED, NULL), BATCHER_ACCEPTED);
    batcher_counts_t n;
    batcher_counts(b, &n);
    cr_expect_eq(n.arrived, 5);
    cr_expect_eq(n.filtered_equal, 2);
    cr_expect_eq(n.filtered_few, 1);
    cr_expect_eq(n.accepted, 2);
    batcher_batch_t bt;
    qerr_t err = {0};
    cr_assert_eq(batcher_take(b, 0, &bt, &err), 1, "%s", err.msg);
    cr_expect_eq(bt.groups_arrived, 5);
    cr_expect_eq(bt.groups_filtered_equal, 2);
    cr_expect_eq(bt.groups_filtered_few, 1);
    cr_expect_eq(bt.refill_rounds, 2); /* 5 arrivals for 2 groups: 2 more rounds begun */
    batcher_batch_free(&bt);
    batcher_destroy(&b);
    /* Without dynamic sampling the equal group is trained on with A = 0. */
    c.dynamic_sampling = 0;
    b = make(&c);
    cr_expect_eq(add(b, 1, 0, 0, EQUAL1, NULL), BATCHER_ACCEPTED);
    cr_expect_eq(add(b, 2, 0, 0, MIXED, NULL), BATCHER_ACCEPTED);
    cr_assert_eq(batcher_take(b, 0, &bt, &err), 1, "%s", err.msg);
    for (int i = 0; i < 2 * bt.T; i++)
        cr_expect_eq(bt.adv[i], 0.0f);
    cr_expect_eq(bt.mask[3], 1.0f);
    batcher_batch_free(&bt);
    batcher_destroy(&b);
}

Test(batcher, overlong_shaping_before_advantages) {
    batcher_config_t c = config(1, 2);
    c.overlong_enabled = 1;
    c.overlong_max_len = 8;
    c.overlong_cache = 4;
    batcher_t *b = make(&c);
    /* Equal raw rewards, lengths 2 (free) and 6 (penalty (4 - 6) / 4 = -0.5): shaped {1, 0.5},
     * different, so the group is kept; A = +-0.25 / (std sqrt(0.125) + 1e-6). */
    const int len[2] = {2, 6};
    cr_expect_eq(add(b, 1, 0, 0, EQUAL1, len), BATCHER_ACCEPTED);
    batcher_batch_t bt;
    qerr_t err = {0};
    cr_assert_eq(batcher_take(b, 0, &bt, &err), 1, "%s", err.msg);
    cr_expect(fabs(bt.reward[0] - 1.0) < TOL);
    cr_expect(fabs(bt.reward[1] - 0.5) < TOL);
    const double a = 0.25 / (sqrt(0.125) + 1e-6);
    cr_expect(fabs(bt.adv[bt.T + 2] + a) < TOL, "adv %g", bt.adv[bt.T + 2]);
    cr_expect(fabs(bt.adv[2] - a) < TOL, "adv %g", bt.adv[2]);
    /* The reward metrics report the raw task reward. */
    cr_expect(fabs(bt.reward_mean - 1.0) < TOL);
    batcher_batch_free(&bt);
    /* A truncated completion gets -1: shaped {1, 0}. */
    grp_t g;
    const int len8[2] = {3, 8};
    grp(&g, 2, 0, 2, EQUAL1, len8);
    g.s[1].truncated = 1;
    batcher_verdict_t v;
    cr_assert_eq(batcher_add(b, &g.in, 0, &v, &err), 0, "%s", err.msg);
    cr_assert_eq(batcher_take(b, 0, &bt, &err), 1, "%s", err.msg);
    cr_expect(fabs(bt.reward[1] - 0.0) < TOL);
    cr_expect(fabs(bt.truncated_frac - 0.5) < TOL);
    batcher_batch_free(&bt);
    batcher_destroy(&b);
}

Test(batcher, no_reward_sample) {
    batcher_config_t c = config(1, 4);
    batcher_t *b = make(&c);
    /* Valid 3, 1, 5: mean 3, std 2; sample 1 has no reward: A = 0, masked out. */
    const double r[4] = {3, NAN, 1, 5};
    cr_expect_eq(add(b, 1, 0, 0, r, NULL), BATCHER_ACCEPTED);
    batcher_counts_t n;
    batcher_counts(b, &n);
    cr_expect_eq(n.no_reward, 1);
    batcher_batch_t bt;
    qerr_t err = {0};
    cr_assert_eq(batcher_take(b, 0, &bt, &err), 1, "%s", err.msg);
    cr_expect_eq(bt.no_reward, 1);
    const int T = bt.T;
    for (int t = 0; t < T; t++) {
        cr_expect_eq(bt.mask[1 * T + t], 0.0f, "masked row, position %d", t);
        cr_expect_eq(bt.adv[1 * T + t], 0.0f);
    }
    cr_expect(fabs(bt.adv[0 * T + 2] - 0.0) < TOL);
    cr_expect(fabs(bt.adv[2 * T + 2] + 2 / (2 + 1e-6)) < TOL);
    cr_expect(fabs(bt.adv[3 * T + 2] - 2 / (2 + 1e-6)) < TOL);
    cr_expect(isnan(bt.reward[1]));
    cr_expect(fabs(bt.reward_mean - 3.0) < TOL);
    batcher_batch_free(&bt);
    batcher_destroy(&b);
}

/* batch_groups 4, 2 refill rounds: the decision comes after 4 + 2 x 4 = 12 arrivals. */
static batcher_t *rounds_case(int kept, const double *equal) {
    batcher_config_t c = config(4, 2);
    c.max_resample_rounds = 2;
    c.max_staleness = 20; /* room for all of them */
    batcher_t *b = make(&c);
    for (int i = 0; i < 11; i++)
        add(b, (uint64_t)i, 0, 0, i < kept ? MIXED : equal, NULL);
    cr_expect_eq(batcher_poll(b, 0), BATCHER_WAIT, "11 arrivals: rounds left");
    add(b, 11, 0, 0, equal, NULL);
    return b;
}

Test(batcher, refill_rounds_half_batch) {
    batcher_t *b = rounds_case(2, EQUAL0);
    cr_expect_eq(batcher_poll(b, 0), BATCHER_PARTIAL);
    batcher_batch_t bt;
    qerr_t err = {0};
    cr_assert_eq(batcher_take(b, 0, &bt, &err), 1, "%s", err.msg);
    cr_expect_eq(bt.n_groups, 2);
    cr_expect_eq(bt.partial, 1);
    cr_expect_eq(bt.refill_rounds, 2);
    cr_expect_eq(bt.groups_filtered_equal, 10);
    batcher_batch_free(&bt);
    batcher_counts_t n;
    batcher_counts(b, &n);
    cr_expect_eq(n.partial_batches, 1);
    /* The window starts over for the next batch. */
    cr_expect_eq(batcher_poll(b, 0), BATCHER_WAIT);
    batcher_destroy(&b);
}

Test(batcher, refill_rounds_too_hard) {
    batcher_t *b = rounds_case(1, EQUAL0);
    cr_expect_eq(batcher_poll(b, 0), BATCHER_STARVED);
    batcher_batch_t bt;
    qerr_t err = {0};
    cr_expect_eq(batcher_take(b, 0, &bt, &err), -1);
    cr_expect_eq(err.code, QERR_INVALID);
    cr_expect(strstr(err.msg, "too hard") != NULL, "%s", err.msg);
    cr_expect(strstr(err.msg, "1 of 4 groups") != NULL, "%s", err.msg);
    batcher_destroy(&b);
}

Test(batcher, refill_rounds_too_easy) {
    batcher_t *b = rounds_case(1, EQUAL1);
    batcher_batch_t bt;
    qerr_t err = {0};
    cr_expect_eq(batcher_take(b, 0, &bt, &err), -1);
    cr_expect(strstr(err.msg, "too easy") != NULL, "%s", err.msg);
    batcher_destroy(&b);
}

Test(batcher, rejects_bad_groups) {
    batcher_config_t c = config(1, 2);
    batcher_t *b = make(&c);
    grp_t g;
    batcher_verdict_t v;
    qerr_t err = {0};
    grp(&g, 1, 0, 2, MIXED, NULL);
    g.in.n_samples = 3;
    cr_expect_eq(batcher_add(b, &g.in, 0, &v, &err), -1);
    cr_expect(strstr(err.msg, "group_size") != NULL, "%s", err.msg);
    grp(&g, 1, 0, 2, MIXED, NULL);
    g.tok[1][1] = 64;
    cr_expect_eq(batcher_add(b, &g.in, 0, &v, &err), -1);
    cr_expect(strstr(err.msg, "sample 1: token 1") != NULL, "%s", err.msg);
    grp(&g, 1, 0, 2, MIXED, NULL);
    g.logp[0][0] = 0.5f;
    cr_expect_eq(batcher_add(b, &g.in, 0, &v, &err), -1);
    cr_expect(strstr(err.msg, "logprob") != NULL, "%s", err.msg);
    grp(&g, 1, 0, 2, MIXED, NULL);
    g.s[0].truncated = 1; /* at length 2, not max_new_tokens 8 */
    cr_expect_eq(batcher_add(b, &g.in, 0, &v, &err), -1);
    grp(&g, 1, 0, 2, MIXED, NULL);
    g.s[0].reward = INFINITY;
    cr_expect_eq(batcher_add(b, &g.in, 0, &v, &err), -1);
    grp(&g, 1, 5, 2, MIXED, NULL);
    cr_expect_eq(batcher_add(b, &g.in, 4, &v, &err), -1);
    cr_expect(strstr(err.msg, "ahead") != NULL, "%s", err.msg);
    grp(&g, 1, 0, 2, MIXED, NULL);
    g.s[1].len = 9;
    cr_expect_eq(batcher_add(b, &g.in, 0, &v, &err), -1);
    batcher_counts_t n;
    batcher_counts(b, &n);
    cr_expect_eq(n.arrived, 0, "rejected groups are not counted");
    grp(&g, 1, 0, 2, MIXED, NULL);
    cr_expect_eq(batcher_add(b, &g.in, 0, &v, &err), 0, "%s", err.msg);
    cr_expect_eq(batcher_add(b, &g.in, 0, &v, &err), -1);
    cr_expect(strstr(err.msg, "already waiting") != NULL, "%s", err.msg);
    batcher_destroy(&b);
    c.group_size = 1;
    cr_expect(batcher_new(&c, &err) == NULL);
    cr_expect(strstr(err.msg, "group_size") != NULL, "%s", err.msg);
}

static int batch_equal(const batcher_batch_t *x, const batcher_batch_t *y) {
    const size_t n = (size_t)x->B * x->T;
    return x->B == y->B && x->T == y->T && !memcmp(x->tokens, y->tokens, n * 4) &&
           !memcmp(x->targets, y->targets, n * 4) && !memcmp(x->mask, y->mask, n * sizeof(real)) &&
           !memcmp(x->adv, y->adv, n * sizeof(real)) &&
           !memcmp(x->logp_b, y->logp_b, n * sizeof(real)) &&
           (x->kept == NULL) == (y->kept == NULL) &&
           (!x->kept || !memcmp(x->kept, y->kept, n * 4)) &&
           !memcmp(x->group_id, y->group_id, (size_t)x->n_groups * 8) &&
           !memcmp(x->version, y->version, (size_t)x->n_groups * 8);
}

Test(batcher, state_round_trip) {
    batcher_config_t c = config(2, 3);
    batcher_t *b = make(&c);
    const double r1[3] = {1, 0, NAN}, r2[3] = {0.5, 0.25, 1}, r3[3] = {2, 2, 2};
    const int len[3] = {1, 4, 2};
    add(b, 41, 3, 3, r1, len);
    add(b, 42, 2, 3, r3, NULL); /* filtered: counted in the window */
    grp_t g;
    grp(&g, 43, 2, 3, r2, len);
    int32_t kept[4] = {5, 0, 7, 9};
    g.s[1].kept = kept;
    batcher_verdict_t v;
    qerr_t err = {0};
    cr_assert_eq(batcher_add(b, &g.in, 3, &v, &err), 0, "%s", err.msg);
    add(b, 44, 3, 3, r2, NULL);

    uint8_t *buf = NULL;
    size_t n = 0;
    cr_assert_eq(batcher_save(b, &buf, &n, &err), 0, "%s", err.msg);
    batcher_t *l = batcher_load(&c, buf, n, &err);
    cr_assert_not_null(l, "%s", err.msg);
    uint8_t *buf2 = NULL;
    size_t n2 = 0;
    cr_assert_eq(batcher_save(l, &buf2, &n2, &err), 0, "%s", err.msg);
    cr_expect(n == n2 && !memcmp(buf, buf2, n), "re-saved state differs");
    batcher_counts_t ca, cb;
    batcher_counts(b, &ca);
    batcher_counts(l, &cb);
    cr_expect(!memcmp(&ca, &cb, sizeof ca));

    batcher_batch_t x, y;
    cr_assert_eq(batcher_take(b, 3, &x, &err), 1, "%s", err.msg);
    cr_assert_eq(batcher_take(l, 3, &y, &err), 1, "%s", err.msg);
    cr_expect(batch_equal(&x, &y), "batches differ after a reload");
    cr_expect(x.kept != NULL);
    cr_expect_eq(x.groups_arrived, y.groups_arrived);
    cr_expect_eq(x.groups_filtered_equal, 1);
    cr_expect_eq(y.groups_filtered_equal, 1);
    batcher_batch_free(&x);
    batcher_batch_free(&y);

    /* Damaged states: every truncation, a bad magic, another format version, another group
     * size, trailing bytes. */
    for (size_t cut = 0; cut < n; cut += 7)
        cr_expect(batcher_load(&c, buf, cut, &err) == NULL, "truncated at %zu loads", cut);
    buf[0] = 'X';
    cr_expect(batcher_load(&c, buf, n, &err) == NULL);
    buf[0] = 'Q';
    buf[4] = 2;
    cr_expect(batcher_load(&c, buf, n, &err) == NULL);
    cr_expect_eq(err.code, QERR_VERSION);
    buf[4] = 1;
    batcher_config_t c4 = config(2, 4);
    cr_expect(batcher_load(&c4, buf, n, &err) == NULL);
    uint8_t *longer = malloc(n + 1);
    memcpy(longer, buf, n);
    longer[n] = 0;
    cr_expect(batcher_load(&c, longer, n + 1, &err) == NULL);
    cr_expect(strstr(err.msg, "trailing") != NULL, "%s", err.msg);
    /* A token out of the (smaller) vocabulary is caught by the same checks as batcher_add. */
    batcher_config_t small = c;
    small.vocab_size = 12;
    cr_expect(batcher_load(&small, buf, n, &err) == NULL);
    cr_expect(strstr(err.msg, "vocab") != NULL, "%s", err.msg);
    free(longer);
    /* Any single corrupted byte either loads (a value that still validates) or fails cleanly. */
    for (size_t i = 0; i < n; i++) {
        buf[i] ^= 0xA5;
        batcher_t *x2 = batcher_load(&c, buf, n, &err);
        batcher_destroy(&x2);
        buf[i] ^= 0xA5;
    }
    free(buf);
    free(buf2);
    batcher_destroy(&b);
    batcher_destroy(&l);
}
