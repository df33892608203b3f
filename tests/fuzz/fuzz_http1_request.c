/*
 * libFuzzer target for the client request parser (src/http/http1_request.c). See README.md beside
 * it.
 *
 * The first two input bytes choose the options (small limits, pausing in on_body) and seed the
 * split pattern; the rest is what a client sends. Each input runs twice, fed whole and fed in
 * pseudo-random pieces, and both runs must tell the same story, error status and reason
 * included. Invariants checked: no crash or sanitizer report; consumed never exceeds what was
 * offered and a feed always makes progress; the target is visible ASCII starting with / (or is
 * *); names are tokens and values carry no control byte but HTAB; body bytes point inside the
 * piece being fed and never total more than the bytes fed; a Content-Length body is exactly that
 * long; callbacks come in order (head, body..., trailers, complete); a failed parser refuses more.
 */
#include "moongate/error.h"
#include "pieces.h"
#include "moongate/http1.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct track {
    const char *piece;     /* the bytes being fed now */
    size_t piece_len;
    uint64_t fed, body;    /* totals */
    uint64_t this_body;    /* of the current request */
    uint64_t expect_len;   /* its Content-Length, or UINT64_MAX */
    uint64_t digest;       /* FNV-1a over every event */
    int phase;             /* 0: no head yet, 1: head seen, 2: trailers seen */
    int pause;             /* on_body returns MG_EAGAIN every other call */
    int calls;
} track_t;

static void mix(track_t *t, const void *p, size_t n)
{
    const unsigned char *b = p;
    for (size_t i = 0; i < n; i++) {
        t->digest ^= b[i];
        t->digest *= 0x100000001b3ULL;
    }
}

static void mix_int(track_t *t, uint64_t v)
{
    mix(t, &v, sizeof(v));
}

static void check_field(track_t *t, const mg_http1_header_t *x)
{
    if (!mg_http1_token_valid(x->name, x->name_len) || strlen(x->name) != x->name_len ||
        strlen(x->value) != x->value_len)
        abort();
    for (size_t i = 0; i < x->value_len; i++) {
        unsigned char c = (unsigned char)x->value[i];
        if ((c < 0x20 && c != '\t') || c == 0x7f)
            abort();
    }
    mix(t, x->name, x->name_len);
    mix_int(t, 0xff);
    mix(t, x->value, x->value_len);
    mix_int(t, 0xfe);
}

static int on_head(void *data, const mg_http1_req_head_t *h)
{
    track_t *t = data;
    if (t->phase != 0 || h->target_len == 0 || strlen(h->target) != h->target_len)
        abort();
    if (h->target[0] != '/' && !(h->target_len == 1 && h->target[0] == '*'))
        abort();
    for (size_t i = 0; i < h->target_len; i++)
        if ((unsigned char)h->target[i] <= 0x20 || (unsigned char)h->target[i] >= 0x7f)
            abort();
    t->phase = 1;
    t->this_body = 0;
    t->expect_len = h->body == MG_HTTP1_REQ_BODY_LENGTH ? h->content_length : UINT64_MAX;
    mix(t, h->method, strlen(h->method));
    mix(t, h->target, h->target_len);
    mix_int(t, (uint64_t)h->http_minor);
    mix_int(t, (uint64_t)h->body);
    mix_int(t, h->content_length);
    mix_int(t, (uint64_t)(h->keep_alive | h->expect_continue << 1 | h->upgrade << 2));
    for (size_t i = 0; i < h->nheaders; i++)
        check_field(t, &h->headers[i]);
    return 0;
}

static int on_body(void *data, const char *at, size_t len)
{
    track_t *t = data;
    if (t->phase != 1 || len == 0)
        abort();
    if (at < t->piece || at + len > t->piece + t->piece_len)
        abort();
    t->body += len;
    t->this_body += len;
    if (t->body > t->fed || (t->expect_len != UINT64_MAX && t->this_body > t->expect_len))
        abort();
    mix(t, at, len);
    return t->pause && (++t->calls & 1) ? MG_EAGAIN : 0;
}

static int on_trailers(void *data, const mg_http1_header_t *f, size_t n)
{
    track_t *t = data;
    if (t->phase != 1 || n == 0)
        abort();
    t->phase = 2;
    for (size_t i = 0; i < n; i++)
        check_field(t, &f[i]);
    return 0;
}

static int on_complete(void *data)
{
    track_t *t = data;
    if (t->phase == 0 || (t->expect_len != UINT64_MAX && t->this_body != t->expect_len))
        abort();
    t->phase = 0;
    mix_int(t, 3);
    return 0;
}

static const mg_http1_req_cbs_t cbs = { on_head, on_body, on_trailers, on_complete };

/* Feeds data in pieces of the sizes the seed gives (0: whole); returns the digest. */
static uint64_t run(const uint8_t *data, size_t len, const mg_http1_req_limits_t *lim,
                    int pause, uint32_t seed)
{
    track_t t = { .digest = 0xcbf29ce484222325ULL, .pause = pause };
    mg_http1_req_parser_t *p;
    if (mg_http1_req_parser_new(lim, &cbs, &t, &p) != 0)
        abort();
    int rc = 0;
    size_t off = 0;
    while (off < len && rc == 0) {
        size_t n = fuzz_piece_len(&seed, len - off, 64);
        /* A fresh copy, so that a pointer outside the piece is caught by ASan too. */
        char *piece = malloc(n ? n : 1);
        if (!piece)
            abort();
        memcpy(piece, data + off, n);
        t.fed += n;
        size_t left = n;
        char *at = piece;
        while (left > 0 && rc == 0) {
            size_t used = 0;
            t.piece = at;
            t.piece_len = left;
            rc = mg_http1_req_parser_feed(p, at, left, &used);
            if (used > left)
                abort();
            at += used;
            left -= used;
            if (rc == 0 && used == 0)
                abort(); /* no progress and no error: the caller would spin */
        }
        free(piece);
        off += n;
    }
    if (rc != 0) {
        int status = mg_http1_req_parser_status(p);
        const char *msg = mg_http1_req_parser_error(p);
        if (rc == MG_EINVAL && (status < 400 || status > 599 || msg[0] == '\0'))
            abort();
        mix_int(&t, (uint64_t)status);
        mix(&t, msg, strlen(msg));
        size_t used = 1;
        if (mg_http1_req_parser_feed(p, "G", 1, &used) != MG_ESTATE || used != 0)
            abort();
    }
    mix_int(&t, (uint64_t)(int64_t)rc);
    mix_int(&t, mg_http1_req_parser_idle(p));
    mg_http1_req_parser_free(p);
    return t.digest;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 2)
        return 0;
    mg_http1_req_limits_t small = { .line_max = 64 + (data[1] & 63), .head_max = 256,
                                    .fields_max = 1 + (data[1] >> 6) };
    const mg_http1_req_limits_t *lim = (data[0] & 1) ? &small : NULL;
    int pause = (data[0] >> 1) & 1;
    uint32_t seed = (uint32_t)data[0] << 8 | data[1] | 1;
    data += 2;
    size -= 2;
    uint64_t whole = run(data, size, lim, pause, 0);
    uint64_t split = run(data, size, lim, pause, seed);
    if (whole != split) {
        fprintf(stderr, "fed whole and in pieces, the parser told different stories\n");
        abort();
    }
    return 0;
}
