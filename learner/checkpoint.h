/* Checkpoints (ARCHITECTURE.md §6): a directory per step under a root,
 *
 *   ROOT/step-00000100/model.safetensors       FP32 master weights and buffers, MODEL.md names
 *   ROOT/step-00000100/optimizer.safetensors   Adam moments "<name>.exp_avg", "<name>.exp_avg_sq"
 *   ROOT/latest                                "step-00000100\n", replaced atomically
 *
 * model.safetensors' __metadata__ holds the resolved config (YAML, as `quillan config check`
 * prints it), the step, the seeds, the data position and the state of the data-order RNG;
 * optimizer.safetensors' holds the update and skip counts. Each file is written to a temporary
 * name, fsynced and renamed (safetensors_writer_write), and `latest` is replaced only after both
 * files are in place, so a crash leaves the previous checkpoint in use.
 *
 * Loading validates every tensor's name, dtype and shape against the model built from the
 * current config, and names the file and the tensor at fault ("ckpt/step-00000010/
 * model.safetensors: tensor 'embed.weight': expected F32 [259, 128], found F32 [259, 64]"); a
 * truncated or corrupt file fails in the safetensors reader with the path in the message. */
#ifndef QUILLAN_CHECKPOINT_H
#define QUILLAN_CHECKPOINT_H

#include "config.h"
#include "error.h"
#include "model.h"
#include "optimizer.h"

#include <stddef.h>
#include <stdint.h>

#define CHECKPOINT_FORMAT "quillan-checkpoint-1"
#define CHECKPOINT_LATEST "latest"
#define CHECKPOINT_MODEL_FILE "model.safetensors"
#define CHECKPOINT_OPTIM_FILE "optimizer.safetensors"

/* What a run needs beyond the tensors to continue exactly. */
typedef struct {
    long step;                     /* optimizer steps taken (the next step's index) */
    uint64_t seed;                 /* learner.seed: keys noise and data order */
    uint64_t data_epoch;           /* passes over the training set completed */
    uint64_t data_position;        /* next example index within the epoch's order */
    uint64_t data_fingerprint;     /* jsonl_reader_fingerprint of the training set (0 = none) */
    uint64_t rng_key, rng_counter; /* the data-order stream (rng_stream_t) at that position */
} checkpoint_state_t;

/* Writes ROOT/step-%08ld/ (creating directories as needed) and then points ROOT/latest at it.
 * o may be NULL (no optimizer file). The directory written is copied into out_dir (may be
 * NULL). Returns 0, or -1 with err set (QERR_IO naming the path). */
int checkpoint_save(const char *root, const quillan_config_t *cfg, const model_t *m,
                    const optim_t *o, const checkpoint_state_t *st, char *out_dir, size_t cap,
                    qerr_t *err);

/* Resolves `path` to a step directory: a directory holding model.safetensors is taken as is;
 * otherwise path/latest is read. Returns 0, or -1 (QERR_NOTFOUND / QERR_INVALID naming the
 * path). */
int checkpoint_resolve(const char *path, char *dir, size_t cap, qerr_t *err);

/* Applies the run config stored in a checkpoint's model file (metadata "config") over *cfg,
 * without validating (the caller applies its overrides first). Returns 0, or -1 with err naming
 * the file (not a Quillan checkpoint, unreadable, bad config). */
int checkpoint_config_apply(quillan_config_t *cfg, const char *model_file, qerr_t *err);

/* Loads the step directory `dir` into m (and o when non-NULL) and *st. On error nothing useful
 * is left in m or o (a partial load); the message names the file and the tensor or key. */
int checkpoint_load(const char *dir, model_t *m, optim_t *o, checkpoint_state_t *st, qerr_t *err);

/* Reading a checkpoint's model with its own config (quillan quantize, quillan eval,
 * bench_engine agree) is two steps, so that a caller can apply its overrides (--config, --set,
 * --head-int8) and validate in between:
 *
 *   config_defaults(cfg);
 *   checkpoint_config_read(path, cfg, dir, sizeof dir, err);  (then overrides, config_validate)
 *   model_t *m = checkpoint_model_load(dir, &cfg->model, NULL, err);
 *
 * checkpoint_config_read resolves `path` (a checkpoint root, a step directory, or a regular file
 * in a step directory such as its model.safetensors, which stands for that directory) to the
 * step directory, copied into dir[cap], and applies the run config stored in its model file over
 * *cfg when cfg is non-NULL (NULL: the caller takes its config elsewhere), without validating.
 * Returns 0, or -1 with err: QERR_NOTFOUND / QERR_IO naming a path that cannot be read, and
 * checkpoint_resolve's and checkpoint_config_apply's errors. */
int checkpoint_config_read(const char *path, quillan_config_t *cfg, char *dir, size_t cap,
                           qerr_t *err);

/* A new model of config mc with the step directory `dir` loaded into it (checkpoint_load, no
 * optimizer; *st filled when st is non-NULL). Returns the model, owned by the caller
 * (model_destroy), or NULL with err (model_new's error, or the file and tensor at fault). */
model_t *checkpoint_model_load(const char *dir, const model_config_t *mc, checkpoint_state_t *st,
                               qerr_t *err);

#endif
