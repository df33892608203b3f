/*
 * tls: TLS for the HTTP server, as a codec over OpenSSL memory BIOs, with no I/O of its own.
 *
 * A mg_tls_ctx_t is a certificate and key loaded from PEM files, checked against each other,
 * offering HTTP/1.1 only by ALPN. It is reference-counted: a reload builds a new context and the
 * connections already open keep the one they started with. A mg_tls_t is one server-side
 * session: ciphertext read from the socket goes in with mg_tls_feed(), plaintext comes out of
 * mg_tls_read(); plaintext goes in with mg_tls_write() and the ciphertext to send comes out of
 * mg_tls_take(). The handshake happens inside those calls.
 */
#ifndef MOONGATE_TLS_H
#define MOONGATE_TLS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

typedef struct mg_tls_ctx mg_tls_ctx_t;
typedef struct mg_tls mg_tls_t;

/*
 * Loads cert (a PEM chain, leaf first) and key. Returns 0 and *out, or MG_ECONFIG with a message
 * naming the file and what is wrong (unreadable, not PEM, the key does not match, expired).
 */
int mg_tls_ctx_load(const char *cert, const char *key, mg_tls_ctx_t **out, char *err,
                    size_t errlen);
void mg_tls_ctx_ref(mg_tls_ctx_t *c);
void mg_tls_ctx_unref(mg_tls_ctx_t *c);

/* The leaf certificate's subject and expiry, for logs. */
void mg_tls_ctx_describe(const mg_tls_ctx_t *c, char *out, size_t cap);

/* Whole days until the certificate expires (0 on its last day). */
int mg_tls_ctx_days_left(const mg_tls_ctx_t *c);

/* A server session on ctx (referenced until mg_tls_free()). Returns 0, or MG_ENOMEM. */
int mg_tls_new(mg_tls_ctx_t *ctx, mg_tls_t **out);
void mg_tls_free(mg_tls_t *t);

/* Ciphertext from the peer (copied). Returns 0 or MG_ENOMEM. */
int mg_tls_feed(mg_tls_t *t, const char *buf, size_t len);

/*
 * Decrypts into buf. Returns the bytes (> 0); MG_EAGAIN when it needs more ciphertext (or the
 * handshake wrote something: look at mg_tls_pending()); MG_ECLOSED when the peer closed the
 * session; MG_EINVAL when the session failed (mg_tls_error() says why).
 */
int mg_tls_read(mg_tls_t *t, char *buf, size_t cap);

/* Encrypts len bytes (all of them, once the handshake is done). Returns 0, MG_ESTATE (before
   the handshake) or MG_EINVAL. */
int mg_tls_write(mg_tls_t *t, const char *buf, size_t len);

/* Queues a close_notify. */
void mg_tls_shutdown(mg_tls_t *t);

/* Ciphertext waiting to go to the peer, and taking it (up to cap bytes; returns the count). */
size_t mg_tls_pending(const mg_tls_t *t);
size_t mg_tls_take(mg_tls_t *t, char *buf, size_t cap);

bool mg_tls_handshake_done(const mg_tls_t *t);
const char *mg_tls_error(const mg_tls_t *t);

#endif
