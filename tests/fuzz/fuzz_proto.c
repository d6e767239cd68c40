/* libFuzzer target: one protocol's decoder of received frames (built once per protocol with
 * FUZZ_PROTOCOL = WIRE_PROTOCOL_DISPATCH, _WEIGHTS, _REWARD or _LOG): the Envelope through
 * wire_codec_unpack with the production byte budget, the protocol's semantic validator (what
 * net.h runs on every message), and the protocol's own unpack entry point. The first two input
 * bytes give the payload frame length the validator is told about. */
#include "dispatch_codec.h"
#include "fuzz_util.h"
#include "log_codec.h"
#include "reward_codec.h"
#include "weights_codec.h"

#include <string.h>

static const dispatch_codec_limits_t dispatch_limits = {
    .vocab_size = 512, .max_group_size = 8, .max_prompt_tokens = 256, .max_new_tokens = 64};
static const weights_codec_limits_t weights_limits = {.max_chunk_bytes = 1u << 20,
                                                      .max_total_bytes = (uint64_t)1 << 32};
static const reward_codec_limits_t reward_limits = {.max_samples = 64, .vocab_size = 512};

static int validate(const Quillan__Envelope *env, size_t payload_len, qerr_t *err) {
    switch (FUZZ_PROTOCOL) {
    case WIRE_PROTOCOL_DISPATCH:
        return dispatch_codec_net_validate((void *)&dispatch_limits, env, payload_len, err);
    case WIRE_PROTOCOL_WEIGHTS:
        return weights_codec_net_validate((void *)&weights_limits, env, payload_len, err);
    case WIRE_PROTOCOL_REWARD:
        return reward_codec_net_validate((void *)&reward_limits, env, payload_len, err);
    default: return log_codec_net_validate(NULL, env, payload_len, err);
    }
}

static wire_msg_t *codec_unpack(const uint8_t *data, size_t len, size_t payload_len, qerr_t *err) {
    switch (FUZZ_PROTOCOL) {
    case WIRE_PROTOCOL_DISPATCH:
        return dispatch_codec_unpack(data, len, &dispatch_limits, WIRE_DECODE_BUDGET_DEFAULT, err);
    case WIRE_PROTOCOL_WEIGHTS:
        return weights_codec_unpack(data, len, payload_len, &weights_limits,
                                    WIRE_DECODE_BUDGET_DEFAULT, err);
    case WIRE_PROTOCOL_REWARD:
        return reward_codec_unpack(data, len, &reward_limits, WIRE_DECODE_BUDGET_DEFAULT, err);
    default: return log_codec_unpack(data, len, WIRE_DECODE_BUDGET_DEFAULT, err);
    }
}

/* Reads what a receiver reads of a valid message, so the sanitizers see every pointer used. */
static void use(const Quillan__Envelope *env) {
    if (env->body_case == QUILLAN__ENVELOPE__BODY_LOG_RECORD) {
        log_record_t rec;
        log_field_t fields[64];
        log_codec_record_view(env->log_record, &rec, fields, 64);
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size < 2)
        return 0;
    size_t payload_len = (size_t)data[0] | (size_t)data[1] << 8;
    data += 2;
    size -= 2;
    qerr_t e;
    qerr_clear(&e);
    uint32_t version;
    if (wire_codec_peek_version(data, size, &version, &e) != 0)
        fuzz_check_error(&e);
    wire_msg_t *m = wire_codec_unpack(FUZZ_PROTOCOL, data, size, WIRE_DECODE_BUDGET_DEFAULT, &e);
    int valid = 0;
    if (m == NULL) {
        fuzz_check_error(&e);
    } else {
        const Quillan__Envelope *env = wire_msg_envelope(m);
        Q_ASSERT(wire_body_allowed(FUZZ_PROTOCOL, env->body_case));
        valid = validate(env, payload_len, &e) == 0;
        if (valid)
            use(env);
        else
            fuzz_check_error(&e);
        wire_msg_destroy(&m);
    }
    m = codec_unpack(data, size, payload_len, &e);
    if (m == NULL)
        fuzz_check_error(&e);
    wire_msg_destroy(&m);
    return 0;
}
