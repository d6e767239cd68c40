/* The quantized policy: the snapshot a learner publishes and a rollout worker runs (MODEL.md
 * §Quantization), as one safetensors container held in memory or in a `.qst` file.
 *
 * Container (safetensors, readable by Python's safetensors):
 *   every tensor of the model with in_rollout set (diffusion.R excluded: the plan sampler never
 *   needs it), under its MODEL.md name, stored as its rollout format packed by common/qtypes.h:
 *     F32 tensors (embeddings, norm gains, balancing biases, FP32 head)  dtype F32, its shape
 *     F16 tensors (attention, overseer, routers)                         dtype F16, its shape
 *     ternary (diffusion BitLinears), INT4 (experts), INT8 (micro agents, head with head_int8)
 *                                                         dtype U8 [rows, qtype_row_bytes(in)]
 *   where rows = product of all dimensions but the last and in = the last dimension, so every
 *   row of a packed matrix starts at row * qtype_row_bytes(type, in).
 *   __metadata__:
 *     "format"   QPOLICY_FORMAT
 *     "version"  the policy version (decimal)
 *     "config"   the model config as a JSON object (every field of model_config_t)
 *     "tensors"  JSON object: name -> {"qtype": "int4", "shape": [E, EH, C]} (logical shape)
 *
 * Validation on parse (every error names the buffer or file and the tensor or key): the
 * safetensors rules, the format string, the config (model_config_validate), and every tensor the
 * config implies present with the right qtype, logical shape, dtype and byte size; no extra
 * tensor. Packed codes are not range-checked (a worker computes with any byte values without
 * going out of bounds); scales must be finite.
 *
 * Threads: a qpolicy_t never changes after creation; any number of threads may read it. */
#ifndef QUILLAN_QPOLICY_H
#define QUILLAN_QPOLICY_H

#include "error.h"
#include "model.h"
#include "model_config.h"
#include "qtypes.h"

#include <stddef.h>
#include <stdint.h>

#define QPOLICY_FORMAT "quillan-qpolicy-1"
/* File name extension of a quantized policy. */
#define QPOLICY_EXT ".qst"

/* One tensor of a policy. data points into the policy's bytes (read-only; row r of a matrix at
 * data + r * qtype_row_bytes(qtype, shape[ndim-1])); aligned to 4 bytes for F32, 2 for F16 and
 * not aligned for packed U8 tensors (kernels read scales with memcpy). */
typedef struct {
    char name[MODEL_NAME_MAX];
    qtype_t qtype;
    int ndim;
    int64_t shape[MODEL_MAX_NDIM]; /* logical shape, as in the model's tensor table */
    size_t rows;                   /* product of shape[0..ndim-2] (1 for a vector) */
    size_t cols;                   /* shape[ndim-1] */
    size_t row_bytes;              /* qtype_row_bytes(qtype, cols) */
    uint64_t offset;               /* bytes from the start of the container */
    uint64_t nbytes;               /* rows * row_bytes */
    const void *data;
} qpolicy_tensor_t;

typedef struct qpolicy qpolicy_t;

/* Quantizes the latent FP32 weights of m (model_params_const) into a new container with the
 * given version: the bytes a learner publishes and `quillan quantize` writes. The result owns
 * its bytes (qpolicy_bytes). NULL with err set (QERR_NOMEM, or QERR_INVALID for a non-finite
 * weight, naming the tensor). Deterministic: the same weights give the same bytes. */
qpolicy_t *qpolicy_build(const model_t *m, uint64_t version, qerr_t *err);

/* Parses and validates a container of len bytes at data. `what` names the source in error
 * messages ("snapshot v12", a path). When release is non-NULL the policy takes the buffer on
 * success and calls release(release_ctx, data, len) when destroyed; when NULL the buffer is
 * borrowed and must outlive the policy. On failure the buffer stays the caller's. NULL with err
 * set (QERR_PARSE / QERR_INVALID / QERR_VERSION, "WHAT: tensor 'NAME': ..."). */
qpolicy_t *qpolicy_parse(const void *data, size_t len, const char *what,
                         void (*release)(void *release_ctx, const void *data, size_t len),
                         void *release_ctx, qerr_t *err);

/* Maps the file at path read-only and parses it (errors start with the path; QERR_NOTFOUND
 * when it does not exist). */
qpolicy_t *qpolicy_open(const char *path, qerr_t *err);

/* Writes the container's bytes to path atomically (temporary file, fsync, rename). */
int qpolicy_write(const qpolicy_t *q, const char *path, qerr_t *err);

/* Frees the policy (and its bytes when owned or mapped); NULLs *q; safe on NULL and twice. */
void qpolicy_destroy(qpolicy_t **q);

/* The whole container (what travels over the network and what the digest covers). */
const void *qpolicy_bytes(const qpolicy_t *q, size_t *len);
uint64_t qpolicy_version(const qpolicy_t *q);
/* The validated model config the policy was built from. */
const model_config_t *qpolicy_config(const qpolicy_t *q);

/* Tensors in the order of the model's tensor table. */
size_t qpolicy_tensor_count(const qpolicy_t *q);
const qpolicy_tensor_t *qpolicy_tensor_at(const qpolicy_t *q, size_t i);
/* The tensor called name, or NULL. */
const qpolicy_tensor_t *qpolicy_tensor_find(const qpolicy_t *q, const char *name);

/* The rollout format of a model tensor as a packed type. */
qtype_t qpolicy_qtype_of(quant_type_t rollout);

#endif
