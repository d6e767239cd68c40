/* Valid example messages of every body type, for the proto, fuzz and net tests.
 * A fixture_t holds all storage; its generated structs point into itself, so keep it in
 * static or heap memory and call fixture_init once before use. */
#ifndef QUILLAN_TEST_PROTO_FIXTURES_H
#define QUILLAN_TEST_PROTO_FIXTURES_H

#include "dispatch_codec.h"
#include "log_codec.h"
#include "reward_codec.h"
#include "weights_codec.h"

#include <string.h>

#define FX_T 3  /* completion tokens per trajectory */
#define FX_G 2  /* trajectories per group */
#define FX_L 2  /* layers */
#define FX_KM 2 /* top-k minis */
#define FX_KE 2 /* top-k experts */
#define FX_KU 3 /* top-k micros */
#define FX_PW 1 /* plan words */
#define FX_VOCAB 300u
#define FX_CHUNK 64u

static const dispatch_codec_limits_t fx_dispatch_limits = {
    .vocab_size = FX_VOCAB,
    .max_group_size = 8,
    .max_prompt_tokens = 16,
    .max_new_tokens = 8,
    .num_layers = FX_L,
    .top_k_minis = FX_KM,
    .top_k_experts = FX_KE,
    .top_k_micros = FX_KU,
    .plan_words = FX_PW,
    .num_mini_moes = 4,
    .num_experts_per_mini = 4,
    .num_micros_per_mini = 8,
};
static const weights_codec_limits_t fx_weights_limits = {.max_chunk_bytes = FX_CHUNK,
                                                         .max_total_bytes = 1 << 20};
static const reward_codec_limits_t fx_reward_limits = {.max_samples = 8, .vocab_size = FX_VOCAB};

typedef struct {
    uint32_t prompt[4];
    uint32_t stop[1];
    Quillan__SamplingParams sampling;
    uint32_t comp[FX_G][FX_T];
    float lp[FX_G][FX_T];
    uint32_t kept[FX_G][FX_T];
    uint32_t minis[FX_G][FX_T * FX_L * FX_KM];
    uint32_t experts[FX_G][FX_T * FX_L * FX_KM * FX_KE];
    uint32_t micros[FX_G][FX_T * FX_L * FX_KM * FX_KU];
    uint64_t plan[FX_G][FX_T * FX_PW];
    Quillan__RoutingRecord routing[FX_G];
    Quillan__Trajectory__RewardPartsEntry part;
    Quillan__Trajectory__RewardPartsEntry *parts[1];
    Quillan__Trajectory traj[FX_G];
    Quillan__Trajectory *trajp[FX_G];
    Quillan__TrajectoryGroup group;
    char *caps[2];
    Quillan__WorkRequest work;
    Quillan__RolloutRequest__MetadataEntry meta;
    Quillan__RolloutRequest__MetadataEntry *metap[1];
    Quillan__RolloutRequest rollout;
    Quillan__RolloutRequest *rolloutp[1];
    Quillan__Lease lease;
    uint64_t lease_ids[2];
    Quillan__Heartbeat heartbeat;
    Quillan__Ack ack;
    Quillan__Error error;
    Quillan__InfoRequest info_req;
    uint8_t digest[WIRE_DIGEST_BYTES];
    uint64_t shape[2];
    Quillan__TensorEntry tensor;
    Quillan__TensorEntry *tensorp[1];
    Quillan__SnapshotInfo info;
    Quillan__ChunkRequest chunk_req;
    Quillan__ChunkReply chunk_reply;
    Quillan__RewardSample sample;
    Quillan__RewardSample *samplep[1];
    Quillan__RewardRequest__MetadataEntry rmeta;
    Quillan__RewardRequest__MetadataEntry *rmetap[1];
    Quillan__RewardRequest reward_req;
    Quillan__ScoreEntry score;
    Quillan__ScoreEntry *scorep[1];
    Quillan__RewardResponse reward_resp;
    Quillan__LogRecord__FieldsEntry field;
    Quillan__LogRecord__FieldsEntry *fieldp[1];
    Quillan__LogRecord log;
} fixture_t;

static inline void fixture_init(fixture_t *f) {
    memset(f, 0, sizeof *f);
    f->prompt[0] = 256, f->prompt[1] = 72, f->prompt[2] = 105, f->prompt[3] = 33;
    f->stop[0] = 257;
    Quillan__SamplingParams sp = QUILLAN__SAMPLING_PARAMS__INIT;
    sp.temperature = 1.0f, sp.top_p = 0.9f, sp.top_k = 40, sp.max_new_tokens = 8;
    sp.n_stop_tokens = 1, sp.stop_tokens = f->stop, sp.seed = 1234;
    f->sampling = sp;

    Quillan__Trajectory__RewardPartsEntry part = QUILLAN__TRAJECTORY__REWARD_PARTS_ENTRY__INIT;
    part.key = "exact_match", part.value = 1.0;
    f->part = part, f->parts[0] = &f->part;
    for (int g = 0; g < FX_G; g++) {
        for (int t = 0; t < FX_T; t++) {
            f->comp[g][t] = (uint32_t)(100 + 10 * g + t);
            f->lp[g][t] = -0.25f * (float)(t + 1);
            f->kept[g][t] = (uint32_t)(t + 1);
        }
        for (size_t i = 0; i < Q_ARRAY_LEN(f->minis[g]); i++)
            f->minis[g][i] = (uint32_t)(i % 4);
        for (size_t i = 0; i < Q_ARRAY_LEN(f->experts[g]); i++)
            f->experts[g][i] = (uint32_t)((i + 1) % 4);
        for (size_t i = 0; i < Q_ARRAY_LEN(f->micros[g]); i++)
            f->micros[g][i] = (uint32_t)(i % 8);
        for (size_t i = 0; i < Q_ARRAY_LEN(f->plan[g]); i++)
            f->plan[g][i] = 0x0123456789ABCDEFull ^ i;
        Quillan__RoutingRecord rr = QUILLAN__ROUTING_RECORD__INIT;
        rr.num_layers = FX_L, rr.top_k_minis = FX_KM, rr.top_k_experts = FX_KE;
        rr.top_k_micros = FX_KU, rr.plan_words = FX_PW;
        rr.n_minis = Q_ARRAY_LEN(f->minis[g]), rr.minis = f->minis[g];
        rr.n_experts = Q_ARRAY_LEN(f->experts[g]), rr.experts = f->experts[g];
        rr.n_micros = Q_ARRAY_LEN(f->micros[g]), rr.micros = f->micros[g];
        rr.n_plan = Q_ARRAY_LEN(f->plan[g]), rr.plan = f->plan[g];
        f->routing[g] = rr;
        Quillan__Trajectory tr = QUILLAN__TRAJECTORY__INIT;
        tr.n_completion_tokens = FX_T, tr.completion_tokens = f->comp[g];
        tr.n_behaviour_logprobs = FX_T, tr.behaviour_logprobs = f->lp[g];
        tr.n_kept_counts = FX_T, tr.kept_counts = f->kept[g];
        tr.finish_reason = g == 0 ? QUILLAN__FINISH_REASON__FINISH_REASON_STOP
                                  : QUILLAN__FINISH_REASON__FINISH_REASON_LENGTH;
        tr.text = g == 0 ? "caf\xc3\xa9" : "";
        tr.routing = &f->routing[g];
        if (g == 0) { /* trajectory 0 has reward 0.0 (present), trajectory 1 has none */
            tr.maybe_reward_case = QUILLAN__TRAJECTORY__MAYBE_REWARD_REWARD;
            tr.reward = 0.0;
            tr.n_reward_parts = 1, tr.reward_parts = f->parts;
        }
        f->traj[g] = tr;
        f->trajp[g] = &f->traj[g];
    }
    Quillan__TrajectoryGroup grp = QUILLAN__TRAJECTORY_GROUP__INIT;
    grp.lease_id = 7, grp.prompt_id = 42, grp.epoch = 1;
    grp.n_prompt_tokens = 4, grp.prompt_tokens = f->prompt;
    grp.policy_version = 3, grp.n_trajectories = FX_G, grp.trajectories = f->trajp;
    grp.worker_id = "rollout-1", grp.gen_seconds = 1.5, grp.reward_seconds = 0.25;
    grp.sampling = &f->sampling;
    f->group = grp;

    f->caps[0] = "routing_replay", f->caps[1] = "top_p";
    Quillan__WorkRequest wr = QUILLAN__WORK_REQUEST__INIT;
    wr.worker_id = "rollout-1", wr.credits = 2, wr.snapshot_version = 3, wr.host = "hostA";
    wr.n_capabilities = 2, wr.capabilities = f->caps;
    f->work = wr;

    Quillan__RolloutRequest__MetadataEntry me = QUILLAN__ROLLOUT_REQUEST__METADATA_ENTRY__INIT;
    me.key = "answer", me.value = "\"42\"";
    f->meta = me, f->metap[0] = &f->meta;
    Quillan__RolloutRequest rq = QUILLAN__ROLLOUT_REQUEST__INIT;
    rq.lease_id = 7, rq.prompt_id = 42, rq.epoch = 1, rq.n_prompt_tokens = 4;
    rq.prompt_tokens = f->prompt, rq.prompt_text = "Hi!", rq.group_size = FX_G;
    rq.sampling = &f->sampling, rq.min_version = 2, rq.n_metadata = 1, rq.metadata = f->metap;
    f->rollout = rq, f->rolloutp[0] = &f->rollout;
    Quillan__Lease ls = QUILLAN__LEASE__INIT;
    ls.n_requests = 1, ls.requests = f->rolloutp, ls.timeout_ms = 30000, ls.policy_version = 3;
    f->lease = ls;

    f->lease_ids[0] = 7, f->lease_ids[1] = 9;
    Quillan__Heartbeat hb = QUILLAN__HEARTBEAT__INIT;
    hb.snapshot_version = 3, hb.old_policy_version = 2, hb.n_lease_ids = 2;
    hb.lease_ids = f->lease_ids;
    f->heartbeat = hb;
    Quillan__Ack ack = QUILLAN__ACK__INIT;
    ack.lease_id = 7, ack.status = QUILLAN__ACK_STATUS__ACK_STATUS_ACCEPTED, ack.in_reply_to = 11;
    f->ack = ack;
    Quillan__Error er = QUILLAN__ERROR__INIT;
    er.code = QUILLAN__ERROR_CODE__ERROR_CODE_NOT_FOUND, er.message = "no such lease";
    er.in_reply_to = 5;
    f->error = er;

    Quillan__InfoRequest ir = QUILLAN__INFO_REQUEST__INIT;
    f->info_req = ir;
    for (int i = 0; i < WIRE_DIGEST_BYTES; i++)
        f->digest[i] = (uint8_t)(i * 7);
    f->shape[0] = 4, f->shape[1] = 32;
    Quillan__TensorEntry te = QUILLAN__TENSOR_ENTRY__INIT;
    te.name = "layers.0.minis.0.experts.w1", te.qtype = "int4_g32", te.n_shape = 2;
    te.shape = f->shape, te.offset = 16, te.bytes = 72;
    f->tensor = te, f->tensorp[0] = &f->tensor;
    Quillan__SnapshotInfo si = QUILLAN__SNAPSHOT_INFO__INIT;
    si.version = 3, si.total_bytes = 200, si.chunk_size = FX_CHUNK, si.chunk_count = 4;
    si.digest.len = WIRE_DIGEST_BYTES, si.digest.data = f->digest;
    si.full_bytes = 200, si.full_digest.len = WIRE_DIGEST_BYTES, si.full_digest.data = f->digest;
    si.n_tensors = 1, si.tensors = f->tensorp;
    f->info = si;
    Quillan__ChunkRequest cq = QUILLAN__CHUNK_REQUEST__INIT;
    cq.version = 3, cq.index = 3;
    f->chunk_req = cq;
    Quillan__ChunkReply cr = QUILLAN__CHUNK_REPLY__INIT;
    cr.version = 3, cr.index = 3, cr.chunk_count = 4, cr.size = 200 - 3 * FX_CHUNK;
    f->chunk_reply = cr;

    Quillan__RewardSample rs = QUILLAN__REWARD_SAMPLE__INIT;
    rs.prompt = "Hi!", rs.completion = "42", rs.n_prompt_tokens = 4, rs.prompt_tokens = f->prompt;
    rs.n_completion_tokens = FX_T, rs.completion_tokens = f->comp[0];
    rs.finish_reason = QUILLAN__FINISH_REASON__FINISH_REASON_STOP;
    f->sample = rs, f->samplep[0] = &f->sample;
    Quillan__RewardRequest__MetadataEntry rme = QUILLAN__REWARD_REQUEST__METADATA_ENTRY__INIT;
    rme.key = "answer", rme.value = "\"42\"";
    f->rmeta = rme, f->rmetap[0] = &f->rmeta;
    Quillan__RewardRequest rr = QUILLAN__REWARD_REQUEST__INIT;
    rr.request_id = 99, rr.task = "math", rr.n_samples = 1, rr.samples = f->samplep;
    rr.n_metadata = 1, rr.metadata = f->rmetap;
    f->reward_req = rr;
    Quillan__ScoreEntry se = QUILLAN__SCORE_ENTRY__INIT;
    se.maybe_score_case = QUILLAN__SCORE_ENTRY__MAYBE_SCORE_SCORE, se.score = 0.0;
    se.detail = "wrong answer";
    f->score = se, f->scorep[0] = &f->score;
    Quillan__RewardResponse rp = QUILLAN__REWARD_RESPONSE__INIT;
    rp.request_id = 99, rp.n_scores = 1, rp.scores = f->scorep, rp.details = "ok";
    f->reward_resp = rp;

    Quillan__LogRecord__FieldsEntry fe = QUILLAN__LOG_RECORD__FIELDS_ENTRY__INIT;
    fe.key = "loss", fe.value = 0.5;
    f->field = fe, f->fieldp[0] = &f->field;
    Quillan__LogRecord lr = QUILLAN__LOG_RECORD__INIT;
    lr.time = 1700000000.25, lr.process = "learner", lr.host = "hostA";
    lr.level = QUILLAN__LOG_LEVEL__LOG_LEVEL_INFO, lr.event = "train.step";
    lr.n_fields = 1, lr.fields = f->fieldp, lr.text = "step done";
    f->log = lr;
}

typedef struct {
    Quillan__Envelope__BodyCase body;
    wire_protocol_t protocol;
} fx_body_t;

/* Every body type with the protocol it travels on (Error on each protocol that allows it). */
static const fx_body_t fx_bodies[] = {
    {QUILLAN__ENVELOPE__BODY_WORK_REQUEST, WIRE_PROTOCOL_DISPATCH},
    {QUILLAN__ENVELOPE__BODY_LEASE, WIRE_PROTOCOL_DISPATCH},
    {QUILLAN__ENVELOPE__BODY_HEARTBEAT, WIRE_PROTOCOL_DISPATCH},
    {QUILLAN__ENVELOPE__BODY_TRAJECTORY_GROUP, WIRE_PROTOCOL_DISPATCH},
    {QUILLAN__ENVELOPE__BODY_ACK, WIRE_PROTOCOL_DISPATCH},
    {QUILLAN__ENVELOPE__BODY_ERROR, WIRE_PROTOCOL_DISPATCH},
    {QUILLAN__ENVELOPE__BODY_INFO_REQUEST, WIRE_PROTOCOL_WEIGHTS},
    {QUILLAN__ENVELOPE__BODY_SNAPSHOT_INFO, WIRE_PROTOCOL_WEIGHTS},
    {QUILLAN__ENVELOPE__BODY_CHUNK_REQUEST, WIRE_PROTOCOL_WEIGHTS},
    {QUILLAN__ENVELOPE__BODY_CHUNK_REPLY, WIRE_PROTOCOL_WEIGHTS},
    {QUILLAN__ENVELOPE__BODY_ERROR, WIRE_PROTOCOL_WEIGHTS},
    {QUILLAN__ENVELOPE__BODY_REWARD_REQUEST, WIRE_PROTOCOL_REWARD},
    {QUILLAN__ENVELOPE__BODY_REWARD_RESPONSE, WIRE_PROTOCOL_REWARD},
    {QUILLAN__ENVELOPE__BODY_ERROR, WIRE_PROTOCOL_REWARD},
    {QUILLAN__ENVELOPE__BODY_LOG_RECORD, WIRE_PROTOCOL_LOG},
};

/* Points env (initialised here) at f's message of the given body type. */
static inline void fixture_envelope(fixture_t *f, Quillan__Envelope__BodyCase body,
                                    Quillan__Envelope *env) {
    Quillan__Envelope init = QUILLAN__ENVELOPE__INIT;
    *env = init;
    env->body_case = body;
    switch (body) {
    case QUILLAN__ENVELOPE__BODY_ERROR: env->error = &f->error; break;
    case QUILLAN__ENVELOPE__BODY_WORK_REQUEST: env->work_request = &f->work; break;
    case QUILLAN__ENVELOPE__BODY_LEASE: env->lease = &f->lease; break;
    case QUILLAN__ENVELOPE__BODY_HEARTBEAT: env->heartbeat = &f->heartbeat; break;
    case QUILLAN__ENVELOPE__BODY_TRAJECTORY_GROUP: env->trajectory_group = &f->group; break;
    case QUILLAN__ENVELOPE__BODY_ACK: env->ack = &f->ack; break;
    case QUILLAN__ENVELOPE__BODY_INFO_REQUEST: env->info_request = &f->info_req; break;
    case QUILLAN__ENVELOPE__BODY_SNAPSHOT_INFO: env->snapshot_info = &f->info; break;
    case QUILLAN__ENVELOPE__BODY_CHUNK_REQUEST: env->chunk_request = &f->chunk_req; break;
    case QUILLAN__ENVELOPE__BODY_CHUNK_REPLY: env->chunk_reply = &f->chunk_reply; break;
    case QUILLAN__ENVELOPE__BODY_REWARD_REQUEST: env->reward_request = &f->reward_req; break;
    case QUILLAN__ENVELOPE__BODY_REWARD_RESPONSE: env->reward_response = &f->reward_resp; break;
    case QUILLAN__ENVELOPE__BODY_LOG_RECORD: env->log_record = &f->log; break;
    default: Q_ASSERT(!"fixture_envelope: unknown body");
    }
}

/* The payload frame length a body needs to validate (a ChunkReply's size, else 0). */
static inline size_t fixture_payload_len(const fixture_t *f, Quillan__Envelope__BodyCase body) {
    return body == QUILLAN__ENVELOPE__BODY_CHUNK_REPLY ? f->chunk_reply.size : 0;
}

/* Runs the protocol's semantic validator. */
static inline int fixture_validate(wire_protocol_t p, const Quillan__Envelope *env,
                                   size_t payload_len, qerr_t *err) {
    switch (p) {
    case WIRE_PROTOCOL_DISPATCH:
        return dispatch_codec_net_validate((void *)&fx_dispatch_limits, env, payload_len, err);
    case WIRE_PROTOCOL_WEIGHTS:
        return weights_codec_net_validate((void *)&fx_weights_limits, env, payload_len, err);
    case WIRE_PROTOCOL_REWARD:
        return reward_codec_net_validate((void *)&fx_reward_limits, env, payload_len, err);
    case WIRE_PROTOCOL_LOG: return log_codec_net_validate(NULL, env, payload_len, err);
    default: Q_ASSERT(!"fixture_validate: unknown protocol"); return -1;
    }
}

/* Full decode (unpack + semantic validation) through the protocol's codec. */
static inline wire_msg_t *fixture_decode(wire_protocol_t p, const void *data, size_t len,
                                         size_t payload_len, size_t budget, qerr_t *err) {
    switch (p) {
    case WIRE_PROTOCOL_DISPATCH:
        return dispatch_codec_unpack(data, len, &fx_dispatch_limits, budget, err);
    case WIRE_PROTOCOL_WEIGHTS:
        return weights_codec_unpack(data, len, payload_len, &fx_weights_limits, budget, err);
    case WIRE_PROTOCOL_REWARD:
        return reward_codec_unpack(data, len, &fx_reward_limits, budget, err);
    case WIRE_PROTOCOL_LOG: return log_codec_unpack(data, len, budget, err);
    default: Q_ASSERT(!"fixture_decode: unknown protocol"); return NULL;
    }
}

#endif
