/*
 * moongate: the gateway program. Command line, environment, signals; everything else is the
 * gateway object (include/moongate/gateway.h).
 *
 *   SIGHUP           reload the policy (a failed reload keeps the old one and says why)
 *   SIGTERM, SIGINT  drain, then exit 0; a second one exits at once
 */
#include "check.h"

#include "moongate/error.h"
#include "moongate/gateway.h"
#include "moongate/log.h"
#include "moongate/policy.h"

#include <getopt.h>
#include <signal.h>
#include <sys/resource.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct app {
    uv_loop_t *loop;
    mg_gateway_t *gw;
    uv_signal_t sighup, sigterm, sigint;
    int exit_code;
} app_t;

static void usage(FILE *out)
{
    fprintf(out,
            "usage: moongate [-c POLICY.lua] [-l ADDR:PORT]\n"
            "       moongate -t [-c POLICY.lua] [-l ADDR:PORT]\n"
            "\n"
            "Serves HTTP on ADDR:PORT and forwards each request, as the policy decides, over\n"
            "pooled SSH connections to the user's machine.\n"
            "\n"
            "  -c, --config FILE   the policy (Lua); default: the built-in policy\n"
            "  -l, --listen ADDR   where to listen; default: $MOONGATE_LISTEN or 127.0.0.1:8080\n"
            "  -t, --test          check the settings, listen address, TLS files, policy and\n"
            "                      the default route's SSH files, then exit (0: ok, 1: error)\n"
            "  -V, --version       print the version\n"
            "  -h, --help          this text\n"
            "\n"
            "Signals: HUP reloads the policy and the TLS certificate; TERM or INT drains and\n"
            "exits (twice: at once).\n"
            "Settings come from the environment; see README.md.\n");
}

static void close_signals(app_t *a)
{
    uv_close((uv_handle_t *)&a->sighup, NULL);
    uv_close((uv_handle_t *)&a->sigterm, NULL);
    uv_close((uv_handle_t *)&a->sigint, NULL);
}

static void on_drained(mg_gateway_t *gw, const mg_shutdown_result_t *r, void *arg)
{
    app_t *a = arg;
    mg_log_info("moongate", "stopped: %d SSH connections closed%s%s", r->connections_closed,
                r->success ? "" : "; ", r->success ? "" : r->errors_text);
    close_signals(a);
    mg_gateway_free(gw);
    a->gw = NULL;
}

static void on_signal(uv_signal_t *h, int signum)
{
    app_t *a = h->data;
    if (signum == SIGHUP) {
        char err[512];
        if (a->gw && !mg_gateway_draining(a->gw))
            mg_gateway_reload(a->gw, err, sizeof(err));
        return;
    }
    if (a->gw == NULL)
        return;
    if (mg_gateway_draining(a->gw)) {
        mg_log_warn("moongate", "second %s: exiting now", signum == SIGINT ? "SIGINT" : "SIGTERM");
        exit(1);
    }
    mg_gateway_drain(a->gw, signum == SIGINT ? "SIGINT" : "SIGTERM", on_drained, a);
}

/*
 * Takes the hard descriptor limit as the soft one (systemd and login shells often start a
 * service at 1024 below a high hard limit), and says so when even that cannot hold the client
 * connections allowed: past it, accepting pauses (README, "What a client sees").
 */
static void raise_nofile(uint32_t max_clients)
{
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) != 0)
        return;
    if (rl.rlim_cur < rl.rlim_max) {
        rlim_t was = rl.rlim_cur;
        rl.rlim_cur = rl.rlim_max;
        if (setrlimit(RLIMIT_NOFILE, &rl) == 0)
            mg_log_debug("moongate", "descriptor limit raised from %llu to %llu",
                         (unsigned long long)was, (unsigned long long)rl.rlim_cur);
        else
            getrlimit(RLIMIT_NOFILE, &rl);
    }
    /* Each client needs one; the SSH connections, the log and the loop need some more. */
    if ((uint64_t)max_clients + 256 > (uint64_t)rl.rlim_cur)
        mg_log_warn("moongate", "MOONGATE_MAX_CLIENTS is %u but the descriptor limit is %llu: "
                    "new connections will wait before that many are open; raise the limit "
                    "(LimitNOFILE= in the unit, ulimit -n) or lower MOONGATE_MAX_CLIENTS",
                    max_clients, (unsigned long long)rl.rlim_cur);
}

int main(int argc, char **argv)
{
    static const struct option longopts[] = {
        { "config", required_argument, NULL, 'c' },
        { "listen", required_argument, NULL, 'l' },
        { "test", no_argument, NULL, 't' },
        { "version", no_argument, NULL, 'V' },
        { "help", no_argument, NULL, 'h' },
        { NULL, 0, NULL, 0 },
    };
    const char *policy = NULL, *listen = NULL;
    bool test = false;
    int opt;
    while ((opt = getopt_long(argc, argv, "c:l:tVh", longopts, NULL)) != -1) {
        switch (opt) {
        case 'c': policy = optarg; break;
        case 'l': listen = optarg; break;
        case 't': test = true; break;
        case 'V': printf("moongate %s\n", MG_VERSION); return 0;
        case 'h': usage(stdout); return 0;
        default: usage(stderr); return 2;
        }
    }
    if (optind < argc) {
        fprintf(stderr, "moongate: unexpected argument \"%s\"\n", argv[optind]);
        usage(stderr);
        return 2;
    }

    if (test)
        return mg_check_run(policy, listen, stdout, stderr);

    char err[1024];
    mg_settings_t settings;
    mg_settings_init(&settings);
    if (mg_settings_from_env(&settings, err, sizeof(err)) != 0) {
        fprintf(stderr, "moongate: %s\n", err);
        return 2;
    }
    mg_log_set_level(settings.log_level);
    mg_log_set_format(settings.log_format);

    mg_gateway_opts_t go;
    if (mg_gateway_opts_from_env(&go, err, sizeof(err)) != 0) {
        fprintf(stderr, "moongate: %s\n", err);
        return 2;
    }
    char host[256];
    if (listen && mg_gateway_parse_listen(&go, listen, host, sizeof(host)) != 0) {
        fprintf(stderr, "moongate: -l: expected ADDR:PORT, got \"%s\"\n", listen);
        return 2;
    }
    go.policy_path = policy;

    signal(SIGPIPE, SIG_IGN);
    raise_nofile(go.max_clients);
    app_t a = { .loop = uv_default_loop() };
    a.loop->data = &a;
    if (mg_gateway_new(a.loop, &settings, &go, &a.gw, err, sizeof(err)) != 0) {
        fprintf(stderr, "moongate: %s\n", err);
        return 1;
    }
    uv_signal_init(a.loop, &a.sighup);
    uv_signal_init(a.loop, &a.sigterm);
    uv_signal_init(a.loop, &a.sigint);
    a.sighup.data = a.sigterm.data = a.sigint.data = &a;
    uv_signal_start(&a.sighup, on_signal, SIGHUP);
    uv_signal_start(&a.sigterm, on_signal, SIGTERM);
    uv_signal_start(&a.sigint, on_signal, SIGINT);
    mg_log_info("moongate", "listening on %s://%s:%d (policy: %s)",
                go.tls_cert ? "https" : "http", go.listen_host, mg_gateway_port(a.gw),
                policy ? policy : "built-in");

    uv_run(a.loop, UV_RUN_DEFAULT);
    uv_loop_close(a.loop);
    return a.exit_code;
}
