/*
 * The test harness tested: a real sshd the real OpenSSH client can log in to and forward
 * through, a real mg-upstream whose bodies match the helpers' checksums and whose streams arrive
 * spaced as asked, and lifecycle calls that leave no process behind.
 */
#define _GNU_SOURCE
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include "moongate/error.h"

#include "http_client.h"
#include "http_parse.h"
#include "proc.h"
#include "sshd.h"
#include "upstream.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

/* Runs the OpenSSH client against s with key and known_hosts and `true` as the command. */
static int ssh_true(mg_test_sshd_t *s, const char *key, const char *known_hosts)
{
    mg_test_ssh_argv_t a;
    char log[MG_TEST_PATH_MAX];
    int code = -1;
    mg_test_sshd_client_argv(s, key, known_hosts, &a);
    assert_int_equal(mg_test_ssh_argv_add(&a, "127.0.0.1"), 0);
    assert_int_equal(mg_test_ssh_argv_add(&a, "true"), 0);
    assert_int_equal(mg_test_path_join(log, sizeof log, s->dir, "ssh.log"), 0);
    mg_test_spawn_opts_t so = { .stdout_path = log, .stderr_path = log };
    assert_int_equal(mg_test_proc_run((char *const *)a.argv, &so, 10000, &code), 0);
    return code;
}

static void fetch(uint16_t port, const char *method, const char *path, const char *headers,
                  const void *body, size_t body_len, mg_test_http_response_t *r)
{
    char *req;
    size_t len;
    assert_int_equal(mg_test_http_request(&req, &len, method, path, headers, body, body_len), 0);
    assert_int_equal(mg_test_http_fetch(port, req, len, r, 10000), 0);
    free(req);
    assert_true(r->complete);
}

static void test_ssh_login_and_keys(void **state)
{
    mg_test_sshd_t s;
    mg_test_sshd_options_t o = { .client_passphrase = "correct horse" };
    assert_int_equal(mg_test_sshd_start(&s, &o), 0);
    assert_true(s.port > 0);
    assert_true(mg_test_pid_alive(s.pid));

    assert_int_equal(ssh_true(&s, NULL, NULL), 0);
    /* 255 is ssh's own failure: refused key, unknown or mismatched host key. */
    assert_int_equal(ssh_true(&s, s.wrong_key, NULL), 255);
    assert_int_equal(ssh_true(&s, NULL, s.known_hosts_wrong), 255);
    assert_int_equal(ssh_true(&s, NULL, s.known_hosts_empty), 255);

    /* The encrypted file holds the same key: its public half matches client_key.pub. */
    char out[MG_TEST_PATH_MAX], *pub = NULL, *derived = NULL;
    int code = -1;
    assert_int_equal(mg_test_path_join(out, sizeof out, s.dir, "derived.pub"), 0);
    char *argv[] = { "ssh-keygen", "-y", "-P", "correct horse", "-f", s.client_key_encrypted,
                     NULL };
    mg_test_spawn_opts_t so = { .stdout_path = out };
    assert_int_equal(mg_test_proc_run(argv, &so, 10000, &code), 0);
    assert_int_equal(code, 0);
    assert_int_equal(mg_test_read_file(s.client_key_pub, &pub, NULL), 0);
    assert_int_equal(mg_test_read_file(out, &derived, NULL), 0);
    assert_int_equal(strncmp(pub, derived, 80), 0);
    free(pub);
    free(derived);
    char *wrong_pass[] = { "ssh-keygen", "-y", "-P", "nope", "-f", s.client_key_encrypted, NULL };
    mg_test_spawn_opts_t quiet = { .stdout_path = "/dev/null", .stderr_path = "/dev/null" };
    assert_int_equal(mg_test_proc_run(wrong_pass, &quiet, 10000, &code), 0);
    assert_int_not_equal(code, 0);

    /* known_hosts names the host as OpenSSH does for a non-default port. */
    char *kh = NULL, expect[32];
    snprintf(expect, sizeof expect, "[127.0.0.1]:%u ssh-ed25519 ", (unsigned)s.port);
    assert_int_equal(mg_test_read_file(s.known_hosts, &kh, NULL), 0);
    assert_int_equal(strncmp(kh, expect, strlen(expect)), 0);
    free(kh);

    const char *inetd[6];
    mg_test_sshd_inetd_argv(&s, inetd);
    assert_string_equal(inetd[1], "-i");
    assert_string_equal(inetd[4], s.config);

    char dir[MG_TEST_PATH_MAX];
    memcpy(dir, s.dir, sizeof dir);
    pid_t pid = s.pid;
    assert_int_equal(mg_test_sshd_stop(&s), 0);
    assert_false(mg_test_pid_alive(pid));
    struct stat st;
    assert_int_not_equal(stat(dir, &st), 0);
}

static void test_ssh_forward_to_upstream(void **state)
{
    mg_test_upstream_t u;
    mg_test_sshd_t s;
    char opts[128];
    assert_int_equal(mg_test_upstream_start(&u), 0);
    snprintf(opts, sizeof opts, "restrict,port-forwarding,permitopen=\"127.0.0.1:%u\"",
             (unsigned)u.port);
    mg_test_sshd_options_t o = { .authorized_options = opts, .log_level = "VERBOSE" };
    assert_int_equal(mg_test_sshd_start(&s, &o), 0);

    mg_test_proc_t fwd;
    uint16_t lport;
    assert_int_equal(mg_test_sshd_forward(&s, u.port, &lport, &fwd), 0);

    /* curl through ssh -L. */
    char url[64], out[MG_TEST_PATH_MAX], *body = NULL;
    int code = -1;
    snprintf(url, sizeof url, "http://127.0.0.1:%u/hello", (unsigned)lport);
    assert_int_equal(mg_test_path_join(out, sizeof out, s.dir, "curl.out"), 0);
    char *curl[] = { "curl", "-sS", "--max-time", "5", "-o", out, url, NULL };
    assert_int_equal(mg_test_proc_run(curl, NULL, 10000, &code), 0);
    assert_int_equal(code, 0);
    assert_int_equal(mg_test_read_file(out, &body, NULL), 0);
    assert_string_equal(body, "hello\n");
    free(body);

    /* Many requests on one kept-alive connection through the tunnel. */
    mg_test_http_response_t r;
    mg_test_http_response_init(&r);
    r.hash_body = true;
    fetch(lport, "GET", "/bytes/1000000", NULL, NULL, 0, &r);
    char hex[65];
    assert_int_equal(mg_test_stream_sha256_hex(1000000, hex), 0);
    assert_string_equal(r.body_sha256, hex);
    mg_test_http_response_free(&r);

    /* permitopen allows only the upstream: a forward elsewhere is refused by sshd. */
    mg_test_proc_t fwd2;
    uint16_t lport2;
    assert_int_equal(mg_test_sshd_forward(&s, s.port, &lport2, &fwd2), 0);
    snprintf(url, sizeof url, "http://127.0.0.1:%u/hello", (unsigned)lport2);
    char *curl2[] = { "curl", "-sS", "--max-time", "5", "-o", out, url, NULL };
    mg_test_spawn_opts_t quiet = { .stderr_path = "/dev/null" };
    assert_int_equal(mg_test_proc_run(curl2, &quiet, 10000, &code), 0);
    assert_int_not_equal(code, 0);

    mg_test_proc_stop(&fwd2, 2000);
    mg_test_proc_stop(&fwd, 2000);
    mg_test_sshd_stop(&s);
    mg_test_upstream_stop(&u);
}

static void test_stream_generator(void **state)
{
    /* Filling in odd pieces gives the same bytes as filling at once. */
    unsigned char whole[1000], parts[1000];
    mg_test_stream_t a, b;
    mg_test_stream_init(&a);
    mg_test_stream_fill(&a, whole, sizeof whole);
    mg_test_stream_init(&b);
    for (size_t off = 0, k = 1; off < sizeof parts; off += k, k = k % 13 + 1) {
        size_t n = off + k > sizeof parts ? sizeof parts - off : k;
        mg_test_stream_fill(&b, parts + off, n);
    }
    assert_memory_equal(whole, parts, sizeof whole);
    /* The first word is xorshift64(42), little-endian. */
    uint64_t x = 42;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    for (int i = 0; i < 8; i++)
        assert_int_equal(whole[i], (unsigned char)(x >> (8 * i)));
}

static void test_response_parser(void **state)
{
    static const char resp[] =
        "HTTP/1.1 100 Continue\r\n\r\n"
        "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-A:  b \r\n\r\n"
        "5;ext=1\r\nhello\r\n1\r\n \r\n5\r\nworld\r\n0\r\nTrailer: x\r\n\r\n"
        "HTTP/1.1 204 No Content\r\n\r\n";
    mg_test_http_response_t r;
    size_t used = 0, total = 0;

    /* One byte at a time: every state boundary is crossed mid-feed. */
    mg_test_http_response_init(&r);
    r.keep_body = true;
    r.hash_body = true;
    while (!r.complete) {
        assert_int_equal(mg_test_http_response_feed(&r, resp + total, 1, &used), 0);
        total += used;
    }
    assert_int_equal(r.status, 200);
    assert_string_equal(mg_test_http_response_header(&r, "x-a"), "b");
    assert_string_equal(r.body, "hello world");
    assert_int_equal(r.chunks, 3);
    char hex[65];
    mg_test_sha256_hex("hello world", 11, hex);
    assert_string_equal(r.body_sha256, hex);
    mg_test_http_response_free(&r);

    /* The rest is the next response. */
    mg_test_http_response_init(&r);
    size_t rest = sizeof resp - 1 - total;
    assert_int_equal(mg_test_http_response_feed(&r, resp + total, rest, &used), 0);
    assert_true(r.complete);
    assert_int_equal(r.status, 204);
    assert_int_equal(used, rest);

    mg_test_http_response_init(&r);
    assert_int_equal(mg_test_http_response_feed(&r, "HTTP/1.1 2x0\r\n", 14, NULL), MG_EINVAL);
    mg_test_http_response_init(&r);
    assert_int_equal(mg_test_http_response_feed(&r, "HTTP/1.0 200 OK\r\n\r\nabc", 22, NULL), 0);
    assert_false(r.complete);
    assert_int_equal(mg_test_http_response_eof(&r), 0);
    assert_int_equal(r.body_received, 3);
}

static void test_request_parser(void **state)
{
    mg_test_http_head_t h;
    char ok[] = "GET /stream?chunks=3 HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, close\r\n"
                "Content-Length: 12\r\n\r\n";
    assert_int_equal(mg_test_http_parse_head(ok, sizeof ok - 1, &h), 0);
    assert_string_equal(h.path, "/stream");
    assert_string_equal(h.query, "chunks=3");
    assert_false(h.keep_alive);
    assert_int_equal(h.content_length, 12);

    char old[] = "HEAD / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n";
    assert_int_equal(mg_test_http_parse_head(old, sizeof old - 1, &h), 0);
    assert_true(h.is_head && h.keep_alive && h.minor_version == 0);

    char *bad[] = {
        "GET / HTTP/2.0\r\n\r\n", "GET noslash HTTP/1.1\r\n\r\n", "G(T / HTTP/1.1\r\n\r\n",
        "GET / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
        "GET / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
        "GET / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n", "GET / HTTP/1.1\r\n folded\r\n\r\n",
        "GET / HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        char buf[256];
        size_t n = strlen(bad[i]);
        memcpy(buf, bad[i], n + 1);
        assert_int_equal(mg_test_http_parse_head(buf, n, &h), MG_EINVAL);
    }

    /* The chunked decoder, fed one byte more at a time. */
    static const char body[] = "3\r\nabc\r\na;ext\r\n0123456789\r\n0\r\nX: y\r\n\r\n";
    mg_test_chunked_t d;
    char out[32];
    size_t off = 0, olen = 0, avail = 0;
    int r = 0;
    mg_test_chunked_init(&d);
    while (r != 1) {
        const char *data;
        size_t used, n;
        r = mg_test_chunked_step(&d, body + off, avail - off, &used, &data, &n);
        assert_true(r >= 0 || r == MG_EAGAIN);
        if (r == MG_EAGAIN) {
            assert_true(avail < sizeof body - 1);
            avail++;
            continue;
        }
        if (n > 0) {
            assert_true(olen + n <= sizeof out);
            memcpy(out + olen, data, n);
            olen += n;
        }
        off += used;
    }
    assert_int_equal(off, sizeof body - 1);
    assert_int_equal(olen, 13);
    assert_memory_equal(out, "abc0123456789", 13);
}

static void test_upstream_keepalive_pipelining(void **state)
{
    mg_test_upstream_t u;
    assert_int_equal(mg_test_upstream_start(&u), 0);

    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in sa = { .sin_family = AF_INET, .sin_port = htons(u.port),
                              .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
    assert_int_equal(connect(fd, (struct sockaddr *)&sa, sizeof sa), 0);
    /* Three requests in one write; the last asks to close. */
    static const char reqs[] = "GET /hello HTTP/1.1\r\nHost: x\r\n\r\n"
                               "GET /bytes/70000 HTTP/1.1\r\nHost: x\r\n\r\n"
                               "POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n"
                               "Connection: close\r\n\r\nxyz";
    assert_int_equal(write(fd, reqs, sizeof reqs - 1), (ssize_t)(sizeof reqs - 1));

    mg_test_http_response_t r[3];
    for (int i = 0; i < 3; i++) {
        mg_test_http_response_init(&r[i]);
        r[i].keep_body = true;
    }
    int cur = 0;
    char buf[8192];
    ssize_t n;
    while ((n = read(fd, buf, sizeof buf)) > 0) {
        size_t off = 0;
        while (off < (size_t)n) {
            size_t used;
            assert_true(cur < 3);
            assert_int_equal(mg_test_http_response_feed(&r[cur], buf + off, (size_t)n - off,
                                                        &used), 0);
            off += used;
            if (r[cur].complete)
                cur++;
        }
    }
    /* The server closed after the third response, as asked. */
    assert_int_equal(n, 0);
    assert_int_equal(cur, 3);
    close(fd);
    assert_string_equal(r[0].body, "hello\n");
    assert_int_equal(r[1].body_len, 70000);
    assert_string_equal(r[2].body, "xyz");
    assert_string_equal(mg_test_http_response_header(&r[2], "connection"), "close");
    for (int i = 0; i < 3; i++)
        mg_test_http_response_free(&r[i]);
    mg_test_upstream_stop(&u);
}

static void test_upstream_bytes_and_echo(void **state)
{
    mg_test_upstream_t u;
    mg_test_http_response_t r;
    char hex[65];
    assert_int_equal(mg_test_upstream_start(&u), 0);

    const uint64_t sizes[] = { 0, 1, 1000, 1000003, 20000000 };
    for (size_t i = 0; i < sizeof sizes / sizeof sizes[0]; i++) {
        char path[64];
        snprintf(path, sizeof path, "/bytes/%llu", (unsigned long long)sizes[i]);
        mg_test_http_response_init(&r);
        r.hash_body = true;
        fetch(u.port, "GET", path, NULL, NULL, 0, &r);
        assert_int_equal(r.status, 200);
        assert_int_equal(r.content_length, (int64_t)sizes[i]);
        assert_int_equal(mg_test_stream_sha256_hex(sizes[i], hex), 0);
        assert_string_equal(r.body_sha256, hex);
        mg_test_http_response_free(&r);
    }

    /* Echo a Content-Length body (large: it streams through several writes), then a chunked one. */
    size_t n = 3000017;
    char *body = malloc(n);
    assert_non_null(body);
    mg_test_stream_t g;
    mg_test_stream_init(&g);
    mg_test_stream_fill(&g, body, n);
    mg_test_http_response_init(&r);
    r.hash_body = true;
    fetch(u.port, "POST", "/echo", "Expect: 100-continue\r\n", body, n, &r);
    assert_int_equal(r.status, 200);
    assert_int_equal(mg_test_stream_sha256_hex(n, hex), 0);
    assert_string_equal(r.body_sha256, hex);
    mg_test_http_response_free(&r);
    free(body);

    static const char chunked[] =
        "POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        "3\r\nabc\r\n4;x=y\r\ndefg\r\n0\r\n\r\n";
    mg_test_http_response_init(&r);
    r.keep_body = true;
    assert_int_equal(mg_test_http_fetch(u.port, chunked, sizeof chunked - 1, &r, 5000), 0);
    assert_int_equal(r.status, 200);
    assert_string_equal(r.body, "abcdefg");
    mg_test_http_response_free(&r);

    /* Garbage gets a 400. */
    static const char garbage[] = "NOT HTTP AT ALL\r\n\r\n";
    mg_test_http_response_init(&r);
    assert_int_equal(mg_test_http_fetch(u.port, garbage, sizeof garbage - 1, &r, 5000), 0);
    assert_int_equal(r.status, 400);

    mg_test_http_response_init(&r);
    r.keep_body = true;
    fetch(u.port, "GET", "/anything", NULL, NULL, 0, &r);
    assert_string_equal(r.body, "hello\n");
    mg_test_http_response_free(&r);
    mg_test_upstream_stop(&u);
}

/* Gathers /stream lines with the time each arrived. */
struct lines {
    char buf[4096];
    size_t len;
    int n;
    double arrived_ms[64];
    double t_ms[64];
};

static void on_stream_body(void *arg, const char *data, size_t len)
{
    struct lines *l = arg;
    double now = mg_test_now_ms();
    for (size_t i = 0; i < len; i++) {
        if (data[i] != '\n') {
            if (l->len + 1 < sizeof l->buf)
                l->buf[l->len++] = data[i];
            continue;
        }
        l->buf[l->len] = '\0';
        int idx = -1;
        double t = -1;
        assert_int_equal(sscanf(l->buf, "{\"i\":%d,\"t_ms\":%lf,\"pad\":\"", &idx, &t), 2);
        assert_int_equal(idx, l->n);
        assert_non_null(strstr(l->buf, "\"pad\":\"xxxxxxxxxx\"}"));
        if (l->n < 64) {
            l->arrived_ms[l->n] = now;
            l->t_ms[l->n] = t;
        }
        l->n++;
        l->len = 0;
    }
}

static void test_upstream_stream_timing(void **state)
{
    mg_test_upstream_t u;
    mg_test_http_response_t r;
    struct lines *l = calloc(1, sizeof *l);
    assert_int_equal(mg_test_upstream_start(&u), 0);

    mg_test_http_response_init(&r);
    r.on_body = on_stream_body;
    r.arg = l;
    fetch(u.port, "GET", "/stream?chunks=5&interval_ms=100&size=10", NULL, NULL, 0, &r);
    assert_int_equal(r.status, 200);
    assert_true(r.chunked);
    assert_int_equal(r.chunks, 5);
    assert_int_equal(l->n, 5);
    for (int i = 1; i < 5; i++) {
        double gap = l->arrived_ms[i] - l->arrived_ms[i - 1];
        double sent_gap = l->t_ms[i] - l->t_ms[i - 1];
        assert_true(gap > 60 && gap < 250);
        assert_true(sent_gap > 90 && sent_gap < 200);
    }
    free(l);

    /* A client that leaves mid-stream is counted as an aborted response. */
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in sa = { .sin_family = AF_INET, .sin_port = htons(u.port),
                              .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
    assert_int_equal(connect(fd, (struct sockaddr *)&sa, sizeof sa), 0);
    static const char req[] = "GET /stream?chunks=100&interval_ms=20 HTTP/1.1\r\nHost: x\r\n\r\n";
    assert_int_equal(write(fd, req, sizeof req - 1), (ssize_t)(sizeof req - 1));
    char buf[256];
    assert_true(read(fd, buf, sizeof buf) > 0);
    close(fd);
    mg_test_upstream_stats_t st = { 0 };
    for (int i = 0; i < 100; i++) {
        assert_int_equal(mg_test_upstream_stats(&u, &st), 0);
        if (st.aborted_responses == 1)
            break;
        mg_test_sleep_ms(10);
    }
    assert_int_equal(st.aborted_responses, 1);
    assert_true(st.requests_served >= 1);

    pid_t pid = u.pid;
    mg_test_upstream_stop(&u);
    assert_false(mg_test_pid_alive(pid));
    /* It exits on SIGTERM by itself (0), not by the SIGKILL fallback. */
    assert_int_equal(mg_test_proc_exit_code(&u.proc), 0);
}

static void test_sshd_pause_resume_kill(void **state)
{
    mg_test_sshd_t s;
    mg_test_upstream_t u;
    mg_test_proc_t fwd;
    uint16_t lport;
    assert_int_equal(mg_test_upstream_start(&u), 0);
    assert_int_equal(mg_test_sshd_start(&s, NULL), 0);
    assert_int_equal(mg_test_sshd_forward(&s, u.port, &lport, &fwd), 0);

    /* A logged-in connection: the listener plus its per-connection children. */
    size_t before = mg_test_sshd_count_processes(&s);
    assert_true(before >= 2);

    assert_int_equal(mg_test_sshd_pause(&s), 0);
    pid_t tree[64];
    size_t n = 0;
    assert_int_equal(mg_test_proc_descendants(s.pid, tree, 64, &n), 0);
    assert_true(n >= 1);
    assert_int_equal(mg_test_pid_state(s.pid), 'T');
    for (size_t i = 0; i < n; i++)
        assert_int_equal(mg_test_pid_state(tree[i]), 'T');

    /* Paused, the tunnel does not answer... */
    mg_test_http_response_t r;
    mg_test_http_response_init(&r);
    static const char req[] = "GET /hello HTTP/1.1\r\nHost: x\r\n\r\n";
    assert_int_equal(mg_test_http_fetch(lport, req, sizeof req - 1, &r, 300), MG_ETIMEDOUT);

    /* ...and resumed, it does again. */
    assert_int_equal(mg_test_sshd_resume(&s), 0);
    for (size_t i = 0; i < n; i++)
        assert_int_not_equal(mg_test_pid_state(tree[i]), 'T');
    mg_test_http_response_init(&r);
    r.keep_body = true;
    assert_int_equal(mg_test_http_fetch(lport, req, sizeof req - 1, &r, 5000), 0);
    assert_string_equal(r.body, "hello\n");
    mg_test_http_response_free(&r);

    /* Killed, every process is gone and the client sees its connection end. */
    assert_int_equal(mg_test_sshd_kill(&s), 0);
    for (size_t i = 0; i < n; i++)
        assert_false(mg_test_pid_alive(tree[i]));
    assert_int_equal(mg_test_proc_wait(&fwd, 5000), 0);

    assert_int_equal(mg_test_sshd_stop(&s), 0);
    mg_test_upstream_stop(&u);
}

static void test_stop_ends_connection_children(void **state)
{
    mg_test_sshd_t s;
    mg_test_upstream_t u;
    mg_test_proc_t fwd;
    uint16_t lport;
    pid_t tree[64];
    size_t n = 0;
    assert_int_equal(mg_test_upstream_start(&u), 0);
    assert_int_equal(mg_test_sshd_start(&s, NULL), 0);
    assert_int_equal(mg_test_sshd_forward(&s, u.port, &lport, &fwd), 0);
    assert_int_equal(mg_test_proc_descendants(s.pid, tree, 64, &n), 0);
    assert_true(n >= 1);
    /* Stopping a paused server must still work. */
    assert_int_equal(mg_test_sshd_pause(&s), 0);
    assert_int_equal(mg_test_sshd_stop(&s), 0);
    for (size_t i = 0; i < n; i++)
        assert_false(mg_test_pid_alive(tree[i]));
    assert_int_equal(mg_test_proc_wait(&fwd, 5000), 0);
    mg_test_upstream_stop(&u);
}

static int teardown_all(void **state)
{
    mg_test_cleanup_all();
    return 0;
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_stream_generator),
        cmocka_unit_test(test_response_parser),
        cmocka_unit_test(test_request_parser),
        cmocka_unit_test(test_upstream_keepalive_pipelining),
        cmocka_unit_test(test_upstream_bytes_and_echo),
        cmocka_unit_test(test_upstream_stream_timing),
        cmocka_unit_test(test_ssh_login_and_keys),
        cmocka_unit_test(test_ssh_forward_to_upstream),
        cmocka_unit_test(test_sshd_pause_resume_kill),
        cmocka_unit_test(test_stop_ends_connection_children),
    };
    return cmocka_run_group_tests(tests, NULL, teardown_all);
}
