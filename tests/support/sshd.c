/*
 * sshd: a real OpenSSH server for one integration test (see sshd.h).
 */
#define _GNU_SOURCE
#include "sshd.h"

#include "moongate/error.h"

#include <errno.h>
#include <pwd.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define SSHD_PATH "/usr/sbin/sshd"
#define MAX_TREE 256

/* Runs ssh-keygen with argv (no shell), its output appended to nothing but DIR/keygen.log. */
static int run_keygen(mg_test_sshd_t *s, char *const argv[])
{
    char log[MG_TEST_PATH_MAX];
    int code = -1;
    if (mg_test_path_join(log, sizeof log, s->dir, "keygen.log") != 0)
        return MG_EINVAL;
    mg_test_spawn_opts_t o = { .stdout_path = log, .stderr_path = log };
    int err = mg_test_proc_run(argv, &o, 10000, &code);
    if (err != 0)
        return err;
    return code == 0 ? 0 : MG_ECLOSED;
}

/* Generates an unencrypted ed25519 key pair at path (and path.pub). */
static int keygen(mg_test_sshd_t *s, const char *path, const char *comment)
{
    char *argv[] = { "ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", (char *)comment,
                     "-f", (char *)path, NULL };
    return run_keygen(s, argv);
}

/* Reads "TYPE BASE64" (the comment dropped) from a .pub file into out. */
static int read_pub(const char *path, char *out, size_t cap)
{
    char *data = NULL;
    char type[64], b64[1024];
    int err = mg_test_read_file(path, &data, NULL);
    if (err != 0)
        return err;
    if (sscanf(data, "%63s %1023s", type, b64) != 2 ||
        snprintf(out, cap, "%s %s", type, b64) >= (int)cap)
        err = MG_EINVAL;
    free(data);
    return err;
}

static int write_known_hosts(const char *path, uint16_t port, const char *pub_path)
{
    char key[1200], line[1400];
    int err = read_pub(pub_path, key, sizeof key);
    if (err != 0)
        return err;
    int n = snprintf(line, sizeof line, "[127.0.0.1]:%u %s\n", (unsigned)port, key);
    return mg_test_write_file(path, line, (size_t)n, 0600);
}

int mg_test_sshd_set_authorized_options(mg_test_sshd_t *s, const char *authorized_options)
{
    char key[1200], line[2600];
    int err = read_pub(s->client_key_pub, key, sizeof key);
    if (err != 0)
        return err;
    int n = snprintf(line, sizeof line, "%s%s%s\n", authorized_options ? authorized_options : "",
                     authorized_options ? " " : "", key);
    if (n < 0 || (size_t)n >= sizeof line)
        return MG_EINVAL;
    return mg_test_write_file(s->authorized_keys, line, (size_t)n, 0600);
}

/* Writes sshd_config and the known_hosts files, which depend on the port. */
static int write_port_files(mg_test_sshd_t *s, const mg_test_sshd_options_t *o)
{
    char *cfg = NULL;
    int err;
    int n = asprintf(&cfg,
        "# Written by tests/support/sshd.c for one test; removed when the test ends.\n"
        "ListenAddress 127.0.0.1\n"
        "Port %u\n"
        "HostKey %s\n"
        "PidFile %s\n"
        "AuthorizedKeysFile %s\n"
        "PubkeyAuthentication yes\n"
        "PasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\n"
        "UsePAM no\n"
        /* The files live under /tmp, which StrictModes rejects. */
        "StrictModes no\n"
        "PermitRootLogin prohibit-password\n"
        "AllowUsers %s\n"
        "AllowTcpForwarding yes\n"
        "X11Forwarding no\n"
        "PrintMotd no\n"
        "UseDNS no\n"
        /* Tests open 10+ channels per connection and benchmarks many connections at once.
           MaxStartups sits above what a gateway under test starts at once with one server
           (MOONGATE_MAX_HANDSHAKES_PER_SERVER, 6 by default), so sshd never drops one; the
           herd benchmark's sshd keeps OpenSSH's own default to show what that does. */
        "MaxSessions 100\n"
        "MaxStartups 200\n"
        "ClientAliveInterval 0\n"
        "LogLevel %s\n"
        "%s",
        (unsigned)s->port, s->host_key, s->pid_file, s->authorized_keys, s->user,
        o->log_level ? o->log_level : "ERROR", o->extra_config ? o->extra_config : "");
    if (n < 0)
        return MG_ENOMEM;
    err = mg_test_write_file(s->config, cfg, (size_t)n, 0600);
    free(cfg);
    if (err == 0)
        err = write_known_hosts(s->known_hosts, s->port, s->host_key_pub);
    if (err == 0)
        err = write_known_hosts(s->known_hosts_wrong, s->port, s->other_host_key_pub);
    return err;
}

static int set_paths(mg_test_sshd_t *s)
{
    struct {
        char *dst;
        const char *name;
    } files[] = {
        { s->config, "sshd_config" },
        { s->log, "sshd.log" },
        { s->pid_file, "sshd.pid" },
        { s->host_key, "host_key" },
        { s->host_key_pub, "host_key.pub" },
        { s->other_host_key_pub, "other_host_key.pub" },
        { s->client_key, "client_key" },
        { s->client_key_pub, "client_key.pub" },
        { s->wrong_key, "wrong_key" },
        { s->wrong_key_pub, "wrong_key.pub" },
        { s->authorized_keys, "authorized_keys" },
        { s->known_hosts, "known_hosts" },
        { s->known_hosts_wrong, "known_hosts_wrong" },
        { s->known_hosts_empty, "known_hosts_empty" },
    };
    for (size_t i = 0; i < sizeof files / sizeof files[0]; i++) {
        if (mg_test_path_join(files[i].dst, MG_TEST_PATH_MAX, s->dir, files[i].name) != 0)
            return MG_EINVAL;
    }
    return 0;
}

static int make_keys(mg_test_sshd_t *s, const mg_test_sshd_options_t *o)
{
    char other[MG_TEST_PATH_MAX];
    int err;
    if ((err = mg_test_path_join(other, sizeof other, s->dir, "other_host_key")) != 0 ||
        (err = keygen(s, s->host_key, "mg-test-host")) != 0 ||
        (err = keygen(s, other, "mg-test-other-host")) != 0 ||
        (err = keygen(s, s->client_key, "mg-test-client")) != 0 ||
        (err = keygen(s, s->wrong_key, "mg-test-wrong")) != 0)
        return err;
    if (o->client_passphrase == NULL)
        return 0;

    /* The same key as client_key, so authorized_keys accepts either file. */
    char *data = NULL;
    size_t len = 0;
    if ((err = mg_test_path_join(s->client_key_encrypted, MG_TEST_PATH_MAX, s->dir,
                                 "client_key_encrypted")) != 0 ||
        (err = mg_test_read_file(s->client_key, &data, &len)) != 0)
        return err;
    err = mg_test_write_file(s->client_key_encrypted, data, len, 0600);
    free(data);
    if (err != 0)
        return err;
    char *argv[] = { "ssh-keygen", "-q", "-p", "-P", "", "-N", (char *)o->client_passphrase,
                     "-f", s->client_key_encrypted, NULL };
    return run_keygen(s, argv);
}

/* Prints sshd's log to stderr, so a test that could not start it says why. */
static void dump_log(const mg_test_sshd_t *s)
{
    char *data = NULL;
    if (mg_test_read_file(s->log, &data, NULL) == 0) {
        fprintf(stderr, "--- %s ---\n%s--- end ---\n", s->log, data);
        free(data);
    }
}

int mg_test_sshd_start(mg_test_sshd_t *s, const mg_test_sshd_options_t *opts)
{
    static const mg_test_sshd_options_t defaults;
    const mg_test_sshd_options_t *o = opts ? opts : &defaults;
    int timeout = o->start_timeout_ms > 0 ? o->start_timeout_ms : 5000;
    int err;

    memset(s, 0, sizeof *s);
    struct passwd *pw = getpwuid(geteuid());
    if (pw == NULL || snprintf(s->user, sizeof s->user, "%s", pw->pw_name) >= (int)sizeof s->user)
        return MG_EINVAL;
    /* OpenSSH's privilege separation chroots into /run/sshd and refuses to start without it. */
    if (geteuid() == 0 && mkdir("/run/sshd", 0755) != 0 && errno != EEXIST)
        return -errno;

    if ((err = mg_test_mkdtemp(s->dir, sizeof s->dir, "mg-sshd")) != 0)
        return err;
    if ((err = set_paths(s)) != 0 || (err = make_keys(s, o)) != 0 ||
        (err = mg_test_write_file(s->known_hosts_empty, "", 0, 0600)) != 0 ||
        (err = mg_test_sshd_set_authorized_options(s, o->authorized_options)) != 0)
        goto fail;

    /* The free port may be taken before sshd binds it: then sshd exits and we try another. */
    for (int attempt = 0; attempt < 3; attempt++) {
        if ((err = mg_test_free_port(&s->port)) != 0 || (err = write_port_files(s, o)) != 0)
            goto fail;
        char *argv[] = { SSHD_PATH, "-D", "-e", "-f", s->config, NULL };
        mg_test_spawn_opts_t so = { .stderr_path = s->log, .stdout_path = s->log };
        if ((err = mg_test_proc_spawn(&s->proc, argv, &so)) != 0)
            goto fail;
        err = mg_test_wait_port(s->port, timeout, &s->proc);
        if (err == 0) {
            s->pid = s->proc.pid;
            return 0;
        }
        mg_test_proc_stop(&s->proc, 1000);
        if (err != MG_ECLOSED)
            break;
    }
fail:
    dump_log(s);
    mg_test_rm_rf(s->dir);
    mg_test_forget_dir(s->dir);
    s->pid = 0;
    return err;
}

/* True once pid has stopped (or is gone: a process that exited cannot answer either). */
static bool is_stopped(pid_t pid)
{
    char st = mg_test_pid_state(pid);
    return st == 0 || st == 'T' || st == 't' || st == 'Z' || st == 'X';
}

/*
 * Stops the listener and every descendant and collects them into tree. SIGSTOP takes effect
 * asynchronously, and a child may fork or be reparented out of sight meanwhile, so it repeats
 * (up to about 1 s) until the tree no longer grows and every member is seen stopped.
 */
static size_t freeze_tree(const mg_test_sshd_t *s, pid_t *tree)
{
    size_t n = 0;
    kill(s->pid, SIGSTOP);
    for (int round = 0; round < 200; round++) {
        size_t prev = n;
        mg_test_proc_descendants(s->pid, tree, MAX_TREE, &n);
        bool all = is_stopped(s->pid);
        for (size_t i = 0; i < n; i++) {
            kill(tree[i], SIGSTOP);
            all = all && is_stopped(tree[i]);
        }
        if (all && n == prev && round > 0)
            break;
        mg_test_sleep_ms(5);
    }
    return n;
}

/* Waits up to timeout_ms until none of pids is alive. Returns true if they are all gone. */
static bool wait_gone(const pid_t *pids, size_t n, int timeout_ms)
{
    double deadline = mg_test_now_ms() + timeout_ms;
    for (;;) {
        bool any = false;
        for (size_t i = 0; i < n && !any; i++)
            any = mg_test_pid_alive(pids[i]);
        if (!any)
            return true;
        if (mg_test_now_ms() >= deadline)
            return false;
        mg_test_sleep_ms(5);
    }
}

int mg_test_sshd_pause(mg_test_sshd_t *s)
{
    pid_t tree[MAX_TREE];
    if (s->pid <= 0)
        return MG_ESTATE;
    freeze_tree(s, tree);
    s->paused = true;
    return 0;
}

int mg_test_sshd_resume(mg_test_sshd_t *s)
{
    pid_t tree[MAX_TREE];
    size_t n = 0;
    if (s->pid <= 0)
        return MG_ESTATE;
    mg_test_proc_descendants(s->pid, tree, MAX_TREE, &n);
    for (size_t i = 0; i < n; i++)
        kill(tree[i], SIGCONT);
    kill(s->pid, SIGCONT);
    /* Like SIGSTOP, SIGCONT lands asynchronously: return once every one runs again. */
    for (int round = 0; round < 200; round++) {
        bool any = mg_test_pid_state(s->pid) == 'T';
        for (size_t i = 0; i < n && !any; i++)
            any = mg_test_pid_state(tree[i]) == 'T';
        if (!any)
            break;
        mg_test_sleep_ms(5);
    }
    s->paused = false;
    return 0;
}

int mg_test_sshd_kill(mg_test_sshd_t *s)
{
    pid_t tree[MAX_TREE];
    if (s->pid <= 0)
        return 0;
    size_t n = freeze_tree(s, tree);
    for (size_t i = 0; i < n; i++)
        kill(tree[i], SIGKILL);
    mg_test_proc_kill(&s->proc, SIGKILL);
    mg_test_proc_wait(&s->proc, -1);
    wait_gone(tree, n, 2000);
    s->pid = 0;
    s->paused = false;
    return 0;
}

int mg_test_sshd_stop(mg_test_sshd_t *s)
{
    pid_t tree[MAX_TREE];
    if (s->pid > 0) {
        /* On SIGTERM the listener exits but its connection children run on: end them all. */
        size_t n = freeze_tree(s, tree);
        for (size_t i = 0; i < n; i++) {
            kill(tree[i], SIGCONT);
            kill(tree[i], SIGTERM);
        }
        mg_test_proc_stop(&s->proc, 2000);
        if (!wait_gone(tree, n, 2000)) {
            for (size_t i = 0; i < n; i++)
                kill(tree[i], SIGKILL);
            wait_gone(tree, n, 2000);
        }
        s->pid = 0;
        s->paused = false;
    }
    if (s->dir[0] != '\0') {
        mg_test_rm_rf(s->dir);
        mg_test_forget_dir(s->dir);
        s->dir[0] = '\0';
    }
    return 0;
}

size_t mg_test_sshd_count_processes(const mg_test_sshd_t *s)
{
    pid_t tree[MAX_TREE];
    size_t n = 0, alive = 0;
    if (s->pid <= 0)
        return 0;
    if (mg_test_pid_alive(s->pid))
        alive++;
    mg_test_proc_descendants(s->pid, tree, MAX_TREE, &n);
    for (size_t i = 0; i < n; i++)
        alive += mg_test_pid_alive(tree[i]);
    return alive;
}

void mg_test_sshd_inetd_argv(const mg_test_sshd_t *s, const char *argv[6])
{
    argv[0] = SSHD_PATH;
    argv[1] = "-i";
    argv[2] = "-e";
    argv[3] = "-f";
    argv[4] = s->config;
    argv[5] = NULL;
}

int mg_test_sshd_inetd_command(const mg_test_sshd_t *s, char *out, size_t cap)
{
    int n = snprintf(out, cap, "%s -i -e -f %s", SSHD_PATH, s->config);
    return n < 0 || (size_t)n >= cap ? -1 : 0;
}

void mg_test_sshd_client_argv(const mg_test_sshd_t *s, const char *key, const char *known_hosts,
                              mg_test_ssh_argv_t *a)
{
    snprintf(a->port_, sizeof a->port_, "%u", (unsigned)s->port);
    snprintf(a->known_hosts_opt_, sizeof a->known_hosts_opt_, "UserKnownHostsFile=%s",
             known_hosts ? known_hosts : s->known_hosts);
    const char *args[] = {
        "ssh", "-F", "/dev/null", "-i", key ? key : s->client_key, "-p", a->port_, "-l", s->user,
        "-o", "IdentitiesOnly=yes", "-o", "IdentityAgent=none", "-o", "BatchMode=yes",
        "-o", "StrictHostKeyChecking=yes", "-o", a->known_hosts_opt_,
        "-o", "GlobalKnownHostsFile=/dev/null", "-o", "ConnectTimeout=5", "-o", "LogLevel=ERROR",
    };
    memcpy(a->argv, args, sizeof args);
    a->n = sizeof args / sizeof args[0];
    a->argv[a->n] = NULL;
}

int mg_test_ssh_argv_add(mg_test_ssh_argv_t *a, const char *arg)
{
    if (a->n + 1 >= sizeof a->argv / sizeof a->argv[0])
        return MG_EINVAL;
    a->argv[a->n++] = arg;
    a->argv[a->n] = NULL;
    return 0;
}

/* Reads the real uid of pid from /proc/PID/status (a zombie's too). Returns 0 or -1. */
static int read_uid(pid_t pid, uid_t *uid)
{
    char path[64], line[256];
    unsigned long v;
    int err = -1;
    snprintf(path, sizeof path, "/proc/%d/status", (int)pid);
    FILE *f = fopen(path, "re");
    if (f == NULL)
        return -1;
    while (fgets(line, sizeof line, f) != NULL) {
        if (sscanf(line, "Uid: %lu", &v) == 1) {
            *uid = (uid_t)v;
            err = 0;
            break;
        }
    }
    fclose(f);
    return err;
}

/*
 * Waits until every login to s has finished on the server side. The client is told it is
 * logged in by sshd's unprivileged pre-authentication child, which then exits and is reaped
 * by its monitor; until then the tree holds that child, running or a zombie. Its uid is the
 * privilege separation user's ("sshd"), which is how it is told apart from the monitor (root)
 * and the post-authentication child (the user's).
 */
static int wait_logins_settled(const mg_test_sshd_t *s, int timeout_ms)
{
    const struct passwd *pw = getpwnam("sshd");
    if (pw == NULL)
        return 0; /* no privilege separation user: no pre-authentication child either */
    uid_t privsep = pw->pw_uid;
    double deadline = mg_test_now_ms() + timeout_ms;
    for (;;) {
        pid_t tree[MAX_TREE];
        size_t n = 0;
        bool busy = false;
        mg_test_proc_descendants(s->pid, tree, MAX_TREE, &n);
        for (size_t i = 0; i < n && !busy; i++) {
            uid_t uid;
            busy = read_uid(tree[i], &uid) == 0 && uid == privsep;
        }
        if (!busy)
            return 0;
        if (mg_test_now_ms() >= deadline)
            return MG_ETIMEDOUT;
        mg_test_sleep_ms(2);
    }
}

int mg_test_sshd_forward(mg_test_sshd_t *s, uint16_t target_port, uint16_t *local_port,
                         mg_test_proc_t *proc)
{
    mg_test_ssh_argv_t a;
    char spec[64], log[MG_TEST_PATH_MAX];
    int err;

    if ((err = mg_test_free_port(local_port)) != 0 ||
        (err = mg_test_path_join(log, sizeof log, s->dir, "ssh-L.log")) != 0)
        return err;
    snprintf(spec, sizeof spec, "127.0.0.1:%u:127.0.0.1:%u", (unsigned)*local_port,
             (unsigned)target_port);
    mg_test_sshd_client_argv(s, NULL, NULL, &a);
    const char *tail[] = { "-N", "-o", "ExitOnForwardFailure=yes", "-L", spec, "127.0.0.1" };
    for (size_t i = 0; i < sizeof tail / sizeof tail[0]; i++)
        mg_test_ssh_argv_add(&a, tail[i]);
    mg_test_spawn_opts_t so = { .stderr_path = log };
    if ((err = mg_test_proc_spawn(proc, (char *const *)a.argv, &so)) != 0)
        return err;
    err = mg_test_wait_port(*local_port, 5000, proc);
    if (err == 0)
        err = wait_logins_settled(s, 5000);
    if (err != 0)
        mg_test_proc_stop(proc, 1000);
    return err;
}
