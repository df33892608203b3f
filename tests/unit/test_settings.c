/*
 * Settings from the environment: defaults, overrides, and errors that name the variable.
 */
#include "moongate/error.h"
#include "moongate/settings.h"

#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>
#include <stdlib.h>
#include <string.h>

static const char *const all_vars[] = {
    "MAX_CONNECTIONS_PER_USER", "MAX_IDLE_TIME", "CLEANUP_INTERVAL", "SSH_KEEPALIVE_INTERVAL",
    "SSH_KEEPALIVE_MAX_MISSES", "SSH_MAX_CHANNELS", "SSH_CONNECTION_TIMEOUT",
    "QUEUE_MAX_PER_USER", "QUEUE_TIMEOUT", "SHUTDOWN_GRACE_PERIOD",
    "SHUTDOWN_FORCE_AFTER_GRACE", "SHUTDOWN_NOTIFY_CLIENTS", "MOONGATE_LOG_LEVEL",
};

static int clear_env(void **state)
{
    for (size_t i = 0; i < sizeof(all_vars) / sizeof(all_vars[0]); i++)
        unsetenv(all_vars[i]);
    return 0;
}

static void test_defaults(void **state)
{
    mg_settings_t s;
    mg_settings_init(&s);
    char err[256] = "";
    assert_int_equal(mg_settings_from_env(&s, err, sizeof(err)), 0);
    assert_int_equal(s.max_connections_per_user, 3);
    assert_int_equal(s.max_idle_ms, 300000);
    assert_int_equal(s.cleanup_interval_ms, 30000);
    assert_int_equal(s.keepalive_interval_ms, 60000);
    assert_int_equal(s.max_channels, 10);
    assert_int_equal(s.connect_timeout_ms, 30000);
    assert_int_equal(s.shutdown_grace_ms, 30000);
    assert_true(s.shutdown_force_after_grace);
    assert_true(s.shutdown_notify_clients);
    assert_int_equal(s.log_level, MG_LOG_INFO);
}

static void test_overrides(void **state)
{
    setenv("MAX_CONNECTIONS_PER_USER", "5", 1);
    setenv("SSH_MAX_CHANNELS", "20", 1);
    setenv("SSH_KEEPALIVE_INTERVAL", "2000", 1);
    setenv("SHUTDOWN_FORCE_AFTER_GRACE", "false", 1);
    setenv("SHUTDOWN_NOTIFY_CLIENTS", "0", 1);
    setenv("MOONGATE_LOG_LEVEL", "debug", 1);
    setenv("QUEUE_TIMEOUT", "", 1); /* empty keeps the default */
    mg_settings_t s;
    mg_settings_init(&s);
    char err[256] = "";
    assert_int_equal(mg_settings_from_env(&s, err, sizeof(err)), 0);
    assert_int_equal(s.max_connections_per_user, 5);
    assert_int_equal(s.max_channels, 20);
    assert_int_equal(s.keepalive_interval_ms, 2000);
    assert_false(s.shutdown_force_after_grace);
    assert_false(s.shutdown_notify_clients);
    assert_int_equal(s.log_level, MG_LOG_DEBUG);
    assert_int_equal(s.queue_timeout_ms, 30000);
}

/* Each bad value is refused with the variable's name, and the settings are left as they were. */
static void test_errors_name_the_variable(void **state)
{
    static const struct {
        const char *var, *value;
    } bad[] = {
        { "SSH_MAX_CHANNELS", "ten" },       { "SSH_MAX_CHANNELS", "0" },
        { "MAX_CONNECTIONS_PER_USER", "-1" }, { "MAX_IDLE_TIME", "12abc" },
        { "SSH_KEEPALIVE_INTERVAL", "1000" }, { "QUEUE_TIMEOUT", "99999999999999999999" },
        { "SHUTDOWN_FORCE_AFTER_GRACE", "maybe" }, { "MOONGATE_LOG_LEVEL", "loud" },
        { "SSH_CONNECTION_TIMEOUT", "+5" },
    };
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        clear_env(NULL);
        setenv(bad[i].var, bad[i].value, 1);
        mg_settings_t s, before;
        mg_settings_init(&s);
        before = s;
        char err[256] = "";
        assert_int_equal(mg_settings_from_env(&s, err, sizeof(err)), MG_ECONFIG);
        assert_non_null(strstr(err, bad[i].var));
        assert_non_null(strstr(err, bad[i].value));
        assert_memory_equal(&s, &before, sizeof(s));
    }
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup(test_defaults, clear_env),
        cmocka_unit_test_setup(test_overrides, clear_env),
        cmocka_unit_test_setup(test_errors_name_the_variable, clear_env),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
