/* libFuzzer target: the CURVE allow-list and key file parser (common/net_security.h). */
#include "fuzz_util.h"
#include "net_security.h"

#include <stdlib.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    qerr_t e;
    qerr_clear(&e);
    long n = net_allow_list_parse((const char *)data, size, "fuzz", NULL, 0, &e);
    if (n < 0) {
        fuzz_check_error(&e);
        return 0;
    }
    uint8_t(*keys)[32] = malloc((size_t)(n > 0 ? n : 1) * 32);
    Q_ASSERT(net_allow_list_parse((const char *)data, size, "fuzz", keys, (size_t)n, &e) == n);
    free(keys);
    return 0;
}
