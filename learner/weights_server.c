#include "weights_server.h"

#include "log.h"
#include "weights_codec.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <zmq.h>

/* Cap on requests served per poll call, so a flood cannot starve the caller's other work. */
#define WEIGHTS_SERVER_BATCH 1024

struct weights_server {
    snapshot_store_t *store;
    net_socket_t *sock;
    weights_codec_limits_t limits; /* must outlive the socket: its validator reads it */
    uint32_t chunk_bytes;
    weights_server_stats_t stats;
};

void weights_server_options_init(weights_server_options_t *o) {
    memset(o, 0, sizeof(*o));
    o->endpoint = "tcp://127.0.0.1:5556";
    o->sender_id = "learner";
    o->incarnation_id = net_incarnation_new();
    net_options_init(&o->net);
    o->security.mode = NET_SECURITY_NONE;
}

weights_server_t *weights_server_new(void *zctx, snapshot_store_t *store,
                                     const weights_server_options_t *o, qerr_t *err) {
    Q_ASSERT(zctx && store && o && o->endpoint && o->sender_id);
    if (net_options_validate(&o->net, err) != 0) {
        qerr_wrap(err, "weights server");
        return NULL;
    }
    weights_server_t *s = calloc(1, sizeof(*s));
    if (s == NULL) {
        qerr_set(err, QERR_NOMEM, "weights server: out of memory");
        return NULL;
    }
    s->store = store;
    s->chunk_bytes = (uint32_t)o->net.chunk_bytes;
    s->limits.max_chunk_bytes = s->chunk_bytes;
    s->limits.max_total_bytes = UINT64_MAX;
    net_socket_spec_t spec = {.type = ZMQ_ROUTER,
                              .protocol = WIRE_PROTOCOL_WEIGHTS,
                              .name = "weights",
                              .sender_id = o->sender_id,
                              .incarnation_id = o->incarnation_id,
                              .validate = weights_codec_net_validate,
                              .validate_ctx = &s->limits};
    s->sock = net_socket_new(zctx, &spec, &o->net, &o->security, err);
    if (s->sock == NULL || net_socket_bind(s->sock, o->endpoint, err) != 0) {
        qerr_wrap(err, "weights server");
        weights_server_destroy(&s);
        return NULL;
    }
    log_info("weights.listen", "weights server on %s, %u-byte chunks", net_socket_endpoint(s->sock),
             s->chunk_bytes);
    return s;
}

void weights_server_destroy(weights_server_t **sp) {
    if (sp == NULL || *sp == NULL)
        return;
    net_socket_destroy(&(*sp)->sock);
    free(*sp);
    *sp = NULL;
}

const char *weights_server_endpoint(const weights_server_t *s) {
    return net_socket_endpoint(s->sock);
}

void *weights_server_handle(weights_server_t *s) {
    return net_socket_handle(s->sock);
}

void weights_server_stats(weights_server_t *s, weights_server_stats_t *out) {
    *out = s->stats;
    net_socket_stats(s->sock, &out->net);
}

static void reply(weights_server_t *s, const net_msg_t *req, Quillan__Envelope *env) {
    qerr_t e;
    if (net_reply(s->sock, req, env, NULL, 0, &e) != 0) {
        s->stats.send_failed++;
        log_debug("weights.send_failed", "%s", e.msg);
    }
}

static void error_reply(weights_server_t *s, const net_msg_t *req, Quillan__ErrorCode code,
                        const char *text) {
    Quillan__Error er = QUILLAN__ERROR__INIT;
    er.code = code;
    er.message = (char *)text;
    er.in_reply_to = net_msg_envelope(req)->message_id;
    Quillan__Envelope env = QUILLAN__ENVELOPE__INIT;
    env.body_case = QUILLAN__ENVELOPE__BODY_ERROR;
    env.error = &er;
    s->stats.errors_sent++;
    reply(s, req, &env);
}

/* The bytes of a transfer: the delta against base, or the full buffer when base is 0. NULL when
 * the entry holds no delta against base. */
static const uint8_t *transfer_bytes(const snapshot_entry_t *e, uint64_t base, size_t *len,
                                     const uint8_t **digest) {
    if (base == 0) {
        *digest = snapshot_entry_digest(e);
        return snapshot_entry_data(e, len);
    }
    if (snapshot_entry_delta_base(e) != base)
        return NULL;
    *digest = snapshot_entry_delta_digest(e);
    return snapshot_entry_delta(e, len);
}

static uint32_t chunk_count(const weights_server_t *s, size_t len) {
    return (uint32_t)(len / s->chunk_bytes + (len % s->chunk_bytes != 0));
}

static void info_serve(weights_server_t *s, const net_msg_t *req, const Quillan__InfoRequest *ir) {
    snapshot_entry_t *e = snapshot_store_get(s->store, ir->version);
    char text[128];
    if (e == NULL) {
        if (ir->version == 0) {
            error_reply(s, req, QUILLAN__ERROR_CODE__ERROR_CODE_UNAVAILABLE,
                        "no snapshot published yet");
            return;
        }
        snprintf(text, sizeof(text), "snapshot version %llu is unknown or evicted (latest %llu)",
                 (unsigned long long)ir->version,
                 (unsigned long long)snapshot_store_latest(s->store));
        error_reply(s, req, QUILLAN__ERROR_CODE__ERROR_CODE_NOT_FOUND, text);
        return;
    }
    uint64_t base = 0;
    if (ir->have_version != 0 && snapshot_entry_delta_base(e) == ir->have_version)
        base = ir->have_version;
    size_t len = 0, full_len = 0;
    const uint8_t *digest = NULL;
    transfer_bytes(e, base, &len, &digest);
    snapshot_entry_data(e, &full_len);
    uint64_t n_chunks = len / s->chunk_bytes + (len % s->chunk_bytes != 0);
    if (n_chunks > UINT32_MAX) {
        snprintf(text, sizeof(text), "snapshot %llu needs %llu chunks, more than the protocol's",
                 (unsigned long long)snapshot_entry_version(e), (unsigned long long)n_chunks);
        error_reply(s, req, QUILLAN__ERROR_CODE__ERROR_CODE_INTERNAL, text);
        snapshot_entry_unref(&e);
        return;
    }

    size_t n_t = snapshot_entry_tensor_count(e);
    Quillan__TensorEntry *te = n_t ? calloc(n_t, sizeof(*te)) : NULL;
    Quillan__TensorEntry **tp = n_t ? calloc(n_t, sizeof(*tp)) : NULL;
    if (n_t && (te == NULL || tp == NULL)) {
        free(te);
        free(tp);
        error_reply(s, req, QUILLAN__ERROR_CODE__ERROR_CODE_INTERNAL, "out of memory");
        snapshot_entry_unref(&e);
        return;
    }
    for (size_t i = 0; i < n_t; i++) {
        const snapshot_tensor_t *t = snapshot_entry_tensor(e, i);
        quillan__tensor_entry__init(&te[i]);
        te[i].name = (char *)t->name;
        te[i].qtype = (char *)t->qtype;
        te[i].n_shape = t->n_dims;
        te[i].shape = (uint64_t *)t->shape;
        te[i].offset = t->offset;
        te[i].bytes = t->bytes;
        tp[i] = &te[i];
    }
    Quillan__SnapshotInfo info = QUILLAN__SNAPSHOT_INFO__INIT;
    info.version = snapshot_entry_version(e);
    info.is_old_policy = snapshot_entry_is_old_policy(e);
    info.base_version = base;
    info.total_bytes = len;
    info.chunk_size = s->chunk_bytes;
    info.chunk_count = (uint32_t)n_chunks;
    info.digest.data = (uint8_t *)digest;
    info.digest.len = SNAPSHOT_DIGEST_BYTES;
    info.full_bytes = full_len;
    info.full_digest.data = (uint8_t *)snapshot_entry_digest(e);
    info.full_digest.len = SNAPSHOT_DIGEST_BYTES;
    info.n_tensors = n_t;
    info.tensors = tp;
    Quillan__Envelope env = QUILLAN__ENVELOPE__INIT;
    env.body_case = QUILLAN__ENVELOPE__BODY_SNAPSHOT_INFO;
    env.snapshot_info = &info;
    s->stats.info_requests++;
    if (base)
        s->stats.delta_infos++;
    else
        s->stats.full_infos++;
    reply(s, req, &env);
    free(te);
    free(tp);
    snapshot_entry_unref(&e);
}

/* libzmq is done with a chunk frame: drop the entry reference that kept it alive. */
static void chunk_release(void *data, void *hint) {
    (void)data;
    snapshot_entry_t *e = hint;
    snapshot_entry_unref(&e);
}

static void chunk_serve(weights_server_t *s, const net_msg_t *req,
                        const Quillan__ChunkRequest *cr) {
    snapshot_entry_t *e = snapshot_store_get(s->store, cr->version);
    size_t len = 0;
    const uint8_t *digest = NULL;
    const uint8_t *bytes = e ? transfer_bytes(e, cr->base_version, &len, &digest) : NULL;
    if (bytes == NULL) {
        char text[160];
        snprintf(text, sizeof(text),
                 "snapshot %llu (base %llu) is unknown or evicted (latest %llu)",
                 (unsigned long long)cr->version, (unsigned long long)cr->base_version,
                 (unsigned long long)snapshot_store_latest(s->store));
        snapshot_entry_unref(&e);
        error_reply(s, req, QUILLAN__ERROR_CODE__ERROR_CODE_NOT_FOUND, text);
        return;
    }
    uint32_t n_chunks = chunk_count(s, len);
    if (cr->index >= n_chunks) {
        s->stats.malformed++;
        log_debug("weights.malformed", "chunk %u of snapshot %llu, which has %u chunks", cr->index,
                  (unsigned long long)cr->version, n_chunks);
        snapshot_entry_unref(&e);
        return;
    }
    size_t off = (size_t)cr->index * s->chunk_bytes;
    size_t size = len - off < s->chunk_bytes ? len - off : s->chunk_bytes;
    Quillan__ChunkReply rep = QUILLAN__CHUNK_REPLY__INIT;
    rep.version = cr->version;
    rep.index = cr->index;
    rep.chunk_count = n_chunks;
    rep.size = (uint32_t)size;
    rep.base_version = cr->base_version;
    Quillan__Envelope env = QUILLAN__ENVELOPE__INIT;
    env.body_case = QUILLAN__ENVELOPE__BODY_CHUNK_REPLY;
    env.chunk_reply = &rep;
    qerr_t er;
    /* The reference travels with the frame; chunk_release drops it, also on failure. */
    if (net_send_zc(s->sock, net_msg_peer(req), &env, (void *)(bytes + off), size, chunk_release, e,
                    NULL, &er) != 0) {
        s->stats.send_failed++;
        log_debug("weights.send_failed", "%s", er.msg);
        return;
    }
    s->stats.chunks_sent++;
    s->stats.bytes_sent += size;
}

int weights_server_poll(weights_server_t *s, int timeout_ms, qerr_t *err) {
    int handled = 0;
    while (handled < WEIGHTS_SERVER_BATCH) {
        net_msg_t *m = NULL;
        int rc = net_recv(s->sock, handled == 0 ? timeout_ms : 0, &m, err);
        if (rc < 0)
            return -1;
        if (rc == 0)
            break;
        const Quillan__Envelope *env = net_msg_envelope(m);
        switch (env->body_case) {
        case QUILLAN__ENVELOPE__BODY_INFO_REQUEST: info_serve(s, m, env->info_request); break;
        case QUILLAN__ENVELOPE__BODY_CHUNK_REQUEST: chunk_serve(s, m, env->chunk_request); break;
        default:
            s->stats.malformed++;
            log_debug("weights.malformed", "a client sent '%s'", wire_body_name(env->body_case));
            break;
        }
        net_msg_destroy(&m);
        handled++;
    }
    return handled;
}
