/*
 * The log line formats: the text line as it always was, and the JSON object per line
 * (MOONGATE_LOG_FORMAT=json), whose leading NAME=VALUE words become members. Every JSON line,
 * whatever bytes the message holds and however short the buffer, must parse (jansson reads
 * them back here), and must keep the fields a shipper indexes on.
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <cmocka.h>

#include "moongate/log.h"

#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static size_t fmt_line(char *line, size_t cap, const char *component, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
static size_t fmt_line(char *line, size_t cap, const char *component, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    size_t n = mg_log_format(line, cap, MG_LOG_INFO, component, fmt, ap);
    va_end(ap);
    return n;
}

/* The line as a JSON object (fails the test if it is not one, newline-ended). */
static json_t *parse(const char *line, size_t n)
{
    assert_true(n > 0 && line[n - 1] == '\n');
    json_error_t e;
    json_t *j = json_loadb(line, n - 1, 0, &e);
    if (j == NULL || !json_is_object(j))
        fail_msg("not a JSON object (%s): %.*s", e.text, (int)n, line);
    return j;
}

static const char *str(json_t *j, const char *key)
{
    json_t *v = json_object_get(j, key);
    return json_is_string(v) ? json_string_value(v) : NULL;
}

static void test_text_line(void **state)
{
    mg_log_set_format(MG_LOG_TEXT);
    char line[256];
    size_t n = fmt_line(line, sizeof(line), "ssh", "user=%s conn=%d ready in %d ms", "alice", 3, 27);
    line[n] = '\0';
    /* 2026-11-26T15:20:43.123Z info  ssh: user=alice conn=3 ready in 27 ms */
    assert_int_equal(n, 24 + 1 + 5 + 1 + strlen("ssh: user=alice conn=3 ready in 27 ms") + 1);
    assert_memory_equal(line + 23, "Z info  ssh: user=alice conn=3 ready in 27 ms\n", n - 23);
}

static void test_json_fields(void **state)
{
    mg_log_set_format(MG_LOG_JSON);
    char line[2048];
    size_t n = fmt_line(line, sizeof(line), "http",
                        "req=%s user=%s client=%s ua=%s %s -> %d", "9fe8d68b", "alice",
                        "127.0.0.1", "\"curl/8.0 \\\"x\\\" \\\\ y\"", "GET /hello", 200);
    json_t *j = parse(line, n);
    assert_string_equal(str(j, "level"), "info");
    assert_string_equal(str(j, "component"), "http");
    assert_string_equal(str(j, "request_id"), "9fe8d68b");
    assert_string_equal(str(j, "user"), "alice");
    assert_string_equal(str(j, "client"), "127.0.0.1");
    assert_string_equal(str(j, "ua"), "curl/8.0 \"x\" \\ y");
    assert_string_equal(str(j, "msg"), "GET /hello -> 200");
    assert_int_equal(strlen(str(j, "time")), 24);
    json_decref(j);

    /* A number is a number, "-" is left out, and a word that is not NAME=VALUE ends them. */
    n = fmt_line(line, sizeof(line), "pool", "user=- conn=%d id=007 Ready=1 x=2", 12);
    j = parse(line, n);
    assert_null(json_object_get(j, "user"));
    assert_int_equal(json_integer_value(json_object_get(j, "conn")), 12);
    assert_string_equal(str(j, "id"), "007");
    assert_null(json_object_get(j, "x"));
    assert_string_equal(str(j, "msg"), "Ready=1 x=2");
    json_decref(j);

    /* An unterminated quote is no field: all of it is the message. */
    n = fmt_line(line, sizeof(line), "http", "ua=\"open user=bob");
    j = parse(line, n);
    assert_string_equal(str(j, "msg"), "ua=\"open user=bob");
    json_decref(j);
    mg_log_set_format(MG_LOG_TEXT);
}

static void test_json_escapes(void **state)
{
    mg_log_set_format(MG_LOG_JSON);
    char line[512];
    /* Control bytes, quotes, valid UTF-8 kept, invalid UTF-8 (a lone continuation byte, an
       overlong form, a surrogate) as U+FFFD. */
    size_t n = fmt_line(line, sizeof(line), "policy", "a\tb\"c\\d\x01 caf\xc3\xa9 \x80 \xc0\xaf \xed\xa0\x80!");
    json_t *j = parse(line, n);
    assert_string_equal(str(j, "msg"), "a\tb\"c\\d\x01 caf\xc3\xa9 \xef\xbf\xbd \xef\xbf\xbd\xef\xbf\xbd "
                                       "\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd!");
    json_decref(j);
    mg_log_set_format(MG_LOG_TEXT);
}

/* Random messages cut at random lengths: every line is one JSON object with its msg. */
static void test_json_always_parses(void **state)
{
    mg_log_set_format(MG_LOG_JSON);
    srand(12345);
    static const char pieces[][12] = { "user=", "req=", "\"", "\\", "\xc3\xa9", "\xe2\x82\xac",
                                       "\x80", "\x01", " ", "=", "a", "conn=7 ", "ua=\"x\" " };
    for (int round = 0; round < 5000; round++) {
        char msg[1500];
        size_t ml = 0;
        int parts = rand() % 200;
        for (int i = 0; i < parts; i++) {
            const char *p = pieces[rand() % (sizeof(pieces) / sizeof(pieces[0]))];
            size_t pl = strlen(p);
            if (ml + pl + 1 >= sizeof(msg))
                break;
            memcpy(msg + ml, p, pl);
            ml += pl;
        }
        msg[ml] = '\0';
        size_t cap = 128 + (size_t)(rand() % 1500);
        char *line = malloc(cap);
        size_t n = fmt_line(line, cap, "fuzz", "%s", msg);
        assert_true(n <= cap);
        json_t *j = parse(line, n);
        assert_non_null(str(j, "msg"));
        json_decref(j);
        free(line);
    }
    mg_log_set_format(MG_LOG_TEXT);
}

static void test_format_parse(void **state)
{
    mg_log_format_t f;
    assert_int_equal(mg_log_format_parse("json", &f), 0);
    assert_int_equal(f, MG_LOG_JSON);
    assert_int_equal(mg_log_format_parse("text", &f), 0);
    assert_int_equal(f, MG_LOG_TEXT);
    assert_int_not_equal(mg_log_format_parse("JSON", &f), 0);
    assert_int_not_equal(mg_log_format_parse("", &f), 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_text_line),
        cmocka_unit_test(test_json_fields),
        cmocka_unit_test(test_json_escapes),
        cmocka_unit_test(test_json_always_parses),
        cmocka_unit_test(test_format_parse),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
