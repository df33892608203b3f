/*
 * The policy engine with its dictionary in a real Redis (redis-server on loopback): a hook that
 * touches mg.dict waits without blocking the loop and is resumed with the answer; the wait
 * counts against the hook's budget; a hook that fails after waiting fails as any other; the
 * contexts that cannot wait say so; a request's hooks share one table even while other requests
 * wait between them; a call still waiting when the policy is freed or reloaded finishes.
 * Over TLS (rediss://, a client certificate): it works with the right CA and names what is
 * wrong otherwise (an untrusted server, another address than the certificate's, no client
 * certificate), and TLS settings that do not fit are refused at start. A hostile "Redis" (a
 * raw socket) that breaks the protocol or sends an endless answer loses its connection; the
 * calls waiting fail with a message and the policy keeps running.
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

/* One authenticate on p's current state, waited for to the end: its code (the hook's, once
   it answered). *waited says whether it had to wait (for Redis). */
static int authenticate_waited(mg_policy_t *p, mg_policy_decision_t *d, bool *waited)
{
    mg_policy_state_t *st = mg_policy_acquire(p);
    tp_req_t r;
    tp_request(&r, NULL);
    waiter_t w = { 0 };
    int rc = mg_policy_authenticate_wait(st, &r.req, d, on_done, &w);
    *waited = rc == MG_EAGAIN;
    if (*waited) {
        wait_for(&w, 1);
        rc = w.rc;
    }
    mg_policy_release(st);
    return rc;
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
    assert_int_equal(tp_count(log, "slow"), 0); /* the hook's budget ran out, not Redis's */
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

/* Inside a function that C calls back (a gsub replacement, a sort comparator) a coroutine
   cannot yield: the dictionary says so at once, and nothing is left waiting for its answer
   (ASan would see a call freed before the answer comes). */
static void test_cannot_wait_inside_c_callbacks(void **state)
{
    (void)state;
    static const char src[] =
        "local mg = require 'moongate'\n"
        "return {\n"
        "  authenticate = function()\n"
        "    local said\n"
        "    ('a'):gsub('.', function() local _, err = mg.dict.get('k'); said = err end)\n"
        "    local ok = pcall(table.sort, { 2, 1 }, function(a, b)\n"
        "      local _, err = mg.dict.get('k'); said = said .. ' | ' .. err; return a < b end)\n"
        "    return nil, 503, said\n"
        "  end,\n"
        "  admit = function(req, user)\n"
        "    local v, err = mg.dict.get('k')\n"
        "    return err == nil, 503, err\n"
        "  end,\n"
        "}\n";
    mg_policy_t *p = connected_policy("callback.lua", src);
    mg_policy_state_t *st = mg_policy_acquire(p);
    tp_req_t r;
    tp_request(&r, NULL);
    mg_policy_decision_t d;
    waiter_t w = { 0 };
    assert_int_equal(mg_policy_authenticate_wait(st, &r.req, &d, on_done, &w), 0);
    assert_false(d.allow);
    assert_non_null(strstr(d.message, "cannot be waited for inside a function called by C"));
    assert_non_null(strstr(d.message, " | "));
    /* The pooled coroutine that ran it serves the next call, which waits as it should. */
    tp_run_for(30);
    assert_int_equal(mg_policy_admit_wait(st, &r.req, "a", &d, on_done, &w), MG_EAGAIN);
    wait_for(&w, 1);
    assert_true(d.allow);
    mg_policy_release(st);
    tp_free(p);
}

/* The scripts run by SHA-1: after a SCRIPT FLUSH the call that meets NOSCRIPT fails, the
   connection is made again with the scripts loaded, and the next call works. */
static void test_script_flush(void **state)
{
    (void)state;
    static const char src[] =
        "local mg = require 'moongate'\n"
        "return { authenticate = function()\n"
        "  local n, err = mg.dict.incr('flush', 1)\n"
        "  if not n then return nil, 503, err end\n"
        "  return 'u' .. n\n"
        "end }\n";
    char out[256];
    mg_test_redis_cmd(&redis, out, sizeof(out), "-n", "2", "del", "moongate:flush", NULL);
    tp_capture_begin();
    mg_policy_t *p = connected_policy("flush.lua", src);
    mg_policy_decision_t d;
    bool waited;
    const char *want[] = { "u1", NULL, "u2" };
    for (int i = 0; i < 3; i++) {
        if (i == 1)
            assert_int_equal(mg_test_redis_cmd(&redis, out, sizeof(out), "script", "flush", NULL),
                             0);
        if (i == 2)
            tp_run_for(300); /* the reconnect's backoff starts at 100 ms */
        authenticate_waited(p, &d, &waited);
        assert_true(waited);
        if (want[i] != NULL) {
            assert_true(d.allow);
            assert_string_equal(d.user, want[i]);
        } else {
            assert_false(d.allow);
            assert_non_null(strstr(d.message, "NOSCRIPT"));
        }
    }
    tp_free(p);
    char *log = tp_capture_end();
    assert_int_equal(tp_count(log, "its scripts were flushed (SCRIPT FLUSH); loading them again"),
                     1);
    assert_int_equal(tp_count(log, "connected again"), 1);
    free(log);
}

/* The ACL user of docs/scale-out.md may do everything the dictionary does, and no more. */
static void test_acl_user_of_the_docs(void **state)
{
    (void)state;
    mg_test_redis_t acl;
    assert_int_equal(mg_test_redis_start_acl(&acl, "moongate on >pw ~moongate:* +@read +@write "
                                                   "+evalsha +script|load +ping +select"), 0);
    snprintf(redis_url, sizeof(redis_url), "redis://moongate:pw@127.0.0.1:%u/2",
             (unsigned)acl.port);
    static const char src[] =
        "local mg = require 'moongate'\n"
        "local bucket = require('moongate.token_bucket').new{ limit = 2, per = 60 }\n"
        "return { authenticate = function()\n"
        "  local function must(v, err) if err then error(err) end return v end\n"
        "  must(mg.dict.set('s', 'text', 60))\n"
        "  if must(mg.dict.get('s')) ~= 'text' then error('get') end\n"
        "  if must(mg.dict.incr('n', 2, 60)) ~= 2 then error('incr') end\n"
        "  if (must(mg.dict.ttl('n')) or 0) <= 0 then error('ttl') end\n"
        "  must(mg.dict.delete('s'))\n"
        "  if bucket:take('alice') then return 'alice' end\n"
        "  return nil, 429, 'rate limit'\n"
        "end }\n";
    mg_policy_t *p = connected_policy("acl.lua", src);
    mg_policy_decision_t d;
    bool waited;
    for (int i = 0; i < 3; i++) {
        mg_test_redis_cmd(&acl, (char[64]){ 0 }, 64, "-n", "2", "del", "moongate:n", NULL);
        assert_int_equal(authenticate_waited(p, &d, &waited), 0);
        assert_true(waited);
        assert_int_equal(d.allow, i < 2); /* the third is over the bucket's 2 */
    }
    tp_free(p);
    mg_test_redis_stop(&acl);
    snprintf(redis_url, sizeof(redis_url), "redis://127.0.0.1:%u/2", (unsigned)redis.port);
}

/* ---- a hostile server ---- */

static void test_hostile_server(void **state)
{
    (void)state;
    static const struct {
        const char *answer;
        size_t len;
        const char *says;
    } cases[] = {
        { "?what\r\n", 7, "protocol error" },
        /* A bulk string of 2 MB (its body is made below). */
        { "$2000000\r\n", 10, "an answer over 1 MiB" },
        /* An answer to a question never asked, after the one asked. */
        { "$1\r\n5\r\n$1\r\n6\r\n", 14, "an answer to no question" },
        /* An array of a million elements: refused at its header. */
        { "*1000000\r\n", 10, "protocol error: an array of 1000000 elements" },
        /* An array of 16 bulk strings of 100 KB (made below): the reader takes the elements in
           one by one, so only counting the bytes since the last answer stops it. */
        { "*16\r\n", 5, "an answer over 1 MiB" },
        /* An array header claiming two billion elements (hiredis would allocate 16 GB for
           their pointers at once): found by fuzz_redis_answer. */
        { "*2111111111\r\n:1\r\n", 17, "protocol error: an array of 2111111111 elements" },
    };
    static const char src[] =
        "local mg = require 'moongate'\n"
        "return { authenticate = function()\n"
        "  local v, err = mg.dict.get('k')\n"
        "  if err then return nil, 503, err end\n"
        "  return 'a'\n"
        "end }\n";
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        mg_test_fake_redis_t f = { .answer = cases[i].answer, .answer_len = cases[i].len };
        char *payload = NULL;
        if (i == 1) {
            payload = malloc(10 + 2000000);
            assert_non_null(payload);
            memcpy(payload, cases[i].answer, 10);
            memset(payload + 10, 'x', 2000000);
            f.answer = payload;
            f.answer_len = 10 + 2000000;
        }
        if (i == 4) {
            static const char bulk[] = "$100000\r\n";
            size_t one = sizeof(bulk) - 1 + 100000 + 2, n = 5 + 16 * one;
            payload = malloc(n);
            assert_non_null(payload);
            memcpy(payload, cases[i].answer, 5);
            for (size_t k = 5; k < n; k += one) {
                memcpy(payload + k, bulk, sizeof(bulk) - 1);
                memset(payload + k + sizeof(bulk) - 1, 'x', 100000);
                memcpy(payload + k + one - 2, "\r\n", 2);
            }
            f.answer = payload;
            f.answer_len = n;
        }
        assert_int_equal(mg_test_fake_redis_start(&f), 0);
        snprintf(redis_url, sizeof(redis_url), "redis://127.0.0.1:%u", (unsigned)f.port);
        tp_capture_begin();
        mg_policy_t *p = connected_policy("hostile.lua", src);
        mg_policy_decision_t d;
        bool waited;
        authenticate_waited(p, &d, &waited);
        assert_true(waited);
        tp_run_for(100);
        tp_free(p);
        char *log = tp_capture_end();
        mg_test_fake_redis_stop(&f);
        free(payload);
        if (strstr(log, cases[i].says) == NULL)
            fail_msg("case %zu: the log does not say \"%s\":\n%s", i, cases[i].says, log);
        free(log);
        if (i != 2) {
            /* The call that waited hears the connection close. */
            assert_false(d.allow);
            assert_int_equal(d.status, 503);
            assert_non_null(strstr(d.message, "redis unavailable"));
        } else {
            assert_true(d.allow); /* its own answer came first */
        }
    }
    snprintf(redis_url, sizeof(redis_url), "redis://127.0.0.1:%u/2", (unsigned)redis.port);
}

/* ---- TLS ---- */

static mg_test_redis_t tls_redis;
static char tls_url[128];
static const char *tls_ca, *tls_cert, *tls_key;

static void with_tls(mg_policy_options_t *o)
{
    o->redis_url = tls_url;
    o->redis_ca_file = tls_ca;
    o->redis_cert_file = tls_cert;
    o->redis_key_file = tls_key;
}

static const char tls_src[] =
    "local mg = require 'moongate'\n"
    "return { authenticate = function()\n"
    "  local n, err = mg.dict.incr('tls', 1)\n"
    "  if not n then return nil, 503, err end\n"
    "  return 'u' .. n\n"
    "end }\n";

/* One authenticate through a policy with the TLS settings above: its decision and the log. */
static char *tls_try(mg_policy_decision_t *d)
{
    tp_capture_begin();
    mg_policy_t *p = tp_policy_opts(tp_write("tls.lua", tls_src), with_tls);
    mg_redis_stats_t rs = { 0 };
    for (int i = 0; i < 100 && !rs.up; i++) {
        tp_run_for(5);
        mg_policy_redis_stats(p, &rs);
    }
    bool waited;
    authenticate_waited(p, d, &waited);
    tp_free(p);
    return tp_capture_end();
}

static void test_tls(void **state)
{
    (void)state;
    int rc = mg_test_redis_start_tls(&tls_redis, NULL, true);
    assert_int_equal(rc, 0);
    unsigned port = tls_redis.port;
    mg_policy_decision_t d;

    /* The CA that signed the server's certificate, and a client certificate it signed. */
    snprintf(tls_url, sizeof(tls_url), "rediss://127.0.0.1:%u", port);
    tls_ca = tls_redis.ca;
    tls_cert = tls_redis.client_cert;
    tls_key = tls_redis.client_key;
    char *log = tls_try(&d);
    assert_non_null(strstr(log, "rediss://127.0.0.1:"));
    assert_non_null(strstr(log, "connected; the shared dictionary is cluster-wide"));
    free(log);
    assert_true(d.allow);
    assert_string_equal(d.user, "u1");
    char out[64];
    assert_int_equal(mg_test_redis_cmd(&tls_redis, out, sizeof(out), "get", "moongate:tls",
                                       NULL), 0);
    assert_string_equal(out, "1");

    /* A CA that did not sign it: the server is not trusted, and every call fails at once. */
    tls_ca = tls_redis.other_ca;
    log = tls_try(&d);
    assert_non_null(strstr(log, "cannot connect (TLS: the server's certificate is not trusted"));
    assert_int_equal(tp_count(log, "cannot connect"), 1);
    free(log);
    assert_false(d.allow);
    assert_int_equal(d.status, 503);
    assert_non_null(strstr(d.message, "redis unavailable: not connected"));

    /* The right CA, but an address the certificate does not name. */
    tls_ca = tls_redis.ca;
    snprintf(tls_url, sizeof(tls_url), "rediss://127.0.0.2:%u", port);
    log = tls_try(&d);
    assert_non_null(strstr(log, "not trusted: IP address mismatch"));
    free(log);
    assert_false(d.allow);

    /* No client certificate where Redis asks for one. In TLS 1.3 the client's handshake is
       over before the server judges its certificate: Redis says no (an alert, or a reset when
       our PING is still unread there), and the log says what to set. */
    snprintf(tls_url, sizeof(tls_url), "rediss://127.0.0.1:%u", port);
    tls_cert = tls_key = NULL;
    log = tls_try(&d);
    assert_non_null(strstr(log, "cannot connect ("));
    assert_non_null(strstr(log, "Redis may want a client certificate (tls-auth-clients): set "
                                "MOONGATE_REDIS_CERT and MOONGATE_REDIS_KEY"));
    assert_int_equal(tp_count(log, "connected;"), 0);
    free(log);
    assert_false(d.allow);

    /* Settings that do not fit are refused at start, each named. */
    static const struct {
        const char *url, *ca, *cert, *key, *says;
    } bad[] = {
        { "redis://127.0.0.1", "/etc/hostname", NULL, NULL, "must then start with rediss://" },
        { "rediss://127.0.0.1", NULL, "/etc/hostname", NULL, "give both or neither" },
        { "rediss://127.0.0.1", "/nonexistent/ca.pem", NULL, NULL, "MOONGATE_REDIS_CA: " },
        { "rediss://127.0.0.1", NULL, "/etc/hostname", "/etc/hostname", "MOONGATE_REDIS_CERT: " },
    };
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        mg_policy_options_t o;
        mg_policy_options_init(&o, NULL);
        o.lua_dir = MG_SOURCE_DIR "/lua";
        o.redis_url = bad[i].url;
        o.redis_ca_file = bad[i].ca;
        o.redis_cert_file = bad[i].cert;
        o.redis_key_file = bad[i].key;
        mg_policy_t *p = NULL;
        char err[512] = "";
        assert_int_equal(mg_policy_new(&tp_loop, &o, &p, err, sizeof(err)), MG_ECONFIG);
        assert_null(p);
        if (strstr(err, bad[i].says) == NULL)
            fail_msg("case %zu: \"%s\" does not say \"%s\"", i, err, bad[i].says);
    }
    mg_test_redis_stop(&tls_redis);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_hooks_wait_and_resume, setup, tp_teardown),
        cmocka_unit_test_setup_teardown(test_main_chunk_and_limits_cannot_wait, setup,
                                        tp_teardown),
        cmocka_unit_test_setup_teardown(test_wait_is_bounded, setup, tp_teardown),
        cmocka_unit_test_setup_teardown(test_reload_while_waiting, setup, tp_teardown),
        cmocka_unit_test_setup_teardown(test_cannot_wait_inside_c_callbacks, setup, tp_teardown),
        cmocka_unit_test_setup_teardown(test_script_flush, setup, tp_teardown),
        cmocka_unit_test_setup_teardown(test_acl_user_of_the_docs, setup, tp_teardown),
        cmocka_unit_test_setup_teardown(test_hostile_server, setup, tp_teardown),
        cmocka_unit_test_setup_teardown(test_tls, setup, tp_teardown),
    };
    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
