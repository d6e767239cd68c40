/* Codec of the log protocol (proto/log.proto): every process publishes its log records
 * (common/log.h) as Envelope{LogRecord} to the log hub; monitors read them back. */
#ifndef QUILLAN_LOG_CODEC_H
#define QUILLAN_LOG_CODEC_H

#include "log.h"
#include "wire_codec.h"

/* Fills *lr from rec without copying: lr's strings point at rec's, and its field table at
 * entries[0..rec->n_fields) through ptrs[0..rec->n_fields), both provided by the caller. The
 * result is valid while rec, entries and ptrs live; send it as an Envelope's log_record. */
void log_codec_record_fill(Quillan__LogRecord *lr, const log_record_t *rec,
                           Quillan__LogRecord__FieldsEntry *entries,
                           Quillan__LogRecord__FieldsEntry **ptrs);

/* Packs rec as a log Envelope into *out (freed with wire_buf_free). Strings that are not valid
 * UTF-8 are refused (QERR_INVALID). Allocates only the field table. */
int log_codec_pack_record(const wire_header_t *hdr, const log_record_t *rec, wire_buf_t *out,
                          qerr_t *err);

/* wire_codec_unpack for the log protocol, then log_codec_validate. */
wire_msg_t *log_codec_unpack(const void *data, size_t len, size_t budget, qerr_t *err);

/* Checks a log Envelope: a LogRecord with a finite time, a known level and a non-empty event.
 * Field values may be NaN or infinite (they are written as JSON null). */
int log_codec_validate(const Quillan__Envelope *env, qerr_t *err);

/* Views a decoded LogRecord as a log_record_t whose strings point into pr (valid while pr
 * lives); up to cap fields are copied into fields[]. Returns the number of fields copied. */
size_t log_codec_record_view(const Quillan__LogRecord *pr, log_record_t *out, log_field_t *fields,
                             size_t cap);

/* net_validate_fn adapter (common/net.h); ctx is unused. */
int log_codec_net_validate(void *ctx, const Quillan__Envelope *env, size_t payload_len,
                           qerr_t *err);

#endif
