/* libFuzzer target: the quantized-policy reader (common/qpolicy.h qpolicy_parse), the bytes a
 * worker receives as a snapshot, reading every tensor's descriptor of an accepted policy. */
#include "fuzz_util.h"
#include "qpolicy.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    qerr_t e;
    qerr_clear(&e);
    qpolicy_t *q = qpolicy_parse(data, size, "fuzz", NULL, NULL, &e);
    if (q == NULL) {
        fuzz_check_error(&e);
        return 0;
    }
    size_t n = qpolicy_tensor_count(q);
    for (size_t i = 0; i < n; i++)
        Q_ASSERT(qpolicy_tensor_at(q, i) != NULL);
    Q_ASSERT(qpolicy_config(q) != NULL);
    qpolicy_destroy(&q);
    return 0;
}
