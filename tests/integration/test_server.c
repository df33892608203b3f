/*
 * The HTTP server (src/gateway/server.c) end to end, the way a hostile client tries it: raw
 * bytes on plain sockets to the real moongate program, a real sshd, and an mg-upstream that
 * captures every byte it receives, so that each case checks what actually reached the
 * upstream, not only the status the client got.
 *
 *   - strictness: each malformed head is answered at once with its status, the connection is
 *     closed, and nothing reaches the upstream;
 *   - fidelity: the target byte for byte, every end-to-end field in order with its case and
 *     duplicates, hop-by-hop ones and those Connection names removed, Host set to the target;
 *   - chunked uploads from a real client (curl) and with trailers, Expect: 100-continue answered
 *     at once and refused without the body, pipelining in order, prompt closes;
 *   - one user's bytes never in another user's upstream, under concurrency;
 *   - 2,000 idle connections and the connection cap, the descriptor limit (ulimit -n 256);
 *   - TLS with ALPN, and a certificate renewed by SIGHUP (a bad one refused, the old one kept).
 */
#include "gwtest.h"

#include <pthread.h>
#include <stdatomic.h>
#include <sys/resource.h>

#define ALICE "Authorization: Bearer alice-token\r\n"
#define BOB "Authorization: Bearer bob-token\r\n"

typedef struct world {
    mg_test_sshd_t sshd;
    mg_test_upstream_t up;   /* with capture */
    gw_t gw;                 /* the shared gateway */
    gw_t other;              /* one a test starts with settings of its own */
    char dir[MG_TEST_PATH_MAX];
} world_t;

static void write_policy(const world_t *w, const char *path)
{
    char route[2048];
    gw_route_fields(route, sizeof(route), &w->sshd, w->up.port);
    char text[4096];
    int n = snprintf(
        text, sizeof(text),
        "return {\n"
        "  authenticate = function(req)\n"
        "    local t = req.headers[\"authorization\"]\n"
        "    if t == \"Bearer alice-token\" then return \"alice\" end\n"
        "    if t == \"Bearer bob-token\" then return \"bob\" end\n"
        "    return nil, 401, \"bad or missing token\"\n"
        "  end,\n"
        "  limits = function(user)\n"
        "    return { max_connections = 2, max_channels = 32, queue_max = 500,\n"
        "             queue_timeout_ms = 20000, idle_timeout_ms = 300000 }\n"
        "  end,\n"
        "  route = function(req, user)\n"
        "    return { %s }\n"
        "  end,\n"
        "}\n",
        route);
    assert_true(n > 0 && n < (int)sizeof(text));
    assert_int_equal(mg_test_write_file(path, text, (size_t)n, 0600), 0);
}

static void start_gw(world_t *w, gw_t *g, const char *const *env)
{
    gw_prepare(g);
    write_policy(w, g->policy);
    gw_launch(g, "127.0.0.1:0", env);
}

static gw_t *shared(world_t *w)
{
    if (!w->gw.running)
        start_gw(w, &w->gw, NULL);
    gw_assert_alive(&w->gw);
    return &w->gw;
}

static int group_setup(void **state)
{
    world_t *w = calloc(1, sizeof(*w));
    if (w == NULL || mg_test_sshd_start(&w->sshd, NULL) != 0 ||
        mg_test_upstream_start_capture(&w->up) != 0 ||
        mg_test_mkdtemp(w->dir, sizeof(w->dir), "mg-srv") != 0)
        return -1;
    /* 2,000 idle connections and more need descriptors; the gateway inherits the limit. */
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < 8192) {
        rl.rlim_cur = rl.rlim_max < 8192 ? rl.rlim_max : 8192;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
    *state = w;
    return 0;
}

static int group_teardown(void **state)
{
    world_t *w = *state;
    gw_kill(&w->gw);
    gw_kill(&w->other);
    mg_test_upstream_stop(&w->up);
    mg_test_sshd_stop(&w->sshd);
    free(w);
    mg_test_cleanup_all();
    return 0;
}

/* ---- raw exchanges ---- */

typedef struct raw {
    char *data;     /* what came back, NUL-terminated */
    size_t len;
    bool closed;    /* the server closed the connection */
    double first_ms, closed_ms; /* after the send began: first byte, and the close */
} raw_t;

/*
 * Sends data on a new connection (while reading), then reads until the server closes or
 * timeout_ms pass, or, with stop_after_response, until one whole response has come.
 */
static void raw_send(uint16_t port, const char *data, size_t len, int timeout_ms, raw_t *r)
{
    memset(r, 0, sizeof(*r));
    int fd = gw_connect(port, 2000);
    assert_true(fd >= 0);
    double t0 = mg_test_now_ms(), deadline = t0 + timeout_ms;
    size_t sent = 0, cap = 64 * 1024;
    r->data = malloc(cap + 1);
    assert_non_null(r->data);
    for (;;) {
        short ev = POLLIN | (sent < len ? POLLOUT : 0);
        if (gw_poll(fd, ev, deadline) != 0)
            break;
        if (sent < len) {
            ssize_t n = send(fd, data + sent, len - sent, MSG_NOSIGNAL | MSG_DONTWAIT);
            if (n > 0)
                sent += (size_t)n;
            else if (n < 0 && errno != EAGAIN && errno != EINTR)
                sent = len;
        }
        if (r->len == cap) {
            cap *= 2;
            r->data = realloc(r->data, cap + 1);
            assert_non_null(r->data);
        }
        ssize_t n = recv(fd, r->data + r->len, cap - r->len, MSG_DONTWAIT);
        if (n > 0) {
            if (r->len == 0)
                r->first_ms = mg_test_now_ms() - t0;
            r->len += (size_t)n;
        } else if (n == 0 || (n < 0 && errno != EAGAIN && errno != EINTR)) {
            r->closed = true;
            r->closed_ms = mg_test_now_ms() - t0;
            break;
        }
    }
    r->data[r->len] = '\0';
    close(fd);
}

static int raw_status(const raw_t *r)
{
    return r->len > 12 && strncmp(r->data, "HTTP/1.1 ", 9) == 0 ? atoi(r->data + 9) : 0;
}

/* What the upstream received since the last capture_clear (the caller frees it). */
static char *captured(world_t *w)
{
    char *out[1] = { NULL };
    int rc = mg_test_upstream_captured(&w->up, &out[0], NULL);
    assert_int_equal(rc, 0);
    return out[0];
}

/* ---- 1. strictness: refused at once, closed, nothing upstream ---- */

static void test_strict_refusals(void **state)
{
    world_t *w = *state;
    gw_t *g = shared(w);
    static char longline[20 * 1024], bighead[40 * 1024], many[8 * 1024];
    int n = snprintf(longline, sizeof(longline), "GET /");
    memset(longline + n, 'a', 17000);
    snprintf(longline + n + 17000, sizeof(longline) - (size_t)n - 17000,
             " HTTP/1.1\r\nHost: x\r\n" ALICE "\r\n");
    n = snprintf(bighead, sizeof(bighead), "GET / HTTP/1.1\r\nHost: x\r\n" ALICE "X-Big: ");
    memset(bighead + n, 'b', 33000);
    snprintf(bighead + n + 33000, sizeof(bighead) - (size_t)n - 33000, "\r\n\r\n");
    n = snprintf(many, sizeof(many), "GET / HTTP/1.1\r\nHost: x\r\n" ALICE);
    for (int i = 0; i < 101; i++)
        n += snprintf(many + n, sizeof(many) - (size_t)n, "X-F%d: v\r\n", i);
    snprintf(many + n, sizeof(many) - (size_t)n, "\r\n");
    static const char nul[] = "GET / HTTP/1.1\r\nHost: x\r\n" ALICE "X-Nul: a\0b\r\n\r\n";

    /* A malformed chunked body is found after the head may have gone upstream (bodies stream):
       then the upstream sees the channel close on an incomplete request, never its end. */
    struct {
        const char *name, *data;
        size_t len;
        int status;
        bool in_body;
    } cases[] = {
        { "space before a colon", "POST /echo HTTP/1.1\r\nHost: x\r\n" ALICE
          "Transfer-Encoding : chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n", 0, 400, false },
        { "obs-fold", "GET / HTTP/1.1\r\nHost: x\r\n" ALICE "X-A: a\r\n b\r\n\r\n", 0, 400, false },
        { "bare CR in a value", "GET / HTTP/1.1\r\nHost: x\r\n" ALICE "X-A: a\rb\r\n\r\n", 0,
          400, false },
        { "bare LF line ends", "GET / HTTP/1.1\nHost: x\n" ALICE "\n", 0, 400, false },
        { "NUL in a value", nul, sizeof(nul) - 1, 400, false },
        { "control byte in a value", "GET / HTTP/1.1\r\nHost: x\r\n" ALICE "X-A: \001\r\n\r\n",
          0, 400, false },
        { "invalid method token", "G@T / HTTP/1.1\r\nHost: x\r\n" ALICE "\r\n", 0, 400, false },
        { "unknown method", "BREW / HTTP/1.1\r\nHost: x\r\n" ALICE "\r\n", 0, 501, false },
        { "two Host headers", "GET / HTTP/1.1\r\nHost: x\r\nHost: y\r\n" ALICE "\r\n", 0, 400, false },
        { "no Host in HTTP/1.1", "GET / HTTP/1.1\r\n" ALICE "\r\n", 0, 400, false },
        { "Content-Length with Transfer-Encoding", "POST /echo HTTP/1.1\r\nHost: x\r\n" ALICE
          "Content-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 0, 400, false },
        { "differing Content-Lengths", "POST /echo HTTP/1.1\r\nHost: x\r\n" ALICE
          "Content-Length: 3\r\nContent-Length: 4\r\n\r\nabcd", 0, 400, false },
        { "Transfer-Encoding not ending in chunked", "POST /echo HTTP/1.1\r\nHost: x\r\n" ALICE
          "Transfer-Encoding: gzip\r\n\r\nabc", 0, 400, false },
        { "a coding before chunked", "POST /echo HTTP/1.1\r\nHost: x\r\n" ALICE
          "Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n", 0, 501, false },
        { "HTTP/2.0", "GET / HTTP/2.0\r\nHost: x\r\n" ALICE "\r\n", 0, 505, false },
        { "absolute-form target", "GET http://x/ HTTP/1.1\r\nHost: x\r\n" ALICE "\r\n", 0, 400, false },
        { "8-bit byte in the target", "GET /caf\xc3\xa9 HTTP/1.1\r\nHost: x\r\n" ALICE "\r\n", 0,
          400, false },
        { "unsupported Expect", "POST /echo HTTP/1.1\r\nHost: x\r\n" ALICE
          "Expect: 200-ok\r\nContent-Length: 1\r\n\r\nx", 0, 417, false },
        { "request line over 16 KiB", longline, 0, 414, false },
        { "head over 32 KiB", bighead, 0, 431, false },
        { "more than 100 fields", many, 0, 431, false },
        { "body over MOONGATE_MAX_BODY", "POST /echo HTTP/1.1\r\nHost: x\r\n" ALICE
          "Content-Length: 20000000\r\n\r\n", 0, 413, false },
        { "chunk data not followed by CRLF", "POST /echo HTTP/1.1\r\nHost: x\r\n" ALICE
          "Transfer-Encoding: chunked\r\n\r\n5\r\nhelloXX0\r\n\r\n", 0, 400, true },
        { "a chunk size with a space", "POST /echo HTTP/1.1\r\nHost: x\r\n" ALICE
          "Transfer-Encoding: chunked\r\n\r\n5 \r\nhello\r\n0\r\n\r\n", 0, 400, true },
    };
    int bad = 0;
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        assert_int_equal(mg_test_upstream_capture_clear(&w->up), 0);
        size_t len = cases[i].len ? cases[i].len : strlen(cases[i].data);
        raw_t r;
        raw_send(g->port, cases[i].data, len, 3000, &r);
        char *up = captured(w);
        int st = raw_status(&r);
        bool nothing = cases[i].in_body ? strstr(up, "\r\n0\r\n") == NULL : up[0] == '\0';
        bool ok = st == cases[i].status && r.closed && r.closed_ms < 1000 && nothing;
        print_message("%-40s -> %d in %.1f ms, %s after %.1f ms; upstream got %zu bytes%s\n",
                      cases[i].name, st, r.first_ms, r.closed ? "closed" : "open", r.closed_ms,
                      strlen(up), ok ? "" : "  <-- FAIL");
        if (!ok && r.len)
            print_message("    %.*s\n", (int)strcspn(r.data, "\r"), r.data);
        bad += !ok;
        free(up);
        free(r.data);
    }
    assert_int_equal(gw_healthz(g, 2000), 200);
    assert_int_equal(bad, 0);
}

/* ---- 2. fidelity: what reaches the upstream is what the client sent ---- */

/* Sends one request as alice and returns the bytes the upstream received for it. */
static char *forward(world_t *w, const char *req, int want_status)
{
    gw_t *g = shared(w);
    assert_int_equal(mg_test_upstream_capture_clear(&w->up), 0);
    mg_test_http_response_t r;
    mg_test_http_response_init(&r);
    r.keep_body = true;
    int rc = gw_exchange(g->port, req, strlen(req), &r, 10000, NULL);
    gw_expect_status(g, rc, &r, want_status, req);
    mg_test_http_response_free(&r);
    /* The upstream's capture is written as it reads: the response means it has it all. */
    return captured(w);
}

/* The request line of a captured request. */
static void expect_request_line(const char *up, const char *line)
{
    size_t n = strlen(line);
    if (strncmp(up, line, n) != 0 || strncmp(up + n, "\r\n", 2) != 0)
        fail_msg("upstream request line: want \"%s\", got \"%.*s\"", line,
                 (int)strcspn(up, "\r\n"), up);
}

static void test_target_byte_for_byte(void **state)
{
    world_t *w = *state;
    static const char *const targets[] = {
        "/v1/chat;x=1/completions",
        "/a%2Fb",
        "/search?q=a%2Bb+c&x=%3D&y=%26",
        "/a/%2e%2e/b",
        "/a/../b/./c",
        "//a//b",
        "/p?=&&==%25%zz",
        "/hello?k=v#",
    };
    for (size_t i = 0; i < sizeof(targets) / sizeof(targets[0]); i++) {
        bool fragment = strchr(targets[i], '#') != NULL;
        char req[512], line[512];
        snprintf(req, sizeof(req), "GET %s HTTP/1.1\r\nHost: gw\r\n" ALICE "\r\n", targets[i]);
        snprintf(line, sizeof(line), "GET %s HTTP/1.1", targets[i]);
        char *up = forward(w, req, fragment ? 400 : 200);
        if (fragment)
            assert_string_equal(up, ""); /* a fragment is no part of a target: refused */
        else
            expect_request_line(up, line);
        print_message("%-36s -> %.*s\n", targets[i], (int)strcspn(up, "\r"), up);
        free(up);
    }

    /* A 9 KiB query argument arrives whole. */
    static char big[16 * 1024], line[16 * 1024];
    int n = snprintf(big, sizeof(big), "GET /api?prompt=");
    memset(big + n, 'q', 9216);
    snprintf(big + n + 9216, sizeof(big) - (size_t)n - 9216, "&x=1 HTTP/1.1\r\nHost: gw\r\n" ALICE
             "\r\n");
    snprintf(line, sizeof(line), "%.*s", (int)strcspn(big, "\r"), big);
    char *up = forward(w, big, 200);
    expect_request_line(up, line);
    free(up);
}

static void test_fields_in_order_case_and_duplicates(void **state)
{
    world_t *w = *state;
    static char ua[10 * 1024];
    memset(ua, 'u', 9216);
    static char req[16 * 1024];
    snprintf(req, sizeof(req),
             "POST /echo HTTP/1.1\r\nHost: gw.example\r\n" ALICE
             "X-Stainless-OS: Linux\r\nx-stainless-arch: x64\r\nX-Stainless-Runtime: node\r\n"
             "X-Dup: one\r\nx-dup: two\r\nX-Dup: three\r\nX-Empty:\r\nUser-Agent: %s\r\n"
             "Connection: keep-alive, X-Hop-Named\r\nX-Hop-Named: drop me\r\nKeep-Alive: 5\r\n"
             "TE: trailers\r\nProxy-Authorization: Basic x\r\nUpgrade: h2c\r\n"
             "X-Forwarded-For: 203.0.113.9\r\nX-Forwarded-Proto: ftp\r\n"
             "Content-Type: application/json\r\nContent-Length: 2\r\n\r\n{}",
             ua);
    char *up = forward(w, req, 200);
    char expect_block[16 * 1024];
    snprintf(expect_block, sizeof(expect_block),
             "POST /echo HTTP/1.1\r\nHost: 127.0.0.1:%u\r\n"
             "X-Stainless-OS: Linux\r\nx-stainless-arch: x64\r\nX-Stainless-Runtime: node\r\n"
             "X-Dup: one\r\nx-dup: two\r\nX-Dup: three\r\nX-Empty: \r\nUser-Agent: %s\r\n"
             "Content-Type: application/json\r\n"
             "X-Forwarded-For: 203.0.113.9, 127.0.0.1\r\nX-Forwarded-Proto: http\r\n"
             "X-Request-Id: ",
             (unsigned)w->up.port, ua);
    if (strncmp(up, expect_block, strlen(expect_block)) != 0) {
        size_t i = 0;
        while (up[i] && up[i] == expect_block[i])
            i++;
        fail_msg("the upstream head differs at byte %zu:\n got: %.200s\nwant: %.200s", i, up + i,
                 expect_block + i);
    }
    const char *tail = strstr(up, "\r\nContent-Length: 2\r\nConnection: keep-alive\r\n\r\n{}");
    assert_non_null(tail);
    static const char *const gone[] = { "X-Hop-Named", "Keep-Alive", "TE", "Proxy-Authorization",
                                        "Upgrade", "X-Forwarded-Proto: ftp",
                                        "Authorization" /* the gateway's credential */ };
    for (size_t i = 0; i < sizeof(gone) / sizeof(gone[0]); i++) {
        char needle[64];
        snprintf(needle, sizeof(needle), "\r\n%s%s", gone[i], strchr(gone[i], ':') ? "" : ":");
        if (strstr(up, needle))
            fail_msg("%s reached the upstream", gone[i]);
    }
    free(up);
}

/* ---- 3. bodies: chunked from a real client, trailers, Expect, pipelining ---- */

static void test_chunked_upload_from_curl(void **state)
{
    world_t *w = *state;
    gw_t *g = shared(w);
    char file[MG_TEST_PATH_MAX], out[MG_TEST_PATH_MAX];
    assert_int_equal(mg_test_path_join(file, sizeof(file), w->dir, "upload.bin"), 0);
    assert_int_equal(mg_test_path_join(out, sizeof(out), w->dir, "echo.out"), 0);
    enum { SIZE = 3 * 1024 * 1024 + 17 };
    char *data = malloc(SIZE);
    assert_non_null(data);
    for (size_t i = 0; i < SIZE; i++)
        data[i] = (char)('a' + (i * 7 + i / 1000) % 26);
    assert_int_equal(mg_test_write_file(file, data, SIZE, 0600), 0);
    char url[96], at[MG_TEST_PATH_MAX + 2];
    snprintf(url, sizeof(url), "http://127.0.0.1:%u/echo", (unsigned)g->port);
    snprintf(at, sizeof(at), "@%s", file);
    assert_int_equal(mg_test_upstream_capture_clear(&w->up), 0);
    /* curl streams a file with Transfer-Encoding: chunked when told to, as httpx does with a
       generator and Node's fetch with a stream. */
    char *const argv[] = { "curl", "-sS", "-o", out, "-w", "%{http_code}", "-H",
                           "Authorization: Bearer alice-token", "-H",
                           "Transfer-Encoding: chunked", "--data-binary", at, url, NULL };
    char code_file[MG_TEST_PATH_MAX];
    assert_int_equal(mg_test_path_join(code_file, sizeof(code_file), w->dir, "code"), 0);
    mg_test_spawn_opts_t so = { .stdout_path = code_file };
    int code = -1;
    double t0 = mg_test_now_ms();
    assert_int_equal(mg_test_proc_run(argv, &so, 30000, &code), 0);
    double ms = mg_test_now_ms() - t0;
    assert_int_equal(code, 0);
    char *status = NULL, *echoed = NULL;
    size_t elen = 0;
    assert_int_equal(mg_test_read_file(code_file, &status, NULL), 0);
    assert_string_equal(status, "200");
    assert_int_equal(mg_test_read_file(out, &echoed, &elen), 0);
    assert_int_equal(elen, SIZE);
    assert_memory_equal(echoed, data, SIZE);
    char *up = captured(w);
    assert_non_null(strstr(up, "\r\nTransfer-Encoding: chunked\r\n"));
    assert_null(strstr(up, "Content-Length"));
    print_message("a %d-byte chunked upload from curl echoed whole in %.0f ms\n", SIZE, ms);
    free(up);
    free(status);
    free(echoed);
    free(data);
}

static void test_chunked_with_trailers_and_pipelining(void **state)
{
    world_t *w = *state;
    gw_t *g = shared(w);
    assert_int_equal(mg_test_upstream_capture_clear(&w->up), 0);
    static const char reqs[] =
        "POST /echo HTTP/1.1\r\nHost: gw\r\n" ALICE "Transfer-Encoding: chunked\r\n\r\n"
        "5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-Checksum: 42\r\nContent-Length: 999\r\n\r\n"
        "GET /hello?second HTTP/1.1\r\nHost: gw\r\n" ALICE "\r\n"
        "GET /hello?third HTTP/1.1\r\nHost: gw\r\n" ALICE "Connection: close\r\n\r\n";
    raw_t r;
    raw_send(g->port, reqs, sizeof(reqs) - 1, 5000, &r);
    /* Three answers, in order, then the close the last one asked for. */
    const char *a = strstr(r.data, "hello world");
    const char *b = a ? strstr(a, "HTTP/1.1 200") : NULL;
    const char *c = b ? strstr(b + 1, "HTTP/1.1 200") : NULL;
    if (!a || !b || !c || !r.closed)
        fail_msg("pipelined answers: %s", r.data);
    assert_non_null(strstr(c, "Connection: close"));
    assert_true(r.closed_ms < 2000);
    char *up = captured(w);
    /* Re-framed upstream, the trailer kept, the framing one dropped; then the next two. */
    const char *body = strstr(up, "\r\n\r\n");
    assert_non_null(body);
    assert_non_null(strstr(body, "5\r\nhello\r\n6\r\n world\r\n0\r\nX-Checksum: 42\r\n\r\n"));
    /* (Not just "999": a random X-Request-Id may hold those digits.) */
    assert_null(strstr(up, "Content-Length: 999"));
    assert_null(strstr(up, "ext=1"));
    const char *second = strstr(up, "GET /hello?second HTTP/1.1\r\n");
    assert_non_null(second);
    assert_non_null(strstr(second, "GET /hello?third HTTP/1.1\r\n"));
    free(up);
    free(r.data);
}

static void test_head_then_get(void **state)
{
    world_t *w = *state;
    gw_t *g = shared(w);
    static const char reqs[] = "HEAD /bytes/1000 HTTP/1.1\r\nHost: gw\r\n" ALICE "\r\n"
                               "GET /hello HTTP/1.1\r\nHost: gw\r\n" ALICE "Connection: close\r\n\r\n";
    raw_t r;
    raw_send(g->port, reqs, sizeof(reqs) - 1, 5000, &r);
    /* The HEAD response says how long the body would be and has none: the next response
       follows its blank line at once. */
    const char *end = strstr(r.data, "\r\n\r\n");
    assert_non_null(end);
    assert_non_null(strstr(r.data, "Content-Length: 1000\r\n"));
    assert_int_equal(strncmp(end + 4, "HTTP/1.1 200 OK\r\n", 17), 0);
    assert_non_null(strstr(end + 4, "\r\n\r\nhello\n"));
    assert_true(r.closed);
    free(r.data);
}

static void test_expect_continue(void **state)
{
    world_t *w = *state;
    gw_t *g = shared(w);
    enum { LEN = 1 << 20 };
    char head[256];
    int hl = snprintf(head, sizeof(head), "POST /echo HTTP/1.1\r\nHost: gw\r\n" ALICE
                      "Expect: 100-continue\r\nContent-Length: %d\r\n\r\n", LEN);
    int fd = gw_connect(g->port, 2000);
    assert_true(fd >= 0);
    double t0 = mg_test_now_ms();
    assert_int_equal(send(fd, head, (size_t)hl, MSG_NOSIGNAL), hl);
    /* Exactly the interim response: the echo upstream may answer its head before it has the
       body, so the final head can follow at once and must stay in the socket for the reader
       below. */
    static const char cont[] = "HTTP/1.1 100 Continue\r\n\r\n";
    char buf[256];
    assert_int_equal(gw_poll(fd, POLLIN, t0 + 3000), 0);
    ssize_t n = recv(fd, buf, sizeof(cont) - 1, MSG_WAITALL);
    double ms = mg_test_now_ms() - t0;
    assert_true(n > 0);
    buf[n] = '\0';
    print_message("Expect: 100-continue answered in %.1f ms: %.*s\n", ms,
                  (int)strcspn(buf, "\r"), buf);
    assert_string_equal(buf, cont);
    assert_true(ms < 100);
    char *body = malloc(LEN);
    memset(body, 'e', LEN);
    mg_test_http_response_t r;
    mg_test_http_response_init(&r);
    r.keep_body = true;
    assert_int_equal(gw_exchange_fd(fd, body, LEN, &r, 10000, NULL), 0);
    assert_int_equal(r.status, 200);
    assert_int_equal(r.body_len, LEN);
    mg_test_http_response_free(&r);
    free(body);

    /* A bad token: the refusal comes without the body being read, nothing goes upstream, and
       the connection closes. */
    assert_int_equal(mg_test_upstream_capture_clear(&w->up), 0);
    hl = snprintf(head, sizeof(head), "POST /echo HTTP/1.1\r\nHost: gw\r\n"
                  "Authorization: Bearer wrong\r\nExpect: 100-continue\r\n"
                  "Content-Length: %d\r\n\r\n", LEN);
    raw_t rr;
    raw_send(g->port, head, (size_t)hl, 3000, &rr);
    char *up = captured(w);
    print_message("bad token with Expect: %d in %.1f ms, %s; upstream got %zu bytes\n",
                  raw_status(&rr), rr.first_ms, rr.closed ? "closed" : "open", strlen(up));
    assert_int_equal(raw_status(&rr), 401);
    assert_null(strstr(rr.data, "100 Continue"));
    assert_true(rr.closed);
    assert_string_equal(up, "");
    free(up);
    free(rr.data);

    /* curl with a 2 MiB upload: no one-second wait for a 100 that never comes. */
    char file[MG_TEST_PATH_MAX], url[96], at[MG_TEST_PATH_MAX + 2];
    assert_int_equal(mg_test_path_join(file, sizeof(file), w->dir, "two.bin"), 0);
    char *two = calloc(1, 2 << 20);
    assert_int_equal(mg_test_write_file(file, two, 2 << 20, 0600), 0);
    free(two);
    snprintf(url, sizeof(url), "http://127.0.0.1:%u/echo", (unsigned)g->port);
    snprintf(at, sizeof(at), "@%s", file);
    char *const argv[] = { "curl", "-sS", "-o", "/dev/null", "-H",
                           "Authorization: Bearer alice-token", "--data-binary", at, url, NULL };
    int code = -1;
    t0 = mg_test_now_ms();
    assert_int_equal(mg_test_proc_run(argv, NULL, 20000, &code), 0);
    ms = mg_test_now_ms() - t0;
    print_message("curl POST of 2 MiB (it sends Expect: 100-continue): %.0f ms\n", ms);
    assert_int_equal(code, 0);
    assert_true(ms < 900);
}

/* ---- 4. closes when they are decided ---- */

static void test_prompt_closes(void **state)
{
    world_t *w = *state;
    gw_t *g = shared(w);
    struct {
        const char *name, *req;
    } cases[] = {
        { "Connection: close", "GET /hello HTTP/1.1\r\nHost: gw\r\n" ALICE
          "Connection: close\r\n\r\n" },
        { "HTTP/1.0", "GET /hello HTTP/1.0\r\n" ALICE "\r\n" },
        { "HTTP/1.0 stream", "GET /stream?chunks=3&interval_ms=10 HTTP/1.0\r\n" ALICE "\r\n" },
        { "a refusal with an unread body", "POST /echo HTTP/1.1\r\nHost: gw\r\n"
          "Content-Length: 5\r\n\r\nhello" },
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        raw_t r;
        raw_send(g->port, cases[i].req, strlen(cases[i].req), 5000, &r);
        print_message("%-20s -> %d, closed %.1f ms after the request (%zu bytes)\n",
                      cases[i].name, raw_status(&r), r.closed_ms, r.len);
        assert_true(r.closed);
        assert_true(r.closed_ms < 1000);
        free(r.data);
    }
}

/*
 * Sends req on a new connection, reads until the body's first bytes are in, runs act (may be
 * NULL), and reads on until the server closes or 10 s pass. *after_ms: from act to the close.
 */
static void raw_stream_then(uint16_t port, const char *req, void (*act)(void *), void *arg,
                            raw_t *r, double *after_ms)
{
    memset(r, 0, sizeof(*r));
    int fd = gw_connect(port, 2000);
    assert_true(fd >= 0);
    assert_true(send(fd, req, strlen(req), MSG_NOSIGNAL) == (ssize_t)strlen(req));
    size_t cap = 1 << 20;
    r->data = malloc(cap + 1);
    assert_non_null(r->data);
    double deadline = mg_test_now_ms() + 10000, t_act = 0;
    bool acted = false;
    while (r->len < cap && gw_poll(fd, POLLIN, deadline) == 0) {
        ssize_t n = recv(fd, r->data + r->len, cap - r->len, MSG_DONTWAIT);
        if (n > 0) {
            r->len += (size_t)n;
            r->data[r->len] = '\0';
        } else if (n == 0 || (n < 0 && errno != EAGAIN && errno != EINTR)) {
            r->closed = true;
            break;
        }
        char *body = strstr(r->data, "\r\n\r\n");
        if (!acted && body != NULL && strstr(body, "\"i\":0") != NULL) {
            acted = true;
            t_act = mg_test_now_ms();
            if (act != NULL)
                act(arg);
        }
    }
    r->data[r->len] = '\0';
    *after_ms = acted ? mg_test_now_ms() - t_act : -1;
    close(fd);
}

static void kill_sshd(void *arg)
{
    assert_int_equal(mg_test_sshd_kill(arg), 0);
}

/* A response cut by a failure closes the client's connection when the failure is seen, on a
 * gateway with nothing else to do (no unrelated wake-up to help it), and without a final chunk;
 * the access log says it was cut and why. */
static void test_closes_after_failures(void **state)
{
    world_t *w = *state;
    gw_t *g = shared(w);

    /* The upstream ends its connection after 3 of 20 lines (100 ms apart). */
    raw_t r;
    double ms;
    raw_stream_then(g->port,
                    "GET /stream?chunks=20&interval_ms=100&cut_after=3 HTTP/1.1\r\nHost: gw\r\n"
                    ALICE "\r\n", NULL, NULL, &r, &ms);
    print_message("upstream cut: %d, closed %.0f ms after the first line, %zu bytes\n",
                  raw_status(&r), ms, r.len);
    assert_int_equal(raw_status(&r), 200);
    assert_true(r.closed);
    assert_true(ms < 1200); /* the cut comes at 200 ms */
    assert_non_null(strstr(r.data, "\"i\":2"));
    assert_null(strstr(r.data, "\r\n0\r\n\r\n"));
    free(r.data);
    assert_true(gw_wait_log(g, "cut: the upstream failed mid-response (", 1, 3000));

    /* The SSH connection goes: the sshd and its per-connection children are killed. */
    static mg_test_sshd_t a;
    assert_int_equal(mg_test_sshd_start(&a, NULL), 0);
    gw_t *o = &w->other;
    gw_start(o, &a, w->up.port, NULL);
    raw_stream_then(o->port,
                    "GET /stream?chunks=200&interval_ms=50 HTTP/1.1\r\nHost: gw\r\n" ALICE
                    "\r\n", kill_sshd, &a, &r, &ms);
    print_message("SSH connection lost: %d, closed %.0f ms after the kill, %zu bytes\n",
                  raw_status(&r), ms, r.len);
    assert_int_equal(raw_status(&r), 200);
    assert_true(r.closed);
    assert_true(ms >= 0 && ms < 1000);
    assert_null(strstr(r.data, "\r\n0\r\n\r\n"));
    free(r.data);
    assert_true(gw_wait_log(o, "cut: the upstream failed mid-response (", 1, 3000));
    gw_stop(o);
    mg_test_sshd_stop(&a);
}

/* ---- 5. one user's bytes never reach another user's upstream ---- */

typedef struct isolator {
    uint16_t port;
    const char *auth, *secret;
    int n, ok;
} isolator_t;

static void *isolate(void *arg)
{
    isolator_t *t = arg;
    for (int i = 0; i < t->n; i++) {
        char req[1024];
        int len = snprintf(req, sizeof(req),
                           "POST /echo?u=%s;%d&k=%s HTTP/1.1\r\nHost: gw\r\n%sX-Api-Key: %s-%d\r\n"
                           "Content-Length: %zu\r\n\r\n%s",
                           t->secret, i, t->secret, t->auth, t->secret, i, strlen(t->secret),
                           t->secret);
        mg_test_http_response_t r;
        mg_test_http_response_init(&r);
        r.keep_body = true;
        if (gw_exchange(t->port, req, (size_t)len, &r, 20000, NULL) == 0 && r.status == 200 &&
            r.body && strcmp(r.body, t->secret) == 0)
            t->ok++;
        mg_test_http_response_free(&r);
    }
    return NULL;
}

static void test_users_isolated_under_concurrency(void **state)
{
    world_t *w = *state;
    gw_t *g = shared(w);
    assert_int_equal(mg_test_upstream_capture_clear(&w->up), 0);
    enum { THREADS = 8, EACH = 40 };
    isolator_t t[THREADS];
    pthread_t th[THREADS];
    for (int i = 0; i < THREADS; i++) {
        t[i] = (isolator_t){ .port = g->port, .auth = i % 2 ? BOB : ALICE,
                             .secret = i % 2 ? "BOBSECRET" : "ALICESECRET", .n = EACH };
        assert_int_equal(pthread_create(&th[i], NULL, isolate, &t[i]), 0);
    }
    int ok = 0;
    for (int i = 0; i < THREADS; i++) {
        pthread_join(th[i], NULL);
        ok += t[i].ok;
    }
    assert_int_equal(ok, THREADS * EACH);
    /* Each upstream connection is one channel of one user's pool: it may hold alice's bytes or
       bob's, never both. */
    unsigned long files = 0, mixed = 0, alice = 0, bob = 0;
    for (unsigned long id = 1; id < 100000; id++) {
        char path[MG_TEST_PATH_MAX + 32], *data = NULL;
        snprintf(path, sizeof(path), "%s/%lu.raw", w->up.capture, id);
        if (mg_test_read_file(path, &data, NULL) != 0) {
            if (access(path, F_OK) != 0 && id > files + 64)
                break;
            continue;
        }
        bool a = strstr(data, "ALICESECRET") != NULL, b = strstr(data, "BOBSECRET") != NULL;
        files++;
        alice += a;
        bob += b;
        mixed += a && b;
        free(data);
    }
    print_message("%d requests from two users at once over %lu upstream connections: %lu with "
                  "alice's, %lu with bob's, %lu with both\n",
                  ok, files, alice, bob, mixed);
    assert_true(alice > 0 && bob > 0);
    assert_int_equal(mixed, 0);
}

/* ---- 6. many idle connections, the cap, the descriptor limit ---- */

static double hello_ms(uint16_t port)
{
    mg_test_http_response_t r;
    mg_test_http_response_init(&r);
    static const char req[] = "GET /hello HTTP/1.1\r\nHost: gw\r\n" ALICE "\r\n";
    double t0 = mg_test_now_ms();
    int rc = gw_exchange(port, req, sizeof(req) - 1, &r, 5000, NULL);
    double ms = mg_test_now_ms() - t0;
    int st = r.status;
    mg_test_http_response_free(&r);
    return rc == 0 && st == 200 ? ms : -1;
}

static double median_hello_ms(uint16_t port, int n)
{
    double v[32];
    for (int i = 0; i < n; i++)
        v[i] = hello_ms(port);
    for (int i = 1; i < n; i++)
        for (int j = i; j > 0 && v[j - 1] > v[j]; j--) {
            double x = v[j];
            v[j] = v[j - 1];
            v[j - 1] = x;
        }
    return v[0] < 0 ? -1 : v[n / 2];
}

static void test_idle_connections_and_the_cap(void **state)
{
    world_t *w = *state;
    const char *env[] = { "MOONGATE_MAX_CLIENTS=2500", NULL };
    gw_t *g = &w->other;
    start_gw(w, g, env);
    assert_true(hello_ms(g->port) > 0); /* the SSH connection is up */
    double before = median_hello_ms(g->port, 9);

    enum { IDLE = 2000 };
    static int fds[IDLE + 600];
    for (int i = 0; i < IDLE; i++) {
        fds[i] = gw_connect(g->port, 2000);
        assert_true(fds[i] >= 0);
    }
    mg_test_sleep_ms(200);
    double with_idle = median_hello_ms(g->port, 9);
    print_message("GET /hello: median %.2f ms alone, %.2f ms beside %d idle connections\n",
                  before, with_idle, IDLE);
    assert_true(with_idle > 0 && with_idle < before + 5);

    /* Past the cap (2,500): refused at once with 503, the rest still served. */
    int refused = 0, over = 600;
    double slowest = 0;
    for (int i = 0; i < over; i++) {
        static const char req[] = "GET /hello HTTP/1.1\r\nHost: gw\r\n" ALICE "\r\n";
        int fd = gw_connect(g->port, 2000);
        assert_true(fd >= 0);
        fds[IDLE + i] = fd;
        if (i < 500)
            continue; /* fills the cap with 500 more */
        double t0 = mg_test_now_ms();
        send(fd, req, sizeof(req) - 1, MSG_NOSIGNAL);
        char buf[512];
        if (gw_poll(fd, POLLIN, t0 + 2000) == 0) {
            ssize_t n = recv(fd, buf, sizeof(buf) - 1, 0);
            if (n > 12 && strncmp(buf, "HTTP/1.1 503", 12) == 0)
                refused++;
        }
        double ms = mg_test_now_ms() - t0;
        if (ms > slowest)
            slowest = ms;
    }
    print_message("at the cap: %d of %d new connections got 503 (slowest %.1f ms)\n", refused,
                  over - 500, slowest);
    assert_true(refused >= over - 500 - 2);
    assert_true(slowest < 500);
    for (int i = 0; i < IDLE + over; i++)
        close(fds[i]);
    mg_test_sleep_ms(300);
    assert_true(hello_ms(g->port) > 0);
    gw_stop(g);
}

static void test_descriptor_limit(void **state)
{
    world_t *w = *state;
    gw_t *g = &w->other;
    gw_prepare(g);
    write_policy(w, g->policy);
    g->nofile = 256; /* as `ulimit -n 256` would start it: soft and hard */
    gw_launch(g, "127.0.0.1:0", NULL);

    /* A connection opened first keeps being served (its first request opens the SSH
       connection and the channel, which later requests reuse: they need no descriptor). */
    int keep = gw_connect(g->port, 2000);
    assert_true(keep >= 0);
    static const char hello[] = "GET /hello HTTP/1.1\r\nHost: gw\r\n" ALICE "\r\n";
    assert_true(hello_ms(g->port) > 0);
    enum { N = 300 };
    static int fds[N];
    for (int i = 0; i < N; i++)
        fds[i] = gw_connect(g->port, 2000); /* the backlog takes those it cannot accept yet */
    double t0 = mg_test_now_ms();
    int served = 0;
    while (mg_test_now_ms() - t0 < 3000) {
        mg_test_http_response_t r;
        mg_test_http_response_init(&r);
        r.keep_body = true;
        char buf[4096];
        if (send(keep, hello, sizeof(hello) - 1, MSG_NOSIGNAL) != (ssize_t)sizeof(hello) - 1)
            break;
        while (!r.complete && gw_poll(keep, POLLIN, mg_test_now_ms() + 3000) == 0) {
            ssize_t n = recv(keep, buf, sizeof(buf), 0);
            if (n <= 0 || mg_test_http_response_feed(&r, buf, (size_t)n, NULL) != 0)
                break;
        }
        served += r.complete && r.status == 200;
        mg_test_http_response_free(&r);
        mg_test_sleep_ms(100);
    }
    int lines = gw_log_count(g, "pausing new connections");
    print_message("at 256 descriptors with %d connections: %d requests served on an open "
                  "connection in 3 s, %d log lines about it\n", N + 1, served, lines);
    assert_true(served >= 20);
    assert_true(lines >= 1 && lines <= 8);
    gw_assert_alive(g);
    for (int i = 0; i < N; i++)
        if (fds[i] >= 0)
            close(fds[i]);
    close(keep);
    mg_test_sleep_ms(300);
    /* With descriptors free again, new connections are accepted. */
    assert_int_equal(gw_healthz(g, 3000), 200);
    gw_stop(g);
}

/* ---- 7. TLS: ALPN, and a renewed certificate taken on SIGHUP ---- */

static void make_cert(const char *dir, const char *name, char *crt, char *key, size_t cap)
{
    char c[MG_TEST_PATH_MAX], k[MG_TEST_PATH_MAX], subj[64];
    snprintf(c, sizeof(c), "%s/%s.crt", dir, name);
    snprintf(k, sizeof(k), "%s/%s.key", dir, name);
    snprintf(subj, sizeof(subj), "/CN=%s", name);
    char *const gen[] = { "openssl", "req", "-x509", "-newkey", "ed25519", "-nodes", "-keyout", k,
                          "-out", c, "-days", "2", "-subj", subj, NULL };
    int code = -1;
    mg_test_spawn_opts_t so = { .stdout_path = "/dev/null", .stderr_path = "/dev/null" };
    assert_int_equal(mg_test_proc_run(gen, &so, 10000, &code), 0);
    assert_int_equal(code, 0);
    snprintf(crt, cap, "%s", c);
    snprintf(key, cap, "%s", k);
}

/* The CN of the certificate the server presents, and the HTTP version curl spoke. */
static void tls_probe(const world_t *w, uint16_t port, char *cn, size_t cap, char *version,
                      size_t vcap)
{
    char out[MG_TEST_PATH_MAX], url[96];
    assert_int_equal(mg_test_path_join(out, sizeof(out), w->dir, "probe.out"), 0);
    snprintf(url, sizeof(url), "https://127.0.0.1:%u/hello", (unsigned)port);
    char *const argv[] = { "curl", "-sSk", "--http2", "-o", "/dev/null", "-w",
                           "%{http_version} %{certs}", "-H", "Authorization: Bearer alice-token",
                           url, NULL };
    mg_test_spawn_opts_t so = { .stdout_path = out };
    int code = -1;
    assert_int_equal(mg_test_proc_run(argv, &so, 10000, &code), 0);
    assert_int_equal(code, 0);
    char *text = NULL;
    assert_int_equal(mg_test_read_file(out, &text, NULL), 0);
    snprintf(version, vcap, "%.*s", (int)strcspn(text, " "), text);
    const char *s = strstr(text, "Subject:");
    const char *c = s ? strstr(s, "CN") : NULL;
    if (c) {
        c += 2;
        while (*c == ' ' || *c == '=')
            c++;
    }
    snprintf(cn, cap, "%.*s", c ? (int)strcspn(c, ",\n/ ") : 0, c ? c : "");
    free(text);
}

static void test_tls_and_certificate_reload(void **state)
{
    world_t *w = *state;
    char crt[MG_TEST_PATH_MAX], key[MG_TEST_PATH_MAX], crt2[MG_TEST_PATH_MAX],
        key2[MG_TEST_PATH_MAX], live_crt[MG_TEST_PATH_MAX + 16], live_key[MG_TEST_PATH_MAX + 16];
    make_cert(w->dir, "first", crt, key, sizeof(crt));
    make_cert(w->dir, "second", crt2, key2, sizeof(crt2));
    snprintf(live_crt, sizeof(live_crt), "%s/live.crt", w->dir);
    snprintf(live_key, sizeof(live_key), "%s/live.key", w->dir);
    char *data = NULL;
    size_t len = 0;
    assert_int_equal(mg_test_read_file(crt, &data, &len), 0);
    assert_int_equal(mg_test_write_file(live_crt, data, len, 0600), 0);
    free(data);
    assert_int_equal(mg_test_read_file(key, &data, &len), 0);
    assert_int_equal(mg_test_write_file(live_key, data, len, 0600), 0);
    free(data);
    char env_crt[MG_TEST_PATH_MAX + 48], env_key[MG_TEST_PATH_MAX + 48];
    snprintf(env_crt, sizeof(env_crt), "MOONGATE_TLS_CERT=%s", live_crt);
    snprintf(env_key, sizeof(env_key), "MOONGATE_TLS_KEY=%s", live_key);
    const char *env[] = { env_crt, env_key, NULL };
    gw_t *g = &w->other;
    start_gw(w, g, env);

    char cn[128], version[16];
    tls_probe(w, g->port, cn, sizeof(cn), version, sizeof(version));
    print_message("TLS: certificate %s, HTTP version %s (curl offered h2)\n", cn, version);
    assert_string_equal(cn, "first");
    assert_string_equal(version, "1.1");

    /* A renewed certificate: SIGHUP, and new connections get it. */
    assert_int_equal(mg_test_read_file(crt2, &data, &len), 0);
    assert_int_equal(mg_test_write_file(live_crt, data, len, 0600), 0);
    free(data);
    assert_int_equal(mg_test_read_file(key2, &data, &len), 0);
    assert_int_equal(mg_test_write_file(live_key, data, len, 0600), 0);
    free(data);
    int reloads = gw_log_count(g, "TLS certificate reloaded");
    assert_int_equal(mg_test_proc_kill(&g->proc, SIGHUP), 0);
    assert_true(gw_wait_log(g, "TLS certificate reloaded", reloads + 1, 5000));
    tls_probe(w, g->port, cn, sizeof(cn), version, sizeof(version));
    print_message("after the reload: certificate %s\n", cn);
    assert_string_equal(cn, "second");

    /* A broken one is refused, and the one before keeps serving. */
    assert_int_equal(mg_test_write_file(live_crt, "not a certificate\n", 18, 0600), 0);
    assert_int_equal(mg_test_proc_kill(&g->proc, SIGHUP), 0);
    assert_true(gw_wait_log(g, "TLS reload failed", 1, 5000));
    tls_probe(w, g->port, cn, sizeof(cn), version, sizeof(version));
    print_message("after a bad certificate: still %s\n", cn);
    assert_string_equal(cn, "second");
    gw_assert_alive(g);
    gw_stop(g);
}

static void test_shared_gateway_exits_cleanly(void **state)
{
    world_t *w = *state;
    shared(w);
    gw_stop(&w->gw);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_strict_refusals),
        cmocka_unit_test(test_target_byte_for_byte),
        cmocka_unit_test(test_fields_in_order_case_and_duplicates),
        cmocka_unit_test(test_chunked_upload_from_curl),
        cmocka_unit_test(test_chunked_with_trailers_and_pipelining),
        cmocka_unit_test(test_head_then_get),
        cmocka_unit_test(test_expect_continue),
        cmocka_unit_test(test_prompt_closes),
        cmocka_unit_test(test_closes_after_failures),
        cmocka_unit_test(test_users_isolated_under_concurrency),
        cmocka_unit_test(test_idle_connections_and_the_cap),
        cmocka_unit_test(test_descriptor_limit),
        cmocka_unit_test(test_tls_and_certificate_reload),
        cmocka_unit_test(test_shared_gateway_exits_cleanly),
    };
    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
