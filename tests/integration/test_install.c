/*
 * `cmake --install` into a temporary prefix, and the installed programs run from there: every
 * file in its place, `moongate -t` finding the installed Lua library (beside the binary, not
 * the source tree it was built from), and a real request through the installed moongate to a
 * real sshd and mg-upstream.
 */
#include "gwtest.h"

#include <sys/stat.h>
#include <sys/wait.h>

typedef struct world {
    mg_test_sshd_t sshd;
    mg_test_upstream_t up;
    char prefix[MG_TEST_PATH_MAX];
} world_t;

static int group_setup(void **state)
{
    world_t *w = calloc(1, sizeof(*w));
    if (w == NULL || mg_test_sshd_start(&w->sshd, NULL) != 0 ||
        mg_test_upstream_start(&w->up) != 0 ||
        mg_test_mkdtemp(w->prefix, sizeof(w->prefix), "mg-install") != 0)
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

static void install(world_t *w)
{
    static bool done;
    if (done)
        return;
    const char *bin = getenv("MG_BINARY_DIR");
    char build[MG_TEST_PATH_MAX], *out = NULL;
    snprintf(build, sizeof(build), "%s", bin && *bin ? bin : MG_BINARY_DIR);
    char *argv[] = { "cmake", "--install", build, "--prefix", w->prefix, NULL };
    if (gw_run(argv, w->prefix, NULL, NULL, 30000, &out) != 0)
        fail_msg("cmake --install failed:\n%s", out);
    free(out);
    done = true;
}

static void test_files_in_place(void **state)
{
    world_t *w = *state;
    install(w);
    static const char *const files[] = {
        "bin/moongate", "bin/moongate-agent", "share/moongate/lua/moongate/default.lua",
        "share/moongate/lua/moongate/token_bucket.lua", "share/moongate/policies/ollama.lua",
        "share/moongate/moongate.env", "lib/systemd/system/moongate.service",
        "lib/systemd/user/moongate-agent.service", "share/man/man8/moongate.8",
        "share/man/man1/moongate-agent.1",
    };
    for (size_t i = 0; i < sizeof(files) / sizeof(files[0]); i++) {
        char path[MG_TEST_PATH_MAX * 2];
        snprintf(path, sizeof(path), "%s/%s", w->prefix, files[i]);
        struct stat st;
        if (stat(path, &st) != 0)
            fail_msg("not installed: %s", path);
        if (strncmp(files[i], "bin/", 4) == 0)
            assert_true(st.st_mode & S_IXUSR);
    }
    /* The units name the programs where they are installed, not /usr/local. */
    char unit[MG_TEST_PATH_MAX * 2], want[MG_TEST_PATH_MAX * 2], *text = NULL;
    snprintf(unit, sizeof(unit), "%s/lib/systemd/system/moongate.service", w->prefix);
    assert_int_equal(mg_test_read_file(unit, &text, NULL), 0);
    snprintf(want, sizeof(want), "\nExecStart=%s/bin/moongate -c /etc/moongate/policy.lua\n",
             w->prefix);
    if (strstr(text, want) == NULL)
        fail_msg("wanted \"%s\" in %s", want + 1, unit);
    free(text);
    snprintf(unit, sizeof(unit), "%s/lib/systemd/user/moongate-agent.service", w->prefix);
    assert_int_equal(mg_test_read_file(unit, &text, NULL), 0);
    snprintf(want, sizeof(want), "\nExecStart=%s/bin/moongate-agent --gateway", w->prefix);
    if (strstr(text, want) == NULL)
        fail_msg("wanted \"%s\" in %s", want + 1, unit);
    free(text);
}

static void test_check_finds_the_installed_lua(void **state)
{
    world_t *w = *state;
    install(w);
    char exe[MG_TEST_PATH_MAX * 2], want[MG_TEST_PATH_MAX * 2], *text = NULL;
    snprintf(exe, sizeof(exe), "%s/bin/moongate", w->prefix);
    snprintf(want, sizeof(want), "Lua library: %s/bin/../share/moongate/lua)", w->prefix);
    unsetenv("MOONGATE_LUA_DIR");
    /* The built-in policy's route names these; -t checks they are there. */
    char kv[MG_TEST_PATH_MAX + 32], khv[MG_TEST_PATH_MAX + 32];
    snprintf(kv, sizeof(kv), "MOONGATE_SSH_KEY=%s", w->sshd.client_key);
    snprintf(khv, sizeof(khv), "MOONGATE_KNOWN_HOSTS=%s", w->sshd.known_hosts);
    const char *env[] = { kv, khv, "MOONGATE_LISTEN=127.0.0.1:0", NULL };
    static char *envp[1024];
    gw_env_merge(envp, sizeof(envp) / sizeof(envp[0]), env);
    char *argv[] = { exe, "-t", NULL };
    int rc = gw_run(argv, w->prefix, "/", envp, 30000, &text);
    if (rc != 0 || strstr(text, want) == NULL)
        fail_msg("moongate -t exited %d, wanted \"%s\" in:\n%s", rc, want, text);
    free(text);
}

static void test_request_through_the_installed_program(void **state)
{
    world_t *w = *state;
    install(w);
    /* gw_binary() takes the program from $MG_BINARY_DIR: point it at the installed one. */
    char bindir[MG_TEST_PATH_MAX * 2];
    snprintf(bindir, sizeof(bindir), "%s/bin", w->prefix);
    char *saved = getenv("MG_BINARY_DIR") ? strdup(getenv("MG_BINARY_DIR")) : NULL;
    setenv("MG_BINARY_DIR", bindir, 1);
    char route[2048], text[4096];
    gw_route_fields(route, sizeof(route), &w->sshd, w->up.port);
    snprintf(text, sizeof(text),
             "local mg = require \"moongate\"\n"
             "return {\n"
             "  authenticate = function(req) return \"alice\" end,\n"
             "  route = function(req, user) return { %s } end,\n"
             "}\n",
             route);
    gw_t g = { 0 };
    gw_start_policy(&g, text, 0, NULL);
    if (saved != NULL) {
        setenv("MG_BINARY_DIR", saved, 1);
        free(saved);
    } else {
        unsetenv("MG_BINARY_DIR");
    }
    /* It is the installed program that runs. */
    char link[64], exe[MG_TEST_PATH_MAX * 2] = "", want[MG_TEST_PATH_MAX * 2 + 16];
    snprintf(link, sizeof(link), "/proc/%d/exe", (int)g.proc.pid);
    ssize_t n = readlink(link, exe, sizeof(exe) - 1);
    exe[n > 0 ? n : 0] = '\0';
    snprintf(want, sizeof(want), "%s/moongate", bindir);
    assert_string_equal(exe, want);
    mg_test_http_response_t r;
    int rc = gw_request(&g, "GET", "/hello", NULL, NULL, 0, &r, 10000);
    gw_expect_status(&g, rc, &r, 200, "through the installed moongate");
    assert_string_equal(r.body, "hello\n");
    mg_test_http_response_free(&r);
    gw_stop(&g);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_files_in_place),
        cmocka_unit_test(test_check_finds_the_installed_lua),
        cmocka_unit_test(test_request_through_the_installed_program),
    };
    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
