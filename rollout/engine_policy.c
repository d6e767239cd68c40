/* A loaded policy: weight views into a validated qpolicy_t, precomputed time embeddings of the
 * diffusion stage, the tokenizer, and the reference count. */
#include "engine.h"

#include "layers.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const qpolicy_tensor_t *get(const qpolicy_t *q, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

/* The tensor named by fmt; qpolicy_parse checked that every tensor of the config is present,
 * so a missing one is a bug. */
static const qpolicy_tensor_t *get(const qpolicy_t *q, const char *fmt, ...) {
    char name[MODEL_NAME_MAX];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(name, sizeof name, fmt, ap);
    va_end(ap);
    const qpolicy_tensor_t *t = qpolicy_tensor_find(q, name);
    Q_ASSERT(t != NULL);
    return t;
}

static const float *vec(const qpolicy_tensor_t *t) {
    Q_ASSERT(t->qtype == QTYPE_F32);
    return (const float *)t->data;
}

/* The whole tensor as a matrix [rows, cols]. */
static eng_mat_t mat(const qpolicy_tensor_t *t) {
    return (eng_mat_t){t->data, t->qtype, t->rows, t->cols, t->row_bytes, NULL};
}

static void policy_free(quillan_policy_t *p) {
    if (p->layers) {
        for (int l = 0; l < p->cfg.num_layers; l++) {
            eng_layer_t *L = &p->layers[l];
            free(L->router);
            free(L->exp_w1);
            free(L->exp_w2);
            free(L->mic_router);
            free(L->mic_down);
            free(L->mic_up);
            free(L->bias_router);
            free(L->bias_micro);
        }
    }
    free(p->layers);
    free(p->diff.up);
    free(p->diff.down);
    free(p->diff.blk_norm);
    free(p->diff.up_norm);
    free(p->diff.down_norm);
    free(p->diff.time_emb);
    free(p->ternx);
    tokenizer_destroy(&p->tok);
    qpolicy_destroy(&p->q);
    if (p->release)
        p->release(p->release_ctx, p->release_data, p->release_len);
    free(p);
}

static int map_layers(quillan_policy_t *p) {
    const qpolicy_t *q = p->q;
    const int M = p->md.M, E = p->md.E;
    p->layers = calloc((size_t)p->cfg.num_layers, sizeof *p->layers);
    if (!p->layers)
        return -1;
    for (int l = 0; l < p->cfg.num_layers; l++) {
        eng_layer_t *L = &p->layers[l];
        L->attn_norm = vec(get(q, "layers.%d.attn_norm.weight", l));
        L->moe_norm = vec(get(q, "layers.%d.moe_norm.weight", l));
        L->wq = mat(get(q, "layers.%d.attn.wq.weight", l));
        L->wk = mat(get(q, "layers.%d.attn.wk.weight", l));
        L->wv = mat(get(q, "layers.%d.attn.wv.weight", l));
        L->wo = mat(get(q, "layers.%d.attn.wo.weight", l));
        L->ov_w1 = mat(get(q, "layers.%d.overseer.w1.weight", l));
        L->ov_w2 = mat(get(q, "layers.%d.overseer.w2.weight", l));
        L->gate = mat(get(q, "layers.%d.overseer.gate.weight", l));
        L->bias_gate = vec(get(q, "layers.%d.overseer.gate.bias_balance", l));
        L->router = calloc((size_t)M, sizeof *L->router);
        L->exp_w1 = calloc((size_t)M, sizeof *L->exp_w1);
        L->exp_w2 = calloc((size_t)M, sizeof *L->exp_w2);
        L->mic_router = calloc((size_t)M, sizeof *L->mic_router);
        L->mic_down = calloc((size_t)M, sizeof *L->mic_down);
        L->mic_up = calloc((size_t)M, sizeof *L->mic_up);
        L->bias_router = calloc((size_t)M, sizeof *L->bias_router);
        L->bias_micro = calloc((size_t)M, sizeof *L->bias_micro);
        if (!L->router || !L->exp_w1 || !L->exp_w2 || !L->mic_router || !L->mic_down ||
            !L->mic_up || !L->bias_router || !L->bias_micro)
            return -1;
        for (int j = 0; j < M; j++) {
            L->router[j] = mat(get(q, "layers.%d.minis.%d.router.weight", l, j));
            /* [E, EH, C] as E * EH rows of C; [E, C, EH] as E * C rows of EH. */
            L->exp_w1[j] = mat(get(q, "layers.%d.minis.%d.experts.w1", l, j));
            L->exp_w2[j] = mat(get(q, "layers.%d.minis.%d.experts.w2", l, j));
            L->mic_router[j] = mat(get(q, "layers.%d.minis.%d.micro.router.weight", l, j));
            L->mic_down[j] = mat(get(q, "layers.%d.minis.%d.micro.down", l, j));
            L->mic_up[j] = mat(get(q, "layers.%d.minis.%d.micro.up", l, j));
            L->bias_router[j] = vec(get(q, "layers.%d.minis.%d.router.bias_balance", l, j));
            L->bias_micro[j] = vec(get(q, "layers.%d.minis.%d.micro.router.bias_balance", l, j));
            Q_ASSERT(L->exp_w1[j].rows == (size_t)E * p->md.EH);
        }
    }
    return 0;
}

/* BL_time(sinusoid(k / K)) for k = 1..K, exactly as the learner's denoiser computes it: the
 * same sinusoid, RMSNorm and BitLinear arithmetic (exact integer sums). */
static int time_embeddings(quillan_policy_t *p, qerr_t *err) {
    const diffusion_dims_t *d = &p->dd;
    eng_diff_t *D = &p->diff;
    D->time_emb = calloc((size_t)d->K * (size_t)d->W, sizeof(float));
    float *sin_buf = calloc((size_t)d->D, sizeof(float)),
          *nrm = calloc((size_t)d->D, sizeof(float));
    kern_act_t act = {0};
    int rc = -1;
    if (!D->time_emb || !sin_buf || !nrm) {
        qerr_set(err, QERR_NOMEM, "policy: out of memory");
        goto out;
    }
    if (kern_init(err) < 0 || kern_act_init(&act, 1, (size_t)d->D, err) < 0)
        goto out;
    for (int k = 1; k <= d->K; k++) {
        float rstd;
        diffusion_sinusoid(sin_buf, (real)k / (real)d->K, d->D);
        rmsnorm_forward(nrm, &rstd, sin_buf, D->time_norm, 1, d->D);
        kern_ops()->quantize_act(&act, nrm, (size_t)d->D, 1);
        const eng_prod_t pr = {&D->time,    NULL, 0, &act, 1, D->time_emb + (size_t)(k - 1) * d->W,
                               (size_t)d->W};
        eng_matmul_rows(kern_ops(), &pr, 0, D->time.rows);
    }
    rc = 0;
out:
    kern_act_free(&act);
    free(sin_buf);
    free(nrm);
    return rc;
}

static int map_diffusion(quillan_policy_t *p) {
    const qpolicy_t *q = p->q;
    eng_diff_t *D = &p->diff;
    const int NB = p->dd.NB;
    D->norm = vec(get(q, "diffusion.norm.weight"));
    D->in_z = mat(get(q, "diffusion.in_z.weight"));
    D->in_c = mat(get(q, "diffusion.in_c.weight"));
    D->time = mat(get(q, "diffusion.time.weight"));
    D->out = mat(get(q, "diffusion.out.weight"));
    D->dec = mat(get(q, "diffusion.dec.weight"));
    D->in_z_norm = vec(get(q, "diffusion.in_z.norm"));
    D->in_c_norm = vec(get(q, "diffusion.in_c.norm"));
    D->time_norm = vec(get(q, "diffusion.time.norm"));
    D->out_norm = vec(get(q, "diffusion.out.norm"));
    D->dec_norm = vec(get(q, "diffusion.dec.norm"));
    D->up = calloc((size_t)NB, sizeof *D->up);
    D->down = calloc((size_t)NB, sizeof *D->down);
    D->blk_norm = calloc((size_t)NB, sizeof *D->blk_norm);
    D->up_norm = calloc((size_t)NB, sizeof *D->up_norm);
    D->down_norm = calloc((size_t)NB, sizeof *D->down_norm);
    if (!D->up || !D->down || !D->blk_norm || !D->up_norm || !D->down_norm)
        return -1;
    for (int n = 0; n < NB; n++) {
        D->up[n] = mat(get(q, "diffusion.blocks.%d.up.weight", n));
        D->down[n] = mat(get(q, "diffusion.blocks.%d.down.weight", n));
        D->blk_norm[n] = vec(get(q, "diffusion.blocks.%d.norm.weight", n));
        D->up_norm[n] = vec(get(q, "diffusion.blocks.%d.up.norm", n));
        D->down_norm[n] = vec(get(q, "diffusion.blocks.%d.down.norm", n));
    }
    return 0;
}

/* The diffusion stage's ternary matrices, for pack_ternx. */
static int ternary_mats(quillan_policy_t *p, eng_mat_t **out) {
    eng_diff_t *D = &p->diff;
    int n = 0;
    eng_mat_t *fixed[] = {&D->in_z, &D->in_c, &D->time, &D->out, &D->dec};
    for (size_t i = 0; i < Q_ARRAY_LEN(fixed); i++)
        out[n++] = fixed[i];
    for (int b = 0; b < p->dd.NB; b++) {
        out[n++] = &D->up[b];
        out[n++] = &D->down[b];
    }
    return n;
}

/* Bytes of W's interleaved copy, rounded up so that the next copy starts 64-byte aligned. */
static size_t ternx_slot_bytes(const eng_mat_t *W) {
    return (kern_ilv(QTYPE_TERNARY)->bytes(W->rows, W->cols) + 63) / 64 * 64;
}

/* Where the level has matmul_ilv[QTYPE_TERNARY], one 64-byte aligned buffer with the interleaved
 * copy of every ternary matrix (kernels.h: a tile reads one stream and unpacks with one `and` per
 * row; 2-4x the row-major tiles' rate on the diffusion shapes), the copies' offsets 64-byte
 * aligned. */
static int pack_ternx(quillan_policy_t *p, qerr_t *err) {
    if (kern_init(err) < 0)
        return -1;
    if (!kern_ops()->matmul_ilv[QTYPE_TERNARY])
        return 0;
    eng_mat_t **mats = malloc((5 + 2 * (size_t)p->dd.NB) * sizeof *mats);
    if (!mats)
        return qerr_set(err, QERR_NOMEM, "policy: out of memory");
    const int n = ternary_mats(p, mats);
    size_t total = 0;
    for (int i = 0; i < n; i++)
        total += ternx_slot_bytes(mats[i]);
    p->ternx = aligned_alloc(64, total ? total : 64);
    if (!p->ternx) {
        free(mats);
        return qerr_set(err, QERR_NOMEM, "policy: out of memory for %zu bytes of ternary copies",
                        total);
    }
    size_t off = 0;
    for (int i = 0; i < n; i++) {
        Q_ASSERT(mats[i]->qt == QTYPE_TERNARY);
        kern_ilv(QTYPE_TERNARY)->pack(p->ternx + off, mats[i]->w, mats[i]->rows, mats[i]->cols);
        mats[i]->wx = p->ternx + off;
        off += ternx_slot_bytes(mats[i]);
    }
    free(mats);
    return 0;
}

quillan_policy_t *eng_policy_new(qpolicy_t *q, qerr_t *err) {
    quillan_policy_t *p = calloc(1, sizeof *p);
    if (!p) {
        qerr_set(err, QERR_NOMEM, "policy: out of memory");
        return NULL;
    }
    atomic_init(&p->refs, 1);
    p->q = q;
    p->cfg = *qpolicy_config(q);
    moe_dims_from_config(&p->md, &p->cfg);
    diffusion_dims_from_config(&p->dd, &p->cfg);
    p->route_ints = p->md.KM * (1 + p->md.KE + p->md.KN);
    p->Lw = diffusion_words(p->dd.Lb);
    p->embed = vec(get(q, "embed.weight"));
    p->final_norm = vec(get(q, "final_norm.weight"));
    p->head = mat(get(q, "head.weight"));
    for (size_t i = 0; i < qpolicy_tensor_count(q); i++)
        p->weight_bytes += qpolicy_tensor_at(q, i)->nbytes;
    if (map_layers(p) < 0 || map_diffusion(p) < 0) {
        p->q = NULL; /* stays the caller's on failure */
        policy_free(p);
        qerr_set(err, QERR_NOMEM, "policy: out of memory");
        return NULL;
    }
    if (pack_ternx(p, err) < 0 || time_embeddings(p, err) < 0) {
        p->q = NULL;
        policy_free(p);
        return NULL;
    }
    p->tok = tokenizer_new_for_config(&p->cfg.tokenizer, &p->tok_err);
    return p;
}

static quillan_policy_t *load(qpolicy_t *q, qerr_t *err) {
    if (!q)
        return NULL;
    quillan_policy_t *p = eng_policy_new(q, err);
    if (!p)
        qpolicy_destroy(&q);
    return p;
}

quillan_policy_t *quillan_policy_load_file(const char *path, qerr_t *err) {
    return load(qpolicy_open(path, err), err);
}

quillan_policy_t *quillan_policy_load_bytes(const void *data, size_t len, const char *what,
                                            void (*release)(void *release_ctx, const void *data,
                                                            size_t len),
                                            void *release_ctx, qerr_t *err) {
    /* Parsed as borrowed; the policy takes the buffer only once everything succeeded, so on
     * failure it stays the caller's. */
    qpolicy_t *q = qpolicy_parse(data, len, what, NULL, NULL, err);
    if (!q)
        return NULL;
    quillan_policy_t *p = eng_policy_new(q, err);
    if (!p) {
        qpolicy_destroy(&q);
        return NULL;
    }
    p->release = release;
    p->release_ctx = release_ctx;
    p->release_data = data;
    p->release_len = len;
    return p;
}

quillan_policy_t *quillan_policy_retain(quillan_policy_t *p) {
    atomic_fetch_add(&p->refs, 1);
    return p;
}

void quillan_policy_release(quillan_policy_t **pp) {
    if (!pp || !*pp)
        return;
    if (atomic_fetch_sub(&(*pp)->refs, 1) == 1)
        policy_free(*pp);
    *pp = NULL;
}

void quillan_policy_info(const quillan_policy_t *p, quillan_policy_info_t *out) {
    memset(out, 0, sizeof *out);
    out->version = qpolicy_version(p->q);
    out->vocab_size = p->cfg.vocab_size;
    out->dim = p->cfg.dim;
    out->num_layers = p->cfg.num_layers;
    out->context = p->cfg.context;
    if (p->cfg.tokenizer.kind == MODEL_TOKENIZER_BYTE) {
        out->bos = TOKENIZER_BYTE_BOS;
        out->eos = TOKENIZER_BYTE_EOS;
        out->pad = TOKENIZER_BYTE_PAD;
    } else if (p->tok) {
        out->bos = tokenizer_bos_id(p->tok);
        out->eos = tokenizer_eos_id(p->tok);
        out->pad = tokenizer_pad_id(p->tok);
    } else { /* GPT-2's <|endoftext|> (ARCHITECTURE.md §6) */
        out->bos = out->eos = out->pad = 50256;
    }
    qpolicy_bytes(p->q, &out->bytes);
    out->weight_bytes = p->weight_bytes;
    out->route_ints = p->route_ints;
    out->plan_words = p->Lw;
}

int quillan_tokenize(const quillan_policy_t *p, const char *text, size_t len, int add_bos,
                     int32_t **ids, size_t *n, qerr_t *err) {
    if (!p->tok) {
        if (err)
            *err = p->tok_err;
        return -1;
    }
    tokenizer_ids_t v;
    tokenizer_ids_init(&v);
    if (add_bos) {
        quillan_policy_info_t info;
        quillan_policy_info(p, &info);
        int32_t bos = info.bos;
        /* Appending BOS through the id array keeps one allocation path. */
        v.data = malloc(sizeof *v.data * 16);
        if (!v.data)
            return qerr_set(err, QERR_NOMEM, "tokenize: out of memory");
        v.cap = 16;
        v.data[v.len++] = bos;
    }
    if (tokenizer_encode_append(p->tok, text, len, &v, err) < 0) {
        tokenizer_ids_free(&v);
        return -1;
    }
    *ids = v.data;
    *n = v.len;
    return 0;
}

char *quillan_detokenize(const quillan_policy_t *p, const int32_t *ids, size_t n, size_t *len,
                         qerr_t *err) {
    if (!p->tok) {
        if (err)
            *err = p->tok_err;
        return NULL;
    }
    tokenizer_text_t t;
    tokenizer_text_init(&t);
    if (tokenizer_decode_append(p->tok, ids, n, TOKENIZER_DECODE_SKIP_SPECIAL, &t, err) < 0) {
        tokenizer_text_free(&t);
        return NULL;
    }
    if (!t.data) { /* nothing decoded: an empty string */
        t.data = calloc(1, 1);
        if (!t.data) {
            qerr_set(err, QERR_NOMEM, "detokenize: out of memory");
            return NULL;
        }
    }
    if (len)
        *len = t.len;
    return t.data;
}
