/* Tokenizers: byte-level (no files) and GPT-2 byte-level BPE (MODEL.md §Tokenizers).
 *
 * Ids are int32_t. Special ids (ARCHITECTURE.md §6):
 *   byte-level   ids 0..255 are the bytes; 256 BOS, 257 EOS, 258 PAD; vocab size 259.
 *   gpt2-bpe     the "<|endoftext|>" token (50256 in GPT-2) serves as BOS, EOS and PAD.
 *
 * Encoding never adds BOS or EOS: callers add them (a prompt is BOS + tokens, a completion ends
 * with EOS). Special-token text such as "<|endoftext|>" inside the input is ordinary text and
 * encodes like any other bytes. Every byte string, valid UTF-8 or not, round-trips: decoding
 * the ids that encoding gives returns the same bytes.
 *
 * Threads: a tokenizer never changes after creation except for the BPE word cache, which is
 * behind a mutex, so one tokenizer may encode and decode on several threads at once. */
#ifndef QUILLAN_TOKENIZER_H
#define QUILLAN_TOKENIZER_H

#include "error.h"
#include "model_config.h"

#include <stddef.h>
#include <stdint.h>

typedef struct tokenizer tokenizer_t;

typedef enum {
    TOKENIZER_KIND_BYTE = 0, /* 256 bytes + BOS/EOS/PAD */
    TOKENIZER_KIND_GPT2_BPE, /* GPT-2 byte-level BPE (pre-tokenizer regex + merges) */
    TOKENIZER_KIND_COUNT
} tokenizer_kind_t;

#define TOKENIZER_BYTE_BOS 256
#define TOKENIZER_BYTE_EOS 257
#define TOKENIZER_BYTE_PAD 258
#define TOKENIZER_BYTE_VOCAB 259

/* Largest id a BPE file may use: bounds the id tables built from untrusted files. */
#define TOKENIZER_MAX_ID ((int32_t)1 << 24)

/* Decode flag: special tokens (BOS/EOS/PAD, and tokens a tokenizer.json marks special) give no
 * bytes. Without it they give their text: "<|bos|>", "<|eos|>", "<|pad|>" for byte-level,
 * the token's own text (e.g. "<|endoftext|>") for BPE. */
#define TOKENIZER_DECODE_SKIP_SPECIAL 1u

/* A growable id array, embedded by the caller: _init before use, _free after. */
typedef struct {
    int32_t *data;
    size_t len;
    size_t cap;
} tokenizer_ids_t;

/* A growable byte buffer; data[len] is always '\0' once anything was appended, so text without
 * NUL bytes can be printed directly. */
typedef struct {
    char *data;
    size_t len;
    size_t cap;
} tokenizer_text_t;

void tokenizer_ids_init(tokenizer_ids_t *ids);
void tokenizer_ids_free(tokenizer_ids_t *ids);
void tokenizer_text_init(tokenizer_text_t *text);
void tokenizer_text_free(tokenizer_text_t *text);

/* The byte-level tokenizer. Returns NULL only when out of memory. */
tokenizer_t *tokenizer_new_byte(void);

/* GPT-2 BPE from the standard files: vocab_json maps token -> id ({"!": 0, ...}); merges_txt
 * holds one merge "A B" a line in rank order, after an optional "#version" first line.
 * The files are validated: JSON syntax, duplicate tokens or ids, ids outside
 * [0, TOKENIZER_MAX_ID), a missing token for any of the 256 bytes, a missing "<|endoftext|>",
 * malformed or duplicate merges, and merges that name a token (or give a result) absent from
 * the vocab are errors naming the file and line. Returns NULL and fills err on failure. */
tokenizer_t *tokenizer_new_bpe_files(const char *vocab_json, const char *merges_txt, qerr_t *err);

/* GPT-2 BPE from a Hugging Face tokenizer.json: model.type "BPE" with model.vocab and
 * model.merges (each merge either "A B" or ["A", "B"]), a ByteLevel pre_tokenizer (no prefix
 * space) and no normalizer. Entries of added_tokens are added to the id table; those marked
 * special decode as special. Same validation as tokenizer_new_bpe_files, errors naming the
 * file and JSON key. */
tokenizer_t *tokenizer_new_hf_json(const char *tokenizer_json, qerr_t *err);

/* The tokenizer a model config names: byte-level, or GPT-2 BPE from model.tokenizer.json or
 * from .vocab + .merges. Returns NULL and fills err when out of memory, when a gpt2 config names
 * no files (QERR_NOTFOUND, e.g. a quantized policy whose files were not carried along), or as
 * the constructors above on bad files. */
tokenizer_t *tokenizer_new_for_config(const model_tokenizer_config_t *cfg, qerr_t *err);

/* Frees everything and sets *t to NULL; safe on NULL and on an already destroyed pointer. */
void tokenizer_destroy(tokenizer_t **t);

tokenizer_kind_t tokenizer_kind(const tokenizer_t *t);
const char *tokenizer_kind_name(tokenizer_kind_t kind); /* "byte" | "gpt2-bpe" */

/* One more than the largest id: every id in [0, vocab_size) that the tokenizer defines can be
 * decoded. (A tokenizer.json may leave gaps; decoding a gap is an error.) */
int32_t tokenizer_vocab_size(const tokenizer_t *t);
int32_t tokenizer_bos_id(const tokenizer_t *t);
int32_t tokenizer_eos_id(const tokenizer_t *t);
int32_t tokenizer_pad_id(const tokenizer_t *t);
/* 1 when id is a special token (BOS/EOS/PAD or a special added token), else 0. */
int tokenizer_is_special(const tokenizer_t *t, int32_t id);

/* The bytes token id decodes to (not NUL-terminated; owned by t), with their count in *len;
 * NULL for an id the tokenizer does not define. For streaming output one token at a time. */
const char *tokenizer_token_bytes(const tokenizer_t *t, int32_t id, size_t *len);

/* Encodes len bytes of text (any bytes, NULs included) into ids[0..cap). Returns the number of
 * ids the whole text encodes to, like snprintf: when that exceeds cap, only the first cap ids
 * were written. Returns -1 and fills err on failure (out of memory, regex engine failure). */
ptrdiff_t tokenizer_encode(const tokenizer_t *t, const void *text, size_t len, int32_t *ids,
                           size_t cap, qerr_t *err);

/* Same, appending every id to *out (grown as needed). Returns 0, or -1 with err filled; on
 * failure out->len is restored to its value on entry. */
int tokenizer_encode_append(const tokenizer_t *t, const void *text, size_t len,
                            tokenizer_ids_t *out, qerr_t *err);

/* Decodes n ids into out[0..cap) (no terminating NUL). Returns the byte count of the whole
 * decoding, like snprintf. An id the tokenizer does not define is an error (QERR_RANGE) naming
 * the id and its position; -1 is returned. flags: TOKENIZER_DECODE_*. */
ptrdiff_t tokenizer_decode(const tokenizer_t *t, const int32_t *ids, size_t n, unsigned flags,
                           char *out, size_t cap, qerr_t *err);

/* Same, appending to *out. Returns 0, or -1 with err filled and out->len restored. */
int tokenizer_decode_append(const tokenizer_t *t, const int32_t *ids, size_t n, unsigned flags,
                            tokenizer_text_t *out, qerr_t *err);

#endif
