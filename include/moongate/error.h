/*
 * moongate error codes.
 *
 * Every function that can fail returns 0 or one of the negative codes below (or, where it says
 * so, a negated libuv code). mg_strerror() names a code; the object that failed usually keeps a
 * longer message of its own (mg_ssh_conn_error(), mg_pool_acquire_t.error, ...).
 */
#ifndef MOONGATE_ERROR_H
#define MOONGATE_ERROR_H

enum mg_error {
    MG_OK = 0,
    MG_EAGAIN = -1000,   /* try again when told (a callback says when) */
    MG_ENOMEM = -1001,   /* out of memory */
    MG_EINVAL = -1002,   /* an argument is invalid */
    MG_ESTATE = -1003,   /* not possible in the object's current state */
    MG_ECHANLIMIT = -1004,  /* the connection has max_channels channels open */
    MG_ECONNLIMIT = -1005,  /* the user is at max_connections and waiting is not possible */
    MG_EQUEUEFULL = -1006,  /* the user's wait queue is full */
    MG_ETIMEDOUT = -1007,   /* a deadline passed */
    MG_ECONNECT = -1008,    /* could not reach the SSH server */
    MG_EHOSTKEY = -1009,    /* the server's host key is unknown or does not match */
    MG_EAUTH = -1010,       /* the server refused our key */
    MG_ESSH = -1011,        /* an SSH protocol error */
    MG_ECLOSED = -1012,     /* the connection or channel closed */
    MG_ESHUTDOWN = -1013,   /* the gateway is shutting down */
    MG_ECANCELED = -1014,   /* the operation was cancelled */
    MG_EBACKOFF = -1015,    /* a recent connect for this user failed; not retrying yet */
    MG_EOPEN = -1016,       /* the server refused to open the channel */
    MG_ECONFIG = -1017,     /* a setting is invalid */
    MG_EBUSY = -1018,       /* the gateway has too many SSH handshakes waiting to take one more */
};

/* A short, static description of an error code; never NULL. */
const char *mg_strerror(int err);

#endif
