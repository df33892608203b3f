/*
 * One SSH session over a transport, driven by libssh2 in non-blocking mode.
 *
 * libssh2 reads and writes through our callbacks: ssh_send() queues every byte on the transport
 * (never a short write, which would corrupt the stream), ssh_recv() hands out what the
 * transport delivered, or EAGAIN: straight from the transport's read buffer while its read
 * callback runs, and only what libssh2 leaves of it is copied into c->in (so a connection
 * holds no input buffer of its own while it has nothing unread). Everything that calls into
 * libssh2 happens in drive(), which runs until no step makes progress: after bytes arrive,
 * after the transport drains, on timers, and (deferred to the loop's next turn through an idle
 * handle) after API calls. Any libssh2 call may consume packets meant for other channels, so
 * every pass services every channel. One flush of the transport ends each drive.
 *
 * Objects are freed only at defined points: a channel after its on_close, inside drive() while
 * that channel is the one being serviced; the connection after its three handles have closed,
 * which is after MG_SSH_EV_CLOSED.
 *
 * This file is the session: its I/O, keepalive, deadlines, teardown and drive loop. The channels
 * are in ssh_chan.c, the host key check and authentication in ssh_auth.c (ssh_int.h).
 */
#include "ssh_int.h"

#include "moongate/error.h"
#include "moongate/log.h"

#include <errno.h>
#include <libssh2.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>

static uv_once_t global_once = UV_ONCE_INIT;
static int global_fd = -1;
static int global_rc;
static uint64_t next_conn_id = 1;

static void drive(mg_ssh_conn_t *c);
static void start_keepalive(mg_ssh_conn_t *c);

/*
 * libssh2 wants a socket even when our callbacks do all the I/O: it reads the descriptor's
 * flags once at handshake and would make a blocking one non-blocking. One non-blocking eventfd
 * that nothing reads serves every session.
 */
static void global_init(void)
{
    global_rc = libssh2_init(0);
    if (global_rc == 0) {
        global_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
        if (global_fd < 0)
            global_rc = -1;
    }
}

/* ---- libssh2 I/O callbacks ---- */

static ssize_t ssh_send(libssh2_socket_t fd, const void *buf, size_t len, int flags,
                        void **abstract)
{
    mg_ssh_conn_t *c = *abstract;
    if (c->tr == NULL || c->torn_down)
        return -EPIPE;
    if (mg_transport_write(c->tr, buf, len) != 0)
        return -EPIPE;
    return (ssize_t)len;
}

static ssize_t ssh_recv(libssh2_socket_t fd, void *buf, size_t len, int flags, void **abstract)
{
    mg_ssh_conn_t *c = *abstract;
    size_t avail = mg__buf_size(&c->in);
    if (avail > 0) {
        size_t n = avail < len ? avail : len;
        memcpy(buf, c->in.data + c->in.off, n);
        mg__buf_consume(&c->in, n, INBUF_KEEP_CAP);
        return (ssize_t)n;
    }
    if (c->lent_len > 0) {
        size_t n = c->lent_len < len ? c->lent_len : len;
        memcpy(buf, c->lent, n);
        c->lent += n;
        c->lent_len -= n;
        return (ssize_t)n;
    }
    return c->in_eof ? 0 : -EAGAIN;
}

/* ---- helpers ---- */

static char *dup_or_null(const char *s)
{
    return s ? strdup(s) : NULL;
}

const char *mg__ssh_last_error(mg_ssh_conn_t *c)
{
    char *msg = NULL;
    if (c->session == NULL)
        return "no session";
    libssh2_session_last_error(c->session, &msg, NULL, 0);
    return msg && *msg ? msg : "unknown error";
}

static void emit(mg_ssh_conn_t *c, mg_ssh_event_t ev)
{
    if (c->cb)
        c->cb(c, ev, c->data);
}

static void set_healthy(mg_ssh_conn_t *c, bool healthy)
{
    if (c->healthy == healthy)
        return;
    c->healthy = healthy;
    if (healthy)
        mg_log_info("ssh", "user=%s conn=%llu healthy again", c->user, (unsigned long long)c->id);
    else
        mg_log_warn("ssh", "user=%s conn=%llu unhealthy: nothing received for %llu ms after a "
                    "keepalive", c->user, (unsigned long long)c->id,
                    (unsigned long long)c->keepalive_interval_ms);
    emit(c, MG_SSH_EV_HEALTH);
}

/* ---- keepalive and deadlines ---- */

/*
 * Every interval: judge the last probe, then probe again unless the server sent something other
 * than the answer to our probe (then it is plainly alive and a probe would only add traffic).
 */
static void on_keepalive(uv_timer_t *t)
{
    mg_ssh_conn_t *c = t->data;
    if (c->state != MG_SSH_READY && c->state != MG_SSH_CLOSING)
        return;
    bool heard = c->tr->bytes_in != c->ka_mark;
    if (heard) {
        c->misses = 0;
        set_healthy(c, true);
    } else if (c->ka_outstanding) {
        c->misses++;
        set_healthy(c, false);
        if (c->misses >= c->keepalive_max_misses) {
            mg__ssh_conn_fail(c, MG_ETIMEDOUT, "%s:%d answered no keepalive for %llu ms", c->host,
                              c->port, (unsigned long long)(c->misses * c->keepalive_interval_ms));
            drive(c);
            return;
        }
    }
    bool busy = heard && !c->ka_outstanding;
    c->ka_mark = c->tr->bytes_in;
    c->ka_outstanding = false;
    if (busy)
        return;
    int next = 0;
    if (libssh2_keepalive_send(c->session, &next) == 0)
        c->ka_outstanding = true;
    mg_transport_flush(c->tr);
}

static void start_keepalive(mg_ssh_conn_t *c)
{
    uv_timer_start(&c->keepalive, on_keepalive, c->keepalive_interval_ms,
                   c->keepalive_interval_ms);
}

static void on_timer(uv_timer_t *t)
{
    mg_ssh_conn_t *c = t->data;
    if (c->torn_down) {
        /* The DISCONNECT could not be written in time: stop waiting. */
        if (c->tr)
            mg_transport_close(c->tr, false);
        return;
    }
    if (c->state < MG_SSH_READY) {
        mg__ssh_conn_fail(c, MG_ETIMEDOUT,
                          "could not connect to %s:%d within %llu ms (stuck in %s)", c->host,
                          c->port, (unsigned long long)c->connect_timeout_ms,
                          mg_ssh_state_name(c->state));
    } else if (c->state == MG_SSH_CLOSING) {
        mg_log_info("ssh", "user=%s conn=%llu %d channel(s) still open at the close deadline; "
                    "closing them", c->user, (unsigned long long)c->id, c->nchans);
        c->teardown_wanted = true;
    }
    drive(c);
}

/* ---- teardown ---- */

/* Frees c's copies of its options and c itself. */
static void conn_free(mg_ssh_conn_t *c)
{
    free(c->user);
    free(c->host);
    free(c->ssh_user);
    free(c->key_path);
    free(c->key_passphrase);
    free(c->known_hosts);
    free(c->host_key_sha256);
    free(c);
}

static void on_handle_closed(uv_handle_t *h)
{
    mg_ssh_conn_t *c = h->data;
    if (++c->handles_closed < 3)
        return;
    mg_log_debug("ssh", "user=%s conn=%llu closed%s%s", c->user, (unsigned long long)c->id,
                 c->status ? ": " : "", c->status ? c->error : "");
    c->state = MG_SSH_CLOSED;
    emit(c, MG_SSH_EV_CLOSED);
    mg__buf_free(&c->in);
    conn_free(c);
}

static void close_handles(mg_ssh_conn_t *c)
{
    if (c->closing_handles)
        return;
    c->closing_handles = true;
    uv_close((uv_handle_t *)&c->timer, on_handle_closed);
    uv_close((uv_handle_t *)&c->keepalive, on_handle_closed);
    uv_close((uv_handle_t *)&c->idle, on_handle_closed);
}

static void on_tr_close(mg_transport_t *t)
{
    mg_ssh_conn_t *c = t->data;
    c->tr = NULL;
    close_handles(c);
}

/*
 * Ends every channel, says goodbye to the server when the session got that far, frees the
 * session and closes the transport once the goodbye is written (bounded by a timer).
 */
static void teardown(mg_ssh_conn_t *c)
{
    if (c->torn_down)
        return;
    mg__ssh_end_channels(c, c->status ? c->status : MG_ECLOSED);
    bool was_ready = c->state == MG_SSH_READY || c->state == MG_SSH_CLOSING;
    if (was_ready && c->tr && !c->in_eof) {
        const char *why = c->reason[0] ? c->reason : c->status ? c->error : "closing";
        libssh2_session_disconnect_ex(c->session, SSH_DISCONNECT_BY_APPLICATION, why, "");
    }
    /* From here libssh2 sees a closed stream, so freeing its channels cannot wait on the peer. */
    c->torn_down = true;
    c->in_eof = true;
    mg__buf_consume(&c->in, mg__buf_size(&c->in), 0);
    c->lent_len = 0;
    libssh2_session_free(c->session);
    c->session = NULL;
    c->state = MG_SSH_CLOSING;
    uv_timer_stop(&c->keepalive);
    uv_idle_stop(&c->idle);
    if (c->status != 0)
        mg_log_warn("ssh", "user=%s conn=%llu closed: %s", c->user, (unsigned long long)c->id,
                    c->error);
    else
        mg_log_info("ssh", "user=%s conn=%llu disconnected%s%s", c->user,
                    (unsigned long long)c->id, c->reason[0] ? ": " : "", c->reason);
    if (c->tr) {
        uv_timer_start(&c->timer, on_timer, FLUSH_ON_CLOSE_MS, 0);
        mg_transport_close(c->tr, true);
    } else {
        close_handles(c);
    }
}

void mg__ssh_conn_fail(mg_ssh_conn_t *c, int status, const char *fmt, ...)
                       {
                       if (c->status == 0) {
                       va_list ap;
        va_start(ap, fmt);
        vsnprintf(c->error, sizeof(c->error), fmt, ap);
        va_end(ap);
        c->status = status;
    }
    c->teardown_wanted = true;
    if (c->driving)
        c->redrive = true;
    else
        mg__ssh_schedule_drive(c);
}

/* ---- the drive loop ---- */

/* Authenticated: the connection carries channels from now on. */
static void become_ready(mg_ssh_conn_t *c)
{
    uint64_t now = uv_now(c->loop);
    c->state = MG_SSH_READY;
    c->was_ready = true;
    c->ready_at = c->last_used = now;
    c->handshake_ms = now - c->started_at;
    c->healthy = true;
    c->ka_mark = c->tr->bytes_in;
    uv_timer_stop(&c->timer);
    start_keepalive(c);
    /* Over an agent's WebSocket nothing dials host:port: the host is the route's name for
       the user's machine. */
    if (strcmp(c->tr->ops->name, "tcp") == 0)
        mg_log_info("ssh", "user=%s conn=%llu ready: %s@%s:%d in %llu ms", c->user,
                    (unsigned long long)c->id, c->ssh_user, c->host, c->port,
                    (unsigned long long)c->handshake_ms);
    else
        mg_log_info("ssh", "user=%s conn=%llu ready: %s@%s over the %s in %llu ms", c->user,
                    (unsigned long long)c->id, c->ssh_user, c->host, c->tr->ops->name,
                    (unsigned long long)c->handshake_ms);
    c->redrive = true;
    emit(c, MG_SSH_EV_READY);
}

static void drive(mg_ssh_conn_t *c)
{
    if (c->torn_down)
        return;
    if (c->driving) {
        c->redrive = true;
        return;
    }
    c->driving = true;
    do {
        c->redrive = false;
        if (c->teardown_wanted)
            break;
        switch (c->state) {
        case MG_SSH_HANDSHAKE:
            if (mg__ssh_step_handshake(c, global_fd)) {
                c->state = MG_SSH_AUTH;
                c->redrive = true;
            }
            break;
        case MG_SSH_AUTH:
            if (mg__ssh_step_auth(c))
                become_ready(c);
            break;
        case MG_SSH_READY:
        case MG_SSH_CLOSING:
            mg__ssh_service_channels(c);
            if (c->state == MG_SSH_CLOSING && c->nchans == 0)
                c->teardown_wanted = true;
            break;
        default:
            break;
        }
        if (c->in_eof && mg__buf_size(&c->in) + c->lent_len == 0 && !c->teardown_wanted &&
            c->state != MG_SSH_CONNECTING)
            mg__ssh_conn_fail(c, MG_ECLOSED, "%s:%d closed the connection", c->host, c->port);
    } while (c->redrive && !c->teardown_wanted);
    c->driving = false;
    if (c->teardown_wanted) {
        teardown(c);
        return;
    }
    if (c->tr == NULL)
        return;
    mg_transport_flush(c->tr);
    /* A flush that empties the queue at once brings no drain callback: wake refused writers. */
    if (c->queue_full && c->tr->write_queued < WRITE_HIGH_WATER) {
        c->queue_full = false;
        c->progress = true;
        mg__ssh_schedule_drive(c);
    }
}

static void on_idle(uv_idle_t *h)
{
    uv_idle_stop(h);
    drive(h->data);
}

void mg__ssh_schedule_drive(mg_ssh_conn_t *c)
{
    if (c->driving) {
        c->redrive = true;
        return;
    }
    if (!c->torn_down && !uv_is_active((uv_handle_t *)&c->idle))
        uv_idle_start(&c->idle, on_idle);
}

/* ---- transport callbacks ---- */

static void on_tr_connect(mg_transport_t *t, int status)
{
    mg_ssh_conn_t *c = t->data;
    if (status != 0) {
        mg__ssh_conn_fail(c, MG_ECONNECT, "cannot connect to %s:%d: %s", c->host, c->port,
                          uv_strerror(status));
        drive(c);
        return;
    }
    c->state = MG_SSH_HANDSHAKE;
    drive(c);
}

/* Keeps len more bytes for libssh2 in c->in. Returns false after failing the connection. */
static bool keep_input(mg_ssh_conn_t *c, const char *buf, size_t len)
{
    if (mg__buf_size(&c->in) + len <= INBUF_MAX && mg__buf_append(&c->in, buf, len) == 0)
        return true;
    mg__ssh_conn_fail(c, MG_ESSH, "%s:%d sent more than %d bytes that could not be processed",
                      c->host, c->port, INBUF_MAX);
    drive(c);
    return false;
}

static void on_tr_read(mg_transport_t *t, const char *buf, size_t len)
{
    mg_ssh_conn_t *c = t->data;
    if (c->torn_down)
        return;
    /* With nothing older unread, libssh2 reads these bytes where they are (ssh_recv). */
    bool lend = mg__buf_size(&c->in) == 0;
    if (lend) {
        c->lent = buf;
        c->lent_len = len;
    } else if (!keep_input(c, buf, len)) {
        return;
    }
    c->progress = true;
    if (!c->healthy && c->state == MG_SSH_READY) {
        c->misses = 0;
        c->ka_outstanding = false;
        c->ka_mark = t->bytes_in;
        set_healthy(c, true);
    }
    drive(c);
    if (!lend)
        return;
    /* The transport reuses its buffer once this returns: what libssh2 left, we keep. */
    const char *rest = c->lent;
    size_t nrest = c->lent_len;
    c->lent = NULL;
    c->lent_len = 0;
    if (nrest > 0 && !c->torn_down)
        keep_input(c, rest, nrest);
}

static void on_tr_eof(mg_transport_t *t, int status)
{
    mg_ssh_conn_t *c = t->data;
    c->in_eof = true;
    if (status != UV_EOF && c->status == 0)
        mg__ssh_conn_fail(c, MG_ECLOSED, "connection to %s:%d failed: %s", c->host, c->port,
                          uv_strerror(status));
    drive(c);
}

static void on_tr_drain(mg_transport_t *t)
{
    mg_ssh_conn_t *c = t->data;
    c->queue_full = false;
    c->progress = true;
    drive(c);
}

static const mg_transport_cbs_t tr_cbs = {
    .on_connect = on_tr_connect,
    .on_read = on_tr_read,
    .on_eof = on_tr_eof,
    .on_drain = on_tr_drain,
    .on_close = on_tr_close,
};

/* ---- public API ---- */

void mg_ssh_conn_opts_init(mg_ssh_conn_opts_t *o, const mg_settings_t *s)
{
    *o = (mg_ssh_conn_opts_t){
        .port = 22,
        .connect_timeout_ms = s->connect_timeout_ms,
        .keepalive_interval_ms = s->keepalive_interval_ms,
        .keepalive_max_misses = s->keepalive_max_misses,
        .max_channels = s->max_channels,
    };
}

static void free_unstarted(mg_ssh_conn_t *c)
{
    if (c->session)
        libssh2_session_free(c->session);
    conn_free(c);
}

int mg_ssh_conn_start(uv_loop_t *loop, const mg_ssh_conn_opts_t *o, mg_transport_t *transport,
                      mg_ssh_conn_cb cb, void *data, mg_ssh_conn_t **out)
{
    if (o->host == NULL || o->ssh_user == NULL || o->key_path == NULL || o->user == NULL ||
        (o->known_hosts == NULL && o->host_key_sha256 == NULL) || o->port <= 0 ||
        o->port > 65535 || o->max_channels < 1 || o->keepalive_max_misses < 1 ||
        o->keepalive_interval_ms < 2000 || o->connect_timeout_ms == 0)
        return MG_EINVAL;
    uv_once(&global_once, global_init);
    if (global_rc != 0)
        return MG_ENOMEM;

    mg_ssh_conn_t *c = calloc(1, sizeof(*c));
    if (c == NULL)
        return MG_ENOMEM;
    mg_list_init(&c->chans);
    c->loop = loop;
    c->id = o->id != 0 ? o->id : next_conn_id++;
    c->user = strdup(o->user);
    c->host = strdup(o->host);
    c->ssh_user = strdup(o->ssh_user);
    c->key_path = strdup(o->key_path);
    c->key_passphrase = dup_or_null(o->key_passphrase);
    c->known_hosts = dup_or_null(o->known_hosts);
    c->host_key_sha256 = dup_or_null(o->host_key_sha256);
    c->port = o->port;
    c->connect_timeout_ms = o->connect_timeout_ms;
    c->keepalive_interval_ms = o->keepalive_interval_ms;
    c->keepalive_max_misses = o->keepalive_max_misses;
    c->max_channels = o->max_channels;
    c->cb = cb;
    c->data = data;
    c->started_at = uv_now(loop);
    c->session = libssh2_session_init_ex(NULL, NULL, NULL, c);
    if (!c->user || !c->host || !c->ssh_user || !c->key_path ||
        (o->key_passphrase && !c->key_passphrase) || (o->known_hosts && !c->known_hosts) ||
        (o->host_key_sha256 && !c->host_key_sha256) || !c->session) {
        free_unstarted(c);
        return MG_ENOMEM;
    }
    libssh2_session_callback_set(c->session, LIBSSH2_CALLBACK_SEND, (void *)ssh_send);
    libssh2_session_callback_set(c->session, LIBSSH2_CALLBACK_RECV, (void *)ssh_recv);
    libssh2_session_set_blocking(c->session, 0);
    /* The shortest interval libssh2 allows; our own timer decides when to send. */
    libssh2_keepalive_config(c->session, 1, 2);

    if (transport != NULL) {
        c->tr = transport;
        transport->data = c;
        transport->cbs = &tr_cbs;
        c->state = MG_SSH_HANDSHAKE;
    } else {
        int rc = mg_tcp_transport_connect(loop, c->host, c->port, &tr_cbs, c, &c->tr);
        if (rc != 0) {
            free_unstarted(c);
            return rc;
        }
        c->state = MG_SSH_CONNECTING;
    }
    uv_timer_init(loop, &c->timer);
    uv_timer_init(loop, &c->keepalive);
    uv_idle_init(loop, &c->idle);
    c->timer.data = c->keepalive.data = c->idle.data = c;
    uv_timer_start(&c->timer, on_timer, c->connect_timeout_ms, 0);
    if (c->state == MG_SSH_HANDSHAKE)
        mg__ssh_schedule_drive(c);
    if (strcmp(c->tr->ops->name, "tcp") == 0)
        mg_log_debug("ssh", "user=%s conn=%llu connecting to %s@%s:%d", c->user,
                     (unsigned long long)c->id, c->ssh_user, c->host, c->port);
    else
        mg_log_debug("ssh", "user=%s conn=%llu logging in as %s@%s over the %s", c->user,
                     (unsigned long long)c->id, c->ssh_user, c->host, c->tr->ops->name);
    *out = c;
    return 0;
}

void mg_ssh_conn_close(mg_ssh_conn_t *c, const char *reason, uint64_t wait_ms)
{
    if (c->torn_down || c->teardown_wanted)
        return;
    if (reason && c->reason[0] == '\0')
        snprintf(c->reason, sizeof(c->reason), "%s", reason);
    if (c->state < MG_SSH_READY) {
        mg__ssh_conn_fail(c, MG_ECANCELED, "closed before it was ready%s%s", reason ? ": " : "",
                          reason ? reason : "");
        return;
    }
    if (wait_ms == 0 || c->nchans == 0) {
        c->teardown_wanted = true;
        mg__ssh_schedule_drive(c);
        return;
    }
    if (c->state == MG_SSH_CLOSING) {
        uint64_t due = uv_timer_get_due_in(&c->timer);
        if (wait_ms >= due)
            return;
    }
    c->state = MG_SSH_CLOSING;
    uv_timer_start(&c->timer, on_timer, wait_ms, 0);
    mg_log_debug("ssh", "user=%s conn=%llu closing: waiting up to %llu ms for %d channel(s)",
                 c->user, (unsigned long long)c->id, (unsigned long long)wait_ms, c->nchans);
}

void mg_ssh_conn_trim(mg_ssh_conn_t *c)
{
    if (c->torn_down || c->driving || c->tr == NULL)
        return;
    if (mg__buf_size(&c->in) == 0)
        mg__buf_free(&c->in);
    mg_transport_trim(c->tr);
}

mg_ssh_state_t mg_ssh_conn_state(const mg_ssh_conn_t *c)
{
    return c->state;
}

bool mg_ssh_conn_was_ready(const mg_ssh_conn_t *c)
{
    return c->was_ready;
}

bool mg_ssh_conn_healthy(const mg_ssh_conn_t *c)
{
    return c->healthy;
}

int mg_ssh_conn_status(const mg_ssh_conn_t *c)
{
    return c->status;
}

const char *mg_ssh_conn_error(const mg_ssh_conn_t *c)
{
    return c->error;
}

uint64_t mg_ssh_conn_id(const mg_ssh_conn_t *c)
{
    return c->id;
}

int mg_ssh_conn_channels(const mg_ssh_conn_t *c)
{
    return c->nchans;
}

void mg_ssh_conn_stats(const mg_ssh_conn_t *c, mg_ssh_conn_stats_t *out)
{
    uint64_t now = uv_now(c->loop);
    *out = (mg_ssh_conn_stats_t){
        .id = c->id,
        .user = c->user,
        .state = c->state,
        .uptime_ms = c->ready_at ? now - c->ready_at : 0,
        .handshake_ms = c->handshake_ms,
        .channels = c->nchans,
        .bytes_in = c->tr ? c->tr->bytes_in : 0,
        .bytes_out = c->tr ? c->tr->bytes_out : 0,
        .last_used_ms = c->last_used,
        .healthy = c->healthy,
    };
}

const char *mg_ssh_state_name(mg_ssh_state_t s)
{
    switch (s) {
    case MG_SSH_CONNECTING: return "connecting";
    case MG_SSH_HANDSHAKE: return "handshake";
    case MG_SSH_AUTH: return "auth";
    case MG_SSH_READY: return "ready";
    case MG_SSH_CLOSING: return "closing";
    case MG_SSH_CLOSED: return "closed";
    }
    return "?";
}

