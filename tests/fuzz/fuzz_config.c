/* libFuzzer target: the YAML config loader (common/config.h config_load) on a file holding the
 * input, then one `--set` override made of the input's first line when it has a '='. */
#include "config.h"
#include "fuzz_util.h"

#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    static quillan_config_t cfg;
    char path[64];
    int fd = fuzz_memfile(data, size, path, sizeof path);
    if (fd < 0)
        return 0;
    qerr_t e;
    qerr_clear(&e);
    config_defaults(&cfg);
    if (config_load(&cfg, path, &e) != 0)
        fuzz_check_error(&e);
    close(fd);
    const uint8_t *nl = memchr(data, '\n', size);
    size_t n = nl ? (size_t)(nl - data) : size;
    if (n < 512 && memchr(data, '=', n) != NULL && memchr(data, '\0', n) == NULL) {
        char line[512];
        memcpy(line, data, n);
        line[n] = '\0';
        config_defaults(&cfg);
        if (config_set(&cfg, line, &e) != 0)
            fuzz_check_error(&e);
    }
    return 0;
}
