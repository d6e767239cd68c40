#include "reward_codec.h"

#include <math.h>

static int token_ids_check(const char *field, size_t sample, const uint32_t *tok, size_t n,
                           uint32_t vocab, qerr_t *err) {
    if (vocab == 0)
        return 0;
    for (size_t i = 0; i < n; i++)
        if (tok[i] >= vocab)
            return qerr_set(err, QERR_RANGE,
                            "reward_request.samples[%zu].%s[%zu]: token %u is not below %u", sample,
                            field, i, tok[i], vocab);
    return 0;
}

static int request_check(const Quillan__RewardRequest *r, const reward_codec_limits_t *lim,
                         qerr_t *err) {
    if (r->n_samples < 1 || r->n_samples > lim->max_samples)
        return qerr_set(err, QERR_RANGE, "reward_request.samples: %zu samples, expected 1..%u",
                        r->n_samples, lim->max_samples);
    for (size_t i = 0; i < r->n_samples; i++) {
        const Quillan__RewardSample *s = r->samples[i];
        if (s->finish_reason < QUILLAN__FINISH_REASON__FINISH_REASON_STOP ||
            s->finish_reason > QUILLAN__FINISH_REASON__FINISH_REASON_ERROR)
            return qerr_set(err, QERR_INVALID,
                            "reward_request.samples[%zu].finish_reason %d is not stop, length "
                            "or error",
                            i, (int)s->finish_reason);
        if (token_ids_check("prompt_tokens", i, s->prompt_tokens, s->n_prompt_tokens,
                            lim->vocab_size, err) ||
            token_ids_check("completion_tokens", i, s->completion_tokens, s->n_completion_tokens,
                            lim->vocab_size, err))
            return -1;
    }
    for (size_t i = 0; i < r->n_metadata; i++)
        if (r->metadata[i]->key[0] == '\0')
            return qerr_set(err, QERR_INVALID, "reward_request.metadata[%zu] has an empty key", i);
    return 0;
}

static int response_check(const Quillan__RewardResponse *r, const reward_codec_limits_t *lim,
                          qerr_t *err) {
    if (r->error[0] != '\0' && r->n_scores != 0)
        return qerr_set(err, QERR_INVALID,
                        "reward_response: error is set, yet %zu scores came with it", r->n_scores);
    if (r->n_scores > lim->max_samples)
        return qerr_set(err, QERR_RANGE, "reward_response.scores: %zu entries exceed %u",
                        r->n_scores, lim->max_samples);
    for (size_t i = 0; i < r->n_scores; i++) {
        const Quillan__ScoreEntry *s = r->scores[i];
        if (s->maybe_score_case == QUILLAN__SCORE_ENTRY__MAYBE_SCORE_SCORE && !isfinite(s->score))
            return qerr_set(err, QERR_RANGE,
                            "reward_response.scores[%zu].score is not finite (leave it unset "
                            "for \"no reward\")",
                            i);
    }
    return 0;
}

int reward_codec_validate(const Quillan__Envelope *env, const reward_codec_limits_t *lim,
                          qerr_t *err) {
    Q_ASSERT(env && lim);
    switch (env->body_case) {
    case QUILLAN__ENVELOPE__BODY_REWARD_REQUEST:
        return request_check(env->reward_request, lim, err);
    case QUILLAN__ENVELOPE__BODY_REWARD_RESPONSE:
        return response_check(env->reward_response, lim, err);
    case QUILLAN__ENVELOPE__BODY_ERROR: return wire_error_validate(env->error, err);
    default:
        return qerr_set(err, QERR_INVALID, "envelope body '%s' is not part of the reward protocol",
                        wire_body_name(env->body_case));
    }
}

int reward_codec_response_check(const Quillan__RewardResponse *resp,
                                const Quillan__RewardRequest *req, qerr_t *err) {
    if (resp->request_id != req->request_id)
        return qerr_set(err, QERR_INVALID,
                        "reward_response.request_id %llu answers no request "
                        "(expected %llu)",
                        (unsigned long long)resp->request_id, (unsigned long long)req->request_id);
    if (resp->error[0] == '\0' && resp->n_scores != req->n_samples)
        return qerr_set(err, QERR_INVALID, "reward_response.scores: %zu entries for %zu samples",
                        resp->n_scores, req->n_samples);
    return 0;
}

int reward_codec_pack(const wire_header_t *hdr, Quillan__Envelope *env, wire_buf_t *out,
                      qerr_t *err) {
    return wire_codec_pack(WIRE_PROTOCOL_REWARD, hdr, env, out, err);
}

wire_msg_t *reward_codec_unpack(const void *data, size_t len, const reward_codec_limits_t *lim,
                                size_t budget, qerr_t *err) {
    wire_msg_t *m = wire_codec_unpack(WIRE_PROTOCOL_REWARD, data, len, budget, err);
    if (m && reward_codec_validate(wire_msg_envelope(m), lim, err) != 0)
        wire_msg_destroy(&m);
    return m;
}

int reward_codec_net_validate(void *ctx, const Quillan__Envelope *env, size_t payload_len,
                              qerr_t *err) {
    if (payload_len != 0)
        return qerr_set(err, QERR_INVALID, "reward message '%s' carries a %zu-byte payload frame",
                        wire_body_name(env->body_case), payload_len);
    return reward_codec_validate(env, ctx, err);
}
