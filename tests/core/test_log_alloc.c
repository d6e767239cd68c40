#include "qtest.h"

#include "alloc.h"
#include "error.h"
#include "log.h"

#include <stdint.h>
#include <stdio.h>
#include <string.h>

Test(alloc, aligned_and_overflow_checked) {
    void *p = q_aligned_alloc(Q_ALIGN, 1000);
    cr_assert_not_null(p);
    cr_assert_eq((uintptr_t)p % Q_ALIGN, 0);
    q_aligned_free(p);
    cr_assert_null(q_aligned_alloc(3, 10), "alignment must be a power of two");
    cr_assert_null(q_aligned_calloc(SIZE_MAX / 2, 4), "overflowing size must fail");
    cr_assert_eq(q_mul_size(SIZE_MAX, 2), SIZE_MAX);
}

Test(error, set_and_wrap_compose_messages) {
    qerr_t e;
    qerr_clear(&e);
    cr_assert_eq(qerr_set(&e, QERR_RANGE, "value %d too big", 7), -1);
    cr_assert_eq(e.code, QERR_RANGE);
    qerr_wrap(&e, "file %s", "x.yaml");
    cr_assert_str_eq(e.msg, "file x.yaml: value 7 too big");
    cr_assert_str_eq(qerr_code_name(QERR_RANGE), "range");
    cr_assert_eq(qerr_set(NULL, QERR_IO, "ignored"), -1);
}

typedef struct {
    int n;
    char last_event[64];
    double last_value;
} sink_seen_t;

static void sink(void *ctx, const log_record_t *rec) {
    sink_seen_t *s = ctx;
    s->n++;
    snprintf(s->last_event, sizeof s->last_event, "%s", rec->event);
    s->last_value = rec->n_fields ? rec->fields[0].value : 0;
}

Test(log, format_escapes_and_sinks_filter_by_level) {
    log_record_t rec = {.time = 1.5,
                        .process = "p\"q",
                        .host = "h",
                        .level = LOG_WARN,
                        .event = "ev",
                        .text = "a\nb"};
    log_field_t f[2] = {{"x", 2.5}, {"nan", 0.0 / 0.0}};
    rec.fields = f;
    rec.n_fields = 2;
    char buf[512];
    size_t n = log_record_format_json(&rec, buf, sizeof buf);
    cr_assert_eq(n, strlen(buf));
    cr_assert_str_eq(buf,
                     "{\"time\":1.500000,\"process\":\"p\\\"q\",\"host\":\"h\",\"level\":\"warn\","
                     "\"event\":\"ev\",\"fields\":{\"x\":2.5,\"nan\":null},\"text\":\"a\\nb\"}\n");
    char small[8];
    cr_assert_eq(log_record_format_json(&rec, small, sizeof small), n, "reports the size needed");

    sink_seen_t seen = {0};
    log_init("test");
    log_set_stderr(0);
    log_set_level(LOG_INFO);
    cr_assert_eq(log_sink_add(sink, &seen), 0);
    log_field_t g = {"step", 3};
    log_emit(LOG_INFO, "metric", &g, 1, NULL);
    log_debug("hidden", "not shown %d", 1);
    cr_assert_eq(seen.n, 1);
    cr_assert_str_eq(seen.last_event, "metric");
    cr_assert_eq(seen.last_value, 3);
    log_sink_remove(sink, &seen);
    log_info("after", "x");
    cr_assert_eq(seen.n, 1);
    log_level_t lv;
    cr_assert_eq(log_level_parse("error", &lv), 0);
    cr_assert_eq(lv, LOG_ERROR);
    cr_assert_eq(log_level_parse("loud", &lv), -1);
}
