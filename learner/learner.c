#include "learner.h"

#include "alloc.h"
#include "checkpoint.h"
#include "diffusion.h"
#include "jsonl.h"
#include "log.h"
#include "moe.h"
#include "optimizer.h"
#include "qpolicy.h"
#include "safetensors.h"
#include "tokenizer.h"

#include <ctype.h>
#include <errno.h>
#include <inttypes.h>
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>

#ifdef _OPENMP
#include <omp.h>
#endif

_Static_assert(sizeof(real) == sizeof(float), "the learner stores FP32 weights");

#define EVAL_BATCH 64   /* test prompts decoded together */
#define EVAL_SLACK 4    /* tokens a greedy answer may run past the reference's length */
#define ANSWER_MAX 1024 /* bytes of a decoded eval answer */
#define PATH_CAP 4352   /* checkpoint_dir + step directory + file name */

/* Routing records of one waiting group (learner_add_group), until its batch is taken. */
typedef struct {
    uint64_t group_id;
    int64_t version;
    int G;
    int *len;        /* [G] completion lengths */
    int32_t **route; /* [G] -> [len, L, RI]: per layer mini[KM], expert[KM KE], micro[KM KN] */
    uint64_t **plan; /* [G] -> [len, Lw] z_0 (NULL when Lw is 0) */
} rec_t;

/* One test example of the periodic evaluation. */
typedef struct {
    int32_t *ids; /* [plen] BOS + prompt */
    int plen;
    int cap;      /* tokens decoded at most */
    char *answer; /* trimmed */
    size_t answer_len;
} eval_ex_t;

struct learner {
    quillan_config_t cfg;
    model_t *m;   /* the policy being trained */
    model_t *old; /* frozen (model_new_frozen) old-policy snapshot (old_logprobs: recompute) */
    model_t *ref; /* frozen reference for the k3 KL (kl.beta > 0): the starting policy */
    optim_t *opt;
    snapshot_store_t *store;
    tokenizer_t *tok;
    dapo_loss_config_t loss;
    moe_dims_t md;
    int L, RI, Lw;
    long limit;

    pthread_mutex_t lock; /* guards b, recs, version (written under it, read by any thread) */
    batcher_t *b;
    rec_t *recs;
    size_t n_recs, cap_recs;
    uint64_t version, old_version;

    long step, last_ckpt_step;
    long skipped_no_pg, skipped_nonfinite; /* cumulative */
    snapshot_publish_stats_t pub;          /* the last publish */
    double pub_seconds;                    /* its quantize + publish time */

    uint8_t *disp_state;
    size_t disp_len;
    char resumed[PATH_CAP];

    eval_ex_t *ev;
    size_t n_ev;
};

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* ---- routing records ---- */

static void rec_free(rec_t *r) {
    for (int s = 0; s < r->G; s++) {
        if (r->route)
            free(r->route[s]);
        if (r->plan)
            free(r->plan[s]);
    }
    free(r->route);
    free(r->plan);
    free(r->len);
    memset(r, 0, sizeof *r);
}

/* Indices idx[0..k) below bound and pairwise distinct. */
static int choice_ok(const uint32_t *idx, int k, int bound) {
    for (int i = 0; i < k; i++) {
        if (idx[i] >= (uint32_t)bound)
            return 0;
        for (int j = 0; j < i; j++)
            if (idx[j] == idx[i])
                return 0;
    }
    return 1;
}

static int routes_check(const learner_t *l, const batcher_group_in_t *g,
                        const learner_route_in_t *routes, qerr_t *err) {
    const moe_dims_t *d = &l->md;
    for (int s = 0; s < g->n_samples; s++) {
        const learner_route_in_t *r = &routes[s];
        if (!r->minis || !r->experts || !r->micros || (l->Lw > 0 && !r->plan))
            return qerr_set(err, QERR_INVALID,
                            "group %" PRIu64 " sample %d: routing record "
                            "without index arrays",
                            g->group_id, s);
        for (int j = 0; j < g->samples[s].len; j++)
            for (int ly = 0; ly < l->L; ly++) {
                const size_t row = (size_t)j * l->L + ly;
                const uint32_t *mi = r->minis + row * d->KM;
                int ok = choice_ok(mi, d->KM, d->M);
                for (int k = 0; ok && k < d->KM; k++)
                    ok = choice_ok(r->experts + (row * d->KM + k) * d->KE, d->KE, d->E) &&
                         choice_ok(r->micros + (row * d->KM + k) * d->KN, d->KN, d->N);
                if (!ok)
                    return qerr_set(err, QERR_INVALID,
                                    "group %" PRIu64 " sample %d: routing record of token %d, "
                                    "layer %d: an index is out of range or repeated",
                                    g->group_id, s, j, ly);
            }
    }
    return 0;
}

/* Copies a group's records into the learner's layout; -1 on allocation failure. */
static int rec_fill(rec_t *r, const learner_t *l, const batcher_group_in_t *g,
                    const learner_route_in_t *routes) {
    const moe_dims_t *d = &l->md;
    r->group_id = g->group_id;
    const size_t G = g->n_samples > 0 ? (size_t)g->n_samples : 0;
    if (G == 0)
        return 0; /* the batcher refuses the group */
    r->len = calloc(G, sizeof *r->len);
    r->route = calloc(G, sizeof *r->route);
    r->plan = calloc(G, sizeof *r->plan);
    if (!r->len || !r->route || !r->plan)
        return -1;
    r->G = (int)G;
    for (int s = 0; s < r->G; s++) {
        const int n = g->samples[s].len;
        r->len[s] = n;
        r->route[s] = malloc(q_mul_size(q_mul_size((size_t)n, (size_t)l->L), (size_t)l->RI) *
                             sizeof(int32_t));
        if (!r->route[s])
            return -1;
        if (l->Lw > 0) {
            r->plan[s] = malloc((size_t)n * (size_t)l->Lw * sizeof(uint64_t));
            if (!r->plan[s])
                return -1;
            memcpy(r->plan[s], routes[s].plan, (size_t)n * (size_t)l->Lw * sizeof(uint64_t));
        }
        for (int j = 0; j < n; j++)
            for (int ly = 0; ly < l->L; ly++) {
                const size_t row = (size_t)j * l->L + ly;
                int32_t *dst = r->route[s] + row * (size_t)l->RI;
                for (int k = 0; k < d->KM; k++)
                    dst[k] = (int32_t)routes[s].minis[row * d->KM + k];
                for (int k = 0; k < d->KM * d->KE; k++)
                    dst[d->KM + k] = (int32_t)routes[s].experts[row * d->KM * d->KE + k];
                for (int k = 0; k < d->KM * d->KN; k++)
                    dst[d->KM + d->KM * d->KE + k] =
                        (int32_t)routes[s].micros[row * d->KM * d->KN + k];
            }
    }
    return 0;
}

/* Drops records of groups the batcher has dropped as stale at v_now (under the lock). */
static void recs_prune(learner_t *l, int64_t v_now) {
    size_t k = 0;
    for (size_t i = 0; i < l->n_recs; i++) {
        if (l->recs[i].version < v_now - l->cfg.learner.max_staleness)
            rec_free(&l->recs[i]);
        else
            l->recs[k++] = l->recs[i];
    }
    l->n_recs = k;
}

/* Moves the record of group_id out of the table into *out; 0 when there is none. */
static int recs_take(learner_t *l, uint64_t group_id, rec_t *out) {
    for (size_t i = 0; i < l->n_recs; i++)
        if (l->recs[i].group_id == group_id) {
            *out = l->recs[i];
            l->recs[i] = l->recs[--l->n_recs];
            return 1;
        }
    memset(out, 0, sizeof *out);
    return 0;
}

/* ---- snapshots ---- */

static int store_policy(learner_t *l, const qpolicy_t *q, uint64_t version, int is_old,
                        qerr_t *err) {
    const size_t n = qpolicy_tensor_count(q);
    snapshot_tensor_t *t = calloc(n, sizeof *t);
    uint64_t *shapes = calloc(n * MODEL_MAX_NDIM, sizeof *shapes);
    int rc = 0;
    if (!t || !shapes) {
        rc = qerr_set(err, QERR_NOMEM, "snapshot v%" PRIu64 ": out of memory", version);
    } else {
        for (size_t i = 0; i < n; i++) {
            const qpolicy_tensor_t *qt = qpolicy_tensor_at(q, i);
            for (int k = 0; k < qt->ndim; k++)
                shapes[i * MODEL_MAX_NDIM + k] = (uint64_t)qt->shape[k];
            t[i] = (snapshot_tensor_t){.name = qt->name,
                                       .qtype = qtype_name(qt->qtype),
                                       .shape = shapes + i * MODEL_MAX_NDIM,
                                       .n_dims = (size_t)qt->ndim,
                                       .offset = qt->offset,
                                       .bytes = qt->nbytes};
        }
        size_t len;
        const void *bytes = qpolicy_bytes(q, &len);
        rc = snapshot_store_publish(l->store, version, bytes, len, is_old, t, n, &l->pub, err);
    }
    free(t);
    free(shapes);
    return rc;
}

/* Quantizes the current weights and publishes them as `version`. */
static int publish(learner_t *l, uint64_t version, int is_old, qerr_t *err) {
    const double t0 = now_s();
    qpolicy_t *q = qpolicy_build(l->m, version, err);
    if (!q)
        return qerr_wrap(err, "publishing snapshot v%" PRIu64, version);
    const int rc = store_policy(l, q, version, is_old, err);
    qpolicy_destroy(&q);
    l->pub_seconds = now_s() - t0;
    return rc;
}

/* version + 1: quantize, publish, and when due make it the old policy. */
static int sync_version(learner_t *l, qerr_t *err) {
    const uint64_t v = l->version + 1;
    const int becomes_old = v - l->old_version >= (uint64_t)l->cfg.learner.old_policy_interval;
    if (publish(l, v, becomes_old, err))
        return -1;
    pthread_mutex_lock(&l->lock);
    l->version = v;
    if (becomes_old)
        l->old_version = v;
    pthread_mutex_unlock(&l->lock);
    if (becomes_old && l->old)
        model_freeze_from(l->old, l->m);
    return 0;
}

/* ---- evaluation data ---- */

static void eval_free(learner_t *l) {
    for (size_t i = 0; i < l->n_ev; i++) {
        free(l->ev[i].ids);
        free(l->ev[i].answer);
    }
    free(l->ev);
    l->ev = NULL;
    l->n_ev = 0;
}

/* Trims ASCII white space in place; returns the new length. */
static size_t trim(char *s, size_t n) {
    size_t a = 0;
    while (a < n && isspace((unsigned char)s[a]))
        a++;
    while (n > a && isspace((unsigned char)s[n - 1]))
        n--;
    memmove(s, s + a, n - a);
    s[n - a] = '\0';
    return n - a;
}

static int eval_load(learner_t *l, qerr_t *err) {
    const char *path = l->cfg.data.test;
    jsonl_reader_t *r = jsonl_reader_new(path, 0, err);
    if (!r)
        return qerr_wrap(err, "data.test");
    size_t n = jsonl_reader_count(r);
    if (l->cfg.learner.eval_samples > 0 && (size_t)l->cfg.learner.eval_samples < n)
        n = (size_t)l->cfg.learner.eval_samples;
    l->ev = calloc(n, sizeof *l->ev);
    int rc = l->ev ? 0 : qerr_set(err, QERR_NOMEM, "%s: out of memory", path);
    tokenizer_ids_t ids, ans;
    tokenizer_ids_init(&ids);
    tokenizer_ids_init(&ans);
    const int ctx = l->cfg.model.context, max_new = l->cfg.rollout.max_new_tokens;
    for (size_t i = 0; i < n && rc == 0; i++) {
        jsonl_example_t je;
        if (jsonl_reader_example(r, i, JSONL_TASK_RL, &je, err)) {
            rc = -1;
            break;
        }
        eval_ex_t *e = &l->ev[i];
        l->n_ev = i + 1;
        ids.len = 0;
        ans.len = 0;
        if (!je.answer)
            rc = qerr_set(err, QERR_INVALID, "%s:%zu: no \"answer\" field to evaluate against",
                          path, je.line);
        if (rc == 0)
            rc = tokenizer_encode_append(l->tok, je.prompt, strlen(je.prompt), &ids, err);
        if (rc == 0)
            rc = tokenizer_encode_append(l->tok, je.answer, strlen(je.answer), &ans, err);
        if (rc == 0 && (int)ids.len + 2 > ctx)
            rc = qerr_set(err, QERR_RANGE,
                          "%s:%zu: prompt of %zu tokens leaves no room in "
                          "model.context (%d)",
                          path, je.line, ids.len + 1, ctx);
        if (rc == 0) {
            e->plen = (int)ids.len + 1;
            e->ids = malloc((size_t)e->plen * sizeof *e->ids);
            e->answer = strdup(je.answer);
            if (!e->ids || !e->answer)
                rc = qerr_set(err, QERR_NOMEM, "%s: out of memory", path);
        }
        if (rc == 0) {
            e->ids[0] = tokenizer_bos_id(l->tok);
            memcpy(e->ids + 1, ids.data, ids.len * sizeof *e->ids);
            e->answer_len = trim(e->answer, strlen(e->answer));
            int cap = (int)ans.len + 1 + EVAL_SLACK;
            cap = cap < max_new ? cap : max_new;
            e->cap = cap < ctx - e->plen ? cap : ctx - e->plen;
            for (int k = 0; k < e->plen && rc == 0; k++)
                if (e->ids[k] >= l->cfg.model.vocab_size)
                    rc = qerr_set(err, QERR_RANGE, "%s:%zu: token %d outside model.vocab_size",
                                  path, je.line, e->ids[k]);
        }
        jsonl_example_free(&je);
    }
    tokenizer_ids_free(&ids);
    tokenizer_ids_free(&ans);
    jsonl_reader_destroy(&r);
    return rc;
}

int learner_eval(learner_t *l, double *accuracy, qerr_t *err) {
    if (l->n_ev == 0)
        return qerr_set(err, QERR_INVALID,
                        "learner: no evaluation set (data.test with learner.eval_interval > 0)");
    const double t0 = now_s();
    const int ctx = l->cfg.model.context;
    const int32_t eos = tokenizer_eos_id(l->tok), pad = tokenizer_pad_id(l->tok);
    const int G = EVAL_BATCH;
    int32_t *gen = malloc((size_t)G * (size_t)(ctx + 1) * sizeof *gen);
    int32_t *packed = malloc((size_t)G * (size_t)(ctx + 1) * sizeof *packed);
    int32_t *next = malloc((size_t)G * sizeof *next);
    int *cur = malloc((size_t)G * sizeof *cur), *pos = malloc((size_t)G * sizeof *pos);
    int *done = malloc((size_t)G * sizeof *done);
    char *text = malloc(ANSWER_MAX + 1);
    int rc = gen && packed && next && cur && pos && done && text
                 ? 0
                 : qerr_set(err, QERR_NOMEM, "eval: out of memory");
    size_t correct = 0;
    for (size_t i0 = 0; rc == 0 && i0 < l->n_ev; i0 += (size_t)G) {
        const int ng = (int)(l->n_ev - i0 < (size_t)G ? l->n_ev - i0 : (size_t)G);
        for (int g = 0; g < ng; g++) {
            const eval_ex_t *e = &l->ev[i0 + (size_t)g];
            memcpy(gen + (size_t)g * (ctx + 1), e->ids, (size_t)e->plen * sizeof *gen);
            cur[g] = e->plen;
            done[g] = e->cap <= 0;
        }
        for (;;) {
            int T = 0, active = 0;
            for (int g = 0; g < ng; g++) {
                T = cur[g] > T ? cur[g] : T;
                active += !done[g];
            }
            if (!active)
                break;
            for (int g = 0; g < ng; g++) {
                for (int t = 0; t < T; t++)
                    packed[(size_t)g * T + t] = t < cur[g] ? gen[(size_t)g * (ctx + 1) + t] : pad;
                pos[g] = cur[g] - 1;
            }
            if (model_greedy(l->m, packed, ng, T, pos, next, err)) {
                rc = -1;
                break;
            }
            for (int g = 0; g < ng; g++) {
                const eval_ex_t *e = &l->ev[i0 + (size_t)g];
                if (done[g])
                    continue;
                gen[(size_t)g * (ctx + 1) + cur[g]++] = next[g];
                if (next[g] == eos || cur[g] - e->plen >= e->cap)
                    done[g] = 1;
            }
        }
        for (int g = 0; rc == 0 && g < ng; g++) {
            const eval_ex_t *e = &l->ev[i0 + (size_t)g];
            const int32_t *out = gen + (size_t)g * (ctx + 1) + e->plen;
            const int nout = cur[g] - e->plen;
            if (nout < 1 || out[nout - 1] != eos)
                continue; /* no EOS within the cap: wrong */
            const ptrdiff_t len =
                tokenizer_decode(l->tok, out, (size_t)(nout - 1), 0, text, ANSWER_MAX, NULL);
            if (len < 0 || len > ANSWER_MAX)
                continue;
            const size_t n = trim(text, (size_t)len);
            correct += n == e->answer_len && memcmp(text, e->answer, n) == 0;
        }
    }
    free(gen);
    free(packed);
    free(next);
    free(cur);
    free(pos);
    free(done);
    free(text);
    if (rc)
        return qerr_wrap(err, "eval");
    *accuracy = (double)correct / (double)l->n_ev;
    const log_field_t f[] = {{"step", (double)l->step},
                             {"policy/version", (double)l->version},
                             {"eval/accuracy", *accuracy},
                             {"eval/samples", (double)l->n_ev},
                             {"eval/seconds", now_s() - t0}};
    log_emit(LOG_INFO, "eval", f, Q_ARRAY_LEN(f), "greedy exact match %.1f%% on %zu examples",
             100 * *accuracy, l->n_ev);
    return 0;
}

/* ---- construction ---- */

/* The run settings the learner cannot serve, named by key. */
static int config_check(const quillan_config_t *c, qerr_t *err) {
    if (c->learner.mode != CONFIG_MODE_RL)
        return qerr_set(err, QERR_INVALID, "learner.mode: the RL learner needs mode rl");
    if (c->rollout.top_k != 0 || (c->rollout.top_p > 0 && c->rollout.top_p < 1))
        return qerr_set(err, QERR_INVALID,
                        "rollout.top_k / rollout.top_p: the learner's forward computes "
                        "full-vocabulary log-probs and cannot renormalise over a truncated set; "
                        "RL needs top_k 0 and top_p 1 (as DAPO)");
    return 0;
}

static void optim_config_from(optim_config_t *o, const config_learner_t *c) {
    optim_config_default(o);
    o->lr = c->lr;
    o->warmup_steps = c->warmup_steps;
    o->schedule = c->lr_schedule == CONFIG_LR_COSINE ? OPTIM_LR_COSINE : OPTIM_LR_CONSTANT;
    o->total_steps = c->total_steps;
    o->weight_decay = c->weight_decay;
    o->beta1 = c->beta1;
    o->beta2 = c->beta2;
    o->eps = c->adam_eps;
    o->grad_clip = c->grad_clip;
}

void learner_batcher_config(batcher_config_t *b, const quillan_config_t *c) {
    const config_learner_t *l = &c->learner;
    batcher_config_default(b);
    b->batch_groups = l->batch_groups;
    b->group_size = l->group_size;
    b->max_staleness = l->max_staleness;
    b->dynamic_sampling = l->dynamic_sampling;
    b->max_resample_rounds = l->max_resample_rounds;
    b->max_new_tokens = c->rollout.max_new_tokens;
    b->context = c->model.context;
    b->vocab_size = c->model.vocab_size;
    b->overlong_enabled = l->overlong.enabled;
    b->overlong_max_len = l->overlong.max_len;
    b->overlong_cache = l->overlong.cache;
    dapo_adv_config_default(&b->adv);
    b->adv.normalize_std = l->advantage.normalize_std;
    b->adv.clip = l->advantage.clip.enabled;
    b->adv.clip_lo = l->advantage.clip.lo;
    b->adv.clip_hi = l->advantage.clip.hi;
}

static int loss_config_from(dapo_loss_config_t *d, const quillan_config_t *c, qerr_t *err) {
    static const dapo_agg_t agg[CONFIG_LOSS_COUNT] = {
        DAPO_AGG_TOKEN_MEAN, DAPO_AGG_SEQ_MEAN_TOKEN_MEAN, DAPO_AGG_SEQ_MEAN_TOKEN_SUM_NORM};
    dapo_loss_config_default(d);
    d->eps_low = c->learner.clip_eps_low;
    d->eps_high = c->learner.clip_eps_high;
    d->dual_clip = c->learner.dual_clip;
    d->tis_cap = c->learner.tis_cap;
    d->kl_beta = c->learner.kl.beta;
    d->agg = agg[c->learner.loss_agg];
    d->max_new_tokens = c->rollout.max_new_tokens;
    return dapo_loss_config_check(d, err);
}

/* A frozen model running src's current forward. */
static model_t *frozen_copy(model_t *src, qerr_t *err) {
    model_t *m = model_new_frozen(model_config(src), err);
    if (m)
        model_freeze_from(m, src);
    return m;
}

/* mkdir -p of a directory path. */
static int make_dirs(const char *path, qerr_t *err) {
    char buf[PATH_CAP];
    if (snprintf(buf, sizeof buf, "%s", path) >= (int)sizeof buf)
        return qerr_set(err, QERR_RANGE, "%s: path too long", path);
    for (char *p = buf + 1;; p++) {
        const int end = *p == '\0';
        if (*p == '/' || end) {
            *p = '\0';
            if (mkdir(buf, 0777) != 0 && errno != EEXIST)
                return qerr_set(err, QERR_IO, "%s: cannot create directory: %s", buf,
                                strerror(errno));
            if (end)
                return 0;
            *p = '/';
        }
    }
}

static const safetensors_tensor_t *state_tensor(safetensors_reader_t *r, const char *name,
                                                safetensors_dtype_t dt, int required, qerr_t *err) {
    const safetensors_tensor_t *t = safetensors_reader_find(r, name);
    if (!t) {
        if (required)
            qerr_set(err, QERR_NOTFOUND, "%s: tensor '%s' not found", safetensors_reader_path(r),
                     name);
        return NULL;
    }
    if (t->dtype != dt || t->ndim != 1) {
        qerr_set(err, QERR_INVALID, "%s: tensor '%s': expected a %s vector",
                 safetensors_reader_path(r), name, safetensors_dtype_name(dt));
        return NULL;
    }
    return t;
}

static int meta_u64(safetensors_reader_t *r, const char *key, uint64_t *out, qerr_t *err) {
    const char *s = safetensors_reader_metadata(r, key);
    char *end;
    errno = 0;
    unsigned long long v = s ? strtoull(s, &end, 10) : 0;
    if (!s || errno || end == s || *end)
        return qerr_set(err, QERR_INVALID, "%s: __metadata__ '%s' missing or not a number",
                        safetensors_reader_path(r), key);
    *out = v;
    return 0;
}

/* Loads the frozen model m ("old" or "ref" by `who`) from the state file: the tensor
 * <who>_weights (model_frozen_weights' form), or in a file written before the learner froze
 * them <who>_params (the latent FP32 weights of a full copy), fake-quantized as that copy's
 * forward did, so a resumed run gets the same log-probs either way. */
static int state_frozen(safetensors_reader_t *r, const char *who, model_t *m, qerr_t *err) {
    char name[32];
    snprintf(name, sizeof name, "%s_weights", who);
    const int latent = safetensors_reader_find(r, name) == NULL;
    if (latent)
        snprintf(name, sizeof name, "%s_params", who);
    const safetensors_tensor_t *t = state_tensor(r, name, SAFETENSORS_F32, 1, err);
    if (!t)
        return -1;
    if (t->numel != model_num_reals(m))
        return qerr_set(err, QERR_INVALID, "%s: tensor '%s': %" PRIu64 " values, the model has %zu",
                        safetensors_reader_path(r), name, t->numel, model_num_reals(m));
    /* Files from other writers need not align their tensors (safetensors.h). */
    real *tmp = NULL;
    const real *w = t->data;
    if ((uintptr_t)t->data % _Alignof(real) != 0) {
        tmp = malloc((size_t)t->nbytes);
        if (!tmp)
            return qerr_set(err, QERR_NOMEM, "%s: tensor '%s': out of memory",
                            safetensors_reader_path(r), name);
        memcpy(tmp, t->data, (size_t)t->nbytes);
        w = tmp;
    }
    if (latent)
        model_frozen_load_latent(m, w);
    else
        model_frozen_load(m, w);
    free(tmp);
    return 0;
}

/* Restores everything but the model and optimizer (checkpoint_load) from dir's state file. */
static int state_load(learner_t *l, const char *dir, const batcher_config_t *bc, qerr_t *err) {
    char path[PATH_CAP];
    snprintf(path, sizeof path, "%s/%s", dir, LEARNER_STATE_FILE);
    safetensors_reader_t *r = safetensors_reader_new(path, err);
    if (!r)
        return -1;
    int rc = 0;
    const char *fmt = safetensors_reader_metadata(r, "format");
    if (!fmt || strcmp(fmt, LEARNER_STATE_FORMAT) != 0)
        rc = qerr_set(err, QERR_VERSION, "%s: format '%s', expected '%s'", path,
                      fmt ? fmt : "(none)", LEARNER_STATE_FORMAT);
    uint64_t v = 0, ov = 0, nopg = 0, nonfin = 0;
    if (rc == 0)
        rc = meta_u64(r, "version", &v, err) || meta_u64(r, "old_version", &ov, err) ||
                     meta_u64(r, "skipped_no_pg", &nopg, err) ||
                     meta_u64(r, "skipped_nonfinite", &nonfin, err)
                 ? -1
                 : 0;
    if (rc == 0 && (v < 1 || ov < 1 || ov > v))
        rc = qerr_set(err, QERR_INVALID,
                      "%s: versions %" PRIu64 " / old %" PRIu64 " are inconsistent", path, v, ov);
    const safetensors_tensor_t *td = NULL, *tb = NULL, *ts = NULL;
    if (rc == 0) {
        td = state_tensor(r, "dispatcher", SAFETENSORS_U8, 1, err);
        tb = td ? state_tensor(r, "batcher", SAFETENSORS_U8, 1, err) : NULL;
        ts = tb ? state_tensor(r, "snapshot", SAFETENSORS_U8, 1, err) : NULL;
        rc = ts ? 0 : -1;
    }
    if (rc == 0) {
        l->b = batcher_load(bc, tb->data, (size_t)tb->nbytes, err);
        rc = l->b ? 0 : qerr_wrap(err, "%s: batcher", path);
    }
    if (rc == 0 && td->nbytes > 0) {
        l->disp_state = malloc((size_t)td->nbytes);
        if (!l->disp_state)
            rc = qerr_set(err, QERR_NOMEM, "%s: out of memory", path);
        else
            memcpy(l->disp_state, td->data, (size_t)td->nbytes);
        l->disp_len = (size_t)td->nbytes;
    }
    if (rc == 0 && l->old)
        rc = state_frozen(r, "old", l->old, err);
    if (rc == 0 && l->ref)
        rc = state_frozen(r, "ref", l->ref, err);
    if (rc == 0) {
        /* The exact bytes of the version workers may hold: republish them as they were. */
        qpolicy_t *q = qpolicy_parse(ts->data, (size_t)ts->nbytes, path, NULL, NULL, err);
        rc = q ? 0 : -1;
        if (rc == 0 && qpolicy_version(q) != v)
            rc = qerr_set(err, QERR_INVALID,
                          "%s: snapshot is v%" PRIu64 ", the state says v%" PRIu64, path,
                          qpolicy_version(q), v);
        if (rc == 0)
            rc = store_policy(l, q, v, v == ov, err);
        qpolicy_destroy(&q);
        l->pub_seconds = 0;
    }
    if (rc == 0) {
        l->version = v;
        l->old_version = ov;
        l->skipped_no_pg = (long)nopg;
        l->skipped_nonfinite = (long)nonfin;
    }
    safetensors_reader_destroy(&r);
    return rc;
}

learner_t *learner_new(const quillan_config_t *cfg, const char *resume, qerr_t *err) {
    if (config_check(cfg, err))
        return NULL;
    learner_t *l = calloc(1, sizeof *l);
    if (!l) {
        qerr_set(err, QERR_NOMEM, "learner: out of memory");
        return NULL;
    }
    l->cfg = *cfg;
    pthread_mutex_init(&l->lock, NULL);
    const quillan_config_t *c = &l->cfg;
#ifdef _OPENMP
    if (c->learner.threads > 0)
        omp_set_num_threads(c->learner.threads);
#endif
    moe_dims_from_config(&l->md, &c->model);
    l->L = c->model.num_layers;
    l->RI = l->md.KM * (1 + l->md.KE + l->md.KN);
    l->Lw = diffusion_words(c->model.diffusion_bits);
    l->limit = c->learner.max_steps > 0 ? c->learner.max_steps : c->learner.total_steps;

    optim_config_t oc;
    optim_config_from(&oc, &c->learner);
    batcher_config_t bc;
    learner_batcher_config(&bc, c);
    snapshot_store_options_t so;
    snapshot_store_options_init(&so);
    so.snapshots_kept = c->learner.snapshots_kept;
    so.full_snapshot_interval = c->learner.full_snapshot_interval;

    char dir[PATH_CAP] = "";
    int rc = loss_config_from(&l->loss, c, err);
    if (rc == 0 && resume) {
        const int autom = strcmp(resume, "auto") == 0;
        qerr_t e2 = {0};
        if (checkpoint_resolve(autom ? c->learner.checkpoint_dir : resume, dir, sizeof dir, &e2) !=
            0) {
            if (!autom || e2.code != QERR_NOTFOUND) {
                *err = e2;
                rc = qerr_wrap(err, "--resume");
            }
            dir[0] = '\0';
        }
    }
    if (rc == 0) {
        /* The tokenizer before the model: a bad tokenizer path fails in milliseconds, not
         * after minutes of building a large model. */
        l->tok = tokenizer_new_for_config(&c->model.tokenizer, err);
        l->m = l->tok ? model_new(&c->model, err) : NULL;
        l->opt = l->m ? optim_new(&oc, l->m, err) : NULL;
        l->store = l->opt ? snapshot_store_new(&so, err) : NULL;
        rc = l->store ? 0 : -1;
    }
    checkpoint_state_t st;
    if (rc == 0 && dir[0]) {
        rc = checkpoint_load(dir, l->m, l->opt, &st, err);
        l->step = st.step;
        l->last_ckpt_step = st.step;
        snprintf(l->resumed, sizeof l->resumed, "%s", dir);
    } else if (rc == 0 && c->learner.init_checkpoint[0]) {
        char idir[PATH_CAP];
        rc = checkpoint_resolve(c->learner.init_checkpoint, idir, sizeof idir, err);
        if (rc == 0)
            rc = checkpoint_load(idir, l->m, NULL, &st, err);
        if (rc)
            qerr_wrap(err, "learner.init_checkpoint");
    }
    if (rc == 0 && c->learner.old_logprobs == CONFIG_OLD_LOGPROBS_RECOMPUTE) {
        l->old = frozen_copy(l->m, err);
        rc = l->old ? 0 : -1;
    }
    if (rc == 0 && c->learner.kl.beta > 0) {
        l->ref = frozen_copy(l->m, err);
        rc = l->ref ? 0 : -1;
    }
    if (rc == 0 && dir[0]) {
        rc = state_load(l, dir, &bc, err);
    } else if (rc == 0) {
        l->b = batcher_new(&bc, err);
        rc = l->b ? publish(l, 1, 1, err) : -1;
        l->version = l->old_version = 1;
    }
    if (rc == 0 && c->learner.eval_interval > 0 && c->data.test[0])
        rc = eval_load(l, err);
    if (rc) {
        learner_destroy(&l);
        return NULL;
    }
    return l;
}

void learner_destroy(learner_t **lp) {
    learner_t *l = lp ? *lp : NULL;
    if (!l)
        return;
    for (size_t i = 0; i < l->n_recs; i++)
        rec_free(&l->recs[i]);
    free(l->recs);
    batcher_destroy(&l->b);
    snapshot_store_destroy(&l->store);
    optim_destroy(&l->opt);
    model_destroy(&l->m);
    model_destroy(&l->old);
    model_destroy(&l->ref);
    tokenizer_destroy(&l->tok);
    eval_free(l);
    free(l->disp_state);
    pthread_mutex_destroy(&l->lock);
    free(l);
    *lp = NULL;
}

const uint8_t *learner_dispatcher_state(const learner_t *l, size_t *len) {
    *len = l->disp_len;
    return l->disp_state;
}

const char *learner_resumed_from(const learner_t *l) {
    return l->resumed;
}

const tokenizer_t *learner_tokenizer(const learner_t *l) {
    return l->tok;
}

snapshot_store_t *learner_store(learner_t *l) {
    return l->store;
}

model_t *learner_model(learner_t *l) {
    return l->m;
}

uint64_t learner_version(const learner_t *l) {
    return l->version;
}

uint64_t learner_old_version(const learner_t *l) {
    return l->old_version;
}

long learner_steps(const learner_t *l) {
    return l->step;
}

long learner_step_limit(const learner_t *l) {
    return l->limit;
}

int learner_lease_room(learner_t *l) {
    pthread_mutex_lock(&l->lock);
    const int room = batcher_lease_room(l->b, 0);
    pthread_mutex_unlock(&l->lock);
    return room;
}

int learner_waiting(learner_t *l) {
    pthread_mutex_lock(&l->lock);
    const int n = batcher_waiting(l->b);
    pthread_mutex_unlock(&l->lock);
    return n;
}

int learner_add_group(learner_t *l, const batcher_group_in_t *g, const learner_route_in_t *routes,
                      batcher_verdict_t *verdict, qerr_t *err) {
    const int keep = routes && l->cfg.model.routing_replay;
    if (keep && g->n_samples > 0 && routes_check(l, g, routes, err))
        return -1;
    rec_t rec = {0};
    if (keep && rec_fill(&rec, l, g, routes)) {
        rec_free(&rec);
        return qerr_set(err, QERR_NOMEM, "group %" PRIu64 ": out of memory", g->group_id);
    }
    pthread_mutex_lock(&l->lock);
    rec.version = g->version;
    int rc = batcher_add(l->b, g, (int64_t)l->version, verdict, err);
    if (rc == 0 && keep && *verdict == BATCHER_ACCEPTED && l->n_recs == l->cap_recs) {
        const size_t cap = l->cap_recs ? 2 * l->cap_recs : 64;
        rec_t *p = realloc(l->recs, cap * sizeof *p);
        if (p) {
            l->recs = p;
            l->cap_recs = cap;
        }
    }
    if (rc == 0 && keep && *verdict == BATCHER_ACCEPTED && l->n_recs < l->cap_recs) {
        l->recs[l->n_recs++] = rec;
        memset(&rec, 0, sizeof rec);
    }
    pthread_mutex_unlock(&l->lock);
    rec_free(&rec);
    return rc;
}

/* ---- training ---- */

/* A batch's replay record [B T] for every layer, plus its diffusion plan. */
typedef struct {
    moe_route_t *all; /* [L] over the whole batch */
    diffusion_plan_t plan;
    moe_route_t *view; /* [L] rows of one mini-batch */
    diffusion_plan_t pview;
    int on;
} replay_t;

static void replay_free(replay_t *r, int L) {
    for (int i = 0; r->all && i < L; i++)
        moe_route_free(&r->all[i]);
    free(r->all);
    free(r->view);
    diffusion_plan_free(&r->plan);
    memset(r, 0, sizeof *r);
}

static int replay_init(replay_t *r, const learner_t *l, int BT, qerr_t *err) {
    r->all = calloc((size_t)l->L, sizeof *r->all);
    r->view = calloc((size_t)l->L, sizeof *r->view);
    if (!r->all || !r->view)
        return qerr_set(err, QERR_NOMEM, "replay record: out of memory");
    for (int i = 0; i < l->L; i++) {
        if (moe_route_init(&r->all[i], &l->md, BT, err))
            return -1;
        r->all[i].BT = BT;
    }
    if (diffusion_plan_init(&r->plan, l->cfg.model.diffusion_bits, BT, err))
        return -1;
    r->plan.BT = BT;
    r->on = 1;
    return 0;
}

/* Points the views at rows [r0, r1) of T positions. */
static void replay_select(replay_t *r, const learner_t *l, int r0, int r1, int T) {
    const size_t o = (size_t)r0 * T, n = (size_t)(r1 - r0) * T;
    const moe_dims_t *d = &l->md;
    for (int i = 0; i < l->L; i++) {
        r->view[i] = r->all[i];
        r->view[i].BT = r->view[i].max_BT = (int)n;
        r->view[i].mini += o * d->KM;
        r->view[i].expert += o * d->KM * d->KE;
        r->view[i].micro += o * d->KM * d->KN;
    }
    r->pview = r->plan;
    r->pview.BT = r->pview.max_BT = (int)n;
    r->pview.z1 += o * r->plan.Lw;
    r->pview.z0 += o * r->plan.Lw;
}

/* The model batch of rows [r0, r1). */
static model_batch_t mb_rows(const learner_t *l, const batcher_batch_t *bt, const replay_t *rp,
                             int r0, int r1, int with_targets) {
    const size_t o = (size_t)r0 * bt->T;
    const config_learner_t *c = &l->cfg.learner;
    return (model_batch_t){.B = r1 - r0,
                           .T = bt->T,
                           .tokens = bt->tokens + o,
                           .targets = with_targets ? bt->targets + o : NULL,
                           .weights = bt->mask + o,
                           .replay = rp && rp->on ? rp->view : NULL,
                           .plan_replay = rp && rp->on ? &rp->pview : NULL,
                           .noise_key = (uint64_t)l->step,
                           .temperature = (real)l->cfg.rollout.temperature,
                           .aux_balance = (real)c->aux.balance,
                           .aux_z = (real)c->aux.z_loss,
                           .aux_diffusion = (real)c->aux.diffusion};
}

/* Own routing of model pm over rows [r0, r1), then the workers' records over the completion
 * positions of the rows that have them. */
static int replay_build(replay_t *rp, learner_t *l, model_t *pm, const batcher_batch_t *bt,
                        rec_t *const *recs, int r0, int r1, qerr_t *err) {
    const int T = bt->T, G = bt->G;
    const moe_dims_t *d = &l->md;
    model_batch_t mb = mb_rows(l, bt, NULL, r0, r1, 0);
    if (model_forward(pm, &mb, NULL, err))
        return -1;
    const size_t o = (size_t)r0 * T, n = (size_t)(r1 - r0) * T;
    for (int i = 0; i < l->L; i++) {
        const moe_route_t *own = model_route(pm, i);
        memcpy(rp->all[i].mini + o * d->KM, own->mini, n * d->KM * sizeof(int32_t));
        memcpy(rp->all[i].expert + o * d->KM * d->KE, own->expert,
               n * d->KM * d->KE * sizeof(int32_t));
        memcpy(rp->all[i].micro + o * d->KM * d->KN, own->micro,
               n * d->KM * d->KN * sizeof(int32_t));
    }
    const diffusion_plan_t *pp = model_plan_record(pm);
    const size_t Lw = (size_t)rp->plan.Lw;
    memcpy(rp->plan.z1 + o * Lw, pp->z1, n * Lw * sizeof(uint64_t));
    memcpy(rp->plan.z0 + o * Lw, pp->z0, n * Lw * sizeof(uint64_t));
    for (int b = r0; b < r1; b++) {
        const rec_t *rec = recs[b / G];
        const int s = b % G;
        if (!rec || !rec->route || !rec->route[s] || rec->len[s] != bt->len[b])
            continue;
        for (int j = 0; j < bt->len[b]; j++) {
            const size_t pos = (size_t)b * T + (size_t)(bt->prompt_len[b] - 1 + j);
            for (int i = 0; i < l->L; i++) {
                const int32_t *src = rec->route[s] + ((size_t)j * l->L + i) * l->RI;
                memcpy(rp->all[i].mini + pos * d->KM, src, (size_t)d->KM * sizeof(int32_t));
                memcpy(rp->all[i].expert + pos * d->KM * d->KE, src + d->KM,
                       (size_t)(d->KM * d->KE) * sizeof(int32_t));
                memcpy(rp->all[i].micro + pos * d->KM * d->KN, src + d->KM + d->KM * d->KE,
                       (size_t)(d->KM * d->KN) * sizeof(int32_t));
            }
            if (Lw > 0 && rec->plan[s])
                memcpy(rp->plan.z0 + pos * Lw, rec->plan[s] + (size_t)j * Lw,
                       Lw * sizeof(uint64_t));
        }
    }
    return 0;
}

/* Log-probs of the frozen model pm over rows [r0, r1) into out + r0 T. No diffusion loss:
 * nothing reads it, and a frozen model cannot run it. */
static int logp_rows(learner_t *l, model_t *pm, const batcher_batch_t *bt, replay_t *rp, int r0,
                     int r1, real *out, qerr_t *err) {
    model_batch_t mb = mb_rows(l, bt, rp, r0, r1, 1);
    mb.aux_diffusion = 0;
    if (model_forward(pm, &mb, NULL, err))
        return -1;
    memcpy(out + (size_t)r0 * bt->T, model_logp(pm), (size_t)(r1 - r0) * bt->T * sizeof(real));
    return 0;
}

typedef struct {
    const batcher_batch_t *bt;
    const learner_perf_t *perf;
    double prep_seconds;
    double pub_seconds, pub_bytes;
    int published;
} step_ctx_t;

static void step_log(const learner_t *l, const step_ctx_t *sc, const dapo_metrics_t *mt,
                     const model_stats_t *st, double entropy, double grad_norm, double lr,
                     int skipped, double step_s, long tokens) {
    const batcher_batch_t *bt = sc->bt;
    const double routing = st->decisions > 0 ? (double)st->mismatches / (double)st->decisions : 0;
    const config_learner_t *c = &l->cfg.learner;
    const log_field_t f[] = {
        {"step", (double)l->step},
        {"reward/mean", bt->reward_mean},
        {"reward/std", bt->reward_std},
        {"reward/max", bt->reward_max},
        {"reward/min", bt->reward_min},
        {"groups/kept", (double)bt->n_groups},
        {"groups/filtered_equal", (double)bt->groups_filtered_equal},
        {"groups/filtered_few", (double)bt->groups_filtered_few},
        {"groups/stale", (double)bt->groups_stale},
        {"groups/refill_rounds", (double)bt->refill_rounds},
        {"groups/no_reward_samples", (double)bt->no_reward},
        {"response_length/mean", bt->response_length_mean},
        {"response_length/max", bt->response_length_max},
        {"response/truncated_frac", bt->truncated_frac},
        {"policy/clipfrac_low", mt->clipfrac_low},
        {"policy/clipfrac_high", mt->clipfrac_high},
        {"policy/clipfrac_dual", mt->clipfrac_dual},
        {"policy/approx_kl", mt->approx_kl},
        {"policy/ratio_mean", mt->ratio_mean},
        {"policy/entropy", entropy},
        {"policy/kl_ref", mt->kl},
        {"policy/pg_tokens", (double)mt->pg_tokens},
        {"tis/mean_weight", mt->tis_mean_weight},
        {"tis/clipped_frac", mt->tis_clipped_frac},
        {"grad_norm", grad_norm},
        {"lr", lr},
        {"loss/pg", mt->pg},
        {"loss/balance", c->aux.balance * st->balance},
        {"loss/z", c->aux.z_loss * st->z},
        {"loss/diffusion", c->aux.diffusion * st->diffusion},
        {"loss/total", mt->loss + (st->loss - st->ce)},
        {"perf/learner_tokens_per_s", step_s > 0 ? (double)tokens / step_s : 0},
        {"perf/rollout_tokens_per_s", sc->perf ? sc->perf->rollout_tokens_per_s : 0},
        {"perf/step_seconds", step_s},
        {"perf/prep_seconds", sc->prep_seconds},
        {"perf/wait_seconds", sc->perf ? sc->perf->wait_seconds : 0},
        {"sync/published", (double)sc->published},
        {"sync/publish_seconds", sc->pub_seconds},
        {"sync/bytes", sc->pub_bytes},
        {"policy/version", (double)l->version},
        {"policy/old_version", (double)l->old_version},
        {"staleness/mean", bt->staleness_mean},
        {"mismatch/kl", mt->mismatch_kl},
        {"mismatch/is_min", mt->is_min},
        {"mismatch/is_max", mt->is_max},
        {"mismatch/routing_frac", routing},
        {"snapshot/changed_frac", l->pub.changed_data_frac},
        {"snapshot/changed_blocks_frac", l->pub.changed_frac},
        {"skip/this_step", (double)skipped},
        {"skip/no_pg_total", (double)l->skipped_no_pg},
        {"skip/nonfinite_total", (double)l->skipped_nonfinite},
    };
    log_emit(LOG_INFO, "learner.step", f, Q_ARRAY_LEN(f), NULL);
}

/* One optimizer step on rows [r0, r1). */
static int train_step(learner_t *l, step_ctx_t *sc, replay_t *rp, const real *logp_old,
                      const real *logp_ref, real *dlogp, int r0, int r1,
                      learner_train_result_t *res, model_stats_t *acc, qerr_t *err) {
    const batcher_batch_t *bt = sc->bt;
    const int T = bt->T, nb = r1 - r0;
    const size_t o = (size_t)r0 * T;
    const double t0 = now_s();
    dapo_metrics_t mt = {0};
    model_stats_t st = {0};
    double entropy = 0, grad_norm = 0;
    const double lr = optim_lr_at(optim_config(l->opt), optim_steps(l->opt));
    int skipped = 0;
    long tokens = 0;
    if (nb > 0) {
        if (rp->on)
            replay_select(rp, l, r0, r1, T);
        model_batch_t mb = mb_rows(l, bt, rp, r0, r1, 1);
        mb.count_load = 1;
        if (model_forward(l->m, &mb, &st, err))
            return -1;
        const real *lp = model_logp(l->m), *ent = model_entropy(l->m);
        dapo_loss_forward(&mt, lp, logp_old + o, bt->logp_b + o, logp_ref ? logp_ref + o : NULL,
                          bt->adv + o, bt->mask + o, nb, T, &l->loss);
        double esum = 0;
        for (size_t i = 0; i < (size_t)nb * T; i++)
            esum += bt->mask[o + i] != 0 ? (double)ent[i] : 0;
        for (int b = r0; b < r1; b++)
            tokens += bt->prompt_len[b] + bt->len[b] - 1;
        entropy = mt.tokens > 0 ? esum / (double)mt.tokens : 0;
        acc->decisions += st.decisions;
        acc->mismatches += st.mismatches;
    }
    if (mt.pg_tokens == 0) {
        skipped = 1;
        l->skipped_no_pg++;
        res->skipped_no_pg++;
        model_balance_update(l->m, 0);
    } else {
        model_grads_zero(l->m);
        dapo_loss_backward(dlogp, model_logp(l->m), logp_old + o, bt->logp_b + o,
                           logp_ref ? logp_ref + o : NULL, bt->adv + o, bt->mask + o, nb, T,
                           &l->loss, 1.0);
        model_backward(l->m, dlogp, NULL);
        optim_result_t orr;
        optim_step(l->opt, l->m, mt.loss + (st.loss - st.ce), &orr);
        grad_norm = orr.grad_norm;
        if (orr.applied) {
            res->applied++;
        } else {
            skipped = 1;
            l->skipped_nonfinite++;
            res->skipped_nonfinite++;
            log_warn("learner.skip", "step %ld skipped: loss %g, gradient norm %g not finite",
                     l->step, mt.loss, orr.grad_norm);
        }
        /* At lr 0 nothing may change: the balancing biases travel in snapshots too. */
        model_balance_update(l->m, orr.applied && lr > 0);
    }
    if (mt.mismatch_kl > LEARNER_ALERT_MISMATCH_KL) {
        const log_field_t f[] = {{"step", (double)l->step},
                                 {"mismatch/kl", mt.mismatch_kl},
                                 {"tis/mean_weight", mt.tis_mean_weight}};
        log_emit(LOG_WARN, "learner.alert", f, Q_ARRAY_LEN(f),
                 "sampler log-probs far from the old policy's (mismatch/kl %.3g > %.3g): are the "
                 "workers running the published snapshot?",
                 mt.mismatch_kl, LEARNER_ALERT_MISMATCH_KL);
    }
    if (res->steps == 0)
        res->first = mt;
    res->last = mt;
    res->steps++;
    l->step++;
    sc->published = 0;
    sc->pub_seconds = sc->pub_bytes = 0;
    if (l->step % l->cfg.learner.sync_interval == 0) {
        if (sync_version(l, err))
            return -1;
        sc->published = 1;
        sc->pub_seconds = l->pub_seconds;
        sc->pub_bytes = (double)l->pub.sync_bytes;
        res->published++;
    }
    step_log(l, sc, &mt, &st, entropy, grad_norm, lr, skipped, now_s() - t0 + sc->prep_seconds,
             tokens);
    sc->prep_seconds = 0;
    if (l->n_ev > 0 && l->cfg.learner.eval_interval > 0 &&
        l->step % l->cfg.learner.eval_interval == 0) {
        double accv;
        if (learner_eval(l, &accv, err))
            return -1;
        res->evaluated++;
    }
    return 0;
}

static int train_batch(learner_t *l, const batcher_batch_t *bt, rec_t *const *recs,
                       const learner_perf_t *perf, learner_train_result_t *res, qerr_t *err) {
    const int B = bt->B, T = bt->T, G = bt->G, ng = bt->n_groups;
    const int M = l->cfg.learner.minibatches;
    const size_t BT = (size_t)B * T;
    const double t0 = now_s();
    int with_rec = 0;
    for (int g = 0; g < ng; g++)
        with_rec |= recs[g] != NULL;
    replay_t rp = {0};
    real *old_buf = NULL, *ref_buf = NULL, *dlogp = malloc(BT * sizeof *dlogp);
    int rc = dlogp ? 0 : qerr_set(err, QERR_NOMEM, "batch: out of memory");
    if (rc == 0 && l->old)
        rc = (old_buf = malloc(BT * sizeof *old_buf)) ? 0
                                                      : qerr_set(err, QERR_NOMEM, "out of memory");
    if (rc == 0 && l->ref)
        rc = (ref_buf = malloc(BT * sizeof *ref_buf)) ? 0
                                                      : qerr_set(err, QERR_NOMEM, "out of memory");
    if (rc == 0 && with_rec && l->cfg.model.routing_replay)
        rc = replay_init(&rp, l, (int)BT, err);
    /* Before any update: the replay record, old and reference log-probs, per mini-batch. */
    for (int k = 0; rc == 0 && k < M; k++) {
        const int r0 = ng * k / M * G, r1 = ng * (k + 1) / M * G;
        if (r1 == r0)
            continue;
        if (rp.on) {
            rc = replay_build(&rp, l, l->old ? l->old : l->m, bt, recs, r0, r1, err);
            if (rc == 0)
                replay_select(&rp, l, r0, r1, T);
        }
        if (rc == 0 && l->old)
            rc = logp_rows(l, l->old, bt, &rp, r0, r1, old_buf, err);
        if (rc == 0 && l->ref)
            rc = logp_rows(l, l->ref, bt, &rp, r0, r1, ref_buf, err);
    }
    step_ctx_t sc = {.bt = bt, .perf = perf, .prep_seconds = now_s() - t0};
    model_stats_t acc = {0};
    const real *logp_old = l->old ? old_buf : bt->logp_b;
    for (int e = 0; rc == 0 && e < l->cfg.learner.ppo_epochs; e++)
        for (int k = 0; rc == 0 && k < M && l->step < l->limit; k++) {
            const int r0 = ng * k / M * G, r1 = ng * (k + 1) / M * G;
            rc = train_step(l, &sc, &rp, logp_old, ref_buf, dlogp, r0, r1, res, &acc, err);
        }
    res->routing_mismatch_frac =
        acc.decisions > 0 ? (double)acc.mismatches / (double)acc.decisions : 0;
    replay_free(&rp, l->L);
    free(dlogp);
    free(old_buf);
    free(ref_buf);
    return rc;
}

int learner_train(learner_t *l, const learner_perf_t *perf, learner_train_result_t *res,
                  qerr_t *err) {
    memset(res, 0, sizeof *res);
    if (l->step >= l->limit)
        return 0;
    batcher_batch_t bt;
    rec_t **recs = NULL;
    pthread_mutex_lock(&l->lock);
    recs_prune(l, (int64_t)l->version);
    int rc = batcher_take(l->b, (int64_t)l->version, &bt, err);
    if (rc == 1) {
        recs = calloc((size_t)bt.n_groups, sizeof *recs);
        for (int g = 0; recs && g < bt.n_groups; g++) {
            rec_t r;
            if (recs_take(l, bt.group_id[g], &r)) {
                recs[g] = malloc(sizeof r);
                if (recs[g])
                    *recs[g] = r;
                else
                    rec_free(&r);
            }
        }
    }
    pthread_mutex_unlock(&l->lock);
    if (rc <= 0)
        return rc;
    if (!recs) {
        batcher_batch_free(&bt);
        return qerr_set(err, QERR_NOMEM, "batch: out of memory");
    }
    rc = train_batch(l, &bt, recs, perf, res, err);
    for (int g = 0; g < bt.n_groups; g++)
        if (recs[g]) {
            rec_free(recs[g]);
            free(recs[g]);
        }
    free(recs);
    batcher_batch_free(&bt);
    return rc ? -1 : 1;
}

/* ---- checkpoints ---- */

int learner_checkpoint_due(const learner_t *l) {
    const long iv = l->cfg.learner.checkpoint_interval;
    return iv > 0 && l->step / iv != l->last_ckpt_step / iv;
}

static int state_write(learner_t *l, const char *path, const uint8_t *ds, size_t dlen,
                       const uint8_t *bs, size_t blen, qerr_t *err) {
    snapshot_entry_t *e = snapshot_store_get(l->store, l->version);
    if (!e)
        return qerr_set(err, QERR_NOTFOUND, "checkpoint: snapshot v%" PRIu64 " is not in the store",
                        l->version);
    size_t slen;
    const uint8_t *sb = snapshot_entry_data(e, &slen);
    safetensors_writer_t *w = safetensors_writer_new();
    int rc = w ? 0 : qerr_set(err, QERR_NOMEM, "checkpoint: out of memory");
    const uint64_t nd = dlen, nb = blen, ns = slen, np = model_num_reals(l->m);
    if (rc == 0)
        rc = safetensors_writer_add(w, "dispatcher", SAFETENSORS_U8, 1, &nd, ds, err);
    if (rc == 0)
        rc = safetensors_writer_add(w, "batcher", SAFETENSORS_U8, 1, &nb, bs, err);
    if (rc == 0)
        rc = safetensors_writer_add(w, "snapshot", SAFETENSORS_U8, 1, &ns, sb, err);
    if (rc == 0 && l->old)
        rc = safetensors_writer_add(w, "old_weights", SAFETENSORS_F32, 1, &np,
                                    model_frozen_weights(l->old), err);
    if (rc == 0 && l->ref)
        rc = safetensors_writer_add(w, "ref_weights", SAFETENSORS_F32, 1, &np,
                                    model_frozen_weights(l->ref), err);
    const struct {
        const char *key;
        uint64_t v;
    } meta[] = {{"version", l->version},
                {"old_version", l->old_version},
                {"step", (uint64_t)l->step},
                {"skipped_no_pg", (uint64_t)l->skipped_no_pg},
                {"skipped_nonfinite", (uint64_t)l->skipped_nonfinite}};
    if (rc == 0)
        rc = safetensors_writer_set_metadata(w, "format", LEARNER_STATE_FORMAT, err);
    for (size_t i = 0; rc == 0 && i < Q_ARRAY_LEN(meta); i++) {
        char buf[32];
        snprintf(buf, sizeof buf, "%" PRIu64, meta[i].v);
        rc = safetensors_writer_set_metadata(w, meta[i].key, buf, err);
    }
    if (rc == 0)
        rc = safetensors_writer_write(w, path, err);
    safetensors_writer_destroy(&w);
    snapshot_entry_unref(&e);
    return rc;
}

long learner_checkpoint_step(const learner_t *l) {
    return l->last_ckpt_step;
}

int learner_batcher_save(learner_t *l, uint8_t **buf, size_t *len, qerr_t *err) {
    pthread_mutex_lock(&l->lock);
    const int rc = batcher_save(l->b, buf, len, err);
    pthread_mutex_unlock(&l->lock);
    return rc;
}

int learner_checkpoint(learner_t *l, const uint8_t *dispatcher_state, size_t dispatcher_len,
                       const uint8_t *batcher_state, size_t batcher_len, char *out_dir, size_t cap,
                       qerr_t *err) {
    char dir[PATH_CAP], path[PATH_CAP + 32];
    if (snprintf(dir, sizeof dir, "%s/step-%08ld", l->cfg.learner.checkpoint_dir, l->step) >=
        (int)sizeof dir)
        return qerr_set(err, QERR_RANGE, "learner.checkpoint_dir: path too long");
    snprintf(path, sizeof path, "%s/%s", dir, LEARNER_STATE_FILE);
    int rc = make_dirs(dir, err);
    if (rc == 0)
        rc =
            state_write(l, path, dispatcher_state, dispatcher_len, batcher_state, batcher_len, err);
    checkpoint_state_t st = {.step = l->step, .seed = l->cfg.learner.seed};
    if (rc == 0)
        rc = checkpoint_save(l->cfg.learner.checkpoint_dir, &l->cfg, l->m, l->opt, &st, out_dir,
                             cap, err);
    if (rc == 0) {
        l->last_ckpt_step = l->step;
        const log_field_t f[] = {{"step", (double)l->step}, {"policy/version", (double)l->version}};
        log_emit(LOG_INFO, "learner.checkpoint", f, Q_ARRAY_LEN(f), "%s", dir);
    }
    return rc;
}
