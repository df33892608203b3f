/*
 * http1: the HTTP/1.1 codec, with no I/O of its own.
 *
 * Client side: a mg_http1_req_parser_t reads a client's requests from the byte stream, one at a
 * time: the head through nodejs/http-parser with the strictness of RFC 9112 added where
 * Debian's (non-strict) build of it is lenient, then the body, Content-Length or chunked, by a
 * strict decoder of our own, trailers included. mg_http1_response_head() frames the response
 * head the client gets.
 *
 * Upstream side: mg_http1_check_request() and mg_http1_request_head() build the head sent over
 * the SSH channel: hop-by-hop headers dropped, X-Forwarded-* and X-Request-Id set, the body
 * re-framed. The upstream's answer comes back as a byte stream in pieces of any size; a
 * mg_http1_resp_parser_t (a thin wrapper around http-parser) turns it into one on_head
 * callback, on_body callbacks carrying the decoded body as it arrives, and one on_complete, then
 * stops at the end of the message so that the channel can carry the next one. The chunk framing
 * helpers frame body pieces for a chunked response to the client or a chunked request upstream
 * without copying them, and mg_http1_request_id_new() names requests.
 *
 * Nothing here allocates per header or per body piece: a parser owns one head buffer, reused
 * from message to message, and bounded by its head limit.
 *
 * Not thread-safe per object; the request id generator may be called from any thread.
 */
#ifndef MOONGATE_HTTP1_H
#define MOONGATE_HTTP1_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* One header field. In callbacks, the pointers are valid only during the call. */
typedef struct mg_http1_header {
    const char *name;
    size_t name_len;
    const char *value;
    size_t value_len;
} mg_http1_header_t;

/* ---------------------------------------------------------------------------------------------
 * Response parser
 */

#define MG_HTTP1_HEAD_MAX_DEFAULT (64 * 1024) /* bytes of one response head */
#define MG_HTTP1_MAX_HEADERS 128              /* header fields in one response head */
#define MG_HTTP1_NO_LENGTH UINT64_MAX         /* no Content-Length header */

/* How the body of a response is delimited. */
typedef enum mg_http1_framing {
    MG_HTTP1_BODY_NONE,    /* no body: HEAD, 1xx, 204, 304, or no framing and keep-alive */
    MG_HTTP1_BODY_LENGTH,  /* Content-Length bytes */
    MG_HTTP1_BODY_CHUNKED, /* Transfer-Encoding: chunked (decoded before on_body) */
    MG_HTTP1_BODY_CLOSE,   /* until the connection closes: call mg_http1_resp_parser_eof() */
} mg_http1_framing_t;

typedef struct mg_http1_resp_head {
    int status;               /* 100..999 */
    int http_major, http_minor;
    const char *reason;       /* not NUL-terminated */
    size_t reason_len;
    const mg_http1_header_t *headers; /* in the order received, names as sent */
    size_t nheaders;
    mg_http1_framing_t framing;
    uint64_t content_length;  /* the Content-Length header's value, or MG_HTTP1_NO_LENGTH; a
                                 HEAD response may carry one with framing NONE */
    bool keep_alive;          /* the connection may carry another request after this response */
} mg_http1_resp_head_t;

/*
 * Callbacks. Each returns 0 to go on, or nonzero to abort: the feed then returns MG_ECANCELED and
 * the parser is finished (only mg_http1_resp_parser_free() remains). Never free the parser from
 * inside a callback; return nonzero and free it after the feed returns.
 */
typedef struct mg_http1_resp_cbs {
    /* A final (>= 200) response head. head and everything it points to live until the return. */
    int (*on_head)(void *data, const mg_http1_resp_head_t *head);
    /* Optional: an interim 1xx response (100 Continue, 102, 103). NULL: skipped silently. */
    int (*on_info)(void *data, const mg_http1_resp_head_t *head);
    /* Decoded body bytes, as they arrive; never empty. Optional. */
    int (*on_body)(void *data, const char *at, size_t len);
    /* The response ended; keep_alive repeats head->keep_alive. */
    int (*on_complete)(void *data, bool keep_alive);
} mg_http1_resp_cbs_t;

typedef struct mg_http1_resp_parser mg_http1_resp_parser_t;

/*
 * Makes a parser that reports to cbs (copied) with data as the first argument. head_max bounds
 * the bytes of one response head (status line, header fields, blank line); 0 means
 * MG_HTTP1_HEAD_MAX_DEFAULT. The parser expects a response to a non-HEAD request.
 * Returns 0, MG_EINVAL (cbs or on_head NULL) or MG_ENOMEM.
 */
int mg_http1_resp_parser_new(const mg_http1_resp_cbs_t *cbs, void *data, size_t head_max,
                             mg_http1_resp_parser_t **out);

void mg_http1_resp_parser_free(mg_http1_resp_parser_t *p);

/*
 * Tells the parser the method of the request whose response comes next: after a HEAD request
 * the response has no body whatever its headers say. Call it before the first byte of that
 * response; by default (and after each completed response) the method is taken to be GET.
 * Returns 0, or MG_ESTATE in the middle of a response.
 */
int mg_http1_resp_parser_expect(mg_http1_resp_parser_t *p, const char *method);

/*
 * Parses len bytes from the channel. Stops right after the end of a final response, so *consumed
 * may be less than len: the bytes left belong to the next response (feed them again, after
 * mg_http1_resp_parser_expect() if the next request was a HEAD). Interim 1xx responses do not
 * stop it. Returns
 *   0             all bytes consumed, or a response completed;
 *   MG_EINVAL     the response is malformed, its head is too large, or it is a 101 (upgrades
 *                 are not supported): mg_http1_resp_parser_error() says what was wrong;
 *   MG_ESTATE     bytes after a response that closes the connection, or after an error;
 *   MG_ECANCELED  a callback returned nonzero;
 *   MG_ENOMEM.
 * After an error the parser is finished; *consumed is how far it got.
 */
int mg_http1_resp_parser_feed(mg_http1_resp_parser_t *p, const char *data, size_t len,
                              size_t *consumed);

/*
 * The channel reached EOF. Completes a response delimited by the close (on_complete runs, with
 * keep_alive false). Returns 0 if the stream ended cleanly (between responses, or ending a
 * close-delimited body), MG_ECLOSED if it ended inside a response (truncated), MG_ECANCELED if
 * on_complete returned nonzero, MG_ESTATE after an error.
 */
int mg_http1_resp_parser_eof(mg_http1_resp_parser_t *p);

/* True between the first byte of a response and its end. */
bool mg_http1_resp_parser_busy(const mg_http1_resp_parser_t *p);

/* What went wrong, for logs; "" if nothing did. Valid until the next call on p. */
const char *mg_http1_resp_parser_error(const mg_http1_resp_parser_t *p);

/* ---------------------------------------------------------------------------------------------
 * Request parser (the client side)
 */

#define MG_HTTP1_REQ_LINE_MAX_DEFAULT (16 * 1024)  /* request line; longer: 414 */
#define MG_HTTP1_REQ_HEAD_MAX_DEFAULT (32 * 1024)  /* request line + fields; larger: 431 */
#define MG_HTTP1_REQ_FIELDS_MAX_DEFAULT 100        /* header fields; more: 431 */
#define MG_HTTP1_REQ_HEAD_MAX_LIMIT (64 * 1024)    /* the largest head_max allowed */
#define MG_HTTP1_REQ_TRAILER_MAX 8192              /* bytes of a chunked body's trailer section */

typedef struct mg_http1_req_limits {
    size_t line_max;   /* 0: the default above */
    size_t head_max;
    size_t fields_max;
} mg_http1_req_limits_t;

/* How a request's body is delimited. */
typedef enum mg_http1_req_body {
    MG_HTTP1_REQ_BODY_NONE,    /* no body (no Content-Length, or 0) */
    MG_HTTP1_REQ_BODY_LENGTH,  /* content_length bytes (> 0) */
    MG_HTTP1_REQ_BODY_CHUNKED, /* Transfer-Encoding: chunked (decoded before on_body) */
} mg_http1_req_body_t;

/*
 * A request head as parsed. Every string is NUL-terminated as well as counted, and points into
 * the parser, where it stays valid until the parser begins the next request.
 */
typedef struct mg_http1_req_head {
    const char *method;       /* a method http-parser knows, upper case: "POST" */
    const char *target;       /* the request-target exactly as received (origin-form, or "*" */
    size_t target_len;        /*   for OPTIONS): visible ASCII, never decoded */
    int http_minor;           /* HTTP/1.x; 2..9 are served as 1.1 */
    const mg_http1_header_t *headers; /* in the order received, names and values as sent */
    size_t nheaders;
    const char *host;         /* the Host value, or NULL (HTTP/1.0 without one) */
    mg_http1_req_body_t body;
    uint64_t content_length;  /* for MG_HTTP1_REQ_BODY_LENGTH */
    bool keep_alive;          /* the client may send another request after this one */
    bool expect_continue;     /* Expect: 100-continue (HTTP/1.1 only) */
    bool upgrade;             /* Connection: upgrade with an Upgrade field (no body) */
} mg_http1_req_head_t;

/*
 * Callbacks. Each returns 0 to go on or a negative code to stop the parser for good (the feed
 * returns MG_ECANCELED); on_body may also return MG_EAGAIN to stop the feed right after this
 * piece, with the parser ready to go on at the next feed.
 */
typedef struct mg_http1_req_cbs {
    int (*on_head)(void *data, const mg_http1_req_head_t *head);
    /* Decoded body bytes as they arrive (never empty); at points into the bytes being fed. */
    int (*on_body)(void *data, const char *at, size_t len);
    /* A chunked body's trailer fields (checked like header fields), just before on_complete;
       not called when there are none. Valid during the call. Optional. */
    int (*on_trailers)(void *data, const mg_http1_header_t *fields, size_t n);
    /* The request is complete (right after on_head when it has no body). */
    int (*on_complete)(void *data);
} mg_http1_req_cbs_t;

typedef struct mg_http1_req_parser mg_http1_req_parser_t;

/*
 * Makes a parser. lim may be NULL (the defaults); head_max may be at most
 * MG_HTTP1_REQ_HEAD_MAX_LIMIT and line_max at most head_max. Returns 0, MG_EINVAL or MG_ENOMEM.
 */
int mg_http1_req_parser_new(const mg_http1_req_limits_t *lim, const mg_http1_req_cbs_t *cbs,
                            void *data, mg_http1_req_parser_t **out);
void mg_http1_req_parser_free(mg_http1_req_parser_t *p);

/*
 * Parses up to len bytes and returns how far it got in *consumed. It stops
 *   - right after on_head when the request has a body: the caller feeds the body when it is
 *     ready for it (after answering Expect: 100-continue, say);
 *   - right after on_complete: the bytes after it belong to the next request, or, after an
 *     upgrade, to the new protocol;
 *   - right after an on_body that returned MG_EAGAIN.
 * Returns 0 then (or when every byte was consumed), or
 *   MG_EINVAL     a malformed request, or one over a limit: mg_http1_req_parser_status() says
 *                 which status to answer (400, 405, 414, 417, 431, 501, 505) and
 *                 mg_http1_req_parser_error() why. Nothing of the request may be used.
 *   MG_ECANCELED  a callback stopped it;
 *   MG_ESTATE     after an error;
 *   MG_ENOMEM.
 */
int mg_http1_req_parser_feed(mg_http1_req_parser_t *p, const char *data, size_t len,
                             size_t *consumed);

/* True between requests (before any byte of the next one, blank lines aside). */
bool mg_http1_req_parser_idle(const mg_http1_req_parser_t *p);

/* True once a head was parsed and its body (if any) is not complete yet. */
bool mg_http1_req_parser_in_body(const mg_http1_req_parser_t *p);

/* Gives back the memory the last request's head held; call it between requests, once that
   head is no longer used (a kept-alive connection going idle). */
void mg_http1_req_parser_trim(mg_http1_req_parser_t *p);

/* After MG_EINVAL: the status to answer and the reason, for the client. 0 and "" otherwise. */
int mg_http1_req_parser_status(const mg_http1_req_parser_t *p);
const char *mg_http1_req_parser_error(const mg_http1_req_parser_t *p);

/*
 * The path of an origin-form target as an origin server would take it: the query dropped,
 * percent-escapes decoded, then dot segments removed (RFC 3986 5.2.4), so "/a/%2e%2e/b" is "/b".
 * For the policy's checks; what goes upstream is always the target as received. Writes a
 * NUL-terminated string into out. Returns 0, or MG_EINVAL: a malformed escape, an escaped NUL,
 * not origin-form, or longer than cap - 1.
 */
int mg_http1_path_decode(const char *target, size_t len, char *out, size_t cap);

/* ---------------------------------------------------------------------------------------------
 * Checking the client's request
 */

/* How the client's request body is delimited, as found by mg_http1_check_request(). */
typedef struct mg_http1_req_framing {
    bool chunked;            /* Transfer-Encoding: chunked */
    uint64_t content_length; /* MG_HTTP1_NO_LENGTH without a Content-Length header */
} mg_http1_req_framing_t;

/* RFC 9110 token (methods, header names): one or more tchar. */
bool mg_http1_token_valid(const char *s, size_t len);

/* A header value we pass on: no CR, LF or NUL (other bytes, obs-text included, are kept). */
bool mg_http1_value_valid(const char *s, size_t len);

/*
 * Checks what the front received before anything is sent upstream. On failure fills *status with
 * the HTTP status to answer and *why with a static sentence, and returns MG_EINVAL:
 *   400  method or header name not a token; header value with CR, LF or NUL; both
 *        Content-Length and Transfer-Encoding; Content-Length not a decimal number, or several
 *        that differ (repeats of one value are accepted); Transfer-Encoding whose last coding is
 *        not chunked (RFC 9112 6.3: the length cannot be determined);
 *   501  Transfer-Encoding listing a coding before chunked (gzip, chunked): we decode none.
 * On success returns 0 and fills *framing if it is not NULL. status and why may be NULL.
 */
int mg_http1_check_request(const char *method, const mg_http1_header_t *headers, size_t nheaders,
                           mg_http1_req_framing_t *framing, int *status, const char **why);

/* The first field named name (any case) in headers, or NULL. */
const mg_http1_header_t *mg_http1_header_find(const mg_http1_header_t *headers, size_t nheaders,
                                              const char *name);

/*
 * True if a field named name (any of its occurrences) lists token as one of its comma-separated
 * elements, compared without case ("Connection: keep-alive, Upgrade" lists "upgrade").
 */
bool mg_http1_header_lists(const mg_http1_header_t *headers, size_t nheaders, const char *name,
                           const char *token, size_t token_len);

/*
 * True if the header named name must not be forwarded by a proxy: a hop-by-hop field (Connection,
 * Keep-Alive, Proxy-*, TE, Trailer, Transfer-Encoding, Upgrade) or one listed in a Connection
 * field of headers. For filtering a response's headers before they go to the client.
 */
bool mg_http1_header_is_hop(const mg_http1_header_t *headers, size_t nheaders, const char *name,
                            size_t name_len);

/* ---------------------------------------------------------------------------------------------
 * The upstream request head
 */

#define MG_HTTP1_REQUEST_HEAD_MAX (64 * 1024)
#define MG_HTTP1_BODY_LENGTH_NONE (-2)   /* no body and no framing header (a GET) */
#define MG_HTTP1_BODY_LENGTH_CHUNKED (-1) /* the body follows chunked */

/*
 * A change to the client's fields on the way upstream: every field named name (any case) is left
 * out, and unless value is NULL one "name: value" is added after the client's fields. The
 * fields the builder writes itself (Host, the framing, Connection and the hop-by-hop ones,
 * Expect, X-Forwarded-For, X-Forwarded-Proto, X-Request-Id) cannot be edited.
 */
typedef struct mg_http1_field_edit {
    const char *name;
    size_t name_len;
    const char *value;        /* NULL: remove only */
    size_t value_len;
} mg_http1_field_edit_t;

#define MG_HTTP1_FIELD_EDITS_MAX 32

/* Whether a field named name may be edited (see above): a valid token the builder does not own. */
bool mg_http1_field_editable(const char *name, size_t len);

typedef struct mg_http1_request {
    const char *method;       /* a token; NUL-terminated */
    const char *path;         /* origin-form: "/" then visible ASCII; path_len bytes */
    size_t path_len;
    const char *host;         /* the Host value, e.g. "127.0.0.1:11434"; NUL-terminated */
    const mg_http1_header_t *headers; /* the client's, as received */
    size_t nheaders;
    const char *client_addr;  /* appended to X-Forwarded-For; NULL: the client's is kept as is */
    const char *proto;        /* X-Forwarded-Proto ("http", "https"); NULL: none */
    const char *request_id;   /* X-Request-Id; NULL: none */
    int64_t body_length;      /* >= 0: Content-Length; or MG_HTTP1_BODY_LENGTH_NONE / _CHUNKED */
    const mg_http1_field_edit_t *edits; /* applied in order; at most MG_HTTP1_FIELD_EDITS_MAX */
    size_t nedits;
} mg_http1_request_t;

/*
 * Builds the request head to send upstream into a malloc'd buffer (*out, *out_len; the caller
 * frees it). The client's headers are kept in order and case, minus: hop-by-hop fields and those
 * listed in Connection; Host, Content-Length, Expect (the front answers it, and the body is
 * streamed regardless), and the client's X-Forwarded-Proto and X-Request-Id (ours replace them).
 * X-Forwarded-For values are merged into one field with client_addr appended. The edits then
 * remove fields and add theirs, followed by framing and "Connection: keep-alive".
 * Returns 0, MG_EINVAL (bad method, path, host, header, edit, or a head over
 * MG_HTTP1_REQUEST_HEAD_MAX; *why says which, if why is not NULL) or MG_ENOMEM.
 */
int mg_http1_request_head(const mg_http1_request_t *req, char **out, size_t *out_len,
                          const char **why);

/* ---------------------------------------------------------------------------------------------
 * The response head the client gets
 */

typedef struct mg_http1_response {
    int status;               /* 100..599 */
    const mg_http1_header_t *headers; /* end-to-end fields, in order, names as given */
    size_t nheaders;
    int64_t body_length;      /* >= 0: Content-Length; MG_HTTP1_BODY_LENGTH_CHUNKED; or
                                 MG_HTTP1_BODY_LENGTH_NONE: no framing field (no body, or a
                                 body that the close of the connection ends) */
    bool close;               /* "Connection: close" */
    const char *request_id;   /* X-Request-Id; NULL: none */
} mg_http1_response_t;

/*
 * Writes the status line (always HTTP/1.1, with the standard reason phrase), the fields minus
 * hop-by-hop ones, those Connection lists, Content-Length, Transfer-Encoding and X-Request-Id
 * (which the framing and request_id replace), then the framing, Connection and X-Request-Id,
 * into out. Returns 0 with *len, MG_EINVAL (an invalid status, name or value) or MG_ENOMEM (it
 * does not fit in cap bytes).
 */
int mg_http1_response_head(const mg_http1_response_t *r, char *out, size_t cap, size_t *len);

/* The standard reason phrase of status ("Unknown" when there is none). */
const char *mg_http1_reason(int status);

/* ---------------------------------------------------------------------------------------------
 * Chunked framing (client responses and upstream request bodies)
 */

#define MG_HTTP1_CHUNK_HEAD_MAX 19 /* 16 hex digits, CR LF, NUL */
#define MG_HTTP1_CHUNK_TAIL "\r\n"
#define MG_HTTP1_CHUNK_TAIL_LEN 2
#define MG_HTTP1_LAST_CHUNK "0\r\n\r\n"
#define MG_HTTP1_LAST_CHUNK_LEN 5

/*
 * Writes "<hex len>\r\n" into out and returns its length: send it, then the data, then
 * MG_HTTP1_CHUNK_TAIL. Returns 0 for len 0 (send nothing: an empty chunk would end the body);
 * end the body with MG_HTTP1_LAST_CHUNK.
 */
size_t mg_http1_chunk_head(char out[MG_HTTP1_CHUNK_HEAD_MAX], size_t len);

/* ---------------------------------------------------------------------------------------------
 * Request ids
 */

#define MG_HTTP1_REQUEST_ID_MAX 128 /* longest client-supplied id we keep */
#define MG_HTTP1_REQUEST_ID_LEN 32  /* ours: 16 bytes in hex */

/*
 * Writes a new id: 32 lower-case hex digits and a NUL. Unique within the process (a counter run
 * through a keyed permutation) and unpredictable across processes (the key comes from
 * RAND_bytes once). Thread-safe. Returns 0, or MG_EINVAL if no random key could be had.
 */
int mg_http1_request_id_new(char out[MG_HTTP1_REQUEST_ID_LEN + 1]);

/* A client's X-Request-Id we keep: 1 to 128 bytes of visible ASCII (0x21-0x7e), no spaces. */
bool mg_http1_request_id_valid(const char *s, size_t len);

#endif
