#include "layers.h"

#include <math.h>
#include <string.h>

#include "error.h"
#include "gemm.h"

#ifdef _OPENMP
#include <omp.h>
#define OMP_PRAGMA(x) _Pragma(#x)
#else
#define OMP_PRAGMA(x)
#endif

/* Below this many elements (a pass of a few hundred microseconds) a loop runs on one thread:
 * each parallel loop is a fork-join, which on a loaded machine costs a scheduler time slice
 * while the other threads spin (see GEMM_PARALLEL_MIN_WORK in gemm.c). */
#define LAYERS_PARALLEL_MIN (1 << 20)

static int par_ok(size_t work) {
#ifdef _OPENMP
    return work >= LAYERS_PARALLEL_MIN && !omp_in_parallel();
#else
    (void)work;
    return 0;
#endif
}

/* ---- Embedding ---- */

void embedding_forward(real *out, const int32_t *tokens, const real *wte, int BT, int C, int V) {
    for (int t = 0; t < BT; t++) {
        Q_ASSERT(tokens[t] >= 0 && tokens[t] < V);
        memcpy(out + (size_t)t * C, wte + (size_t)tokens[t] * C, sizeof(real) * (size_t)C);
    }
}

void embedding_backward(real *dwte, const real *dout, const int32_t *tokens, int BT, int C, int V) {
    /* Sequential over t: repeated tokens add into the same row. */
    for (int t = 0; t < BT; t++) {
        Q_ASSERT(tokens[t] >= 0 && tokens[t] < V);
        real *d = dwte + (size_t)tokens[t] * C;
        const real *g = dout + (size_t)t * C;
        for (int c = 0; c < C; c++)
            d[c] += g[c];
    }
}

/* ---- RMSNorm ---- */

/* Running sums of the sum of squares: element c goes to lane c % RMS_LANES, then the lanes
 * are added by a fixed pairwise tree. The order depends on C only, so every caller (learner,
 * engine, any batch size or thread count) gets the same bits, and the lanes fill SIMD
 * registers where one running sum would be a chain of dependent adds (~4 cycles each). */
#define RMS_LANES 16

static real sum_squares(const real *x, int C) {
    real acc[RMS_LANES] = {0};
    int c = 0;
    for (; c + RMS_LANES <= C; c += RMS_LANES)
        for (int j = 0; j < RMS_LANES; j++)
            acc[j] += x[c + j] * x[c + j];
    for (int j = 0; c + j < C; j++)
        acc[j] += x[c + j] * x[c + j];
    for (int w = RMS_LANES / 2; w >= 1; w /= 2)
        for (int j = 0; j < w; j++)
            acc[j] += acc[j + w];
    return acc[0];
}

static void rmsnorm_row(real *o, real *rstd, const real *x, const real *weight, int C) {
    const real r = 1 / R_SQRT(sum_squares(x, C) / (real)C + (real)RMSNORM_EPS);
    for (int c = 0; c < C; c++)
        o[c] = weight[c] * (x[c] * r);
    *rstd = r;
}

void rmsnorm_forward(real *out, real *rstd, const real *inp, const real *weight, int BT, int C) {
    /* A branch rather than an `if` clause: an OpenMP region that runs on one thread still sets
     * up a team (allocations included), several microseconds per call for the engine's rows. */
    if (par_ok((size_t)BT * (size_t)C)) {
        OMP_PRAGMA(omp parallel for schedule(static))
        for (int t = 0; t < BT; t++)
            rmsnorm_row(out + (size_t)t * C, rstd + t, inp + (size_t)t * C, weight, C);
        return;
    }
    for (int t = 0; t < BT; t++)
        rmsnorm_row(out + (size_t)t * C, rstd + t, inp + (size_t)t * C, weight, C);
}

void rmsnorm_backward(real *dinp, real *dweight, const real *dout, const real *inp,
                      const real *weight, const real *rstd, int BT, int C) {
    /* y_i = g_i x_i r with r = (mean(x^2) + eps)^(-1/2), dr/dx_j = -r^3 x_j / C, so
     * dx_j = r (dy_j g_j - x_j r^2 / C * sum_i dy_i g_i x_i). */
    if (dinp) {
        const int par = par_ok((size_t)BT * (size_t)C);
        (void)par;
        OMP_PRAGMA(omp parallel for schedule(static) if (par))
        for (int t = 0; t < BT; t++) {
            const real *x = inp + (size_t)t * C, *dy = dout + (size_t)t * C;
            real *dx = dinp + (size_t)t * C;
            const real r = rstd[t];
            real dot = 0;
            for (int c = 0; c < C; c++)
                dot += dy[c] * weight[c] * x[c];
            const real k = r * r * dot / (real)C;
            for (int c = 0; c < C; c++)
                dx[c] += r * (dy[c] * weight[c] - x[c] * k);
        }
    }
    for (int t = 0; t < BT; t++) {
        const real *x = inp + (size_t)t * C, *dy = dout + (size_t)t * C;
        const real r = rstd[t];
        for (int c = 0; c < C; c++)
            dweight[c] += dy[c] * x[c] * r;
    }
}

/* ---- Linear ---- */

void linear_forward(real *out, const real *inp, const real *weight, const real *bias, int BT, int C,
                    int OC) {
    gemm(GEMM_N, GEMM_T, BT, OC, C, 1, inp, C, weight, C, 0, out, OC);
    if (bias)
        for (int t = 0; t < BT; t++)
            for (int o = 0; o < OC; o++)
                out[(size_t)t * OC + o] += bias[o];
}

void linear_backward(real *dinp, real *dweight, real *dbias, const real *dout, const real *inp,
                     const real *weight, int BT, int C, int OC) {
    if (dinp)
        gemm(GEMM_N, GEMM_N, BT, C, OC, 1, dout, OC, weight, C, 1, dinp, C);
    if (dweight)
        gemm(GEMM_T, GEMM_N, OC, C, BT, 1, dout, OC, inp, C, 1, dweight, C);
    if (dbias)
        for (int t = 0; t < BT; t++)
            for (int o = 0; o < OC; o++)
                dbias[o] += dout[(size_t)t * OC + o];
}

/* ---- Pointwise ---- */

void silu_forward(real *out, const real *inp, size_t N) {
    for (size_t i = 0; i < N; i++)
        out[i] = inp[i] / (1 + R_EXP(-inp[i]));
}

void silu_backward(real *dinp, const real *dout, const real *inp, size_t N) {
    for (size_t i = 0; i < N; i++) {
        const real s = 1 / (1 + R_EXP(-inp[i]));
        dinp[i] += dout[i] * s * (1 + inp[i] * (1 - s));
    }
}

void relu2_forward(real *out, const real *inp, size_t N) {
    for (size_t i = 0; i < N; i++) {
        const real r = real_keep_or_zero(inp[i], inp[i] > 0);
        out[i] = r * r;
    }
}

void relu2_backward(real *dinp, const real *dout, const real *inp, size_t N) {
    for (size_t i = 0; i < N; i++)
        dinp[i] += real_keep_or_zero(dout[i] * 2 * inp[i], inp[i] > 0);
}

void residual_forward(real *out, const real *inp1, const real *inp2, size_t N) {
    for (size_t i = 0; i < N; i++)
        out[i] = inp1[i] + inp2[i];
}

void residual_backward(real *dinp1, real *dinp2, const real *dout, size_t N) {
    for (size_t i = 0; i < N; i++) {
        if (dinp1)
            dinp1[i] += dout[i];
        if (dinp2)
            dinp2[i] += dout[i];
    }
}

/* Keep-scale of element i: 0 when dropped, 1 / (1 - p) when kept. Same draw as the i-th
 * rng_stream_uniform() of a copy of *rng. */
static real dropout_scale(const rng_stream_t *rng, size_t i, real p) {
    const uint64_t k[2] = {rng->key, rng->counter + (uint64_t)i};
    const double u = (double)(rng_hash(k, 2) >> 40) / 16777216.0;
    return u < (double)p ? 0 : 1 / (1 - p);
}

void dropout_forward(real *out, const real *inp, real p, int training, const rng_stream_t *rng,
                     size_t N) {
    Q_ASSERT(p >= 0 && p < 1);
    if (!training || p == 0) {
        if (out != inp)
            memcpy(out, inp, sizeof(real) * N);
        return;
    }
    for (size_t i = 0; i < N; i++)
        out[i] = inp[i] * dropout_scale(rng, i, p);
}

void dropout_backward(real *dinp, const real *dout, real p, int training, const rng_stream_t *rng,
                      size_t N) {
    Q_ASSERT(p >= 0 && p < 1);
    if (!training || p == 0) {
        for (size_t i = 0; i < N; i++)
            dinp[i] += dout[i];
        return;
    }
    for (size_t i = 0; i < N; i++)
        dinp[i] += dout[i] * dropout_scale(rng, i, p);
}

/* ---- Output head ---- */

size_t head_scratch_len(int C) {
    return (size_t)HEAD_ROWS * HEAD_VCHUNK + 2 * (size_t)HEAD_ROWS * (size_t)C;
}

/* Gathers up to HEAD_ROWS rows t >= *next that are active (active(t) != 0) into idx[] and
 * their inputs into xg[R, C]; returns R and advances *next past them. */
static int gather_rows(int *idx, real *xg, const real *inp, int BT, int C, int *next, const real *a,
                       const real *b) {
    int R = 0;
    int t = *next;
    for (; t < BT && R < HEAD_ROWS; t++) {
        const int on = (a == NULL && b == NULL) || (a && a[t] != 0) || (b && b[t] != 0);
        if (!on)
            continue;
        idx[R] = t;
        memcpy(xg + (size_t)R * C, inp + (size_t)t * C, sizeof(real) * (size_t)C);
        R++;
    }
    *next = t;
    return R;
}

void head_forward(real *logp, real *entropy, real *lse, const real *inp, const real *weight,
                  const int32_t *targets, const real *mask, real temperature, int BT, int C, int V,
                  real *scratch) {
    Q_ASSERT(temperature > 0 && V >= 1 && C >= 1 && BT >= 0);
    real *L = scratch;                            /* [HEAD_ROWS, HEAD_VCHUNK] */
    real *xg = scratch + HEAD_ROWS * HEAD_VCHUNK; /* [HEAD_ROWS, C] */
    int idx[HEAD_ROWS];
    /* Online logsumexp state per row: running max m, sum of exp(z - m) and of
     * exp(z - m) * z (for the entropy), and the target's z. */
    real m[HEAD_ROWS], zt[HEAD_ROWS];
    double s[HEAD_ROWS], a[HEAD_ROWS];
    for (int t = 0; t < BT; t++) {
        logp[t] = lse[t] = 0;
        if (entropy)
            entropy[t] = 0;
    }
    int next = 0;
    for (;;) {
        /* mask == NULL means every row; a non-NULL mask selects its non-zero rows. */
        const int R = gather_rows(idx, xg, inp, BT, C, &next, mask, NULL);
        if (R == 0)
            break;
        for (int r = 0; r < R; r++) {
            Q_ASSERT(targets[idx[r]] >= 0 && targets[idx[r]] < V);
            m[r] = -INFINITY;
            s[r] = a[r] = 0;
            zt[r] = 0;
        }
        for (int v0 = 0; v0 < V; v0 += HEAD_VCHUNK) {
            const int vc = V - v0 < HEAD_VCHUNK ? V - v0 : HEAD_VCHUNK;
            gemm(GEMM_N, GEMM_T, R, vc, C, 1, xg, C, weight + (size_t)v0 * C, C, 0, L, vc);
            const int par = par_ok((size_t)R * (size_t)vc);
            (void)par;
            OMP_PRAGMA(omp parallel for schedule(static) if (par))
            for (int r = 0; r < R; r++) {
                real *z = L + (size_t)r * vc;
                real cm = -INFINITY;
                for (int j = 0; j < vc; j++) {
                    z[j] /= temperature;
                    cm = R_FMAX(cm, z[j]);
                }
                const real nm = R_FMAX(m[r], cm);
                const double rescale = m[r] == -INFINITY ? 0.0 : exp((double)(m[r] - nm));
                double cs = 0, ca = 0;
                for (int j = 0; j < vc; j++) {
                    const double e = (double)R_EXP(z[j] - nm);
                    cs += e;
                    ca += e * (double)z[j];
                }
                s[r] = s[r] * rescale + cs;
                a[r] = a[r] * rescale + ca;
                m[r] = nm;
                const int y = targets[idx[r]];
                if (y >= v0 && y < v0 + vc)
                    zt[r] = z[y - v0];
            }
        }
        for (int r = 0; r < R; r++) {
            const int t = idx[r];
            const double l = (double)m[r] + log(s[r]);
            lse[t] = (real)l;
            logp[t] = (real)((double)zt[r] - l);
            if (entropy)
                entropy[t] = (real)(l - a[r] / s[r]);
        }
    }
}

void head_backward(real *dinp, real *dweight, const real *dlogp, const real *dentropy,
                   const real *inp, const real *weight, const int32_t *targets, const real *lse,
                   const real *entropy, real temperature, int BT, int C, int V, real *scratch) {
    Q_ASSERT(temperature > 0 && V >= 1 && C >= 1 && BT >= 0);
    Q_ASSERT(dentropy == NULL || entropy != NULL);
    if (dlogp == NULL && dentropy == NULL)
        return;
    real *L = scratch;                            /* [HEAD_ROWS, HEAD_VCHUNK] */
    real *xg = scratch + HEAD_ROWS * HEAD_VCHUNK; /* [HEAD_ROWS, C] */
    real *dxg = xg + (size_t)HEAD_ROWS * C;       /* [HEAD_ROWS, C] */
    int idx[HEAD_ROWS];
    int next = 0;
    for (;;) {
        const int R = gather_rows(idx, xg, inp, BT, C, &next, dlogp, dentropy);
        if (R == 0)
            break;
        memset(dxg, 0, sizeof(real) * (size_t)R * C);
        for (int v0 = 0; v0 < V; v0 += HEAD_VCHUNK) {
            const int vc = V - v0 < HEAD_VCHUNK ? V - v0 : HEAD_VCHUNK;
            const real *Wc = weight + (size_t)v0 * C;
            gemm(GEMM_N, GEMM_T, R, vc, C, 1, xg, C, Wc, C, 0, L, vc);
            const int par = par_ok((size_t)R * (size_t)vc);
            (void)par;
            /* d logp / dz_v = [v == y] - p_v; d H / dz_v = -p_v (z_v - E[z]) with
             * E[z] = lse - H; and dz/dlogit = 1 / temperature. */
            OMP_PRAGMA(omp parallel for schedule(static) if (par))
            for (int r = 0; r < R; r++) {
                const int t = idx[r];
                const real gl = dlogp ? dlogp[t] : 0;
                const real ge = dentropy ? dentropy[t] : 0;
                const real ez = dentropy ? lse[t] - entropy[t] : 0;
                real *z = L + (size_t)r * vc;
                for (int j = 0; j < vc; j++) {
                    const real zj = z[j] / temperature;
                    const real p = R_EXP(zj - lse[t]);
                    z[j] = (-gl * p - ge * p * (zj - ez)) / temperature;
                }
                const int y = targets[t];
                Q_ASSERT(y >= 0 && y < V);
                if (y >= v0 && y < v0 + vc)
                    z[y - v0] += gl / temperature;
            }
            if (dinp)
                gemm(GEMM_N, GEMM_N, R, C, vc, 1, L, vc, Wc, C, 1, dxg, C);
            gemm(GEMM_T, GEMM_N, vc, C, R, 1, L, vc, xg, C, 1, dweight + (size_t)v0 * C, C);
        }
        if (dinp)
            for (int r = 0; r < R; r++) {
                real *d = dinp + (size_t)idx[r] * C;
                const real *g = dxg + (size_t)r * C;
                for (int c = 0; c < C; c++)
                    d[c] += g[c];
            }
    }
}

real crossentropy_forward(const real *logp, const real *w, int BT) {
    double num = 0, den = 0;
    for (int t = 0; t < BT; t++) {
        num -= (double)w[t] * (double)logp[t];
        den += (double)w[t];
    }
    return den > 0 ? (real)(num / den) : 0;
}

void crossentropy_backward(real *dlogp, real dloss, const real *w, int BT) {
    double den = 0;
    for (int t = 0; t < BT; t++)
        den += (double)w[t];
    for (int t = 0; t < BT; t++)
        dlogp[t] = den > 0 ? (real)(-(double)dloss * (double)w[t] / den) : 0;
}

void head_argmax(int32_t *out, const real *inp, const real *weight, int BT, int C, int V,
                 real *scratch) {
    Q_ASSERT(V >= 1 && C >= 1 && BT >= 0);
    real *L = scratch;
    real *xg = scratch + HEAD_ROWS * HEAD_VCHUNK;
    int idx[HEAD_ROWS];
    real best[HEAD_ROWS];
    int next = 0;
    for (;;) {
        const int R = gather_rows(idx, xg, inp, BT, C, &next, NULL, NULL);
        if (R == 0)
            break;
        for (int r = 0; r < R; r++) {
            best[r] = -INFINITY;
            out[idx[r]] = 0;
        }
        for (int v0 = 0; v0 < V; v0 += HEAD_VCHUNK) {
            const int vc = V - v0 < HEAD_VCHUNK ? V - v0 : HEAD_VCHUNK;
            gemm(GEMM_N, GEMM_T, R, vc, C, 1, xg, C, weight + (size_t)v0 * C, C, 0, L, vc);
            for (int r = 0; r < R; r++) {
                const real *z = L + (size_t)r * vc;
                for (int j = 0; j < vc; j++)
                    if (z[j] > best[r]) {
                        best[r] = z[j];
                        out[idx[r]] = v0 + j;
                    }
            }
        }
    }
}
