/*
 * Tests of src/core/buf.c: appending, consuming from the front, the consumed front reclaimed
 * before the buffer grows, and an emptied buffer giving its memory back above keep_cap.
 */
#include "core/buf.h"
#include "moongate/error.h"

#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <string.h>

#include <cmocka.h>

static void test_append_consume(void **state)
{
    mg__buf_t b = { 0 };
    assert_int_equal(mg__buf_size(&b), 0);
    assert_int_equal(mg__buf_append(&b, "hello ", 6), 0);
    assert_int_equal(mg__buf_append(&b, "world", 5), 0);
    assert_int_equal(mg__buf_append(&b, "ignored", 0), 0);
    assert_int_equal(mg__buf_size(&b), 11);
    assert_memory_equal(b.data + b.off, "hello world", 11);
    mg__buf_consume(&b, 6, 1 << 20);
    assert_int_equal(mg__buf_size(&b), 5);
    assert_memory_equal(b.data + b.off, "world", 5);
    mg__buf_free(&b);
    assert_null(b.data);
}

static void test_front_reclaimed_before_growing(void **state)
{
    mg__buf_t b = { 0 };
    static char block[8192];
    memset(block, 'x', sizeof(block));
    for (int i = 0; i < 4; i++)
        assert_int_equal(mg__buf_append(&b, block, 1000), 0);
    size_t cap = b.cap;
    assert_true(cap - 600 <= sizeof(block));
    mg__buf_consume(&b, 3500, 1 << 20);
    /* Room at the front: an append that fits once it is reclaimed does not grow the buffer. */
    assert_int_equal(mg__buf_append(&b, block, cap - 600), 0);
    assert_int_equal(b.cap, cap);
    assert_int_equal(b.off, 0);
    assert_int_equal(mg__buf_size(&b), 500 + cap - 600);
    mg__buf_free(&b);
}

static void test_emptied_buffer_keeps_or_frees(void **state)
{
    mg__buf_t b = { 0 };
    char block[8192] = { 0 };
    assert_int_equal(mg__buf_append(&b, block, sizeof(block)), 0);
    mg__buf_consume(&b, sizeof(block), 1 << 20); /* under keep_cap: kept, emptied */
    assert_non_null(b.data);
    assert_int_equal(mg__buf_size(&b), 0);
    assert_int_equal(b.off, 0);
    assert_int_equal(mg__buf_append(&b, block, sizeof(block)), 0);
    mg__buf_consume(&b, sizeof(block), 1024); /* over keep_cap: given back */
    assert_null(b.data);
    assert_int_equal(b.cap, 0);
    mg__buf_free(&b);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_append_consume),
        cmocka_unit_test(test_front_reclaimed_before_growing),
        cmocka_unit_test(test_emptied_buffer_keeps_or_frees),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
