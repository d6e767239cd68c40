/* The learner's dispatcher: the ROUTER of the dispatch protocol (proto/dispatch.proto,
 * ARCHITECTURE.md §2-§3) that hands prompts to rollout workers and takes their groups back.
 *
 * Two layers, both here:
 *
 *   lease_table_t  the bookkeeping, without sockets or clocks (the caller passes `now` in
 *                  seconds of any monotonic clock): the dataset order (epochs, shuffling by a
 *                  seed, the data position), the lease table, the accepted set, admission,
 *                  time-outs, re-leases, serialisation for checkpoints.
 *   dispatcher_t   the socket: WorkRequest -> Lease, TrajectoryGroup -> Ack, Heartbeats both
 *                  ways (Paranoid Pirate), the worker table, prompts read from a JSONL dataset
 *                  and tokenized, accepted groups handed to the caller's callback.
 *
 * Units and leases. The unit of work is (prompt_id, epoch); prompt_id is the example index in
 * the dataset. Every RolloutRequest gets its own lease id, never reused: ids count up from 1,
 * and a restored table goes on from the next multiple of 2^32, above any id the dead
 * incarnation may have granted after its state was saved (a group under such a lease is
 * UNKNOWN_LEASE, or DUPLICATE once its unit is accepted: its unit was not leased in the saved
 * state, so the restored table leases it afresh). The lease id is the
 * GROUP ID of TRAINING.md §Rewards: the same prompt leased twice (a re-lease, another epoch)
 * gets two different ids. Exactly once per unit: the first valid group to arrive for a unit
 * under any lease the unit was given (the current one or an expired one) is accepted; any
 * later copy is a DUPLICATE. A lease id never issued, or one whose unit was accepted under
 * another lease id that the table no longer remembers, is UNKNOWN_LEASE / DUPLICATE as below.
 *
 * Lease life: ACTIVE until its deadline, its worker dies, or it brings back an invalid group;
 * then EXPIRED and its unit goes to the re-lease queue, which is served before fresh units. An
 * EXPIRED lease stays in the table (so its late group is still accepted when it comes first)
 * until its unit is accepted; then every lease of the unit is forgotten.
 *
 * Admission: at most `limit` ACTIVE leases (lease_table_set_limit / dispatcher_set_lease_limit).
 * The batcher computes it: (max_staleness + 1) x batch_groups minus the groups it holds, i.e.
 * batcher_lease_room(b, 0) (learner/batcher.h). Groups accepted but not yet trained are the
 * batcher's to keep (batcher_save); the dispatcher's state says they were accepted.
 *
 * Sampling: every RolloutRequest carries the run's sampling parameters with seed =
 * rng_hash({run seed, epoch}), so a re-lease of a unit draws the same random numbers (the
 * sampler keys them by seed, prompt_id and sample index, MODEL.md) and another epoch of the same
 * prompt draws fresh ones. min_version is the latest published version at lease time. */
#ifndef QUILLAN_DISPATCHER_H
#define QUILLAN_DISPATCHER_H

#include "dispatch_codec.h"
#include "jsonl.h"
#include "net.h"
#include "tokenizer.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* ---- Lease table ---------------------------------------------------------------------- */

typedef struct {
    uint64_t n_prompts;   /* units per epoch (>= 1) */
    bool shuffle;         /* false: dataset order every epoch */
    uint64_t seed;        /* shuffle seed (data.seed): epoch e's order is a function of (seed, e) */
    uint64_t fingerprint; /* dataset identity (jsonl_reader_fingerprint), checked on restore */
    uint64_t max_epochs;  /* no fresh units from this epoch on; 0 = unbounded */
} lease_table_options_t;

/* A granted lease. */
typedef struct {
    uint64_t lease_id, prompt_id, epoch;
    bool relet; /* the unit was leased before and its lease expired */
} lease_grant_t;

typedef enum {
    LEASE_ACCEPTED = 0, /* first group of its unit: hand it on */
    LEASE_DUPLICATE,    /* its unit was already accepted */
    LEASE_UNKNOWN,      /* no such lease, and its unit is not accepted */
    LEASE_REJECTED,     /* invalid group, or one whose unit differs from the lease's */
    LEASE_VERDICT_COUNT
} lease_verdict_t;

/* "accepted" | "duplicate" | "unknown_lease" | "rejected". */
const char *lease_verdict_name(lease_verdict_t v);

/* Counters; all but the gauges are cumulative and survive save/restore. */
typedef struct {
    uint64_t granted;    /* leases handed out, re-leases included */
    uint64_t relet;      /* ... of which re-leases of an expired unit */
    uint64_t expired;    /* leases past their deadline */
    uint64_t released;   /* leases expired early: worker dead or restarted (lease_table_release) */
    uint64_t accepted;   /* units accepted */
    uint64_t duplicates; /* groups dropped as DUPLICATE */
    uint64_t unknown;    /* groups dropped as UNKNOWN_LEASE */
    uint64_t rejected;   /* groups dropped as REJECTED */
    /* gauges */
    uint64_t active;      /* ACTIVE leases */
    uint64_t expired_now; /* EXPIRED leases still remembered */
    uint64_t queued;      /* units waiting for a re-lease */
    uint64_t epoch;       /* data position: epoch of the next fresh unit */
    uint64_t position;    /* data position: its index in that epoch's order */
    uint64_t done_epochs; /* epochs whose every unit is accepted */
} lease_table_stats_t;

typedef struct lease_table lease_table_t;

/* An empty table at epoch 0, position 0. NULL with err (QERR_RANGE: n_prompts 0; QERR_NOMEM). */
lease_table_t *lease_table_new(const lease_table_options_t *o, qerr_t *err);
void lease_table_destroy(lease_table_t **t);

/* Admission: at most limit ACTIVE leases (default 0: nothing is granted until the caller sets
 * it). Lowering it below the ACTIVE count revokes nothing; it only stops new grants. */
void lease_table_set_limit(lease_table_t *t, uint64_t limit);
uint64_t lease_table_limit(const lease_table_t *t);

/* Grants up to n leases to owner (a caller-chosen worker handle, for lease_table_release), each
 * ACTIVE until now_s + timeout_s and tagged with the policy version it was leased under:
 * re-lease queue first (oldest expiry first), then fresh units in data order. Writes them to
 * out[0..returned) and returns how many (0 when admission or the data is exhausted). */
size_t lease_table_grant(lease_table_t *t, uint64_t owner, size_t n, double now_s, double timeout_s,
                         uint64_t version, lease_grant_t *out);

/* Expires every ACTIVE lease whose deadline is <= now_s; returns how many. */
size_t lease_table_expire(lease_table_t *t, double now_s);

/* Expires every ACTIVE lease of owner now (its worker died or restarted); returns how many. */
size_t lease_table_release(lease_table_t *t, uint64_t owner);

/* Judges a returned group (lease_id, prompt_id, epoch as the group states them; valid = it
 * passed validation). ACCEPTED marks the unit, forgets its leases and writes into *leased_s
 * and *version (may be NULL) the seconds since the accepted lease was granted (negative when
 * granted before a restore) and the version it was leased under. REJECTED on a known lease
 * expires it at once (its unit is re-leased). See the file comment for the other verdicts. */
lease_verdict_t lease_table_submit(lease_table_t *t, uint64_t lease_id, uint64_t prompt_id,
                                   uint64_t epoch, bool valid, double now_s, double *leased_s,
                                   uint64_t *version);

/* The verdict lease_table_submit would give the same group now, changing nothing (no state, no
 * counter): for a caller that must hand an ACCEPTED group on before the table marks its unit,
 * and submits only once it knows the group was taken. On ACCEPTED it writes *leased_s and
 * *version as submit does. */
lease_verdict_t lease_table_check(const lease_table_t *t, uint64_t lease_id, uint64_t prompt_id,
                                  uint64_t epoch, bool valid, double now_s, double *leased_s,
                                  uint64_t *version);

/* 1 when (prompt_id, epoch) has been accepted. */
int lease_table_is_accepted(const lease_table_t *t, uint64_t prompt_id, uint64_t epoch);

/* 1 when lease_id is ACTIVE. */
int lease_table_is_active(const lease_table_t *t, uint64_t lease_id);

/* 1 when max_epochs is set and every unit of every epoch is accepted. */
int lease_table_finished(const lease_table_t *t);

/* The next epoch's order would start here: the prompt id at `position` of epoch e's order. */
uint64_t lease_table_order(const lease_table_t *t, uint64_t epoch, uint64_t position);

void lease_table_stats(const lease_table_t *t, lease_table_stats_t *out);

/* Serialises the table (options, data position, accepted set, every remembered lease,
 * counters) into a malloc'd buffer of little-endian 64-bit words (*buf owned by the caller:
 * free; store it e.g. as a U8 or U64 safetensors tensor). -1 with QERR_NOMEM. */
int lease_table_save(const lease_table_t *t, uint8_t **buf, size_t *len, qerr_t *err);

/* A table restored from a lease_table_save buffer, for a learner that restarted (new
 * incarnation): every lease it held becomes EXPIRED (its worker dropped it on seeing the
 * restart) and its unit is queued for a re-lease at once, while a group that still arrives
 * under that lease id is accepted when its unit is not (nothing lost, nothing counted twice).
 * o must describe the same dataset (n_prompts, shuffle, seed, fingerprint); max_epochs may
 * differ. The limit starts at 0. NULL with err: QERR_VERSION (format), QERR_PARSE (truncated,
 * naming the word offset), QERR_INVALID (another dataset, inconsistent contents), QERR_NOMEM. */
lease_table_t *lease_table_restore(const lease_table_options_t *o, const uint8_t *buf, size_t len,
                                   qerr_t *err);

/* ---- Dispatcher ----------------------------------------------------------------------- */

/* Default seconds of the first lease time-out under network.lease_timeout_s = 0, before any
 * group time was measured: a first group on a CPU worker can take minutes, and dead workers
 * are caught by heartbeats anyway, so a long first time-out only delays recovery from a worker
 * that is alive but stuck. Afterwards: max(DISPATCHER_LEASE_TIMEOUT_MIN_S, 4 x the mean time
 * from lease to accepted group). */
#define DISPATCHER_LEASE_TIMEOUT_FIRST_S 600.0
#define DISPATCHER_LEASE_TIMEOUT_MIN_S 30.0
/* Workers remembered at once; the longest-dead one is forgotten to make room. */
#define DISPATCHER_MAX_WORKERS 4096
#define DISPATCHER_ID_MAX 128

/* What the callback gets with a group (see dispatcher_group_fn). */
typedef struct {
    uint64_t lease_id;      /* the group id */
    uint64_t lease_version; /* latest policy version when it was leased */
    double leased_s;        /* seconds from lease to acceptance (< 0: leased before a restore) */
    const char *worker_id;  /* the sending worker's id */
    uint64_t worker_incarnation;
} dispatcher_group_info_t;

/* Called from dispatcher_poll, on its thread, for every group the lease table would accept,
 * before it marks the unit accepted. g and info are valid only during the call: copy what you
 * keep (batcher_add copies). Returns 0 when the caller took the group (kept it, or consumed it
 * on purpose, e.g. filtered it out): the unit is then accepted and the worker answered
 * ACCEPTED. Returns -1 when the caller refused it (it cannot take it now: a policy version
 * ahead of its own, out of memory) and keeps nothing of it: the worker is answered REJECTED,
 * the lease expires and the unit is leased again, so a refusal never loses a unit. */
typedef int (*dispatcher_group_fn)(void *ctx, const Quillan__TrajectoryGroup *g,
                                   const dispatcher_group_info_t *info);

typedef struct {
    const char *endpoint;    /* bind address (network.dispatcher) */
    const char *sender_id;   /* this process's stable id; copied */
    uint64_t incarnation_id; /* net_incarnation_new() of this process start */
    net_options_t net;
    net_security_t security;
    /* Received messages are checked against these (dispatch_codec_validate); max_group_size is
     * also the G of every request, and a group must bring exactly that many trajectories.
     * max_prompt_tokens bounds BOS + prompt: every dataset prompt is checked at _new. */
    dispatch_codec_limits_t limits;
    /* Dataset (borrowed; must outlive the dispatcher): RL lines of data.train. A prompt is
     * BOS + tokenizer_encode(prompt); its metadata is the line's other fields. */
    const jsonl_reader_t *data;
    const tokenizer_t *tokenizer;
    bool shuffle;        /* data.shuffle */
    uint64_t data_seed;  /* data.seed */
    uint64_t max_epochs; /* 0 = unbounded */
    /* Sampling parameters of every request (rollout.*); seed is the run seed (learner.seed). */
    float temperature, top_p;
    uint32_t top_k, max_new_tokens;
    uint64_t seed;
    double heartbeat_ivl_s;       /* network.heartbeat_ivl_s, > 0 */
    int heartbeat_liveness;       /* network.heartbeat_liveness, >= 1 */
    double lease_timeout_s;       /* network.lease_timeout_s; 0 = automatic (see above) */
    dispatcher_group_fn on_group; /* required */
    void *on_group_ctx;
} dispatcher_options_t;

/* Which worker did what; a row of dispatcher_workers. */
typedef struct {
    char id[DISPATCHER_ID_MAX];   /* worker_id (Envelope.sender_id) */
    char host[DISPATCHER_ID_MAX]; /* as the worker reported it; "" before its WorkRequest */
    uint64_t incarnation;
    bool alive;                /* heard from within heartbeat_liveness intervals */
    double last_seen_s;        /* seconds ago */
    uint64_t snapshot_version; /* as last reported */
    uint64_t leases;           /* ACTIVE leases it holds */
    uint64_t groups_done;      /* groups of it accepted */
    uint64_t restarts;         /* incarnation changes seen */
    double tokens_per_s;       /* completion tokens / gen_seconds of its accepted groups (moving
                                  average); 0 before the first or when it reports no time */
} dispatcher_worker_t;

typedef struct {
    lease_table_stats_t table;
    uint64_t work_requests; /* WorkRequests received */
    uint64_t leases_sent;   /* Lease messages sent (empty ones included) */
    uint64_t heartbeats_sent;
    uint64_t heartbeats_received;
    uint64_t acks_sent;
    uint64_t errors_received; /* Error bodies from workers */
    uint64_t malformed;       /* messages dropped here: failed validation (groups are Acked
                                 REJECTED instead), bodies a worker never sends */
    uint64_t refused;         /* groups on_group refused: Acked REJECTED, their units re-leased
                                 (also counted in table.rejected) */
    uint64_t send_failed;     /* replies libzmq refused (peer gone, queue full) */
    uint64_t workers_alive, workers_dead;
    uint64_t workers_died;    /* liveness expiries seen */
    uint64_t worker_restarts; /* incarnation changes of known workers */
    double lease_timeout_s;   /* the time-out now given to new leases */
    net_stats_t net;
} dispatcher_stats_t;

typedef struct dispatcher dispatcher_t;

/* Fills o with defaults: endpoint "tcp://127.0.0.1:5555", sender "learner", a fresh
 * incarnation, net_options_init, no security, heartbeat 1 s x 5, automatic lease time-out,
 * shuffle on with seed 1234, unbounded epochs, temperature 1, top_p 1, top_k 0, 256 new
 * tokens; limits, data, tokenizer and on_group are the caller's. */
void dispatcher_options_init(dispatcher_options_t *o);

/* Creates the ROUTER in zctx and binds it; checks every dataset prompt (it parses and BOS +
 * its tokens fit limits.max_prompt_tokens: errors name PATH:LINE). state: NULL for a fresh
 * start, or a lease_table_save buffer (dispatcher_save) to resume from (same dataset).
 * NULL with err. The lease limit starts at 0: set it before workers can get anything. */
dispatcher_t *dispatcher_new(void *zctx, const dispatcher_options_t *o, const uint8_t *state,
                             size_t state_len, qerr_t *err);
void dispatcher_destroy(dispatcher_t **d);

const char *dispatcher_endpoint(const dispatcher_t *d);
/* The socket, to poll beside others (ZMQ_POLLIN); then call dispatcher_poll(d, 0). */
void *dispatcher_handle(dispatcher_t *d);

/* Serves the socket: waits up to timeout_ms (0: do not wait, -1: forever) for the first
 * message, handles every message already queued, then the timed duties: expires leases, marks
 * silent workers dead and re-leases their leases, answers parked WorkRequests, sends due
 * heartbeats. Call it at least every heartbeat interval (from a thread of its own when a
 * training step takes longer: the other functions here may be called from any thread). Returns
 * the number of messages handled (>= 0), or -1 with err on a socket failure or a dataset line
 * that no longer reads. */
int dispatcher_poll(dispatcher_t *d, int timeout_ms, qerr_t *err);

/* Admission limit on ACTIVE leases (see lease_table_set_limit). Thread-safe. */
void dispatcher_set_lease_limit(dispatcher_t *d, uint64_t limit);

/* The versions announced in heartbeats and leases: latest published snapshot and the current
 * old policy. Thread-safe. */
void dispatcher_set_versions(dispatcher_t *d, uint64_t latest, uint64_t old_policy);

/* Serialises the lease table (lease_table_save). Thread-safe: take it at the same moment as the
 * batcher's state, so that together they hold every accepted group. */
int dispatcher_save(dispatcher_t *d, uint8_t **buf, size_t *len, qerr_t *err);

/* 1 when max_epochs is set and every unit is accepted. Thread-safe. */
int dispatcher_finished(dispatcher_t *d);

/* Thread-safe copies. dispatcher_workers writes up to cap rows and returns the number of
 * workers known. */
void dispatcher_stats(dispatcher_t *d, dispatcher_stats_t *out);
size_t dispatcher_workers(dispatcher_t *d, dispatcher_worker_t *out, size_t cap);

#endif
