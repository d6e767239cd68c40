#include "snapshot_client.h"

#include "log.h"
#include "weights_codec.h"

#include <sodium.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>
#include <zmq.h>

/* The delta format of learner/snapshot_store.h (normative there). */
#define DELTA_MAGIC "QSD1"
#define DELTA_HEADER_BYTES 24
#define DELTA_BLOCK_MIN 64u
#define DELTA_BLOCK_MAX (1u << 20)

struct snapshot {
    atomic_long refs;
    uint64_t version;
    int is_old_policy;
    uint8_t *data; /* mmap'd, read-only once verified */
    size_t len;
    size_t map_len;
    uint8_t digest[SNAPSHOT_CLIENT_DIGEST_BYTES];
    snapshot_client_tensor_t *tensors; /* strings and shapes owned here */
    size_t n_tensors;
};

struct snapshot_client {
    snapshot_client_options_t opt;
    const volatile sig_atomic_t *stop; /* NULL, or ends a fetch when it becomes non-zero */
    net_socket_t *sock;
    weights_codec_limits_t limits; /* read by the socket's validator */
    snapshot_client_stats_t stats;
};

/* ---- snapshots ---- */

static void snapshot_free(snapshot_t *s) {
    if (s->data)
        munmap(s->data, s->map_len);
    for (size_t i = 0; i < s->n_tensors; i++) {
        free((char *)s->tensors[i].name);
        free((char *)s->tensors[i].qtype);
        free((uint64_t *)s->tensors[i].shape);
    }
    free(s->tensors);
    free(s);
}

snapshot_t *snapshot_ref(snapshot_t *s) {
    Q_ASSERT(s);
    long prev = atomic_fetch_add_explicit(&s->refs, 1, memory_order_relaxed);
    Q_ASSERT(prev > 0);
    return s;
}

void snapshot_unref(snapshot_t **sp) {
    if (sp == NULL || *sp == NULL)
        return;
    snapshot_t *s = *sp;
    *sp = NULL;
    long prev = atomic_fetch_sub_explicit(&s->refs, 1, memory_order_acq_rel);
    Q_ASSERT(prev > 0);
    if (prev == 1)
        snapshot_free(s);
}

uint64_t snapshot_version(const snapshot_t *s) {
    return s->version;
}

int snapshot_is_old_policy(const snapshot_t *s) {
    return s->is_old_policy;
}

const uint8_t *snapshot_data(const snapshot_t *s, size_t *len) {
    if (len)
        *len = s->len;
    return s->data;
}

const uint8_t *snapshot_digest(const snapshot_t *s) {
    return s->digest;
}

size_t snapshot_tensor_count(const snapshot_t *s) {
    return s->n_tensors;
}

const snapshot_client_tensor_t *snapshot_tensor(const snapshot_t *s, size_t i) {
    Q_ASSERT(i < s->n_tensors);
    return &s->tensors[i];
}

const snapshot_client_tensor_t *snapshot_tensor_find(const snapshot_t *s, const char *name) {
    for (size_t i = 0; i < s->n_tensors; i++)
        if (strcmp(s->tensors[i].name, name) == 0)
            return &s->tensors[i];
    return NULL;
}

/* Writable private pages for len > 0 bytes; *map_len gets the mapped size. NULL on failure.
 * MAP_POPULATE: every page is written next anyway, and faulting them in one by one costs
 * several times the copy itself on virtual machines (measured: 7 s vs 1.9 s for 450 MiB). */
static uint8_t *pages_new(size_t len, size_t *map_len) {
    size_t page = (size_t)sysconf(_SC_PAGESIZE);
    *map_len = (len + page - 1) / page * page;
    void *p = mmap(NULL, *map_len, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
    return p == MAP_FAILED ? NULL : p;
}

/* ---- delta ---- */

static uint32_t u32_get(const uint8_t *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static uint64_t u64_get(const uint8_t *p) {
    return (uint64_t)u32_get(p) | (uint64_t)u32_get(p + 4) << 32;
}

/* Reads one LEB128 value at *p (before end); 0, or -1 when truncated or over 64 bits. */
static int leb128_get(const uint8_t **p, const uint8_t *end, uint64_t *v) {
    uint64_t x = 0;
    for (int shift = 0; shift < 64; shift += 7) {
        if (*p >= end)
            return -1;
        uint8_t b = *(*p)++;
        if (shift == 63 && (b & 0x7e))
            return -1;
        x |= (uint64_t)(b & 0x7f) << shift;
        if ((b & 0x80) == 0) {
            *v = x;
            return 0;
        }
    }
    return -1;
}

/* Walks the runs of a delta. With out == NULL it only validates and returns the data length in
 * *data_len; with out it copies each run's bytes from data into out. */
static int runs_walk(const uint8_t *delta, size_t delta_len, uint64_t n_runs, uint32_t block,
                     size_t full, uint8_t *out, const uint8_t **data_start, uint64_t *data_len,
                     qerr_t *err) {
    const uint8_t *p = delta + DELTA_HEADER_BYTES, *end = delta + delta_len;
    uint64_t n_blocks = full / block + (full % block != 0);
    uint64_t prev_end = 0, bytes = 0;
    const uint8_t *src = *data_start;
    for (uint64_t i = 0; i < n_runs; i++) {
        uint64_t gap, count;
        if (leb128_get(&p, end, &gap) != 0 || leb128_get(&p, end, &count) != 0)
            return qerr_set(err, QERR_PARSE, "snapshot delta: run %llu: truncated varint",
                            (unsigned long long)i);
        if (count == 0 || gap > n_blocks - prev_end || count > n_blocks - prev_end - gap)
            return qerr_set(err, QERR_INVALID,
                            "snapshot delta: run %llu (gap %llu, count %llu) leaves the %llu "
                            "blocks",
                            (unsigned long long)i, (unsigned long long)gap,
                            (unsigned long long)count, (unsigned long long)n_blocks);
        uint64_t start = prev_end + gap;
        prev_end = start + count;
        uint64_t off = start * block, stop = prev_end * block;
        if (stop > full)
            stop = full;
        if (out) {
            memcpy(out + off, src, (size_t)(stop - off));
            src += stop - off;
        }
        bytes += stop - off;
    }
    if (data_start && out == NULL)
        *data_start = p;
    *data_len = bytes;
    return 0;
}

int snapshot_delta_apply(const uint8_t *base, size_t base_len, const uint8_t *delta,
                         size_t delta_len, uint8_t *out, qerr_t *err) {
    Q_ASSERT(base && delta && out);
    if (delta_len < DELTA_HEADER_BYTES || memcmp(delta, DELTA_MAGIC, 4) != 0)
        return qerr_set(err, QERR_PARSE, "snapshot delta: %zu bytes without the '%s' header",
                        delta_len, DELTA_MAGIC);
    uint32_t block = u32_get(delta + 4);
    uint64_t full = u64_get(delta + 8), n_runs = u64_get(delta + 16);
    if (block < DELTA_BLOCK_MIN || block > DELTA_BLOCK_MAX || (block & (block - 1)) != 0)
        return qerr_set(err, QERR_INVALID,
                        "snapshot delta: block_bytes %u is not a power of two in [%u, %u]", block,
                        DELTA_BLOCK_MIN, DELTA_BLOCK_MAX);
    if (full != base_len)
        return qerr_set(err, QERR_INVALID,
                        "snapshot delta: full_bytes %llu, but the base has %zu bytes",
                        (unsigned long long)full, base_len);
    if (n_runs > (delta_len - DELTA_HEADER_BYTES) / 2)
        return qerr_set(err, QERR_INVALID, "snapshot delta: %llu runs cannot fit %zu bytes",
                        (unsigned long long)n_runs, delta_len);
    const uint8_t *data = NULL;
    uint64_t data_len = 0;
    if (runs_walk(delta, delta_len, n_runs, block, base_len, NULL, &data, &data_len, err) != 0)
        return -1;
    size_t have = delta_len - (size_t)(data - delta);
    if (data_len != have)
        return qerr_set(err, QERR_INVALID,
                        "snapshot delta: the runs need %llu data bytes, the payload has %zu",
                        (unsigned long long)data_len, have);
    if (out != base)
        memcpy(out, base, base_len);
    return runs_walk(delta, delta_len, n_runs, block, base_len, out, &data, &data_len, err);
}

/* ---- client ---- */

void snapshot_client_options_init(snapshot_client_options_t *o) {
    memset(o, 0, sizeof(*o));
    o->endpoint = "tcp://127.0.0.1:5556";
    o->sender_id = "rollout";
    o->incarnation_id = net_incarnation_new();
    net_options_init(&o->net);
    o->security.mode = NET_SECURITY_NONE;
    o->chunks_in_flight = 4;
    o->request_timeout_ms = 2000;
    o->max_attempts = 3;
    o->max_snapshot_bytes = (uint64_t)4 << 30;
}

snapshot_client_t *snapshot_client_new(void *zctx, const snapshot_client_options_t *o,
                                       qerr_t *err) {
    Q_ASSERT(zctx && o && o->endpoint && o->sender_id);
    if (o->chunks_in_flight < 1 || o->chunks_in_flight > 1024) {
        qerr_set(err, QERR_RANGE, "snapshot client: chunks_in_flight %d is outside [1, 1024]",
                 o->chunks_in_flight);
        return NULL;
    }
    if (o->request_timeout_ms < 10 || o->request_timeout_ms > 600000) {
        qerr_set(err, QERR_RANGE, "snapshot client: request_timeout_ms %d is outside [10, 600000]",
                 o->request_timeout_ms);
        return NULL;
    }
    if (o->max_attempts < 1 || o->max_attempts > 100 || o->max_snapshot_bytes == 0) {
        qerr_set(err, QERR_RANGE,
                 "snapshot client: max_attempts %d outside [1, 100] or max_snapshot_bytes 0",
                 o->max_attempts);
        return NULL;
    }
    if (net_options_validate(&o->net, err) != 0) {
        qerr_wrap(err, "snapshot client");
        return NULL;
    }
    if (sodium_init() < 0) {
        qerr_set(err, QERR_IO, "snapshot client: libsodium failed to initialise");
        return NULL;
    }
    snapshot_client_t *c = calloc(1, sizeof(*c));
    if (c == NULL) {
        qerr_set(err, QERR_NOMEM, "snapshot client: out of memory");
        return NULL;
    }
    c->opt = *o;
    /* Sizes are checked here against the options, with clear errors; the frame limit
     * (ZMQ_MAXMSGSIZE) already bounds every chunk frame. */
    c->limits.max_chunk_bytes = UINT32_MAX;
    c->limits.max_total_bytes = UINT64_MAX;
    net_socket_spec_t spec = {.type = ZMQ_DEALER,
                              .protocol = WIRE_PROTOCOL_WEIGHTS,
                              .name = "weights",
                              .sender_id = o->sender_id,
                              .incarnation_id = o->incarnation_id,
                              .validate = weights_codec_net_validate,
                              .validate_ctx = &c->limits};
    c->sock = net_socket_new(zctx, &spec, &o->net, &o->security, err);
    if (c->sock == NULL || net_socket_connect(c->sock, o->endpoint, err) != 0) {
        qerr_wrap(err, "snapshot client");
        snapshot_client_destroy(&c);
        return NULL;
    }
    c->opt.endpoint = net_socket_endpoint(c->sock);
    c->opt.sender_id = NULL;
    return c;
}

void snapshot_client_destroy(snapshot_client_t **cp) {
    if (cp == NULL || *cp == NULL)
        return;
    net_socket_destroy(&(*cp)->sock);
    free(*cp);
    *cp = NULL;
}

void snapshot_client_stats(snapshot_client_t *c, snapshot_client_stats_t *out) {
    *out = c->stats;
    net_socket_stats(c->sock, &out->net);
}

static int64_t now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* How an attempt ended when it returns no snapshot. */
typedef enum { ATTEMPT_FAIL, ATTEMPT_RETRY, ATTEMPT_RETRY_FULL } attempt_end_t;

/* One transfer's state. */
typedef struct {
    snapshot_client_t *c;
    int64_t deadline;
    uint64_t first_id; /* message id of the attempt's first request: older replies are stale */
    net_msg_t *info_msg;
    const Quillan__SnapshotInfo *info;
} transfer_t;

static int request_send(transfer_t *t, Quillan__Envelope *env, qerr_t *err) {
    uint64_t id = 0;
    if (net_send(t->c->sock, NULL, env, NULL, 0, &id, err) != 0)
        return err && err->code == QERR_TIMEOUT ? 0 : -1; /* a full queue: the timeout resends */
    if (t->first_id == 0)
        t->first_id = id;
    return 0;
}

static int info_send(transfer_t *t, uint64_t version, uint64_t have, qerr_t *err) {
    Quillan__InfoRequest ir = QUILLAN__INFO_REQUEST__INIT;
    ir.version = version;
    ir.have_version = have;
    Quillan__Envelope env = QUILLAN__ENVELOPE__INIT;
    env.body_case = QUILLAN__ENVELOPE__BODY_INFO_REQUEST;
    env.info_request = &ir;
    return request_send(t, &env, err);
}

static int chunk_send(transfer_t *t, uint32_t index, qerr_t *err) {
    Quillan__ChunkRequest cr = QUILLAN__CHUNK_REQUEST__INIT;
    cr.version = t->info->version;
    cr.index = index;
    cr.base_version = t->info->base_version;
    Quillan__Envelope env = QUILLAN__ENVELOPE__INIT;
    env.body_case = QUILLAN__ENVELOPE__BODY_CHUNK_REQUEST;
    env.chunk_request = &cr;
    return request_send(t, &env, err);
}

/* Waits for the next message until at most `until` (ms, monotonic), in slices short enough to
 * notice a stop request. 1 with *m, 0 on time-out, -1 with err (also on a stop request). */
static int recv_until(transfer_t *t, int64_t until, net_msg_t **m, qerr_t *err) {
    if (t->c->stop && *t->c->stop)
        return qerr_set(err, QERR_TIMEOUT, "snapshot fetch interrupted by a stop request");
    int64_t wait = until - now_ms();
    if (wait < 0)
        wait = 0;
    if (t->c->stop && wait > SNAPSHOT_STOP_POLL_MS)
        wait = SNAPSHOT_STOP_POLL_MS;
    return net_recv(t->c->sock, (int)wait, m, err);
}

/* An Error that answers a request of this attempt (older ones are stale); else NULL. */
static const Quillan__Error *error_of(transfer_t *t, const net_msg_t *m) {
    const Quillan__Envelope *env = net_msg_envelope(m);
    if (env->body_case != QUILLAN__ENVELOPE__BODY_ERROR)
        return NULL;
    t->c->stats.errors++;
    return env->error->in_reply_to >= t->first_id ? env->error : NULL;
}

/* Phase 1: InfoRequest until a SnapshotInfo that fits the request arrives. */
static int info_get(transfer_t *t, uint64_t version, const snapshot_t *base, qerr_t *err) {
    snapshot_client_t *c = t->c;
    uint64_t have = base ? base->version : 0;
    if (info_send(t, version, have, err) != 0)
        return -1;
    int64_t resend = now_ms() + c->opt.request_timeout_ms;
    for (;;) {
        int64_t now = now_ms();
        if (now >= t->deadline)
            return qerr_set(err, QERR_TIMEOUT, "snapshot %llu: no SnapshotInfo from %s in time",
                            (unsigned long long)version, c->opt.endpoint);
        if (now >= resend) {
            c->stats.rerequests++;
            if (info_send(t, version, have, err) != 0)
                return -1;
            resend = now + c->opt.request_timeout_ms;
        }
        net_msg_t *m = NULL;
        int rc = recv_until(t, resend < t->deadline ? resend : t->deadline, &m, err);
        if (rc < 0)
            return -1;
        if (rc == 0)
            continue;
        const Quillan__Envelope *env = net_msg_envelope(m);
        const Quillan__Error *er = error_of(t, m);
        if (er && er->code == QUILLAN__ERROR_CODE__ERROR_CODE_NOT_FOUND) {
            qerr_set(err, QERR_NOTFOUND, "snapshot %llu: %s", (unsigned long long)version,
                     er->message);
            net_msg_destroy(&m);
            return -1;
        }
        const Quillan__SnapshotInfo *si =
            env->body_case == QUILLAN__ENVELOPE__BODY_SNAPSHOT_INFO ? env->snapshot_info : NULL;
        /* A stale answer (to an earlier request) may describe another version or a delta
         * against a base we no longer hold: ignore it. */
        if (si && (version == 0 || si->version == version) &&
            (si->base_version == 0 || si->base_version == have)) {
            t->info_msg = m;
            t->info = si;
            return 0;
        }
        if (er == NULL)
            c->stats.duplicates += env->body_case != QUILLAN__ENVELOPE__BODY_ERROR;
        net_msg_destroy(&m);
    }
}

/* A chunk request in flight. */
typedef struct {
    uint32_t index;
    int64_t sent_ms;
} flight_t;

/* Phase 2: every chunk into dst (info->total_bytes). Returns 0, 1 when the server no longer has
 * the transfer (NOT_FOUND), or -1 with err. */
static int chunks_get(transfer_t *t, uint8_t *dst, qerr_t *err) {
    snapshot_client_t *c = t->c;
    const Quillan__SnapshotInfo *info = t->info;
    uint32_t n = info->chunk_count, next = 0, done = 0;
    size_t window = (size_t)c->opt.chunks_in_flight, n_flight = 0;
    uint8_t *have = calloc(n ? n : 1, 1);
    flight_t *flight = calloc(window, sizeof(*flight));
    int rc = -1;
    if (have == NULL || flight == NULL) {
        qerr_set(err, QERR_NOMEM, "snapshot %llu: out of memory for %u chunks",
                 (unsigned long long)info->version, n);
        goto out;
    }
    while (done < n) {
        while (n_flight < window && next < n) {
            if (chunk_send(t, next, err) != 0)
                goto out;
            flight[n_flight++] = (flight_t){next++, now_ms()};
        }
        int64_t now = now_ms(), wake = t->deadline;
        if (now >= t->deadline) {
            qerr_set(err, QERR_TIMEOUT, "snapshot %llu: %u of %u chunks arrived in time",
                     (unsigned long long)info->version, done, n);
            goto out;
        }
        for (size_t i = 0; i < n_flight; i++) {
            int64_t due = flight[i].sent_ms + c->opt.request_timeout_ms;
            if (due <= now) {
                c->stats.rerequests++;
                if (chunk_send(t, flight[i].index, err) != 0)
                    goto out;
                flight[i].sent_ms = now;
                due = now + c->opt.request_timeout_ms;
            }
            if (due < wake)
                wake = due;
        }
        net_msg_t *m = NULL;
        int r = recv_until(t, wake, &m, err);
        if (r < 0)
            goto out;
        if (r == 0)
            continue;
        const Quillan__Envelope *env = net_msg_envelope(m);
        const Quillan__Error *er = error_of(t, m);
        if (er && er->code == QUILLAN__ERROR_CODE__ERROR_CODE_NOT_FOUND) {
            qerr_set(err, QERR_NOTFOUND, "snapshot %llu (base %llu): %s",
                     (unsigned long long)info->version, (unsigned long long)info->base_version,
                     er->message);
            net_msg_destroy(&m);
            rc = 1;
            goto out;
        }
        const Quillan__ChunkReply *cr =
            env->body_case == QUILLAN__ENVELOPE__BODY_CHUNK_REPLY ? env->chunk_reply : NULL;
        if (cr && weights_codec_chunk_check(cr, info, NULL) == 0 && !have[cr->index]) {
            size_t len = 0;
            const void *bytes = net_msg_payload(m, &len);
            memcpy(dst + (size_t)cr->index * info->chunk_size, bytes, len);
            have[cr->index] = 1;
            done++;
            c->stats.chunks++;
            c->stats.bytes += len;
            for (size_t i = 0; i < n_flight; i++)
                if (flight[i].index == cr->index) {
                    flight[i] = flight[--n_flight];
                    break;
                }
        } else if (er == NULL && env->body_case != QUILLAN__ENVELOPE__BODY_ERROR) {
            c->stats.duplicates++;
        }
        net_msg_destroy(&m);
    }
    rc = 0;
out:
    free(have);
    free(flight);
    return rc;
}

static int tensors_copy(snapshot_t *s, const Quillan__SnapshotInfo *info, qerr_t *err) {
    if (info->n_tensors == 0)
        return 0;
    s->tensors = calloc(info->n_tensors, sizeof(*s->tensors));
    if (s->tensors == NULL)
        return qerr_set(err, QERR_NOMEM, "snapshot: out of memory for %zu tensors",
                        info->n_tensors);
    s->n_tensors = info->n_tensors;
    for (size_t i = 0; i < info->n_tensors; i++) {
        const Quillan__TensorEntry *te = info->tensors[i];
        snapshot_client_tensor_t *d = &s->tensors[i];
        d->name = strdup(te->name);
        d->qtype = strdup(te->qtype);
        d->n_dims = te->n_shape;
        d->offset = te->offset;
        d->bytes = te->bytes;
        uint64_t *shape = te->n_shape ? malloc(te->n_shape * sizeof(*shape)) : NULL;
        d->shape = shape;
        if (d->name == NULL || d->qtype == NULL || (te->n_shape && shape == NULL))
            return qerr_set(err, QERR_NOMEM, "snapshot: out of memory for tensor '%s'", te->name);
        if (te->n_shape)
            memcpy(shape, te->shape, te->n_shape * sizeof(*shape));
    }
    return 0;
}

static int digest_equal(const uint8_t *bytes, size_t len, const ProtobufCBinaryData *want) {
    uint8_t d[SNAPSHOT_CLIENT_DIGEST_BYTES];
    crypto_generichash(d, sizeof(d), bytes, len, NULL, 0);
    return want->len == sizeof(d) && sodium_memcmp(d, want->data, sizeof(d)) == 0;
}

/* One whole transfer. On failure *end says whether another attempt may help. */
static snapshot_t *attempt(snapshot_client_t *c, uint64_t version, const snapshot_t *base,
                           int64_t deadline, attempt_end_t *end, qerr_t *err) {
    transfer_t t = {.c = c, .deadline = deadline};
    snapshot_t *s = NULL;
    uint8_t *payload = NULL;
    size_t payload_map = 0;
    *end = ATTEMPT_FAIL;
    if (info_get(&t, version, base, err) != 0)
        return NULL;
    const Quillan__SnapshotInfo *info = t.info;
    int delta = info->base_version != 0;
    if (info->total_bytes == 0 || info->full_bytes == 0) {
        qerr_set(err, QERR_INVALID, "snapshot %llu: the server describes an empty transfer",
                 (unsigned long long)info->version);
        goto fail;
    }
    if (info->chunk_size > c->opt.net.chunk_bytes) {
        qerr_set(err, QERR_RANGE,
                 "snapshot %llu: chunk_size %u exceeds this worker's network.chunk_bytes %lld",
                 (unsigned long long)info->version, info->chunk_size,
                 (long long)c->opt.net.chunk_bytes);
        goto fail;
    }
    if (info->total_bytes > c->opt.max_snapshot_bytes ||
        info->full_bytes > c->opt.max_snapshot_bytes || info->full_bytes > SIZE_MAX) {
        qerr_set(err, QERR_RANGE, "snapshot %llu: %llu bytes exceed the limit %llu",
                 (unsigned long long)info->version, (unsigned long long)info->full_bytes,
                 (unsigned long long)c->opt.max_snapshot_bytes);
        goto fail;
    }
    if (delta && base->len != info->full_bytes) {
        qerr_set(err, QERR_INVALID, "snapshot %llu: a delta of %llu bytes against a %zu-byte base",
                 (unsigned long long)info->version, (unsigned long long)info->full_bytes,
                 base->len);
        *end = ATTEMPT_RETRY_FULL;
        goto fail;
    }
    s = calloc(1, sizeof(*s));
    if (s == NULL || (s->data = pages_new(info->full_bytes, &s->map_len)) == NULL ||
        (delta && (payload = pages_new(info->total_bytes, &payload_map)) == NULL)) {
        qerr_set(err, QERR_NOMEM, "snapshot %llu: cannot map %llu bytes",
                 (unsigned long long)info->version, (unsigned long long)info->full_bytes);
        goto fail;
    }
    atomic_init(&s->refs, 1);
    s->len = info->full_bytes;
    if (delta)
        c->stats.delta_transfers++;
    else
        c->stats.full_transfers++;
    int rc = chunks_get(&t, delta ? payload : s->data, err);
    if (rc != 0) {
        if (rc == 1 && version == 0)
            *end = ATTEMPT_RETRY; /* the latest moved on while we pulled: ask again */
        goto fail;
    }
    if (!digest_equal(delta ? payload : s->data, info->total_bytes, &info->digest)) {
        c->stats.digest_failures++;
        qerr_set(err, QERR_INVALID, "snapshot %llu: the %s transfer's digest does not match",
                 (unsigned long long)info->version, delta ? "delta" : "full");
        *end = ATTEMPT_RETRY;
        goto fail;
    }
    if (delta) {
        if (snapshot_delta_apply(base->data, base->len, payload, info->total_bytes, s->data, err) !=
            0) {
            qerr_wrap(err, "snapshot %llu", (unsigned long long)info->version);
            *end = ATTEMPT_RETRY_FULL;
            goto fail;
        }
        if (!digest_equal(s->data, s->len, &info->full_digest)) {
            c->stats.digest_failures++;
            qerr_set(err, QERR_INVALID,
                     "snapshot %llu: the delta against %llu does not give the full digest",
                     (unsigned long long)info->version, (unsigned long long)info->base_version);
            *end = ATTEMPT_RETRY_FULL;
            goto fail;
        }
    } else if (!digest_equal(s->data, s->len, &info->full_digest)) {
        qerr_set(err, QERR_INVALID, "snapshot %llu: digest and full_digest disagree",
                 (unsigned long long)info->version);
        *end = ATTEMPT_RETRY;
        goto fail;
    }
    if (tensors_copy(s, info, err) != 0)
        goto fail;
    if (mprotect(s->data, s->map_len, PROT_READ) != 0) {
        qerr_set(err, QERR_IO, "snapshot %llu: cannot make the buffer read-only",
                 (unsigned long long)info->version);
        goto fail;
    }
    memcpy(s->digest, info->full_digest.data, SNAPSHOT_CLIENT_DIGEST_BYTES);
    s->version = info->version;
    s->is_old_policy = info->is_old_policy;
    if (payload)
        munmap(payload, payload_map);
    net_msg_destroy(&t.info_msg);
    return s;
fail:
    if (payload)
        munmap(payload, payload_map);
    if (s) {
        atomic_init(&s->refs, 1);
        snapshot_unref(&s);
    }
    net_msg_destroy(&t.info_msg);
    return NULL;
}

void snapshot_client_set_stop(snapshot_client_t *c, const volatile sig_atomic_t *stop) {
    c->stop = stop;
}

snapshot_t *snapshot_client_fetch(snapshot_client_t *c, uint64_t version, const snapshot_t *base,
                                  int timeout_ms, qerr_t *err) {
    Q_ASSERT(c && timeout_ms > 0);
    int64_t deadline = now_ms() + timeout_ms;
    qerr_t local;
    if (err == NULL)
        err = &local;
    for (int a = 0; a < c->opt.max_attempts; a++) {
        attempt_end_t end;
        snapshot_t *s = attempt(c, version, base, deadline, &end, err);
        if (s) {
            c->stats.fetched++;
            return s;
        }
        if (end == ATTEMPT_FAIL)
            return NULL;
        log_warn("snapshot.retry", "attempt %d of %d: %s", a + 1, c->opt.max_attempts, err->msg);
        if (end == ATTEMPT_RETRY_FULL)
            base = NULL;
    }
    return NULL;
}
