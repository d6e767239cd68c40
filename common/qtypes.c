#include "qtypes.h"

#include "alloc.h"
#include "error.h"
#include "fp16.h"
#include "quant.h"

#include <math.h>
#include <stdint.h>
#include <string.h>

/* The packed types are the formats of quant.h, in the same order, so an index means the same
 * format in the learner and in a snapshot. */
_Static_assert(QTYPE_COUNT == 5, "update the qtype table");
_Static_assert((int)QTYPE_COUNT == (int)QUANT_TYPE_COUNT, "qtype_t and quant_type_t must agree");
_Static_assert((int)QTYPE_TERNARY == (int)QUANT_TERNARY && (int)QTYPE_INT4 == (int)QUANT_INT4 &&
                   (int)QTYPE_INT8 == (int)QUANT_INT8 && (int)QTYPE_F16 == (int)QUANT_F16,
               "qtype_t and quant_type_t must agree");
_Static_assert(QTYPE_INT4_GROUP == QUANT_INT4_GROUP, "INT4 group length");
_Static_assert(QTYPE_INT4_BLOCK % QTYPE_INT4_GROUP == 0, "INT4 block holds whole groups");

int qtype_round_clip(float v, int lo, int hi) {
    float r = roundf(v);
    if (r < (float)lo)
        return lo;
    if (r > (float)hi)
        return hi;
    return (int)r;
}

static size_t div_up(size_t a, size_t b) {
    return a / b + (a % b != 0);
}

static void put_f32(void *dst, float v) {
    memcpy(dst, &v, sizeof v);
}

static float get_f32(const void *src) {
    float v;
    memcpy(&v, src, sizeof v);
    return v;
}

/* ---- F32 / F16 ---- */

static void f32_quantize(const float *src, void *dst, size_t n) {
    memcpy(dst, src, n * sizeof(float));
}

static void f32_dequantize(const void *src, float *dst, size_t n) {
    memcpy(dst, src, n * sizeof(float));
}

static void f16_quantize(const float *src, void *dst, size_t n) {
    uint8_t *d = dst;
    for (size_t i = 0; i < n; i++) {
        uint16_t h = fp16_from_float(src[i]);
        memcpy(d + 2 * i, &h, 2);
    }
}

static void f16_dequantize(const void *src, float *dst, size_t n) {
    const uint8_t *s = src;
    for (size_t i = 0; i < n; i++) {
        uint16_t h;
        memcpy(&h, s + 2 * i, 2);
        dst[i] = fp16_to_float(h);
    }
}

/* ---- Ternary ---- */

static void ternary_quantize(const float *src, void *dst, size_t n) {
    float sum = 0.0f;
    for (size_t i = 0; i < n; i++)
        sum += fabsf(src[i]);
    float s = sum / (float)n;
    float denom = s + QTYPE_TERNARY_EPS;
    size_t nb = div_up(n, QTYPE_TERNARY_BLOCK);
    uint8_t *q = dst;
    memset(q, 0x55, nb * 64); /* every 2-bit field = 1, i.e. w = 0 */
    for (size_t i = 0; i < n; i++) {
        int code = qtype_round_clip(src[i] / denom, -1, 1);
        size_t b = i / QTYPE_TERNARY_BLOCK, r = i % QTYPE_TERNARY_BLOCK;
        size_t byte = b * 64 + r % 64, shift = 2 * (r / 64);
        q[byte] = (uint8_t)((q[byte] & ~(3u << shift)) | ((unsigned)(code + 1) << shift));
    }
    put_f32(q + nb * 64, s);
}

static void ternary_dequantize(const void *src, float *dst, size_t n) {
    const uint8_t *q = src;
    size_t nb = div_up(n, QTYPE_TERNARY_BLOCK);
    float s = get_f32(q + nb * 64);
    for (size_t i = 0; i < n; i++) {
        size_t b = i / QTYPE_TERNARY_BLOCK, r = i % QTYPE_TERNARY_BLOCK;
        int code = (int)((q[b * 64 + r % 64] >> (2 * (r / 64))) & 3) - 1;
        dst[i] = s * (float)code;
    }
}

/* ---- INT4 ---- */

static void int4_quantize(const float *src, void *dst, size_t n) {
    size_t nb = div_up(n, QTYPE_INT4_BLOCK);
    uint8_t *q = dst;
    uint8_t *scales = q + nb * 64;
    memset(q, 0x88, nb * 64);      /* code 0 in both nibbles */
    memset(scales, 0, nb * 4 * 2); /* padding groups: scale 0 */
    for (size_t g = 0; g * QTYPE_INT4_GROUP < n; g++) {
        size_t i0 = g * QTYPE_INT4_GROUP;
        size_t i1 = i0 + QTYPE_INT4_GROUP < n ? i0 + QTYPE_INT4_GROUP : n;
        float amax = 0.0f;
        for (size_t i = i0; i < i1; i++)
            amax = fmaxf(amax, fabsf(src[i]));
        uint16_t h = fp16_from_float(amax / 7.0f);
        float d = fp16_to_float(h);
        memcpy(scales + 2 * g, &h, 2);
        for (size_t i = i0; i < i1; i++) {
            int code = d != 0.0f ? qtype_round_clip(src[i] / d, -7, 7) : 0;
            size_t b = i / QTYPE_INT4_BLOCK, r = i % QTYPE_INT4_BLOCK;
            size_t byte = b * 64 + r % 64, shift = 4 * (r / 64);
            q[byte] = (uint8_t)((q[byte] & ~(15u << shift)) |
                                ((unsigned)(code + QTYPE_INT4_OFFSET) << shift));
        }
    }
}

static void int4_dequantize(const void *src, float *dst, size_t n) {
    const uint8_t *q = src;
    const uint8_t *scales = q + div_up(n, QTYPE_INT4_BLOCK) * 64;
    for (size_t i = 0; i < n; i++) {
        uint16_t h;
        memcpy(&h, scales + 2 * (i / QTYPE_INT4_GROUP), 2);
        size_t b = i / QTYPE_INT4_BLOCK, r = i % QTYPE_INT4_BLOCK;
        int code = (int)((q[b * 64 + r % 64] >> (4 * (r / 64))) & 15) - QTYPE_INT4_OFFSET;
        dst[i] = fp16_to_float(h) * (float)code;
    }
}

/* ---- INT8 ---- */

static void int8_quantize(const float *src, void *dst, size_t n) {
    float amax = 0.0f;
    for (size_t i = 0; i < n; i++)
        amax = fmaxf(amax, fabsf(src[i]));
    float s = amax / 127.0f;
    size_t np = div_up(n, QTYPE_INT8_BLOCK) * QTYPE_INT8_BLOCK;
    uint8_t *q = dst;
    memset(q, QTYPE_INT8_OFFSET, np);
    for (size_t i = 0; i < n; i++) {
        int code = s != 0.0f ? qtype_round_clip(src[i] / s, -127, 127) : 0;
        q[i] = (uint8_t)(code + QTYPE_INT8_OFFSET);
    }
    put_f32(q + np, s);
}

static void int8_dequantize(const void *src, float *dst, size_t n) {
    const uint8_t *q = src;
    size_t np = div_up(n, QTYPE_INT8_BLOCK) * QTYPE_INT8_BLOCK;
    float s = get_f32(q + np);
    for (size_t i = 0; i < n; i++)
        dst[i] = s * (float)((int)q[i] - QTYPE_INT8_OFFSET);
}

static const qtype_traits_t TRAITS[QTYPE_COUNT] = {
    [QTYPE_F32] = {"f32", 1, 4, 0, f32_quantize, f32_dequantize},
    [QTYPE_F16] = {"f16", 1, 2, 0, f16_quantize, f16_dequantize},
    [QTYPE_TERNARY] = {"ternary", QTYPE_TERNARY_BLOCK, 64, 4, ternary_quantize, ternary_dequantize},
    [QTYPE_INT4] = {"int4", QTYPE_INT4_BLOCK, 64 + 8, 0, int4_quantize, int4_dequantize},
    [QTYPE_INT8] = {"int8", QTYPE_INT8_BLOCK, QTYPE_INT8_BLOCK, 4, int8_quantize, int8_dequantize},
};

const qtype_traits_t *qtype_traits(qtype_t type) {
    Q_ASSERT((unsigned)type < QTYPE_COUNT);
    return &TRAITS[type];
}

const char *qtype_name(qtype_t type) {
    return (unsigned)type < QTYPE_COUNT ? TRAITS[type].name : "?";
}

qtype_t qtype_from_name(const char *name) {
    for (int t = 0; t < QTYPE_COUNT; t++)
        if (name && strcmp(name, TRAITS[t].name) == 0)
            return (qtype_t)t;
    return QTYPE_COUNT;
}

size_t qtype_row_padded(qtype_t type, size_t n) {
    const qtype_traits_t *t = qtype_traits(type);
    return div_up(n, t->block) * t->block;
}

size_t qtype_row_bytes(qtype_t type, size_t n) {
    const qtype_traits_t *t = qtype_traits(type);
    size_t b = q_mul_size(div_up(n, t->block), t->block_bytes);
    return b == SIZE_MAX || b > SIZE_MAX - t->row_extra ? SIZE_MAX : b + t->row_extra;
}

float qtype_row_scale(qtype_t type, const void *row, size_t n) {
    Q_ASSERT(type == QTYPE_TERNARY || type == QTYPE_INT8);
    const qtype_traits_t *t = qtype_traits(type);
    return get_f32((const uint8_t *)row + div_up(n, t->block) * t->block_bytes);
}
