#include "moongate/metrics.h"

#include "moongate/error.h"

#include <math.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

enum kind {
    KIND_COUNTER,
    KIND_GAUGE,
    KIND_HISTOGRAM,
};

/*
 * Bucket counts are kept per bucket, not cumulative, so an observation touches one of them;
 * the render adds them up. The bounds live in the same allocation, after the counts.
 */
struct mg_histogram {
    uint64_t count;
    double sum;
    size_t n;        /* finite bounds; buckets[n] is +Inf */
    const double *bounds;
    uint64_t buckets[];
};

/* One labelled sample of a counter or gauge family. The handle points into it. */
typedef struct series {
    struct series *next;
    char *label_value;   /* NULL when the family has no label */
    union {
        mg_counter_t counter;
        mg_gauge_t gauge;
    } u;
    mg_gauge_fn fn;      /* a gauge read at render time, or NULL */
    void *arg;
} series_t;

typedef struct family {
    struct family *next;
    enum kind kind;
    char *name;
    char *help;          /* NULL: no HELP line */
    char *label_name;    /* NULL: the family's one series has no label */
    size_t nseries, max_series;
    series_t *first, *last;
    mg_histogram_t *hist; /* KIND_HISTOGRAM only */
} family_t;

struct mg_metrics {
    family_t *first, *last;
};

static const char *const kind_names[] = { "counter", "gauge", "histogram" };

mg_metrics_t *mg_metrics_new(void)
{
    return calloc(1, sizeof(mg_metrics_t));
}

static void family_free(family_t *f)
{
    series_t *s = f->first;
    while (s != NULL) {
        series_t *next = s->next;
        free(s->label_value);
        free(s);
        s = next;
    }
    free(f->hist);
    free(f->name);
    free(f->help);
    free(f->label_name);
    free(f);
}

void mg_metrics_free(mg_metrics_t *reg)
{
    if (reg == NULL)
        return;
    family_t *f = reg->first;
    while (f != NULL) {
        family_t *next = f->next;
        family_free(f);
        f = next;
    }
    free(reg);
}

static bool valid_name(const char *s, bool colon)
{
    if (s == NULL || *s == '\0')
        return false;
    for (const char *p = s; *p != '\0'; p++) {
        char c = *p;
        bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_' ||
                  (colon && c == ':') || (p != s && c >= '0' && c <= '9');
        if (!ok)
            return false;
    }
    return true;
}

static bool same_str(const char *a, const char *b)
{
    return a == b || (a != NULL && b != NULL && strcmp(a, b) == 0);
}

/* A copy of s that keeps NULL as NULL; *ok turns false when memory runs out. */
static char *dup_or_null(const char *s, bool *ok)
{
    if (s == NULL)
        return NULL;
    size_t n = strlen(s) + 1;
    char *d = malloc(n);
    if (d == NULL)
        *ok = false;
    else
        memcpy(d, s, n);
    return d;
}

static family_t *find_family(const mg_metrics_t *reg, const char *name)
{
    for (family_t *f = reg->first; f != NULL; f = f->next)
        if (strcmp(f->name, name) == 0)
            return f;
    return NULL;
}

/*
 * Whether name would repeat a sample name another family already renders: a histogram h
 * writes h_bucket, h_sum and h_count, and Prometheus refuses a scrape with duplicate samples.
 */
static bool name_clashes(const mg_metrics_t *reg, const char *name, enum kind kind)
{
    static const char *const suffixes[] = { "_bucket", "_sum", "_count" };
    size_t n = strlen(name);
    for (const family_t *f = reg->first; f != NULL; f = f->next) {
        size_t fn = strlen(f->name);
        for (size_t i = 0; i < 3; i++) {
            size_t sn = strlen(suffixes[i]);
            /* Existing histogram f against a new name, and a new histogram against f. */
            if (f->kind == KIND_HISTOGRAM && n == fn + sn && strncmp(name, f->name, fn) == 0 &&
                strcmp(name + fn, suffixes[i]) == 0)
                return true;
            if (kind == KIND_HISTOGRAM && fn == n + sn && strncmp(f->name, name, n) == 0 &&
                strcmp(f->name + n, suffixes[i]) == 0)
                return true;
        }
    }
    return false;
}

static family_t *family_new(enum kind kind, const char *name, const char *help,
                            const char *label_name)
{
    family_t *f = calloc(1, sizeof(*f));
    if (f == NULL)
        return NULL;
    bool ok = true;
    f->kind = kind;
    f->max_series = MG_METRICS_MAX_SERIES;
    f->name = dup_or_null(name, &ok);
    f->help = dup_or_null(help, &ok);
    f->label_name = dup_or_null(label_name, &ok);
    if (!ok) {
        family_free(f);
        return NULL;
    }
    return f;
}

static void link_family(mg_metrics_t *reg, family_t *f)
{
    if (reg->last != NULL)
        reg->last->next = f;
    else
        reg->first = f;
    reg->last = f;
}

/*
 * Finds or adds the series (name, label) of a counter or gauge family. *created tells whether
 * the series is new, so a caller can refuse a duplicate. A family is linked into the registry
 * only together with its first series, so a failure never leaves an empty family behind.
 */
static int get_series(mg_metrics_t *reg, enum kind kind, const char *name, const char *help,
                      const char *label_name, const char *label_value, series_t **out,
                      bool *created)
{
    *out = NULL;
    *created = false;
    if (reg == NULL || !valid_name(name, true) || (label_name == NULL) != (label_value == NULL))
        return MG_EINVAL;
    if (label_name != NULL &&
        (!valid_name(label_name, false) || strncmp(label_name, "__", 2) == 0))
        return MG_EINVAL;

    family_t *f = find_family(reg, name);
    family_t *fresh = NULL;
    if (f != NULL) {
        if (f->kind != kind || !same_str(f->label_name, label_name))
            return MG_EINVAL;
        for (series_t *s = f->first; s != NULL; s = s->next) {
            if (same_str(s->label_value, label_value)) {
                *out = s;
                return 0;
            }
        }
        if (f->nseries >= f->max_series)
            return MG_EINVAL;
    } else {
        if (name_clashes(reg, name, kind))
            return MG_EINVAL;
        fresh = f = family_new(kind, name, help, label_name);
        if (f == NULL)
            return MG_ENOMEM;
    }

    bool ok = true;
    series_t *s = calloc(1, sizeof(*s));
    if (s != NULL)
        s->label_value = dup_or_null(label_value, &ok);
    if (s == NULL || !ok) {
        free(s);
        if (fresh != NULL)
            family_free(fresh);
        return MG_ENOMEM;
    }
    if (f->last != NULL)
        f->last->next = s;
    else
        f->first = s;
    f->last = s;
    f->nseries++;
    if (fresh != NULL)
        link_family(reg, fresh);
    *out = s;
    *created = true;
    return 0;
}

int mg_metrics_counter(mg_metrics_t *reg, const char *name, const char *help,
                       const char *label_name, const char *label_value, mg_counter_t **out)
{
    series_t *s;
    bool created;
    int rc = get_series(reg, KIND_COUNTER, name, help, label_name, label_value, &s, &created);
    if (rc == 0 && s->fn != NULL)
        rc = MG_EINVAL; /* the series is read through a callback; a handle would do nothing */
    *out = rc == 0 ? &s->u.counter : NULL;
    return rc;
}

int mg_metrics_allow_series(mg_metrics_t *reg, const char *name, size_t max_series)
{
    family_t *f = reg ? find_family(reg, name) : NULL;
    if (f == NULL || f->kind == KIND_HISTOGRAM || max_series < f->nseries)
        return MG_EINVAL;
    f->max_series = max_series;
    return 0;
}

int mg_metrics_gauge(mg_metrics_t *reg, const char *name, const char *help,
                     const char *label_name, const char *label_value, mg_gauge_t **out)
{
    series_t *s;
    bool created;
    int rc = get_series(reg, KIND_GAUGE, name, help, label_name, label_value, &s, &created);
    if (rc == 0 && s->fn != NULL)
        rc = MG_EINVAL; /* the series is read through a callback; a handle would do nothing */
    *out = rc == 0 ? &s->u.gauge : NULL;
    return rc;
}

static int fn_series(mg_metrics_t *reg, enum kind kind, const char *name, const char *help,
                     const char *label_name, const char *label_value, mg_gauge_fn fn,
                     void *arg)
{
    if (fn == NULL)
        return MG_EINVAL;
    series_t *s;
    bool created;
    int rc = get_series(reg, kind, name, help, label_name, label_value, &s, &created);
    if (rc != 0)
        return rc;
    if (!created)
        return MG_EINVAL;
    s->fn = fn;
    s->arg = arg;
    return 0;
}

int mg_metrics_gauge_fn(mg_metrics_t *reg, const char *name, const char *help,
                        const char *label_name, const char *label_value, mg_gauge_fn fn,
                        void *arg)
{
    return fn_series(reg, KIND_GAUGE, name, help, label_name, label_value, fn, arg);
}

int mg_metrics_counter_fn(mg_metrics_t *reg, const char *name, const char *help,
                          const char *label_name, const char *label_value, mg_gauge_fn fn,
                          void *arg)
{
    return fn_series(reg, KIND_COUNTER, name, help, label_name, label_value, fn, arg);
}

int mg_metrics_histogram(mg_metrics_t *reg, const char *name, const char *help,
                         const double *bounds, size_t n, mg_histogram_t **out)
{
    *out = NULL;
    if (reg == NULL || !valid_name(name, true) || find_family(reg, name) != NULL ||
        name_clashes(reg, name, KIND_HISTOGRAM) || n > MG_METRICS_MAX_BUCKETS ||
        (n > 0 && bounds == NULL))
        return MG_EINVAL;
    for (size_t i = 0; i < n; i++)
        if (!isfinite(bounds[i]) || (i > 0 && bounds[i] <= bounds[i - 1]))
            return MG_EINVAL;

    family_t *f = family_new(KIND_HISTOGRAM, name, help, NULL);
    if (f == NULL)
        return MG_ENOMEM;
    mg_histogram_t *h = calloc(1, sizeof(*h) + (n + 1) * sizeof(uint64_t) + n * sizeof(double));
    if (h == NULL) {
        family_free(f);
        return MG_ENOMEM;
    }
    double *b = (double *)(h->buckets + n + 1);
    if (n > 0)
        memcpy(b, bounds, n * sizeof(double));
    h->n = n;
    h->bounds = b;
    f->hist = h;
    link_family(reg, f);
    *out = h;
    return 0;
}

void mg_histogram_observe(mg_histogram_t *h, double v)
{
    if (v != v)
        return; /* NaN */
    /*
     * A linear scan: the lists are short and most observations (latencies) land in the first
     * few buckets, where this beats a binary search's unpredictable branches.
     */
    size_t i = 0;
    while (i < h->n && v > h->bounds[i])
        i++;
    h->buckets[i]++;
    h->sum += v;
    h->count++;
}

uint64_t mg_histogram_count(const mg_histogram_t *h)
{
    return h->count;
}

double mg_histogram_sum(const mg_histogram_t *h)
{
    return h->sum;
}

/* ---- rendering ---- */

/* The render's output with a sticky error, so the format code reads as a list of writes. */
typedef struct out {
    mg_strbuf_t *sb;
    int rc;
} out_t;

static void put(out_t *o, const char *p, size_t n)
{
    if (o->rc == 0)
        o->rc = mg_strbuf_append(o->sb, p, n);
}

static void put_str(out_t *o, const char *s)
{
    put(o, s, strlen(s));
}

static void put_u64(out_t *o, uint64_t v)
{
    if (o->rc == 0)
        o->rc = mg_strbuf_append_u64(o->sb, v);
}

static void put_double(out_t *o, double v)
{
    if (o->rc == 0)
        o->rc = mg_strbuf_append_double(o->sb, v);
}

/*
 * Writes s with backslash and newline escaped, and the double quote too when quote is set:
 * HELP text escapes the first two, label values all three.
 */
static void put_escaped(out_t *o, const char *s, bool quote)
{
    const char *run = s;
    for (const char *p = s; *p != '\0'; p++) {
        const char *esc = NULL;
        if (*p == '\\')
            esc = "\\\\";
        else if (*p == '\n')
            esc = "\\n";
        else if (*p == '"' && quote)
            esc = "\\\"";
        if (esc == NULL)
            continue;
        put(o, run, (size_t)(p - run));
        put(o, esc, 2);
        run = p + 1;
    }
    put_str(o, run);
}

/* name{label="value"} or name, then a space; the value follows. */
static void put_sample_start(out_t *o, const char *name, const char *suffix,
                             const char *label_name, const char *label_value)
{
    put_str(o, name);
    put_str(o, suffix);
    if (label_name != NULL) {
        put(o, "{", 1);
        put_str(o, label_name);
        put(o, "=\"", 2);
        put_escaped(o, label_value, true);
        put(o, "\"}", 2);
    }
    put(o, " ", 1);
}

static void render_histogram(out_t *o, const family_t *f)
{
    const mg_histogram_t *h = f->hist;
    uint64_t cumulative = 0;
    for (size_t i = 0; i <= h->n; i++) {
        cumulative += h->buckets[i];
        put_str(o, f->name);
        put(o, "_bucket{le=\"", 12);
        if (i < h->n)
            put_double(o, h->bounds[i]);
        else
            put(o, "+Inf", 4);
        put(o, "\"} ", 3);
        put_u64(o, cumulative);
        put(o, "\n", 1);
    }
    put_sample_start(o, f->name, "_sum", NULL, NULL);
    put_double(o, h->sum);
    put(o, "\n", 1);
    put_sample_start(o, f->name, "_count", NULL, NULL);
    put_u64(o, h->count);
    put(o, "\n", 1);
}

static void render_family(out_t *o, const family_t *f)
{
    if (f->help != NULL) {
        put(o, "# HELP ", 7);
        put_str(o, f->name);
        put(o, " ", 1);
        put_escaped(o, f->help, false);
        put(o, "\n", 1);
    }
    put(o, "# TYPE ", 7);
    put_str(o, f->name);
    put(o, " ", 1);
    put_str(o, kind_names[f->kind]);
    put(o, "\n", 1);

    if (f->kind == KIND_HISTOGRAM) {
        render_histogram(o, f);
        return;
    }
    for (const series_t *s = f->first; s != NULL; s = s->next) {
        put_sample_start(o, f->name, "", f->label_name, s->label_value);
        if (s->fn != NULL)
            put_double(o, s->fn(s->arg));
        else if (f->kind == KIND_COUNTER)
            put_u64(o, s->u.counter.value);
        else
            put_double(o, s->u.gauge.value);
        put(o, "\n", 1);
    }
}

int mg_metrics_render(const mg_metrics_t *reg, mg_strbuf_t *out)
{
    out_t o = { out, 0 };
    size_t start = out->len;
    for (const family_t *f = reg->first; f != NULL && o.rc == 0; f = f->next)
        render_family(&o, f);
    if (o.rc != 0)
        mg_strbuf_truncate(out, start);
    return o.rc;
}

/* ---- HTTP status classes ---- */

mg_http_class_t mg_http_status_class(int status)
{
    switch (status / 100) {
    case 2: return MG_HTTP_2XX;
    case 3: return MG_HTTP_3XX;
    case 4: return MG_HTTP_4XX;
    case 5: return MG_HTTP_5XX;
    default: return MG_HTTP_OTHER;
    }
}

const char *mg_http_class_name(mg_http_class_t cls)
{
    static const char *const names[MG_HTTP_CLASS_COUNT] = { "2xx", "3xx", "4xx", "5xx", "other" };
    return (unsigned)cls < MG_HTTP_CLASS_COUNT ? names[cls] : "other";
}

/* ---- the gateway's metrics ---- */

/* Request latencies: a cached reply takes a millisecond, a long generation a minute. */
static const double request_buckets[] = {
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60,
};

/* SSH handshakes: a few ms on a LAN, seconds across the world or through a slow agent link. */
static const double handshake_buckets[] = {
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30,
};

#define NBOUNDS(a) (sizeof(a) / sizeof((a)[0]))

static double read_zero(void *arg)
{
    return 0;
}

/* moongate_pool_channels{state="busy"} and {state="idle"}. */
static int channel_gauges(mg_metrics_t *reg, const mg_gateway_metrics_sources_t *src)
{
    const struct {
        const char *state;
        mg_gauge_fn fn;
    } g[] = { { "busy", src->channels_busy }, { "idle", src->channels_idle } };
    int rc = 0;
    for (size_t i = 0; i < 2 && rc == 0; i++)
        rc = mg_metrics_gauge_fn(reg, "moongate_pool_channels",
                                 "SSH channels open: busy serving a request, or idle and kept "
                                 "alive for the next.", "state", g[i].state,
                                 g[i].fn != NULL ? g[i].fn : read_zero, src->arg);
    return rc;
}

int mg_gateway_metrics_init(mg_gateway_metrics_t *m, mg_metrics_t *reg,
                            const mg_gateway_metrics_sources_t *src)
{
    static const mg_gateway_metrics_sources_t none = { 0 };
    if (src == NULL)
        src = &none;
    *m = (mg_gateway_metrics_t){ 0 };
    int rc = 0;

    for (int c = 0; c < MG_HTTP_CLASS_COUNT && rc == 0; c++)
        rc = mg_metrics_counter(reg, "moongate_requests_total",
                                "HTTP requests answered, by status class.", "code",
                                mg_http_class_name((mg_http_class_t)c), &m->requests_total[c]);
    if (rc == 0)
        rc = mg_metrics_histogram(reg, "moongate_request_duration_seconds",
                                  "Time from a request's arrival to the end of its response.",
                                  request_buckets, NBOUNDS(request_buckets),
                                  &m->request_duration);
    if (rc == 0)
        rc = mg_metrics_histogram(reg, "moongate_time_to_first_byte_seconds",
                                  "Time from a request's arrival to the first response byte.",
                                  request_buckets, NBOUNDS(request_buckets),
                                  &m->time_to_first_byte);
    if (rc == 0)
        rc = mg_metrics_counter(reg, "moongate_upstream_received_bytes_total",
                                "Bytes received from upstream servers through SSH channels.",
                                NULL, NULL, &m->upstream_received_bytes);
    if (rc == 0)
        rc = mg_metrics_counter(reg, "moongate_upstream_sent_bytes_total",
                                "Bytes sent to upstream servers through SSH channels.",
                                NULL, NULL, &m->upstream_sent_bytes);
    if (rc == 0)
        rc = mg_metrics_histogram(reg, "moongate_ssh_handshake_duration_seconds",
                                  "Time to connect, handshake, check the host key and "
                                  "authenticate an SSH connection.",
                                  handshake_buckets, NBOUNDS(handshake_buckets),
                                  &m->ssh_handshake_duration);
    if (rc == 0)
        rc = mg_metrics_counter(reg, "moongate_ssh_connections_opened_total",
                                "SSH connections that became ready.", NULL, NULL,
                                &m->ssh_connections_opened);
    if (rc == 0)
        rc = mg_metrics_counter(reg, "moongate_ssh_connections_failed_total",
                                "SSH connections that failed before becoming ready.", NULL,
                                NULL, &m->ssh_connections_failed);
    if (rc == 0)
        rc = mg_metrics_counter(reg, "moongate_ssh_connections_closed_total",
                                "SSH connections closed after being ready.", NULL, NULL,
                                &m->ssh_connections_closed);
    for (int r = 0; r < 2 && rc == 0; r++)
        rc = mg_metrics_counter(reg, "moongate_policy_reloads_total",
                                "Policy reloads, by whether the new policy was taken.", "result",
                                r == 0 ? "ok" : "failed",
                                r == 0 ? &m->policy_reloads_ok : &m->policy_reloads_failed);
    if (rc == 0)
        rc = mg_metrics_counter(reg, "moongate_policy_errors_total",
                                "Policy hook calls that failed (error, timeout, memory, bad "
                                "result).", NULL, NULL, &m->policy_errors);
    if (rc == 0)
        rc = mg_metrics_gauge_fn(reg, "moongate_pool_connections",
                                 "SSH connections open or opening, over all users.", NULL, NULL,
                                 src->connections != NULL ? src->connections : read_zero,
                                 src->arg);
    if (rc == 0)
        rc = channel_gauges(reg, src);
    if (rc == 0)
        rc = mg_metrics_gauge_fn(reg, "moongate_pool_queue_depth",
                                 "Requests waiting for a channel.", NULL, NULL,
                                 src->queue_depth != NULL ? src->queue_depth : read_zero,
                                 src->arg);
    if (rc == 0)
        rc = mg_metrics_gauge(reg, "moongate_agent_connections",
                              "Agents connected over WebSocket.", NULL, NULL,
                              &m->agent_connections);
    if (rc != 0)
        *m = (mg_gateway_metrics_t){ 0 };
    return rc;
}
