/*
 * proc: child processes, ports, files and temp dirs for integration tests (see proc.h).
 */
#define _GNU_SOURCE
#include "proc.h"

#include "moongate/error.h"

#include <arpa/inet.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

/*
 * What the atexit hook must clean up. Fixed-size: a test that has more than this many children
 * or temp dirs alive at once is doing something this harness was not built for, and is refused.
 */
#define MG__MAX_TRACKED 64

static pid_t live_pids[MG__MAX_TRACKED];
static char tmp_dirs[MG__MAX_TRACKED][MG_TEST_PATH_MAX];
static bool atexit_registered;

static void atexit_hook(void)
{
    mg_test_cleanup_all();
}

/*
 * A sanitizer that reports an error ends the process with _exit(), skipping atexit: its death
 * callback is the only chance to clean up then. Weak, so that builds without sanitizers link.
 */
extern void __sanitizer_set_death_callback(void (*cb)(void)) __attribute__((weak));

static void ensure_atexit(void)
{
    if (!atexit_registered) {
        atexit_registered = true;
        atexit(atexit_hook);
        if (__sanitizer_set_death_callback)
            __sanitizer_set_death_callback(atexit_hook);
    }
}

static int track_pid(pid_t pid)
{
    for (size_t i = 0; i < MG__MAX_TRACKED; i++) {
        if (live_pids[i] == 0) {
            live_pids[i] = pid;
            return 0;
        }
    }
    return MG_ENOMEM;
}

static void untrack_pid(pid_t pid)
{
    for (size_t i = 0; i < MG__MAX_TRACKED; i++) {
        if (live_pids[i] == pid)
            live_pids[i] = 0;
    }
}

double mg_test_now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec / 1e6;
}

void mg_test_sleep_ms(int ms)
{
    struct timespec ts = { ms / 1000, (long)(ms % 1000) * 1000000L };
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {
    }
}

/*
 * Runs in the forked child, so only async-signal-safe calls: the parent may have threads (ASan
 * has some), and any lock they held is frozen in the copy. On failure the errno goes to the
 * parent through err_fd (close-on-exec, so a successful exec closes it and the parent reads EOF).
 */
static void child_exec(char *const argv[], const mg_test_spawn_opts_t *opts, pid_t parent,
                       int err_fd)
{
    int e = 0;

    /* The test may die from an assertion, a signal or an ASan report: take the child along. */
    if (prctl(PR_SET_PDEATHSIG, SIGKILL) != 0 || getppid() != parent)
        _exit(127);

    /* An ignored SIGPIPE and a blocked signal mask survive exec: undo what the test set. */
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);
    signal(SIGPIPE, SIG_DFL);

    if (opts->nofile) {
        struct rlimit rl = { opts->nofile, opts->nofile };
        if (setrlimit(RLIMIT_NOFILE, &rl) != 0)
            goto fail;
    }
    const char *in = opts->stdin_path ? opts->stdin_path : "/dev/null";
    int fd = open(in, O_RDONLY);
    if (fd < 0 || dup2(fd, 0) < 0)
        goto fail;
    if (fd != 0)
        close(fd);
    if (opts->stdout_path) {
        fd = open(opts->stdout_path, O_WRONLY | O_CREAT | O_TRUNC, 0600);
        if (fd < 0 || dup2(fd, 1) < 0)
            goto fail;
        if (fd != 1)
            close(fd);
    }
    if (opts->stderr_path && opts->stdout_path &&
        strcmp(opts->stderr_path, opts->stdout_path) == 0) {
        /* One file for both: one open file, so neither overwrites the other. */
        if (dup2(1, 2) < 0)
            goto fail;
    } else if (opts->stderr_path) {
        fd = open(opts->stderr_path, O_WRONLY | O_CREAT | O_TRUNC, 0600);
        if (fd < 0 || dup2(fd, 2) < 0)
            goto fail;
        if (fd != 2)
            close(fd);
    }
    if (opts->cwd && chdir(opts->cwd) != 0)
        goto fail;

    /* The test's own sockets (a listener, an SSH connection) must not leak into sshd or ssh. */
    syscall(SYS_close_range, 3U, ~0U, 4U /* CLOSE_RANGE_CLOEXEC */);

    if (opts->envp)
        execvpe(argv[0], argv, opts->envp);
    else
        execvp(argv[0], argv);
fail:
    e = errno;
    (void)!write(err_fd, &e, sizeof e);
    _exit(127);
}

int mg_test_proc_spawn(mg_test_proc_t *p, char *const argv[], const mg_test_spawn_opts_t *opts)
{
    static const mg_test_spawn_opts_t no_opts;
    int pipefd[2];
    int err = 0;
    ssize_t r;

    memset(p, 0, sizeof *p);
    if (argv == NULL || argv[0] == NULL)
        return MG_EINVAL;
    if (opts == NULL)
        opts = &no_opts;
    ensure_atexit();
    if (pipe2(pipefd, O_CLOEXEC) != 0)
        return -errno;

    pid_t parent = getpid();
    pid_t pid = fork();
    if (pid < 0) {
        err = -errno;
        close(pipefd[0]);
        close(pipefd[1]);
        return err;
    }
    if (pid == 0) {
        close(pipefd[0]);
        child_exec(argv, opts, parent, pipefd[1]);
    }
    close(pipefd[1]);
    do {
        r = read(pipefd[0], &err, sizeof err);
    } while (r < 0 && errno == EINTR);
    close(pipefd[0]);
    if (r == (ssize_t)sizeof err) {
        /* The exec failed: reap the child now and report why. */
        waitpid(pid, NULL, 0);
        return err ? -err : MG_EINVAL;
    }
    p->pid = pid;
    if (track_pid(pid) != 0) {
        kill(pid, SIGKILL);
        waitpid(pid, NULL, 0);
        p->pid = 0;
        return MG_ENOMEM;
    }
    return 0;
}

int mg_test_proc_wait(mg_test_proc_t *p, int timeout_ms)
{
    if (p->exited)
        return 0;
    if (p->pid <= 0)
        return MG_ESTATE;

    double deadline = mg_test_now_ms() + timeout_ms;
    int sleep_ms = 1;
    for (;;) {
        int status;
        pid_t r = waitpid(p->pid, &status, WNOHANG);
        if (r == p->pid || (r < 0 && errno == ECHILD)) {
            /* ECHILD: someone else reaped it (a SIGCHLD handler); its status is lost. */
            p->status = r == p->pid ? status : 0;
            p->exited = true;
            untrack_pid(p->pid);
            p->pid = 0;
            return 0;
        }
        if (timeout_ms >= 0 && mg_test_now_ms() >= deadline)
            return MG_ETIMEDOUT;
        mg_test_sleep_ms(sleep_ms);
        if (sleep_ms < 20)
            sleep_ms *= 2;
    }
}

int mg_test_proc_kill(mg_test_proc_t *p, int sig)
{
    if (p->exited || p->pid <= 0)
        return MG_ESTATE;
    return kill(p->pid, sig) == 0 ? 0 : -errno;
}

int mg_test_proc_stop(mg_test_proc_t *p, int timeout_ms)
{
    if (p->exited || p->pid <= 0)
        return 0;
    /*
     * A stopped child cannot act on SIGTERM until continued; continue it first, and only if it is
     * stopped: a SIGCONT that lands later cancels the SIGSTOP of a ptrace attach, which hangs
     * LeakSanitizer's exit-time check in a child that is already exiting.
     */
    if (mg_test_pid_state(p->pid) == 'T')
        kill(p->pid, SIGCONT);
    kill(p->pid, SIGTERM);
    if (mg_test_proc_wait(p, timeout_ms) == 0)
        return 0;
    kill(p->pid, SIGKILL);
    mg_test_proc_wait(p, -1);
    return MG_ETIMEDOUT;
}

int mg_test_proc_exit_code(const mg_test_proc_t *p)
{
    if (!p->exited)
        return -1;
    if (WIFEXITED(p->status))
        return WEXITSTATUS(p->status);
    if (WIFSIGNALED(p->status))
        return 128 + WTERMSIG(p->status);
    return -1;
}

int mg_test_proc_run(char *const argv[], const mg_test_spawn_opts_t *opts, int timeout_ms,
                     int *exit_code)
{
    mg_test_proc_t p;
    int err = mg_test_proc_spawn(&p, argv, opts);
    if (err != 0)
        return err;
    err = mg_test_proc_wait(&p, timeout_ms);
    if (err != 0) {
        kill(p.pid, SIGKILL);
        mg_test_proc_wait(&p, -1);
    }
    if (exit_code)
        *exit_code = mg_test_proc_exit_code(&p);
    return err;
}

/* Reads pid's state letter and parent from /proc/PID/stat. Returns 0 or -1. */
static int read_stat(pid_t pid, char *state, pid_t *ppid)
{
    char path[64], buf[512];
    snprintf(path, sizeof path, "/proc/%d/stat", (int)pid);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return -1;
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n <= 0)
        return -1;
    buf[n] = '\0';
    /* The command (field 2) may hold spaces and parentheses: fields resume after the last ')'. */
    char *rp = strrchr(buf, ')');
    int pp;
    char st;
    if (rp == NULL || sscanf(rp + 1, " %c %d", &st, &pp) != 2)
        return -1;
    if (state)
        *state = st;
    if (ppid)
        *ppid = pp;
    return 0;
}

char mg_test_pid_state(pid_t pid)
{
    char st;
    return read_stat(pid, &st, NULL) == 0 ? st : 0;
}

bool mg_test_pid_alive(pid_t pid)
{
    char st = mg_test_pid_state(pid);
    return st != 0 && st != 'Z' && st != 'X';
}

int mg_test_proc_descendants(pid_t pid, pid_t *out, size_t cap, size_t *n)
{
    enum { MAX_PROCS = 4096 };
    static pid_t pids[MAX_PROCS], ppids[MAX_PROCS];
    size_t nprocs = 0, count = 0;
    int err = 0;

    *n = 0;
    DIR *d = opendir("/proc");
    if (d == NULL)
        return -errno;
    struct dirent *de;
    while ((de = readdir(d)) != NULL && nprocs < MAX_PROCS) {
        char *end;
        long v = strtol(de->d_name, &end, 10);
        pid_t pp;
        if (*end != '\0' || v <= 0 || read_stat((pid_t)v, NULL, &pp) != 0)
            continue;
        pids[nprocs] = (pid_t)v;
        ppids[nprocs] = pp;
        nprocs++;
    }
    closedir(d);

    /* Breadth first from pid: out[] doubles as the queue, so parents come before children. */
    pid_t parent = pid;
    for (size_t head = 0;;) {
        for (size_t i = 0; i < nprocs; i++) {
            if (ppids[i] != parent)
                continue;
            if (count == cap) {
                err = MG_ENOMEM;
                goto out;
            }
            out[count++] = pids[i];
        }
        if (head == count)
            break;
        parent = out[head++];
    }
out:
    *n = count;
    return err;
}

void mg_test_cleanup_all(void)
{
    for (size_t i = 0; i < MG__MAX_TRACKED; i++) {
        pid_t pid = live_pids[i];
        if (pid == 0)
            continue;
        pid_t desc[256];
        size_t n = 0;
        /* Freeze the tree first so no one forks or is reparented while it is collected. */
        kill(pid, SIGSTOP);
        mg_test_proc_descendants(pid, desc, 256, &n);
        for (size_t j = 0; j < n; j++)
            kill(desc[j], SIGKILL);
        kill(pid, SIGKILL);
        waitpid(pid, NULL, 0);
        live_pids[i] = 0;
    }
    /* MG_TEST_KEEP=1 keeps the dirs (sshd's log and config) to look at after a failure. */
    const char *keep = getenv("MG_TEST_KEEP");
    if (keep && strcmp(keep, "1") == 0)
        return;
    for (size_t i = 0; i < MG__MAX_TRACKED; i++) {
        if (tmp_dirs[i][0] != '\0') {
            mg_test_rm_rf(tmp_dirs[i]);
            tmp_dirs[i][0] = '\0';
        }
    }
}

int mg_test_free_port(uint16_t *port)
{
    struct sockaddr_in sa = { .sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
    socklen_t len = sizeof sa;
    int err = 0;
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -errno;
    if (bind(fd, (struct sockaddr *)&sa, sizeof sa) != 0 ||
        getsockname(fd, (struct sockaddr *)&sa, &len) != 0)
        err = -errno;
    else
        *port = ntohs(sa.sin_port);
    close(fd);
    return err;
}

bool mg_test_port_listening(uint16_t port)
{
    FILE *f = fopen("/proc/net/tcp", "re");
    char line[256];
    bool found = false;
    if (f == NULL)
        return false;
    while (!found && fgets(line, sizeof line, f)) {
        unsigned addr, lport, st;
        if (sscanf(line, " %*u: %x:%x %*x:%*x %x", &addr, &lport, &st) != 3)
            continue;
        /* 0x0A is TCP_LISTEN; the address is in network order printed as a host integer. */
        if (lport == port && st == 0x0A && (addr == 0 || ntohl(addr) == INADDR_LOOPBACK))
            found = true;
    }
    fclose(f);
    return found;
}

int mg_test_wait_port(uint16_t port, int timeout_ms, mg_test_proc_t *p)
{
    double deadline = mg_test_now_ms() + timeout_ms;
    for (;;) {
        if (mg_test_port_listening(port))
            return 0;
        if (p && mg_test_proc_wait(p, 0) == 0)
            return MG_ECLOSED;
        if (mg_test_now_ms() >= deadline)
            return MG_ETIMEDOUT;
        mg_test_sleep_ms(5);
    }
}

int mg_test_read_file(const char *path, char **data, size_t *len)
{
    int err = 0;
    char *buf = NULL;
    size_t used = 0, cap = 4096;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return -errno;
    buf = malloc(cap);
    if (buf == NULL) {
        err = MG_ENOMEM;
        goto out;
    }
    for (;;) {
        if (cap - used < 2) {
            char *nb = realloc(buf, cap * 2);
            if (nb == NULL) {
                err = MG_ENOMEM;
                goto out;
            }
            buf = nb;
            cap *= 2;
        }
        ssize_t r = read(fd, buf + used, cap - used - 1);
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0) {
            err = -errno;
            goto out;
        }
        if (r == 0)
            break;
        used += (size_t)r;
    }
    buf[used] = '\0';
    *data = buf;
    buf = NULL; /* transferred */
    if (len)
        *len = used;
out:
    free(buf);
    close(fd);
    return err;
}

int mg_test_write_file(const char *path, const void *data, size_t len, unsigned mode)
{
    int err = 0;
    const char *p = data;
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, (mode_t)mode);
    if (fd < 0)
        return -errno;
    while (len > 0) {
        ssize_t w = write(fd, p, len);
        if (w < 0 && errno == EINTR)
            continue;
        if (w < 0) {
            err = -errno;
            break;
        }
        p += w;
        len -= (size_t)w;
    }
    if (close(fd) != 0 && err == 0)
        err = -errno;
    return err;
}

int mg_test_mkdtemp(char *out, size_t cap, const char *prefix)
{
    int n = snprintf(out, cap, "/tmp/%s-XXXXXX", prefix);
    if (n < 0 || (size_t)n >= cap || (size_t)n >= MG_TEST_PATH_MAX)
        return MG_EINVAL;
    ensure_atexit();
    if (mkdtemp(out) == NULL)
        return -errno;
    for (size_t i = 0; i < MG__MAX_TRACKED; i++) {
        if (tmp_dirs[i][0] == '\0') {
            memcpy(tmp_dirs[i], out, (size_t)n + 1);
            return 0;
        }
    }
    rmdir(out);
    return MG_ENOMEM;
}

void mg_test_forget_dir(const char *path)
{
    for (size_t i = 0; i < MG__MAX_TRACKED; i++) {
        if (strcmp(tmp_dirs[i], path) == 0)
            tmp_dirs[i][0] = '\0';
    }
}

static int rm_one(const char *path, const struct stat *st, int flag, struct FTW *ftw)
{
    int r = flag == FTW_DP ? rmdir(path) : unlink(path);
    return r == 0 || errno == ENOENT ? 0 : -errno;
}

int mg_test_rm_rf(const char *path)
{
    struct stat st;
    if (lstat(path, &st) != 0)
        return errno == ENOENT ? 0 : -errno;
    int r = nftw(path, rm_one, 16, FTW_DEPTH | FTW_PHYS);
    return r < 0 ? -errno : r;
}

int mg_test_path_join(char *out, size_t cap, const char *dir, const char *name)
{
    int n = snprintf(out, cap, "%s/%s", dir, name);
    return n < 0 || (size_t)n >= cap ? MG_EINVAL : 0;
}
