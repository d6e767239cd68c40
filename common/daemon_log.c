#include "daemon_log.h"

#include "log.h"
#include "log_file.h"
#include "log_pub.h"
#include "net_security.h"
#include "tensorboard.h"

#include <stdint.h>
#include <stdlib.h>

struct daemon_log {
    const quillan_config_t *cfg; /* borrowed */
    log_file_t *file;
    tensorboard_sink_t *tb;
    log_pub_t *pub;
};

daemon_log_t *daemon_log_new(const quillan_config_t *cfg, const char *process, unsigned flags,
                             qerr_t *err) {
    Q_ASSERT(cfg && process);
    log_init(process);
    log_set_level(cfg->logging.level);
    daemon_log_t *dl = calloc(1, sizeof *dl);
    if (dl == NULL) {
        qerr_set(err, QERR_NOMEM, "out of memory");
        return NULL;
    }
    dl->cfg = cfg;
    const config_logging_t *lc = &cfg->logging;
    if (lc->file[0]) {
        dl->file = log_file_sink_new(lc->file, (uint64_t)lc->file_max_mb << 20, lc->file_keep, err);
        if (dl->file == NULL) {
            qerr_wrap(err, "logging.file");
            daemon_log_destroy(&dl);
            return NULL;
        }
    }
    if ((flags & DAEMON_LOG_TENSORBOARD) && lc->tensorboard[0]) {
        dl->tb = tensorboard_sink_new(lc->tensorboard, err);
        if (dl->tb == NULL) {
            qerr_wrap(err, "logging.tensorboard");
            daemon_log_destroy(&dl);
            return NULL;
        }
    }
    return dl;
}

int daemon_log_publish(daemon_log_t *dl, void *zctx, const net_options_t *opt,
                       const char *sender_id, qerr_t *err) {
    Q_ASSERT(dl && zctx && opt && sender_id && dl->pub == NULL);
    if (!dl->cfg->logging.hub)
        return 0;
    net_security_t sec;
    if (net_security_from_config(dl->cfg, NET_ROLE_CLIENT, &sec, err) != 0)
        return -1;
    dl->pub = log_pub_new(zctx, dl->cfg->network.log_in, opt, &sec, sender_id,
                          net_incarnation_new(), err);
    return dl->pub ? 0 : -1;
}

void daemon_log_destroy(daemon_log_t **dl) {
    if (dl == NULL || *dl == NULL)
        return;
    log_pub_destroy(&(*dl)->pub);
    tensorboard_sink_destroy(&(*dl)->tb);
    log_file_destroy(&(*dl)->file);
    free(*dl);
    *dl = NULL;
}
