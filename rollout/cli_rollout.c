/* The engine's subcommands of the front door: `quillan quantize` (checkpoint -> .qst) and
 * `quillan generate` (run a .qst on prompts). */
#include "checkpoint.h"
#include "cli.h"
#include "config.h"
#include "model.h"
#include "qpolicy.h"
#include "quillan.h"
#include "safetensors.h"

#include <errno.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

static int is_help(const char *arg) {
    return !strcmp(arg, "--help") || !strcmp(arg, "-h");
}

static int parse_num(const char *cmd, const char *opt, const char *s, double lo, double hi,
                     double *out) {
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (errno || end == s || *end || !(v >= lo && v <= hi)) {
        fprintf(stderr, "%s: %s expects a number in [%g, %g], got '%s'\n", cmd, opt, lo, hi, s);
        return 2;
    }
    *out = v;
    return 0;
}

/* ---- quillan quantize ---- */

static void quantize_usage(FILE *out) {
    fprintf(out, "usage: quillan quantize CHECKPOINT -o POLICY.qst [--version N] [--config FILE]\n"
                 "                        [--head-int8]\n"
                 "       quillan quantize --random PRESET -o POLICY.qst [--seed N] [--head-int8]\n"
                 "\n"
                 "Writes the quantized policy a rollout worker runs (MODEL.md formats: ternary\n"
                 "diffusion BitLinears, INT4 experts, INT8 micro agents, FP16 attention, overseer\n"
                 "and routers, FP32 embeddings and head, or an INT8 head with --head-int8).\n"
                 "CHECKPOINT is a checkpoint root (its `latest` is used), a step directory or its\n"
                 "model.safetensors; the model config comes from the checkpoint unless --config\n"
                 "names a run config. --random quantizes a freshly initialised model of a preset\n"
                 "(tiny, quillan-512m), for benchmarks.\n");
}

int cli_quantize_main(int argc, char **argv) {
    const char *cmd = "quillan quantize", *in = NULL, *out = NULL, *cfg_file = NULL;
    const char *preset = NULL;
    double version = 0, seed = 1;
    int head_int8 = 0;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (is_help(a)) {
            quantize_usage(stdout);
            return 0;
        }
        if (!strcmp(a, "-o") && i + 1 < argc)
            out = argv[++i];
        else if (!strcmp(a, "--config") && i + 1 < argc)
            cfg_file = argv[++i];
        else if (!strcmp(a, "--random") && i + 1 < argc)
            preset = argv[++i];
        else if (!strcmp(a, "--version") && i + 1 < argc) {
            if (parse_num(cmd, a, argv[++i], 0, 9e15, &version))
                return 2;
        } else if (!strcmp(a, "--seed") && i + 1 < argc) {
            if (parse_num(cmd, a, argv[++i], 0, 9e15, &seed))
                return 2;
        } else if (!strcmp(a, "--head-int8"))
            head_int8 = 1;
        else if (a[0] == '-' || in) {
            fprintf(stderr, "%s: unexpected argument '%s'\n", cmd, a);
            quantize_usage(stderr);
            return 2;
        } else
            in = a;
    }
    if (!out || (!in == !preset)) {
        quantize_usage(stderr);
        return 2;
    }
    qerr_t err = {0};
    quillan_config_t *cfg = malloc(sizeof *cfg);
    model_t *m = NULL;
    qpolicy_t *q = NULL;
    int rc = 1;
    if (!cfg) {
        fprintf(stderr, "%s: out of memory\n", cmd);
        return 1;
    }
    char dir[4096];
    if (preset) {
        config_defaults(cfg);
        if (model_config_preset(preset, &cfg->model, &err) < 0)
            goto fail;
        cfg->model.seed = (uint64_t)seed;
    } else {
        /* The checkpoint's own config unless --config names a run config. */
        config_defaults(cfg);
        if (checkpoint_config_read(in, cfg_file ? NULL : cfg, dir, sizeof dir, &err) < 0 ||
            (cfg_file && config_load(cfg, cfg_file, &err) < 0) || config_validate(cfg, &err) < 0)
            goto fail;
    }
    if (head_int8)
        cfg->model.head_int8 = true;
    m = preset ? model_new(&cfg->model, &err) : checkpoint_model_load(dir, &cfg->model, NULL, &err);
    if (!m)
        goto fail;
    q = qpolicy_build(m, (uint64_t)version, &err);
    if (!q || qpolicy_write(q, out, &err) < 0)
        goto fail;
    size_t len;
    qpolicy_bytes(q, &len);
    printf("wrote %s: %zu tensors, %.1f MB, version %llu\n", out, qpolicy_tensor_count(q),
           (double)len / 1e6, (unsigned long long)version);
    rc = 0;
    goto done;
fail:
    fprintf(stderr, "%s: %s\n", cmd, err.msg);
done:
    qpolicy_destroy(&q);
    model_destroy(&m);
    free(cfg);
    return rc;
}

/* ---- quillan generate ---- */

static void generate_usage(FILE *out) {
    fprintf(out,
            "usage: quillan generate POLICY.qst (--prompt TEXT | --file PROMPTS.jsonl)\n"
            "                        [--n 8] [--temperature 0.8] [--top-k 0] [--top-p 1]\n"
            "                        [--max-new-tokens 100] [--threads N] [--batch 32]\n"
            "                        [--seed 0]\n"
            "\n"
            "Samples --n completions of each prompt (BOS + the prompt's tokens; a JSONL file\n"
            "gives one {\"prompt\": TEXT} object a line) with the quantized policy, and prints\n"
            "them with their mean log-probability, then tokens/s and peak memory. --threads 0\n"
            "(default) uses every core; --temperature 0 is greedy.\n");
}

/* Appends the "prompt" of every line of a JSONL file; returns 0 or -1 with err (file:line). */
static int read_prompts(const char *path, char ***texts, int *n, qerr_t *err) {
    FILE *f = fopen(path, "r");
    if (!f)
        return qerr_set(err, errno == ENOENT ? QERR_NOTFOUND : QERR_IO, "%s: cannot open: %s", path,
                        strerror(errno));
    char *line = NULL;
    size_t cap = 0;
    long lineno = 0;
    int rc = 0;
    while (getline(&line, &cap, f) >= 0) {
        lineno++;
        if (strspn(line, " \t\r\n") == strlen(line))
            continue;
        json_error_t je;
        json_t *o = json_loads(line, 0, &je);
        const char *p = json_string_value(json_object_get(o, "prompt"));
        char **grown = p ? realloc(*texts, (size_t)(*n + 1) * sizeof **texts) : NULL;
        if (!p || !grown) {
            rc = qerr_set(err, QERR_PARSE,
                          "%s:%ld: expected a JSON object with a \"prompt\" string", path, lineno);
            json_decref(o);
            break;
        }
        *texts = grown;
        (*texts)[(*n)++] = strdup(p);
        json_decref(o);
    }
    free(line);
    fclose(f);
    return rc;
}

int cli_generate_main(int argc, char **argv) {
    const char *cmd = "quillan generate", *path = NULL, *file = NULL;
    char **texts = NULL;
    int ntexts = 0;
    double n = 8, temp = 0.8, top_k = 0, top_p = 1, max_new = 100, threads = 0, batch = 32,
           seed = 0;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (is_help(a)) {
            generate_usage(stdout);
            return 0;
        }
        int bad = 0;
        if (!strcmp(a, "--prompt") && i + 1 < argc) {
            char **grown = realloc(texts, (size_t)(ntexts + 1) * sizeof *texts);
            if (!grown)
                return 1;
            texts = grown;
            texts[ntexts++] = strdup(argv[++i]);
        } else if (!strcmp(a, "--file") && i + 1 < argc)
            file = argv[++i];
        else if (!strcmp(a, "--n") && i + 1 < argc)
            bad = parse_num(cmd, a, argv[++i], 1, 4096, &n);
        else if (!strcmp(a, "--temperature") && i + 1 < argc)
            bad = parse_num(cmd, a, argv[++i], 0, 100, &temp);
        else if (!strcmp(a, "--top-k") && i + 1 < argc)
            bad = parse_num(cmd, a, argv[++i], 0, 1e9, &top_k);
        else if (!strcmp(a, "--top-p") && i + 1 < argc)
            bad = parse_num(cmd, a, argv[++i], 1e-6, 1, &top_p);
        else if (!strcmp(a, "--max-new-tokens") && i + 1 < argc)
            bad = parse_num(cmd, a, argv[++i], 1, 1e6, &max_new);
        else if (!strcmp(a, "--threads") && i + 1 < argc)
            bad = parse_num(cmd, a, argv[++i], 0, 256, &threads);
        else if (!strcmp(a, "--batch") && i + 1 < argc)
            bad = parse_num(cmd, a, argv[++i], 1, 4096, &batch);
        else if (!strcmp(a, "--seed") && i + 1 < argc)
            bad = parse_num(cmd, a, argv[++i], 0, 9e15, &seed);
        else if (a[0] == '-' || path) {
            fprintf(stderr, "%s: unexpected argument '%s'\n", cmd, a);
            bad = 2;
        } else
            path = a;
        if (bad) {
            generate_usage(stderr);
            for (int k = 0; k < ntexts; k++)
                free(texts[k]);
            free(texts);
            return 2;
        }
    }
    if (!path || (ntexts == 0 && !file)) {
        generate_usage(stderr);
        free(texts);
        return 2;
    }
    qerr_t err = {0};
    int rc = 1;
    quillan_policy_t *p = NULL;
    quillan_engine_t *e = NULL;
    quillan_prompt_t *prompts = NULL;
    quillan_group_t *groups = NULL;
    int nprompts = 0;
    if (file && read_prompts(file, &texts, &ntexts, &err) < 0)
        goto fail;
    p = quillan_policy_load_file(path, &err);
    if (!p)
        goto fail;
    quillan_engine_params_t ep;
    quillan_engine_params_default(&ep);
    ep.threads = (int)threads;
    ep.max_batch = (int)batch;
    ep.record_routing = 0;
    e = quillan_engine_new(&ep, &err);
    prompts = calloc((size_t)ntexts, sizeof *prompts);
    groups = calloc((size_t)ntexts, sizeof *groups);
    if (!e || !prompts || !groups)
        goto fail;
    for (int i = 0; i < ntexts; i++) {
        int32_t *ids;
        size_t nid;
        if (quillan_tokenize(p, texts[i], strlen(texts[i]), 1, &ids, &nid, &err) < 0)
            goto fail;
        quillan_prompt_t *pr = &prompts[nprompts++];
        quillan_sampling_default(&pr->sampling);
        pr->prompt_id = (uint64_t)i;
        pr->tokens = ids;
        pr->n_tokens = nid > (size_t)1 << 30 ? 1 << 30 : (int)nid;
        pr->n_samples = (int)n;
        pr->sampling.temperature = (float)temp;
        pr->sampling.top_k = (int)top_k;
        pr->sampling.top_p = (float)top_p;
        pr->sampling.max_new_tokens = (int)max_new;
        pr->sampling.seed = (uint64_t)seed;
    }
    struct timespec ts0, ts1;
    clock_gettime(CLOCK_MONOTONIC, &ts0);
    if (quillan_generate(e, p, prompts, nprompts, groups, NULL, NULL, &err) < 0)
        goto fail;
    clock_gettime(CLOCK_MONOTONIC, &ts1);
    const double secs = (double)(ts1.tv_sec - ts0.tv_sec) + 1e-9 * (ts1.tv_nsec - ts0.tv_nsec);
    long ntok = 0;
    for (int i = 0; i < nprompts; i++)
        for (int s = 0; s < groups[i].n_samples; s++) {
            const quillan_sample_t *sm = &groups[i].samples[s];
            double lp = 0;
            for (int k = 0; k < sm->n_tokens; k++)
                lp += sm->logprobs[k];
            ntok += sm->n_tokens;
            size_t len = 0;
            char *text = quillan_detokenize(p, sm->tokens, (size_t)sm->n_tokens, &len, &err);
            if (!text)
                goto fail;
            printf("[prompt %d sample %d] %d tokens, %s, mean logprob %.3f\n%s%.*s\n", i, s,
                   sm->n_tokens, quillan_finish_name(sm->finish),
                   sm->n_tokens ? lp / sm->n_tokens : 0.0, texts[i], (int)len, text);
            free(text);
        }
    quillan_stats_t st;
    quillan_engine_stats(e, &st);
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    printf("generated %ld tokens in %.2f s: %.1f tokens/s (%d threads, batch %d; prefill %ld "
           "tokens); peak memory %.1f MB\n",
           ntok, secs, secs > 0 ? (double)ntok / secs : 0.0, quillan_engine_threads(e), (int)batch,
           st.prefill_tokens, (double)ru.ru_maxrss / 1024.0);
    rc = 0;
    goto done;
fail:
    fprintf(stderr, "%s: %s\n", cmd, err.msg[0] ? err.msg : "out of memory");
done:
    for (int i = 0; i < nprompts; i++)
        free((void *)prompts[i].tokens);
    for (int i = 0; groups && i < ntexts; i++)
        quillan_group_free(&groups[i]);
    for (int k = 0; k < ntexts; k++)
        free(texts[k]);
    free(texts);
    free(prompts);
    free(groups);
    quillan_engine_destroy(&e);
    quillan_policy_release(&p);
    return rc;
}
