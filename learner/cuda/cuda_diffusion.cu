/* The bit-level diffusion plan stage on the device (cuda_diffusion.h), mirroring
 * common/diffusion.c function by function: the same buffers (den_t, blact_t), the same order of
 * BitLinears, norms and residuals, the BitLinear and RMSNorm kernels of cuda_ops.h, and device
 * versions of the packed-bit helpers, the counter RNG and the sampler step. */
#include "cuda_diffusion.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "cuda_buf.h"
#include "cuda_ops.h"

/* Largest code the device sampler step holds in shared memory (confidence and flags per bit). */
#define CUDA_DIFFUSION_MAX_BITS 4096

namespace {

constexpr int TPB = 256;

__device__ __forceinline__ float sigm(float x) {
    return 1.0f / (1.0f + expf(-x));
}

__device__ __forceinline__ uint64_t splitmix64(uint64_t x) {
    x += 0x9E3779B97F4A7C15ULL;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ULL;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBULL;
    return x ^ (x >> 31);
}

unsigned blocks_for(size_t n) {
    size_t b = (n + TPB - 1) / TPB;
    if (b < 1)
        b = 1;
    return (unsigned)(b > 65535u * 32u ? 65535u * 32u : b);
}

/* out[t, b] = bit b of z[t] ? 1 : -1 (2z - 1), over BT rows of Lb bits. */
__global__ void k_unpack_pm(float *out, const uint64_t *z, int BT, int Lb, int Lw) {
    const size_t n = (size_t)BT * Lb;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        const size_t t = i / Lb;
        const int b = (int)(i % Lb);
        out[i] = (z[t * Lw + b / 64] >> (b % 64)) & 1 ? 1.0f : -1.0f;
    }
}

/* dst [BT, D] = row (the same sinusoid for every position, as the sampler's tau_k). */
__global__ void k_broadcast(float *dst, const float *row, int BT, int D) {
    const size_t n = (size_t)BT * D;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x)
        dst[i] = row[i % D];
}

__global__ void k_relu2(float *out, const float *inp, size_t n) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        const float v = inp[i] > 0.0f ? inp[i] : 0.0f;
        out[i] = v * v;
    }
}

/* dinp[i] += dout[i] * 2 max(inp, 0) (relu2_backward, ACCUMULATED). */
__global__ void k_relu2_bwd(float *dinp, const float *dout, const float *inp, size_t n) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x)
        dinp[i] += dout[i] * (inp[i] > 0.0f ? 2.0f * inp[i] : 0.0f);
}

__global__ void k_xor(uint64_t *out, const uint64_t *a, const uint64_t *b, size_t n) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x)
        out[i] = a[i] ^ b[i];
}

/* z[t, w] = rng_plan_word(seed, pos[t], w) masked to Lb bits (diffusion_plan_noise). */
__global__ void k_plan_noise(uint64_t *z, const int32_t *pos, uint64_t seed, int BT, int Lb,
                             int Lw) {
    const size_t n = (size_t)BT * Lw;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        const size_t t = i / Lw;
        const int w = (int)(i % Lw);
        uint64_t h = splitmix64(0 ^ RNG_TAG_PLAN);
        h = splitmix64(h ^ seed);
        h = splitmix64(h ^ (uint64_t)pos[t]);
        h = splitmix64(h ^ (uint64_t)w);
        const int rem = Lb - 64 * w;
        z[i] = h & (rem >= 64 ? ~0ULL : (1ULL << rem) - 1);
    }
}

/* Training flip mask: bit b of position t is set when the uniform of stream value base[t] + b,
 * (hash(key, counter) >> 11) / 2^53 as rng_stream_uniform_f64, is < p[t]. One thread per bit;
 * each warp writes its 32 bits as one half word (Lb is a multiple of 32); the caller zeroes m
 * first, so the upper half of a last word past Lb stays 0. */
__global__ void k_noise_bits(uint64_t *m, const double *p, const uint64_t *base, uint64_t key,
                             int BT, int Lb, int Lw) {
    const size_t n = (size_t)BT * Lb;
    const size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
    if (i >= n)
        return; /* n is a multiple of 32, so whole warps leave together */
    const size_t t = i / Lb;
    const int b = (int)(i % Lb);
    const uint64_t h = splitmix64(splitmix64(0 ^ key) ^ (base[t] + (uint64_t)b));
    const double u = (double)(h >> 11) / 9007199254740992.0;
    const unsigned bits = __ballot_sync(0xffffffffu, u < p[t]);
    if ((threadIdx.x & 31) == 0) /* little-endian: half b/32 of the row's Lw words */
        ((uint32_t *)m)[t * 2 * (size_t)Lw + (size_t)(b / 32)] = bits;
}

/* code[t] = [R head[targets[t]] > 0] bit by bit where mask[t] != 0, else 0 (diffusion_code:
 * each dot product in index order, unfused multiply and add as the CPU). Written by half words
 * as k_noise_bits (code zeroed by the caller). */
__global__ void k_code(uint64_t *code, const float *R, const float *head, const int32_t *targets,
                       const float *mask, int BT, int Lb, int Lw, int C) {
    const size_t n = (size_t)BT * Lb;
    const size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
    if (i >= n)
        return; /* n is a multiple of 32, so whole warps leave together */
    const size_t t = i / Lb;
    const int b = (int)(i % Lb);
    bool on = false;
    if (mask[t] != 0.0f) {
        const float *r = R + (size_t)b * C, *w = head + (size_t)targets[t] * C;
        float s = 0.0f;
        for (int c = 0; c < C; c++)
            s = __fadd_rn(s, __fmul_rn(r[c], w[c]));
        on = s > 0.0f;
    }
    const unsigned bits = __ballot_sync(0xffffffffu, on);
    if ((threadIdx.x & 31) == 0)
        ((uint32_t *)code)[t * 2 * (size_t)Lw + (size_t)(b / 32)] = bits;
}

/* One sampler step per position (one block each), diffusion_plan_step: pi = sigmoid(logits),
 * e = [pi > 1/2], x0 = z XOR e, n = round(ratio * popcount(e)) (ratio = p_{k-1} / p_k in
 * double), z_prev = x0 XOR (the n set bits of e with the lowest |2 pi - 1|, ties to the lowest
 * bit). A bit's rank among the set bits of e decides it, so no sequential scan is needed. */
__global__ void k_plan_step(uint64_t *z_prev, const uint64_t *z, const float *logits, double ratio,
                            int Lb, int Lw) {
    __shared__ float conf[CUDA_DIFFUSION_MAX_BITS];
    __shared__ unsigned char flag[CUDA_DIFFUSION_MAX_BITS]; /* in e */
    __shared__ unsigned char sel[CUDA_DIFFUSION_MAX_BITS];  /* in e and re-noised */
    __shared__ int pc;
    const int t = blockIdx.x;
    const float *l = logits + (size_t)t * Lb;
    if (threadIdx.x == 0)
        pc = 0;
    __syncthreads();
    int mine = 0;
    for (int b = threadIdx.x; b < Lb; b += blockDim.x) {
        const float pi = sigm(l[b]);
        conf[b] = fabsf(2.0f * pi - 1.0f);
        flag[b] = pi > 0.5f;
        mine += flag[b];
    }
    atomicAdd(&pc, mine);
    __syncthreads();
    const int n = (int)round(ratio * (double)pc);
    for (int b = threadIdx.x; b < Lb; b += blockDim.x) {
        int rank = 0;
        if (flag[b])
            for (int b2 = 0; b2 < Lb; b2++)
                rank += flag[b2] && (conf[b2] < conf[b] || (conf[b2] == conf[b] && b2 < b));
        sel[b] = flag[b] && rank < n;
    }
    __syncthreads();
    for (int w = threadIdx.x; w < Lw; w += blockDim.x) {
        uint64_t e = 0, renoise = 0;
        for (int i = 0; i < 64 && 64 * w + i < Lb; i++) {
            e |= (uint64_t)flag[64 * w + i] << i;
            renoise |= (uint64_t)sel[64 * w + i] << i;
        }
        z_prev[(size_t)t * Lw + w] = z[(size_t)t * Lw + w] ^ e ^ renoise;
    }
}

/* mism += positions where a[t] != b[t] (Lw words each); one thread per position. */
__global__ void k_count_diff(unsigned long long *mism, const uint64_t *a, const uint64_t *b, int BT,
                             int Lw) {
    const int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= BT)
        return;
    int d = 0;
    for (int w = 0; w < Lw; w++)
        d |= a[(size_t)t * Lw + w] != b[(size_t)t * Lw + w];
    if (d)
        atomicAdd(mism, 1ULL);
}

/* dl[t, b] = 2 dcin (1 - 2 z1) pi (1 - pi): the soft-bit STE of the write-back. */
__global__ void k_soft_bits_bwd(float *dl, const float *dcin, const float *logits,
                                const uint64_t *z1, int BT, int Lb, int Lw) {
    const size_t n = (size_t)BT * Lb;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        const size_t t = i / Lb;
        const int b = (int)(i % Lb);
        const float pi = sigm(logits[i]);
        const float z = (float)((z1[t * Lw + b / 64] >> (b % 64)) & 1);
        dl[i] = 2.0f * dcin[i] * (1.0f - 2.0f * z) * pi * (1.0f - pi);
    }
}

/* v[t] = mask[t] * (sum_b BCE(l_tb, m_tb)) / Lb, one warp per position. */
__global__ void k_bce_rows(float *v, const float *logits, const uint64_t *m, const float *mask,
                           int BT, int Lb, int Lw) {
    const int t = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (t >= BT)
        return;
    float s = 0.0f;
    if (mask[t] != 0.0f)
        for (int b = lane; b < Lb; b += 32) {
            const float l = logits[(size_t)t * Lb + b];
            const float y = (float)((m[(size_t)t * Lw + b / 64] >> (b % 64)) & 1);
            s += (l > 0.0f ? l : 0.0f) - y * l + logf(1.0f + expf(-fabsf(l)));
        }
    for (int o = 16; o > 0; o >>= 1)
        s += __shfl_xor_sync(0xffffffffu, s, o);
    if (lane == 0)
        v[t] = mask[t] != 0.0f ? mask[t] * s / (float)Lb : 0.0f;
}

/* loss[0] = sum v / sum mask (0 when sum mask is 0), loss[1] = sum mask: one block, fixed order. */
__global__ void k_loss_finish(float *loss, const float *v, const float *mask, int BT) {
    __shared__ float sa[TPB], sw[TPB];
    float a = 0.0f, w = 0.0f;
    for (int t = threadIdx.x; t < BT; t += blockDim.x) {
        a += v[t];
        w += mask[t];
    }
    sa[threadIdx.x] = a;
    sw[threadIdx.x] = w;
    __syncthreads();
    for (int o = blockDim.x / 2; o > 0; o >>= 1) {
        if ((int)threadIdx.x < o) {
            sa[threadIdx.x] += sa[threadIdx.x + o];
            sw[threadIdx.x] += sw[threadIdx.x + o];
        }
        __syncthreads();
    }
    if (threadIdx.x == 0) {
        loss[0] = sw[0] > 0.0f ? sa[0] / sw[0] : 0.0f;
        loss[1] = sw[0];
    }
}

/* dl[t, b] = dloss mask[t] / wsum / Lb (sigmoid(l) - m_tb), wsum = lw[1] (0 when wsum is 0). */
__global__ void k_bce_bwd(float *dl, const float *logits, const uint64_t *m, const float *mask,
                          const float *lw, float dloss, int BT, int Lb, int Lw) {
    const size_t n = (size_t)BT * Lb;
    const float wsum = lw[1];
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        const size_t t = i / Lb;
        const int b = (int)(i % Lb);
        const float y = (float)((m[t * Lw + b / 64] >> (b % 64)) & 1);
        dl[i] = wsum != 0.0f ? dloss * mask[t] / wsum / (float)Lb * (sigm(logits[i]) - y) : 0.0f;
    }
}

/* ---- host-side structure ---- */

/* Saved state of one normed BitLinear over rows of IC inputs (device). */
struct blact_t {
    float *n;    /* [rows, IC] RMSNorm output */
    float *rstd; /* [rows] */
    float *xq;   /* [rows, IC] dequantised int8 activations */
};

/* One denoiser evaluation (diffusion.c's den_t). */
struct den_t {
    float *zin, *sinus;
    blact_t bz, bc, bt;
    float *h, *a, *rstd_a;
    blact_t bup;
    float *up, *r;
    blact_t bdown, bout;
    float *logits;
};

blact_t blk(const blact_t &a, int b, int BT, int IC) {
    return blact_t{a.n + (size_t)b * BT * IC, a.rstd + (size_t)b * BT, a.xq + (size_t)b * BT * IC};
}

int imax(int a, int b) {
    return a > b ? a : b;
}

} /* namespace */

struct cuda_diffusion {
    diffusion_dims_t d;
    int max_BT, BT, loss_BT;
    cuda_dtype_t dt;
    size_t bytes;
    den_t den_plan, den_loss;
    void *wc_buf;  /* ternary codes (dt), diffusion_params_map layout */
    float *wq_buf; /* dequantised weights, same layout */
    diffusion_params_t wq;
    size_t wofs[DIFFUSION_NUM_TENSORS]; /* element offsets of the tensors in the layout */
    float *ws_buf; /* scales: in_z, in_c, time [W] each, up [NB, F], down [NB, W], out [Lb],
                      dec [C] */
    float *ws_in_z, *ws_in_c, *ws_time, *ws_up, *ws_down, *ws_out, *ws_dec;
    uint64_t wver, qver;
    float *hc, *hc2; /* [BT, W] BL_c(u) of the plan and loss paths */
    blact_t bdec;
    float *cin;                  /* [BT, Lb] */
    uint64_t *z1, *z0;           /* [BT, Lw] the plan */
    uint64_t *zk, *zn;           /* [BT, Lw] sampler state */
    uint64_t *rec_z0;            /* [BT, Lw] replayed z0 */
    uint64_t *m, *zl;            /* [BT, Lw] loss-path mask, noised code */
    float *mask;                 /* [BT] */
    float *sin_tab;              /* [K + 1, D] sinusoid of k / K */
    double *ratio;               /* host [K + 1]: p_{k-1} / p_k */
    float *dl, *sx;              /* [BT, Lb], [BT] */
    void *xcode;                 /* [BT, max width] dt */
    float *dh, *dt_, *dt2, *dt3; /* [BT, max width] */
    float *v;                    /* [BT] per-position loss terms */
    float *lw;                   /* [2] loss, mask sum */
    unsigned long long *mism;
    /* noise staging (device and host) */
    double *p_dev;
    uint64_t *base_dev;
    double *p_host;
    uint64_t *base_host;
    float *tau_host;
    float *sin_host; /* [BT, D] */
};

namespace {

size_t words(int Lb) {
    return (size_t)((Lb + 63) / 64);
}

/* out [BT, OC] = bitlinear(RMSNorm_g(x), codes, scales), saving the input state in a. */
void bl_forward(cuda_diffusion_t *A, cuda_gemm_t *g, float *out, const blact_t &a,
                const void *wcode, const float *sw, const float *x, const float *gain, int BT,
                int IC, int OC, cudaStream_t s) {
    cuda_rmsnorm_forward(a.n, a.rstd, x, gain, BT, IC, s);
    cuda_bitlinear_forward_codes(g, out, a.xq, A->sx, A->xcode, a.n, wcode, sw, BT, IC, OC, A->dt,
                                 s);
}

/* ACCUMULATES dx [BT, IC] (may be NULL), dw, dg; dn [BT, IC] scratch. */
void bl_backward(cuda_gemm_t *g, float *dx, float *dw, float *dg, float *dn, const float *dout,
                 const blact_t &a, const float *wq, const float *x, const float *gain, int BT,
                 int IC, int OC, cudaStream_t s) {
    CUDA_CHECK(cudaMemsetAsync(dn, 0, (size_t)BT * IC * sizeof(float), s));
    cuda_bitlinear_backward(g, dn, dw, dout, wq, a.xq, BT, IC, OC, s);
    cuda_rmsnorm_backward(dx, dg, dn, x, gain, a.rstd, BT, IC, s);
}

const void *wcode_of(const cuda_diffusion_t *A, int tensor, size_t extra) {
    return (const char *)A->wc_buf + (A->wofs[tensor] + extra) * cuda_dtype_size(A->dt);
}

/* Ternary codes, dequantised weights and scales, unless they belong to the current version. */
void weights_prepare(cuda_diffusion_t *A, const diffusion_params_t *p, cudaStream_t s) {
    if (A->wver != 0 && A->wver == A->qver)
        return;
    const diffusion_dims_t *d = &A->d;
    const int C = d->C, Lb = d->Lb, W = d->W, F = d->F, D = d->D;
    const cuda_dtype_t dt = A->dt;
    const diffusion_params_t *q = &A->wq;
    const size_t es = cuda_dtype_size(dt);
    char *wc = (char *)A->wc_buf;
    cuda_bitlinear_weight_codes(wc + A->wofs[0] * es, dt, q->in_z_w, A->ws_in_z, p->in_z_w, Lb, W,
                                s);
    cuda_bitlinear_weight_codes(wc + A->wofs[2] * es, dt, q->in_c_w, A->ws_in_c, p->in_c_w, C, W,
                                s);
    cuda_bitlinear_weight_codes(wc + A->wofs[4] * es, dt, q->time_w, A->ws_time, p->time_w, D, W,
                                s);
    for (int nb = 0; nb < d->NB; nb++) {
        const size_t o = (size_t)nb * F * W;
        cuda_bitlinear_weight_codes(wc + (A->wofs[7] + o) * es, dt, q->up_w + o,
                                    A->ws_up + (size_t)nb * F, p->up_w + o, W, F, s);
        cuda_bitlinear_weight_codes(wc + (A->wofs[9] + o) * es, dt, q->down_w + o,
                                    A->ws_down + (size_t)nb * W, p->down_w + o, F, W, s);
    }
    cuda_bitlinear_weight_codes(wc + A->wofs[11] * es, dt, q->out_w, A->ws_out, p->out_w, W, Lb, s);
    cuda_bitlinear_weight_codes(wc + A->wofs[13] * es, dt, q->dec_w, A->ws_dec, p->dec_w, Lb, C, s);
    A->qver = A->wver;
}

/* logits = f(z, tau, u) over BT rows (den_forward); e->sinus already holds the time rows and
 * hc = BL_c(u) for this e. */
void den_forward(cuda_diffusion_t *A, cuda_gemm_t *g, den_t *e, const uint64_t *z, const float *hc,
                 const diffusion_params_t *p, int BT, cudaStream_t s) {
    const diffusion_dims_t *d = &A->d;
    const int Lb = d->Lb, W = d->W, F = d->F, D = d->D, Lw = (int)words(Lb);
    const size_t BW = (size_t)BT * W, BF = (size_t)BT * F;
    k_unpack_pm<<<blocks_for((size_t)BT * Lb), TPB, 0, s>>>(e->zin, z, BT, Lb, Lw);
    CUDA_LAUNCH_CHECK();
    float *h = e->h, *tmp = A->dt_;
    bl_forward(A, g, h, e->bz, wcode_of(A, 0, 0), A->ws_in_z, e->zin, p->in_z_norm, BT, Lb, W, s);
    cuda_residual_forward(h, h, hc, BW, s);
    bl_forward(A, g, tmp, e->bt, wcode_of(A, 4, 0), A->ws_time, e->sinus, p->time_norm, BT, D, W,
               s);
    cuda_residual_forward(h, h, tmp, BW, s);
    for (int nb = 0; nb < d->NB; nb++) {
        const float *hb = e->h + nb * BW;
        float *hn = e->h + (nb + 1) * BW, *a = e->a + nb * BW, *up = e->up + nb * BF,
              *r = e->r + nb * BF;
        const blact_t bu = blk(e->bup, nb, BT, W), bd = blk(e->bdown, nb, BT, F);
        cuda_rmsnorm_forward(a, e->rstd_a + (size_t)nb * BT, hb, p->blk_norm + (size_t)nb * W, BT,
                             W, s);
        bl_forward(A, g, up, bu, wcode_of(A, 7, (size_t)nb * F * W), A->ws_up + (size_t)nb * F, a,
                   p->up_norm + (size_t)nb * W, BT, W, F, s);
        k_relu2<<<blocks_for(BF), TPB, 0, s>>>(r, up, BF);
        CUDA_LAUNCH_CHECK();
        bl_forward(A, g, tmp, bd, wcode_of(A, 9, (size_t)nb * W * F), A->ws_down + (size_t)nb * W,
                   r, p->down_norm + (size_t)nb * F, BT, F, W, s);
        cuda_residual_forward(hn, hb, tmp, BW, s);
    }
    bl_forward(A, g, e->logits, e->bout, wcode_of(A, 11, 0), A->ws_out, e->h + (size_t)d->NB * BW,
               p->out_norm, BT, W, Lb, s);
}

/* Backward of den_forward from dlogits [BT, Lb] (den_backward); ACCUMULATES du and *dp. */
void den_backward(cuda_diffusion_t *A, cuda_gemm_t *g, const den_t *e, diffusion_params_t *dp,
                  float *du, const float *dlogits, const float *u, const diffusion_params_t *p,
                  int BT, cudaStream_t s) {
    const diffusion_dims_t *d = &A->d;
    const int C = d->C, Lb = d->Lb, W = d->W, F = d->F, D = d->D;
    const size_t BW = (size_t)BT * W, BF = (size_t)BT * F;
    const diffusion_params_t *q = &A->wq;
    float *dh = A->dh, *dt = A->dt_, *dn = A->dt2;
    CUDA_CHECK(cudaMemsetAsync(dh, 0, BW * sizeof(float), s));
    bl_backward(g, dh, dp->out_w, dp->out_norm, dn, dlogits, e->bout, q->out_w,
                e->h + (size_t)d->NB * BW, p->out_norm, BT, W, Lb, s);
    for (int nb = d->NB - 1; nb >= 0; nb--) {
        const float *hb = e->h + nb * BW, *a = e->a + nb * BW, *up = e->up + nb * BF,
                    *r = e->r + nb * BF;
        const blact_t bu = blk(e->bup, nb, BT, W), bd = blk(e->bdown, nb, BT, F);
        CUDA_CHECK(cudaMemsetAsync(dt, 0, BF * sizeof(float), s));
        bl_backward(g, dt, dp->down_w + (size_t)nb * W * F, dp->down_norm + (size_t)nb * F, dn, dh,
                    bd, q->down_w + (size_t)nb * W * F, r, p->down_norm + (size_t)nb * F, BT, F, W,
                    s);
        CUDA_CHECK(cudaMemsetAsync(dn, 0, BF * sizeof(float), s));
        k_relu2_bwd<<<blocks_for(BF), TPB, 0, s>>>(dn, dt, up, BF);
        CUDA_LAUNCH_CHECK();
        CUDA_CHECK(cudaMemsetAsync(dt, 0, BW * sizeof(float), s));
        bl_backward(g, dt, dp->up_w + (size_t)nb * F * W, dp->up_norm + (size_t)nb * W, A->dt3, dn,
                    bu, q->up_w + (size_t)nb * F * W, a, p->up_norm + (size_t)nb * W, BT, W, F, s);
        cuda_rmsnorm_backward(dh, dp->blk_norm + (size_t)nb * W, dt, hb,
                              p->blk_norm + (size_t)nb * W, e->rstd_a + (size_t)nb * BT, BT, W, s);
    }
    bl_backward(g, NULL, dp->in_z_w, dp->in_z_norm, dn, dh, e->bz, q->in_z_w, e->zin, p->in_z_norm,
                BT, Lb, W, s);
    bl_backward(g, du, dp->in_c_w, dp->in_c_norm, dn, dh, e->bc, q->in_c_w, u, p->in_c_norm, BT, C,
                W, s);
    bl_backward(g, NULL, dp->time_w, dp->time_norm, dn, dh, e->bt, q->time_w, e->sinus,
                p->time_norm, BT, D, W, s);
}

} /* namespace */

extern "C" cuda_diffusion_t *cuda_diffusion_new(const diffusion_dims_t *d, int max_BT,
                                                cuda_dtype_t dt, qerr_t *err) {
    const int widest = imax(imax(imax(d->C, d->Lb), imax(d->W, d->F)), d->D);
    if (!(d->C >= 1 && d->Lb >= 32 && d->Lb % 32 == 0 && d->Lb <= CUDA_DIFFUSION_MAX_BITS &&
          d->W >= 1 && d->F >= 1 && d->D >= 2 && d->D % 2 == 0 && d->K >= 1 && d->NB >= 1 &&
          max_BT >= 1 && (double)widest * 128.0 < 16777216.0 && (unsigned)dt < CUDA_DT_COUNT)) {
        qerr_set(err, QERR_RANGE,
                 "cuda_diffusion: sizes (width %d, bits %d of at most %d in multiples of 32, "
                 "residual %d, ffn %d, time %d, steps %d, blocks %d, %d positions, dtype %d) out "
                 "of range",
                 d->C, d->Lb, CUDA_DIFFUSION_MAX_BITS, d->W, d->F, d->D, d->K, d->NB, max_BT,
                 (int)dt);
        return NULL;
    }
    cuda_diffusion_t *A = (cuda_diffusion_t *)calloc(1, sizeof *A);
    if (!A) {
        qerr_set(err, QERR_NOMEM, "cuda_diffusion: out of host memory");
        return NULL;
    }
    A->d = *d;
    A->max_BT = max_BT;
    A->dt = dt;
    int ok = 1;
    qerr_t e2;
    auto dev = [&](size_t bytes) -> void * {
        if (!ok)
            return NULL;
        void *q = cuda_buf_alloc(bytes ? bytes : 1, &e2);
        if (!q)
            ok = 0;
        else
            A->bytes += bytes;
        return q;
    };
    const size_t BT = (size_t)max_BT, Lb = (size_t)d->Lb, W = (size_t)d->W, F = (size_t)d->F,
                 D = (size_t)d->D, C = (size_t)d->C, NB = (size_t)d->NB, Lw = words(d->Lb),
                 mw = (size_t)widest;
    auto bl = [&](blact_t &a, size_t rows, size_t IC) {
        a.n = (float *)dev(rows * IC * 4);
        a.rstd = (float *)dev(rows * 4);
        a.xq = (float *)dev(rows * IC * 4);
    };
    auto den = [&](den_t &e) {
        e.zin = (float *)dev(BT * Lb * 4);
        e.sinus = (float *)dev(BT * D * 4);
        bl(e.bz, BT, Lb);
        bl(e.bc, BT, C);
        bl(e.bt, BT, D);
        e.h = (float *)dev((NB + 1) * BT * W * 4);
        e.a = (float *)dev(NB * BT * W * 4);
        e.rstd_a = (float *)dev(NB * BT * 4);
        bl(e.bup, NB * BT, W);
        e.up = (float *)dev(NB * BT * F * 4);
        e.r = (float *)dev(NB * BT * F * 4);
        bl(e.bdown, NB * BT, F);
        bl(e.bout, BT, W);
        e.logits = (float *)dev(BT * Lb * 4);
    };
    den(A->den_plan);
    den(A->den_loss);
    size_t sizes[DIFFUSION_NUM_TENSORS];
    const size_t np = diffusion_params_sizes(d, sizes);
    for (size_t i = 0, o = 0; i < DIFFUSION_NUM_TENSORS; o += sizes[i], i++)
        A->wofs[i] = o;
    A->wc_buf = dev(np * cuda_dtype_size(dt));
    A->wq_buf = (float *)dev(np * 4);
    A->ws_buf = (float *)dev((3 * W + NB * F + NB * W + Lb + C) * 4);
    A->hc = (float *)dev(BT * W * 4);
    A->hc2 = (float *)dev(BT * W * 4);
    bl(A->bdec, BT, Lb);
    A->cin = (float *)dev(BT * Lb * 4);
    A->z1 = (uint64_t *)dev(BT * Lw * 8);
    A->z0 = (uint64_t *)dev(BT * Lw * 8);
    A->zk = (uint64_t *)dev(BT * Lw * 8);
    A->zn = (uint64_t *)dev(BT * Lw * 8);
    A->rec_z0 = (uint64_t *)dev(BT * Lw * 8);
    A->m = (uint64_t *)dev(BT * Lw * 8);
    A->zl = (uint64_t *)dev(BT * Lw * 8);
    A->mask = (float *)dev(BT * 4);
    A->sin_tab = (float *)dev(((size_t)d->K + 1) * D * 4);
    A->dl = (float *)dev(BT * Lb * 4);
    A->sx = (float *)dev(BT * 4);
    A->xcode = dev(BT * mw * cuda_dtype_size(dt));
    A->dh = (float *)dev(BT * mw * 4);
    A->dt_ = (float *)dev(BT * mw * 4);
    A->dt2 = (float *)dev(BT * mw * 4);
    A->dt3 = (float *)dev(BT * mw * 4);
    A->v = (float *)dev(BT * 4);
    A->lw = (float *)dev(2 * 4);
    A->mism = (unsigned long long *)dev(8);
    A->p_dev = (double *)dev(BT * 8);
    A->base_dev = (uint64_t *)dev(BT * 8);
    A->ratio = (double *)calloc((size_t)d->K + 1, sizeof(double));
    A->p_host = (double *)calloc(BT, sizeof(double));
    A->base_host = (uint64_t *)calloc(BT, sizeof(uint64_t));
    A->tau_host = (float *)calloc(BT, sizeof(float));
    A->sin_host = (float *)calloc(BT * D, sizeof(float));
    if (ok && A->ratio && A->p_host && A->base_host && A->tau_host && A->sin_host) {
        diffusion_params_map(&A->wq, A->wq_buf, d);
        A->ws_in_z = A->ws_buf;
        A->ws_in_c = A->ws_in_z + W;
        A->ws_time = A->ws_in_c + W;
        A->ws_up = A->ws_time + W;
        A->ws_down = A->ws_up + NB * F;
        A->ws_out = A->ws_down + NB * W;
        A->ws_dec = A->ws_out + Lb;
        /* The sampler's sinusoids and n_k ratios from the CPU's own functions, as the CPU
         * evaluates them: tau_k = (real)k / (real)K. */
        float *tab = (float *)calloc(((size_t)d->K + 1) * D, sizeof(float));
        if (!tab)
            ok = 0;
        for (int k = 1; ok && k <= d->K; k++) {
            diffusion_sinusoid(tab + (size_t)k * D, (real)k / (real)d->K, d->D);
            A->ratio[k] =
                diffusion_flip_prob((double)(k - 1) / d->K) / diffusion_flip_prob((double)k / d->K);
        }
        if (ok && (cudaMemcpy(A->sin_tab, tab, ((size_t)d->K + 1) * D * 4,
                              cudaMemcpyHostToDevice) != cudaSuccess))
            ok = 0;
        free(tab);
    } else {
        ok = 0;
    }
    if (!ok) {
        cuda_diffusion_destroy(&A);
        qerr_set(err, QERR_NOMEM, "cuda_diffusion: out of memory for %d positions", max_BT);
        return NULL;
    }
    return A;
}

extern "C" void cuda_diffusion_destroy(cuda_diffusion_t **pa) {
    cuda_diffusion_t *A = pa ? *pa : NULL;
    if (!A)
        return;
    auto fb = [](blact_t &a) {
        cuda_buf_free((void **)&a.n);
        cuda_buf_free((void **)&a.rstd);
        cuda_buf_free((void **)&a.xq);
    };
    auto fd = [&](den_t &e) {
        cuda_buf_free((void **)&e.zin);
        cuda_buf_free((void **)&e.sinus);
        fb(e.bz);
        fb(e.bc);
        fb(e.bt);
        cuda_buf_free((void **)&e.h);
        cuda_buf_free((void **)&e.a);
        cuda_buf_free((void **)&e.rstd_a);
        fb(e.bup);
        cuda_buf_free((void **)&e.up);
        cuda_buf_free((void **)&e.r);
        fb(e.bdown);
        fb(e.bout);
        cuda_buf_free((void **)&e.logits);
    };
    fd(A->den_plan);
    fd(A->den_loss);
    fb(A->bdec);
    void **bufs[] = {&A->wc_buf,        (void **)&A->wq_buf, (void **)&A->ws_buf,  (void **)&A->hc,
                     (void **)&A->hc2,  (void **)&A->cin,    (void **)&A->z1,      (void **)&A->z0,
                     (void **)&A->zk,   (void **)&A->zn,     (void **)&A->rec_z0,  (void **)&A->m,
                     (void **)&A->zl,   (void **)&A->mask,   (void **)&A->sin_tab, (void **)&A->dl,
                     (void **)&A->sx,   &A->xcode,           (void **)&A->dh,      (void **)&A->dt_,
                     (void **)&A->dt2,  (void **)&A->dt3,    (void **)&A->v,       (void **)&A->lw,
                     (void **)&A->mism, (void **)&A->p_dev,  (void **)&A->base_dev};
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++)
        cuda_buf_free(bufs[i]);
    free(A->ratio);
    free(A->p_host);
    free(A->base_host);
    free(A->tau_host);
    free(A->sin_host);
    free(A);
    *pa = NULL;
}

extern "C" size_t cuda_diffusion_bytes(const cuda_diffusion_t *a) {
    return a->bytes;
}

extern "C" void cuda_diffusion_weights_version(cuda_diffusion_t *a, uint64_t version) {
    a->wver = version;
}

extern "C" void cuda_diffusion_code(uint64_t *code, const float *R, const float *head,
                                    const int32_t *targets, const float *mask, int BT, int Lb,
                                    int C, cudaStream_t s) {
    Q_ASSERT(BT >= 0 && Lb % 32 == 0 && C >= 1);
    if (BT == 0)
        return;
    const int Lw = (int)words(Lb);
    Q_ASSERT((size_t)BT * Lb <= (size_t)65535 * 32 * TPB);
    CUDA_CHECK(cudaMemsetAsync(code, 0, (size_t)BT * Lw * 8, s));
    k_code<<<blocks_for((size_t)BT * Lb), TPB, 0, s>>>(code, R, head, targets, mask, BT, Lb, Lw, C);
    CUDA_LAUNCH_CHECK();
}

extern "C" int cuda_diffusion_noise_draw(cuda_diffusion_t *a, float *tau, uint64_t *m,
                                         rng_stream_t *rng, int BT, cudaStream_t s, qerr_t *err) {
    if (BT < 0 || BT > a->max_BT)
        return qerr_set(err, QERR_RANGE, "cuda_diffusion_noise_draw: %d positions outside [0, %d]",
                        BT, a->max_BT);
    const int Lb = a->d.Lb;
    if (BT == 0)
        return 0;
    /* Host: tau and p(tau) exactly as diffusion_noise_draw; the Lb bit draws of each position
     * are stream values base .. base + Lb - 1, evaluated on the device. */
    for (int t = 0; t < BT; t++) {
        const double ta = 1.0 - rng_stream_uniform_f64(rng);
        a->tau_host[t] = (float)ta;
        a->p_host[t] = diffusion_flip_prob(ta);
        a->base_host[t] = rng->counter;
        rng->counter += (uint64_t)Lb;
    }
    if (cuda_buf_upload(tau, a->tau_host, (size_t)BT * 4, s, err) ||
        cuda_buf_upload(a->p_dev, a->p_host, (size_t)BT * 8, s, err) ||
        cuda_buf_upload(a->base_dev, a->base_host, (size_t)BT * 8, s, err))
        return -1;
    const int Lw = (int)words(Lb);
    Q_ASSERT((size_t)BT * Lb <= (size_t)65535 * 32 * TPB);
    CUDA_TRY(err, cudaMemsetAsync(m, 0, (size_t)BT * Lw * 8, s));
    k_noise_bits<<<blocks_for((size_t)BT * Lb), TPB, 0, s>>>(m, a->p_dev, a->base_dev, rng->key, BT,
                                                             Lb, Lw);
    CUDA_LAUNCH_CHECK();
    /* The staging arrays are reused by the next call: the copies must have left them. */
    CUDA_TRY(err, cudaStreamSynchronize(s));
    return 0;
}

extern "C" int cuda_diffusion_forward(cuda_diffusion_t *A, cuda_gemm_t *g, float *out,
                                      diffusion_aux_t *aux, const float *u, const int32_t *pos,
                                      const diffusion_params_t *p, const diffusion_plan_t *replay,
                                      uint64_t diffusion_seed, int BT, cudaStream_t s,
                                      qerr_t *err) {
    const diffusion_dims_t *d = &A->d;
    aux->positions = 0;
    aux->mismatches = 0;
    if (BT < 0 || BT > A->max_BT)
        return qerr_set(err, QERR_RANGE, "cuda_diffusion_forward: %d positions outside [0, %d]", BT,
                        A->max_BT);
    if (replay && diffusion_plan_validate(replay, d->Lb, BT, err))
        return -1;
    A->BT = BT;
    aux->positions = BT;
    if (BT == 0)
        return 0;
    const int Lb = d->Lb, K = d->K, D = d->D, Lw = (int)words(Lb);
    const size_t nw = (size_t)BT * Lw;
    den_t *e = &A->den_plan;
    weights_prepare(A, p, s);
    /* BL_c(u), once for the K evaluations. */
    bl_forward(A, g, A->hc, e->bc, wcode_of(A, 2, 0), A->ws_in_c, u, p->in_c_norm, BT, d->C, d->W,
               s);
    if (!replay) {
        k_plan_noise<<<blocks_for(nw), TPB, 0, s>>>(A->zk, pos, diffusion_seed, BT, Lb, Lw);
        CUDA_LAUNCH_CHECK();
        for (int k = K; k >= 2; k--) {
            k_broadcast<<<blocks_for((size_t)BT * D), TPB, 0, s>>>(
                e->sinus, A->sin_tab + (size_t)k * D, BT, D);
            CUDA_LAUNCH_CHECK();
            den_forward(A, g, e, A->zk, A->hc, p, BT, s);
            k_plan_step<<<BT, TPB, 0, s>>>(A->zn, A->zk, e->logits, A->ratio[k], Lb, Lw);
            CUDA_LAUNCH_CHECK();
            uint64_t *sw = A->zk;
            A->zk = A->zn;
            A->zn = sw;
        }
        CUDA_CHECK(cudaMemcpyAsync(A->z1, A->zk, nw * 8, cudaMemcpyDeviceToDevice, s));
    } else {
        if (cuda_buf_upload(A->z1, replay->z1, nw * 8, s, err) ||
            cuda_buf_upload(A->rec_z0, replay->z0, nw * 8, s, err))
            return -1;
    }
    k_broadcast<<<blocks_for((size_t)BT * D), TPB, 0, s>>>(e->sinus, A->sin_tab + (size_t)1 * D, BT,
                                                           D);
    CUDA_LAUNCH_CHECK();
    den_forward(A, g, e, A->z1, A->hc, p, BT, s);
    k_plan_step<<<BT, TPB, 0, s>>>(replay ? A->zn : A->z0, A->z1, e->logits, A->ratio[1], Lb, Lw);
    CUDA_LAUNCH_CHECK();
    if (replay) {
        CUDA_CHECK(cudaMemsetAsync(A->mism, 0, sizeof *A->mism, s));
        k_count_diff<<<(BT + TPB - 1) / TPB, TPB, 0, s>>>(A->mism, A->zn, A->rec_z0, BT, Lw);
        CUDA_LAUNCH_CHECK();
        CUDA_CHECK(cudaMemcpyAsync(A->z0, A->rec_z0, nw * 8, cudaMemcpyDeviceToDevice, s));
    }
    /* Write-back of 2 c_hat - 1 with c_hat = z_0. */
    k_unpack_pm<<<blocks_for((size_t)BT * Lb), TPB, 0, s>>>(A->cin, A->z0, BT, Lb, Lw);
    CUDA_LAUNCH_CHECK();
    bl_forward(A, g, out, A->bdec, wcode_of(A, 13, 0), A->ws_dec, A->cin, p->dec_norm, BT, Lb, d->C,
               s);
    if (replay) {
        unsigned long long mism = 0;
        CUDA_TRY(err, cudaMemcpyAsync(&mism, A->mism, sizeof mism, cudaMemcpyDeviceToHost, s));
        CUDA_TRY(err, cudaStreamSynchronize(s));
        aux->mismatches = (int)mism;
    }
    return 0;
}

extern "C" void cuda_diffusion_backward(cuda_diffusion_t *A, cuda_gemm_t *g, diffusion_params_t *dp,
                                        float *du, const float *dout, const float *u,
                                        const diffusion_params_t *p, cudaStream_t s) {
    const diffusion_dims_t *d = &A->d;
    const int BT = A->BT, Lb = d->Lb, Lw = (int)words(Lb);
    if (BT == 0)
        return;
    float *dcin = A->dt_;
    CUDA_CHECK(cudaMemsetAsync(dcin, 0, (size_t)BT * Lb * 4, s));
    bl_backward(g, dcin, dp->dec_w, dp->dec_norm, A->dt2, dout, A->bdec, A->wq.dec_w, A->cin,
                p->dec_norm, BT, Lb, d->C, s);
    k_soft_bits_bwd<<<blocks_for((size_t)BT * Lb), TPB, 0, s>>>(A->dl, dcin, A->den_plan.logits,
                                                                A->z1, BT, Lb, Lw);
    CUDA_LAUNCH_CHECK();
    den_backward(A, g, &A->den_plan, dp, du, A->dl, u, p, BT, s);
}

extern "C" int cuda_diffusion_loss_forward(cuda_diffusion_t *A, cuda_gemm_t *g, float *loss,
                                           const uint64_t *code, const uint64_t *m,
                                           const float *tau, const float *mask, const float *u,
                                           const diffusion_params_t *p, int BT, cudaStream_t s,
                                           qerr_t *err) {
    const diffusion_dims_t *d = &A->d;
    if (BT < 0 || BT > A->max_BT)
        return qerr_set(err, QERR_RANGE,
                        "cuda_diffusion_loss_forward: %d positions outside [0, %d]", BT, A->max_BT);
    A->loss_BT = BT;
    if (BT == 0) {
        CUDA_TRY(err, cudaMemsetAsync(loss, 0, sizeof(float), s));
        return 0;
    }
    const int Lb = d->Lb, D = d->D, Lw = (int)words(Lb);
    const size_t nw = (size_t)BT * Lw;
    den_t *e = &A->den_loss;
    /* The time sinusoids of each position's tau, by the CPU's function. */
    CUDA_TRY(err, cudaMemcpyAsync(A->tau_host, tau, (size_t)BT * 4, cudaMemcpyDeviceToHost, s));
    CUDA_TRY(err, cudaStreamSynchronize(s));
    for (int t = 0; t < BT; t++) {
        float *row = A->sin_host + (size_t)t * D;
        if (t > 0 && memcmp(&A->tau_host[t], &A->tau_host[t - 1], sizeof(float)) == 0)
            memcpy(row, row - D, (size_t)D * sizeof *row);
        else
            diffusion_sinusoid(row, A->tau_host[t], D);
    }
    if (cuda_buf_upload(e->sinus, A->sin_host, (size_t)BT * D * 4, s, err))
        return -1;
    CUDA_TRY(err, cudaMemcpyAsync(A->m, m, nw * 8, cudaMemcpyDeviceToDevice, s));
    CUDA_TRY(err, cudaMemcpyAsync(A->mask, mask, (size_t)BT * 4, cudaMemcpyDeviceToDevice, s));
    k_xor<<<blocks_for(nw), TPB, 0, s>>>(A->zl, code, m, nw);
    CUDA_LAUNCH_CHECK();
    weights_prepare(A, p, s);
    bl_forward(A, g, A->hc2, e->bc, wcode_of(A, 2, 0), A->ws_in_c, u, p->in_c_norm, BT, d->C, d->W,
               s);
    den_forward(A, g, e, A->zl, A->hc2, p, BT, s);
    k_bce_rows<<<(BT + 7) / 8, 256, 0, s>>>(A->v, e->logits, A->m, A->mask, BT, Lb, Lw);
    CUDA_LAUNCH_CHECK();
    k_loss_finish<<<1, TPB, 0, s>>>(A->lw, A->v, A->mask, BT);
    CUDA_LAUNCH_CHECK();
    CUDA_TRY(err, cudaMemcpyAsync(loss, A->lw, sizeof(float), cudaMemcpyDeviceToDevice, s));
    /* The host sinusoid staging must outlive its upload before the next call reuses it. */
    CUDA_TRY(err, cudaStreamSynchronize(s));
    return 0;
}

extern "C" void cuda_diffusion_loss_backward(cuda_diffusion_t *A, cuda_gemm_t *g,
                                             diffusion_params_t *dp, float *du, float dloss,
                                             const float *u, const diffusion_params_t *p,
                                             cudaStream_t s) {
    const diffusion_dims_t *d = &A->d;
    const int BT = A->loss_BT, Lb = d->Lb, Lw = (int)words(Lb);
    if (BT == 0 || dloss == 0.0f)
        return;
    k_bce_bwd<<<blocks_for((size_t)BT * Lb), TPB, 0, s>>>(A->dl, A->den_loss.logits, A->m, A->mask,
                                                          A->lw, dloss, BT, Lb, Lw);
    CUDA_LAUNCH_CHECK();
    den_backward(A, g, &A->den_loss, dp, du, A->dl, u, p, BT, s);
}

extern "C" int cuda_diffusion_plan_download(const cuda_diffusion_t *a, diffusion_plan_t *plan,
                                            cudaStream_t s, qerr_t *err) {
    if (plan->max_BT < a->BT || plan->Lb != a->d.Lb)
        return qerr_set(err, QERR_RANGE,
                        "cuda_diffusion_plan_download: plan for %d positions of %d bits cannot "
                        "hold %d positions of %d bits",
                        plan->max_BT, plan->Lb, a->BT, a->d.Lb);
    const size_t nw = (size_t)a->BT * words(a->d.Lb);
    plan->BT = a->BT;
    if (nw == 0)
        return 0;
    if (cuda_buf_download(plan->z1, a->z1, nw * 8, s, err) ||
        cuda_buf_download(plan->z0, a->z0, nw * 8, s, err))
        return -1;
    CUDA_TRY(err, cudaStreamSynchronize(s));
    return 0;
}
