/*
 * gateway: the whole moongate process as one object on one libuv loop.
 *
 * It wires the modules together: settings, the policy (LuaJIT hooks), the pool of SSH
 * connections with its SSH backend and cleanup service, the proxy that runs HTTP exchanges
 * over pooled channels, the HTTP front end (libwebsockets), and the metrics. The program
 * moongate is this object plus a command line and signal handlers; tests may embed it.
 *
 * Lifecycle: mg_gateway_new() builds and starts serving; mg_gateway_reload() swaps the policy
 * (SIGHUP); mg_gateway_drain() runs the shutdown sequence (SIGTERM): /healthz turns 503, new
 * requests are refused with 503, requests in flight finish within the shutdown hook's grace
 * period, SSH sessions disconnect, the front end closes, and on_drained is called. Then
 * mg_gateway_free().
 */
#ifndef MOONGATE_GATEWAY_H
#define MOONGATE_GATEWAY_H

#include "moongate/cleanup.h"
#include "moongate/metrics.h"
#include "moongate/policy.h"
#include "moongate/pool.h"
#include "moongate/proxy.h"
#include "moongate/settings.h"
#include "moongate/shutdown.h"
#include "moongate/ssh_backend.h"

#include <stdbool.h>
#include <stdint.h>
#include <uv.h>

typedef struct mg_gateway mg_gateway_t;
typedef struct mg_front mg_front_t;
typedef struct mg_tunnel mg_tunnel_t;

#define MG_FORWARD_HEADERS_MAX 32

typedef struct mg_gateway_opts {
    const char *policy_path;      /* NULL: the built-in default policy */
    const char *listen_host;      /* "127.0.0.1" */
    int listen_port;              /* 8080; 0 picks a free port (see mg_gateway_port()) */
    const char *tls_cert;         /* PEM files; both or neither */
    const char *tls_key;
    uint64_t max_body_bytes;      /* request bodies larger than this get 413; 10 MiB */
    uint32_t header_timeout_s;    /* a request head must arrive within this; 10 */
    uint32_t send_timeout_s;      /* a client that takes none of its response this long is
                                     cut, freeing the channel it holds; 60 */
    uint64_t upstream_head_timeout_ms; /* 120000 */
    uint64_t upstream_keepalive_ms;    /* idle channel reuse window; 10000 */
    const char *admin_token;      /* if set, /metrics and /stats need "Bearer TOKEN"; else
                                     they answer loopback clients only */
    /* Header names (lower case) forwarded besides the ones libwebsockets knows; see README. */
    const char *forward_headers[MG_FORWARD_HEADERS_MAX];
    int nforward_headers;
} mg_gateway_opts_t;

struct mg_gateway {
    /* read-only for the modules that are part of the gateway */
    uv_loop_t *loop;
    mg_settings_t settings;
    mg_gateway_opts_t opts;
    mg_policy_t *policy;
    mg_pool_t *pool;
    mg_ssh_backend_t backend;
    mg_cleanup_t *cleanup;
    mg_proxy_t *proxy;
    mg_front_t *front;
    mg_tunnel_t *tunnel;
    mg_metrics_t *metrics_reg;
    mg_gateway_metrics_t metrics;
    mg_shutdown_t shutdown;
    bool draining;
    char drain_message[256];
    uint64_t started_ms;
    int in_flight;                /* requests being served */
    /* private */
    void (*on_drained)(mg_gateway_t *gw, const mg_shutdown_result_t *result);
    uint64_t flush_deadline;
};

/*
 * Fills opts with the defaults, then the environment: MOONGATE_LISTEN (host:port),
 * MOONGATE_TLS_CERT, MOONGATE_TLS_KEY, MOONGATE_MAX_BODY, MOONGATE_HEADER_TIMEOUT,
 * UPSTREAM_HEAD_TIMEOUT, UPSTREAM_KEEPALIVE, MOONGATE_ADMIN_TOKEN, MOONGATE_FORWARD_HEADERS
 * (comma-separated). Returns 0 or MG_ECONFIG with a message naming the variable.
 */
int mg_gateway_opts_from_env(mg_gateway_opts_t *o, char *err, size_t errlen);

/* Parses "host:port" (or ":port", or "[v6]:port") into o. Returns 0 or MG_EINVAL. */
int mg_gateway_parse_listen(mg_gateway_opts_t *o, const char *addr, char *host, size_t hostlen);

/*
 * Builds everything and starts listening. Returns 0 and *out, or a negative code with a
 * message (a policy that does not load, a port in use, a bad certificate...).
 */
int mg_gateway_new(uv_loop_t *loop, const mg_settings_t *settings, const mg_gateway_opts_t *o,
                   mg_gateway_t **out, char *err, size_t errlen);

/* The port the front end listens on. */
int mg_gateway_port(const mg_gateway_t *gw);

/* Reloads the policy file. Returns 0, or an error with "FILE:LINE: message" in err. */
int mg_gateway_reload(mg_gateway_t *gw, char *err, size_t errlen);

/* Starts the drain (see above); on_drained is called once, when it is over. */
void mg_gateway_drain(mg_gateway_t *gw, const char *why,
                      void (*on_drained)(mg_gateway_t *gw, const mg_shutdown_result_t *result));

/* Frees everything (after on_drained). Handles close asynchronously: run the loop after. */
void mg_gateway_free(mg_gateway_t *gw);

/* ---- between the gateway and its front end (front.c) ---- */

int mg__front_new(mg_gateway_t *gw, mg_front_t **out, char *err, size_t errlen);
int mg__front_port(const mg_front_t *f);
mg_gateway_t *mg__front_gateway(const mg_front_t *f);
/* /stats: the pool with each connection, channel reuse, cleanup, shutdown, policy memory. */
struct mg_json;
void mg__gateway_render_stats(mg_gateway_t *gw, struct mg_json *j);
void mg__front_free(mg_front_t *f);

/* ---- between the gateway, its front end and the agent endpoint (tunnel.c) ---- */

struct lws;
int mg__tunnel_new(mg_gateway_t *gw, mg_tunnel_t **out);
/* 0: let the WebSocket upgrade go on; 1: refused (a status was sent). */
int mg__tunnel_confirm_upgrade(mg_gateway_t *gw, struct lws *wsi);
int mg__tunnel_agent_open(void *arg, mg_pool_conn_t *pc, const mg_ssh_conn_opts_t *o,
                          mg_ssh_conn_cb cb, char *err, size_t errlen);
void mg__tunnel_agent_cancel(void *arg, mg_pool_conn_t *pc);
void mg__tunnel_drain(mg_tunnel_t *t);
int mg__tunnel_count(const mg_tunnel_t *t);
void mg__tunnel_free(mg_tunnel_t *t);

#endif
