/*
 * The shared dictionary in a real Redis (Debian's redis-server, started here on loopback), with
 * two gateway nodes behind a real HAProxy: examples/policies/rate_limit.lua's 100 requests a
 * minute hold in total across both nodes, not per node; token_quota.lua's daily quota likewise;
 * a counter bumped by both nodes at once ends exact. With Redis stopped mid-load the rate limit
 * fails closed as its example says (503 at once, never a stall), and with Redis frozen (SIGSTOP:
 * connected, silent) every call waits at most MOONGATE_REDIS_TIMEOUT; when Redis is back,
 * counting resumes without a restart. AUTH with a password works, and a wrong one is named. A
 * "Redis" that breaks the protocol loses its connection, and the gateway serves on.
 */
#include "gwtest.h"
#include "haproxy.h"
#include "redis.h"

#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <time.h>

typedef struct world {
    mg_test_sshd_t sshd;
    mg_test_upstream_t up;
} world_t;

static int group_setup(void **state)
{
    world_t *w = calloc(1, sizeof(*w));
    if (w == NULL || mg_test_sshd_start(&w->sshd, NULL) != 0 ||
        mg_test_upstream_start(&w->up) != 0)
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
    mg_test_cleanup_all();
    return 0;
}

static void start_redis(mg_test_redis_t *r, const char *password)
{
    int rc = mg_test_redis_start(r, password);
    if (rc != 0)
        fail_msg("redis-server did not start (%d; scripts/install-deps.sh installs it)", rc);
}

/* A node running an example policy from examples/policies, routed to the test's upstream. */
static void start_example(gw_t *g, const world_t *w, const char *example,
                          const mg_test_redis_t *redis, const char *const *more)
{
    gw_prepare(g);
    char path[MG_TEST_PATH_MAX];
    snprintf(path, sizeof(path), "%s/examples/policies/%s", MG_SOURCE_DIR, example);
    char *text = NULL;
    size_t len = 0;
    assert_int_equal(mg_test_read_file(path, &text, &len), 0);
    assert_int_equal(mg_test_write_file(g->policy, text, len, 0600), 0);
    free(text);
    static char e[9][MG_TEST_PATH_MAX + 64];
    snprintf(e[0], sizeof(e[0]), "MOONGATE_SSH_PORT=%u", (unsigned)w->sshd.port);
    snprintf(e[1], sizeof(e[1]), "MOONGATE_SSH_USER=%s", w->sshd.user);
    snprintf(e[2], sizeof(e[2]), "MOONGATE_SSH_KEY=%s", w->sshd.client_key);
    snprintf(e[3], sizeof(e[3]), "MOONGATE_KNOWN_HOSTS=%s", w->sshd.known_hosts);
    snprintf(e[4], sizeof(e[4]), "MOONGATE_TARGET_PORT=%u", (unsigned)w->up.port);
    const char *scheme = redis->tls ? "rediss" : "redis";
    if (redis->password[0])
        snprintf(e[5], sizeof(e[5]), "MOONGATE_REDIS_URL=%s://:%s@127.0.0.1:%u/1", scheme,
                 redis->password, (unsigned)redis->port);
    else
        snprintf(e[5], sizeof(e[5]), "MOONGATE_REDIS_URL=%s://127.0.0.1:%u/1", scheme,
                 (unsigned)redis->port);
    const char *env[20] = { e[0], e[1], e[2], e[3], e[4], e[5], "MOONGATE_SSH_HOST=127.0.0.1",
                            "MOONGATE_TOKENS=alice:alice-token,bob:bob-token" };
    int n = 8;
    if (redis->tls) {
        snprintf(e[6], sizeof(e[6]), "MOONGATE_REDIS_CA=%s", redis->ca);
        snprintf(e[7], sizeof(e[7]), "MOONGATE_REDIS_CERT=%s", redis->client_cert);
        snprintf(e[8], sizeof(e[8]), "MOONGATE_REDIS_KEY=%s", redis->client_key);
        env[n++] = e[6];
        env[n++] = e[7];
        env[n++] = e[8];
    }
    for (int i = 0; more != NULL && more[i] != NULL && n < 19; i++)
        env[n++] = more[i];
    env[n] = NULL;
    gw_launch(g, "127.0.0.1:0", env);
    assert_true(gw_wait_log(g, "connected; the shared dictionary is cluster-wide", 1, 5000));
}

/* ---- many requests at once ---- */

typedef struct load {
    uint16_t port;
    const char *request;
    int per_thread;
    atomic_bool stop;
    atomic_int n200, n429, n503, other;
    atomic_int slowest_ms;
} load_t;

static void *load_thread(void *arg)
{
    load_t *l = arg;
    for (int i = 0; (l->per_thread == 0 || i < l->per_thread) && !atomic_load(&l->stop); i++) {
        mg_test_http_response_t r;
        mg_test_http_response_init(&r);
        double t0 = mg_test_now_ms();
        int rc = gw_exchange(l->port, l->request, strlen(l->request), &r, 10000, NULL);
        int ms = (int)(mg_test_now_ms() - t0);
        int prev = atomic_load(&l->slowest_ms);
        while (ms > prev && !atomic_compare_exchange_weak(&l->slowest_ms, &prev, ms))
            ;
        if (rc == 0 && r.complete && r.status == 200)
            atomic_fetch_add(&l->n200, 1);
        else if (rc == 0 && r.status == 429)
            atomic_fetch_add(&l->n429, 1);
        else if (rc == 0 && r.status == 503)
            atomic_fetch_add(&l->n503, 1);
        else
            atomic_fetch_add(&l->other, 1);
        mg_test_http_response_free(&r);
        if (l->per_thread == 0)
            mg_test_sleep_ms(5);
    }
    return NULL;
}

#define THREADS 4

static void run_load(load_t *l)
{
    pthread_t t[THREADS];
    for (int i = 0; i < THREADS; i++)
        assert_int_equal(pthread_create(&t[i], NULL, load_thread, l), 0);
    for (int i = 0; i < THREADS; i++)
        pthread_join(t[i], NULL);
}

static const char hello_alice[] = "GET /hello HTTP/1.1\r\nHost: gw\r\n" GW_AUTH_ALICE "\r\n";

/* examples/policies/rate_limit.lua, unchanged: 100 a minute per user, whichever node serves;
   Redis over TLS with client certificates (rediss://, MOONGATE_REDIS_CA/CERT/KEY). */
static void test_rate_limit_holds_across_nodes(void **state)
{
    world_t *w = *state;
    mg_test_redis_t redis;
    int rc = mg_test_redis_start_tls(&redis, NULL, true);
    if (rc != 0)
        fail_msg("redis-server with TLS did not start (%d)", rc);
    gw_t nodes[2];
    for (int i = 0; i < 2; i++)
        start_example(&nodes[i], w, "rate_limit.lua", &redis, NULL);
    uint16_t ports[2] = { nodes[0].port, nodes[1].port };
    mg_test_haproxy_t hp;
    if (mg_test_haproxy_start(&hp, ports, 2, false) != 0)
        fail_msg("haproxy did not start (scripts/install-deps.sh installs it)");

    /* 160 requests, 40 per thread, through the balancer to both nodes at once. */
    load_t l = { .port = hp.port, .request = hello_alice, .per_thread = 40 };
    double t0 = mg_test_now_ms();
    run_load(&l);
    double secs = (mg_test_now_ms() - t0) / 1000;
    int n200 = atomic_load(&l.n200), n429 = atomic_load(&l.n429);
    /* The bucket refills at 100/60 a second while the test runs. */
    int refill = (int)(secs * 100 / 60) + 1;
    int served[2] = { gw_log_count(&nodes[0], "GET /hello -> 200"),
                      gw_log_count(&nodes[1], "GET /hello -> 200") };
    print_message("160 requests in %.2f s through 2 nodes: %d served (%d + %d), %d refused "
                  "with 429, %d other\n", secs, n200, served[0], served[1], n429,
                  atomic_load(&l.other));
    assert_int_equal(atomic_load(&l.other) + atomic_load(&l.n503), 0);
    assert_int_equal(n200 + n429, 160);
    if (n200 < 100 || n200 > 100 + refill)
        fail_msg("%d served: the limit of 100 a minute (+%d refilled) did not hold across the "
                 "nodes", n200, refill);
    assert_true(served[0] > 0 && served[1] > 0);
    /* The bucket is one key in Redis, under moongate:. */
    char out[256];
    assert_int_equal(mg_test_redis_cmd(&redis, out, sizeof(out), "-n", "1", "pttl",
                                       "moongate:rl:alice", NULL), 0);
    long pttl = atol(out);
    assert_true(pttl > 50000 && pttl <= 60000);
    /* bob has his own bucket. */
    mg_test_http_response_t r;
    mg_test_http_response_init(&r);
    static const char bob[] = "GET /hello HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer "
                              "bob-token\r\n\r\n";
    assert_int_equal(gw_exchange(hp.port, bob, strlen(bob), &r, 10000, NULL), 0);
    assert_int_equal(r.status, 200);
    mg_test_http_response_free(&r);

    mg_test_haproxy_stop(&hp);
    for (int i = 0; i < 2; i++)
        gw_stop(&nodes[i]);
    mg_test_redis_stop(&redis);
}

/* A counter bumped by every request on two nodes at once ends exact. */
static void test_counter_is_exact_under_concurrency(void **state)
{
    world_t *w = *state;
    mg_test_redis_t redis;
    start_redis(&redis, "s3cret pass");
    char route[2048];
    gw_route_fields(route, sizeof(route), &w->sshd, w->up.port);
    char policy[4096];
    snprintf(policy, sizeof(policy),
             "local mg = require 'moongate'\n"
             "return {\n"
             "  authenticate = function(req) return 'alice' end,\n"
             "  admit = function(req, user)\n"
             "    local n, err = mg.dict.incr('count:' .. user, 1, 600000)\n"
             "    if not n then return false, 503, err end\n"
             "    return true, nil, nil, { ['x-count'] = tostring(n) }\n"
             "  end,\n"
             "  route = function() return { %s } end,\n"
             "}\n", route);
    char url[128];
    snprintf(url, sizeof(url), "MOONGATE_REDIS_URL=redis://:s3cret%%20pass@127.0.0.1:%u",
             (unsigned)redis.port);
    const char *env[] = { url, NULL };
    gw_t nodes[2];
    for (int i = 0; i < 2; i++) {
        gw_start_policy(&nodes[i], policy, 0, env);
        assert_true(gw_wait_log(&nodes[i], "connected; the shared dictionary is cluster-wide", 1,
                                5000));
    }
    /* Two threads per node, 50 requests each. */
    load_t l[2] = { { .port = nodes[0].port, .request = hello_alice, .per_thread = 50 },
                    { .port = nodes[1].port, .request = hello_alice, .per_thread = 50 } };
    pthread_t t[4];
    for (int i = 0; i < 4; i++)
        assert_int_equal(pthread_create(&t[i], NULL, load_thread, &l[i % 2]), 0);
    for (int i = 0; i < 4; i++)
        pthread_join(t[i], NULL);
    assert_int_equal(atomic_load(&l[0].n200) + atomic_load(&l[1].n200), 200);
    char out[64];
    assert_int_equal(mg_test_redis_cmd(&redis, out, sizeof(out), "get", "moongate:count:alice",
                                       NULL), 0);
    assert_string_equal(out, "200");
    assert_int_equal(mg_test_redis_cmd(&redis, out, sizeof(out), "pttl",
                                       "moongate:count:alice", NULL), 0);
    assert_true(atol(out) > 500000);
    for (int i = 0; i < 2; i++)
        gw_stop(&nodes[i]);

    /* A wrong password is named once, and the calls fail at once. */
    snprintf(url, sizeof(url), "MOONGATE_REDIS_URL=redis://:wrong@127.0.0.1:%u",
             (unsigned)redis.port);
    gw_t g;
    gw_start_policy(&g, policy, 0, env);
    assert_true(gw_wait_log(&g, "refused: WRONGPASS", 1, 5000));
    mg_test_http_response_t r;
    mg_test_http_response_init(&r);
    r.keep_body = true;
    int rc = gw_exchange(g.port, hello_alice, strlen(hello_alice), &r, 5000, NULL);
    gw_expect_status(&g, rc, &r, 503, "redis refused us");
    assert_non_null(strstr(r.body, "redis unavailable"));
    mg_test_http_response_free(&r);
    mg_test_sleep_ms(500); /* retries, which say nothing more */
    assert_int_equal(gw_log_count(&g, "refused: WRONGPASS"), 1);
    gw_stop(&g);
    mg_test_redis_stop(&redis);
}

/* examples/policies/token_quota.lua, unchanged: the quota is the users', not the node's. */
static void test_token_quota_holds_across_nodes(void **state)
{
    world_t *w = *state;
    mg_test_redis_t redis;
    start_redis(&redis, NULL);
    const char *more[] = { "MOONGATE_DAILY_TOKENS=20", NULL };
    gw_t nodes[2];
    for (int i = 0; i < 2; i++)
        start_example(&nodes[i], w, "token_quota.lua", &redis, more);
    /* Each chat costs 3 + 5 tokens; alternate the nodes: 8 on node 1, 16 on node 2, 24 on
       node 1. Then both refuse. */
    static const char chat[] =
        "POST /api/chat HTTP/1.1\r\nHost: gw\r\n" GW_AUTH_ALICE
        "Content-Type: application/json\r\nContent-Length: 78\r\n\r\n"
        "{\"model\":\"llama3.1:8b\",\"messages\":[{\"role\":\"user\",\"content\":\"one two three\"}]}";
    for (int i = 0; i < 3; i++) {
        gw_t *g = &nodes[i % 2];
        mg_test_http_response_t r;
        mg_test_http_response_init(&r);
        int rc = gw_exchange(g->port, chat, strlen(chat), &r, 10000, NULL);
        gw_expect_status(g, rc, &r, 200, "under the quota");
        mg_test_http_response_free(&r);
        assert_true(gw_wait_log(g, "completion_tokens=5", i / 2 + 1, 5000));
        /* The count reaches Redis from on_event as the request ends. */
        char want[8], out[64];
        snprintf(want, sizeof(want), "%d", 8 * (i + 1));
        for (int k = 0; k < 100; k++) {
            char day[64];
            snprintf(day, sizeof(day), "moongate:tokens:alice:%ld", (long)(time(NULL) / 86400));
            if (mg_test_redis_cmd(&redis, out, sizeof(out), "-n", "1", "get", day, NULL) == 0 &&
                strcmp(out, want) == 0)
                break;
            mg_test_sleep_ms(20);
        }
        assert_string_equal(out, want);
    }
    for (int i = 0; i < 2; i++) {
        mg_test_http_response_t r;
        mg_test_http_response_init(&r);
        int rc = gw_exchange(nodes[i].port, chat, strlen(chat), &r, 10000, NULL);
        gw_expect_status(&nodes[i], rc, &r, 429, "past the quota, on either node");
        mg_test_http_response_free(&r);
    }
    for (int i = 0; i < 2; i++)
        gw_stop(&nodes[i]);
    mg_test_redis_stop(&redis);
}

/* Redis stopped, frozen and back, under load: the loop keeps serving, counting resumes. */
static void test_redis_down_slow_and_back(void **state)
{
    world_t *w = *state;
    mg_test_redis_t redis;
    start_redis(&redis, NULL);
    gw_t g;
    start_example(&g, w, "rate_limit.lua", &redis, NULL);
    /* /healthz shares the loop: it must stay quick whatever Redis does. */
    load_t l = { .port = g.port, .request = hello_alice };
    pthread_t t[2];
    for (int i = 0; i < 2; i++)
        assert_int_equal(pthread_create(&t[i], NULL, load_thread, &l), 0);
    mg_test_sleep_ms(300);
    int served_before = atomic_load(&l.n200);

    /* Stopped: refused connections; the example fails closed with 503 at once. */
    mg_test_redis_stop(&redis);
    assert_true(gw_wait_log(&g, "connection lost", 1, 5000));
    int n503_before = atomic_load(&l.n503);
    mg_test_sleep_ms(600);
    int n503_down = atomic_load(&l.n503) - n503_before;
    int slowest_down = atomic_load(&l.slowest_ms);

    /* Back (empty): counting resumes, no restart. */
    assert_int_equal(mg_test_redis_restart(&redis), 0);
    assert_true(gw_wait_log(&g, "connected again", 1, 5000));
    int n200_back = atomic_load(&l.n200);
    mg_test_sleep_ms(300);
    assert_true(atomic_load(&l.n200) > n200_back);
    char out[64];
    assert_int_equal(mg_test_redis_cmd(&redis, out, sizeof(out), "-n", "1", "exists",
                                       "moongate:rl:alice", NULL), 0);
    assert_string_equal(out, "1");

    /* Frozen: connected but silent. Each call waits MOONGATE_REDIS_TIMEOUT (20 ms), then the
       example's fallback. */
    atomic_store(&l.slowest_ms, 0);
    assert_int_equal(mg_test_proc_kill(&redis.proc, SIGSTOP), 0);
    n503_before = atomic_load(&l.n503);
    mg_test_sleep_ms(600);
    int n503_frozen = atomic_load(&l.n503) - n503_before;
    int slowest_frozen = atomic_load(&l.slowest_ms);
    double healthz_t0 = mg_test_now_ms();
    assert_int_equal(gw_healthz(&g, 2000), 200);
    double healthz_ms = mg_test_now_ms() - healthz_t0;
    assert_int_equal(mg_test_proc_kill(&redis.proc, SIGCONT), 0);
    assert_true(gw_wait_log(&g, "answering in time again", 1, 5000));

    atomic_store(&l.stop, true);
    for (int i = 0; i < 2; i++)
        pthread_join(t[i], NULL);
    double timeouts = gw_metric(&g, "moongate_redis_failures_total{reason=\"timeout\"}");
    double unavailable = gw_metric(&g, "moongate_redis_failures_total{reason=\"unavailable\"}");
    print_message("served %d before; Redis down: %d answered 503 in 600 ms, slowest %d ms; "
                  "frozen: %d answered 503, slowest %d ms, /healthz %.1f ms; %g timeouts, %g "
                  "failed at once\n", served_before, n503_down, slowest_down, n503_frozen,
                  slowest_frozen, healthz_ms, timeouts, unavailable);
    assert_true(served_before > 5);
    assert_true(n503_down > 5 && n503_frozen > 5);
    assert_true(slowest_down < 500 && slowest_frozen < 500);
    assert_true(healthz_ms < 200);
    assert_true(timeouts >= n503_frozen && unavailable >= n503_down);
    assert_int_equal(atomic_load(&l.other), 0);
    /* One line per change of state, not per request. */
    assert_int_equal(gw_log_count(&g, "connection lost"), 1);
    assert_int_equal(gw_log_count(&g, "slow: no answer within 20 ms"), 1);
    assert_true(gw_log_count(&g, "redis: redis://") <= 6);
    /* The example says it refuses at most every 10 s, not per request (down and frozen are
       both within one 10 s). */
    assert_int_equal(gw_log_count(&g, "rate limiter unavailable (refusing with 503"), 1);
    gw_stop(&g);
    mg_test_redis_stop(&redis);
}

/* A "Redis" that breaks the protocol, through the real gateway: the connection is dropped and
   named, the request that waited gets the example's 503, and the gateway goes on serving. */
static void test_hostile_redis(void **state)
{
    world_t *w = *state;
    static const char garbage[] = "?not a reply\r\n";
    mg_test_fake_redis_t f = { .answer = garbage, .answer_len = sizeof(garbage) - 1 };
    assert_int_equal(mg_test_fake_redis_start(&f), 0);
    mg_test_redis_t fake_addr = { .port = f.port }; /* for start_example's URL */
    gw_t g;
    start_example(&g, w, "rate_limit.lua", &fake_addr, NULL);
    for (int i = 0; i < 2; i++) {
        mg_test_http_response_t r;
        mg_test_http_response_init(&r);
        r.keep_body = true;
        int rc = gw_exchange(g.port, hello_alice, strlen(hello_alice), &r, 10000, NULL);
        gw_expect_status(&g, rc, &r, 503, "the limiter's Redis broke the protocol");
        assert_non_null(strstr(r.body, "rate limiter unavailable"));
        mg_test_http_response_free(&r);
    }
    assert_true(gw_wait_log(&g, "connection lost (protocol error: Protocol error, got \"?\"", 1,
                            5000));
    assert_int_equal(gw_healthz(&g, 2000), 200);
    gw_stop(&g);
    mg_test_fake_redis_stop(&f);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_rate_limit_holds_across_nodes),
        cmocka_unit_test(test_counter_is_exact_under_concurrency),
        cmocka_unit_test(test_token_quota_holds_across_nodes),
        cmocka_unit_test(test_redis_down_slow_and_back),
        cmocka_unit_test(test_hostile_redis),
    };
    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
