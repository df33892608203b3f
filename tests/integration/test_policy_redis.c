/*
 * The policy engine with its dictionary in a real Redis (redis-server on loopback): a hook that
 * touches mg.dict waits without blocking the loop and is resumed with the answer; the wait
 * counts against the hook's budget; a hook that fails after waiting fails as any other; the
 * contexts that cannot wait say so; a request's hooks share one table even while other requests
 * wait between them; a call still waiting when the policy is freed or reloaded finishes.
 */
#include "test_policy_util.h"
#include "redis.h"

#include <signal.h>

static mg_test_redis_t redis;
static char redis_url[128];
static uint32_t hook_timeout = 50, redis_timeout = 20;

static void with_redis(mg_policy_options_t *o)
{
    o->redis_url = redis_url;
    o->hook_timeout_ms = hook_timeout;
    o->redis_timeout_ms = redis_timeout;
}

static int group_setup(void **state)
{
    (void)state;
    if (mg_test_redis_start(&redis, NULL) != 0)
        return -1;
    snprintf(redis_url, sizeof(redis_url), "redis://127.0.0.1:%u/2", (unsigned)redis.port);
    return 0;
}

static int group_teardown(void **state)
{
    (void)state;
    mg_test_redis_stop(&redis);
    tp_cleanup_dir();
    mg_test_cleanup_all();
    return 0;
}

static int setup(void **state)
{
    hook_timeout = 50;
    redis_timeout = 20;
    return tp_setup(state);
}

static mg_policy_t *connected_policy(const char *name, const char *src)
{
    mg_policy_t *p = tp_policy_opts(tp_write(name, src), with_redis);
    mg_redis_stats_t rs = { 0 };
    for (int i = 0; i < 200 && !rs.up; i++) {
        tp_run_for(5);
        assert_true(mg_policy_redis_stats(p, &rs));
    }
    assert_true(rs.up);
    return p;
}

typedef struct waiter {
    int calls, rc;
} waiter_t;

static void on_done(void *ctx, int rc)
{
    waiter_t *w = ctx;
    w->calls++;
    w->rc = rc;
}

static void wait_for(waiter_t *w, int calls)
{
    for (int i = 0; i < 400 && w->calls < calls; i++)
        tp_run_for(5);
    assert_int_equal(w->calls, calls);
}

static const char counting[] =
    "local mg = require 'moongate'\n"
    "local seen = mg.dict.get('at-load')\n"
    "return {\n"
    "  authenticate = function(req)\n"
    "    local n = mg.dict.incr('auth', 1)\n"
    "    req.note = 'n' .. n\n"
    "    return 'u' .. n\n"
    "  end,\n"
    "  admit = function(req, user)\n"
    "    local v, err = mg.dict.get('auth')\n"
    "    if req.note == nil then return false, 500, 'lost the request table' end\n"
    "    mg.dict.set('note:' .. user, req.note)\n"
    "    return v ~= nil, 403, err\n"
    "  end,\n"
    "  limits = function(user)\n"
    "    local v, err = mg.dict.get('x')\n"
    "    mg.dict.set('limits-said', err or 'no error')\n"
    "    return nil\n"
    "  end,\n"
    "  on_event = function(ev) mg.dict.incr('events', 1) end,\n"
    "}\n";

static void test_hooks_wait_and_resume(void **state)
{
    (void)state;
    char out[256];
    mg_test_redis_cmd(&redis, out, sizeof(out), "-n", "2", "flushdb", NULL);
    tp_capture_begin();
    mg_policy_t *p = connected_policy("counting.lua", counting);

    /* Two requests at once: each authenticate waits; each admit sees its own table. */
    mg_policy_state_t *st = mg_policy_acquire(p);
    tp_req_t r1, r2;
    tp_request(&r1, NULL);
    tp_request(&r2, NULL);
    r1.req.seq = 101;
    r2.req.seq = 102;
    mg_policy_decision_t d1, d2;
    waiter_t w1 = { 0 }, w2 = { 0 };
    assert_int_equal(mg_policy_authenticate_wait(st, &r1.req, &d1, on_done, &w1), MG_EAGAIN);
    assert_int_equal(mg_policy_authenticate_wait(st, &r2.req, &d2, on_done, &w2), MG_EAGAIN);
    assert_int_equal(w1.calls + w2.calls, 0);
    wait_for(&w1, 1);
    wait_for(&w2, 1);
    assert_int_equal(w1.rc, 0);
    assert_true(d1.allow && d2.allow);
    assert_string_equal(d1.user, "u1");
    assert_string_equal(d2.user, "u2");
    char u1[MG_USER_ID_MAX + 1], u2[MG_USER_ID_MAX + 1];
    snprintf(u1, sizeof(u1), "%s", d1.user);
    snprintf(u2, sizeof(u2), "%s", d2.user);
    /* admit of the second request first: the tables are per request, not the last one. */
    assert_int_equal(mg_policy_admit_wait(st, &r2.req, u2, &d2, on_done, &w2), MG_EAGAIN);
    assert_int_equal(mg_policy_admit_wait(st, &r1.req, u1, &d1, on_done, &w1), MG_EAGAIN);
    wait_for(&w2, 2);
    wait_for(&w1, 2);
    assert_int_equal(w1.rc, 0);
    assert_int_equal(w2.rc, 0);
    assert_true(d1.allow && d2.allow);
    tp_run_for(20);
    mg_test_redis_cmd(&redis, out, sizeof(out), "-n", "2", "get", "moongate:note:u1", NULL);
    assert_string_equal(out, "s:n1");
    mg_test_redis_cmd(&redis, out, sizeof(out), "-n", "2", "get", "moongate:note:u2", NULL);
    assert_string_equal(out, "s:n2");
    mg_test_redis_cmd(&redis, out, sizeof(out), "-n", "2", "get", "moongate:auth", NULL);
    assert_string_equal(out, "2");

    /* The synchronous form cannot wait: the dictionary says so, and the hook decides. */
    mg_policy_decision_t d;
    assert_int_equal(mg_policy_admit(st, &r1.req, u1, &d), 0);
    assert_false(d.allow);
    assert_non_null(strstr(d.message, "cannot wait for it"));

    /* limits cannot wait either; on_event can, with nobody waiting for it. */
    mg_pool_limits_t lim;
    mg_policy_limits(p, "u1", &lim);
    mg_policy_event_t ev = { .type = "request", .user = "u1" };
    assert_int_equal(mg_policy_event(p, &ev), 0);
    assert_int_equal(mg_policy_event(p, &ev), 0);
    tp_run_for(30);
    mg_test_redis_cmd(&redis, out, sizeof(out), "-n", "2", "get", "moongate:events", NULL);
    assert_string_equal(out, "2");
    mg_policy_state_t *st2 = mg_policy_acquire(p);
    mg_policy_release(st2);
    mg_policy_release(st);
    tp_free(p);
    /* Nothing waited past the Redis timeout. */
    char *log = tp_capture_end();
    assert_int_equal(tp_count(log, "slow"), 0);
    free(log);
}

static void test_main_chunk_and_limits_cannot_wait(void **state)
{
    (void)state;
    tp_capture_begin();
    mg_policy_t *p = tp_policy_opts(tp_write("load.lua",
        "local mg = require 'moongate'\n"
        "local v, err = mg.dict.set('k', 1)\n"
        "assert(v == nil and err:find('main chunk cannot wait', 1, true), err)\n"
        "assert(mg.node_dict.set('k', 1))\n"
        "assert(mg.node_dict.get('k') == 1)\n"
        "return { authenticate = function() return 'a' end }\n"), with_redis);
    char *log = tp_capture_end();
    free(log);
    tp_free(p);
}

/* Redis frozen: the wait ends at the Redis timeout, or at the hook's budget if that is first. */
static void test_wait_is_bounded(void **state)
{
    (void)state;
    static const char src[] =
        "local mg = require 'moongate'\n"
        "return {\n"
        "  authenticate = function(req)\n"
        "    local v, err = mg.dict.get('k')\n"
        "    if err then return nil, 503, err end\n"
        "    return 'a'\n"
        "  end,\n"
        "  admit = function(req, user)\n"
        "    mg.dict.get('k')\n"
        "    error('after the wait')\n"
        "  end,\n"
        "}\n";
    mg_policy_t *p = connected_policy("frozen.lua", src);
    mg_policy_state_t *st = mg_policy_acquire(p);
    tp_req_t r;
    tp_request(&r, NULL);
    mg_policy_decision_t d;
    waiter_t w = { 0 };

    assert_int_equal(mg_test_proc_kill(&redis.proc, SIGSTOP), 0);
    uint64_t t0 = uv_hrtime();
    tp_capture_begin();
    assert_int_equal(mg_policy_authenticate_wait(st, &r.req, &d, on_done, &w), MG_EAGAIN);
    wait_for(&w, 1);
    double ms = (double)(uv_hrtime() - t0) / 1e6;
    assert_int_equal(w.rc, 0);
    assert_false(d.allow);
    assert_int_equal(d.status, 503);
    assert_string_equal(d.message, "redis unavailable: no answer within 20 ms");
    assert_true(ms >= 19 && ms < 45);

    /* A hook that throws after waiting: its traceback names the line. */
    assert_int_equal(mg_policy_admit_wait(st, &r.req, "a", &d, on_done, &w), MG_EAGAIN);
    wait_for(&w, 2);
    char *log = tp_capture_end();
    assert_int_equal(w.rc, MG_EINVAL);
    assert_int_equal(d.status, 500);
    assert_non_null(strstr(log, "frozen.lua:10: after the wait"));
    assert_int_equal(tp_count(log, "slow: no answer within 20 ms"), 1);
    free(log);
    mg_policy_release(st);
    tp_free(p);

    /* With a Redis timeout past the budget, the budget ends the wait: the hook fails. */
    hook_timeout = 30;
    redis_timeout = 5000;
    assert_int_equal(mg_test_proc_kill(&redis.proc, SIGCONT), 0);
    p = connected_policy("frozen2.lua", src);
    st = mg_policy_acquire(p);
    assert_int_equal(mg_test_proc_kill(&redis.proc, SIGSTOP), 0);
    w = (waiter_t){ 0 };
    t0 = uv_hrtime();
    tp_capture_begin();
    assert_int_equal(mg_policy_authenticate_wait(st, &r.req, &d, on_done, &w), MG_EAGAIN);
    wait_for(&w, 1);
    ms = (double)(uv_hrtime() - t0) / 1e6;
    log = tp_capture_end();
    assert_int_equal(w.rc, MG_ETIMEDOUT);
    assert_int_equal(d.status, 500);
    assert_true(ms >= 29 && ms < 60);
    assert_non_null(strstr(log, "time budget of 30 ms exceeded waiting for redis"));
    assert_int_equal(tp_count(log, "slow: no answer within 30 ms"), 1);
    free(log);

    /* Freed while a call waits: the call hears the connection close and finishes. */
    w = (waiter_t){ 0 };
    assert_int_equal(mg_policy_authenticate_wait(st, &r.req, &d, on_done, &w), MG_EAGAIN);
    mg_policy_release(st);
    tp_capture_begin();
    tp_free(p);
    log = tp_capture_end();
    free(log);
    assert_int_equal(w.calls, 1);
    assert_int_equal(w.rc, 0);
    assert_int_equal(d.status, 503);
    assert_non_null(strstr(d.message, "redis unavailable"));
    assert_int_equal(mg_test_proc_kill(&redis.proc, SIGCONT), 0);
}

/* A reload while a call waits: the call finishes on the state it started on. */
static void test_reload_while_waiting(void **state)
{
    (void)state;
    const char *path = tp_write("reload.lua",
        "local mg = require 'moongate'\n"
        "return { authenticate = function() mg.dict.incr('r', 1) return 'old' end }\n");
    mg_policy_t *p = tp_policy_opts(path, with_redis);
    tp_run_for(50);
    mg_policy_state_t *st = mg_policy_acquire(p);
    tp_req_t r;
    tp_request(&r, NULL);
    mg_policy_decision_t d;
    waiter_t w = { 0 };
    assert_int_equal(mg_policy_authenticate_wait(st, &r.req, &d, on_done, &w), MG_EAGAIN);
    mg_policy_release(st); /* the waiting call holds its own reference */
    tp_write("reload.lua", "return { authenticate = function() return 'new' end }\n");
    char err[256];
    assert_int_equal(mg_policy_reload(p, err, sizeof(err)), 0);
    wait_for(&w, 1);
    assert_int_equal(w.rc, 0);
    assert_string_equal(d.user, "old");
    tp_free(p);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_hooks_wait_and_resume, setup, tp_teardown),
        cmocka_unit_test_setup_teardown(test_main_chunk_and_limits_cannot_wait, setup,
                                        tp_teardown),
        cmocka_unit_test_setup_teardown(test_wait_is_bounded, setup, tp_teardown),
        cmocka_unit_test_setup_teardown(test_reload_while_waiting, setup, tp_teardown),
    };
    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
