#include "reward_service.h"

#include "log.h"
#include "net_security.h"
#include "reward_codec.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <zmq.h>

#define SERVICE_SENDER_ID "quillan-reward"

struct reward_service {
    net_socket_t *sock;
    reward_codec_limits_t limits; /* the socket's validator reads it */
    reward_score_fn score;
    void *ctx;
    reward_service_stats_t stats;
    double last_stats_log; /* monotonic seconds */
    uint64_t requests_at_last_log;
};

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

void reward_net_options(const quillan_config_t *cfg, net_options_t *o) {
    net_options_init(o);
    o->control_max_msg_bytes = cfg->network.max_msg_bytes;
    o->heartbeat_ivl_ms = (int)(cfg->network.heartbeat_ivl_s * 1000.0 + 0.5);
    o->heartbeat_timeout_ms = o->heartbeat_ivl_ms * cfg->network.heartbeat_liveness;
    o->heartbeat_ttl_ms = o->heartbeat_timeout_ms;
}

/* Without CURVE, plain TCP stays on loopback unless security.bind_any says otherwise
 * (ARCHITECTURE.md §4). */
static int bind_allowed(const quillan_config_t *cfg, const char *endpoint, qerr_t *err) {
    if (cfg->security.curve || strncmp(endpoint, "tcp://", 6) != 0 || cfg->security.bind_any)
        return 0;
    const char *host = endpoint + 6;
    static const char *const loopback[] = {"127.", "localhost:", "[::1]:", "lo:"};
    for (size_t i = 0; i < Q_ARRAY_LEN(loopback); i++)
        if (strncmp(host, loopback[i], strlen(loopback[i])) == 0)
            return 0;
    return qerr_set(err, QERR_INVALID,
                    "reward.builtin.bind: %s is not a loopback address; without security.curve "
                    "set security.bind_any: true to serve other hosts over plain TCP",
                    endpoint);
}

reward_service_t *reward_service_new(void *zctx, const quillan_config_t *cfg, const char *endpoint,
                                     reward_score_fn score, void *ctx, qerr_t *err) {
    Q_ASSERT(zctx && cfg && endpoint && score);
    if (bind_allowed(cfg, endpoint, err) != 0)
        return NULL;
    reward_service_t *s = calloc(1, sizeof *s);
    if (s == NULL) {
        qerr_set(err, QERR_NOMEM, "reward service: out of memory");
        return NULL;
    }
    s->limits = (reward_codec_limits_t){.max_samples = REWARD_MAX_SAMPLES, .vocab_size = 0};
    s->score = score;
    s->ctx = ctx;
    net_options_t opt;
    reward_net_options(cfg, &opt);
    net_security_t sec;
    if (net_security_from_config(cfg, NET_ROLE_SERVER, &sec, err) != 0) {
        reward_service_destroy(&s);
        return NULL;
    }
    net_socket_spec_t spec = {.type = ZMQ_ROUTER,
                              .protocol = WIRE_PROTOCOL_REWARD,
                              .name = "reward",
                              .sender_id = SERVICE_SENDER_ID,
                              .incarnation_id = net_incarnation_new(),
                              .validate = reward_codec_net_validate,
                              .validate_ctx = &s->limits};
    s->sock = net_socket_new(zctx, &spec, &opt, &sec, err);
    if (s->sock == NULL || net_socket_bind(s->sock, endpoint, err) != 0) {
        reward_service_destroy(&s);
        return NULL;
    }
    s->last_stats_log = now_s();
    return s;
}

const char *reward_service_endpoint(const reward_service_t *s) {
    return net_socket_endpoint(s->sock);
}

void reward_service_destroy(reward_service_t **sp) {
    if (sp == NULL || *sp == NULL)
        return;
    net_socket_destroy(&(*sp)->sock);
    free(*sp);
    *sp = NULL;
}

void reward_service_stats(reward_service_t *s, reward_service_stats_t *out) {
    net_socket_stats(s->sock, &s->stats.net);
    *out = s->stats;
}

int reward_service_builtin_score(void *ctx, const reward_batch_t *batch, reward_score_t *out,
                                 char *detail, size_t detail_cap, qerr_t *err) {
    return reward_scorers_score(ctx, batch, out, detail, detail_cap, err);
}

/* The request's borrowed view as a reward_batch_t: samples and kv hold pointers into req. */
static void batch_view(const Quillan__RewardRequest *req, reward_sample_t *samples, reward_kv_t *kv,
                       reward_batch_t *b) {
    for (size_t i = 0; i < req->n_samples; i++) {
        const Quillan__RewardSample *x = req->samples[i];
        samples[i] = (reward_sample_t){.prompt = x->prompt,
                                       .completion = x->completion,
                                       .prompt_tokens = x->prompt_tokens,
                                       .n_prompt_tokens = x->n_prompt_tokens,
                                       .completion_tokens = x->completion_tokens,
                                       .n_completion_tokens = x->n_completion_tokens,
                                       .finish_reason = (reward_finish_t)x->finish_reason};
    }
    for (size_t i = 0; i < req->n_metadata; i++)
        kv[i] = (reward_kv_t){req->metadata[i]->key, req->metadata[i]->value};
    *b = (reward_batch_t){.task = req->task,
                          .samples = samples,
                          .n_samples = req->n_samples,
                          .metadata = kv,
                          .n_metadata = req->n_metadata};
}

/* Scores req and fills resp (entries and details point into the buffers of *mem, which the
 * caller frees). On a scorer failure resp carries the error instead. */
typedef struct {
    reward_sample_t *samples;
    reward_kv_t *kv;
    reward_score_t *scores;
    char *detail;
    Quillan__ScoreEntry *entries;
    Quillan__ScoreEntry **entry_ptrs;
    char error[QERR_MSG_MAX];
} answer_mem_t;

static void answer_mem_free(answer_mem_t *m) {
    free(m->samples);
    free(m->kv);
    free(m->scores);
    free(m->detail);
    free(m->entries);
    free(m->entry_ptrs);
}

/* Cuts s back to its longest valid UTF-8 prefix: details and errors are truncated with
 * snprintf, which may split a character, and the wire codec refuses invalid UTF-8. */
static void utf8_trim(char *s) {
    size_t n = strlen(s);
    while (n > 0 && !wire_utf8_valid(s, n))
        n--;
    s[n] = '\0';
}

static int answer_build(reward_service_t *s, const Quillan__RewardRequest *req,
                        Quillan__RewardResponse *resp, answer_mem_t *m, size_t *no_reward) {
    size_t n = req->n_samples;
    m->samples = calloc(n, sizeof *m->samples);
    m->kv = calloc(req->n_metadata + 1, sizeof *m->kv);
    m->scores = calloc(n, sizeof *m->scores);
    m->detail = calloc(n, REWARD_SERVICE_DETAIL_MAX);
    m->entries = calloc(n, sizeof *m->entries);
    m->entry_ptrs = calloc(n, sizeof *m->entry_ptrs);
    resp->request_id = req->request_id;
    *no_reward = 0;
    qerr_t e;
    qerr_clear(&e);
    if (!m->samples || !m->kv || !m->scores || !m->detail || !m->entries || !m->entry_ptrs) {
        qerr_set(&e, QERR_NOMEM, "out of memory for %zu samples", n);
    } else {
        reward_batch_t b;
        batch_view(req, m->samples, m->kv, &b);
        int rc = s->score(s->ctx, &b, m->scores, m->detail, REWARD_SERVICE_DETAIL_MAX, &e);
        for (size_t i = 0; rc == 0 && i < n; i++)
            if (m->scores[i].has && !isfinite(m->scores[i].value))
                rc = qerr_set(&e, QERR_INVALID, "the scorer gave sample %zu a non-finite score", i);
        if (rc == 0) {
            for (size_t i = 0; i < n; i++) {
                Quillan__ScoreEntry *x = &m->entries[i];
                quillan__score_entry__init(x);
                m->detail[(i + 1) * REWARD_SERVICE_DETAIL_MAX - 1] = '\0';
                x->detail = &m->detail[i * REWARD_SERVICE_DETAIL_MAX];
                utf8_trim(x->detail);
                if (m->scores[i].has) {
                    x->maybe_score_case = QUILLAN__SCORE_ENTRY__MAYBE_SCORE_SCORE;
                    x->score = m->scores[i].value;
                } else {
                    (*no_reward)++;
                }
                m->entry_ptrs[i] = x;
            }
            resp->scores = m->entry_ptrs;
            resp->n_scores = n;
            return 0;
        }
    }
    snprintf(m->error, sizeof m->error, "%s", e.msg[0] ? e.msg : "the scorer failed");
    utf8_trim(m->error);
    resp->error = m->error;
    return -1;
}

static void stats_log(reward_service_t *s, const char *event) {
    reward_service_stats_t st;
    reward_service_stats(s, &st);
    uint64_t dropped = 0;
    for (int r = 0; r < NET_DROP_COUNT; r++)
        dropped += st.net.dropped[r];
    double answered = (double)(st.requests + st.failed);
    log_field_t f[8 + NET_DROP_COUNT];
    size_t n = 0;
    f[n++] = (log_field_t){"requests", (double)st.requests};
    f[n++] = (log_field_t){"failed", (double)st.failed};
    f[n++] = (log_field_t){"unexpected", (double)st.unexpected};
    f[n++] = (log_field_t){"reply_failed", (double)st.reply_failed};
    f[n++] = (log_field_t){"samples", (double)st.samples};
    f[n++] = (log_field_t){"no_reward", (double)st.no_reward};
    f[n++] =
        (log_field_t){"latency_mean_ms", answered > 0 ? 1e3 * st.latency_sum_s / answered : 0.0};
    f[n++] = (log_field_t){"latency_max_ms", 1e3 * st.latency_max_s};
    static char names[NET_DROP_COUNT][32];
    for (int r = 0; r < NET_DROP_COUNT; r++) {
        snprintf(names[r], sizeof names[r], "dropped_%s", net_drop_name((net_drop_t)r));
        f[n++] = (log_field_t){names[r], (double)st.net.dropped[r]};
    }
    log_emit(LOG_INFO, event, f, n, "%llu requests, %llu failed, %llu malformed dropped",
             (unsigned long long)st.requests, (unsigned long long)st.failed,
             (unsigned long long)(dropped + st.unexpected));
}

/* Answers one received message. */
static void message_handle(reward_service_t *s, net_msg_t *msg, double t0) {
    const Quillan__Envelope *env = net_msg_envelope(msg);
    if (env->body_case != QUILLAN__ENVELOPE__BODY_REWARD_REQUEST) {
        s->stats.unexpected++;
        log_warn("reward.unexpected",
                 "dropped a '%s' message from '%s': a reward service only "
                 "answers reward_request",
                 wire_body_name(env->body_case), env->sender_id);
        return;
    }
    const Quillan__RewardRequest *req = env->reward_request;
    Quillan__RewardResponse resp = QUILLAN__REWARD_RESPONSE__INIT;
    answer_mem_t mem = {0};
    size_t no_reward = 0;
    int ok = answer_build(s, req, &resp, &mem, &no_reward) == 0;
    Quillan__Envelope out = QUILLAN__ENVELOPE__INIT;
    out.body_case = QUILLAN__ENVELOPE__BODY_REWARD_RESPONSE;
    out.reward_response = &resp;
    qerr_t e;
    qerr_clear(&e);
    if (net_reply(s->sock, msg, &out, NULL, 0, &e) != 0) {
        s->stats.reply_failed++;
        log_warn("reward.reply_failed", "request %llu from '%s': %s",
                 (unsigned long long)req->request_id, env->sender_id, e.msg);
    }
    double dt = now_s() - t0;
    if (ok) {
        s->stats.requests++;
        s->stats.samples += req->n_samples;
        s->stats.no_reward += no_reward;
    } else {
        s->stats.failed++;
        log_warn("reward.failed", "request %llu from '%s' failed: %s",
                 (unsigned long long)req->request_id, env->sender_id, mem.error);
    }
    s->stats.latency_sum_s += dt;
    if (dt > s->stats.latency_max_s)
        s->stats.latency_max_s = dt;
    if (log_enabled(LOG_DEBUG)) {
        log_field_t f[] = {{"samples", (double)req->n_samples},
                           {"no_reward", (double)no_reward},
                           {"latency_ms", dt * 1e3},
                           {"ok", ok}};
        log_emit(LOG_DEBUG, "reward.request", f, Q_ARRAY_LEN(f), "request %llu from '%s'",
                 (unsigned long long)req->request_id, env->sender_id);
    }
    answer_mem_free(&mem);
}

int reward_service_poll(reward_service_t *s, int timeout_ms, qerr_t *err) {
    int answered = 0;
    for (;;) {
        net_msg_t *msg = NULL;
        int rc = net_recv(s->sock, answered ? 0 : timeout_ms, &msg, err);
        if (rc < 0)
            return -1;
        if (rc == 0)
            break;
        message_handle(s, msg, now_s());
        net_msg_destroy(&msg);
        answered++;
    }
    double now = now_s();
    if (now - s->last_stats_log >= REWARD_SERVICE_STATS_INTERVAL_S) {
        if (s->stats.requests + s->stats.failed != s->requests_at_last_log)
            stats_log(s, "reward.stats");
        s->requests_at_last_log = s->stats.requests + s->stats.failed;
        s->last_stats_log = now;
    }
    return answered;
}

int reward_service_run(reward_service_t *s, const volatile sig_atomic_t *stop, qerr_t *err) {
    log_info("reward.start", "serving on %s", reward_service_endpoint(s));
    int rc = 0;
    /* A short poll so a stop flag set by a signal that did not interrupt zmq_poll (one that
     * arrived between polls) is still seen promptly. */
    while (!*stop && rc >= 0)
        rc = reward_service_poll(s, 200, err);
    stats_log(s, "reward.stop");
    return rc < 0 ? -1 : 0;
}
