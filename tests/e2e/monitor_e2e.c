/* Monitor robustness (issue 6, acceptance 5) with real processes and a real log hub:
 *   e2e_monitor QUILLAN WORK_DIR
 * 1. two `quillan monitor` processes start BEFORE any hub exists: one with --jsonl, one
 *    drawing the dashboard as plain text (stdout is a file);
 * 2. a log hub (learner/loghub.h, as the learner runs it) comes up on their address, and a log
 *    publisher (common/log_pub.h) of a "quillan-learner" sends learner.step records until both
 *    monitors show them;
 * 3. garbage goes to the hub from a raw PUB socket: random bytes, three-frame messages, an
 *    Envelope of another protocol version, an Envelope with a dispatch body, a LogRecord that
 *    fails validation; the hub forwards it as it is;
 * 4. the hub and publisher go away (the learner dies) and come back with a new incarnation on
 *    the same ports (the learner restarts), publishing steps from 5000;
 * 5. the monitors must be alive throughout, show the records after the restart, count the
 *    garbage, print only JSON lines (--jsonl), show the learner restart (dashboard), and exit
 *    0 on SIGINT. Exit status 0 means pass. */
#include "e2e.h"
#include "json.h"
#include "log.h"
#include "log_pub.h"
#include "loghub.h"
#include "net.h"

#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>
#include <zmq.h>

#define E2E_WAIT_S 60

typedef struct {
    loghub_t *hub;
    log_pub_t *pub;
} learner_t;

static int learner_start(void *zctx, learner_t *l, const char *in, const char *out) {
    qerr_t err = {0};
    loghub_options_t o;
    loghub_options_init(&o);
    o.in_endpoint = in;
    o.out_endpoint = out;
    o.publish_self = false;
    o.net.linger_ms = 0;
    l->hub = loghub_new(zctx, &o, &err);
    E2E_CHECK(l->hub != NULL, "hub: %s", err.msg);
    if (l->hub == NULL)
        return -1;
    net_options_t opt;
    net_options_init(&opt);
    opt.linger_ms = 0;
    net_security_t sec = {.mode = NET_SECURITY_NONE};
    l->pub = log_pub_new(zctx, in, &opt, &sec, "quillan-learner", net_incarnation_new(), &err);
    E2E_CHECK(l->pub != NULL, "publisher: %s", err.msg);
    return l->pub ? 0 : -1;
}

static void learner_stop(learner_t *l) {
    log_pub_destroy(&l->pub);
    loghub_destroy(&l->hub);
}

/* Logs learner.step records (with text) from step upwards until every file has needle (or
 * time runs out). Returns the next step. */
static int steps_until_seen(int step, const char *const files[], size_t n, const char *needle,
                            const char *text) {
    double t0 = e2e_now_s();
    for (;;) {
        const log_field_t f[] = {{"step", step},
                                 {"reward/mean", 0.25 + 0.01 * step},
                                 {"policy/version", step},
                                 {"staleness/mean", 0}};
        log_emit(LOG_INFO, "learner.step", f, 4, "%s", text);
        step++;
        usleep(100 * 1000);
        size_t seen = 0;
        for (size_t i = 0; i < n; i++)
            seen += e2e_file_has(NULL, files[i], needle) != 0;
        if (seen == n)
            return step;
        if (e2e_now_s() - t0 > E2E_WAIT_S) {
            E2E_CHECK(0, "'%s' did not reach every monitor within %d s", needle, E2E_WAIT_S);
            return step;
        }
    }
}

/* Garbage through the hub: a raw PUB connected to its XSUB, sending for about a second so that
 * the subscription has arrived. */
static void garbage_send(void *zctx, const char *in) {
    void *s = zmq_socket(zctx, ZMQ_PUB);
    int linger = 0;
    zmq_setsockopt(s, ZMQ_LINGER, &linger, sizeof linger);
    E2E_CHECK(zmq_connect(s, in) == 0, "garbage connect");
    /* Envelope{protocol_version = 999, log_record{event "x"}}: another version */
    const uint8_t version[] = {0x08, 0xe7, 0x07, 0x92, 0x03, 0x04, 0x2a, 0x02, 'x', 'y'};
    /* Envelope{protocol_version = 1, heartbeat{}}: a dispatch body on the log socket */
    const uint8_t body[] = {0x08, 0x01, 0xb2, 0x01, 0x00};
    /* Envelope{protocol_version = 1, log_record{time 0, event ""}}: fails validation */
    const uint8_t invalid[] = {0x08, 0x01, 0x92, 0x03, 0x00};
    srand(7);
    for (int k = 0; k < 20; k++) {
        uint8_t junk[64];
        for (size_t i = 0; i < sizeof junk; i++)
            junk[i] = (uint8_t)rand();
        zmq_send(s, junk, sizeof junk, 0);
        zmq_send(s, "a", 1, ZMQ_SNDMORE);
        zmq_send(s, "b", 1, ZMQ_SNDMORE);
        zmq_send(s, "c", 1, 0);
        zmq_send(s, version, sizeof version, 0);
        zmq_send(s, body, sizeof body, 0);
        zmq_send(s, invalid, sizeof invalid, 0);
        zmq_send(s, "", 0, 0);
        usleep(50 * 1000);
    }
    zmq_close(s);
}

/* Every line of path is a JSON object with an event; returns the number of lines. */
static size_t jsonl_check(const char *path) {
    char *s = e2e_file_read(NULL, path, NULL);
    size_t lines = 0, lineno = 0;
    for (char *p = s, *e; p && *p; p = e + 1) {
        e = strchr(p, '\n');
        E2E_CHECK(e != NULL, "%s: last line has no newline", path);
        if (e == NULL)
            break;
        lineno++;
        qerr_t err = {0};
        char what[64];
        snprintf(what, sizeof what, "line %zu", lineno);
        json_t *v = qjson_parse(p, (size_t)(e - p), what, &err);
        E2E_CHECK(v != NULL && json_is_object(v) && json_is_string(json_object_get(v, "event")),
                  "%s: %s", path, v ? "not a record" : err.msg);
        json_decref(v);
        lines++;
    }
    free(s);
    return lines;
}

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: e2e_monitor QUILLAN WORK_DIR\n");
        return 2;
    }
    const char *q = argv[1], *dir = argv[2];
    log_init("quillan-learner");
    log_set_stderr(0);
    void *zctx = zmq_ctx_new();
    char in[64], out[64];
    snprintf(in, sizeof in, "tcp://127.0.0.1:%d", e2e_free_port());
    snprintf(out, sizeof out, "tcp://127.0.0.1:%d", e2e_free_port());
    char jl_out[512], jl_err[512], db_out[512], db_err[512];
    snprintf(jl_out, sizeof jl_out, "%s/jsonl.out", dir);
    snprintf(jl_err, sizeof jl_err, "%s/jsonl.err", dir);
    snprintf(db_out, sizeof db_out, "%s/dash.out", dir);
    snprintf(db_err, sizeof db_err, "%s/dash.err", dir);

    /* 1. monitors before the hub */
    char *jl_argv[] = {(char *)q, "monitor", out, "--jsonl", NULL};
    char *db_argv[] = {(char *)q, "monitor", out, "--interval", "0.3", NULL};
    pid_t jl = e2e_spawn(jl_argv, jl_out, jl_err), db = e2e_spawn(db_argv, db_out, db_err);
    E2E_CHECK(jl > 0 && db > 0, "fork");
    usleep(1500 * 1000);
    E2E_CHECK(e2e_alive(jl) && e2e_alive(db), "a monitor died before the hub came up");
    E2E_CHECK(e2e_file_has(NULL, db_out, "waiting for records"),
              "the dashboard does not say it is waiting");

    /* 2. the hub and a learner's records */
    learner_t l = {0};
    const char *const jl_only[] = {jl_out}, *const db_only[] = {db_out};
    if (learner_start(zctx, &l, in, out) == 0) {
        int next = steps_until_seen(1, jl_only, 1, "learner.step", "first");
        steps_until_seen(next, db_only, 1, "restarts 0", "first");
    }

    /* 3. garbage */
    garbage_send(zctx, in);
    E2E_CHECK(e2e_alive(jl) && e2e_alive(db), "a monitor died of garbage");
    loghub_stats_t hs;
    loghub_stats(l.hub, &hs);
    E2E_CHECK(hs.forwarded > 20, "the hub forwarded only %llu messages",
              (unsigned long long)hs.forwarded);

    /* 4. the learner dies and restarts on the same ports */
    learner_stop(&l);
    usleep(1500 * 1000);
    E2E_CHECK(e2e_alive(jl) && e2e_alive(db), "a monitor died when the hub went away");
    if (learner_start(zctx, &l, in, out) == 0) {
        int next = steps_until_seen(5000, jl_only, 1, "after restart", "after restart");
        steps_until_seen(next, db_only, 1, "restarts 1", "after restart");
    }
    usleep(800 * 1000); /* one more dashboard frame */

    /* 5. verdicts */
    E2E_CHECK(e2e_alive(jl) && e2e_alive(db), "a monitor died");
    kill(jl, SIGINT);
    kill(db, SIGINT);
    int st_jl = 0, st_db = 0;
    waitpid(jl, &st_jl, 0);
    waitpid(db, &st_db, 0);
    E2E_CHECK(WIFEXITED(st_jl) && WEXITSTATUS(st_jl) == 0, "--jsonl monitor status 0x%x", st_jl);
    E2E_CHECK(WIFEXITED(st_db) && WEXITSTATUS(st_db) == 0, "dashboard monitor status 0x%x", st_db);
    size_t lines = jsonl_check(jl_out);
    E2E_CHECK(lines >= 2, "only %zu JSON lines", lines);
    char *err_text = e2e_file_read(NULL, jl_err, NULL);
    const char *e = err_text ? err_text : "";
    unsigned long long recs = 0, garbage = 0;
    const char *sum = strstr(e, "quillan monitor: ");
    E2E_CHECK(sum &&
                  sscanf(sum, "quillan monitor: %llu records, %llu garbage", &recs, &garbage) == 2,
              "no summary on stderr: %s", e);
    E2E_CHECK(garbage > 0, "no garbage counted: %s", e);
    E2E_CHECK(recs == lines, "%llu records but %zu lines", recs, lines);
    free(err_text);
    char *d = e2e_file_read(NULL, db_out, NULL);
    const char *last = d ? d : "";
    for (const char *p = last; (p = strstr(p, "---- ")) != NULL; p++)
        last = p;
    E2E_CHECK(strstr(last, "restarts 1") != NULL, "the last frame shows no learner restart:\n%s",
              last);
    E2E_CHECK(strstr(last, "garbage 0 ") == NULL && strstr(last, "garbage ") != NULL,
              "the last frame counts no garbage:\n%s", last);
    free(d);
    learner_stop(&l);
    zmq_ctx_term(zctx);
    if (e2e_failures) {
        fprintf(stderr, "%d e2e_failures (outputs in %s)\n", e2e_failures, dir);
        return 1;
    }
    printf("PASS: monitors survived a late hub, %llu garbage messages and a learner restart; "
           "%zu JSON lines\n",
           garbage, lines);
    return 0;
}
