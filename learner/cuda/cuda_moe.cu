/* The hierarchical MoE layer on the device (cuda_moe.h), mirroring common/moe.c step by step.
 *
 * Indexing (moe.c's): slot s = t*KM + m; expert slot es = s*KE + i; micro slot ms = s*KN + i.
 * "Grouped rows" of the mini routers are the slots sorted by mini (stable: ascending slot within
 * a mini); grouped expert rows are the expert slots sorted by global expert j*E + e. Both sorts
 * are CUB's LSD radix sort of (key, id) pairs, which is stable, so the orders are the CPU's.
 *
 * Routers are numbered as the aux sums run on the CPU: 0 the gate, 1 + 2j mini j's expert router,
 * 2 + 2j its micro router. Per-router sums over tokens (the balance shares P, the z-loss) are
 * products with a vector of ones through cuda_gemm (deterministic), finished by one thread per
 * router in the CPU's order; selection counts are integer atomics (exact). */
#include "cuda_moe.h"

#include <cub/cub.cuh>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "cuda_buf.h"
#include "cuda_ops.h"

namespace {

constexpr int TPB = 256;      /* threads of row/element kernels */
constexpr int WPB = 8;        /* warps per block of the warp-per-row kernels */
constexpr int KMAX = 64;      /* largest k of any router (moe_acts_new's limit) */
constexpr int SLOT_TPB = 128; /* threads of the per-slot and per-token kernels */

/* ---- device helpers ---- */

__device__ __forceinline__ float sigm(float x) {
    return 1.0f / (1.0f + expf(-x));
}
__device__ __forceinline__ float silu(float x) {
    return x * sigm(x);
}
__device__ __forceinline__ float silu_grad(float x) {
    const float s = sigm(x);
    return s * (1.0f + x * (1.0f - s));
}

/* p[i] = v stored as dt (FP16/BF16 round to nearest even). */
__device__ __forceinline__ void store_dt(void *p, size_t i, float v, int dt) {
    if (dt == CUDA_DT_F32)
        ((float *)p)[i] = v;
    else if (dt == CUDA_DT_F16)
        ((__half *)p)[i] = __float2half_rn(v);
    else
        ((__nv_bfloat16 *)p)[i] = __float2bfloat16_rn(v);
}

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1)
        v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1)
        v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

/* Sum over the block (blockDim.x a multiple of 32, at most 1024) in a fixed order; every thread
 * gets the result. sh: 32 floats of shared memory, free again on return. */
__device__ float block_sum(float v, float *sh) {
    const int lane = threadIdx.x % 32, w = threadIdx.x / 32, nw = blockDim.x / 32;
    v = warp_sum(v);
    if (lane == 0)
        sh[w] = v;
    __syncthreads();
    float r = 0.0f;
    if (w == 0) {
        r = lane < nw ? sh[lane] : 0.0f;
        r = warp_sum(r);
        if (lane == 0)
            sh[0] = r;
    }
    __syncthreads();
    r = sh[0];
    __syncthreads();
    return r;
}

/* ---- element kernels ---- */

__global__ void k_silu_fwd(float *act, void *act_lp, const float *pre, size_t n, int dt) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        const float a = silu(pre[i]);
        act[i] = a;
        if (act_lp)
            store_dt(act_lp, i, a, dt);
    }
}

/* g[i] *= silu'(pre[i]); g_lp[i] = g[i] as dt (g_lp may be NULL). */
__global__ void k_silu_bwd(float *g, void *g_lp, const float *pre, size_t n, int dt) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        const float v = g[i] * silu_grad(pre[i]);
        g[i] = v;
        if (g_lp)
            store_dt(g_lp, i, v, dt);
    }
}

/* out[i] = ReLU²(pre[i]) as dt. */
__global__ void k_relu2(void *out, const float *pre, size_t n, int dt) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        const float v = pre[i] > 0.0f ? pre[i] : 0.0f;
        store_dt(out, i, v * v, dt);
    }
}

/* g[i] *= 2 max(pre, 0) (in place, FP32); g_lp[i] = the result as dt (may be NULL). */
__global__ void k_relu2_bwd(float *g, void *g_lp, const float *pre, size_t n, int dt) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        const float v = g[i] * (pre[i] > 0.0f ? 2.0f * pre[i] : 0.0f);
        g[i] = v;
        if (g_lp)
            store_dt(g_lp, i, v, dt);
    }
}

__global__ void k_fill_f(float *p, float v, size_t n) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x)
        p[i] = v;
}

__global__ void k_iota(int *p, int n) {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x)
        p[i] = i;
}

/* inv[order[r]] = r. */
__global__ void k_inverse(int *inv, const int *order, int n) {
    for (int r = blockIdx.x * blockDim.x + threadIdx.x; r < n; r += gridDim.x * blockDim.x)
        inv[order[r]] = r;
}

/* Sort keys: key[s] = mini[s] (slots by mini). */
__global__ void k_key_copy(int *key, const int32_t *src, int n) {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x)
        key[i] = src[i];
}

/* key[x] = mini[x / per] * width + idx[x] (expert slots by global expert, micro slots by agent). */
__global__ void k_key_global(int *key, const int32_t *mini, const int32_t *idx, int per, int width,
                             int n) {
    for (int x = blockIdx.x * blockDim.x + threadIdx.x; x < n; x += gridDim.x * blockDim.x)
        key[x] = mini[x / per] * width + idx[x];
}

/* out row r (as dt) = u row order[r] / div. grid-stride over R * C elements. */
__global__ void k_gather(void *out, int dt, const float *u, const int *order, int div, int R,
                         int C) {
    const size_t n = (size_t)R * C;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        const size_t r = i / C, c = i % C;
        const size_t t = (size_t)(order[r] / div);
        store_dt(out, i, u[t * C + c], dt);
    }
}

/* load[i] += cnt[i]. */
__global__ void k_add_load(unsigned long long *load, const int *cnt, int n) {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x)
        load[i] += (unsigned long long)cnt[i];
}

/* ---- routers ---- */

/* One router decision per row (one warp each): own top-k of logits + bias with moe_topk's rule
 * (largest first, equal scores to the lowest index), or the replayed indices (then counting a
 * differing own set), gate weights = softmax over the kept logits (moe_gate_forward), and the
 * selection counts. Row r is slot slot_of_row[r] (r itself when NULL) of router
 * key = key_of_slot[slot] (0 when NULL); logits [R, n] by row; bias [keys, n] or NULL; replay,
 * kept, w [slots, k] by slot; cnt [keys, n]. */
__global__ void k_topk(int32_t *kept, float *w, int *cnt, unsigned long long *mismatches,
                       const float *logits, const float *bias, const int32_t *replay,
                       const int *slot_of_row, const int32_t *key_of_slot, int R, int n, int k) {
    __shared__ int own_s[WPB][KMAX];
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int row = blockIdx.x * WPB + warp;
    if (row >= R)
        return;
    const int slot = slot_of_row ? slot_of_row[row] : row;
    const int key = key_of_slot ? key_of_slot[slot] : 0;
    const float *l = logits + (size_t)row * n;
    const float *bb = bias ? bias + (size_t)key * n : nullptr;
    int *own = own_s[warp];
    for (int q = 0; q < k; q++) {
        float bv = 0.0f;
        int bi = -1;
        for (int i = lane; i < n; i += 32) {
            bool taken = false;
            for (int q2 = 0; q2 < q; q2++)
                taken |= own[q2] == i;
            if (taken)
                continue;
            const float v = bb ? l[i] + bb[i] : l[i];
            if (bi < 0 || v > bv) {
                bv = v;
                bi = i;
            }
        }
        for (int o = 16; o > 0; o >>= 1) {
            const float ov = __shfl_xor_sync(0xffffffffu, bv, o);
            const int oi = __shfl_xor_sync(0xffffffffu, bi, o);
            if (oi >= 0 && (bi < 0 || ov > bv || (ov == bv && oi < bi))) {
                bv = ov;
                bi = oi;
            }
        }
        if (lane == 0)
            own[q] = bi;
        __syncwarp();
    }
    if (lane != 0)
        return;
    int32_t *kp = kept + (size_t)slot * k;
    if (replay) {
        const int32_t *rp = replay + (size_t)slot * k;
        int differ = 0;
        for (int q = 0; q < k; q++) {
            int found = 0;
            for (int q2 = 0; q2 < k; q2++)
                found |= own[q] == rp[q2];
            differ |= !found;
            kp[q] = rp[q];
        }
        if (differ)
            atomicAdd(mismatches, 1ULL);
    } else {
        for (int q = 0; q < k; q++)
            kp[q] = own[q];
    }
    float *wp = w + (size_t)slot * k;
    float mx = l[kp[0]];
    for (int q = 1; q < k; q++)
        mx = fmaxf(mx, l[kp[q]]);
    float sum = 0.0f;
    for (int q = 0; q < k; q++) {
        wp[q] = expf(l[kp[q]] - mx);
        sum += wp[q];
    }
    for (int q = 0; q < k; q++) {
        wp[q] /= sum;
        atomicAdd(&cnt[(size_t)key * n + kp[q]], 1);
    }
}

/* prob [R, n] = softmax of each row of logits, lse2 [R] = logsumexp(row)^2: one warp per row. */
__global__ void k_rowstats(float *prob, float *lse2, const float *logits, int R, int n) {
    const int row = blockIdx.x * WPB + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (row >= R)
        return;
    const float *l = logits + (size_t)row * n;
    float mx = -INFINITY;
    for (int i = lane; i < n; i += 32)
        mx = fmaxf(mx, l[i]);
    mx = warp_max(mx);
    float s = 0.0f;
    for (int i = lane; i < n; i += 32)
        s += expf(l[i] - mx);
    s = warp_sum(s);
    float *p = prob + (size_t)row * n;
    for (int i = lane; i < n; i += 32)
        p[i] = expf(l[i] - mx) / s;
    if (lane == 0) {
        const float lse = mx + logf(s);
        lse2[row] = lse * lse;
    }
}

/* Router geometry for the finishing and backward kernels. */
struct routers_t {
    int M, E, N, KM, KE, KN, BT;
};

/* Router r's choices n, kept k, per-choice offset into the [M + M*E + M*N] arrays, and rows. */
__device__ void router_of(const routers_t &g, const int *cnt, int r, int *n, int *k, size_t *off,
                          int *rows) {
    if (r == 0) {
        *n = g.M;
        *k = g.KM;
        *off = 0;
        *rows = g.BT;
        return;
    }
    const int j = (r - 1) / 2;
    *rows = cnt[j]; /* the gate's count of mini j = the rows that reached its routers */
    if ((r - 1) % 2 == 0) {
        *n = g.E;
        *k = g.KE;
        *off = (size_t)g.M + (size_t)j * g.E;
    } else {
        *n = g.N;
        *k = g.KN;
        *off = (size_t)g.M + (size_t)g.M * g.E + (size_t)j * g.N;
    }
}

/* Per router (one thread each, the CPU's order): f_i = count_i / (rows k), P_i = Psum_i / rows,
 * bal[r] = n sum_i f_i P_i, z[r] = zsum[r] / rows; all zero for a router no row reached. */
__global__ void k_router_finish(float *bal, float *z, float *f, const float *Psum,
                                const float *zsum, const int *cnt, routers_t g) {
    const int r = blockIdx.x * blockDim.x + threadIdx.x;
    if (r >= 1 + 2 * g.M)
        return;
    int n, k, rows;
    size_t off;
    router_of(g, cnt, r, &n, &k, &off, &rows);
    float loss = 0.0f;
    for (int i = 0; i < n; i++) {
        float fi = 0.0f;
        if (rows > 0) {
            fi = (float)cnt[off + i] / ((float)rows * (float)k);
            loss += fi * (Psum[off + i] / (float)rows);
        }
        f[off + i] = fi;
    }
    bal[r] = rows > 0 ? (float)n * loss : 0.0f;
    z[r] = rows > 0 ? zsum[r] / (float)rows : 0.0f;
}

/* Balance and z-loss backward of one router decision per row (one warp each), moe.c's
 * moe_balance_backward then moe_zloss_backward: dl_tj += dbal n/T p_tj (f_j - sum_i f_i p_ti)
 * + dz 2 lse_t p_tj / T, with T the router's rows. Row r's router is key_of_slot[slot_of_row[r]]
 * (0 when NULL); f [keys, n]; rows_of_key [keys] (NULL: all R rows). */
__global__ void k_router_loss_bwd(float *dlogits, const float *logits, const float *f,
                                  const int *slot_of_row, const int32_t *key_of_slot,
                                  const int *rows_of_key, int R, int n, float dbal, float dz) {
    const int row = blockIdx.x * WPB + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (row >= R)
        return;
    const int key = key_of_slot ? key_of_slot[slot_of_row[row]] : 0;
    const int T_ = rows_of_key ? rows_of_key[key] : R;
    const float *l = logits + (size_t)row * n, *fk = f + (size_t)key * n;
    float *dl = dlogits + (size_t)row * n;
    float mx = -INFINITY;
    for (int i = lane; i < n; i += 32)
        mx = fmaxf(mx, l[i]);
    mx = warp_max(mx);
    float s = 0.0f;
    for (int i = lane; i < n; i += 32)
        s += expf(l[i] - mx);
    s = warp_sum(s);
    if (dbal != 0.0f) {
        float fp = 0.0f;
        for (int i = lane; i < n; i += 32)
            fp += fk[i] * expf(l[i] - mx) / s;
        fp = warp_sum(fp);
        const float scale = dbal * (float)n / (float)T_;
        for (int j = lane; j < n; j += 32)
            dl[j] += scale * (expf(l[j] - mx) / s) * (fk[j] - fp);
    }
    if (dz != 0.0f) {
        const float gz = dz * 2.0f * (mx + logf(s)) / (float)T_;
        for (int j = lane; j < n; j += 32)
            dl[j] += gz * expf(l[j] - mx) / s;
    }
}

/* ---- mini outputs ---- */

struct mdims_t {
    int C, M, KM, E, KE, N, KN;
};

/* Per slot (one block): the micro scores m_s = down . u, then mini_out = sum_i r_w e_out +
 * sum_i m_w SiLU(m_s) up, in moe.c's order. */
__global__ void k_mini_out(float *mini_out, float *m_s, const float *u, const float *mic_down,
                           const float *mic_up, const int32_t *mini, const int32_t *micro,
                           const float *m_w, const float *r_w, const float *e_out,
                           const int *exp_row, mdims_t d) {
    __shared__ float red[32];
    __shared__ float coef[KMAX];
    const int s = blockIdx.x, t = s / d.KM, j = mini[s], C = d.C;
    const float *ut = u + (size_t)t * C;
    for (int i = 0; i < d.KN; i++) {
        const size_t ms = (size_t)s * d.KN + i, agent = (size_t)j * d.N + micro[ms];
        const float *dn = mic_down + agent * C;
        float acc = 0.0f;
        for (int c = threadIdx.x; c < C; c += blockDim.x)
            acc += dn[c] * ut[c];
        const float sv = block_sum(acc, red);
        if (threadIdx.x == 0) {
            m_s[ms] = sv;
            coef[i] = m_w[ms] * silu(sv);
        }
    }
    __syncthreads();
    float *mo = mini_out + (size_t)s * C;
    for (int c = threadIdx.x; c < C; c += blockDim.x) {
        float acc = 0.0f;
        for (int i = 0; i < d.KE; i++) {
            const size_t es = (size_t)s * d.KE + i;
            acc += r_w[es] * e_out[(size_t)exp_row[es] * C + c];
        }
        for (int i = 0; i < d.KN; i++) {
            const size_t agent = (size_t)j * d.N + micro[(size_t)s * d.KN + i];
            acc += coef[i] * mic_up[agent * C + c];
        }
        mo[c] = acc;
    }
}

/* y[t] += sum_m gate_w[t*KM + m] mini_out[t*KM + m], one block per token. */
__global__ void k_combine(float *y, const float *gate_w, const float *mini_out, int KM, int C) {
    const int t = blockIdx.x;
    for (int c = threadIdx.x; c < C; c += blockDim.x) {
        float acc = y[(size_t)t * C + c];
        for (int m = 0; m < KM; m++) {
            const size_t s = (size_t)t * KM + m;
            acc += gate_w[s] * mini_out[s * C + c];
        }
        y[(size_t)t * C + c] = acc;
    }
}

/* ---- backward kernels ---- */

/* Per token (one block): dmini[s] = p_s dy_t, and the gate backward of dq_m = dy_t . mini_out[s]
 * into dgl[t] (ASSIGNED: zeroed first). */
__global__ void k_gate_bwd(float *dmini, float *dgl, const float *dy, const float *gate_w,
                           const float *mini_out, const int32_t *mini, int M, int KM, int C) {
    __shared__ float red[32];
    __shared__ float dq[KMAX];
    const int t = blockIdx.x;
    const float *dyt = dy + (size_t)t * C;
    for (int m = 0; m < KM; m++) {
        const size_t s = (size_t)t * KM + m;
        const float *mo = mini_out + s * C;
        float *dmo = dmini + s * C;
        float acc = 0.0f;
        for (int c = threadIdx.x; c < C; c += blockDim.x) {
            dmo[c] = gate_w[s] * dyt[c];
            acc += dyt[c] * mo[c];
        }
        const float v = block_sum(acc, red);
        if (threadIdx.x == 0)
            dq[m] = v;
    }
    if (threadIdx.x != 0)
        return;
    float *dl = dgl + (size_t)t * M;
    for (int i = 0; i < M; i++)
        dl[i] = 0.0f;
    const float *w = gate_w + (size_t)t * KM;
    float sw = 0.0f;
    for (int m = 0; m < KM; m++)
        sw += w[m] * dq[m];
    for (int m = 0; m < KM; m++)
        dl[mini[(size_t)t * KM + m]] += w[m] * (dq[m] - sw);
}

/* Per slot (one block): expert gate weights (de_out, dr) and micro agents (their two gradient
 * coefficients cu = w SiLU(s), cd = w g SiLU'(s), and dm), as moe_backward's slot loop. dr, dm
 * are grouped rows (zeroed by the caller); de_out grouped expert rows. */
__global__ void k_slot_bwd(float *de_out, float *dr, float *dm, float *cu, float *cd,
                           const float *dmini, const float *e_out, const int *exp_row,
                           const float *r_w, const int32_t *expert, const int32_t *mini,
                           const int32_t *micro, const float *m_s, const float *m_w,
                           const float *mic_up, const int *slot_row, mdims_t d) {
    __shared__ float red[32];
    __shared__ float dq[KMAX];
    const int s = blockIdx.x, j = mini[s], C = d.C;
    const float *dmo = dmini + (size_t)s * C;
    const size_t row = (size_t)slot_row[s];
    for (int i = 0; i < d.KE; i++) {
        const size_t es = (size_t)s * d.KE + i, er = (size_t)exp_row[es];
        const float *eo = e_out + er * C;
        float *de = de_out + er * C;
        float acc = 0.0f;
        for (int c = threadIdx.x; c < C; c += blockDim.x) {
            acc += dmo[c] * eo[c];
            de[c] = r_w[es] * dmo[c];
        }
        const float v = block_sum(acc, red);
        if (threadIdx.x == 0)
            dq[i] = v;
    }
    if (threadIdx.x == 0) {
        const float *w = r_w + (size_t)s * d.KE;
        float sw = 0.0f;
        for (int i = 0; i < d.KE; i++)
            sw += w[i] * dq[i];
        for (int i = 0; i < d.KE; i++)
            dr[row * d.E + expert[(size_t)s * d.KE + i]] += w[i] * (dq[i] - sw);
    }
    __syncthreads(); /* dq is reused below */
    for (int i = 0; i < d.KN; i++) {
        const size_t ms = (size_t)s * d.KN + i, agent = (size_t)j * d.N + micro[ms];
        const float *up = mic_up + agent * C;
        float acc = 0.0f;
        for (int c = threadIdx.x; c < C; c += blockDim.x)
            acc += dmo[c] * up[c];
        const float g = block_sum(acc, red);
        if (threadIdx.x == 0) {
            const float sv = m_s[ms], sg = silu(sv), w = m_w[ms];
            dq[i] = sg * g;
            cu[ms] = w * sg;
            cd[ms] = w * g * silu_grad(sv);
        }
    }
    if (threadIdx.x == 0) {
        const float *w = m_w + (size_t)s * d.KN;
        float sw = 0.0f;
        for (int i = 0; i < d.KN; i++)
            sw += w[i] * dq[i];
        for (int i = 0; i < d.KN; i++)
            dm[row * d.N + micro[(size_t)s * d.KN + i]] += w[i] * (dq[i] - sw);
    }
}

/* Per micro agent a (one block): dmic_up[a] += cu dmini[s], dmic_down[a] += cd u[t] over its
 * micro slots in ascending order (order[off[a] .. end)), as the CPU's slot loop adds them. */
__global__ void k_micro_param_bwd(float *dup, float *ddown, const float *cu, const float *cd,
                                  const float *dmini, const float *u, const int *order,
                                  const int *off, int nagents, int total, int KN, int KM, int C) {
    const int a = blockIdx.x;
    const int beg = off[a], end = a + 1 < nagents ? off[a + 1] : total;
    if (beg == end)
        return;
    for (int c = threadIdx.x; c < C; c += blockDim.x) {
        float vu = dup[(size_t)a * C + c], vd = ddown[(size_t)a * C + c];
        for (int q = beg; q < end; q++) {
            const int ms = order[q], s = ms / KN, t = s / KM;
            vu += cu[ms] * dmini[(size_t)s * C + c];
            vd += cd[ms] * u[(size_t)t * C + c];
        }
        dup[(size_t)a * C + c] = vu;
        ddown[(size_t)a * C + c] = vd;
    }
}

/* du[t] += sum over the token's micro slots of cd down[agent], in slot order; one block per
 * token. */
__global__ void k_micro_du(float *du, const float *cd, const float *mic_down, const int32_t *mini,
                           const int32_t *micro, mdims_t d) {
    const int t = blockIdx.x, C = d.C;
    for (int c = threadIdx.x; c < C; c += blockDim.x) {
        float acc = du[(size_t)t * C + c];
        for (int m = 0; m < d.KM; m++) {
            const size_t s = (size_t)t * d.KM + m;
            const int j = mini[s];
            for (int i = 0; i < d.KN; i++) {
                const size_t ms = s * d.KN + i, agent = (size_t)j * d.N + micro[ms];
                acc += cd[ms] * mic_down[agent * C + c];
            }
        }
        du[(size_t)t * C + c] = acc;
    }
}

/* du[t] += sum_q g[row[t*per + q]] over q < per, in q order; one block per token. */
__global__ void k_token_gather_add(float *du, const float *g, const int *row, int per, int C) {
    const int t = blockIdx.x;
    for (int c = threadIdx.x; c < C; c += blockDim.x) {
        float acc = du[(size_t)t * C + c];
        for (int q = 0; q < per; q++)
            acc += g[(size_t)row[(size_t)t * per + q] * C + c];
        du[(size_t)t * C + c] = acc;
    }
}

/* b_k += rate * sign(total - n load_k) per router (one thread each, moe_bias_update). */
__global__ void k_bias_update(float *gate, float *router, float *micro,
                              const unsigned long long *load, int M, int E, int N, float rate) {
    const int r = blockIdx.x * blockDim.x + threadIdx.x;
    if (r >= 1 + 2 * M)
        return;
    float *b;
    const unsigned long long *l;
    int n;
    if (r == 0) {
        b = gate;
        l = load;
        n = M;
    } else if ((r - 1) % 2 == 0) {
        const int j = (r - 1) / 2;
        b = router + (size_t)j * E;
        l = load + M + (size_t)j * E;
        n = E;
    } else {
        const int j = (r - 1) / 2;
        b = micro + (size_t)j * N;
        l = load + M + (size_t)M * E + (size_t)j * N;
        n = N;
    }
    long long total = 0;
    for (int k = 0; k < n; k++)
        total += (long long)l[k];
    for (int k = 0; k < n; k++) {
        const long long diff = total - (long long)n * (long long)l[k];
        b[k] += diff > 0 ? rate : diff < 0 ? -rate : 0.0f;
    }
}

unsigned grid_for(size_t n, int tpb) {
    size_t b = (n + (size_t)tpb - 1) / (size_t)tpb;
    if (b < 1)
        b = 1;
    return (unsigned)(b > 65535u * 32u ? 65535u * 32u : b);
}

} /* namespace */

/* ---- the object ---- */

struct cuda_moe {
    moe_dims_t d;
    int max_BT, BT;
    cuda_dtype_t dt;
    size_t bytes;
    /* forward state (device) */
    float *ov_pre, *ov_act;   /* [BT, OH] */
    void *ov_act_lp, *u_lp;   /* [BT, OH], [BT, C] in dt (F16/BF16 layers) */
    float *gate_logits;       /* [BT, M] */
    float *gate_w;            /* [S] */
    int32_t *mini;            /* [S]     route, slot order */
    int32_t *expert;          /* [S, KE] */
    int32_t *micro;           /* [S, KN] */
    int *mini_slot;           /* [S] slot of each grouped row */
    int *slot_row;            /* [S] grouped row of each slot */
    float *r_logits;          /* [S, E] grouped rows */
    float *m_logits;          /* [S, N] grouped rows */
    float *r_w, *m_w, *m_s;   /* [S, KE], [S, KN], [S, KN] slot order */
    int *exp_slot;            /* [SE] expert slot of each grouped expert row */
    int *exp_row;             /* [SE] grouped expert row of each expert slot */
    float *e_pre;             /* [SE, EH] grouped expert rows */
    float *e_out;             /* [SE, C] grouped expert rows */
    float *mini_out;          /* [S, C] */
    int *cnt;                 /* [M + M*E + M*N] selection counts of the forward */
    float *f;                 /* [M + M*E + M*N] balance shares */
    float *Psum;              /* [M + M*E + M*N] sums of router probabilities */
    float *zsum, *bal, *zr;   /* [1 + 2M] per router */
    unsigned long long *mism; /* mismatches of the forward */
    int32_t *rep;             /* replay upload: mini [S], expert [SE], micro [SN] */
    /* host mirrors */
    int *h_cnt;   /* [M + M*E] gate and expert-router counts */
    int *h_mioff; /* [M + 1] */
    int *h_exoff; /* [M*E + 1] */
    float *h_aux; /* [2 (1 + 2M)] bal, z */
    /* scratch (device) */
    float *ones;    /* [max(S, SE)] */
    float *lse2;    /* [max(BT, S)] */
    float *probs;   /* [max(BT*M, S*N, S*E)] router probabilities, then backward dm */
    float *dr;      /* [S, E] */
    float *dgl;     /* [BT, M] */
    float *gxf;     /* [S, C] gathered u rows (FP32 router GEMMs) */
    void *gx;       /* [SE, C] dt gathered expert input rows */
    void *gh;       /* [SE, max(EH, OH)... ] dt hidden activations */
    void *gy;       /* [max(SE, BT), C] dt upstream gradients */
    float *dh;      /* [max(SE*EH, BT*OH)] hidden gradients */
    void *dh_lp;    /* same size, dt */
    float *dmini;   /* [S, C] */
    float *de_out;  /* [SE, C] grouped */
    float *gz;      /* [max(S, SE), C] gradients of gathered rows */
    float *cu, *cd; /* [SN] */
    int *keys, *keys_sorted, *ids, *order; /* [max(S, SE, SN)] sort buffers */
    int *moff;                             /* [M*N] micro-agent offsets */
    void *cub_tmp;
    size_t cub_bytes;
};

namespace {

size_t cnt_len(const moe_dims_t *d) {
    return (size_t)d->M + (size_t)d->M * d->E + (size_t)d->M * d->N;
}

/* Bits of keys in [0, n). */
int key_bits(int n) {
    int b = 1;
    while ((1 << b) < n)
        b++;
    return b;
}

size_t maxz(size_t a, size_t b) {
    return a > b ? a : b;
}

/* dt copy of a FP32 device array for the GEMMs of F16/BF16 layers; the array itself in F32. */
const void *as_dt(cuda_moe_t *m, void *lp, const float *src, size_t n, cudaStream_t s) {
    if (m->dt == CUDA_DT_F32)
        return src;
    cuda_convert(lp, m->dt, src, CUDA_DT_F32, n, s);
    return lp;
}

/* Element offset of expert g's matrix of `per` elements in a [M*E, per] tensor of type dt. */
const void *expert_w(const void *base, cuda_dtype_t dt, size_t g, size_t per) {
    return (const char *)base + g * per * cuda_dtype_size(dt);
}

const void *lin_w(const cuda_moe_t *m, const float *w32, const void *wlp) {
    return m->dt == CUDA_DT_F32 ? (const void *)w32 : wlp;
}

/* Stable sort of ids 0..n-1 by key[0..n) (keys in [0, nkeys)) into order. */
void sort_ids(cuda_moe_t *m, int n, int nkeys, cudaStream_t s) {
    k_iota<<<grid_for((size_t)n, TPB), TPB, 0, s>>>(m->ids, n);
    CUDA_LAUNCH_CHECK();
    size_t bytes = m->cub_bytes;
    CUDA_CHECK(cub::DeviceRadixSort::SortPairs(m->cub_tmp, bytes, m->keys, m->keys_sorted, m->ids,
                                               m->order, n, 0, key_bits(nkeys), s));
}

unsigned rows_grid(int R) {
    return (unsigned)((R + WPB - 1) / WPB);
}

} /* namespace */

extern "C" cuda_moe_t *cuda_moe_new(const moe_dims_t *d, int max_BT, cuda_dtype_t dt, qerr_t *err) {
    if (!(d->C >= 1 && d->OH >= 1 && d->EH >= 1 && d->KM >= 1 && d->KM <= d->M && d->KE >= 1 &&
          d->KE <= d->E && d->KN >= 1 && d->KN <= d->N && d->KM <= KMAX && d->KE <= KMAX &&
          d->KN <= KMAX && max_BT >= 1 && (unsigned)dt < CUDA_DT_COUNT)) {
        qerr_set(err, QERR_RANGE,
                 "cuda_moe: sizes (width %d, k %d/%d/%d of %d/%d/%d, %d tokens, dtype %d) out "
                 "of range",
                 d->C, d->KM, d->KE, d->KN, d->M, d->E, d->N, max_BT, (int)dt);
        return NULL;
    }
    cuda_moe_t *m = (cuda_moe_t *)calloc(1, sizeof *m);
    if (!m) {
        qerr_set(err, QERR_NOMEM, "cuda_moe: out of host memory");
        return NULL;
    }
    m->d = *d;
    m->max_BT = max_BT;
    m->dt = dt;
    const size_t BT = (size_t)max_BT, C = (size_t)d->C, M = (size_t)d->M, E = (size_t)d->E,
                 N = (size_t)d->N, OH = (size_t)d->OH, EH = (size_t)d->EH;
    const size_t S = BT * d->KM, SE = S * d->KE, SN = S * d->KN, R = 1 + 2 * M;
    const size_t es = cuda_dtype_size(dt), nc = cnt_len(d);
    const size_t smax = maxz(maxz(S, SE), SN);
    int ok = 1;
    qerr_t e2;
    auto dev = [&](size_t bytes) -> void * {
        if (!ok)
            return NULL;
        void *p = cuda_buf_alloc(bytes ? bytes : 1, &e2);
        if (!p)
            ok = 0;
        else
            m->bytes += bytes;
        return p;
    };
    m->ov_pre = (float *)dev(BT * OH * 4);
    m->ov_act = (float *)dev(BT * OH * 4);
    m->gate_logits = (float *)dev(BT * M * 4);
    m->gate_w = (float *)dev(S * 4);
    m->mini = (int32_t *)dev(S * 4);
    m->expert = (int32_t *)dev(SE * 4);
    m->micro = (int32_t *)dev(SN * 4);
    m->mini_slot = (int *)dev(S * 4);
    m->slot_row = (int *)dev(S * 4);
    m->r_logits = (float *)dev(S * E * 4);
    m->m_logits = (float *)dev(S * N * 4);
    m->r_w = (float *)dev(SE * 4);
    m->m_w = (float *)dev(SN * 4);
    m->m_s = (float *)dev(SN * 4);
    m->exp_slot = (int *)dev(SE * 4);
    m->exp_row = (int *)dev(SE * 4);
    m->e_pre = (float *)dev(SE * EH * 4);
    m->e_out = (float *)dev(SE * C * 4);
    m->mini_out = (float *)dev(S * C * 4);
    m->cnt = (int *)dev(nc * 4);
    m->f = (float *)dev(nc * 4);
    m->Psum = (float *)dev(nc * 4);
    m->zsum = (float *)dev(R * 4);
    m->bal = (float *)dev(R * 4);
    m->zr = (float *)dev(R * 4);
    m->mism = (unsigned long long *)dev(8);
    m->rep = (int32_t *)dev((S + SE + SN) * 4);
    m->ones = (float *)dev(maxz(S, SE) * 4);
    m->lse2 = (float *)dev(maxz(BT, S) * 4);
    m->probs = (float *)dev(maxz(maxz(BT * M, S * N), S * E) * 4);
    m->dr = (float *)dev(S * E * 4);
    m->dgl = (float *)dev(BT * M * 4);
    m->gxf = (float *)dev(S * C * 4);
    m->gx = dev(SE * C * es);
    m->gh = dev(maxz(SE * EH, BT * OH) * es);
    m->gy = dev(maxz(SE, BT) * C * es);
    m->dh = (float *)dev(maxz(SE * EH, BT * OH) * 4);
    m->dh_lp = dev(maxz(SE * EH, BT * OH) * es);
    m->dmini = (float *)dev(S * C * 4);
    m->de_out = (float *)dev(SE * C * 4);
    m->gz = (float *)dev(maxz(S, SE) * C * 4);
    m->cu = (float *)dev(SN * 4);
    m->cd = (float *)dev(SN * 4);
    m->keys = (int *)dev(smax * 4);
    m->keys_sorted = (int *)dev(smax * 4);
    m->ids = (int *)dev(smax * 4);
    m->order = (int *)dev(smax * 4);
    m->moff = (int *)dev(M * N * 4);
    if (dt != CUDA_DT_F32) {
        m->ov_act_lp = dev(BT * OH * es);
        m->u_lp = dev(BT * C * es);
    }
    if (ok) {
        /* CUB's temporary storage for the largest sort and the micro-offset scan. */
        size_t b1 = 0, b2 = 0;
        const int nk = (int)maxz(maxz(M, M * E), M * N);
        if (cub::DeviceRadixSort::SortPairs(nullptr, b1, m->keys, m->keys_sorted, m->ids, m->order,
                                            (int)smax, 0, key_bits(nk)) != cudaSuccess ||
            cub::DeviceScan::ExclusiveSum(nullptr, b2, m->cnt, m->moff, (int)(M * N)) !=
                cudaSuccess)
            ok = 0;
        m->cub_bytes = maxz(b1, b2);
        m->cub_tmp = dev(m->cub_bytes);
    }
    if (ok) {
        k_fill_f<<<grid_for(maxz(S, SE), TPB), TPB>>>(m->ones, 1.0f, maxz(S, SE));
        if (cudaGetLastError() != cudaSuccess || cudaDeviceSynchronize() != cudaSuccess)
            ok = 0;
    }
    m->h_cnt = (int *)calloc(M + M * E, sizeof(int));
    m->h_mioff = (int *)calloc(M + 1, sizeof(int));
    m->h_exoff = (int *)calloc(M * E + 1, sizeof(int));
    m->h_aux = (float *)calloc(2 * R, sizeof(float));
    if (!ok || !m->h_cnt || !m->h_mioff || !m->h_exoff || !m->h_aux) {
        cuda_moe_destroy(&m);
        qerr_set(err, QERR_NOMEM, "cuda_moe: out of memory for a layer of %d tokens", max_BT);
        return NULL;
    }
    return m;
}

extern "C" void cuda_moe_destroy(cuda_moe_t **pm) {
    cuda_moe_t *m = pm ? *pm : NULL;
    if (!m)
        return;
    void **bufs[] = {(void **)&m->ov_pre,
                     (void **)&m->ov_act,
                     &m->ov_act_lp,
                     &m->u_lp,
                     (void **)&m->gate_logits,
                     (void **)&m->gate_w,
                     (void **)&m->mini,
                     (void **)&m->expert,
                     (void **)&m->micro,
                     (void **)&m->mini_slot,
                     (void **)&m->slot_row,
                     (void **)&m->r_logits,
                     (void **)&m->m_logits,
                     (void **)&m->r_w,
                     (void **)&m->m_w,
                     (void **)&m->m_s,
                     (void **)&m->exp_slot,
                     (void **)&m->exp_row,
                     (void **)&m->e_pre,
                     (void **)&m->e_out,
                     (void **)&m->mini_out,
                     (void **)&m->cnt,
                     (void **)&m->f,
                     (void **)&m->Psum,
                     (void **)&m->zsum,
                     (void **)&m->bal,
                     (void **)&m->zr,
                     (void **)&m->mism,
                     (void **)&m->rep,
                     (void **)&m->ones,
                     (void **)&m->lse2,
                     (void **)&m->probs,
                     (void **)&m->dr,
                     (void **)&m->dgl,
                     (void **)&m->gxf,
                     &m->gx,
                     &m->gh,
                     &m->gy,
                     (void **)&m->dh,
                     &m->dh_lp,
                     (void **)&m->dmini,
                     (void **)&m->de_out,
                     (void **)&m->gz,
                     (void **)&m->cu,
                     (void **)&m->cd,
                     (void **)&m->keys,
                     (void **)&m->keys_sorted,
                     (void **)&m->ids,
                     (void **)&m->order,
                     (void **)&m->moff,
                     &m->cub_tmp};
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++)
        cuda_buf_free(bufs[i]);
    free(m->h_cnt);
    free(m->h_mioff);
    free(m->h_exoff);
    free(m->h_aux);
    free(m);
    *pm = NULL;
}

extern "C" size_t cuda_moe_bytes(const cuda_moe_t *m) {
    return m->bytes;
}

extern "C" size_t cuda_moe_load_len(const moe_dims_t *d) {
    return cnt_len(d);
}

extern "C" int cuda_moe_load_download(moe_load_t *host, const unsigned long long *load,
                                      cudaStream_t s, qerr_t *err) {
    const size_t M = (size_t)host->M, E = (size_t)host->E, N = (size_t)host->N;
    static_assert(sizeof(unsigned long long) == sizeof(int64_t), "64-bit counters");
    if (cuda_buf_download(host->gate, load, M * 8, s, err) ||
        cuda_buf_download(host->router, load + M, M * E * 8, s, err) ||
        cuda_buf_download(host->micro, load + M + M * E, M * N * 8, s, err))
        return -1;
    CUDA_TRY(err, cudaStreamSynchronize(s));
    return 0;
}

extern "C" void cuda_moe_bias_update(const moe_bias_t *bias, const unsigned long long *load,
                                     const moe_dims_t *d, float rate, cudaStream_t s) {
    const int R = 1 + 2 * d->M;
    k_bias_update<<<(R + 63) / 64, 64, 0, s>>>(bias->gate, bias->router, bias->micro, load, d->M,
                                               d->E, d->N, rate);
    CUDA_LAUNCH_CHECK();
}

extern "C" int cuda_moe_forward(cuda_moe_t *m, cuda_gemm_t *g, float *y, moe_aux_t *aux,
                                unsigned long long *load, const float *u, const moe_params_t *p,
                                const cuda_moe_lowp_t *lp, const moe_bias_t *bias,
                                const moe_route_t *replay, int BT, cudaStream_t s, qerr_t *err) {
    const moe_dims_t *d = &m->d;
    memset(aux, 0, sizeof *aux);
    if (BT < 0 || BT > m->max_BT)
        return qerr_set(err, QERR_RANGE, "cuda_moe_forward: %d tokens outside [0, %d]", BT,
                        m->max_BT);
    if (replay && moe_route_validate(replay, d, BT, err))
        return -1;
    Q_ASSERT(m->dt == CUDA_DT_F32 || lp);
    m->BT = BT;
    if (BT == 0)
        return 0;
    const int C = d->C, OH = d->OH, M = d->M, KM = d->KM, E = d->E, KE = d->KE, EH = d->EH,
              N = d->N, KN = d->KN, S = BT * KM, SE = S * KE, SN = S * KN, R = 1 + 2 * M;
    const cuda_dtype_t dt = m->dt;
    const int idt = (int)dt;
    const mdims_t md = {C, M, KM, E, KE, N, KN};
    const routers_t rg = {M, E, N, KM, KE, KN, BT};
    const size_t nc = cnt_len(d);

    /* Overseer shared expert: y = W2s SiLU(W1s u). */
    const void *u_dt = as_dt(m, m->u_lp, u, (size_t)BT * C, s);
    cuda_gemm_run(g, s, GEMM_N, GEMM_T, BT, OH, C, 1.0f, u_dt, C,
                  lin_w(m, p->ov_w1, lp ? lp->ov_w1 : 0), C, 0.0f, m->ov_pre, OH, dt, CUDA_DT_F32);
    k_silu_fwd<<<grid_for((size_t)BT * OH, TPB), TPB, 0, s>>>(m->ov_act, m->ov_act_lp, m->ov_pre,
                                                              (size_t)BT * OH, idt);
    CUDA_LAUNCH_CHECK();
    cuda_gemm_run(g, s, GEMM_N, GEMM_T, BT, C, OH, 1.0f,
                  dt == CUDA_DT_F32 ? (const void *)m->ov_act : m->ov_act_lp, OH,
                  lin_w(m, p->ov_w2, lp ? lp->ov_w2 : 0), OH, 0.0f, y, C, dt, CUDA_DT_F32);

    /* Primary gate (FP32 logits). */
    CUDA_CHECK(cudaMemsetAsync(m->cnt, 0, nc * sizeof(int), s));
    CUDA_CHECK(cudaMemsetAsync(m->mism, 0, sizeof *m->mism, s));
    int32_t *rep_mini = NULL, *rep_exp = NULL, *rep_mic = NULL;
    if (replay) {
        rep_mini = m->rep;
        rep_exp = rep_mini + S;
        rep_mic = rep_exp + SE;
        if (cuda_buf_upload(rep_mini, replay->mini, (size_t)S * 4, s, err) ||
            cuda_buf_upload(rep_exp, replay->expert, (size_t)SE * 4, s, err) ||
            cuda_buf_upload(rep_mic, replay->micro, (size_t)SN * 4, s, err))
            return -1;
    }
    cuda_gemm_run(g, s, GEMM_N, GEMM_T, BT, M, C, 1.0f, u, C, p->gate, C, 0.0f, m->gate_logits, M,
                  CUDA_DT_F32, CUDA_DT_F32);
    k_topk<<<rows_grid(BT), WPB * 32, 0, s>>>(m->mini, m->gate_w, m->cnt, m->mism, m->gate_logits,
                                              bias ? bias->gate : NULL, rep_mini, NULL, NULL, BT, M,
                                              KM);
    CUDA_LAUNCH_CHECK();
    k_rowstats<<<rows_grid(BT), WPB * 32, 0, s>>>(m->probs, m->lse2, m->gate_logits, BT, M);
    CUDA_LAUNCH_CHECK();
    cuda_gemm_run(g, s, GEMM_N, GEMM_N, 1, M, BT, 1.0f, m->ones, BT, m->probs, M, 0.0f, m->Psum, M,
                  CUDA_DT_F32, CUDA_DT_F32);
    cuda_gemm_run(g, s, GEMM_N, GEMM_N, 1, 1, BT, 1.0f, m->ones, BT, m->lse2, 1, 0.0f, m->zsum, 1,
                  CUDA_DT_F32, CUDA_DT_F32);

    /* Slots grouped by mini (stable), their offsets on the host. */
    k_key_copy<<<grid_for((size_t)S, TPB), TPB, 0, s>>>(m->keys, m->mini, S);
    CUDA_LAUNCH_CHECK();
    sort_ids(m, S, M, s);
    CUDA_CHECK(cudaMemcpyAsync(m->mini_slot, m->order, (size_t)S * 4, cudaMemcpyDeviceToDevice, s));
    k_inverse<<<grid_for((size_t)S, TPB), TPB, 0, s>>>(m->slot_row, m->mini_slot, S);
    CUDA_LAUNCH_CHECK();
    CUDA_TRY(err, cudaMemcpyAsync(m->h_cnt, m->cnt, (size_t)M * 4, cudaMemcpyDeviceToHost, s));
    CUDA_TRY(err, cudaStreamSynchronize(s));
    int *mo = m->h_mioff;
    mo[0] = 0;
    for (int j = 0; j < M; j++)
        mo[j + 1] = mo[j] + m->h_cnt[j];
    Q_ASSERT(mo[M] == S);

    /* Mini routers on their grouped rows (FP32). */
    k_gather<<<grid_for((size_t)S * C, TPB), TPB, 0, s>>>(m->gxf, CUDA_DT_F32, u, m->mini_slot, KM,
                                                          S, C);
    CUDA_LAUNCH_CHECK();
    for (int j = 0; j < M; j++) {
        const int off = mo[j], n = mo[j + 1] - off;
        if (n == 0)
            continue;
        cuda_gemm_run(g, s, GEMM_N, GEMM_T, n, E, C, 1.0f, m->gxf + (size_t)off * C, C,
                      p->router + (size_t)j * E * C, C, 0.0f, m->r_logits + (size_t)off * E, E,
                      CUDA_DT_F32, CUDA_DT_F32);
        cuda_gemm_run(g, s, GEMM_N, GEMM_T, n, N, C, 1.0f, m->gxf + (size_t)off * C, C,
                      p->mic_router + (size_t)j * N * C, C, 0.0f, m->m_logits + (size_t)off * N, N,
                      CUDA_DT_F32, CUDA_DT_F32);
    }
    int *cnt_r = m->cnt + M, *cnt_m = m->cnt + M + (size_t)M * E;
    k_topk<<<rows_grid(S), WPB * 32, 0, s>>>(m->expert, m->r_w, cnt_r, m->mism, m->r_logits,
                                             bias ? bias->router : NULL, rep_exp, m->mini_slot,
                                             m->mini, S, E, KE);
    CUDA_LAUNCH_CHECK();
    k_topk<<<rows_grid(S), WPB * 32, 0, s>>>(m->micro, m->m_w, cnt_m, m->mism, m->m_logits,
                                             bias ? bias->micro : NULL, rep_mic, m->mini_slot,
                                             m->mini, S, N, KN);
    CUDA_LAUNCH_CHECK();
    /* Balance sums P and z sums of each mini's two routers. */
    float *lse2_r = m->lse2;
    k_rowstats<<<rows_grid(S), WPB * 32, 0, s>>>(m->probs, lse2_r, m->r_logits, S, E);
    CUDA_LAUNCH_CHECK();
    for (int j = 0; j < M; j++) {
        const int off = mo[j], n = mo[j + 1] - off;
        if (n == 0)
            continue;
        cuda_gemm_run(g, s, GEMM_N, GEMM_N, 1, E, n, 1.0f, m->ones, n, m->probs + (size_t)off * E,
                      E, 0.0f, m->Psum + M + (size_t)j * E, E, CUDA_DT_F32, CUDA_DT_F32);
        cuda_gemm_run(g, s, GEMM_N, GEMM_N, 1, 1, n, 1.0f, m->ones, n, lse2_r + off, 1, 0.0f,
                      m->zsum + 1 + 2 * j, 1, CUDA_DT_F32, CUDA_DT_F32);
    }
    k_rowstats<<<rows_grid(S), WPB * 32, 0, s>>>(m->probs, lse2_r, m->m_logits, S, N);
    CUDA_LAUNCH_CHECK();
    for (int j = 0; j < M; j++) {
        const int off = mo[j], n = mo[j + 1] - off;
        if (n == 0)
            continue;
        cuda_gemm_run(g, s, GEMM_N, GEMM_N, 1, N, n, 1.0f, m->ones, n, m->probs + (size_t)off * N,
                      N, 0.0f, m->Psum + M + (size_t)M * E + (size_t)j * N, N, CUDA_DT_F32,
                      CUDA_DT_F32);
        cuda_gemm_run(g, s, GEMM_N, GEMM_N, 1, 1, n, 1.0f, m->ones, n, lse2_r + off, 1, 0.0f,
                      m->zsum + 2 + 2 * j, 1, CUDA_DT_F32, CUDA_DT_F32);
    }
    k_router_finish<<<(R + 63) / 64, 64, 0, s>>>(m->bal, m->zr, m->f, m->Psum, m->zsum, m->cnt, rg);
    CUDA_LAUNCH_CHECK();

    /* Expert slots grouped by global expert (stable), offsets on the host. */
    k_key_global<<<grid_for((size_t)SE, TPB), TPB, 0, s>>>(m->keys, m->mini, m->expert, KE, E, SE);
    CUDA_LAUNCH_CHECK();
    sort_ids(m, SE, M * E, s);
    CUDA_CHECK(cudaMemcpyAsync(m->exp_slot, m->order, (size_t)SE * 4, cudaMemcpyDeviceToDevice, s));
    k_inverse<<<grid_for((size_t)SE, TPB), TPB, 0, s>>>(m->exp_row, m->exp_slot, SE);
    CUDA_LAUNCH_CHECK();
    CUDA_TRY(err,
             cudaMemcpyAsync(m->h_cnt + M, cnt_r, (size_t)M * E * 4, cudaMemcpyDeviceToHost, s));
    CUDA_TRY(err, cudaStreamSynchronize(s));
    int *xo = m->h_exoff;
    xo[0] = 0;
    for (int ge = 0; ge < M * E; ge++)
        xo[ge + 1] = xo[ge] + m->h_cnt[M + ge];
    Q_ASSERT(xo[M * E] == SE);

    /* Experts: W2 ReLU²(W1 x) per expert on its gathered rows. */
    k_gather<<<grid_for((size_t)SE * C, TPB), TPB, 0, s>>>(m->gx, idt, u, m->exp_slot, KE * KM, SE,
                                                           C);
    CUDA_LAUNCH_CHECK();
    const size_t es = cuda_dtype_size(dt);
    const void *w1 = lin_w(m, p->exp_w1, lp ? lp->exp_w1 : 0);
    const void *w2 = lin_w(m, p->exp_w2, lp ? lp->exp_w2 : 0);
    for (int ge = 0; ge < M * E; ge++) {
        const int off = xo[ge], n = xo[ge + 1] - off;
        if (n == 0)
            continue;
        cuda_gemm_run(g, s, GEMM_N, GEMM_T, n, EH, C, 1.0f,
                      (const char *)m->gx + (size_t)off * C * es, C,
                      expert_w(w1, dt, (size_t)ge, (size_t)EH * C), C, 0.0f,
                      m->e_pre + (size_t)off * EH, EH, dt, CUDA_DT_F32);
    }
    k_relu2<<<grid_for((size_t)SE * EH, TPB), TPB, 0, s>>>(m->gh, m->e_pre, (size_t)SE * EH, idt);
    CUDA_LAUNCH_CHECK();
    for (int ge = 0; ge < M * E; ge++) {
        const int off = xo[ge], n = xo[ge + 1] - off;
        if (n == 0)
            continue;
        cuda_gemm_run(g, s, GEMM_N, GEMM_T, n, C, EH, 1.0f,
                      (const char *)m->gh + (size_t)off * EH * es, EH,
                      expert_w(w2, dt, (size_t)ge, (size_t)C * EH), EH, 0.0f,
                      m->e_out + (size_t)off * C, C, dt, CUDA_DT_F32);
    }

    /* Micro agents, mini outputs, the weighted sum over the kept minis. */
    k_mini_out<<<S, SLOT_TPB, 0, s>>>(m->mini_out, m->m_s, u, p->mic_down, p->mic_up, m->mini,
                                      m->micro, m->m_w, m->r_w, m->e_out, m->exp_row, md);
    CUDA_LAUNCH_CHECK();
    k_combine<<<BT, SLOT_TPB, 0, s>>>(y, m->gate_w, m->mini_out, KM, C);
    CUDA_LAUNCH_CHECK();
    if (load) {
        k_add_load<<<grid_for(nc, TPB), TPB, 0, s>>>(load, m->cnt, (int)nc);
        CUDA_LAUNCH_CHECK();
    }

    /* The aux results, summed on the host in the CPU's order. */
    unsigned long long mism = 0;
    CUDA_TRY(err, cudaMemcpyAsync(m->h_aux, m->bal, (size_t)R * 4, cudaMemcpyDeviceToHost, s));
    CUDA_TRY(err, cudaMemcpyAsync(m->h_aux + R, m->zr, (size_t)R * 4, cudaMemcpyDeviceToHost, s));
    CUDA_TRY(err, cudaMemcpyAsync(&mism, m->mism, sizeof mism, cudaMemcpyDeviceToHost, s));
    CUDA_TRY(err, cudaStreamSynchronize(s));
    for (int r = 0; r < R; r++) {
        const int reached = r == 0 || m->h_cnt[(r - 1) / 2] > 0;
        if (!reached)
            continue;
        aux->balance += m->h_aux[r];
        aux->z += m->h_aux[R + r];
        aux->routers++;
    }
    aux->decisions = (long)BT + 2L * S;
    aux->mismatches = (long)mism;
    return 0;
}

extern "C" void cuda_moe_backward(cuda_moe_t *m, cuda_gemm_t *g, moe_params_t *dp, float *du,
                                  const float *dy, const float *u, const moe_params_t *p,
                                  const cuda_moe_lowp_t *lp, float dbalance, float dz,
                                  cudaStream_t s) {
    const moe_dims_t *d = &m->d;
    const int BT = m->BT;
    if (BT == 0)
        return;
    Q_ASSERT(m->dt == CUDA_DT_F32 || lp);
    const int C = d->C, OH = d->OH, M = d->M, KM = d->KM, E = d->E, KE = d->KE, EH = d->EH,
              N = d->N, KN = d->KN, S = BT * KM, SE = S * KE, SN = S * KN;
    const cuda_dtype_t dt = m->dt;
    const int idt = (int)dt;
    const size_t es = cuda_dtype_size(dt);
    const mdims_t md = {C, M, KM, E, KE, N, KN};
    const int *mo = m->h_mioff, *xo = m->h_exoff;
    const bool lowp = dt != CUDA_DT_F32;

    /* Overseer: gh = dy W2s, dW2s += dy^T act, gh *= SiLU'(pre), dW1s += gh^T u,
     * du += gh W1s. */
    const void *dy_dt = as_dt(m, m->gy, dy, (size_t)BT * C, s);
    const void *w1s = lin_w(m, p->ov_w1, lp ? lp->ov_w1 : 0);
    const void *w2s = lin_w(m, p->ov_w2, lp ? lp->ov_w2 : 0);
    const void *act_dt = lowp ? (const void *)m->ov_act_lp : m->ov_act;
    const void *u_dt = lowp ? (const void *)m->u_lp : u;
    cuda_gemm_run(g, s, GEMM_N, GEMM_N, BT, OH, C, 1.0f, dy_dt, C, w2s, OH, 0.0f, m->dh, OH, dt,
                  CUDA_DT_F32);
    cuda_gemm_run(g, s, GEMM_T, GEMM_N, C, OH, BT, 1.0f, dy_dt, C, act_dt, OH, 1.0f, dp->ov_w2, OH,
                  dt, CUDA_DT_F32);
    k_silu_bwd<<<grid_for((size_t)BT * OH, TPB), TPB, 0, s>>>(m->dh, lowp ? m->dh_lp : NULL,
                                                              m->ov_pre, (size_t)BT * OH, idt);
    CUDA_LAUNCH_CHECK();
    const void *dh_dt = lowp ? (const void *)m->dh_lp : m->dh;
    cuda_gemm_run(g, s, GEMM_T, GEMM_N, OH, C, BT, 1.0f, dh_dt, OH, u_dt, C, 1.0f, dp->ov_w1, C, dt,
                  CUDA_DT_F32);
    cuda_gemm_run(g, s, GEMM_N, GEMM_N, BT, C, OH, 1.0f, dh_dt, OH, w1s, C, 1.0f, du, C, dt,
                  CUDA_DT_F32);

    /* Gate: dmini, dgl; balance and z; dGate += dgl^T u; du += dgl Wg (FP32). */
    k_gate_bwd<<<BT, SLOT_TPB, 0, s>>>(m->dmini, m->dgl, dy, m->gate_w, m->mini_out, m->mini, M, KM,
                                       C);
    CUDA_LAUNCH_CHECK();
    k_router_loss_bwd<<<rows_grid(BT), WPB * 32, 0, s>>>(m->dgl, m->gate_logits, m->f, NULL, NULL,
                                                         NULL, BT, M, dbalance, dz);
    CUDA_LAUNCH_CHECK();
    cuda_gemm_run(g, s, GEMM_T, GEMM_N, M, C, BT, 1.0f, m->dgl, M, u, C, 1.0f, dp->gate, C,
                  CUDA_DT_F32, CUDA_DT_F32);
    cuda_gemm_run(g, s, GEMM_N, GEMM_N, BT, C, M, 1.0f, m->dgl, M, p->gate, C, 1.0f, du, C,
                  CUDA_DT_F32, CUDA_DT_F32);

    /* Per slot: expert gate weights, micro agents and their gate weights. */
    float *dm = m->probs; /* the forward's probability scratch, [S, N] */
    CUDA_CHECK(cudaMemsetAsync(m->dr, 0, (size_t)S * E * 4, s));
    CUDA_CHECK(cudaMemsetAsync(dm, 0, (size_t)S * N * 4, s));
    k_slot_bwd<<<S, SLOT_TPB, 0, s>>>(m->de_out, m->dr, dm, m->cu, m->cd, m->dmini, m->e_out,
                                      m->exp_row, m->r_w, m->expert, m->mini, m->micro, m->m_s,
                                      m->m_w, p->mic_up, m->slot_row, md);
    CUDA_LAUNCH_CHECK();
    /* Micro-agent vectors: contributions grouped by agent, in slot order. */
    k_key_global<<<grid_for((size_t)SN, TPB), TPB, 0, s>>>(m->keys, m->mini, m->micro, KN, N, SN);
    CUDA_LAUNCH_CHECK();
    sort_ids(m, SN, M * N, s);
    {
        size_t bytes = m->cub_bytes;
        CUDA_CHECK(cub::DeviceScan::ExclusiveSum(m->cub_tmp, bytes, m->cnt + M + (size_t)M * E,
                                                 m->moff, M * N, s));
    }
    k_micro_param_bwd<<<M * N, SLOT_TPB, 0, s>>>(dp->mic_up, dp->mic_down, m->cu, m->cd, m->dmini,
                                                 u, m->order, m->moff, M * N, SN, KN, KM, C);
    CUDA_LAUNCH_CHECK();
    k_micro_du<<<BT, SLOT_TPB, 0, s>>>(du, m->cd, p->mic_down, m->mini, m->micro, md);
    CUDA_LAUNCH_CHECK();

    /* Routers of each mini on its grouped rows. */
    k_router_loss_bwd<<<rows_grid(S), WPB * 32, 0, s>>>(m->dr, m->r_logits, m->f + M, m->mini_slot,
                                                        m->mini, m->cnt, S, E, dbalance, dz);
    CUDA_LAUNCH_CHECK();
    k_router_loss_bwd<<<rows_grid(S), WPB * 32, 0, s>>>(dm, m->m_logits, m->f + M + (size_t)M * E,
                                                        m->mini_slot, m->mini, m->cnt, S, N,
                                                        dbalance, dz);
    CUDA_LAUNCH_CHECK();
    k_gather<<<grid_for((size_t)S * C, TPB), TPB, 0, s>>>(m->gxf, CUDA_DT_F32, u, m->mini_slot, KM,
                                                          S, C);
    CUDA_LAUNCH_CHECK();
    for (int j = 0; j < M; j++) {
        const int off = mo[j], n = mo[j + 1] - off;
        if (n == 0)
            continue;
        const float *gxj = m->gxf + (size_t)off * C;
        float *drj = m->dr + (size_t)off * E, *dmj = dm + (size_t)off * N,
              *gzj = m->gz + (size_t)off * C;
        cuda_gemm_run(g, s, GEMM_T, GEMM_N, E, C, n, 1.0f, drj, E, gxj, C, 1.0f,
                      dp->router + (size_t)j * E * C, C, CUDA_DT_F32, CUDA_DT_F32);
        cuda_gemm_run(g, s, GEMM_T, GEMM_N, N, C, n, 1.0f, dmj, N, gxj, C, 1.0f,
                      dp->mic_router + (size_t)j * N * C, C, CUDA_DT_F32, CUDA_DT_F32);
        cuda_gemm_run(g, s, GEMM_N, GEMM_N, n, C, E, 1.0f, drj, E, p->router + (size_t)j * E * C, C,
                      0.0f, gzj, C, CUDA_DT_F32, CUDA_DT_F32);
        cuda_gemm_run(g, s, GEMM_N, GEMM_N, n, C, N, 1.0f, dmj, N,
                      p->mic_router + (size_t)j * N * C, C, 1.0f, gzj, C, CUDA_DT_F32, CUDA_DT_F32);
    }
    k_token_gather_add<<<BT, SLOT_TPB, 0, s>>>(du, m->gz, m->slot_row, KM, C);
    CUDA_LAUNCH_CHECK();

    /* Experts, grouped as in the forward. */
    const void *gy_dt = as_dt(m, m->gy, m->de_out, (size_t)SE * C, s);
    k_relu2<<<grid_for((size_t)SE * EH, TPB), TPB, 0, s>>>(m->gh, m->e_pre, (size_t)SE * EH, idt);
    CUDA_LAUNCH_CHECK();
    k_gather<<<grid_for((size_t)SE * C, TPB), TPB, 0, s>>>(m->gx, idt, u, m->exp_slot, KE * KM, SE,
                                                           C);
    CUDA_LAUNCH_CHECK();
    const void *w1 = lin_w(m, p->exp_w1, lp ? lp->exp_w1 : 0);
    const void *w2 = lin_w(m, p->exp_w2, lp ? lp->exp_w2 : 0);
    for (int ge = 0; ge < M * E; ge++) {
        const int off = xo[ge], n = xo[ge + 1] - off;
        if (n == 0)
            continue;
        const void *gyg = (const char *)gy_dt + (size_t)off * C * es;
        cuda_gemm_run(g, s, GEMM_T, GEMM_N, C, EH, n, 1.0f, gyg, C,
                      (const char *)m->gh + (size_t)off * EH * es, EH, 1.0f,
                      dp->exp_w2 + (size_t)ge * C * EH, EH, dt, CUDA_DT_F32);
        cuda_gemm_run(g, s, GEMM_N, GEMM_N, n, EH, C, 1.0f, gyg, C,
                      expert_w(w2, dt, (size_t)ge, (size_t)C * EH), EH, 0.0f,
                      m->dh + (size_t)off * EH, EH, dt, CUDA_DT_F32);
    }
    k_relu2_bwd<<<grid_for((size_t)SE * EH, TPB), TPB, 0, s>>>(m->dh, lowp ? m->dh_lp : NULL,
                                                               m->e_pre, (size_t)SE * EH, idt);
    CUDA_LAUNCH_CHECK();
    const void *dhx = lowp ? (const void *)m->dh_lp : m->dh;
    for (int ge = 0; ge < M * E; ge++) {
        const int off = xo[ge], n = xo[ge + 1] - off;
        if (n == 0)
            continue;
        const void *dhg = (const char *)dhx + (size_t)off * EH * es;
        cuda_gemm_run(g, s, GEMM_T, GEMM_N, EH, C, n, 1.0f, dhg, EH,
                      (const char *)m->gx + (size_t)off * C * es, C, 1.0f,
                      dp->exp_w1 + (size_t)ge * EH * C, C, dt, CUDA_DT_F32);
        cuda_gemm_run(g, s, GEMM_N, GEMM_N, n, C, EH, 1.0f, dhg, EH,
                      expert_w(w1, dt, (size_t)ge, (size_t)EH * C), C, 0.0f,
                      m->gz + (size_t)off * C, C, dt, CUDA_DT_F32);
    }
    k_token_gather_add<<<BT, SLOT_TPB, 0, s>>>(du, m->gz, m->exp_row, KM * KE, C);
    CUDA_LAUNCH_CHECK();
}

extern "C" int cuda_moe_route_download(const cuda_moe_t *m, moe_route_t *out, cudaStream_t s,
                                       qerr_t *err) {
    const moe_dims_t *d = &m->d;
    if (out->max_BT < m->BT || out->KM != d->KM || out->KE != d->KE || out->KN != d->KN)
        return qerr_set(err, QERR_RANGE,
                        "cuda_moe_route_download: record for %d tokens (top-k %d/%d/%d) cannot "
                        "hold %d tokens (top-k %d/%d/%d)",
                        out->max_BT, out->KM, out->KE, out->KN, m->BT, d->KM, d->KE, d->KN);
    const size_t S = (size_t)m->BT * d->KM;
    out->BT = m->BT;
    if (S == 0)
        return 0;
    if (cuda_buf_download(out->mini, m->mini, S * 4, s, err) ||
        cuda_buf_download(out->expert, m->expert, S * d->KE * 4, s, err) ||
        cuda_buf_download(out->micro, m->micro, S * d->KN * 4, s, err))
        return -1;
    CUDA_TRY(err, cudaStreamSynchronize(s));
    return 0;
}
