#include "log_codec.h"

#include <math.h>
#include <stdlib.h>

_Static_assert((int)LOG_DEBUG == QUILLAN__LOG_LEVEL__LOG_LEVEL_DEBUG &&
                   (int)LOG_INFO == QUILLAN__LOG_LEVEL__LOG_LEVEL_INFO &&
                   (int)LOG_WARN == QUILLAN__LOG_LEVEL__LOG_LEVEL_WARN &&
                   (int)LOG_ERROR == QUILLAN__LOG_LEVEL__LOG_LEVEL_ERROR,
               "log.h levels and log.proto levels share their numbers");

/* protobuf-c's string fields are not const; packing never writes through them. */
static char *str_field(const char *s) {
    return (char *)(s ? s : "");
}

void log_codec_record_fill(Quillan__LogRecord *lr, const log_record_t *rec,
                           Quillan__LogRecord__FieldsEntry *entries,
                           Quillan__LogRecord__FieldsEntry **ptrs) {
    Quillan__LogRecord init = QUILLAN__LOG_RECORD__INIT;
    *lr = init;
    lr->time = rec->time;
    lr->process = str_field(rec->process);
    lr->host = str_field(rec->host);
    lr->level = (Quillan__LogLevel)rec->level;
    lr->event = str_field(rec->event);
    lr->text = str_field(rec->text);
    for (size_t i = 0; i < rec->n_fields; i++) {
        Quillan__LogRecord__FieldsEntry e = QUILLAN__LOG_RECORD__FIELDS_ENTRY__INIT;
        e.key = str_field(rec->fields[i].key);
        e.value = rec->fields[i].value;
        entries[i] = e;
        ptrs[i] = &entries[i];
    }
    lr->n_fields = rec->n_fields;
    lr->fields = rec->n_fields ? ptrs : NULL;
}

int log_codec_pack_record(const wire_header_t *hdr, const log_record_t *rec, wire_buf_t *out,
                          qerr_t *err) {
    Quillan__LogRecord__FieldsEntry *entries = NULL;
    Quillan__LogRecord__FieldsEntry **ptrs = NULL;
    if (rec->n_fields) {
        entries = calloc(rec->n_fields, sizeof *entries);
        ptrs = calloc(rec->n_fields, sizeof *ptrs);
        if (entries == NULL || ptrs == NULL) {
            free(entries);
            free(ptrs);
            return qerr_set(err, QERR_NOMEM, "log record: cannot allocate %zu fields",
                            rec->n_fields);
        }
    }
    Quillan__LogRecord lr;
    log_codec_record_fill(&lr, rec, entries, ptrs);
    Quillan__Envelope env = QUILLAN__ENVELOPE__INIT;
    env.body_case = QUILLAN__ENVELOPE__BODY_LOG_RECORD;
    env.log_record = &lr;
    int rc = wire_codec_pack(WIRE_PROTOCOL_LOG, hdr, &env, out, err);
    free(entries);
    free(ptrs);
    return rc;
}

int log_codec_validate(const Quillan__Envelope *env, qerr_t *err) {
    Q_ASSERT(env);
    if (env->body_case != QUILLAN__ENVELOPE__BODY_LOG_RECORD)
        return qerr_set(err, QERR_INVALID, "envelope body '%s' is not part of the log protocol",
                        wire_body_name(env->body_case));
    const Quillan__LogRecord *r = env->log_record;
    if (!isfinite(r->time))
        return qerr_set(err, QERR_RANGE, "log_record.time is not finite");
    if (r->level < QUILLAN__LOG_LEVEL__LOG_LEVEL_DEBUG ||
        r->level > QUILLAN__LOG_LEVEL__LOG_LEVEL_ERROR)
        return qerr_set(err, QERR_INVALID, "log_record.level %d is not a known level",
                        (int)r->level);
    if (r->event[0] == '\0')
        return qerr_set(err, QERR_INVALID, "log_record.event is empty");
    return 0;
}

wire_msg_t *log_codec_unpack(const void *data, size_t len, size_t budget, qerr_t *err) {
    wire_msg_t *m = wire_codec_unpack(WIRE_PROTOCOL_LOG, data, len, budget, err);
    if (m && log_codec_validate(wire_msg_envelope(m), err) != 0)
        wire_msg_destroy(&m);
    return m;
}

size_t log_codec_record_view(const Quillan__LogRecord *pr, log_record_t *out, log_field_t *fields,
                             size_t cap) {
    size_t n = pr->n_fields < cap ? pr->n_fields : cap;
    for (size_t i = 0; i < n; i++) {
        fields[i].key = pr->fields[i]->key;
        fields[i].value = pr->fields[i]->value;
    }
    out->time = pr->time;
    out->process = pr->process;
    out->host = pr->host;
    out->level = (log_level_t)pr->level;
    out->event = pr->event;
    out->fields = fields;
    out->n_fields = n;
    out->text = pr->text;
    return n;
}

int log_codec_net_validate(void *ctx, const Quillan__Envelope *env, size_t payload_len,
                           qerr_t *err) {
    (void)ctx;
    if (payload_len != 0)
        return qerr_set(err, QERR_INVALID, "log record carries a %zu-byte payload frame",
                        payload_len);
    return log_codec_validate(env, err);
}
