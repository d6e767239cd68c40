/* bench_tokenizer: single-thread encode speed (MB/s, 1 MB = 10^6 bytes) of the byte-level and
 * GPT-2 BPE tokenizers.
 *
 *   bench_tokenizer [--vocab F --merges F] [--mb N] [--reps N] [FILE...]
 *
 * The text is the given files concatenated, or by default a generated mix: the lines of
 * ../shared/data/gpt2/golden.jsonl interleaved with pseudo-English words (Zipf-like
 * frequencies), numbers and punctuation from a fixed seed; either is repeated up to --mb megabytes
 * (default 8). Each tokenizer encodes the whole text --reps times (default 5) after one warm-up
 * pass; the best pass is reported. Results go in bench/RESULTS.md. */
#include "rng.h"
#include "tokenizer.h"

#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define GPT2_DIR QUILLAN_SHARED_DIR "/data/gpt2"

typedef struct {
    char *data;
    size_t len, cap;
} buf_t;

static void buf_add(buf_t *b, const char *s, size_t n) {
    if (b->len + n > b->cap) {
        size_t cap = b->cap ? b->cap : 1 << 20;
        while (cap < b->len + n)
            cap *= 2;
        b->data = realloc(b->data, cap);
        if (!b->data) {
            fprintf(stderr, "bench_tokenizer: out of memory\n");
            exit(1);
        }
        b->cap = cap;
    }
    memcpy(b->data + b->len, s, n);
    b->len += n;
}

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* The texts of a golden.jsonl file; returns the count (0 when the file is absent). */
static size_t golden_texts(const char *path, char ***out) {
    FILE *f = fopen(path, "r");
    size_t n = 0;
    *out = NULL;
    if (!f)
        return 0;
    char line[1 << 16];
    while (fgets(line, sizeof line, f)) {
        json_t *o = json_loads(line, 0, NULL);
        const char *s = json_string_value(json_object_get(o, "text"));
        if (s) {
            *out = realloc(*out, (n + 1) * sizeof **out);
            if (!*out || !((*out)[n] = strdup(s))) {
                fprintf(stderr, "bench_tokenizer: out of memory\n");
                exit(1);
            }
            n++;
        }
        json_decref(o);
    }
    fclose(f);
    return n;
}

/* Generated text: the golden lines interleaved with sentences of pseudo-words (syllable
 * strings) drawn from a 20000-word lexicon with Zipf-like frequencies (P(rank r) ~ 1/r, as in
 * natural text, so the word cache sees a realistic mix of hits and misses), plus numbers and
 * punctuation. */
#define LEXICON 20000

static void text_generate(buf_t *b, size_t target) {
    static const char *const syl[] = {"th", "e",   "an",   "re", "in", "on", "er", "at", "st",
                                      "en", "ing", "ion",  "al", "ou", "ex", "pl", "qu", "tr",
                                      "ch", "ly",  "ment", "or", "is", "co", "de", "ma"};
    static const char *const punct[] = {".",  ",",    ";",  ":",     "!",   "?",
                                        "\n", "\n\n", " (", ")",     " \"", "\"",
                                        "'s", "'ll",  " -", " 1999", " 42", " 3.14"};
    static char lexicon[LEXICON][24];
    rng_stream_t r;
    rng_stream_init(&r, 0x544F4B, 1, 2);
    for (int w = 0; w < LEXICON; w++) {
        uint64_t y = rng_stream_next_u64(&r);
        lexicon[w][0] = '\0';
        for (int k = 0; k < 1 + (int)(y % 4); k++)
            strcat(lexicon[w], syl[(y >> (8 + 5 * k)) % (sizeof syl / sizeof syl[0])]);
        if (y >> 60 == 0)
            lexicon[w][0] = (char)(lexicon[w][0] - 'a' + 'A');
    }
    char **golden;
    size_t n_golden = golden_texts(GPT2_DIR "/golden.jsonl", &golden);
    while (b->len < target) {
        uint64_t x = rng_stream_next_u64(&r);
        if (n_golden && x % 8 == 0) {
            const char *s = golden[(x >> 8) % n_golden];
            buf_add(b, s, strlen(s));
            buf_add(b, "\n", 1);
            continue;
        }
        for (int w = 0; w < 12; w++) {
            uint64_t y = rng_stream_next_u64(&r);
            /* Rank exp(u ln N) - 1 is log-uniform: P(rank r) ~ 1/r. */
            double u = (double)(y >> 11) / 9007199254740992.0;
            size_t rank = (size_t)exp(u * log((double)LEXICON)) - 1;
            buf_add(b, " ", 1);
            buf_add(b, lexicon[rank], strlen(lexicon[rank]));
            if ((y & 0xFF) % 5 == 0) {
                const char *p = punct[((y >> 8) & 0xFF) % (sizeof punct / sizeof punct[0])];
                buf_add(b, p, strlen(p));
            }
        }
    }
    for (size_t i = 0; i < n_golden; i++)
        free(golden[i]);
    free(golden);
}

static void text_from_files(buf_t *b, char **files, int n, size_t target) {
    buf_t once = {0};
    for (int i = 0; i < n; i++) {
        FILE *f = fopen(files[i], "rb");
        if (!f) {
            fprintf(stderr, "bench_tokenizer: cannot open %s\n", files[i]);
            exit(1);
        }
        char chunk[1 << 16];
        size_t got;
        while ((got = fread(chunk, 1, sizeof chunk, f)) > 0)
            buf_add(&once, chunk, got);
        fclose(f);
    }
    if (once.len == 0) {
        fprintf(stderr, "bench_tokenizer: the input files are empty\n");
        exit(1);
    }
    while (b->len < target)
        buf_add(b, once.data, once.len);
    free(once.data);
}

static void bench(const char *name, const tokenizer_t *t, const buf_t *text, int reps) {
    tokenizer_ids_t ids;
    tokenizer_ids_init(&ids);
    qerr_t err = {0};
    double best = 1e300;
    for (int rep = -1; rep < reps; rep++) {
        ids.len = 0;
        double t0 = now_s();
        if (tokenizer_encode_append(t, text->data, text->len, &ids, &err) < 0) {
            fprintf(stderr, "bench_tokenizer: %s: %s\n", name, err.msg);
            exit(1);
        }
        double dt = now_s() - t0;
        if (rep >= 0 && dt < best)
            best = dt;
    }
    printf("%-9s %8.2f MB  %10zu ids  %6.3f bytes/id  best of %d: %8.4f s  %9.2f MB/s  %7.2f "
           "M ids/s\n",
           name, (double)text->len / 1e6, ids.len, (double)text->len / (double)ids.len, reps, best,
           (double)text->len / 1e6 / best, (double)ids.len / 1e6 / best);
    tokenizer_ids_free(&ids);
}

int main(int argc, char **argv) {
    const char *vocab = GPT2_DIR "/vocab.json", *merges = GPT2_DIR "/merges.txt";
    double mb = 8;
    int reps = 5, n_files = 0;
    char **files = calloc((size_t)argc, sizeof *files);
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--vocab") == 0 && i + 1 < argc)
            vocab = argv[++i];
        else if (strcmp(argv[i], "--merges") == 0 && i + 1 < argc)
            merges = argv[++i];
        else if (strcmp(argv[i], "--mb") == 0 && i + 1 < argc)
            mb = atof(argv[++i]);
        else if (strcmp(argv[i], "--reps") == 0 && i + 1 < argc)
            reps = atoi(argv[++i]);
        else if (argv[i][0] == '-') {
            fprintf(stderr, "usage: bench_tokenizer [--vocab F --merges F] [--mb N] [--reps N] "
                            "[FILE...]\n");
            return 2;
        } else
            files[n_files++] = argv[i];
    }
    if (mb <= 0 || mb > 4096 || reps < 1) {
        fprintf(stderr, "bench_tokenizer: --mb must be in (0, 4096] and --reps >= 1\n");
        return 2;
    }
    buf_t text = {0};
    size_t target = (size_t)(mb * 1e6);
    if (n_files)
        text_from_files(&text, files, n_files, target);
    else
        text_generate(&text, target);
    printf("text: %s, %zu bytes\n", n_files ? "files" : "generated mix", text.len);

    tokenizer_t *byte = tokenizer_new_byte();
    if (!byte)
        return 1;
    bench("byte", byte, &text, reps);
    tokenizer_destroy(&byte);

    qerr_t err = {0};
    tokenizer_t *bpe = tokenizer_new_bpe_files(vocab, merges, &err);
    if (!bpe) {
        printf("gpt2-bpe  skipped: %s\n", err.msg);
    } else {
        bench("gpt2-bpe", bpe, &text, reps);
        tokenizer_destroy(&bpe);
    }
    free(text.data);
    free(files);
    return 0;
}
