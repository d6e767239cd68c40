/* libFuzzer target: the BPE tokenizer files (common/tokenizer.h). Built twice:
 *   FUZZ_TOKENIZER_JSON = 0: input = vocab.json, a NUL byte, merges.txt
 *                            (tokenizer_new_bpe_files);
 *   FUZZ_TOKENIZER_JSON = 1: input = tokenizer.json (tokenizer_new_hf_json).
 * A tokenizer that loads must encode a fixed text and decode its ids back to the same bytes. */
#include "fuzz_util.h"
#include "tokenizer.h"

#include <string.h>

static void exercise(const tokenizer_t *t) {
    static const char text[] = "Hello, world! 12 + 30 = 42\n\xc3\xa9t\xc3\xa9 \xf0\x9f\x98\x80";
    int32_t ids[256];
    qerr_t e;
    ptrdiff_t n = tokenizer_encode(t, text, sizeof text - 1, ids, 256, &e);
    if (n < 0 || n > 256)
        return;
    char out[512];
    ptrdiff_t m = tokenizer_decode(t, ids, (size_t)n, 0, out, sizeof out, &e);
    if (m >= 0 && (size_t)m <= sizeof out)
        Q_ASSERT((size_t)m == sizeof text - 1 && memcmp(out, text, (size_t)m) == 0);
    int32_t v = tokenizer_vocab_size(t);
    for (int32_t id = 0; id < v && id < 4096; id++) {
        size_t len;
        tokenizer_token_bytes(t, id, &len);
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    char p1[64];
    qerr_t e;
    qerr_clear(&e);
    tokenizer_t *t = NULL;
#if FUZZ_TOKENIZER_JSON
    int fd = fuzz_memfile(data, size, p1, sizeof p1);
    if (fd < 0)
        return 0;
    t = tokenizer_new_hf_json(p1, &e);
    close(fd);
#else
    char p2[64];
    const uint8_t *nul = memchr(data, '\0', size);
    if (nul == NULL)
        return 0;
    size_t n1 = (size_t)(nul - data);
    int fd1 = fuzz_memfile(data, n1, p1, sizeof p1);
    int fd2 = fuzz_memfile(nul + 1, size - n1 - 1, p2, sizeof p2);
    if (fd1 >= 0 && fd2 >= 0)
        t = tokenizer_new_bpe_files(p1, p2, &e);
    else
        e.code = QERR_IO, snprintf(e.msg, sizeof e.msg, "memfd");
    if (fd1 >= 0)
        close(fd1);
    if (fd2 >= 0)
        close(fd2);
#endif
    if (t == NULL) {
        fuzz_check_error(&e);
        return 0;
    }
    exercise(t);
    tokenizer_destroy(&t);
    return 0;
}
