/* The logging of a daemon (quillan-learner, quillan-rollout, quillan-reward), set up from its
 * validated config and torn down in reverse, written once for the three mains:
 *
 *   daemon_log_new        log_init(process), log_set_level(logging.level), then the sinks:
 *                           logging.file         rotated JSON lines (common/log_file.h), rotated
 *                                                at logging.file_max_mb, logging.file_keep kept;
 *                           logging.tensorboard  TensorBoard events (learner/tensorboard.h),
 *                                                only with DAEMON_LOG_TENSORBOARD;
 *   daemon_log_publish    when logging.hub is on, the log publisher (common/log_pub.h) that
 *                         sends every record to the hub's network.log_in; a daemon calls it
 *                         once it has its ZeroMQ context;
 *   daemon_log_destroy    publisher, TensorBoard sink, log file.
 *
 * The learner runs the hub itself (learner/loghub.h) and does not publish; only it writes
 * TensorBoard events, the one daemon that logs `learner.step` and `eval` records (two writers
 * of one directory would each start their own event file). */
#ifndef QUILLAN_DAEMON_LOG_H
#define QUILLAN_DAEMON_LOG_H

#include "config.h"
#include "error.h"
#include "net.h"

/* Flags of daemon_log_new. */
#define DAEMON_LOG_TENSORBOARD 1u /* add the logging.tensorboard sink when the key is set */

typedef struct daemon_log daemon_log_t;

/* Names the process in every record (process, copied by log_init), sets the level and adds the
 * sinks that cfg asks for (file first, then TensorBoard). cfg must be validated
 * (config_validate) and outlive the handle. Returns the handle, or NULL with err naming the key
 * ("logging.file: <why>", "logging.tensorboard: <why>") after removing any sink it added; the
 * process name and level stay set either way. */
daemon_log_t *daemon_log_new(const quillan_config_t *cfg, const char *process, unsigned flags,
                             qerr_t *err);

/* When logging.hub is on, connects the log publisher to network.log_in with opt (its HWM bounds
 * the queue) and the client side of cfg's security, as sender_id (copied) with a new
 * incarnation; does nothing when it is off. At most once per handle. Returns 0, or -1 with err
 * as security or log_pub_new set it. zctx must outlive the handle: destroy the handle before
 * zmq_ctx_term(zctx). */
int daemon_log_publish(daemon_log_t *dl, void *zctx, const net_options_t *opt,
                       const char *sender_id, qerr_t *err);

/* Removes the publisher, the TensorBoard sink and the log file, in that order (records go on to
 * stderr only), frees the handle and sets *dl to NULL; safe when *dl is NULL. */
void daemon_log_destroy(daemon_log_t **dl);

#endif
