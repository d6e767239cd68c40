/* The learner's snapshot store (ARCHITECTURE.md §2 step 6, TRAINING.md "Snapshots").
 *
 * publish() copies the bytes of a quantized policy (an opaque buffer: the safetensors container
 * of common/qpolicy.h) into a frozen entry: page-aligned memory made read-only (mprotect), so a
 * stray write faults instead of corrupting what workers are pulling. Each entry carries its
 * BLAKE2b-256 digest (libsodium crypto_generichash, 32 bytes) and the tensor table the caller
 * supplied. The store keeps the last `snapshots_kept` versions for late joiners and workers
 * still draining old groups; entries are reference-counted, so an evicted version stays alive
 * until the last chunk of it that libzmq is sending has gone.
 *
 * Deltas. For every version but the first, unless version % full_snapshot_interval == 0, the
 * store also encodes a delta against the previous (latest) entry when both buffers have the same
 * length and the delta is smaller than the full buffer. The buffer is cut into fixed blocks of
 * `block_bytes` (default 256: a quantized RL step flips scattered codes all over the tensors, so
 * 4 KiB blocks would nearly all change; at 256 bytes the index costs ~1% of a changed block).
 *
 * Delta payload (SNAPSHOT_DELTA_MAGIC format, integers little-endian), the normative format that
 * rollout/snapshot_client.c decodes:
 *   offset  0  4 bytes  magic "QSD1"
 *   offset  4  u32      block_bytes (a power of two in [64, 1 MiB])
 *   offset  8  u64      full_bytes: the length of the base and of the result
 *   offset 16  u64      n_runs
 *   offset 24  n_runs x (LEB128 gap, LEB128 count): a run of `count` >= 1 changed blocks that
 *              starts `gap` blocks after the end of the previous run (after block 0 for the
 *              first); runs lie inside ceil(full_bytes / block_bytes) blocks
 *   then       the new bytes of every changed block in order: block_bytes each, except the
 *              buffer's last block, which holds the remainder
 * Applying: copy the base, overwrite the changed blocks; the payload ends exactly there.
 *
 * Thread safety: publish and every get/accessor may run on different threads (the learner
 * publishes from its training thread while weights_server.c serves from its own). Entries are
 * immutable once published. */
#ifndef QUILLAN_SNAPSHOT_STORE_H
#define QUILLAN_SNAPSHOT_STORE_H

#include "error.h"

#include <stddef.h>
#include <stdint.h>

#define SNAPSHOT_DIGEST_BYTES 32
#define SNAPSHOT_DELTA_MAGIC "QSD1"
#define SNAPSHOT_DELTA_HEADER_BYTES 24
#define SNAPSHOT_BLOCK_BYTES_DEFAULT 256u
#define SNAPSHOT_BLOCK_BYTES_MIN 64u
#define SNAPSHOT_BLOCK_BYTES_MAX (1u << 20)

/* One tensor inside the snapshot buffer (the SnapshotInfo tensor table). Strings and shape are
 * borrowed by the caller of publish and copied by the store. */
typedef struct {
    const char *name;      /* non-empty UTF-8 */
    const char *qtype;     /* quantized format name (MODEL.md), non-empty */
    const uint64_t *shape; /* n_dims entries; may be NULL when n_dims is 0 */
    size_t n_dims;
    uint64_t offset; /* byte offset in the full buffer */
    uint64_t bytes;  /* offset + bytes <= the buffer length */
} snapshot_tensor_t;

typedef struct {
    int snapshots_kept;         /* learner.snapshots_kept: versions kept, [1, 64]; default 3 */
    int full_snapshot_interval; /* learner.full_snapshot_interval: versions, >= 1; default 10 */
    uint32_t block_bytes;       /* delta block size, bytes: a power of two in
                                   [SNAPSHOT_BLOCK_BYTES_MIN, _MAX]; default 256 */
} snapshot_store_options_t;

/* What one publish did; snapshot/changed_frac and sync/bytes of TRAINING.md come from here. */
typedef struct {
    uint64_t version;
    uint64_t full_bytes;       /* the buffer's length */
    uint64_t delta_bytes;      /* the delta payload's length; 0 when no delta was kept */
    uint64_t delta_base;       /* the version the delta applies to; 0 when none */
    uint64_t blocks;           /* blocks of the buffer: ceil(full_bytes / block_bytes) */
    uint64_t changed_blocks;   /* blocks that differ from the previous entry */
    uint64_t changed_bytes;    /* bytes that differ from the previous entry */
    double changed_frac;       /* changed_blocks / blocks; 1 for the first or a resized buffer */
    double changed_bytes_frac; /* changed_bytes / full_bytes; 1 likewise */
    double changed_data_frac;  /* bytes inside the tensors' data that differ / the tensors' data
                                  bytes (the header, which names the version, is left out, so a
                                  step that moves no quantized weight gives exactly 0); 1 for the
                                  first or a resized buffer */
    uint64_t sync_bytes;       /* bytes a worker holding the previous version pulls: the delta
                                  when one was kept, else the full buffer */
    double publish_seconds;    /* copy + digest + delta, wall time */
} snapshot_publish_stats_t;

typedef struct snapshot_store snapshot_store_t;
/* A frozen, published snapshot; reference-counted (atomic: refs may drop on libzmq's thread). */
typedef struct snapshot_entry snapshot_entry_t;

/* Fills o with the defaults above. */
void snapshot_store_options_init(snapshot_store_options_t *o);

/* A new empty store; NULL with err (QERR_RANGE naming the option) on bad options. */
snapshot_store_t *snapshot_store_new(const snapshot_store_options_t *o, qerr_t *err);

/* Drops the store's references (entries still referenced elsewhere live on) and sets *s to
 * NULL; safe when *s is NULL. */
void snapshot_store_destroy(snapshot_store_t **s);

/* Publishes version (> every version published before) from len > 0 bytes, copied. The tensor
 * table is validated (non-empty names and qtypes, extents inside the buffer) and copied.
 * Evicts the oldest entries beyond snapshots_kept. Logs event "snapshot.publish" with fields
 * policy/version, snapshot/changed_frac (changed_data_frac), snapshot/changed_blocks_frac,
 * snapshot/changed_bytes_frac, sync/bytes,
 * sync/full_bytes, sync/publish_seconds. Fills *stats (may be NULL). Returns 0, or -1 with err:
 * QERR_INVALID (version not newer, empty buffer, bad tensor), QERR_NOMEM. */
int snapshot_store_publish(snapshot_store_t *s, uint64_t version, const void *bytes, size_t len,
                           int is_old_policy, const snapshot_tensor_t *tensors, size_t n_tensors,
                           snapshot_publish_stats_t *stats, qerr_t *err);

/* The newest version published, 0 when none. */
uint64_t snapshot_store_latest(snapshot_store_t *s);

/* The stats of the last publish (zeroed before the first). */
void snapshot_store_last_stats(snapshot_store_t *s, snapshot_publish_stats_t *out);

/* A new reference to version (0 = the latest), or NULL when it was never published or has been
 * evicted. Release with snapshot_entry_unref. */
snapshot_entry_t *snapshot_store_get(snapshot_store_t *s, uint64_t version);

/* Takes one more reference; returns e. */
snapshot_entry_t *snapshot_entry_ref(snapshot_entry_t *e);
/* Drops one reference (freeing the entry on the last) and sets *e to NULL; safe on NULL. */
void snapshot_entry_unref(snapshot_entry_t **e);

/* Accessors; pointers stay valid while the caller holds its reference. */
uint64_t snapshot_entry_version(const snapshot_entry_t *e);
int snapshot_entry_is_old_policy(const snapshot_entry_t *e);
/* The frozen full buffer (read-only memory) and its length. */
const uint8_t *snapshot_entry_data(const snapshot_entry_t *e, size_t *len);
/* BLAKE2b-256 of the full buffer, SNAPSHOT_DIGEST_BYTES bytes. */
const uint8_t *snapshot_entry_digest(const snapshot_entry_t *e);
/* The delta payload against snapshot_entry_delta_base(e) and its length, or NULL and 0 when the
 * entry has no delta. */
const uint8_t *snapshot_entry_delta(const snapshot_entry_t *e, size_t *len);
uint64_t snapshot_entry_delta_base(const snapshot_entry_t *e);
/* BLAKE2b-256 of the delta payload; NULL when the entry has no delta. */
const uint8_t *snapshot_entry_delta_digest(const snapshot_entry_t *e);
size_t snapshot_entry_tensor_count(const snapshot_entry_t *e);
/* Tensor i < snapshot_entry_tensor_count(e), with the store's copies of the strings. */
const snapshot_tensor_t *snapshot_entry_tensor(const snapshot_entry_t *e, size_t i);

/* Encodes the delta of cur against base (both len bytes) into a new heap buffer (caller frees
 * with free) of *out_len bytes, counting changed blocks and bytes into *changed_blocks and
 * *changed_bytes. block_bytes as in the options. Returns the buffer, or NULL with QERR_NOMEM.
 * Exposed for tests and benchmarks; publish uses it. */
uint8_t *snapshot_delta_encode(const uint8_t *base, const uint8_t *cur, size_t len,
                               uint32_t block_bytes, size_t *out_len, uint64_t *changed_blocks,
                               uint64_t *changed_bytes, qerr_t *err);

#endif
