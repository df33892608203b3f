/*
 * Unit tests for src/pool/cleanup.c: the periodic stale-connection pass, on a real uv loop with a
 * fake backend.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "fake_backend.h"

#include "moongate/cleanup.h"
#include "moongate/error.h"
#include "moongate/log.h"
#include "moongate/pool.h"
#include "moongate/settings.h"

#include <stdlib.h>
#include <string.h>

typedef struct fixture {
    uv_loop_t loop;
    mg_settings_t settings;
    fake_backend_t fb;
    mg_pool_t *pool;
    mg_cleanup_t *cleanup;
} fixture_t;

static void on_acquire(mg_pool_acquire_t *req, int status)
{
    int *calls = req->data;
    (*calls)++;
}

static int setup(void **state)
{
    fixture_t *f = calloc(1, sizeof(*f));
    assert_non_null(f);
    assert_int_equal(uv_loop_init(&f->loop), 0);
    mg_settings_init(&f->settings);
    f->settings.cleanup_interval_ms = 20;
    f->settings.max_idle_ms = 10;
    f->fb.close_sync = true;
    assert_int_equal(mg_pool_new(&f->loop, &f->settings, &fake_backend_ops, &f->fb, &f->pool), 0);
    assert_int_equal(mg_cleanup_new(&f->loop, f->pool, &f->settings, &f->cleanup), 0);
    *state = f;
    return 0;
}

static int teardown(void **state)
{
    fixture_t *f = *state;
    mg_cleanup_free(f->cleanup);
    mg_pool_close_all(f->pool, true, "teardown");
    mg_pool_free(f->pool);
    uv_run(&f->loop, UV_RUN_DEFAULT);
    assert_int_equal(uv_loop_close(&f->loop), 0);
    free(f);
    return 0;
}

/* Opens one ready connection for user and returns its lease to the pool: idle from now. */
static mg_pool_conn_t *idle_conn(fixture_t *f, const char *user)
{
    mg_pool_acquire_t req;
    int calls = 0;
    req.data = &calls;
    assert_int_equal(mg_pool_acquire(f->pool, &req, user, NULL, on_acquire), MG_EAGAIN);
    fake_ready(&f->fb, f->fb.opens - 1);
    tick(&f->loop);
    assert_int_equal(calls, 1);
    assert_int_equal(req.status, 0);
    mg_pool_release(f->pool, req.conn);
    return req.conn;
}

static void test_new_rejects_bad_arguments(void **state)
{
    fixture_t *f = *state;
    mg_cleanup_t *c = NULL;
    mg_settings_t bad = f->settings;
    bad.cleanup_interval_ms = 0;
    assert_int_equal(mg_cleanup_new(&f->loop, f->pool, &bad, &c), MG_EINVAL);
    assert_int_equal(mg_cleanup_new(&f->loop, NULL, &f->settings, &c), MG_EINVAL);
    assert_null(c);
    assert_int_equal(mg_cleanup_configure(f->cleanup, 0, 10), MG_EINVAL);
    assert_int_equal(mg_cleanup_configure(f->cleanup, 10, 0), MG_EINVAL);
}

static void test_defaults_from_settings(void **state)
{
    fixture_t *f = *state;
    mg_settings_t s;
    mg_cleanup_t *c;
    mg_cleanup_stats_t st;

    mg_settings_init(&s);
    assert_int_equal(mg_cleanup_new(&f->loop, f->pool, &s, &c), 0);
    mg_cleanup_stats(c, &st);
    assert_int_equal(st.interval_ms, 30000);
    assert_int_equal(st.max_idle_ms, 300000);
    assert_false(st.running);
    assert_int_equal(st.runs, 0);
    assert_int_equal(st.last_run_ms, 0);
    mg_cleanup_free(c);
}

static void test_trigger_closes_idle_and_counts(void **state)
{
    fixture_t *f = *state;
    mg_cleanup_stats_t st;
    mg_pool_stats_t ps;

    idle_conn(f, "alice");
    idle_conn(f, "bob");
    assert_int_equal(mg_cleanup_trigger(f->cleanup), 0); /* idle 0 ms so far */
    run_ms(&f->loop, 25);

    uv_timeval64_t before;
    uv_gettimeofday(&before);
    assert_int_equal(mg_cleanup_trigger(f->cleanup), 2);
    mg_pool_stats(f->pool, &ps);
    assert_int_equal(ps.total_connections, 0);
    assert_int_equal(f->fb.closes, 2);
    assert_int_equal(f->fb.force_closes, 0);
    assert_string_equal(f->fb.conns[0].close_reason, "idle");

    mg_cleanup_stats(f->cleanup, &st);
    assert_false(st.running); /* a trigger does not start it */
    assert_int_equal(st.runs, 2);
    assert_int_equal(st.total_cleaned, 2);
    assert_int_equal(st.last_cleaned, 2);
    uint64_t before_ms = (uint64_t)before.tv_sec * 1000 + (uint64_t)before.tv_usec / 1000;
    assert_true(st.last_run_ms >= before_ms);
    assert_true(st.last_run_ms < before_ms + 5000);
}

static void test_periodic_runs(void **state)
{
    fixture_t *f = *state;
    mg_cleanup_stats_t st;
    mg_pool_stats_t ps;

    mg_pool_conn_t *sick = idle_conn(f, "alice");
    mg_pool_conn_set_healthy(sick, false);
    idle_conn(f, "bob");

    mg_cleanup_start(f->cleanup);
    mg_cleanup_start(f->cleanup); /* twice is harmless */
    mg_cleanup_stats(f->cleanup, &st);
    assert_true(st.running);
    assert_int_equal(st.runs, 0);

    run_ms(&f->loop, 110);
    mg_cleanup_stats(f->cleanup, &st);
    assert_true(st.runs >= 2); /* 20 ms apart: about 5 */
    assert_true(st.runs <= 6);
    assert_int_equal(st.total_cleaned, 2);
    assert_int_equal(st.last_cleaned, 0); /* the later passes found nothing */
    assert_true(st.last_run_ms > 0);
    assert_int_equal(f->fb.force_closes, 1); /* the unhealthy one */
    mg_pool_stats(f->pool, &ps);
    assert_int_equal(ps.total_connections, 0);

    mg_cleanup_stop(f->cleanup);
    mg_cleanup_stop(f->cleanup);
    uint64_t runs = st.runs;
    run_ms(&f->loop, 50);
    mg_cleanup_stats(f->cleanup, &st);
    assert_false(st.running);
    assert_int_equal(st.runs, runs);
}

static void test_busy_connection_kept(void **state)
{
    fixture_t *f = *state;
    mg_pool_acquire_t req;
    int calls = 0;
    mg_cleanup_stats_t st;

    req.data = &calls;
    assert_int_equal(mg_pool_acquire(f->pool, &req, "alice", NULL, on_acquire), MG_EAGAIN);
    fake_ready(&f->fb, 0);
    tick(&f->loop);
    mg_cleanup_start(f->cleanup);
    run_ms(&f->loop, 50);
    mg_cleanup_stats(f->cleanup, &st);
    assert_true(st.runs >= 1);
    assert_int_equal(st.total_cleaned, 0);
    assert_int_equal(f->fb.closes, 0);
    mg_pool_release(f->pool, req.conn);
}

static void test_configure_while_running(void **state)
{
    fixture_t *f = *state;
    mg_cleanup_stats_t st;

    mg_cleanup_start(f->cleanup);
    assert_int_equal(mg_cleanup_configure(f->cleanup, 1000, 10), 0);
    run_ms(&f->loop, 60); /* the old 20 ms period no longer applies */
    mg_cleanup_stats(f->cleanup, &st);
    assert_int_equal(st.runs, 0);
    assert_int_equal(st.interval_ms, 1000);
    assert_true(st.running);
}

static void test_free_while_running(void **state)
{
    fixture_t *f = *state;
    mg_cleanup_t *c;
    assert_int_equal(mg_cleanup_new(&f->loop, f->pool, &f->settings, &c), 0);
    mg_cleanup_start(c);
    mg_cleanup_free(c); /* the loop frees it; valgrind and ASan check */
    run_ms(&f->loop, 30);
}

int main(void)
{
    mg_log_set_level(MG_LOG_ERROR);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_new_rejects_bad_arguments, setup, teardown),
        cmocka_unit_test_setup_teardown(test_defaults_from_settings, setup, teardown),
        cmocka_unit_test_setup_teardown(test_trigger_closes_idle_and_counts, setup, teardown),
        cmocka_unit_test_setup_teardown(test_periodic_runs, setup, teardown),
        cmocka_unit_test_setup_teardown(test_busy_connection_kept, setup, teardown),
        cmocka_unit_test_setup_teardown(test_configure_while_running, setup, teardown),
        cmocka_unit_test_setup_teardown(test_free_while_running, setup, teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
