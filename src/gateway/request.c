/*
 * request: one client request from its head to its access log line. See request.h.
 *
 * Bodies flow both ways through bounded buffers. The client's body waits in `body` (framed as
 * it goes upstream: as received for a Content-Length body, chunk by chunk for a chunked one)
 * while the channel cannot take it, and the server stops reading the client above a high-water
 * mark. The response goes to the client as it arrives, and the exchange stops reading the
 * channel while the client's queue is above its high-water mark.
 */
#include "request.h"

#include "core/buf.h"
#include "http/chunk.h"
#include "llm/llm_metrics.h"
#include "moongate/error.h"
#include "moongate/json.h"
#include "moongate/log.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#define LOG "http"
#define BODY_HIGH_WATER (256 * 1024)
#define LOG_TARGET_MAX 512   /* of a target in the access log */
#define DECODED_PATH_MAX 4096
/* A Content-Length body up to this size goes upstream in one write with the head: one SSH
   packet instead of two (libssh2 pays for each in randomness, a MAC and a cipher pass). */
#define COALESCE_MAX (16 * 1024)

typedef struct mg_req {
    mg_server_req_t base;
    mg_req_env_t *env;
    mg_client_t *c;                  /* NULL once the server is done with the request */
    const mg_http1_req_head_t *head; /* valid while c is */
    char id[MG_HTTP1_REQUEST_ID_MAX + 1];
    char user[MG_USER_ID_MAX + 1];
    char credential[MG_POLICY_HEADER_NAME_MAX]; /* the field authenticate read, or "" */
    mg_policy_state_t *pol;
    /* The hooks' progress: they may wait for Redis, and the request waits with them. */
    int pstep;                       /* P_AUTHENTICATE.. */
    bool policy_waiting;             /* a hook is waiting; done() comes back here */
    bool gone;                       /* the server finished with r while a hook waited */
    mg_policy_request_t preq;        /* what the hooks see; its strings in pscratch and head */
    void *pscratch;
    mg_policy_decision_t pd;
    mg_policy_route_t route;
    mg_ssh_conn_opts_t route_opts;
    mg_exchange_t *x;
    int status;
    /* the request body */
    bool has_body, chunked_up;
    bool coalescing;                 /* the body is gathered after the head in `up` */
    mg__buf_t up;                    /* the upstream head (and a small body), before the start */
    mg__buf_t body;
    uint64_t body_bytes;
    bool body_complete, body_ended, reading_paused;
    /* the response */
    bool head_sent, resp_ended, x_paused;
    const char *outcome;             /* for the access log: NULL or why it was cut */
    char outcome_buf[200];           /* where outcome points when it was composed */
    uint64_t t_start, t_first, bytes_down;
    mg_usage_scanner_t *usage;       /* reading a 2xx LLM response's usage as it passes */
} mg_req_t;

static const mg_server_req_ops_t req_ops;

/* ---------------------------------------------------------------------------------------------
 * Local responses
 */

void mg_req_id(const mg_http1_req_head_t *head, char out[MG_HTTP1_REQUEST_ID_MAX + 1])
{
    const mg_http1_header_t *h =
        head ? mg_http1_header_find(head->headers, head->nheaders, "x-request-id") : NULL;
    if (h && mg_http1_request_id_valid(h->value, h->value_len)) {
        memcpy(out, h->value, h->value_len);
        out[h->value_len] = '\0';
        return;
    }
    if (mg_http1_request_id_new(out) != 0)
        snprintf(out, MG_HTTP1_REQUEST_ID_MAX + 1, "-");
}

void mg_req_respond(mg_client_t *c, const char *request_id, int status, const char *ctype,
                    const char *body, size_t len, const mg_policy_decision_t *d)
{
    mg_http1_header_t hs[2 + MG_POLICY_MAX_HEADERS];
    size_t n = 0;
    hs[n++] = (mg_http1_header_t){ "Content-Type", 12, ctype, strlen(ctype) };
    hs[n++] = (mg_http1_header_t){ "Cache-Control", 13, "no-store", 8 };
    for (int i = 0; d && i < d->nheaders; i++)
        hs[n++] = (mg_http1_header_t){ d->headers[i].name, strlen(d->headers[i].name),
                                       d->headers[i].value, strlen(d->headers[i].value) };
    mg_client_head_t h = {
        .status = status,
        .headers = hs,
        .nheaders = n,
        .body_length = (int64_t)len,
        .request_id = request_id && mg_http1_request_id_valid(request_id, strlen(request_id))
                          ? request_id
                          : NULL,
    };
    if (mg_client_head(c, &h) != 0) {
        mg_client_abort(c);
        return;
    }
    mg_client_write(c, body, len);
    mg_client_end(c);
}

mg_error_format_t mg_req_error_format(mg_error_format_t f, const char *target, size_t len)
{
    if (f != MG_ERROR_FORMAT_AUTO)
        return f;
    /* The OpenAI API and the servers compatible with it (vLLM, llama.cpp's) live under /v1. */
    if (target && len >= 3 && memcmp(target, "/v1", 3) == 0 &&
        (len == 3 || target[3] == '/' || target[3] == '?'))
        return MG_ERROR_FORMAT_OPENAI;
    return MG_ERROR_FORMAT_PLAIN;
}

/* OpenAI's error type and code for a status, as its SDKs and clients expect them. */
static void openai_kind(int status, const char **type, const char **code)
{
    static const struct {
        int status;
        const char *type, *code;
    } kinds[] = {
        { 400, "invalid_request_error", "bad_request" },
        { 401, "authentication_error", "invalid_api_key" },
        { 403, "permission_error", "forbidden" },
        { 404, "invalid_request_error", "not_found" },
        { 408, "invalid_request_error", "request_timeout" },
        { 413, "invalid_request_error", "request_too_large" },
        { 429, "rate_limit_error", "rate_limit_exceeded" },
        { 502, "server_error", "bad_gateway" },
        { 503, "server_error", "service_unavailable" },
        { 504, "server_error", "timeout" },
    };
    for (size_t i = 0; i < sizeof(kinds) / sizeof(kinds[0]); i++)
        if (kinds[i].status == status) {
            *type = kinds[i].type;
            *code = kinds[i].code;
            return;
        }
    *type = status >= 500 ? "server_error" : "invalid_request_error";
    *code = NULL;
}

void mg_req_respond_error(mg_client_t *c, mg_error_format_t format, const char *request_id,
                          int status, const char *message, const mg_policy_decision_t *d)
{
    mg_json_t j;
    mg_json_init(&j, 16 * 1024);
    mg_json_begin_object(&j);
    mg_json_key(&j, "error");
    if (format == MG_ERROR_FORMAT_OPENAI) {
        const char *type, *code;
        openai_kind(status, &type, &code);
        mg_json_begin_object(&j);
        mg_json_key(&j, "message");
        mg_json_string(&j, message);
        mg_json_key(&j, "type");
        mg_json_string(&j, type);
        mg_json_key(&j, "param");
        mg_json_null(&j);
        mg_json_key(&j, "code");
        if (code)
            mg_json_string(&j, code);
        else
            mg_json_null(&j);
        mg_json_key(&j, "request_id");
        mg_json_string(&j, request_id);
        mg_json_end_object(&j);
    } else {
        mg_json_string(&j, message);
        mg_json_key(&j, "request_id");
        mg_json_string(&j, request_id);
    }
    mg_json_end_object(&j);
    size_t len = 0;
    const char *body = mg_json_buf(&j, &len);
    if (body == NULL) {
        body = "{\"error\":\"internal error\"}";
        len = strlen(body);
    }
    mg_req_respond(c, request_id, status, "application/json", body, len, d);
    mg_json_free(&j);
}

void mg_req_retry_after(mg_policy_decision_t *d, const char *seconds)
{
    if (d->nheaders >= MG_POLICY_MAX_HEADERS)
        return;
    snprintf(d->headers[d->nheaders].name, sizeof(d->headers[0].name), "Retry-After");
    snprintf(d->headers[d->nheaders].value, sizeof(d->headers[0].value), "%s", seconds);
    d->nheaders++;
}

/* The shape of this request's error bodies: the route's choice, else the policy's, else by
   the path. */
static mg_error_format_t req_error_format(const mg_req_t *r)
{
    mg_error_format_t f = r->route.error_format;
    if (f == MG_ERROR_FORMAT_AUTO && r->pol)
        f = mg_policy_error_format(r->pol);
    return mg_req_error_format(f, r->head->target, r->head->target_len);
}

/* An error for this request: logged when it is the gateway's or the upstream's fault. */
static void req_error(mg_req_t *r, int status, const char *message, const mg_policy_decision_t *d)
{
    r->status = status;
    if (status >= 500 || status == 401 || status == 403)
        mg_log_info(LOG, "req=%s user=%s %d: %s", r->id, r->user[0] ? r->user : "-", status,
                    message);
    if (r->c)
        mg_req_respond_error(r->c, req_error_format(r), r->id, status, message, d);
    r->resp_ended = true;
}

/* ---------------------------------------------------------------------------------------------
 * Accounting
 */

/* The User-Agent for a log line, quoted (or - without one): at most 128 bytes, with " and \
   escaped (the parser let through visible ASCII and blanks only). */
static void quote_agent(const mg_http1_req_head_t *h, char *out, size_t cap)
{
    const mg_http1_header_t *f = mg_http1_header_find(h->headers, h->nheaders, "user-agent");
    if (f == NULL) {
        snprintf(out, cap, "-");
        return;
    }
    size_t o = 0;
    out[o++] = '"';
    for (size_t i = 0; i < f->value_len && i < 128 && o + 4 < cap; i++) {
        char ch = f->value[i];
        if (ch == '"' || ch == '\\')
            out[o++] = '\\';
        out[o++] = ch;
    }
    out[o++] = '"';
    out[o] = '\0';
}

void mg_req_account(mg_req_env_t *env, const mg_req_done_t *d, mg_log_level_t level)
{
    mg_gateway_metrics_t *m = env->metrics;
    const mg_usage_t *usage = d->usage;
    double secs = (double)(uv_hrtime() - d->t_start_ns) / 1e9;
    mg_counter_inc(m->requests_total[mg_http_status_class(d->status)]);
    mg_histogram_observe(m->request_duration, secs);
    if (env->llm)
        mg_llm_metrics_count(env->llm, d->user, usage ? usage->model : NULL,
                             usage ? usage->prompt_tokens : -1,
                             usage ? usage->completion_tokens : -1);
    if (!mg_log_enabled(level))
        return;
    char used[MG_USAGE_MODEL_MAX + 96] = "";
    if (usage && usage->found)
        snprintf(used, sizeof(used), ", model=%s prompt_tokens=%lld completion_tokens=%lld",
                 usage->model[0] ? usage->model : "-", (long long)usage->prompt_tokens,
                 (long long)usage->completion_tokens);
    char ua[300];
    quote_agent(d->head, ua, sizeof(ua));
    const mg_http1_req_head_t *h = d->head;
    int tl = h->target_len > LOG_TARGET_MAX ? LOG_TARGET_MAX : (int)h->target_len;
    mg_log(level, LOG, "req=%s user=%s client=%s ua=%s %s %.*s%s -> %d, %llu bytes, %.1f ms%s%s%s",
           d->id, d->user && d->user[0] ? d->user : "-", mg_client_remote(d->c), ua, h->method,
           tl, h->target, h->target_len > LOG_TARGET_MAX ? "..." : "", d->status,
           (unsigned long long)d->bytes, secs * 1000, used,
           d->outcome && d->outcome[0] ? ", " : "", d->outcome ? d->outcome : "");
}

static void req_free(mg_req_t *r)
{
    free(r->pscratch);
    if (r->x) {
        mg_exchange_abort(r->x);
        r->x = NULL;
    }
    if (r->pol)
        mg_policy_release(r->pol);
    mg_usage_scanner_free(r->usage);
    mg__buf_free(&r->body);
    mg__buf_free(&r->up);
    r->env->in_flight--;
    free(r);
}

/* ---------------------------------------------------------------------------------------------
 * The exchange's callbacks
 */

static int status_for(int err)
{
    switch (err) {
    case MG_EQUEUEFULL:
    case MG_EBUSY:
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

static void x_on_head(mg_exchange_t *x, const mg_http1_resp_head_t *h)
{
    mg_req_t *r = mg_exchange_data(x);
    if (r->t_first == 0) {
        r->t_first = uv_hrtime();
        mg_histogram_observe(r->env->metrics->time_to_first_byte,
                             (double)(r->t_first - r->t_start) / 1e9);
    }
    int64_t len = -1;
    if (h->framing == MG_HTTP1_BODY_LENGTH)
        len = (int64_t)h->content_length;
    else if (h->framing == MG_HTTP1_BODY_NONE)
        len = h->content_length != MG_HTTP1_NO_LENGTH ? (int64_t)h->content_length : 0;
    const mg_http1_header_t *ct = mg_http1_header_find(h->headers, h->nheaders, "content-type");
    mg_usage_format_t uf = ct ? mg_usage_format(ct->value, ct->value_len) : MG_USAGE_NONE;
    /* What the upstream reports of its cost, read on the way; a scanner that cannot be had
       only means a request without usage. */
    if (uf != MG_USAGE_NONE && h->status >= 200 && h->status < 300 && !r->usage)
        (void)mg_usage_scanner_new(uf, &r->usage);
    mg_client_head_t ch = {
        .status = h->status,
        .headers = h->headers,
        .nheaders = h->nheaders,
        .body_length = len,
        .request_id = r->id,
    };
    /* A streamed response must not wait in a buffering proxy in front of the gateway (nginx
       honours X-Accel-Buffering, and others follow it). */
    mg_http1_header_t with[MG_HTTP1_MAX_HEADERS + 1];
    bool streamed = len < 0 || uf == MG_USAGE_NDJSON || uf == MG_USAGE_SSE;
    if (streamed && h->nheaders < MG_HTTP1_MAX_HEADERS &&
        !mg_http1_header_find(h->headers, h->nheaders, "x-accel-buffering")) {
        memcpy(with, h->headers, h->nheaders * sizeof(*with));
        with[h->nheaders] = (mg_http1_header_t){ "X-Accel-Buffering", 17, "no", 2 };
        ch.headers = with;
        ch.nheaders = h->nheaders + 1;
    }
    r->status = h->status;
    r->head_sent = true;
    if (mg_client_head(r->c, &ch) != 0) {
        mg_log_warn(LOG, "req=%s the upstream's response head cannot be passed on", r->id);
        r->outcome = "cut: the upstream's response head could not be passed on";
        mg_client_abort(r->c);
        mg_exchange_abort(x);
        r->x = NULL;
    }
}

static void x_on_body(mg_exchange_t *x, const char *buf, size_t len)
{
    mg_req_t *r = mg_exchange_data(x);
    mg_counter_add(r->env->metrics->upstream_received_bytes, len);
    r->bytes_down += len;
    if (r->usage)
        mg_usage_feed(r->usage, buf, len);
    mg_client_write(r->c, buf, len);
    if (!r->x_paused && mg_client_queued(r->c) > MG_CLIENT_HIGH_WATER) {
        r->x_paused = true;
        mg_exchange_pause(x);
    }
}

static void pump_body(mg_req_t *r);

static void x_on_body_writable(mg_exchange_t *x)
{
    pump_body(mg_exchange_data(x));
}

static void x_on_done(mg_exchange_t *x, int status, const char *message)
{
    mg_req_t *r = mg_exchange_data(x);
    r->x = NULL;
    if (status == 0) {
        mg_client_end(r->c);
        r->resp_ended = true;
        return;
    }
    if (r->head_sent) {
        /* The head went out: the client must see a cut, never a clean end. */
        const mg_shutdown_t *sd = r->env->shutdown;
        if (r->env->draining && sd != NULL && sd->result.forced) {
            snprintf(r->outcome_buf, sizeof(r->outcome_buf),
                     "cut: the drain's grace period (%llu ms) ended",
                     (unsigned long long)sd->opts.grace_ms);
            mg_log_warn(LOG, "req=%s user=%s cut by the drain after its grace period", r->id,
                        r->user);
        } else {
            snprintf(r->outcome_buf, sizeof(r->outcome_buf),
                     "cut: the upstream failed mid-response (%s)", message);
            mg_log_warn(LOG, "req=%s user=%s upstream failed mid-response: %s", r->id, r->user,
                        message);
        }
        r->outcome = r->outcome_buf;
        mg_client_abort(r->c);
        r->resp_ended = true;
        return;
    }
    int code = status_for(status);
    mg_policy_decision_t d = { 0 };
    if (code == 503)
        mg_req_retry_after(&d, "1");
    req_error(r, code, message, &d);
}

static const mg_exchange_cbs_t x_cbs = {
    .on_head = x_on_head,
    .on_body = x_on_body,
    .on_body_writable = x_on_body_writable,
    .on_done = x_on_done,
};

/* ---------------------------------------------------------------------------------------------
 * The request body
 */

/* Moves buffered body to the exchange; the client is read again when room frees. */
static void pump_body(mg_req_t *r)
{
    while (r->x && mg__buf_size(&r->body) > 0) {
        ssize_t n = mg_exchange_write_body(r->x, r->body.data + r->body.off,
                                           mg__buf_size(&r->body));
        if (n <= 0)
            break;
        mg_counter_add(r->env->metrics->upstream_sent_bytes, (uint64_t)n);
        mg__buf_consume(&r->body, (size_t)n, 256 * 1024);
    }
    if (r->x && r->body_complete && !r->body_ended && mg__buf_size(&r->body) == 0) {
        r->body_ended = true;
        mg_exchange_end_body(r->x);
    }
    if (r->reading_paused && r->c && mg__buf_size(&r->body) < BODY_HIGH_WATER / 2) {
        r->reading_paused = false;
        mg_client_read_body(r->c);
    }
}

static int body_append(mg_req_t *r, const char *data, size_t len)
{
    return mg__buf_append(&r->body, data, len);
}

static bool start_exchange(mg_req_t *r, bool has_body);

static int on_body(mg_server_req_t *base, const char *data, size_t len)
{
    mg_req_t *r = (mg_req_t *)base;
    if (r->resp_ended)
        return 0;
    if (r->coalescing) {
        /* Bounded: the Content-Length is at most COALESCE_MAX. */
        r->body_bytes += len;
        if (mg__buf_append(&r->up, data, len) != 0)
            req_error(r, 500, "out of memory", NULL);
        return 0;
    }
    r->body_bytes += len;
    if (r->body_bytes > r->env->max_body_bytes) {
        if (r->x) {
            mg_exchange_abort(r->x);
            r->x = NULL;
        }
        if (r->head_sent) {
            r->outcome = "cut: the request body grew too large";
            mg_client_abort(r->c);
            r->resp_ended = true;
        } else {
            req_error(r, 413, "request body too large", NULL);
        }
        return 0;
    }
    int rc = r->chunked_up ? mg__http1_append_chunk(&r->body, data, len)
                           : mg__buf_append(&r->body, data, len);
    if (rc != 0) {
        req_error(r, 500, "out of memory", NULL);
        return 0;
    }
    pump_body(r);
    if (mg__buf_size(&r->body) > BODY_HIGH_WATER) {
        r->reading_paused = true;
        return 1;
    }
    return 0;
}

/* Trailer fields that may not go on: framing, routing and hop-by-hop ones (RFC 9110 6.5.1). */
static bool trailer_dropped(const mg_http1_header_t *t, size_t n, const mg_http1_header_t *f)
{
    static const char *const never[] = { "content-length", "host", "authorization",
                                         "content-type", "content-encoding", "x-request-id" };
    for (size_t i = 0; i < sizeof(never) / sizeof(never[0]); i++)
        if (f->name_len == strlen(never[i]) && strncasecmp(f->name, never[i], f->name_len) == 0)
            return true;
    return mg_http1_header_is_hop(t, n, f->name, f->name_len);
}

static void on_body_end(mg_server_req_t *base, const mg_http1_header_t *trailers, size_t n)
{
    mg_req_t *r = (mg_req_t *)base;
    if (r->resp_ended)
        return;
    if (r->coalescing) {
        r->coalescing = false;
        start_exchange(r, false);
        return;
    }
    if (r->chunked_up) {
        int rc = body_append(r, "0\r\n", 3);
        for (size_t i = 0; i < n && rc == 0; i++) {
            const mg_http1_header_t *f = &trailers[i];
            if (trailer_dropped(trailers, n, f))
                continue;
            rc = body_append(r, f->name, f->name_len);
            rc = rc ? rc : body_append(r, ": ", 2);
            rc = rc ? rc : body_append(r, f->value, f->value_len);
            rc = rc ? rc : body_append(r, "\r\n", 2);
        }
        if (rc == 0)
            rc = body_append(r, "\r\n", 2);
        if (rc != 0) {
            req_error(r, 500, "out of memory", NULL);
            return;
        }
    }
    r->body_complete = true;
    pump_body(r);
}

/* The client's body was malformed: the upstream request cannot be completed. */
static void on_body_error(mg_server_req_t *base, int status, const char *why)
{
    mg_req_t *r = (mg_req_t *)base;
    if (r->x) {
        mg_exchange_abort(r->x);
        r->x = NULL;
    }
    r->coalescing = false;
    if (r->resp_ended)
        return;
    if (r->head_sent) {
        r->outcome = "cut: the request body was malformed";
        mg_client_abort(r->c);
        r->resp_ended = true;
        return;
    }
    req_error(r, status, why, NULL);
}

/* ---------------------------------------------------------------------------------------------
 * The client side's callbacks
 */

static void on_drain(mg_server_req_t *base)
{
    mg_req_t *r = (mg_req_t *)base;
    if (r->x_paused && r->x) {
        r->x_paused = false;
        mg_exchange_resume(r->x);
    }
}

/* The policy's on_event hears of every request when it ends. */
static void request_event(const mg_req_t *r, int status, const char *outcome,
                          const mg_usage_t *u)
{
    uint64_t now = uv_hrtime();
    char path[LOG_TARGET_MAX + 1];
    size_t pl = r->head->target_len > LOG_TARGET_MAX ? LOG_TARGET_MAX : r->head->target_len;
    memcpy(path, r->head->target, pl);
    path[pl] = '\0';
    mg_policy_request_info_t info = {
        .method = r->head->method,
        .path = path,
        .status = status,
        .bytes_in = r->body_bytes,
        .bytes_out = r->bytes_down,
        .ttfb_ms = r->t_first ? (double)(r->t_first - r->t_start) / 1e6 : -1,
        .duration_ms = (double)(now - r->t_start) / 1e6,
        .model = u && u->model[0] ? u->model : NULL,
        .prompt_tokens = u ? u->prompt_tokens : -1,
        .completion_tokens = u ? u->completion_tokens : -1,
        .outcome = outcome,
    };
    mg_policy_event_t ev = {
        .type = "request",
        .user = r->user[0] ? r->user : NULL,
        .message = r->id,
        .request = &info,
    };
    mg_policy_event(r->env->policy, &ev);
}

static void on_done(mg_server_req_t *base, bool complete)
{
    mg_req_t *r = (mg_req_t *)base;
    const char *outcome = r->outcome;
    if (!complete && r->x) {
        mg_log_info(LOG, "req=%s user=%s client went away; closing the channel", r->id,
                    r->user[0] ? r->user : "-");
        outcome = "cut: the client went away";
    } else if (!complete && !outcome) {
        outcome = "cut: the connection to the client failed";
    }
    mg_usage_t usage;
    bool have_usage = false;
    if (r->usage) {
        mg_usage_result(r->usage, &usage);
        have_usage = usage.found;
    }
    int status = r->status ? r->status : 499;
    mg_req_done_t done = { .id = r->id, .user = r->user, .c = r->c, .head = r->head,
                           .status = status, .bytes = r->bytes_down, .t_start_ns = r->t_start,
                           .outcome = outcome, .usage = have_usage ? &usage : NULL };
    mg_req_account(r->env, &done, MG_LOG_INFO);
    if (mg_policy_has_on_event(r->env->policy))
        request_event(r, status, outcome, have_usage ? &usage : NULL);
    r->c = NULL;
    r->head = NULL;
    if (r->policy_waiting) {
        r->gone = true; /* freed when the hook's answer comes */
        return;
    }
    req_free(r);
}

static const mg_server_req_ops_t req_ops = {
    .on_body = on_body,
    .on_body_end = on_body_end,
    .on_body_error = on_body_error,
    .on_drain = on_drain,
    .on_done = on_done,
};

/* ---------------------------------------------------------------------------------------------
 * Starting
 */

/* The route as SSH options; the strings point into r->route. */
static void route_to_opts(mg_req_t *r)
{
    mg_policy_route_t *rt = &r->route;
    mg_ssh_conn_opts_init(&r->route_opts, r->env->settings);
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

/*
 * The request as the hooks see it: names in lower case (copies), the target raw and decoded.
 * Returns 0 with *scratch to free, or MG_ENOMEM.
 */
static int policy_request(const mg_req_t *r, mg_policy_request_t *preq, void **scratch)
{
    const mg_http1_req_head_t *h = r->head;
    size_t names = 0;
    for (size_t i = 0; i < h->nheaders; i++)
        names += h->headers[i].name_len + 1;
    size_t hdrs = h->nheaders * sizeof(mg_policy_header_t);
    char *mem = malloc(hdrs + names + DECODED_PATH_MAX);
    if (mem == NULL)
        return MG_ENOMEM;
    mg_policy_header_t *ph = (mg_policy_header_t *)mem;
    char *p = mem + hdrs;
    for (size_t i = 0; i < h->nheaders; i++) {
        const mg_http1_header_t *f = &h->headers[i];
        for (size_t k = 0; k < f->name_len; k++) {
            char c = f->name[k];
            p[k] = (char)(c >= 'A' && c <= 'Z' ? c + 32 : c);
        }
        p[f->name_len] = '\0';
        ph[i] = (mg_policy_header_t){ p, f->value };
        p += f->name_len + 1;
    }
    bool decoded = mg_http1_path_decode(h->target, h->target_len, p, DECODED_PATH_MAX) == 0;
    static uint64_t seq;
    *preq = (mg_policy_request_t){
        .seq = ++seq,
        .method = h->method,
        .path = h->target,
        .decoded_path = decoded ? p : NULL,
        .remote_addr = mg_client_remote(r->c),
        .headers = ph,
        .nheaders = h->nheaders,
    };
    *scratch = mem;
    return 0;
}

enum { P_AUTHENTICATE, P_ADMIT, P_ROUTE, P_DONE };

/* What a refusal by each hook answers when the hook names no status or message, and whether
   it counts as a policy error even below 500 (a route hook that says no is a broken policy). */
static const struct {
    int status;
    const char *message;
    bool always_an_error;
} hook_refusal[] = {
    [P_AUTHENTICATE] = { 401, "unauthorized", false },
    [P_ADMIT] = { 429, "not admitted", false },
    [P_ROUTE] = { 500, "no route", true },
};

/* Takes the answer of the hook at r->pstep. Returns true to go on, or false after refusing. */
static bool policy_answer(mg_req_t *r, int rc)
{
    mg_policy_decision_t *d = &r->pd;
    if (rc != 0 || !d->allow) {
        if (hook_refusal[r->pstep].always_an_error || d->status >= 500)
            mg_counter_inc(r->env->metrics->policy_errors);
        req_error(r, d->status ? d->status : hook_refusal[r->pstep].status,
                  d->message[0] ? d->message : hook_refusal[r->pstep].message, d);
        return false;
    }
    if (r->pstep == P_AUTHENTICATE) {
        snprintf(r->user, sizeof(r->user), "%s", d->user);
        snprintf(r->credential, sizeof(r->credential), "%s", d->credential);
    }
    r->pstep++;
    return true;
}

static void admitted(mg_req_t *r);
static void policy_waited(void *arg, int rc);

/*
 * Runs the hooks from r->pstep on; each may wait (for Redis), and then policy_waited picks up.
 * With r->user and r->route set, goes on to admitted().
 */
static void policy_run(mg_req_t *r)
{
    while (r->pstep != P_DONE) {
        int rc;
        if (r->pstep == P_AUTHENTICATE)
            rc = mg_policy_authenticate_wait(r->pol, &r->preq, &r->pd, policy_waited, r);
        else if (r->pstep == P_ADMIT)
            rc = mg_policy_admit_wait(r->pol, &r->preq, r->user, &r->pd, policy_waited, r);
        else
            rc = mg_policy_route_wait(r->pol, &r->preq, r->user, &r->route, &r->pd,
                                      policy_waited, r);
        if (rc == MG_EAGAIN) {
            r->policy_waiting = true;
            return;
        }
        if (!policy_answer(r, rc))
            return;
    }
    free(r->pscratch);
    r->pscratch = NULL;
    admitted(r);
}

static void policy_waited(void *arg, int rc)
{
    mg_req_t *r = arg;
    r->policy_waiting = false;
    if (r->gone) {
        req_free(r);
        return;
    }
    if (policy_answer(r, rc))
        policy_run(r);
}

/* Builds the upstream head into r->up. Returns true, or false after refusing. */
static bool build_head(mg_req_t *r)
{
    const mg_http1_req_head_t *h = r->head;
    route_to_opts(r);
    const mg_policy_route_t *rt = &r->route;
    char target_host[300];
    if (rt->host_header[0])
        snprintf(target_host, sizeof(target_host), "%s", rt->host_header);
    else
        snprintf(target_host, sizeof(target_host), "%s:%d", rt->target_host, rt->target_port);
    /* The gateway's own credential stays here unless the route lets it through; then the
       route's rules. */
    mg_http1_field_edit_t edits[MG_ROUTE_HEADER_RULES_MAX + 1];
    size_t ne = 0;
    if (r->credential[0] && !rt->forward_credential)
        edits[ne++] = (mg_http1_field_edit_t){ r->credential, strlen(r->credential), NULL, 0 };
    for (int i = 0; i < rt->nrules; i++) {
        const mg_policy_header_rule_t *k = &rt->rules[i];
        edits[ne++] = (mg_http1_field_edit_t){
            rt->rule_buf + k->name_off, k->name_len,
            k->remove ? NULL : rt->rule_buf + k->value_off, k->value_len,
        };
    }
    int64_t blen = MG_HTTP1_BODY_LENGTH_NONE;
    if (h->body == MG_HTTP1_REQ_BODY_LENGTH)
        blen = (int64_t)h->content_length;
    else if (h->body == MG_HTTP1_REQ_BODY_CHUNKED)
        blen = MG_HTTP1_BODY_LENGTH_CHUNKED;
    mg_http1_request_t hreq = {
        .method = h->method,
        .path = h->target,
        .path_len = h->target_len,
        .host = target_host,
        .headers = h->headers,
        .nheaders = h->nheaders,
        .client_addr = mg_client_remote(r->c),
        .proto = mg_client_tls(r->c) ? "https" : "http",
        .request_id = r->id,
        .body_length = blen,
        .edits = edits,
        .nedits = ne,
    };
    char *head = NULL;
    size_t head_len = 0;
    const char *why = NULL;
    if (mg_http1_request_head(&hreq, &head, &head_len, &why) != 0) {
        req_error(r, 400, why && *why ? why : "bad request", NULL);
        return false;
    }
    r->up = (mg__buf_t){ .data = head, .len = head_len, .cap = head_len };
    return true;
}

/*
 * Starts the exchange with r->up (the head, and the body when it was gathered) and frees it.
 * Returns true, or false after refusing.
 */
static bool start_exchange(mg_req_t *r, bool has_body)
{
    mg_exchange_req_t xr = {
        .user = r->user,
        .route = &r->route_opts,
        .target_host = r->route.target_host,
        .target_port = r->route.target_port,
        .method = r->head->method,
        .head = r->up.data,
        .head_len = r->up.len,
        .has_body = has_body,
        .head_timeout_ms = r->route.head_timeout_ms,
        .idle_timeout_ms = r->route.idle_timeout_ms,
    };
    char err[256];
    int rc = mg_exchange_start(r->env->proxy, &xr, &x_cbs, r, &r->x, err, sizeof(err));
    mg__buf_free(&r->up);
    if (rc != 0) {
        r->x = NULL;
        int code = status_for(rc);
        mg_policy_decision_t d = { 0 };
        if (code == 503 || rc == MG_EBACKOFF)
            mg_req_retry_after(&d, "1");
        req_error(r, code, err, &d);
        return false;
    }
    return true;
}

mg_server_req_t *mg_req_start(mg_req_env_t *env, mg_client_t *c, const mg_http1_req_head_t *head)
{
    mg_req_t *r = calloc(1, sizeof(*r));
    if (r == NULL) {
        char id[MG_HTTP1_REQUEST_ID_MAX + 1];
        mg_req_id(head, id);
        mg_req_respond_error(c, mg_req_error_format(MG_ERROR_FORMAT_AUTO, head->target,
                                                    head->target_len),
                             id, 500, "out of memory", NULL);
        return NULL;
    }
    r->base.ops = &req_ops;
    r->env = env;
    r->c = c;
    r->head = head;
    r->t_start = uv_hrtime();
    r->outcome = NULL;
    r->pol = mg_policy_acquire(env->policy);
    env->in_flight++;
    mg_req_id(head, r->id);
    r->has_body = head->body != MG_HTTP1_REQ_BODY_NONE;
    r->chunked_up = head->body == MG_HTTP1_REQ_BODY_CHUNKED;

    if (env->draining) {
        mg_policy_decision_t d = { 0 };
        mg_req_retry_after(&d, "5");
        req_error(r, 503, env->drain_message && *env->drain_message ? env->drain_message
                                                                   : "shutting down",
                  &d);
        return &r->base;
    }
    if (head->body == MG_HTTP1_REQ_BODY_LENGTH && head->content_length > env->max_body_bytes) {
        req_error(r, 413, "request body too large", NULL);
        return &r->base;
    }
    if (policy_request(r, &r->preq, &r->pscratch) != 0) {
        req_error(r, 500, "out of memory", NULL);
        return &r->base;
    }
    policy_run(r);
    return &r->base;
}

/* The hooks let the request through: the upstream head, then the body. */
static void admitted(mg_req_t *r)
{
    const mg_http1_req_head_t *head = r->head;
    if (!build_head(r))
        return;
    /* Admitted: now the body (and the 100 Continue it may be waiting for). A small one is
       gathered first and goes with the head. */
    if (head->body == MG_HTTP1_REQ_BODY_LENGTH && head->content_length <= COALESCE_MAX) {
        r->coalescing = true;
        mg_client_read_body(r->c);
        return;
    }
    if (!start_exchange(r, r->has_body))
        return;
    if (r->has_body)
        mg_client_read_body(r->c);
}
