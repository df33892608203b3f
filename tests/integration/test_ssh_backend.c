/*
 * The pool with the real SSH backend against a real sshd and upstream: reuse, the per-user
 * limit and queue, failed connects and backoff, isolation between users, stale cleanup, and
 * shutdown waiting for (or forcing) a slow transfer.
 */
#include "itest.h"

#include "moongate/cleanup.h"
#include "moongate/pool.h"
#include "moongate/shutdown.h"
#include "moongate/ssh_backend.h"

#include <signal.h>

typedef struct world {
    mg_test_sshd_t sshd;
    mg_test_upstream_t up;
    uv_loop_t loop;
    mg_settings_t settings;
    mg_ssh_backend_t backend;
    mg_pool_t *pool;
    mg_ssh_conn_opts_t route;
} world_t;

static int group_setup(void **state)
{
    world_t *w = calloc(1, sizeof(*w));
    mg_test_sshd_options_t so = { .log_level = "VERBOSE" };
    if (mg_test_sshd_start(&w->sshd, &so) != 0 || mg_test_upstream_start(&w->up) != 0)
        return -1;
    *state = w;
    return 0;
}

static int group_teardown(void **state)
{
    world_t *w = *state;
    mg_test_upstream_stop(&w->up);
    mg_test_sshd_stop(&w->sshd);
    free(w);
    return 0;
}

/* A fresh loop and pool per test, with test-sized limits. */
static void pool_up(world_t *w, int max_conns, int max_channels, int queue_max)
{
    uv_loop_init(&w->loop);
    mg_settings_init(&w->settings);
    w->settings.max_connections_per_user = max_conns;
    w->settings.max_channels = max_channels;
    w->settings.queue_max = queue_max;
    w->settings.queue_timeout_ms = 3000;
    w->settings.shutdown_grace_ms = 2000;
    mg_ssh_backend_init(&w->backend, &w->loop, &w->settings);
    assert_int_equal(mg_pool_new(&w->loop, &w->settings, &mg_ssh_pool_backend, &w->backend,
                                 &w->pool),
                     0);
    itest_opts(&w->route, &w->sshd);
    w->route.max_channels = max_channels;
}

static bool pool_empty(void *arg)
{
    mg_pool_stats_t st;
    mg_pool_stats(arg, &st);
    return st.total_connections == 0 && st.users == 0;
}

static void pool_down(world_t *w)
{
    mg_pool_close_all(w->pool, true, "test done");
    assert_true(itest_run_until(&w->loop, pool_empty, w->pool, 5000));
    mg_pool_free(w->pool);
    itest_loop_close(&w->loop);
}

/* One request: a lease, a channel, a GET, the response, the lease back. */
typedef struct req {
    world_t *w;
    mg_pool_acquire_t acq;
    mg_pool_conn_t *lease;
    uint64_t conn_id;
    itest_fetch_t f;
    const char *path;
    int acquire_status;
    char acquire_error[256];
    bool failed;
    bool done;
} req_t;

static void req_on_lease(req_t *r)
{
    r->lease = r->acq.conn;
    mg_ssh_conn_t *c = mg_ssh_backend_conn(r->lease);
    r->conn_id = mg_ssh_conn_id(c);
    assert_int_equal(itest_fetch_start(&r->f, c, r->w->up.port, "GET", r->path, 0, false), 0);
}

static void req_acquired(mg_pool_acquire_t *acq, int status)
{
    req_t *r = acq->data;
    r->acquire_status = status;
    if (status != 0) {
        snprintf(r->acquire_error, sizeof(r->acquire_error), "%s", acq->error);
        r->failed = r->done = true;
        return;
    }
    req_on_lease(r);
}

static void req_start(world_t *w, req_t *r, const char *user, const char *path)
{
    memset(r, 0, sizeof(*r));
    r->w = w;
    r->path = path;
    r->acq.data = r;
    int rc = mg_pool_acquire(w->pool, &r->acq, user, &w->route, req_acquired);
    if (rc == 0) {
        req_on_lease(r);
    } else if (rc != MG_EAGAIN) {
        r->acquire_status = rc;
        snprintf(r->acquire_error, sizeof(r->acquire_error), "%s", r->acq.error);
        r->failed = r->done = true;
    }
}

/* Returns the lease once the channel is gone; call from the loop. */
static bool req_finished(void *arg)
{
    req_t *r = arg;
    if (r->done)
        return true;
    if (r->lease && r->f.closed) {
        mg_pool_release(r->w->pool, r->lease);
        r->lease = NULL;
        itest_fetch_free(&r->f);
        r->done = true;
    }
    return r->done;
}

typedef struct reqs {
    req_t *r;
    int n;
} reqs_t;

static bool reqs_finished(void *arg)
{
    reqs_t *rs = arg;
    bool all = true;
    for (int i = 0; i < rs->n; i++)
        all = req_finished(&rs->r[i]) && all;
    return all;
}

static void test_second_request_reuses_connection(void **state)
{
    world_t *w = *state;
    pool_up(w, 3, 10, 10);
    req_t a, b;
    req_start(w, &a, "alice", "/hello");
    assert_true(itest_run_until(&w->loop, req_finished, &a, 10000));
    assert_false(a.failed);
    assert_int_equal(a.f.resp.status, 200);
    req_start(w, &b, "alice", "/hello");
    /* A ready connection with a free slot serves at once. */
    assert_non_null(b.lease);
    assert_true(itest_run_until(&w->loop, req_finished, &b, 10000));
    assert_int_equal(b.f.resp.status, 200);
    assert_int_equal(a.conn_id, b.conn_id);

    mg_pool_user_stats_t us;
    assert_int_equal(mg_pool_user_stats(w->pool, "alice", &us), 0);
    assert_int_equal(us.connections, 1);
    assert_int_equal(us.leases, 0);
    pool_down(w);
}

/*
 * A burst of 6 slow requests for a user limited to 2 connections of 2 channels: exactly 2
 * connections open, 4 requests run, 2 wait and then run when slots free up.
 */
static void test_limit_burst_and_queue(void **state)
{
    world_t *w = *state;
    pool_up(w, 2, 2, 10);
    static req_t r[6];
    for (int i = 0; i < 6; i++)
        req_start(w, &r[i], "alice", "/stream?chunks=3&interval_ms=100");
    mg_pool_stats_t st;
    mg_pool_stats(w->pool, &st);
    assert_int_equal(st.total_connections, 2);
    assert_int_equal(st.waiters, 6);

    itest_run_for(&w->loop, 150);
    mg_pool_stats(w->pool, &st);
    assert_int_equal(st.total_connections, 2);
    assert_int_equal(st.leases, 4);
    assert_int_equal(st.waiters, 2);

    reqs_t rs = { r, 6 };
    assert_true(itest_run_until(&w->loop, reqs_finished, &rs, 15000));
    for (int i = 0; i < 6; i++) {
        assert_false(r[i].failed);
        assert_int_equal(r[i].f.resp.status, 200);
        assert_true(r[i].f.resp.complete);
        assert_int_equal(r[i].f.resp.chunks, 3);
    }
    mg_pool_stats(w->pool, &st);
    assert_int_equal(st.total_connections, 2);
    pool_down(w);
}

/* At the limit with no room to wait: the documented message, with the user's number. */
static void test_limit_message_when_queue_full(void **state)
{
    world_t *w = *state;
    pool_up(w, 1, 1, 0);
    req_t a, b;
    req_start(w, &a, "alice", "/stream?chunks=3&interval_ms=100");
    itest_run_for(&w->loop, 100);
    req_start(w, &b, "alice", "/hello");
    assert_true(b.failed);
    assert_int_equal(b.acquire_status, MG_EQUEUEFULL);
    assert_string_equal(b.acquire_error,
                        "Connection limit exceeded. Maximum 1 concurrent connections allowed.");
    assert_true(itest_run_until(&w->loop, req_finished, &a, 10000));
    assert_false(a.failed);
    pool_down(w);
}

/* Users never share a connection. */
static void test_users_isolated(void **state)
{
    world_t *w = *state;
    pool_up(w, 3, 10, 10);
    req_t a, b;
    req_start(w, &a, "alice", "/hello");
    req_start(w, &b, "bob", "/hello");
    assert_true(itest_run_until(&w->loop, req_finished, &a, 10000));
    assert_true(itest_run_until(&w->loop, req_finished, &b, 10000));
    assert_int_not_equal(a.conn_id, b.conn_id);
    mg_pool_stats_t st;
    mg_pool_stats(w->pool, &st);
    assert_int_equal(st.users, 2);
    assert_int_equal(st.total_connections, 2);

    req_t bad;
    req_start(w, &bad, "not a valid id!", "/hello");
    assert_int_equal(bad.acquire_status, MG_EINVAL);
    pool_down(w);
}

/* A connect that fails fails the waiters with the real reason, then backs off. */
static void test_failed_connect_and_backoff(void **state)
{
    world_t *w = *state;
    pool_up(w, 3, 10, 10);
    uint16_t closed_port;
    assert_int_equal(mg_test_free_port(&closed_port), 0);
    w->route.port = closed_port;
    req_t a, b;
    req_start(w, &a, "carol", "/hello");
    assert_true(itest_run_until(&w->loop, req_finished, &a, 10000));
    assert_true(a.failed);
    assert_int_equal(a.acquire_status, MG_ECONNECT);
    assert_non_null(strstr(a.acquire_error, "connection refused"));

    req_start(w, &b, "carol", "/hello");
    assert_true(b.failed);
    assert_int_equal(b.acquire_status, MG_EBACKOFF);
    assert_non_null(strstr(b.acquire_error, "connection refused"));

    /* Another user is not held back by carol's failure. */
    itest_opts(&w->route, &w->sshd);
    req_t c;
    req_start(w, &c, "dave", "/hello");
    assert_true(itest_run_until(&w->loop, req_finished, &c, 10000));
    assert_false(c.failed);
    pool_down(w);
}

/* A wrong host key reaches the waiter as the reason, not as a generic failure. */
static void test_host_key_failure_reaches_waiter(void **state)
{
    world_t *w = *state;
    pool_up(w, 3, 10, 10);
    w->route.known_hosts = w->sshd.known_hosts_wrong;
    req_t a;
    req_start(w, &a, "erin", "/hello");
    assert_true(itest_run_until(&w->loop, req_finished, &a, 10000));
    assert_int_equal(a.acquire_status, MG_EHOSTKEY);
    assert_non_null(strstr(a.acquire_error, "SHA256:"));
    pool_down(w);
}

static bool no_connections(void *arg)
{
    mg_pool_stats_t st;
    mg_pool_stats(arg, &st);
    return st.total_connections == 0;
}

/* cleanup closes a connection idle past the limit, and the sshd side sees it go. */
static void test_cleanup_closes_idle_connection(void **state)
{
    world_t *w = *state;
    pool_up(w, 3, 10, 10);
    req_t a;
    req_start(w, &a, "alice", "/hello");
    assert_true(itest_run_until(&w->loop, req_finished, &a, 10000));
    size_t procs_with_conn = mg_test_sshd_count_processes(&w->sshd);

    /* Not idle long enough yet. */
    assert_int_equal(mg_pool_cleanup_stale(w->pool, 60000), 0);

    mg_cleanup_t *cl;
    assert_int_equal(mg_cleanup_new(&w->loop, w->pool, &w->settings, &cl), 0);
    assert_int_equal(mg_cleanup_configure(cl, 100, 200), 0);
    mg_cleanup_start(cl);
    assert_true(itest_run_until(&w->loop, no_connections, w->pool, 5000));
    mg_cleanup_stats_t cs;
    mg_cleanup_stats(cl, &cs);
    assert_true(cs.running);
    assert_int_equal(cs.total_cleaned, 1);
    assert_true(cs.runs >= 1);
    mg_cleanup_stop(cl);
    mg_cleanup_free(cl);

    /* sshd's per-connection process exits once the session is gone. */
    bool gone = false;
    for (int i = 0; i < 100 && !gone; i++) {
        itest_run_for(&w->loop, 20);
        gone = mg_test_sshd_count_processes(&w->sshd) < procs_with_conn;
    }
    assert_true(gone);
    pool_down(w);
}

typedef struct shut {
    bool done;
    mg_shutdown_result_t result;
} shut_t;

static void on_shutdown(mg_shutdown_t *s, const mg_shutdown_result_t *result)
{
    shut_t *sh = s->data;
    sh->result = *result;
    sh->done = true;
}

typedef struct shut_wait {
    shut_t *sh;
    req_t *r;
} shut_wait_t;

static bool shut_and_req_done(void *arg)
{
    shut_wait_t *sw = arg;
    bool rd = req_finished(sw->r);
    return sw->sh->done && rd;
}

/* Shutdown waits for a slow transfer in flight, then disconnects; new requests are refused. */
static void test_shutdown_waits_for_slow_transfer(void **state)
{
    world_t *w = *state;
    pool_up(w, 3, 10, 10);
    req_t a;
    req_start(w, &a, "alice", "/stream?chunks=10&interval_ms=100&size=64");
    itest_run_for(&w->loop, 200);
    assert_non_null(a.lease);
    assert_false(a.f.closed);

    shut_t sh = { 0 };
    mg_shutdown_t s = { .data = &sh };
    mg_shutdown_opts_t o;
    mg_shutdown_opts_init(&o, &w->settings);
    o.grace_ms = 5000;
    o.reason = "moongate shutting down";
    assert_int_equal(mg_shutdown_start(&s, &w->loop, w->pool, &o, on_shutdown), 0);

    req_t late;
    req_start(w, &late, "alice", "/hello");
    assert_int_equal(late.acquire_status, MG_ESHUTDOWN);

    shut_wait_t sw = { &sh, &a };
    assert_true(itest_run_until(&w->loop, shut_and_req_done, &sw, 10000));
    assert_true(a.f.resp.complete);
    assert_int_equal(a.f.resp.chunks, 10);
    assert_true(sh.result.success);
    assert_false(sh.result.forced);
    assert_int_equal(sh.result.connections_closed, 1);
    assert_true(sh.result.duration_ms >= 700);

    assert_true(itest_file_contains(w->sshd.log, "moongate shutting down"));
    mg_pool_free(w->pool);
    itest_loop_close(&w->loop);
}

/* A transfer longer than the grace period is cut, and the result says so. */
static void test_shutdown_forces_after_grace(void **state)
{
    world_t *w = *state;
    pool_up(w, 3, 10, 10);
    req_t a;
    req_start(w, &a, "alice", "/stream?chunks=100&interval_ms=100");
    itest_run_for(&w->loop, 200);
    assert_non_null(a.lease);

    shut_t sh = { 0 };
    mg_shutdown_t s = { .data = &sh };
    mg_shutdown_opts_t o;
    mg_shutdown_opts_init(&o, &w->settings);
    o.grace_ms = 300;
    o.force_after_grace = true;
    assert_int_equal(mg_shutdown_start(&s, &w->loop, w->pool, &o, on_shutdown), 0);
    shut_wait_t sw = { &sh, &a };
    assert_true(itest_run_until(&w->loop, shut_and_req_done, &sw, 10000));
    assert_false(a.f.resp.complete);
    assert_int_equal(a.f.close_status, MG_ECLOSED);
    assert_false(sh.result.success);
    assert_true(sh.result.forced);
    assert_true(sh.result.errors > 0);
    assert_true(sh.result.duration_ms < 3000);
    mg_pool_free(w->pool);
    itest_loop_close(&w->loop);
}

int main(void)
{
    signal(SIGPIPE, SIG_IGN);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_second_request_reuses_connection),
        cmocka_unit_test(test_limit_burst_and_queue),
        cmocka_unit_test(test_limit_message_when_queue_full),
        cmocka_unit_test(test_users_isolated),
        cmocka_unit_test(test_failed_connect_and_backoff),
        cmocka_unit_test(test_host_key_failure_reaches_waiter),
        cmocka_unit_test(test_cleanup_closes_idle_connection),
        cmocka_unit_test(test_shutdown_waits_for_slow_transfer),
        cmocka_unit_test(test_shutdown_forces_after_grace),
    };
    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
