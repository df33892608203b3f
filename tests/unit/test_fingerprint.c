/*
 * Tests of src/core/fingerprint.c: the SHA256 fingerprint as OpenSSH prints it, and a buffer
 * too small for it.
 */
#include "core/fingerprint.h"
#include "moongate/error.h"

#include <openssl/sha.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <string.h>

#include <cmocka.h>

static void test_known_digest(void **state)
{
    /* SHA256 of nothing: e3b0c442...b855, "47DEQpj8...SuFU=" in base64, unpadded here. */
    unsigned char d[32];
    SHA256((const unsigned char *)"", 0, d);
    char out[MG_FINGERPRINT_MAX];
    assert_int_equal(mg_fingerprint_sha256(d, out, sizeof(out)), 0);
    assert_string_equal(out, "SHA256:47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU");
    assert_int_equal(strlen(out), MG_FINGERPRINT_MAX - 1);
}

static void test_small_buffer(void **state)
{
    unsigned char d[32] = { 0 };
    char out[20];
    assert_int_equal(mg_fingerprint_sha256(d, out, sizeof(out)), MG_ENOMEM);
    assert_int_equal(strlen(out), sizeof(out) - 1);
    assert_memory_equal(out, "SHA256:AAAA", 11);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_known_digest),
        cmocka_unit_test(test_small_buffer),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
