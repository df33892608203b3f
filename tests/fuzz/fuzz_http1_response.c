/*
 * libFuzzer target for the response parser (src/http/http1.c). See README.md beside it.
 *
 * The first two input bytes choose the options (HEAD request, a small head cap) and seed the
 * split pattern; the rest is what the upstream sends. Each input runs twice, fed whole and fed in
 * pseudo-random pieces, and both runs must tell the same story. Invariants checked: no crash or
 * sanitizer report; consumed never exceeds what was offered; body bytes point inside the piece
 * being fed and never total more than the bytes fed; callbacks come in order (head, body...,
 * complete); header names are tokens and values carry no CR, LF or NUL; a finished parser
 * refuses more.
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
    uint64_t digest;       /* FNV-1a over every event */
    int phase;             /* 0: no head yet, 1: head seen */
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

static void check_head(track_t *t, const mg_http1_resp_head_t *h, int tag)
{
    if (h->status < 100 || h->status > 999)
        abort();
    mix_int(t, (uint64_t)tag);
    mix_int(t, (uint64_t)h->status);
    mix_int(t, (uint64_t)h->framing);
    mix_int(t, h->content_length);
    mix_int(t, h->keep_alive);
    mix(t, h->reason, h->reason_len);
    if (h->nheaders > MG_HTTP1_MAX_HEADERS)
        abort();
    for (size_t i = 0; i < h->nheaders; i++) {
        const mg_http1_header_t *x = &h->headers[i];
        if (!mg_http1_token_valid(x->name, x->name_len) ||
            !mg_http1_value_valid(x->value, x->value_len))
            abort();
        mix(t, x->name, x->name_len);
        mix_int(t, 0xff);
        mix(t, x->value, x->value_len);
        mix_int(t, 0xfe);
    }
}

static int on_head(void *data, const mg_http1_resp_head_t *h)
{
    track_t *t = data;
    if (t->phase != 0 || h->status < 200)
        abort();
    t->phase = 1;
    check_head(t, h, 1);
    return 0;
}

static int on_info(void *data, const mg_http1_resp_head_t *h)
{
    track_t *t = data;
    if (t->phase != 0 || h->status >= 200)
        abort();
    check_head(t, h, 2);
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
    if (t->body > t->fed)
        abort();
    mix(t, at, len);
    return 0;
}

static int on_complete(void *data, bool keep_alive)
{
    track_t *t = data;
    if (t->phase != 1)
        abort();
    t->phase = 0;
    mix_int(t, 3);
    mix_int(t, keep_alive);
    return 0;
}

static const mg_http1_resp_cbs_t cbs = { on_head, on_info, on_body, on_complete };

/* Feeds data in pieces of the sizes the seed gives (0: whole); returns the digest. */
static uint64_t run(const uint8_t *data, size_t len, bool head, size_t head_max, uint32_t seed)
{
    track_t t = { .digest = 0xcbf29ce484222325ULL };
    mg_http1_resp_parser_t *p;
    if (mg_http1_resp_parser_new(&cbs, &t, head_max, &p) != 0)
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
            if (head && !mg_http1_resp_parser_busy(p))
                (void)mg_http1_resp_parser_expect(p, "HEAD");
            size_t used = 0;
            t.piece = at;
            t.piece_len = left;
            rc = mg_http1_resp_parser_feed(p, at, left, &used);
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
    if (rc == 0)
        rc = mg_http1_resp_parser_eof(p);
    if (rc != 0) {
        const char *msg = mg_http1_resp_parser_error(p);
        if (msg[0] == '\0' && rc != MG_ESTATE)
            abort();
        size_t used = 1;
        if (mg_http1_resp_parser_feed(p, "H", 1, &used) != MG_ESTATE || used != 0)
            abort();
    }
    mix_int(&t, (uint64_t)(int64_t)rc);
    mg_http1_resp_parser_free(p);
    return t.digest;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 2)
        return 0;
    bool head = data[0] & 1;
    size_t head_max = (data[0] & 2) ? 64 + data[1] : 0;
    uint32_t seed = (uint32_t)data[0] << 8 | data[1] | 1;
    data += 2;
    size -= 2;
    uint64_t whole = run(data, size, head, head_max, 0);
    uint64_t split = run(data, size, head, head_max, seed);
    if (whole != split) {
        fprintf(stderr, "fed whole and in pieces, the parser told different stories\n");
        abort();
    }
    return 0;
}
