/*
 * watchdog: ends a process whose event loop has stopped making progress.
 *
 * Everything moongate does runs on one libuv loop, so one callback that never returns (a C
 * function spinning inside a policy hook, a bug in our own code) stops every user's traffic, and
 * SIGTERM too: the signal is handled on that same loop. The watchdog is a thread of its own that
 * watches a heartbeat the loop beats from a timer. When the heartbeat has not moved for the
 * timeout, it stops the loop's thread with a signal whose handler says where the loop is (what
 * the describe callback reports, e.g. the policy hook and its file:line, and the C backtrace),
 * then aborts, so that the supervisor (systemd's Restart=) starts a fresh process instead of
 * leaving a hung one in front of the users. If the handler cannot run, the watchdog thread
 * aborts by itself a moment later.
 *
 * Time the watchdog thread itself was not scheduled (a suspended VM, a stopped process) does not
 * count as the loop's: each check adds at most two heartbeat periods to the stall.
 *
 * One watchdog per process. Start and stop it on the loop's thread.
 */
#ifndef MOONGATE_WATCHDOG_H
#define MOONGATE_WATCHDOG_H

#include <stddef.h>
#include <stdint.h>
#include <uv.h>

typedef struct mg_watchdog mg_watchdog_t;

/*
 * Writes into buf (NUL-terminated, at most len bytes) what the loop is doing, or "" if nothing
 * worth saying. Runs in a signal handler on the loop's thread while the loop is stuck, just
 * before the process aborts: it may read the loop's state but must not allocate or lock.
 */
typedef void (*mg_watchdog_describe_fn)(void *arg, char *buf, size_t len);

/*
 * Starts watching loop (whose thread is the calling thread): a stall of timeout_ms aborts the
 * process. describe may be NULL. Returns 0, MG_EINVAL (timeout_ms below 100, or a watchdog is
 * already running), MG_ENOMEM, or the error of creating the thread.
 */
int mg_watchdog_start(uv_loop_t *loop, uint64_t timeout_ms, mg_watchdog_describe_fn describe,
                      void *arg, mg_watchdog_t **out);

/* Stops the thread (joining it) and closes the heartbeat's timer; the memory goes in the
 * timer's close callback, so the loop must run once more. NULL is a no-op. */
void mg_watchdog_stop(mg_watchdog_t *w);

#endif
