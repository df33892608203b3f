/*
 * Slow and vanishing clients, against the real moongate with a real sshd and mg-upstream,
 * while another user's requests go on beside them (every one of which must succeed):
 *
 *   - slow readers: 20 clients each GET a 100 MB body and read it at a few MB/s, far slower
 *     than the upstream and the SSH connection could send it. The gateway must hold each
 *     stream back rather than buffer it: its RSS, sampled throughout, may rise above the rest
 *     before by at most the buffers' high-water marks (a channel's SSH window and a client's
 *     write queue) for every stream. Long: every body read to its end and its sha256 checked.
 *     Short: 8 MB of each, then the readers vanish (half close, half reset).
 *   - half requests: waves of 200 clients that send half a request and vanish, in four kinds: half a
 *     request head, then a FIN or a RST; a whole POST /echo head and half its body, then a FIN
 *     or a RST. Each body that reached the upstream must end there as a cut request (its
 *     response aborted, counted by mg-upstream), and nothing may remain: no client, no busy
 *     channel, no descriptor beyond the baseline.
 *
 * Each prints its figures and fails on a leak or on a failure beside them.
 */
#include "soak.h"

#include "upstream.h"

#define OTHERS "Authorization: Bearer tok-alice\r\n"
#define BODY_BYTES 100000000ull
/* What one held-back stream may keep in the gateway, from the buffers' high-water marks: the
   SSH channel's window (2 MiB, and a read more, libssh2's default), twice, since its bytes may
   sit in the connection's inbound buffer and in libssh2's packets at once as they pass from one
   to the other; and the client's two write buffers (one being written, one filling), each up
   to its high-water mark (512 KiB) and a read (64 KiB) past it. */
#define STREAM_BOUND_KB (2 * (2048 + 64) + 2 * (512 + 64))
/* Besides the streams: the load beside them, and the allocator's own keeping. */
#define PEAK_SLACK_KB 4096
/* RSS growth allowed between the rest before and the rest after (outside ASan). */
#define RSS_BOUND_KB 4096


typedef soak_world_t world_t;

/* Another user's load beside the test's clients: short requests and streams. */
static void start_others(world_t *w)
{
    static const soak_req_t reqs[] = {
        { .path = "/hello", .headers = OTHERS, .body_equals = "hello\n" },
        { .path = "/stream?chunks=5&interval_ms=20", .headers = OTHERS, .lines = 5 },
    };
    w->load = (soak_load_t){ .port = w->gw.port, .reqs = reqs, .nreqs = 2, .nthreads = 2,
                             .pause_ms = 10 };
    soak_load_start(&w->load);
    assert_true(soak_load_wait_ok(&w->load, 20, 30000));
}

/* Stops the load beside and fails if any of its requests did; returns how many it made. */
static uint64_t stop_others(world_t *w, const char *what)
{
    soak_load_stop(&w->load);
    soak_tally_t t = soak_load_tally(&w->load);
    soak_tally_print(what, &t);
    if (soak_tally_failed(&t) != 0)
        soak_load_print_failures(&w->load, 0, 20);
    assert_int_equal(soak_tally_failed(&t), 0);
    soak_load_free(&w->load);
    return t.n;
}

/* ==== 1. slow readers ==== */

static void test_slow_readers(void **state)
{
    world_t *w = *state;
    gw_t *g = &w->gw;
    enum { READERS = 20 };
    const bool whole = soak_long();
    const uint64_t read_each = whole ? BODY_BYTES : 8000000;
    const double rate = (whole ? 6e6 : 2e6) / 1000; /* bytes per ms, for each reader */
    print_message("mode %s: %d readers of %llu-byte bodies, each reading %llu bytes at %.0f "
                  "MB/s\n",
                  soak_mode(), READERS, BODY_BYTES, (unsigned long long)read_each, rate / 1000);
    /* Connections idle out soon: the figures at rest are taken with none open, before and
       after (an SSH connection that carried a held-back stream keeps some of its memory
       until it closes). */
    soak_policy_t o = { .idle_timeout_ms = SOAK_IDLE_MS };
    soak_gw_start(g, &w->sshd, w->up.port, &o, soak_sweep_often);

    /* Each reader is its own user, with its own SSH connection; a warm-up opens them. */
    char headers[READERS][64];
    for (int i = 0; i < READERS; i++) {
        snprintf(headers[i], sizeof(headers[i]), "Authorization: Bearer tok-slow%d\r\n", i);
        soak_req_t q = { .path = "/bytes/1000000", .headers = headers[i], .body_len = 1000000 };
        assert_int_equal(soak_request(g->port, &q, 10000), 200);
    }
    soak_figures_t before = soak_wait_quiet(g, -1, 0, SOAK_IDLE_MS + 10000, NULL);
    start_others(w);

    static soak_client_t c[READERS];
    char path[64];
    snprintf(path, sizeof(path), "/bytes/%llu", BODY_BYTES);
    for (int i = 0; i < READERS; i++) {
        soak_client_open(&c[i], g->port, headers[i], path);
        c[i].r.hash_body = whole;
    }
    double t0 = mg_test_now_ms(), last_sample = 0;
    long peak = before.rss_kb;
    int samples = 0;
    uint64_t total = 0;
    const double deadline = t0 + (double)read_each / rate * 2 + 30000;
    for (;;) {
        double now = mg_test_now_ms();
        bool all = true;
        for (int i = 0; i < READERS; i++) {
            /* Each reads no more than its rate allows since the start. */
            uint64_t allowed = (uint64_t)((now - t0) * rate);
            if (allowed > read_each)
                allowed = read_each;
            if (c[i].r.body_received < allowed)
                total += soak_client_read(&c[i], (size_t)(allowed - c[i].r.body_received));
            if (c[i].eof && c[i].r.body_received < read_each) {
                gw_print_log_tail(g, 20);
                fail_msg("reader %d: the connection ended after %llu body bytes (status %d)", i,
                         (unsigned long long)c[i].r.body_received, c[i].r.status);
            }
            all = all && c[i].r.body_received >= read_each;
        }
        if (now - last_sample >= 100) {
            long rss = soak_rss_kb(g->proc.pid);
            peak = rss > peak ? rss : peak;
            samples++;
            last_sample = now;
        }
        if (all)
            break;
        assert_true(now < deadline);
        mg_test_sleep_ms(10);
    }
    double took = mg_test_now_ms() - t0;
    int complete = 0;
    if (whole) {
        char want[65];
        assert_int_equal(mg_test_stream_sha256_hex(BODY_BYTES, want), 0);
        for (int i = 0; i < READERS; i++) {
            soak_client_read(&c[i], 0);
            assert_true(c[i].r.complete);
            assert_string_equal(c[i].r.body_sha256, want);
            complete++;
        }
    }
    for (int i = 0; i < READERS; i++) {
        assert_int_equal(c[i].r.status, 200);
        soak_client_close(&c[i], i % 2 == 1);
    }
    stop_others(w, "beside the slow readers");

    soak_figures_t open = soak_wait_quiet(g, before.fds, -1, 15000, NULL);
    soak_figures_t after = soak_wait_quiet(g, before.fds, 0, SOAK_IDLE_MS + 10000, NULL);
    long bound = (long)READERS * STREAM_BOUND_KB + PEAK_SLACK_KB;
    print_message("%d readers: %.1f MB read in %.1f s (%d bodies complete, sha256 checked); RSS "
                  "at rest %ld KiB, at most %ld KiB in %d samples (+%ld, bound +%ld KiB: %d "
                  "streams of %d KiB, and %d)\n",
                  READERS, total / 1e6, took / 1000, complete, before.rss_kb, peak, samples,
                  peak - before.rss_kb, bound, READERS, STREAM_BOUND_KB, PEAK_SLACK_KB);
    print_message("at rest with the readers' connections still open: RSS %ld KiB\n",
                  open.rss_kb);
    if (!SOAK_SANITIZED)
        assert_true(peak - before.rss_kb <= bound);
    soak_assert_flat(g, "gateway after the slow readers", before, after, RSS_BOUND_KB);
    gw_stop(g);
}

/* ==== 2. half requests ==== */

enum { HALF_HEAD_FIN, HALF_HEAD_RST, HALF_BODY_FIN, HALF_BODY_RST, KINDS };

static const char *const kind_names[KINDS] = {
    "half a head, then FIN", "half a head, then RST", "half a body, then FIN",
    "half a body, then RST",
};

/* Opens a connection and sends half of a request of this kind (user: tok-half<i % 10>). */
static int half_request(uint16_t port, int i, int kind)
{
    char head[256];
    int n = snprintf(head, sizeof(head),
                     "POST /echo HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                     "Authorization: Bearer tok-half%d\r\nContent-Length: 65536\r\n\r\n",
                     i % 10);
    static char body[32768];
    memset(body, 'b', sizeof(body));
    int fd = gw_connect(port, 2000);
    assert_true(fd >= 0);
    bool whole_head = kind == HALF_BODY_FIN || kind == HALF_BODY_RST;
    size_t len = whole_head ? (size_t)n : (size_t)n / 2;
    assert_int_equal(send(fd, head, len, MSG_NOSIGNAL), (ssize_t)len);
    if (whole_head)
        assert_int_equal(send(fd, body, sizeof(body), MSG_NOSIGNAL), (ssize_t)sizeof(body));
    return fd;
}

static void vanish(int fd, bool reset)
{
    if (reset) {
        struct linger lg = { .l_onoff = 1, .l_linger = 0 };
        setsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, sizeof(lg));
    }
    close(fd);
}

static mg_test_upstream_stats_t upstream_stats(const world_t *w)
{
    mg_test_upstream_stats_t st;
    assert_int_equal(mg_test_upstream_stats(&w->up, &st), 0);
    return st;
}

typedef struct in_flight_wait {
    const gw_t *g;
    long want;
    soak_gw_stats_t st;
} in_flight_wait_t;

static bool in_flight_reached(void *arg)
{
    in_flight_wait_t *f = arg;
    return soak_stats(f->g, &f->st) == 0 && f->st.in_flight >= f->want;
}

/* One wave: CLIENTS half requests, all sent, then all gone; counts them by kind in sent. */
static void half_wave(const gw_t *g, int sent[KINDS])
{
    enum { CLIENTS = 200 };
    static int fds[CLIENTS];
    for (int i = 0; i < CLIENTS; i++)
        fds[i] = half_request(g->port, i, i % KINDS);
    /* Every body is under way to the upstream (its request in flight, its channel open, what
       came of it sent on) before its client goes. */
    in_flight_wait_t f = { .g = g, .want = CLIENTS / 2 };
    if (!soak_wait(in_flight_reached, &f, 10000, 20))
        fail_msg("%ld requests in flight, not the %ld whose bodies are under way", f.st.in_flight,
                 f.want);
    mg_test_sleep_ms(100);
    for (int i = 0; i < CLIENTS; i++) {
        int kind = i % KINDS;
        vanish(fds[i], kind == HALF_HEAD_RST || kind == HALF_BODY_RST);
        sent[kind]++;
    }
}

static void test_half_requests(void **state)
{
    world_t *w = *state;
    gw_t *g = &w->gw;
    const int waves = soak_pick(3, 2, 20, 5);
    print_message("mode %s: a wave of warm-up and %d counted, each of 200 clients that send "
                  "half a request and vanish\n",
                  soak_mode(), waves);
    soak_policy_t o = { .max_channels = 40 };
    soak_gw_start(g, &w->sshd, w->up.port, &o, soak_sweep_often);

    /* Warm-up: every user's SSH connections open, the server's buffers at their high-water
       marks of one wave; then the gateway at rest is the baseline. */
    int warm[KINDS] = { 0 };
    half_wave(g, warm);
    mg_test_sleep_ms(SOAK_SWEEP_WAIT_MS);
    soak_figures_t before = soak_wait_quiet(g, -1, -1, 10000, NULL);
    mg_test_upstream_stats_t up0 = upstream_stats(w);

    start_others(w);
    int sent[KINDS] = { 0 };
    double t0 = mg_test_now_ms();
    for (int wave = 0; wave < waves; wave++)
        half_wave(g, sent);
    double took = mg_test_now_ms() - t0;
    uint64_t others = stop_others(w, "beside the half requests");
    soak_gw_stats_t st;
    mg_test_sleep_ms(SOAK_SWEEP_WAIT_MS);
    soak_figures_t after = soak_wait_quiet(g, before.fds, -1, 15000, &st);
    mg_test_upstream_stats_t up1 = upstream_stats(w);
    int bodies = sent[HALF_BODY_FIN] + sent[HALF_BODY_RST];
    /* (up1 counts the GET /stats that read up0.) */
    uint64_t served = up1.requests_served - up0.requests_served - 1;
    uint64_t aborted = up1.aborted_responses - up0.aborted_responses;
    for (int k = 0; k < KINDS; k++)
        print_message("%-22s %d clients\n", kind_names[k], sent[k]);
    print_message("%d clients in %.1f s; the upstream: %llu responses served (the %llu requests "
                  "beside), %llu of the %d half bodies' echoes aborted; at rest: %ld clients, "
                  "%ld in flight, %ld busy channels\n",
                  sent[0] + sent[1] + sent[2] + sent[3], took / 1000, (unsigned long long)served,
                  (unsigned long long)others, (unsigned long long)aborted, bodies, st.clients,
                  st.in_flight, st.busy_channels);
    /* No half request became a whole one at the upstream: it answered the load beside, and
       of the echoes of the half bodies it began, it finished none. */
    assert_true(served == others);
    assert_true(aborted > 0 && aborted <= (uint64_t)bodies);
    assert_int_equal(st.clients, 0);
    assert_int_equal(st.busy_channels, 0);
    soak_assert_flat(g, "gateway after the half requests", before, after, RSS_BOUND_KB);
    gw_stop(g);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_teardown(test_slow_readers, soak_test_teardown),
        cmocka_unit_test_teardown(test_half_requests, soak_test_teardown),
    };
    const char *filter = getenv("MG_TEST_FILTER");
    if (filter != NULL && *filter != '\0')
        cmocka_set_test_filter(filter);
    return cmocka_run_group_tests(tests, soak_group_setup, soak_group_teardown);
}
