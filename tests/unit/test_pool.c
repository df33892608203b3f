/*
 * Unit tests for src/pool/pool.c: a real uv loop, short timeouts, and the fake backend of
 * fake_backend.h in place of SSH.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "fake_backend.h"

#include "moongate/error.h"
#include "moongate/log.h"
#include "moongate/pool.h"
#include "moongate/settings.h"

#include <stdlib.h>
#include <string.h>

#define USER "alice"
#define LIMIT3 "Connection limit exceeded. Maximum 3 concurrent connections allowed."

typedef struct fixture {
    uv_loop_t loop;
    mg_settings_t settings;
    fake_backend_t fb;
    mg_pool_t *pool;
    uint64_t now; /* the pool's clock, ms: moved by advance(), never by waiting */
} fixture_t;

/* One acquire and what its callback saw. */
typedef struct waiter {
    mg_pool_acquire_t req;
    int rc;    /* what mg_pool_acquire returned */
    int calls; /* callback calls */
    int status;
    mg_pool_conn_t *conn;
    char error[256];
    /* optional behaviour inside the callback */
    struct waiter *cancel_other;
    fixture_t *release_in_cb;
} waiter_t;

static void on_acquire(mg_pool_acquire_t *req, int status)
{
    waiter_t *w = req->data;
    w->calls++;
    w->status = status;
    w->conn = req->conn;
    snprintf(w->error, sizeof(w->error), "%s", req->error);
    if (w->cancel_other != NULL)
        mg_pool_acquire_cancel(&w->cancel_other->req);
    if (w->release_in_cb != NULL && status == 0) {
        mg_pool_release(w->release_in_cb->pool, req->conn);
        w->conn = NULL;
    }
}

/* One acquire whose open_arg is server (which the fake backend reads as the server's name when
   named_servers is set). */
static int acq_to(fixture_t *f, waiter_t *w, const char *user, const char *server)
{
    memset(w, 0, sizeof(*w));
    w->req.data = w;
    w->rc = mg_pool_acquire(f->pool, &w->req, user, (void *)server, on_acquire);
    if (w->rc == 0)
        w->conn = w->req.conn;
    return w->rc;
}

static int acq(fixture_t *f, waiter_t *w, const char *user)
{
    return acq_to(f, w, user, NULL);
}

/* The lease a waiter holds, whether it got it at once or through its callback. */
static mg_pool_conn_t *lease_of(const waiter_t *w)
{
    return w->conn;
}

static void release(fixture_t *f, waiter_t *w)
{
    assert_non_null(w->conn);
    mg_pool_release(f->pool, w->conn);
    w->conn = NULL;
}

static fixture_t *fixture_new(void)
{
    fixture_t *f = calloc(1, sizeof(*f));
    assert_non_null(f);
    assert_int_equal(uv_loop_init(&f->loop), 0);
    mg_settings_init(&f->settings);
    f->settings.queue_timeout_ms = 200;
    f->now = 1000000;
    return f;
}

static uint64_t fixture_clock(void *ctx)
{
    return ((fixture_t *)ctx)->now;
}

static void fixture_pool(fixture_t *f)
{
    assert_int_equal(mg_pool_new(&f->loop, &f->settings, &fake_backend_ops, &f->fb, &f->pool), 0);
    mg_pool_set_clock(f->pool, fixture_clock, f);
}

/* Moves the pool's clock by ms and lets what fell due run: deadlines, backoff, timeouts. */
static void advance(fixture_t *f, uint64_t ms)
{
    f->now += ms;
    mg_pool_clock_moved(f->pool);
    for (int i = 0; i < 3; i++)
        tick(&f->loop);
}

static int setup(void **state)
{
    fixture_t *f = fixture_new();
    fixture_pool(f);
    *state = f;
    return 0;
}

/* Every test must have released its leases and left no waiter; this closes the rest. */
static int teardown(void **state)
{
    fixture_t *f = *state;
    mg_pool_stats_t st;

    fake_finish_closing(&f->fb);
    f->fb.close_sync = true;
    mg_pool_close_all(f->pool, true, "teardown");
    mg_pool_stats(f->pool, &st);
    assert_int_equal(st.total_connections, 0);
    assert_int_equal(st.leases, 0);
    assert_int_equal(st.waiters, 0);
    mg_pool_free(f->pool);
    uv_run(&f->loop, UV_RUN_DEFAULT);
    assert_int_equal(uv_loop_close(&f->loop), 0);
    free(f);
    return 0;
}

static void set_limits(fixture_t *f, int conns, int chans, int queue_max)
{
    mg_pool_free(f->pool);
    f->settings.max_connections_per_user = conns;
    f->settings.max_channels = chans;
    f->settings.queue_max = queue_max;
    fixture_pool(f);
}

/* ---- tests ---- */

static void test_new_rejects_bad_arguments(void **state)
{
    fixture_t *f = *state;
    mg_pool_t *p = NULL;
    mg_pool_backend_t no_close = { .open = fake_open };
    assert_int_equal(mg_pool_new(NULL, &f->settings, &fake_backend_ops, &f->fb, &p), MG_EINVAL);
    assert_int_equal(mg_pool_new(&f->loop, &f->settings, &no_close, &f->fb, &p), MG_EINVAL);
    mg_settings_t bad = f->settings;
    bad.max_channels = 0;
    assert_int_equal(mg_pool_new(&f->loop, &bad, &fake_backend_ops, &f->fb, &p), MG_EINVAL);
    assert_null(p);
}

static void test_user_id_valid(void **state)
{
    (void)state;
    char longest[MG_USER_ID_MAX + 2];
    memset(longest, 'a', sizeof(longest));
    longest[MG_USER_ID_MAX] = '\0';

    assert_true(mg_pool_user_id_valid("alice"));
    assert_true(mg_pool_user_id_valid("a.b_c-d@e+f:9"));
    assert_true(mg_pool_user_id_valid(longest));
    longest[MG_USER_ID_MAX] = 'a';
    longest[MG_USER_ID_MAX + 1] = '\0';
    assert_false(mg_pool_user_id_valid(longest));
    assert_false(mg_pool_user_id_valid(NULL));
    assert_false(mg_pool_user_id_valid(""));
    assert_false(mg_pool_user_id_valid("a b"));
    assert_false(mg_pool_user_id_valid("../etc"));
    assert_false(mg_pool_user_id_valid("alice\n"));
    assert_false(mg_pool_user_id_valid("al*ce"));
}

static void test_invalid_user_rejected(void **state)
{
    fixture_t *f = *state;
    waiter_t w;
    mg_pool_user_stats_t us;

    assert_int_equal(acq(f, &w, "bob smith"), MG_EINVAL);
    assert_int_equal(w.req.status, MG_EINVAL);
    assert_string_equal(w.req.error, "invalid user id");
    assert_int_equal(acq(f, &w, ""), MG_EINVAL);
    assert_int_equal(acq(f, &w, NULL), MG_EINVAL);
    assert_int_equal(f->fb.opens, 0);
    assert_int_equal(mg_pool_user_stats(f->pool, "bob smith", &us), MG_EINVAL);
    assert_int_equal(mg_pool_user_stats(f->pool, "nobody", &us), MG_EINVAL);
    assert_int_equal(us.connections, 0);
    assert_int_equal(mg_pool_close_user(f->pool, "bob smith", true, "x"), 0);
}

static void test_first_acquire_opens_then_completes(void **state)
{
    fixture_t *f = *state;
    waiter_t w;
    mg_pool_user_stats_t us;
    int arg = 42;

    memset(&w, 0, sizeof(w));
    w.req.data = &w;
    assert_int_equal(mg_pool_acquire(f->pool, &w.req, USER, &arg, on_acquire), MG_EAGAIN);
    assert_int_equal(f->fb.opens, 1);
    assert_string_equal(f->fb.conns[0].user, USER);
    assert_ptr_equal(f->fb.conns[0].open_arg, &arg);
    assert_int_equal(mg_pool_user_stats(f->pool, USER, &us), 0);
    assert_int_equal(us.connections, 1);
    assert_int_equal(us.opening, 1);
    assert_int_equal(us.waiters, 1);

    tick(&f->loop);
    assert_int_equal(w.calls, 0); /* nothing to hand out yet */

    fake_ready(&f->fb, 0);
    assert_int_equal(w.calls, 0); /* never inside the backend's call */
    tick(&f->loop);
    assert_int_equal(w.calls, 1);
    assert_int_equal(w.status, 0);
    assert_ptr_equal(w.conn, f->fb.conns[0].pc);
    assert_string_equal(mg_pool_conn_user(w.conn), USER);
    assert_int_equal(mg_pool_conn_leases(w.conn), 1);
    assert_true(mg_pool_conn_healthy(w.conn));
    assert_int_equal(mg_pool_conn_id(w.conn), 1);
    assert_int_equal(mg_pool_user_stats(f->pool, USER, &us), 0);
    assert_int_equal(us.opening, 0);
    assert_int_equal(us.leases, 1);
    assert_int_equal(us.waiters, 0);
    release(f, &w);
    assert_int_equal(mg_pool_conn_leases(f->fb.conns[0].pc), 0);
}

static void test_reuse_same_connection(void **state)
{
    fixture_t *f = *state;
    waiter_t a, b;

    assert_int_equal(acq(f, &a, USER), MG_EAGAIN);
    fake_ready(&f->fb, 0);
    tick(&f->loop);
    assert_int_equal(a.status, 0);
    mg_pool_conn_t *first = lease_of(&a);
    release(f, &a);

    assert_int_equal(acq(f, &b, USER), 0);
    assert_ptr_equal(lease_of(&b), first);
    assert_int_equal(b.calls, 0);
    assert_int_equal(f->fb.opens, 1);

    /* A second concurrent lease shares the connection too (max_channels 10). */
    assert_int_equal(acq(f, &a, USER), 0);
    assert_ptr_equal(lease_of(&a), first);
    assert_int_equal(mg_pool_conn_leases(first), 2);
    assert_int_equal(f->fb.opens, 1);
    release(f, &a);
    release(f, &b);
}

static void test_least_loaded_chosen(void **state)
{
    fixture_t *f = *state;
    waiter_t w[12];
    set_limits(f, 3, 10, 100);

    /* 12 requests need two connections. */
    for (int i = 0; i < 12; i++)
        assert_int_equal(acq(f, &w[i], USER), MG_EAGAIN);
    assert_int_equal(f->fb.opens, 2);
    assert_int_equal(fake_ready_all(&f->fb), 2);
    tick(&f->loop);
    mg_pool_conn_t *c0 = f->fb.conns[0].pc, *c1 = f->fb.conns[1].pc;
    for (int i = 0; i < 12; i++)
        assert_int_equal(w[i].status, 0);
    assert_int_equal(mg_pool_conn_leases(c0) + mg_pool_conn_leases(c1), 12);
    assert_int_equal(mg_pool_conn_leases(c0), 6); /* spread, not packed */

    /* Free three slots on c1: the next two acquires must both land there. */
    int freed = 0;
    for (int i = 0; i < 12 && freed < 3; i++) {
        if (w[i].conn == c1) {
            release(f, &w[i]);
            freed++;
        }
    }
    waiter_t x, y;
    assert_int_equal(acq(f, &x, USER), 0);
    assert_ptr_equal(lease_of(&x), c1);
    assert_int_equal(acq(f, &y, USER), 0);
    assert_ptr_equal(lease_of(&y), c1);
    assert_int_equal(f->fb.opens, 2);
    release(f, &x);
    release(f, &y);
    for (int i = 0; i < 12; i++) {
        if (w[i].conn != NULL)
            release(f, &w[i]);
    }
}

static void test_queue_full_exact_message(void **state)
{
    fixture_t *f = *state;
    waiter_t w[6];
    set_limits(f, 3, 1, 2);

    for (int i = 0; i < 3; i++)
        assert_int_equal(acq(f, &w[i], USER), MG_EAGAIN);
    assert_int_equal(f->fb.opens, 3);
    /* At the limit: two may wait beyond what the opening connections will carry. */
    assert_int_equal(acq(f, &w[3], USER), MG_EAGAIN);
    assert_int_equal(acq(f, &w[4], USER), MG_EAGAIN);
    assert_int_equal(acq(f, &w[5], USER), MG_EQUEUEFULL);
    assert_string_equal(w[5].req.error, LIMIT3);
    assert_int_equal(w[5].req.status, MG_EQUEUEFULL);
    assert_int_equal(f->fb.opens, 3);

    fake_ready_all(&f->fb);
    tick(&f->loop);
    for (int i = 0; i < 3; i++)
        assert_int_equal(w[i].status, 0);
    assert_int_equal(w[3].calls, 0);
    assert_int_equal(w[4].calls, 0);

    /* Every channel busy, queue at queue_max: still full. */
    waiter_t extra;
    assert_int_equal(acq(f, &extra, USER), MG_EQUEUEFULL);
    assert_string_equal(extra.req.error, LIMIT3);

    /* A release hands the slot to the oldest waiter. */
    mg_pool_conn_t *c = lease_of(&w[1]);
    release(f, &w[1]);
    tick(&f->loop);
    assert_int_equal(w[3].calls, 1);
    assert_int_equal(w[3].status, 0);
    assert_ptr_equal(w[3].conn, c);
    assert_int_equal(w[4].calls, 0);
    release(f, &w[0]);
    tick(&f->loop);
    assert_int_equal(w[4].status, 0);
    release(f, &w[2]);
    release(f, &w[3]);
    release(f, &w[4]);
}

static void test_no_queue_fails_at_limit(void **state)
{
    fixture_t *f = *state;
    waiter_t w[4];
    set_limits(f, 3, 1, 0);

    /* queue_max 0 still lets a request wait for the connection it opens. */
    for (int i = 0; i < 3; i++)
        assert_int_equal(acq(f, &w[i], USER), MG_EAGAIN);
    fake_ready_all(&f->fb);
    tick(&f->loop);
    assert_int_equal(acq(f, &w[3], USER), MG_EQUEUEFULL);
    assert_string_equal(w[3].req.error, LIMIT3);
    for (int i = 0; i < 3; i++)
        release(f, &w[i]);
}

static void test_deadline_at_limit_message(void **state)
{
    fixture_t *f = *state;
    waiter_t w[3];
    f->settings.queue_timeout_ms = 150;
    set_limits(f, 2, 1, 10);

    assert_int_equal(acq(f, &w[0], USER), MG_EAGAIN);
    assert_int_equal(acq(f, &w[1], USER), MG_EAGAIN);
    fake_ready_all(&f->fb);
    tick(&f->loop);
    assert_int_equal(acq(f, &w[2], USER), MG_EAGAIN);
    advance(f, 30);
    assert_int_equal(w[2].calls, 0);
    advance(f, 150);
    assert_int_equal(w[2].calls, 1);
    assert_int_equal(w[2].status, MG_ETIMEDOUT);
    assert_string_equal(w[2].error,
                        "Connection limit exceeded. Maximum 2 concurrent connections allowed.");
    assert_null(w[2].conn);
    /* Completed: cancelling it now is a no-op. */
    mg_pool_acquire_cancel(&w[2].req);
    release(f, &w[0]);
    release(f, &w[1]);
}

static void test_deadline_below_limit_message(void **state)
{
    fixture_t *f = *state;
    waiter_t w;
    f->settings.queue_timeout_ms = 40;
    set_limits(f, 3, 10, 10);

    assert_int_equal(acq(f, &w, USER), MG_EAGAIN);
    advance(f, 70); /* the connect is slow */
    assert_int_equal(w.calls, 1);
    assert_int_equal(w.status, MG_ETIMEDOUT);
    assert_string_equal(w.error, "Timed out after 40 ms waiting for a connection");
    assert_null(strstr(w.error, "Connection limit"));

    /* The connection arriving later is kept for the next request. */
    fake_ready(&f->fb, 0);
    tick(&f->loop);
    assert_int_equal(w.calls, 1);
    waiter_t v;
    assert_int_equal(acq(f, &v, USER), 0);
    release(f, &v);
}

static void test_burst_opens_what_it_needs(void **state)
{
    fixture_t *f = *state;
    static waiter_t w[35];
    mg_pool_stats_t st;

    /* 5 requests fit one connection. */
    for (int i = 0; i < 5; i++)
        assert_int_equal(acq(f, &w[i], "small"), MG_EAGAIN);
    assert_int_equal(fake_opens_for(&f->fb, "small"), 1);

    /* 25 requests with 10 channels each: exactly 3, not 25. */
    for (int i = 0; i < 25; i++)
        assert_int_equal(acq(f, &w[5 + i], "big"), MG_EAGAIN);
    assert_int_equal(fake_opens_for(&f->fb, "big"), 3);
    assert_int_equal(f->fb.opens, 4);
    mg_pool_stats(f->pool, &st);
    assert_int_equal(st.total_connections, 4);
    assert_int_equal(st.waiters, 30);
    assert_int_equal(st.users, 2);

    fake_ready_all(&f->fb);
    tick(&f->loop);
    for (int i = 0; i < 30; i++) {
        assert_int_equal(w[i].calls, 1);
        assert_int_equal(w[i].status, 0);
        assert_string_equal(mg_pool_conn_user(w[i].conn), i < 5 ? "small" : "big");
        assert_true(mg_pool_conn_leases(w[i].conn) <= 10);
    }
    mg_pool_stats(f->pool, &st);
    assert_int_equal(st.leases, 30);
    assert_int_equal(st.waiters, 0);
    assert_int_equal(st.ready_connections, 4);
    for (int i = 0; i < 30; i++)
        release(f, &w[i]);
}

static void test_burst_bounded_by_queue(void **state)
{
    fixture_t *f = *state;
    static waiter_t w[31];
    set_limits(f, 3, 10, 0);

    /* Three opening connections carry 30; with queue_max 0 the 31st cannot wait. */
    for (int i = 0; i < 30; i++)
        assert_int_equal(acq(f, &w[i], USER), MG_EAGAIN);
    assert_int_equal(acq(f, &w[30], USER), MG_EQUEUEFULL);
    assert_string_equal(w[30].req.error, LIMIT3);
    assert_int_equal(f->fb.opens, 3);
    fake_ready_all(&f->fb);
    tick(&f->loop);
    for (int i = 0; i < 30; i++) {
        assert_int_equal(w[i].status, 0);
        release(f, &w[i]);
    }
}

static void test_burst_after_backoff_opens_what_it_needs(void **state)
{
    fixture_t *f = *state;
    static waiter_t w[35];
    f->settings.queue_timeout_ms = 5000;
    set_limits(f, 10, 10, 100);

    for (int i = 0; i < 10; i++)
        assert_int_equal(acq(f, &w[i], USER), MG_EAGAIN);
    fake_ready(&f->fb, 0);
    tick(&f->loop); /* ten leases: the connection is full */
    assert_int_equal(acq(f, &w[10], USER), MG_EAGAIN);
    assert_int_equal(f->fb.opens, 2);
    fake_fail(&f->fb, 1, MG_ECONNECT, "connection refused");
    tick(&f->loop);
    assert_int_equal(w[10].calls, 0); /* the ready connection will serve it */

    /* During the backoff requests queue without opening; 25 are waiting when it ends. */
    for (int i = 11; i < 35; i++)
        assert_int_equal(acq(f, &w[i], USER), MG_EAGAIN);
    assert_int_equal(f->fb.opens, 2);
    advance(f, 550);
    assert_int_equal(f->fb.opens, 5); /* ceil(25 / 10), not one per request */
    fake_ready_all(&f->fb);
    tick(&f->loop);
    for (int i = 0; i < 35; i++) {
        assert_int_equal(w[i].status, 0);
        release(f, &w[i]);
    }
}

static void test_waiters_keep_their_turn(void **state)
{
    fixture_t *f = *state;
    waiter_t a, b, c;
    set_limits(f, 1, 1, 10);

    assert_int_equal(acq(f, &a, USER), MG_EAGAIN);
    fake_ready(&f->fb, 0);
    tick(&f->loop);
    assert_int_equal(acq(f, &b, USER), MG_EAGAIN);
    release(f, &a);
    /* The slot a freed is b's, though c asks before the loop runs. */
    assert_int_equal(acq(f, &c, USER), MG_EAGAIN);
    tick(&f->loop);
    assert_int_equal(b.calls, 1);
    assert_int_equal(b.status, 0);
    assert_int_equal(c.calls, 0);
    release(f, &b);
    tick(&f->loop);
    assert_int_equal(c.calls, 1);
    release(f, &c);
}

static void test_cancel(void **state)
{
    fixture_t *f = *state;
    waiter_t a, b;
    mg_pool_stats_t st;

    assert_int_equal(acq(f, &a, USER), MG_EAGAIN);
    assert_int_equal(acq(f, &b, USER), MG_EAGAIN);
    mg_pool_acquire_cancel(&a.req);
    mg_pool_acquire_cancel(&a.req); /* twice is harmless */
    mg_pool_stats(f->pool, &st);
    assert_int_equal(st.waiters, 1);
    fake_ready(&f->fb, 0);
    tick(&f->loop);
    assert_int_equal(a.calls, 0);
    assert_int_equal(b.calls, 1);
    assert_int_equal(b.status, 0);
    release(f, &b);
}

static void test_cancel_inside_callback(void **state)
{
    fixture_t *f = *state;
    waiter_t a, b;

    assert_int_equal(acq(f, &a, USER), MG_EAGAIN);
    assert_int_equal(acq(f, &b, USER), MG_EAGAIN);
    a.cancel_other = &b; /* a's callback withdraws b, which is still queued then */
    fake_ready(&f->fb, 0);
    tick(&f->loop);
    advance(f, 5);
    assert_int_equal(a.calls, 1);
    assert_int_equal(a.status, 0);
    assert_int_equal(b.calls, 0);
    release(f, &a);
}

static void test_release_inside_callback_serves_next(void **state)
{
    fixture_t *f = *state;
    waiter_t a, b;
    set_limits(f, 1, 1, 10);

    assert_int_equal(acq(f, &a, USER), MG_EAGAIN);
    assert_int_equal(acq(f, &b, USER), MG_EAGAIN);
    a.release_in_cb = f; /* a returns its lease at once: b gets it in the same pass */
    fake_ready(&f->fb, 0);
    tick(&f->loop);
    assert_int_equal(a.calls, 1);
    assert_int_equal(b.calls, 1);
    assert_int_equal(b.status, 0);
    assert_ptr_equal(b.conn, f->fb.conns[0].pc);
    release(f, &b);
}

/* A callback that acquires again for the same user, from inside the pool's timer. */
static waiter_t reacquired;
static fixture_t *reacquire_fixture;

static void on_acquire_then_reacquire(mg_pool_acquire_t *req, int status)
{
    on_acquire(req, status);
    acq(reacquire_fixture, &reacquired, USER);
}

static void test_acquire_inside_callback(void **state)
{
    fixture_t *f = *state;
    waiter_t a;
    reacquire_fixture = f;

    memset(&a, 0, sizeof(a));
    a.req.data = &a;
    assert_int_equal(mg_pool_acquire(f->pool, &a.req, USER, NULL, on_acquire_then_reacquire),
                     MG_EAGAIN);
    fake_ready(&f->fb, 0);
    tick(&f->loop);
    assert_int_equal(a.calls, 1);
    assert_int_equal(reacquired.rc, 0); /* a free slot, nobody waiting: at once */
    assert_ptr_equal(reacquired.conn, a.conn);
    assert_int_equal(mg_pool_conn_leases(a.conn), 2);
    release(f, &a);
    release(f, &reacquired);
}

static void test_failed_connect_fails_waiters_and_backs_off(void **state)
{
    fixture_t *f = *state;
    waiter_t w[3], x;
    const char *why = "Authentication failed: the server refused our key";

    for (int i = 0; i < 3; i++)
        assert_int_equal(acq(f, &w[i], USER), MG_EAGAIN);
    assert_int_equal(f->fb.opens, 1);
    fake_fail(&f->fb, 0, MG_EAUTH, why);
    tick(&f->loop);
    for (int i = 0; i < 3; i++) {
        assert_int_equal(w[i].calls, 1);
        assert_int_equal(w[i].status, MG_EAUTH);
        assert_string_equal(w[i].error, why);
        assert_null(w[i].conn);
    }

    /* Backing off: fails at once with the reason, no new open. */
    assert_int_equal(acq(f, &x, USER), MG_EBACKOFF);
    assert_string_equal(x.req.error, why);
    assert_int_equal(f->fb.opens, 1);

    /* After 500 ms a new open is tried. */
    advance(f, 520);
    assert_int_equal(acq(f, &x, USER), MG_EAGAIN);
    assert_int_equal(f->fb.opens, 2);

    /* A second failure doubles the backoff: still refused after 600 ms. */
    fake_fail(&f->fb, 1, MG_ECONNECT, "connection refused");
    tick(&f->loop);
    assert_int_equal(x.status, MG_ECONNECT);
    assert_string_equal(x.error, "connection refused");
    advance(f, 600);
    assert_int_equal(acq(f, &x, USER), MG_EBACKOFF);
    assert_string_equal(x.req.error, "connection refused");
    assert_int_equal(f->fb.opens, 2);
    advance(f, 450);
    assert_int_equal(acq(f, &x, USER), MG_EAGAIN);
    assert_int_equal(f->fb.opens, 3);

    /* Success resets the backoff: a later failure backs off 500 ms again, not 2000. */
    fake_ready(&f->fb, 2);
    tick(&f->loop);
    assert_int_equal(x.status, 0);
    release(f, &x);
    mg_pool_close_user(f->pool, USER, false, "test");
    fake_finish_closing(&f->fb);
    assert_int_equal(acq(f, &x, USER), MG_EAGAIN);
    assert_int_equal(f->fb.opens, 4);
    fake_fail(&f->fb, 3, MG_ECONNECT, "refused again");
    tick(&f->loop);
    advance(f, 520);
    assert_int_equal(acq(f, &x, USER), MG_EAGAIN);
    assert_int_equal(f->fb.opens, 5);
    fake_ready(&f->fb, 4);
    tick(&f->loop);
    release(f, &x);
}

static void test_failed_connect_keeps_waiters_while_another_opens(void **state)
{
    fixture_t *f = *state;
    static waiter_t w[11];
    f->settings.queue_timeout_ms = 5000; /* outlasts the backoff */
    set_limits(f, 3, 10, 100);

    for (int i = 0; i < 11; i++)
        assert_int_equal(acq(f, &w[i], USER), MG_EAGAIN);
    assert_int_equal(f->fb.opens, 2);
    fake_fail(&f->fb, 0, MG_ECONNECT, "connection reset");
    tick(&f->loop);
    for (int i = 0; i < 11; i++)
        assert_int_equal(w[i].calls, 0); /* the other connection may serve them */
    /* One more connection is wanted, but not during the backoff. */
    advance(f, 300);
    assert_int_equal(f->fb.opens, 2);

    /* When the backoff ends, the pool opens again for the requests still waiting. */
    advance(f, 250);
    assert_int_equal(f->fb.opens, 3);
    fake_ready_all(&f->fb);
    tick(&f->loop);
    for (int i = 0; i < 11; i++) {
        assert_int_equal(w[i].calls, 1);
        assert_int_equal(w[i].status, 0);
        release(f, &w[i]);
    }
}

static void test_ready_ends_backoff(void **state)
{
    fixture_t *f = *state;
    static waiter_t w[11];
    f->settings.queue_timeout_ms = 5000;
    set_limits(f, 3, 10, 100);

    for (int i = 0; i < 11; i++)
        assert_int_equal(acq(f, &w[i], USER), MG_EAGAIN);
    fake_fail(&f->fb, 0, MG_ECONNECT, "connection reset");
    tick(&f->loop);
    assert_int_equal(f->fb.opens, 2);
    /* A connection that comes up proves the server answers: open for the rest at once. */
    fake_ready(&f->fb, 1);
    tick(&f->loop);
    int served = 0;
    for (int i = 0; i < 11; i++)
        served += w[i].calls == 1 && w[i].status == 0;
    assert_int_equal(served, 10);
    assert_int_equal(f->fb.opens, 3);
    fake_ready(&f->fb, 2);
    tick(&f->loop);
    for (int i = 0; i < 11; i++) {
        assert_int_equal(w[i].status, 0);
        release(f, &w[i]);
    }
}

static void test_open_failing_at_once(void **state)
{
    fixture_t *f = *state;
    waiter_t a, b;
    mg_pool_stats_t st;

    f->fb.open_rc = MG_ECONNECT;
    f->fb.open_err = "connect to 10.0.0.1:22: connection refused";
    assert_int_equal(acq(f, &a, USER), MG_ECONNECT);
    assert_string_equal(a.req.error, "connect to 10.0.0.1:22: connection refused");
    assert_int_equal(a.calls, 0);
    mg_pool_stats(f->pool, &st);
    assert_int_equal(st.total_connections, 0);
    assert_int_equal(st.waiters, 0);

    f->fb.open_rc = 0;
    assert_int_equal(acq(f, &b, USER), MG_EBACKOFF);
    assert_string_equal(b.req.error, "connect to 10.0.0.1:22: connection refused");
    assert_int_equal(f->fb.opens, 1);
}

static void test_unhealthy_never_handed_out(void **state)
{
    fixture_t *f = *state;
    waiter_t a, b;

    assert_int_equal(acq(f, &a, USER), MG_EAGAIN);
    fake_ready(&f->fb, 0);
    tick(&f->loop);
    mg_pool_conn_t *sick = lease_of(&a);
    release(f, &a);
    mg_pool_conn_set_healthy(sick, false);
    assert_false(mg_pool_conn_healthy(sick));

    assert_int_equal(acq(f, &b, USER), MG_EAGAIN); /* not the unhealthy one */
    assert_int_equal(f->fb.opens, 2);
    fake_ready(&f->fb, 1);
    tick(&f->loop);
    assert_int_equal(b.status, 0);
    assert_ptr_not_equal(b.conn, sick);
    release(f, &b);
}

static void test_unhealthy_waiter_waits_until_healthy(void **state)
{
    fixture_t *f = *state;
    waiter_t a, b;
    set_limits(f, 1, 10, 10);

    assert_int_equal(acq(f, &a, USER), MG_EAGAIN);
    fake_ready(&f->fb, 0);
    tick(&f->loop);
    mg_pool_conn_t *c = lease_of(&a);
    release(f, &a);
    mg_pool_conn_set_healthy(c, false);
    assert_int_equal(acq(f, &b, USER), MG_EAGAIN);
    advance(f, 20);
    assert_int_equal(b.calls, 0);
    assert_int_equal(f->fb.opens, 1); /* at the limit */
    mg_pool_conn_set_healthy(c, true);
    tick(&f->loop);
    assert_int_equal(b.calls, 1);
    assert_ptr_equal(b.conn, c);
    release(f, &b);
}

static void test_closed_with_leases_keeps_record(void **state)
{
    fixture_t *f = *state;
    waiter_t a, b;
    mg_pool_stats_t st;

    assert_int_equal(acq(f, &a, USER), MG_EAGAIN);
    fake_ready(&f->fb, 0);
    tick(&f->loop);
    mg_pool_conn_t *gone = lease_of(&a);
    fake_closed(&f->fb, 0);

    mg_pool_stats(f->pool, &st);
    assert_int_equal(st.total_connections, 0);
    assert_int_equal(st.leases, 1);
    /* The record is still readable (ASan would object otherwise). */
    assert_int_equal(mg_pool_conn_leases(gone), 1);
    assert_string_equal(mg_pool_conn_user(gone), USER);
    assert_int_equal(mg_pool_conn_id(gone), 1);

    /* It is never handed out again. */
    assert_int_equal(acq(f, &b, USER), MG_EAGAIN);
    assert_int_equal(f->fb.opens, 2);
    fake_ready(&f->fb, 1);
    tick(&f->loop);
    assert_ptr_not_equal(b.conn, gone);

    /* A late report for a connection already gone is ignored. */
    mg_pool_conn_closed(gone, 0, NULL);
    mg_pool_conn_ready(gone);
    mg_pool_stats(f->pool, &st);
    assert_int_equal(st.total_connections, 1);

    release(f, &a); /* frees the record */
    release(f, &b);
    mg_pool_stats(f->pool, &st);
    assert_int_equal(st.leases, 0);
}

static void test_replacement_opened_for_waiters(void **state)
{
    fixture_t *f = *state;
    waiter_t a, b;
    set_limits(f, 1, 1, 10);

    assert_int_equal(acq(f, &a, USER), MG_EAGAIN);
    fake_ready(&f->fb, 0);
    tick(&f->loop);
    assert_int_equal(acq(f, &b, USER), MG_EAGAIN);
    assert_int_equal(f->fb.opens, 1);
    fake_closed(&f->fb, 0); /* a still holds its lease on the dead one */
    tick(&f->loop);
    assert_int_equal(f->fb.opens, 2);
    fake_ready(&f->fb, 1);
    tick(&f->loop);
    assert_int_equal(b.status, 0);
    assert_ptr_equal(b.conn, f->fb.conns[1].pc);
    release(f, &a);
    release(f, &b);
}

static void test_isolation(void **state)
{
    fixture_t *f = *state;
    waiter_t a, b;
    mg_pool_user_stats_t us;

    assert_int_equal(acq(f, &a, "alice"), MG_EAGAIN);
    fake_ready(&f->fb, 0);
    tick(&f->loop);
    mg_pool_conn_t *alices = lease_of(&a);
    release(f, &a); /* idle, with free channels */

    assert_int_equal(acq(f, &b, "bob"), MG_EAGAIN); /* not alice's */
    assert_int_equal(f->fb.opens, 2);
    assert_string_equal(f->fb.conns[1].user, "bob");
    fake_ready(&f->fb, 1);
    tick(&f->loop);
    assert_ptr_not_equal(b.conn, alices);
    assert_string_equal(mg_pool_conn_user(b.conn), "bob");

    /* Closing bob's leaves alice's alone. */
    assert_int_equal(mg_pool_close_user(f->pool, "bob", false, "kick"), 1);
    assert_true(f->fb.conns[1].close_called);
    assert_false(f->fb.conns[0].close_called);
    assert_int_equal(mg_pool_user_stats(f->pool, "alice", &us), 0);
    assert_int_equal(us.connections, 1);
    fake_finish_closing(&f->fb);
    release(f, &b);
    /* A user that prefixes another is another user. */
    assert_int_equal(acq(f, &a, "alice2"), MG_EAGAIN);
    assert_int_equal(f->fb.opens, 3);
    mg_pool_acquire_cancel(&a.req);
}

static int limits_fn(void *ctx, const char *user, mg_pool_limits_t *out)
{
    int *calls = ctx;
    (*calls)++;
    if (strcmp(user, "small") == 0) {
        out->max_connections = 1;
        out->max_channels = 1;
        out->queue_max = 0;
        return 0;
    }
    if (strcmp(user, "broken") == 0)
        return MG_ECONFIG;
    if (strcmp(user, "silly") == 0) {
        out->max_channels = 0;
        return 0;
    }
    return 0; /* leaves the defaults it was given */
}

static void test_limits_per_user(void **state)
{
    fixture_t *f = *state;
    waiter_t a, b, c;
    mg_pool_user_stats_t us;
    int calls = 0;

    mg_pool_set_limits_fn(f->pool, limits_fn, &calls);
    assert_int_equal(acq(f, &a, "small"), MG_EAGAIN);
    assert_int_equal(calls, 1);
    assert_int_equal(acq(f, &b, "small"), MG_EQUEUEFULL);
    assert_string_equal(b.req.error,
                        "Connection limit exceeded. Maximum 1 concurrent connections allowed.");
    assert_int_equal(calls, 1); /* asked once per user */
    assert_int_equal(mg_pool_user_stats(f->pool, "small", &us), 0);
    assert_int_equal(us.limits.max_connections, 1);
    assert_int_equal(us.limits.max_channels, 1);

    /* A failing or nonsensical answer means the defaults. */
    assert_int_equal(acq(f, &b, "broken"), MG_EAGAIN);
    assert_int_equal(mg_pool_user_stats(f->pool, "broken", &us), 0);
    assert_int_equal(us.limits.max_connections, 3);
    assert_int_equal(us.limits.max_channels, 10);
    assert_int_equal(acq(f, &c, "silly"), MG_EAGAIN);
    assert_int_equal(mg_pool_user_stats(f->pool, "silly", &us), 0);
    assert_int_equal(us.limits.max_channels, 10);
    mg_pool_acquire_cancel(&b.req);
    mg_pool_acquire_cancel(&c.req);

    /* After a refresh, new limits apply: raising small's lets another connection open. */
    mg_pool_set_limits_fn(f->pool, NULL, NULL);
    mg_pool_refresh_limits(f->pool);
    assert_int_equal(mg_pool_user_stats(f->pool, "small", &us), 0);
    assert_int_equal(us.limits.max_connections, 3);
    assert_int_equal(acq(f, &b, "small"), MG_EAGAIN);
    assert_int_equal(fake_opens_for(&f->fb, "small"), 1); /* the opening one takes 10 now */
    fake_ready(&f->fb, 0);
    tick(&f->loop);
    assert_int_equal(a.status, 0);
    assert_int_equal(b.status, 0);
    release(f, &a);
    release(f, &b);
}

static void test_refresh_raises_limit_for_waiters(void **state)
{
    fixture_t *f = *state;
    waiter_t a, b;
    int calls = 0;

    mg_pool_set_limits_fn(f->pool, limits_fn, &calls);
    assert_int_equal(acq(f, &a, "small"), MG_EAGAIN);
    fake_ready(&f->fb, 0);
    tick(&f->loop);
    mg_pool_set_limits_fn(f->pool, NULL, NULL);
    mg_pool_refresh_limits(f->pool); /* 10 channels now: b fits on the same connection */
    assert_int_equal(acq(f, &b, "small"), 0);
    assert_ptr_equal(b.conn, a.conn);
    release(f, &a);
    release(f, &b);
}

static void test_cleanup_stale(void **state)
{
    fixture_t *f = *state;
    waiter_t w[4];
    mg_pool_stats_t st;
    set_limits(f, 3, 1, 10);

    for (int i = 0; i < 3; i++)
        assert_int_equal(acq(f, &w[i], USER), MG_EAGAIN);
    fake_ready_all(&f->fb);
    tick(&f->loop);
    mg_pool_conn_t *idle = lease_of(&w[0]), *busy = lease_of(&w[1]), *sick = lease_of(&w[2]);
    int i_idle = fake_index(&f->fb, idle), i_busy = fake_index(&f->fb, busy),
        i_sick = fake_index(&f->fb, sick);
    release(f, &w[0]);
    mg_pool_conn_set_healthy(sick, false);

    /* Nothing is stale yet. */
    assert_int_equal(mg_pool_cleanup_stale(f->pool, 30), 1); /* only the unhealthy one */
    assert_true(f->fb.conns[i_sick].close_called);
    assert_true(f->fb.conns[i_sick].close_force);
    assert_string_equal(f->fb.conns[i_sick].close_reason, "unhealthy");
    assert_false(f->fb.conns[i_idle].close_called);
    assert_int_equal(f->fb.trims, 1); /* the one serving no request gives back what it can */

    advance(f, 50);
    assert_int_equal(mg_pool_cleanup_stale(f->pool, 30), 1);
    assert_true(f->fb.conns[i_idle].close_called);
    assert_false(f->fb.conns[i_idle].close_force);
    assert_string_equal(f->fb.conns[i_idle].close_reason, "idle");
    assert_false(f->fb.conns[i_busy].close_called); /* has a lease */
    assert_int_equal(f->fb.trims, 1); /* a busy lease: no trim */
    mg_pool_lease_set_idle(f->pool, busy, true);
    assert_int_equal(mg_pool_cleanup_stale(f->pool, 30), 0); /* each closed once */
    assert_int_equal(f->fb.trims, 2); /* a kept-alive channel only: trimmed */
    mg_pool_lease_set_idle(f->pool, busy, false);
    assert_int_equal(fake_finish_closing(&f->fb), 2);
    mg_pool_stats(f->pool, &st);
    assert_int_equal(st.total_connections, 1);
    assert_int_equal(st.leases, 2); /* busy, and the sick one's lease until released */

    release(f, &w[1]);
    release(f, &w[2]);
}

static int short_idle_fn(void *ctx, const char *user, mg_pool_limits_t *out)
{
    if (strcmp(user, "brief") == 0)
        out->idle_timeout_ms = 10;
    return 0;
}

static void test_cleanup_uses_user_idle_timeout(void **state)
{
    fixture_t *f = *state;
    waiter_t a, b;

    mg_pool_set_limits_fn(f->pool, short_idle_fn, NULL);
    assert_int_equal(acq(f, &a, "brief"), MG_EAGAIN);
    assert_int_equal(acq(f, &b, "patient"), MG_EAGAIN);
    fake_ready_all(&f->fb);
    tick(&f->loop);
    release(f, &a);
    release(f, &b);
    advance(f, 30);
    /* 10 s overall, but brief's own limit is 10 ms. */
    assert_int_equal(mg_pool_cleanup_stale(f->pool, 10000), 1);
    assert_true(f->fb.conns[0].close_called);
    assert_false(f->fb.conns[1].close_called);
}

static void test_close_user_and_all(void **state)
{
    fixture_t *f = *state;
    waiter_t a, b, c;
    mg_pool_stats_t st;

    assert_int_equal(acq(f, &a, "alice"), MG_EAGAIN);
    assert_int_equal(acq(f, &b, "bob"), MG_EAGAIN);
    assert_int_equal(acq(f, &c, "carol"), MG_EAGAIN);
    fake_ready(&f->fb, 0);
    fake_ready(&f->fb, 1);
    tick(&f->loop);
    release(f, &a);
    release(f, &b);
    mg_pool_acquire_cancel(&c.req); /* carol's stays opening */

    assert_int_equal(mg_pool_close_user(f->pool, "nobody", false, "x"), 0);
    assert_int_equal(mg_pool_close_user(f->pool, "alice", false, "x"), 1);
    assert_int_equal(mg_pool_close_user(f->pool, "alice", false, "x"), 0); /* already closing */
    f->fb.close_sync = true;
    assert_int_equal(mg_pool_close_all(f->pool, true, "bye"), 2); /* bob's, and carol's opening */
    assert_true(f->fb.conns[2].close_force);
    assert_false(f->fb.conns[0].close_force);
    mg_pool_stats(f->pool, &st);
    assert_int_equal(st.total_connections, 1); /* alice's, still closing */
    fake_finish_closing(&f->fb);
    mg_pool_stats(f->pool, &st);
    assert_int_equal(st.total_connections, 0);
    assert_int_equal(st.users, 0);
}

static int idle_calls;

static void on_idle(mg_pool_t *pool, void *arg)
{
    idle_calls++;
    assert_ptr_equal(arg, &idle_calls);
}

static void test_drain(void **state)
{
    fixture_t *f = *state;
    waiter_t a, b, c;
    mg_pool_stats_t st;
    set_limits(f, 1, 1, 10);

    assert_int_equal(acq(f, &a, USER), MG_EAGAIN);
    fake_ready(&f->fb, 0);
    tick(&f->loop);
    assert_int_equal(acq(f, &b, USER), MG_EAGAIN);

    idle_calls = 0;
    mg_pool_drain(f->pool, on_idle, &idle_calls);
    assert_int_equal(idle_calls, 0); /* a lease is held */
    assert_int_equal(acq(f, &c, USER), MG_ESHUTDOWN);
    assert_string_equal(c.req.error, "gateway is shutting down");
    tick(&f->loop);
    assert_int_equal(b.calls, 1);
    assert_int_equal(b.status, MG_ESHUTDOWN);
    assert_string_equal(b.error, "gateway is shutting down");
    mg_pool_stats(f->pool, &st);
    assert_true(st.draining);
    assert_int_equal(st.waiters, 0);

    release(f, &a);
    assert_int_equal(idle_calls, 1);
    /* Calling it again replaces the hook, and reports idle at once. */
    mg_pool_drain(f->pool, on_idle, &idle_calls);
    assert_int_equal(idle_calls, 2);
    mg_pool_drain(f->pool, NULL, NULL);
    assert_int_equal(idle_calls, 2);
}

/* Idle leases (kept-alive channels) are counted apart from busy ones, per connection, per user and
 * in the pool, and still take a channel slot; misuse is refused and changes nothing. */
static void test_idle_leases(void **state)
{
    fixture_t *f = *state;
    waiter_t a, b, c;
    mg_pool_stats_t st;
    mg_pool_user_stats_t us;
    set_limits(f, 1, 2, 10);

    assert_int_equal(acq(f, &a, USER), MG_EAGAIN);
    fake_ready(&f->fb, 0);
    tick(&f->loop);
    assert_int_equal(acq(f, &b, USER), 0);
    mg_pool_conn_t *pc = lease_of(&a);

    mg_pool_lease_set_idle(f->pool, pc, true);
    mg_pool_stats(f->pool, &st);
    assert_int_equal(st.leases, 2);
    assert_int_equal(st.idle_leases, 1);
    assert_int_equal(mg_pool_user_stats(f->pool, USER, &us), 0);
    assert_int_equal(us.leases, 2);
    assert_int_equal(us.idle_leases, 1);
    assert_int_equal(mg_pool_conn_idle_leases(pc), 1);

    /* The idle one still fills its slot: a third request waits. */
    assert_int_equal(acq(f, &c, USER), MG_EAGAIN);
    mg_pool_acquire_cancel(&c.req);

    /* Two idle is right; a third would be more idle than held: refused. */
    mg_pool_lease_set_idle(f->pool, pc, true);
    mg_pool_lease_set_idle(f->pool, pc, true);
    mg_pool_stats(f->pool, &st);
    assert_int_equal(st.idle_leases, 2);
    /* No busy lease is left to release. */
    mg_pool_release(f->pool, pc);
    mg_pool_stats(f->pool, &st);
    assert_int_equal(st.leases, 2);

    mg_pool_lease_set_idle(f->pool, pc, false);
    mg_pool_lease_set_idle(f->pool, pc, false);
    mg_pool_lease_set_idle(f->pool, pc, false); /* none idle: refused */
    mg_pool_stats(f->pool, &st);
    assert_int_equal(st.idle_leases, 0);
    release(f, &a);
    release(f, &b);
    mg_pool_stats(f->pool, &st);
    assert_int_equal(st.leases + st.idle_leases, 0);
}

static int closed_calls;
static int closed_seen_total;

static void on_closed(mg_pool_t *pool, void *arg)
{
    mg_pool_stats_t st;
    mg_pool_stats(pool, &st);
    closed_calls++;
    closed_seen_total = st.total_connections;
}

static void test_closed_hook(void **state)
{
    fixture_t *f = *state;
    waiter_t a, b;

    closed_calls = 0;
    mg_pool_set_closed_cb(f->pool, on_closed, NULL);
    assert_int_equal(acq(f, &a, "alice"), MG_EAGAIN);
    assert_int_equal(acq(f, &b, "bob"), MG_EAGAIN);
    fake_ready(&f->fb, 0);
    tick(&f->loop);
    fake_fail(&f->fb, 1, MG_EHOSTKEY, "host key mismatch");
    assert_int_equal(closed_calls, 1);
    assert_int_equal(closed_seen_total, 1); /* counts already updated */
    tick(&f->loop);
    assert_int_equal(b.status, MG_EHOSTKEY);
    release(f, &a);
    f->fb.close_sync = true;
    mg_pool_close_all(f->pool, false, "bye");
    assert_int_equal(closed_calls, 2);
    assert_int_equal(closed_seen_total, 0);
    mg_pool_set_closed_cb(f->pool, NULL, NULL);
}

typedef struct count_ctx {
    int alice, bob, other;
} count_ctx_t;

static void count_conn(const char *user, mg_pool_conn_t *pc, void *arg)
{
    count_ctx_t *c = arg;
    assert_string_equal(user, mg_pool_conn_user(pc));
    if (strcmp(user, "alice") == 0)
        c->alice++;
    else if (strcmp(user, "bob") == 0)
        c->bob++;
    else
        c->other++;
}

/* ---- the handshake gate ---- */

/*
 * A pool whose gate runs `running` handshakes at once (one per server) and queues `queued`
 * more, with `channels` channels a connection.
 */
static int setup_gate(void **state, int running, int queued, int channels)
{
    fixture_t *f = fixture_new();
    f->settings.max_channels = channels;
    f->settings.max_handshakes = running;
    f->settings.handshake_queue_max = queued;
    f->settings.max_handshakes_per_server = 1;
    f->fb.named_servers = true;
    fixture_pool(f);
    *state = f;
    return 0;
}

static int setup_gate2(void **state)
{
    return setup_gate(state, 2, 3, 10);
}

static int setup_gate2_one_channel(void **state)
{
    return setup_gate(state, 2, 3, 1);
}

static int setup_gate1(void **state)
{
    return setup_gate(state, 1, 1, 10);
}

static int setup_unbounded(void **state)
{
    return setup_gate(state, 0, 0, 10);
}

static void stats_of(fixture_t *f, mg_pool_stats_t *st)
{
    mg_pool_stats(f->pool, st);
}

static void test_gate_bounds_handshakes_in_order(void **state)
{
    fixture_t *f = *state;
    waiter_t w[6];
    mg_pool_stats_t st;
    char id[8];

    for (int i = 0; i < 5; i++) {
        snprintf(id, sizeof(id), "u%d", i);
        assert_int_equal(acq(f, &w[i], id), MG_EAGAIN);
    }
    /* Two handshakes run; three users wait for a slot; the sixth finds the queue full. */
    assert_int_equal(f->fb.opens, 2);
    stats_of(f, &st);
    assert_int_equal(st.handshakes, 2);
    assert_int_equal(st.handshakes_queued, 3);
    assert_int_equal(st.total_connections, 5);
    assert_int_equal(acq(f, &w[5], "u5"), MG_EBUSY);
    assert_non_null(strstr(w[5].req.error, "Too many SSH connections being opened at once"));
    stats_of(f, &st);
    assert_int_equal(st.handshakes_refused, 1);

    /* Each handshake that ends, ready or failed, starts the oldest waiting one. */
    fake_ready(&f->fb, 0);
    tick(&f->loop);
    assert_int_equal(w[0].calls, 1);
    assert_int_equal(w[0].status, 0);
    assert_int_equal(f->fb.opens, 3);
    assert_string_equal(f->fb.conns[2].user, "u2");
    fake_fail(&f->fb, 1, MG_EAUTH, "refused");
    tick(&f->loop);
    assert_int_equal(w[1].status, MG_EAUTH);
    assert_int_equal(f->fb.opens, 4);
    assert_string_equal(f->fb.conns[3].user, "u3");
    fake_ready(&f->fb, 2);
    tick(&f->loop);
    assert_string_equal(f->fb.conns[4].user, "u4");
    stats_of(f, &st);
    assert_int_equal(st.handshakes, 2);
    assert_int_equal(st.handshakes_queued, 0);
    assert_int_equal(fake_ready_all(&f->fb), 2);
    tick(&f->loop);
    stats_of(f, &st);
    assert_int_equal(st.handshakes, 0);
    assert_int_equal(st.handshakes_peak, 2);
    for (int i = 0; i < 5; i++) {
        if (i == 1)
            continue;
        assert_int_equal(w[i].status, 0);
        release(f, &w[i]);
    }
}

static void test_gate_deadline_while_queued(void **state)
{
    fixture_t *f = *state;
    waiter_t a, b, c;
    mg_pool_stats_t st;
    mg_pool_user_stats_t us;

    assert_int_equal(acq(f, &a, "first"), MG_EAGAIN);
    assert_int_equal(acq(f, &b, "second"), MG_EAGAIN);
    assert_int_equal(f->fb.opens, 1);
    /* The deadline passes while second's connection still waits for the one slot. */
    advance(f, 250);
    assert_int_equal(b.calls, 1);
    assert_int_equal(b.status, MG_ETIMEDOUT);
    assert_non_null(strstr(b.error, "Timed out after 200 ms waiting for a connection"));
    assert_non_null(strstr(b.error, "queued for a handshake slot"));
    assert_int_equal(a.status, MG_ETIMEDOUT);
    /* Its place is free and nothing of it stays: no record, no backoff, no entry. */
    stats_of(f, &st);
    assert_int_equal(st.handshakes_queued, 0);
    assert_int_equal(st.total_connections, 1);
    assert_int_equal(mg_pool_user_stats(f->pool, "second", &us), MG_EINVAL);
    /* The slot it never got goes to whoever comes next once the running one ends. */
    assert_int_equal(acq(f, &c, "second"), MG_EAGAIN);
    assert_int_equal(f->fb.opens, 1);
    fake_ready(&f->fb, 0);
    tick(&f->loop);
    assert_int_equal(f->fb.opens, 2);
    assert_string_equal(f->fb.conns[1].user, "second");
    fake_ready(&f->fb, 1);
    tick(&f->loop);
    assert_int_equal(c.status, 0);
    release(f, &c);
}

static void test_gate_cancel_frees_place(void **state)
{
    fixture_t *f = *state;
    waiter_t a, b, c;
    mg_pool_stats_t st;

    assert_int_equal(acq(f, &a, "a"), MG_EAGAIN);
    assert_int_equal(acq(f, &b, "b"), MG_EAGAIN);
    assert_int_equal(acq(f, &c, "c"), MG_EBUSY); /* one runs, one waits: full */
    mg_pool_acquire_cancel(&b.req);
    stats_of(f, &st);
    assert_int_equal(st.handshakes_queued, 0);
    assert_int_equal(acq(f, &c, "c"), MG_EAGAIN);
    fake_ready(&f->fb, 0);
    tick(&f->loop);
    assert_int_equal(b.calls, 0);
    assert_int_equal(f->fb.opens, 2);
    assert_string_equal(f->fb.conns[1].user, "c");
    assert_int_equal(fake_opens_for(&f->fb, "b"), 0);
    fake_ready(&f->fb, 1);
    tick(&f->loop);
    release(f, &a);
    release(f, &c);
}

static void test_gate_per_server(void **state)
{
    fixture_t *f = *state;
    waiter_t w[4];
    mg_pool_stats_t st;

    /* One handshake at once with each server, two in all: b's user overtakes a's second. */
    assert_int_equal(acq_to(f, &w[0], "u0", "a:22"), MG_EAGAIN);
    assert_int_equal(acq_to(f, &w[1], "u1", "a:22"), MG_EAGAIN);
    assert_int_equal(acq_to(f, &w[2], "u2", "b:22"), MG_EAGAIN);
    assert_int_equal(acq_to(f, &w[3], "u3", "b:22"), MG_EAGAIN);
    assert_int_equal(f->fb.opens, 2);
    assert_string_equal(f->fb.conns[0].user, "u0");
    assert_string_equal(f->fb.conns[1].user, "u2");
    stats_of(f, &st);
    assert_int_equal(st.handshakes_queued, 2);
    assert_int_equal(st.max_handshakes_per_server, 1);
    /* b's handshake ends: b's next goes, a's stays behind a's running one. */
    fake_ready(&f->fb, 1);
    tick(&f->loop);
    assert_int_equal(f->fb.opens, 3);
    assert_string_equal(f->fb.conns[2].user, "u3");
    fake_ready(&f->fb, 0);
    tick(&f->loop);
    assert_string_equal(f->fb.conns[3].user, "u1");
    assert_int_equal(fake_ready_all(&f->fb), 2);
    tick(&f->loop);
    for (int i = 0; i < 4; i++) {
        assert_int_equal(w[i].status, 0);
        release(f, &w[i]);
    }
}

/*
 * A user that has a connection, wants another, and finds the gate's queue full waits for the
 * one it has: its timer does not try the gate again and again (the gate has room overall, but
 * not for this server).
 */
static void test_gate_full_queue_does_not_spin(void **state)
{
    fixture_t *f = *state;
    waiter_t a1, a2, x, y[3];
    char id[8];

    assert_int_equal(acq_to(f, &a1, "a", "s1:22"), MG_EAGAIN);
    fake_ready(&f->fb, 0);
    tick(&f->loop);
    assert_int_equal(a1.status, 0);
    assert_int_equal(acq_to(f, &x, "x", "s1:22"), MG_EAGAIN); /* s1's one slot */
    for (int i = 0; i < 3; i++) {
        snprintf(id, sizeof(id), "y%d", i);
        assert_int_equal(acq_to(f, &y[i], id, "s1:22"), MG_EAGAIN); /* the queue, full */
    }
    /* a's one channel is taken: a wants a second connection. */
    assert_int_equal(acq_to(f, &a2, "a", "s1:22"), MG_EAGAIN);
    f->fb.server_calls_max = f->fb.server_calls + 5;
    run_ms(&f->loop, 30);
    f->fb.server_calls_max = 0;
    assert_int_equal(a2.calls, 0);
    /* a's channel frees: its waiter takes it. */
    release(f, &a1);
    tick(&f->loop);
    assert_int_equal(a2.status, 0);
    release(f, &a2);
    mg_pool_acquire_cancel(&x.req);
    for (int i = 0; i < 3; i++)
        mg_pool_acquire_cancel(&y[i].req);
}

static void test_gate_drain_and_close_drop_queued(void **state)
{
    fixture_t *f = *state;
    waiter_t a, b;
    mg_pool_stats_t st;

    assert_int_equal(acq(f, &a, "a"), MG_EAGAIN);
    assert_int_equal(acq(f, &b, "b"), MG_EAGAIN);
    /* Closing a user whose connection never reached the backend asks the backend nothing. */
    assert_int_equal(mg_pool_close_user(f->pool, "b", true, "gone"), 1);
    assert_int_equal(f->fb.closes, 0);
    stats_of(f, &st);
    assert_int_equal(st.handshakes_queued, 0);
    assert_int_equal(st.total_connections, 1);
    /* Its request still waits, so the pool queues a new connection for it, at the tail. */
    tick(&f->loop);
    assert_int_equal(b.calls, 0);
    stats_of(f, &st);
    assert_int_equal(st.handshakes_queued, 1);

    /* A drain fails the waiters and takes their queued connections away with them. */
    mg_pool_drain(f->pool, NULL, NULL);
    tick(&f->loop);
    assert_int_equal(a.status, MG_ESHUTDOWN);
    assert_int_equal(b.status, MG_ESHUTDOWN);
    stats_of(f, &st);
    assert_int_equal(st.handshakes_queued, 0);
    assert_int_equal(st.total_connections, 1); /* a's, still handshaking */
    assert_int_equal(fake_opens_for(&f->fb, "b"), 0);
}

static void test_stats(void **state)
{
    fixture_t *f = *state;
    static waiter_t w[13];
    mg_pool_stats_t st;
    mg_pool_user_stats_t us;
    count_ctx_t cc = { 0 };

    mg_pool_stats(f->pool, &st);
    assert_int_equal(st.total_connections + st.users + st.leases + st.waiters, 0);
    assert_false(st.draining);

    for (int i = 0; i < 12; i++)
        assert_int_equal(acq(f, &w[i], "alice"), MG_EAGAIN);
    assert_int_equal(acq(f, &w[12], "bob"), MG_EAGAIN);
    mg_pool_stats(f->pool, &st);
    assert_int_equal(st.total_connections, 3);
    assert_int_equal(st.ready_connections, 0);
    assert_int_equal(st.users, 2);
    assert_int_equal(st.waiters, 13);
    assert_int_equal(st.leases, 0);

    fake_ready(&f->fb, 0);
    tick(&f->loop);
    mg_pool_stats(f->pool, &st);
    assert_int_equal(st.ready_connections, 1);
    assert_int_equal(st.leases, 10);
    assert_int_equal(st.waiters, 3);
    assert_int_equal(mg_pool_user_stats(f->pool, "alice", &us), 0);
    assert_int_equal(us.connections, 2);
    assert_int_equal(us.opening, 1);
    assert_int_equal(us.leases, 10);
    assert_int_equal(us.waiters, 2);
    assert_int_equal(us.limits.max_connections, 3);
    assert_int_equal(us.limits.queue_max, 100);
    assert_int_equal(us.limits.queue_timeout_ms, 200);
    assert_int_equal(us.limits.idle_timeout_ms, 300000);

    mg_pool_foreach_conn(f->pool, count_conn, &cc);
    assert_int_equal(cc.alice, 2);
    assert_int_equal(cc.bob, 1);
    assert_int_equal(cc.other, 0);

    fake_ready_all(&f->fb);
    tick(&f->loop);
    for (int i = 0; i < 13; i++) {
        assert_int_equal(w[i].status, 0);
        release(f, &w[i]);
    }
    assert_int_equal(mg_pool_conn_last_used(f->fb.conns[0].pc), f->now);
}

static void test_user_entries_freed(void **state)
{
    fixture_t *f = *state;
    waiter_t a;
    mg_pool_user_stats_t us;
    mg_pool_stats_t st;
    char id[32];

    /* Many users come and go; nothing of them stays. */
    for (int i = 0; i < 200; i++) {
        snprintf(id, sizeof(id), "user%d", i);
        assert_int_equal(acq(f, &a, id), MG_EAGAIN);
        mg_pool_acquire_cancel(&a.req);
        assert_int_equal(mg_pool_user_stats(f->pool, id, &us), 0); /* its connection opens */
        assert_int_equal(us.waiters, 0);
    }
    assert_int_equal(f->fb.opens, 200);
    f->fb.close_sync = true;
    assert_int_equal(mg_pool_close_all(f->pool, false, "x"), 200);
    mg_pool_stats(f->pool, &st);
    assert_int_equal(st.total_connections, 0);
    assert_int_equal(st.users, 0);
    assert_int_equal(mg_pool_user_stats(f->pool, "user7", &us), MG_EINVAL);

    /* A timed-out waiter's entry goes with its connection. */
    assert_int_equal(acq(f, &a, "late"), MG_EAGAIN);
    advance(f, 250);
    assert_int_equal(a.status, MG_ETIMEDOUT);
    assert_int_equal(mg_pool_user_stats(f->pool, "late", &us), 0);
    assert_int_equal(mg_pool_close_user(f->pool, "late", true, "x"), 1);
    assert_int_equal(mg_pool_user_stats(f->pool, "late", &us), MG_EINVAL);
}

static void test_release_misuse_is_ignored(void **state)
{
    fixture_t *f = *state;
    waiter_t a;
    mg_pool_stats_t st;

    assert_int_equal(acq(f, &a, USER), MG_EAGAIN);
    fake_ready(&f->fb, 0);
    tick(&f->loop);
    mg_pool_conn_t *c = a.conn;
    release(f, &a);
    mg_pool_release(f->pool, c); /* no lease left: logged, ignored */
    mg_pool_release(f->pool, NULL);
    mg_pool_stats(f->pool, &st);
    assert_int_equal(st.leases, 0);
    assert_int_equal(mg_pool_conn_leases(c), 0);
}

static void test_acquire_needs_callback(void **state)
{
    fixture_t *f = *state;
    mg_pool_acquire_t req;
    assert_int_equal(mg_pool_acquire(f->pool, &req, USER, NULL, NULL), MG_EINVAL);
    assert_int_equal(f->fb.opens, 0);
}

int main(void)
{
    mg_log_set_level(MG_LOG_ERROR);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_new_rejects_bad_arguments, setup, teardown),
        cmocka_unit_test(test_user_id_valid),
        cmocka_unit_test_setup_teardown(test_invalid_user_rejected, setup, teardown),
        cmocka_unit_test_setup_teardown(test_first_acquire_opens_then_completes, setup, teardown),
        cmocka_unit_test_setup_teardown(test_reuse_same_connection, setup, teardown),
        cmocka_unit_test_setup_teardown(test_least_loaded_chosen, setup, teardown),
        cmocka_unit_test_setup_teardown(test_queue_full_exact_message, setup, teardown),
        cmocka_unit_test_setup_teardown(test_no_queue_fails_at_limit, setup, teardown),
        cmocka_unit_test_setup_teardown(test_deadline_at_limit_message, setup, teardown),
        cmocka_unit_test_setup_teardown(test_deadline_below_limit_message, setup, teardown),
        cmocka_unit_test_setup_teardown(test_burst_opens_what_it_needs, setup, teardown),
        cmocka_unit_test_setup_teardown(test_burst_bounded_by_queue, setup, teardown),
        cmocka_unit_test_setup_teardown(test_burst_after_backoff_opens_what_it_needs, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(test_waiters_keep_their_turn, setup, teardown),
        cmocka_unit_test_setup_teardown(test_cancel, setup, teardown),
        cmocka_unit_test_setup_teardown(test_cancel_inside_callback, setup, teardown),
        cmocka_unit_test_setup_teardown(test_release_inside_callback_serves_next, setup, teardown),
        cmocka_unit_test_setup_teardown(test_acquire_inside_callback, setup, teardown),
        cmocka_unit_test_setup_teardown(test_failed_connect_fails_waiters_and_backs_off, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(test_failed_connect_keeps_waiters_while_another_opens,
                                        setup, teardown),
        cmocka_unit_test_setup_teardown(test_ready_ends_backoff, setup, teardown),
        cmocka_unit_test_setup_teardown(test_open_failing_at_once, setup, teardown),
        cmocka_unit_test_setup_teardown(test_unhealthy_never_handed_out, setup, teardown),
        cmocka_unit_test_setup_teardown(test_unhealthy_waiter_waits_until_healthy, setup, teardown),
        cmocka_unit_test_setup_teardown(test_closed_with_leases_keeps_record, setup, teardown),
        cmocka_unit_test_setup_teardown(test_replacement_opened_for_waiters, setup, teardown),
        cmocka_unit_test_setup_teardown(test_isolation, setup, teardown),
        cmocka_unit_test_setup_teardown(test_limits_per_user, setup, teardown),
        cmocka_unit_test_setup_teardown(test_refresh_raises_limit_for_waiters, setup, teardown),
        cmocka_unit_test_setup_teardown(test_cleanup_stale, setup, teardown),
        cmocka_unit_test_setup_teardown(test_cleanup_uses_user_idle_timeout, setup, teardown),
        cmocka_unit_test_setup_teardown(test_close_user_and_all, setup, teardown),
        cmocka_unit_test_setup_teardown(test_drain, setup, teardown),
        cmocka_unit_test_setup_teardown(test_idle_leases, setup, teardown),
        cmocka_unit_test_setup_teardown(test_closed_hook, setup, teardown),
        cmocka_unit_test_setup_teardown(test_stats, setup, teardown),
        cmocka_unit_test_setup_teardown(test_user_entries_freed, setup_unbounded, teardown),
        cmocka_unit_test_setup_teardown(test_gate_bounds_handshakes_in_order, setup_gate2,
                                        teardown),
        cmocka_unit_test_setup_teardown(test_gate_deadline_while_queued, setup_gate1, teardown),
        cmocka_unit_test_setup_teardown(test_gate_cancel_frees_place, setup_gate1, teardown),
        cmocka_unit_test_setup_teardown(test_gate_per_server, setup_gate2, teardown),
        cmocka_unit_test_setup_teardown(test_gate_full_queue_does_not_spin, setup_gate2_one_channel,
                                        teardown),
        cmocka_unit_test_setup_teardown(test_gate_drain_and_close_drop_queued, setup_gate1,
                                        teardown),
        cmocka_unit_test_setup_teardown(test_release_misuse_is_ignored, setup, teardown),
        cmocka_unit_test_setup_teardown(test_acquire_needs_callback, setup, teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
