#include "kern_pool.h"

#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdlib.h>

/* Spins of an idle worker before it starts yielding the CPU. */
#define POOL_SPINS 20000

struct kern_pool {
    int nthreads;
    pthread_t *threads;
    kern_pool_fn fn;
    void *ctx;
    atomic_uint generation; /* bumped by kern_pool_run to start a round */
    atomic_int pending;     /* workers still running the current round */
    atomic_int stop;
};

typedef struct {
    kern_pool_t *pool;
    int tid;
} worker_arg_t;

static void cpu_relax(unsigned *spins) {
    if (++*spins < POOL_SPINS) {
#if defined(__x86_64__) || defined(__i386__)
        __builtin_ia32_pause();
#endif
    } else {
        sched_yield();
    }
}

static void *worker_main(void *arg) {
    worker_arg_t a = *(worker_arg_t *)arg;
    free(arg);
    kern_pool_t *p = a.pool;
    unsigned seen = 0;
    for (;;) {
        unsigned spins = 0, gen;
        while ((gen = atomic_load_explicit(&p->generation, memory_order_acquire)) == seen &&
               !atomic_load_explicit(&p->stop, memory_order_acquire))
            cpu_relax(&spins);
        if (atomic_load_explicit(&p->stop, memory_order_acquire))
            return NULL;
        seen = gen;
        p->fn(p->ctx, a.tid, p->nthreads);
        atomic_fetch_sub_explicit(&p->pending, 1, memory_order_acq_rel);
    }
}

kern_pool_t *kern_pool_new(int nthreads, qerr_t *err) {
    if (nthreads < 1 || nthreads > KERN_POOL_MAX) {
        qerr_set(err, QERR_RANGE, "thread count %d outside 1..%d", nthreads, KERN_POOL_MAX);
        return NULL;
    }
    kern_pool_t *p = calloc(1, sizeof *p);
    if (!p || !(p->threads = calloc((size_t)nthreads, sizeof *p->threads))) {
        free(p);
        qerr_set(err, QERR_NOMEM, "thread pool of %d", nthreads);
        return NULL;
    }
    p->nthreads = 1;
    atomic_init(&p->generation, 0);
    atomic_init(&p->pending, 0);
    atomic_init(&p->stop, 0);
    for (int t = 1; t < nthreads; t++) {
        worker_arg_t *a = malloc(sizeof *a);
        if (a) {
            a->pool = p;
            a->tid = t;
        }
        if (!a || pthread_create(&p->threads[t], NULL, worker_main, a) != 0) {
            free(a);
            kern_pool_destroy(&p);
            qerr_set(err, QERR_NOMEM, "starting worker thread %d of %d", t, nthreads);
            return NULL;
        }
        p->nthreads = t + 1;
    }
    return p;
}

void kern_pool_destroy(kern_pool_t **pool) {
    if (!pool || !*pool)
        return;
    kern_pool_t *p = *pool;
    atomic_store_explicit(&p->stop, 1, memory_order_release);
    for (int t = 1; t < p->nthreads; t++)
        pthread_join(p->threads[t], NULL);
    free(p->threads);
    free(p);
    *pool = NULL;
}

int kern_pool_size(const kern_pool_t *pool) {
    return pool->nthreads;
}

void kern_pool_run(kern_pool_t *p, kern_pool_fn fn, void *ctx) {
    p->fn = fn;
    p->ctx = ctx;
    atomic_store_explicit(&p->pending, p->nthreads - 1, memory_order_relaxed);
    atomic_fetch_add_explicit(&p->generation, 1, memory_order_acq_rel);
    fn(ctx, 0, p->nthreads);
    unsigned spins = 0;
    while (atomic_load_explicit(&p->pending, memory_order_acquire) > 0)
        cpu_relax(&spins);
}

void kern_split_rows(size_t rows, int tid, int nthreads, size_t align, size_t *r0, size_t *r1) {
    const size_t units = (rows + align - 1) / align, t = (size_t)tid, nt = (size_t)nthreads;
    const size_t base = units / nt, extra = units % nt;
    const size_t u0 = t * base + (t < extra ? t : extra);
    const size_t u1 = u0 + base + (t < extra);
    *r0 = u0 * align < rows ? u0 * align : rows;
    *r1 = u1 * align < rows ? u1 * align : rows;
}
