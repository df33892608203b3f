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

/* ---- LLM servers (docs/llm.md) ---- */

static void route_of(mg_policy_t *p, const char *user, mg_policy_route_t *route,
                     mg_policy_decision_t *d)
{
    tp_req_t r;
    mg_policy_state_t *st = mg_policy_acquire(p);
    assert_int_equal(mg_policy_route(st, tp_request(&r, NULL), user, route, d), 0);
    mg_policy_release(st);
}

/* The value route sets for name, "" for a removal, NULL when it has no rule. */
static const char *rule(const mg_policy_route_t *route, const char *name, char *buf, size_t cap)
{
    for (int i = 0; i < route->nrules; i++) {
        const mg_policy_header_rule_t *k = &route->rules[i];
        if (k->name_len == strlen(name) && memcmp(route->rule_buf + k->name_off, name,
                                                  k->name_len) == 0) {
            snprintf(buf, cap, "%.*s", (int)k->value_len, route->rule_buf + k->value_off);
            return buf;
        }
    }
    return NULL;
}

static void test_ollama(void **state)
{
    setenv("MOONGATE_SSH_HOST", "198.51.100.4", 1);
    mg_policy_t *p = example(EXAMPLE("ollama.lua"));
    unsetenv("MOONGATE_SSH_HOST");
    mg_policy_route_t route;
    mg_policy_decision_t d;
    char v[64];
    route_of(p, "alice", &route, &d);
    assert_true(d.allow);
    assert_string_equal(route.host, "198.51.100.4"); /* the default route's connection */
    assert_int_equal(route.target_port, 11434);
    assert_string_equal(route.host_header, "localhost:11434");
    assert_string_equal(rule(&route, "origin", v, sizeof(v)), "");
    assert_string_equal(rule(&route, "referer", v, sizeof(v)), "");
    assert_null(rule(&route, "authorization", v, sizeof(v)));
    assert_false(route.forward_credential);
    assert_int_equal(route.head_timeout_ms, 600000);
    assert_int_equal(route.error_format, MG_ERROR_FORMAT_PLAIN);
    tp_free(p);
}

static void test_llamacpp(void **state)
{
    setenv("LLAMACPP_API_KEY", "sk-local", 1);
    mg_policy_t *p = example(EXAMPLE("llamacpp.lua"));
    unsetenv("LLAMACPP_API_KEY");
    mg_policy_route_t route;
    mg_policy_decision_t d;
    char v[64];
    route_of(p, "alice", &route, &d);
    assert_int_equal(route.target_port, 8080);
    assert_string_equal(rule(&route, "authorization", v, sizeof(v)), "Bearer sk-local");
    assert_string_equal(rule(&route, "origin", v, sizeof(v)), "");
    tp_free(p);
}

static void test_vllm(void **state)
{
    setenv("VLLM_KEYS", "alice:k-alice,bob:k-bob", 1);
    mg_policy_t *p = example(EXAMPLE("vllm.lua"));
    unsetenv("VLLM_KEYS");
    mg_policy_route_t route;
    mg_policy_decision_t d;
    char v[64];
    route_of(p, "bob", &route, &d);
    assert_true(d.allow);
    assert_int_equal(route.target_port, 8000);
    assert_string_equal(rule(&route, "authorization", v, sizeof(v)), "Bearer k-bob");
    assert_int_equal(route.error_format, MG_ERROR_FORMAT_OPENAI);
    route_of(p, "carol", &route, &d);
    assert_false(d.allow);
    assert_int_equal(d.status, 503);
    assert_string_equal(d.message, "no vLLM key for this user");
    tp_free(p);
}

static int in_flight;

static int fake_user_stats(void *ctx, const char *user, mg_pool_user_stats_t *out)
{
    memset(out, 0, sizeof(*out));
    out->leases = in_flight;
    return 0;
}

static void used(mg_policy_t *p, const char *user, int64_t prompt, int64_t completion)
{
    mg_policy_request_info_t info = { .method = "POST", .path = "/api/chat", .status = 200,
                                      .ttfb_ms = 5, .duration_ms = 50, .model = "llama3",
                                      .prompt_tokens = prompt, .completion_tokens = completion };
    mg_policy_event_t ev = { .type = "request", .user = user, .request = &info };
    assert_int_equal(mg_policy_event(p, &ev), 0);
}

static void test_token_quota(void **state)
{
    uint64_t clock_was = tp_clock_ms;
    tp_clock_ms = 1700000000000ull; /* 22:13:20 UTC, 6400 s before midnight */
    setenv("MOONGATE_TOKENS", "alice:ta,bob:tb", 1);
    setenv("MOONGATE_DAILY_TOKENS", "1000", 1);
    setenv("MOONGATE_MAX_CONCURRENT", "2", 1);
    mg_policy_t *p = example(EXAMPLE("token_quota.lua"));
    unsetenv("MOONGATE_TOKENS");
    unsetenv("MOONGATE_DAILY_TOKENS");
    unsetenv("MOONGATE_MAX_CONCURRENT");
    mg_policy_set_stats_fn(p, fake_user_stats, NULL, NULL);
    mg_policy_decision_t d;
    assert_int_equal(admit_n(p, "alice", 1, &d), 1);

    used(p, "alice", 400, 500);
    assert_int_equal(admit_n(p, "alice", 1, &d), 1); /* 900 of 1000 */
    used(p, "alice", 60, 40);                         /* 1000: used up */
    assert_int_equal(admit_n(p, "alice", 1, &d), 0);
    assert_int_equal(d.status, 429);
    assert_string_equal(d.message, "daily token quota of 1000 used up");
    assert_string_equal(tp_header(&d, "retry-after"), "6400");
    /* A request without usage changes nothing; bob has his own count. */
    used(p, "bob", -1, -1);
    assert_int_equal(admit_n(p, "bob", 1, &d), 1);
    /* The count survives a reload. */
    setenv("MOONGATE_TOKENS", "alice:ta,bob:tb", 1);
    setenv("MOONGATE_DAILY_TOKENS", "1000", 1);
    assert_int_equal(mg_policy_reload(p, NULL, 0), 0);
    unsetenv("MOONGATE_TOKENS");
    unsetenv("MOONGATE_DAILY_TOKENS");
    assert_int_equal(admit_n(p, "alice", 1, &d), 0);
    /* The next day starts afresh. */
    tp_clock_ms += 6400 * 1000;
    assert_int_equal(admit_n(p, "alice", 1, &d), 1);
    tp_clock_ms -= 6400 * 1000;

    /* The concurrency cap (4 by default after the reload without the variable). */
    in_flight = 4;
    assert_int_equal(admit_n(p, "bob", 1, &d), 0);
    assert_int_equal(d.status, 429);
    assert_string_equal(d.message, "at most 4 requests at once");
    assert_string_equal(tp_header(&d, "retry-after"), "1");
    in_flight = 3;
    assert_int_equal(admit_n(p, "bob", 1, &d), 1);
    in_flight = 0;
    tp_free(p);
    tp_clock_ms = clock_was;
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
        cmocka_unit_test_setup_teardown(test_ollama, tp_setup, tp_teardown),
        cmocka_unit_test_setup_teardown(test_llamacpp, tp_setup, tp_teardown),
        cmocka_unit_test_setup_teardown(test_vllm, tp_setup, tp_teardown),
        cmocka_unit_test_setup_teardown(test_token_quota, tp_setup, tp_teardown),
    };
    int rc = cmocka_run_group_tests(tests, NULL, NULL);
    tp_cleanup_dir();
    return rc;
}
