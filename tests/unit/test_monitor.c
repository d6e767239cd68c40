/* The dashboard state of `quillan monitor` (common/monitor.h): records in, screen and alerts
 * out. tests/e2e/monitor_e2e.c drives the real process through a real hub. */
#include "monitor.h"

#include <criterion/criterion.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#define T0 1000000.0

static const monitor_view_t plain = {.width = 200, .color = 0, .utf8 = 0};

static void step(monitor_t *m, double t, double s, double reward, double stale, double ratio) {
    const log_field_t f[] = {{"step", s},
                             {"reward/mean", reward},
                             {"policy/version", s + 1},
                             {"staleness/mean", stale},
                             {"policy/ratio_mean", ratio},
                             {"tis/mean_weight", 1.0}};
    log_record_t r = {.time = t,
                      .process = "quillan-learner",
                      .host = "gpu1",
                      .level = LOG_INFO,
                      .event = "learner.step",
                      .fields = f,
                      .n_fields = 6,
                      .text = ""};
    monitor_ingest(m, &r, "quillan-learner", 11, t);
}

static void group(monitor_t *m, double t, const char *id, const char *host, double groups) {
    const log_field_t f[] = {
        {"tokens_per_s", 123.5}, {"groups_done", groups}, {"snapshot_version", 7}};
    log_record_t r = {.time = t,
                      .process = "quillan-rollout",
                      .host = host,
                      .level = LOG_INFO,
                      .event = "rollout.group",
                      .fields = f,
                      .n_fields = 3,
                      .text = ""};
    monitor_ingest(m, &r, id, 22, t);
}

static void reward_stats(monitor_t *m, double t, double requests, double failed) {
    const log_field_t f[] = {{"requests", requests},
                             {"failed", failed},
                             {"latency_mean_ms", 1.5},
                             {"latency_max_ms", 9}};
    log_record_t r = {.time = t,
                      .process = "quillan-reward",
                      .host = "cpu9",
                      .level = LOG_INFO,
                      .event = "reward.stats",
                      .fields = f,
                      .n_fields = 4,
                      .text = ""};
    monitor_ingest(m, &r, "quillan-reward", 33, t);
}

Test(monitor, screen_shows_learner_workers_and_rewards) {
    monitor_t *m = monitor_new(NULL);
    cr_assert_not_null(m);
    for (int i = 1; i <= 5; i++)
        step(m, T0 + i, i, 0.1 * i, 0, 1.0);
    group(m, T0 + 5, "w-a", "hostA", 12);
    group(m, T0 + 5, "w-b", "hostB", 3);
    reward_stats(m, T0 + 5, 40, 0);
    monitor_set_link(m, "tcp://x:5558", 4, 1);
    char *s = monitor_render(m, T0 + 6, &plain);
    cr_assert_not_null(s);
    cr_assert(strstr(s, "step 5") != NULL, "%s", s);
    cr_assert(strstr(s, "policy v6") != NULL, "%s", s);
    cr_assert(strstr(s, "reward/mean") && strstr(s, "0.5000"), "%s", s);
    cr_assert(strstr(s, "w-a") && strstr(s, "hostA") && strstr(s, "w-b") && strstr(s, "hostB"),
              "%s", s);
    cr_assert(strstr(s, "workers (2)") != NULL, "%s", s);
    cr_assert(strstr(s, "reward services (1)") && strstr(s, "cpu9"), "%s", s);
    cr_assert(strstr(s, "garbage 4") && strstr(s, "disconnects 1"), "%s", s);
    cr_assert(strstr(s, "\x1b") == NULL, "escape codes without colour");
    /* the ASCII sparkline of a rising reward ends at the top level */
    cr_assert(strstr(s, "#") != NULL, "%s", s);
    char *a = monitor_alerts(m, T0 + 6);
    cr_assert_str_eq(a, "");
    free(a);
    free(s);
    monitor_destroy(&m);
    cr_assert_null(m);
}

Test(monitor, width_cuts_lines_and_colour_is_optional) {
    monitor_t *m = monitor_new(NULL);
    step(m, T0, 1, 0.5, 0, 1);
    monitor_view_t narrow = {.width = 30, .color = 1, .utf8 = 1};
    char *s = monitor_render(m, T0, &narrow);
    cr_assert(strstr(s, "\x1b[") != NULL);
    for (char *line = s, *e; (e = strchr(line, '\n')) != NULL; line = e + 1) {
        int cols = 0;
        for (char *p = line; p < e; p++) {
            if (*p == 0x1b) {
                while (p < e && *p != 'm')
                    p++;
                continue;
            }
            cols += ((unsigned char)*p & 0xc0) != 0x80;
        }
        cr_assert_leq(cols, 30, "line of %d columns", cols);
    }
    free(s);
    monitor_destroy(&m);
}

Test(monitor, alerts) {
    monitor_options_t o;
    monitor_options_init(&o);
    monitor_t *m = monitor_new(&o);
    group(m, T0, "w-a", "hostA", 1);
    group(m, T0 + 100, "w-b", "hostB", 1);
    reward_stats(m, T0 + 100, 10, 0);
    reward_stats(m, T0 + 110, 20, 3); /* failed rose */
    /* staleness rising over the window, importance ratio collapsed */
    for (int i = 0; i < 5; i++)
        step(m, T0 + 100 + i, i, 0, 0.3 * i, i < 4 ? 1.0 : 0.2);
    char *a = monitor_alerts(m, T0 + 111);
    cr_assert_not_null(a);
    cr_assert(strstr(a, "worker w-a@hostA silent for 111 s") != NULL, "%s", a);
    cr_assert(strstr(a, "w-b") == NULL, "%s", a);
    cr_assert(strstr(a, "reward service quillan-reward@cpu9 failing") != NULL, "%s", a);
    cr_assert(strstr(a, "importance ratio collapsing: policy/ratio_mean") != NULL, "%s", a);
    cr_assert(strstr(a, "staleness rising") != NULL, "%s", a);
    free(a);
    /* the reward alert ends with its window; a worker heard again is no longer silent */
    group(m, T0 + 400, "w-a", "hostA", 2);
    group(m, T0 + 400, "w-b", "hostB", 2);
    step(m, T0 + 400, 6, 0, 0.1, 1.0); /* staleness fell, ratio back to 1 */
    a = monitor_alerts(m, T0 + 400);
    cr_assert_str_eq(a, "");
    free(a);
    monitor_destroy(&m);
}

Test(monitor, restarts_and_odd_records) {
    monitor_t *m = monitor_new(NULL);
    step(m, T0, 10, 0.5, 0, 1);
    const log_field_t f[] = {{"step", 1}, {"reward/mean", NAN}};
    log_record_t r = {.time = T0 + 1,
                      .process = "quillan-learner",
                      .host = "gpu1",
                      .level = LOG_ERROR,
                      .event = "learner.step",
                      .fields = f,
                      .n_fields = 2,
                      .text = "line\nbreak\x1b[2J"};
    monitor_ingest(m, &r, "quillan-learner", 99, T0 + 1);             /* a new incarnation */
    log_record_t odd = {.time = T0, .level = LOG_WARN, .event = "x"}; /* NULL strings */
    monitor_ingest(m, &odd, NULL, 0, T0 + 1);
    cr_assert_eq(monitor_records(m), 3);
    char *s = monitor_render(m, T0 + 2, &plain);
    cr_assert(strstr(s, "restarts 1") != NULL, "%s", s);
    cr_assert(strstr(s, "recent warnings") != NULL, "%s", s);
    cr_assert(strstr(s, "line break") != NULL, "control characters are blanked: %s", s);
    cr_assert(strstr(s, "\x1b") == NULL, "an escape in a record's text reached the screen");
    free(s);
    monitor_destroy(&m);
}
