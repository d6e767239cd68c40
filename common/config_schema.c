#include "config_schema.h"

#include "config.h"

#include <float.h>
#include <stddef.h>
#include <string.h>

#define FIELD(f) .offset = offsetof(quillan_config_t, f), .size = sizeof(((quillan_config_t *)0)->f)
#define ITEM(f)                                                                                    \
    .offset = offsetof(config_reward_service_t, f),                                                \
    .size = sizeof(((config_reward_service_t *)0)->f)

#define INT(p, f, d, lo, hi, u, doc_)                                                              \
    {                                                                                              \
        .path = p, .type = CONFIG_T_INT, FIELD(f), .def = d, .min = lo, .max = hi, .unit = u,      \
        .doc = doc_                                                                                \
    }
#define U64(p, f, d, doc_)                                                                         \
    { .path = p, .type = CONFIG_T_U64, FIELD(f), .def = d, .unit = "", .doc = doc_ }
#define FLT(p, f, d, lo, hi, open, u, doc_)                                                        \
    {                                                                                              \
        .path = p, .type = CONFIG_T_FLOAT, FIELD(f), .def = d, .min = lo, .max = hi,               \
        .min_open = open, .unit = u, .doc = doc_                                                   \
    }
#define DBL(p, f, d, lo, hi, open, u, doc_)                                                        \
    {                                                                                              \
        .path = p, .type = CONFIG_T_DOUBLE, FIELD(f), .def = d, .min = lo, .max = hi,              \
        .min_open = open, .unit = u, .doc = doc_                                                   \
    }
#define BOOL(p, f, d, doc_)                                                                        \
    { .path = p, .type = CONFIG_T_BOOL, FIELD(f), .def = d, .unit = "", .doc = doc_ }
#define STR(p, f, d, u, doc_)                                                                      \
    { .path = p, .type = CONFIG_T_STRING, FIELD(f), .def = d, .unit = u, .doc = doc_ }
#define ENUM(p, f, d, n, doc_)                                                                     \
    { .path = p, .type = CONFIG_T_ENUM, FIELD(f), .def = d, .names = n, .unit = "", .doc = doc_ }

/* Model keys take their defaults from the model preset (def NULL). */
#define M_INT(k, lo, hi, doc_) INT("model." #k, model.k, NULL, lo, hi, "", doc_)
#define M_FLT(k, lo, hi, open, doc_) FLT("model." #k, model.k, NULL, lo, hi, open, "", doc_)

#define BIG 1e9
#define ADDR "ZeroMQ endpoint"

static const char *const mode_names[] = {"sft", "rl", NULL};
static const char *const lr_schedule_names[] = {"constant", "cosine", NULL};
static const char *const loss_agg_names[] = {"token-mean", "seq-mean-token-mean",
                                             "seq-mean-token-sum-norm", NULL};
static const char *const old_logprobs_names[] = {"recompute", "behaviour", NULL};
static const char *const tokenizer_names[] = {"byte", "gpt2", NULL};
static const char *const level_names[] = {"debug", "info", "warn", "error", NULL};
static const char *const length_unit_names[] = {"tokens", "bytes", NULL};

_Static_assert(Q_ARRAY_LEN(mode_names) == CONFIG_MODE_COUNT + 1, "one name per mode");
_Static_assert(Q_ARRAY_LEN(lr_schedule_names) == CONFIG_LR_COUNT + 1, "one name per schedule");
_Static_assert(Q_ARRAY_LEN(loss_agg_names) == CONFIG_LOSS_COUNT + 1, "one name per loss_agg");
_Static_assert(Q_ARRAY_LEN(old_logprobs_names) == CONFIG_OLD_LOGPROBS_COUNT + 1, "one per mode");
_Static_assert(Q_ARRAY_LEN(tokenizer_names) == MODEL_TOKENIZER_COUNT + 1, "one per tokenizer");
_Static_assert(Q_ARRAY_LEN(level_names) == LOG_LEVEL_COUNT + 1, "one name per log level");
_Static_assert(Q_ARRAY_LEN(length_unit_names) == CONFIG_LENGTH_COUNT + 1, "one per length unit");
/* ENUM fields are read and written as int. */
_Static_assert(sizeof(config_mode_t) == sizeof(int) && sizeof(log_level_t) == sizeof(int) &&
                   sizeof(model_tokenizer_kind_t) == sizeof(int) &&
                   sizeof(config_length_unit_t) == sizeof(int),
               "enums are int-sized");

static const config_key_t service_keys[] = {
    {.path = "address",
     .type = CONFIG_T_STRING,
     ITEM(address),
     .def = "",
     .required = true,
     .unit = ADDR,
     .doc = "where the service binds, e.g. tcp://127.0.0.1:5557"},
    {.path = "weight",
     .type = CONFIG_T_DOUBLE,
     ITEM(weight),
     .def = "1",
     .min = -1e6,
     .max = 1e6,
     .unit = "",
     .doc = "the service's score is multiplied by this"},
    {.path = "name",
     .type = CONFIG_T_STRING,
     ITEM(name),
     .def = "",
     .unit = "",
     .doc = "label in logs and reward_parts (\"\" = the address)"},
};

static const config_key_t keys[] = {
    /* model: MODEL.md */
    {.path = "model.preset",
     .type = CONFIG_T_PRESET,
     FIELD(model_preset),
     .def = "tiny",
     .unit = "",
     .doc = "built-in model whose sizes are the defaults of every model key below"},
    M_INT(vocab_size, 2, 1 << 24, "V, vocabulary size (259 for the byte tokenizer)"),
    M_INT(dim, 32, 65536, "d, residual width (a multiple of 32)"),
    M_INT(num_layers, 1, 1024, "L, transformer blocks"),
    M_INT(num_heads, 1, 65536, "H, attention heads (dim / H even)"),
    INT("model.context", model.context, NULL, 1, 1 << 20, "tokens",
        "maximum sequence length, prompt + completion"),
    M_FLT(dropout, 0, 0.999, false, "residual dropout, SFT only (RL runs at 0)"),
    M_FLT(rope_theta, 0, 1e9, true, "RoPE base"),
    M_FLT(norm_eps, 0, 0.5, true, "RMSNorm epsilon"),
    M_INT(overseer_hidden, 1, 65536, "hidden width of the overseer's shared expert"),
    M_INT(num_mini_moes, 1, 65536, "M, mini MoEs per layer"),
    M_INT(top_k_minis, 1, 65536, "mini MoEs kept per token"),
    M_INT(num_experts_per_mini, 1, 65536, "E, experts per mini MoE"),
    M_INT(top_k_experts, 1, 65536, "experts kept per kept mini"),
    M_INT(expert_hidden, 32, 65536, "hidden width of each expert (a multiple of 32)"),
    M_INT(num_micros_per_mini, 1, 65536, "N, single-neuron micro agents per mini"),
    M_INT(top_k_micros, 1, 65536, "micro agents kept per kept mini"),
    M_FLT(balance_bias_rate, 0, 0.999, false,
          "loss-free balancing bias step per optimizer step (0 = off)"),
    BOOL("model.routing_replay", model.routing_replay, NULL,
         "learner replays the sampler's recorded routing"),
    M_INT(diffusion_layer, -1, 1023, "block after which the diffusion stage runs (-1 = L/2 - 1)"),
    M_INT(diffusion_bits, 32, 65536, "plan code length (a multiple of 32)"),
    M_INT(diffusion_width, 1, 65536, "denoiser residual width"),
    M_INT(diffusion_blocks, 1, 1024, "denoiser residual blocks"),
    M_INT(diffusion_ffn, 1, 65536, "denoiser block hidden width"),
    M_INT(diffusion_time_dim, 2, 65536, "sinusoidal time embedding width (even)"),
    M_INT(diffusion_steps, 1, 1000, "K, denoising steps (learner and sampler alike)"),
    U64("model.diffusion_seed", model.diffusion_seed, NULL, "seed of the plan noise and SimHash R"),
    BOOL("model.head_int8", model.head_int8, NULL, "INT8 output head at rollout"),
    ENUM("model.tokenizer.kind", model.tokenizer.kind, NULL, tokenizer_names, "tokenizer"),
    STR("model.tokenizer.vocab", model.tokenizer.vocab, NULL, "path", "gpt2: vocab.json"),
    STR("model.tokenizer.merges", model.tokenizer.merges, NULL, "path", "gpt2: merges.txt"),
    STR("model.tokenizer.json", model.tokenizer.json, NULL, "path",
        "gpt2: Hugging Face tokenizer.json (instead of vocab + merges)"),
    U64("model.seed", model.seed, NULL, "weight initialisation seed"),

    /* learner: TRAINING.md */
    ENUM("learner.mode", learner.mode, "rl", mode_names,
         "sft: cross-entropy on completions; rl: GRPO/DAPO"),
    DBL("learner.lr", learner.lr, "1e-4", 0, 1, false, "", "peak learning rate"),
    INT("learner.warmup_steps", learner.warmup_steps, "0", 0, BIG, "steps", "linear warm-up"),
    ENUM("learner.lr_schedule", learner.lr_schedule, "constant", lr_schedule_names,
         "after warm-up"),
    INT("learner.total_steps", learner.total_steps, "1000", 1, BIG, "steps",
        "optimizer steps of the run (cosine decays to 0 over them)"),
    DBL("learner.weight_decay", learner.weight_decay, "0.01", 0, 1, false, "",
        "AdamW decay on matrices (not norm gains or biases)"),
    DBL("learner.beta1", learner.beta1, "0.9", 0, 0.999999, false, "", "AdamW beta1"),
    DBL("learner.beta2", learner.beta2, "0.95", 0, 0.999999, false, "", "AdamW beta2"),
    DBL("learner.adam_eps", learner.adam_eps, "1e-8", 0, 1, true, "", "AdamW epsilon"),
    DBL("learner.grad_clip", learner.grad_clip, "1.0", 0, 1e6, false, "",
        "global gradient-norm clip (0 = off)"),
    INT("learner.batch_groups", learner.batch_groups, "16", 1, 65536, "groups", "groups per batch"),
    INT("learner.group_size", learner.group_size, "8", 1, 4096, "completions",
        "G, completions per prompt (RL needs at least 2)"),
    INT("learner.max_staleness", learner.max_staleness, "2", 0, 1000, "versions",
        "admission control: at most (this + 1) x batch_groups groups leased or waiting"),
    BOOL("learner.dynamic_sampling", learner.dynamic_sampling, "true",
         "drop groups whose rewards are all equal and refill the batch"),
    INT("learner.max_resample_rounds", learner.max_resample_rounds, "10", 0, 1000, "rounds",
        "refill rounds before training on what there is (at least half a batch)"),
    BOOL("learner.overlong.enabled", learner.overlong.enabled, "true",
         "DAPO overlong reward shaping"),
    INT("learner.overlong.max_len", learner.overlong.max_len, "0", 0, 1 << 20, "tokens",
        "0 = rollout.max_new_tokens"),
    INT("learner.overlong.cache", learner.overlong.cache, "0", 0, 1 << 20, "tokens",
        "soft penalty zone before max_len (0 = max_len / 4)"),
    BOOL("learner.advantage.normalize_std", learner.advantage.normalize_std, "true",
         "divide by the group's reward std (false: Dr. GRPO)"),
    {.path = "learner.advantage.clip",
     .type = CONFIG_T_RANGE,
     FIELD(learner.advantage.clip),
     .def = "null",
     .min = -1e6,
     .max = 1e6,
     .unit = "",
     .doc = "[lo, hi] clamps advantages; null = off ([0, 1] drops the negative signal)"},
    ENUM("learner.loss_agg", learner.loss_agg, "token-mean", loss_agg_names,
         "token-mean (DAPO), seq-mean-token-mean (GRPO), seq-mean-token-sum-norm (Dr. GRPO)"),
    DBL("learner.clip_eps_low", learner.clip_eps_low, "0.2", 0, 1, false, "",
        "ratio clip 1 - eps_low"),
    DBL("learner.clip_eps_high", learner.clip_eps_high, "0.28", 0, 100, false, "",
        "ratio clip 1 + eps_high (Clip-Higher)"),
    DBL("learner.dual_clip", learner.dual_clip, "3.0", 1, 1e6, false, "",
        "dual-clip bound for negative advantages"),
    DBL("learner.tis_cap", learner.tis_cap, "2.0", 0, 1e6, true, "",
        "truncated importance-sampling cap on pi_old / pi_behaviour"),
    ENUM("learner.old_logprobs", learner.old_logprobs, "recompute", old_logprobs_names,
         "recompute under the old-policy snapshot, or use the sampler's"),
    DBL("learner.kl.beta", learner.kl.beta, "0", 0, 100, false, "",
        "k3 KL penalty to a frozen reference (0 = off, as DAPO)"),
    DBL("learner.aux.balance", learner.aux.balance, "-1", -1, 100, false, "",
        "MoE load-balance loss weight (-1 = SFT 0.01, RL 0)"),
    DBL("learner.aux.z_loss", learner.aux.z_loss, "1e-3", 0, 100, false, "",
        "router z-loss weight"),
    DBL("learner.aux.diffusion", learner.aux.diffusion, "-1", -1, 100, false, "",
        "diffusion flip loss weight (-1 = SFT 0.2, RL 0)"),
    INT("learner.ppo_epochs", learner.ppo_epochs, "1", 1, 100, "passes", "passes over a batch"),
    INT("learner.minibatches", learner.minibatches, "4", 1, 65536, "steps",
        "optimizer steps per pass (at most batch_groups)"),
    INT("learner.sync_interval", learner.sync_interval, "0", 0, BIG, "steps",
        "publish a snapshot every this many steps (0 = minibatches x ppo_epochs)"),
    INT("learner.old_policy_interval", learner.old_policy_interval, "1", 1, BIG, "versions",
        "the published snapshot becomes the old policy every this many versions"),
    INT("learner.full_snapshot_interval", learner.full_snapshot_interval, "10", 1, BIG, "versions",
        "a full snapshot every this many versions, deltas between"),
    INT("learner.snapshots_kept", learner.snapshots_kept, "3", 1, 64, "versions",
        "recent snapshots kept for late joiners and draining workers"),
    INT("learner.checkpoint_interval", learner.checkpoint_interval, "100", 0, BIG, "steps",
        "0 = only at the end and on SIGINT/SIGTERM"),
    STR("learner.checkpoint_dir", learner.checkpoint_dir, "checkpoints", "path",
        "one directory per step, and a `latest` pointer"),
    INT("learner.threads", learner.threads, "0", 0, 4096, "threads", "CPU threads (0 = all cores)"),
    U64("learner.seed", learner.seed, "1234", "run seed: data order, sampling streams, noise"),
    STR("learner.init_checkpoint", learner.init_checkpoint, "", "path",
        "RL: start from this checkpoint's weights (an SFT run's directory or root); \"\" = "
        "fresh weights"),
    INT("learner.max_steps", learner.max_steps, "0", 0, BIG, "steps",
        "stop after this many optimizer steps (0 = learner.total_steps); the schedule still "
        "follows total_steps"),
    INT("learner.eval_interval", learner.eval_interval, "0", 0, BIG, "steps",
        "RL: greedy exact match on data.test every this many steps (0 = off)"),
    INT("learner.eval_samples", learner.eval_samples, "200", 0, BIG, "examples",
        "RL: test examples per evaluation (0 = all)"),

    /* rollout */
    INT("rollout.threads", rollout.threads, "0", 0, 4096, "threads",
        "CPU threads per worker (0 = all cores)"),
    DBL("rollout.temperature", rollout.temperature, "1.0", 0, 100, true, "",
        "sampling temperature (RL: 1, as DAPO)"),
    INT("rollout.top_k", rollout.top_k, "0", 0, 1 << 24, "tokens", "0 = off"),
    DBL("rollout.top_p", rollout.top_p, "1.0", 0, 1, true, "", "nucleus sampling (1 = off)"),
    INT("rollout.max_new_tokens", rollout.max_new_tokens, "128", 1, 1 << 20, "tokens",
        "completion length limit (less than model.context)"),
    INT("rollout.credits", rollout.credits, "2", 1, 1024, "groups",
        "groups a worker asks for at once"),

    /* reward */
    {.path = "reward.services",
     .type = CONFIG_T_LIST,
     FIELD(reward.services),
     .def = "[{address: 'tcp://127.0.0.1:5557', weight: 1, name: reward}]",
     .unit = "",
     .doc = "reward services: list of {address, weight, name}; reward = weighted sum",
     .item_keys = service_keys,
     .n_item_keys = Q_ARRAY_LEN(service_keys),
     .item_size = sizeof(config_reward_service_t),
     .count_offset = offsetof(quillan_config_t, reward.n_services)},
    DBL("reward.timeout_s", reward.timeout_s, "30", 0, 86400, true, "s", "per call"),
    INT("reward.retries", reward.retries, "3", 0, 1000, "", "retries after a timeout"),
    DBL("reward.backoff_min_s", reward.backoff_min_s, "1", 0, 86400, true, "s",
        "first back-off between retries"),
    DBL("reward.backoff_max_s", reward.backoff_max_s, "8", 0, 86400, true, "s",
        "back-off doubles up to this"),
    STR("reward.builtin.bind", reward.builtin.bind, "tcp://127.0.0.1:5557", ADDR,
        "where quillan-reward binds its ROUTER"),
    STR("reward.builtin.answer_key", reward.builtin.answer_key, "answer", "",
        "metadata field with the reference answer (absent: \"no reward\")"),
    STR("reward.builtin.eos_text", reward.builtin.eos_text, "<|endoftext|>", "",
        "stripped from the completion's end before matching (\"\" = none)"),
    DBL("reward.builtin.exact.weight", reward.builtin.exact_weight, "1", -1e6, 1e6, false, "",
        "exact match of the trimmed completion and answer (1 or 0); 0 = off"),
    DBL("reward.builtin.numeric.weight", reward.builtin.numeric_weight, "0", -1e6, 1e6, false, "",
        "last number of the completion equals the numeric answer (1 or 0); 0 = off"),
    DBL("reward.builtin.numeric.abs_tol", reward.builtin.numeric_abs_tol, "1e-6", 0, 1e300, false,
        "", "numbers match when |x - y| <= max(abs_tol, rel_tol x |y|)"),
    DBL("reward.builtin.numeric.rel_tol", reward.builtin.numeric_rel_tol, "0", 0, 1, false, "",
        "relative tolerance of the numeric match"),
    DBL("reward.builtin.format.weight", reward.builtin.format_weight, "0", -1e6, 1e6, false, "",
        "completion matches format.regex (1 or 0); 0 = off"),
    STR("reward.builtin.format.regex", reward.builtin.format_regex, "", "PCRE2",
        "pattern searched in the completion (anchor it with ^...$ for a full match)"),
    DBL("reward.builtin.length.weight", reward.builtin.length_weight, "0", -1e6, 1e6, false, "",
        "length penalty in [-1, 0]: 0 up to target, linear to -1 over window; 0 = off"),
    ENUM("reward.builtin.length.unit", reward.builtin.length_unit, "tokens", length_unit_names,
         "tokens (completion_tokens) or bytes (UTF-8 of the completion text)"),
    INT("reward.builtin.length.target", reward.builtin.length_target, "512", 0, 1 << 24, "",
        "longest completion without penalty, in length.unit"),
    INT("reward.builtin.length.window", reward.builtin.length_window, "128", 0, 1 << 24, "",
        "the penalty reaches -1 at target + window (0: a step)"),

    /* data */
    STR("data.train", data.train, "", "path", "training JSONL (prompt, answer | completion)"),
    STR("data.test", data.test, "", "path", "evaluation JSONL (\"\" = none)"),
    BOOL("data.shuffle", data.shuffle, "true", "shuffle each epoch"),
    U64("data.seed", data.seed, "1234", "shuffle seed"),

    /* network: ARCHITECTURE.md §1, §3 */
    STR("network.dispatcher", network.dispatcher, "tcp://127.0.0.1:5555", ADDR,
        "learner's work dispatcher (ROUTER)"),
    STR("network.weights", network.weights, "tcp://127.0.0.1:5556", ADDR,
        "learner's snapshot server (ROUTER)"),
    STR("network.log_in", network.log_in, "tcp://127.0.0.1:5559", ADDR,
        "log hub input: every process's log PUB connects here (XSUB)"),
    STR("network.log_out", network.log_out, "tcp://127.0.0.1:5558", ADDR,
        "log hub output for monitors (XPUB)"),
    DBL("network.heartbeat_ivl_s", network.heartbeat_ivl_s, "1", 0, 3600, true, "s",
        "application heartbeat interval"),
    INT("network.heartbeat_liveness", network.heartbeat_liveness, "5", 1, 1000, "heartbeats",
        "a peer is dead after this many missed"),
    DBL("network.lease_timeout_s", network.lease_timeout_s, "0", 0, 86400 * 7, false, "s",
        "0 = max(30 s, 4 x the measured group time)"),
    INT("network.chunk_bytes", network.chunk_bytes, "1048576", 4096, 1 << 30, "bytes",
        "weight snapshot chunk size"),
    INT("network.chunks_in_flight", network.chunks_in_flight, "4", 1, 1024, "chunks",
        "credit window of snapshot transfers"),
    INT("network.max_msg_bytes", network.max_msg_bytes, "4194304", 65536, 1 << 30, "bytes",
        "ZMQ_MAXMSGSIZE on control sockets; in RL with routing replay it must hold a full group "
        "(checked: group_size x max_new_tokens tokens at >= 5 + router indices + 8 x plan words "
        "bytes each); receivers allow max(64 MiB, 8 x this) of decoder memory per message"),

    /* security: ARCHITECTURE.md §4 */
    BOOL("security.curve", security.curve, "false", "CurveZMQ on every socket"),
    STR("security.keys.server", security.keys.server, "", "path",
        "server key pair (servers read the secret, clients the public key)"),
    STR("security.keys.client", security.keys.client, "", "path", "this client's key pair"),
    STR("security.allow_list", security.allow_list, "", "path",
        "client public keys admitted by the ZAP handler"),
    BOOL("security.bind_any", security.bind_any, "false",
         "without CURVE, allow binding beyond loopback"),

    /* logging */
    ENUM("logging.level", logging.level, "info", level_names, "lowest level emitted"),
    STR("logging.file", logging.file, "", "path", "JSON-lines log file (\"\" = stderr only)"),
    BOOL("logging.hub", logging.hub, "true", "publish records to the log hub (network.log_in)"),
    INT("logging.file_max_mb", logging.file_max_mb, "64", 0, 1 << 20, "MiB",
        "rotate logging.file when it would grow past this size; 0 = never"),
    INT("logging.file_keep", logging.file_keep, "5", 0, 1000, "files",
        "rotated log files kept (FILE.1 is the newest); 0 = none"),
    STR("logging.tensorboard", logging.tensorboard, "", "path",
        "directory for TensorBoard event files of the learner's metrics (\"\" = off)"),
};

_Static_assert(Q_ARRAY_LEN(keys) <= CONFIG_KEYS_MAX, "origin table holds every row");

const config_key_t *config_schema(size_t *n) {
    *n = Q_ARRAY_LEN(keys);
    return keys;
}

int config_schema_find(const char *path) {
    for (size_t i = 0; i < Q_ARRAY_LEN(keys); i++)
        if (strcmp(keys[i].path, path) == 0)
            return (int)i;
    return -1;
}

const char *config_type_name(config_type_t type) {
    static const char *const names[CONFIG_T_COUNT] = {
        [CONFIG_T_INT] = "integer",  [CONFIG_T_U64] = "unsigned integer",
        [CONFIG_T_FLOAT] = "number", [CONFIG_T_DOUBLE] = "number",
        [CONFIG_T_BOOL] = "boolean", [CONFIG_T_STRING] = "string",
        [CONFIG_T_ENUM] = "enum",    [CONFIG_T_RANGE] = "[lo, hi] or null",
        [CONFIG_T_LIST] = "list",    [CONFIG_T_PRESET] = "preset name",
    };
    Q_ASSERT((int)type >= 0 && type < CONFIG_T_COUNT);
    return names[type];
}
