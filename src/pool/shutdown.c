/*
 * shutdown: see include/moongate/shutdown.h.
 *
 * Three timers drive the sequence: `step` (started at 0 ms) re-examines the pool after any
 * event, `grace` fires at grace_ms, `hard` at the hard deadline. The pool's hooks (on_idle from
 * mg_pool_drain, the closed callback) may run inside a release or inside a backend call, so
 * they only start `step`; the sequence itself advances in timer callbacks, where calling
 * mg_pool_close_all() is safe. The caller's callback runs from the last timer's close
 * callback, so the caller may free the mg_shutdown_t there.
 */
#include "moongate/shutdown.h"

#include "moongate/error.h"
#include "moongate/log.h"

#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#define HARD_EXTRA_MS 5000
#define DEFAULT_REASON "gateway is shutting down"

static const char *const phase_names[] = { "idle", "draining", "closing", "finishing", "done" };

static uint64_t wall_ms(void)
{
    uv_timeval64_t tv;
    if (uv_gettimeofday(&tv) != 0)
        return 0;
    return (uint64_t)tv.tv_sec * 1000 + (uint64_t)tv.tv_usec / 1000;
}

static bool running(const mg_shutdown_t *s)
{
    return s->phase == MG_SHUTDOWN_DRAINING || s->phase == MG_SHUTDOWN_CLOSING;
}

static void add_error(mg_shutdown_t *s, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

static void add_error(mg_shutdown_t *s, const char *fmt, ...)
{
    mg_shutdown_result_t *r = &s->result;
    size_t len = strlen(r->errors_text);
    if (len > 0 && len + 3 < sizeof(r->errors_text)) {
        memcpy(r->errors_text + len, "; ", 3);
        len += 2;
    }
    if (len + 1 < sizeof(r->errors_text)) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(r->errors_text + len, sizeof(r->errors_text) - len, fmt, ap);
        va_end(ap);
    }
    r->errors++;
    mg_log_warn("shutdown", "%s", r->errors_text + len);
}

static void step_cb(uv_timer_t *t);

static void schedule(mg_shutdown_t *s)
{
    if (running(s))
        uv_timer_start(&s->step, step_cb, 0, 0);
}

static void on_pool_idle(mg_pool_t *pool, void *arg)
{
    schedule(arg);
}

static void on_pool_closed(mg_pool_t *pool, void *arg)
{
    mg_shutdown_t *s = arg;
    if (running(s))
        s->result.connections_closed++;
    schedule(s);
}

static void close_cb(uv_handle_t *h)
{
    mg_shutdown_t *s = h->data;
    if (--s->open_handles > 0)
        return;
    s->phase = MG_SHUTDOWN_DONE;
    s->cb(s, &s->result); /* may free s */
}

/* Fills in the result, lets go of the pool and closes the timers; the callback comes last. */
static void finish(mg_shutdown_t *s)
{
    mg_pool_stats_t st;
    mg_pool_stats(s->pool, &st);
    mg_pool_set_closed_cb(s->pool, NULL, NULL);
    mg_pool_drain(s->pool, NULL, NULL); /* stays draining; only forgets us */
    s->phase = MG_SHUTDOWN_FINISHING;

    mg_shutdown_result_t *r = &s->result;
    r->duration_ms = uv_now(s->loop) - s->started;
    r->leases_left = st.leases;
    r->connections_left = st.total_connections;
    r->success = r->errors == 0 && !r->forced; /* running past the grace is an error */
    if (r->success)
        mg_log_info("shutdown", "done in %" PRIu64 " ms, %d connections closed", r->duration_ms,
                    r->connections_closed);
    else
        mg_log_warn("shutdown", "done in %" PRIu64 " ms, %d connections closed, %d errors: %s",
                    r->duration_ms, r->connections_closed, r->errors, r->errors_text);

    s->open_handles = 3;
    uv_close((uv_handle_t *)&s->step, close_cb);
    uv_close((uv_handle_t *)&s->grace, close_cb);
    uv_close((uv_handle_t *)&s->hard, close_cb);
}

static void close_all(mg_shutdown_t *s, bool force)
{
    int n = mg_pool_close_all(s->pool, force, s->opts.reason);
    if (force)
        s->result.forced = true;
    mg_log_info("shutdown", "closing %d connections%s", n, force ? " with force" : "");
}

static void step_cb(uv_timer_t *t)
{
    mg_shutdown_t *s = t->data;
    mg_pool_stats_t st;

    mg_pool_stats(s->pool, &st);
    if (s->phase == MG_SHUTDOWN_DRAINING && st.leases == 0) {
        s->phase = MG_SHUTDOWN_CLOSING;
        close_all(s, false);
        mg_pool_stats(s->pool, &st);
    }
    if (s->phase == MG_SHUTDOWN_CLOSING && st.total_connections == 0)
        finish(s);
}

static void grace_cb(uv_timer_t *t)
{
    mg_shutdown_t *s = t->data;
    mg_pool_stats_t st;

    mg_pool_stats(s->pool, &st);
    if (s->phase == MG_SHUTDOWN_DRAINING && st.leases > 0) {
        if (s->opts.force_after_grace) {
            add_error(s, "%d requests still in flight after %" PRIu64 " ms grace; forced",
                      st.leases - st.idle_leases, s->opts.grace_ms);
            s->phase = MG_SHUTDOWN_CLOSING;
            close_all(s, true);
        } else {
            add_error(s, "%d requests still in flight after %" PRIu64 " ms grace; waiting",
                      st.leases - st.idle_leases, s->opts.grace_ms);
        }
    } else if (s->phase == MG_SHUTDOWN_CLOSING && st.total_connections > 0) {
        add_error(s, "%d connections still closing after %" PRIu64 " ms grace",
                  st.total_connections, s->opts.grace_ms);
    }
    schedule(s);
}

static void hard_cb(uv_timer_t *t)
{
    mg_shutdown_t *s = t->data;
    mg_pool_stats_t st;

    mg_pool_stats(s->pool, &st);
    add_error(s, "gave up after %" PRIu64 " ms: %d connections still open, %d requests in flight",
              s->opts.hard_timeout_ms, st.total_connections, st.leases - st.idle_leases);
    finish(s);
}

void mg_shutdown_opts_init(mg_shutdown_opts_t *o, const mg_settings_t *settings)
{
    memset(o, 0, sizeof(*o));
    o->grace_ms = settings->shutdown_grace_ms;
    o->force_after_grace = settings->shutdown_force_after_grace;
}

int mg_shutdown_start(mg_shutdown_t *s, uv_loop_t *loop, mg_pool_t *pool,
                      const mg_shutdown_opts_t *o, mg_shutdown_cb cb)
{
    if (s == NULL || loop == NULL || pool == NULL || o == NULL || cb == NULL)
        return MG_EINVAL;
    if (s->phase != MG_SHUTDOWN_IDLE && s->phase != MG_SHUTDOWN_DONE)
        return MG_ESTATE;

    void *data = s->data;
    memset(s, 0, sizeof(*s));
    s->data = data;
    s->loop = loop;
    s->pool = pool;
    s->opts = *o;
    if (s->opts.reason == NULL)
        s->opts.reason = DEFAULT_REASON;
    if (s->opts.hard_timeout_ms == 0)
        s->opts.hard_timeout_ms = s->opts.grace_ms + HARD_EXTRA_MS;
    s->cb = cb;
    s->started = uv_now(loop);
    s->since_ms = wall_ms();
    s->phase = MG_SHUTDOWN_DRAINING;
    uv_timer_t *timers[] = { &s->step, &s->grace, &s->hard };
    for (size_t i = 0; i < sizeof(timers) / sizeof(timers[0]); i++) {
        uv_timer_init(loop, timers[i]);
        timers[i]->data = s;
    }

    mg_pool_stats_t st;
    mg_pool_stats(pool, &st);
    mg_log_info("shutdown", "draining: %d requests in flight, %d idle channels closing, %d "
                "waiting, %d connections; grace %" PRIu64 " ms, then %s",
                st.leases - st.idle_leases, st.idle_leases, st.waiters, st.total_connections,
                s->opts.grace_ms, s->opts.force_after_grace ? "force" : "keep waiting");

    mg_pool_set_closed_cb(pool, on_pool_closed, s);
    mg_pool_drain(pool, on_pool_idle, s); /* schedules the first step when nothing is leased */
    uv_timer_start(&s->grace, grace_cb, s->opts.grace_ms, 0);
    uv_timer_start(&s->hard, hard_cb, s->opts.hard_timeout_ms, 0);
    return 0;
}

void mg_shutdown_stats(const mg_shutdown_t *s, mg_shutdown_stats_t *out)
{
    memset(out, 0, sizeof(*out));
    out->shutting_down = running(s) || s->phase == MG_SHUTDOWN_FINISHING;
    out->done = s->phase == MG_SHUTDOWN_DONE;
    out->since_ms = s->since_ms;
    out->phase = phase_names[s->phase];
}
