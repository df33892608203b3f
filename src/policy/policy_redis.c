/*
 * The shared dictionary's Redis back end (MOONGATE_REDIS_URL): one asynchronous hiredis
 * connection on the loop, and the dictionary's operations as Redis commands.
 *
 * The connection. The host is resolved with uv_getaddrinfo (hiredis would resolve it on the
 * loop's thread), hiredis connects to the address, and AUTH and SELECT go first. hiredis 0.14's
 * libuv adapter ignores a poll error, which is how libuv reports a refused connect, so the glue
 * to the loop is our own. A connection that fails or drops is retried with a backoff from 100 ms
 * to 2 s for as long as the gateway runs; while it is down, every operation fails at once (no
 * wait), so an unreachable Redis costs a request nothing but the policy's fallback.
 *
 * Operations. Each one is a command (GET, SET, DEL, PTTL) or a server-side script (incr with a
 * time to live, the token bucket), so that every change a rate limit needs is one atomic round
 * trip, exact across nodes. At most MAX_IN_FLIGHT are outstanding; the waiting side (policy.c)
 * bounds each wait and may cancel it, and a cancelled operation's reply is dropped.
 *
 * Values. Numbers are stored as decimal text ("%.17g", exact for a double), so that INCRBYFLOAT
 * and the scripts read them; strings get an "s:" in front, so that "5" comes back a string.
 * Keys are prefixed "moongate:".
 *
 * Logging is per change of state (connected, down, slow, back), never per operation.
 */
#include "policy_int.h"

#include "moongate/error.h"
#include "moongate/log.h"

#include <hiredis/async.h>
#include <hiredis/hiredis.h>
#include <lauxlib.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define LOG "redis"
#define KEY_PREFIX "moongate:"
#define MAX_IN_FLIGHT 4096
#define CONNECT_TIMEOUT_MS 1000
#define BACKOFF_MIN_MS 100
#define BACKOFF_MAX_MS 2000
#define VALUE_MAX (1024 * 1024)

typedef enum conn_state {
    R_DOWN = 0,  /* waiting to retry */
    R_RESOLVING,
    R_CONNECTING,
    R_UP,
} conn_state_t;

struct mg_redis {
    uv_loop_t *loop;
    mg__redis_addr_t a;

    conn_state_t state;
    redisAsyncContext *ac;
    uv_getaddrinfo_t gai;
    bool resolving;
    uv_timer_t timer; /* the retry's backoff, and the connect's time limit */
    uint32_t backoff_ms;
    bool down_reported; /* "unavailable" logged for this outage */
    bool slow;          /* "slow" logged; cleared by the next answer in time */
    bool freeing;
    bool timer_closed;

    int in_flight;
    mg_redis_stats_t stats;
};

struct mg__redis_op {
    mg_redis_t *r;
    mg__rdict_op_t op;
    lua_State *co;           /* where the results go */
    mg__redis_done_fn done;  /* NULL once cancelled */
    void *ctx;
};

/* ---- the URL ---- */

static int url_fail(char *err, size_t errlen, const char *why)
{
    snprintf(err, errlen, "MOONGATE_REDIS_URL: %s (redis://[[user]:password@]host[:port][/db])",
             why);
    return MG_ECONFIG;
}

/* Undoes %XX in a user or password. Returns false on a bad escape or no room. */
static bool url_unescape(char *dst, size_t cap, const char *src, size_t n)
{
    size_t j = 0;
    for (size_t i = 0; i < n; i++) {
        char c = src[i];
        if (c == '%') {
            if (i + 2 >= n)
                return false;
            char hex[3] = { src[i + 1], src[i + 2], 0 };
            char *end;
            long v = strtol(hex, &end, 16);
            if (end != hex + 2 || v == 0)
                return false;
            c = (char)v;
            i += 2;
        }
        if (j + 1 >= cap)
            return false;
        dst[j++] = c;
    }
    dst[j] = '\0';
    return true;
}

int mg__redis_parse_url(const char *url, mg__redis_addr_t *r, char *err, size_t errlen)
{
    const char *p;
    if (strncmp(url, "redis://", 8) == 0) {
        p = url + 8;
    } else if (strncmp(url, "rediss://", 9) == 0) {
        return url_fail(err, errlen, "TLS (rediss://) is not available: Debian 12's hiredis "
                                     "0.14 has no TLS; reach Redis over a private network or "
                                     "a local TLS tunnel (stunnel, spiped)");
    } else {
        return url_fail(err, errlen, "must start with redis://");
    }
    const char *at = strrchr(p, '@');
    const char *slash = strchr(at ? at : p, '/');
    r->user[0] = r->pass[0] = '\0';
    if (at != NULL) {
        const char *colon = memchr(p, ':', (size_t)(at - p));
        if (colon == NULL)
            return url_fail(err, errlen, "the part before @ needs a colon: :password or "
                                         "user:password");
        if (!url_unescape(r->user, sizeof(r->user), p, (size_t)(colon - p)) ||
            !url_unescape(r->pass, sizeof(r->pass), colon + 1, (size_t)(at - colon - 1)))
            return url_fail(err, errlen, "bad user or password (too long, or a bad %-escape)");
        if (r->pass[0] == '\0')
            return url_fail(err, errlen, "empty password");
        p = at + 1;
    }
    size_t hl = slash ? (size_t)(slash - p) : strlen(p);
    const char *port = NULL;
    const char *hs = p;
    size_t hn = hl;
    if (hl > 0 && p[0] == '[') {
        const char *close = memchr(p, ']', hl);
        if (close == NULL)
            return url_fail(err, errlen, "unclosed [ in the host");
        hs = p + 1;
        hn = (size_t)(close - p - 1);
        if (close + 1 < p + hl) {
            if (close[1] != ':')
                return url_fail(err, errlen, "junk after ]");
            port = close + 2;
        }
    } else {
        const char *colon = memchr(p, ':', hl);
        if (colon != NULL) {
            hn = (size_t)(colon - p);
            port = colon + 1;
        }
    }
    if (hn == 0 || hn >= sizeof(r->host))
        return url_fail(err, errlen, "no host, or a host too long");
    memcpy(r->host, hs, hn);
    r->host[hn] = '\0';
    r->port = 6379;
    if (port != NULL) {
        size_t pn = (size_t)(p + hl - port);
        char buf[8];
        char *end;
        if (pn == 0 || pn >= sizeof(buf))
            return url_fail(err, errlen, "bad port");
        memcpy(buf, port, pn);
        buf[pn] = '\0';
        long v = strtol(buf, &end, 10);
        if (*end != '\0' || v < 1 || v > 65535)
            return url_fail(err, errlen, "bad port");
        r->port = (int)v;
    }
    r->db = 0;
    if (slash != NULL && slash[1] != '\0') {
        char *end;
        long v = strtol(slash + 1, &end, 10);
        if (*end != '\0' || v < 0 || v > 1000000)
            return url_fail(err, errlen, "the database after / must be a number");
        r->db = (int)v;
    }
    snprintf(r->name, sizeof(r->name), "redis://%s%s%s:%d/%d", strchr(r->host, ':') ? "[" : "",
             r->host, strchr(r->host, ':') ? "]" : "", r->port, r->db);
    return 0;
}

/* ---- hiredis on the loop ---- */

typedef struct rpoll {
    uv_poll_t handle;
    redisAsyncContext *ac; /* NULL once hiredis let go */
    int events;
} rpoll_t;

static void rpoll_cb(uv_poll_t *h, int status, int events)
{
    rpoll_t *p = h->data;
    /* A poll error (a refused connect is one) stops the handle: let hiredis read and write so
       that it meets the error itself. */
    int ev = status < 0 ? p->events : events;
    if (p->ac != NULL && (ev & UV_WRITABLE))
        redisAsyncHandleWrite(p->ac);
    if (p->ac != NULL && (ev & UV_READABLE))
        redisAsyncHandleRead(p->ac);
}

static void rpoll_set(rpoll_t *p, int events)
{
    p->events = events;
    if (events != 0)
        uv_poll_start(&p->handle, events, rpoll_cb);
    else
        uv_poll_stop(&p->handle);
}

static void rpoll_add_read(void *arg) { rpoll_t *p = arg; rpoll_set(p, p->events | UV_READABLE); }
static void rpoll_del_read(void *arg) { rpoll_t *p = arg; rpoll_set(p, p->events & ~UV_READABLE); }
static void rpoll_add_write(void *arg) { rpoll_t *p = arg; rpoll_set(p, p->events | UV_WRITABLE); }
static void rpoll_del_write(void *arg) { rpoll_t *p = arg; rpoll_set(p, p->events & ~UV_WRITABLE); }

static void rpoll_closed(uv_handle_t *h)
{
    free(h->data);
}

static void rpoll_cleanup(void *arg)
{
    rpoll_t *p = arg;
    p->ac = NULL;
    uv_close((uv_handle_t *)&p->handle, rpoll_closed);
}

static int rpoll_attach(redisAsyncContext *ac, uv_loop_t *loop)
{
    rpoll_t *p = calloc(1, sizeof(*p));
    if (p == NULL)
        return MG_ENOMEM;
    if (uv_poll_init(loop, &p->handle, ac->c.fd) != 0) {
        free(p);
        return MG_EINVAL;
    }
    p->handle.data = p;
    p->ac = ac;
    ac->ev.data = p;
    ac->ev.addRead = rpoll_add_read;
    ac->ev.delRead = rpoll_del_read;
    ac->ev.addWrite = rpoll_add_write;
    ac->ev.delWrite = rpoll_del_write;
    ac->ev.cleanup = rpoll_cleanup;
    return 0;
}

/* ---- the connection's life ---- */

static void connect_start(mg_redis_t *r);

static void on_retry(uv_timer_t *t)
{
    connect_start(t->data);
}

static void went_down(mg_redis_t *r, const char *why)
{
    bool was_up = r->state == R_UP;
    r->state = R_DOWN;
    r->ac = NULL;
    r->stats.up = false;
    if (r->freeing)
        return;
    if (was_up)
        mg_log_warn(LOG, "%s: connection lost (%s); the shared dictionary fails every call at "
                    "once until it is back; reconnecting", r->a.name, why);
    else if (!r->down_reported)
        mg_log_warn(LOG, "%s: cannot connect (%s); the shared dictionary fails every call at "
                    "once until it is back; retrying", r->a.name, why);
    r->down_reported = true;
    uv_timer_start(&r->timer, on_retry, r->backoff_ms, 0);
    r->backoff_ms = r->backoff_ms * 2 > BACKOFF_MAX_MS ? BACKOFF_MAX_MS : r->backoff_ms * 2;
}

static void on_connect(const redisAsyncContext *ac, int status)
{
    mg_redis_t *r = ac->data;
    uv_timer_stop(&r->timer);
    if (status != REDIS_OK) {
        went_down(r, ac->errstr[0] ? ac->errstr : "connect failed"); /* hiredis frees ac */
        return;
    }
    /* Up once AUTH and SELECT (queued first) have answered: see on_ready. */
}

static void on_disconnect(const redisAsyncContext *ac, int status)
{
    mg_redis_t *r = ac->data;
    (void)status;
    went_down(r, ac->errstr[0] ? ac->errstr : "closed");
}

/* The reply to the last set-up command (AUTH, SELECT or PING). */
static void on_ready(redisAsyncContext *ac, void *reply, void *arg)
{
    mg_redis_t *r = arg;
    redisReply *rep = reply;
    if (rep == NULL || r->ac != ac)
        return;
    if (rep->type == REDIS_REPLY_ERROR) {
        if (!r->down_reported)
            mg_log_error(LOG, "%s: refused: %s; the shared dictionary fails every call at once "
                         "until it is accepted; retrying", r->a.name, rep->str);
        r->down_reported = true;
        redisAsyncDisconnect(ac);
        return;
    }
    if (r->state != R_UP) {
        r->state = R_UP;
        r->stats.up = true;
        r->backoff_ms = BACKOFF_MIN_MS;
        if (r->down_reported)
            mg_log_info(LOG, "%s: connected again; the shared dictionary is back", r->a.name);
        else
            mg_log_info(LOG, "%s: connected; the shared dictionary is cluster-wide", r->a.name);
        r->down_reported = false;
    }
}

/* The reply to AUTH or SELECT: an error is reported by on_ready, which follows. */
static void on_setup(redisAsyncContext *ac, void *reply, void *arg)
{
    redisReply *rep = reply;
    if (rep != NULL && rep->type == REDIS_REPLY_ERROR)
        on_ready(ac, reply, arg);
}

static void on_connect_timeout(uv_timer_t *t)
{
    mg_redis_t *r = t->data;
    if (r->state == R_CONNECTING && r->ac != NULL) {
        redisAsyncContext *ac = r->ac;
        /* Freeing a context that never connected calls no disconnect callback. */
        r->ac = NULL;
        redisAsyncFree(ac);
        went_down(r, "no connection within 1 s");
    }
}

static void on_resolved(uv_getaddrinfo_t *req, int status, struct addrinfo *res)
{
    mg_redis_t *r = req->data;
    r->resolving = false;
    if (r->freeing) {
        uv_freeaddrinfo(res);
        if (r->timer_closed)
            free(r);
        return;
    }
    char ip[64] = "";
    if (status == 0 && res != NULL) {
        if (res->ai_family == AF_INET6)
            uv_ip6_name((struct sockaddr_in6 *)res->ai_addr, ip, sizeof(ip));
        else
            uv_ip4_name((struct sockaddr_in *)res->ai_addr, ip, sizeof(ip));
    }
    uv_freeaddrinfo(res);
    if (ip[0] == '\0') {
        char why[400];
        snprintf(why, sizeof(why), "cannot resolve %s: %s", r->a.host,
                 status ? uv_strerror(status) : "no address");
        went_down(r, why);
        return;
    }
    redisAsyncContext *ac = redisAsyncConnect(ip, r->a.port);
    if (ac == NULL || ac->err) {
        char why[400];
        snprintf(why, sizeof(why), "%s", ac ? ac->errstr : "out of memory");
        if (ac)
            redisAsyncFree(ac);
        went_down(r, why);
        return;
    }
    if (rpoll_attach(ac, r->loop) != 0) {
        redisAsyncFree(ac);
        went_down(r, "cannot watch the socket");
        return;
    }
    ac->data = r;
    r->ac = ac;
    r->state = R_CONNECTING;
    redisAsyncSetConnectCallback(ac, on_connect);
    redisAsyncSetDisconnectCallback(ac, on_disconnect);
    if (r->a.pass[0] != '\0') {
        if (r->a.user[0] != '\0')
            redisAsyncCommand(ac, on_setup, r, "AUTH %s %s", r->a.user, r->a.pass);
        else
            redisAsyncCommand(ac, on_setup, r, "AUTH %s", r->a.pass);
    }
    if (r->a.db != 0)
        redisAsyncCommand(ac, on_setup, r, "SELECT %d", r->a.db);
    redisAsyncCommand(ac, on_ready, r, "PING");
    uv_timer_start(&r->timer, on_connect_timeout, CONNECT_TIMEOUT_MS, 0);
}

static void connect_start(mg_redis_t *r)
{
    if (r->freeing || r->state != R_DOWN)
        return;
    r->state = R_RESOLVING;
    struct addrinfo hints = { .ai_socktype = SOCK_STREAM };
    r->gai.data = r;
    int rc = uv_getaddrinfo(r->loop, &r->gai, on_resolved, r->a.host, NULL, &hints);
    if (rc != 0) {
        char why[400];
        snprintf(why, sizeof(why), "cannot resolve %s: %s", r->a.host, uv_strerror(rc));
        went_down(r, why);
        return;
    }
    r->resolving = true;
}

int mg__redis_new(uv_loop_t *loop, const char *url, mg_redis_t **out, char *err, size_t errlen)
{
    *out = NULL;
    mg_redis_t *r = calloc(1, sizeof(*r));
    if (r == NULL)
        return MG_ENOMEM;
    int rc = mg__redis_parse_url(url, &r->a, err, errlen);
    if (rc != 0) {
        free(r);
        return rc;
    }
    r->loop = loop;
    r->backoff_ms = BACKOFF_MIN_MS;
    uv_timer_init(loop, &r->timer);
    r->timer.data = r;
    connect_start(r);
    *out = r;
    return 0;
}

/* r goes when its timer has closed and no resolution is out (on_resolved frees it then). */
static void timer_closed(uv_handle_t *h)
{
    mg_redis_t *r = h->data;
    r->timer_closed = true;
    if (!r->resolving)
        free(r);
}

void mg__redis_free(mg_redis_t *r)
{
    if (r == NULL)
        return;
    r->freeing = true;
    if (r->ac != NULL) {
        redisAsyncContext *ac = r->ac;
        r->ac = NULL;
        redisAsyncFree(ac); /* pending operations hear of it with no reply */
    }
    if (r->resolving)
        uv_cancel((uv_req_t *)&r->gai);
    uv_close((uv_handle_t *)&r->timer, timer_closed);
}

const char *mg__redis_name(const mg_redis_t *r)
{
    return r->a.name;
}

void mg__redis_get_stats(const mg_redis_t *r, mg_redis_stats_t *out)
{
    *out = r->stats;
    out->in_flight = r->in_flight;
}

void mg__redis_note_timeout(mg_redis_t *r, uint32_t ms)
{
    r->stats.timeouts++;
    if (!r->slow && r->state == R_UP) {
        r->slow = true;
        mg_log_warn(LOG, "%s: slow: no answer within %u ms; calls that wait longer take the "
                    "policy's fallback", r->a.name, (unsigned)ms);
    }
}

/* ---- operations ---- */

static const char incr_script[] =
    "local new = redis.call('EXISTS', KEYS[1]) == 0\n"
    "local v = redis.call('INCRBYFLOAT', KEYS[1], ARGV[1])\n"
    "local ttl = tonumber(ARGV[2])\n"
    "if new and ttl > 0 then redis.call('PEXPIRE', KEYS[1], ttl) end\n"
    "return v\n";

/* The token bucket of lua/moongate/token_bucket.lua in one step; the same arithmetic as
   mg__dict_take_bucket() (doubles both), so both back ends give the same answers. */
static const char take_script[] =
    "local now, n = tonumber(ARGV[1]), tonumber(ARGV[2])\n"
    "local interval, burst = tonumber(ARGV[3]), tonumber(ARGV[4])\n"
    "local full_at = tonumber(redis.call('GET', KEYS[1]) or '') or now\n"
    "if full_at < now then full_at = now end\n"
    "local new_full_at = full_at + n * interval\n"
    "local over = new_full_at - now - burst * interval\n"
    "if over > interval * 0.01 then return {0, string.format('%.17g', over)} end\n"
    "local ttl = math.ceil((new_full_at - now) * 1000)\n"
    "if ttl < 1 then ttl = 1 end\n"
    "redis.call('SET', KEYS[1], string.format('%.17g', new_full_at), 'PX', ttl)\n"
    "return {1, string.format('%.17g', new_full_at)}\n";

static bool parse_number(const char *s, size_t n, double *out)
{
    char buf[64];
    if (n == 0 || n >= sizeof(buf))
        return false;
    memcpy(buf, s, n);
    buf[n] = '\0';
    char *end;
    *out = strtod(buf, &end);
    return *end == '\0';
}

/* Pushes a stored value: a number, a string, or nil. */
static void push_value(lua_State *L, const redisReply *rep)
{
    if (rep->type != REDIS_REPLY_STRING) {
        lua_pushnil(L);
        return;
    }
    double d;
    if (rep->len >= 2 && rep->str[0] == 's' && rep->str[1] == ':')
        lua_pushlstring(L, rep->str + 2, rep->len - 2);
    else if (parse_number(rep->str, rep->len, &d))
        lua_pushnumber(L, d);
    else
        lua_pushlstring(L, rep->str, rep->len); /* written by someone else: as it is */
}

/* Pushes an operation's results from its reply; returns how many. */
static int push_results(lua_State *L, mg__rdict_op_t op, const redisReply *rep)
{
    if (rep == NULL) {
        lua_pushnil(L);
        lua_pushliteral(L, "redis unavailable: the connection closed");
        return 2;
    }
    if (rep->type == REDIS_REPLY_ERROR) {
        lua_pushnil(L);
        if (op == MG_RDICT_INCR && strstr(rep->str, "not a valid float") != NULL)
            lua_pushliteral(L, "not a number");
        else
            lua_pushfstring(L, "redis error: %s", rep->str);
        return 2;
    }
    double d;
    switch (op) {
    case MG_RDICT_GET:
        push_value(L, rep);
        return 1;
    case MG_RDICT_SET:
    case MG_RDICT_DELETE:
        lua_pushboolean(L, 1);
        return 1;
    case MG_RDICT_INCR:
        if (rep->type == REDIS_REPLY_STRING && parse_number(rep->str, rep->len, &d)) {
            lua_pushnumber(L, d);
            return 1;
        }
        break;
    case MG_RDICT_TTL:
        if (rep->type == REDIS_REPLY_INTEGER) {
            if (rep->integer == -2)
                lua_pushnil(L);
            else
                lua_pushnumber(L, (lua_Number)rep->integer);
            return 1;
        }
        break;
    case MG_RDICT_TAKE_BUCKET:
        if (rep->type == REDIS_REPLY_ARRAY && rep->elements == 2 &&
            rep->element[0]->type == REDIS_REPLY_INTEGER &&
            rep->element[1]->type == REDIS_REPLY_STRING &&
            parse_number(rep->element[1]->str, rep->element[1]->len, &d)) {
            lua_pushboolean(L, rep->element[0]->integer == 1);
            lua_pushnumber(L, d);
            return 2;
        }
        break;
    }
    lua_pushnil(L);
    lua_pushliteral(L, "redis error: an answer of the wrong type");
    return 2;
}

static void on_reply(redisAsyncContext *ac, void *reply, void *arg)
{
    (void)ac;
    mg__redis_op_t *o = arg;
    mg_redis_t *r = o->r;
    redisReply *rep = reply;
    r->in_flight--;
    if (rep != NULL && rep->type != REDIS_REPLY_ERROR) {
        if (r->slow && o->done != NULL) {
            r->slow = false;
            mg_log_info(LOG, "%s: answering in time again", r->a.name);
        }
    } else {
        r->stats.errors++;
    }
    mg__redis_done_fn done = o->done;
    void *ctx = o->ctx;
    lua_State *co = o->co;
    mg__rdict_op_t op = o->op;
    free(o);
    if (done != NULL)
        done(ctx, push_results(co, op, rep));
}

static void fmt_num(char *buf, size_t cap, double v)
{
    snprintf(buf, cap, "%.17g", v);
}

int mg__redis_dict_start(mg_redis_t *r, const mg__rdict_req_t *q, lua_State *co,
                         mg__redis_done_fn done, void *ctx, mg__redis_op_t **out, char *err,
                         size_t errlen)
{
    *out = NULL;
    if (r->freeing || r->state == R_DOWN || r->state == R_RESOLVING || r->ac == NULL) {
        r->stats.unavailable++;
        snprintf(err, errlen, "redis unavailable: not connected to %s", r->a.name);
        return MG_ECONNECT;
    }
    if (r->in_flight >= MAX_IN_FLIGHT) {
        r->stats.unavailable++;
        snprintf(err, errlen, "redis unavailable: %d calls already waiting", r->in_flight);
        return MG_EQUEUEFULL;
    }
    if (q->op == MG_RDICT_SET && q->has_value && q->value.type == MG_DICT_STRING &&
        q->value.len > VALUE_MAX) {
        snprintf(err, errlen, "value too large for redis (over %d bytes)", VALUE_MAX);
        return MG_EINVAL;
    }

    size_t klen = sizeof(KEY_PREFIX) - 1 + q->klen;
    char *key = malloc(klen);
    char *sval = NULL;
    if (key == NULL)
        return MG_ENOMEM;
    memcpy(key, KEY_PREFIX, sizeof(KEY_PREFIX) - 1);
    memcpy(key + sizeof(KEY_PREFIX) - 1, q->key, q->klen);

    const char *argv[9];
    size_t lens[9];
    int argc = 0;
    char n1[32], n2[32], n3[32], n4[32];
#define ARG(s, n) (argv[argc] = (s), lens[argc] = (n), argc++)
#define ARGS(s) ARG(s, strlen(s))
    switch (q->op) {
    case MG_RDICT_GET:
        ARGS("GET");
        ARG(key, klen);
        break;
    case MG_RDICT_DELETE:
        ARGS("DEL");
        ARG(key, klen);
        break;
    case MG_RDICT_TTL:
        ARGS("PTTL");
        ARG(key, klen);
        break;
    case MG_RDICT_SET:
        if (!q->has_value) {
            ARGS("DEL");
            ARG(key, klen);
            break;
        }
        ARGS("SET");
        ARG(key, klen);
        if (q->value.type == MG_DICT_NUMBER) {
            fmt_num(n1, sizeof(n1), q->value.num);
            ARGS(n1);
        } else {
            sval = malloc(q->value.len + 2);
            if (sval == NULL) {
                free(key);
                return MG_ENOMEM;
            }
            sval[0] = 's';
            sval[1] = ':';
            memcpy(sval + 2, q->value.str, q->value.len);
            ARG(sval, q->value.len + 2);
        }
        if (q->ttl_ms > 0) {
            snprintf(n2, sizeof(n2), "%llu", (unsigned long long)q->ttl_ms);
            ARGS("PX");
            ARGS(n2);
        }
        break;
    case MG_RDICT_INCR:
        ARGS("EVAL");
        ARGS(incr_script);
        ARGS("1");
        ARG(key, klen);
        fmt_num(n1, sizeof(n1), q->by);
        ARGS(n1);
        snprintf(n2, sizeof(n2), "%llu", (unsigned long long)q->ttl_ms);
        ARGS(n2);
        break;
    case MG_RDICT_TAKE_BUCKET:
        ARGS("EVAL");
        ARGS(take_script);
        ARGS("1");
        ARG(key, klen);
        fmt_num(n1, sizeof(n1), q->now);
        ARGS(n1);
        fmt_num(n2, sizeof(n2), q->n);
        ARGS(n2);
        fmt_num(n3, sizeof(n3), q->interval);
        ARGS(n3);
        fmt_num(n4, sizeof(n4), q->burst);
        ARGS(n4);
        break;
    }
#undef ARG
#undef ARGS

    mg__redis_op_t *o = calloc(1, sizeof(*o));
    int rc = MG_ENOMEM;
    if (o != NULL) {
        *o = (mg__redis_op_t){ .r = r, .op = q->op, .co = co, .done = done, .ctx = ctx };
        /* hiredis copies the arguments into its output buffer before it returns. */
        if (redisAsyncCommandArgv(r->ac, on_reply, o, argc, argv, lens) == REDIS_OK) {
            r->in_flight++;
            r->stats.commands++;
            *out = o;
            rc = 0;
        } else {
            free(o);
            r->stats.unavailable++;
            snprintf(err, errlen, "redis unavailable: the connection to %s is closing",
                     r->a.name);
            rc = MG_ECONNECT;
        }
    }
    free(key);
    free(sval);
    return rc;
}

void mg__redis_op_cancel(mg__redis_op_t *o)
{
    if (o != NULL)
        o->done = NULL;
}
