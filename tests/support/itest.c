/*
 * itest: see itest.h.
 */
#include "itest.h"

void itest_wake(uv_timer_t *t)
{
    (void)t;
}

bool itest_run_until(uv_loop_t *loop, itest_cond_fn cond, void *arg, int timeout_ms)
{
    uv_timer_t t;
    uv_timer_init(loop, &t);
    /* A short repeating timer keeps uv_run(ONCE) from blocking past the deadline. */
    uv_timer_start(&t, itest_wake, 10, 10);
    double end = mg_test_now_ms() + timeout_ms;
    bool ok;
    while (!(ok = cond(arg)) && mg_test_now_ms() < end)
        uv_run(loop, UV_RUN_ONCE);
    uv_close((uv_handle_t *)&t, NULL);
    uv_run(loop, UV_RUN_NOWAIT);
    return ok;
}

bool itest_flag(void *arg)
{
    return *(bool *)arg;
}

void itest_run_for(uv_loop_t *loop, int ms)
{
    bool never = false;
    itest_run_until(loop, itest_flag, &never, ms);
}

void itest_loop_close(uv_loop_t *loop)
{
    for (int i = 0; i < 100 && uv_run(loop, UV_RUN_NOWAIT) != 0; i++)
        mg_test_sleep_ms(10);
    assert_int_equal(uv_loop_close(loop), 0);
}

bool itest_file_contains(const char *path, const char *needle)
{
    for (int i = 0; i < 50; i++) {
        char *text = NULL;
        size_t len = 0;
        bool seen = false;
        if (mg_test_read_file(path, &text, &len) == 0)
            seen = strstr(text, needle) != NULL;
        free(text);
        if (seen)
            return true;
        mg_test_sleep_ms(20);
    }
    return false;
}

void itest_conn_event(mg_ssh_conn_t *c, mg_ssh_event_t ev, void *data)
{
    itest_conn_t *ic = data;
    switch (ev) {
    case MG_SSH_EV_READY:
        ic->ready = true;
        ic->healthy = true;
        break;
    case MG_SSH_EV_HEALTH:
        ic->healthy = mg_ssh_conn_healthy(c);
        ic->health_changes++;
        break;
    case MG_SSH_EV_CLOSED:
        ic->closed = true;
        ic->status = mg_ssh_conn_status(c);
        snprintf(ic->error, sizeof(ic->error), "%s", mg_ssh_conn_error(c));
        ic->c = NULL;
        break;
    }
}

bool itest_conn_settled(void *arg)
{
    itest_conn_t *ic = arg;
    return ic->ready || ic->closed;
}

bool itest_conn_closed(void *arg)
{
    return ((itest_conn_t *)arg)->closed;
}

void itest_opts(mg_ssh_conn_opts_t *o, const mg_test_sshd_t *sshd)
{
    mg_settings_t s;
    mg_settings_init(&s);
    s.connect_timeout_ms = 5000;
    s.keepalive_interval_ms = 2000;
    s.keepalive_max_misses = 2;
    mg_ssh_conn_opts_init(o, &s);
    o->user = "alice";
    o->host = "127.0.0.1";
    o->port = sshd->port;
    o->ssh_user = sshd->user;
    o->key_path = sshd->client_key;
    o->known_hosts = sshd->known_hosts;
}

void itest_connect(uv_loop_t *loop, const mg_ssh_conn_opts_t *o, itest_conn_t *ic)
{
    memset(ic, 0, sizeof(*ic));
    assert_int_equal(mg_ssh_conn_start(loop, o, NULL, itest_conn_event, ic, &ic->c), 0);
    assert_true(itest_run_until(loop, itest_conn_settled, ic, 10000));
}

void itest_disconnect(uv_loop_t *loop, itest_conn_t *ic)
{
    if (ic->c)
        mg_ssh_conn_close(ic->c, "test done", 0);
    assert_true(itest_run_until(loop, itest_conn_closed, ic, 5000));
}

void itest_on_open(mg_ssh_chan_t *ch, int status)
{
    itest_fetch_t *f = mg_ssh_chan_data(ch);
    f->opened = true;
    f->open_status = status;
    if (status == 0)
        itest_fetch_pump(f);
}

void itest_on_data(mg_ssh_chan_t *ch, const char *buf, size_t len)
{
    itest_fetch_t *f = mg_ssh_chan_data(ch);
    if (f->n_chunk_times < (int)(sizeof(f->chunk_times) / sizeof(f->chunk_times[0])))
        f->chunk_times[f->n_chunk_times++] = mg_test_now_ms();
    assert_int_equal(mg_test_http_response_feed(&f->resp, buf, len, NULL), 0);
    if (f->resp.complete)
        mg_ssh_chan_close(ch);
    else if (f->stop_reading && f->resp.headers_done)
        mg_ssh_chan_read_stop(ch);
}

void itest_on_eof(mg_ssh_chan_t *ch)
{
    itest_fetch_t *f = mg_ssh_chan_data(ch);
    f->eof = true;
    mg_test_http_response_eof(&f->resp);
    mg_ssh_chan_close(ch);
}

void itest_on_writable(mg_ssh_chan_t *ch)
{
    itest_fetch_pump(mg_ssh_chan_data(ch));
}

void itest_on_close(mg_ssh_chan_t *ch, int status)
{
    itest_fetch_t *f = mg_ssh_chan_data(ch);
    f->closed = true;
    f->close_status = status;
    f->ch = NULL;
}

static const mg_ssh_chan_cbs_t itest_chan_cbs = {
    .on_open = itest_on_open,
    .on_data = itest_on_data,
    .on_eof = itest_on_eof,
    .on_writable = itest_on_writable,
    .on_close = itest_on_close,
};

void itest_fetch_pump(itest_fetch_t *f)
{
    static char chunk[64 * 1024];
    while (f->ch && f->head_off < f->head_len) {
        ssize_t n = mg_ssh_chan_write(f->ch, f->head + f->head_off, f->head_len - f->head_off);
        if (n == MG_EAGAIN) {
            f->write_eagains++;
            return;
        }
        assert_true(n > 0);
        f->head_off += (size_t)n;
    }
    while (f->ch && f->body_off < f->body_len) {
        size_t want = f->body_len - f->body_off;
        if (want > sizeof(chunk))
            want = sizeof(chunk);
        /* Regenerate from the same position after a short write: keep a copy of the state. */
        mg_test_stream_t save = f->body_gen;
        mg_test_stream_fill(&f->body_gen, chunk, want);
        ssize_t n = mg_ssh_chan_write(f->ch, chunk, want);
        f->body_gen = save;
        if (n == MG_EAGAIN) {
            f->write_eagains++;
            return;
        }
        assert_true(n > 0);
        mg_test_stream_fill(&f->body_gen, chunk, (size_t)n);
        mg_test_sha256_update(&f->body_sha, chunk, (size_t)n);
        f->body_off += (uint64_t)n;
    }
}

int itest_fetch_start(itest_fetch_t *f, mg_ssh_conn_t *c, uint16_t target_port,
               const char *method, const char *path, uint64_t body_len,
               bool keep_body)
{
    memset(f, 0, sizeof(*f));
    char extra[64];
    snprintf(extra, sizeof(extra), "Content-Length: %llu\r\n", (unsigned long long)body_len);
    assert_int_equal(mg_test_http_request(&f->head, &f->head_len, method, path,
                                          body_len ? extra : NULL, NULL, 0),
                     0);
    f->body_len = body_len;
    mg_test_stream_init(&f->body_gen);
    assert_int_equal(mg_test_sha256_init(&f->body_sha), 0);
    mg_test_http_response_init(&f->resp);
    f->resp.hash_body = true;
    f->resp.keep_body = keep_body;
    return mg_ssh_chan_open(c, "127.0.0.1", target_port, &itest_chan_cbs, f, &f->ch);
}

bool itest_fetch_closed(void *arg)
{
    return ((itest_fetch_t *)arg)->closed;
}

void itest_fetch_free(itest_fetch_t *f)
{
    mg_test_sha256_final_hex(&f->body_sha, f->body_sha_hex);
    mg_test_http_response_free(&f->resp);
    free(f->head);
    f->head = NULL;
}
