/* Dense layers of the CPU reference model, llm.c style.
 *
 * Each layer's _forward sits directly above its _backward with mirrored arguments (outputs,
 * then inputs, then sizes). Shape letters: B batch, T time, BT = B*T rows, C = d channels,
 * OC output channels, V vocabulary. Matrices are stored [out, in] and applied as y = W x.
 * Every backward states whether it ASSIGNS or ACCUMULATES its gradients; parameter gradients
 * always accumulate, so the caller zeroes them once per optimizer step. Buffers are caller
 * owned; no function here allocates. */
#ifndef QUILLAN_LAYERS_H
#define QUILLAN_LAYERS_H

#include <stddef.h>
#include <stdint.h>

#include "real.h"
#include "rng.h"

#define RMSNORM_EPS 1e-6 /* MODEL.md: RMSNorm(x) = g * x / sqrt(mean(x^2) + 1e-6) */

/* Head chunking: logits exist only as [HEAD_ROWS, HEAD_VCHUNK] tiles, never [BT, V]. The
 * double (gradient-check) build uses tiny chunks so finite differences on a small vocabulary
 * cross chunk boundaries. */
#if REAL_IS_DOUBLE
#define HEAD_VCHUNK 8
#define HEAD_ROWS 4
#else
#define HEAD_VCHUNK 1024 /* vocabulary entries per chunk */
#define HEAD_ROWS 128    /* token rows per chunk */
#endif

/* ---- Embedding ---- */

/* out[BT, C] = wte[tokens[t]]; tokens in [0, V) (the caller validated them; a token outside
 * is a bug and asserts, hence V). */
void embedding_forward(real *out, const int32_t *tokens, const real *wte, int BT, int C, int V);
/* dwte[V, C] += scatter of dout[BT, C] (ACCUMULATED). */
void embedding_backward(real *dwte, const real *dout, const int32_t *tokens, int BT, int C, int V);

/* ---- RMSNorm ---- */

/* out[BT, C] = weight[C] * inp / sqrt(mean(inp^2) + RMSNORM_EPS); rstd[BT] keeps
 * 1 / sqrt(mean + eps) for the backward. The sum of squares runs in 16 lanes (element c in
 * lane c % 16) added by a fixed pairwise tree: the bits of a row depend on that row alone,
 * whatever BT or the thread count, so the engine's BitLinear inputs match the learner's. */
void rmsnorm_forward(real *out, real *rstd, const real *inp, const real *weight, int BT, int C);
/* dinp[BT, C] += ..., dweight[C] += ... (both ACCUMULATED; dinp may be NULL). */
void rmsnorm_backward(real *dinp, real *dweight, const real *dout, const real *inp,
                      const real *weight, const real *rstd, int BT, int C);

/* ---- Linear ---- */

/* out[BT, OC] = inp[BT, C] weight[OC, C]^T + bias[OC] (bias may be NULL). out must not alias
 * inp. */
void linear_forward(real *out, const real *inp, const real *weight, const real *bias, int BT, int C,
                    int OC);
/* dinp[BT, C] += dout weight; dweight[OC, C] += dout^T inp; dbias[OC] += column sums of dout.
 * All ACCUMULATED; any of dinp, dweight, dbias may be NULL to skip it. */
void linear_backward(real *dinp, real *dweight, real *dbias, const real *dout, const real *inp,
                     const real *weight, int BT, int C, int OC);

/* ---- Pointwise ---- */

/* out[N] = inp * sigmoid(inp). out may equal inp. */
void silu_forward(real *out, const real *inp, size_t N);
/* dinp[N] += dout * silu'(inp) (ACCUMULATED; dinp must not alias inp). */
void silu_backward(real *dinp, const real *dout, const real *inp, size_t N);

/* out[N] = max(inp, 0)^2. out may equal inp. */
void relu2_forward(real *out, const real *inp, size_t N);
/* dinp[N] += dout * 2 max(inp, 0) (ACCUMULATED). */
void relu2_backward(real *dinp, const real *dout, const real *inp, size_t N);

/* out[N] = inp1 + inp2. out may equal either input. */
void residual_forward(real *out, const real *inp1, const real *inp2, size_t N);
/* dinp1[N] += dout, dinp2[N] += dout (ACCUMULATED; either may be NULL). */
void residual_backward(real *dinp1, real *dinp2, const real *dout, size_t N);

/* Inverted dropout: when training and p > 0, element i is dropped (0) if the uniform
 * (top 24 bits of hash(rng->key, rng->counter + i)) / 2^24 is < p, and kept as inp / (1 - p)
 * otherwise; else out = inp. The mask is a pure function of (rng, i): the rng is not advanced,
 * the backward regenerates the mask from the same rng, and any thread split gives the same
 * result. The caller gives each dropout site its own stream (e.g. rng_stream_init(&s, tag,
 * step, site)). p in [0, 1). out may equal inp. */
void dropout_forward(real *out, const real *inp, real p, int training, const rng_stream_t *rng,
                     size_t N);
/* dinp[N] += dout * mask / (1 - p) with the forward's mask (ACCUMULATED). */
void dropout_backward(real *dinp, const real *dout, real p, int training, const rng_stream_t *rng,
                      size_t N);

/* ---- Output head: logits, log-probs, entropy, cross-entropy ---- */

/* Scratch (in reals) that head_forward / head_backward need for a given C. */
size_t head_scratch_len(int C);

/* For each row t with mask[t] != 0 (mask may be NULL: every row), with z = weight[V, C]
 * inp[t] / temperature:
 *   lse[t] = logsumexp(z),  logp[t] = z[targets[t]] - lse[t],
 *   entropy[t] = -sum_v p_v log p_v  (entropy may be NULL).
 * Rows with mask 0 get 0 in every output and cost nothing. Computed chunk by chunk over V
 * with an online logsumexp; scratch has head_scratch_len(C) reals. temperature > 0 (1 for
 * SFT; the sampling temperature for RL log-probs). targets in [0, V) on active rows. */
void head_forward(real *logp, real *entropy, real *lse, const real *inp, const real *weight,
                  const int32_t *targets, const real *mask, real temperature, int BT, int C, int V,
                  real *scratch);
/* Backward of head_forward given dlogp[BT] and dentropy[BT] (the loss's gradient with respect
 * to each row's log-prob and entropy; either may be NULL for zero). Recomputes each chunk's
 * logits. dinp[BT, C] += ..., dweight[V, C] += ... (ACCUMULATED; dinp may be NULL). Rows where
 * both upstream gradients are 0 are skipped. entropy must be the forward's entropy when
 * dentropy is given. */
void head_backward(real *dinp, real *dweight, const real *dlogp, const real *dentropy,
                   const real *inp, const real *weight, const int32_t *targets, const real *lse,
                   const real *entropy, real temperature, int BT, int C, int V, real *scratch);

/* Weighted mean cross-entropy: loss = sum_t w[t] * -logp[t] / sum_t w[t]; w[t] >= 0 is the
 * per-token weight (1 on completion tokens, 0 on prompt and padding); 0 when sum w == 0. */
real crossentropy_forward(const real *logp, const real *w, int BT);
/* dlogp[t] = -dloss * w[t] / sum w (ASSIGNED; all 0 when sum w == 0). */
void crossentropy_backward(real *dlogp, real dloss, const real *w, int BT);

/* Greedy token of each row: out[t] = argmax_v (weight inp[t]), lowest index on ties. Chunked
 * like head_forward; scratch has head_scratch_len(C) reals. */
void head_argmax(int32_t *out, const real *inp, const real *weight, int BT, int C, int V,
                 real *scratch);

#endif
