/*
 * Runs the Lua-side tests: each tests/lua/test_*.lua is loaded as a policy file, runs its cases
 * while loading (tests/lua/harness.lua) and fails the load, with the failures in the error, if
 * any case fails.
 */
#include "test_policy_util.h"

#include <dirent.h>

static void tweak(mg_policy_options_t *o)
{
    o->load_timeout_ms = 10000;
    o->dict_max_bytes = 16u << 20;
}

static void run_lua_file(void **state)
{
    const char *path = *state;
    mg_policy_t *p = tp_policy_opts(path, tweak);
    tp_free(p);
}

static int setup(void **state)
{
    return tp_setup(state);
}

int main(void)
{
    setenv("MG_TEST_ENV", "forty-two", 1);
    mg_log_set_level(MG_LOG_WARN);
    static char paths[32][512];
    static struct CMUnitTest tests[32];
    size_t n = 0;
    DIR *dir = opendir(MG_SOURCE_DIR "/tests/lua");
    assert_non_null(dir);
    struct dirent *e;
    while ((e = readdir(dir)) != NULL && n < 32) {
        size_t len = strlen(e->d_name);
        if (strncmp(e->d_name, "test_", 5) != 0 || len < 5 || strcmp(e->d_name + len - 4, ".lua") != 0)
            continue;
        snprintf(paths[n], sizeof(paths[n]), "%s/tests/lua/%s", MG_SOURCE_DIR, e->d_name);
        tests[n] = (struct CMUnitTest){ e->d_name, run_lua_file, setup, tp_teardown, paths[n] };
        n++;
    }
    closedir(dir);
    /* readdir keeps no order; names in cmocka's output should. */
    for (size_t i = 0; i < n; i++)
        for (size_t j = i + 1; j < n; j++)
            if (strcmp(paths[i], paths[j]) > 0) {
                char tmp[512];
                memcpy(tmp, paths[i], 512);
                memcpy(paths[i], paths[j], 512);
                memcpy(paths[j], tmp, 512);
            }
    for (size_t i = 0; i < n; i++)
        tests[i].name = strrchr(paths[i], '/') + 1;
    assert_true(n >= 2);
    int rc = _cmocka_run_group_tests("lua", tests, n, NULL, NULL);
    tp_cleanup_dir();
    return rc;
}
