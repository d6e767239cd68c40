/* The scalar type of the CPU reference model.
 *
 * The model, its layers and its optimizer are written once against `real`. The normal build
 * uses float; the gradient-check build compiles the same sources with -DQ_REAL_DOUBLE, so that
 * finite differences on tiny shapes can be held to 1e-4 (MODEL.md acceptance), which float
 * rounding cannot reach. Quantizer codes and scales follow MODEL.md exactly in float builds; in
 * the double build the gradient checks run in surrogate mode (quantizers replaced by the
 * identity their STE uses), so the quantizers' float rounding rules never meet doubles there. */
#ifndef QUILLAN_REAL_H
#define QUILLAN_REAL_H

#ifdef Q_REAL_DOUBLE
typedef double real;
#define REAL_IS_DOUBLE 1
#define R_EXP exp
#define R_LOG log
#define R_SQRT sqrt
#define R_TANH tanh
#define R_FABS fabs
#define R_SIN sin
#define R_COS cos
#define R_POW pow
#define R_FMAX fmax
#else
typedef float real;
#define REAL_IS_DOUBLE 0
#define R_EXP expf
#define R_LOG logf
#define R_SQRT sqrtf
#define R_TANH tanhf
#define R_FABS fabsf
#define R_SIN sinf
#define R_COS cosf
#define R_POW powf
#define R_FMAX fmaxf
#endif

#include <stdint.h>
#include <string.h>

/* v where keep, else +0: a bit mask rather than a branch, so loops that use it compute both
 * sides for every element and vectorise (the compiler keeps a floating-point operation under a
 * branch conditional; the ReLU² forward and backward). Same values as `keep ? v : 0`. */
static inline real real_keep_or_zero(real v, int keep) {
#if REAL_IS_DOUBLE
    uint64_t u;
    memcpy(&u, &v, sizeof u);
    u &= 0u - (uint64_t)(keep != 0);
#else
    uint32_t u;
    memcpy(&u, &v, sizeof u);
    u &= 0u - (uint32_t)(keep != 0);
#endif
    memcpy(&v, &u, sizeof v);
    return v;
}

#endif
