/* Parity of the CUDA ops (learner/cuda: cuda_gemm, cuda_ops, cuda_optim, cuda_dapo) against
 * the CPU reference of the compute core, the oracle.
 *
 * Every check runs the CPU function and the kernel on the same random inputs (tiny shapes and
 * mid shapes, with ragged edges: sizes that are not multiples of the block, group or chunk
 * sizes) and prints one PARITY line (gpu_parity.h). tol=0 checks are bit-exact: the kernels
 * promise the CPU's bits there (see cuda_ops.h) and the bits are compared, not the values.
 * Exit status 1 if any check fails; 77 (skipped, never passed) when no GPU is present. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cuda_buf.h"
#include "cuda_dapo.h"
#include "cuda_gemm.h"
#include "cuda_ops.h"
#include "cuda_optim.h"
#include "gpu_parity.h"

extern "C" {
#include "attention.h"
#include "fp16.h"
#include "gemm.h"
#include "layers.h"
#include "model_config.h"
#include "moe.h"
}

/* ---- Tolerances (relative to the reference tensor's largest magnitude) ---- */

/* FP32 reductions summed in another order than the CPU's sequential loops (RMSNorm sums,
 * GEMM dot products, logsumexp): a few ulps of the partial sums, growing like sqrt(length). */
#define TOL_F32_REDUCE 2e-5
/* RoPE: the angles are computed in double by CUDA's pow/sin/cos (<= 2 ulp of double) and
 * rounded to float, as the CPU does with glibc's; the float tables can differ by one float ulp
 * in the rare case where the double results straddle a rounding boundary. */
#define TOL_ROPE 1e-6
/* Head through FP16 tensor cores: inputs rounded to FP16 (2^-11 relative), FP32 accumulate. */
#define TOL_HEAD_F16 3e-3
/* Head gradients through FP16: the logit gradients are stored as FP16 too. */
#define TOL_HEAD_F16_GRAD 1e-2
/* BF16 keeps 8 mantissa bits (2^-8 relative) against FP16's 11. */
#define TOL_HEAD_BF16 2e-2
#define TOL_HEAD_BF16_GRAD 5e-2
/* GEMM of operands already rounded to FP16/BF16 on the host: only the FP32 accumulation order
 * differs from the double-accumulating oracle. */
#define TOL_GEMM_LOWP_IN 2e-5
/* GEMM with an FP16/BF16 output: one rounding of the result. */
#define TOL_GEMM_F16_OUT 1e-3
#define TOL_GEMM_BF16_OUT 8e-3
/* A scalar the CPU sums sequentially in float over thousands of rows (moe_zloss_forward): its
 * own rounding grows like sqrt(n) eps on average (n eps = 2.4e-4 worst case at n = 4097); the
 * device sums in double. */
#define TOL_F32_LONG_SUM 1e-4
/* Double accumulations in another order (cross-entropy, DAPO metrics) then rounded to float. */
#define TOL_DOUBLE_SUM 1e-6
/* AdamW with an active clip: the clip factor comes from a norm summed in another order. */
#define TOL_ADAM_CLIPPED 1e-6

/* BF16 round to nearest even of a finite float (the host oracle of __float2bfloat16_rn). */
static float bf16_round(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    u = (u + 0x7fffu + ((u >> 16) & 1u)) & 0xffff0000u;
    memcpy(&f, &u, 4);
    return f;
}

/* A device copy of a float array in dtype dt. */
static void *dev_as(const std::vector<float> &h, cuda_dtype_t dt) {
    float *d32 = dev(h);
    if (dt == CUDA_DT_F32)
        return d32;
    void *d = nullptr;
    CUDA_CHECK(cudaMalloc(&d, h.size() * 2));
    cuda_convert(d, dt, d32, CUDA_DT_F32, h.size(), 0);
    dfree(d32);
    return d;
}

static std::vector<float> host_from(const void *d, cuda_dtype_t dt, size_t n) {
    float *d32 = dev_zero<float>(n);
    cuda_convert(d32, CUDA_DT_F32, d, dt, n, 0);
    std::vector<float> h = host(d32, n);
    dfree(d32);
    return h;
}

/* ---- Conversions ---- */

static void test_convert(void) {
    /* Random values over the whole FP16 range plus the edge cases of fp16.c: ties, 65504,
     * 65520 (the tie past it), subnormals, signed zeros, inf, NaN with payload. */
    std::vector<float> x = randn(4099, 3000.0f);
    const float special[] = {0.0f,      -0.0f,    65504.0f,      65519.99f,      65520.0f,
                             -65520.0f, 1e-8f,    -3e-8f,        5.96e-8f,       2.98e-8f,
                             6.1e-5f,   6.09e-5f, 1.0009765625f, 1.00048828125f, INFINITY,
                             -INFINITY, 1e30f};
    for (float s : special)
        x.push_back(s);
    uint32_t nanbits = 0x7fa12345u;
    float qnan;
    memcpy(&qnan, &nanbits, 4);
    x.push_back(qnan);
    const size_t n = x.size();
    float *dx = dev(x);
    uint16_t *dh = dev_zero<uint16_t>(n);
    cuda_convert(dh, CUDA_DT_F16, dx, CUDA_DT_F32, n, 0);
    std::vector<uint16_t> gh = host(dh, n), ch(n);
    fp16_from_float_n(ch.data(), x.data(), n);
    report("convert.f32_to_f16.bits", 0, 0, memcmp(gh.data(), ch.data(), n * 2) == 0);
    /* Back to FP32 (exact widening), NaN and inf excluded from the value comparison. */
    std::vector<float> finite_x(x.begin(), x.begin() + 4099);
    void *df = dev_as(finite_x, CUDA_DT_F16);
    std::vector<float> back = host_from(df, CUDA_DT_F16, finite_x.size()), ref(finite_x.size());
    for (size_t i = 0; i < finite_x.size(); i++)
        ref[i] = fp16_round(finite_x[i]);
    check_exact("convert.f16_roundtrip", back, ref);
    void *db = dev_as(finite_x, CUDA_DT_BF16);
    std::vector<float> bback = host_from(db, CUDA_DT_BF16, finite_x.size());
    for (size_t i = 0; i < finite_x.size(); i++)
        ref[i] = bf16_round(finite_x[i]);
    check_exact("convert.bf16_roundtrip", bback, ref);
    dfree(dx);
    dfree(dh);
    dfree(df);
    dfree(db);
}

/* ---- GEMM ---- */

static void test_gemm(cuda_gemm_t *g, int M, int N, int K) {
    for (int ta = 0; ta < 2; ta++)
        for (int tb = 0; tb < 2; tb++)
            for (int d = 0; d < CUDA_DT_COUNT; d++) {
                const cuda_dtype_t dt = (cuda_dtype_t)d;
                std::vector<float> A = randn((size_t)M * K, 1.0f), B = randn((size_t)K * N, 1.0f);
                std::vector<float> C0 = randn((size_t)M * N, 1.0f);
                /* The oracle sees the operands as the device does. */
                for (float &v : A)
                    v = dt == CUDA_DT_F16 ? fp16_round(v) : dt == CUDA_DT_BF16 ? bf16_round(v) : v;
                for (float &v : B)
                    v = dt == CUDA_DT_F16 ? fp16_round(v) : dt == CUDA_DT_BF16 ? bf16_round(v) : v;
                const int lda = ta ? M : K, ldb = tb ? K : N;
                std::vector<float> ref = C0;
                gemm_naive((gemm_trans_t)ta, (gemm_trans_t)tb, M, N, K, 0.5f, A.data(), lda,
                           B.data(), ldb, 0.25f, ref.data(), N);
                void *dA = dev_as(A, dt), *dB = dev_as(B, dt);
                float *dC = dev(C0);
                cuda_gemm_run(g, 0, (gemm_trans_t)ta, (gemm_trans_t)tb, M, N, K, 0.5f, dA, lda, dB,
                              ldb, 0.25f, dC, N, dt, CUDA_DT_F32);
                check(nm("gemm.%s.%c%c.%dx%dx%d", cuda_dtype_name(dt), ta ? 't' : 'n',
                         tb ? 't' : 'n', M, N, K),
                      host(dC, (size_t)M * N), ref,
                      dt == CUDA_DT_F32 ? TOL_F32_REDUCE : TOL_GEMM_LOWP_IN);
                if (dt != CUDA_DT_F32) {
                    /* Output in the operands' type, beta 0. */
                    std::vector<float> ref0((size_t)M * N);
                    gemm_naive((gemm_trans_t)ta, (gemm_trans_t)tb, M, N, K, 1.0f, A.data(), lda,
                               B.data(), ldb, 0.0f, ref0.data(), N);
                    void *dC16 = dev_as(ref0, dt); /* garbage-free start; beta 0 ignores it */
                    cuda_gemm_run(g, 0, (gemm_trans_t)ta, (gemm_trans_t)tb, M, N, K, 1.0f, dA, lda,
                                  dB, ldb, 0.0f, dC16, N, dt, dt);
                    check(nm("gemm.%s_out.%c%c.%dx%dx%d", cuda_dtype_name(dt), ta ? 't' : 'n',
                             tb ? 't' : 'n', M, N, K),
                          host_from(dC16, dt, (size_t)M * N), ref0,
                          dt == CUDA_DT_F16 ? TOL_GEMM_F16_OUT : TOL_GEMM_BF16_OUT);
                    dfree(dC16);
                }
                dfree(dA);
                dfree(dB);
                dfree(dC);
            }
    /* Strided batch of 3, n/t. */
    const int batch = 3;
    std::vector<float> A = randn((size_t)batch * M * K, 1.0f),
                       B = randn((size_t)batch * N * K, 1.0f);
    std::vector<float> ref((size_t)batch * M * N, 0.0f);
    for (int i = 0; i < batch; i++)
        gemm_naive(GEMM_N, GEMM_T, M, N, K, 1.0f, A.data() + (size_t)i * M * K, K,
                   B.data() + (size_t)i * N * K, K, 0.0f, ref.data() + (size_t)i * M * N, N);
    float *dA = dev(A), *dB = dev(B), *dC = dev_zero<float>(ref.size());
    cuda_gemm_run_batched(g, 0, GEMM_N, GEMM_T, M, N, K, 1.0f, dA, K, (long long)M * K, dB, K,
                          (long long)N * K, 0.0f, dC, N, (long long)M * N, batch, CUDA_DT_F32,
                          CUDA_DT_F32);
    check(nm("gemm_batched.f32.nt.%dx%dx%dx%d", batch, M, N, K), host(dC, ref.size()), ref,
          TOL_F32_REDUCE);
    dfree(dA);
    dfree(dB);
    dfree(dC);
}

/* ---- Embedding, RMSNorm, RoPE, residual, dropout ---- */

static void test_embedding(int BT, int C, int V) {
    std::vector<float> wte = randn((size_t)V * C, 1.0f), dout = randn((size_t)BT * C, 1.0f);
    std::vector<int32_t> tok(BT);
    for (int t = 0; t < BT; t++)
        tok[t] = t % 4 == 0 ? 3 % V : randint(0, V); /* token 3 repeats: rows add up */
    std::vector<float> out((size_t)BT * C), dwte = randn((size_t)V * C, 0.1f);
    float *dW = dev(wte), *dO = dev_zero<float>(out.size()), *dG = dev(dout), *dD = dev(dwte);
    int32_t *dT = dev(tok);
    embedding_forward(out.data(), tok.data(), wte.data(), BT, C, V);
    cuda_embedding_forward(dO, dT, dW, BT, C, V, 0);
    check_exact(nm("embedding.forward.%dx%d", BT, C), host(dO, out.size()), out);
    embedding_backward(dwte.data(), dout.data(), tok.data(), BT, C, V);
    cuda_embedding_backward(dD, dG, dT, BT, C, V, 0);
    check_exact(nm("embedding.backward.%dx%d", BT, C), host(dD, dwte.size()), dwte);
    dfree(dW);
    dfree(dO);
    dfree(dG);
    dfree(dD);
    dfree(dT);
}

static void test_rmsnorm(int BT, int C) {
    std::vector<float> x = randn((size_t)BT * C, 2.0f), w = randn(C, 1.0f),
                       dy = randn((size_t)BT * C, 1.0f);
    std::vector<float> out((size_t)BT * C), rstd(BT), dx = randn((size_t)BT * C, 0.5f),
                                                      dw = randn(C, 0.5f);
    float *dX = dev(x), *dW = dev(w), *dY = dev(dy), *dO = dev_zero<float>(out.size()),
          *dR = dev_zero<float>(BT), *dDX = dev(dx), *dDW = dev(dw);
    rmsnorm_forward(out.data(), rstd.data(), x.data(), w.data(), BT, C);
    cuda_rmsnorm_forward(dO, dR, dX, dW, BT, C, 0);
    check(nm("rmsnorm.forward.%dx%d", BT, C), host(dO, out.size()), out, TOL_F32_REDUCE);
    check(nm("rmsnorm.rstd.%dx%d", BT, C), host(dR, BT), rstd, TOL_F32_REDUCE);
    /* Backward from the CPU's rstd, so that only the backward's own sums differ. */
    CUDA_CHECK(cudaMemcpy(dR, rstd.data(), BT * sizeof(float), cudaMemcpyHostToDevice));
    rmsnorm_backward(dx.data(), dw.data(), dy.data(), x.data(), w.data(), rstd.data(), BT, C);
    cuda_rmsnorm_backward(dDX, dDW, dY, dX, dW, dR, BT, C, 0);
    check(nm("rmsnorm.backward.dinp.%dx%d", BT, C), host(dDX, dx.size()), dx, TOL_F32_REDUCE);
    check(nm("rmsnorm.backward.dweight.%dx%d", BT, C), host(dDW, C), dw, TOL_F32_REDUCE);
    for (float *p : {dX, dW, dY, dO, dR, dDX, dDW})
        dfree(p);
}

static void test_rope(int B, int T, int C, int NH, int pos0) {
    const size_t n = (size_t)B * T * C;
    std::vector<float> x = randn(n, 1.0f), out(n), back(n);
    float *dX = dev(x), *dO = dev_zero<float>(n);
    rope_forward(out.data(), x.data(), B, T, C, NH, pos0);
    cuda_rope_forward(dO, dX, B, T, C, NH, pos0, 0);
    check(nm("rope.forward.%dx%dx%d.h%d.pos%d", B, T, C, NH, pos0), host(dO, n), out, TOL_ROPE);
    rope_backward(back.data(), out.data(), B, T, C, NH, pos0);
    cuda_rope_backward(dO, dO, B, T, C, NH, pos0, 0); /* in place, as the header allows */
    check(nm("rope.backward.%dx%dx%d.h%d.pos%d", B, T, C, NH, pos0), host(dO, n), back, TOL_ROPE);
    dfree(dX);
    dfree(dO);
}

static void test_residual_dropout(size_t N) {
    std::vector<float> a = randn(N, 1.0f), b = randn(N, 1.0f), out(N), da = randn(N, 1.0f),
                       db = randn(N, 1.0f);
    float *dA = dev(a), *dB = dev(b), *dO = dev_zero<float>(N), *dDA = dev(da), *dDB = dev(db);
    residual_forward(out.data(), a.data(), b.data(), N);
    cuda_residual_forward(dO, dA, dB, N, 0);
    check_exact(nm("residual.forward.%zu", N), host(dO, N), out);
    residual_backward(da.data(), db.data(), a.data(), N);
    cuda_residual_backward(dDA, dDB, dA, N, 0);
    check_exact(nm("residual.backward.da.%zu", N), host(dDA, N), da);
    check_exact(nm("residual.backward.db.%zu", N), host(dDB, N), db);

    rng_stream_t rs;
    rng_stream_init(&rs, 0x44524F50ULL, 7, 3);
    rs.counter = 12345;
    const float p = 0.1f;
    dropout_forward(out.data(), a.data(), p, 1, &rs, N);
    cuda_dropout_forward(dO, dA, p, 1, rs, N, 0);
    check_exact(nm("dropout.forward.%zu", N), host(dO, N), out);
    dropout_backward(da.data(), b.data(), p, 1, &rs, N);
    cuda_dropout_backward(dDA, dB, p, 1, rs, N, 0);
    check_exact(nm("dropout.backward.%zu", N), host(dDA, N), da);
    for (float *q : {dA, dB, dO, dDA, dDB})
        dfree(q);
}

/* ---- Fake quantization and BitLinear ---- */

static void test_quant(int rows, int cols) {
    const size_t n = (size_t)rows * cols;
    std::vector<float> w = randn(n, 0.05f);
    /* An all-zero row (zero scale), exact ties for the rounding rule, and a large outlier. */
    for (int c = 0; c < cols; c++)
        w[c] = 0.0f;
    if (rows > 1) {
        for (int c = 0; c < cols; c++)
            w[(size_t)cols + c] = (float)((c % 9) - 4) * 0.5f;
        w[(size_t)cols + 1] = 127.0f; /* INT8 scale 1: the ties +-0.5, +-1.5 round away */
    }
    float *dW = dev(w), *dO = dev_zero<float>(n);
    void *dO16 = dev_zero<uint16_t>(n);
    const quant_type_t types[] = {QUANT_F32, QUANT_F16, QUANT_TERNARY, QUANT_INT4, QUANT_INT8};
    for (quant_type_t ty : types) {
        std::vector<float> ref(n);
        quant_fake_forward(ty, ref.data(), w.data(), rows, cols);
        cuda_quant_fake_forward(ty, dO, CUDA_DT_F32, dW, rows, cols, 0);
        check_exact(nm("quant.fake.%s.%dx%d", quant_type_name(ty), rows, cols), host(dO, n), ref);
        /* The same values stored as FP16: fp16_round of the FP32 values. */
        cuda_quant_fake_forward(ty, dO16, CUDA_DT_F16, dW, rows, cols, 0);
        for (float &v : ref)
            v = fp16_round(v);
        check_exact(nm("quant.fake.%s.f16_out.%dx%d", quant_type_name(ty), rows, cols),
                    host_from(dO16, CUDA_DT_F16, n), ref);
    }
    std::vector<float> ref(n);
    std::vector<float> x = randn(n, 3.0f);
    float *dX = dev(x);
    quant_fake_act_forward(ref.data(), x.data(), rows, cols);
    cuda_quant_fake_act_forward(dO, CUDA_DT_F32, dX, rows, cols, 0);
    check_exact(nm("quant.fake.act.%dx%d", rows, cols), host(dO, n), ref);
    dfree(dW);
    dfree(dO);
    dfree(dO16);
    dfree(dX);
}

static void test_bitlinear(cuda_gemm_t *g, int BT, int C, int OC) {
    std::vector<float> w = randn((size_t)OC * C, 0.05f), x = randn((size_t)BT * C, 1.0f),
                       dy = randn((size_t)BT * OC, 1.0f);
    std::vector<float> wcode((size_t)OC * C), wq((size_t)OC * C), sw(OC), out((size_t)BT * OC),
        xq((size_t)BT * C), sx(BT);
    bitlinear_weight_codes(wcode.data(), wq.data(), sw.data(), w.data(), C, OC);
    bitlinear_forward_codes(out.data(), xq.data(), sx.data(), x.data(), wcode.data(), sw.data(), BT,
                            C, OC);
    float *dW = dev(w), *dX = dev(x), *dWq = dev_zero<float>(wq.size()), *dSw = dev_zero<float>(OC),
          *dOut = dev_zero<float>(out.size()), *dXq = dev_zero<float>(xq.size()),
          *dSx = dev_zero<float>(BT);
    for (int d = 0; d < CUDA_DT_COUNT; d++) {
        const cuda_dtype_t dt = (cuda_dtype_t)d;
        void *dWc, *dXc;
        CUDA_CHECK(cudaMalloc(&dWc, wcode.size() * cuda_dtype_size(dt)));
        CUDA_CHECK(cudaMalloc(&dXc, xq.size() * cuda_dtype_size(dt)));
        cuda_bitlinear_weight_codes(dWc, dt, dWq, dSw, dW, C, OC, 0);
        cuda_bitlinear_forward_codes(g, dOut, dXq, dSx, dXc, dX, dWc, dSw, BT, C, OC, dt, 0);
        check_exact(nm("bitlinear.wcode.%s.%dx%d", cuda_dtype_name(dt), OC, C),
                    host_from(dWc, dt, wcode.size()), wcode);
        check_exact(nm("bitlinear.wq.%s.%dx%d", cuda_dtype_name(dt), OC, C), host(dWq, wq.size()),
                    wq);
        check_exact(nm("bitlinear.sw.%s.%d", cuda_dtype_name(dt), OC), host(dSw, OC), sw);
        check_exact(nm("bitlinear.forward.%s.%dx%dx%d", cuda_dtype_name(dt), BT, C, OC),
                    host(dOut, out.size()), out);
        check_exact(nm("bitlinear.xq.%s.%dx%d", cuda_dtype_name(dt), BT, C), host(dXq, xq.size()),
                    xq);
        check_exact(nm("bitlinear.sx.%s.%d", cuda_dtype_name(dt), BT), host(dSx, BT), sx);
        dfree(dWc);
        dfree(dXc);
    }
    /* STE backward through the CPU's wq and xq. */
    std::vector<float> dx = randn(x.size(), 0.1f), dw = randn(w.size(), 0.1f);
    float *dDX = dev(dx), *dDW = dev(dw), *dY = dev(dy);
    bitlinear_backward(dx.data(), dw.data(), dy.data(), wq.data(), xq.data(), BT, C, OC);
    cuda_bitlinear_backward(g, dDX, dDW, dY, dWq, dXq, BT, C, OC, 0);
    check(nm("bitlinear.backward.dinp.%dx%dx%d", BT, C, OC), host(dDX, dx.size()), dx,
          TOL_F32_REDUCE);
    check(nm("bitlinear.backward.dweight.%dx%dx%d", BT, C, OC), host(dDW, dw.size()), dw,
          TOL_F32_REDUCE);
    for (float *p : {dW, dX, dWq, dSw, dOut, dXq, dSx, dDX, dDW, dY})
        dfree(p);
}

/* ---- Head: log-probs, entropy, cross-entropy ---- */

static void test_head(cuda_gemm_t *g, int BT, int C, int V, int vchunk, float temp) {
    /* Logits of std ~ 0.1 sqrt(C): a softmax neither flat nor one-hot, so that log-probs and
     * entropy both carry information (and FP16/BF16 logit errors stay small against them). */
    std::vector<float> x = randn((size_t)BT * C, 1.0f), w = randn((size_t)V * C, 0.1f);
    std::vector<int32_t> tgt(BT), rows;
    std::vector<float> mask(BT), wts(BT);
    for (int t = 0; t < BT; t++) {
        tgt[t] = randint(0, V);
        mask[t] = (t % 5 != 1) ? 1.0f : 0.0f; /* some inactive rows, as prompt positions */
        wts[t] = mask[t];
        if (mask[t] != 0)
            rows.push_back(t);
    }
    const int R = (int)rows.size();
    std::vector<float> logp(BT), ent(BT), lse(BT);
    std::vector<float> scratch(head_scratch_len(C));
    head_forward(logp.data(), ent.data(), lse.data(), x.data(), w.data(), tgt.data(), mask.data(),
                 temp, BT, C, V, scratch.data());
    /* Upstream gradients on the active rows only (the CPU skips rows where both are 0). */
    std::vector<float> gl(BT, 0.0f), ge(BT, 0.0f);
    for (int t : rows) {
        gl[t] = rng_stream_normal(&g_parity_rng);
        ge[t] = 0.3f * rng_stream_normal(&g_parity_rng);
    }
    std::vector<float> dx = randn(x.size(), 0.01f), dw = randn(w.size(), 0.01f);
    std::vector<float> dx0 = dx, dw0 = dw;
    head_backward(dx.data(), dw.data(), gl.data(), ge.data(), x.data(), w.data(), tgt.data(),
                  lse.data(), ent.data(), temp, BT, C, V, scratch.data());
    const double ce = crossentropy_forward(logp.data(), wts.data(), BT);
    std::vector<float> dce(BT);
    crossentropy_backward(dce.data(), 1.5f, wts.data(), BT);

    float *dX = dev(x), *dLp = dev_zero<float>(BT), *dEn = dev_zero<float>(BT),
          *dLse = dev_zero<float>(BT), *dGl = dev(gl), *dGe = dev(ge), *dWts = dev(wts),
          *dDce = dev_zero<float>(BT);
    int32_t *dT = dev(tgt), *dRows = dev(rows);
    double *dCe = dev_zero<double>(1);
    for (int d = 0; d < CUDA_DT_COUNT; d++) {
        const cuda_dtype_t dt = (cuda_dtype_t)d;
        const double tol = dt == CUDA_DT_F32   ? TOL_F32_REDUCE
                           : dt == CUDA_DT_F16 ? TOL_HEAD_F16
                                               : TOL_HEAD_BF16;
        const double tol_g = dt == CUDA_DT_F32   ? TOL_F32_REDUCE
                             : dt == CUDA_DT_F16 ? TOL_HEAD_F16_GRAD
                                                 : TOL_HEAD_BF16_GRAD;
        void *dW = dev_as(w, dt);
        void *scr = nullptr;
        CUDA_CHECK(cudaMalloc(&scr, cuda_head_scratch_bytes(R, C, vchunk, dt)));
        cuda_head_forward(g, dLp, dEn, dLse, dX, dW, dt, dT, dRows, R, temp, BT, C, V, vchunk, scr,
                          0);
        const char *tn = cuda_dtype_name(dt);
        check(nm("head.logp.%s.%dx%dx%d.chunk%d", tn, BT, C, V, vchunk), host(dLp, BT), logp, tol);
        check(nm("head.entropy.%s.%dx%dx%d.chunk%d", tn, BT, C, V, vchunk), host(dEn, BT), ent,
              tol);
        check(nm("head.lse.%s.%dx%dx%d.chunk%d", tn, BT, C, V, vchunk), host(dLse, BT), lse, tol);
        float *dDX = dev(dx0), *dDW = dev(dw0);
        cuda_head_backward(g, dDX, dDW, dGl, dGe, dX, dW, dt, dT, dLse, dEn, dRows, R, temp, BT, C,
                           V, vchunk, scr, 0);
        check(nm("head.backward.dinp.%s.%dx%dx%d", tn, BT, C, V), host(dDX, dx.size()), dx, tol_g);
        check(nm("head.backward.dweight.%s.%dx%dx%d", tn, BT, C, V), host(dDW, dw.size()), dw,
              tol_g);
        if (dt == CUDA_DT_F32) {
            cuda_crossentropy_forward(dCe, dLp, dWts, BT, 0);
            check_scalar(nm("crossentropy.forward.%d", BT), host(dCe, 1)[0], ce, TOL_F32_REDUCE);
            /* The backward alone, from the same weights: double sums in another order. */
            cuda_crossentropy_backward(dDce, 1.5f, dWts, BT, 0);
            check(nm("crossentropy.backward.%d", BT), host(dDce, BT), dce, TOL_DOUBLE_SUM);
        }
        dfree(dW);
        dfree(scr);
        dfree(dDX);
        dfree(dDW);
    }
    for (float *p : {dX, dLp, dEn, dLse, dGl, dGe, dWts, dDce})
        dfree(p);
    dfree(dT);
    dfree(dRows);
    dfree(dCe);
}

/* ---- Router z-loss ---- */

static void test_zloss(int T, int n) {
    std::vector<float> l = randn((size_t)T * n, 2.0f), dl = randn((size_t)T * n, 0.1f);
    const float ref = moe_zloss_forward(l.data(), T, n);
    float *dL = dev(l), *dDL = dev(dl), *dOut = dev_zero<float>(1);
    cuda_zloss_forward(dOut, dL, T, n, 0);
    check_scalar(nm("zloss.forward.%dx%d", T, n), host(dOut, 1)[0], ref, TOL_F32_LONG_SUM);
    moe_zloss_backward(dl.data(), 0.7f, l.data(), T, n);
    cuda_zloss_backward(dDL, 0.7f, dL, T, n, 0);
    check(nm("zloss.backward.%dx%d", T, n), host(dDL, dl.size()), dl, TOL_F32_REDUCE);
    dfree(dL);
    dfree(dDL);
    dfree(dOut);
}

/* ---- AdamW ---- */

/* Three steps of the CPU optimizer and of the device one from the same parameters and
 * gradients; grads_scale multiplies the device's gradients (loss scaling), clip sets the
 * global-norm bound. */
static void test_optim(double clip, double grad_scale, int poison) {
    model_config_t cfg;
    qerr_t err;
    if (model_config_preset("tiny", &cfg, &err) != 0 || model_config_validate(&cfg, &err) != 0) {
        report("optim.setup", 0, 0, 0);
        fprintf(stderr, "%s\n", err.msg);
        return;
    }
    model_t *m = model_new(&cfg, &err);
    optim_config_t oc;
    optim_config_default(&oc);
    oc.lr = 1e-3;
    oc.warmup_steps = 2;
    oc.grad_clip = clip;
    optim_t *o = m ? optim_new(&oc, m, &err) : nullptr;
    cuda_optim_t *go = m ? cuda_optim_new(&oc, m, &err) : nullptr;
    if (!m || !o || !go) {
        report("optim.setup", 0, 0, 0);
        fprintf(stderr, "%s\n", err.msg);
        model_destroy(&m);
        optim_destroy(&o);
        cuda_optim_destroy(&go);
        return;
    }
    const size_t n = model_num_reals(m);
    real *p = model_params(m);
    float *dP = dev(std::vector<float>(p, p + n));
    float *dG = dev_zero<float>(n);
    int all_same_applied = 1;
    for (int step = 0; step < 3; step++) {
        real *g = model_grads(m);
        for (size_t ti = 0; ti < model_tensor_count(m); ti++) {
            const model_tensor_t *t = model_tensor(m, ti);
            for (size_t i = 0; i < t->numel; i++)
                g[t->offset + i] =
                    t->kind == MODEL_PARAM_BUFFER ? 0.0f : 0.01f * rng_stream_normal(&g_parity_rng);
        }
        if (poison && step == 1)
            g[n / 2] = NAN;
        std::vector<float> gs(g, g + n);
        for (float &v : gs)
            v = (float)(v * grad_scale);
        CUDA_CHECK(cudaMemcpy(dG, gs.data(), n * sizeof(float), cudaMemcpyHostToDevice));
        optim_result_t rc, rg;
        optim_step(o, m, 2.0, &rc);
        if (cuda_optim_step(go, dP, dG, grad_scale, 2.0, &rg, 0, &err) < 0) {
            report("optim.step", 0, 0, 0);
            fprintf(stderr, "%s\n", err.msg);
            break;
        }
        all_same_applied &= rc.applied == rg.applied;
        if (poison && step == 1)
            report(nm("optim.grad_norm_nonfinite.step%d", step), 0, 0,
                   !isfinite(rg.grad_norm) && !isfinite(rc.grad_norm));
        else
            check_scalar(nm("optim.grad_norm.clip%g.scale%g.step%d", clip, grad_scale, step),
                         rg.grad_norm, rc.grad_norm, TOL_DOUBLE_SUM);
    }
    report(nm("optim.skip_agrees.clip%g.scale%g.poison%d", clip, grad_scale, poison), 0, 0,
           all_same_applied && cuda_optim_steps(go) == optim_steps(o) &&
               cuda_optim_skipped(go) == optim_skipped(o));
    std::vector<float> hp = host(dP, n), hm = host(cuda_optim_m(go), n),
                       hv = host(cuda_optim_v(go), n);
    std::vector<float> cp(p, p + n), cm(optim_m(o), optim_m(o) + n), cv(optim_v(o), optim_v(o) + n);
    /* Unclipped (and power-of-two loss scale): the same FP32 operations, the same bits. */
    const int exact = !(clip > 0);
    const char *tag = nm("clip%g.scale%g.poison%d", clip, grad_scale, poison);
    char t2[96];
    snprintf(t2, sizeof t2, "%s", tag);
    if (exact) {
        check_exact(nm("optim.params.%s", t2), hp, cp);
        check_exact(nm("optim.m.%s", t2), hm, cm);
        check_exact(nm("optim.v.%s", t2), hv, cv);
    } else {
        check(nm("optim.params.%s", t2), hp, cp, TOL_ADAM_CLIPPED);
        check(nm("optim.m.%s", t2), hm, cm, TOL_ADAM_CLIPPED);
        check(nm("optim.v.%s", t2), hv, cv, TOL_ADAM_CLIPPED);
    }
    dfree(dP);
    dfree(dG);
    cuda_optim_destroy(&go);
    optim_destroy(&o);
    model_destroy(&m);
}

static void test_loss_scaler(void) {
    cuda_loss_scaler_t ls;
    cuda_loss_scaler_init(&ls, 100000.0, 3);
    int ok = ls.scale == 65536.0;
    cuda_loss_scaler_update(&ls, 0);
    ok &= ls.scale == 32768.0 && ls.overflows == 1;
    for (int i = 0; i < 3; i++)
        cuda_loss_scaler_update(&ls, 1);
    ok &= ls.scale == 65536.0 && ls.good_steps == 0;
    report("loss_scaler.halve_and_grow", 0, 0, ok);
}

/* ---- DAPO ---- */

static void test_dapo(int B, int T, dapo_agg_t agg, int with_b, double kl_beta) {
    const size_t n = (size_t)B * T;
    std::vector<float> logp = randn(n, 1.0f), old(n), lb(n), lref(n), adv(n), mask(n);
    for (size_t i = 0; i < n; i++) {
        logp[i] = -fabsf(logp[i]);
        old[i] = logp[i] + 0.4f * rng_stream_normal(&g_parity_rng); /* ratios across every clip */
        lb[i] = old[i] + 0.3f * rng_stream_normal(&g_parity_rng);
        lref[i] = logp[i] + 0.2f * rng_stream_normal(&g_parity_rng);
    }
    for (int b = 0; b < B; b++) {
        const float a = (b % 4 == 3) ? 0.0f : rng_stream_normal(&g_parity_rng);
        const int start = randint(0, T), len = b % 7 == 5 ? 0 : T - start; /* some empty rows */
        for (int t = 0; t < T; t++) {
            adv[(size_t)b * T + t] = a;
            mask[(size_t)b * T + t] = (t >= start && t < start + len) ? 1.0f : 0.0f;
        }
    }
    dapo_loss_config_t cfg;
    dapo_loss_config_default(&cfg);
    cfg.agg = agg;
    cfg.max_new_tokens = T;
    cfg.kl_beta = kl_beta;
    dapo_metrics_t ref;
    dapo_loss_forward(&ref, logp.data(), old.data(), with_b ? lb.data() : nullptr, lref.data(),
                      adv.data(), mask.data(), B, T, &cfg);
    std::vector<float> dref(n);
    dapo_loss_backward(dref.data(), logp.data(), old.data(), with_b ? lb.data() : nullptr,
                       lref.data(), adv.data(), mask.data(), B, T, &cfg, 3.0);
    float *dLp = dev(logp), *dOld = dev(old), *dLb = dev(lb), *dRef = dev(lref), *dA = dev(adv),
          *dM = dev(mask), *dD = dev_zero<float>(n);
    dapo_metrics_t *dMet = dev_zero<dapo_metrics_t>(1);
    qerr_t err;
    const char *tag = nm("agg%d.b%d.kl%g.%dx%d", (int)agg, with_b, kl_beta, B, T);
    char t2[96];
    snprintf(t2, sizeof t2, "%s", tag);
    if (cuda_dapo_loss_forward(dMet, dLp, dOld, with_b ? dLb : nullptr, dRef, dA, dM, B, T, &cfg, 0,
                               &err) != 0 ||
        cuda_dapo_loss_backward(dD, dLp, dOld, with_b ? dLb : nullptr, dRef, dA, dM, B, T, &cfg,
                                3.0, 0, &err) != 0) {
        report(nm("dapo.launch.%s", t2), 0, 0, 0);
        fprintf(stderr, "%s\n", err.msg);
    } else {
        const dapo_metrics_t g = host(dMet, 1)[0];
        check_scalar(nm("dapo.loss.%s", t2), g.loss, ref.loss, TOL_DOUBLE_SUM);
        check_scalar(nm("dapo.pg.%s", t2), g.pg, ref.pg, TOL_DOUBLE_SUM);
        check_scalar(nm("dapo.kl.%s", t2), g.kl, ref.kl, TOL_DOUBLE_SUM);
        check_scalar(nm("dapo.approx_kl.%s", t2), g.approx_kl, ref.approx_kl, TOL_DOUBLE_SUM);
        check_scalar(nm("dapo.ratio_mean.%s", t2), g.ratio_mean, ref.ratio_mean, TOL_DOUBLE_SUM);
        check_scalar(nm("dapo.tis_mean_weight.%s", t2), g.tis_mean_weight, ref.tis_mean_weight,
                     TOL_DOUBLE_SUM);
        check_scalar(nm("dapo.mismatch_kl.%s", t2), g.mismatch_kl, ref.mismatch_kl, TOL_DOUBLE_SUM);
        check_scalar(nm("dapo.is_min.%s", t2), g.is_min, ref.is_min, TOL_DOUBLE_SUM);
        check_scalar(nm("dapo.is_max.%s", t2), g.is_max, ref.is_max, TOL_DOUBLE_SUM);
        report(nm("dapo.counts.%s", t2), 0, 0,
               g.tokens == ref.tokens && g.pg_tokens == ref.pg_tokens && g.seqs == ref.seqs &&
                   g.clipfrac_low == ref.clipfrac_low && g.clipfrac_high == ref.clipfrac_high &&
                   g.clipfrac_dual == ref.clipfrac_dual &&
                   g.tis_clipped_frac == ref.tis_clipped_frac);
        check(nm("dapo.backward.%s", t2), host(dD, n), dref, TOL_DOUBLE_SUM);
    }
    for (float *p : {dLp, dOld, dLb, dRef, dA, dM, dD})
        dfree(p);
    dfree(dMet);
}

int main(void) {
    const int st = parity_start("gpu_parity_ops", 0x50415249ULL /* "PARI" */, 1);
    if (st != 0)
        return st;
    qerr_t err;
    cuda_gemm_t *g = cuda_gemm_new(32u << 20, &err);
    if (!g) {
        fprintf(stderr, "gpu_parity_ops: %s\n", err.msg);
        return 1;
    }

    test_convert();
    test_gemm(g, 5, 7, 3);
    test_gemm(g, 129, 67, 300);
    test_embedding(9, 5, 11);
    test_embedding(1000, 300, 777);
    test_rmsnorm(3, 7);
    test_rmsnorm(1025, 768);
    test_rope(1, 3, 8, 2, 0);
    test_rope(2, 300, 512, 8, 17);
    test_residual_dropout(37);
    test_residual_dropout(1 << 20);
    test_quant(3, 5);
    test_quant(2, 70);
    test_quant(257, 1030);
    test_bitlinear(g, 3, 5, 4);
    test_bitlinear(g, 300, 1024, 257);
    test_head(g, 7, 5, 13, 4, 1.0f);
    test_head(g, 333, 256, 5003, 1024, 0.7f);
    test_zloss(3, 4);
    test_zloss(4097, 64);
    test_optim(0, 1, 0);
    test_optim(0, 1024, 0);
    test_optim(1e-3, 1, 0);
    test_optim(0, 1, 1);
    test_loss_scaler();
    for (int agg = 0; agg < DAPO_AGG_COUNT; agg++)
        test_dapo(6, 9, (dapo_agg_t)agg, 1, 0.0);
    test_dapo(64, 513, DAPO_AGG_TOKEN_MEAN, 1, 0.05);
    test_dapo(64, 513, DAPO_AGG_SEQ_MEAN_TOKEN_MEAN, 0, 0.0);

    cuda_gemm_destroy(&g);
    return parity_finish("gpu_parity_ops");
}
