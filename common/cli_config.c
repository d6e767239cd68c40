/* `quillan config`: check a config file and print the resolved config, or print the reference
 * of every key. */
#include "cli.h"
#include "config.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static void usage(FILE *out) {
    fprintf(
        out,
        "usage: quillan config check FILE [--set section.key=value]...\n"
        "       quillan config doc\n"
        "\n"
        "check  loads FILE (YAML), applies each --set override in order, validates the\n"
        "       result and prints the resolved config as YAML (it loads back unchanged).\n"
        "       Errors go to stderr and name the file, line and key; exit status 1.\n"
        "doc    prints every key with its type, default, range, unit and meaning as\n"
        "       Markdown (docs/CONFIG.md).\n"
        "\n"
        "--set takes a YAML value: --set learner.lr=3e-4, --set 'learner.advantage.clip=[0, 1]',\n"
        "--set reward.services.0.address=tcp://127.0.0.1:6000.\n");
}

static int is_help(const char *arg) {
    return !strcmp(arg, "--help") || !strcmp(arg, "-h");
}

static int config_check(int argc, char **argv) {
    const char *file = NULL;
    for (int i = 1; i < argc; i++) {
        if (is_help(argv[i])) {
            usage(stdout);
            return 0;
        }
    }
    /* First pass: find the file and check the options' shape before doing any work. */
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--set")) {
            if (++i == argc) {
                fprintf(stderr, "quillan config check: --set needs section.key=value\n");
                return 2;
            }
        } else if (!strncmp(argv[i], "--set=", 6)) {
            continue;
        } else if (argv[i][0] == '-' && argv[i][1]) {
            fprintf(stderr, "quillan config check: unknown option '%s'\n", argv[i]);
            usage(stderr);
            return 2;
        } else if (file) {
            fprintf(stderr, "quillan config check: one config file only ('%s' and '%s')\n", file,
                    argv[i]);
            return 2;
        } else {
            file = argv[i];
        }
    }
    if (!file) {
        fprintf(stderr, "quillan config check: missing FILE\n");
        usage(stderr);
        return 2;
    }

    quillan_config_t *cfg = malloc(sizeof *cfg);
    if (!cfg) {
        fprintf(stderr, "quillan config check: out of memory\n");
        return 1;
    }
    qerr_t err = {0};
    config_defaults(cfg);
    int rc = config_load(cfg, file, &err);
    for (int i = 1; rc == 0 && i < argc; i++) {
        if (!strcmp(argv[i], "--set"))
            rc = config_set(cfg, argv[++i], &err);
        else if (!strncmp(argv[i], "--set=", 6))
            rc = config_set(cfg, argv[i] + 6, &err);
    }
    if (rc == 0)
        rc = config_validate(cfg, &err);
    if (rc == 0)
        rc = config_print(cfg, stdout, &err);
    free(cfg);
    if (rc) {
        fprintf(stderr, "quillan config: %s\n", err.msg);
        return 1;
    }
    return 0;
}

int cli_config_main(int argc, char **argv) {
    if (argc < 2) {
        usage(stderr);
        return 2;
    }
    if (is_help(argv[1])) {
        usage(stdout);
        return 0;
    }
    if (!strcmp(argv[1], "check"))
        return config_check(argc - 1, argv + 1);
    if (!strcmp(argv[1], "doc")) {
        if (argc > 2 && is_help(argv[2])) {
            usage(stdout);
            return 0;
        }
        if (argc > 2) {
            fprintf(stderr, "quillan config doc: takes no arguments\n");
            return 2;
        }
        qerr_t err = {0};
        if (config_doc_markdown(stdout, &err)) {
            fprintf(stderr, "quillan config: %s\n", err.msg);
            return 1;
        }
        return 0;
    }
    fprintf(stderr, "quillan config: unknown subcommand '%s'\n", argv[1]);
    usage(stderr);
    return 2;
}
