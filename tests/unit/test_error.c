/*
 * Tests of src/core/error.c: every code the headers say a function may return has words, and a
 * code from libuv or the system (an errno, a getaddrinfo failure, the end of a stream) says
 * what it is rather than "unknown error".
 */
#include "moongate/error.h"

#include <errno.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <string.h>
#include <uv.h>

#include <cmocka.h>

static void test_own_codes(void **state)
{
    for (int e = MG_ECONFIG; e <= MG_EAGAIN; e++) {
        const char *s = mg_strerror(e);
        assert_non_null(s);
        assert_true(strlen(s) > 3);
        assert_null(strstr(s, "nknown"));
    }
    assert_string_equal(mg_strerror(MG_OK), "success");
    assert_string_equal(mg_strerror(MG_EHOSTKEY), "host key verification failed");
}

static void test_libuv_and_system_codes(void **state)
{
    assert_string_equal(mg_strerror(UV_EOF), "end of file");
    assert_string_equal(mg_strerror(UV_ECONNREFUSED), "connection refused");
    assert_string_equal(mg_strerror(-ECONNRESET), "connection reset by peer");
    assert_string_equal(mg_strerror(UV_EAI_NONAME), "unknown node or service");
    assert_string_equal(mg_strerror(UV_EAI_AGAIN), "temporary failure");
}

static void test_unknown_code_names_its_number(void **state)
{
    const char *s = mg_strerror(-987654);
    assert_non_null(strstr(s, "-987654"));
    assert_non_null(strstr(mg_strerror(12345), "12345"));
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_own_codes),
        cmocka_unit_test(test_libuv_and_system_codes),
        cmocka_unit_test(test_unknown_code_names_its_number),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
