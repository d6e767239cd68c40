/* The start of a daemon (quillan-learner, quillan-rollout, quillan-reward), written once for the
 * three mains: the command line, the config, the logging (common/daemon_log.h) and the stop
 * signal (common/stop_signal.h).
 *
 * Command line: `--help`/`-h` anywhere prints the usage on stdout (exit 0); otherwise every
 * argument is an option followed by its value: `--config FILE` (at most once), `--set K=V`
 * (any number) and the daemon's own options. The config is the defaults, then FILE, then every
 * --set in order (so --set always wins over the file), then config_validate.
 *
 * Messages go to stderr, each prefixed "<process>: ":
 *   unexpected argument '<arg>'  then the usage on stderr  exit 2
 *   <option> needs a value                                 exit 2
 *   --config given twice                                   exit 2
 *   <what the daemon's option handler prints>              exit 2
 *   <config_load, config_set, config_validate or
 *    daemon_log_new message>, or out of memory             exit 1 */
#ifndef QUILLAN_DAEMON_H
#define QUILLAN_DAEMON_H

#include "config.h"
#include "daemon_log.h"
#include "stop_signal.h"

#include <stdio.h>

/* Returned by daemon_start when the daemon goes on to run. */
#define DAEMON_RUN (-1)

/* What one daemon adds to the shared command line. */
typedef struct {
    const char *process;        /* e.g. "quillan-rollout": message prefix, log process name */
    void (*usage)(FILE *out);   /* prints the daemon's usage text to out */
    const char *const *options; /* the daemon's own options, each taking one value,
                                 * NULL-terminated; NULL when it has none */
    /* Called in command-line order for each of `options` with its value (a pointer into argv).
     * Returns 0, or -1 after printing why on stderr (exit 2). NULL when options is NULL. */
    int (*option)(void *ctx, const char *name, const char *value);
    void *ctx;          /* passed to option */
    unsigned log_flags; /* daemon_log_new flags (DAEMON_LOG_*) */
    /* Set to 1 on every SIGINT or SIGTERM once the daemon runs (stop_signal_install); the
     * daemon polls it to stop cleanly. Static storage duration. */
    volatile sig_atomic_t *stop;
} daemon_cli_t;

/* A daemon_cli_t option handler for a daemon with one option that takes any value: stores value
 * in *(const char **)ctx. Returns 0. */
int daemon_option_keep(void *ctx, const char *name, const char *value);

/* Reads the command line, then loads and validates the config and sets up the logging, with
 * the messages of the header comment. Returns DAEMON_RUN with *cfg (malloc'd and validated;
 * the caller frees it after destroying everything that borrows it) and *dlog (the caller's, to
 * daemon_log_destroy before freeing *cfg) set; or the exit status the process must end with
 * now (0 after --help, 1, 2), with *cfg and *dlog NULL. Nothing is parsed or allocated after
 * the first error, and the stop signals are installed only on DAEMON_RUN. */
int daemon_start(const daemon_cli_t *cli, int argc, char **argv, quillan_config_t **cfg,
                 daemon_log_t **dlog);

#endif
