/*
 * The agent tunnel end to end (docs/tunnel.md): the real moongate program, the real
 * moongate-agent program dialing it over a WebSocket, a real OpenSSH sshd behind the agent (a
 * child `sshd -i` per WebSocket with --sshd-inetd, or the listening sshd with --ssh), and
 * mg-upstream as the channel target. A request and a stream through the agent, an agent that
 * dies and comes back, a gateway that restarts on the same port, the per-user limit on agent
 * WebSockets (from a raw WebSocket client written here), refused tokens and upgrades, a wrong
 * host key, more connections on demand (a burst of 25 streams), a drain with a stream in flight,
 * and a stream that outlasts the request-head timeout.
 *
 * Every gateway and agent this starts must exit 0 (the agent: on SIGTERM) with no sanitizer
 * report in its log; in the sanitizer build both programs are ASan builds. What a test started
 * is killed by the per-test teardown if the test fails half way.
 */
#include "gwtest.h"

#include <pthread.h>
#include <stdatomic.h>

#define AGENT_TOKEN "alice-agent-token"
#define SHUTDOWN_CLOSE "closed by gateway: code=1000 reason=\"The gateway is shutting down.\""
#define MAX_RAW 8

typedef struct world {
    mg_test_sshd_t sshd;
    mg_test_upstream_t up;
    char dir[MG_TEST_PATH_MAX];
    char fp[128];                       /* the sshd's host key, SHA256:... */
    char fp_wrong[128];                 /* another host key's */
    char known_hosts[MG_TEST_PATH_MAX]; /* "alice-laptop ssh-ed25519 AAAA..." */
    char inetd[3 * MG_TEST_PATH_MAX];   /* the --sshd-inetd command */
    char ssh_addr[32];                  /* the --ssh address */
    /* What the running test started; the teardown stops what is left. */
    gw_t gw[2];
    gw_agent_t ag[2];
    int raw[MAX_RAW];
} world_t;

/* ---- setup ---- */

/* The SHA256 fingerprint of a public key file, as ssh-keygen prints it. */
static int fingerprint(const char *dir, const char *pub, char *out, size_t cap)
{
    char file[MG_TEST_PATH_MAX];
    if (mg_test_path_join(file, sizeof(file), dir, "fp.txt") != 0)
        return -1;
    char *const argv[] = { "ssh-keygen", "-l", "-E", "sha256", "-f", (char *)pub, NULL };
    mg_test_spawn_opts_t so = { .stdout_path = file };
    int code = -1;
    if (mg_test_proc_run(argv, &so, 10000, &code) != 0 || code != 0)
        return -1;
    char *text = NULL;
    if (mg_test_read_file(file, &text, NULL) != 0)
        return -1;
    /* "256 SHA256:base64 comment (ED25519)" */
    int rc = -1;
    const char *p = strstr(text, "SHA256:");
    if (p != NULL) {
        size_t n = strcspn(p, " \n");
        if (n < cap) {
            memcpy(out, p, n);
            out[n] = '\0';
            rc = 0;
        }
    }
    free(text);
    return rc;
}

static int group_setup(void **state)
{
    world_t *w = calloc(1, sizeof(*w));
    if (w == NULL || mg_test_sshd_start(&w->sshd, NULL) != 0 ||
        mg_test_upstream_start(&w->up) != 0 || mg_test_mkdtemp(w->dir, sizeof(w->dir), "mg-ag") != 0)
        return -1;
    if (fingerprint(w->dir, w->sshd.host_key_pub, w->fp, sizeof(w->fp)) != 0 ||
        fingerprint(w->dir, w->sshd.other_host_key_pub, w->fp_wrong, sizeof(w->fp_wrong)) != 0 ||
        strcmp(w->fp, w->fp_wrong) == 0 ||
        gw_write_known_hosts(&w->sshd, "alice-laptop", w->dir, w->known_hosts,
                             sizeof(w->known_hosts)) != 0 ||
        mg_test_sshd_inetd_command(&w->sshd, w->inetd, sizeof(w->inetd)) != 0)
        return -1;
    snprintf(w->ssh_addr, sizeof(w->ssh_addr), "127.0.0.1:%u", (unsigned)w->sshd.port);
    for (int i = 0; i < MAX_RAW; i++)
        w->raw[i] = -1;
    *state = w;
    return 0;
}

static int group_teardown(void **state)
{
    world_t *w = *state;
    mg_test_upstream_stop(&w->up);
    mg_test_sshd_stop(&w->sshd);
    free(w);
    mg_test_cleanup_all();
    return 0;
}

/* After each test, pass or fail: nothing it started outlives it. */
static int test_teardown(void **state)
{
    world_t *w = *state;
    for (int i = 0; i < MAX_RAW; i++)
        if (w->raw[i] >= 0) {
            close(w->raw[i]);
            w->raw[i] = -1;
        }
    for (int i = 0; i < 2; i++)
        gw_agent_kill(&w->ag[i]);
    for (int i = 0; i < 2; i++)
        gw_kill(&w->gw[i]);
    return 0;
}

/* ---- the policy ---- */

typedef struct route_opts {
    const char *host_key;       /* a pinned fingerprint, or NULL */
    const char *known_hosts;    /* or a known_hosts file */
    int max_connections;        /* 0: 4 */
    int max_channels;           /* 0: 10 */
} route_opts_t;

/* alice (bearer alice-token) is routed through her agent (agent token alice-agent-token). */
static void agent_policy(const world_t *w, const route_opts_t *o, char *out, size_t cap)
{
    char check[512];
    if (o->host_key)
        snprintf(check, sizeof(check), "host_key = \"%s\"", o->host_key);
    else
        snprintf(check, sizeof(check), "known_hosts = \"%s\"", o->known_hosts);
    int n = snprintf(
        out, cap,
        "return {\n"
        "  authenticate = function(req)\n"
        "    if req.headers[\"authorization\"] == \"Bearer alice-token\" then return \"alice\" end\n"
        "    return nil, 401, \"bad or missing token\"\n"
        "  end,\n"
        "  agent_auth = function(token, req)\n"
        "    if token == \"" AGENT_TOKEN "\" then return \"alice\" end\n"
        "    return nil, 401, \"unknown agent token\"\n"
        "  end,\n"
        "  limits = function(user)\n"
        "    return { max_connections = %d, max_channels = %d, queue_max = 100,\n"
        "             queue_timeout_ms = 10000, idle_timeout_ms = 300000 }\n"
        "  end,\n"
        "  route = function(req, user)\n"
        "    return { transport = \"agent\", host = \"alice-laptop\", port = 22,\n"
        "             ssh_user = \"%s\", key = \"%s\", %s,\n"
        "             target_host = \"127.0.0.1\", target_port = %u }\n"
        "  end,\n"
        "}\n",
        o->max_connections ? o->max_connections : 4, o->max_channels ? o->max_channels : 10,
        w->sshd.user, w->sshd.client_key, check, (unsigned)w->up.port);
    assert_true(n > 0 && n < (int)cap);
}

static gw_t *start_gateway(world_t *w, int slot, const route_opts_t *o, uint16_t port,
                           const char *const *env)
{
    char text[4096];
    agent_policy(w, o, text, sizeof(text));
    gw_start_policy(&w->gw[slot], text, port, env);
    return &w->gw[slot];
}

/* Starts an agent for alice: local "inetd" (a child sshd -i per WebSocket) or "tcp" (--ssh). */
static gw_agent_t *start_agent(world_t *w, int slot, const gw_t *g, const char *local,
                               const char *token)
{
    const char *inetd[] = { "--sshd-inetd", w->inetd, NULL };
    const char *tcp[] = { "--ssh", w->ssh_addr, NULL };
    gw_agent_start(&w->ag[slot], g->port, token, strcmp(local, "inetd") == 0 ? inetd : tcp);
    return &w->ag[slot];
}

/* Waits until the agent has logged its n-th open WebSocket. */
static void wait_connected(const gw_t *g, const gw_agent_t *a, int n)
{
    if (!gw_agent_wait_log(a, "connected: websocket", n, 10000)) {
        gw_print_file_tail(a->log, 30);
        gw_print_log_tail(g, 30);
        fail_msg("the agent did not connect (%d WebSocket(s) expected) within 10 s", n);
    }
}

/* Both programs leave clean: the agent first (SIGTERM, exit 0), then the gateway. */
static void stop_both(gw_t *g, gw_agent_t *a)
{
    gw_agent_stop(a);
    gw_stop(g);
}

/* ---- requests ---- */

/* An error response: JSON with "error" and the request id of the x-request-id header. */
static void check_error_body(const mg_test_http_response_t *r)
{
    const char *rid = mg_test_http_response_header(r, "x-request-id");
    assert_non_null(rid);
    assert_non_null(r->body);
    if (!gw_json_valid(r->body, r->body_len))
        fail_msg("error body is not JSON: %s", r->body);
    char v[512];
    assert_true(gw_json_get_string(r->body, "error", v, sizeof(v)));
    assert_true(strlen(v) > 0);
    assert_true(gw_json_get_string(r->body, "request_id", v, sizeof(v)));
    assert_string_equal(v, rid);
}

/*
 * GET /hello until it answers 200, every 100 ms, for up to timeout_ms. Returns the ms it took,
 * or fails with the last answer.
 */
static double hello_until_ok(gw_t *g, const gw_agent_t *a, int timeout_ms, int *tries)
{
    double t0 = mg_test_now_ms();
    int last_rc = 0, last_status = 0;
    char last_body[256] = "";
    *tries = 0;
    while (mg_test_now_ms() - t0 < timeout_ms) {
        mg_test_http_response_t r;
        int rc = gw_request(g, "GET", "/hello", GW_AUTH_ALICE, NULL, 0, &r, 5000);
        ++*tries;
        bool ok = rc == 0 && r.status == 200 && r.body && strcmp(r.body, "hello\n") == 0;
        last_rc = rc;
        last_status = r.status;
        snprintf(last_body, sizeof(last_body), "%s", r.body ? r.body : "");
        mg_test_http_response_free(&r);
        if (ok)
            return mg_test_now_ms() - t0;
        mg_test_sleep_ms(100);
    }
    gw_print_file_tail(a->log, 30);
    gw_print_log_tail(g, 30);
    fail_msg("no 200 within %d ms (%d tries; last rc %d, status %d: %s)", timeout_ms, *tries,
             last_rc, last_status, last_body);
    return -1;
}

/* "total_connections" of /stats' pool, or -1. */
static int stats_pool_connections(const gw_t *g)
{
    char *req = NULL;
    size_t len = 0;
    if (mg_test_http_request(&req, &len, "GET", "/stats", NULL, NULL, 0) != 0)
        return -1;
    mg_test_http_response_t r;
    mg_test_http_response_init(&r);
    r.keep_body = true;
    int rc = gw_exchange(g->port, req, len, &r, 3000, NULL);
    free(req);
    int n = -1;
    const char *p = rc == 0 && r.status == 200 && r.body ? strstr(r.body, "\"total_connections\":")
                                                         : NULL;
    if (p != NULL)
        n = atoi(p + strlen("\"total_connections\":"));
    mg_test_http_response_free(&r);
    return n;
}

/* Lines in a body (each NDJSON line of /stream ends in '\n'). */
static int count_lines(const mg_test_http_response_t *r)
{
    int n = 0;
    for (size_t i = 0; i < r->body_len; i++)
        n += r->body[i] == '\n';
    return n;
}

/* ---- wss://: the agent verifies the gateway's certificate (system CAs, or --ca-file) ---- */

static void test_wss_verifies_certificate(void **state)
{
    world_t *w = *state;
    char dir[MG_TEST_PATH_MAX], crt[MG_TEST_PATH_MAX], key[MG_TEST_PATH_MAX];
    assert_int_equal(mg_test_mkdtemp(dir, sizeof(dir), "mg-wss"), 0);
    assert_int_equal(mg_test_path_join(crt, sizeof(crt), dir, "tls.crt"), 0);
    assert_int_equal(mg_test_path_join(key, sizeof(key), dir, "tls.key"), 0);
    char *const gen[] = { "openssl", "req", "-x509", "-newkey", "ed25519", "-nodes", "-keyout",
                          key, "-out", crt, "-days", "2", "-subj", "/CN=localhost", "-addext",
                          "subjectAltName=DNS:localhost", NULL };
    int code = -1;
    assert_int_equal(mg_test_proc_run(gen, NULL, 10000, &code), 0);
    assert_int_equal(code, 0);
    char env_crt[MG_TEST_PATH_MAX + 32], env_key[MG_TEST_PATH_MAX + 32];
    snprintf(env_crt, sizeof(env_crt), "MOONGATE_TLS_CERT=%s", crt);
    snprintf(env_key, sizeof(env_key), "MOONGATE_TLS_KEY=%s", key);
    const char *env[] = { env_crt, env_key, NULL };
    route_opts_t o = { .known_hosts = w->known_hosts };
    gw_t *g = start_gateway(w, 0, &o, 0, env);
    char url[96];
    snprintf(url, sizeof(url), "wss://localhost:%u/tunnel", (unsigned)g->port);

    /* A certificate no trusted CA signed is refused: no tunnel. */
    const char *plain[] = { "--sshd-inetd", w->inetd, NULL };
    gw_agent_start_url(&w->ag[0], url, AGENT_TOKEN, plain);
    assert_true(gw_agent_wait_log(&w->ag[0], "cannot connect", 1, 10000));
    assert_int_equal(gw_agent_log_count(&w->ag[0], "connected: websocket"), 0);
    gw_agent_stop(&w->ag[0]);

    /* Trusted through --ca-file: the tunnel comes up and carries a request. */
    const char *with_ca[] = { "--sshd-inetd", w->inetd, "--ca-file", crt, NULL };
    gw_agent_start_url(&w->ag[1], url, AGENT_TOKEN, with_ca);
    wait_connected(g, &w->ag[1], 1);
    char cmd_url[96];
    snprintf(cmd_url, sizeof(cmd_url), "https://127.0.0.1:%u/hello", (unsigned)g->port);
    char out[MG_TEST_PATH_MAX];
    assert_int_equal(mg_test_path_join(out, sizeof(out), dir, "curl.out"), 0);
    char *const get[] = { "curl", "-sSk", "-H", "Authorization: Bearer alice-token", cmd_url, NULL };
    mg_test_spawn_opts_t so = { .stdout_path = out };
    assert_int_equal(mg_test_proc_run(get, &so, 15000, &code), 0);
    assert_int_equal(code, 0);
    char *text = NULL;
    assert_int_equal(mg_test_read_file(out, &text, NULL), 0);
    assert_string_equal(text, "hello\n");
    free(text);
    gw_agent_stop(&w->ag[1]);
    gw_stop(g);
    mg_test_rm_rf(dir);
}

/* ---- a raw WebSocket client, enough to see upgrades refused and close frames ---- */

typedef struct ws {
    int fd;
    unsigned char buf[64 * 1024];   /* bytes read and not yet parsed */
    size_t len;
} ws_t;

/*
 * Sends an upgrade to /tunnel (token, agent_id and protocol each NULL to leave the header out)
 * and reads the response head. Returns the HTTP status (101: ws->fd stays open and is recorded
 * in w->raw for the teardown), or a negative code.
 */
static int ws_open(world_t *w, ws_t *ws, uint16_t port, const char *token, const char *agent_id,
                   const char *protocol)
{
    ws->fd = -1;
    ws->len = 0;
    char req[1024], auth[256] = "", id[128] = "", proto[128] = "";
    if (token)
        snprintf(auth, sizeof(auth), "Authorization: Bearer %s\r\n", token);
    if (agent_id)
        snprintf(id, sizeof(id), "X-Moongate-Agent: %s\r\n", agent_id);
    if (protocol)
        snprintf(proto, sizeof(proto), "Sec-WebSocket-Protocol: %s\r\n", protocol);
    int n = snprintf(req, sizeof(req),
                     "GET /tunnel HTTP/1.1\r\nHost: 127.0.0.1:%u\r\nUpgrade: websocket\r\n"
                     "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                     "Sec-WebSocket-Version: 13\r\n%s%s%s\r\n",
                     (unsigned)port, proto, auth, id);
    assert_true(n > 0 && n < (int)sizeof(req));
    int fd = gw_connect(port, 2000);
    if (fd < 0)
        return fd;
    if (send(fd, req, (size_t)n, MSG_NOSIGNAL) != n) {
        close(fd);
        return MG_ECLOSED;
    }
    double deadline = mg_test_now_ms() + 5000;
    const unsigned char *end = NULL;
    while (end == NULL) {
        if (gw_poll(fd, POLLIN, deadline) != 0) {
            close(fd);
            return MG_ETIMEDOUT;
        }
        ssize_t got = recv(fd, ws->buf + ws->len, sizeof(ws->buf) - 1 - ws->len, MSG_DONTWAIT);
        if (got == 0 || (got < 0 && errno != EAGAIN && errno != EINTR)) {
            close(fd);
            return MG_ECLOSED;
        }
        if (got > 0)
            ws->len += (size_t)got;
        ws->buf[ws->len] = '\0';
        end = (const unsigned char *)strstr((const char *)ws->buf, "\r\n\r\n");
    }
    int status = strncmp((const char *)ws->buf, "HTTP/1.", 7) == 0
                     ? atoi((const char *)ws->buf + 9) : MG_EINVAL;
    if (status != 101) {
        print_message("upgrade refused: %.*s\n", (int)strcspn((const char *)ws->buf, "\r"),
                      ws->buf);
        close(fd);
        return status;
    }
    /* Frame bytes may follow the head at once. */
    size_t head = (size_t)(end + 4 - ws->buf);
    memmove(ws->buf, ws->buf + head, ws->len - head);
    ws->len -= head;
    ws->fd = fd;
    for (int i = 0; i < MAX_RAW; i++)
        if (w->raw[i] < 0) {
            w->raw[i] = fd;
            break;
        }
    return status;
}

static void ws_close(world_t *w, ws_t *ws)
{
    if (ws->fd < 0)
        return;
    for (int i = 0; i < MAX_RAW; i++)
        if (w->raw[i] == ws->fd)
            w->raw[i] = -1;
    close(ws->fd);
    ws->fd = -1;
}

/*
 * Reads frames for up to timeout_ms until a close frame: *code and reason get its code and
 * text. Other frames (pings, control messages) are skipped. Returns 0, MG_ETIMEDOUT (none came),
 * or MG_ECLOSED (the connection ended without one).
 */
static int ws_wait_close(ws_t *ws, int timeout_ms, int *code, char *reason, size_t cap)
{
    double deadline = mg_test_now_ms() + timeout_ms;
    for (;;) {
        /* A whole frame in the buffer? Frames from the server are not masked. */
        if (ws->len >= 2) {
            size_t hl = 2, plen = ws->buf[1] & 0x7f;
            if (plen == 126) {
                hl = 4;
                plen = ws->len >= 4 ? (size_t)ws->buf[2] << 8 | ws->buf[3] : 0;
            } else if (plen == 127) {
                hl = 10;
                plen = 0;
                for (int i = 0; i < 8 && ws->len >= 10; i++)
                    plen = plen << 8 | ws->buf[2 + i];
            }
            assert_true(hl + plen <= sizeof(ws->buf));
            if (ws->len >= hl + plen) {
                int opcode = ws->buf[0] & 0x0f;
                const unsigned char *p = ws->buf + hl;
                if (opcode == 0x8) {
                    *code = plen >= 2 ? (p[0] << 8 | p[1]) : 1005;
                    size_t rl = plen >= 2 ? plen - 2 : 0;
                    snprintf(reason, cap, "%.*s", (int)rl, (const char *)p + 2);
                    return 0;
                }
                memmove(ws->buf, ws->buf + hl + plen, ws->len - hl - plen);
                ws->len -= hl + plen;
                continue;
            }
        }
        if (gw_poll(ws->fd, POLLIN, deadline) != 0)
            return MG_ETIMEDOUT;
        ssize_t got = recv(ws->fd, ws->buf + ws->len, sizeof(ws->buf) - ws->len, MSG_DONTWAIT);
        if (got == 0 || (got < 0 && errno != EAGAIN && errno != EINTR))
            return MG_ECLOSED;
        if (got > 0)
            ws->len += (size_t)got;
    }
}

/* ==== 1. a request, a stream and a 1 MB body through the agent (sshd -i) ==== */

static void test_requests_through_agent(void **state)
{
    world_t *w = *state;
    route_opts_t o = { .known_hosts = w->known_hosts };
    gw_t *g = start_gateway(w, 0, &o, 0, NULL);
    gw_agent_t *a = start_agent(w, 0, g, "inetd", AGENT_TOKEN);
    wait_connected(g, a, 1);
    assert_true(gw_wait_log(g, "user=alice agent=", 1, 5000));

    mg_test_http_response_t r;
    int rc = gw_request(g, "GET", "/hello", GW_AUTH_ALICE, NULL, 0, &r, 15000);
    gw_expect_status(g, rc, &r, 200, "GET /hello through the agent");
    assert_string_equal(r.body, "hello\n");
    mg_test_http_response_free(&r);

    /* The stream arrives as it is produced: five lines, 100 ms apart. */
    char *req = NULL;
    size_t len = 0;
    assert_int_equal(mg_test_http_request(&req, &len, "GET", "/stream?chunks=5&interval_ms=100",
                                          GW_AUTH_ALICE, NULL, 0),
                     0);
    mg_test_http_response_init(&r);
    r.keep_body = true;
    static gw_arrivals_t arr;
    memset(&arr, 0, sizeof(arr));
    rc = gw_exchange(g->port, req, len, &r, 10000, &arr);
    free(req);
    gw_expect_status(g, rc, &r, 200, "GET /stream through the agent");
    assert_int_equal(count_lines(&r), 5);
    int moments = arr.n > 0;
    for (int i = 1, last = 0; i < arr.n; i++)
        if (arr.t[i] - arr.t[last] >= 30) {
            moments++;
            last = i;
        }
    double span = arr.n > 1 ? arr.t[arr.n - 1] - arr.t[0] : 0;
    print_message("stream: %d reads with body, %d distinct moments over %.0f ms\n", arr.n,
                  moments, span);
    assert_true(moments >= 4);
    assert_true(span >= 300);
    mg_test_http_response_free(&r);

    /* 1 MB both ways, byte for byte. */
    size_t n = 1000 * 1000;
    char *body = malloc(n);
    assert_non_null(body);
    mg_test_stream_t s;
    mg_test_stream_init(&s);
    mg_test_stream_fill(&s, body, n);
    char want[65], got[65];
    assert_int_equal(mg_test_sha256_hex(body, n, want), 0);
    double t0 = mg_test_now_ms();
    rc = gw_request(g, "POST", "/echo", GW_AUTH_ALICE, body, n, &r, 30000);
    free(body);
    gw_expect_status(g, rc, &r, 200, "POST /echo 1 MB through the agent");
    print_message("1 MB echoed in %.0f ms\n", mg_test_now_ms() - t0);
    assert_int_equal(r.body_len, n);
    assert_int_equal(mg_test_sha256_hex(r.body, r.body_len, got), 0);
    assert_string_equal(got, want);
    mg_test_http_response_free(&r);

    assert_true(gw_metric(g, "moongate_agent_connections") >= 1);
    assert_true(gw_agent_log_count(a, "local ssh stream opened") >= 1);
    stop_both(g, a);
}

/* ==== 2. the agent dies: a fast, clear refusal; it comes back: service ==== */

static void test_agent_killed_and_restarted(void **state)
{
    world_t *w = *state;
    route_opts_t o = { .host_key = w->fp };
    gw_t *g = start_gateway(w, 0, &o, 0, NULL);
    gw_agent_t *a = start_agent(w, 0, g, "inetd", AGENT_TOKEN);
    wait_connected(g, a, 1);
    int tries;
    hello_until_ok(g, a, 10000, &tries);

    gw_agent_kill(a);
    gw_agent_assert_log_clean(a);
    /* The gateway sees the TCP connection end (the kernel closes it for the dead process). */
    if (!gw_wait_log(g, "disconnected", 1, 3000)) {
        gw_print_log_tail(g, 20);
        fail_msg("the gateway did not notice the agent's death within 3 s");
    }

    mg_test_http_response_t r;
    double t0 = mg_test_now_ms();
    int rc = gw_request(g, "GET", "/hello", GW_AUTH_ALICE, NULL, 0, &r, 10000);
    double took = mg_test_now_ms() - t0;
    print_message("with the agent dead: %d after %.0f ms: %s\n", r.status, took,
                  r.body ? r.body : "");
    assert_int_equal(rc, 0);
    if (r.status != 502 && r.status != 503) {
        gw_print_log_tail(g, 20);
        fail_msg("expected 502 or 503 with the agent dead, got %d", r.status);
    }
    check_error_body(&r);
    assert_non_null(strstr(r.body, "not connected"));
    assert_true(took < 2000);
    mg_test_http_response_free(&r);

    /* A second one, too: still fast and clear (it may now come from the pool's backoff). */
    t0 = mg_test_now_ms();
    rc = gw_request(g, "GET", "/hello", GW_AUTH_ALICE, NULL, 0, &r, 10000);
    took = mg_test_now_ms() - t0;
    print_message("again: %d after %.0f ms: %s\n", r.status, took, r.body ? r.body : "");
    assert_int_equal(rc, 0);
    assert_true(r.status == 502 || r.status == 503);
    assert_non_null(strstr(r.body, "not connected"));
    assert_true(took < 2000);
    mg_test_http_response_free(&r);

    /* The agent is back: so is service. */
    a = start_agent(w, 0, g, "inetd", AGENT_TOKEN);
    wait_connected(g, a, 1);
    double ms = hello_until_ok(g, a, 10000, &tries);
    print_message("after the restart: 200 after %.0f ms (%d tries)\n", ms, tries);
    stop_both(g, a);
}

/* ==== 3. the gateway restarts on the same port: the agent comes back by itself ==== */

static void test_gateway_restarted(void **state)
{
    world_t *w = *state;
    uint16_t port = 0;
    assert_int_equal(mg_test_free_port(&port), 0);
    route_opts_t o = { .host_key = w->fp };
    gw_t *g1 = start_gateway(w, 0, &o, port, NULL);
    assert_int_equal(g1->port, port);
    gw_agent_t *a = start_agent(w, 0, g1, "tcp", AGENT_TOKEN);
    wait_connected(g1, a, 1);
    int tries;
    hello_until_ok(g1, a, 10000, &tries);

    double t_term = mg_test_now_ms();
    gw_stop(g1);
    print_message("first gateway exited %.0f ms after SIGTERM\n", mg_test_now_ms() - t_term);
    if (!gw_agent_wait_log(a, SHUTDOWN_CLOSE, 1, 3000)) {
        gw_print_file_tail(a->log, 30);
        fail_msg("the agent did not log the gateway's shutdown close (%s)", SHUTDOWN_CLOSE);
    }

    gw_t *g2 = start_gateway(w, 1, &o, port, NULL);
    assert_int_equal(g2->port, port);
    double ms = hello_until_ok(g2, a, 10000, &tries);
    print_message("new gateway: 200 %.0f ms after it listened, %.0f ms after the first's "
                  "SIGTERM (%d tries)\n",
                  ms, mg_test_now_ms() - t_term, tries);
    assert_true(gw_agent_log_count(a, "connected: websocket") >= 2);
    stop_both(g2, a);
}

/* ==== 4. the per-user limit on agent WebSockets, and a reconnecting agent ==== */

static void test_connection_limit(void **state)
{
    world_t *w = *state;
    route_opts_t o = { .host_key = w->fp, .max_connections = 4 };
    gw_t *g = start_gateway(w, 0, &o, 0, NULL);
    static ws_t ws[6];
    char ids[5][32];
    for (int i = 0; i < 5; i++)
        snprintf(ids[i], sizeof(ids[i]), "raw-test-agent-%02d-xyz", i);

    for (int i = 0; i < 4; i++)
        assert_int_equal(ws_open(w, &ws[i], g->port, AGENT_TOKEN, ids[i], "moongate-tunnel.v1"),
                         101);
    assert_true(gw_wait_log(g, "connected (4 of 4)", 1, 3000));

    /* A fifth agent: upgraded, then closed with 1008 and a reason naming the limit. */
    assert_int_equal(ws_open(w, &ws[4], g->port, AGENT_TOKEN, ids[4], "moongate-tunnel.v1"), 101);
    int code = 0;
    char reason[256] = "";
    int rc = ws_wait_close(&ws[4], 3000, &code, reason, sizeof(reason));
    print_message("fifth WebSocket: rc %d, close %d \"%s\"\n", rc, code, reason);
    if (rc != 0)
        gw_print_log_tail(g, 20);
    assert_int_equal(rc, 0);
    assert_int_equal(code, 1008);
    assert_non_null(strstr(reason, "limit"));
    ws_close(w, &ws[4]);

    /* The four are untouched. */
    for (int i = 0; i < 4; i++)
        assert_int_equal(ws_wait_close(&ws[i], i == 0 ? 300 : 50, &code, reason, sizeof(reason)),
                         MG_ETIMEDOUT);

    /* The first agent again (a reconnect after a network cut): accepted, its old one replaced. */
    assert_int_equal(ws_open(w, &ws[5], g->port, AGENT_TOKEN, ids[0], "moongate-tunnel.v1"), 101);
    rc = ws_wait_close(&ws[0], 3000, &code, reason, sizeof(reason));
    print_message("the replaced WebSocket: rc %d, close %d \"%s\"\n", rc, code, reason);
    assert_int_equal(rc, 0);
    assert_int_equal(code, 1000);
    assert_non_null(strstr(reason, "replaced"));
    ws_close(w, &ws[0]);
    assert_int_equal(ws_wait_close(&ws[5], 500, &code, reason, sizeof(reason)), MG_ETIMEDOUT);
    for (int i = 1; i < 4; i++)
        assert_int_equal(ws_wait_close(&ws[i], 50, &code, reason, sizeof(reason)), MG_ETIMEDOUT);

    /* Four open, as the gauge says once the replaced one is gone. */
    double v = -1, end = mg_test_now_ms() + 3000;
    while ((v = gw_metric(g, "moongate_agent_connections")) != 4 && mg_test_now_ms() < end)
        mg_test_sleep_ms(50);
    print_message("moongate_agent_connections %.0f\n", v);
    assert_true(v == 4);
    assert_int_equal(gw_log_count(g, "refused: connection limit"), 1);

    for (int i = 1; i < 6; i++)
        ws_close(w, &ws[i]);
    end = mg_test_now_ms() + 3000;
    while ((v = gw_metric(g, "moongate_agent_connections")) != 0 && mg_test_now_ms() < end)
        mg_test_sleep_ms(50);
    assert_true(v == 0);
    gw_stop(g);
}

/* ==== 5. refused tokens and malformed upgrades ==== */

static void test_bad_token_and_bad_upgrades(void **state)
{
    world_t *w = *state;
    route_opts_t o = { .host_key = w->fp };
    gw_t *g = start_gateway(w, 0, &o, 0, NULL);
    gw_agent_t *a = start_agent(w, 0, g, "tcp", "not-the-agent-token");
    if (!gw_agent_wait_log(a, "gateway refused the token (401)", 1, 5000)) {
        gw_print_file_tail(a->log, 20);
        fail_msg("the agent did not log the refusal");
    }
    /* Not a tight loop: over the next 3 s, at most one more attempt (it waits 60 s). */
    mg_test_sleep_ms(3000);
    int attempts = gw_agent_log_count(a, "connecting to");
    int refused = gw_log_count(g, "refused (401)");
    print_message("bad token: %d attempt(s) in about 3 s, gateway logged %d refusal(s)\n",
                  attempts, refused);
    assert_true(attempts >= 1 && attempts <= 2);
    assert_true(refused >= 1 && refused <= 2);
    assert_int_equal(gw_agent_log_count(a, "connected: websocket"), 0);
    /* SIGTERM during the long wait still ends it at once, with 0. */
    gw_agent_stop(a);

    static ws_t ws;
    const char *id = "raw-test-agent-bad-upgrades";
    assert_int_equal(ws_open(w, &ws, g->port, NULL, id, "moongate-tunnel.v1"), 401);
    assert_int_equal(ws_open(w, &ws, g->port, "nope", id, "moongate-tunnel.v1"), 401);
    assert_int_equal(ws_open(w, &ws, g->port, AGENT_TOKEN, id, NULL), 400);
    assert_int_equal(ws_open(w, &ws, g->port, AGENT_TOKEN, id, "some-other-protocol"), 400);
    assert_int_equal(ws_open(w, &ws, g->port, AGENT_TOKEN, NULL, "moongate-tunnel.v1"), 400);
    assert_int_equal(ws_open(w, &ws, g->port, AGENT_TOKEN, "short", "moongate-tunnel.v1"), 400);
    assert_int_equal(gw_healthz(g, 2000), 200);
    assert_true(gw_metric(g, "moongate_agent_connections") == 0);
    gw_stop(g);
}

/* ==== 5b. hostile frames: closed at once, with the right code ==== */

static void test_hostile_frames(void **state)
{
    world_t *w = *state;
    route_opts_t o = { .host_key = w->fp };
    gw_t *g = start_gateway(w, 0, &o, 0, NULL);
    struct {
        const char *name;
        unsigned char frame[16];
        size_t len;
        int code;
    } cases[] = {
        /* A client frame must be masked (RFC 6455 5.1). */
        { "an unmasked frame", { 0x82, 0x05, 'h', 'e', 'l', 'l', 'o' }, 7, 1002 },
        /* A header announcing 2^62 bytes: refused at the header, nothing waited for. */
        { "a frame of 2^62 bytes", { 0x82, 0xff, 0x40, 0, 0, 0, 0, 0, 0, 0, 1, 2, 3, 4 }, 14,
          1009 },
        /* A control frame over 125 bytes. */
        { "a ping of 126 bytes", { 0x89, 0xfe, 0, 126, 1, 2, 3, 4 }, 8, 1002 },
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        static ws_t ws;
        assert_int_equal(ws_open(w, &ws, g->port, AGENT_TOKEN, "raw-test-agent-hostile-frames",
                                 "moongate-tunnel.v1"),
                         101);
        double t0 = mg_test_now_ms();
        assert_int_equal(send(ws.fd, cases[i].frame, cases[i].len, MSG_NOSIGNAL),
                         (ssize_t)cases[i].len);
        int code = 0;
        char reason[128] = "";
        int rc = ws_wait_close(&ws, 3000, &code, reason, sizeof(reason));
        double ms = mg_test_now_ms() - t0;
        /* After its close frame the gateway ends the connection. */
        char b[64];
        bool ended = gw_poll(ws.fd, POLLIN, mg_test_now_ms() + 3000) == 0 &&
                     recv(ws.fd, b, sizeof(b), 0) <= 0;
        print_message("%-24s -> close %d after %.1f ms, connection %s\n", cases[i].name, code, ms,
                      ended ? "ended" : "open");
        assert_int_equal(rc, 0);
        assert_int_equal(code, cases[i].code);
        assert_true(ms < 500);
        assert_true(ended);
        ws_close(w, &ws);
    }
    assert_int_equal(gw_healthz(g, 2000), 200);
    gw_stop(g);
}

/* ==== 6. a wrong pinned host key: 502 naming it; the gateway serves on ==== */

static void test_wrong_host_key(void **state)
{
    world_t *w = *state;
    route_opts_t o = { .host_key = w->fp_wrong };
    gw_t *g = start_gateway(w, 0, &o, 0, NULL);
    gw_agent_t *a = start_agent(w, 0, g, "tcp", AGENT_TOKEN);
    wait_connected(g, a, 1);

    mg_test_http_response_t r;
    int rc = gw_request(g, "GET", "/hello", GW_AUTH_ALICE, NULL, 0, &r, 10000);
    gw_expect_status(g, rc, &r, 502, "a wrong pinned host key");
    check_error_body(&r);
    print_message("wrong host key: %d %s\n", r.status, r.body);
    assert_non_null(strstr(r.body, "host key"));
    assert_non_null(strstr(r.body, w->fp_wrong));
    mg_test_http_response_free(&r);
    gw_assert_alive(g);
    assert_int_equal(gw_healthz(g, 2000), 200);

    /* The right key after a reload: the agent (reconnected after the failed session) serves. */
    int reloads = gw_log_count(g, "policy reloaded");
    char text[4096];
    route_opts_t right = { .host_key = w->fp };
    agent_policy(w, &right, text, sizeof(text));
    assert_int_equal(mg_test_write_file(g->policy, text, strlen(text), 0600), 0);
    assert_int_equal(mg_test_proc_kill(&g->proc, SIGHUP), 0);
    assert_true(gw_wait_log(g, "policy reloaded", reloads + 1, 5000));
    int tries;
    double ms = hello_until_ok(g, a, 10000, &tries);
    print_message("right key after the reload: 200 after %.0f ms (%d tries)\n", ms, tries);
    stop_both(g, a);
}

/* ==== 7. demand brings more connections: the gateway asks the agent for more ==== */

typedef struct streamer {
    int fd;                     /* connected before the barrier */
    pthread_barrier_t *go;
    atomic_int *done;
    int rc, status, lines;
    double ms;
} streamer_t;

static void *streamer_run(void *arg)
{
    streamer_t *s = arg;
    char *req = NULL;
    size_t len = 0;
    int made = mg_test_http_request(&req, &len, "GET", "/stream?chunks=5&interval_ms=200",
                                    GW_AUTH_ALICE, NULL, 0);
    pthread_barrier_wait(s->go);
    s->rc = MG_ENOMEM;
    if (made == 0) {
        mg_test_http_response_t r;
        mg_test_http_response_init(&r);
        r.keep_body = true;
        double t0 = mg_test_now_ms();
        s->rc = gw_exchange_fd(s->fd, req, len, &r, 30000, NULL);
        s->ms = mg_test_now_ms() - t0;
        s->status = r.status;
        s->lines = r.complete ? count_lines(&r) : -1;
        mg_test_http_response_free(&r);
        free(req);
    } else {
        close(s->fd);
    }
    atomic_fetch_add(s->done, 1);
    return NULL;
}

static void test_demand_opens_more_connections(void **state)
{
    world_t *w = *state;
    route_opts_t o = { .host_key = w->fp, .max_connections = 4, .max_channels = 10 };
    gw_t *g = start_gateway(w, 0, &o, 0, NULL);
    gw_agent_t *a = start_agent(w, 0, g, "tcp", AGENT_TOKEN);
    wait_connected(g, a, 1);
    int tries;
    hello_until_ok(g, a, 10000, &tries);

    /* The 25 connect first, then send at one moment: a burst, as from a busy web app. */
    enum { N = 25 };
    static streamer_t s[N];
    pthread_t t[N];
    pthread_barrier_t go;
    atomic_int done = 0;
    assert_int_equal(pthread_barrier_init(&go, NULL, N + 1), 0);
    for (int i = 0; i < N; i++) {
        int fd = gw_connect(g->port, 2000);
        assert_true(fd >= 0);
        s[i] = (streamer_t){ .fd = fd, .go = &go, .done = &done };
        assert_int_equal(pthread_create(&t[i], NULL, streamer_run, &s[i]), 0);
    }
    pthread_barrier_wait(&go);
    double t0 = mg_test_now_ms();
    int most = 0;
    while (atomic_load(&done) < N && mg_test_now_ms() - t0 < 40000) {
        int n = stats_pool_connections(g);
        if (n > most)
            most = n;
        mg_test_sleep_ms(100);
    }
    int ok = 0;
    double slowest = 0;
    for (int i = 0; i < N; i++) {
        pthread_join(t[i], NULL);
        if (s[i].rc == 0 && s[i].status == 200 && s[i].lines == 5)
            ok++;
        else
            print_message("stream %d: rc %d, status %d, %d lines\n", i, s[i].rc, s[i].status,
                          s[i].lines);
        if (s[i].ms > slowest)
            slowest = s[i].ms;
    }
    pthread_barrier_destroy(&go);
    int asked = gw_agent_log_count(a, "gateway asked for another connection");
    int opened = gw_agent_log_count(a, "connected: websocket");
    int pool_opens = gw_log_count(g, " opening"); /* "pool: user=alice conn=N opening" */
    print_message("%d of %d streams complete in %.0f ms (slowest %.0f ms); pool connections at "
                  "most %d, %d opened; the agent was asked %d time(s) and opened %d "
                  "WebSocket(s)\n",
                  ok, N, mg_test_now_ms() - t0, slowest, most, pool_opens, asked, opened);
    if (ok != N || most <= 1 || opened < pool_opens) {
        gw_print_file_tail(a->log, 30);
        gw_print_log_tail(g, 40);
    }
    assert_true(most > 1);
    assert_true(asked >= 1);
    /* Each SSH connection the pool opened over the agent got a WebSocket of its own. */
    if (opened < pool_opens)
        fail_msg("the pool opened %d SSH connections over the agent, but the agent opened only "
                 "%d WebSocket(s) (asked %d time(s))",
                 pool_opens, opened, asked);
    assert_int_equal(ok, N);
    stop_both(g, a);
}

/* ==== 8. SIGTERM with a stream in flight through the agent ==== */

static void test_sigterm_with_stream_in_flight(void **state)
{
    world_t *w = *state;
    const char *env[] = { "SHUTDOWN_GRACE_PERIOD=5000", NULL };
    route_opts_t o = { .host_key = w->fp };
    gw_t *g = start_gateway(w, 0, &o, 0, env);
    gw_agent_t *a = start_agent(w, 0, g, "inetd", AGENT_TOKEN);
    wait_connected(g, a, 1);
    int tries;
    hello_until_ok(g, a, 10000, &tries);

    char *req = NULL;
    size_t len = 0;
    assert_int_equal(mg_test_http_request(&req, &len, "GET", "/stream?chunks=10&interval_ms=100",
                                          GW_AUTH_ALICE, NULL, 0),
                     0);
    int fd = gw_connect(g->port, 2000);
    assert_true(fd >= 0);
    w->raw[0] = fd;
    assert_int_equal(send(fd, req, len, MSG_NOSIGNAL), (ssize_t)len);
    free(req);
    mg_test_http_response_t r;
    mg_test_http_response_init(&r);
    r.keep_body = true;
    double t_term = 0, deadline = mg_test_now_ms() + 10000;
    char buf[4096];
    bool eof = false;
    while (!r.complete && !eof && mg_test_now_ms() < deadline) {
        struct pollfd p = { .fd = fd, .events = POLLIN };
        poll(&p, 1, 20);
        ssize_t n = recv(fd, buf, sizeof(buf), MSG_DONTWAIT);
        if (n > 0)
            assert_int_equal(mg_test_http_response_feed(&r, buf, (size_t)n, NULL), 0);
        else if (n == 0 || (n < 0 && errno != EAGAIN && errno != EINTR))
            eof = true;
        if (t_term == 0 && r.chunks >= 2) {
            assert_int_equal(mg_test_proc_kill(&g->proc, SIGTERM), 0);
            t_term = mg_test_now_ms();
        }
    }
    close(fd);
    w->raw[0] = -1;
    print_message("stream %s with %llu chunks, %.0f ms after SIGTERM\n",
                  r.complete ? "complete" : "cut", (unsigned long long)r.chunks,
                  mg_test_now_ms() - t_term);
    assert_true(t_term != 0);
    if (!r.complete)
        gw_print_log_tail(g, 30);
    assert_true(r.complete);
    assert_int_equal(r.status, 200);
    assert_int_equal(count_lines(&r), 10);
    mg_test_http_response_free(&r);

    gw_assert_exits_cleanly(g, 7000);
    print_message("gateway exited %.0f ms after SIGTERM\n", mg_test_now_ms() - t_term);
    if (!gw_agent_wait_log(a, SHUTDOWN_CLOSE, 1, 3000)) {
        gw_print_file_tail(a->log, 30);
        fail_msg("the agent did not log the gateway's shutdown close (%s)", SHUTDOWN_CLOSE);
    }
    gw_agent_stop(a);
}

/* ==== 9. the header timeout bounds request heads only: not an agent, not a long stream ==== */

static void test_outlives_header_timeout(void **state)
{
    world_t *w = *state;
    const char *env[] = { "MOONGATE_HEADER_TIMEOUT=2", NULL };
    route_opts_t o = { .host_key = w->fp };
    gw_t *g = start_gateway(w, 0, &o, 0, env);
    gw_agent_t *a = start_agent(w, 0, g, "tcp", AGENT_TOKEN);
    wait_connected(g, a, 1);
    int tries;
    hello_until_ok(g, a, 10000, &tries);

    /* An idle agent WebSocket (carrying an idle SSH connection) stays up past 2 s. */
    mg_test_sleep_ms(3500);
    int closes = gw_agent_log_count(a, "closed by gateway");
    int conns = gw_agent_log_count(a, "connected: websocket");
    print_message("after 3.5 s idle: the agent saw %d close(s), opened %d WebSocket(s)\n", closes,
                  conns);
    if (closes != 0)
        gw_print_file_tail(a->log, 20);
    assert_int_equal(closes, 0);
    assert_int_equal(conns, 1);

    /* A 4 s stream through the agent completes (a stream of tokens often runs longer still). */
    char *req = NULL;
    size_t len = 0;
    assert_int_equal(mg_test_http_request(&req, &len, "GET", "/stream?chunks=8&interval_ms=500",
                                          GW_AUTH_ALICE, NULL, 0),
                     0);
    mg_test_http_response_t r;
    mg_test_http_response_init(&r);
    r.keep_body = true;
    double t0 = mg_test_now_ms();
    int rc = gw_exchange(g->port, req, len, &r, 15000, NULL);
    free(req);
    print_message("4 s stream with a 2 s header timeout: rc %d, status %d, %s, %d lines after "
                  "%.0f ms\n",
                  rc, r.status, r.complete ? "complete" : "cut", count_lines(&r),
                  mg_test_now_ms() - t0);
    bool whole = rc == 0 && r.complete && r.status == 200 && count_lines(&r) == 8;
    mg_test_http_response_free(&r);
    if (!whole) {
        gw_print_log_tail(g, 10);
        fail_msg("a stream through the agent was cut at the header timeout (2 s)");
    }
    stop_both(g, a);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_teardown(test_requests_through_agent, test_teardown),
        cmocka_unit_test_teardown(test_agent_killed_and_restarted, test_teardown),
        cmocka_unit_test_teardown(test_gateway_restarted, test_teardown),
        cmocka_unit_test_teardown(test_connection_limit, test_teardown),
        cmocka_unit_test_teardown(test_bad_token_and_bad_upgrades, test_teardown),
        cmocka_unit_test_teardown(test_hostile_frames, test_teardown),
        cmocka_unit_test_teardown(test_wrong_host_key, test_teardown),
        cmocka_unit_test_teardown(test_demand_opens_more_connections, test_teardown),
        cmocka_unit_test_teardown(test_sigterm_with_stream_in_flight, test_teardown),
        cmocka_unit_test_teardown(test_wss_verifies_certificate, test_teardown),
        cmocka_unit_test_teardown(test_outlives_header_timeout, test_teardown),
    };
    /* MG_TEST_FILTER=test_connection_limit (a cmocka pattern, * and ?) runs a few of them. */
    const char *filter = getenv("MG_TEST_FILTER");
    if (filter != NULL && *filter != '\0')
        cmocka_set_test_filter(filter);
    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
