/*
 * Connection churn: many users' SSH connections opened and cleaned again and again, against the
 * real moongate with a real sshd and mg-upstream. Each round every user sends a request (one
 * SSH connection each: max_connections 1), then the connections sit idle until the cleanup
 * closes them (idle_timeout_ms 1000 from the policy's limits, CLEANUP_INTERVAL 200, kept-alive
 * channels released after UPSTREAM_KEEPALIVE 300). After every round the pool must be empty,
 * sshd must be back to its listener alone (every session really ended), and the gateway's
 * descriptors must be back at the baseline; at the end RSS must be within a stated bound of
 * the baseline taken after the first round.
 *
 * Short: 60 users for about 8 s (ASan: 40 users, 8 s). MG_SOAK=long: 500 users for 3 minutes
 * (ASan: 500 users for 60 s).
 */
#include "soak.h"

/* RSS growth allowed between the first round and the last (outside ASan). A pool entry or an
   SSH session leaked per connection (a libssh2 session is some 30 KiB) would pass it within
   a few hundred connections. */
#define RSS_BOUND_KB 4096
#define WORKERS 8

typedef soak_world_t world_t;

typedef struct worker {
    pthread_t th;
    uint16_t port;
    int first, step, users;   /* users first, first + step, ... below users */
    soak_tally_t tally;
    char last_fail[160];
} worker_t;

static void *worker_run(void *arg)
{
    worker_t *k = arg;
    for (int u = k->first; u < k->users; u += k->step) {
        char headers[96], user[32];
        snprintf(user, sizeof(user), "u%d", u);
        snprintf(headers, sizeof(headers), "Authorization: Bearer tok-%s\r\n", user);
        soak_req_t q = { .path = "/hello", .headers = headers, .body_equals = "hello\n" };
        int o = soak_request(k->port, &q, 30000);
        soak_tally_add(&k->tally, o);
        if (o != 200) {
            char b[16];
            snprintf(k->last_fail, sizeof(k->last_fail), "%s: %s", user,
                     soak_outcome_name(o, b, sizeof(b)));
        }
    }
    return NULL;
}

/* One request from every user, WORKERS at a time. */
static soak_tally_t round_of_requests(uint16_t port, int users)
{
    static worker_t k[WORKERS];
    for (int i = 0; i < WORKERS; i++) {
        k[i] = (worker_t){ .port = port, .first = i, .step = WORKERS, .users = users };
        assert_int_equal(pthread_create(&k[i].th, NULL, worker_run, &k[i]), 0);
    }
    soak_tally_t all = { 0 };
    for (int i = 0; i < WORKERS; i++) {
        pthread_join(k[i].th, NULL);
        for (int j = 0; j < 610; j++)
            all.by[j] += k[i].tally.by[j];
        all.n += k[i].tally.n;
        if (k[i].last_fail[0])
            print_message("worker %d, last failure: %s\n", i, k[i].last_fail);
    }
    return all;
}

static bool sshd_alone(void *arg)
{
    return mg_test_sshd_count_processes(arg) == 1;
}

static void test_connection_churn(void **state)
{
    world_t *w = *state;
    gw_t *g = &w->gw;
    const int users = soak_pick(60, 40, 500, 500);
    const int seconds = soak_pick(8, 8, 180, 60);
    print_message("mode %s: %d users, %d s of rounds\n", soak_mode(), users, seconds);

    static const char *const env[] = { "CLEANUP_INTERVAL=200", "UPSTREAM_KEEPALIVE=300", NULL };
    soak_policy_t o = { .max_connections = 1, .idle_timeout_ms = 1000 };
    soak_gw_start(g, &w->sshd, w->up.port, &o, env);

    soak_tally_t total = { 0 };
    soak_figures_t base = { 0 }, last = { 0 };
    soak_gw_stats_t st, prev = { 0 };
    double t0 = mg_test_now_ms();
    int rounds = 0;
    long opened = 0, cleaned = 0;
    while (rounds < 2 || mg_test_now_ms() - t0 < seconds * 1000.0) {
        double tr = mg_test_now_ms();
        soak_tally_t t = round_of_requests(g->port, users);
        double requests_ms = mg_test_now_ms() - tr;
        for (int j = 0; j < 610; j++)
            total.by[j] += t.by[j];
        total.n += t.n;
        if (soak_tally_failed(&t) != 0) {
            soak_tally_print("this round", &t);
            gw_print_log_tail(g, 30);
            fail_msg("round %d: %llu of %d requests failed", rounds + 1,
                     (unsigned long long)soak_tally_failed(&t), users);
        }
        /* Every connection idles out and is cleaned; every session ends at sshd too. */
        last = soak_wait_quiet(g, rounds == 0 ? -1 : base.fds, 0, 15000, &st);
        if (!soak_wait(sshd_alone, &w->sshd, 10000, 20))
            fail_msg("round %d: sshd still has %zu processes (the listener and sessions the "
                     "gateway did not end)",
                     rounds + 1, mg_test_sshd_count_processes(&w->sshd));
        long r_opened = st.ssh_opened - prev.ssh_opened, r_cleaned = st.cleaned - prev.cleaned;
        opened += r_opened;
        cleaned += r_cleaned;
        rounds++;
        print_message("round %d: %d requests in %.0f ms, %ld connections opened, %ld cleaned, "
                      "at rest after %.0f ms; pool users %ld; RSS %ld KiB, %d descriptors\n",
                      rounds, users, requests_ms, r_opened, r_cleaned,
                      mg_test_now_ms() - tr - requests_ms, st.users, last.rss_kb, last.fds);
        /* Each user had no connection when the round began: one opening each, no more. */
        assert_int_equal(r_opened, users);
        assert_int_equal(r_cleaned, users);
        assert_int_equal(st.users, 0);
        if (rounds == 1)
            base = last;
        prev = st;
    }
    double took = mg_test_now_ms() - t0;
    soak_tally_print("churn", &total);
    print_message("%d rounds in %.1f s: %ld SSH connections opened and %ld cleaned (%ld closed "
                  "in all)\n",
                  rounds, took / 1000, opened, cleaned, st.ssh_closed);
    assert_int_equal(soak_tally_failed(&total), 0);
    soak_assert_flat(g, "gateway from the first round to the last", base, last, RSS_BOUND_KB);
    gw_stop(g);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_connection_churn),
    };
    return cmocka_run_group_tests(tests, soak_group_setup, soak_group_teardown);
}
