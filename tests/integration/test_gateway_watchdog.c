/*
 * The watchdog and the policy's bounds in the real moongate program: a hook stuck in C (where
 * no time budget reaches) gets the process aborted with the hook and its file:line in the log,
 * SIGTERM or not; a runaway Lua pattern is stopped by the time budget and everyone else goes on
 * being served; a busy gateway under a short watchdog is left alone.
 */
#include "gwtest.h"

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

/*
 * The policy: alice is served; GET /spin spins in C for 10 s (debug_spin), GET /pattern runs a
 * pattern whose backtracking never ends within a lifetime, GET /loop loops in Lua. The spin
 * is on line 8 of the file.
 */
static void write_policy(const world_t *w, const char *path)
{
    char route[2048];
    gw_route_fields(route, sizeof(route), &w->sshd, w->up.port);
    char text[4096];
    int n = snprintf(text, sizeof(text),
                     "local mg = require \"moongate\"\n"
                     "return {\n"
                     "  authenticate = function(req)\n"
                     "    if req.headers[\"authorization\"] ~= \"Bearer alice-token\" then\n"
                     "      return nil, 401, \"no\" end\n"
                     "    if req.path == \"/spin\" then\n"
                     "      local spin = mg.debug_spin\n"
                     "      spin(10000)\n"
                     "    elseif req.path == \"/pattern\" then\n"
                     "      string.find(string.rep(\"a\", 3000), string.rep(\"a-\", 20) .. \"b\")\n"
                     "    elseif req.path == \"/loop\" then\n"
                     "      while true do end\n"
                     "    elseif req.path == \"/has-spin\" and mg.debug_spin then\n"
                     "      return nil, 403, \"debug_spin is there\"\n"
                     "    end\n"
                     "    return \"alice\"\n"
                     "  end,\n"
                     "  route = function(req, user) return { %s } end,\n"
                     "}\n",
                     route);
    assert_true(n > 0 && n < (int)sizeof(text));
    assert_int_equal(mg_test_write_file(path, text, (size_t)n, 0600), 0);
}

static void start(world_t *w, gw_t *g, const char *const *env)
{
    gw_prepare(g);
    write_policy(w, g->policy);
    gw_launch(g, "127.0.0.1:0", env);
}

/* Sends a request and does not wait for the answer. Returns the socket. */
static int send_only(const gw_t *g, const char *path)
{
    char req[256];
    int len = snprintf(req, sizeof(req), "GET %s HTTP/1.1\r\nHost: gw\r\n%s\r\n", path,
                       GW_AUTH_ALICE);
    int fd = gw_connect(g->port, 2000);
    assert_true(fd >= 0);
    assert_int_equal(send(fd, req, (size_t)len, MSG_NOSIGNAL), len);
    return fd;
}

/* A hook stuck in C: SIGTERM cannot be handled; the watchdog aborts the process about its
 * timeout later and names the hook, the line and the C function. */
static void test_stuck_hook_aborts_and_says_where(void **state)
{
    world_t *w = *state;
    static gw_t g;
    const char *env[] = { "MOONGATE_WATCHDOG_MS=500", "MOONGATE_DEBUG_FUNCTIONS=1", NULL };
    start(w, &g, env);
    mg_test_http_response_t r;
    int rc = gw_request(&g, "GET", "/hello", GW_AUTH_ALICE, NULL, 0, &r, 10000);
    gw_expect_status(&g, rc, &r, 200, "before the stall");
    mg_test_http_response_free(&r);

    int fd = send_only(&g, "/spin");
    double t0 = mg_test_now_ms();
    mg_test_sleep_ms(100);
    assert_int_equal(mg_test_proc_kill(&g.proc, SIGTERM), 0); /* cannot be handled now */
    rc = mg_test_proc_wait(&g.proc, 5000);
    double took = mg_test_now_ms() - t0;
    close(fd);
    if (rc != 0) {
        gw_kill(&g);
        fail_msg("the stuck gateway was not ended within 5 s");
    }
    g.running = false;
    int code = mg_test_proc_exit_code(&g.proc);
    print_message("stuck in a hook: exit code %d after %.0f ms\n", code, took);
    gw_print_log_tail(&g, 24);
    assert_int_equal(code, 128 + SIGABRT);
    assert_true(took >= 300 && took < 3000); /* the stall is measured in 100 ms periods */
    assert_int_equal(gw_log_count(&g, "watchdog: the event loop has made no progress for "), 1);
    assert_int_equal(gw_log_count(&g, "the loop is in the policy's authenticate call ("), 1);
    assert_int_equal(gw_log_count(&g, "policy.lua:8, in the C function spin"), 1);
    assert_int_equal(gw_log_count(&g, "draining"), 0); /* SIGTERM never got through */
    assert_int_equal(gw_log_count(&g, "Sanitizer"), 0);
}

/* The same with no debug functions: debug_spin is not there for a policy to find. A runaway
 * pattern and a runaway loop each fail their own request at the time budget (500, logged),
 * under a watchdog of 200 ms that they never trip; others are served meanwhile. */
static void test_runaway_policy_code_is_bounded(void **state)
{
    world_t *w = *state;
    static gw_t g;
    const char *env[] = { "MOONGATE_WATCHDOG_MS=200", NULL };
    start(w, &g, env);
    mg_test_http_response_t r;
    int rc = gw_request(&g, "GET", "/has-spin", GW_AUTH_ALICE, NULL, 0, &r, 10000);
    gw_expect_status(&g, rc, &r, 200, "without MOONGATE_DEBUG_FUNCTIONS");
    mg_test_http_response_free(&r);

    static const char *const paths[] = { "/pattern", "/loop" };
    for (int round = 0; round < 3; round++) {
        for (size_t i = 0; i < 2; i++) {
            double t0 = mg_test_now_ms();
            rc = gw_request(&g, "GET", paths[i], GW_AUTH_ALICE, NULL, 0, &r, 10000);
            double took = mg_test_now_ms() - t0;
            if (round == 0)
                print_message("GET %s -> %d after %.0f ms\n", paths[i], r.status, took);
            gw_expect_status(&g, rc, &r, 500, paths[i]);
            mg_test_http_response_free(&r);
            assert_true(took < 1000);
            rc = gw_request(&g, "GET", "/hello", GW_AUTH_ALICE, NULL, 0, &r, 10000);
            gw_expect_status(&g, rc, &r, 200, "between runaways");
            mg_test_http_response_free(&r);
        }
    }
    assert_true(gw_log_count(&g, "time budget of 50 ms exceeded in string.find") >= 3);
    assert_int_equal(gw_log_count(&g, "watchdog"), 0);
    gw_stop(&g);
}

/* A loaded gateway under the shortest watchdog: 400 requests (streams among them) and reloads;
 * nothing trips, and it drains and exits 0. */
static void test_busy_gateway_not_tripped(void **state)
{
    world_t *w = *state;
    static gw_t g;
    const char *env[] = { "MOONGATE_WATCHDOG_MS=100", NULL };
    start(w, &g, env);
    for (int i = 0; i < 400; i++) {
        mg_test_http_response_t r;
        const char *path = i % 10 == 0 ? "/stream?chunks=5&interval_ms=5" : "/hello";
        int rc = gw_request(&g, "GET", path, GW_AUTH_ALICE, NULL, 0, &r, 10000);
        gw_expect_status(&g, rc, &r, 200, path);
        mg_test_http_response_free(&r);
        if (i % 100 == 50) {
            int reloads = gw_log_count(&g, "policy reloaded");
            assert_int_equal(mg_test_proc_kill(&g.proc, SIGHUP), 0);
            assert_true(gw_wait_log(&g, "policy reloaded", reloads + 1, 5000));
        }
    }
    assert_int_equal(gw_log_count(&g, "watchdog"), 0);
    gw_stop(&g);
}

/* The setting is checked at start: too short a timeout is refused, naming the variable. */
static void test_setting_checked(void **state)
{
    (void)state;
    char bin[MG_TEST_PATH_MAX];
    char *const argv[] = { (char *)gw_binary(bin, sizeof(bin)), "-l", "127.0.0.1:0", NULL };
    char dir[MG_TEST_PATH_MAX], out[MG_TEST_PATH_MAX];
    assert_int_equal(mg_test_mkdtemp(dir, sizeof(dir), "mg-wd"), 0);
    assert_int_equal(mg_test_path_join(out, sizeof(out), dir, "stderr"), 0);
    const char *bad[] = { "MOONGATE_WATCHDOG_MS=50", "MOONGATE_WATCHDOG_MS=ten",
                          "MOONGATE_DEBUG_FUNCTIONS=maybe" };
    for (size_t i = 0; i < 3; i++) {
        char *envp[256];
        const char *extra[] = { bad[i], NULL };
        gw_env_merge(envp, 256, extra);
        mg_test_spawn_opts_t so = { .stderr_path = out, .envp = envp };
        int code = -1;
        assert_int_equal(mg_test_proc_run(argv, &so, 10000, &code), 0);
        char *text = NULL;
        size_t len = 0;
        assert_int_equal(mg_test_read_file(out, &text, &len), 0);
        print_message("%s -> %d: %s", bad[i], code, text);
        assert_int_equal(code, 2);
        char name[64];
        snprintf(name, sizeof(name), "%.*s", (int)strcspn(bad[i], "="), bad[i]);
        assert_non_null(strstr(text, name));
        free(text);
    }
    mg_test_rm_rf(dir);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_stuck_hook_aborts_and_says_where),
        cmocka_unit_test(test_runaway_policy_code_is_bounded),
        cmocka_unit_test(test_busy_gateway_not_tripped),
        cmocka_unit_test(test_setting_checked),
    };
    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
