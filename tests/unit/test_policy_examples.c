/*
 * Tests of the example policies in examples/policies/, each loaded as an operator would.
 */
#include "test_policy_util.h"

#define EXAMPLE(name) MG_SOURCE_DIR "/examples/policies/" name

static mg_policy_t *example(const char *path)
{
    mg_policy_t *p = tp_policy(path);
    mg_policy_set_clock(p, tp_clock, NULL);
    return p;
}

static void test_static_tokens(void **state)
{
    mg_policy_t *p = example(EXAMPLE("static_tokens.lua"));
    mg_policy_decision_t d;
    assert_int_equal(tp_auth(p, "alice-token-change-me", &d), 0);
    assert_true(d.allow);
    assert_string_equal(d.user, "alice");
    assert_int_equal(tp_auth(p, "bob-token-change-me", &d), 0);
    assert_string_equal(d.user, "bob");
    assert_int_equal(tp_auth(p, "alice-token-change-m", &d), 0);
    assert_false(d.allow);
    assert_int_equal(d.status, 401);
    assert_non_null(tp_header(&d, "www-authenticate"));
    assert_int_equal(tp_auth(p, NULL, &d), 0);
    assert_int_equal(d.status, 401);
    tp_free(p);
}

static void test_jwt(void **state)
{
    const char *secret = "0123456789abcdef0123456789abcdef";
    setenv("MOONGATE_JWT_SECRET", secret, 1);
    setenv("MOONGATE_JWT_ISSUER", "webapp", 1);
    mg_policy_t *p = example(EXAMPLE("jwt.lua"));
    char payload[256], tok[4096];
    long now = (long)(tp_clock_ms / 1000);
    mg_policy_decision_t d;

    snprintf(payload, sizeof(payload), "{\"sub\":\"alice\",\"iss\":\"webapp\",\"exp\":%ld}", now + 300);
    make_jwt("{\"alg\":\"HS256\",\"typ\":\"JWT\"}", payload, secret, tok);
    assert_int_equal(tp_auth(p, tok, &d), 0);
    assert_true(d.allow);
    assert_string_equal(d.user, "alice");

    snprintf(payload, sizeof(payload), "{\"sub\":\"alice\",\"iss\":\"webapp\",\"exp\":%ld}", now - 60);
    make_jwt("{\"alg\":\"HS256\"}", payload, secret, tok);
    assert_int_equal(tp_auth(p, tok, &d), 0);
    assert_false(d.allow);
    assert_string_equal(d.message, "invalid token: expired");

    snprintf(payload, sizeof(payload), "{\"sub\":\"alice\",\"iss\":\"evil\",\"exp\":%ld}", now + 300);
    make_jwt("{\"alg\":\"HS256\"}", payload, secret, tok);
    assert_int_equal(tp_auth(p, tok, &d), 0);
    assert_string_equal(d.message, "invalid token: wrong issuer");

    make_jwt("{\"alg\":\"HS256\"}", "{\"sub\":\"alice\",\"iss\":\"webapp\"}", secret, tok);
    assert_int_equal(tp_auth(p, tok, &d), 0);
    assert_string_equal(d.message, "invalid token: no exp");

    snprintf(payload, sizeof(payload), "{\"sub\":\"alice\",\"iss\":\"webapp\",\"exp\":%ld}", now + 300);
    make_jwt("{\"alg\":\"HS256\"}", payload, "another-secret-another-secret-xx", tok);
    assert_int_equal(tp_auth(p, tok, &d), 0);
    assert_string_equal(d.message, "invalid token: bad signature");
    tp_free(p);

    /* Without a secret the policy does not load. */
    unsetenv("MOONGATE_JWT_SECRET");
    unsetenv("MOONGATE_JWT_ISSUER");
    mg_policy_options_t o;
    mg_policy_options_init(&o, NULL);
    o.path = EXAMPLE("jwt.lua");
    o.lua_dir = MG_SOURCE_DIR "/lua";
    char err[512];
    assert_int_equal(mg_policy_new(&tp_loop, &o, &p, err, sizeof(err)), MG_ECONFIG);
    assert_non_null(strstr(err, "MOONGATE_JWT_SECRET must be set"));
}

/* Admits user n times at the current clock; returns how many were admitted. */
static int admit_n(mg_policy_t *p, const char *user, int n, mg_policy_decision_t *last)
{
    int ok = 0;
    for (int i = 0; i < n; i++) {
        assert_int_equal(tp_admit(p, user, last), 0);
        ok += last->allow;
    }
    return ok;
}

static void test_rate_limit(void **state)
{
    setenv("MOONGATE_TOKENS", "alice:ta,bob:tb", 1);
    mg_policy_t *p = example(EXAMPLE("rate_limit.lua"));
    unsetenv("MOONGATE_TOKENS");
    mg_policy_decision_t d;
    assert_int_equal(tp_auth(p, "ta", &d), 0);
    assert_string_equal(d.user, "alice");

    assert_int_equal(admit_n(p, "alice", 100, &d), 100);
    assert_int_equal(admit_n(p, "alice", 1, &d), 0);
    assert_int_equal(d.status, 429);
    assert_string_equal(d.message, "rate limit: 100 requests per minute");
    assert_string_equal(tp_header(&d, "retry-after"), "1");
    assert_int_equal(admit_n(p, "bob", 1, &d), 1);

    /* The limit holds across a reload: the buckets are in the dictionary. */
    assert_int_equal(mg_policy_reload(p, NULL, 0), 0);
    assert_int_equal(admit_n(p, "alice", 1, &d), 0);

    /* 30 s later, 50 more; a minute later, a full bucket. */
    tp_clock_ms += 30000;
    assert_int_equal(admit_n(p, "alice", 60, &d), 50);
    assert_string_equal(tp_header(&d, "retry-after"), "1");
    tp_clock_ms += 600000;
    assert_int_equal(admit_n(p, "alice", 120, &d), 100);
    tp_free(p);
}

static void test_tiers(void **state)
{
    setenv("MOONGATE_TOKENS", "alice:ta", 1);
    setenv("MOONGATE_TIERS", "alice:premium,carol:enterprise", 1);
    mg_policy_t *p = example(EXAMPLE("tiers.lua"));
    unsetenv("MOONGATE_TOKENS");
    unsetenv("MOONGATE_TIERS");
    mg_pool_limits_t l;
    assert_int_equal(mg_policy_limits(p, "bob", &l), 0);
    assert_int_equal(l.max_connections, 1);
    assert_int_equal(mg_policy_limits(p, "alice", &l), 0);
    assert_int_equal(l.max_connections, 3);
    assert_int_equal(mg_policy_limits(p, "carol", &l), 0);
    assert_int_equal(l.max_connections, 10);
    assert_int_equal(l.max_channels, 10);

    mg_policy_decision_t d;
    assert_int_equal(admit_n(p, "bob", 70, &d), 60);
    assert_int_equal(d.status, 429);
    assert_string_equal(d.message, "free plan: 60 requests per minute");
    assert_string_equal(tp_header(&d, "retry-after"), "1");
    assert_int_equal(admit_n(p, "alice", 310, &d), 300);
    assert_string_equal(d.message, "premium plan: 300 requests per minute");
    assert_int_equal(admit_n(p, "carol", 1010, &d), 1000);
    tp_clock_ms += 60000;
    assert_int_equal(admit_n(p, "bob", 61, &d), 60);
    tp_free(p);

    setenv("MOONGATE_TIERS", "alice:gold", 1);
    mg_policy_options_t o;
    mg_policy_options_init(&o, NULL);
    o.path = EXAMPLE("tiers.lua");
    o.lua_dir = MG_SOURCE_DIR "/lua";
    char err[512];
    assert_int_equal(mg_policy_new(&tp_loop, &o, &p, err, sizeof(err)), MG_ECONFIG);
    unsetenv("MOONGATE_TIERS");
    assert_non_null(strstr(err, "MOONGATE_TIERS: bad entry 'alice:gold'"));
}

static bool pool_draining;

static void fake_pool_stats(void *ctx, mg_pool_stats_t *out)
{
    memset(out, 0, sizeof(*out));
    out->draining = pool_draining;
}

static void test_maintenance(void **state)
{
    mg_policy_t *p = example(EXAMPLE("maintenance.lua"));
    mg_policy_set_stats_fn(p, NULL, fake_pool_stats, NULL);
    mg_policy_decision_t d;
    assert_int_equal(admit_n(p, "alice", 1, &d), 1);

    /* The pool draining is enough. */
    pool_draining = true;
    assert_int_equal(admit_n(p, "alice", 1, &d), 0);
    pool_draining = false;
    assert_int_equal(admit_n(p, "alice", 1, &d), 1);

    mg_policy_shutdown_t sd;
    mg_policy_shutdown_info_t info = { "SIGTERM", 4, 2 };
    assert_int_equal(mg_policy_shutdown(p, &info, &sd), 0);
    assert_int_equal(sd.grace_ms, 120000);
    assert_true(sd.notify_clients);
    assert_true(sd.force_after_grace);
    assert_string_equal(sd.message, "moongate is going down for maintenance; retry in a few minutes");

    assert_int_equal(admit_n(p, "alice", 1, &d), 0);
    assert_int_equal(d.status, 503);
    assert_string_equal(tp_header(&d, "retry-after"), "300");

    /* Still draining after a reload. */
    assert_int_equal(mg_policy_reload(p, NULL, 0), 0);
    assert_int_equal(admit_n(p, "alice", 1, &d), 0);
    assert_int_equal(d.status, 503);
    tp_free(p);

    setenv("MOONGATE_MAINTENANCE", "1", 1);
    p = example(EXAMPLE("maintenance.lua"));
    unsetenv("MOONGATE_MAINTENANCE");
    assert_int_equal(admit_n(p, "alice", 1, &d), 0);
    assert_int_equal(d.status, 503);
    tp_free(p);
}

int main(void)
{
    mg_log_set_level(MG_LOG_ERROR);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_static_tokens, tp_setup, tp_teardown),
        cmocka_unit_test_setup_teardown(test_jwt, tp_setup, tp_teardown),
        cmocka_unit_test_setup_teardown(test_rate_limit, tp_setup, tp_teardown),
        cmocka_unit_test_setup_teardown(test_tiers, tp_setup, tp_teardown),
        cmocka_unit_test_setup_teardown(test_maintenance, tp_setup, tp_teardown),
    };
    int rc = cmocka_run_group_tests(tests, NULL, NULL);
    tp_cleanup_dir();
    return rc;
}
