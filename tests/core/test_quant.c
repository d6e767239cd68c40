/* FP16 conversion against known bit patterns, quantizer codes and scales per MODEL.md, and the
 * BitLinear integer-dot identity (float core). */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "fp16.h"
#include "qtest.h"
#include "quant.h"
#include "rng.h"

/* ---- FP16 ---- */

typedef struct {
    float f;
    uint16_t h;
} f2h_case_t;

Test(fp16, known_bit_patterns) {
    const f2h_case_t cases[] = {
        {0.0f, 0x0000},
        {-0.0f, 0x8000},
        {1.0f, 0x3C00},
        {-2.0f, 0xC000},
        {0.5f, 0x3800},
        {65504.0f, 0x7BFF},                   /* largest finite */
        {65519.0f, 0x7BFF},                   /* below the tie at 65520: rounds down */
        {65520.0f, 0x7C00},                   /* the tie past 65504 rounds to even = inf */
        {1e6f, 0x7C00},                       /* overflow */
        {-1e6f, 0xFC00},                      /* negative overflow */
        {0x1p-14f, 0x0400},                   /* smallest normal */
        {0x1p-24f, 0x0001},                   /* smallest subnormal */
        {1023 * 0x1p-24f, 0x03FF},            /* largest subnormal */
        {0x1p-25f, 0x0000},                   /* half the smallest subnormal: tie to even (0) */
        {0x1.8p-25f, 0x0001},                 /* 0.75 units: up */
        {3 * 0x1p-25f, 0x0002},               /* 1.5 units: tie to even (2) */
        {5 * 0x1p-25f, 0x0002},               /* 2.5 units: tie to even (2) */
        {-3 * 0x1p-25f, 0x8002},              /* sign kept */
        {0x1p-30f, 0x0000},                   /* underflow to zero */
        {1e-45f, 0x0000},                     /* float subnormal */
        {1.0f + 0x1p-11f, 0x3C00},            /* half an ulp above 1: tie to even (down) */
        {1.0f + 3 * 0x1p-11f, 0x3C02},        /* 1.5 ulp: tie to even (up) */
        {1.0f + 0x1p-11f + 0x1p-20f, 0x3C01}, /* just above the tie */
        {1.0f - 0x1p-12f, 0x3C00}, /* tie below 1, odd 0x3BFF: rounds up into the exponent */
        {0.1f, 0x2E66},
        {0.333333343f, 0x3555},
        {INFINITY, 0x7C00},
        {-INFINITY, 0xFC00},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        const uint16_t got = fp16_from_float(cases[i].f);
        cr_expect_eq(got, cases[i].h, "fp16_from_float(%a) = 0x%04X, expected 0x%04X",
                     (double)cases[i].f, got, cases[i].h);
    }
}

Test(fp16, nan_stays_nan) {
    const uint16_t h = fp16_from_float(NAN);
    cr_assert_eq(h & 0x7C00, 0x7C00, "exponent all ones");
    cr_assert_neq(h & 0x03FF, 0, "mantissa non-zero (NaN, not inf): 0x%04X", h);
    /* A signalling NaN whose payload lives only in the low bits must not become inf. */
    uint32_t u = 0x7F800001u;
    float snan;
    memcpy(&snan, &u, sizeof snan);
    const uint16_t hs = fp16_from_float(snan);
    cr_assert(hs != 0x7C00 && (hs & 0x7C00) == 0x7C00, "0x%04X", hs);
    cr_assert(isnan(fp16_to_float(0x7E00)));
    cr_assert(isnan(fp16_to_float(0xFE01)));
}

Test(fp16, to_float_known_values) {
    cr_assert_eq(fp16_to_float(0x0001), 0x1p-24f);
    cr_assert_eq(fp16_to_float(0x03FF), 1023 * 0x1p-24f);
    cr_assert_eq(fp16_to_float(0x0400), 0x1p-14f);
    cr_assert_eq(fp16_to_float(0x7BFF), 65504.0f);
    cr_assert_eq(fp16_to_float(0x3555), 0.333251953125f);
    cr_assert_eq(fp16_to_float(0xC000), -2.0f);
    cr_assert_eq(fp16_to_float(0xFC00), -INFINITY);
    cr_assert(signbit(fp16_to_float(0x8000)) && fp16_to_float(0x8000) == 0.0f);
}

/* Every non-NaN half survives half -> float -> half, and every float between two adjacent
 * halves goes to the nearer one (the even one on the midpoint). */
Test(fp16, exhaustive_round_trip_and_midpoints) {
    for (uint32_t h = 0; h < 0x10000u; h++) {
        const float f = fp16_to_float((uint16_t)h);
        if (isnan(f))
            continue;
        cr_assert_eq(fp16_from_float(f), h, "round trip of 0x%04X", h);
        if ((h & 0x7FFFu) >= 0x7BFFu)
            continue; /* no finite successor */
        const float g = fp16_to_float((uint16_t)(h + 1));
        const float mid = (f + g) / 2; /* exact in float */
        const uint16_t even = (h & 1u) ? (uint16_t)(h + 1) : (uint16_t)h;
        cr_assert_eq(fp16_from_float(mid), even, "midpoint after 0x%04X", h);
        cr_assert_eq(fp16_from_float(nextafterf(mid, f)), h, "below midpoint of 0x%04X", h);
        cr_assert_eq(fp16_from_float(nextafterf(mid, g)), (uint16_t)(h + 1),
                     "above midpoint of 0x%04X", h);
    }
}

/* ---- Quantizers ---- */

Test(quant, round_half_away_from_zero) {
    cr_assert_eq(quant_round(0.5f), 1.0f);
    cr_assert_eq(quant_round(-0.5f), -1.0f);
    cr_assert_eq(quant_round(1.5f), 2.0f);
    cr_assert_eq(quant_round(2.5f), 3.0f);
    cr_assert_eq(quant_round(-2.5f), -3.0f);
    cr_assert_eq(quant_round(0.49999997f), 0.0f);
    cr_assert_eq(quant_round(-1.4f), -1.0f);
}

Test(quant, int8_codes_and_scale) {
    /* max|w| = 127 makes the scale exactly 1, so the codes are the rounded values. */
    const float w[] = {127, 0.5f, -0.5f, 1.5f, -2.5f, 2.5f, -126.5f, 3.49f, 0};
    const int8_t want[] = {127, 1, -1, 2, -3, 3, -127, 3, 0};
    int8_t codes[9];
    float scale;
    quant_int8_row(codes, &scale, w, 9);
    cr_assert_eq(scale, 1.0f);
    for (int i = 0; i < 9; i++)
        cr_expect_eq(codes[i], want[i], "w %g: code %d, expected %d", (double)w[i], codes[i],
                     want[i]);
    const float zero[4] = {0};
    quant_int8_row(codes, &scale, zero, 4);
    cr_assert(scale == 0 && codes[0] == 0 && codes[3] == 0);
}

Test(quant, ternary_codes_and_scale) {
    /* mean|w| = 11/8; w / (1.375 + 1e-5): 2.18 -> 1 (clipped), 0.727 -> 1, 0.29 -> 0,
     * -0.436 -> 0, 1.45 -> 1. */
    const float w[] = {3, -3, 1, -1, 0.4f, -0.6f, 2, 0};
    const int8_t want[] = {1, -1, 1, -1, 0, 0, 1, 0};
    int8_t codes[8];
    float scale;
    quant_ternary_row(codes, &scale, w, 8);
    cr_assert_float_eq(scale, 1.375f, 1e-7f);
    for (int i = 0; i < 8; i++)
        cr_expect_eq(codes[i], want[i], "w %g: code %d", (double)w[i], codes[i]);
    /* The eps matters: with s_w = 1 a weight of exactly 0.5 sits just below the tie. */
    const float h[] = {0.5f, -0.5f, 1.5f, -1.5f};
    quant_ternary_row(codes, &scale, h, 4);
    cr_assert_eq(scale, 1.0f);
    cr_assert(codes[0] == 0 && codes[1] == 0 && codes[2] == 1 && codes[3] == -1);
}

Test(quant, act_codes_and_scale) {
    const float x[] = {-127, 0.5f, -0.5f, 63.5f, -2.5f, 100.49f};
    const int8_t want[] = {-127, 1, -1, 64, -3, 100};
    int8_t codes[6];
    float scale;
    quant_act_row(codes, &scale, x, 6);
    cr_assert_eq(scale, 1.0f);
    for (int i = 0; i < 6; i++)
        cr_expect_eq(codes[i], want[i], "x %g: code %d", (double)x[i], codes[i]);
}

Test(quant, int4_groups_codes_and_fp16_scales) {
    float w[70] = {0};
    /* Group 0: max 7 -> scale fp16(1) = 0x3C00, codes are rounded values, clipped to 7. */
    const float g0[] = {7, 0.5f, -0.5f, 2.5f, -2.5f, 1.49f, -6.5f};
    const int8_t c0[] = {7, 1, -1, 3, -3, 1, -7};
    memcpy(w, g0, sizeof g0);
    /* Group 1: max 0.1 -> 0.1/7 = 0.0142857 = 2^-7 * 1.8286 -> mantissa 848 -> 0x2350,
     * value 0.0142822265625; 0.1 / that = 7.0017 -> code 7 (clipped), 0.05 -> 3.5008 -> 4. */
    w[32] = 0.1f;
    w[33] = 0.05f;
    w[34] = -0.0214f; /* -1.4984 -> -1 */
    /* Group 2 (6 elements, the partial tail): all zero -> scale 0, codes 0. */
    int8_t codes[70];
    uint16_t scales[3];
    quant_int4_row(codes, scales, w, 70);
    cr_assert_eq(scales[0], 0x3C00, "0x%04X", scales[0]);
    cr_assert_eq(scales[1], 0x2350, "0x%04X", scales[1]);
    cr_assert_eq(scales[2], 0x0000);
    for (int i = 0; i < 7; i++)
        cr_expect_eq(codes[i], c0[i], "group 0 element %d: %d", i, codes[i]);
    cr_expect_eq(codes[32], 7);
    cr_expect_eq(codes[33], 4);
    cr_expect_eq(codes[34], -1);
    for (int i = 64; i < 70; i++)
        cr_expect_eq(codes[i], 0);
}

static void fill_normal(float *x, size_t n, uint64_t seed, float sd) {
    rng_stream_t s;
    rng_stream_init(&s, 0x51554E54, seed, 0);
    for (size_t i = 0; i < n; i++)
        x[i] = sd * rng_stream_normal(&s);
}

/* quant_fake_forward must give exactly scale * code of the code functions, row by row. */
Test(quant, fake_forward_matches_codes) {
    enum { R = 5, N = 80 };
    float w[R * N], out[R * N];
    int8_t codes[N];
    uint16_t s4[(N + QUANT_INT4_GROUP - 1) / QUANT_INT4_GROUP];
    float s;
    fill_normal(w, R * N, 1, 0.7f);
    quant_fake_forward(QUANT_INT4, out, w, R, N);
    for (int r = 0; r < R; r++) {
        quant_int4_row(codes, s4, w + r * N, N);
        for (int i = 0; i < N; i++)
            cr_assert_eq(out[r * N + i], fp16_to_float(s4[i / QUANT_INT4_GROUP]) * (float)codes[i]);
    }
    quant_fake_forward(QUANT_INT8, out, w, R, N);
    for (int r = 0; r < R; r++) {
        quant_int8_row(codes, &s, w + r * N, N);
        for (int i = 0; i < N; i++)
            cr_assert_eq(out[r * N + i], s * (float)codes[i]);
    }
    quant_fake_forward(QUANT_TERNARY, out, w, R, N);
    for (int r = 0; r < R; r++) {
        quant_ternary_row(codes, &s, w + r * N, N);
        for (int i = 0; i < N; i++)
            cr_assert_eq(out[r * N + i], s * (float)codes[i]);
    }
    quant_fake_forward(QUANT_F16, out, w, R, N);
    for (int i = 0; i < R * N; i++)
        cr_assert_eq(out[i], fp16_round(w[i]));
    quant_fake_act_forward(out, w, R, N);
    for (int r = 0; r < R; r++) {
        quant_act_row(codes, &s, w + r * N, N);
        for (int i = 0; i < N; i++)
            cr_assert_eq(out[r * N + i], s * (float)codes[i]);
    }
    /* In place gives the same. */
    float inplace[R * N];
    memcpy(inplace, w, sizeof w);
    quant_fake_forward(QUANT_INT4, inplace, inplace, R, N);
    quant_fake_forward(QUANT_INT4, out, w, R, N);
    cr_assert(memcmp(inplace, out, sizeof out) == 0);
}

Test(quant, surrogate_mode_is_identity) {
    enum { R = 3, N = 40 };
    float w[R * N], out[R * N];
    fill_normal(w, R * N, 2, 1.0f);
    quant_surrogate_set(1);
    for (int t = 0; t < QUANT_TYPE_COUNT; t++) {
        quant_fake_forward((quant_type_t)t, out, w, R, N);
        cr_assert(memcmp(out, w, sizeof w) == 0, "%s", quant_type_name((quant_type_t)t));
    }
    quant_fake_act_forward(out, w, R, N);
    cr_assert(memcmp(out, w, sizeof w) == 0);
    quant_surrogate_set(0);
    quant_fake_forward(QUANT_INT4, out, w, R, N);
    cr_assert(memcmp(out, w, sizeof w) != 0, "quantization is back on");
}

/* out = (integer dot of codes) * s_w * s_x, bit for bit, and the dequantised buffers. */
Test(quant, bitlinear_integer_dot_identity) {
    enum { BT = 9, C = 150, OC = 37 };
    float *x = malloc(sizeof(float) * BT * C), *w = malloc(sizeof(float) * OC * C);
    float *out = malloc(sizeof(float) * BT * OC), *wq = malloc(sizeof(float) * OC * C);
    float *xq = malloc(sizeof(float) * BT * C), sw[OC], sx[BT];
    int8_t wc[OC][C], xc[BT][C];
    float wsc[OC], xsc[BT];
    fill_normal(x, BT * C, 3, 2.0f);
    fill_normal(w, OC * C, 4, 0.05f);
    x[5] = 0; /* a zero row of activations is fine too */
    for (int c = 0; c < C; c++)
        x[2 * C + c] = 0;
    bitlinear_forward(out, wq, sw, xq, sx, x, w, BT, C, OC);
    for (int o = 0; o < OC; o++)
        quant_ternary_row(wc[o], &wsc[o], w + o * C, C);
    for (int t = 0; t < BT; t++)
        quant_act_row(xc[t], &xsc[t], x + t * C, C);
    for (int t = 0; t < BT; t++) {
        cr_assert_eq(sx[t], xsc[t]);
        for (int o = 0; o < OC; o++) {
            int32_t dot = 0;
            for (int c = 0; c < C; c++)
                dot += (int32_t)wc[o][c] * (int32_t)xc[t][c];
            const float want = (float)dot * wsc[o] * xsc[t];
            cr_assert_eq(out[t * OC + o], want, "t %d o %d: %.9g vs %.9g", t, o,
                         (double)out[t * OC + o], (double)want);
        }
        for (int c = 0; c < C; c++)
            cr_assert_eq(xq[t * C + c], xsc[t] * (float)xc[t][c]);
    }
    for (int o = 0; o < OC; o++) {
        cr_assert_eq(sw[o], wsc[o]);
        for (int c = 0; c < C; c++)
            cr_assert_eq(wq[o * C + c], wsc[o] * (float)wc[o][c]);
    }
    /* The STE backward is the linear backward through the dequantised operands. */
    float *dout = malloc(sizeof(float) * BT * OC), *dx = calloc(BT * C, sizeof(float));
    float *dw = calloc(OC * C, sizeof(float));
    fill_normal(dout, BT * OC, 5, 1.0f);
    bitlinear_backward(dx, dw, dout, wq, xq, BT, C, OC);
    double err = 0, ref = 0;
    for (int t = 0; t < BT; t++)
        for (int c = 0; c < C; c++) {
            double s = 0;
            for (int o = 0; o < OC; o++)
                s += (double)dout[t * OC + o] * wq[o * C + c];
            err += (s - dx[t * C + c]) * (s - dx[t * C + c]);
            ref += s * s;
        }
    cr_assert_leq(sqrt(err / ref), 1e-5, "dinp error %g", sqrt(err / ref));
    free(x), free(w), free(out), free(wq), free(xq), free(dout), free(dx), free(dw);
}
