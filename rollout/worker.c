/* The rollout worker: network, generation and reward threads (rollout/worker.h). */
#include "worker.h"

#include "alloc.h"
#include "dispatch_client.h"
#include "engine.h"
#include "log.h"
#include "net.h"
#include "net_security.h"
#include "reward_service.h"
#include "snapshot_client.h"

#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

/* How long one poll of the dispatch socket waits before the network thread looks at finished
 * groups again: the latency a finished group can wait before it is sent. */
#define NET_POLL_MS 20
/* Deadline of one snapshot fetch (a 512m snapshot over loopback takes about a second). */
#define SNAPSHOT_FETCH_TIMEOUT_MS 30000
/* Pause after a failed snapshot fetch or when no snapshot satisfies a lease's min_version. */
#define SNAPSHOT_RETRY_S 1.0
/* How long the generation and reward threads sleep at most before looking at the stop flag. */
#define THREAD_WAKE_S 0.2
/* Longest worker id (the dispatcher's DISPATCHER_ID_MAX, NUL included). */
#define WORKER_ID_MAX 128

/* One lease on its way through the worker. */
typedef struct job {
    struct job *next;
    Quillan__RolloutRequest *rq; /* own copy */
    uint64_t restart_gen;        /* the worker's restart generation when it was leased */
    /* filled by the generation thread */
    quillan_group_t group;
    char **texts; /* [G] */
    bool generated;
    uint64_t version;
    bool kept_counts;
    rollout_route_shape_t route;
    double gen_seconds;
    /* filled by the reward thread */
    double reward_seconds;
    int reward_errors;
    Quillan__TrajectoryGroup *out; /* built group to send; NULL: give the lease up */
    size_t tokens;
    double reward_sum;
    size_t n_rewarded;
} job_t;

typedef struct {
    job_t *head, *tail;
} job_queue_t;

/* A sent group kept until its Ack. resend: no Ack came in time (ACK_STATUS_UNSPECIFIED), so
 * sent_resend sends it again after the poll. */
typedef struct {
    uint64_t lease_id;
    Quillan__TrajectoryGroup *g;
    bool resend;
} sent_t;

struct rollout_worker {
    quillan_config_t cfg;
    char id[WORKER_ID_MAX];
    const volatile sig_atomic_t *stop;
    dispatch_client_t *dc;
    snapshot_client_t *sc;
    reward_client_t *rc;
    quillan_engine_t *engine;
    const char **service_names; /* [n_services], owned by rc */
    dispatch_codec_limits_t limits;

    pthread_mutex_t mu;
    pthread_cond_t gen_cv, rew_cv;
    /* under mu */
    job_queue_t gen_q, rew_q, out_q;
    uint64_t restart_gen;
    uint64_t latest; /* the learner's latest version as last announced */
    bool threads_stop;
    rollout_worker_stats_t st;

    /* network thread only */
    sent_t *sent;
    size_t n_sent, cap_sent;

    /* generation thread only */
    snapshot_t *snap;         /* the loaded snapshot (also the delta base) */
    quillan_policy_t *policy; /* its policy */
    uint64_t snap_gen;        /* restart generation of the learner it came from */
};

/* ---- small helpers ---- */

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static void q_push(job_queue_t *q, job_t *j) {
    j->next = NULL;
    if (q->tail)
        q->tail->next = j;
    else
        q->head = j;
    q->tail = j;
}

static void q_push_front(job_queue_t *q, job_t *j) {
    j->next = q->head;
    q->head = j;
    if (q->tail == NULL)
        q->tail = j;
}

static job_t *q_pop(job_queue_t *q) {
    job_t *j = q->head;
    if (j) {
        q->head = j->next;
        if (q->head == NULL)
            q->tail = NULL;
        j->next = NULL;
    }
    return j;
}

static job_t *q_take_all(job_queue_t *q) {
    job_t *j = q->head;
    q->head = q->tail = NULL;
    return j;
}

static void job_free(job_t *j) {
    if (j == NULL)
        return;
    if (j->texts)
        for (int i = 0; i < j->group.n_samples; i++)
            free(j->texts[i]);
    free(j->texts);
    quillan_group_free(&j->group);
    rollout_group_free(&j->out);
    if (j->rq)
        quillan__rollout_request__free_unpacked(j->rq, NULL);
    free(j);
}

/* Waits on cv for at most s seconds (mu held). */
static void cond_wait_s(pthread_cond_t *cv, pthread_mutex_t *mu, double s) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    double t = (double)ts.tv_nsec * 1e-9 + s;
    ts.tv_sec += (time_t)t;
    ts.tv_nsec = (long)((t - (double)(time_t)t) * 1e9);
    pthread_cond_timedwait(cv, mu, &ts);
}

static bool stopping(rollout_worker_t *w) {
    return *w->stop || w->threads_stop;
}

/* ---- generation thread ---- */

static void snapshot_release(void *ctx, const void *data, size_t len) {
    (void)data;
    (void)len;
    snapshot_t *s = ctx;
    snapshot_unref(&s);
}

/* Fetches the latest snapshot (as a delta against the one held, unless the learner restarted
 * since it was fetched), loads it and makes it current. -1 with err. */
static int snapshot_update(rollout_worker_t *w, uint64_t rgen, qerr_t *err) {
    const bool same_learner = w->snap && w->snap_gen == rgen;
    double t0 = now_s();
    snapshot_client_stats_t before, after;
    snapshot_client_stats(w->sc, &before);
    snapshot_t *s = snapshot_client_fetch(w->sc, 0, same_learner ? w->snap : NULL,
                                          SNAPSHOT_FETCH_TIMEOUT_MS, err);
    if (s == NULL)
        return -1;
    snapshot_client_stats(w->sc, &after);
    const bool delta = after.delta_transfers > before.delta_transfers &&
                       after.digest_failures == before.digest_failures;
    if (same_learner && snapshot_version(s) == snapshot_version(w->snap)) {
        snapshot_unref(&s); /* nothing newer published */
        return 0;
    }
    size_t len;
    const uint8_t *data = snapshot_data(s, &len);
    char what[64];
    snprintf(what, sizeof what, "snapshot v%llu", (unsigned long long)snapshot_version(s));
    snapshot_t *for_policy = snapshot_ref(s);
    quillan_policy_t *p =
        quillan_policy_load_bytes(data, len, what, snapshot_release, for_policy, err);
    if (p == NULL) {
        snapshot_unref(&for_policy);
        snapshot_unref(&s);
        return -1;
    }
    quillan_policy_release(&w->policy);
    snapshot_unref(&w->snap);
    w->policy = p;
    w->snap = s;
    w->snap_gen = rgen;
    const uint64_t version = snapshot_version(s);
    pthread_mutex_lock(&w->mu);
    w->st.snapshots++;
    w->st.delta_snapshots += delta;
    w->st.snapshot_version = version;
    pthread_mutex_unlock(&w->mu);
    const log_field_t f[] = {{"snapshot_version", (double)version},
                             {"bytes", (double)len},
                             {"transfer_bytes", (double)(after.bytes - before.bytes)},
                             {"delta", delta ? 1.0 : 0.0},
                             {"fetch_seconds", now_s() - t0}};
    log_emit(LOG_INFO, "rollout.snapshot", f, Q_ARRAY_LEN(f), "loaded %s (%s)", what,
             delta ? "delta" : "full");
    return 0;
}

/* The engine prompt of a job; -1 with err when its request does not fit the policy. */
static int job_prompt(const job_t *j, const quillan_policy_info_t *info, int32_t *stop,
                      quillan_prompt_t *out, qerr_t *err) {
    const Quillan__RolloutRequest *rq = j->rq;
    if (rollout_sampling_from_proto(rq->sampling, info->vocab_size, stop, &out->sampling, err))
        return -1;
    if (rq->n_prompt_tokens < 1 || rq->n_prompt_tokens >= (size_t)info->context)
        return qerr_set(err, QERR_RANGE, "prompt of %zu tokens; the context is %d",
                        rq->n_prompt_tokens, info->context);
    if (rq->group_size < 1 || rq->group_size > REWARD_MAX_SAMPLES)
        return qerr_set(err, QERR_RANGE, "group_size %u not in [1, %u]", rq->group_size,
                        REWARD_MAX_SAMPLES);
    out->prompt_id = rq->prompt_id;
    out->tokens = (const int32_t *)rq->prompt_tokens; /* ids < vocab, checked by the engine */
    out->n_tokens = (int)rq->n_prompt_tokens;
    out->n_samples = (int)rq->group_size;
    return 0;
}

typedef struct {
    rollout_worker_t *w;
    job_t **jobs;
    double t0;
    uint64_t version; /* of the snapshot the batch runs with */
} batch_t;

static void drop_job(rollout_worker_t *w, job_t *j, const char *why) {
    log_warn("rollout.lease_dropped", "lease %llu (prompt %llu): %s",
             (unsigned long long)j->rq->lease_id, (unsigned long long)j->rq->prompt_id, why);
    rollout_group_free(&j->out);
    pthread_mutex_lock(&w->mu);
    q_push(&w->out_q, j);
    pthread_mutex_unlock(&w->mu);
}

/* quillan_generate's done callback: the job's group goes on to the reward thread. */
static void on_group_done(void *ctx, int index, quillan_group_t *group) {
    batch_t *b = ctx;
    rollout_worker_t *w = b->w;
    job_t *j = b->jobs[index];
    j->group = *group;
    memset(group, 0, sizeof *group);
    j->generated = true;
    j->gen_seconds = now_s() - b->t0;
    j->version = b->version;
    const Quillan__SamplingParams *sp = j->rq->sampling;
    j->kept_counts =
        sp->temperature > 0.0f && (sp->top_k > 0 || (sp->top_p > 0.0f && sp->top_p < 1.0f));
    const int G = j->group.n_samples;
    j->texts = calloc((size_t)G, sizeof *j->texts);
    qerr_t err = {0};
    for (int i = 0; j->texts && i < G; i++) {
        const quillan_sample_t *smp = &j->group.samples[i];
        j->tokens += (size_t)smp->n_tokens;
        size_t len;
        char *raw = quillan_detokenize(w->policy, smp->tokens, (size_t)smp->n_tokens, &len, &err);
        if (raw == NULL)
            break;
        j->texts[i] = rollout_text_utf8(raw, len, NULL);
        free(raw);
        if (j->texts[i] == NULL)
            break;
    }
    bool ok = j->texts != NULL;
    for (int i = 0; ok && i < G; i++)
        ok = j->texts[i] != NULL;
    pthread_mutex_lock(&w->mu);
    w->st.groups_generated++;
    w->st.tokens += j->tokens;
    if (ok) {
        q_push(&w->rew_q, j);
        pthread_cond_signal(&w->rew_cv);
    }
    pthread_mutex_unlock(&w->mu);
    if (!ok)
        drop_job(w, j, err.code ? err.msg : "out of memory detokenizing");
}

/* Generates every job of the batch with the current policy; jobs that cannot run are given up. */
static void generate_batch(rollout_worker_t *w, job_t **jobs, int n) {
    quillan_policy_info_t info;
    quillan_policy_info(w->policy, &info);
    const model_config_t *mc = &w->policy->cfg;
    const rollout_route_shape_t route = {.num_layers = mc->num_layers,
                                         .top_k_minis = mc->top_k_minis,
                                         .top_k_experts = mc->top_k_experts,
                                         .top_k_micros = mc->top_k_micros,
                                         .plan_words = info.plan_words};
    quillan_prompt_t *prompts = calloc((size_t)n, sizeof *prompts);
    int32_t **stops = calloc((size_t)n, sizeof *stops);
    job_t **run = calloc((size_t)n, sizeof *run);
    quillan_group_t *groups = calloc((size_t)n, sizeof *groups);
    int m = 0;
    for (int i = 0; prompts && stops && run && groups && i < n; i++) {
        job_t *j = jobs[i];
        jobs[i] = NULL;
        j->route = route;
        const Quillan__SamplingParams *sp = j->rq->sampling;
        stops[m] = malloc(((sp ? sp->n_stop_tokens : 0) + 1) * sizeof **stops);
        qerr_t err = {0};
        if (stops[m] == NULL) {
            drop_job(w, j, "out of memory");
            continue;
        }
        if (job_prompt(j, &info, stops[m], &prompts[m], &err) != 0) {
            free(stops[m]);
            drop_job(w, j, err.msg);
            continue;
        }
        run[m++] = j;
    }
    for (int i = 0; i < n; i++) /* left over only when an allocation above failed */
        if (jobs[i])
            drop_job(w, jobs[i], "out of memory");
    if (m > 0) {
        const uint64_t version = snapshot_version(w->snap);
        batch_t b = {.w = w, .jobs = run, .t0 = now_s(), .version = version};
        qerr_t err = {0};
        int rc =
            quillan_generate(w->engine, w->policy, prompts, m, groups, on_group_done, &b, &err);
        for (int i = 0; i < m; i++)
            quillan_group_free(&groups[i]);
        if (rc != 0) {
            /* The engine checks every prompt before any work: find the one at fault by running
             * the others one by one (a failure mid-way leaves the finished ones delivered). */
            log_warn("rollout.generate_failed", "batch of %d: %s", m, err.msg);
            for (int i = 0; i < m; i++) {
                if (run[i]->generated)
                    continue;
                batch_t one = {.w = w, .jobs = &run[i], .t0 = now_s(), .version = version};
                quillan_group_t g = {0};
                if (quillan_generate(w->engine, w->policy, &prompts[i], 1, &g, on_group_done, &one,
                                     &err) != 0 &&
                    !run[i]->generated)
                    drop_job(w, run[i], err.msg);
                quillan_group_free(&g);
            }
        }
        const double busy = now_s() - b.t0;
        pthread_mutex_lock(&w->mu);
        w->st.gen_seconds += busy;
        pthread_mutex_unlock(&w->mu);
    }
    for (int i = 0; stops && i < m; i++)
        free(stops[i]);
    free(prompts);
    free(stops);
    free(run);
    free(groups);
}

static void *gen_main(void *arg) {
    rollout_worker_t *w = arg;
    pthread_mutex_lock(&w->mu);
    while (!stopping(w)) {
        /* Jobs of a learner that has since restarted: their leases are gone. */
        job_queue_t keep = {0};
        job_t *j;
        while ((j = q_pop(&w->gen_q)) != NULL) {
            if (j->restart_gen == w->restart_gen)
                q_push(&keep, j);
            else
                job_free(j);
        }
        w->gen_q = keep;
        const uint64_t rgen = w->restart_gen, latest = w->latest;
        uint64_t need = 0;
        for (j = w->gen_q.head; j; j = j->next)
            if (j->rq->min_version > need)
                need = j->rq->min_version;
        const bool idle = w->gen_q.head == NULL;
        /* A newly announced version is fetched at once, even without work, so that the next
         * lease starts on it; without any announcement only work makes a fetch worth trying. */
        const uint64_t have = w->snap ? snapshot_version(w->snap) : 0;
        const bool stale = w->snap == NULL || w->snap_gen != rgen;
        const bool update = stale ? !idle || latest > 0 : latest > have || need > have;
        if (idle && !update) {
            cond_wait_s(&w->gen_cv, &w->mu, THREAD_WAKE_S);
            continue;
        }
        pthread_mutex_unlock(&w->mu);

        /* Between batches only: the last batch has finished with the policy it started with. */
        if (update) {
            qerr_t err = {0};
            if (snapshot_update(w, rgen, &err) != 0) {
                log_warn("rollout.snapshot_failed", "%s", err.msg);
                pthread_mutex_lock(&w->mu);
                w->st.snapshot_failures++;
                if (w->snap == NULL || w->snap_gen != rgen) {
                    cond_wait_s(&w->gen_cv, &w->mu, SNAPSHOT_RETRY_S);
                    continue;
                }
                pthread_mutex_unlock(&w->mu);
            }
        }
        const uint64_t version = snapshot_version(w->snap);

        pthread_mutex_lock(&w->mu);
        int n = 0;
        for (j = w->gen_q.head; j; j = j->next)
            n++;
        job_t **batch = calloc((size_t)n ? (size_t)n : 1, sizeof *batch);
        int m = 0;
        if (batch && w->restart_gen == rgen) {
            job_queue_t wait = {0};
            while ((j = q_pop(&w->gen_q)) != NULL) {
                if (j->restart_gen == rgen && j->rq->min_version <= version)
                    batch[m++] = j;
                else
                    q_push(&wait, j);
            }
            w->gen_q = wait;
        }
        if (m == 0) {
            free(batch);
            cond_wait_s(&w->gen_cv, &w->mu, SNAPSHOT_RETRY_S);
            continue;
        }
        pthread_mutex_unlock(&w->mu);
        generate_batch(w, batch, m);
        free(batch);
        pthread_mutex_lock(&w->mu);
    }
    pthread_mutex_unlock(&w->mu);
    return NULL;
}

/* ---- reward thread ---- */

/* Scores a job's samples; 0 with j->out built, or -1 with err: the reward call failed, or
 * (*fatal set) the group cannot be built. */
static int job_score(rollout_worker_t *w, job_t *j, bool *fatal, qerr_t *err) {
    *fatal = false;
    const Quillan__RolloutRequest *rq = j->rq;
    const size_t G = (size_t)j->group.n_samples;
    reward_sample_t *samples = calloc(G, sizeof *samples);
    reward_kv_t *md = calloc(rq->n_metadata ? rq->n_metadata : 1, sizeof *md);
    uint32_t **toks = calloc(G, sizeof *toks);
    int rc = samples && md && toks ? 0 : qerr_set(err, QERR_NOMEM, "reward batch");
    for (size_t i = 0; rc == 0 && i < G; i++) {
        const quillan_sample_t *s = &j->group.samples[i];
        toks[i] = malloc(((size_t)s->n_tokens + 1) * sizeof **toks);
        if (toks[i] == NULL) {
            rc = qerr_set(err, QERR_NOMEM, "reward batch");
            break;
        }
        for (int t = 0; t < s->n_tokens; t++)
            toks[i][t] = (uint32_t)s->tokens[t];
        samples[i] = (reward_sample_t){.prompt = rq->prompt_text,
                                       .completion = j->texts[i],
                                       .prompt_tokens = rq->prompt_tokens,
                                       .n_prompt_tokens = rq->n_prompt_tokens,
                                       .completion_tokens = toks[i],
                                       .n_completion_tokens = (size_t)s->n_tokens,
                                       .finish_reason = s->finish == QUILLAN_FINISH_STOP
                                                            ? REWARD_FINISH_STOP
                                                            : REWARD_FINISH_LENGTH};
    }
    for (size_t k = 0; rc == 0 && k < rq->n_metadata; k++)
        md[k] = (reward_kv_t){rq->metadata[k]->key, rq->metadata[k]->value};
    reward_result_t res;
    reward_result_init(&res);
    if (rc == 0) {
        const reward_batch_t batch = {.task = "",
                                      .samples = samples,
                                      .n_samples = G,
                                      .metadata = md,
                                      .n_metadata = rq->n_metadata};
        const double t0 = now_s();
        rc = reward_client_score(w->rc, &batch, &res, err);
        j->reward_seconds += now_s() - t0;
    }
    if (rc == 0) {
        j->reward_sum = 0.0;
        j->n_rewarded = 0;
        for (size_t i = 0; i < G; i++)
            if (res.total[i].has) {
                j->reward_sum += res.total[i].value;
                j->n_rewarded++;
            }
        const rollout_group_src_t src = {.rq = rq,
                                         .group = &j->group,
                                         .texts = (const char *const *)j->texts,
                                         .policy_version = j->version,
                                         .kept_counts = j->kept_counts,
                                         .route = j->route,
                                         .rewards = &res,
                                         .service_names = w->service_names,
                                         .gen_seconds = j->gen_seconds,
                                         .reward_seconds = j->reward_seconds};
        j->out = rollout_group_build(&src, err);
        if (j->out == NULL) {
            *fatal = true;
            rc = -1;
        }
    }
    reward_result_free(&res);
    for (size_t i = 0; toks && i < G; i++)
        free(toks[i]);
    free(toks);
    free(samples);
    free(md);
    return rc;
}

static void *reward_main(void *arg) {
    rollout_worker_t *w = arg;
    double backoff = w->cfg.reward.backoff_min_s;
    pthread_mutex_lock(&w->mu);
    while (!stopping(w)) {
        job_t *j = q_pop(&w->rew_q);
        if (j == NULL) {
            cond_wait_s(&w->rew_cv, &w->mu, THREAD_WAKE_S);
            continue;
        }
        if (j->restart_gen != w->restart_gen) {
            job_free(j);
            continue;
        }
        pthread_mutex_unlock(&w->mu);
        qerr_t err = {0};
        bool fatal;
        int rc = job_score(w, j, &fatal, &err);
        pthread_mutex_lock(&w->mu);
        if (rc == 0) {
            backoff = w->cfg.reward.backoff_min_s;
            q_push(&w->out_q, j);
            continue;
        }
        if (stopping(w)) {
            job_free(j);
            break;
        }
        if (fatal) {
            pthread_mutex_unlock(&w->mu);
            drop_job(w, j, err.msg);
            pthread_mutex_lock(&w->mu);
            continue;
        }
        w->st.reward_failures++;
        if (err.code != QERR_TIMEOUT && err.code != QERR_NOMEM)
            j->reward_errors++; /* the services answered, with an error */
        const bool give_up = j->reward_errors >= REWARD_ERROR_ATTEMPTS;
        const uint64_t failures = w->st.reward_failures;
        pthread_mutex_unlock(&w->mu);
        const log_field_t f[] = {{"lease_id", (double)j->rq->lease_id},
                                 {"reward_failures", (double)failures},
                                 {"backoff_s", give_up ? 0.0 : backoff}};
        log_emit(LOG_WARN, "rollout.reward_failed", f, Q_ARRAY_LEN(f), "lease %llu: %s; %s",
                 (unsigned long long)j->rq->lease_id, err.msg,
                 give_up ? "giving the lease up" : "group kept, retrying after the back-off");
        if (give_up) {
            drop_job(w, j, err.msg);
            pthread_mutex_lock(&w->mu);
            continue;
        }
        pthread_mutex_lock(&w->mu);
        q_push_front(&w->rew_q, j);
        const double until = now_s() + backoff;
        while (!stopping(w) && now_s() < until)
            cond_wait_s(&w->rew_cv, &w->mu, THREAD_WAKE_S);
        backoff *= 2.0;
        if (backoff > w->cfg.reward.backoff_max_s)
            backoff = w->cfg.reward.backoff_max_s;
    }
    pthread_mutex_unlock(&w->mu);
    return NULL;
}

/* ---- network thread ---- */

static void sent_remove(rollout_worker_t *w, size_t i) {
    rollout_group_free(&w->sent[i].g);
    w->sent[i] = w->sent[--w->n_sent];
}

static void sent_clear(rollout_worker_t *w) {
    while (w->n_sent)
        sent_remove(w, w->n_sent - 1);
}

static int sent_find(const rollout_worker_t *w, uint64_t lease_id) {
    for (size_t i = 0; i < w->n_sent; i++)
        if (w->sent[i].lease_id == lease_id)
            return (int)i;
    return -1;
}

/* Sends a group; dispatch_client_send_group writes its worker id into g, which the group does
 * not own: it is set back before the group is kept or freed. */
static int group_send(rollout_worker_t *w, Quillan__TrajectoryGroup *g, qerr_t *err) {
    char *id = g->worker_id;
    int rc = dispatch_client_send_group(w->dc, g, err);
    g->worker_id = id;
    return rc;
}

static void on_work(void *ctx, const Quillan__RolloutRequest *rq, uint32_t timeout_ms) {
    rollout_worker_t *w = ctx;
    (void)timeout_ms;
    /* An own copy of the request: pack it and unpack it with the default allocator. */
    size_t n = quillan__rollout_request__get_packed_size(rq);
    uint8_t *buf = malloc(n ? n : 1);
    job_t *j = calloc(1, sizeof *j);
    if (buf && j) {
        quillan__rollout_request__pack(rq, buf);
        j->rq = quillan__rollout_request__unpack(NULL, n, buf);
    }
    free(buf);
    if (j == NULL || j->rq == NULL || j->rq->sampling == NULL) {
        log_warn("rollout.lease_dropped", "lease %llu: %s", (unsigned long long)rq->lease_id,
                 j && j->rq ? "no sampling parameters" : "out of memory");
        job_free(j);
        dispatch_client_lease_drop(w->dc, rq->lease_id);
        pthread_mutex_lock(&w->mu);
        w->st.leases_dropped++;
        pthread_mutex_unlock(&w->mu);
        return;
    }
    pthread_mutex_lock(&w->mu);
    j->restart_gen = w->restart_gen;
    w->st.leases++;
    q_push(&w->gen_q, j);
    pthread_cond_signal(&w->gen_cv);
    pthread_mutex_unlock(&w->mu);
}

static void on_version(void *ctx, uint64_t latest, uint64_t old_policy) {
    rollout_worker_t *w = ctx;
    (void)old_policy;
    pthread_mutex_lock(&w->mu);
    w->latest = latest;
    pthread_cond_signal(&w->gen_cv);
    pthread_mutex_unlock(&w->mu);
}

static void on_restart(void *ctx) {
    rollout_worker_t *w = ctx;
    pthread_mutex_lock(&w->mu);
    w->restart_gen++;
    w->latest = 0;
    w->st.learner_restarts++;
    job_t *j;
    while ((j = q_pop(&w->gen_q)) != NULL) {
        w->st.leases_dropped++;
        job_free(j);
    }
    pthread_cond_signal(&w->gen_cv);
    pthread_mutex_unlock(&w->mu);
    /* Groups the old learner never acknowledged go with the leases, not to the new learner:
     * its checkpoint says which units were accepted and re-leases the others, and a group may
     * carry a version that the new incarnation publishes again with other weights. */
    sent_clear(w);
    log_warn("rollout.restart", "the learner restarted: leases dropped, fetching its weights");
}

static void on_ack(void *ctx, uint64_t lease_id, Quillan__AckStatus status) {
    rollout_worker_t *w = ctx;
    int i = sent_find(w, lease_id);
    pthread_mutex_lock(&w->mu);
    if ((unsigned)status < Q_ARRAY_LEN(w->st.acks))
        w->st.acks[status]++;
    pthread_mutex_unlock(&w->mu);
    if (i < 0)
        return;
    if (status == QUILLAN__ACK_STATUS__ACK_STATUS_UNSPECIFIED) {
        /* Not sent from here: on a learner restart the client reports every group it waits
         * for before on_restart, which forgets them; sent from here, they would reach the new
         * learner first. (Sending from here once also looped: the client's pass met the group
         * again and reported it without end, a livelock; its pass now skips what a callback
         * adds, dispatch_client.c pending_expire.) */
        w->sent[i].resend = true;
        return;
    }
    if (status != QUILLAN__ACK_STATUS__ACK_STATUS_ACCEPTED)
        log_info("rollout.group_dropped", "lease %llu: the learner answered %s",
                 (unsigned long long)lease_id,
                 status == QUILLAN__ACK_STATUS__ACK_STATUS_DUPLICATE       ? "duplicate"
                 : status == QUILLAN__ACK_STATUS__ACK_STATUS_UNKNOWN_LEASE ? "unknown lease"
                                                                           : "rejected");
    sent_remove(w, (size_t)i);
}

/* Sends again every group whose Ack did not come in time. */
static void sent_resend(rollout_worker_t *w) {
    for (size_t i = 0; i < w->n_sent; i++) {
        if (!w->sent[i].resend)
            continue;
        w->sent[i].resend = false;
        qerr_t err = {0};
        if (group_send(w, w->sent[i].g, &err) != 0)
            log_warn("rollout.send_failed", "%s", err.msg);
    }
}

/* Sends or gives up every finished job of the current learner. */
static void out_drain(rollout_worker_t *w) {
    pthread_mutex_lock(&w->mu);
    job_t *list = q_take_all(&w->out_q);
    const uint64_t rgen = w->restart_gen, version = w->st.snapshot_version;
    pthread_mutex_unlock(&w->mu);
    dispatch_client_set_version(w->dc, version);
    while (list) {
        job_t *j = list;
        list = j->next;
        if (j->restart_gen != rgen) {
            job_free(j);
            continue;
        }
        if (j->out == NULL) {
            dispatch_client_lease_drop(w->dc, j->rq->lease_id);
            pthread_mutex_lock(&w->mu);
            w->st.leases_dropped++;
            pthread_mutex_unlock(&w->mu);
            job_free(j);
            continue;
        }
        if (w->n_sent == w->cap_sent) {
            size_t cap = w->cap_sent ? 2 * w->cap_sent : 8;
            sent_t *s = realloc(w->sent, cap * sizeof *s);
            if (s == NULL) {
                dispatch_client_lease_drop(w->dc, j->rq->lease_id);
                job_free(j);
                continue;
            }
            w->sent = s;
            w->cap_sent = cap;
        }
        qerr_t err = {0};
        if (group_send(w, j->out, &err) != 0)
            log_warn("rollout.send_failed", "%s (resent when no Ack comes)", err.msg);
        pthread_mutex_lock(&w->mu);
        w->st.groups_sent++;
        const rollout_worker_stats_t st = w->st;
        pthread_mutex_unlock(&w->mu);
        log_field_t f[12];
        size_t nf = 0;
        f[nf++] = (log_field_t){"tokens_per_s",
                                st.gen_seconds > 0 ? (double)st.tokens / st.gen_seconds : 0.0};
        f[nf++] = (log_field_t){"groups_done", (double)st.groups_sent};
        f[nf++] = (log_field_t){"snapshot_version", (double)j->version};
        f[nf++] = (log_field_t){"prompt_id", (double)j->rq->prompt_id};
        f[nf++] = (log_field_t){"lease_id", (double)j->rq->lease_id};
        f[nf++] = (log_field_t){"tokens", (double)j->tokens};
        f[nf++] = (log_field_t){"gen_seconds", j->gen_seconds};
        f[nf++] = (log_field_t){"reward_seconds", j->reward_seconds};
        f[nf++] = (log_field_t){"rewarded", (double)j->n_rewarded};
        if (j->n_rewarded)
            f[nf++] = (log_field_t){"reward_mean", j->reward_sum / (double)j->n_rewarded};
        f[nf++] = (log_field_t){"reward_failures", (double)st.reward_failures};
        log_emit(LOG_INFO, "rollout.group", f, nf, NULL);
        w->sent[w->n_sent++] = (sent_t){j->rq->lease_id, j->out, false};
        j->out = NULL;
        job_free(j);
    }
}

/* ---- lifetime ---- */

void rollout_worker_destroy(rollout_worker_t **wp) {
    if (wp == NULL || *wp == NULL)
        return;
    rollout_worker_t *w = *wp;
    job_queue_t *qs[] = {&w->gen_q, &w->rew_q, &w->out_q};
    for (size_t i = 0; i < Q_ARRAY_LEN(qs); i++) {
        job_t *j;
        while ((j = q_pop(qs[i])) != NULL)
            job_free(j);
    }
    sent_clear(w);
    free(w->sent);
    quillan_policy_release(&w->policy);
    snapshot_unref(&w->snap);
    dispatch_client_destroy(&w->dc);
    snapshot_client_destroy(&w->sc);
    reward_client_destroy(&w->rc);
    quillan_engine_destroy(&w->engine);
    free(w->service_names);
    pthread_mutex_destroy(&w->mu);
    pthread_cond_destroy(&w->gen_cv);
    pthread_cond_destroy(&w->rew_cv);
    free(w);
    *wp = NULL;
}

rollout_worker_t *rollout_worker_new(void *zctx, const rollout_worker_options_t *o, qerr_t *err) {
    const quillan_config_t *cfg = o->cfg;
    if (o->stop == NULL) {
        qerr_set(err, QERR_INVALID, "rollout worker: no stop flag");
        return NULL;
    }
    net_security_t sec;
    if (net_security_from_config(cfg, NET_ROLE_CLIENT, &sec, err) != 0)
        return NULL;
    if (cfg->reward.n_services < 1) {
        qerr_set(err, QERR_INVALID, "reward.services: a rollout worker needs at least one");
        return NULL;
    }
    if (o->threads < 0) {
        qerr_set(err, QERR_RANGE, "threads: %d is negative", o->threads);
        return NULL;
    }
    const char *id = o->worker_id && o->worker_id[0] ? o->worker_id : "rollout";
    if (strlen(id) >= WORKER_ID_MAX) {
        qerr_set(err, QERR_RANGE, "worker id '%s': longer than %d bytes", id, WORKER_ID_MAX - 1);
        return NULL;
    }
    rollout_worker_t *w = calloc(1, sizeof *w);
    if (w == NULL) {
        qerr_set(err, QERR_NOMEM, "rollout worker");
        return NULL;
    }
    pthread_mutex_init(&w->mu, NULL);
    pthread_cond_init(&w->gen_cv, NULL);
    pthread_cond_init(&w->rew_cv, NULL);
    w->cfg = *cfg;
    snprintf(w->id, sizeof w->id, "%s", id);
    w->stop = o->stop;
    const uint64_t incarnation = net_incarnation_new();

    net_options_t net;
    reward_net_options(&w->cfg, &net);
    net.chunk_bytes = w->cfg.network.chunk_bytes;
    const model_config_t *mc = &w->cfg.model;
    /* Leases are checked against the model of the run config; each prompt is checked again
     * against the loaded snapshot's model before it runs. */
    w->limits = (dispatch_codec_limits_t){.vocab_size = (uint32_t)mc->vocab_size,
                                          .max_group_size = REWARD_MAX_SAMPLES,
                                          .max_prompt_tokens = (uint32_t)mc->context - 1,
                                          .max_new_tokens = (uint32_t)mc->context};

    dispatch_client_options_t dco;
    dispatch_client_options_init(&dco);
    dco.endpoint = w->cfg.network.dispatcher;
    dco.worker_id = w->id;
    char host[256] = "";
    gethostname(host, sizeof host - 1);
    dco.host = host;
    dco.incarnation_id = incarnation;
    dco.net = net;
    dco.security = sec;
    dco.limits = w->limits;
    dco.capacity = (uint32_t)w->cfg.rollout.credits;
    dco.heartbeat_ivl_s = w->cfg.network.heartbeat_ivl_s;
    dco.heartbeat_liveness = w->cfg.network.heartbeat_liveness;
    dco.cb = (dispatch_client_callbacks_t){.on_work = on_work,
                                           .on_ack = on_ack,
                                           .on_version = on_version,
                                           .on_restart = on_restart,
                                           .ctx = w};

    snapshot_client_options_t sco;
    snapshot_client_options_init(&sco);
    sco.endpoint = w->cfg.network.weights;
    sco.sender_id = w->id;
    sco.incarnation_id = incarnation;
    sco.net = net;
    sco.security = sec;
    sco.chunks_in_flight = w->cfg.network.chunks_in_flight;

    quillan_engine_params_t ep;
    quillan_engine_params_default(&ep);
    ep.threads = o->threads;
    ep.record_routing = w->cfg.model.routing_replay ? 1 : 0;

    if ((w->dc = dispatch_client_new(zctx, &dco, err)) == NULL ||
        (w->sc = snapshot_client_new(zctx, &sco, err)) == NULL ||
        (w->rc = reward_client_new(&w->cfg, w->id, err)) == NULL ||
        (w->engine = quillan_engine_new(&ep, err)) == NULL) {
        rollout_worker_destroy(&w);
        return NULL;
    }
    reward_client_set_stop(w->rc, w->stop);
    snapshot_client_set_stop(w->sc, w->stop);
    size_t ns = reward_client_n_services(w->rc);
    w->service_names = calloc(ns, sizeof *w->service_names);
    if (w->service_names == NULL) {
        qerr_set(err, QERR_NOMEM, "rollout worker");
        rollout_worker_destroy(&w);
        return NULL;
    }
    for (size_t i = 0; i < ns; i++)
        w->service_names[i] = reward_client_service_name(w->rc, i);
    return w;
}

int rollout_worker_run(rollout_worker_t *w, qerr_t *err) {
    pthread_t gen, rew;
    w->threads_stop = false;
    if (pthread_create(&gen, NULL, gen_main, w) != 0)
        return qerr_set(err, QERR_NOMEM, "rollout worker: cannot start the generation thread");
    if (pthread_create(&rew, NULL, reward_main, w) != 0) {
        pthread_mutex_lock(&w->mu);
        w->threads_stop = true;
        pthread_cond_broadcast(&w->gen_cv);
        pthread_mutex_unlock(&w->mu);
        pthread_join(gen, NULL);
        return qerr_set(err, QERR_NOMEM, "rollout worker: cannot start the reward thread");
    }
    log_info("rollout.start",
             "worker '%s': dispatcher %s, weights %s, %d engine threads, %d credits", w->id,
             w->cfg.network.dispatcher, w->cfg.network.weights, quillan_engine_threads(w->engine),
             w->cfg.rollout.credits);
    int rc = 0;
    while (!*w->stop) {
        if (dispatch_client_poll(w->dc, NET_POLL_MS, err) < 0) {
            if (*w->stop)
                break; /* a signal interrupted the poll */
            rc = -1;
            break;
        }
        sent_resend(w);
        out_drain(w);
    }
    pthread_mutex_lock(&w->mu);
    w->threads_stop = true;
    pthread_cond_broadcast(&w->gen_cv);
    pthread_cond_broadcast(&w->rew_cv);
    pthread_mutex_unlock(&w->mu);
    pthread_join(gen, NULL);
    pthread_join(rew, NULL);
    if (rc == 0)
        out_drain(w); /* groups scored before the stop still go out (the socket lingers) */
    rollout_worker_stats_t st;
    rollout_worker_stats(w, &st);
    const log_field_t f[] = {{"groups_done", (double)st.groups_sent},
                             {"tokens", (double)st.tokens},
                             {"tokens_per_s", st.gen_seconds > 0 ? st.tokens / st.gen_seconds : 0},
                             {"reward_failures", (double)st.reward_failures},
                             {"snapshots", (double)st.snapshots}};
    log_emit(LOG_INFO, "rollout.stop", f, Q_ARRAY_LEN(f), "worker '%s' stopped", w->id);
    return rc;
}

void rollout_worker_stats(rollout_worker_t *w, rollout_worker_stats_t *out) {
    pthread_mutex_lock(&w->mu);
    *out = w->st;
    pthread_mutex_unlock(&w->mu);
}
