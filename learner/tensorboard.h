/* TensorBoard event files for scalars, so a run opens in the tool users already have.
 *
 * The format is small, public and stable:
 *   - a file `events.out.tfevents.<unix seconds>.<host>` of TFRecords, each
 *       uint64 length (little endian), uint32 masked_crc32c(length bytes),
 *       length bytes of data, uint32 masked_crc32c(data),
 *     where masked_crc32c(x) = ((c >> 15) | (c << 17)) + 0xa282ead8 with c = CRC-32C(x);
 *   - each record an Event protobuf (tensorflow/core/util/event.proto):
 *       Event   { double wall_time = 1; int64 step = 2; string file_version = 3;
 *                 Summary summary = 5; }
 *       Summary { repeated Value value = 1; }
 *       Value   { string tag = 1; float simple_value = 2; }
 *     the first Event of a file carries file_version "brain.Event:2" and nothing else.
 * The protobuf encoding is written by hand here (five field types); proto/tensorboard.proto
 * holds the same field numbers for independent readers (tests/e2e/tb_read.py).
 *
 * Two ways in:
 *   - tensorboard_writer_*: write scalars yourself, one Event per call;
 *   - tensorboard_sink_*: a common/log.h sink that turns every `learner.step` and `eval`
 *     record into one Event, so a daemon enables TensorBoard with one call. */
#ifndef QUILLAN_TENSORBOARD_H
#define QUILLAN_TENSORBOARD_H

#include "error.h"
#include "log.h"

#include <stddef.h>
#include <stdint.h>

/* CRC-32C (Castagnoli, reflected polynomial 0x82F63B78) of n bytes, continuing from crc
 * (start with 0). crc32c("123456789") = 0xE3069283. */
uint32_t tensorboard_crc32c(uint32_t crc, const void *data, size_t n);

/* The TFRecord mask of a CRC: ((crc >> 15) | (crc << 17)) + 0xa282ead8 (mod 2^32). */
uint32_t tensorboard_crc_mask(uint32_t crc);

/* Frames n bytes of data as one TFRecord into out, which must hold n + 16 bytes; returns the
 * bytes written (n + 16). */
size_t tensorboard_record_frame(uint8_t *out, const void *data, size_t n);

typedef struct tensorboard_writer tensorboard_writer_t;

typedef struct {
    uint64_t events;   /* Events written, file_version included */
    uint64_t failures; /* Events not written: I/O error or out of memory */
} tensorboard_stats_t;

/* Creates dir (and its parents) when missing, opens a new event file in it (the name of
 * TensorBoard's own writers, with a numeric suffix if that name is taken) and writes the
 * file_version Event. Returns the writer, or NULL with err (QERR_IO naming the path). */
tensorboard_writer_t *tensorboard_writer_new(const char *dir, qerr_t *err);

/* Path of the event file (owned by the writer). */
const char *tensorboard_writer_path(const tensorboard_writer_t *w);

/* Writes one Event at step with n scalars (names[i] -> values[i], stored as float32, as
 * TensorBoard does) and flushes it to the file, so a reader sees whole records only.
 * wall_time in seconds since the Unix epoch. Non-finite values are written as they are
 * (TensorBoard shows NaN). Names must be non-empty. Returns 0, or -1 with err (QERR_IO). */
int tensorboard_write_scalars(tensorboard_writer_t *w, int64_t step, double wall_time,
                              const char *const names[], const double values[], size_t n,
                              qerr_t *err);

/* Copies the counters; call it from the thread that writes (for a sink: a thread that logs,
 * since the sink writes under the log lock) or after writing stopped. */
void tensorboard_writer_stats(const tensorboard_writer_t *w, tensorboard_stats_t *out);

/* Closes the file and sets *w to NULL; safe when *w is NULL. */
void tensorboard_writer_destroy(tensorboard_writer_t **w);

/* Writes rec as one Event if it is a `learner.step` or `eval` record with a finite `step`
 * field: every other numeric field becomes a scalar tagged with its field name, at that step
 * and the record's time. Other records are ignored. Returns 1 when an Event was written, 0
 * when the record was ignored, -1 with err on a write failure. The log sink below calls it;
 * a process that receives records from elsewhere (quillan monitor --tensorboard) calls it
 * directly. */
int tensorboard_write_record(tensorboard_writer_t *w, const log_record_t *rec, qerr_t *err);

typedef struct tensorboard_sink tensorboard_sink_t;

/* A writer on dir registered as a common/log.h sink that passes every record to
 * tensorboard_write_record. Failures inside the sink cannot be logged (sinks run under the log
 * lock): they are counted in the writer's stats. Returns the sink, or NULL with err (writer
 * failure, sink table full). */
tensorboard_sink_t *tensorboard_sink_new(const char *dir, qerr_t *err);

/* The sink's writer (owned by the sink), for its path and stats. */
tensorboard_writer_t *tensorboard_sink_writer(tensorboard_sink_t *s);

/* Unregisters the sink, closes the writer and sets *s to NULL; safe when *s is NULL. */
void tensorboard_sink_destroy(tensorboard_sink_t **s);

#endif
