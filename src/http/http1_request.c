/*
 * http1_request: the client's requests, parsed strictly. See include/moongate/http1.h.
 *
 * The head goes through nodejs/http-parser. Debian builds it without HTTP_PARSER_STRICT, which
 * leaves it lenient where a proxy must not be (it found these by being fed them): spaces in
 * field names, obs-fold, bare LF line ends, any letters in place of "HTTP/", several spaces
 * between the parts of the request line, tabs and 8-bit bytes in the target. So a guard walks
 * the same bytes just before http-parser does and refuses those, and finds where the head ends;
 * the first error by byte position wins, whichever of the two finds it, so that the verdict does
 * not depend on how the bytes were split. When the head is complete, the checks of RFC 9112 that
 * need all of it run (Host, framing, Expect, the target's form).
 *
 * The body is not left to http-parser: its chunked decoder accepts any two bytes after chunk
 * data and anything after a chunk size up to a CR. Ours is strict and small (decode_chunked()).
 */
#include "moongate/http1.h"

#include "core/buf.h"
#include "http1_int.h"
#include "moongate/error.h"

#include <http_parser.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define FIELDS_INITIAL 16
#define BLANK_LINES_MAX 8      /* CRLFs tolerated before a request line (RFC 9112 2.2) */
#define CHUNK_EXT_MAX 4096     /* bytes of one chunk line's extensions */
#define VERSION_LEN 9          /* " HTTP/1.1" */
#define METHOD_MAX 24          /* longer than any method http-parser knows */

enum req_state {
    PS_IDLE,     /* between requests */
    PS_HEAD,     /* inside a request line or header fields */
    PS_LENGTH,   /* a Content-Length body: `remaining` bytes to go */
    PS_CHUNKED,  /* a chunked body: see enum chunk_state */
    PS_DONE,     /* on_complete ran; the next feed begins the next request */
    PS_FAILED,
};

enum chunk_state {
    CK_SIZE,          /* the first hex digit of a chunk size */
    CK_SIZE_MORE,     /* more hex digits, or what ends the size */
    CK_SIZE_WS,       /* whitespace after the size: only more of it or ';' may follow */
    CK_EXT,           /* chunk extensions, up to CR */
    CK_SIZE_LF,       /* the LF of the chunk-size line */
    CK_DATA,          /* `remaining` bytes of chunk data */
    CK_DATA_CR,       /* the CRLF after chunk data */
    CK_DATA_LF,
    CK_TRAILER_START, /* the start of a trailer line, or of the final CRLF */
    CK_TRAILER_LINE,  /* inside a trailer field line */
    CK_TRAILER_LF,
    CK_END_LF,        /* the LF that ends the message */
};

/* Where a field sits in the store, which may move while it grows. */
typedef struct field_off {
    uint32_t name_off, name_len, value_off, value_len;
} field_off_t;

struct mg_http1_req_parser {
    http_parser hp;
    mg_http1_req_cbs_t cbs;
    void *data;
    mg_http1_req_limits_t lim;
    enum req_state state;
    int status;                 /* after an error: what to answer */
    char msg[160];

    /* the guard over the raw head */
    size_t head_seen;           /* bytes of this head so far, blank lines before it included */
    size_t line_len;            /* bytes of the current line, CRLF excluded */
    int line_no;                /* 0: the request line */
    int blank_lines;
    bool cr;                    /* the last byte was a CR */
    bool method_done;           /* the request line's first SP was seen */
    char method[METHOD_MAX + 1];/* the bytes before it: http-parser gets them in one piece */
    size_t method_len;
    size_t request_line_len;
    char tail[VERSION_LEN];     /* the last bytes of the request line */
    int version_major, version_minor;

    /* what http-parser reports: the target, then names and values, back to back */
    mg__buf_t store;
    uint32_t target_len;
    field_off_t *offs;
    mg_http1_header_t *fields;
    size_t nfields, fields_cap;
    bool in_value;
    bool head_complete;         /* http-parser reached the end of the head */
    bool hp_nomem;              /* a callback ran out of memory */
    mg_http1_req_head_t head;

    /* the body */
    uint64_t remaining;
    enum chunk_state ck;
    int size_digits;
    size_t ext_len;
    char *tbuf;                 /* trailer lines, MG_HTTP1_REQ_TRAILER_MAX bytes at most */
    size_t tbuf_len, tline_start;
    mg_http1_header_t tfields[32];
    size_t ntfields;
};

static int fail(mg_http1_req_parser_t *p, int status, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* Records the first error only (later ones are its consequences) and ends the parser. */
static int fail(mg_http1_req_parser_t *p, int status, const char *fmt, ...)
{
    if (p->state != PS_FAILED) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(p->msg, sizeof(p->msg), fmt, ap);
        va_end(ap);
        p->status = status;
        p->state = PS_FAILED;
    }
    return MG_EINVAL;
}

/* A hex digit's value, or -1. */
static int hexval(unsigned char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    c |= 0x20;
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    return -1;
}

static bool ieq(const char *a, size_t alen, const char *lit)
{
    size_t n = strlen(lit);
    if (alen != n)
        return false;
    for (size_t i = 0; i < n; i++) {
        unsigned char x = (unsigned char)a[i];
        if (x >= 'A' && x <= 'Z')
            x |= 0x20;
        if (x != (unsigned char)lit[i])
            return false;
    }
    return true;
}

/* ---------------------------------------------------------------------------------------------
 * The store: an mg__buf_t that is only appended to, so offsets into it stay valid as it grows.
 */

static int store_append(mg_http1_req_parser_t *p, const char *at, size_t len)
{
    return mg__buf_append(&p->store, at, len);
}

static int fields_reserve(mg_http1_req_parser_t *p)
{
    if (p->nfields < p->fields_cap)
        return 0;
    size_t cap = p->fields_cap ? p->fields_cap * 2 : FIELDS_INITIAL;
    field_off_t *o = realloc(p->offs, cap * sizeof(*o));
    if (!o)
        return MG_ENOMEM;
    p->offs = o;
    mg_http1_header_t *f = realloc(p->fields, cap * sizeof(*f));
    if (!f)
        return MG_ENOMEM;
    p->fields = f;
    p->fields_cap = cap;
    return 0;
}

/* ---------------------------------------------------------------------------------------------
 * http-parser's callbacks
 */

static int hp_on_url(http_parser *hp, const char *at, size_t len)
{
    mg_http1_req_parser_t *p = hp->data;
    if (store_append(p, at, len) != 0) {
        p->hp_nomem = true;
        return -1;
    }
    p->target_len += (uint32_t)len;
    return 0;
}

/*
 * Ends the string before the next one in the store with a NUL: the target (no field yet), or
 * the last field's value (an empty one if it had none). So every string in the store is a C
 * string once the head is complete.
 */
static int end_string(mg_http1_req_parser_t *p)
{
    if (p->nfields > 0 && !p->in_value) {
        if (store_append(p, "", 1) != 0)
            return MG_ENOMEM;
        p->offs[p->nfields - 1].value_off = (uint32_t)p->store.len;
    }
    return store_append(p, "", 1);
}

static int hp_on_header_field(http_parser *hp, const char *at, size_t len)
{
    mg_http1_req_parser_t *p = hp->data;
    if (p->in_value || p->nfields == 0) {
        /* The guard counted the lines already: never more fields than fields_max. */
        if (end_string(p) != 0 || fields_reserve(p) != 0)
            goto nomem;
        field_off_t *o = &p->offs[p->nfields++];
        o->name_off = (uint32_t)p->store.len;
        o->name_len = 0;
        o->value_off = 0;
        o->value_len = 0;
        p->in_value = false;
    }
    if (store_append(p, at, len) != 0)
        goto nomem;
    p->offs[p->nfields - 1].name_len += (uint32_t)len;
    return 0;
nomem:
    p->hp_nomem = true;
    return -1;
}

static int hp_on_header_value(http_parser *hp, const char *at, size_t len)
{
    mg_http1_req_parser_t *p = hp->data;
    field_off_t *o = &p->offs[p->nfields - 1];
    if (!p->in_value) {
        if (store_append(p, "", 1) != 0) /* ends the name */
            goto nomem;
        o->value_off = (uint32_t)p->store.len;
        p->in_value = true;
    }
    if (store_append(p, at, len) != 0)
        goto nomem;
    o->value_len += (uint32_t)len;
    return 0;
nomem:
    p->hp_nomem = true;
    return -1;
}

static int hp_on_headers_complete(http_parser *hp)
{
    mg_http1_req_parser_t *p = hp->data;
    p->head_complete = true;
    /* The body is ours to decode (or, after an upgrade, not HTTP at all). */
    return 1;
}

static int hp_on_message_complete(http_parser *hp)
{
    /* With the body skipped this follows the head at once: stop there. */
    http_parser_pause(hp, 1);
    return 0;
}

static const http_parser_settings hp_settings = {
    .on_url = hp_on_url,
    .on_header_field = hp_on_header_field,
    .on_header_value = hp_on_header_value,
    .on_headers_complete = hp_on_headers_complete,
    .on_message_complete = hp_on_message_complete,
};

/* Turns an error http-parser stopped with into a status and a reason. */
static int hp_error(mg_http1_req_parser_t *p)
{
    enum http_errno e = HTTP_PARSER_ERRNO(&p->hp);
    if (p->hp_nomem)
        return MG_ENOMEM;
    switch (e) {
    case HPE_INVALID_URL:
        return fail(p, 400, "invalid request target");
    case HPE_INVALID_HEADER_TOKEN:
        return fail(p, 400, "invalid character in a header field");
    case HPE_UNEXPECTED_CONTENT_LENGTH:
        return fail(p, 400, "Content-Length with Transfer-Encoding, or more than one "
                            "Content-Length");
    case HPE_INVALID_CONTENT_LENGTH:
        return fail(p, 400, "invalid Content-Length");
    case HPE_HEADER_OVERFLOW:
        return fail(p, 431, "request head larger than %zu bytes", p->lim.head_max);
    case HPE_INVALID_TRANSFER_ENCODING:
        return fail(p, 400, "invalid Transfer-Encoding");
    default:
        return fail(p, 400, "malformed request: %s", http_errno_description(e));
    }
}

/* ---------------------------------------------------------------------------------------------
 * The guard over the raw head
 */

/* At the end of the request line: the version is " HTTP/D.D" and nothing is around it. */
static int check_request_line(mg_http1_req_parser_t *p)
{
    const char *t = p->tail;
    if (p->line_len < VERSION_LEN + 2 || memcmp(t, " HTTP/", 6) != 0 || t[6] < '0' ||
        t[6] > '9' || t[7] != '.' || t[8] < '0' || t[8] > '9')
        return fail(p, 400, "malformed request line: it must be METHOD SP TARGET SP HTTP/1.1");
    p->version_major = t[6] - '0';
    p->version_minor = t[8] - '0';
    if (p->version_major != 1)
        return fail(p, 505, "HTTP version %c.%c not supported: send HTTP/1.1", t[6], t[8]);
    p->request_line_len = p->line_len;
    return 0;
}

/*
 * Walks the head's bytes in s[0..n). Sets *used to the bytes that belong to the head (all of
 * them; or up to and including the blank line that ends it, then *end; or up to and including
 * the space after the method, which it keeps in p->method) and returns 0; or returns an error
 * with *used at the offending byte.
 */
static int guard(mg_http1_req_parser_t *p, const char *s, size_t n, size_t *used, bool *end)
{
    *end = false;
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        *used = i;
        if (p->head_seen + i >= p->lim.head_max)
            return fail(p, 431, "request head larger than %zu bytes", p->lim.head_max);
        if (p->cr) {
            if (c != '\n')
                return fail(p, 400, "bare CR in the request head");
            p->cr = false;
            if (p->line_len == 0) {
                if (p->line_no > 0) {
                    *used = i + 1;
                    *end = true;
                    return 0;
                }
                if (++p->blank_lines > BLANK_LINES_MAX)
                    return fail(p, 400, "too many blank lines before the request line");
                continue;
            }
            if (p->line_no == 0 && check_request_line(p) != 0)
                return MG_EINVAL;
            p->line_no++;
            p->line_len = 0;
            continue;
        }
        if (c == '\r') {
            p->cr = true;
            continue;
        }
        if (c == '\n')
            return fail(p, 400, "bare LF in the request head: lines end with CRLF");
        if (p->line_len == 0 && p->line_no > 0) {
            if (c == ' ' || c == '\t')
                return fail(p, 400, "a header line starts with whitespace (obs-fold)");
            if ((size_t)p->line_no > p->lim.fields_max)
                return fail(p, 431, "more than %zu header fields", p->lim.fields_max);
        }
        p->line_len++;
        if (p->line_no == 0) {
            if (p->line_len > p->lim.line_max)
                return fail(p, 414, "request line longer than %zu bytes", p->lim.line_max);
            memmove(p->tail, p->tail + 1, VERSION_LEN - 1);
            p->tail[VERSION_LEN - 1] = (char)c;
            if (!p->method_done) {
                if (c == ' ') {
                    p->method_done = true;
                    *used = i + 1;
                    return 0;
                }
                if (!mg__http1_tchar[c])
                    return fail(p, 400, "invalid method");
                if (p->method_len == METHOD_MAX)
                    return fail(p, 501, "method not implemented");
                p->method[p->method_len++] = (char)c;
            }
        }
    }
    *used = n;
    return 0;
}

/* ---------------------------------------------------------------------------------------------
 * The head's checks, once it is complete
 */

static void fix_fields(mg_http1_req_parser_t *p)
{
    for (size_t i = 0; i < p->nfields; i++) {
        field_off_t *o = &p->offs[i];
        /* http-parser drops the value's leading whitespace; the trailing one is not part of
           the value either (RFC 9112 5). */
        char *v = p->store.data + o->value_off;
        while (o->value_len > 0 && (v[o->value_len - 1] == ' ' || v[o->value_len - 1] == '\t'))
            v[--o->value_len] = '\0';
        p->fields[i] = (mg_http1_header_t){
            .name = p->store.data + o->name_off,
            .name_len = o->name_len,
            .value = p->store.data + o->value_off,
            .value_len = o->value_len,
        };
    }
}

/* uri-host [ ":" port ] (RFC 9110 7.2), with the characters a reg-name or IP literal may hold. */
static bool host_valid(const char *s, size_t len)
{
    if (len == 0 || len > 1024)
        return false;
    for (size_t i = 0; i < len; i++) {
        unsigned char c = (unsigned char)s[i];
        bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
                  (c != 0 && strchr("-._~%!$&'()*+,;=:[]", c) != NULL);
        if (!ok)
            return false;
    }
    return true;
}

/* A field value's bytes: no control byte but HTAB, no DEL (RFC 9110 5.5). http-parser checks
   all but the first byte of a value. */
static bool value_valid(const char *v, size_t len)
{
    for (size_t i = 0; i < len; i++) {
        unsigned char c = (unsigned char)v[i];
        if ((c < 0x20 && c != '\t') || c == 0x7f)
            return false;
    }
    return true;
}

static bool target_char_valid(unsigned char c)
{
    /* Visible ASCII; a fragment ('#') is never part of a request-target (RFC 9112 3.2). */
    return c > 0x20 && c < 0x7f && c != '#';
}

static int check_head(mg_http1_req_parser_t *p)
{
    mg_http1_req_head_t *h = &p->head;
    const char *method = http_method_str((enum http_method)p->hp.method);
    size_t method_len = strlen(method);

    if (end_string(p) != 0)
        return MG_ENOMEM;
    fix_fields(p);
    memset(h, 0, sizeof(*h));
    h->method = method;
    h->target = p->store.data;
    h->target_len = p->target_len;
    h->http_minor = p->version_minor;
    h->headers = p->fields;
    h->nheaders = p->nfields;

    /* Exactly one space on each side of the target: http-parser takes several. */
    if (p->method_len != method_len ||
        p->request_line_len != method_len + 1 + p->target_len + VERSION_LEN)
        return fail(p, 400, "malformed request line: it must be METHOD SP TARGET SP HTTP/1.1");
    for (size_t i = 0; i < p->target_len; i++)
        if (!target_char_valid((unsigned char)p->store.data[i]))
            return fail(p, 400, "invalid byte in the request target");
    if (p->hp.method == HTTP_CONNECT)
        return fail(p, 405, "CONNECT is not supported");
    bool asterisk = p->target_len == 1 && p->store.data[0] == '*';
    if (asterisk && p->hp.method != HTTP_OPTIONS)
        return fail(p, 400, "the target * is for OPTIONS only");
    if (!asterisk && p->store.data[0] != '/')
        return fail(p, 400, "the request target must be a path (origin-form, starting with /)");

    int hosts = 0;
    bool expect = false, expect_other = false;
    for (size_t i = 0; i < p->nfields; i++) {
        const mg_http1_header_t *f = &p->fields[i];
        if (!mg_http1_token_valid(f->name, f->name_len))
            return fail(p, 400, "invalid header field name");
        if (!value_valid(f->value, f->value_len))
            return fail(p, 400, "control character in a header field value");
        if (ieq(f->name, f->name_len, "host")) {
            hosts++;
            h->host = f->value;
            if (!host_valid(f->value, f->value_len))
                return fail(p, 400, "invalid Host");
        } else if (ieq(f->name, f->name_len, "expect")) {
            if (ieq(f->value, f->value_len, "100-continue"))
                expect = true;
            else
                expect_other = true;
        }
    }
    if (hosts > 1)
        return fail(p, 400, "more than one Host header");
    if (hosts == 0 && p->version_minor >= 1)
        return fail(p, 400, "no Host header (HTTP/1.1 requires one)");

    mg_http1_req_framing_t fr;
    int status = 0;
    const char *why = NULL;
    if (mg_http1_check_request(method, p->fields, p->nfields, &fr, &status, &why) != 0)
        return fail(p, status, "%s", why);
    if (fr.chunked && p->version_minor == 0)
        return fail(p, 400, "Transfer-Encoding in an HTTP/1.0 request");
    if (p->version_minor >= 1 && expect_other)
        return fail(p, 417, "unsupported expectation: only Expect: 100-continue is");

    if (fr.chunked) {
        h->body = MG_HTTP1_REQ_BODY_CHUNKED;
    } else if (fr.content_length != MG_HTTP1_NO_LENGTH && fr.content_length > 0) {
        h->body = MG_HTTP1_REQ_BODY_LENGTH;
        h->content_length = fr.content_length;
    }
    h->expect_continue = expect && p->version_minor >= 1 && h->body != MG_HTTP1_REQ_BODY_NONE;
    h->keep_alive = http_should_keep_alive(&p->hp) != 0;
    h->upgrade = p->hp.upgrade && h->body == MG_HTTP1_REQ_BODY_NONE;
    return 0;
}

/* ---------------------------------------------------------------------------------------------
 * The body
 */

static void begin_request(mg_http1_req_parser_t *p)
{
    http_parser_init(&p->hp, HTTP_REQUEST);
    p->hp.data = p;
    p->state = PS_HEAD;
    p->head_seen = 0;
    p->line_len = 0;
    p->line_no = 0;
    p->blank_lines = 0;
    p->cr = false;
    p->method_done = false;
    p->method_len = 0;
    p->request_line_len = 0;
    memset(p->tail, 0, sizeof(p->tail));
    p->store.len = 0;
    p->target_len = 0;
    p->nfields = 0;
    p->in_value = false;
    p->head_complete = false;
    p->hp_nomem = false;
    p->remaining = 0;
    p->ck = CK_SIZE;
    p->size_digits = 0;
    p->ext_len = 0;
    p->tbuf_len = 0;
    p->tline_start = 0;
    p->ntfields = 0;
}

static int complete(mg_http1_req_parser_t *p)
{
    p->state = PS_DONE;
    if (p->ntfields > 0 && p->cbs.on_trailers &&
        p->cbs.on_trailers(p->data, p->tfields, p->ntfields) != 0) {
        fail(p, 0, "stopped by a callback");
        return MG_ECANCELED;
    }
    if (p->cbs.on_complete && p->cbs.on_complete(p->data) != 0) {
        fail(p, 0, "stopped by a callback");
        return MG_ECANCELED;
    }
    return 0;
}

/* Delivers body bytes. Returns 0, 1 (the callback asked to pause) or MG_ECANCELED. */
static int deliver(mg_http1_req_parser_t *p, const char *at, size_t len)
{
    if (!p->cbs.on_body)
        return 0;
    int rc = p->cbs.on_body(p->data, at, len);
    if (rc == 0)
        return 0;
    if (rc == MG_EAGAIN)
        return 1;
    fail(p, 0, "stopped by a callback");
    return MG_ECANCELED;
}

/*
 * Ends one trailer line, tbuf[tline_start..tbuf_len): name ":" OWS value OWS. The colon becomes
 * the name's NUL and the byte after the value the value's, so the fields point into tbuf.
 */
static int end_trailer_line(mg_http1_req_parser_t *p)
{
    char *line = p->tbuf + p->tline_start;
    size_t len = p->tbuf_len - p->tline_start;
    char *colon = memchr(line, ':', len);
    if (colon == NULL || colon == line || !mg_http1_token_valid(line, (size_t)(colon - line)))
        return fail(p, 400, "malformed trailer field");
    if (p->ntfields == sizeof(p->tfields) / sizeof(p->tfields[0]))
        return fail(p, 431, "more than %zu trailer fields",
                    sizeof(p->tfields) / sizeof(p->tfields[0]));
    size_t v = (size_t)(colon - line) + 1;
    while (v < len && (line[v] == ' ' || line[v] == '\t'))
        v++;
    size_t vend = len;
    while (vend > v && (line[vend - 1] == ' ' || line[vend - 1] == '\t'))
        vend--;
    if (!value_valid(line + v, vend - v))
        return fail(p, 400, "control character in a trailer field");
    *colon = '\0';
    line[vend] = '\0'; /* the byte kept free after each line */
    p->tfields[p->ntfields++] = (mg_http1_header_t){ line, (size_t)(colon - line), line + v,
                                                     vend - v };
    p->tbuf_len = p->tline_start + len + 1;
    p->tline_start = p->tbuf_len;
    return 0;
}

/*
 * RFC 9112 7.1, strictly: chunk-size [ BWS ";" ext ] CRLF, data, CRLF; the last chunk, trailer
 * fields, CRLF. Returns 0 (all of s consumed, or the message ended), 1 (paused), or an error;
 * *used says how far it got.
 */
static int decode_chunked(mg_http1_req_parser_t *p, const char *s, size_t n, size_t *used)
{
    size_t i = 0;
    int rc = 0;
    while (i < n) {
        unsigned char c = (unsigned char)s[i];
        switch (p->ck) {
        case CK_SIZE:
        case CK_SIZE_MORE: {
            int v = hexval(c);
            if (v >= 0) {
                if (p->size_digits == 16 || (p->remaining >> 60) != 0) {
                    rc = fail(p, 400, "chunk size too large");
                    goto out;
                }
                p->remaining = p->remaining * 16 + (uint64_t)v;
                p->size_digits++;
                p->ck = CK_SIZE_MORE;
            } else if (p->ck == CK_SIZE) {
                rc = fail(p, 400, "invalid chunk size");
                goto out;
            } else if (c == '\r') {
                p->ck = CK_SIZE_LF;
            } else if (c == ';') {
                p->ck = CK_EXT;
            } else if (c == ' ' || c == '\t') {
                p->ck = CK_SIZE_WS;
            } else {
                rc = fail(p, 400, "invalid chunk size");
                goto out;
            }
            i++;
            break;
        }
        case CK_SIZE_WS:
            if (c == ';') {
                p->ck = CK_EXT;
            } else if (c != ' ' && c != '\t') {
                rc = fail(p, 400, "invalid chunk size line");
                goto out;
            }
            i++;
            break;
        case CK_EXT:
            if (c == '\r') {
                p->ck = CK_SIZE_LF;
            } else if ((c < 0x20 && c != '\t') || c == 0x7f) {
                rc = fail(p, 400, "control character in a chunk extension");
                goto out;
            } else if (++p->ext_len > CHUNK_EXT_MAX) {
                rc = fail(p, 400, "chunk extensions longer than %d bytes", CHUNK_EXT_MAX);
                goto out;
            }
            i++;
            break;
        case CK_SIZE_LF:
            if (c != '\n') {
                rc = fail(p, 400, "bare CR in a chunk size line");
                goto out;
            }
            i++;
            p->ext_len = 0;
            p->size_digits = 0;
            p->ck = p->remaining == 0 ? CK_TRAILER_START : CK_DATA;
            break;
        case CK_DATA: {
            size_t take = n - i;
            if (take > p->remaining)
                take = (size_t)p->remaining;
            p->remaining -= take;
            if (p->remaining == 0)
                p->ck = CK_DATA_CR;
            rc = deliver(p, s + i, take);
            i += take;
            if (rc != 0)
                goto out;
            break;
        }
        case CK_DATA_CR:
        case CK_DATA_LF:
            if (c != (p->ck == CK_DATA_CR ? '\r' : '\n')) {
                rc = fail(p, 400, "chunk data not followed by CRLF");
                goto out;
            }
            p->ck = p->ck == CK_DATA_CR ? CK_DATA_LF : CK_SIZE;
            i++;
            break;
        case CK_TRAILER_START:
            if (c == '\r') {
                p->ck = CK_END_LF;
                i++;
                break;
            }
            if (c == ' ' || c == '\t') {
                rc = fail(p, 400, "a trailer line starts with whitespace (obs-fold)");
                goto out;
            }
            p->ck = CK_TRAILER_LINE;
            /* fall through */
        case CK_TRAILER_LINE:
            if (c == '\r') {
                p->ck = CK_TRAILER_LF;
            } else if (c == '\n') {
                rc = fail(p, 400, "bare LF in the trailer section");
                goto out;
            } else {
                /* One byte stays free after each line, for its NUL. */
                if (p->tbuf_len + 2 > MG_HTTP1_REQ_TRAILER_MAX) {
                    rc = fail(p, 431, "trailer section larger than %d bytes",
                              MG_HTTP1_REQ_TRAILER_MAX);
                    goto out;
                }
                if (p->tbuf == NULL && (p->tbuf = malloc(MG_HTTP1_REQ_TRAILER_MAX)) == NULL) {
                    rc = MG_ENOMEM;
                    goto out;
                }
                p->tbuf[p->tbuf_len++] = (char)c;
            }
            i++;
            break;
        case CK_TRAILER_LF:
            if (c != '\n') {
                rc = fail(p, 400, "bare CR in the trailer section");
                goto out;
            }
            i++;
            if ((rc = end_trailer_line(p)) != 0)
                goto out;
            p->ck = CK_TRAILER_START;
            break;
        case CK_END_LF:
            if (c != '\n') {
                rc = fail(p, 400, "bare CR at the end of the chunked body");
                goto out;
            }
            i++;
            rc = complete(p);
            goto out;
        }
    }
out:
    *used = i;
    return rc;
}

/* ---------------------------------------------------------------------------------------------
 * Feeding
 */

/*
 * The method is complete: http-parser gets it in one piece, so that whether it knows it (501
 * if not) does not depend on how the bytes were split.
 */
static int start_http_parser(mg_http1_req_parser_t *p)
{
    char line[METHOD_MAX + 1];
    memcpy(line, p->method, p->method_len);
    line[p->method_len] = ' ';
    size_t n = p->method_len + 1;
    if (p->method_len == 0)
        return fail(p, 400, "invalid method");
    size_t got = http_parser_execute(&p->hp, &hp_settings, line, n);
    if (HTTP_PARSER_ERRNO(&p->hp) == HPE_INVALID_METHOD)
        return fail(p, 501, "method not implemented");
    if (got != n || HTTP_PARSER_ERRNO(&p->hp) != HPE_OK)
        return hp_error(p);
    return 0;
}

/* Parses head bytes. Returns 0 (consumed, or the head ended and was handed over), or an error. */
static int feed_head(mg_http1_req_parser_t *p, const char *s, size_t n, size_t *used)
{
    size_t head_bytes = 0;
    bool end = false;
    bool before_method = !p->method_done;
    int grc = guard(p, s, n, &head_bytes, &end);
    if (before_method) {
        /* Blank lines and the method's bytes are the guard's alone. */
        *used = head_bytes;
        p->head_seen += head_bytes;
        if (grc != 0)
            return grc;
        return p->method_done ? start_http_parser(p) : 0;
    }
    /* http-parser sees the same bytes, up to where the guard stopped: an error it finds there
       comes first. A length of 0 would tell it the stream ended. */
    size_t got = head_bytes ? http_parser_execute(&p->hp, &hp_settings, s, head_bytes) : 0;
    enum http_errno e = HTTP_PARSER_ERRNO(&p->hp);
    if ((e != HPE_OK && e != HPE_PAUSED) || got != head_bytes) {
        p->state = PS_HEAD; /* the guard may have failed further on: http-parser's error wins */
        *used = got;
        return hp_error(p);
    }
    *used = head_bytes;
    p->head_seen += head_bytes;
    if (grc != 0)
        return grc;
    if (!end)
        return 0;
    if (!p->head_complete)
        return fail(p, 400, "malformed request head");
    int rc = check_head(p);
    if (rc != 0)
        return rc;
    switch (p->head.body) {
    case MG_HTTP1_REQ_BODY_NONE:
        break;
    case MG_HTTP1_REQ_BODY_LENGTH:
        p->state = PS_LENGTH;
        p->remaining = p->head.content_length;
        break;
    case MG_HTTP1_REQ_BODY_CHUNKED:
        p->state = PS_CHUNKED;
        break;
    }
    if (p->cbs.on_head(p->data, &p->head) != 0) {
        fail(p, 0, "stopped by a callback");
        return MG_ECANCELED;
    }
    return p->head.body == MG_HTTP1_REQ_BODY_NONE ? complete(p) : 0;
}

int mg_http1_req_parser_feed(mg_http1_req_parser_t *p, const char *data, size_t len,
                             size_t *consumed)
{
    size_t off = 0;
    int rc = 0;
    if (p->state == PS_FAILED) {
        rc = MG_ESTATE;
        goto out;
    }
    if (p->state == PS_DONE)
        p->state = PS_IDLE;
    while (off < len) {
        size_t used = 0;
        switch (p->state) {
        case PS_IDLE:
            begin_request(p);
            /* fall through */
        case PS_HEAD: {
            rc = feed_head(p, data + off, len - off, &used);
            off += used;
            if (rc != 0 || p->state != PS_HEAD)
                goto out; /* an error, or the head was handed over: the caller goes on */
            break;
        }
        case PS_LENGTH: {
            size_t take = len - off;
            if (take > p->remaining)
                take = (size_t)p->remaining;
            p->remaining -= take;
            int d = deliver(p, data + off, take);
            off += take;
            if (d < 0) {
                rc = d;
                goto out;
            }
            if (p->remaining == 0) {
                rc = complete(p);
                goto out;
            }
            if (d == 1)
                goto out;
            break;
        }
        case PS_CHUNKED:
            rc = decode_chunked(p, data + off, len - off, &used);
            off += used;
            if (rc == 1)
                rc = 0;
            else if (rc == 0 && p->state == PS_CHUNKED)
                break;
            goto out;
        case PS_DONE:
        case PS_FAILED:
            goto out;
        }
    }
out:
    if (consumed)
        *consumed = off;
    return rc;
}

/* ---------------------------------------------------------------------------------------------
 * The object
 */

int mg_http1_req_parser_new(const mg_http1_req_limits_t *lim, const mg_http1_req_cbs_t *cbs,
                            void *data, mg_http1_req_parser_t **out)
{
    if (!cbs || !cbs->on_head || !out)
        return MG_EINVAL;
    mg_http1_req_parser_t *p = calloc(1, sizeof(*p));
    if (!p)
        return MG_ENOMEM;
    p->cbs = *cbs;
    p->data = data;
    if (lim)
        p->lim = *lim;
    if (p->lim.line_max == 0)
        p->lim.line_max = MG_HTTP1_REQ_LINE_MAX_DEFAULT;
    if (p->lim.head_max == 0)
        p->lim.head_max = MG_HTTP1_REQ_HEAD_MAX_DEFAULT;
    if (p->lim.fields_max == 0)
        p->lim.fields_max = MG_HTTP1_REQ_FIELDS_MAX_DEFAULT;
    /* http-parser's own cap on a head (HTTP_MAX_HEADER_SIZE, 80 KiB) must not come first. */
    if (p->lim.head_max > MG_HTTP1_REQ_HEAD_MAX_LIMIT || p->lim.line_max > p->lim.head_max) {
        free(p);
        return MG_EINVAL;
    }
    p->state = PS_IDLE;
    *out = p;
    return 0;
}

void mg_http1_req_parser_free(mg_http1_req_parser_t *p)
{
    if (!p)
        return;
    mg__buf_free(&p->store);
    free(p->offs);
    free(p->fields);
    free(p->tbuf);
    free(p);
}

bool mg_http1_req_parser_idle(const mg_http1_req_parser_t *p)
{
    return p->state == PS_IDLE || p->state == PS_DONE ||
           (p->state == PS_HEAD && p->line_no == 0 && p->line_len == 0 && !p->cr);
}

bool mg_http1_req_parser_in_body(const mg_http1_req_parser_t *p)
{
    return p->state == PS_LENGTH || p->state == PS_CHUNKED;
}

void mg_http1_req_parser_trim(mg_http1_req_parser_t *p)
{
    if (p->state != PS_IDLE && p->state != PS_DONE)
        return;
    mg__buf_free(&p->store);
    free(p->offs);
    free(p->fields);
    free(p->tbuf);
    p->offs = NULL;
    p->fields = NULL;
    p->tbuf = NULL;
    p->fields_cap = 0;
    p->nfields = 0;
    p->state = PS_IDLE;
}

int mg_http1_req_parser_status(const mg_http1_req_parser_t *p)
{
    return p->state == PS_FAILED ? p->status : 0;
}

const char *mg_http1_req_parser_error(const mg_http1_req_parser_t *p)
{
    return p->state == PS_FAILED ? p->msg : "";
}

/* ---------------------------------------------------------------------------------------------
 * The decoded path
 */

int mg_http1_path_decode(const char *target, size_t len, char *out, size_t cap)
{
    if (len == 0 || target[0] != '/' || cap < 2)
        return MG_EINVAL;
    size_t plen = 0;
    while (plen < len && target[plen] != '?')
        plen++;
    /* Decode into out, then remove the dot segments in place: the result is never longer. */
    size_t n = 0;
    for (size_t i = 0; i < plen; i++) {
        unsigned char c = (unsigned char)target[i];
        if (c == '%') {
            int hi = i + 2 < plen ? hexval((unsigned char)target[i + 1]) : -1;
            int lo = hi >= 0 ? hexval((unsigned char)target[i + 2]) : -1;
            if (lo < 0 || (hi == 0 && lo == 0))
                return MG_EINVAL;
            c = (unsigned char)(hi << 4 | lo);
            i += 2;
        }
        if (n + 1 >= cap)
            return MG_EINVAL;
        out[n++] = (char)c;
    }
    /* Segments between slashes: "." is dropped, ".." drops the one before it. */
    size_t w = 0;
    size_t i = 0;
    while (i < n) {
        /* out[i] is '/': the segment runs to the next slash. */
        size_t j = i + 1;
        while (j < n && out[j] != '/')
            j++;
        size_t seg = j - i - 1;
        const char *sp = out + i + 1;
        bool last = j >= n;
        if (seg == 1 && sp[0] == '.') {
            if (last)
                out[w++] = '/';
        } else if (seg == 2 && sp[0] == '.' && sp[1] == '.') {
            while (w > 0 && out[w - 1] != '/')
                w--;
            if (w > 0)
                w--; /* the slash before the dropped segment */
            if (last)
                out[w++] = '/';
        } else {
            memmove(out + w, out + i, seg + 1);
            w += seg + 1;
        }
        i = j;
    }
    if (w == 0)
        out[w++] = '/';
    out[w] = '\0';
    return 0;
}
