/*
 * Agents under faults, against the real moongate and the real moongate-agent (its SSH over the
 * WebSocket to a real sshd, channels to mg-upstream):
 *
 *   - the agent SIGKILLed and restarted 10 times under load: requests fail only while it is
 *     gone (502, or a stream cut), each restart serves again within a bound, the gateway counts
 *     exactly the WebSockets the live agent holds (nothing stale kept), and its descriptors and
 *     RSS come back to the baseline;
 *   - the agent cut off silently (SIGSTOP: its TCP connection stays open, nothing answers): its
 *     replacement, with the same agent id (a reconnect after a network cut), is accepted at once
 *     and serves; the stopped one's WebSocket is replaced and closed. In the long run also with
 *     room under the limit, where nothing replaces the stopped session and the gateway's ping
 *     timeout (30 s of quiet, then 45 s for a pong) must find it.
 *
 * The replacement is this program again (`--bridge`), a minimal agent speaking the tunnel
 * protocol (docs/tunnel.md) with an agent id of our choosing, which moongate-agent does not
 * offer: it bridges one WebSocket to sshd's TCP port, answers pings and close frames.
 */
#include "soak.h"

#define AGENT_TOKEN "alice-agent-token"
#define ALICE "Authorization: Bearer tok-alice\r\n"
#define RSS_BOUND_KB 4096

typedef struct world {
    mg_test_sshd_t sshd;
    mg_test_upstream_t up;
    char dir[MG_TEST_PATH_MAX];
    char known_hosts[MG_TEST_PATH_MAX];   /* "alice-laptop ssh-ed25519 AAAA..." */
    char ssh_addr[32];
    gw_t gw;
    gw_agent_t ag;
    mg_test_proc_t bridge;
    char bridge_log[MG_TEST_PATH_MAX];
    soak_load_t load;
} world_t;

/* ---- the bridge: a minimal agent (run as `test_soak_agent --bridge ...`) ---- */

#define BR_BUF (2 * 1024 * 1024)

typedef struct br_buf {
    unsigned char *p;
    size_t len;
} br_buf_t;

static int br_flush(int fd, br_buf_t *b)
{
    while (b->len > 0) {
        ssize_t n = send(fd, b->p, b->len, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (n < 0)
            return errno == EAGAIN || errno == EINTR ? 0 : -1;
        memmove(b->p, b->p + n, b->len - (size_t)n);
        b->len -= (size_t)n;
    }
    return 0;
}

/* Appends a masked frame (client to server frames must be masked). */
static void br_frame(br_buf_t *b, int opcode, const unsigned char *data, size_t len)
{
    unsigned char *h = b->p + b->len;
    size_t hl = 2;
    h[0] = (unsigned char)(0x80 | opcode);
    if (len < 126) {
        h[1] = (unsigned char)(0x80 | len);
    } else if (len < 65536) {
        h[1] = 0x80 | 126;
        h[2] = (unsigned char)(len >> 8);
        h[3] = (unsigned char)len;
        hl = 4;
    } else {
        h[1] = 0x80 | 127;
        for (int i = 0; i < 8; i++)
            h[2 + i] = (unsigned char)((uint64_t)len >> (56 - 8 * i));
        hl = 10;
    }
    unsigned char mask[4] = { (unsigned char)rand(), (unsigned char)rand(), (unsigned char)rand(),
                              (unsigned char)rand() };
    memcpy(h + hl, mask, 4);
    hl += 4;
    for (size_t i = 0; i < len; i++)
        h[hl + i] = data[i] ^ mask[i % 4];
    b->len += hl + len;
}

static void br_log(const char *msg)
{
    fprintf(stderr, "bridge: %s\n", msg);
}

/* argv: --bridge GW_PORT SSH_PORT TOKEN AGENT_ID. Exits when either side ends. */
static int bridge_main(int argc, char **argv)
{
    if (argc != 6)
        return 2;
    uint16_t gw_port = (uint16_t)atoi(argv[2]), ssh_port = (uint16_t)atoi(argv[3]);
    srand((unsigned)getpid());
    int gw = gw_connect(gw_port, 5000);
    if (gw < 0) {
        br_log("cannot connect to the gateway");
        return 1;
    }
    char req[1024];
    int n = snprintf(req, sizeof(req),
                     "GET /tunnel HTTP/1.1\r\nHost: 127.0.0.1:%u\r\nUpgrade: websocket\r\n"
                     "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                     "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: moongate-tunnel.v1\r\n"
                     "Authorization: Bearer %s\r\nX-Moongate-Agent: %s\r\n\r\n",
                     (unsigned)gw_port, argv[4], argv[5]);
    if (send(gw, req, (size_t)n, MSG_NOSIGNAL) != n)
        return 1;
    static unsigned char in[BR_BUF];
    size_t in_len = 0;
    double deadline = mg_test_now_ms() + 5000;
    char *end = NULL;
    while (end == NULL) {
        if (gw_poll(gw, POLLIN, deadline) != 0)
            return 1;
        ssize_t k = recv(gw, in + in_len, 4096, MSG_DONTWAIT);
        if (k == 0 || (k < 0 && errno != EAGAIN && errno != EINTR))
            return 1;
        if (k > 0)
            in_len += (size_t)k;
        in[in_len] = '\0';
        end = strstr((char *)in, "\r\n\r\n");
    }
    if (strncmp((char *)in, "HTTP/1.1 101 ", 13) != 0) {
        fprintf(stderr, "bridge: upgrade refused: %.*s\n", (int)strcspn((char *)in, "\r"), in);
        return 1;
    }
    br_log("upgraded");
    size_t head = (size_t)(end + 4 - (char *)in);
    memmove(in, in + head, in_len - head);
    in_len -= head;

    static unsigned char to_gw_p[BR_BUF + 64 * 1024], to_ssh_p[BR_BUF];
    br_buf_t to_gw = { to_gw_p, 0 }, to_ssh = { to_ssh_p, 0 };
    int ssh = -1;
    bool closing = false;
    for (;;) {
        /* Whole frames from the gateway (unmasked). */
        for (;;) {
            if (in_len < 2)
                break;
            size_t hl = 2;
            uint64_t plen = in[1] & 0x7f;
            if (plen == 126) {
                if (in_len < 4)
                    break;
                plen = (uint64_t)in[2] << 8 | in[3];
                hl = 4;
            } else if (plen == 127) {
                if (in_len < 10)
                    break;
                plen = 0;
                for (int i = 0; i < 8; i++)
                    plen = plen << 8 | in[2 + i];
                hl = 10;
            }
            if (in_len < hl + plen || to_ssh.len + plen > BR_BUF)
                break;
            int opcode = in[0] & 0x0f;
            const unsigned char *p = in + hl;
            if (opcode == 0x2 || opcode == 0x0) {
                if (ssh < 0) {
                    ssh = gw_connect(ssh_port, 5000);
                    if (ssh < 0) {
                        br_log("cannot connect to sshd");
                        return 1;
                    }
                    br_log("ssh connected");
                }
                memcpy(to_ssh.p + to_ssh.len, p, plen);
                to_ssh.len += plen;
            } else if (opcode == 0x9) {
                br_frame(&to_gw, 0xA, p, plen);
                br_log("ping answered");
            } else if (opcode == 0x8) {
                fprintf(stderr, "bridge: close received: code=%d reason=\"%.*s\"\n",
                        plen >= 2 ? p[0] << 8 | p[1] : 1005, plen >= 2 ? (int)plen - 2 : 0,
                        (const char *)p + 2);
                if (!closing)
                    br_frame(&to_gw, 0x8, p, plen >= 2 ? 2 : 0);
                closing = true;
            }
            memmove(in, in + hl + plen, in_len - hl - plen);
            in_len -= hl + plen;
        }
        if (br_flush(gw, &to_gw) != 0 || (ssh >= 0 && br_flush(ssh, &to_ssh) != 0)) {
            br_log("write failed");
            return 0;
        }
        if (closing && to_gw.len == 0) {
            br_log("closed");
            return 0;
        }
        struct pollfd pf[2] = {
            { .fd = gw, .events = (short)((in_len < BR_BUF - 65536 ? POLLIN : 0) |
                                          (to_gw.len ? POLLOUT : 0)) },
            { .fd = ssh, .events = (short)((to_gw.len < BR_BUF - 65536 && !closing ? POLLIN : 0) |
                                           (to_ssh.len ? POLLOUT : 0)) },
        };
        if (poll(pf, ssh >= 0 ? 2 : 1, 1000) < 0 && errno != EINTR)
            return 1;
        if (pf[0].revents & (POLLIN | POLLHUP | POLLERR)) {
            ssize_t k = recv(gw, in + in_len, BR_BUF - in_len, MSG_DONTWAIT);
            if (k == 0 || (k < 0 && errno != EAGAIN && errno != EINTR)) {
                br_log("gateway closed the connection");
                return 0;
            }
            if (k > 0)
                in_len += (size_t)k;
        }
        if (ssh >= 0 && (pf[1].revents & (POLLIN | POLLHUP | POLLERR))) {
            static unsigned char buf[16384];
            ssize_t k = recv(ssh, buf, sizeof(buf), MSG_DONTWAIT);
            if (k == 0 || (k < 0 && errno != EAGAIN && errno != EINTR)) {
                static const unsigned char bye[] = { 0x03, 0xe8, 's', 's', 'h', ' ', 'e', 'n',
                                                     'd', 'e', 'd' };
                br_frame(&to_gw, 0x8, bye, sizeof(bye));
                closing = true;
                br_log("sshd ended the stream");
            } else if (k > 0) {
                br_frame(&to_gw, 0x2, buf, (size_t)k);
            }
        }
    }
}

/* Starts the bridge with agent_id, its log in w->bridge_log. */
static void bridge_start(world_t *w, const char *agent_id)
{
    char self[MG_TEST_PATH_MAX * 2], gp[8], sp[8];
    ssize_t n = readlink("/proc/self/exe", self, sizeof(self) - 1);
    assert_true(n > 0);
    self[n] = '\0';
    snprintf(gp, sizeof(gp), "%u", (unsigned)w->gw.port);
    snprintf(sp, sizeof(sp), "%u", (unsigned)w->sshd.port);
    assert_int_equal(mg_test_path_join(w->bridge_log, sizeof(w->bridge_log), w->dir,
                                       "bridge.log"),
                     0);
    char *argv[] = { self, "--bridge", gp, sp, AGENT_TOKEN, (char *)agent_id, NULL };
    mg_test_spawn_opts_t so = { .stdout_path = w->bridge_log, .stderr_path = w->bridge_log };
    assert_int_equal(mg_test_proc_spawn(&w->bridge, argv, &so), 0);
}

/* ---- setup ---- */

static int group_setup(void **state)
{
    world_t *w = calloc(1, sizeof(*w));
    if (w == NULL || mg_test_sshd_start(&w->sshd, NULL) != 0 ||
        mg_test_upstream_start(&w->up) != 0 ||
        mg_test_mkdtemp(w->dir, sizeof(w->dir), "mg-soak-ag") != 0 ||
        gw_write_known_hosts(&w->sshd, "alice-laptop", w->dir, w->known_hosts,
                             sizeof(w->known_hosts)) != 0)
        return -1;
    snprintf(w->ssh_addr, sizeof(w->ssh_addr), "127.0.0.1:%u", (unsigned)w->sshd.port);
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

static int test_teardown(void **state)
{
    world_t *w = *state;
    soak_load_free(&w->load);
    if (w->bridge.pid > 0)
        mg_test_proc_stop(&w->bridge, 1000);
    gw_agent_kill(&w->ag);
    gw_kill(&w->gw);
    return 0;
}

/* alice (bearer tok-alice) is routed through her agent (token alice-agent-token). */
static void start_gateway(world_t *w, int max_connections, const char *const *env)
{
    char text[4096];
    int n = snprintf(
        text, sizeof(text),
        "return {\n"
        "  authenticate = function(req)\n"
        "    if req.headers[\"authorization\"] == \"Bearer tok-alice\" then return \"alice\" end\n"
        "    return nil, 401, \"bad or missing token\"\n"
        "  end,\n"
        "  agent_auth = function(token, req)\n"
        "    if token == \"" AGENT_TOKEN "\" then return \"alice\" end\n"
        "    return nil, 401, \"unknown agent token\"\n"
        "  end,\n"
        "  limits = function(user)\n"
        "    return { max_connections = %d, max_channels = 10, queue_max = 100,\n"
        "             queue_timeout_ms = 10000, idle_timeout_ms = 300000 }\n"
        "  end,\n"
        "  route = function(req, user)\n"
        "    return { transport = \"agent\", host = \"alice-laptop\", port = 22,\n"
        "             ssh_user = \"%s\", key = \"%s\", known_hosts = \"%s\",\n"
        "             target_host = \"127.0.0.1\", target_port = %u }\n"
        "  end,\n"
        "}\n",
        max_connections, w->sshd.user, w->sshd.client_key, w->known_hosts, (unsigned)w->up.port);
    assert_true(n > 0 && n < (int)sizeof(text));
    gw_start_policy(&w->gw, text, 0, env);
}

static void start_agent(world_t *w)
{
    const char *tcp[] = { "--ssh", w->ssh_addr, NULL };
    gw_agent_start(&w->ag, w->gw.port, AGENT_TOKEN, tcp);
}

/* The agent id the running agent logged ("agent ID: gateway ..."). */
static void agent_id_of(const gw_agent_t *a, char *out, size_t cap)
{
    char *text = NULL;
    assert_int_equal(mg_test_read_file(a->log, &text, NULL), 0);
    const char *p = strstr(text, "agent: agent ");
    assert_non_null(p);
    p += strlen("agent: agent ");
    size_t n = strcspn(p, ":");
    assert_true(n >= 16 && n < cap);
    memcpy(out, p, n);
    out[n] = '\0';
    free(text);
}

/* Sockets of pid connected to 127.0.0.1:port (its WebSockets to the gateway). */
static int sockets_to(pid_t pid, uint16_t port)
{
    int n = 0;
    static const char *const files[] = { "/proc/net/tcp", "/proc/net/tcp6" };
    unsigned long inodes[256];
    size_t ni = 0;
    for (size_t i = 0; i < 2; i++) {
        FILE *f = fopen(files[i], "re");
        char line[512];
        if (f == NULL)
            continue;
        while (fgets(line, sizeof(line), f) && ni < 256) {
            unsigned rport, st;
            unsigned long inode;
            if (sscanf(line, " %*u: %*[0-9A-Fa-f]:%*x %*[0-9A-Fa-f]:%x %x %*s %*s %*s %*s %*s %lu",
                       &rport, &st, &inode) == 3 &&
                rport == port && st == 0x01 && inode != 0)
                inodes[ni++] = inode;
        }
        fclose(f);
    }
    char path[64];
    snprintf(path, sizeof(path), "/proc/%d/fd", (int)pid);
    DIR *d = opendir(path);
    if (d == NULL)
        return -1;
    struct dirent *de;
    while ((de = readdir(d)) != NULL) {
        char link[320], target[64];
        unsigned long inode;
        snprintf(link, sizeof(link), "%s/%s", path, de->d_name);
        ssize_t k = readlink(link, target, sizeof(target) - 1);
        if (k <= 0)
            continue;
        target[k] = '\0';
        if (sscanf(target, "socket:[%lu]", &inode) == 1)
            for (size_t i = 0; i < ni; i++)
                n += inodes[i] == inode;
    }
    closedir(d);
    return n;
}

typedef struct agents_match {
    world_t *w;
    soak_gw_stats_t st;
    int held;
} agents_match_t;

/* The gateway counts exactly the WebSockets the live agent holds, and at least one. */
static bool agents_match(void *arg)
{
    agents_match_t *m = arg;
    m->held = sockets_to(m->w->ag.proc.pid, m->w->gw.port);
    return soak_stats(&m->w->gw, &m->st) == 0 && m->held >= 1 && m->st.agents == m->held;
}

/* ==== 1. killed and restarted under load ==== */

static void test_agent_killed_and_restarted(void **state)
{
    world_t *w = *state;
    gw_t *g = &w->gw;
    const int cycles = soak_pick(10, 6, 10, 10);
    const int recover_bound_ms = SOAK_SANITIZED ? 8000 : 5000;
    print_message("mode %s: the agent killed and restarted %d times under load\n", soak_mode(),
                  cycles);
    start_gateway(w, 3, NULL);
    start_agent(w);

    static const soak_req_t reqs[] = {
        { .path = "/hello", .headers = ALICE, .body_equals = "hello\n" },
        { .path = "/stream?chunks=8&interval_ms=25", .headers = ALICE, .lines = 8 },
    };
    soak_load_t *l = &w->load;
    *l = (soak_load_t){ .port = g->port, .reqs = reqs, .nreqs = 2, .nthreads = 4,
                        .timeout_ms = 30000, .pause_ms = 5 };
    /* Warm-up, then the gateway at rest: the baseline. */
    soak_load_start(l);
    assert_true(soak_load_wait_ok(l, 60, 30000));
    soak_load_stop(l);
    soak_load_free(l);
    agents_match_t m = { .w = w };
    if (!soak_wait(agents_match, &m, 10000, 50))
        fail_msg("the gateway counts %ld agent WebSockets, the agent holds %d", m.st.agents,
                 m.held);
    soak_figures_t before = soak_wait_quiet_ex(g, -1, -1, 0, 10000, NULL);

    double t_kill[16], t_start[16], t_ok[16];
    soak_load_start(l);
    for (int i = 0; i < cycles; i++) {
        assert_true(soak_load_wait_ok(l, 20, 30000));
        t_kill[i] = mg_test_now_ms();
        gw_agent_kill(&w->ag);
        gw_agent_assert_log_clean(&w->ag);
        t_start[i] = mg_test_now_ms();
        start_agent(w);
        if (!soak_load_wait_ok(l, 1, recover_bound_ms + 10000)) {
            gw_print_file_tail(w->ag.log, 20);
            gw_print_log_tail(g, 30);
            fail_msg("cycle %d: no success after the restart", i + 1);
        }
        t_ok[i] = mg_test_now_ms();
        assert_true(soak_load_wait_ok(l, 2 * (uint64_t)l->nthreads, 30000));
    }
    soak_load_stop(l);
    double t_end = mg_test_now_ms();
    soak_tally_t all = soak_load_tally(l);
    soak_tally_print("with the agent killed and restarted", &all);

    /* When each restarted agent first served, from the events: the earliest end of a success
       begun after the restart (the success counted while waiting may have been one the old
       agent served, its count landing late on a busy machine). */
    for (int i = 0; i < cycles; i++) {
        double next = i + 1 < cycles ? t_kill[i + 1] : t_end, first = next;
        for (int k = 0; k < l->nthreads; k++)
            for (size_t e = 0; e < l->t[k].nev; e++) {
                const soak_event_t *ev = &l->t[k].ev[e];
                if (ev->outcome == 200 && ev->start >= t_start[i] && ev->start < next &&
                    ev->end < first)
                    first = ev->end;
            }
        t_ok[i] = first;
    }

    /* Failures only for requests under way at a kill, or begun after a kill and before the
       restarted agent served: none that began and ended in a window in which the agent was up
       and serving (before the first kill, or from t_ok[i] to the next kill). */
    int unexplained = 0;
    double worst = 0;
    for (int i = 0; i < cycles; i++) {
        double rec = t_ok[i] - t_start[i];
        worst = rec > worst ? rec : worst;
    }
    for (int k = 0; k < l->nthreads; k++)
        for (size_t e = 0; e < l->t[k].nev; e++) {
            const soak_event_t *ev = &l->t[k].ev[e];
            if (ev->outcome == 200)
                continue;
            const char *why = NULL;
            if (ev->outcome != 502 && ev->outcome != SOAK_CUT)
                why = "neither 502 nor a cut";
            else if (ev->end < t_kill[0])
                why = "before the first kill";
            for (int i = 0; i < cycles && why == NULL; i++) {
                double next = i + 1 < cycles ? t_kill[i + 1] : t_end;
                if (ev->start >= t_ok[i] && ev->end < next)
                    why = "after the restart had served, before the next kill";
            }
            if (why == NULL)
                continue;
            char b[16];
            print_message("thread %d: %s from %+.0f to %+.0f ms (times from the first kill): %s\n",
                          k, soak_outcome_name(ev->outcome, b, sizeof(b)), ev->start - t_kill[0],
                          ev->end - t_kill[0], why);
            unexplained++;
        }
    print_message("%d restarts: served again at most %.0f ms after a restart (bound %d ms)\n",
                  cycles, worst, recover_bound_ms);
    if (unexplained)
        soak_load_print_failures(l, t_kill[0], 40);
    assert_int_equal(unexplained, 0);
    assert_true(worst <= recover_bound_ms);
    soak_load_free(l);

    /* Nothing stale: the gateway holds the live agent's WebSockets and no more. */
    if (!soak_wait(agents_match, &m, 10000, 50))
        fail_msg("after the restarts the gateway counts %ld agent WebSockets, the agent holds %d",
                 m.st.agents, m.held);
    soak_gw_stats_t st;
    soak_figures_t after = soak_wait_quiet_ex(g, before.fds, -1, 0, 10000, &st);
    print_message("at rest: %ld agent WebSockets (the agent holds %d), %ld pool connections, %ld "
                  "SSH connections opened and %ld closed in all\n",
                  st.agents, m.held, st.total_connections, st.ssh_opened, st.ssh_closed);
    assert_true(st.total_connections <= st.agents);
    soak_assert_flat(g, "gateway after the restarts", before, after, RSS_BOUND_KB);
    gw_agent_stop(&w->ag);
    gw_stop(g);
}

/* ==== 2. cut off silently; the same agent id comes back ==== */

typedef struct log_has {
    const char *path;
    const char *needle;
    int count;
} log_has_t;

static bool log_has(void *arg)
{
    log_has_t *h = arg;
    return gw_file_count(h->path, h->needle) >= h->count;
}

/*
 * One run: alice's limit is max_connections; the agent serves, is stopped, and the bridge
 * connects with its id. replaced: whether the gateway must replace the stopped session (at
 * the limit) or find it dead by its ping timeout (under it).
 */
static void cut_off_silently(world_t *w, int max_connections)
{
    gw_t *g = &w->gw;
    bool at_limit = max_connections == 1;
    /* Under the limit the bridge is one more WebSocket of the same agent (an agent opens several
       with one id), so nothing replaces the stopped session: the pool uses it until the ping
       timeout hangs it up (45 s of silence), then opens the next connection over the bridge. */
    const int takeover_bound_ms = (SOAK_SANITIZED ? 8000 : 5000) + (at_limit ? 0 : 55000);
    start_gateway(w, max_connections, NULL);
    start_agent(w);
    static const soak_req_t reqs[] = {
        { .path = "/hello", .headers = ALICE, .body_equals = "hello\n" },
    };
    soak_load_t *l = &w->load;
    *l = (soak_load_t){ .port = g->port, .reqs = reqs, .nreqs = 1, .nthreads = 3,
                        .timeout_ms = 120000, .pause_ms = 20 };
    soak_load_start(l);
    assert_true(soak_load_wait_ok(l, 30, 30000));
    char id[80];
    agent_id_of(&w->ag, id, sizeof(id));

    soak_follow_t log;
    soak_follow_init(&log, g->log);
    double t_stop = mg_test_now_ms();
    assert_int_equal(kill(w->ag.proc.pid, SIGSTOP), 0);
    bridge_start(w, id);
    log_has_t up = { w->bridge_log, "bridge: upgraded", 1 };
    if (!soak_wait(log_has, &up, 5000, 5)) {
        gw_print_file_tail(w->bridge_log, 20);
        gw_print_log_tail(g, 20);
        fail_msg("the replacement was not accepted within 5 s");
    }
    double t_up = mg_test_now_ms();
    char joined[160];
    snprintf(joined, sizeof(joined), "agent=%s connected (", id);
    assert_true(soak_follow_wait(&log, joined, 1, 5000));
    if (at_limit) {
        char replacing[160];
        snprintf(replacing, sizeof(replacing), "agent=%s reconnected; replacing its oldest", id);
        assert_true(gw_log_count(g, replacing) >= 1);
    }
    /* The replacement carries requests: the bridge's sshd stream opened, responses flow. */
    log_has_t ssh = { w->bridge_log, "bridge: ssh connected", 1 };
    bool carried = soak_wait(log_has, &ssh, takeover_bound_ms, 10);
    bool served = carried && soak_load_wait_ok(l, 10, takeover_bound_ms);
    double t_served = mg_test_now_ms();
    /* The stopped agent's WebSocket ends: replaced (and closed after the close frame's 2 s),
       or found silent by the ping timeout. */
    char gone[160];
    snprintf(gone, sizeof(gone), "agent=%s disconnected", id);
    int wait_gone_ms = at_limit ? 5000 : 30000 + 45000 + 10000;
    bool dead_found = soak_follow_wait(&log, gone, 1, wait_gone_ms);
    double t_gone = mg_test_now_ms();
    int silent = gw_log_count(g, "silent for 45000 ms; hanging up");
    assert_true(soak_load_wait_ok(l, 10, 30000));
    soak_load_stop(l);
    double t_end = mg_test_now_ms();

    soak_tally_t all = soak_load_tally(l);
    soak_tally_t after = soak_load_tally_between(l, t_served, t_end);
    char what[96];
    snprintf(what, sizeof(what), "limit %d: with the agent stopped", max_connections);
    soak_tally_print(what, &all);
    soak_tally_print("after the replacement served", &after);
    print_message("limit %d: the replacement was accepted %.0f ms after the stop, %s %.0f ms "
                  "after it was accepted; the stopped session %s %.0f ms after the stop (%s)\n",
                  max_connections, t_up - t_stop, served ? "served" : "DID NOT SERVE",
                  t_served - t_up, dead_found ? "ended" : "WAS NOT ENDED", t_gone - t_stop,
                  silent ? "ping timeout" : "replaced");
    if (!served || !dead_found || soak_tally_failed(&after)) {
        gw_print_file_tail(w->bridge_log, 20);
        gw_print_log_tail(g, 30);
        soak_load_print_failures(l, t_stop, 20);
    }
    assert_true(served);
    assert_true(dead_found);
    assert_int_equal(soak_tally_failed(&after), 0);
    if (!at_limit)
        assert_true(silent >= 1);
    soak_load_free(l);
    gw_agent_kill(&w->ag);
    assert_int_equal(mg_test_proc_stop(&w->bridge, 3000), 0);
    gw_stop(g);
}

static void test_agent_cut_off_silently(void **state)
{
    world_t *w = *state;
    print_message("mode %s: the agent stopped, its replacement with the same id%s\n",
                  soak_mode(), soak_long() ? "; at the limit, then under it" : ", at the limit");
    cut_off_silently(w, 1);
    if (soak_long())
        cut_off_silently(w, 2);
}

int main(int argc, char **argv)
{
    if (argc > 1 && strcmp(argv[1], "--bridge") == 0)
        return bridge_main(argc, argv);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_teardown(test_agent_killed_and_restarted, test_teardown),
        cmocka_unit_test_teardown(test_agent_cut_off_silently, test_teardown),
    };
    const char *filter = getenv("MG_TEST_FILTER");
    if (filter != NULL && *filter != '\0')
        cmocka_set_test_filter(filter);
    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
