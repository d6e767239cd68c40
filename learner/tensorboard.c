#include "tensorboard.h"

#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define TB_FILE_VERSION "brain.Event:2"
#define TB_CRC_MASK_DELTA 0xa282ead8u
#define TB_PATH_MAX 4096

/* ---- CRC-32C ---- */

static uint32_t crc_table[256];
static pthread_once_t crc_once = PTHREAD_ONCE_INIT;

static void crc_table_init(void) {
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++)
            c = (c & 1) ? (c >> 1) ^ 0x82F63B78u : c >> 1;
        crc_table[i] = c;
    }
}

uint32_t tensorboard_crc32c(uint32_t crc, const void *data, size_t n) {
    pthread_once(&crc_once, crc_table_init);
    const uint8_t *p = data;
    uint32_t c = ~crc;
    for (size_t i = 0; i < n; i++)
        c = crc_table[(c ^ p[i]) & 0xff] ^ (c >> 8);
    return ~c;
}

uint32_t tensorboard_crc_mask(uint32_t crc) {
    return ((crc >> 15) | (crc << 17)) + TB_CRC_MASK_DELTA;
}

static void put_le32(uint8_t *p, uint32_t v) {
    for (int i = 0; i < 4; i++)
        p[i] = (uint8_t)(v >> (8 * i));
}

static void put_le64(uint8_t *p, uint64_t v) {
    for (int i = 0; i < 8; i++)
        p[i] = (uint8_t)(v >> (8 * i));
}

size_t tensorboard_record_frame(uint8_t *out, const void *data, size_t n) {
    put_le64(out, (uint64_t)n);
    put_le32(out + 8, tensorboard_crc_mask(tensorboard_crc32c(0, out, 8)));
    memcpy(out + 12, data, n);
    put_le32(out + 12 + n, tensorboard_crc_mask(tensorboard_crc32c(0, data, n)));
    return n + 16;
}

/* ---- protobuf encoding of Event/Summary/Value ---- */

/* A growable byte buffer; failed growth sets oom and later appends do nothing. */
typedef struct {
    uint8_t *p;
    size_t len, cap;
    int oom;
} pbuf_t;

static void pb_reserve(pbuf_t *b, size_t extra) {
    if (b->oom || b->len + extra <= b->cap)
        return;
    size_t cap = b->cap ? b->cap : 256;
    while (cap < b->len + extra)
        cap *= 2;
    uint8_t *p = realloc(b->p, cap);
    if (p == NULL) {
        b->oom = 1;
        return;
    }
    b->p = p;
    b->cap = cap;
}

static void pb_bytes(pbuf_t *b, const void *data, size_t n) {
    pb_reserve(b, n);
    if (b->oom)
        return;
    memcpy(b->p + b->len, data, n);
    b->len += n;
}

static size_t varint_len(uint64_t v) {
    size_t n = 1;
    while (v >= 0x80) {
        v >>= 7;
        n++;
    }
    return n;
}

static void pb_varint(pbuf_t *b, uint64_t v) {
    uint8_t tmp[10];
    size_t n = 0;
    while (v >= 0x80) {
        tmp[n++] = (uint8_t)(v | 0x80);
        v >>= 7;
    }
    tmp[n++] = (uint8_t)v;
    pb_bytes(b, tmp, n);
}

/* Wire types: 0 varint, 1 fixed64, 2 length-delimited, 5 fixed32. */
static void pb_key(pbuf_t *b, unsigned field, unsigned wire_type) {
    pb_varint(b, ((uint64_t)field << 3) | wire_type);
}

static void pb_double(pbuf_t *b, unsigned field, double v) {
    uint64_t u;
    memcpy(&u, &v, sizeof u);
    uint8_t tmp[8];
    put_le64(tmp, u);
    pb_key(b, field, 1);
    pb_bytes(b, tmp, 8);
}

static void pb_float(pbuf_t *b, unsigned field, float v) {
    uint32_t u;
    memcpy(&u, &v, sizeof u);
    uint8_t tmp[4];
    put_le32(tmp, u);
    pb_key(b, field, 5);
    pb_bytes(b, tmp, 4);
}

static void pb_string(pbuf_t *b, unsigned field, const char *s) {
    size_t n = strlen(s);
    pb_key(b, field, 2);
    pb_varint(b, n);
    pb_bytes(b, s, n);
}

/* Size of Value{tag = 1, simple_value = 2}. */
static size_t value_len(const char *tag) {
    size_t n = strlen(tag);
    return 1 + varint_len(n) + n + 1 + 4;
}

/* Event{wall_time, step, summary{value...}} or, with names == NULL, Event{wall_time,
 * file_version}. */
static void event_encode(pbuf_t *b, int64_t step, double wall_time, const char *const names[],
                         const double values[], size_t n) {
    pb_double(b, 1, wall_time);
    if (names == NULL) {
        pb_string(b, 3, TB_FILE_VERSION);
        return;
    }
    if (step != 0) { /* proto3: a zero scalar is not written */
        pb_key(b, 2, 0);
        pb_varint(b, (uint64_t)step);
    }
    size_t summary = 0;
    for (size_t i = 0; i < n; i++) {
        size_t v = value_len(names[i]);
        summary += 1 + varint_len(v) + v;
    }
    pb_key(b, 5, 2);
    pb_varint(b, summary);
    for (size_t i = 0; i < n; i++) {
        pb_key(b, 1, 2);
        pb_varint(b, value_len(names[i]));
        pb_string(b, 1, names[i]);
        pb_float(b, 2, (float)values[i]);
    }
}

/* ---- writer ---- */

struct tensorboard_writer {
    FILE *f;
    char path[TB_PATH_MAX];
    tensorboard_stats_t stats;
    pbuf_t ev, rec; /* reused between events */
};

/* mkdir -p; returns 0 or -1 with errno. */
static int mkdir_parents(const char *dir) {
    char tmp[TB_PATH_MAX];
    size_t n = strlen(dir);
    if (n == 0 || n >= sizeof tmp) {
        errno = ENAMETOOLONG;
        return -1;
    }
    memcpy(tmp, dir, n + 1);
    for (size_t i = 1; i <= n; i++) {
        if (tmp[i] != '/' && tmp[i] != '\0')
            continue;
        char c = tmp[i];
        tmp[i] = '\0';
        if (mkdir(tmp, 0755) != 0 && errno != EEXIST)
            return -1;
        tmp[i] = c;
    }
    struct stat st;
    if (stat(dir, &st) != 0)
        return -1;
    if (!S_ISDIR(st.st_mode)) {
        errno = ENOTDIR;
        return -1;
    }
    return 0;
}

/* Frames and writes the encoded event in w->ev, then flushes. */
static int event_flush(tensorboard_writer_t *w, qerr_t *err) {
    if (w->ev.oom) {
        w->stats.failures++;
        return qerr_set(err, QERR_NOMEM, "tensorboard: out of memory");
    }
    w->rec.len = 0;
    pb_reserve(&w->rec, w->ev.len + 16);
    if (w->rec.oom) {
        w->rec.oom = 0;
        w->stats.failures++;
        return qerr_set(err, QERR_NOMEM, "tensorboard: out of memory");
    }
    size_t n = tensorboard_record_frame(w->rec.p, w->ev.p, w->ev.len);
    if (fwrite(w->rec.p, 1, n, w->f) != n || fflush(w->f) != 0) {
        w->stats.failures++;
        clearerr(w->f);
        return qerr_set(err, QERR_IO, "tensorboard: %s: write failed: %s", w->path,
                        strerror(errno));
    }
    w->stats.events++;
    return 0;
}

tensorboard_writer_t *tensorboard_writer_new(const char *dir, qerr_t *err) {
    Q_ASSERT(dir);
    if (mkdir_parents(dir) != 0) {
        qerr_set(err, QERR_IO, "tensorboard: cannot create directory '%s': %s", dir,
                 strerror(errno));
        return NULL;
    }
    tensorboard_writer_t *w = calloc(1, sizeof *w);
    if (w == NULL) {
        qerr_set(err, QERR_NOMEM, "tensorboard: out of memory");
        return NULL;
    }
    char host[256] = "localhost";
    if (gethostname(host, sizeof host) != 0)
        snprintf(host, sizeof host, "localhost");
    host[sizeof host - 1] = '\0';
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    /* O_EXCL: two writers started in the same second never share a file. */
    int fd = -1;
    for (int k = 0; k < 1000 && fd < 0; k++) {
        int len = k == 0 ? snprintf(w->path, sizeof w->path, "%s/events.out.tfevents.%lld.%s", dir,
                                    (long long)ts.tv_sec, host)
                         : snprintf(w->path, sizeof w->path, "%s/events.out.tfevents.%lld.%s.%d",
                                    dir, (long long)ts.tv_sec, host, k);
        if (len < 0 || (size_t)len >= sizeof w->path) {
            free(w);
            qerr_set(err, QERR_IO, "tensorboard: directory name too long: '%s'", dir);
            return NULL;
        }
        fd = open(w->path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
        if (fd < 0 && errno != EEXIST)
            break;
    }
    if (fd < 0 || (w->f = fdopen(fd, "wb")) == NULL) {
        qerr_set(err, QERR_IO, "tensorboard: cannot create '%s': %s", w->path, strerror(errno));
        if (fd >= 0)
            close(fd);
        free(w);
        return NULL;
    }
    event_encode(&w->ev, 0, (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9, NULL, NULL, 0);
    if (event_flush(w, err) != 0) {
        tensorboard_writer_destroy(&w);
        return NULL;
    }
    return w;
}

const char *tensorboard_writer_path(const tensorboard_writer_t *w) {
    return w->path;
}

int tensorboard_write_scalars(tensorboard_writer_t *w, int64_t step, double wall_time,
                              const char *const names[], const double values[], size_t n,
                              qerr_t *err) {
    Q_ASSERT(w && (n == 0 || (names && values)));
    for (size_t i = 0; i < n; i++) {
        if (names[i] == NULL || names[i][0] == '\0') {
            w->stats.failures++;
            return qerr_set(err, QERR_INVALID, "tensorboard: scalar %zu has no name", i);
        }
    }
    w->ev.len = 0;
    w->ev.oom = 0;
    event_encode(&w->ev, step, wall_time, names, values, n);
    return event_flush(w, err);
}

void tensorboard_writer_stats(const tensorboard_writer_t *w, tensorboard_stats_t *out) {
    *out = w->stats;
}

void tensorboard_writer_destroy(tensorboard_writer_t **wp) {
    if (wp == NULL || *wp == NULL)
        return;
    tensorboard_writer_t *w = *wp;
    if (w->f)
        fclose(w->f);
    free(w->ev.p);
    free(w->rec.p);
    free(w);
    *wp = NULL;
}

/* ---- records ---- */

/* Records with up to this many fields are converted without a heap allocation (learner.step
 * has about 50). */
#define TB_STACK_FIELDS 128

int tensorboard_write_record(tensorboard_writer_t *w, const log_record_t *rec, qerr_t *err) {
    if (rec->event == NULL ||
        (strcmp(rec->event, "learner.step") != 0 && strcmp(rec->event, "eval") != 0))
        return 0;
    double step = NAN;
    for (size_t i = 0; i < rec->n_fields; i++)
        if (rec->fields[i].key && strcmp(rec->fields[i].key, "step") == 0)
            step = rec->fields[i].value;
    if (!isfinite(step) || step < 0 || step > 9.0e18)
        return 0;
    const char *stack_names[TB_STACK_FIELDS];
    double stack_values[TB_STACK_FIELDS];
    const char **names = stack_names;
    double *values = stack_values;
    if (rec->n_fields > TB_STACK_FIELDS) {
        names = malloc(rec->n_fields * sizeof *names);
        values = malloc(rec->n_fields * sizeof *values);
        if (names == NULL || values == NULL) {
            free(names);
            free(values);
            w->stats.failures++;
            return qerr_set(err, QERR_NOMEM, "tensorboard: out of memory");
        }
    }
    size_t n = 0;
    for (size_t i = 0; i < rec->n_fields; i++) {
        const char *k = rec->fields[i].key;
        if (k == NULL || k[0] == '\0' || strcmp(k, "step") == 0)
            continue;
        names[n] = k;
        values[n++] = rec->fields[i].value;
    }
    int rc = tensorboard_write_scalars(w, (int64_t)step, rec->time, names, values, n, err);
    if (names != stack_names) {
        free(names);
        free(values);
    }
    return rc == 0 ? 1 : -1;
}

struct tensorboard_sink {
    tensorboard_writer_t *w;
};

static void sink_fn(void *ctx, const log_record_t *rec) {
    tensorboard_sink_t *s = ctx;
    tensorboard_write_record(s->w, rec, NULL); /* failures are counted in the writer's stats */
}

tensorboard_sink_t *tensorboard_sink_new(const char *dir, qerr_t *err) {
    tensorboard_sink_t *s = calloc(1, sizeof *s);
    if (s == NULL) {
        qerr_set(err, QERR_NOMEM, "tensorboard: out of memory");
        return NULL;
    }
    s->w = tensorboard_writer_new(dir, err);
    if (s->w == NULL) {
        free(s);
        return NULL;
    }
    if (log_sink_add(sink_fn, s) != 0) {
        qerr_set(err, QERR_RANGE, "tensorboard: the log sink table is full");
        tensorboard_writer_destroy(&s->w);
        free(s);
        return NULL;
    }
    return s;
}

tensorboard_writer_t *tensorboard_sink_writer(tensorboard_sink_t *s) {
    return s->w;
}

void tensorboard_sink_destroy(tensorboard_sink_t **sp) {
    if (sp == NULL || *sp == NULL)
        return;
    tensorboard_sink_t *s = *sp;
    log_sink_remove(sink_fn, s); /* waits for a sink call in progress: it holds the log lock */
    tensorboard_writer_destroy(&s->w);
    free(s);
    *sp = NULL;
}
