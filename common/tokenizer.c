/* Tokenizer front: the byte-level kind, the id and text buffers, decoding (shared by both kinds:
 * every kind fills the same id -> bytes table) and dispatch of encoding. */
#include "tokenizer.h"
#include "tokenizer_bpe.h"

#include <stdlib.h>
#include <string.h>

static const char *const byte_special_text[3] = {"<|bos|>", "<|eos|>", "<|pad|>"};

void tokenizer_ids_init(tokenizer_ids_t *ids) {
    memset(ids, 0, sizeof *ids);
}

void tokenizer_ids_free(tokenizer_ids_t *ids) {
    free(ids->data);
    memset(ids, 0, sizeof *ids);
}

void tokenizer_text_init(tokenizer_text_t *text) {
    memset(text, 0, sizeof *text);
}

void tokenizer_text_free(tokenizer_text_t *text) {
    free(text->data);
    memset(text, 0, sizeof *text);
}

/* Grows a buffer of elem-sized items to hold at least need (+1 spare for a text NUL). */
static int grow(void **data, size_t *cap, size_t need, size_t elem, qerr_t *err) {
    if (need <= *cap)
        return 0;
    size_t ncap = *cap ? *cap : 64;
    while (ncap < need) {
        if (ncap > SIZE_MAX / 2)
            return qerr_set(err, QERR_NOMEM, "tokenizer: buffer of %zu items is too large", need);
        ncap *= 2;
    }
    if (ncap > SIZE_MAX / elem)
        return qerr_set(err, QERR_NOMEM, "tokenizer: buffer of %zu items is too large", need);
    void *p = realloc(*data, ncap * elem);
    if (!p)
        return qerr_set(err, QERR_NOMEM, "tokenizer: out of memory growing a buffer to %zu items",
                        ncap);
    *data = p;
    *cap = ncap;
    return 0;
}

int tokenizer_sink_push(tokenizer_sink_t *sink, const int32_t *ids, size_t count, qerr_t *err) {
    if (sink->grow) {
        tokenizer_ids_t *g = sink->grow;
        void *data = g->data;
        if (count > SIZE_MAX - g->len)
            return qerr_set(err, QERR_NOMEM, "tokenizer: id count overflows");
        if (grow(&data, &g->cap, g->len + count, sizeof(int32_t), err) < 0)
            return -1;
        g->data = data;
        memcpy(g->data + g->len, ids, count * sizeof(int32_t));
        g->len += count;
    } else if (sink->n < sink->cap) {
        size_t room = sink->cap - sink->n;
        memcpy(sink->buf + sink->n, ids, (count < room ? count : room) * sizeof(int32_t));
    }
    sink->n += count;
    return 0;
}

/* Fills the id -> bytes table of the byte-level kind: 256 single bytes, then the specials. */
tokenizer_t *tokenizer_new_byte(void) {
    tokenizer_t *t = calloc(1, sizeof *t);
    if (!t)
        return NULL;
    t->kind = TOKENIZER_KIND_BYTE;
    t->vocab_size = TOKENIZER_BYTE_VOCAB;
    t->bos = TOKENIZER_BYTE_BOS;
    t->eos = TOKENIZER_BYTE_EOS;
    t->pad = TOKENIZER_BYTE_PAD;
    size_t blob_len = 256;
    for (int i = 0; i < 3; i++)
        blob_len += strlen(byte_special_text[i]);
    t->blob = malloc(blob_len);
    t->off = malloc((TOKENIZER_BYTE_VOCAB + 1) * sizeof *t->off);
    t->flags = malloc(TOKENIZER_BYTE_VOCAB);
    if (!t->blob || !t->off || !t->flags) {
        tokenizer_destroy(&t);
        return NULL;
    }
    size_t pos = 0;
    for (int b = 0; b < 256; b++) {
        t->off[b] = pos;
        t->blob[pos++] = (char)b;
        t->flags[b] = TOKENIZER_TOKEN_PRESENT;
    }
    for (int i = 0; i < 3; i++) {
        size_t n = strlen(byte_special_text[i]);
        t->off[256 + i] = pos;
        memcpy(t->blob + pos, byte_special_text[i], n);
        pos += n;
        t->flags[256 + i] = TOKENIZER_TOKEN_PRESENT | TOKENIZER_TOKEN_SPECIAL;
    }
    t->off[TOKENIZER_BYTE_VOCAB] = pos;
    return t;
}

tokenizer_t *tokenizer_new_for_config(const model_tokenizer_config_t *cfg, qerr_t *err) {
    if (cfg->kind == MODEL_TOKENIZER_BYTE) {
        tokenizer_t *t = tokenizer_new_byte();
        if (!t)
            qerr_set(err, QERR_NOMEM, "tokenizer: out of memory");
        return t;
    }
    if (cfg->json[0])
        return tokenizer_new_hf_json(cfg->json, err);
    if (cfg->vocab[0] && cfg->merges[0])
        return tokenizer_new_bpe_files(cfg->vocab, cfg->merges, err);
    qerr_set(err, QERR_NOTFOUND,
             "model.tokenizer: kind gpt2 names no tokenizer files (it needs json, or vocab + "
             "merges)");
    return NULL;
}

void tokenizer_destroy(tokenizer_t **tp) {
    if (!tp || !*tp)
        return;
    tokenizer_t *t = *tp;
    tokenizer_bpe_free(t->bpe);
    free(t->blob);
    free(t->off);
    free(t->flags);
    free(t);
    *tp = NULL;
}

tokenizer_kind_t tokenizer_kind(const tokenizer_t *t) {
    return t->kind;
}

const char *tokenizer_kind_name(tokenizer_kind_t kind) {
    switch (kind) {
    case TOKENIZER_KIND_BYTE: return "byte";
    case TOKENIZER_KIND_GPT2_BPE: return "gpt2-bpe";
    case TOKENIZER_KIND_COUNT: break;
    }
    return "unknown";
}

int32_t tokenizer_vocab_size(const tokenizer_t *t) {
    return t->vocab_size;
}
int32_t tokenizer_bos_id(const tokenizer_t *t) {
    return t->bos;
}
int32_t tokenizer_eos_id(const tokenizer_t *t) {
    return t->eos;
}
int32_t tokenizer_pad_id(const tokenizer_t *t) {
    return t->pad;
}

static int id_defined(const tokenizer_t *t, int32_t id) {
    return id >= 0 && id < t->vocab_size && (t->flags[id] & TOKENIZER_TOKEN_PRESENT);
}

int tokenizer_is_special(const tokenizer_t *t, int32_t id) {
    return id_defined(t, id) && (t->flags[id] & TOKENIZER_TOKEN_SPECIAL) != 0;
}

const char *tokenizer_token_bytes(const tokenizer_t *t, int32_t id, size_t *len) {
    if (!id_defined(t, id))
        return NULL;
    *len = t->off[id + 1] - t->off[id];
    return t->blob + t->off[id];
}

static int encode_sink(const tokenizer_t *t, const void *text, size_t len, tokenizer_sink_t *sink,
                       qerr_t *err) {
    Q_ASSERT(text || len == 0);
    if (t->kind == TOKENIZER_KIND_GPT2_BPE)
        return tokenizer_bpe_encode(t, text, len, sink, err);
    /* Byte-level: each byte is its own id; pushed in blocks to keep the sink calls few. */
    const uint8_t *p = text;
    int32_t block[256];
    for (size_t i = 0; i < len;) {
        size_t n = len - i < 256 ? len - i : 256;
        for (size_t k = 0; k < n; k++)
            block[k] = p[i + k];
        if (tokenizer_sink_push(sink, block, n, err) < 0)
            return -1;
        i += n;
    }
    return 0;
}

ptrdiff_t tokenizer_encode(const tokenizer_t *t, const void *text, size_t len, int32_t *ids,
                           size_t cap, qerr_t *err) {
    Q_ASSERT(ids || cap == 0);
    tokenizer_sink_t sink = {.buf = ids, .cap = cap};
    if (encode_sink(t, text, len, &sink, err) < 0)
        return -1;
    return (ptrdiff_t)sink.n;
}

int tokenizer_encode_append(const tokenizer_t *t, const void *text, size_t len,
                            tokenizer_ids_t *out, qerr_t *err) {
    size_t start = out->len;
    tokenizer_sink_t sink = {.grow = out};
    if (encode_sink(t, text, len, &sink, err) < 0) {
        out->len = start;
        return -1;
    }
    return 0;
}

/* Checks every id first, so a failed decode writes nothing; then sums the byte count. */
static ptrdiff_t decode_size(const tokenizer_t *t, const int32_t *ids, size_t n, unsigned flags,
                             qerr_t *err) {
    size_t total = 0;
    for (size_t i = 0; i < n; i++) {
        int32_t id = ids[i];
        if (!id_defined(t, id))
            return qerr_set(err, QERR_RANGE,
                            "tokenizer: id %d at position %zu is not a token of this %s "
                            "tokenizer (vocab size %d)",
                            (int)id, i, tokenizer_kind_name(t->kind), (int)t->vocab_size);
        if ((flags & TOKENIZER_DECODE_SKIP_SPECIAL) && (t->flags[id] & TOKENIZER_TOKEN_SPECIAL))
            continue;
        total += t->off[id + 1] - t->off[id];
    }
    if (total > PTRDIFF_MAX)
        return qerr_set(err, QERR_NOMEM, "tokenizer: decoded text is too large");
    return (ptrdiff_t)total;
}

/* Writes the decoding of ids into out, at most cap bytes. */
static void decode_into(const tokenizer_t *t, const int32_t *ids, size_t n, unsigned flags,
                        char *out, size_t cap) {
    size_t pos = 0;
    for (size_t i = 0; i < n && pos < cap; i++) {
        int32_t id = ids[i];
        if ((flags & TOKENIZER_DECODE_SKIP_SPECIAL) && (t->flags[id] & TOKENIZER_TOKEN_SPECIAL))
            continue;
        size_t len = t->off[id + 1] - t->off[id];
        size_t k = len < cap - pos ? len : cap - pos;
        memcpy(out + pos, t->blob + t->off[id], k);
        pos += k;
    }
}

ptrdiff_t tokenizer_decode(const tokenizer_t *t, const int32_t *ids, size_t n, unsigned flags,
                           char *out, size_t cap, qerr_t *err) {
    Q_ASSERT(ids || n == 0);
    Q_ASSERT(out || cap == 0);
    ptrdiff_t total = decode_size(t, ids, n, flags, err);
    if (total < 0)
        return -1;
    decode_into(t, ids, n, flags, out, cap);
    return total;
}

int tokenizer_decode_append(const tokenizer_t *t, const int32_t *ids, size_t n, unsigned flags,
                            tokenizer_text_t *out, qerr_t *err) {
    Q_ASSERT(ids || n == 0);
    ptrdiff_t total = decode_size(t, ids, n, flags, err);
    if (total < 0)
        return -1;
    void *data = out->data;
    if ((size_t)total > SIZE_MAX - out->len - 1)
        return qerr_set(err, QERR_NOMEM, "tokenizer: decoded text is too large");
    if (grow(&data, &out->cap, out->len + (size_t)total + 1, 1, err) < 0)
        return -1;
    out->data = data;
    decode_into(t, ids, n, flags, out->data + out->len, (size_t)total);
    out->len += (size_t)total;
    out->data[out->len] = '\0';
    return 0;
}
