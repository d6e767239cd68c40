/* Tokenizer tests: byte-level, GPT-2 BPE against the reference ids in ../shared, tokenizer.json
 * against vocab.json + merges.txt, byte round-trips of arbitrary (invalid UTF-8) strings, and
 * the errors bad files give. Tests needing the GPT-2 files skip, saying so, without ../shared;
 * a small toy BPE written by the tests themselves covers the rest everywhere. */
#include <criterion/criterion.h>

#include "rng.h"
#include "tokenizer.h"

#include <jansson.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define GPT2_DIR QUILLAN_SHARED_DIR "/data/gpt2"
#define GPT2_VOCAB GPT2_DIR "/vocab.json"
#define GPT2_MERGES GPT2_DIR "/merges.txt"
#define GPT2_GOLDEN GPT2_DIR "/golden.jsonl"
#define EXTRA_GOLDEN QUILLAN_TEST_DATA "/tokenizer/gpt2_extra.jsonl"

/* ---- helpers ------------------------------------------------------------------------------- */

static tokenizer_t *gpt2_or_skip(void) {
    if (access(GPT2_VOCAB, R_OK) != 0 || access(GPT2_MERGES, R_OK) != 0) {
        /* Criterion lists skips only with --verbose; stderr makes them visible in any run. */
        fprintf(stderr, "SKIP: ../shared is absent (no %s): GPT-2 BPE test skipped\n", GPT2_DIR);
        cr_skip_test("../shared is absent (no %s): GPT-2 BPE test skipped", GPT2_DIR);
    }
    qerr_t err = {0};
    tokenizer_t *t = tokenizer_new_bpe_files(GPT2_VOCAB, GPT2_MERGES, &err);
    cr_assert_not_null(t, "loading GPT-2 files: %s", err.msg);
    return t;
}

/* bytes_to_unicode of GPT-2, written out independently of the library's table. */
static void byte_char(int b, char out[3]) {
    static int map[256];
    static int ready;
    if (!ready) {
        int n = 0;
        for (int i = 0; i < 256; i++) {
            int printable = (i >= 33 && i <= 126) || (i >= 161 && i <= 172) || i >= 174;
            map[i] = printable ? i : 256 + n++;
        }
        ready = 1;
    }
    memset(out, 0, 3);
    int cp = map[b];
    if (cp < 0x80) {
        out[0] = (char)cp;
    } else {
        out[0] = (char)(0xC0 | (cp >> 6));
        out[1] = (char)(0x80 | (cp & 0x3F));
    }
}

static char tmp_dir[64];

static void tmp_setup(void) {
    strcpy(tmp_dir, "/tmp/quillan_tok_XXXXXX");
    cr_assert_not_null(mkdtemp(tmp_dir));
}

static void tmp_teardown(void) {
    char cmd[128];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", tmp_dir);
    cr_assert_eq(system(cmd), 0);
}

static const char *tmp_path(const char *name) {
    static char bufs[4][256];
    static int k;
    char *p = bufs[k++ % 4];
    snprintf(p, 256, "%s/%s", tmp_dir, name);
    return p;
}

static const char *tmp_write(const char *name, const char *content) {
    const char *path = tmp_path(name);
    FILE *f = fopen(path, "wb");
    cr_assert_not_null(f);
    fputs(content, f);
    fclose(f);
    return path;
}

/* A toy GPT-2 style vocab: 256 byte tokens (ids 0..255 in byte order), "<|endoftext|>" = 256,
 * then "he" 257, "ll" 258, "hell" 259, "Ġw" 260, "hello" 261. */
static json_t *toy_vocab(void) {
    json_t *v = json_object();
    for (int b = 0; b < 256; b++) {
        char s[3];
        byte_char(b, s);
        json_object_set_new(v, s, json_integer(b));
    }
    const char *extra[] = {"<|endoftext|>", "he", "ll", "hell", "\xC4\xA0w", "hello"};
    for (int i = 0; i < 6; i++)
        json_object_set_new(v, extra[i], json_integer(256 + i));
    return v;
}

static const char TOY_MERGES[] = "#version: 0.2\nh e\nl l\nhe ll\n\xC4\xA0 w\nhell o\n";

static void toy_write(const char *vocab_name, const char *merges_name, json_t *vocab,
                      const char *merges) {
    cr_assert_eq(json_dump_file(vocab, tmp_path(vocab_name), JSON_COMPACT), 0);
    tmp_write(merges_name, merges);
}

static tokenizer_t *toy_new(void) {
    json_t *v = toy_vocab();
    toy_write("toy_vocab.json", "toy_merges.txt", v, TOY_MERGES);
    json_decref(v);
    qerr_t err = {0};
    tokenizer_t *t =
        tokenizer_new_bpe_files(tmp_path("toy_vocab.json"), tmp_path("toy_merges.txt"), &err);
    cr_assert_not_null(t, "toy tokenizer: %s", err.msg);
    return t;
}

static void encode_all(const tokenizer_t *t, const void *text, size_t len, tokenizer_ids_t *ids) {
    qerr_t err = {0};
    ids->len = 0;
    cr_assert_eq(tokenizer_encode_append(t, text, len, ids, &err), 0, "encode: %s", err.msg);
}

/* Encodes, decodes and asserts the bytes come back. */
static void assert_roundtrip(const tokenizer_t *t, const uint8_t *s, size_t len) {
    tokenizer_ids_t ids;
    tokenizer_text_t text;
    tokenizer_ids_init(&ids);
    tokenizer_text_init(&text);
    qerr_t err = {0};
    encode_all(t, s, len, &ids);
    cr_assert_eq(tokenizer_decode_append(t, ids.data, ids.len, 0, &text, &err), 0, "decode: %s",
                 err.msg);
    cr_assert_eq(text.len, len, "round trip of %zu bytes gave %zu", len, text.len);
    cr_assert(len == 0 || memcmp(text.data, s, len) == 0, "round trip changed the bytes");
    tokenizer_ids_free(&ids);
    tokenizer_text_free(&text);
}

/* Random bytes biased towards the interesting ones: invalid UTF-8 starts, continuation bytes,
 * NULs, spaces, letters, and valid multi-byte characters. */
static size_t random_bytes(rng_stream_t *r, uint8_t *out, size_t max) {
    static const char *const frags[] = {
        "\x80",
        "\xBF",
        "\xC0\x80",
        "\xC1\xBF",
        "\xE0\x80\x80",
        "\xED\xA0\x80",
        "\xED\xBF\xBF",
        "\xF4\x90\x80\x80",
        "\xF8\x88\x80\x80\x80",
        "\xFE",
        "\xFF",
        "\xE2\x82",
        "\xF0\x9F\x99",
        "\xC3",
        " ",
        "  ",
        "\n",
        "\t",
        "'s",
        "'ll",
        "\xC3\xA9",
        "\xE2\x80\x93",
        "\xF0\x9F\x99\x82",
        "\xE4\xB8\xAD",
        "\xD9\xA3",
        "\xC2\xA0",
        "\xE3\x80\x80",
        "abc",
        "Hello",
        "123",
    };
    size_t len = rng_stream_next_u64(r) % max, n = 0;
    while (n < len) {
        uint64_t x = rng_stream_next_u64(r);
        if (x % 3 == 0) {
            out[n++] = (uint8_t)(x >> 8);
        } else if (x % 3 == 1 && n < len) {
            out[n++] = (x >> 8) % 4 == 0 ? 0 : (uint8_t)('a' + (x >> 16) % 26);
        } else {
            const char *f = frags[(x >> 8) % (sizeof frags / sizeof frags[0])];
            size_t fl = strlen(f);
            if (fl == 0)
                fl = 1;
            if (n + fl > len)
                break;
            memcpy(out + n, f, fl);
            n += fl;
        }
    }
    return n;
}

/* ---- a. byte-level ------------------------------------------------------------------------- */

Test(tokenizer_byte, roundtrips_random_bytes) {
    tokenizer_t *t = tokenizer_new_byte();
    cr_assert_not_null(t);
    cr_assert_eq(tokenizer_kind(t), TOKENIZER_KIND_BYTE);
    cr_assert_eq(tokenizer_vocab_size(t), 259);
    cr_assert_eq(tokenizer_bos_id(t), 256);
    cr_assert_eq(tokenizer_eos_id(t), 257);
    cr_assert_eq(tokenizer_pad_id(t), 258);
    rng_stream_t r;
    rng_stream_init(&r, 1, 2, 3);
    uint8_t buf[3000];
    int32_t ids[3000];
    for (int iter = 0; iter < 200; iter++) {
        size_t len = rng_stream_next_u64(&r) % sizeof buf;
        for (size_t i = 0; i < len; i++)
            buf[i] = (uint8_t)rng_stream_next_u64(&r);
        if (iter == 0) {
            len = 2;
            buf[0] = 0x00;
            buf[1] = 0xFF;
        }
        ptrdiff_t n = tokenizer_encode(t, buf, len, ids, sizeof ids / sizeof ids[0], NULL);
        cr_assert_eq(n, (ptrdiff_t)len);
        for (size_t i = 0; i < len; i++)
            cr_assert_eq(ids[i], buf[i]);
        assert_roundtrip(t, buf, len);
    }
    tokenizer_destroy(&t);
    cr_assert_null(t);
    tokenizer_destroy(&t);
}

Test(tokenizer_byte, decodes_specials_and_rejects_unknown_ids) {
    tokenizer_t *t = tokenizer_new_byte();
    const int32_t ids[] = {256, 'a', 0, 257, 258, 0xFF};
    char out[64];
    ptrdiff_t n = tokenizer_decode(t, ids, 6, 0, out, sizeof out, NULL);
    const char want[] = "<|bos|>a\0<|eos|><|pad|>\xFF";
    cr_assert_eq(n, (ptrdiff_t)(sizeof want - 1));
    cr_assert_eq(memcmp(out, want, sizeof want - 1), 0);
    n = tokenizer_decode(t, ids, 6, TOKENIZER_DECODE_SKIP_SPECIAL, out, sizeof out, NULL);
    cr_assert_eq(n, 3);
    cr_assert_eq(memcmp(out, "a\0\xFF", 3), 0);
    cr_assert(tokenizer_is_special(t, 256) && tokenizer_is_special(t, 258));
    cr_assert(!tokenizer_is_special(t, 0) && !tokenizer_is_special(t, 259));

    /* snprintf-style: a short buffer gets a prefix, the return value is the full length. */
    n = tokenizer_decode(t, ids, 6, 0, out, 3, NULL);
    cr_assert_eq(n, (ptrdiff_t)(sizeof want - 1));
    cr_assert_eq(memcmp(out, "<|b", 3), 0);
    int32_t few[2];
    cr_assert_eq(tokenizer_encode(t, "hello", 5, few, 2, NULL), 5);
    cr_assert(few[0] == 'h' && few[1] == 'e');

    const int32_t bad[] = {'a', 'b', 259};
    qerr_t err = {0};
    cr_assert_eq(tokenizer_decode(t, bad, 3, 0, out, sizeof out, &err), -1);
    cr_assert_eq(err.code, QERR_RANGE);
    cr_assert(strstr(err.msg, "id 259") && strstr(err.msg, "position 2"), "%s", err.msg);
    const int32_t neg[] = {-1};
    cr_assert_eq(tokenizer_decode(t, neg, 1, 0, out, sizeof out, &err), -1);
    cr_assert(strstr(err.msg, "id -1") && strstr(err.msg, "position 0"), "%s", err.msg);
    tokenizer_destroy(&t);
}

/* ---- b. GPT-2 reference ids ---------------------------------------------------------------- */

/* Checks every line {"text", "ids"} of a golden file; returns the number of lines. */
static int golden_check(const tokenizer_t *t, const char *path) {
    FILE *f = fopen(path, "r");
    cr_assert_not_null(f, "cannot open %s", path);
    char line[1 << 16];
    int count = 0;
    tokenizer_ids_t ids;
    tokenizer_text_t text;
    tokenizer_ids_init(&ids);
    tokenizer_text_init(&text);
    while (fgets(line, sizeof line, f)) {
        json_error_t je;
        json_t *o = json_loads(line, JSON_ALLOW_NUL, &je);
        cr_assert_not_null(o, "%s:%d: %s", path, count + 1, je.text);
        const char *s = json_string_value(json_object_get(o, "text"));
        size_t len = json_string_length(json_object_get(o, "text"));
        json_t *want = json_object_get(o, "ids");
        cr_assert(s && json_is_array(want), "%s:%d: needs text and ids", path, count + 1);
        encode_all(t, s, len, &ids);
        cr_assert_eq(ids.len, json_array_size(want), "%s:%d: %zu ids, reference %zu", path,
                     count + 1, ids.len, json_array_size(want));
        for (size_t i = 0; i < ids.len; i++)
            cr_assert_eq(ids.data[i], json_integer_value(json_array_get(want, i)),
                         "%s:%d: id %zu is %d, reference %d", path, count + 1, i, ids.data[i],
                         (int)json_integer_value(json_array_get(want, i)));
        text.len = 0;
        cr_assert_eq(tokenizer_decode_append(t, ids.data, ids.len, 0, &text, NULL), 0);
        cr_assert(text.len == len && memcmp(text.data, s, len) == 0, "%s:%d: decode differs", path,
                  count + 1);
        json_decref(o);
        count++;
    }
    fclose(f);
    tokenizer_ids_free(&ids);
    tokenizer_text_free(&text);
    return count;
}

Test(tokenizer_gpt2, reproduces_golden_ids) {
    tokenizer_t *t = gpt2_or_skip();
    cr_assert_eq(tokenizer_kind(t), TOKENIZER_KIND_GPT2_BPE);
    cr_assert_eq(tokenizer_vocab_size(t), 50257);
    cr_assert_eq(tokenizer_bos_id(t), 50256);
    cr_assert_eq(tokenizer_eos_id(t), 50256);
    cr_assert_eq(tokenizer_pad_id(t), 50256);
    cr_assert(tokenizer_is_special(t, 50256) && !tokenizer_is_special(t, 50255));
    cr_assert_gt(golden_check(t, GPT2_GOLDEN), 0);
    tokenizer_destroy(&t);
}

Test(tokenizer_gpt2, reproduces_extra_golden_ids) {
    tokenizer_t *t = gpt2_or_skip();
    cr_assert_gt(golden_check(t, EXTRA_GOLDEN), 100);
    tokenizer_destroy(&t);
}

Test(tokenizer_gpt2, special_text_is_ordinary_and_decodes) {
    tokenizer_t *t = gpt2_or_skip();
    tokenizer_ids_t ids;
    tokenizer_ids_init(&ids);
    encode_all(t, "<|endoftext|>", 13, &ids);
    cr_assert_gt(ids.len, 1);
    for (size_t i = 0; i < ids.len; i++)
        cr_assert_neq(ids.data[i], 50256);
    const int32_t eot[] = {50256, 15496, 50256};
    char out[64];
    ptrdiff_t n = tokenizer_decode(t, eot, 3, 0, out, sizeof out, NULL);
    cr_assert_eq(n, 31);
    cr_assert_eq(memcmp(out, "<|endoftext|>Hello<|endoftext|>", 31), 0);
    cr_assert_eq(tokenizer_decode(t, eot, 3, TOKENIZER_DECODE_SKIP_SPECIAL, out, sizeof out, NULL),
                 5);
    const int32_t bad[] = {15496, 50257};
    qerr_t err = {0};
    cr_assert_eq(tokenizer_decode(t, bad, 2, 0, out, sizeof out, &err), -1);
    cr_assert(strstr(err.msg, "id 50257") && strstr(err.msg, "position 1"), "%s", err.msg);
    tokenizer_ids_free(&ids);
    tokenizer_destroy(&t);
}

/* ---- c. tokenizer.json built from vocab.json + merges.txt ---------------------------------- */

/* Writes a tokenizer.json with the vocab and merges of the given files; pairs selects the
 * newer [a, b] merge form. */
static const char *hf_write(const char *vocab_path, const char *merges_path, int pairs,
                            const char *name) {
    json_error_t je;
    json_t *vocab = json_load_file(vocab_path, 0, &je);
    cr_assert_not_null(vocab, "%s", je.text);
    json_t *merges = json_array();
    FILE *f = fopen(merges_path, "r");
    cr_assert_not_null(f);
    char line[1024];
    for (int lineno = 1; fgets(line, sizeof line, f); lineno++) {
        line[strcspn(line, "\r\n")] = '\0';
        if ((lineno == 1 && strncmp(line, "#version", 8) == 0) || !*line)
            continue;
        if (pairs) {
            char *sp = strchr(line, ' ');
            cr_assert_not_null(sp);
            *sp = '\0';
            json_array_append_new(merges, json_pack("[ss]", line, sp + 1));
        } else {
            json_array_append_new(merges, json_string(line));
        }
    }
    fclose(f);
    json_int_t eot = json_integer_value(json_object_get(vocab, "<|endoftext|>"));
    json_t *root = json_pack(
        "{s:s, s:[{s:I, s:s, s:b, s:b, s:b, s:b, s:b}], s:n, s:{s:s, s:b, s:b, s:b}, "
        "s:n, s:{s:s, s:b, s:b, s:b}, s:{s:s, s:n, s:n, s:s, s:s, s:b, s:b, s:o, s:o}}",
        "version", "1.0", "added_tokens", "id", eot, "content", "<|endoftext|>", "single_word", 0,
        "lstrip", 0, "rstrip", 0, "normalized", 1, "special", 1, "normalizer", "pre_tokenizer",
        "type", "ByteLevel", "add_prefix_space", 0, "trim_offsets", 1, "use_regex", 1,
        "post_processor", "decoder", "type", "ByteLevel", "add_prefix_space", 1, "trim_offsets", 1,
        "use_regex", 1, "model", "type", "BPE", "dropout", "unk_token", "continuing_subword_prefix",
        "", "end_of_word_suffix", "", "fuse_unk", 0, "byte_fallback", 0, "vocab", vocab, "merges",
        merges);
    cr_assert_not_null(root);
    const char *path = tmp_path(name);
    cr_assert_eq(json_dump_file(root, path, JSON_INDENT(2)), 0);
    json_decref(root);
    return path;
}

static void assert_same_encoding(const tokenizer_t *a, const tokenizer_t *b, const void *s,
                                 size_t len) {
    tokenizer_ids_t x, y;
    tokenizer_ids_init(&x);
    tokenizer_ids_init(&y);
    encode_all(a, s, len, &x);
    encode_all(b, s, len, &y);
    cr_assert_eq(x.len, y.len, "encodings differ in length (%zu vs %zu)", x.len, y.len);
    cr_assert(x.len == 0 || memcmp(x.data, y.data, x.len * sizeof *x.data) == 0,
              "encodings differ");
    tokenizer_ids_free(&x);
    tokenizer_ids_free(&y);
}

static void hf_compare(const tokenizer_t *files, const tokenizer_t *hf) {
    cr_assert_eq(tokenizer_vocab_size(files), tokenizer_vocab_size(hf));
    cr_assert_eq(tokenizer_eos_id(files), tokenizer_eos_id(hf));
    FILE *f = fopen(GPT2_GOLDEN, "r");
    cr_assert_not_null(f);
    char line[1 << 16];
    while (fgets(line, sizeof line, f)) {
        json_t *o = json_loads(line, JSON_ALLOW_NUL, NULL);
        cr_assert_not_null(o);
        json_t *s = json_object_get(o, "text");
        assert_same_encoding(files, hf, json_string_value(s), json_string_length(s));
        json_decref(o);
    }
    fclose(f);
    rng_stream_t r;
    rng_stream_init(&r, 7, 8, 9);
    uint8_t buf[600];
    for (int iter = 0; iter < 300; iter++) {
        size_t len = random_bytes(&r, buf, sizeof buf);
        assert_same_encoding(files, hf, buf, len);
    }
}

Test(tokenizer_hf_json, string_merges_encode_like_the_files, .init = tmp_setup,
     .fini = tmp_teardown) {
    tokenizer_t *files = gpt2_or_skip();
    qerr_t err = {0};
    tokenizer_t *hf = tokenizer_new_hf_json(hf_write(GPT2_VOCAB, GPT2_MERGES, 0, "t.json"), &err);
    cr_assert_not_null(hf, "%s", err.msg);
    hf_compare(files, hf);
    tokenizer_destroy(&hf);
    tokenizer_destroy(&files);
}

Test(tokenizer_hf_json, pair_merges_encode_like_the_files, .init = tmp_setup,
     .fini = tmp_teardown) {
    tokenizer_t *files = gpt2_or_skip();
    qerr_t err = {0};
    tokenizer_t *hf = tokenizer_new_hf_json(hf_write(GPT2_VOCAB, GPT2_MERGES, 1, "t.json"), &err);
    cr_assert_not_null(hf, "%s", err.msg);
    hf_compare(files, hf);
    tokenizer_destroy(&hf);
    tokenizer_destroy(&files);
}

Test(tokenizer_hf_json, added_tokens_extend_the_table, .init = tmp_setup, .fini = tmp_teardown) {
    json_t *v = toy_vocab();
    json_object_del(v, "<|endoftext|>");
    json_t *root = json_pack("{s:[{s:i, s:s, s:b}, {s:i, s:s, s:b}], s:{s:s}, s:{s:s, s:o, s:[s]}}",
                             "added_tokens", "id", 300, "content", "<|endoftext|>", "special", 1,
                             "id", 256, "content", "<extra>", "special", 0, "pre_tokenizer", "type",
                             "ByteLevel", "model", "type", "BPE", "vocab", v, "merges", "h e");
    cr_assert_not_null(root);
    cr_assert_eq(json_dump_file(root, tmp_path("a.json"), 0), 0);
    json_decref(root);
    qerr_t err = {0};
    tokenizer_t *t = tokenizer_new_hf_json(tmp_path("a.json"), &err);
    cr_assert_not_null(t, "%s", err.msg);
    cr_assert_eq(tokenizer_vocab_size(t), 301);
    cr_assert_eq(tokenizer_eos_id(t), 300);
    cr_assert(tokenizer_is_special(t, 300) && !tokenizer_is_special(t, 256));
    size_t len;
    const char *s = tokenizer_token_bytes(t, 256, &len);
    cr_assert(s && len == 7 && memcmp(s, "<extra>", 7) == 0);
    cr_assert_null(tokenizer_token_bytes(t, 299, &len), "a gap in the ids is not a token");
    const int32_t gap[] = {'a', 299};
    char out[16];
    cr_assert_eq(tokenizer_decode(t, gap, 2, 0, out, sizeof out, &err), -1);
    cr_assert(strstr(err.msg, "id 299") && strstr(err.msg, "position 1"), "%s", err.msg);
    tokenizer_destroy(&t);
}

/* ---- d. arbitrary bytes round-trip through BPE --------------------------------------------- */

static void roundtrip_random(const tokenizer_t *t, uint64_t seed, int iters) {
    rng_stream_t r;
    rng_stream_init(&r, seed, 0, 0);
    uint8_t buf[2000];
    for (int iter = 0; iter < iters; iter++)
        assert_roundtrip(t, buf, random_bytes(&r, buf, sizeof buf));
}

/* Each listed invalid sequence must give one byte token per byte, not a merged token. */
static void invalid_bytes_are_single_pieces(const tokenizer_t *t) {
    static const char *const invalid[] = {
        "\x80",     "\xC0\x80", "\xE0\x80\x80", "\xED\xA0\x80", "\xF4\x90\x80\x80",
        "\xFF\xFE", "\xE2\x82", "\xC3"};
    for (size_t k = 0; k < sizeof invalid / sizeof invalid[0]; k++) {
        size_t n = strlen(invalid[k]);
        int32_t ids[8];
        cr_assert_eq(tokenizer_encode(t, invalid[k], n, ids, 8, NULL), (ptrdiff_t)n);
        for (size_t i = 0; i < n; i++) {
            size_t len;
            const char *b = tokenizer_token_bytes(t, ids[i], &len);
            cr_assert(b && len == 1 && b[0] == invalid[k][i], "sequence %zu byte %zu", k, i);
        }
    }
}

static void long_pieces_roundtrip(const tokenizer_t *t) {
    size_t n = 20000;
    uint8_t *buf = malloc(n);
    cr_assert_not_null(buf);
    const char fills[] = {'a', ' ', '7', '!', '\n'};
    for (size_t k = 0; k < sizeof fills; k++) {
        memset(buf, fills[k], n);
        assert_roundtrip(t, buf, n);
    }
    for (size_t i = 0; i < n; i++)
        buf[i] = "hello"[i % 5];
    assert_roundtrip(t, buf, n);
    free(buf);
}

Test(tokenizer_bpe, toy_merges_follow_rank_order, .init = tmp_setup, .fini = tmp_teardown) {
    tokenizer_t *t = toy_new();
    cr_assert_eq(tokenizer_vocab_size(t), 262);
    cr_assert_eq(tokenizer_eos_id(t), 256);
    int32_t ids[16];
    /* "hello" -> he, l, l, o -> he, ll, o -> hell, o -> hello. */
    cr_assert_eq(tokenizer_encode(t, "hello", 5, ids, 16, NULL), 1);
    cr_assert_eq(ids[0], 261);
    /* " wor" is one piece: Ġ w merges, o and r stay bytes ('o' is 0x6F, 'r' 0x72). */
    cr_assert_eq(tokenizer_encode(t, "hell wor", 8, ids, 16, NULL), 4);
    cr_assert(ids[0] == 259 && ids[1] == 260 && ids[2] == 'o' && ids[3] == 'r');
    /* "heh" -> he, h: the leftmost pair wins a tie of equal rank ("hehe" -> he, he). */
    cr_assert_eq(tokenizer_encode(t, "hehe", 4, ids, 16, NULL), 2);
    cr_assert(ids[0] == 257 && ids[1] == 257);
    /* "lll": the leftmost "l l" merges first -> ll, l. */
    cr_assert_eq(tokenizer_encode(t, "lll", 3, ids, 16, NULL), 2);
    cr_assert(ids[0] == 258 && ids[1] == 'l');
    tokenizer_destroy(&t);
}

Test(tokenizer_bpe, toy_roundtrips_arbitrary_bytes, .init = tmp_setup, .fini = tmp_teardown) {
    tokenizer_t *t = toy_new();
    roundtrip_random(t, 11, 500);
    invalid_bytes_are_single_pieces(t);
    long_pieces_roundtrip(t);
    tokenizer_destroy(&t);
}

Test(tokenizer_gpt2, roundtrips_arbitrary_bytes) {
    tokenizer_t *t = gpt2_or_skip();
    roundtrip_random(t, 12, 1000);
    invalid_bytes_are_single_pieces(t);
    long_pieces_roundtrip(t);
    uint8_t all[256];
    for (int b = 0; b < 256; b++)
        all[b] = (uint8_t)b;
    assert_roundtrip(t, all, 256);
    tokenizer_destroy(&t);
}

/* Several threads share one tokenizer (and its word cache) and must agree with one thread. */
typedef struct {
    const tokenizer_t *t;
    uint64_t seed;
    int ok;
} thread_arg_t;

static void *encode_thread(void *p) {
    thread_arg_t *a = p;
    rng_stream_t r;
    uint8_t buf[500];
    a->ok = 1;
    for (int pass = 0; pass < 2; pass++) {
        rng_stream_init(&r, a->seed, 0, 0);
        for (int iter = 0; iter < 200; iter++) {
            size_t len = random_bytes(&r, buf, sizeof buf);
            int32_t ids[500];
            ptrdiff_t n = tokenizer_encode(a->t, buf, len, ids, 500, NULL);
            char out[500];
            if (n < 0 ||
                tokenizer_decode(a->t, ids, (size_t)n, 0, out, sizeof out, NULL) !=
                    (ptrdiff_t)len ||
                memcmp(out, buf, len) != 0)
                a->ok = 0;
        }
    }
    return NULL;
}

Test(tokenizer_gpt2, threads_share_one_tokenizer) {
    tokenizer_t *t = gpt2_or_skip();
    pthread_t th[4];
    thread_arg_t args[4];
    for (int i = 0; i < 4; i++) {
        args[i] = (thread_arg_t){t, (uint64_t)i % 2, 0};
        cr_assert_eq(pthread_create(&th[i], NULL, encode_thread, &args[i]), 0);
    }
    for (int i = 0; i < 4; i++) {
        pthread_join(th[i], NULL);
        cr_assert(args[i].ok, "thread %d", i);
    }
    tokenizer_destroy(&t);
}

/* ---- e. bad files -------------------------------------------------------------------------- */

/* Loads the given vocab (JSON text, or the toy vocab when NULL) and merges; expects failure
 * with code and every needle in the message. */
static void expect_files_error(const char *vocab_text, const char *merges, qerr_code_t code,
                               const char *needle1, const char *needle2) {
    if (vocab_text)
        tmp_write("v.json", vocab_text);
    else {
        json_t *v = toy_vocab();
        cr_assert_eq(json_dump_file(v, tmp_path("v.json"), JSON_COMPACT), 0);
        json_decref(v);
    }
    tmp_write("m.txt", merges);
    qerr_t err = {0};
    tokenizer_t *t = tokenizer_new_bpe_files(tmp_path("v.json"), tmp_path("m.txt"), &err);
    cr_assert_null(t, "loading should fail (%s / %s)", needle1, needle2);
    cr_assert_eq(err.code, code, "code %s, message: %s", qerr_code_name(err.code), err.msg);
    cr_assert(strstr(err.msg, needle1), "'%s' not in: %s", needle1, err.msg);
    cr_assert(!needle2 || strstr(err.msg, needle2), "'%s' not in: %s", needle2, err.msg);
}

/* The toy vocab with one change, as JSON text (static buffer). */
static const char *toy_vocab_with(const char *key, json_t *value) {
    static char text[1 << 16];
    json_t *v = toy_vocab();
    if (value)
        json_object_set_new(v, key, value);
    else
        json_object_del(v, key);
    char *s = json_dumps(v, JSON_COMPACT);
    cr_assert(s && strlen(s) < sizeof text);
    strcpy(text, s);
    free(s);
    json_decref(v);
    return text;
}

Test(tokenizer_errors, bad_vocab_files, .init = tmp_setup, .fini = tmp_teardown) {
    expect_files_error("{\"a\": 0,\n \"b\": }", TOY_MERGES, QERR_PARSE, "v.json:2:", NULL);
    expect_files_error("[1, 2]", TOY_MERGES, QERR_INVALID, "v.json", "JSON object");
    expect_files_error("{}", TOY_MERGES, QERR_INVALID, "v.json", "empty");
    expect_files_error("{\"a\": 1, \"a\": 2}", TOY_MERGES, QERR_PARSE, "v.json:1:", "duplicate");
    expect_files_error(toy_vocab_with("zz", json_integer(257)), TOY_MERGES, QERR_INVALID,
                       "both have id 257", NULL);
    expect_files_error(toy_vocab_with("zz", json_integer(-3)), TOY_MERGES, QERR_RANGE, "\"zz\"",
                       "out of range");
    expect_files_error(toy_vocab_with("zz", json_string("7")), TOY_MERGES, QERR_RANGE, "\"zz\"",
                       "not an integer");
    expect_files_error(toy_vocab_with("A", NULL), "", QERR_INVALID, "byte 0x41", "lacks");
    expect_files_error(toy_vocab_with("<|endoftext|>", NULL), "", QERR_INVALID, "<|endoftext|>",
                       NULL);
    expect_files_error(toy_vocab_with("\xE4\xB8\xAD", json_integer(900)), "", QERR_INVALID,
                       "U+4E2D", "byte alphabet");
    qerr_t err = {0};
    cr_assert_null(tokenizer_new_bpe_files(tmp_path("none.json"), tmp_path("m.txt"), &err));
    cr_assert_eq(err.code, QERR_IO);
    cr_assert(strstr(err.msg, "none.json"), "%s", err.msg);
}

Test(tokenizer_errors, bad_merges_files, .init = tmp_setup, .fini = tmp_teardown) {
    expect_files_error(NULL, "#version: 0.2\nh e\nq zz\n", QERR_INVALID,
                       "m.txt:3:", "\"zz\", which is not in vocab.json");
    expect_files_error(NULL, "h e\nx y\n", QERR_INVALID, "m.txt:2:", "gives \"xy\"");
    expect_files_error(NULL, "#version: 0.2\nh e\nhe\n", QERR_PARSE, "m.txt:3:", "two tokens");
    expect_files_error(NULL, "h e\nl  l\n", QERR_PARSE, "m.txt:2:", "two tokens");
    expect_files_error(NULL, "h e\nl l\nh e\n", QERR_INVALID, "m.txt:3:", "repeats merge number 1");
    qerr_t err = {0};
    json_t *v = toy_vocab();
    cr_assert_eq(json_dump_file(v, tmp_path("v.json"), 0), 0);
    json_decref(v);
    cr_assert_null(tokenizer_new_bpe_files(tmp_path("v.json"), tmp_path("none.txt"), &err));
    cr_assert_eq(err.code, QERR_IO);
    cr_assert(strstr(err.msg, "none.txt"), "%s", err.msg);
}

/* Writes a toy tokenizer.json where `patch` (a JSON object) overrides top-level members. */
static void expect_hf_error(const char *patch, const char *needle) {
    json_t *root = json_pack("{s:{s:s, s:b}, s:n, s:{s:s, s:o, s:[s, [s, s]]}}", "pre_tokenizer",
                             "type", "ByteLevel", "add_prefix_space", 0, "normalizer", "model",
                             "type", "BPE", "vocab", toy_vocab(), "merges", "h e", "l", "l");
    cr_assert_not_null(root);
    json_t *p = json_loads(patch, 0, NULL);
    cr_assert_not_null(p, "bad patch %s", patch);
    json_object_update(root, p);
    json_decref(p);
    cr_assert_eq(json_dump_file(root, tmp_path("t.json"), JSON_INDENT(1)), 0);
    json_decref(root);
    qerr_t err = {0};
    tokenizer_t *t = tokenizer_new_hf_json(tmp_path("t.json"), &err);
    cr_assert_null(t, "patch %s should fail", patch);
    cr_assert(strstr(err.msg, "t.json") && strstr(err.msg, needle), "'%s' not in: %s", needle,
              err.msg);
}

Test(tokenizer_errors, bad_tokenizer_json, .init = tmp_setup, .fini = tmp_teardown) {
    /* The unpatched file loads: the failures below come from the patches. */
    json_t *root =
        json_pack("{s:{s:s}, s:{s:s, s:o, s:[s, [s, s]]}}", "pre_tokenizer", "type", "ByteLevel",
                  "model", "type", "BPE", "vocab", toy_vocab(), "merges", "h e", "l", "l");
    cr_assert_eq(json_dump_file(root, tmp_path("ok.json"), 0), 0);
    json_decref(root);
    qerr_t err = {0};
    tokenizer_t *t = tokenizer_new_hf_json(tmp_path("ok.json"), &err);
    cr_assert_not_null(t, "%s", err.msg);
    tokenizer_destroy(&t);

    expect_hf_error("{\"model\": 3}", "no \"model\" object");
    expect_hf_error("{\"model\": {\"type\": \"WordPiece\", \"vocab\": {}}}", "model.type");
    expect_hf_error("{\"pre_tokenizer\": {\"type\": \"Whitespace\"}}", "ByteLevel");
    expect_hf_error("{\"pre_tokenizer\": {\"type\": \"ByteLevel\", \"add_prefix_space\": true}}",
                    "add_prefix_space");
    expect_hf_error("{\"normalizer\": {\"type\": \"NFC\"}}", "normalizer");
    expect_hf_error("{\"added_tokens\": [{\"id\": 5, \"content\": \"<|endoftext|>\"}]}",
                    "model.vocab gives 256");
    expect_hf_error("{\"added_tokens\": [{\"id\": 5, \"content\": \"<new>\"}]}",
                    "already the id of");
    expect_hf_error("{\"added_tokens\": [{\"content\": \"<new>\"}]}", "added_tokens[0]");
    tmp_write("t.json", "{\"model\": {\"vocab\": {\"a\": 1}, \"merges\": [\"a b\",]}}");
    cr_assert_null(tokenizer_new_hf_json(tmp_path("t.json"), &err));
    cr_assert_eq(err.code, QERR_PARSE);
    cr_assert(strstr(err.msg, "t.json:1:"), "%s", err.msg);
}

Test(tokenizer_errors, bad_tokenizer_json_merges, .init = tmp_setup, .fini = tmp_teardown) {
    static const char *const cases[][2] = {
        {"[\"h e\", \"h\"]", "model.merges[1] is neither"},
        {"[\"h e\", [\"l\"]]", "model.merges[1] is neither"},
        {"[\"h e\", [\"l\", 3]]", "model.merges[1] is neither"},
        {"[\"h e\", \"l zz\"]", "model.merges[1]: merge \"l zz\" names \"zz\""},
        {"[\"h e\", \"h e\"]", "model.merges[1]: merge \"h e\" repeats merge number 1"},
        {"{\"h\": \"e\"}", "model.merges is not an array"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        json_t *merges = json_loads(cases[i][0], 0, NULL);
        cr_assert_not_null(merges);
        json_t *root = json_pack("{s:{s:s}, s:{s:o, s:o}}", "pre_tokenizer", "type", "ByteLevel",
                                 "model", "vocab", toy_vocab(), "merges", merges);
        cr_assert_eq(json_dump_file(root, tmp_path("t.json"), 0), 0);
        json_decref(root);
        qerr_t err = {0};
        cr_assert_null(tokenizer_new_hf_json(tmp_path("t.json"), &err), "case %zu", i);
        cr_assert(strstr(err.msg, cases[i][1]), "'%s' not in: %s", cases[i][1], err.msg);
    }
}

Test(tokenizer_config, builds_what_the_model_config_names, .init = tmp_setup,
     .fini = tmp_teardown) {
    model_tokenizer_config_t cfg = {.kind = MODEL_TOKENIZER_BYTE};
    qerr_t err = {0};
    tokenizer_t *t = tokenizer_new_for_config(&cfg, &err);
    cr_assert_not_null(t, "byte: %s", err.msg);
    cr_assert_eq(tokenizer_kind(t), TOKENIZER_KIND_BYTE);
    tokenizer_destroy(&t);

    cfg.kind = MODEL_TOKENIZER_GPT2;
    t = tokenizer_new_for_config(&cfg, &err);
    cr_assert_null(t, "a gpt2 config without files gave a tokenizer");
    cr_assert_eq(err.code, QERR_NOTFOUND);
    cr_assert(strstr(err.msg, "model.tokenizer") != NULL, "message: %s", err.msg);

    json_t *v = toy_vocab();
    toy_write("toy_vocab.json", "toy_merges.txt", v, TOY_MERGES);
    json_decref(v);
    snprintf(cfg.vocab, sizeof cfg.vocab, "%s", tmp_path("toy_vocab.json"));
    snprintf(cfg.merges, sizeof cfg.merges, "%s", tmp_path("toy_merges.txt"));
    t = tokenizer_new_for_config(&cfg, &err);
    cr_assert_not_null(t, "vocab + merges: %s", err.msg);
    cr_assert_eq(tokenizer_kind(t), TOKENIZER_KIND_GPT2_BPE);
    cr_assert_eq(tokenizer_vocab_size(t), 262);
    tokenizer_destroy(&t);

    snprintf(cfg.json, sizeof cfg.json, "%s", tmp_path("missing_tokenizer.json"));
    t = tokenizer_new_for_config(&cfg, &err);
    cr_assert_null(t, "json takes precedence: a missing tokenizer.json must fail");
}
