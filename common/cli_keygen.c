/* quillan keygen: writes a CurveZMQ key pair for security.keys.server / security.keys.client
 * (common/net_security.h, docs/SECURITY.md). */
#include "cli.h"
#include "net_security.h"

#include <stdio.h>
#include <string.h>

static void usage(FILE *out) {
    fprintf(out,
            "usage: quillan keygen [--force] OUT_PREFIX\n\n"
            "Writes a fresh CurveZMQ key pair: OUT_PREFIX.key (the secret key and the public key,\n"
            "mode 0600) and OUT_PREFIX.pub (the public key). Point security.keys.server or\n"
            "security.keys.client at OUT_PREFIX, and append a client's .pub file to the server's\n"
            "security.allow_list. The public key is also printed on standard output.\n\n"
            "options:\n"
            "  --force     replace an existing OUT_PREFIX.key\n"
            "  -h, --help  show this help\n\n"
            "exit status: 0 ok, 1 runtime error (file exists, I/O), 2 usage error\n");
}

int cli_keygen_main(int argc, char **argv) {
    const char *prefix = NULL;
    int force = 0;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "-h") == 0 || strcmp(argv[i], "--help") == 0) {
            usage(stdout);
            return 0;
        }
        if (strcmp(argv[i], "--force") == 0) {
            force = 1;
        } else if (argv[i][0] == '-' || prefix != NULL) {
            fprintf(stderr, "quillan keygen: unexpected argument '%s'\n\n", argv[i]);
            usage(stderr);
            return 2;
        } else {
            prefix = argv[i];
        }
    }
    if (prefix == NULL || prefix[0] == '\0') {
        fprintf(stderr, "quillan keygen: OUT_PREFIX is required\n\n");
        usage(stderr);
        return 2;
    }
    if (force) {
        char key[NET_SECURITY_PATH_MAX + 8];
        snprintf(key, sizeof key, "%s.key", prefix);
        remove(key);
    }
    net_keypair_t kp;
    qerr_t err;
    if (net_keypair_generate(&kp, &err) != 0 || net_keypair_write(prefix, &kp, &err) != 0) {
        fprintf(stderr, "quillan keygen: %s\n", err.msg);
        return 1;
    }
    printf("%s\n", kp.public_z85);
    return 0;
}
