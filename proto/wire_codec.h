/* The Envelope codec shared by every Quillan protocol (ARCHITECTURE.md §3).
 *
 * Every ZeroMQ message is [Envelope][optional raw payload]. This module packs an Envelope,
 * and unpacks one through a byte-budgeted protobuf-c allocator, checking in this order:
 *   1. the protocol version (read from the raw bytes first, so a peer of another version gets
 *      "dispatch protocol version 2, this build speaks 1" even when its messages no longer
 *      parse as ours),
 *   2. protobuf well-formedness within the byte budget,
 *   3. that the body belongs to the protocol (Error belongs to all but the log protocol),
 *   4. that every string field is valid UTF-8 (protobuf-c does not check it).
 * Semantic invariants (lengths, token ranges, chunk indices) are the per-protocol codecs' job:
 * dispatch_codec.h, weights_codec.h, reward_codec.h, log_codec.h.
 *
 * Callers fill generated structs (QUILLAN__X__INIT) to send and read the generated structs of
 * a decoded message; they never call protobuf-c pack/unpack themselves. */
#ifndef QUILLAN_WIRE_CODEC_H
#define QUILLAN_WIRE_CODEC_H

#include "envelope.pb-c.h"
#include "error.h"

#include <stddef.h>
#include <stdint.h>

/* Protocol versions (zguide habit: the constant carries the protocol's name). A peer whose
 * Envelope.protocol_version differs is refused with QERR_VERSION. Bump on any change that an
 * older peer would misread. */
#define QUILLAN_DISPATCH_PROTOCOL_VERSION 1u
#define QUILLAN_WEIGHTS_PROTOCOL_VERSION 1u
#define QUILLAN_REWARD_PROTOCOL_VERSION 1u
#define QUILLAN_LOG_PROTOCOL_VERSION 1u

/* Default byte budget of one decode: the peak of live protobuf-c allocations (plus 16 bytes of
 * bookkeeping per allocation). 16 x the 4 MiB control frame: varint-packed token and routing
 * arrays grow up to 4x when unpacked into uint32 arrays, sub-messages cost their struct. It is
 * the default of net_options_t.decode_budget_bytes, the floor under wire_decode_budget's
 * figure, so small frames keep room for any legitimate message. */
#define WIRE_DECODE_BUDGET_DEFAULT ((size_t)64 << 20)

/* Decoder bytes allowed per wire byte of a frame at its size limit. Large legitimate messages
 * need at most 3.41 (a routing-replay group whose token and router ids take one varint byte:
 * docs/PROTOCOL-internals.md "Decode budget"), so 8 leaves a margin over 2x; hostile ones made
 * of empty sub-messages need ~108 and still fail. */
#define WIRE_DECODE_RATIO 8u

/* Decoder bytes that Envelope frames of at most max_frame_bytes may need: WIRE_DECODE_RATIO x
 * max_frame_bytes, saturating at SIZE_MAX. Any legitimate Envelope that fits the frame fits
 * it; net_options_decode_budget puts its floor under it. */
size_t wire_decode_budget(size_t max_frame_bytes);

/* BLAKE2b-256 digest length of snapshots. */
#define WIRE_DIGEST_BYTES 32

typedef enum {
    WIRE_PROTOCOL_DISPATCH = 0,
    WIRE_PROTOCOL_WEIGHTS,
    WIRE_PROTOCOL_REWARD,
    WIRE_PROTOCOL_LOG,
    WIRE_PROTOCOL_COUNT
} wire_protocol_t;

/* "dispatch" | "weights" | "reward" | "log"; "unknown" for anything else. */
const char *wire_protocol_name(wire_protocol_t protocol);
/* The QUILLAN_*_PROTOCOL_VERSION of protocol; Q_ASSERTs a valid protocol. */
uint32_t wire_protocol_version(wire_protocol_t protocol);
/* 1 when an Envelope body of this case may travel on the protocol's sockets, else 0. */
int wire_body_allowed(wire_protocol_t protocol, Quillan__Envelope__BodyCase body);
/* The body's field name in envelope.proto ("lease", "chunk_reply"); "none" when unset. */
const char *wire_body_name(Quillan__Envelope__BodyCase body);

/* What the sender writes into every Envelope it packs. */
typedef struct {
    const char *sender_id;   /* stable process name, UTF-8; not copied */
    uint64_t incarnation_id; /* random per process start */
    uint64_t message_id;     /* per-sender counter */
} wire_header_t;

/* A packed Envelope; data is heap memory owned by the holder, released by wire_buf_free. */
typedef struct {
    uint8_t *data;
    size_t len;
} wire_buf_t;

/* Frees b->data and zeroes b; safe on a zeroed or already freed buffer. */
void wire_buf_free(wire_buf_t *b);

/* Packs env for protocol: fills env's protocol_version, sender_id, incarnation_id and
 * message_id from the protocol and hdr (env keeps pointing at hdr->sender_id), checks that the
 * body belongs to the protocol and that strings are UTF-8, and writes the bytes into *out
 * (which the caller frees with wire_buf_free). Returns 0, or -1 with err (QERR_INVALID,
 * QERR_NOMEM). Does not run the semantic validators: receivers do. */
int wire_codec_pack(wire_protocol_t protocol, const wire_header_t *hdr, Quillan__Envelope *env,
                    wire_buf_t *out, qerr_t *err);

/* A decoded Envelope that owns its memory. */
typedef struct wire_msg wire_msg_t;

/* Unpacks len bytes as an Envelope of protocol with at most budget bytes of decoder memory,
 * running checks 1-4 above. Returns a new message (wire_msg_destroy), or NULL with err:
 * QERR_VERSION (other protocol version), QERR_PARSE (not a valid Envelope), QERR_NOMEM (the
 * decode needed more than budget bytes, or malloc failed within it), QERR_INVALID (body of another
 * protocol, no body, invalid UTF-8, naming the field). */
wire_msg_t *wire_codec_unpack(wire_protocol_t protocol, const void *data, size_t len, size_t budget,
                              qerr_t *err);

/* The decoded Envelope; valid until wire_msg_destroy. Callers read, never free, its fields. */
const Quillan__Envelope *wire_msg_envelope(const wire_msg_t *m);

/* The decode's peak allocator use in bytes (bookkeeping included), for sizing budgets. */
size_t wire_msg_peak_bytes(const wire_msg_t *m);

/* Frees the message and sets *m to NULL; safe when *m is NULL. */
void wire_msg_destroy(wire_msg_t **m);

/* Reads Envelope.protocol_version (field 1) from raw bytes without decoding the rest; 0 when
 * the field is absent. Returns 0, or -1 with QERR_PARSE when the top-level fields do not scan
 * (truncated varint or length, unknown wire type). */
int wire_codec_peek_version(const void *data, size_t len, uint32_t *version, qerr_t *err);

/* Checks an Error body (any protocol): a known code. Returns 0, or -1 with QERR_INVALID. */
int wire_error_validate(const Quillan__Error *e, qerr_t *err);

/* 1 when the n bytes at s are valid UTF-8 (no overlongs, surrogates or code points past
 * U+10FFFF), else 0. */
int wire_utf8_valid(const char *s, size_t n);

#endif
