/* quillan tokenize: encode text to ids, or decode ids to text, with the byte-level tokenizer or
 * a GPT-2 BPE one. */
#include "cli.h"
#include "tokenizer.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static void usage(FILE *out) {
    fprintf(out,
            "usage: quillan tokenize [--vocab FILE --merges FILE | --tokenizer-json FILE]\n"
            "                        [--decode [--skip-special]] [TEXT | --file FILE]\n\n"
            "Encodes TEXT (or the bytes of FILE; '-' or neither reads standard input) and prints\n"
            "the token ids, space separated. With --decode the input is ids (separated by spaces,\n"
            "commas or newlines) and the decoded bytes are written as they are.\n"
            "The tokenizer is byte-level (ids 0-255, BOS 256, EOS 257, PAD 258) unless GPT-2 BPE\n"
            "files are given. Encoding adds no BOS or EOS.\n\n"
            "options:\n"
            "  --vocab FILE           GPT-2 vocab.json (with --merges)\n"
            "  --merges FILE          GPT-2 merges.txt (with --vocab)\n"
            "  --tokenizer-json FILE  Hugging Face tokenizer.json (BPE model, ByteLevel)\n"
            "  --decode               decode ids instead of encoding text\n"
            "  --skip-special         with --decode: special tokens give no text\n"
            "  --file FILE            read the input from FILE ('-': standard input)\n"
            "  -h, --help             show this help\n\n"
            "exit status: 0 ok, 1 runtime error (bad file, bad id), 2 usage error\n");
}

typedef struct {
    const char *vocab, *merges, *hf_json, *file, *text;
    int decode, skip_special;
} opts_t;

/* Returns 0, 1 when --help was asked, or 2 on a usage error (already reported). */
static int opts_parse(int argc, char **argv, opts_t *o) {
    int only_positional = 0;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        const char **slot = NULL;
        if (!only_positional && a[0] == '-' && a[1] != '\0') {
            if (strcmp(a, "--") == 0) {
                only_positional = 1;
                continue;
            }
            if (strcmp(a, "-h") == 0 || strcmp(a, "--help") == 0)
                return 1;
            if (strcmp(a, "--decode") == 0) {
                o->decode = 1;
                continue;
            }
            if (strcmp(a, "--skip-special") == 0) {
                o->skip_special = 1;
                continue;
            }
            if (strcmp(a, "--vocab") == 0)
                slot = &o->vocab;
            else if (strcmp(a, "--merges") == 0)
                slot = &o->merges;
            else if (strcmp(a, "--tokenizer-json") == 0)
                slot = &o->hf_json;
            else if (strcmp(a, "--file") == 0)
                slot = &o->file;
            if (!slot) {
                fprintf(stderr, "quillan tokenize: unknown option '%s'\n", a);
                return 2;
            }
            if (i + 1 >= argc) {
                fprintf(stderr, "quillan tokenize: %s needs a value\n", a);
                return 2;
            }
            *slot = argv[++i];
            continue;
        }
        if (o->text) {
            fprintf(stderr, "quillan tokenize: more than one TEXT ('%s'); quote the text\n", a);
            return 2;
        }
        o->text = a;
    }
    if (o->text && o->file) {
        fprintf(stderr, "quillan tokenize: give TEXT or --file, not both\n");
        return 2;
    }
    if (!o->vocab != !o->merges) {
        fprintf(stderr, "quillan tokenize: --vocab and --merges go together\n");
        return 2;
    }
    if (o->vocab && o->hf_json) {
        fprintf(stderr, "quillan tokenize: give --vocab/--merges or --tokenizer-json, not both\n");
        return 2;
    }
    if (o->skip_special && !o->decode) {
        fprintf(stderr, "quillan tokenize: --skip-special needs --decode\n");
        return 2;
    }
    return 0;
}

/* Reads all of f into a NUL-terminated buffer; NULL on failure (reported). */
static char *stream_read(FILE *f, const char *name, size_t *len) {
    size_t cap = 1 << 16, n = 0;
    char *buf = malloc(cap);
    while (buf) {
        n += fread(buf + n, 1, cap - 1 - n, f);
        if (n < cap - 1)
            break;
        char *p = realloc(buf, cap * 2);
        if (!p) {
            free(buf);
            buf = NULL;
            break;
        }
        buf = p;
        cap *= 2;
    }
    if (!buf) {
        fprintf(stderr, "quillan tokenize: %s: out of memory\n", name);
        return NULL;
    }
    if (ferror(f)) {
        fprintf(stderr, "quillan tokenize: %s: read error: %s\n", name, strerror(errno));
        free(buf);
        return NULL;
    }
    buf[n] = '\0';
    *len = n;
    return buf;
}

static char *input_read(const opts_t *o, size_t *len) {
    if (o->text) {
        char *s = strdup(o->text);
        if (!s)
            fprintf(stderr, "quillan tokenize: out of memory\n");
        *len = strlen(o->text);
        return s;
    }
    if (!o->file || strcmp(o->file, "-") == 0)
        return stream_read(stdin, "standard input", len);
    FILE *f = fopen(o->file, "rb");
    if (!f) {
        fprintf(stderr, "quillan tokenize: %s: cannot open: %s\n", o->file, strerror(errno));
        return NULL;
    }
    char *s = stream_read(f, o->file, len);
    fclose(f);
    return s;
}

/* Parses ids separated by spaces, commas or newlines; returns 0, or 1 after reporting. */
static int ids_parse(const char *s, tokenizer_ids_t *ids) {
    size_t index = 0;
    for (const char *p = s;;) {
        while (*p == ' ' || *p == ',' || *p == '\t' || *p == '\n' || *p == '\r')
            p++;
        if (!*p)
            return 0;
        char *end;
        errno = 0;
        long v = strtol(p, &end, 10);
        size_t tok_len = strcspn(p, " ,\t\n\r");
        if (end != p + tok_len || errno || v < INT32_MIN || v > INT32_MAX) {
            fprintf(stderr, "quillan tokenize: input id %zu ('%.*s') is not a 32-bit integer\n",
                    index, (int)(tok_len < 40 ? tok_len : 40), p);
            return 1;
        }
        if (ids->len == ids->cap) {
            size_t cap = ids->cap ? 2 * ids->cap : 256;
            int32_t *d = realloc(ids->data, cap * sizeof *d);
            if (!d) {
                fprintf(stderr, "quillan tokenize: out of memory\n");
                return 1;
            }
            ids->data = d;
            ids->cap = cap;
        }
        ids->data[ids->len++] = (int32_t)v;
        index++;
        p = end;
    }
}

static int run_decode(const tokenizer_t *t, const opts_t *o, const char *input) {
    tokenizer_ids_t ids;
    tokenizer_text_t text;
    tokenizer_ids_init(&ids);
    tokenizer_text_init(&text);
    qerr_t err = {0};
    int rc = ids_parse(input, &ids);
    if (rc == 0 && tokenizer_decode_append(t, ids.data, ids.len,
                                           o->skip_special ? TOKENIZER_DECODE_SKIP_SPECIAL : 0,
                                           &text, &err) < 0) {
        fprintf(stderr, "quillan tokenize: %s\n", err.msg);
        rc = 1;
    }
    if (rc == 0 && text.len && fwrite(text.data, 1, text.len, stdout) != text.len)
        rc = 1;
    tokenizer_ids_free(&ids);
    tokenizer_text_free(&text);
    return rc;
}

static int run_encode(const tokenizer_t *t, const char *input, size_t len) {
    tokenizer_ids_t ids;
    tokenizer_ids_init(&ids);
    qerr_t err = {0};
    int rc = 0;
    if (tokenizer_encode_append(t, input, len, &ids, &err) < 0) {
        fprintf(stderr, "quillan tokenize: %s\n", err.msg);
        rc = 1;
    } else {
        for (size_t i = 0; i < ids.len; i++)
            printf(i ? " %d" : "%d", (int)ids.data[i]);
        printf("\n");
    }
    tokenizer_ids_free(&ids);
    return rc;
}

int cli_tokenize_main(int argc, char **argv) {
    opts_t o = {0};
    int prc = opts_parse(argc, argv, &o);
    if (prc == 1) {
        usage(stdout);
        return 0;
    }
    if (prc) {
        fprintf(stderr, "Run 'quillan tokenize --help' for usage.\n");
        return 2;
    }
    qerr_t err = {0};
    tokenizer_t *t = o.hf_json ? tokenizer_new_hf_json(o.hf_json, &err)
                     : o.vocab ? tokenizer_new_bpe_files(o.vocab, o.merges, &err)
                               : tokenizer_new_byte();
    if (!t) {
        fprintf(stderr, "quillan tokenize: %s\n", err.msg[0] ? err.msg : "out of memory");
        return 1;
    }
    size_t len = 0;
    char *input = input_read(&o, &len);
    int rc = 1;
    if (input)
        rc = o.decode ? run_decode(t, &o, input) : run_encode(t, input, len);
    if (fflush(stdout) != 0) {
        fprintf(stderr, "quillan tokenize: writing the output: %s\n", strerror(errno));
        rc = 1;
    }
    free(input);
    tokenizer_destroy(&t);
    return rc;
}
