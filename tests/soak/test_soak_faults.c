/*
 * Faults mid-load, against the real moongate with a real sshd and mg-upstream:
 *
 *   - one of sshd's per-connection children SIGKILLed: only the requests on that SSH
 *     connection fail (at most its channels), every thread's next request succeeds;
 *   - sshd stopped (SIGSTOP on the whole tree): requests wait or fail with 504 (streams under
 *     way may be cut), and all succeed again once it runs;
 *   - sshd gone: 502 at once, connection attempts backed off (500 ms doubling), service back
 *     when sshd returns on the same port, within the backoff step;
 *   - the upstream killed mid-stream: every client sees a cut response (a chunked one without
 *     its last chunk, a Content-Length one short), promptly, never a clean end; 502 while it is
 *     gone; service back when it returns on the same port.
 *
 * Each prints its requests, its failures by status, and the gateway's RSS and descriptors at
 * rest before and after, and fails on a leak or on a failure the fault does not explain.
 */
#include "soak.h"

/* RSS growth allowed between the rest before the faults and the rest after (outside ASan). */
#define RSS_BOUND_KB 4096
/* "At once": the longest a refusal (502) may take while sshd or the upstream is gone. */
#define AT_ONCE_MS (SOAK_SANITIZED ? 2000 : 1000)
/* How soon a client must see its response cut once the upstream died. */
#define CUT_WITHIN_MS (SOAK_SANITIZED ? 3000 : 1500)

#define ALICE "Authorization: Bearer tok-alice\r\n"

typedef soak_world_t world_t;

static pid_t ppid_of(pid_t pid)
{
    char path[64], buf[512];
    snprintf(path, sizeof(path), "/proc/%d/stat", (int)pid);
    FILE *f = fopen(path, "re");
    if (f == NULL)
        return -1;
    size_t n = fread(buf, 1, sizeof(buf) - 1, f);
    fclose(f);
    buf[n] = '\0';
    const char *p = strrchr(buf, ')');
    int pp = -1;
    if (p == NULL || sscanf(p + 1, " %*c %d", &pp) != 1)
        return -1;
    return (pid_t)pp;
}

static bool is_zombie(pid_t pid)
{
    char path[64], buf[512];
    snprintf(path, sizeof(path), "/proc/%d/stat", (int)pid);
    FILE *f = fopen(path, "re");
    if (f == NULL)
        return true; /* gone already */
    size_t n = fread(buf, 1, sizeof(buf) - 1, f);
    fclose(f);
    buf[n] = '\0';
    const char *p = strrchr(buf, ')');
    return p == NULL || p[1] == '\0' || p[2] == 'Z';
}

/* The live per-connection children of sshd (one per SSH connection). */
static size_t connection_children(const mg_test_sshd_t *s, pid_t *out, size_t cap)
{
    pid_t all[256];
    size_t n = 0, k = 0;
    mg_test_proc_descendants(s->pid, all, 256, &n);
    for (size_t i = 0; i < n && k < cap; i++)
        if (ppid_of(all[i]) == s->pid && !is_zombie(all[i]))
            out[k++] = all[i];
    return k;
}

typedef struct children {
    const mg_test_sshd_t *sshd;
    size_t want;
    pid_t kids[8];
    size_t n;
} children_t;

static bool children_settled(void *arg)
{
    children_t *c = arg;
    c->n = connection_children(c->sshd, c->kids, 8);
    return c->n == c->want;
}

/* SIGKILLs pid and everything under it. */
static void kill_tree(pid_t pid)
{
    pid_t sub[64];
    size_t n = 0;
    mg_test_proc_descendants(pid, sub, 64, &n);
    kill(pid, SIGKILL);
    for (size_t i = 0; i < n; i++)
        kill(sub[i], SIGKILL);
}

typedef struct pool_busy {
    const gw_t *g;
    long connections, busy;
    soak_gw_stats_t st;
} pool_busy_t;

static bool pool_busy_cond(void *arg)
{
    pool_busy_t *p = arg;
    return soak_stats(p->g, &p->st) == 0 && p->st.ready_connections == p->connections &&
           p->st.busy_channels >= p->busy;
}

/* ==== 1. one SSH connection's sshd child killed ==== */

static void test_sshd_child_killed(void **state)
{
    world_t *w = *state;
    gw_t *g = &w->gw;
    const int rounds = soak_pick(3, 3, 20, 10);
    enum { CONNS = 2, CHANNELS = 4, THREADS = 8 };
    print_message("mode %s: %d kills, %d connections of %d channels, %d streams at a time\n",
                  soak_mode(), rounds, CONNS, CHANNELS, THREADS);
    soak_policy_t o = { .max_connections = CONNS, .max_channels = CHANNELS };
    soak_gw_start(g, &w->sshd, w->up.port, &o, NULL);

    /* Every thread streams 20 lines over 500 ms, so that a kill finds each connection busy. */
    static const soak_req_t reqs[] = {
        { .path = "/stream?chunks=20&interval_ms=25", .headers = ALICE, .lines = 20 },
    };
    soak_load_t *l = &w->load;
    *l = (soak_load_t){ .port = g->port, .reqs = reqs, .nreqs = 1, .nthreads = THREADS };
    soak_load_start(l);
    assert_true(soak_load_wait_ok(l, 2 * THREADS, 20000));
    soak_load_stop(l);
    soak_tally_t warm = soak_load_tally(l);
    soak_load_free(l);
    soak_tally_print("warm-up", &warm);
    assert_int_equal(soak_tally_failed(&warm), 0);
    soak_figures_t before = soak_wait_quiet(g, -1, CONNS, 10000, NULL);

    double t_kill[32];
    soak_load_start(l);
    for (int i = 0; i < rounds; i++) {
        /* Both connections up and nearly every channel busy. */
        pool_busy_t pb = { .g = g, .connections = CONNS, .busy = THREADS - 2 };
        if (!soak_wait(pool_busy_cond, &pb, 15000, 10)) {
            gw_print_log_tail(g, 30);
            fail_msg("kill %d: the pool did not reach %d ready connections with %d busy "
                     "channels (%ld ready, %ld busy)",
                     i + 1, CONNS, THREADS - 2, pb.st.ready_connections, pb.st.busy_channels);
        }
        /* (A killed child may linger a moment until sshd reaps it.) */
        children_t ch = { .sshd = &w->sshd, .want = CONNS };
        soak_wait(children_settled, &ch, 5000, 10);
        pid_t *kids = ch.kids;
        size_t nk = ch.n;
        if (nk != CONNS)
            fail_msg("kill %d: sshd has %zu connection children, expected %d", i + 1, nk, CONNS);
        t_kill[i] = mg_test_now_ms();
        kill_tree(kids[i % nk]);
        /* Every thread gets through two more requests: the one that may have failed, the next. */
        assert_true(soak_load_wait_ok(l, 2 * THREADS, 20000));
    }
    soak_load_stop(l);
    double t_end = mg_test_now_ms();

    /* Each failure belongs to a kill: in flight at it, or begun before the gateway saw it. */
    int per_kill[32] = { 0 }, unexplained = 0, not_next = 0;
    for (int k = 0; k < l->nthreads; k++) {
        const soak_thread_t *t = &l->t[k];
        for (size_t e = 0; e < t->nev; e++) {
            const soak_event_t *ev = &t->ev[e];
            if (ev->outcome == 200)
                continue;
            int r = -1;
            for (int i = 0; i < rounds; i++)
                if (ev->end >= t_kill[i] && ev->start < t_kill[i] + 1000)
                    r = i;
            if (r < 0 || (ev->outcome != SOAK_CUT && ev->outcome != 502))
                unexplained++;
            else
                per_kill[r]++;
            if (e + 1 < t->nev && t->ev[e + 1].outcome != 200)
                not_next++;
        }
    }
    soak_tally_t all = soak_load_tally(l);
    soak_tally_print("under kills", &all);
    for (int i = 0; i < rounds; i++)
        print_message("kill %d: %d requests failed (at most %d: the killed connection's "
                      "channels)\n",
                      i + 1, per_kill[i], CHANNELS);
    if (unexplained || not_next)
        soak_load_print_failures(l, t_kill[0], 40);
    assert_int_equal(unexplained, 0);
    assert_int_equal(not_next, 0);
    for (int i = 0; i < rounds; i++) {
        assert_true(per_kill[i] >= 1);
        assert_true(per_kill[i] <= CHANNELS);
    }
    /* Requests after the last kill's second... all succeeded. */
    soak_tally_t tail = soak_load_tally_between(l, t_kill[rounds - 1] + 1000, t_end);
    assert_int_equal(soak_tally_failed(&tail), 0);
    soak_load_free(l);

    soak_figures_t after = soak_wait_quiet(g, before.fds, CONNS, 10000, NULL);
    soak_assert_flat(g, "gateway after the kills", before, after, RSS_BOUND_KB);
    gw_stop(g);
}

/* ==== 2. sshd stopped, then running again ==== */

static void test_sshd_stopped(void **state)
{
    world_t *w = *state;
    gw_t *g = &w->gw;
    const int pause_ms = soak_pick(6000, 6000, 10000, 10000);
    const int pauses = soak_pick(1, 1, 3, 2);
    /* Time after SIGCONT by which every request started must succeed. */
    const int recover_ms = SOAK_SANITIZED ? 5000 : 3000;
    /* Short: the keepalive gives up within the pause (2 s of silence, then 2 s for the
       answer), so both ways of living through it happen: waiting, and 504. */
    const int misses = soak_pick(1, 1, 2, 2);
    print_message("mode %s: sshd stopped %d time(s) for %d ms; keepalive every 2000 ms, %d "
                  "miss(es) allowed\n",
                  soak_mode(), pauses, pause_ms, misses);
    char env_misses[64];
    snprintf(env_misses, sizeof(env_misses), "SSH_KEEPALIVE_MAX_MISSES=%d", misses);
    const char *const env[] = { "SSH_KEEPALIVE_INTERVAL=2000", env_misses, NULL };
    soak_policy_t o = { 0 };
    soak_gw_start(g, &w->sshd, w->up.port, &o, env);

    static const soak_req_t reqs[] = {
        { .path = "/hello", .headers = ALICE, .body_equals = "hello\n" },
        { .path = "/stream?chunks=10&interval_ms=30", .headers = ALICE, .lines = 10 },
    };
    soak_load_t *l = &w->load;
    *l = (soak_load_t){ .port = g->port, .reqs = reqs, .nreqs = 2, .nthreads = 6,
                        .timeout_ms = pause_ms + 30000, .pause_ms = 5 };
    soak_load_start(l);
    assert_true(soak_load_wait_ok(l, 50, 20000));
    soak_load_stop(l);
    soak_tally_t warm = soak_load_tally(l);
    soak_load_free(l);
    assert_int_equal(soak_tally_failed(&warm), 0);
    soak_figures_t before = soak_wait_quiet(g, -1, -1, 10000, NULL);

    double t_stop[8], t_cont[8], first_ok[8];
    soak_load_start(l);
    for (int i = 0; i < pauses; i++) {
        assert_true(soak_load_wait_ok(l, 30, 20000));
        t_stop[i] = mg_test_now_ms();
        assert_int_equal(mg_test_sshd_pause(&w->sshd), 0);
        /* The wait itself is the fault: nothing to wait for but time. */
        mg_test_sleep_ms(pause_ms);
        t_cont[i] = mg_test_now_ms();
        assert_int_equal(mg_test_sshd_resume(&w->sshd), 0);
        assert_true(soak_load_wait_ok(l, 1, 30000));
        first_ok[i] = mg_test_now_ms();
        /* The load runs on past the recovery bound, and every thread gets through two requests
           after it: those must all succeed. */
        double left = t_cont[i] + recover_ms - mg_test_now_ms();
        if (left > 0)
            mg_test_sleep_ms((int)left);
        assert_true(soak_load_wait_ok(l, 2 * (uint64_t)l->nthreads, 30000));
    }
    soak_load_stop(l);
    double t_end = mg_test_now_ms();

    soak_tally_t all = soak_load_tally(l);
    soak_tally_print("with sshd stopped", &all);
    int unexpected = 0;
    for (int i = 0; i < pauses; i++) {
        soak_tally_t during = soak_load_tally_between(l, t_stop[i] - 2000, t_cont[i] + recover_ms);
        char what[64];
        snprintf(what, sizeof(what), "pause %d (%.0f ms)", i + 1, t_cont[i] - t_stop[i]);
        soak_tally_print(what, &during);
        print_message("pause %d: the first response after SIGCONT came %.0f ms after it\n", i + 1,
                      first_ok[i] - t_cont[i]);
        /* Waited (200), gave up with 504, or a stream under way cut: nothing else. */
        unexpected += (int)(soak_tally_failed(&during) - soak_tally_get(&during, 504) -
                            soak_tally_get(&during, SOAK_CUT));
        soak_tally_t after = soak_load_tally_between(
            l, t_cont[i] + recover_ms, i + 1 < pauses ? t_stop[i + 1] - 2000 : t_end);
        unexpected += (int)soak_tally_failed(&after);
    }
    soak_tally_t before_first = soak_load_tally_between(l, 0, t_stop[0] - 2000);
    unexpected += (int)soak_tally_failed(&before_first);
    if (unexpected)
        soak_load_print_failures(l, t_stop[0], 40);
    assert_int_equal(unexpected, 0);
    soak_load_free(l);

    soak_figures_t after = soak_wait_quiet(g, before.fds, -1, 15000, NULL);
    soak_assert_flat(g, "gateway after the pauses", before, after, RSS_BOUND_KB);
    gw_stop(g);
}

/* ==== 3. sshd gone, then back on the same port ==== */

static void test_sshd_gone(void **state)
{
    world_t *w = *state;
    gw_t *g = &w->gw;
    const int outage_ms = soak_pick(3000, 3000, 10000, 10000);
    print_message("mode %s: sshd gone for %d ms\n", soak_mode(), outage_ms);
    assert_int_equal(mg_test_sshd_start(&w->own_sshd, NULL), 0);
    soak_policy_t o = { 0 };
    soak_gw_start(g, &w->own_sshd, w->up.port, &o, NULL);

    static const soak_req_t reqs[] = {
        { .path = "/hello", .headers = ALICE, .body_equals = "hello\n" },
    };
    soak_load_t *l = &w->load;
    *l = (soak_load_t){ .port = g->port, .reqs = reqs, .nreqs = 1, .nthreads = 4,
                        .pause_ms = 10 };
    soak_load_start(l);
    assert_true(soak_load_wait_ok(l, 50, 20000));
    soak_load_stop(l);
    soak_load_free(l);
    soak_figures_t before = soak_wait_quiet(g, -1, -1, 10000, NULL);

    soak_load_start(l);
    assert_true(soak_load_wait_ok(l, 20, 20000));
    soak_follow_t log;
    soak_follow_init(&log, g->log);
    double t_kill = mg_test_now_ms();
    assert_int_equal(mg_test_sshd_kill(&w->own_sshd), 0);
    mg_test_sleep_ms(outage_ms); /* the outage itself */
    int attempts = soak_follow_count(&log, " opening", 0);
    double t_back = mg_test_now_ms();
    assert_int_equal(soak_sshd_respawn(&w->own_sshd, &w->sshd_again), 0);
    double t_listening = mg_test_now_ms();
    assert_true(soak_load_wait_ok(l, 1, 60000));
    double t_ok = mg_test_now_ms();
    assert_true(soak_load_wait_ok(l, 50, 20000));
    soak_load_stop(l);
    double t_end = mg_test_now_ms();

    soak_tally_t all = soak_load_tally(l);
    soak_tally_t during = soak_load_tally_between(l, t_kill, t_back);
    soak_tally_t after = soak_load_tally_between(l, t_ok, t_end);
    soak_tally_print("in all", &all);
    soak_tally_print("while sshd was gone", &during);
    soak_tally_print("after the first success", &after);
    /* Every refusal came at once. */
    double slowest = 0;
    int slow = 0;
    for (int k = 0; k < l->nthreads; k++)
        for (size_t e = 0; e < l->t[k].nev; e++) {
            const soak_event_t *ev = &l->t[k].ev[e];
            if (ev->outcome != 502)
                continue;
            double ms = ev->end - ev->start;
            slowest = ms > slowest ? ms : slowest;
            slow += ms > AT_ONCE_MS;
        }
    /* Attempts: the first may open up to max_connections (3) at once before any has failed;
       then one per backoff step, 500 ms doubling, and one more at the edge. */
    int max_attempts = 3 + 1;
    for (int step = 500, t = 0; t < outage_ms; t += step, step *= 2)
        max_attempts++;
    print_message("sshd gone %.0f ms: %llu refusals (502), the slowest in %.0f ms; %d connection "
                  "attempts (at most %d with the backoff); back %.0f ms after sshd listened "
                  "again (bound %d ms)\n",
                  t_back - t_kill, (unsigned long long)soak_tally_get(&during, 502), slowest,
                  attempts, max_attempts, t_ok - t_listening, outage_ms + 2000);
    uint64_t unexpected = soak_tally_failed(&during) - soak_tally_get(&during, 502);
    if (unexpected || slow || soak_tally_failed(&after))
        soak_load_print_failures(l, t_kill, 30);
    assert_int_equal(unexpected, 0);
    assert_true(soak_tally_get(&during, 502) > 0);
    assert_int_equal(slow, 0);
    assert_true(attempts >= 1 && attempts <= max_attempts);
    assert_true(t_ok - t_listening <= outage_ms + 2000);
    assert_int_equal(soak_tally_failed(&after), 0);
    soak_load_free(l);

    soak_figures_t rest = soak_wait_quiet(g, before.fds, -1, 10000, NULL);
    soak_assert_flat(g, "gateway after the outage", before, rest, RSS_BOUND_KB);
    gw_stop(g);
    soak_proc_tree_stop(&w->sshd_again);
    mg_test_sshd_stop(&w->own_sshd);
}

/* ==== 4. the upstream killed mid-stream ==== */

static void test_upstream_killed_mid_stream(void **state)
{
    world_t *w = *state;
    gw_t *g = &w->gw;
    const int rounds = soak_pick(3, 2, 10, 5);
    enum { CHUNKED = 4, SIZED = 2, N = CHUNKED + SIZED };
    print_message("mode %s: %d kills of the upstream, each with %d chunked streams and %d "
                  "Content-Length bodies under way\n",
                  soak_mode(), rounds, CHUNKED, SIZED);
    assert_int_equal(soak_upstream_start(&w->own_up, 0), 0);
    uint16_t up_port = w->own_up.port;
    /* Compared at rest with no connection open (soak.h, "the gateway at rest"). */
    soak_policy_t o = { .idle_timeout_ms = SOAK_IDLE_MS };
    soak_gw_start(g, &w->sshd, up_port, &o, soak_sweep_often);

    mg_test_http_response_t r;
    int rc = gw_request(g, "GET", "/hello", ALICE, NULL, 0, &r, 10000);
    gw_expect_status(g, rc, &r, 200, "before the kills");
    mg_test_http_response_free(&r);
    mg_test_sleep_ms(SOAK_SWEEP_WAIT_MS);
    soak_figures_t before = soak_wait_quiet(g, -1, 0, SOAK_IDLE_MS + 10000, NULL);

    soak_tally_t refused = { 0 };
    double worst_cut = 0, worst_refusal = 0, worst_back = 0;
    for (int round = 0; round < rounds; round++) {
        static soak_client_t c[N];
        for (int i = 0; i < N; i++)
            soak_client_open(&c[i], g->port, ALICE,
                            i < CHUNKED ? "/stream?chunks=1000&interval_ms=20"
                                        : "/bytes/100000000");
        /* Each under way: a few lines of each stream, a first MB of each body (then held). */
        double deadline = mg_test_now_ms() + 15000;
        for (;;) {
            bool all = true;
            for (int i = 0; i < N; i++) {
                if (i < CHUNKED)
                    soak_client_read(&c[i], 0);
                else if (c[i].r.body_received < 1000000)
                    soak_client_read(&c[i], 1000000 - (size_t)c[i].r.body_received);
                all = all && !c[i].eof &&
                      (i < CHUNKED ? c[i].r.chunks >= 3 : c[i].r.body_received >= 1000000);
            }
            if (all)
                break;
            for (int i = 0; i < N; i++)
                if (c[i].eof)
                    fail_msg("round %d: response %d ended before the kill (status %d)",
                             round + 1, i, c[i].r.status);
            assert_true(mg_test_now_ms() < deadline);
            mg_test_sleep_ms(5);
        }
        double t_kill = mg_test_now_ms();
        soak_upstream_kill(&w->own_up);

        /* Each client reads on: it must reach the end of its connection, soon, incomplete. */
        deadline = t_kill + 20000;
        for (;;) {
            bool all = true;
            for (int i = 0; i < N; i++) {
                soak_client_read(&c[i], 0);
                all = all && c[i].eof;
            }
            if (all || mg_test_now_ms() > deadline)
                break;
            struct pollfd p[N];
            for (int i = 0; i < N; i++)
                p[i] = (struct pollfd){ .fd = c[i].eof ? -1 : c[i].fd, .events = POLLIN };
            poll(p, N, 50);
        }
        for (int i = 0; i < N; i++) {
            double ms = c[i].eof ? c[i].eof_at - t_kill : -1;
            print_message("round %d, %s response %d: status %d, %llu body bytes%s, %s, %s after "
                          "the kill: %.0f ms\n",
                          round + 1, i < CHUNKED ? "chunked" : "sized", i, c[i].r.status,
                          (unsigned long long)c[i].r.body_received,
                          i < CHUNKED ? "" : " of 100000000",
                          c[i].r.complete ? "COMPLETE" : "cut",
                          c[i].eof ? "connection ended" : "connection STILL OPEN", ms);
            assert_int_equal(c[i].r.status, 200);
            assert_false(c[i].r.complete);
            assert_true(c[i].eof);
            if (i >= CHUNKED)
                assert_true(c[i].r.body_received < 100000000);
            else
                assert_true(c[i].r.chunked);
            worst_cut = ms > worst_cut ? ms : worst_cut;
            close(c[i].fd);
            mg_test_http_response_free(&c[i].r);
        }

        /* While it is gone: 502, at once. */
        for (int i = 0; i < 5; i++) {
            double t0 = mg_test_now_ms();
            soak_req_t q = { .path = "/hello", .headers = ALICE, .body_equals = "hello\n" };
            int out = soak_request(g->port, &q, 10000);
            double ms = mg_test_now_ms() - t0;
            worst_refusal = ms > worst_refusal ? ms : worst_refusal;
            soak_tally_add(&refused, out);
        }
        /* Back on the same port: served again at once. */
        assert_int_equal(soak_upstream_start(&w->own_up, up_port), 0);
        double t_back = mg_test_now_ms();
        rc = gw_request(g, "GET", "/hello", ALICE, NULL, 0, &r, 10000);
        gw_expect_status(g, rc, &r, 200, "the upstream back");
        mg_test_http_response_free(&r);
        double back = mg_test_now_ms() - t_back;
        worst_back = back > worst_back ? back : worst_back;
    }
    soak_tally_print("requests while the upstream was gone", &refused);
    print_message("cut seen at most %.0f ms after a kill (bound %d); refusals in at most %.0f ms "
                  "(bound %d); served again %.0f ms after its return at worst\n",
                  worst_cut, CUT_WITHIN_MS, worst_refusal, AT_ONCE_MS, worst_back);
    assert_int_equal(soak_tally_get(&refused, 502), refused.n);
    assert_true(worst_refusal <= AT_ONCE_MS);
    assert_true(worst_cut <= CUT_WITHIN_MS);

    soak_figures_t after = soak_wait_quiet(g, before.fds, 0, SOAK_IDLE_MS + 10000, NULL);
    mg_test_sleep_ms(SOAK_SWEEP_WAIT_MS);
    after = soak_wait_quiet(g, before.fds, 0, 10000, NULL);
    soak_assert_flat(g, "gateway after the kills", before, after, RSS_BOUND_KB);
    gw_stop(g);
    soak_upstream_stop(&w->own_up);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_teardown(test_sshd_child_killed, soak_test_teardown),
        cmocka_unit_test_teardown(test_sshd_stopped, soak_test_teardown),
        cmocka_unit_test_teardown(test_sshd_gone, soak_test_teardown),
        cmocka_unit_test_teardown(test_upstream_killed_mid_stream, soak_test_teardown),
    };
    /* MG_TEST_FILTER=test_sshd_gone (a cmocka pattern, * and ?) runs a few of them. */
    const char *filter = getenv("MG_TEST_FILTER");
    if (filter != NULL && *filter != '\0')
        cmocka_set_test_filter(filter);
    return cmocka_run_group_tests(tests, soak_group_setup, soak_group_teardown);
}
