/* The dispatcher's lease table (learner/dispatcher.h) without sockets: dataset order, admission,
 * time-outs and re-leases, exactly once per (prompt, epoch), duplicates, unknown and rejected
 * groups, worker release, and save/restore, including a randomised run against a reference. */
#include "dispatcher.h"
#include "rng.h"

#include <criterion/criterion.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <zmq.h>

#define TIMEOUT 10.0

static lease_table_t *table(uint64_t n, bool shuffle, uint64_t max_epochs, uint64_t limit) {
    lease_table_options_t o = {.n_prompts = n,
                               .shuffle = shuffle,
                               .seed = 77,
                               .fingerprint = 0xfeed,
                               .max_epochs = max_epochs};
    qerr_t err;
    lease_table_t *t = lease_table_new(&o, &err);
    cr_assert_not_null(t, "%s", err.msg);
    lease_table_set_limit(t, limit);
    return t;
}

static lease_grant_t grant1(lease_table_t *t, uint64_t owner, double now) {
    lease_grant_t g;
    cr_assert_eq(lease_table_grant(t, owner, 1, now, TIMEOUT, 3, &g), 1);
    return g;
}

static lease_verdict_t submit(lease_table_t *t, const lease_grant_t *g, double now) {
    return lease_table_submit(t, g->lease_id, g->prompt_id, g->epoch, true, now, NULL, NULL);
}

Test(lease_table, rejects_empty_dataset) {
    lease_table_options_t o = {.n_prompts = 0};
    qerr_t err;
    cr_assert_null(lease_table_new(&o, &err));
    cr_assert_eq(err.code, QERR_RANGE);
}

Test(lease_table, order_is_a_seeded_permutation_per_epoch) {
    const uint64_t n = 50;
    lease_table_t *plain = table(n, false, 0, 0), *shuf = table(n, true, 0, 0);
    int same01 = 1, identity0 = 1;
    for (uint64_t e = 0; e < 3; e++) {
        int seen[50] = {0};
        for (uint64_t i = 0; i < n; i++) {
            cr_assert_eq(lease_table_order(plain, e, i), i);
            uint64_t p = lease_table_order(shuf, e, i);
            cr_assert_lt(p, n);
            seen[p]++;
            if (e == 0)
                identity0 &= p == i;
            if (e == 1)
                same01 &= p == lease_table_order(shuf, 0, i);
        }
        for (uint64_t i = 0; i < n; i++)
            cr_assert_eq(seen[i], 1, "epoch %llu: prompt %llu appears %d times",
                         (unsigned long long)e, (unsigned long long)i, seen[i]);
    }
    cr_assert_not(identity0, "shuffled order equals dataset order");
    cr_assert_not(same01, "epochs 0 and 1 have the same order");
    /* Grants follow the order. */
    lease_table_set_limit(shuf, 1000);
    lease_grant_t g[60];
    cr_assert_eq(lease_table_grant(shuf, 1, 60, 0, TIMEOUT, 0, g), 60);
    for (uint64_t i = 0; i < 60; i++) {
        cr_assert_eq(g[i].epoch, i / n);
        cr_assert_eq(g[i].prompt_id, lease_table_order(shuf, i / n, i % n));
        cr_assert_eq(g[i].lease_id, i + 1);
        cr_assert_not(g[i].relet);
    }
    lease_table_destroy(&plain);
    lease_table_destroy(&shuf);
    cr_assert_null(shuf);
}

Test(lease_table, admission_limit_bounds_active_leases) {
    lease_table_t *t = table(10, false, 0, 0);
    lease_grant_t g[10];
    cr_assert_eq(lease_table_grant(t, 1, 5, 0, TIMEOUT, 0, g), 0, "limit 0 grants nothing");
    lease_table_set_limit(t, 3);
    cr_assert_eq(lease_table_grant(t, 1, 5, 0, TIMEOUT, 0, g), 3);
    cr_assert_eq(lease_table_grant(t, 2, 5, 0, TIMEOUT, 0, g + 3), 0);
    cr_assert_eq(submit(t, &g[0], 1), LEASE_ACCEPTED);
    cr_assert_eq(lease_table_grant(t, 2, 5, 1, TIMEOUT, 0, g + 3), 1, "a returned group frees one");
    lease_table_set_limit(t, 1);
    lease_table_stats_t s;
    lease_table_stats(t, &s);
    cr_assert_eq(s.active, 3, "lowering the limit revokes nothing");
    cr_assert_eq(lease_table_grant(t, 2, 5, 1, TIMEOUT, 0, g + 4), 0);
    lease_table_destroy(&t);
}

Test(lease_table, max_epochs_every_unit_exactly_once) {
    const uint64_t n = 7, epochs = 3;
    lease_table_t *t = table(n, true, epochs, 4);
    int count[3][7] = {{0}};
    double now = 0;
    while (!lease_table_finished(t)) {
        lease_grant_t g[4];
        size_t k = lease_table_grant(t, 1, 4, now, TIMEOUT, 0, g);
        cr_assert_gt(k, 0, "no work granted before the run finished");
        for (size_t i = 0; i < k; i++) {
            cr_assert_eq(submit(t, &g[i], now), LEASE_ACCEPTED);
            cr_assert(lease_table_is_accepted(t, g[i].prompt_id, g[i].epoch));
            count[g[i].epoch][g[i].prompt_id]++;
        }
        now += 1;
    }
    for (uint64_t e = 0; e < epochs; e++)
        for (uint64_t p = 0; p < n; p++)
            cr_assert_eq(count[e][p], 1);
    lease_grant_t g;
    cr_assert_eq(lease_table_grant(t, 1, 1, now, TIMEOUT, 0, &g), 0, "no fresh units left");
    lease_table_stats_t s;
    lease_table_stats(t, &s);
    cr_assert_eq(s.accepted, n * epochs);
    cr_assert_eq(s.done_epochs, epochs);
    lease_table_destroy(&t);
}

Test(lease_table, timeout_relet_late_group_first_wins) {
    lease_table_t *t = table(4, false, 0, 10);
    lease_grant_t a = grant1(t, 1, 0);
    cr_assert_eq(lease_table_expire(t, TIMEOUT - 0.5), 0);
    cr_assert(lease_table_is_active(t, a.lease_id));
    cr_assert_eq(lease_table_expire(t, TIMEOUT), 1);
    cr_assert_not(lease_table_is_active(t, a.lease_id));
    lease_grant_t b = grant1(t, 2, TIMEOUT);
    cr_assert(b.relet, "the expired unit comes first");
    cr_assert_eq(b.prompt_id, a.prompt_id);
    cr_assert_eq(b.epoch, a.epoch);
    cr_assert_neq(b.lease_id, a.lease_id, "a re-lease gets another group id");
    /* The slow worker's late group arrives first: accepted. */
    double leased_s = 0;
    uint64_t version = 0;
    cr_assert_eq(
        lease_table_submit(t, a.lease_id, a.prompt_id, a.epoch, true, 12, &leased_s, &version),
        LEASE_ACCEPTED);
    cr_assert_float_eq(leased_s, 12.0, 1e-12);
    cr_assert_eq(version, 3);
    /* The re-lease's copy is a duplicate, and so is a resend of the accepted one. */
    cr_assert_eq(submit(t, &b, 13), LEASE_DUPLICATE);
    cr_assert_eq(submit(t, &a, 13), LEASE_DUPLICATE);
    lease_table_stats_t s;
    lease_table_stats(t, &s);
    cr_assert_eq(s.expired, 1);
    cr_assert_eq(s.relet, 1);
    cr_assert_eq(s.accepted, 1);
    cr_assert_eq(s.duplicates, 2);
    cr_assert_eq(s.active, 0, "accepting the unit forgot its re-lease");
    cr_assert_eq(s.expired_now, 0);
    lease_table_destroy(&t);
}

Test(lease_table, expired_unit_accepted_before_relet_leaves_queue) {
    lease_table_t *t = table(3, false, 0, 10);
    lease_grant_t a = grant1(t, 1, 0);
    cr_assert_eq(lease_table_expire(t, 100), 1);
    cr_assert_eq(submit(t, &a, 101), LEASE_ACCEPTED);
    lease_table_stats_t s;
    lease_table_stats(t, &s);
    cr_assert_eq(s.queued, 0);
    lease_grant_t b = grant1(t, 1, 102);
    cr_assert_not(b.relet);
    cr_assert_neq(b.prompt_id, a.prompt_id);
    lease_table_destroy(&t);
}

Test(lease_table, release_owner_expires_only_its_leases) {
    lease_table_t *t = table(10, false, 0, 10);
    lease_grant_t g[4];
    cr_assert_eq(lease_table_grant(t, 1, 2, 0, TIMEOUT, 0, g), 2);
    cr_assert_eq(lease_table_grant(t, 2, 2, 0, TIMEOUT, 0, g + 2), 2);
    cr_assert_eq(lease_table_release(t, 1), 2);
    cr_assert_not(lease_table_is_active(t, g[0].lease_id));
    cr_assert_not(lease_table_is_active(t, g[1].lease_id));
    cr_assert(lease_table_is_active(t, g[2].lease_id));
    lease_grant_t r[2];
    cr_assert_eq(lease_table_grant(t, 2, 2, 1, TIMEOUT, 0, r), 2);
    cr_assert(r[0].relet && r[1].relet);
    cr_assert_eq(r[0].prompt_id, g[0].prompt_id);
    cr_assert_eq(r[1].prompt_id, g[1].prompt_id);
    lease_table_stats_t s;
    lease_table_stats(t, &s);
    cr_assert_eq(s.released, 2);
    cr_assert_eq(s.expired, 0);
    lease_table_destroy(&t);
}

Test(lease_table, unknown_and_rejected) {
    lease_table_t *t = table(5, false, 0, 10);
    lease_grant_t a = grant1(t, 1, 0);
    cr_assert_eq(lease_table_submit(t, 999, a.prompt_id, a.epoch, true, 1, NULL, NULL),
                 LEASE_UNKNOWN, "never issued");
    cr_assert_eq(lease_table_submit(t, 0, a.prompt_id, a.epoch, true, 1, NULL, NULL),
                 LEASE_UNKNOWN);
    cr_assert_eq(lease_table_submit(t, a.lease_id, a.prompt_id + 1, a.epoch, true, 1, NULL, NULL),
                 LEASE_REJECTED, "the group names another prompt than its lease");
    cr_assert_not(lease_table_is_active(t, a.lease_id), "a rejected lease is re-leased");
    lease_grant_t b = grant1(t, 2, 2);
    cr_assert(b.relet);
    cr_assert_eq(b.prompt_id, a.prompt_id);
    cr_assert_eq(lease_table_submit(t, b.lease_id, b.prompt_id, b.epoch, false, 3, NULL, NULL),
                 LEASE_REJECTED, "invalid group");
    cr_assert_eq(submit(t, &a, 4), LEASE_ACCEPTED, "a valid copy under the old lease still counts");
    lease_table_stats_t s;
    lease_table_stats(t, &s);
    cr_assert_eq(s.unknown, 2);
    cr_assert_eq(s.rejected, 2);
    cr_assert_eq(s.accepted, 1);
    lease_table_destroy(&t);
}

/* lease_table_check gives the verdict (and lease info) lease_table_submit then gives, and
 * changes nothing: the saved state, the counters, the gauges and the lease's state. */
static lease_verdict_t check_then_submit(lease_table_t *t, uint64_t lease, uint64_t prompt,
                                         uint64_t epoch, bool valid, double now) {
    uint8_t *before = NULL, *after = NULL;
    size_t before_len = 0, after_len = 0;
    lease_table_stats_t s0, s1;
    cr_assert_eq(lease_table_save(t, &before, &before_len, NULL), 0);
    lease_table_stats(t, &s0);
    int active = lease_table_is_active(t, lease);
    double check_s = -7, submit_s = -7;
    uint64_t check_version = 99, submit_version = 99;
    lease_verdict_t v =
        lease_table_check(t, lease, prompt, epoch, valid, now, &check_s, &check_version);
    cr_assert_eq(lease_table_save(t, &after, &after_len, NULL), 0);
    lease_table_stats(t, &s1);
    cr_assert_eq(after_len, before_len);
    cr_assert_eq(memcmp(after, before, before_len), 0, "check changed the saved state");
    cr_assert_eq(memcmp(&s1, &s0, sizeof s0), 0, "check changed the counters");
    cr_assert_eq(lease_table_is_active(t, lease), active, "check changed the lease's state");
    free(before);
    free(after);
    cr_assert_eq(
        lease_table_submit(t, lease, prompt, epoch, valid, now, &submit_s, &submit_version), v,
        "lease %llu: check said %s", (unsigned long long)lease, lease_verdict_name(v));
    cr_assert_eq(check_s, submit_s);
    cr_assert_eq(check_version, submit_version);
    return v;
}

Test(lease_table, check_gives_the_submit_verdict_and_changes_nothing) {
    lease_table_t *t = table(5, false, 0, 10);
    lease_grant_t a = grant1(t, 1, 0), b = grant1(t, 1, 0), c = grant1(t, 1, 0);
    cr_assert_eq(check_then_submit(t, 999, a.prompt_id, a.epoch, true, 1), LEASE_UNKNOWN);
    cr_assert_eq(check_then_submit(t, 0, a.prompt_id, a.epoch, true, 1), LEASE_UNKNOWN);
    cr_assert_eq(check_then_submit(t, a.lease_id, a.prompt_id + 1, a.epoch, true, 1),
                 LEASE_REJECTED, "another unit than the lease's");
    cr_assert_eq(check_then_submit(t, b.lease_id, b.prompt_id, b.epoch, false, 1), LEASE_REJECTED,
                 "invalid group");
    cr_assert_eq(check_then_submit(t, c.lease_id, c.prompt_id, c.epoch, true, 2), LEASE_ACCEPTED);
    cr_assert_eq(check_then_submit(t, c.lease_id, c.prompt_id, c.epoch, true, 3), LEASE_DUPLICATE);
    cr_assert_eq(check_then_submit(t, a.lease_id, a.prompt_id, a.epoch, true, 4), LEASE_ACCEPTED,
                 "a valid copy under the expired lease");
    double leased_s = 0;
    uint64_t version = 0;
    cr_assert_eq(
        lease_table_check(t, b.lease_id, b.prompt_id, b.epoch, true, 6, &leased_s, &version),
        LEASE_ACCEPTED);
    cr_assert_float_eq(leased_s, 6.0, 1e-12);
    cr_assert_eq(version, 3);
    lease_table_stats_t s;
    lease_table_stats(t, &s);
    cr_assert_eq(s.unknown, 2, "counted by the submits only");
    cr_assert_eq(s.rejected, 2);
    cr_assert_eq(s.accepted, 2);
    cr_assert_eq(s.duplicates, 1);
    cr_assert_eq(s.queued, 1, "b's unit waits for a re-lease");
    lease_table_destroy(&t);
}

static lease_table_t *reload(lease_table_t **t, uint64_t n, uint64_t max_epochs, uint64_t limit) {
    uint8_t *buf = NULL;
    size_t len = 0;
    qerr_t err;
    cr_assert_eq(lease_table_save(*t, &buf, &len, &err), 0, "%s", err.msg);
    lease_table_options_t o = {.n_prompts = n,
                               .shuffle = true,
                               .seed = 77,
                               .fingerprint = 0xfeed,
                               .max_epochs = max_epochs};
    lease_table_t *r = lease_table_restore(&o, buf, len, &err);
    cr_assert_not_null(r, "%s", err.msg);
    free(buf);
    lease_table_destroy(t);
    lease_table_set_limit(r, limit);
    return r;
}

Test(lease_table, save_restore_keeps_leases_valid_and_order) {
    lease_table_t *t = table(20, true, 0, 8), *twin = table(20, true, 0, 100);
    lease_grant_t g[8], tg[8];
    cr_assert_eq(lease_table_grant(t, 1, 8, 0, TIMEOUT, 5, g), 8);
    cr_assert_eq(lease_table_grant(twin, 1, 8, 0, TIMEOUT, 5, tg), 8);
    cr_assert_eq(submit(t, &g[0], 1), LEASE_ACCEPTED);
    cr_assert_eq(submit(t, &g[1], 1), LEASE_ACCEPTED);
    cr_assert_eq(lease_table_release(t, 1), 6); /* g[2..7] expired, queued */
    lease_grant_t r = grant1(t, 2, 2);          /* g[2]'s unit re-leased */
    cr_assert_eq(submit(t, &g[3], 2), LEASE_ACCEPTED);
    lease_table_stats_t before, after;
    lease_table_stats(t, &before);
    /* The state is saved; then this incarnation grants one more lease and dies. */
    uint8_t *saved = NULL;
    size_t saved_len = 0;
    cr_assert_eq(lease_table_save(t, &saved, &saved_len, NULL), 0);
    lease_grant_t late = grant1(t, 1, 3);
    lease_table_destroy(&t);
    lease_table_options_t o = {.n_prompts = 20, .shuffle = true, .seed = 77, .fingerprint = 0xfeed};
    qerr_t err;
    t = lease_table_restore(&o, saved, saved_len, &err);
    cr_assert_not_null(t, "%s", err.msg);
    free(saved);
    lease_table_set_limit(t, 8);
    lease_table_stats(t, &after);
    cr_assert_eq(after.accepted, before.accepted);
    cr_assert_eq(after.granted, before.granted);
    cr_assert_eq(after.released, before.released);
    cr_assert_eq(after.epoch, before.epoch);
    cr_assert_eq(after.position, before.position);
    cr_assert_eq(after.active, 0, "restored leases are all expired");
    cr_assert_eq(after.queued, 5, "units of g[2], g[4..7] wait for a re-lease");
    for (int i = 0; i < 4; i++)
        cr_assert_eq(lease_table_is_accepted(t, g[i].prompt_id, g[i].epoch), i != 2);

    /* A group under a lease of the old incarnation still counts once. */
    double leased_s = 0;
    cr_assert_eq(lease_table_submit(t, r.lease_id, r.prompt_id, r.epoch, true, 0, &leased_s, NULL),
                 LEASE_ACCEPTED);
    cr_assert_lt(leased_s, 0, "granted before the restore");
    cr_assert_eq(submit(t, &g[2], 0), LEASE_DUPLICATE);
    cr_assert_eq(submit(t, &g[0], 0), LEASE_DUPLICATE);
    cr_assert_eq(lease_table_submit(t, 1000, 1, 0, true, 0, NULL, NULL), LEASE_UNKNOWN);

    /* Re-leases of g[4..7] first (with fresh ids above every old one), then the twin's order. */
    lease_grant_t n[8];
    cr_assert_eq(lease_table_grant(t, 3, 8, 0, TIMEOUT, 5, n), 8);
    cr_assert_eq(
        lease_table_submit(t, late.lease_id, late.prompt_id, late.epoch, true, 0, NULL, NULL),
        LEASE_UNKNOWN, "a lease granted after the save");
    for (int i = 0; i < 8; i++)
        cr_assert_neq(n[i].lease_id, late.lease_id, "a lease id is granted twice");
    for (int i = 0; i < 4; i++) {
        cr_assert(n[i].relet);
        cr_assert_eq(n[i].prompt_id, g[4 + i].prompt_id);
        cr_assert_gt(n[i].lease_id, r.lease_id);
    }
    cr_assert_eq(lease_table_grant(twin, 1, 4, 0, TIMEOUT, 5, tg), 4);
    for (int i = 0; i < 4; i++) {
        cr_assert_not(n[4 + i].relet);
        cr_assert_eq(n[4 + i].prompt_id, tg[i].prompt_id);
        cr_assert_eq(n[4 + i].epoch, tg[i].epoch);
    }
    lease_table_destroy(&t);
    lease_table_destroy(&twin);
}

Test(lease_table, restore_refuses_bad_state) {
    lease_table_t *t = table(20, true, 0, 8);
    lease_grant_t g[3];
    cr_assert_eq(lease_table_grant(t, 1, 3, 0, TIMEOUT, 0, g), 3);
    cr_assert_eq(submit(t, &g[1], 0), LEASE_ACCEPTED);
    uint8_t *buf = NULL;
    size_t len = 0;
    cr_assert_eq(lease_table_save(t, &buf, &len, NULL), 0);
    lease_table_options_t o = {.n_prompts = 20, .shuffle = true, .seed = 77, .fingerprint = 0xfeed};
    qerr_t err;
    lease_table_t *r = lease_table_restore(&o, buf, len, &err);
    cr_assert_not_null(r, "%s", err.msg);
    lease_table_destroy(&r);

    lease_table_options_t other = o;
    other.seed = 78;
    cr_assert_null(lease_table_restore(&other, buf, len, &err));
    cr_assert_eq(err.code, QERR_INVALID);
    cr_assert(strstr(err.msg, "another dataset") != NULL, "%s", err.msg);
    other = o;
    other.fingerprint = 1;
    cr_assert_null(lease_table_restore(&other, buf, len, &err));

    for (size_t cut = 0; cut < len; cut += 8) {
        cr_assert_null(lease_table_restore(&o, buf, cut, &err), "cut at %zu", cut);
        cr_assert(err.code == QERR_PARSE, "cut at %zu: %s", cut, err.msg);
    }
    cr_assert_null(lease_table_restore(&o, buf, len - 1, &err));

    uint8_t *bad = malloc(len);
    memcpy(bad, buf, len);
    bad[8] = 2; /* format version */
    cr_assert_null(lease_table_restore(&o, bad, len, &err));
    cr_assert_eq(err.code, QERR_VERSION);
    memcpy(bad, buf, len);
    bad[0] ^= 1; /* magic */
    cr_assert_null(lease_table_restore(&o, bad, len, &err));
    cr_assert_eq(err.code, QERR_PARSE);
    /* The first remembered lease names the accepted unit g[1]. */
    size_t entry0 = len - 2 * 4 * 8; /* 2 leases, no queue */
    memcpy(bad, buf, len);
    for (int i = 0; i < 8; i++)
        bad[entry0 + 8 + (size_t)i] = (uint8_t)(g[1].prompt_id >> (8 * i));
    cr_assert_null(lease_table_restore(&o, bad, len, &err));
    cr_assert_eq(err.code, QERR_INVALID, "%s", err.msg);
    memcpy(bad, buf, len);
    bad[entry0] = 0; /* lease id 0 */
    memset(bad + entry0, 0, 8);
    cr_assert_null(lease_table_restore(&o, bad, len, &err));
    cr_assert_eq(err.code, QERR_INVALID);
    free(bad);
    free(buf);
    lease_table_destroy(&t);
}

/* Randomised run: workers take leases, some return groups late, twice, or never; leases time
 * out; workers die; the table is saved and restored now and then (restarts). Every unit of
 * every epoch must be accepted exactly once, and every verdict must match a reference that
 * remembers every lease ever granted. */
Test(lease_table, randomised_exactly_once_with_restarts) {
    const uint64_t n = 20, epochs = 4;
    lease_table_t *t = table(n, true, epochs, 6);
    enum { MAXL = 4096 };
    static uint64_t lid[MAXL], lp[MAXL], le[MAXL];
    static int held[MAXL]; /* 1: a worker still holds the lease's group */
    static int acc[4][20];
    uint64_t n_leases = 0;
    rng_stream_t rs;
    rng_stream_init(&rs, 1, 2, 3);
    double now = 0;
    int steps = 0, restores = 0;
    while (!lease_table_finished(t)) {
        cr_assert_lt(++steps, 200000, "the run does not finish");
        now += 0.5;
        uint64_t r = rng_stream_next_u64(&rs) % 100;
        if (r < 30) {
            lease_grant_t g[3];
            size_t k = lease_table_grant(t, 1 + r % 3, 3, now, TIMEOUT, 0, g);
            for (size_t i = 0; i < k; i++) {
                cr_assert_lt(n_leases, MAXL);
                cr_assert(n_leases == 0 || g[i].lease_id > lid[n_leases - 1], "ids count up");
                lid[n_leases] = g[i].lease_id;
                cr_assert_eq(acc[g[i].epoch][g[i].prompt_id], 0, "an accepted unit is leased");
                lp[n_leases] = g[i].prompt_id;
                le[n_leases] = g[i].epoch;
                held[n_leases] = 1;
                n_leases++;
            }
        } else if (r < 85 && n_leases > 0) {
            /* Some worker returns a group: mostly recent leases, sometimes a resend. */
            uint64_t i = n_leases - 1 - rng_stream_next_u64(&rs) % (n_leases < 8 ? n_leases : 8);
            if (!held[i] && rng_stream_next_u64(&rs) % 4 != 0)
                continue;
            held[i] = 0;
            int was = acc[le[i]][lp[i]];
            lease_verdict_t v = lease_table_submit(t, lid[i], lp[i], le[i], true, now, NULL, NULL);
            cr_assert_eq(v, was ? LEASE_DUPLICATE : LEASE_ACCEPTED, "lease %llu",
                         (unsigned long long)lid[i]);
            acc[le[i]][lp[i]] += v == LEASE_ACCEPTED;
        } else if (r < 90) {
            lease_table_release(t, 1 + r % 3);
        } else if (r < 97) {
            lease_table_expire(t, now);
        } else {
            t = reload(&t, n, epochs, 6);
            restores++;
        }
    }
    for (uint64_t e = 0; e < epochs; e++)
        for (uint64_t p = 0; p < n; p++)
            cr_assert_eq(acc[e][p], 1, "unit (%llu, %llu)", (unsigned long long)p,
                         (unsigned long long)e);
    lease_table_stats_t s;
    lease_table_stats(t, &s);
    cr_assert_eq(s.accepted, n * epochs);
    cr_assert_eq(s.granted, n_leases);
    /* The run went through every path it is meant to test. */
    cr_assert_gt(s.duplicates, 0);
    cr_assert_gt(s.expired, 0);
    cr_assert_gt(s.released, 0);
    cr_assert_gt(s.relet, 0);
    cr_assert_gt(restores, 0);
    lease_table_destroy(&t);
}

/* ---- the dispatcher on a real socket, driven by a hand-written worker ---- */

#define RIG_PROMPTS 2

typedef struct {
    int groups; /* groups taken */
    uint64_t last_lease, last_version;
    bool refuse_first;          /* refuse the first delivery of each prompt */
    int delivered[RIG_PROMPTS]; /* on_group calls per prompt */
    int refused;
} sink_t;

static int sink_group(void *ctx, const Quillan__TrajectoryGroup *g,
                      const dispatcher_group_info_t *info) {
    sink_t *s = ctx;
    cr_assert_eq(g->lease_id, info->lease_id);
    cr_assert_lt(g->prompt_id, RIG_PROMPTS);
    if (s->refuse_first && s->delivered[g->prompt_id]++ == 0) {
        s->refused++;
        return -1;
    }
    s->groups++;
    s->last_lease = info->lease_id;
    s->last_version = info->lease_version;
    return 0;
}

/* A dispatcher over a two-prompt dataset, and one worker's DEALER. */
typedef struct {
    char path[64];
    jsonl_reader_t *r;
    tokenizer_t *tok;
    void *zctx;
    dispatcher_options_t o;
    dispatcher_t *d;
    net_socket_t *w;
} rig_t;

/* Writes the dataset and fills x->o (dataset order, G = 2, heartbeats every 50 ms). */
static void rig_options(rig_t *x, sink_t *sink) {
    memset(x, 0, sizeof *x);
    snprintf(x->path, sizeof x->path, "/tmp/quillan-test-dispatcher-XXXXXX");
    int fd = mkstemp(x->path);
    cr_assert_geq(fd, 0);
    const char *lines = "{\"prompt\": \"1+1=\", \"answer\": \"2\"}\n"
                        "{\"prompt\": \"2+2=\", \"answer\": \"4\"}\n";
    cr_assert_eq(write(fd, lines, strlen(lines)), (ssize_t)strlen(lines));
    close(fd);
    qerr_t e;
    x->r = jsonl_reader_new(x->path, 0, &e);
    cr_assert_not_null(x->r, "%s", e.msg);
    x->tok = tokenizer_new_byte();
    dispatcher_options_t *o = &x->o;
    dispatcher_options_init(o);
    o->endpoint = "tcp://127.0.0.1:*";
    o->limits = (dispatch_codec_limits_t){.vocab_size = TOKENIZER_BYTE_VOCAB,
                                          .max_group_size = 2,
                                          .max_prompt_tokens = 16,
                                          .max_new_tokens = 4};
    o->max_new_tokens = 4;
    o->shuffle = false;
    o->data = x->r;
    o->tokenizer = x->tok;
    o->heartbeat_ivl_s = 0.05;
    o->on_group = sink_group;
    o->on_group_ctx = sink;
    o->net.linger_ms = 0;
    x->zctx = zmq_ctx_new();
}

/* Creates the dispatcher from x->o and connects worker "w" (incarnation 42) to it. */
static void rig_start(rig_t *x) {
    qerr_t e;
    x->d = dispatcher_new(x->zctx, &x->o, NULL, 0, &e);
    cr_assert_not_null(x->d, "%s", e.msg);
    net_socket_spec_t spec = {.type = ZMQ_DEALER,
                              .protocol = WIRE_PROTOCOL_DISPATCH,
                              .name = "w",
                              .sender_id = "w",
                              .incarnation_id = 42};
    x->w = net_socket_new(x->zctx, &spec, &x->o.net, &x->o.security, &e);
    cr_assert_not_null(x->w, "%s", e.msg);
    cr_assert_eq(net_socket_connect(x->w, dispatcher_endpoint(x->d), &e), 0);
}

static void rig_free(rig_t *x) {
    net_socket_destroy(&x->w);
    dispatcher_destroy(&x->d);
    cr_assert_null(x->d);
    zmq_ctx_term(x->zctx);
    jsonl_reader_destroy(&x->r);
    tokenizer_destroy(&x->tok);
    unlink(x->path);
}

/* Polls the dispatcher until the worker socket receives a message of body `want`. */
static net_msg_t *exchange(dispatcher_t *d, net_socket_t *w, Quillan__Envelope__BodyCase want) {
    for (int i = 0; i < 200; i++) {
        qerr_t e;
        cr_assert_geq(dispatcher_poll(d, 10, &e), 0, "%s", e.msg);
        net_msg_t *m = NULL;
        int rc = net_recv(w, 10, &m, &e);
        cr_assert_geq(rc, 0, "%s", e.msg);
        if (rc == 1 && net_msg_envelope(m)->body_case == want)
            return m;
        net_msg_destroy(&m);
    }
    cr_assert_fail("no '%s' arrived", wire_body_name(want));
    return NULL;
}

static void wsend(net_socket_t *w, Quillan__Envelope *env) {
    qerr_t e;
    cr_assert_eq(net_send(w, NULL, env, NULL, 0, NULL, &e), 0, "%s", e.msg);
}

static Quillan__AckStatus group_answer(dispatcher_t *d, net_socket_t *w, uint64_t lease,
                                       uint64_t prompt, size_t n_traj, const uint32_t *prompt_tok,
                                       size_t n_prompt) {
    uint32_t tok[2] = {'a', TOKENIZER_BYTE_EOS};
    float lp[2] = {-1.0f, -0.5f};
    Quillan__Trajectory t[3], *tp[3];
    for (size_t i = 0; i < 3; i++) {
        quillan__trajectory__init(&t[i]);
        t[i].n_completion_tokens = 2;
        t[i].completion_tokens = tok;
        t[i].n_behaviour_logprobs = 2;
        t[i].behaviour_logprobs = lp;
        t[i].finish_reason = QUILLAN__FINISH_REASON__FINISH_REASON_STOP;
        tp[i] = &t[i];
    }
    Quillan__SamplingParams sp = QUILLAN__SAMPLING_PARAMS__INIT;
    sp.temperature = 1;
    sp.max_new_tokens = 4;
    Quillan__TrajectoryGroup g = QUILLAN__TRAJECTORY_GROUP__INIT;
    g.lease_id = lease;
    g.prompt_id = prompt;
    g.n_prompt_tokens = n_prompt;
    g.prompt_tokens = (uint32_t *)prompt_tok;
    g.n_trajectories = n_traj;
    g.trajectories = tp;
    g.sampling = &sp;
    Quillan__Envelope env = QUILLAN__ENVELOPE__INIT;
    env.body_case = QUILLAN__ENVELOPE__BODY_TRAJECTORY_GROUP;
    env.trajectory_group = &g;
    wsend(w, &env);
    net_msg_t *m = exchange(d, w, QUILLAN__ENVELOPE__BODY_ACK);
    const Quillan__Ack *a = net_msg_envelope(m)->ack;
    cr_assert_eq(a->lease_id, lease);
    Quillan__AckStatus st = a->status;
    net_msg_destroy(&m);
    return st;
}

static void work_request(net_socket_t *w, uint32_t credits) {
    Quillan__WorkRequest wr = QUILLAN__WORK_REQUEST__INIT;
    wr.worker_id = "w";
    wr.credits = credits;
    wr.host = "h";
    Quillan__Envelope env = QUILLAN__ENVELOPE__INIT;
    env.body_case = QUILLAN__ENVELOPE__BODY_WORK_REQUEST;
    env.work_request = &wr;
    wsend(w, &env);
}

Test(dispatcher, leases_acks_and_malformed_over_a_socket) {
    sink_t sink = {0};
    rig_t x;
    rig_options(&x, &sink);
    qerr_t e;

    /* A prompt longer than max_prompt_tokens is refused at start, naming the line. */
    x.o.limits.max_prompt_tokens = 4;
    cr_assert_null(dispatcher_new(x.zctx, &x.o, NULL, 0, &e));
    cr_assert(strstr(e.msg, ":1:") != NULL, "%s", e.msg);
    x.o.limits.max_prompt_tokens = 16;

    rig_start(&x);
    dispatcher_t *d = x.d;
    net_socket_t *w = x.w;
    dispatcher_set_lease_limit(d, 1);
    dispatcher_set_versions(d, 7, 6);
    work_request(w, 3);
    net_msg_t *m = exchange(d, w, QUILLAN__ENVELOPE__BODY_LEASE);
    const Quillan__Lease *l = net_msg_envelope(m)->lease;
    cr_assert_eq(l->n_requests, 1, "the admission limit caps 3 credits at 1");
    cr_assert_eq(l->policy_version, 7);
    const Quillan__RolloutRequest *rq = l->requests[0];
    cr_assert_eq(rq->prompt_id, 0);
    cr_assert_eq(rq->group_size, 2);
    cr_assert_eq(rq->min_version, 7);
    cr_assert_eq(rq->n_prompt_tokens, 5, "BOS + \"1+1=\"");
    cr_assert_eq(rq->prompt_tokens[0], TOKENIZER_BYTE_BOS);
    cr_assert_eq(rq->prompt_tokens[1], '1');
    cr_assert_str_eq(rq->prompt_text, "1+1=");
    cr_assert_eq(rq->n_metadata, 1);
    cr_assert_str_eq(rq->metadata[0]->key, "answer");
    cr_assert_str_eq(rq->metadata[0]->value, "\"2\"");
    uint64_t lease = rq->lease_id;
    uint32_t ptok[5];
    memcpy(ptok, rq->prompt_tokens, sizeof ptok);
    net_msg_destroy(&m);

    /* A heartbeat from the learner carries the versions. */
    m = exchange(d, w, QUILLAN__ENVELOPE__BODY_HEARTBEAT);
    cr_assert_eq(net_msg_envelope(m)->heartbeat->snapshot_version, 7);
    cr_assert_eq(net_msg_envelope(m)->heartbeat->old_policy_version, 6);
    net_msg_destroy(&m);

    cr_assert_eq(group_answer(d, w, lease + 100, 0, 2, ptok, 5),
                 QUILLAN__ACK_STATUS__ACK_STATUS_UNKNOWN_LEASE);
    cr_assert_eq(group_answer(d, w, lease, 0, 3, ptok, 5), QUILLAN__ACK_STATUS__ACK_STATUS_REJECTED,
                 "3 trajectories, G is 2");
    cr_assert_eq(sink.groups, 0);
    /* The rejected lease went back to the queue: ask again, get the same prompt anew. */
    work_request(w, 3);
    m = exchange(d, w, QUILLAN__ENVELOPE__BODY_LEASE);
    l = net_msg_envelope(m)->lease;
    cr_assert_eq(l->n_requests, 1);
    cr_assert_eq(l->requests[0]->prompt_id, 0);
    cr_assert_neq(l->requests[0]->lease_id, lease);
    uint64_t lease2 = l->requests[0]->lease_id;
    net_msg_destroy(&m);
    cr_assert_eq(group_answer(d, w, lease2, 0, 2, ptok, 5),
                 QUILLAN__ACK_STATUS__ACK_STATUS_ACCEPTED);
    cr_assert_eq(sink.groups, 1);
    cr_assert_eq(sink.last_lease, lease2);
    cr_assert_eq(group_answer(d, w, lease2, 0, 2, ptok, 5),
                 QUILLAN__ACK_STATUS__ACK_STATUS_DUPLICATE);

    /* A body a worker never sends is dropped and counted. */
    Quillan__Ack ack = QUILLAN__ACK__INIT;
    ack.lease_id = 1;
    ack.status = QUILLAN__ACK_STATUS__ACK_STATUS_ACCEPTED;
    Quillan__Envelope bad = QUILLAN__ENVELOPE__INIT;
    bad.body_case = QUILLAN__ENVELOPE__BODY_ACK;
    bad.ack = &ack;
    wsend(w, &bad);
    dispatcher_stats_t st = {0};
    for (int i = 0; i < 100 && st.malformed == 0; i++) {
        cr_assert_geq(dispatcher_poll(d, 10, &e), 0);
        dispatcher_stats(d, &st);
    }
    cr_assert_eq(st.malformed, 1);
    cr_assert_eq(st.table.accepted, 1);
    cr_assert_eq(st.table.rejected, 1);
    cr_assert_eq(st.table.unknown, 1);
    cr_assert_eq(st.table.duplicates, 1);
    dispatcher_worker_t rows[2];
    cr_assert_eq(dispatcher_workers(d, rows, 2), 1);
    cr_assert_str_eq(rows[0].id, "w");
    cr_assert_str_eq(rows[0].host, "h");
    cr_assert_eq(rows[0].groups_done, 1);
    cr_assert(rows[0].alive);

    rig_free(&x);
}

/* A group on_group refuses is REJECTED and its unit leased again; the next delivery of the
 * unit is taken, and the epoch ends with every unit accepted exactly once. */
Test(dispatcher, refused_group_is_leased_again) {
    sink_t sink = {.refuse_first = true};
    rig_t x;
    rig_options(&x, &sink);
    x.o.max_epochs = 1;
    rig_start(&x);
    dispatcher_set_lease_limit(x.d, RIG_PROMPTS);
    dispatcher_set_versions(x.d, 7, 6);

    uint64_t first[RIG_PROMPTS], second[RIG_PROMPTS];
    uint32_t ptok[RIG_PROMPTS][16];
    size_t n_ptok[RIG_PROMPTS];
    for (int round = 0; round < 2; round++) {
        work_request(x.w, RIG_PROMPTS);
        net_msg_t *m = exchange(x.d, x.w, QUILLAN__ENVELOPE__BODY_LEASE);
        const Quillan__Lease *l = net_msg_envelope(m)->lease;
        cr_assert_eq(l->n_requests, RIG_PROMPTS, "round %d", round);
        for (size_t i = 0; i < RIG_PROMPTS; i++) {
            const Quillan__RolloutRequest *rq = l->requests[i];
            cr_assert_eq(rq->prompt_id, i, "round %d: dataset order, re-leases in expiry order",
                         round);
            cr_assert_leq(rq->n_prompt_tokens, 16);
            n_ptok[i] = rq->n_prompt_tokens;
            memcpy(ptok[i], rq->prompt_tokens, n_ptok[i] * sizeof *ptok[i]);
            (round == 0 ? first : second)[i] = rq->lease_id;
        }
        net_msg_destroy(&m);
        const Quillan__AckStatus want = round == 0 ? QUILLAN__ACK_STATUS__ACK_STATUS_REJECTED
                                                   : QUILLAN__ACK_STATUS__ACK_STATUS_ACCEPTED;
        for (size_t i = 0; i < RIG_PROMPTS; i++)
            cr_assert_eq(
                group_answer(x.d, x.w, round == 0 ? first[i] : second[i], i, 2, ptok[i], n_ptok[i]),
                want, "round %d, prompt %zu", round, i);
        dispatcher_stats_t st;
        dispatcher_stats(x.d, &st);
        if (round == 0) {
            cr_assert_eq(sink.refused, RIG_PROMPTS);
            cr_assert_eq(sink.groups, 0);
            cr_assert_eq(st.refused, RIG_PROMPTS);
            cr_assert_eq(st.table.rejected, RIG_PROMPTS);
            cr_assert_eq(st.table.accepted, 0, "a refused group's unit is not accepted");
            cr_assert_eq(st.table.active, 0, "its lease expired");
            cr_assert_eq(st.table.queued, RIG_PROMPTS, "its unit waits for a re-lease");
            cr_assert_not(dispatcher_finished(x.d));
        }
    }
    for (size_t i = 0; i < RIG_PROMPTS; i++)
        cr_assert_neq(second[i], first[i], "a re-lease gets another group id");
    cr_assert_eq(sink.groups, RIG_PROMPTS);
    cr_assert_eq(sink.last_lease, second[RIG_PROMPTS - 1]);
    cr_assert_eq(sink.last_version, 7, "the lease's version reaches on_group");
    cr_assert(dispatcher_finished(x.d), "every unit of the one epoch is accepted");
    /* The refused copy, sent again, is a duplicate now and never reaches on_group. */
    cr_assert_eq(group_answer(x.d, x.w, first[0], 0, 2, ptok[0], n_ptok[0]),
                 QUILLAN__ACK_STATUS__ACK_STATUS_DUPLICATE);
    for (size_t i = 0; i < RIG_PROMPTS; i++)
        cr_assert_eq(sink.delivered[i], 2, "prompt %zu", i);
    dispatcher_stats_t st;
    dispatcher_stats(x.d, &st);
    cr_assert_eq(st.table.accepted, RIG_PROMPTS);
    cr_assert_eq(st.table.relet, RIG_PROMPTS);
    cr_assert_eq(st.table.duplicates, 1);
    cr_assert_eq(st.refused, RIG_PROMPTS);
    dispatcher_worker_t row;
    cr_assert_eq(dispatcher_workers(x.d, &row, 1), 1);
    cr_assert_eq(row.groups_done, RIG_PROMPTS, "refused groups are not counted as done");
    rig_free(&x);
}

/* Regression (libFuzzer, fuzz_lease_restore): a state whose epoch counters sit next to 2^64
 * made the epoch arithmetic wrap and the restore grow its tables without end. */
Test(lease_table, restore_refuses_epochs_near_overflow, .timeout = 30) {
    const char *path = QUILLAN_SOURCE_DIR "/tests/fuzz/corpus/fuzz_lease_restore/"
                                          "regression-epoch-overflow";
    FILE *f = fopen(path, "rb");
    cr_assert_not_null(f, "%s", path);
    uint8_t buf[4096];
    const size_t len = fread(buf, 1, sizeof buf, f);
    fclose(f);
    cr_assert_gt(len, 0);
    /* the options fuzz_state.c restores with (tests/fuzz/fuzz_seed_config.h) */
    lease_table_options_t o = {.n_prompts = 12,
                               .shuffle = true,
                               .seed = 1234,
                               .fingerprint = 0x5eedf00dcafe1234ull,
                               .max_epochs = 3};
    qerr_t err;
    lease_table_t *t = lease_table_restore(&o, buf, len, &err);
    cr_assert_null(t);
    cr_assert(strstr(err.msg, "epoch"), "%s", err.msg);
}
