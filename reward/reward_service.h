/* A reward service: a ROUTER socket answering RewardRequest with RewardResponse
 * (reward/PROTOCOL.md), scoring each request with a caller-supplied function. `quillan-reward`
 * runs it with the built-in scorers (reward/scorers.h); a C program can serve its own scorer.
 *
 * Every request gets exactly one reply: one ScoreEntry per sample ("no reward" = score unset),
 * or RewardResponse.error when the scorer fails for the request as a whole. Malformed messages
 * (bad frames, another protocol version, undecodable or invalid envelopes) are dropped and
 * counted by common/net.h; well-formed messages that are not requests (a RewardResponse or an
 * Error sent to the service) are dropped and counted here. None of them stops the service.
 *
 * Logs: "reward.request" (debug) per request with samples, no_reward and latency_ms;
 * "reward.stats" (info) every REWARD_SERVICE_STATS_INTERVAL_S while requests arrive; and
 * "reward.stop" (info) with every counter when reward_service_run returns. */
#ifndef QUILLAN_REWARD_SERVICE_H
#define QUILLAN_REWARD_SERVICE_H

#include "config.h"
#include "net.h"
#include "scorers.h"

#include <signal.h>
#include <stdint.h>

/* Bytes of one ScoreEntry.detail, NUL included. */
#define REWARD_SERVICE_DETAIL_MAX 160
/* Seconds between "reward.stats" records. */
#define REWARD_SERVICE_STATS_INTERVAL_S 10.0

/* Scores batch into out[batch->n_samples] and, when detail is non-NULL, writes a NUL-terminated
 * explanation of sample i at detail + i * detail_cap. Returns 0, or -1 with err when the request
 * cannot be scored as a whole (then the client gets RewardResponse.error = err->msg). */
typedef int (*reward_score_fn)(void *ctx, const reward_batch_t *batch, reward_score_t *out,
                               char *detail, size_t detail_cap, qerr_t *err);

typedef struct {
    uint64_t requests;     /* answered with scores */
    uint64_t failed;       /* answered with RewardResponse.error */
    uint64_t unexpected;   /* well-formed non-request messages, dropped */
    uint64_t reply_failed; /* replies libzmq refused (client gone, queue full) */
    uint64_t samples;      /* samples scored */
    uint64_t no_reward;    /* of which "no reward" */
    double latency_sum_s;  /* receive-to-reply time summed over answered requests */
    double latency_max_s;  /* and its maximum */
    net_stats_t net;       /* the socket's counters: malformed messages dropped by reason */
} reward_service_stats_t;

typedef struct reward_service reward_service_t;

/* Binds a ROUTER at endpoint ("tcp://127.0.0.1:5557"; port "*" picks a free one) with the
 * options of cfg's network section. score(ctx, ...) answers every request; ctx must outlive
 * the service. zctx is the caller's ZeroMQ context. Returns NULL with err (bind failure, bad
 * options). Without CURVE (security.curve false) a non-loopback address needs
 * security.bind_any; the refusal names the key. */
reward_service_t *reward_service_new(void *zctx, const quillan_config_t *cfg, const char *endpoint,
                                     reward_score_fn score, void *ctx, qerr_t *err);

/* The bound endpoint with the port resolved. */
const char *reward_service_endpoint(const reward_service_t *s);

/* Waits up to timeout_ms (-1 forever) for requests and answers every one that is ready.
 * Returns the number answered (0 when the time ran out or a signal arrived), or -1 with err on
 * a socket failure. */
int reward_service_poll(reward_service_t *s, int timeout_ms, qerr_t *err);

/* Serves until *stop becomes non-zero (set it from a SIGINT/SIGTERM handler), then logs
 * "reward.stop". Returns 0, or -1 with err on a socket failure. */
int reward_service_run(reward_service_t *s, const volatile sig_atomic_t *stop, qerr_t *err);

/* Copies the counters. */
void reward_service_stats(reward_service_t *s, reward_service_stats_t *out);

/* Closes the socket and sets *s to NULL; safe when *s is NULL. */
void reward_service_destroy(reward_service_t **s);

/* reward_score_fn adapter for the built-in scorers: ctx is a const reward_scorers_t *. */
int reward_service_builtin_score(void *ctx, const reward_batch_t *batch, reward_score_t *out,
                                 char *detail, size_t detail_cap, qerr_t *err);

/* net_options_t from cfg's network section (max_msg_bytes, heartbeats), shared by the reward
 * service and client. */
void reward_net_options(const quillan_config_t *cfg, net_options_t *o);

#endif
