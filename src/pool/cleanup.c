/*
 * cleanup: see include/moongate/cleanup.h.
 */
#include "moongate/cleanup.h"

#include "moongate/error.h"
#include "moongate/log.h"

#include <inttypes.h>
#ifdef __GLIBC__
#include <malloc.h>
#endif
#include <stdlib.h>
#include <string.h>

struct mg_cleanup {
    uv_timer_t timer; /* data points back here; the close callback frees through it */
    mg_pool_t *pool;
    uint64_t interval_ms;
    uint64_t max_idle_ms;
    bool running;
    uint64_t runs;
    uint64_t total_cleaned;
    int last_cleaned;
    uint64_t last_run_ms;
};

#define TRIM_SLOW_MS 10

static uint64_t wall_ms(void)
{
    uv_timeval64_t tv;
    if (uv_gettimeofday(&tv) != 0)
        return 0;
    return (uint64_t)tv.tv_sec * 1000 + (uint64_t)tv.tv_usec / 1000;
}

static void cleanup_timer_cb(uv_timer_t *t)
{
    mg_cleanup_trigger(t->data);
}

int mg_cleanup_new(uv_loop_t *loop, mg_pool_t *pool, const mg_settings_t *settings,
                   mg_cleanup_t **out)
{
    if (loop == NULL || pool == NULL || settings == NULL || out == NULL ||
        settings->cleanup_interval_ms == 0 || settings->max_idle_ms == 0)
        return MG_EINVAL;
    mg_cleanup_t *c = calloc(1, sizeof(*c));
    if (c == NULL)
        return MG_ENOMEM;
    uv_timer_init(loop, &c->timer);
    c->timer.data = c;
    c->pool = pool;
    c->interval_ms = settings->cleanup_interval_ms;
    c->max_idle_ms = settings->max_idle_ms;
    *out = c;
    return 0;
}

int mg_cleanup_configure(mg_cleanup_t *c, uint64_t interval_ms, uint64_t max_idle_ms)
{
    if (interval_ms == 0 || max_idle_ms == 0)
        return MG_EINVAL;
    c->interval_ms = interval_ms;
    c->max_idle_ms = max_idle_ms;
    if (c->running)
        uv_timer_start(&c->timer, cleanup_timer_cb, interval_ms, interval_ms);
    return 0;
}

void mg_cleanup_start(mg_cleanup_t *c)
{
    if (c->running)
        return;
    c->running = true;
    uv_timer_start(&c->timer, cleanup_timer_cb, c->interval_ms, c->interval_ms);
    mg_log_info("cleanup", "started: every %" PRIu64 " ms, idle limit %" PRIu64 " ms",
                c->interval_ms, c->max_idle_ms);
}

void mg_cleanup_stop(mg_cleanup_t *c)
{
    if (!c->running)
        return;
    c->running = false;
    uv_timer_stop(&c->timer);
    mg_log_info("cleanup", "stopped after %" PRIu64 " runs, %" PRIu64 " connections cleaned",
                c->runs, c->total_cleaned);
}

int mg_cleanup_trigger(mg_cleanup_t *c)
{
    int n = mg_pool_cleanup_stale(c->pool, c->max_idle_ms);
    c->runs++;
    c->total_cleaned += (uint64_t)n;
    c->last_cleaned = n;
    c->last_run_ms = wall_ms();
    if (n > 0)
        mg_log_info("cleanup", "closed %d stale connections", n);
#ifdef __GLIBC__
    /* glibc keeps the pages of freed memory in its heaps, so a burst (many clients at once,
       streams held back at their buffers' high-water marks) would stay in the RSS for good.
       Handing the free pages back costs a walk of the free lists, once per sweep: well under a
       millisecond on a heap of tens of MB, more after a burst of GBs, which is said. */
    uint64_t t0 = uv_hrtime();
    malloc_trim(0);
    uint64_t took_ms = (uv_hrtime() - t0) / 1000000;
    if (took_ms >= TRIM_SLOW_MS)
        mg_log_warn("cleanup", "returning freed memory to the system took %" PRIu64 " ms",
                    took_ms);
#endif
    return n;
}

void mg_cleanup_stats(const mg_cleanup_t *c, mg_cleanup_stats_t *out)
{
    memset(out, 0, sizeof(*out));
    out->running = c->running;
    out->interval_ms = c->interval_ms;
    out->max_idle_ms = c->max_idle_ms;
    out->runs = c->runs;
    out->total_cleaned = c->total_cleaned;
    out->last_cleaned = c->last_cleaned;
    out->last_run_ms = c->last_run_ms;
}

static void cleanup_close_cb(uv_handle_t *h)
{
    free(h->data);
}

void mg_cleanup_free(mg_cleanup_t *c)
{
    if (c == NULL)
        return;
    c->running = false;
    uv_close((uv_handle_t *)&c->timer, cleanup_close_cb);
}
