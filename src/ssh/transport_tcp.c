/*
 * The TCP transport: a libuv TCP stream with a write queue that never refuses bytes.
 *
 * Two buffers carry outgoing bytes: `queued` collects writes until the next flush, `inflight`
 * is what libuv is writing now. A flush first tries to write straight to the socket; only what
 * the kernel does not take goes through uv_write. Incoming bytes land in one per-thread read
 * buffer and go straight to on_read, which consumes them before returning.
 */
#include "moongate/transport.h"

#include "core/buf.h"
#include "moongate/error.h"

#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

#define READ_BUF_SIZE (64 * 1024)
#define KEEP_CAP (256 * 1024)

typedef struct tcp_transport {
    mg_transport_t base;
    uv_tcp_t tcp;
    uv_getaddrinfo_t gai;
    uv_connect_t connect_req;
    uv_write_t write_req;
    mg__buf_t queued;
    mg__buf_t inflight;
    int port;
    bool resolving;
    bool writing;
    bool owe_drain;
    bool closing;
    bool close_when_written;
    bool tcp_closed;
} tcp_transport_t;

static _Thread_local char read_buf[READ_BUF_SIZE];

static void tcp_flush(mg_transport_t *base);
static void finish_close(tcp_transport_t *t);

static void quickack(tcp_transport_t *t)
{
#ifdef TCP_QUICKACK
    uv_os_fd_t fd;
    int one = 1;
    /* Linux turns quick-ack mode off again on its own; re-arm it after every read. */
    if (uv_fileno((uv_handle_t *)&t->tcp, &fd) == 0)
        setsockopt(fd, IPPROTO_TCP, TCP_QUICKACK, &one, sizeof(one));
#else
    (void)t;
#endif
}

static void on_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *buf)
{
    buf->base = read_buf;
    buf->len = sizeof(read_buf);
}

static void on_tcp_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf)
{
    tcp_transport_t *t = s->data;
    if (nread == 0 || t->closing)
        return;
    if (nread < 0) {
        uv_read_stop(s);
        t->base.cbs->on_eof(&t->base, (int)nread);
        return;
    }
    quickack(t);
    t->base.bytes_in += (uint64_t)nread;
    t->base.cbs->on_read(&t->base, buf->base, (size_t)nread);
}

static void on_tcp_connect(uv_connect_t *req, int status)
{
    tcp_transport_t *t = req->data;
    if (t->closing)
        return;
    if (status == 0) {
        uv_tcp_nodelay(&t->tcp, 1);
        status = uv_read_start((uv_stream_t *)&t->tcp, on_alloc, on_tcp_read);
    }
    if (status == 0)
        t->base.connected = true;
    t->base.cbs->on_connect(&t->base, status);
    if (status == 0 && !t->closing)
        tcp_flush(&t->base);
}

static void on_resolved(uv_getaddrinfo_t *req, int status, struct addrinfo *res)
{
    tcp_transport_t *t = req->data;
    t->resolving = false;
    if (t->closing) {
        uv_freeaddrinfo(res);
        finish_close(t);
        return;
    }
    if (status == 0 && res == NULL)
        status = UV_EAI_NONAME;
    if (status == 0) {
        t->connect_req.data = t;
        status = uv_tcp_connect(&t->connect_req, &t->tcp, res->ai_addr, on_tcp_connect);
    }
    uv_freeaddrinfo(res);
    if (status != 0)
        t->base.cbs->on_connect(&t->base, status);
}

static int tcp_write(mg_transport_t *base, const void *buf, size_t len)
{
    tcp_transport_t *t = (tcp_transport_t *)base;
    if (t->closing)
        return MG_ECLOSED;
    int rc = mg__buf_append(&t->queued, buf, len);
    if (rc == 0)
        base->write_queued += len;
    return rc;
}

static void written(tcp_transport_t *t, size_t n)
{
    t->base.bytes_out += n;
    t->base.write_queued -= n;
}

static void on_tcp_write(uv_write_t *req, int status)
{
    tcp_transport_t *t = req->data;
    t->writing = false;
    written(t, mg__buf_size(&t->inflight));
    mg__buf_consume(&t->inflight, mg__buf_size(&t->inflight), KEEP_CAP);
    if (status < 0) {
        /* The read side reports the failure to the session; drop what is queued. */
        written(t, mg__buf_size(&t->queued));
        mg__buf_consume(&t->queued, mg__buf_size(&t->queued), KEEP_CAP);
        if (t->close_when_written)
            finish_close(t);
        return;
    }
    if (mg__buf_size(&t->queued) > 0) {
        tcp_flush(&t->base);
        return;
    }
    if (t->close_when_written) {
        finish_close(t);
        return;
    }
    if (t->owe_drain && !t->closing) {
        t->owe_drain = false;
        t->base.cbs->on_drain(&t->base);
    }
}

static void tcp_flush(mg_transport_t *base)
{
    tcp_transport_t *t = (tcp_transport_t *)base;
    if (!base->connected || t->writing || t->tcp_closed || mg__buf_size(&t->queued) == 0)
        return;

    uv_buf_t b = uv_buf_init(t->queued.data + t->queued.off, (unsigned)mg__buf_size(&t->queued));
    int n = uv_try_write((uv_stream_t *)&t->tcp, &b, 1);
    if (n > 0) {
        written(t, (size_t)n);
        mg__buf_consume(&t->queued, (size_t)n, KEEP_CAP);
        if (mg__buf_size(&t->queued) == 0) {
            if (t->close_when_written)
                finish_close(t);
            return;
        }
    }

    mg__buf_t tmp = t->inflight;
    t->inflight = t->queued;
    t->queued = tmp;
    b = uv_buf_init(t->inflight.data + t->inflight.off, (unsigned)mg__buf_size(&t->inflight));
    t->write_req.data = t;
    if (uv_write(&t->write_req, (uv_stream_t *)&t->tcp, &b, 1, on_tcp_write) == 0) {
        t->writing = true;
        t->owe_drain = true;
    } else {
        written(t, mg__buf_size(&t->inflight));
        mg__buf_consume(&t->inflight, mg__buf_size(&t->inflight), KEEP_CAP);
    }
}

static void tcp_trim(mg_transport_t *base)
{
    tcp_transport_t *t = (tcp_transport_t *)base;
    if (t->writing)
        return; /* inflight is libuv's until the write completes */
    if (mg__buf_size(&t->queued) == 0)
        mg__buf_free(&t->queued);
    if (mg__buf_size(&t->inflight) == 0)
        mg__buf_free(&t->inflight);
}

static void on_tcp_closed(uv_handle_t *h)
{
    tcp_transport_t *t = h->data;
    t->tcp_closed = true;
    finish_close(t);
}

/* Runs once the close has begun; frees the transport when no libuv callback is outstanding. */
static void finish_close(tcp_transport_t *t)
{
    t->close_when_written = false;
    if (!uv_is_closing((uv_handle_t *)&t->tcp)) {
        uv_close((uv_handle_t *)&t->tcp, on_tcp_closed);
        return;
    }
    if (!t->tcp_closed || t->resolving)
        return;
    t->base.cbs->on_close(&t->base);
    mg__buf_free(&t->queued);
    mg__buf_free(&t->inflight);
    free(t);
}

static void tcp_close(mg_transport_t *base, bool graceful)
{
    tcp_transport_t *t = (tcp_transport_t *)base;
    if (t->closing && (graceful || !t->close_when_written))
        return;
    t->closing = true;
    if (t->resolving)
        uv_cancel((uv_req_t *)&t->gai);
    if (graceful && base->connected && (t->writing || mg__buf_size(&t->queued) > 0)) {
        t->close_when_written = true;
        tcp_flush(base);
        return;
    }
    finish_close(t);
}

static void free_unstarted(uv_handle_t *h)
{
    free(h->data);
}

static const mg_transport_ops_t tcp_ops = {
    .write = tcp_write,
    .flush = tcp_flush,
    .close = tcp_close,
    .trim = tcp_trim,
    .name = "tcp",
};

int mg_tcp_transport_connect(uv_loop_t *loop, const char *host, int port,
                             const mg_transport_cbs_t *cbs, void *data, mg_transport_t **out)
{
    if (host == NULL || *host == '\0' || port <= 0 || port > 65535)
        return MG_EINVAL;
    tcp_transport_t *t = calloc(1, sizeof(*t));
    if (t == NULL)
        return MG_ENOMEM;
    int rc = uv_tcp_init(loop, &t->tcp);
    if (rc != 0) {
        free(t);
        return rc;
    }
    t->tcp.data = t;
    t->port = port;
    t->base.ops = &tcp_ops;
    t->base.cbs = cbs;
    t->base.data = data;

    struct sockaddr_storage addr;
    if (uv_ip4_addr(host, port, (struct sockaddr_in *)&addr) == 0 ||
        uv_ip6_addr(host, port, (struct sockaddr_in6 *)&addr) == 0) {
        t->connect_req.data = t;
        rc = uv_tcp_connect(&t->connect_req, &t->tcp, (struct sockaddr *)&addr, on_tcp_connect);
    } else {
        char service[8];
        snprintf(service, sizeof(service), "%d", port);
        struct addrinfo hints = { .ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM };
        t->gai.data = t;
        rc = uv_getaddrinfo(loop, &t->gai, on_resolved, host, service, &hints);
        t->resolving = rc == 0;
    }
    if (rc != 0) {
        /* Nothing was started: close the handle quietly and free in its callback. */
        t->closing = true;
        t->base.cbs = NULL;
        uv_close((uv_handle_t *)&t->tcp, free_unstarted);
        return rc;
    }
    *out = &t->base;
    return 0;
}
