#include <criterion/criterion.h>

#include "config.h"
#include "config_schema.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define DATA QUILLAN_TEST_DATA "/config/"

static quillan_config_t *fresh(void) {
    quillan_config_t *cfg = malloc(sizeof *cfg);
    cr_assert_not_null(cfg);
    config_defaults(cfg);
    return cfg;
}

/* Loads a file from tests/data/config and expects it to fail with a message containing every
 * one of the given fragments (file:line, key, what went wrong). */
static void expect_load_error(const char *name, qerr_code_t code, const char *const *parts) {
    quillan_config_t *cfg = fresh();
    qerr_t err = {0};
    char path[1024];
    snprintf(path, sizeof path, DATA "%s", name);
    int rc = config_load(cfg, path, &err);
    if (rc == 0)
        rc = config_validate(cfg, &err);
    cr_assert_eq(rc, -1, "%s should fail", name);
    cr_assert_eq(err.code, code, "%s: code %s, message: %s", name, qerr_code_name(err.code),
                 err.msg);
    for (int i = 0; parts[i]; i++)
        cr_assert_not_null(strstr(err.msg, parts[i]), "'%s' missing from: %s", parts[i], err.msg);
    free(cfg);
}

static void expect_set_error(const char *assignment, const char *const *parts) {
    quillan_config_t *cfg = fresh();
    qerr_t err = {0};
    int rc = config_set(cfg, assignment, &err);
    if (rc == 0)
        rc = config_validate(cfg, &err);
    cr_assert_eq(rc, -1, "%s should fail", assignment);
    for (int i = 0; parts[i]; i++)
        cr_assert_not_null(strstr(err.msg, parts[i]), "'%s' missing from: %s", parts[i], err.msg);
    free(cfg);
}

/* Prints cfg into a heap string (caller frees). */
static char *print_to_string(const quillan_config_t *cfg) {
    char *buf = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&buf, &len);
    cr_assert_not_null(f);
    qerr_t err = {0};
    cr_assert_eq(config_print(cfg, f, &err), 0, "%s", err.msg);
    fclose(f);
    return buf;
}

/* Writes text to a fresh temporary file and returns its path (static buffer). */
static const char *write_temp(const char *text) {
    static char path[64];
    snprintf(path, sizeof path, "/tmp/quillan_config_XXXXXX");
    int fd = mkstemp(path);
    cr_assert_geq(fd, 0);
    FILE *f = fdopen(fd, "w");
    cr_assert_not_null(f);
    fputs(text, f);
    fclose(f);
    return path;
}

/* print -> load -> validate -> print gives the same text; returns the reloaded config. */
static quillan_config_t *round_trip(const quillan_config_t *cfg) {
    char *first = print_to_string(cfg);
    const char *path = write_temp(first);
    quillan_config_t *back = fresh();
    qerr_t err = {0};
    cr_assert_eq(config_load(back, path, &err), 0, "%s", err.msg);
    cr_assert_eq(config_validate(back, &err), 0, "%s", err.msg);
    unlink(path);
    char *second = print_to_string(back);
    cr_assert_str_eq(first, second);
    free(first);
    free(second);
    return back;
}

Test(config, defaults_are_valid_and_use_the_tiny_model) {
    quillan_config_t *cfg = fresh();
    model_config_t tiny;
    cr_assert_eq(model_config_preset("tiny", &tiny, NULL), 0);
    cr_assert_str_eq(cfg->model_preset, "tiny");
    cr_assert_eq(cfg->model.dim, tiny.dim);
    cr_assert_eq(cfg->model.vocab_size, tiny.vocab_size);
    cr_assert_eq(cfg->model.diffusion_steps, tiny.diffusion_steps);
    cr_assert_eq(cfg->learner.mode, CONFIG_MODE_RL);
    cr_assert_float_eq(cfg->learner.lr, 1e-4, 1e-12);
    cr_assert_float_eq(cfg->learner.clip_eps_high, 0.28, 1e-12);
    cr_assert_eq(cfg->learner.batch_groups, 16);
    cr_assert_eq(cfg->learner.group_size, 8);
    cr_assert_eq(cfg->learner.max_resample_rounds, 10);
    cr_assert_eq(cfg->learner.advantage.clip.enabled, false);
    cr_assert_eq(cfg->reward.n_services, 1);
    cr_assert_str_eq(cfg->reward.services[0].address, "tcp://127.0.0.1:5557");
    cr_assert_float_eq(cfg->reward.timeout_s, 30, 0);
    cr_assert_str_eq(cfg->network.dispatcher, "tcp://127.0.0.1:5555");
    cr_assert_eq(cfg->network.chunk_bytes, 1 << 20);
    cr_assert_eq(cfg->logging.level, LOG_INFO);
    qerr_t err = {0};
    cr_assert_eq(config_validate(cfg, &err), 0, "%s", err.msg);
    /* Derived values: RL zeroes the aux weights, one publish per batch, overlong from rollout. */
    cr_assert_float_eq(cfg->learner.aux.balance, 0, 0);
    cr_assert_float_eq(cfg->learner.aux.diffusion, 0, 0);
    cr_assert_eq(cfg->learner.sync_interval, 4);
    cr_assert_eq(cfg->learner.overlong.max_len, cfg->rollout.max_new_tokens);
    cr_assert_eq(cfg->learner.overlong.cache, cfg->rollout.max_new_tokens / 4);
    cr_assert_eq(cfg->model.diffusion_layer, 0);
    free(cfg);
}

Test(config, sft_mode_takes_its_aux_defaults_but_explicit_values_stay) {
    quillan_config_t *cfg = fresh();
    qerr_t err = {0};
    cr_assert_eq(config_set(cfg, "learner.mode=sft", &err), 0, "%s", err.msg);
    cr_assert_eq(config_set(cfg, "learner.aux.diffusion=0.5", &err), 0, "%s", err.msg);
    cr_assert_eq(config_validate(cfg, &err), 0, "%s", err.msg);
    cr_assert_float_eq(cfg->learner.aux.balance, 0.01, 1e-12);
    cr_assert_float_eq(cfg->learner.aux.diffusion, 0.5, 1e-12);
    free(cfg);
}

Test(config, schema_is_well_formed) {
    size_t n;
    const config_key_t *rows = config_schema(&n);
    cr_assert_leq(n, CONFIG_KEYS_MAX);
    for (size_t i = 0; i < n; i++) {
        cr_assert(rows[i].doc && *rows[i].doc, "%s has no description", rows[i].path);
        cr_assert_null(strchr(rows[i].path, '['), "%s", rows[i].path);
        cr_assert_eq(config_schema_find(rows[i].path), (int)i, "%s is not unique", rows[i].path);
        if (rows[i].type == CONFIG_T_ENUM)
            cr_assert_not_null(rows[i].names, "%s", rows[i].path);
        /* A leaf is never also a group ("a.b" and "a.b.c"). */
        size_t len = strlen(rows[i].path);
        for (size_t j = 0; j < n; j++)
            cr_assert(strncmp(rows[j].path, rows[i].path, len) || rows[j].path[len] != '.',
                      "%s is both a key and a group", rows[i].path);
        /* Groups are contiguous, so the printer opens each section once. */
        for (size_t j = i + 2; j < n; j++) {
            const char *a = rows[i].path, *b = rows[j].path, *mid = rows[j - 1].path;
            size_t sec = strcspn(a, ".");
            if (!strncmp(a, b, sec) && b[sec] == '.')
                cr_assert(!strncmp(a, mid, sec) && mid[sec] == '.', "section of %s is split by %s",
                          a, mid);
        }
    }
    /* ENUM names mirror the modules that own the enums. */
    int lvl = config_schema_find("logging.level"), tok = config_schema_find("model.tokenizer.kind");
    cr_assert_geq(lvl, 0);
    cr_assert_geq(tok, 0);
    for (int i = 0; i < LOG_LEVEL_COUNT; i++)
        cr_assert_str_eq(rows[lvl].names[i], log_level_name((log_level_t)i));
    for (int i = 0; i < MODEL_TOKENIZER_COUNT; i++)
        cr_assert_str_eq(rows[tok].names[i], model_tokenizer_kind_name((model_tokenizer_kind_t)i));
}

Test(config, error_yaml_syntax_names_file_line_and_column) {
    expect_load_error("syntax_error.yaml", QERR_PARSE,
                      (const char *const[]){"syntax_error.yaml:4:", "YAML syntax error",
                                            "started at line 3", NULL});
}

Test(config, error_unknown_key_suggests_the_closest) {
    expect_load_error("unknown_key.yaml", QERR_INVALID,
                      (const char *const[]){"unknown_key.yaml:3: learner.warmup_stpes: unknown key",
                                            "did you mean 'learner.warmup_steps'", NULL});
    expect_load_error("unknown_section.yaml", QERR_INVALID,
                      (const char *const[]){"unknown_section.yaml:3: rolout: unknown key",
                                            "did you mean 'rollout'", NULL});
}

Test(config, error_wrong_type) {
    expect_load_error(
        "wrong_type.yaml", QERR_INVALID,
        (const char *const[]){"wrong_type.yaml:4: learner.lr: expected a number, got 'abc'", NULL});
    expect_load_error(
        "bad_enum.yaml", QERR_INVALID,
        (const char *const[]){"bad_enum.yaml:2: learner.mode: expected one of sft, rl", "got 'ppo'",
                              NULL});
}

Test(config, error_quoted_number_and_second_document) {
    expect_load_error("quoted_number.yaml", QERR_INVALID,
                      (const char *const[]){"quoted_number.yaml:2: rollout.max_new_tokens: "
                                            "expected an integer, got the string '64'",
                                            NULL});
    expect_load_error("two_documents.yaml", QERR_PARSE,
                      (const char *const[]){"two_documents.yaml:3:", "one YAML document", NULL});
}

Test(config, error_out_of_range) {
    expect_load_error(
        "out_of_range.yaml", QERR_RANGE,
        (const char *const[]){"out_of_range.yaml:2: rollout.top_p: 1.5 is out of range", "(0, 1]",
                              NULL});
}

Test(config, error_missing_file) {
    expect_load_error("no_such_file.yaml", QERR_NOTFOUND,
                      (const char *const[]){"no_such_file.yaml", "cannot open", NULL});
}

Test(config, error_duplicate_key) {
    expect_load_error(
        "duplicate_key.yaml", QERR_INVALID,
        (const char *const[]){"duplicate_key.yaml:4: learner.lr: duplicate key", "line 2", NULL});
    expect_load_error("duplicate_dotted.yaml", QERR_INVALID,
                      (const char *const[]){"duplicate_dotted.yaml:3: learner.lr: duplicate key",
                                            "line 2", NULL});
}

Test(config, error_list_item_missing_required_field) {
    expect_load_error("missing_required.yaml", QERR_INVALID,
                      (const char *const[]){"missing_required.yaml:4: reward.services[1]",
                                            "'address' is required", NULL});
}

Test(config, error_cross_key_names_the_line_that_set_it) {
    expect_load_error("cross_key.yaml", QERR_INVALID,
                      (const char *const[]){"cross_key.yaml:3: model.num_heads:", NULL});
    expect_load_error("rl_group_size.yaml", QERR_INVALID,
                      (const char *const[]){"rl_group_size.yaml:2: learner.group_size:", NULL});
}

Test(config, error_bad_set) {
    expect_set_error("learner.lr=abc",
                     (const char *const[]){
                         "--set learner.lr=abc: learner.lr: expected a number, got 'abc'", NULL});
    expect_set_error("learner.lrr=1",
                     (const char *const[]){"--set learner.lrr=1: learner.lrr: unknown key",
                                           "did you mean 'learner.lr'", NULL});
    expect_set_error("learner.lr", (const char *const[]){"--set learner.lr:", "key=value", NULL});
    expect_set_error(
        "rollout.top_p=2",
        (const char *const[]){"--set rollout.top_p=2: rollout.top_p:", "out of range", NULL});
    expect_set_error("learner.lr=[1",
                     (const char *const[]){"--set learner.lr=[1", "YAML syntax error", NULL});
    expect_set_error("reward.services.3.weight=1",
                     (const char *const[]){"--set reward.services.3.weight=1", "index 3", NULL});
    /* A cross-key error after --set names the --set. */
    expect_set_error("model.num_heads=3",
                     (const char *const[]){"--set model.num_heads=3: model.num_heads:", NULL});
}

Test(config, set_overrides_file_values) {
    quillan_config_t *cfg = fresh();
    qerr_t err = {0};
    cr_assert_eq(config_load(cfg, QUILLAN_SOURCE_DIR "/configs/tiny.yaml", &err), 0, "%s", err.msg);
    const char *sets[] = {
        "learner.lr=3e-4",
        "learner.advantage.clip=[0, 1]",
        "reward.services.0.weight=0.5",
        "reward.services.1={address: 'ipc:///tmp/q', name: math}",
        "logging.level=debug",
        "learner={warmup_steps: 3, overlong: {cache: 7}}",
        "data.train=",
    };
    for (size_t i = 0; i < sizeof sets / sizeof sets[0]; i++)
        cr_assert_eq(config_set(cfg, sets[i], &err), 0, "%s: %s", sets[i], err.msg);
    cr_assert_eq(config_validate(cfg, &err), 0, "%s", err.msg);
    cr_assert_float_eq(cfg->learner.lr, 3e-4, 0);
    cr_assert(cfg->learner.advantage.clip.enabled);
    cr_assert_float_eq(cfg->learner.advantage.clip.hi, 1, 0);
    cr_assert_eq(cfg->reward.n_services, 2);
    cr_assert_float_eq(cfg->reward.services[0].weight, 0.5, 0);
    cr_assert_str_eq(cfg->reward.services[1].address, "ipc:///tmp/q");
    cr_assert_float_eq(cfg->reward.services[1].weight, 1, 0);
    cr_assert_eq(cfg->logging.level, LOG_DEBUG);
    cr_assert_eq(cfg->learner.warmup_steps, 3);
    cr_assert_eq(cfg->learner.overlong.cache, 7);
    cr_assert_str_eq(cfg->data.train, "");
    char where[256];
    cr_assert_str_eq(config_origin(cfg, "learner.lr", where, sizeof where),
                     "--set learner.lr=0.0003");
    cr_assert_str_eq(config_origin(cfg, "rollout.max_new_tokens", where, sizeof where),
                     QUILLAN_SOURCE_DIR "/configs/tiny.yaml:91");
    cr_assert_str_eq(config_origin(cfg, "network.max_msg_bytes", where, sizeof where),
                     QUILLAN_SOURCE_DIR "/configs/tiny.yaml:120");
    free(cfg);
}

Test(config, preset_in_file_is_overridden_by_explicit_keys) {
    quillan_config_t *cfg = fresh();
    qerr_t err = {0};
    cr_assert_eq(config_load(cfg, DATA "preset_override.yaml", &err), 0, "%s", err.msg);
    cr_assert_eq(config_validate(cfg, &err), 0, "%s", err.msg);
    cr_assert_str_eq(cfg->model_preset, "quillan-512m");
    cr_assert_eq(cfg->model.dim, 256, "explicit dim before the preset line still wins");
    cr_assert_eq(cfg->model.num_layers, 4);
    cr_assert_eq(cfg->model.vocab_size, 50257);
    cr_assert_eq(cfg->model.num_micros_per_mini, 325);
    /* Naming another preset later keeps the explicit keys too. */
    cr_assert_eq(config_set(cfg, "model.preset=tiny", &err), 0, "%s", err.msg);
    cr_assert_eq(cfg->model.dim, 256);
    cr_assert_eq(cfg->model.vocab_size, 259);
    cr_assert_eq(config_set(cfg, "model.preset=huge", &err), -1);
    cr_assert_not_null(strstr(err.msg, "unknown model preset 'huge'"), "%s", err.msg);
    free(cfg);
}

Test(config, both_shipped_presets_load) {
    quillan_config_t *cfg = fresh();
    qerr_t err = {0};
    cr_assert_eq(config_load(cfg, QUILLAN_SOURCE_DIR "/configs/tiny.yaml", &err), 0, "%s", err.msg);
    cr_assert_eq(config_validate(cfg, &err), 0, "%s", err.msg);
    cr_assert_eq(cfg->model.vocab_size, 259);
    cr_assert_float_eq(cfg->learner.lr, 1e-4, 0);
    free(round_trip(cfg));

    config_defaults(cfg);
    cr_assert_eq(config_load(cfg, QUILLAN_SOURCE_DIR "/configs/quillan-512m.yaml", &err), 0, "%s",
                 err.msg);
    cr_assert_eq(config_validate(cfg, &err), 0, "%s", err.msg);
    model_config_t ref;
    cr_assert_eq(model_config_preset("quillan-512m", &ref, &err), 0);
    cr_assert_eq(model_config_validate(&ref, &err), 0);
    cr_assert_eq(memcmp(&cfg->model.tokenizer, &ref.tokenizer, sizeof ref.tokenizer), 0);
    cr_assert_eq(cfg->model.dim, ref.dim);
    cr_assert_eq(cfg->model.num_mini_moes, ref.num_mini_moes);
    cr_assert_eq(cfg->model.diffusion_ffn, ref.diffusion_ffn);
    cr_assert_eq(cfg->model.diffusion_layer, ref.diffusion_layer);
    cr_assert_float_eq(cfg->learner.lr, 1e-5, 0);
    free(round_trip(cfg));
    free(cfg);
}

/* The 512m preset with the given assignments, validated: 0 or -1 with err. */
static int validate_512m(const char *const *sets, qerr_t *err) {
    quillan_config_t *cfg = fresh();
    cr_assert_eq(config_load(cfg, QUILLAN_SOURCE_DIR "/configs/quillan-512m.yaml", err), 0, "%s",
                 err->msg);
    for (int i = 0; sets[i]; i++)
        cr_assert_eq(config_set(cfg, sets[i], err), 0, "%s: %s", sets[i], err->msg);
    const int rc = config_validate(cfg, err);
    free(cfg);
    return rc;
}

/* A full group's routing records must fit in a control frame: 512m, 16 x 2000 tokens: at least
 * 169 bytes per token (5 + 6 x 2 x (1 + 2 + 8) router indices + 32 plan bytes). */
Test(config, error_group_larger_than_a_control_frame) {
    qerr_t err = {0};
    const char *big[] = {"learner.group_size=16", "rollout.max_new_tokens=2000", NULL};
    cr_assert_eq(validate_512m(big, &err), -1);
    cr_assert_not_null(strstr(err.msg, "network.max_msg_bytes: 4194304 is too small"), "%s",
                       err.msg);
    cr_assert_not_null(strstr(err.msg, "at least 5408000 bytes"), "%s", err.msg);
    const char *raised[] = {"learner.group_size=16", "rollout.max_new_tokens=2000",
                            "network.max_msg_bytes=5408000", NULL};
    cr_assert_eq(validate_512m(raised, &err), 0, "%s", err.msg);
    const char *no_replay[] = {"learner.group_size=16", "rollout.max_new_tokens=2000",
                               "model.routing_replay=false", NULL};
    cr_assert_eq(validate_512m(no_replay, &err), 0, "%s", err.msg);
    const char *sft[] = {"learner.group_size=16", "rollout.max_new_tokens=2000", "learner.mode=sft",
                         NULL};
    cr_assert_eq(validate_512m(sft, &err), 0, "%s", err.msg);
}

Test(config, print_load_round_trip_is_exact) {
    quillan_config_t *cfg = fresh();
    qerr_t err = {0};
    /* Values that stress the printer: awkward floats, escapes, a second list item. */
    cfg->learner.lr = 1.0 / 3.0 * 1e-3;
    cfg->model.norm_eps = 1.2345678e-7f;
    cfg->model.diffusion_seed = UINT64_MAX;
    snprintf(cfg->data.train, sizeof cfg->data.train, "we\"ird\\path\n\tx \xc3\xbc: #y");
    cr_assert_eq(config_set(cfg, "reward.services.1={address: 'tcp://h:1', weight: -2.5}", &err), 0,
                 "%s", err.msg);
    cr_assert_eq(config_set(cfg, "learner.advantage.clip=[-0.5, 2]", &err), 0, "%s", err.msg);
    cr_assert_eq(config_validate(cfg, &err), 0, "%s", err.msg);
    quillan_config_t *back = round_trip(cfg);
    cr_assert_eq(back->learner.lr, cfg->learner.lr);
    cr_assert_eq(back->model.norm_eps, cfg->model.norm_eps);
    cr_assert_eq(back->model.diffusion_seed, UINT64_MAX);
    cr_assert_str_eq(back->data.train, cfg->data.train);
    cr_assert_eq(back->reward.n_services, 2);
    cr_assert_float_eq(back->reward.services[1].weight, -2.5, 0);
    cr_assert_float_eq(back->learner.advantage.clip.lo, -0.5, 0);
    free(back);
    free(cfg);
}

Test(config, empty_file_keeps_defaults) {
    quillan_config_t *cfg = fresh(), *ref = fresh();
    qerr_t err = {0};
    cr_assert_eq(config_load(cfg, DATA "empty.yaml", &err), 0, "%s", err.msg);
    char *a = print_to_string(cfg), *b = print_to_string(ref);
    cr_assert_str_eq(a, b);
    free(a);
    free(b);
    free(cfg);
    free(ref);
}

Test(config, doc_lists_every_key_and_matches_docs_config_md) {
    char *buf = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&buf, &len);
    qerr_t err = {0};
    cr_assert_eq(config_doc_markdown(f, &err), 0, "%s", err.msg);
    fclose(f);
    size_t n;
    const config_key_t *rows = config_schema(&n);
    for (size_t i = 0; i < n; i++) {
        char cell[300];
        snprintf(cell, sizeof cell, "| `%s` |", rows[i].path);
        cr_assert_not_null(strstr(buf, cell), "%s missing from the doc", rows[i].path);
    }
    FILE *doc = fopen(QUILLAN_SOURCE_DIR "/docs/CONFIG.md", "rb");
    cr_assert_not_null(doc, "docs/CONFIG.md is missing");
    char *committed = calloc(1, len + 2);
    size_t got = fread(committed, 1, len + 1, doc);
    fclose(doc);
    cr_assert(got == len && !memcmp(committed, buf, len),
              "docs/CONFIG.md is stale: regenerate it with `quillan config doc > docs/CONFIG.md`");
    free(committed);
    free(buf);
}
