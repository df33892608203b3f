/*
 * server: client connections, HTTP/1.1 framing, TLS, deadlines. See server.h.
 *
 * A connection (mg_client_t) reads into the server's one read buffer and parses what it got at
 * once; only bytes it cannot use yet (a pipelined request, a body the handler is not ready for)
 * are kept in its own bounded buffer, and reading stops while that is full. Output is gathered
 * in `out` and written by flush(), which runs from the loop's prepare and check phases for every
 * connection that has something to send, so a head, its body and its end leave in one write and
 * nothing waits for an unrelated wake-up.
 *
 * A connection's life: HEAD (waiting for, or inside, a request head) -> BODY (reading a body the
 * handler asked for) -> WAIT (request read, response under way) -> HEAD again when the response
 * went out and the connection is kept alive. A connection that is done after a response closes
 * gracefully: its output is written, then a FIN, then whatever the client still sends is read
 * and dropped for a moment (LINGER), so that it does not turn into a reset that would destroy
 * the response before the client read it. A cut closes at once, after the queued output.
 *
 * Handles are freed in their close callbacks. Calls from the handler never call back into it:
 * work they cause (reading more input, writing) runs from the loop.
 */
#define _GNU_SOURCE
#include "server.h"

#include "core/buf.h"
#include "moongate/list.h"
#include "http/chunk.h"
#include "moongate/error.h"
#include "moongate/log.h"
#include "tls.h"

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#define LOG "http"
#define READ_BUF (64 * 1024)
#define IN_MAX (64 * 1024)            /* unparsed input a connection keeps; reading stops above */
#define OUT_KEEP (1024 * 1024)        /* an output buffer larger than this is given back */
#define ACCEPT_BATCH 64
#define ACCEPT_PAUSE_MS 100           /* after EMFILE */
#define LINGER_MS 2000
#define LINGER_BYTES (1024 * 1024)
#define REFUSING_MAX 256              /* connections being told 503 at once; more are closed */

enum conn_state { CS_HEAD, CS_BODY, CS_WAIT, CS_RAW, CS_LINGER };

enum pending { PEND_INPUT = 1, PEND_FLUSH = 2, PEND_CLOSE = 4 };

struct mg_client {
    uv_tcp_t tcp;
    uv_timer_t timer;
    uv_write_t wreq;
    uv_shutdown_t sreq;
    mg_server_t *srv;
    mg_list_t link;                 /* srv->conns */
    mg_list_t pend_link;            /* srv->pending */
    int pend;                       /* enum pending bits */
    enum conn_state state;
    char remote[64];
    mg_tls_t *tls;

    mg_http1_req_parser_t *parser;  /* made at the first byte of a request, freed when idle */
    mg__buf_t in;                   /* bytes read but not parsed yet */
    bool reading;                   /* uv_read_start is on */
    bool refusing;                  /* over the connection limit: told 503 and closed */

    /* the current request */
    bool req_active;                /* between on_request and on_done */
    mg_server_req_t *req;           /* the handler's object (NULL: answered at once) */
    const mg_http1_req_head_t *head;
    bool is_head_method, http10, keep_alive;
    bool body_wanted, body_paused, body_ended, continue_sent;

    /* the response */
    bool resp_started, resp_no_body, resp_chunked, resp_done, close_after, cut;
    uint64_t resp_remaining;        /* of a known Content-Length */
    bool want_drain;

    /* output */
    mg__buf_t out;                  /* plaintext not written yet */
    mg__buf_t wr;                   /* the write in flight (ciphertext over TLS) */
    bool writing;
    bool closing;                   /* uv_close called */
    bool shut;                      /* FIN sent */
    int handles;                    /* open handles (tcp, timer) */

    /* deadlines, loop time in ms, 0 for none */
    uint64_t read_deadline, write_deadline, timer_due;
    size_t linger_bytes;

    /* after an upgrade */
    const mg_client_raw_cbs_t *raw;
    void *raw_arg;
};

struct mg_server {
    uv_loop_t *loop;
    mg_server_opts_t opts;
    char host[64];
    mg_server_handler_t h;
    int fd;
    int port;
    uv_poll_t poll;
    uv_timer_t accept_timer;
    bool accept_paused;
    uint64_t last_emfile_log;
    uint64_t emfile_since_log;
    mg_tls_ctx_t *tls;
    uv_prepare_t prep;
    uv_check_t check;
    bool hooks_on;
    mg_list_t conns;
    mg_list_t pending;
    int nconns, nrefusing;          /* open, and of those being refused */
    int nalive;                     /* connections not freed yet (their handles may be closing) */
    bool draining, closing;
    int handles;                    /* the server's own open handles */
    void (*on_closed)(void *arg);
    void *closed_arg;
    mg_server_stats_t st;
    char rbuf[READ_BUF];
    char pbuf[READ_BUF];            /* TLS plaintext */
};

static void conn_close(mg_client_t *c);
static void conn_graceful_close(mg_client_t *c);
static void conn_arm(mg_client_t *c);
static void conn_input(mg_client_t *c, const char *data, size_t len);
static void read_start(mg_client_t *c);
static void schedule(mg_client_t *c, int what);
static void server_maybe_free(mg_server_t *s);
static void on_deadline(uv_timer_t *t);

void mg_server_opts_init(mg_server_opts_t *o)
{
    *o = (mg_server_opts_t){
        .host = "127.0.0.1",
        .port = 8080,
        .header_timeout_ms = 10000,
        .keepalive_timeout_ms = 75000,
        .send_timeout_ms = 60000,
        .max_connections = 10000,
    };
}

/* ---------------------------------------------------------------------------------------------
 * Deadlines
 */

static uint64_t now_ms(const mg_client_t *c)
{
    return uv_now(c->srv->loop);
}

/* (Re)arms the timer for the earliest deadline; a later one only moves a field. */
static void conn_arm(mg_client_t *c)
{
    if (c->closing)
        return;
    uint64_t d = c->read_deadline;
    if (c->write_deadline && (d == 0 || c->write_deadline < d))
        d = c->write_deadline;
    if (d == 0) {
        c->timer_due = 0;
        return; /* a timer still running finds nothing due and stops */
    }
    if (uv_is_active((uv_handle_t *)&c->timer) && c->timer_due && c->timer_due <= d)
        return;
    uint64_t now = now_ms(c);
    c->timer_due = d;
    uv_timer_start(&c->timer, on_deadline, d > now ? d - now : 0, 0);
}

static void set_read_deadline(mg_client_t *c, uint64_t ms)
{
    c->read_deadline = ms ? now_ms(c) + ms : 0;
    conn_arm(c);
}

/* ---------------------------------------------------------------------------------------------
 * Output
 */

static void hooks_update(mg_server_t *s);

static void schedule(mg_client_t *c, int what)
{
    if (c->closing)
        return;
    c->pend |= what;
    if (!mg_list_linked(&c->pend_link)) {
        mg_list_insert_tail(&c->srv->pending, &c->pend_link);
        hooks_update(c->srv);
    }
}

static int out_append(mg_client_t *c, const void *p, size_t n)
{
    if (mg__buf_append(&c->out, p, n) != 0)
        return MG_ENOMEM;
    schedule(c, PEND_FLUSH);
    return 0;
}

size_t mg_client_queued(const mg_client_t *c)
{
    size_t n = mg__buf_size(&c->out) + mg__buf_size(&c->wr);
    if (c->tls)
        n += mg_tls_pending(c->tls);
    return n;
}

static void on_write(uv_write_t *req, int status);
static void conn_response_done(mg_client_t *c);

/* What follows once everything queued has been written. */
static void output_settled(mg_client_t *c)
{
    if (c->closing || c->writing || mg_client_queued(c) > 0)
        return;
    if (c->cut)
        conn_close(c);
    else if (c->resp_done && c->req_active)
        conn_response_done(c);
    else if (c->state == CS_LINGER && !c->shut)
        conn_graceful_close(c);
}

static void after_write(mg_client_t *c, size_t n);

/*
 * Writes everything pending, unless a write is in flight; or settles. A write the socket takes
 * whole goes out at once (uv_try_write: no request, no poll change); the rest waits in `wr`
 * for a uv_write. Both buffers keep their memory, so a long response reuses them.
 */
static void flush(mg_client_t *c)
{
    if (c->writing || c->closing)
        return;
    size_t n = mg__buf_size(&c->out);
    if (c->tls) {
        if (n > 0 && mg_tls_handshake_done(c->tls)) {
            if (mg_tls_write(c->tls, c->out.data + c->out.off, n) != 0) {
                mg_log_debug(LOG, "client %s: %s", c->remote, mg_tls_error(c->tls));
                conn_close(c);
                return;
            }
            mg__buf_consume(&c->out, n, OUT_KEEP);
        }
        size_t pending = mg_tls_pending(c->tls);
        if (pending == 0) {
            output_settled(c);
            return;
        }
        /* wr is empty here: no write in flight. */
        if (c->wr.cap < pending) {
            char *d = realloc(c->wr.data, pending);
            if (d == NULL) {
                conn_close(c);
                return;
            }
            c->wr.data = d;
            c->wr.cap = pending;
        }
        c->wr.off = 0;
        c->wr.len = mg_tls_take(c->tls, c->wr.data, pending);
    } else {
        if (n == 0) {
            output_settled(c);
            return;
        }
        mg__buf_t t = c->wr; /* empty: no write in flight */
        c->wr = c->out;
        c->out = t;
    }
    uv_buf_t b = uv_buf_init(c->wr.data + c->wr.off, (unsigned)mg__buf_size(&c->wr));
    int w = uv_try_write((uv_stream_t *)&c->tcp, &b, 1);
    if (w < 0 && w != UV_EAGAIN) {
        mg_log_debug(LOG, "client %s: write failed: %s", c->remote, uv_strerror(w));
        conn_close(c);
        return;
    }
    if (w > 0) {
        c->srv->st.bytes_out += (uint64_t)w;
        mg__buf_consume(&c->wr, (size_t)w, OUT_KEEP);
    }
    if (mg__buf_size(&c->wr) == 0) {
        after_write(c, (size_t)w);
        return;
    }
    b = uv_buf_init(c->wr.data + c->wr.off, (unsigned)mg__buf_size(&c->wr));
    c->writing = true;
    c->write_deadline = now_ms(c) + c->srv->opts.send_timeout_ms;
    conn_arm(c);
    if (uv_write(&c->wreq, (uv_stream_t *)&c->tcp, &b, 1, on_write) != 0) {
        c->writing = false;
        conn_close(c);
    }
}

/* A write completed (n bytes): the client may take more, and what comes after goes on. */
static void after_write(mg_client_t *c, size_t n)
{
    c->write_deadline = 0;
    if (c->want_drain && mg_client_queued(c) < MG_CLIENT_LOW_WATER) {
        c->want_drain = false;
        if (c->state == CS_RAW && c->raw && c->raw->on_drain)
            c->raw->on_drain(c->raw_arg);
        else if (c->req && c->req_active)
            c->req->ops->on_drain(c->req);
        if (c->closing)
            return;
    }
    flush(c); /* what was gathered meanwhile; or what comes after the last byte */
    conn_arm(c);
}

static void on_write(uv_write_t *req, int status)
{
    mg_client_t *c = req->data;
    c->writing = false;
    size_t n = mg__buf_size(&c->wr);
    mg__buf_consume(&c->wr, n, OUT_KEEP);
    if (c->closing)
        return;
    if (status < 0) {
        mg_log_debug(LOG, "client %s: write failed: %s", c->remote, uv_strerror(status));
        conn_close(c);
        return;
    }
    c->srv->st.bytes_out += n;
    after_write(c, n);
}

/* ---------------------------------------------------------------------------------------------
 * Closing
 */

static void on_handle_closed(uv_handle_t *h)
{
    mg_client_t *c = h->data;
    if (--c->handles > 0)
        return;
    mg_server_t *s = c->srv;
    s->nalive--;
    mg__buf_free(&c->in);
    mg__buf_free(&c->out);
    mg__buf_free(&c->wr);
    mg_http1_req_parser_free(c->parser);
    mg_tls_free(c->tls);
    free(c);
    server_maybe_free(s);
}

/* Ends the current request for the server: its handler hears, once, whether it completed. */
static void finish_request(mg_client_t *c, bool complete)
{
    if (!c->req_active)
        return;
    c->req_active = false;
    mg_server_req_t *r = c->req;
    c->req = NULL;
    if (r)
        r->ops->on_done(r, complete);
}

/* Closes at once. A request still active learns that it did not complete. */
static void conn_close(mg_client_t *c)
{
    if (c->closing)
        return;
    c->closing = true;
    mg_server_t *s = c->srv;
    mg_list_remove(&c->link);
    mg_list_remove(&c->pend_link);
    s->nconns--;
    if (c->refusing)
        s->nrefusing--;
    finish_request(c, false);
    if (c->state == CS_RAW && c->raw) {
        const mg_client_raw_cbs_t *raw = c->raw;
        c->raw = NULL;
        raw->on_close(c->raw_arg);
    }
    uv_close((uv_handle_t *)&c->tcp, on_handle_closed);
    uv_close((uv_handle_t *)&c->timer, on_handle_closed);
}

static void on_shutdown(uv_shutdown_t *req, int status)
{
    mg_client_t *c = req->data;
    if (c->closing)
        return;
    if (status < 0) {
        conn_close(c);
        return;
    }
    /* The client has what it needs: read and drop what it still sends, for a moment. */
    set_read_deadline(c, LINGER_MS);
}

/*
 * The connection ends after what is queued: then a FIN, then LINGER until the client closes
 * its side or LINGER_MS pass.
 */
static void conn_graceful_close(mg_client_t *c)
{
    if (c->closing)
        return;
    if (c->state != CS_LINGER) {
        c->state = CS_LINGER;
        finish_request(c, true);
        if (c->closing)
            return;
        if (c->tls)
            mg_tls_shutdown(c->tls);
        mg__buf_free(&c->in);
        c->read_deadline = now_ms(c) + LINGER_MS;
        conn_arm(c);
        schedule(c, PEND_FLUSH);
    }
    if (c->writing || mg_client_queued(c) > 0 || c->shut)
        return; /* on_write comes back here */
    c->shut = true;
    c->sreq.data = c;
    if (uv_shutdown(&c->sreq, (uv_stream_t *)&c->tcp, on_shutdown) != 0)
        conn_close(c);
}

/* ---------------------------------------------------------------------------------------------
 * The request's end, and the next one
 */

static void conn_idle(mg_client_t *c)
{
    c->state = CS_HEAD;
    c->head = NULL;
    c->resp_started = c->resp_done = c->resp_no_body = c->resp_chunked = false;
    c->body_wanted = c->body_paused = c->body_ended = c->continue_sent = false;
    c->close_after = false;
    c->want_drain = false;
    /* An idle connection holds no output buffers (both are empty now)... */
    mg__buf_free(&c->out);
    mg__buf_free(&c->wr);
    if (mg__buf_size(&c->in) == 0 && c->parser) {
        /* ...and, with nothing pipelined, no parser. */
        mg_http1_req_parser_free(c->parser);
        c->parser = NULL;
    }
    set_read_deadline(c, c->srv->opts.keepalive_timeout_ms);
    if (mg__buf_size(&c->in) > 0)
        schedule(c, PEND_INPUT);
}

/* The response went out whole. */
static void conn_response_done(mg_client_t *c)
{
    bool reuse = !c->close_after && c->keep_alive && c->state == CS_WAIT && !c->srv->draining;
    if (!reuse) {
        conn_graceful_close(c);
        return;
    }
    finish_request(c, true);
    if (c->closing)
        return;
    conn_idle(c);
}

/* ---------------------------------------------------------------------------------------------
 * The parser's callbacks
 */

static int p_on_head(void *data, const mg_http1_req_head_t *head)
{
    mg_client_t *c = data;
    c->head = head;
    c->req_active = true;
    c->is_head_method = strcmp(head->method, "HEAD") == 0;
    c->http10 = head->http_minor == 0;
    c->keep_alive = head->keep_alive && !c->http10;
    c->state = head->body == MG_HTTP1_REQ_BODY_NONE ? CS_WAIT : CS_BODY;
    c->read_deadline = 0; /* the handler's own deadlines run now */
    conn_arm(c);
    c->req = c->srv->h.on_request(c->srv->h.arg, c, head);
    return 0;
}

static int p_on_body(void *data, const char *at, size_t len)
{
    mg_client_t *c = data;
    c->read_deadline = now_ms(c) + c->srv->opts.header_timeout_ms;
    if (c->req == NULL || c->closing || c->resp_done)
        return 0; /* answered already: the rest is dropped */
    if (c->req->ops->on_body(c->req, at, len) != 0) {
        /* Paused by the handler: its own pace is not the client's stall. */
        c->body_paused = true;
        c->read_deadline = 0;
        conn_arm(c);
        return MG_EAGAIN;
    }
    return 0;
}

static void body_end(mg_client_t *c, const mg_http1_header_t *trailers, size_t n)
{
    if (c->body_ended)
        return;
    c->body_ended = true;
    if (c->req && !c->closing && !c->resp_done)
        c->req->ops->on_body_end(c->req, trailers, n);
}

static int p_on_trailers(void *data, const mg_http1_header_t *t, size_t n)
{
    body_end(data, t, n);
    return 0;
}

static int p_on_complete(void *data)
{
    mg_client_t *c = data;
    if (c->state == CS_BODY) {
        body_end(c, NULL, 0);
        c->state = CS_WAIT;
    }
    c->read_deadline = 0;
    conn_arm(c);
    return 0;
}

static const mg_http1_req_cbs_t parser_cbs = {
    .on_head = p_on_head,
    .on_body = p_on_body,
    .on_trailers = p_on_trailers,
    .on_complete = p_on_complete,
};

/* ---------------------------------------------------------------------------------------------
 * Input
 */

static void refuse(mg_client_t *c, int status, const char *why)
{
    c->srv->st.bad_requests++;
    c->close_after = true;
    c->req_active = true; /* the error response is this connection's last request */
    c->req = NULL;
    c->state = CS_WAIT;
    c->srv->h.on_error(c->srv->h.arg, c, status, why);
    if (!c->resp_done)
        mg_client_abort(c);
}

/* Parses from data as far as the state allows. Returns the bytes used. */
static size_t conn_parse(mg_client_t *c, const char *data, size_t len)
{
    size_t off = 0;
    while (off < len && !c->closing) {
        if (c->state == CS_RAW) {
            if (c->parser) {
                mg_http1_req_parser_free(c->parser);
                c->parser = NULL;
            }
            if (c->raw)
                c->raw->on_read(c->raw_arg, data + off, len - off);
            return len;
        }
        if (c->state == CS_LINGER) {
            c->linger_bytes += len - off;
            if (c->linger_bytes > LINGER_BYTES)
                conn_close(c);
            return len;
        }
        if (c->state == CS_WAIT || (c->state == CS_BODY && (!c->body_wanted || c->body_paused)))
            break;
        if (c->parser == NULL) {
            mg_http1_req_parser_t *p;
            if (mg_http1_req_parser_new(&c->srv->opts.limits, &parser_cbs, c, &p) != 0) {
                conn_close(c);
                break;
            }
            c->parser = p;
        }
        bool was_idle = c->state == CS_HEAD && mg_http1_req_parser_idle(c->parser);
        size_t used = 0;
        int rc = mg_http1_req_parser_feed(c->parser, data + off, len - off, &used);
        off += used;
        if (was_idle && c->state == CS_HEAD && !mg_http1_req_parser_idle(c->parser))
            set_read_deadline(c, c->srv->opts.header_timeout_ms); /* a head is under way */
        if (rc == 0)
            continue;
        if (rc == MG_EINVAL && c->state == CS_HEAD) {
            refuse(c, mg_http1_req_parser_status(c->parser), mg_http1_req_parser_error(c->parser));
        } else if (rc == MG_EINVAL && c->state == CS_BODY && c->req && !c->resp_done) {
            /* A malformed body: the request's handler answers it, then the connection ends. */
            c->srv->st.bad_requests++;
            c->close_after = true;
            c->body_ended = true;
            c->state = CS_WAIT;
            c->req->ops->on_body_error(c->req, mg_http1_req_parser_status(c->parser),
                                       mg_http1_req_parser_error(c->parser));
        } else {
            /* Out of memory, or a broken body no one can be told of: the connection ends. */
            c->srv->st.bad_requests++;
            conn_close(c);
        }
        return len; /* nothing after an error is looked at */
    }
    return off;
}

/* Takes new input (data may be NULL: go on with what is buffered). */
static void conn_input(mg_client_t *c, const char *data, size_t len)
{
    if (c->closing)
        return;
    if (mg__buf_size(&c->in) == 0 && len > 0) {
        size_t used = conn_parse(c, data, len);
        if (used < len && !c->closing && mg__buf_append(&c->in, data + used, len - used) != 0)
            conn_close(c);
    } else {
        if (len > 0 && mg__buf_append(&c->in, data, len) != 0) {
            conn_close(c);
            return;
        }
        /* The buffer does not move while it is parsed: nothing appends to it meanwhile. */
        size_t n = mg__buf_size(&c->in);
        if (n > 0) {
            size_t used = conn_parse(c, c->in.data + c->in.off, n);
            if (!c->closing)
                mg__buf_consume(&c->in, used, IN_MAX);
        }
    }
    if (c->closing)
        return;
    /* Bounded: a client that sends what we cannot use yet is stopped by TCP. */
    bool full = mg__buf_size(&c->in) >= IN_MAX;
    if (full && c->reading) {
        uv_read_stop((uv_stream_t *)&c->tcp);
        c->reading = false;
    } else if (!full && !c->reading) {
        read_start(c);
    }
}

static void on_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *buf)
{
    mg_client_t *c = h->data;
    *buf = uv_buf_init(c->srv->rbuf, READ_BUF);
}

static void on_read(uv_stream_t *stream, ssize_t nread, const uv_buf_t *buf)
{
    mg_client_t *c = stream->data;
    if (nread == 0 || c->closing)
        return;
    if (nread < 0) {
        /* EOF or an error: a client that went away, also mid-response (its upstream channel
           closes with it, so that the model stops generating). */
        if (nread != UV_EOF)
            mg_log_debug(LOG, "client %s: %s", c->remote, uv_strerror((int)nread));
        if (c->req_active && c->req && !c->resp_done)
            mg_log_info(LOG, "client %s went away before its response was complete",
                        c->remote);
        conn_close(c);
        return;
    }
    mg_server_t *s = c->srv;
    s->st.bytes_in += (uint64_t)nread;
    if (c->tls == NULL) {
        conn_input(c, buf->base, (size_t)nread);
        return;
    }
    if (mg_tls_feed(c->tls, buf->base, (size_t)nread) != 0) {
        conn_close(c);
        return;
    }
    while (!c->closing && c->reading) {
        int n = mg_tls_read(c->tls, s->pbuf, sizeof(s->pbuf));
        if (n == MG_EAGAIN)
            break;
        if (n < 0) {
            if (n == MG_EINVAL)
                mg_log_debug(LOG, "client %s: TLS: %s", c->remote, mg_tls_error(c->tls));
            conn_close(c);
            return;
        }
        conn_input(c, s->pbuf, (size_t)n);
    }
    if (!c->closing && mg_tls_pending(c->tls) > 0)
        schedule(c, PEND_FLUSH); /* handshake messages */
}

static void read_start(mg_client_t *c)
{
    if (c->closing || c->reading)
        return;
    if (uv_read_start((uv_stream_t *)&c->tcp, on_alloc, on_read) == 0)
        c->reading = true;
    /* TLS records decrypted while reading was stopped may be waiting in the session. */
    if (c->tls)
        schedule(c, PEND_INPUT);
}

/* For a TLS connection: plaintext the session holds, then the buffered input. */
static void tls_drain_session(mg_client_t *c)
{
    mg_server_t *s = c->srv;
    while (!c->closing && mg__buf_size(&c->in) < IN_MAX) {
        int n = mg_tls_read(c->tls, s->pbuf, sizeof(s->pbuf));
        if (n == MG_EAGAIN)
            return;
        if (n < 0) {
            conn_close(c);
            return;
        }
        conn_input(c, s->pbuf, (size_t)n);
    }
}

/* ---------------------------------------------------------------------------------------------
 * The loop hooks: deferred input and output of every connection that has some
 */

static void run_pending(mg_server_t *s)
{
    mg_list_t *n;
    while ((n = mg_list_first(&s->pending)) != NULL) {
        mg_client_t *c = mg_list_entry(n, mg_client_t, pend_link);
        mg_list_remove(n);
        int what = c->pend;
        c->pend = 0;
        if (what & PEND_CLOSE) {
            conn_close(c);
            continue;
        }
        if (what & PEND_INPUT) {
            conn_input(c, NULL, 0);
            if (c->tls && !c->closing)
                tls_drain_session(c);
        }
        if (!c->closing)
            flush(c);
    }
    hooks_update(s);
}

static void on_prepare(uv_prepare_t *h)
{
    run_pending(h->data);
}

static void on_check(uv_check_t *h)
{
    run_pending(h->data);
}

static void hooks_update(mg_server_t *s)
{
    bool want = !mg_list_empty(&s->pending);
    if (want == s->hooks_on || s->closing)
        return;
    s->hooks_on = want;
    if (want) {
        uv_prepare_start(&s->prep, on_prepare);
        uv_check_start(&s->check, on_check);
    } else {
        uv_prepare_stop(&s->prep);
        uv_check_stop(&s->check);
    }
}

/* ---------------------------------------------------------------------------------------------
 * Deadlines firing
 */

static void on_deadline(uv_timer_t *t)
{
    mg_client_t *c = t->data;
    uint64_t now = now_ms(c);
    c->timer_due = 0;
    if (c->read_deadline && now >= c->read_deadline) {
        c->read_deadline = 0;
        switch (c->state) {
        case CS_LINGER:
            conn_close(c);
            return;
        case CS_HEAD:
            if (c->parser && !mg_http1_req_parser_idle(c->parser) &&
                (c->tls == NULL || mg_tls_handshake_done(c->tls))) {
                char why[96];
                snprintf(why, sizeof(why), "the request head did not arrive within %llu ms",
                         (unsigned long long)c->srv->opts.header_timeout_ms);
                mg_log_info(LOG, "client %s: %s", c->remote, why);
                refuse(c, 408, why);
            } else {
                conn_close(c); /* idle, or nothing of a request: close quietly */
            }
            return;
        case CS_BODY:
            mg_log_info(LOG, "client %s: the request body stopped arriving for %llu ms; "
                        "closing", c->remote, (unsigned long long)c->srv->opts.header_timeout_ms);
            conn_close(c);
            return;
        default:
            break;
        }
    }
    if (c->write_deadline && now >= c->write_deadline) {
        mg_log_info(LOG, "client %s took none of its response for %llu ms; cutting it",
                    c->remote, (unsigned long long)c->srv->opts.send_timeout_ms);
        conn_close(c);
        return;
    }
    conn_arm(c);
}

/* ---------------------------------------------------------------------------------------------
 * Accepting
 */

static void accept_resume(uv_timer_t *t);
static void on_listen(uv_poll_t *p, int status, int events);

/* A connection for fd. Returns it, or NULL (fd is closed then, or closing with it). */
static mg_client_t *conn_start(mg_server_t *s, int fd, const struct sockaddr_storage *sa)
{
    mg_client_t *c = calloc(1, sizeof(*c));
    if (c == NULL) {
        close(fd);
        return NULL;
    }
    c->srv = s;
    if (uv_tcp_init(s->loop, &c->tcp) != 0) {
        free(c);
        close(fd);
        return NULL;
    }
    s->nalive++;
    c->tcp.data = c;
    c->handles = 2;
    uv_timer_init(s->loop, &c->timer);
    c->timer.data = c;
    c->wreq.data = c;
    mg_list_init(&c->pend_link);
    mg_list_insert_tail(&s->conns, &c->link);
    s->nconns++;
    s->st.accepted++;
    if (sa->ss_family == AF_INET)
        inet_ntop(AF_INET, &((const struct sockaddr_in *)sa)->sin_addr, c->remote,
                  sizeof(c->remote));
    else if (sa->ss_family == AF_INET6)
        inet_ntop(AF_INET6, &((const struct sockaddr_in6 *)sa)->sin6_addr, c->remote,
                  sizeof(c->remote));
    if (uv_tcp_open(&c->tcp, fd) != 0) {
        close(fd);
        conn_close(c);
        return NULL;
    }
    uv_tcp_nodelay(&c->tcp, 1);
    if (s->tls && mg_tls_new(s->tls, &c->tls) != 0) {
        conn_close(c);
        return NULL;
    }
    set_read_deadline(c, s->opts.header_timeout_ms);
    read_start(c);
    return c;
}

static void log_accept_pause(mg_server_t *s, int err)
{
    uint64_t now = uv_now(s->loop);
    s->emfile_since_log++;
    if (s->last_emfile_log != 0 && now - s->last_emfile_log < 1000)
        return;
    mg_log_warn(LOG, "accept: %s with %d client connections open; pausing new connections "
                "for %d ms (%llu time(s) since the last line)", strerror(err), s->nconns,
                ACCEPT_PAUSE_MS, (unsigned long long)s->emfile_since_log);
    s->last_emfile_log = now;
    s->emfile_since_log = 0;
}

static void on_listen(uv_poll_t *p, int status, int events)
{
    mg_server_t *s = p->data;
    for (int i = 0; i < ACCEPT_BATCH && !s->closing; i++) {
        struct sockaddr_storage sa;
        socklen_t len = sizeof(sa);
        int fd = accept4(s->fd, (struct sockaddr *)&sa, &len, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) {
            int e = errno;
            if (e == EAGAIN || e == EWOULDBLOCK)
                return;
            if (e == EINTR || e == ECONNABORTED || e == EPROTO)
                continue;
            /* EMFILE, ENFILE, ENOBUFS, ENOMEM: serve the connections we have, try again soon;
               the kernel keeps the waiting ones in the backlog meanwhile. */
            s->st.accept_pauses++;
            log_accept_pause(s, e);
            uv_poll_stop(&s->poll);
            s->accept_paused = true;
            uv_timer_start(&s->accept_timer, accept_resume, ACCEPT_PAUSE_MS, 0);
            return;
        }
        if (s->nconns >= s->opts.max_connections) {
            s->st.refused++;
            if (s->tls != NULL || s->nrefusing >= REFUSING_MAX) {
                close(fd); /* no HTTP before a handshake; or already refusing plenty */
                continue;
            }
            mg_client_t *c = conn_start(s, fd, &sa);
            if (c == NULL)
                continue;
            s->nrefusing++;
            c->refusing = true;
            refuse(c, 503, "too many client connections; try again later");
            continue;
        }
        conn_start(s, fd, &sa);
    }
}

static void accept_resume(uv_timer_t *t)
{
    mg_server_t *s = t->data;
    if (s->closing)
        return;
    s->accept_paused = false;
    uv_poll_start(&s->poll, UV_READABLE, on_listen);
}

/* ---------------------------------------------------------------------------------------------
 * The server
 */

static int listen_socket(mg_server_t *s, char *err, size_t errlen)
{
    struct sockaddr_storage ss;
    memset(&ss, 0, sizeof(ss));
    socklen_t sl;
    struct sockaddr_in *v4 = (struct sockaddr_in *)&ss;
    struct sockaddr_in6 *v6 = (struct sockaddr_in6 *)&ss;
    if (inet_pton(AF_INET, s->host, &v4->sin_addr) == 1) {
        v4->sin_family = AF_INET;
        v4->sin_port = htons((uint16_t)s->opts.port);
        sl = sizeof(*v4);
    } else if (inet_pton(AF_INET6, s->host, &v6->sin6_addr) == 1) {
        v6->sin6_family = AF_INET6;
        v6->sin6_port = htons((uint16_t)s->opts.port);
        sl = sizeof(*v6);
    } else {
        snprintf(err, errlen, "cannot listen on \"%s\": not an IPv4 or IPv6 address", s->host);
        return MG_ECONFIG;
    }
    int fd = socket(ss.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        snprintf(err, errlen, "socket: %s", strerror(errno));
        return MG_ECONFIG;
    }
    int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    if (bind(fd, (struct sockaddr *)&ss, sl) != 0 || listen(fd, 4096) != 0) {
        snprintf(err, errlen, "cannot listen on %s:%d: %s", s->host, s->opts.port,
                 strerror(errno));
        close(fd);
        return MG_ECONFIG;
    }
    sl = sizeof(ss);
    getsockname(fd, (struct sockaddr *)&ss, &sl);
    s->port = ntohs(ss.ss_family == AF_INET ? v4->sin_port : v6->sin6_port);
    s->fd = fd;
    return 0;
}

int mg_server_new(uv_loop_t *loop, const mg_server_opts_t *o, const mg_server_handler_t *h,
                  mg_server_t **out, char *err, size_t errlen)
{
    if (!h || !h->on_request || !h->on_error || (o->tls_cert == NULL) != (o->tls_key == NULL)) {
        snprintf(err, errlen, "invalid server options");
        return MG_EINVAL;
    }
    mg_server_t *s = calloc(1, sizeof(*s));
    if (s == NULL) {
        snprintf(err, errlen, "out of memory");
        return MG_ENOMEM;
    }
    s->loop = loop;
    s->opts = *o;
    s->h = *h;
    s->fd = -1;
    snprintf(s->host, sizeof(s->host), "%s", o->host ? o->host : "127.0.0.1");
    s->opts.host = s->host;
    s->opts.tls_cert = s->opts.tls_key = NULL; /* the paths are copied below */
    mg_list_init(&s->conns);
    mg_list_init(&s->pending);
    int rc;
    if (o->tls_cert) {
        if ((rc = mg_tls_ctx_load(o->tls_cert, o->tls_key, &s->tls, err, errlen)) != 0) {
            free(s);
            return rc;
        }
        s->opts.tls_cert = strdup(o->tls_cert);
        s->opts.tls_key = strdup(o->tls_key);
    }
    if ((rc = listen_socket(s, err, errlen)) != 0) {
        mg_tls_ctx_unref(s->tls);
        free((char *)s->opts.tls_cert);
        free((char *)s->opts.tls_key);
        free(s);
        return rc;
    }
    uv_poll_init_socket(loop, &s->poll, s->fd);
    uv_timer_init(loop, &s->accept_timer);
    uv_prepare_init(loop, &s->prep);
    uv_check_init(loop, &s->check);
    s->poll.data = s->accept_timer.data = s->prep.data = s->check.data = s;
    s->handles = 4;
    uv_poll_start(&s->poll, UV_READABLE, on_listen);
    *out = s;
    return 0;
}

int mg_server_port(const mg_server_t *s)
{
    return s->port;
}

void mg_server_stats(const mg_server_t *s, mg_server_stats_t *out)
{
    *out = s->st;
    out->connections = s->nconns;
}

int mg_server_reload_tls(mg_server_t *s, char *err, size_t errlen)
{
    if (s->tls == NULL)
        return MG_ESTATE;
    mg_tls_ctx_t *fresh;
    int rc = mg_tls_ctx_load(s->opts.tls_cert, s->opts.tls_key, &fresh, err, errlen);
    if (rc != 0)
        return rc;
    mg_tls_ctx_unref(s->tls);
    s->tls = fresh;
    return 0;
}

void mg_server_drain(mg_server_t *s)
{
    s->draining = true;
    mg_list_t *n, *tmp;
    mg_list_foreach_safe(n, tmp, &s->conns)
    {
        mg_client_t *c = mg_list_entry(n, mg_client_t, link);
        if (c->state == CS_HEAD && !c->req_active &&
            (c->parser == NULL || mg_http1_req_parser_idle(c->parser)))
            conn_close(c);
    }
}

static void on_server_handle_closed(uv_handle_t *h)
{
    mg_server_t *s = h->data;
    s->handles--;
    server_maybe_free(s);
}

static void server_maybe_free(mg_server_t *s)
{
    if (!s->closing || s->handles > 0 || s->nalive > 0)
        return;
    void (*cb)(void *) = s->on_closed;
    void *arg = s->closed_arg;
    mg_tls_ctx_unref(s->tls);
    free((char *)s->opts.tls_cert);
    free((char *)s->opts.tls_key);
    free(s);
    if (cb)
        cb(arg);
}

void mg_server_close(mg_server_t *s, void (*on_closed)(void *arg), void *arg)
{
    if (s->closing)
        return;
    s->closing = true;
    s->on_closed = on_closed;
    s->closed_arg = arg;
    mg_list_t *n, *tmp;
    mg_list_foreach_safe(n, tmp, &s->conns) conn_close(mg_list_entry(n, mg_client_t, link));
    uv_poll_stop(&s->poll);
    close(s->fd);
    uv_close((uv_handle_t *)&s->poll, on_server_handle_closed);
    uv_close((uv_handle_t *)&s->accept_timer, on_server_handle_closed);
    uv_close((uv_handle_t *)&s->prep, on_server_handle_closed);
    uv_close((uv_handle_t *)&s->check, on_server_handle_closed);
}

/* ---------------------------------------------------------------------------------------------
 * The client side of a request
 */

int mg_client_head(mg_client_t *c, const mg_client_head_t *h)
{
    if (c->resp_started || c->closing || c->state == CS_RAW || c->state == CS_LINGER)
        return MG_ESTATE;
    int st = h->status;
    bool bodyless_status = st == 204 || st == 304 || (st >= 100 && st < 200);
    c->resp_no_body = c->is_head_method || bodyless_status;
    int64_t framing;
    if (bodyless_status)
        framing = MG_HTTP1_BODY_LENGTH_NONE;
    else if (h->body_length >= 0)
        framing = h->body_length;
    else if (c->is_head_method || c->http10 || c->head == NULL)
        framing = MG_HTTP1_BODY_LENGTH_NONE;
    else
        framing = MG_HTTP1_BODY_LENGTH_CHUNKED;
    /* Without a length the close ends the body. A body not read to its end would be taken for
       the next request: the connection closes after the response then too. */
    if (framing == MG_HTTP1_BODY_LENGTH_NONE && !c->resp_no_body)
        c->close_after = true;
    if (c->state == CS_BODY || !c->keep_alive || c->srv->draining || c->head == NULL)
        c->close_after = true;
    c->resp_chunked = framing == MG_HTTP1_BODY_LENGTH_CHUNKED && !c->resp_no_body;
    c->resp_remaining = h->body_length >= 0 && !c->resp_no_body ? (uint64_t)h->body_length : 0;
    mg_http1_response_t r = {
        .status = st,
        .headers = h->headers,
        .nheaders = h->nheaders,
        .body_length = framing,
        .close = c->close_after,
        .request_id = h->request_id,
    };
    char stack[4096];
    size_t len = 0;
    int rc = mg_http1_response_head(&r, stack, sizeof(stack), &len);
    if (rc == MG_ENOMEM) {
        char *big = malloc(MG_HTTP1_HEAD_MAX_DEFAULT);
        if (big == NULL)
            return MG_ENOMEM;
        rc = mg_http1_response_head(&r, big, MG_HTTP1_HEAD_MAX_DEFAULT, &len);
        if (rc == 0)
            rc = out_append(c, big, len);
        free(big);
    } else if (rc == 0) {
        rc = out_append(c, stack, len);
    }
    if (rc == 0)
        c->resp_started = true;
    return rc;
}

int mg_client_write(mg_client_t *c, const char *data, size_t len)
{
    if (!c->resp_started || c->resp_done || c->closing)
        return MG_ESTATE;
    if (len == 0 || c->resp_no_body)
        return 0;
    int rc;
    if (c->resp_chunked) {
        rc = mg__http1_append_chunk(&c->out, data, len) != 0 ? MG_ENOMEM : 0;
        if (rc == 0)
            schedule(c, PEND_FLUSH);
    } else {
        if (c->resp_remaining > 0 && len > c->resp_remaining) {
            /* More than the length we announced: the response is wrong; cut it. */
            mg_client_abort(c);
            return MG_ESTATE;
        }
        c->resp_remaining -= c->resp_remaining ? len : 0;
        rc = out_append(c, data, len);
    }
    if (rc != 0) {
        mg_client_abort(c);
        return rc;
    }
    if (mg_client_queued(c) > MG_CLIENT_HIGH_WATER)
        c->want_drain = true;
    return 0;
}

void mg_client_end(mg_client_t *c)
{
    if (c->resp_done || c->closing || !c->resp_started)
        return;
    if (c->resp_remaining > 0) {
        mg_client_abort(c); /* fewer bytes than announced: the client must see a cut */
        return;
    }
    if (c->resp_chunked && out_append(c, MG_HTTP1_LAST_CHUNK, MG_HTTP1_LAST_CHUNK_LEN) != 0) {
        mg_client_abort(c);
        return;
    }
    c->resp_done = true;
    schedule(c, PEND_FLUSH);
}

void mg_client_abort(mg_client_t *c)
{
    if (c->closing)
        return;
    c->resp_done = true;
    c->cut = true;
    schedule(c, PEND_FLUSH); /* the flush writes what is queued, or finds nothing and closes */
}

void mg_client_read_body(mg_client_t *c)
{
    if (c->closing || c->state != CS_BODY)
        return;
    if (c->head && c->head->expect_continue && !c->continue_sent && !c->resp_started) {
        static const char cont[] = "HTTP/1.1 100 Continue\r\n\r\n";
        c->continue_sent = true;
        out_append(c, cont, sizeof(cont) - 1);
    }
    c->body_wanted = true;
    c->body_paused = false;
    c->read_deadline = now_ms(c) + c->srv->opts.header_timeout_ms;
    conn_arm(c);
    schedule(c, PEND_INPUT);
}

const char *mg_client_remote(const mg_client_t *c)
{
    return c->remote;
}

bool mg_client_tls(const mg_client_t *c)
{
    return c->tls != NULL;
}

/* ---------------------------------------------------------------------------------------------
 * Upgraded connections
 */

int mg_client_upgrade(mg_client_t *c, const char *head, size_t len,
                      const mg_client_raw_cbs_t *cbs, void *arg)
{
    if (c->closing || c->resp_started || c->head == NULL || !c->head->upgrade)
        return MG_ESTATE;
    int rc = out_append(c, head, len);
    if (rc != 0)
        return rc;
    c->resp_started = c->resp_done = true;
    c->state = CS_RAW;
    c->raw = cbs;
    c->raw_arg = arg;
    /* The request is over for the HTTP side: it gets no on_done (it never had an object). */
    c->req_active = false;
    c->req = NULL;
    c->head = NULL;
    c->read_deadline = 0;
    conn_arm(c);
    /* The parser stopped right after the head: what follows it is the new protocol's. */
    if (mg__buf_size(&c->in) > 0)
        schedule(c, PEND_INPUT);
    return 0;
}

int mg_client_raw_write(mg_client_t *c, const char *data, size_t len)
{
    if (c->closing || c->state != CS_RAW)
        return MG_ECLOSED;
    int rc = out_append(c, data, len);
    if (rc == 0 && mg_client_queued(c) > MG_CLIENT_HIGH_WATER)
        c->want_drain = true;
    return rc;
}

void mg_client_raw_close(mg_client_t *c, bool graceful)
{
    if (c->closing || c->state != CS_RAW)
        return;
    c->cut = true; /* closes once what is queued went out; on_close comes from there */
    schedule(c, graceful ? PEND_FLUSH : PEND_CLOSE);
}
