/*
 * A herd of users at once, end to end: the moongate program with a real sshd and mg-upstream,
 * and MOONGATE_MAX_HANDSHAKES (or _PER_SERVER) small enough to see. Twenty users arriving
 * together are all served with never more than two handshakes running (the gateway's own
 * high-water mark, in /stats); a request whose connection is still queued for a handshake slot when its deadline
 * passes gets its 504 and leaves the queue; a full queue answers 503 at once.
 *
 * To hold the one slot for a known time, one user's route points at a loopback port that
 * accepts TCP connections and never says a word: its handshake waits out SSH_CONNECTION_TIMEOUT.
 * Every wait is bounded, and each ordering the tests need is observed in /stats before the next
 * step, so a slow machine makes them slower, not wrong.
 */
#include "gwtest.h"

#include <jansson.h>
#include <pthread.h>

#define HERD 20

typedef struct world {
    mg_test_sshd_t sshd;
    mg_test_upstream_t up;
    int mute_fd;          /* listens, never accepts: a server that never answers */
    uint16_t mute_port;
} world_t;

static int listen_mute(world_t *w)
{
    struct sockaddr_in a = { .sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
    socklen_t alen = sizeof(a);
    w->mute_fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (w->mute_fd < 0 || bind(w->mute_fd, (struct sockaddr *)&a, sizeof(a)) != 0 ||
        listen(w->mute_fd, 16) != 0 ||
        getsockname(w->mute_fd, (struct sockaddr *)&a, &alen) != 0)
        return -1;
    w->mute_port = ntohs(a.sin_port);
    return 0;
}

static int group_setup(void **state)
{
    world_t *w = calloc(1, sizeof(*w));
    if (w == NULL || mg_test_sshd_start(&w->sshd, NULL) != 0 ||
        mg_test_upstream_start(&w->up) != 0 || listen_mute(w) != 0)
        return -1;
    *state = w;
    return 0;
}

static int group_teardown(void **state)
{
    world_t *w = *state;
    close(w->mute_fd);
    mg_test_upstream_stop(&w->up);
    mg_test_sshd_stop(&w->sshd);
    free(w);
    mg_test_cleanup_all();
    return 0;
}

/*
 * The policy: the user is the X-User header; user "mute" goes to the mute port; "late" may wait
 * 1.5 s for a connection (long enough for the test to act while it waits, on a slow machine),
 * everyone else 20 s.
 */
static void start_gateway(world_t *w, gw_t *g, const char *const *env)
{
    char route[2048], mute[2048];
    gw_route_fields(route, sizeof(route), &w->sshd, w->up.port);
    mg_test_sshd_t fake = w->sshd;
    fake.port = w->mute_port;
    gw_route_fields(mute, sizeof(mute), &fake, w->up.port);
    char text[6144];
    int n = snprintf(text, sizeof(text),
                     "return {\n"
                     "  authenticate = function(req) return req.headers[\"x-user\"] end,\n"
                     "  limits = function(user)\n"
                     "    return { queue_timeout_ms = user == \"late\" and 1500 or 20000 }\n"
                     "  end,\n"
                     "  route = function(req, user)\n"
                     "    if user == \"mute\" then return { %s } end\n"
                     "    return { %s }\n"
                     "  end,\n"
                     "}\n",
                     mute, route);
    assert_true(n > 0 && n < (int)sizeof(text));
    gw_start_policy(g, text, 0, env);
}

/* GET /hello as user, on an fd connected beforehand (or a new connection when fd < 0). */
static int hello_as(uint16_t port, int fd, const char *user, mg_test_http_response_t *r,
                    int timeout_ms)
{
    char headers[128], *req = NULL;
    size_t len = 0;
    snprintf(headers, sizeof(headers), "X-User: %s\r\n", user);
    if (mg_test_http_request(&req, &len, "GET", "/hello", headers, NULL, 0) != 0)
        return MG_ENOMEM;
    mg_test_http_response_init(r);
    r->keep_body = true;
    int rc = fd >= 0 ? gw_exchange_fd(fd, req, len, r, timeout_ms, NULL)
                     : gw_exchange(port, req, len, r, timeout_ms, NULL);
    free(req);
    return rc;
}

/* pool.handshakes.<key> from /stats. */
static long handshake_stat(gw_t *g, const char *key)
{
    mg_test_http_response_t r;
    int rc = gw_request(g, "GET", "/stats", NULL, NULL, 0, &r, 5000);
    gw_expect_status(g, rc, &r, 200, "GET /stats");
    json_t *root = json_loadb(r.body, r.body_len, 0, NULL);
    assert_non_null(root);
    json_t *v = json_object_get(json_object_get(json_object_get(root, "pool"), "handshakes"),
                                key);
    assert_true(json_is_integer(v));
    long out = (long)json_integer_value(v);
    json_decref(root);
    mg_test_http_response_free(&r);
    return out;
}

/* Waits up to timeout_ms until pool.handshakes.<key> reads want. */
static void wait_handshake_stat(gw_t *g, const char *key, long want, int timeout_ms)
{
    double deadline = mg_test_now_ms() + timeout_ms;
    long v;
    while ((v = handshake_stat(g, key)) != want && mg_test_now_ms() < deadline)
        mg_test_sleep_ms(20);
    if (v != want) {
        gw_print_log_tail(g, 20);
        fail_msg("handshakes.%s stayed %ld, expected %ld", key, v, want);
    }
}

/* ---- twenty users at once, two handshakes at a time ---- */

typedef struct herd_user {
    uint16_t port;
    int index;
    pthread_barrier_t *go;
    int rc;
    int status;
    bool hello;
} herd_user_t;

static void *herd_run(void *arg)
{
    herd_user_t *u = arg;
    char user[32];
    snprintf(user, sizeof(user), "herd%d", u->index);
    int fd = gw_connect(u->port, 5000);
    /* Everyone connected first, then every request goes out at the same moment. */
    pthread_barrier_wait(u->go);
    mg_test_http_response_t r;
    u->rc = fd < 0 ? fd : hello_as(u->port, fd, user, &r, 60000);
    if (fd >= 0) {
        u->status = r.status;
        u->hello = u->rc == 0 && r.body != NULL && strcmp(r.body, "hello\n") == 0;
        mg_test_http_response_free(&r);
    }
    return NULL;
}

/* HERD users at once through a gateway started with env, whose bound for them is two. */
static void herd_of_twenty(world_t *w, const char *const *env)
{
    gw_t g = { 0 };
    start_gateway(w, &g, env);

    pthread_barrier_t go;
    assert_int_equal(pthread_barrier_init(&go, NULL, HERD), 0);
    herd_user_t u[HERD];
    pthread_t t[HERD];
    for (int i = 0; i < HERD; i++) {
        u[i] = (herd_user_t){ .port = g.port, .index = i, .go = &go };
        assert_int_equal(pthread_create(&t[i], NULL, herd_run, &u[i]), 0);
    }
    int served = 0;
    for (int i = 0; i < HERD; i++) {
        pthread_join(t[i], NULL);
        if (u[i].hello && u[i].status == 200)
            served++;
        else
            print_message("user herd%d: rc=%d status=%d\n", i, u[i].rc, u[i].status);
    }
    pthread_barrier_destroy(&go);
    if (served != HERD)
        gw_print_log_tail(&g, 30);
    assert_int_equal(served, HERD);

    /* Twenty connections, all through the gate, never more than two in it at once; and the
       twenty arrived together, so most of them waited their turn. */
    assert_int_equal(handshake_stat(&g, "peak"), 2);
    assert_int_equal(handshake_stat(&g, "running"), 0);
    assert_int_equal(handshake_stat(&g, "queued"), 0);
    assert_true(gw_metric(&g, "moongate_ssh_connections_opened_total") == HERD);
    assert_true(gw_metric(&g, "moongate_pool_handshake_wait_seconds_count") == HERD);
    double waited_none = gw_metric(&g, "moongate_pool_handshake_wait_seconds_bucket{le=\"0.001\"}");
    print_message("%d users served; %.0f of them found a slot free at once\n", served,
                  waited_none);
    assert_true(waited_none >= 2 && waited_none < HERD);
    gw_stop(&g);
}

static void test_herd_served_two_at_a_time(void **state)
{
    const char *env[] = { "MOONGATE_MAX_HANDSHAKES=2", NULL };
    herd_of_twenty(*state, env);
}

/* Every user's route dials the same sshd: the bound per server holds them to two as well. */
static void test_herd_two_per_server(void **state)
{
    const char *env[] = { "MOONGATE_MAX_HANDSHAKES_PER_SERVER=2", NULL };
    herd_of_twenty(*state, env);
}

/* ---- a deadline that passes in the queue, and a full queue ---- */

typedef struct one_request {
    uint16_t port;
    const char *user;
    int rc;
    int status;
    char body[512];
    char retry_after[16];
    double took_ms;
} one_request_t;

static void *one_run(void *arg)
{
    one_request_t *q = arg;
    mg_test_http_response_t r;
    double t0 = mg_test_now_ms();
    q->rc = hello_as(q->port, -1, q->user, &r, 30000);
    q->took_ms = mg_test_now_ms() - t0;
    q->status = r.status;
    snprintf(q->body, sizeof(q->body), "%.*s", (int)r.body_len, r.body ? r.body : "");
    const char *ra = mg_test_http_response_header(&r, "retry-after");
    snprintf(q->retry_after, sizeof(q->retry_after), "%s", ra ? ra : "");
    mg_test_http_response_free(&r);
    return NULL;
}

static void test_deadline_in_queue_and_full_queue(void **state)
{
    world_t *w = *state;
    gw_t g = { 0 };
    const char *env[] = { "MOONGATE_MAX_HANDSHAKES=1", "MOONGATE_HANDSHAKE_QUEUE_MAX=1",
                          "SSH_CONNECTION_TIMEOUT=6000", NULL };
    start_gateway(w, &g, env);

    /* mute takes the one slot for SSH_CONNECTION_TIMEOUT. */
    one_request_t mute = { .port = g.port, .user = "mute" };
    pthread_t tm;
    assert_int_equal(pthread_create(&tm, NULL, one_run, &mute), 0);
    wait_handshake_stat(&g, "running", 1, 5000);

    /* late waits in the queue, and its 1.5 s pass there. */
    one_request_t late = { .port = g.port, .user = "late" };
    pthread_t tl;
    assert_int_equal(pthread_create(&tl, NULL, one_run, &late), 0);
    wait_handshake_stat(&g, "queued", 1, 2000);

    /* With one running and one queued, a third user is refused at once. */
    one_request_t third = { .port = g.port, .user = "third" };
    one_run(&third);
    pthread_join(tl, NULL);
    print_message("third: %d in %.0f ms: %s\n", third.status, third.took_ms, third.body);
    print_message("late: %d in %.0f ms: %s\n", late.status, late.took_ms, late.body);
    assert_int_equal(third.rc, 0);
    assert_int_equal(third.status, 503);
    assert_non_null(strstr(third.body, "Too many SSH connections being opened at once"));
    assert_string_equal(third.retry_after, "1");
    assert_true(gw_metric(&g, "moongate_pool_handshakes_refused_total") == 1);
    assert_int_equal(gw_log_count(&g, "handshake queue full"), 1);

    assert_int_equal(late.rc, 0);
    assert_int_equal(late.status, 504);
    assert_non_null(strstr(late.body, "Timed out after 1500 ms waiting for a connection"));
    assert_non_null(strstr(late.body, "queued for a handshake slot"));
    assert_true(late.took_ms >= 1400 && late.took_ms < 5000);
    /* Its place is given back at once: the queue is empty while mute still holds the slot. */
    assert_int_equal(handshake_stat(&g, "queued"), 0);
    assert_int_equal(handshake_stat(&g, "running"), 1);

    /* mute's connect fails at its own timeout and the slot is free again. */
    pthread_join(tm, NULL);
    print_message("mute: %d in %.0f ms\n", mute.status, mute.took_ms);
    assert_int_equal(mute.status, 504);
    wait_handshake_stat(&g, "running", 0, 2000);
    one_request_t again = { .port = g.port, .user = "late" };
    one_run(&again);
    assert_int_equal(again.status, 200);
    assert_string_equal(again.body, "hello\n");
    assert_int_equal(handshake_stat(&g, "peak"), 1);
    gw_stop(&g);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_herd_served_two_at_a_time),
        cmocka_unit_test(test_herd_two_per_server),
        cmocka_unit_test(test_deadline_in_queue_and_full_queue),
    };
    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
