/* The worker's pure pieces (rollout/worker.h): a lease's sampling parameters for the engine,
 * and a generated, scored group as a TrajectoryGroup message. */
#include "alloc.h"
#include "worker.h"

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

int rollout_sampling_from_proto(const Quillan__SamplingParams *s, int vocab, int32_t *stop,
                                quillan_sampling_t *out, qerr_t *err) {
    quillan_sampling_default(out);
    if (s == NULL)
        return qerr_set(err, QERR_INVALID, "sampling: missing");
    if (!(s->temperature >= 0.0f) || !isfinite(s->temperature))
        return qerr_set(err, QERR_RANGE, "sampling.temperature: %g is not >= 0",
                        (double)s->temperature);
    if (!(s->top_p >= 0.0f && s->top_p <= 1.0f))
        return qerr_set(err, QERR_RANGE, "sampling.top_p: %g is not in [0, 1]", (double)s->top_p);
    if (s->max_new_tokens < 1 || s->max_new_tokens > (uint32_t)INT32_MAX)
        return qerr_set(err, QERR_RANGE, "sampling.max_new_tokens: %u is not >= 1",
                        s->max_new_tokens);
    if (s->top_k > (uint32_t)INT32_MAX)
        return qerr_set(err, QERR_RANGE, "sampling.top_k: %u too large", s->top_k);
    for (size_t i = 0; i < s->n_stop_tokens; i++) {
        if (s->stop_tokens[i] >= (uint32_t)vocab)
            return qerr_set(err, QERR_RANGE, "sampling.stop_tokens[%zu]: %u >= vocab %d", i,
                            s->stop_tokens[i], vocab);
        stop[i] = (int32_t)s->stop_tokens[i];
    }
    out->temperature = s->temperature;
    out->top_k = (int)s->top_k;
    out->top_p = s->top_p == 0.0f ? 1.0f : s->top_p;
    out->max_new_tokens = (int)s->max_new_tokens;
    out->stop_tokens = s->n_stop_tokens ? stop : NULL;
    out->n_stop = (int)s->n_stop_tokens;
    out->seed = s->seed;
    return 0;
}

/* Length of the well-formed UTF-8 sequence at s (n bytes left), or 0 when there is none. */
static size_t utf8_seq(const unsigned char *s, size_t n) {
    const unsigned c = s[0];
    if (c >= 0x01 && c <= 0x7F)
        return 1;
    size_t len;
    unsigned lo = 0x80, hi = 0xBF; /* range of the second byte */
    if (c >= 0xC2 && c <= 0xDF)
        len = 2;
    else if (c >= 0xE0 && c <= 0xEF) {
        len = 3;
        if (c == 0xE0)
            lo = 0xA0; /* no overlong forms */
        if (c == 0xED)
            hi = 0x9F; /* no surrogates */
    } else if (c >= 0xF0 && c <= 0xF4) {
        len = 4;
        if (c == 0xF0)
            lo = 0x90;
        if (c == 0xF4)
            hi = 0x8F; /* <= U+10FFFF */
    } else {
        return 0;
    }
    if (n < len || s[1] < lo || s[1] > hi)
        return 0;
    for (size_t i = 2; i < len; i++)
        if ((s[i] & 0xC0) != 0x80)
            return 0;
    return len;
}

char *rollout_text_utf8(const char *s, size_t len, size_t *out_len) {
    /* Each bad byte grows to the 3 bytes of U+FFFD. */
    if (len > (SIZE_MAX - 1) / 3)
        return NULL;
    char *out = malloc(len * 3 + 1);
    if (out == NULL)
        return NULL;
    const unsigned char *u = (const unsigned char *)s;
    size_t o = 0;
    for (size_t i = 0; i < len;) {
        size_t k = utf8_seq(u + i, len - i);
        if (k == 0) {
            memcpy(out + o, "\xEF\xBF\xBD", 3);
            o += 3;
            i++;
        } else {
            memcpy(out + o, u + i, k);
            o += k;
            i += k;
        }
    }
    out[o] = '\0';
    if (out_len)
        *out_len = o;
    return out;
}

static uint32_t *u32_copy(const uint32_t *src, size_t n) {
    uint32_t *d = malloc((n ? n : 1) * sizeof *d);
    if (d && n)
        memcpy(d, src, n * sizeof *d);
    return d;
}

static uint32_t *u32_from_i32(const int32_t *src, size_t n) {
    uint32_t *d = malloc((n ? n : 1) * sizeof *d);
    if (d)
        for (size_t i = 0; i < n; i++)
            d[i] = (uint32_t)src[i];
    return d;
}

static void routing_free(Quillan__RoutingRecord *r) {
    if (r == NULL)
        return;
    free(r->minis);
    free(r->experts);
    free(r->micros);
    free(r->plan);
    free(r);
}

/* The routing record of sample s (see rollout_group_build); NULL with err. */
static Quillan__RoutingRecord *routing_build(const quillan_sample_t *s, int n_prompt,
                                             const rollout_route_shape_t *sh, qerr_t *err) {
    const size_t T = (size_t)s->n_tokens, L = (size_t)sh->num_layers;
    const size_t KM = (size_t)sh->top_k_minis, KE = (size_t)sh->top_k_experts,
                 KN = (size_t)sh->top_k_micros, Lw = (size_t)sh->plan_words;
    const size_t ri = KM * (1 + KE + KN); /* route ints per layer and position */
    if (T > 0 && (size_t)s->n_route < (size_t)n_prompt - 1 + T) {
        qerr_set(err, QERR_INVALID, "routing: %d positions recorded, %zu needed", s->n_route,
                 (size_t)n_prompt - 1 + T);
        return NULL;
    }
    Quillan__RoutingRecord *r = malloc(sizeof *r);
    if (r == NULL) {
        qerr_set(err, QERR_NOMEM, "routing record");
        return NULL;
    }
    *r = (Quillan__RoutingRecord)QUILLAN__ROUTING_RECORD__INIT;
    r->num_layers = (uint32_t)L;
    r->top_k_minis = (uint32_t)KM;
    r->top_k_experts = (uint32_t)KE;
    r->top_k_micros = (uint32_t)KN;
    r->plan_words = (uint32_t)Lw;
    r->n_minis = T * L * KM;
    r->n_experts = T * L * KM * KE;
    r->n_micros = T * L * KM * KN;
    r->n_plan = s->plan ? T * Lw : 0;
    r->minis = malloc((r->n_minis ? r->n_minis : 1) * sizeof *r->minis);
    r->experts = malloc((r->n_experts ? r->n_experts : 1) * sizeof *r->experts);
    r->micros = malloc((r->n_micros ? r->n_micros : 1) * sizeof *r->micros);
    r->plan = malloc((r->n_plan ? r->n_plan : 1) * sizeof *r->plan);
    if (!r->minis || !r->experts || !r->micros || !r->plan) {
        routing_free(r);
        qerr_set(err, QERR_NOMEM, "routing record");
        return NULL;
    }
    for (size_t t = 0; t < T; t++) {
        const size_t pos = (size_t)n_prompt - 1 + t;
        for (size_t l = 0; l < L; l++) {
            const int32_t *src = s->route + (pos * L + l) * ri;
            const size_t row = t * L + l;
            for (size_t k = 0; k < KM; k++)
                r->minis[row * KM + k] = (uint32_t)src[k];
            for (size_t k = 0; k < KM * KE; k++)
                r->experts[row * KM * KE + k] = (uint32_t)src[KM + k];
            for (size_t k = 0; k < KM * KN; k++)
                r->micros[row * KM * KN + k] = (uint32_t)src[KM + KM * KE + k];
        }
        if (r->n_plan) /* plan [n_route, 2, Lw]: z1 then z0 */
            memcpy(r->plan + t * Lw, s->plan + (pos * 2 + 1) * Lw, Lw * sizeof *r->plan);
    }
    return r;
}

static void trajectory_free(Quillan__Trajectory *t) {
    if (t == NULL)
        return;
    free(t->completion_tokens);
    free(t->behaviour_logprobs);
    for (size_t j = 0; j < t->n_reward_parts; j++) {
        if (t->reward_parts[j])
            free(t->reward_parts[j]->key);
        free(t->reward_parts[j]);
    }
    free(t->reward_parts);
    if (t->text != protobuf_c_empty_string)
        free(t->text);
    free(t->kept_counts);
    routing_free(t->routing);
    free(t);
}

void rollout_group_free(Quillan__TrajectoryGroup **gp) {
    if (gp == NULL || *gp == NULL)
        return;
    Quillan__TrajectoryGroup *g = *gp;
    free(g->prompt_tokens);
    for (size_t i = 0; i < g->n_trajectories; i++)
        trajectory_free(g->trajectories[i]);
    free(g->trajectories);
    if (g->sampling)
        free(g->sampling->stop_tokens);
    free(g->sampling);
    free(g);
    *gp = NULL;
}

static char *str_dup(const char *s) {
    size_t n = strlen(s) + 1;
    char *d = malloc(n);
    if (d)
        memcpy(d, s, n);
    return d;
}

/* Fills trajectory i of the group; -1 with err. */
static int trajectory_fill(Quillan__Trajectory *t, const rollout_group_src_t *src, size_t i,
                           qerr_t *err) {
    const quillan_sample_t *s = &src->group->samples[i];
    const size_t T = (size_t)s->n_tokens;
    t->n_completion_tokens = T;
    t->completion_tokens = u32_from_i32(s->tokens, T);
    t->n_behaviour_logprobs = T;
    t->behaviour_logprobs = malloc((T ? T : 1) * sizeof *t->behaviour_logprobs);
    t->text = str_dup(src->texts[i]);
    if (!t->completion_tokens || !t->behaviour_logprobs || !t->text)
        return qerr_set(err, QERR_NOMEM, "trajectory %zu", i);
    if (T)
        memcpy(t->behaviour_logprobs, s->logprobs, T * sizeof *t->behaviour_logprobs);
    t->finish_reason = s->finish == QUILLAN_FINISH_STOP
                           ? QUILLAN__FINISH_REASON__FINISH_REASON_STOP
                           : QUILLAN__FINISH_REASON__FINISH_REASON_LENGTH;
    if (src->kept_counts) {
        t->kept_counts = u32_from_i32(s->kept, T);
        if (t->kept_counts == NULL)
            return qerr_set(err, QERR_NOMEM, "trajectory %zu: kept_counts", i);
        t->n_kept_counts = T;
    }
    if (s->route) {
        t->routing = routing_build(s, (int)src->rq->n_prompt_tokens, &src->route, err);
        if (t->routing == NULL)
            return qerr_wrap(err, "trajectory %zu", i);
    }
    const reward_result_t *rw = src->rewards;
    if (rw == NULL || !rw->total[i].has)
        return 0;
    t->maybe_reward_case = QUILLAN__TRAJECTORY__MAYBE_REWARD_REWARD;
    t->reward = rw->total[i].value;
    t->reward_parts = calloc(rw->n_services ? rw->n_services : 1, sizeof *t->reward_parts);
    if (t->reward_parts == NULL)
        return qerr_set(err, QERR_NOMEM, "trajectory %zu: reward_parts", i);
    for (size_t j = 0; j < rw->n_services; j++) {
        Quillan__Trajectory__RewardPartsEntry *e = malloc(sizeof *e);
        if (e == NULL)
            return qerr_set(err, QERR_NOMEM, "trajectory %zu: reward_parts", i);
        *e = (Quillan__Trajectory__RewardPartsEntry)QUILLAN__TRAJECTORY__REWARD_PARTS_ENTRY__INIT;
        t->reward_parts[t->n_reward_parts++] = e;
        e->key = str_dup(src->service_names[j]);
        if (e->key == NULL)
            return qerr_set(err, QERR_NOMEM, "trajectory %zu: reward_parts", i);
        e->value = rw->parts[j * rw->n_samples + i].value;
    }
    return 0;
}

Quillan__TrajectoryGroup *rollout_group_build(const rollout_group_src_t *src, qerr_t *err) {
    const Quillan__RolloutRequest *rq = src->rq;
    const size_t G = (size_t)src->group->n_samples;
    if (G != rq->group_size || G == 0) {
        qerr_set(err, QERR_INVALID, "lease %llu: %zu samples for group size %u",
                 (unsigned long long)rq->lease_id, G, rq->group_size);
        return NULL;
    }
    if (src->rewards && src->rewards->n_samples != G) {
        qerr_set(err, QERR_INVALID, "lease %llu: %zu rewards for %zu samples",
                 (unsigned long long)rq->lease_id, src->rewards->n_samples, G);
        return NULL;
    }
    Quillan__TrajectoryGroup *g = malloc(sizeof *g);
    if (g == NULL) {
        qerr_set(err, QERR_NOMEM, "trajectory group");
        return NULL;
    }
    *g = (Quillan__TrajectoryGroup)QUILLAN__TRAJECTORY_GROUP__INIT;
    g->lease_id = rq->lease_id;
    g->prompt_id = rq->prompt_id;
    g->epoch = rq->epoch;
    g->policy_version = src->policy_version;
    g->gen_seconds = src->gen_seconds;
    g->reward_seconds = src->reward_seconds;
    g->n_prompt_tokens = rq->n_prompt_tokens;
    g->prompt_tokens = u32_copy(rq->prompt_tokens, rq->n_prompt_tokens);
    g->trajectories = calloc(G, sizeof *g->trajectories);
    g->sampling = malloc(sizeof *g->sampling);
    if (!g->prompt_tokens || !g->trajectories || !g->sampling) {
        free(g->sampling);
        g->sampling = NULL;
        rollout_group_free(&g);
        qerr_set(err, QERR_NOMEM, "trajectory group");
        return NULL;
    }
    *g->sampling = *rq->sampling;
    g->sampling->stop_tokens = NULL;
    if (rq->sampling->n_stop_tokens) {
        g->sampling->stop_tokens = u32_copy(rq->sampling->stop_tokens, rq->sampling->n_stop_tokens);
        if (g->sampling->stop_tokens == NULL) {
            g->sampling->n_stop_tokens = 0;
            rollout_group_free(&g);
            qerr_set(err, QERR_NOMEM, "trajectory group");
            return NULL;
        }
    }
    for (size_t i = 0; i < G; i++) {
        Quillan__Trajectory *t = malloc(sizeof *t);
        if (t == NULL) {
            rollout_group_free(&g);
            qerr_set(err, QERR_NOMEM, "trajectory %zu", i);
            return NULL;
        }
        *t = (Quillan__Trajectory)QUILLAN__TRAJECTORY__INIT;
        g->trajectories[g->n_trajectories++] = t;
        if (trajectory_fill(t, src, i, err) != 0) {
            rollout_group_free(&g);
            qerr_wrap(err, "lease %llu", (unsigned long long)rq->lease_id);
            return NULL;
        }
    }
    return g;
}
