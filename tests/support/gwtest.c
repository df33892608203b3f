/*
 * gwtest: see gwtest.h.
 */
#include "gwtest.h"

void gw_route_fields(char *out, size_t cap, const mg_test_sshd_t *sshd,
                     uint16_t upstream_port)
{
    int n = snprintf(out, cap,
                     "host = \"127.0.0.1\", port = %u, ssh_user = \"%s\", key = \"%s\", "
                     "known_hosts = \"%s\", target_host = \"127.0.0.1\", target_port = %u",
                     (unsigned)sshd->port, sshd->user, sshd->client_key, sshd->known_hosts,
                     (unsigned)upstream_port);
    assert_true(n > 0 && (size_t)n < cap);
}

void gw_write_policy(const char *path, const mg_test_sshd_t *sshd,
                     uint16_t upstream_port)
{
    char route[2048];
    gw_route_fields(route, sizeof(route), sshd, upstream_port);
    char text[4096];
    int n = snprintf(
        text, sizeof(text),
        "local mg = require \"moongate\"\n"
        "return {\n"
        "  authenticate = function(req)\n"
        "    local t = req.headers[\"authorization\"]\n"
        "    if t == \"Bearer alice-token\" then return \"alice\" end\n"
        "    if t == \"Bearer limited-token\" then return \"limited\" end\n"
        "    return nil, 401, \"bad or missing token\"\n"
        "  end,\n"
        "  admit = function(req, user, stats)\n"
        "    if user == \"limited\" then\n"
        "      return false, 429, \"slow down\", { [\"retry-after\"] = \"7\" }\n"
        "    end\n"
        "    return true\n"
        "  end,\n"
        "  route = function(req, user)\n"
        "    return { %s }\n"
        "  end,\n"
        "}\n",
        route);
    assert_true(n > 0 && n < (int)sizeof(text));
    assert_int_equal(mg_test_write_file(path, text, (size_t)n, 0600), 0);
}

int gw_log_count(const gw_t *g, const char *needle)
{
    char *data = NULL;
    if (mg_test_read_file(g->log, &data, NULL) != 0)
        return 0;
    int n = 0;
    for (const char *p = data; (p = strstr(p, needle)) != NULL; p += strlen(needle))
        n++;
    free(data);
    return n;
}

bool gw_wait_log(const gw_t *g, const char *needle, int count, int timeout_ms)
{
    double end = mg_test_now_ms() + timeout_ms;
    while (gw_log_count(g, needle) < count) {
        if (mg_test_now_ms() > end)
            return false;
        mg_test_sleep_ms(20);
    }
    return true;
}

void gw_print_log_tail(const gw_t *g, int lines)
{
    char *data = NULL;
    size_t len = 0;
    if (mg_test_read_file(g->log, &data, &len) != 0)
        return;
    const char *p = data + len;
    int seen = 0;
    while (p > data && seen <= lines)
        if (*--p == '\n')
            seen++;
    print_message("---- %s (tail) ----\n%s\n----\n", g->log, p);
    free(data);
}

const char *gw_program(char *out, size_t cap, const char *name)
{
    const char *bin = getenv("MG_BINARY_DIR");
    snprintf(out, cap, "%s/%s", bin && *bin ? bin : MG_BINARY_DIR, name);
    return out;
}

const char *gw_binary(char *out, size_t cap)
{
    return gw_program(out, cap, "moongate");
}

void gw_env_merge(char **envp, size_t cap, const char *const *extra_env)
{
    size_t n = 0;
    for (char **e = environ; *e && n < cap - cap / 8; e++) {
        bool overridden = false;
        for (const char *const *x = extra_env; x && *x; x++) {
            size_t k = strcspn(*x, "=");
            if (strncmp(*e, *x, k + 1) == 0)
                overridden = true;
        }
        if (!overridden)
            envp[n++] = *e;
    }
    for (const char *const *x = extra_env; x && *x && n + 1 < cap; x++)
        envp[n++] = (char *)*x;
    envp[n] = NULL;
}

void gw_launch(gw_t *g, const char *listen, const char *const *extra_env)
{
    static char *envp[1024];
    gw_env_merge(envp, sizeof(envp) / sizeof(envp[0]), extra_env);

    char bin[MG_TEST_PATH_MAX];
    char *argv[32];
    size_t n = 0;
    for (const char *const *w = g->exec_prefix; w != NULL && *w != NULL && n < 24; w++)
        argv[n++] = (char *)*w;
    argv[n++] = g->program != NULL ? (char *)g->program : (char *)gw_binary(bin, sizeof(bin));
    const char *rest[] = { "-c", g->policy, "-l", listen, NULL };
    for (size_t i = 0; i < sizeof(rest) / sizeof(rest[0]); i++)
        argv[n++] = (char *)rest[i];
    mg_test_spawn_opts_t so = { .stdout_path = g->out, .stderr_path = g->log, .envp = envp,
                                .nofile = g->nofile };
    assert_int_equal(mg_test_proc_spawn(&g->proc, argv, &so), 0);
    g->running = true;

    /* ASan builds start slowly; 15 s is far above what a healthy start takes. */
    char needle[32]; /* "listening on http(s)://127.0.0.1:PORT" */
    snprintf(needle, sizeof(needle), "://%s:", g->ip != NULL ? g->ip : "127.0.0.1");
    double end = mg_test_now_ms() + 15000;
    for (;;) {
        char *data = NULL;
        if (mg_test_read_file(g->log, &data, NULL) == 0) {
            const char *p = strstr(data, "listening on ");
            p = p ? strstr(p, needle) : NULL;
            if (p)
                g->port = (uint16_t)atoi(p + strlen(needle));
            free(data);
        }
        if (g->port != 0)
            break;
        if (mg_test_proc_wait(&g->proc, 0) == 0 || mg_test_now_ms() > end) {
            gw_print_log_tail(g, 40);
            fail_msg("moongate did not start (exit code %d)", mg_test_proc_exit_code(&g->proc));
        }
        mg_test_sleep_ms(20);
    }
    /* Not mg_test_wait_port(): that reads /proc/net/tcp, and lws may listen on an AF_INET6
       socket (see /proc/net/tcp6). A connection proves it listens. */
    for (;;) {
        int fd = gw_connect_ip(g->ip, g->port, 1000);
        if (fd >= 0) {
            close(fd);
            break;
        }
        if (mg_test_proc_wait(&g->proc, 0) == 0 || mg_test_now_ms() > end) {
            gw_print_log_tail(g, 40);
            fail_msg("moongate does not accept connections on port %u", (unsigned)g->port);
        }
        mg_test_sleep_ms(20);
    }
}

void gw_prepare(gw_t *g)
{
    memset(g, 0, sizeof(*g));
    assert_int_equal(mg_test_mkdtemp(g->dir, sizeof(g->dir), "mg-gw"), 0);
    assert_int_equal(mg_test_path_join(g->policy, sizeof(g->policy), g->dir, "policy.lua"), 0);
    assert_int_equal(mg_test_path_join(g->log, sizeof(g->log), g->dir, "moongate.log"), 0);
    assert_int_equal(mg_test_path_join(g->out, sizeof(g->out), g->dir, "stdout.log"), 0);
}

void gw_start(gw_t *g, const mg_test_sshd_t *sshd, uint16_t upstream_port,
              const char *const *extra_env)
{
    gw_prepare(g);
    gw_write_policy(g->policy, sshd, upstream_port);
    gw_launch(g, "127.0.0.1:0", extra_env);
}

void gw_start_policy(gw_t *g, const char *policy_text, uint16_t port,
                     const char *const *extra_env)
{
    gw_prepare(g);
    assert_int_equal(mg_test_write_file(g->policy, policy_text, strlen(policy_text), 0600), 0);
    char listen[32];
    snprintf(listen, sizeof(listen), "127.0.0.1:%u", (unsigned)port);
    gw_launch(g, listen, extra_env);
}

void gw_assert_log_clean(const gw_t *g)
{
    static const char *const bad[] = {
        "ERROR: AddressSanitizer", "ERROR: LeakSanitizer", "runtime error:",
        "WARNING: ThreadSanitizer", "ERROR: UndefinedBehaviorSanitizer",
    };
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++)
        if (gw_log_count(g, bad[i]) > 0) {
            gw_print_log_tail(g, 80);
            fail_msg("moongate's log holds a sanitizer report (\"%s\")", bad[i]);
        }
}

void gw_assert_alive(gw_t *g)
{
    if (mg_test_proc_wait(&g->proc, 0) == 0) {
        g->running = false;
        gw_print_log_tail(g, 60);
        fail_msg("moongate exited unexpectedly (exit code %d)", mg_test_proc_exit_code(&g->proc));
    }
}

void gw_assert_exits_cleanly(gw_t *g, int timeout_ms)
{
    int rc = mg_test_proc_wait(&g->proc, timeout_ms);
    if (rc != 0) {
        mg_test_proc_stop(&g->proc, 1000);
        g->running = false;
        gw_print_log_tail(g, 60);
        fail_msg("moongate did not exit within %d ms", timeout_ms);
    }
    g->running = false;
    int code = mg_test_proc_exit_code(&g->proc);
    if (code != 0) {
        gw_print_log_tail(g, 80);
        fail_msg("moongate exited with %d, expected 0", code);
    }
    gw_assert_log_clean(g);
}

void gw_stop(gw_t *g)
{
    if (!g->running)
        return;
    mg_test_proc_kill(&g->proc, SIGTERM);
    gw_assert_exits_cleanly(g, 15000);
}

void gw_kill(gw_t *g)
{
    if (g->running)
        mg_test_proc_stop(&g->proc, 2000);
    g->running = false;
}

int gw_poll(int fd, short ev, double deadline)
{
    for (;;) {
        int left = (int)(deadline - mg_test_now_ms());
        if (left <= 0)
            return MG_ETIMEDOUT;
        struct pollfd p = { .fd = fd, .events = ev };
        int n = poll(&p, 1, left);
        if (n > 0)
            return 0;
        if (n < 0 && errno != EINTR)
            return MG_ECLOSED;
    }
}

int gw_connect(uint16_t port, int timeout_ms)
{
    return gw_connect_ip(NULL, port, timeout_ms);
}

int gw_connect_ip(const char *ip, uint16_t port, int timeout_ms)
{
    double deadline = mg_test_now_ms() + timeout_ms;
    struct sockaddr_in sa = { .sin_family = AF_INET, .sin_port = htons(port),
                              .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
    if (ip != NULL && inet_pton(AF_INET, ip, &sa.sin_addr) != 1)
        return MG_ECONNECT;
    int one = 1, soerr = 0;
    socklen_t slen = sizeof(soerr);
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return MG_ECONNECT;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    if (connect(fd, (struct sockaddr *)&sa, sizeof(sa)) != 0) {
        if (errno != EINPROGRESS || gw_poll(fd, POLLOUT, deadline) != 0 ||
            getsockopt(fd, SOL_SOCKET, SO_ERROR, &soerr, &slen) != 0 || soerr != 0) {
            close(fd);
            return MG_ECONNECT;
        }
    }
    return fd;
}

int gw_exchange(uint16_t port, const char *request, size_t len,
                mg_test_http_response_t *r, int timeout_ms, gw_arrivals_t *arr)
{
    double t0 = mg_test_now_ms();
    int fd = gw_connect(port, timeout_ms);
    if (fd < 0)
        return fd;
    int left = timeout_ms - (int)(mg_test_now_ms() - t0);
    return gw_exchange_fd(fd, request, len, r, left > 0 ? left : 1, arr);
}

int gw_exchange_fd(int fd, const char *request, size_t len,
                   mg_test_http_response_t *r, int timeout_ms, gw_arrivals_t *arr)
{
    double deadline = mg_test_now_ms() + timeout_ms;
    int err = 0;
    size_t sent = 0;
    bool write_closed = false;
    static _Thread_local char buf[256 * 1024];
    while (!r->complete) {
        short ev = POLLIN;
        if (sent < len && !write_closed)
            ev |= POLLOUT;
        if ((err = gw_poll(fd, ev, deadline)) != 0)
            break;
        if (sent < len && !write_closed) {
            ssize_t w = send(fd, request + sent, len - sent, MSG_NOSIGNAL | MSG_DONTWAIT);
            if (w > 0)
                sent += (size_t)w;
            else if (w < 0 && errno != EAGAIN && errno != EINTR)
                write_closed = true; /* the peer may have answered early: read it */
        }
        ssize_t n = recv(fd, buf, sizeof(buf), MSG_DONTWAIT);
        if (n > 0) {
            uint64_t before = r->body_received;
            if ((err = mg_test_http_response_feed(r, buf, (size_t)n, NULL)) != 0)
                break;
            if (arr && r->body_received > before && arr->n < (int)(sizeof(arr->t) / sizeof(double)))
                arr->t[arr->n++] = mg_test_now_ms();
        } else if (n == 0) {
            err = mg_test_http_response_eof(r);
            break;
        } else if (errno != EAGAIN && errno != EINTR) {
            err = r->status ? mg_test_http_response_eof(r) : MG_ECLOSED;
            break;
        }
    }
    close(fd);
    return err;
}

int gw_request(gw_t *g, const char *method, const char *path, const char *headers,
               const void *body, size_t body_len, mg_test_http_response_t *r,
               int timeout_ms)
{
    char *req = NULL;
    size_t len = 0;
    assert_int_equal(mg_test_http_request(&req, &len, method, path, headers, body, body_len), 0);
    mg_test_http_response_init(r);
    r->keep_body = true;
    double t0 = mg_test_now_ms();
    int rc = gw_connect_ip(g->ip, g->port, timeout_ms);
    if (rc >= 0) {
        int left = timeout_ms - (int)(mg_test_now_ms() - t0);
        rc = gw_exchange_fd(rc, req, len, r, left > 0 ? left : 1, NULL);
    }
    free(req);
    if (rc == 0 && r->status >= 200 && r->status < 300)
        g->ok_responses++;
    return rc;
}

void gw_expect_status(const gw_t *g, int rc, const mg_test_http_response_t *r,
                      int status, const char *what)
{
    if (rc == 0 && r->complete && r->status == status)
        return;
    print_message("%s: rc=%d complete=%d status=%d body=%.*s\n", what, rc, (int)r->complete,
                  r->status, (int)(r->body_len > 400 ? 400 : r->body_len),
                  r->body ? r->body : "");
    gw_print_log_tail(g, 30);
    fail_msg("%s: expected %d, got %d (rc %d)", what, status, r->status, rc);
}

int gw_healthz(const gw_t *g, int timeout_ms)
{
    char *req = NULL;
    size_t len = 0;
    assert_int_equal(mg_test_http_request(&req, &len, "GET", "/healthz", NULL, NULL, 0), 0);
    mg_test_http_response_t r;
    mg_test_http_response_init(&r);
    int rc = gw_exchange(g->port, req, len, &r, timeout_ms, NULL);
    free(req);
    int status = rc == 0 ? r.status : rc;
    mg_test_http_response_free(&r);
    return status;
}

double gw_metric(gw_t *g, const char *sample)
{
    mg_test_http_response_t r;
    int rc = gw_request(g, "GET", "/metrics", NULL, NULL, 0, &r, 5000);
    gw_expect_status(g, rc, &r, 200, "GET /metrics");
    double v = -1;
    char pat[256];
    snprintf(pat, sizeof(pat), "\n%s ", sample);
    const char *p = strstr(r.body, pat);
    if (p != NULL)
        v = atof(p + strlen(pat));
    mg_test_http_response_free(&r);
    return v;
}

void gw_json_ws(gw_json_t *j)
{
    while (j->p < j->end && *j->p != 0 && strchr(" \t\r\n", *j->p))
        j->p++;
}

bool gw_json_lit(gw_json_t *j, const char *lit)
{
    size_t n = strlen(lit);
    if ((size_t)(j->end - j->p) < n || memcmp(j->p, lit, n) != 0)
        return false;
    j->p += n;
    return true;
}

bool gw_json_string(gw_json_t *j)
{
    if (j->p >= j->end || *j->p != '"')
        return false;
    for (j->p++; j->p < j->end; j->p++) {
        unsigned char c = (unsigned char)*j->p;
        if (c == '"') {
            j->p++;
            return true;
        }
        if (c < 0x20)
            return false;
        if (c == '\\') {
            if (++j->p >= j->end || !strchr("\"\\/bfnrtu", *j->p))
                return false;
            if (*j->p == 'u') {
                for (int i = 0; i < 4; i++)
                    if (++j->p >= j->end || !strchr("0123456789abcdefABCDEF", *j->p))
                        return false;
            }
        }
    }
    return false;
}

bool gw_json_number(gw_json_t *j)
{
    const char *s = j->p;
    if (j->p < j->end && *j->p == '-')
        j->p++;
    size_t digits = 0;
    while (j->p < j->end && *j->p != 0 && ((*j->p >= '0' && *j->p <= '9') || strchr(".eE+-", *j->p)))
        j->p++, digits++;
    return digits > 0 && j->p > s;
}

bool gw_json_value(gw_json_t *j)
{
    if (++j->depth > 64)
        return false;
    gw_json_ws(j);
    bool ok = false;
    if (j->p >= j->end) {
        ok = false;
    } else if (*j->p == '{' || *j->p == '[') {
        bool obj = *j->p == '{';
        char close = obj ? '}' : ']';
        j->p++;
        gw_json_ws(j);
        if (j->p < j->end && *j->p == close) {
            j->p++;
            ok = true;
        } else {
            for (;;) {
                if (obj) {
                    gw_json_ws(j);
                    if (!gw_json_string(j))
                        break;
                    gw_json_ws(j);
                    if (j->p >= j->end || *j->p != ':')
                        break;
                    j->p++;
                }
                if (!gw_json_value(j))
                    break;
                gw_json_ws(j);
                if (j->p < j->end && *j->p == ',') {
                    j->p++;
                    continue;
                }
                if (j->p < j->end && *j->p == close) {
                    j->p++;
                    ok = true;
                }
                break;
            }
        }
    } else if (*j->p == '"') {
        ok = gw_json_string(j);
    } else if (*j->p == 't' || *j->p == 'f' || *j->p == 'n') {
        ok = gw_json_lit(j, "true") || gw_json_lit(j, "false") || gw_json_lit(j, "null");
    } else {
        ok = gw_json_number(j);
    }
    j->depth--;
    return ok;
}

bool gw_json_valid(const char *text, size_t len)
{
    gw_json_t j = { text, text + len, 0 };
    if (!gw_json_value(&j))
        return false;
    gw_json_ws(&j);
    return j.p == j.end;
}

bool gw_json_get_string(const char *text, const char *key, char *out, size_t cap)
{
    char pat[128];
    snprintf(pat, sizeof(pat), "\"%s\":\"", key);
    const char *p = strstr(text, pat);
    if (p == NULL)
        return false;
    p += strlen(pat);
    size_t n = strcspn(p, "\"\\");
    if (n >= cap || p[n] != '"')
        return false;
    memcpy(out, p, n);
    out[n] = '\0';
    return true;
}

int gw_write_known_hosts(const mg_test_sshd_t *sshd, const char *host,
                         const char *dir, char *out, size_t cap)
{
    char *pub = NULL;
    if (mg_test_read_file(sshd->host_key_pub, &pub, NULL) != 0)
        return -1;
    char line[1024];
    size_t t = strcspn(pub, " ");
    size_t k = pub[t] ? strcspn(pub + t + 1, " \n") : 0;
    int n = snprintf(line, sizeof(line), "%s %.*s %.*s\n", host, (int)t, pub, (int)k,
                     pub + t + 1);
    free(pub);
    if (k == 0 || n <= 0 || n >= (int)sizeof(line) ||
        mg_test_path_join(out, cap, dir, "known_hosts") != 0)
        return -1;
    return mg_test_write_file(out, line, (size_t)n, 0600);
}

int gw_file_count(const char *path, const char *needle)
{
    char *data = NULL;
    if (mg_test_read_file(path, &data, NULL) != 0)
        return 0;
    int n = 0;
    for (const char *p = data; (p = strstr(p, needle)) != NULL; p += strlen(needle))
        n++;
    free(data);
    return n;
}

void gw_print_file_tail(const char *path, int lines)
{
    char *data = NULL;
    size_t len = 0;
    if (mg_test_read_file(path, &data, &len) != 0)
        return;
    const char *p = data + len;
    int seen = 0;
    while (p > data && seen <= lines)
        if (*--p == '\n')
            seen++;
    print_message("---- %s (tail) ----\n%s\n----\n", path, p);
    free(data);
}

void gw_agent_start(gw_agent_t *a, uint16_t gw_port, const char *token,
                    const char *const *args)
{
    char url[64];
    snprintf(url, sizeof(url), "ws://127.0.0.1:%u/tunnel", (unsigned)gw_port);
    gw_agent_start_url(a, url, token, args);
}

void gw_agent_start_url(gw_agent_t *a, const char *url, const char *token,
                        const char *const *args)
{
    gw_agent_start_prefixed(a, NULL, url, token, args);
}

void gw_agent_start_prefixed(gw_agent_t *a, const char *const *prefix, const char *url,
                             const char *token, const char *const *args)
{
    memset(a, 0, sizeof(*a));
    assert_int_equal(mg_test_mkdtemp(a->dir, sizeof(a->dir), "mg-agent"), 0);
    assert_int_equal(mg_test_path_join(a->log, sizeof(a->log), a->dir, "agent.log"), 0);
    assert_int_equal(mg_test_path_join(a->out, sizeof(a->out), a->dir, "stdout.log"), 0);
    char bin[MG_TEST_PATH_MAX], tok[512];
    gw_program(bin, sizeof(bin), "moongate-agent");
    snprintf(tok, sizeof(tok), "MOONGATE_TOKEN=%s", token);
    const char *env[] = { tok, NULL };
    static char *envp[1024];
    gw_env_merge(envp, sizeof(envp) / sizeof(envp[0]), env);
    char *argv[48];
    size_t n = 0;
    for (const char *const *x = prefix; x && *x && n < 12; x++)
        argv[n++] = (char *)*x;
    argv[n++] = bin;
    argv[n++] = "--gateway";
    argv[n++] = (char *)url;
    for (const char *const *x = args; x && *x && n < 47; x++)
        argv[n++] = (char *)*x;
    argv[n] = NULL;
    mg_test_spawn_opts_t so = { .stdout_path = a->out, .stderr_path = a->log, .envp = envp };
    assert_int_equal(mg_test_proc_spawn(&a->proc, argv, &so), 0);
    a->running = true;
}

int gw_agent_log_count(const gw_agent_t *a, const char *needle)
{
    return gw_file_count(a->log, needle);
}

bool gw_agent_wait_log(const gw_agent_t *a, const char *needle, int count,
                       int timeout_ms)
{
    double end = mg_test_now_ms() + timeout_ms;
    while (gw_agent_log_count(a, needle) < count) {
        if (mg_test_now_ms() > end)
            return false;
        mg_test_sleep_ms(20);
    }
    return true;
}

void gw_agent_assert_log_clean(const gw_agent_t *a)
{
    static const char *const bad[] = {
        "ERROR: AddressSanitizer", "LeakSanitizer", "runtime error:",
        "WARNING: ThreadSanitizer", "ERROR: UndefinedBehaviorSanitizer",
    };
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++)
        if (gw_agent_log_count(a, bad[i]) > 0) {
            gw_print_file_tail(a->log, 80);
            fail_msg("moongate-agent's log holds a sanitizer report (\"%s\")", bad[i]);
        }
}

void gw_agent_stop(gw_agent_t *a)
{
    if (!a->running)
        return;
    mg_test_proc_kill(&a->proc, SIGTERM);
    int rc = mg_test_proc_wait(&a->proc, 5000);
    a->running = false;
    if (rc != 0) {
        mg_test_proc_stop(&a->proc, 1000);
        gw_print_file_tail(a->log, 40);
        fail_msg("moongate-agent did not exit within 5 s of SIGTERM");
    }
    int code = mg_test_proc_exit_code(&a->proc);
    if (code != 0) {
        gw_print_file_tail(a->log, 60);
        fail_msg("moongate-agent exited with %d after SIGTERM, expected 0", code);
    }
    gw_agent_assert_log_clean(a);
}

void gw_agent_kill(gw_agent_t *a)
{
    if (!a->running)
        return;
    mg_test_proc_kill(&a->proc, SIGKILL);
    mg_test_proc_wait(&a->proc, 5000);
    a->running = false;
}

int gw_run(char *const argv[], const char *dir, const char *cwd, char *const *envp,
           int timeout_ms, char **out)
{
    char log[MG_TEST_PATH_MAX + 16];
    snprintf(log, sizeof(log), "%s/run.out", dir);
    mg_test_spawn_opts_t so = { .stdout_path = log, .stderr_path = log, .cwd = cwd,
                                .envp = envp };
    int code = -1;
    if (mg_test_proc_run(argv, &so, timeout_ms, &code) != 0)
        code = -1;
    if (out != NULL && mg_test_read_file(log, out, NULL) != 0)
        *out = strdup("");
    return code;
}

int gw_sh(const char *dir, const char *script, int timeout_ms, char **out)
{
    char *argv[] = { "sh", "-c", (char *)script, NULL };
    return gw_run(argv, dir, "/", NULL, timeout_ms, out);
}
