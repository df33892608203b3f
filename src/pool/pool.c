/*
 * pool: see include/moongate/pool.h.
 *
 * A hash table maps a user id to its entry (struct mg_pool_user): the user's limits, its
 * connection records, its wait queue, its backoff state and one uv timer. Every event (a lease
 * released, a connection ready, failed or closed, a request queued or cancelled) only updates
 * counts and, when the queue has something to do, arms that timer. The timer callback is the one
 * place that completes waiting requests, so a caller's callback never runs inside another pool
 * call or inside a backend call, and a callback that calls back into the pool finds it
 * consistent. The one exception is on_idle (mg_pool_drain), called last in a release.
 *
 * The queue is kept in deadline order, which is arrival order while the user's queue_timeout_ms
 * stays the same; the timer is armed for the head's deadline, or sooner when there is work.
 *
 * New connections pass through one gate for the whole pool (gate.h): at most max_handshakes
 * of them are between the backend's open and ready at once (max_handshakes_per_server with one
 * server, as the backend names it), and the rest wait in arrival order as records in state
 * QUEUED, which the backend has not heard of. They count as opening for their user (so a burst
 * opens no more of them than it needs), and a record no waiter needs any more (its requests
 * timed out, were cancelled or were served) leaves the gate at once, so its place goes to the
 * next user. A granted record starts on its user's timer, like every other completion.
 *
 * Lifetimes. A connection record lives until the backend reports it gone and its last lease is
 * released; until then it stays on its user's list (state CLOSED once gone) and keeps the entry
 * alive. An entry lives while it has records, waiters, or a recent connect failure to remember
 * (so that backoff survives the moment it has nothing else); then its timer is closed and the
 * entry freed in the close callback. Functions that walk entries "hold" them, which defers that
 * freeing until the walk is done.
 */
#include "moongate/pool.h"

#include "gate.h"

#include "moongate/error.h"
#include "moongate/log.h"

#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define BACKOFF_FIRST_MS 500
#define BACKOFF_MAX_MS 30000
/* How long after its backoff an entry with nothing else remembers a failure (and its step). */
#define BACKOFF_FORGET_MS 30000
#define BUCKETS_MIN 64

#define LIMIT_MESSAGE "Connection limit exceeded. Maximum %d concurrent connections allowed."
#define SHUTDOWN_MESSAGE "gateway is shutting down"

typedef struct mg_pool_user mg_pool_user_t;

enum conn_state {
    CONN_QUEUED,  /* waiting at the gate for a handshake slot; not yet given to the backend */
    CONN_OPENING, /* the backend is connecting */
    CONN_READY,   /* may carry leases (if healthy) */
    CONN_CLOSING, /* the pool asked the backend to close it */
    CONN_CLOSED,  /* gone; the record waits for its last lease to be released */
};

struct mg_pool_conn {
    mg_pool_user_t *user;
    mg_list_t node;              /* on user->conns */
    uint64_t id;
    enum conn_state state;
    bool healthy;
    int leases;
    int idle_leases; /* of leases, those held by a channel serving no request */
    uint64_t last_used;
    void *backend_data;
    mg__gate_ticket_t ticket; /* in the pool's gate from the open until ready or gone */
};

struct mg_pool_user {
    mg_pool_t *pool;
    mg_pool_user_t *hnext;       /* hash chain */
    mg_list_t node;              /* on pool->users */
    uint32_t hash;
    mg_pool_limits_t limits;
    mg_list_t conns;       /* every record, CLOSED ones included */
    int nrecords;          /* length of conns */
    int nconns;            /* records not CLOSED: what counts against max_connections */
    int nopening;          /* QUEUED and OPENING records */
    int nqueued;           /* of those, QUEUED */
    int nadmitted;         /* of those, QUEUED ones whose slot came: to start on the timer */
    int leases, idle_leases;
    mg_list_t waiters;     /* mg_pool_acquire_t, by deadline, the earliest first */
    int nwaiters;
    int holds; /* walks in progress; the entry is not freed while > 0 */
    uint64_t backoff_ms; /* the current backoff step; 0 when the last connect did not fail */
    uint64_t backoff_until;
    int last_err;
    char last_error[256];
    uv_timer_t timer;
    uint64_t timer_due;
    char id[MG_USER_ID_MAX + 1];
};

struct mg_pool {
    uv_loop_t *loop;
    mg_pool_backend_t backend;
    void *backend_ctx;
    mg_pool_limits_t defaults;
    mg_pool_limits_fn limits_fn;
    void *limits_ctx;
    mg_pool_user_t **buckets;
    size_t nbuckets; /* a power of two */
    size_t nusers;
    mg_list_t users;
    uint64_t next_id;
    mg_pool_clock_fn clock; /* NULL: the loop's */
    void *clock_ctx;
    int nconns, nready, leases, idle_leases, waiters;
    bool draining;
    void (*on_idle)(mg_pool_t *pool, void *arg);
    void *on_idle_arg;
    void (*closed_cb)(mg_pool_t *pool, void *arg);
    void *closed_arg;
    mg__gate_t gate;        /* new connections' handshakes */
    bool gate_full;         /* refusing for a full gate queue (logged once until it has room) */
    uint64_t gate_refused_logged; /* gate.refused when that was logged */
    void (*start_cb)(void *arg, uint64_t waited_ms);
    void *start_arg;
};

#define USER_OF(n) mg_list_entry(n, mg_pool_user_t, node)
#define CONN_OF(n) mg_list_entry(n, mg_pool_conn_t, node)
#define WAITER_OF(n) mg_list_entry(n, mg_pool_acquire_t, node)

/* The waiter due first, or NULL. */
static mg_pool_acquire_t *first_waiter(const mg_pool_user_t *u)
{
    mg_list_t *n = mg_list_first(&u->waiters);
    return n != NULL ? WAITER_OF(n) : NULL;
}

static void user_update(mg_pool_user_t *u);

/* ---- small helpers ---- */

static uint64_t pool_now(const mg_pool_t *pool)
{
    return pool->clock != NULL ? pool->clock(pool->clock_ctx) : uv_now(pool->loop);
}

static int req_fail(mg_pool_acquire_t *req, int status, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static int req_fail(mg_pool_acquire_t *req, int status, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(req->error, sizeof(req->error), fmt, ap);
    va_end(ap);
    req->conn = NULL;
    req->status = status;
    return status;
}

static uint32_t hash_id(const char *id)
{
    uint32_t h = 2166136261u; /* FNV-1a */
    for (; *id; id++)
        h = (h ^ (uint8_t)*id) * 16777619u;
    return h;
}

bool mg_pool_user_id_valid(const char *id)
{
    if (id == NULL)
        return false;
    size_t n;
    for (n = 0; id[n] != '\0'; n++) {
        char c = id[n];
        if (n >= MG_USER_ID_MAX)
            return false;
        if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
              c == '.' || c == '_' || c == '-' || c == '@' || c == '+' || c == ':'))
            return false;
    }
    return n > 0;
}

static bool limits_valid(const mg_pool_limits_t *l)
{
    return l->max_connections >= 1 && l->max_channels >= 1 && l->idle_timeout_ms >= 1 &&
           l->queue_max >= 0 && l->queue_timeout_ms >= 1;
}

/* ---- user entries ---- */

static mg_pool_user_t *user_find(const mg_pool_t *pool, const char *id)
{
    uint32_t h = hash_id(id);
    for (mg_pool_user_t *u = pool->buckets[h & (pool->nbuckets - 1)]; u != NULL; u = u->hnext) {
        if (u->hash == h && strcmp(u->id, id) == 0)
            return u;
    }
    return NULL;
}

/* Doubles the table. On allocation failure the chains just get longer. */
static void pool_grow(mg_pool_t *pool)
{
    size_t n = pool->nbuckets * 2;
    mg_pool_user_t **b = calloc(n, sizeof(*b));
    if (b == NULL)
        return;
    mg_list_t *node;
    mg_list_foreach(node, &pool->users) {
        mg_pool_user_t *u = USER_OF(node);
        u->hnext = b[u->hash & (n - 1)];
        b[u->hash & (n - 1)] = u;
    }
    free(pool->buckets);
    pool->buckets = b;
    pool->nbuckets = n;
}

static void user_load_limits(mg_pool_user_t *u)
{
    mg_pool_t *pool = u->pool;
    mg_pool_limits_t l = pool->defaults;

    if (pool->limits_fn != NULL) {
        /* Start from the defaults, so a function that sets only some fields still works. */
        mg_pool_limits_t got = pool->defaults;
        int rc = pool->limits_fn(pool->limits_ctx, u->id, &got);
        if (rc < 0)
            mg_log_warn("pool", "user=%s limits function failed (%s); using the defaults", u->id,
                        mg_strerror(rc));
        else if (!limits_valid(&got))
            mg_log_warn("pool", "user=%s limits function returned invalid limits; "
                        "using the defaults", u->id);
        else
            l = got;
    }
    u->limits = l;
}

static int user_create(mg_pool_t *pool, const char *id, mg_pool_user_t **out)
{
    mg_pool_user_t *u = calloc(1, sizeof(*u));
    if (u == NULL)
        return MG_ENOMEM;
    if (pool->nusers >= pool->nbuckets)
        pool_grow(pool);

    u->pool = pool;
    mg_list_init(&u->conns);
    mg_list_init(&u->waiters);
    snprintf(u->id, sizeof(u->id), "%s", id);
    u->hash = hash_id(id);
    uv_timer_init(pool->loop, &u->timer);
    u->timer.data = u;
    user_load_limits(u);

    size_t b = u->hash & (pool->nbuckets - 1);
    u->hnext = pool->buckets[b];
    pool->buckets[b] = u;
    mg_list_insert_head(&pool->users, &u->node);
    pool->nusers++;
    *out = u;
    return 0;
}

static void user_close_cb(uv_handle_t *h)
{
    free(h->data);
}

/* Unlinks the entry now (a new acquire for the same id makes a new one); frees it later. */
static void user_free(mg_pool_user_t *u)
{
    mg_pool_t *pool = u->pool;
    mg_pool_user_t **pp = &pool->buckets[u->hash & (pool->nbuckets - 1)];
    while (*pp != u)
        pp = &(*pp)->hnext;
    *pp = u->hnext;
    mg_list_remove(&u->node);
    pool->nusers--;
    u->pool = NULL;
    uv_close((uv_handle_t *)&u->timer, user_close_cb);
}

static bool backoff_active(const mg_pool_user_t *u, uint64_t now)
{
    return u->backoff_until > now;
}

/* The least loaded ready, healthy connection with a free slot, or NULL. */
static mg_pool_conn_t *conn_pick(const mg_pool_user_t *u)
{
    mg_pool_conn_t *best = NULL;
    mg_list_t *n;
    mg_list_foreach(n, &u->conns) {
        mg_pool_conn_t *pc = CONN_OF(n);
        if (pc->state == CONN_READY && pc->healthy && pc->leases < u->limits.max_channels &&
            (best == NULL || pc->leases < best->leases))
            best = pc;
    }
    return best;
}

static int free_slots(const mg_pool_user_t *u)
{
    int slots = 0;
    mg_list_t *n;
    mg_list_foreach(n, &u->conns) {
        const mg_pool_conn_t *pc = CONN_OF(n);
        if (pc->state == CONN_READY && pc->healthy && pc->leases < u->limits.max_channels)
            slots += u->limits.max_channels - pc->leases;
    }
    return slots;
}

/* Whether something the user has (a ready connection, or one opening) will serve its waiters. */
static bool can_serve_later(const mg_pool_user_t *u)
{
    if (u->nopening > 0)
        return true;
    mg_list_t *n;
    mg_list_foreach(n, &u->conns) {
        if (CONN_OF(n)->state == CONN_READY && CONN_OF(n)->healthy)
            return true;
    }
    return false;
}

/*
 * How many connections to open for `waiters` requests: enough to carry those that free slots
 * will not, less those already opening, within max_connections.
 */
static int opens_wanted(const mg_pool_user_t *u, int waiters)
{
    int c = u->limits.max_channels;
    int uncovered = waiters - free_slots(u);
    if (uncovered <= 0)
        return 0;
    int want = (uncovered + c - 1) / c - u->nopening;
    int room = u->limits.max_connections - u->nconns;
    if (want > room)
        want = room;
    return want > 0 ? want : 0;
}

/* How many requests may wait: what free slots and opening connections will take, plus queue_max. */
static int queue_room(const mg_pool_user_t *u)
{
    return free_slots(u) + u->nopening * u->limits.max_channels + u->limits.queue_max;
}

/* ---- the wait queue ---- */

static void queue_insert(mg_pool_user_t *u, mg_pool_acquire_t *req)
{
    /* After the last waiter due no later than req (the list head when there is none). */
    mg_list_t *after = u->waiters.prev;
    while (after != &u->waiters && WAITER_OF(after)->deadline > req->deadline)
        after = after->prev;
    mg_list_insert_head(after, &req->node);
    req->user_entry = u;
    u->nwaiters++;
    u->pool->waiters++;
}

static void queue_remove(mg_pool_user_t *u, mg_pool_acquire_t *req)
{
    mg_list_remove(&req->node);
    req->user_entry = NULL;
    u->nwaiters--;
    u->pool->waiters--;
}

static void lease_take(mg_pool_conn_t *pc)
{
    pc->leases++;
    pc->user->leases++;
    pc->user->pool->leases++;
}

/* The request is detached before its callback runs, so the callback may reuse or cancel it. */
static void waiter_grant(mg_pool_user_t *u, mg_pool_acquire_t *req, mg_pool_conn_t *pc)
{
    queue_remove(u, req);
    lease_take(pc);
    req->conn = pc;
    req->status = 0;
    req->error[0] = '\0';
    req->cb(req, 0);
}

static void waiter_fail(mg_pool_user_t *u, mg_pool_acquire_t *req, int status, const char *fmt,
                        ...) __attribute__((format(printf, 4, 5)));

static void waiter_fail(mg_pool_user_t *u, mg_pool_acquire_t *req, int status, const char *fmt,
                        ...)
{
    queue_remove(u, req);
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(req->error, sizeof(req->error), fmt, ap);
    va_end(ap);
    req->conn = NULL;
    req->status = status;
    req->cb(req, status);
}

static void waiter_timeout(mg_pool_user_t *u, mg_pool_acquire_t *req)
{
    const mg__gate_t *g = &u->pool->gate;
    if (u->nconns >= u->limits.max_connections && u->nqueued == 0)
        waiter_fail(u, req, MG_ETIMEDOUT, LIMIT_MESSAGE, u->limits.max_connections);
    else if (u->nqueued > 0)
        waiter_fail(u, req, MG_ETIMEDOUT,
                    "Timed out after %" PRIu64 " ms waiting for a connection: its SSH "
                    "handshake was still queued for a handshake slot (%d at once, %d per "
                    "server; %d queued)",
                    u->limits.queue_timeout_ms, g->max_running, g->group_max, g->queued);
    else if (u->last_err != 0)
        waiter_fail(u, req, MG_ETIMEDOUT,
                    "Timed out after %" PRIu64 " ms waiting for a connection "
                    "(last connect failed: %s)",
                    u->limits.queue_timeout_ms, u->last_error);
    else
        waiter_fail(u, req, MG_ETIMEDOUT,
                    "Timed out after %" PRIu64 " ms waiting for a connection",
                    u->limits.queue_timeout_ms);
}

/* ---- connection records ---- */

static void notify_closed(mg_pool_t *pool)
{
    if (pool->closed_cb != NULL)
        pool->closed_cb(pool, pool->closed_arg);
}

/*
 * Takes the record out of the counts of live connections (it stays on the list), and out of
 * the gate: a slot it held goes to the next record waiting (whose user's timer is armed).
 */
static void conn_uncount(mg_pool_conn_t *pc)
{
    mg_pool_user_t *u = pc->user;
    if (pc->state == CONN_QUEUED) {
        u->nqueued--;
        if (pc->ticket.state == MG__GATE_RUNNING)
            u->nadmitted--;
    }
    if (pc->state == CONN_QUEUED || pc->state == CONN_OPENING)
        u->nopening--;
    else if (pc->state == CONN_READY)
        u->pool->nready--;
    u->nconns--;
    u->pool->nconns--;
    pc->state = CONN_CLOSED;
    mg__gate_leave(&u->pool->gate, &pc->ticket);
}

/* Frees a CLOSED record that holds no lease. */
static void conn_free(mg_pool_conn_t *pc)
{
    mg_pool_user_t *u = pc->user;
    mg_list_remove(&pc->node);
    u->nrecords--;
    free(pc);
}

/* An open failed: forget the record, remember the failure, back off. */
static void conn_fail(mg_pool_conn_t *pc, int err, const char *msg)
{
    mg_pool_user_t *u = pc->user;
    mg_pool_t *pool = u->pool;

    mg_log_warn("pool", "user=%s conn=%" PRIu64 " failed: %s", u->id, pc->id, msg);
    conn_uncount(pc);
    conn_free(pc);

    u->backoff_ms = u->backoff_ms == 0 ? BACKOFF_FIRST_MS : u->backoff_ms * 2;
    if (u->backoff_ms > BACKOFF_MAX_MS)
        u->backoff_ms = BACKOFF_MAX_MS;
    u->backoff_until = pool_now(pool) + u->backoff_ms;
    u->last_err = err;
    snprintf(u->last_error, sizeof(u->last_error), "%s", msg);

    user_update(u);
    notify_closed(pool);
}

/* A record that never reached the backend goes away without a trace of failure (no backoff). */
static void conn_drop_queued(mg_pool_conn_t *pc, const char *why)
{
    mg_pool_user_t *u = pc->user;
    mg_log_debug("pool", "user=%s conn=%" PRIu64 " leaves the handshake queue: %s", u->id,
                 pc->id, why);
    conn_uncount(pc);
    conn_free(pc);
    notify_closed(u->pool);
}

/*
 * Hands a record whose turn came to the backend. Returns 0, or the backend's code with its
 * message in err (the failure is then already recorded as if reported through
 * mg_pool_conn_failed()). The caller holds pc's user.
 */
static int conn_start(mg_pool_conn_t *pc, void *open_arg, char *err, size_t errlen)
{
    mg_pool_user_t *u = pc->user;
    mg_pool_t *pool = u->pool;
    pc->state = CONN_OPENING;
    if (pool->start_cb != NULL)
        pool->start_cb(pool->start_arg, pool_now(pool) - pc->ticket.entered_at);
    mg_log_info("pool", "user=%s conn=%" PRIu64 " opening", u->id, pc->id);

    char msg[256] = "";
    int rc = pool->backend.open(pool->backend_ctx, pc, u->id, open_arg, msg, sizeof(msg));
    if (rc >= 0)
        return 0;
    if (msg[0] == '\0')
        snprintf(msg, sizeof(msg), "%s", mg_strerror(rc));
    snprintf(err, errlen, "%s", msg);
    conn_fail(pc, rc, msg);
    return rc;
}

/* One log line when the gate starts refusing, one when it takes again (not one per request). */
static void gate_note_refusal(mg_pool_t *pool, bool refused)
{
    const mg__gate_t *g = &pool->gate;
    if (refused && !pool->gate_full) {
        pool->gate_full = true;
        pool->gate_refused_logged = g->refused - 1;
        mg_log_warn("pool", "handshake queue full (%d handshakes running, %d waiting, "
                    "MOONGATE_HANDSHAKE_QUEUE_MAX=%d): new connections are refused with 503",
                    g->running, g->queued, g->max_queued);
    } else if (!refused && pool->gate_full) {
        pool->gate_full = false;
        mg_log_info("pool", "handshake queue has room again; %" PRIu64 " connections were "
                    "refused meanwhile", g->refused - pool->gate_refused_logged);
    }
}

/*
 * Starts opening a connection for u: at once when a handshake slot is free, else as a record
 * waiting at the gate (QUEUED). Returns 0; MG_EBUSY when the gate's queue is full (nothing was
 * recorded: it is no failure of the user's, so no backoff); or conn_start()'s failure. The
 * caller holds u.
 */
static int conn_open(mg_pool_user_t *u, void *open_arg, char *err, size_t errlen)
{
    mg_pool_t *pool = u->pool;
    mg_pool_conn_t *pc = calloc(1, sizeof(*pc));
    if (pc == NULL) {
        snprintf(err, errlen, "%s", mg_strerror(MG_ENOMEM));
        return MG_ENOMEM;
    }
    mg__gate_ticket_init(&pc->ticket);
    char server[MG__GATE_GROUP_NAME_MAX + 1] = "";
    if (pool->backend.server != NULL &&
        !pool->backend.server(pool->backend_ctx, open_arg, server, sizeof(server)))
        server[0] = '\0';
    int rc = mg__gate_enter(&pool->gate, &pc->ticket, server, pool_now(pool));
    gate_note_refusal(pool, rc == MG_EQUEUEFULL);
    if (rc == MG_EQUEUEFULL) {
        snprintf(err, errlen, "Too many SSH connections being opened at once (%d handshakes "
                 "running, %d waiting); try again shortly", pool->gate.running,
                 pool->gate.queued);
        free(pc);
        return MG_EBUSY;
    }
    pc->user = u;
    pc->id = ++pool->next_id;
    pc->state = CONN_QUEUED;
    pc->healthy = true;
    mg_list_insert_head(&u->conns, &pc->node);
    u->nrecords++;
    u->nconns++;
    u->nopening++;
    pool->nconns++;
    if (rc == 0)
        return conn_start(pc, open_arg, err, errlen);
    u->nqueued++;
    mg_log_debug("pool", "user=%s conn=%" PRIu64 " waits for a handshake slot (%d running, "
                 "%d waiting)", u->id, pc->id, pool->gate.running, pool->gate.queued);
    return 0;
}

/* Asks the backend to close pc. pc may be freed before this returns. */
static void conn_close(mg_pool_conn_t *pc, bool force, const char *reason)
{
    mg_pool_user_t *u = pc->user;
    if (pc->state == CONN_QUEUED) {
        conn_drop_queued(pc, reason != NULL ? reason : "closed");
        return;
    }
    if (pc->state == CONN_OPENING)
        u->nopening--;
    else if (pc->state == CONN_READY)
        u->pool->nready--;
    pc->state = CONN_CLOSING;
    /* A handshake given up on frees its slot now; its teardown is no handshake. */
    mg__gate_leave(&u->pool->gate, &pc->ticket);
    mg_log_info("pool", "user=%s conn=%" PRIu64 " closing (%s%s)", u->id, pc->id,
                reason != NULL ? reason : "closed", force ? ", forced" : "");
    u->pool->backend.close(u->pool->backend_ctx, pc, force, reason);
}

/* ---- the handshake gate ---- */

static void user_arm(mg_pool_user_t *u, uint64_t due, uint64_t now);

/* A record of u's got its slot: u's timer starts it (or drops it, when nobody needs it now). */
static void on_gate_grant(mg__gate_t *g, mg__gate_ticket_t *t, void *arg)
{
    mg_pool_conn_t *pc = mg_list_entry(t, mg_pool_conn_t, ticket);
    mg_pool_user_t *u = pc->user;
    uint64_t now = pool_now(u->pool);
    u->nadmitted++;
    user_arm(u, now, now);
}

/*
 * How many of u's QUEUED records its waiters still need: those that free slots and the
 * connections already handshaking will not carry, one record per max_channels of them.
 */
static int queued_needed(const mg_pool_user_t *u)
{
    int c = u->limits.max_channels;
    int handshaking = u->nopening - u->nqueued;
    int uncovered = u->nwaiters - free_slots(u) - handshaking * c;
    return uncovered > 0 ? (uncovered + c - 1) / c : 0;
}

/* QUEUED records beyond what u's waiters need leave the gate, the newest first. */
static void user_trim_queued(mg_pool_user_t *u)
{
    if (u->nqueued == 0)
        return;
    int need = queued_needed(u);
    mg_list_t *n, *next;
    mg_list_foreach_safe(n, next, &u->conns) {
        if (u->nqueued <= need)
            break;
        if (CONN_OF(n)->state == CONN_QUEUED)
            conn_drop_queued(CONN_OF(n), "no request waits for it any more");
    }
}

/* Hands u's records whose slot came to the backend, for the request due first. */
static void user_start_admitted(mg_pool_user_t *u)
{
    mg_list_t *n, *next;
    mg_list_foreach_safe(n, next, &u->conns) {
        if (u->nadmitted == 0)
            break;
        mg_pool_conn_t *pc = CONN_OF(n);
        if (pc->state != CONN_QUEUED || pc->ticket.state != MG__GATE_RUNNING)
            continue;
        mg_pool_acquire_t *req = first_waiter(u);
        if (req == NULL || u->pool->draining) {
            conn_drop_queued(pc, "no request waits for it any more");
            continue;
        }
        u->nqueued--;
        u->nadmitted--;
        char err[256];
        conn_start(pc, req->open_arg, err, sizeof(err));
    }
}

/* ---- the per-user timer: the one place waiting requests complete ---- */

/*
 * Completes what can be completed for u's queue now: hands free slots out, fails everything
 * when draining, times out expired requests, opens connections, fails requests nothing can
 * serve during a backoff. At most the requests queued on entry complete, so a callback that
 * keeps acquiring cannot keep this loop going; the rest wait for the timer's next run. The
 * caller holds u.
 */
static void user_service(mg_pool_user_t *u)
{
    mg_pool_t *pool = u->pool;
    int budget = u->nwaiters;
    mg_pool_acquire_t *req;
    mg_pool_conn_t *pc;

    user_start_admitted(u);
    while (budget > 0 && (req = first_waiter(u)) != NULL) {
        uint64_t now = pool_now(pool);
        if (pool->draining) {
            waiter_fail(u, req, MG_ESHUTDOWN, SHUTDOWN_MESSAGE);
        } else if ((pc = conn_pick(u)) != NULL) {
            waiter_grant(u, req, pc);
        } else if (req->deadline <= now) {
            waiter_timeout(u, req);
        } else if (!backoff_active(u, now)) {
            int want = opens_wanted(u, u->nwaiters);
            if (want == 0)
                break;
            char err[256];
            int rc = 0;
            for (int i = 0; i < want && rc == 0; i++)
                rc = conn_open(u, req->open_arg, err, sizeof(err));
            if (rc == MG_EBUSY) {
                /* The gate is full: wait for what u has, or fail at once with nothing. */
                if (can_serve_later(u))
                    break;
                waiter_fail(u, req, MG_EBUSY, "%s", err);
                budget--;
            }
            continue; /* a failed open may leave requests to fail */
        } else if (!can_serve_later(u)) {
            waiter_fail(u, req, u->last_err, "%s", u->last_error);
        } else {
            break;
        }
        budget--;
    }
}

/*
 * Whether the gate is sure to take one more record, running or waiting. With its queue full it
 * may still run one at once (for a server with room), but a user that has a connection waits
 * for that one rather than have its timer try the gate again and again.
 */
static bool gate_takes(const mg__gate_t *g)
{
    return (g->max_running == 0 && g->group_max == 0) || g->queued < g->max_queued;
}

static bool user_has_work(const mg_pool_user_t *u, uint64_t now)
{
    if (u->pool->draining || conn_pick(u) != NULL || u->nadmitted > 0)
        return true;
    if (!backoff_active(u, now))
        return opens_wanted(u, u->nwaiters) > 0 && (gate_takes(&u->pool->gate) ||
                                                    !can_serve_later(u));
    return !can_serve_later(u);
}

static void user_timer_cb(uv_timer_t *t);

static void user_arm(mg_pool_user_t *u, uint64_t due, uint64_t now)
{
    if (uv_is_active((uv_handle_t *)&u->timer) && u->timer_due == due)
        return;
    u->timer_due = due;
    uv_timer_start(&u->timer, user_timer_cb, due > now ? due - now : 0, 0);
}

/*
 * Brings u's timer in line with its state after any change, or frees u when it holds nothing.
 * Does nothing while u is held: whoever holds it calls this when letting go.
 */
static void user_update(mg_pool_user_t *u)
{
    if (u->holds > 0)
        return;
    uint64_t now = pool_now(u->pool);

    user_trim_queued(u);
    if (u->nwaiters > 0) {
        uint64_t due = first_waiter(u)->deadline;
        if (user_has_work(u, now))
            due = now;
        else if (backoff_active(u, now) && u->backoff_until < due)
            due = u->backoff_until; /* then open again for the requests still waiting */
        user_arm(u, due, now);
        return;
    }
    if (u->nrecords > 0) {
        uv_timer_stop(&u->timer);
        return;
    }
    if (u->backoff_ms > 0 && now < u->backoff_until + BACKOFF_FORGET_MS) {
        user_arm(u, u->backoff_until + BACKOFF_FORGET_MS, now);
        return;
    }
    user_free(u);
}

static void user_hold(mg_pool_user_t *u)
{
    u->holds++;
}

static void user_unhold(mg_pool_user_t *u)
{
    u->holds--;
    user_update(u);
}

static void user_timer_cb(uv_timer_t *t)
{
    mg_pool_user_t *u = t->data;
    user_hold(u);
    user_service(u);
    user_unhold(u);
}

/* ---- the API ---- */

int mg_pool_new(uv_loop_t *loop, const mg_settings_t *settings, const mg_pool_backend_t *backend,
                void *backend_ctx, mg_pool_t **out)
{
    if (loop == NULL || settings == NULL || backend == NULL || backend->open == NULL ||
        backend->close == NULL || out == NULL)
        return MG_EINVAL;

    mg_pool_t *pool = calloc(1, sizeof(*pool));
    if (pool == NULL)
        return MG_ENOMEM;
    mg_list_init(&pool->users);
    pool->buckets = calloc(BUCKETS_MIN, sizeof(*pool->buckets));
    if (pool->buckets == NULL) {
        free(pool);
        return MG_ENOMEM;
    }
    pool->nbuckets = BUCKETS_MIN;
    pool->loop = loop;
    pool->backend = *backend;
    pool->backend_ctx = backend_ctx;
    pool->defaults = (mg_pool_limits_t){
        .max_connections = settings->max_connections_per_user,
        .max_channels = settings->max_channels,
        .idle_timeout_ms = settings->max_idle_ms,
        .queue_max = settings->queue_max,
        .queue_timeout_ms = settings->queue_timeout_ms,
    };
    if (!limits_valid(&pool->defaults) || settings->max_handshakes < 0 ||
        settings->max_handshakes_per_server < 0 || settings->handshake_queue_max < 0) {
        free(pool->buckets);
        free(pool);
        return MG_EINVAL;
    }
    mg__gate_init(&pool->gate, settings->max_handshakes, settings->handshake_queue_max,
                  settings->max_handshakes_per_server, on_gate_grant, pool);
    *out = pool;
    return 0;
}

void mg_pool_free(mg_pool_t *pool)
{
    if (pool == NULL)
        return;
    if (pool->nconns > 0 || pool->waiters > 0 || pool->leases > 0)
        mg_log_error("pool", "freed while holding %d connections, %d leases and %d waiters",
                     pool->nconns, pool->leases, pool->waiters);

    while (!mg_list_empty(&pool->users)) {
        mg_pool_user_t *u = USER_OF(mg_list_first(&pool->users));
        while (!mg_list_empty(&u->waiters))
            queue_remove(u, first_waiter(u));
        while (!mg_list_empty(&u->conns)) {
            mg_pool_conn_t *pc = CONN_OF(mg_list_first(&u->conns));
            mg_list_remove(&pc->node);
            free(pc);
        }
        u->nrecords = 0;
        user_free(u);
    }
    mg__gate_destroy(&pool->gate);
    free(pool->buckets);
    free(pool);
}

void mg_pool_set_clock(mg_pool_t *pool, mg_pool_clock_fn fn, void *ctx)
{
    pool->clock = fn;
    pool->clock_ctx = ctx;
}

void mg_pool_clock_moved(mg_pool_t *pool)
{
    /* Each deadline is armed again from the new time (at once when it has passed). */
    mg_list_t *n, *next;
    for (n = pool->users.next; n != &pool->users; n = next) {
        mg_pool_user_t *u = USER_OF(n);
        user_hold(u);
        next = n->next;
        uv_timer_stop(&u->timer);
        user_unhold(u);
    }
}

void mg_pool_set_limits_fn(mg_pool_t *pool, mg_pool_limits_fn fn, void *ctx)
{
    pool->limits_fn = fn;
    pool->limits_ctx = ctx;
}

void mg_pool_refresh_limits(mg_pool_t *pool)
{
    /* A held entry stays on the list; its successor is read before it is let go. */
    mg_list_t *n, *next;
    for (n = pool->users.next; n != &pool->users; n = next) {
        mg_pool_user_t *u = USER_OF(n);
        user_hold(u);
        user_load_limits(u);
        next = n->next;
        user_unhold(u);
    }
}

static int acquire_for(mg_pool_user_t *u, mg_pool_acquire_t *req, void *open_arg)
{
    uint64_t now = pool_now(u->pool);
    mg_pool_conn_t *pc;

    /* Requests already waiting go first: a slot that just freed is theirs. */
    if (u->nwaiters == 0 && (pc = conn_pick(u)) != NULL) {
        lease_take(pc);
        req->conn = pc;
        return 0;
    }

    if (backoff_active(u, now)) {
        /* No open now; waiting makes sense only for a connection that exists or is coming. */
        if (!can_serve_later(u) || u->nwaiters >= queue_room(u))
            return req_fail(req, MG_EBACKOFF, "%s", u->last_error);
    } else {
        char err[256];
        int rc = 0;
        int want = opens_wanted(u, u->nwaiters + 1);
        for (int i = 0; i < want && rc == 0; i++)
            rc = conn_open(u, open_arg, err, sizeof(err));
        if (rc < 0 && !can_serve_later(u))
            return req_fail(req, rc, "%s", err);
    }

    if (u->nwaiters >= queue_room(u))
        return req_fail(req, MG_EQUEUEFULL, LIMIT_MESSAGE, u->limits.max_connections);

    req->deadline = now + u->limits.queue_timeout_ms;
    queue_insert(u, req);
    return MG_EAGAIN;
}

int mg_pool_acquire(mg_pool_t *pool, mg_pool_acquire_t *req, const char *user, void *open_arg,
                    mg_pool_acquire_cb cb)
{
    req->conn = NULL;
    req->status = 0;
    req->error[0] = '\0';
    req->cb = cb;
    req->user_entry = NULL;
    mg_list_init(&req->node);
    req->deadline = 0;
    req->open_arg = open_arg;

    if (!mg_pool_user_id_valid(user))
        return req_fail(req, MG_EINVAL, "invalid user id");
    if (cb == NULL)
        return req_fail(req, MG_EINVAL, "an acquire needs a callback");
    if (pool->draining)
        return req_fail(req, MG_ESHUTDOWN, SHUTDOWN_MESSAGE);

    mg_pool_user_t *u = user_find(pool, user);
    if (u == NULL) {
        int rc = user_create(pool, user, &u);
        if (rc < 0)
            return req_fail(req, rc, "%s", mg_strerror(rc));
    }
    user_hold(u);
    int rc = acquire_for(u, req, open_arg);
    user_unhold(u);
    return rc;
}

void mg_pool_acquire_cancel(mg_pool_acquire_t *req)
{
    mg_pool_user_t *u = req->user_entry;
    if (u == NULL)
        return;
    queue_remove(u, req);
    req->status = MG_ECANCELED;
    user_update(u);
}

void mg_pool_release(mg_pool_t *pool, mg_pool_conn_t *pc)
{
    if (pc == NULL || pc->user->pool != pool || pc->leases <= pc->idle_leases) {
        mg_log_error("pool", "release of a connection that holds no busy lease of this pool");
        return;
    }
    mg_pool_user_t *u = pc->user;
    pc->leases--;
    u->leases--;
    pool->leases--;
    if (pc->leases == 0) {
        pc->last_used = pool_now(pool);
        if (pc->state == CONN_CLOSED)
            conn_free(pc);
    }
    user_update(u);
    if (pool->draining && pool->leases == 0 && pool->on_idle != NULL)
        pool->on_idle(pool, pool->on_idle_arg);
}

void mg_pool_lease_set_idle(mg_pool_t *pool, mg_pool_conn_t *pc, bool idle)
{
    if (pc == NULL || pc->user->pool != pool ||
        (idle ? pc->idle_leases >= pc->leases : pc->idle_leases <= 0)) {
        mg_log_error("pool", "a lease marked %s that is not %s", idle ? "idle" : "busy",
                     idle ? "busy" : "idle");
        return;
    }
    int d = idle ? 1 : -1;
    pc->idle_leases += d;
    pc->user->idle_leases += d;
    pool->idle_leases += d;
}

static int user_close_conns(mg_pool_user_t *u, bool force, const char *reason)
{
    int closed = 0;
    mg_list_t *n, *next;
    user_hold(u);
    mg_list_foreach_safe(n, next, &u->conns) {
        mg_pool_conn_t *pc = CONN_OF(n);
        if (pc->state == CONN_QUEUED || pc->state == CONN_OPENING || pc->state == CONN_READY) {
            conn_close(pc, force, reason);
            closed++;
        }
    }
    user_unhold(u);
    return closed;
}

int mg_pool_close_user(mg_pool_t *pool, const char *user, bool force, const char *reason)
{
    if (!mg_pool_user_id_valid(user))
        return 0;
    mg_pool_user_t *u = user_find(pool, user);
    return u != NULL ? user_close_conns(u, force, reason) : 0;
}

int mg_pool_close_all(mg_pool_t *pool, bool force, const char *reason)
{
    int closed = 0;
    mg_list_t *n, *next;
    for (n = pool->users.next; n != &pool->users; n = next) {
        mg_pool_user_t *u = USER_OF(n);
        user_hold(u);
        closed += user_close_conns(u, force, reason);
        next = n->next;
        user_unhold(u);
    }
    return closed;
}

int mg_pool_cleanup_stale(mg_pool_t *pool, uint64_t max_idle_ms)
{
    int closed = 0;
    uint64_t now = pool_now(pool);
    mg_list_t *un, *unext, *n, *next;

    for (un = pool->users.next; un != &pool->users; un = unext) {
        mg_pool_user_t *u = USER_OF(un);
        uint64_t idle = u->limits.idle_timeout_ms < max_idle_ms ? u->limits.idle_timeout_ms
                                                                : max_idle_ms;
        user_hold(u);
        mg_list_foreach_safe(n, next, &u->conns) {
            mg_pool_conn_t *pc = CONN_OF(n);
            if (pc->state != CONN_READY)
                continue;
            if (!pc->healthy) {
                conn_close(pc, true, "unhealthy");
                closed++;
            } else if (pc->leases == 0 && now - pc->last_used > idle) {
                conn_close(pc, false, "idle");
                closed++;
            } else if (pc->leases == pc->idle_leases && pool->backend.trim != NULL) {
                pool->backend.trim(pool->backend_ctx, pc);
            }
        }
        unext = un->next;
        user_unhold(u);
    }
    return closed;
}

void mg_pool_drain(mg_pool_t *pool, void (*on_idle)(mg_pool_t *pool, void *arg), void *arg)
{
    if (!pool->draining) {
        mg_log_info("pool", "draining: %d connections, %d busy and %d idle channels, %d waiting",
                    pool->nconns, pool->leases - pool->idle_leases, pool->idle_leases,
                    pool->waiters);
        pool->draining = true;
        /* Users with waiters cannot be freed by an update, so this walk is safe. */
        mg_list_t *n;
        mg_list_foreach(n, &pool->users) {
            if (USER_OF(n)->nwaiters > 0)
                user_update(USER_OF(n));
        }
    }
    pool->on_idle = on_idle;
    pool->on_idle_arg = arg;
    if (pool->leases == 0 && on_idle != NULL)
        on_idle(pool, arg);
}

void mg_pool_set_start_cb(mg_pool_t *pool, void (*fn)(void *arg, uint64_t waited_ms), void *arg)
{
    pool->start_cb = fn;
    pool->start_arg = arg;
}

void mg_pool_set_closed_cb(mg_pool_t *pool, void (*fn)(mg_pool_t *pool, void *arg), void *arg)
{
    pool->closed_cb = fn;
    pool->closed_arg = arg;
}

void mg_pool_stats(const mg_pool_t *pool, mg_pool_stats_t *out)
{
    memset(out, 0, sizeof(*out));
    out->total_connections = pool->nconns;
    out->ready_connections = pool->nready;
    out->leases = pool->leases;
    out->idle_leases = pool->idle_leases;
    out->waiters = pool->waiters;
    out->draining = pool->draining;
    out->handshakes = pool->gate.running;
    out->handshakes_queued = pool->gate.queued;
    out->handshakes_peak = pool->gate.peak_running;
    out->handshakes_refused = pool->gate.refused;
    out->max_handshakes = pool->gate.max_running;
    out->max_handshakes_per_server = pool->gate.group_max;
    const mg_list_t *n;
    mg_list_foreach(n, &pool->users) {
        if (USER_OF(n)->nconns > 0 || USER_OF(n)->nwaiters > 0)
            out->users++;
    }
}

int mg_pool_user_stats(const mg_pool_t *pool, const char *user, mg_pool_user_stats_t *out)
{
    memset(out, 0, sizeof(*out));
    if (!mg_pool_user_id_valid(user))
        return MG_EINVAL;
    const mg_pool_user_t *u = user_find(pool, user);
    if (u == NULL)
        return MG_EINVAL;
    out->connections = u->nconns;
    out->opening = u->nopening;
    out->leases = u->leases;
    out->idle_leases = u->idle_leases;
    out->waiters = u->nwaiters;
    out->limits = u->limits;
    return 0;
}

void mg_pool_foreach_conn(const mg_pool_t *pool,
                          void (*fn)(const char *user, mg_pool_conn_t *pc, void *arg), void *arg)
{
    const mg_list_t *un, *n;
    mg_list_foreach(un, &pool->users) {
        const mg_pool_user_t *u = USER_OF(un);
        mg_list_foreach(n, &u->conns) {
            if (CONN_OF(n)->state != CONN_CLOSED)
                fn(u->id, CONN_OF(n), arg);
        }
    }
}

/* ---- reports from the backend ---- */

void mg_pool_conn_ready(mg_pool_conn_t *pc)
{
    if (pc->state != CONN_OPENING)
        return; /* e.g. closed by the pool while it was opening */
    mg_pool_user_t *u = pc->user;
    u->nopening--;
    u->pool->nready++;
    pc->state = CONN_READY;
    mg__gate_leave(&u->pool->gate, &pc->ticket);
    pc->healthy = true;
    pc->last_used = pool_now(u->pool);
    u->backoff_ms = 0;
    u->backoff_until = 0;
    u->last_err = 0;
    u->last_error[0] = '\0';
    mg_log_info("pool", "user=%s conn=%" PRIu64 " ready", u->id, pc->id);
    user_update(u);
}

void mg_pool_conn_failed(mg_pool_conn_t *pc, int err, const char *message)
{
    if (err >= 0)
        err = MG_ECONNECT;
    if (message == NULL || message[0] == '\0')
        message = mg_strerror(err);
    if (pc->state == CONN_OPENING)
        conn_fail(pc, err, message);
    else
        mg_pool_conn_closed(pc, err, message); /* it was ready, or we had asked it to close */
}

void mg_pool_conn_set_healthy(mg_pool_conn_t *pc, bool healthy)
{
    if (pc->state == CONN_CLOSED || pc->healthy == healthy)
        return;
    pc->healthy = healthy;
    if (healthy)
        mg_log_info("pool", "user=%s conn=%" PRIu64 " healthy again", pc->user->id, pc->id);
    else
        mg_log_warn("pool", "user=%s conn=%" PRIu64 " unhealthy", pc->user->id, pc->id);
    user_update(pc->user);
}

void mg_pool_conn_closed(mg_pool_conn_t *pc, int err, const char *message)
{
    if (pc->state == CONN_CLOSED)
        return;
    if (pc->state == CONN_OPENING) {
        /* Gone before it was ready, and not because we asked: that is a failed open. */
        mg_pool_conn_failed(pc, err < 0 ? err : MG_ECONNECT, message);
        return;
    }
    mg_pool_user_t *u = pc->user;
    mg_pool_t *pool = u->pool;
    if (err < 0)
        mg_log_info("pool", "user=%s conn=%" PRIu64 " closed: %s", u->id, pc->id,
                    message != NULL && message[0] != '\0' ? message : mg_strerror(err));
    else
        mg_log_info("pool", "user=%s conn=%" PRIu64 " closed", u->id, pc->id);
    conn_uncount(pc);
    if (pc->leases == 0)
        conn_free(pc);
    user_update(u);
    notify_closed(pool);
}

void mg_pool_conn_set_backend_data(mg_pool_conn_t *pc, void *data)
{
    pc->backend_data = data;
}

void *mg_pool_conn_backend_data(const mg_pool_conn_t *pc)
{
    return pc->backend_data;
}

void *mg_pool_conn_backend_ctx(const mg_pool_conn_t *pc)
{
    return pc->user->pool->backend_ctx;
}

uint64_t mg_pool_conn_id(const mg_pool_conn_t *pc)
{
    return pc->id;
}

const char *mg_pool_conn_user(const mg_pool_conn_t *pc)
{
    return pc->user->id;
}

int mg_pool_conn_leases(const mg_pool_conn_t *pc)
{
    return pc->leases;
}

int mg_pool_conn_idle_leases(const mg_pool_conn_t *pc)
{
    return pc->idle_leases;
}

bool mg_pool_conn_healthy(const mg_pool_conn_t *pc)
{
    return pc->healthy;
}

uint64_t mg_pool_conn_last_used(const mg_pool_conn_t *pc)
{
    return pc->last_used;
}
