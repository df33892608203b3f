/*
 * gateway: the whole moongate process as one object on one libuv loop.
 *
 * It wires the modules together: settings, the policy (LuaJIT hooks), the pool of SSH
 * connections with its SSH backend and cleanup service, the proxy that runs HTTP exchanges
 * over pooled channels, the HTTP server with the request, admin and agent endpoints behind it,
 * and the metrics. The program moongate is this object plus a command line and signal
 * handlers; tests may embed it.
 *
 * Lifecycle: mg_gateway_new() builds and starts serving; mg_gateway_reload() loads the policy
 * and the TLS certificate again (SIGHUP); mg_gateway_drain() runs the shutdown sequence
 * (SIGTERM): /healthz and /readyz turn 503, new requests are refused with 503, requests in flight finish
 * within the shutdown hook's grace period, SSH sessions disconnect, and on_drained is called.
 * Then mg_gateway_free(), which closes what is left; the loop ends once it has.
 */
#ifndef MOONGATE_GATEWAY_H
#define MOONGATE_GATEWAY_H

#include "moongate/settings.h"
#include "moongate/shutdown.h"

#include <stdbool.h>
#include <stdint.h>
#include <uv.h>

typedef struct mg_gateway mg_gateway_t;

typedef struct mg_gateway_opts {
    const char *policy_path;      /* NULL: the built-in default policy */
    const char *listen_host;      /* an IPv4 or IPv6 address; "127.0.0.1" */
    int listen_port;              /* 8080; 0 picks a free port (see mg_gateway_port()) */
    const char *tls_cert;         /* PEM files; both or neither */
    const char *tls_key;
    uint64_t max_body_bytes;      /* request bodies larger than this get 413; 10 MiB */
    uint32_t header_timeout_s;    /* a request head must arrive within this, and a body may
                                     pause no longer; 10 */
    uint32_t send_timeout_s;      /* a client that takes none of its response this long is
                                     cut, freeing the channel it holds; 60 */
    uint32_t keepalive_timeout_s; /* an idle kept-alive client connection closes after; 75 */
    uint32_t max_clients;         /* open client connections; one more gets 503; 10000 */
    uint32_t max_request_line;    /* bytes; a longer request line gets 414; 16384 */
    uint32_t max_header_size;     /* bytes of a request head; larger gets 431; 32768 */
    uint32_t max_headers;         /* header fields; more get 431; 100 */
    uint64_t upstream_head_timeout_ms; /* 120000 */
    uint64_t upstream_keepalive_ms;    /* idle channel reuse window; 10000 */
    const char *admin_token;      /* if set, /metrics and /stats need "Bearer TOKEN"; else
                                     they answer loopback clients only */
    uint32_t metrics_per_user;    /* users with series of their own in /metrics; 0: none */
    uint64_t watchdog_ms;         /* a loop stalled this long aborts the process; 0: no
                                     watchdog (the default here; the program's is 5000) */
    bool debug_functions;         /* moongate.debug_spin for tests of the watchdog; false */
    uint64_t drain_delay_ms;      /* lame duck: how long after the drain begins /healthz says
                                     503 while new requests are still served, for a load
                                     balancer's health checks to notice; 0 */
    const char *redis_url;        /* the shared dictionary in Redis (MOONGATE_REDIS_URL);
                                     NULL: in-process */
    uint32_t redis_timeout_ms;    /* the longest a hook waits for Redis per call; 20 */
    const char *redis_ca_file;    /* rediss://: the CA to trust (MOONGATE_REDIS_CA); NULL: the
                                     system's store */
    const char *redis_cert_file;  /* rediss://: our client certificate (MOONGATE_REDIS_CERT) */
    const char *redis_key_file;   /* and its key (MOONGATE_REDIS_KEY) */
} mg_gateway_opts_t;

/*
 * Fills opts with the defaults, then the environment: MOONGATE_LISTEN (host:port),
 * MOONGATE_TLS_CERT, MOONGATE_TLS_KEY, MOONGATE_MAX_BODY, MOONGATE_HEADER_TIMEOUT,
 * MOONGATE_SEND_TIMEOUT, MOONGATE_KEEPALIVE_TIMEOUT, MOONGATE_MAX_CLIENTS,
 * MOONGATE_MAX_REQUEST_LINE, MOONGATE_MAX_HEADER_SIZE, MOONGATE_MAX_HEADERS,
 * UPSTREAM_HEAD_TIMEOUT, UPSTREAM_KEEPALIVE, MOONGATE_ADMIN_TOKEN, MOONGATE_METRICS_PER_USER,
 * MOONGATE_WATCHDOG_MS (default 5000), MOONGATE_DEBUG_FUNCTIONS, MOONGATE_DRAIN_DELAY,
 * MOONGATE_REDIS_URL, MOONGATE_REDIS_TIMEOUT.
 * Returns 0 or MG_ECONFIG with
 * a message naming the variable.
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

/* The port the server listens on. */
int mg_gateway_port(const mg_gateway_t *gw);

/*
 * Reloads the policy file and, when serving TLS, the certificate and key. Each is all or
 * nothing: one that fails keeps the old one. Returns 0, or an error with what failed in err
 * ("FILE:LINE: message" for the policy).
 */
int mg_gateway_reload(mg_gateway_t *gw, char *err, size_t errlen);

/* True once mg_gateway_drain() has been called. */
bool mg_gateway_draining(const mg_gateway_t *gw);

/* Starts the drain (see above); on_drained is called once, when it is over. */
void mg_gateway_drain(mg_gateway_t *gw, const char *why,
                      void (*on_drained)(mg_gateway_t *gw, const mg_shutdown_result_t *result,
                                         void *arg),
                      void *arg);

/* Closes everything and frees the gateway, asynchronously: run the loop until it ends. */
void mg_gateway_free(mg_gateway_t *gw);

#endif
