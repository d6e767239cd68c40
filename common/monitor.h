/* `quillan monitor ADDRESS`: a live terminal dashboard of a run, fed by the log hub's XPUB
 * (network.log_out, ARCHITECTURE.md §1), and `quillan plot`: SVG curves of a JSON-lines log.
 *
 * The dashboard state is a plain module so that tests can feed records and read the screen:
 *   - monitor_ingest takes every record (as common/log.h sees it) with the Envelope's sender id
 *     and incarnation (a new incarnation of the same sender is a restart);
 *   - monitor_render draws the current state as text: learner step and policy version, reward
 *     and eval accuracy with sparklines, loss terms, clip fractions, KL, entropy, response
 *     length, tokens/s, mismatch, snapshot changes, a table of workers (from rollout.* records),
 *     a table of reward services (from reward.stats), alerts and the latest warnings.
 * Records are identified by their process name: "quillan-learner", "quillan-rollout",
 * "quillan-reward" (log_init names of the daemons); records of other processes only count. */
#ifndef QUILLAN_MONITOR_H
#define QUILLAN_MONITOR_H

#include "log.h"

#include <stddef.h>
#include <stdint.h>

/* Alert thresholds; monitor_options_init gives the defaults. */
typedef struct {
    double silent_after_s;       /* a worker or the learner unheard for this long: 60 s */
    double reward_fail_window_s; /* reward failures within this window raise an alert: 120 s */
    double ratio_collapse;       /* policy/ratio_mean or tis/mean_weight below this: 0.5 */
    int staleness_window;        /* staleness/mean rising over this many steps: 5 */
    double staleness_rise;       /* ... by at least this much in total: 0.5 versions */
} monitor_options_t;

void monitor_options_init(monitor_options_t *o);

typedef struct monitor monitor_t;

/* A fresh dashboard state (options copied), or NULL when out of memory. */
monitor_t *monitor_new(const monitor_options_t *o);

/* Frees the state and sets *m to NULL; safe when *m is NULL. */
void monitor_destroy(monitor_t **m);

/* Takes one record received at time now (seconds since the epoch, the monitor's clock: the
 * sender's clock may differ). sender may be NULL or "" (then the record's host names it). */
void monitor_ingest(monitor_t *m, const log_record_t *rec, const char *sender, uint64_t incarnation,
                    double now);

/* What the link reports, shown in the status line: the address, messages dropped as garbage
 * (not a valid log Envelope) and disconnects seen. */
void monitor_set_link(monitor_t *m, const char *address, uint64_t garbage, uint64_t disconnects);

/* How to draw. */
typedef struct {
    int width; /* columns; lines are cut to it */
    int color; /* ANSI colours and bold */
    int utf8;  /* sparklines in block characters; ASCII otherwise */
} monitor_view_t;

/* The screen at time now, as lines ending in '\n' (no cursor control). Returns a malloc'd
 * string the caller frees, or NULL when out of memory. */
char *monitor_render(monitor_t *m, double now, const monitor_view_t *v);

/* The alerts at time now, one per line ("" when none); a malloc'd string or NULL (memory). */
char *monitor_alerts(monitor_t *m, double now);

/* Records ingested. */
uint64_t monitor_records(const monitor_t *m);

/* `quillan monitor ADDRESS [--jsonl] [--filter EVENT,...] ...`; see --help. */
int cli_monitor_main(int argc, char **argv);

#endif
