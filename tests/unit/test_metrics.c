/*
 * Tests for src/core/metrics.c: the exact exposition text of a small registry, escaping, histogram
 * buckets, render-time gauges, registration rules, many series, the render's size limit, the
 * gateway's standard set checked line by line with a small parser, and the hot path's cost.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "moongate/error.h"
#include "moongate/metrics.h"

#include <math.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static char *render(const mg_metrics_t *reg, mg_strbuf_t *sb)
{
    mg_strbuf_init(sb, MG_STRBUF_UNBOUNDED);
    assert_int_equal(mg_metrics_render(reg, sb), 0);
    assert_non_null(sb->data);
    return sb->data;
}

static double read_int(void *arg)
{
    return *(int *)arg;
}

static void test_exposition_exact(void **state)
{
    mg_metrics_t *reg = mg_metrics_new();
    assert_non_null(reg);
    mg_counter_t *ok, *err;
    mg_gauge_t *temp, *pool_b;
    mg_histogram_t *lat;
    int pool_a = 7;
    static const double bounds[] = { 0.25, 1, 10 };

    assert_int_equal(mg_metrics_counter(reg, "t_requests_total", "Requests.", "code", "2xx", &ok),
                     0);
    assert_int_equal(mg_metrics_gauge(reg, "t_temp", "Temp\\ \"x\"\nnext", NULL, NULL, &temp), 0);
    /* A later registration joins its family: one HELP and TYPE, samples together. */
    assert_int_equal(mg_metrics_counter(reg, "t_requests_total", "ignored", "code", "5xx", &err),
                     0);
    assert_int_equal(mg_metrics_gauge_fn(reg, "t_pool", NULL, "kind", "a", read_int, &pool_a), 0);
    assert_int_equal(mg_metrics_gauge(reg, "t_pool", NULL, "kind", "b", &pool_b), 0);
    assert_int_equal(mg_metrics_histogram(reg, "t_latency_seconds", "Latency.", bounds, 3, &lat),
                     0);

    mg_counter_inc(ok);
    mg_counter_inc(ok);
    mg_counter_inc(ok);
    mg_counter_add(err, 2);
    mg_gauge_set(temp, 21.5);
    mg_gauge_dec(pool_b);
    mg_histogram_observe(lat, 0.125);
    mg_histogram_observe(lat, 0.25); /* on a bound: le is inclusive */
    mg_histogram_observe(lat, 0.5);
    mg_histogram_observe(lat, 5);
    mg_histogram_observe(lat, 50);
    mg_histogram_observe(lat, NAN);  /* ignored */

    mg_strbuf_t sb;
    assert_string_equal(render(reg, &sb),
                        "# HELP t_requests_total Requests.\n"
                        "# TYPE t_requests_total counter\n"
                        "t_requests_total{code=\"2xx\"} 3\n"
                        "t_requests_total{code=\"5xx\"} 2\n"
                        "# HELP t_temp Temp\\\\ \"x\"\\nnext\n"
                        "# TYPE t_temp gauge\n"
                        "t_temp 21.5\n"
                        "# TYPE t_pool gauge\n"
                        "t_pool{kind=\"a\"} 7\n"
                        "t_pool{kind=\"b\"} -1\n"
                        "# HELP t_latency_seconds Latency.\n"
                        "# TYPE t_latency_seconds histogram\n"
                        "t_latency_seconds_bucket{le=\"0.25\"} 2\n"
                        "t_latency_seconds_bucket{le=\"1\"} 3\n"
                        "t_latency_seconds_bucket{le=\"10\"} 4\n"
                        "t_latency_seconds_bucket{le=\"+Inf\"} 5\n"
                        "t_latency_seconds_sum 55.875\n"
                        "t_latency_seconds_count 5\n");
    assert_int_equal(mg_histogram_count(lat), 5);
    assert_true(mg_histogram_sum(lat) == 55.875);

    /* Render appends to what the buffer holds. */
    mg_strbuf_reset(&sb);
    assert_int_equal(mg_strbuf_append_str(&sb, "HEAD\n"), 0);
    assert_int_equal(mg_metrics_render(reg, &sb), 0);
    assert_memory_equal(sb.data, "HEAD\n# HELP t_requests_total", 28);
    mg_strbuf_free(&sb);
    mg_metrics_free(reg);
}

static void test_label_escaping(void **state)
{
    mg_metrics_t *reg = mg_metrics_new();
    mg_counter_t *c;
    assert_int_equal(mg_metrics_counter(reg, "esc_total", "a\\b \"q\"\nline2", "v",
                                        "back\\slash \"quoted\"\nnewline {x=\"y\"}", &c),
                     0);
    assert_int_equal(mg_metrics_counter(reg, "esc_total", NULL, "v", "", &c), 0);
    mg_strbuf_t sb;
    assert_string_equal(render(reg, &sb),
                        "# HELP esc_total a\\\\b \"q\"\\nline2\n"
                        "# TYPE esc_total counter\n"
                        "esc_total{v=\"back\\\\slash \\\"quoted\\\"\\nnewline {x=\\\"y\\\"}\"} 0\n"
                        "esc_total{v=\"\"} 0\n");
    mg_strbuf_free(&sb);
    mg_metrics_free(reg);
}

/* The value of the sample line that starts with prefix, which must be there. */
static double sample_value(const char *text, const char *prefix)
{
    size_t n = strlen(prefix);
    for (const char *p = text; *p != '\0';) {
        if (strncmp(p, prefix, n) == 0)
            return strtod(p + n, NULL);
        const char *nl = strchr(p, '\n');
        assert_non_null(nl);
        p = nl + 1;
    }
    fail_msg("no sample %s", prefix);
    return 0;
}

static void test_histogram_buckets(void **state)
{
    mg_metrics_t *reg = mg_metrics_new();
    static const double bounds[] = { -1, 0, 0.001, 0.5, 1, 100 };
    mg_histogram_t *h;
    assert_int_equal(mg_metrics_histogram(reg, "h_seconds", "H.", bounds, 6, &h), 0);

    /* Deterministic values across and beyond every bucket, including exact bounds. */
    int expect[7] = { 0 };
    unsigned seed = 7;
    double sum = 0;
    for (int i = 0; i < 5000; i++) {
        double v;
        if (i % 10 == 0)
            v = bounds[(size_t)i / 10 % 6];
        else
            v = ((double)rand_r(&seed) / RAND_MAX) * 300 - 100;
        int b = 0;
        while (b < 6 && v > bounds[b])
            b++;
        expect[b]++;
        sum += v;
        mg_histogram_observe(h, v);
    }
    mg_histogram_observe(h, INFINITY);  /* lands in +Inf only */
    expect[6]++;
    mg_histogram_observe(h, -INFINITY); /* lands in the first bucket */
    expect[0]++;

    mg_strbuf_t sb;
    const char *text = render(reg, &sb);
    static const char *les[] = { "-1", "0", "0.001", "0.5", "1", "100", "+Inf" };
    double prev = 0;
    int cumulative = 0;
    for (int b = 0; b < 7; b++) {
        char prefix[64];
        snprintf(prefix, sizeof(prefix), "h_seconds_bucket{le=\"%s\"} ", les[b]);
        double v = sample_value(text, prefix);
        cumulative += expect[b];
        assert_true(v == cumulative);
        assert_true(v >= prev);
        prev = v;
    }
    assert_int_equal(cumulative, 5002);
    assert_true(sample_value(text, "h_seconds_count ") == 5002);
    assert_true(mg_histogram_count(h) == 5002);
    /* The infinities make the sum infinite-minus-infinite: NaN, rendered as Prometheus says. */
    assert_non_null(strstr(text, "h_seconds_sum NaN\n"));
    (void)sum;
    mg_strbuf_free(&sb);

    /* A histogram without bounds has only +Inf. */
    mg_histogram_t *h0;
    assert_int_equal(mg_metrics_histogram(reg, "h0", NULL, NULL, 0, &h0), 0);
    mg_histogram_observe(h0, 3);
    text = render(reg, &sb);
    assert_non_null(strstr(text, "# TYPE h0 histogram\n"
                                 "h0_bucket{le=\"+Inf\"} 1\nh0_sum 3\nh0_count 1\n"));
    mg_strbuf_free(&sb);
    mg_metrics_free(reg);
}

typedef struct pool_numbers {
    int connections;
    int calls;
} pool_numbers_t;

static double read_connections(void *arg)
{
    pool_numbers_t *p = arg;
    p->calls++;
    return p->connections;
}

static double read_nan(void *arg)
{
    return NAN;
}

static void test_gauge_callbacks(void **state)
{
    mg_metrics_t *reg = mg_metrics_new();
    pool_numbers_t pn = { 3, 0 };
    assert_int_equal(mg_metrics_gauge_fn(reg, "g_conns", "C.", NULL, NULL, read_connections, &pn),
                     0);
    assert_int_equal(mg_metrics_gauge_fn(reg, "g_nan", NULL, NULL, NULL, read_nan, NULL), 0);
    mg_strbuf_t sb;
    assert_string_equal(render(reg, &sb), "# HELP g_conns C.\n# TYPE g_conns gauge\ng_conns 3\n"
                                          "# TYPE g_nan gauge\ng_nan NaN\n");
    mg_strbuf_free(&sb);
    assert_int_equal(pn.calls, 1);

    /* The value is read at each render, not at registration. */
    pn.connections = 12;
    assert_non_null(strstr(render(reg, &sb), "g_conns 12\n"));
    mg_strbuf_free(&sb);
    assert_int_equal(pn.calls, 2);

    /* A callback series cannot be registered twice nor handed out as a settable gauge. */
    mg_gauge_t *g;
    assert_int_equal(mg_metrics_gauge_fn(reg, "g_conns", NULL, NULL, NULL, read_nan, NULL),
                     MG_EINVAL);
    assert_int_equal(mg_metrics_gauge(reg, "g_conns", NULL, NULL, NULL, &g), MG_EINVAL);
    assert_null(g);
    assert_int_equal(mg_metrics_gauge_fn(reg, "g_other", NULL, NULL, NULL, NULL, NULL), MG_EINVAL);

    /* A counter read at render time is typed counter, and has no handle either. */
    pn.connections = 41;
    assert_int_equal(mg_metrics_counter_fn(reg, "c_total", "T.", NULL, NULL, read_connections,
                                           &pn), 0);
    assert_non_null(strstr(render(reg, &sb), "# TYPE c_total counter\nc_total 41\n"));
    mg_strbuf_free(&sb);
    mg_counter_t *c;
    assert_int_equal(mg_metrics_counter(reg, "c_total", NULL, NULL, NULL, &c), MG_EINVAL);
    assert_null(c);
    mg_metrics_free(reg);
}

/* The process metrics and the build's, by the names client libraries use. */
static void test_process_metrics(void **state)
{
    mg_metrics_t *reg = mg_metrics_new();
    assert_int_equal(mg_process_metrics_init(reg, "9.8.7"), 0);
    mg_strbuf_t sb;
    const char *text = render(reg, &sb);
    static const char *const want[] = {
        "# TYPE process_cpu_seconds_total counter\n", "# TYPE process_resident_memory_bytes gauge\n",
        "# TYPE process_virtual_memory_bytes gauge\n", "# TYPE process_open_fds gauge\n",
        "# TYPE process_max_fds gauge\n", "# TYPE process_start_time_seconds gauge\n",
        "moongate_build_info{version=\"9.8.7\"} 1\n",
    };
    for (size_t i = 0; i < sizeof(want) / sizeof(want[0]); i++)
        if (strstr(text, want[i]) == NULL)
            fail_msg("no \"%s\" in:\n%s", want[i], text);
    const char *rss = strstr(text, "\nprocess_resident_memory_bytes ");
    assert_non_null(rss);
    assert_true(atof(rss + 31) > 1e5);
    mg_strbuf_free(&sb);
    mg_metrics_free(reg);
}

static void test_registration_rules(void **state)
{
    mg_metrics_t *reg = mg_metrics_new();
    mg_counter_t *c, *c2;
    mg_gauge_t *g;
    mg_histogram_t *h;
    static const double good[] = { 1, 2 };

    /* Names. */
    assert_int_equal(mg_metrics_counter(reg, "", NULL, NULL, NULL, &c), MG_EINVAL);
    assert_null(c);
    assert_int_equal(mg_metrics_counter(reg, "1abc", NULL, NULL, NULL, &c), MG_EINVAL);
    assert_int_equal(mg_metrics_counter(reg, "a-b", NULL, NULL, NULL, &c), MG_EINVAL);
    assert_int_equal(mg_metrics_counter(reg, "a b", NULL, NULL, NULL, &c), MG_EINVAL);
    assert_int_equal(mg_metrics_counter(reg, NULL, NULL, NULL, NULL, &c), MG_EINVAL);
    assert_int_equal(mg_metrics_counter(reg, "ns:sub_x9", NULL, NULL, NULL, &c), 0);
    assert_int_equal(mg_metrics_counter(reg, "_x", NULL, NULL, NULL, &c), 0);
    assert_int_equal(mg_metrics_counter(reg, "l", NULL, "a:b", "v", &c), MG_EINVAL);
    assert_int_equal(mg_metrics_counter(reg, "l", NULL, "__reserved", "v", &c), MG_EINVAL);
    assert_int_equal(mg_metrics_counter(reg, "l", NULL, "9x", "v", &c), MG_EINVAL);
    assert_int_equal(mg_metrics_counter(reg, "l", NULL, "x", NULL, &c), MG_EINVAL);
    assert_int_equal(mg_metrics_counter(reg, "l", NULL, NULL, "v", &c), MG_EINVAL);

    /* The same series twice is the same handle; a family keeps one type and label name. */
    assert_int_equal(mg_metrics_counter(reg, "fam", "F.", "k", "v1", &c), 0);
    assert_int_equal(mg_metrics_counter(reg, "fam", "F.", "k", "v1", &c2), 0);
    assert_ptr_equal(c, c2);
    assert_int_equal(mg_metrics_counter(reg, "fam", "F.", "k", "v2", &c2), 0);
    assert_ptr_not_equal(c, c2);
    assert_int_equal(mg_metrics_counter(reg, "fam", NULL, "other", "v1", &c2), MG_EINVAL);
    assert_int_equal(mg_metrics_counter(reg, "fam", NULL, NULL, NULL, &c2), MG_EINVAL);
    assert_int_equal(mg_metrics_gauge(reg, "fam", NULL, "k", "v1", &g), MG_EINVAL);
    assert_int_equal(mg_metrics_histogram(reg, "fam", NULL, good, 2, &h), MG_EINVAL);
    assert_null(h);

    /* Histogram bounds: finite, strictly increasing, not too many. */
    static const double dup[] = { 1, 1 };
    static const double down[] = { 2, 1 };
    static const double inf[] = { 1, INFINITY };
    static const double nan[] = { NAN };
    assert_int_equal(mg_metrics_histogram(reg, "h", NULL, dup, 2, &h), MG_EINVAL);
    assert_int_equal(mg_metrics_histogram(reg, "h", NULL, down, 2, &h), MG_EINVAL);
    assert_int_equal(mg_metrics_histogram(reg, "h", NULL, inf, 2, &h), MG_EINVAL);
    assert_int_equal(mg_metrics_histogram(reg, "h", NULL, nan, 1, &h), MG_EINVAL);
    assert_int_equal(mg_metrics_histogram(reg, "h", NULL, NULL, 2, &h), MG_EINVAL);
    double many[MG_METRICS_MAX_BUCKETS + 1];
    for (int i = 0; i <= MG_METRICS_MAX_BUCKETS; i++)
        many[i] = i;
    assert_int_equal(mg_metrics_histogram(reg, "h", NULL, many, MG_METRICS_MAX_BUCKETS + 1, &h),
                     MG_EINVAL);
    assert_int_equal(mg_metrics_histogram(reg, "h", NULL, many, MG_METRICS_MAX_BUCKETS, &h), 0);
    assert_int_equal(mg_metrics_histogram(reg, "h", NULL, good, 2, &h), MG_EINVAL);
    assert_int_equal(mg_metrics_counter(reg, "h", NULL, NULL, NULL, &c), MG_EINVAL);

    /* Names that would repeat a histogram's sample names, either way round. */
    assert_int_equal(mg_metrics_counter(reg, "h_count", NULL, NULL, NULL, &c), MG_EINVAL);
    assert_int_equal(mg_metrics_gauge(reg, "h_sum", NULL, NULL, NULL, &g), MG_EINVAL);
    assert_int_equal(mg_metrics_counter(reg, "h_bucket", NULL, NULL, NULL, &c), MG_EINVAL);
    assert_int_equal(mg_metrics_counter(reg, "h_buckets", NULL, NULL, NULL, &c), 0);
    assert_int_equal(mg_metrics_counter(reg, "x_sum", NULL, NULL, NULL, &c), 0);
    assert_int_equal(mg_metrics_histogram(reg, "x", NULL, good, 2, &h), MG_EINVAL);
    assert_int_equal(mg_metrics_histogram(reg, "x_s", NULL, good, 2, &h), 0);

    /* A family's series are bounded: a label fed from requests would hit this at once. */
    for (int i = 0; i < MG_METRICS_MAX_SERIES; i++) {
        char v[16];
        snprintf(v, sizeof(v), "u%d", i);
        assert_int_equal(mg_metrics_counter(reg, "users_total", NULL, "user", v, &c), 0);
    }
    assert_int_equal(mg_metrics_counter(reg, "users_total", NULL, "user", "one-more", &c),
                     MG_EINVAL);
    assert_int_equal(mg_metrics_counter(reg, "users_total", NULL, "user", "u3", &c), 0);

    /* Failed registrations left no empty families behind. */
    mg_strbuf_t sb;
    const char *text = render(reg, &sb);
    assert_null(strstr(text, " l "));
    assert_null(strstr(text, "# TYPE l "));
    assert_non_null(strstr(text, "# TYPE h histogram\n"));
    mg_strbuf_free(&sb);
    mg_metrics_free(reg);
    mg_metrics_free(NULL);
}

/* Counts the lines of text that start with prefix. */
static int count_lines(const char *text, const char *prefix)
{
    int n = 0;
    size_t len = strlen(prefix);
    for (const char *p = text; *p != '\0'; p = strchr(p, '\n') + 1)
        if (strncmp(p, prefix, len) == 0)
            n++;
    return n;
}

static void test_many_series(void **state)
{
    mg_metrics_t *reg = mg_metrics_new();
    enum { FAMILIES = 40 };
    mg_counter_t *handles[FAMILIES][MG_METRICS_MAX_SERIES];
    /* Registered interleaved, family by family for each value, to exercise the grouping. */
    for (int v = 0; v < MG_METRICS_MAX_SERIES; v++) {
        for (int f = 0; f < FAMILIES; f++) {
            char name[32], val[16];
            snprintf(name, sizeof(name), "fam_%d_total", f);
            snprintf(val, sizeof(val), "v%d", v);
            assert_int_equal(mg_metrics_counter(reg, name, "Many.", "k", val, &handles[f][v]), 0);
        }
    }
    for (int f = 0; f < FAMILIES; f++)
        for (int v = 0; v < MG_METRICS_MAX_SERIES; v++)
            mg_counter_add(handles[f][v], (uint64_t)(f * 1000 + v));

    mg_strbuf_t sb;
    const char *text = render(reg, &sb);
    assert_int_equal(count_lines(text, "# HELP "), FAMILIES);
    assert_int_equal(count_lines(text, "# TYPE "), FAMILIES);
    assert_int_equal(count_lines(text, "fam_"), FAMILIES * MG_METRICS_MAX_SERIES);
    assert_true(sample_value(text, "fam_39_total{k=\"v63\"} ") == 39063);
    assert_true(sample_value(text, "fam_0_total{k=\"v0\"} ") == 0);
    /* Each family's samples follow its own TYPE line, in registration order. */
    const char *t7 = strstr(text, "# TYPE fam_7_total counter\n");
    assert_non_null(t7);
    assert_true(strncmp(t7 + strlen("# TYPE fam_7_total counter\n"),
                        "fam_7_total{k=\"v0\"} 7000\nfam_7_total{k=\"v1\"} 7001\n", 50) == 0);
    size_t full = sb.len;
    mg_strbuf_free(&sb);

    /* A render that does not fit fails and leaves the buffer as it was. */
    mg_strbuf_init(&sb, full - 1);
    assert_int_equal(mg_strbuf_append_str(&sb, "keep"), 0);
    assert_int_equal(mg_metrics_render(reg, &sb), MG_ENOMEM);
    assert_string_equal(sb.data, "keep");
    mg_strbuf_free(&sb);
    mg_strbuf_init(&sb, full);
    assert_int_equal(mg_metrics_render(reg, &sb), 0);
    assert_int_equal(sb.len, full);
    mg_strbuf_free(&sb);
    mg_metrics_free(reg);
}

static void test_status_classes(void **state)
{
    assert_int_equal(mg_http_status_class(200), MG_HTTP_2XX);
    assert_int_equal(mg_http_status_class(204), MG_HTTP_2XX);
    assert_int_equal(mg_http_status_class(299), MG_HTTP_2XX);
    assert_int_equal(mg_http_status_class(301), MG_HTTP_3XX);
    assert_int_equal(mg_http_status_class(404), MG_HTTP_4XX);
    assert_int_equal(mg_http_status_class(429), MG_HTTP_4XX);
    assert_int_equal(mg_http_status_class(502), MG_HTTP_5XX);
    assert_int_equal(mg_http_status_class(599), MG_HTTP_5XX);
    assert_int_equal(mg_http_status_class(100), MG_HTTP_OTHER);
    assert_int_equal(mg_http_status_class(600), MG_HTTP_OTHER);
    assert_int_equal(mg_http_status_class(0), MG_HTTP_OTHER);
    assert_int_equal(mg_http_status_class(-200), MG_HTTP_OTHER);
    assert_int_equal(mg_http_status_class(99), MG_HTTP_OTHER);
    assert_string_equal(mg_http_class_name(MG_HTTP_2XX), "2xx");
    assert_string_equal(mg_http_class_name(MG_HTTP_5XX), "5xx");
    assert_string_equal(mg_http_class_name(MG_HTTP_OTHER), "other");
    assert_string_equal(mg_http_class_name((mg_http_class_t)77), "other");
    assert_string_equal(mg_http_class_name((mg_http_class_t)-1), "other");
}

/* ---- a small validator for the text format ---- */

static bool name_start(char c, bool colon)
{
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_' || (colon && c == ':');
}

static bool name_char(char c, bool colon)
{
    return name_start(c, colon) || (c >= '0' && c <= '9');
}

/* Reads [a-zA-Z_:][a-zA-Z0-9_:]* (colon) or the label-name form into out; returns past it. */
static const char *parse_name(const char *p, bool colon, char *out, size_t cap)
{
    size_t n = 0;
    if (!name_start(*p, colon))
        return NULL;
    while (name_char(*p, colon) && n + 1 < cap)
        out[n++] = *p++;
    out[n] = '\0';
    return p;
}

/* A sample value: a float strtod reads whole, or +Inf, -Inf, NaN. */
static bool valid_value(const char *s)
{
    if (strcmp(s, "+Inf") == 0 || strcmp(s, "-Inf") == 0 || strcmp(s, "NaN") == 0)
        return true;
    if (*s == '\0')
        return false;
    for (const char *p = s; *p != '\0'; p++)
        if (!strchr("0123456789+-.e", *p))
            return false;
    char *end;
    strtod(s, &end);
    return *end == '\0';
}

typedef struct family_seen {
    char name[128];
    char type[16];
    bool help;
} family_seen_t;

/*
 * Checks one line: "# HELP name text", "# TYPE name type", or "name{l="v",...} value". A sample
 * must belong to the family of the latest TYPE line (a histogram's with _bucket, _sum or
 * _count); HELP and TYPE appear once per family. Returns false with a reason on failure.
 */
static bool check_line(const char *line, family_seen_t *seen, int *nseen, const char **why)
{
    char name[128];
    const char *p;
    if (strncmp(line, "# HELP ", 7) == 0 || strncmp(line, "# TYPE ", 7) == 0) {
        bool help = line[2] == 'H';
        p = parse_name(line + 7, true, name, sizeof(name));
        if (p == NULL || *p != ' ') {
            *why = "bad comment name";
            return false;
        }
        for (int i = 0; i < *nseen; i++) {
            if (strcmp(seen[i].name, name) == 0 && (help || seen[i].type[0] != '\0')) {
                *why = "family described twice";
                return false;
            }
        }
        if (help) {
            family_seen_t *f = &seen[(*nseen)++];
            snprintf(f->name, sizeof(f->name), "%s", name);
            f->type[0] = '\0';
            f->help = true;
            return true;
        }
        p++;
        if (strcmp(p, "counter") != 0 && strcmp(p, "gauge") != 0 &&
            strcmp(p, "histogram") != 0) {
            *why = "bad type";
            return false;
        }
        family_seen_t *f;
        if (*nseen > 0 && strcmp(seen[*nseen - 1].name, name) == 0) {
            f = &seen[*nseen - 1];
        } else {
            f = &seen[(*nseen)++];
            snprintf(f->name, sizeof(f->name), "%s", name);
            f->help = false;
        }
        snprintf(f->type, sizeof(f->type), "%s", p);
        return true;
    }
    if (line[0] == '#') {
        *why = "unknown comment";
        return false;
    }

    p = parse_name(line, true, name, sizeof(name));
    if (p == NULL) {
        *why = "bad metric name";
        return false;
    }
    if (*p == '{') {
        p++;
        for (;;) {
            char label[64];
            p = parse_name(p, false, label, sizeof(label));
            if (p == NULL || p[0] != '=' || p[1] != '"') {
                *why = "bad label";
                return false;
            }
            for (p += 2; *p != '"'; p++) {
                if (*p == '\0' || *p == '\n') {
                    *why = "unterminated label value";
                    return false;
                }
                if (*p == '\\') {
                    p++;
                    if (*p != '\\' && *p != '"' && *p != 'n') {
                        *why = "bad escape";
                        return false;
                    }
                }
            }
            p++;
            if (*p == ',') {
                p++;
                continue;
            }
            if (*p != '}') {
                *why = "bad label list";
                return false;
            }
            p++;
            break;
        }
    }
    if (*p != ' ' || !valid_value(p + 1)) {
        *why = "bad value";
        return false;
    }
    if (*nseen == 0 || seen[*nseen - 1].type[0] == '\0') {
        *why = "sample before its TYPE";
        return false;
    }
    const family_seen_t *f = &seen[*nseen - 1];
    size_t fl = strlen(f->name);
    bool ok = strcmp(name, f->name) == 0;
    if (!ok && strcmp(f->type, "histogram") == 0 && strncmp(name, f->name, fl) == 0)
        ok = strcmp(name + fl, "_bucket") == 0 || strcmp(name + fl, "_sum") == 0 ||
             strcmp(name + fl, "_count") == 0;
    if (!ok) {
        *why = "sample outside its family";
        return false;
    }
    return true;
}

/* Validates every line of text; returns the number of sample lines. */
static int validate_exposition(char *text, family_seen_t *seen, int *nseen)
{
    int samples = 0;
    size_t len = strlen(text);
    assert_true(len > 0 && text[len - 1] == '\n');
    for (char *line = text; *line != '\0';) {
        char *nl = strchr(line, '\n');
        *nl = '\0';
        const char *why = NULL;
        if (!check_line(line, seen, nseen, &why))
            fail_msg("line \"%s\": %s", line, why);
        if (line[0] != '#')
            samples++;
        *nl = '\n';
        line = nl + 1;
    }
    return samples;
}

static void test_validator_rejects(void **state)
{
    static const char *bad[] = {
        "9abc 1", "a-b 1", "abc", "abc x", "abc 1 2", "abc{l=\"v} 1", "abc{l=v} 1",
        "abc{l=\"\\x\"} 1", "abc{1l=\"v\"} 1", "# HELP", "# FOO abc x", "# TYPE abc summary",
        "other 1",
    };
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        family_seen_t seen[4];
        int nseen = 0;
        const char *why = NULL;
        assert_true(check_line("# TYPE abc counter", seen, &nseen, &why));
        if (check_line(bad[i], seen, &nseen, &why))
            fail_msg("validator accepted \"%s\"", bad[i]);
    }
}

/* What the front end would read from mg_pool_stats(). */
typedef struct pool_view {
    int connections, busy, idle, waiters;
} pool_view_t;

static double view_connections(void *arg) { return ((pool_view_t *)arg)->connections; }
static double view_busy(void *arg) { return ((pool_view_t *)arg)->busy; }
static double view_idle(void *arg) { return ((pool_view_t *)arg)->idle; }
static double view_waiters(void *arg) { return ((pool_view_t *)arg)->waiters; }

static void test_gateway_metrics(void **state)
{
    mg_metrics_t *reg = mg_metrics_new();
    mg_gateway_metrics_t m;
    pool_view_t view = { 4, 9, 3, 2 };
    mg_gateway_metrics_sources_t src = {
        .connections = view_connections,
        .channels_busy = view_busy,
        .channels_idle = view_idle,
        .queue_depth = view_waiters,
        .arg = &view,
    };
    assert_int_equal(mg_gateway_metrics_init(&m, reg, &src), 0);
    for (int c = 0; c < MG_HTTP_CLASS_COUNT; c++)
        assert_non_null(m.requests_total[c]);
    assert_non_null(m.request_duration);
    assert_non_null(m.time_to_first_byte);
    assert_non_null(m.upstream_received_bytes);
    assert_non_null(m.upstream_sent_bytes);
    assert_non_null(m.ssh_handshake_duration);
    assert_non_null(m.ssh_connections_opened);
    assert_non_null(m.ssh_connections_failed);
    assert_non_null(m.ssh_connections_closed);
    assert_non_null(m.policy_reloads_ok);
    assert_non_null(m.policy_reloads_failed);
    assert_non_null(m.policy_errors);
    assert_non_null(m.agent_connections);

    /* What the front end does per request. */
    static const int statuses[] = { 200, 200, 201, 304, 404, 429, 502, 0, 101 };
    for (size_t i = 0; i < sizeof(statuses) / sizeof(statuses[0]); i++) {
        mg_counter_inc(m.requests_total[mg_http_status_class(statuses[i])]);
        mg_histogram_observe(m.request_duration, 0.002 * (double)(i + 1));
        mg_histogram_observe(m.time_to_first_byte, 0.0005 * (double)(i + 1));
    }
    mg_counter_add(m.upstream_received_bytes, 123456);
    mg_counter_add(m.upstream_sent_bytes, 789);
    mg_histogram_observe(m.ssh_handshake_duration, 0.031);
    mg_counter_inc(m.ssh_connections_opened);
    mg_counter_inc(m.ssh_connections_failed);
    mg_counter_inc(m.policy_reloads_ok);
    mg_counter_inc(m.policy_reloads_failed);
    mg_counter_inc(m.policy_errors);
    mg_gauge_inc(m.agent_connections);

    mg_strbuf_t sb;
    char *text = render(reg, &sb);
    family_seen_t seen[64];
    int nseen = 0;
    int samples = validate_exposition(text, seen, &nseen);
    /* 5 request classes, 2 histograms of 15 bounds (+Inf, sum, count), 2 byte counters, the
     * handshake histogram of 12 bounds, 3 SSH counters, 2 reload results, 1 error counter, 3
     * pool gauges (channels in two states), 1 agent gauge. */
    assert_int_equal(samples, 5 + 2 * (15 + 3) + 2 + (12 + 3) + 3 + 2 + 1 + 4 + 1);
    assert_int_equal(nseen, 15);
    for (int i = 0; i < nseen; i++) {
        assert_true(seen[i].help);
        assert_true(strncmp(seen[i].name, "moongate_", 9) == 0);
    }

    assert_true(sample_value(text, "moongate_requests_total{code=\"2xx\"} ") == 3);
    assert_true(sample_value(text, "moongate_requests_total{code=\"3xx\"} ") == 1);
    assert_true(sample_value(text, "moongate_requests_total{code=\"4xx\"} ") == 2);
    assert_true(sample_value(text, "moongate_requests_total{code=\"5xx\"} ") == 1);
    assert_true(sample_value(text, "moongate_requests_total{code=\"other\"} ") == 2);
    assert_true(sample_value(text, "moongate_request_duration_seconds_bucket{le=\"0.001\"} ")
                == 0);
    assert_true(sample_value(text, "moongate_request_duration_seconds_bucket{le=\"0.005\"} ")
                == 2);
    assert_true(sample_value(text, "moongate_request_duration_seconds_bucket{le=\"0.025\"} ")
                == 9);
    assert_true(sample_value(text, "moongate_request_duration_seconds_bucket{le=\"60\"} ") == 9);
    assert_true(sample_value(text, "moongate_request_duration_seconds_count ") == 9);
    assert_true(sample_value(text, "moongate_time_to_first_byte_seconds_bucket{le=\"0.001\"} ")
                == 2);
    assert_true(sample_value(text, "moongate_upstream_received_bytes_total ") == 123456);
    assert_true(sample_value(text, "moongate_upstream_sent_bytes_total ") == 789);
    assert_true(sample_value(text, "moongate_ssh_handshake_duration_seconds_bucket{le=\"0.025\"} ")
                == 0);
    assert_true(sample_value(text, "moongate_ssh_handshake_duration_seconds_bucket{le=\"0.05\"} ")
                == 1);
    assert_true(sample_value(text, "moongate_ssh_handshake_duration_seconds_bucket{le=\"+Inf\"} ")
                == 1);
    assert_true(sample_value(text, "moongate_ssh_connections_opened_total ") == 1);
    assert_true(sample_value(text, "moongate_ssh_connections_failed_total ") == 1);
    assert_true(sample_value(text, "moongate_ssh_connections_closed_total ") == 0);
    assert_true(sample_value(text, "moongate_policy_reloads_total{result=\"ok\"} ") == 1);
    assert_true(sample_value(text, "moongate_policy_reloads_total{result=\"failed\"} ") == 1);
    assert_true(sample_value(text, "moongate_policy_errors_total ") == 1);
    assert_true(sample_value(text, "moongate_pool_connections ") == 4);
    assert_true(sample_value(text, "moongate_pool_channels{state=\"busy\"} ") == 9);
    assert_true(sample_value(text, "moongate_pool_channels{state=\"idle\"} ") == 3);
    assert_true(sample_value(text, "moongate_pool_queue_depth ") == 2);
    assert_true(sample_value(text, "moongate_agent_connections ") == 1);
    print_message("gateway set: %d families, %d samples, %zu bytes\n", nseen, samples, sb.len);
    mg_strbuf_free(&sb);

    /* A second init on the same registry is refused, and leaves m zeroed. */
    assert_int_equal(mg_gateway_metrics_init(&m, reg, NULL), MG_EINVAL);
    assert_null(m.request_duration);
    mg_metrics_free(reg);

    /* Without sources the pool gauges read 0. */
    reg = mg_metrics_new();
    assert_int_equal(mg_gateway_metrics_init(&m, reg, NULL), 0);
    text = render(reg, &sb);
    nseen = 0;
    validate_exposition(text, seen, &nseen);
    assert_true(sample_value(text, "moongate_pool_queue_depth ") == 0);
    mg_strbuf_free(&sb);
    mg_metrics_free(reg);
}

/* ---- the hot path's cost ---- */

static double now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e9 + (double)ts.tv_nsec;
}

/*
 * Not a pass/fail benchmark (sanitizers and valgrind slow it down by 10-100x); it prints the
 * cost so a change that makes the hot path slow shows up. The barrier keeps the compiler from
 * folding the loop into one add: every iteration loads and stores the counter, as real callers
 * do. MG_BENCH_ITERS overrides the iteration count.
 */
static void test_hot_path_cost(void **state)
{
    long iters = 20000000;
    const char *env = getenv("MG_BENCH_ITERS");
    if (env != NULL)
        iters = atol(env);

    mg_metrics_t *reg = mg_metrics_new();
    mg_gateway_metrics_t m;
    assert_int_equal(mg_gateway_metrics_init(&m, reg, NULL), 0);
    mg_counter_t *c = m.requests_total[MG_HTTP_2XX];

    double t0 = now_ns();
    for (long i = 0; i < iters; i++) {
        mg_counter_inc(c);
        __asm__ volatile("" : : "r"(c) : "memory");
    }
    double counter_ns = (now_ns() - t0) / (double)iters;
    assert_true(c->value == (uint64_t)iters);

    /* Latencies spread log-uniformly from 0.1 ms to 100 s, so every bucket gets its share. */
    enum { NV = 4096 };
    static double vals[NV];
    unsigned seed = 1;
    for (int i = 0; i < NV; i++)
        vals[i] = 1e-4 * pow(10, 6.0 * rand_r(&seed) / RAND_MAX);
    long hiters = iters / 4;
    t0 = now_ns();
    for (long i = 0; i < hiters; i++) {
        mg_histogram_observe(m.request_duration, vals[i & (NV - 1)]);
        __asm__ volatile("" : : : "memory");
    }
    double hist_ns = (now_ns() - t0) / (double)hiters;
    assert_true(mg_histogram_count(m.request_duration) == (uint64_t)hiters);

    /* The common case: fast requests, all in the first few buckets. */
    t0 = now_ns();
    for (long i = 0; i < hiters; i++) {
        mg_histogram_observe(m.time_to_first_byte, 0.0008 + (double)(i & 7) * 0.0005);
        __asm__ volatile("" : : : "memory");
    }
    double hist_fast_ns = (now_ns() - t0) / (double)hiters;

    mg_strbuf_t sb;
    mg_strbuf_init(&sb, MG_STRBUF_UNBOUNDED);
    int renders = 2000;
    t0 = now_ns();
    for (int i = 0; i < renders; i++) {
        mg_strbuf_reset(&sb);
        assert_int_equal(mg_metrics_render(reg, &sb), 0);
    }
    double render_us = (now_ns() - t0) / renders / 1000;
    print_message("counter inc: %.2f ns; histogram observe: %.2f ns (spread), %.2f ns (fast "
                  "requests); render of the gateway set (%zu bytes): %.1f us\n",
                  counter_ns, hist_ns, hist_fast_ns, sb.len, render_us);
    mg_strbuf_free(&sb);
    mg_metrics_free(reg);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_exposition_exact),
        cmocka_unit_test(test_label_escaping),
        cmocka_unit_test(test_histogram_buckets),
        cmocka_unit_test(test_gauge_callbacks),
        cmocka_unit_test(test_process_metrics),
        cmocka_unit_test(test_registration_rules),
        cmocka_unit_test(test_many_series),
        cmocka_unit_test(test_status_classes),
        cmocka_unit_test(test_validator_rejects),
        cmocka_unit_test(test_gateway_metrics),
        cmocka_unit_test(test_hot_path_cost),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
