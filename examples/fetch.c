/*
 * moongate-fetch: the core on its own. Takes a lease for a user from a pool of SSH connections,
 * opens a direct-tcpip channel to a target on the SSH server's side, sends one HTTP/1.1 GET
 * and copies the response to stdout as it streams in. Then it shuts the pool down cleanly.
 *
 *   moongate-fetch -h 127.0.0.1 -p 22 -u llm -k ~/.ssh/id_ed25519 -K ~/.ssh/known_hosts \
 *                  -t 127.0.0.1:11434 [-U alice] [PATH]
 */
#include "moongate/error.h"
#include "moongate/log.h"
#include "moongate/pool.h"
#include "moongate/shutdown.h"
#include "moongate/ssh_backend.h"

#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct fetch {
    uv_loop_t *loop;
    mg_pool_t *pool;
    mg_pool_acquire_t req;
    mg_pool_conn_t *lease;
    const char *target_host;
    int target_port;
    const char *path;
    int status;
    mg_shutdown_t shutdown;
} fetch_t;

static void finish(fetch_t *f, int status);

static void on_shutdown_done(mg_shutdown_t *s, const mg_shutdown_result_t *r)
{
    fetch_t *f = s->data;
    if (!r->success)
        fprintf(stderr, "moongate-fetch: shutdown: %s\n", r->errors_text);
    mg_pool_free(f->pool);
    f->pool = NULL;
}

static void finish(fetch_t *f, int status)
{
    if (f->status == 0)
        f->status = status;
    f->shutdown.data = f;
    mg_shutdown_opts_t o = { .grace_ms = 1000, .force_after_grace = true, .reason = "done" };
    mg_shutdown_start(&f->shutdown, f->loop, f->pool, &o, on_shutdown_done);
}

static void on_open(mg_ssh_chan_t *ch, int status)
{
    fetch_t *f = mg_ssh_chan_data(ch);
    if (status != 0) {
        fprintf(stderr, "moongate-fetch: %s\n", mg_ssh_chan_error(ch));
        f->status = status;
        return;
    }
    char req[1024];
    int n = snprintf(req, sizeof(req),
                     "GET %s HTTP/1.1\r\nHost: %s:%d\r\nConnection: close\r\n"
                     "User-Agent: moongate-fetch\r\n\r\n",
                     f->path, f->target_host, f->target_port);
    /* A request this small always fits the fresh channel's window. */
    if (mg_ssh_chan_write(ch, req, (size_t)n) != n)
        mg_ssh_chan_close(ch);
}

static void on_data(mg_ssh_chan_t *ch, const char *buf, size_t len)
{
    fwrite(buf, 1, len, stdout);
}

static void on_eof(mg_ssh_chan_t *ch)
{
    fflush(stdout);
    mg_ssh_chan_close(ch);
}

static void on_writable(mg_ssh_chan_t *ch)
{
}

static void on_close(mg_ssh_chan_t *ch, int status)
{
    fetch_t *f = mg_ssh_chan_data(ch);
    mg_pool_release(f->pool, f->lease);
    finish(f, status);
}

static const mg_ssh_chan_cbs_t chan_cbs = {
    .on_open = on_open,
    .on_data = on_data,
    .on_eof = on_eof,
    .on_writable = on_writable,
    .on_close = on_close,
};

static void leased(fetch_t *f)
{
    f->lease = f->req.conn;
    mg_ssh_chan_t *ch;
    int rc = mg_ssh_chan_open(mg_ssh_backend_conn(f->lease), f->target_host, f->target_port,
                              &chan_cbs, f, &ch);
    if (rc != 0) {
        fprintf(stderr, "moongate-fetch: cannot open a channel: %s\n", mg_strerror(rc));
        mg_pool_release(f->pool, f->lease);
        finish(f, rc);
    }
}

static void on_acquired(mg_pool_acquire_t *req, int status)
{
    fetch_t *f = req->data;
    if (status != 0) {
        fprintf(stderr, "moongate-fetch: %s\n", req->error);
        finish(f, status);
        return;
    }
    leased(f);
}

static void usage(FILE *out)
{
    fprintf(out,
            "usage: moongate-fetch -h HOST -p PORT -u SSH_USER -k KEY -K KNOWN_HOSTS\n"
            "                      -t TARGET_HOST:PORT [-U USER] [-v] [PATH]\n"
            "Fetches PATH (default /) from TARGET through an SSH channel from a moongate pool.\n");
}

int main(int argc, char **argv)
{
    mg_settings_t settings;
    mg_settings_init(&settings);
    char err[256];
    if (mg_settings_from_env(&settings, err, sizeof(err)) != 0) {
        fprintf(stderr, "moongate-fetch: %s\n", err);
        return 2;
    }
    mg_log_set_level(settings.log_level);

    mg_ssh_conn_opts_t route;
    mg_ssh_conn_opts_init(&route, &settings);
    fetch_t f = { .path = "/" };
    const char *user = "demo";
    char target[256] = "";
    int opt;
    while ((opt = getopt(argc, argv, "h:p:u:k:K:t:U:v")) != -1) {
        switch (opt) {
        case 'h': route.host = optarg; break;
        case 'p': route.port = atoi(optarg); break;
        case 'u': route.ssh_user = optarg; break;
        case 'k': route.key_path = optarg; break;
        case 'K': route.known_hosts = optarg; break;
        case 't': snprintf(target, sizeof(target), "%s", optarg); break;
        case 'U': user = optarg; break;
        case 'v': mg_log_set_level(MG_LOG_DEBUG); break;
        default: usage(stderr); return 2;
        }
    }
    char *colon = strrchr(target, ':');
    if (!route.host || !route.ssh_user || !route.key_path || !route.known_hosts || !colon) {
        usage(stderr);
        return 2;
    }
    *colon = '\0';
    f.target_host = target;
    f.target_port = atoi(colon + 1);
    if (optind < argc)
        f.path = argv[optind];

    f.loop = uv_default_loop();
    mg_ssh_backend_t backend;
    mg_ssh_backend_init(&backend, f.loop, &settings);
    int rc = mg_pool_new(f.loop, &settings, &mg_ssh_pool_backend, &backend, &f.pool);
    if (rc != 0) {
        fprintf(stderr, "moongate-fetch: %s\n", mg_strerror(rc));
        return 1;
    }
    f.req.data = &f;
    rc = mg_pool_acquire(f.pool, &f.req, user, &route, on_acquired);
    if (rc == 0)
        leased(&f);
    else if (rc != MG_EAGAIN) {
        fprintf(stderr, "moongate-fetch: %s\n", f.req.error);
        finish(&f, rc);
    }
    uv_run(f.loop, UV_RUN_DEFAULT);
    uv_loop_close(f.loop);
    return f.status == 0 ? 0 : 1;
}
