/*
 * sshd: a real OpenSSH server for one integration test.
 *
 * mg_test_sshd_start() makes a private dir under /tmp, generates fresh ed25519 keys with
 * ssh-keygen (libssh2 1.10 works with ed25519 only), writes an sshd_config that listens on
 * 127.0.0.1 at a free port, and runs `/usr/sbin/sshd -D -e -f CONFIG` in the foreground with its
 * log in the dir. It returns once the port is listening. The struct then names every file a test
 * needs to point a client at it:
 *
 *   client_key            the gateway's key, in authorized_keys (optionally behind restrictions)
 *   client_key_encrypted  the same key protected by a passphrase (when one was asked for)
 *   wrong_key             an unrelated key sshd does not accept
 *   known_hosts           the server's real host key for [127.0.0.1]:PORT
 *   known_hosts_wrong     another host key for the same name (a host key mismatch)
 *   known_hosts_empty     no keys at all (an unknown host)
 *
 * sshd forks a child per connection (and privilege-separation children under it), so the
 * lifecycle calls act on the whole tree found through /proc: _pause() freezes it with SIGSTOP (a
 * server that stops answering), _resume() thaws it, _kill() SIGKILLs it (a server that died), and
 * _stop() ends it and removes the dir. A test that fails before _stop() is still cleaned up: the
 * children are tracked by proc.c, whose atexit hook kills them and removes the dir.
 *
 * sshd refuses to start as root without /run/sshd; it is created if missing.
 *
 * Functions return 0 or a negative MG_E* code (moongate/error.h) or a negated errno.
 */
#ifndef MG_TEST_SSHD_H
#define MG_TEST_SSHD_H

#include "proc.h"

#include <stdbool.h>
#include <stdint.h>

typedef struct mg_test_sshd_options {
    /*
     * Prefixed to the client key's authorized_keys line, e.g.
     * `restrict,port-forwarding,permitopen="127.0.0.1:11434"`. NULL: no restrictions.
     */
    const char *authorized_options;
    /* sshd's LogLevel (QUIET, ERROR, INFO, VERBOSE, DEBUG1..3). NULL: ERROR. */
    const char *log_level;
    /* If not NULL, also write client_key_encrypted protected by this passphrase. */
    const char *client_passphrase;
    /* Lines appended to sshd_config verbatim (each ending in '\n'), or NULL. */
    const char *extra_config;
    /* How long to wait for the port to listen. 0: 5000 ms. */
    int start_timeout_ms;
} mg_test_sshd_options_t;

/* A running sshd. Every field is read-only for the caller. */
typedef struct mg_test_sshd {
    uint16_t port;                 /* sshd listens on 127.0.0.1:port */
    pid_t pid;                     /* the listener (0 once stopped or killed) */
    char user[64];                 /* the user to log in as (the current user) */
    char dir[MG_TEST_PATH_MAX];    /* the private temp dir holding everything below */
    char config[MG_TEST_PATH_MAX];
    char log[MG_TEST_PATH_MAX];    /* sshd's stderr */
    char pid_file[MG_TEST_PATH_MAX];
    char host_key[MG_TEST_PATH_MAX];
    char host_key_pub[MG_TEST_PATH_MAX];
    char other_host_key_pub[MG_TEST_PATH_MAX];
    char client_key[MG_TEST_PATH_MAX];
    char client_key_pub[MG_TEST_PATH_MAX];
    char client_key_encrypted[MG_TEST_PATH_MAX];  /* "" unless a passphrase was given */
    char wrong_key[MG_TEST_PATH_MAX];
    char wrong_key_pub[MG_TEST_PATH_MAX];
    char authorized_keys[MG_TEST_PATH_MAX];
    char known_hosts[MG_TEST_PATH_MAX];
    char known_hosts_wrong[MG_TEST_PATH_MAX];
    char known_hosts_empty[MG_TEST_PATH_MAX];
    bool paused;
    mg_test_proc_t proc;           /* private */
} mg_test_sshd_t;

/*
 * Prepares everything and starts sshd (opts may be NULL for defaults). On failure nothing is left
 * running and the dir is removed, except that the log is printed to stderr first to say why.
 * Returns 0, MG_ETIMEDOUT (sshd did not listen in time), MG_ECLOSED (sshd exited: see the log),
 * MG_EINVAL, MG_ENOMEM, or a negated errno.
 */
int mg_test_sshd_start(mg_test_sshd_t *s, const mg_test_sshd_options_t *opts);

/*
 * Stops sshd and every connection child (SIGTERM, up to 2 s, then SIGKILL), and removes the dir.
 * Safe after _kill() and on a paused server. Returns 0.
 */
int mg_test_sshd_stop(mg_test_sshd_t *s);

/*
 * SIGSTOPs the listener and all its descendants and returns once each is seen stopped (bounded,
 * about 1 s): connections stay open but nothing answers. Returns 0, or MG_ESTATE if not running.
 */
int mg_test_sshd_pause(mg_test_sshd_t *s);

/* SIGCONTs the listener and every descendant, and returns once they run. 0 or MG_ESTATE. */
int mg_test_sshd_resume(mg_test_sshd_t *s);

/*
 * SIGKILLs the listener and every descendant (the server died: its TCP connections reset or
 * close). The dir is kept until _stop(). Returns 0.
 */
int mg_test_sshd_kill(mg_test_sshd_t *s);

/* Counts the live (non-zombie) processes of the server: the listener plus its descendants. */
size_t mg_test_sshd_count_processes(const mg_test_sshd_t *s);

/*
 * Rewrites authorized_keys with a new restriction prefix (NULL: none). sshd reads the file on
 * each login, so the next connection sees it. Returns 0 or a negated errno.
 */
int mg_test_sshd_set_authorized_options(mg_test_sshd_t *s, const char *authorized_options);

/*
 * The argv that speaks SSH on stdin/stdout with this server's config and keys, for a bridge that
 * spawns sshd per connection: {"/usr/sbin/sshd", "-i", "-e", "-f", CONFIG, NULL}. argv must hold
 * 6 pointers; they point into s.
 */
void mg_test_sshd_inetd_argv(const mg_test_sshd_t *s, const char *argv[6]);

/* The same as one command line, for moongate-agent --sshd-inetd. Returns 0, or -1 if cap is short. */
int mg_test_sshd_inetd_command(const mg_test_sshd_t *s, char *out, size_t cap);

/* An OpenSSH client command line under construction. */
typedef struct mg_test_ssh_argv {
    const char *argv[64];   /* read-only: NULL-terminated; pass as (char *const *)a.argv */
    size_t n;               /* read-only: entries before the NULL */
    char port_[8];          /* private storage the entries point into */
    char known_hosts_opt_[MG_TEST_PATH_MAX + 32];
} mg_test_ssh_argv_t;

/*
 * Starts an OpenSSH client command for this server: logs in as s->user with key (NULL:
 * client_key) only, checks the host key against known_hosts (NULL: the right one) strictly, in
 * batch mode, ignoring ~/.ssh/config and any agent. The caller then adds its own options, the
 * destination "127.0.0.1" and a command with mg_test_ssh_argv_add(). The strings must outlive a.
 */
void mg_test_sshd_client_argv(const mg_test_sshd_t *s, const char *key, const char *known_hosts,
                              mg_test_ssh_argv_t *a);

/* Appends arg. Returns 0, or MG_EINVAL when full. */
int mg_test_ssh_argv_add(mg_test_ssh_argv_t *a, const char *arg);

/*
 * Starts `ssh -N -L 127.0.0.1:LOCAL:127.0.0.1:target_port` against this server (the baseline that
 * benchmarks compare with) and waits until the local port listens and the server has finished
 * the login (its pre-authentication child is gone). *local_port gets the port;
 * proc is the ssh process (stop it with mg_test_proc_stop()). Its stderr goes to DIR/ssh-L.log.
 * Returns 0, MG_ETIMEDOUT, MG_ECLOSED (ssh exited), or a spawn error.
 */
int mg_test_sshd_forward(mg_test_sshd_t *s, uint16_t target_port, uint16_t *local_port,
                         mg_test_proc_t *proc);

#endif
