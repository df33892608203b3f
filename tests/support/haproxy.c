#include "haproxy.h"

#include "moongate/error.h"

#include <stdio.h>
#include <string.h>
#include <unistd.h>

#define HAPROXY_PATH "/usr/sbin/haproxy"

static int write_config(const mg_test_haproxy_t *h, const char *path, const uint16_t *ports, int n,
                        bool retry)
{
    char text[4096];
    int len = snprintf(text, sizeof(text),
        "global\n"
        "  maxconn 2000\n"
        "defaults\n"
        "  mode http\n"
        "  timeout connect 2s\n"
        "  timeout client 120s\n"
        "  timeout server 120s\n"
        "  timeout http-keep-alive 5s\n"
        "  timeout check 1s\n"
        "%s"
        "frontend fe\n"
        "  bind 127.0.0.1:%u\n"
        "  default_backend nodes\n"
        "backend nodes\n"
        "  balance roundrobin\n"
        "  option httpchk GET /healthz\n"
        "  http-check expect status 200\n"
        "  default-server inter 100ms fall 1 rise 2\n",
        retry ? "  retries 2\n  option redispatch 1\n  retry-on conn-failure empty-response\n"
              : "  retries 0\n",
        (unsigned)h->port);
    for (int i = 0; i < n && len > 0 && (size_t)len < sizeof(text); i++)
        len += snprintf(text + len, sizeof(text) - (size_t)len,
                        "  server node%d 127.0.0.1:%u check\n", i + 1, (unsigned)ports[i]);
    if (len <= 0 || (size_t)len >= sizeof(text))
        return MG_EINVAL;
    return mg_test_write_file(path, text, (size_t)len, 0600);
}

int mg_test_haproxy_start(mg_test_haproxy_t *h, const uint16_t *node_ports, int n, bool retry)
{
    memset(h, 0, sizeof(*h));
    if (n < 1 || n > MG_TEST_HAPROXY_MAX_NODES || access(HAPROXY_PATH, X_OK) != 0)
        return MG_EINVAL;
    int rc = mg_test_mkdtemp(h->dir, sizeof(h->dir), "mg-haproxy");
    char cfg[MG_TEST_PATH_MAX + 16];
    snprintf(cfg, sizeof(cfg), "%s/haproxy.cfg", h->dir);
    snprintf(h->log, sizeof(h->log), "%s/haproxy.log", h->dir);
    /* A free port may be taken before haproxy binds it: try a few. */
    for (int attempt = 0; rc == 0 && attempt < 5; attempt++) {
        if ((rc = mg_test_free_port(&h->port)) != 0 ||
            (rc = write_config(h, cfg, node_ports, n, retry)) != 0)
            break;
        char *argv[] = { HAPROXY_PATH, "-db", "-f", cfg, NULL };
        mg_test_spawn_opts_t so = { .stdout_path = h->log, .stderr_path = h->log };
        if ((rc = mg_test_proc_spawn(&h->proc, argv, &so)) != 0)
            break;
        if (mg_test_wait_port(h->port, 5000, &h->proc) == 0) {
            h->running = true;
            return 0;
        }
        mg_test_proc_stop(&h->proc, 1000);
        rc = 0;
    }
    return rc != 0 ? rc : MG_ETIMEDOUT;
}

void mg_test_haproxy_stop(mg_test_haproxy_t *h)
{
    if (h->running)
        mg_test_proc_stop(&h->proc, 2000);
    h->running = false;
}
