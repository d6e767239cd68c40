#include "daemon.h"

#include "error.h"

#include <stdlib.h>
#include <string.h>

static int is_help(const char *a) {
    return !strcmp(a, "--help") || !strcmp(a, "-h");
}

static int is_own(const daemon_cli_t *cli, const char *a) {
    for (const char *const *o = cli->options; o && *o; o++)
        if (!strcmp(*o, a))
            return 1;
    return 0;
}

/* The options, before any config is read: returns DAEMON_RUN with *file set (NULL without
 * --config), or the exit status after printing why. */
static int parse(const daemon_cli_t *cli, int argc, char **argv, const char **file) {
    for (int i = 1; i < argc; i++) {
        if (is_help(argv[i])) {
            cli->usage(stdout);
            return 0;
        }
    }
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        const int own = is_own(cli, a);
        if (!own && strcmp(a, "--config") && strcmp(a, "--set")) {
            fprintf(stderr, "%s: unexpected argument '%s'\n", cli->process, a);
            cli->usage(stderr);
            return 2;
        }
        if (i + 1 >= argc) {
            fprintf(stderr, "%s: %s needs a value\n", cli->process, a);
            return 2;
        }
        const char *v = argv[++i];
        if (!strcmp(a, "--config")) {
            if (*file) {
                fprintf(stderr, "%s: --config given twice\n", cli->process);
                return 2;
            }
            *file = v;
        } else if (own && cli->option(cli->ctx, a, v) != 0) {
            return 2;
        }
    }
    return DAEMON_RUN;
}

int daemon_start(const daemon_cli_t *cli, int argc, char **argv, quillan_config_t **cfg,
                 daemon_log_t **dlog) {
    Q_ASSERT(cli && cli->process && cli->usage && (cli->options == NULL || cli->option) &&
             cli->stop);
    Q_ASSERT(cfg && dlog);
    *cfg = NULL;
    *dlog = NULL;
    const char *file = NULL;
    const int status = parse(cli, argc, argv, &file);
    if (status != DAEMON_RUN)
        return status;
    quillan_config_t *c = malloc(sizeof *c);
    if (c == NULL) {
        fprintf(stderr, "%s: out of memory\n", cli->process);
        return 1;
    }
    config_defaults(c);
    qerr_t err = {0};
    int rc = file ? config_load(c, file, &err) : 0;
    /* parse checked that every option has exactly one value: they sit in pairs. */
    for (int i = 1; rc == 0 && i < argc; i += 2)
        if (!strcmp(argv[i], "--set"))
            rc = config_set(c, argv[i + 1], &err);
    if (rc == 0)
        rc = config_validate(c, &err);
    daemon_log_t *dl = rc == 0 ? daemon_log_new(c, cli->process, cli->log_flags, &err) : NULL;
    if (dl == NULL) {
        fprintf(stderr, "%s: %s\n", cli->process, err.msg);
        free(c);
        return 1;
    }
    *cfg = c;
    *dlog = dl;
    stop_signal_install(cli->stop, 0);
    return DAEMON_RUN;
}

int daemon_option_keep(void *ctx, const char *name, const char *value) {
    (void)name;
    *(const char **)ctx = value;
    return 0;
}
