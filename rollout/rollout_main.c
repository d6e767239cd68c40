/* `quillan-rollout`: a rollout worker (rollout/worker.h) until SIGINT or SIGTERM. Exit status:
 * 0 after a clean stop, 1 on a runtime failure (bad config, socket failure), 2 on a usage
 * error. */
#include "config.h"
#include "daemon_log.h"
#include "log.h"
#include "reward_service.h"
#include "worker.h"

#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <zmq.h>

static volatile sig_atomic_t stop_flag;

static void on_signal(int sig) {
    (void)sig;
    stop_flag = 1;
}

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

static int is_help(const char *a) {
    return !strcmp(a, "--help") || !strcmp(a, "-h");
}

static int takes_value(const char *a) {
    return !strcmp(a, "--config") || !strcmp(a, "--id") || !strcmp(a, "--threads") ||
           !strcmp(a, "--set");
}

int main(int argc, char **argv) {
    const char *file = NULL, *id = NULL;
    long threads = -1;
    for (int i = 1; i < argc; i++) {
        if (is_help(argv[i])) {
            usage(stdout);
            return 0;
        }
    }
    /* Options in two passes: the file first, so --set always wins over it. */
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!takes_value(a)) {
            fprintf(stderr, "quillan-rollout: unexpected argument '%s'\n", a);
            usage(stderr);
            return 2;
        }
        if (i + 1 >= argc) {
            fprintf(stderr, "quillan-rollout: %s needs a value\n", a);
            return 2;
        }
        const char *v = argv[++i];
        if (!strcmp(a, "--config")) {
            if (file) {
                fprintf(stderr, "quillan-rollout: --config given twice\n");
                return 2;
            }
            file = v;
        } else if (!strcmp(a, "--id")) {
            if (!v[0] || strlen(v) >= 128) {
                fprintf(stderr, "quillan-rollout: --id must have 1 to 127 bytes\n");
                return 2;
            }
            id = v;
        } else if (!strcmp(a, "--threads")) {
            char *end;
            errno = 0;
            threads = strtol(v, &end, 10);
            if (errno || end == v || *end || threads < 0 || threads > 4096) {
                fprintf(stderr,
                        "quillan-rollout: --threads expects an integer in [0, 4096], "
                        "got '%s'\n",
                        v);
                return 2;
            }
        }
    }

    quillan_config_t *cfg = malloc(sizeof *cfg);
    if (cfg == NULL) {
        fprintf(stderr, "quillan-rollout: out of memory\n");
        return 1;
    }
    config_defaults(cfg);
    qerr_t err = {0};
    int rc = file ? config_load(cfg, file, &err) : 0;
    for (int i = 1; rc == 0 && i < argc; i += 2)
        if (!strcmp(argv[i], "--set"))
            rc = config_set(cfg, argv[i + 1], &err);
    if (rc == 0)
        rc = config_validate(cfg, &err);
    daemon_log_t *dlog = rc == 0 ? daemon_log_new(cfg, "quillan-rollout", 0, &err) : NULL;
    if (dlog == NULL) {
        fprintf(stderr, "quillan-rollout: %s\n", err.msg);
        free(cfg);
        return 1;
    }

    char default_id[128];
    if (id == NULL) {
        char host[64] = "";
        gethostname(host, sizeof host - 1);
        snprintf(default_id, sizeof default_id, "rollout-%s-%ld", host[0] ? host : "host",
                 (long)getpid());
        id = default_id;
    }

    struct sigaction sa = {0};
    sa.sa_handler = on_signal;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);

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
                                      .threads = threads >= 0 ? (int)threads : cfg->rollout.threads,
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
