/* common/net_security.h: key files, allow-list parsing, the config mapping, the loopback rule of
 * plain TCP, and CURVE with the ZAP handler over loopback in one process (admission, refusal
 * counting, User-Id, reload). The multi-process acceptance test is tests/e2e/security_e2e.c. */
#include "test_proto_fixtures.h"

#include "net_security.h"

#include <criterion/criterion.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zmq.h>

/* Bounded waits for a connection to come up: a count of polls, not a timing assertion. */
#define RECV_MS 5000
#define WAIT_POLLS 500

static char dir[] = "/tmp/quillan-netsec-XXXXXX";
static void *zctx;

static void setup(void) {
    cr_assert_not_null(mkdtemp(dir));
    zctx = zmq_ctx_new();
    log_set_stderr(0);
}

/* The context is not terminated: after a failed assertion sockets may still be open, and
 * zmq_ctx_term would wait for them forever; each test runs in its own process. */
static void teardown(void) {
    char cmd[128];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
    cr_assert_eq(system(cmd), 0);
    log_set_stderr(1);
}

TestSuite(net_security, .init = setup, .fini = teardown);

static void path_of(char *out, size_t cap, const char *name) {
    snprintf(out, cap, "%s/%s", dir, name);
}

static void text_put(const char *name, const char *text, const char *mode) {
    char p[256];
    path_of(p, sizeof p, name);
    FILE *f = fopen(p, mode);
    cr_assert_not_null(f);
    fputs(text, f);
    fclose(f);
}

static net_keypair_t keys_make(const char *name) {
    char prefix[256];
    path_of(prefix, sizeof prefix, name);
    net_keypair_t kp;
    qerr_t e;
    cr_assert_eq(net_keypair_generate(&kp, &e), 0, "%s", e.msg);
    cr_assert_eq(net_keypair_write(prefix, &kp, &e), 0, "%s", e.msg);
    return kp;
}

Test(net_security, allow_list_lines) {
    net_keypair_t a, b;
    qerr_t e;
    cr_assert_eq(net_keypair_generate(&a, &e), 0);
    cr_assert_eq(net_keypair_generate(&b, &e), 0);
    char text[512];
    snprintf(text, sizeof text, "# workers\n\n  %s  worker-1\n%s\r\n# end\n", a.public_z85,
             b.public_z85);
    uint8_t keys[4][32];
    cr_assert_eq(net_allow_list_parse(text, strlen(text), "list", keys, 4, &e), 2, "%s", e.msg);
    uint8_t want[32];
    zmq_z85_decode(want, a.public_z85);
    cr_assert_eq(memcmp(keys[0], want, 32), 0);
    zmq_z85_decode(want, b.public_z85);
    cr_assert_eq(memcmp(keys[1], want, 32), 0);

    /* A short or non-Z85 token is neither a key nor a comment: refused with the line. */
    snprintf(text, sizeof text, "%s\nnot-a-key\n", a.public_z85);
    cr_assert_eq(net_allow_list_parse(text, strlen(text), "list", NULL, 0, &e), -1);
    cr_assert_not_null(strstr(e.msg, "list:2"), "%s", e.msg);
    char bad[NET_KEY_Z85_LEN + 2];
    memcpy(bad, a.public_z85, sizeof a.public_z85);
    bad[5] = '~'; /* not in the Z85 alphabet */
    cr_assert_eq(net_allow_list_parse(bad, strlen(bad), "list", NULL, 0, &e), -1);
    cr_assert_eq(net_allow_list_parse("", 0, "list", NULL, 0, &e), 0);
}

Test(net_security, key_files) {
    net_keypair_t kp = keys_make("w");
    char p[256];
    path_of(p, sizeof p, "w.key");
    struct stat st;
    cr_assert_eq(stat(p, &st), 0);
    cr_assert_eq(st.st_mode & 0777, 0600, "secret key mode %o", st.st_mode & 0777);
    qerr_t e;
    net_keypair_t back;
    const char *names[] = {"w", "w.key", "w.pub"};
    for (size_t i = 0; i < 3; i++) {
        path_of(p, sizeof p, names[i]);
        cr_assert_eq(net_keypair_read(p, &back, &e), 0, "%s: %s", names[i], e.msg);
        cr_assert_str_eq(back.secret_z85, kp.secret_z85);
        cr_assert_str_eq(back.public_z85, kp.public_z85);
        char pub[NET_KEY_Z85_LEN + 1];
        cr_assert_eq(net_key_read_public(p, pub, &e), 0, "%s", e.msg);
        cr_assert_str_eq(pub, kp.public_z85);
    }
    /* Never overwrites a secret key. */
    path_of(p, sizeof p, "w");
    cr_assert_eq(net_keypair_write(p, &kp, &e), -1);
    /* A public key where the pair belongs, and a pair whose halves do not match. */
    net_keypair_t other;
    net_keypair_generate(&other, &e);
    char text[256];
    snprintf(text, sizeof text, "%s\n", kp.public_z85);
    text_put("pubonly.key", text, "w");
    path_of(p, sizeof p, "pubonly");
    cr_assert_eq(net_keypair_read(p, &back, &e), -1);
    cr_assert_not_null(strstr(e.msg, "found 1 key"), "%s", e.msg);
    snprintf(text, sizeof text, "%s\n%s\n", kp.secret_z85, other.public_z85);
    text_put("mixed.key", text, "w");
    path_of(p, sizeof p, "mixed");
    cr_assert_eq(net_keypair_read(p, &back, &e), -1);
    cr_assert_not_null(strstr(e.msg, "does not belong"), "%s", e.msg);
}

Test(net_security, from_config) {
    quillan_config_t *cfg = malloc(sizeof *cfg);
    config_defaults(cfg);
    net_security_t sec;
    qerr_t e;
    cfg->security.bind_any = true;
    cr_assert_eq(net_security_from_config(cfg, NET_ROLE_BOTH, &sec, &e), 0);
    cr_assert_eq(sec.mode, NET_SECURITY_NONE);
    cr_assert(sec.bind_any);

    net_keypair_t srv = keys_make("server"), cli = keys_make("client");
    cfg->security.curve = true;
    path_of(cfg->security.keys.server, sizeof cfg->security.keys.server, "server");
    cr_assert_eq(net_security_from_config(cfg, NET_ROLE_SERVER, &sec, &e), -1);
    cr_assert_not_null(strstr(e.msg, "security.allow_list"), "%s", e.msg);
    path_of(cfg->security.allow_list, sizeof cfg->security.allow_list, "allow");
    cr_assert_eq(net_security_from_config(cfg, NET_ROLE_SERVER, &sec, &e), -1);
    cr_assert_not_null(strstr(e.msg, "security.allow_list"), "%s", e.msg); /* no such file */
    text_put("allow", "garbage\n", "w");
    cr_assert_eq(net_security_from_config(cfg, NET_ROLE_SERVER, &sec, &e), -1);
    cr_assert_not_null(strstr(e.msg, "allow:1"), "%s", e.msg);
    text_put("allow", cli.public_z85, "w");
    cr_assert_eq(net_security_from_config(cfg, NET_ROLE_SERVER, &sec, &e), 0, "%s", e.msg);
    cr_assert_eq(sec.mode, NET_SECURITY_CURVE);
    cr_assert_str_eq(sec.server_secret, srv.secret_z85);
    cr_assert_str_eq(sec.client_secret, "");

    cr_assert_eq(net_security_from_config(cfg, NET_ROLE_CLIENT, &sec, &e), -1);
    cr_assert_not_null(strstr(e.msg, "security.keys.client"), "%s", e.msg);
    path_of(cfg->security.keys.client, sizeof cfg->security.keys.client, "client.key");
    /* A client machine holds only the server's public key. */
    char p[256], away[256];
    path_of(p, sizeof p, "server.key");
    path_of(away, sizeof away, "server.away");
    cr_assert_eq(rename(p, away), 0);
    cr_assert_eq(net_security_from_config(cfg, NET_ROLE_CLIENT, &sec, &e), 0, "%s", e.msg);
    cr_assert_str_eq(sec.server_public, srv.public_z85);
    cr_assert_str_eq(sec.server_secret, "");
    cr_assert_str_eq(sec.client_public, cli.public_z85);
    free(cfg);
}

static net_socket_t *sock(int type, const char *name, const net_security_t *sec) {
    net_options_t o;
    net_options_init(&o);
    o.linger_ms = 0;
    net_socket_spec_t spec = {.type = type,
                              .protocol = WIRE_PROTOCOL_LOG,
                              .name = name,
                              .sender_id = name,
                              .incarnation_id = 1};
    qerr_t e;
    net_socket_t *s = net_socket_new(zctx, &spec, &o, sec, &e);
    cr_assert_not_null(s, "%s", e.msg);
    return s;
}

Test(net_security, plain_tcp_stays_on_loopback) {
    net_security_t sec = {.mode = NET_SECURITY_NONE};
    net_socket_t *s = sock(ZMQ_ROUTER, "plain", &sec);
    qerr_t e;
    cr_assert_eq(net_socket_bind(s, "tcp://*:0", &e), -1);
    cr_assert_not_null(strstr(e.msg, "security.bind_any"), "%s", e.msg);
    cr_assert_eq(net_socket_bind(s, "tcp://0.0.0.0:0", &e), -1);
    cr_assert_eq(net_socket_bind(s, "tcp://127.0.0.1:*", &e), 0, "%s", e.msg);
    cr_assert_eq(net_socket_bind(s, "inproc://plain-test", &e), 0, "%s", e.msg);
    net_socket_destroy(&s);
    sec.bind_any = true;
    s = sock(ZMQ_ROUTER, "plain-any", &sec);
    cr_assert_eq(net_socket_bind(s, "tcp://0.0.0.0:*", &e), 0, "%s", e.msg);
    net_socket_destroy(&s);
}

/* Sends a LogRecord from the client until the server gets one, at most WAIT_POLLS times;
 * returns whether one arrived. */
static int exchange(net_socket_t *server, net_socket_t *client) {
    static fixture_t fx;
    fixture_init(&fx);
    for (int i = 0; i < WAIT_POLLS; i++) {
        Quillan__Envelope env;
        fixture_envelope(&fx, QUILLAN__ENVELOPE__BODY_LOG_RECORD, &env);
        qerr_t e;
        net_send(client, NULL, &env, NULL, 0, NULL, &e);
        net_msg_t *m = NULL;
        if (net_recv(server, 10, &m, &e) == 1) {
            net_msg_destroy(&m);
            return 1;
        }
    }
    return 0;
}

static int zap_refused_at_least(uint64_t n) {
    for (int i = 0; i < WAIT_POLLS; i++) {
        net_zap_stats_t st;
        if (net_zap_stats(zctx, &st) == 0 && st.refused >= n)
            return 1;
        usleep(10000);
    }
    return 0;
}

Test(net_security, curve_admits_listed_keys_only) {
    net_keypair_t srv = keys_make("server"), good = keys_make("good"), bad = keys_make("bad");
    text_put("allow", "# test\n", "w");
    text_put("allow", good.public_z85, "a");
    net_security_t ssec = {.mode = NET_SECURITY_CURVE};
    memcpy(ssec.server_public, srv.public_z85, sizeof ssec.server_public);
    memcpy(ssec.server_secret, srv.secret_z85, sizeof ssec.server_secret);
    path_of(ssec.allow_list, sizeof ssec.allow_list, "allow");
    net_security_t gsec = {.mode = NET_SECURITY_CURVE}, bsec;
    memcpy(gsec.server_public, srv.public_z85, sizeof gsec.server_public);
    memcpy(gsec.client_public, good.public_z85, sizeof gsec.client_public);
    memcpy(gsec.client_secret, good.secret_z85, sizeof gsec.client_secret);
    bsec = gsec;
    memcpy(bsec.client_public, bad.public_z85, sizeof bsec.client_public);
    memcpy(bsec.client_secret, bad.secret_z85, sizeof bsec.client_secret);

    net_zap_stats_t st;
    cr_assert_eq(net_zap_stats(zctx, &st), -1, "no handler before a CURVE bind");
    net_socket_t *server = sock(ZMQ_ROUTER, "server", &ssec);
    qerr_t e;
    cr_assert_eq(net_socket_bind(server, "tcp://127.0.0.1:*", &e), 0, "%s", e.msg);
    cr_assert_eq(net_zap_stats(zctx, &st), 0);
    cr_assert_eq(st.keys, 1);
    /* One socket, one role. */
    cr_assert_eq(net_socket_connect(server, "tcp://127.0.0.1:1", &e), -1);

    net_socket_t *c_bad = sock(ZMQ_DEALER, "bad", &bsec);
    cr_assert_eq(net_socket_connect(c_bad, net_socket_endpoint(server), &e), 0, "%s", e.msg);
    cr_assert(zap_refused_at_least(1), "the unlisted key was never refused");
    net_socket_t *c_good = sock(ZMQ_DEALER, "good", &gsec);
    cr_assert_eq(net_socket_connect(c_good, net_socket_endpoint(server), &e), 0, "%s", e.msg);
    cr_assert(exchange(server, c_good), "the listed key got nothing through");
    /* bad's messages never arrive, however long it tries. */
    static fixture_t fx;
    fixture_init(&fx);
    Quillan__Envelope env;
    fixture_envelope(&fx, QUILLAN__ENVELOPE__BODY_LOG_RECORD, &env);
    net_send(c_bad, NULL, &env, NULL, 0, NULL, &e);
    cr_assert(exchange(server, c_good), "the listed key got nothing through");
    net_msg_t *m = NULL;
    while (net_recv(server, 0, &m, &e) == 1) { /* only good's messages may be here */
        cr_assert_str_eq(net_msg_envelope(m)->sender_id, "good");
        net_msg_destroy(&m);
    }
    net_stats_t ns;
    net_socket_stats(server, &ns);
    cr_assert_eq(ns.dropped[NET_DROP_UNAUTHENTICATED], 0);

    /* Reload: bad becomes listed. */
    text_put("allow", "\n", "a");
    text_put("allow", bad.public_z85, "a");
    net_zap_request_reload();
    for (int i = 0; i < WAIT_POLLS && (net_zap_stats(zctx, &st), st.reloads == 0); i++)
        usleep(10000);
    cr_assert_eq(st.reloads, 1);
    cr_assert_eq(st.keys, 2);
    net_socket_destroy(&c_bad);
    c_bad = sock(ZMQ_DEALER, "bad", &bsec);
    cr_assert_eq(net_socket_connect(c_bad, net_socket_endpoint(server), &e), 0, "%s", e.msg);
    cr_assert(exchange(server, c_bad), "the reloaded key got nothing through");

    /* A reload that fails keeps the list in force. */
    text_put("allow", "garbage\n", "w");
    net_zap_request_reload();
    for (int i = 0; i < WAIT_POLLS && (net_zap_stats(zctx, &st), st.reload_failed == 0); i++)
        usleep(10000);
    cr_assert_eq(st.reload_failed, 1);
    cr_assert_eq(st.keys, 2);

    net_socket_destroy(&c_bad);
    net_socket_destroy(&c_good);
    net_socket_destroy(&server);
    cr_assert_eq(net_zap_stats(zctx, &st), -1, "the handler stops with its last server socket");
    zmq_ctx_term(zctx);
}
