#include "weights_codec.h"

static int info_check(const Quillan__SnapshotInfo *s, const weights_codec_limits_t *lim,
                      qerr_t *err) {
    if (s->version == 0)
        return qerr_set(err, QERR_INVALID, "snapshot_info.version is 0 (unset)");
    if (s->base_version >= s->version)
        return qerr_set(err, QERR_INVALID,
                        "snapshot_info.base_version %llu is not older than version %llu",
                        (unsigned long long)s->base_version, (unsigned long long)s->version);
    if (s->chunk_size == 0 || s->chunk_size > lim->max_chunk_bytes)
        return qerr_set(err, QERR_RANGE, "snapshot_info.chunk_size %u is outside [1, %u]",
                        s->chunk_size, lim->max_chunk_bytes);
    if (s->total_bytes > lim->max_total_bytes || s->full_bytes > lim->max_total_bytes)
        return qerr_set(err, QERR_RANGE,
                        "snapshot_info: total_bytes %llu or full_bytes %llu exceeds %llu",
                        (unsigned long long)s->total_bytes, (unsigned long long)s->full_bytes,
                        (unsigned long long)lim->max_total_bytes);
    uint64_t chunks = s->total_bytes / s->chunk_size + (s->total_bytes % s->chunk_size != 0);
    if (s->chunk_count != chunks)
        return qerr_set(err, QERR_INVALID,
                        "snapshot_info.chunk_count %u, but %llu bytes in chunks of %u make %llu",
                        s->chunk_count, (unsigned long long)s->total_bytes, s->chunk_size,
                        (unsigned long long)chunks);
    if (s->base_version == 0 && s->full_bytes != s->total_bytes)
        return qerr_set(err, QERR_INVALID,
                        "snapshot_info: a full snapshot has full_bytes %llu != total_bytes %llu",
                        (unsigned long long)s->full_bytes, (unsigned long long)s->total_bytes);
    if (s->digest.len != WIRE_DIGEST_BYTES || s->full_digest.len != WIRE_DIGEST_BYTES)
        return qerr_set(err, QERR_INVALID,
                        "snapshot_info: digest (%zu bytes) and full_digest (%zu bytes) must be "
                        "%d-byte BLAKE2b-256",
                        s->digest.len, s->full_digest.len, WIRE_DIGEST_BYTES);
    for (size_t i = 0; i < s->n_tensors; i++) {
        const Quillan__TensorEntry *t = s->tensors[i];
        if (t->name[0] == '\0' || t->qtype[0] == '\0')
            return qerr_set(err, QERR_INVALID, "snapshot_info.tensors[%zu]: empty name or qtype",
                            i);
        if (t->offset > s->full_bytes || t->bytes > s->full_bytes - t->offset)
            return qerr_set(err, QERR_RANGE,
                            "snapshot_info.tensors[%zu] '%s': bytes [%llu, +%llu) outside the "
                            "%llu-byte snapshot",
                            i, t->name, (unsigned long long)t->offset, (unsigned long long)t->bytes,
                            (unsigned long long)s->full_bytes);
    }
    return 0;
}

static int reply_check(const Quillan__ChunkReply *r, size_t payload_len,
                       const weights_codec_limits_t *lim, qerr_t *err) {
    if (r->version == 0)
        return qerr_set(err, QERR_INVALID, "chunk_reply.version is 0 (unset)");
    if (r->base_version >= r->version)
        return qerr_set(err, QERR_INVALID,
                        "chunk_reply.base_version %llu is not older than version %llu",
                        (unsigned long long)r->base_version, (unsigned long long)r->version);
    if (r->index >= r->chunk_count)
        return qerr_set(err, QERR_RANGE, "chunk_reply.index %u is not below chunk_count %u",
                        r->index, r->chunk_count);
    if (r->size == 0 || r->size > lim->max_chunk_bytes)
        return qerr_set(err, QERR_RANGE, "chunk_reply.size %u is outside [1, %u]", r->size,
                        lim->max_chunk_bytes);
    if (r->size != payload_len)
        return qerr_set(err, QERR_INVALID,
                        "chunk_reply.size %u, but the payload frame has %zu bytes", r->size,
                        payload_len);
    return 0;
}

int weights_codec_validate(const Quillan__Envelope *env, size_t payload_len,
                           const weights_codec_limits_t *lim, qerr_t *err) {
    Q_ASSERT(env && lim);
    if (env->body_case == QUILLAN__ENVELOPE__BODY_CHUNK_REPLY)
        return reply_check(env->chunk_reply, payload_len, lim, err);
    if (payload_len != 0)
        return qerr_set(err, QERR_INVALID, "weights message '%s' carries a %zu-byte payload frame",
                        wire_body_name(env->body_case), payload_len);
    switch (env->body_case) {
    case QUILLAN__ENVELOPE__BODY_INFO_REQUEST: return 0;
    case QUILLAN__ENVELOPE__BODY_SNAPSHOT_INFO: return info_check(env->snapshot_info, lim, err);
    case QUILLAN__ENVELOPE__BODY_CHUNK_REQUEST:
        if (env->chunk_request->version == 0)
            return qerr_set(err, QERR_INVALID, "chunk_request.version is 0 (unset)");
        if (env->chunk_request->base_version >= env->chunk_request->version)
            return qerr_set(err, QERR_INVALID,
                            "chunk_request.base_version %llu is not older than version %llu",
                            (unsigned long long)env->chunk_request->base_version,
                            (unsigned long long)env->chunk_request->version);
        return 0;
    case QUILLAN__ENVELOPE__BODY_ERROR: return wire_error_validate(env->error, err);
    default:
        return qerr_set(err, QERR_INVALID, "envelope body '%s' is not part of the weights protocol",
                        wire_body_name(env->body_case));
    }
}

int weights_codec_chunk_check(const Quillan__ChunkReply *reply, const Quillan__SnapshotInfo *info,
                              qerr_t *err) {
    if (reply->version != info->version)
        return qerr_set(err, QERR_INVALID, "chunk_reply.version %llu, expected %llu",
                        (unsigned long long)reply->version, (unsigned long long)info->version);
    if (reply->base_version != info->base_version)
        return qerr_set(err, QERR_INVALID, "chunk_reply.base_version %llu, expected %llu",
                        (unsigned long long)reply->base_version,
                        (unsigned long long)info->base_version);
    if (reply->chunk_count != info->chunk_count || reply->index >= info->chunk_count)
        return qerr_set(
            err, QERR_RANGE, "chunk_reply: index %u of %u chunks, snapshot %llu has %u chunks",
            reply->index, reply->chunk_count, (unsigned long long)info->version, info->chunk_count);
    uint64_t offset = (uint64_t)reply->index * info->chunk_size;
    if (offset >= info->total_bytes)
        return qerr_set(err, QERR_RANGE, "chunk_reply: chunk %u starts past snapshot %llu's end",
                        reply->index, (unsigned long long)info->version);
    uint64_t left = info->total_bytes - offset;
    uint64_t expect = left < info->chunk_size ? left : info->chunk_size;
    if (reply->size != expect)
        return qerr_set(err, QERR_INVALID,
                        "chunk_reply.size %u, chunk %u of snapshot %llu has %llu", reply->size,
                        reply->index, (unsigned long long)info->version,
                        (unsigned long long)expect);
    return 0;
}

int weights_codec_pack(const wire_header_t *hdr, Quillan__Envelope *env, wire_buf_t *out,
                       qerr_t *err) {
    return wire_codec_pack(WIRE_PROTOCOL_WEIGHTS, hdr, env, out, err);
}

wire_msg_t *weights_codec_unpack(const void *data, size_t len, size_t payload_len,
                                 const weights_codec_limits_t *lim, size_t budget, qerr_t *err) {
    wire_msg_t *m = wire_codec_unpack(WIRE_PROTOCOL_WEIGHTS, data, len, budget, err);
    if (m && weights_codec_validate(wire_msg_envelope(m), payload_len, lim, err) != 0)
        wire_msg_destroy(&m);
    return m;
}

int weights_codec_net_validate(void *ctx, const Quillan__Envelope *env, size_t payload_len,
                               qerr_t *err) {
    return weights_codec_validate(env, payload_len, ctx, err);
}
