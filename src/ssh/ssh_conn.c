/*
 * One SSH session over a transport, driven by libssh2 in non-blocking mode.
 *
 * libssh2 reads and writes through our callbacks: ssh_send() queues every byte on the transport
 * (never a short write, which would corrupt the stream), ssh_recv() hands out what the
 * transport delivered into c->in, or EAGAIN. Everything that calls into libssh2 happens in
 * drive(), which runs until no step makes progress: after bytes arrive, after the transport
 * drains, on timers, and (deferred to the loop's next turn through an idle handle) after API
 * calls. Any libssh2 call may consume packets meant for other channels, so every pass services
 * every channel. One flush of the transport ends each drive.
 *
 * Objects are freed only at defined points: a channel after its on_close, inside drive() while
 * that channel is the one being serviced; the connection after its three handles have closed,
 * which is after MG_SSH_EV_CLOSED.
 */
#include "moongate/ssh_conn.h"

#include "core/buf.h"
#include "core/fingerprint.h"
#include "moongate/list.h"
#include "moongate/error.h"
#include "moongate/log.h"

#include <errno.h>
#include <fcntl.h>
#include <libssh2.h>
#include <openssl/evp.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>

#define CHAN_READ_SIZE (64 * 1024)
/* Channel writes wait while this much is queued on the transport. */
#define WRITE_HIGH_WATER (1024 * 1024)
/* Bytes that arrived but that libssh2 has not taken: more than the windows allow is an error. */
#define INBUF_MAX (32 * 1024 * 1024)
#define INBUF_KEEP_CAP (256 * 1024)
/* How long a closing connection waits for its DISCONNECT to be written. */
#define FLUSH_ON_CLOSE_MS 2000

typedef enum chan_state {
    CH_QUEUED,   /* waiting for its turn to open */
    CH_OPENING,  /* the open libssh2 is working on */
    CH_OPEN,
    CH_CLOSING,  /* close sent, waiting for the server's close */
} chan_state_t;

struct mg_ssh_chan {
    mg_ssh_conn_t *conn;
    LIBSSH2_CHANNEL *ch;
    chan_state_t state;
    const mg_ssh_chan_cbs_t *cbs;
    void *data;
    char *host;
    int port;
    bool reading;
    bool eof_seen;
    bool eof_wanted;
    bool eof_sent;
    bool want_write;
    bool close_wanted;
    int close_status;
    uint64_t bytes_in;
    uint64_t bytes_out;
    char error[512];
    mg_list_t node;       /* on the connection's chans */
};

struct mg_ssh_conn {
    uv_loop_t *loop;
    uint64_t id;
    char *user, *host, *ssh_user, *key_path, *key_passphrase, *known_hosts, *host_key_sha256;
    int port;
    uint64_t connect_timeout_ms;
    uint64_t keepalive_interval_ms;
    int keepalive_max_misses;
    int max_channels;

    mg_transport_t *tr;
    LIBSSH2_SESSION *session;
    mg_ssh_state_t state;
    mg__buf_t in;
    bool in_eof;          /* the transport will deliver nothing more */

    uv_timer_t timer;     /* connect deadline, then close deadlines */
    uv_timer_t keepalive;
    uv_idle_t idle;       /* runs a deferred drive */
    int handles_closed;

    mg_list_t chans;      /* in the order they were asked for */
    mg_ssh_chan_t *opening;
    int nchans;

    mg_ssh_conn_cb cb;
    void *data;
    int status;
    char error[512];
    char reason[128];

    uint64_t started_at, ready_at, last_used, handshake_ms;
    bool was_ready;
    bool healthy;
    int misses;
    bool ka_outstanding;
    uint64_t ka_mark;

    bool driving;
    bool redrive;
    bool progress;        /* bytes arrived or the transport drained: writers may retry */
    bool queue_full;      /* a write was refused for the transport's queue */
    bool teardown_wanted;
    bool torn_down;
    bool closing_handles;
};

static uv_once_t global_once = UV_ONCE_INIT;
static int global_fd = -1;
static int global_rc;
static uint64_t next_conn_id = 1;
static _Thread_local char chan_read_buf[CHAN_READ_SIZE];

static void drive(mg_ssh_conn_t *c);
static void start_keepalive(mg_ssh_conn_t *c);
static void schedule_drive(mg_ssh_conn_t *c);
static void conn_fail(mg_ssh_conn_t *c, int status, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

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
    if (avail == 0)
        return c->in_eof ? 0 : -EAGAIN;
    size_t n = avail < len ? avail : len;
    memcpy(buf, c->in.data + c->in.off, n);
    mg__buf_consume(&c->in, n, INBUF_KEEP_CAP);
    return (ssize_t)n;
}

/* ---- helpers ---- */

static char *dup_or_null(const char *s)
{
    return s ? strdup(s) : NULL;
}

static const char *ssh_last_error(mg_ssh_conn_t *c)
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

/* ---- channels ---- */

static void chan_unlink(mg_ssh_conn_t *c, mg_ssh_chan_t *ch)
{
    mg_list_remove(&ch->node);
    c->nchans--;
}

/* Reports the channel gone and frees it. */
static void chan_finish(mg_ssh_chan_t *ch, int status)
{
    mg_ssh_conn_t *c = ch->conn;
    chan_unlink(c, ch);
    c->last_used = uv_now(c->loop);
    mg_log_trace("ssh", "user=%s conn=%llu channel to %s:%d closed (%s)", c->user,
                 (unsigned long long)c->id, ch->host, ch->port,
                 status ? mg_strerror(status) : "ok");
    ch->cbs->on_close(ch, status);
    free(ch->host);
    free(ch);
}

static void chan_fail(mg_ssh_chan_t *ch, int status, const char *what)
{
    if (ch->close_wanted)
        return;
    snprintf(ch->error, sizeof(ch->error), "%s: %s", what, ssh_last_error(ch->conn));
    ch->close_wanted = true;
    ch->close_status = status;
}

/* Opens queued channels one at a time. Returns false when the connection failed. */
static bool service_opens(mg_ssh_conn_t *c)
{
    for (;;) {
        mg_ssh_chan_t *ch = c->opening;
        if (ch == NULL) {
            mg_list_t *n;
            mg_list_foreach(n, &c->chans) {
                ch = mg_list_entry(n, mg_ssh_chan_t, node);
                if (ch->state == CH_QUEUED)
                    break;
                ch = NULL;
            }
            if (ch == NULL)
                return true;
            if (ch->close_wanted) {
                chan_finish(ch, 0);
                continue;
            }
            ch->state = CH_OPENING;
            c->opening = ch;
        }
        /* On EAGAIN libssh2 must be called again with the same arguments. */
        LIBSSH2_CHANNEL *lc = libssh2_channel_direct_tcpip_ex(c->session, ch->host, ch->port,
                                                              "127.0.0.1", 22);
        if (lc == NULL) {
            int e = libssh2_session_last_errno(c->session);
            if (e == LIBSSH2_ERROR_EAGAIN)
                return true;
            c->opening = NULL;
            if (e == LIBSSH2_ERROR_SOCKET_DISCONNECT || e == LIBSSH2_ERROR_SOCKET_SEND ||
                e == LIBSSH2_ERROR_SOCKET_RECV) {
                conn_fail(c, MG_ECLOSED, "connection lost while opening a channel");
                return false;
            }
            snprintf(ch->error, sizeof(ch->error),
                     "the server refused a channel to %s:%d: %s", ch->host, ch->port,
                     ssh_last_error(c));
            mg_log_warn("ssh", "user=%s conn=%llu %s", c->user, (unsigned long long)c->id,
                        ch->error);
            ch->cbs->on_open(ch, MG_EOPEN);
            chan_finish(ch, MG_EOPEN);
            if (c->teardown_wanted)
                return false;
            continue;
        }
        c->opening = NULL;
        ch->ch = lc;
        ch->state = CH_OPEN;
        ch->reading = true;
        c->last_used = uv_now(c->loop);
        if (!ch->close_wanted)
            ch->cbs->on_open(ch, 0);
        if (c->teardown_wanted)
            return false;
    }
}

/* Services one open or closing channel; may free it. */
static void service_chan(mg_ssh_conn_t *c, mg_ssh_chan_t *ch, bool writers_may_retry)
{
    if (ch->state == CH_OPEN && !ch->close_wanted) {
        while (ch->reading && !ch->eof_seen && !ch->close_wanted && !c->teardown_wanted) {
            ssize_t n = libssh2_channel_read(ch->ch, chan_read_buf, sizeof(chan_read_buf));
            if (n > 0) {
                ch->bytes_in += (uint64_t)n;
                c->last_used = uv_now(c->loop);
                ch->cbs->on_data(ch, chan_read_buf, (size_t)n);
                continue;
            }
            if (n == LIBSSH2_ERROR_EAGAIN)
                break;
            if (n == 0) {
                if (libssh2_channel_eof(ch->ch)) {
                    ch->eof_seen = true;
                    ch->cbs->on_eof(ch);
                }
                break;
            }
            chan_fail(ch, MG_ECLOSED, "reading the channel failed");
        }
        if (c->teardown_wanted)
            return;
        if (ch->eof_wanted && !ch->eof_sent && !ch->close_wanted) {
            int rc = libssh2_channel_send_eof(ch->ch);
            if (rc == 0)
                ch->eof_sent = true;
            else if (rc != LIBSSH2_ERROR_EAGAIN)
                chan_fail(ch, MG_ECLOSED, "sending EOF failed");
        }
        if (ch->want_write && writers_may_retry && !ch->close_wanted) {
            ch->want_write = false;
            ch->cbs->on_writable(ch);
            if (c->teardown_wanted)
                return;
        }
    }
    if (ch->state == CH_OPEN && ch->close_wanted)
        ch->state = CH_CLOSING;
    if (ch->state == CH_CLOSING) {
        /* Sends EOF and CLOSE, then waits (EAGAIN) for the server's CLOSE. */
        int rc = libssh2_channel_close(ch->ch);
        if (rc == LIBSSH2_ERROR_EAGAIN)
            return;
        rc = libssh2_channel_free(ch->ch);
        if (rc == LIBSSH2_ERROR_EAGAIN)
            return;
        ch->ch = NULL;
        chan_finish(ch, ch->close_status);
    }
}

static void service_channels(mg_ssh_conn_t *c)
{
    bool writers_may_retry = c->progress;
    c->progress = false;
    if (!service_opens(c))
        return;
    mg_list_t *n, *tmp;
    mg_list_foreach_safe(n, tmp, &c->chans) {
        /* Servicing ch frees at most ch itself; channels opened meanwhile join at the tail. */
        if (c->teardown_wanted)
            break;
        mg_ssh_chan_t *ch = mg_list_entry(n, mg_ssh_chan_t, node);
        if (ch->state == CH_OPEN || ch->state == CH_CLOSING)
            service_chan(c, ch, writers_may_retry);
    }
}

/* ---- setup: host key and authentication ---- */

static const char *key_type_name(int type)
{
    switch (type) {
    case LIBSSH2_HOSTKEY_TYPE_RSA: return "ssh-rsa";
    case LIBSSH2_HOSTKEY_TYPE_DSS: return "ssh-dss";
    case LIBSSH2_HOSTKEY_TYPE_ECDSA_256: return "ecdsa-sha2-nistp256";
    case LIBSSH2_HOSTKEY_TYPE_ECDSA_384: return "ecdsa-sha2-nistp384";
    case LIBSSH2_HOSTKEY_TYPE_ECDSA_521: return "ecdsa-sha2-nistp521";
    case LIBSSH2_HOSTKEY_TYPE_ED25519: return "ssh-ed25519";
    }
    return "unknown";
}

static int knownhost_type(int type)
{
    switch (type) {
    case LIBSSH2_HOSTKEY_TYPE_RSA: return LIBSSH2_KNOWNHOST_KEY_SSHRSA;
    case LIBSSH2_HOSTKEY_TYPE_DSS: return LIBSSH2_KNOWNHOST_KEY_SSHDSS;
    case LIBSSH2_HOSTKEY_TYPE_ECDSA_256: return LIBSSH2_KNOWNHOST_KEY_ECDSA_256;
    case LIBSSH2_HOSTKEY_TYPE_ECDSA_384: return LIBSSH2_KNOWNHOST_KEY_ECDSA_384;
    case LIBSSH2_HOSTKEY_TYPE_ECDSA_521: return LIBSSH2_KNOWNHOST_KEY_ECDSA_521;
    case LIBSSH2_HOSTKEY_TYPE_ED25519: return LIBSSH2_KNOWNHOST_KEY_ED25519;
    }
    return LIBSSH2_KNOWNHOST_KEY_UNKNOWN;
}

/* The host key's SHA256 fingerprint, or "SHA256:?" when libssh2 has none. */
static void host_key_fingerprint(LIBSSH2_SESSION *s, char *out, size_t outlen)
{
    const unsigned char *hash =
        (const unsigned char *)libssh2_hostkey_hash(s, LIBSSH2_HOSTKEY_HASH_SHA256);
    if (hash == NULL || mg_fingerprint_sha256(hash, out, outlen) != 0)
        snprintf(out, outlen, "SHA256:?");
}

/*
 * Reads a known_hosts file line by line, so that one line libssh2 does not understand (a key
 * type it lacks, a marker) does not hide the lines after it. Returns 0 or -errno.
 */
static int load_known_hosts(LIBSSH2_KNOWNHOSTS *kh, const char *path)
{
    FILE *f = fopen(path, "re");
    if (f == NULL)
        return -errno;
    char line[8192];
    while (fgets(line, sizeof(line), f)) {
        size_t len = strlen(line);
        while (len > 0 && (line[len - 1] == '\n' || line[len - 1] == '\r'))
            line[--len] = '\0';
        if (len == 0 || line[0] == '#')
            continue;
        libssh2_knownhost_readline(kh, line, len, LIBSSH2_KNOWNHOST_FILE_OPENSSH);
    }
    fclose(f);
    return 0;
}

static int check_host_key(mg_ssh_conn_t *c)
{
    size_t klen = 0;
    int ktype = 0;
    const char *key = libssh2_session_hostkey(c->session, &klen, &ktype);
    if (key == NULL) {
        conn_fail(c, MG_EHOSTKEY, "%s:%d sent no host key", c->host, c->port);
        return -1;
    }
    char fp[80];
    host_key_fingerprint(c->session, fp, sizeof(fp));
    const char *tname = key_type_name(ktype);

    if (c->host_key_sha256 != NULL) {
        if (strcmp(fp, c->host_key_sha256) == 0)
            return 0;
        conn_fail(c, MG_EHOSTKEY,
                  "host key for %s:%d does not match the pinned key: the server presented %s "
                  "%s, expected %s; refusing to connect",
                  c->host, c->port, tname, fp, c->host_key_sha256);
        return -1;
    }

    LIBSSH2_KNOWNHOSTS *kh = libssh2_knownhost_init(c->session);
    if (kh == NULL) {
        conn_fail(c, MG_ENOMEM, "out of memory checking the host key");
        return -1;
    }
    int rc = load_known_hosts(kh, c->known_hosts);
    if (rc < 0) {
        libssh2_knownhost_free(kh);
        conn_fail(c, MG_EHOSTKEY,
                  "cannot read known_hosts file %s (%s), so the host key of %s:%d (%s %s) "
                  "cannot be verified; refusing to connect",
                  c->known_hosts, strerror(-rc), c->host, c->port, tname, fp);
        return -1;
    }
    struct libssh2_knownhost *found = NULL;
    int check = libssh2_knownhost_checkp(kh, c->host, c->port, key, klen,
                                         LIBSSH2_KNOWNHOST_TYPE_PLAIN |
                                             LIBSSH2_KNOWNHOST_KEYENC_RAW |
                                             knownhost_type(ktype),
                                         &found);
    libssh2_knownhost_free(kh);
    switch (check) {
    case LIBSSH2_KNOWNHOST_CHECK_MATCH:
        mg_log_debug("ssh", "user=%s conn=%llu host key %s %s matches %s", c->user,
                     (unsigned long long)c->id, tname, fp, c->known_hosts);
        return 0;
    case LIBSSH2_KNOWNHOST_CHECK_MISMATCH:
        conn_fail(c, MG_EHOSTKEY,
                  "host key for %s:%d has CHANGED: the server presented %s %s, which does not "
                  "match %s; refusing to connect",
                  c->host, c->port, tname, fp, c->known_hosts);
        return -1;
    case LIBSSH2_KNOWNHOST_CHECK_NOTFOUND:
        conn_fail(c, MG_EHOSTKEY,
                  "host key for %s:%d is not in %s: the server presented %s %s; refusing to "
                  "connect (add the key if it is right)",
                  c->host, c->port, c->known_hosts, tname, fp);
        return -1;
    default:
        conn_fail(c, MG_EHOSTKEY, "checking the host key of %s:%d (%s %s) failed", c->host,
                  c->port, tname, fp);
        return -1;
    }
}

static void step_handshake(mg_ssh_conn_t *c)
{
    int rc = libssh2_session_handshake(c->session, global_fd);
    if (rc == LIBSSH2_ERROR_EAGAIN)
        return;
    if (rc != 0) {
        conn_fail(c, c->in_eof ? MG_ECLOSED : MG_ESSH, "SSH handshake with %s:%d failed: %s",
                  c->host, c->port, ssh_last_error(c));
        return;
    }
    if (check_host_key(c) != 0)
        return;
    c->state = MG_SSH_AUTH;
    c->redrive = true;
}

static void step_auth(mg_ssh_conn_t *c)
{
    int rc = libssh2_userauth_publickey_fromfile_ex(c->session, c->ssh_user,
                                                    (unsigned)strlen(c->ssh_user), NULL,
                                                    c->key_path, c->key_passphrase);
    if (rc == LIBSSH2_ERROR_EAGAIN)
        return;
    if (rc == LIBSSH2_ERROR_FILE) {
        conn_fail(c, MG_EAUTH, "cannot use key file %s: %s", c->key_path, ssh_last_error(c));
        return;
    }
    if (rc == LIBSSH2_ERROR_AUTHENTICATION_FAILED || rc == LIBSSH2_ERROR_PUBLICKEY_UNVERIFIED) {
        conn_fail(c, MG_EAUTH, "%s:%d refused key %s for user %s", c->host, c->port,
                  c->key_path, c->ssh_user);
        return;
    }
    if (rc != 0) {
        conn_fail(c, c->in_eof ? MG_ECLOSED : MG_ESSH, "authentication with %s:%d failed: %s",
                  c->host, c->port, ssh_last_error(c));
        return;
    }
    uint64_t now = uv_now(c->loop);
    c->state = MG_SSH_READY;
    c->was_ready = true;
    c->ready_at = c->last_used = now;
    c->handshake_ms = now - c->started_at;
    c->healthy = true;
    c->ka_mark = c->tr->bytes_in;
    uv_timer_stop(&c->timer);
    start_keepalive(c);
    mg_log_info("ssh", "user=%s conn=%llu ready: %s@%s:%d in %llu ms", c->user,
                (unsigned long long)c->id, c->ssh_user, c->host, c->port,
                (unsigned long long)c->handshake_ms);
    c->redrive = true;
    emit(c, MG_SSH_EV_READY);
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
            conn_fail(c, MG_ETIMEDOUT, "%s:%d answered no keepalive for %llu ms", c->host,
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
        conn_fail(c, MG_ETIMEDOUT, "could not connect to %s:%d within %llu ms (stuck in %s)",
                  c->host, c->port, (unsigned long long)c->connect_timeout_ms,
                  mg_ssh_state_name(c->state));
    } else if (c->state == MG_SSH_CLOSING) {
        mg_log_info("ssh", "user=%s conn=%llu %d channel(s) still open at the close deadline; "
                    "closing them", c->user, (unsigned long long)c->id, c->nchans);
        c->teardown_wanted = true;
    }
    drive(c);
}

/* ---- teardown ---- */

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
    free(c->user);
    free(c->host);
    free(c->ssh_user);
    free(c->key_path);
    free(c->key_passphrase);
    free(c->known_hosts);
    free(c->host_key_sha256);
    free(c);
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
    int chan_status = c->status ? c->status : MG_ECLOSED;
    while (!mg_list_empty(&c->chans)) {
        mg_ssh_chan_t *ch = mg_list_entry(mg_list_first(&c->chans), mg_ssh_chan_t, node);
        if (ch->error[0] == '\0')
            snprintf(ch->error, sizeof(ch->error), "%s",
                     c->error[0] ? c->error : "the SSH connection closed");
        if (ch->state == CH_QUEUED || ch->state == CH_OPENING)
            ch->cbs->on_open(ch, chan_status);
        /* libssh2_session_free() frees the libssh2 side of the channel. */
        chan_finish(ch, chan_status);
    }
    c->opening = NULL;
    bool was_ready = c->state == MG_SSH_READY || c->state == MG_SSH_CLOSING;
    if (was_ready && c->tr && !c->in_eof) {
        const char *why = c->reason[0] ? c->reason : c->status ? c->error : "closing";
        libssh2_session_disconnect_ex(c->session, SSH_DISCONNECT_BY_APPLICATION, why, "");
    }
    /* From here libssh2 sees a closed stream, so freeing its channels cannot wait on the peer. */
    c->torn_down = true;
    c->in_eof = true;
    mg__buf_consume(&c->in, mg__buf_size(&c->in), 0);
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

static void conn_fail(mg_ssh_conn_t *c, int status, const char *fmt, ...)
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
        schedule_drive(c);
}

/* ---- the drive loop ---- */

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
            step_handshake(c);
            break;
        case MG_SSH_AUTH:
            step_auth(c);
            break;
        case MG_SSH_READY:
        case MG_SSH_CLOSING:
            service_channels(c);
            if (c->state == MG_SSH_CLOSING && c->nchans == 0)
                c->teardown_wanted = true;
            break;
        default:
            break;
        }
        if (c->in_eof && mg__buf_size(&c->in) == 0 && !c->teardown_wanted &&
            c->state != MG_SSH_CONNECTING)
            conn_fail(c, MG_ECLOSED, "%s:%d closed the connection", c->host, c->port);
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
        schedule_drive(c);
    }
}

static void on_idle(uv_idle_t *h)
{
    uv_idle_stop(h);
    drive(h->data);
}

static void schedule_drive(mg_ssh_conn_t *c)
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
        conn_fail(c, MG_ECONNECT, "cannot connect to %s:%d: %s", c->host, c->port,
                  uv_strerror(status));
        drive(c);
        return;
    }
    c->state = MG_SSH_HANDSHAKE;
    drive(c);
}

static void on_tr_read(mg_transport_t *t, const char *buf, size_t len)
{
    mg_ssh_conn_t *c = t->data;
    if (c->torn_down)
        return;
    if (mg__buf_size(&c->in) + len > INBUF_MAX || mg__buf_append(&c->in, buf, len) != 0) {
        conn_fail(c, MG_ESSH, "%s:%d sent more than %d bytes that could not be processed",
                  c->host, c->port, INBUF_MAX);
        drive(c);
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
}

static void on_tr_eof(mg_transport_t *t, int status)
{
    mg_ssh_conn_t *c = t->data;
    c->in_eof = true;
    if (status != UV_EOF && c->status == 0)
        conn_fail(c, MG_ECLOSED, "connection to %s:%d failed: %s", c->host, c->port,
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
    free(c->user);
    free(c->host);
    free(c->ssh_user);
    free(c->key_path);
    free(c->key_passphrase);
    free(c->known_hosts);
    free(c->host_key_sha256);
    free(c);
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
    c->id = next_conn_id++;
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
        schedule_drive(c);
    mg_log_debug("ssh", "user=%s conn=%llu connecting to %s@%s:%d over %s", c->user,
                 (unsigned long long)c->id, c->ssh_user, c->host, c->port,
                 c->tr->ops->name);
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
        conn_fail(c, MG_ECANCELED, "closed before it was ready%s%s", reason ? ": " : "",
                  reason ? reason : "");
        return;
    }
    if (wait_ms == 0 || c->nchans == 0) {
        c->teardown_wanted = true;
        schedule_drive(c);
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

int mg_ssh_chan_open(mg_ssh_conn_t *c, const char *host, int port, const mg_ssh_chan_cbs_t *cbs,
                     void *data, mg_ssh_chan_t **out)
{
    if (host == NULL || port <= 0 || port > 65535 || cbs == NULL)
        return MG_EINVAL;
    if (c->state != MG_SSH_READY || c->teardown_wanted)
        return MG_ESTATE;
    if (c->nchans >= c->max_channels)
        return MG_ECHANLIMIT;
    mg_ssh_chan_t *ch = calloc(1, sizeof(*ch));
    if (ch == NULL || (ch->host = strdup(host)) == NULL) {
        free(ch);
        return MG_ENOMEM;
    }
    ch->conn = c;
    ch->port = port;
    ch->cbs = cbs;
    ch->data = data;
    ch->state = CH_QUEUED;
    mg_list_insert_tail(&c->chans, &ch->node);
    c->nchans++;
    schedule_drive(c);
    *out = ch;
    return 0;
}

ssize_t mg_ssh_chan_write(mg_ssh_chan_t *ch, const char *buf, size_t len)
{
    mg_ssh_conn_t *c = ch->conn;
    if (ch->state != CH_OPEN || ch->eof_wanted || ch->close_wanted || c->teardown_wanted)
        return MG_ESTATE;
    if (len == 0)
        return 0;
    if (c->tr == NULL || c->tr->write_queued >= WRITE_HIGH_WATER) {
        ch->want_write = true;
        c->queue_full = true;
        schedule_drive(c);
        return MG_EAGAIN;
    }
    ssize_t n = libssh2_channel_write(ch->ch, buf, len);
    /* The write may have consumed packets for other channels, and queued bytes to flush. */
    schedule_drive(c);
    if (n > 0) {
        ch->bytes_out += (uint64_t)n;
        c->last_used = uv_now(c->loop);
        return n;
    }
    if (n == 0 || n == LIBSSH2_ERROR_EAGAIN) {
        ch->want_write = true;
        return MG_EAGAIN;
    }
    chan_fail(ch, MG_ECLOSED, "writing the channel failed");
    return MG_ECLOSED;
}

int mg_ssh_chan_send_eof(mg_ssh_chan_t *ch)
{
    if (ch->close_wanted)
        return MG_ESTATE;
    ch->eof_wanted = true;
    schedule_drive(ch->conn);
    return 0;
}

void mg_ssh_chan_read_stop(mg_ssh_chan_t *ch)
{
    ch->reading = false;
}

void mg_ssh_chan_read_start(mg_ssh_chan_t *ch)
{
    if (ch->reading)
        return;
    ch->reading = true;
    schedule_drive(ch->conn);
}

void mg_ssh_chan_close(mg_ssh_chan_t *ch)
{
    if (ch->close_wanted)
        return;
    ch->close_wanted = true;
    schedule_drive(ch->conn);
}

void *mg_ssh_chan_data(const mg_ssh_chan_t *ch)
{
    return ch->data;
}

void mg_ssh_chan_set_data(mg_ssh_chan_t *ch, void *data)
{
    ch->data = data;
}

mg_ssh_conn_t *mg_ssh_chan_conn(const mg_ssh_chan_t *ch)
{
    return ch->conn;
}

const char *mg_ssh_chan_error(const mg_ssh_chan_t *ch)
{
    return ch->error;
}

uint64_t mg_ssh_chan_bytes_in(const mg_ssh_chan_t *ch)
{
    return ch->bytes_in;
}

uint64_t mg_ssh_chan_bytes_out(const mg_ssh_chan_t *ch)
{
    return ch->bytes_out;
}
