/* The learner's own ledger of a finished run, read back from its checkpoint, as one JSON object
 * on stdout: the lease table's counters (learner/dispatcher.h), what became of every unit it
 * handed out, and the batcher's counters (learner/batcher.h). The fault tests
 * (tests/e2e/netns_test.sh, bench/soak.sh) compare it with the daemons' JSON logs
 * (tests/e2e/netns_check.py).
 *
 *   netns_ledger CHECKPOINT_DIR CONFIG [--set a.b=c]...
 *
 * CONFIG and the --set overrides must be the learner's (the dataset identity and the batcher
 * settings are checked against the saved state). Every unit handed out (the first `position`
 * units of each epoch up to the current one, in the table's data order) is classified as
 * accepted (in the accepted set) or pending (queued for a re-lease after restore: every unit
 * whose lease was still remembered); any other is "lost". Exit 0 with the JSON, 1 on a runtime
 * error, 2 on usage. */
#include "batcher.h"
#include "config.h"
#include "dapo.h"
#include "dispatcher.h"
#include "jsonl.h"
#include "learner.h"
#include "safetensors.h"

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Units listed by id in the output; the counts are always complete. */
#define LEDGER_LIST_MAX 100000
#define LEDGER_GRANT_CHUNK 256

/* A unit as [prompt, epoch] in a JSON list; *first tracks the separator. */
static void unit_print(uint64_t p, uint64_t e, int *first) {
    printf("%s[%" PRIu64 ",%" PRIu64 "]", *first ? "" : ",", p, e);
    *first = 0;
}

static int pending_cmp(const void *a, const void *b) {
    const lease_grant_t *x = a, *y = b;
    if (x->epoch != y->epoch)
        return x->epoch < y->epoch ? -1 : 1;
    return x->prompt_id < y->prompt_id ? -1 : x->prompt_id > y->prompt_id;
}

/* Every re-lease the restored table holds (its pending units), in *out (malloc'd). */
static int pending_take(lease_table_t *t, lease_grant_t **out, size_t *n_out) {
    lease_table_set_limit(t, UINT64_MAX);
    size_t cap = 1024, n_pending = 0;
    lease_grant_t *pending = malloc(cap * sizeof *pending);
    if (pending == NULL)
        return -1;
    for (;;) {
        if (n_pending + LEDGER_GRANT_CHUNK > cap) {
            cap *= 2;
            lease_grant_t *p = realloc(pending, cap * sizeof *p);
            if (p == NULL) {
                free(pending);
                return -1;
            }
            pending = p;
        }
        size_t n = lease_table_grant(t, 1, LEDGER_GRANT_CHUNK, 0.0, 1.0, 1, pending + n_pending);
        size_t relet = 0;
        while (relet < n && pending[n_pending + relet].relet)
            relet++;
        n_pending += relet;
        if (relet < n || n == 0)
            break;
    }
    qsort(pending, n_pending, sizeof *pending, pending_cmp);
    *out = pending;
    *n_out = n_pending;
    return 0;
}

static int ledger_print(lease_table_t *t, uint64_t n_prompts, const batcher_t *b) {
    lease_table_stats_t s;
    lease_table_stats(t, &s);
    /* Before pending_take: it grants, which moves the counters. */
    printf("{\"dispatcher\":{\"granted\":%" PRIu64 ",\"relet\":%" PRIu64 ",\"expired\":%" PRIu64
           ",\"released\":%" PRIu64 ",\"accepted\":%" PRIu64 ",\"duplicates\":%" PRIu64
           ",\"unknown\":%" PRIu64 ",\"rejected\":%" PRIu64 ",\"epoch\":%" PRIu64
           ",\"position\":%" PRIu64 ",\"done_epochs\":%" PRIu64 ",\"prompts\":%" PRIu64 "},\n",
           s.granted, s.relet, s.expired, s.released, s.accepted, s.duplicates, s.unknown,
           s.rejected, s.epoch, s.position, s.done_epochs, n_prompts);
    lease_grant_t *pending;
    size_t n_pending;
    if (pending_take(t, &pending, &n_pending) != 0)
        return -1;
    uint64_t handed = 0, acc = 0, pend = 0, lost = 0, listed = 0;
    int first = 1, first_lost = 1;
    printf("\"accepted_units\":[");
    for (uint64_t e = 0; e <= s.epoch; e++) {
        const uint64_t end = e < s.epoch ? n_prompts : s.position;
        for (uint64_t pos = 0; pos < end; pos++) {
            const uint64_t p = lease_table_order(t, e, pos);
            handed++;
            if (lease_table_is_accepted(t, p, e)) {
                acc++;
                if (listed++ < LEDGER_LIST_MAX)
                    unit_print(p, e, &first);
            }
        }
    }
    printf("],\n\"pending_units\":[");
    first = 1;
    for (size_t i = 0; i < n_pending; i++)
        unit_print(pending[i].prompt_id, pending[i].epoch, &first);
    printf("],\n\"lost_units\":[");
    for (uint64_t e = 0; e <= s.epoch; e++) {
        const uint64_t end = e < s.epoch ? n_prompts : s.position;
        for (uint64_t pos = 0; pos < end; pos++) {
            const uint64_t p = lease_table_order(t, e, pos);
            const lease_grant_t key = {.prompt_id = p, .epoch = e};
            if (lease_table_is_accepted(t, p, e))
                continue;
            if (bsearch(&key, pending, n_pending, sizeof *pending, pending_cmp)) {
                pend++;
            } else {
                lost++;
                unit_print(p, e, &first_lost);
            }
        }
    }
    free(pending);
    batcher_counts_t c;
    batcher_counts(b, &c);
    printf("],\n\"units\":{\"handed_out\":%" PRIu64 ",\"accepted\":%" PRIu64 ",\"pending\":%" PRIu64
           ",\"pending_listed\":%zu,\"lost\":%" PRIu64 "},\n",
           handed, acc, pend, n_pending, lost);
    printf("\"batcher\":{\"arrived\":%" PRIu64 ",\"accepted\":%" PRIu64
           ",\"filtered_equal\":%" PRIu64 ",\"filtered_few\":%" PRIu64 ",\"stale\":%" PRIu64
           ",\"batches\":%" PRIu64 ",\"partial_batches\":%" PRIu64 ",\"waiting\":%d}}\n",
           c.arrived, c.accepted, c.filtered_equal, c.filtered_few, c.stale, c.batches,
           c.partial_batches, batcher_waiting(b));
    return 0;
}

static int usage(const char *argv0) {
    fprintf(stderr, "usage: %s CHECKPOINT_DIR CONFIG [--set a.b=c]...\n", argv0);
    return 2;
}

int main(int argc, char **argv) {
    if (argc < 3 || (argc - 3) % 2 != 0)
        return usage(argv[0]);
    quillan_config_t *cfg = malloc(sizeof *cfg);
    qerr_t err = {0};
    int rc = cfg ? 0 : qerr_set(&err, QERR_NOMEM, "out of memory");
    if (rc == 0) {
        config_defaults(cfg);
        rc = config_load(cfg, argv[2], &err);
    }
    for (int i = 3; rc == 0 && i < argc; i += 2) {
        if (strcmp(argv[i], "--set") != 0) {
            free(cfg);
            return usage(argv[0]);
        }
        rc = config_set(cfg, argv[i + 1], &err);
    }
    if (rc == 0)
        rc = config_validate(cfg, &err);
    jsonl_reader_t *data = rc == 0 ? jsonl_reader_new(cfg->data.train, 0, &err) : NULL;
    char path[4096];
    snprintf(path, sizeof path, "%s/%s", argv[1], LEARNER_STATE_FILE);
    safetensors_reader_t *r = data ? safetensors_reader_new(path, &err) : NULL;
    const safetensors_tensor_t *td = NULL, *tb = NULL;
    if (r) {
        td = safetensors_reader_find(r, "dispatcher");
        tb = safetensors_reader_find(r, "batcher");
        if (td == NULL || tb == NULL)
            qerr_set(&err, QERR_INVALID, "%s: no dispatcher or batcher state", path);
    }
    lease_table_t *t = NULL;
    batcher_t *b = NULL;
    if (td && tb) {
        const lease_table_options_t o = {.n_prompts = jsonl_reader_count(data),
                                         .shuffle = cfg->data.shuffle,
                                         .seed = cfg->data.seed,
                                         .fingerprint = jsonl_reader_fingerprint(data)};
        t = lease_table_restore(&o, td->data, (size_t)td->nbytes, &err);
        batcher_config_t bc;
        learner_batcher_config(&bc, cfg);
        b = t ? batcher_load(&bc, tb->data, (size_t)tb->nbytes, &err) : NULL;
    }
    rc = b ? ledger_print(t, jsonl_reader_count(data), b) : -1;
    if (rc != 0)
        fprintf(stderr, "netns_ledger: %s\n", err.msg[0] ? err.msg : "out of memory");
    batcher_destroy(&b);
    lease_table_destroy(&t);
    safetensors_reader_destroy(&r);
    jsonl_reader_destroy(&data);
    free(cfg);
    return rc == 0 ? 0 : 1;
}
