/*
 * The channels of an SSH connection (see ssh_int.h): opened one at a time in the order they
 * were asked for, serviced on every pass of the connection's drive loop (any libssh2 call may
 * take packets meant for any channel), and freed after their on_close.
 */
#include "ssh_int.h"

#include "moongate/error.h"
#include "moongate/log.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <uv.h>

static _Thread_local char chan_read_buf[CHAN_READ_SIZE];

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
    snprintf(ch->error, sizeof(ch->error), "%s: %s", what, mg__ssh_last_error(ch->conn));
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
                mg__ssh_conn_fail(c, MG_ECLOSED, "connection lost while opening a channel");
                return false;
            }
            snprintf(ch->error, sizeof(ch->error),
                     "the server refused a channel to %s:%d: %s", ch->host, ch->port,
                     mg__ssh_last_error(c));
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

void mg__ssh_service_channels(mg_ssh_conn_t *c)
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

void mg__ssh_end_channels(mg_ssh_conn_t *c, int status)
{
    while (!mg_list_empty(&c->chans)) {
        mg_ssh_chan_t *ch = mg_list_entry(mg_list_first(&c->chans), mg_ssh_chan_t, node);
        if (ch->error[0] == '\0')
            snprintf(ch->error, sizeof(ch->error), "%s",
                     c->error[0] ? c->error : "the SSH connection closed");
        if (ch->state == CH_QUEUED || ch->state == CH_OPENING)
            ch->cbs->on_open(ch, status);
        /* libssh2_session_free() frees the libssh2 side of the channel. */
        chan_finish(ch, status);
    }
    c->opening = NULL;
}

/* ---- the public API ---- */

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
    mg__ssh_schedule_drive(c);
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
        mg__ssh_schedule_drive(c);
        return MG_EAGAIN;
    }
    ssize_t n = libssh2_channel_write(ch->ch, buf, len);
    /* The write may have consumed packets for other channels, and queued bytes to flush. */
    mg__ssh_schedule_drive(c);
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
    mg__ssh_schedule_drive(ch->conn);
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
    mg__ssh_schedule_drive(ch->conn);
}

void mg_ssh_chan_close(mg_ssh_chan_t *ch)
{
    if (ch->close_wanted)
        return;
    ch->close_wanted = true;
    mg__ssh_schedule_drive(ch->conn);
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
