/* Codec of the dispatch protocol (proto/dispatch.proto): workers <-> the learner's dispatcher.
 * Bodies: WorkRequest, Lease (of RolloutRequests), Heartbeat, TrajectoryGroup, Ack, Error.
 * No raw payload frame. */
#ifndef QUILLAN_DISPATCH_CODEC_H
#define QUILLAN_DISPATCH_CODEC_H

#include "wire_codec.h"

/* Largest accepted behaviour log-probability: a log-probability is <= 0 up to float rounding
 * of the sampler's log-softmax. */
#define DISPATCH_LOGPROB_MAX 1e-3

/* Bounds a received dispatch message must respect; they come from the model and run config. */
typedef struct {
    uint32_t vocab_size;        /* token ids are < vocab_size; > 0 */
    uint32_t max_group_size;    /* G of a request or group is in [1, max_group_size] */
    uint32_t max_prompt_tokens; /* prompt_tokens has 1..max_prompt_tokens entries */
    uint32_t max_new_tokens;    /* completions and sampling.max_new_tokens are <= this */
    /* Routing replay (MODEL.md). num_layers == 0: routing records are refused. Otherwise a
     * record's shape must equal these and its indices stay below the bounds. */
    uint32_t num_layers;
    uint32_t top_k_minis, top_k_experts, top_k_micros;
    uint32_t plan_words; /* diffusion_bits / 64 (0 without the diffusion stage) */
    uint32_t num_mini_moes, num_experts_per_mini, num_micros_per_mini;
} dispatch_codec_limits_t;

/* Packs a dispatch Envelope (see wire_codec_pack). */
int dispatch_codec_pack(const wire_header_t *hdr, Quillan__Envelope *env, wire_buf_t *out,
                        qerr_t *err);

/* wire_codec_unpack for the dispatch protocol, then dispatch_codec_validate. Returns a new
 * message (wire_msg_destroy) or NULL with err. */
wire_msg_t *dispatch_codec_unpack(const void *data, size_t len, const dispatch_codec_limits_t *lim,
                                  size_t budget, qerr_t *err);

/* Checks the semantic invariants of a dispatch Envelope's body against lim: token ids below
 * vocab, G within bounds, behaviour_logprobs / kept_counts / routing arrays as long as
 * completion_tokens, finite numbers, valid enums, non-zero lease ids. Returns 0, or -1 with
 * QERR_INVALID or QERR_RANGE naming the field ("trajectory_group.trajectories[2].kept_counts").
 */
int dispatch_codec_validate(const Quillan__Envelope *env, const dispatch_codec_limits_t *lim,
                            qerr_t *err);

/* net_validate_fn adapter (common/net.h): ctx is a const dispatch_codec_limits_t *; a dispatch
 * message must come without a payload frame. */
int dispatch_codec_net_validate(void *ctx, const Quillan__Envelope *env, size_t payload_len,
                                qerr_t *err);

#endif
