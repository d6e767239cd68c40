/* Codec of the reward protocol (proto/reward.proto): RewardRequest / RewardResponse between
 * rollout workers and reward services in any language (reward/PROTOCOL.md). No payload frame.
 */
#ifndef QUILLAN_REWARD_CODEC_H
#define QUILLAN_REWARD_CODEC_H

#include "wire_codec.h"

/* Bounds a received reward message must respect. */
typedef struct {
    uint32_t max_samples; /* a request has 1..max_samples samples; > 0 */
    uint32_t vocab_size;  /* token ids are < vocab_size; 0 = ids not checked (a service that
                             does not know the model) */
} reward_codec_limits_t;

/* Packs a reward Envelope (see wire_codec_pack). */
int reward_codec_pack(const wire_header_t *hdr, Quillan__Envelope *env, wire_buf_t *out,
                      qerr_t *err);

/* wire_codec_unpack for the reward protocol, then reward_codec_validate. */
wire_msg_t *reward_codec_unpack(const void *data, size_t len, const reward_codec_limits_t *lim,
                                size_t budget, qerr_t *err);

/* Checks a reward Envelope on its own: sample count within bounds, finish reasons valid,
 * token ids below vocab, present scores finite, a response with an error carries no scores.
 * Returns 0 or -1 with err naming the field. */
int reward_codec_validate(const Quillan__Envelope *env, const reward_codec_limits_t *lim,
                          qerr_t *err);

/* Checks a response against the request it answers: same request_id, and (when error is
 * empty) exactly one score entry per sample. Returns 0 or -1 with err. */
int reward_codec_response_check(const Quillan__RewardResponse *resp,
                                const Quillan__RewardRequest *req, qerr_t *err);

/* net_validate_fn adapter (common/net.h): ctx is a const reward_codec_limits_t *. */
int reward_codec_net_validate(void *ctx, const Quillan__Envelope *env, size_t payload_len,
                              qerr_t *err);

#endif
