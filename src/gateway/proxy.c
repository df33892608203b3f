/*
 * Exchanges over pooled channels, and the channels kept between them.
 *
 * A link is one channel with its pool lease and its response parser. It lives from the channel
 * open to the channel close and may carry many exchanges in turn; between them it sits on the
 * proxy's idle list with a timer. An exchange is one request: it finds an idle link for its
 * user and target, or acquires a lease and opens a new one.
 *
 * Callbacks from the channel reach the exchange through the link. The exchange may be aborted
 * from inside its own callbacks, so it is freed only by exchange_finish() or at the end of a
 * dispatch (x->dispatching), never in the middle of one.
 */
#include "moongate/proxy.h"

#include "core/buf.h"
#include "moongate/error.h"
#include "moongate/list.h"
#include "moongate/log.h"
#include "moongate/ssh_backend.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct link link_t;

struct mg_proxy {
    uv_loop_t *loop;
    mg_pool_t *pool;
    mg_proxy_opts_t opts;
    mg_list_t idle;         /* links, the most recently idle first */
    mg_exchange_t *waiting_head, *waiting_tail; /* waiting for a pool lease, oldest first */
    int idle_count;
    int active;
    int links;
    bool draining;
    bool freeing;
    uint64_t exchanges, reused, retried;
};

struct link {
    mg_proxy_t *px;
    mg_pool_conn_t *lease;
    mg_ssh_chan_t *ch;
    mg_http1_resp_parser_t *parser;
    mg_exchange_t *x;        /* the exchange using it, or NULL when idle */
    uv_timer_t timer;        /* while busy, the response head's deadline then the response's
                                idle deadline; while idle, the keep-alive deadline */
    char user[MG_USER_ID_MAX + 1];
    char target_host[256];
    int target_port;
    int uses;
    bool open;
    bool idle;
    bool lease_idle;         /* the lease counts as idle in the pool: from the link's going on
                                the idle list until it serves again or its lease goes back */
    bool closing;
    mg_list_t node;          /* on px->idle while idle */
};

struct mg_exchange {
    mg_proxy_t *px;
    link_t *link;
    const mg_exchange_cbs_t *cbs;
    void *data;
    mg_exchange_req_t req;
    char user[MG_USER_ID_MAX + 1];
    char target_host[256];
    char method[16];
    mg_pool_acquire_t acq;
    bool acquiring;
    mg__buf_t head;          /* the request head, sent from head_off */
    size_t head_off;
    mg__buf_t replay;        /* what was sent of the body, for a retry; dropped when too big */
    bool replay_lost;
    bool body_done;          /* the caller has no more body */
    bool got_response;       /* a response byte arrived */
    bool got_head;
    bool aborted;
    bool done;
    bool retried;
    bool paused;
    bool want_body;          /* write_body said EAGAIN: call on_body_writable */
    mg_exchange_t *wait_next, *wait_prev;
    int dispatching;
    uint64_t conn_id;
};

static const mg_ssh_chan_cbs_t link_cbs;
static void link_close(link_t *l);
static void on_link_timer(uv_timer_t *t);
static void exchange_fail(mg_exchange_t *x, int status, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static void exchange_send(mg_exchange_t *x);

void mg_proxy_opts_init(mg_proxy_opts_t *o)
{
    *o = (mg_proxy_opts_t){
        .head_timeout_ms = 120000,
        .keepalive_ms = 10000,
        .replay_max = 64 * 1024,
    };
}

/* ---- exchange lifetime ---- */

static void waiting_add(mg_exchange_t *x)
{
    mg_proxy_t *px = x->px;
    x->wait_next = NULL;
    x->wait_prev = px->waiting_tail;
    if (px->waiting_tail)
        px->waiting_tail->wait_next = x;
    else
        px->waiting_head = x;
    px->waiting_tail = x;
}

static void waiting_remove(mg_exchange_t *x)
{
    mg_proxy_t *px = x->px;
    if (x->wait_prev)
        x->wait_prev->wait_next = x->wait_next;
    else if (px->waiting_head == x)
        px->waiting_head = x->wait_next;
    else
        return; /* not on the list */
    if (x->wait_next)
        x->wait_next->wait_prev = x->wait_prev;
    else
        px->waiting_tail = x->wait_prev;
    x->wait_next = x->wait_prev = NULL;
}

static void exchange_free(mg_exchange_t *x)
{
    x->px->active--;
    mg__buf_free(&x->head);
    mg__buf_free(&x->replay);
    free(x);
}

/* Tells the caller the exchange is over and frees it (later, if a dispatch is running). */
static void exchange_finish(mg_exchange_t *x, int status, const char *message)
{
    if (x->done)
        return;
    x->done = true;
    if (x->link) {
        x->link->x = NULL;
        x->link = NULL;
    }
    if (!x->aborted)
        x->cbs->on_done(x, status, message);
    if (x->dispatching == 0)
        exchange_free(x);
}

static void exchange_fail(mg_exchange_t *x, int status, const char *fmt, ...)
{
    char msg[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    exchange_finish(x, status, msg);
}

/* ---- links ---- */

static void idle_unlink(link_t *l)
{
    if (!l->idle)
        return;
    mg_list_remove(&l->node);
    l->idle = false;
    l->px->idle_count--;
}

static void on_link_timer_closed(uv_handle_t *h)
{
    link_t *l = h->data;
    mg_proxy_t *px = l->px;
    mg_http1_resp_parser_free(l->parser);
    free(l);
    px->links--;
    if (px->freeing && px->links == 0)
        free(px);
}

static uint64_t head_timeout(const mg_exchange_t *x)
{
    return x->req.head_timeout_ms ? x->req.head_timeout_ms : x->px->opts.head_timeout_ms;
}

/* Restarts the response's idle deadline: more of it came, or reading it resumed. */
static void idle_deadline(link_t *l, mg_exchange_t *x)
{
    if (x->req.idle_timeout_ms && x->got_head && !x->paused && !x->done)
        uv_timer_start(&l->timer, on_link_timer, x->req.idle_timeout_ms, 0);
}

static void on_link_timer(uv_timer_t *t)
{
    link_t *l = t->data;
    if (l->idle) {
        mg_log_trace("proxy", "user=%s idle channel to %s:%d closed after %llu ms", l->user,
                     l->target_host, l->target_port,
                     (unsigned long long)l->px->opts.keepalive_ms);
        link_close(l);
        return;
    }
    mg_exchange_t *x = l->x;
    if (x == NULL)
        return;
    link_close(l);
    if (!x->got_head)
        exchange_fail(x, MG_ETIMEDOUT, "the upstream %s:%d sent no response within %llu ms",
                      l->target_host, l->target_port, (unsigned long long)head_timeout(x));
    else
        exchange_fail(x, MG_ETIMEDOUT, "the upstream %s:%d sent nothing for %u ms mid-response",
                      l->target_host, l->target_port, (unsigned)x->req.idle_timeout_ms);
}

/* Tells the pool whether the link's lease serves a request, so that its counts of busy and idle
 * channels (the drain's "requests in flight") mean what they say. */
static void link_lease_idle(link_t *l, bool idle)
{
    if (l->lease_idle == idle)
        return;
    l->lease_idle = idle;
    mg_pool_lease_set_idle(l->px->pool, l->lease, idle);
}

/* Closes the channel; the lease goes back and the link is freed in the channel's on_close. */
static void link_close(link_t *l)
{
    idle_unlink(l);
    uv_timer_stop(&l->timer);
    if (l->closing)
        return;
    l->closing = true;
    mg_ssh_chan_close(l->ch);
}

/* Gives the finished link to exchange x, which sends its head on it at once. */
static void link_reuse(link_t *l, mg_exchange_t *x)
{
    mg_proxy_t *px = l->px;
    uv_timer_stop(&l->timer);
    link_lease_idle(l, false);
    l->uses++;
    l->x = x;
    x->link = l;
    x->conn_id = mg_ssh_conn_id(mg_ssh_chan_conn(l->ch));
    px->reused++;
    mg_http1_resp_parser_expect(l->parser, x->method);
    if (x->paused)
        mg_ssh_chan_read_stop(l->ch);
    uv_timer_start(&l->timer, on_link_timer, head_timeout(x), 0);
    exchange_send(x);
}

static void link_make_idle(link_t *l)
{
    mg_proxy_t *px = l->px;
    if (px->draining || l->closing) {
        link_close(l);
        return;
    }
    /* A request waiting for a lease of this user takes the link instead: same target, it
       rides it; another target, the link closes so that its lease frees up. */
    for (mg_exchange_t *w = px->waiting_head; w; w = w->wait_next) {
        if (strcmp(w->user, l->user) != 0)
            continue;
        if (w->req.target_port == l->target_port && strcmp(w->target_host, l->target_host) == 0) {
            waiting_remove(w);
            mg_pool_acquire_cancel(&w->acq);
            w->acquiring = false;
            mg_ssh_chan_read_start(l->ch);
            link_reuse(l, w);
        } else {
            link_close(l);
        }
        return;
    }
    /* The last exchange may have paused reading; an idle channel must read (to see an EOF,
       and so that the next exchange hears its response). */
    mg_ssh_chan_read_start(l->ch);
    l->idle = true;
    link_lease_idle(l, true);
    mg_list_insert_head(&px->idle, &l->node);
    px->idle_count++;
    uv_timer_start(&l->timer, on_link_timer, px->opts.keepalive_ms, 0);
}

static link_t *idle_find(mg_proxy_t *px, const char *user, const char *host, int port)
{
    mg_list_t *n;
    mg_list_foreach(n, &px->idle) {
        link_t *l = mg_list_entry(n, link_t, node);
        if (l->target_port == port && strcmp(l->user, user) == 0 &&
            strcmp(l->target_host, host) == 0)
            return l;
    }
    return NULL;
}

/* ---- the response parser, reporting to the link's exchange ---- */

static int on_resp_head(void *data, const mg_http1_resp_head_t *head)
{
    link_t *l = data;
    mg_exchange_t *x = l->x;
    if (x == NULL)
        return -1;
    uv_timer_stop(&l->timer);
    x->got_head = true;
    x->cbs->on_head(x, head);
    if (l->x == x)
        idle_deadline(l, x);
    return 0;
}

static int on_resp_body(void *data, const char *at, size_t len)
{
    link_t *l = data;
    mg_exchange_t *x = l->x;
    if (x == NULL)
        return -1;
    if (!x->aborted)
        x->cbs->on_body(x, at, len);
    return x->aborted ? -1 : 0;
}

static int on_resp_complete(void *data, bool keep_alive)
{
    link_t *l = data;
    mg_exchange_t *x = l->x;
    if (x == NULL)
        return -1;
    bool reusable = keep_alive && x->body_done && x->head_off == x->head.len;
    l->x = NULL;
    x->link = NULL;
    if (reusable)
        link_make_idle(l);
    else
        link_close(l);
    exchange_finish(x, 0, "");
    /* The bytes after a response belong to no request: stop parsing them here. */
    return reusable ? 0 : -1;
}

static const mg_http1_resp_cbs_t resp_cbs = {
    .on_head = on_resp_head,
    .on_body = on_resp_body,
    .on_complete = on_resp_complete,
};

/* ---- channel callbacks ---- */

static void link_on_open(mg_ssh_chan_t *ch, int status)
{
    link_t *l = mg_ssh_chan_data(ch);
    if (status != 0) {
        mg_exchange_t *x = l->x;
        l->x = NULL;
        if (x)
            exchange_fail(x, status, "%s", mg_ssh_chan_error(ch));
        return; /* on_close follows and frees the link */
    }
    l->open = true;
    if (l->x)
        exchange_send(l->x);
}

static void link_on_data(mg_ssh_chan_t *ch, const char *buf, size_t len)
{
    link_t *l = mg_ssh_chan_data(ch);
    mg_exchange_t *x = l->x;
    if (x == NULL) {
        /* An idle upstream has nothing to say; whatever it sent ends the reuse. */
        link_close(l);
        return;
    }
    x->got_response = true;
    idle_deadline(l, x);
    x->dispatching++;
    size_t consumed = 0;
    int rc = mg_http1_resp_parser_feed(l->parser, buf, len, &consumed);
    x->dispatching--;
    if (x->done) {
        /* Bytes after the response belong to no request: the channel cannot be trusted. */
        if (consumed < len && l->idle)
            link_close(l);
        if (x->dispatching == 0)
            exchange_free(x);
        return;
    }
    if (x->aborted)
        return;
    if (rc != 0) {
        link_close(l);
        exchange_fail(x, MG_ESSH, "the upstream %s:%d sent a malformed response: %s",
                      l->target_host, l->target_port, mg_http1_resp_parser_error(l->parser));
    }
}

static void link_on_eof(mg_ssh_chan_t *ch)
{
    link_t *l = mg_ssh_chan_data(ch);
    mg_exchange_t *x = l->x;
    if (x == NULL) {
        link_close(l);
        return;
    }
    x->dispatching++;
    int rc = mg_http1_resp_parser_eof(l->parser);
    x->dispatching--;
    if (x->done) {
        if (x->dispatching == 0)
            exchange_free(x);
        return;
    }
    link_close(l);
    (void)rc;
    /* on_close reports the failure (and may retry on a fresh channel). */
}

static void link_on_writable(mg_ssh_chan_t *ch)
{
    link_t *l = mg_ssh_chan_data(ch);
    if (l->x)
        exchange_send(l->x);
}

/* Whether a failed exchange may be sent again on a fresh channel. */
static bool can_retry(const mg_exchange_t *x, const link_t *l)
{
    return l->uses > 1 && !x->got_response && !x->retried && !x->replay_lost &&
           !x->px->draining;
}

static void exchange_retry(mg_exchange_t *x);

static void link_on_close(mg_ssh_chan_t *ch, int status)
{
    link_t *l = mg_ssh_chan_data(ch);
    mg_proxy_t *px = l->px;
    mg_exchange_t *x = l->x;
    idle_unlink(l);
    l->x = NULL;
    link_lease_idle(l, false);
    mg_pool_release(px->pool, l->lease);
    l->lease = NULL;
    if (x && !x->done) {
        x->link = NULL;
        if (can_retry(x, l)) {
            /* The upstream closed the reused connection as the request went out. */
            exchange_retry(x);
        } else if (x->got_head) {
            exchange_fail(x, MG_ECLOSED, "the upstream connection closed mid-response");
        } else {
            const char *why = mg_ssh_chan_error(ch);
            exchange_fail(x, status ? status : MG_ECLOSED,
                          "the upstream %s:%d closed the connection without a response%s%s",
                          l->target_host, l->target_port, *why ? ": " : "", why);
        }
    }
    uv_close((uv_handle_t *)&l->timer, on_link_timer_closed);
}

static const mg_ssh_chan_cbs_t link_cbs = {
    .on_open = link_on_open,
    .on_data = link_on_data,
    .on_eof = link_on_eof,
    .on_writable = link_on_writable,
    .on_close = link_on_close,
};

/* Opens a channel on the lease the exchange holds. Returns 0, or a code (the lease is back). */
static int link_start(mg_exchange_t *x, mg_pool_conn_t *lease)
{
    mg_proxy_t *px = x->px;
    link_t *l = calloc(1, sizeof(*l));
    if (l == NULL || mg_http1_resp_parser_new(&resp_cbs, l, 0, &l->parser) != 0) {
        free(l);
        mg_pool_release(px->pool, lease);
        return MG_ENOMEM;
    }
    mg_ssh_conn_t *c = mg_ssh_backend_conn(lease);
    int rc = c ? mg_ssh_chan_open(c, x->target_host, x->req.target_port, &link_cbs, l, &l->ch)
               : MG_ECLOSED;
    if (rc != 0) {
        mg_http1_resp_parser_free(l->parser);
        free(l);
        mg_pool_release(px->pool, lease);
        return rc;
    }
    mg_list_init(&l->node);
    l->px = px;
    l->lease = lease;
    snprintf(l->user, sizeof(l->user), "%s", x->user);
    snprintf(l->target_host, sizeof(l->target_host), "%s", x->target_host);
    l->target_port = x->req.target_port;
    l->uses = 1;
    uv_timer_init(px->loop, &l->timer);
    l->timer.data = l;
    px->links++;
    x->conn_id = mg_ssh_conn_id(c);
    l->x = x;
    x->link = l;
    mg_http1_resp_parser_expect(l->parser, x->method);
    if (x->paused)
        mg_ssh_chan_read_stop(l->ch);
    uv_timer_start(&l->timer, on_link_timer, head_timeout(x), 0);
    return 0;
}

static void on_acquired(mg_pool_acquire_t *req, int status)
{
    mg_exchange_t *x = req->data;
    x->acquiring = false;
    waiting_remove(x);
    if (status == 0)
        status = link_start(x, req->conn);
    if (status != 0)
        exchange_fail(x, status, "%s", req->error[0] ? req->error : mg_strerror(status));
}

/* Takes a lease and opens a channel; returns 0 (maybe still waiting) or why not. */
static int exchange_acquire(mg_exchange_t *x)
{
    x->acq.data = x;
    x->acquiring = true;
    int rc = mg_pool_acquire(x->px->pool, &x->acq, x->user, (void *)x->req.route, on_acquired);
    if (rc == MG_EAGAIN) {
        waiting_add(x);
        return 0;
    }
    x->acquiring = false;
    if (rc == 0)
        rc = link_start(x, x->acq.conn);
    return rc;
}

static void exchange_retry(mg_exchange_t *x)
{
    /* What was sent before (head and the body so far) goes again, in order. */
    x->retried = true;
    x->px->retried++;
    x->head_off = 0;
    if (mg__buf_append(&x->head, x->replay.data, x->replay.len) != 0) {
        exchange_fail(x, MG_ENOMEM, "out of memory");
        return;
    }
    mg__buf_free(&x->replay);
    mg_log_debug("proxy", "user=%s the reused channel closed before a response; retrying on "
                 "a fresh one", x->user);
    int rc = exchange_acquire(x);
    if (rc != 0)
        exchange_fail(x, rc, "%s", x->acq.error[0] ? x->acq.error : mg_strerror(rc));
}

/* Sends what is pending of the head (after a retry, with the body sent before). */
static void exchange_send(mg_exchange_t *x)
{
    link_t *l = x->link;
    if (l == NULL || !l->open || l->closing)
        return;
    while (x->head_off < x->head.len) {
        ssize_t n = mg_ssh_chan_write(l->ch, x->head.data + x->head_off,
                                      x->head.len - x->head_off);
        if (n == MG_EAGAIN)
            return;
        if (n < 0) {
            link_close(l);
            return;
        }
        x->head_off += (size_t)n;
    }
    if (x->want_body && !x->body_done) {
        x->want_body = false;
        x->cbs->on_body_writable(x);
    }
}

/* ---- public API ---- */

int mg_proxy_new(uv_loop_t *loop, mg_pool_t *pool, const mg_proxy_opts_t *o, mg_proxy_t **out)
{
    mg_proxy_t *px = calloc(1, sizeof(*px));
    if (px == NULL)
        return MG_ENOMEM;
    mg_list_init(&px->idle);
    px->loop = loop;
    px->pool = pool;
    px->opts = *o;
    *out = px;
    return 0;
}

void mg_proxy_drain(mg_proxy_t *px)
{
    px->draining = true;
    while (!mg_list_empty(&px->idle))
        link_close(mg_list_entry(mg_list_first(&px->idle), link_t, node));
}

void mg_proxy_free(mg_proxy_t *px)
{
    mg_proxy_drain(px);
    px->freeing = true;
    if (px->links == 0)
        free(px);
}

void mg_proxy_stats(const mg_proxy_t *px, mg_proxy_stats_t *out)
{
    *out = (mg_proxy_stats_t){
        .exchanges = px->exchanges,
        .reused = px->reused,
        .retried = px->retried,
        .active = px->active,
        .idle_channels = px->idle_count,
    };
}

int mg_exchange_start(mg_proxy_t *px, const mg_exchange_req_t *req,
                      const mg_exchange_cbs_t *cbs, void *data, mg_exchange_t **out,
                      char *err, size_t errlen)
{
    if (!mg_pool_user_id_valid(req->user) || req->target_host == NULL || req->head == NULL ||
        req->method == NULL || strlen(req->target_host) >= sizeof(((mg_exchange_t *)0)->target_host)) {
        snprintf(err, errlen, "invalid exchange");
        return MG_EINVAL;
    }
    mg_exchange_t *x = calloc(1, sizeof(*x));
    if (x == NULL || mg__buf_append(&x->head, req->head, req->head_len) != 0) {
        free(x);
        snprintf(err, errlen, "out of memory");
        return MG_ENOMEM;
    }
    x->px = px;
    x->cbs = cbs;
    x->data = data;
    x->req = *req;
    snprintf(x->user, sizeof(x->user), "%s", req->user);
    snprintf(x->target_host, sizeof(x->target_host), "%s", req->target_host);
    snprintf(x->method, sizeof(x->method), "%s", req->method);
    x->req.user = x->user;
    x->req.target_host = x->target_host;
    x->req.method = x->method;
    x->req.head = NULL;
    x->body_done = !req->has_body;
    px->active++;
    px->exchanges++;

    link_t *l = idle_find(px, x->user, x->target_host, req->target_port);
    if (l != NULL) {
        idle_unlink(l);
        link_reuse(l, x);
        *out = x;
        return 0;
    }
    int rc = exchange_acquire(x);
    if (rc != 0) {
        snprintf(err, errlen, "%s", x->acq.error[0] ? x->acq.error : mg_strerror(rc));
        exchange_free(x);
        return rc;
    }
    *out = x;
    return 0;
}

ssize_t mg_exchange_write_body(mg_exchange_t *x, const char *buf, size_t len)
{
    if (x->done || x->aborted || x->body_done)
        return MG_ESTATE;
    link_t *l = x->link;
    if (l == NULL || !l->open || l->closing || x->head_off < x->head.len) {
        x->want_body = true;
        return MG_EAGAIN;
    }
    ssize_t n = mg_ssh_chan_write(l->ch, buf, len);
    if (n == MG_EAGAIN) {
        x->want_body = true;
        return MG_EAGAIN;
    }
    if (n < 0)
        return MG_ESTATE;
    if (!x->replay_lost) {
        if (x->replay.len + (size_t)n > x->px->opts.replay_max ||
            mg__buf_append(&x->replay, buf, (size_t)n) != 0) {
            x->replay_lost = true;
            mg__buf_free(&x->replay);
        }
    }
    return n;
}

void mg_exchange_end_body(mg_exchange_t *x)
{
    x->body_done = true;
}

void mg_exchange_pause(mg_exchange_t *x)
{
    x->paused = true;
    if (x->link) {
        mg_ssh_chan_read_stop(x->link->ch);
        /* A client that reads slowly is not an upstream that went quiet. */
        if (x->got_head && x->req.idle_timeout_ms)
            uv_timer_stop(&x->link->timer);
    }
}

void mg_exchange_resume(mg_exchange_t *x)
{
    x->paused = false;
    if (x->link) {
        mg_ssh_chan_read_start(x->link->ch);
        idle_deadline(x->link, x);
    }
}

void mg_exchange_abort(mg_exchange_t *x)
{
    if (x->done)
        return;
    x->aborted = true;
    if (x->acquiring) {
        mg_pool_acquire_cancel(&x->acq);
        x->acquiring = false;
        waiting_remove(x);
    }
    if (x->link) {
        link_t *l = x->link;
        l->x = NULL;
        x->link = NULL;
        link_close(l);
    }
    exchange_finish(x, MG_ECANCELED, "aborted");
}

void *mg_exchange_data(const mg_exchange_t *x)
{
    return x->data;
}

bool mg_exchange_got_head(const mg_exchange_t *x)
{
    return x->got_head;
}

uint64_t mg_exchange_conn_id(const mg_exchange_t *x)
{
    return x->conn_id;
}
