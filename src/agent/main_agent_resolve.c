/*
 * The periodic look at what a --gateway name resolves to, off the loop: uv_getaddrinfo runs the
 * system resolver (/etc/hosts, DNS, as nsswitch.conf says) on libuv's thread pool, and the
 * answer comes back on the loop, reduced to a node set's candidates (agent_addrs.h). One
 * resolve at a time; the caller says when the next one is due.
 */
#include "main_agent.h"

#include <stdlib.h>
#include <string.h>

struct mg_agent_resolver {
    uv_loop_t *loop;
    uv_timer_t timer;
    uv_getaddrinfo_t gai;
    bool busy;              /* a resolve is on the thread pool */
    bool closing;
    int refs;               /* the timer handle, and the resolve while busy */
    mg_agent_resolved_fn fn;
    void *arg;
    char host[256];
};

static void release(mg_agent_resolver_t *r)
{
    if (--r->refs == 0)
        free(r);
}

static void on_timer_closed(uv_handle_t *h)
{
    release(h->data);
}

static void on_resolved(uv_getaddrinfo_t *req, int status, struct addrinfo *res)
{
    mg_agent_resolver_t *r = req->data;
    r->busy = false;
    if (r->closing) {
        uv_freeaddrinfo(res);
        release(r);
        return;
    }
    r->refs--; /* the resolve is over; the timer still holds r */
    mg_agent_addr_t addrs[MG_AGENT_ADDRS_SEEN];
    int n = status == 0 ? mg_agent_addrs_pick(res, addrs, MG_AGENT_ADDRS_SEEN) : 0;
    uv_freeaddrinfo(res);
    if (status == 0 && n == 0)
        status = UV_EAI_NODATA; /* an answer with nothing we can dial */
    r->fn(r->arg, status, addrs, n);
}

static void on_timer(uv_timer_t *t)
{
    mg_agent_resolver_t *r = t->data;
    if (r->busy || r->closing)
        return;
    struct addrinfo hints;
    memset(&hints, 0, sizeof(hints));
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    r->gai.data = r;
    int rc = uv_getaddrinfo(r->loop, &r->gai, on_resolved, r->host, NULL, &hints);
    if (rc != 0) {
        r->fn(r->arg, rc, NULL, 0);
        return;
    }
    r->busy = true;
    r->refs++;
}

int mg_agent_resolver_start(uv_loop_t *loop, const char *host, mg_agent_resolved_fn fn,
                            void *arg, mg_agent_resolver_t **out)
{
    mg_agent_resolver_t *r = calloc(1, sizeof(*r));
    if (r == NULL || strlen(host) >= sizeof(r->host)) {
        free(r);
        return -1;
    }
    r->loop = loop;
    r->fn = fn;
    r->arg = arg;
    memcpy(r->host, host, strlen(host) + 1);
    uv_timer_init(loop, &r->timer);
    r->timer.data = r;
    r->refs = 1;
    /* From the loop, never from the caller's stack. */
    uv_timer_start(&r->timer, on_timer, 0, 0);
    *out = r;
    return 0;
}

void mg_agent_resolver_next(mg_agent_resolver_t *r, uint64_t delay_ms)
{
    if (!r->closing)
        uv_timer_start(&r->timer, on_timer, delay_ms, 0);
}

void mg_agent_resolver_close(mg_agent_resolver_t *r)
{
    if (r->closing)
        return;
    r->closing = true;
    /* A resolve already running on the pool cannot be stopped: its answer is dropped. */
    if (r->busy)
        uv_cancel((uv_req_t *)&r->gai);
    uv_close((uv_handle_t *)&r->timer, on_timer_closed);
}
