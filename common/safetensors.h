/* safetensors files: a validating zero-copy reader and an atomic writer.
 *
 * Format (Hugging Face safetensors): 8 bytes N (u64 little-endian), N bytes of UTF-8 JSON
 * header, then the data section. The header maps each tensor name to {"dtype", "shape",
 * "data_offsets": [BEGIN, END]} with offsets relative to the data section; the optional key
 * "__metadata__" holds a string -> string map. Tensors are row-major, little-endian, packed.
 *
 * The reader treats every file as hostile and enforces what the reference implementation
 * enforces: N <= SAFETENSORS_MAX_HEADER and N <= file size - 8; the header starts with '{' and
 * is a JSON object without duplicate keys; each tensor has exactly the keys dtype, shape and
 * data_offsets; dtype is known; shape entries are non-negative integers whose product times
 * the dtype size (no overflow) equals END - BEGIN; the tensors' byte ranges tile the data
 * section exactly (sorted by offset, each starts where the previous ends, the first at 0, the
 * last at the end of the file: no overlap, no hole, no trailing bytes); "__metadata__" values
 * are strings. Every error names the file, and the tensor or field at fault.
 *
 * Quillan's own files (checkpoints, quantized policies) are written by safetensors_writer: the
 * header is compact JSON with sorted keys padded with spaces so the data section starts at a
 * multiple of 8 bytes, and tensors are laid out by decreasing element size, then name, as the
 * reference writer does, so every tensor of such a file is aligned to its element size in the
 * mapping. Python's safetensors, PyTorch and numpy read these files.
 *
 * Packed quantized tensors are stored as U8 with their format in "__metadata__" (MODEL.md). */
#ifndef QUILLAN_SAFETENSORS_H
#define QUILLAN_SAFETENSORS_H

#include "error.h"

#include <stddef.h>
#include <stdint.h>

/* Largest header accepted, as in the reference implementation (100 MB). */
#define SAFETENSORS_MAX_HEADER ((uint64_t)100000000)

/* Every standard safetensors dtype. F8_* are the 1-byte float8 formats (stored, not converted). */
typedef enum {
    SAFETENSORS_F64 = 0,
    SAFETENSORS_F32,
    SAFETENSORS_F16,
    SAFETENSORS_BF16,
    SAFETENSORS_F8_E4M3,
    SAFETENSORS_F8_E5M2,
    SAFETENSORS_I64,
    SAFETENSORS_I32,
    SAFETENSORS_I16,
    SAFETENSORS_I8,
    SAFETENSORS_U64,
    SAFETENSORS_U32,
    SAFETENSORS_U16,
    SAFETENSORS_U8,
    SAFETENSORS_BOOL, /* one byte per element, 0 or 1 (values are not checked) */
    SAFETENSORS_DTYPE_COUNT
} safetensors_dtype_t;

/* The header spelling ("F32", "BF16", "F8_E4M3", ...). */
const char *safetensors_dtype_name(safetensors_dtype_t dtype);
/* Bytes per element: 8, 4, 2 or 1. */
size_t safetensors_dtype_size(safetensors_dtype_t dtype);
/* Returns 0 and sets *out when name is a dtype spelling (case-sensitive), else -1. */
int safetensors_dtype_parse(const char *name, safetensors_dtype_t *out);

/* One tensor of an open file. Every pointer lives as long as the reader. */
typedef struct {
    const char *name;
    safetensors_dtype_t dtype;
    size_t ndim;           /* 0 for a scalar */
    const uint64_t *shape; /* ndim entries */
    uint64_t numel;        /* product of shape (1 for a scalar, 0 when a dimension is 0) */
    uint64_t nbytes;       /* numel * dtype size */
    uint64_t offset;       /* BEGIN: bytes from the start of the data section */
    const void *data;      /* read-only, inside the file's mapping; do not dereference when
                            * nbytes is 0. Aligned to the element size in files Quillan wrote;
                            * other writers give no alignment guarantee (use memcpy). */
} safetensors_tensor_t;

/* ---- Reader ---------------------------------------------------------------------------- */

typedef struct safetensors_reader safetensors_reader_t;

/* Opens, maps read-only and validates the file. Returns NULL with err set (QERR_IO for open,
 * stat or mmap failures, QERR_PARSE for a malformed header, QERR_INVALID for well-formed JSON
 * that breaks the format's rules), every message starting with the path.
 * The mapping assumes the file is not truncated while open: Quillan replaces files by rename,
 * which leaves an open reader on the old, intact file. */
safetensors_reader_t *safetensors_reader_new(const char *path, qerr_t *err);
/* Same validation on an image of len bytes in memory, e.g. a snapshot received over the network.
 * The bytes are borrowed: they must stay alive and unchanged until the reader is destroyed, and
 * tensor data points into them. `what` stands for the path in every message. */
safetensors_reader_t *safetensors_reader_new_memory(const void *data, size_t len, const char *what,
                                                    qerr_t *err);
/* Unmaps and frees; NULLs *r; safe on NULL and twice. Tensor and metadata pointers die. */
void safetensors_reader_destroy(safetensors_reader_t **r);

const char *safetensors_reader_path(const safetensors_reader_t *r);
/* Number of tensors; tensors are indexed 0..count-1 in byte order of their names. */
size_t safetensors_reader_count(const safetensors_reader_t *r);
const safetensors_tensor_t *safetensors_reader_at(const safetensors_reader_t *r, size_t i);
/* The tensor called name, or NULL when absent (binary search). */
const safetensors_tensor_t *safetensors_reader_find(const safetensors_reader_t *r,
                                                    const char *name);
/* Checked lookup for loaders: the tensor called name with this dtype and shape, or NULL with
 * err set: "PATH: tensor 'NAME' not found" (QERR_NOTFOUND) or "PATH: tensor 'NAME': expected
 * F32 [10, 4], found F16 [10, 4]" (QERR_INVALID). */
const safetensors_tensor_t *safetensors_reader_expect(const safetensors_reader_t *r,
                                                      const char *name, safetensors_dtype_t dtype,
                                                      size_t ndim, const uint64_t *shape,
                                                      qerr_t *err);

/* "__metadata__": number of entries, i-th entry in byte order of keys, lookup by key (NULL when
 * absent). Strings live as long as the reader. */
size_t safetensors_reader_metadata_count(const safetensors_reader_t *r);
void safetensors_reader_metadata_at(const safetensors_reader_t *r, size_t i, const char **key,
                                    const char **value);
const char *safetensors_reader_metadata(const safetensors_reader_t *r, const char *key);

/* ---- Writer ---------------------------------------------------------------------------- */

typedef struct safetensors_writer safetensors_writer_t;

/* Produces the bytes of a tensor in order: called with consecutive pieces [offset, offset+len)
 * of the tensor's nbytes (len <= 1 MiB), it fills buf and returns 0, or -1 with err set to
 * abort the write. Lets a caller convert or quantize a tensor while it is written without
 * holding the whole result in memory. */
typedef int (*safetensors_fill_fn)(void *ctx, uint64_t offset, void *buf, size_t len, qerr_t *err);

safetensors_writer_t *safetensors_writer_new(void);
/* Frees the writer (not the callers' data); NULLs *w; safe on NULL and twice. */
void safetensors_writer_destroy(safetensors_writer_t **w);

/* Adds a tensor whose nbytes = prod(shape) * dtype size bytes are at data (may be NULL only when
 * nbytes is 0). Name and shape are copied; data is NOT: the caller keeps it alive and unchanged
 * until safetensors_writer_write returns. Errors (QERR_INVALID): empty name, the reserved name
 * "__metadata__", a name that is not valid UTF-8 or holds NUL, a duplicate name, a size that
 * overflows. */
int safetensors_writer_add(safetensors_writer_t *w, const char *name, safetensors_dtype_t dtype,
                           size_t ndim, const uint64_t *shape, const void *data, qerr_t *err);
/* Same, but the bytes come from fill(ctx, ...) during the write; ctx must stay valid until then. */
int safetensors_writer_add_fill(safetensors_writer_t *w, const char *name,
                                safetensors_dtype_t dtype, size_t ndim, const uint64_t *shape,
                                safetensors_fill_fn fill, void *ctx, qerr_t *err);
/* Sets "__metadata__"[key] = value (both copied, both UTF-8); setting a key again replaces it. */
int safetensors_writer_set_metadata(safetensors_writer_t *w, const char *key, const char *value,
                                    qerr_t *err);

/* Writes the file atomically (see q_file_write_atomic for the sequence). The writer keeps its
 * tensors and may write again. On error (QERR_IO naming the path, or the fill callback's
 * error) the temporary file is removed and an existing file at path is untouched. */
int safetensors_writer_write(safetensors_writer_t *w, const char *path, qerr_t *err);

/* Produces the same bytes safetensors_writer_write would write, in one buffer allocated with
 * q_aligned_alloc (alloc.h; 64-byte aligned, so every tensor is aligned to its element size):
 * *out (free with q_aligned_free) and *len. Fill callbacks run as for a file. */
int safetensors_writer_serialize(safetensors_writer_t *w, void **out, size_t *len, qerr_t *err);

/* ---- Atomic replacement of small files ------------------------------------------------- */

/* Replaces the file at path with len bytes of data so that a crash at any moment leaves either
 * the old file or the new one, never a mixture: write a uniquely named temporary file
 * ".NAME.PID.N.tmp" in the same directory, fsync it, rename it over path, fsync the directory.
 * The new file has mode 0666 less the umask. On error the temporary file is removed. A process
 * killed mid-write leaves it behind (it is never read); a later write of the same path removes
 * it once its writer's PID no longer exists and it is 10 minutes old, and logs a WARN event
 * file.stale_tmp_removed. Used for the checkpoint `latest` pointer. Returns 0 or -1 with err
 * set (QERR_IO, naming the path). */
int q_file_write_atomic(const char *path, const void *data, size_t len, qerr_t *err);

#endif
