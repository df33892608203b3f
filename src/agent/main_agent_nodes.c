/*
 * moongate-agent: which gateway addresses get WebSockets. A --gateway with an address literal is
 * one node for the whole run. One with a name is a node per address it resolves to
 * (agent_addrs.h), looked up again every --resolve-interval seconds (main_agent_resolve.c):
 *
 *   an address appears         a node, dialled at once ("gateway node added: URL at ADDR")
 *   an address disappears      the node is retired ("gateway node removed: ..."): no new
 *                              WebSocket, no reconnect; its WebSockets close as they finish
 *                              (RETIRE_QUIET_MS), and it is freed with its last conn
 *   it comes back before then  the retired node serves again
 *   a lookup fails             nothing changes; with no node yet, the next one follows the
 *                              reconnect backoff, else the interval
 *
 * A node is freed only once no conn points at it, its timer is closed and no failure probe
 * holds it: retired, or at the end of the run.
 */
#include "main_agent_tunnel.h"

#include "moongate/error.h"
#include "moongate/log.h"
#include "moongate/tunnel_protocol.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* A node whose address left its name's answer drains: a WebSocket that carries no SSH stream
   closes at once, one that does once no byte went either way for RETIRE_QUIET_MS (the stream
   is taken as finished; the gateway's SSH keepalives come every 60 s), and any at the latest
   RETIRE_MAX_MS after the address left. */
#define RETIRE_QUIET_MS 10000
#define RETIRE_MAX_MS (10 * 60 * 1000)
#define RETIRE_TICK_MS 1000
#define RETIRE_REASON "gateway node left DNS"

static void on_node_timer_closed(uv_handle_t *h)
{
    node_t *nd = h->data;
    nd->timer_closed = true;
    mg__agent_node_maybe_free(nd);
}

/* A retired node goes once nothing points at it; the others live as long as the agent. */
void mg__agent_node_maybe_free(node_t *nd)
{
    if (nd->refs > 0 || nd->probing || (!nd->retired && !nd->a->finished))
        return;
    if (!nd->timer_closed) {
        if (!uv_is_closing((uv_handle_t *)&nd->reconnect_timer))
            uv_close((uv_handle_t *)&nd->reconnect_timer, on_node_timer_closed);
        return;
    }
    mg_list_remove(&nd->link);
    free(nd);
}

/* addr NULL: the URL's own host, an address literal. Returns the node, or NULL (no memory). */
static node_t *node_add(gateway_t *gw, const mg_agent_addr_t *addr)
{
    mg_agent_t *a = gw->a;
    size_t cap = strlen(gw->text) + sizeof(addr->text) + 8;
    node_t *nd = calloc(1, sizeof(*nd) + cap);
    if (nd == NULL)
        return NULL;
    nd->a = a;
    nd->gw = gw;
    nd->url = gw->url;
    if (addr != NULL) {
        nd->addr = *addr;
        nd->connect_host = nd->addr.text;
        snprintf(nd->gateway, cap, "%s at %s", gw->text, addr->text);
    } else {
        nd->connect_host = gw->url->host;
        snprintf(nd->gateway, cap, "%s", gw->text);
    }
    mg_agent_backoff_init(&nd->backoff, MG_AGENT_BACKOFF_BASE_MS, MG_AGENT_BACKOFF_MAX_MS,
                          mg__agent_random_u32, NULL);
    uv_timer_init(a->loop, &nd->reconnect_timer);
    nd->reconnect_timer.data = nd;
    mg_list_insert_tail(&gw->nodes, &nd->link);
    return nd;
}

/* Closes the retired node's WebSockets that are done: see RETIRE_QUIET_MS. */
static void node_drain(node_t *nd)
{
    mg_agent_t *a = nd->a;
    uint64_t now = mg__agent_now_ms(a);
    bool overdue = now - nd->retired_ms >= RETIRE_MAX_MS;
    for (conn_t *c = a->conns, *next; c != NULL; c = next) {
        next = c->next;
        if (c->node != nd || c->ws_done || c->close_pending)
            continue;
        bool idle = !c->established || !c->local_started ||
                    now - c->last_io_ms >= RETIRE_QUIET_MS;
        if (!idle && !overdue)
            continue;
        if (!idle)
            mg_log_warn(COMP, "websocket %u: still busy %d s after %s left DNS; closing it",
                        c->n, RETIRE_MAX_MS / 1000, nd->gateway);
        mg__agent_conn_close(c, MG_TUNNEL_CLOSE_NORMAL, RETIRE_REASON);
    }
}

static void on_drain_tick(uv_timer_t *t)
{
    node_drain(t->data);
}

static void node_retire(node_t *nd)
{
    nd->retired = true;
    nd->retired_ms = mg__agent_now_ms(nd->a);
    mg_log_info(COMP, "gateway node removed: %s (%s no longer resolves to it); its %d "
                      "WebSocket(s) close once idle", nd->gateway, nd->url->host, nd->n_ws);
    uv_timer_stop(&nd->reconnect_timer);
    nd->refs++; /* node_drain may free the last conn */
    node_drain(nd);
    nd->refs--;
    if (nd->refs > 0)
        uv_timer_start(&nd->reconnect_timer, on_drain_tick, RETIRE_TICK_MS, RETIRE_TICK_MS);
    mg__agent_node_maybe_free(nd);
}

/* The address came back before its retired node was gone: the node serves again. */
static void node_unretire(node_t *nd)
{
    nd->retired = false;
    uv_timer_stop(&nd->reconnect_timer);
    mg_log_info(COMP, "gateway node added: %s (back in %s's addresses)", nd->gateway,
                nd->url->host);
    mg_agent_backoff_reset(&nd->backoff);
    nd->attempt = 0;
    if (nd->n_ws == 0)
        mg__agent_open_ws(nd, false);
}

static int live_nodes(const gateway_t *gw)
{
    int n = 0;
    mg_list_t *l;
    mg_list_foreach(l, &gw->nodes)
        n += !mg_list_entry(l, node_t, link)->retired;
    return n;
}

/* A retired node of gw for addr that can still serve again, or NULL. */
static node_t *find_retired(gateway_t *gw, const mg_agent_addr_t *addr)
{
    mg_list_t *l;
    mg_list_foreach(l, &gw->nodes) {
        node_t *nd = mg_list_entry(l, node_t, link);
        if (nd->retired && !uv_is_closing((uv_handle_t *)&nd->reconnect_timer) &&
            mg_agent_addr_equal(&nd->addr, addr))
            return nd;
    }
    return NULL;
}

/* The name of gw resolved (or did not): its node set follows the answer (agent_addrs.h). */
static void on_gateway_resolved(void *arg, int status, const mg_agent_addr_t *addrs, int n)
{
    gateway_t *gw = arg;
    mg_agent_t *a = gw->a;
    uint64_t interval = (uint64_t)a->args->resolve_interval_s * 1000;
    if (a->stopping)
        return;
    int live = live_nodes(gw);
    if (status != 0) {
        /* A failed lookup says nothing about the nodes: they keep their tunnels. */
        if (status != gw->resolve_status) {
            if (live > 0)
                mg_log_warn(COMP, "cannot resolve %s (%s): keeping its %d node(s)",
                            gw->url->host, uv_strerror(status), live);
            else
                mg_log_warn(COMP, "cannot connect to %s: cannot resolve %s (%s)", gw->text,
                            gw->url->host, uv_strerror(status));
        }
        gw->resolve_status = status;
        mg_agent_resolver_next(gw->resolver, live > 0 ? interval
                                                      : mg_agent_backoff_next(&gw->backoff));
        return;
    }
    if (gw->resolve_status != 0)
        mg_log_info(COMP, "%s resolves again", gw->url->host);
    gw->resolve_status = 0;
    mg_agent_backoff_reset(&gw->backoff);

    node_t *cur[MG_AGENT_ADDRS_MAX];
    mg_agent_addr_t cur_addr[MG_AGENT_ADDRS_MAX], add[MG_AGENT_ADDRS_MAX];
    bool keep[MG_AGENT_ADDRS_MAX];
    int n_cur = 0, n_add = 0;
    mg_list_t *l;
    mg_list_foreach(l, &gw->nodes) {
        node_t *nd = mg_list_entry(l, node_t, link);
        if (!nd->retired && n_cur < MG_AGENT_ADDRS_MAX) {
            cur[n_cur] = nd;
            cur_addr[n_cur++] = nd->addr;
        }
    }
    int left_out = mg_agent_addrs_plan(cur_addr, n_cur, addrs, n, MG_AGENT_ADDRS_MAX, keep,
                                       add, &n_add);
    if (left_out != gw->left_out && left_out > 0)
        mg_log_warn(COMP, "%s resolves to more than %d addresses: %d of them get no tunnel "
                          "(at most %d nodes per name; give the others their own --gateway)",
                    gw->url->host, MG_AGENT_ADDRS_MAX, left_out, MG_AGENT_ADDRS_MAX);
    gw->left_out = left_out;
    for (int i = 0; i < n_cur; i++)
        if (!keep[i])
            node_retire(cur[i]);
    for (int k = 0; k < n_add; k++) {
        node_t *nd = find_retired(gw, &add[k]);
        if (nd != NULL) {
            node_unretire(nd);
            continue;
        }
        if ((nd = node_add(gw, &add[k])) == NULL) {
            mg_log_error(COMP, "out of memory adding a gateway node");
            break;
        }
        mg_log_info(COMP, "gateway node added: %s", nd->gateway);
        mg__agent_open_ws(nd, false);
    }
    mg_agent_resolver_next(gw->resolver, interval);
}

int mg__agent_gateway_start(gateway_t *gw)
{
    if (!mg_agent_host_is_literal(gw->url->host))
        return mg_agent_resolver_start(gw->a->loop, gw->url->host, on_gateway_resolved, gw,
                                       &gw->resolver) == 0 ? 0 : MG_ENOMEM;
    node_t *nd = node_add(gw, NULL);
    if (nd == NULL)
        return MG_ENOMEM;
    mg__agent_open_ws(nd, false);
    return 0;
}

void mg__agent_nodes_stop(mg_agent_t *a)
{
    for (int i = 0; i < a->n_gateways; i++) {
        gateway_t *gw = &a->gateways[i];
        if (gw->resolver != NULL) {
            mg_agent_resolver_close(gw->resolver);
            gw->resolver = NULL;
        }
        mg_list_t *l;
        mg_list_foreach(l, &gw->nodes)
            uv_timer_stop(&mg_list_entry(l, node_t, link)->reconnect_timer);
    }
}

void mg__agent_nodes_close(mg_agent_t *a)
{
    for (int i = 0; i < a->n_gateways; i++) {
        mg_list_t *l, *tmp;
        mg_list_foreach_safe(l, tmp, &a->gateways[i].nodes) {
            node_t *nd = mg_list_entry(l, node_t, link);
            if (!uv_is_closing((uv_handle_t *)&nd->reconnect_timer))
                uv_close((uv_handle_t *)&nd->reconnect_timer, on_node_timer_closed);
        }
    }
}

void mg__agent_nodes_free(mg_agent_t *a)
{
    for (int i = 0; i < a->n_gateways; i++) {
        mg_list_t *l, *tmp;
        mg_list_foreach_safe(l, tmp, &a->gateways[i].nodes) {
            mg_list_remove(l);
            free(mg_list_entry(l, node_t, link));
        }
    }
}
