#include "moongate/ssh_backend.h"

#include "moongate/error.h"

#include <stdio.h>

static void on_conn_event(mg_ssh_conn_t *c, mg_ssh_event_t ev, void *data)
{
    mg_pool_conn_t *pc = data;
    const mg_ssh_backend_t *b = mg_pool_conn_backend_ctx(pc);
    if (b->observer)
        b->observer(b->observer_arg, c, ev);
    switch (ev) {
    case MG_SSH_EV_READY:
        mg_pool_conn_ready(pc);
        break;
    case MG_SSH_EV_HEALTH:
        mg_pool_conn_set_healthy(pc, mg_ssh_conn_healthy(c));
        break;
    case MG_SSH_EV_CLOSED:
        mg_pool_conn_set_backend_data(pc, NULL);
        /* A connection that never became ready failed to open; the pool backs off for those. */
        if (mg_ssh_conn_was_ready(c))
            mg_pool_conn_closed(pc, mg_ssh_conn_status(c), mg_ssh_conn_error(c));
        else
            mg_pool_conn_failed(pc, mg_ssh_conn_status(c) ? mg_ssh_conn_status(c) : MG_ECLOSED,
                                mg_ssh_conn_error(c));
        break;
    }
}

static int backend_open(void *ctx, mg_pool_conn_t *pc, const char *user, void *open_arg,
                        char *err, size_t errlen)
{
    mg_ssh_backend_t *b = ctx;
    const mg_ssh_conn_opts_t *route = open_arg;
    if (route == NULL) {
        snprintf(err, errlen, "no route for user %s", user);
        return MG_EINVAL;
    }
    mg_ssh_conn_opts_t o = *route;
    o.user = user;
    o.id = mg_pool_conn_id(pc);
    if (o.agent) {
        if (b->agent_open == NULL) {
            snprintf(err, errlen, "no agent endpoint for user %s", user);
            return MG_ECONNECT;
        }
        return b->agent_open(b->agent_arg, pc, &o, on_conn_event, err, errlen);
    }
    mg_ssh_conn_t *c;
    int rc = mg_ssh_conn_start(b->loop, &o, NULL, on_conn_event, pc, &c);
    if (rc != 0) {
        snprintf(err, errlen, "cannot start a connection to %s:%d: %s",
                 route->host ? route->host : "?", route->port, mg_strerror(rc));
        return rc;
    }
    mg_pool_conn_set_backend_data(pc, c);
    return 0;
}

static void backend_close(void *ctx, mg_pool_conn_t *pc, bool force, const char *reason)
{
    mg_ssh_backend_t *b = ctx;
    mg_ssh_conn_t *c = mg_pool_conn_backend_data(pc);
    if (c != NULL)
        mg_ssh_conn_close(c, reason, force ? 0 : b->close_wait_ms);
    else if (b->agent_cancel != NULL)
        b->agent_cancel(b->agent_arg, pc);
}

/* A TCP route's server is its host:port; an agent's sshd serves its own user only. */
static bool backend_server(void *ctx, void *open_arg, char *out, size_t cap)
{
    const mg_ssh_conn_opts_t *route = open_arg;
    if (route == NULL || route->agent || route->host == NULL)
        return false;
    int n = snprintf(out, cap, "%s:%d", route->host, route->port);
    return n > 0 && (size_t)n < cap;
}

static void backend_trim(void *ctx, mg_pool_conn_t *pc)
{
    mg_ssh_conn_t *c = mg_pool_conn_backend_data(pc);
    if (c != NULL)
        mg_ssh_conn_trim(c);
}

const mg_pool_backend_t mg_ssh_pool_backend = {
    .open = backend_open,
    .close = backend_close,
    .server = backend_server,
    .trim = backend_trim,
};

void mg_ssh_backend_init(mg_ssh_backend_t *b, uv_loop_t *loop, const mg_settings_t *settings)
{
    b->loop = loop;
    b->close_wait_ms = settings->shutdown_grace_ms;
}

mg_ssh_conn_t *mg_ssh_backend_conn(const mg_pool_conn_t *pc)
{
    return mg_pool_conn_backend_data(pc);
}
