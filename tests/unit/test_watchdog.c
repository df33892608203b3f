/*
 * Unit tests for src/gateway/watchdog.c on a real uv loop: a loop that keeps beating (busy or
 * idle) is left alone; a loop stuck in a callback is reported and aborted, in a child process,
 * with what the describe callback says and a backtrace on stderr.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "gateway/watchdog.h"

#include "moongate/error.h"

#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static uint64_t now_ms(void)
{
    return uv_hrtime() / 1000000u;
}

static void busy_for(uint64_t ms)
{
    uint64_t end = uv_hrtime() + ms * 1000000u;
    while (uv_hrtime() < end)
        ;
}

typedef struct run {
    uv_timer_t t;
    int ticks, max_ticks;
    uint64_t busy_ms; /* per tick */
} run_t;

static void on_tick(uv_timer_t *t)
{
    run_t *r = t->data;
    busy_for(r->busy_ms);
    if (++r->ticks == r->max_ticks)
        uv_timer_stop(t);
}

static void describe(void *arg, char *buf, size_t len)
{
    snprintf(buf, len, "in %s", (const char *)arg);
}

/* Arguments are checked, and one watchdog at a time. */
static void test_start_rules(void **state)
{
    (void)state;
    uv_loop_t loop;
    assert_int_equal(uv_loop_init(&loop), 0);
    mg_watchdog_t *w = NULL, *w2 = NULL;
    assert_int_equal(mg_watchdog_start(&loop, 99, NULL, NULL, &w), MG_EINVAL);
    assert_null(w);
    assert_int_equal(mg_watchdog_start(&loop, 1000, NULL, NULL, &w), 0);
    assert_non_null(w);
    assert_int_equal(mg_watchdog_start(&loop, 1000, NULL, NULL, &w2), MG_EINVAL);
    mg_watchdog_stop(w);
    mg_watchdog_stop(NULL);
    /* The heartbeat is unreferenced: the loop does not wait for it; the stop's close runs. */
    assert_int_equal(uv_run(&loop, UV_RUN_DEFAULT), 0);
    assert_int_equal(uv_loop_close(&loop), 0);
}

/* Work in short pieces (each well under the timeout) and idle stretches longer than it are not
 * stalls. */
static void test_busy_and_idle_loops_live(void **state)
{
    (void)state;
    uv_loop_t loop;
    assert_int_equal(uv_loop_init(&loop), 0);
    mg_watchdog_t *w = NULL;
    assert_int_equal(mg_watchdog_start(&loop, 200, NULL, NULL, &w), 0);
    run_t busy = { .max_ticks = 40, .busy_ms = 60 };
    uv_timer_init(&loop, &busy.t);
    busy.t.data = &busy;
    uv_timer_start(&busy.t, on_tick, 0, 1);
    uint64_t t0 = now_ms();
    uv_run(&loop, UV_RUN_DEFAULT);
    assert_int_equal(busy.ticks, 40);
    run_t idle = { .max_ticks = 1 };
    uv_timer_init(&loop, &idle.t);
    idle.t.data = &idle;
    uv_timer_start(&idle.t, on_tick, 700, 0); /* the loop sleeps 700 ms in epoll */
    uv_run(&loop, UV_RUN_DEFAULT);
    print_message("busy 40 x 60 ms and idle 700 ms under a 200 ms watchdog: alive after %llu ms\n",
                  (unsigned long long)(now_ms() - t0));
    mg_watchdog_stop(w);
    uv_close((uv_handle_t *)&busy.t, NULL);
    uv_close((uv_handle_t *)&idle.t, NULL);
    uv_run(&loop, UV_RUN_DEFAULT);
    assert_int_equal(uv_loop_close(&loop), 0);
}

/* A callback that never returns: the child aborts about the timeout later, and says where. */
static void test_stuck_loop_aborts(void **state)
{
    (void)state;
    char path[] = "/tmp/mg-watchdog-XXXXXX";
    int fd = mkstemp(path);
    assert_true(fd >= 0);
    uint64_t t0 = now_ms();
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        dup2(fd, STDERR_FILENO);
        uv_loop_t loop;
        uv_loop_init(&loop);
        mg_watchdog_t *w = NULL;
        if (mg_watchdog_start(&loop, 300, describe, "the test's stuck callback", &w) != 0)
            _exit(3);
        run_t stuck = { .max_ticks = 1, .busy_ms = 20000 };
        uv_timer_init(&loop, &stuck.t);
        stuck.t.data = &stuck;
        uv_timer_start(&stuck.t, on_tick, 50, 0);
        uv_run(&loop, UV_RUN_DEFAULT);
        _exit(0); /* not reached: the watchdog aborts first */
    }
    int status = 0;
    assert_int_equal(waitpid(pid, &status, 0), pid);
    uint64_t took = now_ms() - t0;
    char log[16384];
    ssize_t n = pread(fd, log, sizeof(log) - 1, 0);
    close(fd);
    unlink(path);
    log[n > 0 ? n : 0] = '\0';
    print_message("stuck loop: %s %d after %llu ms; stderr:\n%.600s\n",
                  WIFSIGNALED(status) ? "signal" : "exit",
                  WIFSIGNALED(status) ? WTERMSIG(status) : WEXITSTATUS(status),
                  (unsigned long long)took, log);
    assert_true(WIFSIGNALED(status));
    assert_int_equal(WTERMSIG(status), SIGABRT);
    assert_true(took >= 300 && took < 3000);
    assert_non_null(strstr(log, "error watchdog: the event loop has made no progress for "));
    assert_non_null(strstr(log, "the loop is in the test's stuck callback"));
    assert_non_null(strstr(log, "the loop's thread, innermost first:"));
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_start_rules),
        cmocka_unit_test(test_busy_and_idle_loops_live),
        cmocka_unit_test(test_stuck_loop_aborts),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
