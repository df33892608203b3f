/*
 * `moongate -t`: checks what starting needs, the way `nginx -t` does, and reports every
 * problem on its own line with what to do, not just the first. The unit runs it before it
 * starts the gateway and before a reload sends HUP, as the service's user, so an unreadable
 * key shows here rather than as a 502 on the first request.
 *
 *   the settings      every variable the gateway reads parses
 *   the listen address an address of this machine, a port that can be bound (in use is
 *                     noted, not a problem: the running gateway holds it during a reload check)
 *   TLS               the certificate and key load, match and have not expired; days left
 *   the policy        loads and validates (its Lua library named)
 *   the default route when the policy routes with it, its SSH key and known_hosts readable
 *   Redis             with MOONGATE_REDIS_URL: the URL and TLS files are valid (a problem),
 *                     Redis answers within 2 s (a warning only: it may be down for now, and
 *                     the gateway runs without it)
 *
 * It blocks (a bind, file reads): it runs before any loop serves.
 */
#include "check.h"

#include "tls.h"

#include "moongate/gateway.h"
#include "moongate/error.h"
#include "moongate/log.h"
#include "moongate/policy.h"
#include "moongate/settings.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

typedef struct check {
    FILE *ok, *bad;
    int problems;
} check_t;

static void problem(check_t *c, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void problem(check_t *c, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fflush(c->ok); /* in order, where both go to one terminal or file */
    fputs("moongate: problem: ", c->bad);
    vfprintf(c->bad, fmt, ap);
    fputc('\n', c->bad);
    va_end(ap);
    c->problems++;
}

/* Worth knowing, but no reason not to start. */
static void warning(check_t *c, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void warning(check_t *c, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fflush(c->ok);
    fputs("moongate: warning: ", c->bad);
    vfprintf(c->bad, fmt, ap);
    fputc('\n', c->bad);
    va_end(ap);
}

static void good(check_t *c, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void good(check_t *c, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fputs("moongate: ", c->ok);
    vfprintf(c->ok, fmt, ap);
    fputc('\n', c->ok);
    fflush(c->ok);
    va_end(ap);
}

static void check_listen(check_t *c, const char *host, int port)
{
    struct sockaddr_storage ss;
    socklen_t len;
    memset(&ss, 0, sizeof(ss));
    struct sockaddr_in *v4 = (struct sockaddr_in *)&ss;
    struct sockaddr_in6 *v6 = (struct sockaddr_in6 *)&ss;
    if (inet_pton(AF_INET, host, &v4->sin_addr) == 1) {
        v4->sin_family = AF_INET;
        v4->sin_port = htons((uint16_t)port);
        len = sizeof(*v4);
    } else if (inet_pton(AF_INET6, host, &v6->sin6_addr) == 1) {
        v6->sin6_family = AF_INET6;
        v6->sin6_port = htons((uint16_t)port);
        len = sizeof(*v6);
    } else {
        problem(c, "listen address %s: not an IPv4 or IPv6 address; MOONGATE_LISTEN (or -l) "
                   "takes ADDR:PORT, e.g. 0.0.0.0:8080", host);
        return;
    }
    char addr[300];
    if (ss.ss_family == AF_INET6)
        snprintf(addr, sizeof(addr), "[%s]:%d", host, port);
    else
        snprintf(addr, sizeof(addr), "%s:%d", host, port);
    int fd = socket(ss.ss_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        problem(c, "listen address %s: cannot make a socket (%s)", addr, strerror(errno));
        return;
    }
    int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    if (bind(fd, (struct sockaddr *)&ss, len) == 0)
        good(c, "listen address %s can be bound", addr);
    else if (errno == EADDRINUSE)
        good(c, "listen address %s is in use (by the running moongate, if this checks a "
                "reload; else stop what holds it or choose another port)", addr);
    else if (errno == EADDRNOTAVAIL)
        problem(c, "listen address %s: not an address of this machine; use one of its "
                   "addresses, or 0.0.0.0 for all", addr);
    else if (errno == EACCES)
        problem(c, "listen address %s: a port below 1024 needs CAP_NET_BIND_SERVICE (the "
                   "systemd unit grants it) or root", addr);
    else
        problem(c, "listen address %s: cannot bind (%s)", addr, strerror(errno));
    close(fd);
}

static int check_file(check_t *c, const char *what, const char *path, const char *var,
                      const char *fix);

static void check_tls(check_t *c, const char *cert, const char *key)
{
    static const char fix[] = "a PEM file readable by the service's user";
    if (check_file(c, "TLS certificate", cert, "MOONGATE_TLS_CERT", fix) != 0 ||
        check_file(c, "TLS key", key, "MOONGATE_TLS_KEY", fix) != 0)
        return;
    mg_tls_ctx_t *ctx = NULL;
    char err[1024];
    if (mg_tls_ctx_load(cert, key, &ctx, err, sizeof(err)) != 0) {
        if (strstr(err, " expired (") != NULL)
            problem(c, "%s; renew it (SIGHUP loads the new one)", err);
        else
            problem(c, "%s; MOONGATE_TLS_CERT is the certificate (its chain after it), "
                       "MOONGATE_TLS_KEY its private key, both PEM", err);
        return;
    }
    char what[512];
    mg_tls_ctx_describe(ctx, what, sizeof(what));
    int days = mg_tls_ctx_days_left(ctx);
    good(c, "TLS certificate %s: %s, %d day%s left%s", cert, what, days, days == 1 ? "" : "s",
         days < 14 ? " (renew it soon; SIGHUP loads the new one)" : "");
    mg_tls_ctx_unref(ctx);
}

/* Readable, and not empty, by the user this runs as. */
static int check_file(check_t *c, const char *what, const char *path, const char *var,
                      const char *fix)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        problem(c, "%s %s: %s (%s); %s", what, path, strerror(errno), var, fix);
        return -1;
    }
    char b;
    ssize_t n = read(fd, &b, 1);
    close(fd);
    if (n != 1) {
        problem(c, "%s %s is empty (%s); %s", what, path, var, fix);
        return -1;
    }
    return 0;
}

static void check_route_files(check_t *c, mg_policy_t *p)
{
    char key[1024], kh[1024];
    int rc = mg_policy_default_route_files(p, key, sizeof(key), kh, sizeof(kh));
    if (rc < 0) {
        problem(c, "the default route cannot be read from the policy");
        return;
    }
    if (rc == 0)
        return; /* the policy routes its own way: its files are its own business */
    int bad = c->problems;
    if (key[0] != '\0')
        check_file(c, "SSH key", key, "MOONGATE_SSH_KEY",
                   "make one with ssh-keygen -t ed25519 -N '' -f FILE, readable by the "
                   "service's user (group moongate, mode 0640)");
    if (kh[0] != '\0')
        check_file(c, "known_hosts", kh, "MOONGATE_KNOWN_HOSTS",
                   "fill it with ssh-keyscan -p PORT HOST, and check the keys it got");
    if (c->problems == bad)
        good(c, "the default route's SSH key %s and known_hosts %s are readable", key, kh);
}

/* Redis answers AUTH, SELECT and PING, over TLS when asked, within 2 s. */
static void check_redis(check_t *c, uv_loop_t *loop, const mg_gateway_opts_t *go)
{
    mg_policy_options_t po;
    mg_policy_options_init(&po, NULL);
    po.redis_url = go->redis_url;
    po.redis_ca_file = go->redis_ca_file;
    po.redis_cert_file = go->redis_cert_file;
    po.redis_key_file = go->redis_key_file;
    char msg[600];
    int rc = mg_policy_redis_probe(loop, &po, 2000, msg, sizeof(msg));
    if (rc == 0)
        good(c, "redis %s: the shared dictionary is cluster-wide", msg);
    else if (rc == MG_ECONFIG)
        problem(c, "%s", msg);
    else /* Redis may be down for now: that must not keep a node from starting */
        warning(c, "redis %s; the gateway starts anyway, and every mg.dict call fails at once "
                "until Redis answers", msg);
}

int mg_check_run(const char *policy, const char *listen, FILE *ok, FILE *bad)
{
    check_t c = { .ok = ok, .bad = bad };
    char err[1024];
    mg_settings_t settings;
    mg_settings_init(&settings);
    if (mg_settings_from_env(&settings, err, sizeof(err)) != 0) {
        problem(&c, "%s", err);
        mg_settings_init(&settings);
    }
    /* The report is the output; the log says only what is wrong. */
    mg_log_set_level(MG_LOG_WARN);
    mg_log_set_format(settings.log_format);
    mg_gateway_opts_t go = { 0 };
    char host[256];
    if (mg_gateway_opts_from_env(&go, err, sizeof(err)) != 0)
        problem(&c, "%s", err);
    else if (listen != NULL && mg_gateway_parse_listen(&go, listen, host, sizeof(host)) != 0)
        problem(&c, "-l: expected ADDR:PORT, got \"%s\"", listen);
    else
        check_listen(&c, go.listen_host, go.listen_port);
    if (go.tls_cert != NULL && go.tls_key != NULL)
        check_tls(&c, go.tls_cert, go.tls_key);

    uv_loop_t loop;
    uv_loop_init(&loop);
    mg_policy_options_t po;
    mg_policy_options_init(&po, &settings);
    po.path = policy;
    mg_policy_t *p = NULL;
    if (mg_policy_new(&loop, &po, &p, err, sizeof(err)) == 0) {
        good(&c, "policy %s is valid (Lua library: %s)", policy ? policy : "(built-in)",
             mg_policy_lua_dir(p));
        check_route_files(&c, p);
        mg_policy_free(p);
    } else {
        problem(&c, "%s", err);
    }
    uv_run(&loop, UV_RUN_DEFAULT);
    if (go.redis_url != NULL)
        check_redis(&c, &loop, &go);
    uv_loop_close(&loop);

    if (c.problems > 0)
        fprintf(bad, "moongate: %d problem%s: not ready to start\n", c.problems,
                c.problems == 1 ? "" : "s");
    else
        good(&c, "ready to start");
    return c.problems > 0 ? 1 : 0;
}
