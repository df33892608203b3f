#include "redis.h"

#include "moongate/error.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#define REDIS_SERVER "/usr/bin/redis-server"
#define REDIS_CLI "/usr/bin/redis-cli"

static int spawn(mg_test_redis_t *r)
{
    char port[8];
    snprintf(port, sizeof(port), "%u", (unsigned)r->port);
    char *argv[48];
    int n = 0;
    argv[n++] = REDIS_SERVER;
    argv[n++] = "--bind";
    argv[n++] = "127.0.0.1";
    if (r->tls) {
        argv[n++] = "127.0.0.2"; /* an address its certificate does not name */
        argv[n++] = "--port";
        argv[n++] = "0";
        argv[n++] = "--tls-port";
        argv[n++] = port;
        argv[n++] = "--tls-cert-file";
        argv[n++] = r->cert;
        argv[n++] = "--tls-key-file";
        argv[n++] = r->key;
        argv[n++] = "--tls-ca-cert-file";
        argv[n++] = r->ca;
        argv[n++] = "--tls-auth-clients";
        argv[n++] = r->auth_clients ? "yes" : "no";
    } else {
        argv[n++] = "--port";
        argv[n++] = port;
    }
    argv[n++] = "--save";
    argv[n++] = "";
    argv[n++] = "--appendonly";
    argv[n++] = "no";
    argv[n++] = "--dir";
    argv[n++] = r->dir;
    if (r->password[0]) {
        argv[n++] = "--requirepass";
        argv[n++] = r->password;
    }
    char acl[sizeof(r->acl)];
    if (r->acl[0]) {
        /* redis-server takes the user line's words as separate arguments */
        memcpy(acl, r->acl, sizeof(acl));
        argv[n++] = "--user";
        for (char *save = NULL, *w = strtok_r(acl, " ", &save); w != NULL && n < 46;
             w = strtok_r(NULL, " ", &save))
            argv[n++] = w;
    }
    argv[n] = NULL;
    mg_test_spawn_opts_t so = { .stdout_path = r->log, .stderr_path = r->log };
    int rc = mg_test_proc_spawn(&r->proc, argv, &so);
    if (rc != 0)
        return rc;
    if (mg_test_wait_port(r->port, 5000, &r->proc) != 0) {
        mg_test_proc_stop(&r->proc, 1000);
        return MG_ETIMEDOUT;
    }
    r->running = true;
    return 0;
}

/* The CA, the server's and the client's keys and certificates, and another CA, in r->dir. */
static int make_certs(mg_test_redis_t *r)
{
    static const char script[] =
        "set -e; cd \"$1\"\n"
        "ca() { openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes "
        "-keyout \"$1.key\" -out \"$1.crt\" -days 2 -subj \"/CN=$1\" 2>/dev/null; }\n"
        "leaf() { openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes "
        "-keyout \"$1.key\" -out \"$1.csr\" -subj \"/CN=$1\" 2>/dev/null\n"
        "  printf 'subjectAltName=%s\\n' \"$2\" > \"$1.ext\"\n"
        "  openssl x509 -req -in \"$1.csr\" -CA ca.crt -CAkey ca.key -CAcreateserial "
        "-days 2 -extfile \"$1.ext\" -out \"$1.crt\" 2>/dev/null; }\n"
        "ca ca; ca other-ca\n"
        "leaf server 'IP:127.0.0.1,DNS:localhost'\n"
        "leaf client 'DNS:moongate-node'\n";
    char *argv[] = { "/bin/sh", "-c", (char *)script, "sh", r->dir, NULL };
    int code = -1;
    if (mg_test_proc_run(argv, NULL, 30000, &code) != 0 || code != 0)
        return MG_EINVAL;
    snprintf(r->ca, sizeof(r->ca), "%s/ca.crt", r->dir);
    snprintf(r->other_ca, sizeof(r->other_ca), "%s/other-ca.crt", r->dir);
    snprintf(r->cert, sizeof(r->cert), "%s/server.crt", r->dir);
    snprintf(r->key, sizeof(r->key), "%s/server.key", r->dir);
    snprintf(r->client_cert, sizeof(r->client_cert), "%s/client.crt", r->dir);
    snprintf(r->client_key, sizeof(r->client_key), "%s/client.key", r->dir);
    return 0;
}

static int start(mg_test_redis_t *r, const char *password, bool tls, bool auth_clients,
                 const char *acl)
{
    memset(r, 0, sizeof(*r));
    snprintf(r->acl, sizeof(r->acl), "%s", acl ? acl : "");
    if (access(REDIS_SERVER, X_OK) != 0)
        return MG_EINVAL;
    snprintf(r->password, sizeof(r->password), "%s", password ? password : "");
    r->tls = tls;
    r->auth_clients = auth_clients;
    int rc = mg_test_mkdtemp(r->dir, sizeof(r->dir), "mg-redis");
    if (rc != 0 || (tls && (rc = make_certs(r)) != 0))
        return rc;
    snprintf(r->log, sizeof(r->log), "%s/redis.log", r->dir);
    /* A free port may be taken before redis binds it: try a few. */
    for (int attempt = 0; attempt < 5; attempt++) {
        if ((rc = mg_test_free_port(&r->port)) != 0)
            return rc;
        if ((rc = spawn(r)) == 0)
            return 0;
    }
    return rc;
}

int mg_test_redis_start(mg_test_redis_t *r, const char *password)
{
    return start(r, password, false, false, NULL);
}

int mg_test_redis_start_acl(mg_test_redis_t *r, const char *acl)
{
    return start(r, NULL, false, false, acl);
}

int mg_test_redis_start_tls(mg_test_redis_t *r, const char *password, bool auth_clients)
{
    return start(r, password, true, auth_clients, NULL);
}

int mg_test_redis_restart(mg_test_redis_t *r)
{
    mg_test_redis_stop(r);
    return spawn(r);
}

void mg_test_redis_stop(mg_test_redis_t *r)
{
    if (r->running)
        mg_test_proc_stop(&r->proc, 2000);
    r->running = false;
}

int mg_test_redis_cmd(const mg_test_redis_t *r, char *out, size_t cap, ...)
{
    char port[8];
    snprintf(port, sizeof(port), "%u", (unsigned)r->port);
    char *argv[32];
    int n = 0;
    argv[n++] = REDIS_CLI;
    argv[n++] = "-p";
    argv[n++] = port;
    if (r->tls) {
        argv[n++] = "--tls";
        argv[n++] = "--cacert";
        argv[n++] = (char *)r->ca;
        argv[n++] = "--cert";
        argv[n++] = (char *)r->client_cert;
        argv[n++] = "--key";
        argv[n++] = (char *)r->client_key;
    }
    if (r->password[0]) {
        argv[n++] = "--no-auth-warning";
        argv[n++] = "-a";
        argv[n++] = (char *)r->password;
    }
    va_list ap;
    va_start(ap, cap);
    const char *a;
    while ((a = va_arg(ap, const char *)) != NULL && n < 31)
        argv[n++] = (char *)a;
    va_end(ap);
    argv[n] = NULL;
    int fds[2];
    if (pipe(fds) != 0)
        return MG_EINVAL;
    pid_t pid = fork();
    if (pid < 0) {
        close(fds[0]);
        close(fds[1]);
        return MG_EINVAL;
    }
    if (pid == 0) {
        dup2(fds[1], 1);
        close(fds[0]);
        close(fds[1]);
        execv(REDIS_CLI, argv);
        _exit(127);
    }
    close(fds[1]);
    size_t len = 0;
    ssize_t k;
    while ((k = read(fds[0], out + len, cap - 1 - len)) > 0 && len + 1 < cap)
        len += (size_t)k;
    close(fds[0]);
    int status;
    waitpid(pid, &status, 0);
    while (len > 0 && out[len - 1] == '\n')
        len--;
    out[len] = '\0';
    return WIFEXITED(status) && WEXITSTATUS(status) == 0 ? 0 : MG_EINVAL;
}

static void *fake_serve(void *arg)
{
    mg_test_fake_redis_t *f = arg;
    int fd = accept(f->lfd, NULL, NULL);
    if (fd < 0)
        return NULL;
    char buf[8192];
    /* The set-up (two SCRIPT LOADs, then PING: answered as if loaded); then the operation. */
    size_t got = 0;
    ssize_t n;
    while (got < sizeof(buf) - 1 && (n = read(fd, buf + got, sizeof(buf) - 1 - got)) > 0) {
        got += (size_t)n;
        buf[got] = '\0';
        if (strstr(buf, "PING\r\n") != NULL)
            break;
    }
    /* +OK to each command before the PING (AUTH, SELECT, the SCRIPT LOADs), +PONG to it; a
       command starts with '*' at the start or after a CRLF (no script has one inside). */
    char setup[256] = "";
    size_t sl = 0;
    for (const char *p = buf; got > 0 && (p = strstr(p, "*")) != NULL; p++)
        if ((p == buf || (p - buf >= 2 && p[-2] == '\r' && p[-1] == '\n')) &&
            sl + 8 < sizeof(setup))
            sl += (size_t)snprintf(setup + sl, sizeof(setup) - sl, "+OK\r\n");
    if (sl >= 5)
        snprintf(setup + sl - 5, sizeof(setup) - (sl - 5), "+PONG\r\n");
    sl = strlen(setup);
    if (got > 0 && strstr(buf, "PING\r\n") != NULL && sl > 0 &&
        write(fd, setup, sl) == (ssize_t)sl && read(fd, buf, sizeof(buf)) > 0) {
        for (size_t off = 0; off < f->answer_len;) {
            ssize_t w = write(fd, f->answer + off, f->answer_len - off);
            if (w <= 0)
                break;
            off += (size_t)w;
        }
    }
    while (read(fd, buf, sizeof(buf)) > 0)
        ;
    close(fd);
    return NULL;
}

int mg_test_fake_redis_start(mg_test_fake_redis_t *f)
{
    f->lfd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    struct sockaddr_in sa = { .sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
    socklen_t sl = sizeof(sa);
    if (f->lfd >= 0 && bind(f->lfd, (struct sockaddr *)&sa, sizeof(sa)) == 0 &&
        listen(f->lfd, 1) == 0 && getsockname(f->lfd, (struct sockaddr *)&sa, &sl) == 0) {
        f->port = ntohs(sa.sin_port);
        if (pthread_create(&f->thread, NULL, fake_serve, f) == 0)
            return 0;
    }
    if (f->lfd >= 0)
        close(f->lfd);
    return MG_EINVAL;
}

void mg_test_fake_redis_stop(mg_test_fake_redis_t *f)
{
    pthread_join(f->thread, NULL);
    close(f->lfd);
}
