/*
 * Reload storm: SIGHUPs under load, alternating a good policy and a broken one, against the
 * real moongate with a real sshd and mg-upstream. Every request must succeed (those in flight
 * finish on the state they started with; a broken policy is refused and the old one serves
 * on), every reload must be answered in the log as it should ("policy reloaded" or "reload
 * failed:"), and after a warm-up the gateway's descriptors must come back to the baseline and
 * its RSS stay within a stated bound.
 *
 * Short: 10 reloads of warm-up, then 60 counted with 20 requests done between two (ASan: 30).
 * MG_SOAK=long: 150 counted with 200 requests between two.
 */
#include "soak.h"

/* RSS growth allowed over the counted reloads (outside ASan). A policy state that leaked on
   every reload (a LuaJIT state with its libraries is about 200 KiB) would pass it at 150. */
#define RSS_BOUND_KB 3072

typedef soak_world_t world_t;

/* Policy memory (/stats policy.memory_bytes), or -1. */
static long policy_memory(const gw_t *g)
{
    mg_test_http_response_t r;
    long v = -1;
    if (soak_get(g, "/stats", &r) == 0)
        v = soak_json_long(r.body, "memory_bytes");
    mg_test_http_response_free(&r);
    return v;
}

/*
 * n reloads, alternating (starting with the good policy when *gen is even), each once at least
 * `spacing` more requests have succeeded since the previous one, each waited for in the log.
 */
static void reloads(world_t *w, soak_follow_t *log, soak_load_t *l, int n, int spacing, int *gen)
{
    gw_t *g = &w->gw;
    soak_policy_t o = { 0 };
    for (int i = 0; i < n; i++, ++*gen) {
        bool broken = *gen % 2 == 1;
        if (!soak_load_wait_ok(l, (uint64_t)spacing, 30000)) {
            gw_print_log_tail(g, 30);
            fail_msg("no progress of the load before reload %d", *gen);
        }
        o.generation = *gen;
        soak_write_policy(g->policy, &w->sshd, w->up.port, &o, broken);
        assert_int_equal(mg_test_proc_kill(&g->proc, SIGHUP), 0);
        const char *want = broken ? "gateway: reload failed:" : "gateway: policy reloaded";
        if (!soak_follow_wait(log, want, 1, 10000)) {
            gw_print_log_tail(g, 30);
            fail_msg("reload %d (%s policy): no \"%s\" in the log within 10 s", *gen,
                     broken ? "broken" : "good", want);
        }
        gw_assert_alive(g);
    }
}

static void test_reload_storm(void **state)
{
    world_t *w = *state;
    gw_t *g = &w->gw;
    const int warmup = 10;
    const int counted = soak_pick(60, 30, 150, 150);
    const int spacing = soak_pick(20, 20, 200, 100);
    print_message("mode %s: %d reloads of warm-up, %d counted, %d requests between two\n",
                  soak_mode(), warmup, counted, spacing);

    soak_policy_t o = { 0 };
    soak_gw_start(g, &w->sshd, w->up.port, &o, NULL);
    soak_follow_t log;
    soak_follow_init(&log, g->log);

    static const soak_req_t reqs[] = {
        { .path = "/hello", .headers = "Authorization: Bearer tok-alice\r\n",
          .body_equals = "hello\n" },
        { .path = "/stream?chunks=5&interval_ms=20", .headers = "Authorization: Bearer tok-bob\r\n",
          .lines = 5 },
        { .path = "/hello", .headers = "Authorization: Bearer tok-bob\r\n",
          .body_equals = "hello\n" },
        { .path = "/stream?chunks=4&interval_ms=30",
          .headers = "Authorization: Bearer tok-alice\r\n", .lines = 4 },
    };
    static soak_load_t l;
    l = (soak_load_t){ .port = g->port, .reqs = reqs, .nreqs = 4, .nthreads = 6 };

    /* Warm-up: the policy states, the pool's connections and the allocator settle. */
    int gen = 0;
    soak_load_start(&l);
    reloads(w, &log, &l, warmup, 5, &gen);
    soak_load_stop(&l);
    soak_tally_t t_warm = soak_load_tally(&l);
    soak_load_free(&l);
    soak_tally_print("warm-up", &t_warm);
    soak_gw_stats_t st;
    soak_figures_t before = soak_wait_quiet(g, -1, -1, 10000, &st);
    long mem_before = policy_memory(g);

    double t0 = mg_test_now_ms();
    soak_load_start(&l);
    reloads(w, &log, &l, counted, spacing, &gen);
    soak_load_stop(&l);
    double took = mg_test_now_ms() - t0;
    soak_tally_t t = soak_load_tally(&l);
    soak_tally_print("reload storm", &t);
    if (soak_tally_failed(&t) != 0 || soak_tally_failed(&t_warm) != 0)
        soak_load_print_failures(&l, t0, 20);
    soak_load_free(&l);

    /* Back at rest: the same descriptors as before the storm (besides the pool's). */
    soak_figures_t after = soak_wait_quiet(g, before.fds, -1, 10000, &st);
    long mem_after = policy_memory(g);
    print_message("%d reloads (%d good, %d broken) in %.1f s under load; policy memory %ld -> "
                  "%ld bytes; pool connections %ld\n",
                  counted, (counted + 1) / 2, counted / 2, took / 1000, mem_before, mem_after,
                  st.total_connections);
    assert_int_equal(soak_tally_failed(&t_warm), 0);
    assert_int_equal(soak_tally_failed(&t), 0);
    assert_true(t.n >= (uint64_t)counted * (uint64_t)spacing);
    soak_assert_flat(g, "gateway after the storm", before, after, RSS_BOUND_KB);
    gw_stop(g);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_reload_storm),
    };
    return cmocka_run_group_tests(tests, soak_group_setup, soak_group_teardown);
}
