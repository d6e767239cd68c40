#include "alloc.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

void *q_aligned_alloc(size_t align, size_t n) {
    void *p = NULL;
    if (align < sizeof(void *) || (align & (align - 1)) != 0)
        return NULL;
    if (posix_memalign(&p, align, n ? n : align) != 0)
        return NULL;
    return p;
}

void *q_aligned_calloc(size_t count, size_t size) {
    size_t n = q_mul_size(count, size);
    if (n == SIZE_MAX)
        return NULL;
    void *p = q_aligned_alloc(Q_ALIGN, n);
    if (p)
        memset(p, 0, n);
    return p;
}

void q_aligned_free(void *p) {
    free(p);
}

size_t q_mul_size(size_t a, size_t b) {
    if (a != 0 && b > SIZE_MAX / a)
        return SIZE_MAX;
    return a * b;
}
