/*
 * Several gateway nodes behind a real HAProxy (Debian's package, started here on loopback), as
 * docs/scale-out.md lays them out: a node drained with SIGTERM under constant load fails no
 * request and cuts no stream, because it first goes lame duck (/healthz 503 while it still
 * serves, MOONGATE_DRAIN_DELAY) and HAProxy's health checks move the traffic before it stops
 * accepting; HAProxy here does not retry, so nothing hides a refused connection. And an
 * agent given both nodes keeps its tunnels to each: its user is served through either, a node
 * killed with SIGKILL costs only that node's tunnels, and the agent is back on it once it
 * returns.
 */
#include "gwtest.h"
#include "haproxy.h"

#include <pthread.h>
#include <stdatomic.h>

typedef struct world {
    mg_test_sshd_t sshd;
    mg_test_upstream_t up;
    char dir[MG_TEST_PATH_MAX];
    char known_hosts[MG_TEST_PATH_MAX];   /* the sshd's host key under the name alice-laptop */
    char inetd[3 * MG_TEST_PATH_MAX];     /* the agent's --sshd-inetd */
} world_t;

static int group_setup(void **state)
{
    world_t *w = calloc(1, sizeof(*w));
    if (w == NULL || mg_test_sshd_start(&w->sshd, NULL) != 0 ||
        mg_test_upstream_start(&w->up) != 0 ||
        mg_test_mkdtemp(w->dir, sizeof(w->dir), "mg-scale") != 0 ||
        gw_write_known_hosts(&w->sshd, "alice-laptop", w->dir, w->known_hosts,
                             sizeof(w->known_hosts)) != 0 ||
        mg_test_sshd_inetd_command(&w->sshd, w->inetd, sizeof(w->inetd)) != 0)
        return -1;
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

/* ---- load through the balancer ---- */

typedef struct load {
    uint16_t port;
    atomic_bool stop;
    atomic_int ok, failed, streams;
    pthread_mutex_t lock;
    char first_failure[512];
} load_t;

static const char hello[] = "GET /hello HTTP/1.1\r\nHost: gw\r\n" GW_AUTH_ALICE "\r\n";
static const char stream[] = "GET /stream?chunks=5&interval_ms=40&size=8 HTTP/1.1\r\nHost: gw\r\n"
                             GW_AUTH_ALICE "\r\n";

static void *load_thread(void *arg)
{
    load_t *l = arg;
    for (unsigned i = 0; !atomic_load(&l->stop); i++) {
        bool is_stream = i % 3 == 2;
        const char *req = is_stream ? stream : hello;
        mg_test_http_response_t r;
        mg_test_http_response_init(&r);
        r.keep_body = true;
        int rc = gw_exchange(l->port, req, strlen(req), &r, 10000, NULL);
        /* A stream is 5 lines; /hello is "hello\n". */
        int lines = 0;
        for (size_t k = 0; k < r.body_len; k++)
            lines += r.body[k] == '\n';
        bool good = rc == 0 && r.complete && r.status == 200 &&
                    (is_stream ? lines == 5 : r.body_len == 6);
        if (good) {
            atomic_fetch_add(&l->ok, 1);
            if (is_stream)
                atomic_fetch_add(&l->streams, 1);
        } else {
            atomic_fetch_add(&l->failed, 1);
            pthread_mutex_lock(&l->lock);
            if (l->first_failure[0] == '\0')
                snprintf(l->first_failure, sizeof(l->first_failure),
                         "%s: rc %d status %d complete %d, %zu body bytes: %.*s",
                         is_stream ? "stream" : "hello", rc, r.status, r.complete, r.body_len,
                         (int)(r.body_len < 200 ? r.body_len : 200), r.body ? r.body : "");
            pthread_mutex_unlock(&l->lock);
        }
        mg_test_http_response_free(&r);
    }
    return NULL;
}

#define THREADS 4

static void test_drain_under_load_fails_nothing(void **state)
{
    world_t *w = *state;
    gw_t nodes[2];
    const char *env[] = { "MOONGATE_DRAIN_DELAY=1000", NULL };
    for (int i = 0; i < 2; i++)
        gw_start(&nodes[i], &w->sshd, w->up.port, env);
    uint16_t ports[2] = { nodes[0].port, nodes[1].port };
    mg_test_haproxy_t hp;
    /* No retries in the balancer: the nodes alone must lose nothing. */
    int rc = mg_test_haproxy_start(&hp, ports, 2, false);
    if (rc != 0)
        fail_msg("haproxy did not start (%d; scripts/install-deps.sh installs it)", rc);

    load_t l = { .port = hp.port };
    pthread_mutex_init(&l.lock, NULL);
    pthread_t t[THREADS];
    for (int i = 0; i < THREADS; i++)
        assert_int_equal(pthread_create(&t[i], NULL, load_thread, &l), 0);
    mg_test_sleep_ms(800);
    int before = atomic_load(&l.ok);
    int node0_before = gw_log_count(&nodes[0], "GET /hello -> 200");

    /* Drain node 1 under the load, and wait for it to be gone. */
    double t0 = mg_test_now_ms();
    assert_int_equal(mg_test_proc_kill(&nodes[0].proc, SIGTERM), 0);
    gw_assert_exits_cleanly(&nodes[0], 20000);
    double gone_ms = mg_test_now_ms() - t0;
    mg_test_sleep_ms(500);
    atomic_store(&l.stop, true);
    for (int i = 0; i < THREADS; i++)
        pthread_join(t[i], NULL);

    int ok = atomic_load(&l.ok), failed = atomic_load(&l.failed);
    print_message("through HAProxy: %d ok (%d streams), %d failed; node 1 served %d before the "
                  "drain and was gone %.0f ms after SIGTERM\n",
                  ok, atomic_load(&l.streams), failed, node0_before, gone_ms);
    if (failed != 0)
        fail_msg("%d requests failed; the first: %s", failed, l.first_failure);
    assert_true(before > 20 && ok > before + 20);
    assert_true(node0_before > 0 && gw_log_count(&nodes[1], "GET /hello -> 200") > 0);
    /* It kept serving through the delay, then drained. */
    assert_true(gone_ms >= 1000);
    assert_int_equal(gw_log_count(&nodes[0], "requests are still served until then"), 1);
    mg_test_haproxy_stop(&hp);
    gw_stop(&nodes[1]);
    pthread_mutex_destroy(&l.lock);
}

/* ---- an agent on every node ---- */

/* alice is routed through her agent; the agent authenticates with AGENT_TOKEN. */
#define AGENT_TOKEN "alice-agent-token"

static void agent_policy(const world_t *w, char *out, size_t cap)
{
    int n = snprintf(out, cap,
        "return {\n"
        "  authenticate = function(req)\n"
        "    if req.headers['authorization'] == 'Bearer alice-token' then return 'alice' end\n"
        "    return nil, 401, 'bad or missing token'\n"
        "  end,\n"
        "  agent_auth = function(token, req)\n"
        "    if token == '" AGENT_TOKEN "' then return 'alice' end\n"
        "    return nil, 401, 'unknown agent token'\n"
        "  end,\n"
        "  route = function(req, user)\n"
        "    return { transport = 'agent', host = 'alice-laptop', port = 22, ssh_user = '%s',\n"
        "             key = '%s', known_hosts = '%s', target_host = '127.0.0.1',\n"
        "             target_port = %u }\n"
        "  end,\n"
        "}\n",
        w->sshd.user, w->sshd.client_key, w->known_hosts, (unsigned)w->up.port);
    assert_true(n > 0 && (size_t)n < cap);
}

static int hello_via(gw_t *g)
{
    mg_test_http_response_t r;
    int rc = gw_request(g, "GET", "/hello", GW_AUTH_ALICE, NULL, 0, &r, 10000);
    int status = rc == 0 ? r.status : rc;
    mg_test_http_response_free(&r);
    return status;
}

static void test_agent_on_every_node(void **state)
{
    world_t *w = *state;
    char policy[4096];
    agent_policy(w, policy, sizeof(policy));
    gw_t nodes[2];
    for (int i = 0; i < 2; i++)
        gw_start_policy(&nodes[i], policy, 0, NULL);
    char url[2][128];
    for (int i = 0; i < 2; i++)
        snprintf(url[i], sizeof(url[i]), "ws://127.0.0.1:%u/tunnel", (unsigned)nodes[i].port);
    gw_agent_t ag;
    const char *args[] = { "--gateway", url[1], "--sshd-inetd", w->inetd, NULL };
    gw_agent_start_url(&ag, url[0], AGENT_TOKEN, args);
    for (int i = 0; i < 2; i++) {
        char open_to[160];
        snprintf(open_to, sizeof(open_to), "open to %.128s (", url[i]);
        if (!gw_agent_wait_log(&ag, open_to, 1, 10000))
            fail_msg("the agent did not reach node %d", i + 1);
    }
    assert_int_equal(hello_via(&nodes[0]), 200);
    assert_int_equal(hello_via(&nodes[1]), 200);

    /* Node 1 dies without a word: node 2 still serves alice through its own tunnel. */
    uint16_t port0 = nodes[0].port;
    gw_kill(&nodes[0]);
    for (int i = 0; i < 5; i++)
        assert_int_equal(hello_via(&nodes[1]), 200);

    /* Node 1 comes back on its port: the agent finds it within its backoff (1 s, then 2). */
    char needle[160];
    snprintf(needle, sizeof(needle), "open to %.128s (", url[0]);
    int before = gw_agent_log_count(&ag, needle);
    gw_start_policy(&nodes[0], policy, port0, NULL);
    double t0 = mg_test_now_ms();
    if (!gw_agent_wait_log(&ag, needle, before + 1, 10000))
        fail_msg("the agent did not come back to the restarted node");
    print_message("back on the restarted node %.0f ms after it listened\n", mg_test_now_ms() - t0);
    assert_int_equal(hello_via(&nodes[0]), 200);
    assert_int_equal(hello_via(&nodes[1]), 200);
    gw_agent_stop(&ag);
    gw_agent_assert_log_clean(&ag);
    for (int i = 0; i < 2; i++)
        gw_stop(&nodes[i]);
}


/* ---- one name, several addresses ---- */

#define NODES_NAME "mg-nodes.test"

/* The agent's private /etc/hosts: NAME on each of ips. Rewritten in place (same inode), so the
   bind mount over /etc/hosts in the agent's mount namespace shows each version. */
static void write_hosts(const char *path, const char *const *ips)
{
    char text[512];
    int o = snprintf(text, sizeof(text), "127.0.0.1 localhost\n");
    for (; *ips != NULL; ips++)
        o += snprintf(text + o, sizeof(text) - (size_t)o, "%s " NODES_NAME "\n", *ips);
    assert_int_equal(mg_test_write_file(path, text, strlen(text), 0644), 0);
}

typedef struct slow_stream {
    gw_t *g;
    atomic_bool done;
    int status;
    int lines;
    bool complete;
} slow_stream_t;

/* 16 lines, 250 ms apart: in flight through the node while its address leaves DNS. */
static void *slow_stream_thread(void *arg)
{
    slow_stream_t *s = arg;
    mg_test_http_response_t r;
    int rc = gw_request(s->g, "GET", "/stream?chunks=16&interval_ms=250&size=8", GW_AUTH_ALICE,
                        NULL, 0, &r, 20000);
    s->status = rc == 0 ? r.status : rc;
    s->complete = rc == 0 && r.complete;
    for (size_t k = 0; k < r.body_len; k++)
        s->lines += r.body[k] == '\n';
    mg_test_http_response_free(&r);
    atomic_store(&s->done, true);
    return NULL;
}

/* Waits until every agent WebSocket node g saw has gone. */
static bool wait_no_tunnel(gw_t *g, int timeout_ms)
{
    double end = mg_test_now_ms() + timeout_ms;
    while (gw_log_count(g, "agent=") == 0 ||
           gw_log_count(g, " disconnected") < gw_log_count(g, " connected (")) {
        if (mg_test_now_ms() > end)
            return false;
        mg_test_sleep_ms(50);
    }
    return true;
}

/*
 * --gateway ws://NAME:PORT/tunnel where NAME resolves to two nodes (127.0.0.1 and 127.0.0.2,
 * same port): the agent keeps tunnels to both. The name then loses 127.0.0.2: after the next
 * resolve that node's tunnels close (a stream in flight through it first finishes), one log
 * line says so, and the other node keeps serving. The address comes back: so does the node.
 * The name stops resolving altogether: both nodes keep their tunnels.
 * The name lives in a private /etc/hosts (and nsswitch.conf: files only, no DNS),
 * bind-mounted in the agent's own mount namespace (unshare -m), so the machine's are never
 * touched.
 */
static void test_agent_on_every_address_of_a_name(void **state)
{
    world_t *w = *state;
    if (geteuid() != 0 || gw_sh(w->dir, "unshare -m true", 5000, NULL) != 0 ||
        access("/etc/hosts", F_OK) != 0 || access("/etc/nsswitch.conf", F_OK) != 0) {
        print_message("skipped: needs root, unshare -m, and /etc/hosts and /etc/nsswitch.conf "
                      "to mount private ones over for the agent\n");
        skip();
    }
    char hosts[MG_TEST_PATH_MAX], nss[MG_TEST_PATH_MAX];
    assert_int_equal(mg_test_path_join(hosts, sizeof(hosts), w->dir, "hosts"), 0);
    /* Names from that file only: a name missing from it must not become a DNS query. */
    assert_int_equal(mg_test_path_join(nss, sizeof(nss), w->dir, "nsswitch.conf"), 0);
    static const char files_only[] = "hosts: files\n";
    assert_int_equal(mg_test_write_file(nss, files_only, strlen(files_only), 0644), 0);
    const char *both[] = { "127.0.0.2", "127.0.0.1", NULL }, *one[] = { "127.0.0.1", NULL };
    write_hosts(hosts, both);

    char policy[4096];
    agent_policy(w, policy, sizeof(policy));
    gw_t nodes[2];
    gw_start_policy(&nodes[0], policy, 0, NULL);
    gw_prepare(&nodes[1]);
    assert_int_equal(mg_test_write_file(nodes[1].policy, policy, strlen(policy), 0600), 0);
    nodes[1].ip = "127.0.0.2";
    char listen[32];
    snprintf(listen, sizeof(listen), "127.0.0.2:%u", (unsigned)nodes[0].port);
    gw_launch(&nodes[1], listen, NULL);
    assert_int_equal(nodes[1].port, nodes[0].port);

    char url[128], mount[3 * MG_TEST_PATH_MAX], at[2][200], removed[256];
    snprintf(url, sizeof(url), "ws://" NODES_NAME ":%u/tunnel", (unsigned)nodes[0].port);
    snprintf(mount, sizeof(mount), "mount --bind '%s' /etc/hosts && "
             "mount --bind '%s' /etc/nsswitch.conf && exec \"$@\"", hosts, nss);
    for (int i = 0; i < 2; i++)
        snprintf(at[i], sizeof(at[i]), "open to %s at 127.0.0.%d (", url, i + 1);
    snprintf(removed, sizeof(removed), "gateway node removed: %s at 127.0.0.2 ", url);
    const char *prefix[] = { "unshare", "-m", "--", "sh", "-c", mount, "sh", NULL };
    const char *args[] = { "--sshd-inetd", w->inetd, "--resolve-interval", "1", NULL };
    gw_agent_t ag;
    gw_agent_start_prefixed(&ag, prefix, url, AGENT_TOKEN, args);
    for (int i = 0; i < 2; i++)
        if (!gw_agent_wait_log(&ag, at[i], 1, 15000)) {
            gw_print_file_tail(ag.log, 40);
            fail_msg("the agent did not reach the node at 127.0.0.%d", i + 1);
        }
    /* Each node is the right one: its own log shows the agent and the request. */
    for (int i = 0; i < 2; i++) {
        assert_int_equal(hello_via(&nodes[i]), 200);
        assert_true(gw_log_count(&nodes[i], " connected (") >= 1);
    }
    for (int i = 0; i < 2; i++) {
        /* (The access line may follow the response by a moment.) */
        assert_true(gw_wait_log(&nodes[i], "GET /hello -> 200", 1, 5000));
        assert_int_equal(gw_log_count(&nodes[i], "GET /hello -> 200"), 1);
    }
    assert_int_equal(gw_agent_log_count(&ag, "gateway node added: "), 2);

    /* 127.0.0.2 leaves the name while a stream runs through it: the stream finishes. */
    int opened = gw_agent_log_count(&ag, at[1]);
    slow_stream_t s = { .g = &nodes[1] };
    pthread_t t;
    assert_int_equal(pthread_create(&t, NULL, slow_stream_thread, &s), 0);
    mg_test_sleep_ms(500);
    write_hosts(hosts, one);
    double t0 = mg_test_now_ms();
    if (!gw_agent_wait_log(&ag, removed, 1, 10000))
        fail_msg("the agent did not notice 127.0.0.2 leaving the name");
    double noticed_ms = mg_test_now_ms() - t0;
    bool was_in_flight = !atomic_load(&s.done);
    pthread_join(t, NULL);
    assert_int_equal(s.status, 200);
    assert_true(s.complete);
    assert_int_equal(s.lines, 16);
    if (!was_in_flight)
        fail_msg("the stream ended before the agent noticed (%.0f ms): nothing was tested in "
                 "flight", noticed_ms);
    /* Then its tunnels close, and only its own. */
    if (!wait_no_tunnel(&nodes[1], 45000))
        fail_msg("the tunnels to the retired node did not close");
    double gone_ms = mg_test_now_ms() - t0;
    assert_int_not_equal(hello_via(&nodes[1]), 200);
    assert_int_equal(hello_via(&nodes[0]), 200);
    /* One line for the change, not one per resolve (the name resolved again since). */
    mg_test_sleep_ms(2500);
    assert_int_equal(gw_agent_log_count(&ag, "gateway node removed: "), 1);
    assert_int_equal(gw_agent_log_count(&ag, "gateway node added: "), 2);
    assert_int_equal(gw_agent_log_count(&ag, at[1]), opened); /* not reconnected to it */
    print_message("127.0.0.2 left the name: noticed after %.0f ms, its tunnels gone after "
                  "%.0f ms\n", noticed_ms, gone_ms);

    /* It comes back: a node again, with a tunnel that serves. */
    write_hosts(hosts, both);
    if (!gw_agent_wait_log(&ag, at[1], opened + 1, 10000))
        fail_msg("the agent did not return to 127.0.0.2 when it was back in the name");
    assert_int_equal(gw_agent_log_count(&ag, "gateway node added: "), 3);
    assert_int_equal(hello_via(&nodes[1]), 200);
    assert_int_equal(hello_via(&nodes[0]), 200);

    /* The name stops resolving: a failed lookup says nothing about the nodes, both keep
       their tunnels, one line says so however many lookups fail, one when it works again. */
    const char *none[] = { NULL };
    write_hosts(hosts, none);
    assert_true(gw_agent_wait_log(&ag, "cannot resolve " NODES_NAME, 1, 10000));
    mg_test_sleep_ms(2500);
    assert_int_equal(gw_agent_log_count(&ag, "cannot resolve " NODES_NAME), 1);
    assert_int_equal(gw_agent_log_count(&ag, "gateway node removed: "), 1);
    assert_int_equal(hello_via(&nodes[1]), 200);
    assert_int_equal(hello_via(&nodes[0]), 200);
    write_hosts(hosts, both);
    assert_true(gw_agent_wait_log(&ag, NODES_NAME " resolves again", 1, 10000));
    assert_int_equal(gw_agent_log_count(&ag, "gateway node added: "), 3);
    gw_agent_stop(&ag);
    gw_agent_assert_log_clean(&ag);
    for (int i = 0; i < 2; i++)
        gw_stop(&nodes[i]);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_drain_under_load_fails_nothing),
        cmocka_unit_test(test_agent_on_every_node),
        cmocka_unit_test(test_agent_on_every_address_of_a_name),
    };
    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
