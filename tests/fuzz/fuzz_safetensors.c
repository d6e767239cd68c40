/* libFuzzer target: the safetensors reader, from memory and from a file, reading every tensor's
 * descriptor and every metadata entry. */
#include "fuzz_util.h"
#include "safetensors.h"

#include <string.h>

static void walk(const safetensors_reader_t *r) {
    size_t n = safetensors_reader_count(r);
    for (size_t i = 0; i < n; i++) {
        const safetensors_tensor_t *t = safetensors_reader_at(r, i);
        Q_ASSERT(t != NULL);
        Q_ASSERT(safetensors_reader_find(r, t->name) != NULL);
        if (t->nbytes > 0) { /* the first and last byte lie inside the image */
            volatile uint8_t first = ((const uint8_t *)t->data)[0];
            volatile uint8_t last = ((const uint8_t *)t->data)[t->nbytes - 1];
            (void)first;
            (void)last;
        }
    }
    size_t m = safetensors_reader_metadata_count(r);
    for (size_t i = 0; i < m; i++) {
        const char *k, *v;
        safetensors_reader_metadata_at(r, i, &k, &v);
        Q_ASSERT(strlen(k) + strlen(v) < ((size_t)1 << 40));
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    qerr_t e;
    qerr_clear(&e);
    safetensors_reader_t *r = safetensors_reader_new_memory(data, size, "fuzz", &e);
    if (r == NULL)
        fuzz_check_error(&e);
    else
        walk(r);
    safetensors_reader_destroy(&r);
    char path[64];
    int fd = fuzz_memfile(data, size, path, sizeof path);
    if (fd < 0)
        return 0;
    r = safetensors_reader_new(path, &e);
    if (r == NULL)
        fuzz_check_error(&e);
    else
        walk(r);
    safetensors_reader_destroy(&r);
    close(fd);
    return 0;
}
