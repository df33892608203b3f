/*
 * http1: the upstream HTTP/1.1 codec. See include/moongate/http1.h.
 *
 * The response parser leaves the grammar to nodejs/http-parser and keeps for itself what that
 * library leaves to its user: gathering header fragments split across reads, bounding the head,
 * deciding the body's framing (HEAD, 1xx, 204, 304), refusing upgrades, and stopping at the end
 * of each response so that the bytes after it go to the next one.
 */
#include "moongate/http1.h"

#include "chunk.h"
#include "http1_int.h"
#include "moongate/error.h"

#include <http_parser.h>
#include <openssl/rand.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define HEAD_BUF_INITIAL 1024
#define HEAD_BUF_KEEP 8192  /* a head buffer grown past this is given back between responses */
/* Header slots a parser starts with: an LLM server's heads carry fewer; more grow on demand
   up to MG_HTTP1_MAX_HEADERS. A kept-alive channel holds its parser while idle, so this is
   memory every idle tunnel keeps. */
#define HEADERS_INITIAL 16
#define MAX_INTERIM 16      /* 1xx responses before one final response */

/* ---------------------------------------------------------------------------------------------
 * Response parser
 */

enum resp_state {
    RS_IDLE,   /* between responses: no byte of the next one yet */
    RS_HEAD,   /* inside a status line or header fields */
    RS_BODY,   /* on_head has run; the body (or trailers) follow */
    RS_CLOSED, /* a response ended that closes the connection: nothing may follow */
    RS_FAILED,
};

/* Where one header field sits in the head buffer, which may move while it grows. */
typedef struct hdr_off {
    uint32_t name_off, name_len, value_off, value_len;
} hdr_off_t;

struct mg_http1_resp_parser {
    http_parser hp;
    mg_http1_resp_cbs_t cbs;
    void *data;
    enum resp_state state;
    bool expect_head;  /* the pending request is a HEAD */
    bool in_value;     /* the last header fragment was a value: a name fragment starts a field */
    bool complete;     /* http-parser reached the end of a message (it is paused there) */
    bool interim;      /* that message was a 1xx */
    bool keep_alive;
    bool cb_failed;    /* a user callback returned nonzero */
    int interims;
    size_t head_max;
    size_t head_seen;  /* raw bytes of the current head so far */
    char *buf;         /* reason phrase, then names and values, back to back */
    size_t buf_len, buf_cap;
    size_t reason_len; /* the reason phrase is at buf[0] */
    hdr_off_t *offs;   /* hdr_cap of them, then hdr_cap headers, in one block */
    mg_http1_header_t *headers;
    size_t nheaders, hdr_cap;
    int err;
    char msg[160];
};

static int fail(mg_http1_resp_parser_t *p, int err, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* Records the first error only: later ones are consequences of it. */
static int fail(mg_http1_resp_parser_t *p, int err, const char *fmt, ...)
{
    if (p->err == 0) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(p->msg, sizeof(p->msg), fmt, ap);
        va_end(ap);
        p->err = err;
    }
    return err;
}

static int buf_append(mg_http1_resp_parser_t *p, const char *at, size_t len)
{
    if (len == 0)
        return 0; /* http-parser reports empty values; buf may still be NULL */
    if (p->buf_len + len > p->buf_cap) {
        size_t cap = p->buf_cap ? p->buf_cap : HEAD_BUF_INITIAL;
        while (cap < p->buf_len + len)
            cap *= 2;
        /* The raw head is capped at head_max, and what we keep of it is smaller. */
        if (cap > p->head_max)
            cap = p->head_max;
        if (cap < p->buf_len + len)
            return fail(p, MG_EINVAL, "response head larger than %zu bytes", p->head_max);
        char *nb = realloc(p->buf, cap);
        if (!nb)
            return fail(p, MG_ENOMEM, "out of memory for the response head");
        p->buf = nb;
        p->buf_cap = cap;
    }
    memcpy(p->buf + p->buf_len, at, len);
    p->buf_len += len;
    return 0;
}

/* RFC 9110 5.6.2 tchar (http1_int.h). */
const uint8_t mg__http1_tchar[256] = {
    ['!'] = 1, ['#'] = 1, ['$'] = 1, ['%'] = 1, ['&'] = 1, ['\''] = 1, ['*'] = 1, ['+'] = 1,
    ['-'] = 1, ['.'] = 1, ['^'] = 1, ['_'] = 1, ['`'] = 1, ['|'] = 1, ['~'] = 1,
    ['0'] = 1, ['1'] = 1, ['2'] = 1, ['3'] = 1, ['4'] = 1, ['5'] = 1, ['6'] = 1, ['7'] = 1,
    ['8'] = 1, ['9'] = 1,
    ['A'] = 1, ['B'] = 1, ['C'] = 1, ['D'] = 1, ['E'] = 1, ['F'] = 1, ['G'] = 1, ['H'] = 1,
    ['I'] = 1, ['J'] = 1, ['K'] = 1, ['L'] = 1, ['M'] = 1, ['N'] = 1, ['O'] = 1, ['P'] = 1,
    ['Q'] = 1, ['R'] = 1, ['S'] = 1, ['T'] = 1, ['U'] = 1, ['V'] = 1, ['W'] = 1, ['X'] = 1,
    ['Y'] = 1, ['Z'] = 1,
    ['a'] = 1, ['b'] = 1, ['c'] = 1, ['d'] = 1, ['e'] = 1, ['f'] = 1, ['g'] = 1, ['h'] = 1,
    ['i'] = 1, ['j'] = 1, ['k'] = 1, ['l'] = 1, ['m'] = 1, ['n'] = 1, ['o'] = 1, ['p'] = 1,
    ['q'] = 1, ['r'] = 1, ['s'] = 1, ['t'] = 1, ['u'] = 1, ['v'] = 1, ['w'] = 1, ['x'] = 1,
    ['y'] = 1, ['z'] = 1,
};

/*
 * Bytes a field value or reason phrase may not hold (RFC 9110 5.5): controls other than HTAB, and
 * DEL. http-parser 2.9.4 lets a NUL through at the start of a value (found by fuzzing), so we
 * check every fragment ourselves before anything reaches the caller.
 */
static bool byte_is_ctl(unsigned char c)
{
    return (c < 0x20 && c != '\t') || c == 0x7f;
}

#define ONES 0x0101010101010101ULL
#define HIGHS 0x8080808080808080ULL

/* On the hot path for every header value: eight bytes per step, the exact test only for a word
 * that holds a byte below 0x20 (usually a tab) or a DEL. */
static bool has_ctl(const char *s, size_t len)
{
    size_t i = 0;
    for (; i + 8 <= len; i += 8) {
        uint64_t w;
        memcpy(&w, s + i, 8);
        uint64_t below_space = (w - ONES * 0x20) & ~w & HIGHS;
        uint64_t x = w ^ (ONES * 0x7f);
        uint64_t del = (x - ONES) & ~x & HIGHS;
        if ((below_space | del) != 0)
            for (size_t j = i; j < i + 8; j++)
                if (byte_is_ctl((unsigned char)s[j]))
                    return true;
    }
    for (; i < len; i++)
        if (byte_is_ctl((unsigned char)s[i]))
            return true;
    return false;
}

static int hp_on_status(http_parser *hp, const char *at, size_t len)
{
    mg_http1_resp_parser_t *p = hp->data;
    if (has_ctl(at, len)) {
        fail(p, MG_EINVAL, "malformed response: control character in the reason phrase");
        return -1;
    }
    /* Nothing precedes the reason phrase in the buffer, so it starts at 0. */
    if (buf_append(p, at, len))
        return -1;
    p->reason_len += len;
    return 0;
}

/*
 * One block for both header arrays, reused by every response: HEADERS_INITIAL slots at first,
 * doubled when a head needs more (the headers half is only filled once the head is complete,
 * so growing need not keep it). Returns 0, or -1 with the parser failed.
 */
static int headers_grow(mg_http1_resp_parser_t *p)
{
    size_t cap = p->hdr_cap ? p->hdr_cap * 2 : HEADERS_INITIAL;
    if (cap > MG_HTTP1_MAX_HEADERS)
        cap = MG_HTTP1_MAX_HEADERS;
    hdr_off_t *o = realloc(p->offs, cap * (sizeof(hdr_off_t) + sizeof(mg_http1_header_t)));
    if (o == NULL) {
        fail(p, MG_ENOMEM, "out of memory for the response's header fields");
        return -1;
    }
    p->offs = o;
    p->headers = (mg_http1_header_t *)(o + cap);
    p->hdr_cap = cap;
    return 0;
}

static int hp_on_header_field(http_parser *hp, const char *at, size_t len)
{
    mg_http1_resp_parser_t *p = hp->data;
    if (p->state != RS_HEAD)
        return 0; /* a trailer field: not passed on */
    /* http-parser checks names against the token table, except that built non-strict (as
     * Debian's is) it takes spaces too, and only fails later if no colon follows. */
    if (memchr(at, ' ', len)) {
        /* http-parser's words for the same fault, which it finds when no fragment ends inside
         * the name: so the message does not depend on how the bytes were split. */
        fail(p, MG_EINVAL, "malformed response: invalid character in header");
        return -1;
    }
    if (p->in_value || p->nheaders == 0) {
        if (p->nheaders == MG_HTTP1_MAX_HEADERS) {
            fail(p, MG_EINVAL, "response has more than %d header fields", MG_HTTP1_MAX_HEADERS);
            return -1;
        }
        if (p->nheaders == p->hdr_cap && headers_grow(p) != 0)
            return -1;
        hdr_off_t *o = &p->offs[p->nheaders++];
        o->name_off = (uint32_t)p->buf_len;
        o->name_len = 0;
        o->value_off = (uint32_t)p->buf_len;
        o->value_len = 0;
        p->in_value = false;
    }
    if (buf_append(p, at, len))
        return -1;
    p->offs[p->nheaders - 1].name_len += (uint32_t)len;
    return 0;
}

static int hp_on_header_value(http_parser *hp, const char *at, size_t len)
{
    mg_http1_resp_parser_t *p = hp->data;
    if (p->state != RS_HEAD)
        return 0;
    if (has_ctl(at, len)) {
        fail(p, MG_EINVAL, "malformed response: control character in a header value");
        return -1;
    }
    hdr_off_t *o = &p->offs[p->nheaders - 1];
    if (!p->in_value) {
        o->value_off = (uint32_t)p->buf_len;
        p->in_value = true;
    }
    if (buf_append(p, at, len))
        return -1;
    o->value_len += (uint32_t)len;
    return 0;
}

static int hp_on_headers_complete(http_parser *hp)
{
    mg_http1_resp_parser_t *p = hp->data;
    int status = (int)hp->status_code;

    if (hp->http_major != 1) {
        fail(p, MG_EINVAL, "unsupported HTTP version %u.%u in the response", hp->http_major,
             hp->http_minor);
        return -1;
    }
    /* http-parser takes one to three digits; RFC 9110 15 wants three. */
    if (status < 100) {
        fail(p, MG_EINVAL, "malformed response: status code %d is not three digits", status);
        return -1;
    }
    if (status == 101) {
        fail(p, MG_EINVAL, "101 Switching Protocols: upgrades are not supported");
        return -1;
    }
    for (size_t i = 0; i < p->nheaders; i++) {
        p->headers[i].name = p->buf + p->offs[i].name_off;
        p->headers[i].name_len = p->offs[i].name_len;
        p->headers[i].value = p->buf + p->offs[i].value_off;
        p->headers[i].value_len = p->offs[i].value_len;
    }

    mg_http1_resp_head_t head;
    head.status = status;
    head.http_major = hp->http_major;
    head.http_minor = hp->http_minor;
    head.reason = p->buf ? p->buf : "";
    head.reason_len = p->reason_len;
    head.headers = p->headers;
    head.nheaders = p->nheaders;
    head.content_length = (hp->flags & F_CONTENTLENGTH) ? hp->content_length : MG_HTTP1_NO_LENGTH;

    /* RFC 9112 6.3: these responses have no body whatever their headers say. http-parser knows
     * about 1xx, 204 and 304 but would still read a Content-Length body after them. */
    bool no_body = p->expect_head || status / 100 == 1 || status == 204 || status == 304;
    if (no_body)
        head.framing = MG_HTTP1_BODY_NONE;
    else if (hp->flags & F_CHUNKED)
        head.framing = MG_HTTP1_BODY_CHUNKED;
    else if (hp->uses_transfer_encoding)
        head.framing = MG_HTTP1_BODY_CLOSE; /* a coding other than chunked last: RFC 9112 6.3 */
    else if (hp->flags & F_CONTENTLENGTH)
        head.framing = MG_HTTP1_BODY_LENGTH;
    else
        head.framing = MG_HTTP1_BODY_CLOSE;

    bool persistent = hp->http_minor >= 1 ? !(hp->flags & F_CONNECTION_CLOSE)
                                          : !!(hp->flags & F_CONNECTION_KEEP_ALIVE);
    head.keep_alive = persistent && head.framing != MG_HTTP1_BODY_CLOSE;

    if (status / 100 == 1) {
        p->interim = true;
        if (p->cbs.on_info && p->cbs.on_info(p->data, &head) != 0) {
            p->cb_failed = true;
            return -1;
        }
        return 1; /* skip the body */
    }
    p->keep_alive = head.keep_alive;
    p->state = RS_BODY;
    if (p->cbs.on_head(p->data, &head) != 0) {
        p->cb_failed = true;
        return -1;
    }
    return no_body ? 1 : 0;
}

static int hp_on_body(http_parser *hp, const char *at, size_t len)
{
    mg_http1_resp_parser_t *p = hp->data;
    if (p->cbs.on_body && p->cbs.on_body(p->data, at, len) != 0) {
        p->cb_failed = true;
        return -1;
    }
    return 0;
}

static int hp_on_message_complete(http_parser *hp)
{
    mg_http1_resp_parser_t *p = hp->data;
    p->complete = true;
    /* Pausing makes http_parser_execute() return right after this message. */
    http_parser_pause(hp, 1);
    return 0;
}

static const http_parser_settings hp_settings = {
    .on_status = hp_on_status,
    .on_header_field = hp_on_header_field,
    .on_header_value = hp_on_header_value,
    .on_headers_complete = hp_on_headers_complete,
    .on_body = hp_on_body,
    .on_message_complete = hp_on_message_complete,
};

int mg_http1_resp_parser_new(const mg_http1_resp_cbs_t *cbs, void *data, size_t head_max,
                             mg_http1_resp_parser_t **out)
{
    if (!cbs || !cbs->on_head || !out)
        return MG_EINVAL;
    if (head_max == 0)
        head_max = MG_HTTP1_HEAD_MAX_DEFAULT;
    if (head_max > UINT32_MAX)
        head_max = UINT32_MAX;
    mg_http1_resp_parser_t *p = calloc(1, sizeof(*p));
    if (!p)
        return MG_ENOMEM;
    if (headers_grow(p) != 0) {
        free(p);
        return MG_ENOMEM;
    }
    p->cbs = *cbs;
    p->data = data;
    p->head_max = head_max;
    p->state = RS_IDLE;
    *out = p;
    return 0;
}

void mg_http1_resp_parser_free(mg_http1_resp_parser_t *p)
{
    if (!p)
        return;
    free(p->buf);
    free(p->offs);
    free(p);
}

int mg_http1_resp_parser_expect(mg_http1_resp_parser_t *p, const char *method)
{
    if (p->state != RS_IDLE)
        return MG_ESTATE;
    p->expect_head = method && strcmp(method, "HEAD") == 0;
    return 0;
}

bool mg_http1_resp_parser_busy(const mg_http1_resp_parser_t *p)
{
    return p->state == RS_HEAD || p->state == RS_BODY;
}

const char *mg_http1_resp_parser_error(const mg_http1_resp_parser_t *p)
{
    return p->err ? p->msg : "";
}

static void begin_message(mg_http1_resp_parser_t *p)
{
    http_parser_init(&p->hp, HTTP_RESPONSE);
    p->hp.data = p;
    p->state = RS_HEAD;
    p->in_value = false;
    p->complete = false;
    p->interim = false;
    p->keep_alive = false;
    p->head_seen = 0;
    p->reason_len = 0;
    p->nheaders = 0;
    p->buf_len = 0;
    if (p->buf_cap > HEAD_BUF_KEEP) {
        free(p->buf);
        p->buf = NULL;
        p->buf_cap = 0;
    }
}

/* Turns http-parser's error, or ours, into the parser's final state. */
static int feed_error(mg_http1_resp_parser_t *p)
{
    enum http_errno e = HTTP_PARSER_ERRNO(&p->hp);
    p->state = RS_FAILED;
    if (p->cb_failed)
        return fail(p, MG_ECANCELED, "a callback stopped the parser");
    if (p->err)
        return p->err;
    return fail(p, MG_EINVAL, "malformed response: %s", http_errno_description(e));
}

/*
 * Runs after http-parser stopped at the end of a message. Returns 1 to go on parsing (the
 * message was a 1xx), 0 to return to the caller, or an error.
 */
static int end_message(mg_http1_resp_parser_t *p)
{
    http_parser_pause(&p->hp, 0);
    p->complete = false;
    if (p->interim) {
        if (++p->interims > MAX_INTERIM) {
            p->state = RS_FAILED;
            return fail(p, MG_EINVAL, "more than %d 1xx responses in a row", MAX_INTERIM);
        }
        p->state = RS_IDLE;
        return 1;
    }
    bool keep_alive = p->keep_alive;
    p->state = keep_alive ? RS_IDLE : RS_CLOSED;
    p->expect_head = false;
    p->interims = 0;
    if (p->cbs.on_complete && p->cbs.on_complete(p->data, keep_alive) != 0) {
        p->state = RS_FAILED;
        return fail(p, MG_ECANCELED, "a callback stopped the parser");
    }
    return 0;
}

int mg_http1_resp_parser_feed(mg_http1_resp_parser_t *p, const char *data, size_t len,
                              size_t *consumed)
{
    size_t off = 0;
    int rc = 0;

    if (p->state == RS_FAILED) {
        rc = MG_ESTATE;
        goto out;
    }
    if (p->state == RS_CLOSED && len > 0) {
        p->state = RS_FAILED;
        rc = fail(p, MG_ESTATE, "bytes after a response that closes the connection");
        goto out;
    }
    while (off < len) {
        if (p->state == RS_IDLE)
            begin_message(p);
        size_t n = len - off;
        bool in_head = p->state == RS_HEAD;
        if (in_head) {
            /* Feeding no more than the head may still take is what bounds it. */
            size_t room = p->head_max - p->head_seen;
            if (room == 0) {
                p->state = RS_FAILED;
                rc = fail(p, MG_EINVAL, "response head larger than %zu bytes", p->head_max);
                goto out;
            }
            if (n > room)
                n = room;
        }
        size_t got = http_parser_execute(&p->hp, &hp_settings, data + off, n);
        off += got;
        if (in_head)
            p->head_seen += got;
        if (p->complete) {
            rc = end_message(p);
            if (rc <= 0)
                goto out; /* a final response ended, or an error */
            rc = 0;
            continue;
        }
        if (HTTP_PARSER_ERRNO(&p->hp) != HPE_OK || got != n) {
            rc = feed_error(p);
            goto out;
        }
    }
out:
    if (consumed)
        *consumed = off;
    return rc;
}

int mg_http1_resp_parser_eof(mg_http1_resp_parser_t *p)
{
    switch (p->state) {
    case RS_IDLE:
        if (p->interims == 0)
            return 0;
        /* A 100 Continue promised a final response that never came. */
        p->state = RS_FAILED;
        return fail(p, MG_ECLOSED, "the upstream closed the connection after a 1xx response");
    case RS_CLOSED:
        return 0;
    case RS_FAILED:
        return MG_ESTATE;
    case RS_HEAD:
    case RS_BODY:
        break;
    }
    http_parser_execute(&p->hp, &hp_settings, NULL, 0);
    if (p->complete) {
        p->keep_alive = false; /* the connection is gone whatever the head said */
        int rc = end_message(p);
        p->state = RS_CLOSED;
        return rc < 0 ? rc : 0;
    }
    enum http_errno e = HTTP_PARSER_ERRNO(&p->hp);
    if (e == HPE_OK && p->state == RS_HEAD) {
        /* Only blank lines of a response that never began. */
        p->state = RS_CLOSED;
        return 0;
    }
    bool in_head = p->state == RS_HEAD;
    p->state = RS_FAILED;
    return fail(p, MG_ECLOSED, "the upstream closed the connection inside a response's %s",
                in_head ? "head" : "body");
}

/* ---------------------------------------------------------------------------------------------
 * Tokens, values, header names
 */

bool mg_http1_token_valid(const char *s, size_t len)
{
    if (!s || len == 0)
        return false;
    for (size_t i = 0; i < len; i++)
        if (!mg__http1_tchar[(unsigned char)s[i]])
            return false;
    return true;
}

bool mg_http1_value_valid(const char *s, size_t len)
{
    if (len == 0)
        return true;
    if (!s)
        return false;
    /* memchr is vectorised; three passes over a short value beat one byte loop. */
    return !memchr(s, '\r', len) && !memchr(s, '\n', len) && !memchr(s, '\0', len);
}

/* ASCII case-insensitive equality; inline because header names are short and libc's
 * strncasecmp (locale-aware, out of line) dominated the request head's profile. */
static inline bool name_is(const char *a, size_t alen, const char *b, size_t blen)
{
    if (alen != blen)
        return false;
    for (size_t i = 0; i < alen; i++) {
        unsigned char x = (unsigned char)a[i], y = (unsigned char)b[i];
        if ((unsigned)(x - 'A') < 26u)
            x |= 0x20;
        if ((unsigned)(y - 'A') < 26u)
            y |= 0x20;
        if (x != y)
            return false;
    }
    return true;
}

#define NAME_IS(name, len, lit) name_is((name), (len), lit, sizeof(lit) - 1)

static bool is_ows(char c)
{
    return c == ' ' || c == '\t';
}

/*
 * Steps through a comma-separated list: returns the next element with optional whitespace
 * trimmed (possibly empty) in *el, *el_len, or false at the end. *pos starts at 0.
 */
static bool list_next(const char *s, size_t len, size_t *pos, const char **el, size_t *el_len)
{
    size_t i = *pos;
    if (i > len)
        return false;
    size_t start = i;
    while (i < len && s[i] != ',')
        i++;
    size_t end = i;
    *pos = i + 1;
    while (start < end && is_ows(s[start]))
        start++;
    while (end > start && is_ows(s[end - 1]))
        end--;
    *el = s + start;
    *el_len = end - start;
    return true;
}

static bool is_static_hop(const char *name, size_t len)
{
    if (len >= 6 && name_is(name, 6, "proxy-", 6))
        return true;
    return NAME_IS(name, len, "connection") || NAME_IS(name, len, "keep-alive") ||
           NAME_IS(name, len, "te") || NAME_IS(name, len, "trailer") ||
           NAME_IS(name, len, "transfer-encoding") || NAME_IS(name, len, "upgrade");
}

const mg_http1_header_t *mg_http1_header_find(const mg_http1_header_t *headers, size_t nheaders,
                                              const char *name)
{
    size_t n = strlen(name);
    for (size_t i = 0; i < nheaders; i++)
        if (name_is(headers[i].name, headers[i].name_len, name, n))
            return &headers[i];
    return NULL;
}

bool mg_http1_header_lists(const mg_http1_header_t *headers, size_t nheaders, const char *name,
                           const char *token, size_t token_len)
{
    size_t n = strlen(name);
    for (size_t i = 0; i < nheaders; i++) {
        const mg_http1_header_t *h = &headers[i];
        if (!name_is(h->name, h->name_len, name, n))
            continue;
        size_t pos = 0;
        const char *el;
        size_t el_len;
        while (list_next(h->value, h->value_len, &pos, &el, &el_len))
            if (name_is(token, token_len, el, el_len))
                return true;
    }
    return false;
}

static bool listed_in_connection(const mg_http1_header_t *headers, size_t nheaders,
                                 const char *name, size_t name_len)
{
    return mg_http1_header_lists(headers, nheaders, "connection", name, name_len);
}

bool mg_http1_header_is_hop(const mg_http1_header_t *headers, size_t nheaders, const char *name,
                            size_t name_len)
{
    return is_static_hop(name, name_len) ||
           listed_in_connection(headers, nheaders, name, name_len);
}

/* ---------------------------------------------------------------------------------------------
 * Checking the client's request
 */

/* Parses 1*DIGIT without overflow past 2^63 - 1. */
static bool parse_length(const char *s, size_t len, uint64_t *out)
{
    if (len == 0 || len > 18) /* 18 digits always fit; longer bodies we refuse anyway */
        return false;
    uint64_t v = 0;
    for (size_t i = 0; i < len; i++) {
        if (s[i] < '0' || s[i] > '9')
            return false;
        v = v * 10 + (uint64_t)(s[i] - '0');
    }
    *out = v;
    return true;
}

int mg_http1_check_request(const char *method, const mg_http1_header_t *headers, size_t nheaders,
                           mg_http1_req_framing_t *framing, int *status, const char **why)
{
    int st = 400;
    const char *msg = NULL;
    uint64_t length = MG_HTTP1_NO_LENGTH;
    bool te_seen = false, te_last_chunked = false, te_other = false;
    int te_chunked = 0;

    if (!method || !mg_http1_token_valid(method, strlen(method))) {
        msg = "invalid method";
        goto out;
    }
    for (size_t i = 0; i < nheaders; i++) {
        const mg_http1_header_t *h = &headers[i];
        if (!mg_http1_token_valid(h->name, h->name_len)) {
            msg = "invalid header name";
            goto out;
        }
        if (!mg_http1_value_valid(h->value, h->value_len)) {
            msg = "header value contains CR, LF or NUL";
            goto out;
        }
        size_t pos = 0;
        const char *el;
        size_t el_len;
        if (NAME_IS(h->name, h->name_len, "content-length")) {
            /* RFC 9110 8.6: a list of one repeated value may be taken as that value. */
            while (list_next(h->value, h->value_len, &pos, &el, &el_len)) {
                uint64_t v;
                if (!parse_length(el, el_len, &v)) {
                    msg = "invalid Content-Length";
                    goto out;
                }
                if (length != MG_HTTP1_NO_LENGTH && v != length) {
                    msg = "Content-Length values differ";
                    goto out;
                }
                length = v;
            }
        } else if (NAME_IS(h->name, h->name_len, "transfer-encoding")) {
            te_seen = true;
            while (list_next(h->value, h->value_len, &pos, &el, &el_len)) {
                if (el_len == 0)
                    continue; /* RFC 9110 5.6.1: empty list elements are ignored */
                te_last_chunked = NAME_IS(el, el_len, "chunked");
                if (te_last_chunked)
                    te_chunked++;
                else
                    te_other = true;
            }
        }
    }
    if (te_seen && length != MG_HTTP1_NO_LENGTH) {
        msg = "both Content-Length and Transfer-Encoding";
        goto out;
    }
    if (te_seen) {
        if (!te_last_chunked || te_chunked > 1) {
            msg = "Transfer-Encoding must end with a single chunked";
            goto out;
        }
        if (te_other) {
            st = 501;
            msg = "transfer codings other than chunked are not supported";
            goto out;
        }
    }
    if (framing) {
        framing->chunked = te_seen;
        framing->content_length = length;
    }
out:
    if (status)
        *status = msg ? st : 0;
    if (why)
        *why = msg ? msg : "";
    return msg ? MG_EINVAL : 0;
}

/* ---------------------------------------------------------------------------------------------
 * The upstream request head
 */

/* Measures when data is NULL, writes otherwise: the same code sizes the head and builds it. */
typedef struct sink {
    char *data;
    size_t len;
} sink_t;

static void put(sink_t *s, const char *p, size_t n)
{
    if (s->data)
        memcpy(s->data + s->len, p, n);
    s->len += n;
}

#define PUT_LIT(s, lit) put((s), lit, sizeof(lit) - 1)

static void put_str(sink_t *s, const char *str)
{
    put(s, str, strlen(str));
}

static void put_u64(sink_t *s, uint64_t v)
{
    char tmp[20];
    size_t i = sizeof(tmp);
    do {
        tmp[--i] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    put(s, tmp + i, sizeof(tmp) - i);
}

static bool visible_ascii(const char *s, size_t len)
{
    if (len == 0)
        return false;
    for (size_t i = 0; i < len; i++)
        if ((unsigned char)s[i] <= 0x20 || (unsigned char)s[i] >= 0x7f)
            return false;
    return true;
}

#define MAX_REQUEST_HEADERS 256

enum hdr_class { HDR_COPY, HDR_DROP, HDR_XFF };

/*
 * What becomes of one client header upstream. Dropped: hop-by-hop fields, and those we write
 * ourselves or that concern only the front (Host, Content-Length, Expect, X-Forwarded-Proto,
 * X-Request-Id). X-Forwarded-For is merged into ours.
 */
static enum hdr_class classify(const char *name, size_t len)
{
    switch (len) {
    case 4:
        return NAME_IS(name, len, "host") ? HDR_DROP : HDR_COPY;
    case 6:
        return NAME_IS(name, len, "expect") ? HDR_DROP : HDR_COPY;
    case 12:
        return NAME_IS(name, len, "x-request-id") ? HDR_DROP : HDR_COPY;
    case 14:
        return NAME_IS(name, len, "content-length") ? HDR_DROP : HDR_COPY;
    case 15:
        return NAME_IS(name, len, "x-forwarded-for") ? HDR_XFF : HDR_COPY;
    case 17:
        if (NAME_IS(name, len, "x-forwarded-proto"))
            return HDR_DROP;
        break;
    }
    return is_static_hop(name, len) ? HDR_DROP : HDR_COPY;
}

/* The fields emit_request() writes itself, which an edit may not touch. */
static bool builder_owned(const char *name, size_t len)
{
    return classify(name, len) != HDR_COPY;
}

bool mg_http1_field_editable(const char *name, size_t len)
{
    return mg_http1_token_valid(name, len) && !builder_owned(name, len);
}

static bool edited(const mg_http1_request_t *req, const char *name, size_t len)
{
    for (size_t i = 0; i < req->nedits; i++)
        if (name_is(name, len, req->edits[i].name, req->edits[i].name_len))
            return true;
    return false;
}

/* Writes every X-Forwarded-For element of the client's, then client_addr, as one field. */
static void emit_xff(const mg_http1_request_t *req, const uint8_t *cls, sink_t *s)
{
    bool open = false;
    for (size_t i = 0; i < req->nheaders; i++) {
        const mg_http1_header_t *h = &req->headers[i];
        if (cls[i] != HDR_XFF)
            continue;
        /* Several fields are one list (RFC 9110 5.3): merged, they keep their order. */
        size_t pos = 0;
        const char *el;
        size_t el_len;
        while (list_next(h->value, h->value_len, &pos, &el, &el_len)) {
            if (el_len == 0)
                continue;
            if (open)
                PUT_LIT(s, ", ");
            else
                PUT_LIT(s, "X-Forwarded-For: ");
            open = true;
            put(s, el, el_len);
        }
    }
    if (req->client_addr) {
        if (open)
            PUT_LIT(s, ", ");
        else
            PUT_LIT(s, "X-Forwarded-For: ");
        open = true;
        put_str(s, req->client_addr);
    }
    if (open)
        PUT_LIT(s, "\r\n");
}

/*
 * Checks everything that goes into the head, so that the emitting passes cannot fail, and sorts
 * the client's headers into cls.
 */
static const char *check_request_parts(const mg_http1_request_t *req, uint8_t *cls)
{
    if (!req->method || !mg_http1_token_valid(req->method, strlen(req->method)))
        return "invalid method";
    if (!req->path || req->path_len == 0 || req->path[0] != '/' ||
        !visible_ascii(req->path, req->path_len))
        return "invalid path: it must start with / and hold only visible ASCII";
    if (!req->host || !visible_ascii(req->host, strlen(req->host)))
        return "invalid Host";
    if (req->client_addr && !visible_ascii(req->client_addr, strlen(req->client_addr)))
        return "invalid client address";
    if (req->proto && !mg_http1_token_valid(req->proto, strlen(req->proto)))
        return "invalid X-Forwarded-Proto";
    if (req->request_id && !mg_http1_request_id_valid(req->request_id, strlen(req->request_id)))
        return "invalid X-Request-Id";
    if (req->body_length < MG_HTTP1_BODY_LENGTH_NONE)
        return "invalid body length";
    if (req->nheaders && !req->headers)
        return "invalid headers";
    if (req->nheaders > MAX_REQUEST_HEADERS)
        return "too many header fields";
    if (req->nedits > MG_HTTP1_FIELD_EDITS_MAX || (req->nedits && !req->edits))
        return "too many field edits";
    for (size_t i = 0; i < req->nedits; i++) {
        const mg_http1_field_edit_t *e = &req->edits[i];
        if (!mg_http1_field_editable(e->name, e->name_len))
            return "a field edit names a field that cannot be edited";
        if (e->value && !mg_http1_value_valid(e->value, e->value_len))
            return "a field edit's value contains CR, LF or NUL";
    }
    bool has_connection = false;
    for (size_t i = 0; i < req->nheaders; i++) {
        const mg_http1_header_t *h = &req->headers[i];
        if (!mg_http1_token_valid(h->name, h->name_len))
            return "invalid header name";
        if (!mg_http1_value_valid(h->value, h->value_len))
            return "header value contains CR, LF or NUL";
        cls[i] = (uint8_t)classify(h->name, h->name_len);
        if (cls[i] == HDR_COPY && req->nedits && edited(req, h->name, h->name_len))
            cls[i] = HDR_DROP;
        if (NAME_IS(h->name, h->name_len, "connection"))
            has_connection = true;
    }
    /* RFC 9110 7.6.1: the fields a Connection header names are hop-by-hop too. */
    if (has_connection)
        for (size_t i = 0; i < req->nheaders; i++)
            if (cls[i] != HDR_DROP && listed_in_connection(req->headers, req->nheaders,
                                                           req->headers[i].name,
                                                           req->headers[i].name_len))
                cls[i] = HDR_DROP;
    return NULL;
}

static void emit_request(const mg_http1_request_t *req, const uint8_t *cls, sink_t *s)
{
    put_str(s, req->method);
    PUT_LIT(s, " ");
    put(s, req->path, req->path_len);
    PUT_LIT(s, " HTTP/1.1\r\nHost: ");
    put_str(s, req->host);
    PUT_LIT(s, "\r\n");
    for (size_t i = 0; i < req->nheaders; i++) {
        const mg_http1_header_t *h = &req->headers[i];
        if (cls[i] != HDR_COPY)
            continue;
        put(s, h->name, h->name_len);
        PUT_LIT(s, ": ");
        put(s, h->value, h->value_len);
        PUT_LIT(s, "\r\n");
    }
    for (size_t i = 0; i < req->nedits; i++) {
        const mg_http1_field_edit_t *e = &req->edits[i];
        if (!e->value)
            continue;
        put(s, e->name, e->name_len);
        PUT_LIT(s, ": ");
        put(s, e->value, e->value_len);
        PUT_LIT(s, "\r\n");
    }
    emit_xff(req, cls, s);
    if (req->proto) {
        PUT_LIT(s, "X-Forwarded-Proto: ");
        put_str(s, req->proto);
        PUT_LIT(s, "\r\n");
    }
    if (req->request_id) {
        PUT_LIT(s, "X-Request-Id: ");
        put_str(s, req->request_id);
        PUT_LIT(s, "\r\n");
    }
    if (req->body_length == MG_HTTP1_BODY_LENGTH_CHUNKED) {
        PUT_LIT(s, "Transfer-Encoding: chunked\r\n");
    } else if (req->body_length >= 0) {
        PUT_LIT(s, "Content-Length: ");
        put_u64(s, (uint64_t)req->body_length);
        PUT_LIT(s, "\r\n");
    }
    PUT_LIT(s, "Connection: keep-alive\r\n\r\n");
}

int mg_http1_request_head(const mg_http1_request_t *req, char **out, size_t *out_len,
                          const char **why)
{
    uint8_t cls[MAX_REQUEST_HEADERS];
    const char *msg = check_request_parts(req, cls);
    if (msg) {
        if (why)
            *why = msg;
        return MG_EINVAL;
    }
    sink_t s = { NULL, 0 };
    emit_request(req, cls, &s);
    if (s.len > MG_HTTP1_REQUEST_HEAD_MAX) {
        if (why)
            *why = "request head too large";
        return MG_EINVAL;
    }
    s.data = malloc(s.len);
    if (!s.data) {
        if (why)
            *why = "out of memory";
        return MG_ENOMEM;
    }
    s.len = 0;
    emit_request(req, cls, &s);
    *out = s.data;
    *out_len = s.len;
    if (why)
        *why = "";
    return 0;
}

/* ---------------------------------------------------------------------------------------------
 * The response head the client gets
 */

const char *mg_http1_reason(int status)
{
    switch (status) {
    case 100: return "Continue";
    case 101: return "Switching Protocols";
    case 200: return "OK";
    case 201: return "Created";
    case 202: return "Accepted";
    case 203: return "Non-Authoritative Information";
    case 204: return "No Content";
    case 205: return "Reset Content";
    case 206: return "Partial Content";
    case 300: return "Multiple Choices";
    case 301: return "Moved Permanently";
    case 302: return "Found";
    case 303: return "See Other";
    case 304: return "Not Modified";
    case 307: return "Temporary Redirect";
    case 308: return "Permanent Redirect";
    case 400: return "Bad Request";
    case 401: return "Unauthorized";
    case 402: return "Payment Required";
    case 403: return "Forbidden";
    case 404: return "Not Found";
    case 405: return "Method Not Allowed";
    case 406: return "Not Acceptable";
    case 408: return "Request Timeout";
    case 409: return "Conflict";
    case 410: return "Gone";
    case 411: return "Length Required";
    case 412: return "Precondition Failed";
    case 413: return "Content Too Large";
    case 414: return "URI Too Long";
    case 415: return "Unsupported Media Type";
    case 416: return "Range Not Satisfiable";
    case 417: return "Expectation Failed";
    case 421: return "Misdirected Request";
    case 422: return "Unprocessable Content";
    case 425: return "Too Early";
    case 426: return "Upgrade Required";
    case 428: return "Precondition Required";
    case 429: return "Too Many Requests";
    case 431: return "Request Header Fields Too Large";
    case 451: return "Unavailable For Legal Reasons";
    case 500: return "Internal Server Error";
    case 501: return "Not Implemented";
    case 502: return "Bad Gateway";
    case 503: return "Service Unavailable";
    case 504: return "Gateway Timeout";
    case 505: return "HTTP Version Not Supported";
    default: return "Unknown";
    }
}

static bool response_field_dropped(const mg_http1_response_t *r, const mg_http1_header_t *h)
{
    return NAME_IS(h->name, h->name_len, "content-length") ||
           NAME_IS(h->name, h->name_len, "x-request-id") ||
           mg_http1_header_is_hop(r->headers, r->nheaders, h->name, h->name_len);
}

static void emit_response(const mg_http1_response_t *r, sink_t *s)
{
    PUT_LIT(s, "HTTP/1.1 ");
    put_u64(s, (uint64_t)r->status);
    PUT_LIT(s, " ");
    put_str(s, mg_http1_reason(r->status));
    PUT_LIT(s, "\r\n");
    for (size_t i = 0; i < r->nheaders; i++) {
        const mg_http1_header_t *h = &r->headers[i];
        if (response_field_dropped(r, h))
            continue;
        put(s, h->name, h->name_len);
        PUT_LIT(s, ": ");
        put(s, h->value, h->value_len);
        PUT_LIT(s, "\r\n");
    }
    if (r->body_length >= 0) {
        PUT_LIT(s, "Content-Length: ");
        put_u64(s, (uint64_t)r->body_length);
        PUT_LIT(s, "\r\n");
    } else if (r->body_length == MG_HTTP1_BODY_LENGTH_CHUNKED) {
        PUT_LIT(s, "Transfer-Encoding: chunked\r\n");
    }
    if (r->close)
        PUT_LIT(s, "Connection: close\r\n");
    if (r->request_id) {
        PUT_LIT(s, "X-Request-Id: ");
        put_str(s, r->request_id);
        PUT_LIT(s, "\r\n");
    }
    PUT_LIT(s, "\r\n");
}

int mg_http1_response_head(const mg_http1_response_t *r, char *out, size_t cap, size_t *len)
{
    if (r->status < 100 || r->status > 599 || r->body_length < MG_HTTP1_BODY_LENGTH_NONE ||
        (r->nheaders && !r->headers) ||
        (r->request_id && !mg_http1_request_id_valid(r->request_id, strlen(r->request_id))))
        return MG_EINVAL;
    for (size_t i = 0; i < r->nheaders; i++) {
        const mg_http1_header_t *h = &r->headers[i];
        if (!mg_http1_token_valid(h->name, h->name_len) ||
            !mg_http1_value_valid(h->value, h->value_len))
            return MG_EINVAL;
    }
    sink_t s = { NULL, 0 };
    emit_response(r, &s);
    if (s.len > cap)
        return MG_ENOMEM;
    s.data = out;
    s.len = 0;
    emit_response(r, &s);
    *len = s.len;
    return 0;
}

/* ---------------------------------------------------------------------------------------------
 * Chunked framing
 */

size_t mg_http1_chunk_head(char out[MG_HTTP1_CHUNK_HEAD_MAX], size_t len)
{
    static const char hex[] = "0123456789abcdef";
    if (len == 0)
        return 0;
    char tmp[16];
    size_t i = sizeof(tmp);
    while (len) {
        tmp[--i] = hex[len & 0xf];
        len >>= 4;
    }
    size_t n = sizeof(tmp) - i;
    memcpy(out, tmp + i, n);
    out[n] = '\r';
    out[n + 1] = '\n';
    out[n + 2] = '\0';
    return n + 2;
}

/* ---------------------------------------------------------------------------------------------
 * Request ids
 */

bool mg_http1_request_id_valid(const char *s, size_t len)
{
    return s && len <= MG_HTTP1_REQUEST_ID_MAX && visible_ascii(s, len);
}

/*
 * SipHash-2-4 (Aumasson and Bernstein), written from the paper, on one 8-byte word: a keyed PRF,
 * so ids made from a counter reveal neither the key nor the ids before and after them.
 */
static inline uint64_t rotl(uint64_t x, int b)
{
    return (x << b) | (x >> (64 - b));
}

#define SIPROUND                                                                              \
    do {                                                                                      \
        v0 += v1; v1 = rotl(v1, 13); v1 ^= v0; v0 = rotl(v0, 32);                             \
        v2 += v3; v3 = rotl(v3, 16); v3 ^= v2;                                                 \
        v0 += v3; v3 = rotl(v3, 21); v3 ^= v0;                                                 \
        v2 += v1; v1 = rotl(v1, 17); v1 ^= v2; v2 = rotl(v2, 32);                             \
    } while (0)

static uint64_t siphash_u64(uint64_t k0, uint64_t k1, uint64_t m)
{
    uint64_t v0 = k0 ^ 0x736f6d6570736575ULL;
    uint64_t v1 = k1 ^ 0x646f72616e646f6dULL;
    uint64_t v2 = k0 ^ 0x6c7967656e657261ULL;
    uint64_t v3 = k1 ^ 0x7465646279746573ULL;
    uint64_t b = (uint64_t)8 << 56; /* the message length in the last block, no tail bytes */

    v3 ^= m;
    SIPROUND;
    SIPROUND;
    v0 ^= m;
    v3 ^= b;
    SIPROUND;
    SIPROUND;
    v0 ^= b;
    v2 ^= 0xff;
    SIPROUND;
    SIPROUND;
    SIPROUND;
    SIPROUND;
    return v0 ^ v1 ^ v2 ^ v3;
}

static pthread_once_t id_once = PTHREAD_ONCE_INIT;
static uint64_t id_key[2];
static bool id_key_ok;
static _Atomic uint64_t id_counter;

static void id_init(void)
{
    unsigned char k[24];
    if (RAND_bytes(k, (int)sizeof(k)) != 1)
        return;
    uint64_t start;
    memcpy(id_key, k, 16);
    memcpy(&start, k + 16, 8);
    /* A random start keeps two processes with equal keys (never, in practice) apart too. */
    atomic_store(&id_counter, start);
    id_key_ok = true;
}

int mg_http1_request_id_new(char out[MG_HTTP1_REQUEST_ID_LEN + 1])
{
    static const char hex[] = "0123456789abcdef";
    pthread_once(&id_once, id_init);
    if (!id_key_ok)
        return MG_EINVAL;
    uint64_t c = atomic_fetch_add_explicit(&id_counter, 1, memory_order_relaxed);
    uint64_t w[2] = { siphash_u64(id_key[0], id_key[1], c << 1),
                      siphash_u64(id_key[0], id_key[1], (c << 1) | 1) };
    for (int i = 0; i < 2; i++)
        for (int j = 0; j < 16; j++)
            out[i * 16 + j] = hex[(w[i] >> (60 - 4 * j)) & 0xf];
    out[MG_HTTP1_REQUEST_ID_LEN] = '\0';
    return 0;
}

int mg__http1_append_chunk(mg__buf_t *b, const void *p, size_t n)
{
    if (n == 0)
        return 0; /* a chunk of nothing would end the body */
    char head[MG_HTTP1_CHUNK_HEAD_MAX];
    size_t hn = mg_http1_chunk_head(head, n);
    size_t before = mg__buf_size(b);
    if (mg__buf_append(b, head, hn) != 0 || mg__buf_append(b, p, n) != 0 ||
        mg__buf_append(b, MG_HTTP1_CHUNK_TAIL, MG_HTTP1_CHUNK_TAIL_LEN) != 0) {
        b->len = b->off + before; /* (an append may have moved the bytes to the front) */
        return MG_ENOMEM;
    }
    return 0;
}
