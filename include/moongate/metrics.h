/*
 * metrics: counters, gauges and histograms, rendered for Prometheus.
 *
 * A registry (mg_metrics_t) holds metric families, each a name, a help text, a type and one or
 * more series. Everything is registered once at start-up; registration hands back a handle to
 * the series, and the hot path only touches that handle: mg_counter_inc() is one add to memory,
 * mg_histogram_observe() a short search over the bucket bounds and three adds. Nothing is
 * looked up by name after start-up and nothing allocates.
 *
 * A series has at most one label, and its value is fixed when the series is registered: the
 * family moongate_requests_total{code=...} is five registrations, one per status class. Label
 * values must come from a small set the code knows, never from a request (a user id, a path),
 * or the number of series, and Prometheus's memory with it, grows without bound; a family
 * refuses more than MG_METRICS_MAX_SERIES series to make such a mistake loud.
 *
 * mg_metrics_render() writes the Prometheus text exposition format, version 0.0.4: per family a
 * "# HELP" and a "# TYPE" line, then its samples in registration order; label values escaped
 * (backslash, double quote, newline); histograms as cumulative _bucket{le="..."} samples ending
 * with le="+Inf", then _sum and _count. Serve it as "text/plain; version=0.0.4".
 *
 * The second half of this header is the gateway's own set of metrics (mg_gateway_metrics_t),
 * registered by one call, so the HTTP front end and the SSH layer increment fields of a struct.
 *
 * Single-threaded: the registry and every handle belong to the loop's thread, so the values are
 * plain integers and doubles.
 */
#ifndef MOONGATE_METRICS_H
#define MOONGATE_METRICS_H

#include "moongate/json.h"

#include <stddef.h>
#include <stdint.h>

/* A family refuses more series than this (MG_EINVAL): label values must be a bounded set. */
#define MG_METRICS_MAX_SERIES 64

/* A histogram refuses more bounds than this (MG_EINVAL); +Inf comes on top. */
#define MG_METRICS_MAX_BUCKETS 64

typedef struct mg_metrics mg_metrics_t;
typedef struct mg_histogram mg_histogram_t;

/* A counter: only goes up. The caller reads value, and changes it only through the functions. */
typedef struct mg_counter {
    uint64_t value;
} mg_counter_t;

/* A gauge set by the code: value may go up and down. Same rule: read it, change it via calls. */
typedef struct mg_gauge {
    double value;
} mg_gauge_t;

/* A gauge whose value is read at render time, e.g. from mg_pool_stats(). Must not fail. */
typedef double (*mg_gauge_fn)(void *arg);

/* Returns an empty registry, or NULL when out of memory. */
mg_metrics_t *mg_metrics_new(void);

/* Frees the registry and every handle it gave out. NULL is a no-op. */
void mg_metrics_free(mg_metrics_t *reg);

/*
 * Registers one counter series: family name, help text, and either a label (name and value) or
 * no label (both NULL). The first registration of a name creates the family and sets its help;
 * later ones add series to it. Registering a series that exists returns the same handle.
 *
 * name must match [a-zA-Z_:][a-zA-Z0-9_:]*, label_name [a-zA-Z_][a-zA-Z0-9_]* and not start
 * with "__"; label_value is any string. help may be NULL (no HELP line); the registry copies
 * every string.
 *
 * Returns 0 and *out, or MG_EINVAL (a name is invalid; the family exists with another type or
 * label name, or holds MG_METRICS_MAX_SERIES series; the name is a histogram's name plus _bucket,
 * _sum or _count) or MG_ENOMEM.
 */
int mg_metrics_counter(mg_metrics_t *reg, const char *name, const char *help,
                       const char *label_name, const char *label_value, mg_counter_t **out);

/*
 * Lets the counter or gauge family name hold up to max_series series instead of
 * MG_METRICS_MAX_SERIES: for a label whose values the operator chose to bound otherwise (user
 * ids, when asked for). Returns 0, or MG_EINVAL (no such family, a histogram, or fewer than it
 * holds).
 */
int mg_metrics_allow_series(mg_metrics_t *reg, const char *name, size_t max_series);

/* A gauge series set by the code; as mg_metrics_counter() in every other respect. */
int mg_metrics_gauge(mg_metrics_t *reg, const char *name, const char *help,
                     const char *label_name, const char *label_value, mg_gauge_t **out);

/*
 * A gauge series whose value fn(arg) returns when the registry is rendered; it has no handle.
 * fn runs on the loop during mg_metrics_render(): it must be cheap and must not call into the
 * registry. Returns 0, MG_EINVAL (as above, or fn is NULL, or the series exists) or MG_ENOMEM.
 */
int mg_metrics_gauge_fn(mg_metrics_t *reg, const char *name, const char *help,
                        const char *label_name, const char *label_value, mg_gauge_fn fn,
                        void *arg);

/* A counter series whose total fn(arg) returns at render time (a count kept elsewhere, such as
   the kernel's CPU time); as mg_metrics_gauge_fn() otherwise. */
int mg_metrics_counter_fn(mg_metrics_t *reg, const char *name, const char *help,
                          const char *label_name, const char *label_value, mg_gauge_fn fn,
                          void *arg);

/*
 * The process metrics Prometheus client libraries export, read at render time from the kernel:
 * process_cpu_seconds_total, process_resident_memory_bytes, process_virtual_memory_bytes,
 * process_open_fds, process_max_fds and process_start_time_seconds (the wall clock when this
 * was called, at start-up); and moongate_build_info{version} 1. Returns 0, MG_EINVAL or
 * MG_ENOMEM.
 */
int mg_process_metrics_init(mg_metrics_t *reg, const char *version);

/*
 * Registers a histogram (a family of its own, without labels) with n upper bounds, finite and
 * strictly increasing; the +Inf bucket is implied. The bounds are copied.
 * Returns 0 and *out, or MG_EINVAL (a bad name or bounds, n > MG_METRICS_MAX_BUCKETS, the name
 * is taken, or name_bucket, name_sum or name_count is) or MG_ENOMEM.
 */
int mg_metrics_histogram(mg_metrics_t *reg, const char *name, const char *help,
                         const double *bounds, size_t n, mg_histogram_t **out);

static inline void mg_counter_inc(mg_counter_t *c)
{
    c->value++;
}

static inline void mg_counter_add(mg_counter_t *c, uint64_t n)
{
    c->value += n;
}

static inline void mg_gauge_set(mg_gauge_t *g, double v)
{
    g->value = v;
}

static inline void mg_gauge_add(mg_gauge_t *g, double d)
{
    g->value += d;
}

static inline void mg_gauge_inc(mg_gauge_t *g)
{
    g->value += 1;
}

static inline void mg_gauge_dec(mg_gauge_t *g)
{
    g->value -= 1;
}

/* Records one observation. NaN is ignored: it would make _sum useless forever. */
void mg_histogram_observe(mg_histogram_t *h, double v);

/* Observations so far, and their sum. */
uint64_t mg_histogram_count(const mg_histogram_t *h);
double mg_histogram_sum(const mg_histogram_t *h);

/*
 * Appends the whole registry in the text exposition format to out. Returns 0, or MG_ENOMEM
 * (out's limit or memory), in which case out is left as it was before the call.
 */
int mg_metrics_render(const mg_metrics_t *reg, mg_strbuf_t *out);

/* ---- HTTP status classes, the label of moongate_requests_total ---- */

typedef enum mg_http_class {
    MG_HTTP_2XX = 0,
    MG_HTTP_3XX,
    MG_HTTP_4XX,
    MG_HTTP_5XX,
    MG_HTTP_OTHER,  /* 1xx, and anything outside 100..599 (e.g. a request that got no status) */
    MG_HTTP_CLASS_COUNT,
} mg_http_class_t;

/* The class of an HTTP status code. */
mg_http_class_t mg_http_status_class(int status);

/* "2xx", "3xx", "4xx", "5xx" or "other"; "other" for any out-of-range value. */
const char *mg_http_class_name(mg_http_class_t cls);

/* ---- the gateway's standard metrics ---- */

/* Where the pool gauges read their values at render time; a NULL fn reads as 0. */
typedef struct mg_gateway_metrics_sources {
    mg_gauge_fn connections;     /* SSH connections open or opening, all users */
    mg_gauge_fn channels_busy;   /* channels serving a request */
    mg_gauge_fn channels_idle;   /* kept-alive channels serving none */
    mg_gauge_fn queue_depth;     /* requests waiting for a channel */
    void *arg;                   /* passed to each fn */
} mg_gateway_metrics_sources_t;

/*
 * Handles into a registry, filled by mg_gateway_metrics_init(); the registry owns them. Durations
 * are in seconds and the histograms' buckets run from 1 ms to 60 s (the SSH handshake's from
 * 5 ms to 30 s). The metric behind each field is named beside it.
 */
typedef struct mg_gateway_metrics {
    /* moongate_requests_total{code="2xx|3xx|4xx|5xx|other"}, indexed by mg_http_status_class() */
    mg_counter_t *requests_total[MG_HTTP_CLASS_COUNT];
    mg_histogram_t *request_duration;        /* moongate_request_duration_seconds */
    mg_histogram_t *time_to_first_byte;      /* moongate_time_to_first_byte_seconds */
    mg_counter_t *upstream_received_bytes;   /* moongate_upstream_received_bytes_total (in) */
    mg_counter_t *upstream_sent_bytes;       /* moongate_upstream_sent_bytes_total (out) */
    mg_histogram_t *ssh_handshake_duration;  /* moongate_ssh_handshake_duration_seconds */
    mg_counter_t *ssh_connections_opened;    /* moongate_ssh_connections_opened_total */
    mg_counter_t *ssh_connections_failed;    /* moongate_ssh_connections_failed_total */
    mg_counter_t *ssh_connections_closed;    /* moongate_ssh_connections_closed_total */
    mg_counter_t *policy_reloads_ok;         /* moongate_policy_reloads_total{result="ok"} */
    mg_counter_t *policy_reloads_failed;     /* moongate_policy_reloads_total{result="failed"} */
    mg_counter_t *policy_errors;             /* moongate_policy_errors_total */
    mg_gauge_t *agent_connections;           /* moongate_agent_connections */
    /*
     * Read at render time through the sources: moongate_pool_connections,
     * moongate_pool_channels{state="busy|idle"}, moongate_pool_queue_depth.
     */
} mg_gateway_metrics_t;

/*
 * Registers the gateway's metrics in reg and fills m. src may be NULL (every pool gauge reads 0).
 * Returns 0, MG_ENOMEM, or MG_EINVAL if reg already holds one of the histograms or pool gauges,
 * or one of the names as another type (counters already there are shared, not an error).
 * On failure m is zeroed; what was registered stays in reg until mg_metrics_free().
 */
int mg_gateway_metrics_init(mg_gateway_metrics_t *m, mg_metrics_t *reg,
                            const mg_gateway_metrics_sources_t *src);

#endif
