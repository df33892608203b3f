/*
 * Why a WebSocket to the gateway did not open, when libwebsockets does not say ("closed before
 * established", an OpenSSL error without a reason): a second, plain look at host:port.
 *
 *   resolve, connect     refused: nothing listens there; unreachable, timed out: the network
 *   for wss://, send an HTTP request and read the first bytes: "HTTP/" means the port answers
 *                        plain HTTP, so the URL's scheme or port is wrong
 *   otherwise            the libwebsockets message stands
 *
 * It runs once per failed attempt at most, is bounded by PROBE_MS, and reports through done()
 * exactly once.
 */
#include "main_agent.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define PROBE_MS 2000

struct mg_agent_probe {
    uv_loop_t *loop;
    uv_getaddrinfo_t gai;
    uv_tcp_t tcp;
    uv_connect_t connect;
    uv_write_t write;
    uv_timer_t timer;
    bool tcp_open, resolving, reported;
    int handles;            /* open handles (timer, tcp) and the resolve in flight */
    bool tls;
    char host[256];
    int port;
    char fallback[256];     /* what libwebsockets said */
    char request[512];
    char got[8];
    size_t got_n;
    mg_agent_probe_done_fn done;
    void *arg;
};

static void release(mg_agent_probe_t *p)
{
    if (--p->handles == 0)
        free(p);
}

static void on_closed(uv_handle_t *h)
{
    release(h->data);
}

/* Reports once, then lets everything go. */
static void report(mg_agent_probe_t *p, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void report(mg_agent_probe_t *p, const char *fmt, ...)
{
    if (p->reported)
        return;
    p->reported = true;
    char why[600];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(why, sizeof(why), fmt, ap);
    va_end(ap);
    p->done(p->arg, why);
    uv_timer_stop(&p->timer);
    uv_close((uv_handle_t *)&p->timer, on_closed);
    if (p->tcp_open)
        uv_close((uv_handle_t *)&p->tcp, on_closed);
    if (p->resolving)
        uv_cancel((uv_req_t *)&p->gai);
}

static void on_timer(uv_timer_t *t)
{
    mg_agent_probe_t *p = t->data;
    report(p, "%s", p->fallback);
}

static void on_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *buf)
{
    mg_agent_probe_t *p = h->data;
    (void)suggested;
    buf->base = p->got + p->got_n;
    buf->len = sizeof(p->got) - p->got_n;
}

static void on_read(uv_stream_t *s, ssize_t n, const uv_buf_t *buf)
{
    mg_agent_probe_t *p = s->data;
    (void)buf;
    if (n > 0)
        p->got_n += (size_t)n;
    if (p->got_n >= 5 && memcmp(p->got, "HTTP/", 5) == 0)
        report(p, "%s:%d answered in plain HTTP, not TLS: use ws:// for it, or the port where "
                  "the gateway serves TLS", p->host, p->port);
    else if (n < 0 || p->got_n >= sizeof(p->got))
        report(p, "%s", p->fallback);
}

static void on_write(uv_write_t *w, int status)
{
    mg_agent_probe_t *p = w->data;
    if (status != 0)
        report(p, "%s", p->fallback);
    else if (!p->reported)
        uv_read_start((uv_stream_t *)&p->tcp, on_alloc, on_read);
}

static void on_connect(uv_connect_t *c, int status)
{
    mg_agent_probe_t *p = c->data;
    if (p->reported)
        return;
    if (status == UV_ECONNREFUSED) {
        report(p, "connection refused: nothing listens on %s:%d (is the gateway running, and is "
                  "this its port?)", p->host, p->port);
        return;
    }
    if (status != 0) {
        report(p, "cannot reach %s:%d: %s", p->host, p->port, uv_strerror(status));
        return;
    }
    if (!p->tls) {
        report(p, "%s", p->fallback);
        return;
    }
    snprintf(p->request, sizeof(p->request),
             "GET / HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n", p->host);
    uv_buf_t b = uv_buf_init(p->request, (unsigned)strlen(p->request));
    p->write.data = p;
    if (uv_write(&p->write, (uv_stream_t *)&p->tcp, &b, 1, on_write) != 0)
        report(p, "%s", p->fallback);
}

static void on_resolved(uv_getaddrinfo_t *g, int status, struct addrinfo *res)
{
    mg_agent_probe_t *p = g->data;
    p->resolving = false;
    if (status == 0 && !p->reported) {
        if (uv_tcp_init(p->loop, &p->tcp) == 0) {
            p->tcp.data = p;
            p->tcp_open = true;
            p->handles++;
            p->connect.data = p;
            if (uv_tcp_connect(&p->connect, &p->tcp, res->ai_addr, on_connect) != 0)
                report(p, "%s", p->fallback);
        } else {
            report(p, "%s", p->fallback);
        }
    } else if (status != UV_ECANCELED && status != UV_EAI_CANCELED) {
        report(p, "cannot resolve %s: %s", p->host, uv_strerror(status));
    }
    uv_freeaddrinfo(res);
    release(p);
}

int mg_agent_probe_start(uv_loop_t *loop, const char *host, int port, bool tls,
                         const char *fallback, mg_agent_probe_done_fn done, void *arg)
{
    mg_agent_probe_t *p = calloc(1, sizeof(*p));
    if (p == NULL)
        return -1;
    p->loop = loop;
    p->tls = tls;
    p->port = port;
    p->done = done;
    p->arg = arg;
    snprintf(p->host, sizeof(p->host), "%s", host);
    snprintf(p->fallback, sizeof(p->fallback), "%s", fallback);
    uv_timer_init(loop, &p->timer);
    p->timer.data = p;
    p->handles = 1;
    uv_timer_start(&p->timer, on_timer, PROBE_MS, 0);
    char service[16];
    snprintf(service, sizeof(service), "%d", port);
    struct addrinfo hints = { .ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM };
    p->gai.data = p;
    p->handles++;
    p->resolving = true;
    if (uv_getaddrinfo(loop, &p->gai, on_resolved, p->host, service, &hints) != 0) {
        p->resolving = false;
        p->handles--;
        report(p, "%s", p->fallback);
    }
    return 0;
}
