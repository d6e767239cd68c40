/* `quillan params`: the parameter and rollout-size breakdown of a config (MODEL.md). */
#include "model.h"

#include <string.h>

typedef struct {
    const char *label;
    const char *precision;
    size_t params;
    size_t bytes;
} row_t;

static const char *const comp_label[MODEL_COMP_COUNT] = {
    [MODEL_COMP_EMBED] = "token embeddings",
    [MODEL_COMP_ATTENTION] = "attention (wq, wk, wv, wo)",
    [MODEL_COMP_OVERSEER] = "overseer (shared expert + gate)",
    [MODEL_COMP_ROUTERS] = "mini-MoE expert routers",
    [MODEL_COMP_EXPERTS] = "mini-MoE experts",
    [MODEL_COMP_MICRO] = "micro agents (down, up)",
    [MODEL_COMP_MICRO_ROUTER] = "micro routers",
    [MODEL_COMP_DIFFUSION] = "bit-level diffusion (BitLinear)",
    [MODEL_COMP_NORMS] = "RMSNorm gains",
    [MODEL_COMP_HEAD] = "output head",
    [MODEL_COMP_BUFFERS] = "buffers (not trained)",
};

static const char *precision_name(quant_type_t q) {
    switch (q) {
    case QUANT_F32: return "FP32";
    case QUANT_F16: return "FP16";
    case QUANT_TERNARY: return "ternary 1.58b (2 bits + FP32 row scale)";
    case QUANT_INT4: return "INT4 g32 (4.5 bits)";
    case QUANT_INT8: return "INT8 + FP32 row scale";
    case QUANT_TYPE_COUNT: break;
    }
    return "?";
}

static void fmt_count(char *buf, size_t cap, size_t n) {
    if (n >= 1000000)
        snprintf(buf, cap, "%.2fM", (double)n / 1e6);
    else if (n >= 1000)
        snprintf(buf, cap, "%.1fK", (double)n / 1e3);
    else
        snprintf(buf, cap, "%zu", n);
}

static void fmt_bytes(char *buf, size_t cap, size_t n) {
    if (n >= 1000000)
        snprintf(buf, cap, "%.1f MB", (double)n / 1e6);
    else
        snprintf(buf, cap, "%.1f KB", (double)n / 1e3);
}

int model_params_print(const model_config_t *cfg, FILE *out, qerr_t *err) {
    model_t *m = model_new_table(cfg, err);
    if (!m)
        return -1;
    row_t rows[MODEL_COMP_COUNT];
    memset(rows, 0, sizeof rows);
    size_t total = 0, total_bytes = 0, fp32_bytes = 0, buf_rollout = 0;
    for (size_t i = 0; i < model_tensor_count(m); i++) {
        const model_tensor_t *t = model_tensor(m, i);
        row_t *r = &rows[t->component];
        r->label = comp_label[t->component];
        r->precision = precision_name(t->rollout);
        r->params += t->numel;
        const size_t b = t->in_rollout ? model_tensor_rollout_bytes(t) : 0;
        r->bytes += b;
        if (t->kind == MODEL_PARAM_BUFFER) {
            buf_rollout += b;
        } else {
            total += t->numel;
            total_bytes += b;
            fp32_bytes += 4 * t->numel;
        }
    }
    const model_config_t *c = model_config(m);
    fprintf(out, "| component | precision at rollout | parameters | bytes at rollout | share |\n");
    fprintf(out, "| --- | --- | ---: | ---: | ---: |\n");
    char a[32], b[32];
    for (int k = 0; k < MODEL_COMP_COUNT; k++) {
        if (k == MODEL_COMP_BUFFERS || rows[k].params == 0)
            continue;
        fmt_count(a, sizeof a, rows[k].params);
        fmt_bytes(b, sizeof b, rows[k].bytes);
        fprintf(out, "| %s | %s | %s | %s | %.1f%% |\n", rows[k].label, rows[k].precision, a, b,
                100.0 * (double)rows[k].params / (double)total);
    }
    fmt_count(a, sizeof a, total);
    fmt_bytes(b, sizeof b, total_bytes + buf_rollout);
    fprintf(out, "| **total** | | **%s** (%zu) | **%s** | 100%% |\n", a, total, b);
    fmt_count(a, sizeof a, rows[MODEL_COMP_BUFFERS].params);
    fmt_bytes(b, sizeof b, buf_rollout);
    fprintf(out,
            "| buffers: diffusion.R (training only), routers' bias_balance (FP32) | FP32 | "
            "%s (not counted) | %s (in the total) | |\n",
            a, b);
    fprintf(out,
            "\nFP32 master weights: %.1f MB; FP16: %.1f MB; quantized rollout snapshot: "
            "%.1f MB.\n",
            (double)fp32_bytes / 1e6, (double)fp32_bytes / 2e6,
            (double)(total_bytes + buf_rollout) / 1e6);
    fprintf(out, "Attention: %d layers x 4 x %d^2 = %.2fM (head dim %d).\n", c->num_layers, c->dim,
            4.0 * c->dim * c->dim * c->num_layers / 1e6, c->dim / c->num_heads);
    model_destroy(&m);
    return 0;
}
