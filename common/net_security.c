#include "net_security.h"

#include "log.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zmq.h>

/* How often the handler thread looks at its stop and reload flags. */
#define ZAP_POLL_MS 100
/* Allow-list files larger than this are refused (about 24 000 keys). */
#define ALLOW_LIST_MAX_BYTES ((size_t)1 << 20)
/* Keys held in an allow-list. */
#define ALLOW_LIST_MAX_KEYS 65536
/* Frames of a ZAP request kept: version, request id, domain, address, identity, mechanism,
 * one credential, and one more so an oversize request is recognised. */
#define ZAP_FRAMES 8
/* Refused keys remembered for log rate limiting. */
#define REFUSED_RING 64
#define ZAP_ENDPOINT "inproc://zeromq.zap.01"

/* ---- key files ---- */

/* The Z85 alphabet (ZeroMQ RFC 32). */
static int z85_char(int c) {
    return c > 0 && strchr("0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
                           ".-:+=^!/*?&<>()[]{}@%$#",
                           c) != NULL;
}

/* If line (len bytes, no newline) holds a key as its first token, decodes it into key (32
 * bytes) and returns 1; returns 0 for a comment or blank line, -1 for anything else. */
static int line_key(const char *line, size_t len, uint8_t key[32]) {
    size_t i = 0;
    while (i < len && (line[i] == ' ' || line[i] == '\t' || line[i] == '\r'))
        i++;
    size_t start = i;
    while (i < len && line[i] != ' ' && line[i] != '\t' && line[i] != '\r')
        i++;
    size_t tok = i - start;
    if (tok == 0)
        return 0;
    int z85 = tok == NET_KEY_Z85_LEN;
    for (size_t k = start; z85 && k < i; k++)
        z85 = z85_char((unsigned char)line[k]);
    if (z85) {
        char buf[NET_KEY_Z85_LEN + 1];
        memcpy(buf, line + start, NET_KEY_Z85_LEN);
        buf[NET_KEY_Z85_LEN] = '\0';
        if (zmq_z85_decode(key, buf) != NULL)
            return 1;
    }
    return line[start] == '#' ? 0 : -1;
}

long net_allow_list_parse(const char *text, size_t len, const char *name, uint8_t (*keys)[32],
                          size_t cap, qerr_t *err) {
    long n = 0;
    size_t pos = 0;
    for (int lineno = 1; pos < len; lineno++) {
        const char *nl = memchr(text + pos, '\n', len - pos);
        size_t l = nl ? (size_t)(nl - (text + pos)) : len - pos;
        uint8_t key[32];
        int r = line_key(text + pos, l, key);
        if (r < 0)
            return qerr_set(err, QERR_PARSE,
                            "%s:%d: not a key: a line holds a 40-character Z85 CURVE key "
                            "(quillan keygen), optionally followed by a label, or a # comment",
                            name, lineno);
        if (r == 1) {
            if (n >= ALLOW_LIST_MAX_KEYS)
                return qerr_set(err, QERR_RANGE, "%s:%d: more than %d keys", name, lineno,
                                ALLOW_LIST_MAX_KEYS);
            if (keys && (size_t)n < cap)
                memcpy(keys[n], key, 32);
            n++;
        }
        pos += l + (nl != NULL);
    }
    return n;
}

/* Reads the whole file (at most ALLOW_LIST_MAX_BYTES) into a NUL-terminated buffer. */
static char *file_read(const char *path, size_t *len, qerr_t *err) {
    FILE *f = fopen(path, "rb");
    if (f == NULL) {
        qerr_set(err, errno == ENOENT ? QERR_NOTFOUND : QERR_IO, "%s: %s", path, strerror(errno));
        return NULL;
    }
    char *buf = malloc(ALLOW_LIST_MAX_BYTES + 1);
    size_t n = buf ? fread(buf, 1, ALLOW_LIST_MAX_BYTES + 1, f) : 0;
    int bad = ferror(f);
    fclose(f);
    if (buf == NULL || bad || n > ALLOW_LIST_MAX_BYTES) {
        qerr_set(err,
                 buf == NULL ? QERR_NOMEM
                 : bad       ? QERR_IO
                             : QERR_RANGE,
                 "%s: %s", path,
                 buf == NULL ? "out of memory"
                 : bad       ? "read error"
                             : "larger than 1 MiB");
        free(buf);
        return NULL;
    }
    buf[n] = '\0';
    *len = n;
    return buf;
}

/* Reads up to 2 keys of a key file into keys; returns how many, or -1 with err. */
static long key_file_read(const char *path, uint8_t keys[2][32], qerr_t *err) {
    size_t len;
    char *text = file_read(path, &len, err);
    if (text == NULL)
        return -1;
    long n = net_allow_list_parse(text, len, path, keys, 2, err);
    free(text);
    if (n == 0)
        return qerr_set(err, QERR_PARSE, "%s: no key in the file", path);
    return n;
}

/* PATH minus a ".key" or ".pub" suffix, plus suffix. */
static int key_path(char *out, size_t cap, const char *path, const char *suffix, qerr_t *err) {
    size_t n = strlen(path);
    if (n >= 4 && (strcmp(path + n - 4, ".key") == 0 || strcmp(path + n - 4, ".pub") == 0))
        n -= 4;
    if (n == 0 || (size_t)snprintf(out, cap, "%.*s%s", (int)n, path, suffix) >= cap)
        return qerr_set(err, QERR_INVALID, "key path '%s' is empty or too long", path);
    return 0;
}

int net_keypair_generate(net_keypair_t *kp, qerr_t *err) {
    if (zmq_curve_keypair(kp->public_z85, kp->secret_z85) != 0)
        return qerr_set(err, QERR_IO, "zmq_curve_keypair: %s (libzmq built without CURVE?)",
                        zmq_strerror(zmq_errno()));
    return 0;
}

static int text_write(const char *path, mode_t mode, int exclusive, const char *text, qerr_t *err) {
    int fd = open(path, O_WRONLY | O_CREAT | O_CLOEXEC | (exclusive ? O_EXCL : O_TRUNC), mode);
    if (fd < 0)
        return qerr_set(err, QERR_IO, "%s: %s", path, strerror(errno));
    size_t len = strlen(text), off = 0;
    while (off < len) {
        ssize_t w = write(fd, text + off, len - off);
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0) {
            int e = errno;
            close(fd);
            return qerr_set(err, QERR_IO, "%s: %s", path, strerror(e));
        }
        off += (size_t)w;
    }
    /* An existing umask may have narrowed mode; fchmod makes it exact. */
    if (fchmod(fd, mode) != 0 || close(fd) != 0)
        return qerr_set(err, QERR_IO, "%s: %s", path, strerror(errno));
    return 0;
}

int net_keypair_write(const char *prefix, const net_keypair_t *kp, qerr_t *err) {
    char key[NET_SECURITY_PATH_MAX + 8], pub[NET_SECURITY_PATH_MAX + 8];
    if ((size_t)snprintf(key, sizeof key, "%s.key", prefix) >= sizeof key ||
        (size_t)snprintf(pub, sizeof pub, "%s.pub", prefix) >= sizeof pub)
        return qerr_set(err, QERR_INVALID, "key prefix '%s' is too long", prefix);
    char text[512];
    snprintf(text, sizeof text,
             "# Quillan CURVE secret key (line 1) and its public key (line 2): keep private\n"
             "%s\n%s\n",
             kp->secret_z85, kp->public_z85);
    if (text_write(key, 0600, 1, text, err) != 0)
        return -1;
    snprintf(text, sizeof text,
             "# Quillan CURVE public key: list it in the server's security.allow_list\n%s\n",
             kp->public_z85);
    return text_write(pub, 0644, 0, text, err);
}

int net_keypair_read(const char *path, net_keypair_t *kp, qerr_t *err) {
    char file[NET_SECURITY_PATH_MAX + 8];
    if (key_path(file, sizeof file, path, ".key", err) != 0)
        return -1;
    uint8_t keys[2][32];
    long n = key_file_read(file, keys, err);
    if (n < 0)
        return -1;
    if (n != 2)
        return qerr_set(err, QERR_PARSE,
                        "%s: a secret key file holds the secret key and then the public key "
                        "(quillan keygen); found %ld key(s)",
                        file, n);
    zmq_z85_encode(kp->secret_z85, keys[0], 32);
    zmq_z85_encode(kp->public_z85, keys[1], 32);
    char derived[NET_KEY_Z85_LEN + 1];
    if (zmq_curve_public(derived, kp->secret_z85) != 0 || strcmp(derived, kp->public_z85) != 0)
        return qerr_set(err, QERR_INVALID,
                        "%s: the public key on line 2 does not belong to the secret key", file);
    return 0;
}

int net_key_read_public(const char *path, char out[NET_KEY_Z85_LEN + 1], qerr_t *err) {
    char file[NET_SECURITY_PATH_MAX + 8];
    if (key_path(file, sizeof file, path, ".pub", err) != 0)
        return -1;
    if (access(file, F_OK) != 0) {
        net_keypair_t kp;
        if (net_keypair_read(path, &kp, NULL) == 0) {
            memcpy(out, kp.public_z85, sizeof kp.public_z85);
            return 0;
        }
    }
    uint8_t keys[2][32];
    long n = key_file_read(file, keys, err);
    if (n < 0)
        return -1;
    if (n != 1)
        return qerr_set(err, QERR_PARSE, "%s: a public key file holds one key; found %ld", file, n);
    zmq_z85_encode(out, keys[0], 32);
    return 0;
}

/* ---- the config's security section ---- */

static int keyed(qerr_t *err, const char *key) {
    return qerr_wrap(err, "%s", key);
}

int net_security_from_config(const quillan_config_t *cfg, net_role_t role, net_security_t *out,
                             qerr_t *err) {
    Q_ASSERT(cfg && out && (role & NET_ROLE_BOTH));
    *out = (net_security_t){.mode = NET_SECURITY_NONE, .bind_any = cfg->security.bind_any};
    const config_security_t *sc = &cfg->security;
    if (!sc->curve) {
        if (role & NET_ROLE_SERVER)
            log_emit(LOG_WARN, "net.security", NULL, 0,
                     "security.curve is off: plain TCP without authentication; servers bind %s",
                     sc->bind_any ? "wherever configured (security.bind_any)" : "loopback only");
        return 0;
    }
    out->mode = NET_SECURITY_CURVE;
    if (!sc->keys.server[0])
        return qerr_set(err, QERR_INVALID, "security.keys.server: security.curve needs it");
    if (role & NET_ROLE_SERVER) {
        net_keypair_t kp;
        if (net_keypair_read(sc->keys.server, &kp, err) != 0)
            return keyed(err, "security.keys.server");
        memcpy(out->server_public, kp.public_z85, sizeof out->server_public);
        memcpy(out->server_secret, kp.secret_z85, sizeof out->server_secret);
        if (!sc->allow_list[0])
            return qerr_set(err, QERR_INVALID,
                            "security.allow_list: a CURVE server needs the file of admitted client "
                            "public keys");
        size_t len;
        char *text = file_read(sc->allow_list, &len, err);
        if (text == NULL)
            return keyed(err, "security.allow_list");
        long n = net_allow_list_parse(text, len, sc->allow_list, NULL, 0, err);
        free(text);
        if (n < 0)
            return keyed(err, "security.allow_list");
        if ((size_t)snprintf(out->allow_list, sizeof out->allow_list, "%s", sc->allow_list) >=
            sizeof out->allow_list)
            return qerr_set(err, QERR_INVALID, "security.allow_list: path too long");
    }
    if (role & NET_ROLE_CLIENT) {
        if (!(role & NET_ROLE_SERVER) &&
            net_key_read_public(sc->keys.server, out->server_public, err) != 0)
            return keyed(err, "security.keys.server");
        if (!sc->keys.client[0])
            return qerr_set(err, QERR_INVALID,
                            "security.keys.client: a CURVE client needs its own key pair "
                            "(quillan keygen)");
        net_keypair_t kp;
        if (net_keypair_read(sc->keys.client, &kp, err) != 0)
            return keyed(err, "security.keys.client");
        memcpy(out->client_public, kp.public_z85, sizeof out->client_public);
        memcpy(out->client_secret, kp.secret_z85, sizeof out->client_secret);
    }
    return 0;
}

/* ---- the ZAP handler ---- */

typedef struct {
    uint8_t key[32];
    uint64_t count;
} refused_t;

typedef struct zap {
    struct zap *next;
    void *zctx;
    void *rep;
    int refs;
    pthread_t thread;
    atomic_bool stop;
    char path[NET_SECURITY_PATH_MAX];
    uint8_t (*keys)[32]; /* sorted; the thread's alone once it runs */
    size_t n_keys;
    unsigned seen_gen;
    refused_t refused_ring[REFUSED_RING];
    size_t refused_next;
    atomic_uint_fast64_t admitted, refused, malformed, reloads, reload_failed, n_keys_now;
} zap_t;

static pthread_mutex_t zap_lock = PTHREAD_MUTEX_INITIALIZER;
static zap_t *zap_list;
static atomic_uint reload_gen;
static bool sighup_checked;

void net_zap_request_reload(void) {
    atomic_fetch_add(&reload_gen, 1u);
}

static void on_sighup(int sig) {
    (void)sig;
    net_zap_request_reload();
}

static int key_cmp(const void *a, const void *b) {
    return memcmp(a, b, 32);
}

/* Loads the allow-list into *keys (sorted). Returns the key count, or -1 with err. */
static long allow_list_load(const char *path, uint8_t (**keys)[32], qerr_t *err) {
    size_t len;
    char *text = file_read(path, &len, err);
    if (text == NULL)
        return -1;
    long n = net_allow_list_parse(text, len, path, NULL, 0, err);
    uint8_t(*k)[32] = NULL;
    if (n >= 0) {
        k = malloc((size_t)(n > 0 ? n : 1) * 32);
        if (k == NULL)
            n = qerr_set(err, QERR_NOMEM, "%s: out of memory", path);
        else
            net_allow_list_parse(text, len, path, k, (size_t)n, NULL);
    }
    free(text);
    if (n < 0) {
        free(k);
        return -1;
    }
    qsort(k, (size_t)n, 32, key_cmp);
    *keys = k;
    return n;
}

static void zap_reload(zap_t *z) {
    uint8_t(*keys)[32] = NULL;
    qerr_t e;
    long n = allow_list_load(z->path, &keys, &e);
    if (n < 0) {
        atomic_fetch_add(&z->reload_failed, 1);
        log_emit(LOG_ERROR, "net.zap.reload", NULL, 0,
                 "allow-list reload failed, the previous %zu key(s) stay in force: %s", z->n_keys,
                 e.msg);
        return;
    }
    free(z->keys);
    z->keys = keys;
    z->n_keys = (size_t)n;
    atomic_store(&z->n_keys_now, (uint64_t)n);
    atomic_fetch_add(&z->reloads, 1);
    log_field_t f = {"keys", (double)n};
    log_emit(LOG_INFO, "net.zap.reload", &f, 1, "allow-list %s reloaded: %ld key(s)", z->path, n);
}

/* Whether this refusal of key is logged: a key's first three refusals, then powers of two. */
static bool refusal_logged(zap_t *z, const uint8_t key[32], uint64_t *count) {
    refused_t *r = NULL;
    for (size_t i = 0; i < REFUSED_RING && r == NULL; i++)
        if (z->refused_ring[i].count && memcmp(z->refused_ring[i].key, key, 32) == 0)
            r = &z->refused_ring[i];
    if (r == NULL) {
        r = &z->refused_ring[z->refused_next];
        z->refused_next = (z->refused_next + 1) % REFUSED_RING;
        memcpy(r->key, key, 32);
        r->count = 0;
    }
    uint64_t n = ++r->count;
    *count = n;
    return n <= 3 || (n & (n - 1)) == 0;
}

static void frame_str(zmq_msg_t *f, char *out, size_t cap) {
    size_t n = zmq_msg_size(f);
    if (n >= cap)
        n = cap - 1;
    memcpy(out, zmq_msg_data(f), n);
    out[n] = '\0';
    for (size_t i = 0; i < n; i++)
        if ((unsigned char)out[i] < 0x20 || (unsigned char)out[i] > 0x7e)
            out[i] = '?';
}

static void zap_reply(zap_t *z, zmq_msg_t *request_id, const char *code, const char *text,
                      const char *user_id) {
    const char *parts[] = {"1.0", NULL, code, text, user_id, ""};
    for (int i = 0; i < 6; i++) {
        zmq_msg_t f;
        if (i == 1) {
            zmq_msg_init(&f);
            if (request_id)
                zmq_msg_copy(&f, request_id);
        } else {
            size_t n = strlen(parts[i]);
            zmq_msg_init_size(&f, n);
            memcpy(zmq_msg_data(&f), parts[i], n);
        }
        if (zmq_msg_send(&f, z->rep, i < 5 ? ZMQ_SNDMORE : 0) < 0)
            zmq_msg_close(&f);
    }
}

/* Answers one ZAP request (RFC 27): version, request id, domain, address, identity, mechanism,
 * credentials. */
static void zap_serve(zap_t *z) {
    zmq_msg_t f[ZAP_FRAMES];
    int kept = 0, total = 0, more = 1;
    while (more) {
        zmq_msg_t m;
        zmq_msg_init(&m);
        if (zmq_msg_recv(&m, z->rep, total == 0 ? ZMQ_DONTWAIT : 0) < 0) {
            zmq_msg_close(&m);
            break;
        }
        more = zmq_msg_more(&m);
        if (kept < ZAP_FRAMES)
            f[kept++] = m;
        else
            zmq_msg_close(&m);
        total++;
    }
    if (total == 0)
        return;
    char address[64] = "?", mechanism[16] = "";
    if (kept >= 4)
        frame_str(&f[3], address, sizeof address);
    if (kept >= 6)
        frame_str(&f[5], mechanism, sizeof mechanism);
    int well_formed = total >= 6 && total < ZAP_FRAMES && zmq_msg_size(&f[0]) == 3 &&
                      memcmp(zmq_msg_data(&f[0]), "1.0", 3) == 0;
    if (!well_formed) {
        atomic_fetch_add(&z->malformed, 1);
        zap_reply(z, kept >= 2 ? &f[1] : NULL, "500", "malformed ZAP request", "");
    } else if (strcmp(mechanism, "CURVE") != 0 || total != 7 || zmq_msg_size(&f[6]) != 32) {
        uint64_t n = atomic_fetch_add(&z->refused, 1) + 1;
        log_field_t fl = {"refused", (double)n};
        log_emit(LOG_WARN, "net.zap.refused", &fl, 1,
                 "connection from %s refused: mechanism %s, a CURVE key is required", address,
                 mechanism);
        zap_reply(z, &f[1], "400", "CURVE required", "");
    } else {
        const uint8_t *key = zmq_msg_data(&f[6]);
        char z85[NET_KEY_Z85_LEN + 1];
        zmq_z85_encode(z85, key, 32);
        if (bsearch(key, z->keys, z->n_keys, 32, key_cmp) != NULL) {
            atomic_fetch_add(&z->admitted, 1);
            zap_reply(z, &f[1], "200", "OK", z85);
        } else {
            uint64_t n = atomic_fetch_add(&z->refused, 1) + 1, this_key;
            if (refusal_logged(z, key, &this_key)) {
                log_field_t fl[2] = {{"refused", (double)n}, {"key_refusals", (double)this_key}};
                log_emit(LOG_WARN, "net.zap.refused", fl, 2,
                         "connection from %s refused: CURVE key %s is not in the allow-list %s",
                         address, z85, z->path);
            }
            zap_reply(z, &f[1], "400", "key not allowed", "");
        }
    }
    for (int i = 0; i < kept; i++)
        zmq_msg_close(&f[i]);
}

static void *zap_main(void *arg) {
    zap_t *z = arg;
    while (!atomic_load(&z->stop)) {
        unsigned gen = atomic_load(&reload_gen);
        if (gen != z->seen_gen) {
            z->seen_gen = gen;
            zap_reload(z);
        }
        zmq_pollitem_t item = {z->rep, 0, ZMQ_POLLIN, 0};
        int rc = zmq_poll(&item, 1, ZAP_POLL_MS);
        if (rc < 0 && zmq_errno() != EINTR)
            break; /* context terminated */
        if (rc > 0)
            zap_serve(z);
    }
    return NULL;
}

static void zap_free(zap_t *z) {
    if (z->rep)
        zmq_close(z->rep);
    free(z->keys);
    free(z);
}

/* With SIGHUP still at its default (terminate), installs the reload handler. */
static void sighup_install(void) {
    if (sighup_checked)
        return;
    sighup_checked = true;
    struct sigaction cur;
    if (sigaction(SIGHUP, NULL, &cur) != 0 || cur.sa_handler != SIG_DFL ||
        (cur.sa_flags & SA_SIGINFO))
        return;
    struct sigaction sa = {0};
    sa.sa_handler = on_sighup;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = SA_RESTART;
    sigaction(SIGHUP, &sa, NULL);
}

int net_zap_acquire(void *zctx, const char *allow_list, qerr_t *err) {
    Q_ASSERT(zctx && allow_list);
    pthread_mutex_lock(&zap_lock);
    for (zap_t *z = zap_list; z; z = z->next) {
        if (z->zctx != zctx)
            continue;
        int rc = 0;
        if (strcmp(z->path, allow_list) != 0)
            rc = qerr_set(err, QERR_INVALID,
                          "security.allow_list: %s differs from %s, which the ZAP handler of this "
                          "context already serves",
                          allow_list, z->path);
        else
            z->refs++;
        pthread_mutex_unlock(&zap_lock);
        return rc;
    }
    zap_t *z = calloc(1, sizeof *z);
    int rc = -1;
    if (z == NULL) {
        qerr_set(err, QERR_NOMEM, "ZAP handler: out of memory");
        goto out;
    }
    snprintf(z->path, sizeof z->path, "%s", allow_list);
    z->seen_gen = atomic_load(&reload_gen);
    long n = allow_list_load(allow_list, &z->keys, err);
    if (n < 0) {
        qerr_wrap(err, "security.allow_list");
        zap_free(z);
        goto out;
    }
    z->n_keys = (size_t)n;
    atomic_init(&z->n_keys_now, (uint64_t)n);
    atomic_init(&z->stop, false);
    z->zctx = zctx;
    z->rep = zmq_socket(zctx, ZMQ_REP);
    int zero = 0;
    if (z->rep == NULL || zmq_setsockopt(z->rep, ZMQ_LINGER, &zero, sizeof zero) != 0 ||
        zmq_bind(z->rep, ZAP_ENDPOINT) != 0) {
        qerr_set(err, QERR_IO, "ZAP handler: binding %s: %s", ZAP_ENDPOINT,
                 zmq_strerror(zmq_errno()));
        zap_free(z);
        goto out;
    }
    if (pthread_create(&z->thread, NULL, zap_main, z) != 0) {
        qerr_set(err, QERR_IO, "ZAP handler: cannot start its thread");
        zap_free(z);
        goto out;
    }
    z->refs = 1;
    z->next = zap_list;
    zap_list = z;
    sighup_install();
    log_field_t f = {"keys", (double)n};
    log_emit(LOG_INFO, "net.zap.start", &f, 1, "ZAP handler admits the %ld key(s) of %s", n,
             allow_list);
    rc = 0;
out:
    pthread_mutex_unlock(&zap_lock);
    return rc;
}

void net_zap_release(void *zctx) {
    pthread_mutex_lock(&zap_lock);
    zap_t **pp = &zap_list;
    while (*pp && (*pp)->zctx != zctx)
        pp = &(*pp)->next;
    zap_t *z = *pp;
    if (z && --z->refs == 0)
        *pp = z->next;
    else
        z = NULL;
    pthread_mutex_unlock(&zap_lock);
    if (z == NULL)
        return;
    atomic_store(&z->stop, true);
    pthread_join(z->thread, NULL);
    zap_free(z);
}

int net_zap_stats(void *zctx, net_zap_stats_t *out) {
    int rc = -1;
    pthread_mutex_lock(&zap_lock);
    for (zap_t *z = zap_list; z; z = z->next) {
        if (z->zctx != zctx)
            continue;
        *out = (net_zap_stats_t){
            .admitted = atomic_load(&z->admitted),
            .refused = atomic_load(&z->refused),
            .malformed = atomic_load(&z->malformed),
            .reloads = atomic_load(&z->reloads),
            .reload_failed = atomic_load(&z->reload_failed),
            .keys = atomic_load(&z->n_keys_now),
        };
        rc = 0;
        break;
    }
    pthread_mutex_unlock(&zap_lock);
    return rc;
}
