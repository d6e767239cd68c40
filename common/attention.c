#include "attention.h"

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "alloc.h"
#include "gemm.h"

#ifdef _OPENMP
#include <omp.h>
#define OMP_PRAGMA(x) _Pragma(#x)
#else
#define OMP_PRAGMA(x)
#endif

enum { TQ = ATTN_TILE_Q, TK = ATTN_TILE_K };

/* Below this many multiply-adds a call runs on one thread: a fork costs more, and much more
 * on an oversubscribed machine, where each fork-join waits for a descheduled thread while the
 * others spin (see GEMM_PARALLEL_MIN_WORK in gemm.c). */
#define ATTN_PARALLEL_MIN_WORK (1 << 24)

static int par_ok(double work) {
#ifdef _OPENMP
    return work >= ATTN_PARALLEL_MIN_WORK && !omp_in_parallel();
#else
    (void)work;
    return 0;
#endif
}

static int head_size(int C, int NH) {
    Q_ASSERT(NH >= 1 && C % NH == 0);
    const int HS = C / NH;
    Q_ASSERT(HS % 2 == 0 && HS <= ATTN_MAX_HS);
    return HS;
}

/* ---- RoPE ---- */

void rope_angles(real *cs, real *sn, int pos, int HS) {
    Q_ASSERT(pos >= 0 && HS % 2 == 0 && HS <= ATTN_MAX_HS);
    for (int i = 0; i < HS / 2; i++) {
        const double ang = (double)pos * pow(ROPE_THETA, -2.0 * i / HS);
        cs[i] = (real)cos(ang);
        sn[i] = (real)sin(ang);
    }
}

/* Rotates every head of one row by +angle (dir = 1) or -angle (dir = -1). */
static void rope_row(real *out, const real *inp, const real *cs, const real *sn, int C, int HS,
                     real dir) {
    for (int h0 = 0; h0 < C; h0 += HS)
        for (int i = 0; i < HS / 2; i++) {
            const real x0 = inp[h0 + 2 * i], x1 = inp[h0 + 2 * i + 1];
            const real s = dir * sn[i];
            out[h0 + 2 * i] = x0 * cs[i] - x1 * s;
            out[h0 + 2 * i + 1] = x0 * s + x1 * cs[i];
        }
}

void rope_rotate(real *out, const real *inp, const real *cs, const real *sn, int C, int NH) {
    rope_row(out, inp, cs, sn, C, head_size(C, NH), 1);
}

/* Row t of every batch entry, at position pos0 + t. */
static void rope_rows_at(real *out, const real *inp, int B, int T, int C, int HS, int pos0, int t,
                         real dir) {
    real cs[ATTN_MAX_HS / 2], sn[ATTN_MAX_HS / 2];
    rope_angles(cs, sn, pos0 + t, HS);
    for (int b = 0; b < B; b++) {
        const size_t off = ((size_t)b * T + t) * C;
        rope_row(out + off, inp + off, cs, sn, C, HS, dir);
    }
}

static void rope_apply(real *out, const real *inp, int B, int T, int C, int NH, int pos0,
                       real dir) {
    const int HS = head_size(C, NH);
    Q_ASSERT(pos0 >= 0);
    /* A branch rather than an `if` clause: a one-thread OpenMP region still sets up a team. */
    if (par_ok((double)B * T * C * 4)) {
        OMP_PRAGMA(omp parallel for schedule(static))
        for (int t = 0; t < T; t++)
            rope_rows_at(out, inp, B, T, C, HS, pos0, t, dir);
        return;
    }
    for (int t = 0; t < T; t++)
        rope_rows_at(out, inp, B, T, C, HS, pos0, t, dir);
}

void rope_forward(real *out, const real *inp, int B, int T, int C, int NH, int pos0) {
    rope_apply(out, inp, B, T, C, NH, pos0, 1);
}

void rope_backward(real *dinp, const real *dout, int B, int T, int C, int NH, int pos0) {
    /* The rotation is orthogonal: its transpose is the rotation by -angle. */
    rope_apply(dinp, dout, B, T, C, NH, pos0, -1);
}

/* ---- Flash forward ---- */

/* Query rows q0..q0+nq-1 of one head against keys 0..q0+nq-1, causal.
 * q: row q0 of this head (stride ldq); k, v: row 0 of this head (stride ldk); out: row q0
 * (stride ldo); lse[nq] may be NULL. Online softmax over key tiles of TK. */
static void flash_rows(real *out, int ldo, real *lse, const real *q, int ldq, const real *k,
                       const real *v, int ldk, int q0, int nq, int HS) {
    _Alignas(64) real S[TQ * TK];
    _Alignas(64) real acc[TQ * ATTN_MAX_HS];
    real m[TQ], l[TQ];
    const real scale = 1 / R_SQRT((real)HS);
    for (int r = 0; r < nq; r++) {
        m[r] = -INFINITY;
        l[r] = 0;
    }
    memset(acc, 0, sizeof(real) * (size_t)nq * HS);
    const int kend = q0 + nq; /* keys [0, kend) can be seen by some row of the tile */
    for (int k0 = 0; k0 < kend; k0 += TK) {
        const int nk = kend - k0 < TK ? kend - k0 : TK;
        gemm(GEMM_N, GEMM_T, nq, nk, HS, scale, q, ldq, k + (size_t)k0 * ldk, ldk, 0, S, TK);
        for (int r = 0; r < nq; r++) {
            real *s = S + (size_t)r * TK;
            const int nvalid = q0 + r - k0 + 1 < nk ? q0 + r - k0 + 1 : nk;
            if (nvalid <= 0) {
                memset(s, 0, sizeof(real) * (size_t)nk);
                continue;
            }
            real mx = m[r];
            for (int j = 0; j < nvalid; j++)
                mx = R_FMAX(mx, s[j]);
            const real corr = m[r] == -INFINITY ? 0 : R_EXP(m[r] - mx);
            real sum = 0;
            for (int j = 0; j < nvalid; j++) {
                s[j] = R_EXP(s[j] - mx);
                sum += s[j];
            }
            for (int j = nvalid; j < nk; j++)
                s[j] = 0;
            l[r] = l[r] * corr + sum;
            m[r] = mx;
            real *a = acc + (size_t)r * HS;
            for (int d = 0; d < HS; d++)
                a[d] *= corr;
        }
        gemm(GEMM_N, GEMM_N, nq, HS, nk, 1, S, TK, v + (size_t)k0 * ldk, ldk, 1, acc, HS);
    }
    for (int r = 0; r < nq; r++) {
        real *o = out + (size_t)r * ldo;
        const real *a = acc + (size_t)r * HS;
        for (int d = 0; d < HS; d++)
            o[d] = a[d] / l[r];
        if (lse)
            lse[r] = m[r] + R_LOG(l[r]);
    }
}

void attention_forward(real *out, real *lse, const real *q, const real *k, const real *v, int B,
                       int T, int C, int NH) {
    const int HS = head_size(C, NH);
    const int ntile = (T + TQ - 1) / TQ;
    const int njobs = B * NH * ntile;
    const int par = njobs > 1 && par_ok((double)B * NH * T * T * HS);
    (void)par;
    OMP_PRAGMA(omp parallel for schedule(dynamic, 1) if (par))
    for (int job = 0; job < njobs; job++) {
        const int b = job / (NH * ntile), h = (job / ntile) % NH, q0 = (job % ntile) * TQ;
        const int nq = T - q0 < TQ ? T - q0 : TQ;
        const size_t base = (size_t)b * T * C + (size_t)h * HS;
        flash_rows(out + base + (size_t)q0 * C, C, lse + ((size_t)b * NH + h) * T + q0,
                   q + base + (size_t)q0 * C, C, k + base, v + base, C, q0, nq, HS);
    }
}

/* ---- Flash backward ---- */

/* One (batch, head): all gradients of its columns. q, k, v, out, dout, dq, dk, dv point at
 * row 0 of this head (stride C); lse at its [T] row. */
static void flash_backward_head(real *dq, real *dk, real *dv, const real *dout, const real *q,
                                const real *k, const real *v, const real *out, const real *lse,
                                int T, int C, int HS) {
    _Alignas(64) real P[TQ * TK];
    _Alignas(64) real dS[TQ * TK];
    _Alignas(64) real dqa[TQ * ATTN_MAX_HS];
    real D[TQ];
    const real scale = 1 / R_SQRT((real)HS);
    for (int q0 = 0; q0 < T; q0 += TQ) {
        const int nq = T - q0 < TQ ? T - q0 : TQ;
        const real *qt = q + (size_t)q0 * C, *dot = dout + (size_t)q0 * C;
        /* D_r = dout_r . out_r: the softmax backward's row term. */
        for (int r = 0; r < nq; r++) {
            const real *g = dot + (size_t)r * C, *o = out + (size_t)(q0 + r) * C;
            real s = 0;
            for (int d = 0; d < HS; d++)
                s += g[d] * o[d];
            D[r] = s;
        }
        memset(dqa, 0, sizeof(real) * (size_t)nq * HS);
        const int kend = q0 + nq;
        for (int k0 = 0; k0 < kend; k0 += TK) {
            const int nk = kend - k0 < TK ? kend - k0 : TK;
            const real *kt = k + (size_t)k0 * C, *vt = v + (size_t)k0 * C;
            gemm(GEMM_N, GEMM_T, nq, nk, HS, scale, qt, C, kt, C, 0, P, TK);
            gemm(GEMM_N, GEMM_T, nq, nk, HS, 1, dot, C, vt, C, 0, dS, TK);
            for (int r = 0; r < nq; r++) {
                real *p = P + (size_t)r * TK, *ds = dS + (size_t)r * TK;
                const int nvalid = q0 + r - k0 + 1;
                for (int j = 0; j < nk; j++) {
                    p[j] = j < nvalid ? R_EXP(p[j] - lse[q0 + r]) : 0;
                    ds[j] = p[j] * (ds[j] - D[r]);
                }
            }
            gemm(GEMM_T, GEMM_N, nk, HS, nq, 1, P, TK, dot, C, 1, dv + (size_t)k0 * C, C);
            gemm(GEMM_N, GEMM_N, nq, HS, nk, scale, dS, TK, kt, C, 1, dqa, HS);
            gemm(GEMM_T, GEMM_N, nk, HS, nq, scale, dS, TK, qt, C, 1, dk + (size_t)k0 * C, C);
        }
        for (int r = 0; r < nq; r++) {
            real *g = dq + (size_t)(q0 + r) * C;
            const real *a = dqa + (size_t)r * HS;
            for (int d = 0; d < HS; d++)
                g[d] += a[d];
        }
    }
}

void attention_backward(real *dq, real *dk, real *dv, const real *dout, const real *q,
                        const real *k, const real *v, const real *out, const real *lse, int B,
                        int T, int C, int NH) {
    const int HS = head_size(C, NH);
    /* One job per (batch, head): each owns its columns of dq, dk and dv, so no two threads
     * ever add into the same element. */
    const int par = B * NH > 1 && par_ok((double)B * NH * T * T * HS);
    (void)par;
    OMP_PRAGMA(omp parallel for schedule(dynamic, 1) if (par))
    for (int job = 0; job < B * NH; job++) {
        const int b = job / NH, h = job % NH;
        const size_t base = (size_t)b * T * C + (size_t)h * HS;
        flash_backward_head(dq + base, dk + base, dv + base, dout + base, q + base, k + base,
                            v + base, out + base, lse + ((size_t)b * NH + h) * T, T, C, HS);
    }
}

/* ---- T x T oracle ---- */

int attention_forward_ref(real *out, const real *q, const real *k, const real *v, int B, int T,
                          int C, int NH, qerr_t *err) {
    const int HS = head_size(C, NH);
    double *att = malloc(sizeof(double) * (size_t)T * (size_t)T);
    if (!att && T > 0)
        return qerr_set(err, QERR_NOMEM, "attention_forward_ref: %d x %d scores", T, T);
    const double scale = 1.0 / sqrt((double)HS);
    for (int b = 0; b < B; b++)
        for (int h = 0; h < NH; h++) {
            const size_t base = (size_t)b * T * C + (size_t)h * HS;
            for (int i = 0; i < T; i++) {
                double *a = att + (size_t)i * T, mx = -INFINITY, sum = 0;
                for (int j = 0; j <= i; j++) {
                    double s = 0;
                    for (int d = 0; d < HS; d++)
                        s += (double)q[base + (size_t)i * C + d] * k[base + (size_t)j * C + d];
                    a[j] = s * scale;
                    mx = fmax(mx, a[j]);
                }
                for (int j = 0; j <= i; j++) {
                    a[j] = exp(a[j] - mx);
                    sum += a[j];
                }
                for (int d = 0; d < HS; d++) {
                    double o = 0;
                    for (int j = 0; j <= i; j++)
                        o += a[j] * v[base + (size_t)j * C + d];
                    out[base + (size_t)i * C + d] = (real)(o / sum);
                }
            }
        }
    free(att);
    return 0;
}

/* ---- Decoding ---- */

void attention_decode(real *out, const real *q, const real *kcache, const real *vcache, int n,
                      int ldc, int C, int NH) {
    const int HS = head_size(C, NH);
    Q_ASSERT(n >= 1 && ldc >= C);
    for (int h = 0; h < NH; h++)
        flash_rows(out + (size_t)h * HS, C, NULL, q + (size_t)h * HS, C, kcache + (size_t)h * HS,
                   vcache + (size_t)h * HS, ldc, n - 1, 1, HS);
}

struct attn_kvcache {
    int L, max_T, C;
    real *k; /* [L, max_T, C] */
    real *v; /* [L, max_T, C] */
};

attn_kvcache_t *attn_kvcache_new(int L, int max_T, int C, qerr_t *err) {
    if (L <= 0 || max_T <= 0 || C <= 0) {
        qerr_set(err, QERR_RANGE,
                 "attn_kvcache_new: layers %d, positions %d, channels %d must "
                 "all be positive",
                 L, max_T, C);
        return NULL;
    }
    const size_t n = q_mul_size(q_mul_size((size_t)L, (size_t)max_T), (size_t)C);
    attn_kvcache_t *c = calloc(1, sizeof *c);
    if (c) {
        c->k = q_aligned_calloc(n, sizeof(real));
        c->v = q_aligned_calloc(n, sizeof(real));
    }
    if (!c || !c->k || !c->v) {
        attn_kvcache_destroy(&c);
        qerr_set(err, QERR_NOMEM, "attn_kvcache_new: %d layers x %d positions x %d channels", L,
                 max_T, C);
        return NULL;
    }
    c->L = L;
    c->max_T = max_T;
    c->C = C;
    return c;
}

void attn_kvcache_destroy(attn_kvcache_t **cache) {
    if (!cache || !*cache)
        return;
    q_aligned_free((*cache)->k);
    q_aligned_free((*cache)->v);
    free(*cache);
    *cache = NULL;
}

int attn_kvcache_max_len(const attn_kvcache_t *cache) {
    return cache->max_T;
}

real *attn_kvcache_k(attn_kvcache_t *cache, int l) {
    Q_ASSERT(l >= 0 && l < cache->L);
    return cache->k + (size_t)l * cache->max_T * cache->C;
}

real *attn_kvcache_v(attn_kvcache_t *cache, int l) {
    Q_ASSERT(l >= 0 && l < cache->L);
    return cache->v + (size_t)l * cache->max_T * cache->C;
}

void attn_kvcache_step(real *out, attn_kvcache_t *cache, int l, int pos, const real *q,
                       const real *k_new, const real *v_new, int NH) {
    Q_ASSERT(pos >= 0 && pos < cache->max_T);
    const int C = cache->C;
    real *K = attn_kvcache_k(cache, l), *V = attn_kvcache_v(cache, l);
    memcpy(K + (size_t)pos * C, k_new, sizeof(real) * (size_t)C);
    memcpy(V + (size_t)pos * C, v_new, sizeof(real) * (size_t)C);
    attention_decode(out, q, K, V, pos + 1, C, C, NH);
}
