/*
 * tls: OpenSSL through memory BIOs. See tls.h.
 */
#include "tls.h"

#include "moongate/error.h"

#include <openssl/bio.h>
#include <openssl/err.h>
#include <openssl/pem.h>
#include <openssl/ssl.h>
#include <openssl/x509.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

struct mg_tls_ctx {
    SSL_CTX *ssl;
    int refs;
    char subject[256];
    char not_after[64];
};

struct mg_tls {
    mg_tls_ctx_t *ctx;
    SSL *ssl;
    BIO *in, *out;   /* in: what the peer sent; out: what goes to it */
    char err[160];
};

static const unsigned char alpn_http11[] = "\x08http/1.1";

/* Chooses http/1.1 when the client offers it; a client that offers only h2 gets no ALPN. */
static int select_alpn(SSL *ssl, const unsigned char **out, unsigned char *outlen,
                       const unsigned char *in, unsigned int inlen, void *arg)
{
    unsigned char *sel = NULL;
    if (SSL_select_next_proto(&sel, outlen, alpn_http11, sizeof(alpn_http11) - 1, in, inlen) !=
        OPENSSL_NPN_NEGOTIATED)
        return SSL_TLSEXT_ERR_NOACK;
    *out = sel;
    return SSL_TLSEXT_ERR_OK;
}

static void openssl_reason(char *out, size_t cap)
{
    unsigned long e = ERR_peek_last_error();
    if (e == 0)
        snprintf(out, cap, "unknown error");
    else
        ERR_error_string_n(e, out, cap);
    ERR_clear_error();
}

static void asn1_time_text(const ASN1_TIME *t, char *out, size_t cap)
{
    BIO *b = BIO_new(BIO_s_mem());
    out[0] = '\0';
    if (b == NULL)
        return;
    if (ASN1_TIME_print(b, t) == 1) {
        int n = BIO_read(b, out, (int)cap - 1);
        out[n > 0 ? n : 0] = '\0';
    }
    BIO_free(b);
}

int mg_tls_ctx_load(const char *cert, const char *key, mg_tls_ctx_t **out, char *err,
                    size_t errlen)
{
    char why[256];
    mg_tls_ctx_t *c = calloc(1, sizeof(*c));
    if (c == NULL) {
        snprintf(err, errlen, "out of memory");
        return MG_ENOMEM;
    }
    c->refs = 1;
    c->ssl = SSL_CTX_new(TLS_server_method());
    if (c->ssl == NULL)
        goto openssl_fail;
    SSL_CTX_set_min_proto_version(c->ssl, TLS1_2_VERSION);
    SSL_CTX_set_options(c->ssl, SSL_OP_NO_RENEGOTIATION | SSL_OP_CIPHER_SERVER_PREFERENCE);
    /* Idle kept-alive connections give their buffers back. */
    SSL_CTX_set_mode(c->ssl, SSL_MODE_RELEASE_BUFFERS);
    SSL_CTX_set_session_cache_mode(c->ssl, SSL_SESS_CACHE_SERVER);
    SSL_CTX_set_alpn_select_cb(c->ssl, select_alpn, NULL);
    if (SSL_CTX_use_certificate_chain_file(c->ssl, cert) != 1) {
        openssl_reason(why, sizeof(why));
        snprintf(err, errlen, "TLS certificate %s: cannot be loaded (%s)", cert, why);
        goto fail;
    }
    if (SSL_CTX_use_PrivateKey_file(c->ssl, key, SSL_FILETYPE_PEM) != 1) {
        if (ERR_GET_REASON(ERR_peek_last_error()) == X509_R_KEY_VALUES_MISMATCH) {
            ERR_clear_error();
            snprintf(err, errlen, "TLS key %s does not match the certificate %s", key, cert);
            goto fail;
        }
        openssl_reason(why, sizeof(why));
        snprintf(err, errlen, "TLS key %s: cannot be loaded (%s)", key, why);
        goto fail;
    }
    if (SSL_CTX_check_private_key(c->ssl) != 1) {
        ERR_clear_error();
        snprintf(err, errlen, "TLS key %s does not match the certificate %s", key, cert);
        goto fail;
    }
    X509 *x = SSL_CTX_get0_certificate(c->ssl);
    if (x != NULL) {
        X509_NAME_oneline(X509_get_subject_name(x), c->subject, sizeof(c->subject));
        asn1_time_text(X509_get0_notAfter(x), c->not_after, sizeof(c->not_after));
        if (X509_cmp_current_time(X509_get0_notAfter(x)) < 0) {
            snprintf(err, errlen, "TLS certificate %s expired (%s)", cert, c->not_after);
            goto fail;
        }
    }
    *out = c;
    return 0;

openssl_fail:
    openssl_reason(why, sizeof(why));
    snprintf(err, errlen, "TLS: %s", why);
fail:
    mg_tls_ctx_unref(c);
    return MG_ECONFIG;
}

void mg_tls_ctx_ref(mg_tls_ctx_t *c)
{
    c->refs++;
}

void mg_tls_ctx_unref(mg_tls_ctx_t *c)
{
    if (c == NULL || --c->refs > 0)
        return;
    SSL_CTX_free(c->ssl);
    free(c);
}

void mg_tls_ctx_describe(const mg_tls_ctx_t *c, char *out, size_t cap)
{
    snprintf(out, cap, "%s, valid until %s", c->subject, c->not_after);
}

int mg_tls_ctx_days_left(const mg_tls_ctx_t *c)
{
    X509 *x = SSL_CTX_get0_certificate(c->ssl);
    int days = 0, secs = 0;
    if (x == NULL || ASN1_TIME_diff(&days, &secs, NULL, X509_get0_notAfter(x)) != 1)
        return 0;
    return days;
}

int mg_tls_new(mg_tls_ctx_t *ctx, mg_tls_t **out)
{
    mg_tls_t *t = calloc(1, sizeof(*t));
    if (t == NULL)
        return MG_ENOMEM;
    t->ssl = SSL_new(ctx->ssl);
    t->in = BIO_new(BIO_s_mem());
    t->out = BIO_new(BIO_s_mem());
    if (t->ssl == NULL || t->in == NULL || t->out == NULL) {
        SSL_free(t->ssl);
        BIO_free(t->in);
        BIO_free(t->out);
        free(t);
        ERR_clear_error();
        return MG_ENOMEM;
    }
    /* An empty memory BIO reads as "retry", not as the end of the stream. */
    BIO_set_mem_eof_return(t->in, -1);
    SSL_set_bio(t->ssl, t->in, t->out); /* the SSL owns both BIOs now */
    SSL_set_accept_state(t->ssl);
    t->ctx = ctx;
    mg_tls_ctx_ref(ctx);
    *out = t;
    return 0;
}

void mg_tls_free(mg_tls_t *t)
{
    if (t == NULL)
        return;
    SSL_free(t->ssl);
    mg_tls_ctx_unref(t->ctx);
    free(t);
}

int mg_tls_feed(mg_tls_t *t, const char *buf, size_t len)
{
    if (len == 0)
        return 0;
    return BIO_write(t->in, buf, (int)len) == (int)len ? 0 : MG_ENOMEM;
}

static int session_error(mg_tls_t *t, int rc)
{
    int e = SSL_get_error(t->ssl, rc);
    switch (e) {
    case SSL_ERROR_WANT_READ:
    case SSL_ERROR_WANT_WRITE:
        return MG_EAGAIN;
    case SSL_ERROR_ZERO_RETURN:
        return MG_ECLOSED;
    default:
        openssl_reason(t->err, sizeof(t->err));
        return MG_EINVAL;
    }
}

/*
 * SSL_get_error() reads the thread's error queue, which other users of OpenSSL on this thread
 * leave errors in (libssh2 trying a key file with OpenSSL's PEM decoder, say): every call into
 * the session starts with an empty queue.
 */

int mg_tls_read(mg_tls_t *t, char *buf, size_t cap)
{
    ERR_clear_error();
    int n = SSL_read(t->ssl, buf, (int)(cap > INT32_MAX ? INT32_MAX : cap));
    return n > 0 ? n : session_error(t, n);
}

int mg_tls_write(mg_tls_t *t, const char *buf, size_t len)
{
    if (!SSL_is_init_finished(t->ssl))
        return MG_ESTATE;
    ERR_clear_error();
    while (len > 0) {
        int chunk = len > 1 << 30 ? 1 << 30 : (int)len;
        int n = SSL_write(t->ssl, buf, chunk);
        if (n <= 0)
            return session_error(t, n) == MG_EAGAIN ? MG_ESTATE : MG_EINVAL;
        buf += n;
        len -= (size_t)n;
    }
    return 0;
}

void mg_tls_shutdown(mg_tls_t *t)
{
    ERR_clear_error();
    if (SSL_is_init_finished(t->ssl))
        SSL_shutdown(t->ssl);
    ERR_clear_error();
}

size_t mg_tls_pending(const mg_tls_t *t)
{
    return BIO_ctrl_pending(t->out);
}

size_t mg_tls_take(mg_tls_t *t, char *buf, size_t cap)
{
    int n = BIO_read(t->out, buf, (int)(cap > INT32_MAX ? INT32_MAX : cap));
    return n > 0 ? (size_t)n : 0;
}

bool mg_tls_handshake_done(const mg_tls_t *t)
{
    return SSL_is_init_finished(t->ssl);
}

const char *mg_tls_error(const mg_tls_t *t)
{
    return t->err[0] ? t->err : "TLS failed";
}
