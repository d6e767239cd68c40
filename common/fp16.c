#include "fp16.h"

#include <string.h>

static uint32_t f2u(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u;
}

static float u2f(uint32_t u) {
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* q + 1 when the dropped bits rem (out of 2*half) are above half, or exactly half and q odd. */
static uint32_t round_nearest_even(uint32_t q, uint32_t rem, uint32_t half) {
    return q + (rem > half || (rem == half && (q & 1u)));
}

uint16_t fp16_from_float(float f) {
    const uint32_t x = f2u(f);
    const uint32_t sign = (x >> 16) & 0x8000u;
    const uint32_t ax = x & 0x7fffffffu;
    if (ax >= 0x7f800000u) {
        if (ax == 0x7f800000u)
            return (uint16_t)(sign | 0x7c00u);
        /* NaN: force the quiet bit so that dropping low payload bits cannot make an inf. */
        return (uint16_t)(sign | 0x7e00u | ((ax >> 13) & 0x3ffu));
    }
    if (ax >= 0x477ff000u) /* 65520 and above round to inf (65520 is the tie past 65504) */
        return (uint16_t)(sign | 0x7c00u);
    const uint32_t e = ax >> 23;
    if (e < 113) {
        /* Below 2^-14: a half subnormal, units of 2^-24. The value is mant * 2^(e-150), so the
         * count of units is mant >> (126 - e) rounded. */
        const uint32_t shift = 126u - e;
        if (shift > 24)
            return (uint16_t)sign; /* below 2^-25: mant < 2^24 <= half a unit */
        const uint32_t mant = (ax & 0x7fffffu) | 0x800000u;
        const uint32_t q = mant >> shift;
        const uint32_t rem = mant & ((1u << shift) - 1u);
        return (uint16_t)(sign | round_nearest_even(q, rem, 1u << (shift - 1)));
    }
    /* Normal: rebias the exponent (127 -> 15) and keep 10 mantissa bits; a carry out of the
     * mantissa correctly bumps the exponent (up to inf only for the excluded range). */
    const uint32_t h = ((e - 112u) << 10) | ((ax & 0x7fffffu) >> 13);
    return (uint16_t)(sign | round_nearest_even(h, ax & 0x1fffu, 0x1000u));
}

float fp16_to_float(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    const uint32_t e = (h >> 10) & 0x1fu;
    const uint32_t m = h & 0x3ffu;
    if (e == 0) {
        const float v = (float)m * 0x1p-24f; /* exact: m < 2^10 */
        return sign ? -v : v;
    }
    if (e == 31)
        return u2f(sign | 0x7f800000u | (m << 13));
    return u2f(sign | ((e + 112u) << 23) | (m << 13));
}

float fp16_round(float f) {
    return fp16_to_float(fp16_from_float(f));
}

void fp16_from_float_n(uint16_t *dst, const float *src, size_t n) {
    for (size_t i = 0; i < n; i++)
        dst[i] = fp16_from_float(src[i]);
}

void fp16_to_float_n(float *dst, const uint16_t *src, size_t n) {
    for (size_t i = 0; i < n; i++)
        dst[i] = fp16_to_float(src[i]);
}
