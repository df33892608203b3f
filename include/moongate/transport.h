/*
 * transport: the byte pipe under one SSH session.
 *
 * An SSH session needs a reliable, ordered byte stream and nothing more. The TCP transport dials
 * host:port; a later transport carries the same bytes in WebSocket frames. The session above
 * sees only this interface.
 *
 * Writes never fail for lack of room: libssh2 must be able to hand over every byte of a packet
 * (a short write corrupts the stream), so mg_transport_write() copies into a queue and the
 * layer above applies backpressure by watching `write_queued`. Queued bytes leave on
 * mg_transport_flush(), one write for everything queued since the last flush.
 *
 * Reads are pushed to on_read as they arrive. The transport is freed after on_close returns.
 */
#ifndef MOONGATE_TRANSPORT_H
#define MOONGATE_TRANSPORT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <uv.h>

typedef struct mg_transport mg_transport_t;

typedef struct mg_transport_cbs {
    /* The connection is up (status 0) or could not be made (a negative libuv code). */
    void (*on_connect)(mg_transport_t *t, int status);
    /* Bytes arrived; buf is valid only during the call. */
    void (*on_read)(mg_transport_t *t, const char *buf, size_t len);
    /* The peer closed (UV_EOF) or the connection failed (another negative code). No more reads. */
    void (*on_eof)(mg_transport_t *t, int status);
    /* Everything queued has been written (called only after a flush left bytes waiting). */
    void (*on_drain)(mg_transport_t *t);
    /* The transport is closed; it is freed when this returns. */
    void (*on_close)(mg_transport_t *t);
} mg_transport_cbs_t;

typedef struct mg_transport_ops {
    int (*write)(mg_transport_t *t, const void *buf, size_t len);
    void (*flush)(mg_transport_t *t);
    void (*close)(mg_transport_t *t, bool graceful);
    void (*trim)(mg_transport_t *t); /* optional */
    const char *name;
} mg_transport_ops_t;

struct mg_transport {
    /* public */
    void *data;
    const mg_transport_cbs_t *cbs;
    /* read-only */
    size_t write_queued;   /* bytes accepted by write() and not yet written to the peer */
    uint64_t bytes_in;
    uint64_t bytes_out;
    bool connected;
    /* private */
    const mg_transport_ops_t *ops;
};

/*
 * Queues len bytes (copied). Returns 0, MG_ENOMEM, or MG_ECLOSED once the transport is closing.
 */
static inline int mg_transport_write(mg_transport_t *t, const void *buf, size_t len)
{
    return t->ops->write(t, buf, len);
}

/* Starts writing whatever is queued. */
static inline void mg_transport_flush(mg_transport_t *t)
{
    t->ops->flush(t);
}

/*
 * Gives back the memory of buffers that hold nothing now (the next write or read allocates
 * again): for a transport that is about to sit idle. A no-op for a transport without it.
 */
static inline void mg_transport_trim(mg_transport_t *t)
{
    if (t->ops->trim != NULL)
        t->ops->trim(t);
}

/*
 * Closes the transport. Graceful: queued bytes are written first (the caller bounds how long it
 * waits, and may call again with graceful false to stop waiting). on_close follows, later.
 */
static inline void mg_transport_close(mg_transport_t *t, bool graceful)
{
    t->ops->close(t, graceful);
}

/*
 * Dials host:port over TCP (a name is resolved asynchronously) with TCP_NODELAY, and acks every
 * read at once (TCP_QUICKACK) so delayed ACKs cannot stall a request. Returns 0 and *out, then
 * on_connect follows; or MG_EINVAL / MG_ENOMEM / a negative libuv code at once.
 */
int mg_tcp_transport_connect(uv_loop_t *loop, const char *host, int port,
                             const mg_transport_cbs_t *cbs, void *data, mg_transport_t **out);

#endif
