/*
 * request: one client request, whatever protocol carried it.
 *
 * The HTTP server hands over a parsed head (mg_req_start()); from there this module runs the
 * request to its end: the policy's authenticate, admit and route on the state pinned for the
 * request, the exchange with the user's upstream over a pooled SSH channel (the target and the
 * fields forwarded as received, the body streamed with backpressure, re-framed), the response
 * streamed back through the mg_client_t, the error responses, the access log line and the
 * request metrics. It sees the gateway only through mg_req_env_t.
 */
#ifndef MOONGATE_REQUEST_H
#define MOONGATE_REQUEST_H

#include "moongate/metrics.h"
#include "moongate/policy.h"
#include "moongate/proxy.h"
#include "moongate/settings.h"
#include "moongate/shutdown.h"
#include "llm/llm_metrics.h"
#include "server.h"
#include "llm/usage.h"

#include <stdbool.h>
#include <stdint.h>

/* What requests need of the gateway. The gateway owns it and keeps it current. */
typedef struct mg_req_env {
    mg_policy_t *policy;
    mg_proxy_t *proxy;
    const mg_settings_t *settings;
    mg_gateway_metrics_t *metrics;
    mg_llm_metrics_t *llm;       /* tokens and models; NULL: not counted */
    uint64_t max_body_bytes;     /* a larger body gets 413 */
    bool draining;               /* new requests get 503 */
    bool lame_duck;              /* draining soon: /healthz and /readyz say 503, requests are
                                    still served */
    const char *drain_message;
    const mg_shutdown_t *shutdown; /* the drain: a stream it cuts is logged as its doing */
    int in_flight;               /* read-only to the gateway: requests being served */
} mg_req_env_t;

/* Serves head (mg_server_handler_t.on_request). Never NULL. */
mg_server_req_t *mg_req_start(mg_req_env_t *env, mg_client_t *c, const mg_http1_req_head_t *head);

/* The request's id: the client's X-Request-Id when it is valid, else a new one. */
void mg_req_id(const mg_http1_req_head_t *head, char out[MG_HTTP1_REQUEST_ID_MAX + 1]);

/*
 * A complete local response: status, Content-Type ctype, body, the decision's headers (may be
 * NULL), Cache-Control: no-store and X-Request-Id.
 */
void mg_req_respond(mg_client_t *c, const char *request_id, int status, const char *ctype,
                    const char *body, size_t len, const mg_policy_decision_t *d);

/* Adds "Retry-After: seconds" to d (when it has room): the one place a refusal that may pass
   (overload, a drain, a full queue) says when to come back. */
void mg_req_retry_after(mg_policy_decision_t *d, const char *seconds);

/* The error shape for a request to target: f, or when f is AUTO, OpenAI's under /v1 and the
   plain one elsewhere (docs/policy.md, "Error bodies"). */
mg_error_format_t mg_req_error_format(mg_error_format_t f, const char *target, size_t len);

/*
 * An error as JSON in format (not AUTO), with the decision's headers (d may be NULL):
 *   PLAIN   {"error": message, "request_id": id}
 *   OPENAI  {"error": {"message", "type", "param": null, "code", "request_id"}}
 */
void mg_req_respond_error(mg_client_t *c, mg_error_format_t format, const char *request_id,
                          int status, const char *message, const mg_policy_decision_t *d);

/* A finished request, as the access line and the metrics take it. */
typedef struct mg_req_done {
    const char *id;
    const char *user;          /* or NULL / "" before authentication */
    const mg_client_t *c;      /* for its address */
    const mg_http1_req_head_t *head;
    int status;
    uint64_t bytes;            /* of the response body */
    uint64_t t_start_ns;
    const char *outcome;       /* NULL, or why it ended as it did */
    const mg_usage_t *usage;   /* what the response reported, or NULL */
} mg_req_done_t;

/*
 * Counts a finished request in the metrics and writes its access line at level:
 *   req=ID user=U client=ADDR ua="AGENT" METHOD TARGET -> STATUS, BYTES bytes, MS ms[, usage]
 */
void mg_req_account(mg_req_env_t *env, const mg_req_done_t *d, mg_log_level_t level);

#endif
