/* Codec of the weights protocol (proto/weights.proto): workers pull snapshots in chunks.
 * Bodies: InfoRequest, SnapshotInfo, ChunkRequest, ChunkReply (+ raw chunk frame), Error. */
#ifndef QUILLAN_WEIGHTS_CODEC_H
#define QUILLAN_WEIGHTS_CODEC_H

#include "wire_codec.h"

/* Bounds a received weights message must respect. */
typedef struct {
    uint32_t max_chunk_bytes; /* chunk_size and every chunk frame are <= this; > 0 */
    uint64_t max_total_bytes; /* total_bytes and full_bytes of a snapshot are <= this */
} weights_codec_limits_t;

/* Packs a weights Envelope (see wire_codec_pack). A ChunkReply's bytes travel in the second
 * frame, which the caller sends beside the packed Envelope (net_send). */
int weights_codec_pack(const wire_header_t *hdr, Quillan__Envelope *env, wire_buf_t *out,
                       qerr_t *err);

/* wire_codec_unpack for the weights protocol, then weights_codec_validate with payload_len
 * (the size of the raw frame that came with it, 0 when none). NULL with err on failure. */
wire_msg_t *weights_codec_unpack(const void *data, size_t len, size_t payload_len,
                                 const weights_codec_limits_t *lim, size_t budget, qerr_t *err);

/* Checks a weights Envelope on its own: SnapshotInfo sizes (chunk_count = ceil(total_bytes /
 * chunk_size), 32-byte digests, base_version < version, every tensor inside full_bytes),
 * ChunkRequest and ChunkReply (base_version < version), ChunkReply (index < chunk_count,
 * size == payload_len, size <= max_chunk_bytes); only a
 * ChunkReply carries a payload. Returns 0 or -1 with err naming the field. */
int weights_codec_validate(const Quillan__Envelope *env, size_t payload_len,
                           const weights_codec_limits_t *lim, qerr_t *err);

/* Checks a ChunkReply against the SnapshotInfo it belongs to: same version and base_version
 * (a full transfer and a delta of one version are different byte streams), same chunk_count,
 * and size == chunk_size, or the remainder for the last chunk. Returns 0 or -1 with err. */
int weights_codec_chunk_check(const Quillan__ChunkReply *reply, const Quillan__SnapshotInfo *info,
                              qerr_t *err);

/* net_validate_fn adapter (common/net.h): ctx is a const weights_codec_limits_t *. */
int weights_codec_net_validate(void *ctx, const Quillan__Envelope *env, size_t payload_len,
                               qerr_t *err);

#endif
