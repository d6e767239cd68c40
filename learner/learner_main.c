/* `quillan-learner`: the learner process of ARCHITECTURE.md §1. In RL mode it binds the
 * dispatcher (network.dispatcher), the weights server (network.weights) and the log hub
 * (network.log_in / log_out), and trains (learner/learner.h) on the groups rollout workers
 * return; in SFT mode it runs learner/sft.h. Logs go to stderr as JSON lines (and to the hub,
 * logging.file and logging.tensorboard); nothing is printed on stdout.
 *
 * Threads: the training thread (main) and one network thread that serves the dispatcher and the
 * weights server (a training step takes longer than a heartbeat interval). The network thread
 * holds `net_mu` while it serves; a checkpoint takes it to capture the dispatcher's and the
 * batcher's states at one moment (lock order: net_mu, then the dispatcher's lock, then the
 * learner's).
 *
 * Exit status: 0 after the last step or a clean stop on SIGINT/SIGTERM (both write a
 * checkpoint), 1 on a runtime failure (bad config or data, bind failure, starved batcher), 2 on
 * a usage error. */
#include "checkpoint.h"
#include "config.h"
#include "daemon.h"
#include "dispatcher.h"
#include "jsonl.h"
#include "learner.h"
#include "log.h"
#include "net_security.h"
#include "loghub.h"
#include "sft.h"
#include "weights_server.h"

#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <zmq.h>

#define NET_POLL_MS 50            /* network thread: longest wait before serving timed duties */
#define TRAIN_WAIT_MS 100         /* training thread: longest wait for a group before re-checking */
#define WORKERS_MAX 256           /* worker rows read for perf/rollout_tokens_per_s */
#define NET_STATS_INTERVAL_S 10.0 /* between dispatch.stats records */

/* SIGINT / SIGTERM: both modes stop at the next step boundary (SFT: after the step under way,
 * sft.h) and checkpoint. */
static volatile sig_atomic_t stop_flag;

static void usage(FILE *out) {
    fprintf(
        out,
        "usage: quillan-learner --config FILE [--set section.key=value]... [--resume DIR|auto]\n"
        "\n"
        "The learner of a Quillan run. learner.mode rl: binds network.dispatcher (work\n"
        "leases), network.weights (snapshots) and the log hub (network.log_in, log_out),\n"
        "publishes policy version 1 and trains GRPO/DAPO on the groups rollout workers\n"
        "return, until learner.max_steps (or learner.total_steps). learner.mode sft:\n"
        "supervised fine-tuning on data.train (as `quillan sft`).\n"
        "Checkpoints go to learner.checkpoint_dir every learner.checkpoint_interval steps,\n"
        "at the end and (RL) on SIGINT/SIGTERM.\n"
        "\n"
        "options:\n"
        "  --config FILE    YAML config of the run (docs/CONFIG.md)\n"
        "  --set K=V        override one key, e.g. --set learner.lr=1e-4\n"
        "  --resume PATH    continue from a checkpoint (a step directory or a root holding\n"
        "                   `latest`) at its step and policy version; `auto`: the latest\n"
        "                   under learner.checkpoint_dir if any, else start fresh\n"
        "  --help           this text\n"
        "\n"
        "Logs are JSON lines on stderr (learner.step records carry the metrics of\n"
        "TRAINING.md; eval records carry eval/accuracy).\n"
        "exit status: 0 ok, 1 runtime error, 2 usage error\n");
}

/* ---- the RL process ---- */

typedef struct {
    const quillan_config_t *cfg;
    learner_t *l;
    dispatcher_t *d;
    weights_server_t *ws;
    pthread_mutex_t net_mu; /* held by the network thread while it serves */
    pthread_mutex_t mu;     /* with cv: a group arrived */
    pthread_cond_t cv;
    int arrived;
    volatile int net_stop;
    int net_failed;
    qerr_t net_err;
    uint64_t groups_refused; /* groups the learner refused (malformed, a version ahead of its
                              * own, out of memory): Acked REJECTED, their units leased again */
} app_t;

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static void net_options_from(const quillan_config_t *cfg, net_options_t *o) {
    net_options_init(o);
    o->control_max_msg_bytes = cfg->network.max_msg_bytes;
    o->chunk_bytes = cfg->network.chunk_bytes;
    o->heartbeat_ivl_ms = (int)(cfg->network.heartbeat_ivl_s * 1000.0 + 0.5);
    o->heartbeat_timeout_ms = o->heartbeat_ivl_ms * cfg->network.heartbeat_liveness;
    o->heartbeat_ttl_ms = o->heartbeat_timeout_ms;
}

/* Without CURVE, plain TCP stays on loopback unless security.bind_any (ARCHITECTURE.md §4);
 * with CURVE the ZAP allow-list decides who may connect. */
static int bind_check(const quillan_config_t *cfg, const char *key, const char *endpoint,
                      qerr_t *err) {
    if (cfg->security.curve || strncmp(endpoint, "tcp://", 6) != 0 || cfg->security.bind_any)
        return 0;
    static const char *const loopback[] = {"127.", "localhost:", "[::1]:", "lo:"};
    for (size_t i = 0; i < Q_ARRAY_LEN(loopback); i++)
        if (strncmp(endpoint + 6, loopback[i], strlen(loopback[i])) == 0)
            return 0;
    return qerr_set(err, QERR_INVALID,
                    "%s: %s is not a loopback address; without security.curve set "
                    "security.bind_any: true to serve other hosts over plain TCP",
                    key, endpoint);
}

/* The bad configs of issue 5 that no single key shows, before anything starts: no training
 * set, a batch larger than the dataset. */
static int preflight(const quillan_config_t *cfg, jsonl_reader_t **data, qerr_t *err) {
    if (!cfg->data.train[0])
        return qerr_set(err, QERR_INVALID, "data.train: RL needs a JSONL of {prompt, answer}");
    *data = jsonl_reader_new(cfg->data.train, 0, err);
    if (!*data)
        return qerr_wrap(err, "data.train");
    const size_t n = jsonl_reader_count(*data);
    if ((size_t)cfg->learner.batch_groups > n)
        return qerr_set(err, QERR_INVALID,
                        "learner.batch_groups: a batch of %d groups is larger than the %zu "
                        "prompts of data.train (%s)",
                        cfg->learner.batch_groups, n, cfg->data.train);
    if (bind_check(cfg, "network.dispatcher", cfg->network.dispatcher, err) ||
        bind_check(cfg, "network.weights", cfg->network.weights, err) ||
        (cfg->logging.hub && (bind_check(cfg, "network.log_in", cfg->network.log_in, err) ||
                              bind_check(cfg, "network.log_out", cfg->network.log_out, err))))
        return -1;
    return 0;
}

/* A group from the dispatcher (its thread, under its lock): into the learner. Returns -1 when
 * the learner refused it (a policy version ahead of its own, as after a restore from a
 * checkpoint older than the weights the workers hold; malformed routing; out of memory), so
 * that the dispatcher re-leases its unit; 0 when the learner took it, filtered groups (equal
 * rewards, stale) included: the batcher dropped those on purpose. */
static int on_group(void *ctx, const Quillan__TrajectoryGroup *g,
                    const dispatcher_group_info_t *info) {
    app_t *a = ctx;
    const size_t G = g->n_trajectories;
    size_t total = g->n_prompt_tokens;
    int routed = G > 0;
    for (size_t i = 0; i < G; i++) {
        total += 2 * g->trajectories[i]->n_completion_tokens;
        routed &= g->trajectories[i]->routing != NULL;
    }
    batcher_sample_t *s = calloc(G ? G : 1, sizeof *s);
    learner_route_in_t *r = routed ? calloc(G, sizeof *r) : NULL;
    int32_t *ids = malloc((total ? total : 1) * sizeof *ids);
    qerr_t err = {0};
    int rc = s && ids && (r || !routed) ? 0 : qerr_set(&err, QERR_NOMEM, "out of memory");
    int32_t *p = ids;
    const int32_t *prompt = p;
    for (size_t k = 0; rc == 0 && k < g->n_prompt_tokens; k++)
        *p++ = (int32_t)g->prompt_tokens[k];
    for (size_t i = 0; rc == 0 && i < G; i++) {
        const Quillan__Trajectory *t = g->trajectories[i];
        s[i].tokens = p;
        for (size_t k = 0; k < t->n_completion_tokens; k++)
            *p++ = (int32_t)t->completion_tokens[k];
        if (t->n_kept_counts) {
            s[i].kept = p;
            for (size_t k = 0; k < t->n_kept_counts; k++)
                *p++ = (int32_t)t->kept_counts[k];
        }
        s[i].logp = t->behaviour_logprobs;
        s[i].len = (int)t->n_completion_tokens;
        s[i].truncated = t->finish_reason == QUILLAN__FINISH_REASON__FINISH_REASON_LENGTH;
        s[i].has_reward = t->maybe_reward_case == QUILLAN__TRAJECTORY__MAYBE_REWARD_REWARD;
        s[i].reward = s[i].has_reward ? t->reward : 0;
        if (routed)
            r[i] = (learner_route_in_t){.minis = t->routing->minis,
                                        .experts = t->routing->experts,
                                        .micros = t->routing->micros,
                                        .plan = t->routing->n_plan ? t->routing->plan : NULL};
    }
    batcher_verdict_t v = BATCHER_ACCEPTED;
    if (rc == 0) {
        const batcher_group_in_t in = {.group_id = g->lease_id,
                                       .version = (int64_t)g->policy_version,
                                       .prompt = prompt,
                                       .prompt_len = (int)g->n_prompt_tokens,
                                       .samples = s,
                                       .n_samples = (int)G};
        rc = learner_add_group(a->l, &in, r, &v, &err);
    }
    if (rc != 0) {
        a->groups_refused++;
        log_warn("learner.group_refused", "group %llu from %s refused: %s",
                 (unsigned long long)info->lease_id, info->worker_id, err.msg);
    } else if (v != BATCHER_ACCEPTED) {
        static const char *const why[BATCHER_VERDICT_COUNT] = {"accepted", "all rewards equal",
                                                               "fewer than 2 rewards", "stale"};
        log_field_t f[] = {{"group", (double)g->lease_id}, {"version", (double)g->policy_version}};
        log_emit(v == BATCHER_STALE ? LOG_WARN : LOG_DEBUG, "learner.group_filtered", f,
                 Q_ARRAY_LEN(f), "group %llu: %s", (unsigned long long)g->lease_id, why[v]);
    }
    free(s);
    free(r);
    free(ids);
    pthread_mutex_lock(&a->mu);
    a->arrived = 1;
    pthread_cond_signal(&a->cv);
    pthread_mutex_unlock(&a->mu);
    return rc != 0 ? -1 : 0;
}

static void *net_main(void *arg) {
    app_t *a = arg;
    zmq_pollitem_t items[2] = {{dispatcher_handle(a->d), 0, ZMQ_POLLIN, 0},
                               {weights_server_handle(a->ws), 0, ZMQ_POLLIN, 0}};
    while (!a->net_stop) {
        if (zmq_poll(items, 2, NET_POLL_MS) < 0 && errno != EINTR) {
            qerr_set(&a->net_err, QERR_IO, "zmq_poll: %s", zmq_strerror(errno));
            a->net_failed = 1;
            break;
        }
        pthread_mutex_lock(&a->net_mu);
        int rc = dispatcher_poll(a->d, 0, &a->net_err);
        if (rc >= 0)
            rc = weights_server_poll(a->ws, 0, &a->net_err);
        pthread_mutex_unlock(&a->net_mu);
        if (rc < 0) {
            a->net_failed = 1;
            break;
        }
        dispatcher_set_lease_limit(a->d, (uint64_t)learner_lease_room(a->l));
    }
    pthread_mutex_lock(&a->mu);
    pthread_cond_signal(&a->cv);
    pthread_mutex_unlock(&a->mu);
    return NULL;
}

/* Captures the dispatcher's and the batcher's states at one moment, then writes. */
static int checkpoint(app_t *a, qerr_t *err) {
    uint8_t *ds = NULL, *bs = NULL;
    size_t dlen = 0, blen = 0;
    pthread_mutex_lock(&a->net_mu);
    int rc = dispatcher_save(a->d, &ds, &dlen, err);
    if (rc == 0)
        rc = learner_batcher_save(a->l, &bs, &blen, err);
    pthread_mutex_unlock(&a->net_mu);
    if (rc == 0)
        rc = learner_checkpoint(a->l, ds, dlen, bs, blen, NULL, 0, err);
    free(ds);
    free(bs);
    return rc;
}

static double rollout_tokens_per_s(dispatcher_t *d) {
    static dispatcher_worker_t rows[WORKERS_MAX];
    const size_t n = dispatcher_workers(d, rows, WORKERS_MAX);
    double sum = 0;
    for (size_t i = 0; i < n && i < WORKERS_MAX; i++)
        sum += rows[i].alive ? rows[i].tokens_per_s : 0;
    return sum;
}

/* The dispatcher's and the weights server's running counters as one record, so that drops,
 * re-leases and dead workers show in the log (and the monitor) while the run goes on. */
static void net_stats_log(app_t *a) {
    dispatcher_stats_t d;
    weights_server_stats_t w;
    pthread_mutex_lock(&a->net_mu);
    dispatcher_stats(a->d, &d);
    weights_server_stats(a->ws, &w);
    pthread_mutex_unlock(&a->net_mu);
    uint64_t dropped = 0, wdropped = 0;
    for (int i = 0; i < NET_DROP_COUNT; i++) {
        dropped += d.net.dropped[i];
        wdropped += w.net.dropped[i];
    }
    const log_field_t f[] = {
        {"leases/granted", (double)d.table.granted},
        {"leases/relet", (double)d.table.relet},
        {"leases/expired", (double)d.table.expired},
        {"leases/active", (double)d.table.active},
        {"groups/accepted", (double)d.table.accepted},
        {"groups/duplicates", (double)d.table.duplicates},
        {"groups/unknown_lease", (double)d.table.unknown},
        {"groups/rejected", (double)d.table.rejected},
        {"groups/refused", (double)d.refused},
        {"workers/alive", (double)d.workers_alive},
        {"workers/died", (double)d.workers_died},
        {"workers/restarts", (double)d.worker_restarts},
        {"dispatch/malformed", (double)d.malformed},
        {"dispatch/dropped", (double)dropped},
        {"dispatch/send_failed", (double)(d.send_failed + d.net.send_failed)},
        {"dispatch/disconnects", (double)d.net.disconnects},
        {"weights/chunks_sent", (double)w.chunks_sent},
        {"weights/bytes_sent", (double)w.bytes_sent},
        {"weights/malformed", (double)w.malformed},
        {"weights/dropped", (double)wdropped},
        {"data/epoch", (double)d.table.epoch},
        {"lease_timeout_s", d.lease_timeout_s},
    };
    log_emit(LOG_INFO, "dispatch.stats", f, Q_ARRAY_LEN(f),
             "%llu leases (%llu re-leased), %llu groups accepted, %llu dropped as duplicates, "
             "%llu malformed/dropped messages, %llu workers alive",
             (unsigned long long)d.table.granted, (unsigned long long)d.table.relet,
             (unsigned long long)d.table.accepted, (unsigned long long)d.table.duplicates,
             (unsigned long long)(d.malformed + dropped + w.malformed + wdropped),
             (unsigned long long)d.workers_alive);
}

/* Trains until the step limit, a stop signal or a failure. */
static int train_loop(app_t *a, qerr_t *err) {
    learner_t *l = a->l;
    double wait_s = 0, stats_at = now_s();
    while (!stop_flag && !a->net_failed && learner_steps(l) < learner_step_limit(l)) {
        if (now_s() - stats_at >= NET_STATS_INTERVAL_S) {
            net_stats_log(a);
            stats_at = now_s();
        }
        const learner_perf_t perf = {.wait_seconds = wait_s,
                                     .rollout_tokens_per_s = rollout_tokens_per_s(a->d)};
        learner_train_result_t res;
        const int rc = learner_train(l, &perf, &res, err);
        if (rc < 0)
            return -1;
        if (rc == 1) {
            wait_s = 0;
            dispatcher_set_versions(a->d, learner_version(l), learner_old_version(l));
            dispatcher_set_lease_limit(a->d, (uint64_t)learner_lease_room(l));
            if (learner_checkpoint_due(l) && checkpoint(a, err))
                return -1;
            continue;
        }
        const double t0 = now_s();
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        ts.tv_nsec += TRAIN_WAIT_MS * 1000000L;
        ts.tv_sec += ts.tv_nsec / 1000000000L;
        ts.tv_nsec %= 1000000000L;
        pthread_mutex_lock(&a->mu);
        while (!a->arrived && !stop_flag && !a->net_failed)
            if (pthread_cond_timedwait(&a->cv, &a->mu, &ts) == ETIMEDOUT)
                break;
        a->arrived = 0;
        pthread_mutex_unlock(&a->mu);
        wait_s += now_s() - t0;
    }
    if (a->net_failed) {
        *err = a->net_err;
        return qerr_wrap(err, "network thread");
    }
    return 0;
}

static int run_rl(const quillan_config_t *cfg, const char *resume, qerr_t *err) {
    jsonl_reader_t *data = NULL;
    learner_t *l = NULL;
    void *zctx = NULL;
    loghub_t *hub = NULL;
    app_t a = {.cfg = cfg};
    pthread_mutex_init(&a.net_mu, NULL);
    pthread_mutex_init(&a.mu, NULL);
    pthread_cond_init(&a.cv, NULL);
    pthread_t net_thread;
    int thread_started = 0;

    int rc = preflight(cfg, &data, err);
    if (rc == 0) {
        l = learner_new(cfg, resume, err);
        rc = l ? 0 : -1;
        a.l = l;
    }
    if (rc == 0) {
        zctx = zmq_ctx_new();
        if (!zctx)
            rc = qerr_set(err, QERR_IO, "zmq_ctx_new failed");
    }
    net_options_t nopt;
    net_options_from(cfg, &nopt);
    net_security_t sec = {.mode = NET_SECURITY_NONE};
    if (rc == 0 && net_security_from_config(cfg, NET_ROLE_SERVER, &sec, err) != 0)
        rc = -1;
    const uint64_t incarnation = net_incarnation_new();
    if (rc == 0 && cfg->logging.hub) {
        loghub_options_t ho;
        loghub_options_init(&ho);
        ho.in_endpoint = cfg->network.log_in;
        ho.out_endpoint = cfg->network.log_out;
        ho.sender_id = "quillan-learner";
        ho.incarnation_id = incarnation;
        ho.net = nopt;
        ho.security = sec;
        hub = loghub_new(zctx, &ho, err);
        rc = hub ? 0 : -1;
    }
    if (rc == 0) {
        weights_server_options_t wo;
        weights_server_options_init(&wo);
        wo.endpoint = cfg->network.weights;
        wo.sender_id = "quillan-learner";
        wo.incarnation_id = incarnation;
        wo.net = nopt;
        wo.security = sec;
        a.ws = weights_server_new(zctx, learner_store(l), &wo, err);
        rc = a.ws ? 0 : -1;
    }
    if (rc == 0) {
        const model_config_t *mc = &cfg->model;
        dispatcher_options_t o;
        dispatcher_options_init(&o);
        o.endpoint = cfg->network.dispatcher;
        o.sender_id = "quillan-learner";
        o.incarnation_id = incarnation;
        o.net = nopt;
        o.security = sec;
        o.limits = (dispatch_codec_limits_t){
            .vocab_size = (uint32_t)mc->vocab_size,
            .max_group_size = (uint32_t)cfg->learner.group_size,
            .max_prompt_tokens = (uint32_t)(mc->context - cfg->rollout.max_new_tokens),
            .max_new_tokens = (uint32_t)cfg->rollout.max_new_tokens,
            .num_layers = (uint32_t)mc->num_layers,
            .top_k_minis = (uint32_t)mc->top_k_minis,
            .top_k_experts = (uint32_t)mc->top_k_experts,
            .top_k_micros = (uint32_t)mc->top_k_micros,
            .plan_words = (uint32_t)((mc->diffusion_bits + 63) / 64),
            .num_mini_moes = (uint32_t)mc->num_mini_moes,
            .num_experts_per_mini = (uint32_t)mc->num_experts_per_mini,
            .num_micros_per_mini = (uint32_t)mc->num_micros_per_mini};
        o.data = data;
        o.tokenizer = learner_tokenizer(l);
        o.shuffle = cfg->data.shuffle;
        o.data_seed = cfg->data.seed;
        o.temperature = (float)cfg->rollout.temperature;
        o.top_p = (float)cfg->rollout.top_p;
        o.top_k = (uint32_t)cfg->rollout.top_k;
        o.max_new_tokens = (uint32_t)cfg->rollout.max_new_tokens;
        o.seed = cfg->learner.seed;
        o.heartbeat_ivl_s = cfg->network.heartbeat_ivl_s;
        o.heartbeat_liveness = cfg->network.heartbeat_liveness;
        o.lease_timeout_s = cfg->network.lease_timeout_s;
        o.on_group = on_group;
        o.on_group_ctx = &a;
        size_t slen;
        const uint8_t *state = learner_dispatcher_state(l, &slen);
        a.d = dispatcher_new(zctx, &o, state, slen, err);
        rc = a.d ? 0 : -1;
    }
    if (rc == 0) {
        dispatcher_set_versions(a.d, learner_version(l), learner_old_version(l));
        dispatcher_set_lease_limit(a.d, (uint64_t)learner_lease_room(l));
        const log_field_t f[] = {{"step", (double)learner_steps(l)},
                                 {"policy/version", (double)learner_version(l)},
                                 {"max_steps", (double)learner_step_limit(l)}};
        log_emit(LOG_INFO, "learner.start", f, Q_ARRAY_LEN(f),
                 "%s at step %ld, version %llu; dispatcher %s, weights %s%s%s%s",
                 learner_resumed_from(l)[0] ? "resumed" : "started", learner_steps(l),
                 (unsigned long long)learner_version(l), dispatcher_endpoint(a.d),
                 weights_server_endpoint(a.ws), hub ? ", log hub " : "",
                 hub ? loghub_in_endpoint(hub) : "",
                 cfg->security.bind_any ? "" : " (plain TCP, loopback only)");
        /* The policy's accuracy before RL changes it: the baseline of the eval curve. */
        double acc0;
        const int eval_on = cfg->learner.eval_interval > 0 && cfg->data.test[0];
        if (eval_on && learner_steps(l) == 0)
            rc = learner_eval(l, &acc0, err);
    }
    if (rc == 0) {
        rc = pthread_create(&net_thread, NULL, net_main, &a) == 0
                 ? 0
                 : qerr_set(err, QERR_IO, "cannot start the network thread");
        thread_started = rc == 0;
    }
    if (rc == 0) {
        rc = train_loop(&a, err);
        if (rc != 0)
            log_error("learner.error", "%s", err->msg);
        /* No lease may be granted after the final checkpoint captures the lease table: stop
         * serving first (a grant made now is in the checkpoint and re-leased on resume). */
        a.net_stop = 1;
        pthread_join(net_thread, NULL);
        thread_started = 0;
        net_stats_log(&a);
        /* A checkpoint in every case where the state is sound: the end, a signal, a starved
         * batcher (the run can resume with other settings). */
        qerr_t e2 = {0};
        const int fresh = learner_checkpoint_step(l) == learner_steps(l) &&
                          (learner_steps(l) > 0 || learner_resumed_from(l)[0]);
        if (!a.net_failed && !fresh && checkpoint(&a, &e2) != 0) {
            log_error("learner.error", "final checkpoint: %s", e2.msg);
            if (rc == 0) {
                *err = e2;
                rc = -1;
            }
        }
        double acc;
        if (rc == 0 && !stop_flag && cfg->learner.eval_interval > 0 && cfg->data.test[0] &&
            learner_steps(l) % cfg->learner.eval_interval != 0)
            rc = learner_eval(l, &acc, err);
        const log_field_t f[] = {{"step", (double)learner_steps(l)},
                                 {"policy/version", (double)learner_version(l)}};
        log_emit(LOG_INFO, "learner.stop", f, Q_ARRAY_LEN(f), "%s",
                 stop_flag ? "stopped by signal"
                 : rc      ? "stopped on error"
                           : "step limit reached");
    }
    if (thread_started) {
        a.net_stop = 1;
        pthread_join(net_thread, NULL);
    }
    dispatcher_destroy(&a.d);
    weights_server_destroy(&a.ws);
    loghub_destroy(&hub);
    if (zctx)
        zmq_ctx_term(zctx);
    learner_destroy(&l);
    jsonl_reader_destroy(&data);
    pthread_cond_destroy(&a.cv);
    pthread_mutex_destroy(&a.mu);
    pthread_mutex_destroy(&a.net_mu);
    return rc;
}

static int run_sft(const quillan_config_t *cfg, const char *resume, qerr_t *err) {
    sft_options_t opt;
    sft_options_default(&opt);
    opt.max_steps = cfg->learner.max_steps;
    if (cfg->learner.eval_interval > 0)
        opt.eval_interval = cfg->learner.eval_interval;
    opt.eval_examples = cfg->learner.eval_samples;
    opt.resume = resume && strcmp(resume, "auto") != 0 ? resume : NULL;
    char dir[4352];
    if (resume && strcmp(resume, "auto") == 0 &&
        checkpoint_resolve(cfg->learner.checkpoint_dir, dir, sizeof dir, NULL) == 0)
        opt.resume = cfg->learner.checkpoint_dir;
    opt.stop = &stop_flag;
    sft_result_t res;
    const int rc = sft_run(cfg, &opt, &res, err);
    if (rc == 0 && res.stopped)
        log_info("learner.stop", "stopped by signal after step %ld", res.steps);
    return rc;
}

int main(int argc, char **argv) {
    static const char *const own[] = {"--resume", NULL};
    const char *resume = NULL; /* --resume: a checkpoint (step directory or root) or `auto` */
    const daemon_cli_t cli = {.process = "quillan-learner",
                              .usage = usage,
                              .options = own,
                              .option = daemon_option_keep,
                              .ctx = &resume,
                              .log_flags = DAEMON_LOG_TENSORBOARD,
                              .stop = &stop_flag};
    quillan_config_t *cfg;
    daemon_log_t *dlog;
    const int status = daemon_start(&cli, argc, argv, &cfg, &dlog);
    if (status != DAEMON_RUN)
        return status;
    qerr_t err = {0};
    const int rc = cfg->learner.mode == CONFIG_MODE_SFT ? run_sft(cfg, resume, &err)
                                                        : run_rl(cfg, resume, &err);
    if (rc != 0)
        fprintf(stderr, "quillan-learner: %s\n", err.msg);
    daemon_log_destroy(&dlog);
    free(cfg);
    return rc != 0 ? 1 : 0;
}
