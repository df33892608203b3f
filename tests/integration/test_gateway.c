/*
 * The moongate program end to end: a real sshd, a real mg-upstream, the gateway as a child
 * process, and plain sockets as clients. Refusals from the policy, a body both ways, streaming
 * as it happens, 100 MB intact, a client that leaves, an sshd that dies, reloads under load and
 * a broken one, a drain with a stream in flight, malformed input, /metrics and /stats.
 *
 * Every gateway this starts must exit 0 with no sanitizer report in its log (in the sanitizer
 * build that makes this a test of the program under ASan and UBSan).
 */
#include "gwtest.h"

#include <ctype.h>
#include <jansson.h>
#include <pthread.h>
#include <sys/time.h>

typedef struct world {
    mg_test_sshd_t sshd;
    mg_test_upstream_t up;
    gw_t gw;                /* shared by the tests that leave it as they found it */
    uint64_t stats_calls;   /* GET /stats made to mg-upstream */
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
    gw_kill(&w->gw);
    mg_test_upstream_stop(&w->up);
    mg_test_sshd_stop(&w->sshd);
    free(w);
    mg_test_cleanup_all();
    return 0;
}

/* The shared gateway, started by the first test that needs it. */
static gw_t *shared_gw(world_t *w)
{
    if (!w->gw.running)
        gw_start(&w->gw, &w->sshd, w->up.port, NULL);
    gw_assert_alive(&w->gw);
    return &w->gw;
}

/*
 * mg-upstream's stats, with requests_served counting requests from others only: each GET /stats
 * is counted once its answer is out, so it shows up in the next reading.
 */
static void upstream_stats(world_t *w, mg_test_upstream_stats_t *st)
{
    assert_int_equal(mg_test_upstream_stats(&w->up, st), 0);
    st->requests_served -= w->stats_calls;
    w->stats_calls++;
}

static uint64_t upstream_requests(world_t *w)
{
    mg_test_upstream_stats_t st;
    upstream_stats(w, &st);
    return st.requests_served;
}

/* An error response: JSON with "error" and the same request id as the x-request-id header. */
static void check_error_body(const mg_test_http_response_t *r)
{
    const char *rid = mg_test_http_response_header(r, "x-request-id");
    assert_non_null(rid);
    assert_true(strlen(rid) > 0);
    assert_non_null(r->body);
    if (!gw_json_valid(r->body, r->body_len))
        fail_msg("error body is not JSON: %s", r->body);
    char v[256];
    assert_true(gw_json_get_string(r->body, "error", v, sizeof(v)));
    assert_true(strlen(v) > 0);
    assert_true(gw_json_get_string(r->body, "request_id", v, sizeof(v)));
    assert_string_equal(v, rid);
    const char *ct = mg_test_http_response_header(r, "content-type");
    assert_non_null(ct);
    assert_non_null(strstr(ct, "application/json"));
}

/* ---- 1. refusals from the policy ---- */

static void test_policy_refusals(void **state)
{
    world_t *w = *state;
    gw_t *g = shared_gw(w);
    uint64_t before = upstream_requests(w);
    mg_test_http_response_t r;

    int rc = gw_request(g, "GET", "/hello", NULL, NULL, 0, &r, 5000);
    gw_expect_status(g, rc, &r, 401, "no token");
    check_error_body(&r);
    assert_non_null(strstr(r.body, "bad or missing token"));
    mg_test_http_response_free(&r);

    rc = gw_request(g, "GET", "/hello", "Authorization: Bearer nope\r\n", NULL, 0, &r, 5000);
    gw_expect_status(g, rc, &r, 401, "bad token");
    check_error_body(&r);
    mg_test_http_response_free(&r);

    rc = gw_request(g, "GET", "/hello", "Authorization: Bearer limited-token\r\n", NULL, 0, &r,
                    5000);
    gw_expect_status(g, rc, &r, 429, "limited user");
    check_error_body(&r);
    assert_non_null(strstr(r.body, "slow down"));
    const char *ra = mg_test_http_response_header(&r, "retry-after");
    assert_non_null(ra);
    assert_string_equal(ra, "7");
    mg_test_http_response_free(&r);

    /* Nothing refused reached the upstream. */
    assert_int_equal(upstream_requests(w), before);
}

/* ---- 2. a GET, a 1 MB echo, request ids ---- */

static void test_hello_echo_and_request_ids(void **state)
{
    world_t *w = *state;
    gw_t *g = shared_gw(w);
    mg_test_http_response_t r;

    int rc = gw_request(g, "GET", "/hello", GW_AUTH_ALICE, NULL, 0, &r, 10000);
    gw_expect_status(g, rc, &r, 200, "GET /hello");
    assert_string_equal(r.body, "hello\n");
    const char *rid = mg_test_http_response_header(&r, "x-request-id");
    assert_non_null(rid);
    assert_true(strlen(rid) >= 8);
    char first_id[128];
    snprintf(first_id, sizeof(first_id), "%s", rid);
    mg_test_http_response_free(&r);

    /* Generated ids differ between requests. */
    rc = gw_request(g, "GET", "/hello", GW_AUTH_ALICE, NULL, 0, &r, 10000);
    gw_expect_status(g, rc, &r, 200, "GET /hello again");
    assert_non_null(mg_test_http_response_header(&r, "x-request-id"));
    assert_string_not_equal(mg_test_http_response_header(&r, "x-request-id"), first_id);
    mg_test_http_response_free(&r);

    /* A client-supplied id is kept. */
    rc = gw_request(g, "GET", "/hello",
                    GW_AUTH_ALICE "X-Request-Id: client-chose-this-id-42\r\n", NULL, 0, &r,
                    10000);
    gw_expect_status(g, rc, &r, 200, "GET /hello with an id");
    assert_string_equal(mg_test_http_response_header(&r, "x-request-id"),
                        "client-chose-this-id-42");
    mg_test_http_response_free(&r);

    /* 1 MB both ways, byte for byte. */
    size_t n = 1000 * 1000;
    char *body = malloc(n);
    assert_non_null(body);
    mg_test_stream_t s;
    mg_test_stream_init(&s);
    mg_test_stream_fill(&s, body, n);
    char want[65];
    assert_int_equal(mg_test_sha256_hex(body, n, want), 0);
    rc = gw_request(g, "POST", "/echo", GW_AUTH_ALICE, body, n, &r, 30000);
    free(body);
    gw_expect_status(g, rc, &r, 200, "POST /echo 1 MB");
    assert_int_equal(r.body_len, n);
    char got[65];
    assert_int_equal(mg_test_sha256_hex(r.body, r.body_len, got), 0);
    assert_string_equal(got, want);
    mg_test_http_response_free(&r);
}

/* ---- 3. a stream arrives as it is produced ---- */

static void test_stream_arrives_in_pieces(void **state)
{
    world_t *w = *state;
    gw_t *g = shared_gw(w);
    char *req = NULL;
    size_t len = 0;
    assert_int_equal(mg_test_http_request(&req, &len, "GET", "/stream?chunks=10&interval_ms=100",
                                          GW_AUTH_ALICE, NULL, 0),
                     0);
    mg_test_http_response_t r;
    mg_test_http_response_init(&r);
    r.keep_body = true;
    static gw_arrivals_t arr;
    memset(&arr, 0, sizeof(arr));
    int rc = gw_exchange(g->port, req, len, &r, 10000, &arr);
    free(req);
    gw_expect_status(g, rc, &r, 200, "GET /stream");
    g->ok_responses++;
    assert_true(r.chunked);
    /* Ten lines, whatever the framing between the hops. */
    int lines = 0;
    for (size_t i = 0; i < r.body_len; i++)
        lines += r.body[i] == '\n';
    assert_int_equal(lines, 10);

    assert_true(arr.n >= 2);
    double span = arr.t[arr.n - 1] - arr.t[0];
    int moments = 1;
    for (int i = 1, last = 0; i < arr.n; i++)
        if (arr.t[i] - arr.t[last] >= 30) {
            moments++;
            last = i;
        }
    print_message("stream: %d reads with body, %d distinct moments, first to last %.0f ms\n",
                  arr.n, moments, span);
    assert_true(span >= 800);
    assert_true(moments >= 8);
    mg_test_http_response_free(&r);
}

/* ---- 4. 100 MB intact ---- */

static void test_100mb_intact(void **state)
{
    world_t *w = *state;
    gw_t *g = shared_gw(w);
    uint64_t n = 100000000;
    char want[65];
    assert_int_equal(mg_test_stream_sha256_hex(n, want), 0);
    char *req = NULL;
    size_t len = 0;
    assert_int_equal(mg_test_http_request(&req, &len, "GET", "/bytes/100000000", GW_AUTH_ALICE,
                                          NULL, 0),
                     0);
    mg_test_http_response_t r;
    mg_test_http_response_init(&r);
    r.hash_body = true;
    double t0 = mg_test_now_ms();
    int rc = gw_exchange(g->port, req, len, &r, 90000, NULL);
    double ms = mg_test_now_ms() - t0;
    free(req);
    gw_expect_status(g, rc, &r, 200, "GET /bytes/100000000");
    g->ok_responses++;
    print_message("100 MB in %.0f ms (%.0f MB/s)\n", ms, 100000.0 / ms);
    assert_int_equal(r.body_received, n);
    assert_string_equal(r.body_sha256, want);
    mg_test_http_response_free(&r);
}

/* ---- a slow client: the response ends while the channel's reads are paused for it ---- */

static void test_slow_client_then_reuse(void **state)
{
    world_t *w = *state;
    gw_t *g = shared_gw(w);
    for (int round = 0; round < 3; round++) {
        char *req = NULL;
        size_t len = 0;
        assert_int_equal(mg_test_http_request(&req, &len, "GET", "/bytes/4000000", GW_AUTH_ALICE,
                                              NULL, 0),
                         0);
        int fd = gw_connect(g->port, 2000);
        assert_true(fd >= 0);
        assert_int_equal(send(fd, req, len, MSG_NOSIGNAL), (ssize_t)len);
        free(req);
        mg_test_http_response_t r;
        mg_test_http_response_init(&r);
        r.hash_body = true;
        double deadline = mg_test_now_ms() + 30000;
        char buf[16384];
        /* Read slowly, so the gateway holds more than its buffer's high-water mark. */
        mg_test_sleep_ms(300);
        while (!r.complete) {
            assert_int_equal(gw_poll(fd, POLLIN, deadline), 0);
            ssize_t n = recv(fd, buf, sizeof(buf), MSG_DONTWAIT);
            if (n < 0 && errno == EAGAIN)
                continue;
            assert_true(n > 0);
            assert_int_equal(mg_test_http_response_feed(&r, buf, (size_t)n, NULL), 0);
            mg_test_sleep_ms(1);
        }
        close(fd);
        char want[65];
        assert_int_equal(mg_test_stream_sha256_hex(4000000, want), 0);
        assert_string_equal(r.body_sha256, want);
        mg_test_http_response_free(&r);

        /* The next request rides the same (reused) channel and must be answered at once. */
        double t0 = mg_test_now_ms();
        assert_int_equal(gw_request(g, "GET", "/hello", GW_AUTH_ALICE, NULL, 0, &r, 3000), 0);
        assert_int_equal(r.status, 200);
        print_message("round %d: the next request took %.1f ms\n", round,
                      mg_test_now_ms() - t0);
        mg_test_http_response_free(&r);
    }
}

/* ---- 5. the client leaves mid-stream ---- */

static void test_client_leaves_mid_stream(void **state)
{
    world_t *w = *state;
    gw_t *g = shared_gw(w);
    mg_test_upstream_stats_t before, now;
    upstream_stats(w, &before);

    char *req = NULL;
    size_t len = 0;
    assert_int_equal(mg_test_http_request(&req, &len, "GET", "/stream?chunks=100&interval_ms=50",
                                          GW_AUTH_ALICE, NULL, 0),
                     0);
    int fd = gw_connect(g->port, 2000);
    assert_true(fd >= 0);
    assert_int_equal(send(fd, req, len, MSG_NOSIGNAL), (ssize_t)len);
    free(req);
    mg_test_http_response_t r;
    mg_test_http_response_init(&r);
    double deadline = mg_test_now_ms() + 5000;
    char buf[4096];
    while (r.chunks < 3 && !r.complete) {
        assert_int_equal(gw_poll(fd, POLLIN, deadline), 0);
        ssize_t n = recv(fd, buf, sizeof(buf), MSG_DONTWAIT);
        if (n < 0 && errno == EAGAIN)
            continue;
        assert_true(n > 0);
        assert_int_equal(mg_test_http_response_feed(&r, buf, (size_t)n, NULL), 0);
    }
    assert_int_equal(r.status, 200);
    assert_false(r.complete);
    mg_test_http_response_free(&r);
    double t_close = mg_test_now_ms();
    close(fd);

    /* The upstream sees its connection end while the stream is still being produced. */
    bool seen = false;
    while (!seen && mg_test_now_ms() - t_close < 2500) {
        mg_test_sleep_ms(50);
        upstream_stats(w, &now);
        seen = now.aborted_responses > before.aborted_responses;
    }
    print_message("upstream saw the abort after %.0f ms (aborted %llu -> %llu, closed %llu -> "
                  "%llu)\n",
                  mg_test_now_ms() - t_close, (unsigned long long)before.aborted_responses,
                  (unsigned long long)now.aborted_responses,
                  (unsigned long long)before.connections_closed,
                  (unsigned long long)now.connections_closed);
    if (!seen)
        gw_print_log_tail(g, 20);
    assert_true(seen);
    /* The gateway goes on serving. */
    mg_test_http_response_t h;
    int rc = gw_request(g, "GET", "/hello", GW_AUTH_ALICE, NULL, 0, &h, 10000);
    gw_expect_status(g, rc, &h, 200, "GET /hello after the abort");
    mg_test_http_response_free(&h);
}

/* ---- 6. the sshd dies; a new one takes over after a reload ---- */

static void test_sshd_killed_then_replaced(void **state)
{
    world_t *w = *state;
    static mg_test_sshd_t a, b;
    assert_int_equal(mg_test_sshd_start(&a, NULL), 0);
    static gw_t g;
    gw_start(&g, &a, w->up.port, NULL);
    mg_test_http_response_t r;

    int rc = gw_request(&g, "GET", "/hello", GW_AUTH_ALICE, NULL, 0, &r, 10000);
    gw_expect_status(&g, rc, &r, 200, "before the kill");
    mg_test_http_response_free(&r);

    assert_int_equal(mg_test_sshd_kill(&a), 0);
    mg_test_sleep_ms(300);
    rc = gw_request(&g, "GET", "/hello", GW_AUTH_ALICE, NULL, 0, &r, 15000);
    gw_expect_status(&g, rc, &r, 502, "sshd dead");
    check_error_body(&r);
    print_message("with sshd dead: %d %s\n", r.status, r.body);
    mg_test_http_response_free(&r);
    double t_refused = mg_test_now_ms();

    /* A new sshd (new port, new keys): point the policy at it and reload. */
    assert_int_equal(mg_test_sshd_start(&b, NULL), 0);
    int reloads = gw_log_count(&g, "policy reloaded");
    gw_write_policy(g.policy, &b, w->up.port);
    assert_int_equal(mg_test_proc_kill(&g.proc, SIGHUP), 0);
    assert_true(gw_wait_log(&g, "policy reloaded", reloads + 1, 5000));

    /*
     * The failed connect backed the user off for 500 ms (the pool's first step). Past that, the
     * next request dials the new sshd and succeeds.
     */
    double wait = t_refused + 700 - mg_test_now_ms();
    if (wait > 0)
        mg_test_sleep_ms((int)wait);
    rc = gw_request(&g, "GET", "/hello", GW_AUTH_ALICE, NULL, 0, &r, 10000);
    gw_expect_status(&g, rc, &r, 200, "after the reload to a new sshd");
    assert_string_equal(r.body, "hello\n");
    mg_test_http_response_free(&r);

    gw_stop(&g);
    mg_test_sshd_stop(&a);
    mg_test_sshd_stop(&b);
}

/* ---- 7. reloads under load ---- */

typedef struct loader {
    uint16_t port;
    int n;
    int ok, failed;
    int last_rc, last_status;
} loader_t;

static void *loader_run(void *arg)
{
    loader_t *l = arg;
    char *req = NULL;
    size_t len = 0;
    if (mg_test_http_request(&req, &len, "GET", "/hello", GW_AUTH_ALICE, NULL, 0) != 0)
        return NULL;
    for (int i = 0; i < l->n; i++) {
        mg_test_http_response_t r;
        mg_test_http_response_init(&r);
        r.keep_body = true;
        int rc = gw_exchange(l->port, req, len, &r, 10000, NULL);
        if (rc == 0 && r.status == 200 && r.body && strcmp(r.body, "hello\n") == 0) {
            l->ok++;
        } else {
            l->failed++;
            l->last_rc = rc;
            l->last_status = r.status;
        }
        mg_test_http_response_free(&r);
    }
    free(req);
    return NULL;
}

static void test_reload_under_load(void **state)
{
    world_t *w = *state;
    gw_t *g = shared_gw(w);
    int reloads = gw_log_count(g, "policy reloaded");
    enum { THREADS = 4, EACH = 50 };
    loader_t l[THREADS];
    pthread_t t[THREADS];
    for (int i = 0; i < THREADS; i++) {
        l[i] = (loader_t){ .port = g->port, .n = EACH };
        assert_int_equal(pthread_create(&t[i], NULL, loader_run, &l[i]), 0);
    }
    for (int i = 0; i < 5; i++) {
        mg_test_sleep_ms(100);
        assert_int_equal(mg_test_proc_kill(&g->proc, SIGHUP), 0);
    }
    int ok = 0, failed = 0;
    for (int i = 0; i < THREADS; i++) {
        pthread_join(t[i], NULL);
        ok += l[i].ok;
        failed += l[i].failed;
        if (l[i].failed)
            print_message("loader %d: %d failed, last rc=%d status=%d\n", i, l[i].failed,
                          l[i].last_rc, l[i].last_status);
    }
    g->ok_responses += (uint64_t)ok;
    assert_true(gw_wait_log(g, "policy reloaded", reloads + 5, 5000));
    print_message("%d requests during 5 reloads, %d failed\n", ok + failed, failed);
    if (failed)
        gw_print_log_tail(g, 30);
    assert_int_equal(failed, 0);
    assert_int_equal(ok, THREADS * EACH);
}

/* ---- 8. a broken policy is refused; the old one keeps serving ---- */

static void test_reload_broken_policy(void **state)
{
    world_t *w = *state;
    gw_t *g = shared_gw(w);
    int failures = gw_log_count(g, "reload failed:");
    const char *broken = "local mg = require \"moongate\"\n"
                         "return {\n"
                         "  authenticate = function(req)\n"
                         "    return \"alice\"\n"
                         "  end,,\n"
                         "}\n";
    assert_int_equal(mg_test_write_file(g->policy, broken, strlen(broken), 0600), 0);
    assert_int_equal(mg_test_proc_kill(&g->proc, SIGHUP), 0);
    assert_true(gw_wait_log(g, "reload failed:", failures + 1, 5000));

    /* The line names the file and a line number: "reload failed: FILE:LINE: ...". */
    char *log = NULL;
    assert_int_equal(mg_test_read_file(g->log, &log, NULL), 0);
    const char *p = log, *last = NULL;
    while ((p = strstr(p, "reload failed:")) != NULL)
        last = p++;
    assert_non_null(last);
    char line[512];
    snprintf(line, sizeof(line), "%.*s", (int)strcspn(last, "\n"), last);
    free(log);
    print_message("%s\n", line);
    char want[MG_TEST_PATH_MAX + 32];
    snprintf(want, sizeof(want), "reload failed: %s:", g->policy);
    assert_non_null(strstr(line, want));
    const char *ln = line + strlen(want);
    assert_true(*ln >= '1' && *ln <= '9');
    while (*ln >= '0' && *ln <= '9')
        ln++;
    assert_int_equal(*ln, ':');

    /* The old policy still decides: alice is served, limited still gets 429, no token 401. */
    mg_test_http_response_t r;
    int rc = gw_request(g, "GET", "/hello", GW_AUTH_ALICE, NULL, 0, &r, 10000);
    gw_expect_status(g, rc, &r, 200, "after the failed reload");
    mg_test_http_response_free(&r);
    rc = gw_request(g, "GET", "/hello", "Authorization: Bearer limited-token\r\n", NULL, 0, &r,
                    10000);
    gw_expect_status(g, rc, &r, 429, "limited after the failed reload");
    mg_test_http_response_free(&r);
    rc = gw_request(g, "GET", "/hello", NULL, NULL, 0, &r, 10000);
    gw_expect_status(g, rc, &r, 401, "no token after the failed reload");
    mg_test_http_response_free(&r);

    /* Put the good policy back (the tests after this one reload it too). */
    int reloads = gw_log_count(g, "policy reloaded");
    gw_write_policy(g->policy, &w->sshd, w->up.port);
    assert_int_equal(mg_test_proc_kill(&g->proc, SIGHUP), 0);
    assert_true(gw_wait_log(g, "policy reloaded", reloads + 1, 5000));
}

/* ---- 9. SIGTERM with a stream in flight ---- */

static void test_sigterm_drains_stream(void **state)
{
    world_t *w = *state;
    static gw_t g;
    const char *env[] = { "SHUTDOWN_GRACE_PERIOD=5000", NULL };
    gw_start(&g, &w->sshd, w->up.port, env);

    char *req = NULL;
    size_t len = 0;
    assert_int_equal(mg_test_http_request(&req, &len, "GET", "/stream?chunks=10&interval_ms=100",
                                          GW_AUTH_ALICE, NULL, 0),
                     0);
    int fd = gw_connect(g.port, 2000);
    assert_true(fd >= 0);
    assert_int_equal(send(fd, req, len, MSG_NOSIGNAL), (ssize_t)len);
    free(req);
    mg_test_http_response_t r;
    mg_test_http_response_init(&r);
    r.keep_body = true;
    double t0 = mg_test_now_ms(), t_term = 0, deadline = t0 + 8000;
    int health_during = 0, new_during = 0, new_retry_after = 0, ready_during = 0;
    double last_probe = 0;
    char buf[4096];
    bool eof = false;
    while (!r.complete && !eof && mg_test_now_ms() < deadline) {
        struct pollfd p = { .fd = fd, .events = POLLIN };
        poll(&p, 1, 20);
        ssize_t n = recv(fd, buf, sizeof(buf), MSG_DONTWAIT);
        if (n > 0)
            assert_int_equal(mg_test_http_response_feed(&r, buf, (size_t)n, NULL), 0);
        else if (n == 0 || (n < 0 && errno != EAGAIN && errno != EINTR))
            eof = true;
        double now = mg_test_now_ms();
        if (t_term == 0 && now - t0 >= 300 && r.chunks >= 1) {
            assert_int_equal(mg_test_proc_kill(&g.proc, SIGTERM), 0);
            t_term = now;
        }
        /* While the stream is in flight: /healthz says 503, and so does a new request. */
        if (t_term != 0 && !r.complete && now - last_probe >= 100 &&
            (health_during != 503 || new_during != 503 || ready_during != 503)) {
            last_probe = now;
            if (health_during != 503)
                health_during = gw_healthz(&g, 1000);
            if (ready_during != 503) {
                mg_test_http_response_t h;
                int rc = gw_request(&g, "GET", "/readyz", NULL, NULL, 0, &h, 1000);
                ready_during = rc == 0 ? h.status : rc;
                if (ready_during == 503 && strstr(h.body, "\"draining: ") == NULL)
                    ready_during = -1; /* 503 without saying why */
                mg_test_http_response_free(&h);
            }
            if (new_during != 503) {
                mg_test_http_response_t h;
                int rc = gw_request(&g, "GET", "/hello", GW_AUTH_ALICE, NULL, 0, &h, 1000);
                new_during = rc == 0 ? h.status : rc;
                if (new_during == 503) {
                    check_error_body(&h);
                    new_retry_after = mg_test_http_response_header(&h, "retry-after") != NULL;
                }
                mg_test_http_response_free(&h);
            }
        }
    }
    close(fd);
    print_message("drain: stream %s with %llu chunks at %.0f ms after SIGTERM; /healthz %d, "
                  "/readyz %d, new request %d\n",
                  r.complete ? "complete" : "cut", (unsigned long long)r.chunks,
                  mg_test_now_ms() - t_term, health_during, ready_during, new_during);
    assert_int_equal(ready_during, 503);
    assert_true(t_term != 0);
    if (!r.complete)
        gw_print_log_tail(&g, 30);
    assert_true(r.complete);
    assert_int_equal(r.status, 200);
    assert_true(r.chunked);
    int lines = 0;
    for (size_t i = 0; i < r.body_len; i++)
        lines += r.body[i] == '\n';
    assert_int_equal(lines, 10);
    mg_test_http_response_free(&r);
    assert_int_equal(health_during, 503);
    assert_int_equal(new_during, 503);
    assert_true(new_retry_after);

    /* Then it exits 0, well within the grace period of 5 s. */
    gw_assert_exits_cleanly(&g, 6000);
    double took = mg_test_now_ms() - t_term;
    print_message("exited %.0f ms after SIGTERM\n", took);
    assert_true(took < 5500);
    assert_true(gw_log_count(&g, "draining (SIGTERM)") == 1);
}

/* A second SIGTERM during a drain ends the process at once, without a sanitizer report. */
/* Sends alice's GET path on a new connection and returns the socket once bytes are back. */
static int open_stream(const gw_t *g, const char *path)
{
    char *req = NULL;
    size_t len = 0;
    assert_int_equal(mg_test_http_request(&req, &len, "GET", path, GW_AUTH_ALICE, NULL, 0), 0);
    int fd = gw_connect(g->port, 2000);
    assert_true(fd >= 0);
    assert_int_equal(send(fd, req, len, MSG_NOSIGNAL), (ssize_t)len);
    free(req);
    assert_int_equal(gw_poll(fd, POLLIN, mg_test_now_ms() + 5000), 0);
    return fd;
}

static void test_second_sigterm_exits_at_once(void **state)
{
    world_t *w = *state;
    static gw_t g;
    const char *env[] = { "SHUTDOWN_GRACE_PERIOD=20000", NULL };
    gw_start(&g, &w->sshd, w->up.port, env);
    int fd = open_stream(&g, "/stream?chunks=100&interval_ms=100");

    assert_int_equal(mg_test_proc_kill(&g.proc, SIGTERM), 0);
    assert_true(gw_wait_log(&g, "draining (SIGTERM)", 1, 3000));
    double t = mg_test_now_ms();
    assert_int_equal(mg_test_proc_kill(&g.proc, SIGTERM), 0);
    int rc = mg_test_proc_wait(&g.proc, 3000);
    close(fd);
    if (rc != 0) {
        gw_kill(&g);
        fail_msg("a second SIGTERM did not end the process within 3 s");
    }
    g.running = false;
    int code = mg_test_proc_exit_code(&g.proc);
    print_message("second SIGTERM: exited with %d after %.0f ms\n", code, mg_test_now_ms() - t);
    /* It exits (with a non-zero code), and is not killed by a signal or a sanitizer. */
    assert_true(code >= 0 && code < 128);
    gw_assert_log_clean(&g);
}

/* A stream that outlives the grace period is cut by the drain: the client sees no clean end,
 * the access log names the drain (not an upstream failure), and the process still exits 0. */
static void test_drain_cut_is_named(void **state)
{
    world_t *w = *state;
    static gw_t g;
    const char *env[] = { "SHUTDOWN_GRACE_PERIOD=300", "SHUTDOWN_FORCE_AFTER_GRACE=true", NULL };
    gw_start(&g, &w->sshd, w->up.port, env);
    int fd = open_stream(&g, "/stream?chunks=100&interval_ms=50");
    assert_int_equal(mg_test_proc_kill(&g.proc, SIGTERM), 0);

    char buf[65536];
    size_t got = 0;
    bool closed = false;
    double t = mg_test_now_ms(), deadline = t + 5000;
    while (gw_poll(fd, POLLIN, deadline) == 0) {
        ssize_t n = recv(fd, buf + got, sizeof(buf) - 1 - got, 0);
        if (n <= 0) {
            closed = true;
            break;
        }
        got += (size_t)n;
        if (got == sizeof(buf) - 1)
            got = 0; /* only the end matters */
    }
    buf[got] = '\0';
    close(fd);
    print_message("drain cut: closed=%d %.0f ms after SIGTERM\n", (int)closed,
                  mg_test_now_ms() - t);
    assert_true(closed);
    assert_null(strstr(buf, "\r\n0\r\n\r\n"));
    assert_true(gw_wait_log(&g, "cut: the drain's grace period (300 ms) ended", 1, 3000));
    assert_int_equal(gw_log_count(&g, "upstream failed mid-response"), 0);
    gw_assert_exits_cleanly(&g, 5000);
}

/* ---- 10. malformed input never reaches the upstream ---- */

/*
 * Sends data on a fresh connection and reads until the status line is in, the peer closes, or
 * 3 s pass. Returns the status, 0 if the connection closed without one, or MG_ETIMEDOUT.
 */
static int raw_status(const gw_t *g, const char *data, size_t len, char *line, size_t cap)
{
    line[0] = '\0';
    int fd = gw_connect(g->port, 2000);
    assert_true(fd >= 0);
    double deadline = mg_test_now_ms() + 3000;
    size_t sent = 0, got = 0;
    char in[4096];
    int status = MG_ETIMEDOUT;
    for (;;) {
        short ev = POLLIN | (sent < len ? POLLOUT : 0);
        if (gw_poll(fd, ev, deadline) != 0)
            break;
        if (sent < len) {
            ssize_t w = send(fd, data + sent, len - sent, MSG_NOSIGNAL | MSG_DONTWAIT);
            if (w > 0)
                sent += (size_t)w;
            else if (w < 0 && errno != EAGAIN && errno != EINTR)
                sent = len; /* refused: read what was said, if anything */
        }
        ssize_t n = recv(fd, in + got, sizeof(in) - 1 - got, MSG_DONTWAIT);
        if (n > 0) {
            got += (size_t)n;
            in[got] = '\0';
            char *eol = strstr(in, "\r\n");
            if (eol) {
                snprintf(line, cap, "%.*s", (int)(eol - in), in);
                status = strncmp(in, "HTTP/1.", 7) == 0 ? atoi(in + 9) : MG_EINVAL;
                break;
            }
        } else if (n == 0 || (n < 0 && errno != EAGAIN && errno != EINTR)) {
            status = 0;
            break;
        }
    }
    close(fd);
    return status;
}

static void test_bad_input(void **state)
{
    world_t *w = *state;
    gw_t *g = shared_gw(w);
    static char big[40 * 1024];
    int n = snprintf(big, sizeof(big), "GET /hello HTTP/1.1\r\nHost: x\r\n" GW_AUTH_ALICE
                                       "X-Big: ");
    memset(big + n, 'a', 33000);
    n += 33000;
    n += snprintf(big + n, sizeof(big) - (size_t)n, "\r\n\r\n");

    /* Each is refused before anything reaches the upstream (test_server.c has the full table
       of strictness rules; these are the ones that once slipped through). */
    struct {
        const char *name;
        const char *data;
        size_t len;
        int want;       /* the status */
        bool may_forward;
    } cases[] = {
        { "malformed request line", "GARBAGE\r\n\r\n", 0, 400, false },
        { "Content-Length with Transfer-Encoding",
          "POST /echo HTTP/1.1\r\nHost: x\r\n" GW_AUTH_ALICE
          "Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
          0, 400, false },
        { "space before the colon of Transfer-Encoding",
          "POST /echo HTTP/1.1\r\nHost: x\r\n" GW_AUTH_ALICE
          "Transfer-Encoding : chunked\r\nContent-Length: 3\r\n\r\nabc", 0, 400, false },
        { "chunked request body (forwarded)",
          "POST /echo HTTP/1.1\r\nHost: x\r\n" GW_AUTH_ALICE
          "Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
          0, 200, true },
        { "bare CR in a header value",
          "GET /hello HTTP/1.1\r\nHost: x\r\n" GW_AUTH_ALICE "X-Evil: a\rb\r\n\r\n", 0, 400,
          false },
        { "obs-fold", "GET /hello HTTP/1.1\r\nHost: x\r\n" GW_AUTH_ALICE "X-Fold: a\r\n b\r\n\r\n",
          0, 400, false },
        { "body over the limit",
          "POST /echo HTTP/1.1\r\nHost: x\r\n" GW_AUTH_ALICE "Content-Length: 20000000\r\n\r\n", 0,
          413, false },
        { "header block over 32 KiB", big, (size_t)n, 431, false },
    };
    int bad = 0;
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        uint64_t before = upstream_requests(w);
        size_t len = cases[i].len ? cases[i].len : strlen(cases[i].data);
        char line[256];
        int st = raw_status(g, cases[i].data, len, line, sizeof(line));
        uint64_t after = upstream_requests(w);
        int health = gw_healthz(g, 3000);
        bool ok = st == cases[i].want;
        ok = ok && (cases[i].may_forward || after == before) && health == 200;
        print_message("%-40s -> %s%s (want %d); upstream requests +%llu; /healthz %d%s\n",
                      cases[i].name, st == 0 ? "closed" : line[0] ? line : "no answer",
                      st == MG_ETIMEDOUT ? " (timed out)" : "", cases[i].want,
                      (unsigned long long)(after - before), health, ok ? "" : "  <-- FAIL");
        bad += !ok;
        gw_assert_alive(g);
    }
    if (bad)
        gw_print_log_tail(g, 30);
    assert_int_equal(bad, 0);
}

/* ---- TLS: HTTPS with a certificate and key from the settings, HTTP/1.1 only ---- */

static void test_tls(void **state)
{
    world_t *w = *state;
    static gw_t g;
    char dir[MG_TEST_PATH_MAX], crt[MG_TEST_PATH_MAX], key[MG_TEST_PATH_MAX];
    char out[MG_TEST_PATH_MAX];
    assert_int_equal(mg_test_mkdtemp(dir, sizeof(dir), "mg-tls"), 0);
    assert_int_equal(mg_test_path_join(crt, sizeof(crt), dir, "tls.crt"), 0);
    assert_int_equal(mg_test_path_join(key, sizeof(key), dir, "tls.key"), 0);
    assert_int_equal(mg_test_path_join(out, sizeof(out), dir, "curl.out"), 0);
    char *const gen[] = { "openssl", "req", "-x509", "-newkey", "ed25519", "-nodes",
                          "-keyout", key, "-out", crt, "-days", "2", "-subj", "/CN=127.0.0.1",
                          NULL };
    int code = -1;
    assert_int_equal(mg_test_proc_run(gen, NULL, 10000, &code), 0);
    assert_int_equal(code, 0);

    char env_crt[MG_TEST_PATH_MAX + 32], env_key[MG_TEST_PATH_MAX + 32];
    snprintf(env_crt, sizeof(env_crt), "MOONGATE_TLS_CERT=%s", crt);
    snprintf(env_key, sizeof(env_key), "MOONGATE_TLS_KEY=%s", key);
    const char *env[] = { env_crt, env_key, NULL };
    gw_start(&g, &w->sshd, w->up.port, env);

    char url[128];
    snprintf(url, sizeof(url), "https://127.0.0.1:%u/stream?chunks=3&interval_ms=50&size=4",
             g.port);
    /* curl offers h2 first: the gateway must answer in HTTP/1.1, streamed and complete. */
    char *const get[] = { "curl", "-sSk", "--http2", "-N", "-H", "Authorization: Bearer alice-token",
                          "-w", "\nversion=%{http_version} status=%{http_code}\n", url, NULL };
    mg_test_spawn_opts_t so = { .stdout_path = out };
    assert_int_equal(mg_test_proc_run(get, &so, 15000, &code), 0);
    char *text = NULL;
    size_t len = 0;
    assert_int_equal(mg_test_read_file(out, &text, &len), 0);
    print_message("%s", text);
    assert_int_equal(code, 0);
    assert_non_null(strstr(text, "\"i\":2"));
    assert_non_null(strstr(text, "version=1.1 status=200"));
    free(text);

    /* Plain HTTP to the TLS port is not served. */
    assert_true(gw_healthz(&g, 2000) != 200);
    gw_stop(&g);
    mg_test_rm_rf(dir);
}

/* ---- the command line: -t checks a policy; a bad setting stops start-up, naming it ---- */

static void test_cli_check_and_bad_setting(void **state)
{
    world_t *w = *state;
    char dir[MG_TEST_PATH_MAX], good[MG_TEST_PATH_MAX], bad[MG_TEST_PATH_MAX];
    char out[MG_TEST_PATH_MAX], errf[MG_TEST_PATH_MAX], bin[MG_TEST_PATH_MAX];
    assert_int_equal(mg_test_mkdtemp(dir, sizeof(dir), "mg-cli"), 0);
    assert_int_equal(mg_test_path_join(good, sizeof(good), dir, "good.lua"), 0);
    assert_int_equal(mg_test_path_join(bad, sizeof(bad), dir, "bad.lua"), 0);
    assert_int_equal(mg_test_path_join(out, sizeof(out), dir, "out"), 0);
    assert_int_equal(mg_test_path_join(errf, sizeof(errf), dir, "err"), 0);
    gw_write_policy(good, &w->sshd, w->up.port);
    const char *broken = "return {\n  authenticate = function(req) return 'x' end,\n  admit = 42,\n}\n";
    assert_int_equal(mg_test_write_file(bad, broken, strlen(broken), 0644), 0);
    gw_binary(bin, sizeof(bin));

    int code = -1;
    mg_test_spawn_opts_t so = { .stdout_path = out, .stderr_path = errf };
    char *const check_good[] = { bin, "-t", "-c", good, NULL };
    assert_int_equal(mg_test_proc_run(check_good, &so, 10000, &code), 0);
    assert_int_equal(code, 0);

    char *const check_bad[] = { bin, "-t", "-c", bad, NULL };
    assert_int_equal(mg_test_proc_run(check_bad, &so, 10000, &code), 0);
    assert_int_equal(code, 1);
    char *text = NULL;
    assert_int_equal(mg_test_read_file(errf, &text, NULL), 0);
    print_message("moongate -t on a bad policy: %s", text);
    assert_non_null(strstr(text, "bad.lua"));
    assert_non_null(strstr(text, "admit"));
    free(text);

    char *envp[] = { "SSH_MAX_CHANNELS=ten", "PATH=/usr/bin:/bin", NULL };
    mg_test_spawn_opts_t se = { .stdout_path = out, .stderr_path = errf, .envp = envp };
    char *const serve[] = { bin, "-c", good, "-l", "127.0.0.1:0", NULL };
    assert_int_equal(mg_test_proc_run(serve, &se, 10000, &code), 0);
    assert_int_equal(code, 2);
    assert_int_equal(mg_test_read_file(errf, &text, NULL), 0);
    assert_non_null(strstr(text, "SSH_MAX_CHANNELS"));
    free(text);
    mg_test_rm_rf(dir);
}

/* ---- slowloris: a request head that never completes is cut at the header timeout ---- */

static void test_header_timeout(void **state)
{
    world_t *w = *state;
    static gw_t g;
    const char *env[] = { "MOONGATE_HEADER_TIMEOUT=1", NULL };
    gw_start(&g, &w->sshd, w->up.port, env);
    int fd = gw_connect(g.port, 2000);
    assert_true(fd >= 0);
    const char *part = "GET /hello HTTP/1.1\r\nHost: x\r\n";
    assert_int_equal(send(fd, part, strlen(part), MSG_NOSIGNAL), (ssize_t)strlen(part));
    double t0 = mg_test_now_ms();
    char buf[512];
    size_t got = 0;
    bool closed = false;
    while (!closed && gw_poll(fd, POLLIN, t0 + 5000) == 0) {
        ssize_t n = recv(fd, buf + got, sizeof(buf) - 1 - got, 0);
        if (n <= 0)
            closed = true;
        else
            got += (size_t)n;
    }
    buf[got] = '\0';
    double took = mg_test_now_ms() - t0;
    close(fd);
    print_message("an unfinished head was answered after %.0f ms: %.*s\n", took,
                  (int)strcspn(buf, "\r"), buf);
    /* 408, then the connection closes. */
    assert_true(closed);
    assert_int_equal(strncmp(buf, "HTTP/1.1 408 ", 13), 0);
    assert_true(took >= 900 && took < 4000);
    assert_int_equal(gw_healthz(&g, 2000), 200);
    gw_stop(&g);
}

/* ---- an upstream that sends no response head in time: 504 ---- */

static void test_upstream_head_timeout(void **state)
{
    world_t *w = *state;
    static gw_t g;
    const char *env[] = { "UPSTREAM_HEAD_TIMEOUT=400", NULL };
    gw_start(&g, &w->sshd, w->up.port, env);
    mg_test_http_response_t r;
    /* A first request sets up the connection while the upstream still answers. */
    assert_int_equal(gw_request(&g, "GET", "/hello", GW_AUTH_ALICE, NULL, 0, &r, 5000), 0);
    assert_int_equal(r.status, 200);
    mg_test_http_response_free(&r);

    assert_int_equal(kill(w->up.pid, SIGSTOP), 0);
    double t0 = mg_test_now_ms();
    int rc = gw_request(&g, "GET", "/hello", GW_AUTH_ALICE, NULL, 0, &r, 5000);
    double took = mg_test_now_ms() - t0;
    assert_int_equal(kill(w->up.pid, SIGCONT), 0);
    assert_int_equal(rc, 0);
    print_message("stopped upstream: %d after %.0f ms: %s\n", r.status, took,
                  r.body ? r.body : "");
    assert_int_equal(r.status, 504);
    assert_non_null(strstr(r.body, "no response within 400 ms"));
    assert_true(took >= 350 && took < 3000);
    mg_test_http_response_free(&r);

    /* The upstream is back: so is service. */
    assert_int_equal(gw_request(&g, "GET", "/hello", GW_AUTH_ALICE, NULL, 0, &r, 5000), 0);
    assert_int_equal(r.status, 200);
    mg_test_http_response_free(&r);
    gw_stop(&g);
}

/* ---- channel reuse: sequential requests ride one channel, as /stats shows ---- */

static void test_channel_reuse(void **state)
{
    world_t *w = *state;
    static gw_t g;
    gw_start(&g, &w->sshd, w->up.port, NULL);
    mg_test_http_response_t r;
    for (int i = 0; i < 5; i++) {
        assert_int_equal(gw_request(&g, "POST", "/echo", GW_AUTH_ALICE, "abc", 3, &r, 5000), 0);
        assert_int_equal(r.status, 200);
        assert_string_equal(r.body, "abc");
        mg_test_http_response_free(&r);
    }
    assert_int_equal(gw_request(&g, "GET", "/stats", NULL, NULL, 0, &r, 5000), 0);
    assert_int_equal(r.status, 200);
    char reused[32] = "";
    const char *p = strstr(r.body, "\"reused\":");
    assert_non_null(p);
    snprintf(reused, sizeof(reused), "%.*s", (int)strcspn(p + 9, ",}"), p + 9);
    print_message("stats: 5 requests, %s served on a reused channel\n", reused);
    assert_int_equal(atoi(reused), 4);
    mg_test_http_response_free(&r);
    gw_stop(&g);
}

/* ---- a client that stops reading is cut after the send timeout, and frees its channel ---- */

static void test_stalled_client_cut(void **state)
{
    world_t *w = *state;
    static gw_t g;
    const char *env[] = { "MOONGATE_SEND_TIMEOUT=2", NULL };
    gw_start(&g, &w->sshd, w->up.port, env);
    char *req = NULL;
    size_t len = 0;
    assert_int_equal(mg_test_http_request(&req, &len, "GET", "/bytes/50000000", GW_AUTH_ALICE,
                                          NULL, 0),
                     0);
    int fd = gw_connect(g.port, 2000);
    assert_true(fd >= 0);
    assert_int_equal(send(fd, req, len, MSG_NOSIGNAL), (ssize_t)len);
    free(req);

    /* Read nothing; wait for the gateway to give up on us. */
    double t0 = mg_test_now_ms();
    bool closed = false;
    while (!closed && mg_test_now_ms() - t0 < 15000) {
        mg_test_sleep_ms(200);
        mg_test_http_response_t r;
        assert_int_equal(gw_request(&g, "GET", "/stats", NULL, NULL, 0, &r, 3000), 0);
        closed = strstr(r.body, "\"busy_channels\":0,\"idle_channels\":0") != NULL;
        mg_test_http_response_free(&r);
    }
    double took = mg_test_now_ms() - t0;
    print_message("a client that read nothing was cut after %.0f ms\n", took);
    assert_true(closed);
    assert_true(took >= 1500);
    /* The connection is closed on the client's side too: EOF after what was buffered, or a
       reset (the gateway closed with bytes we never read). */
    char buf[65536];
    ssize_t n;
    double end = mg_test_now_ms() + 15000;
    for (;;) {
        if (gw_poll(fd, POLLIN, end) != 0) {
            n = -1;
            errno = ETIMEDOUT;
            break;
        }
        n = recv(fd, buf, sizeof(buf), MSG_DONTWAIT);
        if (n == 0 || (n < 0 && errno != EAGAIN))
            break;
    }
    assert_true(n == 0 || (n < 0 && errno == ECONNRESET));
    close(fd);
    assert_int_equal(gw_healthz(&g, 2000), 200);
    gw_stop(&g);
}

/* ---- 11. /metrics is Prometheus text and counts what happened ---- */

static bool metric_name_ok(const char *s, size_t n)
{
    if (n == 0 || !(strchr("_:", s[0]) || ((s[0] | 32) >= 'a' && (s[0] | 32) <= 'z')))
        return false;
    for (size_t i = 1; i < n; i++)
        if (!(strchr("_:", s[i]) || ((s[i] | 32) >= 'a' && (s[i] | 32) <= 'z') ||
              (s[i] >= '0' && s[i] <= '9')))
            return false;
    return true;
}

/* `name{k="v",...} value [timestamp]`; name gets the name. Returns false if malformed. */
static bool sample_parse(const char *line, char *name, size_t cap, const char **labels,
                         double *value)
{
    size_t nl = strcspn(line, "{ ");
    if (!metric_name_ok(line, nl) || nl >= cap)
        return false;
    memcpy(name, line, nl);
    name[nl] = '\0';
    const char *p = line + nl;
    *labels = "";
    if (*p == '{') {
        *labels = p;
        p++;
        while (*p != '}') {
            size_t k = strcspn(p, "=");
            if (!metric_name_ok(p, k) || p[k] != '=' || p[k + 1] != '"')
                return false;
            p += k + 2;
            while (*p && *p != '"')
                p += (*p == '\\' && p[1]) ? 2 : 1;
            if (*p != '"')
                return false;
            p++;
            if (*p == ',')
                p++;
            else if (*p != '}')
                return false;
        }
        p++;
    }
    if (*p != ' ')
        return false;
    p++;
    char *end;
    if (strncmp(p, "+Inf", 4) == 0 || strncmp(p, "-Inf", 4) == 0 || strncmp(p, "NaN", 3) == 0)
        return true;
    *value = strtod(p, &end);
    return end != p && (*end == '\0' || *end == ' ');
}

static void test_metrics(void **state)
{
    world_t *w = *state;
    gw_t *g = shared_gw(w);
    mg_test_http_response_t r;
    int rc = gw_request(g, "GET", "/metrics", NULL, NULL, 0, &r, 5000);
    gw_expect_status(g, rc, &r, 200, "GET /metrics");
    const char *ct = mg_test_http_response_header(&r, "content-type");
    assert_non_null(ct);
    assert_non_null(strstr(ct, "text/plain"));

    char histos[16][128];
    int nhist = 0, samples = 0, bad = 0;
    double ok2xx = -1;
    char *text = r.body;
    for (char *line = strtok(text, "\n"); line; line = strtok(NULL, "\n")) {
        if (line[0] == '#') {
            char kind[8], name[128], type[32];
            if (sscanf(line, "# %7s %127s %31s", kind, name, type) != 3 ||
                (strcmp(kind, "HELP") != 0 && strcmp(kind, "TYPE") != 0) ||
                !metric_name_ok(name, strlen(name))) {
                print_message("bad comment line: %s\n", line);
                bad++;
                continue;
            }
            if (strcmp(kind, "TYPE") == 0) {
                if (strcmp(type, "counter") && strcmp(type, "gauge") &&
                    strcmp(type, "histogram") && strcmp(type, "summary") &&
                    strcmp(type, "untyped")) {
                    print_message("bad type: %s\n", line);
                    bad++;
                }
                if (strcmp(type, "histogram") == 0 && nhist < 16)
                    snprintf(histos[nhist++], sizeof(histos[0]), "%s", name);
            }
            continue;
        }
        char name[128];
        const char *labels;
        double v = 0;
        if (!sample_parse(line, name, sizeof(name), &labels, &v)) {
            print_message("bad sample line: %s\n", line);
            bad++;
            continue;
        }
        samples++;
        if (strcmp(name, "moongate_requests_total") == 0 && strstr(labels, "code=\"2xx\""))
            ok2xx = (ok2xx < 0 ? 0 : ok2xx) + v;
    }
    mg_test_http_response_free(&r);
    assert_int_equal(bad, 0);
    assert_true(samples > 10);

    /* Each histogram has buckets (ending at +Inf), a sum and a count. */
    assert_true(nhist >= 2);
    rc = gw_request(g, "GET", "/metrics", NULL, NULL, 0, &r, 5000);
    gw_expect_status(g, rc, &r, 200, "GET /metrics again");
    for (int i = 0; i < nhist; i++) {
        char want[2100];
        snprintf(want, sizeof(want), "\n%s_bucket{", histos[i]);
        assert_non_null(strstr(r.body, want));
        snprintf(want, sizeof(want), "%s_bucket{", histos[i]);
        const char *inf = strstr(r.body, want);
        bool has_inf = false;
        for (; inf; inf = strstr(inf + 1, want))
            if (strstr(inf, "le=\"+Inf\"") && strstr(inf, "le=\"+Inf\"") < strchr(inf, '\n'))
                has_inf = true;
        if (!has_inf)
            fail_msg("%s has no le=\"+Inf\" bucket", histos[i]);
        snprintf(want, sizeof(want), "\n%s_sum", histos[i]);
        assert_non_null(strstr(r.body, want));
        snprintf(want, sizeof(want), "\n%s_count", histos[i]);
        assert_non_null(strstr(r.body, want));
    }
    mg_test_http_response_free(&r);

    print_message("%d samples, %d histograms; requests_total{code=\"2xx\"} = %.0f, 2xx seen by "
                  "the tests on this gateway = %llu\n",
                  samples, nhist, ok2xx, (unsigned long long)g->ok_responses);
    assert_true(ok2xx >= (double)g->ok_responses);

    /* The process as the kernel sees it, the build, and the client side's bytes. */
    char stat[64], *status = NULL;
    snprintf(stat, sizeof(stat), "/proc/%d/status", (int)g->proc.pid);
    assert_int_equal(mg_test_read_file(stat, &status, NULL), 0);
    const char *vmrss = strstr(status, "VmRSS:");
    assert_non_null(vmrss);
    double rss_kernel = atof(vmrss + 6) * 1024;
    free(status);
    double rss = gw_metric(g, "process_resident_memory_bytes");
    print_message("process_resident_memory_bytes %.0f, VmRSS %.0f\n", rss, rss_kernel);
    assert_true(rss > rss_kernel / 2 && rss < rss_kernel * 2);
    assert_true(gw_metric(g, "process_cpu_seconds_total") > 0);
    assert_true(gw_metric(g, "process_virtual_memory_bytes") >= rss);
    double fds = gw_metric(g, "process_open_fds"), maxfds = gw_metric(g, "process_max_fds");
    assert_true(fds >= 4 && fds < maxfds);
    double start = gw_metric(g, "process_start_time_seconds");
    struct timeval now;
    gettimeofday(&now, NULL);
    assert_true(start > (double)now.tv_sec - 3600 && start <= (double)now.tv_sec + 1);
    assert_true(gw_metric(g, "moongate_build_info{version=\"" MG_TEST_VERSION "\"}") == 1);
    double in0 = gw_metric(g, "moongate_client_received_bytes_total");
    double out0 = gw_metric(g, "moongate_client_sent_bytes_total");
    rc = gw_request(g, "POST", "/echo", GW_AUTH_ALICE, "0123456789", 10, &r, 5000);
    gw_expect_status(g, rc, &r, 200, "an echo between two scrapes");
    mg_test_http_response_free(&r);
    double in1 = gw_metric(g, "moongate_client_received_bytes_total");
    double out1 = gw_metric(g, "moongate_client_sent_bytes_total");
    print_message("client bytes: +%.0f in, +%.0f out\n", in1 - in0, out1 - out0);
    assert_true(in1 - in0 > 10 + 40);  /* the echo's head and body, and a scrape's */
    assert_true(out1 - out0 > 10 + 100);
}

/*
 * examples/grafana/moongate.json queries only metrics the gateway serves: every moongate_* and
 * process_* name in its panels and variables (a histogram's _bucket, _sum, _count under its
 * own name) has a # TYPE line in a live /metrics.
 */
static void collect_names(const char *expr, char names[][96], int *n, int cap)
{
    for (const char *p = expr; *p;) {
        if (!(isalpha((unsigned char)*p) || *p == '_' || *p == ':')) {
            p++;
            continue;
        }
        const char *start = p;
        while (isalnum((unsigned char)*p) || *p == '_' || *p == ':')
            p++;
        size_t len = (size_t)(p - start);
        if (len < sizeof(names[0]) && *n < cap &&
            (strncmp(start, "moongate_", 9) == 0 || strncmp(start, "process_", 8) == 0))
            snprintf(names[(*n)++], sizeof(names[0]), "%.*s", (int)len, start);
    }
}

static void test_dashboard_metrics_exist(void **state)
{
    world_t *w = *state;
    gw_t *g = shared_gw(w);
    json_error_t e;
    json_t *d = json_load_file(MG_SOURCE_DIR "/examples/grafana/moongate.json", 0, &e);
    if (d == NULL)
        fail_msg("examples/grafana/moongate.json: line %d: %s", e.line, e.text);
    char names[128][96];
    int n = 0, exprs = 0;
    size_t i, k;
    json_t *panel, *target, *var;
    json_array_foreach(json_object_get(d, "panels"), i, panel) {
        json_array_foreach(json_object_get(panel, "targets"), k, target) {
            const char *expr = json_string_value(json_object_get(target, "expr"));
            assert_non_null(expr);
            collect_names(expr, names, &n, 128);
            exprs++;
        }
    }
    json_array_foreach(json_object_get(json_object_get(d, "templating"), "list"), i, var) {
        const char *q = json_string_value(json_object_get(var, "query"));
        if (q != NULL)
            collect_names(q, names, &n, 128);
    }
    json_decref(d);
    assert_true(exprs >= 10);

    mg_test_http_response_t r;
    int rc = gw_request(g, "GET", "/metrics", NULL, NULL, 0, &r, 5000);
    gw_expect_status(g, rc, &r, 200, "GET /metrics for the dashboard");
    int missing = 0;
    for (int j = 0; j < n; j++) {
        char want[160];
        snprintf(want, sizeof(want), "# TYPE %.95s ", names[j]);
        if (strstr(r.body, want) != NULL)
            continue;
        static const char *const parts[] = { "_bucket", "_sum", "_count" };
        bool found = false;
        for (size_t s = 0; s < 3 && !found; s++) {
            size_t nl = strlen(names[j]), sl = strlen(parts[s]);
            if (nl > sl && strcmp(names[j] + nl - sl, parts[s]) == 0) {
                snprintf(want, sizeof(want), "# TYPE %.*s histogram", (int)(nl - sl), names[j]);
                found = strstr(r.body, want) != NULL;
            }
        }
        if (!found) {
            print_message("the dashboard queries %s, which /metrics does not serve\n", names[j]);
            missing++;
        }
    }
    mg_test_http_response_free(&r);
    print_message("%d queries naming %d metrics, all served\n", exprs, n);
    assert_int_equal(missing, 0);
}

/*
 * /readyz: ready with the facts while serving; a refused reload is reported (its error to a
 * loopback client) but does not make it unready, the old policy serving; at MOONGATE_MAX_CLIENTS
 * it says full. (Draining is checked in the drain test.)
 */
static void test_readyz(void **state)
{
    world_t *w = *state;
    gw_t g;
    const char *env[] = { "MOONGATE_MAX_CLIENTS=3", NULL };
    gw_start(&g, &w->sshd, w->up.port, env);
    mg_test_http_response_t r;
    int rc = gw_request(&g, "GET", "/readyz", NULL, NULL, 0, &r, 5000);
    gw_expect_status(&g, rc, &r, 200, "/readyz");
    if (!gw_json_valid(r.body, r.body_len) ||
        strstr(r.body, "\"ready\":true,\"reasons\":[],\"draining\":false") == NULL ||
        strstr(r.body, "\"max_clients\":3") == NULL ||
        strstr(r.body, "\"last_reload\":\"ok\"") == NULL)
        fail_msg("/readyz: %s", r.body);
    mg_test_http_response_free(&r);

    assert_int_equal(mg_test_write_file(g.policy, "return {\n  route = 42,\n}\n", 25, 0600), 0);
    assert_int_equal(mg_test_proc_kill(&g.proc, SIGHUP), 0);
    assert_true(gw_wait_log(&g, "reload failed", 1, 5000));
    rc = gw_request(&g, "GET", "/readyz", NULL, NULL, 0, &r, 5000);
    gw_expect_status(&g, rc, &r, 200, "/readyz after a refused reload");
    if (strstr(r.body, "\"last_reload\":\"failed\",\"error\":\"") == NULL ||
        strstr(r.body, "policy.lua:3: hook 'route' must be a function") == NULL)
        fail_msg("/readyz after a refused reload: %s", r.body);
    print_message("/readyz after a refused reload: %s\n", r.body);
    mg_test_http_response_free(&r);

    /* Two idle connections and the probe make three: full, so not ready. */
    int a = gw_connect(g.port, 2000), b = gw_connect(g.port, 2000);
    assert_true(a >= 0 && b >= 0);
    mg_test_sleep_ms(100); /* accepted */
    rc = gw_request(&g, "GET", "/readyz", NULL, NULL, 0, &r, 5000);
    assert_int_equal(rc, 0);
    assert_int_equal(r.status, 503);
    if (strstr(r.body, "\"ready\":false,\"reasons\":[\"full: ") == NULL)
        fail_msg("/readyz when full: %s", r.body);
    mg_test_http_response_free(&r);
    close(a);
    close(b);
    gw_stop(&g);
}

/* ---- 12. /stats ---- */

static void test_stats(void **state)
{
    world_t *w = *state;
    gw_t *g = shared_gw(w);
    mg_test_http_response_t r;
    int rc = gw_request(g, "GET", "/stats", NULL, NULL, 0, &r, 5000);
    gw_expect_status(g, rc, &r, 200, "GET /stats");
    if (!gw_json_valid(r.body, r.body_len))
        fail_msg("/stats is not JSON: %s", r.body);
    assert_true(r.body[0] == '{');
    assert_non_null(strstr(r.body, "\"pool\""));
    assert_non_null(strstr(r.body, "\"total_connections\""));
    mg_test_http_response_free(&r);
}

/* A channel kept alive after its response is idle, not busy: in /stats, in /metrics, in the
 * policy's stats, and in the drain's count of requests in flight. */
static void test_idle_channels_counted(void **state)
{
    world_t *w = *state;
    static gw_t g;
    gw_start(&g, &w->sshd, w->up.port, NULL);
    mg_test_http_response_t r;
    int rc = gw_request(&g, "GET", "/hello", GW_AUTH_ALICE, NULL, 0, &r, 10000);
    gw_expect_status(&g, rc, &r, 200, "GET /hello");
    mg_test_http_response_free(&r);

    rc = gw_request(&g, "GET", "/stats", NULL, NULL, 0, &r, 5000);
    gw_expect_status(&g, rc, &r, 200, "GET /stats");
    print_message("/stats: %.300s\n", r.body);
    assert_non_null(strstr(r.body, "\"busy_channels\":0,\"idle_channels\":1"));
    mg_test_http_response_free(&r);
    assert_true(gw_metric(&g, "moongate_pool_channels{state=\"busy\"}") == 0);
    assert_true(gw_metric(&g, "moongate_pool_channels{state=\"idle\"}") == 1);

    assert_int_equal(mg_test_proc_kill(&g.proc, SIGTERM), 0);
    gw_assert_exits_cleanly(&g, 10000);
    assert_true(gw_log_count(&g, "draining (SIGTERM): 0 requests in flight") == 1);
    assert_true(gw_log_count(&g, "shutdown: draining: 0 requests in flight") == 1);
    assert_true(gw_log_count(&g, "1 requests in flight") == 0);
}

/* With MOONGATE_ADMIN_TOKEN set, /metrics and /stats need exactly that bearer token, even from
 * loopback; a token that shares a prefix or differs in length is refused like any other. */
static void test_admin_token(void **state)
{
    world_t *w = *state;
    static const char *const env[] = { "MOONGATE_ADMIN_TOKEN=adm1n-s3cret", NULL };
    gw_t g;
    gw_start(&g, &w->sshd, w->up.port, env);
    static const struct {
        const char *headers;
        int status;
    } cases[] = {
        { NULL, 403 },
        { "Authorization: Bearer adm1n-s3cre\r\n", 403 },
        { "Authorization: Bearer adm1n-s3cret2\r\n", 403 },
        { "Authorization: Bearer adm1n-s3creT\r\n", 403 },
        { "Authorization: Basic adm1n-s3cret\r\n", 403 },
        { "Authorization: Bearer \r\n", 403 },
        { "Authorization: Bearer adm1n-s3cret\r\n", 200 },
        { "Authorization: bearer adm1n-s3cret\r\n", 200 },
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        for (int ep = 0; ep < 2; ep++) {
            mg_test_http_response_t r;
            const char *path = ep == 0 ? "/metrics" : "/stats";
            int rc = gw_request(&g, "GET", path, cases[i].headers, NULL, 0, &r, 5000);
            char what[160];
            snprintf(what, sizeof(what), "GET %s with %s", path,
                     cases[i].headers != NULL ? cases[i].headers : "no token");
            gw_expect_status(&g, rc, &r, cases[i].status, what);
            mg_test_http_response_free(&r);
        }
    }
    /* /healthz stays open: a load balancer's probe carries no token. */
    mg_test_http_response_t r;
    int rc = gw_request(&g, "GET", "/healthz", NULL, NULL, 0, &r, 5000);
    gw_expect_status(&g, rc, &r, 200, "GET /healthz without a token");
    mg_test_http_response_free(&r);
    gw_stop(&g);
}

/* ---- 13. it listens only where it is told ---- */

/* True if something listens on port on every address (0.0.0.0 or [::]). */
static bool listens_on_any_address(uint16_t port)
{
    static const char *const files[] = { "/proc/net/tcp", "/proc/net/tcp6" };
    bool any = false;
    for (size_t i = 0; i < 2; i++) {
        FILE *f = fopen(files[i], "re");
        char line[512], addr[40];
        unsigned lport, st;
        if (f == NULL)
            continue;
        while (fgets(line, sizeof(line), f))
            if (sscanf(line, " %*u: %39[0-9A-Fa-f]:%x %*s %x", addr, &lport, &st) == 3 &&
                lport == port && st == 0x0A && strspn(addr, "0") == strlen(addr))
                any = true;
        fclose(f);
    }
    return any;
}

/* -l 127.0.0.1:PORT must not accept connections from other interfaces. */
static void test_listens_on_loopback_only(void **state)
{
    world_t *w = *state;
    gw_t *g = shared_gw(w);
    bool any = listens_on_any_address(g->port);
    if (any)
        print_message("asked for 127.0.0.1:%u, but it listens on every address (see "
                      "/proc/net/tcp6)\n",
                      (unsigned)g->port);
    assert_false(any);
    assert_true(mg_test_port_listening(g->port));
}

/* The shared gateway drains and exits 0 with a clean log. */
static void test_shared_gateway_exits_cleanly(void **state)
{
    world_t *w = *state;
    gw_t *g = shared_gw(w);
    gw_stop(g);
}

/*
 * MOONGATE_LOG_FORMAT=json, through requests (served, refused, streamed), a scrape, a reload
 * that works and one that fails, and a drain: every line the process wrote is one JSON object
 * with time, level, component and msg, and the access lines carry their fields as members.
 */
static void test_json_logs(void **state)
{
    world_t *w = *state;
    gw_t g;
    const char *env[] = { "MOONGATE_LOG_FORMAT=json", NULL };
    gw_start(&g, &w->sshd, w->up.port, env);
    mg_test_http_response_t r;
    int rc = gw_request(&g, "GET", "/hello", GW_AUTH_ALICE "User-Agent: json-test \"q\"/1\r\n",
                        NULL, 0, &r, 10000);
    gw_expect_status(&g, rc, &r, 200, "json logs");
    mg_test_http_response_free(&r);
    rc = gw_request(&g, "GET", "/stream?chunks=3&interval_ms=10&size=4", GW_AUTH_ALICE, NULL, 0,
                    &r, 10000);
    gw_expect_status(&g, rc, &r, 200, "a stream");
    mg_test_http_response_free(&r);
    rc = gw_request(&g, "GET", "/hello", NULL, NULL, 0, &r, 10000);
    gw_expect_status(&g, rc, &r, 401, "no token");
    mg_test_http_response_free(&r);
    assert_true(gw_metric(&g, "moongate_requests_total{code=\"2xx\"}") >= 2);

    int reloads = gw_log_count(&g, "policy reloaded");
    assert_int_equal(mg_test_proc_kill(&g.proc, SIGHUP), 0);
    assert_true(gw_wait_log(&g, "policy reloaded", reloads + 1, 5000));
    assert_int_equal(mg_test_write_file(g.policy, "return {\n  route = 42,\n}\n", 25, 0600), 0);
    assert_int_equal(mg_test_proc_kill(&g.proc, SIGHUP), 0);
    assert_true(gw_wait_log(&g, "reload failed", 1, 5000));
    gw_stop(&g);

    char *text = NULL;
    assert_int_equal(mg_test_read_file(g.log, &text, NULL), 0);
    int lines = 0, access = 0, with_conn = 0;
    for (char *line = text, *nl; *line != '\0'; line = nl + 1) {
        nl = strchr(line, '\n');
        assert_non_null(nl);
        json_error_t e;
        json_t *j = json_loadb(line, (size_t)(nl - line), 0, &e);
        if (j == NULL || !json_is_object(j))
            fail_msg("line %d is not a JSON object (%s): %.*s", lines + 1, e.text,
                     (int)(nl - line), line);
        static const char *const members[] = { "time", "level", "component", "msg" };
        for (size_t i = 0; i < 4; i++)
            if (!json_is_string(json_object_get(j, members[i])))
                fail_msg("line %d has no %s: %.*s", lines + 1, members[i], (int)(nl - line), line);
        const char *ua = json_string_value(json_object_get(j, "ua"));
        if (ua != NULL && strcmp(ua, "json-test \"q\"/1") == 0) {
            access++;
            assert_string_equal(json_string_value(json_object_get(j, "user")), "alice");
            assert_string_equal(json_string_value(json_object_get(j, "client")), "127.0.0.1");
            assert_int_equal(strlen(json_string_value(json_object_get(j, "request_id"))), 32);
            assert_non_null(strstr(json_string_value(json_object_get(j, "msg")),
                                   "GET /hello -> 200"));
        }
        if (json_is_integer(json_object_get(j, "conn")))
            with_conn++; /* a pool or ssh line naming its connection */
        json_decref(j);
        lines++;
    }
    print_message("%d JSON lines\n", lines);
    assert_true(lines >= 10);
    assert_int_equal(access, 1); /* the one access line with our user agent */
    assert_true(with_conn >= 2);
    free(text);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_policy_refusals),
        cmocka_unit_test(test_hello_echo_and_request_ids),
        cmocka_unit_test(test_stream_arrives_in_pieces),
        cmocka_unit_test(test_100mb_intact),
        cmocka_unit_test(test_slow_client_then_reuse),
        cmocka_unit_test(test_client_leaves_mid_stream),
        cmocka_unit_test(test_sshd_killed_then_replaced),
        cmocka_unit_test(test_reload_under_load),
        cmocka_unit_test(test_reload_broken_policy),
        cmocka_unit_test(test_sigterm_drains_stream),
        cmocka_unit_test(test_second_sigterm_exits_at_once),
        cmocka_unit_test(test_drain_cut_is_named),
        cmocka_unit_test(test_bad_input),
        cmocka_unit_test(test_tls),
        cmocka_unit_test(test_cli_check_and_bad_setting),
        cmocka_unit_test(test_header_timeout),
        cmocka_unit_test(test_upstream_head_timeout),
        cmocka_unit_test(test_channel_reuse),
        cmocka_unit_test(test_stalled_client_cut),
        cmocka_unit_test(test_metrics),
        cmocka_unit_test(test_json_logs),
        cmocka_unit_test(test_dashboard_metrics_exist),
        cmocka_unit_test(test_readyz),
        cmocka_unit_test(test_stats),
        cmocka_unit_test(test_admin_token),
        cmocka_unit_test(test_idle_channels_counted),
        cmocka_unit_test(test_listens_on_loopback_only),
        cmocka_unit_test(test_shared_gateway_exits_cleanly),
    };
    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
