/*
 * http_parse: the server side of HTTP/1.1 framing (see http_parse.h).
 */
#define _GNU_SOURCE
#include "http_parse.h"

#include "moongate/error.h"

#include <string.h>
#include <strings.h>

/* The longest chunk-size line (size, extensions) or trailer line accepted. */
#define CHUNK_LINE_MAX 1024

enum { CH_SIZE, CH_DATA, CH_DATA_END, CH_TRAILER, CH_DONE };

static bool is_tchar(char ch)
{
    return (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || (ch >= '0' && ch <= '9') ||
           (ch != '\0' && strchr("!#$%&'*+-.^_`|~", ch) != NULL);
}

/* True if the comma-separated list v[0, vlen) holds token (case-insensitive). */
static bool list_has(const char *v, size_t vlen, const char *token)
{
    size_t tlen = strlen(token);
    size_t i = 0;
    while (i < vlen) {
        while (i < vlen && (v[i] == ' ' || v[i] == '\t' || v[i] == ','))
            i++;
        size_t start = i;
        while (i < vlen && v[i] != ',')
            i++;
        size_t end = i;
        while (end > start && (v[end - 1] == ' ' || v[end - 1] == '\t'))
            end--;
        if (end - start == tlen && strncasecmp(v + start, token, tlen) == 0)
            return true;
    }
    return false;
}

static bool name_is(const char *name, size_t nlen, const char *want)
{
    return nlen == strlen(want) && strncasecmp(name, want, nlen) == 0;
}

int mg_test_http_parse_head(char *buf, size_t len, mg_test_http_head_t *h)
{
    char *end = buf + len;
    bool has_te = false, conn_close = false, conn_keep = false;
    int nheaders = 0;

    memset(h, 0, sizeof *h);
    if (len < 4 || memcmp(end - 4, "\r\n\r\n", 4) != 0)
        return MG_EINVAL;

    /* The request line: METHOD SP /target SP HTTP/1.x CRLF */
    char *eol = memmem(buf, len, "\r\n", 2);
    char *sp1 = memchr(buf, ' ', (size_t)(eol - buf));
    if (sp1 == NULL || sp1 == buf || sp1 - buf > 16)
        return MG_EINVAL;
    for (char *q = buf; q < sp1; q++)
        if (!is_tchar(*q))
            return MG_EINVAL;
    char *target = sp1 + 1;
    char *sp2 = memchr(target, ' ', (size_t)(eol - target));
    if (sp2 == NULL || *target != '/' || eol - sp2 != 9 || memcmp(sp2 + 1, "HTTP/1.", 7) != 0 ||
        (sp2[8] != '0' && sp2[8] != '1'))
        return MG_EINVAL;
    for (char *q = target; q < sp2; q++)
        if ((unsigned char)*q <= ' ' || *q == 0x7f)
            return MG_EINVAL;
    h->method = buf;
    h->method_len = (size_t)(sp1 - buf);
    h->is_head = h->method_len == 4 && memcmp(buf, "HEAD", 4) == 0;
    h->minor_version = sp2[8] - '0';

    /* The headers, up to the blank line (end - 2 is its CRLF). */
    for (char *line = eol + 2; line < end - 2; line = eol + 2) {
        eol = memmem(line, (size_t)(end - line), "\r\n", 2);
        char *colon = memchr(line, ':', (size_t)(eol - line));
        if (colon == NULL || colon == line || ++nheaders > MG_TEST_HTTP_HEAD_MAX_HEADERS)
            return MG_EINVAL;
        for (char *q = line; q < colon; q++)
            if (!is_tchar(*q))
                return MG_EINVAL;
        size_t nlen = (size_t)(colon - line);
        char *v = colon + 1;
        while (v < eol && (*v == ' ' || *v == '\t'))
            v++;
        size_t vlen = (size_t)(eol - v);
        while (vlen > 0 && (v[vlen - 1] == ' ' || v[vlen - 1] == '\t'))
            vlen--;
        for (size_t i = 0; i < vlen; i++)
            if (((unsigned char)v[i] < ' ' && v[i] != '\t') || v[i] == 0x7f)
                return MG_EINVAL;

        if (name_is(line, nlen, "Content-Length")) {
            uint64_t n = 0;
            if (vlen == 0 || vlen > 15)
                return MG_EINVAL;
            for (size_t i = 0; i < vlen; i++) {
                if (v[i] < '0' || v[i] > '9')
                    return MG_EINVAL;
                n = n * 10 + (uint64_t)(v[i] - '0');
            }
            if (h->has_content_length && n != h->content_length)
                return MG_EINVAL;
            h->has_content_length = true;
            h->content_length = n;
        } else if (name_is(line, nlen, "Transfer-Encoding")) {
            if (has_te || vlen != 7 || strncasecmp(v, "chunked", 7) != 0)
                return MG_EINVAL;
            has_te = h->chunked = true;
        } else if (name_is(line, nlen, "Connection")) {
            conn_close |= list_has(v, vlen, "close");
            conn_keep |= list_has(v, vlen, "keep-alive");
        } else if (name_is(line, nlen, "Content-Type")) {
            h->content_type = v;
            h->content_type_len = vlen;
        } else if (name_is(line, nlen, "Expect")) {
            h->expect_continue = vlen == 12 && strncasecmp(v, "100-continue", 12) == 0;
        }
    }
    /* Both framings at once is how requests get smuggled: refuse. */
    if (h->has_content_length && h->chunked)
        return MG_EINVAL;

    h->keep_alive = h->minor_version == 1 ? !conn_close : conn_keep && !conn_close;
    *sp2 = '\0';
    h->path = target;
    h->query = strchr(target, '?');
    if (h->query)
        *h->query++ = '\0';
    return 0;
}

void mg_test_chunked_init(mg_test_chunked_t *d)
{
    d->state = CH_SIZE;
    d->left = 0;
}

static int hex_digit(char ch)
{
    return ch >= '0' && ch <= '9' ? ch - '0'
         : ch >= 'a' && ch <= 'f' ? ch - 'a' + 10
         : ch >= 'A' && ch <= 'F' ? ch - 'A' + 10 : -1;
}

int mg_test_chunked_step(mg_test_chunked_t *d, const char *in, size_t len, size_t *consumed,
                         const char **data, size_t *data_len)
{
    *consumed = 0;
    *data = NULL;
    *data_len = 0;
    switch (d->state) {
    case CH_DONE:
        return 1;
    case CH_DATA: {
        if (len == 0)
            return MG_EAGAIN;
        size_t k = len < d->left ? len : (size_t)d->left;
        *data = in;
        *data_len = k;
        *consumed = k;
        d->left -= k;
        if (d->left == 0)
            d->state = CH_DATA_END;
        return 0;
    }
    case CH_DATA_END:
        if (len < 2)
            return MG_EAGAIN;
        if (in[0] != '\r' || in[1] != '\n')
            return MG_EINVAL;
        *consumed = 2;
        d->state = CH_SIZE;
        return 0;
    default:
        break;
    }

    /* CH_SIZE and CH_TRAILER read a line. */
    const char *eol = memmem(in, len, "\r\n", 2);
    if (eol == NULL)
        return len > CHUNK_LINE_MAX ? MG_EINVAL : MG_EAGAIN;
    size_t llen = (size_t)(eol - in);
    if (llen > CHUNK_LINE_MAX)
        return MG_EINVAL;
    *consumed = llen + 2;
    if (d->state == CH_TRAILER) {
        if (llen > 0)
            return 0;
        d->state = CH_DONE;
        return 1;
    }
    uint64_t n = 0;
    size_t i = 0;
    for (int v; i < llen && i < 16 && (v = hex_digit(in[i])) >= 0; i++)
        n = n * 16 + (uint64_t)v;
    if (i == 0 || (i < llen && in[i] != ';' && in[i] != ' ' && in[i] != '\t'))
        return MG_EINVAL;
    d->left = n;
    d->state = n == 0 ? CH_TRAILER : CH_DATA;
    return 0;
}
