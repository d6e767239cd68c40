/* libFuzzer target: the JSONL dataset reader (common/jsonl.h): open a file holding the input,
 * then parse every line (at most 64) as an RL and as an SFT example. */
#include "fuzz_util.h"
#include "jsonl.h"

#include <jansson.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    char path[64];
    int fd = fuzz_memfile(data, size, path, sizeof path);
    if (fd < 0)
        return 0;
    qerr_t e;
    qerr_clear(&e);
    jsonl_reader_t *r = jsonl_reader_new(path, 4096, &e);
    if (r == NULL) {
        fuzz_check_error(&e);
        close(fd);
        return 0;
    }
    size_t n = jsonl_reader_count(r);
    for (size_t i = 0; i < n && i < 64; i++) {
        json_t *o = jsonl_reader_object(r, i, &e);
        if (o == NULL)
            fuzz_check_error(&e);
        json_decref(o);
        for (int task = 0; task < JSONL_TASK_COUNT; task++) {
            jsonl_example_t ex;
            if (jsonl_reader_example(r, i, (jsonl_task_t)task, &ex, &e) == 0)
                jsonl_example_free(&ex);
            else
                fuzz_check_error(&e);
        }
    }
    jsonl_reader_destroy(&r);
    close(fd);
    return 0;
}
