/* Shared by the GPU parity programs (the .cu files of tests/gpu, CUDA C++): the PARITY line, the
 * error measure, checks, random inputs and device buffers, and the no-GPU skip.
 *
 * Every check prints one line
 *   PARITY <name> max_rel_err=<e> tol=<t> PASS|FAIL
 * with max_rel_err = max_i |gpu_i - cpu_i| / max_i |cpu_i| (the error relative to the reference
 * tensor's scale, ggml's normalised-error habit). A NaN or Inf on either side fails. tol=0
 * checks compare bits or integers. A program returns parity_finish()'s status: 1 if any check
 * failed. Device helpers abort through CUDA_CHECK: a parity program has nothing to recover. */
#ifndef QUILLAN_GPU_PARITY_H
#define QUILLAN_GPU_PARITY_H

#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <cuda_runtime.h>
#include <vector>

#include "cuda_check.h"

extern "C" {
#include "rng.h"
}

/* Exit status of a parity program that found no GPU: CTest's SKIP_RETURN_CODE (skipped, never
 * passed). */
#define PARITY_SKIP 77

inline int g_parity_failed, g_parity_checks;
/* The input stream of every random tensor; parity_start seeds it. */
inline rng_stream_t g_parity_rng;

inline void report(const char *name, double err, double tol, int ok) {
    g_parity_checks++;
    g_parity_failed += !ok;
    printf("PARITY %s max_rel_err=%.3e tol=%.1e %s\n", name, err, tol, ok ? "PASS" : "FAIL");
    fflush(stdout);
}

/* max |g - c| / max |c| (max |g - c| when c is all zero); *finite = 0 when either side has a
 * NaN or an Inf. */
inline double rel_err(const float *g, const float *c, size_t n, int *finite) {
    double num = 0, den = 0;
    *finite = 1;
    for (size_t i = 0; i < n; i++) {
        if (!isfinite(g[i]) || !isfinite(c[i]))
            *finite = 0;
        num = fmax(num, fabs((double)g[i] - (double)c[i]));
        den = fmax(den, fabs((double)c[i]));
    }
    return den > 0 ? num / den : num;
}

inline void check(const char *name, const std::vector<float> &g, const std::vector<float> &c,
                  double tol) {
    int finite;
    const double e =
        rel_err(g.data(), c.data(), g.size() < c.size() ? g.size() : c.size(), &finite);
    report(name, e, tol, g.size() == c.size() && finite && e <= tol);
}

/* Bit-exact floats: the same bits everywhere, and finite. */
inline void check_exact(const char *name, const std::vector<float> &g,
                        const std::vector<float> &c) {
    int finite;
    const double e =
        rel_err(g.data(), c.data(), g.size() < c.size() ? g.size() : c.size(), &finite);
    const int same = g.size() == c.size() && memcmp(g.data(), c.data(), g.size() * 4) == 0;
    report(name, e, 0, same && finite);
}

/* Exact equality of integer-valued data (indices, counts, codes); the error is the count of
 * differing elements. */
template <typename T> inline void check_same(const char *name, const T *g, const T *c, size_t n) {
    size_t diff = 0;
    for (size_t i = 0; i < n; i++)
        diff += g[i] != c[i];
    report(name, (double)diff, 0, diff == 0);
}

inline void check_scalar(const char *name, double g, double c, double tol) {
    const double e = fabs(g - c) / (fabs(c) > 0 ? fabs(c) : 1.0);
    report(name, e, tol, isfinite(g) && isfinite(c) && e <= tol);
}

/* printf into a static buffer, for check names (valid until the next call). */
inline const char *nm(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
inline const char *nm(const char *fmt, ...) {
    static char buf[200];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    return buf;
}

/* n normal values times scale, from g_parity_rng. */
inline std::vector<float> randn(size_t n, float scale) {
    std::vector<float> v(n);
    for (size_t i = 0; i < n; i++)
        v[i] = scale * rng_stream_normal(&g_parity_rng);
    return v;
}

/* Uniform integer in [lo, hi), hi > lo. */
inline int randint(int lo, int hi) {
    const int k = (int)(rng_stream_uniform(&g_parity_rng) * (float)(hi - lo));
    return lo + (k < hi - lo ? k : hi - lo - 1);
}

/* Device copy of a host vector (cudaMalloc; free with dfree). */
template <typename T> inline T *dev(const std::vector<T> &h) {
    T *d = nullptr;
    CUDA_CHECK(cudaMalloc(&d, (h.size() ? h.size() : 1) * sizeof(T)));
    if (!h.empty())
        CUDA_CHECK(cudaMemcpy(d, h.data(), h.size() * sizeof(T), cudaMemcpyHostToDevice));
    return d;
}

/* n zeroed device elements. */
template <typename T> inline T *dev_zero(size_t n) {
    T *d = nullptr;
    CUDA_CHECK(cudaMalloc(&d, (n ? n : 1) * sizeof(T)));
    CUDA_CHECK(cudaMemset(d, 0, (n ? n : 1) * sizeof(T)));
    return d;
}

/* Host copy of n device elements, after every queued kernel has finished. */
template <typename T> inline std::vector<T> host(const T *d, size_t n) {
    std::vector<T> h(n);
    CUDA_CHECK(cudaDeviceSynchronize());
    if (n)
        CUDA_CHECK(cudaMemcpy(h.data(), d, n * sizeof(T), cudaMemcpyDeviceToHost));
    return h;
}

inline void dfree(void *p) {
    CUDA_CHECK(cudaFree(p));
}

/* Prints the device, seeds g_parity_rng with (tag, seed). Returns 0, or PARITY_SKIP after a
 * SKIP line when no CUDA device is present. */
inline int parity_start(const char *program, uint64_t tag, uint64_t seed) {
    int ndev = 0;
    if (cudaGetDeviceCount(&ndev) != cudaSuccess || ndev == 0) {
        (void)cudaGetLastError();
        printf("SKIP %s: no CUDA device\n", program);
        return PARITY_SKIP;
    }
    cudaDeviceProp prop;
    CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
    printf("%s on %s (sm_%d%d)\n", program, prop.name, prop.major, prop.minor);
    rng_stream_init(&g_parity_rng, tag, seed, 0);
    return 0;
}

/* The summary line; the program's exit status (1 if any check failed). */
inline int parity_finish(const char *program) {
    CUDA_CHECK(cudaDeviceSynchronize());
    printf("%s: %d checks, %d failed\n", program, g_parity_checks, g_parity_failed);
    return g_parity_failed ? 1 : 0;
}

#endif
