/*
 * http_client: request building, incremental response parsing, sha256 and the /bytes stream
 * (see http_client.h).
 */
#define _GNU_SOURCE
#include "http_client.h"

#include "proc.h"

#include "moongate/error.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <openssl/evp.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <unistd.h>

/* --- Stream ---------------------------------------------------------------------------------- */

static inline uint64_t next_word(mg_test_stream_t *s)
{
    uint64_t x = s->state;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    s->state = x;
    return x;
}

static inline void store_le64(unsigned char *p, uint64_t w)
{
    for (int i = 0; i < 8; i++)
        p[i] = (unsigned char)(w >> (8 * i));
}

void mg_test_stream_init(mg_test_stream_t *s)
{
    s->state = 42;
    s->word = 0;
    s->used = 8;
}

void mg_test_stream_fill(mg_test_stream_t *s, void *buf, size_t len)
{
    unsigned char *p = buf;

    /* Finish the current word, then whole words (the bulk of a large body), then a tail. */
    while (len > 0 && s->used < 8) {
        *p++ = (unsigned char)(s->word >> (8 * s->used++));
        len--;
    }
    while (len >= 8) {
        store_le64(p, next_word(s));
        p += 8;
        len -= 8;
    }
    if (len > 0) {
        s->word = next_word(s);
        s->used = 0;
        while (len > 0) {
            *p++ = (unsigned char)(s->word >> (8 * s->used++));
            len--;
        }
    }
}

int mg_test_stream_sha256_hex(uint64_t n, char hex[65])
{
    mg_test_sha256_t h;
    mg_test_stream_t s;
    unsigned char buf[65536];
    int err = mg_test_sha256_init(&h);
    if (err != 0)
        return err;
    mg_test_stream_init(&s);
    while (n > 0) {
        size_t k = n < sizeof buf ? (size_t)n : sizeof buf;
        mg_test_stream_fill(&s, buf, k);
        mg_test_sha256_update(&h, buf, k);
        n -= k;
    }
    mg_test_sha256_final_hex(&h, hex);
    return 0;
}

/* --- sha256 ---------------------------------------------------------------------------------- */

int mg_test_sha256_init(mg_test_sha256_t *h)
{
    EVP_MD_CTX *ctx = EVP_MD_CTX_new();
    if (ctx == NULL || EVP_DigestInit_ex(ctx, EVP_sha256(), NULL) != 1) {
        EVP_MD_CTX_free(ctx);
        h->ctx = NULL;
        return MG_ENOMEM;
    }
    h->ctx = ctx;
    return 0;
}

void mg_test_sha256_update(mg_test_sha256_t *h, const void *data, size_t len)
{
    EVP_DigestUpdate(h->ctx, data, len);
}

void mg_test_sha256_final_hex(mg_test_sha256_t *h, char hex[65])
{
    unsigned char md[32];
    unsigned int mdlen = 0;
    EVP_DigestFinal_ex(h->ctx, md, &mdlen);
    EVP_MD_CTX_free(h->ctx);
    h->ctx = NULL;
    for (unsigned i = 0; i < 32; i++)
        snprintf(hex + 2 * i, 3, "%02x", md[i]);
    hex[64] = '\0';
}

int mg_test_sha256_hex(const void *data, size_t len, char hex[65])
{
    mg_test_sha256_t h;
    int err = mg_test_sha256_init(&h);
    if (err != 0)
        return err;
    mg_test_sha256_update(&h, data, len);
    mg_test_sha256_final_hex(&h, hex);
    return 0;
}

/* --- Requests -------------------------------------------------------------------------------- */

int mg_test_http_request(char **out, size_t *out_len, const char *method, const char *path,
                         const char *extra_headers, const void *body, size_t body_len)
{
    char cl[64] = "";
    if (method == NULL || path == NULL || strpbrk(method, " \r\n") || strpbrk(path, " \r\n"))
        return MG_EINVAL;
    if (extra_headers == NULL)
        extra_headers = "";
    if (body != NULL)
        snprintf(cl, sizeof cl, "Content-Length: %zu\r\n", body_len);
    else
        body_len = 0;

    int head = snprintf(NULL, 0, "%s %s HTTP/1.1\r\nHost: 127.0.0.1\r\n%s%s\r\n", method, path,
                        extra_headers, cl);
    if (head < 0)
        return MG_EINVAL;
    char *buf = malloc((size_t)head + body_len + 1);
    if (buf == NULL)
        return MG_ENOMEM;
    snprintf(buf, (size_t)head + 1, "%s %s HTTP/1.1\r\nHost: 127.0.0.1\r\n%s%s\r\n", method, path,
             extra_headers, cl);
    if (body_len > 0)
        memcpy(buf + head, body, body_len);
    buf[(size_t)head + body_len] = '\0';
    *out = buf;
    *out_len = (size_t)head + body_len;
    return 0;
}

/* --- Responses ------------------------------------------------------------------------------- */

enum {
    ST_STATUS = 0,
    ST_HEADER,
    ST_BODY_LENGTH,
    ST_BODY_EOF,
    ST_CHUNK_SIZE,
    ST_CHUNK_DATA,
    ST_CHUNK_END,
    ST_TRAILER,
    ST_DONE,
};

void mg_test_http_response_init(mg_test_http_response_t *r)
{
    memset(r, 0, sizeof *r);
    r->content_length = -1;
}

void mg_test_http_response_free(mg_test_http_response_t *r)
{
    free(r->body);
    r->body = NULL;
    r->body_len = 0;
    r->body_cap_ = 0;
    if (r->sha_live_) {
        char hex[65];
        mg_test_sha256_final_hex(&r->sha_, hex);
        r->sha_live_ = false;
    }
}

const char *mg_test_http_response_header(const mg_test_http_response_t *r, const char *name)
{
    for (size_t i = 0; i < r->n_headers; i++) {
        if (strcasecmp(r->headers[i].name, name) == 0)
            return r->headers[i].value;
    }
    return NULL;
}

static void finish(mg_test_http_response_t *r)
{
    r->state_ = ST_DONE;
    r->complete = true;
    if (r->sha_live_) {
        mg_test_sha256_final_hex(&r->sha_, r->body_sha256);
        r->sha_live_ = false;
    }
}

static int deliver(mg_test_http_response_t *r, const char *data, size_t len)
{
    if (len == 0)
        return 0;
    if (r->body_received == 0)
        r->first_byte_ms = mg_test_now_ms();
    r->body_received += len;
    if (r->keep_body) {
        if (r->body_len + len + 1 > r->body_cap_) {
            size_t cap = r->body_cap_ ? r->body_cap_ : 4096;
            while (cap < r->body_len + len + 1)
                cap *= 2;
            char *nb = realloc(r->body, cap);
            if (nb == NULL)
                return MG_ENOMEM;
            r->body = nb;
            r->body_cap_ = cap;
        }
        memcpy(r->body + r->body_len, data, len);
        r->body_len += len;
        r->body[r->body_len] = '\0';
    }
    if (r->sha_live_)
        mg_test_sha256_update(&r->sha_, data, len);
    if (r->on_body)
        r->on_body(r->arg, data, len);
    return 0;
}

static int parse_status(mg_test_http_response_t *r, const char *line)
{
    int minor, status, off = 0;
    if (sscanf(line, "HTTP/1.%1d %3d%n", &minor, &status, &off) != 2 || status < 100 ||
        (line[off] != ' ' && line[off] != '\0'))
        return MG_EINVAL;
    r->minor_version = minor;
    r->status = status;
    snprintf(r->reason, sizeof r->reason, "%s", line[off] == ' ' ? line + off + 1 : "");
    return 0;
}

static int parse_header(mg_test_http_response_t *r, const char *line)
{
    const char *colon = strchr(line, ':');
    if (colon == NULL || colon == line || r->n_headers == MG_TEST_HTTP_MAX_HEADERS)
        return MG_EINVAL;
    size_t nlen = (size_t)(colon - line);
    const char *v = colon + 1;
    while (*v == ' ' || *v == '\t')
        v++;
    size_t vlen = strlen(v);
    while (vlen > 0 && (v[vlen - 1] == ' ' || v[vlen - 1] == '\t'))
        vlen--;
    mg_test_http_header_t *h = &r->headers[r->n_headers];
    if (nlen >= sizeof h->name || vlen >= sizeof h->value || memchr(line, ' ', nlen))
        return MG_EINVAL;
    memcpy(h->name, line, nlen);
    h->name[nlen] = '\0';
    memcpy(h->value, v, vlen);
    h->value[vlen] = '\0';
    r->n_headers++;

    if (strcasecmp(h->name, "Content-Length") == 0) {
        char *end;
        if (h->value[0] < '0' || h->value[0] > '9')
            return MG_EINVAL;
        errno = 0;
        long long n = strtoll(h->value, &end, 10);
        if (*end != '\0' || errno != 0 || (r->content_length >= 0 && r->content_length != n))
            return MG_EINVAL;
        r->content_length = n;
    } else if (strcasecmp(h->name, "Transfer-Encoding") == 0) {
        size_t n = strlen(h->value);
        r->chunked = n >= 7 && strcasecmp(h->value + n - 7, "chunked") == 0;
    }
    return 0;
}

/* The headers are complete: decide how the body is delimited. */
static int end_headers(mg_test_http_response_t *r)
{
    if (r->status < 200 && r->status != 101) {
        /* An interim response (100 Continue): the real one follows. */
        bool keep = r->keep_body, hash = r->hash_body, head = r->head_request;
        mg_test_http_body_cb cb = r->on_body;
        void *arg = r->arg;
        mg_test_http_response_init(r);
        r->keep_body = keep, r->hash_body = hash, r->head_request = head;
        r->on_body = cb, r->arg = arg;
        return 0;
    }
    r->headers_done = true;
    if (r->hash_body) {
        if (mg_test_sha256_init(&r->sha_) != 0)
            return MG_ENOMEM;
        r->sha_live_ = true;
    }
    if (r->head_request || r->status == 204 || r->status == 304) {
        finish(r);
    } else if (r->chunked) {
        r->state_ = ST_CHUNK_SIZE;
    } else if (r->content_length >= 0) {
        r->state_ = ST_BODY_LENGTH;
        if (r->content_length == 0)
            finish(r);
    } else {
        r->state_ = ST_BODY_EOF;
    }
    return 0;
}

/* A complete line (CR LF removed) in a line-oriented state. */
static int on_line(mg_test_http_response_t *r, const char *line)
{
    switch (r->state_) {
    case ST_STATUS:
        r->state_ = ST_HEADER;
        return parse_status(r, line);
    case ST_HEADER:
        return line[0] == '\0' ? end_headers(r) : parse_header(r, line);
    case ST_CHUNK_SIZE: {
        char *end;
        if (!((line[0] >= '0' && line[0] <= '9') || (line[0] >= 'a' && line[0] <= 'f') ||
              (line[0] >= 'A' && line[0] <= 'F')))
            return MG_EINVAL;
        errno = 0;
        unsigned long long n = strtoull(line, &end, 16);
        if (errno != 0 || (*end != '\0' && *end != ';' && *end != ' '))
            return MG_EINVAL;
        r->chunk_left_ = n;
        r->state_ = n == 0 ? ST_TRAILER : ST_CHUNK_DATA;
        return 0;
    }
    case ST_CHUNK_END:
        if (line[0] != '\0')
            return MG_EINVAL;
        r->chunks++;
        r->state_ = ST_CHUNK_SIZE;
        return 0;
    case ST_TRAILER:
        if (line[0] == '\0')
            finish(r);
        return 0;
    default:
        return MG_EINVAL;
    }
}

int mg_test_http_response_feed(mg_test_http_response_t *r, const char *data, size_t len,
                               size_t *consumed)
{
    size_t i = 0;
    int err = 0;

    while (i < len && r->state_ != ST_DONE) {
        switch (r->state_) {
        case ST_BODY_LENGTH: {
            uint64_t left = (uint64_t)r->content_length - r->body_received;
            size_t k = len - i < left ? len - i : (size_t)left;
            if ((err = deliver(r, data + i, k)) != 0)
                goto out;
            i += k;
            if (r->body_received == (uint64_t)r->content_length)
                finish(r);
            break;
        }
        case ST_BODY_EOF:
            if ((err = deliver(r, data + i, len - i)) != 0)
                goto out;
            i = len;
            break;
        case ST_CHUNK_DATA: {
            size_t k = len - i < r->chunk_left_ ? len - i : (size_t)r->chunk_left_;
            if ((err = deliver(r, data + i, k)) != 0)
                goto out;
            i += k;
            r->chunk_left_ -= k;
            if (r->chunk_left_ == 0)
                r->state_ = ST_CHUNK_END;
            break;
        }
        default: {
            /* Line-oriented states: gather up to LF. */
            char c = data[i++];
            if (c != '\n') {
                if (r->line_len_ + 1 >= sizeof r->line_) {
                    err = MG_EINVAL;
                    goto out;
                }
                r->line_[r->line_len_++] = c;
                break;
            }
            if (r->line_len_ > 0 && r->line_[r->line_len_ - 1] == '\r')
                r->line_len_--;
            r->line_[r->line_len_] = '\0';
            r->line_len_ = 0;
            if ((err = on_line(r, r->line_)) != 0)
                goto out;
            break;
        }
        }
    }
out:
    if (consumed)
        *consumed = i;
    return err;
}

int mg_test_http_response_eof(mg_test_http_response_t *r)
{
    if (r->state_ == ST_BODY_EOF)
        finish(r);
    return r->complete ? 0 : MG_ECLOSED;
}

/* --- A blocking client ----------------------------------------------------------------------- */

/* Waits for events on fd until the deadline. Returns 0, or MG_ETIMEDOUT. */
static int wait_fd(int fd, short events, double deadline)
{
    for (;;) {
        double left = deadline - mg_test_now_ms();
        if (left <= 0)
            return MG_ETIMEDOUT;
        struct pollfd pfd = { .fd = fd, .events = events };
        int n = poll(&pfd, 1, (int)left + 1);
        if (n > 0)
            return 0;
        if (n < 0 && errno != EINTR)
            return MG_ECLOSED;
    }
}

int mg_test_http_fetch(uint16_t port, const char *request, size_t request_len,
                       mg_test_http_response_t *r, int timeout_ms)
{
    double deadline = mg_test_now_ms() + timeout_ms;
    struct sockaddr_in sa = { .sin_family = AF_INET, .sin_port = htons(port),
                              .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
    int one = 1, err = 0, soerr = 0;
    socklen_t slen = sizeof soerr;
    char buf[65536];

    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return MG_ECONNECT;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (connect(fd, (struct sockaddr *)&sa, sizeof sa) != 0) {
        if (errno != EINPROGRESS) {
            err = MG_ECONNECT;
            goto out;
        }
        if ((err = wait_fd(fd, POLLOUT, deadline)) != 0)
            goto out;
        if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &soerr, &slen) != 0 || soerr != 0) {
            err = MG_ECONNECT;
            goto out;
        }
    }
    for (size_t sent = 0; sent < request_len;) {
        ssize_t w = send(fd, request + sent, request_len - sent, MSG_NOSIGNAL);
        if (w > 0) {
            sent += (size_t)w;
        } else if (w < 0 && (errno == EAGAIN || errno == EINTR)) {
            if ((err = wait_fd(fd, POLLOUT, deadline)) != 0)
                goto out;
        } else {
            err = MG_ECLOSED;
            goto out;
        }
    }
    while (!r->complete) {
        ssize_t n = recv(fd, buf, sizeof buf, 0);
        if (n > 0) {
            if ((err = mg_test_http_response_feed(r, buf, (size_t)n, NULL)) != 0)
                goto out;
        } else if (n == 0) {
            err = mg_test_http_response_eof(r);
            goto out;
        } else if (errno == EAGAIN || errno == EINTR) {
            if ((err = wait_fd(fd, POLLIN, deadline)) != 0)
                goto out;
        } else {
            err = MG_ECLOSED;
            goto out;
        }
    }
out:
    close(fd);
    return err;
}
