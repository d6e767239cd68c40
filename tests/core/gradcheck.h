/* Finite-difference gradient checks for the double core (tests/core/gradcheck_*.c).
 *
 * Acceptance rule (MODEL.md, issue 3): per tensor, ||g_analytic - g_numeric|| /
 * max(||g_analytic||, ||g_numeric||) <= GC_TOL with central differences of step GC_STEP, on
 * tiny shapes, in surrogate mode (quantizers are the identity their STE uses). Each check
 * prints every tensor's error; gc_report_t keeps the worst, which the test prints and
 * asserts. */
#ifndef QUILLAN_TESTS_GRADCHECK_H
#define QUILLAN_TESTS_GRADCHECK_H

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "qtest.h"
#include "real.h"

#if !REAL_IS_DOUBLE
#error "gradient checks link the double core (quillan_core_f64)"
#endif

#define GC_TOL 1e-4  /* largest relative error per tensor */
#define GC_STEP 1e-5 /* central-difference step */

/* The scalar loss as a function of the tensors the check perturbs in place. */
typedef double (*gc_loss_fn)(void *ctx);

typedef struct {
    char worst_name[96];
    double worst;
} gc_report_t;

/* Prints the check's worst tensor and asserts it is within GC_TOL. */
static inline void gc_report_check(const gc_report_t *rep, const char *what) {
    fprintf(stderr, "gradcheck %s: worst tensor %s, rel err %.3e (tolerance %.0e)\n", what,
            rep->worst_name, rep->worst, GC_TOL);
    cr_assert_leq(rep->worst, GC_TOL, "%s: %s has rel err %g", what, rep->worst_name, rep->worst);
}

/* Compares g[n], the analytic gradient of loss with respect to x[n], with central
 * differences (x is perturbed and restored); records the error in rep and returns it. */
static inline double gc_tensor(gc_report_t *rep, const char *name, real *x, size_t n, const real *g,
                               gc_loss_fn loss, void *ctx) {
    double e2 = 0, a2 = 0, n2 = 0;
    for (size_t i = 0; i < n; i++) {
        const real saved = x[i];
        x[i] = saved + GC_STEP;
        const double lp = loss(ctx);
        x[i] = saved - GC_STEP;
        const double lm = loss(ctx);
        x[i] = saved;
        const double num = (lp - lm) / (2 * GC_STEP);
        e2 += (num - g[i]) * (num - g[i]);
        a2 += (double)g[i] * g[i];
        n2 += num * num;
    }
    const double den = fmax(sqrt(a2), sqrt(n2));
    const double rel = den > 0 ? sqrt(e2) / den : 0;
    fprintf(stderr, "gradcheck %-34s n %5zu  |g| %.3e  rel err %.3e\n", name, n, sqrt(a2), rel);
    if (rel >= rep->worst) {
        rep->worst = rel;
        snprintf(rep->worst_name, sizeof rep->worst_name, "%s", name);
    }
    return rel;
}

/* One tensor of a check: x[n], perturbed in place and restored, and g[n], the analytic gradient
 * of the loss with respect to it. Neither is owned. */
typedef struct {
    const char *name;
    real *x;
    const real *g;
    size_t n;
} gc_entry_t;

/* gc_tensor on each of the count tensors t[i], with one expectation (cr_expect, so every tensor
 * is checked before the test fails) per tensor that its error is at most GC_TOL; the message
 * names label and the tensor. Returns the worst error; rep keeps it with its tensor's name. */
static inline double gc_tensors(gc_report_t *rep, const char *label, const gc_entry_t *t,
                                size_t count, gc_loss_fn loss, void *ctx) {
    for (size_t i = 0; i < count; i++) {
        const double e = gc_tensor(rep, t[i].name, t[i].x, t[i].n, t[i].g, loss, ctx);
        cr_expect(e <= GC_TOL, "%s: %s relative error %.3e > %.0e", label, t[i].name, e, GC_TOL);
    }
    return rep->worst;
}

/* The buffers of a layer-level check (gradcheck_moe, gradcheck_diffusion), all owned: the flat
 * parameters and their gradients, and the layer's input u [BT, C], its gradient du, a fixed
 * projection G and the output y, whose term of the loss is w * sum(y * G); dy = w * G is that
 * term's gradient with respect to y. */
typedef struct {
    size_t n, nu;              /* parameter count; BT * C */
    real *params, *grads;      /* [n] */
    real *u, *du, *G, *y, *dy; /* [nu] */
} gc_layer_t;

/* Allocates every buffer zeroed (a failed allocation fails the test). */
static inline void gc_layer_init(gc_layer_t *b, size_t n, size_t nu) {
    b->n = n;
    b->nu = nu;
    b->params = calloc(n, sizeof(real));
    b->grads = calloc(n, sizeof(real));
    b->u = calloc(nu, sizeof(real));
    b->du = calloc(nu, sizeof(real));
    b->G = calloc(nu, sizeof(real));
    b->y = calloc(nu, sizeof(real));
    b->dy = calloc(nu, sizeof(real));
    cr_assert(b->params && b->grads && b->u && b->du && b->G && b->y && b->dy);
}

static inline void gc_layer_free(gc_layer_t *b) {
    free(b->params);
    free(b->grads);
    free(b->u);
    free(b->du);
    free(b->G);
    free(b->y);
    free(b->dy);
    memset(b, 0, sizeof *b);
}

/* Before a backward pass that accumulates: zeroes grads and du, and sets dy = w * G. */
static inline void gc_layer_seed(gc_layer_t *b, double w) {
    memset(b->grads, 0, b->n * sizeof(real));
    memset(b->du, 0, b->nu * sizeof(real));
    for (size_t i = 0; i < b->nu; i++)
        b->dy[i] = (real)(w * b->G[i]);
}

/* Deterministic test data: n values of sd * N(0, 1) from a splitmix64 chain. */
static inline void gc_fill(real *x, size_t n, unsigned long long seed, double sd) {
    unsigned long long s = seed * 0x9E3779B97F4A7C15ULL + 1;
    for (size_t i = 0; i < n; i++) {
        double u[2];
        for (int k = 0; k < 2; k++) {
            unsigned long long z = (s += 0x9E3779B97F4A7C15ULL);
            z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
            z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
            z ^= z >> 31;
            u[k] = ((double)(z >> 11) + 0.5) / 9007199254740992.0;
        }
        x[i] = (real)(sd * sqrt(-2 * log(u[0])) * cos(6.283185307179586 * u[1]));
    }
}

/* sum_i a[i] * b[i] in double. */
static inline double gc_dot(const real *a, const real *b, size_t n) {
    double s = 0;
    for (size_t i = 0; i < n; i++)
        s += (double)a[i] * b[i];
    return s;
}

#endif
