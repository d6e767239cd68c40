/* End-to-end test of the dispatch protocol and the log hub with real processes on loopback.
 *
 * `dispatch_e2e run` (the driver) writes a JSONL dataset of N_PROMPTS prompts into a fresh
 * directory and runs, as separate processes of this executable:
 *   learner fresh   the dispatcher over the dataset (EPOCHS epochs); every accepted group is
 *                   appended to accepted.fresh and the state saved (dispatcher_save) to state;
 *   worker w1 fast  a dispatch_client returning a made-up but valid group 60 ms after each lease;
 *   worker w2 tricky  holds its first lease past the lease time-out (so it is re-leased and w1
 *                   finishes it), then sends it anyway (must be Acked DUPLICATE, written to
 *                   w2.dup), then holds its next lease forever (touches w2.holding).
 * The driver SIGKILLs w2 while it holds that lease: the learner must see it die and re-lease
 * the lease to w1 (it touches `died`). Then the driver SIGKILLs the learner mid-run and starts
 * `learner restore`, which resumes from the saved state with a new incarnation, finishes every
 * epoch and writes its counters to `final`; w1 notices the restart (w1.restarts).
 * The driver asserts: the first <accepted count of the restored state> lines of accepted.fresh
 * plus accepted.restore hold every (prompt, epoch) exactly once, every group id (lease id) at
 * most once; and the counters saw the time-out, the duplicate and the dead worker's release.
 *
 * `dispatch_e2e loghub`: a log hub in this process, a publisher in another process, a SUB
 * monitor here: the publisher's records and this process's own records reach the monitor.
 * Exit status 0 means pass. */
#include "dispatch_client.h"
#include "dispatcher.h"
#include "e2e.h"
#include "log_codec.h"
#include "log_pub.h"
#include "loghub.h"

#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <zmq.h>

#define N_PROMPTS 64
#define EPOCHS 3
#define G 2
#define HB_IVL_S 0.1
#define LIVENESS 5
#define LEASE_TIMEOUT_S 1.5
#define FAST_GROUP_S 0.06
#define TRICKY_HOLD_S 3.0 /* > LEASE_TIMEOUT_S */
#define LEASE_LIMIT 4
#define RUN_LIMIT_S 120.0 /* a hung process fails the test instead of hanging it */

static const dispatch_codec_limits_t limits = {.vocab_size = TOKENIZER_BYTE_VOCAB,
                                               .max_group_size = G,
                                               .max_prompt_tokens = 64,
                                               .max_new_tokens = 8};

/* ---- learner ---- */

typedef struct {
    const char *dir, *phase;
    dispatcher_t *d;
} learner_t;

static void state_write(learner_t *l) {
    uint8_t *buf = NULL;
    size_t len = 0;
    qerr_t e;
    if (dispatcher_save(l->d, &buf, &len, &e) != 0) {
        fprintf(stderr, "learner: save: %s\n", e.msg);
        exit(1);
    }
    char tmp[512], dst[512];
    e2e_path_of(tmp, sizeof tmp, l->dir, "state.tmp");
    e2e_path_of(dst, sizeof dst, l->dir, "state");
    FILE *f = fopen(tmp, "wb");
    if (f == NULL || fwrite(buf, 1, len, f) != len || fclose(f) != 0 || rename(tmp, dst) != 0) {
        fprintf(stderr, "learner: writing %s: %s\n", dst, strerror(errno));
        exit(1);
    }
    free(buf);
}

/* Takes every group. The dispatcher marks a group's unit accepted only after on_group took
 * it, so the state saved here holds exactly the units of the lines already written; this
 * group's line comes after it, and a kill before the next save leaves one line more than the
 * state counts, which the driver cuts off (the restored table re-leases that unit). */
static int on_group(void *ctx, const Quillan__TrajectoryGroup *g,
                    const dispatcher_group_info_t *info) {
    learner_t *l = ctx;
    state_write(l);
    char line[128], name[64];
    snprintf(line, sizeof line, "%llu %llu %llu\n", (unsigned long long)g->prompt_id,
             (unsigned long long)g->epoch, (unsigned long long)info->lease_id);
    snprintf(name, sizeof name, "accepted.%s", l->phase);
    e2e_file_append(l->dir, name, line);
    return 0;
}

static int learner_main(const char *dir, const char *phase) {
    log_init("e2e-learner");
    log_set_level(LOG_WARN);
    bool restore = strcmp(phase, "restore") == 0;
    char data[512];
    e2e_path_of(data, sizeof data, dir, "data.jsonl");
    qerr_t e;
    jsonl_reader_t *r = jsonl_reader_new(data, 0, &e);
    tokenizer_t *tok = tokenizer_new_byte();
    if (r == NULL || tok == NULL) {
        fprintf(stderr, "learner: %s\n", e.msg);
        return 1;
    }
    learner_t l = {.dir = dir, .phase = phase};
    dispatcher_options_t o;
    dispatcher_options_init(&o);
    char endpoint[256] = "tcp://127.0.0.1:*";
    uint8_t *state = NULL;
    size_t state_len = 0;
    if (restore) {
        size_t n = 0;
        char *ep = e2e_file_read(dir, "endpoint", &n);
        state = (uint8_t *)e2e_file_read(dir, "state", &state_len);
        if (ep == NULL || state == NULL || n == 0 || n >= sizeof endpoint) {
            fprintf(stderr, "learner: no endpoint or state to restore from\n");
            return 1;
        }
        memcpy(endpoint, ep, n);
        endpoint[n] = '\0';
        free(ep);
    }
    o.endpoint = endpoint;
    o.limits = limits;
    o.data = r;
    o.tokenizer = tok;
    o.max_epochs = EPOCHS;
    o.max_new_tokens = 8;
    o.heartbeat_ivl_s = HB_IVL_S;
    o.heartbeat_liveness = LIVENESS;
    o.lease_timeout_s = LEASE_TIMEOUT_S;
    o.on_group = on_group;
    o.on_group_ctx = &l;
    o.net.linger_ms = 0;
    void *zctx = zmq_ctx_new();
    l.d = dispatcher_new(zctx, &o, state, state_len, &e);
    free(state);
    if (l.d == NULL) {
        fprintf(stderr, "learner: %s\n", e.msg);
        return 1;
    }
    dispatcher_stats_t st;
    dispatcher_stats(l.d, &st);
    uint64_t restored = st.table.accepted;
    if (!restore)
        e2e_file_append(dir, "endpoint", dispatcher_endpoint(l.d));
    dispatcher_set_lease_limit(l.d, LEASE_LIMIT);
    double start = e2e_now_s(), finished_at = 0;
    while (e2e_now_s() - start < RUN_LIMIT_S) {
        if (dispatcher_poll(l.d, 20, &e) < 0) {
            fprintf(stderr, "learner: poll: %s\n", e.msg);
            return 1;
        }
        dispatcher_stats(l.d, &st);
        if (st.workers_died > 0 && !e2e_file_exists(dir, "died"))
            e2e_file_append(dir, "died", "1\n");
        if (finished_at == 0 && dispatcher_finished(l.d))
            finished_at = e2e_now_s();
        if (finished_at > 0 && e2e_now_s() - finished_at > 0.3)
            break; /* the last Acks are out */
    }
    if (finished_at == 0) {
        fprintf(stderr, "learner: not finished after %.0f s\n", RUN_LIMIT_S);
        return 1;
    }
    char text[512];
    snprintf(text, sizeof text, "%llu %llu %llu %llu %llu %llu %llu %llu\n",
             (unsigned long long)restored, (unsigned long long)st.table.accepted,
             (unsigned long long)st.table.duplicates, (unsigned long long)st.table.expired,
             (unsigned long long)st.table.released, (unsigned long long)st.table.relet,
             (unsigned long long)st.table.unknown, (unsigned long long)st.table.rejected);
    e2e_file_append(dir, "final", text);
    dispatcher_destroy(&l.d);
    zmq_ctx_term(zctx);
    jsonl_reader_destroy(&r);
    tokenizer_destroy(&tok);
    return 0;
}

/* ---- worker ---- */

#define WORK_MAX 64

typedef struct {
    uint64_t lease_id, prompt_id, epoch;
    uint32_t prompt[64];
    size_t n_prompt;
    Quillan__SamplingParams sampling;
    double ready_s; /* 0: held forever */
} work_t;

typedef struct {
    const char *dir, *name;
    bool tricky;
    work_t work[WORK_MAX];
    size_t n_work;
    uint64_t first_lease;
    bool dup_seen;
} worker_t;

static void on_work(void *ctx, const Quillan__RolloutRequest *rq, uint32_t timeout_ms) {
    worker_t *w = ctx;
    (void)timeout_ms;
    if (w->n_work == WORK_MAX || rq->n_prompt_tokens > 64) {
        fprintf(stderr, "%s: unexpected lease %llu\n", w->name, (unsigned long long)rq->lease_id);
        exit(1);
    }
    work_t *k = &w->work[w->n_work++];
    k->lease_id = rq->lease_id;
    k->prompt_id = rq->prompt_id;
    k->epoch = rq->epoch;
    k->n_prompt = rq->n_prompt_tokens;
    memcpy(k->prompt, rq->prompt_tokens, rq->n_prompt_tokens * sizeof *k->prompt);
    k->sampling = *rq->sampling;
    k->sampling.base.unknown_fields = NULL;
    k->sampling.base.n_unknown_fields = 0;
    k->sampling.n_stop_tokens = 0;
    k->sampling.stop_tokens = NULL;
    double now = e2e_now_s();
    if (!w->tricky) {
        k->ready_s = now + FAST_GROUP_S;
    } else if (w->first_lease == 0) {
        w->first_lease = rq->lease_id;
        k->ready_s = now + TRICKY_HOLD_S;
    } else {
        k->ready_s = 0;
        e2e_file_append(w->dir, "w2.holding", "1\n");
    }
}

static void on_ack(void *ctx, uint64_t lease_id, Quillan__AckStatus status) {
    worker_t *w = ctx;
    if (w->tricky && lease_id == w->first_lease && status != 0) {
        char text[32];
        snprintf(text, sizeof text, "%d\n", (int)status);
        e2e_file_append(w->dir, "w2.dup", text);
    }
}

static void on_restart(void *ctx) {
    worker_t *w = ctx;
    char name[64];
    snprintf(name, sizeof name, "%s.restarts", w->name);
    e2e_file_append(w->dir, name, "1\n");
}

static int group_send(dispatch_client_t *c, const work_t *k) {
    uint32_t tokens[3] = {'4', '2', TOKENIZER_BYTE_EOS};
    float logp[3] = {-0.5f, -0.25f, -0.125f};
    Quillan__Trajectory t[G], *tp[G];
    for (int i = 0; i < G; i++) {
        quillan__trajectory__init(&t[i]);
        t[i].n_completion_tokens = 3;
        t[i].completion_tokens = tokens;
        t[i].n_behaviour_logprobs = 3;
        t[i].behaviour_logprobs = logp;
        t[i].maybe_reward_case = QUILLAN__TRAJECTORY__MAYBE_REWARD_REWARD;
        t[i].reward = (double)((k->prompt_id + (uint64_t)i) % 2);
        t[i].finish_reason = QUILLAN__FINISH_REASON__FINISH_REASON_STOP;
        tp[i] = &t[i];
    }
    Quillan__SamplingParams sp = k->sampling;
    Quillan__TrajectoryGroup g = QUILLAN__TRAJECTORY_GROUP__INIT;
    g.lease_id = k->lease_id;
    g.prompt_id = k->prompt_id;
    g.epoch = k->epoch;
    g.n_prompt_tokens = k->n_prompt;
    g.prompt_tokens = (uint32_t *)k->prompt;
    g.n_trajectories = G;
    g.trajectories = tp;
    g.sampling = &sp;
    g.gen_seconds = FAST_GROUP_S;
    qerr_t e;
    if (dispatch_client_send_group(c, &g, &e) != 0) {
        fprintf(stderr, "worker: %s\n", e.msg);
        return -1;
    }
    return 0;
}

static int worker_main(const char *dir, const char *endpoint, const char *name, const char *mode) {
    log_init(name);
    log_set_level(LOG_WARN);
    worker_t w = {.dir = dir, .name = name, .tricky = strcmp(mode, "tricky") == 0};
    dispatch_client_options_t o;
    dispatch_client_options_init(&o);
    o.endpoint = endpoint;
    o.worker_id = name;
    o.host = "localhost";
    o.limits = limits;
    o.capacity = 1;
    o.heartbeat_ivl_s = HB_IVL_S;
    o.heartbeat_liveness = LIVENESS;
    o.net.linger_ms = 0;
    o.cb = (dispatch_client_callbacks_t){
        .on_work = on_work, .on_ack = on_ack, .on_restart = on_restart, .ctx = &w};
    void *zctx = zmq_ctx_new();
    qerr_t e;
    dispatch_client_t *c = dispatch_client_new(zctx, &o, &e);
    if (c == NULL) {
        fprintf(stderr, "%s: %s\n", name, e.msg);
        return 1;
    }
    double start = e2e_now_s();
    while (e2e_now_s() - start < RUN_LIMIT_S) { /* the driver ends it */
        if (dispatch_client_poll(c, 10, &e) < 0) {
            fprintf(stderr, "%s: poll: %s\n", name, e.msg);
            return 1;
        }
        double now = e2e_now_s();
        for (size_t i = 0; i < w.n_work;) {
            if (w.work[i].ready_s > 0 && w.work[i].ready_s <= now) {
                if (group_send(c, &w.work[i]) != 0)
                    return 1;
                w.work[i] = w.work[--w.n_work];
            } else {
                i++;
            }
        }
    }
    dispatch_client_destroy(&c);
    zmq_ctx_term(zctx);
    return 1;
}

/* ---- driver ---- */

/* This executable with up to five arguments (a NULL ends them early); output inherited. */
static pid_t spawn(const char *self, const char *a1, const char *a2, const char *a3, const char *a4,
                   const char *a5) {
    char *argv[] = {(char *)self, (char *)a1, (char *)a2, (char *)a3, (char *)a4, (char *)a5, NULL};
    return e2e_spawn(argv, NULL, NULL);
}

/* Waits until cond(dir) holds; 0, or -1 after RUN_LIMIT_S. */
static int wait_for(const char *dir, const char *name, size_t min_lines) {
    double start = e2e_now_s();
    while (e2e_now_s() - start < RUN_LIMIT_S) {
        if (min_lines == 0 ? e2e_file_exists(dir, name)
                           : e2e_file_lines(dir, name, NULL) >= min_lines)
            return 0;
        e2e_sleep_s(0.01);
    }
    fprintf(stderr, "FAIL: waited %.0f s for %s\n", RUN_LIMIT_S, name);
    e2e_failures++;
    return -1;
}

/* Reads "p e lease" lines; marks count[e][p] and lease ids. */
static void lines_tally(const char *dir, const char *name, size_t max_lines,
                        int count[EPOCHS][N_PROMPTS], uint64_t *leases, size_t *n_leases) {
    char p[512];
    e2e_path_of(p, sizeof p, dir, name);
    FILE *f = fopen(p, "r");
    if (f == NULL)
        return;
    unsigned long long pr, ep, le;
    for (size_t i = 0; i < max_lines && fscanf(f, "%llu %llu %llu", &pr, &ep, &le) == 3; i++) {
        E2E_CHECK(pr < N_PROMPTS && ep < EPOCHS, "%s: unit (%llu, %llu)", name, pr, ep);
        if (pr < N_PROMPTS && ep < EPOCHS)
            count[ep][pr]++;
        leases[(*n_leases)++] = le;
    }
    fclose(f);
}

static int run_main(const char *self) {
    char dir[] = "/tmp/quillan-dispatch-e2e-XXXXXX";
    if (mkdtemp(dir) == NULL) {
        perror("mkdtemp");
        return 1;
    }
    for (int i = 0; i < N_PROMPTS; i++) {
        char line[96];
        snprintf(line, sizeof line, "{\"prompt\": \"%d+%d=\", \"answer\": \"%d\"}\n", i, i, 2 * i);
        e2e_file_append(dir, "data.jsonl", line);
    }
    pid_t learner = spawn(self, "learner", dir, "fresh", NULL, NULL);
    if (wait_for(dir, "endpoint", 0) != 0) {
        e2e_kill(learner);
        return 1;
    }
    e2e_sleep_s(0.05);
    size_t n = 0;
    char *ep = e2e_file_read(dir, "endpoint", &n);
    char endpoint[256] = "";
    if (ep && n < sizeof endpoint)
        memcpy(endpoint, ep, n);
    free(ep);
    pid_t w1 = spawn(self, "worker", dir, endpoint, "w1", "fast");
    pid_t w2 = spawn(self, "worker", dir, endpoint, "w2", "tricky");

    /* w2: duplicate, then holding a lease -> SIGKILL; the learner must notice. */
    if (wait_for(dir, "w2.dup", 0) == 0 && wait_for(dir, "w2.holding", 0) == 0)
        fprintf(stderr, "driver: killing w2 while it holds a lease\n");
    e2e_kill(w2);
    wait_for(dir, "died", 0);
    size_t at = e2e_file_lines(dir, "accepted.fresh", NULL);
    wait_for(dir, "accepted.fresh", at + 3);
    int st = e2e_kill(learner);
    E2E_CHECK(st >= 128,
              "the first learner ended before the kill (status %d): it finished "
              "too early for the test",
              st);
    fprintf(stderr, "driver: learner killed after %zu accepted groups; restarting\n",
            e2e_file_lines(dir, "accepted.fresh", NULL));

    learner = spawn(self, "learner", dir, "restore", NULL, NULL);
    st = e2e_wait_exit(learner, 2 * RUN_LIMIT_S);
    E2E_CHECK(st == 0, "the restored learner failed (status %d)", st);
    e2e_kill(w1);

    unsigned long long restored = 0, fin[7] = {0};
    char fp[512];
    e2e_path_of(fp, sizeof fp, dir, "final");
    FILE *f = fopen(fp, "r");
    E2E_CHECK(f && fscanf(f, "%llu %llu %llu %llu %llu %llu %llu %llu", &restored, &fin[0], &fin[1],
                          &fin[2], &fin[3], &fin[4], &fin[5], &fin[6]) == 8,
              "no final counters");
    if (f)
        fclose(f);
    int count[EPOCHS][N_PROMPTS] = {{0}};
    static uint64_t leases[4 * EPOCHS * N_PROMPTS];
    size_t n_leases = 0;
    size_t fresh_lines = e2e_file_lines(dir, "accepted.fresh", NULL);
    E2E_CHECK(restored > 0 && (restored == fresh_lines || restored + 1 == fresh_lines),
              "the restored state counts %llu accepted groups, the first learner logged %zu",
              restored, fresh_lines);
    lines_tally(dir, "accepted.fresh", (size_t)restored, count, leases, &n_leases);
    lines_tally(dir, "accepted.restore", SIZE_MAX, count, leases, &n_leases);
    for (int e = 0; e < EPOCHS; e++)
        for (int p = 0; p < N_PROMPTS; p++)
            E2E_CHECK(count[e][p] == 1, "prompt %d of epoch %d accepted %d times", p, e,
                      count[e][p]);
    for (size_t i = 0; i < n_leases; i++)
        for (size_t j = i + 1; j < n_leases; j++)
            E2E_CHECK(leases[i] != leases[j], "group id %llu accepted twice",
                      (unsigned long long)leases[i]);
    E2E_CHECK(fin[0] == (unsigned long long)EPOCHS * N_PROMPTS, "accepted counter %llu", fin[0]);
    E2E_CHECK(fin[1] >= 1, "no duplicate counted");
    E2E_CHECK(fin[2] >= 1, "no lease timed out");
    E2E_CHECK(fin[3] >= 1, "the dead worker's lease was not released");
    E2E_CHECK(fin[4] >= 2, "re-leases: %llu", fin[4]);
    E2E_CHECK(fin[6] == 0, "%llu groups rejected", fin[6]);
    char dup[8] = "";
    e2e_path_of(fp, sizeof fp, dir, "w2.dup");
    f = fopen(fp, "r");
    E2E_CHECK(f && fgets(dup, sizeof dup, f) &&
                  atoi(dup) == QUILLAN__ACK_STATUS__ACK_STATUS_DUPLICATE,
              "w2's late group was answered '%s', not DUPLICATE", dup);
    if (f)
        fclose(f);
    E2E_CHECK(e2e_file_exists(dir, "w1.restarts"), "w1 never noticed the learner restart");
    fprintf(stderr,
            "dispatch e2e: %d units exactly once; restored %llu; duplicates %llu, expired %llu, "
            "released %llu, re-leases %llu, unknown %llu\n",
            EPOCHS * N_PROMPTS, restored, fin[1], fin[2], fin[3], fin[4], fin[5]);
    if (e2e_failures == 0) {
        char cmd[600];
        snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
        if (system(cmd) != 0)
            fprintf(stderr, "could not remove %s\n", dir);
    } else {
        fprintf(stderr, "files kept in %s\n", dir);
    }
    return e2e_failures ? 1 : 0;
}

/* ---- log hub ---- */

static int publisher_main(const char *endpoint) {
    log_init("e2e-pub");
    log_set_stderr(0);
    void *zctx = zmq_ctx_new();
    net_options_t o;
    net_options_init(&o);
    o.linger_ms = 0;
    net_security_t sec = {NET_SECURITY_NONE};
    qerr_t e;
    log_pub_t *p = log_pub_new(zctx, endpoint, &o, &sec, "e2e-pub", net_incarnation_new(), &e);
    if (p == NULL) {
        fprintf(stderr, "publisher: %s\n", e.msg);
        return 1;
    }
    for (int i = 0; i < (int)(RUN_LIMIT_S / 0.02); i++) { /* until the driver kills it */
        log_field_t f = {"i", (double)i};
        log_emit(LOG_INFO, "e2e.tick", &f, 1, NULL);
        e2e_sleep_s(0.02);
    }
    log_pub_destroy(&p);
    zmq_ctx_term(zctx);
    return 1;
}

static int loghub_main(const char *self) {
    log_init("e2e-hub");
    log_set_stderr(0);
    void *zctx = zmq_ctx_new();
    loghub_options_t o;
    loghub_options_init(&o);
    o.in_endpoint = "tcp://127.0.0.1:*";
    o.out_endpoint = "tcp://127.0.0.1:*";
    o.net.linger_ms = 0;
    o.sender_id = "e2e-hub";
    qerr_t e;
    loghub_t *h = loghub_new(zctx, &o, &e);
    if (h == NULL) {
        fprintf(stderr, "hub: %s\n", e.msg);
        return 1;
    }
    net_socket_spec_t spec = {.type = ZMQ_SUB,
                              .protocol = WIRE_PROTOCOL_LOG,
                              .name = "e2e-monitor",
                              .sender_id = "e2e-monitor",
                              .incarnation_id = net_incarnation_new(),
                              .validate = log_codec_net_validate};
    net_socket_t *mon = net_socket_new(zctx, &spec, &o.net, &o.security, &e);
    E2E_CHECK(mon != NULL, "%s", e.msg);
    E2E_CHECK(zmq_setsockopt(net_socket_handle(mon), ZMQ_SUBSCRIBE, "", 0) == 0, "subscribe");
    E2E_CHECK(net_socket_connect(mon, loghub_out_endpoint(h), &e) == 0, "%s", e.msg);
    pid_t pub = spawn(self, "publisher", loghub_in_endpoint(h), NULL, NULL, NULL);
    int got_pub = 0, got_self = 0;
    double start = e2e_now_s(), next_self = 0;
    while ((!got_pub || !got_self) && e2e_now_s() - start < 30.0 && !e2e_failures) {
        if (e2e_now_s() >= next_self) {
            log_info("e2e.self", "the hub's own process logs");
            next_self = e2e_now_s() + 0.1;
        }
        net_msg_t *m = NULL;
        int rc = net_recv(mon, 50, &m, &e);
        E2E_CHECK(rc >= 0, "monitor: %s", e.msg);
        if (rc != 1)
            continue;
        const Quillan__LogRecord *lr = net_msg_envelope(m)->log_record;
        if (strcmp(lr->event, "e2e.tick") == 0 && strcmp(lr->process, "e2e-pub") == 0 &&
            lr->n_fields == 1 && strcmp(lr->fields[0]->key, "i") == 0)
            got_pub = 1;
        if (strcmp(lr->event, "e2e.self") == 0 && strcmp(lr->process, "e2e-hub") == 0)
            got_self = 1;
        net_msg_destroy(&m);
    }
    e2e_kill(pub);
    E2E_CHECK(got_pub, "no record of the publisher process reached the monitor");
    E2E_CHECK(got_self, "no record of the hub's own process reached the monitor");
    loghub_stats_t s;
    loghub_stats(h, &s);
    E2E_CHECK(s.forwarded >= 2, "forwarded %llu", (unsigned long long)s.forwarded);
    E2E_CHECK(s.subscriptions >= 1, "subscriptions %llu", (unsigned long long)s.subscriptions);
    fprintf(stderr, "log hub e2e: forwarded %llu, dropped %llu, subscriptions %llu\n",
            (unsigned long long)s.forwarded, (unsigned long long)s.dropped,
            (unsigned long long)s.subscriptions);
    net_socket_destroy(&mon);
    loghub_destroy(&h);
    E2E_CHECK(h == NULL, "destroy NULLs the pointer");
    zmq_ctx_term(zctx);
    return e2e_failures ? 1 : 0;
}

int main(int argc, char **argv) {
    signal(SIGPIPE, SIG_IGN);
    if (argc == 2 && strcmp(argv[1], "run") == 0)
        return run_main(argv[0]);
    if (argc == 2 && strcmp(argv[1], "loghub") == 0)
        return loghub_main(argv[0]);
    if (argc == 4 && strcmp(argv[1], "learner") == 0)
        return learner_main(argv[2], argv[3]);
    if (argc == 6 && strcmp(argv[1], "worker") == 0)
        return worker_main(argv[2], argv[3], argv[4], argv[5]);
    if (argc == 3 && strcmp(argv[1], "publisher") == 0)
        return publisher_main(argv[2]);
    fprintf(stderr, "usage: %s run | loghub\n", argv[0]);
    return 2;
}
