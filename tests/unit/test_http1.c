/*
 * Unit tests for src/http/http1.c: the response parser (every case fed whole, one byte at a
 * time, and split in two at every offset, with the same result), the client request checks,
 * the upstream request head, chunk framing and request ids.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "moongate/error.h"
#include "moongate/http1.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---------------------------------------------------------------------------------------------
 * A recorder: every callback becomes a line of text, so that runs can be compared.
 */

typedef struct rec {
    char log[16384];
    size_t log_len;
    char body[8192];
    size_t body_len;
    int heads, infos, completes, body_calls;
    int abort_in; /* 1: on_head, 2: on_body, 3: on_complete return nonzero */
    bool last_keep_alive;
} rec_t;

static void rec_printf(rec_t *r, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

static void rec_printf(rec_t *r, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(r->log + r->log_len, sizeof(r->log) - r->log_len, fmt, ap);
    va_end(ap);
    assert_true(n >= 0 && (size_t)n < sizeof(r->log) - r->log_len);
    r->log_len += (size_t)n;
}

static const char *framing_name(mg_http1_framing_t f)
{
    switch (f) {
    case MG_HTTP1_BODY_NONE: return "none";
    case MG_HTTP1_BODY_LENGTH: return "length";
    case MG_HTTP1_BODY_CHUNKED: return "chunked";
    case MG_HTTP1_BODY_CLOSE: return "close";
    }
    return "?";
}

static void rec_head(rec_t *r, char tag, const mg_http1_resp_head_t *h)
{
    rec_printf(r, "%c:%d %d.%d [%.*s]\n", tag, h->status, h->http_major, h->http_minor,
               (int)h->reason_len, h->reason);
    for (size_t i = 0; i < h->nheaders; i++)
        rec_printf(r, "  %.*s=[%.*s]\n", (int)h->headers[i].name_len, h->headers[i].name,
                   (int)h->headers[i].value_len, h->headers[i].value);
    if (h->content_length == MG_HTTP1_NO_LENGTH)
        rec_printf(r, "  framing=%s cl=- ka=%d\n", framing_name(h->framing), h->keep_alive);
    else
        rec_printf(r, "  framing=%s cl=%llu ka=%d\n", framing_name(h->framing),
                   (unsigned long long)h->content_length, h->keep_alive);
}

static int on_head(void *data, const mg_http1_resp_head_t *h)
{
    rec_t *r = data;
    r->heads++;
    rec_head(r, 'H', h);
    return r->abort_in == 1;
}

static int on_info(void *data, const mg_http1_resp_head_t *h)
{
    rec_t *r = data;
    r->infos++;
    rec_head(r, 'I', h);
    return 0;
}

static int on_body(void *data, const char *at, size_t len)
{
    rec_t *r = data;
    assert_true(len > 0);
    assert_true(r->body_len + len <= sizeof(r->body));
    memcpy(r->body + r->body_len, at, len);
    r->body_len += len;
    r->body_calls++;
    return r->abort_in == 2;
}

static int on_complete(void *data, bool keep_alive)
{
    rec_t *r = data;
    r->completes++;
    r->last_keep_alive = keep_alive;
    rec_printf(r, "B:[%.*s]\nC:ka=%d\n", (int)r->body_len, r->body, keep_alive);
    r->body_len = 0;
    return r->abort_in == 3;
}

static const mg_http1_resp_cbs_t cbs = { on_head, NULL, on_body, on_complete };
static const mg_http1_resp_cbs_t cbs_info = { on_head, on_info, on_body, on_complete };

/* How a run ended, with the log. */
typedef struct run {
    rec_t rec;
    int rc;      /* the first error from feed or eof, else 0 */
    char err[200];
} run_t;

typedef struct run_opts {
    const mg_http1_resp_cbs_t *cbs;
    const char *method; /* of every request */
    size_t head_max;
    bool eof;           /* end with mg_http1_resp_parser_eof() */
    int abort_in;
} run_opts_t;

/* Feeds one piece, and what is left of it after each completed response. */
static int feed_piece(mg_http1_resp_parser_t *p, const run_opts_t *o, const char *d, size_t n)
{
    while (n > 0) {
        size_t used = 0;
        int rc = mg_http1_resp_parser_feed(p, d, n, &used);
        assert_true(used <= n);
        if (rc < 0)
            return rc;
        /* Between responses, the next request is of the same method. */
        if (o->method && !mg_http1_resp_parser_busy(p))
            (void)mg_http1_resp_parser_expect(p, o->method);
        d += used;
        n -= used;
    }
    return 0;
}

/*
 * Runs input through a new parser in pieces: split == 0 feeds it whole, split == SIZE_MAX one
 * byte at a time, anything else in two pieces cut at that offset.
 */
static void run_input(run_t *run, const run_opts_t *o, const char *in, size_t len, size_t split)
{
    memset(run, 0, sizeof(*run));
    run->rec.abort_in = o->abort_in;
    mg_http1_resp_parser_t *p;
    assert_int_equal(mg_http1_resp_parser_new(o->cbs ? o->cbs : &cbs, &run->rec, o->head_max, &p),
                     0);
    if (o->method)
        assert_int_equal(mg_http1_resp_parser_expect(p, o->method), 0);
    int rc = 0;
    if (split == 0) {
        rc = feed_piece(p, o, in, len);
    } else if (split == SIZE_MAX) {
        for (size_t i = 0; i < len && rc == 0; i++)
            rc = feed_piece(p, o, in + i, 1);
    } else {
        rc = feed_piece(p, o, in, split);
        if (rc == 0)
            rc = feed_piece(p, o, in + split, len - split);
    }
    if (rc == 0 && o->eof)
        rc = mg_http1_resp_parser_eof(p);
    run->rc = rc;
    snprintf(run->err, sizeof(run->err), "%s", mg_http1_resp_parser_error(p));
    if (rc == 0)
        assert_string_equal(run->err, "");
    else
        assert_string_not_equal(run->err, "");
    mg_http1_resp_parser_free(p);
}

/* Runs input whole, then byte by byte and cut at every offset, and checks all runs agree. */
static void run_all_splits(run_t *whole, const run_opts_t *o, const char *in, size_t len)
{
    run_input(whole, o, in, len, 0);
    run_t *other = malloc(sizeof(*other));
    assert_non_null(other);
    for (size_t split = 1; split <= len; split++) {
        run_input(other, o, in, len, split == len ? SIZE_MAX : split);
        assert_int_equal(other->rc, whole->rc);
        assert_string_equal(other->rec.log, whole->rec.log);
        assert_string_equal(other->err, whole->err);
    }
    free(other);
}

#define S(lit) lit, sizeof(lit) - 1

static void expect_log(const char *in, size_t len, const run_opts_t *o, int rc, const char *log)
{
    run_t *run = malloc(sizeof(*run));
    assert_non_null(run);
    run_all_splits(run, o, in, len);
    if (run->rc != rc || strcmp(run->rec.log, log) != 0)
        print_message("rc %d (%s), log:\n%s", run->rc, run->err, run->rec.log);
    assert_int_equal(run->rc, rc);
    assert_string_equal(run->rec.log, log);
    free(run);
}

/* Expects an error whose message contains needle. */
static void expect_error(const char *in, size_t len, const run_opts_t *o, int rc,
                         const char *needle)
{
    run_t *run = malloc(sizeof(*run));
    assert_non_null(run);
    run_all_splits(run, o, in, len);
    if (run->rc != rc || !strstr(run->err, needle))
        print_message("rc %d (%s), log:\n%s", run->rc, run->err, run->rec.log);
    assert_int_equal(run->rc, rc);
    assert_non_null(strstr(run->err, needle));
    free(run);
}

static const run_opts_t plain = { 0 };

/* ---------------------------------------------------------------------------------------------
 * Response parser
 */

static void test_resp_content_length(void **state)
{
    expect_log(S("HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n\r\nhello"),
               &plain, 0,
               "H:200 1.1 [OK]\n"
               "  Content-Type=[text/plain]\n"
               "  Content-Length=[5]\n"
               "  framing=length cl=5 ka=1\n"
               "B:[hello]\nC:ka=1\n");
}

static void test_resp_chunked_extensions_trailers(void **state)
{
    expect_log(S("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                 "5;name=value\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n"),
               &plain, 0,
               "H:200 1.1 [OK]\n"
               "  Transfer-Encoding=[chunked]\n"
               "  framing=chunked cl=- ka=1\n"
               "B:[hello world]\nC:ka=1\n");
}

static void test_resp_until_close(void **state)
{
    run_opts_t o = { .eof = true };
    expect_log(S("HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\r\ndata: 1\n\ndata: 2\n"),
               &o, 0,
               "H:200 1.1 [OK]\n"
               "  Content-Type=[text/event-stream]\n"
               "  framing=close cl=- ka=0\n"
               "B:[data: 1\n\ndata: 2\n]\nC:ka=0\n");
}

static void test_resp_pipelined(void **state)
{
    expect_log(S("HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc"
                 "HTTP/1.1 404 Not Found\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nno\r\n0\r\n\r\n"
                 "HTTP/1.1 204 No Content\r\n\r\n"),
               &plain, 0,
               "H:200 1.1 [OK]\n  Content-Length=[3]\n  framing=length cl=3 ka=1\n"
               "B:[abc]\nC:ka=1\n"
               "H:404 1.1 [Not Found]\n  Transfer-Encoding=[chunked]\n"
               "  framing=chunked cl=- ka=1\n"
               "B:[no]\nC:ka=1\n"
               "H:204 1.1 [No Content]\n  framing=none cl=- ka=1\nB:[]\nC:ka=1\n");
}

/* feed stops at the end of a response and says where. */
static void test_resp_consumed_stops_at_message_end(void **state)
{
    static const char in[] = "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1 200 OK\r\n";
    rec_t r = { 0 };
    mg_http1_resp_parser_t *p;
    assert_int_equal(mg_http1_resp_parser_new(&cbs, &r, 0, &p), 0);
    size_t used;
    assert_int_equal(mg_http1_resp_parser_feed(p, in, sizeof(in) - 1, &used), 0);
    assert_int_equal(used, strlen("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"));
    assert_int_equal(r.completes, 1);
    assert_false(mg_http1_resp_parser_busy(p));
    assert_int_equal(mg_http1_resp_parser_feed(p, in + used, sizeof(in) - 1 - used, &used), 0);
    assert_int_equal(used, strlen("HTTP/1.1 200 OK\r\n"));
    assert_true(mg_http1_resp_parser_busy(p));
    assert_int_equal(mg_http1_resp_parser_expect(p, "HEAD"), MG_ESTATE);
    /* The upstream hung up inside the second head. */
    assert_int_equal(mg_http1_resp_parser_eof(p), MG_ECLOSED);
    assert_non_null(strstr(mg_http1_resp_parser_error(p), "closed"));
    assert_int_equal(mg_http1_resp_parser_feed(p, "x", 1, &used), MG_ESTATE);
    mg_http1_resp_parser_free(p);
}

static void test_resp_connection_close(void **state)
{
    expect_log(S("HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok"), &plain, 0,
               "H:200 1.1 [OK]\n  Connection=[close]\n  Content-Length=[2]\n"
               "  framing=length cl=2 ka=0\nB:[ok]\nC:ka=0\n");
    /* Nothing may follow a response that closes the connection. */
    expect_error(S("HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok"
                   "HTTP/1.1 200 OK\r\n\r\n"),
                 &plain, MG_ESTATE, "after a response that closes");
}

static void test_resp_http10(void **state)
{
    expect_log(S("HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok"), &plain, 0,
               "H:200 1.0 [OK]\n  Content-Length=[2]\n  framing=length cl=2 ka=0\n"
               "B:[ok]\nC:ka=0\n");
    expect_log(S("HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\nok"),
               &plain, 0,
               "H:200 1.0 [OK]\n  Connection=[keep-alive]\n  Content-Length=[2]\n"
               "  framing=length cl=2 ka=1\nB:[ok]\nC:ka=1\n");
    run_opts_t o = { .eof = true };
    expect_log(S("HTTP/1.0 200 OK\r\n\r\nbody"), &o, 0,
               "H:200 1.0 [OK]\n  framing=close cl=- ka=0\nB:[body]\nC:ka=0\n");
}

/* 204 and 304 have no body even with a Content-Length: the next bytes are the next response. */
static void test_resp_204_304_no_body(void **state)
{
    expect_log(S("HTTP/1.1 204 No Content\r\nContent-Length: 4\r\n\r\n"
                 "HTTP/1.1 304 Not Modified\r\nContent-Length: 10\r\nETag: \"x\"\r\n\r\n"
                 "HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n!"),
               &plain, 0,
               "H:204 1.1 [No Content]\n  Content-Length=[4]\n  framing=none cl=4 ka=1\n"
               "B:[]\nC:ka=1\n"
               "H:304 1.1 [Not Modified]\n  Content-Length=[10]\n  ETag=[\"x\"]\n"
               "  framing=none cl=10 ka=1\nB:[]\nC:ka=1\n"
               "H:200 1.1 [OK]\n  Content-Length=[1]\n  framing=length cl=1 ka=1\n"
               "B:[!]\nC:ka=1\n");
}

static void test_resp_head_request(void **state)
{
    run_opts_t o = { .method = "HEAD" };
    expect_log(S("HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n"
                 "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"),
               &o, 0,
               "H:200 1.1 [OK]\n  Content-Length=[1000]\n  framing=none cl=1000 ka=1\n"
               "B:[]\nC:ka=1\n"
               "H:200 1.1 [OK]\n  Transfer-Encoding=[chunked]\n  framing=none cl=- ka=1\n"
               "B:[]\nC:ka=1\n");
    /* A HEAD response without any length does not wait for the close either. */
    expect_log(S("HTTP/1.1 200 OK\r\nContent-Type: x\r\n\r\n"), &o, 0,
               "H:200 1.1 [OK]\n  Content-Type=[x]\n  framing=none cl=- ka=1\nB:[]\nC:ka=1\n");
    /* The method applies to one response only. */
    static const char two[] = "HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n"
                              "HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc";
    rec_t r = { 0 };
    mg_http1_resp_parser_t *p;
    size_t used, off = 0;
    assert_int_equal(mg_http1_resp_parser_new(&cbs, &r, 0, &p), 0);
    assert_int_equal(mg_http1_resp_parser_expect(p, "HEAD"), 0);
    assert_int_equal(mg_http1_resp_parser_feed(p, two, sizeof(two) - 1, &used), 0);
    off += used;
    assert_int_equal(r.completes, 1);
    assert_int_equal(mg_http1_resp_parser_feed(p, two + off, sizeof(two) - 1 - off, &used), 0);
    off += used;
    assert_int_equal(off, sizeof(two) - 1);
    assert_int_equal(r.completes, 2);
    assert_string_equal(strstr(r.log, "B:[abc]") ? "found" : r.log, "found");
    mg_http1_resp_parser_free(p);
}

static void test_resp_100_continue(void **state)
{
    static const char in[] = "HTTP/1.1 100 Continue\r\n\r\n"
                             "HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"
                             "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
    expect_log(in, sizeof(in) - 1, &plain, 0,
               "H:200 1.1 [OK]\n  Content-Length=[2]\n  framing=length cl=2 ka=1\n"
               "B:[ok]\nC:ka=1\n");
    run_opts_t o = { .cbs = &cbs_info };
    expect_log(in, sizeof(in) - 1, &o, 0,
               "I:100 1.1 [Continue]\n  framing=none cl=- ka=1\n"
               "I:103 1.1 [Early Hints]\n  Link=[</a>]\n  framing=none cl=- ka=1\n"
               "H:200 1.1 [OK]\n  Content-Length=[2]\n  framing=length cl=2 ka=1\n"
               "B:[ok]\nC:ka=1\n");
}

static void test_resp_too_many_interim(void **state)
{
    char in[2048] = "";
    for (int i = 0; i < 17; i++)
        strcat(in, "HTTP/1.1 100 Continue\r\n\r\n");
    run_t run;
    run_input(&run, &plain, in, strlen(in), 0);
    assert_int_equal(run.rc, MG_EINVAL);
    assert_non_null(strstr(run.err, "1xx"));
}

static void test_resp_101_rejected(void **state)
{
    expect_error(S("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                   "Connection: Upgrade\r\n\r\n"),
                 &plain, MG_EINVAL, "upgrades are not supported");
}

static void test_resp_malformed_status(void **state)
{
    expect_error(S("HTTP/1.1 2x0 OK\r\n\r\n"), &plain, MG_EINVAL, "invalid HTTP status code");
    expect_error(S("XTTP/1.1 200 OK\r\n\r\n"), &plain, MG_EINVAL, "malformed response");
    expect_error(S("\0HTTP/1.1 200 OK\r\n\r\n"), &plain, MG_EINVAL, "malformed response");
    expect_error(S("HTTP/x.1 200 OK\r\n\r\n"), &plain, MG_EINVAL, "invalid HTTP version");
    expect_error(S("HTTP/1.1 10\n\r\n"), &plain, MG_EINVAL, "not three digits"); /* fuzzer */
    expect_error(S("HTTP/1.1 099 Low\r\n\r\n"), &plain, MG_EINVAL, "not three digits");
    expect_error(S("HTTP/2.0 200 OK\r\n\r\n"), &plain, MG_EINVAL, "unsupported HTTP version");
    expect_error(S("HTTP/1.1 200 OK\r\nbad header\r\n\r\n"), &plain, MG_EINVAL,
                 "invalid character in header");
}

static void test_resp_bad_chunk_size(void **state)
{
    expect_error(S("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhi\r\n0\r\n\r\n"),
                 &plain, MG_EINVAL, "invalid character in chunk size header");
    /* A chunk size too large for 64 bits. */
    expect_error(S("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                   "fffffffffffffffff\r\n"),
                 &plain, MG_EINVAL, "malformed response");
}

static void test_resp_bad_content_length(void **state)
{
    expect_error(S("HTTP/1.1 200 OK\r\nContent-Length: 1x\r\n\r\n"), &plain, MG_EINVAL,
                 "content-length");
    expect_error(S("HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nx"), &plain,
                 MG_EINVAL, "content-length");
}

static void test_resp_oversized_head(void **state)
{
    /* A head of exactly head_max bytes passes; one byte more does not. */
    static const char in[] = "HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n";
    run_opts_t o = { .head_max = sizeof(in) - 1 };
    expect_log(in, sizeof(in) - 1, &o, 0,
               "H:200 1.1 [OK]\n  Content-Length=[0]\n  framing=length cl=0 ka=1\nB:[]\nC:ka=1\n");
    o.head_max--;
    expect_error(in, sizeof(in) - 1, &o, MG_EINVAL, "response head larger than");

    /* The default cap: 64 KB of header fields. */
    size_t big = 70 * 1024;
    char *huge = malloc(big + 64);
    assert_non_null(huge);
    int n = snprintf(huge, 64, "HTTP/1.1 200 OK\r\nX-Big: ");
    memset(huge + n, 'a', big);
    memcpy(huge + n + big, "\r\n\r\n", 4);
    run_t *run = malloc(sizeof(*run));
    assert_non_null(run);
    run_input(run, &plain, huge, (size_t)n + big + 4, 0);
    assert_int_equal(run->rc, MG_EINVAL);
    assert_non_null(strstr(run->err, "larger than 65536"));
    run_input(run, &plain, huge, (size_t)n + big + 4, SIZE_MAX);
    assert_int_equal(run->rc, MG_EINVAL);
    assert_non_null(strstr(run->err, "larger than 65536"));
    free(run);
    free(huge);
}

static void test_resp_too_many_headers(void **state)
{
    char in[8192];
    size_t len = 0;
    len += (size_t)snprintf(in + len, sizeof(in) - len, "HTTP/1.1 200 OK\r\n");
    for (int i = 0; i < MG_HTTP1_MAX_HEADERS; i++)
        len += (size_t)snprintf(in + len, sizeof(in) - len, "X-%d: v\r\n", i);
    len += (size_t)snprintf(in + len, sizeof(in) - len, "Content-Length: 0\r\n\r\n");
    run_t run;
    run_input(&run, &plain, in, len, 0);
    assert_int_equal(run.rc, MG_EINVAL);
    assert_non_null(strstr(run.err, "more than 128 header fields"));
    /* Exactly the maximum is fine. */
    len = (size_t)snprintf(in, sizeof(in), "HTTP/1.1 200 OK\r\n");
    for (int i = 0; i < MG_HTTP1_MAX_HEADERS - 1; i++)
        len += (size_t)snprintf(in + len, sizeof(in) - len, "X-%d: v\r\n", i);
    len += (size_t)snprintf(in + len, sizeof(in) - len, "Content-Length: 0\r\n\r\n");
    run_input(&run, &plain, in, len, 0);
    assert_int_equal(run.rc, 0);
    assert_int_equal(run.rec.heads, 1);
}

/* A head with more fields than the parser starts with: the slots grow, every field intact, and
   the next response on the same parser reuses them. */
static void test_resp_headers_grow(void **state)
{
    char in[4096], want[4096];
    size_t len = 0, wlen = 0;
    for (int r = 0; r < 2; r++) {
        len += (size_t)snprintf(in + len, sizeof(in) - len, "HTTP/1.1 200 OK\r\n");
        wlen += (size_t)snprintf(want + wlen, sizeof(want) - wlen, "H:200 1.1 [OK]\n");
        for (int i = 0; i < 40; i++) {
            len += (size_t)snprintf(in + len, sizeof(in) - len, "X-%d: value-%d\r\n", i, i * r);
            wlen += (size_t)snprintf(want + wlen, sizeof(want) - wlen, "  X-%d=[value-%d]\n", i,
                                     i * r);
        }
        len += (size_t)snprintf(in + len, sizeof(in) - len, "Content-Length: 0\r\n\r\n");
        wlen += (size_t)snprintf(want + wlen, sizeof(want) - wlen,
                                 "  Content-Length=[0]\n  framing=length cl=0 ka=1\nB:[]\nC:ka=1\n");
    }
    assert_true(len < sizeof(in) - 1 && wlen < sizeof(want) - 1);
    expect_log(in, len, &plain, 0, want);
}

/*
 * obs-fold (RFC 9112 5.2): http-parser 2.9 accepts a folded line and hands over the value without
 * the line break, the fold's whitespace kept: the "replace with SP" a recipient may do. No CR or
 * LF ever reaches the caller in a value.
 */
static void test_resp_obs_fold(void **state)
{
    expect_log(S("HTTP/1.1 200 OK\r\nX-A: one\r\n two\r\n\tthree\r\nContent-Length: 0\r\n\r\n"),
               &plain, 0,
               "H:200 1.1 [OK]\n  X-A=[one two\tthree]\n  Content-Length=[0]\n"
               "  framing=length cl=0 ka=1\nB:[]\nC:ka=1\n");
}

static void test_resp_nul_in_header(void **state)
{
    expect_error(S("HTTP/1.1 200 OK\r\nX-A: a\0b\r\nContent-Length: 0\r\n\r\n"), &plain,
                 MG_EINVAL, "malformed response");
    expect_error(S("HTTP/1.1 200 OK\r\nX-\0A: ab\r\nContent-Length: 0\r\n\r\n"), &plain,
                 MG_EINVAL, "malformed response");
    /* Debian's http-parser is built non-strict: it takes spaces inside header names. */
    expect_error(S("HTTP/1.1 200 OK\r\nBad Name: v\r\nContent-Length: 0\r\n\r\n"), &plain,
                 MG_EINVAL, "invalid character in header");
    /* http-parser lets this one through; we do not (found by the fuzzer). */
    expect_error(S("HTTP/1.1 200 OK\r\nTransfer-Encoding:\0 chunked\r\n\r\n5;a=b\r\n"),
                 &plain, MG_EINVAL, "control character in a header value");
    expect_error(S("HTTP/1.1 200 OK\r\nX-A: \x01\r\nContent-Length: 0\r\n\r\n"), &plain,
                 MG_EINVAL, "control character in a header value");
    expect_error(S("HTTP/1.1 200 O\x7fK\r\nContent-Length: 0\r\n\r\n"), &plain, MG_EINVAL,
                 "reason phrase");
    /* HTAB and obs-text are allowed in values. */
    expect_log(S("HTTP/1.1 200 OK\r\nX-A: a\tb\xe9\r\nContent-Length: 0\r\n\r\n"), &plain, 0,
               "H:200 1.1 [OK]\n  X-A=[a\tb\xe9]\n  Content-Length=[0]\n"
               "  framing=length cl=0 ka=1\nB:[]\nC:ka=1\n");
}

static void test_resp_empty_header_value(void **state)
{
    expect_log(S("HTTP/1.1 200 OK\r\nX-Empty:\r\nX-B: b\r\nX-Sp:   \r\nContent-Length: 0\r\n\r\n"),
               &plain, 0,
               "H:200 1.1 [OK]\n  X-Empty=[]\n  X-B=[b]\n  X-Sp=[]\n  Content-Length=[0]\n"
               "  framing=length cl=0 ka=1\nB:[]\nC:ka=1\n");
}

static void test_resp_truncated(void **state)
{
    run_opts_t o = { .eof = true };
    expect_error(S("HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc"), &o, MG_ECLOSED,
                 "inside a response's body");
    expect_error(S("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab"), &o,
                 MG_ECLOSED, "inside a response's body");
    expect_error(S("HTTP/1.1 200 OK\r\nContent-"), &o, MG_ECLOSED, "inside a response's head");
    expect_error(S("HTTP/1.1 100 Continue\r\n\r\n"), &o, MG_ECLOSED, "after a 1xx");
    /* A close between responses is clean. */
    expect_log(S("HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nx"), &o, 0,
               "H:200 1.1 [OK]\n  Content-Length=[1]\n  framing=length cl=1 ka=1\n"
               "B:[x]\nC:ka=1\n");
}

/* Content-Length and chunked together: http-parser 2.9.4 refuses the response. */
static void test_resp_cl_and_te(void **state)
{
    expect_error(S("HTTP/1.1 200 OK\r\nContent-Length: 100\r\n"
                   "Transfer-Encoding: chunked\r\n\r\n2\r\nab\r\n0\r\n\r\n"),
                 &plain, MG_EINVAL, "unexpected content-length header");
}

/* A transfer coding other than chunked: the body runs to the close (RFC 9112 6.3). */
static void test_resp_te_not_chunked(void **state)
{
    run_opts_t o = { .eof = true };
    expect_log(S("HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nzzz"), &o, 0,
               "H:200 1.1 [OK]\n  Transfer-Encoding=[gzip]\n  framing=close cl=- ka=0\n"
               "B:[zzz]\nC:ka=0\n");
}

static void test_resp_callback_abort(void **state)
{
    static const char in[] = "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
    for (int where = 1; where <= 3; where++) {
        run_opts_t o = { .abort_in = where };
        run_t run;
        run_input(&run, &o, in, sizeof(in) - 1, 0);
        assert_int_equal(run.rc, MG_ECANCELED);
    }
}

static void test_resp_new_rejects_bad_arguments(void **state)
{
    mg_http1_resp_parser_t *p;
    mg_http1_resp_cbs_t none = { 0 };
    assert_int_equal(mg_http1_resp_parser_new(NULL, NULL, 0, &p), MG_EINVAL);
    assert_int_equal(mg_http1_resp_parser_new(&none, NULL, 0, &p), MG_EINVAL);
    mg_http1_resp_parser_free(NULL);
}

/* The head buffer is reused across responses and given back when one grew it a lot. */
static void test_resp_reuse_many(void **state)
{
    rec_t *r = calloc(1, sizeof(*r));
    assert_non_null(r);
    mg_http1_resp_parser_t *p;
    assert_int_equal(mg_http1_resp_parser_new(&cbs, r, 0, &p), 0);
    char big[20000];
    int n = snprintf(big, sizeof(big), "HTTP/1.1 200 OK\r\nX-Big: ");
    memset(big + n, 'b', 16000);
    n += 16000;
    n += snprintf(big + n, sizeof(big) - (size_t)n, "\r\nContent-Length: 1\r\n\r\nz");
    static const char small[] = "HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\ny";
    for (int i = 0; i < 1000; i++) {
        size_t used;
        r->log_len = 0;
        if (i % 100 == 7)
            assert_int_equal(mg_http1_resp_parser_feed(p, big, (size_t)n, &used), 0);
        else
            assert_int_equal(mg_http1_resp_parser_feed(p, small, sizeof(small) - 1, &used), 0);
        assert_int_equal(r->completes, i + 1);
    }
    mg_http1_resp_parser_free(p);
    free(r);
}

/* ---------------------------------------------------------------------------------------------
 * Client request checks
 */

#define H(n, v) { n, sizeof(n) - 1, v, sizeof(v) - 1 }

static void check(const char *method, const mg_http1_header_t *hs, size_t n, int want_status,
                  const char *why_part)
{
    int status = -1;
    const char *why = NULL;
    mg_http1_req_framing_t fr;
    int rc = mg_http1_check_request(method, hs, n, &fr, &status, &why);
    if (status != want_status)
        print_message("status %d why %s\n", status, why);
    assert_int_equal(status, want_status);
    assert_int_equal(rc, want_status ? MG_EINVAL : 0);
    assert_non_null(why);
    if (why_part)
        assert_non_null(strstr(why, why_part));
}

static void test_check_request(void **state)
{
    mg_http1_header_t ok[] = { H("Host", "x"), H("Content-Length", "12") };
    mg_http1_req_framing_t fr;
    assert_int_equal(mg_http1_check_request("POST", ok, 2, &fr, NULL, NULL), 0);
    assert_false(fr.chunked);
    assert_int_equal(fr.content_length, 12);
    assert_int_equal(mg_http1_check_request("GET", NULL, 0, &fr, NULL, NULL), 0);
    assert_int_equal(fr.content_length, MG_HTTP1_NO_LENGTH);

    mg_http1_header_t te[] = { H("Transfer-Encoding", " Chunked ") };
    assert_int_equal(mg_http1_check_request("POST", te, 1, &fr, NULL, NULL), 0);
    assert_true(fr.chunked);

    check("GE T", NULL, 0, 400, "method");
    check("", NULL, 0, 400, "method");
    check(NULL, NULL, 0, 400, "method");
    mg_http1_header_t badname[] = { H("X Y", "1") };
    check("GET", badname, 1, 400, "header name");
    mg_http1_header_t colon[] = { H("X:Y", "1") };
    check("GET", colon, 1, 400, "header name");
    mg_http1_header_t cr[] = { H("X-A", "a\rb") };
    check("GET", cr, 1, 400, "CR, LF or NUL");
    mg_http1_header_t lf[] = { H("X-A", "a\nb") };
    check("GET", lf, 1, 400, "CR, LF or NUL");
    mg_http1_header_t nul[] = { H("X-A", "a\0b") };
    check("GET", nul, 1, 400, "CR, LF or NUL");
    mg_http1_header_t both[] = { H("Content-Length", "3"), H("Transfer-Encoding", "chunked") };
    check("POST", both, 2, 400, "both");
    mg_http1_header_t differ[] = { H("Content-Length", "3"), H("content-length", "4") };
    check("POST", differ, 2, 400, "differ");
    mg_http1_header_t differ_list[] = { H("Content-Length", "3, 4") };
    check("POST", differ_list, 1, 400, "differ");
    mg_http1_header_t same[] = { H("Content-Length", "3"), H("Content-Length", "3, 3") };
    check("POST", same, 2, 0, NULL);
    mg_http1_header_t cl_bad[] = { H("Content-Length", "-1") };
    check("POST", cl_bad, 1, 400, "Content-Length");
    mg_http1_header_t cl_plus[] = { H("Content-Length", "+1") };
    check("POST", cl_plus, 1, 400, "Content-Length");
    mg_http1_header_t cl_empty[] = { H("Content-Length", "") };
    check("POST", cl_empty, 1, 400, "Content-Length");
    mg_http1_header_t cl_huge[] = { H("Content-Length", "99999999999999999999") };
    check("POST", cl_huge, 1, 400, "Content-Length");
    mg_http1_header_t gzip[] = { H("Transfer-Encoding", "gzip, chunked") };
    check("POST", gzip, 1, 501, "not supported");
    mg_http1_header_t gzip2[] = { H("Transfer-Encoding", "gzip"),
                                  H("Transfer-Encoding", "chunked") };
    check("POST", gzip2, 2, 501, "not supported");
    mg_http1_header_t not_last[] = { H("Transfer-Encoding", "chunked, gzip") };
    check("POST", not_last, 1, 400, "end with");
    mg_http1_header_t identity[] = { H("Transfer-Encoding", "identity") };
    check("POST", identity, 1, 400, "end with");
    mg_http1_header_t twice[] = { H("Transfer-Encoding", "chunked, chunked") };
    check("POST", twice, 1, 400, "single chunked");
    mg_http1_header_t te_empty[] = { H("Transfer-Encoding", "") };
    check("POST", te_empty, 1, 400, "end with");
}

static void test_tokens_values(void **state)
{
    assert_true(mg_http1_token_valid(S("GET")));
    assert_true(mg_http1_token_valid(S("X-Custom_1.2~!")));
    assert_false(mg_http1_token_valid(S("")));
    assert_false(mg_http1_token_valid(S("a(b")));
    assert_false(mg_http1_token_valid(S("\xc3\xa9")));
    assert_true(mg_http1_value_valid(S("")));
    assert_true(mg_http1_value_valid(S("a \t b\x80\xff")));
    assert_false(mg_http1_value_valid(S("a\r")));
}

static void test_header_is_hop(void **state)
{
    mg_http1_header_t hs[] = { H("Connection", "X-Secret , keep-alive"), H("connection", "x-other"),
                               H("X-Secret", "1"), H("X-Other", "2"), H("X-Kept", "3") };
    assert_true(mg_http1_header_is_hop(hs, 5, S("X-SECRET")));
    assert_true(mg_http1_header_is_hop(hs, 5, S("x-other")));
    assert_false(mg_http1_header_is_hop(hs, 5, S("X-Kept")));
    assert_true(mg_http1_header_is_hop(NULL, 0, S("Transfer-Encoding")));
    assert_true(mg_http1_header_is_hop(NULL, 0, S("Proxy-Authorization")));
    assert_true(mg_http1_header_is_hop(NULL, 0, S("keep-alive")));
    assert_true(mg_http1_header_is_hop(NULL, 0, S("TE")));
    assert_true(mg_http1_header_is_hop(NULL, 0, S("Trailer")));
    assert_true(mg_http1_header_is_hop(NULL, 0, S("Upgrade")));
    assert_false(mg_http1_header_is_hop(NULL, 0, S("Content-Length")));
    assert_false(mg_http1_header_is_hop(NULL, 0, S("Proxy")));
}

/* ---------------------------------------------------------------------------------------------
 * Upstream request head
 */

static char *build(const mg_http1_request_t *req)
{
    char *out = NULL;
    size_t len = 0;
    const char *why = NULL;
    int rc = mg_http1_request_head(req, &out, &len, &why);
    if (rc != 0)
        print_message("request_head: %d %s\n", rc, why);
    assert_int_equal(rc, 0);
    char *s = malloc(len + 1);
    assert_non_null(s);
    memcpy(s, out, len);
    s[len] = '\0';
    free(out);
    return s;
}

static void test_request_head_basic(void **state)
{
    mg_http1_header_t hs[] = {
        H("Host", "gateway.example"),
        H("Content-Type", "application/json"),
        H("Connection", "keep-alive, X-Hop"),
        H("Keep-Alive", "timeout=5"),
        H("X-Hop", "secret"),
        H("Proxy-Authorization", "Basic eA=="),
        H("Proxy-Connection", "keep-alive"),
        H("TE", "trailers"),
        H("Trailer", "X-T"),
        H("Transfer-Encoding", "chunked"),
        H("Upgrade", "h2c"),
        H("Expect", "100-continue"),
        H("X-Forwarded-For", "1.1.1.1, 2.2.2.2"),
        H("X-Forwarded-Proto", "gopher"),
        H("X-Request-Id", "client-id"),
        H("Content-Length", "999"),
        H("x-forwarded-for", "3.3.3.3"),
        H("Authorization", "Bearer t"),
    };
    mg_http1_request_t req = {
        .method = "POST",
        .path = S("/api/chat?stream=1"),
        .host = "127.0.0.1:11434",
        .headers = hs,
        .nheaders = sizeof(hs) / sizeof(hs[0]),
        .client_addr = "203.0.113.9",
        .proto = "https",
        .request_id = "0123abcd",
        .body_length = MG_HTTP1_BODY_LENGTH_CHUNKED,
    };
    char *s = build(&req);
    assert_string_equal(s, "POST /api/chat?stream=1 HTTP/1.1\r\n"
                           "Host: 127.0.0.1:11434\r\n"
                           "Content-Type: application/json\r\n"
                           "Authorization: Bearer t\r\n"
                           "X-Forwarded-For: 1.1.1.1, 2.2.2.2, 3.3.3.3, 203.0.113.9\r\n"
                           "X-Forwarded-Proto: https\r\n"
                           "X-Request-Id: 0123abcd\r\n"
                           "Transfer-Encoding: chunked\r\n"
                           "Connection: keep-alive\r\n"
                           "\r\n");
    free(s);

    /* Content-Length framing, no client address: the client's X-Forwarded-For passes as is. */
    mg_http1_header_t hs2[] = { H("X-Forwarded-For", "9.9.9.9"), H("Accept", "*/*") };
    mg_http1_request_t req2 = {
        .method = "POST", .path = S("/v1/completions"), .host = "localhost",
        .headers = hs2, .nheaders = 2, .body_length = 42,
    };
    s = build(&req2);
    assert_string_equal(s, "POST /v1/completions HTTP/1.1\r\nHost: localhost\r\n"
                           "Accept: */*\r\nX-Forwarded-For: 9.9.9.9\r\n"
                           "Content-Length: 42\r\nConnection: keep-alive\r\n\r\n");
    free(s);

    /* No body: no framing header; a Content-Length of 0 is sent. */
    mg_http1_request_t req3 = {
        .method = "GET", .path = S("/"), .host = "h", .client_addr = "::1",
        .body_length = MG_HTTP1_BODY_LENGTH_NONE,
    };
    s = build(&req3);
    assert_string_equal(s, "GET / HTTP/1.1\r\nHost: h\r\nX-Forwarded-For: ::1\r\n"
                           "Connection: keep-alive\r\n\r\n");
    free(s);
    req3.body_length = 0;
    s = build(&req3);
    assert_non_null(strstr(s, "Content-Length: 0\r\n"));
    free(s);
    req3.body_length = INT64_MAX;
    s = build(&req3);
    assert_non_null(strstr(s, "Content-Length: 9223372036854775807\r\n"));
    free(s);
}

/* The head builder copies the target and fields as they are: a table of fidelity cases. */
static void test_request_head_fidelity(void **state)
{
    static const char *const targets[] = {
        "/v1/chat;x=1/completions", "/a%2Fb", "/q?a=%2B&b=c+d&e=%3D", "/a/%2e%2e/b",
        "/a/../b/./c", "//a//b", "/p?x=%25%zz",
    };
    for (size_t i = 0; i < sizeof(targets) / sizeof(targets[0]); i++) {
        mg_http1_request_t req = { .method = "GET", .path = targets[i],
                                   .path_len = strlen(targets[i]), .host = "h",
                                   .body_length = MG_HTTP1_BODY_LENGTH_NONE };
        char *s = build(&req), line[128];
        snprintf(line, sizeof(line), "GET %s HTTP/1.1\r\n", targets[i]);
        assert_int_equal(strncmp(s, line, strlen(line)), 0);
        free(s);
    }
    /* Case, order and duplicates kept; a 9 KiB value and a 9 KiB query argument whole. */
    static char big[9216 + 1], target[9216 + 16];
    memset(big, 'v', 9216);
    snprintf(target, sizeof(target), "/api?prompt=%s", big);
    mg_http1_header_t hs[] = {
        H("x-stainless-OS", "Linux"), H("X-Dup", "1"), H("x-dup", "2"), H("X-Dup", "3"),
        { "User-Agent", 10, big, 9216 },
    };
    mg_http1_request_t req = { .method = "POST", .path = target, .path_len = strlen(target),
                               .host = "h", .headers = hs, .nheaders = 5, .body_length = 2 };
    char *s = build(&req);
    char want[2 * 9216 + 512];
    snprintf(want, sizeof(want), "POST %s HTTP/1.1\r\nHost: h\r\nx-stainless-OS: Linux\r\n"
             "X-Dup: 1\r\nx-dup: 2\r\nX-Dup: 3\r\nUser-Agent: %s\r\nContent-Length: 2\r\n"
             "Connection: keep-alive\r\n\r\n", target, big);
    assert_string_equal(s, want);
    free(s);
}

static void expect_head_error(const mg_http1_request_t *req, const char *why_part)
{
    char *out = NULL;
    size_t len = 0;
    const char *why = NULL;
    assert_int_equal(mg_http1_request_head(req, &out, &len, &why), MG_EINVAL);
    assert_null(out);
    assert_non_null(why);
    if (!strstr(why, why_part))
        print_message("why: %s\n", why);
    assert_non_null(strstr(why, why_part));
}

static void test_request_head_rejects(void **state)
{
    mg_http1_request_t req = {
        .method = "GET", .path = S("/ok"), .host = "h", .body_length = MG_HTTP1_BODY_LENGTH_NONE,
    };
    static const char *bad_paths[] = { "", "ok", "/a b", "/a\r\nX: y", "/a\tb", "/\x7f",
                                       "/\xc3\xa9", "*", "http://x/" };
    for (size_t i = 0; i < sizeof(bad_paths) / sizeof(bad_paths[0]); i++) {
        mg_http1_request_t r = req;
        r.path = bad_paths[i];
        r.path_len = strlen(bad_paths[i]);
        expect_head_error(&r, "invalid path");
    }
    mg_http1_request_t r = req;
    r.path = "/a\0b";
    r.path_len = 4;
    expect_head_error(&r, "invalid path");
    r = req;
    r.method = "G T";
    expect_head_error(&r, "method");
    r = req;
    r.host = "a\r\nb";
    expect_head_error(&r, "Host");
    r = req;
    r.host = "";
    expect_head_error(&r, "Host");
    r = req;
    r.request_id = "has space";
    expect_head_error(&r, "X-Request-Id");
    r = req;
    r.client_addr = "1.2.3.4\r\n";
    expect_head_error(&r, "client address");
    mg_http1_header_t inj[] = { H("X-A", "v\r\nX-Injected: 1") };
    r = req;
    r.headers = inj;
    r.nheaders = 1;
    expect_head_error(&r, "CR, LF or NUL");
    mg_http1_header_t badname[] = { H("X A", "v") };
    r.headers = badname;
    expect_head_error(&r, "header name");
    r = req;
    r.body_length = -3;
    expect_head_error(&r, "body length");

    /* Too large. */
    size_t big = MG_HTTP1_REQUEST_HEAD_MAX;
    char *v = malloc(big);
    assert_non_null(v);
    memset(v, 'v', big);
    mg_http1_header_t huge[] = { { "X-Big", 5, v, big } };
    r = req;
    r.headers = huge;
    r.nheaders = 1;
    expect_head_error(&r, "too large");
    free(v);
}

/* The head we build parses back, through http-parser's request side of the same grammar. */
static void test_request_head_names_in_connection_case(void **state)
{
    mg_http1_header_t hs[] = { H("X-Trace", "1"), H("CONNECTION", "x-trace,,  ,foo"),
                               H("Foo", "bar"), H("X-Keep", "k") };
    mg_http1_request_t req = {
        .method = "PUT", .path = S("/p"), .host = "h", .headers = hs, .nheaders = 4,
        .body_length = 3,
    };
    char *s = build(&req);
    assert_string_equal(s, "PUT /p HTTP/1.1\r\nHost: h\r\nX-Keep: k\r\n"
                           "Content-Length: 3\r\nConnection: keep-alive\r\n\r\n");
    free(s);
}

/* ---------------------------------------------------------------------------------------------
 * Chunk framing and request ids
 */

/* Field edits: every client field of an edited name goes, set ones follow the client's. */
static void test_request_head_edits(void **state)
{
    mg_http1_header_t hs[] = {
        H("Authorization", "Bearer gateway-token"),
        H("Origin", "https://app.example"),
        H("X-Keep", "1"),
        H("authorization", "Bearer second"),
        H("X-Api-Key", "k"),
    };
    mg_http1_field_edit_t edits[] = {
        { "authorization", 13, NULL, 0 },          /* the credential */
        { "authorization", 13, "Bearer up", 9 },   /* the route's own */
        { "ORIGIN", 6, NULL, 0 },
        { "x-empty", 7, "", 0 },
    };
    mg_http1_request_t req = {
        .method = "GET", .path = S("/"), .host = "localhost:11434", .headers = hs,
        .nheaders = 5, .body_length = MG_HTTP1_BODY_LENGTH_NONE, .edits = edits, .nedits = 4,
    };
    char *s = build(&req);
    assert_string_equal(s, "GET / HTTP/1.1\r\nHost: localhost:11434\r\nX-Keep: 1\r\n"
                           "X-Api-Key: k\r\nauthorization: Bearer up\r\nx-empty: \r\n"
                           "Connection: keep-alive\r\n\r\n");
    free(s);

    /* The builder's own fields and bad values are refused. */
    static const char *const owned[] = { "host", "Content-Length", "transfer-encoding",
                                         "connection", "keep-alive", "te", "upgrade", "expect",
                                         "x-forwarded-for", "x-forwarded-proto", "x-request-id",
                                         "proxy-authorization", "a b", "" };
    for (size_t i = 0; i < sizeof(owned) / sizeof(owned[0]); i++) {
        mg_http1_field_edit_t e = { owned[i], strlen(owned[i]), "v", 1 };
        mg_http1_request_t r = req;
        r.edits = &e;
        r.nedits = 1;
        expect_head_error(&r, "cannot be edited");
        assert_false(mg_http1_field_editable(owned[i], strlen(owned[i])));
    }
    mg_http1_field_edit_t e = { "x-a", 3, "v\r\nx-b: 1", 10 };
    req.edits = &e;
    req.nedits = 1;
    expect_head_error(&req, "contains CR, LF or NUL");
    req.nedits = MG_HTTP1_FIELD_EDITS_MAX + 1;
    expect_head_error(&req, "too many field edits");
    assert_true(mg_http1_field_editable("authorization", 13));
}

static void test_chunk_head(void **state)
{
    char b[MG_HTTP1_CHUNK_HEAD_MAX];
    assert_int_equal(mg_http1_chunk_head(b, 0), 0);
    assert_int_equal(mg_http1_chunk_head(b, 1), 3);
    assert_string_equal(b, "1\r\n");
    assert_int_equal(mg_http1_chunk_head(b, 255), 4);
    assert_string_equal(b, "ff\r\n");
    assert_int_equal(mg_http1_chunk_head(b, 0x10000), 7);
    assert_string_equal(b, "10000\r\n");
    assert_int_equal(mg_http1_chunk_head(b, SIZE_MAX), 18);
    assert_string_equal(b, "ffffffffffffffff\r\n");
    assert_string_equal(MG_HTTP1_CHUNK_TAIL, "\r\n");
    assert_int_equal(strlen(MG_HTTP1_LAST_CHUNK), MG_HTTP1_LAST_CHUNK_LEN);

    /* What we frame, our parser reads back. */
    char wire[256];
    size_t n = (size_t)snprintf(wire, sizeof(wire), "HTTP/1.1 200 OK\r\n"
                                                    "Transfer-Encoding: chunked\r\n\r\n");
    static const char *pieces[] = { "hello", " ", "chunked world, sixteen+ bytes long" };
    for (size_t i = 0; i < 3; i++) {
        n += mg_http1_chunk_head(wire + n, strlen(pieces[i]));
        memcpy(wire + n, pieces[i], strlen(pieces[i]));
        n += strlen(pieces[i]);
        memcpy(wire + n, MG_HTTP1_CHUNK_TAIL, MG_HTTP1_CHUNK_TAIL_LEN);
        n += MG_HTTP1_CHUNK_TAIL_LEN;
    }
    memcpy(wire + n, MG_HTTP1_LAST_CHUNK, MG_HTTP1_LAST_CHUNK_LEN);
    n += MG_HTTP1_LAST_CHUNK_LEN;
    expect_log(wire, n, &plain, 0,
               "H:200 1.1 [OK]\n  Transfer-Encoding=[chunked]\n  framing=chunked cl=- ka=1\n"
               "B:[hello chunked world, sixteen+ bytes long]\nC:ka=1\n");
}

static void expect_response_head(const mg_http1_response_t *r, const char *want)
{
    char out[1024];
    size_t len = 0;
    assert_int_equal(mg_http1_response_head(r, out, sizeof(out), &len), 0);
    if (len != strlen(want) || memcmp(out, want, len) != 0)
        fail_msg("got:\n%.*s\nwant:\n%s", (int)len, out, want);
}

static void test_response_head(void **state)
{
    /* The upstream's fields in order and case, minus hop-by-hop ones, those Connection names,
       its framing and its X-Request-Id; then ours. */
    mg_http1_header_t hs[] = {
        { "Content-Type", 12, "text/event-stream", 17 },
        { "Connection", 10, "keep-alive, X-Private", 21 },
        { "X-Private", 9, "secret", 6 },
        { "Transfer-Encoding", 17, "chunked", 7 },
        { "Content-Length", 14, "12", 2 },
        { "x-request-id", 12, "theirs", 6 },
        { "Keep-Alive", 10, "timeout=5", 9 },
        { "cache-control", 13, "no-cache", 8 },
        { "Set-Cookie", 10, "a=1", 3 },
        { "Set-Cookie", 10, "b=2", 3 },
    };
    mg_http1_response_t r = {
        .status = 200, .headers = hs, .nheaders = 10,
        .body_length = MG_HTTP1_BODY_LENGTH_CHUNKED, .request_id = "abc",
    };
    expect_response_head(&r, "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                             "cache-control: no-cache\r\nSet-Cookie: a=1\r\nSet-Cookie: b=2\r\n"
                             "Transfer-Encoding: chunked\r\nX-Request-Id: abc\r\n\r\n");
    r = (mg_http1_response_t){ .status = 404, .body_length = 7, .close = true };
    expect_response_head(&r, "HTTP/1.1 404 Not Found\r\nContent-Length: 7\r\n"
                             "Connection: close\r\n\r\n");
    r = (mg_http1_response_t){ .status = 204, .body_length = MG_HTTP1_BODY_LENGTH_NONE };
    expect_response_head(&r, "HTTP/1.1 204 No Content\r\n\r\n");
    r = (mg_http1_response_t){ .status = 599, .body_length = 0 };
    expect_response_head(&r, "HTTP/1.1 599 Unknown\r\nContent-Length: 0\r\n\r\n");

    /* Refused: a bad status, name, value or id; and a head that does not fit. */
    char out[64];
    size_t len;
    mg_http1_header_t bad_name = { "X A", 3, "v", 1 }, bad_value = { "X", 1, "a\r\nb", 4 };
    r = (mg_http1_response_t){ .status = 99 };
    assert_int_equal(mg_http1_response_head(&r, out, sizeof(out), &len), MG_EINVAL);
    r = (mg_http1_response_t){ .status = 200, .headers = &bad_name, .nheaders = 1 };
    assert_int_equal(mg_http1_response_head(&r, out, sizeof(out), &len), MG_EINVAL);
    r = (mg_http1_response_t){ .status = 200, .headers = &bad_value, .nheaders = 1 };
    assert_int_equal(mg_http1_response_head(&r, out, sizeof(out), &len), MG_EINVAL);
    r = (mg_http1_response_t){ .status = 200, .request_id = "has space" };
    assert_int_equal(mg_http1_response_head(&r, out, sizeof(out), &len), MG_EINVAL);
    mg_http1_header_t long_value = { "X", 1, "0123456789012345678901234567890123456789"
                                             "0123456789012345678901234567890123456789", 80 };
    r = (mg_http1_response_t){ .status = 200, .headers = &long_value, .nheaders = 1 };
    assert_int_equal(mg_http1_response_head(&r, out, sizeof(out), &len), MG_ENOMEM);
}

static void test_request_id(void **state)
{
    char a[MG_HTTP1_REQUEST_ID_LEN + 1], b[MG_HTTP1_REQUEST_ID_LEN + 1];
    assert_int_equal(mg_http1_request_id_new(a), 0);
    assert_int_equal(mg_http1_request_id_new(b), 0);
    assert_int_equal(strlen(a), 32);
    assert_int_equal(strspn(a, "0123456789abcdef"), 32);
    assert_string_not_equal(a, b);
    assert_true(mg_http1_request_id_valid(a, strlen(a)));

    /* No repeats in a run, and every hex digit position varies. */
    enum { N = 20000 };
    char (*ids)[MG_HTTP1_REQUEST_ID_LEN + 1] = malloc(N * sizeof(*ids));
    assert_non_null(ids);
    for (int i = 0; i < N; i++)
        assert_int_equal(mg_http1_request_id_new(ids[i]), 0);
    qsort(ids, N, sizeof(*ids), (int (*)(const void *, const void *))strcmp);
    for (int i = 1; i < N; i++)
        assert_string_not_equal(ids[i - 1], ids[i]);
    free(ids);

    assert_true(mg_http1_request_id_valid(S("abc-123_XYZ.~")));
    assert_false(mg_http1_request_id_valid(S("")));
    assert_false(mg_http1_request_id_valid(S("a b")));
    assert_false(mg_http1_request_id_valid(S("a\x01")));
    assert_false(mg_http1_request_id_valid(S("\xc3\xa9")));
    char longid[130];
    memset(longid, 'x', sizeof(longid));
    assert_true(mg_http1_request_id_valid(longid, 128));
    assert_false(mg_http1_request_id_valid(longid, 129));
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_resp_content_length),
        cmocka_unit_test(test_resp_chunked_extensions_trailers),
        cmocka_unit_test(test_resp_until_close),
        cmocka_unit_test(test_resp_pipelined),
        cmocka_unit_test(test_resp_consumed_stops_at_message_end),
        cmocka_unit_test(test_resp_connection_close),
        cmocka_unit_test(test_resp_http10),
        cmocka_unit_test(test_resp_204_304_no_body),
        cmocka_unit_test(test_resp_head_request),
        cmocka_unit_test(test_resp_100_continue),
        cmocka_unit_test(test_resp_too_many_interim),
        cmocka_unit_test(test_resp_101_rejected),
        cmocka_unit_test(test_resp_malformed_status),
        cmocka_unit_test(test_resp_bad_chunk_size),
        cmocka_unit_test(test_resp_bad_content_length),
        cmocka_unit_test(test_resp_oversized_head),
        cmocka_unit_test(test_resp_too_many_headers),
        cmocka_unit_test(test_resp_headers_grow),
        cmocka_unit_test(test_resp_obs_fold),
        cmocka_unit_test(test_resp_nul_in_header),
        cmocka_unit_test(test_resp_empty_header_value),
        cmocka_unit_test(test_resp_truncated),
        cmocka_unit_test(test_resp_cl_and_te),
        cmocka_unit_test(test_resp_te_not_chunked),
        cmocka_unit_test(test_resp_callback_abort),
        cmocka_unit_test(test_resp_new_rejects_bad_arguments),
        cmocka_unit_test(test_resp_reuse_many),
        cmocka_unit_test(test_check_request),
        cmocka_unit_test(test_tokens_values),
        cmocka_unit_test(test_header_is_hop),
        cmocka_unit_test(test_request_head_basic),
        cmocka_unit_test(test_request_head_fidelity),
        cmocka_unit_test(test_request_head_rejects),
        cmocka_unit_test(test_request_head_names_in_connection_case),
        cmocka_unit_test(test_request_head_edits),
        cmocka_unit_test(test_chunk_head),
        cmocka_unit_test(test_response_head),
        cmocka_unit_test(test_request_id),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
