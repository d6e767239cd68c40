/* bench_snapshot: publish-to-applied time and bytes of snapshot transfers over loopback, full
 * and delta.
 *
 * One process: the weights server polls on its own thread, the snapshot client pulls on the
 * main thread over tcp://127.0.0.1 (real sockets, real copies). The buffer stands in for the
 * quantized 512m policy (MODEL.md: ~450 MB of FP32 embedding/head, INT4 experts, FP16 and
 * BitNet parts): random bytes, since the transfer treats the snapshot as opaque bytes.
 *   v1: publish (copy + BLAKE2b + no delta) and a full pull;
 *   then for each --changed percentage: that fraction of the 256-byte blocks gets one byte
 *   changed, the next version is published (now with a delta) and pulled against the previous
 *   snapshot the client holds (delta transfer, apply, full-digest check).
 * Reported per row: publish seconds (learner side), pull seconds (request to verified snapshot),
 * their sum (publish-to-applied), bytes on the wire, and the ratio to the full buffer.
 *
 * Usage: bench_snapshot [--mib N] [--changed P[,P...]] [--chunk BYTES] [--inflight N]
 *                       [--block BYTES] */
#include "log.h"
#include "snapshot_client.h"
#include "snapshot_store.h"
#include "weights_server.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>
#include <zmq.h>

#define BENCH_FETCH_MS 600000
#define BENCH_MAX_CHANGED 16

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* CPU seconds of the whole process (all threads, libzmq's included): less sensitive than wall
 * time to other load on a shared machine. */
static double cpu_s(void) {
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return (double)ru.ru_utime.tv_sec + 1e-6 * (double)ru.ru_utime.tv_usec +
           (double)ru.ru_stime.tv_sec + 1e-6 * (double)ru.ru_stime.tv_usec;
}

static uint64_t rng = 0x243f6a8885a308d3ull;

static uint64_t next_u64(void) {
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return rng;
}

typedef struct {
    weights_server_t *server;
    atomic_int stop;
} serve_t;

static void *serve(void *arg) {
    serve_t *s = arg;
    qerr_t err;
    while (!atomic_load(&s->stop))
        if (weights_server_poll(s->server, 20, &err) < 0) {
            fprintf(stderr, "server: %s\n", err.msg);
            break;
        }
    return NULL;
}

static int usage(const char *argv0) {
    fprintf(stderr,
            "usage: %s [--mib N] [--changed P[,P...]] [--chunk BYTES] [--inflight N] "
            "[--block BYTES]\n",
            argv0);
    return 2;
}

int main(int argc, char **argv) {
    size_t mib = 450;
    double changed[BENCH_MAX_CHANGED] = {1.0, 5.0};
    int n_changed = 2, chunk = 1 << 20, inflight = 4;
    unsigned block = SNAPSHOT_BLOCK_BYTES_DEFAULT;
    for (int i = 1; i < argc; i++) {
        if (i + 1 >= argc)
            return usage(argv[0]);
        const char *v = argv[++i];
        if (strcmp(argv[i - 1], "--mib") == 0) {
            mib = (size_t)strtoul(v, NULL, 10);
        } else if (strcmp(argv[i - 1], "--chunk") == 0) {
            chunk = atoi(v);
        } else if (strcmp(argv[i - 1], "--inflight") == 0) {
            inflight = atoi(v);
        } else if (strcmp(argv[i - 1], "--block") == 0) {
            block = (unsigned)strtoul(v, NULL, 10);
        } else if (strcmp(argv[i - 1], "--changed") == 0) {
            n_changed = 0;
            for (char *p = (char *)v; *p && n_changed < BENCH_MAX_CHANGED;) {
                changed[n_changed++] = strtod(p, &p);
                if (*p == ',')
                    p++;
                else if (*p)
                    return usage(argv[0]);
            }
        } else {
            return usage(argv[0]);
        }
    }
    if (mib == 0)
        return usage(argv[0]);
    log_set_stderr(0);
    size_t len = mib << 20;
    uint8_t *buf = malloc(len);
    if (buf == NULL)
        return fprintf(stderr, "cannot allocate %zu bytes\n", len), 1;
    for (size_t i = 0; i + 8 <= len; i += 8) {
        uint64_t r = next_u64();
        memcpy(buf + i, &r, 8);
    }

    qerr_t err;
    snapshot_store_options_t so;
    snapshot_store_options_init(&so);
    so.snapshots_kept = 2;
    so.full_snapshot_interval = 1000;
    so.block_bytes = block;
    snapshot_store_t *store = snapshot_store_new(&so, &err);
    if (store == NULL)
        return fprintf(stderr, "%s\n", err.msg), 1;
    void *zctx = zmq_ctx_new();
    weights_server_options_t wo;
    weights_server_options_init(&wo);
    wo.endpoint = "tcp://127.0.0.1:*";
    wo.net.chunk_bytes = chunk;
    serve_t sv = {.server = weights_server_new(zctx, store, &wo, &err)};
    if (sv.server == NULL)
        return fprintf(stderr, "%s\n", err.msg), 1;
    atomic_init(&sv.stop, 0);
    snapshot_client_options_t co;
    snapshot_client_options_init(&co);
    co.endpoint = weights_server_endpoint(sv.server);
    co.net.chunk_bytes = chunk;
    co.chunks_in_flight = inflight;
    co.request_timeout_ms = 30000;
    snapshot_client_t *c = snapshot_client_new(zctx, &co, &err);
    if (c == NULL)
        return fprintf(stderr, "%s\n", err.msg), 1;
    pthread_t th;
    pthread_create(&th, NULL, serve, &sv);

    printf("buffer %zu MiB (%zu bytes), chunk %d bytes, %d in flight, block %u bytes\n", mib, len,
           chunk, inflight, block);
    printf("| transfer | changed blocks | publish s | pull s | publish-to-applied s | CPU s "
           "| wire bytes | wire / full | pull MB/s |\n");
    printf("|---|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    snapshot_t *held = NULL;
    size_t n_blocks = len / block + (len % block != 0);
    int rc = 0;
    for (int round = 0; round <= n_changed; round++) {
        if (round > 0) {
            size_t edits = (size_t)((double)n_blocks * changed[round - 1] / 100.0);
            for (size_t k = 0; k < edits; k++) {
                size_t b = (size_t)(next_u64() % n_blocks);
                size_t off = b * block + (size_t)(next_u64() % block);
                if (off < len)
                    buf[off] ^= 0x40; /* repeated picks leave fewer distinct blocks: reported */
            }
        }
        snapshot_client_stats_t before, after;
        snapshot_client_stats(c, &before);
        snapshot_publish_stats_t ps;
        double c0 = cpu_s(), t0 = now_s();
        if (snapshot_store_publish(store, (uint64_t)round + 1, buf, len, 0, NULL, 0, &ps, &err) !=
            0) {
            fprintf(stderr, "publish: %s\n", err.msg);
            rc = 1;
            break;
        }
        double t1 = now_s();
        snapshot_t *s = snapshot_client_fetch(c, 0, held, BENCH_FETCH_MS, &err);
        double t2 = now_s(), c2 = cpu_s();
        if (s == NULL) {
            fprintf(stderr, "fetch: %s\n", err.msg);
            rc = 1;
            break;
        }
        size_t n = 0;
        const uint8_t *data = snapshot_data(s, &n);
        if (n != len || memcmp(data, buf, len) != 0) {
            fprintf(stderr, "version %d: pulled bytes differ\n", round + 1);
            rc = 1;
        }
        snapshot_client_stats(c, &after);
        uint64_t wire = after.bytes - before.bytes;
        int delta = after.delta_transfers > before.delta_transfers;
        char what[64];
        if (round == 0)
            snprintf(what, sizeof(what), "full (v1)");
        else
            snprintf(what, sizeof(what), "%s, %.1f%% edited (v%d)", delta ? "delta" : "full",
                     changed[round - 1], round + 1);
        printf("| %s | %.2f%% | %.2f | %.2f | %.2f | %.2f | %llu | %.4f | %.0f |\n", what,
               100.0 * ps.changed_frac, t1 - t0, t2 - t1, t2 - t0, c2 - c0,
               (unsigned long long)wire, (double)wire / (double)len,
               (double)wire / 1e6 / (t2 - t1));
        fflush(stdout);
        snapshot_unref(&held);
        held = s;
    }
    atomic_store(&sv.stop, 1);
    pthread_join(th, NULL);
    snapshot_unref(&held);
    snapshot_client_destroy(&c);
    weights_server_destroy(&sv.server);
    zmq_ctx_term(zctx);
    snapshot_store_destroy(&store);
    free(buf);
    return rc;
}
