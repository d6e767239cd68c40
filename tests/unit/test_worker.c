/* The rollout worker's pure pieces (rollout/worker.h): completion text made valid UTF-8, a
 * lease's sampling parameters for the engine, and a generated group as a TrajectoryGroup
 * (routing records at the positions that drew each token, rewards present or absent). */
#include "dispatch_codec.h"
#include "worker.h"

#include <criterion/criterion.h>
#include <stdlib.h>
#include <string.h>

static void expect_utf8(const char *in, size_t len, const char *want, size_t want_len) {
    size_t n = 0;
    char *out = rollout_text_utf8(in, len, &n);
    cr_assert(out != NULL);
    cr_expect_eq(n, want_len, "length %zu, want %zu", n, want_len);
    cr_expect(memcmp(out, want, want_len) == 0, "bytes differ");
    cr_expect_eq(out[n], '\0');
    free(out);
}

#define FFFD "\xEF\xBF\xBD"

Test(worker, utf8_keeps_valid_text) {
    expect_utf8("12+7=19", 7, "12+7=19", 7);
    expect_utf8("caf\xC3\xA9 \xE2\x82\xAC \xF0\x9F\x98\x80", 14,
                "caf\xC3\xA9 \xE2\x82\xAC \xF0\x9F\x98\x80", 14);
    expect_utf8("", 0, "", 0);
}

Test(worker, utf8_replaces_each_bad_byte) {
    expect_utf8("a\xFF"
                "b",
                3, "a" FFFD "b", 5);
    expect_utf8("x\xC3", 2, "x" FFFD, 4);                        /* truncated sequence */
    expect_utf8("\xC0\x80", 2, FFFD FFFD, 6);                    /* overlong NUL */
    expect_utf8("\xED\xA0\x80", 3, FFFD FFFD FFFD, 9);           /* surrogate U+D800 */
    expect_utf8("\xF4\x90\x80\x80", 4, FFFD FFFD FFFD FFFD, 12); /* above U+10FFFF */
    expect_utf8("a\0b", 3, "a" FFFD "b", 5);                     /* NUL would end a C string */
    expect_utf8("\xE2\x82"
                "A",
                3, FFFD FFFD "A", 7); /* continuation missing */
}

Test(worker, sampling_from_proto) {
    uint32_t stops[] = {257, 10};
    Quillan__SamplingParams sp = QUILLAN__SAMPLING_PARAMS__INIT;
    sp.temperature = 0.7f;
    sp.top_p = 0.0f; /* off on the wire */
    sp.top_k = 5;
    sp.max_new_tokens = 32;
    sp.n_stop_tokens = 2;
    sp.stop_tokens = stops;
    sp.seed = 99;
    int32_t stop[2];
    quillan_sampling_t s;
    qerr_t err = {0};
    cr_assert_eq(rollout_sampling_from_proto(&sp, 259, stop, &s, &err), 0, "%s", err.msg);
    cr_expect_float_eq(s.temperature, 0.7f, 1e-7);
    cr_expect_float_eq(s.top_p, 1.0f, 0.0, "top_p 0 means off");
    cr_expect_eq(s.top_k, 5);
    cr_expect_eq(s.max_new_tokens, 32);
    cr_expect_eq(s.n_stop, 2);
    cr_expect_eq(s.stop_tokens[0], 257);
    cr_expect_eq(s.stop_tokens[1], 10);
    cr_expect_eq(s.seed, 99u);

    stops[1] = 259;
    cr_expect_eq(rollout_sampling_from_proto(&sp, 259, stop, &s, &err), -1);
    cr_expect(strstr(err.msg, "stop_tokens[1]") != NULL, "%s", err.msg);
    stops[1] = 10;
    sp.temperature = -1.0f;
    cr_expect_eq(rollout_sampling_from_proto(&sp, 259, stop, &s, &err), -1);
    cr_expect(strstr(err.msg, "temperature") != NULL, "%s", err.msg);
    sp.temperature = 1.0f;
    sp.max_new_tokens = 0;
    cr_expect_eq(rollout_sampling_from_proto(&sp, 259, stop, &s, &err), -1);
    cr_expect(strstr(err.msg, "max_new_tokens") != NULL, "%s", err.msg);
}

/* Shape of the made-up routing: 2 layers, 2 kept minis, 1 expert and 2 micros per mini. */
enum { NP = 3, L = 2, KM = 2, KE = 1, KN = 2, LW = 1, RI = KM * (1 + KE + KN) };

/* Route value of (position, layer, slot): distinct everywhere, so a wrong offset shows. */
static int32_t route_val(int pos, int l, int k) {
    return pos * 100 + l * 20 + k;
}

/* A sample of T tokens with routing for positions 0 .. NP + T - 2 and plan words z1 = 2 pos,
 * z0 = 2 pos + 1. */
static void sample_make(quillan_sample_t *s, int T, quillan_finish_t fin) {
    memset(s, 0, sizeof *s);
    s->n_tokens = T;
    s->tokens = malloc((size_t)T * sizeof *s->tokens);
    s->logprobs = malloc((size_t)T * sizeof *s->logprobs);
    s->logprobs_full = malloc((size_t)T * sizeof *s->logprobs_full);
    s->kept = malloc((size_t)T * sizeof *s->kept);
    for (int t = 0; t < T; t++) {
        s->tokens[t] = 48 + t;
        s->logprobs[t] = -0.5f * (float)(t + 1);
        s->logprobs_full[t] = s->logprobs[t];
        s->kept[t] = 7 + t;
    }
    s->finish = fin;
    s->n_route = NP + T - 1;
    s->route = malloc((size_t)s->n_route * L * RI * sizeof *s->route);
    s->plan = malloc((size_t)s->n_route * 2 * LW * sizeof *s->plan);
    for (int p = 0; p < s->n_route; p++) {
        for (int l = 0; l < L; l++)
            for (int k = 0; k < RI; k++)
                s->route[(p * L + l) * RI + k] = route_val(p, l, k);
        s->plan[p * 2] = 2u * (uint64_t)p;
        s->plan[p * 2 + 1] = 2u * (uint64_t)p + 1;
    }
}

Test(worker, group_build) {
    uint32_t prompt[NP] = {256, 49, 43};
    Quillan__SamplingParams sp = QUILLAN__SAMPLING_PARAMS__INIT;
    sp.temperature = 1.0f;
    sp.top_k = 8;
    sp.max_new_tokens = 4;
    Quillan__RolloutRequest rq = QUILLAN__ROLLOUT_REQUEST__INIT;
    rq.lease_id = 17;
    rq.prompt_id = 3;
    rq.epoch = 2;
    rq.n_prompt_tokens = NP;
    rq.prompt_tokens = prompt;
    rq.group_size = 2;
    rq.sampling = &sp;

    quillan_group_t grp = {.prompt_id = 3, .n_samples = 2, .policy_version = 9};
    grp.samples = calloc(2, sizeof *grp.samples);
    sample_make(&grp.samples[0], 4, QUILLAN_FINISH_LENGTH);
    sample_make(&grp.samples[1], 2, QUILLAN_FINISH_STOP);
    const char *texts[] = {"0123", "01"};

    reward_score_t total[2] = {{true, 0.5}, {false, 0.0}};
    reward_score_t parts[2] = {{true, 0.5}, {false, 0.0}};
    reward_result_t rw = {.n_samples = 2, .n_services = 1, .total = total, .parts = parts};
    const char *names[] = {"math"};
    rollout_group_src_t src = {.rq = &rq,
                               .group = &grp,
                               .texts = texts,
                               .policy_version = 9,
                               .kept_counts = true,
                               .route = {L, KM, KE, KN, LW},
                               .rewards = &rw,
                               .service_names = names,
                               .gen_seconds = 1.5,
                               .reward_seconds = 0.25};
    qerr_t err = {0};
    Quillan__TrajectoryGroup *g = rollout_group_build(&src, &err);
    cr_assert(g != NULL, "%s", err.msg);
    cr_expect_eq(g->lease_id, 17u);
    cr_expect_eq(g->prompt_id, 3u);
    cr_expect_eq(g->epoch, 2u);
    cr_expect_eq(g->policy_version, 9u);
    cr_expect_eq(g->n_prompt_tokens, (size_t)NP);
    cr_expect_eq(g->prompt_tokens[2], 43u);
    cr_expect_eq(g->sampling->top_k, 8u);
    cr_expect_float_eq(g->gen_seconds, 1.5, 0.0);
    cr_expect_float_eq(g->reward_seconds, 0.25, 0.0);
    cr_assert_eq(g->n_trajectories, 2u);

    const Quillan__Trajectory *t0 = g->trajectories[0], *t1 = g->trajectories[1];
    cr_expect_eq(t0->maybe_reward_case, QUILLAN__TRAJECTORY__MAYBE_REWARD_REWARD);
    cr_expect_float_eq(t0->reward, 0.5, 0.0);
    cr_assert_eq(t0->n_reward_parts, 1u);
    cr_expect_str_eq(t0->reward_parts[0]->key, "math");
    cr_expect_eq(t1->maybe_reward_case, QUILLAN__TRAJECTORY__MAYBE_REWARD__NOT_SET,
                 "no reward stays absent, never 0");
    cr_expect_eq(t1->n_reward_parts, 0u);
    cr_expect_eq(t0->finish_reason, QUILLAN__FINISH_REASON__FINISH_REASON_LENGTH);
    cr_expect_eq(t1->finish_reason, QUILLAN__FINISH_REASON__FINISH_REASON_STOP);
    cr_expect_str_eq(t0->text, "0123");
    cr_assert_eq(t0->n_completion_tokens, 4u);
    cr_assert_eq(t0->n_kept_counts, 4u);
    for (int t = 0; t < 4; t++) {
        cr_expect_eq(t0->completion_tokens[t], (uint32_t)(48 + t));
        cr_expect_float_eq(t0->behaviour_logprobs[t], -0.5f * (float)(t + 1), 0.0);
        cr_expect_eq(t0->kept_counts[t], (uint32_t)(7 + t));
    }

    /* Token t was drawn by the forward at position NP - 1 + t. */
    const Quillan__RoutingRecord *r = t0->routing;
    cr_assert(r != NULL);
    cr_expect_eq(r->num_layers, (uint32_t)L);
    cr_assert_eq(r->n_minis, (size_t)(4 * L * KM));
    cr_assert_eq(r->n_experts, (size_t)(4 * L * KM * KE));
    cr_assert_eq(r->n_micros, (size_t)(4 * L * KM * KN));
    cr_assert_eq(r->n_plan, (size_t)(4 * LW));
    for (int t = 0; t < 4; t++) {
        const int pos = NP - 1 + t;
        for (int l = 0; l < L; l++) {
            for (int k = 0; k < KM; k++)
                cr_expect_eq(r->minis[(t * L + l) * KM + k], (uint32_t)route_val(pos, l, k));
            for (int k = 0; k < KM * KE; k++)
                cr_expect_eq(r->experts[(t * L + l) * KM * KE + k],
                             (uint32_t)route_val(pos, l, KM + k));
            for (int k = 0; k < KM * KN; k++)
                cr_expect_eq(r->micros[(t * L + l) * KM * KN + k],
                             (uint32_t)route_val(pos, l, KM + KM * KE + k));
        }
        cr_expect_eq(r->plan[t], 2u * (uint64_t)pos + 1, "z0 of position %d", pos);
    }

    /* What goes on the wire passes the dispatcher's checks with the model's bounds. */
    const dispatch_codec_limits_t lim = {.vocab_size = 259,
                                         .max_group_size = 2,
                                         .max_prompt_tokens = 16,
                                         .max_new_tokens = 4,
                                         .num_layers = L,
                                         .top_k_minis = KM,
                                         .top_k_experts = KE,
                                         .top_k_micros = KN,
                                         .plan_words = LW,
                                         .num_mini_moes = 1000,
                                         .num_experts_per_mini = 1000,
                                         .num_micros_per_mini = 1000};
    Quillan__Envelope env = QUILLAN__ENVELOPE__INIT;
    env.body_case = QUILLAN__ENVELOPE__BODY_TRAJECTORY_GROUP;
    env.trajectory_group = g;
    cr_expect_eq(dispatch_codec_validate(&env, &lim, &err), 0, "%s", err.msg);

    rollout_group_free(&g);
    cr_expect_null(g);

    /* Without rewards every sample has none; a size mismatch is refused. */
    src.rewards = NULL;
    src.kept_counts = false;
    g = rollout_group_build(&src, &err);
    cr_assert(g != NULL, "%s", err.msg);
    cr_expect_eq(g->trajectories[0]->maybe_reward_case, QUILLAN__TRAJECTORY__MAYBE_REWARD__NOT_SET);
    cr_expect_eq(g->trajectories[0]->n_kept_counts, 0u);
    rollout_group_free(&g);
    rq.group_size = 3;
    cr_expect_null(rollout_group_build(&src, &err));
    cr_expect(strstr(err.msg, "group size 3") != NULL, "%s", err.msg);
    quillan_group_free(&grp);
}
