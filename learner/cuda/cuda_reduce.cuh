/* Device-side helpers shared by the kernels of learner/cuda: warp and block reductions in a
 * fixed order (deterministic run to run), launch sizing, and the bug trap. CUDA only.
 *
 * Block reductions require blockDim.x to be a multiple of 32 (at most 1024) and a 1-D block;
 * every thread of the block must call them (they synchronise), and each returns the result to
 * every thread. They use a __shared__ scratch of 33 elements per type that they synchronise
 * around, so one may follow another directly. */
#ifndef QUILLAN_CUDA_REDUCE_CUH
#define QUILLAN_CUDA_REDUCE_CUH

#include <stddef.h>
#include <stdint.h>

#include <cuda_runtime.h>

#include "cuda_check.h"

/* Threads per block of the element-wise kernels. */
#define CUDA_THREADS 256
/* Most blocks of a grid-stride launch: enough to fill any current GPU several times over. */
#define CUDA_MAX_BLOCKS 65535

/* Blocks for n elements at `threads` per block, capped for grid-stride loops (>= 1). */
static inline unsigned cuda_blocks_for(size_t n, unsigned threads) {
    size_t b = (n + threads - 1) / threads;
    if (b < 1)
        b = 1;
    return (unsigned)(b > CUDA_MAX_BLOCKS ? CUDA_MAX_BLOCKS : b);
}

template <typename T> struct cuda_op_sum {
    __device__ static T apply(T a, T b) { return a + b; }
};
template <typename T> struct cuda_op_max {
    __device__ static T apply(T a, T b) { return a > b ? a : b; }
};
/* fmaxf semantics: a NaN operand is ignored (as the CPU's R_FMAX). */
struct cuda_op_fmaxf {
    __device__ static float apply(float a, float b) { return fmaxf(a, b); }
};

/* Butterfly over the 32 lanes: every lane gets the result, the pairing order is fixed. */
template <typename Op, typename T> __device__ inline T cuda_warp_reduce(T v) {
    for (int off = 16; off > 0; off >>= 1)
        v = Op::apply(v, __shfl_xor_sync(0xffffffffu, v, off));
    return v;
}

/* Warp results combined by warp 0 in warp order; `ident` fills the missing lanes. */
template <typename Op, typename T> __device__ inline T cuda_block_reduce(T v, T ident) {
    __shared__ T sh[33];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int nwarps = (int)(blockDim.x >> 5);
    v = cuda_warp_reduce<Op>(v);
    if (lane == 0)
        sh[warp] = v;
    __syncthreads();
    if (warp == 0) {
        T w = lane < nwarps ? sh[lane] : ident;
        w = cuda_warp_reduce<Op>(w);
        if (lane == 0)
            sh[32] = w;
    }
    __syncthreads();
    const T r = sh[32];
    __syncthreads(); /* sh is free again for the next reduction */
    return r;
}

/* A kernel met a broken invariant (bad token id and the like): print what and where, then
 * trap, which fails the next checked CUDA call on the host. */
__device__ inline void cuda_bug(const char *what, long long a, long long b) {
    printf("quillan cuda bug: %s (%lld, %lld) in block %d thread %d\n", what, a, b, (int)blockIdx.x,
           (int)threadIdx.x);
    __trap();
}

#endif
