/* GPT-2 byte-level BPE: loading (vocab.json + merges.txt, or a Hugging Face tokenizer.json),
 * validation, and encoding.
 *
 * Encoding follows OpenAI's encoder.py: the pre-tokenizer regex splits the text into pieces;
 * each piece's bytes map to the 256 byte tokens, then the lowest-ranked adjacent pair is merged
 * (the leftmost one on ties) until no pair has a merge. PCRE2 runs the regex with UTF, UCP (so
 * \s, \p{L}, \p{N} follow Unicode) and MATCH_INVALID_UTF: bytes that are not valid UTF-8 never
 * match, and each becomes a piece of its own, so any byte string encodes and round-trips. The
 * JIT is used when PCRE2 has one; the interpreter gives the same matches otherwise. */
#include "tokenizer_bpe.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <errno.h>
#include <jansson.h>
#include <pcre2.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char GPT2_PATTERN[] =
    "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+";
static const char GPT2_EOT[] = "<|endoftext|>";

/* GPT-2's bytes_to_unicode maps bytes to code points below 0x144. */
#define BYTE_ALPHABET_LIMIT 0x144

/* The word cache: direct-mapped, so its memory is fixed (~2.6 MB); pieces longer than the key
 * limit (rare in text) are merged every time. */
#define BPE_CACHE_SLOTS 16384
#define BPE_CACHE_KEY_MAX 32

typedef struct {
    uint64_t key; /* (left id << 32) | right id; MERGE_EMPTY when unused */
    int32_t rank;
    int32_t id; /* the merged token */
} merge_slot_t;

#define MERGE_EMPTY UINT64_MAX

typedef struct {
    uint8_t klen; /* 0: empty slot */
    uint8_t nids;
    char key[BPE_CACHE_KEY_MAX];
    int32_t ids[BPE_CACHE_KEY_MAX];
} cache_slot_t;

struct tokenizer_bpe {
    pcre2_code *re;
    int32_t byte_id[256]; /* the token of each single byte */
    merge_slot_t *merges;
    uint64_t merge_mask; /* table size - 1 (a power of two) */
    cache_slot_t *cache; /* [BPE_CACHE_SLOTS] */
    pthread_mutex_t cache_lock;
};

/* ---- GPT-2 byte alphabet ------------------------------------------------------------------ */

/* bytes_to_unicode: printable Latin-1 bytes map to themselves, the other 68 bytes to
 * U+0100.. in byte order. */
static void byte_alphabet(uint32_t cp_of_byte[256], int16_t byte_of_cp[BYTE_ALPHABET_LIMIT]) {
    int extra = 0;
    for (int i = 0; i < BYTE_ALPHABET_LIMIT; i++)
        byte_of_cp[i] = -1;
    for (int b = 0; b < 256; b++) {
        int printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || b >= 0xAE;
        cp_of_byte[b] = printable ? (uint32_t)b : 256u + (uint32_t)extra++;
        byte_of_cp[cp_of_byte[b]] = (int16_t)b;
    }
}

static size_t utf8_put(char *out, uint32_t cp) {
    if (cp < 0x80) {
        out[0] = (char)cp;
        return 1;
    }
    out[0] = (char)(0xC0 | (cp >> 6));
    out[1] = (char)(0x80 | (cp & 0x3F));
    return 2;
}

/* Maps token text in the byte alphabet back to raw bytes (out has room for strlen(s)). Returns
 * the byte count, or -1 with *bad set to the first code point outside the alphabet. Vocab
 * strings come from jansson, which has already checked that they are valid UTF-8. */
static ptrdiff_t alphabet_decode(const char *s, const int16_t *byte_of_cp, char *out,
                                 uint32_t *bad) {
    const unsigned char *p = (const unsigned char *)s;
    size_t n = 0;
    while (*p) {
        uint32_t cp;
        int len;
        if (p[0] < 0x80) {
            cp = p[0], len = 1;
        } else if ((p[0] & 0xE0) == 0xC0) {
            cp = ((uint32_t)(p[0] & 0x1F) << 6) | (p[1] & 0x3F), len = 2;
        } else if ((p[0] & 0xF0) == 0xE0) {
            cp = ((uint32_t)(p[0] & 0x0F) << 12) | ((uint32_t)(p[1] & 0x3F) << 6) | (p[2] & 0x3F);
            len = 3;
        } else {
            cp = ((uint32_t)(p[0] & 0x07) << 18) | ((uint32_t)(p[1] & 0x3F) << 12) |
                 ((uint32_t)(p[2] & 0x3F) << 6) | (p[3] & 0x3F);
            len = 4;
        }
        if (cp >= BYTE_ALPHABET_LIMIT || byte_of_cp[cp] < 0) {
            *bad = cp;
            return -1;
        }
        out[n++] = (char)byte_of_cp[cp];
        p += len;
    }
    return (ptrdiff_t)n;
}

/* ---- merge table --------------------------------------------------------------------------- */

static uint64_t merge_key(int32_t a, int32_t b) {
    return ((uint64_t)(uint32_t)a << 32) | (uint32_t)b;
}

/* murmur3's 64-bit finaliser: every key bit reaches the low bits the table uses. */
static uint64_t merge_hash(uint64_t key) {
    key ^= key >> 33;
    key *= 0xFF51AFD7ED558CCDULL;
    key ^= key >> 33;
    key *= 0xC4CEB9FE1A85EC53ULL;
    return key ^ (key >> 33);
}

static const merge_slot_t *merge_find(const tokenizer_bpe_t *m, int32_t a, int32_t b) {
    uint64_t key = merge_key(a, b);
    for (uint64_t i = merge_hash(key) & m->merge_mask;; i = (i + 1) & m->merge_mask) {
        const merge_slot_t *s = &m->merges[i];
        if (s->key == key)
            return s;
        if (s->key == MERGE_EMPTY)
            return NULL;
    }
}

static int merge_alloc(tokenizer_bpe_t *m, size_t n_merges, qerr_t *err) {
    size_t size = 16;
    while (size < 2 * n_merges + 1)
        size *= 2;
    m->merges = malloc(size * sizeof *m->merges);
    if (!m->merges)
        return qerr_set(err, QERR_NOMEM, "out of memory for %zu merges", n_merges);
    for (size_t i = 0; i < size; i++)
        m->merges[i].key = MERGE_EMPTY;
    m->merge_mask = size - 1;
    return 0;
}

/* ---- building a tokenizer ------------------------------------------------------------------ */

typedef struct {
    const char *path;  /* the file, for messages */
    const char *what;  /* "vocab.json" or "model.vocab": names the vocab in messages */
    json_t *vocab;     /* token -> id (borrowed) */
    int32_t size;      /* one more than the largest id */
    const char **text; /* [size]: token text, in the byte alphabet unless raw[id] */
    uint8_t *raw;      /* [size]: 1 for an added token, whose text is its bytes */
    uint8_t *flags;    /* [size]: TOKENIZER_TOKEN_* */
    tokenizer_bpe_t *bpe;
    uint32_t cp_of_byte[256];
    int16_t byte_of_cp[BYTE_ALPHABET_LIMIT];
    char *concat; /* scratch for merge results */
    size_t concat_cap;
} build_t;

static void build_free(build_t *b) {
    free(b->text);
    free(b->raw);
    free(b->flags);
    free(b->concat);
    tokenizer_bpe_free(b->bpe);
}

/* Reads an id: a JSON integer in [0, TOKENIZER_MAX_ID). */
static int id_read(const json_t *v, int32_t *id) {
    if (!json_is_integer(v))
        return -1;
    json_int_t x = json_integer_value(v);
    if (x < 0 || x >= TOKENIZER_MAX_ID)
        return -1;
    *id = (int32_t)x;
    return 0;
}

/* Largest id in the vocab object; -1 with err when an id is not an integer in range. */
static int vocab_max_id(const build_t *b, int32_t *max_id, qerr_t *err) {
    const char *key;
    json_t *v;
    *max_id = -1;
    json_object_foreach(b->vocab, key, v) {
        int32_t id;
        if (id_read(v, &id) < 0)
            return qerr_set(err, QERR_RANGE,
                            "%s: %s: token \"%s\" has id %s; ids are integers in [0, %d)", b->path,
                            b->what, key, json_is_integer(v) ? "out of range" : "not an integer",
                            (int)TOKENIZER_MAX_ID);
        if (id > *max_id)
            *max_id = id;
    }
    if (*max_id < 0)
        return qerr_set(err, QERR_INVALID, "%s: %s is empty", b->path, b->what);
    return 0;
}

static int build_alloc(build_t *b, int32_t size, qerr_t *err) {
    b->size = size;
    b->text = calloc((size_t)size, sizeof *b->text);
    b->raw = calloc((size_t)size, 1);
    b->flags = calloc((size_t)size, 1);
    b->bpe = calloc(1, sizeof *b->bpe);
    if (!b->text || !b->raw || !b->flags || !b->bpe)
        return qerr_set(err, QERR_NOMEM, "%s: out of memory for %d ids", b->path, (int)size);
    return 0;
}

/* Fills the id table from the vocab object; duplicate ids are errors. */
static int vocab_fill(build_t *b, qerr_t *err) {
    const char *key;
    json_t *v;
    json_object_foreach(b->vocab, key, v) {
        int32_t id = (int32_t)json_integer_value(v);
        if (b->text[id])
            return qerr_set(err, QERR_INVALID, "%s: %s: tokens \"%s\" and \"%s\" both have id %d",
                            b->path, b->what, b->text[id], key, (int)id);
        b->text[id] = key;
        b->flags[id] = TOKENIZER_TOKEN_PRESENT;
    }
    return 0;
}

static int vocab_get(const build_t *b, const char *token, int32_t *id) {
    json_t *v = json_object_get(b->vocab, token);
    if (!v)
        return -1;
    *id = (int32_t)json_integer_value(v);
    return 0;
}

/* Adds merge number `rank` of tokens a and b. The caller prefixes errors with the location. */
static int merge_add(build_t *b, const char *ta, const char *tb, int32_t rank, qerr_t *err) {
    int32_t a, c, merged;
    if (vocab_get(b, ta, &a) < 0)
        return qerr_set(err, QERR_INVALID, "merge \"%s %s\" names \"%s\", which is not in %s", ta,
                        tb, ta, b->what);
    if (vocab_get(b, tb, &c) < 0)
        return qerr_set(err, QERR_INVALID, "merge \"%s %s\" names \"%s\", which is not in %s", ta,
                        tb, tb, b->what);
    size_t la = strlen(ta), lb = strlen(tb);
    if (la + lb + 1 > b->concat_cap) {
        char *p = realloc(b->concat, la + lb + 1);
        if (!p)
            return qerr_set(err, QERR_NOMEM, "out of memory");
        b->concat = p;
        b->concat_cap = la + lb + 1;
    }
    memcpy(b->concat, ta, la);
    memcpy(b->concat + la, tb, lb + 1);
    if (vocab_get(b, b->concat, &merged) < 0)
        return qerr_set(err, QERR_INVALID, "merge \"%s %s\" gives \"%s\", which is not in %s", ta,
                        tb, b->concat, b->what);
    tokenizer_bpe_t *m = b->bpe;
    uint64_t key = merge_key(a, c);
    for (uint64_t i = merge_hash(key) & m->merge_mask;; i = (i + 1) & m->merge_mask) {
        merge_slot_t *s = &m->merges[i];
        if (s->key == key)
            return qerr_set(err, QERR_INVALID, "merge \"%s %s\" repeats merge number %d", ta, tb,
                            (int)s->rank + 1);
        if (s->key == MERGE_EMPTY) {
            s->key = key;
            s->rank = rank;
            s->id = merged;
            return 0;
        }
    }
}

/* Byte tokens, the end-of-text token and the regex; then moves the id table into t. */
static tokenizer_t *build_finish(build_t *b, qerr_t *err) {
    tokenizer_bpe_t *m = b->bpe;
    for (int byte = 0; byte < 256; byte++) {
        char s[3] = {0};
        utf8_put(s, b->cp_of_byte[byte]);
        if (vocab_get(b, s, &m->byte_id[byte]) < 0) {
            qerr_set(err, QERR_INVALID, "%s: %s lacks the token \"%s\" for byte 0x%02X", b->path,
                     b->what, s, (unsigned)byte);
            return NULL;
        }
    }
    int32_t eot = -1;
    if (vocab_get(b, GPT2_EOT, &eot) < 0) {
        for (int32_t id = 0; id < b->size; id++)
            if (b->raw[id] && strcmp(b->text[id], GPT2_EOT) == 0)
                eot = id;
    }
    if (eot < 0) {
        qerr_set(err, QERR_INVALID, "%s: no \"%s\" token (GPT-2 BPE uses it as BOS, EOS and PAD)",
                 b->path, GPT2_EOT);
        return NULL;
    }
    b->flags[eot] |= TOKENIZER_TOKEN_SPECIAL;

    int code;
    PCRE2_SIZE at;
    m->re = pcre2_compile((PCRE2_SPTR)GPT2_PATTERN, PCRE2_ZERO_TERMINATED,
                          PCRE2_UTF | PCRE2_UCP | PCRE2_MATCH_INVALID_UTF, &code, &at, NULL);
    if (!m->re) {
        PCRE2_UCHAR msg[256];
        pcre2_get_error_message(code, msg, sizeof msg);
        qerr_set(err, QERR_INVALID, "PCRE2 cannot compile the GPT-2 pattern at offset %zu: %s",
                 (size_t)at, (const char *)msg);
        return NULL;
    }
    /* A failed JIT compile (no JIT on this platform) leaves the interpreter, same matches. */
    (void)pcre2_jit_compile(m->re, PCRE2_JIT_COMPLETE);
    m->cache = calloc(BPE_CACHE_SLOTS, sizeof *m->cache);
    if (!m->cache) {
        qerr_set(err, QERR_NOMEM, "out of memory for the BPE word cache");
        return NULL;
    }
    pthread_mutex_init(&m->cache_lock, NULL);

    tokenizer_t *t = calloc(1, sizeof *t);
    size_t blob_cap = 0;
    for (int32_t id = 0; id < b->size; id++)
        if (b->text[id])
            blob_cap += strlen(b->text[id]);
    if (t) {
        t->blob = malloc(blob_cap ? blob_cap : 1);
        t->off = malloc(((size_t)b->size + 1) * sizeof *t->off);
    }
    if (!t || !t->blob || !t->off) {
        tokenizer_destroy(&t);
        qerr_set(err, QERR_NOMEM, "out of memory for the token table");
        return NULL;
    }
    size_t pos = 0;
    for (int32_t id = 0; id < b->size; id++) {
        t->off[id] = pos;
        const char *s = b->text[id];
        if (!s)
            continue;
        if (b->raw[id]) {
            size_t n = strlen(s);
            memcpy(t->blob + pos, s, n);
            pos += n;
            continue;
        }
        uint32_t bad = 0;
        ptrdiff_t n = alphabet_decode(s, b->byte_of_cp, t->blob + pos, &bad);
        if (n < 0) {
            qerr_set(err, QERR_INVALID,
                     "%s: %s: token \"%s\" (id %d) has U+%04X, which is not in GPT-2's byte "
                     "alphabet",
                     b->path, b->what, s, (int)id, (unsigned)bad);
            tokenizer_destroy(&t);
            return NULL;
        }
        pos += (size_t)n;
    }
    t->off[b->size] = pos;
    t->kind = TOKENIZER_KIND_GPT2_BPE;
    t->vocab_size = b->size;
    t->bos = t->eos = t->pad = eot;
    t->flags = b->flags;
    b->flags = NULL;
    t->bpe = b->bpe;
    b->bpe = NULL;
    return t;
}

/* Loads a JSON file; a missing file is QERR_IO, bad syntax QERR_PARSE with file:line:column. */
static json_t *json_file_load(const char *path, qerr_t *err) {
    json_error_t je;
    json_t *root = json_load_file(path, JSON_REJECT_DUPLICATES, &je);
    if (!root) {
        if (je.line < 0)
            qerr_set(err, QERR_IO, "%s", je.text); /* names the file already */
        else
            qerr_set(err, QERR_PARSE, "%s:%d:%d: %s", path, je.line, je.column, je.text);
    }
    return root;
}

/* Reads a whole file into a NUL-terminated buffer (the caller frees it). */
static char *file_read(const char *path, size_t *len, qerr_t *err) {
    FILE *f = fopen(path, "rb");
    if (!f) {
        qerr_set(err, QERR_IO, "%s: cannot open: %s", path, strerror(errno));
        return NULL;
    }
    size_t cap = 1 << 16, n = 0;
    char *buf = malloc(cap);
    while (buf) {
        n += fread(buf + n, 1, cap - 1 - n, f);
        if (n < cap - 1)
            break;
        char *p = cap <= SIZE_MAX / 2 ? realloc(buf, cap * 2) : NULL;
        if (!p) {
            free(buf);
            buf = NULL;
            break;
        }
        buf = p;
        cap *= 2;
    }
    if (!buf) {
        qerr_set(err, QERR_NOMEM, "%s: out of memory reading the file", path);
    } else if (ferror(f)) {
        qerr_set(err, QERR_IO, "%s: read error: %s", path, strerror(errno));
        free(buf);
        buf = NULL;
    } else {
        buf[n] = '\0';
        *len = n;
    }
    fclose(f);
    return buf;
}

/* Parses merges.txt: an optional "#version" first line, then "A B" lines in rank order. */
static int merges_txt_load(build_t *b, const char *path, qerr_t *err) {
    size_t len;
    char *text = file_read(path, &len, err);
    if (!text)
        return -1;
    size_t lines = 1;
    for (size_t i = 0; i < len; i++)
        lines += text[i] == '\n';
    int rc = merge_alloc(b->bpe, lines, err);
    int32_t rank = 0;
    char *p = text, *end = text + len;
    for (size_t lineno = 1; rc == 0 && p < end; lineno++) {
        char *nl = memchr(p, '\n', (size_t)(end - p));
        char *eol = nl ? nl : end;
        char *next = nl ? nl + 1 : end;
        if (eol > p && eol[-1] == '\r')
            eol--;
        *eol = '\0';
        if (lineno == 1 && strncmp(p, "#version", 8) == 0) {
            p = next;
            continue;
        }
        if (memchr(p, '\0', (size_t)(eol - p))) {
            rc = qerr_set(err, QERR_PARSE, "%s:%zu: NUL byte in a merge line", path, lineno);
            break;
        }
        char *sp = strchr(p, ' ');
        if (!sp || sp == p || sp[1] == '\0' || strchr(sp + 1, ' ')) {
            rc = qerr_set(err, QERR_PARSE,
                          "%s:%zu: expected two tokens separated by one space, got \"%.80s\"", path,
                          lineno, p);
            break;
        }
        *sp = '\0';
        if (merge_add(b, p, sp + 1, rank++, err) < 0)
            rc = qerr_wrap(err, "%s:%zu", path, lineno);
        p = next;
    }
    free(text);
    return rc;
}

tokenizer_t *tokenizer_new_bpe_files(const char *vocab_json, const char *merges_txt, qerr_t *err) {
    build_t b = {.path = vocab_json, .what = "vocab.json"};
    byte_alphabet(b.cp_of_byte, b.byte_of_cp);
    tokenizer_t *t = NULL;
    int32_t max_id;
    b.vocab = json_file_load(vocab_json, err);
    if (!b.vocab)
        return NULL;
    if (!json_is_object(b.vocab)) {
        qerr_set(err, QERR_INVALID, "%s: expected a JSON object mapping token to id", vocab_json);
    } else if (vocab_max_id(&b, &max_id, err) == 0 && build_alloc(&b, max_id + 1, err) == 0 &&
               vocab_fill(&b, err) == 0 && merges_txt_load(&b, merges_txt, err) == 0) {
        t = build_finish(&b, err);
    }
    build_free(&b);
    json_decref(b.vocab);
    return t;
}

/* ---- tokenizer.json ------------------------------------------------------------------------ */

/* A JSON member that must be absent, null, or equal to an allowed "off" value. */
static int hf_off(const json_t *obj, const char *key, const char *where, const char *path,
                  qerr_t *err) {
    const json_t *v = json_object_get(obj, key);
    if (!v || json_is_null(v) || json_is_false(v) || (json_is_string(v) && !*json_string_value(v)))
        return 0;
    return qerr_set(err, QERR_INVALID, "%s: %s.%s is set; only plain GPT-2 BPE is supported", path,
                    where, key);
}

static int hf_check(const json_t *root, const char *path, qerr_t *err) {
    const json_t *model = json_object_get(root, "model");
    if (!json_is_object(model))
        return qerr_set(err, QERR_INVALID, "%s: no \"model\" object", path);
    const json_t *type = json_object_get(model, "type");
    if (type && (!json_is_string(type) || strcmp(json_string_value(type), "BPE") != 0))
        return qerr_set(err, QERR_INVALID, "%s: model.type is not \"BPE\"", path);
    if (hf_off(model, "continuing_subword_prefix", "model", path, err) < 0 ||
        hf_off(model, "end_of_word_suffix", "model", path, err) < 0 ||
        hf_off(model, "byte_fallback", "model", path, err) < 0 ||
        hf_off(root, "normalizer", "(top level)", path, err) < 0)
        return -1;
    const json_t *pre = json_object_get(root, "pre_tokenizer");
    const json_t *pre_type = json_object_get(pre, "type");
    if (!json_is_string(pre_type) || strcmp(json_string_value(pre_type), "ByteLevel") != 0)
        return qerr_set(err, QERR_INVALID,
                        "%s: pre_tokenizer.type must be \"ByteLevel\" (GPT-2 byte-level BPE)",
                        path);
    if (hf_off(pre, "add_prefix_space", "pre_tokenizer", path, err) < 0)
        return -1;
    const json_t *use_regex = json_object_get(pre, "use_regex");
    if (use_regex && !json_is_true(use_regex))
        return qerr_set(err, QERR_INVALID, "%s: pre_tokenizer.use_regex must be true", path);
    return 0;
}

/* Largest id among added_tokens (each {id, content, special?}); -1 if there are none. */
static int hf_added_max(const json_t *added, const char *path, int32_t *max_id, qerr_t *err) {
    size_t i;
    const json_t *e;
    *max_id = -1;
    if (!added || json_is_null(added))
        return 0;
    if (!json_is_array(added))
        return qerr_set(err, QERR_INVALID, "%s: added_tokens is not an array", path);
    json_array_foreach(added, i, e) {
        int32_t id;
        const json_t *special = json_object_get(e, "special");
        if (!json_is_object(e) || id_read(json_object_get(e, "id"), &id) < 0 ||
            !json_is_string(json_object_get(e, "content")) ||
            !*json_string_value(json_object_get(e, "content")) ||
            (special && !json_is_boolean(special)))
            return qerr_set(err, QERR_INVALID,
                            "%s: added_tokens[%zu] needs an integer \"id\" in [0, %d), a "
                            "non-empty string \"content\" and an optional boolean \"special\"",
                            path, i, (int)TOKENIZER_MAX_ID);
        if (id > *max_id)
            *max_id = id;
    }
    return 0;
}

static int hf_added_fill(build_t *b, const json_t *added, qerr_t *err) {
    size_t i;
    const json_t *e;
    if (!json_is_array(added))
        return 0;
    json_array_foreach(added, i, e) {
        int32_t id = (int32_t)json_integer_value(json_object_get(e, "id"));
        const char *content = json_string_value(json_object_get(e, "content"));
        int32_t vid;
        if (vocab_get(b, content, &vid) == 0) {
            if (vid != id)
                return qerr_set(err, QERR_INVALID,
                                "%s: added_tokens[%zu] \"%s\" has id %d but model.vocab gives %d",
                                b->path, i, content, (int)id, (int)vid);
        } else if (b->text[id]) {
            return qerr_set(err, QERR_INVALID,
                            "%s: added_tokens[%zu] \"%s\" has id %d, already the id of \"%s\"",
                            b->path, i, content, (int)id, b->text[id]);
        } else {
            b->text[id] = content;
            b->raw[id] = 1;
            b->flags[id] = TOKENIZER_TOKEN_PRESENT;
        }
        if (json_is_true(json_object_get(e, "special")))
            b->flags[id] |= TOKENIZER_TOKEN_SPECIAL;
    }
    return 0;
}

/* model.merges: each entry "A B" (older files) or ["A", "B"] (newer ones). */
static int hf_merges_load(build_t *b, const json_t *merges, qerr_t *err) {
    if (!json_is_array(merges))
        return qerr_set(err, QERR_INVALID, "%s: model.merges is not an array", b->path);
    if (merge_alloc(b->bpe, json_array_size(merges), err) < 0)
        return -1;
    size_t i;
    const json_t *e;
    char *pair = NULL;
    int rc = 0;
    json_array_foreach(merges, i, e) {
        const char *ta = NULL, *tb = NULL;
        if (json_is_string(e)) {
            free(pair);
            pair = strdup(json_string_value(e));
            if (!pair) {
                rc = qerr_set(err, QERR_NOMEM, "out of memory");
                break;
            }
            char *sp = strchr(pair, ' ');
            if (sp && sp != pair && sp[1] && !strchr(sp + 1, ' ')) {
                *sp = '\0';
                ta = pair;
                tb = sp + 1;
            }
        } else if (json_is_array(e) && json_array_size(e) == 2 &&
                   json_is_string(json_array_get(e, 0)) && json_is_string(json_array_get(e, 1))) {
            ta = json_string_value(json_array_get(e, 0));
            tb = json_string_value(json_array_get(e, 1));
        }
        if (!ta || !*ta || !*tb) {
            rc = qerr_set(err, QERR_INVALID,
                          "%s: model.merges[%zu] is neither \"A B\" nor [\"A\", \"B\"] with "
                          "non-empty tokens",
                          b->path, i);
            break;
        }
        if (merge_add(b, ta, tb, (int32_t)i, err) < 0) {
            rc = qerr_wrap(err, "%s: model.merges[%zu]", b->path, i);
            break;
        }
    }
    free(pair);
    return rc;
}

tokenizer_t *tokenizer_new_hf_json(const char *tokenizer_json, qerr_t *err) {
    build_t b = {.path = tokenizer_json, .what = "model.vocab"};
    byte_alphabet(b.cp_of_byte, b.byte_of_cp);
    json_t *root = json_file_load(tokenizer_json, err);
    if (!root)
        return NULL;
    tokenizer_t *t = NULL;
    if (!json_is_object(root)) {
        qerr_set(err, QERR_INVALID, "%s: expected a JSON object", tokenizer_json);
        json_decref(root);
        return NULL;
    }
    const json_t *model = json_object_get(root, "model");
    const json_t *added = json_object_get(root, "added_tokens");
    b.vocab = json_object_get(model, "vocab");
    int32_t max_vocab, max_added;
    if (hf_check(root, tokenizer_json, err) < 0) {
        /* err filled */
    } else if (!json_is_object(b.vocab)) {
        qerr_set(err, QERR_INVALID, "%s: model.vocab is not an object", tokenizer_json);
    } else if (vocab_max_id(&b, &max_vocab, err) == 0 &&
               hf_added_max(added, tokenizer_json, &max_added, err) == 0 &&
               build_alloc(&b, (max_vocab > max_added ? max_vocab : max_added) + 1, err) == 0 &&
               vocab_fill(&b, err) == 0 && hf_added_fill(&b, added, err) == 0 &&
               hf_merges_load(&b, json_object_get(model, "merges"), err) == 0) {
        t = build_finish(&b, err);
    }
    build_free(&b);
    json_decref(root);
    return t;
}

void tokenizer_bpe_free(tokenizer_bpe_t *m) {
    if (!m)
        return;
    if (m->cache)
        pthread_mutex_destroy(&m->cache_lock);
    pcre2_code_free(m->re);
    free(m->merges);
    free(m->cache);
    free(m);
}

/* ---- encoding ------------------------------------------------------------------------------ */

typedef struct {
    int32_t rank;
    int32_t pos;  /* the left symbol's index: ties go to the leftmost pair */
    int32_t a, b; /* the pair when pushed: the entry is stale once either side changed */
    int32_t merged;
} heap_ent_t;

/* Working memory of one encode call, grown to the longest piece. */
typedef struct {
    int32_t *ids, *prev, *next; /* [cap]: symbols as a linked list; prev < -1 marks dead */
    heap_ent_t *heap;           /* [3 * cap]: n - 1 pairs plus at most 2 per merge */
    size_t cap, heap_len;
} scratch_t;

static int scratch_reserve(scratch_t *w, size_t n, qerr_t *err) {
    if (n <= w->cap)
        return 0;
    size_t cap = w->cap ? w->cap : 64;
    while (cap < n)
        cap *= 2;
    if (cap > SIZE_MAX / (3 * sizeof(heap_ent_t)))
        return qerr_set(err, QERR_NOMEM, "tokenizer: piece of %zu bytes is too long", n);
    free(w->ids);
    free(w->prev);
    free(w->next);
    free(w->heap);
    w->ids = malloc(cap * sizeof *w->ids);
    w->prev = malloc(cap * sizeof *w->prev);
    w->next = malloc(cap * sizeof *w->next);
    w->heap = malloc(3 * cap * sizeof *w->heap);
    if (!w->ids || !w->prev || !w->next || !w->heap) {
        w->cap = 0;
        return qerr_set(err, QERR_NOMEM, "tokenizer: out of memory for a %zu-byte piece", n);
    }
    w->cap = cap;
    return 0;
}

static void scratch_free(scratch_t *w) {
    free(w->ids);
    free(w->prev);
    free(w->next);
    free(w->heap);
}

static int heap_less(const heap_ent_t *x, const heap_ent_t *y) {
    return x->rank < y->rank || (x->rank == y->rank && x->pos < y->pos);
}

static void heap_push(scratch_t *w, heap_ent_t e) {
    size_t i = w->heap_len++;
    while (i > 0) {
        size_t parent = (i - 1) / 2;
        if (!heap_less(&e, &w->heap[parent]))
            break;
        w->heap[i] = w->heap[parent];
        i = parent;
    }
    w->heap[i] = e;
}

static heap_ent_t heap_pop(scratch_t *w) {
    heap_ent_t top = w->heap[0], last = w->heap[--w->heap_len];
    size_t i = 0, n = w->heap_len;
    for (;;) {
        size_t c = 2 * i + 1;
        if (c >= n)
            break;
        if (c + 1 < n && heap_less(&w->heap[c + 1], &w->heap[c]))
            c++;
        if (!heap_less(&w->heap[c], &last))
            break;
        w->heap[i] = w->heap[c];
        i = c;
    }
    if (n > 0)
        w->heap[i] = last;
    return top;
}

/* Pushes the pair starting at symbol i when the merge table has it. */
static void pair_push(const tokenizer_bpe_t *m, scratch_t *w, int32_t i) {
    int32_t j = w->next[i];
    const merge_slot_t *s = merge_find(m, w->ids[i], w->ids[j]);
    if (s)
        heap_push(w, (heap_ent_t){s->rank, i, w->ids[i], w->ids[j], s->id});
}

/* Merges the bytes of one piece; leaves the result in w->ids[0..count). */
static size_t piece_merge(const tokenizer_bpe_t *m, const uint8_t *s, size_t n, scratch_t *w) {
    int32_t last = (int32_t)n - 1;
    for (int32_t i = 0; i <= last; i++) {
        w->ids[i] = m->byte_id[s[i]];
        w->prev[i] = i - 1;
        w->next[i] = i < last ? i + 1 : -1;
    }
    w->heap_len = 0;
    for (int32_t i = 0; i < last; i++)
        pair_push(m, w, i);
    while (w->heap_len) {
        heap_ent_t e = heap_pop(w);
        int32_t l = e.pos, r = w->next[l];
        if (w->prev[l] < -1 || r < 0 || w->ids[l] != e.a || w->ids[r] != e.b)
            continue;
        w->ids[l] = e.merged;
        w->prev[r] = -2;
        w->next[l] = w->next[r];
        if (w->next[l] >= 0)
            w->prev[w->next[l]] = l;
        if (w->prev[l] >= 0)
            pair_push(m, w, w->prev[l]);
        if (w->next[l] >= 0)
            pair_push(m, w, l);
    }
    /* Symbol 0 never dies (a merge keeps its left symbol), so the list starts there. */
    size_t count = 0;
    for (int32_t i = 0; i >= 0; i = w->next[i])
        w->ids[count++] = w->ids[i];
    return count;
}

static uint32_t cache_hash(const uint8_t *s, size_t n) {
    uint32_t h = 2166136261u;
    for (size_t i = 0; i < n; i++)
        h = (h ^ s[i]) * 16777619u;
    return h;
}

/* Copies a cached encoding of the piece into ids; returns its count, or 0 when absent. */
static size_t cache_get(tokenizer_bpe_t *m, uint32_t h, const uint8_t *s, size_t n, int32_t *ids) {
    cache_slot_t *c = &m->cache[h % BPE_CACHE_SLOTS];
    size_t count = 0;
    pthread_mutex_lock(&m->cache_lock);
    if (c->klen == n && memcmp(c->key, s, n) == 0) {
        count = c->nids;
        memcpy(ids, c->ids, count * sizeof *ids);
    }
    pthread_mutex_unlock(&m->cache_lock);
    return count;
}

static void cache_put(tokenizer_bpe_t *m, uint32_t h, const uint8_t *s, size_t n,
                      const int32_t *ids, size_t count) {
    cache_slot_t *c = &m->cache[h % BPE_CACHE_SLOTS];
    pthread_mutex_lock(&m->cache_lock);
    c->klen = (uint8_t)n;
    c->nids = (uint8_t)count;
    memcpy(c->key, s, n);
    memcpy(c->ids, ids, count * sizeof *ids);
    pthread_mutex_unlock(&m->cache_lock);
}

static int piece_encode(tokenizer_bpe_t *m, const uint8_t *s, size_t n, scratch_t *w,
                        tokenizer_sink_t *sink, qerr_t *err) {
    if (n == 1)
        return tokenizer_sink_push(sink, &m->byte_id[s[0]], 1, err);
    if (n <= BPE_CACHE_KEY_MAX) {
        int32_t ids[BPE_CACHE_KEY_MAX];
        uint32_t h = cache_hash(s, n);
        size_t count = cache_get(m, h, s, n, ids);
        if (count == 0) {
            if (scratch_reserve(w, n, err) < 0)
                return -1;
            count = piece_merge(m, s, n, w);
            memcpy(ids, w->ids, count * sizeof *ids);
            cache_put(m, h, s, n, ids, count);
        }
        return tokenizer_sink_push(sink, ids, count, err);
    }
    if (scratch_reserve(w, n, err) < 0)
        return -1;
    size_t count = piece_merge(m, s, n, w);
    return tokenizer_sink_push(sink, w->ids, count, err);
}

int tokenizer_bpe_encode(const tokenizer_t *t, const uint8_t *text, size_t len,
                         tokenizer_sink_t *sink, qerr_t *err) {
    tokenizer_bpe_t *m = t->bpe;
    scratch_t w = {0};
    pcre2_match_data *md = pcre2_match_data_create_from_pattern(m->re, NULL);
    if (!md)
        return qerr_set(err, QERR_NOMEM, "tokenizer: out of memory for PCRE2 match data");
    const PCRE2_SIZE *ov = pcre2_get_ovector_pointer(md);
    int rc = 0;
    size_t at = 0;
    while (rc == 0 && at < len) {
        int mrc = pcre2_match(m->re, text, len, at, 0, md, NULL);
        size_t start = len, end = len;
        if (mrc >= 0) {
            start = ov[0];
            end = ov[1];
            Q_ASSERT(start >= at && end > start);
        } else if (mrc != PCRE2_ERROR_NOMATCH) {
            PCRE2_UCHAR msg[256];
            pcre2_get_error_message(mrc, msg, sizeof msg);
            rc = qerr_set(err, mrc == PCRE2_ERROR_NOMEMORY ? QERR_NOMEM : QERR_INVALID,
                          "tokenizer: PCRE2 match failed at byte %zu: %s", at, (const char *)msg);
            break;
        }
        /* Bytes the regex skipped are invalid UTF-8: each is a piece of its own. */
        for (; rc == 0 && at < start; at++)
            rc = tokenizer_sink_push(sink, &m->byte_id[text[at]], 1, err);
        if (rc == 0 && end > start)
            rc = piece_encode(m, text + start, end - start, &w, sink, err);
        at = end;
    }
    pcre2_match_data_free(md);
    scratch_free(&w);
    return rc;
}
