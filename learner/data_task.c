#include "data_task.h"

#include "jsonl.h"
#include "rng.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#define TASK_RNG_TAG 0x5441534BULL /* "TASK" */
#define TASK_PATH_MAX 4096
/* Distinct (a, b) pairs: 1110 operands (0..999 reached through 1-3 digits) squared. */
#define ADDITION_PAIRS (1000L * 1000L)

static const char *const task_names[] = {"addition", NULL};

const char *const *data_task_names(void) {
    return task_names;
}

/* An operand of 1..3 digits: digit count uniform, then uniform among those numbers. */
static long operand(rng_stream_t *s) {
    const int digits = 1 + (int)(rng_stream_next_u64(s) % 3);
    static const long lo[] = {0, 10, 100}, span[] = {10, 90, 900};
    return lo[digits - 1] + (long)(rng_stream_next_u64(s) % (uint64_t)span[digits - 1]);
}

static int write_line(jsonl_writer_t *w, long a, long b, qerr_t *err) {
    char prompt[16], sum[16];
    snprintf(prompt, sizeof prompt, "%ld+%ld=", a, b);
    snprintf(sum, sizeof sum, "%ld", a + b);
    json_t *o = json_object();
    if (!o)
        return qerr_set(err, QERR_NOMEM, "out of memory");
    json_object_set_new(o, "prompt", json_string(prompt));
    json_object_set_new(o, "completion", json_string(sum));
    json_object_set_new(o, "answer", json_string(sum));
    const int rc = jsonl_writer_append(w, o, err);
    json_decref(o);
    return rc;
}

static int make_addition(long n_train, long n_test, uint64_t seed, const char *dir, qerr_t *err) {
    if (n_train < 1 || n_test < 1 || n_train + n_test > ADDITION_PAIRS / 2)
        return qerr_set(err, QERR_RANGE,
                        "addition: --n %ld and --test %ld must be >= 1 and sum to at most %ld",
                        n_train, n_test, ADDITION_PAIRS / 2);
    /* in_test[a * 1000 + b]: pairs reserved for the test split. */
    unsigned char *in_test = calloc(ADDITION_PAIRS, 1);
    if (!in_test)
        return qerr_set(err, QERR_NOMEM, "out of memory");
    char path[TASK_PATH_MAX + 32];
    int rc = 0;
    for (int split = 1; split >= 0 && rc == 0; split--) { /* test first, then train */
        snprintf(path, sizeof path, "%s/%s", dir, split ? "test.jsonl" : "train.jsonl");
        jsonl_writer_t *w = jsonl_writer_new(path, JSONL_WRITE_TRUNCATE, err);
        if (!w) {
            rc = -1;
            break;
        }
        const long n = split ? n_test : n_train;
        rng_stream_t s;
        rng_stream_init(&s, TASK_RNG_TAG, seed, (uint64_t)split);
        for (long i = 0; i < n && rc == 0; i++) {
            long a, b;
            do {
                a = operand(&s);
                b = operand(&s);
            } while (in_test[a * 1000 + b] && !split);
            if (split)
                in_test[a * 1000 + b] = 1;
            rc = write_line(w, a, b, err);
        }
        if (rc == 0)
            rc = jsonl_writer_flush(w, err);
        jsonl_writer_destroy(&w);
    }
    free(in_test);
    return rc;
}

int data_task_make(const char *name, long n_train, long n_test, uint64_t seed, const char *dir,
                   qerr_t *err) {
    if (strcmp(name, "addition") != 0)
        return qerr_set(err, QERR_NOTFOUND, "unknown task '%s' (known: addition)", name);
    if (mkdir(dir, 0777) != 0 && errno != EEXIST)
        return qerr_set(err, QERR_IO, "%s: cannot create directory: %s", dir, strerror(errno));
    return make_addition(n_train, n_test, seed, dir, err);
}
