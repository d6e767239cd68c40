/* safetensors reader and writer: round trips of every dtype, an independent Python reader,
 * one test per class of corrupt file, and crash safety of the atomic writer checked by
 * SIGKILLing a real writer process mid-write. */
#include <criterion/criterion.h>

#include "json.h"
#include "safetensors.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define PYTHON "/usr/bin/python3"
#define CHECKER QUILLAN_SOURCE_DIR "/tests/tools/safetensors_check.py"

/* ---- helpers ----------------------------------------------------------------------------- */

static char tmpdir[256];

static void tmpdir_make(void) {
    snprintf(tmpdir, sizeof tmpdir, "/tmp/quillan-st-XXXXXX");
    cr_assert_not_null(mkdtemp(tmpdir), "mkdtemp: %s", strerror(errno));
}

static void tmpdir_remove(void) {
    DIR *d = opendir(tmpdir);
    if (!d)
        return;
    struct dirent *e;
    char p[512];
    while ((e = readdir(d))) {
        if (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0)
            continue;
        snprintf(p, sizeof p, "%s/%s", tmpdir, e->d_name);
        unlink(p);
    }
    closedir(d);
    rmdir(tmpdir);
}

/* tmpdir/name in a rotating buffer: at most 16 results are alive at once. */
static const char *tpath(const char *name) {
    static char p[16][1024];
    static int k;
    k = (k + 1) % 16;
    snprintf(p[k], sizeof p[k], "%s/%s", tmpdir, name);
    return p[k];
}

static void file_put(const char *path, const void *data, size_t len) {
    FILE *f = fopen(path, "wb");
    cr_assert_not_null(f);
    cr_assert_eq(fwrite(data, 1, len, f), len);
    cr_assert_eq(fclose(f), 0);
}

/* Whole file in a malloc'd buffer; *len gets its size. */
static unsigned char *file_get(const char *path, size_t *len) {
    FILE *f = fopen(path, "rb");
    cr_assert_not_null(f, "open %s: %s", path, strerror(errno));
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    unsigned char *b = malloc(n > 0 ? (size_t)n : 1);
    cr_assert_eq(fread(b, 1, (size_t)n, f), (size_t)n);
    fclose(f);
    *len = (size_t)n;
    return b;
}

/* Names in tmpdir that look like our temporary files. */
static int count_tmp_files(void) {
    DIR *d = opendir(tmpdir);
    cr_assert_not_null(d);
    int n = 0;
    struct dirent *e;
    while ((e = readdir(d))) {
        size_t l = strlen(e->d_name);
        if (e->d_name[0] == '.' && l > 4 && strcmp(e->d_name + l - 4, ".tmp") == 0)
            n++;
    }
    closedir(d);
    return n;
}

/* Sets the modification time of every temporary file in tmpdir to age_s seconds ago. */
static void tmp_files_age(long age_s) {
    DIR *d = opendir(tmpdir);
    cr_assert_not_null(d);
    const struct timespec t[2] = {{time(NULL) - age_s, 0}, {time(NULL) - age_s, 0}};
    struct dirent *e;
    while ((e = readdir(d))) {
        size_t l = strlen(e->d_name);
        if (e->d_name[0] == '.' && l > 4 && strcmp(e->d_name + l - 4, ".tmp") == 0)
            cr_assert_eq(utimensat(dirfd(d), e->d_name, t, 0), 0);
    }
    closedir(d);
}

/* Size of the first temporary file in tmpdir, or -1 when there is none. */
static long long tmp_file_size(void) {
    DIR *d = opendir(tmpdir);
    cr_assert_not_null(d);
    long long size = -1;
    struct dirent *e;
    while ((e = readdir(d))) {
        size_t l = strlen(e->d_name);
        if (e->d_name[0] == '.' && l > 4 && strcmp(e->d_name + l - 4, ".tmp") == 0) {
            char p[512];
            struct stat st;
            snprintf(p, sizeof p, "%s/%s", tmpdir, e->d_name);
            if (stat(p, &st) == 0)
                size = st.st_size;
            break;
        }
    }
    closedir(d);
    return size;
}

static int python_available(void) {
    return access(PYTHON, X_OK) == 0;
}

/* Runs the independent checker; returns its exit status and leaves its output in *out. */
static int run_checker(const char *file, const char *expect, char *out, size_t cap) {
    char cmd[2048], log[512];
    snprintf(log, sizeof log, "%s/checker.out", tmpdir);
    snprintf(cmd, sizeof cmd, "'%s' '%s' '%s' %s%s%s --quillan > '%s' 2>&1", PYTHON, CHECKER, file,
             expect ? "'" : "", expect ? expect : "", expect ? "'" : "", log);
    int st = system(cmd);
    size_t n;
    unsigned char *o = file_get(log, &n);
    snprintf(out, cap, "%.*s", (int)n, (const char *)o);
    free(o);
    return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}

/* ---- dtypes ------------------------------------------------------------------------------ */

Test(safetensors, dtype_table) {
    static const struct {
        const char *name;
        size_t size;
    } want[] = {{"F64", 8},     {"F32", 4}, {"F16", 2}, {"BF16", 2}, {"F8_E4M3", 1},
                {"F8_E5M2", 1}, {"I64", 8}, {"I32", 4}, {"I16", 2},  {"I8", 1},
                {"U64", 8},     {"U32", 4}, {"U16", 2}, {"U8", 1},   {"BOOL", 1}};
    cr_assert_eq(Q_ARRAY_LEN(want), SAFETENSORS_DTYPE_COUNT);
    for (size_t i = 0; i < Q_ARRAY_LEN(want); i++) {
        safetensors_dtype_t d;
        cr_assert_eq(safetensors_dtype_parse(want[i].name, &d), 0, "%s", want[i].name);
        cr_assert_str_eq(safetensors_dtype_name(d), want[i].name);
        cr_assert_eq(safetensors_dtype_size(d), want[i].size, "%s", want[i].name);
    }
    safetensors_dtype_t d;
    cr_assert_eq(safetensors_dtype_parse("f32", &d), -1, "dtype names are case-sensitive");
    cr_assert_eq(safetensors_dtype_parse("F128", &d), -1);
}

/* ---- a file of every dtype --------------------------------------------------------------- */

/* Every dtype with a few values whose bytes and decoded values are both known, so the Python
 * reader can decode independently. F16/BF16 bit patterns are written by hand. */
typedef struct {
    const char *name;
    safetensors_dtype_t dtype;
    size_t ndim;
    uint64_t shape[3];
    unsigned char bytes[64];
    size_t nbytes;
    double values[8]; /* decoded, row-major */
} sample_t;

static double f64v[] = {1.5, -2.25, 1e300, 0.0};
static float f32v[] = {3.0f, -0.5f, 1024.0f, 0.125f, 7.0f, -1.0f};
static int64_t i64v[] = {INT64_MIN + 1, -1, (int64_t)1 << 52};
static int32_t i32v[] = {INT32_MIN, 5, INT32_MAX, -7};
static int16_t i16v[] = {-32768, 32767};
static int8_t i8v[] = {-128, 0, 127};
static uint64_t u64v[] = {(uint64_t)1 << 53, 0};
static uint32_t u32v[] = {4000000000u, 1, 2};
static uint16_t u16v[] = {65535, 1};
static uint8_t u8v[] = {0, 255, 17, 4, 3, 2};
static uint8_t boolv[] = {1, 0, 1};
/* F16: 1.0, -2.0, 0.5, 65504; BF16: 1.0, -2.0, 0.5, 3.0 (little-endian bit patterns). */
static uint16_t f16b[] = {0x3C00, 0xC000, 0x3800, 0x7BFF};
static uint16_t bf16b[] = {0x3F80, 0xC000, 0x3F00, 0x4040};
static uint8_t f8b[] = {0x38, 0xC0};

static size_t samples_make(sample_t *s) {
    size_t n = 0;
#define SAMPLE(nm, dt, nd, s0, s1, arr, count, conv)                                               \
    do {                                                                                           \
        sample_t *x = &s[n++];                                                                     \
        x->name = nm;                                                                              \
        x->dtype = dt;                                                                             \
        x->ndim = nd;                                                                              \
        x->shape[0] = s0;                                                                          \
        x->shape[1] = s1;                                                                          \
        x->nbytes = sizeof arr[0] * (count);                                                       \
        memcpy(x->bytes, arr, x->nbytes);                                                          \
        for (size_t i = 0; i < (count); i++)                                                       \
            x->values[i] = conv;                                                                   \
    } while (0)
    SAMPLE("w.f64", SAFETENSORS_F64, 2, 2, 2, f64v, 4, f64v[i]);
    SAMPLE("w.f32", SAFETENSORS_F32, 2, 2, 3, f32v, 6, f32v[i]);
    SAMPLE("w.f16", SAFETENSORS_F16, 1, 4, 0, f16b, 4, ((double[]){1.0, -2.0, 0.5, 65504.0})[i]);
    SAMPLE("w.bf16", SAFETENSORS_BF16, 2, 2, 2, bf16b, 4, ((double[]){1.0, -2.0, 0.5, 3.0})[i]);
    SAMPLE("w.f8e4m3", SAFETENSORS_F8_E4M3, 1, 2, 0, f8b, 2, f8b[i]);
    SAMPLE("w.f8e5m2", SAFETENSORS_F8_E5M2, 1, 2, 0, f8b, 2, f8b[i]);
    SAMPLE("w.i64", SAFETENSORS_I64, 1, 3, 0, i64v, 3, (double)i64v[i]);
    SAMPLE("w.i32", SAFETENSORS_I32, 2, 2, 2, i32v, 4, i32v[i]);
    SAMPLE("w.i16", SAFETENSORS_I16, 1, 2, 0, i16v, 2, i16v[i]);
    SAMPLE("w.i8", SAFETENSORS_I8, 1, 3, 0, i8v, 3, i8v[i]);
    SAMPLE("w.u64", SAFETENSORS_U64, 1, 2, 0, u64v, 2, (double)u64v[i]);
    SAMPLE("w.u32", SAFETENSORS_U32, 1, 3, 0, u32v, 3, u32v[i]);
    SAMPLE("w.u16", SAFETENSORS_U16, 1, 2, 0, u16v, 2, u16v[i]);
    SAMPLE("w.u8", SAFETENSORS_U8, 2, 3, 2, u8v, 6, u8v[i]);
    SAMPLE("w.bool", SAFETENSORS_BOOL, 1, 3, 0, boolv, 3, boolv[i]);
    /* A scalar (shape []) and an empty tensor (a zero dimension, no bytes). */
    SAMPLE("scalar", SAFETENSORS_F32, 0, 0, 0, f32v, 1, f32v[i]);
#undef SAMPLE
    s[n++] = (sample_t){.name = "empty", .dtype = SAFETENSORS_I32, .ndim = 2, .shape = {0, 3}};
    return n;
}

static safetensors_writer_t *writer_of(const sample_t *s, size_t n, int reverse) {
    safetensors_writer_t *w = safetensors_writer_new();
    cr_assert_not_null(w);
    qerr_t err;
    for (size_t k = 0; k < n; k++) {
        const sample_t *x = &s[reverse ? n - 1 - k : k];
        cr_assert_eq(safetensors_writer_add(w, x->name, x->dtype, x->ndim, x->shape,
                                            x->nbytes ? x->bytes : NULL, &err),
                     0, "%s", err.msg);
    }
    cr_assert_eq(safetensors_writer_set_metadata(w, "format", "pt", &err), 0);
    cr_assert_eq(safetensors_writer_set_metadata(w, "step", "12", &err), 0);
    cr_assert_eq(safetensors_writer_set_metadata(w, "config", "{\"dim\": 128}\nquoted \"x\"", &err),
                 0);
    return w;
}

Test(safetensors, round_trip_every_dtype_with_metadata) {
    tmpdir_make();
    sample_t s[32];
    size_t n = samples_make(s);
    safetensors_writer_t *w = writer_of(s, n, 0);
    qerr_t err;
    const char *path = tpath("all.safetensors");
    cr_assert_eq(safetensors_writer_write(w, path, &err), 0, "%s", err.msg);
    safetensors_writer_destroy(&w);
    cr_assert_null(w);
    safetensors_writer_destroy(&w);

    safetensors_reader_t *r = safetensors_reader_new(path, &err);
    cr_assert_not_null(r, "%s", err.msg);
    cr_assert_str_eq(safetensors_reader_path(r), path);
    cr_assert_eq(safetensors_reader_count(r), n);
    for (size_t i = 0; i < n; i++) {
        const safetensors_tensor_t *t = safetensors_reader_find(r, s[i].name);
        cr_assert_not_null(t, "tensor %s", s[i].name);
        cr_assert_str_eq(t->name, s[i].name);
        cr_assert_eq(t->dtype, s[i].dtype, "%s", s[i].name);
        cr_assert_eq(t->ndim, s[i].ndim, "%s", s[i].name);
        for (size_t d = 0; d < t->ndim; d++)
            cr_assert_eq(t->shape[d], s[i].shape[d], "%s dim %zu", s[i].name, d);
        cr_assert_eq(t->nbytes, s[i].nbytes, "%s", s[i].name);
        cr_assert_eq(t->numel * safetensors_dtype_size(t->dtype), t->nbytes);
        if (t->nbytes)
            cr_assert_eq(memcmp(t->data, s[i].bytes, t->nbytes), 0, "%s bytes", s[i].name);
        /* Quillan's layout keeps every tensor aligned to its element size in the mapping. */
        cr_assert_eq((uintptr_t)t->data % safetensors_dtype_size(t->dtype), 0, "%s", s[i].name);
    }
    /* Iteration is in name order, and find agrees with at. */
    for (size_t i = 0; i + 1 < n; i++)
        cr_assert_lt(
            strcmp(safetensors_reader_at(r, i)->name, safetensors_reader_at(r, i + 1)->name), 0);
    cr_assert_null(safetensors_reader_find(r, "missing"));
    cr_assert_eq(safetensors_reader_at(r, 3),
                 safetensors_reader_find(r, safetensors_reader_at(r, 3)->name));

    cr_assert_eq(safetensors_reader_metadata_count(r), 3);
    const char *k, *v;
    safetensors_reader_metadata_at(r, 0, &k, &v);
    cr_assert_str_eq(k, "config");
    cr_assert_str_eq(v, "{\"dim\": 128}\nquoted \"x\"");
    cr_assert_str_eq(safetensors_reader_metadata(r, "step"), "12");
    cr_assert_str_eq(safetensors_reader_metadata(r, "format"), "pt");
    cr_assert_null(safetensors_reader_metadata(r, "nope"));
    safetensors_reader_destroy(&r);
    cr_assert_null(r);

    /* The header length is a multiple of 8, as the reference writer pads it. */
    size_t len;
    unsigned char *raw = file_get(path, &len);
    uint64_t hl = 0;
    for (int i = 7; i >= 0; i--)
        hl = (hl << 8) | raw[i];
    cr_assert_eq(hl % 8, 0);
    cr_assert_eq(raw[8], '{');
    size_t end = 8 + hl;
    while (end > 8 && raw[end - 1] == ' ')
        end--;
    cr_assert_eq(raw[end - 1], '}', "the header is JSON followed by space padding only");
    cr_assert_lt(8 + hl - end, 8);
    free(raw);
    tmpdir_remove();
}

Test(safetensors, output_is_deterministic_whatever_the_add_order) {
    tmpdir_make();
    sample_t s[32];
    size_t n = samples_make(s);
    qerr_t err;
    safetensors_writer_t *a = writer_of(s, n, 0), *b = writer_of(s, n, 1);
    cr_assert_eq(safetensors_writer_write(a, tpath("a.safetensors"), &err), 0, "%s", err.msg);
    cr_assert_eq(safetensors_writer_write(b, tpath("b.safetensors"), &err), 0, "%s", err.msg);
    /* A writer can write again: same bytes. */
    cr_assert_eq(safetensors_writer_write(a, tpath("c.safetensors"), &err), 0, "%s", err.msg);
    size_t la, lb, lc;
    unsigned char *ra = file_get(tpath("a.safetensors"), &la);
    unsigned char *rb = file_get(tpath("b.safetensors"), &lb);
    unsigned char *rc = file_get(tpath("c.safetensors"), &lc);
    cr_assert_eq(la, lb);
    cr_assert_eq(memcmp(ra, rb, la), 0);
    cr_assert_eq(la, lc);
    cr_assert_eq(memcmp(ra, rc, la), 0);
    free(ra);
    free(rb);
    free(rc);
    safetensors_writer_destroy(&a);
    safetensors_writer_destroy(&b);
    cr_assert_eq(count_tmp_files(), 0, "no temporary file is left after a good write");
    tmpdir_remove();
}

/* ---- an independent reader --------------------------------------------------------------- */

static void expect_write(const sample_t *s, size_t n, const char *path) {
    json_t *root = json_pack("{s:{s:s, s:s, s:s}, s:{}}", "metadata", "format", "pt", "step", "12",
                             "config", "{\"dim\": 128}\nquoted \"x\"", "tensors");
    cr_assert_not_null(root);
    json_t *tensors = json_object_get(root, "tensors");
    for (size_t i = 0; i < n; i++) {
        json_t *shape = json_array(), *values = json_array();
        for (size_t d = 0; d < s[i].ndim; d++)
            json_array_append_new(shape, json_integer((json_int_t)s[i].shape[d]));
        size_t numel = s[i].nbytes / safetensors_dtype_size(s[i].dtype);
        for (size_t k = 0; k < numel; k++) {
            switch (s[i].dtype) {
            case SAFETENSORS_F64:
            case SAFETENSORS_F32:
            case SAFETENSORS_F16:
            case SAFETENSORS_BF16: json_array_append_new(values, json_real(s[i].values[k])); break;
            case SAFETENSORS_I64: {
                int64_t x;
                memcpy(&x, s[i].bytes + 8 * k, 8);
                json_array_append_new(values, json_integer(x));
                break;
            }
            case SAFETENSORS_U64: {
                uint64_t x;
                memcpy(&x, s[i].bytes + 8 * k, 8);
                char txt[32];
                snprintf(txt, sizeof txt, "%llu", (unsigned long long)x);
                json_array_append_new(values, json_string(txt));
                break;
            }
            default: json_array_append_new(values, json_integer((json_int_t)s[i].values[k]));
            }
        }
        json_object_set_new(tensors, s[i].name,
                            json_pack("{s:s, s:o, s:o}", "dtype",
                                      safetensors_dtype_name(s[i].dtype), "shape", shape, "values",
                                      values));
    }
    cr_assert_eq(json_dump_file(root, path, JSON_REAL_PRECISION(17)), 0);
    json_decref(root);
}

Test(safetensors, independent_python_reader_accepts_our_files) {
    if (!python_available())
        cr_skip_test("SKIPPED: " PYTHON " is absent, so the independent reader cannot run");
    tmpdir_make();
    sample_t s[32];
    size_t n = samples_make(s);
    safetensors_writer_t *w = writer_of(s, n, 0);
    qerr_t err;
    const char *path = tpath("all.safetensors");
    cr_assert_eq(safetensors_writer_write(w, path, &err), 0, "%s", err.msg);
    safetensors_writer_destroy(&w);
    const char *expect = tpath("expect.json");
    expect_write(s, n, expect);
    char out[4096];
    cr_assert_eq(run_checker(path, expect, out, sizeof out), 0, "independent reader: %s", out);
    cr_assert(strstr(out, "ok (17 tensors, 3 metadata entries)"), "%s", out);

    /* The checker can fail: flip one data byte of w.f32 (values differ) ... */
    size_t len;
    unsigned char *raw = file_get(path, &len);
    safetensors_reader_t *r = safetensors_reader_new(path, &err);
    cr_assert_not_null(r, "%s", err.msg);
    size_t at = (size_t)safetensors_reader_find(r, "w.f32")->offset;
    uint64_t hl = 0;
    for (int i = 7; i >= 0; i--)
        hl = (hl << 8) | raw[i];
    safetensors_reader_destroy(&r);
    raw[8 + hl + at] ^= 0x40;
    file_put(tpath("flipped.safetensors"), raw, len);
    cr_assert_eq(run_checker(tpath("flipped.safetensors"), expect, out, sizeof out), 1, "%s", out);
    cr_assert(strstr(out, "w.f32"), "%s", out);
    /* ... and a file with trailing bytes breaks the format rules. */
    raw[8 + hl + at] ^= 0x40;
    unsigned char *longer = malloc(len + 4);
    memcpy(longer, raw, len);
    memset(longer + len, 0, 4);
    file_put(tpath("trailing.safetensors"), longer, len + 4);
    cr_assert_eq(run_checker(tpath("trailing.safetensors"), NULL, out, sizeof out), 1, "%s", out);
    free(longer);
    free(raw);
    tmpdir_remove();
}

/* ---- corrupt files ----------------------------------------------------------------------- */

/* Writes an 8-byte length (header_len, or the header's true length when UINT64_MAX), the
 * header text and data_len zero bytes. */
static void raw_file(const char *path, uint64_t header_len, const char *header, size_t data_len) {
    size_t hl = strlen(header);
    uint64_t n = header_len == UINT64_MAX ? hl : header_len;
    size_t total = 8 + hl + data_len;
    unsigned char *b = calloc(1, total);
    for (int i = 0; i < 8; i++)
        b[i] = (unsigned char)(n >> (8 * i));
    memcpy(b + 8, header, hl);
    file_put(path, b, total);
    free(b);
}

typedef struct {
    const char *what;
    uint64_t header_len; /* UINT64_MAX: the header's own length */
    const char *header;
    size_t data_len;
    qerr_code_t code;
    const char *msg; /* expected after "PATH: " */
} corrupt_t;

static const corrupt_t corrupt_cases[] = {
    {"header length beyond the file", 1000, "{}", 0, QERR_PARSE,
     "header length 1000 exceeds the 2 bytes that follow it (file truncated?)"},
    {"header length beyond 100 MB", 200000000, "{}", 0, QERR_PARSE,
     "header length 200000000 exceeds the limit of 100000000 bytes"},
    {"header not JSON", UINT64_MAX, "{\"a\": nope}", 0, QERR_PARSE, "header: not valid JSON: "},
    {"header not an object", UINT64_MAX, "[1, 2]", 0, QERR_PARSE, "header does not start with '{'"},
    {"empty header", UINT64_MAX, "", 0, QERR_PARSE, "header does not start with '{'"},
    {"duplicate tensor name", UINT64_MAX,
     "{\"a\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1]},"
     "\"a\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[1,2]}}",
     2, QERR_PARSE, "header: not valid JSON: duplicate object key"},
    {"offsets out of range", UINT64_MAX,
     "{\"a\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[0,16]}}", 8, QERR_INVALID,
     "tensor 'a': data_offsets [0, 16) exceed the data section of 8 bytes"},
    {"offsets reversed", UINT64_MAX,
     "{\"a\":{\"dtype\":\"U8\",\"shape\":[0],\"data_offsets\":[4,0]}}", 8, QERR_INVALID,
     "tensor 'a': data_offsets [4, 0) end before they begin"},
    {"overlapping tensors", UINT64_MAX,
     "{\"a\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[0,16]},"
     "\"b\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[8,16]}}",
     16, QERR_INVALID, "tensor 'b': data_offsets [8, 16) overlap tensor 'a' [0, 16)"},
    {"hole between tensors", UINT64_MAX,
     "{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
     "\"b\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[12,20]}}",
     20, QERR_INVALID, "tensor 'b': data_offsets [12, 20) leave a hole of 4 bytes at offset 8"},
    {"trailing bytes", UINT64_MAX,
     "{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}", 12, QERR_INVALID,
     "the data section has 12 bytes but the tensors cover only 8"},
    {"shape/size mismatch", UINT64_MAX,
     "{\"embed.weight\":{\"dtype\":\"F32\",\"shape\":[10,4],\"data_offsets\":[0,100]}}", 100,
     QERR_INVALID,
     "tensor 'embed.weight': data_offsets [0, 100) do not match shape [10, 4] x F32 = 160 bytes"},
    {"shape overflow", UINT64_MAX,
     "{\"a\":{\"dtype\":\"F64\",\"shape\":[4294967296,4294967296],\"data_offsets\":[0,0]}}", 0,
     QERR_INVALID, "tensor 'a': shape [4294967296, 4294967296] x F64 overflows 64 bits"},
    {"negative dimension", UINT64_MAX,
     "{\"a\":{\"dtype\":\"U8\",\"shape\":[2,-1],\"data_offsets\":[0,0]}}", 0, QERR_INVALID,
     "tensor 'a': shape[1] is -1, must be >= 0"},
    {"real dimension", UINT64_MAX,
     "{\"a\":{\"dtype\":\"U8\",\"shape\":[2.0],\"data_offsets\":[0,2]}}", 2, QERR_INVALID,
     "tensor 'a': shape[0] must be an integer, got a real number"},
    {"unknown dtype", UINT64_MAX, "{\"a\":{\"dtype\":\"F7\",\"shape\":[1],\"data_offsets\":[0,1]}}",
     1, QERR_INVALID, "tensor 'a': unknown dtype 'F7'"},
    {"missing dtype", UINT64_MAX, "{\"a\":{\"shape\":[1],\"data_offsets\":[0,1]}}", 1,
     QERR_NOTFOUND, "tensor 'a': missing field 'dtype'"},
    {"unknown field", UINT64_MAX,
     "{\"a\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1],\"stride\":[1]}}", 1,
     QERR_INVALID, "tensor 'a': unknown field 'stride'"},
    {"data_offsets of 3", UINT64_MAX,
     "{\"a\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1,2]}}", 1, QERR_INVALID,
     "tensor 'a': data_offsets must be [BEGIN, END], got 3 entries"},
    {"tensor not an object", UINT64_MAX, "{\"a\":[1]}", 0, QERR_INVALID,
     "tensor 'a': expected an object, got an array"},
    {"non-string metadata", UINT64_MAX, "{\"__metadata__\":{\"step\":12}}", 0, QERR_INVALID,
     "__metadata__ 'step': value must be a string, got an integer"},
    {"metadata not an object", UINT64_MAX, "{\"__metadata__\":\"x\"}", 0, QERR_INVALID,
     "__metadata__ must be an object of strings, got a string"},
};

Test(safetensors, corrupt_files_give_errors_naming_file_and_field) {
    tmpdir_make();
    char path[512];
    for (size_t i = 0; i < Q_ARRAY_LEN(corrupt_cases); i++) {
        const corrupt_t *c = &corrupt_cases[i];
        snprintf(path, sizeof path, "%s/case%zu.safetensors", tmpdir, i);
        raw_file(path, c->header_len, c->header, c->data_len);
        qerr_t err;
        qerr_clear(&err);
        safetensors_reader_t *r = safetensors_reader_new(path, &err);
        cr_assert_null(r, "%s: accepted", c->what);
        char want[1024];
        snprintf(want, sizeof want, "%s: %s", path, c->msg);
        cr_assert_eq(strncmp(err.msg, want, strlen(want)), 0, "%s:\n got  %s\n want %s", c->what,
                     err.msg, want);
        cr_assert_eq(err.code, c->code, "%s: code %s", c->what, qerr_code_name(err.code));
    }
    tmpdir_remove();
}

Test(safetensors, short_missing_and_odd_files) {
    tmpdir_make();
    qerr_t err;
    static const size_t lens[] = {0, 1, 7};
    for (size_t i = 0; i < Q_ARRAY_LEN(lens); i++) {
        file_put(tpath("short.safetensors"), "\x02\0\0\0\0\0\0", lens[i]);
        cr_assert_null(safetensors_reader_new(tpath("short.safetensors"), &err));
        char want[600];
        snprintf(want, sizeof want, "%s: file is %zu bytes, shorter than the 8-byte header length",
                 tpath("short.safetensors"), lens[i]);
        cr_assert_eq(strncmp(err.msg, want, strlen(want)), 0, "%s", err.msg);
    }
    cr_assert_null(safetensors_reader_new(tpath("absent.safetensors"), &err));
    cr_assert_eq(err.code, QERR_NOTFOUND);
    cr_assert(strstr(err.msg, "absent.safetensors: cannot open"), "%s", err.msg);
    cr_assert_null(safetensors_reader_new(tmpdir, &err));
    cr_assert(strstr(err.msg, "not a regular file"), "%s", err.msg);

    /* Files from other writers are accepted: header not padded, an empty file of tensors,
     * trailing spaces in the header, a scalar and an empty tensor sharing an offset. */
    raw_file(tpath("ok.safetensors"), UINT64_MAX,
             "{\"z\":{\"dtype\":\"U8\",\"shape\":[0,5],\"data_offsets\":[3,3]},"
             "\"s\":{\"dtype\":\"U8\",\"shape\":[],\"data_offsets\":[2,3]},"
             "\"a\":{\"dtype\":\"U8\",\"shape\":[2],\"data_offsets\":[0,2]}}   ",
             3);
    safetensors_reader_t *r = safetensors_reader_new(tpath("ok.safetensors"), &err);
    cr_assert_not_null(r, "%s", err.msg);
    cr_assert_eq(safetensors_reader_count(r), 3);
    cr_assert_eq(safetensors_reader_find(r, "s")->numel, 1);
    cr_assert_eq(safetensors_reader_find(r, "z")->numel, 0);
    safetensors_reader_destroy(&r);
    raw_file(tpath("none.safetensors"), UINT64_MAX, "{}", 0);
    r = safetensors_reader_new(tpath("none.safetensors"), &err);
    cr_assert_not_null(r, "%s", err.msg);
    cr_assert_eq(safetensors_reader_count(r), 0);
    cr_assert_eq(safetensors_reader_metadata_count(r), 0);
    safetensors_reader_destroy(&r);
    tmpdir_remove();
}

Test(safetensors, expect_checks_dtype_and_shape) {
    tmpdir_make();
    qerr_t err;
    safetensors_writer_t *w = safetensors_writer_new();
    float data[40] = {0};
    uint64_t shape[2] = {10, 4};
    cr_assert_eq(safetensors_writer_add(w, "embed.weight", SAFETENSORS_F32, 2, shape, data, &err),
                 0);
    cr_assert_eq(safetensors_writer_write(w, tpath("m.safetensors"), &err), 0, "%s", err.msg);
    safetensors_writer_destroy(&w);
    safetensors_reader_t *r = safetensors_reader_new(tpath("m.safetensors"), &err);
    cr_assert_not_null(r, "%s", err.msg);
    cr_assert_not_null(
        safetensors_reader_expect(r, "embed.weight", SAFETENSORS_F32, 2, shape, &err));
    uint64_t other[2] = {10, 8};
    cr_assert_null(safetensors_reader_expect(r, "embed.weight", SAFETENSORS_F16, 2, other, &err));
    char want[600];
    snprintf(want, sizeof want,
             "%s: tensor 'embed.weight': expected F16 [10, 8], found F32 [10, 4]",
             tpath("m.safetensors"));
    cr_assert_str_eq(err.msg, want);
    cr_assert_null(safetensors_reader_expect(r, "head.weight", SAFETENSORS_F32, 2, shape, &err));
    cr_assert_eq(err.code, QERR_NOTFOUND);
    cr_assert(strstr(err.msg, "tensor 'head.weight' not found"), "%s", err.msg);
    safetensors_reader_destroy(&r);
    tmpdir_remove();
}

/* ---- writer errors ----------------------------------------------------------------------- */

Test(safetensors, writer_rejects_bad_names) {
    safetensors_writer_t *w = safetensors_writer_new();
    qerr_t err;
    uint64_t shape[1] = {1};
    uint8_t b = 0;
    cr_assert_eq(safetensors_writer_add(w, "x", SAFETENSORS_U8, 1, shape, &b, &err), 0);
    cr_assert_eq(safetensors_writer_add(w, "x", SAFETENSORS_U8, 1, shape, &b, &err), -1);
    cr_assert(strstr(err.msg, "duplicate tensor 'x'"), "%s", err.msg);
    cr_assert_eq(safetensors_writer_add(w, "__metadata__", SAFETENSORS_U8, 1, shape, &b, &err), -1);
    cr_assert(strstr(err.msg, "reserved"), "%s", err.msg);
    cr_assert_eq(safetensors_writer_add(w, "", SAFETENSORS_U8, 1, shape, &b, &err), -1);
    cr_assert_eq(safetensors_writer_add(w, "bad\xff", SAFETENSORS_U8, 1, shape, &b, &err), -1);
    cr_assert(strstr(err.msg, "UTF-8"), "%s", err.msg);
    uint64_t huge[2] = {UINT64_MAX / 2, 3};
    cr_assert_eq(safetensors_writer_add(w, "h", SAFETENSORS_U8, 2, huge, &b, &err), -1);
    cr_assert(strstr(err.msg, "overflows"), "%s", err.msg);
    cr_assert_eq(safetensors_writer_set_metadata(w, "k", "bad\xc3", &err), -1);
    safetensors_writer_destroy(&w);
}

static int fill_fails(void *ctx, uint64_t offset, void *buf, size_t len, qerr_t *err) {
    (void)ctx;
    memset(buf, 7, len);
    if (offset >= ((uint64_t)2 << 20))
        return qerr_set(err, QERR_INVALID, "quantizer refused block at %llu",
                        (unsigned long long)offset);
    return 0;
}

static void good_file(const char *path, uint8_t value, size_t n) {
    uint8_t *data = malloc(n);
    memset(data, value, n);
    safetensors_writer_t *w = safetensors_writer_new();
    qerr_t err;
    uint64_t shape[1] = {n};
    cr_assert_eq(safetensors_writer_add(w, "good", SAFETENSORS_U8, 1, shape, data, &err), 0);
    cr_assert_eq(safetensors_writer_set_metadata(w, "value", value == 1 ? "1" : "2", &err), 0);
    cr_assert_eq(safetensors_writer_write(w, path, &err), 0, "%s", err.msg);
    safetensors_writer_destroy(&w);
    free(data);
}

/* The file at path is a complete good_file(path, value, n). */
static void assert_good_file(const char *path, uint8_t value, size_t n) {
    qerr_t err;
    safetensors_reader_t *r = safetensors_reader_new(path, &err);
    cr_assert_not_null(r, "%s", err.msg);
    const uint64_t shape[1] = {n};
    const safetensors_tensor_t *t =
        safetensors_reader_expect(r, "good", SAFETENSORS_U8, 1, shape, &err);
    cr_assert_not_null(t, "%s", err.msg);
    const uint8_t *d = t->data;
    for (size_t i = 0; i < n; i++)
        cr_assert_eq(d[i], value, "byte %zu", i);
    cr_assert_str_eq(safetensors_reader_metadata(r, "value"), value == 1 ? "1" : "2");
    safetensors_reader_destroy(&r);
}

Test(safetensors, failed_write_keeps_old_file_and_removes_temp) {
    tmpdir_make();
    const char *path = tpath("model.safetensors");
    good_file(path, 1, 1000);
    safetensors_writer_t *w = safetensors_writer_new();
    qerr_t err;
    uint64_t shape[1] = {(uint64_t)8 << 20};
    cr_assert_eq(
        safetensors_writer_add_fill(w, "q", SAFETENSORS_U8, 1, shape, fill_fails, NULL, &err), 0);
    cr_assert_eq(safetensors_writer_write(w, path, &err), -1);
    char want[600];
    snprintf(want, sizeof want, "%s: tensor 'q': quantizer refused block at 2097152", path);
    cr_assert_str_eq(err.msg, want);
    safetensors_writer_destroy(&w);
    assert_good_file(path, 1, 1000);
    cr_assert_eq(count_tmp_files(), 0, "the temporary file is removed on error");

    /* A directory that does not exist. */
    good_file(path, 1, 10);
    w = safetensors_writer_new();
    cr_assert_eq(safetensors_writer_write(w, tpath("no/such/dir.safetensors"), &err), -1);
    cr_assert(strstr(err.msg, "no/such/dir.safetensors: cannot create temporary file"), "%s",
              err.msg);
    cr_assert_eq(err.code, QERR_IO);
    safetensors_writer_destroy(&w);
    tmpdir_remove();
}

Test(safetensors, disk_full_style_write_error_keeps_old_file) {
    tmpdir_make();
    const char *path = tpath("model.safetensors");
    good_file(path, 1, 4096);
    /* In a child (the limit is per process): a file size limit makes write() fail with EFBIG,
     * the way a full disk makes it fail with ENOSPC. */
    pid_t pid = fork();
    cr_assert_neq(pid, -1);
    if (pid == 0) {
        signal(SIGXFSZ, SIG_IGN);
        struct rlimit lim = {1 << 20, 1 << 20};
        setrlimit(RLIMIT_FSIZE, &lim);
        qerr_t err;
        safetensors_writer_t *w = safetensors_writer_new();
        size_t n = 4 << 20;
        uint8_t *data = calloc(1, n);
        uint64_t shape[1] = {n};
        safetensors_writer_add(w, "good", SAFETENSORS_U8, 1, shape, data, &err);
        int rc = safetensors_writer_write(w, path, &err);
        _exit(rc == -1 && err.code == QERR_IO && strstr(err.msg, "write failed: File too large")
                  ? 0
                  : 1);
    }
    int st;
    cr_assert_eq(waitpid(pid, &st, 0), pid);
    cr_assert(WIFEXITED(st) && WEXITSTATUS(st) == 0, "the writer must report EFBIG");
    assert_good_file(path, 1, 4096);
    cr_assert_eq(count_tmp_files(), 0);
    tmpdir_remove();
}

/* ---- crash safety: SIGKILL a real writer process ----------------------------------------- */

typedef struct {
    int signal_fd;
    int signalled;
} stall_ctx_t;

/* Produces 0xEE bytes; once 3 MiB are out it tells the parent and waits to be killed. */
static int fill_then_stall(void *ctx, uint64_t offset, void *buf, size_t len, qerr_t *err) {
    (void)err;
    stall_ctx_t *s = ctx;
    memset(buf, 0xEE, len);
    if (offset >= ((uint64_t)3 << 20) && !s->signalled) {
        s->signalled = 1;
        char c = 'x';
        if (write(s->signal_fd, &c, 1) != 1)
            _exit(3);
        for (;;)
            pause();
    }
    return 0;
}

Test(safetensors, killed_writer_never_replaces_good_file) {
    tmpdir_make();
    const char *path = tpath("model.safetensors");
    good_file(path, 1, 100000);
    size_t old_len;
    unsigned char *old = file_get(path, &old_len);

    int fds[2];
    cr_assert_eq(pipe(fds), 0);
    pid_t pid = fork();
    cr_assert_neq(pid, -1);
    if (pid == 0) {
        close(fds[0]);
        stall_ctx_t ctx = {fds[1], 0};
        qerr_t err;
        safetensors_writer_t *w = safetensors_writer_new();
        size_t n = 4 << 20;
        uint8_t *data = malloc(n);
        memset(data, 2, n);
        uint64_t shape[1] = {n}, qshape[1] = {(uint64_t)64 << 20};
        safetensors_writer_add(w, "good", SAFETENSORS_U8, 1, shape, data, &err);
        safetensors_writer_add_fill(w, "stall", SAFETENSORS_U8, 1, qshape, fill_then_stall, &ctx,
                                    &err);
        safetensors_writer_write(w, path, &err);
        _exit(4); /* never reached: the fill stalls until the parent kills us */
    }
    close(fds[1]);
    /* Everything is measured before any assertion, so that a failure never leaves a stalled
     * writer behind. */
    char c;
    ssize_t got = read(fds[0], &c, 1);
    close(fds[0]);
    /* The child is inside the write: its temporary file holds > 4 MiB, the target is intact. */
    long long grown = tmp_file_size();
    int killed = kill(pid, SIGKILL);
    int st;
    pid_t waited = waitpid(pid, &st, 0);
    cr_assert_eq(got, 1, "the writer must reach the middle of its file");
    cr_assert_gt(grown, 4 << 20, "temporary file size %lld", grown);
    cr_assert_eq(killed, 0);
    cr_assert_eq(waited, pid);
    cr_assert(WIFSIGNALED(st) && WTERMSIG(st) == SIGKILL);

    size_t now_len;
    unsigned char *now = file_get(path, &now_len);
    cr_assert_eq(now_len, old_len);
    cr_assert_eq(memcmp(now, old, old_len), 0, "the old file is byte for byte intact");
    free(now);
    free(old);
    assert_good_file(path, 1, 100000);
    /* The killed writer's temporary file stays (nothing ran to remove it) under a name no
     * reader opens; the next write still succeeds, and leaves it while it is recent. */
    cr_assert_eq(count_tmp_files(), 1);
    good_file(path, 2, 5000);
    assert_good_file(path, 2, 5000);
    cr_assert_eq(count_tmp_files(), 1, "a recent temporary file is kept");
    /* Ten minutes later the next write removes it: its writer is gone. */
    tmp_files_age(3600);
    good_file(path, 3, 5000);
    assert_good_file(path, 3, 5000);
    cr_assert_eq(count_tmp_files(), 0, "the dead writer's temporary file is removed");
    tmpdir_remove();
}

/* Writes an empty file tmpdir/name last modified `age_s` seconds ago. */
static void file_put_aged(const char *name, long age_s) {
    const char *p = tpath(name);
    file_put(p, "", 0);
    const struct timespec t[2] = {{time(NULL) - age_s, 0}, {time(NULL) - age_s, 0}};
    cr_assert_eq(utimensat(AT_FDCWD, p, t, 0), 0);
}

static int file_exists(const char *name) {
    struct stat st;
    return stat(tpath(name), &st) == 0;
}

/* A PID that no process has: a child that has exited and been reaped. */
static pid_t dead_pid(void) {
    const pid_t pid = fork();
    cr_assert_neq(pid, -1);
    if (pid == 0)
        _exit(0);
    int st;
    cr_assert_eq(waitpid(pid, &st, 0), pid);
    return pid;
}

Test(safetensors, stale_temporary_files_are_removed_only_when_dead_old_and_ours) {
    tmpdir_make();
    const long dead = (long)dead_pid(), live = (long)getppid(), self = (long)getpid();
    char stale[128], fresh[128], alive[128], mine[128], other[128];
    snprintf(stale, sizeof stale, ".latest.%ld.3.tmp", dead);
    snprintf(fresh, sizeof fresh, ".latest.%ld.4.tmp", dead);
    snprintf(alive, sizeof alive, ".latest.%ld.5.tmp", live);
    snprintf(mine, sizeof mine, ".latest.%ld.6.tmp", self);
    snprintf(other, sizeof other, ".latest2.%ld.7.tmp", dead);
    file_put_aged(stale, 3600);
    file_put_aged(fresh, 0);
    file_put_aged(alive, 3600);
    file_put_aged(mine, 3600);
    file_put_aged(other, 3600);
    /* Names that are not atomic_replace's temporary files, even with a dead PID. */
    char odd[4][128];
    snprintf(odd[0], sizeof odd[0], ".latest.%ld.tmp", dead);
    snprintf(odd[1], sizeof odd[1], ".latest.%ld.8.tmp.bak", dead);
    snprintf(odd[2], sizeof odd[2], "latest.%ld.9.tmp", dead);
    snprintf(odd[3], sizeof odd[3], ".latest.x%ld.1.tmp", dead);
    for (int i = 0; i < 4; i++)
        file_put_aged(odd[i], 3600);
    qerr_t err;
    cr_assert_eq(q_file_write_atomic(tpath("latest"), "step-1\n", 7, &err), 0, "%s", err.msg);
    cr_assert(!file_exists(stale), "old, and its writer is gone: removed");
    cr_assert(file_exists(fresh), "recent: kept");
    cr_assert(file_exists(alive), "its writer lives: kept");
    cr_assert(file_exists(mine), "this process's own: kept");
    cr_assert(file_exists(other), "another file's: kept");
    for (int i = 0; i < 4; i++)
        cr_assert(file_exists(odd[i]), "%s kept", odd[i]);
    tmpdir_remove();
}

/* Child process body: rewrites path forever, alternating between two contents. Uses no
 * Criterion assertion (it is not the test's process). */
static _Noreturn void rewrite_forever(const char *path, size_t n) {
    uint8_t *data = malloc(n);
    if (!data)
        _exit(5);
    uint64_t shape[1] = {n};
    for (uint8_t v = 2;; v = v == 2 ? 1 : 2) {
        memset(data, v, n);
        qerr_t err;
        safetensors_writer_t *w = safetensors_writer_new();
        if (!w || safetensors_writer_add(w, "good", SAFETENSORS_U8, 1, shape, data, &err) < 0 ||
            safetensors_writer_set_metadata(w, "value", v == 1 ? "1" : "2", &err) < 0 ||
            safetensors_writer_write(w, path, &err) < 0)
            _exit(6);
        safetensors_writer_destroy(&w);
    }
}

Test(safetensors, writer_killed_while_looping_leaves_a_whole_file) {
    tmpdir_make();
    const char *path = tpath("model.safetensors");
    enum { N = 16 << 20 };
    good_file(path, 1, N);
    pid_t pid = fork();
    cr_assert_neq(pid, -1);
    if (pid == 0)
        rewrite_forever(path, N);
    /* Kill it once a temporary file is well under way. The bound only stops a hung test. */
    long long seen = -1;
    for (int i = 0; i < 20000 && seen < (4 << 20); i++) {
        seen = tmp_file_size();
        if (seen < (4 << 20)) {
            struct timespec ts = {0, 100000};
            nanosleep(&ts, NULL);
        }
    }
    int killed = kill(pid, SIGKILL);
    int st;
    pid_t waited = waitpid(pid, &st, 0);
    cr_assert_geq(seen, 4 << 20, "never saw the writer's temporary file grow");
    cr_assert_eq(killed, 0);
    cr_assert_eq(waited, pid);
    cr_assert(WIFSIGNALED(st) && WTERMSIG(st) == SIGKILL);
    /* Whichever write finished last, the file is complete and consistent. */
    qerr_t err;
    safetensors_reader_t *r = safetensors_reader_new(path, &err);
    cr_assert_not_null(r, "%s", err.msg);
    uint8_t v = (uint8_t)(safetensors_reader_metadata(r, "value")[0] - '0');
    safetensors_reader_destroy(&r);
    assert_good_file(path, v, N);
    tmpdir_remove();
}

/* ---- small files ------------------------------------------------------------------------- */

Test(safetensors, atomic_text_file_replace) {
    tmpdir_make();
    const char *path = tpath("latest");
    qerr_t err;
    cr_assert_eq(q_file_write_atomic(path, "step-000100\n", 12, &err), 0, "%s", err.msg);
    cr_assert_eq(q_file_write_atomic(path, "step-000200\n", 12, &err), 0, "%s", err.msg);
    size_t n;
    unsigned char *b = file_get(path, &n);
    cr_assert_eq(n, 12);
    cr_assert_eq(memcmp(b, "step-000200\n", 12), 0);
    free(b);
    cr_assert_eq(count_tmp_files(), 0);
    struct stat st;
    cr_assert_eq(stat(path, &st), 0);
    mode_t um = umask(0);
    umask(um);
    cr_assert_eq(st.st_mode & 0777, 0666 & ~um, "mode follows the umask, not mkstemp's 0600");
    cr_assert_eq(q_file_write_atomic(tpath("gone/latest"), "x", 1, &err), -1);
    cr_assert(strstr(err.msg, "gone/latest"), "%s", err.msg);
    /* A relative path with no directory part. */
    char cwd[512];
    cr_assert_not_null(getcwd(cwd, sizeof cwd));
    cr_assert_eq(chdir(tmpdir), 0);
    cr_assert_eq(q_file_write_atomic("rel", "y", 1, &err), 0, "%s", err.msg);
    cr_assert_eq(chdir(cwd), 0);
    b = file_get(tpath("rel"), &n);
    cr_assert_eq(n, 1);
    free(b);
    tmpdir_remove();
}

/* Byte k of the tensor is (k * 7 + k / 4096) mod 251, so a piece written at the wrong offset
 * shows. */
static int fill_pattern(void *ctx, uint64_t offset, void *buf, size_t len, qerr_t *err) {
    (void)err;
    uint64_t *calls = ctx;
    (*calls)++;
    unsigned char *b = buf;
    for (size_t i = 0; i < len; i++) {
        uint64_t k = offset + i;
        b[i] = (unsigned char)((k * 7 + k / 4096) % 251);
    }
    return 0;
}

Test(safetensors, fill_callback_round_trip) {
    tmpdir_make();
    qerr_t err;
    uint64_t calls = 0;
    const uint64_t n = (5 << 20) / 2 + 3; /* 2.5 MiB + 3: three pieces, the last one short */
    uint64_t shape[2] = {n / 2, 2};
    uint8_t small[4] = {9, 8, 7, 6};
    uint64_t sshape[1] = {4};
    safetensors_writer_t *w = safetensors_writer_new();
    cr_assert_eq(safetensors_writer_add_fill(w, "big", SAFETENSORS_U16, 2, shape, fill_pattern,
                                             &calls, &err),
                 0);
    cr_assert_eq(safetensors_writer_add(w, "small", SAFETENSORS_U8, 1, sshape, small, &err), 0);
    cr_assert_eq(safetensors_writer_write(w, tpath("f.safetensors"), &err), 0, "%s", err.msg);
    safetensors_writer_destroy(&w);
    uint64_t nbytes = (n / 2) * 2 * 2;
    cr_assert_eq(calls, (nbytes + (1 << 20) - 1) >> 20, "pieces of at most 1 MiB");
    safetensors_reader_t *r = safetensors_reader_new(tpath("f.safetensors"), &err);
    cr_assert_not_null(r, "%s", err.msg);
    const safetensors_tensor_t *t =
        safetensors_reader_expect(r, "big", SAFETENSORS_U16, 2, shape, &err);
    cr_assert_not_null(t, "%s", err.msg);
    const unsigned char *b = t->data;
    for (uint64_t k = 0; k < t->nbytes; k++)
        cr_assert_eq(b[k], (unsigned char)((k * 7 + k / 4096) % 251), "byte %llu",
                     (unsigned long long)k);
    cr_assert_eq(memcmp(safetensors_reader_find(r, "small")->data, small, 4), 0);
    safetensors_reader_destroy(&r);
    tmpdir_remove();
}
