/*
 * The HTTP front end: libwebsockets serving HTTP/1.1 on the gateway's libuv loop.
 *
 * One request (req_t) runs: head checks -> authenticate -> admit -> route (the policy state
 * it started on stays pinned until it ends) -> an exchange with the user's upstream over a
 * pooled SSH channel -> the response streamed back as it arrives. Bodies flow both ways with
 * bounded buffers: the client's body waits in `body` while the channel cannot take it (and lws
 * stops reading the client past a high-water mark); the response waits in `out` while the
 * client is slow (and the exchange stops reading the channel past a high-water mark).
 *
 * lws 4.1 has no chunked-response API: the head says "transfer-encoding: chunked" and
 * mg_http1_chunk_head() frames each piece. Plain HTTP is written on the loop's next turn
 * (kick()), TLS from lws's writable callback; either way through on_writeable().
 */
#include "moongate/gateway.h"

#include "buf.h"
#include "moongate/error.h"
#include "moongate/http1.h"
#include "moongate/json.h"
#include "moongate/log.h"

#include <arpa/inet.h>
#include <libwebsockets.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#define OUT_HIGH_WATER (512 * 1024)
#define OUT_LOW_WATER (128 * 1024)
#define BODY_HIGH_WATER (256 * 1024)
#define WRITE_CHUNK (96 * 1024)
#define MAX_HEADERS 96
#define HEAD_BUF_SIZE (32 * 1024)

typedef struct req req_t;

struct mg_front {
    mg_gateway_t *gw;
    struct lws_context *ctx;
    struct lws_vhost *vhost;
    int port;
    uv_idle_t kick;           /* writes the responses of kick_list on the loop's next turn */
    req_t *kick_list;
};

typedef struct pss pss_t;

struct req {
    mg_gateway_t *gw;
    mg_front_t *front;
    pss_t *pss;
    struct lws *wsi;
    req_t *kick_next, *kick_prev;
    bool kick_queued;
    mg_policy_state_t *pol;
    mg_exchange_t *x;
    char id[MG_HTTP1_REQUEST_ID_MAX + 1];
    char method[16];
    char remote[64];
    char user[MG_USER_ID_MAX + 1];
    mg__buf_t path;                 /* path?query, re-encoded */
    mg__buf_t hstore;               /* header names and values, NUL-terminated */
    mg_http1_header_t hdrs[MAX_HEADERS];
    mg_policy_header_t phdrs[MAX_HEADERS];
    size_t nhdrs;
    mg_policy_route_t route;
    mg_ssh_conn_opts_t route_opts;
    bool http10;
    /* the request body */
    bool has_body;
    uint64_t body_expected;         /* Content-Length, or MG_HTTP1_NO_LENGTH */
    uint64_t body_received;
    bool body_complete;
    bool body_ended;                /* told the exchange */
    bool rx_paused;
    mg__buf_t body;
    /* the response */
    int status;
    unsigned char *head;            /* LWS_PRE + the response head */
    size_t head_len;
    bool head_sent;
    bool resp_chunked;
    bool resp_complete;             /* everything is in `out` */
    bool abort_client;              /* cut the connection once `out` is written */
    bool exchange_paused;
    mg__buf_t out;
    uint64_t t_start, t_first;
    uint64_t bytes_down;
    bool counted;
};

struct pss {
    req_t *r;
};

static const char *const method_names[] = {
    "GET", "POST", "OPTIONS", "PUT", "PATCH", "DELETE", "CONNECT", "HEAD",
};

static _Thread_local unsigned char write_buf[LWS_PRE + WRITE_CHUNK];
_Static_assert(WRITE_CHUNK > HEAD_BUF_SIZE, "a head and some body fit one write");

/* ---- request bookkeeping ---- */

static void req_count(req_t *r)
{
    if (r->counted)
        return;
    r->counted = true;
    r->gw->in_flight--;
    mg_gateway_metrics_t *m = &r->gw->metrics;
    mg_counter_inc(m->requests_total[mg_http_status_class(r->status ? r->status : 499)]);
    mg_histogram_observe(m->request_duration, (double)(uv_hrtime() - r->t_start) / 1e9);
    if (mg_log_enabled(MG_LOG_INFO))
        mg_log(MG_LOG_INFO, "http", "req=%s user=%s %s %.*s -> %d, %llu bytes, %.1f ms",
               r->id, r->user[0] ? r->user : "-", r->method, (int)r->path.len,
               r->path.data ? r->path.data : "", r->status ? r->status : 499,
               (unsigned long long)r->bytes_down, (double)(uv_hrtime() - r->t_start) / 1e6);
}

static void on_kick(uv_idle_t *h);

static void kick_unlink(req_t *r)
{
    if (!r->kick_queued)
        return;
    if (r->kick_prev)
        r->kick_prev->kick_next = r->kick_next;
    else
        r->front->kick_list = r->kick_next;
    if (r->kick_next)
        r->kick_next->kick_prev = r->kick_prev;
    r->kick_next = r->kick_prev = NULL;
    r->kick_queued = false;
}

/*
 * Asks for the response to be written on the loop's next turn. Writing directly, instead of
 * asking lws for a writable callback, saves the poll changes that lws makes through libuv
 * (each costs two epoll_ctl calls), and one turn gathers a head, its body and its end. Plain
 * HTTP only: over TLS, lws must write from its writable callback.
 */
static void kick(req_t *r)
{
    if (r->gw->opts.tls_cert != NULL) {
        /* lws's TLS writes must come from its writable callback. */
        lws_callback_on_writable(r->wsi);
        return;
    }
    if (r->kick_queued)
        return;
    r->kick_queued = true;
    r->kick_prev = NULL;
    r->kick_next = r->front->kick_list;
    if (r->kick_next)
        r->kick_next->kick_prev = r;
    r->front->kick_list = r;
    if (!uv_is_active((uv_handle_t *)&r->front->kick))
        uv_idle_start(&r->front->kick, on_kick);
}

static void req_free(req_t *r)
{
    kick_unlink(r);
    if (r->x) {
        mg_exchange_abort(r->x);
        r->x = NULL;
    }
    req_count(r);
    if (r->pol)
        mg_policy_release(r->pol);
    mg__buf_free(&r->path);
    mg__buf_free(&r->hstore);
    mg__buf_free(&r->body);
    mg__buf_free(&r->out);
    free(r->head);
    free(r);
}

/* ---- building responses ---- */

/* Response heads are built in one per-thread buffer; head_finish() keeps an exact copy. */
static _Thread_local unsigned char head_buf[LWS_PRE + HEAD_BUF_SIZE];

static int head_begin(req_t *r, int status, unsigned char **p, unsigned char **end)
{
    *p = head_buf + LWS_PRE;
    *end = *p + HEAD_BUF_SIZE - 1;
    r->status = status;
    return lws_add_http_header_status(r->wsi, (unsigned int)status, p, *end);
}

static int head_add(req_t *r, const char *name, const char *value, size_t vlen,
                    unsigned char **p, unsigned char *end)
{
    return lws_add_http_header_by_name(r->wsi, (const unsigned char *)name,
                                       (const unsigned char *)value, (int)vlen, p, end);
}

static int head_finish(req_t *r, unsigned char **p, unsigned char *end)
{
    if (head_add(r, "x-request-id:", r->id, strlen(r->id), p, end) ||
        lws_finalize_http_header(r->wsi, p, end))
        return -1;
    size_t len = (size_t)(*p - (head_buf + LWS_PRE));
    free(r->head);
    r->head = malloc(LWS_PRE + len);
    if (r->head == NULL)
        return -1;
    memcpy(r->head + LWS_PRE, head_buf + LWS_PRE, len);
    r->head_len = len;
    return 0;
}

/* A complete local response (errors, /healthz, /metrics, /stats). */
static void respond(req_t *r, int status, const char *ctype, const char *body, size_t len,
                    const mg_policy_decision_t *d)
{
    unsigned char *p, *end;
    char clen[24];
    snprintf(clen, sizeof(clen), "%zu", len);
    if (head_begin(r, status, &p, &end) ||
        head_add(r, "content-type:", ctype, strlen(ctype), &p, end) ||
        head_add(r, "content-length:", clen, strlen(clen), &p, end) ||
        head_add(r, "cache-control:", "no-store", 8, &p, end)) {
        r->abort_client = true;
    }
    if (d != NULL)
        for (int i = 0; i < d->nheaders; i++) {
            char name[MG_POLICY_HEADER_NAME_MAX + 2];
            snprintf(name, sizeof(name), "%s:", d->headers[i].name);
            head_add(r, name, d->headers[i].value, strlen(d->headers[i].value), &p, end);
        }
    if (head_finish(r, &p, end) != 0)
        r->abort_client = true;
    if (strcmp(r->method, "HEAD") != 0)
        mg__buf_append(&r->out, body, len);
    r->resp_complete = true;
    kick(r);
}

/* {"error": message, "request_id": id} with status, and the decision's headers. */
static void respond_error(req_t *r, int status, const char *message,
                          const mg_policy_decision_t *d)
{
    mg_json_t j;
    mg_json_init(&j, 16 * 1024);
    mg_json_begin_object(&j);
    mg_json_key(&j, "error");
    mg_json_string(&j, message);
    mg_json_key(&j, "request_id");
    mg_json_string(&j, r->id);
    mg_json_end_object(&j);
    size_t len = 0;
    const char *body = mg_json_buf(&j, &len);
    if (body == NULL) {
        body = "{\"error\":\"internal error\"}";
        len = strlen(body);
    }
    if (status >= 500 || status == 401 || status == 403)
        mg_log_info("http", "req=%s user=%s %d: %s", r->id, r->user[0] ? r->user : "-", status,
                    message);
    respond(r, status, "application/json", body, len, d);
    mg_json_free(&j);
}

static int status_for(int err)
{
    switch (err) {
    case MG_EQUEUEFULL:
    case MG_ESHUTDOWN:
        return 503;
    case MG_ETIMEDOUT:
        return 504;
    case MG_ENOMEM:
    case MG_EINVAL:
        return 500;
    default:
        return 502;
    }
}

/* ---- the exchange's callbacks ---- */

static void out_append(req_t *r, const void *p, size_t n)
{
    if (mg__buf_append(&r->out, p, n) != 0)
        r->abort_client = true;
}

static bool is_hop_header(const char *name, size_t len)
{
    static const char *const hop[] = {
        "connection", "keep-alive", "proxy-connection", "transfer-encoding", "te",
        "trailer", "upgrade", "content-length", "x-request-id",
    };
    for (size_t i = 0; i < sizeof(hop) / sizeof(hop[0]); i++)
        if (strlen(hop[i]) == len && strncasecmp(name, hop[i], len) == 0)
            return true;
    return false;
}

static void x_on_head(mg_exchange_t *x, const mg_http1_resp_head_t *h)
{
    req_t *r = mg_exchange_data(x);
    unsigned char *p, *end;
    if (r->t_first == 0) {
        r->t_first = uv_hrtime();
        mg_histogram_observe(r->gw->metrics.time_to_first_byte,
                             (double)(r->t_first - r->t_start) / 1e9);
    }
    if (head_begin(r, h->status, &p, &end) != 0) {
        r->abort_client = true;
        return;
    }
    int bad = 0;
    char name[260];
    for (size_t i = 0; i < h->nheaders && !bad; i++) {
        const mg_http1_header_t *hd = &h->headers[i];
        if (is_hop_header(hd->name, hd->name_len) || hd->name_len + 2 > sizeof(name))
            continue;
        for (size_t k = 0; k < hd->name_len; k++)
            name[k] = (char)((hd->name[k] >= 'A' && hd->name[k] <= 'Z') ? hd->name[k] + 32
                                                                         : hd->name[k]);
        name[hd->name_len] = ':';
        name[hd->name_len + 1] = '\0';
        bad = head_add(r, name, hd->value, hd->value_len, &p, end);
    }
    char clen[24];
    switch (h->framing) {
    case MG_HTTP1_BODY_LENGTH:
        snprintf(clen, sizeof(clen), "%llu", (unsigned long long)h->content_length);
        bad = bad || head_add(r, "content-length:", clen, strlen(clen), &p, end);
        break;
    case MG_HTTP1_BODY_CHUNKED:
    case MG_HTTP1_BODY_CLOSE:
        if (r->http10) {
            bad = bad || head_add(r, "connection:", "close", 5, &p, end);
        } else {
            r->resp_chunked = true;
            bad = bad || head_add(r, "transfer-encoding:", "chunked", 7, &p, end);
        }
        break;
    case MG_HTTP1_BODY_NONE:
        if (h->content_length != MG_HTTP1_NO_LENGTH) {
            snprintf(clen, sizeof(clen), "%llu", (unsigned long long)h->content_length);
            bad = bad || head_add(r, "content-length:", clen, strlen(clen), &p, end);
        } else if (h->status != 204 && h->status != 304) {
            bad = bad || head_add(r, "content-length:", "0", 1, &p, end);
        }
        break;
    }
    if (bad || head_finish(r, &p, end) != 0) {
        mg_log_warn("http", "req=%s the upstream's response head does not fit in %d bytes",
                    r->id, HEAD_BUF_SIZE);
        r->abort_client = true;
    }
    kick(r);
}

static void x_on_body(mg_exchange_t *x, const char *buf, size_t len)
{
    req_t *r = mg_exchange_data(x);
    mg_counter_add(r->gw->metrics.upstream_received_bytes, len);
    if (r->resp_chunked) {
        char ch[MG_HTTP1_CHUNK_HEAD_MAX];
        size_t n = mg_http1_chunk_head(ch, len);
        out_append(r, ch, n);
        out_append(r, buf, len);
        out_append(r, MG_HTTP1_CHUNK_TAIL, MG_HTTP1_CHUNK_TAIL_LEN);
    } else {
        out_append(r, buf, len);
    }
    if (r->out.len - r->out.off > OUT_HIGH_WATER && !r->exchange_paused) {
        r->exchange_paused = true;
        mg_exchange_pause(x);
        /* A client that takes nothing more must not hold the channel forever. */
        lws_set_timeout(r->wsi, PENDING_TIMEOUT_HTTP_CONTENT, (int)r->gw->opts.send_timeout_s);
    }
    kick(r);
}

static void pump_body(req_t *r);

static void x_on_body_writable(mg_exchange_t *x)
{
    pump_body(mg_exchange_data(x));
}

static void x_on_done(mg_exchange_t *x, int status, const char *message)
{
    req_t *r = mg_exchange_data(x);
    r->x = NULL;
    if (status == 0) {
        if (r->resp_chunked)
            out_append(r, MG_HTTP1_LAST_CHUNK, MG_HTTP1_LAST_CHUNK_LEN);
        r->resp_complete = true;
    } else if (r->head != NULL && r->status != 0 && r->head_len > 0) {
        /* The head went (or is going) out: the client must see a cut, never a clean end. */
        mg_log_warn("http", "req=%s user=%s upstream failed mid-response: %s", r->id, r->user,
                    message);
        r->abort_client = true;
    } else {
        int code = status_for(status);
        mg_policy_decision_t d = { 0 };
        if (code == 503) {
            d.nheaders = 1;
            snprintf(d.headers[0].name, sizeof(d.headers[0].name), "retry-after");
            snprintf(d.headers[0].value, sizeof(d.headers[0].value), "1");
        }
        respond_error(r, code, message, &d);
    }
    kick(r);
}

static const mg_exchange_cbs_t x_cbs = {
    .on_head = x_on_head,
    .on_body = x_on_body,
    .on_body_writable = x_on_body_writable,
    .on_done = x_on_done,
};

/* Moves buffered request body to the exchange; resumes reading the client when room frees. */
static void pump_body(req_t *r)
{
    while (r->x && r->body.len > r->body.off) {
        ssize_t n = mg_exchange_write_body(r->x, r->body.data + r->body.off,
                                           r->body.len - r->body.off);
        if (n <= 0)
            break;
        mg_counter_add(r->gw->metrics.upstream_sent_bytes, (uint64_t)n);
        mg__buf_consume(&r->body, (size_t)n, 256 * 1024);
    }
    if (r->x && r->body_complete && !r->body_ended && r->body.len == r->body.off) {
        r->body_ended = true;
        mg_exchange_end_body(r->x);
    }
    if (r->rx_paused && r->body.len - r->body.off < BODY_HIGH_WATER / 2) {
        r->rx_paused = false;
        lws_rx_flow_control(r->wsi, 1);
    }
}

/* ---- the request head ---- */

static bool admin_allowed(req_t *r)
{
    const char *token = r->gw->opts.admin_token;
    if (token != NULL && *token != '\0') {
        for (size_t i = 0; i < r->nhdrs; i++)
            if (strcmp(r->hdrs[i].name, "authorization") == 0 &&
                strncmp(r->hdrs[i].value, "Bearer ", 7) == 0 &&
                strcmp(r->hdrs[i].value + 7, token) == 0)
                return true;
        return false;
    }
    return strncmp(r->remote, "127.", 4) == 0 || strcmp(r->remote, "::1") == 0 ||
           strncmp(r->remote, "::ffff:127.", 11) == 0;
}

static bool serve_local(req_t *r)
{
    const char *path = r->path.data;
    size_t plen = strcspn(path, "?");
    if (plen == 8 && memcmp(path, "/healthz", 8) == 0) {
        if (r->gw->draining)
            respond(r, 503, "text/plain", "draining\n", 9, NULL);
        else
            respond(r, 200, "text/plain", "ok\n", 3, NULL);
        return true;
    }
    bool metrics = plen == 8 && memcmp(path, "/metrics", 8) == 0;
    bool stats = plen == 6 && memcmp(path, "/stats", 6) == 0;
    if (!metrics && !stats)
        return false;
    if (!admin_allowed(r)) {
        respond_error(r, 403, "forbidden: set MOONGATE_ADMIN_TOKEN or ask from loopback", NULL);
        return true;
    }
    if (metrics) {
        mg_strbuf_t sb;
        mg_strbuf_init(&sb, 16 * 1024 * 1024);
        if (mg_metrics_render(r->gw->metrics_reg, &sb) == 0)
            respond(r, 200, "text/plain; version=0.0.4", sb.data, sb.len, NULL);
        else
            respond_error(r, 500, "cannot render metrics", NULL);
        mg_strbuf_free(&sb);
    } else {
        mg_json_t j;
        mg_json_init(&j, 16 * 1024 * 1024);
        mg__gateway_render_stats(r->gw, &j);
        size_t len = 0;
        const char *body = mg_json_buf(&j, &len);
        if (body)
            respond(r, 200, "application/json", body, len, NULL);
        else
            respond_error(r, 500, "cannot render stats", NULL);
        mg_json_free(&j);
    }
    return true;
}

/* Percent-encodes what may not appear in a request-target (lws hands us decoded text). */
static int append_encoded(mg__buf_t *b, const char *s, size_t n, bool query)
{
    static const char hex[] = "0123456789ABCDEF";
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
                  (c != 0 && strchr("-._~!$'()*+,;=:@/", c) != NULL) ||
                  (c == '&' && !query) || (query && c == '?');
        if (ok) {
            if (mg__buf_append(b, &c, 1))
                return -1;
        } else {
            char e[3] = { '%', hex[c >> 4], hex[c & 15] };
            if (mg__buf_append(b, e, 3))
                return -1;
        }
    }
    return 0;
}

static const char *store(req_t *r, const char *s, size_t n)
{
    /* Offsets, not pointers: the store may move while it grows. */
    size_t at = r->hstore.len;
    if (mg__buf_append(&r->hstore, s, n) || mg__buf_append(&r->hstore, "", 1))
        return NULL;
    return (const char *)(uintptr_t)(at + 1);
}

static int add_header(req_t *r, const char *name, size_t nlen, const char *value, size_t vlen)
{
    if (r->nhdrs >= MAX_HEADERS)
        return -1;
    const char *n = store(r, name, nlen), *v = store(r, value, vlen);
    if (n == NULL || v == NULL)
        return -1;
    r->hdrs[r->nhdrs] = (mg_http1_header_t){ n, nlen, v, vlen };
    r->nhdrs++;
    return 0;
}

/* Turns the stored offsets into pointers once the store stops growing. */
static void fix_headers(req_t *r)
{
    for (size_t i = 0; i < r->nhdrs; i++) {
        r->hdrs[i].name = r->hstore.data + ((uintptr_t)r->hdrs[i].name - 1);
        r->hdrs[i].value = r->hstore.data + ((uintptr_t)r->hdrs[i].value - 1);
        r->phdrs[i] = (mg_policy_header_t){ r->hdrs[i].name, r->hdrs[i].value };
    }
}

static int collect_headers(req_t *r)
{
    char val[8192];
    for (int t = 0; t < WSI_TOKEN_COUNT; t++) {
        int len = lws_hdr_total_length(r->wsi, (enum lws_token_indexes)t);
        if (len <= 0)
            continue;
        const char *name = (const char *)lws_token_to_string((enum lws_token_indexes)t);
        size_t nlen = name ? strlen(name) : 0;
        /* Header tokens read "name:"; methods, the URI, arguments and h2 pseudo-headers not. */
        if (nlen < 2 || name[nlen - 1] != ':' || name[0] == ':')
            continue;
        if (len >= (int)sizeof(val) ||
            lws_hdr_copy(r->wsi, val, sizeof(val), (enum lws_token_indexes)t) < 0)
            return 431;
        if (add_header(r, name, nlen - 1, val, strlen(val)) != 0)
            return 431;
    }
    const mg_gateway_opts_t *o = &r->gw->opts;
    for (int i = 0; i < o->nforward_headers; i++) {
        char cname[128];
        int cn = snprintf(cname, sizeof(cname), "%s:", o->forward_headers[i]);
        int len = lws_hdr_custom_length(r->wsi, cname, cn);
        if (len < 0)
            continue;
        if (len >= (int)sizeof(val) || lws_hdr_custom_copy(r->wsi, val, sizeof(val), cname, cn) < 0)
            return 431;
        if (add_header(r, cname, (size_t)cn - 1, val, (size_t)len) != 0)
            return 431;
    }
    fix_headers(r);
    return 0;
}

static const char *header(const req_t *r, const char *name)
{
    for (size_t i = 0; i < r->nhdrs; i++)
        if (strcmp(r->hdrs[i].name, name) == 0)
            return r->hdrs[i].value;
    return NULL;
}

/* The route as SSH options; the strings point into r->route. */
static void route_to_opts(req_t *r)
{
    mg_policy_route_t *rt = &r->route;
    mg_ssh_conn_opts_init(&r->route_opts, &r->gw->settings);
    r->route_opts.user = r->user;
    r->route_opts.host = rt->host;
    r->route_opts.port = rt->port;
    r->route_opts.ssh_user = rt->ssh_user;
    r->route_opts.key_path = rt->key;
    r->route_opts.key_passphrase = rt->key_passphrase[0] ? rt->key_passphrase : NULL;
    r->route_opts.known_hosts = rt->known_hosts[0] ? rt->known_hosts : NULL;
    r->route_opts.host_key_sha256 = rt->host_key[0] ? rt->host_key : NULL;
    r->route_opts.agent = rt->transport == MG_ROUTE_AGENT;
    if (r->route_opts.agent && rt->host[0] == '\0')
        r->route_opts.host = r->user; /* a name for known_hosts; nothing is dialed */
    if (r->route_opts.port <= 0)
        r->route_opts.port = 22;
    /* The pool enforces the user's channel limit; the session only needs room for it. */
    r->route_opts.max_channels = 1000;
}

/* Runs the policy and starts the exchange. Returns 0, or sends an error response. */
static void start_request(req_t *r)
{
    mg_gateway_t *gw = r->gw;
    mg_policy_request_t preq = {
        .method = r->method,
        .path = r->path.data,
        .remote_addr = r->remote,
        .headers = r->phdrs,
        .nheaders = r->nhdrs,
    };
    mg_policy_decision_t d;
    r->pol = mg_policy_acquire(gw->policy);
    if (mg_policy_authenticate(r->pol, &preq, &d) != 0 || !d.allow) {
        if (d.status >= 500)
            mg_counter_inc(gw->metrics.policy_errors);
        respond_error(r, d.status ? d.status : 401, d.message[0] ? d.message : "unauthorized",
                      &d);
        return;
    }
    snprintf(r->user, sizeof(r->user), "%s", d.user);
    if (mg_policy_admit(r->pol, &preq, r->user, &d) != 0 || !d.allow) {
        if (d.status >= 500)
            mg_counter_inc(gw->metrics.policy_errors);
        respond_error(r, d.status ? d.status : 429, d.message[0] ? d.message : "not admitted",
                      &d);
        return;
    }
    if (mg_policy_route(r->pol, &preq, r->user, &r->route, &d) != 0 || !d.allow) {
        mg_counter_inc(gw->metrics.policy_errors);
        respond_error(r, d.status ? d.status : 500, d.message[0] ? d.message : "no route", &d);
        return;
    }
    route_to_opts(r);

    char target_host[300];
    snprintf(target_host, sizeof(target_host), "%s:%d", r->route.target_host,
             r->route.target_port);
    int64_t blen = r->has_body ? (int64_t)r->body_expected : MG_HTTP1_BODY_LENGTH_NONE;
    mg_http1_request_t hreq = {
        .method = r->method,
        .path = r->path.data,
        .path_len = r->path.len,
        .host = target_host,
        .headers = r->hdrs,
        .nheaders = r->nhdrs,
        .client_addr = r->remote,
        .proto = gw->opts.tls_cert ? "https" : "http",
        .request_id = r->id,
        .body_length = blen,
    };
    char *head = NULL;
    size_t head_len = 0;
    const char *why = NULL;
    if (mg_http1_request_head(&hreq, &head, &head_len, &why) != 0) {
        respond_error(r, 400, why ? why : "bad request", NULL);
        return;
    }
    mg_exchange_req_t xr = {
        .user = r->user,
        .route = &r->route_opts,
        .target_host = r->route.target_host,
        .target_port = r->route.target_port,
        .method = r->method,
        .head = head,
        .head_len = head_len,
        .has_body = r->has_body,
    };
    char err[256];
    int rc = mg_exchange_start(gw->proxy, &xr, &x_cbs, r, &r->x, err, sizeof(err));
    free(head);
    if (rc != 0) {
        r->x = NULL;
        mg_policy_decision_t rd = { 0 };
        int code = status_for(rc);
        if (code == 503 || rc == MG_EBACKOFF) {
            rd.nheaders = 1;
            snprintf(rd.headers[0].name, sizeof(rd.headers[0].name), "retry-after");
            snprintf(rd.headers[0].value, sizeof(rd.headers[0].value), "%d",
                     1);
        }
        respond_error(r, code, err, &rd);
        return;
    }
    pump_body(r);
}

static req_t *req_new(mg_gateway_t *gw, struct lws *wsi, pss_t *pss)
{
    req_t *r = calloc(1, sizeof(*r));
    if (r == NULL)
        return NULL;
    r->gw = gw;
    r->front = gw->front;
    r->pss = pss;
    r->wsi = wsi;
    r->t_start = uv_hrtime();
    r->body_expected = MG_HTTP1_NO_LENGTH;
    gw->in_flight++;
    return r;
}

static int on_http(mg_gateway_t *gw, struct lws *wsi, pss_t *pss)
{
    /* The head is in: from here moongate's own deadlines bound the request (queue, upstream
       head). lws's would cut a long stream, or a request waiting for a channel. */
    lws_set_timeout(wsi, NO_PENDING_TIMEOUT, 0);
    req_t *r = req_new(gw, wsi, pss);
    if (r == NULL)
        return -1;
    pss->r = r;
    lws_get_peer_simple(wsi, r->remote, sizeof(r->remote));
    r->http10 = lws_hdr_total_length(wsi, WSI_TOKEN_HTTP1_0) > 0;

    char *uri = NULL;
    int ulen = 0;
    int m = lws_http_get_uri_and_method(wsi, &uri, &ulen);
    if (m < 0 || m >= (int)(sizeof(method_names) / sizeof(method_names[0])) || m == 6) {
        snprintf(r->method, sizeof(r->method), "?");
        mg__buf_append(&r->path, "/", 2);
        r->path.len--;
        respond_error(r, m == 6 ? 405 : 400, "unsupported method", NULL);
        return 0;
    }
    snprintf(r->method, sizeof(r->method), "%s", method_names[m]);

    /* The target: the path lws decoded, then its arguments, both encoded again. */
    append_encoded(&r->path, uri, (size_t)ulen, false);
    /* lws keeps each '&'-separated argument as a fragment; copying them whole joins with ','. */
    char args[8192];
    for (int n = 0;; n++) {
        int alen = lws_hdr_copy_fragment(wsi, args, sizeof(args), WSI_TOKEN_HTTP_URI_ARGS, n);
        if (alen < 0)
            break;
        mg__buf_append(&r->path, n == 0 ? "?" : "&", 1);
        append_encoded(&r->path, args, (size_t)alen, true);
    }
    if (mg__buf_append(&r->path, "", 1) != 0) {
        respond_error(r, 500, "out of memory", NULL);
        return 0;
    }
    r->path.len--;

    int hs = collect_headers(r);
    const char *rid = header(r, "x-request-id");
    if (rid && mg_http1_request_id_valid(rid, strlen(rid)))
        snprintf(r->id, sizeof(r->id), "%s", rid);
    else
        mg_http1_request_id_new(r->id);
    if (hs != 0) {
        respond_error(r, hs, "request headers too large", NULL);
        return 0;
    }
    if (serve_local(r))
        return 0;
    if (gw->draining) {
        mg_policy_decision_t d = { .nheaders = 1 };
        snprintf(d.headers[0].name, sizeof(d.headers[0].name), "retry-after");
        snprintf(d.headers[0].value, sizeof(d.headers[0].value), "5");
        respond_error(r, 503, gw->drain_message[0] ? gw->drain_message : "shutting down", &d);
        return 0;
    }

    mg_http1_req_framing_t fr;
    int status = 0;
    const char *why = NULL;
    if (mg_http1_check_request(r->method, r->hdrs, r->nhdrs, &fr, &status, &why) != 0) {
        respond_error(r, status ? status : 400, why ? why : "bad request", NULL);
        return 0;
    }
    if (fr.chunked) {
        /* libwebsockets 4.1 reads request bodies by Content-Length only: a chunked body would
           be taken for the next request. The connection closes after this answer. */
        respond_error(r, 411, "chunked request bodies are not supported: send Content-Length",
                      NULL);
        return 0;
    }
    r->body_expected = fr.content_length;
    r->has_body = fr.content_length != MG_HTTP1_NO_LENGTH && fr.content_length > 0;
    if (fr.content_length != MG_HTTP1_NO_LENGTH && fr.content_length > gw->opts.max_body_bytes) {
        respond_error(r, 413, "request body too large", NULL);
        return 0;
    }
    if (!r->has_body)
        r->body_complete = true;
    else /* a body that stops arriving is bounded like a head that does */
        lws_set_timeout(wsi, PENDING_TIMEOUT_HTTP_CONTENT, (int)gw->opts.header_timeout_s);
    start_request(r);
    return 0;
}

static int on_body(req_t *r, const void *in, size_t len)
{
    if (r->resp_complete || r->abort_client)
        return 0; /* already answered (an error); drop what follows */
    r->body_received += len;
    lws_set_timeout(r->wsi, PENDING_TIMEOUT_HTTP_CONTENT, (int)r->gw->opts.header_timeout_s);
    if (r->body_received > r->gw->opts.max_body_bytes) {
        if (r->x) {
            mg_exchange_abort(r->x);
            r->x = NULL;
        }
        respond_error(r, 413, "request body too large", NULL);
        return 0;
    }
    if (mg__buf_append(&r->body, in, len) != 0) {
        respond_error(r, 500, "out of memory", NULL);
        return 0;
    }
    if (r->body.len - r->body.off > BODY_HIGH_WATER && !r->rx_paused) {
        r->rx_paused = true;
        lws_rx_flow_control(r->wsi, 0);
    }
    pump_body(r);
    return 0;
}

static void on_body_complete(req_t *r)
{
    lws_set_timeout(r->wsi, NO_PENDING_TIMEOUT, 0);
    r->body_complete = true;
    pump_body(r);
}

/* Writes what is ready; frees r when its response is complete. Returns -1 to close the
   client connection. */
static int on_writeable(pss_t *pss, req_t *r)
{
    struct lws *wsi = r->wsi;
    /* The head goes out with the first piece of body, in one write; for HTTP/1 lws sends
       headers and body alike. Being writable, the first write needs no check of the pipe. */
    bool first = true;
    while (r->head_len > 0 && (!r->head_sent || r->out.len > r->out.off) &&
           (first || !lws_send_pipe_choked(wsi))) {
        size_t n = 0, h = 0;
        if (!r->head_sent) {
            h = r->head_len;
            memcpy(write_buf + LWS_PRE, r->head + LWS_PRE, h);
        }
        n = r->out.len - r->out.off;
        if (n > WRITE_CHUNK - h)
            n = WRITE_CHUNK - h;
        memcpy(write_buf + LWS_PRE + h, r->out.data + r->out.off, n);
        if (lws_write(wsi, write_buf + LWS_PRE, h + n,
                      r->head_sent ? LWS_WRITE_HTTP : LWS_WRITE_HTTP_HEADERS) != (int)(h + n))
            return -1;
        r->head_sent = true;
        r->bytes_down += n;
        mg__buf_consume(&r->out, n, 1024 * 1024);
        first = false;
        if (r->exchange_paused) /* the client is taking bytes: give it the full time again */
            lws_set_timeout(wsi, PENDING_TIMEOUT_HTTP_CONTENT, (int)r->gw->opts.send_timeout_s);
    }
    if (r->exchange_paused && r->x && r->out.len - r->out.off < OUT_LOW_WATER) {
        r->exchange_paused = false;
        mg_exchange_resume(r->x);
        lws_set_timeout(wsi, NO_PENDING_TIMEOUT, 0);
    }
    if (r->out.len > r->out.off) {
        lws_callback_on_writable(wsi);
        return 0;
    }
    if (r->abort_client)
        return -1;
    if (r->resp_complete && r->head_sent) {
        /* An unread request body would be taken for the next request: close instead. */
        bool close = !r->body_complete || r->http10;
        pss->r = NULL;
        req_free(r);
        if (close)
            return -1;
        return lws_http_transaction_completed(wsi) ? -1 : 0;
    }
    return 0;
}

static void on_kick(uv_idle_t *h)
{
    mg_front_t *f = h->data;
    while (f->kick_list) {
        req_t *r = f->kick_list;
        kick_unlink(r);
        struct lws *wsi = r->wsi;
        if (lws_partial_buffered(wsi)) {
            /* lws still holds bytes of an earlier write; it asks for writable itself. */
            lws_callback_on_writable(wsi);
            continue;
        }
        if (on_writeable(r->pss, r) < 0)
            lws_set_timeout(wsi, PENDING_TIMEOUT_CLOSE_SEND, LWS_TO_KILL_ASYNC);
    }
    uv_idle_stop(h);
}

static int callback_http(struct lws *wsi, enum lws_callback_reasons reason, void *user,
                         void *in, size_t len)
{
    pss_t *pss = user;
    struct lws_vhost *vh = lws_get_vhost(wsi);
    mg_front_t *f = vh ? lws_get_vhost_user(vh) : NULL;
    req_t *r = pss ? pss->r : NULL;

    switch (reason) {
    case LWS_CALLBACK_HTTP:
        if (r != NULL) {
            /* A new transaction on a kept-alive connection. */
            pss->r = NULL;
            req_free(r);
        }
        return on_http(f->gw, wsi, pss);
    case LWS_CALLBACK_HTTP_CONFIRM_UPGRADE:
        return mg__tunnel_confirm_upgrade(f->gw, wsi);
    case LWS_CALLBACK_HTTP_BODY:
        return r ? on_body(r, in, len) : 0;
    case LWS_CALLBACK_HTTP_BODY_COMPLETION:
        if (r)
            on_body_complete(r);
        return 0;
    case LWS_CALLBACK_HTTP_WRITEABLE:
        return r ? on_writeable(pss, r) : 0;
    case LWS_CALLBACK_CLOSED_HTTP:
        if (r) {
            if (r->x)
                mg_log_info("http", "req=%s user=%s client went away; closing the channel",
                            r->id, r->user);
            pss->r = NULL;
            req_free(r);
        }
        return 0;
    default:
        break;
    }
    return lws_callback_http_dummy(wsi, reason, user, in, len);
}

extern const struct lws_protocols mg__tunnel_protocol;

static const struct lws_protocols *protocols(void)
{
    static struct lws_protocols list[3];
    list[0] = (struct lws_protocols){ "moongate-http", callback_http, sizeof(pss_t), 0, 0, NULL,
                                      0 };
    list[1] = mg__tunnel_protocol;
    return list;
}

static void lws_log_emit(int level, const char *line)
{
    size_t n = strlen(line);
    while (n > 0 && (line[n - 1] == '\n' || line[n - 1] == '\r'))
        n--;
    mg_log(level == LLL_ERR ? MG_LOG_ERROR : MG_LOG_WARN, "lws", "%.*s", (int)n, line);
}

int mg__front_new(mg_gateway_t *gw, mg_front_t **out, char *err, size_t errlen)
{
    mg_front_t *f = calloc(1, sizeof(*f));
    if (f == NULL)
        return MG_ENOMEM;
    f->gw = gw;
    /* MOONGATE_LWS_LOG: libwebsockets' own log mask (e.g. 15 adds notices and info). */
    const char *lws_mask = getenv("MOONGATE_LWS_LOG");
    lws_set_log_level(lws_mask && *lws_mask ? atoi(lws_mask) : LLL_ERR | LLL_WARN, lws_log_emit);

    void *loops[1] = { gw->loop };
    struct lws_context_creation_info info;
    memset(&info, 0, sizeof(info));
    info.options = LWS_SERVER_OPTION_LIBUV | LWS_SERVER_OPTION_EXPLICIT_VHOSTS |
                   LWS_SERVER_OPTION_UV_NO_SIGSEGV_SIGFPE_SPIN;
    if (gw->opts.tls_cert)
        info.options |= LWS_SERVER_OPTION_DO_SSL_GLOBAL_INIT;
    /* lws 4.1 with IPv6 binds [::] even when told an IPv4 address: keep 127.0.0.1 private. */
    struct in_addr v4;
    if (gw->opts.listen_host && inet_pton(AF_INET, gw->opts.listen_host, &v4) == 1)
        info.options |= LWS_SERVER_OPTION_DISABLE_IPV6;
    info.foreign_loops = loops;
    info.count_threads = 1;
    info.timeout_secs = gw->opts.header_timeout_s;
    /* What bounds an unfinished request head (slowloris): how long a client may hold lws's
       header-parsing slot. */
    info.timeout_secs_ah_idle = gw->opts.header_timeout_s;
    info.max_http_header_data = 16 * 1024;
    info.max_http_header_pool = 1024;
    info.pt_serv_buf_size = 64 * 1024;
    info.keepalive_timeout = 75;
    f->ctx = lws_create_context(&info);
    if (f->ctx == NULL) {
        snprintf(err, errlen, "cannot start libwebsockets");
        free(f);
        return MG_ENOMEM;
    }

    struct lws_context_creation_info vi;
    memset(&vi, 0, sizeof(vi));
    vi.vhost_name = "moongate";
    vi.port = gw->opts.listen_port == 0 ? CONTEXT_PORT_NO_LISTEN_SERVER : gw->opts.listen_port;
    vi.iface = gw->opts.listen_host;
    vi.protocols = protocols();
    /* Agent WebSockets: ping after 30 s of quiet, hang up after 45 s without a pong. */
    static const lws_retry_bo_t ws_keepalive = {
        .secs_since_valid_ping = 30,
        .secs_since_valid_hangup = 45,
    };
    vi.retry_and_idle_policy = &ws_keepalive;
    vi.user = f;
    vi.timeout_secs = gw->opts.header_timeout_s;
    vi.timeout_secs_ah_idle = gw->opts.header_timeout_s;
    vi.keepalive_timeout = 75;
    /* Responses are framed for HTTP/1.1 (chunked), so TLS must not negotiate h2. */
    vi.alpn = "http/1.1";
    vi.ssl_cert_filepath = gw->opts.tls_cert;
    vi.ssl_private_key_filepath = gw->opts.tls_key;
    vi.options = info.options;
    if (gw->opts.listen_port == 0)
        vi.port = 0;
    f->vhost = lws_create_vhost(f->ctx, &vi);
    if (f->vhost == NULL) {
        snprintf(err, errlen, "cannot listen on %s:%d (in use, or a bad TLS certificate or key)",
                 gw->opts.listen_host, gw->opts.listen_port);
        mg__front_free(f);
        return MG_ECONFIG;
    }
    f->port = lws_get_vhost_listen_port(f->vhost);
    uv_idle_init(gw->loop, &f->kick);
    f->kick.data = f;
    *out = f;
    return 0;
}

mg_gateway_t *mg__front_gateway(const mg_front_t *f)
{
    return f->gw;
}

int mg__front_port(const mg_front_t *f)
{
    return f->port;
}

static void on_kick_closed(uv_handle_t *h)
{
    free(h->data);
}

void mg__front_free(mg_front_t *f)
{
    /* With a foreign loop the first destroy starts closing lws's handles; the loop must run
       for them to close before the second destroy frees the context. */
    lws_context_destroy(f->ctx);
    for (int i = 0; i < 1000 && uv_run(f->gw->loop, UV_RUN_NOWAIT) != 0; i++)
        ;
    lws_context_destroy(f->ctx);
    if (f->kick.loop != NULL)
        uv_close((uv_handle_t *)&f->kick, on_kick_closed);
    else
        free(f);
}
