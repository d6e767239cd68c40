#include "json.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* JSON_DECODE_ANY: the caller decides which top-level type it wants and says so in its own
 * words, which reads better than jansson's "'[' or '{' expected". */
#define QJSON_LOAD_FLAGS (JSON_REJECT_DUPLICATES | JSON_DECODE_ANY)

json_t *qjson_load_file(const char *path, qerr_t *err) {
    FILE *f = fopen(path, "rb");
    if (!f) {
        qerr_set(err, QERR_IO, "%s: cannot open: %s", path, strerror(errno));
        return NULL;
    }
    json_error_t je;
    json_t *v = json_loadf(f, QJSON_LOAD_FLAGS, &je);
    int read_failed = ferror(f);
    fclose(f);
    if (read_failed) {
        json_decref(v);
        qerr_set(err, QERR_IO, "%s: read error", path);
        return NULL;
    }
    if (!v) {
        qerr_set(err, QERR_PARSE, "%s:%d:%d: %s", path, je.line, je.column, je.text);
        return NULL;
    }
    return v;
}

json_t *qjson_parse(const char *text, size_t len, const char *what, qerr_t *err) {
    json_error_t je;
    json_t *v = json_loadb(text, len, QJSON_LOAD_FLAGS, &je);
    if (v)
        return v;
    if (je.line <= 1)
        qerr_set(err, QERR_PARSE, "%s: not valid JSON: %s at column %d", what, je.text, je.column);
    else
        qerr_set(err, QERR_PARSE, "%s: not valid JSON: %s at line %d, column %d", what, je.text,
                 je.line, je.column);
    return NULL;
}

const char *qjson_type_name(const json_t *v) {
    switch (json_typeof(v)) {
    case JSON_OBJECT: return "an object";
    case JSON_ARRAY: return "an array";
    case JSON_STRING: return "a string";
    case JSON_INTEGER: return "an integer";
    case JSON_REAL: return "a real number";
    case JSON_TRUE:
    case JSON_FALSE: return "a boolean";
    case JSON_NULL: return "null";
    }
    return "an unknown JSON value";
}

/* The one lookup behind every getter: 1 with *out set when key holds a value of the wanted
 * kind, 0 when absent, -1 on a wrong type. `want` names the kind for the error message. */
typedef int (*kind_fn)(const json_t *v);

static int is_object(const json_t *v) {
    return json_is_object(v);
}
static int is_array(const json_t *v) {
    return json_is_array(v);
}
static int is_string(const json_t *v) {
    return json_is_string(v);
}
static int is_integer(const json_t *v) {
    return json_is_integer(v);
}
static int is_number(const json_t *v) {
    return json_is_number(v);
}
static int is_boolean(const json_t *v) {
    return json_is_boolean(v);
}

static int lookup(const json_t *obj, const char *key, kind_fn ok, const char *want, json_t **out,
                  qerr_t *err) {
    Q_ASSERT(obj && key);
    json_t *v = json_is_object(obj) ? json_object_get(obj, key) : NULL;
    if (!v)
        return 0;
    if (!ok(v))
        return qerr_set(err, QERR_INVALID, "field '%s': expected %s, got %s", key, want,
                        qjson_type_name(v));
    *out = v;
    return 1;
}

static int required(int found, const char *key, qerr_t *err) {
    if (found < 0)
        return -1;
    if (found == 0)
        return qerr_set(err, QERR_NOTFOUND, "missing field '%s'", key);
    return 0;
}

int qjson_opt_string(const json_t *obj, const char *key, const char **out, qerr_t *err) {
    json_t *v = NULL;
    int r = lookup(obj, key, is_string, "a string", &v, err);
    if (r == 1)
        *out = json_string_value(v);
    return r;
}

int qjson_opt_int(const json_t *obj, const char *key, int64_t *out, qerr_t *err) {
    json_t *v = NULL;
    int r = lookup(obj, key, is_integer, "an integer", &v, err);
    if (r == 1)
        *out = (int64_t)json_integer_value(v);
    return r;
}

int qjson_opt_double(const json_t *obj, const char *key, double *out, qerr_t *err) {
    json_t *v = NULL;
    int r = lookup(obj, key, is_number, "a number", &v, err);
    if (r == 1)
        *out = json_number_value(v);
    return r;
}

int qjson_opt_bool(const json_t *obj, const char *key, int *out, qerr_t *err) {
    json_t *v = NULL;
    int r = lookup(obj, key, is_boolean, "a boolean", &v, err);
    if (r == 1)
        *out = json_is_true(v);
    return r;
}

int qjson_get_string(const json_t *obj, const char *key, const char **out, qerr_t *err) {
    return required(qjson_opt_string(obj, key, out, err), key, err);
}

int qjson_get_int(const json_t *obj, const char *key, int64_t *out, qerr_t *err) {
    return required(qjson_opt_int(obj, key, out, err), key, err);
}

int qjson_get_double(const json_t *obj, const char *key, double *out, qerr_t *err) {
    return required(qjson_opt_double(obj, key, out, err), key, err);
}

int qjson_get_bool(const json_t *obj, const char *key, int *out, qerr_t *err) {
    return required(qjson_opt_bool(obj, key, out, err), key, err);
}

int qjson_get_object(const json_t *obj, const char *key, json_t **out, qerr_t *err) {
    return required(lookup(obj, key, is_object, "an object", out, err), key, err);
}

int qjson_get_array(const json_t *obj, const char *key, json_t **out, qerr_t *err) {
    return required(lookup(obj, key, is_array, "an array", out, err), key, err);
}

char *qjson_encode(const json_t *v, qerr_t *err) {
    Q_ASSERT(v);
    char *s = json_dumps(v, JSON_COMPACT | JSON_SORT_KEYS | JSON_ENCODE_ANY);
    if (!s)
        qerr_set(err, QERR_INVALID, "cannot encode %s as JSON", qjson_type_name(v));
    return s;
}
