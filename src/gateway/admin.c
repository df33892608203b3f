/*
 * admin: /healthz, /readyz, /metrics and /stats. See admin.h.
 */
#include "admin.h"

#include "moongate/json.h"
#include "moongate/log.h"
#include "moongate/ssh_backend.h"

#include <openssl/crypto.h>
#include <openssl/sha.h>
#include <stdio.h>
#include <string.h>
#include <strings.h>
#include <sys/time.h>

enum endpoint { EP_NONE, EP_HEALTHZ, EP_READYZ, EP_METRICS, EP_STATS };

static uint64_t wall_ms(void)
{
    struct timeval tv;
    gettimeofday(&tv, NULL);
    return (uint64_t)tv.tv_sec * 1000 + (uint64_t)tv.tv_usec / 1000;
}

static enum endpoint endpoint_of(const char *target, size_t len)
{
    size_t plen = 0;
    while (plen < len && target[plen] != '?')
        plen++;
    if (plen == 8 && memcmp(target, "/healthz", 8) == 0)
        return EP_HEALTHZ;
    if (plen == 7 && memcmp(target, "/readyz", 7) == 0)
        return EP_READYZ;
    if (plen == 8 && memcmp(target, "/metrics", 8) == 0)
        return EP_METRICS;
    if (plen == 6 && memcmp(target, "/stats", 6) == 0)
        return EP_STATS;
    return EP_NONE;
}

bool mg_admin_match(const char *target, size_t len)
{
    return endpoint_of(target, len) != EP_NONE;
}

static bool loopback(const char *addr)
{
    return strncmp(addr, "127.", 4) == 0 || strcmp(addr, "::1") == 0 ||
           strncmp(addr, "::ffff:127.", 11) == 0;
}

/*
 * The token or loopback. The digests of the presented and the expected token are compared, so
 * the time taken depends on neither where they first differ nor how long either is.
 */
static bool allowed(const mg_admin_env_t *a, mg_client_t *c, const mg_http1_req_head_t *h)
{
    const char *token = a->admin_token;
    if (token == NULL || *token == '\0')
        return loopback(mg_client_remote(c));
    unsigned char want[SHA256_DIGEST_LENGTH], got[SHA256_DIGEST_LENGTH];
    SHA256((const unsigned char *)token, strlen(token), want);
    bool ok = false;
    for (size_t i = 0; i < h->nheaders; i++) {
        const mg_http1_header_t *f = &h->headers[i];
        if (f->name_len != 13 || strncasecmp(f->name, "authorization", 13) != 0)
            continue;
        if (f->value_len < 7 || strncasecmp(f->value, "Bearer ", 7) != 0)
            continue;
        SHA256((const unsigned char *)f->value + 7, f->value_len - 7, got);
        ok |= CRYPTO_memcmp(got, want, sizeof(want)) == 0;
    }
    return ok;
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
    mg_json_key(j, "busy_channels");
    mg_json_int(j, mg_pool_conn_leases(pc) - mg_pool_conn_idle_leases(pc));
    mg_json_key(j, "idle_channels");
    mg_json_int(j, mg_pool_conn_idle_leases(pc));
    mg_json_key(j, "healthy");
    mg_json_bool(j, mg_pool_conn_healthy(pc));
    mg_ssh_conn_t *sc = mg_ssh_backend_conn(pc);
    if (sc != NULL) {
        mg_ssh_conn_stats_t st;
        mg_ssh_conn_stats(sc, &st);
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

static void render_stats(const mg_admin_env_t *a, mg_json_t *j)
{
    mg_pool_stats_t ps;
    mg_pool_stats(a->pool, &ps);
    mg_cleanup_stats_t cs;
    mg_cleanup_stats(a->cleanup, &cs);
    mg_shutdown_stats_t ss;
    mg_shutdown_stats(a->shutdown, &ss);
    mg_proxy_stats_t xs;
    mg_proxy_stats(a->proxy, &xs);

    mg_json_begin_object(j);
    mg_json_key(j, "version");
    mg_json_string(j, MG_VERSION);
    mg_json_key(j, "uptime_ms");
    mg_json_uint(j, wall_ms() - a->started_ms);
    mg_json_key(j, "in_flight");
    mg_json_int(j, a->req->in_flight);

    mg_json_key(j, "pool");
    mg_json_begin_object(j);
    mg_json_key(j, "total_connections");
    mg_json_int(j, ps.total_connections);
    mg_json_key(j, "ready_connections");
    mg_json_int(j, ps.ready_connections);
    mg_json_key(j, "users");
    mg_json_int(j, ps.users);
    mg_json_key(j, "busy_channels");
    mg_json_int(j, ps.leases - ps.idle_leases);
    mg_json_key(j, "idle_channels");
    mg_json_int(j, ps.idle_leases);
    mg_json_key(j, "waiters");
    mg_json_int(j, ps.waiters);
    mg_json_key(j, "handshakes");
    mg_json_begin_object(j);
    mg_json_key(j, "running");
    mg_json_int(j, ps.handshakes);
    mg_json_key(j, "queued");
    mg_json_int(j, ps.handshakes_queued);
    mg_json_key(j, "peak");
    mg_json_int(j, ps.handshakes_peak);
    mg_json_key(j, "refused");
    mg_json_uint(j, ps.handshakes_refused);
    mg_json_key(j, "max");
    mg_json_int(j, ps.max_handshakes);
    mg_json_key(j, "max_per_server");
    mg_json_int(j, ps.max_handshakes_per_server);
    mg_json_end_object(j);
    mg_json_key(j, "connections");
    mg_json_begin_array(j);
    stats_walk_t w = { j, 0 };
    mg_pool_foreach_conn(a->pool, stats_conn, &w);
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
    mg_json_bool(j, a->req->draining);
    mg_json_key(j, "since_ms");
    mg_json_uint(j, ss.since_ms);
    mg_json_key(j, "phase");
    mg_json_string(j, ss.phase);
    mg_json_end_object(j);

    mg_json_key(j, "policy");
    mg_json_begin_object(j);
    mg_json_key(j, "memory_bytes");
    mg_json_uint(j, mg_policy_memory_used(a->policy));
    mg_json_end_object(j);
    mg_json_end_object(j);
}

/* ---- serving ---- */

/*
 * /readyz: {"ready": bool, "reasons": [why not...], "draining", "clients", "max_clients",
 * "in_flight", "policy": {"generation", "last_reload": "ok" | "failed", "error"}}. A load
 * balancer sends traffic only on 200; the reasons say what an operator would look at. A
 * refused reload leaves the old policy serving, so it is reported, not a reason; its message
 * (file and line) goes only to clients allowed /stats.
 */
static void render_ready(const mg_admin_env_t *a, bool admin, mg_json_t *j, bool *ready)
{
    mg_server_stats_t st = { 0 };
    if (a->server != NULL)
        mg_server_stats(a->server, &st);
    bool full = a->max_clients > 0 && st.connections >= a->max_clients;
    bool leaving = a->req->draining || a->req->lame_duck;
    *ready = !leaving && !full;
    mg_json_begin_object(j);
    mg_json_key(j, "ready");
    mg_json_bool(j, *ready);
    mg_json_key(j, "reasons");
    mg_json_begin_array(j);
    if (a->req->draining)
        mg_json_string(j, "draining: shutting down, finishing the requests in flight");
    else if (a->req->lame_duck)
        mg_json_string(j, "draining: shutting down after MOONGATE_DRAIN_DELAY, still serving "
                          "until then");
    if (full)
        mg_json_string(j, "full: at MOONGATE_MAX_CLIENTS client connections, new ones are "
                          "refused");
    mg_json_end_array(j);
    mg_json_key(j, "draining");
    mg_json_bool(j, leaving);
    mg_json_key(j, "clients");
    mg_json_int(j, st.connections);
    mg_json_key(j, "max_clients");
    mg_json_int(j, a->max_clients);
    mg_json_key(j, "in_flight");
    mg_json_int(j, a->req->in_flight);
    mg_json_key(j, "policy");
    mg_json_begin_object(j);
    mg_policy_state_t *pst = mg_policy_acquire(a->policy);
    mg_json_key(j, "generation");
    mg_json_uint(j, mg_policy_state_generation(pst));
    mg_policy_release(pst);
    mg_json_key(j, "last_reload");
    mg_json_string(j, a->reload_failed ? "failed" : "ok");
    if (a->reload_failed && admin) {
        mg_json_key(j, "error");
        mg_json_string(j, a->reload_error);
    }
    mg_json_end_object(j);
    mg_json_end_object(j);
}

mg_server_req_t *mg_admin_serve(mg_admin_env_t *a, mg_client_t *c, const mg_http1_req_head_t *h)
{
    uint64_t t0 = uv_hrtime();
    char id[MG_HTTP1_REQUEST_ID_MAX + 1];
    mg_req_id(h, id);
    enum endpoint ep = endpoint_of(h->target, h->target_len);
    int status = 200;
    size_t bytes = 0;
    if (ep == EP_HEALTHZ) {
        if (a->req->draining || a->req->lame_duck) {
            status = 503;
            mg_req_respond(c, id, status, "text/plain", "draining\n", 9, NULL);
        } else {
            mg_req_respond(c, id, status, "text/plain", "ok\n", 3, NULL);
        }
    } else if (ep == EP_READYZ) {
        mg_json_t j;
        mg_json_init(&j, 64 * 1024);
        bool ready = false;
        render_ready(a, allowed(a, c, h), &j, &ready);
        size_t len = 0;
        const char *body = mg_json_buf(&j, &len);
        status = ready ? 200 : 503;
        bytes = body != NULL ? len : 0;
        mg_req_respond(c, id, status, "application/json", body != NULL ? body : "{}",
                       body != NULL ? len : 2, NULL);
        mg_json_free(&j);
    } else if (!allowed(a, c, h)) {
        status = 403;
        mg_req_respond_error(c, MG_ERROR_FORMAT_PLAIN, id, status,
                             "forbidden: set MOONGATE_ADMIN_TOKEN or ask from loopback", NULL);
    } else if (ep == EP_METRICS) {
        mg_strbuf_t sb;
        mg_strbuf_init(&sb, 16 * 1024 * 1024);
        if (mg_metrics_render(a->registry, &sb) == 0) {
            bytes = sb.len;
            mg_req_respond(c, id, status, "text/plain; version=0.0.4", sb.data, sb.len, NULL);
        } else {
            status = 500;
            mg_req_respond_error(c, MG_ERROR_FORMAT_PLAIN, id, status, "cannot render metrics",
                                 NULL);
        }
        mg_strbuf_free(&sb);
    } else {
        mg_json_t j;
        mg_json_init(&j, 16 * 1024 * 1024);
        render_stats(a, &j);
        size_t len = 0;
        const char *body = mg_json_buf(&j, &len);
        if (body) {
            bytes = len;
            mg_req_respond(c, id, status, "application/json", body, len, NULL);
        } else {
            status = 500;
            mg_req_respond_error(c, MG_ERROR_FORMAT_PLAIN, id, status, "cannot render stats",
                                 NULL);
        }
        mg_json_free(&j);
    }
    /* Scrapes and health checks come every few seconds: not at info. */
    mg_req_done_t done = { .id = id, .c = c, .head = h, .status = status, .bytes = bytes,
                           .t_start_ns = t0 };
    mg_req_account(a->req, &done, MG_LOG_DEBUG);
    return NULL;
}
