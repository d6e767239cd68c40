/* The inference engine against the learner: the same snapshot must give the same policy.
 *
 * A tiny-preset model (random weights, head scaled up so distributions are peaked as a trained
 * model's are) is quantized with qpolicy_build and decoded by the engine; the learner's
 * quantization-aware forward (model_forward) then recomputes every generated token's log-prob,
 * with the engine's routing records replayed and without. Greedy agreement is measured on
 * greedy completions against the learner's full distribution at every position (one batch row
 * per vocabulary entry), counted where the learner's top-1/top-2 logit margin exceeds
 * AGREE_MARGIN. Also: results do not depend on the batch size or the thread count, and bad
 * prompts are rejected before any work. */
#include <criterion/criterion.h>
#include <criterion/logging.h>

#include "attention.h"
#include "engine.h"
#include "kern_pool.h"
#include "model.h"
#include "qpolicy.h"
#include "quillan.h"
#include "sampler.h"

#include <stdatomic.h>
#include <time.h>

#include <math.h>
#include <stdlib.h>
#include <string.h>

#define AGREE_MARGIN 0.01       /* logits: greedy tokens are compared where top1 - top2 > this */
#define BOUND_GREEDY 0.995      /* with replay: fraction of greedy tokens that agree */
#define BOUND_DLOGP_REPLAY 5e-3 /* with replay: mean |log p_worker - log p_learner| per token */
#define BOUND_DLOGP_OWN 5e-2    /* own routing on both sides: near-ties may flip a few decisions */
#define HEAD_SCALE 8.0f         /* sharpens the random model's distributions */

static model_t *tiny_model(uint64_t seed) {
    model_config_t c;
    qerr_t err;
    cr_assert(model_config_preset("tiny", &c, &err) == 0, "%s", err.msg);
    c.seed = seed;
    c.context = 96;
    model_t *m = model_new(&c, &err);
    cr_assert(m, "%s", err.msg);
    const model_tensor_t *h = model_tensor_find(m, "head.weight");
    real *p = model_params(m);
    for (size_t i = 0; i < h->numel; i++)
        p[h->offset + i] *= HEAD_SCALE;
    model_params_changed(m);
    return m;
}

static quillan_policy_t *policy_of(model_t *m, qpolicy_t **keep) {
    qerr_t err;
    *keep = qpolicy_build(m, 1, &err);
    cr_assert(*keep, "%s", err.msg);
    size_t len;
    const void *bytes = qpolicy_bytes(*keep, &len);
    quillan_policy_t *p = quillan_policy_load_bytes(bytes, len, "test snapshot", NULL, NULL, &err);
    cr_assert(p, "%s", err.msg);
    return p;
}

static quillan_engine_t *engine(int threads, int batch) {
    quillan_engine_params_t ep;
    quillan_engine_params_default(&ep);
    ep.threads = threads;
    ep.max_batch = batch;
    qerr_t err;
    quillan_engine_t *e = quillan_engine_new(&ep, &err);
    cr_assert(e, "%s", err.msg);
    return e;
}

#define N_PROMPTS 4
/* Greedy completions stop at the first EOS, so how many tokens a prompt yields depends on its
 * path: enough prompts that the counted tokens stay well above the test's minimum. */
#define GREEDY_PROMPTS 8
#define PROMPT_LEN 12

static void make_prompts(quillan_prompt_t *pr, int32_t (*toks)[PROMPT_LEN], int n, int G,
                         float temp, int max_new) {
    for (int i = 0; i < n; i++) {
        toks[i][0] = 256; /* BOS */
        for (int t = 1; t < PROMPT_LEN; t++)
            toks[i][t] = (int32_t)((i * 37 + t * 11) % 256);
        memset(&pr[i], 0, sizeof pr[i]);
        quillan_sampling_default(&pr[i].sampling);
        pr[i].prompt_id = 100 + (uint64_t)i;
        pr[i].tokens = toks[i];
        pr[i].n_tokens = PROMPT_LEN - (i % 3); /* different lengths */
        pr[i].n_samples = G;
        pr[i].sampling.temperature = temp;
        pr[i].sampling.max_new_tokens = max_new;
        pr[i].sampling.seed = 42;
    }
}

/* The learner's batch for one sample: inputs are the prompt and the completion but its last
 * token; targets the next tokens; weights 1 on completion targets. Records unpacked into
 * moe_route_t [L] and a diffusion_plan_t over B rows of the same sequence. */
typedef struct {
    int B, T, P;
    int32_t *tokens, *targets;
    real *weights;
    moe_route_t *routes;
    diffusion_plan_t plan;
} lbatch_t;

static void lbatch_make(lbatch_t *lb, model_t *m, const quillan_policy_t *p,
                        const quillan_prompt_t *pr, const quillan_sample_t *s, int B,
                        int vary_target) {
    const model_config_t *c = model_config(m);
    moe_dims_t d;
    moe_dims_from_config(&d, c);
    const int P = pr->n_tokens, T = P + s->n_tokens - 1, L = c->num_layers;
    cr_assert_eq(s->n_route, T);
    lb->B = B;
    lb->T = T;
    lb->P = P;
    lb->tokens = malloc((size_t)B * T * sizeof *lb->tokens);
    lb->targets = malloc((size_t)B * T * sizeof *lb->targets);
    lb->weights = malloc((size_t)B * T * sizeof *lb->weights);
    lb->routes = calloc((size_t)L, sizeof *lb->routes);
    qerr_t err;
    for (int l = 0; l < L; l++)
        cr_assert(moe_route_init(&lb->routes[l], &d, B * T, &err) == 0);
    cr_assert(diffusion_plan_init(&lb->plan, c->diffusion_bits, B * T, &err) == 0);
    for (int b = 0; b < B; b++) {
        for (int t = 0; t < T; t++) {
            const size_t i = (size_t)b * T + t;
            lb->tokens[i] = t < P ? pr->tokens[t] : s->tokens[t - P];
            const int32_t next = t + 1 < P ? pr->tokens[t + 1] : s->tokens[t + 1 - P];
            lb->targets[i] = vary_target && t >= P - 1 ? b : next;
            lb->weights[i] = t >= P - 1 ? 1 : 0;
        }
        cr_assert(eng_sample_replay(lb->routes, &lb->plan, b * T, p, s, T, &err) == 0, "%s",
                  err.msg);
    }
    cr_assert_eq(lb->plan.BT, B * T);
}

static void lbatch_free(lbatch_t *lb, int L) {
    for (int l = 0; l < L; l++)
        moe_route_free(&lb->routes[l]);
    free(lb->routes);
    diffusion_plan_free(&lb->plan);
    free(lb->tokens);
    free(lb->targets);
    free(lb->weights);
}

static const real *learner_logp(model_t *m, lbatch_t *lb, int replay, float temperature,
                                model_stats_t *st) {
    model_batch_t b = {.B = lb->B,
                       .T = lb->T,
                       .tokens = lb->tokens,
                       .targets = lb->targets,
                       .weights = lb->weights,
                       .replay = replay ? lb->routes : NULL,
                       .plan_replay = replay ? &lb->plan : NULL,
                       .temperature = temperature};
    qerr_t err;
    cr_assert(model_forward(m, &b, st, &err) == 0, "%s", err.msg);
    return model_logp(m);
}

Test(engine, sampled_logprobs_match_learner) {
    model_t *m = tiny_model(11);
    qpolicy_t *q;
    quillan_policy_t *p = policy_of(m, &q);
    quillan_engine_t *e = engine(2, 5);
    quillan_prompt_t pr[N_PROMPTS];
    int32_t toks[N_PROMPTS][PROMPT_LEN];
    const float temp = 0.9f;
    make_prompts(pr, toks, N_PROMPTS, 3, temp, 40);
    quillan_group_t g[N_PROMPTS];
    qerr_t err;
    cr_assert(quillan_generate(e, p, pr, N_PROMPTS, g, NULL, NULL, &err) == 0, "%s", err.msg);
    double sum[2] = {0, 0}, worst[2] = {0, 0};
    long n = 0, dec = 0, mis = 0, pos = 0, pmis = 0;
    for (int i = 0; i < N_PROMPTS; i++)
        for (int s = 0; s < g[i].n_samples; s++) {
            const quillan_sample_t *sm = &g[i].samples[s];
            /* Without truncation the behaviour log-prob is the full one. */
            for (int k = 0; k < sm->n_tokens; k++)
                cr_assert_float_eq(sm->logprobs[k], sm->logprobs_full[k], 1e-6);
            if (sm->n_tokens < 2)
                continue;
            lbatch_t lb;
            lbatch_make(&lb, m, p, &pr[i], sm, 1, 0);
            for (int replay = 0; replay <= 1; replay++) {
                model_stats_t st;
                const real *lp = learner_logp(m, &lb, replay, temp, &st);
                for (int k = 0; k < sm->n_tokens; k++) {
                    const double dlt = fabs((double)sm->logprobs_full[k] - lp[lb.P - 1 + k]);
                    sum[replay] += dlt;
                    worst[replay] = dlt > worst[replay] ? dlt : worst[replay];
                }
                if (replay) {
                    dec += st.decisions;
                    mis += st.mismatches;
                    pos += lb.T;
                    pmis += st.plan_mismatches;
                }
            }
            n += sm->n_tokens;
            lbatch_free(&lb, model_config(m)->num_layers);
        }
    cr_assert(n > 100, "too few tokens (%ld)", n);
    cr_log_info("sampled tokens %ld: mean |dlogp| own routing %.2e (worst %.2e), replay %.2e "
                "(worst %.2e); learner's own choice differed on %ld of %ld router decisions and "
                "%ld of %ld plans",
                n, sum[0] / n, worst[0], sum[1] / n, worst[1], mis, dec, pmis, pos);
    cr_assert(sum[1] / n <= BOUND_DLOGP_REPLAY, "mean |dlogp| with replay %.3g > %.3g", sum[1] / n,
              BOUND_DLOGP_REPLAY);
    cr_assert(sum[0] / n <= BOUND_DLOGP_OWN, "mean |dlogp| own routing %.3g > %.3g", sum[0] / n,
              BOUND_DLOGP_OWN);
    for (int i = 0; i < N_PROMPTS; i++)
        quillan_group_free(&g[i]);
    quillan_engine_destroy(&e);
    quillan_policy_release(&p);
    qpolicy_destroy(&q);
    model_destroy(&m);
}

Test(engine, greedy_tokens_match_learner_argmax) {
    model_t *m = tiny_model(23);
    const int V = model_config(m)->vocab_size;
    qpolicy_t *q;
    quillan_policy_t *p = policy_of(m, &q);
    quillan_engine_t *e = engine(2, 4);
    quillan_prompt_t pr[GREEDY_PROMPTS];
    int32_t toks[GREEDY_PROMPTS][PROMPT_LEN];
    make_prompts(pr, toks, GREEDY_PROMPTS, 1, 0.0f, 24);
    quillan_group_t g[GREEDY_PROMPTS];
    qerr_t err;
    cr_assert(quillan_generate(e, p, pr, GREEDY_PROMPTS, g, NULL, NULL, &err) == 0, "%s", err.msg);
    long counted[2] = {0, 0}, agree[2] = {0, 0}, low_margin[2] = {0, 0};
    double dsum = 0;
    long dn = 0;
    for (int i = 0; i < GREEDY_PROMPTS; i++) {
        const quillan_sample_t *sm = &g[i].samples[0];
        cr_assert_eq(sm->kept[0], 1);
        if (sm->n_tokens < 2)
            continue;
        lbatch_t lb;
        lbatch_make(&lb, m, p, &pr[i], sm, V, 1);
        for (int replay = 0; replay <= 1; replay++) {
            const real *lp = learner_logp(m, &lb, replay, 1.0f, NULL);
            for (int k = 0; k < sm->n_tokens; k++) {
                const int t = lb.P - 1 + k;
                int best = 0, second = -1;
                for (int v = 1; v < V; v++) {
                    const real x = lp[(size_t)v * lb.T + t];
                    if (x > lp[(size_t)best * lb.T + t]) {
                        second = best;
                        best = v;
                    } else if (second < 0 || x > lp[(size_t)second * lb.T + t]) {
                        second = v;
                    }
                }
                const double margin =
                    (double)lp[(size_t)best * lb.T + t] - lp[(size_t)second * lb.T + t];
                if (replay) {
                    dsum +=
                        fabs((double)sm->logprobs_full[k] - lp[(size_t)sm->tokens[k] * lb.T + t]);
                    dn++;
                }
                if (margin <= AGREE_MARGIN) {
                    low_margin[replay]++;
                    continue;
                }
                counted[replay]++;
                agree[replay] += best == sm->tokens[k];
            }
        }
        lbatch_free(&lb, model_config(m)->num_layers);
    }
    cr_log_info("greedy agreement: own routing %ld/%ld, replay %ld/%ld (margin <= %.2g: %ld, "
                "%ld); mean |dlogp| of greedy tokens with replay %.2e",
                agree[0], counted[0], agree[1], counted[1], AGREE_MARGIN, low_margin[0],
                low_margin[1], dsum / dn);
    cr_assert(counted[1] > 40, "too few greedy tokens counted (%ld)", counted[1]);
    cr_assert((double)agree[1] / counted[1] >= BOUND_GREEDY, "greedy agreement %.4f < %.4f",
              (double)agree[1] / counted[1], BOUND_GREEDY);
    cr_assert(dsum / dn <= BOUND_DLOGP_REPLAY);
    for (int i = 0; i < GREEDY_PROMPTS; i++)
        quillan_group_free(&g[i]);
    quillan_engine_destroy(&e);
    quillan_policy_release(&p);
    qpolicy_destroy(&q);
    model_destroy(&m);
}

/* Same seeds give the same completions whatever the batch size and thread count. */
Test(engine, results_do_not_depend_on_batch_or_threads) {
    model_t *m = tiny_model(5);
    qpolicy_t *q;
    quillan_policy_t *p = policy_of(m, &q);
    quillan_prompt_t pr[N_PROMPTS];
    int32_t toks[N_PROMPTS][PROMPT_LEN];
    make_prompts(pr, toks, N_PROMPTS, 3, 1.0f, 20);
    pr[1].sampling.top_k = 20;
    pr[2].sampling.top_p = 0.8f;
    quillan_group_t ref[N_PROMPTS], g[N_PROMPTS];
    qerr_t err;
    quillan_engine_t *e1 = engine(1, 1);
    cr_assert(quillan_generate(e1, p, pr, N_PROMPTS, ref, NULL, NULL, &err) == 0, "%s", err.msg);
    const int configs[3][2] = {{2, 3}, {2, 32}, {1, 7}};
    for (int c = 0; c < 3; c++) {
        quillan_engine_t *e = engine(configs[c][0], configs[c][1]);
        cr_assert(quillan_generate(e, p, pr, N_PROMPTS, g, NULL, NULL, &err) == 0, "%s", err.msg);
        for (int i = 0; i < N_PROMPTS; i++)
            for (int s = 0; s < g[i].n_samples; s++) {
                const quillan_sample_t *a = &ref[i].samples[s], *b = &g[i].samples[s];
                cr_assert_eq(a->n_tokens, b->n_tokens, "prompt %d sample %d", i, s);
                cr_assert(memcmp(a->tokens, b->tokens, (size_t)a->n_tokens * 4) == 0);
                cr_assert(memcmp(a->logprobs, b->logprobs, (size_t)a->n_tokens * 4) == 0);
                cr_assert(memcmp(a->kept, b->kept, (size_t)a->n_tokens * 4) == 0);
                cr_assert_eq(a->finish, b->finish);
            }
        for (int i = 0; i < N_PROMPTS; i++)
            quillan_group_free(&g[i]);
        quillan_engine_destroy(&e);
    }
    /* Truncation was applied and is reported. */
    cr_assert(ref[1].samples[0].kept[0] == 20);
    cr_assert(ref[2].samples[0].kept[0] < model_config(m)->vocab_size);
    cr_assert(ref[2].samples[0].logprobs[0] >= ref[2].samples[0].logprobs_full[0]);
    for (int i = 0; i < N_PROMPTS; i++)
        quillan_group_free(&ref[i]);
    quillan_engine_destroy(&e1);
    quillan_policy_release(&p);
    qpolicy_destroy(&q);
    model_destroy(&m);
}

/* eng_sample_replay on a hand-made record: every value lands at its row of the layer's route and
 * of the plan, BT grows to the last row written, and a missing record or too small a route is
 * refused. */
Test(engine, sample_replay_unpacks_records) {
    model_t *m = tiny_model(5);
    qpolicy_t *q;
    quillan_policy_t *p = policy_of(m, &q);
    const model_config_t *c = model_config(m);
    moe_dims_t d;
    moe_dims_from_config(&d, c);
    quillan_policy_info_t info;
    quillan_policy_info(p, &info);
    const int L = c->num_layers, RI = info.route_ints, Lw = info.plan_words, N = 3, ROW = 2;
    cr_assert_eq(RI, d.KM * (1 + d.KE + d.KN));
    int32_t *route = malloc((size_t)N * L * RI * sizeof *route);
    uint64_t *plan_rec = malloc((size_t)N * 2 * Lw * sizeof *plan_rec);
    for (int i = 0; i < N * L * RI; i++)
        route[i] = i;
    for (int i = 0; i < N * 2 * Lw; i++)
        plan_rec[i] = 1000 + (uint64_t)i;
    quillan_sample_t s = {.n_route = N, .route = route, .plan = plan_rec};
    moe_route_t *rt = calloc((size_t)L, sizeof *rt);
    diffusion_plan_t plan;
    qerr_t err;
    for (int l = 0; l < L; l++)
        cr_assert(moe_route_init(&rt[l], &d, ROW + N, &err) == 0);
    cr_assert(diffusion_plan_init(&plan, c->diffusion_bits, ROW + N, &err) == 0);
    cr_assert(eng_sample_replay(rt, &plan, ROW, p, &s, N, &err) == 0, "%s", err.msg);
    for (int t = 0; t < N; t++) {
        const int i = ROW + t;
        for (int l = 0; l < L; l++) {
            const int32_t *rec = route + ((size_t)t * L + l) * RI;
            for (int k = 0; k < d.KM; k++)
                cr_assert_eq(rt[l].mini[i * d.KM + k], rec[k]);
            for (int k = 0; k < d.KM * d.KE; k++)
                cr_assert_eq(rt[l].expert[i * d.KM * d.KE + k], rec[d.KM + k]);
            for (int k = 0; k < d.KM * d.KN; k++)
                cr_assert_eq(rt[l].micro[i * d.KM * d.KN + k], rec[d.KM + d.KM * d.KE + k]);
        }
        for (int k = 0; k < Lw; k++) {
            cr_assert_eq(plan.z1[i * Lw + k], plan_rec[(t * 2) * Lw + k]);
            cr_assert_eq(plan.z0[i * Lw + k], plan_rec[(t * 2 + 1) * Lw + k]);
        }
    }
    for (int l = 0; l < L; l++)
        cr_assert_eq(rt[l].BT, ROW + N);
    cr_assert_eq(plan.BT, ROW + N);
    cr_assert(eng_sample_replay(rt, &plan, ROW + 1, p, &s, N, &err) == -1);
    cr_assert_eq(err.code, QERR_RANGE);
    cr_assert(eng_sample_replay(rt, &plan, 0, p, &s, N + 1, &err) == -1);
    cr_assert_eq(err.code, QERR_RANGE);
    s.route = NULL;
    cr_assert(eng_sample_replay(rt, &plan, 0, p, &s, N, &err) == -1);
    cr_assert_eq(err.code, QERR_INVALID);
    for (int l = 0; l < L; l++)
        moe_route_free(&rt[l]);
    free(rt);
    diffusion_plan_free(&plan);
    free(route);
    free(plan_rec);
    quillan_policy_release(&p);
    qpolicy_destroy(&q);
    model_destroy(&m);
}

static int g_done_calls;
static void on_done(void *ctx, int index, quillan_group_t *group) {
    (void)ctx;
    cr_assert(group->n_samples > 0 && index >= 0);
    g_done_calls++;
}

Test(engine, stops_and_bad_prompts) {
    model_t *m = tiny_model(3);
    qpolicy_t *q;
    quillan_policy_t *p = policy_of(m, &q);
    quillan_engine_t *e = engine(1, 4);
    quillan_prompt_t pr[N_PROMPTS];
    int32_t toks[N_PROMPTS][PROMPT_LEN];
    make_prompts(pr, toks, N_PROMPTS, 2, 1.0f, 30);
    /* Every byte but 'a'..'z' stops: completions end early with finish stop. */
    int32_t stops[230];
    int ns = 0;
    for (int v = 0; v < 256 && ns < 230; v++)
        if (v < 'a' || v > 'z')
            stops[ns++] = v;
    pr[0].sampling.stop_tokens = stops;
    pr[0].sampling.n_stop = ns;
    quillan_group_t g[N_PROMPTS];
    qerr_t err;
    g_done_calls = 0;
    cr_assert(quillan_generate(e, p, pr, N_PROMPTS, g, on_done, NULL, &err) == 0, "%s", err.msg);
    cr_assert_eq(g_done_calls, N_PROMPTS);
    for (int s = 0; s < 2; s++) {
        const quillan_sample_t *sm = &g[0].samples[s];
        if (sm->finish == QUILLAN_FINISH_STOP) {
            const int32_t last = sm->tokens[sm->n_tokens - 1];
            cr_assert(last < 'a' || last > 'z');
        } else {
            cr_assert_eq(sm->n_tokens, 30);
        }
    }
    cr_assert_eq(g[1].samples[0].n_tokens <= 30, 1);
    for (int i = 0; i < N_PROMPTS; i++)
        quillan_group_free(&g[i]);

    /* Bad prompts: named, nothing generated. */
    int32_t bad[3] = {256, 300, 5};
    pr[2].tokens = bad;
    pr[2].n_tokens = 3;
    cr_assert(quillan_generate(e, p, pr, N_PROMPTS, g, NULL, NULL, &err) < 0);
    cr_assert(strstr(err.msg, "prompt 2") && strstr(err.msg, "300"), "%s", err.msg);
    for (int i = 0; i < N_PROMPTS; i++)
        quillan_group_free(&g[i]);
    make_prompts(pr, toks, N_PROMPTS, 2, 1.0f, 30);
    int32_t *longp = calloc(200, sizeof *longp);
    pr[1].tokens = longp;
    pr[1].n_tokens = 200;
    cr_assert(quillan_generate(e, p, pr, N_PROMPTS, g, NULL, NULL, &err) < 0);
    cr_assert(strstr(err.msg, "prompt 1") && strstr(err.msg, "context"), "%s", err.msg);
    for (int i = 0; i < N_PROMPTS; i++)
        quillan_group_free(&g[i]);
    free(longp);
    make_prompts(pr, toks, N_PROMPTS, 2, -1.0f, 30);
    cr_assert(quillan_generate(e, p, pr, 1, g, NULL, NULL, &err) < 0);
    cr_assert(strstr(err.msg, "temperature"), "%s", err.msg);
    quillan_group_free(&g[0]);

    /* Reference counting: a retained policy outlives the first release. */
    quillan_policy_t *p2 = quillan_policy_retain(p);
    quillan_policy_release(&p);
    cr_assert_null(p);
    quillan_policy_info_t info;
    quillan_policy_info(p2, &info);
    cr_assert_eq(info.vocab_size, 259);
    quillan_policy_release(&p2);
    quillan_engine_destroy(&e);
    qpolicy_destroy(&q);
    model_destroy(&m);
}

/* The engine's RoPE, angles once per row (rope_angles) and then each q and k row rotated
 * (rope_rotate), against the learner's rope_forward: the same bits at every head size and at
 * positions up to past the 512m context, in place and out of place. */
Test(engine, rope_in_two_parts_is_rope_forward) {
    const int shapes[][2] = {{8, 1}, {64, 4}, {512, 8}, {96, 3}, {512, 2}};
    uint64_t st = 0x9E3779B97F4A7C15ULL;
    for (size_t si = 0; si < sizeof shapes / sizeof *shapes; si++) {
        const int C = shapes[si][0], NH = shapes[si][1];
        float x[512], want[512], got[512], cs[ATTN_MAX_HS / 2], sn[ATTN_MAX_HS / 2];
        for (int pos = 0; pos < 5000; pos += 1 + pos / 3) {
            for (int c = 0; c < C; c++) {
                st = st * 6364136223846793005ULL + 1442695040888963407ULL;
                x[c] = (float)((int64_t)(st >> 11) - (1LL << 52)) / (float)(1LL << 50);
            }
            rope_forward(want, x, 1, 1, C, NH, pos);
            rope_angles(cs, sn, pos, C / NH);
            rope_rotate(got, x, cs, sn, C, NH);
            cr_assert(memcmp(got, want, (size_t)C * sizeof *got) == 0, "C %d NH %d pos %d", C, NH,
                      pos);
            rope_rotate(x, x, cs, sn, C, NH);
            cr_assert(memcmp(x, want, (size_t)C * sizeof *x) == 0, "in place, C %d pos %d", C, pos);
        }
    }
}

/* ---- sampler ---- */

/* sampler_weights' exp against libm's (both within about 1 ulp of the exact value). */
#define SAMPLER_EXP_ULPS 2.0

static uint64_t lcg_next(uint64_t *st) {
    *st = *st * 6364136223846793005ULL + 1442695040888963407ULL;
    return *st >> 11;
}

/* Logits of one of several shapes: wide normal-ish, few levels (many equal probabilities),
 * huge gaps (probabilities that underflow to 0 or to subnormals). */
static void sampler_logits(float *l, int V, int shape, uint64_t *st) {
    for (int i = 0; i < V; i++) {
        const double u = (double)lcg_next(st) / 9007199254740992.0;
        l[i] = shape == 0   ? (float)((u - 0.5) * 24)
               : shape == 1 ? (float)((int)(u * 7) - 3)
                            : (u < 0.3 ? -1e30f : (float)(-700 - 50 * u));
    }
}

Test(sampler, weights_are_exp_within_ulps) {
    const int V = 3001;
    float *l = malloc((size_t)V * sizeof *l), *z = malloc((size_t)V * sizeof *z);
    double *p = malloc((size_t)V * sizeof *p);
    cr_assert(l && z && p);
    uint64_t st = 7;
    const float temps[] = {0.0f, 1.0f, 0.7f, 1.9f};
    for (int shape = 0; shape < 3; shape++)
        for (size_t ti = 0; ti < sizeof temps / sizeof *temps; ti++) {
            const float T = temps[ti];
            sampler_logits(l, V, shape, &st);
            const double sum = sampler_weights(p, z, l, V, T);
            float mx = -INFINITY;
            for (int i = 0; i < V; i++)
                mx = fmaxf(mx, T == 0 ? l[i] : l[i] / T);
            double lanes[8] = {0};
            for (int i = 0; i < V; i++) {
                const float zi = T == 0 ? l[i] : l[i] / T;
                cr_assert(memcmp(&z[i], &zi, sizeof zi) == 0, "z[%d]", i);
                const double e = exp((double)(zi - mx)), ulp = nextafter(e, INFINITY) - e;
                cr_assert(fabs(p[i] - e) <= SAMPLER_EXP_ULPS * ulp,
                          "shape %d T %g: p[%d] = %.17g, exp %.17g", shape, (double)T, i, p[i], e);
                if (zi == mx)
                    cr_assert(p[i] == 1.0, "the maximum's weight is exactly 1");
                lanes[i % 8] += p[i];
            }
            for (int w = 4; w >= 1; w /= 2)
                for (int j = 0; j < w; j++)
                    lanes[j] += lanes[j + w];
            cr_assert(sum == lanes[0], "shape %d T %g: the sum's order", shape, (double)T);
        }
    free(l);
    free(z);
    free(p);
}

static const double *cmp_p;

static int cmp_desc(const void *a, const void *b) {
    const int32_t x = *(const int32_t *)a, y = *(const int32_t *)b;
    if (cmp_p[x] != cmp_p[y])
        return cmp_p[x] > cmp_p[y] ? -1 : 1;
    return (x > y) - (x < y);
}

/* sampler.h's contract written out with a whole sort, on sampler_weights' p. */
static sampler_result_t sample_ref(const float *l, int V, const sampler_params_t *prm, float u) {
    double *p = malloc((size_t)V * sizeof *p);
    float *z = malloc((size_t)V * sizeof *z);
    int32_t *ord = malloc((size_t)V * sizeof *ord);
    cr_assert(p && z && ord);
    const double sum = sampler_weights(p, z, l, V, prm->temperature);
    sampler_result_t r = {0};
    if (prm->temperature == 0) {
        for (int i = 1; i < V; i++)
            if (l[i] > l[r.token])
                r.token = i;
        r.logprob_full = (float)(-log(sum));
        r.kept = 1;
    } else {
        for (int i = 0; i < V; i++)
            ord[i] = i;
        cmp_p = p;
        qsort(ord, (size_t)V, sizeof *ord, cmp_desc);
        int kept = prm->top_k > 0 && prm->top_k < V ? prm->top_k : V;
        double mass = 0;
        for (int i = 0; i < kept; i++)
            mass += p[ord[i]];
        if (prm->top_p < 1) {
            const double need = (double)prm->top_p * mass;
            double c = 0;
            int n = 0;
            while (n < kept && !((c += p[ord[n++]]) >= need))
                ;
            kept = n;
            mass = c;
        }
        const int truncate = kept < V || prm->top_p < 1;
        if (!truncate) {
            /* Nothing truncated: inverse CDF in id order. */
            for (int i = 0; i < V; i++)
                ord[i] = i;
            mass = sum;
        }
        const double target = (double)u * mass;
        double c = 0;
        r.token = -1;
        for (int i = 0; i < kept && r.token < 0; i++)
            if ((c += p[ord[i]]) > target)
                r.token = ord[i];
        if (r.token < 0) {
            int last = kept - 1;
            while (!truncate && last > 0 && p[ord[last]] == 0)
                last--;
            r.token = ord[last];
        }
        r.logprob = (float)log(p[r.token] / mass);
        r.logprob_full = (float)log(p[r.token] / sum);
        r.kept = kept;
    }
    free(p);
    free(z);
    free(ord);
    return r;
}

/* Every truncation (top-k on both sides of the insertion limit and of V, top-p alone and
 * with top-k, greedy) gives the reference's token, count and log-probs to the bit. */
Test(sampler, truncations_match_a_whole_sort) {
    const int V = 2003;
    float *l = malloc((size_t)V * sizeof *l);
    cr_assert(l);
    sampler_scratch_t s;
    qerr_t err;
    cr_assert(sampler_scratch_init(&s, V, &err) == 0, "%s", err.msg);
    const int ks[] = {0, 1, 2, 7, 50, 256, 257, 1000, V - 1, V, V + 5};
    const float ps[] = {1.0f, 0.95f, 0.5f, 1e-6f};
    const float temps[] = {0.0f, 1.0f, 0.6f};
    uint64_t st = 99;
    long n = 0;
    for (int shape = 0; shape < 3; shape++)
        for (size_t ti = 0; ti < sizeof temps / sizeof *temps; ti++)
            for (size_t ki = 0; ki < sizeof ks / sizeof *ks; ki++)
                for (size_t pi = 0; pi < sizeof ps / sizeof *ps; pi++) {
                    sampler_logits(l, V, shape, &st);
                    const sampler_params_t prm = {temps[ti], ks[ki], ps[pi]};
                    cr_assert(sampler_params_check(&prm, &err) == 0, "%s", err.msg);
                    for (int ui = 0; ui < 3; ui++) {
                        const float u = ui == 0 ? 0.0f : ui == 1 ? 0.37f : 0.999999f;
                        sampler_result_t got, want = sample_ref(l, V, &prm, u);
                        sampler_sample(&got, l, V, &prm, u, &s);
                        cr_assert(got.token == want.token && got.kept == want.kept &&
                                      memcmp(&got.logprob, &want.logprob, 4) == 0 &&
                                      memcmp(&got.logprob_full, &want.logprob_full, 4) == 0,
                                  "shape %d T %g top_k %d top_p %g u %g: token %d / %d, kept %d "
                                  "/ %d, logprob %g / %g",
                                  shape, (double)prm.temperature, prm.top_k, (double)prm.top_p,
                                  (double)u, got.token, want.token, got.kept, want.kept,
                                  (double)got.logprob, (double)want.logprob);
                        n++;
                    }
                }
    cr_assert(n > 1000);
    sampler_scratch_free(&s);
    free(l);
}

/* kern_pool_for: every chunk runs exactly once per call, on a valid thread, whatever the pool's
 * size and the number of chunks; kern_pool_run still runs every thread once. */
#define POOL_MAX_CHUNKS 67

typedef struct {
    atomic_int runs[POOL_MAX_CHUNKS];
    atomic_int bad_tid;
    int nthreads;
} pool_count_t;

static void count_chunk(void *ctx, size_t c, int tid) {
    pool_count_t *pc = ctx;
    atomic_fetch_add(&pc->runs[c], 1);
    if (tid < 0 || tid >= pc->nthreads)
        atomic_fetch_add(&pc->bad_tid, 1);
}

static void count_thread(void *ctx, int tid, int nthreads) {
    pool_count_t *pc = ctx;
    atomic_fetch_add(&pc->runs[tid], 1);
    if (nthreads != pc->nthreads)
        atomic_fetch_add(&pc->bad_tid, 1);
}

Test(pool, every_chunk_runs_once) {
    for (int nt = 1; nt <= 3; nt++) {
        qerr_t err;
        kern_pool_t *pool = kern_pool_new(nt, &err);
        cr_assert(pool, "%s", err.msg);
        for (int round = 0; round < 200; round++) {
            const size_t n = (size_t)(round * 7) % POOL_MAX_CHUNKS;
            pool_count_t pc = {.nthreads = nt};
            if (round % 40 == 0) {
                /* Long enough for idle workers to stop spinning and sleep on the futex. */
                const struct timespec pause = {0, 3 * KERN_POOL_SPIN_US * 1000};
                nanosleep(&pause, NULL);
            }
            if (round % 5 == 4) {
                kern_pool_run(pool, count_thread, &pc);
                for (int t = 0; t < nt; t++)
                    cr_assert_eq(atomic_load(&pc.runs[t]), 1, "threads %d, round %d", nt, round);
            } else {
                kern_pool_for(pool, n, count_chunk, &pc);
                for (size_t c = 0; c < POOL_MAX_CHUNKS; c++)
                    cr_assert_eq(atomic_load(&pc.runs[c]), c < n ? 1 : 0,
                                 "threads %d, %zu chunks, chunk %zu", nt, n, c);
            }
            cr_assert_eq(atomic_load(&pc.bad_tid), 0);
        }
        kern_pool_destroy(&pool);
        cr_assert_null(pool);
    }
}
