/* The reward client used by rollout workers (and eval): sends one batch (a group's samples and
 * its metadata) to every configured reward service (reward.services) and combines the answers.
 *
 * Lazy Pirate, per service (zguide ch. 4; reward/PROTOCOL.md "Timeouts and retries"): one DEALER
 * per service; every attempt carries a fresh request_id and waits reward.timeout_s for the
 * reply whose request_id matches it (any other reply is late or foreign and is discarded and
 * counted). After a timeout the socket is closed and a fresh one connected (so a reply to the
 * old attempt can never be mistaken for a new one), the client backs off (reward.backoff_min_s,
 * doubling up to reward.backoff_max_s) and resends, at most reward.retries times. The services
 * are called in parallel; each keeps its own attempts and back-off.
 *
 * Combination: the reward of sample i is sum_j weight_j x score_j(i); if any service says
 * "no reward" for sample i, sample i has no reward. A service that does not answer after its
 * retries makes the whole call fail with QERR_TIMEOUT: nothing is scored, and in particular
 * nothing becomes 0. The caller keeps the group, backs off and calls again later.
 *
 * A client is used from one thread at a time (ZeroMQ sockets are not thread-safe). */
#ifndef QUILLAN_REWARD_CLIENT_H
#define QUILLAN_REWARD_CLIENT_H

#include "config.h"
#include "scorers.h"

#include <signal.h>
#include <stddef.h>
#include <stdint.h>

/* The outcome of one call. An embedded struct: reward_result_init, then reward_client_score
 * (re)fills it, reward_result_free releases it. */
typedef struct {
    size_t n_samples, n_services;
    reward_score_t *total; /* [n_samples]: weighted sum, or no reward */
    reward_score_t *parts; /* [n_services x n_samples]: service j's own (unweighted) score of
                              sample i at parts[j * n_samples + i] (reward_parts) */
} reward_result_t;

void reward_result_init(reward_result_t *r);
/* Frees the arrays and zeroes r; safe to call twice. */
void reward_result_free(reward_result_t *r);

typedef struct {
    uint64_t calls;         /* reward_client_score calls */
    uint64_t failed_calls;  /* calls that returned -1 */
    uint64_t attempts;      /* requests sent, retries included */
    uint64_t timeouts;      /* attempts that timed out */
    uint64_t late_replies;  /* replies discarded: request_id of an earlier attempt */
    uint64_t error_replies; /* replies carrying RewardResponse.error or an Error */
} reward_client_stats_t;

typedef struct reward_client reward_client_t;

/* Creates a client for cfg->reward (services, timeout_s, retries, back-off) with its own
 * ZeroMQ context, and connects to every service (libzmq connects in the background, so a
 * service that is not up yet is not an error here). sender_id names this process in every
 * Envelope (NULL: "quillan-reward-client"). cfg is copied. Returns NULL with err (no services,
 * bad options). */
reward_client_t *reward_client_new(const quillan_config_t *cfg, const char *sender_id, qerr_t *err);

/* Closes the sockets and the context and sets *c to NULL; safe when *c is NULL. */
void reward_client_destroy(reward_client_t **c);

/* When *stop becomes non-zero (a signal handler sets it), a call in progress gives up at its
 * next wake-up (within 100 ms) with QERR_TIMEOUT. NULL: never. */
void reward_client_set_stop(reward_client_t *c, const volatile sig_atomic_t *stop);

/* Scores in (1 <= n_samples <= REWARD_MAX_SAMPLES) with every service and fills *out
 * (previous contents freed). Returns 0, or -1 with err and *out emptied:
 *   QERR_TIMEOUT  a service did not answer after reward.retries retries (or stop was set);
 *   QERR_INVALID  a service answered with an error (RewardResponse.error or Error), or the
 *                 request cannot be encoded (bad UTF-8);
 *   QERR_RANGE    the request is larger than network.max_msg_bytes;
 *   QERR_NOMEM.
 * The message names the service ("reward service 'math' (tcp://...)"). */
int reward_client_score(reward_client_t *c, const reward_batch_t *in, reward_result_t *out,
                        qerr_t *err);

size_t reward_client_n_services(const reward_client_t *c);
/* The service's name (reward.services[j].name, or its address when the name is ""). */
const char *reward_client_service_name(const reward_client_t *c, size_t j);

void reward_client_stats(const reward_client_t *c, reward_client_stats_t *out);

#endif
