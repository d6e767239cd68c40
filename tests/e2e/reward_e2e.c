/* End-to-end tests of the reward services: the C client (reward/reward_client.h) against real
 * `quillan-reward` and Python example processes on loopback.
 *
 *   reward_e2e SCENARIO QUILLAN_REWARD PYTHON_SERVICE GEN_DIR LOG_DIR
 *
 * Scenarios:
 *   builtin    quillan-reward: scores of hand-worked completions, "no reward" arriving as
 *              missing, a REQ client answered through its delimiter frame
 *   python     the Python service: the same, and it survives garbage frames
 *   combined   both services with weights: the weighted sum, and one service's "no reward"
 *              making the sample's reward missing
 *   restart    SIGKILL the service; a call made while it is down times out, retries and gets
 *              the real scores from the restarted service
 *   dead       no service: the call fails with QERR_TIMEOUT after its retries, with no result
 *   late       a service (a ROUTER in this process) that answers an attempt late: the stale
 *              reply is discarded by request id and the current one accepted
 *   error      a service that answers Error UNAVAILABLE (retried), then RewardResponse.error:
 *              the call fails with QERR_INVALID and no rewards
 *   malformed  bad frames, another version, undecodable bytes, another protocol's body, an
 *              invalid request and a non-request to quillan-reward: each counted (reward.stop
 *              record of its log) and dropped, and the service still answers
 * Exit status 0 means pass. */
#include "config.h"
#include "e2e.h"
#include "json.h"
#include "log.h"
#include "net.h"
#include "reward_client.h"
#include "reward_codec.h"

#include <math.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>
#include <zmq.h>

#define EOS "<|endoftext|>"
#define SCORE_TOL 1e-12
/* Polls of 100 ms waiting for a raw reply before the test gives up instead of hanging. */
#define RAW_REPLY_POLLS 100
/* Seconds a service may take to stop on SIGTERM before it is killed and the stop fails. */
#define STOP_LIMIT_S 30.0

static const char *reward_bin, *python_script, *gen_dir, *log_dir;

/* ---- processes ---- */

static void endpoint_of(int port, char *buf, size_t cap) {
    snprintf(buf, cap, "tcp://127.0.0.1:%d", port);
}

/* Starts argv[0] with stdout and stderr appended to LOG_DIR/<log>; returns its pid. */
static pid_t spawn(char *const argv[], const char *log) {
    char path[E2E_PATH_MAX];
    e2e_path_of(path, sizeof path, log_dir, log);
    pid_t pid = e2e_spawn(argv, path, path);
    Q_ASSERT(pid >= 0);
    return pid;
}

/* quillan-reward on port with extra --set overrides (NULL-terminated). */
static pid_t start_builtin(int port, const char *log, const char *const *sets) {
    char bind[64];
    endpoint_of(port, bind, sizeof bind);
    char *argv[32];
    int n = 0;
    argv[n++] = (char *)reward_bin;
    argv[n++] = "--bind";
    argv[n++] = bind;
    argv[n++] = "--set";
    argv[n++] = "logging.hub=false";
    for (int i = 0; sets && sets[i] && n < 29; i++) {
        argv[n++] = "--set";
        argv[n++] = (char *)sets[i];
    }
    argv[n] = NULL;
    return spawn(argv, log);
}

static pid_t start_python(int port, const char *log, const char *answer_key) {
    char bind[64];
    endpoint_of(port, bind, sizeof bind);
    char *argv[] = {
        "/usr/bin/python3", (char *)python_script, "--bind",           bind, "--gen-dir",
        (char *)gen_dir,    "--answer-key",        (char *)answer_key, NULL};
    return spawn(argv, log);
}

/* ---- client config ---- */

/* A config whose reward.services is `services` (YAML flow list), with these timings. */
static void client_config(quillan_config_t *cfg, const char *services, double timeout_s,
                          int retries, double backoff_min_s, double backoff_max_s) {
    config_defaults(cfg);
    char set[1024];
    qerr_t e;
    snprintf(set, sizeof set, "reward.services=%s", services);
    Q_ASSERT(config_set(cfg, set, &e) == 0);
    cfg->reward.timeout_s = timeout_s;
    cfg->reward.retries = retries;
    cfg->reward.backoff_min_s = backoff_min_s;
    cfg->reward.backoff_max_s = backoff_max_s;
    if (config_validate(cfg, &e) != 0) {
        fprintf(stderr, "config: %s\n", e.msg);
        Q_ASSERT(0);
    }
}

static reward_client_t *client_for(const char *services, double timeout_s, int retries,
                                   double backoff_min_s, double backoff_max_s) {
    static quillan_config_t cfg;
    client_config(&cfg, services, timeout_s, retries, backoff_min_s, backoff_max_s);
    qerr_t e;
    reward_client_t *c = reward_client_new(&cfg, "reward-e2e", &e);
    if (c == NULL)
        fprintf(stderr, "reward_client_new: %s\n", e.msg);
    Q_ASSERT(c);
    return c;
}

static char *services_one(int port, const char *name, double weight) {
    static char buf[256];
    snprintf(buf, sizeof buf, "[{address: 'tcp://127.0.0.1:%d', weight: %g, name: %s}]", port,
             weight, name);
    return buf;
}

/* ---- batches ---- */

/* Completions of "5 + 7 =" whose answer is 12. */
static const char *const completions[] = {"12", " 12" EOS, "It is 12", "13"};
#define N_COMPLETIONS Q_ARRAY_LEN(completions)

static reward_batch_t batch_make(reward_sample_t *x, const reward_kv_t *md, size_t n_md) {
    static const uint32_t toks[] = {49, 50, 257};
    for (size_t i = 0; i < N_COMPLETIONS; i++)
        x[i] = (reward_sample_t){.prompt = "5 + 7 =",
                                 .completion = completions[i],
                                 .completion_tokens = toks,
                                 .n_completion_tokens = Q_ARRAY_LEN(toks),
                                 .finish_reason = REWARD_FINISH_STOP};
    return (reward_batch_t){.task = "add",
                            .samples = x,
                            .n_samples = N_COMPLETIONS,
                            .metadata = md,
                            .n_metadata = n_md};
}

static const reward_kv_t md_answer[] = {{"answer", "\"12\""}, {"level", "1"}};
static const reward_kv_t md_no_answer[] = {{"level", "1"}};

static void expect_totals(const reward_result_t *r, const double *want, const char *what) {
    E2E_CHECK(r->n_samples == N_COMPLETIONS, "%s: %zu results", what, r->n_samples);
    for (size_t i = 0; i < r->n_samples && i < N_COMPLETIONS; i++) {
        E2E_CHECK(r->total[i].has, "%s: sample %zu has no reward", what, i);
        E2E_CHECK(fabs(r->total[i].value - want[i]) <= SCORE_TOL, "%s: sample %zu: %g, expected %g",
                  what, i, r->total[i].value, want[i]);
    }
}

static void expect_no_reward(const reward_result_t *r, const char *what) {
    E2E_CHECK(r->n_samples == N_COMPLETIONS, "%s: %zu results", what, r->n_samples);
    for (size_t i = 0; i < r->n_samples; i++)
        E2E_CHECK(!r->total[i].has, "%s: sample %zu got %g instead of no reward", what, i,
                  r->total[i].value);
}

/* Scores with answers, then without; exact-match scores expected. */
static void exact_scenario(reward_client_t *c, const char *what) {
    static const double want[N_COMPLETIONS] = {1, 1, 0, 0};
    reward_sample_t x[N_COMPLETIONS];
    reward_result_t r;
    reward_result_init(&r);
    qerr_t e;
    reward_batch_t b = batch_make(x, md_answer, Q_ARRAY_LEN(md_answer));
    int rc = reward_client_score(c, &b, &r, &e);
    E2E_CHECK(rc == 0, "%s: %s", what, e.msg);
    if (rc == 0) {
        expect_totals(&r, want, what);
        E2E_CHECK(r.n_services == 1 && r.parts[0].has && r.parts[0].value == 1, "%s: parts", what);
    }
    b = batch_make(x, md_no_answer, Q_ARRAY_LEN(md_no_answer));
    rc = reward_client_score(c, &b, &r, &e);
    E2E_CHECK(rc == 0, "%s (no answer): %s", what, e.msg);
    if (rc == 0)
        expect_no_reward(&r, what);
    reward_result_free(&r);
}

/* ---- raw sockets ---- */

static net_socket_t *raw_socket(void *zctx, int type, const char *endpoint) {
    net_options_t o;
    net_options_init(&o);
    o.linger_ms = 0;
    static const reward_codec_limits_t lim = {.max_samples = REWARD_MAX_SAMPLES};
    net_security_t sec = {NET_SECURITY_NONE};
    net_socket_spec_t spec = {.type = type,
                              .protocol = WIRE_PROTOCOL_REWARD,
                              .name = "raw",
                              .sender_id = "reward-e2e-raw",
                              .incarnation_id = net_incarnation_new(),
                              .validate = reward_codec_net_validate,
                              .validate_ctx = (void *)&lim};
    qerr_t e;
    net_socket_t *s = net_socket_new(zctx, &spec, &o, &sec, &e);
    Q_ASSERT(s);
    if (type == ZMQ_ROUTER)
        Q_ASSERT(net_socket_bind(s, endpoint, &e) == 0);
    else
        Q_ASSERT(net_socket_connect(s, endpoint, &e) == 0);
    return s;
}

/* One RewardRequest of a single sample "12" with answer "12". */
typedef struct {
    Quillan__RewardRequest req;
    Quillan__RewardSample sample;
    Quillan__RewardSample *sp;
    Quillan__RewardRequest__MetadataEntry md;
    Quillan__RewardRequest__MetadataEntry *mdp;
    Quillan__Envelope env;
} one_request_t;

static void one_request_init(one_request_t *o, uint64_t request_id) {
    quillan__reward_request__init(&o->req);
    quillan__reward_sample__init(&o->sample);
    quillan__reward_request__metadata_entry__init(&o->md);
    o->sample.completion = "12";
    o->sample.finish_reason = QUILLAN__FINISH_REASON__FINISH_REASON_STOP;
    o->sp = &o->sample;
    o->md.key = "answer";
    o->md.value = "\"12\"";
    o->mdp = &o->md;
    o->req.request_id = request_id;
    o->req.samples = &o->sp;
    o->req.n_samples = 1;
    o->req.metadata = &o->mdp;
    o->req.n_metadata = 1;
    quillan__envelope__init(&o->env);
    o->env.body_case = QUILLAN__ENVELOPE__BODY_REWARD_REQUEST;
    o->env.reward_request = &o->req;
}

/* Sends one good request on s and waits for its reply: 1 when it scored 1, else 0. */
static int raw_roundtrip(net_socket_t *s, uint64_t request_id) {
    one_request_t o;
    one_request_init(&o, request_id);
    qerr_t e;
    if (net_send(s, NULL, &o.env, NULL, 0, NULL, &e) != 0) {
        fprintf(stderr, "raw send: %s\n", e.msg);
        return 0;
    }
    for (int i = 0; i < RAW_REPLY_POLLS; i++) {
        net_msg_t *m = NULL;
        int rc = net_recv(s, 100, &m, &e);
        if (rc < 0)
            return 0;
        if (rc == 0)
            continue;
        const Quillan__Envelope *env = net_msg_envelope(m);
        int ok = env->body_case == QUILLAN__ENVELOPE__BODY_REWARD_RESPONSE &&
                 env->reward_response->request_id == request_id &&
                 env->reward_response->n_scores == 1 &&
                 env->reward_response->scores[0]->maybe_score_case ==
                     QUILLAN__SCORE_ENTRY__MAYBE_SCORE_SCORE &&
                 env->reward_response->scores[0]->score == 1.0;
        net_msg_destroy(&m);
        return ok;
    }
    return 0;
}

static void raw_send_frames(net_socket_t *s, const void *const *frames, const size_t *lens, int n) {
    void *z = net_socket_handle(s);
    for (int i = 0; i < n; i++)
        Q_ASSERT(zmq_send(z, frames[i], lens[i], i + 1 < n ? ZMQ_SNDMORE : 0) >= 0);
}

static void raw_send_one(net_socket_t *s, const void *data, size_t len) {
    raw_send_frames(s, &data, &len, 1);
}

/* ---- scenarios ---- */

static void scenario_builtin(void) {
    int port = e2e_free_port();
    pid_t pid = start_builtin(port, "reward_e2e_builtin.log", NULL);
    reward_client_t *c = client_for(services_one(port, "builtin", 1), 5, 3, 0.2, 1);
    exact_scenario(c, "quillan-reward");
    reward_client_destroy(&c);
    E2E_CHECK(c == NULL, "destroy nulls the pointer");

    /* A REQ client: [""][Envelope] on the wire, answered through the delimiter. */
    void *zctx = zmq_ctx_new();
    char ep[64];
    endpoint_of(port, ep, sizeof ep);
    net_socket_t *req = raw_socket(zctx, ZMQ_REQ, ep);
    E2E_CHECK(raw_roundtrip(req, 77) == 1, "a REQ client is answered");
    net_socket_destroy(&req);
    zmq_ctx_term(zctx);
    E2E_CHECK(e2e_stop(pid, STOP_LIMIT_S) == 0, "quillan-reward stops cleanly on SIGTERM");
}

static void scenario_python(void) {
    int port = e2e_free_port();
    pid_t pid = start_python(port, "reward_e2e_python.log", "answer");
    reward_client_t *c = client_for(services_one(port, "python", 1), 5, 3, 0.2, 1);
    exact_scenario(c, "python");

    /* Garbage on a raw connection, then a good request on it: the service is still up. */
    void *zctx = zmq_ctx_new();
    char ep[64];
    endpoint_of(port, ep, sizeof ep);
    net_socket_t *raw = raw_socket(zctx, ZMQ_DEALER, ep);
    static const uint8_t junk[] = {0x08, 0x01, 0x12, 0xff};
    raw_send_one(raw, junk, sizeof junk);
    const void *three[] = {"a", "b", "c"};
    size_t three_len[] = {1, 1, 1};
    raw_send_frames(raw, three, three_len, 3);
    E2E_CHECK(raw_roundtrip(raw, 5) == 1, "python service answers after garbage");
    net_socket_destroy(&raw);
    zmq_ctx_term(zctx);
    exact_scenario(c, "python after garbage");
    reward_client_destroy(&c);
    E2E_CHECK(e2e_stop(pid, STOP_LIMIT_S) == 0, "python service stops cleanly on SIGTERM");
}

static void scenario_combined(void) {
    int pc = e2e_free_port(), pp = e2e_free_port();
    /* quillan-reward: exact + numeric, so "It is 12" scores 1 there and 0 in Python. */
    static const char *const sets[] = {"reward.builtin.numeric.weight=1", NULL};
    pid_t c_pid = start_builtin(pc, "reward_e2e_combined_c.log", sets);
    pid_t p_pid = start_python(pp, "reward_e2e_combined_py.log", "answer");
    char services[512];
    snprintf(services, sizeof services,
             "[{address: 'tcp://127.0.0.1:%d', weight: 0.5, name: c}, "
             "{address: 'tcp://127.0.0.1:%d', weight: 2, name: py}]",
             pc, pp);
    reward_client_t *c = client_for(services, 5, 3, 0.2, 1);
    E2E_CHECK(reward_client_n_services(c) == 2, "two services");
    E2E_CHECK(!strcmp(reward_client_service_name(c, 1), "py"), "service names");
    reward_sample_t x[N_COMPLETIONS];
    reward_result_t r;
    reward_result_init(&r);
    qerr_t e;
    /* c: exact + numeric = {2, 2, 1, 0}; py: exact = {1, 1, 0, 0}. */
    static const double want[N_COMPLETIONS] = {0.5 * 2 + 2 * 1, 0.5 * 2 + 2 * 1, 0.5 * 1, 0};
    reward_batch_t b = batch_make(x, md_answer, Q_ARRAY_LEN(md_answer));
    int rc = reward_client_score(c, &b, &r, &e);
    E2E_CHECK(rc == 0, "combined: %s", e.msg);
    if (rc == 0) {
        expect_totals(&r, want, "combined");
        E2E_CHECK(r.parts[0 * N_COMPLETIONS + 2].value == 1 &&
                      r.parts[1 * N_COMPLETIONS + 2].value == 0,
                  "unweighted parts per service");
    }
    reward_client_destroy(&c);
    e2e_stop(p_pid, STOP_LIMIT_S);

    /* Python now reads another field, absent here: its "no reward" voids the whole sample
     * although quillan-reward scores it. */
    pp = e2e_free_port();
    p_pid = start_python(pp, "reward_e2e_combined_py.log", "solution");
    snprintf(services, sizeof services,
             "[{address: 'tcp://127.0.0.1:%d', weight: 0.5, name: c}, "
             "{address: 'tcp://127.0.0.1:%d', weight: 2, name: py}]",
             pc, pp);
    c = client_for(services, 5, 3, 0.2, 1);
    rc = reward_client_score(c, &b, &r, &e);
    E2E_CHECK(rc == 0, "combined, python without answer: %s", e.msg);
    if (rc == 0) {
        expect_no_reward(&r, "one service without a reward");
        E2E_CHECK(r.parts[0].has && r.parts[0].value == 2, "quillan-reward still scored sample 0");
        E2E_CHECK(!r.parts[N_COMPLETIONS].has, "python said no reward");
    }
    reward_result_free(&r);
    reward_client_destroy(&c);
    E2E_CHECK(e2e_stop(p_pid, STOP_LIMIT_S) == 0, "python stops cleanly");
    E2E_CHECK(e2e_stop(c_pid, STOP_LIMIT_S) == 0, "quillan-reward stops cleanly");
}

static void scenario_restart(void) {
    int port = e2e_free_port();
    pid_t pid = start_builtin(port, "reward_e2e_restart.log", NULL);
    /* Timeout 0.5 s, up to 20 retries with 0.2-0.5 s back-off: ~20 s for the restart. */
    reward_client_t *c = client_for(services_one(port, "builtin", 1), 0.5, 20, 0.2, 0.5);
    exact_scenario(c, "before the kill");
    reward_client_stats_t st0;
    reward_client_stats(c, &st0);

    e2e_kill(pid);
    /* The restart comes from a child that waits 1.5 s: longer than one timeout, so the call
     * below must time out at least once, retry on a fresh socket, and then succeed. */
    pid_t restarter = fork();
    Q_ASSERT(restarter >= 0);
    if (restarter == 0) {
        e2e_sleep_s(1.5);
        char bind[64];
        endpoint_of(port, bind, sizeof bind);
        char *argv[] = {(char *)reward_bin, "--bind", bind, "--set", "logging.hub=false", NULL};
        char path[E2E_PATH_MAX];
        e2e_path_of(path, sizeof path, log_dir, "reward_e2e_restart.log");
        e2e_exec(argv, path, path);
    }
    static const double want[N_COMPLETIONS] = {1, 1, 0, 0};
    reward_sample_t x[N_COMPLETIONS];
    reward_result_t r;
    reward_result_init(&r);
    qerr_t e;
    reward_batch_t b = batch_make(x, md_answer, Q_ARRAY_LEN(md_answer));
    int rc = reward_client_score(c, &b, &r, &e);
    E2E_CHECK(rc == 0, "after the restart: %s", e.msg);
    if (rc == 0)
        expect_totals(&r, want, "after the restart");
    reward_client_stats_t st;
    reward_client_stats(c, &st);
    E2E_CHECK(st.timeouts >= st0.timeouts + 1,
              "the call timed out while the service was down (%llu)",
              (unsigned long long)(st.timeouts - st0.timeouts));
    E2E_CHECK(st.attempts >= st0.attempts + 2, "and retried");
    reward_result_free(&r);
    reward_client_destroy(&c);
    E2E_CHECK(e2e_stop(restarter, STOP_LIMIT_S) == 0, "the restarted service stops cleanly");
}

static void scenario_dead(void) {
    int port = e2e_free_port(); /* nothing listens there */
    reward_client_t *c = client_for(services_one(port, "nobody", 1), 0.3, 2, 0.1, 0.2);
    reward_sample_t x[N_COMPLETIONS];
    reward_result_t r;
    reward_result_init(&r);
    qerr_t e;
    qerr_clear(&e);
    reward_batch_t b = batch_make(x, md_answer, Q_ARRAY_LEN(md_answer));
    int rc = reward_client_score(c, &b, &r, &e);
    E2E_CHECK(rc == -1 && e.code == QERR_TIMEOUT, "a dead service fails the call: rc %d, %s", rc,
              e.msg);
    E2E_CHECK(strstr(e.msg, "nobody") != NULL, "the error names the service: %s", e.msg);
    E2E_CHECK(r.total == NULL && r.parts == NULL && r.n_samples == 0,
              "a failed call leaves no rewards behind");
    reward_client_stats_t st;
    reward_client_stats(c, &st);
    E2E_CHECK(st.attempts == 3 && st.timeouts == 3 && st.failed_calls == 1,
              "1 + 2 retries, all timed out: attempts %llu timeouts %llu",
              (unsigned long long)st.attempts, (unsigned long long)st.timeouts);
    reward_client_destroy(&c);
}

/* The late scenario's service: a ROUTER that ignores the first attempt; on the second it first
 * answers the first attempt's request id (a late reply), then the second's. */
typedef struct {
    void *zctx;
    char endpoint[64];
    int ok;
} late_ctx_t;

static int late_reply(net_socket_t *s, const net_msg_t *to, uint64_t request_id, double score) {
    Quillan__ScoreEntry entry = QUILLAN__SCORE_ENTRY__INIT;
    entry.maybe_score_case = QUILLAN__SCORE_ENTRY__MAYBE_SCORE_SCORE;
    entry.score = score;
    Quillan__ScoreEntry *ep[N_COMPLETIONS];
    for (size_t i = 0; i < N_COMPLETIONS; i++)
        ep[i] = &entry;
    Quillan__RewardResponse resp = QUILLAN__REWARD_RESPONSE__INIT;
    resp.request_id = request_id;
    resp.scores = ep;
    resp.n_scores = N_COMPLETIONS;
    Quillan__Envelope env = QUILLAN__ENVELOPE__INIT;
    env.body_case = QUILLAN__ENVELOPE__BODY_REWARD_RESPONSE;
    env.reward_response = &resp;
    qerr_t e;
    return net_reply(s, to, &env, NULL, 0, &e);
}

static void *late_service(void *arg) {
    late_ctx_t *lc = arg;
    net_socket_t *s = raw_socket(lc->zctx, ZMQ_ROUTER, lc->endpoint);
    uint64_t first_id = 0;
    for (int got = 0, polls = 0; got < 2 && polls < RAW_REPLY_POLLS; polls++) {
        net_msg_t *m = NULL;
        qerr_t e;
        if (net_recv(s, 100, &m, &e) != 1)
            continue;
        const Quillan__Envelope *env = net_msg_envelope(m);
        if (env->body_case == QUILLAN__ENVELOPE__BODY_REWARD_REQUEST) {
            uint64_t id = env->reward_request->request_id;
            if (got++ == 0) {
                first_id = id;
            } else {
                lc->ok = id != first_id && late_reply(s, m, first_id, 100.0) == 0 &&
                         late_reply(s, m, id, 0.25) == 0;
            }
        }
        net_msg_destroy(&m);
    }
    net_socket_destroy(&s);
    return NULL;
}

static void scenario_late(void) {
    late_ctx_t lc = {.zctx = zmq_ctx_new()};
    endpoint_of(e2e_free_port(), lc.endpoint, sizeof lc.endpoint);
    pthread_t th;
    Q_ASSERT(pthread_create(&th, NULL, late_service, &lc) == 0);
    char services[256];
    snprintf(services, sizeof services, "[{address: '%s', weight: 1, name: late}]", lc.endpoint);
    reward_client_t *c = client_for(services, 0.5, 5, 0.1, 0.2);
    reward_sample_t x[N_COMPLETIONS];
    reward_result_t r;
    reward_result_init(&r);
    qerr_t e;
    reward_batch_t b = batch_make(x, md_answer, Q_ARRAY_LEN(md_answer));
    int rc = reward_client_score(c, &b, &r, &e);
    pthread_join(th, NULL);
    E2E_CHECK(lc.ok, "the service saw two attempts with different request ids");
    E2E_CHECK(rc == 0, "late: %s", e.msg);
    static const double want[N_COMPLETIONS] = {0.25, 0.25, 0.25, 0.25};
    if (rc == 0)
        expect_totals(&r, want, "the current attempt's reply, not the late one");
    reward_client_stats_t st;
    reward_client_stats(c, &st);
    E2E_CHECK(st.late_replies == 1, "one late reply discarded (%llu)",
              (unsigned long long)st.late_replies);
    reward_result_free(&r);
    reward_client_destroy(&c);
    zmq_ctx_term(lc.zctx);
}

/* The error scenario's service: answers the first attempt with Error UNAVAILABLE (retry), the
 * second with RewardResponse.error (the request failed as a whole). */
static void *error_service(void *arg) {
    late_ctx_t *lc = arg;
    net_socket_t *s = raw_socket(lc->zctx, ZMQ_ROUTER, lc->endpoint);
    int ok = 1;
    for (int got = 0, polls = 0; got < 2 && polls < RAW_REPLY_POLLS; polls++) {
        net_msg_t *m = NULL;
        qerr_t e;
        if (net_recv(s, 100, &m, &e) != 1)
            continue;
        const Quillan__Envelope *env = net_msg_envelope(m);
        if (env->body_case == QUILLAN__ENVELOPE__BODY_REWARD_REQUEST) {
            Quillan__Envelope out = QUILLAN__ENVELOPE__INIT;
            Quillan__Error err = QUILLAN__ERROR__INIT;
            Quillan__RewardResponse resp = QUILLAN__REWARD_RESPONSE__INIT;
            if (got++ == 0) {
                err.code = QUILLAN__ERROR_CODE__ERROR_CODE_UNAVAILABLE;
                err.message = "warming up";
                err.in_reply_to = env->message_id;
                out.body_case = QUILLAN__ENVELOPE__BODY_ERROR;
                out.error = &err;
            } else {
                resp.request_id = env->reward_request->request_id;
                resp.error = "scorer crashed";
                out.body_case = QUILLAN__ENVELOPE__BODY_REWARD_RESPONSE;
                out.reward_response = &resp;
            }
            ok = ok && net_reply(s, m, &out, NULL, 0, &e) == 0;
        }
        net_msg_destroy(&m);
    }
    lc->ok = ok;
    net_socket_destroy(&s);
    return NULL;
}

static void scenario_error(void) {
    late_ctx_t lc = {.zctx = zmq_ctx_new()};
    endpoint_of(e2e_free_port(), lc.endpoint, sizeof lc.endpoint);
    pthread_t th;
    Q_ASSERT(pthread_create(&th, NULL, error_service, &lc) == 0);
    char services[256];
    snprintf(services, sizeof services, "[{address: '%s', weight: 1, name: flaky}]", lc.endpoint);
    reward_client_t *c = client_for(services, 5, 5, 0.1, 0.2);
    reward_sample_t x[N_COMPLETIONS];
    reward_result_t r;
    reward_result_init(&r);
    qerr_t e;
    qerr_clear(&e);
    reward_batch_t b = batch_make(x, md_answer, Q_ARRAY_LEN(md_answer));
    int rc = reward_client_score(c, &b, &r, &e);
    pthread_join(th, NULL);
    E2E_CHECK(lc.ok, "the service's replies went out");
    E2E_CHECK(rc == -1 && e.code == QERR_INVALID, "a failed request fails the call: rc %d, %s", rc,
              e.msg);
    E2E_CHECK(strstr(e.msg, "scorer crashed") && strstr(e.msg, "flaky"), "%s", e.msg);
    E2E_CHECK(r.total == NULL, "no rewards from a failed request");
    reward_client_stats_t st;
    reward_client_stats(c, &st);
    E2E_CHECK(st.attempts == 2 && st.error_replies == 2 && st.timeouts == 0,
              "UNAVAILABLE retried once: attempts %llu errors %llu",
              (unsigned long long)st.attempts, (unsigned long long)st.error_replies);
    reward_client_destroy(&c);
    zmq_ctx_term(lc.zctx);
}

/* The "reward.stop" record's fields from quillan-reward's log file; NULL when absent. */
static json_t *stop_record(const char *path) {
    FILE *f = fopen(path, "r");
    if (f == NULL)
        return NULL;
    char line[8192];
    json_t *found = NULL;
    while (fgets(line, sizeof line, f)) {
        qerr_t e;
        json_t *v = qjson_parse(line, strlen(line), path, &e);
        if (v == NULL)
            continue;
        json_t *ev = json_object_get(v, "event");
        if (ev && json_is_string(ev) && !strcmp(json_string_value(ev), "reward.stop")) {
            json_decref(found);
            found = json_incref(json_object_get(v, "fields"));
        }
        json_decref(v);
    }
    fclose(f);
    return found;
}

static double field(const json_t *fields, const char *key) {
    json_t *v = json_object_get(fields, key);
    return v && json_is_number(v) ? json_number_value(v) : -1;
}

static void scenario_malformed(void) {
    int port = e2e_free_port();
    char log_file[1024], set_log[1100];
    snprintf(log_file, sizeof log_file, "%s/reward_e2e_malformed.jsonl", log_dir);
    unlink(log_file);
    snprintf(set_log, sizeof set_log, "logging.file=%s", log_file);
    const char *sets[] = {set_log, NULL};
    pid_t pid = start_builtin(port, "reward_e2e_malformed.log", sets);
    void *zctx = zmq_ctx_new();
    char ep[64];
    endpoint_of(port, ep, sizeof ep);
    net_socket_t *raw = raw_socket(zctx, ZMQ_DEALER, ep);
    E2E_CHECK(raw_roundtrip(raw, 1) == 1, "a good request first");

    /* Everything below goes on one connection, in order, before the final good request. */
    one_request_t o;
    one_request_init(&o, 2);
    wire_header_t hdr = {"reward-e2e-raw", 1, 1};
    wire_buf_t good = {0};
    qerr_t e;
    Q_ASSERT(reward_codec_pack(&hdr, &o.env, &good, &e) == 0);
    /* 1. three frames */
    const void *three[] = {good.data, "x", "y"};
    size_t three_len[] = {good.len, 1, 1};
    raw_send_frames(raw, three, three_len, 3);
    /* 2. protocol version 2: field 1 is packed first, as bytes 0x08 0x01 */
    Q_ASSERT(good.len > 2 && good.data[0] == 0x08 && good.data[1] == 0x01);
    good.data[1] = 0x02;
    raw_send_one(raw, good.data, good.len);
    good.data[1] = 0x01;
    /* 3. bytes that do not decode: version 1, then a truncated length-delimited field */
    static const uint8_t junk[] = {0x08, 0x01, 0x12, 0xff};
    raw_send_one(raw, junk, sizeof junk);
    /* 4. a dispatch body (a WorkRequest) */
    Quillan__WorkRequest wr = QUILLAN__WORK_REQUEST__INIT;
    wr.worker_id = "w";
    Quillan__Envelope wenv = QUILLAN__ENVELOPE__INIT;
    wenv.body_case = QUILLAN__ENVELOPE__BODY_WORK_REQUEST;
    wenv.work_request = &wr;
    wire_buf_t wbuf = {0};
    Q_ASSERT(wire_codec_pack(WIRE_PROTOCOL_DISPATCH, &hdr, &wenv, &wbuf, &e) == 0);
    raw_send_one(raw, wbuf.data, wbuf.len);
    /* 5. an invalid request: no samples */
    o.req.n_samples = 0;
    wire_buf_t empty = {0};
    Q_ASSERT(reward_codec_pack(&hdr, &o.env, &empty, &e) == 0);
    raw_send_one(raw, empty.data, empty.len);
    o.req.n_samples = 1;
    /* 6. a well-formed response sent to the service */
    Quillan__RewardResponse resp = QUILLAN__REWARD_RESPONSE__INIT;
    Quillan__Envelope renv = QUILLAN__ENVELOPE__INIT;
    renv.body_case = QUILLAN__ENVELOPE__BODY_REWARD_RESPONSE;
    renv.reward_response = &resp;
    wire_buf_t rbuf = {0};
    Q_ASSERT(reward_codec_pack(&hdr, &renv, &rbuf, &e) == 0);
    raw_send_one(raw, rbuf.data, rbuf.len);
    /* 7. a payload frame behind a good request */
    const void *two[] = {good.data, "payload"};
    size_t two_len[] = {good.len, 7};
    raw_send_frames(raw, two, two_len, 2);

    E2E_CHECK(raw_roundtrip(raw, 3) == 1, "the service still answers after the bad messages");
    /* And the client API through a fresh connection. */
    reward_client_t *c = client_for(services_one(port, "builtin", 1), 5, 3, 0.2, 1);
    exact_scenario(c, "after malformed input");
    reward_client_destroy(&c);
    wire_buf_free(&good);
    wire_buf_free(&wbuf);
    wire_buf_free(&empty);
    wire_buf_free(&rbuf);
    net_socket_destroy(&raw);
    zmq_ctx_term(zctx);
    E2E_CHECK(e2e_stop(pid, STOP_LIMIT_S) == 0, "quillan-reward stops cleanly");

    json_t *f = stop_record(log_file);
    E2E_CHECK(f != NULL, "a reward.stop record in %s", log_file);
    if (f) {
        E2E_CHECK(field(f, "dropped_frames") == 1, "frames %g", field(f, "dropped_frames"));
        E2E_CHECK(field(f, "dropped_version") == 1, "version %g", field(f, "dropped_version"));
        E2E_CHECK(field(f, "dropped_decode") == 1, "decode %g", field(f, "dropped_decode"));
        E2E_CHECK(field(f, "dropped_body") == 1, "body %g", field(f, "dropped_body"));
        /* no samples, and a payload frame */
        E2E_CHECK(field(f, "dropped_invalid") == 2, "invalid %g", field(f, "dropped_invalid"));
        E2E_CHECK(field(f, "unexpected") == 1, "unexpected %g", field(f, "unexpected"));
        /* 2 raw round trips + 2 client calls */
        E2E_CHECK(field(f, "requests") == 4, "requests %g", field(f, "requests"));
        E2E_CHECK(field(f, "failed") == 0, "failed %g", field(f, "failed"));
        json_decref(f);
    }
}

int main(int argc, char **argv) {
    if (argc != 6) {
        fprintf(stderr,
                "usage: reward_e2e SCENARIO QUILLAN_REWARD PYTHON_SERVICE GEN_DIR LOG_DIR\n");
        return 2;
    }
    reward_bin = argv[2];
    python_script = argv[3];
    gen_dir = argv[4];
    log_dir = argv[5];
    log_init("reward-e2e");
    log_set_level(LOG_WARN);
    signal(SIGPIPE, SIG_IGN);
    static const struct {
        const char *name;
        void (*fn)(void);
    } scenarios[] = {{"builtin", scenario_builtin},   {"python", scenario_python},
                     {"combined", scenario_combined}, {"restart", scenario_restart},
                     {"dead", scenario_dead},         {"late", scenario_late},
                     {"error", scenario_error},       {"malformed", scenario_malformed}};
    for (size_t i = 0; i < Q_ARRAY_LEN(scenarios); i++) {
        if (strcmp(argv[1], scenarios[i].name) == 0) {
            scenarios[i].fn();
            if (e2e_failures)
                fprintf(stderr, "reward_e2e %s: %d failure(s)\n", argv[1], e2e_failures);
            return e2e_failures ? 1 : 0;
        }
    }
    fprintf(stderr, "reward_e2e: unknown scenario '%s'\n", argv[1]);
    return 2;
}
