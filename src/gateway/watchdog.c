/*
 * watchdog: see watchdog.h.
 *
 * The loop's side is one unreferenced timer that bumps an atomic counter every period (a fifth
 * of the timeout, between 20 ms and 1 s), so an idle loop still beats: it wakes for the timer.
 * The watchdog's side is a thread that looks at the counter every period and adds up the time
 * it has not moved.
 */
#include "watchdog.h"

#include "moongate/error.h"
#include "moongate/log.h"

#include <errno.h>
#include <execinfo.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define LOG "watchdog"
#define STALL_SIGNAL SIGUSR2
/* How long the loop's thread has to report and abort before the watchdog thread does. */
#define HANDLER_GRACE_MS 2000

struct mg_watchdog {
    uv_timer_t beat;
    pthread_t loop_thread, thread;
    uint64_t timeout_ms, period_ms;
    atomic_uint_fast64_t beats;
    atomic_uint_fast64_t stalled_ms; /* for the report */
    pthread_mutex_t mu;
    pthread_cond_t cv;
    bool stopping; /* under mu */
    mg_watchdog_describe_fn describe;
    void *arg;
    struct sigaction old_action;
};

/* The one watchdog, for the signal handler. */
static mg_watchdog_t *_Atomic current;

static uint64_t mono_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

/* Writes all of buf to stderr, as a signal handler may: with write(2), retrying. */
static void write_all(const char *buf, size_t len)
{
    while (len > 0) {
        ssize_t n = write(STDERR_FILENO, buf, len);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return;
        buf += n;
        len -= (size_t)n;
    }
}

/* One error line in the log's own format, written at once with write(2). */
static void report_line(const char *fmt, ...)
{
    char line[1536];
    va_list ap;
    va_start(ap, fmt);
    size_t len = mg_log_format(line, sizeof(line), MG_LOG_ERROR, LOG, fmt, ap);
    va_end(ap);
    write_all(line, len);
}

/*
 * Runs on the loop's thread, interrupting whatever it is stuck in. The first line goes out
 * before anything that reads the loop's state, so that it is said even if that goes wrong.
 */
static void on_stall_signal(int sig)
{
    (void)sig;
    mg_watchdog_t *w = atomic_load(&current);
    if (w == NULL)
        return;
    report_line("the event loop has made no progress for %llu ms: aborting, so that the "
                "supervisor starts a fresh process (MOONGATE_WATCHDOG_MS=%llu)",
                (unsigned long long)atomic_load(&w->stalled_ms),
                (unsigned long long)w->timeout_ms);
    if (w->describe != NULL) {
        char where[1024] = "";
        w->describe(w->arg, where, sizeof(where));
        if (where[0] != '\0')
            report_line("the loop is %s", where);
    }
    void *frames[64];
    int n = backtrace(frames, 64);
    report_line("the loop's thread, innermost first:");
    backtrace_symbols_fd(frames, n, STDERR_FILENO);
    abort();
}

static void *watch(void *arg)
{
    mg_watchdog_t *w = arg;
    uint64_t seen = atomic_load(&w->beats), stalled = 0, last = mono_ms();
    pthread_mutex_lock(&w->mu);
    while (!w->stopping) {
        struct timespec until;
        clock_gettime(CLOCK_MONOTONIC, &until);
        until.tv_sec += (time_t)(w->period_ms / 1000);
        until.tv_nsec += (long)(w->period_ms % 1000) * 1000000L;
        if (until.tv_nsec >= 1000000000L) {
            until.tv_sec++;
            until.tv_nsec -= 1000000000L;
        }
        int rc = 0;
        while (!w->stopping && rc != ETIMEDOUT)
            rc = pthread_cond_timedwait(&w->cv, &w->mu, &until);
        if (w->stopping)
            break;

        uint64_t now = mono_ms(), elapsed = now - last;
        last = now;
        uint64_t b = atomic_load(&w->beats);
        if (b != seen) {
            seen = b;
            stalled = 0;
            continue;
        }
        /* A long sleep means this thread was not running either: count little of it. */
        stalled += elapsed < 2 * w->period_ms ? elapsed : 2 * w->period_ms;
        if (stalled < w->timeout_ms)
            continue;

        atomic_store(&w->stalled_ms, stalled);
        pthread_mutex_unlock(&w->mu);
        pthread_kill(w->loop_thread, STALL_SIGNAL);
        struct timespec grace = { HANDLER_GRACE_MS / 1000, (HANDLER_GRACE_MS % 1000) * 1000000L };
        while (nanosleep(&grace, &grace) != 0 && errno == EINTR)
            ;
        report_line("the event loop has made no progress for %llu ms and did not answer the "
                    "watchdog's signal: aborting",
                    (unsigned long long)(stalled + HANDLER_GRACE_MS));
        abort();
    }
    pthread_mutex_unlock(&w->mu);
    return NULL;
}

static void on_beat(uv_timer_t *t)
{
    mg_watchdog_t *w = t->data;
    atomic_fetch_add(&w->beats, 1);
}

int mg_watchdog_start(uv_loop_t *loop, uint64_t timeout_ms, mg_watchdog_describe_fn describe,
                      void *arg, mg_watchdog_t **out)
{
    *out = NULL;
    if (timeout_ms < 100 || atomic_load(&current) != NULL)
        return MG_EINVAL;
    mg_watchdog_t *w = calloc(1, sizeof(*w));
    if (w == NULL)
        return MG_ENOMEM;
    w->loop_thread = pthread_self();
    w->timeout_ms = timeout_ms;
    w->period_ms = timeout_ms / 5;
    if (w->period_ms < 20)
        w->period_ms = 20;
    if (w->period_ms > 1000)
        w->period_ms = 1000;
    w->describe = describe;
    w->arg = arg;

    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&w->cv, &ca);
    pthread_condattr_destroy(&ca);
    pthread_mutex_init(&w->mu, NULL);

    /* backtrace() loads libgcc on its first call, which allocates: do that now, not in the
     * signal handler. */
    void *frame[1];
    (void)backtrace(frame, 1);

    struct sigaction sa;
    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = on_stall_signal;
    sigemptyset(&sa.sa_mask);
    sigaction(STALL_SIGNAL, &sa, &w->old_action);
    atomic_store(&current, w);

    /* The thread must not take the stall signal: block it there. */
    sigset_t block, old;
    sigemptyset(&block);
    sigaddset(&block, STALL_SIGNAL);
    pthread_sigmask(SIG_BLOCK, &block, &old);
    int err = pthread_create(&w->thread, NULL, watch, w);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (err != 0) {
        atomic_store(&current, NULL);
        sigaction(STALL_SIGNAL, &w->old_action, NULL);
        pthread_cond_destroy(&w->cv);
        pthread_mutex_destroy(&w->mu);
        free(w);
        return -err;
    }

    uv_timer_init(loop, &w->beat);
    w->beat.data = w;
    uv_timer_start(&w->beat, on_beat, w->period_ms, w->period_ms);
    uv_unref((uv_handle_t *)&w->beat);
    mg_log_debug(LOG, "watching the event loop: a stall of %llu ms aborts the process",
                 (unsigned long long)timeout_ms);
    *out = w;
    return 0;
}

static void on_beat_closed(uv_handle_t *h)
{
    free(h->data);
}

void mg_watchdog_stop(mg_watchdog_t *w)
{
    if (w == NULL)
        return;
    pthread_mutex_lock(&w->mu);
    w->stopping = true;
    pthread_cond_signal(&w->cv);
    pthread_mutex_unlock(&w->mu);
    pthread_join(w->thread, NULL);
    atomic_store(&current, NULL);
    sigaction(STALL_SIGNAL, &w->old_action, NULL);
    pthread_cond_destroy(&w->cv);
    pthread_mutex_destroy(&w->mu);
    uv_close((uv_handle_t *)&w->beat, on_beat_closed);
}
