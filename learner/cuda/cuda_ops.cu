/* Element-wise and row-wise kernels: see cuda_ops.h. Each kernel names the CPU function it
 * mirrors; the comments say where the arithmetic order matters for bit equality. The CPU core
 * is compiled as ISO C11 (GCC then never contracts a * b + c into an FMA), so wherever these
 * kernels promise the CPU's bits they spell products and sums with __fmul_rn / __fadd_rn,
 * which nvcc never contracts either. */
#include "cuda_ops.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <math.h>

#include "cuda_reduce.cuh"

extern "C" {
#include "attention.h"
#include "layers.h"
}

namespace {

/* ---- FP16 rounding, bit for bit as common/fp16.c ---- */

/* fp16_from_float: round to nearest even, overflow to inf, subnormals, quiet NaN keeping the
 * sign and the top payload bits. */
__device__ inline uint16_t f16_bits(float f) {
    const uint32_t x = __float_as_uint(f);
    const uint32_t sign = (x >> 16) & 0x8000u;
    const uint32_t ax = x & 0x7fffffffu;
    if (ax >= 0x7f800000u) {
        if (ax == 0x7f800000u)
            return (uint16_t)(sign | 0x7c00u);
        return (uint16_t)(sign | 0x7e00u | ((ax >> 13) & 0x3ffu));
    }
    if (ax >= 0x477ff000u)
        return (uint16_t)(sign | 0x7c00u);
    const uint32_t e = ax >> 23;
    if (e < 113) {
        const uint32_t shift = 126u - e;
        if (shift > 24)
            return (uint16_t)sign;
        const uint32_t mant = (ax & 0x7fffffu) | 0x800000u;
        const uint32_t q = mant >> shift;
        const uint32_t rem = mant & ((1u << shift) - 1u);
        const uint32_t half = 1u << (shift - 1);
        return (uint16_t)(sign | (q + (rem > half || (rem == half && (q & 1u)))));
    }
    const uint32_t h = ((e - 112u) << 10) | ((ax & 0x7fffffu) >> 13);
    const uint32_t rem = ax & 0x1fffu;
    return (uint16_t)(sign | (h + (rem > 0x1000u || (rem == 0x1000u && (h & 1u)))));
}

/* fp16_to_float: exact. */
__device__ inline float f16_float(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    const uint32_t e = (h >> 10) & 0x1fu;
    const uint32_t m = h & 0x3ffu;
    if (e == 0) {
        const float v = __fmul_rn((float)m, 0x1p-24f);
        return sign ? -v : v;
    }
    if (e == 31)
        return __uint_as_float(sign | 0x7f800000u | (m << 13));
    return __uint_as_float(sign | ((e + 112u) << 23) | (m << 13));
}

/* Stores FP32 v into element i of an array of type dt. */
__device__ inline void store_dt(void *p, cuda_dtype_t dt, size_t i, float v) {
    if (dt == CUDA_DT_F32)
        ((float *)p)[i] = v;
    else if (dt == CUDA_DT_F16)
        ((__half *)p)[i] = __ushort_as_half(f16_bits(v));
    else
        ((__nv_bfloat16 *)p)[i] = __float2bfloat16_rn(v);
}

__device__ inline float load_dt(const void *p, cuda_dtype_t dt, size_t i) {
    if (dt == CUDA_DT_F32)
        return ((const float *)p)[i];
    if (dt == CUDA_DT_F16)
        return __half2float(((const __half *)p)[i]);
    return __bfloat162float(((const __nv_bfloat16 *)p)[i]);
}

/* ---- quant.c's code rule ---- */

/* round_clip(q, lo, hi): clip, truncate, then round half away from zero by comparing the exact
 * fraction with +-1/2. A NaN passes the clip; x86 converts it to INT32_MIN ("integer
 * indefinite") where CUDA gives 0, so that case is spelled out to keep the CPU's value. */
__device__ inline int32_t round_clip(float q, float lo, float hi) {
    float c = q < lo ? lo : q;
    c = c > hi ? hi : c;
    if (isnan(c))
        return INT32_MIN;
    const int32_t t = __float2int_rz(c);
    const float f = __fsub_rn(c, (float)t);
    return t + (f >= 0.5f) - (f <= -0.5f);
}

/* max|x| over the non-NaN entries as the CPU's absmax: non-negative floats order as their
 * bits, NaNs (above inf's bits) count as 0. Returns the bits' maximum for one element. */
__device__ inline int32_t absbits(float x) {
    const int32_t a = (int32_t)(__float_as_uint(x) & 0x7fffffffu);
    return a > 0x7f800000 ? 0 : a;
}

/* Block-wide absmax of row[0, n). */
__device__ float row_absmax(const float *row, int n) {
    int32_t m = 0;
    for (int i = threadIdx.x; i < n; i += blockDim.x)
        m = max(m, absbits(row[i]));
    m = cuda_block_reduce<cuda_op_max<int32_t>>(m, 0);
    return __int_as_float(m);
}

/* Block-wide sum of |row[i]| in index order (quant.c absmean: the order is part of the
 * format). Tiles of blockDim.x elements are loaded coalesced into shared memory, then thread 0
 * adds them one by one. Returns sum / n to every thread. */
__device__ float row_absmean(const float *row, int n) {
    __shared__ float tile[1024];
    __shared__ float total;
    float s = 0.0f;
    for (int base = 0; base < n; base += blockDim.x) {
        const int i = base + (int)threadIdx.x;
        if (i < n)
            tile[threadIdx.x] = row[i];
        __syncthreads();
        if (threadIdx.x == 0) {
            const int len = min((int)blockDim.x, n - base);
            for (int j = 0; j < len; j++)
                s = __fadd_rn(s, fabsf(tile[j]));
        }
        __syncthreads();
    }
    if (threadIdx.x == 0)
        total = s / (float)n;
    __syncthreads();
    const float r = total;
    __syncthreads();
    return r;
}

/* codes_real: out[i] = mul * round_clip(x[i] / scale, lo, hi), or mul * 0 when scale is not
 * > 0 (true division, never a reciprocal). */
__device__ inline float code_value(float x, float scale, float mul, float lo, float hi) {
    if (!(scale > 0.0f))
        return __fmul_rn(mul, 0.0f);
    return __fmul_rn(mul, (float)round_clip(x / scale, lo, hi));
}

/* ---- Conversions ---- */

__global__ void convert_kernel(void *dst, cuda_dtype_t ddt, const void *src, cuda_dtype_t sdt,
                               size_t n) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x)
        store_dt(dst, ddt, i, load_dt(src, sdt, i));
}

/* ---- Embedding ---- */

__global__ void embedding_forward_kernel(float *out, const int32_t *tokens, const float *wte,
                                         int BT, int C, int V) {
    const size_t n = (size_t)BT * C;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        const size_t t = i / (size_t)C, c = i % (size_t)C;
        const int32_t tok = tokens[t];
        if (tok < 0 || tok >= V)
            cuda_bug("embedding: token id outside [0, V)", tok, V);
        out[i] = wte[(size_t)tok * C + c];
    }
}

/* One thread per channel, rows in increasing order: embedding_backward's order exactly, and no
 * two threads ever touch one element. */
__global__ void embedding_backward_kernel(float *dwte, const float *dout, const int32_t *tokens,
                                          int BT, int C, int V) {
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= C)
        return;
    for (int t = 0; t < BT; t++) {
        const int32_t tok = tokens[t];
        if (tok < 0 || tok >= V)
            cuda_bug("embedding backward: token id outside [0, V)", tok, V);
        float *d = dwte + (size_t)tok * C + c;
        *d = __fadd_rn(*d, dout[(size_t)t * C + c]);
    }
}

/* ---- RMSNorm ---- */

/* One block per row. */
__global__ void rmsnorm_forward_kernel(float *out, float *rstd, const float *inp,
                                       const float *weight, int C) {
    const size_t t = blockIdx.x;
    const float *x = inp + t * C;
    float ss = 0.0f;
    for (int c = threadIdx.x; c < C; c += blockDim.x)
        ss += x[c] * x[c];
    ss = cuda_block_reduce<cuda_op_sum<float>>(ss, 0.0f);
    const float r = 1.0f / sqrtf(__fadd_rn(ss / (float)C, (float)RMSNORM_EPS));
    float *o = out + t * C;
    for (int c = threadIdx.x; c < C; c += blockDim.x)
        o[c] = __fmul_rn(weight[c], __fmul_rn(x[c], r));
    if (threadIdx.x == 0)
        rstd[t] = r;
}

/* dx_j += r (dy_j g_j - x_j k), k = r^2 dot / C, dot = sum dy g x. One block per row. */
__global__ void rmsnorm_backward_dinp_kernel(float *dinp, const float *dout, const float *inp,
                                             const float *weight, const float *rstd, int C) {
    const size_t t = blockIdx.x;
    const float *x = inp + t * C, *dy = dout + t * C;
    float *dx = dinp + t * C;
    const float r = rstd[t];
    float dot = 0.0f;
    for (int c = threadIdx.x; c < C; c += blockDim.x)
        dot += __fmul_rn(__fmul_rn(dy[c], weight[c]), x[c]);
    dot = cuda_block_reduce<cuda_op_sum<float>>(dot, 0.0f);
    const float k = __fmul_rn(__fmul_rn(r, r), dot) / (float)C;
    for (int c = threadIdx.x; c < C; c += blockDim.x)
        dx[c] = __fadd_rn(dx[c],
                          __fmul_rn(r, __fsub_rn(__fmul_rn(dy[c], weight[c]), __fmul_rn(x[c], k))));
}

/* dweight[c] += sum_t dy x r: a 32 x 32 block owns 32 channels; row phase ty sums rows
 * ty, ty + 32, ...; the 32 phases are then added in order. Deterministic, no atomics. */
#define RMS_DW_TILE 32
__global__ void rmsnorm_backward_dweight_kernel(float *dweight, const float *dout, const float *inp,
                                                const float *rstd, int BT, int C) {
    __shared__ float part[RMS_DW_TILE][RMS_DW_TILE + 1];
    const int c = blockIdx.x * RMS_DW_TILE + threadIdx.x;
    float s = 0.0f;
    if (c < C)
        for (int t = threadIdx.y; t < BT; t += RMS_DW_TILE) {
            const size_t i = (size_t)t * C + c;
            s += __fmul_rn(__fmul_rn(dout[i], inp[i]), rstd[t]);
        }
    part[threadIdx.y][threadIdx.x] = s;
    __syncthreads();
    if (threadIdx.y == 0 && c < C) {
        float tot = 0.0f;
        for (int k = 0; k < RMS_DW_TILE; k++)
            tot += part[k][threadIdx.x];
        dweight[c] += tot;
    }
}

/* ---- RoPE ---- */

/* One thread per (row, pair i), all heads of the row: the angle is computed once, in double
 * exactly as rope_angles, then rounded to float as the CPU's cs / sn tables are. */
__global__ void rope_kernel(float *out, const float *inp, int BT, int T, int C, int HS, int pos0,
                            float dir) {
    const int half = HS / 2;
    const size_t n = (size_t)BT * half;
    for (size_t idx = blockIdx.x * (size_t)blockDim.x + threadIdx.x; idx < n;
         idx += (size_t)gridDim.x * blockDim.x) {
        const size_t row = idx / half;
        const int i = (int)(idx % half);
        const int pos = pos0 + (int)(row % (size_t)T);
        const double ang = (double)pos * pow(ROPE_THETA, -2.0 * i / HS);
        const float cs = (float)cos(ang), sn = (float)sin(ang);
        const float sgn = __fmul_rn(dir, sn);
        const float *x = inp + row * C;
        float *o = out + row * C;
        for (int h0 = 0; h0 < C; h0 += HS) {
            const float x0 = x[h0 + 2 * i], x1 = x[h0 + 2 * i + 1];
            o[h0 + 2 * i] = __fsub_rn(__fmul_rn(x0, cs), __fmul_rn(x1, sgn));
            o[h0 + 2 * i + 1] = __fadd_rn(__fmul_rn(x0, sgn), __fmul_rn(x1, cs));
        }
    }
}

/* ---- Residual and dropout ---- */

__global__ void residual_forward_kernel(float *out, const float *a, const float *b, size_t n) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x)
        out[i] = __fadd_rn(a[i], b[i]);
}

__global__ void residual_backward_kernel(float *da, float *db, const float *dout, size_t n) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        const float g = dout[i];
        if (da)
            da[i] = __fadd_rn(da[i], g);
        if (db)
            db[i] = __fadd_rn(db[i], g);
    }
}

__device__ inline uint64_t splitmix64(uint64_t x) {
    x += 0x9E3779B97F4A7C15ULL;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ULL;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBULL;
    return x ^ (x >> 31);
}

/* layers.c dropout_scale: rng_hash({key, counter + i}) = splitmix(splitmix(0 ^ key) ^ (counter
 * + i)); u = top 24 bits / 2^24 in double; 0 when u < p, else 1 / (1 - p) in float. */
__device__ inline float dropout_scale(uint64_t hkey, uint64_t counter, size_t i, float p,
                                      float keep) {
    const uint64_t h = splitmix64(hkey ^ (counter + (uint64_t)i));
    const double u = (double)(h >> 40) / 16777216.0;
    return u < (double)p ? 0.0f : keep;
}

__global__ void dropout_forward_kernel(float *out, const float *inp, float p, float keep,
                                       uint64_t hkey, uint64_t counter, size_t n) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x)
        out[i] = __fmul_rn(inp[i], dropout_scale(hkey, counter, i, p, keep));
}

__global__ void dropout_backward_kernel(float *dinp, const float *dout, float p, float keep,
                                        uint64_t hkey, uint64_t counter, size_t n) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x)
        dinp[i] = __fadd_rn(dinp[i], __fmul_rn(dout[i], dropout_scale(hkey, counter, i, p, keep)));
}

/* ---- Fake quantization ---- */

/* quant.c f16_round (= fp16_round) of each element. */
__global__ void fake_f16_kernel(void *out, cuda_dtype_t odt, const float *w, size_t n) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x)
        store_dt(out, odt, i, f16_float(f16_bits(w[i])));
}

/* One block per row: ternary (s_w = absmean, codes against s_w + eps, value s_w * code), INT8
 * (s = absmax / 127, codes -127..127) or int8 activations (s = absmax / 127, codes -128..127). */
__global__ void fake_row_kernel(quant_type_t type, int act, void *out, cuda_dtype_t odt,
                                const float *w, int cols) {
    const size_t r = blockIdx.x;
    const float *x = w + r * cols;
    float scale, mul, lo, hi;
    if (type == QUANT_TERNARY) {
        const float s = row_absmean(x, cols);
        scale = __fadd_rn(s, (float)QUANT_TERNARY_EPS);
        mul = s;
        lo = -1.0f;
        hi = 1.0f;
    } else {
        const float s = row_absmax(x, cols) / (float)(act ? QUANT_ACT_MAX : QUANT_INT8_MAX);
        scale = mul = s;
        lo = act ? (float)QUANT_ACT_MIN : -(float)QUANT_INT8_MAX;
        hi = act ? (float)QUANT_ACT_MAX : (float)QUANT_INT8_MAX;
    }
    for (int i = threadIdx.x; i < cols; i += blockDim.x)
        store_dt(out, odt, r * cols + i, code_value(x[i], scale, mul, lo, hi));
}

/* INT4: one warp per group of 32 along a row (the last group of a row may be shorter): scale =
 * fp16(max|g| / 7) as a float, codes -7..7 against it, value scale * code. */
__global__ void fake_int4_kernel(void *out, cuda_dtype_t odt, const float *w, int rows, int cols) {
    const int ngroups = (cols + QUANT_INT4_GROUP - 1) / QUANT_INT4_GROUP;
    const size_t nwarps = (size_t)rows * ngroups;
    const int lane = threadIdx.x & 31;
    for (size_t gw = (blockIdx.x * (size_t)blockDim.x + threadIdx.x) >> 5; gw < nwarps;
         gw += ((size_t)gridDim.x * blockDim.x) >> 5) {
        const size_t r = gw / ngroups;
        const int g0 = (int)(gw % ngroups) * QUANT_INT4_GROUP;
        const int len = min(QUANT_INT4_GROUP, cols - g0);
        const size_t i = r * cols + g0 + lane;
        const float x = lane < len ? w[i] : 0.0f;
        const int32_t m = cuda_warp_reduce<cuda_op_max<int32_t>>(lane < len ? absbits(x) : 0);
        const float s = f16_float(f16_bits(__int_as_float(m) / (float)QUANT_INT4_MAX));
        if (lane < len)
            store_dt(out, odt, i, code_value(x, s, s, -(float)QUANT_INT4_MAX, QUANT_INT4_MAX));
    }
}

/* ---- BitLinear ---- */

/* One block per output row: s_w by absmean, codes (mul 1) into wcode, wq = code * s_w. */
__global__ void bitlinear_wcodes_kernel(void *wcode, cuda_dtype_t cdt, float *wq, float *sw,
                                        const float *weight, int C) {
    const size_t o = blockIdx.x;
    const float *w = weight + o * C;
    const float s = row_absmean(w, C);
    const float scale = __fadd_rn(s, (float)QUANT_TERNARY_EPS);
    for (int i = threadIdx.x; i < C; i += blockDim.x) {
        const float code = code_value(w[i], scale, 1.0f, -1.0f, 1.0f);
        store_dt(wcode, cdt, o * C + i, code);
        wq[o * C + i] = __fmul_rn(code, s);
    }
    if (threadIdx.x == 0)
        sw[o] = s;
}

/* One block per token row: s_x = absmax / 127, codes -128..127 into xcode, xq = code * s_x. */
__global__ void bitlinear_xcodes_kernel(void *xcode, cuda_dtype_t cdt, float *xq, float *sx,
                                        const float *inp, int C) {
    const size_t t = blockIdx.x;
    const float *x = inp + t * C;
    const float s = row_absmax(x, C) / (float)QUANT_ACT_MAX;
    for (int i = threadIdx.x; i < C; i += blockDim.x) {
        const float code = code_value(x[i], s, 1.0f, (float)QUANT_ACT_MIN, (float)QUANT_ACT_MAX);
        store_dt(xcode, cdt, t * C + i, code);
        xq[t * C + i] = __fmul_rn(code, s);
    }
    if (threadIdx.x == 0)
        sx[t] = s;
}

/* y[t, o] = y * sw[o] * sx[t], multiplied in that order. */
__global__ void bitlinear_scale_kernel(float *out, const float *sw, const float *sx, int BT,
                                       int OC) {
    const size_t n = (size_t)BT * OC;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x)
        out[i] = __fmul_rn(__fmul_rn(out[i], sw[i % OC]), sx[i / OC]);
}

/* ---- Head ---- */

/* Scratch of the head, carved from one caller buffer in this order, each piece aligned to
 * 256 bytes. */
struct head_scratch {
    void *xg;     /* [R, C] wdt: gathered rows */
    float *dxg;   /* [R, C] their gradient */
    float *L;     /* [R, vchunk] logit tile */
    void *dL;     /* [R, vchunk] wdt: its gradient */
    float *m;     /* [R] running max */
    float *zt;    /* [R] target logit */
    double *s;    /* [R] running sum of exp(z - m) */
    double *a;    /* [R] running sum of exp(z - m) z */
    size_t bytes; /* total */
};

size_t align_up(size_t x) {
    return (x + 255) / 256 * 256;
}

head_scratch head_layout(void *base, int R, int C, int vchunk, cuda_dtype_t wdt) {
    head_scratch h;
    const size_t es = cuda_dtype_size(wdt);
    char *p = (char *)base;
    size_t off = 0;
    const size_t sizes[8] = {(size_t)R * C * es,      (size_t)R * C * 4, (size_t)R * vchunk * 4,
                             (size_t)R * vchunk * es, (size_t)R * 4,     (size_t)R * 4,
                             (size_t)R * 8,           (size_t)R * 8};
    void *ptrs[8];
    for (int i = 0; i < 8; i++) {
        ptrs[i] = p ? p + off : nullptr;
        off += align_up(sizes[i]);
    }
    h.xg = ptrs[0];
    h.dxg = (float *)ptrs[1];
    h.L = (float *)ptrs[2];
    h.dL = ptrs[3];
    h.m = (float *)ptrs[4];
    h.zt = (float *)ptrs[5];
    h.s = (double *)ptrs[6];
    h.a = (double *)ptrs[7];
    h.bytes = off;
    return h;
}

/* One block per active row: xg[r] = inp[rows[r]] as wdt, online-softmax state reset, target
 * checked. */
__global__ void head_gather_kernel(void *xg, cuda_dtype_t wdt, float *m, float *zt, double *s,
                                   double *a, const float *inp, const int32_t *rows,
                                   const int32_t *targets, int BT, int C, int V) {
    const int r = blockIdx.x;
    const int t = rows ? rows[r] : r;
    if (t < 0 || t >= BT)
        cuda_bug("head: active row outside [0, BT)", t, BT);
    const float *x = inp + (size_t)t * C;
    for (int c = threadIdx.x; c < C; c += blockDim.x)
        store_dt(xg, wdt, (size_t)r * C + c, x[c]);
    if (threadIdx.x == 0) {
        if (targets[t] < 0 || targets[t] >= V)
            cuda_bug("head: target outside [0, V)", targets[t], V);
        if (m) {
            m[r] = -INFINITY;
            zt[r] = 0.0f;
            s[r] = 0.0;
            a[r] = 0.0;
        }
    }
}

/* head_forward's chunk step for one row (one block): z = logits / temperature, the chunk max,
 * the rescaled running sums in double, the target's z when it lies in the chunk. */
__global__ void head_stats_kernel(float *m, float *zt, double *s, double *a, const float *L,
                                  const int32_t *rows, const int32_t *targets, float temperature,
                                  int v0, int vc) {
    const int r = blockIdx.x;
    const float *z = L + (size_t)r * vc;
    float cm = -INFINITY;
    for (int j = threadIdx.x; j < vc; j += blockDim.x)
        cm = fmaxf(cm, z[j] / temperature);
    cm = cuda_block_reduce<cuda_op_fmaxf>(cm, -INFINITY);
    const float mo = m[r];
    const float nm = fmaxf(mo, cm);
    double cs = 0.0, ca = 0.0;
    for (int j = threadIdx.x; j < vc; j += blockDim.x) {
        const float zj = z[j] / temperature;
        const double e = (double)expf(zj - nm);
        cs += e;
        ca += e * (double)zj;
    }
    cs = cuda_block_reduce<cuda_op_sum<double>>(cs, 0.0);
    ca = cuda_block_reduce<cuda_op_sum<double>>(ca, 0.0);
    if (threadIdx.x == 0) {
        const double rescale = mo == -INFINITY ? 0.0 : exp((double)(mo - nm));
        s[r] = s[r] * rescale + cs;
        a[r] = a[r] * rescale + ca;
        m[r] = nm;
        const int y = targets[rows ? rows[r] : r];
        if (y >= v0 && y < v0 + vc)
            zt[r] = z[y - v0] / temperature;
    }
}

__global__ void head_finish_kernel(float *logp, float *entropy, float *lse, const float *m,
                                   const float *zt, const double *s, const double *a,
                                   const int32_t *rows, int R) {
    const int r = blockIdx.x * blockDim.x + threadIdx.x;
    if (r >= R)
        return;
    const int t = rows ? rows[r] : r;
    const double l = (double)m[r] + log(s[r]);
    lse[t] = (float)l;
    logp[t] = (float)((double)zt[r] - l);
    if (entropy)
        entropy[t] = (float)(l - a[r] / s[r]);
}

/* head_backward's tile: dz_j = (-gl p - ge p (z_j - E[z])) / temperature, plus gl / temperature
 * at the target, stored as wdt. */
__global__ void head_dlogits_kernel(void *dL, cuda_dtype_t wdt, const float *L, const float *dlogp,
                                    const float *dentropy, const float *lse, const float *entropy,
                                    const int32_t *rows, const int32_t *targets, float temperature,
                                    int R, int v0, int vc) {
    const size_t n = (size_t)R * vc;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        const int r = (int)(i / vc), j = (int)(i % vc);
        const int t = rows ? rows[r] : r;
        const float gl = dlogp ? dlogp[t] : 0.0f;
        const float ge = dentropy ? dentropy[t] : 0.0f;
        const float ez = dentropy ? __fsub_rn(lse[t], entropy[t]) : 0.0f;
        const float zj = L[i] / temperature;
        const float p = expf(__fsub_rn(zj, lse[t]));
        float g = __fsub_rn(__fmul_rn(-gl, p), __fmul_rn(__fmul_rn(ge, p), __fsub_rn(zj, ez))) /
                  temperature;
        if (targets[t] - v0 == j)
            g = __fadd_rn(g, gl / temperature);
        store_dt(dL, wdt, i, g);
    }
}

/* dinp[rows[r]] += dxg[r] (rows are distinct, so no two blocks share a row). */
__global__ void head_scatter_kernel(float *dinp, const float *dxg, const int32_t *rows, int C) {
    const int r = blockIdx.x;
    const int t = rows ? rows[r] : r;
    for (int c = threadIdx.x; c < C; c += blockDim.x)
        dinp[(size_t)t * C + c] += dxg[(size_t)r * C + c];
}

/* ---- Cross-entropy ---- */

/* One block: num = -sum w logp, den = sum w in double, fixed order. */
__global__ void crossentropy_forward_kernel(double *loss, const float *logp, const float *w,
                                            int BT) {
    double num = 0.0, den = 0.0;
    for (int t = threadIdx.x; t < BT; t += blockDim.x) {
        num -= (double)w[t] * (double)logp[t];
        den += (double)w[t];
    }
    num = cuda_block_reduce<cuda_op_sum<double>>(num, 0.0);
    den = cuda_block_reduce<cuda_op_sum<double>>(den, 0.0);
    if (threadIdx.x == 0)
        *loss = den > 0 ? num / den : 0.0;
}

__global__ void crossentropy_backward_kernel(float *dlogp, float dloss, const float *w, int BT) {
    double den = 0.0;
    for (int t = threadIdx.x; t < BT; t += blockDim.x)
        den += (double)w[t];
    den = cuda_block_reduce<cuda_op_sum<double>>(den, 0.0);
    for (int t = threadIdx.x; t < BT; t += blockDim.x)
        dlogp[t] = den > 0 ? (float)(-(double)dloss * (double)w[t] / den) : 0.0f;
}

/* ---- z-loss ---- */

/* max and sum of exp(l - max) of one row by one warp (moe.c row_softmax_stats). */
__device__ inline void warp_row_stats(float *mx, float *sum, const float *l, int n) {
    const int lane = threadIdx.x & 31;
    float m = -INFINITY;
    for (int j = lane; j < n; j += 32)
        m = fmaxf(m, l[j]);
    m = cuda_warp_reduce<cuda_op_fmaxf>(m);
    float s = 0.0f;
    for (int j = lane; j < n; j += 32)
        s += expf(l[j] - m);
    *sum = cuda_warp_reduce<cuda_op_sum<float>>(s);
    *mx = m;
}

/* One block; warp w takes rows w, w + nwarps, ...; its lse^2 sum in double, the warps' sums
 * added in order. */
__global__ void zloss_forward_kernel(float *out, const float *logits, int T, int n) {
    const int warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    double acc = 0.0;
    for (int t = warp; t < T; t += nwarps) {
        float mx, sum;
        warp_row_stats(&mx, &sum, logits + (size_t)t * n, n);
        const float lse = mx + logf(sum);
        acc += (double)lse * (double)lse;
    }
    /* Lane 0 of each warp holds the same acc as its other lanes; count it once. */
    acc = cuda_block_reduce<cuda_op_sum<double>>((threadIdx.x & 31) == 0 ? acc : 0.0, 0.0);
    if (threadIdx.x == 0)
        *out = T > 0 ? (float)(acc / T) : 0.0f;
}

__global__ void zloss_backward_kernel(float *dlogits, float dloss, const float *logits, int T,
                                      int n) {
    const int warps_per_block = blockDim.x >> 5;
    const int t = blockIdx.x * warps_per_block + (threadIdx.x >> 5);
    if (t >= T)
        return;
    const float *l = logits + (size_t)t * n;
    float mx, sum;
    warp_row_stats(&mx, &sum, l, n);
    const float g = __fmul_rn(__fmul_rn(dloss, 2.0f), __fadd_rn(mx, logf(sum))) / (float)T;
    float *dl = dlogits + (size_t)t * n;
    for (int j = threadIdx.x & 31; j < n; j += 32)
        dl[j] = __fadd_rn(dl[j], __fmul_rn(g, expf(l[j] - mx)) / sum);
}

/* Threads per block for a row kernel over `cols` columns: a multiple of 32 in [32, 1024]. */
unsigned row_threads(int cols) {
    unsigned th = 32;
    while (th < 1024 && (int)th < cols)
        th <<= 1;
    return th > CUDA_THREADS ? CUDA_THREADS : th;
}

void check_dt(cuda_dtype_t dt) {
    Q_ASSERT((unsigned)dt < CUDA_DT_COUNT);
}

} // namespace

extern "C" {

void cuda_convert(void *dst, cuda_dtype_t dst_dt, const void *src, cuda_dtype_t src_dt, size_t n,
                  cudaStream_t s) {
    check_dt(dst_dt);
    check_dt(src_dt);
    if (n == 0)
        return;
    if (dst_dt == src_dt) {
        if (dst != src)
            CUDA_CHECK(cudaMemcpyAsync(dst, src, n * cuda_dtype_size(dst_dt),
                                       cudaMemcpyDeviceToDevice, s));
        return;
    }
    convert_kernel<<<cuda_blocks_for(n, CUDA_THREADS), CUDA_THREADS, 0, s>>>(dst, dst_dt, src,
                                                                             src_dt, n);
    CUDA_LAUNCH_CHECK();
}

void cuda_embedding_forward(float *out, const int32_t *tokens, const float *wte, int BT, int C,
                            int V, cudaStream_t s) {
    Q_ASSERT(BT >= 0 && C >= 1 && V >= 1);
    if (BT == 0)
        return;
    const size_t n = (size_t)BT * C;
    embedding_forward_kernel<<<cuda_blocks_for(n, CUDA_THREADS), CUDA_THREADS, 0, s>>>(
        out, tokens, wte, BT, C, V);
    CUDA_LAUNCH_CHECK();
}

void cuda_embedding_backward(float *dwte, const float *dout, const int32_t *tokens, int BT, int C,
                             int V, cudaStream_t s) {
    Q_ASSERT(BT >= 0 && C >= 1 && V >= 1);
    if (BT == 0)
        return;
    embedding_backward_kernel<<<(C + 127) / 128, 128, 0, s>>>(dwte, dout, tokens, BT, C, V);
    CUDA_LAUNCH_CHECK();
}

void cuda_rmsnorm_forward(float *out, float *rstd, const float *inp, const float *weight, int BT,
                          int C, cudaStream_t s) {
    Q_ASSERT(BT >= 0 && C >= 1);
    if (BT == 0)
        return;
    rmsnorm_forward_kernel<<<BT, row_threads(C), 0, s>>>(out, rstd, inp, weight, C);
    CUDA_LAUNCH_CHECK();
}

void cuda_rmsnorm_backward(float *dinp, float *dweight, const float *dout, const float *inp,
                           const float *weight, const float *rstd, int BT, int C, cudaStream_t s) {
    Q_ASSERT(BT >= 0 && C >= 1);
    if (BT == 0)
        return;
    if (dinp) {
        rmsnorm_backward_dinp_kernel<<<BT, row_threads(C), 0, s>>>(dinp, dout, inp, weight, rstd,
                                                                   C);
        CUDA_LAUNCH_CHECK();
    }
    const dim3 block(RMS_DW_TILE, RMS_DW_TILE);
    rmsnorm_backward_dweight_kernel<<<(C + RMS_DW_TILE - 1) / RMS_DW_TILE, block, 0, s>>>(
        dweight, dout, inp, rstd, BT, C);
    CUDA_LAUNCH_CHECK();
}

static void rope_launch(float *out, const float *inp, int B, int T, int C, int NH, int pos0,
                        float dir, cudaStream_t s) {
    Q_ASSERT(B >= 0 && T >= 0 && NH >= 1 && C % NH == 0 && pos0 >= 0);
    const int HS = C / NH;
    Q_ASSERT(HS % 2 == 0 && HS <= ATTN_MAX_HS);
    const size_t n = (size_t)B * T * (HS / 2);
    if (n == 0)
        return;
    rope_kernel<<<cuda_blocks_for(n, CUDA_THREADS), CUDA_THREADS, 0, s>>>(out, inp, B * T, T, C, HS,
                                                                          pos0, dir);
    CUDA_LAUNCH_CHECK();
}

void cuda_rope_forward(float *out, const float *inp, int B, int T, int C, int NH, int pos0,
                       cudaStream_t s) {
    rope_launch(out, inp, B, T, C, NH, pos0, 1.0f, s);
}

void cuda_rope_backward(float *dinp, const float *dout, int B, int T, int C, int NH, int pos0,
                        cudaStream_t s) {
    rope_launch(dinp, dout, B, T, C, NH, pos0, -1.0f, s);
}

void cuda_residual_forward(float *out, const float *a, const float *b, size_t N, cudaStream_t s) {
    if (N == 0)
        return;
    residual_forward_kernel<<<cuda_blocks_for(N, CUDA_THREADS), CUDA_THREADS, 0, s>>>(out, a, b, N);
    CUDA_LAUNCH_CHECK();
}

void cuda_residual_backward(float *da, float *db, const float *dout, size_t N, cudaStream_t s) {
    if (N == 0 || (!da && !db))
        return;
    residual_backward_kernel<<<cuda_blocks_for(N, CUDA_THREADS), CUDA_THREADS, 0, s>>>(da, db, dout,
                                                                                       N);
    CUDA_LAUNCH_CHECK();
}

/* splitmix64(0 ^ key): the first link of rng_hash({key, counter + i}), the same for every i. */
static uint64_t dropout_hkey(const rng_stream_t *rng) {
    return rng_splitmix64(rng->key);
}

void cuda_dropout_forward(float *out, const float *inp, float p, int training, rng_stream_t rng,
                          size_t N, cudaStream_t s) {
    Q_ASSERT(p >= 0 && p < 1);
    if (N == 0)
        return;
    if (!training || p == 0) {
        if (out != inp)
            CUDA_CHECK(cudaMemcpyAsync(out, inp, N * sizeof(float), cudaMemcpyDeviceToDevice, s));
        return;
    }
    const float keep = 1.0f / (1.0f - p);
    dropout_forward_kernel<<<cuda_blocks_for(N, CUDA_THREADS), CUDA_THREADS, 0, s>>>(
        out, inp, p, keep, dropout_hkey(&rng), rng.counter, N);
    CUDA_LAUNCH_CHECK();
}

void cuda_dropout_backward(float *dinp, const float *dout, float p, int training, rng_stream_t rng,
                           size_t N, cudaStream_t s) {
    Q_ASSERT(p >= 0 && p < 1);
    if (N == 0)
        return;
    if (!training || p == 0) {
        cuda_residual_backward(dinp, nullptr, dout, N, s);
        return;
    }
    const float keep = 1.0f / (1.0f - p);
    dropout_backward_kernel<<<cuda_blocks_for(N, CUDA_THREADS), CUDA_THREADS, 0, s>>>(
        dinp, dout, p, keep, dropout_hkey(&rng), rng.counter, N);
    CUDA_LAUNCH_CHECK();
}

void cuda_quant_fake_forward(quant_type_t type, void *out, cuda_dtype_t out_dt, const float *w,
                             int rows, int cols, cudaStream_t s) {
    Q_ASSERT(rows >= 0 && cols >= 1 && (unsigned)type < QUANT_TYPE_COUNT);
    check_dt(out_dt);
    Q_ASSERT(out != (const void *)w || out_dt == CUDA_DT_F32);
    if (rows == 0)
        return;
    const size_t n = (size_t)rows * cols;
    switch (type) {
    case QUANT_F32: cuda_convert(out, out_dt, w, CUDA_DT_F32, n, s); return;
    case QUANT_F16:
        fake_f16_kernel<<<cuda_blocks_for(n, CUDA_THREADS), CUDA_THREADS, 0, s>>>(out, out_dt, w,
                                                                                  n);
        break;
    case QUANT_TERNARY:
    case QUANT_INT8:
        fake_row_kernel<<<rows, row_threads(cols), 0, s>>>(type, 0, out, out_dt, w, cols);
        break;
    case QUANT_INT4: {
        const size_t groups = (size_t)rows * ((cols + QUANT_INT4_GROUP - 1) / QUANT_INT4_GROUP);
        fake_int4_kernel<<<cuda_blocks_for(groups * 32, CUDA_THREADS), CUDA_THREADS, 0, s>>>(
            out, out_dt, w, rows, cols);
        break;
    }
    case QUANT_TYPE_COUNT: Q_ASSERT(!"unknown quant type");
    }
    CUDA_LAUNCH_CHECK();
}

void cuda_quant_fake_act_forward(void *out, cuda_dtype_t out_dt, const float *x, int rows, int cols,
                                 cudaStream_t s) {
    Q_ASSERT(rows >= 0 && cols >= 1);
    check_dt(out_dt);
    Q_ASSERT(out != (const void *)x || out_dt == CUDA_DT_F32);
    if (rows == 0)
        return;
    fake_row_kernel<<<rows, row_threads(cols), 0, s>>>(QUANT_INT8, 1, out, out_dt, x, cols);
    CUDA_LAUNCH_CHECK();
}

void cuda_bitlinear_weight_codes(void *wcode, cuda_dtype_t code_dt, float *wq, float *sw,
                                 const float *weight, int C, int OC, cudaStream_t s) {
    Q_ASSERT(C >= 1 && OC >= 1 && wcode != (void *)wq);
    check_dt(code_dt);
    bitlinear_wcodes_kernel<<<OC, row_threads(C), 0, s>>>(wcode, code_dt, wq, sw, weight, C);
    CUDA_LAUNCH_CHECK();
}

void cuda_bitlinear_forward_codes(cuda_gemm_t *g, float *out, float *xq, float *sx, void *xcode,
                                  const float *inp, const void *wcode, const float *sw, int BT,
                                  int C, int OC, cuda_dtype_t code_dt, cudaStream_t s) {
    Q_ASSERT(BT >= 0 && C >= 1 && OC >= 1);
    /* The integer sums stay exact in FP32 accumulation: |code_x| <= 128, |code_w| <= 1. */
    Q_ASSERT((double)C * 128.0 < 16777216.0);
    check_dt(code_dt);
    if (BT == 0)
        return;
    bitlinear_xcodes_kernel<<<BT, row_threads(C), 0, s>>>(xcode, code_dt, xq, sx, inp, C);
    CUDA_LAUNCH_CHECK();
    cuda_gemm_run(g, s, GEMM_N, GEMM_T, BT, OC, C, 1.0f, xcode, C, wcode, C, 0.0f, out, OC, code_dt,
                  CUDA_DT_F32);
    const size_t n = (size_t)BT * OC;
    bitlinear_scale_kernel<<<cuda_blocks_for(n, CUDA_THREADS), CUDA_THREADS, 0, s>>>(out, sw, sx,
                                                                                     BT, OC);
    CUDA_LAUNCH_CHECK();
}

void cuda_bitlinear_backward(cuda_gemm_t *g, float *dinp, float *dweight, const float *dout,
                             const float *wq, const float *xq, int BT, int C, int OC,
                             cudaStream_t s) {
    if (dinp)
        cuda_gemm_run(g, s, GEMM_N, GEMM_N, BT, C, OC, 1.0f, dout, OC, wq, C, 1.0f, dinp, C,
                      CUDA_DT_F32, CUDA_DT_F32);
    if (dweight)
        cuda_gemm_run(g, s, GEMM_T, GEMM_N, OC, C, BT, 1.0f, dout, OC, xq, C, 1.0f, dweight, C,
                      CUDA_DT_F32, CUDA_DT_F32);
}

size_t cuda_head_scratch_bytes(int R, int C, int vchunk, cuda_dtype_t wdt) {
    Q_ASSERT(R >= 0 && C >= 1 && vchunk >= 1);
    check_dt(wdt);
    return head_layout(nullptr, R, C, vchunk, wdt).bytes;
}

static void head_check(int R, int BT, int C, int V, int vchunk, float temperature,
                       const int32_t *rows, cuda_dtype_t wdt) {
    Q_ASSERT(BT >= 0 && R >= 0 && R <= BT && C >= 1 && V >= 1 && vchunk >= 1);
    Q_ASSERT(rows != nullptr || R == BT);
    Q_ASSERT(temperature > 0);
    check_dt(wdt);
}

void cuda_head_forward(cuda_gemm_t *g, float *logp, float *entropy, float *lse, const float *inp,
                       const void *weight, cuda_dtype_t wdt, const int32_t *targets,
                       const int32_t *rows, int R, float temperature, int BT, int C, int V,
                       int vchunk, void *scratch, cudaStream_t s) {
    head_check(R, BT, C, V, vchunk, temperature, rows, wdt);
    if (BT == 0)
        return;
    CUDA_CHECK(cudaMemsetAsync(logp, 0, (size_t)BT * sizeof(float), s));
    CUDA_CHECK(cudaMemsetAsync(lse, 0, (size_t)BT * sizeof(float), s));
    if (entropy)
        CUDA_CHECK(cudaMemsetAsync(entropy, 0, (size_t)BT * sizeof(float), s));
    if (R == 0)
        return;
    const head_scratch h = head_layout(scratch, R, C, vchunk, wdt);
    const size_t es = cuda_dtype_size(wdt);
    head_gather_kernel<<<R, row_threads(C), 0, s>>>(h.xg, wdt, h.m, h.zt, h.s, h.a, inp, rows,
                                                    targets, BT, C, V);
    CUDA_LAUNCH_CHECK();
    for (int v0 = 0; v0 < V; v0 += vchunk) {
        const int vc = V - v0 < vchunk ? V - v0 : vchunk;
        const char *Wc = (const char *)weight + (size_t)v0 * C * es;
        cuda_gemm_run(g, s, GEMM_N, GEMM_T, R, vc, C, 1.0f, h.xg, C, Wc, C, 0.0f, h.L, vc, wdt,
                      CUDA_DT_F32);
        head_stats_kernel<<<R, row_threads(vc), 0, s>>>(h.m, h.zt, h.s, h.a, h.L, rows, targets,
                                                        temperature, v0, vc);
        CUDA_LAUNCH_CHECK();
    }
    head_finish_kernel<<<(R + CUDA_THREADS - 1) / CUDA_THREADS, CUDA_THREADS, 0, s>>>(
        logp, entropy, lse, h.m, h.zt, h.s, h.a, rows, R);
    CUDA_LAUNCH_CHECK();
}

void cuda_head_backward(cuda_gemm_t *g, float *dinp, float *dweight, const float *dlogp,
                        const float *dentropy, const float *inp, const void *weight,
                        cuda_dtype_t wdt, const int32_t *targets, const float *lse,
                        const float *entropy, const int32_t *rows, int R, float temperature, int BT,
                        int C, int V, int vchunk, void *scratch, cudaStream_t s) {
    head_check(R, BT, C, V, vchunk, temperature, rows, wdt);
    Q_ASSERT(dentropy == nullptr || entropy != nullptr);
    if ((dlogp == nullptr && dentropy == nullptr) || R == 0)
        return;
    const head_scratch h = head_layout(scratch, R, C, vchunk, wdt);
    const size_t es = cuda_dtype_size(wdt);
    head_gather_kernel<<<R, row_threads(C), 0, s>>>(h.xg, wdt, nullptr, nullptr, nullptr, nullptr,
                                                    inp, rows, targets, BT, C, V);
    CUDA_LAUNCH_CHECK();
    if (dinp)
        CUDA_CHECK(cudaMemsetAsync(h.dxg, 0, (size_t)R * C * sizeof(float), s));
    for (int v0 = 0; v0 < V; v0 += vchunk) {
        const int vc = V - v0 < vchunk ? V - v0 : vchunk;
        const char *Wc = (const char *)weight + (size_t)v0 * C * es;
        cuda_gemm_run(g, s, GEMM_N, GEMM_T, R, vc, C, 1.0f, h.xg, C, Wc, C, 0.0f, h.L, vc, wdt,
                      CUDA_DT_F32);
        const size_t n = (size_t)R * vc;
        head_dlogits_kernel<<<cuda_blocks_for(n, CUDA_THREADS), CUDA_THREADS, 0, s>>>(
            h.dL, wdt, h.L, dlogp, dentropy, lse, entropy, rows, targets, temperature, R, v0, vc);
        CUDA_LAUNCH_CHECK();
        if (dinp)
            cuda_gemm_run(g, s, GEMM_N, GEMM_N, R, C, vc, 1.0f, h.dL, vc, Wc, C, 1.0f, h.dxg, C,
                          wdt, CUDA_DT_F32);
        cuda_gemm_run(g, s, GEMM_T, GEMM_N, vc, C, R, 1.0f, h.dL, vc, h.xg, C, 1.0f,
                      dweight + (size_t)v0 * C, C, wdt, CUDA_DT_F32);
    }
    if (dinp) {
        head_scatter_kernel<<<R, row_threads(C), 0, s>>>(dinp, h.dxg, rows, C);
        CUDA_LAUNCH_CHECK();
    }
}

void cuda_crossentropy_forward(double *loss, const float *logp, const float *w, int BT,
                               cudaStream_t s) {
    Q_ASSERT(BT >= 0);
    crossentropy_forward_kernel<<<1, 1024, 0, s>>>(loss, logp, w, BT);
    CUDA_LAUNCH_CHECK();
}

void cuda_crossentropy_backward(float *dlogp, float dloss, const float *w, int BT, cudaStream_t s) {
    Q_ASSERT(BT >= 0);
    if (BT == 0)
        return;
    crossentropy_backward_kernel<<<1, 1024, 0, s>>>(dlogp, dloss, w, BT);
    CUDA_LAUNCH_CHECK();
}

void cuda_zloss_forward(float *out, const float *logits, int T, int n, cudaStream_t s) {
    Q_ASSERT(T >= 0 && n >= 1);
    zloss_forward_kernel<<<1, 1024, 0, s>>>(out, logits, T, n);
    CUDA_LAUNCH_CHECK();
}

void cuda_zloss_backward(float *dlogits, float dloss, const float *logits, int T, int n,
                         cudaStream_t s) {
    Q_ASSERT(T >= 0 && n >= 1);
    if (T == 0 || dloss == 0)
        return;
    const int warps = CUDA_THREADS / 32;
    zloss_backward_kernel<<<(T + warps - 1) / warps, CUDA_THREADS, 0, s>>>(dlogits, dloss, logits,
                                                                           T, n);
    CUDA_LAUNCH_CHECK();
}

} /* extern "C" */
