/*
 * server: the gateway's HTTP/1.1 server on its libuv loop, plain or TLS.
 *
 * It accepts client connections (at most max_connections at once: one more gets a 503 at once
 * and is closed; at the descriptor limit accepting pauses for a moment while every connection
 * already open is served), reads each request with the strict parser of http1.h, and hands the
 * head to the handler. Nothing here knows about policies, users or SSH: the handler answers
 * through the mg_client_t, the client side of that one request.
 *
 * One request at a time per connection: a pipelined request waits, unparsed and bounded, until
 * the response before it is complete. A request's body is read only once the handler asks for
 * it (mg_client_read_body(), which also answers Expect: 100-continue), and stops being read
 * while the handler says it is full. A response goes out framed for the client: Content-Length
 * when the length is known, chunked otherwise (close-delimited for HTTP/1.0), and no body for a
 * HEAD request, a 204 or a 304. Output produced in one turn of the loop leaves in one write
 * before the loop waits again.
 *
 * Deadlines: a request head must arrive within header_timeout_ms (also the longest pause while
 * a body arrives); a kept-alive connection may be idle for keepalive_timeout_ms; a client that
 * takes none of its response for send_timeout_ms is cut. A response that could not be completed
 * cuts the connection: the client never sees a clean end of an incomplete body.
 *
 * An upgrade (the agents' /tunnel) turns the connection into a byte stream the handler drives
 * with mg_client_raw_*(), over TLS too.
 *
 * Callbacks are never called from inside a call into this module.
 */
#ifndef MOONGATE_SERVER_H
#define MOONGATE_SERVER_H

#include "moongate/http1.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <uv.h>

typedef struct mg_server mg_server_t;
typedef struct mg_client mg_client_t;
typedef struct mg_server_req mg_server_req_t;

/*
 * What the server tells a request it handed over. The handler embeds mg_server_req_t first in
 * its own request object.
 */
typedef struct mg_server_req_ops {
    /* Decoded body bytes (valid during the call). Return 0, or 1 to stop reading the body until
       mg_client_read_body() is called again. */
    int (*on_body)(mg_server_req_t *r, const char *data, size_t len);
    /* The body is complete; trailers of a chunked body (checked fields), or none. */
    void (*on_body_end)(mg_server_req_t *r, const mg_http1_header_t *trailers, size_t n);
    /* The body is malformed (status and why, as for on_error): no more of it comes. The
       handler answers, if it still can; the connection closes after the response. */
    void (*on_body_error)(mg_server_req_t *r, int status, const char *why);
    /* Output fell below the low-water mark after mg_client_queued() was above the high one. */
    void (*on_drain)(mg_server_req_t *r);
    /*
     * The server is done with the request: complete when its response went out whole, false
     * when the client went away or the connection failed first. Called exactly once; the
     * client may not be used after it.
     */
    void (*on_done)(mg_server_req_t *r, bool complete);
} mg_server_req_ops_t;

struct mg_server_req {
    const mg_server_req_ops_t *ops;
};

typedef struct mg_server_handler {
    /*
     * A request head. The handler answers through c and returns its request object, or NULL
     * once it has answered in full (mg_client_end() called). head stays valid until on_done.
     */
    mg_server_req_t *(*on_request)(void *arg, mg_client_t *c, const mg_http1_req_head_t *head);
    /*
     * A request the server refuses itself (malformed: 400, 405, 414, 417, 431, 501, 505; a head
     * not received in time: 408; over the connection limit: 503). The handler writes the
     * complete response (mg_client_head(), _write(), _end()); the connection closes after it.
     */
    void (*on_error)(void *arg, mg_client_t *c, int status, const char *why);
    void *arg;
} mg_server_handler_t;

typedef struct mg_server_opts {
    const char *host;               /* an IPv4 or IPv6 address */
    int port;                       /* 0: any free port (mg_server_port()) */
    const char *tls_cert, *tls_key; /* both or neither */
    mg_http1_req_limits_t limits;
    uint64_t header_timeout_ms;     /* 10000 */
    uint64_t keepalive_timeout_ms;  /* 75000 */
    uint64_t send_timeout_ms;       /* 60000 */
    int max_connections;            /* 10000 */
} mg_server_opts_t;

typedef struct mg_server_stats {
    int connections;                /* open client connections */
    uint64_t accepted;
    uint64_t refused;               /* over max_connections */
    uint64_t accept_pauses;         /* at the descriptor limit */
    uint64_t bad_requests;          /* refused by the parser or a deadline */
    uint64_t bytes_in, bytes_out;   /* on the wire (TLS included) */
} mg_server_stats_t;

void mg_server_opts_init(mg_server_opts_t *o);

/* Listens. Returns 0 and *out, or MG_ECONFIG (err: a bad address, a port in use, a bad TLS
   certificate or key), MG_ENOMEM. */
int mg_server_new(uv_loop_t *loop, const mg_server_opts_t *o, const mg_server_handler_t *h,
                  mg_server_t **out, char *err, size_t errlen);

int mg_server_port(const mg_server_t *s);
void mg_server_stats(const mg_server_t *s, mg_server_stats_t *out);

/* Loads the TLS certificate and key again (SIGHUP); new connections use them. On failure the
   old ones stay and err says why. Returns 0, MG_ESTATE (not serving TLS) or MG_ECONFIG. */
int mg_server_reload_tls(mg_server_t *s, char *err, size_t errlen);

/* From now on every response closes its connection, and idle connections close. */
void mg_server_drain(mg_server_t *s);

/*
 * Stops listening and closes every connection (their requests get on_done(false)); the server
 * is freed once every handle has closed (run the loop). on_closed, if not NULL, is called then.
 */
void mg_server_close(mg_server_t *s, void (*on_closed)(void *arg), void *arg);

/* ---- the client side of one request ---- */

typedef struct mg_client_head {
    int status;
    const mg_http1_header_t *headers; /* end-to-end fields; hop-by-hop ones are dropped */
    size_t nheaders;
    int64_t body_length;             /* >= 0, or -1 when unknown */
    const char *request_id;          /* X-Request-Id, or NULL */
} mg_client_head_t;

/* Starts the response. Returns 0, MG_ESTATE (already started) or MG_EINVAL (a bad field). */
int mg_client_head(mg_client_t *c, const mg_client_head_t *h);

/* Queues body bytes (copied). Returns 0 (also when the response has no body) or MG_ESTATE. */
int mg_client_write(mg_client_t *c, const char *data, size_t len);

/* The response is complete. */
void mg_client_end(mg_client_t *c);

/* The response cannot be completed: what is queued goes out, then the connection closes. */
void mg_client_abort(mg_client_t *c);

/* Bytes queued toward the client; above MG_CLIENT_HIGH_WATER stop producing until on_drain. */
#define MG_CLIENT_HIGH_WATER (512 * 1024)
#define MG_CLIENT_LOW_WATER (128 * 1024)
size_t mg_client_queued(const mg_client_t *c);

/* Starts (or resumes) reading the request body; the first call answers Expect: 100-continue. */
void mg_client_read_body(mg_client_t *c);

const char *mg_client_remote(const mg_client_t *c); /* "203.0.113.7" */
bool mg_client_tls(const mg_client_t *c);

/* ---- an upgraded connection as a byte stream ---- */

typedef struct mg_client_raw_cbs {
    void (*on_read)(void *arg, const char *data, size_t len);
    void (*on_drain)(void *arg);       /* as on_drain above */
    void (*on_close)(void *arg);       /* the connection is gone; no more calls either way */
} mg_client_raw_cbs_t;

/*
 * Answers the current (upgrade) request with head (the 101 response, sent as is) and turns the
 * connection into a byte stream: the bytes after the request head and every byte after them go
 * to cbs->on_read. Returns 0, or MG_ESTATE (not an upgrade request, or a response started).
 */
int mg_client_upgrade(mg_client_t *c, const char *head, size_t len,
                      const mg_client_raw_cbs_t *cbs, void *arg);
/* Queues bytes (copied). Returns 0, MG_ECLOSED (the stream is closing) or MG_ENOMEM. */
int mg_client_raw_write(mg_client_t *c, const char *data, size_t len);
/* Closes the stream after what is queued (graceful) or at once; on_close follows, later. */
void mg_client_raw_close(mg_client_t *c, bool graceful);

#endif
