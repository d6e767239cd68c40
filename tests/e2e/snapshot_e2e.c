/* End-to-end test of snapshot transfer between real processes on loopback.
 *
 * `e2e_snapshot client` fork/execs itself as `e2e_snapshot server`, which owns a snapshot store
 * (snapshots_kept 3, full_snapshot_interval 10) behind a weights server and publishes v1 (full)
 * and v2, v3 (deltas against their predecessors). It reads commands on stdin ("publish",
 * "stats", "quit") and answers on stdout. Both processes derive every version's bytes from the
 * same generator (random bytes, then ~2% of the 256-byte blocks and the last byte edited per
 * version), so the client checks what it pulled against what it expects.
 *
 * The client reaches the server through a proxy thread (raw ZeroMQ ROUTER in front, DEALER to
 * the server) that can drop or corrupt the n-th chunk frame on its way back:
 *   1. v1 in full; v2 as a delta against v1, equal to a full pull of v2;
 *   2. a dropped chunk is asked again (rerequests) and the pull still succeeds;
 *   3. a corrupted chunk of a delta fails the digest; the client asks again and gets v3;
 *   4. a late joiner (a second client, direct) gets the latest version in full;
 *   5. after "publish" (v4), v1 is evicted (NOT_FOUND) and v4 arrives as a delta of v3;
 *   6. a chunk request past the last chunk is counted as malformed by the server.
 * Exit status 0 means pass. */
#include "e2e.h"
#include "log.h"
#include "snapshot_client.h"
#include "snapshot_store.h"
#include "weights_server.h"

#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <sodium.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>
#include <zmq.h>

#define E2E_LEN ((size_t)1000003) /* not a multiple of the block or the chunk */
#define E2E_BLOCK 256u
#define E2E_CHUNK 8192 /* 123 chunks in full, a few for a delta */
#define E2E_EDIT_ONE_IN 50
#define E2E_FETCH_MS 30000
#define E2E_TIMEOUT_MS 300

/* ---- the shared generator ---- */

static uint64_t mix(uint64_t x) {
    x += 0x9e3779b97f4a7c15ull;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
    return x ^ (x >> 31);
}

/* The bytes of version (>= 1): malloc'd, E2E_LEN long. */
static uint8_t *version_bytes(uint64_t version) {
    uint8_t *b = malloc(E2E_LEN);
    if (b == NULL)
        abort();
    for (size_t i = 0; i < E2E_LEN; i += 8) {
        uint64_t r = mix(i);
        size_t n = E2E_LEN - i < 8 ? E2E_LEN - i : 8;
        memcpy(b + i, &r, n);
    }
    size_t blocks = (E2E_LEN + E2E_BLOCK - 1) / E2E_BLOCK;
    for (uint64_t v = 2; v <= version; v++) {
        for (size_t k = 0; k < blocks; k++) {
            uint64_t h = mix(v * 1000003u + k);
            if (h % E2E_EDIT_ONE_IN != 0)
                continue;
            size_t off = k * E2E_BLOCK + (size_t)((h >> 8) % E2E_BLOCK);
            if (off < E2E_LEN)
                b[off] ^= (uint8_t)(0x80 | v);
        }
        b[E2E_LEN - 1] ^= (uint8_t)v;
    }
    return b;
}

/* ---- server process ---- */

static int publish(snapshot_store_t *store, uint64_t version) {
    uint8_t *b = version_bytes(version);
    uint64_t shape[] = {E2E_LEN};
    snapshot_tensor_t t = {"blob", "u8", shape, 1, 0, E2E_LEN};
    qerr_t err;
    int rc = snapshot_store_publish(store, version, b, E2E_LEN, version == 1, &t, 1, NULL, &err);
    if (rc != 0)
        fprintf(stderr, "server: publish %llu: %s\n", (unsigned long long)version, err.msg);
    free(b);
    return rc;
}

static int server_main(void) {
    log_set_stderr(0);
    snapshot_store_options_t so;
    snapshot_store_options_init(&so);
    so.snapshots_kept = 3;
    so.full_snapshot_interval = 10;
    so.block_bytes = E2E_BLOCK;
    qerr_t err;
    snapshot_store_t *store = snapshot_store_new(&so, &err);
    if (store == NULL)
        return fprintf(stderr, "server: %s\n", err.msg), 1;
    uint64_t latest = 0;
    while (latest < 3)
        if (publish(store, ++latest) != 0)
            return 1;
    void *zctx = zmq_ctx_new();
    weights_server_options_t wo;
    weights_server_options_init(&wo);
    wo.endpoint = "tcp://127.0.0.1:*";
    wo.sender_id = "e2e-learner";
    wo.net.chunk_bytes = E2E_CHUNK;
    wo.net.linger_ms = 0;
    weights_server_t *ws = weights_server_new(zctx, store, &wo, &err);
    if (ws == NULL)
        return fprintf(stderr, "server: %s\n", err.msg), 1;
    printf("%s\n", weights_server_endpoint(ws));
    fflush(stdout);

    char line[256];
    size_t have = 0;
    int quit = 0;
    while (!quit) {
        zmq_pollitem_t items[2] = {{weights_server_handle(ws), 0, ZMQ_POLLIN, 0},
                                   {NULL, STDIN_FILENO, ZMQ_POLLIN, 0}};
        if (zmq_poll(items, 2, 1000) < 0 && zmq_errno() != EINTR)
            break;
        if (items[0].revents & ZMQ_POLLIN && weights_server_poll(ws, 0, &err) < 0) {
            fprintf(stderr, "server: %s\n", err.msg);
            break;
        }
        if (!(items[1].revents & ZMQ_POLLIN))
            continue;
        ssize_t n = read(STDIN_FILENO, line + have, sizeof(line) - 1 - have);
        if (n <= 0)
            break; /* the client went away */
        have += (size_t)n;
        char *nl;
        while ((nl = memchr(line, '\n', have)) != NULL) {
            *nl = '\0';
            if (strcmp(line, "publish") == 0) {
                if (publish(store, ++latest) != 0)
                    quit = 1;
                printf("published %llu\n", (unsigned long long)latest);
            } else if (strcmp(line, "stats") == 0) {
                weights_server_stats_t st;
                weights_server_stats(ws, &st);
                printf("malformed %llu delta_infos %llu chunks %llu\n",
                       (unsigned long long)st.malformed, (unsigned long long)st.delta_infos,
                       (unsigned long long)st.chunks_sent);
            } else if (strcmp(line, "quit") == 0) {
                quit = 1;
            }
            fflush(stdout);
            size_t used = (size_t)(nl - line) + 1;
            memmove(line, nl + 1, have - used);
            have -= used;
        }
        if (have == sizeof(line) - 1)
            have = 0; /* a line too long for any command */
    }
    weights_server_destroy(&ws);
    zmq_ctx_term(zctx);
    snapshot_store_destroy(&store);
    return 0;
}

/* ---- fault-injecting proxy (client process) ---- */

typedef struct {
    void *zctx;
    char front[128];
    const char *back;
    atomic_int stop;
    atomic_int drop_nth;    /* drop the n-th chunk frame from now (0: none) */
    atomic_int corrupt_nth; /* flip a byte of the n-th chunk frame from now (0: none) */
    atomic_int seen;        /* chunk frames since the last arming */
    atomic_int ready;
} proxy_t;

static void proxy_arm(proxy_t *p, int drop_nth, int corrupt_nth) {
    atomic_store(&p->seen, 0);
    atomic_store(&p->drop_nth, drop_nth);
    atomic_store(&p->corrupt_nth, corrupt_nth);
}

/* Receives every frame of one message into msgs (up to cap); returns the count. */
static int frames_recv(void *sock, zmq_msg_t *msgs, int cap) {
    int n = 0, more = 1;
    while (more) {
        zmq_msg_t tmp;
        zmq_msg_init(&tmp);
        if (zmq_msg_recv(&tmp, sock, 0) < 0) {
            zmq_msg_close(&tmp);
            break;
        }
        more = zmq_msg_more(&tmp);
        if (n < cap)
            msgs[n++] = tmp;
        else
            zmq_msg_close(&tmp);
    }
    return n;
}

static void frames_send(void *sock, zmq_msg_t *msgs, int n) {
    for (int i = 0; i < n; i++)
        if (zmq_msg_send(&msgs[i], sock, i + 1 < n ? ZMQ_SNDMORE : 0) < 0)
            zmq_msg_close(&msgs[i]);
}

static void *proxy_run(void *arg) {
    proxy_t *p = arg;
    void *front = zmq_socket(p->zctx, ZMQ_ROUTER), *back = zmq_socket(p->zctx, ZMQ_DEALER);
    int zero = 0;
    zmq_setsockopt(front, ZMQ_LINGER, &zero, sizeof(zero));
    zmq_setsockopt(back, ZMQ_LINGER, &zero, sizeof(zero));
    size_t len = sizeof(p->front);
    if (zmq_bind(front, "tcp://127.0.0.1:*") != 0 || zmq_connect(back, p->back) != 0)
        abort();
    zmq_getsockopt(front, ZMQ_LAST_ENDPOINT, p->front, &len);
    atomic_store(&p->ready, 1);
    zmq_msg_t id;
    zmq_msg_init(&id);
    while (!atomic_load(&p->stop)) {
        zmq_pollitem_t items[2] = {{front, 0, ZMQ_POLLIN, 0}, {back, 0, ZMQ_POLLIN, 0}};
        if (zmq_poll(items, 2, 50) <= 0)
            continue;
        zmq_msg_t m[4];
        if (items[0].revents & ZMQ_POLLIN) {
            int n = frames_recv(front, m, 4);
            if (n >= 2) {
                zmq_msg_close(&id);
                zmq_msg_init(&id);
                zmq_msg_copy(&id, &m[0]);
                zmq_msg_close(&m[0]);
                frames_send(back, m + 1, n - 1);
            } else {
                for (int i = 0; i < n; i++)
                    zmq_msg_close(&m[i]);
            }
        }
        if (items[1].revents & ZMQ_POLLIN) {
            int n = frames_recv(back, m + 1, 3);
            if (n == 2) { /* a chunk: [ChunkReply][bytes] */
                int k = atomic_fetch_add(&p->seen, 1) + 1;
                if (k == atomic_load(&p->drop_nth)) {
                    for (int i = 1; i <= n; i++)
                        zmq_msg_close(&m[i]);
                    continue;
                }
                if (k == atomic_load(&p->corrupt_nth))
                    ((uint8_t *)zmq_msg_data(&m[2]))[zmq_msg_size(&m[2]) / 2] ^= 0x01;
            }
            zmq_msg_init(&m[0]);
            zmq_msg_copy(&m[0], &id);
            frames_send(front, m, n + 1);
        }
    }
    zmq_msg_close(&id);
    zmq_close(front);
    zmq_close(back);
    return NULL;
}

/* ---- client process ---- */

static snapshot_client_t *client_open(void *zctx, const char *endpoint, const char *name) {
    snapshot_client_options_t o;
    snapshot_client_options_init(&o);
    o.endpoint = endpoint;
    o.sender_id = name;
    o.net.chunk_bytes = E2E_CHUNK;
    o.net.linger_ms = 0;
    o.request_timeout_ms = E2E_TIMEOUT_MS;
    qerr_t err;
    snapshot_client_t *c = snapshot_client_new(zctx, &o, &err);
    E2E_CHECK(c, "%s", err.msg);
    return c;
}

/* Checks that s is version with the generator's bytes. */
static void expect_version(const snapshot_t *s, uint64_t version, const char *what) {
    E2E_CHECK(s, "%s: no snapshot", what);
    if (s == NULL)
        return;
    E2E_CHECK(snapshot_version(s) == version, "%s: version %llu, expected %llu", what,
              (unsigned long long)snapshot_version(s), (unsigned long long)version);
    size_t n = 0;
    const uint8_t *data = snapshot_data(s, &n);
    uint8_t *want = version_bytes(version);
    E2E_CHECK(n == E2E_LEN && memcmp(data, want, E2E_LEN) == 0, "%s: bytes differ from v%llu", what,
              (unsigned long long)version);
    E2E_CHECK(snapshot_tensor_count(s) == 1 && strcmp(snapshot_tensor(s, 0)->name, "blob") == 0,
              "%s: tensor table", what);
    free(want);
}

static snapshot_t *fetch(snapshot_client_t *c, uint64_t version, const snapshot_t *base,
                         const char *what) {
    qerr_t err = {0};
    snapshot_t *s = snapshot_client_fetch(c, version, base, E2E_FETCH_MS, &err);
    E2E_CHECK(s, "%s: %s", what, err.msg);
    return s;
}

static int command(FILE *to, FILE *from, const char *cmd, char *answer, size_t cap) {
    fprintf(to, "%s\n", cmd);
    fflush(to);
    if (answer == NULL)
        return 0;
    return fgets(answer, (int)cap, from) ? 0 : -1;
}

static int client_main(const char *self) {
    log_set_stderr(0);
    int in[2], out[2];
    if (pipe(in) != 0 || pipe(out) != 0)
        return perror("pipe"), 1;
    pid_t pid = fork();
    if (pid == 0) {
        dup2(in[0], STDIN_FILENO);
        dup2(out[1], STDOUT_FILENO);
        close(in[1]);
        close(out[0]);
        execl(self, self, "server", (char *)NULL);
        _exit(127);
    }
    if (pid < 0)
        return perror("fork"), 1;
    close(in[0]);
    close(out[1]);
    FILE *to = fdopen(in[1], "w"), *from = fdopen(out[0], "r");
    char endpoint[256], answer[256];
    if (fgets(endpoint, sizeof(endpoint), from) == NULL) {
        fprintf(stderr, "FAIL: the server printed no endpoint\n");
        return 1;
    }
    endpoint[strcspn(endpoint, "\n")] = '\0';

    void *zctx = zmq_ctx_new();
    proxy_t px = {.zctx = zctx, .back = endpoint};
    pthread_t th;
    pthread_create(&th, NULL, proxy_run, &px);
    while (!atomic_load(&px.ready))
        usleep(1000);
    snapshot_client_t *c = client_open(zctx, px.front, "e2e-worker");
    snapshot_client_stats_t st;

    /* 1. v1 in full, v2 as a delta, equal to a full pull of v2. */
    snapshot_t *v1 = fetch(c, 1, NULL, "v1 full");
    expect_version(v1, 1, "v1 full");
    E2E_CHECK(v1 && snapshot_is_old_policy(v1), "v1 was published as the old policy");
    snapshot_t *v2d = fetch(c, 2, v1, "v2 delta");
    expect_version(v2d, 2, "v2 delta");
    snapshot_client_stats(c, &st);
    E2E_CHECK(st.full_transfers == 1 && st.delta_transfers == 1, "full %llu delta %llu",
              (unsigned long long)st.full_transfers, (unsigned long long)st.delta_transfers);
    uint64_t delta_bytes = st.bytes - E2E_LEN;
    E2E_CHECK(delta_bytes > 0 && delta_bytes < E2E_LEN / 10, "the delta moved %llu bytes",
              (unsigned long long)delta_bytes);

    /* 2. A lost chunk is asked again: the full pull of v2 still arrives whole. */
    proxy_arm(&px, 3, 0);
    snapshot_t *v2f = fetch(c, 2, NULL, "v2 full with a lost chunk");
    expect_version(v2f, 2, "v2 full with a lost chunk");
    snapshot_client_stats(c, &st);
    E2E_CHECK(st.rerequests >= 1, "rerequests %llu", (unsigned long long)st.rerequests);
    E2E_CHECK(v2d && v2f && memcmp(snapshot_digest(v2d), snapshot_digest(v2f), 32) == 0,
              "delta and full pulls of v2 agree");

    /* 3. A corrupted chunk of the v3 delta fails the digest; the retry succeeds. */
    proxy_arm(&px, 0, 1);
    snapshot_t *v3 = fetch(c, 0, v2d, "v3 delta with a corrupted chunk");
    expect_version(v3, 3, "v3 delta with a corrupted chunk");
    snapshot_client_stats(c, &st);
    E2E_CHECK(st.digest_failures == 1, "digest_failures %llu",
              (unsigned long long)st.digest_failures);
    E2E_CHECK(st.delta_transfers == 3, "both attempts at v3 were deltas: %llu",
              (unsigned long long)st.delta_transfers);
    proxy_arm(&px, 0, 0);

    /* 4. A late joiner gets the latest in full. */
    snapshot_client_t *late = client_open(zctx, endpoint, "e2e-late");
    snapshot_t *l3 = fetch(late, 0, NULL, "late joiner");
    expect_version(l3, 3, "late joiner");
    snapshot_client_stats_t ls;
    snapshot_client_stats(late, &ls);
    E2E_CHECK(ls.full_transfers == 1 && ls.delta_transfers == 0,
              "late joiner: full %llu delta %llu", (unsigned long long)ls.full_transfers,
              (unsigned long long)ls.delta_transfers);

    /* 5. v4: v1 is evicted, v4 comes as a delta of v3. */
    E2E_CHECK(command(to, from, "publish", answer, sizeof(answer)) == 0 &&
                  strcmp(answer, "published 4\n") == 0,
              "server answered '%s'", answer);
    qerr_t err = {0};
    snapshot_t *gone = snapshot_client_fetch(c, 1, NULL, E2E_FETCH_MS, &err);
    E2E_CHECK(gone == NULL && err.code == QERR_NOTFOUND, "evicted v1: code %s: %s",
              qerr_code_name(err.code), err.msg);
    snapshot_unref(&gone);
    snapshot_t *v4 = fetch(late, 0, l3, "v4 delta");
    expect_version(v4, 4, "v4 delta");
    snapshot_client_stats(late, &ls);
    E2E_CHECK(ls.delta_transfers == 1, "v4 came as a delta: %llu",
              (unsigned long long)ls.delta_transfers);
    /* v1 is still usable here although the server evicted it: the worker holds it. */
    expect_version(v1, 1, "v1 held after eviction");

    /* 6. A chunk request past the end is counted as malformed and dropped. */
    net_options_t no;
    net_options_init(&no);
    no.chunk_bytes = E2E_CHUNK;
    no.linger_ms = 0;
    net_socket_spec_t spec = {.type = ZMQ_DEALER,
                              .protocol = WIRE_PROTOCOL_WEIGHTS,
                              .name = "raw",
                              .sender_id = "e2e-raw",
                              .incarnation_id = net_incarnation_new()};
    net_security_t sec = {NET_SECURITY_NONE};
    net_socket_t *raw = net_socket_new(zctx, &spec, &no, &sec, &err);
    E2E_CHECK(raw && net_socket_connect(raw, endpoint, &err) == 0, "%s", err.msg);
    Quillan__ChunkRequest cr = QUILLAN__CHUNK_REQUEST__INIT;
    cr.version = 4;
    cr.index = 1000000;
    Quillan__Envelope env = QUILLAN__ENVELOPE__INIT;
    env.body_case = QUILLAN__ENVELOPE__BODY_CHUNK_REQUEST;
    env.chunk_request = &cr;
    E2E_CHECK(raw && net_send(raw, NULL, &env, NULL, 0, NULL, &err) == 0, "%s", err.msg);
    unsigned long long malformed = 0, delta_infos = 0, chunks = 0;
    for (int i = 0; i < 100 && malformed == 0; i++) {
        usleep(20000);
        if (command(to, from, "stats", answer, sizeof(answer)) != 0 ||
            sscanf(answer, "malformed %llu delta_infos %llu chunks %llu", &malformed, &delta_infos,
                   &chunks) != 3)
            break;
    }
    E2E_CHECK(malformed == 1, "server counted %llu malformed requests", malformed);
    E2E_CHECK(delta_infos >= 4, "server answered %llu delta infos", delta_infos);

    command(to, from, "quit", NULL, 0);
    int status = 0;
    waitpid(pid, &status, 0);
    E2E_CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0, "server status %d", status);
    atomic_store(&px.stop, 1);
    pthread_join(th, NULL);
    net_socket_destroy(&raw);
    snapshot_client_destroy(&c);
    snapshot_client_destroy(&late);
    snapshot_unref(&v1);
    snapshot_unref(&v2d);
    snapshot_unref(&v2f);
    snapshot_unref(&v3);
    snapshot_unref(&l3);
    snapshot_unref(&v4);
    zmq_ctx_term(zctx);
    fclose(to);
    fclose(from);
    if (e2e_failures)
        fprintf(stderr, "%d check(s) failed\n", e2e_failures);
    return e2e_failures ? 1 : 0;
}

int main(int argc, char **argv) {
    if (argc == 2 && strcmp(argv[1], "server") == 0)
        return server_main();
    if (argc == 2 && strcmp(argv[1], "client") == 0)
        return client_main(argv[0]);
    fprintf(stderr, "usage: %s client|server\n", argv[0]);
    return 2;
}
