/* A run's configuration: one YAML file (libyaml) with sections model, learner, rollout, reward,
 * data, network, security and logging (ARCHITECTURE.md §5), plus `--set section.key=value`
 * overrides. Every key, its default, range and unit is one row of the schema table
 * (config_schema.c); docs/CONFIG.md is generated from it (`quillan config doc`).
 *
 * Resolution order: config_defaults, then one config_load, then any config_set calls, then
 * config_validate. The model section starts from the preset named by `model.preset` (default
 * "tiny"); keys set explicitly (in the file or with --set) always win over the preset,
 * whichever comes first, and naming another preset later resets only the keys not set
 * explicitly.
 *
 * Errors name where the value came from and the key:
 *   configs/x.yaml:12: learner.lr: expected a number, got 'abc'
 *   --set learner.lr=abc: learner.lr: expected a number, got 'abc'
 * quillan_config_t is a plain struct embedded by value (about 20 KiB); it owns no heap memory. */
#ifndef QUILLAN_CONFIG_H
#define QUILLAN_CONFIG_H

#include "error.h"
#include "log.h"
#include "model_config.h"

#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>

#define CONFIG_PATH_MAX MODEL_PATH_MAX
#define CONFIG_ADDR_MAX 256 /* ZeroMQ endpoint, "tcp://host:port" */
#define CONFIG_NAME_MAX 64
#define CONFIG_REWARD_SERVICES_MAX 16
#define CONFIG_KEYS_MAX 256 /* capacity of the origin table; the schema has fewer rows */
#define CONFIG_FILE_MAX_BYTES (1 << 20)

typedef enum { CONFIG_MODE_SFT = 0, CONFIG_MODE_RL, CONFIG_MODE_COUNT } config_mode_t;
typedef enum { CONFIG_LR_CONSTANT = 0, CONFIG_LR_COSINE, CONFIG_LR_COUNT } config_lr_schedule_t;
typedef enum {
    CONFIG_LOSS_TOKEN_MEAN = 0,          /* DAPO: mean over all tokens of the mini-batch */
    CONFIG_LOSS_SEQ_MEAN_TOKEN_MEAN,     /* GRPO: mean over sequences of per-sequence means */
    CONFIG_LOSS_SEQ_MEAN_TOKEN_SUM_NORM, /* Dr. GRPO: sum / (sequences x max_new_tokens) */
    CONFIG_LOSS_COUNT
} config_loss_agg_t;
typedef enum {
    CONFIG_OLD_LOGPROBS_RECOMPUTE = 0, /* old-policy snapshot through the learner's forward */
    CONFIG_OLD_LOGPROBS_BEHAVIOUR,     /* the sampler's recorded log-probs */
    CONFIG_OLD_LOGPROBS_COUNT
} config_old_logprobs_t;

/* An optional closed interval; enabled = false when the key is null (off). */
typedef struct {
    bool enabled;
    double lo, hi;
} config_range_t;

typedef struct {
    char address[CONFIG_ADDR_MAX]; /* ZeroMQ endpoint the service binds */
    double weight;                 /* reward = sum of weight x score over services */
    char name[CONFIG_NAME_MAX];    /* label in logs and reward_parts */
} config_reward_service_t;

typedef struct {
    config_mode_t mode;
    double lr;
    int warmup_steps;
    config_lr_schedule_t lr_schedule;
    int total_steps;
    double weight_decay, beta1, beta2, adam_eps, grad_clip;
    int batch_groups, group_size, max_staleness;
    bool dynamic_sampling;
    int max_resample_rounds;
    struct {
        bool enabled;
        int max_len; /* tokens; 0 = rollout.max_new_tokens (resolved by config_validate) */
        int cache;   /* tokens; 0 = max_len / 4, at least 1 (resolved by config_validate) */
    } overlong;
    struct {
        bool normalize_std;
        config_range_t clip;
    } advantage;
    config_loss_agg_t loss_agg;
    double clip_eps_low, clip_eps_high, dual_clip, tis_cap;
    config_old_logprobs_t old_logprobs;
    struct {
        double beta;
    } kl;
    struct {
        /* -1 = the mode's default (SFT 0.01 / 0.2, RL 0 / 0), resolved by config_validate */
        double balance, z_loss, diffusion;
    } aux;
    int ppo_epochs, minibatches;
    int sync_interval; /* 0 = minibatches x ppo_epochs (resolved by config_validate) */
    int old_policy_interval, full_snapshot_interval, snapshots_kept, checkpoint_interval;
    char checkpoint_dir[CONFIG_PATH_MAX];
    int threads; /* 0 = all cores */
    uint64_t seed;
    /* quillan-learner (RL): start weights, run length, periodic eval on data.test */
    char init_checkpoint[CONFIG_PATH_MAX]; /* "" = fresh weights from model.seed */
    int max_steps;                         /* 0 = total_steps */
    int eval_interval;                     /* optimizer steps; 0 = no periodic eval */
    int eval_samples;                      /* test examples per eval; 0 = all */
} config_learner_t;

typedef struct {
    int threads; /* 0 = all cores */
    double temperature, top_p;
    int top_k; /* 0 = off */
    int max_new_tokens;
    int credits;
} config_rollout_t;

typedef enum {
    CONFIG_LENGTH_TOKENS = 0, /* completion tokens */
    CONFIG_LENGTH_BYTES,      /* UTF-8 bytes of the completion text */
    CONFIG_LENGTH_COUNT
} config_length_unit_t;

#define CONFIG_REGEX_MAX 512

/* The built-in scorers of `quillan-reward` (reward/scorers.h). A weight of 0 turns a scorer
 * off; the service's score is the weighted sum of the scorers that are on. */
typedef struct {
    char bind[CONFIG_ADDR_MAX];       /* ZeroMQ endpoint quillan-reward binds (ROUTER) */
    char answer_key[CONFIG_NAME_MAX]; /* metadata field holding the reference answer */
    char eos_text[CONFIG_NAME_MAX];   /* stripped from the completion's end before matching */
    double exact_weight;
    double numeric_weight, numeric_abs_tol, numeric_rel_tol;
    double format_weight;
    char format_regex[CONFIG_REGEX_MAX]; /* PCRE2 */
    double length_weight;
    config_length_unit_t length_unit;
    int length_target, length_window; /* in length_unit */
} config_reward_builtin_t;

typedef struct {
    config_reward_service_t services[CONFIG_REWARD_SERVICES_MAX];
    int n_services;
    double timeout_s;
    int retries;
    double backoff_min_s, backoff_max_s;
    config_reward_builtin_t builtin;
} config_reward_t;

typedef struct {
    char train[CONFIG_PATH_MAX], test[CONFIG_PATH_MAX]; /* JSONL; "" = none */
    bool shuffle;
    uint64_t seed;
} config_data_t;

typedef struct {
    char dispatcher[CONFIG_ADDR_MAX], weights[CONFIG_ADDR_MAX];
    char log_in[CONFIG_ADDR_MAX], log_out[CONFIG_ADDR_MAX];
    double heartbeat_ivl_s;
    int heartbeat_liveness;
    double lease_timeout_s; /* 0 = automatic: max(30 s, 4 x the measured group time) */
    int chunk_bytes, chunks_in_flight, max_msg_bytes;
} config_network_t;

typedef struct {
    bool curve;
    struct {
        char server[CONFIG_PATH_MAX], client[CONFIG_PATH_MAX];
    } keys;
    char allow_list[CONFIG_PATH_MAX];
    bool bind_any;
} config_security_t;

typedef struct {
    log_level_t level;
    char file[CONFIG_PATH_MAX]; /* "" = stderr only */
    int file_max_mb;            /* rotate the file at this size (MiB); 0 = never */
    int file_keep;              /* rotated files kept: FILE.1 .. FILE.<keep> */
    bool hub;
    char tensorboard[CONFIG_PATH_MAX]; /* TensorBoard event directory; "" = off */
} config_logging_t;

typedef struct {
    char model_preset[CONFIG_NAME_MAX];
    model_config_t model;
    config_learner_t learner;
    config_rollout_t rollout;
    config_reward_t reward;
    config_data_t data;
    config_network_t network;
    config_security_t security;
    config_logging_t logging;

    /* Where each value came from, for error messages: origin[i] is for schema row i; > 0 a
     * line of `source`, 0 the default or preset, -1 a --set override. */
    char source[CONFIG_PATH_MAX];
    int origin[CONFIG_KEYS_MAX];
} quillan_config_t;

/* Every key to its default and the model section to the "tiny" preset. Cannot fail. */
void config_defaults(quillan_config_t *cfg);

/* Applies the YAML file at path over *cfg (normally fresh from config_defaults). Errors:
 * missing or unreadable file (QERR_NOTFOUND / QERR_IO), file over CONFIG_FILE_MAX_BYTES, YAML
 * syntax (QERR_PARSE, with line and column), unknown or duplicate key, wrong type, out of range
 * (QERR_INVALID / QERR_RANGE). On error *cfg may be partly updated. */
int config_load(quillan_config_t *cfg, const char *path, qerr_t *err);

/* Applies one "a.b.c=value" override; value is YAML (a scalar, or flow syntax such as
 * "[0, 1]" or "[{address: 'tcp://h:1', weight: 1}]"). List items are addressed by index:
 * "reward.services.0.weight=2"; index n_services appends an item. */
int config_set(quillan_config_t *cfg, const char *assignment, qerr_t *err);

/* Checks the cross-key rules (the model's, then the run's), and resolves the derived values
 * (diffusion_layer, aux weights by mode, overlong.max_len/cache, sync_interval). Errors name
 * the key and where its value came from. Idempotent. */
int config_validate(quillan_config_t *cfg, qerr_t *err);

/* Writes the config as YAML that config_load reads back to the same values. Returns 0, or -1
 * (QERR_IO) when writing fails. */
int config_print(const quillan_config_t *cfg, FILE *out, qerr_t *err);

/* Writes the schema as Markdown tables, one per section (docs/CONFIG.md). */
int config_doc_markdown(FILE *out, qerr_t *err);

/* Describes where key's value came from: "configs/x.yaml:12", "--set key=value", or
 * "default"; writes at most cap bytes (NUL included) into buf and returns buf. */
const char *config_origin(const quillan_config_t *cfg, const char *key, char *buf, size_t cap);

#endif
