/* Device buffers: see cuda_buf.h. */
#include "cuda_buf.h"

#include <atomic>
#include <mutex>
#include <new>
#include <stdlib.h>
#include <unordered_map>

namespace {

std::atomic<size_t> g_live{0};
std::atomic<size_t> g_peak{0};

/* Raises the peak to at least v (lock-free). */
void peak_raise(size_t v) {
    size_t p = g_peak.load(std::memory_order_relaxed);
    while (v > p && !g_peak.compare_exchange_weak(p, v, std::memory_order_relaxed)) {
    }
}

/* The size of every live allocation, for the accounting in cuda_buf_free (device memory cannot
 * hold a host-readable header). */
std::mutex g_sizes_mu;
std::unordered_map<void *, size_t> *g_sizes;

/* Records p's size; 0, or -1 when the host is out of memory. */
int sizes_add(void *p, size_t bytes) {
    std::lock_guard<std::mutex> lk(g_sizes_mu);
    try {
        if (!g_sizes)
            g_sizes = new std::unordered_map<void *, size_t>();
        (*g_sizes)[p] = bytes;
    } catch (const std::bad_alloc &) {
        return -1;
    }
    return 0;
}

/* Forgets p and returns its size (0 when p was not allocated here: a bug). */
size_t sizes_remove(void *p) {
    std::lock_guard<std::mutex> lk(g_sizes_mu);
    if (!g_sizes)
        return 0;
    const auto it = g_sizes->find(p);
    if (it == g_sizes->end())
        return 0;
    const size_t bytes = it->second;
    g_sizes->erase(it);
    return bytes;
}

} // namespace

extern "C" {

void *cuda_buf_alloc(size_t bytes, qerr_t *err) {
    if (bytes == 0)
        return qerr_set(err, QERR_RANGE, "cuda_buf_alloc: 0 bytes requested"), nullptr;
    void *p = nullptr;
    const cudaError_t e = cudaMalloc(&p, bytes);
    if (e != cudaSuccess) {
        (void)cudaGetLastError();
        return qerr_set(err, e == cudaErrorMemoryAllocation ? QERR_NOMEM : QERR_IO,
                        "cuda_buf_alloc: cudaMalloc of %zu bytes (%.1f MiB; %.1f MiB live "
                        "here): %s",
                        bytes, (double)bytes / 1048576.0,
                        (double)g_live.load(std::memory_order_relaxed) / 1048576.0,
                        cudaGetErrorString(e)),
               nullptr;
    }
    if (sizes_add(p, bytes) != 0) {
        CUDA_CHECK(cudaFree(p));
        return qerr_set(err, QERR_NOMEM, "cuda_buf_alloc: out of host memory"), nullptr;
    }
    peak_raise(g_live.fetch_add(bytes, std::memory_order_relaxed) + bytes);
    return p;
}

void *cuda_buf_calloc(size_t bytes, qerr_t *err) {
    void *p = cuda_buf_alloc(bytes, err);
    if (!p)
        return nullptr;
    const cudaError_t e = cudaMemset(p, 0, bytes);
    if (e != cudaSuccess) {
        (void)cudaGetLastError();
        cuda_buf_free(&p);
        return qerr_set(err, QERR_IO, "cuda_buf_calloc: cudaMemset of %zu bytes: %s", bytes,
                        cudaGetErrorString(e)),
               nullptr;
    }
    return p;
}

void cuda_buf_free(void **p) {
    if (!p || !*p)
        return;
    const size_t bytes = sizes_remove(*p);
    Q_ASSERT(bytes > 0 && "cuda_buf_free of a pointer cuda_buf_alloc did not return");
    g_live.fetch_sub(bytes, std::memory_order_relaxed);
    CUDA_CHECK(cudaFree(*p));
    *p = nullptr;
}

int cuda_buf_upload(void *dst_dev, const void *src_host, size_t bytes, cudaStream_t s,
                    qerr_t *err) {
    CUDA_TRY(err, cudaMemcpyAsync(dst_dev, src_host, bytes, cudaMemcpyHostToDevice, s));
    return 0;
}

int cuda_buf_download(void *dst_host, const void *src_dev, size_t bytes, cudaStream_t s,
                      qerr_t *err) {
    CUDA_TRY(err, cudaMemcpyAsync(dst_host, src_dev, bytes, cudaMemcpyDeviceToHost, s));
    return 0;
}

int cuda_buf_zero(void *dst_dev, size_t bytes, cudaStream_t s, qerr_t *err) {
    CUDA_TRY(err, cudaMemsetAsync(dst_dev, 0, bytes, s));
    return 0;
}

void cuda_buf_stats(size_t *live, size_t *peak) {
    if (live)
        *live = g_live.load(std::memory_order_relaxed);
    if (peak)
        *peak = g_peak.load(std::memory_order_relaxed);
}

void cuda_buf_stats_reset_peak(void) {
    g_peak.store(g_live.load(std::memory_order_relaxed), std::memory_order_relaxed);
}

/* ---- Arena ---- */

struct cuda_arena {
    char *base;
    size_t cap, used, peak;
};

cuda_arena_t *cuda_arena_new(size_t capacity, qerr_t *err) {
    cuda_arena_t *a = (cuda_arena_t *)calloc(1, sizeof *a);
    if (!a)
        return qerr_set(err, QERR_NOMEM, "cuda_arena_new: out of host memory"), nullptr;
    a->base = (char *)cuda_buf_alloc(capacity, err);
    if (!a->base) {
        free(a);
        return nullptr;
    }
    a->cap = capacity;
    return a;
}

void cuda_arena_destroy(cuda_arena_t **pa) {
    if (!pa || !*pa)
        return;
    cuda_arena_t *a = *pa;
    void *base = a->base;
    cuda_buf_free(&base);
    free(a);
    *pa = nullptr;
}

void *cuda_arena_alloc(cuda_arena_t *a, size_t bytes, qerr_t *err) {
    const size_t off = (a->used + CUDA_BUF_ALIGN - 1) / CUDA_BUF_ALIGN * CUDA_BUF_ALIGN;
    if (off > a->cap || bytes > a->cap - off)
        return qerr_set(err, QERR_NOMEM,
                        "cuda arena: %zu bytes requested with %zu of %zu in use (%.1f MiB "
                        "capacity)",
                        bytes, a->used, a->cap, (double)a->cap / 1048576.0),
               nullptr;
    /* A zero-byte piece still advances by one alignment unit, so every piece is unique. */
    a->used = off + (bytes ? bytes : 1);
    if (a->used > a->peak)
        a->peak = a->used;
    return a->base + off;
}

size_t cuda_arena_mark(const cuda_arena_t *a) {
    return a->used;
}

void cuda_arena_rewind(cuda_arena_t *a, size_t mark) {
    Q_ASSERT(mark <= a->used);
    a->used = mark;
}

void cuda_arena_reset(cuda_arena_t *a) {
    a->used = 0;
}

size_t cuda_arena_capacity(const cuda_arena_t *a) {
    return a->cap;
}

size_t cuda_arena_peak(const cuda_arena_t *a) {
    return a->peak;
}

} /* extern "C" */
