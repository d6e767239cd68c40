#include "log_file.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define LOG_FILE_LINE_STACK 4096

struct log_file {
    FILE *f;
    char *path;
    char *tmp; /* room for "PATH.<n>" */
    size_t tmp_cap;
    uint64_t size; /* bytes in the current file */
    uint64_t max_bytes;
    int keep;
    int registered; /* a log sink */
    log_file_stats_t stats;
};

static int file_open(log_file_t *f, qerr_t *err) {
    f->f = fopen(f->path, "ae");
    if (f->f == NULL)
        return qerr_set(err, QERR_IO, "log file '%s': cannot open: %s", f->path, strerror(errno));
    if (fseek(f->f, 0, SEEK_END) != 0) {
        fclose(f->f);
        f->f = NULL;
        return qerr_set(err, QERR_IO, "log file '%s': cannot seek: %s", f->path, strerror(errno));
    }
    long pos = ftell(f->f);
    f->size = pos > 0 ? (uint64_t)pos : 0;
    return 0;
}

static const char *rotated_name(log_file_t *f, int i) {
    snprintf(f->tmp, f->tmp_cap, "%s.%d", f->path, i);
    return f->tmp;
}

/* PATH.(keep-1) -> PATH.keep, ..., PATH -> PATH.1, then a fresh PATH. A missing older file is
 * normal (the first rotations); any other failure is reported. */
static int file_rotate(log_file_t *f, qerr_t *err) {
    fclose(f->f);
    f->f = NULL;
    if (f->keep == 0) {
        if (remove(f->path) != 0 && errno != ENOENT)
            return qerr_set(err, QERR_IO, "log file '%s': cannot remove: %s", f->path,
                            strerror(errno));
    } else {
        char *older = malloc(f->tmp_cap);
        if (older == NULL)
            return qerr_set(err, QERR_NOMEM, "log file '%s': out of memory", f->path);
        for (int i = f->keep - 1; i >= 1; i--) {
            snprintf(older, f->tmp_cap, "%s.%d", f->path, i + 1);
            if (rename(rotated_name(f, i), older) != 0 && errno != ENOENT) {
                int e = errno;
                qerr_set(err, QERR_IO, "log file '%s': cannot rename to '%s': %s", f->tmp, older,
                         strerror(e));
                free(older);
                return -1;
            }
        }
        free(older);
        if (rename(f->path, rotated_name(f, 1)) != 0 && errno != ENOENT)
            return qerr_set(err, QERR_IO, "log file '%s': cannot rename to '%s': %s", f->path,
                            f->tmp, strerror(errno));
    }
    f->stats.rotations++;
    return file_open(f, err);
}

log_file_t *log_file_new(const char *path, uint64_t max_bytes, int keep, qerr_t *err) {
    Q_ASSERT(path);
    if (path[0] == '\0') {
        qerr_set(err, QERR_INVALID, "log file: empty path");
        return NULL;
    }
    if (keep < 0 || keep > LOG_FILE_KEEP_MAX) {
        qerr_set(err, QERR_RANGE, "log file '%s': keep %d is outside [0, %d]", path, keep,
                 LOG_FILE_KEEP_MAX);
        return NULL;
    }
    log_file_t *f = calloc(1, sizeof *f);
    size_t n = strlen(path);
    if (f) {
        f->path = malloc(n + 1);
        f->tmp_cap = n + 16;
        f->tmp = malloc(f->tmp_cap);
    }
    if (f == NULL || f->path == NULL || f->tmp == NULL) {
        qerr_set(err, QERR_NOMEM, "log file '%s': out of memory", path);
        log_file_destroy(&f);
        return NULL;
    }
    memcpy(f->path, path, n + 1);
    f->max_bytes = max_bytes;
    f->keep = keep;
    if (file_open(f, err) != 0) {
        log_file_destroy(&f);
        return NULL;
    }
    return f;
}

static int write_line(log_file_t *f, const char *line, size_t n, qerr_t *err) {
    if (f->f == NULL && file_open(f, err) != 0) /* a failed rotation left no file: retry */
        return -1;
    if (f->max_bytes > 0 && f->size > 0 && f->size + n > f->max_bytes && file_rotate(f, err) != 0)
        return -1;
    if (fwrite(line, 1, n, f->f) != n || fflush(f->f) != 0) {
        clearerr(f->f);
        return qerr_set(err, QERR_IO, "log file '%s': write failed: %s", f->path, strerror(errno));
    }
    f->size += n;
    f->stats.records++;
    return 0;
}

int log_file_write(log_file_t *f, const log_record_t *rec, qerr_t *err) {
    char stack[LOG_FILE_LINE_STACK];
    char *line = stack;
    size_t n = log_record_format_json(rec, stack, sizeof stack);
    if (n >= sizeof stack) {
        line = malloc(n + 1);
        if (line == NULL) {
            f->stats.failures++;
            return qerr_set(err, QERR_NOMEM, "log file '%s': out of memory", f->path);
        }
        log_record_format_json(rec, line, n + 1);
    }
    int rc = write_line(f, line, n, err);
    if (line != stack)
        free(line);
    if (rc != 0)
        f->stats.failures++;
    return rc;
}

static void sink_fn(void *ctx, const log_record_t *rec) {
    log_file_write(ctx, rec, NULL); /* counted in the stats: a sink cannot log */
}

log_file_t *log_file_sink_new(const char *path, uint64_t max_bytes, int keep, qerr_t *err) {
    log_file_t *f = log_file_new(path, max_bytes, keep, err);
    if (f == NULL)
        return NULL;
    if (log_sink_add(sink_fn, f) != 0) {
        qerr_set(err, QERR_RANGE, "log file '%s': the log sink table is full", path);
        log_file_destroy(&f);
        return NULL;
    }
    f->registered = 1;
    return f;
}

const char *log_file_path(const log_file_t *f) {
    return f->path;
}

void log_file_stats(const log_file_t *f, log_file_stats_t *out) {
    *out = f->stats;
}

void log_file_destroy(log_file_t **fp) {
    if (fp == NULL || *fp == NULL)
        return;
    log_file_t *f = *fp;
    if (f->registered)
        log_sink_remove(sink_fn, f); /* waits for a sink call in progress (log lock) */
    if (f->f)
        fclose(f->f);
    free(f->path);
    free(f->tmp);
    free(f);
    *fp = NULL;
}
