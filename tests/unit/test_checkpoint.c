/* Checkpoints: exact round trip of weights, buffers, Adam moments and run state; the `latest`
 * pointer; clear errors for a checkpoint of another config and for truncated files. */
#include <criterion/criterion.h>

#include "checkpoint.h"
#include "config.h"
#include "model.h"
#include "optimizer.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

static void small_config(quillan_config_t *cfg, int dim) {
    qerr_t err;
    config_defaults(cfg);
    cfg->model.dim = dim;
    cfg->model.num_heads = 2;
    cfg->model.expert_hidden = 32;
    cfg->model.diffusion_width = 32;
    cfg->model.diffusion_ffn = 64;
    cfg->model.diffusion_time_dim = 16;
    cr_assert(config_validate(cfg, &err) == 0, "%s", err.msg);
}

static void tmpdir(char *buf, size_t cap) {
    snprintf(buf, cap, "/tmp/quillan_ckpt_XXXXXX");
    cr_assert(mkdtemp(buf));
}

/* A model one optimizer step away from its initialisation, so moments are non-zero. */
static void one_step(model_t *m, optim_t *o) {
    real *g = model_grads(m);
    for (size_t i = 0; i < model_num_reals(m); i++)
        g[i] = (real)((double)(i % 7) - 3) * 1e-3f;
    for (size_t i = 0; i < model_tensor_count(m); i++) {
        const model_tensor_t *t = model_tensor(m, i);
        if (t->kind == MODEL_PARAM_BUFFER)
            memset(g + t->offset, 0, t->numel * sizeof *g);
    }
    optim_result_t r;
    cr_assert(optim_step(o, m, 1.0, &r) == 1);
}

Test(checkpoint, round_trip_is_exact) {
    quillan_config_t *cfg = malloc(sizeof *cfg);
    small_config(cfg, 32);
    qerr_t err;
    optim_config_t oc;
    optim_config_default(&oc);
    model_t *m = model_new(&cfg->model, &err);
    optim_t *o = optim_new(&oc, m, &err);
    cr_assert(m && o);
    one_step(m, o);
    /* A balancing bias must survive too. */
    model_params(m)[model_tensor_find(m, "layers.1.minis.2.router.bias_balance")->offset] = 0.25f;
    char root[64], dir[4096];
    tmpdir(root, sizeof root);
    checkpoint_state_t st = {.step = 7,
                             .seed = 42,
                             .data_epoch = 2,
                             .data_position = 11,
                             .data_fingerprint = 0xABCDEF,
                             .rng_key = 5,
                             .rng_counter = 9};
    cr_assert(checkpoint_save(root, cfg, m, o, &st, dir, sizeof dir, &err) == 0, "%s", err.msg);
    cr_assert(strstr(dir, "step-00000007"));

    char resolved[4096];
    cr_assert(checkpoint_resolve(root, resolved, sizeof resolved, &err) == 0, "%s", err.msg);
    cr_assert_str_eq(resolved, dir);

    cfg->model.seed = 999; /* a different init: everything must come from the file */
    model_t *m2 = model_new(&cfg->model, &err);
    optim_t *o2 = optim_new(&oc, m2, &err);
    checkpoint_state_t st2;
    cr_assert(checkpoint_load(resolved, m2, o2, &st2, &err) == 0, "%s", err.msg);
    const size_t n = model_num_reals(m);
    cr_assert(memcmp(model_params(m), model_params(m2), n * sizeof(real)) == 0);
    cr_assert(memcmp(optim_m(o), optim_m(o2), n * sizeof(real)) == 0);
    cr_assert(memcmp(optim_v(o), optim_v(o2), n * sizeof(real)) == 0);
    cr_assert_eq(optim_steps(o2), 1);
    cr_assert(st2.step == 7 && st2.seed == 42 && st2.data_epoch == 2 && st2.data_position == 11 &&
              st2.data_fingerprint == 0xABCDEF && st2.rng_key == 5 && st2.rng_counter == 9);

    /* A second checkpoint moves `latest`. */
    st.step = 8;
    cr_assert(checkpoint_save(root, cfg, m, o, &st, NULL, 0, &err) == 0, "%s", err.msg);
    cr_assert(checkpoint_resolve(root, resolved, sizeof resolved, &err) == 0);
    cr_assert(strstr(resolved, "step-00000008"));
    optim_destroy(&o);
    optim_destroy(&o2);
    model_destroy(&m);
    model_destroy(&m2);
    free(cfg);
}

Test(checkpoint, other_config_names_file_and_tensor) {
    quillan_config_t *cfg = malloc(sizeof *cfg);
    small_config(cfg, 32);
    qerr_t err;
    model_t *m = model_new(&cfg->model, &err);
    char root[64], dir[4096];
    tmpdir(root, sizeof root);
    checkpoint_state_t st = {.step = 1};
    cr_assert(checkpoint_save(root, cfg, m, NULL, &st, dir, sizeof dir, &err) == 0, "%s", err.msg);

    quillan_config_t *other = malloc(sizeof *other);
    small_config(other, 64);
    model_t *m2 = model_new(&other->model, &err);
    cr_assert(checkpoint_load(dir, m2, NULL, NULL, &err) == -1);
    cr_log_info("%s", err.msg);
    cr_assert(strstr(err.msg, "model.safetensors"), "%s", err.msg);
    cr_assert(strstr(err.msg, "embed.weight"), "%s", err.msg);
    cr_assert(strstr(err.msg, "[259, 64]") && strstr(err.msg, "[259, 32]"), "%s", err.msg);

    /* Fewer mini MoEs: same shapes for what remains, but the file has tensors the model lacks
     * (or lacks ones it has). */
    quillan_config_t *fewer = malloc(sizeof *fewer);
    small_config(fewer, 32);
    fewer->model.num_mini_moes = 3;
    cr_assert(config_validate(fewer, &err) == 0, "%s", err.msg);
    model_t *m3 = model_new(&fewer->model, &err);
    cr_assert(checkpoint_load(dir, m3, NULL, NULL, &err) == -1);
    cr_log_info("%s", err.msg);
    cr_assert(strstr(err.msg, "model.safetensors") && strstr(err.msg, "layers."), "%s", err.msg);

    /* An optimizer file that is missing is named as such. */
    optim_config_t oc;
    optim_config_default(&oc);
    optim_t *o = optim_new(&oc, m, &err);
    cr_assert(checkpoint_load(dir, m, o, NULL, &err) == -1);
    cr_assert(strstr(err.msg, "optimizer.safetensors"), "%s", err.msg);
    optim_destroy(&o);
    model_destroy(&m);
    model_destroy(&m2);
    model_destroy(&m3);
    free(cfg);
    free(other);
    free(fewer);
}

Test(checkpoint, truncated_file_is_a_clear_error) {
    quillan_config_t *cfg = malloc(sizeof *cfg);
    small_config(cfg, 32);
    qerr_t err;
    model_t *m = model_new(&cfg->model, &err);
    char root[64], dir[4096], path[4200];
    tmpdir(root, sizeof root);
    checkpoint_state_t st = {.step = 3};
    cr_assert(checkpoint_save(root, cfg, m, NULL, &st, dir, sizeof dir, &err) == 0, "%s", err.msg);
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    struct stat sb;
    cr_assert(stat(path, &sb) == 0);
    const off_t cuts[] = {sb.st_size - 100, 300, 4};
    for (size_t i = 0; i < sizeof cuts / sizeof cuts[0]; i++) {
        cr_assert(truncate(path, cuts[i]) == 0);
        cr_assert(checkpoint_load(dir, m, NULL, NULL, &err) == -1);
        cr_log_info("cut at %ld: %s", (long)cuts[i], err.msg);
        cr_assert(strstr(err.msg, path), "%s", err.msg);
    }
    char resolved[4096];
    cr_assert(checkpoint_resolve("/nonexistent/ckpt", resolved, sizeof resolved, &err) == -1);
    cr_assert(strstr(err.msg, "/nonexistent/ckpt"), "%s", err.msg);
    model_destroy(&m);
    free(cfg);
}

/* A checkpoint's model with its own config, from the root, the step directory or its model
 * file: the config comes from the file (not the caller's defaults), the weights are the saved
 * ones, and a missing path is an error naming it. */
Test(checkpoint, model_with_its_own_config_from_root_dir_or_file) {
    quillan_config_t *cfg = malloc(sizeof *cfg), *got = malloc(sizeof *got);
    small_config(cfg, 64);
    qerr_t err;
    model_t *m = model_new(&cfg->model, &err);
    cr_assert_not_null(m, "%s", err.msg);
    char root[64], dir[4096], file[4160];
    tmpdir(root, sizeof root);
    checkpoint_state_t st = {.step = 3};
    cr_assert(checkpoint_save(root, cfg, m, NULL, &st, dir, sizeof dir, &err) == 0, "%s", err.msg);
    snprintf(file, sizeof file, "%s/model.safetensors", dir);
    const char *paths[] = {root, dir, file};
    for (size_t i = 0; i < 3; i++) {
        config_defaults(got);
        char step[4096];
        cr_assert(checkpoint_config_read(paths[i], got, step, sizeof step, &err) == 0, "%s: %s",
                  paths[i], err.msg);
        cr_assert_str_eq(step, dir, "%s", paths[i]);
        cr_assert_eq(got->model.dim, 64, "%s: the config is the checkpoint's", paths[i]);
        cr_assert(config_validate(got, &err) == 0, "%s", err.msg);
        checkpoint_state_t st2;
        model_t *m2 = checkpoint_model_load(step, &got->model, &st2, &err);
        cr_assert_not_null(m2, "%s", err.msg);
        cr_assert_eq(st2.step, 3);
        cr_assert(memcmp(model_params(m), model_params(m2), model_num_reals(m) * sizeof(real)) ==
                  0);
        model_destroy(&m2);
    }
    char missing[4200];
    snprintf(missing, sizeof missing, "%s/nowhere", root);
    cr_assert(checkpoint_config_read(missing, got, dir, sizeof dir, &err) == -1);
    cr_assert(strstr(err.msg, "nowhere"), "%s", err.msg);
    model_destroy(&m);
    free(cfg);
    free(got);
}
