/* Parity of the CUDA layers (cuda_attn, cuda_moe, cuda_diffusion) against the CPU reference of
 * the compute core (common/attention.c, moe.c, diffusion.c), the oracle.
 *
 * Each check runs the CPU function and the device one on the same random inputs, tiny shapes
 * (the tiny preset's) and mid shapes (ragged lengths, the 512m preset's head size), forward
 * outputs and every gradient, and prints one line:
 *   PARITY <name> max_rel_err=<e> tol=<t> PASS|FAIL
 * max_rel_err = max_i |gpu_i - cpu_i| / max_i |cpu_i|; a NaN or Inf on either side fails; tol=0
 * lines compare exactly (indices, bits, counts). Statistics that are not pass/fail on their own
 * are printed as INFO lines. Exit status 1 if any check fails, 77 (skipped, never passed) when no
 * GPU is present.
 *
 * Routing: random FP32 inputs give logits that the CPU and cuBLAS sum in different orders, so a
 * near tie may be decided differently on the two sides; the layer checks therefore (1) run an
 * "exact" case whose inputs are small dyadic numbers, where every logit is exact in FP32 in any
 * summation order and ties are frequent (the tie rule is checked index for index), and (2) run
 * the random case with the CPU's routing replayed on the device, comparing values and gradients
 * on the same routing. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cuda_runtime.h>
#include <vector>

#include "gpu_parity.h"

#include "cuda_attn.h"
#include "cuda_buf.h"
#include "cuda_diffusion.h"
#include "cuda_gemm.h"
#include "cuda_moe.h"
#include "cuda_ops.h"

extern "C" {
#include "attention.h"
#include "diffusion.h"
#include "moe.h"
#include "quant.h"
#include "rng.h"
}

/* ---- Tolerances (relative to the reference tensor's largest magnitude) ---- */

/* FP32 attention: exp and the sums run in another order than the CPU's (tiles of 32 keys,
 * warp reductions), a few ulps per term, growing with the number of keys summed. */
#define TOL_ATTN_F32 2e-5
#define TOL_ATTN_F32_GRAD 1e-4
/* FP16 tensor-core attention: q, k, v, dout and the probabilities rounded to FP16 (2^-11
 * relative) as tiles load, FP32 accumulation. */
#define TOL_ATTN_F16 4e-3
#define TOL_ATTN_F16_GRAD 1e-2
/* BF16 keeps 8 mantissa bits against FP16's 11. */
#define TOL_ATTN_BF16 3e-2
#define TOL_ATTN_BF16_GRAD 6e-2
/* FP32 MoE: GEMM dot products and per-router sums in another order; expert and router weight
 * gradients sum over up to BT tokens. */
#define TOL_MOE_F32 5e-5
#define TOL_MOE_F32_GRAD 2e-4
/* FP16 / BF16 overseer and expert GEMMs (activations and upstream gradients rounded as they are
 * gathered); routers stay FP32. */
#define TOL_MOE_F16 5e-3
#define TOL_MOE_F16_GRAD 1e-2
#define TOL_MOE_BF16 4e-2
#define TOL_MOE_BF16_GRAD 8e-2
/* Diffusion: the BitLinear products are exact integers, but the RMSNorm sums before each
 * quantizer run in another order, so an int8 activation code lying within rounding of a half
 * can differ by one (moving one product by s_x s_w, about 1/127 of the row's scale). */
#define TOL_DIFF_OUT 3e-3
#define TOL_DIFF_GRAD 1e-2
/* Fraction of positions whose free-running plan may differ from the CPU's: a code flip as above
 * can move a flip logit across 0 or reorder two equal-looking confidences. */
#define TOL_PLAN_POSITIONS 0.05

/* Small dyadic values k / 8 with |k| <= 4: products and sums of a few hundred stay exact. */
static std::vector<float> rand_dyadic(size_t n) {
    std::vector<float> v(n);
    for (size_t i = 0; i < n; i++)
        v[i] = (float)((int)(rng_stream_uniform(&g_parity_rng) * 9.0f) - 4) / 8.0f;
    return v;
}

static int g_bf16; /* the device runs BF16 (sm_80+) */

/* ================================ attention ================================ */

static void test_attn(int B, int T, int C, int NH) {
    qerr_t err;
    const size_t n = (size_t)B * T * C, nl = (size_t)B * NH * T;
    std::vector<float> q = randn(n, 1.0f), k = randn(n, 1.0f), v = randn(n, 1.0f),
                       dout = randn(n, 1.0f), g0 = randn(n, 0.1f);
    std::vector<float> out(n), lse(nl), dq = g0, dk = g0, dv = g0;
    attention_forward(out.data(), lse.data(), q.data(), k.data(), v.data(), B, T, C, NH);
    attention_backward(dq.data(), dk.data(), dv.data(), dout.data(), q.data(), k.data(), v.data(),
                       out.data(), lse.data(), B, T, C, NH);
    float *q_ = dev(q), *k_ = dev(k), *v_ = dev(v), *dout_ = dev(dout);
    float *o_ = dev(std::vector<float>(n)), *dlse = dev(std::vector<float>(nl));
    float *gq = dev(g0), *gk = dev(g0), *gv = dev(g0);
    void *ws = nullptr;
    CUDA_CHECK(cudaMalloc(&ws, cuda_attn_backward_workspace(B, T, NH)));
    for (int pi = 0; pi < CUDA_ATTN_PREC_COUNT; pi++) {
        const cuda_attn_prec_t prec = (cuda_attn_prec_t)pi;
        if (prec == CUDA_ATTN_BF16 && !g_bf16)
            continue;
        if (cuda_attn_check(B, T, C, NH, prec, &err)) {
            report(nm("attn.check.%s.B%dT%dC%dH%d", cuda_attn_prec_name(prec), B, T, C, NH), 1, 0,
                   0);
            printf("  %s\n", err.msg);
            continue;
        }
        const double tf = prec == CUDA_ATTN_FP32   ? TOL_ATTN_F32
                          : prec == CUDA_ATTN_FP16 ? TOL_ATTN_F16
                                                   : TOL_ATTN_BF16;
        const double tg = prec == CUDA_ATTN_FP32   ? TOL_ATTN_F32_GRAD
                          : prec == CUDA_ATTN_FP16 ? TOL_ATTN_F16_GRAD
                                                   : TOL_ATTN_BF16_GRAD;
        cuda_attn_forward(o_, dlse, q_, k_, v_, B, T, C, NH, prec, 0);
        CUDA_CHECK(cudaMemcpy(gq, g0.data(), n * 4, cudaMemcpyHostToDevice));
        CUDA_CHECK(cudaMemcpy(gk, g0.data(), n * 4, cudaMemcpyHostToDevice));
        CUDA_CHECK(cudaMemcpy(gv, g0.data(), n * 4, cudaMemcpyHostToDevice));
        cuda_attn_backward(gq, gk, gv, ws, dout_, q_, k_, v_, o_, dlse, B, T, C, NH, prec, 0);
        const char *p = cuda_attn_prec_name(prec);
        check(nm("attn.out.%s.B%dT%dC%dH%d", p, B, T, C, NH), host(o_, n), out, tf);
        check(nm("attn.lse.%s.B%dT%dC%dH%d", p, B, T, C, NH), host(dlse, nl), lse, tf);
        check(nm("attn.dq.%s.B%dT%dC%dH%d", p, B, T, C, NH), host(gq, n), dq, tg);
        check(nm("attn.dk.%s.B%dT%dC%dH%d", p, B, T, C, NH), host(gk, n), dk, tg);
        check(nm("attn.dv.%s.B%dT%dC%dH%d", p, B, T, C, NH), host(gv, n), dv, tg);
    }
    for (void *x : {(void *)q_, (void *)k_, (void *)v_, (void *)dout_, (void *)o_, (void *)dlse,
                    (void *)gq, (void *)gk, (void *)gv, ws})
        dfree(x);
}

/* ================================ MoE ================================ */

/* Device copies of the nine tensors of one layer (and views of them). */
struct dmoe_t {
    float *buf;
    moe_params_t p;
};

static dmoe_t dmoe_new(const std::vector<float> &h, const moe_dims_t *d) {
    dmoe_t m;
    m.buf = dev(h);
    moe_params_map(&m.p, m.buf, d);
    return m;
}

/* Compute-type copies of the overseer and expert weights of a F16/BF16 layer. */
struct dlowp_t {
    void *w[4];
    cuda_moe_lowp_t lp;
};

static dlowp_t dlowp_new(const moe_params_t *p, const moe_dims_t *d, cuda_dtype_t dt) {
    size_t s[9];
    moe_params_sizes(d, s);
    const float *src[4] = {p->ov_w1, p->ov_w2, p->exp_w1, p->exp_w2};
    const size_t cnt[4] = {s[0], s[1], s[4], s[5]};
    dlowp_t l;
    for (int i = 0; i < 4; i++) {
        CUDA_CHECK(cudaMalloc(&l.w[i], cnt[i] * cuda_dtype_size(dt)));
        cuda_convert(l.w[i], dt, src[i], CUDA_DT_F32, cnt[i], 0);
    }
    l.lp = cuda_moe_lowp_t{l.w[0], l.w[1], l.w[2], l.w[3]};
    return l;
}

/* The CPU's values of a layer after rounding the overseer and expert weights to dt (the
 * weights the device layer multiplies by). */
static std::vector<float> round_weights(const std::vector<float> &h, const moe_dims_t *d,
                                        cuda_dtype_t dt) {
    if (dt == CUDA_DT_F32)
        return h;
    std::vector<float> r = h;
    moe_params_t p;
    moe_params_map(&p, r.data(), d);
    size_t s[9];
    moe_params_sizes(d, s);
    float *t[4] = {p.ov_w1, p.ov_w2, p.exp_w1, p.exp_w2};
    const size_t cnt[4] = {s[0], s[1], s[4], s[5]};
    for (int i = 0; i < 4; i++) {
        float *dx = dev(std::vector<float>(t[i], t[i] + cnt[i]));
        void *lo = nullptr;
        CUDA_CHECK(cudaMalloc(&lo, cnt[i] * 2));
        cuda_convert(lo, dt, dx, CUDA_DT_F32, cnt[i], 0);
        cuda_convert(dx, CUDA_DT_F32, lo, dt, cnt[i], 0);
        std::vector<float> back = host(dx, cnt[i]);
        memcpy(t[i], back.data(), cnt[i] * 4);
        dfree(dx);
        dfree(lo);
    }
    return r;
}

enum moe_case_t { MOE_EXACT, MOE_RANDOM, MOE_ONE_EXPERT };

/* One layer: CPU forward/backward against the device's, for one input regime and dtype.
 * MOE_EXACT: dyadic inputs and weights (exact logits, many ties): own routing compared index for
 * index, then a random replay record. MOE_RANDOM: random inputs, the CPU's routing replayed on
 * the device. MOE_ONE_EXPERT: biases send every token to one mini and one expert. */
static void test_moe(const moe_dims_t *d, int BT, moe_case_t mc, cuda_dtype_t dt, cuda_gemm_t *g) {
    qerr_t err;
    const char *cn = mc == MOE_EXACT ? "exact" : mc == MOE_RANDOM ? "random" : "one_expert";
    const char *dn = cuda_dtype_name(dt);
    const int C = d->C, M = d->M, E = d->E, N = d->N;
    size_t s[9];
    const size_t np = moe_params_sizes(d, s);
    std::vector<float> w = mc == MOE_EXACT ? rand_dyadic(np) : randn(np, 0.1f);
    std::vector<float> u = mc == MOE_EXACT ? rand_dyadic((size_t)BT * C) : randn((size_t)BT * C, 1);
    if (mc == MOE_EXACT) {
        for (float &x : w) /* scale so SiLU and ReLU² stay in a sensible range */
            x /= 4.0f;
        /* Duplicate router rows: bit-identical logits, so the tie rule decides. */
        moe_params_t wp;
        moe_params_map(&wp, w.data(), d);
        memcpy(wp.gate + C, wp.gate, (size_t)C * 4);
        for (int j = 0; j < M; j++) {
            float *r = wp.router + (size_t)j * E * C, *mr = wp.mic_router + (size_t)j * N * C;
            memcpy(r + C, r, (size_t)C * 4);
            for (int i = 1; i < 4 && i < N; i++)
                memcpy(mr + (size_t)i * C, mr, (size_t)C * 4);
        }
    }
    const size_t nb = (size_t)M + (size_t)M * E + (size_t)M * N;
    std::vector<float> bias(nb, 0.0f);
    if (mc == MOE_RANDOM)
        bias = randn(nb, 0.01f);
    if (mc == MOE_ONE_EXPERT) {
        bias[2 % M] = 100.0f;
        for (int j = 0; j < M; j++)
            bias[M + (size_t)j * E + (3 % E)] = 100.0f;
    }
    moe_bias_t hb = {bias.data(), bias.data() + M, bias.data() + M + (size_t)M * E};
    std::vector<float> wc = round_weights(w, d, dt); /* what the device multiplies */
    moe_params_t hp;
    moe_params_map(&hp, wc.data(), d);

    /* CPU: own routing. */
    moe_acts_t *acts = moe_acts_new(d, BT, &err);
    moe_load_t load;
    Q_ASSERT(acts && moe_load_init(&load, d, &err) == 0);
    std::vector<float> y((size_t)BT * C);
    moe_aux_t aux;
    Q_ASSERT(moe_forward(acts, y.data(), &aux, &load, u.data(), &hp, &hb, NULL, d, BT, &err) == 0);
    moe_route_t own;
    Q_ASSERT(moe_route_init(&own, d, BT, &err) == 0);
    {
        const moe_route_t *r = moe_acts_route(acts);
        own.BT = BT;
        memcpy(own.mini, r->mini, (size_t)BT * d->KM * 4);
        memcpy(own.expert, r->expert, (size_t)BT * d->KM * d->KE * 4);
        memcpy(own.micro, r->micro, (size_t)BT * d->KM * d->KN * 4);
    }
    const float dbal = 0.3f, dz = 0.05f;
    std::vector<float> dy = randn((size_t)BT * C, 1.0f), g0 = randn(np, 0.01f),
                       du0 = randn((size_t)BT * C, 0.01f);
    std::vector<float> gw = g0, du = du0;
    moe_params_t hdp;
    moe_params_map(&hdp, gw.data(), d);
    moe_backward(&hdp, du.data(), dy.data(), acts, u.data(), &hp, dbal, dz, d, BT);

    /* Device. */
    cuda_moe_t *m = cuda_moe_new(d, BT, dt, &err);
    if (!m) {
        report(nm("moe.new.%s.%s", cn, dn), 1, 0, 0);
        printf("  %s\n", err.msg);
        return;
    }
    dmoe_t dw = dmoe_new(w, d), dg = dmoe_new(g0, d);
    dlowp_t lp = {};
    if (dt != CUDA_DT_F32)
        lp = dlowp_new(&dw.p, d, dt);
    float *dbias = dev(bias), *du_ = dev(du0), *dy_ = dev(dy), *u_ = dev(u);
    float *y_ = dev(std::vector<float>((size_t)BT * C));
    unsigned long long *dload = nullptr;
    CUDA_CHECK(cudaMalloc(&dload, cuda_moe_load_len(d) * 8));
    CUDA_CHECK(cudaMemset(dload, 0, cuda_moe_load_len(d) * 8));
    moe_bias_t db = {dbias, dbias + M, dbias + M + (size_t)M * E};
    const bool replay = mc == MOE_RANDOM;
    moe_aux_t gaux;
    if (cuda_moe_forward(m, g, y_, &gaux, dload, u_, &dw.p, dt == CUDA_DT_F32 ? NULL : &lp.lp, &db,
                         replay ? &own : NULL, BT, 0, &err)) {
        report(nm("moe.forward.%s.%s", cn, dn), 1, 0, 0);
        printf("  %s\n", err.msg);
        return;
    }
    const bool f32 = dt == CUDA_DT_F32;
    const double tf = f32 ? TOL_MOE_F32 : dt == CUDA_DT_F16 ? TOL_MOE_F16 : TOL_MOE_BF16;
    const double tg = f32                 ? TOL_MOE_F32_GRAD
                      : dt == CUDA_DT_F16 ? TOL_MOE_F16_GRAD
                                          : TOL_MOE_BF16_GRAD;
    const int S = BT * d->KM;
    moe_route_t gr;
    Q_ASSERT(moe_route_init(&gr, d, BT, &err) == 0);
    Q_ASSERT(cuda_moe_route_download(m, &gr, 0, &err) == 0);
    check_same(nm("moe.route.mini.%s.%s.BT%d", cn, dn, BT), gr.mini, own.mini, (size_t)S);
    check_same(nm("moe.route.expert.%s.%s.BT%d", cn, dn, BT), gr.expert, own.expert,
               (size_t)S * d->KE);
    check_same(nm("moe.route.micro.%s.%s.BT%d", cn, dn, BT), gr.micro, own.micro,
               (size_t)S * d->KN);
    if (mc == MOE_ONE_EXPERT) {
        size_t off = 0;
        for (int i = 0; i < S; i++)
            off += gr.mini[i] != 2 % M || gr.expert[(size_t)i * d->KE] != 3 % E;
        report(nm("moe.one_expert.all_routed.%s.BT%d", dn, BT), (double)off, 0, off == 0);
    }
    if (replay)
        printf("INFO moe.own_vs_cpu_mismatches.%s.%s.BT%d %ld of %ld decisions\n", cn, dn, BT,
               gaux.mismatches, gaux.decisions);
    else
        check_same(nm("moe.aux.mismatches.%s.%s.BT%d", cn, dn, BT), &gaux.mismatches,
                   &aux.mismatches, 1);
    check(nm("moe.y.%s.%s.BT%d", cn, dn, BT), host(y_, (size_t)BT * C), y, tf);
    check_scalar(nm("moe.aux.balance.%s.%s.BT%d", cn, dn, BT), gaux.balance, aux.balance,
                 TOL_MOE_F32);
    check_scalar(nm("moe.aux.z.%s.%s.BT%d", cn, dn, BT), gaux.z, aux.z, TOL_MOE_F32);
    check_same(nm("moe.aux.routers.%s.%s.BT%d", cn, dn, BT), &gaux.routers, &aux.routers, 1);
    check_same(nm("moe.aux.decisions.%s.%s.BT%d", cn, dn, BT), &gaux.decisions, &aux.decisions, 1);
    if (!replay) {
        moe_load_t gl;
        Q_ASSERT(moe_load_init(&gl, d, &err) == 0);
        Q_ASSERT(cuda_moe_load_download(&gl, dload, 0, &err) == 0);
        check_same(nm("moe.load.gate.%s.%s.BT%d", cn, dn, BT), gl.gate, load.gate, (size_t)M);
        check_same(nm("moe.load.router.%s.%s.BT%d", cn, dn, BT), gl.router, load.router,
                   (size_t)M * E);
        check_same(nm("moe.load.micro.%s.%s.BT%d", cn, dn, BT), gl.micro, load.micro,
                   (size_t)M * N);
        /* Loss-free balancing from the same counts. */
        std::vector<float> hb2 = bias;
        moe_bias_t hbb = {hb2.data(), hb2.data() + M, hb2.data() + M + (size_t)M * E};
        moe_bias_update(&hbb, &load, 1e-2f);
        cuda_moe_bias_update(&db, dload, d, 1e-2f, 0);
        std::vector<float> gb = host(dbias, nb);
        check_same(nm("moe.bias_update.%s.%s.BT%d", cn, dn, BT), gb.data(), hb2.data(), nb);
        CUDA_CHECK(cudaMemcpy(dbias, bias.data(), nb * 4, cudaMemcpyHostToDevice));
        moe_load_free(&gl);
    }
    cuda_moe_backward(m, g, &dg.p, du_, dy_, u_, &dw.p, f32 ? NULL : &lp.lp, dbal, dz, 0);
    check(nm("moe.du.%s.%s.BT%d", cn, dn, BT), host(du_, (size_t)BT * C), du, tg);
    {
        std::vector<float> ggw = host(dg.buf, np);
        static const char *names[9] = {"ov_w1",  "ov_w2",      "gate",     "router", "exp_w1",
                                       "exp_w2", "mic_router", "mic_down", "mic_up"};
        for (int i = 0, o = 0; i < 9; o += (int)s[i], i++)
            check(nm("moe.d%s.%s.%s.BT%d", names[i], cn, dn, BT),
                  std::vector<float>(ggw.begin() + o, ggw.begin() + o + (long)s[i]),
                  std::vector<float>(gw.begin() + o, gw.begin() + o + (long)s[i]), tg);
    }

    /* Replay of a random valid record on the exact inputs: routing from the record, mismatches
     * counted the same way on both sides. */
    if (mc == MOE_EXACT) {
        moe_route_t rec;
        Q_ASSERT(moe_route_init(&rec, d, BT, &err) == 0);
        rec.BT = BT;
        auto pick = [&](int32_t *dst, int k, int n) {
            for (int i = 0; i < k; i++) {
                int v;
                bool dup;
                do {
                    v = randint(0, n);
                    dup = false;
                    for (int i2 = 0; i2 < i; i2++)
                        dup |= dst[i2] == v;
                } while (dup);
                dst[i] = v;
            }
        };
        for (int t = 0; t < BT; t++) {
            pick(rec.mini + (size_t)t * d->KM, d->KM, M);
            for (int mm = 0; mm < d->KM; mm++) {
                const size_t sl = (size_t)t * d->KM + mm;
                pick(rec.expert + sl * d->KE, d->KE, E);
                pick(rec.micro + sl * d->KN, d->KN, N);
            }
        }
        moe_aux_t a2, ga2;
        Q_ASSERT(moe_forward(acts, y.data(), &a2, NULL, u.data(), &hp, &hb, &rec, d, BT, &err) ==
                 0);
        Q_ASSERT(cuda_moe_forward(m, g, y_, &ga2, NULL, u_, &dw.p, f32 ? NULL : &lp.lp, &db, &rec,
                                  BT, 0, &err) == 0);
        check(nm("moe.replay.y.%s.BT%d", dn, BT), host(y_, (size_t)BT * C), y, tf);
        check_same(nm("moe.replay.mismatches.%s.BT%d", dn, BT), &ga2.mismatches, &a2.mismatches, 1);
        /* A malformed record (an index out of range) is refused with QERR_INVALID. */
        rec.expert[0] = E;
        const int rc = cuda_moe_forward(m, g, y_, &ga2, NULL, u_, &dw.p, f32 ? NULL : &lp.lp, &db,
                                        &rec, BT, 0, &err);
        report(nm("moe.replay.malformed_refused.%s", dn), 0, 0,
               rc == -1 && err.code == QERR_INVALID);
        moe_route_free(&rec);
    }

    moe_route_free(&gr);
    moe_route_free(&own);
    moe_load_free(&load);
    moe_acts_destroy(&acts);
    cuda_moe_destroy(&m);
    for (void *x : {(void *)dw.buf, (void *)dg.buf, (void *)dbias, (void *)du_, (void *)dy_,
                    (void *)u_, (void *)y_, (void *)dload})
        dfree(x);
    if (dt != CUDA_DT_F32)
        for (void *x : lp.w)
            dfree(x);
}

/* ================================ diffusion ================================ */

static size_t nwords(int Lb) {
    return (size_t)diffusion_words(Lb);
}

static void test_diffusion(const diffusion_dims_t *d, int BT, cuda_dtype_t dt, cuda_gemm_t *g) {
    qerr_t err;
    const char *dn = cuda_dtype_name(dt);
    const int C = d->C, Lb = d->Lb, K = d->K;
    const size_t Lw = nwords(Lb), nw = (size_t)BT * Lw;
    const uint64_t seed = 5678;
    size_t sz[DIFFUSION_NUM_TENSORS];
    const size_t np = diffusion_params_sizes(d, sz);
    std::vector<float> w = randn(np, 0.05f);
    {
        /* Norm gains near 1, as initialised. */
        diffusion_params_t hp;
        diffusion_params_map(&hp, w.data(), d);
        float *gains[] = {hp.in_z_norm, hp.in_c_norm, hp.time_norm, hp.blk_norm,
                          hp.up_norm,   hp.down_norm, hp.out_norm,  hp.dec_norm};
        const size_t gn[] = {sz[1], sz[3], sz[5], sz[6], sz[8], sz[10], sz[12], sz[14]};
        for (int i = 0; i < 8; i++)
            for (size_t j = 0; j < gn[i]; j++)
                gains[i][j] = 1.0f + gains[i][j];
    }
    diffusion_params_t hp;
    diffusion_params_map(&hp, w.data(), d);
    std::vector<float> u = randn((size_t)BT * C, 1.0f), dout = randn((size_t)BT * C, 1.0f);
    std::vector<int32_t> pos(BT);
    for (int t = 0; t < BT; t++)
        pos[t] = 3 + t % 97;

    /* SimHash codes and training noise: bit for bit. */
    const int V = 50;
    std::vector<float> R((size_t)Lb * C), head = randn((size_t)V * C, 1.0f), mask(BT);
    diffusion_simhash_init(R.data(), Lb, C, seed);
    std::vector<int32_t> targets(BT);
    for (int t = 0; t < BT; t++) {
        targets[t] = randint(0, V);
        mask[t] = t % 5 == 4 ? 0.0f : 1.0f;
    }
    std::vector<uint64_t> code(nw, 0), noise(nw);
    for (int t = 0; t < BT; t++)
        if (mask[t] != 0)
            diffusion_code(code.data() + (size_t)t * Lw, R.data(),
                           head.data() + (size_t)targets[t] * C, Lb, C);
    std::vector<float> tau(BT);
    rng_stream_t rs, rs2;
    rng_stream_init(&rs, 0x4E4F4953ULL, 42, 7);
    rs2 = rs;
    diffusion_noise_draw(tau.data(), noise.data(), &rs, BT, Lb);

    cuda_diffusion_t *A = cuda_diffusion_new(d, BT, dt, &err);
    if (!A) {
        report(nm("diffusion.new.%s", dn), 1, 0, 0);
        printf("  %s\n", err.msg);
        return;
    }
    float *R_ = dev(R), *head_ = dev(head), *mask_ = dev(mask), *u_ = dev(u), *dout_ = dev(dout);
    int32_t *targets_ = dev(targets), *pos_ = dev(pos);
    uint64_t *code_ = dev(std::vector<uint64_t>(nw)), *noise_ = dev(std::vector<uint64_t>(nw));
    float *tau_ = dev(std::vector<float>(BT)), *out_ = dev(std::vector<float>((size_t)BT * C));
    float *loss_ = dev(std::vector<float>(1));
    cuda_diffusion_code(code_, R_, head_, targets_, mask_, BT, Lb, C, 0);
    check_same(nm("diffusion.code.%s.Lb%d.BT%d", dn, Lb, BT), host(code_, nw).data(), code.data(),
               nw);
    Q_ASSERT(cuda_diffusion_noise_draw(A, tau_, noise_, &rs2, BT, 0, &err) == 0);
    check_same(nm("diffusion.noise.mask.%s.Lb%d.BT%d", dn, Lb, BT), host(noise_, nw).data(),
               noise.data(), nw);
    check_same(nm("diffusion.noise.tau.%s.Lb%d.BT%d", dn, Lb, BT), host(tau_, BT).data(),
               tau.data(), (size_t)BT);
    check_same(nm("diffusion.noise.stream.%s", dn), &rs2.counter, &rs.counter, 1);

    /* Free-running plan: the CPU's and the device's K steps from the same z_K. */
    diffusion_acts_t *acts = diffusion_acts_new(d, BT, &err);
    Q_ASSERT(acts);
    std::vector<float> out((size_t)BT * C);
    diffusion_aux_t aux, gaux;
    Q_ASSERT(diffusion_forward(acts, out.data(), &aux, u.data(), pos.data(), &hp, NULL, seed, d, BT,
                               &err) == 0);
    diffusion_plan_t cplan, gplan;
    Q_ASSERT(diffusion_plan_init(&cplan, Lb, BT, &err) == 0 &&
             diffusion_plan_init(&gplan, Lb, BT, &err) == 0);
    {
        const diffusion_plan_t *pl = diffusion_acts_plan(acts);
        cplan.BT = BT;
        memcpy(cplan.z1, pl->z1, nw * 8);
        memcpy(cplan.z0, pl->z0, nw * 8);
    }
    float *dw_ = dev(w);
    diffusion_params_t dp_;
    diffusion_params_map(&dp_, dw_, d);
    Q_ASSERT(cuda_diffusion_forward(A, g, out_, &gaux, u_, pos_, &dp_, NULL, seed, BT, 0, &err) ==
             0);
    Q_ASSERT(cuda_diffusion_plan_download(A, &gplan, 0, &err) == 0);
    {
        int diff = 0, diff1 = 0;
        for (int t = 0; t < BT; t++) {
            diff += memcmp(gplan.z0 + (size_t)t * Lw, cplan.z0 + (size_t)t * Lw, Lw * 8) != 0;
            diff1 += memcmp(gplan.z1 + (size_t)t * Lw, cplan.z1 + (size_t)t * Lw, Lw * 8) != 0;
        }
        if (K == 1) /* z_1 = z_K: the device's plan noise, bit for bit */
            report(nm("diffusion.plan_noise.%s.Lb%d.BT%d", dn, Lb, BT), diff1, 0, diff1 == 0);
        const double frac = (double)diff / BT;
        report(nm("diffusion.plan.free_running.%s.Lb%d.K%d.BT%d", dn, Lb, K, BT), frac,
               TOL_PLAN_POSITIONS, frac <= TOL_PLAN_POSITIONS);
        if (diff == 0)
            check(nm("diffusion.out.free_running.%s.Lb%d.BT%d", dn, Lb, BT),
                  host(out_, (size_t)BT * C), out, TOL_DIFF_OUT);
    }

    /* The CPU's plan replayed on the device: write-back and every gradient on the same plan. */
    Q_ASSERT(cuda_diffusion_forward(A, g, out_, &gaux, u_, pos_, &dp_, &cplan, seed, BT, 0, &err) ==
             0);
    {
        const double frac = (double)gaux.mismatches / BT;
        report(nm("diffusion.replay.own_step_agreement.%s.Lb%d.BT%d", dn, Lb, BT), frac,
               TOL_PLAN_POSITIONS, frac <= TOL_PLAN_POSITIONS);
    }
    check(nm("diffusion.out.replay.%s.Lb%d.BT%d", dn, Lb, BT), host(out_, (size_t)BT * C), out,
          TOL_DIFF_OUT);
    std::vector<float> g0 = randn(np, 0.01f), du0 = randn((size_t)BT * C, 0.01f);
    std::vector<float> gw = g0, du = du0;
    diffusion_params_t hdp;
    diffusion_params_map(&hdp, gw.data(), d);
    diffusion_backward(&hdp, du.data(), dout.data(), acts, u.data(), &hp, d, BT);
    const float dloss = 0.7f;
    const float closs = diffusion_loss_forward(acts, code.data(), noise.data(), tau.data(),
                                               mask.data(), u.data(), &hp, d, BT);
    diffusion_loss_backward(&hdp, du.data(), dloss, acts, u.data(), &hp, d, BT);

    float *dg_ = dev(g0), *du_ = dev(du0);
    diffusion_params_t dgp;
    diffusion_params_map(&dgp, dg_, d);
    cuda_diffusion_backward(A, g, &dgp, du_, dout_, u_, &dp_, 0);
    Q_ASSERT(cuda_diffusion_loss_forward(A, g, loss_, code_, noise_, tau_, mask_, u_, &dp_, BT, 0,
                                         &err) == 0);
    cuda_diffusion_loss_backward(A, g, &dgp, du_, dloss, u_, &dp_, 0);
    check_scalar(nm("diffusion.loss.%s.Lb%d.BT%d", dn, Lb, BT), host(loss_, 1)[0], closs,
                 TOL_DIFF_OUT);
    check(nm("diffusion.du.%s.Lb%d.BT%d", dn, Lb, BT), host(du_, (size_t)BT * C), du,
          TOL_DIFF_GRAD);
    {
        static const char *names[DIFFUSION_NUM_TENSORS] = {
            "in_z_w",    "in_z_norm", "in_c_w",   "in_c_norm", "time_w",
            "time_norm", "blk_norm",  "up_w",     "up_norm",   "down_w",
            "down_norm", "out_w",     "out_norm", "dec_w",     "dec_norm"};
        std::vector<float> ggw = host(dg_, np);
        for (size_t i = 0, o = 0; i < DIFFUSION_NUM_TENSORS; o += sz[i], i++)
            check(nm("diffusion.d%s.%s.Lb%d.BT%d", names[i], dn, Lb, BT),
                  std::vector<float>(ggw.begin() + (long)o, ggw.begin() + (long)(o + sz[i])),
                  std::vector<float>(gw.begin() + (long)o, gw.begin() + (long)(o + sz[i])),
                  TOL_DIFF_GRAD);
    }
    /* A malformed plan record (a bit past Lb) is refused. */
    if (Lb % 64 != 0) {
        cplan.z0[0] |= 1ULL << 63;
        const int rc =
            cuda_diffusion_forward(A, g, out_, &gaux, u_, pos_, &dp_, &cplan, seed, BT, 0, &err);
        report(nm("diffusion.replay.malformed_refused.%s", dn), 0, 0,
               rc == -1 && err.code == QERR_INVALID);
    }

    diffusion_plan_free(&cplan);
    diffusion_plan_free(&gplan);
    diffusion_acts_destroy(&acts);
    cuda_diffusion_destroy(&A);
    for (void *x : {(void *)R_, (void *)head_, (void *)mask_, (void *)u_, (void *)dout_,
                    (void *)targets_, (void *)pos_, (void *)code_, (void *)noise_, (void *)tau_,
                    (void *)out_, (void *)loss_, (void *)dw_, (void *)dg_, (void *)du_})
        dfree(x);
}

int main(void) {
    const char *prog = "gpu_parity_attn_moe";
    if (parity_start(prog, 0x4C415952ULL /* "LAYR" */, 1))
        return PARITY_SKIP;
    cudaDeviceProp prop;
    CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
    g_bf16 = prop.major >= 8;
    quant_surrogate_set(0);
    qerr_t err;
    cuda_gemm_t *g = cuda_gemm_new(32u << 20, &err);
    if (!g) {
        fprintf(stderr, "gpu_parity_attn_moe: %s\n", err.msg);
        return 1;
    }

    /* Attention: HS 16, the tiny preset's 32, the 512m preset's 64, and 128; ragged T. */
    test_attn(1, 5, 32, 2);
    test_attn(2, 37, 128, 4);
    test_attn(2, 300, 512, 8);
    test_attn(1, 130, 256, 2);

    /* MoE: the tiny preset's layer, and a mid layer with the 512m preset's top-k. */
    const moe_dims_t tiny = {128, 32, 4, 2, 4, 2, 128, 24, 8};
    const moe_dims_t mid = {256, 96, 8, 2, 8, 2, 192, 100, 8};
    const moe_dims_t one = {64, 32, 4, 1, 4, 1, 64, 16, 4};
    cuda_dtype_t dts[3] = {CUDA_DT_F32, CUDA_DT_F16, CUDA_DT_BF16};
    for (cuda_dtype_t dt : dts) {
        if (dt == CUDA_DT_BF16 && !g_bf16)
            continue;
        test_moe(&tiny, 64, MOE_EXACT, dt, g);
        test_moe(&mid, 300, MOE_EXACT, dt, g);
        if (dt == CUDA_DT_F32) {
            test_moe(&tiny, 64, MOE_RANDOM, dt, g);
            test_moe(&mid, 300, MOE_RANDOM, dt, g);
            test_moe(&one, 50, MOE_ONE_EXPERT, dt, g);
        }
    }

    /* Diffusion: the tiny preset's stage, K = 1 (plan noise visible), and a mid stage. */
    const diffusion_dims_t dtiny = {128, 32, 128, 2, 384, 64, 4};
    const diffusion_dims_t dk1 = {128, 96, 64, 1, 128, 16, 1};
    const diffusion_dims_t dmid = {256, 256, 256, 2, 512, 64, 10};
    test_diffusion(&dtiny, 64, CUDA_DT_F32, g);
    test_diffusion(&dtiny, 64, CUDA_DT_F16, g);
    test_diffusion(&dk1, 40, CUDA_DT_F32, g);
    test_diffusion(&dmid, 200, CUDA_DT_F32, g);
    if (g_bf16)
        test_diffusion(&dtiny, 64, CUDA_DT_BF16, g);

    cuda_gemm_destroy(&g);
    return parity_finish(prog);
}
