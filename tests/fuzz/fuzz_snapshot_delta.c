/* libFuzzer target: the snapshot delta applier (rollout/snapshot_client.h snapshot_delta_apply),
 * which a worker runs on bytes received from the learner. The first two input bytes give the
 * base length (a fixed pattern); the rest is the delta payload. out must be written only on
 * success. */
#include "fuzz_util.h"
#include "snapshot_client.h"

#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size < 2)
        return 0;
    size_t base_len = ((size_t)data[0] | (size_t)data[1] << 8) % 16384;
    uint8_t *base = malloc(base_len + 1), *out = malloc(base_len + 1);
    for (size_t i = 0; i < base_len; i++) {
        base[i] = (uint8_t)(i * 31 + 7);
        out[i] = 0xA5;
    }
    qerr_t e;
    qerr_clear(&e);
    if (snapshot_delta_apply(base, base_len, data + 2, size - 2, out, &e) != 0) {
        fuzz_check_error(&e);
        for (size_t i = 0; i < base_len; i++)
            Q_ASSERT(out[i] == 0xA5);
    }
    free(base);
    free(out);
    return 0;
}
