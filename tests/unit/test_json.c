/* JSON helpers: file loading with file:line:column errors, typed getters naming the field,
 * deterministic encoding. */
#include <criterion/criterion.h>

#include "json.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static char path[256];

static json_t *parse(const char *text, qerr_t *err) {
    return qjson_parse(text, strlen(text), "t", err);
}

static void write_tmp(const char *text) {
    snprintf(path, sizeof path, "/tmp/quillan-json-XXXXXX");
    int fd = mkstemp(path);
    cr_assert_geq(fd, 0);
    cr_assert_eq(write(fd, text, strlen(text)), (ssize_t)strlen(text));
    close(fd);
}

Test(json, load_file_reports_file_line_column) {
    write_tmp("{\n  \"a\": 1,\n  \"b\": [1, 2,]\n}\n");
    qerr_t err;
    cr_assert_null(qjson_load_file(path, &err));
    cr_assert_eq(err.code, QERR_PARSE);
    char want[300];
    snprintf(want, sizeof want, "%s:3:", path);
    cr_assert_eq(strncmp(err.msg, want, strlen(want)), 0, "%s", err.msg);
    unlink(path);

    write_tmp("{\"a\": 1, \"a\": 2}");
    cr_assert_null(qjson_load_file(path, &err));
    cr_assert(strstr(err.msg, "duplicate object key"), "%s", err.msg);
    unlink(path);

    write_tmp("{\"a\": {\"b\": \"x\"}, \"n\": 2.5}");
    json_t *v = qjson_load_file(path, &err);
    cr_assert_not_null(v, "%s", err.msg);
    json_decref(v);
    unlink(path);

    cr_assert_null(qjson_load_file("/nonexistent/q.json", &err));
    cr_assert_eq(err.code, QERR_IO);
    cr_assert_str_eq(err.msg, "/nonexistent/q.json: cannot open: No such file or directory");
}

Test(json, parse_names_the_source) {
    qerr_t err;
    cr_assert_null(qjson_parse("{\"a\": tru}", 10, "train.jsonl:7", &err));
    cr_assert_eq(strncmp(err.msg, "train.jsonl:7: not valid JSON: ", 31), 0, "%s", err.msg);
    cr_assert(strstr(err.msg, "at column"), "%s", err.msg);
    cr_assert_null(qjson_parse("{\n\"a\":\n}", 8, "x.json", &err));
    cr_assert(strstr(err.msg, "at line 3, column"), "%s", err.msg);
    json_t *v = qjson_parse("\"str\"", 5, "w", &err);
    cr_assert(json_is_string(v), "any top-level value parses; callers check the type");
    json_decref(v);
}

Test(json, getters_name_the_field) {
    qerr_t err;
    json_t *o = parse("{\"s\": \"x\", \"i\": 7, \"r\": 0.5, \"b\": true, \"n\": null, "
                      "\"o\": {}, \"a\": [1]}",
                      &err);
    cr_assert_not_null(o, "%s", err.msg);
    const char *s;
    int64_t i;
    double d;
    int b;
    json_t *sub;
    cr_assert_eq(qjson_get_string(o, "s", &s, &err), 0);
    cr_assert_str_eq(s, "x");
    cr_assert_eq(qjson_get_int(o, "i", &i, &err), 0);
    cr_assert_eq(i, 7);
    cr_assert_eq(qjson_get_double(o, "i", &d, &err), 0, "integers are numbers");
    cr_assert_eq(d, 7.0);
    cr_assert_eq(qjson_get_double(o, "r", &d, &err), 0);
    cr_assert_eq(d, 0.5);
    cr_assert_eq(qjson_get_bool(o, "b", &b, &err), 0);
    cr_assert_eq(b, 1);
    cr_assert_eq(qjson_get_object(o, "o", &sub, &err), 0);
    cr_assert_eq(qjson_get_array(o, "a", &sub, &err), 0);

    cr_assert_eq(qjson_get_string(o, "prompt", &s, &err), -1);
    cr_assert_eq(err.code, QERR_NOTFOUND);
    cr_assert_str_eq(err.msg, "missing field 'prompt'");
    cr_assert_eq(qjson_get_string(o, "i", &s, &err), -1);
    cr_assert_eq(err.code, QERR_INVALID);
    cr_assert_str_eq(err.msg, "field 'i': expected a string, got an integer");
    cr_assert_eq(qjson_get_int(o, "r", &i, &err), -1);
    cr_assert_str_eq(err.msg, "field 'r': expected an integer, got a real number");
    cr_assert_eq(qjson_get_bool(o, "n", &b, &err), -1);
    cr_assert_str_eq(err.msg, "field 'n': expected a boolean, got null");
    cr_assert_eq(qjson_get_object(o, "a", &sub, &err), -1);
    cr_assert_str_eq(err.msg, "field 'a': expected an object, got an array");

    /* Optional getters: absent leaves the default, wrong type is still an error. */
    int64_t dflt = 42;
    cr_assert_eq(qjson_opt_int(o, "missing", &dflt, &err), 0);
    cr_assert_eq(dflt, 42);
    cr_assert_eq(qjson_opt_int(o, "i", &dflt, &err), 1);
    cr_assert_eq(dflt, 7);
    cr_assert_eq(qjson_opt_string(o, "n", &s, &err), -1);
    cr_assert_str_eq(err.msg, "field 'n': expected a string, got null");
    double dd = 1.0;
    cr_assert_eq(qjson_opt_double(o, "missing", &dd, &err), 0);
    cr_assert_eq(qjson_opt_bool(o, "s", &b, &err), -1);
    json_decref(o);
}

Test(json, encode_is_compact_and_sorted) {
    qerr_t err;
    json_t *a = parse("{\"b\": [1, {\"z\": 1, \"a\": \"\\u00e9\\n\"}], \"a\": null}", &err);
    cr_assert_not_null(a, "%s", err.msg);
    char *s = qjson_encode(a, &err);
    cr_assert_str_eq(s, "{\"a\":null,\"b\":[1,{\"a\":\"\xc3\xa9\\n\",\"z\":1}]}");
    free(s);
    s = qjson_encode(json_object_get(a, "a"), &err);
    cr_assert_str_eq(s, "null", "scalars encode too");
    free(s);
    json_decref(a);
}
