/* JSONL datasets (ARCHITECTURE.md section 6): one JSON object per line.
 *
 * RL lines:  {"prompt": "...", "answer": "...", ...any other fields}
 * SFT lines: {"prompt": "...", "completion": "...", ...any other fields}
 *
 * Rules (every violation is an error naming PATH:LINE, lines counted from 1):
 * - Lines end with '\n'; a final line without one is accepted, and so is a '\r' before the
 *   '\n' (JSON treats it as white space).
 * - A blank (empty or white-space only) line inside the file is an error: it usually means a
 *   hand edit went wrong, and skipping it would make line numbers and example indices differ.
 *   Blank lines at the very end of the file are ignored.
 * - A line longer than the reader's max_line_bytes (default 1 MiB, not counting the newline)
 *   is an error.
 * - Each line must be a JSON object without duplicate keys; "prompt" must be a string; SFT
 *   needs a string "completion"; RL's "answer" is optional and, when present, a string.
 * - A file with no lines at all is an error (an empty dataset).
 *
 * The reader indexes line offsets once at open (one sequential pass, which also checks line
 * lengths and blank lines and computes a content fingerprint) and parses lines on demand, so a
 * data position is just an example index that a checkpoint can store and the learner can
 * shuffle. Each example's fields other than "prompt" (and "completion" for SFT) become its
 * metadata, name -> JSON-encoded value, as RewardRequest.metadata carries them; RL's "answer"
 * is kept in the metadata too, since reward services need it to score. */
#ifndef QUILLAN_JSONL_H
#define QUILLAN_JSONL_H

#include "error.h"

#include <jansson.h>
#include <stddef.h>
#include <stdint.h>

#define JSONL_MAX_LINE_DEFAULT ((size_t)1 << 20)
/* Upper bound for max_line_bytes: one line is read into one buffer. */
#define JSONL_MAX_LINE_LIMIT ((size_t)1 << 30)

typedef enum { JSONL_TASK_RL = 0, JSONL_TASK_SFT, JSONL_TASK_COUNT } jsonl_task_t;

/* One example. Embedded struct: fill with jsonl_reader_example, release with
 * jsonl_example_free. All strings are owned by the example. */
typedef struct {
    size_t index;     /* example index, 0-based */
    size_t line;      /* file line, 1-based (index + 1) */
    char *prompt;     /* UTF-8 text */
    char *answer;     /* RL: the "answer" string, or NULL when absent; SFT: NULL */
    char *completion; /* SFT: the "completion" string; RL: NULL */
    size_t n_meta;
    char **meta_keys;   /* sorted by key bytes */
    char **meta_values; /* compact JSON with sorted object keys: "\"42\"", "7", "[1,2]" */
} jsonl_example_t;

void jsonl_example_free(jsonl_example_t *ex);

/* ---- Reader ---------------------------------------------------------------------------- */

typedef struct jsonl_reader jsonl_reader_t;

/* Opens and indexes the file. max_line_bytes 0 means JSONL_MAX_LINE_DEFAULT; it must be at
 * most JSONL_MAX_LINE_LIMIT. Returns NULL with err set (QERR_IO / QERR_NOTFOUND for the file,
 * QERR_RANGE for an over-long line, QERR_INVALID for a blank line or an empty file).
 * The file must not change while the reader is open. After construction every function here
 * may be called from several threads at once (lines are read with pread). */
jsonl_reader_t *jsonl_reader_new(const char *path, size_t max_line_bytes, qerr_t *err);
/* Closes the file and frees; NULLs *r; safe on NULL and twice. */
void jsonl_reader_destroy(jsonl_reader_t **r);

const char *jsonl_reader_path(const jsonl_reader_t *r);
/* Number of examples (lines, trailing blank lines excluded). */
size_t jsonl_reader_count(const jsonl_reader_t *r);
/* FNV-1a 64 of the file's bytes: store it with a data position and compare on restore to notice
 * that the dataset changed under a checkpoint. */
uint64_t jsonl_reader_fingerprint(const jsonl_reader_t *r);

/* Parses line index+1 as a JSON object; index < jsonl_reader_count (asserted: a caller bug).
 * Returns a new reference (json_decref) or NULL with err set: "PATH:LINE: not valid JSON: ... at
 * column C" or "PATH:LINE: expected a JSON object, got an array" (QERR_PARSE), or a read failure
 * (QERR_IO). */
json_t *jsonl_reader_object(const jsonl_reader_t *r, size_t index, qerr_t *err);

/* Parses and validates example `index` for the task into *ex (overwritten; free it with
 * jsonl_example_free after a 0 return; after -1 it holds nothing). Errors name PATH:LINE and
 * the field: "train.jsonl:42: missing field 'prompt'", "train.jsonl:7: field 'completion':
 * expected a string, got null". */
int jsonl_reader_example(const jsonl_reader_t *r, size_t index, jsonl_task_t task,
                         jsonl_example_t *ex, qerr_t *err);

/* Parses and validates every line for the task, stopping at the first error: lets a learner
 * reject a broken dataset at start rather than hours into a run. */
int jsonl_reader_check(const jsonl_reader_t *r, jsonl_task_t task, qerr_t *err);

/* ---- Writer ---------------------------------------------------------------------------- */

typedef struct jsonl_writer jsonl_writer_t;

typedef enum { JSONL_WRITE_TRUNCATE = 0, JSONL_WRITE_APPEND } jsonl_write_mode_t;

/* Opens path for writing JSONL (created with mode 0666 less the umask). APPEND refuses a
 * non-empty file whose last byte is not '\n' (a line cut short by a crash), since appending
 * would glue the new line to the broken one. Returns NULL with err set (QERR_IO, naming path). */
jsonl_writer_t *jsonl_writer_new(const char *path, jsonl_write_mode_t mode, qerr_t *err);
/* Writes obj (a JSON object, keys in insertion order, compact) and '\n' as one line. Errors:
 * QERR_INVALID when obj is not an object or cannot be encoded, QERR_IO on write failure. */
int jsonl_writer_append(jsonl_writer_t *w, const json_t *obj, qerr_t *err);
/* Flushes buffered lines and fsyncs; call before destroy to learn of write errors. */
int jsonl_writer_flush(jsonl_writer_t *w, qerr_t *err);
/* Flushes (errors are lost: call jsonl_writer_flush first), closes, frees; NULLs *w. */
void jsonl_writer_destroy(jsonl_writer_t **w);

#endif
