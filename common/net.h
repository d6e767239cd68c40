/* ZeroMQ helpers shared by every Quillan process (ARCHITECTURE.md §3, §4).
 *
 * One place creates sockets and applies every option of §3 (ZMQ_MAXMSGSIZE per protocol,
 * libzmq heartbeats, linger, high-water marks, ROUTER_MANDATORY / ROUTER_HANDOVER) and the
 * security settings. Messages are [Envelope][optional raw payload]:
 *   - ROUTER receives [routing id][Envelope][payload?], or [routing id][""][Envelope] from a
 *     REQ client, whose empty delimiter is accepted and repeated in the reply;
 *   - DEALER and REQ receive [Envelope][payload?].
 * Any other frame count is drained, dropped and counted; so is an Envelope of another protocol
 * version, one that does not decode within the byte budget, one whose body belongs to another
 * protocol, and one the socket's validator refuses. Drops are counted per socket and reason
 * (net_stats_t) and logged (event "net.drop"); they never reach the caller.
 *
 * Oversize frames: ZMQ_MAXMSGSIZE limits each frame. libzmq handles a frame over it by closing
 * that TCP connection, and reports it only as a disconnect (the same event as a peer that went
 * away). Every message behind it on that connection is lost too; the peer's libzmq reconnects
 * by itself and later messages arrive. So each socket counts disconnects (net_stats_t
 * .disconnects, event "net.disconnect"), and every request/response of our protocols has a
 * timeout and a retry (Lazy Pirate) or credit refresh. Our own sends check frame sizes against
 * the limit first, so a Quillan peer never trips it.
 *
 * Sockets are not thread-safe (ZeroMQ rule): use each from one thread at a time. */
#ifndef QUILLAN_NET_H
#define QUILLAN_NET_H

#include "wire_codec.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* Extra room over the chunk size that a weights frame may use (ARCHITECTURE.md §3). */
#define NET_WEIGHTS_FRAME_SLACK ((int64_t)64 << 10)

/* Tunables of every socket; a later step maps the config's `network` section onto them.
 * Times in milliseconds; sizes in bytes; HWMs in messages. */
typedef struct {
    int64_t control_max_msg_bytes; /* ZMQ_MAXMSGSIZE of dispatch, reward and log sockets:
                                      4 MiB; range [64 KiB, 1 GiB] */
    int64_t chunk_bytes;           /* weight chunk size: 1 MiB; weights sockets get ZMQ_MAXMSGSIZE
                                      chunk + 64 KiB; range [4 KiB, 256 MiB] */
    int heartbeat_ivl_ms;          /* ZMQ_HEARTBEAT_IVL: 1000; [0 (off), 60000]; always off
                                    * with libzmq < 4.3.5, whose heartbeat timeout can abort
                                    * the process (net.c) */
    int heartbeat_timeout_ms;      /* ZMQ_HEARTBEAT_TIMEOUT: 5000 (5 missed); [ivl, 600000] */
    int heartbeat_ttl_ms;          /* ZMQ_HEARTBEAT_TTL asked of the peer: 5000; [0, 6553500] */
    int linger_ms;                 /* ZMQ_LINGER on close: 500; [0, 60000] */
    int sndhwm;                    /* ZMQ_SNDHWM: 1000; [1, 1000000] */
    int rcvhwm;                    /* ZMQ_RCVHWM: 1000; [1, 1000000] */
    int reconnect_ivl_ms;          /* ZMQ_RECONNECT_IVL: 100; [10, 60000] */
    int reconnect_ivl_max_ms;      /* ZMQ_RECONNECT_IVL_MAX: 5000; [reconnect_ivl, 600000] */
    int send_timeout_ms;           /* ZMQ_SNDTIMEO of DEALER/REQ sockets: 1000; [0, 600000].
                                      ROUTER and PUB-like sockets never block: 0. */
    size_t decode_budget_bytes;    /* floor of the decoder memory per message: 64 MiB;
                                      >= 1 MiB; net_options_decode_budget raises it with
                                      control_max_msg_bytes */
} net_options_t;

/* Fills o with the defaults above. */
void net_options_init(net_options_t *o);

/* Checks every range above; returns 0, or -1 with QERR_RANGE naming the option. */
int net_options_validate(const net_options_t *o, qerr_t *err);

/* ZMQ_MAXMSGSIZE that sockets of this protocol use under o. */
int64_t net_options_max_frame(const net_options_t *o, wire_protocol_t protocol);

/* Decoder memory in bytes that sockets of this protocol allow one received Envelope under o
 * (which passes net_options_validate):
 * the larger of decode_budget_bytes and wire_decode_budget(control_max_msg_bytes) on dispatch,
 * reward and log sockets, so raising network.max_msg_bytes never makes a legitimate message
 * that fits the frame fail to decode; decode_budget_bytes alone on weights sockets, whose
 * Envelopes are headers (chunk bytes travel in the raw payload frame and are never decoded). */
size_t net_options_decode_budget(const net_options_t *o, wire_protocol_t protocol);

/* Transport security (ARCHITECTURE.md §4), checked by net_socket_new and applied by the first
 * net_socket_bind or net_socket_connect of the socket, which is when its role shows:
 *   - NONE: plain TCP. A tcp:// bind must name a loopback host (127.x, localhost, [::1]) unless
 *     bind_any is set; with bind_any a non-loopback bind logs a "net.insecure" warning.
 *   - CURVE, bound socket (a server): ZMQ_CURVE_SERVER with server_secret, ZAP domain
 *     "quillan", and the context's ZAP handler (net_security.h) is started BEFORE the bind, so
 *     only client keys listed in allow_list complete the handshake. Every received message
 *     whose "User-Id" metadata is empty is dropped (NET_DROP_UNAUTHENTICATED): libzmq 4.3
 *     admits any client that knows the server key when no ZAP handler answers.
 *   - CURVE, connected socket (a client): client_public/client_secret, and server_public as
 *     the key the server must prove it holds.
 * inproc:// endpoints never run a security handshake (libzmq), so they are exempt from both
 * the role and the loopback rule. A socket that binds and then connects (or the reverse)
 * under CURVE is refused: one socket has one role. Fill this with net_security_from_config
 * (net_security.h); {.mode = NET_SECURITY_NONE} is plain loopback TCP. */
typedef enum {
    NET_SECURITY_NONE = 0, /* plain TCP: bind to loopback unless bind_any */
    NET_SECURITY_CURVE,    /* CurveZMQ with a ZAP allow-list */
    NET_SECURITY_MODE_COUNT
} net_security_mode_t;

/* Characters of a Z85-encoded CURVE key (32 bytes), without the NUL. */
#define NET_KEY_Z85_LEN 40
/* Bytes of a file path kept in net_security_t, NUL included. */
#define NET_SECURITY_PATH_MAX 1024

typedef struct {
    net_security_mode_t mode;
    bool bind_any; /* NONE: tcp:// binds beyond loopback allowed (with a warning) */
    /* CURVE keys, Z85 and NUL-terminated; "" where the role does not need them. */
    char server_public[NET_KEY_Z85_LEN + 1]; /* servers and clients */
    char server_secret[NET_KEY_Z85_LEN + 1]; /* servers only */
    char client_public[NET_KEY_Z85_LEN + 1]; /* clients only */
    char client_secret[NET_KEY_Z85_LEN + 1]; /* clients only */
    char allow_list[NET_SECURITY_PATH_MAX];  /* servers: the ZAP handler's allow-list file */
} net_security_t;

/* Why a received message was dropped. */
typedef enum {
    NET_DROP_FRAMES = 0,      /* frame count other than 1 or 2 (after routing id/delimiter) */
    NET_DROP_VERSION,         /* Envelope.protocol_version differs from ours */
    NET_DROP_DECODE,          /* not a valid Envelope */
    NET_DROP_BUDGET,          /* decoding needed more than decode_budget_bytes */
    NET_DROP_BODY,            /* no body, or a body of another protocol, or bad UTF-8 */
    NET_DROP_INVALID,         /* refused by the socket's validator (semantic invariants) */
    NET_DROP_UNAUTHENTICATED, /* security on and the "User-Id" metadata is empty */
    NET_DROP_COUNT
} net_drop_t;

/* "frames" | "version" | "decode" | "budget" | "body" | "invalid" | "unauthenticated". */
const char *net_drop_name(net_drop_t reason);

typedef struct {
    uint64_t received;                /* messages delivered to the caller */
    uint64_t sent;                    /* messages handed to libzmq */
    uint64_t send_failed;             /* sends refused: queue full, peer gone, frame too big */
    uint64_t dropped[NET_DROP_COUNT]; /* received messages dropped, by reason */
    uint64_t disconnects;             /* connections closed: peer left or died, or libzmq cut
                                         it over an oversize frame or a protocol error */
} net_stats_t;

/* Semantic check of a received Envelope with its payload frame length (0 when none); returns
 * 0 to accept, or -1 with err to drop (NET_DROP_INVALID). The per-protocol codecs provide one:
 * dispatch_codec_net_validate, weights_codec_net_validate, reward_codec_net_validate,
 * log_codec_net_validate. */
typedef int (*net_validate_fn)(void *ctx, const Quillan__Envelope *env, size_t payload_len,
                               qerr_t *err);

/* What a socket is. */
typedef struct {
    int type;                 /* ZMQ_ROUTER, ZMQ_DEALER, ZMQ_REQ, ZMQ_XPUB, ZMQ_PUB, ZMQ_SUB */
    wire_protocol_t protocol; /* picks the version check, body set and ZMQ_MAXMSGSIZE */
    const char *name;         /* for logs and stats ("dispatcher"); copied */
    const char *sender_id;    /* this process's stable id, written in every Envelope; copied */
    uint64_t incarnation_id;  /* this process's incarnation (net_incarnation_new) */
    net_validate_fn validate; /* may be NULL: then only the checks of wire_codec_unpack */
    void *validate_ctx;       /* passed to validate; must outlive the socket */
} net_socket_spec_t;

typedef struct net_socket net_socket_t;

/* A fresh random non-zero incarnation id for this process start (libsodium randombytes). */
uint64_t net_incarnation_new(void);

/* Creates a socket in the ZeroMQ context zctx with every option applied; NULL with err on
 * failure (invalid options, unknown security mode, a CURVE key that is not Z85, libzmq error).
 * sec is copied. Destroy with net_socket_destroy before zmq_ctx_term. */
net_socket_t *net_socket_new(void *zctx, const net_socket_spec_t *spec, const net_options_t *opt,
                             const net_security_t *sec, qerr_t *err);

/* Closes the socket (lingering linger_ms) and sets *s to NULL; safe when *s is NULL. */
void net_socket_destroy(net_socket_t **s);

/* Binds to endpoint ("tcp://127.0.0.1:*" picks a free port: read it with
 * net_socket_endpoint). Returns 0, or -1 with QERR_IO naming the endpoint; QERR_INVALID when
 * the security rules above refuse it (plain TCP beyond loopback, CURVE server keys or
 * allow-list missing, a connected CURVE socket); the ZAP handler's errors (allow-list file). */
int net_socket_bind(net_socket_t *s, const char *endpoint, qerr_t *err);

/* Connects to endpoint; libzmq connects and reconnects in the background. Under CURVE the
 * client keys and server_public must be set (QERR_INVALID otherwise). A server that refuses
 * our key is not reported here: libzmq keeps retrying and nothing is ever delivered. */
int net_socket_connect(net_socket_t *s, const char *endpoint, qerr_t *err);

/* The last endpoint bound or connected, with the port resolved; "" before either. */
const char *net_socket_endpoint(const net_socket_t *s);

/* The libzmq socket, only to put in a zmq_pollitem_t (ZMQ_POLLIN) or to read an option. */
void *net_socket_handle(net_socket_t *s);

/* The decode budget in force (net_options_decode_budget at creation), in bytes. */
size_t net_socket_decode_budget(const net_socket_t *s);

/* Copies the counters into *out after taking in pending connection events. */
void net_socket_stats(net_socket_t *s, net_stats_t *out);

/* A ROUTER's peer: the routing id of the connection, and whether the peer is a REQ socket
 * (whose replies need the empty delimiter frame). A plain value: store and copy it freely. */
typedef struct {
    uint8_t id[255];
    uint8_t id_len;
    uint8_t req;
} net_peer_t;

/* A received message: the decoded Envelope, the optional payload frame, the peer (ROUTER). */
typedef struct net_msg net_msg_t;

/* Waits up to timeout_ms (0: do not wait, -1: forever) for the next good message, dropping
 * and counting bad ones on the way. Returns 1 with *out set (the caller destroys it), 0 when
 * the time ran out, or -1 with err on a socket failure (context terminated, socket closed). */
int net_recv(net_socket_t *s, int timeout_ms, net_msg_t **out, qerr_t *err);

/* The decoded Envelope; valid until net_msg_destroy. */
const Quillan__Envelope *net_msg_envelope(const net_msg_t *m);

/* The raw payload frame and its length, or NULL and 0 when the message had none; valid until
 * net_msg_destroy. */
const void *net_msg_payload(const net_msg_t *m, size_t *len);

/* The sender (ROUTER sockets); id_len is 0 on other socket types. */
const net_peer_t *net_msg_peer(const net_msg_t *m);

/* Frees the message and sets *m to NULL; safe when *m is NULL. */
void net_msg_destroy(net_msg_t **m);

/* Sends env (body filled by the caller; protocol version, sender and message id filled here)
 * and an optional payload frame (copied; NULL/0 for none). peer is required on ROUTER sockets
 * and ignored elsewhere. *message_id (may be NULL) receives the Envelope's message id.
 * Returns 0, or -1 with err: QERR_TIMEOUT (send queue full: nothing was sent), QERR_NOTFOUND
 * (ROUTER peer gone), QERR_RANGE (a frame over the protocol's ZMQ_MAXMSGSIZE), QERR_INVALID
 * (body of another protocol), QERR_IO. Does not log (the log publisher sends through it). */
int net_send(net_socket_t *s, const net_peer_t *peer, Quillan__Envelope *env, const void *payload,
             size_t payload_len, uint64_t *message_id, qerr_t *err);

/* Called by libzmq, possibly from its I/O thread, once it no longer needs a zero-copy
 * payload. */
typedef void (*net_free_fn)(void *data, void *hint);

/* net_send without copying the payload: data must stay valid and unchanged until free_fn(data,
 * hint) is called, which happens exactly once, also when the send fails. */
int net_send_zc(net_socket_t *s, const net_peer_t *peer, Quillan__Envelope *env, void *payload,
                size_t payload_len, net_free_fn free_fn, void *hint, uint64_t *message_id,
                qerr_t *err);

/* Replies to a received message: net_send to its peer (ROUTER, with the REQ delimiter when the
 * request had one). */
int net_reply(net_socket_t *s, const net_msg_t *request, Quillan__Envelope *env,
              const void *payload, size_t payload_len, qerr_t *err);

#endif
