/*
 * A fake mg_pool_backend_t for the unit tests of the pool and the modules on top of it.
 *
 * It records every open and close (in order, by index) and lets the test report a connection
 * ready, failed or closed, the way a real backend would from the loop. Knobs: open_rc makes the
 * next opens fail at once; close_sync makes close() report the connection closed before it
 * returns (a real backend may do either).
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
    int open_rc;      /* < 0: open fails at once with this code and open_err */
    const char *open_err;
    bool close_sync;  /* close reports closed before returning */
} fake_backend_t;

static inline int fake_index(const fake_backend_t *fb, const mg_pool_conn_t *pc)
{
    for (int i = 0; i < fb->opens; i++) {
        if (fb->conns[i].pc == pc && fb->conns[i].state != FAKE_FAILED &&
            fb->conns[i].state != FAKE_CLOSED)
            return i;
    }
    return -1;
}

static inline int fake_open(void *ctx, mg_pool_conn_t *pc, const char *user, void *open_arg,
                            char *err, size_t errlen)
{
    fake_backend_t *fb = ctx;
    if (fb->opens >= FAKE_MAX) {
        snprintf(err, errlen, "fake backend: too many opens");
        return MG_ENOMEM;
    }
    fake_conn_t *fc = &fb->conns[fb->opens++];
    memset(fc, 0, sizeof(*fc));
    fc->pc = pc;
    snprintf(fc->user, sizeof(fc->user), "%s", user);
    fc->open_arg = open_arg;
    if (fb->open_rc < 0) {
        fc->state = FAKE_FAILED;
        snprintf(err, errlen, "%s", fb->open_err != NULL ? fb->open_err : "");
        return fb->open_rc;
    }
    fc->state = FAKE_OPENING;
    return 0;
}

static inline void fake_close(void *ctx, mg_pool_conn_t *pc, bool force,
                              const char *reason)
{
    fake_backend_t *fb = ctx;
    int i = fake_index(fb, pc);
    fb->closes++;
    if (force)
        fb->force_closes++;
    if (i < 0)
        return; /* the pool closed something it does not hold: the test will see counts */
    fake_conn_t *fc = &fb->conns[i];
    fc->close_called = true;
    fc->close_force = force;
    snprintf(fc->close_reason, sizeof(fc->close_reason), "%s", reason != NULL ? reason : "");
    fc->state = FAKE_CLOSING;
    if (fb->close_sync) {
        fc->state = FAKE_CLOSED;
        mg_pool_conn_closed(pc, 0, NULL);
    }
}

static const mg_pool_backend_t fake_backend_ops __attribute__((unused)) = {
    .open = fake_open,
    .close = fake_close,
};

static inline void fake_ready(fake_backend_t *fb, int i)
{
    fb->conns[i].state = FAKE_READY;
    mg_pool_conn_ready(fb->conns[i].pc);
}

/* Reports every connection still opening ready. Returns how many. */
static inline int fake_ready_all(fake_backend_t *fb)
{
    int n = 0;
    for (int i = 0; i < fb->opens; i++) {
        if (fb->conns[i].state == FAKE_OPENING) {
            fake_ready(fb, i);
            n++;
        }
    }
    return n;
}

static inline void fake_fail(fake_backend_t *fb, int i, int err, const char *msg)
{
    fb->conns[i].state = FAKE_FAILED;
    mg_pool_conn_failed(fb->conns[i].pc, err, msg);
}

static inline void fake_closed(fake_backend_t *fb, int i)
{
    fb->conns[i].state = FAKE_CLOSED;
    mg_pool_conn_closed(fb->conns[i].pc, MG_ECLOSED, "connection lost");
}

/* Reports closed every connection the pool asked to close. Returns how many. */
static inline int fake_finish_closing(fake_backend_t *fb)
{
    int n = 0;
    for (int i = 0; i < fb->opens; i++) {
        if (fb->conns[i].state == FAKE_CLOSING) {
            fb->conns[i].state = FAKE_CLOSED;
            mg_pool_conn_closed(fb->conns[i].pc, 0, NULL);
            n++;
        }
    }
    return n;
}

/* How many of the open calls were for user. */
static inline int fake_opens_for(const fake_backend_t *fb, const char *user)
{
    int n = 0;
    for (int i = 0; i < fb->opens; i++)
        n += strcmp(fb->conns[i].user, user) == 0;
    return n;
}

/* ---- running the loop in tests ---- */

static inline void fake_stop_cb(uv_timer_t *t)
{
    uv_stop(t->loop);
}

/* Runs loop for about ms milliseconds of loop time, whatever else is active. */
static inline void run_ms(uv_loop_t *loop, uint64_t ms)
{
    uv_timer_t t;
    uv_timer_init(loop, &t);
    uv_timer_start(&t, fake_stop_cb, ms, 0);
    uv_run(loop, UV_RUN_DEFAULT);
    uv_close((uv_handle_t *)&t, NULL);
    uv_run(loop, UV_RUN_NOWAIT); /* the close callback, so t may go out of scope */
}

/* One pass of the loop without waiting: runs the timers that are due (the pool's 0 ms ones). */
static inline void tick(uv_loop_t *loop)
{
    uv_run(loop, UV_RUN_NOWAIT);
}

#endif
