/* `quillan-reward`: the reward service with the built-in scorers (reward/scorers.h), serving
 * reward/PROTOCOL.md on a ROUTER socket until SIGINT or SIGTERM. Exit status: 0 after a clean
 * stop, 1 on a runtime failure (bad config, bind failure), 2 on a usage error. */
#include "config.h"
#include "daemon_log.h"
#include "log.h"
#include "reward_service.h"
#include "scorers.h"

#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <zmq.h>

static volatile sig_atomic_t stop_flag;

static void on_signal(int sig) {
    (void)sig;
    stop_flag = 1;
}

static void usage(FILE *out) {
    fprintf(out,
            "usage: quillan-reward [--config FILE] [--bind ADDR] [--set section.key=value]...\n"
            "\n"
            "Serves RewardRequest messages (reward/PROTOCOL.md) with the built-in scorers and\n"
            "stops cleanly on SIGINT or SIGTERM. Reads the `reward.builtin` keys of the config\n"
            "(docs/CONFIG.md); without --config every key has its default.\n"
            "\n"
            "options:\n"
            "  --config FILE   YAML config of the run\n"
            "  --bind ADDR     ZeroMQ endpoint to bind (overrides reward.builtin.bind),\n"
            "                  e.g. tcp://127.0.0.1:5557\n"
            "  --set K=V       override one key, e.g. --set reward.builtin.numeric.weight=1\n"
            "  --help          this text\n"
            "\n"
            "scorers (weight 0 = off; the score is the weighted sum; \"no reward\" when any\n"
            "scorer that is on has none):\n"
            "  exact    1 if the trimmed completion (EOS text removed) equals the `answer`\n"
            "           metadata field, else 0; no reward when the answer is missing\n"
            "  numeric  1 if the completion's last number is within abs_tol/rel_tol of the\n"
            "           numeric answer, else 0; no reward when the answer is missing or not a\n"
            "           number\n"
            "  format   1 if the PCRE2 pattern format.regex matches the completion, else 0\n"
            "  length   0 up to length.target, linear to -1 at target + window\n");
}

static int is_help(const char *a) {
    return !strcmp(a, "--help") || !strcmp(a, "-h");
}

/* Needs a value after argv[*i]; returns it, or NULL after reporting a usage error. */
static const char *opt_value(int argc, char **argv, int *i) {
    if (*i + 1 >= argc) {
        fprintf(stderr, "quillan-reward: %s needs a value\n", argv[*i]);
        return NULL;
    }
    return argv[++*i];
}

int main(int argc, char **argv) {
    const char *file = NULL, *bind = NULL;
    for (int i = 1; i < argc; i++) {
        if (is_help(argv[i])) {
            usage(stdout);
            return 0;
        }
    }
    quillan_config_t *cfg = malloc(sizeof *cfg);
    if (cfg == NULL) {
        fprintf(stderr, "quillan-reward: out of memory\n");
        return 1;
    }
    config_defaults(cfg);
    qerr_t err = {0};
    /* Options in two passes: the file first, so --set always wins over it. */
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "--config") || !strcmp(a, "--bind") || !strcmp(a, "--set")) {
            const char *v = opt_value(argc, argv, &i);
            if (v == NULL) {
                free(cfg);
                return 2;
            }
            if (!strcmp(a, "--config")) {
                if (file) {
                    fprintf(stderr, "quillan-reward: --config given twice\n");
                    free(cfg);
                    return 2;
                }
                file = v;
            } else if (!strcmp(a, "--bind")) {
                bind = v;
            }
        } else {
            fprintf(stderr, "quillan-reward: unexpected argument '%s'\n", a);
            usage(stderr);
            free(cfg);
            return 2;
        }
    }
    int rc = file ? config_load(cfg, file, &err) : 0;
    for (int i = 1; rc == 0 && i < argc; i++) {
        if (!strcmp(argv[i], "--set"))
            rc = config_set(cfg, argv[++i], &err);
        else if (!strcmp(argv[i], "--config") || !strcmp(argv[i], "--bind"))
            i++;
    }
    if (rc == 0)
        rc = config_validate(cfg, &err);
    daemon_log_t *dlog = rc == 0 ? daemon_log_new(cfg, "quillan-reward", 0, &err) : NULL;
    if (dlog == NULL) {
        fprintf(stderr, "quillan-reward: %s\n", err.msg);
        free(cfg);
        return 1;
    }

    struct sigaction sa = {0};
    sa.sa_handler = on_signal;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);

    void *zctx = zmq_ctx_new();
    reward_scorers_t *scorers = NULL;
    reward_service_t *svc = NULL;
    if (zctx == NULL) {
        qerr_set(&err, QERR_IO, "zmq_ctx_new failed");
        rc = -1;
    }
    if (rc == 0) {
        net_options_t opt;
        reward_net_options(cfg, &opt);
        rc = daemon_log_publish(dlog, zctx, &opt, "quillan-reward", &err);
    }
    if (rc == 0) {
        scorers = reward_scorers_new(&cfg->reward.builtin, &err);
        rc = scorers ? 0 : -1;
    }
    if (rc == 0) {
        svc = reward_service_new(zctx, cfg, bind ? bind : cfg->reward.builtin.bind,
                                 reward_service_builtin_score, scorers, &err);
        rc = svc ? 0 : -1;
    }
    if (rc == 0)
        rc = reward_service_run(svc, &stop_flag, &err);
    if (rc != 0 && svc != NULL)
        log_error("reward.error", "%s", err.msg);
    reward_service_destroy(&svc);
    reward_scorers_destroy(&scorers);
    daemon_log_destroy(&dlog);
    if (zctx)
        zmq_ctx_term(zctx);
    free(cfg);
    if (rc != 0)
        fprintf(stderr, "quillan-reward: %s\n", err.msg);
    return rc != 0 ? 1 : 0;
}
