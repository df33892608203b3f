/*
 * The host key check and the authentication of an SSH connection (see ssh_int.h): a pinned
 * SHA256 fingerprint or a known_hosts file, then the public key from a file. Every refusal says
 * what the server presented and what was expected.
 */
#include "ssh_int.h"

#include "core/fingerprint.h"
#include "moongate/error.h"
#include "moongate/log.h"

#include <errno.h>
#include <stdio.h>
#include <string.h>

static const char *key_type_name(int type)
{
    switch (type) {
    case LIBSSH2_HOSTKEY_TYPE_RSA: return "ssh-rsa";
    case LIBSSH2_HOSTKEY_TYPE_DSS: return "ssh-dss";
    case LIBSSH2_HOSTKEY_TYPE_ECDSA_256: return "ecdsa-sha2-nistp256";
    case LIBSSH2_HOSTKEY_TYPE_ECDSA_384: return "ecdsa-sha2-nistp384";
    case LIBSSH2_HOSTKEY_TYPE_ECDSA_521: return "ecdsa-sha2-nistp521";
    case LIBSSH2_HOSTKEY_TYPE_ED25519: return "ssh-ed25519";
    }
    return "unknown";
}

static int knownhost_type(int type)
{
    switch (type) {
    case LIBSSH2_HOSTKEY_TYPE_RSA: return LIBSSH2_KNOWNHOST_KEY_SSHRSA;
    case LIBSSH2_HOSTKEY_TYPE_DSS: return LIBSSH2_KNOWNHOST_KEY_SSHDSS;
    case LIBSSH2_HOSTKEY_TYPE_ECDSA_256: return LIBSSH2_KNOWNHOST_KEY_ECDSA_256;
    case LIBSSH2_HOSTKEY_TYPE_ECDSA_384: return LIBSSH2_KNOWNHOST_KEY_ECDSA_384;
    case LIBSSH2_HOSTKEY_TYPE_ECDSA_521: return LIBSSH2_KNOWNHOST_KEY_ECDSA_521;
    case LIBSSH2_HOSTKEY_TYPE_ED25519: return LIBSSH2_KNOWNHOST_KEY_ED25519;
    }
    return LIBSSH2_KNOWNHOST_KEY_UNKNOWN;
}

/* The host key's SHA256 fingerprint, or "SHA256:?" when libssh2 has none. */
static void host_key_fingerprint(LIBSSH2_SESSION *s, char *out, size_t outlen)
{
    const unsigned char *hash =
        (const unsigned char *)libssh2_hostkey_hash(s, LIBSSH2_HOSTKEY_HASH_SHA256);
    if (hash == NULL || mg_fingerprint_sha256(hash, out, outlen) != 0)
        snprintf(out, outlen, "SHA256:?");
}

/*
 * Reads a known_hosts file line by line, so that one line libssh2 does not understand (a key
 * type it lacks, a marker) does not hide the lines after it. Returns 0 or -errno.
 */
static int load_known_hosts(LIBSSH2_KNOWNHOSTS *kh, const char *path)
{
    FILE *f = fopen(path, "re");
    if (f == NULL)
        return -errno;
    char line[8192];
    while (fgets(line, sizeof(line), f)) {
        size_t len = strlen(line);
        while (len > 0 && (line[len - 1] == '\n' || line[len - 1] == '\r'))
            line[--len] = '\0';
        if (len == 0 || line[0] == '#')
            continue;
        libssh2_knownhost_readline(kh, line, len, LIBSSH2_KNOWNHOST_FILE_OPENSSH);
    }
    fclose(f);
    return 0;
}

static int check_host_key(mg_ssh_conn_t *c)
{
    size_t klen = 0;
    int ktype = 0;
    const char *key = libssh2_session_hostkey(c->session, &klen, &ktype);
    if (key == NULL) {
        mg__ssh_conn_fail(c, MG_EHOSTKEY, "%s:%d sent no host key", c->host, c->port);
        return -1;
    }
    char fp[80];
    host_key_fingerprint(c->session, fp, sizeof(fp));
    const char *tname = key_type_name(ktype);

    if (c->host_key_sha256 != NULL) {
        if (strcmp(fp, c->host_key_sha256) == 0)
            return 0;
        mg__ssh_conn_fail(c, MG_EHOSTKEY,
                          "host key for %s:%d does not match the pinned key: the server "
                          "presented %s %s, expected %s; refusing to connect",
                          c->host, c->port, tname, fp, c->host_key_sha256);
        return -1;
    }

    LIBSSH2_KNOWNHOSTS *kh = libssh2_knownhost_init(c->session);
    if (kh == NULL) {
        mg__ssh_conn_fail(c, MG_ENOMEM, "out of memory checking the host key");
        return -1;
    }
    int rc = load_known_hosts(kh, c->known_hosts);
    if (rc < 0) {
        libssh2_knownhost_free(kh);
        mg__ssh_conn_fail(c, MG_EHOSTKEY,
                          "cannot read known_hosts file %s (%s), so the host key of %s:%d (%s %s) "
                          "cannot be verified; refusing to connect",
                          c->known_hosts, strerror(-rc), c->host, c->port, tname, fp);
        return -1;
    }
    struct libssh2_knownhost *found = NULL;
    int check = libssh2_knownhost_checkp(kh, c->host, c->port, key, klen,
                                         LIBSSH2_KNOWNHOST_TYPE_PLAIN |
                                             LIBSSH2_KNOWNHOST_KEYENC_RAW |
                                             knownhost_type(ktype),
                                         &found);
    libssh2_knownhost_free(kh);
    switch (check) {
    case LIBSSH2_KNOWNHOST_CHECK_MATCH:
        mg_log_debug("ssh", "user=%s conn=%llu host key %s %s matches %s", c->user,
                     (unsigned long long)c->id, tname, fp, c->known_hosts);
        return 0;
    case LIBSSH2_KNOWNHOST_CHECK_MISMATCH:
        mg__ssh_conn_fail(c, MG_EHOSTKEY,
                          "host key for %s:%d has CHANGED: the server presented %s %s, which "
                          "does not match %s; refusing to connect",
                          c->host, c->port, tname, fp, c->known_hosts);
        return -1;
    case LIBSSH2_KNOWNHOST_CHECK_NOTFOUND:
        mg__ssh_conn_fail(c, MG_EHOSTKEY,
                          "host key for %s:%d is not in %s: the server presented %s %s; "
                          "refusing to connect (add the key if it is right)",
                          c->host, c->port, c->known_hosts, tname, fp);
        return -1;
    default:
        mg__ssh_conn_fail(c, MG_EHOSTKEY, "checking the host key of %s:%d (%s %s) failed", c->host,
                          c->port, tname, fp);
        return -1;
    }
}

bool mg__ssh_step_handshake(mg_ssh_conn_t *c, int fd)
{
    int rc = libssh2_session_handshake(c->session, fd);
    if (rc == LIBSSH2_ERROR_EAGAIN)
        return false;
    if (rc != 0) {
        mg__ssh_conn_fail(c, c->in_eof ? MG_ECLOSED : MG_ESSH,
                          "SSH handshake with %s:%d failed: %s", c->host, c->port,
                          mg__ssh_last_error(c));
        return false;
    }
    return check_host_key(c) == 0;
}

bool mg__ssh_step_auth(mg_ssh_conn_t *c)
{
    int rc = libssh2_userauth_publickey_fromfile_ex(c->session, c->ssh_user,
                                                    (unsigned)strlen(c->ssh_user), NULL,
                                                    c->key_path, c->key_passphrase);
    if (rc == LIBSSH2_ERROR_EAGAIN)
        return false;
    if (rc == LIBSSH2_ERROR_FILE) {
        mg__ssh_conn_fail(c, MG_EAUTH, "cannot use key file %s: %s", c->key_path,
                          mg__ssh_last_error(c));
        return false;
    }
    if (rc == LIBSSH2_ERROR_AUTHENTICATION_FAILED || rc == LIBSSH2_ERROR_PUBLICKEY_UNVERIFIED) {
        mg__ssh_conn_fail(c, MG_EAUTH, "%s:%d refused key %s for user %s", c->host, c->port,
                          c->key_path, c->ssh_user);
        return false;
    }
    if (rc != 0) {
        mg__ssh_conn_fail(c, c->in_eof ? MG_ECLOSED : MG_ESSH,
                          "authentication with %s:%d failed: %s", c->host, c->port,
                          mg__ssh_last_error(c));
        return false;
    }
    return true;
}

