/*
 * cleanup: a timer that closes a pool's stale connections.
 *
 * Every interval_ms it calls mg_pool_cleanup_stale(pool, max_idle_ms), which closes connections
 * that hold no lease and have been idle longer than min(max_idle_ms, the user's idle_timeout_ms),
 * and unhealthy ones. mg_cleanup_trigger() runs one pass now. The defaults come from the settings:
 * CLEANUP_INTERVAL (30 s) and MAX_IDLE_TIME (300 s).
 *
 * The service keeps counts (mg_cleanup_stats()); last_run_ms is wall-clock time (milliseconds
 * since the Unix epoch), so it can be shown to a person as is.
 *
 * Single-threaded, on the pool's loop. mg_cleanup_free() closes the timer; the memory goes in its
 * close callback, so run the loop afterwards. Free the service before the pool.
 */
#ifndef MOONGATE_CLEANUP_H
#define MOONGATE_CLEANUP_H

#include "moongate/pool.h"
#include "moongate/settings.h"

#include <stdbool.h>
#include <stdint.h>
#include <uv.h>

typedef struct mg_cleanup mg_cleanup_t;

typedef struct mg_cleanup_stats {
    bool running;           /* started and not stopped */
    uint64_t interval_ms;
    uint64_t max_idle_ms;
    uint64_t runs;          /* passes so far, periodic and triggered */
    uint64_t total_cleaned; /* connections closed by all passes */
    int last_cleaned;       /* connections closed by the last pass */
    uint64_t last_run_ms;   /* wall clock (ms since the epoch) of the last pass; 0 if none */
} mg_cleanup_stats_t;

/*
 * Creates a stopped service for pool on loop with interval and idle time from settings
 * (cleanup_interval_ms, max_idle_ms). Returns 0, MG_EINVAL or MG_ENOMEM.
 */
int mg_cleanup_new(uv_loop_t *loop, mg_pool_t *pool, const mg_settings_t *settings,
                   mg_cleanup_t **out);

/*
 * Changes the interval and the idle time; a running service restarts its timer with the new
 * interval. Returns 0, or MG_EINVAL if either is 0.
 */
int mg_cleanup_configure(mg_cleanup_t *c, uint64_t interval_ms, uint64_t max_idle_ms);

/* Starts the periodic passes (the first one interval_ms from now). Starting twice is a no-op. */
void mg_cleanup_start(mg_cleanup_t *c);

/* Stops the periodic passes; a no-op when stopped. */
void mg_cleanup_stop(mg_cleanup_t *c);

/* Runs one pass now, counted in the stats like a periodic one. Returns how many it closed. */
int mg_cleanup_trigger(mg_cleanup_t *c);

void mg_cleanup_stats(const mg_cleanup_t *c, mg_cleanup_stats_t *out);

/* Stops the service and frees it once the loop has run its close callback. NULL is a no-op. */
void mg_cleanup_free(mg_cleanup_t *c);

#endif
