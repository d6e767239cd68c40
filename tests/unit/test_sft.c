/* SFT: bit-identical resume, the loss falls, and bad input gives errors naming the file and
 * the problem. */
#include <criterion/criterion.h>

#include "checkpoint.h"
#include "config.h"
#include "data_task.h"
#include "log.h"
#include "model.h"
#include "sft.h"

#include <jansson.h>
#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define RESUME_N 4 /* steps before the checkpoint */
#define RESUME_M 4 /* steps after it */

static void tmpdir(char *buf, size_t cap) {
    snprintf(buf, cap, "/tmp/quillan_sft_XXXXXX");
    cr_assert(mkdtemp(buf));
}

static void set(quillan_config_t *cfg, const char *a) {
    qerr_t err;
    cr_assert(config_set(cfg, a, &err) == 0, "%s: %s", a, err.msg);
}

/* A small tiny-preset variant on the addition task in dir; one thread. */
static quillan_config_t *small_run(const char *dir) {
    log_set_level(LOG_WARN);
    quillan_config_t *cfg = malloc(sizeof *cfg);
    qerr_t err;
    config_defaults(cfg);
    set(cfg, "learner.mode=sft");
    set(cfg, "learner.threads=1");
    set(cfg, "learner.lr=3e-3");
    set(cfg, "learner.warmup_steps=2");
    set(cfg, "learner.checkpoint_interval=0");
    cfg->learner.checkpoint_dir[0] = '\0'; /* no checkpoints unless a test asks */
    set(cfg, "model.dim=64");
    set(cfg, "model.num_heads=2");
    set(cfg, "model.expert_hidden=64");
    set(cfg, "model.diffusion_width=32");
    set(cfg, "model.diffusion_ffn=64");
    set(cfg, "model.diffusion_time_dim=16");
    set(cfg, "model.dropout=0.1"); /* noise that must also resume exactly */
    snprintf(cfg->data.train, sizeof cfg->data.train, "%s/train.jsonl", dir);
    snprintf(cfg->data.test, sizeof cfg->data.test, "%s/test.jsonl", dir);
    cr_assert(config_validate(cfg, &err) == 0, "%s", err.msg);
    return cfg;
}

static void make_task(char *dir, size_t cap, long n, long n_test) {
    qerr_t err;
    tmpdir(dir, cap);
    cr_assert(data_task_make("addition", n, n_test, 7, dir, &err) == 0, "%s", err.msg);
}

/* Batches of 8, no evaluation before the end (on 8 examples), quiet progress. */
static sft_options_t small_opts(int replicas) {
    sft_options_t opt;
    sft_options_default(&opt);
    opt.batch_size = 8;
    opt.eval_interval = 0;
    opt.eval_examples = 8;
    opt.log_interval = 100;
    opt.replicas = replicas;
    return opt;
}

/* N steps with a checkpoint then M resumed give the losses of N + M uninterrupted steps, bit
 * for bit, with `replicas` data-parallel replicas (dropout on: the noise must resume too). */
static void check_resume(int replicas) {
    char dir[64];
    make_task(dir, sizeof dir, 300, 20);
    quillan_config_t *cfg = small_run(dir);
    set(cfg, "learner.total_steps=8");
    sft_options_t opt = small_opts(replicas);
    double full[RESUME_N + RESUME_M], part[RESUME_N + RESUME_M];
    memset(part, 0, sizeof part);
    qerr_t err;
    sft_result_t res;

    /* Uninterrupted N+M steps. */
    opt.loss_trace = full;
    opt.trace_cap = RESUME_N + RESUME_M;
    cr_assert(sft_run(cfg, &opt, &res, &err) == 0, "%s", err.msg);
    cr_assert_eq(res.steps, RESUME_N + RESUME_M);

    /* N steps with a checkpoint, then resume for M. */
    snprintf(cfg->learner.checkpoint_dir, sizeof cfg->learner.checkpoint_dir, "%s/ckpt", dir);
    opt.loss_trace = part;
    opt.max_steps = RESUME_N;
    cr_assert(sft_run(cfg, &opt, &res, &err) == 0, "%s", err.msg);
    cr_assert_eq(res.steps, RESUME_N);
    opt.max_steps = RESUME_N + RESUME_M;
    opt.resume = cfg->learner.checkpoint_dir;
    cr_assert(sft_run(cfg, &opt, &res, &err) == 0, "%s", err.msg);
    cr_assert_eq(res.steps, RESUME_N + RESUME_M);
    for (int s = 0; s < RESUME_N + RESUME_M; s++) {
        cr_log_info("replicas %d step %d: %.9g %.9g", replicas, s, full[s], part[s]);
        cr_assert(memcmp(&full[s], &part[s], sizeof full[s]) == 0,
                  "step %d: uninterrupted %.17g, resumed %.17g", s, full[s], part[s]);
    }
    free(cfg);
}

/* A stop request (opt.stop, as a SIGINT handler sets it) ends the run after the step under way
 * (the next one with several replicas, which must agree), writes a checkpoint and skips the
 * final evaluation; resuming from that checkpoint gives the uninterrupted run's losses. */
static void check_stop(int replicas) {
    char dir[64];
    make_task(dir, sizeof dir, 300, 20);
    quillan_config_t *cfg = small_run(dir);
    set(cfg, "learner.total_steps=6");
    sft_options_t opt = small_opts(replicas);
    double full[6], part[6];
    memset(part, 0, sizeof part);
    qerr_t err;
    sft_result_t res;
    opt.loss_trace = full;
    opt.trace_cap = 6;
    cr_assert(sft_run(cfg, &opt, &res, &err) == 0, "%s", err.msg);
    cr_assert_eq(res.steps, 6);
    cr_assert_eq(res.stopped, 0);

    snprintf(cfg->learner.checkpoint_dir, sizeof cfg->learner.checkpoint_dir, "%s/ckpt", dir);
    volatile sig_atomic_t stop = 1;
    opt.stop = &stop;
    opt.loss_trace = part;
    cr_assert(sft_run(cfg, &opt, &res, &err) == 0, "%s", err.msg);
    const long at = replicas > 1 ? 2 : 1;
    cr_assert_eq(res.stopped, 1);
    cr_assert_eq(res.steps, at, "replicas %d: stopped after %ld steps", replicas, res.steps);
    cr_assert(isnan(res.eval_loss), "no evaluation on a stop");
    char ck[4352];
    cr_assert(checkpoint_resolve(cfg->learner.checkpoint_dir, ck, sizeof ck, &err) == 0, "%s",
              err.msg);
    char name[32];
    snprintf(name, sizeof name, "/step-%08ld", at);
    const size_t nl = strlen(ck), ml = strlen(name);
    cr_assert(nl >= ml && strcmp(ck + nl - ml, name) == 0, "checkpoint %s, expected %s", ck, name);

    stop = 0;
    opt.resume = cfg->learner.checkpoint_dir;
    cr_assert(sft_run(cfg, &opt, &res, &err) == 0, "%s", err.msg);
    cr_assert_eq(res.steps, 6);
    cr_assert_eq(res.stopped, 0);
    for (int s = 0; s < 6; s++)
        cr_assert(memcmp(&full[s], &part[s], sizeof full[s]) == 0,
                  "replicas %d step %d: uninterrupted %.17g, stopped and resumed %.17g", replicas,
                  s, full[s], part[s]);
    free(cfg);
}

Test(sft, stop_request_checkpoints_and_resumes, .timeout = 600) {
    check_stop(1);
}

Test(sft, stop_request_with_two_replicas_stops_every_rank_at_one_step, .timeout = 600) {
    check_stop(2);
}

Test(sft, resume_is_bit_identical, .timeout = 600) {
    check_resume(1);
}

Test(sft, resume_is_bit_identical_with_two_replicas, .timeout = 600) {
    check_resume(2);
}

Test(sft, resume_is_bit_identical_with_three_replicas, .timeout = 600) {
    check_resume(3); /* batch 8: shards of 3, 3 and 2 rows */
}

/* With no noise and no aux terms the loss is the batch's CE mean, whatever the sharding: the
 * first step's loss (before any update) of 2 and 3 replicas is one replica's up to rounding. */
Test(sft, replicas_share_the_batch_mean, .timeout = 600) {
    char dir[64];
    make_task(dir, sizeof dir, 100, 1);
    quillan_config_t *cfg = small_run(dir);
    cfg->data.test[0] = '\0';
    set(cfg, "model.dropout=0");
    set(cfg, "learner.aux.balance=0");
    set(cfg, "learner.aux.z_loss=0");
    set(cfg, "learner.aux.diffusion=0");
    qerr_t err;
    cr_assert(config_validate(cfg, &err) == 0, "%s", err.msg);
    sft_options_t opt;
    sft_options_default(&opt);
    opt.batch_size = 7;
    opt.max_steps = 1;
    double loss[4];
    for (int r = 1; r <= 3; r++) {
        opt.replicas = r;
        opt.loss_trace = &loss[r];
        opt.trace_cap = 1;
        cr_assert(sft_run(cfg, &opt, NULL, &err) == 0, "%s", err.msg);
        cr_log_info("replicas %d: first loss %.9g", r, loss[r]);
    }
    cr_assert(isfinite(loss[1]));
    for (int r = 2; r <= 3; r++)
        cr_assert_float_eq(loss[r], loss[1], 1e-6 * loss[1], "replicas %d: %.9g vs %.9g", r,
                           loss[r], loss[1]);
    free(cfg);
}

/* Loss-free balancing with replicas: the ranks sum their routing counts before the bias step,
 * so after a step every balancing bias equals one replica's on the whole batch (the counts of
 * the first step come from identical parameters). */
Test(sft, replicas_balance_on_the_whole_batch, .timeout = 600) {
    char dir[64];
    make_task(dir, sizeof dir, 100, 1);
    quillan_config_t *cfg = small_run(dir);
    cfg->data.test[0] = '\0';
    set(cfg, "model.dropout=0");
    qerr_t err;
    sft_options_t opt;
    sft_options_default(&opt);
    opt.batch_size = 8;
    opt.max_steps = 1;
    opt.balance_bias = 1;
    real *bias[3] = {0};
    size_t n_bias = 0;
    for (int r = 1; r <= 2; r++) {
        snprintf(cfg->learner.checkpoint_dir, sizeof cfg->learner.checkpoint_dir, "%s/ck%d", dir,
                 r);
        opt.replicas = r;
        cr_assert(sft_run(cfg, &opt, NULL, &err) == 0, "%s", err.msg);
        model_t *m = model_new(&cfg->model, &err);
        cr_assert(m, "%s", err.msg);
        char step_dir[512];
        cr_assert(
            checkpoint_resolve(cfg->learner.checkpoint_dir, step_dir, sizeof step_dir, &err) == 0,
            "%s", err.msg);
        cr_assert(checkpoint_load(step_dir, m, NULL, NULL, &err) == 0, "%s", err.msg);
        size_t k = 0;
        bias[r] = malloc(model_num_reals(m) * sizeof(real));
        for (size_t i = 0; i < model_tensor_count(m); i++) {
            const model_tensor_t *t = model_tensor(m, i);
            if (!strstr(t->name, "bias_balance"))
                continue;
            memcpy(bias[r] + k, model_params(m) + t->offset, t->numel * sizeof(real));
            k += t->numel;
        }
        n_bias = k;
        model_destroy(&m);
    }
    cr_assert_gt(n_bias, 0);
    size_t moved = 0;
    for (size_t i = 0; i < n_bias; i++) {
        cr_assert_eq(bias[1][i], bias[2][i], "bias %zu: one replica %g, two %g", i,
                     (double)bias[1][i], (double)bias[2][i]);
        moved += bias[1][i] != 0;
    }
    cr_assert_gt(moved, 0, "the balancing step moved no bias");
    free(bias[1]);
    free(bias[2]);
    free(cfg);
}

Test(sft, loss_falls_below_half, .timeout = 600) {
    char dir[64];
    make_task(dir, sizeof dir, 2000, 50);
    quillan_config_t *cfg = small_run(dir);
    set(cfg, "learner.total_steps=80");
    sft_options_t opt;
    sft_options_default(&opt);
    opt.batch_size = 16;
    opt.eval_interval = 0;
    opt.eval_examples = 50;
    opt.log_interval = 20;
    qerr_t err;
    sft_result_t res;
    cr_assert(sft_run(cfg, &opt, &res, &err) == 0, "%s", err.msg);
    cr_log_info("first loss %.4f, last %.4f, test loss %.4f, exact match %.3f", res.first_loss,
                res.last_loss, res.eval_loss, res.eval_accuracy);
    cr_assert(res.last_loss < 0.5 * res.first_loss, "loss %.4f -> %.4f", res.first_loss,
              res.last_loss);
    cr_assert(isfinite(res.eval_loss) && res.eval_loss < 0.5 * res.first_loss);
    free(cfg);
}

static void write_file(const char *path, const char *text) {
    FILE *f = fopen(path, "w");
    cr_assert(f);
    fputs(text, f);
    fclose(f);
}

Test(sft, dataset_line_without_prompt) {
    char dir[64], path[128];
    tmpdir(dir, sizeof dir);
    snprintf(path, sizeof path, "%s/train.jsonl", dir);
    write_file(path, "{\"prompt\": \"1+1=\", \"completion\": \"2\"}\n"
                     "{\"question\": \"2+2=\", \"completion\": \"4\"}\n");
    quillan_config_t *cfg = small_run(dir);
    cfg->data.test[0] = '\0';
    sft_options_t opt;
    sft_options_default(&opt);
    qerr_t err;
    cr_assert(sft_run(cfg, &opt, NULL, &err) == -1);
    cr_log_info("%s", err.msg);
    cr_assert(strstr(err.msg, "train.jsonl:2") && strstr(err.msg, "prompt"), "%s", err.msg);
    free(cfg);
}

/* GPT-2's byte -> unicode map: printable bytes map to themselves, the rest to 256 + n. */
static void byte_token(int b, char *out) {
    int cp;
    if ((b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF)) {
        cp = b;
    } else {
        int n = 0;
        for (int c = 0; c < b; c++)
            n += !((c >= '!' && c <= '~') || (c >= 0xA1 && c <= 0xAC) || (c >= 0xAE && c <= 0xFF));
        cp = 256 + n;
    }
    if (cp < 0x80) {
        out[0] = (char)cp;
        out[1] = 0;
    } else {
        out[0] = (char)(0xC0 | (cp >> 6));
        out[1] = (char)(0x80 | (cp & 0x3F));
        out[2] = 0;
    }
}

Test(sft, tokens_out_of_vocabulary) {
    /* A BPE tokenizer with 258 ids (256 bytes, <|endoftext|> = 256, the merge "12" = 257) and a
     * model of 257: the prompt "12+3=" encodes "12" as 257, outside the model's vocabulary. */
    char dir[64], vocab[128], merges[128], train[128];
    tmpdir(dir, sizeof dir);
    snprintf(vocab, sizeof vocab, "%s/vocab.json", dir);
    snprintf(merges, sizeof merges, "%s/merges.txt", dir);
    snprintf(train, sizeof train, "%s/train.jsonl", dir);
    json_t *v = json_object();
    char tok[4];
    for (int b = 0; b < 256; b++) {
        byte_token(b, tok);
        json_object_set_new(v, tok, json_integer(b));
    }
    json_object_set_new(v, "<|endoftext|>", json_integer(256));
    json_object_set_new(v, "12", json_integer(257));
    cr_assert(json_dump_file(v, vocab, 0) == 0);
    json_decref(v);
    write_file(merges, "#version: 0.2\n1 2\n");
    write_file(train, "{\"prompt\": \"3+4=\", \"completion\": \"7\"}\n"
                      "{\"prompt\": \"12+3=\", \"completion\": \"15\"}\n");
    quillan_config_t *cfg = small_run(dir);
    qerr_t err;
    set(cfg, "model.tokenizer.kind=gpt2");
    set(cfg, "model.vocab_size=257");
    snprintf(cfg->model.tokenizer.vocab, sizeof cfg->model.tokenizer.vocab, "%s", vocab);
    snprintf(cfg->model.tokenizer.merges, sizeof cfg->model.tokenizer.merges, "%s", merges);
    cfg->data.test[0] = '\0';
    cr_assert(config_validate(cfg, &err) == 0, "%s", err.msg);
    sft_options_t opt;
    sft_options_default(&opt);
    cr_assert(sft_run(cfg, &opt, NULL, &err) == -1);
    cr_log_info("%s", err.msg);
    cr_assert(strstr(err.msg, "train.jsonl:2") && strstr(err.msg, "257") &&
                  strstr(err.msg, "vocabulary") && strstr(err.msg, "prompt"),
              "%s", err.msg);
    free(cfg);
}

Test(sft, resume_from_another_config) {
    char dir[64];
    make_task(dir, sizeof dir, 50, 5);
    quillan_config_t *cfg = small_run(dir);
    set(cfg, "learner.warmup_steps=0");
    set(cfg, "learner.total_steps=1");
    snprintf(cfg->learner.checkpoint_dir, sizeof cfg->learner.checkpoint_dir, "%s/ckpt", dir);
    sft_options_t opt;
    sft_options_default(&opt);
    opt.batch_size = 2;
    opt.eval_examples = 2;
    qerr_t err;
    cr_assert(sft_run(cfg, &opt, NULL, &err) == 0, "%s", err.msg);
    set(cfg, "model.num_layers=3");
    cr_assert(config_validate(cfg, &err) == 0, "%s", err.msg);
    opt.resume = cfg->learner.checkpoint_dir;
    set(cfg, "learner.total_steps=2");
    cr_assert(sft_run(cfg, &opt, NULL, &err) == -1);
    cr_log_info("%s", err.msg);
    cr_assert(strstr(err.msg, "model.safetensors") && strstr(err.msg, "layers.2."), "%s", err.msg);
    free(cfg);
}
