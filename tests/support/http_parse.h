/*
 * http_parse: the server side of HTTP/1.1 framing, strict and allocation-free.
 *
 * mg_test_http_parse_head() parses a request head (request line and headers, up to and including
 * the blank line) that the caller has found in its input buffer, in place: it NUL-terminates the
 * path and query inside that buffer and reports what framing and connection handling the request
 * asks for. It accepts a strict subset of RFC 9112 (CRLF line ends, token methods, origin-form
 * targets, no folded headers, no Content-Length beside Transfer-Encoding, only "chunked" as a
 * transfer coding) and rejects everything else, which is what a test server should do.
 *
 * mg_test_chunked_t decodes a chunked body incrementally from whatever input is at hand; each step
 * either consumes framing or hands out a piece of data, so a body of any size passes through
 * without being gathered.
 *
 * Used by mg-upstream; a test that plays a misbehaving server can use it too.
 */
#ifndef MG_TEST_HTTP_PARSE_H
#define MG_TEST_HTTP_PARSE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define MG_TEST_HTTP_HEAD_MAX_HEADERS 64

typedef struct mg_test_http_head {
    const char *method;          /* points into the buffer; method_len bytes, not NUL-terminated */
    size_t method_len;
    char *path;                  /* NUL-terminated in the buffer, starts with '/' */
    char *query;                 /* NUL-terminated after '?', or NULL */
    int minor_version;           /* HTTP/1.0 or HTTP/1.1 */
    bool has_content_length;
    uint64_t content_length;
    bool chunked;                /* Transfer-Encoding: chunked */
    bool keep_alive;             /* by version and the Connection header */
    bool expect_continue;        /* Expect: 100-continue */
    bool is_head;                /* the method is HEAD */
    const char *content_type;    /* the Content-Type value in the buffer, or NULL */
    size_t content_type_len;
} mg_test_http_head_t;

/*
 * Parses buf[0, len), which must end with the CRLF CRLF that ends the head; modifies buf.
 * Returns 0, or MG_EINVAL if the head is malformed or outside the subset above.
 */
int mg_test_http_parse_head(char *buf, size_t len, mg_test_http_head_t *h);

/* The state of a chunked body decoder. Zero-initialize (or _init) before the first step. */
typedef struct mg_test_chunked {
    int state;       /* private */
    uint64_t left;   /* private: data bytes left in the current chunk */
} mg_test_chunked_t;

void mg_test_chunked_init(mg_test_chunked_t *d);

/*
 * Takes one step over in[0, len): consumes framing, or hands out a piece of the body (*data,
 * inside in, and *data_len, which is 0 when the step was framing). *consumed gets the bytes used.
 * Returns 1 when the body (with its trailers) has ended, 0 after a step (call again with the rest),
 * MG_EAGAIN when more input is needed (nothing consumed), MG_EINVAL on malformed framing.
 */
int mg_test_chunked_step(mg_test_chunked_t *d, const char *in, size_t len, size_t *consumed,
                         const char **data, size_t *data_len);

#endif
