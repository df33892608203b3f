/*
 * Unit tests for src/gateway/proxy.c over a fake channel layer: this program defines the
 * mg_ssh_chan_* functions proxy.c calls (and mg_ssh_backend_conn), so each test plays the
 * upstream by hand, on a real pool with the fake backend and a real uv loop:
 *
 *   - a kept-alive response leaves its channel idle, and the user's next request to the same
 *     target goes out on it (no second open);
 *   - a request that fails on a reused channel before any response byte is sent again, whole,
 *     on a fresh channel; one that got a byte is not;
 *   - Connection: close, and the keep-alive time running out, close the channel;
 *   - an idle channel the upstream speaks on is closed (its bytes answer no request).
 */
#include "fake_backend.h"
#include "moongate/error.h"
#include "moongate/proxy.h"
#include "moongate/settings.h"
#include "moongate/ssh_backend.h"

#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

/* ---- the fake channel layer ---- */

#define CHANS_MAX 16

struct mg_ssh_chan {
    const mg_ssh_chan_cbs_t *cbs;
    void *data;
    char host[64];
    int port;
    char sent[8192]; /* what the proxy wrote */
    size_t sent_len;
    bool reading;
    bool close_called;
    bool closed;     /* on_close delivered */
    uv_timer_t close_timer;
};

static struct mg_ssh_chan chans[CHANS_MAX];
static int nchans;
static uv_loop_t *fake_loop;
static int fake_conn_token;

mg_ssh_conn_t *mg_ssh_backend_conn(const mg_pool_conn_t *pc)
{
    return (mg_ssh_conn_t *)&fake_conn_token;
}

uint64_t mg_ssh_conn_id(const mg_ssh_conn_t *c)
{
    return 7;
}

int mg_ssh_chan_open(mg_ssh_conn_t *c, const char *host, int port, const mg_ssh_chan_cbs_t *cbs,
                     void *data, mg_ssh_chan_t **out)
{
    if (nchans >= CHANS_MAX)
        return MG_ENOMEM;
    mg_ssh_chan_t *ch = &chans[nchans++];
    memset(ch, 0, sizeof(*ch));
    ch->cbs = cbs;
    ch->data = data;
    snprintf(ch->host, sizeof(ch->host), "%s", host);
    ch->port = port;
    ch->reading = true;
    *out = ch;
    return 0;
}

ssize_t mg_ssh_chan_write(mg_ssh_chan_t *ch, const char *buf, size_t len)
{
    if (ch->close_called)
        return MG_ECLOSED;
    assert_true(ch->sent_len + len <= sizeof(ch->sent));
    memcpy(ch->sent + ch->sent_len, buf, len);
    ch->sent_len += len;
    return (ssize_t)len;
}

static void deliver_close(uv_timer_t *t)
{
    mg_ssh_chan_t *ch = t->data;
    ch->closed = true;
    ch->cbs->on_close(ch, 0);
}

/* Like the real one: on_close follows on the loop, not from inside the call. */
void mg_ssh_chan_close(mg_ssh_chan_t *ch)
{
    if (ch->close_called)
        return;
    ch->close_called = true;
    uv_timer_init(fake_loop, &ch->close_timer);
    ch->close_timer.data = ch;
    uv_timer_start(&ch->close_timer, deliver_close, 0, 0);
}

void mg_ssh_chan_read_stop(mg_ssh_chan_t *ch) { ch->reading = false; }
void mg_ssh_chan_read_start(mg_ssh_chan_t *ch) { ch->reading = true; }
void *mg_ssh_chan_data(const mg_ssh_chan_t *ch) { return ch->data; }
const char *mg_ssh_chan_error(const mg_ssh_chan_t *ch) { return ""; }
mg_ssh_conn_t *mg_ssh_chan_conn(const mg_ssh_chan_t *ch)
{
    return (mg_ssh_conn_t *)&fake_conn_token;
}

/* The upstream's side of channel i. */
static void up_open(int i) { chans[i].cbs->on_open(&chans[i], 0); }
static void up_send(int i, const char *s) { chans[i].cbs->on_data(&chans[i], s, strlen(s)); }
static void up_eof(int i) { chans[i].cbs->on_eof(&chans[i]); }

/* ---- an exchange and what it saw ---- */

typedef struct seen {
    int status;       /* the response's, 0 until the head */
    char body[256];
    size_t body_len;
    bool done;
    int done_status;
    char message[256];
} seen_t;

static void on_head(mg_exchange_t *x, const mg_http1_resp_head_t *head)
{
    seen_t *s = mg_exchange_data(x);
    s->status = head->status;
}

static void on_body(mg_exchange_t *x, const char *buf, size_t len)
{
    seen_t *s = mg_exchange_data(x);
    assert_true(s->body_len + len < sizeof(s->body));
    memcpy(s->body + s->body_len, buf, len);
    s->body_len += len;
}

static void on_writable(mg_exchange_t *x) {}

static void on_done(mg_exchange_t *x, int status, const char *message)
{
    seen_t *s = mg_exchange_data(x);
    s->done = true;
    s->done_status = status;
    snprintf(s->message, sizeof(s->message), "%s", message ? message : "");
}

static const mg_exchange_cbs_t cbs = { on_head, on_body, on_writable, on_done };

typedef struct fixture {
    uv_loop_t loop;
    mg_settings_t settings;
    fake_backend_t fb;
    mg_pool_t *pool;
    mg_proxy_t *px;
    mg_ssh_conn_opts_t route;
} fixture_t;

static const char head_get[] = "GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n";

static int setup(void **state)
{
    fixture_t *f = calloc(1, sizeof(*f));
    assert_non_null(f);
    memset(chans, 0, sizeof(chans));
    nchans = 0;
    assert_int_equal(uv_loop_init(&f->loop), 0);
    fake_loop = &f->loop;
    mg_settings_init(&f->settings);
    assert_int_equal(mg_pool_new(&f->loop, &f->settings, &fake_backend_ops, &f->fb, &f->pool), 0);
    mg_proxy_opts_t o;
    mg_proxy_opts_init(&o);
    o.keepalive_ms = 60;
    assert_int_equal(mg_proxy_new(&f->loop, f->pool, &o, &f->px), 0);
    /* (The route is only handed to the fake backend.) */
    *state = f;
    return 0;
}

static int teardown(void **state)
{
    fixture_t *f = *state;
    mg_proxy_drain(f->px);
    run_ms(&f->loop, 5);
    mg_proxy_free(f->px);
    fake_finish_closing(&f->fb);
    f->fb.close_sync = true;
    mg_pool_close_all(f->pool, true, "teardown");
    run_ms(&f->loop, 5);
    mg_pool_free(f->pool);
    for (int i = 0; i < nchans; i++)
        if (chans[i].close_called && !uv_is_closing((uv_handle_t *)&chans[i].close_timer))
            uv_close((uv_handle_t *)&chans[i].close_timer, NULL);
    uv_run(&f->loop, UV_RUN_DEFAULT);
    assert_int_equal(uv_loop_close(&f->loop), 0);
    free(f);
    return 0;
}

/* Starts a GET for alice to 127.0.0.1:11434. */
static mg_exchange_t *start(fixture_t *f, seen_t *s)
{
    memset(s, 0, sizeof(*s));
    mg_exchange_req_t r = { .user = "alice", .route = &f->route, .target_host = "127.0.0.1",
                            .target_port = 11434, .method = "GET", .head = head_get,
                            .head_len = sizeof(head_get) - 1 };
    mg_exchange_t *x = NULL;
    char err[256];
    assert_int_equal(mg_exchange_start(f->px, &r, &cbs, s, &x, err, sizeof(err)), 0);
    return x;
}

/* The first exchange: the pool's connection comes up, channel 0 opens, the request goes out
   and the upstream answers with a kept-alive response. */
static void first_exchange(fixture_t *f, seen_t *s)
{
    start(f, s);
    run_ms(&f->loop, 1);
    assert_int_equal(fake_ready_all(&f->fb), 1);
    run_ms(&f->loop, 1);
    assert_int_equal(nchans, 1);
    up_open(0);
    assert_int_equal(chans[0].sent_len, sizeof(head_get) - 1);
    assert_memory_equal(chans[0].sent, head_get, sizeof(head_get) - 1);
    up_send(0, "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok");
    run_ms(&f->loop, 1);
    assert_true(s->done);
    assert_int_equal(s->done_status, 0);
    assert_int_equal(s->status, 200);
    assert_int_equal(s->body_len, 2);
    assert_memory_equal(s->body, "ok", 2);
}

static void test_kept_alive_channel_is_reused(void **state)
{
    fixture_t *f = *state;
    seen_t a, b;
    first_exchange(f, &a);
    mg_proxy_stats_t st;
    mg_proxy_stats(f->px, &st);
    assert_int_equal(st.idle_channels, 1);
    assert_false(chans[0].close_called);

    start(f, &b);
    run_ms(&f->loop, 1);
    /* No second open: the head went out on channel 0 at once. */
    assert_int_equal(nchans, 1);
    assert_int_equal(chans[0].sent_len, 2 * (sizeof(head_get) - 1));
    up_send(0, "HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nyes");
    run_ms(&f->loop, 1);
    assert_true(b.done);
    assert_int_equal(b.done_status, 0);
    assert_memory_equal(b.body, "yes", 3);
    mg_proxy_stats(f->px, &st);
    assert_int_equal(st.exchanges, 2);
    assert_int_equal(st.reused, 1);
    assert_int_equal(st.retried, 0);
}

static void test_reused_channel_failure_is_retried_on_a_fresh_one(void **state)
{
    fixture_t *f = *state;
    seen_t a, b;
    first_exchange(f, &a);
    start(f, &b);
    run_ms(&f->loop, 1);
    assert_int_equal(chans[0].sent_len, 2 * (sizeof(head_get) - 1));
    /* The upstream had closed the idle connection as the request went out. */
    up_eof(0);
    run_ms(&f->loop, 2);
    assert_true(chans[0].closed);
    assert_false(b.done);
    assert_int_equal(nchans, 2);
    up_open(1);
    /* The same request, whole, on the fresh channel. */
    assert_int_equal(chans[1].sent_len, sizeof(head_get) - 1);
    assert_memory_equal(chans[1].sent, head_get, sizeof(head_get) - 1);
    up_send(1, "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok");
    run_ms(&f->loop, 1);
    assert_true(b.done);
    assert_int_equal(b.done_status, 0);
    mg_proxy_stats_t st;
    mg_proxy_stats(f->px, &st);
    assert_int_equal(st.retried, 1);
}

static void test_no_retry_once_a_response_byte_came(void **state)
{
    fixture_t *f = *state;
    seen_t a, b;
    first_exchange(f, &a);
    start(f, &b);
    run_ms(&f->loop, 1);
    up_send(0, "HTTP/1.1 200 OK\r\nContent-Le");
    up_eof(0);
    run_ms(&f->loop, 2);
    assert_true(b.done);
    assert_int_not_equal(b.done_status, 0);
    assert_int_equal(nchans, 1);
    mg_proxy_stats_t st;
    mg_proxy_stats(f->px, &st);
    assert_int_equal(st.retried, 0);
}

static void test_connection_close_is_not_kept(void **state)
{
    fixture_t *f = *state;
    seen_t a;
    start(f, &a);
    run_ms(&f->loop, 1);
    fake_ready_all(&f->fb);
    run_ms(&f->loop, 1);
    up_open(0);
    up_send(0, "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok");
    run_ms(&f->loop, 2);
    assert_true(a.done);
    assert_int_equal(a.done_status, 0);
    assert_true(chans[0].close_called);
    mg_proxy_stats_t st;
    mg_proxy_stats(f->px, &st);
    assert_int_equal(st.idle_channels, 0);
}

static void test_idle_channel_closes_after_keepalive(void **state)
{
    fixture_t *f = *state;
    seen_t a;
    first_exchange(f, &a);
    run_ms(&f->loop, 20);
    assert_false(chans[0].close_called);
    run_ms(&f->loop, 80); /* keepalive_ms is 60 */
    assert_true(chans[0].closed);
    mg_proxy_stats_t st;
    mg_proxy_stats(f->px, &st);
    assert_int_equal(st.idle_channels, 0);
}

static void test_idle_channel_that_speaks_is_closed(void **state)
{
    fixture_t *f = *state;
    seen_t a;
    first_exchange(f, &a);
    up_send(0, "HTTP/1.1 200 OK\r\n\r\n");
    run_ms(&f->loop, 2);
    assert_true(chans[0].closed);
    mg_proxy_stats_t st;
    mg_proxy_stats(f->px, &st);
    assert_int_equal(st.idle_channels, 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_kept_alive_channel_is_reused, setup, teardown),
        cmocka_unit_test_setup_teardown(test_reused_channel_failure_is_retried_on_a_fresh_one,
                                        setup, teardown),
        cmocka_unit_test_setup_teardown(test_no_retry_once_a_response_byte_came, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(test_connection_close_is_not_kept, setup, teardown),
        cmocka_unit_test_setup_teardown(test_idle_channel_closes_after_keepalive, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(test_idle_channel_that_speaks_is_closed, setup,
                                        teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
