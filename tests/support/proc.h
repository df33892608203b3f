/*
 * proc: child processes, ports, files and temp dirs for integration tests.
 *
 * A test starts real programs (sshd, ssh, curl, mg-upstream). This module spawns them with an
 * argv and an optional environment (never through a shell, so no argument is ever interpolated),
 * sends their stdout and stderr to files, waits for them with a deadline and kills them.
 *
 * Nothing a test starts may outlive it. Every spawned child asks the kernel to SIGKILL it when the
 * test process dies (PR_SET_PDEATHSIG), and every live child and every temp dir made here is
 * remembered: an atexit hook (and, in sanitizer builds, the sanitizer's death callback) kills the
 * children and their descendants and removes the dirs, so a failing assertion or an ASan report
 * still cleans up. mg_test_cleanup_all() does the same on demand. Only a crash outside the
 * sanitizers skips it: then PR_SET_PDEATHSIG still ends the direct children, but temp dirs stay.
 *
 * Helpers also find a free loopback port, wait until a port is listening, read and write whole
 * files, remove a tree, and list a process's descendants through /proc (sshd forks a child per
 * connection, and those children must be paused or killed with it).
 *
 * Every function returns 0 or a negative code: an MG_E* code from moongate/error.h, or a negated
 * errno where it says so. Single-threaded use only.
 */
#ifndef MG_TEST_PROC_H
#define MG_TEST_PROC_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#define MG_TEST_PATH_MAX 256

/* A spawned child. All fields are read-only for the caller. */
typedef struct mg_test_proc {
    pid_t pid;     /* > 0 until mg_test_proc_wait() reaped the child, then 0 */
    bool exited;   /* the child was reaped; status is valid */
    int status;    /* the wait status (WIFEXITED, WEXITSTATUS, WTERMSIG apply) */
} mg_test_proc_t;

/* How to spawn. Zero-initialize; every field is optional. */
typedef struct mg_test_spawn_opts {
    const char *stdin_path;   /* default /dev/null */
    const char *stdout_path;  /* file to create or truncate; default: inherit the test's stdout */
    const char *stderr_path;  /* file to create or truncate; default: inherit the test's stderr */
    char *const *envp;        /* NULL: inherit the environment */
    const char *cwd;          /* NULL: inherit */
    unsigned nofile;          /* nonzero: RLIMIT_NOFILE, soft and hard (`ulimit -n`) */
} mg_test_spawn_opts_t;

/*
 * Starts argv[0] (a path, or a name looked up in PATH) with argv. opts may be NULL.
 * Returns 0, MG_EINVAL, or a negated errno (fork, or the exec itself: an exec failure is reported
 * here, not as an exit code).
 */
int mg_test_proc_spawn(mg_test_proc_t *p, char *const argv[], const mg_test_spawn_opts_t *opts);

/*
 * Waits up to timeout_ms (< 0: forever) for the child to exit and reaps it.
 * Returns 0 once exited (also if it already was), MG_ETIMEDOUT, or MG_ESTATE if never spawned.
 */
int mg_test_proc_wait(mg_test_proc_t *p, int timeout_ms);

/* Sends sig to the child if it still runs. Returns 0, or MG_ESTATE if it was already reaped. */
int mg_test_proc_kill(mg_test_proc_t *p, int sig);

/*
 * Stops the child: SIGTERM, wait up to timeout_ms, then SIGKILL and wait. Returns 0 (the child is
 * reaped), or MG_ETIMEDOUT if it exited only to SIGKILL.
 */
int mg_test_proc_stop(mg_test_proc_t *p, int timeout_ms);

/* The exit code if the child exited normally, 128 + signal if a signal ended it, -1 if running. */
int mg_test_proc_exit_code(const mg_test_proc_t *p);

/*
 * Spawns, waits up to timeout_ms and reaps; kills the child on timeout. *exit_code (may be NULL)
 * gets mg_test_proc_exit_code(). Returns 0 whatever the exit code, MG_ETIMEDOUT, or a spawn error.
 */
int mg_test_proc_run(char *const argv[], const mg_test_spawn_opts_t *opts, int timeout_ms,
                     int *exit_code);

/*
 * Lists every descendant of pid (children, their children, ...) found through /proc, up to cap,
 * into out (parents before their children). *n gets the count. Returns 0, or MG_ENOMEM if there
 * were more than cap.
 */
int mg_test_proc_descendants(pid_t pid, pid_t *out, size_t cap, size_t *n);

/* True if pid exists and is not a zombie. */
bool mg_test_pid_alive(pid_t pid);

/*
 * The state letter of pid from /proc/PID/stat ('R', 'S', 'T' stopped, 'Z' zombie, ...), or 0 if
 * there is no such process.
 */
char mg_test_pid_state(pid_t pid);

/*
 * Kills every child still running and removes every temp dir made here (unless the environment
 * has MG_TEST_KEEP=1: then the dirs stay, for a look at the logs after a failure). Idempotent.
 */
void mg_test_cleanup_all(void);

/*
 * Finds a free TCP port on 127.0.0.1 (binds port 0 and closes). Another process may take it before
 * the caller binds it; prefer letting a program bind port 0 and report its port.
 * Returns 0 or a negated errno.
 */
int mg_test_free_port(uint16_t *port);

/* True if a TCP socket listens on 127.0.0.1:port (read from /proc/net/tcp, no connection made). */
bool mg_test_port_listening(uint16_t port);

/*
 * Waits up to timeout_ms until 127.0.0.1:port listens. If p is not NULL and that child exits
 * meanwhile, gives up at once. Returns 0, MG_ETIMEDOUT, or MG_ECLOSED (the child exited).
 */
int mg_test_wait_port(uint16_t port, int timeout_ms, mg_test_proc_t *p);

/*
 * Reads a whole file into a malloc'd, NUL-terminated buffer (*len excludes the NUL; len may be
 * NULL). The caller frees *data. Returns 0, MG_ENOMEM or a negated errno.
 */
int mg_test_read_file(const char *path, char **data, size_t *len);

/* Creates or truncates path with mode and writes data. Returns 0 or a negated errno. */
int mg_test_write_file(const char *path, const void *data, size_t len, unsigned mode);

/*
 * Makes a private (0700) dir /tmp/PREFIX-XXXXXX into out (cap bytes) and remembers it for the
 * atexit cleanup. Returns 0, MG_EINVAL (too long) or a negated errno.
 */
int mg_test_mkdtemp(char *out, size_t cap, const char *prefix);

/* Removes path and everything under it (never following symlinks). Returns 0 or a negated errno. */
int mg_test_rm_rf(const char *path);

/* Forgets a temp dir the caller has removed itself (so the atexit hook does not try again). */
void mg_test_forget_dir(const char *path);

/* Joins dir and name into out. Returns 0, or MG_EINVAL if it does not fit. */
int mg_test_path_join(char *out, size_t cap, const char *dir, const char *name);

/* Milliseconds of a monotonic clock. */
double mg_test_now_ms(void);

/* Sleeps ms milliseconds (restarting on EINTR). */
void mg_test_sleep_ms(int ms);

#endif
