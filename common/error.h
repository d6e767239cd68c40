/* Quillan error conventions: the three tiers of STYLE.md.
 *
 * 1. A bug (broken invariant) hits Q_ASSERT, which never compiles out and prints the
 *    expression, file and line, then aborts.
 * 2. A runtime failure (I/O, timeout, bad input) returns -1 (or NULL) and fills a qerr_t the
 *    caller may show; functions take `qerr_t *err` last, and err may be NULL.
 * 3. Only main() exits.
 */
#ifndef QUILLAN_ERROR_H
#define QUILLAN_ERROR_H

#include <stddef.h>

typedef enum {
    QERR_OK = 0,
    QERR_IO,       /* file or socket failure */
    QERR_PARSE,    /* syntax of an input (YAML, JSON, protobuf, safetensors header) */
    QERR_INVALID,  /* well-formed input that breaks a semantic rule */
    QERR_RANGE,    /* a value outside its documented range */
    QERR_NOMEM,    /* allocation or byte budget exhausted */
    QERR_TIMEOUT,  /* a peer did not answer in time */
    QERR_VERSION,  /* protocol or file format version mismatch */
    QERR_NOTFOUND, /* a named thing (file, key, tensor) is absent */
    QERR_COUNT
} qerr_code_t;

#define QERR_MSG_MAX 512

typedef struct {
    qerr_code_t code;
    char msg[QERR_MSG_MAX];
} qerr_t;

/* Fills err (when non-NULL) and returns -1, so callers can `return qerr_set(...)`. */
int qerr_set(qerr_t *err, qerr_code_t code, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* Prefixes an existing message with context ("loading x.yaml: <old message>"); returns -1. */
int qerr_wrap(qerr_t *err, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

void qerr_clear(qerr_t *err);

/* Short lowercase name of a code ("io", "parse", ...). */
const char *qerr_code_name(qerr_code_t code);

_Noreturn void q_assert_fail(const char *expr, const char *file, int line, const char *func);

#define Q_ASSERT(expr) ((expr) ? (void)0 : q_assert_fail(#expr, __FILE__, __LINE__, __func__))

#define Q_ARRAY_LEN(a) (sizeof(a) / sizeof((a)[0]))

#endif
