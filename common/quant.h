/* Fake quantization for the learner forward (quantization-aware training, MODEL.md), and the
 * codes and scales of each rollout format.
 *
 * Formats (rows are output channels; "along the row" is the input axis):
 *   QUANT_F32      no quantization
 *   QUANT_F16      each weight rounded to FP16, round-to-nearest-even (fp16.h)
 *   QUANT_TERNARY  BitLinear weights: s_w = mean|W_row|, code = round_clip(W/(s_w+1e-5), -1, 1),
 *                  value s_w * code
 *   QUANT_INT4     groups of QUANT_INT4_GROUP along the row; scale = fp16(max|g| / 7),
 *                  code = round_clip(w / scale, -7, 7), value scale * code
 *   QUANT_INT8     one scale per row: scale = max|row| / 127, code = round_clip(w / scale,
 *                  -127, 127), value scale * code (micro agents; the head when head_int8)
 * Activations of a BitLinear go to int8 per token: s_x = max|x| / 127,
 * code = round_clip(x / s_x, -128, 127).
 *
 * Rounding is half away from zero (C round/roundf) everywhere, learner and worker alike; every
 * scale is computed in `real` with a sequential sum or max in index order, and codes by true
 * division (never by a reciprocal), so a worker that follows these lines gets the same codes.
 * A zero scale (all-zero row or group) gives all-zero codes.
 *
 * Straight-through estimator: the backward of every quantizer is the plain identity (no
 * clipping mask). The gradient with respect to dequantised weights IS the gradient of the
 * latent FP32 weights, so callers accumulate it straight into the latent weights' gradient.
 *
 * Surrogate mode (gradient checks): every quantizer here becomes the identity its STE uses,
 * so finite differences see a smooth function. It is process-global state: set it once before
 * any forward pass, never while another thread runs the model. */
#ifndef QUILLAN_QUANT_H
#define QUILLAN_QUANT_H

#include <stddef.h>
#include <stdint.h>

#include "real.h"

typedef enum {
    QUANT_F32 = 0,
    QUANT_F16,
    QUANT_TERNARY,
    QUANT_INT4,
    QUANT_INT8,
    QUANT_TYPE_COUNT
} quant_type_t;

#define QUANT_INT4_GROUP 32  /* INT4 group length along the input axis */
#define QUANT_INT4_MAX 7     /* INT4 codes are -7..7 */
#define QUANT_INT8_MAX 127   /* INT8 weight codes are -127..127 */
#define QUANT_ACT_MIN (-128) /* int8 activation codes are -128..127 */
#define QUANT_ACT_MAX 127
#define QUANT_TERNARY_EPS 1e-5 /* eps in W / (s_w + eps) */

/* Lower-case name of a format ("f32", "f16", "ternary", "int4", "int8"); "?" when out of
 * range. */
const char *quant_type_name(quant_type_t type);

/* Turns surrogate mode on (1) or off (0); see the file comment. Default off. */
void quant_surrogate_set(int on);
int quant_surrogate_get(void);

/* Rounds half away from zero (0.5 -> 1, -2.5 -> -3): the rounding of all our quantizers. */
real quant_round(real x);

/* ---- Codes and scales of one row (what a snapshot stores). Never affected by surrogate. ---- */

/* Ternary codes of a row w[n] (n >= 1): *scale = s_w = mean|w|, codes[n] in -1..1. */
void quant_ternary_row(int8_t *codes, real *scale, const real *w, int n);

/* INT8 codes of a row w[n] (n >= 1): *scale = max|w| / 127, codes[n] in -127..127. */
void quant_int8_row(int8_t *codes, real *scale, const real *w, int n);

/* INT4 codes of a row w[n] (n >= 1) in groups of 32 (the last group may be shorter):
 * scales[ceil(n/32)] are FP16 bits of fp16(max|g| / 7); codes[n] in -7..7, computed against
 * the FP16-rounded scale, so dequantisation uses exactly what is stored. */
void quant_int4_row(int8_t *codes, uint16_t *scales, const real *w, int n);

/* int8 codes of one token's activations x[n] (n >= 1): *scale = s_x = max|x| / 127,
 * codes[n] in -128..127. */
void quant_act_row(int8_t *codes, real *scale, const real *x, int n);

/* ---- Fake quantization (learner forward). Surrogate mode: plain copies. ---- */

/* out[rows, cols] = dequantised value of w[rows, cols] in format `type` (rows are quantized
 * independently, as described above). out may equal w. Backward: identity (file comment). */
void quant_fake_forward(quant_type_t type, real *out, const real *w, int rows, int cols);

/* out[rows, cols] = s_x * code per row (token) of x: int8 activation fake quantization.
 * out may equal x. Backward: identity. */
void quant_fake_act_forward(real *out, const real *x, int rows, int cols);

/* ---- BitLinear (BitNet b1.58, MODEL.md) ---- */

/* out[BT, OC] = (integer dot of the ternary codes of weight[OC, C] and the int8 codes of
 * inp[BT, C]) * s_w[o] * s_x[t], multiplied in that order, so that any implementation that
 * sums the same integers gets the same bits (the sum is exact while C * 127 < 2^24).
 * Also fills, for the backward: wq[OC, C] = s_w * code (dequantised weights), sw[OC],
 * xq[BT, C] = s_x * code (dequantised activations), sx[BT]. All outputs are ASSIGNED.
 * Surrogate mode: wq = weight, xq = inp, sw = sx = 1, out = inp weight^T. */
void bitlinear_forward(real *out, real *wq, real *sw, real *xq, real *sx, const real *inp,
                       const real *weight, int BT, int C, int OC);

/* The weight half of bitlinear_forward, for callers that run the same weights many times per
 * optimizer step: wcode[OC, C] = ternary codes of weight[OC, C] as reals, wq[OC, C] =
 * s_w * code, sw[OC] (all ASSIGNED; wcode != wq). Surrogate mode: wcode = wq = weight,
 * sw = 1. */
void bitlinear_weight_codes(real *wcode, real *wq, real *sw, const real *weight, int C, int OC);

/* The activation half: out[BT, OC], xq[BT, C] and sx[BT] exactly as bitlinear_forward fills
 * them for the weights whose codes and scales bitlinear_weight_codes gave (all ASSIGNED). */
void bitlinear_forward_codes(real *out, real *xq, real *sx, const real *inp, const real *wcode,
                             const real *sw, int BT, int C, int OC);

/* STE backward of bitlinear_forward, from the wq and xq it filled: dinp[BT, C] += dout wq,
 * dweight[OC, C] += dout^T xq (both ACCUMULATED; either may be NULL to skip it). */
void bitlinear_backward(real *dinp, real *dweight, const real *dout, const real *wq, const real *xq,
                        int BT, int C, int OC);

#endif
