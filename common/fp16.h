/* IEEE 754 binary16 conversion, scalar reference (MODEL.md: conversions to FP16 use
 * round-to-nearest-even, as F16C and CUDA's __float2half_rn do).
 *
 * Portable bit manipulation, no hardware half type: the learner's FP16 fake quantization, the
 * INT4 group scales and the rollout snapshots all go through these functions, so every
 * process rounds the same way. A vectorised F16C path may be added later behind run-time
 * dispatch; it must agree bit for bit with these. */
#ifndef QUILLAN_FP16_H
#define QUILLAN_FP16_H

#include <stddef.h>
#include <stdint.h>

#define FP16_MAX 65504.0f /* largest finite half */

/* float -> half bits, round to nearest, ties to even. Overflow (|f| >= 65520 after rounding)
 * gives +-inf; results below the normal range become subnormals or +-0 (RNE applies there
 * too); inf stays inf; NaN becomes a quiet NaN keeping the sign and the top payload bits. */
uint16_t fp16_from_float(float f);

/* half bits -> float, exact (every half is a float). */
float fp16_to_float(uint16_t h);

/* fp16_to_float(fp16_from_float(f)): the value a float takes after a trip through FP16. */
float fp16_round(float f);

/* Array forms of the above; n elements, src and dst must not overlap. */
void fp16_from_float_n(uint16_t *dst, const float *src, size_t n);
void fp16_to_float_n(float *dst, const uint16_t *src, size_t n);

#endif
