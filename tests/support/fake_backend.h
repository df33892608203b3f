/*
 * A fake mg_pool_backend_t for the unit tests of the pool and the modules on top of it.
 *
 * It records every open and close (in order, by index) and lets the test report a connection
 * ready, failed or closed, the way a real backend would from the loop. Knobs: open_rc makes the
 * next opens fail at once; close_sync makes close() report the connection closed before it
 * returns (a real backend may do either); named_servers reads each open_arg as the name of the
 * server it dials.
 *
 * Indexes stay valid for the whole test; a record's pc is only used while the pool still holds
 * it (not after it was reported failed, or closed with no lease left).
 */
#ifndef MG_TEST_FAKE_BACKEND_H
#define MG_TEST_FAKE_BACKEND_H

#include "moongate/error.h"
#include "moongate/pool.h"

#include <stdbool.h>
#include <stdio.h>
#include <string.h>

#define FAKE_MAX 256

typedef enum fake_state {
    FAKE_OPENING,
    FAKE_READY,
    FAKE_FAILED,  /* reported failed, or the open failed at once */
    FAKE_CLOSING, /* the pool called close; not yet reported closed */
    FAKE_CLOSED,
} fake_state_t;

typedef struct fake_conn {
    mg_pool_conn_t *pc;
    char user[MG_USER_ID_MAX + 1];
    void *open_arg;
    fake_state_t state;
    bool close_called;
    bool close_force;
    char close_reason[64];
} fake_conn_t;

typedef struct fake_backend {
    fake_conn_t conns[FAKE_MAX];
    int opens;        /* calls to open, failed ones included */
    int closes;       /* calls to close */
    int force_closes; /* of which with force */
    int trims;        /* calls to trim */
    int server_calls; /* calls to server: one per connection the pool tried to open */
    int server_calls_max; /* > 0: fail the test past this many (a pool retrying in a loop
                             would otherwise hang it inside one pass of the loop's timers) */
    int open_rc;      /* < 0: open fails at once with this code and open_err */
    const char *open_err;
    bool close_sync;  /* close reports closed before returning */
    bool named_servers; /* open_arg is the name of the server (a string) for the pool's
                           per-server handshake bound; otherwise no open names one */
} fake_backend_t;

int fake_index(const fake_backend_t *fb, const mg_pool_conn_t *pc);

int fake_open(void *ctx, mg_pool_conn_t *pc, const char *user, void *open_arg,
              char *err, size_t errlen);

void fake_close(void *ctx, mg_pool_conn_t *pc, bool force,
                const char *reason);

/* The backend's operations, for mg_pool_new() with a fake_backend_t as its context. */
extern const mg_pool_backend_t fake_backend_ops;

/* Reports connection i ready. */
void fake_ready(fake_backend_t *fb, int i);

/* Reports every connection still opening ready. Returns how many. */
int fake_ready_all(fake_backend_t *fb);

void fake_fail(fake_backend_t *fb, int i, int err, const char *msg);

void fake_closed(fake_backend_t *fb, int i);

/* Reports closed every connection the pool asked to close. Returns how many. */
int fake_finish_closing(fake_backend_t *fb);

/* How many of the open calls were for user. */
int fake_opens_for(const fake_backend_t *fb, const char *user);

/* ---- running the loop in tests ---- */

void fake_stop_cb(uv_timer_t *t);

/* Runs loop for about ms milliseconds of loop time, whatever else is active. */
void run_ms(uv_loop_t *loop, uint64_t ms);

/* One pass of the loop without waiting: runs the timers that are due (the pool's 0 ms ones). */
void tick(uv_loop_t *loop);

#endif
