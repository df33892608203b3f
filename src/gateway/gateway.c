/*
 * The gateway: builds the modules in order, wires their callbacks to each other, sends each
 * request to the endpoint it is for, and runs the drain. See include/moongate/gateway.h.
 */
#include "moongate/gateway.h"

#include "admin.h"
#include "llm/llm_metrics.h"
#include "moongate/cleanup.h"
#include "moongate/error.h"
#include "moongate/log.h"
#include "moongate/metrics.h"
#include "moongate/policy.h"
#include "moongate/pool.h"
#include "moongate/proxy.h"
#include "moongate/ssh_backend.h"
#include "request.h"
#include "server.h"
#include "tunnel.h"
#include "watchdog.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>

#define LOG "gateway"
#define DRAIN_FLUSH_MS 2000

struct mg_gateway {
    uv_loop_t *loop;
    mg_settings_t settings;
    mg_gateway_opts_t opts;
    mg_policy_t *policy;
    mg_pool_t *pool;
    mg_ssh_backend_t backend;
    mg_cleanup_t *cleanup;
    mg_proxy_t *proxy;
    mg_server_t *server;
    mg_tunnel_t *tunnel;
    mg_metrics_t *metrics_reg;
    mg_gateway_metrics_t metrics;
    mg_histogram_t *handshake_wait; /* moongate_pool_handshake_wait_seconds */
    mg_llm_metrics_t *llm_metrics;
    mg_req_env_t req_env;
    mg_admin_env_t admin_env;
    mg_tunnel_env_t tunnel_env;
    mg_shutdown_t shutdown;
    bool draining;
    bool lame_duck;               /* in the drain delay: still serving, /healthz 503 */
    uv_timer_t lame_timer;
    char drain_why[64];
    char drain_message[256];
    void (*on_drained)(mg_gateway_t *gw, const mg_shutdown_result_t *result, void *arg);
    void *drained_arg;
    uv_timer_t timer;             /* the drain's flush, then the teardown's wait */
    bool timer_ready;             /* timer and lame_timer are initialized */
    int timers_open;
    uint64_t deadline;
    mg_watchdog_t *watchdog;
};

static uint64_t wall_ms(void)
{
    struct timeval tv;
    gettimeofday(&tv, NULL);
    return (uint64_t)tv.tv_sec * 1000 + (uint64_t)tv.tv_usec / 1000;
}

/* ---- options ---- */

int mg_gateway_parse_listen(mg_gateway_opts_t *o, const char *addr, char *host, size_t hostlen)
{
    const char *colon = strrchr(addr, ':');
    if (colon == NULL)
        return MG_EINVAL;
    const char *h = addr;
    size_t hl = (size_t)(colon - addr);
    if (hl >= 2 && h[0] == '[' && h[hl - 1] == ']') {
        h++;
        hl -= 2;
    }
    if (hl == 0) {
        h = "0.0.0.0";
        hl = strlen(h);
    }
    char *end;
    errno = 0;
    long port = strtol(colon + 1, &end, 10);
    if (errno || *end != '\0' || end == colon + 1 || port < 0 || port > 65535 || hl >= hostlen)
        return MG_EINVAL;
    memcpy(host, h, hl);
    host[hl] = '\0';
    o->listen_host = host;
    o->listen_port = (int)port;
    return 0;
}

/* The settings' readers (settings.h), under short names. */
static int env_u64(const char *name, uint64_t lo, uint64_t hi, uint64_t *out, char *err,
                   size_t errlen)
{
    return mg_settings_env_u64(name, lo, hi, out, err, errlen);
}

static int env_u32(const char *name, uint32_t lo, uint32_t hi, uint32_t *out, char *err,
                   size_t errlen)
{
    uint64_t v = *out;
    int rc = mg_settings_env_u64(name, lo, hi, &v, err, errlen);
    if (rc == 0)
        *out = (uint32_t)v;
    return rc;
}

/* A setting that names a string; unset and empty are both NULL. */
static const char *env_str(const char *name)
{
    const char *v = getenv(name);
    return v != NULL && v[0] != '\0' ? v : NULL;
}

int mg_gateway_opts_from_env(mg_gateway_opts_t *o, char *err, size_t errlen)
{
    static char listen_host[256];
    *o = (mg_gateway_opts_t){
        .listen_host = "127.0.0.1",
        .listen_port = 8080,
        .max_body_bytes = 10 * 1024 * 1024,
        .header_timeout_s = 10,
        .send_timeout_s = 60,
        .keepalive_timeout_s = 75,
        .max_clients = 10000,
        .max_request_line = MG_HTTP1_REQ_LINE_MAX_DEFAULT,
        .max_header_size = MG_HTTP1_REQ_HEAD_MAX_DEFAULT,
        .max_headers = MG_HTTP1_REQ_FIELDS_MAX_DEFAULT,
        .upstream_head_timeout_ms = 120000,
        .upstream_keepalive_ms = 10000,
        .watchdog_ms = 5000,
        .redis_timeout_ms = 20,
    };
    const char *v = getenv("MOONGATE_LISTEN");
    if (v && *v && mg_gateway_parse_listen(o, v, listen_host, sizeof(listen_host)) != 0) {
        snprintf(err, errlen, "MOONGATE_LISTEN: must be HOST:PORT, got \"%s\"", v);
        return MG_ECONFIG;
    }
    int rc;
    if ((rc = env_u64("MOONGATE_MAX_BODY", 0, (uint64_t)1 << 40, &o->max_body_bytes, err,
                      errlen)) ||
        (rc = env_u32("MOONGATE_HEADER_TIMEOUT", 1, 3600, &o->header_timeout_s, err, errlen)) ||
        (rc = env_u32("MOONGATE_SEND_TIMEOUT", 1, 86400, &o->send_timeout_s, err, errlen)) ||
        (rc = env_u32("MOONGATE_KEEPALIVE_TIMEOUT", 1, 86400, &o->keepalive_timeout_s, err,
                      errlen)) ||
        (rc = env_u32("MOONGATE_MAX_CLIENTS", 1, 1000000, &o->max_clients, err, errlen)) ||
        (rc = env_u32("MOONGATE_MAX_HEADER_SIZE", 1024, MG_HTTP1_REQ_HEAD_MAX_LIMIT,
                      &o->max_header_size, err, errlen)) ||
        (rc = env_u32("MOONGATE_MAX_REQUEST_LINE", 256, MG_HTTP1_REQ_HEAD_MAX_LIMIT,
                      &o->max_request_line, err, errlen)) ||
        (rc = env_u32("MOONGATE_MAX_HEADERS", 1, 1000, &o->max_headers, err, errlen)) ||
        (rc = env_u64("UPSTREAM_HEAD_TIMEOUT", 100, 3600000, &o->upstream_head_timeout_ms, err,
                      errlen)) ||
        (rc = env_u64("UPSTREAM_KEEPALIVE", 0, 3600000, &o->upstream_keepalive_ms, err,
                      errlen)) ||
        (rc = env_u32("MOONGATE_METRICS_PER_USER", 0, MG_LLM_PER_USER_MAX, &o->metrics_per_user,
                      err, errlen)))
        return rc;
    if (o->max_request_line > o->max_header_size) {
        snprintf(err, errlen, "MOONGATE_MAX_REQUEST_LINE (%u) must not be larger than "
                 "MOONGATE_MAX_HEADER_SIZE (%u)", o->max_request_line, o->max_header_size);
        return MG_ECONFIG;
    }
    o->tls_cert = getenv("MOONGATE_TLS_CERT");
    o->tls_key = getenv("MOONGATE_TLS_KEY");
    if (o->tls_cert && !*o->tls_cert)
        o->tls_cert = NULL;
    if (o->tls_key && !*o->tls_key)
        o->tls_key = NULL;
    if ((o->tls_cert == NULL) != (o->tls_key == NULL)) {
        snprintf(err, errlen, "MOONGATE_TLS_CERT and MOONGATE_TLS_KEY: give both or neither");
        return MG_ECONFIG;
    }
    if ((rc = env_u64("MOONGATE_WATCHDOG_MS", 0, 600000, &o->watchdog_ms, err, errlen)))
        return rc;
    if (o->watchdog_ms > 0 && o->watchdog_ms < 100) {
        snprintf(err, errlen, "MOONGATE_WATCHDOG_MS: must be 0 (off) or from 100 to 600000, "
                 "got \"%s\"", getenv("MOONGATE_WATCHDOG_MS"));
        return MG_ECONFIG;
    }
    if ((rc = mg_settings_env_bool("MOONGATE_DEBUG_FUNCTIONS", &o->debug_functions, err,
                                   errlen)) ||
        (rc = env_u64("MOONGATE_DRAIN_DELAY", 0, 600000, &o->drain_delay_ms, err, errlen)) ||
        (rc = env_u32("MOONGATE_REDIS_TIMEOUT", 1, 60000, &o->redis_timeout_ms, err, errlen)))
        return rc;
    o->redis_url = env_str("MOONGATE_REDIS_URL");
    o->redis_ca_file = env_str("MOONGATE_REDIS_CA");
    o->redis_cert_file = env_str("MOONGATE_REDIS_CERT");
    o->redis_key_file = env_str("MOONGATE_REDIS_KEY");
    o->admin_token = getenv("MOONGATE_ADMIN_TOKEN");
    v = getenv("MOONGATE_FORWARD_HEADERS");
    if (v && *v)
        mg_log_warn(LOG, "MOONGATE_FORWARD_HEADERS is obsolete and ignored: every end-to-end "
                    "header is forwarded");
    return 0;
}

/* ---- wiring ---- */

static double gauge_connections(void *arg)
{
    mg_pool_stats_t st;
    mg_pool_stats(((mg_gateway_t *)arg)->pool, &st);
    return st.total_connections;
}

static double gauge_channels_busy(void *arg)
{
    mg_pool_stats_t st;
    mg_pool_stats(((mg_gateway_t *)arg)->pool, &st);
    return st.leases - st.idle_leases;
}

static double gauge_channels_idle(void *arg)
{
    mg_pool_stats_t st;
    mg_pool_stats(((mg_gateway_t *)arg)->pool, &st);
    return st.idle_leases;
}

static double gauge_queue(void *arg)
{
    mg_pool_stats_t st;
    mg_pool_stats(((mg_gateway_t *)arg)->pool, &st);
    return st.waiters;
}

static double handshake_stat(void *arg, int which)
{
    mg_pool_stats_t st;
    mg_pool_stats(((mg_gateway_t *)arg)->pool, &st);
    switch (which) {
    case 0: return st.handshakes;
    case 1: return st.handshakes_queued;
    default: return (double)st.handshakes_refused;
    }
}
static double handshakes_running(void *arg) { return handshake_stat(arg, 0); }
static double handshakes_queued(void *arg) { return handshake_stat(arg, 1); }
static double handshakes_refused(void *arg) { return handshake_stat(arg, 2); }

/* How long a new connection waited for a handshake slot: from none to a herd's worth. */
static const double handshake_wait_buckets[] = {
    0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60,
};

static void on_handshake_start(void *arg, uint64_t waited_ms)
{
    mg_histogram_observe(((mg_gateway_t *)arg)->handshake_wait, (double)waited_ms / 1000.0);
}

/* The pool's handshake gate (MOONGATE_MAX_HANDSHAKES). */
static int handshake_metrics(mg_gateway_t *gw)
{
    mg_metrics_t *m = gw->metrics_reg;
    const char *name = "moongate_pool_handshakes";
    const char *help = "New SSH connections opening (running: in the handshake, holding one of "
                       "MOONGATE_MAX_HANDSHAKES slots) or queued for a slot.";
    return mg_metrics_gauge_fn(m, name, help, "state", "running", handshakes_running, gw) ||
           mg_metrics_gauge_fn(m, name, help, "state", "queued", handshakes_queued, gw) ||
           mg_metrics_counter_fn(m, "moongate_pool_handshakes_refused_total",
                                 "New SSH connections refused (503) because "
                                 "MOONGATE_HANDSHAKE_QUEUE_MAX were already queued.", NULL, NULL,
                                 handshakes_refused, gw) ||
           mg_metrics_histogram(m, "moongate_pool_handshake_wait_seconds",
                                "Time a new SSH connection waited for a handshake slot.",
                                handshake_wait_buckets,
                                sizeof(handshake_wait_buckets) / sizeof(double),
                                &gw->handshake_wait);
}

static double client_bytes(const mg_gateway_t *gw, bool in)
{
    if (gw->server == NULL)
        return 0;
    mg_server_stats_t st;
    mg_server_stats(gw->server, &st);
    return (double)(in ? st.bytes_in : st.bytes_out);
}

static double client_received(void *arg)
{
    return client_bytes(arg, true);
}

static double client_sent(void *arg)
{
    return client_bytes(arg, false);
}

static double redis_stat(mg_gateway_t *gw, int which)
{
    mg_redis_stats_t rs;
    if (!mg_policy_redis_stats(gw->policy, &rs))
        return 0;
    switch (which) {
    case 0: return rs.up;
    case 1: return (double)rs.commands;
    case 2: return (double)rs.errors;
    case 3: return (double)rs.timeouts;
    case 4: return (double)rs.unavailable;
    default: return rs.in_flight;
    }
}
static double redis_up(void *arg) { return redis_stat(arg, 0); }
static double redis_commands(void *arg) { return redis_stat(arg, 1); }
static double redis_errors(void *arg) { return redis_stat(arg, 2); }
static double redis_timeouts(void *arg) { return redis_stat(arg, 3); }
static double redis_unavailable(void *arg) { return redis_stat(arg, 4); }
static double redis_in_flight(void *arg) { return redis_stat(arg, 5); }

/* The shared dictionary's Redis: only when there is one. */
static int redis_metrics(mg_gateway_t *gw)
{
    if (mg_policy_redis_stats(gw->policy, &(mg_redis_stats_t){ 0 }) == false)
        return 0;
    mg_metrics_t *m = gw->metrics_reg;
    const char *fail = "moongate_redis_failures_total";
    const char *fail_help = "Shared-dictionary calls that did not get Redis's answer, by why: "
                            "error (an error answer or a lost connection), timeout (no answer "
                            "within MOONGATE_REDIS_TIMEOUT), unavailable (not connected: failed "
                            "at once).";
    return mg_metrics_gauge_fn(m, "moongate_redis_up",
                               "1 while the shared dictionary's Redis is connected.", NULL, NULL,
                               redis_up, gw) ||
           mg_metrics_counter_fn(m, "moongate_redis_commands_total",
                                 "Commands sent to the shared dictionary's Redis.", NULL, NULL,
                                 redis_commands, gw) ||
           mg_metrics_counter_fn(m, fail, fail_help, "reason", "error", redis_errors, gw) ||
           mg_metrics_counter_fn(m, fail, fail_help, "reason", "timeout", redis_timeouts, gw) ||
           mg_metrics_counter_fn(m, fail, fail_help, "reason", "unavailable", redis_unavailable,
                                 gw) ||
           mg_metrics_gauge_fn(m, "moongate_redis_in_flight",
                               "Shared-dictionary commands waiting for Redis's answer.", NULL,
                               NULL, redis_in_flight, gw);
}

static double gauge_clients(void *arg)
{
    mg_gateway_t *gw = arg;
    if (gw->server == NULL)
        return 0;
    mg_server_stats_t st;
    mg_server_stats(gw->server, &st);
    return st.connections;
}

static int user_stats(void *ctx, const char *user, mg_pool_user_stats_t *out)
{
    return mg_pool_user_stats(ctx, user, out);
}

static void pool_stats(void *ctx, mg_pool_stats_t *out)
{
    mg_pool_stats(ctx, out);
}

static void on_ssh_event(void *arg, mg_ssh_conn_t *c, mg_ssh_event_t ev)
{
    mg_gateway_t *gw = arg;
    mg_ssh_conn_stats_t st;
    mg_ssh_conn_stats(c, &st);
    mg_policy_event_t pev = { .user = st.user, .conn_id = st.id };
    switch (ev) {
    case MG_SSH_EV_READY:
        mg_counter_inc(gw->metrics.ssh_connections_opened);
        mg_histogram_observe(gw->metrics.ssh_handshake_duration, st.handshake_ms / 1000.0);
        pev.type = "connection_opened";
        break;
    case MG_SSH_EV_HEALTH:
        if (st.healthy)
            return;
        pev.type = "connection_unhealthy";
        break;
    case MG_SSH_EV_CLOSED:
        if (mg_ssh_conn_was_ready(c)) {
            mg_counter_inc(gw->metrics.ssh_connections_closed);
            pev.type = "connection_closed";
        } else {
            mg_counter_inc(gw->metrics.ssh_connections_failed);
            pev.type = "connection_failed";
        }
        pev.message = mg_ssh_conn_error(c);
        break;
    }
    mg_policy_event(gw->policy, &pev);
}

/* Sends a request to its endpoint: the admin ones, the agents' /tunnel, or a user's upstream. */
static mg_server_req_t *on_request(void *arg, mg_client_t *c, const mg_http1_req_head_t *h)
{
    mg_gateway_t *gw = arg;
    if (mg_admin_match(h->target, h->target_len))
        return mg_admin_serve(&gw->admin_env, c, h);
    if (mg_tunnel_match(h->target, h->target_len))
        return mg_tunnel_serve(gw->tunnel, c, h);
    return mg_req_start(&gw->req_env, c, h);
}

static void on_bad_request(void *arg, mg_client_t *c, int status, const char *why)
{
    mg_gateway_t *gw = arg;
    char id[MG_HTTP1_REQUEST_ID_MAX + 1];
    mg_req_id(NULL, id);
    mg_log_info("http", "req=%s client %s: %d: %s", id, mg_client_remote(c), status, why);
    mg_policy_decision_t d = { 0 };
    if (status == 503)
        mg_req_retry_after(&d, "1");
    /* No path to go by: the policy's shape when it names one, else the plain one. */
    mg_policy_state_t *st = mg_policy_acquire(gw->policy);
    mg_error_format_t f = mg_req_error_format(mg_policy_error_format(st), NULL, 0);
    mg_policy_release(st);
    mg_req_respond_error(c, f, id, status, why, &d);
    mg_counter_inc(gw->metrics.requests_total[mg_http_status_class(status)]);
}

static int start_server(mg_gateway_t *gw, char *err, size_t errlen)
{
    const mg_gateway_opts_t *o = &gw->opts;
    mg_server_opts_t so;
    mg_server_opts_init(&so);
    so.host = o->listen_host;
    so.port = o->listen_port;
    so.tls_cert = o->tls_cert;
    so.tls_key = o->tls_key;
    so.limits = (mg_http1_req_limits_t){
        .line_max = o->max_request_line,
        .head_max = o->max_header_size,
        .fields_max = o->max_headers,
    };
    so.header_timeout_ms = (uint64_t)o->header_timeout_s * 1000;
    so.keepalive_timeout_ms = (uint64_t)o->keepalive_timeout_s * 1000;
    so.send_timeout_ms = (uint64_t)o->send_timeout_s * 1000;
    so.max_connections = (int)o->max_clients;
    mg_server_handler_t h = { .on_request = on_request, .on_error = on_bad_request, .arg = gw };
    return mg_server_new(gw->loop, &so, &h, &gw->server, err, errlen);
}

/* What the watchdog says the loop is doing when it is stuck (a signal handler: no allocation). */
static void describe_stall(void *arg, char *buf, size_t len)
{
    (void)arg;
    mg_policy_describe_running(buf, len);
}

int mg_gateway_new(uv_loop_t *loop, const mg_settings_t *settings, const mg_gateway_opts_t *o,
                   mg_gateway_t **out, char *err, size_t errlen)
{
    mg_gateway_t *gw = calloc(1, sizeof(*gw));
    if (gw == NULL)
        return MG_ENOMEM;
    gw->loop = loop;
    gw->settings = *settings;
    gw->opts = *o;
    int rc = MG_ENOMEM;
    uv_timer_init(loop, &gw->timer);
    gw->timer.data = gw;
    gw->timer_ready = true;
    uv_timer_init(loop, &gw->lame_timer);
    gw->lame_timer.data = gw;
    gw->timers_open = 2;

    gw->metrics_reg = mg_metrics_new();
    mg_gateway_metrics_sources_t src = {
        .connections = gauge_connections,
        .channels_busy = gauge_channels_busy,
        .channels_idle = gauge_channels_idle,
        .queue_depth = gauge_queue,
        .arg = gw,
    };
    if (gw->metrics_reg == NULL || mg_gateway_metrics_init(&gw->metrics, gw->metrics_reg, &src) ||
        mg_metrics_gauge_fn(gw->metrics_reg, "moongate_client_connections",
                            "Client connections open.", NULL, NULL, gauge_clients, gw) ||
        mg_metrics_counter_fn(gw->metrics_reg, "moongate_client_received_bytes_total",
                              "Bytes received from clients, as on the wire (TLS included).",
                              NULL, NULL, client_received, gw) ||
        mg_metrics_counter_fn(gw->metrics_reg, "moongate_client_sent_bytes_total",
                              "Bytes sent to clients, as on the wire (TLS included).", NULL,
                              NULL, client_sent, gw) ||
        mg_process_metrics_init(gw->metrics_reg, MG_VERSION) ||
        mg_llm_metrics_new(gw->metrics_reg, (int)o->metrics_per_user, &gw->llm_metrics))
        goto fail;

    mg_policy_options_t po;
    mg_policy_options_init(&po, settings);
    po.path = o->policy_path;
    po.debug_functions = o->debug_functions;
    po.redis_url = o->redis_url;
    po.redis_timeout_ms = o->redis_timeout_ms;
    po.redis_ca_file = o->redis_ca_file;
    po.redis_cert_file = o->redis_cert_file;
    po.redis_key_file = o->redis_key_file;
    if ((rc = mg_policy_new(loop, &po, &gw->policy, err, errlen)) != 0)
        goto fail;
    if (redis_metrics(gw) != 0) {
        rc = MG_ENOMEM;
        snprintf(err, errlen, "cannot register the Redis metrics");
        goto fail;
    }

    mg_ssh_backend_init(&gw->backend, loop, settings);
    gw->backend.observer = on_ssh_event;
    gw->backend.observer_arg = gw;
    if ((rc = mg_pool_new(loop, settings, &mg_ssh_pool_backend, &gw->backend, &gw->pool)) != 0) {
        snprintf(err, errlen, "cannot create the pool: %s", mg_strerror(rc));
        goto fail;
    }
    if (handshake_metrics(gw) != 0) {
        rc = MG_ENOMEM;
        snprintf(err, errlen, "cannot register the handshake metrics");
        goto fail;
    }
    mg_pool_set_start_cb(gw->pool, on_handshake_start, gw);
    mg_pool_set_limits_fn(gw->pool, mg_policy_pool_limits_fn, gw->policy);
    mg_policy_set_stats_fn(gw->policy, user_stats, pool_stats, gw->pool);

    if ((rc = mg_cleanup_new(loop, gw->pool, settings, &gw->cleanup)) != 0) {
        snprintf(err, errlen, "cannot create the cleanup service: %s", mg_strerror(rc));
        goto fail;
    }
    mg_cleanup_start(gw->cleanup);

    mg_proxy_opts_t xo;
    mg_proxy_opts_init(&xo);
    xo.head_timeout_ms = o->upstream_head_timeout_ms;
    xo.keepalive_ms = o->upstream_keepalive_ms;
    if ((rc = mg_proxy_new(loop, gw->pool, &xo, &gw->proxy)) != 0) {
        snprintf(err, errlen, "cannot create the proxy: %s", mg_strerror(rc));
        goto fail;
    }

    gw->req_env = (mg_req_env_t){
        .policy = gw->policy,
        .proxy = gw->proxy,
        .settings = &gw->settings,
        .metrics = &gw->metrics,
        .llm = gw->llm_metrics,
        .max_body_bytes = o->max_body_bytes,
        .drain_message = gw->drain_message,
        .shutdown = &gw->shutdown,
    };
    gw->admin_env = (mg_admin_env_t){
        .req = &gw->req_env,
        .registry = gw->metrics_reg,
        .admin_token = o->admin_token,
        .pool = gw->pool,
        .cleanup = gw->cleanup,
        .shutdown = &gw->shutdown,
        .proxy = gw->proxy,
        .policy = gw->policy,
        .started_ms = wall_ms(),
    };
    gw->tunnel_env = (mg_tunnel_env_t){
        .loop = loop,
        .policy = gw->policy,
        .pool = gw->pool,
        .settings = &gw->settings,
        .agent_connections = gw->metrics.agent_connections,
        .drain_message = gw->drain_message,
    };
    if ((rc = mg_tunnel_new(&gw->tunnel_env, &gw->tunnel)) != 0) {
        snprintf(err, errlen, "out of memory");
        goto fail;
    }
    gw->backend.agent_open = mg_tunnel_agent_open;
    gw->backend.agent_cancel = mg_tunnel_agent_cancel;
    gw->backend.agent_arg = gw->tunnel;
    gw->admin_env.max_clients = (int)o->max_clients;
    if ((rc = start_server(gw, err, errlen)) != 0)
        goto fail;
    gw->admin_env.server = gw->server;
    if (o->watchdog_ms > 0 &&
        (rc = mg_watchdog_start(loop, o->watchdog_ms, describe_stall, gw, &gw->watchdog)) != 0) {
        snprintf(err, errlen, "cannot start the watchdog: %s", mg_strerror(rc));
        goto fail;
    }
    *out = gw;
    return 0;

fail:
    mg_gateway_free(gw);
    return rc ? rc : MG_ENOMEM;
}

int mg_gateway_port(const mg_gateway_t *gw)
{
    return mg_server_port(gw->server);
}

int mg_gateway_reload(mg_gateway_t *gw, char *err, size_t errlen)
{
    int rc = mg_policy_reload(gw->policy, err, errlen);
    gw->admin_env.reload_failed = rc != 0;
    snprintf(gw->admin_env.reload_error, sizeof(gw->admin_env.reload_error), "%s",
             rc != 0 ? err : "");
    if (rc == 0) {
        mg_counter_inc(gw->metrics.policy_reloads_ok);
        mg_pool_refresh_limits(gw->pool);
        mg_log_info(LOG, "policy reloaded");
    } else {
        mg_counter_inc(gw->metrics.policy_reloads_failed);
        mg_log_error(LOG, "reload failed: %s", err);
    }
    if (gw->opts.tls_cert == NULL)
        return rc;
    char terr[512];
    int trc = mg_server_reload_tls(gw->server, terr, sizeof(terr));
    if (trc == 0) {
        mg_log_info(LOG, "TLS certificate reloaded (%s)", gw->opts.tls_cert);
    } else {
        mg_log_error(LOG, "TLS reload failed, the old certificate stays: %s", terr);
        if (rc == 0)
            snprintf(err, errlen, "%s", terr);
    }
    return rc ? rc : trc;
}

bool mg_gateway_draining(const mg_gateway_t *gw)
{
    return gw->draining;
}

/* ---- drain ---- */

static void drain_finish(mg_gateway_t *gw)
{
    void (*cb)(mg_gateway_t *, const mg_shutdown_result_t *, void *) = gw->on_drained;
    gw->on_drained = NULL;
    if (cb)
        cb(gw, &gw->shutdown.result, gw->drained_arg);
}

static void on_flush_tick(uv_timer_t *t)
{
    mg_gateway_t *gw = t->data;
    /* Responses whose upstream part ended may still be on their way to slow clients. */
    if ((gw->req_env.in_flight > 0 || mg_tunnel_count(gw->tunnel) > 0) &&
        uv_now(gw->loop) < gw->deadline)
        return;
    uv_timer_stop(t);
    drain_finish(gw);
}

static void on_shutdown_done(mg_shutdown_t *s, const mg_shutdown_result_t *r)
{
    mg_gateway_t *gw = s->data;
    if (r->success)
        mg_log_info(LOG, "drained in %llu ms", (unsigned long long)r->duration_ms);
    else
        mg_log_warn(LOG, "drained in %llu ms with errors: %s",
                    (unsigned long long)r->duration_ms, r->errors_text);
    gw->deadline = uv_now(gw->loop) + DRAIN_FLUSH_MS;
    uv_timer_start(&gw->timer, on_flush_tick, 0, 20);
}

static void drain_now(mg_gateway_t *gw, const char *why);

static void on_lame_timer(uv_timer_t *t)
{
    mg_gateway_t *gw = t->data;
    gw->lame_duck = false;
    drain_now(gw, gw->drain_why);
}

void mg_gateway_drain(mg_gateway_t *gw, const char *why,
                      void (*on_drained)(mg_gateway_t *gw, const mg_shutdown_result_t *result,
                                         void *arg),
                      void *arg)
{
    if (gw->draining)
        return;
    gw->draining = true;
    gw->on_drained = on_drained;
    gw->drained_arg = arg;
    if (gw->opts.drain_delay_ms > 0) {
        /* Lame duck: the balancer's health checks see 503 and stop sending new requests here,
           while those already on their way are still served. */
        gw->lame_duck = true;
        gw->req_env.lame_duck = true;
        snprintf(gw->drain_why, sizeof(gw->drain_why), "%s", why);
        mg_log_info(LOG, "draining (%s) in %llu ms: /healthz says 503, requests are still "
                    "served until then", why, (unsigned long long)gw->opts.drain_delay_ms);
        uv_timer_start(&gw->lame_timer, on_lame_timer, gw->opts.drain_delay_ms, 0);
        return;
    }
    drain_now(gw, why);
}

static void drain_now(mg_gateway_t *gw, const char *why)
{
    mg_pool_stats_t ps;
    mg_pool_stats(gw->pool, &ps);
    mg_policy_shutdown_info_t info = {
        .reason = why,
        .in_flight = gw->req_env.in_flight,
        .connections = ps.total_connections,
    };
    mg_policy_shutdown_t sd;
    mg_policy_shutdown(gw->policy, &info, &sd);
    snprintf(gw->drain_message, sizeof(gw->drain_message), "%s",
             sd.message[0] ? sd.message : "moongate is shutting down");
    gw->req_env.draining = true;
    mg_log_info(LOG, "draining (%s): %d requests in flight, %d SSH connections; grace %llu "
                "ms", why, gw->req_env.in_flight, ps.total_connections,
                (unsigned long long)sd.grace_ms);
    mg_server_drain(gw->server);
    mg_cleanup_stop(gw->cleanup);
    mg_proxy_drain(gw->proxy);
    mg_tunnel_drain(gw->tunnel);
    mg_shutdown_opts_t so;
    mg_shutdown_opts_init(&so, &gw->settings);
    so.grace_ms = sd.grace_ms;
    so.force_after_grace = sd.force_after_grace;
    so.reason = gw->drain_message;
    gw->shutdown.data = gw;
    if (mg_shutdown_start(&gw->shutdown, gw->loop, gw->pool, &so, on_shutdown_done) != 0)
        drain_finish(gw);
}

/* ---- teardown: the server's connections, then the SSH side, then the rest ---- */

/* The gateway goes with the last of its two timers. */
static void on_teardown_timer_closed(uv_handle_t *h)
{
    mg_gateway_t *gw = h->data;
    if (--gw->timers_open == 0)
        free(gw);
}

static void teardown_finish(mg_gateway_t *gw)
{
    if (gw->pool)
        mg_pool_free(gw->pool);
    if (gw->tunnel)
        mg_tunnel_free(gw->tunnel);
    if (gw->policy)
        mg_policy_free(gw->policy);
    mg_llm_metrics_free(gw->llm_metrics);
    if (gw->metrics_reg)
        mg_metrics_free(gw->metrics_reg);
    if (gw->timer_ready) {
        uv_timer_stop(&gw->lame_timer);
        uv_close((uv_handle_t *)&gw->lame_timer, on_teardown_timer_closed);
        uv_close((uv_handle_t *)&gw->timer, on_teardown_timer_closed);
    } else {
        free(gw);
    }
}

/* Waits, on the loop, for the pool's connections to report themselves closed. */
static void on_teardown_tick(uv_timer_t *t)
{
    mg_gateway_t *gw = t->data;
    mg_pool_stats_t st;
    mg_pool_stats(gw->pool, &st);
    if (st.total_connections > 0 || st.users > 0)
        return;
    uv_timer_stop(t);
    teardown_finish(gw);
}

static void teardown_ssh(void *arg)
{
    mg_gateway_t *gw = arg;
    gw->server = NULL;
    gw->admin_env.server = NULL;
    if (gw->proxy)
        mg_proxy_free(gw->proxy);
    gw->proxy = NULL;
    if (gw->cleanup)
        mg_cleanup_free(gw->cleanup);
    gw->cleanup = NULL;
    if (gw->pool == NULL) {
        teardown_finish(gw);
        return;
    }
    mg_pool_close_all(gw->pool, true, "exiting");
    uv_timer_start(&gw->timer, on_teardown_tick, 0, 5);
}

void mg_gateway_free(mg_gateway_t *gw)
{
    mg_watchdog_stop(gw->watchdog);
    gw->watchdog = NULL;
    uv_timer_stop(&gw->timer);
    uv_timer_stop(&gw->lame_timer);
    if (gw->server)
        mg_server_close(gw->server, teardown_ssh, gw);
    else
        teardown_ssh(gw);
}
