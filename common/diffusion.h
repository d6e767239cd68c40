/* The bit-level diffusion plan stage of MODEL.md §Bit-level diffusion: SimHash codes of the
 * next token, XOR noise on packed bits, a BitLinear denoiser, its training loss, the K-step
 * deterministic plan sampler shared by learner and workers, and the write-back into the
 * residual stream with straight-through gradients through the last step.
 *
 * Shapes: BT positions, C = d (model width), Lb = diffusion_bits (a multiple of 32), packed in
 * Lw = diffusion_words(Lb) 64-bit words per code (bit b is bit b%64 of word b/64; bits at and
 * above Lb are always 0), W = diffusion_width, NB = diffusion_blocks, F = diffusion_ffn,
 * D = diffusion_time_dim, K = diffusion_steps.
 *
 * Denoiser f(z, tau, u) -> flip logits l [Lb], every BitLinear X preceded by its own input
 * RMSNorm gain X.norm (BL(x) = bitlinear(RMSNorm_X.norm(x), X.weight), quant.h):
 *   h  = BL_z(2z - 1) + BL_c(u) + BL_time(sinusoid(tau))
 *   h += BL_down(ReLU²(BL_up(RMSNorm_blocks.n.norm(h))))      for each of the NB blocks
 *   l  = BL_out(h)
 * The caller applies the stage's own RMSNorm (diffusion.norm.weight) to x and passes u; the
 * stage returns the write-back BL_dec(2 c_hat - 1), which the caller adds to x. In surrogate
 * mode (quant_surrogate_set) every BitLinear is a plain linear layer. */
#ifndef QUILLAN_DIFFUSION_H
#define QUILLAN_DIFFUSION_H

#include "error.h"
#include "model_config.h"
#include "real.h"
#include "rng.h"

#include <stdint.h>

/* Stream tag of the SimHash matrix R ("SIMH"): R[b, c] is normal draw b*C + c of
 * rng_stream_init(tag, diffusion_seed, 0). */
#define DIFFUSION_TAG_SIMHASH 0x53494D48ULL
/* Largest code length the packed helpers accept (stack bitsets of this size). */
#define DIFFUSION_MAX_BITS 65536

typedef struct {
    int C;  /* model width d [dim] */
    int Lb; /* code bits [diffusion_bits], multiple of 32 */
    int W;  /* residual width [diffusion_width] */
    int NB; /* residual blocks [diffusion_blocks] */
    int F;  /* block hidden [diffusion_ffn] */
    int D;  /* time embedding width [diffusion_time_dim], even */
    int K;  /* sampler steps [diffusion_steps] */
} diffusion_dims_t;

void diffusion_dims_from_config(diffusion_dims_t *d, const model_config_t *cfg);

/* Trainable tensors (or their gradients), named as in MODEL.md's list. Borrowed pointers. */
typedef struct {
    real *in_z_w;    /* [W, Lb]     diffusion.in_z.weight */
    real *in_z_norm; /* [Lb]        diffusion.in_z.norm */
    real *in_c_w;    /* [W, C]      diffusion.in_c.weight */
    real *in_c_norm; /* [C]         diffusion.in_c.norm */
    real *time_w;    /* [W, D]      diffusion.time.weight */
    real *time_norm; /* [D]         diffusion.time.norm */
    real *blk_norm;  /* [NB, W]     diffusion.blocks.{n}.norm.weight */
    real *up_w;      /* [NB, F, W]  diffusion.blocks.{n}.up.weight */
    real *up_norm;   /* [NB, W]     diffusion.blocks.{n}.up.norm */
    real *down_w;    /* [NB, W, F]  diffusion.blocks.{n}.down.weight */
    real *down_norm; /* [NB, F]     diffusion.blocks.{n}.down.norm */
    real *out_w;     /* [Lb, W]     diffusion.out.weight */
    real *out_norm;  /* [W]         diffusion.out.norm */
    real *dec_w;     /* [C, Lb]     diffusion.dec.weight */
    real *dec_norm;  /* [Lb]        diffusion.dec.norm */
} diffusion_params_t;

#define DIFFUSION_NUM_TENSORS 15

/* Element counts of the tensors in declaration order; returns the total. */
size_t diffusion_params_sizes(const diffusion_dims_t *d, size_t sizes[DIFFUSION_NUM_TENSORS]);
/* Points every tensor into buf (diffusion_params_sizes() reals, declaration order). */
void diffusion_params_map(diffusion_params_t *p, real *buf, const diffusion_dims_t *d);

/* R [Lb, C] (diffusion.R, a buffer) from the seed, see DIFFUSION_TAG_SIMHASH. */
void diffusion_simhash_init(real *R, int Lb, int C, uint64_t diffusion_seed);

/* ---- packed bits ---- */

/* Words per code: ceil(Lb / 64). */
int diffusion_words(int Lb);
/* out[nw] = a XOR b (out may alias either). */
void diffusion_bits_xor(uint64_t *out, const uint64_t *a, const uint64_t *b, int nw);
/* Number of set bits in a[nw]. */
int diffusion_bits_popcount(const uint64_t *a, int nw);
int diffusion_bit_get(const uint64_t *a, int b);
void diffusion_bit_set(uint64_t *a, int b, int v);

/* ---- codes, noise, schedule ---- */

/* code[Lw] = c(y) = [R w_row > 0] with w_row = head.weight[y] [C] (stop-gradient: no
 * backward). Every product is summed in index order. */
void diffusion_code(uint64_t *code, const real *R, const real *w_row, int Lb, int C);

/* Flip probability p(tau) = (1 - cos²(pi tau / 2)) / 2, evaluated in double as
 * (1 - sin(pi (1/2 - tau))) / 4 (the same function; exact at tau = 0, 1/2 and 1, so p(1) = 1/2
 * and p(1/2) / p(1) = 1/2 exactly). Learner and workers both call this. */
double diffusion_flip_prob(double tau);

/* Training noise for BT positions from the caller's stream: tau[t] = 1 - u in (0, 1] and
 * m[t] [Lw] with bit b set when a fresh uniform < p(tau[t]). Draws 1 + Lb values per position,
 * in order, so a stream position fully determines the noise. */
void diffusion_noise_draw(real *tau, uint64_t *m, rng_stream_t *rng, int BT, int Lb);

/* z[Lw] = the plan sampler's start z_K at absolute position pos: word w is
 * rng_plan_word(diffusion_seed, pos, w), bits at and above Lb cleared. */
void diffusion_plan_noise(uint64_t *z, uint64_t diffusion_seed, uint64_t pos, int Lb);

/* n_k = round(p_{k-1} / p_k * popcount) with p_j = diffusion_flip_prob(j / K), in double,
 * half away from zero. 1 <= k <= K; n_1 = 0. */
int diffusion_plan_nflip(int k, int K, int popcount);

/* One step k of the plan sampler (shared by learner and workers): pi = sigmoid(logits [Lb]),
 * e = [pi > 1/2], x0 = z XOR e, and z_prev = x0 XOR (the n_k set bits of e with the lowest
 * confidence |2 pi - 1|, equal confidences by lowest bit index). z_prev [Lw] must not alias z.
 * Returns n_k. At k = 1, z_prev = x0. */
int diffusion_plan_step(uint64_t *z_prev, const uint64_t *z, const real *logits, int k, int K,
                        int Lb);

/* out[D] = [sin(1000 tau f_i) for i < D/2, cos(1000 tau f_i) for i < D/2],
 * f_i = 10000^(-i / (D/2)). */
void diffusion_sinusoid(real *out, real tau, int D);

/* ---- plan records (for replay) ---- */

/* Per position the input z_1 of the last sampler step and the plan z_0 = c_hat, packed. What a
 * worker records per generated token and the learner replays. Embedded struct: _init
 * allocates room for max_BT positions (zeroed), _free releases. */
typedef struct {
    int BT, max_BT, Lb, Lw;
    uint64_t *z1; /* [BT, Lw] */
    uint64_t *z0; /* [BT, Lw] */
} diffusion_plan_t;

int diffusion_plan_init(diffusion_plan_t *plan, int Lb, int max_BT, qerr_t *err);
void diffusion_plan_free(diffusion_plan_t *plan);
/* Checks a record from outside: BT and Lb match, no bit set at or above Lb. Returns 0, or -1
 * with QERR_INVALID naming the position. */
int diffusion_plan_validate(const diffusion_plan_t *plan, int Lb, int BT, qerr_t *err);

/* ---- the stage ---- */

/* Saved activations and scratch for up to max_BT positions (opaque, heap): one denoiser
 * evaluation for the write-back path (the last sampler step), one for the loss path, and the
 * dequantised weights they share. */
typedef struct diffusion_acts diffusion_acts_t;

diffusion_acts_t *diffusion_acts_new(const diffusion_dims_t *d, int max_BT, qerr_t *err);
void diffusion_acts_destroy(diffusion_acts_t **acts);

/* Weight codes. Each diffusion_forward and diffusion_loss_forward call quantizes the stage's
 * BitLinear weights once and shares the codes among its K denoiser evaluations and the
 * write-back. A caller that knows when its weights change may also share them across calls:
 * with a version >= 1 set here, the codes are made by the first call that sees the version and
 * kept until it changes (the model passes a counter it advances whenever its fake-quantized
 * weights are refreshed). 0, the default, means no reuse across calls. Surrogate mode never
 * reuses. */
void diffusion_acts_weights_version(diffusion_acts_t *acts, uint64_t version);

/* The plan the last diffusion_forward used (own or replayed); owned by acts. */
const diffusion_plan_t *diffusion_acts_plan(const diffusion_acts_t *acts);

typedef struct {
    int positions;  /* positions planned */
    int mismatches; /* under replay: positions whose own last step z_1 XOR e differs from z_0 */
} diffusion_aux_t;

/* out [BT, C] = BL_dec(2 c_hat - 1) (ASSIGNED) for u [BT, C] at absolute positions pos [BT].
 * Without replay: z_K from diffusion_plan_noise(seed, pos[t]), K sampler steps (earlier steps
 * not kept for the backward), c_hat = z_0. With replay: z_1 and z_0 come from the record,
 * only the last step's denoiser runs (for the backward and the mismatch count), c_hat = the
 * record's z_0. In surrogate mode (gradient checks) the write-back uses the soft bits
 * c_hat = x~ of the backward below instead (the threshold's STE identity); the recorded plan
 * is unchanged. Both this and diffusion_loss_forward must see the same p within a step (they
 * share the dequantised weights). Returns 0, or -1 with QERR_INVALID for a malformed record. */
int diffusion_forward(diffusion_acts_t *acts, real *out, diffusion_aux_t *aux, const real *u,
                      const int32_t *pos, const diffusion_params_t *p,
                      const diffusion_plan_t *replay, uint64_t diffusion_seed,
                      const diffusion_dims_t *d, int BT, qerr_t *err);
/* Backward of the last diffusion_forward: straight-through soft bits on the last step,
 * x~ = z_1 + pi - 2 z_1 pi, c_hat = x~ + stopgrad(z_0 - x~), so dout reaches pi, the denoiser
 * weights and u; z_1 itself is detached. ACCUMULATES into du [BT, C] and *dp. */
void diffusion_backward(diffusion_params_t *dp, real *du, const real *dout, diffusion_acts_t *acts,
                        const real *u, const diffusion_params_t *p, const diffusion_dims_t *d,
                        int BT);

/* Training loss: z = code XOR m, l = f(z, tau, u), loss = sum_t mask[t] mean_b BCE(l_tb, m_tb)
 * / sum_t mask[t] (0 when no position has mask > 0). code, m [BT, Lw]; tau, mask [BT]
 * (mask 1 where the next token is known, 0 elsewhere). */
real diffusion_loss_forward(diffusion_acts_t *acts, const uint64_t *code, const uint64_t *m,
                            const real *tau, const real *mask, const real *u,
                            const diffusion_params_t *p, const diffusion_dims_t *d, int BT);
/* Backward of the last diffusion_loss_forward with upstream gradient dloss. ACCUMULATES into
 * du [BT, C] and *dp. */
void diffusion_loss_backward(diffusion_params_t *dp, real *du, real dloss, diffusion_acts_t *acts,
                             const real *u, const diffusion_params_t *p, const diffusion_dims_t *d,
                             int BT);

#endif
