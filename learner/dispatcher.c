#include "dispatcher.h"

#include "log.h"
#include "rng.h"

#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <zmq.h>

/* ==== Lease table ======================================================================== */

/* Domain tag of the dataset order stream ("ORDR"). */
#define LEASE_TAG_ORDER 0x4F524452ULL
/* Saved state: magic ("QLEASES1" read as little-endian bytes) and format version. */
#define LEASE_STATE_MAGIC 0x3153455341454C51ULL
#define LEASE_STATE_VERSION 1u
#define LEASE_STATE_HEADER_WORDS 21u
#define LEASE_STATE_ENTRY_WORDS 4u
#define LEASE_STATE_UNIT_WORDS 2u
#define LEASE_EPOCH_MAX (UINT64_C(1) << 62) /* restored states beyond it are refused */
/* A restored table counts lease ids on from the next multiple of 2^32. */
#define LEASE_ID_GENERATION_BITS 32

typedef enum { ENTRY_ACTIVE = 0, ENTRY_EXPIRED } entry_state_t;

typedef struct {
    uint64_t lease_id, prompt_id, epoch, owner, version;
    double granted_s; /* NaN: granted before a restore */
    double deadline_s;
    entry_state_t state;
} entry_t;

typedef struct {
    uint64_t prompt_id, epoch;
} unit_t;

struct lease_table {
    lease_table_options_t o;
    uint64_t limit;
    uint64_t next_lease_id;
    uint64_t epoch, position; /* the next fresh unit */
    uint64_t *perm;           /* [n_prompts] order of perm_epoch (shuffle only) */
    uint64_t perm_epoch;
    bool perm_valid;
    /* Accepted set: every unit of epochs < done_epochs, and bits[k * words ..] for epoch
     * done_epochs + k, k < n_open (n_acc[k] bits set). */
    uint64_t done_epochs;
    size_t n_open, cap_open, words;
    uint64_t *bits, *n_acc;
    /* Remembered leases (in lease id order, so expiries queue oldest first) and the re-lease
     * queue (FIFO). Every queued unit has at
     * least one EXPIRED entry, so n_queue <= n_entries and both arrays share one capacity. */
    entry_t *entries;
    unit_t *queue;
    size_t n_entries, n_queue, cap;
    uint64_t n_active;
    lease_table_stats_t c; /* cumulative counters only */
};

const char *lease_verdict_name(lease_verdict_t v) {
    static const char *const names[LEASE_VERDICT_COUNT] = {"accepted", "duplicate", "unknown_lease",
                                                           "rejected"};
    return v < LEASE_VERDICT_COUNT ? names[v] : "unknown";
}

static void perm_fill(const lease_table_options_t *o, uint64_t epoch, uint64_t *perm) {
    for (uint64_t i = 0; i < o->n_prompts; i++)
        perm[i] = i;
    rng_stream_t s;
    rng_stream_init(&s, LEASE_TAG_ORDER, o->seed, epoch);
    for (uint64_t i = o->n_prompts; i > 1; i--) {
        uint64_t j = rng_stream_next_u64(&s) % i;
        uint64_t tmp = perm[i - 1];
        perm[i - 1] = perm[j];
        perm[j] = tmp;
    }
}

static uint64_t order_at(lease_table_t *t, uint64_t epoch, uint64_t position) {
    if (!t->o.shuffle)
        return position;
    if (!t->perm_valid || t->perm_epoch != epoch) {
        perm_fill(&t->o, epoch, t->perm);
        t->perm_epoch = epoch;
        t->perm_valid = true;
    }
    return t->perm[position];
}

uint64_t lease_table_order(const lease_table_t *t, uint64_t epoch, uint64_t position) {
    Q_ASSERT(position < t->o.n_prompts);
    if (!t->o.shuffle)
        return position;
    if (t->perm_valid && t->perm_epoch == epoch)
        return t->perm[position];
    uint64_t *perm = malloc(t->o.n_prompts * sizeof *perm);
    Q_ASSERT(perm != NULL);
    perm_fill(&t->o, epoch, perm);
    uint64_t id = perm[position];
    free(perm);
    return id;
}

lease_table_t *lease_table_new(const lease_table_options_t *o, qerr_t *err) {
    Q_ASSERT(o);
    if (o->n_prompts == 0 || o->n_prompts > (UINT64_MAX >> 8)) {
        qerr_set(err, QERR_RANGE, "lease table: %llu prompts (need at least 1)",
                 (unsigned long long)o->n_prompts);
        return NULL;
    }
    lease_table_t *t = calloc(1, sizeof *t);
    if (t == NULL) {
        qerr_set(err, QERR_NOMEM, "lease table: out of memory");
        return NULL;
    }
    t->o = *o;
    t->next_lease_id = 1;
    t->words = (size_t)((o->n_prompts + 63) / 64);
    if (o->shuffle) {
        t->perm = malloc((size_t)o->n_prompts * sizeof *t->perm);
        if (t->perm == NULL) {
            qerr_set(err, QERR_NOMEM, "lease table: out of memory for %llu prompts",
                     (unsigned long long)o->n_prompts);
            lease_table_destroy(&t);
            return NULL;
        }
    }
    return t;
}

void lease_table_destroy(lease_table_t **tp) {
    if (tp == NULL || *tp == NULL)
        return;
    lease_table_t *t = *tp;
    free(t->perm);
    free(t->bits);
    free(t->n_acc);
    free(t->entries);
    free(t->queue);
    free(t);
    *tp = NULL;
}

void lease_table_set_limit(lease_table_t *t, uint64_t limit) {
    t->limit = limit;
}

uint64_t lease_table_limit(const lease_table_t *t) {
    return t->limit;
}

static int reserve(lease_table_t *t, size_t n) {
    if (t->n_entries + n <= t->cap)
        return 0;
    size_t cap = t->cap ? t->cap : 16;
    while (cap < t->n_entries + n)
        cap *= 2;
    entry_t *e = realloc(t->entries, cap * sizeof *e);
    if (e == NULL)
        return -1;
    t->entries = e;
    unit_t *q = realloc(t->queue, cap * sizeof *q);
    if (q == NULL)
        return -1;
    t->queue = q;
    t->cap = cap;
    return 0;
}

/* Makes epoch (>= done_epochs) an open epoch (it gets its first lease). */
static int epoch_open(lease_table_t *t, uint64_t epoch) {
    Q_ASSERT(epoch >= t->done_epochs);
    while (epoch - t->done_epochs >= t->n_open) {
        if (t->n_open == t->cap_open) {
            size_t cap = t->cap_open ? 2 * t->cap_open : 2;
            uint64_t *bits = realloc(t->bits, cap * t->words * sizeof *bits);
            if (bits == NULL)
                return -1;
            t->bits = bits;
            uint64_t *n_acc = realloc(t->n_acc, cap * sizeof *n_acc);
            if (n_acc == NULL)
                return -1;
            t->n_acc = n_acc;
            t->cap_open = cap;
        }
        memset(t->bits + t->n_open * t->words, 0, t->words * sizeof *t->bits);
        t->n_acc[t->n_open] = 0;
        t->n_open++;
    }
    return 0;
}

int lease_table_is_accepted(const lease_table_t *t, uint64_t prompt_id, uint64_t epoch) {
    if (prompt_id >= t->o.n_prompts)
        return 0;
    if (epoch < t->done_epochs)
        return 1;
    uint64_t k = epoch - t->done_epochs;
    if (k >= t->n_open)
        return 0;
    return (int)((t->bits[k * t->words + prompt_id / 64] >> (prompt_id % 64)) & 1u);
}

static bool fresh_left(const lease_table_t *t) {
    return t->o.max_epochs == 0 || t->epoch < t->o.max_epochs;
}

size_t lease_table_grant(lease_table_t *t, uint64_t owner, size_t n, double now_s, double timeout_s,
                         uint64_t version, lease_grant_t *out) {
    if (t->n_active >= t->limit)
        return 0;
    if ((uint64_t)n > t->limit - t->n_active)
        n = (size_t)(t->limit - t->n_active);
    if (reserve(t, n) != 0)
        return 0;
    size_t k = 0;
    while (k < n) {
        unit_t u;
        bool relet = t->n_queue > 0;
        if (relet) {
            u = t->queue[0];
            memmove(t->queue, t->queue + 1, (t->n_queue - 1) * sizeof *t->queue);
            t->n_queue--;
        } else if (fresh_left(t)) {
            if (epoch_open(t, t->epoch) != 0)
                break;
            u.epoch = t->epoch;
            u.prompt_id = order_at(t, t->epoch, t->position);
            if (++t->position == t->o.n_prompts) {
                t->position = 0;
                t->epoch++;
            }
        } else {
            break;
        }
        entry_t *e = &t->entries[t->n_entries++];
        *e = (entry_t){.lease_id = t->next_lease_id++,
                       .prompt_id = u.prompt_id,
                       .epoch = u.epoch,
                       .owner = owner,
                       .version = version,
                       .granted_s = now_s,
                       .deadline_s = now_s + timeout_s,
                       .state = ENTRY_ACTIVE};
        t->n_active++;
        t->c.granted++;
        t->c.relet += relet;
        out[k++] = (lease_grant_t){e->lease_id, e->prompt_id, e->epoch, relet};
    }
    return k;
}

/* ACTIVE -> EXPIRED, unit to the back of the re-lease queue (capacity: see struct). */
static void entry_expire(lease_table_t *t, entry_t *e) {
    Q_ASSERT(e->state == ENTRY_ACTIVE && t->n_queue < t->cap);
    e->state = ENTRY_EXPIRED;
    t->n_active--;
    t->queue[t->n_queue++] = (unit_t){e->prompt_id, e->epoch};
}

size_t lease_table_expire(lease_table_t *t, double now_s) {
    size_t n = 0;
    for (size_t i = 0; i < t->n_entries; i++) {
        entry_t *e = &t->entries[i];
        if (e->state == ENTRY_ACTIVE && e->deadline_s <= now_s) {
            entry_expire(t, e);
            n++;
        }
    }
    t->c.expired += n;
    return n;
}

size_t lease_table_release(lease_table_t *t, uint64_t owner) {
    size_t n = 0;
    for (size_t i = 0; i < t->n_entries; i++) {
        entry_t *e = &t->entries[i];
        if (e->state == ENTRY_ACTIVE && e->owner == owner) {
            entry_expire(t, e);
            n++;
        }
    }
    t->c.released += n;
    return n;
}

int lease_table_is_active(const lease_table_t *t, uint64_t lease_id) {
    for (size_t i = 0; i < t->n_entries; i++)
        if (t->entries[i].lease_id == lease_id)
            return t->entries[i].state == ENTRY_ACTIVE;
    return 0;
}

/* Moves every fully accepted leading epoch out of the open set. */
static void epochs_close(lease_table_t *t) {
    while (t->n_open > 0 && t->n_acc[0] == t->o.n_prompts) {
        memmove(t->bits, t->bits + t->words, (t->n_open - 1) * t->words * sizeof *t->bits);
        memmove(t->n_acc, t->n_acc + 1, (t->n_open - 1) * sizeof *t->n_acc);
        t->n_open--;
        t->done_epochs++;
    }
}

/* Marks the unit accepted, forgets its leases and its queue entry, closes finished epochs. */
static void unit_accept(lease_table_t *t, uint64_t prompt_id, uint64_t epoch) {
    uint64_t k = epoch - t->done_epochs;
    Q_ASSERT(epoch >= t->done_epochs && k < t->n_open);
    t->bits[k * t->words + prompt_id / 64] |= 1ull << (prompt_id % 64);
    t->n_acc[k]++;
    t->c.accepted++;
    for (size_t i = 0; i < t->n_entries;) {
        entry_t *e = &t->entries[i];
        if (e->prompt_id == prompt_id && e->epoch == epoch) {
            if (e->state == ENTRY_ACTIVE)
                t->n_active--;
            memmove(e, e + 1, (t->n_entries - i - 1) * sizeof *e);
            t->n_entries--;
        } else {
            i++;
        }
    }
    for (size_t i = 0; i < t->n_queue; i++) {
        if (t->queue[i].prompt_id == prompt_id && t->queue[i].epoch == epoch) {
            memmove(t->queue + i, t->queue + i + 1, (t->n_queue - i - 1) * sizeof *t->queue);
            t->n_queue--;
            break;
        }
    }
    epochs_close(t);
}

/* The verdict on a returned group, without changing anything: the rules of the file comment,
 * written once for lease_table_check and lease_table_submit. *e: the group's lease entry when
 * the table remembers it, else NULL. */
static lease_verdict_t judge(const lease_table_t *t, uint64_t lease_id, uint64_t prompt_id,
                             uint64_t epoch, bool valid, const entry_t **e) {
    *e = NULL;
    for (size_t i = 0; i < t->n_entries && *e == NULL; i++)
        if (t->entries[i].lease_id == lease_id)
            *e = &t->entries[i];
    if (*e == NULL)
        return lease_id != 0 && lease_id < t->next_lease_id &&
                       lease_table_is_accepted(t, prompt_id, epoch)
                   ? LEASE_DUPLICATE
                   : LEASE_UNKNOWN;
    if (!valid || (*e)->prompt_id != prompt_id || (*e)->epoch != epoch)
        return LEASE_REJECTED;
    return LEASE_ACCEPTED;
}

/* What an ACCEPTED verdict reports about lease entry e (both outputs may be NULL). */
static void accepted_info(const entry_t *e, double now_s, double *leased_s, uint64_t *version) {
    if (leased_s)
        *leased_s = isnan(e->granted_s) ? -1.0 : now_s - e->granted_s;
    if (version)
        *version = e->version;
}

lease_verdict_t lease_table_check(const lease_table_t *t, uint64_t lease_id, uint64_t prompt_id,
                                  uint64_t epoch, bool valid, double now_s, double *leased_s,
                                  uint64_t *version) {
    const entry_t *e;
    lease_verdict_t v = judge(t, lease_id, prompt_id, epoch, valid, &e);
    if (v == LEASE_ACCEPTED)
        accepted_info(e, now_s, leased_s, version);
    return v;
}

lease_verdict_t lease_table_submit(lease_table_t *t, uint64_t lease_id, uint64_t prompt_id,
                                   uint64_t epoch, bool valid, double now_s, double *leased_s,
                                   uint64_t *version) {
    const entry_t *found;
    lease_verdict_t v = judge(t, lease_id, prompt_id, epoch, valid, &found);
    if (v == LEASE_ACCEPTED) {
        accepted_info(found, now_s, leased_s, version);
        unit_accept(t, prompt_id, epoch);
    } else if (v == LEASE_DUPLICATE) {
        t->c.duplicates++;
    } else if (v == LEASE_UNKNOWN) {
        t->c.unknown++;
    } else {
        t->c.rejected++;
        entry_t *e = &t->entries[found - t->entries];
        if (e->state == ENTRY_ACTIVE)
            entry_expire(t, e);
    }
    return v;
}

int lease_table_finished(const lease_table_t *t) {
    return t->o.max_epochs != 0 && t->done_epochs >= t->o.max_epochs;
}

void lease_table_stats(const lease_table_t *t, lease_table_stats_t *out) {
    *out = t->c;
    out->active = t->n_active;
    out->expired_now = t->n_entries - t->n_active;
    out->queued = t->n_queue;
    out->epoch = t->epoch;
    out->position = t->position;
    out->done_epochs = t->done_epochs;
}

/* ---- state serialisation: little-endian 64-bit words ---- */

static void put_u64(uint8_t **p, uint64_t v) {
    for (int i = 0; i < 8; i++)
        (*p)[i] = (uint8_t)(v >> (8 * i));
    *p += 8;
}

static uint64_t get_u64(const uint8_t *buf, size_t word) {
    uint64_t v = 0;
    for (int i = 0; i < 8; i++)
        v |= (uint64_t)buf[word * 8 + (size_t)i] << (8 * i);
    return v;
}

int lease_table_save(const lease_table_t *t, uint8_t **buf, size_t *len, qerr_t *err) {
    size_t words = LEASE_STATE_HEADER_WORDS + t->n_open * t->words +
                   t->n_entries * LEASE_STATE_ENTRY_WORDS + t->n_queue * LEASE_STATE_UNIT_WORDS;
    uint8_t *out = malloc(words * 8);
    if (out == NULL)
        return qerr_set(err, QERR_NOMEM, "lease table: out of memory saving %zu words", words);
    uint8_t *p = out;
    const uint64_t header[LEASE_STATE_HEADER_WORDS] = {
        LEASE_STATE_MAGIC, LEASE_STATE_VERSION, t->o.n_prompts, t->o.shuffle,    t->o.seed,
        t->o.fingerprint,  t->next_lease_id,    t->epoch,       t->position,     t->done_epochs,
        t->n_open,         t->n_entries,        t->n_queue,     t->c.granted,    t->c.relet,
        t->c.expired,      t->c.released,       t->c.accepted,  t->c.duplicates, t->c.unknown,
        t->c.rejected};
    for (size_t i = 0; i < LEASE_STATE_HEADER_WORDS; i++)
        put_u64(&p, header[i]);
    for (size_t i = 0; i < t->n_open * t->words; i++)
        put_u64(&p, t->bits[i]);
    for (size_t i = 0; i < t->n_entries; i++) {
        put_u64(&p, t->entries[i].lease_id);
        put_u64(&p, t->entries[i].prompt_id);
        put_u64(&p, t->entries[i].epoch);
        put_u64(&p, t->entries[i].version);
    }
    for (size_t i = 0; i < t->n_queue; i++) {
        put_u64(&p, t->queue[i].prompt_id);
        put_u64(&p, t->queue[i].epoch);
    }
    *buf = out;
    *len = words * 8;
    return 0;
}

static bool queued(const lease_table_t *t, uint64_t prompt_id, uint64_t epoch) {
    for (size_t i = 0; i < t->n_queue; i++)
        if (t->queue[i].prompt_id == prompt_id && t->queue[i].epoch == epoch)
            return true;
    return false;
}

/* A unit of a saved entry or queue slot: inside the dataset, in an open epoch, not accepted. */
static int unit_check(const lease_table_t *t, uint64_t prompt_id, uint64_t epoch, const char *what,
                      size_t index, qerr_t *err) {
    if (prompt_id >= t->o.n_prompts || epoch < t->done_epochs ||
        epoch - t->done_epochs >= t->n_open || lease_table_is_accepted(t, prompt_id, epoch))
        return qerr_set(err, QERR_INVALID,
                        "lease state: %s %zu names prompt %llu of epoch %llu, which is not an "
                        "open, unaccepted unit",
                        what, index, (unsigned long long)prompt_id, (unsigned long long)epoch);
    return 0;
}

static int restore_body(lease_table_t *t, const uint8_t *buf, size_t n_words, qerr_t *err) {
    uint64_t h[LEASE_STATE_HEADER_WORDS];
    for (size_t i = 0; i < LEASE_STATE_HEADER_WORDS; i++)
        h[i] = get_u64(buf, i);
    if (h[0] != LEASE_STATE_MAGIC)
        return qerr_set(err, QERR_PARSE, "lease state: bad magic (not a dispatcher state)");
    if (h[1] != LEASE_STATE_VERSION)
        return qerr_set(err, QERR_VERSION, "lease state: format version %llu, this build reads %u",
                        (unsigned long long)h[1], LEASE_STATE_VERSION);
    if (h[2] != t->o.n_prompts || h[3] != (uint64_t)t->o.shuffle || h[4] != t->o.seed ||
        h[5] != t->o.fingerprint)
        return qerr_set(err, QERR_INVALID,
                        "lease state: saved for another dataset or order (%llu prompts, shuffle "
                        "%llu, seed %llu, fingerprint %016llx; now %llu, %d, %llu, %016llx)",
                        (unsigned long long)h[2], (unsigned long long)h[3],
                        (unsigned long long)h[4], (unsigned long long)h[5],
                        (unsigned long long)t->o.n_prompts, (int)t->o.shuffle,
                        (unsigned long long)t->o.seed, (unsigned long long)t->o.fingerprint);
    uint64_t n_open = h[10], n_entries = h[11], n_queue = h[12];
    /* Every count is bounded by the buffer's length before anything is allocated. */
    if (n_open > n_words || n_entries > n_words || n_queue > n_words ||
        LEASE_STATE_HEADER_WORDS + n_open * t->words + n_entries * LEASE_STATE_ENTRY_WORDS +
                n_queue * LEASE_STATE_UNIT_WORDS !=
            n_words)
        return qerr_set(err, QERR_PARSE,
                        "lease state: %zu words do not hold %llu open epochs, %llu leases and "
                        "%llu queued units",
                        n_words, (unsigned long long)n_open, (unsigned long long)n_entries,
                        (unsigned long long)n_queue);
    t->next_lease_id = h[6];
    t->epoch = h[7];
    t->position = h[8];
    t->done_epochs = h[9];
    /* Epoch counters near 2^64 would wrap in the epoch arithmetic; a real run never gets there
     * (2^62 epochs of at least one prompt each). */
    if (t->epoch > LEASE_EPOCH_MAX)
        return qerr_set(err, QERR_INVALID, "lease state: epoch %llu beyond %llu",
                        (unsigned long long)t->epoch, (unsigned long long)LEASE_EPOCH_MAX);
    if (t->next_lease_id == 0 || t->position >= t->o.n_prompts || t->done_epochs > t->epoch ||
        n_open > t->epoch - t->done_epochs + 1 ||
        (t->position == 0 && n_open + t->done_epochs > t->epoch))
        return qerr_set(err, QERR_INVALID,
                        "lease state: inconsistent data position (epoch %llu, position %llu, "
                        "%llu epochs done, %llu open)",
                        (unsigned long long)t->epoch, (unsigned long long)t->position,
                        (unsigned long long)t->done_epochs, (unsigned long long)n_open);
    t->c = (lease_table_stats_t){.granted = h[13],
                                 .relet = h[14],
                                 .expired = h[15],
                                 .released = h[16],
                                 .accepted = h[17],
                                 .duplicates = h[18],
                                 .unknown = h[19],
                                 .rejected = h[20]};
    size_t w = LEASE_STATE_HEADER_WORDS;
    if (n_open > 0 && epoch_open(t, t->done_epochs + n_open - 1) != 0)
        return qerr_set(err, QERR_NOMEM, "lease state: out of memory");
    for (size_t k = 0; k < n_open; k++) {
        uint64_t count = 0;
        for (size_t i = 0; i < t->words; i++) {
            uint64_t v = get_u64(buf, w++);
            if (i == t->words - 1 && t->o.n_prompts % 64 != 0 && (v >> (t->o.n_prompts % 64)) != 0)
                return qerr_set(err, QERR_INVALID,
                                "lease state: accepted set of epoch %llu names prompts past %llu",
                                (unsigned long long)(t->done_epochs + k),
                                (unsigned long long)t->o.n_prompts);
            t->bits[k * t->words + i] = v;
            count += (uint64_t)__builtin_popcountll(v);
        }
        t->n_acc[k] = count;
    }
    if (reserve(t, (size_t)n_entries + 1) != 0)
        return qerr_set(err, QERR_NOMEM, "lease state: out of memory for %llu leases",
                        (unsigned long long)n_entries);
    for (size_t i = 0; i < n_entries; i++) {
        entry_t e = {.lease_id = get_u64(buf, w),
                     .prompt_id = get_u64(buf, w + 1),
                     .epoch = get_u64(buf, w + 2),
                     .version = get_u64(buf, w + 3),
                     .granted_s = NAN,
                     .state = ENTRY_EXPIRED};
        w += LEASE_STATE_ENTRY_WORDS;
        if (e.lease_id == 0 || e.lease_id >= t->next_lease_id ||
            (i > 0 && e.lease_id <= t->entries[i - 1].lease_id))
            return qerr_set(err, QERR_INVALID,
                            "lease state: lease %zu has id %llu (ids must be increasing and "
                            "below %llu)",
                            i, (unsigned long long)e.lease_id,
                            (unsigned long long)t->next_lease_id);
        if (unit_check(t, e.prompt_id, e.epoch, "lease", i, err))
            return -1;
        t->entries[t->n_entries++] = e;
    }
    for (size_t i = 0; i < n_queue; i++) {
        uint64_t p = get_u64(buf, w), e = get_u64(buf, w + 1);
        w += LEASE_STATE_UNIT_WORDS;
        if (unit_check(t, p, e, "queued unit", i, err))
            return -1;
        bool has_entry = false;
        for (size_t j = 0; j < t->n_entries && !has_entry; j++)
            has_entry = t->entries[j].prompt_id == p && t->entries[j].epoch == e;
        if (!has_entry || queued(t, p, e))
            return qerr_set(err, QERR_INVALID,
                            "lease state: queued unit %zu (prompt %llu, epoch %llu) has no lease "
                            "or is queued twice",
                            i, (unsigned long long)p, (unsigned long long)e);
        t->queue[t->n_queue++] = (unit_t){p, e};
    }
    /* The leases that were ACTIVE: their units join the queue, in lease order. */
    for (size_t i = 0; i < t->n_entries; i++) {
        const entry_t *e = &t->entries[i];
        if (!queued(t, e->prompt_id, e->epoch))
            t->queue[t->n_queue++] = (unit_t){e->prompt_id, e->epoch};
    }
    /* A hand-made state may list a complete epoch as open. */
    epochs_close(t);
    /* Units at or past the data position of the current epoch were never handed out, so none
     * is accepted, and that epoch cannot be complete: a fresh grant of an accepted unit would
     * accept it twice (or in an epoch already closed). */
    if (t->done_epochs > t->epoch)
        return qerr_set(err, QERR_INVALID,
                        "lease state: %llu epochs done, but epoch %llu is still being handed out",
                        (unsigned long long)t->done_epochs, (unsigned long long)t->epoch);
    for (uint64_t i = t->position; t->epoch - t->done_epochs < t->n_open && i < t->o.n_prompts;
         i++) {
        uint64_t p = order_at(t, t->epoch, i);
        if (lease_table_is_accepted(t, p, t->epoch))
            return qerr_set(err, QERR_INVALID,
                            "lease state: prompt %llu of epoch %llu is accepted but was never "
                            "handed out (data position %llu)",
                            (unsigned long long)p, (unsigned long long)t->epoch,
                            (unsigned long long)t->position);
    }
    /* Leases granted after this state was saved, by the incarnation that died, had ids from
     * h[6] on; the next generation of ids starts above every one of them. */
    t->next_lease_id = ((t->next_lease_id >> LEASE_ID_GENERATION_BITS) + 1)
                       << LEASE_ID_GENERATION_BITS;
    return 0;
}

lease_table_t *lease_table_restore(const lease_table_options_t *o, const uint8_t *buf, size_t len,
                                   qerr_t *err) {
    Q_ASSERT(o && (buf || len == 0));
    if (len % 8 != 0 || len / 8 < LEASE_STATE_HEADER_WORDS) {
        qerr_set(err, QERR_PARSE, "lease state: %zu bytes is not a whole state (word %zu cut)", len,
                 len / 8);
        return NULL;
    }
    lease_table_t *t = lease_table_new(o, err);
    if (t == NULL)
        return NULL;
    if (restore_body(t, buf, len / 8, err) != 0) {
        lease_table_destroy(&t);
        return NULL;
    }
    return t;
}

/* ==== Dispatcher ========================================================================= */

/* Messages handled per poll call at most, so a flood cannot starve the timed duties. */
#define DISPATCHER_BATCH 1024
/* Most requests in one Lease, whatever a worker's credits say. */
#define DISPATCHER_MAX_GRANT 256
/* Weight of a new sample in the moving averages (group time, tokens/s). */
#define DISPATCHER_EMA_ALPHA 0.2

typedef struct {
    dispatcher_worker_t row; /* last_seen_s holds the absolute time here */
    uint64_t owner;          /* lease owner handle of this incarnation */
    net_peer_t peer;
    /* A WorkRequest waiting for work (credits > 0), answered when work frees up or after one
     * heartbeat interval with an empty Lease. */
    uint32_t want;
    double want_since;
} worker_t;

struct dispatcher {
    dispatcher_options_t o;
    net_socket_t *sock;
    lease_table_t *table;
    /* Recursive: on_group runs under it and may call the thread-safe functions here. */
    pthread_mutex_t lock;
    worker_t *workers;
    size_t n_workers;
    uint64_t next_owner;
    uint64_t latest, old_policy;
    double group_s; /* moving average of lease-to-accept seconds; 0 = none measured yet */
    double next_heartbeat_s;
    dispatcher_stats_t stats;
    lease_grant_t grants[DISPATCHER_MAX_GRANT];
    tokenizer_ids_t ids;
};

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

void dispatcher_options_init(dispatcher_options_t *o) {
    memset(o, 0, sizeof(*o));
    o->endpoint = "tcp://127.0.0.1:5555";
    o->sender_id = "learner";
    o->incarnation_id = net_incarnation_new();
    net_options_init(&o->net);
    o->security.mode = NET_SECURITY_NONE;
    o->shuffle = true;
    o->data_seed = 1234;
    o->temperature = 1.0f;
    o->top_p = 1.0f;
    o->max_new_tokens = 256;
    o->heartbeat_ivl_s = 1.0;
    o->heartbeat_liveness = 5;
}

static int options_check(const dispatcher_options_t *o, qerr_t *err) {
    if (o->endpoint == NULL || o->sender_id == NULL || o->data == NULL || o->tokenizer == NULL ||
        o->on_group == NULL)
        return qerr_set(
            err, QERR_INVALID,
            "dispatcher: endpoint, sender_id, data, tokenizer and on_group are required");
    if (!(o->heartbeat_ivl_s > 0 && o->heartbeat_ivl_s <= 3600))
        return qerr_set(err, QERR_RANGE, "dispatcher: heartbeat_ivl_s %g is outside (0, 3600]",
                        o->heartbeat_ivl_s);
    if (o->heartbeat_liveness < 1)
        return qerr_set(err, QERR_RANGE, "dispatcher: heartbeat_liveness %d is below 1",
                        o->heartbeat_liveness);
    if (!(o->lease_timeout_s >= 0 && o->lease_timeout_s < 4e6))
        return qerr_set(err, QERR_RANGE, "dispatcher: lease_timeout_s %g is outside [0, 4e6)",
                        o->lease_timeout_s);
    const dispatch_codec_limits_t *l = &o->limits;
    if (l->vocab_size == 0 || l->max_group_size == 0 || l->max_prompt_tokens == 0 ||
        l->max_new_tokens == 0)
        return qerr_set(err, QERR_RANGE,
                        "dispatcher: limits need vocab_size, max_group_size, max_prompt_tokens "
                        "and max_new_tokens above 0");
    if (o->max_new_tokens == 0 || o->max_new_tokens > l->max_new_tokens)
        return qerr_set(err, QERR_RANGE, "dispatcher: max_new_tokens %u is outside [1, %u]",
                        o->max_new_tokens, l->max_new_tokens);
    if (!(o->temperature >= 0) || !isfinite(o->temperature) || !(o->top_p >= 0 && o->top_p <= 1) ||
        o->top_k > l->vocab_size)
        return qerr_set(err, QERR_RANGE,
                        "dispatcher: sampling temperature %g, top_p %g or top_k %u out of range",
                        (double)o->temperature, (double)o->top_p, o->top_k);
    if (tokenizer_vocab_size(o->tokenizer) > (int32_t)l->vocab_size)
        return qerr_set(err, QERR_RANGE, "dispatcher: the tokenizer's %d ids exceed vocab_size %u",
                        (int)tokenizer_vocab_size(o->tokenizer), l->vocab_size);
    return 0;
}

/* Example index into *ex and its prompt's tokens (without BOS) into d->ids, checked to fit
 * max_prompt_tokens with BOS. Errors name PATH:LINE. */
static int prompt_tokens(dispatcher_t *d, size_t index, jsonl_example_t *ex, qerr_t *err) {
    if (jsonl_reader_example(d->o.data, index, JSONL_TASK_RL, ex, err) != 0)
        return -1;
    d->ids.len = 0;
    if (tokenizer_encode_append(d->o.tokenizer, ex->prompt, strlen(ex->prompt), &d->ids, err) !=
        0) {
        jsonl_example_free(ex);
        return qerr_wrap(err, "%s:%zu: prompt", jsonl_reader_path(d->o.data), index + 1);
    }
    if (d->ids.len + 1 > d->o.limits.max_prompt_tokens) {
        jsonl_example_free(ex);
        return qerr_set(err, QERR_RANGE, "%s:%zu: the prompt is %zu tokens with BOS, above %u",
                        jsonl_reader_path(d->o.data), index + 1, d->ids.len + 1,
                        d->o.limits.max_prompt_tokens);
    }
    return 0;
}

static int dataset_check(dispatcher_t *d, qerr_t *err) {
    size_t n = jsonl_reader_count(d->o.data);
    for (size_t i = 0; i < n; i++) {
        jsonl_example_t ex;
        if (prompt_tokens(d, i, &ex, err) != 0)
            return -1;
        jsonl_example_free(&ex);
    }
    return 0;
}

dispatcher_t *dispatcher_new(void *zctx, const dispatcher_options_t *o, const uint8_t *state,
                             size_t state_len, qerr_t *err) {
    Q_ASSERT(zctx && o);
    if (options_check(o, err) != 0 || net_options_validate(&o->net, err) != 0) {
        qerr_wrap(err, "dispatcher");
        return NULL;
    }
    dispatcher_t *d = calloc(1, sizeof *d);
    if (d == NULL) {
        qerr_set(err, QERR_NOMEM, "dispatcher: out of memory");
        return NULL;
    }
    d->o = *o;
    tokenizer_ids_init(&d->ids);
    pthread_mutexattr_t attr;
    pthread_mutexattr_init(&attr);
    pthread_mutexattr_settype(&attr, PTHREAD_MUTEX_RECURSIVE);
    pthread_mutex_init(&d->lock, &attr);
    pthread_mutexattr_destroy(&attr);
    d->next_owner = 1;
    if (dataset_check(d, err) != 0) {
        qerr_wrap(err, "dispatcher: dataset");
        dispatcher_destroy(&d);
        return NULL;
    }
    lease_table_options_t to = {.n_prompts = jsonl_reader_count(o->data),
                                .shuffle = o->shuffle,
                                .seed = o->data_seed,
                                .fingerprint = jsonl_reader_fingerprint(o->data),
                                .max_epochs = o->max_epochs};
    d->table = state ? lease_table_restore(&to, state, state_len, err) : lease_table_new(&to, err);
    if (d->table == NULL) {
        qerr_wrap(err, "dispatcher");
        dispatcher_destroy(&d);
        return NULL;
    }
    net_socket_spec_t spec = {.type = ZMQ_ROUTER,
                              .protocol = WIRE_PROTOCOL_DISPATCH,
                              .name = "dispatcher",
                              .sender_id = o->sender_id,
                              .incarnation_id = o->incarnation_id};
    d->sock = net_socket_new(zctx, &spec, &o->net, &o->security, err);
    if (d->sock == NULL || net_socket_bind(d->sock, o->endpoint, err) != 0) {
        qerr_wrap(err, "dispatcher");
        dispatcher_destroy(&d);
        return NULL;
    }
    d->next_heartbeat_s = now_s();
    lease_table_stats_t ts;
    lease_table_stats(d->table, &ts);
    log_field_t f[] = {{"prompts", (double)to.n_prompts},
                       {"epoch", (double)ts.epoch},
                       {"position", (double)ts.position},
                       {"accepted", (double)ts.accepted},
                       {"queued", (double)ts.queued}};
    log_emit(LOG_INFO, "dispatch.listen", f, Q_ARRAY_LEN(f), "dispatcher on %s (%s)",
             net_socket_endpoint(d->sock), state ? "restored" : "fresh");
    return d;
}

void dispatcher_destroy(dispatcher_t **dp) {
    if (dp == NULL || *dp == NULL)
        return;
    dispatcher_t *d = *dp;
    net_socket_destroy(&d->sock);
    lease_table_destroy(&d->table);
    tokenizer_ids_free(&d->ids);
    free(d->workers);
    pthread_mutex_destroy(&d->lock);
    free(d);
    *dp = NULL;
}

const char *dispatcher_endpoint(const dispatcher_t *d) {
    return net_socket_endpoint(d->sock);
}

void *dispatcher_handle(dispatcher_t *d) {
    return net_socket_handle(d->sock);
}

static double liveness_s(const dispatcher_t *d) {
    return d->o.heartbeat_ivl_s * d->o.heartbeat_liveness;
}

static double lease_timeout(const dispatcher_t *d) {
    if (d->o.lease_timeout_s > 0)
        return d->o.lease_timeout_s;
    if (d->group_s <= 0)
        return DISPATCHER_LEASE_TIMEOUT_FIRST_S;
    double t = 4.0 * d->group_s;
    return t < DISPATCHER_LEASE_TIMEOUT_MIN_S ? DISPATCHER_LEASE_TIMEOUT_MIN_S : t;
}

static void send_env(dispatcher_t *d, const net_peer_t *peer, Quillan__Envelope *env) {
    qerr_t e;
    if (net_send(d->sock, peer, env, NULL, 0, NULL, &e) != 0) {
        d->stats.send_failed++;
        log_debug("dispatch.send_failed", "%s", e.msg);
    }
}

/* ---- worker table ---- */

static worker_t *worker_find(dispatcher_t *d, const char *id) {
    for (size_t i = 0; i < d->n_workers; i++)
        if (strcmp(d->workers[i].row.id, id) == 0)
            return &d->workers[i];
    return NULL;
}

/* A slot for a new worker: a fresh one, or the longest-dead one's. NULL when every slot holds a
 * live worker. */
static worker_t *worker_slot(dispatcher_t *d) {
    if (d->n_workers < DISPATCHER_MAX_WORKERS) {
        worker_t *w = realloc(d->workers, (d->n_workers + 1) * sizeof *w);
        if (w == NULL)
            return NULL;
        d->workers = w;
        return &d->workers[d->n_workers++];
    }
    worker_t *oldest = NULL;
    for (size_t i = 0; i < d->n_workers; i++) {
        worker_t *w = &d->workers[i];
        if (!w->row.alive && (oldest == NULL || w->row.last_seen_s < oldest->row.last_seen_s))
            oldest = w;
    }
    return oldest;
}

/* The worker that sent env, registered or updated: a new incarnation of a known worker means it
 * restarted, so the leases of its old incarnation are released at once. */
static worker_t *worker_touch(dispatcher_t *d, const Quillan__Envelope *env, const net_peer_t *peer,
                              double now) {
    worker_t *w = worker_find(d, env->sender_id);
    if (w == NULL) {
        w = worker_slot(d);
        if (w == NULL)
            return NULL;
        memset(w, 0, sizeof *w);
        snprintf(w->row.id, sizeof w->row.id, "%s", env->sender_id);
        w->row.incarnation = env->incarnation_id;
        w->owner = d->next_owner++;
        log_info("dispatch.worker_new", "worker %s joined", w->row.id);
    } else if (w->row.incarnation != env->incarnation_id) {
        size_t n = lease_table_release(d->table, w->owner);
        w->row.incarnation = env->incarnation_id;
        w->owner = d->next_owner++;
        w->row.restarts++;
        w->want = 0;
        d->stats.worker_restarts++;
        log_field_t f[] = {{"leases_released", (double)n}};
        log_emit(LOG_WARN, "dispatch.worker_restart", f, 1,
                 "worker %s restarted; %zu of its leases go to others", w->row.id, n);
    }
    if (!w->row.alive && w->row.last_seen_s > 0)
        log_info("dispatch.worker_back", "worker %s is heard from again", w->row.id);
    w->row.alive = true;
    w->row.last_seen_s = now;
    w->peer = *peer;
    return w;
}

/* ---- messages ---- */

static void ack_send(dispatcher_t *d, const net_msg_t *m, uint64_t lease_id,
                     Quillan__AckStatus status) {
    Quillan__Ack ack = QUILLAN__ACK__INIT;
    ack.lease_id = lease_id;
    ack.status = status;
    ack.in_reply_to = net_msg_envelope(m)->message_id;
    Quillan__Envelope env = QUILLAN__ENVELOPE__INIT;
    env.body_case = QUILLAN__ENVELOPE__BODY_ACK;
    env.ack = &ack;
    d->stats.acks_sent++;
    send_env(d, net_msg_peer(m), &env);
}

static const Quillan__AckStatus verdict_status[LEASE_VERDICT_COUNT] = {
    QUILLAN__ACK_STATUS__ACK_STATUS_ACCEPTED, QUILLAN__ACK_STATUS__ACK_STATUS_DUPLICATE,
    QUILLAN__ACK_STATUS__ACK_STATUS_UNKNOWN_LEASE, QUILLAN__ACK_STATUS__ACK_STATUS_REJECTED};

static void group_dropped(const worker_t *w, const Quillan__TrajectoryGroup *g, lease_verdict_t v,
                          const char *why) {
    log_field_t f[] = {{"lease", (double)g->lease_id},
                       {"prompt", (double)g->prompt_id},
                       {"epoch", (double)g->epoch}};
    log_emit(v == LEASE_DUPLICATE ? LOG_INFO : LOG_WARN, "dispatch.group_dropped", f,
             Q_ARRAY_LEN(f), "group of lease %llu from %s dropped: %s%s%s",
             (unsigned long long)g->lease_id, w ? w->row.id : "?", lease_verdict_name(v),
             why ? ": " : "", why ? why : "");
}

/* The group's unit is marked accepted only after on_group took it: a group the caller refuses
 * is REJECTED instead, which expires its lease so that the unit is leased again. */
static void group_take(dispatcher_t *d, worker_t *w, const net_msg_t *m, bool valid,
                       const char *why, double now) {
    const Quillan__Envelope *env = net_msg_envelope(m);
    const Quillan__TrajectoryGroup *g = env->trajectory_group;
    double leased_s = -1;
    uint64_t version = 0;
    lease_verdict_t v = lease_table_check(d->table, g->lease_id, g->prompt_id, g->epoch, valid, now,
                                          &leased_s, &version);
    if (v != LEASE_ACCEPTED) {
        lease_table_submit(d->table, g->lease_id, g->prompt_id, g->epoch, valid, now, NULL, NULL);
        ack_send(d, m, g->lease_id, verdict_status[v]);
        group_dropped(w, g, v, why);
        return;
    }
    dispatcher_group_info_t info = {.lease_id = g->lease_id,
                                    .lease_version = version,
                                    .leased_s = leased_s,
                                    .worker_id = env->sender_id,
                                    .worker_incarnation = env->incarnation_id};
    bool taken = d->o.on_group(d->o.on_group_ctx, g, &info) == 0;
    v = lease_table_submit(d->table, g->lease_id, g->prompt_id, g->epoch, taken, now, NULL, NULL);
    /* on_group may call only the functions here that leave the table's units alone. */
    Q_ASSERT(v == (taken ? LEASE_ACCEPTED : LEASE_REJECTED));
    ack_send(d, m, g->lease_id, verdict_status[v]);
    if (!taken) {
        d->stats.refused++;
        log_field_t f[] = {{"lease", (double)g->lease_id},
                           {"prompt", (double)g->prompt_id},
                           {"epoch", (double)g->epoch}};
        log_emit(LOG_WARN, "dispatch.group_refused", f, Q_ARRAY_LEN(f),
                 "group of lease %llu (prompt %llu, epoch %llu) from %s refused by the learner; "
                 "its unit is leased again",
                 (unsigned long long)g->lease_id, (unsigned long long)g->prompt_id,
                 (unsigned long long)g->epoch, env->sender_id);
        return;
    }
    if (leased_s >= 0)
        d->group_s = d->group_s <= 0 ? leased_s
                                     : (1 - DISPATCHER_EMA_ALPHA) * d->group_s +
                                           DISPATCHER_EMA_ALPHA * leased_s;
    if (w) {
        w->row.groups_done++;
        uint64_t tokens = 0;
        for (size_t i = 0; i < g->n_trajectories; i++)
            tokens += g->trajectories[i]->n_completion_tokens;
        if (g->gen_seconds > 0) {
            double tps = (double)tokens / g->gen_seconds;
            w->row.tokens_per_s =
                w->row.tokens_per_s <= 0
                    ? tps
                    : (1 - DISPATCHER_EMA_ALPHA) * w->row.tokens_per_s + DISPATCHER_EMA_ALPHA * tps;
        }
    }
}

static void message_handle(dispatcher_t *d, const net_msg_t *m, double now) {
    const Quillan__Envelope *env = net_msg_envelope(m);
    size_t payload_len = 0;
    net_msg_payload(m, &payload_len);
    qerr_t e;
    int valid = dispatch_codec_net_validate(&d->o.limits, env, payload_len, &e) == 0;
    bool is_group = env->body_case == QUILLAN__ENVELOPE__BODY_TRAJECTORY_GROUP;
    if (valid && is_group && env->trajectory_group->n_trajectories != d->o.limits.max_group_size) {
        snprintf(e.msg, sizeof e.msg, "trajectory_group.trajectories: %zu, the group size is %u",
                 env->trajectory_group->n_trajectories, d->o.limits.max_group_size);
        valid = 0;
    }
    if (!valid && !(is_group && env->trajectory_group->lease_id != 0)) {
        d->stats.malformed++;
        log_debug("dispatch.malformed", "from %s: %s", env->sender_id, e.msg);
        return;
    }
    worker_t *w = worker_touch(d, env, net_msg_peer(m), now);
    if (w == NULL)
        log_warn("dispatch.worker_table_full", "%d live workers: %s is not tracked",
                 DISPATCHER_MAX_WORKERS, env->sender_id);
    switch (env->body_case) {
    case QUILLAN__ENVELOPE__BODY_WORK_REQUEST: {
        const Quillan__WorkRequest *wr = env->work_request;
        d->stats.work_requests++;
        if (w) {
            snprintf(w->row.host, sizeof w->row.host, "%s", wr->host);
            w->row.snapshot_version = wr->snapshot_version;
            w->want = wr->credits;
            w->want_since = now;
        }
        break;
    }
    case QUILLAN__ENVELOPE__BODY_HEARTBEAT:
        d->stats.heartbeats_received++;
        if (w)
            w->row.snapshot_version = env->heartbeat->snapshot_version;
        break;
    case QUILLAN__ENVELOPE__BODY_TRAJECTORY_GROUP:
        group_take(d, w, m, valid, valid ? NULL : e.msg, now);
        break;
    case QUILLAN__ENVELOPE__BODY_ERROR:
        d->stats.errors_received++;
        log_warn("dispatch.worker_error", "worker %s: error %d: %s", env->sender_id,
                 (int)env->error->code, env->error->message);
        break;
    default:
        d->stats.malformed++;
        log_debug("dispatch.malformed", "worker %s sent '%s'", env->sender_id,
                  wire_body_name(env->body_case));
        break;
    }
}

/* ---- leases ---- */

static void requests_free(Quillan__RolloutRequest **rq, size_t n) {
    for (size_t i = 0; i < n; i++) {
        if (rq[i] == NULL)
            continue;
        free(rq[i]->prompt_tokens);
        free(rq[i]->prompt_text);
        for (size_t j = 0; j < rq[i]->n_metadata; j++) {
            free(rq[i]->metadata[j]->key);
            free(rq[i]->metadata[j]->value);
            free(rq[i]->metadata[j]);
        }
        free(rq[i]->metadata);
        free(rq[i]);
    }
}

static char *str_dup(const char *s) {
    size_t n = strlen(s) + 1;
    char *c = malloc(n);
    if (c)
        memcpy(c, s, n);
    return c;
}

/* One RolloutRequest for grant g (heap, requests_free), sampling params borrowed from sp. */
static Quillan__RolloutRequest *request_build(dispatcher_t *d, const lease_grant_t *g,
                                              Quillan__SamplingParams *sp, qerr_t *err) {
    jsonl_example_t ex;
    if (prompt_tokens(d, (size_t)g->prompt_id, &ex, err) != 0)
        return NULL;
    Quillan__RolloutRequest *r = calloc(1, sizeof *r);
    if (r == NULL)
        goto oom;
    quillan__rollout_request__init(r);
    r->lease_id = g->lease_id;
    r->prompt_id = g->prompt_id;
    r->epoch = g->epoch;
    r->group_size = d->o.limits.max_group_size;
    r->sampling = sp;
    r->min_version = d->latest;
    r->n_prompt_tokens = d->ids.len + 1;
    r->prompt_tokens = malloc(r->n_prompt_tokens * sizeof *r->prompt_tokens);
    r->prompt_text = str_dup(ex.prompt);
    r->metadata = calloc(ex.n_meta ? ex.n_meta : 1, sizeof *r->metadata);
    if (r->prompt_tokens == NULL || r->prompt_text == NULL || r->metadata == NULL)
        goto oom;
    r->prompt_tokens[0] = (uint32_t)tokenizer_bos_id(d->o.tokenizer);
    for (size_t i = 0; i < d->ids.len; i++)
        r->prompt_tokens[i + 1] = (uint32_t)d->ids.data[i];
    for (size_t i = 0; i < ex.n_meta; i++) {
        Quillan__RolloutRequest__MetadataEntry *me = malloc(sizeof *me);
        if (me == NULL)
            goto oom;
        quillan__rollout_request__metadata_entry__init(me);
        r->metadata[r->n_metadata++] = me;
        me->key = str_dup(ex.meta_keys[i]);
        me->value = str_dup(ex.meta_values[i]);
        if (me->key == NULL || me->value == NULL)
            goto oom;
    }
    jsonl_example_free(&ex);
    return r;
oom:
    jsonl_example_free(&ex);
    requests_free(&r, 1);
    qerr_set(err, QERR_NOMEM, "dispatcher: out of memory building lease %llu",
             (unsigned long long)g->lease_id);
    return NULL;
}

/* Grants up to w->want leases and sends them in one Lease (or an empty Lease once the request
 * has waited a heartbeat interval). */
static int work_serve(dispatcher_t *d, worker_t *w, double now, qerr_t *err) {
    size_t want = w->want < DISPATCHER_MAX_GRANT ? w->want : DISPATCHER_MAX_GRANT;
    double timeout = lease_timeout(d);
    size_t n = lease_table_grant(d->table, w->owner, want, now, timeout, d->latest, d->grants);
    if (n == 0 && now - w->want_since < d->o.heartbeat_ivl_s)
        return 0;
    w->want = 0;
    Quillan__SamplingParams sp[DISPATCHER_MAX_GRANT];
    Quillan__RolloutRequest *rq[DISPATCHER_MAX_GRANT] = {0};
    int rc = 0;
    for (size_t i = 0; i < n && rc == 0; i++) {
        Quillan__SamplingParams *s = &sp[i];
        quillan__sampling_params__init(s);
        s->temperature = d->o.temperature;
        s->top_p = d->o.top_p;
        s->top_k = d->o.top_k;
        s->max_new_tokens = d->o.max_new_tokens;
        s->seed = rng_hash((const uint64_t[]){d->o.seed, d->grants[i].epoch}, 2);
        rq[i] = request_build(d, &d->grants[i], s, err);
        if (rq[i] == NULL)
            rc = -1;
    }
    if (rc == 0) {
        Quillan__Lease lease = QUILLAN__LEASE__INIT;
        lease.n_requests = n;
        lease.requests = rq;
        double ms = timeout * 1000.0;
        lease.timeout_ms = ms > UINT32_MAX ? UINT32_MAX : (uint32_t)ms;
        lease.retry_after_ms = n ? 0 : (uint32_t)(d->o.heartbeat_ivl_s * 1000.0);
        lease.policy_version = d->latest;
        Quillan__Envelope env = QUILLAN__ENVELOPE__INIT;
        env.body_case = QUILLAN__ENVELOPE__BODY_LEASE;
        env.lease = &lease;
        d->stats.leases_sent++;
        send_env(d, &w->peer, &env);
        if (n > 0) {
            log_field_t f[] = {{"leases", (double)n}, {"timeout_s", timeout}};
            log_emit(LOG_DEBUG, "dispatch.lease", f, Q_ARRAY_LEN(f), "%zu leases to %s", n,
                     w->row.id);
        }
    }
    requests_free(rq, n);
    return rc;
}

/* ---- timed duties ---- */

static int duties(dispatcher_t *d, double now, qerr_t *err) {
    size_t expired = lease_table_expire(d->table, now);
    if (expired)
        log_info("dispatch.lease_expired", "%zu leases timed out; their prompts are re-leased",
                 expired);
    for (size_t i = 0; i < d->n_workers; i++) {
        worker_t *w = &d->workers[i];
        if (w->row.alive && now - w->row.last_seen_s > liveness_s(d)) {
            w->row.alive = false;
            w->want = 0;
            size_t n = lease_table_release(d->table, w->owner);
            d->stats.workers_died++;
            log_field_t f[] = {{"leases_released", (double)n}};
            log_emit(LOG_WARN, "dispatch.worker_dead", f, 1,
                     "worker %s silent for %.1f s; %zu of its leases go to others", w->row.id,
                     now - w->row.last_seen_s, n);
        }
    }
    for (size_t i = 0; i < d->n_workers; i++) {
        worker_t *w = &d->workers[i];
        if (w->row.alive && w->want > 0 && work_serve(d, w, now, err) != 0)
            return -1;
    }
    if (now >= d->next_heartbeat_s) {
        d->next_heartbeat_s = now + d->o.heartbeat_ivl_s;
        Quillan__Heartbeat hb = QUILLAN__HEARTBEAT__INIT;
        hb.snapshot_version = d->latest;
        hb.old_policy_version = d->old_policy;
        Quillan__Envelope env = QUILLAN__ENVELOPE__INIT;
        env.body_case = QUILLAN__ENVELOPE__BODY_HEARTBEAT;
        env.heartbeat = &hb;
        for (size_t i = 0; i < d->n_workers; i++) {
            if (!d->workers[i].row.alive)
                continue;
            d->stats.heartbeats_sent++;
            send_env(d, &d->workers[i].peer, &env);
        }
    }
    return 0;
}

int dispatcher_poll(dispatcher_t *d, int timeout_ms, qerr_t *err) {
    pthread_mutex_lock(&d->lock);
    double wait_s = d->next_heartbeat_s - now_s();
    pthread_mutex_unlock(&d->lock);
    int cap_ms = wait_s <= 0 ? 0 : (int)(wait_s * 1000.0) + 1;
    if (timeout_ms < 0 || timeout_ms > cap_ms)
        timeout_ms = cap_ms;
    int handled = 0;
    while (handled < DISPATCHER_BATCH) {
        net_msg_t *m = NULL;
        int rc = net_recv(d->sock, handled == 0 ? timeout_ms : 0, &m, err);
        if (rc < 0)
            return -1;
        if (rc == 0)
            break;
        pthread_mutex_lock(&d->lock);
        message_handle(d, m, now_s());
        pthread_mutex_unlock(&d->lock);
        net_msg_destroy(&m);
        handled++;
    }
    pthread_mutex_lock(&d->lock);
    int rc = duties(d, now_s(), err);
    pthread_mutex_unlock(&d->lock);
    return rc < 0 ? -1 : handled;
}

void dispatcher_set_lease_limit(dispatcher_t *d, uint64_t limit) {
    pthread_mutex_lock(&d->lock);
    lease_table_set_limit(d->table, limit);
    pthread_mutex_unlock(&d->lock);
}

void dispatcher_set_versions(dispatcher_t *d, uint64_t latest, uint64_t old_policy) {
    pthread_mutex_lock(&d->lock);
    d->latest = latest;
    d->old_policy = old_policy;
    pthread_mutex_unlock(&d->lock);
}

int dispatcher_save(dispatcher_t *d, uint8_t **buf, size_t *len, qerr_t *err) {
    pthread_mutex_lock(&d->lock);
    int rc = lease_table_save(d->table, buf, len, err);
    pthread_mutex_unlock(&d->lock);
    return rc;
}

int dispatcher_finished(dispatcher_t *d) {
    pthread_mutex_lock(&d->lock);
    int f = lease_table_finished(d->table);
    pthread_mutex_unlock(&d->lock);
    return f;
}

void dispatcher_stats(dispatcher_t *d, dispatcher_stats_t *out) {
    pthread_mutex_lock(&d->lock);
    *out = d->stats;
    lease_table_stats(d->table, &out->table);
    out->workers_alive = out->workers_dead = 0;
    for (size_t i = 0; i < d->n_workers; i++) {
        if (d->workers[i].row.alive)
            out->workers_alive++;
        else
            out->workers_dead++;
    }
    out->lease_timeout_s = lease_timeout(d);
    net_socket_stats(d->sock, &out->net);
    pthread_mutex_unlock(&d->lock);
}

size_t dispatcher_workers(dispatcher_t *d, dispatcher_worker_t *out, size_t cap) {
    pthread_mutex_lock(&d->lock);
    double now = now_s();
    size_t n = d->n_workers;
    for (size_t i = 0; i < n && i < cap; i++) {
        out[i] = d->workers[i].row;
        out[i].last_seen_s = now - d->workers[i].row.last_seen_s;
        out[i].leases = 0;
    }
    for (size_t k = 0; k < d->table->n_entries; k++) {
        const entry_t *e = &d->table->entries[k];
        if (e->state != ENTRY_ACTIVE)
            continue;
        for (size_t i = 0; i < n && i < cap; i++)
            if (d->workers[i].owner == e->owner)
                out[i].leases++;
    }
    pthread_mutex_unlock(&d->lock);
    return n;
}
