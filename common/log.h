/* Structured logging: one JSON object per line on stderr, and optionally to sinks (the log hub
 * publisher registers one). The record mirrors the LogRecord message of proto/log.proto:
 * {time, process, host, level, event, fields{name: number}, text}.
 *
 * The LOG_* macros test the level before evaluating their arguments (redis habit). */
#ifndef QUILLAN_LOG_H
#define QUILLAN_LOG_H

#include <stdarg.h>
#include <stddef.h>

typedef enum { LOG_DEBUG = 0, LOG_INFO, LOG_WARN, LOG_ERROR, LOG_LEVEL_COUNT } log_level_t;

typedef struct {
    const char *key;
    double value;
} log_field_t;

typedef struct {
    double time; /* seconds since the Unix epoch */
    const char *process;
    const char *host;
    log_level_t level;
    const char *event;
    const log_field_t *fields;
    size_t n_fields;
    const char *text; /* may be "" */
} log_record_t;

/* A sink sees every record at or above the level; it must not call log functions. */
typedef void (*log_sink_fn)(void *ctx, const log_record_t *rec);

/* Names this process in every record (copied); host is taken from gethostname(). */
void log_init(const char *process);
void log_set_level(log_level_t level);
log_level_t log_get_level(void);
/* Turns stderr output off (tests, or a monitor that owns the terminal). */
void log_set_stderr(int enabled);
int log_enabled(log_level_t level);

/* "debug" | "info" | "warn" | "error"; returns -1 for anything else. */
int log_level_parse(const char *name, log_level_t *out);
const char *log_level_name(log_level_t level);

/* Adds a sink; returns 0, or -1 when the sink table (8) is full. */
int log_sink_add(log_sink_fn fn, void *ctx);
void log_sink_remove(log_sink_fn fn, void *ctx);

/* Emits a record with numeric fields and an optional printf-style text (fmt may be NULL). */
void log_emit(log_level_t level, const char *event, const log_field_t *fields, size_t n_fields,
              const char *fmt, ...) __attribute__((format(printf, 5, 6)));
void log_emitv(log_level_t level, const char *event, const log_field_t *fields, size_t n_fields,
               const char *fmt, va_list ap);

/* Writes rec as one JSON line (with '\n') into buf; returns the length it needed, like
 * snprintf. Used for stderr and log files alike. */
size_t log_record_format_json(const log_record_t *rec, char *buf, size_t cap);

#define LOG_AT(lvl, event, ...)                                                                    \
    do {                                                                                           \
        if (log_enabled(lvl))                                                                      \
            log_emit(lvl, event, NULL, 0, __VA_ARGS__);                                            \
    } while (0)
#define log_debug(event, ...) LOG_AT(LOG_DEBUG, event, __VA_ARGS__)
#define log_info(event, ...) LOG_AT(LOG_INFO, event, __VA_ARGS__)
#define log_warn(event, ...) LOG_AT(LOG_WARN, event, __VA_ARGS__)
#define log_error(event, ...) LOG_AT(LOG_ERROR, event, __VA_ARGS__)

#endif
