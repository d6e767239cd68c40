/* JSONL datasets: good files (RL and SFT), metadata extraction, random access by index, every
 * error class with its line number, and the writer. */
#include <criterion/criterion.h>

#include "jsonl.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define DATA QUILLAN_TEST_DATA "/files"

static char tmpdir[256];
static char tmpfile_path[512];

static void setup(void) {
    snprintf(tmpdir, sizeof tmpdir, "/tmp/quillan-jsonl-XXXXXX");
    cr_assert_not_null(mkdtemp(tmpdir), "mkdtemp: %s", strerror(errno));
    snprintf(tmpfile_path, sizeof tmpfile_path, "%s/data.jsonl", tmpdir);
}

static void teardown(void) {
    unlink(tmpfile_path);
    rmdir(tmpdir);
}

static void put(const char *text, size_t len) {
    FILE *f = fopen(tmpfile_path, "wb");
    cr_assert_not_null(f);
    cr_assert_eq(fwrite(text, 1, len, f), len);
    fclose(f);
}

static const char *meta(const jsonl_example_t *ex, const char *key) {
    for (size_t i = 0; i < ex->n_meta; i++) {
        if (strcmp(ex->meta_keys[i], key) == 0)
            return ex->meta_values[i];
    }
    return NULL;
}

Test(jsonl, rl_dataset_examples_and_metadata) {
    qerr_t err;
    jsonl_reader_t *r = jsonl_reader_new(DATA "/rl_small.jsonl", 0, &err);
    cr_assert_not_null(r, "%s", err.msg);
    cr_assert_eq(jsonl_reader_count(r), 4);
    cr_assert_str_eq(jsonl_reader_path(r), DATA "/rl_small.jsonl");
    cr_assert_eq(jsonl_reader_check(r, JSONL_TASK_RL, &err), 0, "%s", err.msg);

    /* Random access: later lines first, as a shuffled epoch reads them. */
    jsonl_example_t ex;
    cr_assert_eq(jsonl_reader_example(r, 2, JSONL_TASK_RL, &ex, &err), 0, "%s", err.msg);
    cr_assert_eq(ex.index, 2);
    cr_assert_eq(ex.line, 3);
    cr_assert_str_eq(ex.prompt, "Caf\xc3\xa9 \xe2\x98\x95 costs 3.50; two cost?");
    cr_assert_str_eq(ex.answer, "7.00");
    cr_assert_null(ex.completion);
    cr_assert_eq(ex.n_meta, 4);
    /* Sorted keys, JSON-encoded values; the answer travels too, the prompt does not. */
    cr_assert_str_eq(ex.meta_keys[0], "answer");
    cr_assert_str_eq(ex.meta_values[0], "\"7.00\"");
    cr_assert_str_eq(ex.meta_keys[1], "ok");
    cr_assert_str_eq(ex.meta_values[1], "true");
    cr_assert_str_eq(ex.meta_keys[2], "task");
    cr_assert_str_eq(ex.meta_values[2], "\"math\"");
    cr_assert_str_eq(ex.meta_keys[3], "weight");
    cr_assert_str_eq(ex.meta_values[3], "0.5");
    jsonl_example_free(&ex);

    cr_assert_eq(jsonl_reader_example(r, 1, JSONL_TASK_RL, &ex, &err), 0, "%s", err.msg);
    cr_assert_str_eq(ex.prompt, "Spell \"cat\" backwards.");
    cr_assert_str_eq(ex.answer, "tac");
    cr_assert_str_eq(meta(&ex, "tags"), "[\"words\",\"easy\"]");
    cr_assert_str_eq(meta(&ex, "extra"), "{\"a\":null,\"z\":1}");
    cr_assert_null(meta(&ex, "prompt"));
    jsonl_example_free(&ex);

    cr_assert_eq(jsonl_reader_example(r, 0, JSONL_TASK_RL, &ex, &err), 0, "%s", err.msg);
    cr_assert_str_eq(ex.prompt, "What is 2 + 3?");
    cr_assert_str_eq(meta(&ex, "level"), "1");
    jsonl_example_free(&ex);

    /* RL's answer is optional. */
    cr_assert_eq(jsonl_reader_example(r, 3, JSONL_TASK_RL, &ex, &err), 0, "%s", err.msg);
    cr_assert_null(ex.answer);
    cr_assert_eq(ex.n_meta, 1);
    jsonl_example_free(&ex);

    /* The same lines read as SFT lack a completion. */
    cr_assert_eq(jsonl_reader_check(r, JSONL_TASK_SFT, &err), -1);
    cr_assert_str_eq(err.msg, DATA "/rl_small.jsonl:1: missing field 'completion'");
    json_t *o = jsonl_reader_object(r, 3, &err);
    cr_assert_not_null(o, "%s", err.msg);
    cr_assert_str_eq(json_string_value(json_object_get(o, "task")), "open");
    json_decref(o);
    jsonl_reader_destroy(&r);
    cr_assert_null(r);
    jsonl_reader_destroy(&r);
}

Test(jsonl, sft_dataset_with_crlf) {
    qerr_t err;
    jsonl_reader_t *r = jsonl_reader_new(DATA "/sft_small.jsonl", 0, &err);
    cr_assert_not_null(r, "%s", err.msg);
    cr_assert_eq(jsonl_reader_count(r), 2);
    jsonl_example_t ex;
    cr_assert_eq(jsonl_reader_example(r, 0, JSONL_TASK_SFT, &ex, &err), 0, "%s", err.msg);
    cr_assert_str_eq(ex.prompt, "Hello");
    cr_assert_str_eq(ex.completion, " world");
    cr_assert_null(ex.answer);
    cr_assert_eq(ex.n_meta, 1, "completion is not metadata");
    cr_assert_str_eq(ex.meta_keys[0], "source");
    cr_assert_str_eq(ex.meta_values[0], "\"toy\"");
    jsonl_example_free(&ex);
    cr_assert_eq(jsonl_reader_example(r, 1, JSONL_TASK_SFT, &ex, &err), 0, "%s", err.msg);
    cr_assert_str_eq(ex.completion, "2");
    cr_assert_eq(ex.n_meta, 0);
    jsonl_example_free(&ex);
    jsonl_reader_destroy(&r);
}

Test(jsonl, line_endings_and_trailing_blanks, .init = setup, .fini = teardown) {
    qerr_t err;
    /* No final newline; then trailing blank lines, which are ignored. */
    static const char *ok[] = {
        "{\"prompt\":\"a\"}\n{\"prompt\":\"b\"}",
        "{\"prompt\":\"a\"}\n{\"prompt\":\"b\"}\n\n  \n\t",
    };
    for (size_t i = 0; i < 2; i++) {
        put(ok[i], strlen(ok[i]));
        jsonl_reader_t *r = jsonl_reader_new(tmpfile_path, 0, &err);
        cr_assert_not_null(r, "case %zu: %s", i, err.msg);
        cr_assert_eq(jsonl_reader_count(r), 2, "case %zu", i);
        jsonl_example_t ex;
        cr_assert_eq(jsonl_reader_example(r, 1, JSONL_TASK_RL, &ex, &err), 0, "%s", err.msg);
        cr_assert_str_eq(ex.prompt, "b");
        jsonl_example_free(&ex);
        jsonl_reader_destroy(&r);
    }
}

Test(jsonl, fingerprint_follows_content, .init = setup, .fini = teardown) {
    qerr_t err;
    const char *a = "{\"prompt\":\"a\"}\n";
    put(a, strlen(a));
    jsonl_reader_t *r1 = jsonl_reader_new(tmpfile_path, 0, &err);
    jsonl_reader_t *r2 = jsonl_reader_new(tmpfile_path, 0, &err);
    cr_assert_eq(jsonl_reader_fingerprint(r1), jsonl_reader_fingerprint(r2));
    jsonl_reader_destroy(&r2);
    const char *b = "{\"prompt\":\"b\"}\n";
    put(b, strlen(b));
    r2 = jsonl_reader_new(tmpfile_path, 0, &err);
    cr_assert_neq(jsonl_reader_fingerprint(r1), jsonl_reader_fingerprint(r2));
    jsonl_reader_destroy(&r1);
    jsonl_reader_destroy(&r2);
}

/* Errors found when the file is opened (index pass). */
typedef struct {
    const char *what;
    const char *text;
    size_t max_line;
    qerr_code_t code;
    const char *msg; /* after "PATH" */
} open_case_t;

static const open_case_t open_cases[] = {
    {"blank line inside", "{\"prompt\":\"a\"}\n\n{\"prompt\":\"b\"}\n", 0, QERR_INVALID,
     ":2: blank line inside the dataset"},
    {"white-space line inside",
     "{\"prompt\":\"a\"}\n{\"prompt\":\"b\"}\n \t\r\n{\"prompt\":\"c\"}\n", 0, QERR_INVALID,
     ":3: blank line inside the dataset"},
    {"line too long",
     "{\"prompt\":\"a\"}\n{\"prompt\":\"0123456789012345678901234567890123456789\"}\n", 32,
     QERR_RANGE, ":2: line is 53 bytes, longer than the limit of 32"},
    {"empty file", "", 0, QERR_INVALID, ": empty dataset (no lines)"},
    {"only blank lines", "\n\n", 0, QERR_INVALID, ": empty dataset (no lines)"},
};

Test(jsonl, open_errors_name_the_line, .init = setup, .fini = teardown) {
    for (size_t i = 0; i < Q_ARRAY_LEN(open_cases); i++) {
        const open_case_t *c = &open_cases[i];
        put(c->text, strlen(c->text));
        qerr_t err;
        jsonl_reader_t *r = jsonl_reader_new(tmpfile_path, c->max_line, &err);
        cr_assert_null(r, "%s: accepted", c->what);
        char want[1024];
        snprintf(want, sizeof want, "%s%s", tmpfile_path, c->msg);
        cr_assert_eq(strncmp(err.msg, want, strlen(want)), 0, "%s:\n got  %s\n want %s", c->what,
                     err.msg, want);
        cr_assert_eq(err.code, c->code, "%s", c->what);
    }
    qerr_t err;
    cr_assert_null(jsonl_reader_new(DATA "/absent.jsonl", 0, &err));
    cr_assert_eq(err.code, QERR_NOTFOUND);
    cr_assert_str_eq(err.msg, DATA "/absent.jsonl: cannot open: No such file or directory");
    cr_assert_null(jsonl_reader_new(tmpdir, 0, &err));
    cr_assert(strstr(err.msg, "not a regular file"), "%s", err.msg);
    put("{}\n", 3);
    cr_assert_null(jsonl_reader_new(tmpfile_path, JSONL_MAX_LINE_LIMIT + 1, &err));
    cr_assert_eq(err.code, QERR_RANGE);
}

/* Errors found when a line is parsed: line 3 of a file whose lines 1, 2 and 4 are good. */
typedef struct {
    const char *what;
    const char *line3;
    jsonl_task_t task;
    qerr_code_t code;
    const char *msg; /* after "PATH:3: " */
} line_case_t;

static const line_case_t line_cases[] = {
    {"not JSON", "{\"prompt\": \"x\",}", JSONL_TASK_RL, QERR_PARSE, "not valid JSON: "},
    {"truncated", "{\"prompt\": \"x", JSONL_TASK_RL, QERR_PARSE, "not valid JSON: "},
    {"array", "[1, 2]", JSONL_TASK_RL, QERR_PARSE, "expected a JSON object, got an array"},
    {"string", "\"prompt\"", JSONL_TASK_RL, QERR_PARSE, "expected a JSON object, got a string"},
    {"two objects", "{\"prompt\":\"a\"} {\"prompt\":\"b\"}", JSONL_TASK_RL, QERR_PARSE,
     "not valid JSON: end of file expected"},
    {"duplicate key", "{\"prompt\":\"a\",\"prompt\":\"b\"}", JSONL_TASK_RL, QERR_PARSE,
     "not valid JSON: duplicate object key"},
    {"missing prompt", "{\"question\": \"x\", \"answer\": \"y\"}", JSONL_TASK_RL, QERR_NOTFOUND,
     "missing field 'prompt'"},
    {"prompt not a string", "{\"prompt\": 12}", JSONL_TASK_RL, QERR_INVALID,
     "field 'prompt': expected a string, got an integer"},
    {"answer not a string", "{\"prompt\": \"x\", \"answer\": 5}", JSONL_TASK_RL, QERR_INVALID,
     "field 'answer': expected a string, got an integer"},
    {"missing completion", "{\"prompt\": \"x\", \"answer\": \"y\"}", JSONL_TASK_SFT, QERR_NOTFOUND,
     "missing field 'completion'"},
    {"null completion", "{\"prompt\": \"x\", \"completion\": null}", JSONL_TASK_SFT, QERR_INVALID,
     "field 'completion': expected a string, got null"},
    {"invalid UTF-8", "{\"prompt\": \"\xff\"}", JSONL_TASK_RL, QERR_PARSE, "not valid JSON: "},
};

Test(jsonl, line_errors_name_file_and_line, .init = setup, .fini = teardown) {
    for (size_t i = 0; i < Q_ARRAY_LEN(line_cases); i++) {
        const line_case_t *c = &line_cases[i];
        char text[512];
        snprintf(
            text, sizeof text,
            "{\"prompt\":\"1\",\"completion\":\"a\"}\n{\"prompt\":\"2\",\"completion\":\"b\"}\n"
            "%s\n{\"prompt\":\"4\",\"completion\":\"c\"}\n",
            c->line3);
        put(text, strlen(text));
        qerr_t err;
        jsonl_reader_t *r = jsonl_reader_new(tmpfile_path, 0, &err);
        cr_assert_not_null(r, "%s: %s", c->what, err.msg);
        cr_assert_eq(jsonl_reader_count(r), 4);
        jsonl_example_t ex;
        /* The good lines around it still read. */
        cr_assert_eq(jsonl_reader_example(r, 3, c->task, &ex, &err), 0, "%s: %s", c->what, err.msg);
        jsonl_example_free(&ex);
        cr_assert_eq(jsonl_reader_example(r, 2, c->task, &ex, &err), -1, "%s: accepted", c->what);
        cr_assert_null(ex.prompt, "nothing is left in a failed example");
        char want[1024];
        snprintf(want, sizeof want, "%s:3: %s", tmpfile_path, c->msg);
        cr_assert_eq(strncmp(err.msg, want, strlen(want)), 0, "%s:\n got  %s\n want %s", c->what,
                     err.msg, want);
        cr_assert_eq(err.code, c->code, "%s: code %s", c->what, qerr_code_name(err.code));
        /* check() stops at the same line. */
        qerr_t err2;
        cr_assert_eq(jsonl_reader_check(r, c->task, &err2), -1);
        cr_assert_str_eq(err2.msg, err.msg);
        jsonl_reader_destroy(&r);
    }
}

Test(jsonl, writer_round_trip_and_append, .init = setup, .fini = teardown) {
    qerr_t err;
    jsonl_writer_t *w = jsonl_writer_new(tmpfile_path, JSONL_WRITE_TRUNCATE, &err);
    cr_assert_not_null(w, "%s", err.msg);
    for (int i = 0; i < 3; i++) {
        char p[32];
        snprintf(p, sizeof p, "line\n%d", i);
        json_t *o = json_pack("{s:s, s:s, s:i}", "prompt", p, "answer", "x", "n", i);
        cr_assert_eq(jsonl_writer_append(w, o, &err), 0, "%s", err.msg);
        json_decref(o);
    }
    json_t *arr = json_array();
    cr_assert_eq(jsonl_writer_append(w, arr, &err), -1);
    cr_assert(strstr(err.msg, "must be an object, got an array"), "%s", err.msg);
    json_decref(arr);
    cr_assert_eq(jsonl_writer_flush(w, &err), 0, "%s", err.msg);
    jsonl_writer_destroy(&w);
    cr_assert_null(w);

    w = jsonl_writer_new(tmpfile_path, JSONL_WRITE_APPEND, &err);
    cr_assert_not_null(w, "%s", err.msg);
    json_t *o = json_pack("{s:s}", "prompt", "appended");
    cr_assert_eq(jsonl_writer_append(w, o, &err), 0, "%s", err.msg);
    json_decref(o);
    cr_assert_eq(jsonl_writer_flush(w, &err), 0, "%s", err.msg);
    jsonl_writer_destroy(&w);

    jsonl_reader_t *r = jsonl_reader_new(tmpfile_path, 0, &err);
    cr_assert_not_null(r, "%s", err.msg);
    cr_assert_eq(jsonl_reader_count(r), 4);
    jsonl_example_t ex;
    cr_assert_eq(jsonl_reader_example(r, 1, JSONL_TASK_RL, &ex, &err), 0, "%s", err.msg);
    cr_assert_str_eq(ex.prompt, "line\n1", "newlines inside strings survive, escaped");
    cr_assert_str_eq(meta(&ex, "n"), "1");
    jsonl_example_free(&ex);
    cr_assert_eq(jsonl_reader_example(r, 3, JSONL_TASK_RL, &ex, &err), 0, "%s", err.msg);
    cr_assert_str_eq(ex.prompt, "appended");
    jsonl_example_free(&ex);
    jsonl_reader_destroy(&r);

    /* Truncate really truncates. */
    w = jsonl_writer_new(tmpfile_path, JSONL_WRITE_TRUNCATE, &err);
    jsonl_writer_destroy(&w);
    struct stat st;
    cr_assert_eq(stat(tmpfile_path, &st), 0);
    cr_assert_eq(st.st_size, 0);

    /* Appending to a file whose last line was cut short is refused. */
    put("{\"prompt\":\"a\"}\n{\"prom", 21);
    cr_assert_null(jsonl_writer_new(tmpfile_path, JSONL_WRITE_APPEND, &err));
    cr_assert(strstr(err.msg, "does not end with a newline"), "%s", err.msg);
    char bad[600];
    snprintf(bad, sizeof bad, "%s/no/such/dir.jsonl", tmpdir);
    cr_assert_null(jsonl_writer_new(bad, JSONL_WRITE_TRUNCATE, &err));
    cr_assert_eq(err.code, QERR_IO);
    cr_assert(strstr(err.msg, "no/such/dir.jsonl: cannot open for writing"), "%s", err.msg);
}
