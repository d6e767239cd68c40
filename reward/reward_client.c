#include "reward_client.h"

#include "log.h"
#include "net.h"
#include "net_security.h"
#include "reward_codec.h"
#include "reward_service.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <zmq.h>

#define CLIENT_SENDER_DEFAULT "quillan-reward-client"
/* Longest sleep while a stop flag is watched. */
#define CLIENT_STOP_POLL_MS 100

typedef enum { PHASE_SEND = 0, PHASE_WAIT, PHASE_BACKOFF, PHASE_DONE } phase_t;

typedef struct {
    config_reward_service_t cfg;
    char label[2 * CONFIG_ADDR_MAX + 32]; /* "reward service 'x' (tcp://...)" */
    const char *name;                     /* cfg.name, or cfg.address */
    net_socket_t *sock;
    phase_t phase;
    int attempt;         /* attempts sent in this call */
    uint64_t request_id; /* of the attempt in flight */
    uint64_t message_id; /* its Envelope's message_id (Error.in_reply_to) */
    double deadline;     /* PHASE_WAIT: give up on the reply; PHASE_BACKOFF: resend */
} service_t;

struct reward_client {
    void *zctx;
    quillan_config_t cfg;
    net_options_t opt;
    net_security_t sec; /* client role of cfg's security section */
    reward_codec_limits_t limits;
    char sender_id[128];
    uint64_t incarnation_id;
    uint64_t next_request_id;
    service_t *svc;
    size_t n_svc;
    const volatile sig_atomic_t *stop;
    reward_client_stats_t stats;
};

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

void reward_result_init(reward_result_t *r) {
    *r = (reward_result_t){0};
}

void reward_result_free(reward_result_t *r) {
    free(r->total);
    free(r->parts);
    *r = (reward_result_t){0};
}

/* Closes the service's socket (if any) and connects a fresh one. */
static int socket_renew(reward_client_t *c, service_t *s, qerr_t *err) {
    net_socket_destroy(&s->sock);
    net_socket_spec_t spec = {.type = ZMQ_DEALER,
                              .protocol = WIRE_PROTOCOL_REWARD,
                              .name = s->name,
                              .sender_id = c->sender_id,
                              .incarnation_id = c->incarnation_id,
                              .validate = reward_codec_net_validate,
                              .validate_ctx = &c->limits};
    s->sock = net_socket_new(c->zctx, &spec, &c->opt, &c->sec, err);
    if (s->sock == NULL || net_socket_connect(s->sock, s->cfg.address, err) != 0) {
        net_socket_destroy(&s->sock);
        return qerr_wrap(err, "%s", s->label);
    }
    return 0;
}

reward_client_t *reward_client_new(const quillan_config_t *cfg, const char *sender_id,
                                   qerr_t *err) {
    Q_ASSERT(cfg);
    if (cfg->reward.n_services < 1) {
        qerr_set(err, QERR_INVALID, "reward.services: no reward service configured");
        return NULL;
    }
    reward_client_t *c = calloc(1, sizeof *c);
    if (c == NULL) {
        qerr_set(err, QERR_NOMEM, "reward client: out of memory");
        return NULL;
    }
    c->cfg = *cfg;
    reward_net_options(cfg, &c->opt);
    if (net_security_from_config(cfg, NET_ROLE_CLIENT, &c->sec, err) != 0) {
        reward_client_destroy(&c);
        return NULL;
    }
    c->limits = (reward_codec_limits_t){.max_samples = REWARD_MAX_SAMPLES, .vocab_size = 0};
    snprintf(c->sender_id, sizeof c->sender_id, "%s",
             sender_id ? sender_id : CLIENT_SENDER_DEFAULT);
    c->incarnation_id = net_incarnation_new();
    c->next_request_id = 1;
    c->zctx = zmq_ctx_new();
    c->n_svc = (size_t)cfg->reward.n_services;
    c->svc = calloc(c->n_svc, sizeof *c->svc);
    if (c->zctx == NULL || c->svc == NULL) {
        qerr_set(err, QERR_NOMEM, "reward client: out of memory");
        reward_client_destroy(&c);
        return NULL;
    }
    for (size_t j = 0; j < c->n_svc; j++) {
        service_t *s = &c->svc[j];
        s->cfg = cfg->reward.services[j];
        s->name = s->cfg.name[0] ? s->cfg.name : s->cfg.address;
        snprintf(s->label, sizeof s->label, "reward service '%s' (%s)", s->name, s->cfg.address);
        if (socket_renew(c, s, err) != 0) {
            reward_client_destroy(&c);
            return NULL;
        }
    }
    return c;
}

void reward_client_destroy(reward_client_t **cp) {
    if (cp == NULL || *cp == NULL)
        return;
    reward_client_t *c = *cp;
    for (size_t j = 0; c->svc && j < c->n_svc; j++)
        net_socket_destroy(&c->svc[j].sock);
    free(c->svc);
    if (c->zctx)
        zmq_ctx_term(c->zctx);
    free(c);
    *cp = NULL;
}

void reward_client_set_stop(reward_client_t *c, const volatile sig_atomic_t *stop) {
    c->stop = stop;
}

size_t reward_client_n_services(const reward_client_t *c) {
    return c->n_svc;
}

const char *reward_client_service_name(const reward_client_t *c, size_t j) {
    Q_ASSERT(j < c->n_svc);
    return c->svc[j].name;
}

void reward_client_stats(const reward_client_t *c, reward_client_stats_t *out) {
    *out = c->stats;
}

/* ---- one call ---- */

/* The request's wire form, pointing into the caller's batch (protobuf-c's structs are not
 * const-correct; packing only reads them). */
typedef struct {
    Quillan__RewardRequest req;
    Quillan__RewardSample *samples;
    Quillan__RewardSample **sample_ptrs;
    Quillan__RewardRequest__MetadataEntry *md;
    Quillan__RewardRequest__MetadataEntry **md_ptrs;
} request_mem_t;

static void request_mem_free(request_mem_t *m) {
    free(m->samples);
    free(m->sample_ptrs);
    free(m->md);
    free(m->md_ptrs);
}

static int request_build(const reward_batch_t *in, request_mem_t *m, qerr_t *err) {
    size_t n = in->n_samples;
    m->samples = calloc(n, sizeof *m->samples);
    m->sample_ptrs = calloc(n, sizeof *m->sample_ptrs);
    m->md = calloc(in->n_metadata + 1, sizeof *m->md);
    m->md_ptrs = calloc(in->n_metadata + 1, sizeof *m->md_ptrs);
    if (!m->samples || !m->sample_ptrs || !m->md || !m->md_ptrs)
        return qerr_set(err, QERR_NOMEM, "reward request: out of memory for %zu samples", n);
    quillan__reward_request__init(&m->req);
    m->req.task = (char *)(in->task ? in->task : "");
    for (size_t i = 0; i < n; i++) {
        const reward_sample_t *x = &in->samples[i];
        Quillan__RewardSample *y = &m->samples[i];
        Q_ASSERT(x->prompt && x->completion);
        quillan__reward_sample__init(y);
        y->prompt = (char *)x->prompt;
        y->completion = (char *)x->completion;
        y->prompt_tokens = (uint32_t *)x->prompt_tokens;
        y->n_prompt_tokens = x->n_prompt_tokens;
        y->completion_tokens = (uint32_t *)x->completion_tokens;
        y->n_completion_tokens = x->n_completion_tokens;
        y->finish_reason = (Quillan__FinishReason)x->finish_reason;
        m->sample_ptrs[i] = y;
    }
    for (size_t i = 0; i < in->n_metadata; i++) {
        Q_ASSERT(in->metadata[i].key && in->metadata[i].value);
        quillan__reward_request__metadata_entry__init(&m->md[i]);
        m->md[i].key = (char *)in->metadata[i].key;
        m->md[i].value = (char *)in->metadata[i].value;
        m->md_ptrs[i] = &m->md[i];
    }
    m->req.samples = m->sample_ptrs;
    m->req.n_samples = n;
    m->req.metadata = m->md_ptrs;
    m->req.n_metadata = in->n_metadata;
    return 0;
}

static double backoff_s(const reward_client_t *c, int attempt) {
    double b = c->cfg.reward.backoff_min_s * ldexp(1.0, attempt - 1);
    return fmin(b, c->cfg.reward.backoff_max_s);
}

/* The attempt failed without an answer (timeout, queue full, a transient Error): renew the
 * socket and back off, or give up after the last retry. why is logged. Returns 0 or -1. */
static int attempt_failed(reward_client_t *c, service_t *s, double now, const char *why,
                          qerr_t *err) {
    int retries = c->cfg.reward.retries;
    if (s->attempt > retries) {
        log_field_t f = {"attempts", (double)s->attempt};
        log_emit(LOG_ERROR, "reward.unavailable", &f, 1,
                 "%s: %s after %d attempts; the group "
                 "keeps no reward",
                 s->label, why, s->attempt);
        return qerr_set(err, QERR_TIMEOUT, "%s: %s after %d attempt%s (reward.retries = %d)",
                        s->label, why, s->attempt, s->attempt == 1 ? "" : "s", retries);
    }
    double wait = backoff_s(c, s->attempt);
    log_field_t f[] = {{"attempt", (double)s->attempt}, {"backoff_s", wait}};
    log_emit(LOG_WARN, "reward.retry", f, Q_ARRAY_LEN(f), "%s: %s; retrying in %g s", s->label, why,
             wait);
    if (socket_renew(c, s, err) != 0)
        return -1;
    s->phase = PHASE_BACKOFF;
    s->deadline = now + wait;
    return 0;
}

static int attempt_send(reward_client_t *c, service_t *s, request_mem_t *m, double now,
                        qerr_t *err) {
    s->attempt++;
    s->request_id = c->next_request_id++;
    m->req.request_id = s->request_id;
    Quillan__Envelope env = QUILLAN__ENVELOPE__INIT;
    env.body_case = QUILLAN__ENVELOPE__BODY_REWARD_REQUEST;
    env.reward_request = &m->req;
    c->stats.attempts++;
    qerr_t e;
    qerr_clear(&e);
    if (net_send(s->sock, NULL, &env, NULL, 0, &s->message_id, &e) != 0) {
        if (e.code == QERR_TIMEOUT || e.code == QERR_NOTFOUND || e.code == QERR_IO)
            return attempt_failed(c, s, now, e.msg, err);
        qerr_set(err, e.code, "%s", e.msg);
        return qerr_wrap(err, "%s", s->label);
    }
    s->phase = PHASE_WAIT;
    s->deadline = now + c->cfg.reward.timeout_s;
    return 0;
}

/* Takes one received message of service j. Returns 0 (consumed: answer, late, or retry
 * scheduled) or -1 with err (the service answered with an error). */
static int reply_take(reward_client_t *c, size_t j, const net_msg_t *msg, request_mem_t *m,
                      reward_result_t *out, double now, qerr_t *err) {
    service_t *s = &c->svc[j];
    const Quillan__Envelope *env = net_msg_envelope(msg);
    if (env->body_case == QUILLAN__ENVELOPE__BODY_ERROR) {
        const Quillan__Error *e = env->error;
        if (s->phase != PHASE_WAIT || e->in_reply_to != s->message_id) {
            c->stats.late_replies++;
            return 0;
        }
        c->stats.error_replies++;
        if (e->code == QUILLAN__ERROR_CODE__ERROR_CODE_UNAVAILABLE ||
            e->code == QUILLAN__ERROR_CODE__ERROR_CODE_INTERNAL) {
            char why[QERR_MSG_MAX];
            snprintf(why, sizeof why, "answered Error %d: %.400s", (int)e->code, e->message);
            return attempt_failed(c, s, now, why, err);
        }
        return qerr_set(err, QERR_INVALID, "%s refused the request (Error %d): %s", s->label,
                        (int)e->code, e->message);
    }
    if (env->body_case != QUILLAN__ENVELOPE__BODY_REWARD_RESPONSE) {
        c->stats.late_replies++;
        log_warn("reward.unexpected", "%s sent a '%s' message; dropped", s->label,
                 wire_body_name(env->body_case));
        return 0;
    }
    const Quillan__RewardResponse *r = env->reward_response;
    if (s->phase != PHASE_WAIT || r->request_id != s->request_id) {
        c->stats.late_replies++;
        log_debug("reward.late", "%s: discarded the reply to request %llu", s->label,
                  (unsigned long long)r->request_id);
        return 0;
    }
    if (r->error[0] != '\0') {
        c->stats.error_replies++;
        return qerr_set(err, QERR_INVALID, "%s failed the request: %s", s->label, r->error);
    }
    m->req.request_id = s->request_id; /* the services' attempts carry their own ids */
    if (reward_codec_response_check(r, &m->req, err) != 0)
        return qerr_wrap(err, "%s", s->label);
    for (size_t i = 0; i < r->n_scores; i++) {
        const Quillan__ScoreEntry *x = r->scores[i];
        int has = x->maybe_score_case == QUILLAN__SCORE_ENTRY__MAYBE_SCORE_SCORE;
        out->parts[j * out->n_samples + i] =
            (reward_score_t){.has = has, .value = has ? x->score : 0.0};
    }
    s->phase = PHASE_DONE;
    return 0;
}

/* Receives everything ready on service j's socket. */
static int drain(reward_client_t *c, size_t j, request_mem_t *m, reward_result_t *out,
                 qerr_t *err) {
    for (;;) {
        service_t *s = &c->svc[j];
        net_msg_t *msg = NULL;
        int rc = net_recv(s->sock, 0, &msg, err);
        if (rc < 0)
            return qerr_wrap(err, "%s", s->label);
        if (rc == 0)
            return 0;
        rc = reply_take(c, j, msg, m, out, now_s(), err);
        net_msg_destroy(&msg);
        if (rc != 0)
            return -1;
        if (s->phase != PHASE_WAIT)
            return 0; /* anything further is late; the next call discards it */
    }
}

/* Advances every service's timers; sends what is due. Returns 0 or -1. */
static int timers_run(reward_client_t *c, request_mem_t *m, qerr_t *err) {
    double now = now_s();
    for (size_t j = 0; j < c->n_svc; j++) {
        service_t *s = &c->svc[j];
        if (s->phase == PHASE_BACKOFF && now >= s->deadline)
            s->phase = PHASE_SEND;
        if (s->phase == PHASE_SEND && attempt_send(c, s, m, now, err) != 0)
            return -1;
        if (s->phase == PHASE_WAIT && now >= s->deadline) {
            c->stats.timeouts++;
            char why[64];
            snprintf(why, sizeof why, "no reply within %g s", c->cfg.reward.timeout_s);
            if (attempt_failed(c, s, now, why, err) != 0)
                return -1;
        }
    }
    return 0;
}

static int call_run(reward_client_t *c, request_mem_t *m, reward_result_t *out, qerr_t *err) {
    for (size_t j = 0; j < c->n_svc; j++) {
        c->svc[j].phase = PHASE_SEND;
        c->svc[j].attempt = 0;
    }
    zmq_pollitem_t *items = calloc(c->n_svc, sizeof *items);
    size_t *which = calloc(c->n_svc, sizeof *which);
    if (!items || !which) {
        free(items);
        free(which);
        return qerr_set(err, QERR_NOMEM, "reward client: out of memory");
    }
    int rc = 0;
    for (;;) {
        if (c->stop && *c->stop) {
            rc = qerr_set(err, QERR_TIMEOUT, "reward call interrupted by a stop request");
            break;
        }
        if ((rc = timers_run(c, m, err)) != 0)
            break;
        double now = now_s(), next = INFINITY;
        size_t n = 0;
        for (size_t j = 0; j < c->n_svc; j++) {
            service_t *s = &c->svc[j];
            if (s->phase == PHASE_WAIT) {
                items[n] =
                    (zmq_pollitem_t){.socket = net_socket_handle(s->sock), .events = ZMQ_POLLIN};
                which[n++] = j;
            }
            if (s->phase == PHASE_WAIT || s->phase == PHASE_BACKOFF)
                next = fmin(next, s->deadline);
        }
        if (isinf(next))
            break; /* every service answered */
        double wait_ms = fmax(0.0, ceil((next - now) * 1e3));
        if (c->stop)
            wait_ms = fmin(wait_ms, CLIENT_STOP_POLL_MS);
        int pr = zmq_poll(items, (int)n, (long)wait_ms);
        if (pr < 0 && zmq_errno() != EINTR) {
            rc = qerr_set(err, QERR_IO, "reward client: zmq_poll: %s", zmq_strerror(zmq_errno()));
            break;
        }
        for (size_t k = 0; pr > 0 && k < n && rc == 0; k++)
            if (items[k].revents & ZMQ_POLLIN)
                rc = drain(c, which[k], m, out, err);
        if (rc != 0)
            break;
    }
    free(items);
    free(which);
    return rc;
}

static void combine(const reward_client_t *c, reward_result_t *out) {
    size_t n = out->n_samples;
    for (size_t i = 0; i < n; i++) {
        reward_score_t t = {.has = true, .value = 0.0};
        for (size_t j = 0; j < c->n_svc; j++) {
            reward_score_t p = out->parts[j * n + i];
            t.has = t.has && p.has;
            t.value += c->svc[j].cfg.weight * p.value;
        }
        if (!t.has)
            t.value = 0.0;
        out->total[i] = t;
    }
}

int reward_client_score(reward_client_t *c, const reward_batch_t *in, reward_result_t *out,
                        qerr_t *err) {
    Q_ASSERT(c && in && out);
    reward_result_free(out);
    c->stats.calls++;
    if (in->n_samples < 1 || in->n_samples > REWARD_MAX_SAMPLES) {
        c->stats.failed_calls++;
        return qerr_set(err, QERR_RANGE, "reward call: %zu samples, expected 1..%u", in->n_samples,
                        REWARD_MAX_SAMPLES);
    }
    request_mem_t m = {0};
    int rc = request_build(in, &m, err);
    if (rc == 0) {
        out->n_samples = in->n_samples;
        out->n_services = c->n_svc;
        out->total = calloc(in->n_samples, sizeof *out->total);
        out->parts = calloc(in->n_samples * c->n_svc, sizeof *out->parts);
        if (!out->total || !out->parts)
            rc = qerr_set(err, QERR_NOMEM, "reward call: out of memory");
    }
    if (rc == 0)
        rc = call_run(c, &m, out, err);
    request_mem_free(&m);
    if (rc != 0) {
        c->stats.failed_calls++;
        reward_result_free(out);
        return -1;
    }
    combine(c, out);
    return 0;
}
