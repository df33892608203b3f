/*
 * moongate-agent: the WebSockets to the gateway and the local SSH streams behind them.
 *
 * Everything runs on one libuv loop: libwebsockets (client only) on that loop as a foreign loop,
 * the local streams (a TCP connection to sshd, or the pipes of a child `sshd -i`), the reconnect
 * and stop timers, and the signals.
 *
 * The nodes (which gateway addresses get WebSockets) are main_agent_nodes.c. One conn_t per
 * WebSocket. Its WebSocket ends in two steps: ws_gone (lws said CLIENT_CLOSED or
 * CONNECTION_ERROR: the conn stops using it and closes its local stream), then WSI_DESTROY (lws
 * has freed the wsi, after sending our close frame). The conn is freed once lws has destroyed
 * the wsi and every libuv handle of its local stream is closed. The agent stops only when lws
 * holds no wsi, so the close frames go out before the context is destroyed.
 *
 * Backpressure, both ways, with a high and a low watermark so a busy stream does not flap:
 *   gateway -> sshd   bytes handed to uv_write and not yet written; above HIGH the WebSocket's
 *                     reads stop (lws_rx_flow_control), below LOW they resume.
 *   sshd -> gateway   bytes read from sshd and not yet given to lws_write; above HIGH the local
 *                     reads stop (uv_read_stop), below LOW they resume.
 */
#include "main_agent_tunnel.h"

#include "moongate/error.h"
#include "moongate/log.h"
#include "moongate/tunnel_protocol.h"

#include <netdb.h>
#include <openssl/x509.h>
#include <openssl/x509_vfy.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

extern char **environ;

#define HIGH_WATER (1024 * 1024)
#define LOW_WATER (256 * 1024)
#define FRAMES_PER_WRITEABLE 16
#define STOP_BOUND_MS 2000
/* Our pings; overridable at build time only so a test can make them short. */
#ifndef PING_AFTER_S
#define PING_AFTER_S 30
#endif
#ifndef HANGUP_AFTER_S
#define HANGUP_AFTER_S 75
#endif

typedef struct wreq {
    uv_write_t req;
    conn_t *c;
    size_t n;
    char data[];
} wreq_t;

static void on_reconnect_timer(uv_timer_t *t);
static void stop(mg_agent_t *a, const char *why);
static void close_local(conn_t *c, const char *why);
static void maybe_finish(mg_agent_t *a);

uint64_t mg__agent_now_ms(const mg_agent_t *a)
{
    return uv_now(a->loop);
}

uint32_t mg__agent_random_u32(void *ctx)
{
    uint32_t v = 0;
    if (uv_random(NULL, NULL, &v, sizeof(v), 0, NULL) != 0)
        v = (uint32_t)rand();
    return v;
}

static void maybe_free(conn_t *c)
{
    if (!c->ws_done || c->wsi_alive || c->handles > 0 || c->hold > 0)
        return;
    *c->pprev = c->next;
    if (c->next != NULL)
        c->next->pprev = c->pprev;
    mg__buf_free(&c->out);
    mg_agent_t *a = c->a;
    node_t *nd = c->node;
    free(c);
    nd->refs--;
    mg__agent_node_maybe_free(nd);
    maybe_finish(a);
}

/* ---- the WebSocket side ---- */

/* Asks for a close with code and reason once what sshd sent has gone out. */
static void ws_close_soon(conn_t *c, int code, const char *reason)
{
    if (c->wsi == NULL || c->close_pending)
        return;
    c->close_pending = true;
    c->close_code = code;
    c->close_reason = reason;
    if (c->established) {
        lws_callback_on_writable(c->wsi);
        return;
    }
    /* Still in its handshake: nothing to say to the gateway. Killed at once, since an async
       kill from outside an lws callback waits for lws's next wake-up. The kill comes back
       through ws_gone before this returns: callers hold c (c->hold) around the call. */
    lws_set_timeout(c->wsi, PENDING_TIMEOUT_CLOSE_ACK, LWS_TO_KILL_SYNC);
}

void mg__agent_conn_close(conn_t *c, int code, const char *reason)
{
    c->hold++;
    ws_close_soon(c, code, reason);
    c->hold--;
    maybe_free(c);
}

static void schedule_reconnect(node_t *nd, bool refused)
{
    uint32_t wait = refused ? mg_agent_backoff_next_max(&nd->backoff)
                            : mg_agent_backoff_next(&nd->backoff);
    mg_log_info(COMP, "reconnecting to %s in %.1f s", nd->gateway, wait / 1000.0);
    uv_timer_start(&nd->reconnect_timer, on_reconnect_timer, wait, 0);
}

/*
 * The WebSocket is gone (failed to open, or closed). Runs once per conn: closes the local
 * stream, decides about reconnecting, and frees the conn when nothing else holds it.
 */
static void ws_gone(conn_t *c)
{
    if (c->ws_done)
        return;
    mg_agent_t *a = c->a;
    node_t *nd = c->node;
    c->ws_done = true;
    c->wsi = NULL;
    nd->n_ws--;
    if (c->established) {
        uint64_t up = mg__agent_now_ms(a) - c->opened_ms;
        mg_log_info(COMP, "websocket %u closed after %.1f s (%d open to %s)", c->n, up / 1000.0,
                    nd->n_ws, nd->gateway);
        /* A connection that held for a while was a success: the next wait starts small. */
        if (up >= MG_AGENT_BACKOFF_STABLE_MS) {
            mg_agent_backoff_reset(&nd->backoff);
            nd->attempt = 0;
        }
    }
    close_local(c, "websocket closed");

    c->hold++;
    if (a->args->once && !a->stopping) {
        a->exit_code = c->established ? 0 : 1;
        stop(a, "--once: the first connection ended");
    } else if (!a->stopping && nd->n_ws == 0 && !nd->retired) {
        schedule_reconnect(nd, c->refused);
    }
    c->hold--;
    maybe_free(c);
}

static void log_peer_close(const conn_t *c, const unsigned char *in, size_t len)
{
    int code = len >= 2 ? (in[0] << 8 | in[1]) : LWS_CLOSE_STATUS_NO_STATUS;
    char reason[128 * 4 + 1];
    size_t w = 0;
    /* The reason is the gateway's text: escape it so it cannot forge a log line. */
    for (size_t i = 2; i < len && w + 5 < sizeof(reason); i++) {
        unsigned char ch = in[i];
        if (ch == '"' || ch == '\\') {
            reason[w++] = '\\';
            reason[w++] = (char)ch;
        } else if (ch < 0x20 || ch == 0x7f) {
            w += (size_t)snprintf(reason + w, sizeof(reason) - w, "\\x%02x", ch);
        } else {
            reason[w++] = (char)ch;
        }
    }
    reason[w] = '\0';
    /* Exactly this form: tests and operators grep for it. The next line names the WebSocket. */
    mg_log_info(COMP, "closed by gateway: code=%d reason=\"%s\"", code, reason);
}

static void handle_control(conn_t *c)
{
    mg_agent_t *a = c->a;
    int kind = c->control_overflow ? MG_EINVAL
                                   : mg_agent_control_parse(c->control, c->control_n);
    c->control_n = 0;
    c->control_overflow = false;
    if (kind == MG_AGENT_CONTROL_OPEN) {
        node_t *nd = c->node;
        if (a->stopping)
            return;
        if (nd->retired) {
            mg_log_debug(COMP, "%s left DNS: not opening another connection", nd->gateway);
            return;
        }
        if (nd->n_ws >= a->args->max_connections) {
            mg_log_info(COMP, "gateway asked for another connection (%s); already at "
                              "--max-connections %d", nd->gateway, a->args->max_connections);
            return;
        }
        mg_log_info(COMP, "gateway asked for another connection (%s)", nd->gateway);
        mg__agent_open_ws(nd, true);
    } else if (kind == MG_AGENT_CONTROL_UNKNOWN) {
        mg_log_debug(COMP, "ignoring an unknown control message");
    } else {
        mg_log_warn(COMP, "ignoring a malformed control message");
    }
}

static void local_write(conn_t *c, const void *data, size_t len);
static void start_local(conn_t *c);
static void local_resume_reads(conn_t *c);

/*
 * Starts the close handshake with our code and reason, once everything queued has gone out.
 *
 * Not by returning -1 from the callback, the documented way: lws 4.1.6 as Debian builds it
 * (_DEBUG, libuv) then runs its close twice ("close_and_handled uv repeat test" in service.c),
 * and the second run drops the socket before the close frame is written. A close that starts
 * from an lws timeout runs once: it sends the frame lws_close_reason() prepared, waits for the
 * gateway's echo (up to 5 s), then closes. The timeout kind matters: every kind but
 * HTTP_KEEPALIVE_IDLE marks the socket unusable and skips the close frame.
 */
static int send_close(conn_t *c, struct lws *wsi)
{
    mg_log_debug(COMP, "websocket %u: closing with %d \"%s\"", c->n, c->close_code,
                 c->close_reason);
    c->close_sent = true;
    lws_close_reason(wsi, (enum lws_close_status)c->close_code,
                     (unsigned char *)c->close_reason, strlen(c->close_reason));
    lws_set_timeout(wsi, PENDING_TIMEOUT_HTTP_KEEPALIVE_IDLE, LWS_TO_KILL_ASYNC);
    return 0;
}

static int on_writeable(conn_t *c, struct lws *wsi)
{
    mg_agent_t *a = c->a;
    if (c->close_sent)
        return 0;
    for (int i = 0; i < FRAMES_PER_WRITEABLE && mg__buf_size(&c->out) > 0; i++) {
        size_t n = mg__buf_size(&c->out);
        if (n > FRAME_MAX)
            n = FRAME_MAX;
        memcpy(a->sendbuf + LWS_PRE, c->out.data + c->out.off, n);
        if (lws_write(wsi, (unsigned char *)a->sendbuf + LWS_PRE, n, LWS_WRITE_BINARY) < (int)n)
            return -1;
        mg__buf_consume(&c->out, n, 2 * FRAME_MAX);
        if (lws_send_pipe_choked(wsi))
            break;
    }
    if (c->local_paused && mg__buf_size(&c->out) < LOW_WATER)
        local_resume_reads(c);
    if (mg__buf_size(&c->out) > 0) {
        lws_callback_on_writable(wsi);
        return 0;
    }
    if (c->close_pending)
        return send_close(c, wsi);
    return 0;
}

static int on_receive(conn_t *c, struct lws *wsi, const char *in, size_t len)
{
    if (lws_frame_is_binary(wsi)) {
        c->last_io_ms = mg__agent_now_ms(c->a);
        if (!c->local_started && !c->close_pending)
            start_local(c);
        if (c->local_started && !c->local_closing && !c->close_pending)
            local_write(c, in, len);
        return 0;
    }
    if (c->control_n + len > sizeof(c->control))
        c->control_overflow = true;
    else {
        memcpy(c->control + c->control_n, in, len);
        c->control_n += len;
    }
    if (lws_is_final_fragment(wsi))
        handle_control(c);
    return 0;
}

/*
 * OpenSSL's verdict on each certificate of the gateway's chain: the first it refuses is kept,
 * with its subject and issuer, for the error line (libwebsockets would say only "SSL err 1").
 */
static void note_certificate(conn_t *c, X509_STORE_CTX *x, int preverify_ok)
{
    if (preverify_ok || c->tls_why[0] != '\0')
        return;
    int err = X509_STORE_CTX_get_error(x);
    X509 *cert = X509_STORE_CTX_get_current_cert(x);
    char subject[200] = "?", issuer[200] = "?";
    if (cert != NULL) {
        X509_NAME_oneline(X509_get_subject_name(cert), subject, sizeof(subject));
        X509_NAME_oneline(X509_get_issuer_name(cert), issuer, sizeof(issuer));
    }
    const mg_agent_args_t *args = c->a->args;
    char trust[300];
    if (args->ca_file != NULL)
        snprintf(trust, sizeof(trust), "the CAs of --ca-file %s", args->ca_file);
    else
        snprintf(trust, sizeof(trust), "the system's CAs (--ca-file names others)");
    if (err == X509_V_ERR_HOSTNAME_MISMATCH || err == X509_V_ERR_IP_ADDRESS_MISMATCH)
        snprintf(c->tls_why, sizeof(c->tls_why),
                 "the gateway's TLS certificate (%s) is not for the name %s: connect by a name "
                 "it lists", subject, c->node->url->host);
    else
        snprintf(c->tls_why, sizeof(c->tls_why),
                 "the gateway's TLS certificate is not trusted: %s (certificate %s, issued by "
                 "%s; trusting %s)", X509_verify_cert_error_string(err), subject, issuer, trust);
}

static void on_probed(void *arg, const char *why)
{
    node_t *nd = arg;
    nd->probing = false;
    mg_log_warn(COMP, "cannot connect to %s: %s", nd->gateway, why);
    mg__agent_node_maybe_free(nd);
}

/* Says why a connect failed: a look at host:port first when libwebsockets gave no reason. */
static void explain_failure(node_t *nd, const char *said)
{
    if (!nd->probing && mg_agent_probe_start(nd->a->loop, nd->connect_host, nd->url->port,
                                             nd->url->tls, said, on_probed, nd) == 0)
        nd->probing = true; /* it logs the line */
    else
        mg_log_warn(COMP, "cannot connect to %s: %s", nd->gateway, said);
}

static int on_connection_error(conn_t *c, struct lws *wsi, const char *in, size_t len)
{
    int status = wsi != NULL ? (int)lws_http_client_http_response(wsi) : 0;
    char said[256];
    snprintf(said, sizeof(said), "%.*s", in != NULL ? (int)len : 7, in != NULL ? in : "unknown");
    if (status == 401 || status == 403) {
        c->refused = true;
        mg_log_error(COMP, "gateway refused the token (%d)", status);
    } else if (status != 0) {
        mg_log_warn(COMP, "cannot connect to %s: HTTP %d (%s)", c->node->gateway, status, said);
    } else if (c->tls_why[0] != '\0') {
        mg_log_warn(COMP, "cannot connect to %s: %s", c->node->gateway, c->tls_why);
    } else {
        explain_failure(c->node, said);
    }
    ws_gone(c);
    return 0;
}

/* lws has freed the wsi: nothing of it is left to wait for. */
static void wsi_destroyed(conn_t *c)
{
    ws_gone(c);
    if (!c->wsi_alive)
        return;
    c->wsi_alive = false;
    c->a->n_wsi--;
    maybe_free(c);
}

static int add_headers(conn_t *c, char **p, size_t room)
{
    mg_agent_t *a = c->a;
    int n = snprintf(*p, room, "Authorization: Bearer %s\r\n" MG_TUNNEL_AGENT_ID_HEADER ": %s\r\n",
                     a->args->token, a->id);
    if (n < 0 || (size_t)n >= room) {
        mg_log_error(COMP, "the token does not fit in the upgrade request");
        return -1;
    }
    *p += n;
    return 0;
}

static int callback_tunnel(struct lws *wsi, enum lws_callback_reasons reason, void *user,
                           void *in, size_t len)
{
    conn_t *c = wsi != NULL ? lws_get_opaque_user_data(wsi) : NULL;
    if (c == NULL)
        return 0;
    switch (reason) {
    case LWS_CALLBACK_CLIENT_APPEND_HANDSHAKE_HEADER:
        return add_headers(c, (char **)in, len);
    case LWS_CALLBACK_CLIENT_ESTABLISHED: {
        mg_agent_t *a = c->a;
        c->wsi = wsi;
        c->established = true;
        c->opened_ms = c->last_io_ms = mg__agent_now_ms(a);
        mg_log_info(COMP, "connected: websocket %u open to %s (%d open)", c->n, c->node->gateway,
                    c->node->n_ws);
        if (a->stopping) {
            ws_close_soon(c, MG_TUNNEL_CLOSE_NORMAL, "agent stopping");
            return 0;
        }
        /* The local stream opens with the gateway's first bytes (its SSH client speaks
           first): a WebSocket the gateway keeps in reserve holds no sshd process, and a
           system sshd does not time out an unauthenticated connection under it. */
        return 0;
    }
    case LWS_CALLBACK_CLIENT_RECEIVE:
        return on_receive(c, wsi, in, len);
    case LWS_CALLBACK_CLIENT_WRITEABLE:
        return on_writeable(c, wsi);
    case LWS_CALLBACK_WS_PEER_INITIATED_CLOSE:
        if (c->close_sent)
            mg_log_debug(COMP, "websocket %u: the gateway acknowledged our close", c->n);
        else
            log_peer_close(c, in, len);
        return 0;
    case LWS_CALLBACK_CLIENT_CONNECTION_ERROR:
        return on_connection_error(c, wsi, in, len);
    case LWS_CALLBACK_OPENSSL_PERFORM_SERVER_CERT_VERIFICATION:
        note_certificate(c, user, (int)len);
        return 0;
    case LWS_CALLBACK_CLIENT_CLOSED:
        ws_gone(c);
        return 0;
    case LWS_CALLBACK_WSI_DESTROY:
        wsi_destroyed(c);
        return 0;
    default:
        return 0;
    }
}

static const struct lws_protocols protocols[] = {
    { MG_TUNNEL_SUBPROTOCOL, callback_tunnel, 0, FRAME_MAX, 0, NULL, 0 },
    { NULL, NULL, 0, 0, 0, NULL, 0 },
};

void mg__agent_open_ws(node_t *nd, bool extra)
{
    mg_agent_t *a = nd->a;
    conn_t *c = calloc(1, sizeof(*c));
    if (c == NULL) {
        mg_log_error(COMP, "out of memory opening a WebSocket");
        if (nd->n_ws == 0 && !a->stopping)
            schedule_reconnect(nd, false);
        return;
    }
    c->a = a;
    c->node = nd;
    nd->refs++;
    c->n = ++a->seq;
    c->extra = extra;
    c->next = a->conns;
    c->pprev = &a->conns;
    if (a->conns != NULL)
        a->conns->pprev = &c->next;
    a->conns = c;
    nd->n_ws++;
    if (!extra)
        nd->attempt++;
    if (extra)
        mg_log_info(COMP, "connecting to %s (websocket %u, extra)", nd->gateway, c->n);
    else
        mg_log_info(COMP, "connecting to %s (attempt %u)", nd->gateway, nd->attempt);

    const mg_agent_url_t *u = nd->url;
    struct lws_client_connect_info i;
    memset(&i, 0, sizeof(i));
    i.context = a->ctx;
    i.address = nd->connect_host;
    i.port = u->port;
    i.path = u->path;
    i.host = u->host_header;
    i.origin = u->host_header;
    i.protocol = MG_TUNNEL_SUBPROTOCOL;
    /* The token goes in every upgrade: never follow a redirect to somewhere else with it. */
    i.ssl_connection = LCCSCF_HTTP_NO_FOLLOW_REDIRECT | (u->tls ? LCCSCF_USE_SSL : 0);
    i.retry_and_idle_policy = &a->idle_policy;
    i.opaque_user_data = c;
    /* The connect may fail at once and call back (ws_gone, wsi_destroyed) before it returns. */
    c->wsi_alive = true;
    a->n_wsi++;
    c->hold++;
    struct lws *wsi = lws_client_connect_via_info(&i);
    c->hold--;
    if (wsi == NULL) {
        if (!c->ws_done)
            explain_failure(nd, "the connection could not be started");
        wsi_destroyed(c);
        return;
    }
    if (!c->ws_done)
        c->wsi = wsi;
    maybe_free(c);
}

static void on_reconnect_timer(uv_timer_t *t)
{
    node_t *nd = t->data;
    if (!nd->a->stopping && nd->n_ws == 0 && !nd->retired)
        mg__agent_open_ws(nd, false);
}

/* ---- the local side ---- */

static void on_local_closed(uv_handle_t *h)
{
    conn_t *c = h->data;
    c->handles--;
    maybe_free(c);
}

static void on_proc_exit(uv_process_t *p, int64_t status, int signo)
{
    conn_t *c = p->data;
    c->proc_running = false;
    mg_log_debug(COMP, "websocket %u: sshd exited (status %lld, signal %d)", c->n,
                 (long long)status, signo);
    uv_close((uv_handle_t *)p, on_local_closed);
}

/* Closes the local stream (idempotent). The conn is freed later, in on_local_closed. */
static void close_local(conn_t *c, const char *why)
{
    if (!c->local_started || c->local_closing)
        return;
    c->local_closing = true;
    mg_log_info(COMP, "local ssh stream closed for websocket %u (%s)", c->n, why);
    /* Nothing is going to sshd any more; the gateway's close echo must be readable. */
    if (c->ws_rx_paused && c->wsi != NULL) {
        c->ws_rx_paused = false;
        lws_rx_flow_control(c->wsi, 1);
    }
    if (c->a->inetd_argv == NULL) {
        uv_close((uv_handle_t *)&c->tcp, on_local_closed);
        return;
    }
    /* Closing sshd's stdin ends it; the signal covers a child that is not reading. */
    uv_close((uv_handle_t *)&c->child_in, on_local_closed);
    uv_close((uv_handle_t *)&c->child_out, on_local_closed);
    if (c->proc_running)
        uv_process_kill(&c->proc, SIGTERM);
}

/* The local side ended: send what it said, then close the WebSocket. */
static void local_ended(conn_t *c, int code, const char *reason, const char *why)
{
    c->hold++;
    close_local(c, why);
    ws_close_soon(c, code, reason);
    c->hold--;
    maybe_free(c);
}

static void on_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *buf)
{
    conn_t *c = h->data;
    *buf = uv_buf_init(c->a->readbuf, sizeof(c->a->readbuf));
}

static void on_local_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf)
{
    conn_t *c = s->data;
    if (nread == 0)
        return;
    if (nread < 0) {
        local_ended(c, MG_TUNNEL_CLOSE_NORMAL, "ssh stream ended",
                    nread == UV_EOF ? "sshd closed it" : uv_strerror((int)nread));
        return;
    }
    if (c->a->inetd_argv == NULL) {
        /* sshd leaves Nagle on for forwarding sessions: it holds its next small packet until
           we ACK this one, and a delayed ACK costs 40 ms. Re-arm quick ACKs after each read. */
        uv_os_fd_t fd;
        int one = 1;
        if (uv_fileno((uv_handle_t *)s, &fd) == 0)
            setsockopt(fd, IPPROTO_TCP, TCP_QUICKACK, &one, sizeof(one));
    }
    c->last_io_ms = mg__agent_now_ms(c->a);
    if (c->wsi == NULL || c->close_pending)
        return;
    if (mg__buf_append(&c->out, buf->base, (size_t)nread) != 0) {
        mg_log_error(COMP, "websocket %u: out of memory", c->n);
        local_ended(c, MG_TUNNEL_CLOSE_INTERNAL, "agent out of memory",
                    "out of memory");
        return;
    }
    lws_callback_on_writable(c->wsi);
    if (mg__buf_size(&c->out) > HIGH_WATER && !c->local_paused) {
        mg_log_trace(COMP, "websocket %u: %zu bytes wait for the gateway; pausing sshd reads",
                     c->n, mg__buf_size(&c->out));
        c->local_paused = true;
        uv_read_stop(c->rd);
    }
}

static void local_resume_reads(conn_t *c)
{
    mg_log_trace(COMP, "websocket %u: resuming sshd reads", c->n);
    c->local_paused = false;
    if (!c->local_closing)
        uv_read_start(c->rd, on_alloc, on_local_read);
}

static void on_local_written(uv_write_t *req, int status)
{
    wreq_t *w = (wreq_t *)req;
    conn_t *c = w->c;
    c->local_queued -= w->n;
    free(w);
    if (status < 0 && status != UV_ECANCELED && !c->local_closing) {
        local_ended(c, MG_TUNNEL_CLOSE_NORMAL, "ssh stream ended", uv_strerror(status));
        return;
    }
    if (c->ws_rx_paused && c->local_queued < LOW_WATER && c->wsi != NULL) {
        mg_log_trace(COMP, "websocket %u: resuming gateway reads", c->n);
        c->ws_rx_paused = false;
        lws_rx_flow_control(c->wsi, 1);
    }
}

static void local_write(conn_t *c, const void *data, size_t len)
{
    wreq_t *w = malloc(sizeof(*w) + len);
    if (w == NULL) {
        mg_log_error(COMP, "websocket %u: out of memory", c->n);
        local_ended(c, MG_TUNNEL_CLOSE_INTERNAL, "agent out of memory",
                    "out of memory");
        return;
    }
    w->c = c;
    w->n = len;
    memcpy(w->data, data, len);
    uv_buf_t b = uv_buf_init(w->data, (unsigned int)len);
    int rc = uv_write(&w->req, c->wr, &b, 1, on_local_written);
    if (rc != 0) {
        free(w);
        local_ended(c, MG_TUNNEL_CLOSE_NORMAL, "ssh stream ended", uv_strerror(rc));
        return;
    }
    c->local_queued += len;
    if (c->local_queued > HIGH_WATER && !c->ws_rx_paused && c->wsi != NULL) {
        mg_log_trace(COMP, "websocket %u: %zu bytes wait for sshd; pausing gateway reads",
                     c->n, c->local_queued);
        c->ws_rx_paused = true;
        lws_rx_flow_control(c->wsi, 0);
    }
}

static void on_tcp_connected(uv_connect_t *req, int status)
{
    conn_t *c = req->data;
    free(req);
    if (c->local_closing)
        return;
    if (status < 0) {
        mg_log_error(COMP, "cannot reach the local sshd at %s:%d: %s", c->a->args->ssh_host,
                     c->a->args->ssh_port, uv_strerror(status));
        local_ended(c, MG_TUNNEL_CLOSE_INTERNAL, "local sshd unreachable",
                    "connect failed");
        return;
    }
    mg_log_info(COMP, "local ssh stream opened for websocket %u (tcp %s:%d)", c->n,
                c->a->args->ssh_host, c->a->args->ssh_port);
    if (!c->local_paused)
        uv_read_start(c->rd, on_alloc, on_local_read);
}

static int start_tcp(conn_t *c)
{
    mg_agent_t *a = c->a;
    uv_connect_t *req = malloc(sizeof(*req));
    if (req == NULL)
        return MG_ENOMEM;
    uv_tcp_init(a->loop, &c->tcp);
    c->tcp.data = c;
    c->handles = 1;
    c->local_started = true;
    c->rd = c->wr = (uv_stream_t *)&c->tcp;
    /* Interactive SSH packets must not wait for Nagle. */
    uv_tcp_nodelay(&c->tcp, 1);
    req->data = c;
    int rc = uv_tcp_connect(req, &c->tcp, (const struct sockaddr *)&a->ssh_addr,
                            on_tcp_connected);
    if (rc != 0)
        free(req);
    return rc;
}

static int start_inetd(conn_t *c)
{
    mg_agent_t *a = c->a;
    uv_pipe_init(a->loop, &c->child_in, 0);
    uv_pipe_init(a->loop, &c->child_out, 0);
    c->child_in.data = c->child_out.data = c->proc.data = c;
    c->handles = 2;
    c->local_started = true;
    c->wr = (uv_stream_t *)&c->child_in;
    c->rd = (uv_stream_t *)&c->child_out;

    uv_stdio_container_t stdio[3];
    stdio[0].flags = UV_CREATE_PIPE | UV_READABLE_PIPE;
    stdio[0].data.stream = (uv_stream_t *)&c->child_in;
    stdio[1].flags = UV_CREATE_PIPE | UV_WRITABLE_PIPE;
    stdio[1].data.stream = (uv_stream_t *)&c->child_out;
    stdio[2].flags = UV_INHERIT_FD;
    stdio[2].data.fd = 2;
    uv_process_options_t o;
    memset(&o, 0, sizeof(o));
    o.exit_cb = on_proc_exit;
    o.file = a->inetd_argv[0];
    o.args = a->inetd_argv;
    o.env = a->child_env;
    o.stdio = stdio;
    o.stdio_count = 3;
    int rc = uv_spawn(a->loop, &c->proc, &o);
    /* A failed spawn still leaves an initialized handle to close. */
    c->handles++;
    if (rc != 0) {
        uv_close((uv_handle_t *)&c->proc, on_local_closed);
        return rc;
    }
    c->proc_running = true;
    mg_log_info(COMP, "local ssh stream opened for websocket %u (%s, pid %d)", c->n,
                a->inetd_argv[0], c->proc.pid);
    uv_read_start(c->rd, on_alloc, on_local_read);
    return 0;
}

static void start_local(conn_t *c)
{
    int rc = c->a->inetd_argv != NULL ? start_inetd(c) : start_tcp(c);
    if (rc == 0)
        return;
    if (c->a->inetd_argv != NULL)
        mg_log_error(COMP, "cannot start %s: %s", c->a->inetd_argv[0], uv_strerror(rc));
    else
        mg_log_error(COMP, "cannot connect to the local sshd: %s",
                     rc == MG_ENOMEM ? "out of memory" : uv_strerror(rc));
    local_ended(c, MG_TUNNEL_CLOSE_INTERNAL, "local sshd unavailable",
                "could not start");
}

/* ---- start and stop ---- */

static void on_handle_closed_noop(uv_handle_t *h)
{
}

static void on_stop_timer(uv_timer_t *t);

/* Every WebSocket is gone while stopping: finish on the next loop turn, outside any lws
   callback (the context must not be destroyed under one). */
static void maybe_finish(mg_agent_t *a)
{
    if (!a->stopping || a->finished || a->n_wsi > 0)
        return;
    uv_timer_start(&a->stop_timer, on_stop_timer, 0, 0);
}

/* Ends the stop: when every WebSocket is gone, or when the bound passed. */
static void on_stop_timer(uv_timer_t *t)
{
    mg_agent_t *a = t->data;
    if (a->finished)
        return;
    /* Destroying the context closes whatever is left; each comes back through ws_gone and
       wsi_destroyed, and the conns go as their handles close. */
    if (a->n_wsi > 0)
        mg_log_warn(COMP, "%d WebSocket(s) did not finish closing within %d ms; dropping them",
                    a->n_wsi, STOP_BOUND_MS);
    a->finished = true;
    mg_log_info(COMP, "stopped");
    mg__agent_nodes_close(a);
    uv_close((uv_handle_t *)&a->stop_timer, on_handle_closed_noop);
    uv_close((uv_handle_t *)&a->sigterm, on_handle_closed_noop);
    uv_close((uv_handle_t *)&a->sigint, on_handle_closed_noop);
    /* First half of a foreign-loop destroy: lws closes its handles; mg_agent_free finishes. */
    lws_context_destroy(a->ctx);
}

static void stop(mg_agent_t *a, const char *why)
{
    mg_log_info(COMP, "shutting down (%s)", why);
    a->stopping = true;
    mg__agent_nodes_stop(a);
    uv_timer_start(&a->stop_timer, on_stop_timer, STOP_BOUND_MS, 0);
    for (conn_t *c = a->conns, *next; c != NULL; c = next) {
        next = c->next;
        c->hold++;
        /* What sshd said last is of no use to a gateway that is being left: close now. */
        mg__buf_consume(&c->out, mg__buf_size(&c->out), 0);
        close_local(c, "agent stopping");
        ws_close_soon(c, MG_TUNNEL_CLOSE_NORMAL, "agent stopping");
        c->hold--;
        maybe_free(c);
    }
    maybe_finish(a);
}

static void on_signal(uv_signal_t *h, int signum)
{
    mg_agent_t *a = h->data;
    const char *name = signum == SIGINT ? "SIGINT" : "SIGTERM";
    if (a->stopping) {
        mg_log_warn(COMP, "second %s: exiting now", name);
        _exit(1);
    }
    stop(a, name);
}

static void lws_log_emit(int level, const char *line)
{
    size_t n = strlen(line);
    while (n > 0 && (line[n - 1] == '\n' || line[n - 1] == '\r'))
        n--;
    mg_log(level == LLL_ERR ? MG_LOG_ERROR : level == LLL_WARN ? MG_LOG_WARN : MG_LOG_DEBUG,
           "lws", "%.*s", (int)n, line);
}

static int resolve_ssh(mg_agent_t *a, char *err, size_t errlen)
{
    struct addrinfo hints, *res = NULL;
    memset(&hints, 0, sizeof(hints));
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_NUMERICSERV;
    char port[8];
    snprintf(port, sizeof(port), "%d", a->args->ssh_port);
    int rc = getaddrinfo(a->args->ssh_host, port, &hints, &res);
    if (rc != 0) {
        snprintf(err, errlen, "cannot resolve --ssh host %s: %s", a->args->ssh_host,
                 gai_strerror(rc));
        return MG_ECONFIG;
    }
    memcpy(&a->ssh_addr, res->ai_addr, res->ai_addrlen);
    freeaddrinfo(res);
    return 0;
}

int mg_agent_start(uv_loop_t *loop, const mg_agent_args_t *args, mg_agent_t **out,
                   char *err, size_t errlen)
{
    int rc = MG_ENOMEM;
    mg_agent_t *a = calloc(1, sizeof(*a));
    if (a == NULL)
        goto fail;
    a->loop = loop;
    a->args = args;
    uint8_t idbytes[MG_AGENT_ID_HEX_LEN / 2];
    if (uv_random(NULL, NULL, idbytes, sizeof(idbytes), 0, NULL) != 0) {
        snprintf(err, errlen, "no random source for the agent id");
        rc = MG_ECONFIG;
        goto fail;
    }
    mg_agent_hex(idbytes, sizeof(idbytes), a->id);
    a->n_gateways = args->n_gateways;
    for (int i = 0; i < a->n_gateways; i++) {
        gateway_t *gw = &a->gateways[i];
        gw->a = a;
        gw->text = args->gateways[i];
        gw->url = &args->urls[i];
        mg_list_init(&gw->nodes);
        mg_agent_backoff_init(&gw->backoff, MG_AGENT_BACKOFF_BASE_MS, MG_AGENT_BACKOFF_MAX_MS,
                              mg__agent_random_u32, NULL);
    }
    if (args->sshd_inetd != NULL) {
        int argc = 0;
        if (mg_agent_split_command(args->sshd_inetd, &a->inetd_argv, &argc) != 0) {
            snprintf(err, errlen, "--sshd-inetd: an empty command");
            rc = MG_ECONFIG;
            goto fail;
        }
        /* The child has no use for the token; keep it out of its environment. */
        size_t n = 0;
        while (environ[n] != NULL)
            n++;
        a->child_env = calloc(n + 1, sizeof(char *));
        if (a->child_env == NULL)
            goto fail;
        for (size_t i = 0, k = 0; i < n; i++)
            if (strncmp(environ[i], "MOONGATE_TOKEN=", 15) != 0)
                a->child_env[k++] = environ[i];
    } else if ((rc = resolve_ssh(a, err, errlen)) != 0) {
        goto fail;
    }
    /* The gateway pings every 30 s; our own pings notice a gateway (or a NAT mapping) that
       vanished without a FIN, which would otherwise leave a dead WebSocket "open" forever. */
    a->idle_policy.secs_since_valid_ping = PING_AFTER_S;
    a->idle_policy.secs_since_valid_hangup = HANGUP_AFTER_S;

    lws_set_log_level(mg_log_enabled(MG_LOG_TRACE) ? LLL_ERR | LLL_WARN | LLL_NOTICE
                                                   : LLL_ERR | LLL_WARN, lws_log_emit);
    void *loops[1] = { loop };
    struct lws_context_creation_info info;
    memset(&info, 0, sizeof(info));
    info.options = LWS_SERVER_OPTION_LIBUV | LWS_SERVER_OPTION_UV_NO_SIGSEGV_SIGFPE_SPIN;
    if (args->tls)
        info.options |= LWS_SERVER_OPTION_DO_SSL_GLOBAL_INIT;
    info.foreign_loops = loops;
    info.port = CONTEXT_PORT_NO_LISTEN;
    info.protocols = protocols;
    info.count_threads = 1;
    info.timeout_secs = 20;
    /* Without a CA file lws loads the system's store (SSL_CTX_set_default_verify_paths). */
    info.client_ssl_ca_filepath = args->ca_file;
    info.user = a;
    a->ctx = lws_create_context(&info);
    if (a->ctx == NULL) {
        snprintf(err, errlen, "cannot start libwebsockets%s", args->ca_file ? " (is --ca-file "
                 "a readable PEM file?)" : "");
        rc = MG_ECONFIG;
        goto fail;
    }

    uv_timer_init(loop, &a->stop_timer);
    a->stop_timer.data = a;
    uv_signal_init(loop, &a->sigterm);
    uv_signal_init(loop, &a->sigint);
    a->sigterm.data = a->sigint.data = a;
    uv_signal_start(&a->sigterm, on_signal, SIGTERM);
    uv_signal_start(&a->sigint, on_signal, SIGINT);

    char gateways[MG_AGENT_GATEWAYS_MAX * 300] = "";
    for (int i = 0, o = 0; i < a->n_gateways && o >= 0 && (size_t)o < sizeof(gateways); i++)
        o += snprintf(gateways + o, sizeof(gateways) - (size_t)o, "%s%s", i ? ", " : "",
                      args->gateways[i]);
    if (args->sshd_inetd != NULL)
        mg_log_info(COMP, "agent %s: gateway%s %s, local ssh via `%s`", a->id,
                    a->n_gateways > 1 ? "s" : "", gateways, args->sshd_inetd);
    else
        mg_log_info(COMP, "agent %s: gateway%s %s, local ssh tcp %s:%d", a->id,
                    a->n_gateways > 1 ? "s" : "", gateways, args->ssh_host, args->ssh_port);
    /* An address literal is its one node, dialled now; a name's nodes come with its first
       answer (on_gateway_resolved). */
    for (int i = 0; i < a->n_gateways && !a->stopping; i++) {
        gateway_t *gw = &a->gateways[i];
        if (mg__agent_gateway_start(gw) != 0) {
            mg_log_error(COMP, "out of memory starting %s", gw->text);
            a->exit_code = 1;
            stop(a, "out of memory");
        }
    }
    *out = a;
    return 0;
fail:
    if (rc == MG_ENOMEM)
        snprintf(err, errlen, "out of memory");
    if (a != NULL) {
        free(a->inetd_argv);
        free(a->child_env);
    }
    free(a);
    return rc;
}

int mg_agent_free(mg_agent_t *a)
{
    /* Second half of the foreign-loop destroy: lws's handles are closed now. */
    lws_context_destroy(a->ctx);
    /* Every conn lost its wsi (WSI_DESTROY) and its handles closed before uv_run returned. */
    for (conn_t *c = a->conns, *next; c != NULL; c = next) {
        next = c->next;
        mg_log_warn(COMP, "websocket %u outlived the agent", c->n);
        mg__buf_free(&c->out);
        free(c);
    }
    mg__agent_nodes_free(a);
    int code = a->exit_code;
    free(a->inetd_argv);
    free(a->child_env);
    free(a);
    return code;
}
