/*
 * mg-streamclient: the client side of the gateway benchmark (bench/run.sh).
 *
 *   mg-streamclient -p PORT [-n CONNS] [--path PATH] [-H 'Name: value']...
 *                   [--user-header NAME --user-prefix PREFIX] [--expect-chunks N]
 *                   [--bulk BYTES] [--timeout-ms MS] [--hold-ms MS]
 *
 * Opens CONNS connections to 127.0.0.1:PORT at once (on one libuv loop), sends one GET PATH on
 * each, reads the responses and prints what it measured as `key=value` lines a shell can eval.
 * It exits 0 when every response arrived whole with status 200 (and, with --expect-chunks, with
 * that many NDJSON lines each), 1 when any did not, 2 on bad arguments. Every mode also counts
 * the responses by status (status_200, status_502, status_503, status_504, status_other, and
 * no_response for connections that got none), for a herd of users where some are refused.
 *
 * Stream mode (the default): made for mg-upstream's GET /stream, whose body is NDJSON lines that
 * each carry "t_ms", the upstream's send time. Every line gets its arrival time (when the read
 * that completed it returned). For each pair of consecutive lines on a connection the excess is
 *
 *     (arrival gap) - (upstream send gap)
 *
 * that is, how much later than the upstream's own spacing a line arrived: the delay the path
 * between upstream and client added to that line (negative when a late line is followed by one
 * that catches up). Reported over all lines of all connections: gap_excess_{p50,p99,max}_ms. The
 * time to first byte of each connection is measured from the moment its connect started to the
 * first body byte: ttfb_{p50,max}_ms. Lines without "t_ms" are ignored, so the mode also serves
 * plain requests (GET /hello from many users for the memory run: --user-header gives connection
 * i the header "NAME: PREFIXi").
 *
 * Bulk mode (--bulk N): one connection fetches GET /bytes/N, checks that exactly N bytes came and
 * that each equals the deterministic stream of http_client.h (generated alongside, much cheaper
 * than hashing), and reports mb_per_s (10^6 bytes a second, from the connect to the last byte).
 *
 * Hold mode (--hold-ms MS): each connection, its response complete, stays open (kept alive and
 * idle) until every connection has its response, then MS more; then held=N says how many the
 * server still had open. For the memory of idle client connections.
 *
 * The loopback sockets of one machine share CLOCK_MONOTONIC with mg-upstream, but the upstream
 * reports its time since its own start, so only differences of t_ms are used.
 */
#define _GNU_SOURCE
#include "http_client.h"

#include <errno.h>
#include <inttypes.h>
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <uv.h>

#define MAX_HEADERS 16
#define LINE_KEEP 256              /* t_ms sits near the start of a line; the rest is padding */
#define READ_BUF_SIZE (256u << 10) /* one buffer shared by every connection (see on_alloc) */

typedef struct dvec {
    double *v;
    size_t n, cap;
} dvec_t;

typedef struct client client_t;

typedef struct conn {
    client_t *cl;
    unsigned index;
    uv_tcp_t tcp;
    uv_connect_t connect_req;
    uv_write_t write_req;
    char *request;
    size_t request_len;
    mg_test_http_response_t resp;
    uint64_t start_ns;
    uint64_t first_byte_ns;        /* 0 until the first body byte */
    uint64_t last_byte_ns;
    uint64_t now_ns;               /* when the read being parsed returned */
    char line[LINE_KEEP];
    size_t line_len;
    bool have_prev;
    double prev_t_ms, prev_arrival_ms;
    uint64_t lines;                /* lines that carried t_ms */
    uint64_t bulk_checked;         /* bulk: body bytes compared so far */
    bool bulk_mismatch;
    mg_test_stream_t gen;          /* bulk: the expected bytes */
    bool done, ok, closing;
    char why[128];
} conn_t;

struct client {
    uv_loop_t *loop;
    uv_timer_t deadline;
    const char *path;
    const char *headers[MAX_HEADERS];
    size_t n_headers;
    const char *user_header, *user_prefix;
    unsigned n_conns;
    uint64_t expect_chunks;        /* 0: any */
    uint64_t bulk;                 /* 0: stream mode */
    unsigned open;                 /* connections not yet closed */
    uint64_t hold_ms;              /* hold mode: how long idle connections stay after */
    unsigned responded;            /* hold mode: connections whose response is complete */
    unsigned held;                 /* hold mode: open when the hold ended */
    conn_t *conns;
    dvec_t excess;                 /* stream mode: one entry per line but the first of each conn */
    char read_buf[READ_BUF_SIZE];
};

static int dvec_push(dvec_t *d, double x)
{
    if (d->n == d->cap) {
        size_t cap = d->cap ? d->cap * 2 : 1024;
        double *v = realloc(d->v, cap * sizeof *v);
        if (v == NULL)
            return -1;
        d->v = v;
        d->cap = cap;
    }
    d->v[d->n++] = x;
    return 0;
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* The nearest-rank percentile of a sorted vector (q in 0..1); 0 when it is empty. */
static double percentile(const dvec_t *d, double q)
{
    if (d->n == 0)
        return 0;
    size_t rank = (size_t)(q * (double)d->n + 0.999999);
    if (rank < 1)
        rank = 1;
    if (rank > d->n)
        rank = d->n;
    return d->v[rank - 1];
}

static void on_close(uv_handle_t *h)
{
    conn_t *c = h->data;
    c->cl->open--;
    if (c->cl->open == 0)
        uv_close((uv_handle_t *)&c->cl->deadline, NULL);
}

/* Ends a connection once: done says whether it had finished its response, why if not. */
static void conn_finish(conn_t *c, bool ok, const char *why)
{
    if (c->closing)
        return;
    c->closing = true;
    c->ok = ok;
    if (!ok && c->why[0] == '\0')
        snprintf(c->why, sizeof c->why, "%s", why);
    uv_close((uv_handle_t *)&c->tcp, on_close);
}

/* A whole NDJSON line (or its first LINE_KEEP bytes) arrived at c->now_ns. */
static void on_line(conn_t *c)
{
    c->line[c->line_len < LINE_KEEP ? c->line_len : LINE_KEEP - 1] = '\0';
    const char *p = strstr(c->line, "\"t_ms\":");
    if (p == NULL)
        return;
    char *end;
    double t_ms = strtod(p + 7, &end);
    if (end == p + 7)
        return;
    double arrival_ms = (double)c->now_ns / 1e6;
    if (c->have_prev) {
        double excess = (arrival_ms - c->prev_arrival_ms) - (t_ms - c->prev_t_ms);
        if (dvec_push(&c->cl->excess, excess) != 0) {
            fprintf(stderr, "mg-streamclient: out of memory\n");
            exit(1);
        }
    }
    c->have_prev = true;
    c->prev_t_ms = t_ms;
    c->prev_arrival_ms = arrival_ms;
    c->lines++;
}

static void on_body(void *arg, const char *data, size_t len)
{
    conn_t *c = arg;
    if (c->first_byte_ns == 0)
        c->first_byte_ns = c->now_ns;
    c->last_byte_ns = c->now_ns;
    if (c->cl->bulk) {
        char expect[16384];
        while (len > 0 && !c->bulk_mismatch) {
            size_t k = len < sizeof expect ? len : sizeof expect;
            mg_test_stream_fill(&c->gen, expect, k);
            if (memcmp(expect, data, k) != 0)
                c->bulk_mismatch = true;
            c->bulk_checked += k;
            data += k;
            len -= k;
        }
        return;
    }
    for (size_t i = 0; i < len; i++) {
        if (data[i] == '\n') {
            on_line(c);
            c->line_len = 0;
        } else if (c->line_len < LINE_KEEP - 1) {
            c->line[c->line_len++] = data[i];
        }
    }
}

static void on_hold_end(uv_timer_t *t);

/* The response is complete: judge it. */
static void on_response(conn_t *c)
{
    c->done = true;
    client_t *cl = c->cl;
    char why[128] = "";
    if (c->resp.status != 200)
        snprintf(why, sizeof why, "status %d", c->resp.status);
    else if (cl->bulk && c->resp.body_received != cl->bulk)
        snprintf(why, sizeof why, "%" PRIu64 " bytes instead of %" PRIu64, c->resp.body_received,
                 cl->bulk);
    else if (cl->bulk && c->bulk_mismatch)
        snprintf(why, sizeof why, "body differs from the expected stream");
    else if (!cl->bulk && cl->expect_chunks && c->lines != cl->expect_chunks)
        snprintf(why, sizeof why, "%" PRIu64 " lines instead of %" PRIu64, c->lines,
                 cl->expect_chunks);
    if (cl->hold_ms && why[0] == '\0') {
        /* Kept alive and idle: it stays until the hold ends. */
        c->ok = true;
        if (++cl->responded == cl->n_conns)
            uv_timer_start(&cl->deadline, on_hold_end, cl->hold_ms, 0);
        return;
    }
    conn_finish(c, why[0] == '\0', why);
}

static void on_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *buf)
{
    /*
     * One buffer serves every connection: libuv hands it to exactly one read callback, which
     * consumes it whole before the loop asks for a buffer again.
     */
    conn_t *c = h->data;
    *buf = uv_buf_init(c->cl->read_buf, sizeof c->cl->read_buf);
}

static void on_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf)
{
    conn_t *c = s->data;
    if (c->closing)
        return;
    if (nread == UV_EOF && c->done) {
        conn_finish(c, false, "the server closed the idle connection");
        return;
    }
    if (nread == UV_EOF) {
        if (mg_test_http_response_eof(&c->resp) == 0)
            on_response(c);
        else
            conn_finish(c, false, "the server closed before the response was complete");
        return;
    }
    if (nread < 0) {
        conn_finish(c, false, uv_strerror((int)nread));
        return;
    }
    c->now_ns = uv_hrtime();
    size_t used = 0;
    if (mg_test_http_response_feed(&c->resp, buf->base, (size_t)nread, &used) != 0) {
        conn_finish(c, false, "malformed response");
        return;
    }
    if (c->resp.complete)
        on_response(c);
}

static void on_write(uv_write_t *req, int status)
{
    conn_t *c = req->data;
    if (status != 0)
        conn_finish(c, false, uv_strerror(status));
}

static void on_connect(uv_connect_t *req, int status)
{
    conn_t *c = req->data;
    if (c->closing)
        return;
    if (status != 0) {
        conn_finish(c, false, uv_strerror(status));
        return;
    }
    uv_tcp_nodelay(&c->tcp, 1);
    uv_buf_t b = uv_buf_init(c->request, (unsigned)c->request_len);
    c->write_req.data = c;
    int rc = uv_write(&c->write_req, (uv_stream_t *)&c->tcp, &b, 1, on_write);
    if (rc == 0)
        rc = uv_read_start((uv_stream_t *)&c->tcp, on_alloc, on_read);
    if (rc != 0)
        conn_finish(c, false, uv_strerror(rc));
}

static void on_hold_end(uv_timer_t *t)
{
    client_t *cl = t->data;
    for (unsigned i = 0; i < cl->n_conns; i++)
        if (!cl->conns[i].closing) {
            cl->held++;
            conn_finish(&cl->conns[i], true, "");
        }
}

static void on_deadline(uv_timer_t *t)
{
    client_t *cl = t->data;
    for (unsigned i = 0; i < cl->n_conns; i++)
        conn_finish(&cl->conns[i], false, "timed out");
}

/* Builds connection i's request. Returns 0 or -1. */
static int build_request(client_t *cl, conn_t *c, char *bulk_path)
{
    char extra[4096];
    size_t off = 0;
    for (size_t i = 0; i < cl->n_headers; i++) {
        int n = snprintf(extra + off, sizeof extra - off, "%s\r\n", cl->headers[i]);
        if (n < 0 || (size_t)n >= sizeof extra - off)
            return -1;
        off += (size_t)n;
    }
    if (cl->user_header) {
        int n = snprintf(extra + off, sizeof extra - off, "%s: %s%u\r\n", cl->user_header,
                         cl->user_prefix ? cl->user_prefix : "", c->index);
        if (n < 0 || (size_t)n >= sizeof extra - off)
            return -1;
        off += (size_t)n;
    }
    extra[off] = '\0';
    const char *path = cl->bulk ? bulk_path : cl->path;
    return mg_test_http_request(&c->request, &c->request_len, "GET", path, extra, NULL, 0) == 0
               ? 0 : -1;
}

static void usage(void)
{
    fprintf(stderr,
            "usage: mg-streamclient -p PORT [-n CONNS] [--path PATH] [-H 'Name: value']...\n"
            "                       [--user-header NAME --user-prefix PREFIX]\n"
            "                       [--expect-chunks N] [--bulk BYTES] [--timeout-ms MS]\n"
            "                       [--hold-ms MS]\n");
    exit(2);
}

static uint64_t parse_u64(const char *s, uint64_t min, uint64_t max)
{
    char *end;
    errno = 0;
    unsigned long long v = strtoull(s, &end, 10);
    if (errno || end == s || *end != '\0' || v < min || v > max)
        usage();
    return v;
}

int main(int argc, char **argv)
{
    static client_t cl;
    unsigned port = 0;
    uint64_t timeout_ms = 60000;
    char bulk_path[64];

    cl.n_conns = 1;
    cl.path = "/stream?chunks=10&interval_ms=5&size=16";
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (i + 1 >= argc)
            usage();
        const char *v = argv[++i];
        if (strcmp(a, "-p") == 0)
            port = (unsigned)parse_u64(v, 1, 65535);
        else if (strcmp(a, "-n") == 0)
            cl.n_conns = (unsigned)parse_u64(v, 1, 100000);
        else if (strcmp(a, "--path") == 0)
            cl.path = v;
        else if (strcmp(a, "-H") == 0 && cl.n_headers < MAX_HEADERS)
            cl.headers[cl.n_headers++] = v;
        else if (strcmp(a, "--user-header") == 0)
            cl.user_header = v;
        else if (strcmp(a, "--user-prefix") == 0)
            cl.user_prefix = v;
        else if (strcmp(a, "--expect-chunks") == 0)
            cl.expect_chunks = parse_u64(v, 1, UINT64_MAX);
        else if (strcmp(a, "--bulk") == 0)
            cl.bulk = parse_u64(v, 1, UINT64_MAX);
        else if (strcmp(a, "--timeout-ms") == 0)
            timeout_ms = parse_u64(v, 1, 3600000);
        else if (strcmp(a, "--hold-ms") == 0)
            cl.hold_ms = parse_u64(v, 1, 3600000);
        else
            usage();
    }
    if (port == 0)
        usage();
    if (cl.bulk) {
        cl.n_conns = 1;
        snprintf(bulk_path, sizeof bulk_path, "/bytes/%" PRIu64, cl.bulk);
    }

    signal(SIGPIPE, SIG_IGN);
    cl.loop = uv_default_loop();
    cl.conns = calloc(cl.n_conns, sizeof *cl.conns);
    if (cl.conns == NULL) {
        fprintf(stderr, "mg-streamclient: out of memory\n");
        return 1;
    }
    struct sockaddr_in sa;
    uv_ip4_addr("127.0.0.1", (int)port, &sa);
    uv_timer_init(cl.loop, &cl.deadline);
    cl.deadline.data = &cl;
    uv_timer_start(&cl.deadline, on_deadline, timeout_ms, 0);

    uint64_t t0 = uv_hrtime();
    for (unsigned i = 0; i < cl.n_conns; i++) {
        conn_t *c = &cl.conns[i];
        c->cl = &cl;
        c->index = i;
        if (build_request(&cl, c, bulk_path) != 0) {
            fprintf(stderr, "mg-streamclient: request too large\n");
            return 2;
        }
        mg_test_http_response_init(&c->resp);
        c->resp.on_body = on_body;
        c->resp.arg = c;
        mg_test_stream_init(&c->gen);
        uv_tcp_init(cl.loop, &c->tcp);
        c->tcp.data = c;
        c->connect_req.data = c;
        cl.open++;
        c->start_ns = uv_hrtime();
        int rc = uv_tcp_connect(&c->connect_req, &c->tcp, (struct sockaddr *)&sa, on_connect);
        if (rc != 0)
            conn_finish(c, false, uv_strerror(rc));
    }
    uv_run(cl.loop, UV_RUN_DEFAULT);
    double wall_ms = (double)(uv_hrtime() - t0) / 1e6;

    unsigned completed = 0, failed = 0;
    /* Responses by status: 200, the gateway's 502, 503 and 504, any other, and none at all. */
    static const int counted[] = { 200, 502, 503, 504 };
    unsigned by_status[6] = { 0 };
    dvec_t ttfb = { 0 };
    uint64_t lines = 0;
    for (unsigned i = 0; i < cl.n_conns; i++) {
        conn_t *c = &cl.conns[i];
        if (c->ok)
            completed++;
        else if (failed++ < 5)
            fprintf(stderr, "mg-streamclient: connection %u: %s\n", i, c->why);
        if (c->first_byte_ns && dvec_push(&ttfb, (double)(c->first_byte_ns - c->start_ns) / 1e6))
            return 1;
        lines += c->lines;
        size_t k = 0;
        while (k < 4 && c->resp.status != counted[k])
            k++;
        by_status[c->resp.status == 0 ? 5 : k]++;
    }
    qsort(ttfb.v, ttfb.n, sizeof *ttfb.v, cmp_double);
    qsort(cl.excess.v, cl.excess.n, sizeof *cl.excess.v, cmp_double);

    printf("conns=%u\ncompleted=%u\nfailed=%u\nwall_ms=%.1f\n", cl.n_conns, completed, failed,
           wall_ms);
    for (size_t k = 0; k < 4; k++)
        printf("status_%d=%u\n", counted[k], by_status[k]);
    printf("status_other=%u\nno_response=%u\n", by_status[4], by_status[5]);
    printf("ttfb_p50_ms=%.2f\nttfb_max_ms=%.2f\n", percentile(&ttfb, 0.5),
           ttfb.n ? ttfb.v[ttfb.n - 1] : 0.0);
    if (cl.bulk) {
        conn_t *c = &cl.conns[0];
        double secs = c->last_byte_ns > c->start_ns ? (double)(c->last_byte_ns - c->start_ns) / 1e9
                                                    : 0;
        printf("bytes=%" PRIu64 "\nverified=%d\nseconds=%.3f\nmb_per_s=%.1f\n",
               c->resp.body_received, c->ok && !c->bulk_mismatch, secs,
               secs > 0 ? (double)c->resp.body_received / 1e6 / secs : 0.0);
    } else {
        printf("lines=%" PRIu64 "\ngaps=%zu\n", lines, cl.excess.n);
        printf("gap_excess_p50_ms=%.2f\ngap_excess_p99_ms=%.2f\ngap_excess_max_ms=%.2f\n",
               percentile(&cl.excess, 0.5), percentile(&cl.excess, 0.99),
               cl.excess.n ? cl.excess.v[cl.excess.n - 1] : 0.0);
    }
    if (cl.hold_ms)
        printf("held=%u\n", cl.held);
    printf("ok=%d\n", failed == 0);

    for (unsigned i = 0; i < cl.n_conns; i++) {
        mg_test_http_response_free(&cl.conns[i].resp);
        free(cl.conns[i].request);
    }
    free(cl.conns);
    free(cl.excess.v);
    free(ttfb.v);
    uv_loop_close(cl.loop);
    return failed == 0 ? 0 : 1;
}
