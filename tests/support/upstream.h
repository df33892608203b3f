/*
 * upstream: run mg-upstream (tests/support/main_upstream.c) for a test.
 *
 * mg_test_upstream_start() spawns the mg-upstream program on a free 127.0.0.1 port (it binds port
 * 0 itself and reports the port through a file, so no other process can steal it in between) and
 * returns once it listens. The program is found, in order: $MG_UPSTREAM (a path), then
 * $MG_BINARY_DIR/tests/mg-upstream (ctest sets MG_BINARY_DIR), then mg-upstream beside the running
 * test program (/proc/self/exe: tests and helpers are built into the same dir).
 *
 * mg_test_upstream_stats() reads its GET /stats counters, for tests that check what the upstream
 * saw (for instance that a client went away mid-stream).
 *
 * Functions return 0 or a negative MG_E* code (moongate/error.h) or a negated errno.
 */
#ifndef MG_TEST_UPSTREAM_H
#define MG_TEST_UPSTREAM_H

#include "proc.h"

#include <stdint.h>

/* A running mg-upstream. Every field is read-only for the caller. */
typedef struct mg_test_upstream {
    uint16_t port;                 /* it listens on 127.0.0.1:port */
    pid_t pid;                     /* 0 once stopped */
    char dir[MG_TEST_PATH_MAX];    /* a temp dir with its port file and log */
    char log[MG_TEST_PATH_MAX];    /* its stdout and stderr */
    char capture[MG_TEST_PATH_MAX]; /* with capture: the dir of its N.raw files, else "" */
    mg_test_proc_t proc;           /* private */
} mg_test_upstream_t;

/* GET /stats of mg-upstream. */
typedef struct mg_test_upstream_stats {
    uint64_t connections_accepted;
    uint64_t connections_closed;
    uint64_t connections_open;
    uint64_t requests_served;      /* responses fully queued (the /stats request itself excluded) */
    uint64_t aborted_responses;    /* peers that closed while a response was being sent */
} mg_test_upstream_stats_t;

/* Finds the mg-upstream binary (see above) into out. Returns 0, or MG_ECONFIG if not found. */
int mg_test_upstream_binary(char *out, size_t cap);

/*
 * Starts mg-upstream and waits (up to 5 s) until it listens.
 * Returns 0, MG_ECONFIG (no binary), MG_ETIMEDOUT, MG_ECLOSED (it exited; its log is printed),
 * or a spawn error.
 */
int mg_test_upstream_start(mg_test_upstream_t *u);

/*
 * As mg_test_upstream_start(), with --capture: every byte each connection receives is kept,
 * for mg_test_upstream_captured().
 */
int mg_test_upstream_start_capture(mg_test_upstream_t *u);

/*
 * Everything the upstream received so far, connection by connection in the order they were
 * accepted, into a malloc'd NUL-terminated buffer (*out, *len). Returns 0 or an error.
 */
int mg_test_upstream_captured(const mg_test_upstream_t *u, char **out, size_t *len);

/* Forgets what was captured (the next mg_test_upstream_captured() sees only newer bytes). */
int mg_test_upstream_capture_clear(const mg_test_upstream_t *u);

/*
 * Stops it (SIGTERM, up to 5 s, then SIGKILL) and removes its dir; if it did not exit with 0 (a
 * sanitizer report, a crash), prints its log to stderr first. Safe to call twice. Returns 0.
 */
int mg_test_upstream_stop(mg_test_upstream_t *u);

/* Fetches and parses GET /stats (up to 2 s). Returns 0, MG_EINVAL or an error of the fetch. */
int mg_test_upstream_stats(const mg_test_upstream_t *u, mg_test_upstream_stats_t *st);

#endif
