/*
 * tunnel: the agent endpoint (docs/tunnel.md). GET /tunnel with a WebSocket upgrade from a
 * user's moongate-agent becomes, once its token is admitted by the policy's agent_auth, the
 * transport under one SSH connection in that user's pool.
 *
 * The upgrade arrives through the HTTP server, which then hands over the connection as a byte
 * stream (plain or TLS); the WebSocket framing on it is wslay's. A tunnel arrives "spare" and
 * waits until the pool needs a connection for its user; when the pool needs one and no spare
 * tunnel is there, the open waits while one of the user's agents is asked, with a control
 * message, to open one more WebSocket.
 */
#ifndef MOONGATE_TUNNEL_H
#define MOONGATE_TUNNEL_H

#include "moongate/metrics.h"
#include "moongate/policy.h"
#include "moongate/pool.h"
#include "moongate/ssh_conn.h"
#include "server.h"

#include <stdbool.h>
#include <uv.h>

typedef struct mg_tunnel mg_tunnel_t;

/* What the endpoint needs of the gateway. The gateway owns it and keeps it current. */
typedef struct mg_tunnel_env {
    uv_loop_t *loop;
    mg_policy_t *policy;
    mg_pool_t *pool;
    const mg_settings_t *settings;
    mg_gauge_t *agent_connections;   /* moongate_agent_connections */
    const char *drain_message;       /* the close reason while draining */
} mg_tunnel_env_t;

int mg_tunnel_new(mg_tunnel_env_t *env, mg_tunnel_t **out);

/* True if target (as received) is the endpoint's. */
bool mg_tunnel_match(const char *target, size_t len);

/* Answers an agent's upgrade (or refuses it) in full; returns NULL (mg_server_handler_t). */
mg_server_req_t *mg_tunnel_serve(mg_tunnel_t *t, mg_client_t *c, const mg_http1_req_head_t *h);

/* The SSH backend's hooks for transport = "agent" (mg_ssh_backend_t). */
int mg_tunnel_agent_open(void *arg, mg_pool_conn_t *pc, const mg_ssh_conn_opts_t *o,
                         mg_ssh_conn_cb cb, char *err, size_t errlen);
void mg_tunnel_agent_cancel(void *arg, mg_pool_conn_t *pc);

/* Closes spare tunnels with 1000 and the drain message; no new ones are accepted. */
void mg_tunnel_drain(mg_tunnel_t *t);

/* Agent WebSockets open. */
int mg_tunnel_count(const mg_tunnel_t *t);

/* Frees the endpoint once the server has closed every connection (and so every tunnel). */
void mg_tunnel_free(mg_tunnel_t *t);

#endif
