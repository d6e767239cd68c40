/* Log files (ARCHITECTURE.md §6, config logging.file): the records of common/log.h as JSON
 * lines (log_record_format_json, the format of stderr), appended to a file that is rotated by
 * size: when the next line would take the file past max_bytes, PATH becomes PATH.1, PATH.1
 * becomes PATH.2, ... up to PATH.KEEP (the oldest is deleted) and a fresh PATH starts. A line
 * is never split across files; a single line longer than max_bytes gets a file of its own.
 *
 * One process writes a given path (rotation renames files under other writers' feet).
 * Every daemon adds the sink the same way:
 *     log_file_t *lf = NULL;
 *     if (cfg->logging.file[0])
 *         lf = log_file_sink_new(cfg->logging.file, (uint64_t)cfg->logging.file_max_mb << 20,
 *                                cfg->logging.file_keep, &err);
 *     ...
 *     log_file_destroy(&lf);
 */
#ifndef QUILLAN_LOG_FILE_H
#define QUILLAN_LOG_FILE_H

#include "error.h"
#include "log.h"

#include <stddef.h>
#include <stdint.h>

/* Rotated files kept at most (PATH.1 .. PATH.LOG_FILE_KEEP_MAX). */
#define LOG_FILE_KEEP_MAX 1000

typedef struct log_file log_file_t;

typedef struct {
    uint64_t records;   /* lines written */
    uint64_t rotations; /* times PATH was rotated */
    uint64_t failures;  /* lines lost: write, rotation or memory failure */
} log_file_stats_t;

/* Opens (creating, or appending to) path. max_bytes: rotate before a line would take the file
 * past it; 0 = never rotate. keep: rotated files kept, in [0, LOG_FILE_KEEP_MAX]; 0 = the full
 * file is deleted at rotation. Returns the file, or NULL with err (QERR_IO naming path,
 * QERR_RANGE for keep). */
log_file_t *log_file_new(const char *path, uint64_t max_bytes, int keep, qerr_t *err);

/* log_file_new, then registered as a common/log.h sink that writes every record (failures in
 * the sink are only counted: a sink cannot log). NULL with err, also when the sink table is
 * full. */
log_file_t *log_file_sink_new(const char *path, uint64_t max_bytes, int keep, qerr_t *err);

/* Writes rec as one JSON line, rotating first when needed, and flushes it (a crash loses no
 * finished line). Returns 0, or -1 with err (QERR_IO naming the path). Not for a file that is
 * a registered sink: the sink writes under the log lock, this would race with it. */
int log_file_write(log_file_t *f, const log_record_t *rec, qerr_t *err);

/* Path of the current file (owned by f). */
const char *log_file_path(const log_file_t *f);

/* Copies the counters. A sink updates them under the log lock: read them from a thread that
 * logs, or once logging has stopped. */
void log_file_stats(const log_file_t *f, log_file_stats_t *out);

/* Unregisters the sink if it is one, closes the file and sets *f to NULL; safe when *f is
 * NULL. */
void log_file_destroy(log_file_t **f);

#endif
