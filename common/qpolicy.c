#include "qpolicy.h"

#include "alloc.h"
#include "fp16.h"
#include "json.h"
#include "safetensors.h"

#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

struct qpolicy {
    model_config_t cfg;
    uint64_t version;
    const unsigned char *bytes;
    size_t len;
    void (*release)(void *ctx, const void *data, size_t len);
    void *release_ctx;
    qpolicy_tensor_t *tensors;
    size_t n_tensors;
};

qtype_t qpolicy_qtype_of(quant_type_t rollout) {
    switch (rollout) {
    case QUANT_F32: return QTYPE_F32;
    case QUANT_F16: return QTYPE_F16;
    case QUANT_TERNARY: return QTYPE_TERNARY;
    case QUANT_INT4: return QTYPE_INT4;
    case QUANT_INT8: return QTYPE_INT8;
    case QUANT_TYPE_COUNT: break;
    }
    Q_ASSERT(!"unknown rollout format");
    return QTYPE_COUNT;
}

/* ---- the model config as JSON ---- */

typedef enum { CF_INT, CF_FLOAT, CF_BOOL, CF_U64 } cfield_type_t;

typedef struct {
    const char *key;
    cfield_type_t type;
    size_t offset;
} cfield_t;

#define CF(name, type)                                                                             \
    { #name, type, offsetof(model_config_t, name) }
static const cfield_t cfields[] = {
    CF(vocab_size, CF_INT),
    CF(dim, CF_INT),
    CF(num_layers, CF_INT),
    CF(num_heads, CF_INT),
    CF(context, CF_INT),
    CF(dropout, CF_FLOAT),
    CF(rope_theta, CF_FLOAT),
    CF(norm_eps, CF_FLOAT),
    CF(overseer_hidden, CF_INT),
    CF(num_mini_moes, CF_INT),
    CF(top_k_minis, CF_INT),
    CF(num_experts_per_mini, CF_INT),
    CF(top_k_experts, CF_INT),
    CF(expert_hidden, CF_INT),
    CF(num_micros_per_mini, CF_INT),
    CF(top_k_micros, CF_INT),
    CF(balance_bias_rate, CF_FLOAT),
    CF(routing_replay, CF_BOOL),
    CF(diffusion_layer, CF_INT),
    CF(diffusion_bits, CF_INT),
    CF(diffusion_width, CF_INT),
    CF(diffusion_blocks, CF_INT),
    CF(diffusion_ffn, CF_INT),
    CF(diffusion_time_dim, CF_INT),
    CF(diffusion_steps, CF_INT),
    CF(diffusion_seed, CF_U64),
    CF(head_int8, CF_BOOL),
    CF(seed, CF_U64),
};
#undef CF

static char *config_to_json(const model_config_t *c) {
    json_t *o = json_object();
    json_t *tok = json_object();
    if (!o || !tok)
        goto fail;
    for (size_t i = 0; i < Q_ARRAY_LEN(cfields); i++) {
        const void *p = (const char *)c + cfields[i].offset;
        json_t *v = NULL;
        char buf[32];
        switch (cfields[i].type) {
        case CF_INT: v = json_integer(*(const int *)p); break;
        case CF_FLOAT: v = json_real((double)*(const float *)p); break;
        case CF_BOOL: v = json_boolean(*(const bool *)p); break;
        case CF_U64: /* a string: JSON integers are only exact to 2^53 in most readers */
            snprintf(buf, sizeof buf, "%llu", (unsigned long long)*(const uint64_t *)p);
            v = json_string(buf);
            break;
        }
        if (!v || json_object_set_new(o, cfields[i].key, v) < 0)
            goto fail;
    }
    if (json_object_set_new(tok, "kind",
                            json_string(model_tokenizer_kind_name(c->tokenizer.kind))) ||
        json_object_set_new(tok, "vocab", json_string(c->tokenizer.vocab)) ||
        json_object_set_new(tok, "merges", json_string(c->tokenizer.merges)) ||
        json_object_set_new(tok, "json", json_string(c->tokenizer.json)) ||
        json_object_set_new(o, "tokenizer", tok) < 0) {
        tok = NULL;
        goto fail;
    }
    char *s = json_dumps(o, JSON_COMPACT | JSON_SORT_KEYS);
    json_decref(o);
    return s;
fail:
    json_decref(tok);
    json_decref(o);
    return NULL;
}

static int tok_path(char *dst, const json_t *tok, const char *key, const char *what, qerr_t *err) {
    const json_t *v = json_object_get(tok, key);
    if (!json_is_string(v) || json_string_length(v) >= MODEL_PATH_MAX)
        return qerr_set(err, QERR_INVALID,
                        "%s: __metadata__ 'config': tokenizer.%s must be a string shorter than "
                        "%d bytes",
                        what, key, MODEL_PATH_MAX);
    memcpy(dst, json_string_value(v), json_string_length(v) + 1);
    return 0;
}

static int config_from_json(model_config_t *c, const char *text, const char *what, qerr_t *err) {
    json_error_t je;
    json_t *o = json_loads(text, JSON_REJECT_DUPLICATES, &je);
    if (!json_is_object(o)) {
        json_decref(o);
        return qerr_set(err, QERR_PARSE, "%s: __metadata__ 'config' is not a JSON object: %s", what,
                        je.text);
    }
    memset(c, 0, sizeof *c);
    int rc = -1;
    for (size_t i = 0; i < Q_ARRAY_LEN(cfields); i++) {
        void *p = (char *)c + cfields[i].offset;
        const json_t *v = json_object_get(o, cfields[i].key);
        const char *k = cfields[i].key;
        switch (cfields[i].type) {
        case CF_INT:
            if (!json_is_integer(v) || json_integer_value(v) < INT32_MIN ||
                json_integer_value(v) > INT32_MAX) {
                qerr_set(err, QERR_INVALID, "%s: __metadata__ 'config': '%s' must be an integer",
                         what, k);
                goto out;
            }
            *(int *)p = (int)json_integer_value(v);
            break;
        case CF_FLOAT:
            if (!json_is_number(v)) {
                qerr_set(err, QERR_INVALID, "%s: __metadata__ 'config': '%s' must be a number",
                         what, k);
                goto out;
            }
            *(float *)p = (float)json_number_value(v);
            break;
        case CF_BOOL:
            if (!json_is_boolean(v)) {
                qerr_set(err, QERR_INVALID, "%s: __metadata__ 'config': '%s' must be a boolean",
                         what, k);
                goto out;
            }
            *(bool *)p = json_is_true(v);
            break;
        case CF_U64: {
            const char *s = json_string_value(v);
            char *end = NULL;
            errno = 0;
            unsigned long long u = s ? strtoull(s, &end, 10) : 0;
            if (!s || errno || end == s || *end || s[0] == '-') {
                qerr_set(err, QERR_INVALID,
                         "%s: __metadata__ 'config': '%s' must be an unsigned integer in a "
                         "string",
                         what, k);
                goto out;
            }
            *(uint64_t *)p = (uint64_t)u;
            break;
        }
        }
    }
    const json_t *tok = json_object_get(o, "tokenizer");
    const char *kind = json_string_value(json_object_get(tok, "kind"));
    if (!json_is_object(tok) || !kind || model_tokenizer_kind_parse(kind, &c->tokenizer.kind) < 0) {
        qerr_set(err, QERR_INVALID,
                 "%s: __metadata__ 'config': tokenizer.kind must be \"byte\" or \"gpt2\"", what);
        goto out;
    }
    if (tok_path(c->tokenizer.vocab, tok, "vocab", what, err) ||
        tok_path(c->tokenizer.merges, tok, "merges", what, err) ||
        tok_path(c->tokenizer.json, tok, "json", what, err))
        goto out;
    if (json_object_size(o) != Q_ARRAY_LEN(cfields) + 1) {
        const char *key;
        json_t *val;
        json_object_foreach(o, key, val) {
            int known = strcmp(key, "tokenizer") == 0;
            for (size_t i = 0; i < Q_ARRAY_LEN(cfields) && !known; i++)
                known = strcmp(key, cfields[i].key) == 0;
            if (!known) {
                qerr_set(err, QERR_INVALID, "%s: __metadata__ 'config': unknown key '%s'", what,
                         key);
                goto out;
            }
        }
    }
    rc = 0;
out:
    json_decref(o);
    if (rc == 0 && model_config_validate(c, err) < 0)
        return qerr_wrap(err, "%s: __metadata__ 'config'", what);
    return rc;
}

/* ---- build ---- */

/* Produces the packed bytes of one tensor piece by piece (safetensors_fill_fn). */
typedef struct {
    const model_tensor_t *t;
    const real *src; /* [rows, cols] latent weights */
    qtype_t qt;
    size_t rows, cols, row_bytes;
    unsigned char *row; /* [row_bytes] */
} fill_ctx_t;

static int fill_tensor(void *ctx, uint64_t offset, void *buf, size_t len, qerr_t *err) {
    fill_ctx_t *f = ctx;
    unsigned char *out = buf;
    while (len > 0) {
        const size_t r = (size_t)(offset / f->row_bytes), in_row = (size_t)(offset % f->row_bytes);
        const float *w = f->src + r * f->cols;
        for (size_t i = 0; i < f->cols; i++)
            if (!isfinite(w[i]))
                return qerr_set(err, QERR_INVALID,
                                "tensor '%s': weight %zu of row %zu is not finite", f->t->name, i,
                                r);
        switch (f->qt) {
        case QTYPE_F32: memcpy(f->row, w, f->cols * sizeof(float)); break;
        case QTYPE_F16: fp16_from_float_n((uint16_t *)(void *)f->row, w, f->cols); break;
        default: qtype_traits(f->qt)->quantize_row_ref(w, f->row, f->cols); break;
        }
        const size_t n = f->row_bytes - in_row < len ? f->row_bytes - in_row : len;
        memcpy(out, f->row + in_row, n);
        out += n;
        offset += n;
        len -= n;
    }
    return 0;
}

static void release_aligned(void *ctx, const void *data, size_t len) {
    (void)ctx;
    (void)len;
    q_aligned_free((void *)(uintptr_t)data);
}

qpolicy_t *qpolicy_build(const model_t *m, uint64_t version, qerr_t *err) {
    Q_ASSERT(sizeof(real) == sizeof(float)); /* snapshots come from the float build */
    const size_t nt = model_tensor_count(m);
    safetensors_writer_t *w = safetensors_writer_new();
    fill_ctx_t *fc = calloc(nt, sizeof *fc);
    json_t *tmeta = json_object();
    char *cfg_text = config_to_json(model_config(m));
    char *tm_text = NULL;
    void *bytes = NULL;
    size_t len = 0;
    qpolicy_t *q = NULL;
    if (!w || !fc || !tmeta || !cfg_text) {
        qerr_set(err, QERR_NOMEM, "qpolicy: out of memory");
        goto out;
    }
    for (size_t i = 0; i < nt; i++) {
        const model_tensor_t *t = model_tensor(m, i);
        if (!t->in_rollout)
            continue;
        fill_ctx_t *f = &fc[i];
        f->t = t;
        f->src = model_params_const(m) + t->offset;
        f->qt = qpolicy_qtype_of(t->rollout);
        f->cols = (size_t)t->shape[t->ndim - 1];
        f->rows = t->numel / f->cols;
        f->row_bytes = qtype_row_bytes(f->qt, f->cols);
        f->row = malloc(f->row_bytes);
        json_t *shape = json_array();
        json_t *desc = json_pack("{s:s, s:o}", "qtype", qtype_name(f->qt), "shape", shape);
        if (!f->row || !desc || json_object_set_new(tmeta, t->name, desc) < 0) {
            qerr_set(err, QERR_NOMEM, "qpolicy: out of memory");
            goto out;
        }
        uint64_t sshape[MODEL_MAX_NDIM];
        for (int d = 0; d < t->ndim; d++) {
            json_array_append_new(shape, json_integer((json_int_t)t->shape[d]));
            sshape[d] = (uint64_t)t->shape[d];
        }
        int rc;
        if (f->qt == QTYPE_F32 || f->qt == QTYPE_F16)
            rc = safetensors_writer_add_fill(w, t->name,
                                             f->qt == QTYPE_F32 ? SAFETENSORS_F32 : SAFETENSORS_F16,
                                             (size_t)t->ndim, sshape, fill_tensor, f, err);
        else
            rc = safetensors_writer_add_fill(w, t->name, SAFETENSORS_U8, 2,
                                             (const uint64_t[]){f->rows, f->row_bytes}, fill_tensor,
                                             f, err);
        if (rc < 0)
            goto out;
    }
    tm_text = json_dumps(tmeta, JSON_COMPACT | JSON_SORT_KEYS);
    char vbuf[32];
    snprintf(vbuf, sizeof vbuf, "%llu", (unsigned long long)version);
    if (!tm_text) {
        qerr_set(err, QERR_NOMEM, "qpolicy: out of memory");
        goto out;
    }
    if (safetensors_writer_set_metadata(w, "format", QPOLICY_FORMAT, err) ||
        safetensors_writer_set_metadata(w, "version", vbuf, err) ||
        safetensors_writer_set_metadata(w, "config", cfg_text, err) ||
        safetensors_writer_set_metadata(w, "tensors", tm_text, err) ||
        safetensors_writer_serialize(w, &bytes, &len, err))
        goto out;
    q = qpolicy_parse(bytes, len, "new snapshot", release_aligned, NULL, err);
    if (!q)
        q_aligned_free(bytes);
out:
    if (fc)
        for (size_t i = 0; i < nt; i++)
            free(fc[i].row);
    free(fc);
    free(cfg_text);
    free(tm_text);
    json_decref(tmeta);
    safetensors_writer_destroy(&w);
    return q;
}

/* ---- parse ---- */

static int parse_u64(const char *s, uint64_t *out) {
    char *end = NULL;
    errno = 0;
    unsigned long long v = s ? strtoull(s, &end, 10) : 0;
    if (!s || errno || end == s || *end || s[0] == '-')
        return -1;
    *out = (uint64_t)v;
    return 0;
}

/* Every scale of a packed tensor must be finite (codes need no check: any byte is in range). */
static int check_scales(const qpolicy_tensor_t *t, const char *what, qerr_t *err) {
    const unsigned char *p = t->data;
    for (size_t r = 0; r < t->rows; r++) {
        const unsigned char *row = p + r * t->row_bytes;
        switch (t->qtype) {
        case QTYPE_TERNARY:
        case QTYPE_INT8:
            if (!isfinite(qtype_row_scale(t->qtype, row, t->cols)))
                return qerr_set(err, QERR_INVALID,
                                "%s: tensor '%s': row %zu has a non-finite scale", what, t->name,
                                r);
            break;
        case QTYPE_INT4: {
            const size_t nb = qtype_row_padded(QTYPE_INT4, t->cols) / QTYPE_INT4_BLOCK;
            const unsigned char *sc = row + nb * 64;
            for (size_t g = 0; g < 4 * nb; g++) {
                uint16_t h;
                memcpy(&h, sc + 2 * g, 2);
                if ((h & 0x7C00u) == 0x7C00u)
                    return qerr_set(err, QERR_INVALID,
                                    "%s: tensor '%s': row %zu group %zu has a non-finite scale",
                                    what, t->name, r, g);
            }
            break;
        }
        case QTYPE_F32: {
            const float *f = (const float *)(const void *)row;
            for (size_t i = 0; i < t->cols; i++)
                if (!isfinite(f[i]))
                    return qerr_set(err, QERR_INVALID,
                                    "%s: tensor '%s': value %zu of row %zu is not finite", what,
                                    t->name, i, r);
            break;
        }
        case QTYPE_F16: {
            for (size_t i = 0; i < t->cols; i++) {
                uint16_t h;
                memcpy(&h, row + 2 * i, 2);
                if ((h & 0x7C00u) == 0x7C00u)
                    return qerr_set(err, QERR_INVALID,
                                    "%s: tensor '%s': value %zu of row %zu is not finite", what,
                                    t->name, i, r);
            }
            break;
        }
        case QTYPE_COUNT: Q_ASSERT(!"bad qtype");
        }
    }
    return 0;
}

/* Checks one expected tensor against the file and fills *out. */
static int check_tensor(qpolicy_tensor_t *out, const model_tensor_t *mt,
                        const safetensors_reader_t *r, const json_t *tmeta,
                        const unsigned char *base, const char *what, qerr_t *err) {
    memset(out, 0, sizeof *out);
    snprintf(out->name, sizeof out->name, "%s", mt->name);
    out->qtype = qpolicy_qtype_of(mt->rollout);
    out->ndim = mt->ndim;
    for (int d = 0; d < mt->ndim; d++)
        out->shape[d] = mt->shape[d];
    out->cols = (size_t)mt->shape[mt->ndim - 1];
    out->rows = mt->numel / out->cols;
    out->row_bytes = qtype_row_bytes(out->qtype, out->cols);
    out->nbytes = (uint64_t)out->rows * out->row_bytes;

    const json_t *desc = json_object_get(tmeta, mt->name);
    const char *qn = json_string_value(json_object_get(desc, "qtype"));
    const json_t *shape = json_object_get(desc, "shape");
    if (!desc || !qn || !json_is_array(shape))
        return qerr_set(err, QERR_INVALID,
                        "%s: tensor '%s': missing from __metadata__ 'tensors' (or without qtype "
                        "and shape)",
                        what, mt->name);
    if (qtype_from_name(qn) != out->qtype)
        return qerr_set(err, QERR_INVALID, "%s: tensor '%s': qtype '%s', expected '%s'", what,
                        mt->name, qn, qtype_name(out->qtype));
    int shape_ok = json_array_size(shape) == (size_t)mt->ndim;
    for (int d = 0; shape_ok && d < mt->ndim; d++)
        shape_ok = json_integer_value(json_array_get(shape, (size_t)d)) == mt->shape[d];
    if (!shape_ok)
        return qerr_set(err, QERR_INVALID,
                        "%s: tensor '%s': shape in __metadata__ 'tensors' does not match the "
                        "config",
                        what, mt->name);

    const safetensors_tensor_t *st;
    if (out->qtype == QTYPE_F32 || out->qtype == QTYPE_F16) {
        uint64_t sshape[MODEL_MAX_NDIM];
        for (int d = 0; d < mt->ndim; d++)
            sshape[d] = (uint64_t)mt->shape[d];
        st = safetensors_reader_expect(r, mt->name,
                                       out->qtype == QTYPE_F32 ? SAFETENSORS_F32 : SAFETENSORS_F16,
                                       (size_t)mt->ndim, sshape, err);
    } else {
        st = safetensors_reader_expect(r, mt->name, SAFETENSORS_U8, 2,
                                       (const uint64_t[]){out->rows, out->row_bytes}, err);
    }
    if (!st)
        return -1;
    out->data = st->nbytes ? st->data : base;
    out->offset = (uint64_t)((const unsigned char *)out->data - base);
    return check_scales(out, what, err);
}

qpolicy_t *qpolicy_parse(const void *data, size_t len, const char *what,
                         void (*release)(void *release_ctx, const void *data, size_t len),
                         void *release_ctx, qerr_t *err) {
    safetensors_reader_t *r = safetensors_reader_new_memory(data, len, what, err);
    if (!r)
        return NULL;
    qpolicy_t *q = calloc(1, sizeof *q);
    model_t *table = NULL;
    json_t *tmeta = NULL;
    if (!q) {
        qerr_set(err, QERR_NOMEM, "%s: out of memory", what);
        goto fail;
    }
    const char *fmt = safetensors_reader_metadata(r, "format");
    if (!fmt || strcmp(fmt, QPOLICY_FORMAT) != 0) {
        qerr_set(err, QERR_VERSION,
                 "%s: not a Quillan quantized policy (__metadata__ format '%s', expected '%s')",
                 what, fmt ? fmt : "(none)", QPOLICY_FORMAT);
        goto fail;
    }
    if (parse_u64(safetensors_reader_metadata(r, "version"), &q->version) < 0) {
        qerr_set(err, QERR_INVALID, "%s: __metadata__ 'version' must be an unsigned integer", what);
        goto fail;
    }
    const char *ctext = safetensors_reader_metadata(r, "config");
    if (!ctext) {
        qerr_set(err, QERR_INVALID, "%s: __metadata__ lacks 'config'", what);
        goto fail;
    }
    if (config_from_json(&q->cfg, ctext, what, err) < 0)
        goto fail;
    const char *ttext = safetensors_reader_metadata(r, "tensors");
    json_error_t je;
    tmeta = ttext ? json_loads(ttext, JSON_REJECT_DUPLICATES, &je) : NULL;
    if (!json_is_object(tmeta)) {
        qerr_set(err, QERR_INVALID, "%s: __metadata__ 'tensors' missing or not a JSON object",
                 what);
        goto fail;
    }
    table = model_new_table(&q->cfg, err);
    if (!table)
        goto fail;
    q->tensors = calloc(model_tensor_count(table), sizeof *q->tensors);
    if (!q->tensors) {
        qerr_set(err, QERR_NOMEM, "%s: out of memory", what);
        goto fail;
    }
    for (size_t i = 0; i < model_tensor_count(table); i++) {
        const model_tensor_t *mt = model_tensor(table, i);
        if (!mt->in_rollout)
            continue;
        if (check_tensor(&q->tensors[q->n_tensors], mt, r, tmeta, data, what, err) < 0)
            goto fail;
        q->n_tensors++;
    }
    if (safetensors_reader_count(r) != q->n_tensors) {
        for (size_t i = 0; i < safetensors_reader_count(r); i++) {
            const char *name = safetensors_reader_at(r, i)->name;
            if (!qpolicy_tensor_find(q, name)) {
                qerr_set(err, QERR_INVALID, "%s: tensor '%s' is not part of this model", what,
                         name);
                goto fail;
            }
        }
    }
    q->bytes = data;
    q->len = len;
    q->release = release;
    q->release_ctx = release_ctx;
    json_decref(tmeta);
    model_destroy(&table);
    safetensors_reader_destroy(&r);
    return q;
fail:
    json_decref(tmeta);
    model_destroy(&table);
    safetensors_reader_destroy(&r);
    if (q)
        free(q->tensors);
    free(q);
    return NULL;
}

static void release_map(void *ctx, const void *data, size_t len) {
    (void)ctx;
    munmap((void *)(uintptr_t)data, len);
}

qpolicy_t *qpolicy_open(const char *path, qerr_t *err) {
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        qerr_set(err, errno == ENOENT ? QERR_NOTFOUND : QERR_IO, "%s: cannot open: %s", path,
                 strerror(errno));
        return NULL;
    }
    struct stat st;
    if (fstat(fd, &st) < 0 || !S_ISREG(st.st_mode)) {
        qerr_set(err, QERR_IO, "%s: not a regular file", path);
        close(fd);
        return NULL;
    }
    if (st.st_size < 8) {
        close(fd);
        qerr_set(err, QERR_PARSE, "%s: file is %lld bytes, too short for a quantized policy", path,
                 (long long)st.st_size);
        return NULL;
    }
    void *map = mmap(NULL, (size_t)st.st_size, PROT_READ, MAP_PRIVATE, fd, 0);
    close(fd);
    if (map == MAP_FAILED) {
        qerr_set(err, QERR_IO, "%s: cannot map: %s", path, strerror(errno));
        return NULL;
    }
    qpolicy_t *q = qpolicy_parse(map, (size_t)st.st_size, path, release_map, NULL, err);
    if (!q)
        munmap(map, (size_t)st.st_size);
    return q;
}

int qpolicy_write(const qpolicy_t *q, const char *path, qerr_t *err) {
    return q_file_write_atomic(path, q->bytes, q->len, err);
}

void qpolicy_destroy(qpolicy_t **pq) {
    if (!pq || !*pq)
        return;
    qpolicy_t *q = *pq;
    if (q->release)
        q->release(q->release_ctx, q->bytes, q->len);
    free(q->tensors);
    free(q);
    *pq = NULL;
}

const void *qpolicy_bytes(const qpolicy_t *q, size_t *len) {
    if (len)
        *len = q->len;
    return q->bytes;
}

uint64_t qpolicy_version(const qpolicy_t *q) {
    return q->version;
}

const model_config_t *qpolicy_config(const qpolicy_t *q) {
    return &q->cfg;
}

size_t qpolicy_tensor_count(const qpolicy_t *q) {
    return q->n_tensors;
}

const qpolicy_tensor_t *qpolicy_tensor_at(const qpolicy_t *q, size_t i) {
    Q_ASSERT(i < q->n_tensors);
    return &q->tensors[i];
}

const qpolicy_tensor_t *qpolicy_tensor_find(const qpolicy_t *q, const char *name) {
    for (size_t i = 0; i < q->n_tensors; i++)
        if (strcmp(q->tensors[i].name, name) == 0)
            return &q->tensors[i];
    return NULL;
}
