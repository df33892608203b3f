/*
 * Shared pieces of the end-to-end tests of the moongate program: start it as a child process
 * with a test policy (pointed at a real sshd and mg-upstream), learn its port from its log, talk
 * to it over plain blocking sockets with deadlines, and stop it, failing the test if it did not
 * exit 0 or if its log holds a sanitizer report.
 *
 * The gateway listens on 127.0.0.1:0 and says where in its log ("listening on
 * http://127.0.0.1:PORT"), so no other process can take the port in between.
 */
#ifndef MG_GWTEST_H
#define MG_GWTEST_H

#include "http_client.h"
#include "proc.h"
#include "sshd.h"
#include "upstream.h"

#include "moongate/error.h"

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <cmocka.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

extern char **environ;

/* One moongate process. Fields are read-only for tests. */
typedef struct gw {
    mg_test_proc_t proc;
    uint16_t port;
    char dir[MG_TEST_PATH_MAX];
    char policy[MG_TEST_PATH_MAX];
    char log[MG_TEST_PATH_MAX];     /* its stderr: the log, and any sanitizer report */
    char out[MG_TEST_PATH_MAX];     /* its stdout */
    uint64_t ok_responses;      /* 2xx responses seen by gw_request() */
    bool running;
    unsigned nofile;            /* set before gw_launch(): its `ulimit -n` (0: the test's) */
    const char *program;        /* set before gw_launch(): the moongate to run (NULL: gw_binary) */
    const char *const *exec_prefix; /* set before gw_launch(): words run before the program
                                       (ending in one that execs "$@"), or NULL */
    const char *ip;             /* set before gw_launch(): the loopback address its listen
                                   names, which gw_request() then dials (NULL: 127.0.0.1) */
} gw_t;

/* ---- files ---- */

/* The fields of a route to upstream_port on the test's sshd, as a Lua table's body. */
void gw_route_fields(char *out, size_t cap, const mg_test_sshd_t *sshd,
                     uint16_t upstream_port);

/* Writes the test policy: alice is served, limited gets 429 with retry-after: 7. */
void gw_write_policy(const char *path, const mg_test_sshd_t *sshd,
                     uint16_t upstream_port);

/* Occurrences of needle in the gateway's log. */
int gw_log_count(const gw_t *g, const char *needle);

/* Waits up to timeout_ms until needle occurs at least count times in the log. */
bool gw_wait_log(const gw_t *g, const char *needle, int count, int timeout_ms);

/* Prints the last lines of the gateway's log (for a failure's context). */
void gw_print_log_tail(const gw_t *g, int lines);

/* ---- the process ---- */



/* The program name (moongate, moongate-agent) in $MG_BINARY_DIR, else in the build tree, into
   out; returns out. gw_binary() is gw_program(out, cap, "moongate"). */
const char *gw_program(char *out, size_t cap, const char *name);
const char *gw_binary(char *out, size_t cap);

/*
 * Fills envp (cap entries) with the inherited environment, minus the names extra_env sets, plus
 * extra_env (NULL or a NULL-terminated list of "NAME=value"), NULL-terminated.
 */
void gw_env_merge(char **envp, size_t cap, const char *const *extra_env);

/*
 * Starts moongate on g->policy (already written, in g->dir) listening on listen ("127.0.0.1:0"
 * or a fixed "127.0.0.1:PORT"), and returns once it accepts connections; g->port is the port its
 * log names.
 */
void gw_launch(gw_t *g, const char *listen, const char *const *extra_env);

/* Makes g's private dir and names its files. */
void gw_prepare(gw_t *g);

/*
 * Starts moongate with the test policy for sshd and upstream_port. extra_env: NULL or a
 * NULL-terminated list of "NAME=value" that override the inherited environment.
 */
void gw_start(gw_t *g, const mg_test_sshd_t *sshd, uint16_t upstream_port,
              const char *const *extra_env);

/*
 * Starts moongate with policy_text as its policy, on 127.0.0.1:port (0: a port it picks and
 * logs). extra_env as for gw_start().
 */
void gw_start_policy(gw_t *g, const char *policy_text, uint16_t port,
                     const char *const *extra_env);

/* Fails the test if the log holds a sanitizer report. */
void gw_assert_log_clean(const gw_t *g);

void gw_assert_alive(gw_t *g);

/*
 * Waits up to timeout_ms for the process to exit after a signal the caller sent; fails unless
 * it exited 0 with a clean log.
 */
void gw_assert_exits_cleanly(gw_t *g, int timeout_ms);

/* SIGTERM, then the same checks as gw_assert_exits_cleanly(). */
void gw_stop(gw_t *g);

/* Without checks, for teardown after a failure. */
void gw_kill(gw_t *g);

/* ---- sockets ---- */

/* Waits until fd is ready for ev or deadline (mg_test_now_ms) passes. 0 or MG_ETIMEDOUT. */
int gw_poll(int fd, short ev, double deadline);

/* A non-blocking socket connected to 127.0.0.1:port, or a negative code. */
int gw_connect(uint16_t port, int timeout_ms);

/* The same to ip:port (an IPv4 address such as "127.0.0.2"). */
int gw_connect_ip(const char *ip, uint16_t port, int timeout_ms);

/* Moments (mg_test_now_ms) at which reads delivered body bytes. */
typedef struct gw_arrivals {
    double t[1024];
    int n;
} gw_arrivals_t;

/*
 * Full duplex on one connection: sends request (all of it, while reading) and feeds what comes
 * back into r until the response is complete, the peer closes, or timeout_ms passes. arr (may
 * be NULL) records when body bytes arrived. Thread-safe. Returns 0, MG_ECONNECT, MG_ETIMEDOUT,
 * MG_ECLOSED (cut short) or MG_EINVAL (a malformed response).
 */

int gw_exchange(uint16_t port, const char *request, size_t len,
                mg_test_http_response_t *r, int timeout_ms, gw_arrivals_t *arr);

/*
 * gw_exchange() on a socket the caller connected with gw_connect() (for instance to send many
 * requests at one moment); closes fd.
 */
int gw_exchange_fd(int fd, const char *request, size_t len,
                   mg_test_http_response_t *r, int timeout_ms, gw_arrivals_t *arr);

/* ---- requests to a gateway ---- */

#define GW_AUTH_ALICE "Authorization: Bearer alice-token\r\n"

/*
 * One request to g with a kept body (r is initialized here; the caller frees it). Counts 2xx
 * responses in g->ok_responses. Returns what gw_exchange() returns.
 */
int gw_request(gw_t *g, const char *method, const char *path, const char *headers,
               const void *body, size_t body_len, mg_test_http_response_t *r,
               int timeout_ms);

/* Fails, with the response and the log's tail, unless the exchange gave status. */
void gw_expect_status(const gw_t *g, int rc, const mg_test_http_response_t *r,
                      int status, const char *what);

/* GET /healthz; returns the status, or a negative code. */
int gw_healthz(const gw_t *g, int timeout_ms);

/* The value of a sample in g's /metrics ("name" or "name{label=\"value\"}"), or -1. */
double gw_metric(gw_t *g, const char *sample);

/* ---- a minimal JSON checker ---- */

typedef struct gw_json {
    const char *p, *end;
    int depth;
} gw_json_t;

void gw_json_ws(gw_json_t *j);

bool gw_json_lit(gw_json_t *j, const char *lit);

bool gw_json_string(gw_json_t *j);


bool gw_json_number(gw_json_t *j);

bool gw_json_value(gw_json_t *j);

/* True if text is one JSON value (and nothing else but blanks). */
bool gw_json_valid(const char *text, size_t len);

/* The string value of "key":"..." (no escapes) into out; false if absent. */
bool gw_json_get_string(const char *text, const char *key, char *out, size_t cap);

/*
 * Writes dir/known_hosts naming sshd's host key for host (a route's host, such as the name an
 * agent's machine goes by), and its path into out. Returns 0, or -1.
 */
int gw_write_known_hosts(const mg_test_sshd_t *sshd, const char *host,
                         const char *dir, char *out, size_t cap);

/* ---- moongate-agent ---- */

/*
 * Runs argv to its end (timeout_ms at most, then killed) with its stdout and stderr together in
 * dir/run.out, from cwd (NULL: the test's) with envp (NULL: the test's). *out, when out is not
 * NULL, gets that output (free it). Returns the exit status, or -1 if it did not finish.
 */
int gw_run(char *const argv[], const char *dir, const char *cwd, char *const *envp,
           int timeout_ms, char **out);

/* gw_run() of `sh -c script`, from /. */
int gw_sh(const char *dir, const char *script, int timeout_ms, char **out);

/* Occurrences of needle in the file at path (0 if it cannot be read). */
int gw_file_count(const char *path, const char *needle);

/* Prints the last lines of the file at path, titled with it. */
void gw_print_file_tail(const char *path, int lines);

/* One moongate-agent process. Fields are read-only for tests. */
typedef struct gw_agent {
    mg_test_proc_t proc;
    char dir[MG_TEST_PATH_MAX];
    char log[MG_TEST_PATH_MAX];     /* its stderr: the log, and any sanitizer report */
    char out[MG_TEST_PATH_MAX];     /* its stdout */
    bool running;
} gw_agent_t;

/*
 * Starts `moongate-agent --gateway ws://127.0.0.1:GW_PORT/tunnel ARGS...` with MOONGATE_TOKEN
 * set to token. args: a NULL-terminated list, e.g. {"--ssh", "127.0.0.1:2222", NULL} or
 * {"--sshd-inetd", "/usr/sbin/sshd -i -e -f CONFIG", NULL}. Returns at once: the agent connects
 * in the background (gw_agent_wait_log() on "connected: websocket" to wait for it).
 */
/* Starts moongate-agent against url (ws:// or wss://) with the token in MOONGATE_TOKEN. */

void gw_agent_start(gw_agent_t *a, uint16_t gw_port, const char *token,
                    const char *const *args);

void gw_agent_start_url(gw_agent_t *a, const char *url, const char *token,
                        const char *const *args);

/* The same, run through prefix (words before the program, ending in one that execs "$@", as
   `unshare -m -- sh -c '...; exec "$@"' sh`), or NULL. */
void gw_agent_start_prefixed(gw_agent_t *a, const char *const *prefix, const char *url,
                             const char *token, const char *const *args);

int gw_agent_log_count(const gw_agent_t *a, const char *needle);

/* Waits up to timeout_ms until needle occurs at least count times in the agent's log. */
bool gw_agent_wait_log(const gw_agent_t *a, const char *needle, int count,
                       int timeout_ms);

/* Fails the test if the agent's log holds a sanitizer report. */
void gw_agent_assert_log_clean(const gw_agent_t *a);

/* SIGTERM; fails unless the agent exits 0 within 5 s with a clean log. */
void gw_agent_stop(gw_agent_t *a);

/* SIGKILL and reap, without checks: an agent that died, or teardown after a failure. */
void gw_agent_kill(gw_agent_t *a);

#endif
