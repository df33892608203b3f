/*
 * admin: the gateway's own endpoints. GET /healthz (200, or 503 while draining), /readyz
 * (JSON: whether to send it traffic, and if not why: 200 or 503), /metrics
 * (Prometheus text) and /stats (JSON: the pool with each connection, channel reuse, cleanup,
 * shutdown, policy memory). /metrics and /stats answer loopback clients only, or, when an
 * admin token is set, whoever sends "Authorization: Bearer TOKEN" (compared in constant time).
 */
#ifndef MOONGATE_ADMIN_H
#define MOONGATE_ADMIN_H

#include "moongate/cleanup.h"
#include "moongate/metrics.h"
#include "moongate/policy.h"
#include "moongate/pool.h"
#include "moongate/proxy.h"
#include "moongate/shutdown.h"
#include "request.h"
#include "server.h"

/* Where the answers come from; the gateway owns it. */
typedef struct mg_admin_env {
    mg_req_env_t *req;          /* draining, and the request accounting */
    mg_metrics_t *registry;
    const char *admin_token;    /* NULL or "": loopback only */
    mg_pool_t *pool;
    mg_cleanup_t *cleanup;
    mg_shutdown_t *shutdown;
    mg_proxy_t *proxy;
    mg_policy_t *policy;
    uint64_t started_ms;        /* wall clock */
    mg_server_t *server;        /* for /readyz: its connections against max_clients */
    int max_clients;
    bool reload_failed;         /* the last reload was refused (the old policy serves) */
    char reload_error[512];     /* and why, shown to admin clients only */
} mg_admin_env_t;

/* True if target (as received) names one of the endpoints. */
bool mg_admin_match(const char *target, size_t len);

/* Answers head in full (mg_server_handler_t.on_request); returns NULL. */
mg_server_req_t *mg_admin_serve(mg_admin_env_t *a, mg_client_t *c, const mg_http1_req_head_t *h);

#endif
