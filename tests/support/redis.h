/*
 * redis: a real redis-server (Debian's redis-server package) on loopback for a test.
 *
 * mg_test_redis_start() runs `redis-server` in the foreground on a free port of 127.0.0.1 with
 * nothing saved to disk, a password when one is given (requirepass), and returns once it
 * accepts. mg_test_redis_stop() stops it; mg_test_redis_restart() starts it again on the same
 * port, empty. The child also goes when the test process ends. mg_test_redis_cmd() runs one
 * command with redis-cli and returns its output, for checking what a gateway stored.
 *
 * mg_test_redis_start_tls() serves TLS only (tls-port; no plain port), with certificates made
 * here by openssl: a CA, the server's certificate for 127.0.0.1 and localhost signed by it, a
 * client certificate signed by it, and a second CA that signed neither. It listens on
 * 127.0.0.2 too, an address the certificate does not name. With auth_clients, Redis asks for a
 * client certificate (its default).
 */
#ifndef MG_TEST_REDIS_H
#define MG_TEST_REDIS_H

#include "proc.h"

#include <pthread.h>
#include <stdint.h>

typedef struct mg_test_redis {
    uint16_t port;
    char password[64];             /* "" for none */
    char dir[MG_TEST_PATH_MAX];
    char log[MG_TEST_PATH_MAX + 16];
    mg_test_proc_t proc;
    bool running;
    bool tls, auth_clients;
    char acl[256];                 /* "" for none */
    /* With TLS: PEM files in dir. */
    char ca[MG_TEST_PATH_MAX + 16], other_ca[MG_TEST_PATH_MAX + 16];
    char cert[MG_TEST_PATH_MAX + 16], key[MG_TEST_PATH_MAX + 16];
    char client_cert[MG_TEST_PATH_MAX + 16], client_key[MG_TEST_PATH_MAX + 16];
} mg_test_redis_t;

/* Returns 0, MG_EINVAL (no redis-server), or what starting it returned. */
int mg_test_redis_start(mg_test_redis_t *r, const char *password);
int mg_test_redis_start_tls(mg_test_redis_t *r, const char *password, bool auth_clients);
/* With an ACL user besides the default one (acl: a `user` line's rules, e.g.
   "moongate on >pw ~moongate:* +get"); redis-cli stays the default user. */
int mg_test_redis_start_acl(mg_test_redis_t *r, const char *acl);
int mg_test_redis_restart(mg_test_redis_t *r);
void mg_test_redis_stop(mg_test_redis_t *r);

/* Runs redis-cli -p PORT [-a PASSWORD] ARGS... (a NULL-terminated list) and writes its output
   (trailing newline removed) into out. Returns 0 or a negative code. */
int mg_test_redis_cmd(const mg_test_redis_t *r, char *out, size_t cap, ...);

/*
 * A hostile "Redis" on a raw socket of 127.0.0.1: it takes one connection, answers its set-up
 * (AUTH, SELECT, the SCRIPT LOADs and the PING) as Redis would, then answers the first operation with
 * answer (answer_len bytes, sent whole or until the client hangs up), and waits for the client
 * to hang up. Set answer and answer_len, then start; stop joins its thread.
 */
typedef struct mg_test_fake_redis {
    const char *answer;
    size_t answer_len;
    uint16_t port;
    int lfd;
    pthread_t thread;
} mg_test_fake_redis_t;

int mg_test_fake_redis_start(mg_test_fake_redis_t *f);
void mg_test_fake_redis_stop(mg_test_fake_redis_t *f);

#endif
