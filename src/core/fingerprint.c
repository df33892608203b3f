/*
 * fingerprint: see fingerprint.h.
 */
#include "fingerprint.h"

#include "moongate/error.h"

#include <openssl/evp.h>
#include <stdio.h>

int mg_fingerprint_sha256(const unsigned char digest[32], char *out, size_t outlen)
{
    unsigned char b64[48];
    int n = EVP_EncodeBlock(b64, digest, 32);
    while (n > 0 && b64[n - 1] == '=')
        n--;
    int w = snprintf(out, outlen, "SHA256:%.*s", n, (const char *)b64);
    return w < 0 || (size_t)w >= outlen ? MG_ENOMEM : 0;
}
