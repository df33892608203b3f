/*
 * fingerprint: a key's SHA256 fingerprint as OpenSSH prints it ("SHA256:" and the digest in
 * unpadded base64, as `ssh-keygen -l` shows), written in one place for the host keys the SSH
 * client checks and the keys moongate-agent's setup prints. Internal to moongate's libraries.
 */
#ifndef MOONGATE_FINGERPRINT_H
#define MOONGATE_FINGERPRINT_H

#include <stddef.h>

#define MG_FINGERPRINT_MAX 51 /* "SHA256:" and 43 base64 characters, and the NUL */

/* Writes the fingerprint of a SHA256 digest (32 bytes). Returns 0, or MG_ENOMEM when out is
   too small (then out holds as much as fits). */
int mg_fingerprint_sha256(const unsigned char digest[32], char *out, size_t outlen);

#endif
