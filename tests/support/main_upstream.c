/*
 * mg-upstream: the HTTP/1.1 server that stands in for an LLM server in tests and benchmarks.
 *
 *   mg-upstream [-l 127.0.0.1:PORT] [--port-file FILE] [--capture DIR]
 *
 * --capture DIR: every byte each connection receives is appended, as it arrives, to DIR/N.raw
 * (N: the connection's number, from 1), so that a test sees exactly what reached the upstream.
 *
 * PORT 0 (the default) picks a free port; once listening it writes the port to FILE (atomically,
 * through a rename) and prints "listening 127.0.0.1:PORT" on stdout. SIGTERM or SIGINT closes
 * everything and exits 0.
 *
 *   GET  /bytes/N   N bytes of the deterministic stream of http_client.h, with Content-Length
 *   GET  /stream?chunks=N&interval_ms=M&size=S&cut_after=K
 *                   chunked; N lines {"i":I,"t_ms":T,"pad":"xx.."}\n, one every M ms (the first at
 *                   once), S bytes of pad; T is this server's send time in ms since it started.
 *                   With K > 0: after K lines the connection ends (FIN, no final chunk), as an
 *                   upstream that dies mid-response
 *   POST /echo      the request body back with Content-Length and the request's Content-Type
 *                   (else application/octet-stream): a Content-Length body streams straight
 *                   back; a chunked one is gathered first (up to 64 MB, else 413)
 *   POST /api/generate, /api/chat, /v1/chat/completions, /v1/completions
 *                   a fake Ollama and OpenAI-compatible server (llm_fake.h): NDJSON or SSE
 *                   streams, one piece every interval_ms, with real-looking final usage records
 *   GET  /stats     JSON counters (see send_stats())
 *   anything else   200 "hello\n"
 *
 * HTTP/1.1 keep-alive by default, HTTP/1.0 only on request, Connection: close honoured; HEAD gets
 * the headers only; Expect: 100-continue is answered. Request heads go through the strict parser
 * of http_parse.h: anything outside it gets a 400 and the connection closes.
 *
 * Single-threaded on libuv. Each connection owns NSLOTS write buffers of SLOT_SIZE bytes; a
 * response is produced only into a free one and the next piece waits for a write to complete, so
 * a connection never has more than NSLOTS * SLOT_SIZE bytes outstanding however large the body
 * (backpressure), and nothing is allocated per request (but a chunked /echo body). Requests on a
 * connection are answered in order; a pipelined request waits in the input buffer until the
 * previous response is queued, and reading stops while that buffer is full.
 *
 * A peer that closes (EOF or reset) while a response is still being produced or written counts as
 * an aborted response in /stats; that is how a test sees that the client went away mid-stream.
 */
#define _GNU_SOURCE
#include "http_client.h"
#include "http_parse.h"
#include "llm_fake.h"

#include "moongate/error.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <uv.h>

#define SLOT_SIZE 65536
#define NSLOTS 4
#define IN_CAP 65536
#define HEAD_MAX 16384
#define ECHO_BUFFER_MAX (64u << 20)  /* a chunked /echo body is gathered whole, up to this */
#define BYTES_MAX (1ull << 40)
#define STREAM_PAD_MAX 60000

typedef struct server server_t;
typedef struct conn conn_t;

typedef struct slot {
    uv_write_t req;
    conn_t *conn;
    char *buf;    /* SLOT_SIZE bytes, allocated on first use, kept until the connection closes */
    size_t len;
    bool busy;    /* a write of buf is in flight */
} slot_t;

enum conn_state {
    CS_HEAD,     /* waiting for a request head */
    CS_BODY,     /* consuming a request body */
    CS_RESPOND,  /* producing a response body from a source (bytes, buffer, stream timer) */
    CS_DEAD,     /* an error response was sent; nothing more is read */
};

enum route { R_HELLO, R_STATS, R_BYTES, R_STREAM, R_ECHO, R_LLM };

struct conn {
    uv_tcp_t tcp;
    uv_timer_t timer;
    uv_shutdown_t shutdown_req;
    server_t *srv;
    conn_t *prev, *next;
    int handles_open;

    char *in;               /* IN_CAP bytes; unconsumed input is in[in_off, in_len) */
    size_t in_off, in_len;
    slot_t slots[NSLOTS];
    slot_t *cur;            /* the slot being filled, not yet written */
    int writes_pending;

    enum conn_state state;
    bool reading, eof, closing, finishing, close_after, responding, aborted;
    int capture_fd;         /* --capture: DIR/N.raw; -1 without */

    /* The request. */
    enum route route;
    bool keep_alive, head_only, req_chunked;
    uint64_t body_left;       /* Content-Length body bytes still to read */
    mg_test_chunked_t chunked;

    /* The response source. */
    mg_test_stream_t gen;     /* R_BYTES */
    uint64_t out_left;
    char *ebuf;               /* R_ECHO with a chunked body: the gathered body */
    size_t elen, ecap, eoff;
    unsigned st_total, st_sent, st_size;  /* R_STREAM */
    unsigned st_cut;                      /* R_STREAM: end the connection after this many */
    uint64_t st_interval;
    bool st_due;
    char ctype[128];          /* R_ECHO: the request's Content-Type */
    mg_test_llm_t llm;        /* R_LLM */
    char llm_query[512];
    char *lp;                 /* R_LLM streaming: the piece being sent, from lp_off */
    size_t lp_len, lp_off;
    bool llm_ended;
};

struct server {
    uv_loop_t *loop;
    uv_tcp_t listener;
    uv_signal_t sigterm, sigint;
    conn_t *conns;
    uint64_t start_ns;
    uint64_t accepted, closed, requests, aborted;
    const char *capture_dir;
};

static void conn_process(conn_t *c);
static void conn_close(conn_t *c);
static void pump(conn_t *c);

/* --- Connection plumbing --------------------------------------------------------------------- */

static void on_handle_closed(uv_handle_t *h)
{
    conn_t *c = h->data;
    if (--c->handles_open > 0)
        return;
    for (int i = 0; i < NSLOTS; i++)
        free(c->slots[i].buf);
    if (c->capture_fd >= 0)
        close(c->capture_fd);
    free(c->in);
    free(c->ebuf);
    free(c->lp);
    free(c);
}

/* Counts an aborted response once, if the peer left while one was being produced or written. */
static void note_abort(conn_t *c)
{
    if (!c->aborted && (c->responding || c->writes_pending > 0)) {
        c->aborted = true;
        c->srv->aborted++;
    }
}

static void conn_close(conn_t *c)
{
    if (c->closing)
        return;
    c->closing = true;
    c->srv->closed++;
    if (c->prev)
        c->prev->next = c->next;
    else
        c->srv->conns = c->next;
    if (c->next)
        c->next->prev = c->prev;
    uv_close((uv_handle_t *)&c->timer, on_handle_closed);
    uv_close((uv_handle_t *)&c->tcp, on_handle_closed);
}

static void on_shutdown(uv_shutdown_t *req, int status)
{
    conn_close(req->data);
}

/* Ends a connection whose last response is queued: FIN after the data, then close. */
static void conn_finish(conn_t *c)
{
    if (c->closing || c->finishing)
        return;
    c->finishing = true;
    uv_read_stop((uv_stream_t *)&c->tcp);
    c->reading = false;
    c->shutdown_req.data = c;
    if (uv_shutdown(&c->shutdown_req, (uv_stream_t *)&c->tcp, on_shutdown) != 0)
        conn_close(c);
}

static void on_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *buf)
{
    conn_t *c = h->data;
    if (c->in_off == c->in_len) {
        c->in_off = c->in_len = 0;
    } else if (c->in_off > 0 && IN_CAP - c->in_len < IN_CAP / 4) {
        memmove(c->in, c->in + c->in_off, c->in_len - c->in_off);
        c->in_len -= c->in_off;
        c->in_off = 0;
    }
    *buf = uv_buf_init(c->in + c->in_len, (unsigned)(IN_CAP - c->in_len));
}

static void on_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf);

/* Reads while there is room for input and someone to use it; a full buffer is backpressure. */
static void update_reading(conn_t *c)
{
    bool want = !c->closing && !c->eof && c->state != CS_DEAD && !c->close_after &&
                (c->in_len < IN_CAP || c->in_off > 0);
    if (want && !c->reading)
        c->reading = uv_read_start((uv_stream_t *)&c->tcp, on_alloc, on_read) == 0;
    else if (!want && c->reading) {
        uv_read_stop((uv_stream_t *)&c->tcp);
        c->reading = false;
    }
}

static void on_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf)
{
    conn_t *c = s->data;
    if (nread == UV_ENOBUFS) {
        uv_read_stop(s);
        c->reading = false;
        return;
    }
    if (nread < 0) {
        c->eof = true;
        note_abort(c);
        if (c->responding || nread != UV_EOF || c->writes_pending == 0)
            conn_close(c);
        else
            conn_finish(c);
        return;
    }
    if (c->capture_fd >= 0 && write(c->capture_fd, buf->base, (size_t)nread) != nread)
        fprintf(stderr, "mg-upstream: capture: %s\n", strerror(errno));
    c->in_len += (size_t)nread;
    conn_process(c);
    if (!c->closing)
        update_reading(c);
}

/* The slot being filled, or a free one (allocated on first use); NULL if all are in flight. */
static slot_t *slot_get(conn_t *c)
{
    if (c->cur)
        return c->cur;
    for (int i = 0; i < NSLOTS; i++) {
        slot_t *s = &c->slots[i];
        if (s->busy)
            continue;
        if (s->buf == NULL && (s->buf = malloc(SLOT_SIZE)) == NULL)
            return NULL;
        s->conn = c;
        s->len = 0;
        s->req.data = s;
        c->cur = s;
        return s;
    }
    return NULL;
}

static void on_write(uv_write_t *req, int status)
{
    slot_t *s = req->data;
    conn_t *c = s->conn;
    s->busy = false;
    s->len = 0;
    c->writes_pending--;
    if (c->closing)
        return;
    if (status < 0) {
        note_abort(c);
        conn_close(c);
        return;
    }
    if (c->state == CS_RESPOND)
        pump(c);
    if (!c->closing)
        conn_process(c);
    if (c->closing)
        return;
    if ((c->close_after || c->state == CS_DEAD || c->eof) && !c->responding &&
        c->writes_pending == 0 && c->cur == NULL)
        conn_finish(c);
    else
        update_reading(c);
}

/* Writes the slot being filled, if it holds anything. */
static void slot_flush(conn_t *c)
{
    slot_t *s = c->cur;
    if (s == NULL || s->len == 0)
        return;
    c->cur = NULL;
    uv_buf_t b = uv_buf_init(s->buf, (unsigned)s->len);
    s->busy = true;
    c->writes_pending++;
    if (uv_write(&s->req, (uv_stream_t *)&c->tcp, &b, 1, on_write) != 0) {
        s->busy = false;
        c->writes_pending--;
        note_abort(c);
        conn_close(c);
    }
}

/* Appends formatted text to the current slot. The callers keep it well under SLOT_SIZE. */
__attribute__((format(printf, 2, 3)))
static void slot_printf(conn_t *c, const char *fmt, ...)
{
    slot_t *s = c->cur;
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(s->buf + s->len, SLOT_SIZE - s->len, fmt, ap);
    va_end(ap);
    if (n > 0)
        s->len += (size_t)n < SLOT_SIZE - s->len ? (size_t)n : SLOT_SIZE - s->len - 1;
}

/* The last byte of the response is queued: count it and get ready for the next request. */
static void end_response(conn_t *c)
{
    slot_flush(c);
    if (c->closing)
        return;
    c->responding = false;
    c->srv->requests++;
    uv_timer_stop(&c->timer);
    free(c->ebuf);
    c->ebuf = NULL;
    c->elen = c->ecap = c->eoff = 0;
    free(c->lp);
    c->lp = NULL;
    c->lp_len = c->lp_off = 0;
    c->state = CS_HEAD;
    if (!c->keep_alive)
        c->close_after = true;
    if (c->close_after && c->writes_pending == 0)
        conn_finish(c);
}

/* Answers a malformed request and closes; nothing more is read from this connection. */
static void send_error(conn_t *c, int code, const char *reason)
{
    c->state = CS_DEAD;
    c->responding = false;
    c->keep_alive = false;
    if (slot_get(c) == NULL) {
        conn_close(c);
        return;
    }
    slot_printf(c, "HTTP/1.1 %d %s\r\nContent-Type: text/plain\r\nContent-Length: %zu\r\n"
                   "Connection: close\r\n\r\n%s\n", code, reason, strlen(reason) + 1, reason);
    slot_flush(c);
    if (!c->closing && c->writes_pending == 0)
        conn_finish(c);
}

/* --- Responses ------------------------------------------------------------------------------- */

static const char *conn_header(const conn_t *c)
{
    return c->keep_alive ? "" : "Connection: close\r\n";
}

static void send_small(conn_t *c, const char *type, const char *body, size_t len)
{
    slot_printf(c, "HTTP/1.1 200 OK\r\nContent-Type: %s\r\nContent-Length: %zu\r\n%s\r\n", type,
                len, conn_header(c));
    if (!c->head_only) {
        memcpy(c->cur->buf + c->cur->len, body, len);
        c->cur->len += len;
    }
    end_response(c);
}

static void send_stats(conn_t *c)
{
    server_t *srv = c->srv;
    char body[512];
    int n = snprintf(body, sizeof body,
                     "{\"connections_accepted\":%" PRIu64 ",\"connections_closed\":%" PRIu64
                     ",\"connections_open\":%" PRIu64 ",\"requests_served\":%" PRIu64
                     ",\"aborted_responses\":%" PRIu64 "}\n",
                     srv->accepted, srv->closed, srv->accepted - srv->closed, srv->requests,
                     srv->aborted);
    send_small(c, "application/json", body, (size_t)n);
}

/* Writes one /stream line as one chunk into the current slot. */
static void stream_chunk(conn_t *c)
{
    char head[128];
    double t_ms = (double)(uv_hrtime() - c->srv->start_ns) / 1e6;
    int n = snprintf(head, sizeof head, "{\"i\":%u,\"t_ms\":%.3f,\"pad\":\"", c->st_sent, t_ms);
    size_t line = (size_t)n + c->st_size + 3;
    slot_t *s = c->cur;
    slot_printf(c, "%zx\r\n%s", line, head);
    memset(s->buf + s->len, 'x', c->st_size);
    s->len += c->st_size;
    memcpy(s->buf + s->len, "\"}\n\r\n", 5);
    s->len += 5;
    c->st_sent++;
}

/*
 * Produces the response body from its source while a slot is free; called again when a write
 * completes (and by the /stream timer), which is the backpressure.
 */
static void pump_llm(conn_t *c);
static void on_stream_tick(uv_timer_t *t);

static void pump(conn_t *c)
{
    if (c->route == R_LLM && c->llm.stream) {
        pump_llm(c);
        return;
    }
    if (c->route == R_STREAM) {
        if (c->finishing)
            return;
        while (c->st_sent < c->st_total && (c->st_due || c->st_interval == 0)) {
            if (slot_get(c) == NULL)
                return;
            c->st_due = false;
            stream_chunk(c);
            if (c->st_cut > 0 && c->st_sent == c->st_cut) {
                slot_flush(c);
                conn_finish(c);
                return;
            }
            if (c->st_sent == c->st_total)
                slot_printf(c, "0\r\n\r\n");
            slot_flush(c);
            if (c->closing)
                return;
        }
        if (c->st_sent == c->st_total)
            end_response(c);
        return;
    }
    while (c->out_left > 0) {
        slot_t *s = slot_get(c);
        if (s == NULL)
            return;
        size_t k = SLOT_SIZE - s->len;
        if (k > c->out_left)
            k = (size_t)c->out_left;
        if (c->route == R_BYTES) {
            mg_test_stream_fill(&c->gen, s->buf + s->len, k);
        } else {
            memcpy(s->buf + s->len, c->ebuf + c->eoff, k);
            c->eoff += k;
        }
        s->len += k;
        c->out_left -= k;
        slot_flush(c);
        if (c->closing)
            return;
    }
    end_response(c);
}

/* A streamed LLM answer: each piece as chunks, the next when it is due and a slot is free. */
static void pump_llm(conn_t *c)
{
    for (;;) {
        if (c->lp_off == c->lp_len) {
            if (c->llm_ended) {
                if (slot_get(c) == NULL)
                    return;
                slot_printf(c, "0\r\n\r\n");
                end_response(c);
                return;
            }
            if (!c->st_due && c->st_interval > 0)
                return;
            c->st_due = false;
            c->lp_len = mg_test_llm_next(&c->llm, c->lp, mg_test_llm_piece_max(&c->llm));
            c->lp_off = 0;
            if (c->lp_len == 0) {
                c->llm_ended = true;
                uv_timer_stop(&c->timer);
            }
            continue;
        }
        slot_t *s = slot_get(c);
        if (s == NULL)
            return;
        if (SLOT_SIZE - s->len < 64) {
            slot_flush(c);
            continue;
        }
        size_t k = SLOT_SIZE - s->len - 32;
        if (k > c->lp_len - c->lp_off)
            k = c->lp_len - c->lp_off;
        slot_printf(c, "%zx\r\n", k);
        memcpy(s->buf + s->len, c->lp + c->lp_off, k);
        s->len += k;
        memcpy(s->buf + s->len, "\r\n", 2);
        s->len += 2;
        c->lp_off += k;
        if (c->lp_off == c->lp_len)
            slot_flush(c); /* each piece leaves at once, as a server's token would */
        if (c->closing)
            return;
    }
}

static void llm_respond(conn_t *c);

static void on_llm_delay(uv_timer_t *t)
{
    conn_t *c = t->data;
    if (slot_get(c) == NULL) {
        conn_close(c);
        return;
    }
    llm_respond(c);
    if (!c->closing)
        update_reading(c);
}

/* Starts the answer of the fake LLM server to the body gathered in ebuf. */
static void start_llm(conn_t *c, mg_test_llm_api_t api)
{
    if (mg_test_llm_start(&c->llm, api, c->llm_query, c->ebuf, c->elen) != 0) {
        send_error(c, 400, "Bad Request");
        return;
    }
    if (c->llm.delay_ms > 0) {
        c->state = CS_RESPOND;
        c->responding = true;
        uv_timer_start(&c->timer, on_llm_delay, c->llm.delay_ms, 0);
        return;
    }
    llm_respond(c);
}

static void llm_respond(conn_t *c)
{
    free(c->ebuf);
    c->ebuf = NULL;
    c->elen = c->ecap = c->eoff = 0;
    size_t cap = mg_test_llm_piece_max(&c->llm);
    char *buf = malloc(cap);
    if (buf == NULL) {
        send_error(c, 500, "Internal Server Error");
        return;
    }
    const char *type = mg_test_llm_content_type(&c->llm);
    if (!c->llm.stream) {
        c->ebuf = buf;
        c->elen = mg_test_llm_next(&c->llm, buf, cap);
        slot_printf(c, "HTTP/1.1 200 OK\r\nContent-Type: %s\r\nContent-Length: %zu\r\n%s\r\n",
                    type, c->elen, conn_header(c));
        c->out_left = c->head_only ? 0 : c->elen;
        c->state = CS_RESPOND;
        pump(c);
        return;
    }
    c->lp = buf;
    c->lp_len = c->lp_off = 0;
    c->llm_ended = false;
    slot_printf(c, "HTTP/1.1 200 OK\r\nContent-Type: %s\r\nCache-Control: no-cache\r\n"
                   "Transfer-Encoding: chunked\r\n%s\r\n", type, conn_header(c));
    if (c->head_only) {
        end_response(c);
        return;
    }
    c->state = CS_RESPOND;
    c->responding = true;
    c->st_interval = c->llm.interval_ms;
    c->st_due = true;
    if (c->st_interval > 0)
        uv_timer_start(&c->timer, on_stream_tick, c->st_interval, c->st_interval);
    pump(c);
}

static void on_stream_tick(uv_timer_t *t)
{
    conn_t *c = t->data;
    c->st_due = true;
    pump(c);
    if (!c->closing)
        update_reading(c);
}

static unsigned query_uint(const char *query, const char *key, unsigned dflt, unsigned max)
{
    size_t klen = strlen(key);
    for (const char *p = query; p && *p; p = strchr(p, '&'), p = p ? p + 1 : NULL) {
        if (strncmp(p, key, klen) == 0 && p[klen] == '=') {
            unsigned long v = strtoul(p + klen + 1, NULL, 10);
            return v > max ? max : (unsigned)v;
        }
    }
    return dflt;
}

static void start_stream(conn_t *c, const char *query)
{
    c->st_total = query_uint(query, "chunks", 10, 10000000);
    c->st_interval = query_uint(query, "interval_ms", 100, 600000);
    c->st_size = query_uint(query, "size", 16, STREAM_PAD_MAX);
    c->st_cut = query_uint(query, "cut_after", 0, 10000000);
    c->st_sent = 0;
    c->st_due = true;
    slot_printf(c, "HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\n"
                   "Transfer-Encoding: chunked\r\n%s\r\n", conn_header(c));
    if (c->head_only || c->st_total == 0) {
        if (!c->head_only)
            slot_printf(c, "0\r\n\r\n");
        end_response(c);
        return;
    }
    c->state = CS_RESPOND;
    c->responding = true;
    if (c->st_interval > 0 && c->st_total > 1)
        uv_timer_start(&c->timer, on_stream_tick, c->st_interval, c->st_interval);
    pump(c);
}

static void start_bytes(conn_t *c)
{
    slot_printf(c, "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
                   "Content-Length: %" PRIu64 "\r\n%s\r\n", c->out_left, conn_header(c));
    if (c->head_only) {
        end_response(c);
        return;
    }
    mg_test_stream_init(&c->gen);
    c->state = CS_RESPOND;
    pump(c);
}

/* --- Requests -------------------------------------------------------------------------------- */

/* Parses the head in p[0, len) (which ends with CRLF CRLF) and starts the response. */
static void handle_head(conn_t *c, char *p, size_t len)
{
    mg_test_http_head_t h;
    uint64_t nbytes = 0;

    if (mg_test_http_parse_head(p, len, &h) != 0)
        goto bad;
    c->keep_alive = h.keep_alive;
    c->head_only = h.is_head;
    c->req_chunked = h.chunked;
    c->body_left = h.content_length;
    mg_test_chunked_init(&c->chunked);
    c->responding = true;

    /* Route on the path; the query matters only to /stream. */
    if (strncmp(h.path, "/bytes/", 7) == 0) {
        char *e;
        if (h.path[7] < '0' || h.path[7] > '9')
            goto bad;
        errno = 0;
        unsigned long long v = strtoull(h.path + 7, &e, 10);
        if (*e != '\0' || errno != 0 || v > BYTES_MAX)
            goto bad;
        nbytes = v;
        c->route = R_BYTES;
    } else if (strcmp(h.path, "/stream") == 0) {
        c->route = R_STREAM;
    } else if (strcmp(h.path, "/echo") == 0) {
        c->route = R_ECHO;
    } else if (strcmp(h.path, "/stats") == 0) {
        c->route = R_STATS;
    } else if (mg_test_llm_route(h.path) != MG_TEST_LLM_NONE) {
        c->route = R_LLM;
        c->llm.api = mg_test_llm_route(h.path);
        snprintf(c->llm_query, sizeof(c->llm_query), "%s", h.query ? h.query : "");
    } else {
        c->route = R_HELLO;
    }
    c->out_left = nbytes;
    snprintf(c->ctype, sizeof(c->ctype), "%.*s",
             h.content_type ? (int)(h.content_type_len < 127 ? h.content_type_len : 127) : 0,
             h.content_type ? h.content_type : "");

    /* curl waits a second for this before it sends a body of more than 1 KB. */
    if (h.expect_continue && (h.chunked || h.content_length > 0))
        slot_printf(c, "HTTP/1.1 100 Continue\r\n\r\n");

    if (c->route == R_ECHO && !h.chunked) {
        /* Content-Length is known up front: stream the body straight back. */
        slot_printf(c, "HTTP/1.1 200 OK\r\nContent-Type: %s\r\n"
                       "Content-Length: %" PRIu64 "\r\n%s\r\n",
                    c->ctype[0] ? c->ctype : "application/octet-stream", h.content_length,
                    conn_header(c));
        c->state = CS_BODY;
        return;
    }
    if (h.chunked || h.content_length > 0) {
        /* Read (and gather, for /echo) the body first; the response starts when it ends. */
        slot_flush(c);
        c->state = CS_BODY;
        return;
    }
    switch (c->route) {
    case R_HELLO:
        send_small(c, "text/plain", "hello\n", 6);
        return;
    case R_STATS:
        send_stats(c);
        return;
    case R_STREAM:
        start_stream(c, h.query ? h.query : "");
        return;
    case R_BYTES:
        start_bytes(c);
        return;
    case R_ECHO:
        break;  /* went through the Content-Length branch above */
    case R_LLM:
        start_llm(c, c->llm.api);
        return;
    }
    return;
bad:
    send_error(c, 400, "Bad Request");
}

/* A piece of chunked request body: gathered for /echo, else dropped. False on overflow. */
static bool body_data(conn_t *c, const char *p, size_t n)
{
    if ((c->route != R_ECHO && c->route != R_LLM) || n == 0)
        return true;
    if (c->elen + n > ECHO_BUFFER_MAX)
        return false;
    if (c->elen + n > c->ecap) {
        size_t cap = c->ecap ? c->ecap : 65536;
        while (cap < c->elen + n)
            cap *= 2;
        char *nb = realloc(c->ebuf, cap);
        if (nb == NULL)
            return false;
        c->ebuf = nb;
        c->ecap = cap;
    }
    memcpy(c->ebuf + c->elen, p, n);
    c->elen += n;
    return true;
}

/* The request body has been read: now respond (except /echo with Content-Length, already done). */
static void body_done(conn_t *c)
{
    if (c->route == R_ECHO && !c->req_chunked) {
        end_response(c);
        return;
    }
    if (c->route == R_LLM) {
        start_llm(c, c->llm.api);
    } else if (c->route == R_ECHO) {
        slot_printf(c, "HTTP/1.1 200 OK\r\nContent-Type: %s\r\n"
                       "Content-Length: %zu\r\n%s\r\n",
                    c->ctype[0] ? c->ctype : "application/octet-stream", c->elen,
                    conn_header(c));
        c->out_left = c->elen;
        c->eoff = 0;
        c->state = CS_RESPOND;
        pump(c);
    } else if (c->route == R_BYTES) {
        start_bytes(c);
    } else if (c->route == R_STATS) {
        send_stats(c);
    } else if (c->route == R_STREAM) {
        start_stream(c, "");
    } else {
        send_small(c, "text/plain", "hello\n", 6);
    }
}

/*
 * Consumes request body from the input buffer. Returns 1 when the body is complete, 0 when it
 * needs more input or a free slot, -1 after an error response.
 */
static int body_step(conn_t *c)
{
    bool echo_stream = c->route == R_ECHO && !c->req_chunked;
    int r = 0;
    for (;;) {
        char *p = c->in + c->in_off;
        size_t avail = c->in_len - c->in_off;
        if (c->req_chunked) {
            const char *data;
            size_t used, n;
            r = mg_test_chunked_step(&c->chunked, p, avail, &used, &data, &n);
            if (r == MG_EAGAIN)
                return 0;
            if (r < 0) {
                send_error(c, 400, "Bad Request");
                return -1;
            }
            if (!body_data(c, data, n)) {
                send_error(c, 413, "Content Too Large");
                return -1;
            }
            c->in_off += used;
            if (r == 1)
                return 1;
            continue;
        }
        if (c->body_left == 0)
            return 1;
        if (avail == 0)
            break;
        size_t k = avail < c->body_left ? avail : (size_t)c->body_left;
        if (c->route == R_LLM && !body_data(c, p, k)) {
            send_error(c, 413, "Content Too Large");
            return -1;
        }
        if (echo_stream) {
            slot_t *s = slot_get(c);
            if (s == NULL)
                return 0;
            if (k > SLOT_SIZE - s->len)
                k = SLOT_SIZE - s->len;
            memcpy(s->buf + s->len, p, k);
            s->len += k;
            if (s->len == SLOT_SIZE)
                slot_flush(c);
        }
        c->in_off += k;
        c->body_left -= k;
    }
    /* Send what has been echoed so far rather than sit on it waiting for more input. */
    if (echo_stream)
        slot_flush(c);
    return 0;
}

/* Runs the connection's request state machine as far as input and free slots allow. */
static void conn_process(conn_t *c)
{
    while (!c->closing) {
        if (c->state == CS_HEAD) {
            if (c->close_after || c->in_off == c->in_len)
                return;
            char *p = c->in + c->in_off;
            size_t avail = c->in_len - c->in_off;
            char *end = memmem(p, avail, "\r\n\r\n", 4);
            if (end == NULL) {
                if (avail >= HEAD_MAX)
                    send_error(c, 431, "Request Header Fields Too Large");
                return;
            }
            if (slot_get(c) == NULL)
                return;  /* a write completes first and calls back */
            size_t hlen = (size_t)(end - p) + 4;
            if (hlen > HEAD_MAX) {
                send_error(c, 431, "Request Header Fields Too Large");
                return;
            }
            c->in_off += hlen;
            handle_head(c, p, hlen);
        } else if (c->state == CS_BODY) {
            if (body_step(c) <= 0)
                return;
            /* Every response but a streamed echo starts now, and needs a slot for its head. */
            if (!(c->route == R_ECHO && !c->req_chunked) && slot_get(c) == NULL)
                return;
            body_done(c);
        } else {
            return;
        }
    }
}

/* --- Server ---------------------------------------------------------------------------------- */

static void on_connection(uv_stream_t *listener, int status)
{
    server_t *srv = listener->data;
    if (status < 0)
        return;
    conn_t *c = calloc(1, sizeof *c);
    if (c == NULL || (c->in = malloc(IN_CAP)) == NULL) {
        free(c);
        return;
    }
    c->srv = srv;
    uv_tcp_init(srv->loop, &c->tcp);
    uv_timer_init(srv->loop, &c->timer);
    c->tcp.data = c;
    c->timer.data = c;
    c->handles_open = 2;
    c->capture_fd = -1;
    if (srv->capture_dir) {
        char path[4096];
        snprintf(path, sizeof path, "%s/%llu.raw", srv->capture_dir,
                 (unsigned long long)srv->accepted + 1);
        c->capture_fd = open(path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0600);
    }
    c->next = srv->conns;
    if (srv->conns)
        srv->conns->prev = c;
    srv->conns = c;
    srv->accepted++;
    if (uv_accept(listener, (uv_stream_t *)&c->tcp) != 0) {
        conn_close(c);
        return;
    }
    uv_tcp_nodelay(&c->tcp, 1);
    update_reading(c);
}

static void on_signal(uv_signal_t *sig, int signum)
{
    server_t *srv = sig->data;
    while (srv->conns)
        conn_close(srv->conns);
    uv_close((uv_handle_t *)&srv->listener, NULL);
    uv_close((uv_handle_t *)&srv->sigterm, NULL);
    uv_close((uv_handle_t *)&srv->sigint, NULL);
}

static int write_port_file(const char *path, int port)
{
    char tmp[4096], text[16];
    int n = snprintf(text, sizeof text, "%d\n", port);
    if (snprintf(tmp, sizeof tmp, "%s.tmp", path) >= (int)sizeof tmp)
        return -1;
    FILE *f = fopen(tmp, "w");
    if (f == NULL)
        return -1;
    bool ok = fwrite(text, 1, (size_t)n, f) == (size_t)n;
    ok = fclose(f) == 0 && ok;
    /* The rename makes the port appear whole to a reader polling for the file. */
    return ok && rename(tmp, path) == 0 ? 0 : -1;
}

static void usage(void)
{
    fprintf(stderr, "usage: mg-upstream [-l 127.0.0.1:PORT] [--port-file FILE] [--capture DIR]\n");
    exit(2);
}

int main(int argc, char **argv)
{
    const char *listen_on = "127.0.0.1:0", *port_file = NULL;
    char host[64];
    int port, err;
    server_t srv = { 0 };

    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "-l") == 0 && i + 1 < argc)
            listen_on = argv[++i];
        else if (strcmp(argv[i], "--port-file") == 0 && i + 1 < argc)
            port_file = argv[++i];
        else if (strcmp(argv[i], "--capture") == 0 && i + 1 < argc)
            srv.capture_dir = argv[++i];
        else
            usage();
    }
    const char *colon = strrchr(listen_on, ':');
    if (colon == NULL || (size_t)(colon - listen_on) >= sizeof host)
        usage();
    memcpy(host, listen_on, (size_t)(colon - listen_on));
    host[colon - listen_on] = '\0';
    port = atoi(colon + 1);

    signal(SIGPIPE, SIG_IGN);
    srv.loop = uv_default_loop();
    srv.start_ns = uv_hrtime();
    struct sockaddr_in sa;
    if ((err = uv_ip4_addr(host, port, &sa)) != 0) {
        fprintf(stderr, "mg-upstream: bad address %s: %s\n", listen_on, uv_strerror(err));
        return 2;
    }
    uv_tcp_init(srv.loop, &srv.listener);
    srv.listener.data = &srv;
    if ((err = uv_tcp_bind(&srv.listener, (struct sockaddr *)&sa, 0)) != 0 ||
        (err = uv_listen((uv_stream_t *)&srv.listener, 1024, on_connection)) != 0) {
        fprintf(stderr, "mg-upstream: cannot listen on %s: %s\n", listen_on, uv_strerror(err));
        return 1;
    }
    int len = sizeof sa;
    uv_tcp_getsockname(&srv.listener, (struct sockaddr *)&sa, &len);
    port = ntohs(sa.sin_port);

    uv_signal_init(srv.loop, &srv.sigterm);
    uv_signal_init(srv.loop, &srv.sigint);
    srv.sigterm.data = srv.sigint.data = &srv;
    uv_signal_start(&srv.sigterm, on_signal, SIGTERM);
    uv_signal_start(&srv.sigint, on_signal, SIGINT);

    if (port_file && write_port_file(port_file, port) != 0) {
        fprintf(stderr, "mg-upstream: cannot write %s\n", port_file);
        return 1;
    }
    printf("listening %s:%d\n", host, port);
    fflush(stdout);

    uv_run(srv.loop, UV_RUN_DEFAULT);
    uv_loop_close(srv.loop);
    return 0;
}
