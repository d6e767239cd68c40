/* End-to-end test of CurveZMQ authentication (ARCHITECTURE.md §4, issue 8 acceptance 1) with
 * real processes on loopback and security.curve on everywhere.
 *
 * `security_e2e run QUILLAN_REWARD` (the driver) makes key pairs server, good, bad and late in a
 * fresh directory, an allow-list holding only good's public key, and starts, as separate processes:
 *   server        this executable: the learner's dispatcher, weights server (one published
 *                 snapshot) and log hub (publishing its own "sec.tick" records), all CURVE
 *                 servers in one context; it rewrites `server.stats` with its counters and the
 *                 ZAP handler's (net_zap_stats);
 *   quillan-reward  the real reward service with the same security section;
 *   client NAME   this executable with key NAME: a dispatch client that answers every lease
 *                 with a valid group, a weights DEALER asking for the snapshot's first chunk, a
 *                 log SUB on the hub's output and a reward client; it rewrites NAME.result with
 *                 what each one got.
 * The driver runs `client bad` and `client good` together and asserts: good gets accepted
 * groups, a weight chunk, log records and rewards; bad gets nothing at all (not one lease, chunk,
 * record or reward) while its refusals are counted by the server's ZAP handler and logged with
 * the peer address by both servers; the dispatcher never accepted a group or a WorkRequest from
 * bad. Then it appends late's key to the allow-list, sends SIGHUP to both servers, and
 * `client late` must get everything too. Exit status 0 means pass. */
#include "dispatch_client.h"
#include "dispatcher.h"
#include "e2e.h"
#include "loghub.h"
#include "net_security.h"
#include "reward_client.h"
#include "snapshot_store.h"
#include "weights_server.h"

#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>
#include <zmq.h>

#define G 2
#define N_PROMPTS 16
#define SNAPSHOT_BYTES 20000
#define RUN_LIMIT_S 120.0 /* a hung process fails the test instead of hanging it */
#define BAD_REFUSALS 6    /* refusals the server must count before bad is judged */
#define STOP_LIMIT_S 10.0 /* from SIGTERM to exit; a process still running then is killed */

static const dispatch_codec_limits_t limits = {.vocab_size = TOKENIZER_BYTE_VOCAB,
                                               .max_group_size = G,
                                               .max_prompt_tokens = 64,
                                               .max_new_tokens = 8};

static volatile sig_atomic_t stop_flag;
static void on_term(int sig) {
    (void)sig;
    stop_flag = 1;
}

/* Parses "key value" lines of a stats file; returns the value of key or -1. */
static long long stat_of(const char *text, const char *key) {
    if (text == NULL)
        return -1;
    size_t kl = strlen(key);
    for (const char *p = text; *p;) {
        if (strncmp(p, key, kl) == 0 && p[kl] == ' ')
            return atoll(p + kl + 1);
        const char *nl = strchr(p, '\n');
        if (nl == NULL)
            break;
        p = nl + 1;
    }
    return -1;
}

static long long stat_file(const char *dir, const char *name, const char *key) {
    char *t = e2e_file_read(dir, name, NULL);
    long long v = stat_of(t, key);
    free(t);
    return v;
}

static void security_section(quillan_config_t *cfg, const char *dir, const char *client) {
    cfg->security.curve = true;
    e2e_path_of(cfg->security.keys.server, sizeof cfg->security.keys.server, dir, "server");
    e2e_path_of(cfg->security.keys.client, sizeof cfg->security.keys.client, dir, client);
    e2e_path_of(cfg->security.allow_list, sizeof cfg->security.allow_list, dir, "allow_list");
}

/* ---- server: dispatcher + weights server + log hub ---- */

static uint64_t groups_accepted;
static char accepted_from[1024];

static int on_group(void *ctx, const Quillan__TrajectoryGroup *g,
                    const dispatcher_group_info_t *info) {
    (void)ctx;
    (void)g;
    groups_accepted++;
    if (strstr(accepted_from, info->worker_id) == NULL &&
        strlen(accepted_from) + strlen(info->worker_id) + 2 < sizeof accepted_from) {
        strcat(accepted_from, info->worker_id);
        strcat(accepted_from, ",");
    }
    return 0;
}

static int server_main(const char *dir) {
    log_init("sec-server");
    log_set_level(LOG_INFO);
    quillan_config_t *cfg = malloc(sizeof *cfg);
    config_defaults(cfg);
    security_section(cfg, dir, "server");
    qerr_t e;
    net_security_t sec;
    if (net_security_from_config(cfg, NET_ROLE_SERVER, &sec, &e) != 0) {
        fprintf(stderr, "server: %s\n", e.msg);
        return 1;
    }
    char data[512];
    e2e_path_of(data, sizeof data, dir, "data.jsonl");
    jsonl_reader_t *r = jsonl_reader_new(data, 0, &e);
    tokenizer_t *tok = tokenizer_new_byte();
    if (r == NULL || tok == NULL) {
        fprintf(stderr, "server: %s\n", e.msg);
        return 1;
    }
    void *zctx = zmq_ctx_new();
    dispatcher_options_t d_o;
    dispatcher_options_init(&d_o);
    d_o.endpoint = "tcp://127.0.0.1:*";
    d_o.security = sec;
    d_o.limits = limits;
    d_o.data = r;
    d_o.tokenizer = tok;
    d_o.max_new_tokens = 8;
    d_o.heartbeat_ivl_s = 0.2;
    d_o.on_group = on_group;
    d_o.net.linger_ms = 0;
    dispatcher_t *d = dispatcher_new(zctx, &d_o, NULL, 0, &e);
    snapshot_store_options_t so;
    snapshot_store_options_init(&so);
    snapshot_store_t *store = d ? snapshot_store_new(&so, &e) : NULL;
    uint8_t *blob = calloc(1, SNAPSHOT_BYTES);
    for (size_t i = 0; i < SNAPSHOT_BYTES; i++)
        blob[i] = (uint8_t)(i * 7);
    uint64_t shape[1] = {SNAPSHOT_BYTES};
    snapshot_tensor_t t = {"blob", "u8", shape, 1, 0, SNAPSHOT_BYTES};
    if (store && snapshot_store_publish(store, 1, blob, SNAPSHOT_BYTES, 0, &t, 1, NULL, &e) != 0)
        snapshot_store_destroy(&store);
    free(blob);
    weights_server_options_t w_o;
    weights_server_options_init(&w_o);
    w_o.endpoint = "tcp://127.0.0.1:*";
    w_o.security = sec;
    w_o.net.linger_ms = 0;
    weights_server_t *w = store ? weights_server_new(zctx, store, &w_o, &e) : NULL;
    loghub_options_t h_o;
    loghub_options_init(&h_o);
    h_o.in_endpoint = "tcp://127.0.0.1:*";
    h_o.out_endpoint = "tcp://127.0.0.1:*";
    h_o.security = sec;
    h_o.net.linger_ms = 0;
    loghub_t *h = w ? loghub_new(zctx, &h_o, &e) : NULL;
    if (h == NULL) {
        fprintf(stderr, "server: %s\n", e.msg);
        return 1;
    }
    dispatcher_set_lease_limit(d, 4);
    char text[8192];
    snprintf(text, sizeof text, "%s\n%s\n%s\n%s\n", dispatcher_endpoint(d),
             weights_server_endpoint(w), loghub_in_endpoint(h), loghub_out_endpoint(h));
    e2e_file_put(dir, "endpoints", text);
    double start = e2e_now_s(), last_tick = 0;
    while (!stop_flag && e2e_now_s() - start < RUN_LIMIT_S) {
        if (dispatcher_poll(d, 5, &e) < 0 || weights_server_poll(w, 5, &e) < 0) {
            fprintf(stderr, "server: poll: %s\n", e.msg);
            return 1;
        }
        if (e2e_now_s() - last_tick < 0.05)
            continue;
        last_tick = e2e_now_s();
        log_warn("sec.tick", "tick");
        dispatcher_stats_t ds;
        weights_server_stats_t ws;
        net_zap_stats_t zs = {0};
        dispatcher_stats(d, &ds);
        weights_server_stats(w, &ws);
        net_zap_stats(zctx, &zs);
        snprintf(text, sizeof text,
                 "accepted %llu\nwork_requests %llu\nchunks_sent %llu\nadmitted %llu\n"
                 "refused %llu\nreloads %llu\nkeys %llu\nunauthenticated %llu\nfrom %s\n",
                 (unsigned long long)groups_accepted, (unsigned long long)ds.work_requests,
                 (unsigned long long)ws.chunks_sent, (unsigned long long)zs.admitted,
                 (unsigned long long)zs.refused, (unsigned long long)zs.reloads,
                 (unsigned long long)zs.keys,
                 (unsigned long long)(ds.net.dropped[NET_DROP_UNAUTHENTICATED] +
                                      ws.net.dropped[NET_DROP_UNAUTHENTICATED]),
                 accepted_from);
        e2e_file_put(dir, "server.stats", text);
    }
    loghub_destroy(&h);
    weights_server_destroy(&w);
    dispatcher_destroy(&d);
    snapshot_store_destroy(&store);
    zmq_ctx_term(zctx);
    jsonl_reader_destroy(&r);
    tokenizer_destroy(&tok);
    free(cfg);
    return 0;
}

/* ---- client ---- */

typedef struct {
    dispatch_client_t *c;
    uint64_t leases;
    Quillan__RolloutRequest *pending[8];
    size_t n_pending;
} worker_t;

static void on_work(void *ctx, const Quillan__RolloutRequest *rq, uint32_t timeout_ms) {
    worker_t *w = ctx;
    (void)timeout_ms;
    w->leases++;
    if (w->n_pending == 8 || rq->n_prompt_tokens > 64) {
        dispatch_client_lease_drop(w->c, rq->lease_id);
        return;
    }
    /* Answered after the poll returns: the callback must not send. */
    Quillan__RolloutRequest *k = calloc(1, sizeof *k);
    *k = *rq;
    k->prompt_tokens = malloc(rq->n_prompt_tokens * sizeof *k->prompt_tokens + 1);
    memcpy(k->prompt_tokens, rq->prompt_tokens, rq->n_prompt_tokens * sizeof *k->prompt_tokens);
    Quillan__SamplingParams *sp = malloc(sizeof *sp);
    *sp = *rq->sampling;
    sp->base.unknown_fields = NULL;
    sp->base.n_unknown_fields = 0;
    sp->n_stop_tokens = 0;
    sp->stop_tokens = NULL;
    k->sampling = sp;
    w->pending[w->n_pending++] = k;
}

static void group_send(worker_t *w, Quillan__RolloutRequest *k) {
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
        t[i].reward = (double)i;
        t[i].finish_reason = QUILLAN__FINISH_REASON__FINISH_REASON_STOP;
        tp[i] = &t[i];
    }
    Quillan__TrajectoryGroup g = QUILLAN__TRAJECTORY_GROUP__INIT;
    g.lease_id = k->lease_id;
    g.prompt_id = k->prompt_id;
    g.epoch = k->epoch;
    g.n_prompt_tokens = k->n_prompt_tokens;
    g.prompt_tokens = k->prompt_tokens;
    g.n_trajectories = G;
    g.trajectories = tp;
    g.sampling = k->sampling;
    g.gen_seconds = 0.01;
    qerr_t e;
    if (dispatch_client_send_group(w->c, &g, &e) != 0)
        fprintf(stderr, "client: group: %s\n", e.msg);
}

static net_socket_t *client_socket(void *zctx, int type, wire_protocol_t protocol, const char *name,
                                   const char *endpoint, const net_security_t *sec) {
    net_options_t o;
    net_options_init(&o);
    o.linger_ms = 0;
    net_socket_spec_t spec = {
        .type = type, .protocol = protocol, .name = name, .sender_id = name, .incarnation_id = 1};
    qerr_t e;
    net_socket_t *s = net_socket_new(zctx, &spec, &o, sec, &e);
    if (s && type == ZMQ_SUB)
        zmq_setsockopt(net_socket_handle(s), ZMQ_SUBSCRIBE, "", 0);
    if (s == NULL || net_socket_connect(s, endpoint, &e) != 0) {
        fprintf(stderr, "client %s: %s\n", name, e.msg);
        exit(1);
    }
    return s;
}

/* Asks for the latest snapshot's description, then its first chunk, again every 200 ms until a
 * chunk comes back. */
static void weights_step(net_socket_t *s, double *next_ask, uint64_t *version, uint64_t *chunks) {
    net_msg_t *m = NULL;
    qerr_t e;
    while (net_recv(s, 0, &m, &e) == 1) {
        const Quillan__Envelope *env = net_msg_envelope(m);
        size_t len = 0;
        if (env->body_case == QUILLAN__ENVELOPE__BODY_SNAPSHOT_INFO)
            *version = env->snapshot_info->version;
        else if (env->body_case == QUILLAN__ENVELOPE__BODY_CHUNK_REPLY &&
                 net_msg_payload(m, &len) != NULL && len > 0)
            (*chunks)++;
        net_msg_destroy(&m);
    }
    if (e2e_now_s() < *next_ask)
        return;
    *next_ask = e2e_now_s() + 0.2;
    Quillan__Envelope env = QUILLAN__ENVELOPE__INIT;
    Quillan__InfoRequest info = QUILLAN__INFO_REQUEST__INIT;
    Quillan__ChunkRequest chunk = QUILLAN__CHUNK_REQUEST__INIT;
    if (*version == 0) {
        env.body_case = QUILLAN__ENVELOPE__BODY_INFO_REQUEST;
        env.info_request = &info;
    } else {
        chunk.version = *version;
        env.body_case = QUILLAN__ENVELOPE__BODY_CHUNK_REQUEST;
        env.chunk_request = &chunk;
    }
    net_send(s, NULL, &env, NULL, 0, NULL, &e); /* a full queue is retried next time */
}

static int client_main(const char *dir, const char *name) {
    log_init(name);
    log_set_level(LOG_ERROR);
    char *eps = e2e_file_read(dir, "endpoints", NULL);
    char ep[4][256];
    if (eps == NULL || sscanf(eps, "%255s %255s %255s %255s", ep[0], ep[1], ep[2], ep[3]) != 4) {
        fprintf(stderr, "client: no endpoints\n");
        return 1;
    }
    free(eps);
    quillan_config_t *cfg = malloc(sizeof *cfg);
    config_defaults(cfg);
    security_section(cfg, dir, name);
    qerr_t e;
    char *reward_ep = e2e_file_read(dir, "reward_endpoint", NULL);
    char set[512];
    snprintf(set, sizeof set, "reward.services=[{address: '%s', weight: 1, name: sec}]",
             reward_ep ? reward_ep : "");
    free(reward_ep);
    if (config_set(cfg, set, &e) != 0) {
        fprintf(stderr, "client: reward setup: %s\n", e.msg);
        return 1;
    }
    cfg->reward.timeout_s = 0.3;
    cfg->reward.retries = 0;
    net_security_t sec;
    if (net_security_from_config(cfg, NET_ROLE_CLIENT, &sec, &e) != 0) {
        fprintf(stderr, "client: %s\n", e.msg);
        return 1;
    }
    void *zctx = zmq_ctx_new();
    worker_t w = {0};
    dispatch_client_options_t o;
    dispatch_client_options_init(&o);
    o.endpoint = ep[0];
    o.worker_id = name;
    o.host = "localhost";
    o.security = sec;
    o.limits = limits;
    o.capacity = 2;
    o.heartbeat_ivl_s = 0.2;
    o.net.linger_ms = 0;
    o.cb = (dispatch_client_callbacks_t){.on_work = on_work, .ctx = &w};
    w.c = dispatch_client_new(zctx, &o, &e);
    reward_client_t *rc = w.c ? reward_client_new(cfg, name, &e) : NULL;
    if (rc == NULL) {
        fprintf(stderr, "client: %s\n", e.msg);
        return 1;
    }
    reward_client_set_stop(rc, &stop_flag);
    net_socket_t *ws =
        client_socket(zctx, ZMQ_DEALER, WIRE_PROTOCOL_WEIGHTS, "weights", ep[1], &sec);
    net_socket_t *sub = client_socket(zctx, ZMQ_SUB, WIRE_PROTOCOL_LOG, "monitor", ep[3], &sec);
    uint64_t version = 0, chunks = 0, records = 0, rewards = 0;
    double next_ask = 0;
    reward_sample_t sample = {
        .prompt = "1+1", .completion = "2", .finish_reason = REWARD_FINISH_STOP};
    reward_kv_t md = {"answer", "\"2\""};
    reward_batch_t batch = {"sec", &sample, 1, &md, 1};
    double start = e2e_now_s();
    while (!stop_flag && e2e_now_s() - start < RUN_LIMIT_S) {
        if (dispatch_client_poll(w.c, 10, &e) < 0) {
            fprintf(stderr, "client: poll: %s\n", e.msg);
            return 1;
        }
        for (size_t i = 0; i < w.n_pending; i++) {
            group_send(&w, w.pending[i]);
            free(w.pending[i]->prompt_tokens);
            free(w.pending[i]->sampling);
            free(w.pending[i]);
        }
        w.n_pending = 0;
        weights_step(ws, &next_ask, &version, &chunks);
        net_msg_t *m = NULL;
        while (net_recv(sub, 0, &m, &e) == 1) {
            records++;
            net_msg_destroy(&m);
        }
        reward_result_t res;
        reward_result_init(&res);
        if (reward_client_score(rc, &batch, &res, &e) == 0 && res.n_samples == 1)
            rewards++;
        reward_result_free(&res);
        dispatch_client_stats_t ds;
        dispatch_client_stats(w.c, &ds);
        char text[512];
        snprintf(text, sizeof text,
                 "leases %llu\naccepted %llu\nchunks %llu\nrecords %llu\nrewards %llu\n",
                 (unsigned long long)w.leases,
                 (unsigned long long)ds.acks[QUILLAN__ACK_STATUS__ACK_STATUS_ACCEPTED],
                 (unsigned long long)chunks, (unsigned long long)records,
                 (unsigned long long)rewards);
        char file[64];
        snprintf(file, sizeof file, "%s.result", name);
        e2e_file_put(dir, file, text);
    }
    net_socket_destroy(&ws);
    net_socket_destroy(&sub);
    reward_client_destroy(&rc);
    dispatch_client_destroy(&w.c);
    zmq_ctx_term(zctx);
    free(cfg);
    return 0;
}

/* ---- driver ---- */

static pid_t spawn_self(const char *self, const char *dir, const char *role, const char *name) {
    char log[512];
    snprintf(log, sizeof log, "%s/%s.log", dir, name ? name : role);
    char *argv[] = {(char *)self, (char *)role, (char *)dir, (char *)name, NULL};
    return e2e_spawn(argv, NULL, log);
}

/* Waits until every key of file is at least min; 0, or -1 after RUN_LIMIT_S. */
static int wait_stats(const char *dir, const char *file, const char *const *keys, size_t n,
                      long long min) {
    double start = e2e_now_s();
    while (e2e_now_s() - start < RUN_LIMIT_S) {
        char *t = e2e_file_read(dir, file, NULL);
        size_t ok = 0;
        for (size_t i = 0; i < n; i++)
            ok += stat_of(t, keys[i]) >= min;
        free(t);
        if (ok == n)
            return 0;
        e2e_sleep_s(0.05);
    }
    return -1;
}

static void keys_make(const char *dir, const char *name) {
    char prefix[512];
    e2e_path_of(prefix, sizeof prefix, dir, name);
    net_keypair_t kp;
    qerr_t e;
    if (net_keypair_generate(&kp, &e) != 0 || net_keypair_write(prefix, &kp, &e) != 0) {
        fprintf(stderr, "keys: %s\n", e.msg);
        exit(1);
    }
}

static int log_has(const char *dir, const char *file, const char *a, const char *b) {
    char *t = e2e_file_read(dir, file, NULL);
    int found = 0;
    for (char *line = t ? strtok(t, "\n") : NULL; line && !found; line = strtok(NULL, "\n"))
        found = strstr(line, a) && strstr(line, b);
    free(t);
    return found;
}

static int run_main(const char *self, const char *reward_bin) {
    char dir[] = "/tmp/quillan-sec-XXXXXX";
    if (mkdtemp(dir) == NULL)
        return 1;
    keys_make(dir, "server");
    keys_make(dir, "good");
    keys_make(dir, "bad");
    keys_make(dir, "late");
    char *good = e2e_file_read(dir, "good.pub", NULL), *late = e2e_file_read(dir, "late.pub", NULL);
    char *bad = e2e_file_read(dir, "bad.pub", NULL);
    char bad_key[NET_KEY_Z85_LEN + 1] = "";
    sscanf(strchr(bad, '\n') + 1, "%40s", bad_key);
    char text[1024];
    snprintf(text, sizeof text, "# admitted workers\n%s", good);
    e2e_file_put(dir, "allow_list", text);
    for (int i = 0; i < N_PROMPTS; i++) {
        snprintf(text, sizeof text, "{\"prompt\": \"%d+%d=\", \"answer\": \"%d\"}\n", i, i, 2 * i);
        e2e_file_append(dir, "data.jsonl", text);
    }
    int port = e2e_free_port();
    snprintf(text, sizeof text, "tcp://127.0.0.1:%d", port);
    e2e_file_put(dir, "reward_endpoint", text);
    snprintf(text, sizeof text,
             "security:\n  curve: true\n  keys:\n    server: %s/server\n    client: %s/good\n"
             "  allow_list: %s/allow_list\nlogging:\n  hub: false\n",
             dir, dir, dir);
    e2e_file_put(dir, "reward.yaml", text);

    pid_t server = spawn_self(self, dir, "server", NULL);
    char reward_cfg[512], reward_bind[64], reward_log[512];
    e2e_path_of(reward_cfg, sizeof reward_cfg, dir, "reward.yaml");
    e2e_path_of(reward_log, sizeof reward_log, dir, "reward.log");
    snprintf(reward_bind, sizeof reward_bind, "tcp://127.0.0.1:%d", port);
    char *rargv[] = {(char *)reward_bin, "--config", reward_cfg, "--bind", reward_bind, NULL};
    pid_t reward = e2e_spawn(rargv, NULL, reward_log);
    double start = e2e_now_s();
    char *eps = NULL;
    while ((eps = e2e_file_read(dir, "endpoints", NULL)) == NULL &&
           e2e_now_s() - start < RUN_LIMIT_S)
        e2e_sleep_s(0.05);
    free(eps);
    E2E_CHECK(eps != NULL, "the server never wrote its endpoints");

    pid_t c_bad = spawn_self(self, dir, "client", "bad");
    pid_t c_good = spawn_self(self, dir, "client", "good");
    static const char *const all[] = {"accepted", "chunks", "records", "rewards"};
    E2E_CHECK(wait_stats(dir, "good.result", all, 4, 1) == 0,
              "the listed client did not get groups accepted, a chunk, records and rewards");
    static const char *const refused[] = {"refused"};
    E2E_CHECK(wait_stats(dir, "server.stats", refused, 1, BAD_REFUSALS) == 0,
              "the server did not count the unlisted client's refusals");
    while (!log_has(dir, "reward.log", "net.zap.refused", bad_key) &&
           e2e_now_s() - start < RUN_LIMIT_S)
        e2e_sleep_s(0.05);
    E2E_CHECK(e2e_stop(c_bad, STOP_LIMIT_S) == 0, "client bad did not exit cleanly");
    E2E_CHECK(e2e_stop(c_good, STOP_LIMIT_S) == 0, "client good did not exit cleanly");
    char *br = e2e_file_read(dir, "bad.result", NULL);
    E2E_CHECK(br != NULL, "client bad wrote no result");
    for (size_t i = 0; br && i < 4; i++)
        E2E_CHECK(stat_of(br, all[i]) == 0, "the unlisted client got %s: %lld", all[i],
                  stat_of(br, all[i]));
    E2E_CHECK(stat_of(br, "leases") == 0, "the unlisted client got a lease");
    free(br);
    char *ss = e2e_file_read(dir, "server.stats", NULL);
    E2E_CHECK(ss && strstr(ss, "good,") != NULL, "no group accepted from good: %s", ss ? ss : "");
    E2E_CHECK(ss && strstr(ss, "bad") == NULL, "a group of bad was accepted: %s", ss ? ss : "");
    free(ss);
    E2E_CHECK(log_has(dir, "server.log", "net.zap.refused", bad_key),
              "the server did not log the refusal of bad's key");
    E2E_CHECK(log_has(dir, "server.log", "net.zap.refused", "127.0.0.1"),
              "the server's refusal log names no peer address");
    E2E_CHECK(log_has(dir, "reward.log", "net.zap.refused", bad_key),
              "the reward service did not log the refusal of bad's key");

    /* SIGHUP reload: late is admitted once its key is appended. */
    e2e_file_append(dir, "allow_list", late);
    kill(server, SIGHUP);
    kill(reward, SIGHUP);
    static const char *const reloads[] = {"reloads"};
    E2E_CHECK(wait_stats(dir, "server.stats", reloads, 1, 1) == 0, "the server did not reload");
    E2E_CHECK(stat_file(dir, "server.stats", "keys") == 2,
              "the reloaded list does not hold 2 keys");
    while (!log_has(dir, "reward.log", "net.zap.reload", "2 key") &&
           e2e_now_s() - start < RUN_LIMIT_S)
        e2e_sleep_s(0.05);
    E2E_CHECK(log_has(dir, "reward.log", "net.zap.reload", "2 key"), "the reward service did not "
                                                                     "reload");
    pid_t c_late = spawn_self(self, dir, "client", "late");
    E2E_CHECK(wait_stats(dir, "late.result", all, 4, 1) == 0,
              "the client admitted by the reload did not get everything");
    E2E_CHECK(e2e_stop(c_late, STOP_LIMIT_S) == 0, "client late did not exit cleanly");
    E2E_CHECK(stat_file(dir, "server.stats", "unauthenticated") == 0,
              "messages without a User-Id reached a server socket");
    E2E_CHECK(e2e_stop(reward, STOP_LIMIT_S) == 0, "quillan-reward did not exit cleanly");
    E2E_CHECK(e2e_stop(server, STOP_LIMIT_S) == 0, "the server did not exit cleanly");
    free(good);
    free(late);
    free(bad);
    if (e2e_failures == 0) {
        snprintf(text, sizeof text, "rm -rf '%s'", dir);
        if (system(text) != 0)
            fprintf(stderr, "could not remove %s\n", dir);
        printf("security e2e: pass\n");
    } else {
        fprintf(stderr, "security e2e: %d failure(s); logs kept in %s\n", e2e_failures, dir);
    }
    return e2e_failures ? 1 : 0;
}

int main(int argc, char **argv) {
    struct sigaction sa = {0};
    sa.sa_handler = on_term;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    if (argc == 3 && strcmp(argv[1], "run") == 0)
        return run_main(argv[0], argv[2]);
    if (argc == 3 && strcmp(argv[1], "server") == 0)
        return server_main(argv[2]);
    if (argc == 4 && strcmp(argv[1], "client") == 0)
        return client_main(argv[2], argv[3]);
    fprintf(stderr, "usage: %s run QUILLAN_REWARD | server DIR | client DIR NAME\n", argv[0]);
    return 2;
}
