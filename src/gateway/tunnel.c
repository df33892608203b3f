/*
 * The agent endpoint (docs/tunnel.md): WebSockets from users' moongate-agents, each of which
 * becomes the transport under one SSH connection in that user's pool. See tunnel.h.
 *
 * A tunnel (tun_t) is one agent WebSocket: an upgraded client connection of the HTTP server,
 * with wslay framing on it. SSH bytes from the session above wait in `out`, are framed when the
 * session flushes, and go to the server's queue as fast as it takes them (send_cb stops at its
 * high-water mark and on_ws_drain goes on). Frames from the agent are read without buffering
 * (no_buffering): their payload goes straight to the session, chunk by chunk.
 *
 * A tunnel is freed once the server has closed its connection and, if it carried an SSH
 * connection, that connection has closed its transport and been told (on_close).
 */
#include "tunnel.h"

#include "core/buf.h"
#include "moongate/list.h"
#include "moongate/error.h"
#include "moongate/log.h"
#include "moongate/tunnel_protocol.h"
#include "request.h"

#include <openssl/evp.h>
#include <openssl/sha.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <wslay/wslay.h>

#define LOG "tunnel"
#define WS_CHUNK (64 * 1024)
#define SPARE_INBUF_MAX (64 * 1024)
#define PING_AFTER_MS 30000         /* of quiet */
#define HANGUP_AFTER_MS 45000       /* of quiet, a ping unanswered */
#define CLOSE_WAIT_MS 2000          /* for the agent's close frame after ours */
#define WS_GUID "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

typedef struct tun tun_t;
typedef struct tun_user tun_user_t;
typedef struct pending pending_t;

struct tun {
    mg_transport_t base;        /* under the SSH connection, once attached */
    mg_tunnel_t *t;
    tun_user_t *u;              /* NULL for a tunnel refused after the upgrade */
    mg_client_t *c;             /* NULL once the server closed the connection */
    wslay_event_context_ptr ws;
    char agent_id[MG_TUNNEL_AGENT_ID_MAX + 1];
    char remote[64];
    uint64_t opened_at;
    uv_timer_t defer;           /* on_close and buffered input, on the loop's next turn */
    uv_timer_t ka;              /* keepalive, and the wait for a close frame */
    int handles;
    uint64_t last_rx;           /* loop time of the last byte from the agent */
    uint64_t close_deadline;    /* after our close frame; 0 before */
    bool ping_sent;
    mg__buf_t out;              /* SSH bytes not framed yet */
    mg__buf_t in;               /* SSH bytes that came before the SSH connection did */
    const char *rx;             /* what wslay reads from, during on_ws_read */
    size_t rx_len;
    bool in_recv;               /* inside wslay_event_recv */
    /* Frame headers, followed beside wslay (see frame_guard()). */
    uint8_t fh[14];
    int fh_have, fh_need;
    uint64_t fh_skip;
    bool msg_binary;            /* the message being received carries SSH bytes */
    bool frame_data;            /* the frame being received is part of it */
    bool attached;
    bool closing;               /* our close frame is queued */
    bool transport_closed;      /* the SSH connection closed its transport */
    bool told_closed;           /* on_close was called */
    bool told_eof;              /* on_eof was called */
    bool replaced;              /* a newer session of the same agent took its place */
    bool owe_drain;
    mg_list_t node;             /* on its user's tuns, once joined */
};

struct tun_user {
    char id[MG_USER_ID_MAX + 1];
    mg_list_t tuns;             /* newest first */
    int ntuns;
    mg_list_t pending;          /* pending_t, the newest first */
    mg_list_t node;             /* on t->users */
};

struct pending {
    mg_tunnel_t *t;
    tun_user_t *u;
    mg_pool_conn_t *pc;
    mg_ssh_conn_opts_t o;
    char *strings[7];
    mg_ssh_conn_cb cb;
    uv_timer_t timer;
    mg_list_t node;             /* on u->pending */
};

struct mg_tunnel {
    mg_tunnel_env_t *env;
    mg_list_t users;
    int count;
    bool draining;
};

static void ws_send(tun_t *tun);
static void tun_close_ws(tun_t *tun, int code, const char *reason);

/* ---- users ---- */

static tun_user_t *user_get(mg_tunnel_t *t, const char *id, bool create)
{
    mg_list_t *n;
    mg_list_foreach(n, &t->users) {
        tun_user_t *u = mg_list_entry(n, tun_user_t, node);
        if (strcmp(u->id, id) == 0)
            return u;
    }
    if (!create)
        return NULL;
    tun_user_t *u = calloc(1, sizeof(*u));
    if (u == NULL)
        return NULL;
    snprintf(u->id, sizeof(u->id), "%s", id);
    mg_list_init(&u->tuns);
    mg_list_init(&u->pending);
    mg_list_insert_head(&t->users, &u->node);
    return u;
}

static void user_maybe_free(mg_tunnel_t *t, tun_user_t *u)
{
    if (!mg_list_empty(&u->tuns) || !mg_list_empty(&u->pending))
        return;
    mg_list_remove(&u->node);
    free(u);
}

static int user_limit(mg_tunnel_t *t, const char *user)
{
    mg_pool_user_stats_t us;
    if (mg_pool_user_stats(t->env->pool, user, &us) == 0 && us.limits.max_connections > 0)
        return us.limits.max_connections;
    mg_pool_limits_t lim;
    mg_policy_limits(t->env->policy, user, &lim);
    return lim.max_connections > 0 ? lim.max_connections
                                   : t->env->settings->max_connections_per_user;
}

static const char *user_name(const tun_t *tun)
{
    return tun->u ? tun->u->id : "-";
}

/* ---- the WebSocket's framing (wslay) ---- */

static void update_queued(tun_t *tun)
{
    size_t q = mg__buf_size(&tun->out);
    if (tun->ws)
        q += wslay_event_get_queued_msg_length(tun->ws);
    if (tun->c)
        q += mg_client_queued(tun->c);
    tun->base.write_queued = q;
}

static ssize_t recv_cb(wslay_event_context_ptr ctx, uint8_t *buf, size_t len, int flags,
                       void *arg)
{
    tun_t *tun = arg;
    if (tun->rx_len == 0) {
        wslay_event_set_error(ctx, WSLAY_ERR_WOULDBLOCK);
        return -1;
    }
    size_t n = len < tun->rx_len ? len : tun->rx_len;
    memcpy(buf, tun->rx, n);
    tun->rx += n;
    tun->rx_len -= n;
    return (ssize_t)n;
}

static ssize_t send_cb(wslay_event_context_ptr ctx, const uint8_t *data, size_t len, int flags,
                       void *arg)
{
    tun_t *tun = arg;
    if (tun->c == NULL) {
        wslay_event_set_error(ctx, WSLAY_ERR_CALLBACK_FAILURE);
        return -1;
    }
    if (mg_client_queued(tun->c) > MG_CLIENT_HIGH_WATER) {
        wslay_event_set_error(ctx, WSLAY_ERR_WOULDBLOCK);
        return -1; /* on_ws_drain goes on */
    }
    if (mg_client_raw_write(tun->c, (const char *)data, len) != 0) {
        wslay_event_set_error(ctx, WSLAY_ERR_CALLBACK_FAILURE);
        return -1;
    }
    return (ssize_t)len;
}

/* SSH bytes from the agent: to the session, or kept until it starts. */
static void deliver(tun_t *tun, const char *data, size_t len)
{
    if (len == 0 || tun->transport_closed || tun->told_eof)
        return;
    if (!tun->attached || mg__buf_size(&tun->in) > 0) {
        if (mg__buf_size(&tun->in) + len > SPARE_INBUF_MAX ||
            mg__buf_append(&tun->in, data, len) != 0)
            tun_close_ws(tun, MG_TUNNEL_CLOSE_INTERNAL, "too much data before SSH");
        return;
    }
    tun->base.bytes_in += len;
    tun->base.cbs->on_read(&tun->base, data, len);
}

static void on_frame_start(wslay_event_context_ptr ctx,
                           const struct wslay_event_on_frame_recv_start_arg *arg, void *p)
{
    tun_t *tun = p;
    if (arg->opcode == WSLAY_BINARY_FRAME || arg->opcode == WSLAY_TEXT_FRAME)
        tun->msg_binary = arg->opcode == WSLAY_BINARY_FRAME;
    /* Text frames from agents are not defined: ignored, as the protocol says. */
    tun->frame_data = (arg->opcode == WSLAY_BINARY_FRAME ||
                       arg->opcode == WSLAY_CONTINUATION_FRAME) &&
                      tun->msg_binary;
}

static void on_frame_chunk(wslay_event_context_ptr ctx,
                           const struct wslay_event_on_frame_recv_chunk_arg *arg, void *p)
{
    tun_t *tun = p;
    if (tun->frame_data)
        deliver(tun, (const char *)arg->data, arg->data_length);
}

static void on_msg(wslay_event_context_ptr ctx, const struct wslay_event_on_msg_recv_arg *arg,
                   void *p)
{
    tun_t *tun = p;
    if (arg->opcode == WSLAY_CONNECTION_CLOSE)
        mg_log_debug(LOG, "user=%s agent=%s closes: code %d", user_name(tun), tun->agent_id,
                     arg->status_code);
}

static const struct wslay_event_callbacks ws_cbs = {
    .recv_callback = recv_cb,
    .send_callback = send_cb,
    .on_frame_recv_start_callback = on_frame_start,
    .on_frame_recv_chunk_callback = on_frame_chunk,
    .on_msg_recv_callback = on_msg,
};

/* Whether both directions are done: then the connection closes. */
static void ws_check_done(tun_t *tun)
{
    if (tun->c && !wslay_event_want_read(tun->ws) && !wslay_event_want_write(tun->ws))
        mg_client_raw_close(tun->c, true);
}

/* Sends what wslay holds, as far as the server's queue takes it. */
static void ws_send(tun_t *tun)
{
    if (tun->c == NULL || tun->in_recv)
        return;
    if (wslay_event_want_write(tun->ws) && wslay_event_send(tun->ws) != 0) {
        mg_client_raw_close(tun->c, false);
        return;
    }
    update_queued(tun);
    ws_check_done(tun);
}

static void ka_arm(tun_t *tun);

/* Queues a close frame (once); the connection closes when the agent answers, or after a bit. */
static void tun_close_ws(tun_t *tun, int code, const char *reason)
{
    if (tun->c == NULL || tun->closing)
        return;
    tun->closing = true;
    wslay_event_queue_close(tun->ws, (uint16_t)code, (const uint8_t *)reason, strlen(reason));
    tun->close_deadline = uv_now(tun->t->env->loop) + CLOSE_WAIT_MS;
    ka_arm(tun);
    ws_send(tun);
}

/* ---- the server's stream callbacks ---- */

/*
 * wslay reports a frame only once a byte of its payload has come, so a header announcing
 * 2^62 bytes would sit there unanswered; and it closes a control frame over 125 bytes without
 * a status. This follows the frame boundaries in the same bytes and, as soon as such a header
 * is complete, returns the close code it deserves (1009, 1002); 0 while all is well.
 */
static int frame_guard(tun_t *tun, const unsigned char *p, size_t len)
{
    size_t i = 0;
    while (i < len) {
        if (tun->fh_skip > 0) {
            size_t n = len - i < tun->fh_skip ? len - i : (size_t)tun->fh_skip;
            tun->fh_skip -= n;
            i += n;
            continue;
        }
        tun->fh[tun->fh_have++] = p[i++];
        if (tun->fh_have == 2) {
            int l7 = tun->fh[1] & 0x7f;
            tun->fh_need = 2 + (l7 == 126 ? 2 : l7 == 127 ? 8 : 0) + ((tun->fh[1] & 0x80) ? 4 : 0);
        }
        if (tun->fh_have < 2 || tun->fh_have < tun->fh_need)
            continue;
        int l7 = tun->fh[1] & 0x7f;
        uint64_t plen = (uint64_t)l7;
        if (l7 == 126)
            plen = (uint64_t)tun->fh[2] << 8 | tun->fh[3];
        else if (l7 == 127)
            for (int k = 0; k < 8; k++)
                plen = (k ? plen << 8 : 0) | tun->fh[2 + k];
        tun->fh_have = 0;
        if ((tun->fh[0] & 0x08) && (plen > 125 || !(tun->fh[0] & 0x80)))
            return MG_TUNNEL_CLOSE_PROTOCOL_ERROR; /* a control frame: short and whole (5.5) */
        if (plen > MG_TUNNEL_MESSAGE_MAX)
            return MG_TUNNEL_CLOSE_TOO_BIG;
        tun->fh_skip = plen;
    }
    return 0;
}

static void on_ws_read(void *arg, const char *data, size_t len)
{
    tun_t *tun = arg;
    tun->last_rx = uv_now(tun->t->env->loop);
    tun->ping_sent = false;
    int bad = tun->closing ? 0 : frame_guard(tun, (const unsigned char *)data, len);
    if (bad != 0) {
        bool big = bad == MG_TUNNEL_CLOSE_TOO_BIG;
        mg_log_warn(LOG, "user=%s agent=%s sent %s; closing with %d", user_name(tun),
                    tun->agent_id, big ? "a frame over 1 MiB" : "a malformed control frame", bad);
        wslay_event_shutdown_read(tun->ws);
        tun_close_ws(tun, bad, big ? "message too big" : "protocol error");
        return;
    }
    tun->rx = data;
    tun->rx_len = len;
    tun->in_recv = true;
    int rc = wslay_event_recv(tun->ws);
    tun->in_recv = false;
    tun->rx_len = 0;
    if (rc != 0 && tun->c)
        mg_log_info(LOG, "user=%s agent=%s sent a malformed frame; closing", user_name(tun),
                    tun->agent_id);
    /* A frame over 1 MiB, an unmasked frame or a bad header queued a close (1009, 1002): it
       goes now, and the connection after it. */
    if (!wslay_event_get_read_enabled(tun->ws) && !tun->closing &&
        !wslay_event_get_close_received(tun->ws)) {
        tun->closing = true;
        tun->close_deadline = uv_now(tun->t->env->loop) + CLOSE_WAIT_MS;
        ka_arm(tun);
    }
    ws_send(tun);
}

static void on_ws_drain(void *arg)
{
    tun_t *tun = arg;
    ws_send(tun);
    if (tun->owe_drain && tun->attached && !tun->transport_closed &&
        tun->base.write_queued < MG_CLIENT_HIGH_WATER) {
        tun->owe_drain = false;
        tun->base.cbs->on_drain(&tun->base);
    }
}

static void on_tun_handle_closed(uv_handle_t *h)
{
    tun_t *tun = h->data;
    if (--tun->handles > 0)
        return;
    if (tun->ws)
        wslay_event_context_free(tun->ws);
    mg__buf_free(&tun->out);
    mg__buf_free(&tun->in);
    free(tun);
}

static void tun_free(tun_t *tun)
{
    uv_close((uv_handle_t *)&tun->defer, on_tun_handle_closed);
    uv_close((uv_handle_t *)&tun->ka, on_tun_handle_closed);
}

static void on_defer(uv_timer_t *h)
{
    tun_t *tun = h->data;
    if (tun->transport_closed && (tun->c == NULL || tun->replaced) && !tun->told_closed) {
        tun->told_closed = true;
        tun->base.cbs->on_close(&tun->base);
        if (tun->c == NULL) {
            tun_free(tun);
            return;
        }
        /* Replaced: its SSH connection is gone; the WebSocket closes on its own, and is freed
           then as one never attached. */
        tun->attached = false;
        return;
    }
    /* Bytes that arrived before the SSH connection: hand them over now. */
    if (tun->attached && !tun->transport_closed && mg__buf_size(&tun->in) > 0) {
        mg__buf_t in = tun->in;
        tun->in = (mg__buf_t){ 0 };
        tun->base.bytes_in += mg__buf_size(&in);
        tun->base.cbs->on_read(&tun->base, in.data + in.off, mg__buf_size(&in));
        mg__buf_free(&in);
    }
}

static void tun_unlink(tun_t *tun)
{
    mg_list_remove(&tun->node);
    tun->u->ntuns--;
    tun->t->count--;
    mg_gauge_set(tun->t->env->agent_connections, tun->t->count);
}

static void event(mg_tunnel_t *t, const char *type, const char *user, const char *msg)
{
    mg_policy_event_t ev = { .type = type, .user = user, .message = msg };
    mg_policy_event(t->env->policy, &ev);
}

/* The SSH connection over tun learns, once, that its stream has ended. */
static void tell_eof(tun_t *tun)
{
    if (!tun->attached || tun->transport_closed || tun->told_eof)
        return;
    tun->told_eof = true;
    tun->base.cbs->on_eof(&tun->base, UV_EOF);
}

static void on_ws_close(void *arg)
{
    tun_t *tun = arg;
    mg_tunnel_t *t = tun->t;
    tun->c = NULL;
    uv_timer_stop(&tun->ka);
    tun_user_t *u = tun->u;
    if (u == NULL) { /* refused after the upgrade: it never joined */
        tun_free(tun);
        return;
    }
    mg_log_info(LOG, "user=%s agent=%s disconnected", u->id, tun->agent_id);
    event(t, "agent_left", u->id, tun->agent_id);
    tun_unlink(tun);
    tun->u = NULL;
    user_maybe_free(t, u);
    if (!tun->attached) {
        tun_free(tun);
        return;
    }
    if (!tun->transport_closed) {
        tell_eof(tun); /* the SSH connection closes the transport next */
        return;
    }
    uv_timer_start(&tun->defer, on_defer, 0, 0);
}

static const mg_client_raw_cbs_t raw_cbs = {
    .on_read = on_ws_read,
    .on_drain = on_ws_drain,
    .on_close = on_ws_close,
};

/* ---- keepalive ---- */

static void on_ka(uv_timer_t *h);

static void ka_arm(tun_t *tun)
{
    if (tun->c == NULL)
        return;
    uint64_t due = tun->closing ? tun->close_deadline
                                : tun->last_rx + (tun->ping_sent ? HANGUP_AFTER_MS : PING_AFTER_MS);
    uint64_t now = uv_now(tun->t->env->loop);
    uv_timer_start(&tun->ka, on_ka, due > now ? due - now : 0, 0);
}

static void on_ka(uv_timer_t *h)
{
    tun_t *tun = h->data;
    if (tun->c == NULL)
        return;
    uint64_t now = uv_now(tun->t->env->loop);
    if (tun->closing) {
        if (now >= tun->close_deadline) {
            mg_client_raw_close(tun->c, false);
            return;
        }
    } else if (now - tun->last_rx >= HANGUP_AFTER_MS) {
        mg_log_info(LOG, "user=%s agent=%s silent for %d ms; hanging up", user_name(tun),
                    tun->agent_id, HANGUP_AFTER_MS);
        mg_client_raw_close(tun->c, false);
        return;
    } else if (now - tun->last_rx >= PING_AFTER_MS && !tun->ping_sent) {
        struct wslay_event_msg ping = { WSLAY_PING, (const uint8_t *)"", 0 };
        tun->ping_sent = true;
        wslay_event_queue_msg(tun->ws, &ping);
        ws_send(tun);
    }
    ka_arm(tun);
}

/* ---- the WebSocket as a transport ---- */

static int tun_write(mg_transport_t *base, const void *buf, size_t len)
{
    tun_t *tun = (tun_t *)base;
    if (tun->c == NULL || tun->transport_closed || tun->closing)
        return MG_ECLOSED;
    int rc = mg__buf_append(&tun->out, buf, len);
    if (rc == 0)
        base->write_queued += len;
    return rc;
}

static void tun_flush(mg_transport_t *base)
{
    tun_t *tun = (tun_t *)base;
    if (tun->c == NULL)
        return;
    while (mg__buf_size(&tun->out) > 0) {
        size_t n = mg__buf_size(&tun->out);
        if (n > WS_CHUNK)
            n = WS_CHUNK;
        struct wslay_event_msg m = { WSLAY_BINARY_FRAME,
                                     (const uint8_t *)tun->out.data + tun->out.off, n };
        if (wslay_event_queue_msg(tun->ws, &m) != 0)
            break;
        tun->base.bytes_out += n;
        mg__buf_consume(&tun->out, n, 256 * 1024);
    }
    ws_send(tun);
    if (tun->base.write_queued > 0)
        tun->owe_drain = true;
}

static void tun_close(mg_transport_t *base, bool graceful)
{
    tun_t *tun = (tun_t *)base;
    if (tun->transport_closed)
        return;
    tun->transport_closed = true;
    if (tun->c == NULL) {
        uv_timer_start(&tun->defer, on_defer, 0, 0);
        return;
    }
    if (!graceful)
        mg__buf_consume(&tun->out, mg__buf_size(&tun->out), 0);
    else
        tun_flush(base);
    mg_tunnel_t *t = tun->t;
    tun_close_ws(tun, MG_TUNNEL_CLOSE_NORMAL,
                 t->draining ? t->env->drain_message : "SSH connection closed");
    /* A replaced session's agent may never answer the close: its SSH connection need not wait
       for that to free its place in the pool. */
    if (tun->replaced)
        uv_timer_start(&tun->defer, on_defer, 0, 0);
}

static void tun_trim(mg_transport_t *base)
{
    tun_t *tun = (tun_t *)base;
    if (mg__buf_size(&tun->out) == 0)
        mg__buf_free(&tun->out);
}

static const mg_transport_ops_t tun_ops = {
    .write = tun_write,
    .flush = tun_flush,
    .close = tun_close,
    .trim = tun_trim,
    .name = "agent websocket",
};

/* ---- pending opens ---- */

static void on_pending_closed(uv_handle_t *h)
{
    pending_t *p = h->data;
    for (int i = 0; i < 7; i++)
        free(p->strings[i]);
    free(p);
}

static void pending_remove(pending_t *p)
{
    mg_list_remove(&p->node);
    tun_user_t *u = p->u;
    uv_close((uv_handle_t *)&p->timer, on_pending_closed);
    user_maybe_free(p->t, u);
}

static void attach(mg_tunnel_t *t, tun_t *tun, const mg_ssh_conn_opts_t *o, mg_ssh_conn_cb cb,
                   mg_pool_conn_t *pc)
{
    tun->attached = true;
    mg_ssh_conn_t *c;
    int rc = mg_ssh_conn_start(t->env->loop, o, &tun->base, cb, pc, &c);
    if (rc != 0) {
        tun->attached = false;
        mg_pool_conn_failed(pc, rc, "cannot start an SSH connection over the agent");
        return;
    }
    mg_pool_conn_set_backend_data(pc, c);
    mg_log_info(LOG, "user=%s agent=%s carries SSH connection %llu", user_name(tun),
                tun->agent_id, (unsigned long long)mg_ssh_conn_id(c));
    if (mg__buf_size(&tun->in) > 0)
        uv_timer_start(&tun->defer, on_defer, 0, 0);
}

static void on_pending_timeout(uv_timer_t *h)
{
    pending_t *p = h->data;
    char msg[256];
    snprintf(msg, sizeof(msg), "the agent of user %s opened no further connection within %llu ms",
             p->u->id, (unsigned long long)p->o.connect_timeout_ms);
    mg_pool_conn_t *pc = p->pc;
    pending_remove(p);
    mg_pool_conn_failed(pc, MG_ETIMEDOUT, msg);
}

static tun_t *spare_of(tun_user_t *u)
{
    mg_list_t *n;
    mg_list_foreach(n, &u->tuns) {
        tun_t *tun = mg_list_entry(n, tun_t, node);
        if (!tun->attached && tun->c && !tun->closing)
            return tun;
    }
    return NULL;
}

/* Asks an agent for one more WebSocket now. */
static void ask_open(tun_t *tun)
{
    static const char msg[] = MG_TUNNEL_CONTROL_OPEN;
    struct wslay_event_msg m = { WSLAY_TEXT_FRAME, (const uint8_t *)msg, sizeof(msg) - 1 };
    if (tun->c && !tun->closing && wslay_event_queue_msg(tun->ws, &m) == 0)
        ws_send(tun);
}

int mg_tunnel_agent_open(void *arg, mg_pool_conn_t *pc, const mg_ssh_conn_opts_t *o,
                         mg_ssh_conn_cb cb, char *err, size_t errlen)
{
    mg_tunnel_t *t = arg;
    tun_user_t *u = user_get(t, o->user, false);
    if (u == NULL || u->ntuns == 0) {
        snprintf(err, errlen, "the agent of user %s is not connected", o->user);
        return MG_ECONNECT;
    }
    tun_t *spare = spare_of(u);
    if (spare != NULL) {
        attach(t, spare, o, cb, pc);
        return 0;
    }
    pending_t *p = calloc(1, sizeof(*p));
    if (p == NULL) {
        snprintf(err, errlen, "out of memory");
        return MG_ENOMEM;
    }
    p->t = t;
    p->u = u;
    p->pc = pc;
    p->cb = cb;
    p->o = *o;
    const char **fields[7] = { &p->o.user, &p->o.host, &p->o.ssh_user, &p->o.key_path,
                               &p->o.key_passphrase, &p->o.known_hosts, &p->o.host_key_sha256 };
    for (int i = 0; i < 7; i++)
        if (*fields[i] != NULL)
            *fields[i] = p->strings[i] = strdup(*fields[i]);
    uv_timer_init(t->env->loop, &p->timer);
    p->timer.data = p;
    uv_timer_start(&p->timer, on_pending_timeout, o->connect_timeout_ms, 0);
    mg_list_insert_tail(&u->pending, &p->node);
    /* The newest of the user's agents is asked. */
    if (!mg_list_empty(&u->tuns))
        ask_open(mg_list_entry(mg_list_first(&u->tuns), tun_t, node));
    mg_log_debug(LOG, "user=%s asked the agent for another connection", u->id);
    return 0;
}

void mg_tunnel_agent_cancel(void *arg, mg_pool_conn_t *pc)
{
    mg_tunnel_t *t = arg;
    mg_list_t *un, *pn;
    mg_list_foreach(un, &t->users) {
        tun_user_t *u = mg_list_entry(un, tun_user_t, node);
        mg_list_foreach(pn, &u->pending) {
            pending_t *p = mg_list_entry(pn, pending_t, node);
            if (p->pc == pc) {
                pending_remove(p); /* may free u: return at once */
                mg_pool_conn_failed(pc, MG_ECANCELED, "closed before the agent connected");
                return;
            }
        }
    }
}

/* ---- the upgrade ---- */

static const mg_http1_header_t *field(const mg_http1_req_head_t *h, const char *name)
{
    return mg_http1_header_find(h->headers, h->nheaders, name);
}

static bool lists(const mg_http1_req_head_t *h, const char *name, const char *token)
{
    return mg_http1_header_lists(h->headers, h->nheaders, name, token, strlen(token));
}

static bool agent_id_valid(const char *s, size_t n)
{
    if (n < MG_TUNNEL_AGENT_ID_MIN || n > MG_TUNNEL_AGENT_ID_MAX)
        return false;
    for (size_t i = 0; i < n; i++)
        if (!((s[i] >= 'a' && s[i] <= 'z') || (s[i] >= 'A' && s[i] <= 'Z') ||
              (s[i] >= '0' && s[i] <= '9') || s[i] == '-' || s[i] == '_'))
            return false;
    return true;
}

/* Sec-WebSocket-Accept for key (RFC 6455 4.2.2). Returns false for a key that is not 16
   bytes in base64. */
static bool accept_key(const mg_http1_header_t *key, char out[32])
{
    unsigned char raw[32];
    if (key == NULL || key->value_len != 24 ||
        EVP_DecodeBlock(raw, (const unsigned char *)key->value, 24) != 18 ||
        key->value[22] != '=' || key->value[23] != '=')
        return false;
    char buf[24 + sizeof(WS_GUID)];
    memcpy(buf, key->value, 24);
    memcpy(buf + 24, WS_GUID, sizeof(WS_GUID) - 1);
    unsigned char digest[SHA_DIGEST_LENGTH];
    SHA1((const unsigned char *)buf, 24 + sizeof(WS_GUID) - 1, digest);
    EVP_EncodeBlock((unsigned char *)out, digest, SHA_DIGEST_LENGTH);
    return true;
}

/*
 * Runs agent_auth. Returns 0 with the user, or the HTTP status to refuse with and why.
 */
static int authenticate(mg_tunnel_t *t, mg_client_t *c, const mg_http1_req_head_t *h,
                        char *user, char *agent_id, char *why, size_t whylen)
{
    const mg_http1_header_t *aid = field(h, MG_TUNNEL_AGENT_ID_HEADER);
    if (aid == NULL || !agent_id_valid(aid->value, aid->value_len)) {
        snprintf(why, whylen, "missing or invalid " MG_TUNNEL_AGENT_ID_HEADER " header");
        return 400;
    }
    memcpy(agent_id, aid->value, aid->value_len);
    agent_id[aid->value_len] = '\0';
    const mg_http1_header_t *auth = field(h, "authorization");
    if (auth == NULL || auth->value_len <= 7 || strncasecmp(auth->value, "Bearer ", 7) != 0) {
        snprintf(why, whylen, "missing bearer token");
        return 401;
    }
    mg_policy_header_t hdrs[] = { { "authorization", auth->value },
                                  { "x-moongate-agent", agent_id } };
    mg_policy_request_t req = {
        .method = h->method,
        .path = h->target,
        .remote_addr = mg_client_remote(c),
        .headers = hdrs,
        .nheaders = 2,
    };
    mg_policy_decision_t d;
    mg_policy_state_t *st = mg_policy_acquire(t->env->policy);
    int rc = mg_policy_agent_auth(st, auth->value + 7, &req, &d);
    mg_policy_release(st);
    if (rc != 0 || !d.allow) {
        snprintf(why, whylen, "%s", d.message[0] ? d.message : "token refused");
        return d.status ? d.status : 401;
    }
    snprintf(user, MG_USER_ID_MAX + 1, "%s", d.user);
    return 0;
}

static void refuse(mg_client_t *c, const mg_http1_req_head_t *h, int status, const char *why,
                   const mg_policy_decision_t *d)
{
    char id[MG_HTTP1_REQUEST_ID_MAX + 1];
    mg_req_id(h, id);
    mg_req_respond_error(c, MG_ERROR_FORMAT_PLAIN, id, status, why, d);
}

static tun_t *tun_new(mg_tunnel_t *t, mg_client_t *c)
{
    tun_t *tun = calloc(1, sizeof(*tun));
    if (tun == NULL)
        return NULL;
    mg_list_init(&tun->node);
    if (wslay_event_context_server_init(&tun->ws, &ws_cbs, tun) != 0) {
        free(tun);
        return NULL;
    }
    wslay_event_config_set_no_buffering(tun->ws, 1);
    wslay_event_config_set_max_recv_msg_length(tun->ws, MG_TUNNEL_MESSAGE_MAX);
    tun->base.ops = &tun_ops;
    tun->base.connected = true;
    tun->t = t;
    tun->c = c;
    tun->opened_at = tun->last_rx = uv_now(t->env->loop);
    snprintf(tun->remote, sizeof(tun->remote), "%s", mg_client_remote(c));
    uv_timer_init(t->env->loop, &tun->defer);
    uv_timer_init(t->env->loop, &tun->ka);
    tun->defer.data = tun->ka.data = tun;
    tun->handles = 2;
    return tun;
}

/* The user's sessions that count against the limit: not those closing (a replaced one waits
   up to CLOSE_WAIT_MS for its agent's close frame, and must not take a newer one's place). */
static int live_tuns(tun_user_t *u)
{
    int n = 0;
    mg_list_t *node;
    mg_list_foreach(node, &u->tuns) {
        if (!mg_list_entry(node, tun_t, node)->closing)
            n++;
    }
    return n;
}

/* The upgraded WebSocket joins its user, or is closed with 1008 over the limit. */
static void join(mg_tunnel_t *t, tun_t *tun, const char *user)
{
    tun_user_t *u = user_get(t, user, true);
    if (u == NULL) {
        tun_close_ws(tun, MG_TUNNEL_CLOSE_INTERNAL, "out of memory");
        return;
    }
    int limit = user_limit(t, user);
    tun_t *replaced = NULL;
    if (live_tuns(u) >= limit) {
        tun_t *old = NULL;
        mg_list_t *n;
        mg_list_foreach(n, &u->tuns) {
            tun_t *x = mg_list_entry(n, tun_t, node);
            if (strcmp(x->agent_id, tun->agent_id) == 0 && !x->closing &&
                (old == NULL || x->opened_at < old->opened_at))
                old = x;
        }
        if (old == NULL) {
            char why[120];
            snprintf(why, sizeof(why),
                     "connection limit: at most %d agent connections for this user", limit);
            mg_log_warn(LOG, "user=%s agent=%s refused: %s", user, tun->agent_id, why);
            user_maybe_free(t, u);
            tun_close_ws(tun, MG_TUNNEL_CLOSE_POLICY, why);
            return;
        }
        /* The same agent again: its older session is one it lost (a network cut). It may
           never answer our close frame, so its SSH connection is told at once that it ended
           and let go (below, once the new session can take the next connection). */
        mg_log_info(LOG, "user=%s agent=%s reconnected; replacing its oldest session", user,
                    tun->agent_id);
        tun_close_ws(old, MG_TUNNEL_CLOSE_NORMAL, "replaced by a newer session");
        replaced = old;
    }
    tun->u = u;
    mg_list_insert_head(&u->tuns, &tun->node);
    u->ntuns++;
    t->count++;
    mg_gauge_set(t->env->agent_connections, t->count);
    mg_log_info(LOG, "user=%s agent=%s connected (%d of %d)", u->id, tun->agent_id,
                live_tuns(u), limit);
    event(t, "agent_joined", u->id, tun->agent_id);

    /* The oldest waiting open takes it. */
    if (!mg_list_empty(&u->pending)) {
        pending_t *p = mg_list_entry(mg_list_first(&u->pending), pending_t, node);
        mg_ssh_conn_opts_t o = p->o;
        attach(t, tun, &o, p->cb, p->pc); /* copies the strings before the pending goes */
        pending_remove(p);
    }
    if (replaced != NULL) {
        replaced->replaced = true;
        tell_eof(replaced);
    }
}

bool mg_tunnel_match(const char *target, size_t len)
{
    return len == sizeof(MG_TUNNEL_PATH) - 1 && memcmp(target, MG_TUNNEL_PATH, len) == 0;
}

mg_server_req_t *mg_tunnel_serve(mg_tunnel_t *t, mg_client_t *c, const mg_http1_req_head_t *h)
{
    const char *remote = mg_client_remote(c);
    if (!h->upgrade || !lists(h, "upgrade", "websocket")) {
        mg_policy_decision_t d = { .nheaders = 1 };
        snprintf(d.headers[0].name, sizeof(d.headers[0].name), "Upgrade");
        snprintf(d.headers[0].value, sizeof(d.headers[0].value), "websocket");
        refuse(c, h, 426, "agents connect here with a WebSocket upgrade", &d);
        return NULL;
    }
    const mg_http1_header_t *ver = field(h, "sec-websocket-version");
    if (ver == NULL || ver->value_len != 2 || memcmp(ver->value, "13", 2) != 0) {
        mg_policy_decision_t d = { .nheaders = 1 };
        snprintf(d.headers[0].name, sizeof(d.headers[0].name), "Sec-WebSocket-Version");
        snprintf(d.headers[0].value, sizeof(d.headers[0].value), "13");
        refuse(c, h, 426, "WebSocket version 13 required", &d);
        return NULL;
    }
    char accept[32];
    if (strcmp(h->method, "GET") != 0 || !accept_key(field(h, "sec-websocket-key"), accept)) {
        refuse(c, h, 400, "malformed WebSocket upgrade", NULL);
        return NULL;
    }
    if (!lists(h, "sec-websocket-protocol", MG_TUNNEL_SUBPROTOCOL)) {
        refuse(c, h, 400, "subprotocol " MG_TUNNEL_SUBPROTOCOL " required", NULL);
        return NULL;
    }
    if (t->draining) {
        refuse(c, h, 503, "shutting down", NULL);
        return NULL;
    }
    char user[MG_USER_ID_MAX + 1], agent_id[MG_TUNNEL_AGENT_ID_MAX + 1], why[256];
    int status = authenticate(t, c, h, user, agent_id, why, sizeof(why));
    if (status != 0) {
        mg_log_warn(LOG, "agent from %s refused (%d): %s", remote, status, why);
        refuse(c, h, status, why, NULL);
        return NULL;
    }
    tun_t *tun = tun_new(t, c);
    if (tun == NULL) {
        refuse(c, h, 500, "out of memory", NULL);
        return NULL;
    }
    snprintf(tun->agent_id, sizeof(tun->agent_id), "%s", agent_id);
    char head[256];
    int n = snprintf(head, sizeof(head),
                     "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                     "Connection: Upgrade\r\nSec-WebSocket-Accept: %s\r\n"
                     "Sec-WebSocket-Protocol: " MG_TUNNEL_SUBPROTOCOL "\r\n\r\n",
                     accept);
    if (mg_client_upgrade(c, head, (size_t)n, &raw_cbs, tun) != 0) {
        tun->c = NULL;
        tun_free(tun);
        refuse(c, h, 500, "cannot upgrade", NULL);
        return NULL;
    }
    ka_arm(tun);
    join(t, tun, user);
    return NULL;
}

/* ---- the module ---- */

int mg_tunnel_new(mg_tunnel_env_t *env, mg_tunnel_t **out)
{
    mg_tunnel_t *t = calloc(1, sizeof(*t));
    if (t == NULL)
        return MG_ENOMEM;
    mg_list_init(&t->users);
    t->env = env;
    *out = t;
    return 0;
}

void mg_tunnel_drain(mg_tunnel_t *t)
{
    t->draining = true;
    mg_list_t *un;
    mg_list_foreach(un, &t->users) {
        tun_user_t *u = mg_list_entry(un, tun_user_t, node);
        mg_list_t *n, *tmp;
        mg_list_foreach_safe(n, tmp, &u->tuns) {
            tun_t *tun = mg_list_entry(n, tun_t, node);
            if (!tun->attached)
                tun_close_ws(tun, MG_TUNNEL_CLOSE_NORMAL, t->env->drain_message);
        }
    }
}

int mg_tunnel_count(const mg_tunnel_t *t)
{
    return t->count;
}

void mg_tunnel_free(mg_tunnel_t *t)
{
    /* The server has closed every WebSocket by now; what remains are pending opens. */
    mg_list_t *un, *next;
    mg_list_foreach_safe(un, next, &t->users) {
        tun_user_t *u = mg_list_entry(un, tun_user_t, node);
        while (!mg_list_empty(&u->pending)) {
            pending_t *p = mg_list_entry(mg_list_first(&u->pending), pending_t, node);
            mg_list_remove(&p->node);
            uv_close((uv_handle_t *)&p->timer, on_pending_closed);
        }
        free(u);
    }
    free(t);
}
