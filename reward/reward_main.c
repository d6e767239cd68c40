/* `quillan-reward`: the reward service with the built-in scorers (reward/scorers.h), serving
 * reward/PROTOCOL.md on a ROUTER socket until SIGINT or SIGTERM. Exit status: 0 after a clean
 * stop, 1 on a runtime failure (bad config, bind failure), 2 on a usage error. */
#include "config.h"
#include "daemon.h"
#include "log.h"
#include "reward_service.h"
#include "scorers.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <zmq.h>

static volatile sig_atomic_t stop_flag;

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

int main(int argc, char **argv) {
    static const char *const own[] = {"--bind", NULL};
    const char *bind = NULL; /* --bind: overrides reward.builtin.bind */
    const daemon_cli_t cli = {.process = "quillan-reward",
                              .usage = usage,
                              .options = own,
                              .option = daemon_option_keep,
                              .ctx = &bind,
                              .stop = &stop_flag};
    quillan_config_t *cfg;
    daemon_log_t *dlog;
    const int status = daemon_start(&cli, argc, argv, &cfg, &dlog);
    if (status != DAEMON_RUN)
        return status;
    qerr_t err = {0};
    int rc = 0;

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
