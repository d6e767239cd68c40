/* Aligned allocation for tensors and kernels. */
#ifndef QUILLAN_ALLOC_H
#define QUILLAN_ALLOC_H

#include <stddef.h>

/* Cache-line and AVX-512 friendly alignment used for every tensor buffer. */
#define Q_ALIGN 64

/* Returns n bytes aligned to `align` (a power of two >= sizeof(void*)), or NULL.
 * n == 0 returns a valid unique pointer. Free with q_aligned_free. */
void *q_aligned_alloc(size_t align, size_t n);

/* Same, zero-filled; NULL also when count * size overflows. */
void *q_aligned_calloc(size_t count, size_t size);

void q_aligned_free(void *p);

/* a * b, or SIZE_MAX when it overflows: lets callers check sizes from untrusted input once. */
size_t q_mul_size(size_t a, size_t b);

#endif
