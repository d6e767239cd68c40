/* The quantized policy container: every packed row dequantises to exactly the learner's fake
 * quantized weights; memory and file round trips give the same bytes; bad containers (another
 * format, truncated, corrupted metadata, tampered tensors) fail with errors naming the source
 * and the tensor. */
#include <criterion/criterion.h>

#include "alloc.h"
#include "fp16.h"
#include "model.h"
#include "qpolicy.h"
#include "quant.h"
#include "safetensors.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static model_t *tiny_model(int head_int8) {
    model_config_t c;
    qerr_t err;
    cr_assert(model_config_preset("tiny", &c, &err) == 0, "%s", err.msg);
    c.head_int8 = head_int8;
    model_t *m = model_new(&c, &err);
    cr_assert(m, "%s", err.msg);
    /* Non-zero balancing biases: they must travel. */
    real *p = model_params(m);
    const model_tensor_t *b = model_tensor_find(m, "layers.1.minis.2.micro.router.bias_balance");
    cr_assert(b);
    for (size_t i = 0; i < b->numel; i++)
        p[b->offset + i] = (real)((int)(i % 5) - 2) * 0.01f;
    return m;
}

/* Every rollout tensor unpacks to the values the learner's forward uses. */
static void check_values(model_t *m, const qpolicy_t *q) {
    size_t checked = 0;
    for (size_t i = 0; i < model_tensor_count(m); i++) {
        const model_tensor_t *t = model_tensor(m, i);
        const qpolicy_tensor_t *qt = qpolicy_tensor_find(q, t->name);
        if (!t->in_rollout) {
            cr_assert_null(qt, "%s should not be in the snapshot", t->name);
            continue;
        }
        cr_assert(qt, "missing %s", t->name);
        const size_t cols = qt->cols, rows = qt->rows;
        float *want = malloc(t->numel * sizeof *want), *got = malloc(cols * sizeof *got);
        const real *src = model_params_const(m) + t->offset;
        if (t->rollout == QUANT_TERNARY) {
            /* BitLinear weights: the learner computes s_w * code inside bitlinear_forward. */
            int8_t *codes = malloc(cols);
            for (size_t r = 0; r < rows; r++) {
                real s;
                quant_ternary_row(codes, &s, src + r * cols, (int)cols);
                for (size_t c = 0; c < cols; c++)
                    want[r * cols + c] = s * (float)codes[c];
            }
            free(codes);
        } else {
            quant_fake_forward(t->rollout, want, src, (int)rows, (int)cols);
        }
        for (size_t r = 0; r < rows; r++) {
            const unsigned char *row = (const unsigned char *)qt->data + r * qt->row_bytes;
            if (qt->qtype == QTYPE_F32)
                memcpy(got, row, cols * sizeof(float));
            else if (qt->qtype == QTYPE_F16)
                for (size_t c = 0; c < cols; c++) {
                    uint16_t h;
                    memcpy(&h, row + 2 * c, 2);
                    got[c] = fp16_to_float(h);
                }
            else
                qtype_traits(qt->qtype)->dequantize_row_ref(row, got, cols);
            cr_assert(memcmp(got, want + r * cols, cols * sizeof(float)) == 0,
                      "%s row %zu differs from the learner's fake quantization", t->name, r);
        }
        free(want);
        free(got);
        checked++;
    }
    cr_assert_eq(checked, qpolicy_tensor_count(q));
}

Test(qpolicy, packed_values_equal_learner_fake_quantization) {
    for (int h8 = 0; h8 <= 1; h8++) {
        model_t *m = tiny_model(h8);
        qerr_t err;
        qpolicy_t *q = qpolicy_build(m, 7, &err);
        cr_assert(q, "%s", err.msg);
        cr_assert_eq(qpolicy_version(q), 7);
        cr_assert_eq(qpolicy_tensor_find(q, "head.weight")->qtype, h8 ? QTYPE_INT8 : QTYPE_F32);
        cr_assert(memcmp(qpolicy_config(q), model_config(m), sizeof(model_config_t)) == 0,
                  "config did not round-trip");
        check_values(m, q);
        qpolicy_destroy(&q);
        qpolicy_destroy(&q);
        model_destroy(&m);
    }
}

Test(qpolicy, memory_and_file_round_trips_are_exact) {
    model_t *m = tiny_model(0);
    qerr_t err;
    qpolicy_t *q = qpolicy_build(m, 3, &err);
    cr_assert(q, "%s", err.msg);
    size_t len;
    const void *bytes = qpolicy_bytes(q, &len);
    /* Deterministic: building again gives the same bytes. */
    qpolicy_t *q2 = qpolicy_build(m, 3, &err);
    cr_assert(q2, "%s", err.msg);
    size_t len2;
    const void *bytes2 = qpolicy_bytes(q2, &len2);
    cr_assert(len == len2 && memcmp(bytes, bytes2, len) == 0);
    qpolicy_destroy(&q2);

    /* Borrowed parse of a copy. */
    void *copy = malloc(len);
    memcpy(copy, bytes, len);
    qpolicy_t *b = qpolicy_parse(copy, len, "copy", NULL, NULL, &err);
    cr_assert(b, "%s", err.msg);
    check_values(m, b);
    qpolicy_destroy(&b);
    free(copy);

    char path[] = "/tmp/quillan_qpolicy_XXXXXX";
    int fd = mkstemp(path);
    cr_assert(fd >= 0);
    close(fd);
    cr_assert(qpolicy_write(q, path, &err) == 0, "%s", err.msg);
    qpolicy_t *f = qpolicy_open(path, &err);
    cr_assert(f, "%s", err.msg);
    size_t flen;
    const void *fb = qpolicy_bytes(f, &flen);
    cr_assert(flen == len && memcmp(fb, bytes, len) == 0);
    qpolicy_destroy(&f);

    /* The container is a standard safetensors file. */
    safetensors_reader_t *r = safetensors_reader_new(path, &err);
    cr_assert(r, "%s", err.msg);
    cr_assert_str_eq(safetensors_reader_metadata(r, "format"), QPOLICY_FORMAT);
    safetensors_reader_destroy(&r);
    unlink(path);
    qpolicy_destroy(&q);
    model_destroy(&m);
}

/* Writes len bytes to a fresh temporary file. */
static void write_tmp(char *path, const void *data, size_t len) {
    strcpy(path, "/tmp/quillan_qpolicy_bad_XXXXXX");
    int fd = mkstemp(path);
    cr_assert(fd >= 0);
    cr_assert(write(fd, data, len) == (ssize_t)len);
    close(fd);
}

Test(qpolicy, bad_containers_fail_clearly) {
    model_t *m = tiny_model(0);
    qerr_t err;
    qpolicy_t *q = qpolicy_build(m, 1, &err);
    cr_assert(q);
    size_t len;
    const unsigned char *bytes = qpolicy_bytes(q, &len);
    char path[64];

    /* Missing file. */
    cr_assert_null(qpolicy_open("/nonexistent/policy.qst", &err));
    cr_assert_eq(err.code, QERR_NOTFOUND);
    cr_assert(strstr(err.msg, "/nonexistent/policy.qst"), "%s", err.msg);

    /* Truncated file. */
    write_tmp(path, bytes, len / 2);
    cr_assert_null(qpolicy_open(path, &err));
    cr_assert(strstr(err.msg, path), "%s", err.msg);
    unlink(path);

    /* Another format: a plain text file, and a safetensors file that is not a policy. */
    write_tmp(path, "hello, this is not a policy file\n", 33);
    cr_assert_null(qpolicy_open(path, &err));
    cr_assert(strstr(err.msg, path), "%s", err.msg);
    unlink(path);
    safetensors_writer_t *w = safetensors_writer_new();
    float x[4] = {1, 2, 3, 4};
    cr_assert(safetensors_writer_add(w, "x", SAFETENSORS_F32, 1, (const uint64_t[]){4}, x, &err) ==
              0);
    void *img;
    size_t ilen;
    cr_assert(safetensors_writer_serialize(w, &img, &ilen, &err) == 0);
    cr_assert_null(qpolicy_parse(img, ilen, "other.safetensors", NULL, NULL, &err));
    cr_assert_eq(err.code, QERR_VERSION);
    cr_assert(strstr(err.msg, "other.safetensors") && strstr(err.msg, "not a Quillan"), "%s",
              err.msg);
    q_aligned_free(img);
    safetensors_writer_destroy(&w);

    /* A tampered copy: a NaN scale in a ternary row names the tensor. */
    unsigned char *bad = malloc(len);
    memcpy(bad, bytes, len);
    const qpolicy_tensor_t *t = qpolicy_tensor_find(q, "diffusion.out.weight");
    float nan = NAN;
    memcpy(bad + t->offset + t->row_bytes - 4, &nan, 4);
    cr_assert_null(qpolicy_parse(bad, len, "tampered", NULL, NULL, &err));
    cr_assert(strstr(err.msg, "diffusion.out.weight") && strstr(err.msg, "tampered"), "%s",
              err.msg);
    /* A corrupted config value. */
    memcpy(bad, bytes, len);
    char *hit = memmem(bad, len, "\\\"dim\\\":128", 11);
    cr_assert(hit, "config text not found in the header");
    memcpy(hit, "\\\"dim\\\":127", 11);
    cr_assert_null(qpolicy_parse(bad, len, "tampered", NULL, NULL, &err));
    cr_assert(strstr(err.msg, "config"), "%s", err.msg);
    free(bad);
    qpolicy_destroy(&q);
    model_destroy(&m);
}
