/*
 * The agent endpoint (docs/tunnel.md): WebSockets from users' moongate-agents, each of which
 * becomes the transport under one SSH connection in that user's pool.
 *
 * A tunnel (tun_t) is one agent WebSocket. It arrives "spare" and waits until the pool needs a
 * connection for its user; the SSH backend then starts an mg_ssh_conn_t over it (attach). When
 * the pool needs a connection and no spare tunnel is there, the request waits as a pending open
 * while one of the user's agents is asked, with a control message, to open one more WebSocket.
 *
 * A tunnel is freed once lws has closed its WebSocket and, if it carried an SSH connection,
 * that connection has closed its transport and been told (on_close).
 */
#include "moongate/gateway.h"

#include "buf.h"
#include "moongate/error.h"
#include "moongate/log.h"

#include <libwebsockets.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#define TUNNEL_PROTOCOL "moongate-tunnel.v1"
#define MAX_MESSAGE (1024 * 1024)
#define WS_CHUNK (64 * 1024)
#define SPARE_INBUF_MAX (64 * 1024)
#define AGENT_ID_MAX 64
/* lws 4.1's LWS_WRITE_CLOSE: lws_write() frames it, but the public header hides the name. */
#define WRITE_CLOSE ((enum lws_write_protocol)4)

typedef struct tun tun_t;
typedef struct tun_user tun_user_t;
typedef struct pending pending_t;

struct tun {
    mg_transport_t base;        /* under the SSH connection, once attached */
    mg_tunnel_t *t;
    tun_user_t *u;
    struct lws *wsi;            /* NULL once lws closed the WebSocket */
    char agent_id[AGENT_ID_MAX + 1];
    uint64_t opened_at;
    uv_timer_t timer;           /* defers on_close and buffered input to the loop's next turn */
    mg__buf_t out;              /* binary bytes waiting for writable */
    mg__buf_t in;               /* bytes that came before the SSH connection did */
    size_t msg_bytes;           /* of the incoming message so far */
    bool attached;
    int send_open;              /* {"type":"open"} messages owed to the agent */
    bool closing;               /* send a close frame at the next writable */
    int close_code;
    char close_reason[120];
    bool transport_closed;      /* the SSH connection closed its transport */
    bool told_closed;           /* on_close was called */
    bool owe_drain;
    tun_t *next, *prev;
};

struct tun_user {
    char id[MG_USER_ID_MAX + 1];
    tun_t *tuns;
    int ntuns;
    pending_t *pending;
    tun_user_t *next;
};

struct pending {
    mg_tunnel_t *t;
    tun_user_t *u;
    mg_pool_conn_t *pc;
    mg_ssh_conn_opts_t o;
    char *strings[7];
    mg_ssh_conn_cb cb;
    uv_timer_t timer;
    pending_t *next;
};

struct mg_tunnel {
    mg_gateway_t *gw;
    tun_user_t *users;
    int count;
    bool draining;
};

typedef struct tun_pss {
    tun_t *tun;
    char user[MG_USER_ID_MAX + 1];
    char agent_id[AGENT_ID_MAX + 1];
} tun_pss_t;

static _Thread_local unsigned char ws_buf[LWS_PRE + WS_CHUNK];

/* ---- users ---- */

static tun_user_t *user_get(mg_tunnel_t *t, const char *id, bool create)
{
    for (tun_user_t *u = t->users; u; u = u->next)
        if (strcmp(u->id, id) == 0)
            return u;
    if (!create)
        return NULL;
    tun_user_t *u = calloc(1, sizeof(*u));
    if (u == NULL)
        return NULL;
    snprintf(u->id, sizeof(u->id), "%s", id);
    u->next = t->users;
    t->users = u;
    return u;
}

static void user_maybe_free(mg_tunnel_t *t, tun_user_t *u)
{
    if (u->tuns || u->pending)
        return;
    for (tun_user_t **pp = &t->users; *pp; pp = &(*pp)->next)
        if (*pp == u) {
            *pp = u->next;
            free(u);
            return;
        }
}

static int user_limit(mg_tunnel_t *t, const char *user)
{
    mg_pool_user_stats_t us;
    if (mg_pool_user_stats(t->gw->pool, user, &us) == 0 && us.limits.max_connections > 0)
        return us.limits.max_connections;
    mg_pool_limits_t lim;
    mg_policy_limits(t->gw->policy, user, &lim);
    return lim.max_connections > 0 ? lim.max_connections : t->gw->settings.max_connections_per_user;
}

/* ---- the WebSocket as a transport ---- */

static void tun_close_ws(tun_t *tun, int code, const char *reason)
{
    if (tun->wsi == NULL || tun->closing)
        return;
    tun->closing = true;
    tun->close_code = code;
    snprintf(tun->close_reason, sizeof(tun->close_reason), "%s", reason);
    lws_callback_on_writable(tun->wsi);
}

static int tun_write(mg_transport_t *base, const void *buf, size_t len)
{
    tun_t *tun = (tun_t *)base;
    if (tun->wsi == NULL || tun->transport_closed)
        return MG_ECLOSED;
    int rc = mg__buf_append(&tun->out, buf, len);
    if (rc == 0)
        base->write_queued += len;
    return rc;
}

static void tun_flush(mg_transport_t *base)
{
    tun_t *tun = (tun_t *)base;
    if (tun->wsi != NULL && tun->out.len > tun->out.off)
        lws_callback_on_writable(tun->wsi);
}

static void on_tun_timer_closed(uv_handle_t *h)
{
    tun_t *tun = h->data;
    mg__buf_free(&tun->out);
    mg__buf_free(&tun->in);
    free(tun);
}

static void tun_free(tun_t *tun)
{
    uv_close((uv_handle_t *)&tun->timer, on_tun_timer_closed);
}

static void on_tun_timer(uv_timer_t *h)
{
    tun_t *tun = h->data;
    if (tun->transport_closed && tun->wsi == NULL && !tun->told_closed) {
        tun->told_closed = true;
        tun->base.cbs->on_close(&tun->base);
        tun_free(tun);
        return;
    }
    /* Bytes that arrived before the SSH connection: hand them over now. */
    if (tun->attached && !tun->transport_closed && tun->in.len > tun->in.off) {
        mg__buf_t in = tun->in;
        tun->in = (mg__buf_t){ 0 };
        tun->base.cbs->on_read(&tun->base, in.data + in.off, in.len - in.off);
        mg__buf_free(&in);
    }
}

static void tun_close(mg_transport_t *base, bool graceful)
{
    tun_t *tun = (tun_t *)base;
    if (tun->transport_closed)
        return;
    tun->transport_closed = true;
    if (tun->wsi == NULL) {
        uv_timer_start(&tun->timer, on_tun_timer, 0, 0);
        return;
    }
    mg_tunnel_t *t = tun->t;
    tun_close_ws(tun, LWS_CLOSE_STATUS_NORMAL,
                 t->draining ? t->gw->drain_message : "SSH connection closed");
    if (!graceful) {
        tun->out.off = tun->out.len;
        base->write_queued = 0;
    }
}

static const mg_transport_ops_t tun_ops = {
    .write = tun_write,
    .flush = tun_flush,
    .close = tun_close,
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
    for (pending_t **pp = &p->u->pending; *pp; pp = &(*pp)->next)
        if (*pp == p) {
            *pp = p->next;
            break;
        }
    tun_user_t *u = p->u;
    uv_close((uv_handle_t *)&p->timer, on_pending_closed);
    user_maybe_free(p->t, u);
}

static void attach(mg_tunnel_t *t, tun_t *tun, const mg_ssh_conn_opts_t *o, mg_ssh_conn_cb cb,
                   mg_pool_conn_t *pc)
{
    tun->attached = true;
    mg_ssh_conn_t *c;
    int rc = mg_ssh_conn_start(t->gw->loop, o, &tun->base, cb, pc, &c);
    if (rc != 0) {
        tun->attached = false;
        mg_pool_conn_failed(pc, rc, "cannot start an SSH connection over the agent");
        return;
    }
    mg_pool_conn_set_backend_data(pc, c);
    mg_log_info("tunnel", "user=%s agent=%s carries SSH connection %llu", tun->u->id,
                tun->agent_id, (unsigned long long)mg_ssh_conn_id(c));
    if (tun->in.len > tun->in.off)
        uv_timer_start(&tun->timer, on_tun_timer, 0, 0);
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
    for (tun_t *tun = u->tuns; tun; tun = tun->next)
        if (!tun->attached && tun->wsi && !tun->closing)
            return tun;
    return NULL;
}

int mg__tunnel_agent_open(void *arg, mg_pool_conn_t *pc, const mg_ssh_conn_opts_t *o,
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
    uv_timer_init(t->gw->loop, &p->timer);
    p->timer.data = p;
    uv_timer_start(&p->timer, on_pending_timeout, o->connect_timeout_ms, 0);
    p->next = u->pending;
    u->pending = p;
    /* Ask the newest of the user's agents for one more WebSocket. */
    tun_t *ask = u->tuns;
    if (ask && ask->wsi) {
        ask->send_open++;
        lws_callback_on_writable(ask->wsi);
    }
    mg_log_debug("tunnel", "user=%s asked the agent for another connection", u->id);
    return 0;
}

void mg__tunnel_agent_cancel(void *arg, mg_pool_conn_t *pc)
{
    mg_tunnel_t *t = arg;
    for (tun_user_t *u = t->users; u; u = u->next)
        for (pending_t *p = u->pending; p; p = p->next)
            if (p->pc == pc) {
                pending_remove(p);
                mg_pool_conn_failed(pc, MG_ECANCELED, "closed before the agent connected");
                return;
            }
}

/* ---- the WebSocket's life ---- */

static void tun_unlink(tun_t *tun)
{
    tun_user_t *u = tun->u;
    if (tun->prev)
        tun->prev->next = tun->next;
    else
        u->tuns = tun->next;
    if (tun->next)
        tun->next->prev = tun->prev;
    u->ntuns--;
    tun->t->count--;
    mg_gauge_set(tun->t->gw->metrics.agent_connections, tun->t->count);
}

static void event(mg_tunnel_t *t, const char *type, const char *user, const char *msg)
{
    mg_policy_event_t ev = { .type = type, .user = user, .message = msg };
    mg_policy_event(t->gw->policy, &ev);
}

static int on_established(mg_tunnel_t *t, struct lws *wsi, tun_pss_t *pss)
{
    if (t->draining) {
        lws_close_reason(wsi, LWS_CLOSE_STATUS_GOINGAWAY, (unsigned char *)"shutting down", 13);
        return -1;
    }
    tun_user_t *u = user_get(t, pss->user, true);
    if (u == NULL)
        return -1;
    int limit = user_limit(t, pss->user);
    if (u->ntuns >= limit) {
        tun_t *old = NULL;
        for (tun_t *x = u->tuns; x; x = x->next)
            if (strcmp(x->agent_id, pss->agent_id) == 0 && !x->closing &&
                (old == NULL || x->opened_at < old->opened_at))
                old = x;
        if (old == NULL) {
            char why[120];
            int n = snprintf(why, sizeof(why),
                             "connection limit: at most %d agent connections for this user",
                             limit);
            mg_log_warn("tunnel", "user=%s agent=%s refused: %s", pss->user, pss->agent_id, why);
            lws_close_reason(wsi, LWS_CLOSE_STATUS_POLICY_VIOLATION, (unsigned char *)why,
                             (size_t)n);
            user_maybe_free(t, u);
            return -1;
        }
        /* The same agent again: its older session is one it lost (a network cut). */
        mg_log_info("tunnel", "user=%s agent=%s reconnected; replacing its oldest session",
                    pss->user, pss->agent_id);
        tun_close_ws(old, LWS_CLOSE_STATUS_NORMAL, "replaced by a newer session");
    }
    tun_t *tun = calloc(1, sizeof(*tun));
    if (tun == NULL)
        return -1;
    tun->base.ops = &tun_ops;
    tun->base.connected = true;
    tun->t = t;
    tun->u = u;
    tun->wsi = wsi;
    tun->opened_at = uv_now(t->gw->loop);
    snprintf(tun->agent_id, sizeof(tun->agent_id), "%s", pss->agent_id);
    uv_timer_init(t->gw->loop, &tun->timer);
    tun->timer.data = tun;
    tun->next = u->tuns;
    if (u->tuns)
        u->tuns->prev = tun;
    u->tuns = tun;
    u->ntuns++;
    t->count++;
    mg_gauge_set(t->gw->metrics.agent_connections, t->count);
    pss->tun = tun;
    mg_log_info("tunnel", "user=%s agent=%s connected (%d of %d)", u->id, tun->agent_id,
                u->ntuns, limit);
    event(t, "agent_joined", u->id, tun->agent_id);

    /* The oldest waiting open takes it. */
    pending_t **last = &u->pending;
    if (*last != NULL) {
        while ((*last)->next)
            last = &(*last)->next;
        pending_t *p = *last;
        mg_ssh_conn_opts_t o = p->o;
        mg_pool_conn_t *pc = p->pc;
        mg_ssh_conn_cb cb = p->cb;
        attach(t, tun, &o, cb, pc); /* copies the strings before the pending goes */
        pending_remove(p);
    }
    return 0;
}

static int on_receive(tun_t *tun, struct lws *wsi, const char *in, size_t len)
{
    if (lws_is_first_fragment(wsi))
        tun->msg_bytes = 0;
    tun->msg_bytes += len;
    if (tun->msg_bytes + lws_remaining_packet_payload(wsi) > MAX_MESSAGE) {
        mg_log_warn("tunnel", "user=%s agent=%s sent a message over %d bytes", tun->u->id,
                    tun->agent_id, MAX_MESSAGE);
        lws_close_reason(wsi, LWS_CLOSE_STATUS_MESSAGE_TOO_LARGE,
                         (unsigned char *)"message too big", 15);
        return -1;
    }
    if (!lws_frame_is_binary(wsi))
        return 0; /* no control messages from agents yet */
    if (!tun->attached || tun->in.len > tun->in.off) {
        /* The server speaks first; keep its greeting until the SSH connection starts. */
        if (tun->in.len - tun->in.off + len > SPARE_INBUF_MAX ||
            mg__buf_append(&tun->in, in, len) != 0) {
            lws_close_reason(wsi, LWS_CLOSE_STATUS_UNEXPECTED_CONDITION,
                             (unsigned char *)"too much data before SSH", 24);
            return -1;
        }
        return 0;
    }
    if (tun->transport_closed)
        return 0;
    tun->base.bytes_in += len;
    tun->base.cbs->on_read(&tun->base, in, len);
    return 0;
}

static int on_writeable(tun_t *tun, struct lws *wsi)
{
    if (tun->send_open > 0) {
        static const char msg[] = "{\"type\":\"open\"}";
        tun->send_open--;
        memcpy(ws_buf + LWS_PRE, msg, sizeof(msg) - 1);
        if (lws_write(wsi, ws_buf + LWS_PRE, sizeof(msg) - 1, LWS_WRITE_TEXT) < 0)
            return -1;
        lws_callback_on_writable(wsi);
        return 0;
    }
    bool first = true;
    while (tun->out.len > tun->out.off && (first || !lws_send_pipe_choked(wsi))) {
        size_t n = tun->out.len - tun->out.off;
        if (n > WS_CHUNK)
            n = WS_CHUNK;
        memcpy(ws_buf + LWS_PRE, tun->out.data + tun->out.off, n);
        int w = lws_write(wsi, ws_buf + LWS_PRE, n, LWS_WRITE_BINARY);
        if (w < (int)n) {
            mg_log_debug("tunnel", "user=%s agent=%s write failed (%d of %zu)", tun->u->id,
                         tun->agent_id, w, n);
            return -1;
        }
        mg__buf_consume(&tun->out, n, 256 * 1024);
        tun->base.write_queued -= n;
        tun->base.bytes_out += n;
        tun->owe_drain = true;
        first = false;
    }
    if (tun->out.len > tun->out.off || (tun->closing && !first)) {
        /* The close frame goes in a writable turn of its own, after the data. */
        lws_callback_on_writable(wsi);
        return 0;
    }
    if (tun->closing) {
        /* The close frame is written here: with lws_close_reason() and a -1, lws 4.1 on libuv
           drops the connection before the frame it queued goes out. */
        size_t rl = strlen(tun->close_reason);
        unsigned char *p = ws_buf + LWS_PRE;
        p[0] = (unsigned char)(tun->close_code >> 8);
        p[1] = (unsigned char)(tun->close_code & 0xff);
        memcpy(p + 2, tun->close_reason, rl);
        lws_write(wsi, p, 2 + rl, WRITE_CLOSE);
        return -1;
    }
    if (tun->owe_drain && tun->attached && !tun->transport_closed) {
        tun->owe_drain = false;
        tun->base.cbs->on_drain(&tun->base);
    }
    return 0;
}

static void on_closed(tun_t *tun)
{
    mg_tunnel_t *t = tun->t;
    tun->wsi = NULL;
    mg_log_info("tunnel", "user=%s agent=%s disconnected", tun->u->id, tun->agent_id);
    event(t, "agent_left", tun->u->id, tun->agent_id);
    tun_user_t *u = tun->u;
    tun_unlink(tun);
    user_maybe_free(t, u);
    if (!tun->attached) {
        tun_free(tun);
        return;
    }
    if (!tun->transport_closed) {
        /* The SSH connection learns that its stream ended; it closes the transport next. */
        tun->base.cbs->on_eof(&tun->base, UV_EOF);
        return;
    }
    uv_timer_start(&tun->timer, on_tun_timer, 0, 0);
}

static const char *bearer(struct lws *wsi, char *buf, size_t cap)
{
    if (lws_hdr_copy(wsi, buf, (int)cap, WSI_TOKEN_HTTP_AUTHORIZATION) <= 0)
        return NULL;
    if (strncasecmp(buf, "Bearer ", 7) != 0)
        return NULL;
    return buf + 7;
}

static bool agent_id_valid(const char *s)
{
    size_t n = strlen(s);
    if (n < 16 || n > AGENT_ID_MAX)
        return false;
    for (size_t i = 0; i < n; i++)
        if (!((s[i] >= 'a' && s[i] <= 'z') || (s[i] >= 'A' && s[i] <= 'Z') ||
              (s[i] >= '0' && s[i] <= '9') || s[i] == '-' || s[i] == '_'))
            return false;
    return true;
}

/* Runs agent_auth. Returns 0 with the user, or the HTTP status to refuse with and why. */
static int authenticate(mg_gateway_t *gw, struct lws *wsi, char *user, char *agent_id,
                        char *why, size_t whylen)
{
    char auth[1024], remote[64];
    const char *token = bearer(wsi, auth, sizeof(auth));
    agent_id[0] = '\0';
    int n = lws_hdr_custom_copy(wsi, agent_id, AGENT_ID_MAX + 1, "x-moongate-agent:", 17);
    if (n <= 0 || !agent_id_valid(agent_id)) {
        snprintf(why, whylen, "missing or invalid X-Moongate-Agent header");
        return 400;
    }
    if (token == NULL || *token == '\0') {
        snprintf(why, whylen, "missing bearer token");
        return 401;
    }
    lws_get_peer_simple(wsi, remote, sizeof(remote));
    mg_policy_header_t hdrs[] = { { "authorization", auth }, { "x-moongate-agent", agent_id } };
    mg_policy_request_t req = {
        .method = "GET", .path = "/tunnel", .remote_addr = remote, .headers = hdrs, .nheaders = 2,
    };
    mg_policy_decision_t d;
    mg_policy_state_t *st = mg_policy_acquire(gw->policy);
    int rc = mg_policy_agent_auth(st, token, &req, &d);
    mg_policy_release(st);
    if (rc != 0 || !d.allow) {
        snprintf(why, whylen, "%s", d.message[0] ? d.message : "token refused");
        return d.status ? d.status : 401;
    }
    snprintf(user, MG_USER_ID_MAX + 1, "%s", d.user);
    return 0;
}

int mg__tunnel_confirm_upgrade(mg_gateway_t *gw, struct lws *wsi)
{
    char *uri = NULL;
    int ulen = 0;
    int m = lws_http_get_uri_and_method(wsi, &uri, &ulen);
    char proto[128] = "";
    lws_hdr_copy(wsi, proto, sizeof(proto), WSI_TOKEN_PROTOCOL);
    char remote[64];
    lws_get_peer_simple(wsi, remote, sizeof(remote));
    if (m != 0 || ulen != 7 || memcmp(uri, "/tunnel", 7) != 0) {
        lws_return_http_status(wsi, 404, "no WebSocket endpoint here; agents use /tunnel");
        return 1;
    }
    if (strstr(proto, TUNNEL_PROTOCOL) == NULL) {
        lws_return_http_status(wsi, 400, "subprotocol " TUNNEL_PROTOCOL " required");
        return 1;
    }
    if (gw->draining) {
        lws_return_http_status(wsi, 503, "shutting down");
        return 1;
    }
    char user[MG_USER_ID_MAX + 1], agent_id[AGENT_ID_MAX + 1], why[256];
    int status = authenticate(gw, wsi, user, agent_id, why, sizeof(why));
    if (status != 0) {
        mg_log_warn("tunnel", "agent from %s refused (%d): %s", remote, status, why);
        lws_return_http_status(wsi, (unsigned int)status, why);
        return 1;
    }
    return 0;
}

static int callback_tunnel(struct lws *wsi, enum lws_callback_reasons reason, void *user,
                           void *in, size_t len)
{
    tun_pss_t *pss = user;
    struct lws_vhost *vh = lws_get_vhost(wsi);
    mg_gateway_t *gw = vh ? mg__front_gateway(lws_get_vhost_user(vh)) : NULL;
    switch (reason) {
    case LWS_CALLBACK_FILTER_PROTOCOL_CONNECTION: {
        char why[256];
        /* Checked at the upgrade already; here the user and agent id go to the session. */
        return authenticate(gw, wsi, pss->user, pss->agent_id, why, sizeof(why)) ? 1 : 0;
    }
    case LWS_CALLBACK_ESTABLISHED:
        return on_established(gw->tunnel, wsi, pss);
    case LWS_CALLBACK_RECEIVE:
        return pss->tun ? on_receive(pss->tun, wsi, in, len) : -1;
    case LWS_CALLBACK_SERVER_WRITEABLE:
        return pss->tun ? on_writeable(pss->tun, wsi) : 0;
    case LWS_CALLBACK_WS_PEER_INITIATED_CLOSE:
        if (pss->tun && len >= 2)
            mg_log_debug("tunnel", "user=%s agent=%s closes: code %d", pss->tun->u->id,
                         pss->tun->agent_id,
                         (((const unsigned char *)in)[0] << 8) | ((const unsigned char *)in)[1]);
        return 0;
    case LWS_CALLBACK_CLOSED:
        if (pss->tun) {
            on_closed(pss->tun);
            pss->tun = NULL;
        }
        return 0;
    default:
        return 0;
    }
}

const struct lws_protocols mg__tunnel_protocol = {
    TUNNEL_PROTOCOL, callback_tunnel, sizeof(tun_pss_t), MAX_MESSAGE, 0, NULL, 0,
};

/* ---- the module ---- */

int mg__tunnel_new(mg_gateway_t *gw, mg_tunnel_t **out)
{
    mg_tunnel_t *t = calloc(1, sizeof(*t));
    if (t == NULL)
        return MG_ENOMEM;
    t->gw = gw;
    *out = t;
    return 0;
}

void mg__tunnel_drain(mg_tunnel_t *t)
{
    t->draining = true;
    for (tun_user_t *u = t->users; u; u = u->next)
        for (tun_t *tun = u->tuns; tun; tun = tun->next)
            if (!tun->attached)
                tun_close_ws(tun, LWS_CLOSE_STATUS_NORMAL, t->gw->drain_message);
}

int mg__tunnel_count(const mg_tunnel_t *t)
{
    return t->count;
}

void mg__tunnel_free(mg_tunnel_t *t)
{
    /* lws has closed every WebSocket by now; what remains are pending opens. */
    for (tun_user_t *u = t->users, *next; u; u = next) {
        next = u->next;
        while (u->pending) {
            pending_t *p = u->pending;
            u->pending = p->next;
            uv_close((uv_handle_t *)&p->timer, on_pending_closed);
        }
        free(u);
    }
    free(t);
}
