/*
 * Tests for src/core/json.c: the bounded buffer, number formatting, string escaping (every control
 * character, UTF-8 valid and not), nesting and commas, misuse, and the size limit.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "moongate/error.h"
#include "moongate/json.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* The document j holds; fails the test if it is not complete. */
static const char *doc(const mg_json_t *j)
{
    size_t len = 0;
    const char *s = mg_json_buf(j, &len);
    assert_non_null(s);
    assert_int_equal(strlen(s), len);
    return s;
}

/* One string value, written as a whole document. */
static void check_string(const char *in, size_t n, const char *want)
{
    mg_json_t j;
    mg_json_init(&j, MG_STRBUF_UNBOUNDED);
    assert_int_equal(mg_json_string_n(&j, in, n), 0);
    assert_string_equal(doc(&j), want);
    mg_json_free(&j);
}

static void test_strbuf_basics(void **state)
{
    mg_strbuf_t sb;
    mg_strbuf_init(&sb, MG_STRBUF_UNBOUNDED);
    assert_null(sb.data);
    assert_int_equal(mg_strbuf_append_str(&sb, "abc"), 0);
    assert_int_equal(mg_strbuf_append_char(&sb, '-'), 0);
    assert_int_equal(mg_strbuf_append(&sb, "xyz", 0), 0);
    assert_string_equal(sb.data, "abc-");
    assert_int_equal(sb.len, 4);
    mg_strbuf_truncate(&sb, 2);
    assert_string_equal(sb.data, "ab");
    mg_strbuf_truncate(&sb, 10);
    assert_string_equal(sb.data, "ab");
    mg_strbuf_reset(&sb);
    assert_string_equal(sb.data, "");
    assert_int_equal(sb.len, 0);

    /* Growth across many small appends keeps every byte. */
    for (int i = 0; i < 10000; i++)
        assert_int_equal(mg_strbuf_append_char(&sb, (char)('a' + i % 26)), 0);
    assert_int_equal(sb.len, 10000);
    for (int i = 0; i < 10000; i++)
        assert_int_equal(sb.data[i], 'a' + i % 26);
    assert_int_equal(sb.data[10000], '\0');
    mg_strbuf_free(&sb);
    assert_null(sb.data);
    assert_int_equal(mg_strbuf_append_str(&sb, "again"), 0);
    assert_string_equal(sb.data, "again");
    mg_strbuf_free(&sb);
}

static void test_strbuf_limit(void **state)
{
    mg_strbuf_t sb;
    mg_strbuf_init(&sb, 10);
    assert_int_equal(mg_strbuf_append_str(&sb, "0123456"), 0);
    /* A write that would pass the limit fails whole and leaves the buffer as it was. */
    assert_int_equal(mg_strbuf_append_str(&sb, "7890"), MG_ENOMEM);
    assert_string_equal(sb.data, "0123456");
    assert_int_equal(mg_strbuf_append_str(&sb, "789"), 0);
    assert_string_equal(sb.data, "0123456789");
    assert_int_equal(mg_strbuf_append_char(&sb, 'x'), MG_ENOMEM);
    assert_int_equal(mg_strbuf_append_u64(&sb, 1), MG_ENOMEM);
    assert_int_equal(mg_strbuf_append_double(&sb, 1.5), MG_ENOMEM);
    assert_int_equal(mg_strbuf_append(&sb, "", 0), 0);
    assert_true(sb.cap <= 11); /* the limit bounds the memory too */
    mg_strbuf_free(&sb);

    mg_strbuf_init(&sb, 0);
    assert_int_equal(mg_strbuf_append_char(&sb, 'x'), MG_ENOMEM);
    assert_null(sb.data);
    mg_strbuf_free(&sb);
}

static void check_u64(uint64_t v, const char *want)
{
    mg_strbuf_t sb;
    mg_strbuf_init(&sb, 64);
    assert_int_equal(mg_strbuf_append_u64(&sb, v), 0);
    assert_string_equal(sb.data, want);
    mg_strbuf_free(&sb);
}

static void check_i64(int64_t v, const char *want)
{
    mg_strbuf_t sb;
    mg_strbuf_init(&sb, 64);
    assert_int_equal(mg_strbuf_append_i64(&sb, v), 0);
    assert_string_equal(sb.data, want);
    mg_strbuf_free(&sb);
}

static void check_double(double v, const char *want)
{
    mg_strbuf_t sb;
    mg_strbuf_init(&sb, 64);
    assert_int_equal(mg_strbuf_append_double(&sb, v), 0);
    assert_string_equal(sb.data, want);
    mg_strbuf_free(&sb);
}

static void test_strbuf_numbers(void **state)
{
    check_u64(0, "0");
    check_u64(7, "7");
    check_u64(1234567890, "1234567890");
    check_u64(UINT64_MAX, "18446744073709551615");
    check_i64(0, "0");
    check_i64(-1, "-1");
    check_i64(INT64_MAX, "9223372036854775807");
    check_i64(INT64_MIN, "-9223372036854775808");

    check_double(0, "0");
    check_double(1, "1");
    check_double(-2.5, "-2.5");
    check_double(0.001, "0.001");
    check_double(60, "60");
    check_double(0.1, "0.1");
    check_double(0.1 + 0.2, "0.30000000000000004");
    check_double(1e-05, "1e-05");
    check_double(1e300, "1e+300");
    check_double(123456789012.0, "123456789012");
    check_double(NAN, "NaN");
    check_double(INFINITY, "+Inf");
    check_double(-INFINITY, "-Inf");

    /* Every written double reads back to itself. */
    unsigned seed = 12345;
    for (int i = 0; i < 20000; i++) {
        uint64_t bits = 0;
        for (int k = 0; k < 4; k++)
            bits = (bits << 16) ^ (uint64_t)(rand_r(&seed) & 0xffff);
        double v;
        memcpy(&v, &bits, sizeof(v));
        if (!isfinite(v))
            continue;
        mg_strbuf_t sb;
        mg_strbuf_init(&sb, 64);
        assert_int_equal(mg_strbuf_append_double(&sb, v), 0);
        assert_true(strtod(sb.data, NULL) == v);
        mg_strbuf_free(&sb);
    }
}

static void test_escape_control_characters(void **state)
{
    char in[32];
    for (int c = 0; c < 32; c++)
        in[c] = (char)c;
    char want[2 + 32 * 6 + 1];
    size_t n = 0;
    want[n++] = '"';
    for (int c = 0; c < 32; c++) {
        static const char hex[] = "0123456789abcdef";
        want[n++] = '\\';
        want[n++] = 'u';
        want[n++] = '0';
        want[n++] = '0';
        want[n++] = hex[c >> 4];
        want[n++] = hex[c & 15];
    }
    want[n++] = '"';
    want[n] = '\0';
    check_string(in, sizeof(in), want);

    /* Each one alone, between ordinary characters. */
    for (int c = 0; c < 32; c++) {
        char one[3] = { 'a', (char)c, 'b' };
        char w[16];
        snprintf(w, sizeof(w), "\"a\\u%04xb\"", c);
        check_string(one, sizeof(one), w);
    }
}

static void test_escape_quote_backslash(void **state)
{
    check_string("", 0, "\"\"");
    check_string("plain", 5, "\"plain\"");
    check_string("a\"b\\c", 5, "\"a\\\"b\\\\c\"");
    check_string("\"\\\"", 3, "\"\\\"\\\\\\\"\"");
    check_string("/ and \x7f", 7, "\"/ and \x7f\"");
    check_string("tab\tnl\n", 7, "\"tab\\u0009nl\\u000a\"");
}

static void test_escape_utf8(void **state)
{
    /* Valid UTF-8 of every length passes through unchanged. */
    const char *ok = "h\xc3\xa9llo \xe2\x82\xac \xf0\x9d\x84\x9e \xef\xbf\xbf \xf4\x8f\xbf\xbf";
    char want[64];
    snprintf(want, sizeof(want), "\"%s\"", ok);
    check_string(ok, strlen(ok), want);

    /* Each byte of an invalid sequence becomes U+FFFD; what follows is read afresh. */
    check_string("\xff", 1, "\"\\ufffd\"");
    check_string("a\x80z", 3, "\"a\\ufffdz\"");
    check_string("\xc0\xaf", 2, "\"\\ufffd\\ufffd\"");               /* overlong '/' */
    check_string("\xe0\x80\xaf", 3, "\"\\ufffd\\ufffd\\ufffd\"");    /* overlong, 3 bytes */
    check_string("\xe2\x82", 2, "\"\\ufffd\\ufffd\"");               /* truncated at the end */
    check_string("\xe2\x82x", 3, "\"\\ufffd\\ufffdx\"");             /* truncated mid-string */
    check_string("\xed\xa0\x80", 3, "\"\\ufffd\\ufffd\\ufffd\"");    /* a UTF-16 surrogate */
    check_string("\xf4\x90\x80\x80", 4,
                 "\"\\ufffd\\ufffd\\ufffd\\ufffd\"");                /* past U+10FFFF */
    check_string("\xc3\xa9\xc3", 3, "\"\xc3\xa9\\ufffd\"");
}

/*
 * Checks that s is one valid JSON string token and decodes it into out (the bytes it stands
 * for, with \u00XX turned back into a byte and \ufffd into its UTF-8 form).
 */
static size_t decode_string(const char *s, char *out)
{
    size_t n = 0;
    assert_int_equal(*s++, '"');
    for (;;) {
        unsigned char c = (unsigned char)*s++;
        assert_true(c >= 0x20);
        if (c == '"')
            break;
        if (c != '\\') {
            out[n++] = (char)c;
            continue;
        }
        c = (unsigned char)*s++;
        if (c == '"' || c == '\\') {
            out[n++] = (char)c;
            continue;
        }
        assert_int_equal(c, 'u');
        char hex[5] = { s[0], s[1], s[2], s[3], 0 };
        s += 4;
        unsigned long cp = strtoul(hex, NULL, 16);
        if (cp == 0xfffd) {
            memcpy(out + n, "\xef\xbf\xbd", 3);
            n += 3;
        } else {
            assert_true(cp < 0x20);
            out[n++] = (char)cp;
        }
    }
    assert_int_equal(*s, '\0');
    return n;
}

static void test_escape_random_round_trip(void **state)
{
    unsigned seed = 99;
    for (int iter = 0; iter < 3000; iter++) {
        /* Mostly ASCII with control characters and well-formed UTF-8: these must round-trip. */
        char in[64];
        size_t n = 0;
        size_t want = (size_t)(rand_r(&seed) % 40);
        while (n < want) {
            int r = rand_r(&seed) % 10;
            if (r < 5)
                in[n++] = (char)(rand_r(&seed) % 128);
            else if (r < 7)
                n += (size_t)snprintf(in + n, sizeof(in) - n, "\xc3\xa9");
            else if (r < 9)
                n += (size_t)snprintf(in + n, sizeof(in) - n, "\xe2\x82\xac");
            else
                n += (size_t)snprintf(in + n, sizeof(in) - n, "\xf0\x9f\x98\x80");
        }
        mg_json_t j;
        mg_json_init(&j, MG_STRBUF_UNBOUNDED);
        assert_int_equal(mg_json_string_n(&j, in, n), 0);
        char out[64 * 6];
        size_t m = decode_string(doc(&j), out);
        assert_int_equal(m, n);
        assert_memory_equal(out, in, n);
        mg_json_free(&j);

        /* Arbitrary bytes: the output is still one valid string token. */
        for (size_t k = 0; k < sizeof(in); k++)
            in[k] = (char)(rand_r(&seed) & 0xff);
        mg_json_init(&j, MG_STRBUF_UNBOUNDED);
        assert_int_equal(mg_json_string_n(&j, in, sizeof(in)), 0);
        decode_string(doc(&j), out);
        mg_json_free(&j);
    }
}

static void test_nesting_and_commas(void **state)
{
    mg_json_t j;
    mg_json_init(&j, MG_STRBUF_UNBOUNDED);
    mg_json_begin_object(&j);
    mg_json_key(&j, "a");
    mg_json_int(&j, 1);
    mg_json_key(&j, "b");
    mg_json_begin_array(&j);
    mg_json_int(&j, 1);
    mg_json_uint(&j, 2);
    mg_json_begin_object(&j);
    mg_json_key(&j, "c");
    mg_json_null(&j);
    mg_json_end_object(&j);
    mg_json_begin_array(&j);
    mg_json_end_array(&j);
    mg_json_bool(&j, true);
    mg_json_end_array(&j);
    mg_json_key(&j, "d");
    mg_json_begin_object(&j);
    mg_json_end_object(&j);
    mg_json_key(&j, "e\"q");
    mg_json_bool(&j, false);
    mg_json_key_n(&j, "fgh", 1);
    mg_json_double(&j, 2.5);
    mg_json_key(&j, "g");
    mg_json_string(&j, NULL);
    assert_int_equal(mg_json_end_object(&j), 0);
    assert_string_equal(doc(&j),
                        "{\"a\":1,\"b\":[1,2,{\"c\":null},[],true],\"d\":{},\"e\\\"q\":false,"
                        "\"f\":2.5,\"g\":null}");

    /* A scalar is a document too, and reset starts over in the same memory. */
    mg_json_reset(&j);
    assert_null(mg_json_buf(&j, NULL));
    assert_int_equal(mg_json_int(&j, -42), 0);
    assert_string_equal(doc(&j), "-42");
    mg_json_free(&j);
}

static void test_numbers(void **state)
{
    mg_json_t j;
    mg_json_init(&j, MG_STRBUF_UNBOUNDED);
    mg_json_begin_array(&j);
    mg_json_int(&j, INT64_MIN);
    mg_json_int(&j, INT64_MAX);
    mg_json_uint(&j, UINT64_MAX);
    mg_json_double(&j, 0.1);
    mg_json_double(&j, -0.0);
    mg_json_double(&j, 1e300);
    mg_json_double(&j, NAN);
    mg_json_double(&j, INFINITY);
    mg_json_double(&j, -INFINITY);
    mg_json_double(&j, 3);
    assert_int_equal(mg_json_end_array(&j), 0);
    assert_string_equal(doc(&j), "[-9223372036854775808,9223372036854775807,"
                                 "18446744073709551615,0.1,-0,1e+300,null,null,null,3]");
    mg_json_free(&j);
}

static void test_error_body(void **state)
{
    mg_json_t j;
    mg_json_init(&j, 4096);
    mg_json_begin_object(&j);
    mg_json_key(&j, "error");
    mg_json_string(&j, "user \"bob\" is over the limit\n");
    mg_json_key(&j, "request_id");
    mg_json_string(&j, "r-0001");
    assert_int_equal(mg_json_end_object(&j), 0);
    assert_string_equal(doc(&j), "{\"error\":\"user \\\"bob\\\" is over the limit\\u000a\","
                                 "\"request_id\":\"r-0001\"}");
    mg_json_free(&j);
}

/* Runs one misuse after a valid prefix; the error must stick and the document be refused. */
static void check_misuse(int prefix, int (*bad)(mg_json_t *))
{
    mg_json_t j;
    mg_json_init(&j, MG_STRBUF_UNBOUNDED);
    if (prefix == 1)
        mg_json_begin_object(&j);
    else if (prefix == 2)
        mg_json_begin_array(&j);
    else if (prefix == 3)
        mg_json_int(&j, 1);
    else if (prefix == 4) {
        mg_json_begin_object(&j);
        mg_json_key(&j, "k");
    }
    assert_int_equal(mg_json_error(&j), 0);
    assert_int_equal(bad(&j), MG_EINVAL);
    assert_int_equal(mg_json_error(&j), MG_EINVAL);
    size_t len = j.buf.len;
    assert_int_equal(mg_json_null(&j), MG_EINVAL);   /* sticky */
    assert_int_equal(mg_json_end_object(&j), MG_EINVAL);
    assert_int_equal(j.buf.len, len);                 /* and writes nothing */
    assert_null(mg_json_buf(&j, NULL));
    mg_json_reset(&j);
    assert_int_equal(mg_json_error(&j), 0);
    assert_int_equal(mg_json_bool(&j, true), 0);
    assert_string_equal(doc(&j), "true");
    mg_json_free(&j);
}

static int bad_value(mg_json_t *j) { return mg_json_int(j, 1); }
static int bad_key(mg_json_t *j) { return mg_json_key(j, "k"); }
static int bad_null_key(mg_json_t *j) { return mg_json_key(j, NULL); }
static int bad_end_array(mg_json_t *j) { return mg_json_end_array(j); }
static int bad_end_object(mg_json_t *j) { return mg_json_end_object(j); }

static void test_misuse(void **state)
{
    check_misuse(1, bad_value);      /* a value in an object without a key */
    check_misuse(2, bad_key);        /* a key in an array */
    check_misuse(0, bad_key);        /* a key at the top */
    check_misuse(1, bad_null_key);
    check_misuse(1, bad_end_array);  /* closing the wrong container */
    check_misuse(2, bad_end_object);
    check_misuse(0, bad_end_object); /* closing nothing */
    check_misuse(3, bad_value);      /* a second top-level value */
    check_misuse(4, bad_key);        /* two keys in a row */
    check_misuse(4, bad_end_object); /* a key without its value */

    /* Incomplete documents are refused. */
    mg_json_t j;
    mg_json_init(&j, MG_STRBUF_UNBOUNDED);
    assert_null(mg_json_buf(&j, NULL));
    mg_json_begin_array(&j);
    assert_null(mg_json_buf(&j, NULL));
    mg_json_end_array(&j);
    assert_string_equal(doc(&j), "[]");
    mg_json_free(&j);
}

static void test_depth_limit(void **state)
{
    mg_json_t j;
    mg_json_init(&j, MG_STRBUF_UNBOUNDED);
    for (int i = 0; i < MG_JSON_MAX_DEPTH; i++)
        assert_int_equal(mg_json_begin_array(&j), 0);
    assert_int_equal(mg_json_begin_object(&j), MG_EINVAL);
    mg_json_reset(&j);
    for (int i = 0; i < MG_JSON_MAX_DEPTH; i++)
        assert_int_equal(mg_json_begin_array(&j), 0);
    for (int i = 0; i < MG_JSON_MAX_DEPTH; i++)
        assert_int_equal(mg_json_end_array(&j), 0);
    assert_int_equal(strlen(doc(&j)), 2 * MG_JSON_MAX_DEPTH);
    mg_json_free(&j);
}

static void test_bounded_size(void **state)
{
    mg_json_t j;
    mg_json_init(&j, 32);
    int rc = mg_json_begin_array(&j);
    int written = 0;
    while (rc == 0) {
        rc = mg_json_string(&j, "abc");
        if (rc == 0)
            written++;
    }
    assert_int_equal(rc, MG_ENOMEM);
    assert_int_equal(written, 5); /* ["abc","abc","abc","abc","abc" is 31 bytes */
    assert_true(j.buf.len <= 32);
    assert_int_equal(mg_json_end_array(&j), MG_ENOMEM);
    assert_int_equal(mg_json_error(&j), MG_ENOMEM);
    assert_null(mg_json_buf(&j, NULL));

    /* The limit counts the document exactly: 32 bytes fit, 33 do not. */
    mg_json_reset(&j);
    assert_int_equal(mg_json_string(&j, "012345678901234567890123456789"), 0);
    assert_int_equal(strlen(doc(&j)), 32);
    mg_json_reset(&j);
    assert_int_equal(mg_json_string(&j, "0123456789012345678901234567890"), MG_ENOMEM);
    mg_json_free(&j);

    /* A long string past the limit fails partway without overrunning anything. */
    char big[1000];
    memset(big, '\x01', sizeof(big));
    mg_json_init(&j, 100);
    assert_int_equal(mg_json_string_n(&j, big, sizeof(big)), MG_ENOMEM);
    assert_true(j.buf.len <= 100);
    mg_json_free(&j);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_strbuf_basics),
        cmocka_unit_test(test_strbuf_limit),
        cmocka_unit_test(test_strbuf_numbers),
        cmocka_unit_test(test_escape_control_characters),
        cmocka_unit_test(test_escape_quote_backslash),
        cmocka_unit_test(test_escape_utf8),
        cmocka_unit_test(test_escape_random_round_trip),
        cmocka_unit_test(test_nesting_and_commas),
        cmocka_unit_test(test_numbers),
        cmocka_unit_test(test_error_body),
        cmocka_unit_test(test_misuse),
        cmocka_unit_test(test_depth_limit),
        cmocka_unit_test(test_bounded_size),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
