/* Log files rotated by size (common/log_file.h): whole lines only, newest in PATH, then
 * PATH.1 .. PATH.KEEP, nothing older kept, nothing lost in between; the sink form. */
#include "json.h"
#include "log_file.h"

#include <criterion/criterion.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

static char *tmpdir_new(void) {
    char *dir = strdup("/tmp/quillan_logfile_XXXXXX");
    cr_assert_not_null(mkdtemp(dir));
    return dir;
}

static void tmpdir_remove(char *dir) {
    char cmd[1100];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
    cr_assert_eq(system(cmd), 0);
    free(dir);
}

/* The `step` fields of the records in path, in order; each line must be a whole record. */
static int steps_read(const char *path, int *steps, int cap, long *bytes) {
    FILE *f = fopen(path, "r");
    if (f == NULL)
        return -1;
    char line[4096];
    int n = 0;
    *bytes = 0;
    while (fgets(line, sizeof line, f)) {
        size_t len = strlen(line);
        *bytes += (long)len;
        cr_assert(len > 0 && line[len - 1] == '\n', "%s: a cut line", path);
        qerr_t err = {0};
        json_t *v = qjson_parse(line, len, path, &err);
        cr_assert_not_null(v, "%s", err.msg);
        json_t *fields = json_object_get(v, "fields");
        cr_assert_lt(n, cap);
        steps[n++] = (int)json_number_value(json_object_get(fields, "step"));
        json_decref(v);
    }
    fclose(f);
    return n;
}

static void rec_write(log_file_t *f, int step) {
    const log_field_t fl[] = {{"step", step}, {"value", 0.5}};
    log_record_t r = {.time = 1.5,
                      .process = "test",
                      .host = "h",
                      .level = LOG_INFO,
                      .event = "e",
                      .fields = fl,
                      .n_fields = 2,
                      .text = "some text to make the line longer"};
    qerr_t err = {0};
    cr_assert_eq(log_file_write(f, &r, &err), 0, "%s", err.msg);
}

Test(log_file, rotation_keeps_whole_lines_in_order) {
    char *dir = tmpdir_new();
    char path[1024];
    snprintf(path, sizeof path, "%s/run.jsonl", dir);
    qerr_t err = {0};
    const uint64_t max = 600; /* a few records per file */
    log_file_t *f = log_file_new(path, max, 2, &err);
    cr_assert_not_null(f, "%s", err.msg);
    for (int s = 0; s < 40; s++)
        rec_write(f, s);
    log_file_stats_t st;
    log_file_stats(f, &st);
    cr_assert_eq(st.records, 40);
    cr_assert_eq(st.failures, 0);
    cr_assert_gt(st.rotations, 3);
    log_file_destroy(&f);
    cr_assert_null(f);
    /* PATH.2 (oldest kept), PATH.1, PATH: consecutive steps ending at 39; no PATH.3 */
    char p[1100];
    int all[64], n_all = 0;
    for (int k = 2; k >= 0; k--) {
        if (k)
            snprintf(p, sizeof p, "%s.%d", path, k);
        else
            snprintf(p, sizeof p, "%s", path);
        int steps[64];
        long bytes;
        int n = steps_read(p, steps, 64, &bytes);
        cr_assert_gt(n, 0, "%s is missing or empty", p);
        cr_assert_leq(bytes, (long)max, "%s has %ld bytes", p, bytes);
        memcpy(all + n_all, steps, (size_t)n * sizeof *steps);
        n_all += n;
    }
    snprintf(p, sizeof p, "%s.3", path);
    cr_assert_neq(access(p, F_OK), 0, "more files kept than asked");
    for (int i = 1; i < n_all; i++)
        cr_assert_eq(all[i], all[i - 1] + 1, "a record lost at rotation");
    cr_assert_eq(all[n_all - 1], 39);
    /* reopening appends */
    f = log_file_new(path, 0, 2, &err);
    cr_assert_not_null(f);
    rec_write(f, 40);
    log_file_destroy(&f);
    int steps[64];
    long bytes;
    int n = steps_read(path, steps, 64, &bytes);
    cr_assert_eq(steps[n - 1], 40);
    cr_assert_gt(n, 1);
    tmpdir_remove(dir);
}

Test(log_file, keep_zero_and_bad_arguments) {
    char *dir = tmpdir_new();
    char path[1024];
    snprintf(path, sizeof path, "%s/a.jsonl", dir);
    qerr_t err = {0};
    log_file_t *f = log_file_new(path, 300, 0, &err);
    cr_assert_not_null(f, "%s", err.msg);
    for (int s = 0; s < 10; s++)
        rec_write(f, s);
    log_file_destroy(&f);
    char p[1100];
    snprintf(p, sizeof p, "%s.1", path);
    cr_assert_neq(access(p, F_OK), 0);
    int steps[16];
    long bytes;
    int n = steps_read(path, steps, 16, &bytes);
    cr_assert_eq(steps[n - 1], 9);
    cr_assert_null(log_file_new(path, 0, -1, &err));
    cr_assert_null(log_file_new(path, 0, LOG_FILE_KEEP_MAX + 1, &err));
    snprintf(p, sizeof p, "%s/no/such/dir/x.jsonl", dir);
    cr_assert_null(log_file_new(p, 0, 1, &err));
    cr_assert(strstr(err.msg, "no/such/dir") != NULL, "%s", err.msg);
    tmpdir_remove(dir);
}

Test(log_file, sink) {
    char *dir = tmpdir_new();
    char path[1024];
    snprintf(path, sizeof path, "%s/s.jsonl", dir);
    log_init("test");
    log_set_stderr(0);
    qerr_t err = {0};
    log_file_t *f = log_file_sink_new(path, 0, 1, &err);
    cr_assert_not_null(f, "%s", err.msg);
    const log_field_t fl[] = {{"step", 3}};
    log_emit(LOG_INFO, "e", fl, 1, "hello");
    log_file_destroy(&f);
    log_emit(LOG_INFO, "e", fl, 1, "after"); /* not written: the sink is gone */
    int steps[4];
    long bytes;
    cr_assert_eq(steps_read(path, steps, 4, &bytes), 1);
    cr_assert_eq(steps[0], 3);
    tmpdir_remove(dir);
}
