/* Batch assembly (TRAINING.md): see batcher.h for the contracts. */
#include "batcher.h"

#include "alloc.h"

#include <inttypes.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

/* A stored group: the prompt once, then G completions back to back. */
typedef struct {
    uint64_t id;
    int64_t version;
    uint64_t seq; /* arrival order, breaks version ties */
    int prompt_len;
    int32_t *prompt;     /* [prompt_len] */
    int *len;            /* [G] */
    uint8_t *truncated;  /* [G] */
    uint8_t *has_reward; /* [G] */
    double *reward;      /* [G] raw reward (0 when absent) */
    double *shaped;      /* [G] reward + overlong penalty, NaN when absent */
    double *adv;         /* [G] */
    long n_tok;          /* sum of len */
    int32_t *tokens;     /* [n_tok] */
    float *logp;         /* [n_tok] */
    int32_t *kept;       /* [n_tok], or NULL: no sample used truncation */
} group_t;

struct batcher {
    batcher_config_t cfg;
    group_t **wait; /* [n_wait] accepted groups, in arrival order */
    int n_wait, cap_wait;
    uint64_t next_seq;
    batcher_counts_t counts;
    /* The refill window: what arrived since the last batch was taken. */
    uint64_t win_arrived, win_equal, win_few, win_stale;
    uint64_t win_equal_high; /* equal groups whose common shaped reward is > 0 ("solved") */
};

static void group_free(group_t **pg) {
    group_t *g = *pg;
    if (!g)
        return;
    free(g->prompt);
    free(g->len);
    free(g->truncated);
    free(g->has_reward);
    free(g->reward);
    free(g->shaped);
    free(g->adv);
    free(g->tokens);
    free(g->logp);
    free(g->kept);
    free(g);
    *pg = NULL;
}

/* A group with room for prompt_len prompt tokens and G samples (tokens not yet). */
static group_t *group_alloc(int prompt_len, int G) {
    group_t *g = calloc(1, sizeof *g);
    if (!g)
        return NULL;
    g->prompt_len = prompt_len;
    g->prompt = malloc((size_t)prompt_len * sizeof *g->prompt);
    g->len = calloc((size_t)G, sizeof *g->len);
    g->truncated = calloc((size_t)G, 1);
    g->has_reward = calloc((size_t)G, 1);
    g->reward = calloc((size_t)G, sizeof *g->reward);
    g->shaped = calloc((size_t)G, sizeof *g->shaped);
    g->adv = calloc((size_t)G, sizeof *g->adv);
    if (!g->prompt || !g->len || !g->truncated || !g->has_reward || !g->reward || !g->shaped ||
        !g->adv)
        group_free(&g);
    return g;
}

static int group_alloc_tokens(group_t *g, int with_kept) {
    g->tokens = malloc((size_t)g->n_tok * sizeof *g->tokens);
    g->logp = malloc((size_t)g->n_tok * sizeof *g->logp);
    g->kept = with_kept ? calloc((size_t)g->n_tok, sizeof *g->kept) : NULL;
    return g->tokens && g->logp && (!with_kept || g->kept) ? 0 : -1;
}

void batcher_config_default(batcher_config_t *cfg) {
    memset(cfg, 0, sizeof *cfg);
    cfg->batch_groups = 16;
    cfg->group_size = 8;
    cfg->max_staleness = 2;
    cfg->dynamic_sampling = 1;
    cfg->max_resample_rounds = 10;
    cfg->max_new_tokens = 1;
    cfg->context = 2;
    cfg->vocab_size = 1;
    cfg->overlong_enabled = 0;
    cfg->overlong_max_len = 1;
    cfg->overlong_cache = 1;
    dapo_adv_config_default(&cfg->adv);
}

static int config_check(const batcher_config_t *c, qerr_t *err) {
    if (c->batch_groups < 1)
        return qerr_set(err, QERR_RANGE, "batcher: batch_groups %d must be >= 1", c->batch_groups);
    if (c->group_size < 2)
        return qerr_set(err, QERR_RANGE, "batcher: group_size %d must be >= 2", c->group_size);
    if (c->max_staleness < 0)
        return qerr_set(err, QERR_RANGE, "batcher: max_staleness %d must be >= 0",
                        c->max_staleness);
    if (c->max_resample_rounds < 0)
        return qerr_set(err, QERR_RANGE, "batcher: max_resample_rounds %d must be >= 0",
                        c->max_resample_rounds);
    if (c->max_new_tokens < 1)
        return qerr_set(err, QERR_RANGE, "batcher: max_new_tokens %d must be >= 1",
                        c->max_new_tokens);
    if (c->context < 2)
        return qerr_set(err, QERR_RANGE, "batcher: context %d must be >= 2", c->context);
    if (c->vocab_size < 1)
        return qerr_set(err, QERR_RANGE, "batcher: vocab_size %d must be >= 1", c->vocab_size);
    if (c->overlong_enabled &&
        !(c->overlong_cache >= 1 && c->overlong_cache <= c->overlong_max_len))
        return qerr_set(err, QERR_RANGE,
                        "batcher: overlong.cache %d must be in [1, overlong.max_len %d]",
                        c->overlong_cache, c->overlong_max_len);
    if (c->adv.clip && !(c->adv.clip_lo <= c->adv.clip_hi))
        return qerr_set(err, QERR_RANGE, "batcher: advantage.clip [%g, %g] is empty",
                        c->adv.clip_lo, c->adv.clip_hi);
    /* Admission capacity and the refill budget must fit an int. */
    if ((long long)(c->max_staleness + 1LL) * c->batch_groups > INT32_MAX ||
        (long long)(c->max_resample_rounds + 1LL) * c->batch_groups > INT32_MAX)
        return qerr_set(err, QERR_RANGE,
                        "batcher: batch_groups x (max_staleness + 1) or x "
                        "(max_resample_rounds + 1) too large");
    return 0;
}

batcher_t *batcher_new(const batcher_config_t *cfg, qerr_t *err) {
    if (config_check(cfg, err) < 0)
        return NULL;
    batcher_t *b = calloc(1, sizeof *b);
    if (!b) {
        qerr_set(err, QERR_NOMEM, "batcher: out of memory");
        return NULL;
    }
    b->cfg = *cfg;
    return b;
}

void batcher_destroy(batcher_t **pb) {
    batcher_t *b = *pb;
    if (!b)
        return;
    for (int i = 0; i < b->n_wait; i++)
        group_free(&b->wait[i]);
    free(b->wait);
    free(b);
    *pb = NULL;
}

const batcher_config_t *batcher_config(const batcher_t *b) {
    return &b->cfg;
}

int batcher_waiting(const batcher_t *b) {
    return b->n_wait;
}

void batcher_counts(const batcher_t *b, batcher_counts_t *out) {
    *out = b->counts;
}

int batcher_lease_room(const batcher_t *b, int leased) {
    const long room = (long)(b->cfg.max_staleness + 1) * b->cfg.batch_groups - leased - b->n_wait;
    return room > 0 ? (int)room : 0;
}

/* Content checks shared by batcher_add and batcher_load, on a filled group. */
static int group_check(const batcher_config_t *c, const group_t *g, qerr_t *err) {
    for (int i = 0; i < g->prompt_len; i++)
        if (g->prompt[i] < 0 || g->prompt[i] >= c->vocab_size)
            return qerr_set(err, QERR_RANGE,
                            "group %" PRIu64 ": prompt token %d is %d, outside [0, vocab %d)",
                            g->id, i, (int)g->prompt[i], c->vocab_size);
    long off = 0;
    for (int s = 0; s < c->group_size; s++) {
        const int L = g->len[s];
        if (L < 1 || L > c->max_new_tokens)
            return qerr_set(err, QERR_RANGE,
                            "group %" PRIu64 " sample %d: length %d outside [1, max_new_tokens %d]",
                            g->id, s, L, c->max_new_tokens);
        if (g->truncated[s] && L != c->max_new_tokens)
            return qerr_set(err, QERR_INVALID,
                            "group %" PRIu64 " sample %d: truncated at length %d, not at "
                            "max_new_tokens %d",
                            g->id, s, L, c->max_new_tokens);
        if (g->prompt_len + L - 1 > c->context)
            return qerr_set(err, QERR_RANGE,
                            "group %" PRIu64 " sample %d: prompt %d + completion %d tokens exceed "
                            "the context %d",
                            g->id, s, g->prompt_len, L, c->context);
        if (g->has_reward[s] && !isfinite(g->reward[s]))
            return qerr_set(err, QERR_RANGE, "group %" PRIu64 " sample %d: reward %g not finite",
                            g->id, s, g->reward[s]);
        for (int j = 0; j < L; j++, off++) {
            if (g->tokens[off] < 0 || g->tokens[off] >= c->vocab_size)
                return qerr_set(err, QERR_RANGE,
                                "group %" PRIu64 " sample %d: token %d is %d, outside [0, vocab "
                                "%d)",
                                g->id, s, j, (int)g->tokens[off], c->vocab_size);
            if (!(isfinite(g->logp[off]) && g->logp[off] <= BATCHER_LOGP_MAX))
                return qerr_set(err, QERR_RANGE,
                                "group %" PRIu64 " sample %d: behaviour logprob %d is %g, not a "
                                "finite value <= 0",
                                g->id, s, j, (double)g->logp[off]);
            if (g->kept && (g->kept[off] < 0 || g->kept[off] > c->vocab_size))
                return qerr_set(err, QERR_RANGE,
                                "group %" PRIu64 " sample %d: kept candidates %d at token %d "
                                "outside [0, vocab %d]",
                                g->id, s, (int)g->kept[off], j, c->vocab_size);
        }
    }
    return 0;
}

/* Shaped rewards and advantages of a checked group. */
static void group_shape(const batcher_config_t *c, group_t *g) {
    for (int s = 0; s < c->group_size; s++) {
        double r = g->has_reward[s] ? g->reward[s] : NAN;
        if (g->has_reward[s] && c->overlong_enabled)
            r += dapo_overlong_penalty(g->len[s], g->truncated[s], c->overlong_max_len,
                                       c->overlong_cache);
        g->shaped[s] = r;
    }
    dapo_group_advantages(g->adv, g->shaped, g->has_reward, c->group_size, &c->adv);
}

static int stale(const batcher_config_t *c, int64_t version, int64_t v_now) {
    return v_now - version > c->max_staleness;
}

static int wait_push(batcher_t *b, group_t *g) {
    if (b->n_wait == b->cap_wait) {
        const int cap = b->cap_wait ? 2 * b->cap_wait : 16;
        group_t **w = realloc(b->wait, (size_t)cap * sizeof *w);
        if (!w)
            return -1;
        b->wait = w;
        b->cap_wait = cap;
    }
    b->wait[b->n_wait++] = g;
    return 0;
}

/* Copies an input group into a new group_t (sizes checked first, so that allocation sizes are
 * sane). */
static group_t *group_copy(const batcher_config_t *c, const batcher_group_in_t *in, qerr_t *err) {
    if (in->n_samples != c->group_size) {
        qerr_set(err, QERR_INVALID, "group %" PRIu64 ": %d samples, group_size is %d", in->group_id,
                 in->n_samples, c->group_size);
        return NULL;
    }
    if (in->prompt_len < 1 || in->prompt_len > c->context) {
        qerr_set(err, QERR_RANGE, "group %" PRIu64 ": prompt length %d outside [1, context %d]",
                 in->group_id, in->prompt_len, c->context);
        return NULL;
    }
    int with_kept = 0;
    long n_tok = 0;
    for (int s = 0; s < c->group_size; s++) {
        const batcher_sample_t *sm = &in->samples[s];
        if (sm->len < 1 || sm->len > c->max_new_tokens) {
            qerr_set(err, QERR_RANGE,
                     "group %" PRIu64 " sample %d: length %d outside [1, max_new_tokens %d]",
                     in->group_id, s, sm->len, c->max_new_tokens);
            return NULL;
        }
        n_tok += sm->len;
        with_kept |= sm->kept != NULL;
    }
    group_t *g = group_alloc(in->prompt_len, c->group_size);
    if (g) {
        g->n_tok = n_tok;
        if (group_alloc_tokens(g, with_kept) < 0)
            group_free(&g);
    }
    if (!g) {
        qerr_set(err, QERR_NOMEM, "group %" PRIu64 ": out of memory", in->group_id);
        return NULL;
    }
    g->id = in->group_id;
    g->version = in->version;
    memcpy(g->prompt, in->prompt, (size_t)in->prompt_len * sizeof *g->prompt);
    long off = 0;
    for (int s = 0; s < c->group_size; s++) {
        const batcher_sample_t *sm = &in->samples[s];
        g->len[s] = sm->len;
        g->truncated[s] = sm->truncated != 0;
        g->has_reward[s] = sm->has_reward != 0;
        g->reward[s] = sm->has_reward ? sm->reward : 0;
        memcpy(g->tokens + off, sm->tokens, (size_t)sm->len * sizeof *g->tokens);
        memcpy(g->logp + off, sm->logp, (size_t)sm->len * sizeof *g->logp);
        if (sm->kept)
            memcpy(g->kept + off, sm->kept, (size_t)sm->len * sizeof *g->kept);
        off += sm->len;
    }
    return g;
}

static int waiting_id(const batcher_t *b, uint64_t id) {
    for (int i = 0; i < b->n_wait; i++)
        if (b->wait[i]->id == id)
            return 1;
    return 0;
}

int batcher_add(batcher_t *b, const batcher_group_in_t *in, int64_t v_now,
                batcher_verdict_t *verdict, qerr_t *err) {
    const batcher_config_t *c = &b->cfg;
    if (in->version > v_now)
        return qerr_set(err, QERR_INVALID,
                        "group %" PRIu64 ": policy version %" PRId64
                        " is ahead of the learner's %" PRId64,
                        in->group_id, in->version, v_now);
    if (waiting_id(b, in->group_id))
        return qerr_set(err, QERR_INVALID, "group %" PRIu64 ": already waiting", in->group_id);
    group_t *g = group_copy(c, in, err);
    if (!g)
        return -1;
    if (group_check(c, g, err) < 0) {
        group_free(&g);
        return -1;
    }
    b->counts.arrived++;
    b->win_arrived++;
    if (stale(c, g->version, v_now)) {
        b->counts.stale++;
        b->win_stale++;
        *verdict = BATCHER_STALE;
        group_free(&g);
        return 0;
    }
    group_shape(c, g);
    const dapo_group_verdict_t v = dapo_group_classify(g->shaped, g->has_reward, c->group_size);
    if (c->dynamic_sampling && v != DAPO_GROUP_KEEP) {
        if (v == DAPO_GROUP_EQUAL) {
            b->counts.filtered_equal++;
            b->win_equal++;
            int s = 0;
            while (!g->has_reward[s])
                s++;
            b->win_equal_high += g->shaped[s] > 0;
            *verdict = BATCHER_FILTERED_EQUAL;
        } else {
            b->counts.filtered_few++;
            b->win_few++;
            *verdict = BATCHER_FILTERED_FEW;
        }
        group_free(&g);
        return 0;
    }
    g->seq = b->next_seq++;
    if (wait_push(b, g) < 0) {
        group_free(&g);
        return qerr_set(err, QERR_NOMEM, "group %" PRIu64 ": out of memory", in->group_id);
    }
    b->counts.accepted++;
    for (int s = 0; s < c->group_size; s++)
        b->counts.no_reward += !g->has_reward[s];
    *verdict = BATCHER_ACCEPTED;
    return 0;
}

batcher_status_t batcher_poll(batcher_t *b, int64_t v_now) {
    const batcher_config_t *c = &b->cfg;
    int kept = 0;
    for (int i = 0; i < b->n_wait; i++) {
        if (stale(c, b->wait[i]->version, v_now)) {
            group_free(&b->wait[i]);
            b->counts.stale++;
            b->win_stale++;
        } else {
            b->wait[kept++] = b->wait[i];
        }
    }
    b->n_wait = kept;
    if (b->n_wait >= c->batch_groups)
        return BATCHER_FULL;
    const uint64_t budget = (uint64_t)(c->max_resample_rounds + 1) * c->batch_groups;
    if (b->win_arrived < budget)
        return BATCHER_WAIT;
    return 2 * b->n_wait >= c->batch_groups && b->n_wait > 0 ? BATCHER_PARTIAL : BATCHER_STARVED;
}

static int cmp_oldest(const void *pa, const void *pb) {
    const group_t *a = *(group_t *const *)pa, *b = *(group_t *const *)pb;
    if (a->version != b->version)
        return a->version < b->version ? -1 : 1;
    return a->seq < b->seq ? -1 : a->seq > b->seq;
}

static int starved(const batcher_t *b, qerr_t *err) {
    const uint64_t low = b->win_equal - b->win_equal_high;
    const char *why = "the dataset looks too hard for the policy (every sample of most groups "
                      "failed alike)";
    if (b->win_equal_high > low && b->win_equal_high >= b->win_few &&
        b->win_equal_high >= b->win_stale)
        why = "the dataset looks too easy for the policy (every sample of most groups solved "
              "it alike)";
    else if (b->win_stale > b->win_equal && b->win_stale >= b->win_few)
        why = "most groups arrived beyond max_staleness (workers too slow for the learner)";
    else if (b->win_few > b->win_equal)
        why = "most groups came back with fewer than 2 rewards (reward services answering "
              "\"no reward\")";
    return qerr_set(err, QERR_INVALID,
                    "dynamic sampling could not fill a batch: %d of %d groups after %d refill "
                    "rounds (%" PRIu64 " groups arrived: %" PRIu64 " with equal rewards, %" PRIu64
                    " of them above 0; %" PRIu64 " with fewer than 2 rewards; %" PRIu64
                    " stale): %s",
                    b->n_wait, b->cfg.batch_groups, b->cfg.max_resample_rounds, b->win_arrived,
                    b->win_equal, b->win_equal_high, b->win_few, b->win_stale, why);
}

static int batch_alloc(batcher_batch_t *o, int with_kept) {
    const size_t n = (size_t)o->B * (size_t)o->T;
    o->tokens = calloc(n, sizeof *o->tokens);
    o->targets = calloc(n, sizeof *o->targets);
    o->mask = calloc(n, sizeof *o->mask);
    o->adv = calloc(n, sizeof *o->adv);
    o->logp_b = calloc(n, sizeof *o->logp_b);
    o->kept = with_kept ? calloc(n, sizeof *o->kept) : NULL;
    o->group_id = calloc((size_t)o->n_groups, sizeof *o->group_id);
    o->version = calloc((size_t)o->n_groups, sizeof *o->version);
    o->prompt_len = calloc((size_t)o->B, sizeof *o->prompt_len);
    o->len = calloc((size_t)o->B, sizeof *o->len);
    o->reward = calloc((size_t)o->B, sizeof *o->reward);
    return o->tokens && o->targets && o->mask && o->adv && o->logp_b && (!with_kept || o->kept) &&
                   o->group_id && o->version && o->prompt_len && o->len && o->reward
               ? 0
               : -1;
}

void batcher_batch_free(batcher_batch_t *o) {
    free(o->tokens);
    free(o->targets);
    free(o->mask);
    free(o->adv);
    free(o->logp_b);
    free(o->kept);
    free(o->group_id);
    free(o->version);
    free(o->prompt_len);
    free(o->len);
    free(o->reward);
    memset(o, 0, sizeof *o);
}

/* Writes group g as rows gi * G .. of the batch (see batcher_batch_t for the layout). Prompt
 * positions keep target 0: they are never trained on. */
static void batch_rows(batcher_batch_t *o, const group_t *g, int gi) {
    const int T = o->T;
    long off = 0;
    for (int s = 0; s < o->G; s++) {
        const int row = gi * o->G + s;
        const int P = g->prompt_len, L = g->len[s];
        int32_t *tok = o->tokens + (size_t)row * T, *tgt = o->targets + (size_t)row * T;
        real *mask = o->mask + (size_t)row * T, *adv = o->adv + (size_t)row * T;
        real *lb = o->logp_b + (size_t)row * T;
        /* sequence = prompt ++ completion; inputs are its first P + L - 1 tokens */
        for (int t = 0; t < P; t++)
            tok[t] = g->prompt[t];
        for (int j = 0; j + 1 < L; j++)
            tok[P + j] = g->tokens[off + j];
        for (int j = 0; j < L; j++) {
            const int t = P - 1 + j;
            tgt[t] = g->tokens[off + j];
            lb[t] = g->logp[off + j];
            if (o->kept && g->kept)
                o->kept[(size_t)row * T + t] = g->kept[off + j];
            if (g->has_reward[s]) {
                mask[t] = 1;
                adv[t] = (real)g->adv[s];
            }
        }
        o->prompt_len[row] = P;
        o->len[row] = L;
        o->reward[row] = g->shaped[s];
        off += L;
    }
}

static void batch_metrics(batcher_batch_t *o, group_t *const *gs, int64_t v_now) {
    double rs = 0, rss = 0, rmax = -INFINITY, rmin = INFINITY, lsum = 0, lmax = 0, stl = 0;
    long nr = 0, trunc = 0;
    for (int gi = 0; gi < o->n_groups; gi++) {
        const group_t *g = gs[gi];
        stl += (double)(v_now - g->version);
        for (int s = 0; s < o->G; s++) {
            lsum += g->len[s];
            lmax = fmax(lmax, g->len[s]);
            trunc += g->truncated[s];
            if (!g->has_reward[s]) {
                o->no_reward++;
                continue;
            }
            nr++;
            rs += g->reward[s];
            rss += g->reward[s] * g->reward[s];
            rmax = fmax(rmax, g->reward[s]);
            rmin = fmin(rmin, g->reward[s]);
        }
    }
    if (nr > 0) {
        o->reward_mean = rs / nr;
        o->reward_std = nr > 1 ? sqrt(fmax(0, (rss - rs * rs / nr) / (nr - 1))) : 0;
        o->reward_max = rmax;
        o->reward_min = rmin;
    }
    o->response_length_mean = lsum / o->B;
    o->response_length_max = lmax;
    o->truncated_frac = (double)trunc / o->B;
    o->staleness_mean = stl / o->n_groups;
}

int batcher_take(batcher_t *b, int64_t v_now, batcher_batch_t *out, qerr_t *err) {
    memset(out, 0, sizeof *out);
    const batcher_status_t st = batcher_poll(b, v_now);
    if (st == BATCHER_WAIT)
        return 0;
    if (st == BATCHER_STARVED)
        return starved(b, err);
    const batcher_config_t *c = &b->cfg;
    qsort(b->wait, (size_t)b->n_wait, sizeof *b->wait, cmp_oldest);
    const int n = st == BATCHER_FULL ? c->batch_groups : b->n_wait;
    out->n_groups = n;
    out->G = c->group_size;
    out->B = n * c->group_size;
    int with_kept = 0;
    for (int gi = 0; gi < n; gi++) {
        const group_t *g = b->wait[gi];
        with_kept |= g->kept != NULL;
        for (int s = 0; s < c->group_size; s++)
            if (g->prompt_len + g->len[s] - 1 > out->T)
                out->T = g->prompt_len + g->len[s] - 1;
    }
    if (batch_alloc(out, with_kept) < 0) {
        batcher_batch_free(out);
        return qerr_set(err, QERR_NOMEM, "batcher: out of memory for a %d x %d batch", out->B,
                        out->T);
    }
    for (int gi = 0; gi < n; gi++) {
        out->group_id[gi] = b->wait[gi]->id;
        out->version[gi] = b->wait[gi]->version;
        batch_rows(out, b->wait[gi], gi);
    }
    batch_metrics(out, b->wait, v_now);
    out->groups_arrived = (long)b->win_arrived;
    out->groups_filtered_equal = (long)b->win_equal;
    out->groups_filtered_few = (long)b->win_few;
    out->groups_stale = (long)b->win_stale;
    out->refill_rounds = b->win_arrived > (uint64_t)c->batch_groups
                             ? (int)((b->win_arrived - 1) / (uint64_t)c->batch_groups)
                             : 0;
    out->partial = st == BATCHER_PARTIAL;
    for (int gi = 0; gi < n; gi++)
        group_free(&b->wait[gi]);
    memmove(b->wait, b->wait + n, (size_t)(b->n_wait - n) * sizeof *b->wait);
    b->n_wait -= n;
    b->counts.batches++;
    b->counts.partial_batches += out->partial;
    b->win_arrived = b->win_equal = b->win_few = b->win_stale = b->win_equal_high = 0;
    return 1;
}

/* ---- Checkpoint state ---- */

#define BATCHER_MAGIC "QBAT"
#define BATCHER_FORMAT 1

typedef struct {
    uint8_t *p;
    size_t n, cap;
    int failed;
} wbuf_t;

static void put(wbuf_t *w, const void *src, size_t n) {
    if (w->failed)
        return;
    if (w->n + n > w->cap) {
        size_t cap = w->cap ? w->cap : 256;
        while (cap < w->n + n)
            cap *= 2;
        uint8_t *p = realloc(w->p, cap);
        if (!p) {
            w->failed = 1;
            return;
        }
        w->p = p;
        w->cap = cap;
    }
    memcpy(w->p + w->n, src, n);
    w->n += n;
}

/* Little-endian integers of `bytes` bytes. */
static void put_le(wbuf_t *w, uint64_t v, int bytes) {
    uint8_t b[8];
    for (int i = 0; i < bytes; i++)
        b[i] = (uint8_t)(v >> (8 * i));
    put(w, b, (size_t)bytes);
}

static void put_f64(wbuf_t *w, double x) {
    uint64_t u;
    memcpy(&u, &x, sizeof u);
    put_le(w, u, 8);
}

static void put_f32(wbuf_t *w, float x) {
    uint32_t u;
    memcpy(&u, &x, sizeof u);
    put_le(w, u, 4);
}

static void put_counts(wbuf_t *w, const batcher_t *b) {
    const batcher_counts_t *c = &b->counts;
    const uint64_t v[] = {c->arrived,        c->accepted,  c->filtered_equal, c->filtered_few,
                          c->stale,          c->no_reward, c->batches,        c->partial_batches,
                          b->win_arrived,    b->win_equal, b->win_few,        b->win_stale,
                          b->win_equal_high, b->next_seq};
    for (size_t i = 0; i < Q_ARRAY_LEN(v); i++)
        put_le(w, v[i], 8);
}

int batcher_save(const batcher_t *b, uint8_t **buf, size_t *len, qerr_t *err) {
    const int G = b->cfg.group_size;
    wbuf_t w = {0};
    put(&w, BATCHER_MAGIC, 4);
    put_le(&w, BATCHER_FORMAT, 4);
    put_le(&w, (uint32_t)G, 4);
    put_counts(&w, b);
    put_le(&w, (uint32_t)b->n_wait, 4);
    for (int i = 0; i < b->n_wait; i++) {
        const group_t *g = b->wait[i];
        put_le(&w, g->id, 8);
        put_le(&w, (uint64_t)g->version, 8);
        put_le(&w, g->seq, 8);
        put_le(&w, (uint32_t)g->prompt_len, 4);
        put_le(&w, g->kept != NULL, 1);
        for (int t = 0; t < g->prompt_len; t++)
            put_le(&w, (uint32_t)g->prompt[t], 4);
        for (int s = 0; s < G; s++) {
            put_le(&w, (uint32_t)g->len[s], 4);
            put_le(&w, g->truncated[s], 1);
            put_le(&w, g->has_reward[s], 1);
            put_f64(&w, g->reward[s]);
        }
        for (long t = 0; t < g->n_tok; t++)
            put_le(&w, (uint32_t)g->tokens[t], 4);
        for (long t = 0; t < g->n_tok; t++)
            put_f32(&w, g->logp[t]);
        for (long t = 0; g->kept && t < g->n_tok; t++)
            put_le(&w, (uint32_t)g->kept[t], 4);
    }
    if (w.failed) {
        free(w.p);
        return qerr_set(err, QERR_NOMEM, "batcher state: out of memory");
    }
    *buf = w.p;
    *len = w.n;
    return 0;
}

typedef struct {
    const uint8_t *p;
    size_t n, off;
    qerr_t *err;
    int failed;
} rbuf_t;

static uint64_t get_le(rbuf_t *r, int bytes, const char *what) {
    if (r->failed)
        return 0;
    if (r->n - r->off < (size_t)bytes) {
        r->failed = 1;
        qerr_set(r->err, QERR_PARSE, "batcher state: truncated at byte %zu reading %s", r->off,
                 what);
        return 0;
    }
    uint64_t v = 0;
    for (int i = 0; i < bytes; i++)
        v |= (uint64_t)r->p[r->off + i] << (8 * i);
    r->off += (size_t)bytes;
    return v;
}

static double get_f64(rbuf_t *r, const char *what) {
    const uint64_t u = get_le(r, 8, what);
    double x;
    memcpy(&x, &u, sizeof x);
    return x;
}

static float get_f32(rbuf_t *r, const char *what) {
    const uint32_t u = (uint32_t)get_le(r, 4, what);
    float x;
    memcpy(&x, &u, sizeof x);
    return x;
}

/* One stored group; NULL with err set (sizes are checked before anything is allocated). */
static group_t *get_group(rbuf_t *r, const batcher_config_t *c) {
    const size_t at = r->off;
    const uint64_t id = get_le(r, 8, "group id");
    const int64_t version = (int64_t)get_le(r, 8, "group version");
    const uint64_t seq = get_le(r, 8, "group sequence");
    const uint32_t prompt_len = (uint32_t)get_le(r, 4, "prompt length");
    const uint64_t has_kept = get_le(r, 1, "kept flag");
    if (r->failed)
        return NULL;
    if (prompt_len < 1 || prompt_len > (uint32_t)c->context || has_kept > 1) {
        qerr_set(r->err, QERR_INVALID,
                 "batcher state: group %" PRIu64 " at byte %zu: prompt length %" PRIu32
                 " or kept flag %" PRIu64 " invalid",
                 id, at, prompt_len, has_kept);
        return NULL;
    }
    group_t *g = group_alloc((int)prompt_len, c->group_size);
    if (!g) {
        qerr_set(r->err, QERR_NOMEM, "batcher state: out of memory");
        return NULL;
    }
    g->id = id;
    g->version = version;
    g->seq = seq;
    for (uint32_t t = 0; t < prompt_len; t++)
        g->prompt[t] = (int32_t)(uint32_t)get_le(r, 4, "prompt token");
    for (int s = 0; s < c->group_size && !r->failed; s++) {
        const uint32_t L = (uint32_t)get_le(r, 4, "completion length");
        const uint64_t tr = get_le(r, 1, "truncated flag"), hr = get_le(r, 1, "reward flag");
        g->reward[s] = get_f64(r, "reward");
        if (!r->failed && (L < 1 || L > (uint32_t)c->max_new_tokens || tr > 1 || hr > 1)) {
            qerr_set(r->err, QERR_INVALID,
                     "batcher state: group %" PRIu64 " sample %d: length %" PRIu32
                     " or flags invalid",
                     id, s, L);
            r->failed = 1;
        }
        g->len[s] = (int)L;
        g->truncated[s] = (uint8_t)tr;
        g->has_reward[s] = (uint8_t)hr;
        g->n_tok += L;
    }
    if (!r->failed && group_alloc_tokens(g, (int)has_kept) < 0) {
        qerr_set(r->err, QERR_NOMEM, "batcher state: out of memory");
        r->failed = 1;
    }
    for (long t = 0; t < g->n_tok && !r->failed; t++)
        g->tokens[t] = (int32_t)(uint32_t)get_le(r, 4, "completion token");
    for (long t = 0; t < g->n_tok && !r->failed; t++)
        g->logp[t] = get_f32(r, "behaviour logprob");
    for (long t = 0; has_kept && t < g->n_tok && !r->failed; t++)
        g->kept[t] = (int32_t)(uint32_t)get_le(r, 4, "kept candidates");
    if (r->failed || group_check(c, g, r->err) < 0) {
        group_free(&g);
        if (!r->failed)
            qerr_wrap(r->err, "batcher state");
        r->failed = 1;
        return NULL;
    }
    group_shape(c, g);
    return g;
}

batcher_t *batcher_load(const batcher_config_t *cfg, const uint8_t *buf, size_t len, qerr_t *err) {
    if (len < 8 || memcmp(buf, BATCHER_MAGIC, 4) != 0) {
        qerr_set(err, QERR_PARSE, "batcher state: not a batcher state (no %s header)",
                 BATCHER_MAGIC);
        return NULL;
    }
    rbuf_t r = {buf, len, 4, err, 0};
    const uint64_t format = get_le(&r, 4, "format version");
    if (format != BATCHER_FORMAT) {
        qerr_set(err, QERR_VERSION, "batcher state: format version %" PRIu64 ", expected %d",
                 format, BATCHER_FORMAT);
        return NULL;
    }
    const uint64_t G = get_le(&r, 4, "group size");
    if (!r.failed && G != (uint64_t)cfg->group_size) {
        qerr_set(err, QERR_INVALID, "batcher state: group size %" PRIu64 ", config has %d", G,
                 cfg->group_size);
        return NULL;
    }
    batcher_t *b = batcher_new(cfg, err);
    if (!b)
        return NULL;
    batcher_counts_t *c = &b->counts;
    uint64_t *const fields[] = {
        &c->arrived,   &c->accepted,  &c->filtered_equal,  &c->filtered_few, &c->stale,
        &c->no_reward, &c->batches,   &c->partial_batches, &b->win_arrived,  &b->win_equal,
        &b->win_few,   &b->win_stale, &b->win_equal_high,  &b->next_seq};
    for (size_t i = 0; i < Q_ARRAY_LEN(fields); i++)
        *fields[i] = get_le(&r, 8, "counter");
    const uint64_t n_wait = get_le(&r, 4, "waiting groups");
    for (uint64_t i = 0; i < n_wait && !r.failed; i++) {
        group_t *g = get_group(&r, cfg);
        if (!g)
            break;
        if (waiting_id(b, g->id) || g->seq >= b->next_seq) {
            qerr_set(err, QERR_INVALID,
                     "batcher state: group %" PRIu64 " duplicated or out of sequence", g->id);
            r.failed = 1;
            group_free(&g);
            break;
        }
        if (wait_push(b, g) < 0) {
            qerr_set(err, QERR_NOMEM, "batcher state: out of memory");
            r.failed = 1;
            group_free(&g);
        }
    }
    if (!r.failed && r.off != len) {
        qerr_set(err, QERR_PARSE, "batcher state: %zu trailing bytes after byte %zu", len - r.off,
                 r.off);
        r.failed = 1;
    }
    if (r.failed)
        batcher_destroy(&b);
    return b;
}
