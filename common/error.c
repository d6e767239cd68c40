#include "error.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char *const code_names[QERR_COUNT] = {
    [QERR_OK] = "ok",           [QERR_IO] = "io",           [QERR_PARSE] = "parse",
    [QERR_INVALID] = "invalid", [QERR_RANGE] = "range",     [QERR_NOMEM] = "nomem",
    [QERR_TIMEOUT] = "timeout", [QERR_VERSION] = "version", [QERR_NOTFOUND] = "notfound",
};
_Static_assert(Q_ARRAY_LEN(code_names) == QERR_COUNT, "one name per error code");

int qerr_set(qerr_t *err, qerr_code_t code, const char *fmt, ...) {
    if (err) {
        err->code = code;
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err->msg, sizeof err->msg, fmt, ap);
        va_end(ap);
    }
    return -1;
}

int qerr_wrap(qerr_t *err, const char *fmt, ...) {
    if (err) {
        char prefix[QERR_MSG_MAX];
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(prefix, sizeof prefix, fmt, ap);
        va_end(ap);
        /* Built by hand: snprintf("%s: %s") trips -Wformat-truncation, and truncation is
         * what we want for over-long messages. */
        char old[QERR_MSG_MAX];
        memcpy(old, err->msg, sizeof old);
        size_t np = strnlen(prefix, sizeof err->msg - 1);
        memcpy(err->msg, prefix, np);
        size_t pos = np;
        if (pos + 2 < sizeof err->msg) {
            memcpy(err->msg + pos, ": ", 2);
            pos += 2;
        }
        size_t no = strnlen(old, sizeof old);
        if (no > sizeof err->msg - 1 - pos)
            no = sizeof err->msg - 1 - pos;
        memcpy(err->msg + pos, old, no);
        err->msg[pos + no] = '\0';
    }
    return -1;
}

void qerr_clear(qerr_t *err) {
    if (err) {
        err->code = QERR_OK;
        err->msg[0] = '\0';
    }
}

const char *qerr_code_name(qerr_code_t code) {
    return (code >= 0 && code < QERR_COUNT) ? code_names[code] : "unknown";
}

void q_assert_fail(const char *expr, const char *file, int line, const char *func) {
    fprintf(stderr, "quillan: assertion failed: %s (%s:%d in %s)\n", expr, file, line, func);
    fflush(stderr);
    abort();
}
