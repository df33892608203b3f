/*
 * Unit tests for src/pool/shutdown.c: the drain sequence against a pool with a fake backend, on a
 * real uv loop with short grace periods.
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
#include "moongate/shutdown.h"

#include <stdlib.h>
#include <string.h>

typedef struct fixture {
    uv_loop_t loop;
    mg_settings_t settings;
    fake_backend_t fb;
    mg_pool_t *pool;
    mg_shutdown_t sd;
    int done_calls;
    mg_shutdown_result_t result;
    mg_shutdown_stats_t stats_in_cb;
    bool free_pool_in_cb;
} fixture_t;

typedef struct lease {
    mg_pool_acquire_t req;
    int calls;
    int status;
} lease_t;

static void on_acquire(mg_pool_acquire_t *req, int status)
{
    lease_t *l = req->data;
    l->calls++;
    l->status = status;
}

static void on_done(mg_shutdown_t *s, const mg_shutdown_result_t *r)
{
    fixture_t *f = s->data;
    f->done_calls++;
    f->result = *r;
    mg_shutdown_stats(s, &f->stats_in_cb);
    if (f->free_pool_in_cb) {
        mg_pool_free(f->pool);
        f->pool = NULL;
    }
}

static int setup(void **state)
{
    fixture_t *f = calloc(1, sizeof(*f));
    assert_non_null(f);
    assert_int_equal(uv_loop_init(&f->loop), 0);
    mg_settings_init(&f->settings);
    assert_int_equal(mg_pool_new(&f->loop, &f->settings, &fake_backend_ops, &f->fb, &f->pool), 0);
    f->sd.data = f;
    *state = f;
    return 0;
}

static int teardown(void **state)
{
    fixture_t *f = *state;
    assert_int_equal(f->done_calls, 1); /* every test runs a shutdown to its end */
    if (f->pool != NULL) {
        fake_finish_closing(&f->fb);
        f->fb.close_sync = true;
        mg_pool_close_all(f->pool, true, "teardown");
        mg_pool_free(f->pool);
    }
    uv_run(&f->loop, UV_RUN_DEFAULT);
    assert_int_equal(uv_loop_close(&f->loop), 0);
    free(f);
    return 0;
}

/* Takes a lease for user on a fresh ready connection. */
static void take_lease(fixture_t *f, lease_t *l, const char *user)
{
    memset(l, 0, sizeof(*l));
    l->req.data = l;
    assert_int_equal(mg_pool_acquire(f->pool, &l->req, user, NULL, on_acquire), MG_EAGAIN);
    fake_ready(&f->fb, f->fb.opens - 1);
    tick(&f->loop);
    assert_int_equal(l->calls, 1);
    assert_int_equal(l->status, 0);
}

static mg_shutdown_opts_t opts(uint64_t grace_ms, bool force, uint64_t hard_ms)
{
    mg_shutdown_opts_t o;
    memset(&o, 0, sizeof(o));
    o.grace_ms = grace_ms;
    o.force_after_grace = force;
    o.hard_timeout_ms = hard_ms;
    return o;
}

static void test_opts_from_settings(void **state)
{
    fixture_t *f = *state;
    mg_shutdown_opts_t o;
    mg_shutdown_stats_t st;

    mg_shutdown_opts_init(&o, &f->settings);
    assert_int_equal(o.grace_ms, 30000);
    assert_true(o.force_after_grace);
    assert_int_equal(o.hard_timeout_ms, 0);
    assert_null(o.reason);

    mg_shutdown_stats(&f->sd, &st); /* zeroed: idle */
    assert_false(st.shutting_down);
    assert_false(st.done);
    assert_int_equal(st.since_ms, 0);
    assert_string_equal(st.phase, "idle");

    assert_int_equal(mg_shutdown_start(&f->sd, &f->loop, f->pool, NULL, on_done), MG_EINVAL);
    assert_int_equal(mg_shutdown_start(&f->sd, &f->loop, f->pool, &o, NULL), MG_EINVAL);
    mg_pool_stats_t ps;
    mg_pool_stats(f->pool, &ps);
    assert_false(ps.draining);

    /* An empty pool shuts down at once. */
    o.grace_ms = 1000;
    assert_int_equal(mg_shutdown_start(&f->sd, &f->loop, f->pool, &o, on_done), 0);
    run_ms(&f->loop, 10);
    assert_int_equal(f->done_calls, 1);
    assert_true(f->result.success);
    assert_int_equal(f->result.connections_closed, 0);
}

static void test_idle_pool_closes_and_reports(void **state)
{
    fixture_t *f = *state;
    lease_t a, b, c;
    mg_shutdown_stats_t st;

    take_lease(f, &a, "alice");
    take_lease(f, &b, "bob");
    mg_pool_release(f->pool, a.req.conn);
    mg_pool_release(f->pool, b.req.conn);

    mg_shutdown_opts_t o = opts(1000, true, 0);
    uv_timeval64_t now;
    uv_gettimeofday(&now);
    uint64_t now_ms = (uint64_t)now.tv_sec * 1000 + (uint64_t)now.tv_usec / 1000;
    assert_int_equal(mg_shutdown_start(&f->sd, &f->loop, f->pool, &o, on_done), 0);
    assert_int_equal(mg_shutdown_start(&f->sd, &f->loop, f->pool, &o, on_done), MG_ESTATE);
    mg_shutdown_stats(&f->sd, &st);
    assert_true(st.shutting_down);
    assert_true(st.since_ms >= now_ms && st.since_ms < now_ms + 5000);

    /* Refused at once. */
    memset(&c, 0, sizeof(c));
    c.req.data = &c;
    assert_int_equal(mg_pool_acquire(f->pool, &c.req, "alice", NULL, on_acquire), MG_ESHUTDOWN);
    assert_string_equal(c.req.error, "gateway is shutting down");

    tick(&f->loop);
    assert_int_equal(f->fb.closes, 2); /* the SSH disconnects went out */
    assert_int_equal(f->fb.force_closes, 0);
    assert_string_equal(f->fb.conns[0].close_reason, "gateway is shutting down");
    mg_shutdown_stats(&f->sd, &st);
    assert_string_equal(st.phase, "closing");
    run_ms(&f->loop, 10);
    assert_int_equal(f->done_calls, 0); /* the backend has not reported them closed */

    fake_finish_closing(&f->fb);
    run_ms(&f->loop, 10);
    assert_int_equal(f->done_calls, 1);
    assert_true(f->result.success);
    assert_false(f->result.forced);
    assert_int_equal(f->result.connections_closed, 2);
    assert_int_equal(f->result.errors, 0);
    assert_string_equal(f->result.errors_text, "");
    assert_int_equal(f->result.leases_left, 0);
    assert_int_equal(f->result.connections_left, 0);
    assert_true(f->result.duration_ms >= 10 && f->result.duration_ms < 1000);
    assert_true(f->stats_in_cb.done);
    assert_false(f->stats_in_cb.shutting_down);
    assert_string_equal(f->stats_in_cb.phase, "done");
    /* The pool stays draining. */
    assert_int_equal(mg_pool_acquire(f->pool, &c.req, "alice", NULL, on_acquire), MG_ESHUTDOWN);
}

static void test_waits_for_leases(void **state)
{
    fixture_t *f = *state;
    lease_t a;
    mg_shutdown_stats_t st;

    take_lease(f, &a, "alice");
    f->fb.close_sync = true;
    mg_shutdown_opts_t o = opts(500, true, 0);
    assert_int_equal(mg_shutdown_start(&f->sd, &f->loop, f->pool, &o, on_done), 0);
    run_ms(&f->loop, 50);
    assert_int_equal(f->done_calls, 0);
    assert_int_equal(f->fb.closes, 0); /* not while a request is in flight */
    mg_shutdown_stats(&f->sd, &st);
    assert_true(st.shutting_down);
    assert_string_equal(st.phase, "draining");

    mg_pool_release(f->pool, a.req.conn);
    run_ms(&f->loop, 10);
    assert_int_equal(f->done_calls, 1);
    assert_true(f->result.success);
    assert_int_equal(f->result.connections_closed, 1);
    assert_int_equal(f->fb.force_closes, 0);
    assert_true(f->result.duration_ms >= 50);
}

static void test_forces_after_grace(void **state)
{
    fixture_t *f = *state;
    lease_t a;

    take_lease(f, &a, "alice");
    f->fb.close_sync = true;
    mg_shutdown_opts_t o = opts(100, true, 0);
    o.reason = "maintenance";
    assert_int_equal(mg_shutdown_start(&f->sd, &f->loop, f->pool, &o, on_done), 0);
    run_ms(&f->loop, 30);
    assert_int_equal(f->done_calls, 0);
    assert_int_equal(f->fb.closes, 0);
    run_ms(&f->loop, 120);
    assert_int_equal(f->done_calls, 1);
    assert_false(f->result.success);
    assert_true(f->result.forced);
    assert_int_equal(f->result.errors, 1);
    assert_string_equal(f->result.errors_text,
                        "1 requests still in flight after 100 ms grace; forced");
    assert_int_equal(f->result.leases_left, 1); /* the request still holds its (dead) lease */
    assert_int_equal(f->result.connections_left, 0);
    assert_int_equal(f->result.connections_closed, 1);
    assert_int_equal(f->fb.force_closes, 1);
    assert_string_equal(f->fb.conns[0].close_reason, "maintenance");
    mg_pool_release(f->pool, a.req.conn);
}

static void test_keeps_waiting_without_force(void **state)
{
    fixture_t *f = *state;
    lease_t a;

    take_lease(f, &a, "alice");
    f->fb.close_sync = true;
    mg_shutdown_opts_t o = opts(30, false, 2000);
    assert_int_equal(mg_shutdown_start(&f->sd, &f->loop, f->pool, &o, on_done), 0);
    run_ms(&f->loop, 60);
    assert_int_equal(f->done_calls, 0);
    assert_int_equal(f->fb.closes, 0);
    mg_pool_release(f->pool, a.req.conn);
    run_ms(&f->loop, 10);
    assert_int_equal(f->done_calls, 1);
    assert_false(f->result.success);
    assert_false(f->result.forced);
    assert_int_equal(f->result.errors, 1);
    assert_string_equal(f->result.errors_text,
                        "1 requests still in flight after 30 ms grace; waiting");
    assert_int_equal(f->result.connections_closed, 1);
    assert_int_equal(f->fb.force_closes, 0);
}

static void test_hard_deadline(void **state)
{
    fixture_t *f = *state;
    lease_t a;

    take_lease(f, &a, "alice");
    mg_pool_release(f->pool, a.req.conn);
    /* The backend never reports the connection closed. */
    mg_shutdown_opts_t o = opts(30, true, 200);
    assert_int_equal(mg_shutdown_start(&f->sd, &f->loop, f->pool, &o, on_done), 0);
    run_ms(&f->loop, 60);
    assert_int_equal(f->done_calls, 0);
    run_ms(&f->loop, 200);
    assert_int_equal(f->done_calls, 1);
    assert_false(f->result.success);
    assert_int_equal(f->result.errors, 2);
    assert_string_equal(f->result.errors_text,
                        "1 connections still closing after 30 ms grace; "
                        "gave up after 200 ms: 1 connections still open, 0 requests in flight");
    assert_int_equal(f->result.connections_left, 1);
    assert_int_equal(f->result.connections_closed, 0);
    assert_true(f->result.duration_ms >= 200);
}

static void test_fails_waiters_and_closes_opening(void **state)
{
    fixture_t *f = *state;
    lease_t w;

    memset(&w, 0, sizeof(w));
    w.req.data = &w;
    assert_int_equal(mg_pool_acquire(f->pool, &w.req, "alice", NULL, on_acquire), MG_EAGAIN);
    f->fb.close_sync = true;
    mg_shutdown_opts_t o = opts(1000, true, 0);
    assert_int_equal(mg_shutdown_start(&f->sd, &f->loop, f->pool, &o, on_done), 0);
    run_ms(&f->loop, 10);
    assert_int_equal(w.calls, 1);
    assert_int_equal(w.status, MG_ESHUTDOWN);
    assert_string_equal(w.req.error, "gateway is shutting down");
    assert_int_equal(f->done_calls, 1);
    assert_true(f->result.success);
    assert_int_equal(f->result.connections_closed, 1); /* the one that was opening */
    assert_true(f->fb.conns[0].close_called);
}

static void test_callback_may_free_pool(void **state)
{
    fixture_t *f = *state;
    lease_t a;

    take_lease(f, &a, "alice");
    mg_pool_release(f->pool, a.req.conn);
    f->fb.close_sync = true;
    f->free_pool_in_cb = true;
    mg_shutdown_opts_t o = opts(100, true, 0);
    assert_int_equal(mg_shutdown_start(&f->sd, &f->loop, f->pool, &o, on_done), 0);
    run_ms(&f->loop, 10);
    assert_int_equal(f->done_calls, 1);
    assert_null(f->pool);
    assert_true(f->result.success);
}

int main(void)
{
    mg_log_set_level(MG_LOG_ERROR);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_opts_from_settings, setup, teardown),
        cmocka_unit_test_setup_teardown(test_idle_pool_closes_and_reports, setup, teardown),
        cmocka_unit_test_setup_teardown(test_waits_for_leases, setup, teardown),
        cmocka_unit_test_setup_teardown(test_forces_after_grace, setup, teardown),
        cmocka_unit_test_setup_teardown(test_keeps_waiting_without_force, setup, teardown),
        cmocka_unit_test_setup_teardown(test_hard_deadline, setup, teardown),
        cmocka_unit_test_setup_teardown(test_fails_waiters_and_closes_opening, setup, teardown),
        cmocka_unit_test_setup_teardown(test_callback_may_free_pool, setup, teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
