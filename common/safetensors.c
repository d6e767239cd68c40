#include "safetensors.h"

#include "alloc.h"
#include "json.h"
#include "log.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

/* ---- dtypes ----------------------------------------------------------------------------- */

static const struct {
    const char *name;
    size_t size;
} dtype_table[SAFETENSORS_DTYPE_COUNT] = {
    [SAFETENSORS_F64] = {"F64", 8},         [SAFETENSORS_F32] = {"F32", 4},
    [SAFETENSORS_F16] = {"F16", 2},         [SAFETENSORS_BF16] = {"BF16", 2},
    [SAFETENSORS_F8_E4M3] = {"F8_E4M3", 1}, [SAFETENSORS_F8_E5M2] = {"F8_E5M2", 1},
    [SAFETENSORS_I64] = {"I64", 8},         [SAFETENSORS_I32] = {"I32", 4},
    [SAFETENSORS_I16] = {"I16", 2},         [SAFETENSORS_I8] = {"I8", 1},
    [SAFETENSORS_U64] = {"U64", 8},         [SAFETENSORS_U32] = {"U32", 4},
    [SAFETENSORS_U16] = {"U16", 2},         [SAFETENSORS_U8] = {"U8", 1},
    [SAFETENSORS_BOOL] = {"BOOL", 1},
};
_Static_assert(Q_ARRAY_LEN(dtype_table) == SAFETENSORS_DTYPE_COUNT, "one entry per dtype");

const char *safetensors_dtype_name(safetensors_dtype_t dtype) {
    Q_ASSERT(dtype >= 0 && dtype < SAFETENSORS_DTYPE_COUNT);
    return dtype_table[dtype].name;
}

size_t safetensors_dtype_size(safetensors_dtype_t dtype) {
    Q_ASSERT(dtype >= 0 && dtype < SAFETENSORS_DTYPE_COUNT);
    return dtype_table[dtype].size;
}

int safetensors_dtype_parse(const char *name, safetensors_dtype_t *out) {
    for (int i = 0; i < SAFETENSORS_DTYPE_COUNT; i++) {
        if (strcmp(name, dtype_table[i].name) == 0) {
            *out = (safetensors_dtype_t)i;
            return 0;
        }
    }
    return -1;
}

/* numel and nbytes of a shape, or -1 on uint64 overflow. */
static int shape_size(size_t ndim, const uint64_t *shape, size_t elem, uint64_t *numel,
                      uint64_t *nbytes) {
    uint64_t n = 1;
    for (size_t i = 0; i < ndim; i++) {
        if (__builtin_mul_overflow(n, shape[i], &n))
            return -1;
    }
    uint64_t b;
    if (__builtin_mul_overflow(n, (uint64_t)elem, &b))
        return -1;
    *numel = n;
    *nbytes = b;
    return 0;
}

/* "[10, 4]" into buf (cut short with "...]" when it does not fit). */
static const char *shape_format(char *buf, size_t cap, size_t ndim, const uint64_t *shape) {
    size_t pos = 0;
    buf[pos++] = '[';
    for (size_t i = 0; i < ndim; i++) {
        int n =
            snprintf(buf + pos, cap - pos, "%s%llu", i ? ", " : "", (unsigned long long)shape[i]);
        if (n < 0 || (size_t)n + 5 >= cap - pos) {
            snprintf(buf + pos, cap - pos, "...]");
            return buf;
        }
        pos += (size_t)n;
    }
    snprintf(buf + pos, cap - pos, "]");
    return buf;
}

#define SHAPE_TEXT 96

static uint64_t load_le64(const unsigned char *p) {
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--)
        v = (v << 8) | p[i];
    return v;
}

static void store_le64(unsigned char *p, uint64_t v) {
    for (int i = 0; i < 8; i++)
        p[i] = (unsigned char)(v >> (8 * i));
}

static int cmp_str(const char *a, const char *b) {
    return strcmp(a, b);
}

/* ---- Reader ---------------------------------------------------------------------------- */

struct safetensors_reader {
    char *path;
    unsigned char *map;
    size_t map_len;
    int borrowed; /* map is the caller's memory (safetensors_reader_new_memory): not unmapped */
    const unsigned char *data; /* start of the data section */
    uint64_t data_len;
    safetensors_tensor_t *tensors; /* sorted by name */
    size_t n_tensors;
    char **meta_keys; /* sorted */
    char **meta_values;
    size_t n_meta;
};

static int tensor_cmp_name(const void *a, const void *b) {
    return cmp_str(((const safetensors_tensor_t *)a)->name,
                   ((const safetensors_tensor_t *)b)->name);
}

static int tensor_cmp_offset(const void *a, const void *b) {
    const safetensors_tensor_t *x = *(const safetensors_tensor_t *const *)a;
    const safetensors_tensor_t *y = *(const safetensors_tensor_t *const *)b;
    if (x->offset != y->offset)
        return x->offset < y->offset ? -1 : 1;
    if (x->nbytes != y->nbytes)
        return x->nbytes < y->nbytes ? -1 : 1;
    return cmp_str(x->name, y->name);
}

/* Reads a non-negative JSON integer; `what` names the field for the error. */
static int read_count(const safetensors_reader_t *r, const char *tname, const char *what,
                      const json_t *v, uint64_t *out, qerr_t *err) {
    if (!json_is_integer(v))
        return qerr_set(err, QERR_INVALID, "%s: tensor '%s': %s must be an integer, got %s",
                        r->path, tname, what, qjson_type_name(v));
    json_int_t x = json_integer_value(v);
    if (x < 0)
        return qerr_set(err, QERR_INVALID, "%s: tensor '%s': %s is %lld, must be >= 0", r->path,
                        tname, what, (long long)x);
    *out = (uint64_t)x;
    return 0;
}

static int parse_tensor(safetensors_reader_t *r, const char *name, const json_t *desc,
                        safetensors_tensor_t *t, qerr_t *err) {
    t->name = name;
    if (!json_is_object(desc))
        return qerr_set(err, QERR_INVALID, "%s: tensor '%s': expected an object, got %s", r->path,
                        name, qjson_type_name(desc));
    const char *key;
    json_t *val;
    json_object_foreach((json_t *)desc, key, val) {
        if (strcmp(key, "dtype") != 0 && strcmp(key, "shape") != 0 &&
            strcmp(key, "data_offsets") != 0)
            return qerr_set(err, QERR_INVALID,
                            "%s: tensor '%s': unknown field '%s' (expected dtype, shape, "
                            "data_offsets)",
                            r->path, name, key);
    }
    const char *dtype_name;
    json_t *shape, *offsets;
    if (qjson_get_string(desc, "dtype", &dtype_name, err) < 0 ||
        qjson_get_array(desc, "shape", &shape, err) < 0 ||
        qjson_get_array(desc, "data_offsets", &offsets, err) < 0)
        return qerr_wrap(err, "%s: tensor '%s'", r->path, name);
    if (safetensors_dtype_parse(dtype_name, &t->dtype) < 0)
        return qerr_set(err, QERR_INVALID, "%s: tensor '%s': unknown dtype '%s'", r->path, name,
                        dtype_name);

    t->ndim = json_array_size(shape);
    uint64_t *dims = NULL;
    if (t->ndim > 0) {
        dims = calloc(t->ndim, sizeof *dims);
        if (!dims)
            return qerr_set(err, QERR_NOMEM, "%s: out of memory", r->path);
    }
    t->shape = dims;
    for (size_t i = 0; i < t->ndim; i++) {
        char what[32];
        snprintf(what, sizeof what, "shape[%zu]", i);
        if (read_count(r, name, what, json_array_get(shape, i), &dims[i], err) < 0)
            return -1;
    }
    char stext[SHAPE_TEXT];
    if (shape_size(t->ndim, dims, dtype_table[t->dtype].size, &t->numel, &t->nbytes) < 0)
        return qerr_set(err, QERR_INVALID, "%s: tensor '%s': shape %s x %s overflows 64 bits",
                        r->path, name, shape_format(stext, sizeof stext, t->ndim, dims),
                        dtype_name);

    if (json_array_size(offsets) != 2)
        return qerr_set(err, QERR_INVALID,
                        "%s: tensor '%s': data_offsets must be [BEGIN, END], got %zu entries",
                        r->path, name, json_array_size(offsets));
    /* read_count sets both on success; GCC at -O3 cannot see that through its error paths. */
    uint64_t begin = 0, end = 0;
    if (read_count(r, name, "data_offsets[0]", json_array_get(offsets, 0), &begin, err) < 0 ||
        read_count(r, name, "data_offsets[1]", json_array_get(offsets, 1), &end, err) < 0)
        return -1;
    if (end < begin)
        return qerr_set(err, QERR_INVALID,
                        "%s: tensor '%s': data_offsets [%llu, %llu) end before "
                        "they begin",
                        r->path, name, (unsigned long long)begin, (unsigned long long)end);
    if (end > r->data_len)
        return qerr_set(err, QERR_INVALID,
                        "%s: tensor '%s': data_offsets [%llu, %llu) exceed the data section of "
                        "%llu bytes",
                        r->path, name, (unsigned long long)begin, (unsigned long long)end,
                        (unsigned long long)r->data_len);
    if (end - begin != t->nbytes)
        return qerr_set(err, QERR_INVALID,
                        "%s: tensor '%s': data_offsets [%llu, %llu) do not match shape %s x %s = "
                        "%llu bytes",
                        r->path, name, (unsigned long long)begin, (unsigned long long)end,
                        shape_format(stext, sizeof stext, t->ndim, dims), dtype_name,
                        (unsigned long long)t->nbytes);
    t->offset = begin;
    t->data = r->data + begin;
    return 0;
}

static int parse_metadata(safetensors_reader_t *r, const json_t *meta, qerr_t *err) {
    if (!json_is_object(meta))
        return qerr_set(err, QERR_INVALID, "%s: __metadata__ must be an object of strings, got %s",
                        r->path, qjson_type_name(meta));
    size_t n = json_object_size(meta);
    r->meta_keys = calloc(n ? n : 1, sizeof *r->meta_keys);
    r->meta_values = calloc(n ? n : 1, sizeof *r->meta_values);
    if (!r->meta_keys || !r->meta_values)
        return qerr_set(err, QERR_NOMEM, "%s: out of memory", r->path);
    const char *key;
    json_t *val;
    json_object_foreach((json_t *)meta, key, val) {
        if (!json_is_string(val))
            return qerr_set(err, QERR_INVALID,
                            "%s: __metadata__ '%s': value must be a string, got %s", r->path, key,
                            qjson_type_name(val));
        r->meta_keys[r->n_meta] = strdup(key);
        r->meta_values[r->n_meta] = strdup(json_string_value(val));
        r->n_meta++;
        if (!r->meta_keys[r->n_meta - 1] || !r->meta_values[r->n_meta - 1])
            return qerr_set(err, QERR_NOMEM, "%s: out of memory", r->path);
    }
    /* Sort keys and values together: insertion sort on an index is enough for the handful of
     * entries metadata holds, and keeps the pairs aligned without a helper struct. */
    for (size_t i = 1; i < r->n_meta; i++) {
        char *k = r->meta_keys[i], *v = r->meta_values[i];
        size_t j = i;
        for (; j > 0 && cmp_str(r->meta_keys[j - 1], k) > 0; j--) {
            r->meta_keys[j] = r->meta_keys[j - 1];
            r->meta_values[j] = r->meta_values[j - 1];
        }
        r->meta_keys[j] = k;
        r->meta_values[j] = v;
    }
    return 0;
}

/* The format requires the byte ranges to tile the data section: no overlap (two names for one
 * byte), no hole and no trailing bytes (room for a polyglot file). */
static int check_tiling(safetensors_reader_t *r, qerr_t *err) {
    const safetensors_tensor_t **order = calloc(r->n_tensors ? r->n_tensors : 1, sizeof *order);
    if (!order)
        return qerr_set(err, QERR_NOMEM, "%s: out of memory", r->path);
    for (size_t i = 0; i < r->n_tensors; i++)
        order[i] = &r->tensors[i];
    qsort(order, r->n_tensors, sizeof *order, tensor_cmp_offset);
    int rc = 0;
    uint64_t covered = 0;
    const safetensors_tensor_t *prev = NULL;
    for (size_t i = 0; i < r->n_tensors && rc == 0; i++) {
        const safetensors_tensor_t *t = order[i];
        unsigned long long b = t->offset, e = t->offset + t->nbytes;
        if (t->offset < covered)
            rc = qerr_set(err, QERR_INVALID,
                          "%s: tensor '%s': data_offsets [%llu, %llu) overlap tensor '%s' "
                          "[%llu, %llu)",
                          r->path, t->name, b, e, prev->name, (unsigned long long)prev->offset,
                          (unsigned long long)(prev->offset + prev->nbytes));
        else if (t->offset > covered)
            rc = qerr_set(err, QERR_INVALID,
                          "%s: tensor '%s': data_offsets [%llu, %llu) leave a hole of %llu bytes "
                          "at offset %llu",
                          r->path, t->name, b, e, (unsigned long long)(t->offset - covered),
                          (unsigned long long)covered);
        covered = t->offset + t->nbytes;
        prev = t;
    }
    if (rc == 0 && covered != r->data_len)
        rc = qerr_set(err, QERR_INVALID,
                      "%s: the data section has %llu bytes but the tensors cover only %llu "
                      "(trailing bytes)",
                      r->path, (unsigned long long)r->data_len, (unsigned long long)covered);
    free(order);
    return rc;
}

static int parse_header(safetensors_reader_t *r, const unsigned char *text, size_t len,
                        qerr_t *err) {
    if (len == 0 || text[0] != '{')
        return qerr_set(err, QERR_PARSE, "%s: header does not start with '{'", r->path);
    char what[QERR_MSG_MAX];
    snprintf(what, sizeof what, "%s: header", r->path);
    json_t *root = qjson_parse((const char *)text, len, what, err);
    if (!root)
        return -1;
    int rc = -1;
    size_t n = json_object_size(root);
    r->tensors = calloc(n ? n : 1, sizeof *r->tensors);
    if (!r->tensors) {
        qerr_set(err, QERR_NOMEM, "%s: out of memory", r->path);
        goto out;
    }
    const char *key;
    json_t *val;
    json_object_foreach(root, key, val) {
        if (strcmp(key, "__metadata__") == 0) {
            if (parse_metadata(r, val, err) < 0)
                goto out;
            continue;
        }
        char *name = strdup(key);
        if (!name) {
            qerr_set(err, QERR_NOMEM, "%s: out of memory", r->path);
            goto out;
        }
        /* Counted before parsing so that destroy frees the name and shape of a failed entry. */
        safetensors_tensor_t *t = &r->tensors[r->n_tensors++];
        if (parse_tensor(r, name, val, t, err) < 0)
            goto out;
    }
    if (check_tiling(r, err) < 0)
        goto out;
    qsort(r->tensors, r->n_tensors, sizeof *r->tensors, tensor_cmp_name);
    rc = 0;
out:
    json_decref(root);
    return rc;
}

static int reader_parse_image(safetensors_reader_t *r, qerr_t *err);

safetensors_reader_t *safetensors_reader_new(const char *path, qerr_t *err) {
    safetensors_reader_t *r = calloc(1, sizeof *r);
    if (!r || !(r->path = strdup(path))) {
        free(r);
        qerr_set(err, QERR_NOMEM, "%s: out of memory", path);
        return NULL;
    }
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        qerr_set(err, errno == ENOENT ? QERR_NOTFOUND : QERR_IO, "%s: cannot open: %s", path,
                 strerror(errno));
        goto fail;
    }
    struct stat st;
    if (fstat(fd, &st) < 0) {
        qerr_set(err, QERR_IO, "%s: cannot stat: %s", path, strerror(errno));
        close(fd);
        goto fail;
    }
    if (!S_ISREG(st.st_mode)) {
        qerr_set(err, QERR_IO, "%s: not a regular file", path);
        close(fd);
        goto fail;
    }
    uint64_t size = (uint64_t)st.st_size;
    if (size < 8) {
        qerr_set(err, QERR_PARSE,
                 "%s: file is %llu bytes, shorter than the 8-byte header length field", path,
                 (unsigned long long)size);
        close(fd);
        goto fail;
    }
    if (size > SIZE_MAX) {
        qerr_set(err, QERR_RANGE, "%s: file too large to map", path);
        close(fd);
        goto fail;
    }
    void *map = mmap(NULL, (size_t)size, PROT_READ, MAP_PRIVATE, fd, 0);
    close(fd);
    if (map == MAP_FAILED) {
        qerr_set(err, QERR_IO, "%s: cannot map: %s", path, strerror(errno));
        goto fail;
    }
    r->map = map;
    r->map_len = (size_t)size;
    if (reader_parse_image(r, err) < 0)
        goto fail;
    return r;
fail:
    safetensors_reader_destroy(&r);
    return NULL;
}

/* Validates the image r->map [r->map_len >= 8] and builds the tables. */
static int reader_parse_image(safetensors_reader_t *r, qerr_t *err) {
    const char *path = r->path;
    const uint64_t size = r->map_len;
    uint64_t n = load_le64(r->map);
    if (n > SAFETENSORS_MAX_HEADER)
        return qerr_set(err, QERR_PARSE, "%s: header length %llu exceeds the limit of %llu bytes",
                        path, (unsigned long long)n, (unsigned long long)SAFETENSORS_MAX_HEADER);
    if (n > size - 8) {
        return qerr_set(err, QERR_PARSE,
                        "%s: header length %llu exceeds the %llu bytes that follow it (file "
                        "truncated?)",
                        path, (unsigned long long)n, (unsigned long long)(size - 8));
    }
    r->data = r->map + 8 + n;
    r->data_len = size - 8 - n;
    return parse_header(r, r->map + 8, (size_t)n, err);
}

safetensors_reader_t *safetensors_reader_new_memory(const void *data, size_t len, const char *what,
                                                    qerr_t *err) {
    safetensors_reader_t *r = calloc(1, sizeof *r);
    if (!r || !(r->path = strdup(what))) {
        free(r);
        qerr_set(err, QERR_NOMEM, "%s: out of memory", what);
        return NULL;
    }
    if (len < 8) {
        qerr_set(err, QERR_PARSE, "%s: %zu bytes, shorter than the 8-byte header length field",
                 what, len);
        free(r->path);
        free(r);
        return NULL;
    }
    r->map = (unsigned char *)(uintptr_t)data;
    r->map_len = len;
    r->borrowed = 1;
    if (reader_parse_image(r, err) < 0) {
        safetensors_reader_destroy(&r);
        return NULL;
    }
    return r;
}

void safetensors_reader_destroy(safetensors_reader_t **rp) {
    if (!rp || !*rp)
        return;
    safetensors_reader_t *r = *rp;
    for (size_t i = 0; i < r->n_tensors; i++) {
        free((char *)r->tensors[i].name);
        free((uint64_t *)r->tensors[i].shape);
    }
    free(r->tensors);
    for (size_t i = 0; i < r->n_meta; i++) {
        free(r->meta_keys[i]);
        free(r->meta_values[i]);
    }
    free(r->meta_keys);
    free(r->meta_values);
    if (r->map && !r->borrowed)
        munmap(r->map, r->map_len);
    free(r->path);
    free(r);
    *rp = NULL;
}

const char *safetensors_reader_path(const safetensors_reader_t *r) {
    return r->path;
}

size_t safetensors_reader_count(const safetensors_reader_t *r) {
    return r->n_tensors;
}

const safetensors_tensor_t *safetensors_reader_at(const safetensors_reader_t *r, size_t i) {
    Q_ASSERT(i < r->n_tensors);
    return &r->tensors[i];
}

const safetensors_tensor_t *safetensors_reader_find(const safetensors_reader_t *r,
                                                    const char *name) {
    size_t lo = 0, hi = r->n_tensors;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        int c = cmp_str(r->tensors[mid].name, name);
        if (c == 0)
            return &r->tensors[mid];
        if (c < 0)
            lo = mid + 1;
        else
            hi = mid;
    }
    return NULL;
}

const safetensors_tensor_t *safetensors_reader_expect(const safetensors_reader_t *r,
                                                      const char *name, safetensors_dtype_t dtype,
                                                      size_t ndim, const uint64_t *shape,
                                                      qerr_t *err) {
    const safetensors_tensor_t *t = safetensors_reader_find(r, name);
    if (!t) {
        qerr_set(err, QERR_NOTFOUND, "%s: tensor '%s' not found", r->path, name);
        return NULL;
    }
    int same = t->dtype == dtype && t->ndim == ndim;
    for (size_t i = 0; same && i < ndim; i++)
        same = t->shape[i] == shape[i];
    if (!same) {
        char want[SHAPE_TEXT], got[SHAPE_TEXT];
        qerr_set(err, QERR_INVALID, "%s: tensor '%s': expected %s %s, found %s %s", r->path, name,
                 safetensors_dtype_name(dtype), shape_format(want, sizeof want, ndim, shape),
                 safetensors_dtype_name(t->dtype),
                 shape_format(got, sizeof got, t->ndim, t->shape));
        return NULL;
    }
    return t;
}

size_t safetensors_reader_metadata_count(const safetensors_reader_t *r) {
    return r->n_meta;
}

void safetensors_reader_metadata_at(const safetensors_reader_t *r, size_t i, const char **key,
                                    const char **value) {
    Q_ASSERT(i < r->n_meta);
    *key = r->meta_keys[i];
    *value = r->meta_values[i];
}

const char *safetensors_reader_metadata(const safetensors_reader_t *r, const char *key) {
    for (size_t i = 0; i < r->n_meta; i++) {
        if (strcmp(r->meta_keys[i], key) == 0)
            return r->meta_values[i];
    }
    return NULL;
}

/* ---- Atomic file replacement ----------------------------------------------------------- */

/* Writes the whole content of the temporary file; returns 0 or -1 with err set. */
typedef int (*emit_fn)(void *ctx, int fd, const char *path, qerr_t *err);

static int write_all(int fd, const void *buf, size_t len, const char *path, qerr_t *err) {
    const unsigned char *p = buf;
    while (len > 0) {
        /* Bounded pieces: Linux writes at most ~2 GiB per call anyway. */
        size_t piece = len < ((size_t)1 << 30) ? len : ((size_t)1 << 30);
        ssize_t n = write(fd, p, piece);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return qerr_set(err, QERR_IO, "%s: write failed: %s", path, strerror(errno));
        }
        p += n;
        len -= (size_t)n;
    }
    return 0;
}

static atomic_uint tmp_counter;

/* A temporary file untouched for this long, whose writer is gone, is stale. */
#define TMP_STALE_S 600

/* Pid of a temporary file of `base` (".BASE.PID.N.tmp", atomic_replace's names), or -1. */
static long tmp_pid_of(const char *name, const char *base) {
    const size_t bl = strlen(base);
    if (name[0] != '.' || strncmp(name + 1, base, bl) != 0 || name[1 + bl] != '.')
        return -1;
    const char *p = name + 2 + bl;
    char *end;
    errno = 0;
    const long pid = strtol(p, &end, 10);
    if (errno || end == p || *p < '0' || *p > '9' || pid <= 0 || *end != '.')
        return -1;
    p = end + 1;
    (void)strtoul(p, &end, 10);
    if (errno || end == p || *p < '0' || *p > '9' || strcmp(end, ".tmp") != 0)
        return -1;
    return pid;
}

/* A writer killed mid-write leaves its temporary file behind, as large as the file it was
 * writing (a checkpoint: gigabytes). Before each write of `base` in dir, removes the ones of
 * `base` whose writer process no longer exists and that have not changed for TMP_STALE_S; the
 * age keeps safe a live writer this process cannot see (another PID namespace sharing the
 * directory). Best effort: a failure only leaves the file. */
static void tmp_sweep(const char *dir, const char *base) {
    DIR *d = opendir(dir);
    if (!d)
        return;
    const time_t now = time(NULL);
    struct dirent *e;
    while ((e = readdir(d)) != NULL) {
        const long pid = tmp_pid_of(e->d_name, base);
        if (pid < 0 || pid == (long)getpid() || (pid_t)pid != pid)
            continue;
        if (kill((pid_t)pid, 0) == 0 || errno != ESRCH)
            continue;
        struct stat st;
        if (fstatat(dirfd(d), e->d_name, &st, AT_SYMLINK_NOFOLLOW) != 0 || !S_ISREG(st.st_mode) ||
            now - st.st_mtime < TMP_STALE_S)
            continue;
        if (unlinkat(dirfd(d), e->d_name, 0) == 0) {
            const log_field_t f[] = {{"bytes", (double)st.st_size}, {"pid", (double)pid}};
            log_emit(LOG_WARN, "file.stale_tmp_removed", f, Q_ARRAY_LEN(f),
                     "%s/%s: removed the temporary file of a writer that is gone (pid %ld)", dir,
                     e->d_name, pid);
        }
    }
    closedir(d);
}

static int atomic_replace(const char *path, emit_fn emit, void *ctx, qerr_t *err) {
    const char *slash = strrchr(path, '/');
    const char *base = slash ? slash + 1 : path;
    if (*base == '\0')
        return qerr_set(err, QERR_INVALID, "%s: not a file name", path);
    size_t dir_len = slash ? (size_t)(slash - path) : 0;
    char dir[4096];
    if (dir_len + 1 > sizeof dir)
        return qerr_set(err, QERR_INVALID, "%s: path too long", path);
    if (slash) {
        memcpy(dir, path, dir_len);
        dir[dir_len] = '\0';
        if (dir_len == 0)
            strcpy(dir, "/");
    } else {
        strcpy(dir, ".");
    }

    tmp_sweep(dir, base);
    char tmp[4096 + 64];
    int fd = -1;
    for (int attempt = 0; attempt < 100 && fd < 0; attempt++) {
        unsigned k = atomic_fetch_add(&tmp_counter, 1u);
        int n = snprintf(tmp, sizeof tmp, "%.*s%s.%s.%ld.%u.tmp", (int)dir_len, path,
                         slash ? "/" : "", base, (long)getpid(), k);
        if (n < 0 || (size_t)n >= sizeof tmp)
            return qerr_set(err, QERR_INVALID, "%s: path too long", path);
        fd = open(tmp, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0666);
        if (fd < 0 && errno != EEXIST)
            return qerr_set(err, QERR_IO, "%s: cannot create temporary file %s: %s", path, tmp,
                            strerror(errno));
    }
    if (fd < 0)
        return qerr_set(err, QERR_IO, "%s: cannot find a free temporary file name", path);

    if (emit(ctx, fd, path, err) < 0)
        goto fail;
    if (fsync(fd) < 0) {
        qerr_set(err, QERR_IO, "%s: fsync failed: %s", path, strerror(errno));
        goto fail;
    }
    int cfd = fd;
    fd = -1;
    if (close(cfd) < 0) {
        qerr_set(err, QERR_IO, "%s: close failed: %s", path, strerror(errno));
        goto fail;
    }
    if (rename(tmp, path) < 0) {
        qerr_set(err, QERR_IO, "%s: cannot rename %s over it: %s", path, tmp, strerror(errno));
        goto fail;
    }
    /* The rename itself must reach the disk, or a crash could bring back the old name. */
    int dfd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dfd < 0)
        return qerr_set(err, QERR_IO, "%s: cannot open directory %s to sync it: %s", path, dir,
                        strerror(errno));
    /* EINVAL: the file system cannot sync directories (some network and virtual ones). */
    int rc = 0;
    if (fsync(dfd) < 0 && errno != EINVAL)
        rc = qerr_set(err, QERR_IO, "%s: fsync of directory %s failed: %s", path, dir,
                      strerror(errno));
    close(dfd);
    return rc;
fail:
    if (fd >= 0)
        close(fd);
    unlink(tmp);
    return -1;
}

typedef struct {
    const void *data;
    size_t len;
} bytes_ctx_t;

static int emit_bytes(void *ctx, int fd, const char *path, qerr_t *err) {
    const bytes_ctx_t *b = ctx;
    return write_all(fd, b->data, b->len, path, err);
}

int q_file_write_atomic(const char *path, const void *data, size_t len, qerr_t *err) {
    Q_ASSERT(data || len == 0);
    bytes_ctx_t b = {data, len};
    return atomic_replace(path, emit_bytes, &b, err);
}

/* ---- Writer ---------------------------------------------------------------------------- */

#define FILL_PIECE ((size_t)1 << 20)

typedef struct {
    char *name;
    safetensors_dtype_t dtype;
    size_t ndim;
    uint64_t *shape;
    uint64_t nbytes;
    const void *data;
    safetensors_fill_fn fill;
    void *fill_ctx;
    uint64_t offset; /* set by layout() */
} entry_t;

struct safetensors_writer {
    entry_t *entries;
    size_t n, cap;
    json_t *metadata; /* object of strings */
};

safetensors_writer_t *safetensors_writer_new(void) {
    safetensors_writer_t *w = calloc(1, sizeof *w);
    if (!w)
        return NULL;
    w->metadata = json_object();
    if (!w->metadata) {
        free(w);
        return NULL;
    }
    return w;
}

void safetensors_writer_destroy(safetensors_writer_t **wp) {
    if (!wp || !*wp)
        return;
    safetensors_writer_t *w = *wp;
    for (size_t i = 0; i < w->n; i++) {
        free(w->entries[i].name);
        free(w->entries[i].shape);
    }
    free(w->entries);
    json_decref(w->metadata);
    free(w);
    *wp = NULL;
}

/* Valid UTF-8 without NUL: exactly what jansson accepts for a string. */
static int utf8_ok(const char *s) {
    json_t *j = json_string(s);
    json_decref(j);
    return j != NULL;
}

static int add_entry(safetensors_writer_t *w, const char *name, safetensors_dtype_t dtype,
                     size_t ndim, const uint64_t *shape, const void *data, safetensors_fill_fn fill,
                     void *ctx, qerr_t *err) {
    Q_ASSERT(dtype >= 0 && dtype < SAFETENSORS_DTYPE_COUNT);
    Q_ASSERT(shape || ndim == 0);
    if (name[0] == '\0')
        return qerr_set(err, QERR_INVALID, "safetensors: empty tensor name");
    if (strcmp(name, "__metadata__") == 0)
        return qerr_set(err, QERR_INVALID, "safetensors: '__metadata__' is a reserved name");
    if (!utf8_ok(name))
        return qerr_set(err, QERR_INVALID, "safetensors: tensor name is not valid UTF-8");
    for (size_t i = 0; i < w->n; i++) {
        if (strcmp(w->entries[i].name, name) == 0)
            return qerr_set(err, QERR_INVALID, "safetensors: duplicate tensor '%s'", name);
    }
    uint64_t numel, nbytes;
    if (shape_size(ndim, shape, dtype_table[dtype].size, &numel, &nbytes) < 0 ||
        nbytes > (uint64_t)INT64_MAX)
        return qerr_set(err, QERR_INVALID, "safetensors: tensor '%s': size overflows", name);
    for (size_t i = 0; i < ndim; i++) {
        if (shape[i] > (uint64_t)INT64_MAX)
            return qerr_set(err, QERR_INVALID, "safetensors: tensor '%s': dimension too large",
                            name);
    }
    Q_ASSERT(data || fill || nbytes == 0);
    if (w->n == w->cap) {
        size_t cap = w->cap ? 2 * w->cap : 16;
        entry_t *e = realloc(w->entries, cap * sizeof *e);
        if (!e)
            return qerr_set(err, QERR_NOMEM, "safetensors: out of memory");
        w->entries = e;
        w->cap = cap;
    }
    entry_t e = {.dtype = dtype,
                 .ndim = ndim,
                 .nbytes = nbytes,
                 .data = data,
                 .fill = fill,
                 .fill_ctx = ctx};
    e.name = strdup(name);
    e.shape = malloc((ndim ? ndim : 1) * sizeof *e.shape);
    if (!e.name || !e.shape) {
        free(e.name);
        free(e.shape);
        return qerr_set(err, QERR_NOMEM, "safetensors: out of memory");
    }
    if (ndim)
        memcpy(e.shape, shape, ndim * sizeof *shape);
    w->entries[w->n++] = e;
    return 0;
}

int safetensors_writer_add(safetensors_writer_t *w, const char *name, safetensors_dtype_t dtype,
                           size_t ndim, const uint64_t *shape, const void *data, qerr_t *err) {
    return add_entry(w, name, dtype, ndim, shape, data, NULL, NULL, err);
}

int safetensors_writer_add_fill(safetensors_writer_t *w, const char *name,
                                safetensors_dtype_t dtype, size_t ndim, const uint64_t *shape,
                                safetensors_fill_fn fill, void *ctx, qerr_t *err) {
    Q_ASSERT(fill);
    return add_entry(w, name, dtype, ndim, shape, NULL, fill, ctx, err);
}

int safetensors_writer_set_metadata(safetensors_writer_t *w, const char *key, const char *value,
                                    qerr_t *err) {
    json_t *v = json_string(value);
    if (!v)
        return qerr_set(err, QERR_INVALID,
                        "safetensors: __metadata__ '%s': value is not valid "
                        "UTF-8",
                        key);
    /* json_object_set_new checks the key's UTF-8 and takes v in every case. */
    if (json_object_set_new(w->metadata, key, v) < 0)
        return qerr_set(err, QERR_INVALID, "safetensors: __metadata__ key is not valid UTF-8");
    return 0;
}

/* Reference layout: larger elements first (so every tensor is aligned to its element size once
 * the data section starts on a multiple of 8), then by name. */
static int entry_cmp_layout(const void *a, const void *b) {
    const entry_t *x = a, *y = b;
    size_t sx = dtype_table[x->dtype].size, sy = dtype_table[y->dtype].size;
    if (sx != sy)
        return sx > sy ? -1 : 1;
    return cmp_str(x->name, y->name);
}

static json_t *header_build(safetensors_writer_t *w, qerr_t *err) {
    json_t *root = json_object();
    if (!root)
        goto nomem;
    if (json_object_size(w->metadata) > 0 && json_object_set(root, "__metadata__", w->metadata) < 0)
        goto nomem;
    for (size_t i = 0; i < w->n; i++) {
        const entry_t *e = &w->entries[i];
        json_t *shape = json_array();
        json_t *desc =
            json_pack("{s:s, s:o, s:[I, I]}", "dtype", dtype_table[e->dtype].name, "shape", shape,
                      "data_offsets", (json_int_t)e->offset, (json_int_t)(e->offset + e->nbytes));
        if (!desc || json_object_set_new(root, e->name, desc) < 0)
            goto nomem;
        for (size_t d = 0; d < e->ndim; d++) {
            if (json_array_append_new(shape, json_integer((json_int_t)e->shape[d])) < 0)
                goto nomem;
        }
    }
    return root;
nomem:
    json_decref(root);
    qerr_set(err, QERR_NOMEM, "safetensors: out of memory building the header");
    return NULL;
}

typedef struct {
    safetensors_writer_t *w;
    const char *header; /* padded to header_len */
    uint64_t header_len;
    unsigned char *piece; /* FILL_PIECE bytes, for fill callbacks */
} write_ctx_t;

static int emit_safetensors(void *ctx, int fd, const char *path, qerr_t *err) {
    write_ctx_t *c = ctx;
    unsigned char len[8];
    store_le64(len, c->header_len);
    if (write_all(fd, len, 8, path, err) < 0 ||
        write_all(fd, c->header, (size_t)c->header_len, path, err) < 0)
        return -1;
    for (size_t i = 0; i < c->w->n; i++) {
        const entry_t *e = &c->w->entries[i];
        if (!e->fill) {
            if (e->nbytes > SIZE_MAX)
                return qerr_set(err, QERR_RANGE, "%s: tensor '%s' too large", path, e->name);
            if (write_all(fd, e->data, (size_t)e->nbytes, path, err) < 0)
                return -1;
            continue;
        }
        for (uint64_t off = 0; off < e->nbytes;) {
            size_t n = e->nbytes - off < FILL_PIECE ? (size_t)(e->nbytes - off) : FILL_PIECE;
            if (e->fill(e->fill_ctx, off, c->piece, n, err) < 0)
                return qerr_wrap(err, "%s: tensor '%s'", path, e->name);
            if (write_all(fd, c->piece, n, path, err) < 0)
                return -1;
            off += n;
        }
    }
    return 0;
}

/* Lays the tensors out and builds the padded header (*header malloc'd, *padded bytes); `what`
 * names the destination in errors. */
static int writer_prepare(safetensors_writer_t *w, const char *what, char **header,
                          uint64_t *padded_len, qerr_t *err) {
    if (w->n > 1)
        qsort(w->entries, w->n, sizeof *w->entries, entry_cmp_layout);
    uint64_t off = 0;
    for (size_t i = 0; i < w->n; i++) {
        w->entries[i].offset = off;
        if (__builtin_add_overflow(off, w->entries[i].nbytes, &off) || off > (uint64_t)INT64_MAX)
            return qerr_set(err, QERR_RANGE, "%s: total tensor size overflows", what);
    }
    json_t *root = header_build(w, err);
    if (!root)
        return qerr_wrap(err, "%s", what);
    char *text = json_dumps(root, JSON_COMPACT | JSON_SORT_KEYS);
    json_decref(root);
    if (!text)
        return qerr_set(err, QERR_NOMEM, "%s: cannot encode the header", what);
    size_t len = strlen(text);
    size_t padded = (len + 7) & ~(size_t)7;
    if (padded > SAFETENSORS_MAX_HEADER) {
        free(text);
        return qerr_set(err, QERR_RANGE, "%s: header of %zu bytes exceeds the format's limit", what,
                        padded);
    }
    char *h = malloc(padded);
    if (!h) {
        free(text);
        return qerr_set(err, QERR_NOMEM, "%s: out of memory", what);
    }
    memcpy(h, text, len);
    memset(h + len, ' ', padded - len);
    free(text);
    *header = h;
    *padded_len = padded;
    return 0;
}

int safetensors_writer_write(safetensors_writer_t *w, const char *path, qerr_t *err) {
    char *header = NULL;
    uint64_t padded = 0;
    if (writer_prepare(w, path, &header, &padded, err) < 0)
        return -1;
    int any_fill = 0;
    for (size_t i = 0; i < w->n; i++)
        any_fill |= w->entries[i].fill != NULL;
    unsigned char *piece = any_fill ? malloc(FILL_PIECE) : NULL;
    int rc = -1;
    if (any_fill && !piece) {
        qerr_set(err, QERR_NOMEM, "%s: out of memory", path);
        goto out;
    }
    write_ctx_t c = {w, header, padded, piece};
    rc = atomic_replace(path, emit_safetensors, &c, err);
out:
    free(header);
    free(piece);
    return rc;
}

int safetensors_writer_serialize(safetensors_writer_t *w, void **out, size_t *len, qerr_t *err) {
    char *header = NULL;
    uint64_t padded = 0;
    if (writer_prepare(w, "safetensors image", &header, &padded, err) < 0)
        return -1;
    uint64_t total = 8 + padded;
    for (size_t i = 0; i < w->n; i++)
        total += w->entries[i].nbytes;
    unsigned char *buf = total <= SIZE_MAX ? q_aligned_alloc(Q_ALIGN, (size_t)total) : NULL;
    if (!buf) {
        free(header);
        return qerr_set(err, QERR_NOMEM, "safetensors image: out of memory for %llu bytes",
                        (unsigned long long)total);
    }
    store_le64(buf, padded);
    memcpy(buf + 8, header, (size_t)padded);
    free(header);
    unsigned char *p = buf + 8 + padded;
    for (size_t i = 0; i < w->n; i++) {
        const entry_t *e = &w->entries[i];
        for (uint64_t off = 0; off < e->nbytes;) {
            size_t n = e->nbytes - off < FILL_PIECE ? (size_t)(e->nbytes - off) : FILL_PIECE;
            if (!e->fill)
                memcpy(p + off, (const unsigned char *)e->data + off, n);
            else if (e->fill(e->fill_ctx, off, p + off, n, err) < 0) {
                q_aligned_free(buf);
                return qerr_wrap(err, "safetensors image: tensor '%s'", e->name);
            }
            off += n;
        }
        p += e->nbytes;
    }
    *out = buf;
    *len = (size_t)total;
    return 0;
}
