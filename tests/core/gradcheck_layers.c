/* Finite-difference gradient checks of the dense layers, the head with cross-entropy,
 * temperature, entropy and a completion mask, and the quantized linears in surrogate mode
 * (double core). Each loss is sum(out * R) with a fixed random R unless stated. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "gradcheck.h"
#include "layers.h"
#include "qtest.h"
#include "quant.h"

/* ---- embedding ---- */

enum { EV = 5, EC = 3, EBT = 6 };
typedef struct {
    real wte[EV * EC], R[EBT * EC], out[EBT * EC];
    int32_t tok[EBT];
} emb_t;

static double emb_loss(void *p) {
    emb_t *c = p;
    embedding_forward(c->out, c->tok, c->wte, EBT, EC, EV);
    return gc_dot(c->out, c->R, EBT * EC);
}

Test(gradcheck, embedding) {
    emb_t c = {.tok = {1, 3, 1, 0, 4, 1}};
    gc_fill(c.wte, EV * EC, 1, 1);
    gc_fill(c.R, EBT * EC, 2, 1);
    real dwte[EV * EC] = {0};
    embedding_backward(dwte, c.R, c.tok, EBT, EC, EV);
    gc_report_t rep = {0};
    gc_tensor(&rep, "embedding.wte", c.wte, EV * EC, dwte, emb_loss, &c);
    gc_report_check(&rep, "embedding");
}

/* ---- RMSNorm ---- */

enum { NBT = 4, NC = 6 };
typedef struct {
    real x[NBT * NC], g[NC], R[NBT * NC], out[NBT * NC], rstd[NBT];
} norm_t;

static double norm_loss(void *p) {
    norm_t *c = p;
    rmsnorm_forward(c->out, c->rstd, c->x, c->g, NBT, NC);
    return gc_dot(c->out, c->R, NBT * NC);
}

Test(gradcheck, rmsnorm) {
    norm_t c;
    gc_fill(c.x, NBT * NC, 3, 1);
    gc_fill(c.g, NC, 4, 1);
    gc_fill(c.R, NBT * NC, 5, 1);
    norm_loss(&c);
    real dx[NBT * NC] = {0}, dg[NC] = {0};
    rmsnorm_backward(dx, dg, c.R, c.x, c.g, c.rstd, NBT, NC);
    gc_report_t rep = {0};
    gc_tensor(&rep, "rmsnorm.inp", c.x, NBT * NC, dx, norm_loss, &c);
    gc_tensor(&rep, "rmsnorm.weight", c.g, NC, dg, norm_loss, &c);
    gc_report_check(&rep, "rmsnorm");
}

/* ---- linear, and the quantized linears in surrogate mode ---- */

enum { LBT = 3, LC = 40, LOC = 4 };
typedef struct {
    real x[LBT * LC], w[LOC * LC], b[LOC], R[LBT * LOC], out[LBT * LOC];
    real wq[LOC * LC], xq[LBT * LC], sw[LOC], sx[LBT];
    int mode; /* -1 linear with bias, QUANT_x fake-quantized weights, QUANT_TYPE_COUNT BitLinear */
} lin_t;

static double lin_loss(void *p) {
    lin_t *c = p;
    if (c->mode < 0) {
        linear_forward(c->out, c->x, c->w, c->b, LBT, LC, LOC);
    } else if (c->mode == QUANT_TYPE_COUNT) {
        bitlinear_forward(c->out, c->wq, c->sw, c->xq, c->sx, c->x, c->w, LBT, LC, LOC);
    } else {
        quant_fake_forward((quant_type_t)c->mode, c->wq, c->w, LOC, LC);
        linear_forward(c->out, c->x, c->wq, NULL, LBT, LC, LOC);
    }
    return gc_dot(c->out, c->R, LBT * LOC);
}

static void lin_check(gc_report_t *rep, int mode, const char *name) {
    lin_t c = {.mode = mode};
    gc_fill(c.x, LBT * LC, 6, 1);
    gc_fill(c.w, LOC * LC, 7, 0.3);
    gc_fill(c.b, LOC, 8, 1);
    gc_fill(c.R, LBT * LOC, 9, 1);
    lin_loss(&c);
    real dx[LBT * LC] = {0}, dw[LOC * LC] = {0}, db[LOC] = {0};
    char nm[96];
    if (mode < 0)
        linear_backward(dx, dw, db, c.R, c.x, c.w, LBT, LC, LOC);
    else if (mode == QUANT_TYPE_COUNT)
        bitlinear_backward(dx, dw, c.R, c.wq, c.xq, LBT, LC, LOC);
    else /* STE: the gradient of the dequantised weights is the latent weights' gradient */
        linear_backward(dx, dw, NULL, c.R, c.x, c.wq, LBT, LC, LOC);
    snprintf(nm, sizeof nm, "%s.inp", name);
    gc_tensor(rep, nm, c.x, LBT * LC, dx, lin_loss, &c);
    snprintf(nm, sizeof nm, "%s.weight", name);
    gc_tensor(rep, nm, c.w, LOC * LC, dw, lin_loss, &c);
    if (mode < 0) {
        snprintf(nm, sizeof nm, "%s.bias", name);
        gc_tensor(rep, nm, c.b, LOC, db, lin_loss, &c);
    }
}

Test(gradcheck, linear) {
    gc_report_t rep = {0};
    lin_check(&rep, -1, "linear");
    gc_report_check(&rep, "linear");
}

Test(gradcheck, quantized_linears_surrogate) {
    quant_surrogate_set(1);
    gc_report_t rep = {0};
    lin_check(&rep, QUANT_TYPE_COUNT, "bitlinear");
    lin_check(&rep, QUANT_INT4, "int4_linear");
    lin_check(&rep, QUANT_INT8, "int8_linear");
    lin_check(&rep, QUANT_F16, "fp16_linear");
    lin_check(&rep, QUANT_TERNARY, "ternary_linear");
    quant_surrogate_set(0);
    gc_report_check(&rep, "quantized linears (surrogate)");
}

/* ---- SiLU, ReLU^2, dropout, residual ---- */

enum { PN = 24 };
typedef struct {
    real x[PN], x2[PN], R1[PN], R2[PN], R3[PN], s[PN], r[PN], d[PN], o[PN];
    rng_stream_t rng;
} pw_t;

#define DROP_P 0.3

static double pw_loss(void *p) {
    pw_t *c = p;
    silu_forward(c->s, c->x, PN);
    relu2_forward(c->r, c->x, PN);
    dropout_forward(c->d, c->x2, DROP_P, 1, &c->rng, PN);
    residual_forward(c->o, c->x, c->d, PN);
    return gc_dot(c->s, c->R1, PN) + gc_dot(c->r, c->R2, PN) + gc_dot(c->o, c->R3, PN);
}

Test(gradcheck, pointwise) {
    pw_t c;
    gc_fill(c.x, PN, 10, 1.5);
    gc_fill(c.x2, PN, 11, 1);
    gc_fill(c.R1, PN, 12, 1);
    gc_fill(c.R2, PN, 13, 1);
    gc_fill(c.R3, PN, 14, 1);
    rng_stream_init(&c.rng, 0x44524F50, 1, 2);
    pw_loss(&c);
    real dx[PN] = {0}, dx2[PN] = {0}, dd[PN] = {0};
    silu_backward(dx, c.R1, c.x, PN);
    relu2_backward(dx, c.R2, c.x, PN);
    residual_backward(dx, dd, c.R3, PN);
    dropout_backward(dx2, dd, DROP_P, 1, &c.rng, PN);
    int dropped = 0;
    for (int i = 0; i < PN; i++)
        dropped += c.d[i] == 0;
    cr_assert(dropped > 0 && dropped < PN, "the mask drops some but not all (%d)", dropped);
    gc_report_t rep = {0};
    gc_tensor(&rep, "silu+relu2+residual.inp", c.x, PN, dx, pw_loss, &c);
    gc_tensor(&rep, "dropout.inp", c.x2, PN, dx2, pw_loss, &c);
    gc_report_check(&rep, "pointwise");
}

/* ---- Head: log-probs at a temperature, completion-masked CE, entropy bonus ---- */

/* V and BT cross the double build's chunks (8 vocabulary entries, 4 rows). */
enum { HBT = 7, HC = 5, HV = 19 };
#define HEAD_TEMP 0.7
#define ENT_COEF 0.1
typedef struct {
    real x[HBT * HC], w[HV * HC], mask[HBT], logp[HBT], ent[HBT], lse[HBT];
    int32_t y[HBT];
    real *scratch;
} head_t;

/* CE over completion tokens (mask) minus an entropy bonus on the same tokens. */
static double head_loss(void *p) {
    head_t *c = p;
    head_forward(c->logp, c->ent, c->lse, c->x, c->w, c->y, c->mask, HEAD_TEMP, HBT, HC, HV,
                 c->scratch);
    return (double)crossentropy_forward(c->logp, c->mask, HBT) -
           ENT_COEF * gc_dot(c->ent, c->mask, HBT);
}

Test(gradcheck, head_crossentropy_temperature_mask_entropy) {
    head_t c = {.mask = {0, 0, 1, 1, 1, 0, 1}, .y = {3, 18, 0, 7, 8, 11, 18}};
    c.scratch = malloc(sizeof(real) * head_scratch_len(HC));
    gc_fill(c.x, HBT * HC, 15, 1);
    gc_fill(c.w, HV * HC, 16, 1);
    head_loss(&c);
    real dlogp[HBT], dent[HBT], dx[HBT * HC] = {0}, dw[HV * HC] = {0};
    crossentropy_backward(dlogp, 1, c.mask, HBT);
    for (int t = 0; t < HBT; t++)
        dent[t] = -ENT_COEF * c.mask[t];
    head_backward(dx, dw, dlogp, dent, c.x, c.w, c.y, c.lse, c.ent, HEAD_TEMP, HBT, HC, HV,
                  c.scratch);
    gc_report_t rep = {0};
    gc_tensor(&rep, "head.inp", c.x, HBT * HC, dx, head_loss, &c);
    gc_tensor(&rep, "head.weight", c.w, HV * HC, dw, head_loss, &c);
    for (int t = 0; t < HBT; t++)
        if (c.mask[t] == 0)
            for (int k = 0; k < HC; k++)
                cr_assert_eq(dx[t * HC + k], 0, "prompt row %d gets no gradient", t);
    free(c.scratch);
    gc_report_check(&rep, "head");
}
