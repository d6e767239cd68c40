/* `quillan-rollout`: a rollout worker (rollout/worker.h) until SIGINT or SIGTERM. Exit status:
 * 0 after a clean stop, 1 on a runtime failure (bad config, socket failure), 2 on a usage
 * error. */
#include "config.h"
#include "daemon.h"
#include "log.h"
#include "reward_service.h"
#include "worker.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <zmq.h>

static volatile sig_atomic_t stop_flag;

static void usage(FILE *out) {
    fprintf(out,
            "usage: quillan-rollout [--config FILE] [--id NAME] [--threads N]\n"
            "                       [--set section.key=value]...\n"
            "\n"
            "A rollout worker: asks the learner (network.dispatcher) for work, pulls policy\n"
            "snapshots (network.weights), generates each leased prompt's group of completions\n"
            "with the quantized engine, scores them with every reward service (reward.services)\n"
            "and returns the groups. Stops cleanly on SIGINT or SIGTERM. Logs JSON lines on\n"
            "stderr and publishes them to the log hub (network.log_in) when logging.hub is on.\n"
            "\n"
            "options:\n"
            "  --config FILE   YAML config of the run (docs/CONFIG.md)\n"
            "  --id NAME       stable worker name (default rollout-HOST-PID)\n"
            "  --threads N     engine threads (default rollout.threads; 0 = every core)\n"
            "  --set K=V       override one key, e.g. --set rollout.credits=4\n"
            "  --help          this text\n");
}

typedef struct {
    const char *id; /* --id, or NULL */
    long threads;   /* --threads, or -1 */
} args_t;

static int on_option(void *ctx, const char *name, const char *v) {
    args_t *a = ctx;
    if (!strcmp(name, "--id")) {
        if (!v[0] || strlen(v) >= 128) {
            fprintf(stderr, "quillan-rollout: --id must have 1 to 127 bytes\n");
            return -1;
        }
        a->id = v;
    } else {
        char *end;
        errno = 0;
        a->threads = strtol(v, &end, 10);
        if (errno || end == v || *end || a->threads < 0 || a->threads > 4096) {
            fprintf(stderr,
                    "quillan-rollout: --threads expects an integer in [0, 4096], "
                    "got '%s'\n",
                    v);
            return -1;
        }
    }
    return 0;
}

int main(int argc, char **argv) {
    static const char *const own[] = {"--id", "--threads", NULL};
    args_t args = {.id = NULL, .threads = -1};
    const daemon_cli_t cli = {.process = "quillan-rollout",
                              .usage = usage,
                              .options = own,
                              .option = on_option,
                              .ctx = &args,
                              .stop = &stop_flag};
    quillan_config_t *cfg;
    daemon_log_t *dlog;
    const int status = daemon_start(&cli, argc, argv, &cfg, &dlog);
    if (status != DAEMON_RUN)
        return status;
    const char *id = args.id;
    qerr_t err = {0};
    int rc = 0;

    char default_id[128];
    if (id == NULL) {
        char host[64] = "";
        gethostname(host, sizeof host - 1);
        snprintf(default_id, sizeof default_id, "rollout-%s-%ld", host[0] ? host : "host",
                 (long)getpid());
        id = default_id;
    }

    void *zctx = zmq_ctx_new();
    rollout_worker_t *w = NULL;
    if (zctx == NULL)
        rc = qerr_set(&err, QERR_IO, "zmq_ctx_new failed");
    if (rc == 0) {
        net_options_t opt;
        reward_net_options(cfg, &opt);
        rc = daemon_log_publish(dlog, zctx, &opt, id, &err);
    }
    if (rc == 0) {
        rollout_worker_options_t o = {.cfg = cfg,
                                      .worker_id = id,
                                      .threads = args.threads >= 0 ? (int)args.threads
                                                                   : cfg->rollout.threads,
                                      .stop = &stop_flag};
        w = rollout_worker_new(zctx, &o, &err);
        rc = w ? 0 : -1;
    }
    if (rc == 0)
        rc = rollout_worker_run(w, &err);
    if (rc != 0)
        log_error("rollout.error", "%s", err.msg);
    rollout_worker_destroy(&w);
    daemon_log_destroy(&dlog);
    if (zctx)
        zmq_ctx_term(zctx);
    free(cfg);
    return rc != 0 ? 1 : 0;
}
