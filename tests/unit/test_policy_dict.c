/*
 * Tests of src/policy/policy_dict.c, the shared dictionary: values, expiry, counters and its
 * bounds.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#include "moongate/error.h"
#include "policy/policy_int.h"

#include <stdio.h>
#include <string.h>

#define K(s) s, strlen(s)

static mg_dict_value_t num(double v)
{
    return (mg_dict_value_t){ .type = MG_DICT_NUMBER, .num = v };
}

static mg_dict_value_t str(const char *s)
{
    return (mg_dict_value_t){ .type = MG_DICT_STRING, .str = s, .len = strlen(s) };
}

static void test_set_get_delete(void **state)
{
    mg_dict_t *d;
    assert_int_equal(mg__dict_new(10, 1000, &d), 0);
    mg_dict_value_t v = str("hello"), out;
    assert_int_equal(mg__dict_set(d, K("a"), &v, 0, 1000), 0);
    assert_true(mg__dict_get(d, K("a"), 1000, &out));
    assert_int_equal(out.type, MG_DICT_STRING);
    assert_int_equal(out.len, 5);
    assert_memory_equal(out.str, "hello", 5);
    v = num(4.5);
    assert_int_equal(mg__dict_set(d, K("a"), &v, 0, 1000), 0);
    assert_true(mg__dict_get(d, K("a"), 1000, &out));
    assert_int_equal(out.type, MG_DICT_NUMBER);
    assert_true(out.num == 4.5);
    /* Keys are bytes: an embedded NUL is part of the key. */
    v = str("x");
    assert_int_equal(mg__dict_set(d, "a\0b", 3, &v, 0, 1000), 0);
    assert_true(mg__dict_get(d, "a\0b", 3, 1000, &out));
    assert_true(mg__dict_get(d, K("a"), 1000, &out));
    assert_int_equal(out.type, MG_DICT_NUMBER);
    assert_int_equal(mg__dict_set(d, K("a"), NULL, 0, 1000), 0);
    assert_false(mg__dict_get(d, K("a"), 1000, &out));
    assert_int_equal(mg__dict_set(d, "", 0, &v, 0, 1000), MG_EINVAL);
    char big[MG_DICT_KEY_MAX + 1];
    memset(big, 'k', sizeof(big));
    assert_int_equal(mg__dict_set(d, big, sizeof(big), &v, 0, 1000), MG_EINVAL);
    mg__dict_free(d);
}

static void test_ttl_and_incr(void **state)
{
    mg_dict_t *d;
    assert_int_equal(mg__dict_new(10, 1000, &d), 0);
    double out;
    assert_int_equal(mg__dict_incr(d, K("n"), 1, 100, 1000, &out), 0);
    assert_true(out == 1);
    /* An existing key keeps its expiry. */
    assert_int_equal(mg__dict_incr(d, K("n"), 2, 5000, 1050, &out), 0);
    assert_true(out == 3);
    assert_int_equal(mg__dict_ttl(d, K("n"), 1050), 50);
    mg_dict_value_t v;
    assert_true(mg__dict_get(d, K("n"), 1099, &v));
    assert_false(mg__dict_get(d, K("n"), 1100, &v));
    assert_int_equal(mg__dict_ttl(d, K("n"), 1100), -2);
    /* Expired: starts again from 0 with the new ttl. */
    assert_int_equal(mg__dict_incr(d, K("n"), 1, 0, 1200, &out), 0);
    assert_true(out == 1);
    assert_int_equal(mg__dict_ttl(d, K("n"), 1200), -1);
    mg_dict_value_t s = str("text");
    assert_int_equal(mg__dict_set(d, K("s"), &s, 0, 1200), 0);
    assert_int_equal(mg__dict_incr(d, K("s"), 1, 0, 1200, &out), MG_EINVAL);
    mg__dict_free(d);
}

static void test_bounded_entries(void **state)
{
    mg_dict_t *d;
    assert_int_equal(mg__dict_new(3, 1000, &d), 0);
    mg_dict_value_t v = num(1);
    double out;
    assert_int_equal(mg__dict_set(d, K("a"), &v, 10, 0), 0);
    assert_int_equal(mg__dict_set(d, K("b"), &v, 0, 0), 0);
    assert_int_equal(mg__dict_set(d, K("c"), &v, 0, 0), 0);
    assert_int_equal(mg__dict_set(d, K("d"), &v, 0, 5), MG_ENOMEM);
    assert_int_equal(mg__dict_incr(d, K("d"), 1, 0, 5, &out), MG_ENOMEM);
    /* Replacing an existing key needs no room. */
    assert_int_equal(mg__dict_set(d, K("c"), &v, 0, 5), 0);
    /* Once "a" has expired, it makes room. */
    assert_int_equal(mg__dict_set(d, K("d"), &v, 0, 10), 0);
    size_t n, b, mn, mb;
    mg__dict_usage(d, &n, &b, &mn, &mb);
    assert_int_equal(n, 3);
    assert_int_equal(b, 3);
    mg__dict_free(d);
}

static void test_bounded_bytes(void **state)
{
    mg_dict_t *d;
    assert_int_equal(mg__dict_new(100, 20, &d), 0);
    mg_dict_value_t v = str("0123456789"); /* 1 + 10 bytes with key "a" */
    assert_int_equal(mg__dict_set(d, K("a"), &v, 0, 0), 0);
    assert_int_equal(mg__dict_set(d, K("b"), &v, 0, 0), MG_ENOMEM);
    mg_dict_value_t small = str("01234567");
    assert_int_equal(mg__dict_set(d, K("b"), &small, 0, 0), 0);
    size_t n, b, mn, mb;
    mg__dict_usage(d, &n, &b, &mn, &mb);
    assert_int_equal(b, 20);
    /* Shrinking a value frees its bytes. */
    mg_dict_value_t one = num(1);
    assert_int_equal(mg__dict_set(d, K("a"), &one, 0, 0), 0);
    mg__dict_usage(d, &n, &b, &mn, &mb);
    assert_int_equal(b, 10);
    mg__dict_free(d);
}

static void test_many_keys(void **state)
{
    mg_dict_t *d;
    assert_int_equal(mg__dict_new(100000, 10u << 20, &d), 0);
    char key[32];
    for (int i = 0; i < 50000; i++) {
        snprintf(key, sizeof(key), "user%d", i);
        double out;
        assert_int_equal(mg__dict_incr(d, key, strlen(key), i, 0, 0, &out), 0);
    }
    for (int i = 0; i < 50000; i += 777) {
        snprintf(key, sizeof(key), "user%d", i);
        mg_dict_value_t v;
        assert_true(mg__dict_get(d, key, strlen(key), 0, &v));
        assert_true(v.num == i);
    }
    mg__dict_free(d);
}

/* The token bucket's step: 3 tokens a minute (20 s each), burst 3. */
static void test_take_bucket(void **state)
{
    (void)state;
    mg_dict_t *d;
    assert_int_equal(mg__dict_new(100, 4096, &d), 0);
    bool ok;
    double v;
    double now = 1700000000.5;
    for (int i = 1; i <= 3; i++) {
        assert_int_equal(mg__dict_take_bucket(d, K("b"), 1, 20, 3, now, 1000, &ok, &v), 0);
        assert_true(ok);
        assert_true(v == now + 20 * i);
    }
    assert_int_equal(mg__dict_take_bucket(d, K("b"), 1, 20, 3, now, 1000, &ok, &v), 0);
    assert_false(ok);
    assert_true(v > 19.9 && v < 20.1); /* 20 s of debt over the burst */
    /* Nothing was taken by the refusal: 20 s later one token is back. */
    assert_int_equal(mg__dict_take_bucket(d, K("b"), 1, 20, 3, now + 20, 1000, &ok, &v), 0);
    assert_true(ok);
    /* The entry lives until the bucket is full again, in ms. */
    assert_int_equal(mg__dict_ttl(d, K("b"), 1000), 60000);
    /* A string is not a bucket. */
    mg_dict_value_t s = str("x");
    assert_int_equal(mg__dict_set(d, K("s"), &s, 0, 1000), 0);
    assert_int_equal(mg__dict_take_bucket(d, K("s"), 1, 20, 3, now, 1000, &ok, &v), MG_EINVAL);
    mg__dict_free(d);
}

static void test_redis_url(void **state)
{
    (void)state;
    mg__redis_addr_t a;
    char err[256];
    assert_int_equal(mg__redis_parse_url("redis://10.0.0.5", &a, err, sizeof(err)), 0);
    assert_string_equal(a.host, "10.0.0.5");
    assert_int_equal(a.port, 6379);
    assert_int_equal(a.db, 0);
    assert_string_equal(a.user, "");
    assert_string_equal(a.pass, "");
    assert_int_equal(mg__redis_parse_url("redis://moongate:p%40ss@redis.internal:7000/2", &a,
                                         err, sizeof(err)), 0);
    assert_string_equal(a.user, "moongate");
    assert_string_equal(a.pass, "p@ss");
    assert_string_equal(a.host, "redis.internal");
    assert_int_equal(a.port, 7000);
    assert_int_equal(a.db, 2);
    assert_string_equal(a.name, "redis://redis.internal:7000/2"); /* no password in logs */
    assert_int_equal(mg__redis_parse_url("redis://:secret@[::1]:6380", &a, err, sizeof(err)), 0);
    assert_string_equal(a.host, "::1");
    assert_int_equal(a.port, 6380);
    assert_string_equal(a.pass, "secret");
    assert_string_equal(a.name, "redis://[::1]:6380/0");

    static const char *const bad[] = {
        "http://x", "redis://", "redis://host:0", "redis://host:65536", "redis://host:x",
        "redis://host/db", "redis://pw@host", "redis://user:@host", "redis://[::1",
        "redis://u:%4@host", "redis://u:%00@host", "redis://u:%+1@host", "redis://u:% 1@host",
    };
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        err[0] = '\0';
        assert_int_equal(mg__redis_parse_url(bad[i], &a, err, sizeof(err)), MG_ECONFIG);
        assert_non_null(strstr(err, "MOONGATE_REDIS_URL"));
    }
    assert_int_equal(mg__redis_parse_url("rediss://:pw@cache.internal:6380/1", &a, err,
                                         sizeof(err)), 0);
    assert_true(a.tls);
    assert_string_equal(a.host, "cache.internal");
    assert_string_equal(a.name, "rediss://cache.internal:6380/1");
    assert_int_equal(mg__redis_parse_url("redis://host", &a, err, sizeof(err)), 0);
    assert_false(a.tls);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_set_get_delete),
        cmocka_unit_test(test_ttl_and_incr),
        cmocka_unit_test(test_bounded_entries),
        cmocka_unit_test(test_bounded_bytes),
        cmocka_unit_test(test_many_keys),
        cmocka_unit_test(test_take_bucket),
        cmocka_unit_test(test_redis_url),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
