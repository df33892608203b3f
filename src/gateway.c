/*
 * The gateway: builds the modules in order, wires their callbacks to each other, and runs the
 * drain. See include/moongate/gateway.h.
 */
#include "moongate/gateway.h"

#include "moongate/error.h"
#include "moongate/json.h"
#include "moongate/log.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>

#define DRAIN_FLUSH_MS 2000

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

static int env_u64(const char *name, uint64_t lo, uint64_t hi, uint64_t *out, char *err,
                   size_t errlen)
{
    const char *v = getenv(name);
    if (v == NULL || *v == '\0')
        return 0;
    char *end;
    errno = 0;
    unsigned long long n = strtoull(v, &end, 10);
    if (*v == '-' || errno || *end != '\0' || n < lo || n > hi) {
        snprintf(err, errlen, "%s: must be a whole number from %llu to %llu, got \"%s\"", name,
                 (unsigned long long)lo, (unsigned long long)hi, v);
        return MG_ECONFIG;
    }
    *out = n;
    return 0;
}

/* Names that LLM clients send and libwebsockets does not know by itself. */
static const char *const default_forward[] = {
    "x-request-id", "x-forwarded-for", "x-forwarded-proto", "x-api-key", "openai-organization",
    "openai-project", "anthropic-version", "anthropic-beta", "x-stainless-lang", "traceparent",
    "tracestate", "keep-alive", "te", "trailer", "proxy-connection",
};

int mg_gateway_opts_from_env(mg_gateway_opts_t *o, char *err, size_t errlen)
{
    static char listen_host[256];
    static char forward_copy[2048];
    *o = (mg_gateway_opts_t){
        .listen_host = "127.0.0.1",
        .listen_port = 8080,
        .max_body_bytes = 10 * 1024 * 1024,
        .header_timeout_s = 10,
        .send_timeout_s = 60,
        .upstream_head_timeout_ms = 120000,
        .upstream_keepalive_ms = 10000,
    };
    for (size_t i = 0; i < sizeof(default_forward) / sizeof(default_forward[0]); i++)
        o->forward_headers[o->nforward_headers++] = default_forward[i];

    const char *v = getenv("MOONGATE_LISTEN");
    if (v && *v && mg_gateway_parse_listen(o, v, listen_host, sizeof(listen_host)) != 0) {
        snprintf(err, errlen, "MOONGATE_LISTEN: must be HOST:PORT, got \"%s\"", v);
        return MG_ECONFIG;
    }
    uint64_t n = o->header_timeout_s, send = o->send_timeout_s;
    int rc;
    if ((rc = env_u64("MOONGATE_MAX_BODY", 0, (uint64_t)1 << 40, &o->max_body_bytes, err,
                      errlen)) ||
        (rc = env_u64("MOONGATE_HEADER_TIMEOUT", 1, 3600, &n, err, errlen)) ||
        (rc = env_u64("MOONGATE_SEND_TIMEOUT", 1, 86400, &send, err, errlen)) ||
        (rc = env_u64("UPSTREAM_HEAD_TIMEOUT", 100, 3600000, &o->upstream_head_timeout_ms, err,
                      errlen)) ||
        (rc = env_u64("UPSTREAM_KEEPALIVE", 0, 3600000, &o->upstream_keepalive_ms, err,
                      errlen)))
        return rc;
    o->header_timeout_s = (uint32_t)n;
    o->send_timeout_s = (uint32_t)send;
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
    o->admin_token = getenv("MOONGATE_ADMIN_TOKEN");
    v = getenv("MOONGATE_FORWARD_HEADERS");
    if (v && *v) {
        snprintf(forward_copy, sizeof(forward_copy), "%s", v);
        for (char *save = NULL, *t = strtok_r(forward_copy, ", ", &save); t;
             t = strtok_r(NULL, ", ", &save)) {
            if (o->nforward_headers >= MG_FORWARD_HEADERS_MAX) {
                snprintf(err, errlen, "MOONGATE_FORWARD_HEADERS: at most %d names",
                         MG_FORWARD_HEADERS_MAX - (int)(sizeof(default_forward) /
                                                        sizeof(default_forward[0])));
                return MG_ECONFIG;
            }
            for (char *c = t; *c; c++)
                if (*c >= 'A' && *c <= 'Z')
                    *c = (char)(*c + 32);
            o->forward_headers[o->nforward_headers++] = t;
        }
    }
    return 0;
}

/* ---- wiring ---- */

static double gauge_connections(void *arg)
{
    mg_pool_stats_t st;
    mg_pool_stats(((mg_gateway_t *)arg)->pool, &st);
    return st.total_connections;
}

static double gauge_channels(void *arg)
{
    mg_pool_stats_t st;
    mg_pool_stats(((mg_gateway_t *)arg)->pool, &st);
    return st.leases;
}

static double gauge_queue(void *arg)
{
    mg_pool_stats_t st;
    mg_pool_stats(((mg_gateway_t *)arg)->pool, &st);
    return st.waiters;
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

int mg_gateway_new(uv_loop_t *loop, const mg_settings_t *settings, const mg_gateway_opts_t *o,
                   mg_gateway_t **out, char *err, size_t errlen)
{
    mg_gateway_t *gw = calloc(1, sizeof(*gw));
    if (gw == NULL)
        return MG_ENOMEM;
    gw->loop = loop;
    gw->settings = *settings;
    gw->opts = *o;
    gw->started_ms = wall_ms();
    int rc = MG_ENOMEM;

    gw->metrics_reg = mg_metrics_new();
    mg_gateway_metrics_sources_t src = {
        .connections = gauge_connections,
        .channels_in_use = gauge_channels,
        .queue_depth = gauge_queue,
        .arg = gw,
    };
    if (gw->metrics_reg == NULL || mg_gateway_metrics_init(&gw->metrics, gw->metrics_reg, &src))
        goto fail;

    mg_policy_options_t po;
    mg_policy_options_init(&po, settings);
    po.path = o->policy_path;
    if ((rc = mg_policy_new(loop, &po, &gw->policy, err, errlen)) != 0)
        goto fail;

    mg_ssh_backend_init(&gw->backend, loop, settings);
    gw->backend.observer = on_ssh_event;
    gw->backend.observer_arg = gw;
    if ((rc = mg_pool_new(loop, settings, &mg_ssh_pool_backend, &gw->backend, &gw->pool)) != 0) {
        snprintf(err, errlen, "cannot create the pool: %s", mg_strerror(rc));
        goto fail;
    }
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
    if ((rc = mg__tunnel_new(gw, &gw->tunnel)) != 0) {
        snprintf(err, errlen, "out of memory");
        goto fail;
    }
    gw->backend.agent_open = mg__tunnel_agent_open;
    gw->backend.agent_cancel = mg__tunnel_agent_cancel;
    gw->backend.agent_arg = gw->tunnel;
    if ((rc = mg__front_new(gw, &gw->front, err, errlen)) != 0)
        goto fail;
    *out = gw;
    return 0;

fail:
    mg_gateway_free(gw);
    return rc ? rc : MG_ENOMEM;
}

int mg_gateway_port(const mg_gateway_t *gw)
{
    return mg__front_port(gw->front);
}

int mg_gateway_reload(mg_gateway_t *gw, char *err, size_t errlen)
{
    int rc = mg_policy_reload(gw->policy, err, errlen);
    if (rc == 0) {
        mg_counter_inc(gw->metrics.policy_reloads_ok);
        mg_pool_refresh_limits(gw->pool);
        mg_log_info("gateway", "policy reloaded");
    } else {
        mg_counter_inc(gw->metrics.policy_reloads_failed);
        mg_log_error("gateway", "reload failed: %s", err);
    }
    return rc;
}

/* ---- drain ---- */

static uv_timer_t *drain_timer(mg_gateway_t *gw);

static void drain_finish(mg_gateway_t *gw)
{
    void (*cb)(mg_gateway_t *, const mg_shutdown_result_t *) = gw->on_drained;
    gw->on_drained = NULL;
    if (cb)
        cb(gw, &gw->shutdown.result);
}

static void on_flush_tick(uv_timer_t *t)
{
    mg_gateway_t *gw = t->data;
    /* Responses whose upstream part ended may still be on their way to slow clients. */
    if ((gw->in_flight > 0 || mg__tunnel_count(gw->tunnel) > 0) &&
        uv_now(gw->loop) < gw->flush_deadline)
        return;
    uv_timer_stop(t);
    uv_close((uv_handle_t *)t, (uv_close_cb)free);
    drain_finish(gw);
}

static void on_shutdown_done(mg_shutdown_t *s, const mg_shutdown_result_t *r)
{
    mg_gateway_t *gw = s->data;
    if (r->success)
        mg_log_info("gateway", "drained in %llu ms", (unsigned long long)r->duration_ms);
    else
        mg_log_warn("gateway", "drained in %llu ms with errors: %s",
                    (unsigned long long)r->duration_ms, r->errors_text);
    uv_timer_t *t = drain_timer(gw);
    if (t == NULL) {
        drain_finish(gw);
        return;
    }
    uv_timer_start(t, on_flush_tick, 0, 20);
}

static uv_timer_t *drain_timer(mg_gateway_t *gw)
{
    uv_timer_t *t = malloc(sizeof(*t));
    if (t == NULL)
        return NULL;
    uv_timer_init(gw->loop, t);
    t->data = gw;
    gw->flush_deadline = uv_now(gw->loop) + DRAIN_FLUSH_MS;
    return t;
}

void mg_gateway_drain(mg_gateway_t *gw, const char *why,
                      void (*on_drained)(mg_gateway_t *gw, const mg_shutdown_result_t *result))
{
    if (gw->draining)
        return;
    gw->draining = true;
    gw->on_drained = on_drained;
    mg_pool_stats_t ps;
    mg_pool_stats(gw->pool, &ps);
    mg_policy_shutdown_info_t info = {
        .reason = why,
        .in_flight = gw->in_flight,
        .connections = ps.total_connections,
    };
    mg_policy_shutdown_t sd;
    mg_policy_shutdown(gw->policy, &info, &sd);
    snprintf(gw->drain_message, sizeof(gw->drain_message), "%s",
             sd.message[0] ? sd.message : "moongate is shutting down");
    mg_log_info("gateway", "draining (%s): %d requests in flight, %d SSH connections; grace %llu "
                "ms", why, gw->in_flight, ps.total_connections, (unsigned long long)sd.grace_ms);
    mg_cleanup_stop(gw->cleanup);
    mg_proxy_drain(gw->proxy);
    mg__tunnel_drain(gw->tunnel);
    mg_shutdown_opts_t so;
    mg_shutdown_opts_init(&so, &gw->settings);
    so.grace_ms = sd.grace_ms;
    so.force_after_grace = sd.force_after_grace;
    so.reason = gw->drain_message;
    gw->shutdown.data = gw;
    if (mg_shutdown_start(&gw->shutdown, gw->loop, gw->pool, &so, on_shutdown_done) != 0)
        drain_finish(gw);
}

void mg_gateway_free(mg_gateway_t *gw)
{
    if (gw->front)
        mg__front_free(gw->front);
    if (gw->tunnel)
        mg__tunnel_free(gw->tunnel);
    if (gw->proxy)
        mg_proxy_free(gw->proxy);
    if (gw->cleanup)
        mg_cleanup_free(gw->cleanup);
    if (gw->pool) {
        mg_pool_close_all(gw->pool, true, "exiting");
        for (int i = 0; i < 200; i++) {
            mg_pool_stats_t st;
            mg_pool_stats(gw->pool, &st);
            if (st.total_connections == 0 && st.users == 0)
                break;
            uv_run(gw->loop, UV_RUN_ONCE);
        }
        mg_pool_free(gw->pool);
    }
    if (gw->policy)
        mg_policy_free(gw->policy);
    if (gw->metrics_reg)
        mg_metrics_free(gw->metrics_reg);
    free(gw);
}

/* ---- /stats ---- */

typedef struct stats_walk {
    mg_json_t *j;
    int listed;
} stats_walk_t;

static void stats_conn(const char *user, mg_pool_conn_t *pc, void *arg)
{
    stats_walk_t *w = arg;
    if (w->listed++ >= 1000)
        return;
    mg_json_t *j = w->j;
    mg_json_begin_object(j);
    mg_json_key(j, "user");
    mg_json_string(j, user);
    mg_json_key(j, "id");
    mg_json_uint(j, mg_pool_conn_id(pc));
    mg_json_key(j, "leases");
    mg_json_int(j, mg_pool_conn_leases(pc));
    mg_json_key(j, "healthy");
    mg_json_bool(j, mg_pool_conn_healthy(pc));
    mg_ssh_conn_t *c = mg_ssh_backend_conn(pc);
    if (c != NULL) {
        mg_ssh_conn_stats_t st;
        mg_ssh_conn_stats(c, &st);
        mg_json_key(j, "state");
        mg_json_string(j, mg_ssh_state_name(st.state));
        mg_json_key(j, "uptime_ms");
        mg_json_uint(j, st.uptime_ms);
        mg_json_key(j, "handshake_ms");
        mg_json_uint(j, st.handshake_ms);
        mg_json_key(j, "channels");
        mg_json_int(j, st.channels);
        mg_json_key(j, "bytes_in");
        mg_json_uint(j, st.bytes_in);
        mg_json_key(j, "bytes_out");
        mg_json_uint(j, st.bytes_out);
    }
    mg_json_end_object(j);
}

void mg__gateway_render_stats(mg_gateway_t *gw, mg_json_t *j)
{
    mg_pool_stats_t ps;
    mg_pool_stats(gw->pool, &ps);
    mg_cleanup_stats_t cs;
    mg_cleanup_stats(gw->cleanup, &cs);
    mg_shutdown_stats_t ss;
    mg_shutdown_stats(&gw->shutdown, &ss);
    mg_proxy_stats_t xs;
    mg_proxy_stats(gw->proxy, &xs);

    mg_json_begin_object(j);
    mg_json_key(j, "version");
    mg_json_string(j, MG_VERSION);
    mg_json_key(j, "uptime_ms");
    mg_json_uint(j, wall_ms() - gw->started_ms);
    mg_json_key(j, "in_flight");
    mg_json_int(j, gw->in_flight);

    mg_json_key(j, "pool");
    mg_json_begin_object(j);
    mg_json_key(j, "total_connections");
    mg_json_int(j, ps.total_connections);
    mg_json_key(j, "ready_connections");
    mg_json_int(j, ps.ready_connections);
    mg_json_key(j, "users");
    mg_json_int(j, ps.users);
    mg_json_key(j, "leases");
    mg_json_int(j, ps.leases);
    mg_json_key(j, "waiters");
    mg_json_int(j, ps.waiters);
    mg_json_key(j, "connections");
    mg_json_begin_array(j);
    stats_walk_t w = { j, 0 };
    mg_pool_foreach_conn(gw->pool, stats_conn, &w);
    mg_json_end_array(j);
    mg_json_end_object(j);

    mg_json_key(j, "channels");
    mg_json_begin_object(j);
    mg_json_key(j, "exchanges");
    mg_json_uint(j, xs.exchanges);
    mg_json_key(j, "reused");
    mg_json_uint(j, xs.reused);
    mg_json_key(j, "retried");
    mg_json_uint(j, xs.retried);
    mg_json_key(j, "active");
    mg_json_int(j, xs.active);
    mg_json_key(j, "idle");
    mg_json_int(j, xs.idle_channels);
    mg_json_end_object(j);

    mg_json_key(j, "cleanup");
    mg_json_begin_object(j);
    mg_json_key(j, "running");
    mg_json_bool(j, cs.running);
    mg_json_key(j, "runs");
    mg_json_uint(j, cs.runs);
    mg_json_key(j, "total_cleaned");
    mg_json_uint(j, cs.total_cleaned);
    mg_json_key(j, "last_run_ms");
    mg_json_uint(j, cs.last_run_ms);
    mg_json_end_object(j);

    mg_json_key(j, "shutdown");
    mg_json_begin_object(j);
    mg_json_key(j, "shutting_down");
    mg_json_bool(j, gw->draining);
    mg_json_key(j, "since_ms");
    mg_json_uint(j, ss.since_ms);
    mg_json_key(j, "phase");
    mg_json_string(j, ss.phase);
    mg_json_end_object(j);

    mg_json_key(j, "policy");
    mg_json_begin_object(j);
    mg_json_key(j, "memory_bytes");
    mg_json_uint(j, mg_policy_memory_used(gw->policy));
    mg_json_end_object(j);
    mg_json_end_object(j);
}
