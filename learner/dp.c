#include "dp.h"

#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

struct dp_comm {
    const dp_ops_t *ops;
    void *impl;
    int rank, world;
    size_t bucket;
    int aborted; /* this rank called dp_abort: fail before touching the group */
};

int dp_rank(const dp_comm_t *c) {
    return c->rank;
}

int dp_world(const dp_comm_t *c) {
    return c->world;
}

int dp_is_root(const dp_comm_t *c) {
    return c->rank == 0;
}

size_t dp_bucket_bytes(const dp_comm_t *c) {
    return c->bucket;
}

size_t dp_dtype_size(dp_dtype_t t) {
    Q_ASSERT(t >= 0 && t < DP_DTYPE_COUNT);
    return t == DP_F32 ? sizeof(float) : sizeof(double);
}

void dp_shard(long n, int world, int rank, long *begin, long *count) {
    Q_ASSERT(n >= 0 && world >= 1 && rank >= 0 && rank < world);
    const long q = n / world, rem = n % world;
    *begin = (long)rank * q + (rank < rem ? rank : rem);
    *count = q + (rank < rem ? 1 : 0);
}

static int comm_check(const dp_comm_t *c, const char *what, qerr_t *err) {
    if (c->aborted)
        return qerr_set(err, QERR_INVALID, "dp %s on rank %d: this rank aborted the group", what,
                        c->rank);
    return 0;
}

int dp_allreduce(dp_comm_t *c, void *buf, size_t count, dp_dtype_t t, dp_op_t op, qerr_t *err) {
    if (t < 0 || t >= DP_DTYPE_COUNT || op < 0 || op >= DP_OP_COUNT)
        return qerr_set(err, QERR_RANGE, "dp all-reduce on rank %d: type %d or op %d unknown",
                        c->rank, (int)t, (int)op);
    if (count > 0 && !buf)
        return qerr_set(err, QERR_INVALID, "dp all-reduce on rank %d: NULL buffer of %zu elements",
                        c->rank, count);
    if (comm_check(c, "all-reduce", err))
        return -1;
    const size_t es = dp_dtype_size(t);
    const size_t per = c->bucket / es > 0 ? c->bucket / es : 1;
    for (size_t off = 0; off < count; off += per) {
        const size_t n = count - off < per ? count - off : per;
        if (c->ops->allreduce(c->impl, (char *)buf + off * es, n, t, op, err))
            return -1;
    }
    return 0;
}

int dp_broadcast(dp_comm_t *c, void *buf, size_t bytes, qerr_t *err) {
    if (bytes > 0 && !buf)
        return qerr_set(err, QERR_INVALID, "dp broadcast on rank %d: NULL buffer of %zu bytes",
                        c->rank, bytes);
    if (comm_check(c, "broadcast", err))
        return -1;
    for (size_t off = 0; off < bytes; off += c->bucket) {
        const size_t n = bytes - off < c->bucket ? bytes - off : c->bucket;
        if (c->ops->broadcast(c->impl, (char *)buf + off, n, err))
            return -1;
    }
    return 0;
}

int dp_barrier(dp_comm_t *c, qerr_t *err) {
    if (comm_check(c, "barrier", err))
        return -1;
    return c->ops->barrier(c->impl, err);
}

void dp_abort(dp_comm_t *c) {
    c->aborted = 1;
    c->ops->abort(c->impl);
}

dp_comm_t *dp_comm_new(const dp_ops_t *ops, void *impl, int rank, int world, size_t bucket_bytes,
                       qerr_t *err) {
    if (world < 1 || rank < 0 || rank >= world) {
        ops->destroy(impl);
        qerr_set(err, QERR_RANGE, "dp: rank %d of a group of %d", rank, world);
        return NULL;
    }
    dp_comm_t *c = calloc(1, sizeof *c);
    if (!c) {
        ops->destroy(impl);
        qerr_set(err, QERR_NOMEM, "out of memory");
        return NULL;
    }
    *c = (dp_comm_t){.ops = ops,
                     .impl = impl,
                     .rank = rank,
                     .world = world,
                     .bucket = bucket_bytes ? bucket_bytes : DP_BUCKET_BYTES_DEFAULT};
    return c;
}

void dp_comm_destroy(dp_comm_t **c) {
    if (!c || !*c)
        return;
    (*c)->ops->destroy((*c)->impl);
    free(*c);
    *c = NULL;
}

/* ---- In-process reducer ---- */

/* What a rank brings to the current collective. */
typedef struct {
    void *buf;
    size_t count; /* elements (all-reduce) or bytes (broadcast) */
    int kind;     /* 0 all-reduce, 1 broadcast */
    dp_dtype_t t;
    dp_op_t op;
} local_slot_t;

typedef struct {
    dp_local_t *g;
    int rank;
} local_rank_t;

struct dp_local {
    int world;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    unsigned long gen; /* barrier generation */
    int arrived;
    int abort_rank; /* first rank that aborted, -1 while healthy */
    local_slot_t *slot;
    local_rank_t *ranks;
    dp_comm_t *comms;
};

static int local_aborted(const dp_local_t *g, int rank, qerr_t *err) {
    return qerr_set(err, QERR_INVALID, "dp rank %d: the group was aborted by rank %d", rank,
                    g->abort_rank);
}

/* The group barrier; fails once the group is aborted. */
static int local_wait(dp_local_t *g, int rank, qerr_t *err) {
    pthread_mutex_lock(&g->mu);
    int ok = g->abort_rank < 0;
    if (ok) {
        const unsigned long gen = g->gen;
        if (++g->arrived == g->world) {
            g->arrived = 0;
            g->gen++;
            pthread_cond_broadcast(&g->cv);
        } else {
            while (gen == g->gen && g->abort_rank < 0)
                pthread_cond_wait(&g->cv, &g->mu);
            ok = gen != g->gen;
        }
    }
    pthread_mutex_unlock(&g->mu);
    return ok ? 0 : local_aborted(g, rank, err);
}

/* After the first barrier every rank sees every slot: all of them reach the same verdict. */
static int local_slots_agree(const dp_local_t *g, int rank, qerr_t *err) {
    const local_slot_t *s0 = &g->slot[0];
    for (int k = 1; k < g->world; k++) {
        const local_slot_t *s = &g->slot[k];
        if (s->kind != s0->kind || s->count != s0->count ||
            (s->kind == 0 && (s->t != s0->t || s->op != s0->op)))
            return qerr_set(err, QERR_INVALID,
                            "dp rank %d: rank %d called %s of %zu (type %d, op %d) while rank 0 "
                            "called %s of %zu (type %d, op %d)",
                            rank, k, s->kind ? "broadcast" : "all-reduce", s->count, (int)s->t,
                            (int)s->op, s0->kind ? "broadcast" : "all-reduce", s0->count,
                            (int)s0->t, (int)s0->op);
    }
    return 0;
}

#define LOCAL_CHUNK 512 /* elements summed at a time on the stack */

/* Reduces elements [lo, hi) of every rank's buffer into all of them, in rank order. */
#define LOCAL_REDUCE(T)                                                                            \
    static void local_reduce_##T(const local_slot_t *slot, int world, size_t lo, size_t hi,        \
                                 dp_op_t op) {                                                     \
        T acc[LOCAL_CHUNK];                                                                        \
        for (size_t i0 = lo; i0 < hi; i0 += LOCAL_CHUNK) {                                         \
            const size_t n = hi - i0 < LOCAL_CHUNK ? hi - i0 : LOCAL_CHUNK;                        \
            memcpy(acc, (const T *)slot[0].buf + i0, n * sizeof(T));                               \
            for (int k = 1; k < world; k++) {                                                      \
                const T *x = (const T *)slot[k].buf + i0;                                          \
                for (size_t j = 0; j < n; j++)                                                     \
                    acc[j] += x[j];                                                                \
            }                                                                                      \
            if (op == DP_MEAN)                                                                     \
                for (size_t j = 0; j < n; j++)                                                     \
                    acc[j] /= (T)world;                                                            \
            for (int k = 0; k < world; k++)                                                        \
                memcpy((T *)slot[k].buf + i0, acc, n * sizeof(T));                                 \
        }                                                                                          \
    }
LOCAL_REDUCE(float)
LOCAL_REDUCE(double)

static int local_allreduce(void *impl, void *buf, size_t count, dp_dtype_t t, dp_op_t op,
                           qerr_t *err) {
    local_rank_t *lr = impl;
    dp_local_t *g = lr->g;
    const int r = lr->rank;
    g->slot[r] = (local_slot_t){.buf = buf, .count = count, .kind = 0, .t = t, .op = op};
    if (local_wait(g, r, err) || local_slots_agree(g, r, err))
        return -1;
    /* Rank r owns slice r: no two threads write the same element, and the sum of an element
     * does not depend on which thread computes it. */
    const size_t lo = count * (size_t)r / (size_t)g->world;
    const size_t hi = count * (size_t)(r + 1) / (size_t)g->world;
    if (t == DP_F32)
        local_reduce_float(g->slot, g->world, lo, hi, op);
    else
        local_reduce_double(g->slot, g->world, lo, hi, op);
    /* No rank may touch its buffer again before every slice is written. */
    return local_wait(g, r, err);
}

static int local_broadcast(void *impl, void *buf, size_t bytes, qerr_t *err) {
    local_rank_t *lr = impl;
    dp_local_t *g = lr->g;
    const int r = lr->rank;
    g->slot[r] = (local_slot_t){.buf = buf, .count = bytes, .kind = 1};
    if (local_wait(g, r, err) || local_slots_agree(g, r, err))
        return -1;
    if (r != 0)
        memcpy(buf, g->slot[0].buf, bytes);
    return local_wait(g, r, err);
}

static int local_barrier(void *impl, qerr_t *err) {
    local_rank_t *lr = impl;
    return local_wait(lr->g, lr->rank, err);
}

static void local_abort(void *impl) {
    local_rank_t *lr = impl;
    dp_local_t *g = lr->g;
    pthread_mutex_lock(&g->mu);
    if (g->abort_rank < 0)
        g->abort_rank = lr->rank;
    pthread_cond_broadcast(&g->cv);
    pthread_mutex_unlock(&g->mu);
}

/* The group owns its ranks' state. */
static void local_destroy_none(void *impl) {
    (void)impl;
}

static const dp_ops_t local_ops = {.allreduce = local_allreduce,
                                   .broadcast = local_broadcast,
                                   .barrier = local_barrier,
                                   .abort = local_abort,
                                   .destroy = local_destroy_none};

dp_local_t *dp_local_new(int world, size_t bucket_bytes, qerr_t *err) {
    if (world < 1 || world > DP_LOCAL_MAX) {
        qerr_set(err, QERR_RANGE, "dp: %d ranks; an in-process group has 1 .. %d", world,
                 DP_LOCAL_MAX);
        return NULL;
    }
    dp_local_t *g = calloc(1, sizeof *g);
    if (!g) {
        qerr_set(err, QERR_NOMEM, "out of memory");
        return NULL;
    }
    g->world = world;
    g->abort_rank = -1;
    g->slot = calloc((size_t)world, sizeof *g->slot);
    g->ranks = calloc((size_t)world, sizeof *g->ranks);
    g->comms = calloc((size_t)world, sizeof *g->comms);
    if (!g->slot || !g->ranks || !g->comms) {
        free(g->slot);
        free(g->ranks);
        free(g->comms);
        free(g);
        qerr_set(err, QERR_NOMEM, "out of memory");
        return NULL;
    }
    pthread_mutex_init(&g->mu, NULL);
    pthread_cond_init(&g->cv, NULL);
    for (int r = 0; r < world; r++) {
        g->ranks[r] = (local_rank_t){.g = g, .rank = r};
        g->comms[r] = (dp_comm_t){.ops = &local_ops,
                                  .impl = &g->ranks[r],
                                  .rank = r,
                                  .world = world,
                                  .bucket = bucket_bytes ? bucket_bytes : DP_BUCKET_BYTES_DEFAULT};
    }
    return g;
}

void dp_local_destroy(dp_local_t **g) {
    if (!g || !*g)
        return;
    pthread_mutex_destroy(&(*g)->mu);
    pthread_cond_destroy(&(*g)->cv);
    free((*g)->slot);
    free((*g)->ranks);
    free((*g)->comms);
    free(*g);
    *g = NULL;
}

dp_comm_t *dp_local_comm(dp_local_t *g, int rank) {
    Q_ASSERT(rank >= 0 && rank < g->world);
    return &g->comms[rank];
}

typedef struct {
    dp_local_t *g;
    int rank;
    dp_rank_fn fn;
    void *arg;
    int rc;
    qerr_t err;
} local_job_t;

static void *local_job_run(void *p) {
    local_job_t *j = p;
    dp_comm_t *c = dp_local_comm(j->g, j->rank);
    qerr_clear(&j->err);
    j->rc = j->fn(c, j->arg, &j->err);
    if (j->rc)
        dp_abort(c);
    return NULL;
}

int dp_local_run(dp_local_t *g, dp_rank_fn fn, void *arg, qerr_t *err) {
    local_job_t *jobs = calloc((size_t)g->world, sizeof *jobs);
    pthread_t *th = calloc((size_t)g->world, sizeof *th);
    if (!jobs || !th) {
        free(jobs);
        free(th);
        return qerr_set(err, QERR_NOMEM, "out of memory");
    }
    int started = 1;
    for (int r = 0; r < g->world; r++)
        jobs[r] = (local_job_t){.g = g, .rank = r, .fn = fn, .arg = arg};
    for (int r = 1; r < g->world; r++) {
        if (pthread_create(&th[r], NULL, local_job_run, &jobs[r]) != 0) {
            /* The ranks already started must not wait for this one. */
            local_abort(&g->ranks[r]);
            jobs[r].rc =
                qerr_set(&jobs[r].err, QERR_NOMEM, "dp: cannot start a thread for rank %d", r);
            break;
        }
        started++;
    }
    if (started == g->world)
        local_job_run(&jobs[0]);
    else
        jobs[0].rc = local_aborted(g, 0, &jobs[0].err);
    for (int r = 1; r < started; r++)
        pthread_join(th[r], NULL);
    int rc = 0, pick = -1;
    for (int r = 0; r < g->world && pick < 0; r++)
        if (jobs[r].rc && r == g->abort_rank)
            pick = r;
    for (int r = 0; r < g->world && pick < 0; r++)
        if (jobs[r].rc)
            pick = r;
    if (pick >= 0) {
        rc = -1;
        if (err)
            *err = jobs[pick].err;
    }
    free(jobs);
    free(th);
    return rc;
}
