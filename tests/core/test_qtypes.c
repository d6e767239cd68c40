#include "qtest.h"

#include "error.h"
#include "fp16.h"
#include "qtypes.h"
#include "rng.h"

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* Widths around every block boundary. */
static const size_t WIDTHS[] = {1, 2, 31, 32, 33, 63, 64, 65, 127, 128, 129, 255, 256, 257, 700};

static float *random_row(size_t n, uint64_t seed) {
    rng_stream_t r;
    rng_stream_init(&r, 0x51545950, seed, n);
    float *w = malloc(n * sizeof *w);
    cr_assert_not_null(w);
    for (size_t i = 0; i < n; i++)
        w[i] = 0.05f * rng_stream_normal(&r);
    return w;
}

/* Packs w[n] into a buffer with guard bytes after the row; checks the guard is untouched. */
static uint8_t *pack(qtype_t t, const float *w, size_t n) {
    size_t rb = qtype_row_bytes(t, n);
    uint8_t *q = malloc(rb + 16);
    cr_assert_not_null(q);
    memset(q, 0xA5, rb + 16);
    qtype_traits(t)->quantize_row_ref(w, q, n);
    for (size_t i = rb; i < rb + 16; i++)
        cr_assert_eq(q[i], 0xA5, "%s n=%zu wrote past its row", qtype_name(t), n);
    return q;
}

Test(qtypes, table_names_and_sizes) {
    for (int t = 0; t < QTYPE_COUNT; t++) {
        cr_assert_eq(qtype_from_name(qtype_name((qtype_t)t)), (qtype_t)t);
        cr_assert_not_null(qtype_traits((qtype_t)t)->quantize_row_ref);
        cr_assert_not_null(qtype_traits((qtype_t)t)->dequantize_row_ref);
    }
    cr_assert_eq(qtype_from_name("q4_0"), QTYPE_COUNT);
    cr_assert_eq(qtype_from_name(NULL), QTYPE_COUNT);
    cr_assert_str_eq(qtype_name(QTYPE_COUNT), "?");
    /* 4096-wide rows: 2 bits + scale, 4.5 bits, 8 bits + scale, 16 and 32 bits per weight. */
    cr_assert_eq(qtype_row_bytes(QTYPE_TERNARY, 4096), 1024 + 4);
    cr_assert_eq(qtype_row_bytes(QTYPE_INT4, 4096), 4096 * 9 / 16);
    cr_assert_eq(qtype_row_bytes(QTYPE_INT8, 4096), 4096 + 4);
    cr_assert_eq(qtype_row_bytes(QTYPE_F16, 4096), 8192);
    cr_assert_eq(qtype_row_bytes(QTYPE_F32, 4096), 16384);
    /* Padding to whole blocks. */
    cr_assert_eq(qtype_row_bytes(QTYPE_TERNARY, 257), 128 + 4);
    cr_assert_eq(qtype_row_bytes(QTYPE_INT4, 129), 2 * 72);
    cr_assert_eq(qtype_row_bytes(QTYPE_INT8, 65), 128 + 4);
    cr_assert_eq(qtype_row_padded(QTYPE_INT4, 129), 256);
    cr_assert_eq(qtype_row_bytes(QTYPE_F32, SIZE_MAX / 2), SIZE_MAX);
}

Test(qtypes, round_clip_is_half_away_from_zero) {
    cr_assert_eq(qtype_round_clip(0.5f, -7, 7), 1);
    cr_assert_eq(qtype_round_clip(-0.5f, -7, 7), -1);
    cr_assert_eq(qtype_round_clip(2.5f, -7, 7), 3);
    cr_assert_eq(qtype_round_clip(-2.5f, -7, 7), -3);
    cr_assert_eq(qtype_round_clip(0.49999997f, -7, 7), 0);
    cr_assert_eq(qtype_round_clip(7.5f, -7, 7), 7);
    cr_assert_eq(qtype_round_clip(-200.0f, -128, 127), -128);
}

/* Ternary: s_w = mean|w| (sequential float sum), code = round_clip(w / (s_w + 1e-5), -1, 1),
 * recomputed here from MODEL.md and compared with the unpacked row. */
Test(qtypes, ternary_matches_model_md) {
    for (size_t k = 0; k < Q_ARRAY_LEN(WIDTHS); k++) {
        size_t n = WIDTHS[k];
        float *w = random_row(n, 1);
        w[0] = 0.0f;
        uint8_t *q = pack(QTYPE_TERNARY, w, n);
        float sum = 0.0f;
        for (size_t i = 0; i < n; i++)
            sum += fabsf(w[i]);
        float s = sum / (float)n;
        cr_assert_eq(qtype_row_scale(QTYPE_TERNARY, q, n), s);
        float *d = malloc(n * sizeof *d);
        qtype_traits(QTYPE_TERNARY)->dequantize_row_ref(q, d, n);
        int seen[3] = {0, 0, 0};
        for (size_t i = 0; i < n; i++) {
            float c = roundf(w[i] / (s + 1e-5f));
            c = c > 1.0f ? 1.0f : c < -1.0f ? -1.0f : c;
            cr_assert_eq(d[i], s * c, "n=%zu i=%zu", n, i);
            seen[(int)c + 1] = 1;
        }
        if (n >= 64)
            cr_assert(seen[0] && seen[1] && seen[2], "all three codes should occur");
        /* Padding weights are code 1 (w = 0) in every 2-bit field past n. */
        size_t nb = (n + 255) / 256;
        for (size_t i = n; i < nb * 256; i++)
            cr_assert_eq((q[(i / 256) * 64 + i % 64] >> (2 * ((i % 256) / 64))) & 3, 1);
        free(d);
        free(q);
        free(w);
    }
}

Test(qtypes, int4_scales_are_fp16_and_codes_use_them) {
    for (size_t k = 0; k < Q_ARRAY_LEN(WIDTHS); k++) {
        size_t n = WIDTHS[k];
        float *w = random_row(n, 2);
        if (n > 40)
            for (size_t i = 32; i < 40; i++)
                w[i] = 0.0f; /* part of a group zero; group 1 stays non-zero */
        uint8_t *q = pack(QTYPE_INT4, w, n);
        float *d = malloc(n * sizeof *d);
        qtype_traits(QTYPE_INT4)->dequantize_row_ref(q, d, n);
        size_t nb = (n + 127) / 128;
        for (size_t g = 0; g * 32 < n; g++) {
            float amax = 0.0f;
            for (size_t i = g * 32; i < n && i < g * 32 + 32; i++)
                amax = fmaxf(amax, fabsf(w[i]));
            uint16_t h;
            memcpy(&h, q + nb * 64 + 2 * g, 2);
            cr_assert_eq(h, fp16_from_float(amax / 7.0f), "group %zu", g);
            float sc = fp16_to_float(h);
            for (size_t i = g * 32; i < n && i < g * 32 + 32; i++) {
                float c = sc != 0.0f ? roundf(w[i] / sc) : 0.0f;
                c = c > 7.0f ? 7.0f : c < -7.0f ? -7.0f : c;
                cr_assert_eq(d[i], sc * c, "n=%zu i=%zu", n, i);
            }
        }
        for (size_t g = (n + 31) / 32; g < 4 * nb; g++) {
            uint16_t h;
            memcpy(&h, q + nb * 64 + 2 * g, 2);
            cr_assert_eq(h, 0, "padding group scale must be 0");
        }
        free(d);
        free(q);
        free(w);
    }
}

Test(qtypes, int8_codes_ties_and_zero_rows) {
    /* max|w| = 127 makes the scale exactly 1, so w = k + 0.5 is an exact tie. */
    float w[5] = {127.0f, 2.5f, -2.5f, 0.49999997f, -126.5f};
    uint8_t *q = pack(QTYPE_INT8, w, 5);
    cr_assert_eq(qtype_row_scale(QTYPE_INT8, q, 5), 1.0f);
    cr_assert_eq(q[0], 128 + 127);
    cr_assert_eq(q[1], 128 + 3);
    cr_assert_eq(q[2], 128 - 3);
    cr_assert_eq(q[3], 128);
    cr_assert_eq(q[4], 128 - 127);
    for (size_t i = 5; i < 64; i++)
        cr_assert_eq(q[i], 128);
    free(q);
    float z[3] = {0.0f, -0.0f, 0.0f};
    q = pack(QTYPE_INT8, z, 3);
    cr_assert_eq(qtype_row_scale(QTYPE_INT8, q, 3), 0.0f);
    cr_assert_eq(q[0], 128);
    free(q);
    q = pack(QTYPE_INT4, z, 3);
    float d[3] = {1, 1, 1};
    qtype_traits(QTYPE_INT4)->dequantize_row_ref(q, d, 3);
    cr_assert(d[0] == 0.0f && d[1] == 0.0f && d[2] == 0.0f);
    free(q);
}

Test(qtypes, float_types_round_trip) {
    for (size_t k = 0; k < Q_ARRAY_LEN(WIDTHS); k++) {
        size_t n = WIDTHS[k];
        float *w = random_row(n, 3);
        float *d = malloc(n * sizeof *d);
        uint8_t *q = pack(QTYPE_F32, w, n);
        qtype_traits(QTYPE_F32)->dequantize_row_ref(q, d, n);
        cr_assert_eq(memcmp(d, w, n * sizeof *d), 0);
        free(q);
        q = pack(QTYPE_F16, w, n);
        qtype_traits(QTYPE_F16)->dequantize_row_ref(q, d, n);
        for (size_t i = 0; i < n; i++)
            cr_assert_eq(d[i], fp16_round(w[i]));
        free(q);
        free(d);
        free(w);
    }
}
