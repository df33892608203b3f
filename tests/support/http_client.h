/*
 * http_client: HTTP/1.1 on the test side, plus the checksums that prove a body arrived intact.
 *
 * Integration tests send raw HTTP over an SSH channel (or a socket) and must make sense of what
 * comes back. This module builds a request string, and parses a response incrementally: feed it
 * bytes as they arrive, in pieces of any size, and it says when the status line, the headers and
 * the body (Content-Length, chunked, or up to EOF) are complete. The body can be kept, hashed, or
 * handed to a callback piece by piece (with arrival times for streaming tests), so a 10 GB body
 * needs no memory.
 *
 * It also holds the deterministic byte stream that mg-upstream serves on GET /bytes/N, so a test
 * can compute the expected sha256 without downloading anything twice. The stream is defined as:
 * a xorshift64 generator (x ^= x << 13; x ^= x >> 7; x ^= x << 17) whose state starts at 42; each
 * step yields one 64-bit word, emitted as 8 bytes little-endian; byte i of /bytes/N is byte i of
 * that sequence. Every /bytes/N is a prefix of the same stream.
 *
 * mg_test_http_fetch() is a blocking client (poll with a deadline) for tests that talk to
 * mg-upstream or a forwarded port directly, off any event loop.
 *
 * Functions return 0 or a negative MG_E* code (moongate/error.h).
 */
#ifndef MG_TEST_HTTP_CLIENT_H
#define MG_TEST_HTTP_CLIENT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* --- The deterministic stream of GET /bytes/N ------------------------------------------------ */

typedef struct mg_test_stream {
    uint64_t state;   /* private */
    uint64_t word;    /* private: the current word */
    unsigned used;    /* private: bytes of word already emitted (8: none left) */
} mg_test_stream_t;

/* Positions s at byte 0 of the stream. */
void mg_test_stream_init(mg_test_stream_t *s);

/* Writes the next len bytes of the stream into buf. */
void mg_test_stream_fill(mg_test_stream_t *s, void *buf, size_t len);

/* The sha256 of the first n bytes of the stream as 64 lower-case hex digits and a NUL. */
int mg_test_stream_sha256_hex(uint64_t n, char hex[65]);

/* --- sha256 through OpenSSL's EVP ----------------------------------------------------------- */

typedef struct mg_test_sha256 {
    void *ctx;  /* private: an EVP_MD_CTX */
} mg_test_sha256_t;

/* Returns 0 or MG_ENOMEM. Every successful init needs a final (which frees the context). */
int mg_test_sha256_init(mg_test_sha256_t *h);
void mg_test_sha256_update(mg_test_sha256_t *h, const void *data, size_t len);
/* Writes 64 hex digits and a NUL into hex and frees the context. */
void mg_test_sha256_final_hex(mg_test_sha256_t *h, char hex[65]);
/* One-shot: the sha256 of data as hex. Returns 0 or MG_ENOMEM. */
int mg_test_sha256_hex(const void *data, size_t len, char hex[65]);

/* --- Requests -------------------------------------------------------------------------------- */

/*
 * Builds "METHOD PATH HTTP/1.1\r\nHost: 127.0.0.1\r\n" + extra_headers + (a Content-Length line
 * when body is not NULL) + "\r\n" + body into a malloc'd buffer the caller frees. extra_headers is
 * NULL or complete lines, each ending in "\r\n" (e.g. "Connection: close\r\n").
 * Returns 0, MG_EINVAL or MG_ENOMEM.
 */
int mg_test_http_request(char **out, size_t *out_len, const char *method, const char *path,
                         const char *extra_headers, const void *body, size_t body_len);

/* --- Responses ------------------------------------------------------------------------------- */

#define MG_TEST_HTTP_MAX_HEADERS 32

typedef struct mg_test_http_header {
    char name[64];     /* as received */
    char value[512];   /* leading and trailing blanks removed */
} mg_test_http_header_t;

/* Called with each piece of decoded body as it is fed (chunk framing removed). */
typedef void (*mg_test_http_body_cb)(void *arg, const char *data, size_t len);

typedef struct mg_test_http_response {
    /* Set by the caller after mg_test_http_response_init(), before the first feed. */
    bool keep_body;              /* collect the body in body/body_len */
    bool hash_body;              /* hash the body; body_sha256 is set once complete */
    bool head_request;           /* the request was HEAD: the response has no body */
    mg_test_http_body_cb on_body;
    void *arg;

    /* Read-only results. */
    int status;                  /* 0 until the status line is parsed */
    char reason[64];
    int minor_version;           /* HTTP/1.x */
    mg_test_http_header_t headers[MG_TEST_HTTP_MAX_HEADERS];
    size_t n_headers;
    bool headers_done;
    bool chunked;
    int64_t content_length;      /* -1 when absent */
    bool complete;               /* the whole response was parsed */
    uint64_t body_received;      /* decoded body bytes so far */
    uint64_t chunks;             /* chunks of a chunked body completed so far */
    double first_byte_ms;        /* mg_test_now_ms() when the first body byte was fed; 0 if none */
    char *body;                  /* keep_body: the body, NUL-terminated; freed by _free() */
    size_t body_len;
    char body_sha256[65];        /* hash_body: set once complete */

    /* Private parser state. */
    int state_;
    char line_[1024];
    size_t line_len_;
    uint64_t chunk_left_;
    size_t body_cap_;
    mg_test_sha256_t sha_;
    bool sha_live_;
} mg_test_http_response_t;

void mg_test_http_response_init(mg_test_http_response_t *r);

/*
 * Feeds len bytes. *consumed (may be NULL) gets how many were used: all of them, unless the
 * response completed partway (the rest belongs to the next response on the connection).
 * Returns 0 (check r->complete), MG_EINVAL on a malformed response, MG_ENOMEM.
 */
int mg_test_http_response_feed(mg_test_http_response_t *r, const char *data, size_t len,
                               size_t *consumed);

/*
 * Tells the parser the connection reached EOF. Completes a body delimited by the close.
 * Returns 0 if the response is now complete, MG_ECLOSED if it was cut short.
 */
int mg_test_http_response_eof(mg_test_http_response_t *r);

/* The value of the first header named name (case-insensitive), or NULL. */
const char *mg_test_http_response_header(const mg_test_http_response_t *r, const char *name);

/* Frees the kept body and any hashing context; r may be initialized again afterwards. */
void mg_test_http_response_free(mg_test_http_response_t *r);

/*
 * Blocking: connects to 127.0.0.1:port, sends request, and feeds what comes back into r (already
 * initialized and configured by the caller) until the response is complete, the peer closes, or
 * timeout_ms passes. Returns 0, MG_ECONNECT, MG_ETIMEDOUT, MG_ECLOSED, MG_EINVAL.
 */
int mg_test_http_fetch(uint16_t port, const char *request, size_t request_len,
                       mg_test_http_response_t *r, int timeout_ms);

#endif
