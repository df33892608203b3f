/*
 * fake_backend: see fake_backend.h.
 */
#include "fake_backend.h"

#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

int fake_index(const fake_backend_t *fb, const mg_pool_conn_t *pc)
{
    for (int i = 0; i < fb->opens; i++) {
        if (fb->conns[i].pc == pc && fb->conns[i].state != FAKE_FAILED &&
            fb->conns[i].state != FAKE_CLOSED)
            return i;
    }
    return -1;
}

int fake_open(void *ctx, mg_pool_conn_t *pc, const char *user, void *open_arg,
              char *err, size_t errlen)
{
    fake_backend_t *fb = ctx;
    if (fb->opens >= FAKE_MAX) {
        snprintf(err, errlen, "fake backend: too many opens");
        return MG_ENOMEM;
    }
    fake_conn_t *fc = &fb->conns[fb->opens++];
    memset(fc, 0, sizeof(*fc));
    fc->pc = pc;
    snprintf(fc->user, sizeof(fc->user), "%s", user);
    fc->open_arg = open_arg;
    if (fb->open_rc < 0) {
        fc->state = FAKE_FAILED;
        snprintf(err, errlen, "%s", fb->open_err != NULL ? fb->open_err : "");
        return fb->open_rc;
    }
    fc->state = FAKE_OPENING;
    return 0;
}

void fake_close(void *ctx, mg_pool_conn_t *pc, bool force,
                const char *reason)
{
    fake_backend_t *fb = ctx;
    int i = fake_index(fb, pc);
    fb->closes++;
    if (force)
        fb->force_closes++;
    if (i < 0)
        return; /* the pool closed something it does not hold: the test will see counts */
    fake_conn_t *fc = &fb->conns[i];
    fc->close_called = true;
    fc->close_force = force;
    snprintf(fc->close_reason, sizeof(fc->close_reason), "%s", reason != NULL ? reason : "");
    fc->state = FAKE_CLOSING;
    if (fb->close_sync) {
        fc->state = FAKE_CLOSED;
        mg_pool_conn_closed(pc, 0, NULL);
    }
}

static bool fake_server(void *ctx, void *open_arg, char *out, size_t cap)
{
    fake_backend_t *fb = ctx;
    if (++fb->server_calls > fb->server_calls_max && fb->server_calls_max > 0)
        fail_msg("the pool tried to open %d connections: it keeps retrying", fb->server_calls);
    if (!fb->named_servers || open_arg == NULL)
        return false;
    snprintf(out, cap, "%s", (const char *)open_arg);
    return true;
}

static void fake_trim(void *ctx, mg_pool_conn_t *pc)
{
    ((fake_backend_t *)ctx)->trims++;
}

const mg_pool_backend_t fake_backend_ops = {
    .open = fake_open,
    .close = fake_close,
    .server = fake_server,
    .trim = fake_trim,
};

void fake_ready(fake_backend_t *fb, int i)
{
    fb->conns[i].state = FAKE_READY;
    mg_pool_conn_ready(fb->conns[i].pc);
}

int fake_ready_all(fake_backend_t *fb)
{
    int n = 0;
    for (int i = 0; i < fb->opens; i++) {
        if (fb->conns[i].state == FAKE_OPENING) {
            fake_ready(fb, i);
            n++;
        }
    }
    return n;
}

void fake_fail(fake_backend_t *fb, int i, int err, const char *msg)
{
    fb->conns[i].state = FAKE_FAILED;
    mg_pool_conn_failed(fb->conns[i].pc, err, msg);
}

void fake_closed(fake_backend_t *fb, int i)
{
    fb->conns[i].state = FAKE_CLOSED;
    mg_pool_conn_closed(fb->conns[i].pc, MG_ECLOSED, "connection lost");
}

int fake_finish_closing(fake_backend_t *fb)
{
    int n = 0;
    for (int i = 0; i < fb->opens; i++) {
        if (fb->conns[i].state == FAKE_CLOSING) {
            fb->conns[i].state = FAKE_CLOSED;
            mg_pool_conn_closed(fb->conns[i].pc, 0, NULL);
            n++;
        }
    }
    return n;
}

int fake_opens_for(const fake_backend_t *fb, const char *user)
{
    int n = 0;
    for (int i = 0; i < fb->opens; i++)
        n += strcmp(fb->conns[i].user, user) == 0;
    return n;
}

void fake_stop_cb(uv_timer_t *t)
{
    uv_stop(t->loop);
}

void run_ms(uv_loop_t *loop, uint64_t ms)
{
    uv_timer_t t;
    uv_timer_init(loop, &t);
    uv_timer_start(&t, fake_stop_cb, ms, 0);
    uv_run(loop, UV_RUN_DEFAULT);
    uv_close((uv_handle_t *)&t, NULL);
    uv_run(loop, UV_RUN_NOWAIT); /* the close callback, so t may go out of scope */
}

void tick(uv_loop_t *loop)
{
    uv_run(loop, UV_RUN_NOWAIT);
}
