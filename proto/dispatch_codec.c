#include "dispatch_codec.h"

#include "alloc.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>

/* Field paths in error messages ("trajectory_group.trajectories[3]") fit in this. */
#define PATH_MAX_LEN 160

/* Formats a field path into buf; a path cut short at PATH_MAX_LEN still names the field. */
static const char *subpath(char *buf, size_t cap, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static const char *subpath(char *buf, size_t cap, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, cap, fmt, ap);
    va_end(ap);
    return buf;
}

static int tokens_check(const char *where, const char *field, const uint32_t *tok, size_t n,
                        uint32_t vocab, qerr_t *err) {
    for (size_t i = 0; i < n; i++)
        if (tok[i] >= vocab)
            return qerr_set(err, QERR_RANGE, "%s.%s[%zu]: token %u is not below vocab_size %u",
                            where, field, i, tok[i], vocab);
    return 0;
}

static int sampling_check(const char *where, const Quillan__SamplingParams *s,
                          const dispatch_codec_limits_t *lim, qerr_t *err) {
    if (s == NULL)
        return qerr_set(err, QERR_INVALID, "%s.sampling is missing", where);
    if (!isfinite(s->temperature) || s->temperature < 0)
        return qerr_set(err, QERR_RANGE, "%s.sampling.temperature %g is not a finite value >= 0",
                        where, (double)s->temperature);
    if (!isfinite(s->top_p) || s->top_p < 0 || s->top_p > 1)
        return qerr_set(err, QERR_RANGE, "%s.sampling.top_p %g is outside [0, 1]", where,
                        (double)s->top_p);
    if (s->top_k > lim->vocab_size)
        return qerr_set(err, QERR_RANGE, "%s.sampling.top_k %u exceeds vocab_size %u", where,
                        s->top_k, lim->vocab_size);
    if (s->max_new_tokens < 1 || s->max_new_tokens > lim->max_new_tokens)
        return qerr_set(err, QERR_RANGE, "%s.sampling.max_new_tokens %u is outside [1, %u]", where,
                        s->max_new_tokens, lim->max_new_tokens);
    char sub[PATH_MAX_LEN];
    return tokens_check(subpath(sub, sizeof sub, "%s.sampling", where), "stop_tokens",
                        s->stop_tokens, s->n_stop_tokens, lim->vocab_size, err);
}

static int prompt_check(const char *where, const uint32_t *tok, size_t n,
                        const dispatch_codec_limits_t *lim, qerr_t *err) {
    if (n < 1 || n > lim->max_prompt_tokens)
        return qerr_set(err, QERR_RANGE, "%s.prompt_tokens: %zu tokens, expected 1..%u", where, n,
                        lim->max_prompt_tokens);
    return tokens_check(where, "prompt_tokens", tok, n, lim->vocab_size, err);
}

static int group_size_check(const char *where, const char *field, size_t g,
                            const dispatch_codec_limits_t *lim, qerr_t *err) {
    if (g < 1 || g > lim->max_group_size)
        return qerr_set(err, QERR_RANGE, "%s.%s: group size %zu is outside [1, %u]", where, field,
                        g, lim->max_group_size);
    return 0;
}

static int indices_check(const char *where, const char *field, const uint32_t *idx, size_t n,
                         size_t expect, uint32_t bound, qerr_t *err) {
    if (n != expect)
        return qerr_set(err, QERR_INVALID, "%s.%s: %zu entries, the shape needs %zu", where, field,
                        n, expect);
    for (size_t i = 0; i < n; i++)
        if (idx[i] >= bound)
            return qerr_set(err, QERR_RANGE, "%s.%s[%zu]: index %u is not below %u", where, field,
                            i, idx[i], bound);
    return 0;
}

static int routing_check(const char *where, const Quillan__RoutingRecord *r, size_t n_tokens,
                         const dispatch_codec_limits_t *lim, qerr_t *err) {
    if (lim->num_layers == 0)
        return qerr_set(err, QERR_INVALID, "%s.routing: present, but this model has no routing",
                        where);
    if (r->num_layers != lim->num_layers || r->top_k_minis != lim->top_k_minis ||
        r->top_k_experts != lim->top_k_experts || r->top_k_micros != lim->top_k_micros ||
        r->plan_words != lim->plan_words)
        return qerr_set(err, QERR_INVALID,
                        "%s.routing: shape (layers %u, top-k minis %u, experts %u, micros %u, "
                        "plan words %u) differs from the model's (%u, %u, %u, %u, %u)",
                        where, r->num_layers, r->top_k_minis, r->top_k_experts, r->top_k_micros,
                        r->plan_words, lim->num_layers, lim->top_k_minis, lim->top_k_experts,
                        lim->top_k_micros, lim->plan_words);
    char sub[PATH_MAX_LEN];
    subpath(sub, sizeof sub, "%s.routing", where);
    /* Sizes come from the limits, not the peer; q_mul_size saturates so a huge product can
     * never equal a real array length. */
    size_t tl = q_mul_size(n_tokens, r->num_layers);
    size_t n_minis = q_mul_size(tl, r->top_k_minis);
    if (indices_check(sub, "minis", r->minis, r->n_minis, n_minis, lim->num_mini_moes, err) ||
        indices_check(sub, "experts", r->experts, r->n_experts,
                      q_mul_size(n_minis, r->top_k_experts), lim->num_experts_per_mini, err) ||
        indices_check(sub, "micros", r->micros, r->n_micros, q_mul_size(n_minis, r->top_k_micros),
                      lim->num_micros_per_mini, err))
        return -1;
    size_t n_plan = q_mul_size(n_tokens, r->plan_words);
    if (r->n_plan != n_plan)
        return qerr_set(err, QERR_INVALID, "%s.plan: %zu words, the shape needs %zu", sub,
                        r->n_plan, n_plan);
    return 0;
}

static int finish_reason_check(const char *where, Quillan__FinishReason f, qerr_t *err) {
    switch (f) {
    case QUILLAN__FINISH_REASON__FINISH_REASON_STOP:
    case QUILLAN__FINISH_REASON__FINISH_REASON_LENGTH:
    case QUILLAN__FINISH_REASON__FINISH_REASON_ERROR: return 0;
    default:
        return qerr_set(err, QERR_INVALID, "%s.finish_reason %d is not stop, length or error",
                        where, (int)f);
    }
}

static int trajectory_check(const char *where, const Quillan__Trajectory *t,
                            const dispatch_codec_limits_t *lim, qerr_t *err) {
    size_t n = t->n_completion_tokens;
    if (n > lim->max_new_tokens)
        return qerr_set(err, QERR_RANGE, "%s.completion_tokens: %zu tokens exceed %u", where, n,
                        lim->max_new_tokens);
    if (tokens_check(where, "completion_tokens", t->completion_tokens, n, lim->vocab_size, err))
        return -1;
    if (t->n_behaviour_logprobs != n)
        return qerr_set(err, QERR_INVALID,
                        "%s.behaviour_logprobs: %zu entries for %zu completion_tokens", where,
                        t->n_behaviour_logprobs, n);
    for (size_t i = 0; i < n; i++) {
        float lp = t->behaviour_logprobs[i];
        if (!isfinite(lp) || lp > DISPATCH_LOGPROB_MAX)
            return qerr_set(err, QERR_RANGE,
                            "%s.behaviour_logprobs[%zu]: %g is not a finite log-probability", where,
                            i, (double)lp);
    }
    if (t->n_kept_counts != 0 && t->n_kept_counts != n)
        return qerr_set(err, QERR_INVALID,
                        "%s.kept_counts: %zu entries for %zu completion_tokens (expected 0 or %zu)",
                        where, t->n_kept_counts, n, n);
    for (size_t i = 0; i < t->n_kept_counts; i++)
        if (t->kept_counts[i] < 1 || t->kept_counts[i] > lim->vocab_size)
            return qerr_set(err, QERR_RANGE, "%s.kept_counts[%zu]: %u is outside [1, %u]", where, i,
                            t->kept_counts[i], lim->vocab_size);
    if (t->maybe_reward_case == QUILLAN__TRAJECTORY__MAYBE_REWARD_REWARD && !isfinite(t->reward))
        return qerr_set(err, QERR_RANGE, "%s.reward is not finite", where);
    for (size_t i = 0; i < t->n_reward_parts; i++) {
        const Quillan__Trajectory__RewardPartsEntry *e = t->reward_parts[i];
        if (e->key[0] == '\0' || !isfinite(e->value))
            return qerr_set(err, QERR_INVALID,
                            "%s.reward_parts[%zu]: needs a non-empty name and a finite value",
                            where, i);
    }
    if (finish_reason_check(where, t->finish_reason, err))
        return -1;
    if (t->routing && routing_check(where, t->routing, n, lim, err))
        return -1;
    return 0;
}

static int group_check(const Quillan__TrajectoryGroup *g, const dispatch_codec_limits_t *lim,
                       qerr_t *err) {
    const char *where = "trajectory_group";
    if (g->lease_id == 0)
        return qerr_set(err, QERR_INVALID, "%s.lease_id is 0 (unset)", where);
    if (prompt_check(where, g->prompt_tokens, g->n_prompt_tokens, lim, err) ||
        group_size_check(where, "trajectories", g->n_trajectories, lim, err) ||
        sampling_check(where, g->sampling, lim, err))
        return -1;
    if (!isfinite(g->gen_seconds) || g->gen_seconds < 0 || !isfinite(g->reward_seconds) ||
        g->reward_seconds < 0)
        return qerr_set(err, QERR_RANGE, "%s: gen_seconds and reward_seconds must be finite >= 0",
                        where);
    for (size_t i = 0; i < g->n_trajectories; i++) {
        char sub[PATH_MAX_LEN];
        subpath(sub, sizeof sub, "%s.trajectories[%zu]", where, i);
        if (trajectory_check(sub, g->trajectories[i], lim, err))
            return -1;
    }
    return 0;
}

static int rollout_request_check(const char *where, const Quillan__RolloutRequest *r,
                                 const dispatch_codec_limits_t *lim, qerr_t *err) {
    if (r->lease_id == 0)
        return qerr_set(err, QERR_INVALID, "%s.lease_id is 0 (unset)", where);
    if (prompt_check(where, r->prompt_tokens, r->n_prompt_tokens, lim, err) ||
        group_size_check(where, "group_size", r->group_size, lim, err) ||
        sampling_check(where, r->sampling, lim, err))
        return -1;
    for (size_t i = 0; i < r->n_metadata; i++)
        if (r->metadata[i]->key[0] == '\0')
            return qerr_set(err, QERR_INVALID, "%s.metadata[%zu] has an empty key", where, i);
    return 0;
}

static int lease_check(const Quillan__Lease *l, const dispatch_codec_limits_t *lim, qerr_t *err) {
    if (l->n_requests > 0 && l->timeout_ms == 0)
        return qerr_set(err, QERR_INVALID, "lease.timeout_ms is 0 with %zu requests",
                        l->n_requests);
    for (size_t i = 0; i < l->n_requests; i++) {
        char sub[PATH_MAX_LEN];
        subpath(sub, sizeof sub, "lease.requests[%zu]", i);
        if (rollout_request_check(sub, l->requests[i], lim, err))
            return -1;
    }
    return 0;
}

int dispatch_codec_validate(const Quillan__Envelope *env, const dispatch_codec_limits_t *lim,
                            qerr_t *err) {
    Q_ASSERT(env && lim);
    if (lim->vocab_size == 0)
        return qerr_set(err, QERR_INVALID, "dispatch limits: vocab_size is 0");
    switch (env->body_case) {
    case QUILLAN__ENVELOPE__BODY_WORK_REQUEST:
        if (env->work_request->worker_id[0] == '\0')
            return qerr_set(err, QERR_INVALID, "work_request.worker_id is empty");
        return 0;
    case QUILLAN__ENVELOPE__BODY_LEASE: return lease_check(env->lease, lim, err);
    case QUILLAN__ENVELOPE__BODY_HEARTBEAT:
        for (size_t i = 0; i < env->heartbeat->n_lease_ids; i++)
            if (env->heartbeat->lease_ids[i] == 0)
                return qerr_set(err, QERR_INVALID, "heartbeat.lease_ids[%zu] is 0 (unset)", i);
        return 0;
    case QUILLAN__ENVELOPE__BODY_TRAJECTORY_GROUP:
        return group_check(env->trajectory_group, lim, err);
    case QUILLAN__ENVELOPE__BODY_ACK:
        if (env->ack->lease_id == 0)
            return qerr_set(err, QERR_INVALID, "ack.lease_id is 0 (unset)");
        if (env->ack->status <= QUILLAN__ACK_STATUS__ACK_STATUS_UNSPECIFIED ||
            env->ack->status > QUILLAN__ACK_STATUS__ACK_STATUS_REJECTED)
            return qerr_set(err, QERR_INVALID, "ack.status %d is not a known status",
                            (int)env->ack->status);
        return 0;
    case QUILLAN__ENVELOPE__BODY_ERROR: return wire_error_validate(env->error, err);
    default:
        return qerr_set(err, QERR_INVALID,
                        "envelope body '%s' is not part of the dispatch protocol",
                        wire_body_name(env->body_case));
    }
}

int dispatch_codec_pack(const wire_header_t *hdr, Quillan__Envelope *env, wire_buf_t *out,
                        qerr_t *err) {
    return wire_codec_pack(WIRE_PROTOCOL_DISPATCH, hdr, env, out, err);
}

wire_msg_t *dispatch_codec_unpack(const void *data, size_t len, const dispatch_codec_limits_t *lim,
                                  size_t budget, qerr_t *err) {
    wire_msg_t *m = wire_codec_unpack(WIRE_PROTOCOL_DISPATCH, data, len, budget, err);
    if (m && dispatch_codec_validate(wire_msg_envelope(m), lim, err) != 0)
        wire_msg_destroy(&m);
    return m;
}

int dispatch_codec_net_validate(void *ctx, const Quillan__Envelope *env, size_t payload_len,
                                qerr_t *err) {
    if (payload_len != 0)
        return qerr_set(err, QERR_INVALID, "dispatch message '%s' carries a %zu-byte payload frame",
                        wire_body_name(env->body_case), payload_len);
    return dispatch_codec_validate(env, ctx, err);
}
