/* Thin helpers over jansson shared by every module that reads or writes JSON: loading a file
 * with an error that names file:line:column, typed field getters whose errors name the field,
 * and a deterministic compact encoder.
 *
 * The prefix is qjson_ so that nothing here can collide with jansson's own json_ names.
 * Getters never add a location of their own: jansson keeps no positions for values, so callers
 * that know one (a JSONL line, a file name) wrap the message with qerr_wrap. */
#ifndef QUILLAN_JSON_H
#define QUILLAN_JSON_H

#include "error.h"

#include <jansson.h>
#include <stddef.h>
#include <stdint.h>

/* Parses the file at path as one JSON value. Duplicate object keys are rejected (two values
 * for one key is always a mistake in a hand-written file). Returns a new reference (release
 * with json_decref) or NULL with err set to "PATH:LINE:COL: MESSAGE" (QERR_PARSE), or
 * "PATH: MESSAGE" (QERR_IO) when the file cannot be read. */
json_t *qjson_load_file(const char *path, qerr_t *err);

/* Parses len bytes of text as one JSON value, with the same rules as qjson_load_file. `what`
 * names the source in errors ("PATH:LINE" of a JSONL line, say): the message is
 * "WHAT: not valid JSON: MESSAGE at column COL" for one-line input (line 1), or
 * "WHAT: not valid JSON: MESSAGE at line L, column COL" otherwise. Returns a new reference or
 * NULL (QERR_PARSE). */
json_t *qjson_parse(const char *text, size_t len, const char *what, qerr_t *err);

/* "an object", "an array", "a string", "an integer", "a real number", "a boolean", "null". */
const char *qjson_type_name(const json_t *v);

/* Required fields of an object. Each returns 0 and stores the value, or -1 with err set:
 *   absent key:  QERR_NOTFOUND "missing field 'KEY'"
 *   wrong type:  QERR_INVALID  "field 'KEY': expected a string, got an integer"
 * Borrowed results (strings, objects, arrays) live as long as obj. */
int qjson_get_string(const json_t *obj, const char *key, const char **out, qerr_t *err);
/* Integers must be JSON integers (1.0 is rejected); range is int64. */
int qjson_get_int(const json_t *obj, const char *key, int64_t *out, qerr_t *err);
/* Accepts integers and reals; NaN and infinities cannot occur (JSON has none). */
int qjson_get_double(const json_t *obj, const char *key, double *out, qerr_t *err);
int qjson_get_bool(const json_t *obj, const char *key, int *out, qerr_t *err);
int qjson_get_object(const json_t *obj, const char *key, json_t **out, qerr_t *err);
int qjson_get_array(const json_t *obj, const char *key, json_t **out, qerr_t *err);

/* Optional fields: return 1 and store the value when present, 0 leaving *out untouched when the
 * key is absent, -1 on a wrong type (same message as above). A JSON null counts as present
 * and is a wrong type: "field 'KEY': expected a string, got null". */
int qjson_opt_string(const json_t *obj, const char *key, const char **out, qerr_t *err);
int qjson_opt_int(const json_t *obj, const char *key, int64_t *out, qerr_t *err);
int qjson_opt_double(const json_t *obj, const char *key, double *out, qerr_t *err);
int qjson_opt_bool(const json_t *obj, const char *key, int *out, qerr_t *err);

/* Compact encoding of any value (strings, numbers and null included) with object keys sorted,
 * so equal values always give equal bytes. Returns a malloc'd NUL-terminated string the caller
 * frees with free(), or NULL with err set (QERR_NOMEM, or QERR_INVALID for a value jansson
 * cannot encode). */
char *qjson_encode(const json_t *v, qerr_t *err);

#endif
