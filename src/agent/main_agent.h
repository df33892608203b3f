/*
 * moongate-agent, internal: the pieces of the agent program (src/main_agent*.c). Not part of the
 * core library.
 *
 * main_agent_tunnel.c keeps the WebSockets to the gateway (docs/tunnel.md) and bridges each one
 * to a fresh local SSH stream (its state in main_agent_tunnel.h); main_agent_nodes.c decides
 * which gateway addresses get WebSockets; main_agent_setup.c prepares a private sshd for --sshd-inetd;
 * main_agent_check.c checks --sshd-inetd at start; main_agent_probe.c says why a connection to
 * the gateway failed; main_agent_resolve.c looks up a --gateway name's addresses, its nodes.
 */
#ifndef MOONGATE_MAIN_AGENT_H
#define MOONGATE_MAIN_AGENT_H

#include "agent_addrs.h"
#include "agent_util.h"

#include <stdbool.h>
#include <uv.h>

typedef struct mg_agent mg_agent_t;

/*
 * Creates the agent on loop: a libwebsockets client context on that loop, signal handlers
 * (SIGTERM, SIGINT: close every WebSocket with 1000 and stop; a second one exits at once), and
 * the first connection attempt, started at once. args must outlive the agent. Returns 0, or
 * MG_ENOMEM / MG_ECONFIG (reason in err; nothing is left on the loop).
 */
int mg_agent_start(uv_loop_t *loop, const mg_agent_args_t *args, mg_agent_t **out,
                   char *err, size_t errlen);

/*
 * After uv_run(loop) has returned (the agent stopped, so every handle it owned is closed):
 * frees the agent and returns the process exit status (0, or 1 when --once ended without a
 * WebSocket ever opening).
 */
int mg_agent_free(mg_agent_t *a);

/* `moongate-agent setup ...`: argv are the arguments after "setup". Returns the exit status. */
int mg_agent_setup_main(int argc, char **argv);

/*
 * Finds out why a WebSocket to host:port did not open when libwebsockets said only fallback
 * (main_agent_probe.c): connection refused, unreachable, or a plain HTTP answer on a wss://
 * port. Calls done(arg, why) once, within about 2 s; why is fallback when nothing better was
 * found. Returns 0, or -1 (out of memory: done is not called).
 */
typedef struct mg_agent_probe mg_agent_probe_t;
typedef void (*mg_agent_probe_done_fn)(void *arg, const char *why);
int mg_agent_probe_start(uv_loop_t *loop, const char *host, int port, bool tls,
                         const char *fallback, mg_agent_probe_done_fn done, void *arg);

/*
 * Resolves host now and again whenever the caller asks (main_agent_resolve.c), never blocking
 * the loop. fn(arg, status, addrs, n) runs on the loop after each resolve: status 0 with the
 * answer as mg_agent_addrs_pick() leaves it (n >= 1), or a negative libuv code (UV_EAI_NONAME,
 * UV_EAI_AGAIN, ...) with n 0. No resolve follows unless mg_agent_resolver_next() asks for one.
 * Returns 0, or -1 (out of memory, or a host too long).
 */
typedef struct mg_agent_resolver mg_agent_resolver_t;
typedef void (*mg_agent_resolved_fn)(void *arg, int status, const mg_agent_addr_t *addrs,
                                     int n);
int mg_agent_resolver_start(uv_loop_t *loop, const char *host, mg_agent_resolved_fn fn,
                            void *arg, mg_agent_resolver_t **out);

/* The next resolve in delay_ms (replaces one already scheduled). */
void mg_agent_resolver_next(mg_agent_resolver_t *r, uint64_t delay_ms);

/* No more callbacks; r frees itself once its timer is closed and any resolve on the thread pool
   has returned (a system resolver stuck on DNS keeps the loop alive until its own timeout). */
void mg_agent_resolver_close(mg_agent_resolver_t *r);

/* Runs argv (a $PATH search for argv[0]) to its end, its output on stderr or, quiet, nowhere.
   Returns 0 when it exited 0, else MG_ECONFIG. Blocks: for start-up and setup only. */
int mg_agent_run(char *const argv[], bool quiet);

/* The first of the usual places that holds an executable sshd, or NULL. */
const char *mg_agent_find_sshd(void);

/*
 * Checks --sshd-inetd CMD before the first connection: "~/" expanded into expanded (what the
 * agent then runs), the program there, the -f config file readable, and for sshd a first
 * `sshd -t -f CONFIG`. Each problem is printed on stderr with what to do. Returns 0, or 2 (the
 * exit status for a bad argument).
 */
int mg_agent_check_inetd(const char *cmd, char *expanded, size_t cap);

#endif
