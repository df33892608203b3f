/*
 * pool: each user's connections, the limits on them, and who waits for them.
 *
 * A user asks for a lease: one channel slot on one of that user's ready, healthy connections.
 * The pool reuses a connection first (the least loaded one with a free slot), else opens a new one
 * while the user is under max_connections, else queues the request in that user's bounded queue
 * until a slot frees up or its deadline passes. A burst of requests opens only as many connections
 * as it needs (each new connection will carry max_channels leases), not one per request.
 *
 * New connections, over all users, go through one gate: at most max_handshakes (a setting) are
 * opening at once (from the backend's open to ready or failed), at most
 * max_handshakes_per_server of them with any one SSH server (whose MaxStartups would drop the
 * rest), and the others wait in arrival order, at most handshake_queue_max of them, for as long
 * as a request of their user waits for them. So a herd of users arriving together is served a few handshakes at a time instead of
 * all timing out together. A connection given up on while waiting (its requests timed out or
 * were cancelled) leaves the queue at once.
 *
 * The pool does not speak SSH. It drives a backend (mg_pool_backend_t) that opens and closes real
 * connections and reports back through mg_pool_conn_ready(), _failed(), _set_healthy() and
 * _closed(). src/ssh_backend.c is the SSH backend; the unit tests use a fake one.
 *
 * Connections and leases are never shared between users: every lookup is by user id, and user ids
 * are validated (mg_pool_user_id_valid()).
 *
 * Single-threaded: every function runs on the loop's thread. Callbacks may call back into the pool.
 */
#ifndef MOONGATE_POOL_H
#define MOONGATE_POOL_H

#include "moongate/list.h"
#include "moongate/settings.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <uv.h>

typedef struct mg_pool mg_pool_t;
typedef struct mg_pool_conn mg_pool_conn_t;
typedef struct mg_pool_acquire mg_pool_acquire_t;

/* A user's limits. The defaults come from the settings; a policy may set them per user. */
typedef struct mg_pool_limits {
    int max_connections;       /* connections open or opening at once */
    int max_channels;          /* leases per connection */
    uint64_t idle_timeout_ms;  /* a connection without leases idle this long is stale */
    int queue_max;             /* requests waiting at once beyond those the connections being
                                  opened will carry; 0: none waits once at max_connections */
    uint64_t queue_timeout_ms; /* how long one request may wait */
} mg_pool_limits_t;

/*
 * Fills *out with the limits for user. Returns 0, or a negative code to use the defaults
 * (the pool logs that). Called when a user first appears and again after
 * mg_pool_refresh_limits().
 */
typedef int (*mg_pool_limits_fn)(void *ctx, const char *user, mg_pool_limits_t *out);

typedef struct mg_pool_backend {
    /*
     * Start opening a connection for user; pc is the pool's record of it. open_arg is the
     * open_arg of the acquire that caused the open: copy what you need, it does not outlive the
     * call. Returns 0, then later (never before returning) calls mg_pool_conn_ready() or
     * mg_pool_conn_failed(). Or returns a negative code with a message in err: the open failed
     * at once, and the pool treats it as mg_pool_conn_failed().
     */
    int (*open)(void *ctx, mg_pool_conn_t *pc, const char *user, void *open_arg, char *err,
                size_t errlen);
    /*
     * Close the connection. Without force, wait for its channels to finish first (the backend
     * bounds the wait); with force, end them now. Either way the backend calls
     * mg_pool_conn_closed() when the connection is gone, possibly before returning. Called at
     * most once per connection.
     */
    void (*close)(void *ctx, mg_pool_conn_t *pc, bool force, const char *reason);
    /*
     * Optional: names the server a connection for open_arg would handshake with ("host:port")
     * into out (cap bytes), so that the pool bounds the handshakes with each server
     * (max_handshakes_per_server). Returns false when there is none to bound (each agent has
     * its own sshd); then only the gateway-wide bound applies.
     */
    bool (*server)(void *ctx, void *open_arg, char *out, size_t cap);
    /*
     * Optional: pc serves no request now (every lease it holds is idle, or none): give back
     * memory it can do without until it does (empty buffers). Called by the stale sweep.
     */
    void (*trim)(void *ctx, mg_pool_conn_t *pc);
} mg_pool_backend_t;

/*
 * Completion of an acquire that had to wait. status is 0 (req->conn holds the lease) or a
 * negative code with req->error saying why. Called exactly once per waiting acquire, unless it
 * was cancelled.
 */
typedef void (*mg_pool_acquire_cb)(mg_pool_acquire_t *req, int status);

/* One request for a lease; the caller owns the memory and keeps it alive until it completes. */
struct mg_pool_acquire {
    /* public */
    void *data;
    /* read-only: the lease, on success */
    mg_pool_conn_t *conn;
    /* read-only: on failure, the code and a message for a person */
    int status;
    char error[256];
    /* private */
    mg_pool_acquire_cb cb;
    void *user_entry;
    mg_list_t node;
    uint64_t deadline;
    void *open_arg;
};

typedef struct mg_pool_stats {
    int total_connections; /* open or opening, over all users */
    int ready_connections;
    int users;             /* users with a connection or a waiter */
    int leases;            /* leases held: channels open, busy or idle */
    int idle_leases;       /* of those, held by a kept-alive channel serving no request */
    int waiters;           /* acquires waiting */
    bool draining;
    int handshakes;        /* new connections opening now (holding a handshake slot) */
    int handshakes_queued; /* new connections waiting for a slot */
    int handshakes_peak;   /* the most that were opening at once since the pool was made */
    uint64_t handshakes_refused; /* new connections refused for a full handshake queue */
    int max_handshakes;    /* the bounds (0: none) */
    int max_handshakes_per_server;
} mg_pool_stats_t;

typedef struct mg_pool_user_stats {
    int connections;       /* open or opening */
    int opening;
    int leases;            /* as in mg_pool_stats_t */
    int idle_leases;
    int waiters;
    mg_pool_limits_t limits;
} mg_pool_user_stats_t;

/*
 * Creates a pool on loop. The default limits come from settings (max_connections_per_user,
 * max_channels, max_idle_ms, queue_max, queue_timeout_ms), the gate's from max_handshakes,
 * max_handshakes_per_server and handshake_queue_max. Returns 0, MG_EINVAL or MG_ENOMEM.
 */
int mg_pool_new(uv_loop_t *loop, const mg_settings_t *settings, const mg_pool_backend_t *backend,
                void *backend_ctx, mg_pool_t **out);

/*
 * The pool's clock, in ms: deadlines, backoff and idle times are read from it. By default the
 * loop's (uv_now); a test sets its own, moves it, and calls mg_pool_clock_moved() so that the
 * deadlines passed meanwhile fire on the loop's next turn, without waiting for real time.
 */
typedef uint64_t (*mg_pool_clock_fn)(void *ctx);
void mg_pool_set_clock(mg_pool_t *pool, mg_pool_clock_fn fn, void *ctx);
void mg_pool_clock_moved(mg_pool_t *pool);

/*
 * Frees the pool. It must hold no connections and no waiters (close them first and let the
 * backend report them closed). Handles close asynchronously: run the loop afterwards.
 */
void mg_pool_free(mg_pool_t *pool);

void mg_pool_set_limits_fn(mg_pool_t *pool, mg_pool_limits_fn fn, void *ctx);

/* Asks the limits function again for every known user (after a policy reload). */
void mg_pool_refresh_limits(mg_pool_t *pool);

/* True if id is 1..MG_USER_ID_MAX bytes of letters, digits and . _ - @ + : */
bool mg_pool_user_id_valid(const char *id);

/*
 * Acquires a lease for user. Returns:
 *   0              req->conn holds the lease now; cb will not be called;
 *   MG_EAGAIN      the request waits; cb is called later;
 *   MG_EINVAL      user id invalid;
 *   MG_ESHUTDOWN   the pool is draining;
 *   MG_EQUEUEFULL  the user is at the limit and the queue is full (req->error carries
 *                  "Connection limit exceeded. Maximum N concurrent connections allowed.");
 *   MG_EBACKOFF    the user's last connect failed recently; req->error has that failure;
 *   MG_EBUSY       the user needs a new connection and the handshake queue is full;
 *   another code   the backend failed to start an open; req->error says why.
 * A waiting request completes with 0, MG_ETIMEDOUT (deadline passed; the same limit message when
 * the user was at the limit; a message naming the handshake queue when its connection was still
 * waiting there), MG_EBUSY, the failure of the connect it waited for (MG_ECONNECT, MG_EHOSTKEY,
 * MG_EAUTH, ...), or MG_ESHUTDOWN.
 */
int mg_pool_acquire(mg_pool_t *pool, mg_pool_acquire_t *req, const char *user, void *open_arg,
                    mg_pool_acquire_cb cb);

/* Withdraws a waiting request; its callback is not called. A no-op for one that completed. */
void mg_pool_acquire_cancel(mg_pool_acquire_t *req);

/* Returns a busy lease taken by acquire (mark an idle one busy first). */
void mg_pool_release(mg_pool_t *pool, mg_pool_conn_t *pc);

/*
 * Marks one of pc's leases idle (held by a kept-alive channel that serves no request) or busy
 * again. A lease starts busy. Only the counts change: an idle lease still takes a channel slot.
 * The pool keeps them apart so that "requests in flight" means requests.
 */
void mg_pool_lease_set_idle(mg_pool_t *pool, mg_pool_conn_t *pc, bool idle);

/* Closes every connection of user (waiting for their channels unless force). Returns how many. */
int mg_pool_close_user(mg_pool_t *pool, const char *user, bool force, const char *reason);
int mg_pool_close_all(mg_pool_t *pool, bool force, const char *reason);

/*
 * Closes connections that hold no lease and have been idle longer than
 * min(max_idle_ms, the user's idle_timeout_ms), and unhealthy ones whatever their leases;
 * asks the backend to trim the others that serve no request now. Returns how many it closed.
 */
int mg_pool_cleanup_stale(mg_pool_t *pool, uint64_t max_idle_ms);

/*
 * Starts draining: new acquires fail with MG_ESHUTDOWN, waiting ones complete with it.
 * on_idle (if given) is called each time the last lease is released while draining, and once
 * at once if none is held. Calling it again replaces on_idle and arg (NULL detaches them).
 */
void mg_pool_drain(mg_pool_t *pool, void (*on_idle)(mg_pool_t *pool, void *arg), void *arg);

/*
 * Sets fn to be called each time a connection leaves the pool's count (the backend reported it
 * closed, or its open failed), after the counts in mg_pool_stats() reflect it. NULL removes it;
 * there is one observer (the shutdown module). fn may run inside a backend call: it must not
 * call into the pool other than mg_pool_stats(); defer anything else.
 */
void mg_pool_set_closed_cb(mg_pool_t *pool, void (*fn)(mg_pool_t *pool, void *arg), void *arg);

/*
 * Sets fn to be called each time a new connection is handed to the backend, with how long it
 * waited for a handshake slot (0 when one was free). One observer (the gateway's metrics); NULL
 * removes it. fn must not call into the pool.
 */
void mg_pool_set_start_cb(mg_pool_t *pool, void (*fn)(void *arg, uint64_t waited_ms), void *arg);

void mg_pool_stats(const mg_pool_t *pool, mg_pool_stats_t *out);

/* Returns 0 and fills *out, or MG_EINVAL for an unknown or invalid user (then *out is zeroed). */
int mg_pool_user_stats(const mg_pool_t *pool, const char *user, mg_pool_user_stats_t *out);

/* Calls fn for every connection (user, connection). fn must not close connections. */
void mg_pool_foreach_conn(const mg_pool_t *pool,
                          void (*fn)(const char *user, mg_pool_conn_t *pc, void *arg), void *arg);

/* For the backend: report progress of a connection the pool asked it to open. */
void mg_pool_conn_ready(mg_pool_conn_t *pc);
void mg_pool_conn_failed(mg_pool_conn_t *pc, int err, const char *message);
void mg_pool_conn_set_healthy(mg_pool_conn_t *pc, bool healthy);
/* The connection is gone. Leases still held stay valid until released. */
void mg_pool_conn_closed(mg_pool_conn_t *pc, int err, const char *message);

void mg_pool_conn_set_backend_data(mg_pool_conn_t *pc, void *data);
void *mg_pool_conn_backend_data(const mg_pool_conn_t *pc);
/* The backend_ctx given to mg_pool_new(). */
void *mg_pool_conn_backend_ctx(const mg_pool_conn_t *pc);
uint64_t mg_pool_conn_id(const mg_pool_conn_t *pc);
const char *mg_pool_conn_user(const mg_pool_conn_t *pc);
int mg_pool_conn_leases(const mg_pool_conn_t *pc);
int mg_pool_conn_idle_leases(const mg_pool_conn_t *pc);
bool mg_pool_conn_healthy(const mg_pool_conn_t *pc);
/* Loop time (ms) when the connection last lost its last lease, or became ready. */
uint64_t mg_pool_conn_last_used(const mg_pool_conn_t *pc);

#endif
