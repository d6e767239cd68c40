#include "kern_pool.h"

#include <limits.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <time.h>

#ifdef __linux__
#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

enum { MODE_RUN, MODE_FOR };

/* The caller posts a job (post()) by closing the claim counter to the new generation, writing
 * the descriptor under a seqlock (seq odd while it is written) with the generation it belongs
 * to, and then bumping `gen`. A worker may still be reading the descriptor of an older
 * generation while the caller rewrites it (after every chunk of that job was claimed), so the
 * fields are atomics, a worker accepts a descriptor only when seq was even and unchanged around
 * its reads and its generation is the one `gen` showed, and a stale worker's claim fails on
 * the generation in the claim counter. */
struct kern_pool {
    int nthreads;
    pthread_t *threads;
    atomic_uint seq; /* descriptor seqlock */
    atomic_int mode;
    _Atomic(kern_pool_fn) run_fn;
    _Atomic(kern_pool_chunk_fn) chunk_fn;
    _Atomic(void *) ctx;
    atomic_uint nchunks;
    atomic_uint desc_gen; /* generation the descriptor belongs to */
    /* (generation << 32) | next chunk: a claim succeeds only in the generation it read. */
    atomic_ullong claim;
    atomic_uint gen;     /* futex word the workers sleep on */
    atomic_uint done;    /* finished chunks (FOR) or workers (RUN); futex word of the caller */
    atomic_int sleepers; /* workers asleep on gen */
    atomic_int waiting;  /* 1 while the caller sleeps on done */
    atomic_uint done_at; /* value of done that ends the current job */
    atomic_int stop;
    int model_threads; /* timing (caller only) */
    double region_s, model_s;
};

/* A consistent copy of the descriptor. */
typedef struct {
    unsigned gen, nchunks;
    int mode;
    kern_pool_fn run_fn;
    kern_pool_chunk_fn chunk_fn;
    void *ctx;
} job_t;

typedef struct {
    kern_pool_t *pool;
    int tid;
} worker_arg_t;

static void futex_wait(atomic_uint *addr, unsigned val) {
#ifdef __linux__
    syscall(SYS_futex, (void *)addr, FUTEX_WAIT_PRIVATE, val, NULL, NULL, 0);
#else
    (void)addr;
    (void)val;
    sched_yield();
#endif
}

static void futex_wake(atomic_uint *addr) {
#ifdef __linux__
    syscall(SYS_futex, (void *)addr, FUTEX_WAKE_PRIVATE, INT_MAX, NULL, NULL, 0);
#else
    (void)addr;
#endif
}

static double mono_us(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return 1e6 * (double)ts.tv_sec + 1e-3 * (double)ts.tv_nsec;
}

static void cpu_pause(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

/* Spins until *word != old for up to KERN_POOL_SPIN_US; returns 1 when it changed. */
static int spin_until_changed(atomic_uint *word, unsigned old) {
    double t0 = -1;
    for (unsigned i = 1;; i++) {
        if (atomic_load_explicit(word, memory_order_acquire) != old)
            return 1;
        cpu_pause();
        if (i % 64 == 0) {
            const double t = mono_us();
            if (t0 < 0)
                t0 = t;
            else if (t - t0 > KERN_POOL_SPIN_US)
                return 0;
        }
    }
}

/* Runs chunks of generation g until none is left to claim. */
static void claim_chunks(kern_pool_t *p, unsigned g, kern_pool_chunk_fn fn, void *ctx, unsigned n,
                         int tid) {
    for (;;) {
        unsigned long long cur = atomic_load_explicit(&p->claim, memory_order_relaxed);
        do {
            if ((unsigned)(cur >> 32) != g || (unsigned)cur >= n)
                return;
        } while (!atomic_compare_exchange_weak_explicit(
            &p->claim, &cur, cur + 1, memory_order_acquire, memory_order_relaxed));
        fn(ctx, (size_t)(unsigned)cur, tid);
        const unsigned d = atomic_fetch_add_explicit(&p->done, 1, memory_order_seq_cst) + 1;
        if (d == atomic_load_explicit(&p->done_at, memory_order_relaxed) &&
            atomic_load_explicit(&p->waiting, memory_order_seq_cst))
            futex_wake(&p->done);
    }
}

/* Reads the descriptor of the generation `gen` shows (retrying while the caller writes it). */
static void read_job(kern_pool_t *p, job_t *j) {
    for (;;) {
        const unsigned g = atomic_load_explicit(&p->gen, memory_order_acquire);
        const unsigned s1 = atomic_load_explicit(&p->seq, memory_order_acquire);
        j->mode = atomic_load_explicit(&p->mode, memory_order_relaxed);
        j->run_fn = atomic_load_explicit(&p->run_fn, memory_order_relaxed);
        j->chunk_fn = atomic_load_explicit(&p->chunk_fn, memory_order_relaxed);
        j->ctx = atomic_load_explicit(&p->ctx, memory_order_relaxed);
        j->nchunks = atomic_load_explicit(&p->nchunks, memory_order_relaxed);
        j->gen = atomic_load_explicit(&p->desc_gen, memory_order_relaxed);
        atomic_thread_fence(memory_order_acquire);
        const unsigned s2 = atomic_load_explicit(&p->seq, memory_order_relaxed);
        if (s1 == s2 && !(s1 & 1) && j->gen == g)
            return;
        cpu_pause();
    }
}

static void *worker_main(void *arg) {
    worker_arg_t a = *(worker_arg_t *)arg;
    free(arg);
    kern_pool_t *p = a.pool;
    unsigned seen = 0;
    for (;;) {
        if (!spin_until_changed(&p->gen, seen)) {
            atomic_fetch_add_explicit(&p->sleepers, 1, memory_order_seq_cst);
            while (atomic_load_explicit(&p->gen, memory_order_seq_cst) == seen)
                futex_wait(&p->gen, seen);
            atomic_fetch_sub_explicit(&p->sleepers, 1, memory_order_relaxed);
        }
        if (atomic_load_explicit(&p->stop, memory_order_acquire))
            return NULL;
        job_t j;
        read_job(p, &j);
        seen = j.gen;
        if (j.mode == MODE_RUN) {
            j.run_fn(j.ctx, a.tid, p->nthreads);
            const unsigned d = atomic_fetch_add_explicit(&p->done, 1, memory_order_seq_cst) + 1;
            if (d == (unsigned)p->nthreads - 1 &&
                atomic_load_explicit(&p->waiting, memory_order_seq_cst))
                futex_wake(&p->done);
        } else {
            claim_chunks(p, j.gen, j.chunk_fn, j.ctx, j.nchunks, a.tid);
        }
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
    atomic_init(&p->seq, 0);
    atomic_init(&p->desc_gen, 0);
    atomic_init(&p->mode, MODE_RUN);
    atomic_init(&p->run_fn, NULL);
    atomic_init(&p->chunk_fn, NULL);
    atomic_init(&p->ctx, NULL);
    atomic_init(&p->nchunks, 0);
    atomic_init(&p->claim, 0);
    atomic_init(&p->gen, 0);
    atomic_init(&p->done, 0);
    atomic_init(&p->sleepers, 0);
    atomic_init(&p->waiting, 0);
    atomic_init(&p->done_at, 0);
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

/* Posts job `mode` as generation gen + 1 (see the struct's comment) and wakes sleeping
 * workers; returns the generation. Only when no chunk of the previous job is left to claim. */
static unsigned post(kern_pool_t *p, int mode, kern_pool_fn rfn, kern_pool_chunk_fn cfn, void *ctx,
                     unsigned nchunks, unsigned done_at) {
    const unsigned g = atomic_load_explicit(&p->gen, memory_order_relaxed) + 1;
    const unsigned s = atomic_load_explicit(&p->seq, memory_order_relaxed);
    atomic_store_explicit(&p->claim, (unsigned long long)g << 32, memory_order_relaxed);
    atomic_store_explicit(&p->seq, s + 1, memory_order_relaxed);
    atomic_thread_fence(memory_order_release);
    atomic_store_explicit(&p->mode, mode, memory_order_relaxed);
    atomic_store_explicit(&p->run_fn, rfn, memory_order_relaxed);
    atomic_store_explicit(&p->chunk_fn, cfn, memory_order_relaxed);
    atomic_store_explicit(&p->ctx, ctx, memory_order_relaxed);
    atomic_store_explicit(&p->nchunks, nchunks, memory_order_relaxed);
    atomic_store_explicit(&p->desc_gen, g, memory_order_relaxed);
    atomic_store_explicit(&p->seq, s + 2, memory_order_release);
    atomic_store_explicit(&p->done, 0, memory_order_relaxed);
    atomic_store_explicit(&p->done_at, done_at, memory_order_relaxed);
    atomic_store_explicit(&p->gen, g, memory_order_seq_cst);
    if (atomic_load_explicit(&p->sleepers, memory_order_seq_cst) > 0)
        futex_wake(&p->gen);
    return g;
}

void kern_pool_destroy(kern_pool_t **pool) {
    if (!pool || !*pool)
        return;
    kern_pool_t *p = *pool;
    atomic_store_explicit(&p->stop, 1, memory_order_seq_cst);
    post(p, MODE_RUN, NULL, NULL, NULL, 0, 0);
    for (int t = 1; t < p->nthreads; t++)
        pthread_join(p->threads[t], NULL);
    free(p->threads);
    free(p);
    *pool = NULL;
}

int kern_pool_size(const kern_pool_t *pool) {
    return pool->nthreads;
}

/* Waits until done reaches `target`: spins, then sleeps on the futex. */
static void wait_done(kern_pool_t *p, unsigned target) {
    unsigned d = atomic_load_explicit(&p->done, memory_order_acquire);
    if (d == target || spin_until_changed(&p->done, d)) {
        while ((d = atomic_load_explicit(&p->done, memory_order_acquire)) != target)
            if (!spin_until_changed(&p->done, d))
                break;
        if (d == target)
            return;
    }
    atomic_store_explicit(&p->waiting, 1, memory_order_seq_cst);
    while ((d = atomic_load_explicit(&p->done, memory_order_seq_cst)) != target)
        futex_wait(&p->done, d);
    atomic_store_explicit(&p->waiting, 0, memory_order_relaxed);
}

void kern_pool_set_timing(kern_pool_t *pool, int model_threads) {
    pool->model_threads = model_threads > 0 ? model_threads : 0;
}

void kern_pool_region_time(const kern_pool_t *pool, double *region_s, double *model_s) {
    *region_s = pool->region_s;
    *model_s = pool->model_s;
}

static void run_all(kern_pool_t *p, kern_pool_fn fn, void *ctx) {
    if (p->nthreads == 1) {
        fn(ctx, 0, 1);
        return;
    }
    post(p, MODE_RUN, fn, NULL, ctx, 0, (unsigned)p->nthreads - 1);
    fn(ctx, 0, p->nthreads);
    wait_done(p, (unsigned)p->nthreads - 1);
}

void kern_pool_run(kern_pool_t *p, kern_pool_fn fn, void *ctx) {
    const double t0 = p->model_threads ? mono_us() : 0;
    run_all(p, fn, ctx);
    if (p->model_threads) {
        const double t = 1e-6 * (mono_us() - t0);
        p->region_s += t;
        p->model_s += t;
    }
}

static void run_chunks(kern_pool_t *p, size_t nchunks, kern_pool_chunk_fn fn, void *ctx) {
    if (p->nthreads == 1 || nchunks == 1) {
        for (size_t c = 0; c < nchunks; c++)
            fn(ctx, c, 0);
        return;
    }
    const unsigned g = post(p, MODE_FOR, NULL, fn, ctx, (unsigned)nchunks, (unsigned)nchunks);
    claim_chunks(p, g, fn, ctx, (unsigned)nchunks, 0);
    wait_done(p, (unsigned)nchunks);
}

void kern_pool_for(kern_pool_t *p, size_t nchunks, kern_pool_chunk_fn fn, void *ctx) {
    Q_ASSERT(nchunks < UINT32_MAX);
    if (nchunks == 0)
        return;
    const double t0 = p->model_threads ? mono_us() : 0;
    run_chunks(p, nchunks, fn, ctx);
    if (p->model_threads) {
        const double t = 1e-6 * (mono_us() - t0);
        const size_t mt = (size_t)p->model_threads;
        p->region_s += t;
        p->model_s += t * (double)((nchunks + mt - 1) / mt) / (double)nchunks;
    }
}

void kern_split_rows(size_t rows, int tid, int nthreads, size_t align, size_t *r0, size_t *r1) {
    const size_t units = (rows + align - 1) / align, t = (size_t)tid, nt = (size_t)nthreads;
    const size_t base = units / nt, extra = units % nt;
    const size_t u0 = t * base + (t < extra ? t : extra);
    const size_t u1 = u0 + base + (t < extra);
    *r0 = u0 * align < rows ? u0 * align : rows;
    *r1 = u1 * align < rows ? u1 * align : rows;
}
