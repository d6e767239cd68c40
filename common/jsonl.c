#include "jsonl.h"

#include "json.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define FNV_OFFSET 0xcbf29ce484222325ULL
#define FNV_PRIME 0x100000001b3ULL
#define SCAN_BLOCK ((size_t)1 << 20)

void jsonl_example_free(jsonl_example_t *ex) {
    if (!ex)
        return;
    free(ex->prompt);
    free(ex->answer);
    free(ex->completion);
    for (size_t i = 0; i < ex->n_meta; i++) {
        free(ex->meta_keys[i]);
        free(ex->meta_values[i]);
    }
    free(ex->meta_keys);
    free(ex->meta_values);
    memset(ex, 0, sizeof *ex);
}

/* ---- Reader ---------------------------------------------------------------------------- */

struct jsonl_reader {
    char *path;
    int fd;
    size_t max_line;
    size_t n, cap;
    uint64_t *offsets; /* byte offset of line i+1 */
    uint32_t *lengths; /* its length without the '\n' (<= JSONL_MAX_LINE_LIMIT) */
    uint64_t fingerprint;
};

/* The index pass: line boundaries, blank lines, lengths. */
typedef struct {
    jsonl_reader_t *r;
    uint64_t start;       /* offset of the current line */
    uint64_t len;         /* bytes seen in it so far */
    int blank;            /* only white space so far */
    size_t line;          /* its 1-based number */
    size_t pending_blank; /* first blank line not yet followed by content, or 0 */
} scan_t;

static int index_push(jsonl_reader_t *r, uint64_t off, uint32_t len, qerr_t *err) {
    if (r->n == r->cap) {
        size_t cap = r->cap ? 2 * r->cap : 1024;
        uint64_t *o = realloc(r->offsets, cap * sizeof *o);
        if (o)
            r->offsets = o;
        uint32_t *l = realloc(r->lengths, cap * sizeof *l);
        if (l)
            r->lengths = l;
        if (!o || !l)
            return qerr_set(err, QERR_NOMEM, "%s: out of memory indexing lines", r->path);
        r->cap = cap;
    }
    r->offsets[r->n] = off;
    r->lengths[r->n] = len;
    r->n++;
    return 0;
}

static int scan_end_line(scan_t *s, qerr_t *err) {
    jsonl_reader_t *r = s->r;
    if (s->len > r->max_line)
        return qerr_set(err, QERR_RANGE, "%s:%zu: line is %llu bytes, longer than the limit of %zu",
                        r->path, s->line, (unsigned long long)s->len, r->max_line);
    if (s->blank) {
        if (!s->pending_blank)
            s->pending_blank = s->line;
        return 0;
    }
    if (s->pending_blank)
        return qerr_set(err, QERR_INVALID,
                        "%s:%zu: blank line inside the dataset (only the end may have blank lines)",
                        r->path, s->pending_blank);
    return index_push(r, s->start, (uint32_t)s->len, err);
}

static int scan_file(jsonl_reader_t *r, qerr_t *err) {
    unsigned char *buf = malloc(SCAN_BLOCK);
    if (!buf)
        return qerr_set(err, QERR_NOMEM, "%s: out of memory", r->path);
    scan_t s = {.r = r, .blank = 1, .line = 1};
    uint64_t pos = 0, h = FNV_OFFSET;
    int rc = 0;
    for (;;) {
        ssize_t got = read(r->fd, buf, SCAN_BLOCK);
        if (got < 0) {
            if (errno == EINTR)
                continue;
            rc = qerr_set(err, QERR_IO, "%s: read failed: %s", r->path, strerror(errno));
            break;
        }
        if (got == 0)
            break;
        for (ssize_t i = 0; i < got && rc == 0; i++) {
            unsigned char c = buf[i];
            h = (h ^ c) * FNV_PRIME;
            if (c == '\n') {
                rc = scan_end_line(&s, err);
                s.start = pos + (uint64_t)i + 1;
                s.len = 0;
                s.blank = 1;
                s.line++;
                continue;
            }
            s.len++;
            if (c != ' ' && c != '\t' && c != '\r')
                s.blank = 0;
        }
        if (rc < 0)
            break;
        pos += (uint64_t)got;
    }
    /* A last line without '\n'. */
    if (rc == 0 && s.len > 0)
        rc = scan_end_line(&s, err);
    if (rc == 0 && r->n == 0)
        rc = qerr_set(err, QERR_INVALID, "%s: empty dataset (no lines)", r->path);
    r->fingerprint = h;
    free(buf);
    return rc;
}

jsonl_reader_t *jsonl_reader_new(const char *path, size_t max_line_bytes, qerr_t *err) {
    if (max_line_bytes == 0)
        max_line_bytes = JSONL_MAX_LINE_DEFAULT;
    if (max_line_bytes > JSONL_MAX_LINE_LIMIT) {
        qerr_set(err, QERR_RANGE, "%s: max_line_bytes %zu exceeds the limit of %zu", path,
                 max_line_bytes, JSONL_MAX_LINE_LIMIT);
        return NULL;
    }
    jsonl_reader_t *r = calloc(1, sizeof *r);
    if (!r || !(r->path = strdup(path))) {
        free(r);
        qerr_set(err, QERR_NOMEM, "%s: out of memory", path);
        return NULL;
    }
    r->fd = -1;
    r->max_line = max_line_bytes;
    r->fd = open(path, O_RDONLY | O_CLOEXEC);
    if (r->fd < 0) {
        qerr_set(err, errno == ENOENT ? QERR_NOTFOUND : QERR_IO, "%s: cannot open: %s", path,
                 strerror(errno));
        jsonl_reader_destroy(&r);
        return NULL;
    }
    struct stat st;
    if (fstat(r->fd, &st) < 0 || !S_ISREG(st.st_mode)) {
        qerr_set(err, QERR_IO, "%s: not a regular file", path);
        jsonl_reader_destroy(&r);
        return NULL;
    }
    if (scan_file(r, err) < 0) {
        jsonl_reader_destroy(&r);
        return NULL;
    }
    return r;
}

void jsonl_reader_destroy(jsonl_reader_t **rp) {
    if (!rp || !*rp)
        return;
    jsonl_reader_t *r = *rp;
    if (r->fd >= 0)
        close(r->fd);
    free(r->offsets);
    free(r->lengths);
    free(r->path);
    free(r);
    *rp = NULL;
}

const char *jsonl_reader_path(const jsonl_reader_t *r) {
    return r->path;
}

size_t jsonl_reader_count(const jsonl_reader_t *r) {
    return r->n;
}

uint64_t jsonl_reader_fingerprint(const jsonl_reader_t *r) {
    return r->fingerprint;
}

json_t *jsonl_reader_object(const jsonl_reader_t *r, size_t index, qerr_t *err) {
    Q_ASSERT(index < r->n);
    size_t len = r->lengths[index];
    size_t line = index + 1;
    char *buf = malloc(len ? len : 1);
    if (!buf) {
        qerr_set(err, QERR_NOMEM, "%s:%zu: out of memory", r->path, line);
        return NULL;
    }
    size_t done = 0;
    while (done < len) {
        ssize_t got = pread(r->fd, buf + done, len - done, (off_t)(r->offsets[index] + done));
        if (got < 0 && errno == EINTR)
            continue;
        if (got <= 0) {
            qerr_set(err, QERR_IO, "%s:%zu: read failed: %s", r->path, line,
                     got < 0 ? strerror(errno) : "file shrank while open");
            free(buf);
            return NULL;
        }
        done += (size_t)got;
    }
    char where[QERR_MSG_MAX];
    snprintf(where, sizeof where, "%s:%zu", r->path, line);
    json_t *obj = qjson_parse(buf, len, where, err);
    free(buf);
    if (obj && !json_is_object(obj)) {
        qerr_set(err, QERR_PARSE, "%s: expected a JSON object, got %s", where,
                 qjson_type_name(obj));
        json_decref(obj);
        return NULL;
    }
    return obj;
}

static int cmp_cstr(const void *a, const void *b) {
    return strcmp(*(const char *const *)a, *(const char *const *)b);
}

static int fill_meta(jsonl_example_t *ex, json_t *obj, jsonl_task_t task, qerr_t *err) {
    size_t n = json_object_size(obj);
    ex->meta_keys = calloc(n ? n : 1, sizeof *ex->meta_keys);
    ex->meta_values = calloc(n ? n : 1, sizeof *ex->meta_values);
    if (!ex->meta_keys || !ex->meta_values)
        return qerr_set(err, QERR_NOMEM, "out of memory");
    const char *key;
    json_t *val;
    json_object_foreach(obj, key, val) {
        if (strcmp(key, "prompt") == 0 ||
            (task == JSONL_TASK_SFT && strcmp(key, "completion") == 0))
            continue;
        char *k = strdup(key);
        if (!k)
            return qerr_set(err, QERR_NOMEM, "out of memory");
        ex->meta_keys[ex->n_meta++] = k;
    }
    qsort(ex->meta_keys, ex->n_meta, sizeof *ex->meta_keys, cmp_cstr);
    for (size_t i = 0; i < ex->n_meta; i++) {
        ex->meta_values[i] = qjson_encode(json_object_get(obj, ex->meta_keys[i]), err);
        if (!ex->meta_values[i])
            return qerr_wrap(err, "field '%s'", ex->meta_keys[i]);
    }
    return 0;
}

static char *dup_or_fail(const char *s, qerr_t *err) {
    char *d = strdup(s);
    if (!d)
        qerr_set(err, QERR_NOMEM, "out of memory");
    return d;
}

int jsonl_reader_example(const jsonl_reader_t *r, size_t index, jsonl_task_t task,
                         jsonl_example_t *ex, qerr_t *err) {
    Q_ASSERT(task >= 0 && task < JSONL_TASK_COUNT);
    memset(ex, 0, sizeof *ex);
    ex->index = index;
    ex->line = index + 1;
    json_t *obj = jsonl_reader_object(r, index, err);
    if (!obj)
        return -1;
    int rc = -1;
    const char *prompt, *target = NULL;
    if (qjson_get_string(obj, "prompt", &prompt, err) < 0)
        goto out;
    if (task == JSONL_TASK_SFT && qjson_get_string(obj, "completion", &target, err) < 0)
        goto out;
    if (task == JSONL_TASK_RL && qjson_opt_string(obj, "answer", &target, err) < 0)
        goto out;
    if (!(ex->prompt = dup_or_fail(prompt, err)))
        goto out;
    if (target) {
        char *t = dup_or_fail(target, err);
        if (!t)
            goto out;
        if (task == JSONL_TASK_SFT)
            ex->completion = t;
        else
            ex->answer = t;
    }
    rc = fill_meta(ex, obj, task, err);
out:
    json_decref(obj);
    if (rc < 0) {
        jsonl_example_free(ex);
        return qerr_wrap(err, "%s:%zu", r->path, index + 1);
    }
    return 0;
}

int jsonl_reader_check(const jsonl_reader_t *r, jsonl_task_t task, qerr_t *err) {
    for (size_t i = 0; i < r->n; i++) {
        jsonl_example_t ex;
        if (jsonl_reader_example(r, i, task, &ex, err) < 0)
            return -1;
        jsonl_example_free(&ex);
    }
    return 0;
}

/* ---- Writer ---------------------------------------------------------------------------- */

struct jsonl_writer {
    char *path;
    FILE *f;
};

jsonl_writer_t *jsonl_writer_new(const char *path, jsonl_write_mode_t mode, qerr_t *err) {
    int flags =
        O_CREAT | O_CLOEXEC | (mode == JSONL_WRITE_APPEND ? O_RDWR | O_APPEND : O_WRONLY | O_TRUNC);
    int fd = open(path, flags, 0666);
    if (fd < 0) {
        qerr_set(err, QERR_IO, "%s: cannot open for writing: %s", path, strerror(errno));
        return NULL;
    }
    if (mode == JSONL_WRITE_APPEND) {
        struct stat st;
        unsigned char last = '\n';
        if (fstat(fd, &st) < 0 || (st.st_size > 0 && pread(fd, &last, 1, st.st_size - 1) != 1)) {
            qerr_set(err, QERR_IO, "%s: cannot read: %s", path, strerror(errno));
            close(fd);
            return NULL;
        }
        if (last != '\n') {
            qerr_set(err, QERR_INVALID,
                     "%s: does not end with a newline (a line cut short?); refusing to append",
                     path);
            close(fd);
            return NULL;
        }
    }
    jsonl_writer_t *w = calloc(1, sizeof *w);
    if (!w || !(w->path = strdup(path)) || !(w->f = fdopen(fd, "a"))) {
        qerr_set(err, QERR_NOMEM, "%s: out of memory", path);
        if (w)
            free(w->path);
        free(w);
        close(fd);
        return NULL;
    }
    return w;
}

int jsonl_writer_append(jsonl_writer_t *w, const json_t *obj, qerr_t *err) {
    if (!json_is_object(obj))
        return qerr_set(err, QERR_INVALID, "%s: a JSONL line must be an object, got %s", w->path,
                        obj ? qjson_type_name(obj) : "nothing");
    /* Compact output escapes control characters, so a line never holds a raw newline. */
    char *s = json_dumps(obj, JSON_COMPACT);
    if (!s)
        return qerr_set(err, QERR_INVALID, "%s: cannot encode the object as JSON", w->path);
    size_t len = strlen(s);
    int ok = fwrite(s, 1, len, w->f) == len && fputc('\n', w->f) != EOF;
    free(s);
    if (!ok)
        return qerr_set(err, QERR_IO, "%s: write failed: %s", w->path, strerror(errno));
    return 0;
}

int jsonl_writer_flush(jsonl_writer_t *w, qerr_t *err) {
    if (fflush(w->f) != 0 || fsync(fileno(w->f)) != 0)
        return qerr_set(err, QERR_IO, "%s: flush failed: %s", w->path, strerror(errno));
    return 0;
}

void jsonl_writer_destroy(jsonl_writer_t **wp) {
    if (!wp || !*wp)
        return;
    jsonl_writer_t *w = *wp;
    fclose(w->f);
    free(w->path);
    free(w);
    *wp = NULL;
}
