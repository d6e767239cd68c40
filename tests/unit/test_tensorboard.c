/* TensorBoard event files (learner/tensorboard.h): CRC-32C against published test vectors,
 * TFRecord framing, the hand-written Event encoding against bytes derived by hand from the
 * public field numbers, and the log sink. tests/e2e/tb_read.py reads files back with the
 * protobuf library. */
#include "log.h"
#include "tensorboard.h"

#include <criterion/criterion.h>
#include <dirent.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* RFC 3720 appendix B.4 and the usual check value. */
Test(tensorboard, crc32c_vectors) {
    uint8_t buf[32];
    memset(buf, 0, sizeof buf);
    cr_assert_eq(tensorboard_crc32c(0, buf, 32), 0x8A9136AAu);
    memset(buf, 0xff, sizeof buf);
    cr_assert_eq(tensorboard_crc32c(0, buf, 32), 0x62A8AB43u);
    for (int i = 0; i < 32; i++)
        buf[i] = (uint8_t)i;
    cr_assert_eq(tensorboard_crc32c(0, buf, 32), 0x46DD794Eu);
    for (int i = 0; i < 32; i++)
        buf[i] = (uint8_t)(31 - i);
    cr_assert_eq(tensorboard_crc32c(0, buf, 32), 0x113FDB5Cu);
    cr_assert_eq(tensorboard_crc32c(0, "123456789", 9), 0xE3069283u);
    cr_assert_eq(tensorboard_crc32c(0, "", 0), 0u);
    /* continuing a CRC over a split buffer gives the CRC of the whole */
    uint32_t part = tensorboard_crc32c(0, "1234", 4);
    cr_assert_eq(tensorboard_crc32c(part, "56789", 5), 0xE3069283u);
}

Test(tensorboard, crc_mask) {
    cr_assert_eq(tensorboard_crc_mask(0), 0xa282ead8u);
    uint32_t c = 0xE3069283u;
    uint32_t rot = (c >> 15) | (c << 17);
    cr_assert_eq(tensorboard_crc_mask(c), (uint32_t)(rot + 0xa282ead8u));
    cr_assert_neq(tensorboard_crc_mask(1), tensorboard_crc_mask(2));
}

static uint32_t le32(const uint8_t *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static uint64_t le64(const uint8_t *p) {
    return (uint64_t)le32(p) | (uint64_t)le32(p + 4) << 32;
}

Test(tensorboard, record_framing) {
    uint8_t out[64];
    size_t n = tensorboard_record_frame(out, "hello", 5);
    cr_assert_eq(n, 5 + 16);
    cr_assert_eq(le64(out), 5);
    cr_assert_eq(le32(out + 8), tensorboard_crc_mask(tensorboard_crc32c(0, out, 8)));
    cr_assert_eq(memcmp(out + 12, "hello", 5), 0);
    cr_assert_eq(le32(out + 17), tensorboard_crc_mask(tensorboard_crc32c(0, "hello", 5)));
    /* a flipped data byte no longer matches its CRC */
    out[13] ^= 1;
    cr_assert_neq(le32(out + 17), tensorboard_crc_mask(tensorboard_crc32c(0, out + 12, 5)));
}

typedef struct {
    uint8_t *data;
    size_t len;
} rec_t;

/* Reads every record of the only event file in dir, checking both CRCs of each. */
static size_t records_read(const char *dir, rec_t *recs, size_t cap) {
    DIR *d = opendir(dir);
    cr_assert_not_null(d);
    char path[1024] = "";
    int files = 0;
    for (struct dirent *e; (e = readdir(d)) != NULL;) {
        if (strncmp(e->d_name, "events.out.tfevents.", 20) == 0) {
            snprintf(path, sizeof path, "%s/%s", dir, e->d_name);
            files++;
        }
    }
    closedir(d);
    cr_assert_eq(files, 1, "expected one event file in %s", dir);
    FILE *f = fopen(path, "rb");
    cr_assert_not_null(f);
    size_t n = 0;
    uint8_t head[12];
    while (fread(head, 1, 12, f) == 12) {
        cr_assert_lt(n, cap);
        uint64_t len = le64(head);
        cr_assert_eq(le32(head + 8), tensorboard_crc_mask(tensorboard_crc32c(0, head, 8)),
                     "length CRC of record %zu", n);
        recs[n].data = malloc(len + 4);
        recs[n].len = len;
        cr_assert_eq(fread(recs[n].data, 1, len + 4, f), len + 4, "truncated record %zu", n);
        cr_assert_eq(le32(recs[n].data + len),
                     tensorboard_crc_mask(tensorboard_crc32c(0, recs[n].data, len)),
                     "data CRC of record %zu", n);
        n++;
    }
    fclose(f);
    return n;
}

static char *tmpdir_new(void) {
    char *dir = strdup("/tmp/quillan_tb_XXXXXX");
    cr_assert_not_null(mkdtemp(dir));
    return dir;
}

static void tmpdir_remove(char *dir) {
    char cmd[1100];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
    cr_assert_eq(system(cmd), 0);
    free(dir);
}

Test(tensorboard, event_bytes) {
    char *dir = tmpdir_new();
    char sub[1024];
    snprintf(sub, sizeof sub, "%s/run/a", dir); /* parents are created */
    qerr_t err = {0};
    tensorboard_writer_t *w = tensorboard_writer_new(sub, &err);
    cr_assert_not_null(w, "%s", err.msg);
    const char *names[] = {"a", "loss/pg"};
    const double values[] = {2.0, -0.5};
    cr_assert_eq(tensorboard_write_scalars(w, 3, 1.5, names, values, 1, &err), 0, "%s", err.msg);
    cr_assert_eq(tensorboard_write_scalars(w, 300, 1.5, names, values, 2, &err), 0, "%s", err.msg);
    const char *bad[] = {""};
    cr_assert_eq(tensorboard_write_scalars(w, 4, 1.5, bad, values, 1, &err), -1);
    tensorboard_stats_t st;
    tensorboard_writer_stats(w, &st);
    cr_assert_eq(st.events, 3);
    tensorboard_writer_destroy(&w);
    cr_assert_null(w);

    rec_t r[8];
    size_t n = records_read(sub, r, 8);
    cr_assert_eq(n, 3);
    /* Event{wall_time = 1 (fixed64), file_version = 3 "brain.Event:2"} */
    cr_assert_eq(r[0].len, 9 + 2 + 13);
    cr_assert_eq(r[0].data[0], 0x09);
    cr_assert_eq(r[0].data[9], 0x1a);
    cr_assert_eq(r[0].data[10], 13);
    cr_assert_eq(memcmp(r[0].data + 11, "brain.Event:2", 13), 0);
    /* Event{wall_time 1.5, step 3, summary{value{tag "a", simple_value 2.0f}}}, by hand */
    const uint8_t want1[] = {0x09, 0,    0,   0, 0,   0, 0, 0xf8, 0x3f, /* 1.5 */
                             0x10, 0x03,                                /* step */
                             0x2a, 0x0a,                                /* summary, 10 bytes */
                             0x0a, 0x08,                                /* value, 8 bytes */
                             0x0a, 0x01, 'a',                           /* tag */
                             0x15, 0,    0,   0, 0x40};                 /* 2.0f */
    cr_assert_eq(r[1].len, sizeof want1);
    cr_assert_eq(memcmp(r[1].data, want1, sizeof want1), 0);
    /* step 300 is a two-byte varint; two values; -0.5f = 0xbf000000 */
    const uint8_t want2[] = {0x09, 0,    0,    0,    0,    0,    0,    0xf8, 0x3f, 0x10,
                             0xac, 0x02, 0x2a, 0x1a, 0x0a, 0x08, 0x0a, 0x01, 'a',  0x15,
                             0,    0,    0,    0x40, 0x0a, 0x0e, 0x0a, 0x07, 'l',  'o',
                             's',  's',  '/',  'p',  'g',  0x15, 0,    0,    0,    0xbf};
    cr_assert_eq(r[2].len, sizeof want2);
    cr_assert_eq(memcmp(r[2].data, want2, sizeof want2), 0);
    for (size_t i = 0; i < n; i++)
        free(r[i].data);
    tmpdir_remove(dir);
}

Test(tensorboard, writer_refuses_a_file_as_dir) {
    char *dir = tmpdir_new();
    char file[1024];
    snprintf(file, sizeof file, "%s/plain", dir);
    FILE *f = fopen(file, "w");
    fclose(f);
    qerr_t err = {0};
    cr_assert_null(tensorboard_writer_new(file, &err));
    cr_assert(strstr(err.msg, "plain") != NULL, "%s", err.msg);
    tmpdir_remove(dir);
}

Test(tensorboard, log_sink) {
    char *dir = tmpdir_new();
    log_init("test");
    log_set_stderr(0);
    qerr_t err = {0};
    tensorboard_sink_t *s = tensorboard_sink_new(dir, &err);
    cr_assert_not_null(s, "%s", err.msg);
    const log_field_t step[] = {{"step", 7}, {"reward/mean", 0.25}, {"lr", 1e-4}};
    log_emit(LOG_INFO, "learner.step", step, 3, NULL);
    const log_field_t group[] = {{"step", 7}, {"tokens_per_s", 10}};
    log_emit(LOG_INFO, "rollout.group", group, 2, NULL); /* ignored: not a learner metric */
    const log_field_t nostep[] = {{"reward/mean", 1}};
    log_emit(LOG_INFO, "learner.step", nostep, 1, NULL); /* ignored: no step */
    const log_field_t ev[] = {{"step", 8}, {"eval/accuracy", 0.5}};
    log_emit(LOG_INFO, "eval", ev, 2, NULL);
    tensorboard_stats_t st;
    tensorboard_writer_stats(tensorboard_sink_writer(s), &st);
    cr_assert_eq(st.events, 3);
    cr_assert_eq(st.failures, 0);
    tensorboard_sink_destroy(&s);
    cr_assert_null(s);
    log_emit(LOG_INFO, "learner.step", step, 3, NULL); /* after destroy: nothing written */
    rec_t r[8];
    size_t n = records_read(dir, r, 8);
    cr_assert_eq(n, 3);
    /* step 7 and the tag of the first scalar, "reward/mean" */
    cr_assert_eq(r[1].data[9], 0x10);
    cr_assert_eq(r[1].data[10], 7);
    cr_assert(memmem(r[1].data, r[1].len, "reward/mean", 11) != NULL);
    cr_assert(memmem(r[1].data, r[1].len, "lr", 2) != NULL);
    cr_assert(memmem(r[2].data, r[2].len, "eval/accuracy", 13) != NULL);
    cr_assert_eq(r[2].data[10], 8);
    for (size_t i = 0; i < n; i++)
        free(r[i].data);
    tmpdir_remove(dir);
}
