/*
 * ssh_int: what the three parts of an SSH connection share (src/ssh): the session and its
 * drive loop (ssh_conn.c), its channels (ssh_chan.c), and the host key check and
 * authentication (ssh_auth.c). Internal to src/ssh.
 */
#ifndef MOONGATE_SSH_INT_H
#define MOONGATE_SSH_INT_H

#include "core/buf.h"
#include "moongate/list.h"
#include "moongate/ssh_conn.h"

#include <libssh2.h>
#include <stdbool.h>
#include <stdint.h>

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
    mg__buf_t in;         /* bytes that came and libssh2 has not taken yet, oldest first */
    const char *lent;     /* during on_tr_read with in empty: the transport's bytes, read in */
    size_t lent_len;      /*   place (no copy, and no buffer of our own while idle) */
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


/* ---- ssh_conn.c, for the other two ---- */

/* libssh2's last error on c's session, for a message. */
const char *mg__ssh_last_error(mg_ssh_conn_t *c);
/* Records the first failure (status and message) and tears the connection down. */
void mg__ssh_conn_fail(mg_ssh_conn_t *c, int status, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
/* Drives c on the loop's next turn (or again, when it is driving now). */
void mg__ssh_schedule_drive(mg_ssh_conn_t *c);

/* ---- ssh_chan.c ---- */

/* Opens queued channels in turn and services every open or closing one. */
void mg__ssh_service_channels(mg_ssh_conn_t *c);
/* Ends every channel with status, the connection being torn down. */
void mg__ssh_end_channels(mg_ssh_conn_t *c, int status);

/* ---- ssh_auth.c ---- */

/* The handshake and the host key check on socket fd: true once both are done (false: again
   later, or failed through mg__ssh_conn_fail). */
bool mg__ssh_step_handshake(mg_ssh_conn_t *c, int fd);
/* Public key authentication: true once accepted (false: again later, or failed). */
bool mg__ssh_step_auth(mg_ssh_conn_t *c);

#endif
