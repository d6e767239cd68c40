#include "wire_codec.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char *const protocol_names[WIRE_PROTOCOL_COUNT] = {
    [WIRE_PROTOCOL_DISPATCH] = "dispatch",
    [WIRE_PROTOCOL_WEIGHTS] = "weights",
    [WIRE_PROTOCOL_REWARD] = "reward",
    [WIRE_PROTOCOL_LOG] = "log",
};
_Static_assert(Q_ARRAY_LEN(protocol_names) == WIRE_PROTOCOL_COUNT, "one name per protocol");

static const uint32_t protocol_versions[WIRE_PROTOCOL_COUNT] = {
    [WIRE_PROTOCOL_DISPATCH] = QUILLAN_DISPATCH_PROTOCOL_VERSION,
    [WIRE_PROTOCOL_WEIGHTS] = QUILLAN_WEIGHTS_PROTOCOL_VERSION,
    [WIRE_PROTOCOL_REWARD] = QUILLAN_REWARD_PROTOCOL_VERSION,
    [WIRE_PROTOCOL_LOG] = QUILLAN_LOG_PROTOCOL_VERSION,
};

const char *wire_protocol_name(wire_protocol_t protocol) {
    return (protocol >= 0 && protocol < WIRE_PROTOCOL_COUNT) ? protocol_names[protocol] : "unknown";
}

uint32_t wire_protocol_version(wire_protocol_t protocol) {
    Q_ASSERT(protocol >= 0 && protocol < WIRE_PROTOCOL_COUNT);
    return protocol_versions[protocol];
}

int wire_body_allowed(wire_protocol_t protocol, Quillan__Envelope__BodyCase body) {
    switch (body) {
    case QUILLAN__ENVELOPE__BODY_ERROR: return protocol != WIRE_PROTOCOL_LOG;
    case QUILLAN__ENVELOPE__BODY_WORK_REQUEST:
    case QUILLAN__ENVELOPE__BODY_LEASE:
    case QUILLAN__ENVELOPE__BODY_HEARTBEAT:
    case QUILLAN__ENVELOPE__BODY_TRAJECTORY_GROUP:
    case QUILLAN__ENVELOPE__BODY_ACK: return protocol == WIRE_PROTOCOL_DISPATCH;
    case QUILLAN__ENVELOPE__BODY_INFO_REQUEST:
    case QUILLAN__ENVELOPE__BODY_SNAPSHOT_INFO:
    case QUILLAN__ENVELOPE__BODY_CHUNK_REQUEST:
    case QUILLAN__ENVELOPE__BODY_CHUNK_REPLY: return protocol == WIRE_PROTOCOL_WEIGHTS;
    case QUILLAN__ENVELOPE__BODY_REWARD_REQUEST:
    case QUILLAN__ENVELOPE__BODY_REWARD_RESPONSE: return protocol == WIRE_PROTOCOL_REWARD;
    case QUILLAN__ENVELOPE__BODY_LOG_RECORD: return protocol == WIRE_PROTOCOL_LOG;
    default: return 0;
    }
}

const char *wire_body_name(Quillan__Envelope__BodyCase body) {
    const ProtobufCFieldDescriptor *f =
        protobuf_c_message_descriptor_get_field(&quillan__envelope__descriptor, (unsigned)body);
    if (body == QUILLAN__ENVELOPE__BODY__NOT_SET || f == NULL ||
        !(f->flags & PROTOBUF_C_FIELD_FLAG_ONEOF))
        return "none";
    return f->name;
}

void wire_buf_free(wire_buf_t *b) {
    if (b) {
        free(b->data);
        b->data = NULL;
        b->len = 0;
    }
}

int wire_error_validate(const Quillan__Error *e, qerr_t *err) {
    if (e->code <= QUILLAN__ERROR_CODE__ERROR_CODE_UNSPECIFIED ||
        e->code > QUILLAN__ERROR_CODE__ERROR_CODE_INTERNAL)
        return qerr_set(err, QERR_INVALID, "error.code %d is not a known error code", (int)e->code);
    return 0;
}

/* ---- UTF-8 ---- */

int wire_utf8_valid(const char *str, size_t n) {
    const unsigned char *s = (const unsigned char *)str;
    size_t i = 0;
    while (i < n) {
        unsigned c = s[i];
        if (c < 0x80) {
            i++;
            continue;
        }
        size_t len;
        unsigned cp, min;
        if (c >= 0xC2 && c <= 0xDF) {
            len = 2, cp = c & 0x1F, min = 0x80;
        } else if (c >= 0xE0 && c <= 0xEF) {
            len = 3, cp = c & 0x0F, min = 0x800;
        } else if (c >= 0xF0 && c <= 0xF4) {
            len = 4, cp = c & 0x07, min = 0x10000;
        } else {
            return 0;
        }
        if (n - i < len)
            return 0;
        for (size_t k = 1; k < len; k++) {
            if ((s[i + k] & 0xC0) != 0x80)
                return 0;
            cp = (cp << 6) | (s[i + k] & 0x3Fu);
        }
        if (cp < min || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF))
            return 0;
        i += len;
    }
    return 1;
}

/* Walks every string field of a decoded message, depth first. Message types are not
 * recursive (ARCHITECTURE.md §3), so the depth is that of the type tree. The path of the
 * first bad field is written into path for the error message. */
static int strings_valid(const ProtobufCMessage *m, char *path, size_t cap, size_t plen) {
    const ProtobufCMessageDescriptor *d = m->descriptor;
    const char *base = (const char *)m;
    for (unsigned i = 0; i < d->n_fields; i++) {
        const ProtobufCFieldDescriptor *f = &d->fields[i];
        if (f->type != PROTOBUF_C_TYPE_STRING && f->type != PROTOBUF_C_TYPE_MESSAGE)
            continue;
        if ((f->flags & PROTOBUF_C_FIELD_FLAG_ONEOF) &&
            *(const uint32_t *)(const void *)(base + f->quantifier_offset) != f->id)
            continue;
        size_t n = 1;
        const void *const *items = (const void *const *)(const void *)(base + f->offset);
        if (f->label == PROTOBUF_C_LABEL_REPEATED) {
            n = *(const size_t *)(const void *)(base + f->quantifier_offset);
            items = *(const void *const *const *)(const void *)(base + f->offset);
        }
        for (size_t k = 0; k < n; k++) {
            const void *item = items[k];
            if (item == NULL)
                continue;
            int w =
                f->label == PROTOBUF_C_LABEL_REPEATED
                    ? snprintf(path + plen, cap - plen, "%s%s[%zu]", plen ? "." : "", f->name, k)
                    : snprintf(path + plen, cap - plen, "%s%s", plen ? "." : "", f->name);
            size_t sub = plen + ((w > 0 && (size_t)w < cap - plen) ? (size_t)w : 0);
            if (f->type == PROTOBUF_C_TYPE_STRING) {
                if (!wire_utf8_valid(item, strlen(item)))
                    return 0;
            } else if (!strings_valid(item, path, cap, sub)) {
                return 0;
            }
            path[plen] = '\0';
        }
    }
    return 1;
}

/* ---- the budgeted allocator ---- */

/* Each allocation carries a 16-byte header holding its size, so free can give the bytes back
 * (protobuf-c's free passes only the pointer); 16 keeps malloc's alignment. */
#define BUDGET_HDR 16u

typedef struct {
    ProtobufCAllocator pc;
    size_t budget, used, peak;
    int exceeded;      /* an allocation would have passed the budget */
    int out_of_memory; /* malloc failed within the budget */
} budget_t;

static size_t budget_cost(size_t n) {
    return BUDGET_HDR + ((n + 15u) & ~(size_t)15u);
}

static void *budget_alloc(void *ctx, size_t n) {
    budget_t *b = ctx;
    if (n > b->budget || budget_cost(n) > b->budget - b->used) {
        b->exceeded = 1;
        return NULL;
    }
    unsigned char *p = malloc(BUDGET_HDR + n);
    if (p == NULL) {
        b->out_of_memory = 1;
        return NULL;
    }
    memcpy(p, &n, sizeof n);
    b->used += budget_cost(n);
    if (b->used > b->peak)
        b->peak = b->used;
    return p + BUDGET_HDR;
}

static void budget_free(void *ctx, void *ptr) {
    if (ptr == NULL)
        return;
    budget_t *b = ctx;
    unsigned char *p = (unsigned char *)ptr - BUDGET_HDR;
    size_t n;
    memcpy(&n, p, sizeof n);
    b->used -= budget_cost(n);
    free(p);
}

struct wire_msg {
    budget_t budget; /* first: protobuf-c keeps a pointer to budget.pc inside env */
    Quillan__Envelope *env;
};

size_t wire_decode_budget(size_t max_frame_bytes) {
    if (max_frame_bytes > SIZE_MAX / WIRE_DECODE_RATIO)
        return SIZE_MAX;
    return WIRE_DECODE_RATIO * max_frame_bytes;
}

/* ---- version peek ---- */

static int read_varint(const uint8_t *p, size_t len, size_t *pos, uint64_t *out) {
    uint64_t v = 0;
    for (unsigned shift = 0; shift < 70; shift += 7) {
        if (*pos >= len)
            return -1;
        uint8_t b = p[(*pos)++];
        v |= (uint64_t)(b & 0x7F) << shift;
        if (!(b & 0x80)) {
            *out = v;
            return 0;
        }
    }
    return -1;
}

int wire_codec_peek_version(const void *data, size_t len, uint32_t *version, qerr_t *err) {
    const uint8_t *p = data;
    size_t pos = 0;
    uint32_t found = 0;
    while (pos < len) {
        uint64_t tag, v;
        if (read_varint(p, len, &pos, &tag) != 0)
            return qerr_set(err, QERR_PARSE, "envelope: truncated field tag at byte %zu", pos);
        unsigned wt = (unsigned)(tag & 7);
        uint64_t field = tag >> 3;
        switch (wt) {
        case 0:
            if (read_varint(p, len, &pos, &v) != 0)
                return qerr_set(err, QERR_PARSE, "envelope: truncated varint of field %llu",
                                (unsigned long long)field);
            if (field == 1) /* protobuf semantics: the last occurrence wins */
                found = (uint32_t)v;
            break;
        case 1:
        case 5: {
            size_t w = wt == 1 ? 8 : 4;
            if (len - pos < w)
                return qerr_set(err, QERR_PARSE, "envelope: truncated field %llu",
                                (unsigned long long)field);
            pos += w;
            break;
        }
        case 2:
            if (read_varint(p, len, &pos, &v) != 0 || v > len - pos)
                return qerr_set(err, QERR_PARSE, "envelope: truncated field %llu",
                                (unsigned long long)field);
            pos += (size_t)v;
            break;
        default:
            return qerr_set(err, QERR_PARSE, "envelope: wire type %u of field %llu unsupported", wt,
                            (unsigned long long)field);
        }
    }
    *version = found;
    return 0;
}

/* ---- pack / unpack ---- */

int wire_codec_pack(wire_protocol_t protocol, const wire_header_t *hdr, Quillan__Envelope *env,
                    wire_buf_t *out, qerr_t *err) {
    Q_ASSERT(hdr && env && out && hdr->sender_id);
    out->data = NULL;
    out->len = 0;
    if (!wire_body_allowed(protocol, env->body_case))
        return qerr_set(err, QERR_INVALID, "envelope body '%s' is not part of the %s protocol",
                        wire_body_name(env->body_case), wire_protocol_name(protocol));
    env->protocol_version = wire_protocol_version(protocol);
    env->sender_id = (char *)hdr->sender_id; /* protobuf-c's field is not const; never written */
    env->incarnation_id = hdr->incarnation_id;
    env->message_id = hdr->message_id;
    char path[256] = "";
    if (!strings_valid(&env->base, path, sizeof path, 0))
        return qerr_set(err, QERR_INVALID, "envelope.%s is not valid UTF-8", path);
    size_t n = protobuf_c_message_get_packed_size(&env->base);
    out->data = malloc(n ? n : 1);
    if (out->data == NULL)
        return qerr_set(err, QERR_NOMEM, "envelope: cannot allocate %zu bytes to pack", n);
    out->len = protobuf_c_message_pack(&env->base, out->data);
    Q_ASSERT(out->len == n);
    return 0;
}

wire_msg_t *wire_codec_unpack(wire_protocol_t protocol, const void *data, size_t len, size_t budget,
                              qerr_t *err) {
    Q_ASSERT(protocol >= 0 && protocol < WIRE_PROTOCOL_COUNT);
    uint32_t version;
    if (wire_codec_peek_version(data, len, &version, err) != 0)
        return NULL;
    if (version != wire_protocol_version(protocol)) {
        qerr_set(err, QERR_VERSION, "%s protocol version %u, this build speaks %u%s",
                 wire_protocol_name(protocol), version, wire_protocol_version(protocol),
                 version == 0 ? " (protocol_version unset: not a Quillan envelope?)" : "");
        return NULL;
    }
    wire_msg_t *m = calloc(1, sizeof *m);
    if (m == NULL) {
        qerr_set(err, QERR_NOMEM, "envelope: out of memory");
        return NULL;
    }
    m->budget.pc.alloc = budget_alloc;
    m->budget.pc.free = budget_free;
    m->budget.pc.allocator_data = &m->budget;
    m->budget.budget = budget;
    m->env = quillan__envelope__unpack(&m->budget.pc, len, data);
    if (m->env == NULL) {
        if (m->budget.exceeded)
            qerr_set(err, QERR_NOMEM,
                     "%s envelope of %zu bytes needs more than its decode budget of %zu bytes",
                     wire_protocol_name(protocol), len, budget);
        else if (m->budget.out_of_memory)
            qerr_set(err, QERR_NOMEM,
                     "%s envelope of %zu bytes: out of memory after %zu bytes of decoder memory",
                     wire_protocol_name(protocol), len, m->budget.peak);
        else
            qerr_set(err, QERR_PARSE, "%s envelope of %zu bytes is not valid protobuf",
                     wire_protocol_name(protocol), len);
        free(m);
        return NULL;
    }
    if (!wire_body_allowed(protocol, m->env->body_case)) {
        if (m->env->body_case == QUILLAN__ENVELOPE__BODY__NOT_SET)
            qerr_set(err, QERR_INVALID, "%s envelope has no body (or one unknown to this build)",
                     wire_protocol_name(protocol));
        else
            qerr_set(err, QERR_INVALID, "envelope body '%s' is not part of the %s protocol",
                     wire_body_name(m->env->body_case), wire_protocol_name(protocol));
        wire_msg_destroy(&m);
        return NULL;
    }
    char path[256] = "";
    if (!strings_valid(&m->env->base, path, sizeof path, 0)) {
        qerr_set(err, QERR_INVALID, "envelope.%s is not valid UTF-8", path);
        wire_msg_destroy(&m);
        return NULL;
    }
    return m;
}

const Quillan__Envelope *wire_msg_envelope(const wire_msg_t *m) {
    return m->env;
}

size_t wire_msg_peak_bytes(const wire_msg_t *m) {
    return m->budget.peak;
}

void wire_msg_destroy(wire_msg_t **m) {
    if (m == NULL || *m == NULL)
        return;
    if ((*m)->env)
        quillan__envelope__free_unpacked((*m)->env, &(*m)->budget.pc);
    free(*m);
    *m = NULL;
}
