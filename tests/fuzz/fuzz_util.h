/* Helpers shared by the libFuzzer targets (tests/fuzz/fuzz_*.c). */
#ifndef QUILLAN_FUZZ_UTIL_H
#define QUILLAN_FUZZ_UTIL_H

#include "error.h"

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <sys/mman.h>
#include <unistd.h>

/* An anonymous in-memory file holding data, for readers that take a path: its path
 * (/proc/self/fd/N) goes into path. Returns the descriptor (close it), or -1. */
static inline int fuzz_memfile(const uint8_t *data, size_t len, char *path, size_t cap) {
    int fd = memfd_create("fuzz", MFD_CLOEXEC);
    if (fd < 0)
        return -1;
    size_t off = 0;
    while (off < len) {
        ssize_t w = write(fd, data + off, len - off);
        if (w <= 0) {
            close(fd);
            return -1;
        }
        off += (size_t)w;
    }
    snprintf(path, cap, "/proc/self/fd/%d", fd);
    return fd;
}

/* A decoder's failure must say what failed: a code and a message. */
static inline void fuzz_check_error(const qerr_t *e) {
    Q_ASSERT(e->code > QERR_OK && e->code < QERR_COUNT);
    Q_ASSERT(e->msg[0] != '\0');
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#endif
