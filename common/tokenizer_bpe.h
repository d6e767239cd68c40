/* Internal to the tokenizer module (tokenizer.c, tokenizer_bpe.c): the tokenizer struct, the
 * id sink both encoders write to, and the BPE entry points. Nothing outside the module
 * includes this header. */
#ifndef QUILLAN_TOKENIZER_BPE_H
#define QUILLAN_TOKENIZER_BPE_H

#include "tokenizer.h"

#include <stdint.h>

/* Bits of tokenizer.flags[id]. */
#define TOKENIZER_TOKEN_PRESENT 1u /* the id is defined (a tokenizer.json may leave gaps) */
#define TOKENIZER_TOKEN_SPECIAL 2u /* skipped by TOKENIZER_DECODE_SKIP_SPECIAL */

typedef struct tokenizer_bpe tokenizer_bpe_t;

struct tokenizer {
    tokenizer_kind_t kind;
    int32_t vocab_size; /* one more than the largest defined id */
    int32_t bos, eos, pad;
    char *blob;           /* the bytes of every token, back to back */
    size_t *off;          /* [vocab_size + 1]: token i is blob[off[i] .. off[i + 1]) */
    uint8_t *flags;       /* [vocab_size]: TOKENIZER_TOKEN_* */
    tokenizer_bpe_t *bpe; /* NULL for byte-level */
};

/* Where encoders put ids: a caller buffer (grow == NULL: the first cap ids are stored, the rest
 * only counted) or a growable array (grow != NULL). n counts every id pushed. */
typedef struct {
    int32_t *buf;
    size_t cap;
    tokenizer_ids_t *grow;
    size_t n;
} tokenizer_sink_t;

/* Pushes count ids; -1 with err filled only when growing the array fails. */
int tokenizer_sink_push(tokenizer_sink_t *sink, const int32_t *ids, size_t count, qerr_t *err);

/* Encodes text with t's BPE model (t->kind is TOKENIZER_KIND_GPT2_BPE). Returns 0 or -1. */
int tokenizer_bpe_encode(const tokenizer_t *t, const uint8_t *text, size_t len,
                         tokenizer_sink_t *sink, qerr_t *err);

/* Frees the BPE model (regex, merge table, cache); safe on NULL. */
void tokenizer_bpe_free(tokenizer_bpe_t *bpe);

#endif
