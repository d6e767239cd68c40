/* CurveZMQ keys, the ZAP allow-list handler, and the config's `security` section mapped onto
 * net_security_t (ARCHITECTURE.md §4, docs/SECURITY.md).
 *
 * Key files (written by `quillan keygen PREFIX`):
 *   PREFIX.pub  the public key: one Z85 line (40 characters);
 *   PREFIX.key  the secret key, then the public key: two Z85 lines; mode 0600.
 * Lines that are blank or start with '#' and are not a key are comments; a key line may carry
 * a label after white space ("KEY  worker-3"). A .pub file is therefore also an allow-list:
 * `cat workers/w1.pub workers/w2.pub > allow_list`.
 *
 * The ZAP handler: one per ZeroMQ context, started by the first CURVE bind in that context
 * (net.h) and stopped when the last CURVE server socket of the context is destroyed. A REP
 * socket on inproc://zeromq.zap.01 served by its own thread admits a CURVE client only when its
 * public key is in the allow-list file, and answers with User-Id = the key in Z85. Each refusal
 * is counted and logged as "net.zap.refused" with the peer's address and key (a key refused
 * again and again is logged at its 1st-3rd refusal, then at powers of two). The file is
 * re-read when SIGHUP arrives: the first handler start installs a SIGHUP handler when SIGHUP is
 * still at its default disposition; a daemon with its own SIGHUP handler calls
 * net_zap_request_reload from it. A file that fails to load on reload leaves the previous list
 * in force (logged as "net.zap.reload" at error level). */
#ifndef QUILLAN_NET_SECURITY_H
#define QUILLAN_NET_SECURITY_H

#include "config.h"
#include "net.h"

#include <stddef.h>
#include <stdint.h>

/* Which side(s) of a connection a process's sockets take; a bit set. */
typedef enum {
    NET_ROLE_SERVER = 1, /* binds: needs security.keys.server (secret) and security.allow_list */
    NET_ROLE_CLIENT = 2, /* connects: needs security.keys.client and the server's public key */
    NET_ROLE_BOTH = 3,
} net_role_t;

/* Maps cfg->security onto *out for a process taking `role`: mode NONE (bind_any copied; a
 * server role logs "net.security" warning that traffic is plain TCP) or CURVE with the keys the
 * role needs read from their files (security.keys.server/.client name a key PREFIX or its .key
 * or .pub file) and the allow-list checked to load. Returns 0, or -1 with err naming the config
 * key and file:line. */
int net_security_from_config(const quillan_config_t *cfg, net_role_t role, net_security_t *out,
                             qerr_t *err);

/* A CURVE key pair, Z85 with NUL. */
typedef struct {
    char public_z85[NET_KEY_Z85_LEN + 1];
    char secret_z85[NET_KEY_Z85_LEN + 1];
} net_keypair_t;

/* A fresh key pair (zmq_curve_keypair). Returns 0, or -1 with err (libzmq without CURVE). */
int net_keypair_generate(net_keypair_t *kp, qerr_t *err);

/* Writes PREFIX.key (mode 0600, refused if it exists) and PREFIX.pub (0644). Returns 0, or -1
 * with err naming the file. */
int net_keypair_write(const char *prefix, const net_keypair_t *kp, qerr_t *err);

/* Reads a key pair from PATH (a PREFIX, PREFIX.key or PREFIX.pub: the .key file is read) and
 * checks the public key belongs to the secret one. Returns 0, or -1 with err naming file:line. */
int net_keypair_read(const char *path, net_keypair_t *kp, qerr_t *err);

/* Reads a public key from PATH (a PREFIX, PREFIX.key or PREFIX.pub: the .pub file is read, or
 * the public line of the .key file when there is no .pub). Returns 0, or -1 with err. */
int net_key_read_public(const char *path, char out[NET_KEY_Z85_LEN + 1], qerr_t *err);

/* Parses allow-list text (name is for messages): into keys (32 bytes each, capacity cap; may be
 * NULL to only count). Returns the number of keys (duplicates kept), or -1 with err naming
 * name:line. */
long net_allow_list_parse(const char *text, size_t len, const char *name, uint8_t (*keys)[32],
                          size_t cap, qerr_t *err);

typedef struct {
    uint64_t admitted;      /* handshakes admitted */
    uint64_t refused;       /* handshakes refused: key not listed, or not CURVE */
    uint64_t malformed;     /* ZAP requests that did not follow RFC 27 */
    uint64_t reloads;       /* allow-list re-reads that succeeded */
    uint64_t reload_failed; /* re-reads that failed (previous list kept) */
    uint64_t keys;          /* keys in force */
} net_zap_stats_t;

/* Counters of the ZAP handler running in zctx. Returns 0, or -1 when none runs there. */
int net_zap_stats(void *zctx, net_zap_stats_t *out);

/* Asks every ZAP handler of the process to re-read its allow-list within about 100 ms.
 * Async-signal-safe. */
void net_zap_request_reload(void);

/* For net.c: the ZAP handler of zctx, started (allow-list loaded, REP bound, thread running)
 * when this is the first reference. A second reference with another allow_list is refused.
 * Returns 0, or -1 with err. Every successful call is paired with net_zap_release. */
int net_zap_acquire(void *zctx, const char *allow_list, qerr_t *err);
void net_zap_release(void *zctx);

#endif
