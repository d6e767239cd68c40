#include "log.h"

#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>
#include <unistd.h>

#define LOG_SINKS_MAX 8
#define LOG_LINE_MAX 8192

static struct {
    pthread_mutex_t lock;
    log_level_t level;
    int to_stderr;
    char process[64];
    char host[256];
    struct {
        log_sink_fn fn;
        void *ctx;
    } sinks[LOG_SINKS_MAX];
    size_t n_sinks;
} g_log = {
    .lock = PTHREAD_MUTEX_INITIALIZER,
    .level = LOG_INFO,
    .to_stderr = 1,
    .process = "quillan",
    .host = "",
};

static const char *const level_names[LOG_LEVEL_COUNT] = {"debug", "info", "warn", "error"};

void log_init(const char *process) {
    pthread_mutex_lock(&g_log.lock);
    snprintf(g_log.process, sizeof g_log.process, "%s", process ? process : "quillan");
    if (gethostname(g_log.host, sizeof g_log.host) != 0)
        snprintf(g_log.host, sizeof g_log.host, "unknown");
    g_log.host[sizeof g_log.host - 1] = '\0';
    pthread_mutex_unlock(&g_log.lock);
}

void log_set_level(log_level_t level) {
    g_log.level = level;
}
log_level_t log_get_level(void) {
    return g_log.level;
}
void log_set_stderr(int enabled) {
    g_log.to_stderr = enabled;
}

int log_enabled(log_level_t level) {
    return level >= g_log.level;
}

int log_level_parse(const char *name, log_level_t *out) {
    for (int i = 0; i < LOG_LEVEL_COUNT; i++) {
        if (name && strcmp(name, level_names[i]) == 0) {
            *out = (log_level_t)i;
            return 0;
        }
    }
    return -1;
}

const char *log_level_name(log_level_t level) {
    return (level >= 0 && level < LOG_LEVEL_COUNT) ? level_names[level] : "unknown";
}

int log_sink_add(log_sink_fn fn, void *ctx) {
    int rc = -1;
    pthread_mutex_lock(&g_log.lock);
    if (g_log.n_sinks < LOG_SINKS_MAX) {
        g_log.sinks[g_log.n_sinks].fn = fn;
        g_log.sinks[g_log.n_sinks].ctx = ctx;
        g_log.n_sinks++;
        rc = 0;
    }
    pthread_mutex_unlock(&g_log.lock);
    return rc;
}

void log_sink_remove(log_sink_fn fn, void *ctx) {
    pthread_mutex_lock(&g_log.lock);
    for (size_t i = 0; i < g_log.n_sinks; i++) {
        if (g_log.sinks[i].fn == fn && g_log.sinks[i].ctx == ctx) {
            memmove(&g_log.sinks[i], &g_log.sinks[i + 1],
                    (g_log.n_sinks - i - 1) * sizeof g_log.sinks[0]);
            g_log.n_sinks--;
            break;
        }
    }
    pthread_mutex_unlock(&g_log.lock);
}

/* Appends with bounds: pos keeps counting past cap so the caller learns the size needed. */
static void put(char *buf, size_t cap, size_t *pos, const char *s, size_t n) {
    if (*pos < cap) {
        size_t room = cap - *pos;
        memcpy(buf + *pos, s, n < room ? n : room);
    }
    *pos += n;
}

static void put_str(char *buf, size_t cap, size_t *pos, const char *s) {
    put(buf, cap, pos, "\"", 1);
    for (const unsigned char *p = (const unsigned char *)(s ? s : ""); *p; p++) {
        char esc[8];
        switch (*p) {
        case '"': put(buf, cap, pos, "\\\"", 2); break;
        case '\\': put(buf, cap, pos, "\\\\", 2); break;
        case '\n': put(buf, cap, pos, "\\n", 2); break;
        case '\r': put(buf, cap, pos, "\\r", 2); break;
        case '\t': put(buf, cap, pos, "\\t", 2); break;
        default:
            if (*p < 0x20) {
                int n = snprintf(esc, sizeof esc, "\\u%04x", *p);
                put(buf, cap, pos, esc, (size_t)n);
            } else {
                put(buf, cap, pos, (const char *)p, 1);
            }
        }
    }
    put(buf, cap, pos, "\"", 1);
}

static void put_num(char *buf, size_t cap, size_t *pos, double v) {
    char tmp[32];
    int n;
    if (!isfinite(v)) /* JSON has no NaN/Inf: write null so every line still parses */
        n = snprintf(tmp, sizeof tmp, "null");
    else
        n = snprintf(tmp, sizeof tmp, "%.17g", v);
    put(buf, cap, pos, tmp, (size_t)n);
}

size_t log_record_format_json(const log_record_t *rec, char *buf, size_t cap) {
    size_t pos = 0;
    put(buf, cap, &pos, "{\"time\":", 8);
    char tmp[32];
    int n = snprintf(tmp, sizeof tmp, "%.6f", rec->time);
    put(buf, cap, &pos, tmp, (size_t)n);
    put(buf, cap, &pos, ",\"process\":", 11);
    put_str(buf, cap, &pos, rec->process);
    put(buf, cap, &pos, ",\"host\":", 8);
    put_str(buf, cap, &pos, rec->host);
    put(buf, cap, &pos, ",\"level\":", 9);
    put_str(buf, cap, &pos, log_level_name(rec->level));
    put(buf, cap, &pos, ",\"event\":", 9);
    put_str(buf, cap, &pos, rec->event);
    if (rec->n_fields) {
        put(buf, cap, &pos, ",\"fields\":{", 11);
        for (size_t i = 0; i < rec->n_fields; i++) {
            if (i)
                put(buf, cap, &pos, ",", 1);
            put_str(buf, cap, &pos, rec->fields[i].key);
            put(buf, cap, &pos, ":", 1);
            put_num(buf, cap, &pos, rec->fields[i].value);
        }
        put(buf, cap, &pos, "}", 1);
    }
    if (rec->text && rec->text[0]) {
        put(buf, cap, &pos, ",\"text\":", 8);
        put_str(buf, cap, &pos, rec->text);
    }
    put(buf, cap, &pos, "}\n", 2);
    if (cap)
        buf[pos < cap ? pos : cap - 1] = '\0';
    return pos;
}

void log_emitv(log_level_t level, const char *event, const log_field_t *fields, size_t n_fields,
               const char *fmt, va_list ap) {
    if (!log_enabled(level))
        return;
    char text[2048] = "";
    if (fmt)
        vsnprintf(text, sizeof text, fmt, ap);
    struct timeval tv;
    gettimeofday(&tv, NULL);
    log_record_t rec = {
        .time = (double)tv.tv_sec + (double)tv.tv_usec * 1e-6,
        .level = level,
        .event = event,
        .fields = fields,
        .n_fields = n_fields,
        .text = text,
    };
    pthread_mutex_lock(&g_log.lock);
    rec.process = g_log.process;
    rec.host = g_log.host;
    if (g_log.to_stderr) {
        char line[LOG_LINE_MAX];
        size_t len = log_record_format_json(&rec, line, sizeof line);
        if (len >= sizeof line) { /* too long for the stack buffer: format on the heap */
            char *big = malloc(len + 1);
            if (big) {
                log_record_format_json(&rec, big, len + 1);
                fputs(big, stderr);
                free(big);
            }
        } else {
            fputs(line, stderr);
        }
    }
    for (size_t i = 0; i < g_log.n_sinks; i++)
        g_log.sinks[i].fn(g_log.sinks[i].ctx, &rec);
    pthread_mutex_unlock(&g_log.lock);
}

void log_emit(log_level_t level, const char *event, const log_field_t *fields, size_t n_fields,
              const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    log_emitv(level, event, fields, n_fields, fmt, ap);
    va_end(ap);
}
