/*
 * shutdown: the drain sequence for the pool.
 *
 * mg_shutdown_start() runs, without blocking the loop:
 *
 *   1. drain   the pool refuses new acquires (MG_ESHUTDOWN, "gateway is shutting down") and
 *              fails its waiting ones; in-flight requests keep their leases;
 *   2. wait    until every lease is released, at most grace_ms; if leases remain then, either
 *              close what remains with force (force_after_grace) or keep waiting;
 *   3. close   mg_pool_close_all() (without force once no lease is held): every SSH session
 *              gets its disconnect; then wait until the pool counts no connection;
 *   4. report  the completion callback gets an mg_shutdown_result_t.
 *
 * A hard deadline (hard_timeout_ms from the start) completes the sequence whatever remains, so
 * a backend that never reports a connection closed cannot hang the process; that counts as an
 * error. Stopping the front (no new HTTP requests, WebSockets closed with 1000) is the caller's
 * part; this module owns the pool's side.
 *
 * Like a libuv request, the caller owns the mg_shutdown_t and keeps it alive until the
 * callback, which runs after the module's timers are closed: from then on the caller may free
 * it, and the pool (which stays draining). Single-threaded, on the pool's loop.
 */
#ifndef MOONGATE_SHUTDOWN_H
#define MOONGATE_SHUTDOWN_H

#include "moongate/pool.h"
#include "moongate/settings.h"

#include <stdbool.h>
#include <stdint.h>
#include <uv.h>

typedef struct mg_shutdown mg_shutdown_t;

typedef struct mg_shutdown_opts {
    uint64_t grace_ms;        /* how long in-flight requests may take (SHUTDOWN_GRACE_PERIOD) */
    bool force_after_grace;   /* then force, else keep waiting (SHUTDOWN_FORCE_AFTER_GRACE) */
    uint64_t hard_timeout_ms; /* from the start, complete whatever remains; 0: grace_ms + 5000 */
    const char *reason;       /* for the backend's close; NULL: "gateway is shutting down" */
} mg_shutdown_opts_t;

typedef struct mg_shutdown_result {
    bool success;           /* all done within grace_ms, nothing forced: errors is 0 */
    bool forced;            /* connections were closed with force */
    uint64_t duration_ms;   /* loop time from start to completion */
    int connections_closed; /* connections that left the pool during the shutdown */
    int leases_left;        /* leases still held at completion (after force, or given up) */
    int connections_left;   /* connections still counted at completion (hard deadline) */
    int errors;
    char errors_text[512];  /* the errors, "; " between them; "" when none */
} mg_shutdown_result_t;

/* Called once, when the sequence is complete and the module's handles are closed. */
typedef void (*mg_shutdown_cb)(mg_shutdown_t *s, const mg_shutdown_result_t *result);

enum mg_shutdown_phase {
    MG_SHUTDOWN_IDLE = 0, /* a zeroed mg_shutdown_t */
    MG_SHUTDOWN_DRAINING,
    MG_SHUTDOWN_CLOSING,
    MG_SHUTDOWN_FINISHING, /* complete; closing the timers before the callback */
    MG_SHUTDOWN_DONE,
};

struct mg_shutdown {
    /* public */
    void *data;
    /* read-only: the outcome, once the callback ran */
    mg_shutdown_result_t result;
    /* private */
    enum mg_shutdown_phase phase;
    uv_loop_t *loop;
    mg_pool_t *pool;
    mg_shutdown_opts_t opts;
    mg_shutdown_cb cb;
    uv_timer_t step, grace, hard;
    int open_handles;
    uint64_t started;  /* loop time */
    uint64_t since_ms; /* wall clock */
};

typedef struct mg_shutdown_stats {
    bool shutting_down; /* started and not complete */
    bool done;          /* the callback ran */
    uint64_t since_ms;  /* wall clock (ms since the epoch) at the start; 0 before */
    const char *phase;  /* "idle", "draining", "closing", "finishing" or "done" */
} mg_shutdown_stats_t;

/* Fills *o from settings (grace, force after grace); hard timeout and reason default. */
void mg_shutdown_opts_init(mg_shutdown_opts_t *o, const mg_settings_t *settings);

/*
 * Starts the sequence for pool on loop; *o is copied (reason must outlive the sequence).
 * s must be zeroed, or one whose callback has run. Returns 0, MG_EINVAL (a NULL argument),
 * or MG_ESTATE if s is running.
 */
int mg_shutdown_start(mg_shutdown_t *s, uv_loop_t *loop, mg_pool_t *pool,
                      const mg_shutdown_opts_t *o, mg_shutdown_cb cb);

/* s must have been zeroed or started. */
void mg_shutdown_stats(const mg_shutdown_t *s, mg_shutdown_stats_t *out);

#endif
