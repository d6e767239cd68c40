/* Training-step benchmark of the device model on the quillan-512m preset (configs/quillan-512m.yaml
 * restates the preset's values; the bare build has no YAML, so the config comes from
 * model_config_preset).
 *
 * One step is what the RL learner does per optimizer step: forward of a mini-batch with
 * log-probs and entropy, the DAPO loss and its gradient (cuda_dapo.h) on the completion
 * tokens, the model backward, one AdamW step, the loss-free balancing update. Batch shape: the
 * config's learner.batch_groups 16 x group_size 8 = 128 sequences per batch in
 * learner.minibatches 4 steps gives B = 32 sequences per step; rows are T = 1024 tokens
 * (rollout.max_new_tokens, prompt included: the first T/8 are prompt, weight 0). RL aux
 * weights (TRAINING.md, mode rl): balance 0, z-loss 1e-3, diffusion 0. Both overridable:
 *   gpu_train_step [B T [steps]]
 *
 * For each of {forced sm_75 path (FP16 + loss scaling), native path} x {checkpointing off, on}:
 * one warm-up step, then `steps` timed steps (cudaEvents around each phase and the whole
 * step). Prints the batch, the model FLOPs per token and a markdown table: step time,
 * tokens/s, model FLOPs utilisation against the card's dense FP16/BF16 tensor peak, the
 * backend's peak device bytes (cuda_buf_stats: every allocation of the CUDA backend) and the
 * device memory in use (cudaMemGetInfo: adds the context and cuBLAS); then the time per phase.
 * A configuration that does not fit prints its error instead of numbers. */
#include "cuda_buf.h"
#include "cuda_dapo.h"
#include "cuda_model.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

extern "C" {
#include "rng.h"
}

#define DEFAULT_B 32
#define DEFAULT_T 1024
#define DEFAULT_STEPS 3

/* Dense tensor-core peaks (TFLOPS, FP16 = BF16, no sparsity) from NVIDIA's data sheets. */
typedef struct {
    const char *match; /* substring of cudaDeviceProp.name */
    double tflops;
} peak_t;

static const peak_t peaks[] = {
    {"T4", 65.0},    {"A100", 312.0}, {"H100 PCIe", 756.0}, {"H100 NVL", 835.0},
    {"H100", 989.0}, {"H200", 989.0}, {"A10G", 70.0},       {"L4", 121.0},
};

/* The card's peak, by name, else by compute capability (the first card of each); 0 unknown. */
static double card_peak(const cudaDeviceProp *p) {
    for (size_t i = 0; i < sizeof peaks / sizeof peaks[0]; i++)
        if (strstr(p->name, peaks[i].match))
            return peaks[i].tflops;
    const int sm = p->major * 10 + p->minor;
    return sm == 75 ? 65.0 : sm == 80 ? 312.0 : sm == 90 ? 989.0 : 0.0;
}

/* Multiply-accumulates per token of the model's matrix products, split into what the forward
 * does and what gets a gradient (the backward does two products per forward one there).
 * Attention scores and values are causal: on average (T + 1) / 2 keys per query. */
typedef struct {
    double fwd, bwd;
} macs_t;

static macs_t model_macs(const model_config_t *c, int T, double head_share) {
    const double C = c->dim, L = c->num_layers, OH = c->overseer_hidden, M = c->num_mini_moes;
    const double KM = c->top_k_minis, E = c->num_experts_per_mini, KE = c->top_k_experts;
    const double EH = c->expert_hidden, N = c->num_micros_per_mini, KN = c->top_k_micros;
    const double Lb = c->diffusion_bits, W = c->diffusion_width, F = c->diffusion_ffn;
    const double D = c->diffusion_time_dim, NB = c->diffusion_blocks, K = c->diffusion_steps;
    const double attn = 4 * C * C + C * (T + 1);                 /* projections, scores + values */
    const double moe = 2 * C * OH + M * C                        /* overseer, primary gate */
                       + KM * (E * C + N * C)                    /* routers of the kept minis */
                       + KM * KE * 2 * C * EH + KM * KN * 2 * C; /* experts, micro agents */
    const double denoise = W * (Lb + C + D) + NB * 2 * W * F + Lb * W;
    const double head = c->vocab_size * C * head_share; /* only weighted rows reach the head */
    macs_t m;
    m.fwd = L * (attn + moe) + K * denoise + C * Lb + head;
    m.bwd = L * (attn + moe) + denoise + C * Lb + head; /* the sampler's first K-1 steps detach */
    return m;
}

typedef struct {
    const char *label;
    cuda_model_precision_t prec;
    int force_sm75;
    int ckpt;
} config_t;

typedef struct {
    int ok;
    char error[QERR_MSG_MAX];
    const char *prec;
    double step_ms, tok_s, mfu, tflops;
    size_t backend_peak, device_used;
    double phase_ms[CUDA_MODEL_PHASE_COUNT];
} result_t;

typedef struct {
    int B, T, steps;
    int32_t *tokens, *targets;
    float *weights, *adv;
} batch_data_t;

static int one_step(cuda_model_t *m, const model_batch_t *b, float *d_old, float *d_adv,
                    float *d_dlogp, dapo_metrics_t *d_met, qerr_t *err) {
    model_stats_t st;
    if (cuda_model_forward(m, b, &st, err))
        return -1;
    const int BT = b->B * b->T;
    cudaStream_t s = cuda_model_stream(m);
    dapo_loss_config_t dc;
    dapo_loss_config_default(&dc);
    dc.max_new_tokens = b->T; /* rollout.max_new_tokens (token-mean does not read it) */
    /* On-policy minibatch: the old log-probs are this forward's (ratio 1). */
    CUDA_TRY(err, cudaMemcpyAsync(d_old, cuda_model_logp_device(m), (size_t)BT * sizeof(float),
                                  cudaMemcpyDeviceToDevice, s));
    if (cuda_dapo_loss_forward(d_met, cuda_model_logp_device(m), d_old, NULL, NULL, d_adv,
                               d_adv + BT, b->B, b->T, &dc, s, err) ||
        cuda_dapo_loss_backward(d_dlogp, cuda_model_logp_device(m), d_old, NULL, NULL, d_adv,
                                d_adv + BT, b->B, b->T, &dc, cuda_model_loss_scale(m), s, err))
        return -1;
    cuda_model_grads_zero(m);
    cuda_model_backward(m, d_dlogp, NULL);
    optim_result_t r;
    if (cuda_model_optim_step(m, st.loss, &r, err) < 0)
        return -1;
    cuda_model_balance_update(m, r.applied);
    return 0;
}

static void run_config(const config_t *cfgv, const model_config_t *mc, const batch_data_t *bd,
                       double peak_tflops, double flops_per_step, result_t *res) {
    memset(res, 0, sizeof *res);
    qerr_t e;
    cuda_model_options_t opt;
    cuda_model_options_default(&opt);
    opt.precision = cfgv->prec;
    opt.force_sm75 = cfgv->force_sm75;
    opt.checkpointing = cfgv->ckpt;
    CUDA_CHECK(cudaDeviceSynchronize());
    size_t free0 = 0, total = 0;
    CUDA_CHECK(cudaMemGetInfo(&free0, &total));
    cuda_buf_stats_reset_peak();
    cuda_model_t *m = cuda_model_new(mc, &opt, &e);
    const int BT = bd->B * bd->T;
    float *d_buf = NULL;
    dapo_metrics_t *d_met = NULL;
    float *h_adv = (float *)calloc((size_t)BT * 2, sizeof(float));
    if (!h_adv)
        qerr_set(&e, QERR_NOMEM, "out of host memory");
    if (!m || !h_adv)
        goto fail;
    res->prec = cuda_model_precision_name(cuda_model_precision(m));
    {
        optim_config_t oc;
        optim_config_default(&oc);
        oc.lr = 1e-5; /* configs/quillan-512m.yaml learner.lr */
        if (cuda_model_optim_init(m, &oc, &e) || cuda_model_plan(m, bd->B, bd->T, &e))
            goto fail;
        /* d_buf: old log-probs [BT], advantages [BT] then mask [BT], dlogp [BT]. */
        d_buf = (float *)cuda_buf_alloc((size_t)BT * 4 * sizeof(float), &e);
        d_met = (dapo_metrics_t *)cuda_buf_alloc(sizeof *d_met, &e);
        if (!d_buf || !d_met)
            goto fail;
        memcpy(h_adv, bd->adv, (size_t)BT * sizeof(float));
        memcpy(h_adv + BT, bd->weights, (size_t)BT * sizeof(float));
        if (cuda_buf_upload(d_buf + BT, h_adv, (size_t)BT * 2 * sizeof(float), cuda_model_stream(m),
                            &e))
            goto fail;
        model_batch_t b;
        memset(&b, 0, sizeof b);
        b.B = bd->B;
        b.T = bd->T;
        b.tokens = bd->tokens;
        b.targets = bd->targets;
        b.weights = bd->weights;
        b.count_load = 1;
        b.temperature = 1.0f; /* rollout.temperature */
        b.aux_z = 1e-3f;      /* learner.aux: RL mode */
        if (one_step(m, &b, d_buf, d_buf + BT, d_buf + 3 * BT, d_met, &e))
            goto fail;
        cudaEvent_t t0, t1;
        CUDA_CHECK(cudaEventCreate(&t0));
        CUDA_CHECK(cudaEventCreate(&t1));
        cuda_model_profile_enable(m, 1);
        double ms[CUDA_MODEL_PHASE_COUNT];
        cuda_model_profile_read(m, ms); /* drops the warm-up's marks */
        CUDA_CHECK(cudaEventRecord(t0, cuda_model_stream(m)));
        for (int i = 0; i < bd->steps; i++) {
            b.noise_key = (uint64_t)i + 1;
            if (one_step(m, &b, d_buf, d_buf + BT, d_buf + 3 * BT, d_met, &e))
                goto fail;
        }
        CUDA_CHECK(cudaEventRecord(t1, cuda_model_stream(m)));
        CUDA_CHECK(cudaEventSynchronize(t1));
        float total_ms = 0;
        CUDA_CHECK(cudaEventElapsedTime(&total_ms, t0, t1));
        CUDA_CHECK(cudaEventDestroy(t0));
        CUDA_CHECK(cudaEventDestroy(t1));
        cuda_model_profile_read(m, ms);
        for (int p = 0; p < CUDA_MODEL_PHASE_COUNT; p++)
            res->phase_ms[p] = ms[p] / bd->steps;
        res->step_ms = total_ms / bd->steps;
        res->tok_s = BT / (res->step_ms / 1e3);
        res->tflops = flops_per_step / (res->step_ms / 1e3) / 1e12;
        res->mfu = peak_tflops > 0 ? res->tflops / peak_tflops : NAN;
        size_t free1 = 0;
        CUDA_CHECK(cudaMemGetInfo(&free1, &total));
        cuda_buf_stats(NULL, &res->backend_peak);
        res->device_used = free0 > free1 ? free0 - free1 : 0;
        res->ok = 1;
    }
    cuda_buf_free((void **)&d_buf);
    cuda_buf_free((void **)&d_met);
    free(h_adv);
    cuda_model_destroy(&m);
    return;
fail:
    snprintf(res->error, sizeof res->error, "%s", e.msg);
    cuda_buf_stats(NULL, &res->backend_peak);
    cuda_buf_free((void **)&d_buf);
    cuda_buf_free((void **)&d_met);
    free(h_adv);
    cuda_model_destroy(&m);
}

static int parse_pos(const char *s, int *out) {
    char *end = NULL;
    const long v = strtol(s, &end, 10);
    if (!end || *end || v < 1 || v > (1 << 20))
        return -1;
    *out = (int)v;
    return 0;
}

int main(int argc, char **argv) {
    batch_data_t bd;
    memset(&bd, 0, sizeof bd);
    bd.B = DEFAULT_B;
    bd.T = DEFAULT_T;
    bd.steps = DEFAULT_STEPS;
    if (argc > 4 || (argc > 1 && parse_pos(argv[1], &bd.B)) ||
        (argc > 2 && parse_pos(argv[2], &bd.T)) || (argc > 3 && parse_pos(argv[3], &bd.steps))) {
        fprintf(stderr, "usage: gpu_train_step [B T [steps]] (positive integers)\n");
        return 2;
    }
    int ndev = 0;
    if (cudaGetDeviceCount(&ndev) != cudaSuccess || ndev < 1) {
        fprintf(stderr, "gpu_train_step: no CUDA device\n");
        return 2;
    }
    qerr_t e;
    model_config_t mc;
    if (model_config_preset("quillan-512m", &mc, &e) || model_config_validate(&mc, &e)) {
        fprintf(stderr, "gpu_train_step: %s\n", e.msg);
        return 1;
    }
    if (bd.T > mc.context) {
        fprintf(stderr, "gpu_train_step: T %d exceeds the context %d\n", bd.T, mc.context);
        return 2;
    }
    const int BT = bd.B * bd.T, P = bd.T / 8;
    bd.tokens = (int32_t *)calloc((size_t)BT, sizeof(int32_t));
    bd.targets = (int32_t *)calloc((size_t)BT, sizeof(int32_t));
    bd.weights = (float *)calloc((size_t)BT, sizeof(float));
    bd.adv = (float *)calloc((size_t)BT, sizeof(float));
    if (!bd.tokens || !bd.targets || !bd.weights || !bd.adv) {
        fprintf(stderr, "gpu_train_step: out of host memory\n");
        return 1;
    }
    /* Random ids; per row a prompt of T/8 tokens, then completion tokens with the next token as
     * target; one advantage per row (+1 / -1 alternating, as a group's would straddle 0). */
    rng_stream_t s;
    rng_stream_init(&s, 0x42454E43ULL /* "BENC" */, 1, 2);
    for (int i = 0; i < BT; i++)
        bd.tokens[i] = (int32_t)(rng_stream_next_u64(&s) % (uint64_t)mc.vocab_size);
    int weighted = 0;
    for (int b = 0; b < bd.B; b++)
        for (int t = 0; t < bd.T; t++) {
            const int i = b * bd.T + t, on = t >= P && t + 1 < bd.T;
            bd.targets[i] = on ? bd.tokens[i + 1] : 0;
            bd.weights[i] = on ? 1.0f : 0.0f;
            bd.adv[i] = on ? (b % 2 ? -1.0f : 1.0f) : 0.0f;
            weighted += on;
        }

    cudaDeviceProp prop;
    CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
    const double peak = card_peak(&prop);
    const macs_t mm = model_macs(&mc, bd.T, (double)weighted / BT);
    /* 2 FLOPs per MAC forward, 4 backward (input and weight gradients). */
    const double flops_tok = 2 * mm.fwd + 4 * mm.bwd;
    const double flops_step = flops_tok * BT;
    printf("## GPU training step, quillan-512m\n\n");
    printf("device: %s (sm_%d%d, %.1f GiB, %d SMs); dense FP16/BF16 tensor peak %s%.0f TFLOPS\n",
           prop.name, prop.major, prop.minor, (double)prop.totalGlobalMem / (1 << 30),
           prop.multiProcessorCount, peak > 0 ? "" : "unknown ", peak);
    printf("batch: B %d x T %d = %d tokens per step (prompt %d + completion %d per row, %d "
           "weighted); seed shape: batch_groups 16 x group_size 8 = 128 sequences per batch in "
           "4 minibatches = 32 per optimizer step, T = rollout.max_new_tokens 1024\n",
           bd.B, bd.T, BT, P, bd.T - P, weighted);
    printf("model FLOPs per token: %.3f GFLOP (forward %.3f GMAC incl. %d diffusion sampler "
           "steps, backward %.3f GMAC); checkpoint recompute is not counted (MFU, not HFU); "
           "%d timed steps after one warm-up\n\n",
           flops_tok / 1e9, mm.fwd / 1e9, mc.diffusion_steps, mm.bwd / 1e9, bd.steps);

    const config_t cfgs[] = {
        {"forced sm_75 (FP16 + loss scaling)", CUDA_MODEL_PREC_FP16, 1, 0},
        {"forced sm_75 (FP16 + loss scaling)", CUDA_MODEL_PREC_FP16, 1, 1},
        {"native", CUDA_MODEL_PREC_AUTO, 0, 0},
        {"native", CUDA_MODEL_PREC_AUTO, 0, 1},
    };
    const int nc = (int)(sizeof cfgs / sizeof cfgs[0]);
    result_t res[sizeof cfgs / sizeof cfgs[0]];
    for (int i = 0; i < nc; i++) {
        run_config(&cfgs[i], &mc, &bd, peak, flops_step, &res[i]);
        fprintf(stderr, "gpu_train_step: %s, checkpointing %s: %s\n", cfgs[i].label,
                cfgs[i].ckpt ? "on" : "off", res[i].ok ? "done" : res[i].error);
    }
    printf("| path | precision | checkpointing | step ms | tokens/s | TFLOPS | MFU | backend peak "
           "GiB | device used GiB |\n");
    printf("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |\n");
    for (int i = 0; i < nc; i++) {
        const result_t *r = &res[i];
        if (!r->ok) {
            printf("| %s | %s | %s | failed: %s | | | | %.2f | |\n", cfgs[i].label,
                   r->prec ? r->prec : "-", cfgs[i].ckpt ? "on" : "off", r->error,
                   (double)r->backend_peak / (1 << 30));
            continue;
        }
        printf("| %s | %s | %s | %.1f | %.0f | %.1f | %.1f%% | %.2f | %.2f |\n", cfgs[i].label,
               r->prec, cfgs[i].ckpt ? "on" : "off", r->step_ms, r->tok_s, r->tflops, 100 * r->mfu,
               (double)r->backend_peak / (1 << 30), (double)r->device_used / (1 << 30));
    }
    printf("\nTime per phase (ms per step, cudaEvents; phases cover the model's own calls, the "
           "DAPO loss and host waits fall between them):\n\n| phase |");
    for (int i = 0; i < nc; i++)
        printf(" %s%s |", cfgs[i].force_sm75 ? "sm_75" : "native", cfgs[i].ckpt ? " ckpt" : "");
    printf("\n| --- |");
    for (int i = 0; i < nc; i++)
        printf(" ---: |");
    printf("\n");
    for (int p = 0; p < CUDA_MODEL_PHASE_COUNT; p++) {
        printf("| %s |", cuda_model_phase_name((cuda_model_phase_t)p));
        for (int i = 0; i < nc; i++)
            printf(res[i].ok ? " %.2f |" : " - |", res[i].phase_ms[p]);
        printf("\n");
    }
    int failed = 0;
    for (int i = 0; i < nc; i++)
        failed += !res[i].ok;
    free(bd.tokens);
    free(bd.targets);
    free(bd.weights);
    free(bd.adv);
    return failed == nc ? 1 : 0;
}
