/*
 * moongate-agent: runs on the user's machine (behind NAT), dials out to the gateway's /tunnel
 * WebSocket endpoint and bridges each WebSocket to a fresh stream to the local sshd
 * (docs/tunnel.md, docs/agent.md). This file is the command line; the tunnel is
 * main_agent_tunnel.c, `moongate-agent setup` is main_agent_setup.c.
 *
 *   SIGTERM, SIGINT  close every WebSocket with 1000 "agent stopping", then exit 0 (within
 *                    about 2 s); a second one exits at once
 */
#include "main_agent.h"

#include "moongate/error.h"
#include "moongate/log.h"

#include <limits.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#ifndef MG_VERSION
#define MG_VERSION "0"
#endif

static void usage(FILE *out)
{
    fprintf(out,
        "usage: MOONGATE_TOKEN=TOKEN moongate-agent --gateway ws[s]://HOST[:PORT]/tunnel\n"
        "           [--ssh HOST:PORT | --sshd-inetd 'CMD'] [--ca-file PEM]\n"
        "           [--max-connections N] [--resolve-interval S] [--once] [-v]\n"
        "       moongate-agent setup [--dir DIR] --gateway-key 'ssh-ed25519 AAAA...' "
        "[--llm-port PORT]\n"
        "       moongate-agent --version | --help\n"
        "\n"
        "Dials out to a moongate gateway and lets it reach this machine's sshd through a\n"
        "WebSocket, so the machine needs no open port. The gateway then reaches the local LLM\n"
        "server through SSH port forwarding, limited by authorized_keys.\n"
        "\n"
        "  --gateway URL          the gateway's tunnel endpoint (ws:// or wss://; path "
        "default /tunnel);\n"
        "                         once per node of a cluster: each keeps its own tunnels;\n"
        "                         a HOST name with several addresses is a node per address\n"
        "                         (at most %d per name), dialled with HOST kept for TLS\n"
        "  --token TOKEN          the agent token; better in $MOONGATE_TOKEN (argv shows in ps)\n"
        "  --ssh HOST:PORT        the local sshd to connect to (default 127.0.0.1:22)\n"
        "  --sshd-inetd 'CMD'     instead, run CMD (split on spaces, no shell) per connection,\n"
        "                         speaking SSH on its stdin/stdout, e.g.\n"
        "                         '/usr/sbin/sshd -i -e -f ~/.config/moongate-agent/sshd_config'\n"
        "  --ca-file PEM          trust these CAs for wss:// instead of the system's store\n"
        "  --max-connections N    WebSockets at most per node (default %d); the gateway asks\n"
        "                         for more\n"
        "  --resolve-interval S   look up each --gateway name again every S seconds (default\n"
        "                         %d): nodes come and go with its addresses\n"
        "  --once                 exit when the first connection ends (tests, debugging)\n"
        "  -v, -vv                debug, trace logs (else $MOONGATE_LOG_LEVEL, default info)\n"
        "  -V, --version          print the version\n"
        "  -h, --help             this text\n"
        "\n"
        "setup prepares a private sshd for --sshd-inetd in DIR (default\n"
        "~/.config/moongate-agent) and prints what to give the gateway; see setup --help.\n"
        "\n"
        "It reconnects forever with backoff (1 s doubling to 60 s, jittered). Exit status: 0\n"
        "after a signal, 1 on a runtime error (or --once without a connection), 2 on bad\n"
        "arguments.\n",
        MG_AGENT_ADDRS_MAX, MG_AGENT_MAX_CONNECTIONS_DEFAULT,
        MG_AGENT_RESOLVE_INTERVAL_DEFAULT_S);
}

int main(int argc, char **argv)
{
    int code = 1;
    uv_loop_t loop;
    bool loop_ready = false;
    mg_agent_t *agent = NULL;

    const char *lvl = getenv("MOONGATE_LOG_LEVEL");
    mg_log_level_t level = MG_LOG_INFO;
    if (lvl != NULL && mg_log_level_parse(lvl, &level) != 0) {
        fprintf(stderr, "moongate-agent: MOONGATE_LOG_LEVEL must be error, warn, info, debug "
                        "or trace (got \"%s\")\n", lvl);
        return 2;
    }
    mg_log_set_level(level);
    const char *fmt = getenv("MOONGATE_LOG_FORMAT");
    mg_log_format_t format = MG_LOG_TEXT;
    if (fmt != NULL && *fmt != '\0' && mg_log_format_parse(fmt, &format) != 0) {
        fprintf(stderr, "moongate-agent: MOONGATE_LOG_FORMAT must be text or json (got \"%s\")\n",
                fmt);
        return 2;
    }
    mg_log_set_format(format);

    if (argc >= 2 && strcmp(argv[1], "setup") == 0)
        return mg_agent_setup_main(argc - 2, argv + 2);

    mg_agent_args_t args;
    char err[512];
    if (mg_agent_args_parse(argc, argv, getenv("MOONGATE_TOKEN"), &args, err,
                            sizeof(err)) != 0) {
        fprintf(stderr, "moongate-agent: %s\n", err);
        return 2;
    }
    if (args.help) {
        usage(stdout);
        return 0;
    }
    if (args.version) {
        printf("moongate-agent %s\n", MG_VERSION);
        return 0;
    }
    if (args.ca_file != NULL && access(args.ca_file, R_OK) != 0) {
        fprintf(stderr, "moongate-agent: --ca-file %s is not readable\n", args.ca_file);
        return 2;
    }
    char inetd[PATH_MAX * 2];
    if (args.sshd_inetd != NULL) {
        int rc = mg_agent_check_inetd(args.sshd_inetd, inetd, sizeof(inetd));
        if (rc != 0)
            return rc;
        args.sshd_inetd = inetd;
    }
    if (args.verbose > 0)
        mg_log_set_level(args.verbose > 1 ? MG_LOG_TRACE : MG_LOG_DEBUG);
    if (args.token_from_argv)
        mg_log_warn("agent", "--token is visible to every user of this machine (ps); "
                             "prefer MOONGATE_TOKEN");

    /* A write to a gone sshd or gateway must be an error return, not a killed process. */
    signal(SIGPIPE, SIG_IGN);
    if (uv_loop_init(&loop) != 0) {
        fprintf(stderr, "moongate-agent: cannot start the event loop\n");
        goto out;
    }
    loop_ready = true;
    if (mg_agent_start(&loop, &args, &agent, err, sizeof(err)) != 0) {
        mg_log_error("agent", "%s", err);
        goto out;
    }
    uv_run(&loop, UV_RUN_DEFAULT);
    code = mg_agent_free(agent);
out:
    if (loop_ready) {
        /* Anything still closing (a child's handle) finishes before the loop goes. */
        uv_run(&loop, UV_RUN_DEFAULT);
        uv_loop_close(&loop);
    }
    return code;
}
