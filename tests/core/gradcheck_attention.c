/* Finite-difference gradient checks of RoPE + flash attention, alone and as the attention
 * block x + wo(attn(rope(wq n), rope(wk n), wv n)) with n = RMSNorm(x) (double core, whose
 * tiny tiles make these shapes cross tile boundaries). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "attention.h"
#include "gradcheck.h"
#include "layers.h"
#include "qtest.h"

/* ---- RoPE + attention core ---- */

typedef struct {
    int B, T, C, NH, pos0;
    real *q, *k, *v, *R, *qr, *kr, *out, *lse;
} core_t;

static double core_loss(void *p) {
    core_t *c = p;
    rope_forward(c->qr, c->q, c->B, c->T, c->C, c->NH, c->pos0);
    rope_forward(c->kr, c->k, c->B, c->T, c->C, c->NH, c->pos0);
    attention_forward(c->out, c->lse, c->qr, c->kr, c->v, c->B, c->T, c->C, c->NH);
    return gc_dot(c->out, c->R, (size_t)c->B * c->T * c->C);
}

static void core_check(gc_report_t *rep, int B, int T, int C, int NH, int pos0) {
    const size_t n = (size_t)B * T * C;
    core_t c = {.B = B, .T = T, .C = C, .NH = NH, .pos0 = pos0};
    real *buf = calloc(11 * n + (size_t)B * NH * T, sizeof(real));
    c.q = buf, c.k = buf + n, c.v = buf + 2 * n, c.R = buf + 3 * n, c.qr = buf + 4 * n;
    c.kr = buf + 5 * n, c.out = buf + 6 * n, c.lse = buf + 11 * n;
    real *dq = buf + 7 * n, *dk = buf + 8 * n, *dv = buf + 9 * n, *dk2 = buf + 10 * n;
    gc_fill(c.q, n, 20 + T, 1.5);
    gc_fill(c.k, n, 21 + T, 1.5);
    gc_fill(c.v, n, 22 + T, 1);
    gc_fill(c.R, n, 23 + T, 1);
    core_loss(&c);
    attention_backward(dq, dk, dv, c.R, c.qr, c.kr, c.v, c.out, c.lse, B, T, C, NH);
    rope_backward(dq, dq, B, T, C, NH, pos0);
    rope_backward(dk2, dk, B, T, C, NH, pos0);
    char nm[96];
    snprintf(nm, sizeof nm, "attn[T%d C%d NH%d].q", T, C, NH);
    gc_tensor(rep, nm, c.q, n, dq, core_loss, &c);
    snprintf(nm, sizeof nm, "attn[T%d C%d NH%d].k", T, C, NH);
    gc_tensor(rep, nm, c.k, n, dk2, core_loss, &c);
    snprintf(nm, sizeof nm, "attn[T%d C%d NH%d].v", T, C, NH);
    gc_tensor(rep, nm, c.v, n, dv, core_loss, &c);
    free(buf);
}

Test(gradcheck, rope_attention) {
    gc_report_t rep = {0};
    cr_log_info("tiles: %d query rows x %d keys", ATTN_TILE_Q, ATTN_TILE_K);
    core_check(&rep, 2, 9, 8, 2, 3);  /* several query and key tiles, RoPE offset */
    core_check(&rep, 1, 1, 4, 1, 0);  /* a single token */
    core_check(&rep, 1, 13, 6, 1, 0); /* head size 6, T off both tile sizes */
    gc_report_check(&rep, "rope + attention");
}

/* ---- The attention block ---- */

enum { BB = 1, BT_ = 7, BC = 12, BNH = 3 };
#define BN (BB * BT_ * BC)
typedef struct {
    real x[BN], g[BC], wq[BC * BC], wk[BC * BC], wv[BC * BC], wo[BC * BC], R[BN];
    real n[BN], rstd[BB * BT_], q[BN], k[BN], v[BN], qr[BN], kr[BN], a[BN], lse[BB * BNH * BT_];
    real proj[BN], y[BN];
} block_t;

static double block_loss(void *p) {
    block_t *c = p;
    rmsnorm_forward(c->n, c->rstd, c->x, c->g, BB * BT_, BC);
    linear_forward(c->q, c->n, c->wq, NULL, BB * BT_, BC, BC);
    linear_forward(c->k, c->n, c->wk, NULL, BB * BT_, BC, BC);
    linear_forward(c->v, c->n, c->wv, NULL, BB * BT_, BC, BC);
    rope_forward(c->qr, c->q, BB, BT_, BC, BNH, 0);
    rope_forward(c->kr, c->k, BB, BT_, BC, BNH, 0);
    attention_forward(c->a, c->lse, c->qr, c->kr, c->v, BB, BT_, BC, BNH);
    linear_forward(c->proj, c->a, c->wo, NULL, BB * BT_, BC, BC);
    residual_forward(c->y, c->x, c->proj, BN);
    return gc_dot(c->y, c->R, BN);
}

Test(gradcheck, attention_block) {
    block_t c;
    gc_fill(c.x, BN, 30, 1);
    gc_fill(c.g, BC, 31, 1);
    gc_fill(c.wq, BC * BC, 32, 0.5);
    gc_fill(c.wk, BC * BC, 33, 0.5);
    gc_fill(c.wv, BC * BC, 34, 0.5);
    gc_fill(c.wo, BC * BC, 35, 0.5);
    gc_fill(c.R, BN, 36, 1);
    block_loss(&c);
    static real dx[BN], dg[BC], dwq[BC * BC], dwk[BC * BC], dwv[BC * BC], dwo[BC * BC];
    static real dn[BN], dq[BN], dk[BN], dv[BN], da[BN], dproj[BN];
    residual_backward(dx, dproj, c.R, BN);
    linear_backward(da, dwo, NULL, dproj, c.a, c.wo, BB * BT_, BC, BC);
    attention_backward(dq, dk, dv, da, c.qr, c.kr, c.v, c.a, c.lse, BB, BT_, BC, BNH);
    rope_backward(dq, dq, BB, BT_, BC, BNH, 0);
    rope_backward(dk, dk, BB, BT_, BC, BNH, 0);
    linear_backward(dn, dwq, NULL, dq, c.n, c.wq, BB * BT_, BC, BC);
    linear_backward(dn, dwk, NULL, dk, c.n, c.wk, BB * BT_, BC, BC);
    linear_backward(dn, dwv, NULL, dv, c.n, c.wv, BB * BT_, BC, BC);
    rmsnorm_backward(dx, dg, dn, c.x, c.g, c.rstd, BB * BT_, BC);
    gc_report_t rep = {0};
    gc_tensor(&rep, "block.x", c.x, BN, dx, block_loss, &c);
    gc_tensor(&rep, "block.attn_norm.weight", c.g, BC, dg, block_loss, &c);
    gc_tensor(&rep, "block.attn.wq.weight", c.wq, BC * BC, dwq, block_loss, &c);
    gc_tensor(&rep, "block.attn.wk.weight", c.wk, BC * BC, dwk, block_loss, &c);
    gc_tensor(&rep, "block.attn.wv.weight", c.wv, BC * BC, dwv, block_loss, &c);
    gc_tensor(&rep, "block.attn.wo.weight", c.wo, BC * BC, dwo, block_loss, &c);
    gc_report_check(&rep, "attention block");
}
