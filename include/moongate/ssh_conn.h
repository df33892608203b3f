/*
 * ssh_conn: one SSH session (moongate is the client) over a transport, driven by libssh2 in
 * non-blocking mode, and the direct-tcpip channels it carries.
 *
 * A connection goes connecting -> handshake -> auth -> ready, and from any state to closing and
 * closed. Before auth it checks the server's host key against a known_hosts file (or a pinned
 * SHA256 fingerprint) and refuses an unknown or changed key, naming the host and the fingerprint
 * it saw. It authenticates with an ed25519 key file. The whole way to ready is bounded by
 * connect_timeout_ms.
 *
 * Channels are direct-tcpip streams to a target host:port on the server's side. Opens are
 * serialized (libssh2 keeps one open in progress per session); at most max_channels exist at
 * once. Reads are pushed to on_data while reading is on; mg_ssh_chan_read_stop() holds further
 * data inside libssh2, whose unreturned window then stops the peer, so nothing is read faster
 * than its consumer takes it. mg_ssh_chan_write() accepts what the peer's window and our bounded
 * write queue allow and returns MG_EAGAIN otherwise; on_writable says when to try again.
 *
 * When nothing has arrived for a keepalive interval the connection sends a keepalive that
 * the server must answer. If the next interval is silent too, the connection becomes unhealthy
 * (healthy again when bytes arrive); after keepalive_max_misses silent intervals it closes.
 *
 * Callbacks are never called from inside an API call: work an API call causes is done on the
 * loop's next turn. Every callback may call any function here, including closing the channel or
 * the connection it is told about.
 */
#ifndef MOONGATE_SSH_CONN_H
#define MOONGATE_SSH_CONN_H

#include "moongate/settings.h"
#include "moongate/transport.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>
#include <uv.h>

typedef struct mg_ssh_conn mg_ssh_conn_t;
typedef struct mg_ssh_chan mg_ssh_chan_t;

typedef enum mg_ssh_state {
    MG_SSH_CONNECTING = 0,
    MG_SSH_HANDSHAKE,
    MG_SSH_AUTH,
    MG_SSH_READY,
    MG_SSH_CLOSING,
    MG_SSH_CLOSED,
} mg_ssh_state_t;

typedef struct mg_ssh_conn_opts {
    uint64_t id;                 /* what logs call it (conn=ID): the pool's id, so one
                                    connection has one id everywhere; 0: the next of this
                                    module's own */
    const char *user;            /* moongate's user id, for logs and stats */
    const char *host;            /* the SSH server; also the known_hosts name */
    int port;
    const char *ssh_user;        /* the account to log in as */
    const char *key_path;        /* private key file (OpenSSH format, ed25519) */
    const char *key_passphrase;  /* or NULL */
    const char *known_hosts;     /* known_hosts file; may be NULL when host_key_sha256 is set */
    const char *host_key_sha256; /* optional pin, "SHA256:<base64>" as ssh-keygen -l prints */
    uint64_t connect_timeout_ms;
    uint64_t keepalive_interval_ms;
    int keepalive_max_misses;
    int max_channels;
    bool agent;                  /* for the pool backend: reach the server through the user's
                                    moongate-agent (docs/tunnel.md), not by dialing host:port */
} mg_ssh_conn_opts_t;

typedef enum mg_ssh_event {
    MG_SSH_EV_READY,     /* authenticated; channels may be opened */
    MG_SSH_EV_HEALTH,    /* mg_ssh_conn_healthy() changed */
    MG_SSH_EV_CLOSED,    /* gone; mg_ssh_conn_status() says why. Freed after the callback. */
} mg_ssh_event_t;

typedef void (*mg_ssh_conn_cb)(mg_ssh_conn_t *c, mg_ssh_event_t ev, void *data);

typedef struct mg_ssh_chan_cbs {
    /* The open finished: status 0, or a negative code with mg_ssh_chan_error(). On failure
       on_close follows. */
    void (*on_open)(mg_ssh_chan_t *ch, int status);
    /* Bytes from the target; buf is valid only during the call. */
    void (*on_data)(mg_ssh_chan_t *ch, const char *buf, size_t len);
    /* The target will send nothing more (after all on_data). */
    void (*on_eof)(mg_ssh_chan_t *ch);
    /* A write that returned MG_EAGAIN may be retried. */
    void (*on_writable)(mg_ssh_chan_t *ch);
    /* The channel is gone: status 0 after mg_ssh_chan_close(), else why (MG_ECLOSED when the
       connection went away, MG_EOPEN, ...). The channel is freed after this returns. */
    void (*on_close)(mg_ssh_chan_t *ch, int status);
} mg_ssh_chan_cbs_t;

typedef struct mg_ssh_conn_stats {
    uint64_t id;
    const char *user;
    mg_ssh_state_t state;
    uint64_t uptime_ms;       /* since the connection became ready; 0 before */
    uint64_t handshake_ms;    /* from the start of the dial to ready */
    int channels;             /* channels that exist (opening, open or closing) */
    uint64_t bytes_in;        /* transport bytes, encrypted */
    uint64_t bytes_out;
    uint64_t last_used_ms;    /* loop time of the last channel activity */
    bool healthy;
} mg_ssh_conn_stats_t;

/* Fills the numbers of opts from settings; the caller sets the strings. */
void mg_ssh_conn_opts_init(mg_ssh_conn_opts_t *opts, const mg_settings_t *settings);

/*
 * Starts a connection. With transport NULL it dials opts->host:port over TCP; otherwise it runs
 * over the given, already connected transport and takes ownership of it. The strings in opts
 * are copied. Returns 0 and *out (events follow on cb), or MG_EINVAL / MG_ENOMEM at once.
 */
int mg_ssh_conn_start(uv_loop_t *loop, const mg_ssh_conn_opts_t *opts, mg_transport_t *transport,
                      mg_ssh_conn_cb cb, void *data, mg_ssh_conn_t **out);

/*
 * Closes the connection: no new channels; open ones may finish for up to wait_ms, then they are
 * closed with MG_ECLOSED; then SSH_MSG_DISCONNECT with reason goes to the server and the
 * transport closes. wait_ms 0 closes at once. MG_SSH_EV_CLOSED follows. Calling it again only
 * shortens the wait.
 */
void mg_ssh_conn_close(mg_ssh_conn_t *c, const char *reason, uint64_t wait_ms);

/*
 * Gives back the memory of the connection's empty buffers (its input, its transport's queues):
 * for a connection that carries no request now, so that an idle tunnel holds little more than
 * libssh2's session. Whatever arrives or is sent later allocates again.
 */
void mg_ssh_conn_trim(mg_ssh_conn_t *c);

mg_ssh_state_t mg_ssh_conn_state(const mg_ssh_conn_t *c);
bool mg_ssh_conn_healthy(const mg_ssh_conn_t *c);
/* True once the connection has been ready: a close after that is not a failed connect. */
bool mg_ssh_conn_was_ready(const mg_ssh_conn_t *c);
/* 0 while all is well or after a clean close; else why the connection failed or ended. */
int mg_ssh_conn_status(const mg_ssh_conn_t *c);
/* A message for a person: why the connection failed, or "" */
const char *mg_ssh_conn_error(const mg_ssh_conn_t *c);
uint64_t mg_ssh_conn_id(const mg_ssh_conn_t *c);
int mg_ssh_conn_channels(const mg_ssh_conn_t *c);
void mg_ssh_conn_stats(const mg_ssh_conn_t *c, mg_ssh_conn_stats_t *out);
const char *mg_ssh_state_name(mg_ssh_state_t state);

/*
 * Opens a direct-tcpip channel to host:port on the server's side. Returns 0 and *out, then
 * on_open follows; MG_ECHANLIMIT when max_channels exist (message in mg_ssh_conn_error() is
 * not touched: the caller decides); MG_ESTATE when the connection is not ready.
 */
int mg_ssh_chan_open(mg_ssh_conn_t *c, const char *host, int port, const mg_ssh_chan_cbs_t *cbs,
                     void *data, mg_ssh_chan_t **out);

/*
 * Writes up to len bytes. Returns how many were taken (> 0, possibly fewer than len), MG_EAGAIN
 * when none can be taken now (on_writable follows), or MG_ESTATE when the channel is not open
 * or EOF was sent.
 */
ssize_t mg_ssh_chan_write(mg_ssh_chan_t *ch, const char *buf, size_t len);

/* Tells the target that nothing more will be written (after the bytes already taken). */
int mg_ssh_chan_send_eof(mg_ssh_chan_t *ch);

/* Flow control toward the consumer. Reading is on when a channel opens. */
void mg_ssh_chan_read_stop(mg_ssh_chan_t *ch);
void mg_ssh_chan_read_start(mg_ssh_chan_t *ch);

/* Closes the channel; on_close(0) follows. Safe to call more than once. */
void mg_ssh_chan_close(mg_ssh_chan_t *ch);

void *mg_ssh_chan_data(const mg_ssh_chan_t *ch);
void mg_ssh_chan_set_data(mg_ssh_chan_t *ch, void *data);
mg_ssh_conn_t *mg_ssh_chan_conn(const mg_ssh_chan_t *ch);
const char *mg_ssh_chan_error(const mg_ssh_chan_t *ch);
uint64_t mg_ssh_chan_bytes_in(const mg_ssh_chan_t *ch);
uint64_t mg_ssh_chan_bytes_out(const mg_ssh_chan_t *ch);

#endif
