/* The engine: continuous batching over slots, shared prefills, sampling, results
 * (rollout/quillan.h).
 *
 * Scheduling: samples are taken in order (prompt 0's samples 0..G-1, then prompt 1's, ...).
 * When a sample starts and its prompt is not the one last prefilled, the prompt is run once
 * through the network (in chunks of ENGINE_PREFILL_CHUNK rows) into the prefill cache, keeping
 * the logits of its last position and the routing records of its positions; every sample of
 * that prompt then copies those K/V rows into its slot's cache and draws its first token from
 * those logits. Each decoding step runs one row per active slot; a slot whose sample finishes
 * is refilled before the next step. */
#include "engine.h"

#include "alloc.h"
#include "rng.h"
#include "sampler.h"

#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* Prompt rows per prefill forward: bounds the scratch while keeping products batched. */
#define ENGINE_PREFILL_CHUNK 64

typedef struct {
    int active;
    int prompt, sample;
    int pos; /* position of `last`, the token the next step feeds */
    int32_t last;
    float *kc, *vc; /* [L, cap, C] */
    float *logits;  /* [V] */
} slot_t;

struct quillan_engine {
    quillan_engine_params_t prm;
    int threads;
    kern_pool_t *pool;
    eng_fwd_t *fwd;
    int nslots;
    slot_t *slots;
    float *kv; /* slots' caches: [nslots, 2, L, cap, C] */
    size_t kv_floats;
    int cap;    /* positions per slot cache */
    float *pkv; /* prefill cache [2, L, pcap, C] */
    size_t pkv_floats;
    int pcap;
    float *plogits; /* [V] logits of the last prompt position */
    float *logits;  /* [nslots, V] */
    int V;
    int32_t *proute; /* [pcap, L * route_ints] routing of the prefilled prompt */
    uint64_t *pplan; /* [pcap, 2 Lw] */
    size_t proute_n, pplan_n;
    eng_row_t *rows;                 /* [max(nslots, ENGINE_PREFILL_CHUNK)] */
    sampler_scratch_t *ss;           /* [threads] */
    sampler_result_t *res;           /* [nslots] the step's draws */
    const quillan_prompt_t *prompts; /* of the current quillan_generate call */
    quillan_stats_t st;
    eng_time_stats_t ts;
};

void quillan_engine_params_default(quillan_engine_params_t *params) {
    memset(params, 0, sizeof *params);
    params->max_batch = QUILLAN_DEFAULT_BATCH;
    params->record_routing = 1;
}

quillan_engine_t *quillan_engine_new(const quillan_engine_params_t *params, qerr_t *err) {
    if (params->threads < 0 || params->threads > KERN_POOL_MAX) {
        qerr_set(err, QERR_RANGE, "engine: threads %d outside 0..%d (0 = every core)",
                 params->threads, KERN_POOL_MAX);
        return NULL;
    }
    if (params->max_batch < 0 || params->max_batch > 4096) {
        qerr_set(err, QERR_RANGE, "engine: max_batch %d outside 0..4096 (0 = %d)",
                 params->max_batch, QUILLAN_DEFAULT_BATCH);
        return NULL;
    }
    if (kern_init(err) < 0)
        return NULL;
    quillan_engine_t *e = calloc(1, sizeof *e);
    if (!e) {
        qerr_set(err, QERR_NOMEM, "engine: out of memory");
        return NULL;
    }
    e->prm = *params;
    if (e->prm.max_batch == 0)
        e->prm.max_batch = QUILLAN_DEFAULT_BATCH;
    long ncpu = sysconf(_SC_NPROCESSORS_ONLN);
    e->threads = params->threads > 0 ? params->threads
                                     : (int)(ncpu < 1               ? 1
                                             : ncpu > KERN_POOL_MAX ? KERN_POOL_MAX
                                                                    : ncpu);
    e->pool = kern_pool_new(e->threads, err);
    e->ss = calloc((size_t)e->threads, sizeof *e->ss);
    if (!e->pool || !e->ss) {
        if (e->pool)
            qerr_set(err, QERR_NOMEM, "engine: out of memory");
        kern_pool_destroy(&e->pool);
        free(e->ss);
        free(e);
        return NULL;
    }
    return e;
}

static void engine_free_buffers(quillan_engine_t *e) {
    eng_fwd_destroy(&e->fwd);
    free(e->slots);
    free(e->res);
    e->slots = NULL;
    e->res = NULL;
    q_aligned_free(e->kv);
    q_aligned_free(e->pkv);
    q_aligned_free(e->logits);
    q_aligned_free(e->plogits);
    free(e->proute);
    free(e->pplan);
    free(e->rows);
    e->kv = e->pkv = e->logits = e->plogits = NULL;
    e->proute = NULL;
    e->pplan = NULL;
    e->rows = NULL;
    e->kv_floats = e->pkv_floats = e->proute_n = e->pplan_n = 0;
    e->cap = e->pcap = e->nslots = 0;
    e->st.kv_bytes = 0;
    for (int t = 0; t < e->threads; t++)
        sampler_scratch_free(&e->ss[t]);
}

void quillan_engine_destroy(quillan_engine_t **pe) {
    if (!pe || !*pe)
        return;
    quillan_engine_t *e = *pe;
    engine_free_buffers(e);
    kern_pool_destroy(&e->pool);
    free(e->ss);
    free(e);
    *pe = NULL;
}

int quillan_engine_threads(const quillan_engine_t *e) {
    return e->threads;
}

void quillan_engine_stats(const quillan_engine_t *e, quillan_stats_t *out) {
    *out = e->st;
}

void quillan_engine_stats_reset(quillan_engine_t *e) {
    size_t kv = e->st.kv_bytes;
    memset(&e->st, 0, sizeof e->st);
    memset(&e->ts, 0, sizeof e->ts);
    e->st.kv_bytes = kv;
}

void eng_engine_time_stats(const quillan_engine_t *e, eng_time_stats_t *out) {
    *out = e->ts;
}

kern_pool_t *eng_engine_pool(quillan_engine_t *e) {
    return e->pool;
}

void quillan_sampling_default(quillan_sampling_t *s) {
    memset(s, 0, sizeof *s);
    s->temperature = 1;
    s->top_p = 1;
    s->max_new_tokens = 100;
}

const char *quillan_finish_name(quillan_finish_t f) {
    switch (f) {
    case QUILLAN_FINISH_STOP: return "stop";
    case QUILLAN_FINISH_LENGTH: return "length";
    case QUILLAN_FINISH_COUNT: break;
    }
    return "?";
}

void quillan_group_free(quillan_group_t *g) {
    if (!g)
        return;
    for (int i = 0; g->samples && i < g->n_samples; i++) {
        quillan_sample_t *s = &g->samples[i];
        free(s->tokens);
        free(s->logprobs);
        free(s->logprobs_full);
        free(s->kept);
        free(s->route);
        free(s->plan);
    }
    free(g->samples);
    memset(g, 0, sizeof *g);
}

/* ---- validation and result buffers ---- */

/* The number of tokens sample of prompt pr may generate: max_new_tokens, bounded by the
 * context (the last token sampled sits at position context - 1 and is never fed back). */
int eng_sample_replay(moe_route_t *routes, diffusion_plan_t *plan, int row,
                      const quillan_policy_t *p, const quillan_sample_t *s, int n, qerr_t *err) {
    const int L = p->cfg.num_layers, KM = p->md.KM, KE = p->md.KE, KN = p->md.KN, Lw = p->Lw;
    if (!s->route || (Lw > 0 && !s->plan))
        return qerr_set(err, QERR_INVALID,
                        "eng_sample_replay: the sample has no routing record (record_routing off)");
    if (n < 0 || n > s->n_route || row < 0)
        return qerr_set(err, QERR_RANGE,
                        "eng_sample_replay: positions [0, %d) to row %d of a record of %d", n, row,
                        s->n_route);
    for (int l = 0; l < L; l++) {
        const moe_route_t *r = &routes[l];
        if (r->KM != KM || r->KE != KE || r->KN != KN)
            return qerr_set(err, QERR_INVALID,
                            "eng_sample_replay: layer %d's route has k's %d/%d/%d, the policy "
                            "%d/%d/%d",
                            l, r->KM, r->KE, r->KN, KM, KE, KN);
        if (row + n > r->max_BT)
            return qerr_set(err, QERR_RANGE,
                            "eng_sample_replay: rows up to %d in layer %d's route of %d", row + n,
                            l, r->max_BT);
    }
    if (plan->Lw != Lw || row + n > plan->max_BT)
        return qerr_set(err, plan->Lw != Lw ? QERR_INVALID : QERR_RANGE,
                        "eng_sample_replay: a plan of %d words x %d rows for %d words x %d rows",
                        plan->Lw, plan->max_BT, Lw, row + n);
    for (int t = 0; t < n; t++) {
        const size_t i = (size_t)(row + t);
        for (int l = 0; l < L; l++) {
            const int32_t *rec = s->route + ((size_t)t * L + l) * p->route_ints;
            moe_route_t *r = &routes[l];
            memcpy(r->mini + i * KM, rec, (size_t)KM * sizeof *rec);
            memcpy(r->expert + i * KM * KE, rec + KM, (size_t)KM * KE * sizeof *rec);
            memcpy(r->micro + i * KM * KN, rec + KM + KM * KE, (size_t)KM * KN * sizeof *rec);
        }
        if (Lw > 0) {
            memcpy(plan->z1 + i * Lw, s->plan + (size_t)t * 2 * Lw, (size_t)Lw * sizeof *s->plan);
            memcpy(plan->z0 + i * Lw, s->plan + ((size_t)t * 2 + 1) * Lw,
                   (size_t)Lw * sizeof *s->plan);
        }
    }
    for (int l = 0; l < L; l++)
        if (routes[l].BT < row + n)
            routes[l].BT = row + n;
    if (plan->BT < row + n)
        plan->BT = row + n;
    return 0;
}

static int max_new(const quillan_policy_t *p, const quillan_prompt_t *pr) {
    const int room = p->cfg.context - pr->n_tokens;
    return pr->sampling.max_new_tokens < room ? pr->sampling.max_new_tokens : room;
}

static int check_prompts(const quillan_policy_t *p, const quillan_prompt_t *prompts, int n,
                         qerr_t *err) {
    const int V = p->cfg.vocab_size, ctx = p->cfg.context;
    for (int i = 0; i < n; i++) {
        const quillan_prompt_t *pr = &prompts[i];
        if (pr->n_tokens < 1 || !pr->tokens)
            return qerr_set(err, QERR_INVALID, "prompt %d: empty prompt (it needs at least BOS)",
                            i);
        if (pr->n_tokens >= ctx)
            return qerr_set(err, QERR_RANGE,
                            "prompt %d: %d tokens do not fit the context of %d tokens (at most "
                            "%d, leaving room for one new token)",
                            i, pr->n_tokens, ctx, ctx - 1);
        for (int t = 0; t < pr->n_tokens; t++)
            if (pr->tokens[t] < 0 || pr->tokens[t] >= V)
                return qerr_set(err, QERR_RANGE,
                                "prompt %d: token %d at position %d is outside the vocabulary "
                                "[0, %d)",
                                i, pr->tokens[t], t, V);
        if (pr->n_samples < 1)
            return qerr_set(err, QERR_RANGE, "prompt %d: n_samples %d must be >= 1", i,
                            pr->n_samples);
        const quillan_sampling_t *s = &pr->sampling;
        sampler_params_t sp = {s->temperature, s->top_k, s->top_p};
        if (sampler_params_check(&sp, err) < 0)
            return qerr_wrap(err, "prompt %d: sampling", i);
        if (s->max_new_tokens < 1)
            return qerr_set(err, QERR_RANGE, "prompt %d: max_new_tokens %d must be >= 1", i,
                            s->max_new_tokens);
        if (s->n_stop < 0 || (s->n_stop > 0 && !s->stop_tokens))
            return qerr_set(err, QERR_INVALID, "prompt %d: bad stop token list", i);
        for (int k = 0; k < s->n_stop; k++)
            if (s->stop_tokens[k] < 0 || s->stop_tokens[k] >= V)
                return qerr_set(err, QERR_RANGE,
                                "prompt %d: stop token %d is outside the vocabulary [0, %d)", i,
                                s->stop_tokens[k], V);
    }
    return 0;
}

static int alloc_group(quillan_group_t *g, const quillan_policy_t *p, const quillan_prompt_t *pr,
                       int record, qerr_t *err) {
    g->prompt_id = pr->prompt_id;
    g->policy_version = qpolicy_version(p->q);
    g->samples = calloc((size_t)pr->n_samples, sizeof *g->samples);
    if (!g->samples)
        return qerr_set(err, QERR_NOMEM, "engine: out of memory for results");
    g->n_samples = pr->n_samples;
    const size_t mn = (size_t)max_new(p, pr), npos = (size_t)pr->n_tokens + mn - 1;
    for (int i = 0; i < pr->n_samples; i++) {
        quillan_sample_t *s = &g->samples[i];
        s->tokens = malloc(mn * sizeof *s->tokens);
        s->logprobs = malloc(mn * sizeof *s->logprobs);
        s->logprobs_full = malloc(mn * sizeof *s->logprobs_full);
        s->kept = malloc(mn * sizeof *s->kept);
        if (record) {
            s->route =
                malloc(npos * (size_t)p->cfg.num_layers * (size_t)p->route_ints * sizeof *s->route);
            s->plan = malloc(npos * 2 * (size_t)p->Lw * sizeof *s->plan);
        }
        if (!s->tokens || !s->logprobs || !s->logprobs_full || !s->kept ||
            (record && (!s->route || !s->plan)))
            return qerr_set(err, QERR_NOMEM, "engine: out of memory for results");
    }
    return 0;
}

/* Sizes slots, caches and scratch for this call. */
static int engine_prepare(quillan_engine_t *e, const quillan_policy_t *p,
                          const quillan_prompt_t *prompts, int n, qerr_t *err) {
    long total = 0;
    int cap = 1, pcap = 1;
    for (int i = 0; i < n; i++) {
        total += prompts[i].n_samples;
        const int need = prompts[i].n_tokens + max_new(p, &prompts[i]);
        cap = need > cap ? need : cap;
        pcap = prompts[i].n_tokens > pcap ? prompts[i].n_tokens : pcap;
    }
    const int nslots = (int)(total < e->prm.max_batch ? (total > 0 ? total : 1) : e->prm.max_batch);
    const int rows = nslots > ENGINE_PREFILL_CHUNK ? nslots : ENGINE_PREFILL_CHUNK;
    if (e->fwd && (!eng_fwd_fits(e->fwd, p) || eng_fwd_max_rows(e->fwd) < rows))
        engine_free_buffers(e);
    const size_t L = (size_t)p->cfg.num_layers, C = (size_t)p->cfg.dim,
                 V = (size_t)p->cfg.vocab_size;
    if (!e->fwd) {
        e->fwd = eng_fwd_new(p, rows, err);
        e->rows = calloc((size_t)rows, sizeof *e->rows);
        e->plogits = q_aligned_calloc(V, sizeof(float));
        int ok = e->fwd && e->rows && e->plogits;
        for (int t = 0; ok && t < e->threads; t++)
            ok = sampler_scratch_init(&e->ss[t], p->cfg.vocab_size, err) == 0;
        if (!ok) {
            engine_free_buffers(e);
            return err && err->code != QERR_OK ? -1
                                               : qerr_set(err, QERR_NOMEM, "engine: out of memory");
        }
        e->V = p->cfg.vocab_size;
    }
    const size_t kv = (size_t)nslots * 2 * L * (size_t)cap * C;
    if (nslots != e->nslots || cap != e->cap) {
        q_aligned_free(e->kv);
        q_aligned_free(e->logits);
        free(e->slots);
        free(e->res);
        e->kv = q_aligned_alloc(Q_ALIGN, kv * sizeof(float));
        e->logits = q_aligned_calloc((size_t)nslots * V, sizeof(float));
        e->slots = calloc((size_t)nslots, sizeof *e->slots);
        e->res = calloc((size_t)nslots, sizeof *e->res);
        if (!e->kv || !e->logits || !e->slots || !e->res) {
            engine_free_buffers(e);
            return qerr_set(err, QERR_NOMEM,
                            "engine: out of memory for the KV cache of %d sequences x %d "
                            "positions (%.1f MB)",
                            nslots, cap, (double)kv * 4 / 1e6);
        }
        e->nslots = nslots;
        e->cap = cap;
        e->kv_floats = kv;
    }
    const size_t pkv = 2 * L * (size_t)pcap * C;
    const size_t pr_n = (size_t)pcap * L * (size_t)p->route_ints, pp_n = (size_t)pcap * 2 * p->Lw;
    if (pcap > e->pcap || pr_n > e->proute_n || pp_n > e->pplan_n) {
        q_aligned_free(e->pkv);
        free(e->proute);
        free(e->pplan);
        e->pkv = q_aligned_alloc(Q_ALIGN, pkv * sizeof(float));
        e->proute = malloc(pr_n * sizeof *e->proute);
        e->pplan = malloc(pp_n * sizeof *e->pplan);
        if (!e->pkv || !e->proute || !e->pplan) {
            engine_free_buffers(e);
            return qerr_set(err, QERR_NOMEM, "engine: out of memory for the prefill cache");
        }
        e->pcap = pcap;
        e->pkv_floats = pkv;
        e->proute_n = pr_n;
        e->pplan_n = pp_n;
    }
    for (int i = 0; i < nslots; i++) {
        slot_t *s = &e->slots[i];
        memset(s, 0, sizeof *s);
        s->kc = e->kv + (size_t)i * 2 * L * (size_t)cap * C;
        s->vc = s->kc + L * (size_t)cap * C;
        s->logits = e->logits + (size_t)i * V;
    }
    e->st.kv_bytes = (kv + pkv) * sizeof(float);
    return 0;
}

/* ---- prefill and decoding ---- */

static void prefill(quillan_engine_t *e, const quillan_policy_t *p, const quillan_prompt_t *pr) {
    const int P = pr->n_tokens, L = p->cfg.num_layers, record = e->prm.record_routing;
    const size_t C = (size_t)p->cfg.dim, rstride = (size_t)L * p->route_ints;
    float *kc = e->pkv, *vc = e->pkv + (size_t)L * e->pcap * C;
    for (int t0 = 0; t0 < P; t0 += ENGINE_PREFILL_CHUNK) {
        const int n = P - t0 < ENGINE_PREFILL_CHUNK ? P - t0 : ENGINE_PREFILL_CHUNK;
        for (int r = 0; r < n; r++) {
            const int pos = t0 + r;
            e->rows[r] = (eng_row_t){
                .token = pr->tokens[pos],
                .pos = pos,
                .kc = kc,
                .vc = vc,
                .cap = e->pcap,
                .route = record ? e->proute + (size_t)pos * rstride : NULL,
                .plan = record ? e->pplan + (size_t)pos * 2 * p->Lw : NULL,
                .logits = pos == P - 1 ? e->plogits : NULL,
            };
        }
        eng_forward(e->fwd, p, e->pool, e->rows, n, &e->st, &e->ts);
    }
    e->st.prefill_tokens += P;
}

/* Appends a sampled token to sample s; returns 1 when the sample is finished. */
static int append_token(quillan_sample_t *s, const sampler_result_t *r, const quillan_prompt_t *pr,
                        int32_t eos, int limit) {
    s->tokens[s->n_tokens] = r->token;
    s->logprobs[s->n_tokens] = r->logprob;
    s->logprobs_full[s->n_tokens] = r->logprob_full;
    s->kept[s->n_tokens] = r->kept;
    s->n_tokens++;
    int stop = r->token == eos;
    for (int k = 0; k < pr->sampling.n_stop && !stop; k++)
        stop = r->token == pr->sampling.stop_tokens[k];
    if (stop) {
        s->finish = QUILLAN_FINISH_STOP;
        return 1;
    }
    if (s->n_tokens >= limit) {
        s->finish = QUILLAN_FINISH_LENGTH;
        return 1;
    }
    return 0;
}

/* Draws the token at position pos of sample `sample` of pr from logits, with scratch ss. */
static void draw(quillan_engine_t *e, sampler_result_t *r, const float *logits,
                 const quillan_prompt_t *pr, int sample, int pos, sampler_scratch_t *ss) {
    const sampler_params_t sp = {pr->sampling.temperature, pr->sampling.top_k, pr->sampling.top_p};
    const float u =
        rng_sample_uniform(pr->sampling.seed, pr->prompt_id, (uint64_t)sample, (uint64_t)pos);
    sampler_sample(r, logits, e->V, &sp, u, ss);
}

/* One chunk per slot: the active slots' next tokens, each from its own logits and seeded
 * uniform, so which thread draws it does not matter. */
static void draw_chunk(void *vctx, size_t c, int tid) {
    quillan_engine_t *e = vctx;
    const slot_t *sl = &e->slots[c];
    if (sl->active)
        draw(e, &e->res[c], sl->logits, &e->prompts[sl->prompt], sl->sample, sl->pos + 1,
             &e->ss[tid]);
}

int quillan_generate(quillan_engine_t *e, quillan_policy_t *p, const quillan_prompt_t *prompts,
                     int n_prompts, quillan_group_t *groups, quillan_group_done_fn done,
                     void *done_ctx, qerr_t *err) {
    if (n_prompts < 0)
        return qerr_set(err, QERR_RANGE, "generate: n_prompts %d must be >= 0", n_prompts);
    for (int i = 0; i < n_prompts; i++)
        memset(&groups[i], 0, sizeof groups[i]);
    if (n_prompts == 0)
        return 0;
    if (check_prompts(p, prompts, n_prompts, err) < 0)
        return -1;
    const int record = e->prm.record_routing;
    for (int i = 0; i < n_prompts; i++)
        if (alloc_group(&groups[i], p, &prompts[i], record, err) < 0)
            return -1;
    if (engine_prepare(e, p, prompts, n_prompts, err) < 0)
        return -1;
    quillan_policy_info_t info;
    quillan_policy_info(p, &info);
    const int L = p->cfg.num_layers, Lw = p->Lw;
    const size_t C = (size_t)p->cfg.dim, rstride = (size_t)L * p->route_ints;
    int *finished = calloc((size_t)n_prompts, sizeof *finished);
    if (!finished)
        return qerr_set(err, QERR_NOMEM, "generate: out of memory");
    int next_prompt = 0, next_sample = 0, prefilled = -1, active = 0;

    for (;;) {
        /* Refill every free slot from the pending samples. */
        for (int si = 0; si < e->nslots && next_prompt < n_prompts; si++) {
            slot_t *sl = &e->slots[si];
            while (!sl->active && next_prompt < n_prompts) {
                const int g = next_prompt, smp = next_sample;
                const quillan_prompt_t *pr = &prompts[g];
                if (++next_sample == pr->n_samples) {
                    next_prompt++;
                    next_sample = 0;
                }
                if (prefilled != g) {
                    prefill(e, p, pr);
                    prefilled = g;
                }
                const int P = pr->n_tokens;
                quillan_sample_t *s = &groups[g].samples[smp];
                for (int l = 0; l < L; l++) {
                    const size_t src = (size_t)l * e->pcap * C, dst = (size_t)l * e->cap * C;
                    memcpy(sl->kc + dst, e->pkv + src, (size_t)P * C * sizeof(float));
                    memcpy(sl->vc + dst, e->pkv + (size_t)L * e->pcap * C + src,
                           (size_t)P * C * sizeof(float));
                }
                if (record) {
                    memcpy(s->route, e->proute, (size_t)P * rstride * sizeof *s->route);
                    memcpy(s->plan, e->pplan, (size_t)P * 2 * Lw * sizeof *s->plan);
                }
                sampler_result_t r;
                eng_clock_t clk;
                eng_clock_start(&clk, e->pool);
                draw(e, &r, e->plogits, pr, smp, P, &e->ss[0]);
                eng_clock_lap(&clk, &e->st.sample_s, &e->ts, ENG_STAGE_SAMPLE);
                if (append_token(s, &r, pr, info.eos, max_new(p, pr))) {
                    s->n_route = record ? P + s->n_tokens - 1 : 0;
                    if (++finished[g] == pr->n_samples && done)
                        done(done_ctx, g, &groups[g]);
                    continue;
                }
                sl->active = 1;
                sl->prompt = g;
                sl->sample = smp;
                sl->pos = P;
                sl->last = r.token;
                active++;
            }
        }
        if (active == 0)
            break;
        /* One decoding step over the active slots. */
        int n = 0;
        for (int si = 0; si < e->nslots; si++) {
            slot_t *sl = &e->slots[si];
            if (!sl->active)
                continue;
            quillan_sample_t *s = &groups[sl->prompt].samples[sl->sample];
            e->rows[n++] = (eng_row_t){
                .token = sl->last,
                .pos = sl->pos,
                .kc = sl->kc,
                .vc = sl->vc,
                .cap = e->cap,
                .route = record ? s->route + (size_t)sl->pos * rstride : NULL,
                .plan = record ? s->plan + (size_t)sl->pos * 2 * Lw : NULL,
                .logits = sl->logits,
            };
        }
        eng_forward(e->fwd, p, e->pool, e->rows, n, &e->st, &e->ts);
        e->st.steps++;
        e->st.decode_tokens += n;
        eng_clock_t clk;
        eng_clock_start(&clk, e->pool);
        e->prompts = prompts;
        kern_pool_for(e->pool, (size_t)e->nslots, draw_chunk, e);
        for (int si = 0; si < e->nslots; si++) {
            slot_t *sl = &e->slots[si];
            if (!sl->active)
                continue;
            const quillan_prompt_t *pr = &prompts[sl->prompt];
            quillan_sample_t *s = &groups[sl->prompt].samples[sl->sample];
            const sampler_result_t *r = &e->res[si];
            sl->pos++;
            sl->last = r->token;
            if (append_token(s, r, pr, info.eos, max_new(p, pr))) {
                s->n_route = record ? pr->n_tokens + s->n_tokens - 1 : 0;
                sl->active = 0;
                active--;
                if (++finished[sl->prompt] == pr->n_samples && done)
                    done(done_ctx, sl->prompt, &groups[sl->prompt]);
            }
        }
        eng_clock_lap(&clk, &e->st.sample_s, &e->ts, ENG_STAGE_SAMPLE);
    }
    free(finished);
    return 0;
}
