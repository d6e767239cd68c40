#include "stop_signal.h"

#include "error.h"

#include <stddef.h>

/* The flag stop_signal_install was given; set before the handler is installed, never after. */
static volatile sig_atomic_t *stop_target;

static void on_signal(int sig) {
    (void)sig;
    *stop_target = 1;
}

void stop_signal_install(volatile sig_atomic_t *flag, int second_kills) {
    Q_ASSERT(flag && stop_target == NULL);
    stop_target = flag;
    struct sigaction sa = {0};
    sa.sa_handler = on_signal;
    sa.sa_flags = second_kills ? SA_RESETHAND : 0;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
}
