/* Whole-model parity of the device model (learner/cuda/cuda_model.h) against the CPU reference
 * (common/model.h, quillan_core) on the tiny preset and a mid shape:
 *   - forward: loss and its terms, per-token log-probs and entropy;
 *   - backward of the batch's CE (+ aux terms): every parameter tensor's gradient;
 *   - backward of an upstream dlogp / dentropy (the DAPO path): every gradient again;
 *   - checkpointed backward against the plain one (same arithmetic);
 *   - one AdamW step from the same gradients.
 * Paths: FP32 (the checking path), FP16 forced (the T4 path, dynamic loss scaling) and the
 * card's native mixed precision (BF16 on sm_80+, FP16 below).
 *
 * Both sides start from the same parameters (the CPU's, uploaded) and the device replays the
 * CPU forward's routing and diffusion plan, so discrete choices cannot differ and the errors
 * measure arithmetic only; the device's own choices are counted as the mismatch fraction.
 *
 * Errors are normalised: arrays by max|gpu - cpu| / max|cpu|, a gradient tensor by
 * ||gpu - cpu||_2 / max(||cpu||_2, GRAD_FLOOR * ||cpu gradient of the whole model||_2).
 * One line per check: PARITY <name> max_rel_err=<e> tol=<t> PASS|FAIL (NaN/Inf fail); exit 1
 * if any check fails, 77 (CTest's skip) when no CUDA device is present. */
#include "cuda_buf.h"
#include "cuda_model.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

extern "C" {
#include "rng.h"
}

/* A gradient tensor under this share of the whole gradient's norm is judged against the floor:
 * its own relative error is summation noise of a near-zero quantity. */
#define GRAD_FLOOR 1e-4

typedef struct {
    const char *name;
    cuda_model_precision_t prec;
    int force_sm75;
    /* FP32: only the summation order differs (cuBLAS, tiled attention, per-row reductions),
     * ~1e-6 relative per op; the int8 activation codes of the BitLinears may flip by one where
     * x / s_x sits within rounding of a half, which moves the diffusion gradients most. */
    double tol_fwd, tol_grad, tol_mismatch;
} path_t;

static const path_t paths[] = {
    {"fp32", CUDA_MODEL_PREC_FP32, 0, 1e-4, 2e-3, 0.01},
    /* FP16 operands: activations rounded to 11 bits (4.9e-4 relative) before every GEMM and
     * attention product, weights are the FP16 fake-quantized values themselves (exact) except
     * INT4 expert values, which FP16 rounds; errors compound over the layers. */
    {"fp16_forced_sm75", CUDA_MODEL_PREC_FP16, 1, 1e-2, 5e-2, 0.05},
    /* Native: BF16 on sm_80+ (8 bits: 3.9e-3 relative per rounding), FP16 below. */
    {"native", CUDA_MODEL_PREC_AUTO, 0, 3e-2, 1.5e-1, 0.10},
};

/* Recompute runs the forward kernels again on the same inputs: identical arithmetic. */
#define TOL_CHECKPOINT 1e-6
/* AdamW from identical gradients: the device update is optim_step's FP32 operations; only the
 * norm (a double sum in another order) may differ in its last bits. In units of lr. */
#define TOL_ADAM 1e-5

static int failures;

static void report(const char *shape, const char *path, const char *what, double e, double tol) {
    const int ok = e <= tol; /* NaN compares false */
    if (!ok)
        failures++;
    printf("PARITY model.%s.%s.%s max_rel_err=%.3e tol=%.1e %s\n", shape, path, what, e, tol,
           ok ? "PASS" : "FAIL");
}

static double array_err(const float *a, const float *b, size_t n) {
    double num = 0, den = 0;
    for (size_t i = 0; i < n; i++) {
        const double d = fabs((double)a[i] - (double)b[i]);
        if (!isfinite((double)a[i]))
            return NAN;
        num = d > num ? d : num;
        den = fabs((double)b[i]) > den ? fabs((double)b[i]) : den;
    }
    return den > 0 ? num / den : num;
}

static double scalar_err(double a, double b) {
    if (!isfinite(a))
        return NAN;
    return fabs(a - b) / (fabs(b) > 1e-12 ? fabs(b) : 1.0);
}

static double norm2(const float *a, size_t n) {
    double s = 0;
    for (size_t i = 0; i < n; i++)
        s += (double)a[i] * a[i];
    return sqrt(s);
}

/* Per-tensor gradient errors; returns the largest, printing the worst tensor's name. */
static void grad_checks(const char *shape, const char *path, const char *what, const model_t *tab,
                        const float *gpu, const float *cpu, double tol) {
    const size_t n = model_num_reals(tab);
    const double floor = GRAD_FLOOR * norm2(cpu, n);
    double worst = 0;
    const char *worst_name = "-";
    int nonzero = 0;
    for (size_t i = 0; i < model_tensor_count(tab); i++) {
        const model_tensor_t *t = model_tensor(tab, i);
        if (t->kind == MODEL_PARAM_BUFFER)
            continue;
        double d = 0, r = 0;
        for (size_t j = 0; j < t->numel; j++) {
            const double a = gpu[t->offset + j], b = cpu[t->offset + j];
            d += (a - b) * (a - b);
            r += b * b;
        }
        nonzero += r > 0;
        const double den = sqrt(r) > floor ? sqrt(r) : floor;
        double e = den > 0 ? sqrt(d) / den : sqrt(d);
        if (!isfinite(e))
            e = NAN;
        char name[160];
        snprintf(name, sizeof name, "%s.%s", what, t->name);
        report(shape, path, name, e, tol);
        if (!(e <= worst)) {
            worst = e;
            worst_name = t->name;
        }
    }
    printf("INFO model.%s.%s.%s worst tensor %s (%.3e), %d tensors with a gradient\n", shape, path,
           what, worst_name, worst, nonzero);
    /* A backward that produced nothing must not pass by comparing zeros with zeros. */
    char name[64];
    snprintf(name, sizeof name, "%s.nonzero_tensors", what);
    report(shape, path, name, nonzero > 0 ? 0.0 : 1.0, 0.0);
}

typedef struct {
    const char *name;
    model_config_t cfg;
    int B, T;
} shape_t;

/* The CPU reference of one shape: model, batch, records and results. */
typedef struct {
    model_t *m;
    int32_t *tokens, *targets;
    float *weights, *dlogp, *dentropy;
    model_batch_t batch;
    model_stats_t st;
    float *logp, *entropy;
    float *grads_ce, *grads_up; /* gradients of the CE loss and of the upstream (DAPO) path */
    moe_route_t *route;         /* [L] copies of the forward's routing */
    diffusion_plan_t plan;
} ref_t;

static void die(const char *what, const qerr_t *e) {
    fprintf(stderr, "gpu_parity_model: %s: %s\n", what, e->msg);
    exit(1);
}

static void *xcalloc(size_t n, size_t size) {
    void *p = calloc(n, size);
    if (!p) {
        fprintf(stderr, "gpu_parity_model: out of host memory\n");
        exit(1);
    }
    return p;
}

static void ref_build(ref_t *r, const shape_t *sh) {
    qerr_t e;
    const int B = sh->B, T = sh->T, BT = B * T, V = sh->cfg.vocab_size;
    memset(r, 0, sizeof *r);
    r->m = model_new(&sh->cfg, &e);
    if (!r->m)
        die("model_new", &e);
    r->tokens = (int32_t *)xcalloc((size_t)BT, sizeof(int32_t));
    r->targets = (int32_t *)xcalloc((size_t)BT, sizeof(int32_t));
    r->weights = (float *)xcalloc((size_t)BT, sizeof(float));
    r->dlogp = (float *)xcalloc((size_t)BT, sizeof(float));
    r->dentropy = (float *)xcalloc((size_t)BT, sizeof(float));
    r->logp = (float *)xcalloc((size_t)BT, sizeof(float));
    r->entropy = (float *)xcalloc((size_t)BT, sizeof(float));
    const size_t n = model_num_reals(r->m);
    r->grads_ce = (float *)xcalloc(n, sizeof(float));
    r->grads_up = (float *)xcalloc(n, sizeof(float));
    /* Rows of random ids; a prompt of T/4 tokens (weight 0), then completion tokens (weight 1)
     * with the next token as target; an upstream gradient like DAPO's on those tokens. */
    rng_stream_t s;
    rng_stream_init(&s, 0x50415249ULL /* "PARI" */, (uint64_t)V, (uint64_t)BT);
    for (int i = 0; i < BT; i++)
        r->tokens[i] = (int32_t)(rng_stream_next_u64(&s) % (uint64_t)V);
    for (int b = 0; b < B; b++)
        for (int t = 0; t < T; t++) {
            const int i = b * T + t;
            const int on = t >= T / 4 && t + 1 < T;
            r->targets[i] = on ? r->tokens[i + 1] : 0;
            r->weights[i] = on ? 1.0f : 0.0f;
            r->dlogp[i] = on ? (rng_stream_uniform(&s) - 0.5f) / (float)BT : 0.0f;
            r->dentropy[i] = on ? (rng_stream_uniform(&s) - 0.5f) * 1e-2f / (float)BT : 0.0f;
        }
    model_batch_t *bt = &r->batch;
    memset(bt, 0, sizeof *bt);
    bt->B = B;
    bt->T = T;
    bt->tokens = r->tokens;
    bt->targets = r->targets;
    bt->weights = r->weights;
    bt->training = 0;
    bt->count_load = 1;
    bt->noise_key = 7;
    bt->temperature = 0.9f;  /* not 1, so the temperature path is exercised */
    bt->aux_balance = 0.01f; /* SFT's values: every aux term in the loss */
    bt->aux_z = 1e-3f;
    bt->aux_diffusion = 0.2f;
    if (model_forward(r->m, bt, &r->st, &e))
        die("model_forward", &e);
    memcpy(r->logp, model_logp(r->m), (size_t)BT * sizeof(float));
    memcpy(r->entropy, model_entropy(r->m), (size_t)BT * sizeof(float));
    const int L = sh->cfg.num_layers;
    moe_dims_t md;
    moe_dims_from_config(&md, model_config(r->m));
    r->route = (moe_route_t *)xcalloc((size_t)L, sizeof *r->route);
    for (int l = 0; l < L; l++) {
        const moe_route_t *src = model_route(r->m, l);
        if (moe_route_init(&r->route[l], &md, BT, &e))
            die("moe_route_init", &e);
        const size_t k = (size_t)BT * md.KM;
        memcpy(r->route[l].mini, src->mini, k * sizeof(int32_t));
        memcpy(r->route[l].expert, src->expert, k * md.KE * sizeof(int32_t));
        memcpy(r->route[l].micro, src->micro, k * md.KN * sizeof(int32_t));
        r->route[l].BT = BT;
    }
    const diffusion_plan_t *pl = model_plan_record(r->m);
    if (diffusion_plan_init(&r->plan, pl->Lb, BT, &e))
        die("diffusion_plan_init", &e);
    memcpy(r->plan.z1, pl->z1, (size_t)BT * pl->Lw * sizeof(uint64_t));
    memcpy(r->plan.z0, pl->z0, (size_t)BT * pl->Lw * sizeof(uint64_t));
    r->plan.BT = BT;
    model_grads_zero(r->m);
    model_backward(r->m, NULL, NULL);
    memcpy(r->grads_ce, model_grads(r->m), n * sizeof(float));
    /* The upstream path on a second forward of the same batch (the CPU's forward state is the
     * same; only the loss differs). */
    if (model_forward(r->m, bt, NULL, &e))
        die("model_forward", &e);
    model_grads_zero(r->m);
    model_backward(r->m, r->dlogp, r->dentropy);
    memcpy(r->grads_up, model_grads(r->m), n * sizeof(float));
}

static void ref_free(ref_t *r, int L) {
    for (int l = 0; r->route && l < L; l++)
        moe_route_free(&r->route[l]);
    free(r->route);
    diffusion_plan_free(&r->plan);
    free(r->tokens);
    free(r->targets);
    free(r->weights);
    free(r->dlogp);
    free(r->dentropy);
    free(r->logp);
    free(r->entropy);
    free(r->grads_ce);
    free(r->grads_up);
    model_destroy(&r->m);
}

/* One device run of a shape on a path (checkpointing on or off): forward with the CPU's
 * records, the two backwards, their gradients into g_ce / g_up. Returns the device's own
 * routing mismatch fraction. */
static double gpu_run(const shape_t *sh, const path_t *p, int ckpt, ref_t *r, float *g_ce,
                      float *g_up, int checks) {
    qerr_t e;
    cuda_model_options_t opt;
    cuda_model_options_default(&opt);
    opt.precision = p->prec;
    opt.force_sm75 = p->force_sm75;
    opt.checkpointing = ckpt;
    cuda_model_t *m = cuda_model_new(&sh->cfg, &opt, &e);
    if (!m)
        die("cuda_model_new", &e);
    const int BT = sh->B * sh->T, L = sh->cfg.num_layers;
    char path[64];
    snprintf(path, sizeof path, "%s%s(%s)", p->name, ckpt ? "_ckpt" : "",
             cuda_model_precision_name(cuda_model_precision(m)));
    if (cuda_model_params_upload(m, model_params_const(r->m), &e))
        die("upload", &e);
    model_batch_t b = r->batch;
    b.replay = r->route;
    b.plan_replay = &r->plan;
    model_stats_t st;
    if (cuda_model_forward(m, &b, &st, &e))
        die("cuda_model_forward", &e);
    float *lp = (float *)xcalloc((size_t)BT, sizeof(float));
    float *en = (float *)xcalloc((size_t)BT, sizeof(float));
    if (cuda_model_logp_download(m, lp, en, &e))
        die("logp download", &e);
    if (checks) {
        report(sh->name, path, "loss", scalar_err(st.loss, r->st.loss), p->tol_fwd);
        report(sh->name, path, "ce", scalar_err(st.ce, r->st.ce), p->tol_fwd);
        report(sh->name, path, "balance", scalar_err(st.balance, r->st.balance), p->tol_fwd);
        report(sh->name, path, "z", scalar_err(st.z, r->st.z), p->tol_fwd);
        report(sh->name, path, "diffusion", scalar_err(st.diffusion, r->st.diffusion), p->tol_fwd);
        report(sh->name, path, "logp", array_err(lp, r->logp, (size_t)BT), p->tol_fwd);
        report(sh->name, path, "entropy", array_err(en, r->entropy, (size_t)BT), p->tol_fwd);
        /* The routing the device returns is the replayed record itself. */
        moe_route_t got;
        moe_dims_t md;
        moe_dims_from_config(&md, cuda_model_config(m));
        if (moe_route_init(&got, &md, BT, &e))
            die("moe_route_init", &e);
        long diff = 0;
        for (int l = 0; l < L; l++) {
            if (cuda_model_route_download(m, l, &got, &e))
                die("route download", &e);
            for (int i = 0; i < BT * md.KM; i++)
                diff += got.mini[i] != r->route[l].mini[i];
        }
        moe_route_free(&got);
        report(sh->name, path, "replayed_routing", (double)diff, 0.0);
    }
    const double mism = st.decisions > 0 ? (double)st.mismatches / (double)st.decisions : 0;
    cuda_model_grads_zero(m);
    cuda_model_backward(m, NULL, NULL);
    if (cuda_model_grads_download(m, g_ce, &e))
        die("grads download", &e);
    /* Upstream path: the device gradient arrays carry the loss scale, as from the DAPO loss. */
    const float scale = cuda_model_loss_scale(m);
    float *up = (float *)xcalloc((size_t)BT * 2, sizeof(float));
    for (int i = 0; i < BT; i++) {
        up[i] = r->dlogp[i] * scale;
        up[BT + i] = r->dentropy[i] * scale;
    }
    float *dup = (float *)cuda_buf_alloc((size_t)BT * 2 * sizeof(float), &e);
    if (!dup || cuda_buf_upload(dup, up, (size_t)BT * 2 * sizeof(float), cuda_model_stream(m), &e))
        die("upstream upload", &e);
    if (cuda_model_forward(m, &b, NULL, &e))
        die("cuda_model_forward", &e);
    cuda_model_grads_zero(m);
    cuda_model_backward(m, dup, dup + BT);
    if (cuda_model_grads_download(m, g_up, &e))
        die("grads download", &e);
    cuda_buf_free((void **)&dup);
    if (checks) {
        grad_checks(sh->name, path, "grad_ce", cuda_model_table(m), g_ce, r->grads_ce, p->tol_grad);
        grad_checks(sh->name, path, "grad_upstream", cuda_model_table(m), g_up, r->grads_up,
                    p->tol_grad);
    }
    free(lp);
    free(en);
    free(up);
    cuda_model_destroy(&m);
    return mism;
}

/* One AdamW step on both sides from the CPU's CE gradients. */
static void adam_check(const shape_t *sh, ref_t *r) {
    qerr_t e;
    cuda_model_options_t opt;
    cuda_model_options_default(&opt);
    opt.precision = CUDA_MODEL_PREC_FP32;
    cuda_model_t *m = cuda_model_new(&sh->cfg, &opt, &e);
    if (!m || cuda_model_params_upload(m, model_params_const(r->m), &e))
        die("cuda model", &e);
    optim_config_t oc;
    optim_config_default(&oc);
    oc.lr = 1e-3;
    oc.grad_clip = 0.5; /* below the tiny models' first norms: clipping is exercised */
    optim_t *o = optim_new(&oc, r->m, &e);
    if (!o || cuda_model_optim_init(m, &oc, &e))
        die("optimizer", &e);
    const size_t n = model_num_reals(r->m);
    memcpy(model_grads(r->m), r->grads_ce, n * sizeof(float));
    if (cuda_buf_upload(cuda_model_grads_device(m), r->grads_ce, n * sizeof(float),
                        cuda_model_stream(m), &e))
        die("grads upload", &e);
    optim_result_t rc, rg;
    optim_step(o, r->m, r->st.loss, &rc);
    if (cuda_model_optim_step(m, r->st.loss, &rg, &e) < 0)
        die("cuda_model_optim_step", &e);
    float *p = (float *)xcalloc(n, sizeof(float));
    if (cuda_model_params_download(m, p, &e))
        die("params download", &e);
    const float *pc = model_params_const(r->m);
    double worst = 0;
    for (size_t i = 0; i < n; i++) {
        const double d = fabs((double)p[i] - (double)pc[i]) / oc.lr;
        worst = !(d <= worst) ? d : worst;
    }
    report(sh->name, "fp32", "adamw_params", worst, TOL_ADAM);
    report(sh->name, "fp32", "adamw_grad_norm", scalar_err(rg.grad_norm, rc.grad_norm), 1e-9);
    report(sh->name, "fp32", "adamw_applied", rg.applied == rc.applied ? 0.0 : 1.0, 0.0);
    free(p);
    optim_destroy(&o);
    cuda_model_destroy(&m);
}

static void run_shape(const shape_t *sh) {
    ref_t r;
    ref_build(&r, sh);
    printf("INFO model.%s: %zu reals, B %d T %d, CPU loss %.6f ce %.6f\n", sh->name,
           model_num_reals(r.m), sh->B, sh->T, r.st.loss, r.st.ce);
    const size_t n = model_num_reals(r.m);
    float *g_ce = (float *)xcalloc(n, sizeof(float)), *g_up = (float *)xcalloc(n, sizeof(float));
    float *k_ce = (float *)xcalloc(n, sizeof(float)), *k_up = (float *)xcalloc(n, sizeof(float));
    for (size_t i = 0; i < sizeof paths / sizeof paths[0]; i++) {
        const path_t *p = &paths[i];
        /* The device's own top-k against the CPU's record, on the same parameters. */
        const double mism = gpu_run(sh, p, 0, &r, g_ce, g_up, 1);
        report(sh->name, p->name, "own_routing_mismatch_frac", mism, p->tol_mismatch);
        /* Checkpointing: the same gradients as without it. */
        gpu_run(sh, p, 1, &r, k_ce, k_up, 0);
        report(sh->name, p->name, "checkpoint_grad_ce", array_err(k_ce, g_ce, n), TOL_CHECKPOINT);
        report(sh->name, p->name, "checkpoint_grad_upstream", array_err(k_up, g_up, n),
               TOL_CHECKPOINT);
    }
    adam_check(sh, &r);
    free(g_ce);
    free(g_up);
    free(k_ce);
    free(k_up);
    ref_free(&r, sh->cfg.num_layers);
}

int main(void) {
    int ndev = 0;
    if (cudaGetDeviceCount(&ndev) != cudaSuccess || ndev < 1) {
        fprintf(stderr, "gpu_parity_model: no CUDA device\n");
        return 77;
    }
    qerr_t e;
    shape_t shapes[2];
    memset(shapes, 0, sizeof shapes);
    shapes[0].name = "tiny";
    if (model_config_preset("tiny", &shapes[0].cfg, &e))
        die("preset", &e);
    shapes[0].B = 2;
    shapes[0].T = 48;
    /* Mid: head dim 64 (the 512m's), a GPT-2-kind vocabulary of 5000 that crosses the device
     * head's vocabulary tiles, T past one attention tile, every MoE level with several picks. */
    shapes[1].name = "mid";
    if (model_config_preset("quillan-512m", &shapes[1].cfg, &e))
        die("preset", &e);
    model_config_t *c = &shapes[1].cfg;
    c->vocab_size = 5000;
    c->dim = 256;
    c->num_layers = 3;
    c->num_heads = 4;
    c->context = 256;
    c->overseer_hidden = 64;
    c->num_mini_moes = 8;
    c->num_experts_per_mini = 4;
    c->expert_hidden = 64;
    c->num_micros_per_mini = 40;
    c->diffusion_bits = 64;
    c->diffusion_width = 192;
    c->diffusion_blocks = 2;
    c->diffusion_ffn = 256;
    c->diffusion_time_dim = 64;
    c->diffusion_steps = 4;
    c->diffusion_layer = -1;
    shapes[1].B = 3;
    shapes[1].T = 160;
    for (int i = 0; i < 2; i++)
        run_shape(&shapes[i]);
    printf("gpu_parity_model: %d failure(s)\n", failures);
    return failures ? 1 : 0;
}
