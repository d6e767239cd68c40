/* End-to-end test of `quillan-rollout` with real processes on loopback.
 *
 * This process stands in for the learner: a dispatcher over a small addition dataset (one line
 * without an answer), a snapshot store with a weights server, both polled here. It starts
 * `quillan-reward` and two `quillan-rollout` workers from the build tree, publishes version 1 of
 * a freshly initialised tiny policy, and then:
 *   1. after GROUPS_V1 accepted groups publishes version 2 (a few weights changed: a delta);
 *   2. once both workers returned a version-2 group, SIGKILLs the reward service: no group may
 *      arrive without its rewards (a dead service is never a reward of 0), and only groups
 *      scored before the kill (at most CREDITS per worker) may arrive at all; once a worker has
 *      logged a failed reward call it starts the service again and groups resume;
 *   3. SIGTERMs both workers: each must exit 0.
 * Every accepted group is checked: G trajectories, routing records of the model's shape (the
 * dispatcher's codec validates them), a reward on every sample of a prompt with an answer and
 * none on the prompt without one, a version that never goes back within a worker. The workers'
 * logs must show a snapshot applied as a delta and the failed reward calls.
 * Exit status 0 means pass. */
#include "diffusion.h"
#include "dispatcher.h"
#include "e2e.h"
#include "log.h"
#include "model.h"
#include "qpolicy.h"
#include "snapshot_store.h"
#include "weights_server.h"

#include <errno.h>
#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>
#include <zmq.h>

#define G 4
#define N_PROMPTS 24
#define NO_ANSWER_PROMPT 5 /* the dataset line without an "answer" field */
#define MAX_NEW 12
#define GROUPS_V1 6
#define CREDITS 2 /* rollout.credits of each worker */
#define HB_IVL_S 0.2
#define LIVENESS 5
#define RUN_LIMIT_S 240.0

typedef struct {
    char id[64];
    uint64_t last_version;
    int groups, groups_v2;
} worker_seen_t;

typedef struct {
    worker_seen_t w[2];
    int groups, groups_v2;
    int during_outage; /* groups accepted while the reward service was down */
    bool outage;
} seen_t;

/* Takes every group (returns 0): a group this test finds wrong is a failure, not a refusal. */
static int on_group(void *ctx, const Quillan__TrajectoryGroup *g,
                    const dispatcher_group_info_t *info) {
    seen_t *s = ctx;
    worker_seen_t *w = NULL;
    for (int i = 0; i < 2 && w == NULL; i++)
        if (!strcmp(s->w[i].id, info->worker_id))
            w = &s->w[i];
    E2E_CHECK(w != NULL, "group from unknown worker '%s'", info->worker_id);
    if (w == NULL)
        return 0;
    E2E_CHECK(g->policy_version == 1 || g->policy_version == 2, "version %llu",
              (unsigned long long)g->policy_version);
    E2E_CHECK(g->policy_version >= w->last_version, "%s went back from version %llu to %llu", w->id,
              (unsigned long long)w->last_version, (unsigned long long)g->policy_version);
    w->last_version = g->policy_version;
    E2E_CHECK(g->n_trajectories == G, "%zu trajectories", g->n_trajectories);
    E2E_CHECK(g->gen_seconds > 0, "gen_seconds %g", g->gen_seconds);
    E2E_CHECK(g->sampling && g->sampling->max_new_tokens == MAX_NEW, "sampling not returned");
    for (size_t i = 0; i < g->n_trajectories; i++) {
        const Quillan__Trajectory *t = g->trajectories[i];
        bool has = t->maybe_reward_case == QUILLAN__TRAJECTORY__MAYBE_REWARD_REWARD;
        if (g->prompt_id == NO_ANSWER_PROMPT) {
            E2E_CHECK(!has, "prompt without answer got reward %g", t->reward);
        } else {
            E2E_CHECK(has, "prompt %llu sample %zu: no reward", (unsigned long long)g->prompt_id,
                      i);
            E2E_CHECK(!has || t->reward == 0.0 || t->reward == 1.0, "reward %g", t->reward);
            E2E_CHECK(!has || t->n_reward_parts == 1, "%zu reward parts", t->n_reward_parts);
        }
        E2E_CHECK(t->routing != NULL, "no routing record");
        E2E_CHECK(t->n_completion_tokens >= 1 && t->n_completion_tokens <= MAX_NEW, "%zu tokens",
                  t->n_completion_tokens);
        for (size_t k = 0; k < t->n_behaviour_logprobs; k++)
            E2E_CHECK(t->behaviour_logprobs[k] <= 1e-3f, "log-prob %g", t->behaviour_logprobs[k]);
    }
    s->groups++;
    w->groups++;
    if (g->policy_version == 2) {
        s->groups_v2++;
        w->groups_v2++;
    }
    if (s->outage)
        s->during_outage++;
    return 0;
}

static int publish(snapshot_store_t *store, const model_t *m, uint64_t version) {
    qerr_t err = {0};
    qpolicy_t *q = qpolicy_build(m, version, &err);
    if (q == NULL)
        return fprintf(stderr, "qpolicy_build: %s\n", err.msg), -1;
    size_t n = qpolicy_tensor_count(q), len;
    snapshot_tensor_t *t = calloc(n, sizeof *t);
    uint64_t(*shapes)[MODEL_MAX_NDIM] = calloc(n, sizeof *shapes);
    for (size_t i = 0; i < n; i++) {
        const qpolicy_tensor_t *qt = qpolicy_tensor_at(q, i);
        for (int d = 0; d < qt->ndim; d++)
            shapes[i][d] = (uint64_t)qt->shape[d];
        t[i] = (snapshot_tensor_t){
            qt->name, qtype_name(qt->qtype), shapes[i], (size_t)qt->ndim, qt->offset, qt->nbytes};
    }
    const void *bytes = qpolicy_bytes(q, &len);
    snapshot_publish_stats_t st;
    int rc = snapshot_store_publish(store, version, bytes, len, 1, t, n, &st, &err);
    if (rc != 0)
        fprintf(stderr, "publish: %s\n", err.msg);
    else
        printf("published v%llu: %zu bytes, delta %llu bytes\n", (unsigned long long)version, len,
               (unsigned long long)st.delta_bytes);
    free(t);
    free(shapes);
    qpolicy_destroy(&q);
    return rc;
}

int main(void) {
    log_init("e2e-rollout");
    log_set_level(LOG_WARN);
    char dir[] = "/tmp/quillan-rollout-e2e-XXXXXX";
    if (mkdtemp(dir) == NULL)
        return perror("mkdtemp"), 1;
    char data[512], wlog[2][512], rlog[512];
    snprintf(data, sizeof data, "%s/train.jsonl", dir);
    snprintf(rlog, sizeof rlog, "%s/reward.log", dir);
    FILE *f = fopen(data, "w");
    for (int i = 0; f && i < N_PROMPTS; i++) {
        int a = (i * 37) % 100, b = (i * 11) % 50;
        if (i == NO_ANSWER_PROMPT)
            fprintf(f, "{\"prompt\": \"%d+%d=\"}\n", a, b);
        else
            fprintf(f, "{\"prompt\": \"%d+%d=\", \"answer\": \"%d\"}\n", a, b, a + b);
    }
    if (f == NULL || fclose(f) != 0)
        return perror(data), 1;

    qerr_t err = {0};
    model_config_t mc;
    model_t *m = NULL;
    if (model_config_preset("tiny", &mc, &err) != 0 || (m = model_new(&mc, &err)) == NULL)
        return fprintf(stderr, "model: %s\n", err.msg), 1;
    snapshot_store_options_t so;
    snapshot_store_options_init(&so);
    snapshot_store_t *store = snapshot_store_new(&so, &err);
    if (store == NULL || publish(store, m, 1) != 0)
        return 1;

    jsonl_reader_t *r = jsonl_reader_new(data, 0, &err);
    tokenizer_t *tok = tokenizer_new_byte();
    if (r == NULL || tok == NULL)
        return fprintf(stderr, "data: %s\n", err.msg), 1;
    seen_t seen = {0};
    snprintf(seen.w[0].id, sizeof seen.w[0].id, "w1");
    snprintf(seen.w[1].id, sizeof seen.w[1].id, "w2");
    dispatcher_options_t o;
    dispatcher_options_init(&o);
    o.endpoint = "tcp://127.0.0.1:*";
    o.limits = (dispatch_codec_limits_t){.vocab_size = (uint32_t)mc.vocab_size,
                                         .max_group_size = G,
                                         .max_prompt_tokens = 64,
                                         .max_new_tokens = MAX_NEW,
                                         .num_layers = (uint32_t)mc.num_layers,
                                         .top_k_minis = (uint32_t)mc.top_k_minis,
                                         .top_k_experts = (uint32_t)mc.top_k_experts,
                                         .top_k_micros = (uint32_t)mc.top_k_micros,
                                         .plan_words = (uint32_t)diffusion_words(mc.diffusion_bits),
                                         .num_mini_moes = (uint32_t)mc.num_mini_moes,
                                         .num_experts_per_mini = (uint32_t)mc.num_experts_per_mini,
                                         .num_micros_per_mini = (uint32_t)mc.num_micros_per_mini};
    o.data = r;
    o.tokenizer = tok;
    o.max_new_tokens = MAX_NEW;
    o.heartbeat_ivl_s = HB_IVL_S;
    o.heartbeat_liveness = LIVENESS;
    o.lease_timeout_s = 60;
    o.on_group = on_group;
    o.on_group_ctx = &seen;
    o.net.linger_ms = 0;
    void *zctx = zmq_ctx_new();
    dispatcher_t *d = dispatcher_new(zctx, &o, NULL, 0, &err);
    weights_server_options_t wo;
    weights_server_options_init(&wo);
    wo.endpoint = "tcp://127.0.0.1:*";
    wo.net.linger_ms = 0;
    weights_server_t *ws = d ? weights_server_new(zctx, store, &wo, &err) : NULL;
    if (ws == NULL)
        return fprintf(stderr, "learner: %s\n", err.msg), 1;
    dispatcher_set_versions(d, 1, 1);
    dispatcher_set_lease_limit(d, 8);

    char reward_ep[64], set_disp[300], set_w[300], set_rw[300];
    snprintf(reward_ep, sizeof reward_ep, "tcp://127.0.0.1:%d", e2e_free_port());
    snprintf(set_disp, sizeof set_disp, "network.dispatcher=%s", dispatcher_endpoint(d));
    snprintf(set_w, sizeof set_w, "network.weights=%s", weights_server_endpoint(ws));
    snprintf(set_rw, sizeof set_rw, "reward.services.0.address=%s", reward_ep);
    char reward_bin[512], rollout_bin[512], set_credits[64];
    snprintf(set_credits, sizeof set_credits, "rollout.credits=%d", CREDITS);
    snprintf(reward_bin, sizeof reward_bin, "%s/reward/quillan-reward", QUILLAN_BINARY_DIR);
    snprintf(rollout_bin, sizeof rollout_bin, "%s/rollout/quillan-rollout", QUILLAN_BINARY_DIR);
    char *reward_argv[] = {reward_bin, "--bind", reward_ep, "--set", "logging.hub=false", NULL};
    pid_t reward = e2e_spawn(reward_argv, NULL, rlog);
    pid_t workers[2];
    for (int i = 0; i < 2; i++) {
        snprintf(wlog[i], sizeof wlog[i], "%s/%s.log", dir, seen.w[i].id);
        char *argv[] = {rollout_bin,
                        "--id",
                        seen.w[i].id,
                        "--threads",
                        "1",
                        "--set",
                        set_disp,
                        "--set",
                        set_w,
                        "--set",
                        set_rw,
                        "--set",
                        "logging.hub=false",
                        "--set",
                        set_credits,
                        "--set",
                        "network.heartbeat_ivl_s=0.2",
                        "--set",
                        "reward.timeout_s=0.5",
                        "--set",
                        "reward.retries=1",
                        "--set",
                        "reward.backoff_min_s=0.2",
                        "--set",
                        "reward.backoff_max_s=0.5",
                        NULL};
        workers[i] = e2e_spawn(argv, NULL, wlog[i]);
    }

    enum { PHASE_V1, PHASE_V2, PHASE_OUTAGE, PHASE_AFTER, PHASE_DONE } phase = PHASE_V1;
    double t0 = e2e_now_s(), phase_t = 0;
    int groups_at_restart = 0;
    while (phase != PHASE_DONE && e2e_now_s() - t0 < RUN_LIMIT_S) {
        zmq_pollitem_t items[2] = {{dispatcher_handle(d), 0, ZMQ_POLLIN, 0},
                                   {weights_server_handle(ws), 0, ZMQ_POLLIN, 0}};
        zmq_poll(items, 2, 20);
        if (dispatcher_poll(d, 0, &err) < 0 || weights_server_poll(ws, 0, &err) < 0)
            return fprintf(stderr, "learner: %s\n", err.msg), 1;
        if (phase == PHASE_V1 && seen.groups >= GROUPS_V1) {
            /* A small change: the next snapshot differs in a few blocks only. */
            real *p = model_params(m);
            for (size_t i = 0; i < 64; i++)
                p[i * 97] += (real)0.05;
            model_params_changed(m);
            if (publish(store, m, 2) != 0)
                return 1;
            dispatcher_set_versions(d, 2, 2);
            phase = PHASE_V2;
        } else if (phase == PHASE_V2 && seen.w[0].groups_v2 > 0 && seen.w[1].groups_v2 > 0) {
            e2e_kill(reward);
            seen.outage = true;
            phase_t = e2e_now_s();
            phase = PHASE_OUTAGE;
            printf("reward service killed after %d groups\n", seen.groups);
        } else if (phase == PHASE_OUTAGE && e2e_now_s() - phase_t > 0.5) {
            phase_t = e2e_now_s(); /* look at the logs twice a second */
            if (e2e_file_lines(NULL, wlog[0], "rollout.reward_failed") +
                    e2e_file_lines(NULL, wlog[1], "rollout.reward_failed") ==
                0)
                continue;
            seen.outage = false;
            reward = e2e_spawn(reward_argv, NULL, rlog);
            groups_at_restart = seen.groups;
            phase = PHASE_AFTER;
            printf("reward service restarted\n");
        } else if (phase == PHASE_AFTER && seen.groups >= groups_at_restart + 4) {
            phase = PHASE_DONE;
        }
    }
    E2E_CHECK(phase == PHASE_DONE, "stuck in phase %d after %.0f s (%d groups)", (int)phase,
              RUN_LIMIT_S, seen.groups);
    E2E_CHECK(seen.during_outage <= 2 * CREDITS,
              "%d groups accepted while the reward service was down (at most %d scored before)",
              seen.during_outage, 2 * CREDITS);
    for (int i = 0; i < 2; i++) {
        kill(workers[i], SIGTERM);
        /* Keep serving while the workers stop, so nothing blocks on us. */
        double ts = e2e_now_s();
        while (e2e_now_s() - ts < 0.5) {
            dispatcher_poll(d, 20, &err);
            weights_server_poll(ws, 0, &err);
        }
        int rc = e2e_wait_exit(workers[i], 30.0);
        E2E_CHECK(rc == 0, "worker %s exited with %d", seen.w[i].id, rc);
        printf("%s: %d groups, %d at version 2\n", seen.w[i].id, seen.w[i].groups,
               seen.w[i].groups_v2);
    }
    E2E_CHECK(e2e_stop(reward, 10.0) == 0, "reward service did not stop cleanly");

    size_t deltas = 0, reward_failed = 0;
    for (int i = 0; i < 2; i++) {
        deltas += e2e_file_lines(NULL, wlog[i], "(delta)");
        reward_failed += e2e_file_lines(NULL, wlog[i], "rollout.reward_failed");
        E2E_CHECK(e2e_file_lines(NULL, wlog[i], "\"rollout.group\"") > 0,
                  "%s logged no rollout.group", wlog[i]);
    }
    E2E_CHECK(deltas >= 1, "no worker applied version 2 as a delta");
    E2E_CHECK(reward_failed >= 1, "no failed reward call was logged during the outage");
    dispatcher_stats_t ds;
    dispatcher_stats(d, &ds);
    E2E_CHECK(ds.table.rejected == 0, "%llu groups rejected by the dispatcher",
              (unsigned long long)ds.table.rejected);
    printf("groups %d (version 2: %d), deltas %zu, failed reward calls logged %zu, rejected %llu\n",
           seen.groups, seen.groups_v2, deltas, reward_failed,
           (unsigned long long)ds.table.rejected);

    weights_server_destroy(&ws);
    dispatcher_destroy(&d);
    zmq_ctx_term(zctx);
    snapshot_store_destroy(&store);
    jsonl_reader_destroy(&r);
    tokenizer_destroy(&tok);
    model_destroy(&m);
    if (e2e_failures)
        fprintf(stderr, "%d check(s) failed; logs in %s\n", e2e_failures, dir);
    else
        printf("PASS (logs in %s)\n", dir);
    return e2e_failures ? 1 : 0;
}
