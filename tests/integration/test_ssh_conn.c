/*
 * ssh_conn against a real OpenSSH sshd on loopback and a real HTTP upstream as the channel
 * target: authentication, host key refusal, channel limits, flow control both ways, keepalive
 * against a stopped server, close with DISCONNECT, and 100 MB byte-identical.
 */
#include "itest.h"

#include <signal.h>

typedef struct world {
    mg_test_sshd_t sshd;
    mg_test_upstream_t up;
    uv_loop_t loop;
} world_t;

static int setup(void **state)
{
    world_t *w = calloc(1, sizeof(*w));
    mg_test_sshd_options_t so = { .log_level = "VERBOSE", .client_passphrase = "open sesame" };
    if (mg_test_sshd_start(&w->sshd, &so) != 0 || mg_test_upstream_start(&w->up) != 0) {
        fprintf(stderr, "cannot start sshd or upstream\n");
        return -1;
    }
    uv_loop_init(&w->loop);
    *state = w;
    return 0;
}

static int teardown(void **state)
{
    world_t *w = *state;
    itest_loop_close(&w->loop);
    mg_test_upstream_stop(&w->up);
    mg_test_sshd_stop(&w->sshd);
    free(w);
    return 0;
}

/* What ssh-keygen says the server's host key fingerprint is. */
static void host_fingerprint(const world_t *w, char *out, size_t cap)
{
    char cmd[1024];
    snprintf(cmd, sizeof(cmd), "ssh-keygen -l -E sha256 -f '%s'", w->sshd.host_key_pub);
    FILE *p = popen(cmd, "r");
    assert_non_null(p);
    char line[512] = "";
    assert_non_null(fgets(line, sizeof(line), p));
    pclose(p);
    /* "256 SHA256:xxxx comment (ED25519)" */
    char *fp = strstr(line, "SHA256:");
    assert_non_null(fp);
    size_t n = strcspn(fp, " \n");
    snprintf(out, cap, "%.*s", (int)n, fp);
}

static void test_connect_auth_and_stats(void **state)
{
    world_t *w = *state;
    mg_ssh_conn_opts_t o;
    itest_opts(&o, &w->sshd);
    itest_conn_t ic;
    itest_connect(&w->loop, &o, &ic);
    assert_true(ic.ready);
    assert_int_equal(mg_ssh_conn_state(ic.c), MG_SSH_READY);

    mg_ssh_conn_stats_t st;
    mg_ssh_conn_stats(ic.c, &st);
    assert_string_equal(st.user, "alice");
    assert_true(st.healthy);
    assert_int_equal(st.channels, 0);
    assert_true(st.bytes_in > 0 && st.bytes_out > 0);
    assert_true(st.handshake_ms < 5000);
    print_message("handshake + auth: %llu ms\n", (unsigned long long)st.handshake_ms);

    itest_disconnect(&w->loop, &ic);
    assert_int_equal(ic.status, 0);
}

static void test_passphrase_key(void **state)
{
    world_t *w = *state;
    mg_ssh_conn_opts_t o;
    itest_opts(&o, &w->sshd);
    o.key_path = w->sshd.client_key_encrypted;
    o.key_passphrase = "open sesame";
    itest_conn_t ic;
    itest_connect(&w->loop, &o, &ic);
    assert_true(ic.ready);
    itest_disconnect(&w->loop, &ic);

    o.key_passphrase = "wrong";
    itest_connect(&w->loop, &o, &ic);
    assert_true(ic.closed);
    assert_int_equal(ic.status, MG_EAUTH);
    assert_non_null(strstr(ic.error, w->sshd.client_key_encrypted));
}

static void test_unknown_host_key_refused(void **state)
{
    world_t *w = *state;
    char fp[128];
    host_fingerprint(w, fp, sizeof(fp));
    mg_ssh_conn_opts_t o;
    itest_opts(&o, &w->sshd);
    o.known_hosts = w->sshd.known_hosts_empty;
    itest_conn_t ic;
    itest_connect(&w->loop, &o, &ic);
    assert_false(ic.ready);
    assert_int_equal(ic.status, MG_EHOSTKEY);
    assert_non_null(strstr(ic.error, "127.0.0.1"));
    assert_non_null(strstr(ic.error, fp));
    assert_non_null(strstr(ic.error, "not in"));
}

static void test_changed_host_key_refused(void **state)
{
    world_t *w = *state;
    char fp[128];
    host_fingerprint(w, fp, sizeof(fp));
    mg_ssh_conn_opts_t o;
    itest_opts(&o, &w->sshd);
    o.known_hosts = w->sshd.known_hosts_wrong;
    itest_conn_t ic;
    itest_connect(&w->loop, &o, &ic);
    assert_int_equal(ic.status, MG_EHOSTKEY);
    assert_non_null(strstr(ic.error, "CHANGED"));
    assert_non_null(strstr(ic.error, fp));
}

static void test_pinned_host_key(void **state)
{
    world_t *w = *state;
    char fp[128];
    host_fingerprint(w, fp, sizeof(fp));
    mg_ssh_conn_opts_t o;
    itest_opts(&o, &w->sshd);
    o.known_hosts = NULL;
    o.host_key_sha256 = fp;
    itest_conn_t ic;
    itest_connect(&w->loop, &o, &ic);
    assert_true(ic.ready);
    itest_disconnect(&w->loop, &ic);

    o.host_key_sha256 = "SHA256:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA";
    itest_connect(&w->loop, &o, &ic);
    assert_int_equal(ic.status, MG_EHOSTKEY);
    assert_non_null(strstr(ic.error, "pinned"));
    assert_non_null(strstr(ic.error, fp));
}

static void test_wrong_user_key_refused(void **state)
{
    world_t *w = *state;
    mg_ssh_conn_opts_t o;
    itest_opts(&o, &w->sshd);
    o.key_path = w->sshd.wrong_key;
    itest_conn_t ic;
    itest_connect(&w->loop, &o, &ic);
    assert_false(ic.ready);
    assert_int_equal(ic.status, MG_EAUTH);
    assert_non_null(strstr(ic.error, "refused key"));
    assert_non_null(strstr(ic.error, w->sshd.wrong_key));
}

static void test_connect_refused_and_timeout(void **state)
{
    world_t *w = *state;
    uint16_t port;
    assert_int_equal(mg_test_free_port(&port), 0);
    mg_ssh_conn_opts_t o;
    itest_opts(&o, &w->sshd);
    o.port = port;
    itest_conn_t ic;
    itest_connect(&w->loop, &o, &ic);
    assert_int_equal(ic.status, MG_ECONNECT);
    assert_non_null(strstr(ic.error, "connection refused"));

    /* A stopped server accepts the TCP connection (the kernel does) but never speaks. */
    assert_int_equal(mg_test_sshd_pause(&w->sshd), 0);
    itest_opts(&o, &w->sshd);
    o.connect_timeout_ms = 500;
    double t0 = mg_test_now_ms();
    itest_connect(&w->loop, &o, &ic);
    double took = mg_test_now_ms() - t0;
    assert_int_equal(mg_test_sshd_resume(&w->sshd), 0);
    assert_int_equal(ic.status, MG_ETIMEDOUT);
    assert_non_null(strstr(ic.error, "within 500 ms"));
    assert_true(took >= 450 && took < 3000);
}

static bool all_closed(void *arg)
{
    itest_fetch_t *f = arg;
    for (int i = 0; i < 10; i++)
        if (!f[i].closed)
            return false;
    return true;
}

static void test_ten_channels_then_eleventh_refused(void **state)
{
    world_t *w = *state;
    mg_ssh_conn_opts_t o;
    itest_opts(&o, &w->sshd);
    itest_conn_t ic;
    itest_connect(&w->loop, &o, &ic);
    assert_true(ic.ready);

    static itest_fetch_t f[11];
    const uint64_t size = 3 * 1000 * 1000;
    char path[64], want[65];
    snprintf(path, sizeof(path), "/bytes/%llu", (unsigned long long)size);
    assert_int_equal(mg_test_stream_sha256_hex(size, want), 0);
    for (int i = 0; i < 10; i++)
        assert_int_equal(itest_fetch_start(&f[i], ic.c, w->up.port, "GET", path, 0, false), 0);
    assert_int_equal(mg_ssh_conn_channels(ic.c), 10);
    assert_int_equal(itest_fetch_start(&f[10], ic.c, w->up.port, "GET", path, 0, false),
                     MG_ECHANLIMIT);
    itest_fetch_free(&f[10]);

    assert_true(itest_run_until(&w->loop, all_closed, f, 20000));
    for (int i = 0; i < 10; i++) {
        assert_int_equal(f[i].open_status, 0);
        assert_int_equal(f[i].close_status, 0);
        assert_int_equal(f[i].resp.status, 200);
        assert_true(f[i].resp.complete);
        assert_string_equal(f[i].resp.body_sha256, want);
        itest_fetch_free(&f[i]);
    }
    /* Every slot is free again. */
    assert_int_equal(mg_ssh_conn_channels(ic.c), 0);
    itest_disconnect(&w->loop, &ic);
}

static void test_open_refused_by_server(void **state)
{
    world_t *w = *state;
    uint16_t closed_port;
    assert_int_equal(mg_test_free_port(&closed_port), 0);
    mg_ssh_conn_opts_t o;
    itest_opts(&o, &w->sshd);
    itest_conn_t ic;
    itest_connect(&w->loop, &o, &ic);
    itest_fetch_t f;
    assert_int_equal(itest_fetch_start(&f, ic.c, closed_port, "GET", "/", 0, false), 0);
    assert_true(itest_run_until(&w->loop, itest_fetch_closed, &f, 5000));
    assert_int_equal(f.open_status, MG_EOPEN);
    assert_int_equal(f.close_status, MG_EOPEN);
    itest_fetch_free(&f);

    /* The connection is still good for the next channel. */
    assert_int_equal(itest_fetch_start(&f, ic.c, w->up.port, "GET", "/hello", 0, true), 0);
    assert_true(itest_run_until(&w->loop, itest_fetch_closed, &f, 5000));
    assert_int_equal(f.resp.status, 200);
    assert_string_equal(f.resp.body, "hello\n");
    itest_fetch_free(&f);
    itest_disconnect(&w->loop, &ic);
}

static void test_hundred_mb_byte_identical(void **state)
{
    world_t *w = *state;
    const uint64_t size = 100ull * 1000 * 1000;
    char want[65], path[64];
    assert_int_equal(mg_test_stream_sha256_hex(size, want), 0);
    snprintf(path, sizeof(path), "/bytes/%llu", (unsigned long long)size);

    mg_ssh_conn_opts_t o;
    itest_opts(&o, &w->sshd);
    itest_conn_t ic;
    itest_connect(&w->loop, &o, &ic);
    itest_fetch_t f;
    double t0 = mg_test_now_ms();
    assert_int_equal(itest_fetch_start(&f, ic.c, w->up.port, "GET", path, 0, false), 0);
    assert_true(itest_run_until(&w->loop, itest_fetch_closed, &f, 120000));
    double secs = (mg_test_now_ms() - t0) / 1000.0;
    assert_true(f.resp.complete);
    assert_int_equal(f.resp.body_received, size);
    assert_string_equal(f.resp.body_sha256, want);
    print_message("100 MB through one channel: %.2f s, %.0f MB/s\n", secs, size / secs / 1e6);
    itest_fetch_free(&f);
    itest_disconnect(&w->loop, &ic);
}

/*
 * A consumer that stops reading holds the server back: what arrives is bounded by the channel
 * window, not by the body. Reading again delivers the rest intact.
 */
static void test_read_backpressure(void **state)
{
    world_t *w = *state;
    const uint64_t size = 64ull * 1000 * 1000;
    char want[65], path[64];
    assert_int_equal(mg_test_stream_sha256_hex(size, want), 0);
    snprintf(path, sizeof(path), "/bytes/%llu", (unsigned long long)size);

    mg_ssh_conn_opts_t o;
    itest_opts(&o, &w->sshd);
    itest_conn_t ic;
    itest_connect(&w->loop, &o, &ic);
    mg_ssh_conn_stats_t st;
    mg_ssh_conn_stats(ic.c, &st);
    uint64_t in_before = st.bytes_in;

    itest_fetch_t f;
    assert_int_equal(itest_fetch_start(&f, ic.c, w->up.port, "GET", path, 0, false), 0);
    f.stop_reading = true;
    itest_run_for(&w->loop, 700);
    mg_ssh_conn_stats(ic.c, &st);
    uint64_t delivered = f.resp.body_received;
    uint64_t wire = st.bytes_in - in_before;
    print_message("paused: %llu body bytes delivered, %llu bytes on the wire\n",
                  (unsigned long long)delivered, (unsigned long long)wire);
    /* libssh2's window is 2 MB; allow for framing and what was delivered before the stop. */
    assert_true(wire < 5 * 1000 * 1000);
    assert_false(f.resp.complete);

    /* Still held back a while later. */
    itest_run_for(&w->loop, 300);
    mg_ssh_conn_stats(ic.c, &st);
    assert_true(st.bytes_in - in_before < 5 * 1000 * 1000);

    f.stop_reading = false;
    mg_ssh_chan_read_start(f.ch);
    assert_true(itest_run_until(&w->loop, itest_fetch_closed, &f, 60000));
    assert_true(f.resp.complete);
    assert_string_equal(f.resp.body_sha256, want);
    itest_fetch_free(&f);
    itest_disconnect(&w->loop, &ic);
}

/*
 * POSTs size bytes to /echo over c and checks they come back identical, both ways; with
 * trim_under_way, trims c's buffers once the exchange has started. Returns how often the
 * writer was told to wait.
 */
static int echo_through(world_t *w, mg_ssh_conn_t *c, uint64_t size, bool trim_under_way)
{
    char want[65];
    assert_int_equal(mg_test_stream_sha256_hex(size, want), 0);
    itest_fetch_t f;
    assert_int_equal(itest_fetch_start(&f, c, w->up.port, "POST", "/echo", size, false), 0);
    if (trim_under_way)
        mg_ssh_conn_trim(c); /* what holds bytes stays */
    assert_true(itest_run_until(&w->loop, itest_fetch_closed, &f, 60000));
    assert_int_equal(f.resp.status, 200);
    assert_true(f.resp.complete);
    assert_int_equal(f.body_off, size);
    assert_string_equal(f.resp.body_sha256, want);
    int eagains = f.write_eagains;
    itest_fetch_free(&f);
    assert_string_equal(f.body_sha_hex, want);
    return eagains;
}

/* A 20 MB request body goes out as the window allows, and comes back identical. */
static void test_write_backpressure_echo(void **state)
{
    world_t *w = *state;
    mg_ssh_conn_opts_t o;
    itest_opts(&o, &w->sshd);
    itest_conn_t ic;
    itest_connect(&w->loop, &o, &ic);
    /* The body is larger than any window: the writer must have been told to wait. */
    assert_true(echo_through(w, ic.c, 20ull * 1000 * 1000, false) > 0);
    itest_disconnect(&w->loop, &ic);
}

/* Trimming an idle connection's buffers costs nothing but the next allocation: the connection
   keeps working, whether trimmed between exchanges or while one is under way. */
static void test_trim_keeps_connection_working(void **state)
{
    world_t *w = *state;
    mg_ssh_conn_opts_t o;
    itest_opts(&o, &w->sshd);
    itest_conn_t ic;
    itest_connect(&w->loop, &o, &ic);
    mg_ssh_conn_trim(ic.c); /* idle, after the handshake: everything goes */
    echo_through(w, ic.c, 4ull * 1000 * 1000, false);
    mg_ssh_conn_trim(ic.c);
    echo_through(w, ic.c, 4ull * 1000 * 1000, true);
    assert_true(mg_ssh_conn_healthy(ic.c));
    itest_disconnect(&w->loop, &ic);
}

/*
 * A graceful close lets a slow stream finish, then says goodbye with SSH_MSG_DISCONNECT (sshd
 * logs the reason it received).
 */
static void test_close_waits_then_disconnects(void **state)
{
    world_t *w = *state;
    mg_ssh_conn_opts_t o;
    itest_opts(&o, &w->sshd);
    itest_conn_t ic;
    itest_connect(&w->loop, &o, &ic);
    itest_fetch_t f;
    assert_int_equal(itest_fetch_start(&f, ic.c, w->up.port, "GET",
                                       "/stream?chunks=8&interval_ms=100&size=32", 0, false),
                     0);
    itest_run_for(&w->loop, 150);
    assert_false(f.closed);
    mg_ssh_conn_close(ic.c, "maintenance window", 5000);
    /* No new channels while closing. */
    itest_fetch_t g;
    assert_int_equal(itest_fetch_start(&g, ic.c, w->up.port, "GET", "/hello", 0, false),
                     MG_ESTATE);
    itest_fetch_free(&g);
    assert_true(itest_run_until(&w->loop, itest_conn_closed, &ic, 10000));
    assert_true(f.closed);
    assert_int_equal(f.close_status, 0);
    assert_true(f.resp.complete);
    assert_int_equal(f.resp.chunks, 8);
    assert_int_equal(ic.status, 0);
    itest_fetch_free(&f);

    /* sshd writes "Received disconnect from 127.0.0.1 port N:11: maintenance window". */
    assert_true(itest_file_contains(w->sshd.log, "maintenance window"));
}

/* The close deadline ends channels that do not finish in time. */
static void test_close_deadline_forces_channels(void **state)
{
    world_t *w = *state;
    mg_ssh_conn_opts_t o;
    itest_opts(&o, &w->sshd);
    itest_conn_t ic;
    itest_connect(&w->loop, &o, &ic);
    itest_fetch_t f;
    assert_int_equal(itest_fetch_start(&f, ic.c, w->up.port, "GET",
                                       "/stream?chunks=100&interval_ms=100", 0, false),
                     0);
    itest_run_for(&w->loop, 100);
    double t0 = mg_test_now_ms();
    mg_ssh_conn_close(ic.c, "going away", 300);
    assert_true(itest_run_until(&w->loop, itest_conn_closed, &ic, 5000));
    double took = mg_test_now_ms() - t0;
    assert_true(took >= 250 && took < 2000);
    assert_true(f.closed);
    assert_int_equal(f.close_status, MG_ECLOSED);
    assert_false(f.resp.complete);
    itest_fetch_free(&f);
}

/*
 * A server that stops answering (SIGSTOP, every sshd process) is noticed by keepalive: the
 * connection turns unhealthy, then closes after keepalive_max_misses silent intervals.
 */
static void test_keepalive_notices_stopped_server(void **state)
{
    world_t *w = *state;
    mg_ssh_conn_opts_t o;
    itest_opts(&o, &w->sshd); /* keepalive every 2 s, closed after 2 misses */
    itest_conn_t ic;
    itest_connect(&w->loop, &o, &ic);
    assert_true(ic.ready);

    /* While the server answers, idle intervals do not make the connection unhealthy. */
    itest_run_for(&w->loop, 4500);
    assert_true(ic.healthy);
    assert_false(ic.closed);

    assert_int_equal(mg_test_sshd_pause(&w->sshd), 0);
    double t0 = mg_test_now_ms();
    bool unhealthy = false;
    while (!unhealthy && mg_test_now_ms() - t0 < 8000) {
        itest_run_for(&w->loop, 50);
        unhealthy = !ic.healthy;
    }
    double t_unhealthy = mg_test_now_ms() - t0;
    assert_true(unhealthy);
    assert_true(itest_run_until(&w->loop, itest_conn_closed, &ic, 8000));
    double t_closed = mg_test_now_ms() - t0;
    assert_int_equal(mg_test_sshd_resume(&w->sshd), 0);
    print_message("unhealthy after %.0f ms, closed after %.0f ms\n", t_unhealthy, t_closed);
    assert_int_equal(ic.status, MG_ETIMEDOUT);
    assert_non_null(strstr(ic.error, "keepalive"));
    /* Two intervals of silence at most before unhealthy; closed one interval later. */
    assert_true(t_unhealthy <= 4500);
    assert_true(t_closed > t_unhealthy);
}

/* The server process dies mid-stream: the channel and the connection end with an error. */
static void test_server_killed_mid_stream(void **state)
{
    world_t *w = *state;
    mg_test_sshd_t own;
    assert_int_equal(mg_test_sshd_start(&own, NULL), 0);
    mg_ssh_conn_opts_t o;
    itest_opts(&o, &own);
    itest_conn_t ic;
    itest_connect(&w->loop, &o, &ic);
    itest_fetch_t f;
    assert_int_equal(itest_fetch_start(&f, ic.c, w->up.port, "GET",
                                       "/stream?chunks=100&interval_ms=50", 0, false),
                     0);
    itest_run_for(&w->loop, 200);
    assert_true(f.resp.chunks > 0);
    assert_int_equal(mg_test_sshd_kill(&own), 0);
    assert_true(itest_run_until(&w->loop, itest_conn_closed, &ic, 5000));
    assert_true(f.closed);
    assert_int_equal(f.close_status, MG_ECLOSED);
    assert_false(f.resp.complete);
    assert_int_equal(ic.status, MG_ECLOSED);
    itest_fetch_free(&f);
    mg_test_sshd_stop(&own);
}

int main(void)
{
    signal(SIGPIPE, SIG_IGN);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_connect_auth_and_stats),
        cmocka_unit_test(test_passphrase_key),
        cmocka_unit_test(test_unknown_host_key_refused),
        cmocka_unit_test(test_changed_host_key_refused),
        cmocka_unit_test(test_pinned_host_key),
        cmocka_unit_test(test_wrong_user_key_refused),
        cmocka_unit_test(test_connect_refused_and_timeout),
        cmocka_unit_test(test_ten_channels_then_eleventh_refused),
        cmocka_unit_test(test_open_refused_by_server),
        cmocka_unit_test(test_hundred_mb_byte_identical),
        cmocka_unit_test(test_read_backpressure),
        cmocka_unit_test(test_write_backpressure_echo),
        cmocka_unit_test(test_trim_keeps_connection_working),
        cmocka_unit_test(test_close_waits_then_disconnects),
        cmocka_unit_test(test_close_deadline_forces_channels),
        cmocka_unit_test(test_keepalive_notices_stopped_server),
        cmocka_unit_test(test_server_killed_mid_stream),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
