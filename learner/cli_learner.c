/* The learner's subcommands of the front door: `quillan params`, `quillan sft` and
 * `quillan data make-task`. */
#include "cli.h"
#include "config.h"
#include "data_task.h"
#include "dp.h"
#include "log.h"
#include "model.h"
#include "sft.h"
#include "stop_signal.h"

#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int is_help(const char *arg) {
    return !strcmp(arg, "--help") || !strcmp(arg, "-h");
}

/* Parses a non-negative integer option value; returns 0 or 2 (usage error, reported). */
static int parse_long(const char *cmd, const char *opt, const char *s, long lo, long *out) {
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno || end == s || *end || v < lo) {
        fprintf(stderr, "%s: %s expects an integer >= %ld, got '%s'\n", cmd, opt, lo, s);
        return 2;
    }
    *out = v;
    return 0;
}

/* Loads FILE, applies pre (may be NULL) then the --set overrides, validates. Returns 0 or 1
 * (reported). */
static int load_config(const char *cmd, quillan_config_t *cfg, const char *file, const char *pre,
                       int nset, char **sets) {
    qerr_t err = {0};
    config_defaults(cfg);
    int rc = config_load(cfg, file, &err);
    if (rc == 0 && pre)
        rc = config_set(cfg, pre, &err);
    for (int i = 0; rc == 0 && i < nset; i++)
        rc = config_set(cfg, sets[i], &err);
    if (rc == 0)
        rc = config_validate(cfg, &err);
    if (rc) {
        fprintf(stderr, "%s: %s\n", cmd, err.msg);
        return 1;
    }
    return 0;
}

/* ---- quillan params ---- */

static void params_usage(FILE *out) {
    fprintf(out, "usage: quillan params CONFIG [--set section.key=value]...\n"
                 "\n"
                 "Prints the model's breakdown as a Markdown table: component, precision at\n"
                 "rollout, parameters, bytes at rollout precision (FP32 4 B, FP16 2 B, ternary\n"
                 "2 bits + FP32 row scale, INT4 4 bits + FP16 scale per 32, INT8 1 B + FP32 row\n"
                 "scale) and share of the parameters, with a total line.\n");
}

int cli_params_main(int argc, char **argv) {
    const char *file = NULL;
    char **sets = calloc((size_t)argc, sizeof *sets);
    int nset = 0;
    for (int i = 1; i < argc; i++) {
        if (is_help(argv[i])) {
            params_usage(stdout);
            free(sets);
            return 0;
        }
        if (!strcmp(argv[i], "--set") && i + 1 < argc) {
            sets[nset++] = argv[++i];
        } else if (argv[i][0] == '-' || file) {
            fprintf(stderr, "quillan params: unexpected argument '%s'\n", argv[i]);
            params_usage(stderr);
            free(sets);
            return 2;
        } else {
            file = argv[i];
        }
    }
    if (!file) {
        params_usage(stderr);
        free(sets);
        return 2;
    }
    quillan_config_t *cfg = malloc(sizeof *cfg);
    int rc = cfg ? load_config("quillan params", cfg, file, NULL, nset, sets) : 1;
    if (rc == 0) {
        qerr_t err = {0};
        printf("Model of %s:\n\n", file);
        if (model_params_print(&cfg->model, stdout, &err)) {
            fprintf(stderr, "quillan params: %s\n", err.msg);
            rc = 1;
        }
    }
    free(cfg);
    free(sets);
    return rc;
}

/* ---- quillan sft ---- */

static void sft_usage(FILE *out) {
    fprintf(out,
            "usage: quillan sft CONFIG [--set section.key=value]... [options]\n"
            "\n"
            "Supervised fine-tuning on data.train (JSONL of {prompt, completion}); evaluates on\n"
            "data.test (loss and greedy exact match). learner.mode is set to sft (aux weights\n"
            "then default to balance 0.01, diffusion 0.2). Checkpoints go to\n"
            "learner.checkpoint_dir every learner.checkpoint_interval steps and at the end.\n"
            "SIGINT or SIGTERM (Ctrl-C) stops after the step under way and writes a checkpoint\n"
            "(resume with --resume); a second one ends the process at once.\n"
            "\n"
            "options:\n"
            "  --batch N        sequences per step (default 32)\n"
            "  --eval-every N   steps between evaluations, 0 = only at the end (default 100)\n"
            "  --eval-n N       test examples per evaluation, 0 = all (default 500)\n"
            "  --log-every N    steps between progress lines (default 10)\n"
            "  --max-steps N    stop after N steps (default learner.total_steps)\n"
            "  --resume PATH    continue from a checkpoint directory, or the latest under a root\n"
            "  --balance-bias   update the loss-free balancing biases after each step (off:\n"
            "                   optional in SFT, where the aux balance loss evens the load)\n"
            "  --replicas N     data parallel: N model replicas on N threads each train on a\n"
            "                   shard of every batch, with max(1, learner.threads / N) threads\n"
            "                   inside each; results are reproducible for a fixed N (default 1)\n"
            "\n"
            "exit status: 0 ok (also after a stop by signal), 1 runtime error (bad data, bad\n"
            "checkpoint), 2 usage error\n");
}

static volatile sig_atomic_t sft_stop;

int cli_sft_main(int argc, char **argv) {
    const char *cmd = "quillan sft", *file = NULL;
    sft_options_t opt;
    sft_options_default(&opt);
    char **sets = calloc((size_t)argc, sizeof *sets);
    int nset = 0, rc = 0;
    for (int i = 1; i < argc && rc == 0; i++) {
        const char *a = argv[i];
        long v = 0;
        if (is_help(a)) {
            sft_usage(stdout);
            free(sets);
            return 0;
        }
        const int has_val = i + 1 < argc;
        if (!strcmp(a, "--set") && has_val) {
            sets[nset++] = argv[++i];
        } else if (!strcmp(a, "--batch") && has_val) {
            rc = parse_long(cmd, a, argv[++i], 1, &v);
            opt.batch_size = (int)v;
        } else if (!strcmp(a, "--eval-every") && has_val) {
            rc = parse_long(cmd, a, argv[++i], 0, &v);
            opt.eval_interval = (int)v;
        } else if (!strcmp(a, "--eval-n") && has_val) {
            rc = parse_long(cmd, a, argv[++i], 0, &v);
            opt.eval_examples = (int)v;
        } else if (!strcmp(a, "--log-every") && has_val) {
            rc = parse_long(cmd, a, argv[++i], 1, &v);
            opt.log_interval = (int)v;
        } else if (!strcmp(a, "--max-steps") && has_val) {
            rc = parse_long(cmd, a, argv[++i], 1, &v);
            opt.max_steps = v;
        } else if (!strcmp(a, "--replicas") && has_val) {
            rc = parse_long(cmd, a, argv[++i], 1, &v);
            if (rc == 0 && v > DP_LOCAL_MAX) {
                fprintf(stderr, "%s: --replicas %ld: at most %d\n", cmd, v, DP_LOCAL_MAX);
                rc = 2;
            }
            opt.replicas = (int)v;
        } else if (!strcmp(a, "--balance-bias")) {
            opt.balance_bias = 1;
        } else if (!strcmp(a, "--resume") && has_val) {
            opt.resume = argv[++i];
        } else if (a[0] == '-' || file) {
            fprintf(stderr, "%s: unexpected argument '%s'\n", cmd, a);
            rc = 2;
        } else {
            file = a;
        }
    }
    if (rc == 0 && !file) {
        fprintf(stderr, "%s: missing CONFIG\n", cmd);
        rc = 2;
    }
    if (rc) {
        sft_usage(stderr);
        free(sets);
        return rc;
    }
    quillan_config_t *cfg = malloc(sizeof *cfg);
    rc = cfg ? load_config(cmd, cfg, file, "learner.mode=sft", nset, sets) : 1;
    if (rc == 0) {
        log_init("quillan-sft");
        log_set_level(cfg->logging.level);
        qerr_t err = {0};
        sft_result_t res;
        /* The first signal asks for a clean stop, a second one kills. */
        stop_signal_install(&sft_stop, 1);
        opt.stop = &sft_stop;
        if (sft_run(cfg, &opt, &res, &err)) {
            fprintf(stderr, "%s: %s\n", cmd, err.msg);
            rc = 1;
        } else if (res.stopped) {
            printf("sft: stopped by signal after step %ld (%.1f s), last loss %.4f%s%s\n",
                   res.steps, res.seconds, res.last_loss,
                   cfg->learner.checkpoint_dir[0] ? "; checkpoint under " : "",
                   cfg->learner.checkpoint_dir);
        } else {
            printf("sft: %ld steps in %.1f s, last loss %.4f, test loss %.4f, exact match "
                   "%.1f%%\n",
                   res.steps, res.seconds, res.last_loss, res.eval_loss, 100 * res.eval_accuracy);
        }
    }
    free(cfg);
    free(sets);
    return rc;
}

/* ---- quillan data ---- */

static void data_usage(FILE *out) {
    fprintf(out, "usage: quillan data make-task TASK --n N [--test M] [--seed S] --out DIR\n"
                 "\n"
                 "Writes DIR/train.jsonl (N examples) and DIR/test.jsonl (M examples, default\n"
                 "max(100, N/10); test pairs never occur in train). Tasks:\n"
                 "  addition   prompts 'a+b=' with a, b of 1-3 digits; answer and completion\n"
                 "             are the sum\n");
}

int cli_data_main(int argc, char **argv) {
    const char *cmd = "quillan data make-task";
    if (argc < 2 || is_help(argv[1])) {
        data_usage(argc < 2 ? stderr : stdout);
        return argc < 2 ? 2 : 0;
    }
    if (strcmp(argv[1], "make-task") != 0) {
        fprintf(stderr, "quillan data: unknown subcommand '%s'\n", argv[1]);
        data_usage(stderr);
        return 2;
    }
    const char *task = NULL, *out = NULL;
    long n = -1, n_test = -1, seed = 1;
    int rc = 0;
    for (int i = 2; i < argc && rc == 0; i++) {
        const char *a = argv[i];
        if (is_help(a)) {
            data_usage(stdout);
            return 0;
        }
        const int has_val = i + 1 < argc;
        if (!strcmp(a, "--n") && has_val)
            rc = parse_long(cmd, a, argv[++i], 1, &n);
        else if (!strcmp(a, "--test") && has_val)
            rc = parse_long(cmd, a, argv[++i], 1, &n_test);
        else if (!strcmp(a, "--seed") && has_val)
            rc = parse_long(cmd, a, argv[++i], 0, &seed);
        else if (!strcmp(a, "--out") && has_val)
            out = argv[++i];
        else if (a[0] == '-' || task) {
            fprintf(stderr, "%s: unexpected argument '%s'\n", cmd, a);
            rc = 2;
        } else
            task = a;
    }
    if (rc == 0 && (!task || n < 0 || !out)) {
        fprintf(stderr, "%s: TASK, --n and --out are required\n", cmd);
        rc = 2;
    }
    if (rc) {
        data_usage(stderr);
        return rc;
    }
    if (n_test < 0)
        n_test = n / 10 > 100 ? n / 10 : 100;
    qerr_t err = {0};
    if (data_task_make(task, n, n_test, (uint64_t)seed, out, &err)) {
        fprintf(stderr, "%s: %s\n", cmd, err.msg);
        return 1;
    }
    printf("wrote %s/train.jsonl (%ld) and %s/test.jsonl (%ld)\n", out, n, out, n_test);
    return 0;
}
