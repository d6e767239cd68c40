/* SIGINT and SIGTERM as a request to stop cleanly: the daemons' shutdown and `quillan sft`'s
 * stop after the step under way. One flag per process. */
#ifndef QUILLAN_STOP_SIGNAL_H
#define QUILLAN_STOP_SIGNAL_H

#include <signal.h>

/* Makes SIGINT and SIGTERM set *flag (which the caller polls). With second_kills, the first
 * signal restores the default action (SA_RESETHAND), so a second one ends the process at
 * once; without it, every signal only sets the flag. Call once per process. */
void stop_signal_install(volatile sig_atomic_t *flag, int second_kills);

#endif
