/*
 * `moongate-agent setup`: prepares a private, unprivileged sshd for --sshd-inetd.
 *
 * In DIR (default ~/.config/moongate-agent, mode 0700) it keeps an ed25519 host key (made once
 * with ssh-keygen, kept on later runs), and rewrites sshd_config and authorized_keys. The config
 * allows public-key logins only, as the user who runs the agent, and port forwarding only; the
 * authorized_keys line limits the gateway's key to 127.0.0.1:LLMPORT. It then checks the config
 * with `sshd -t` and prints what the gateway's operator and the user need.
 *
 * This runs before any event loop: blocking calls (fork, waitpid, file writes) are fine here.
 */
#include "main_agent.h"

#include "moongate/error.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pwd.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

static void setup_usage(FILE *out)
{
    fprintf(out,
        "usage: moongate-agent setup [--dir DIR] --gateway-key 'ssh-ed25519 AAAA... comment'\n"
        "                            [--llm-port PORT]\n"
        "\n"
        "Prepares an unprivileged sshd for `moongate-agent --sshd-inetd` in DIR (default\n"
        "~/.config/moongate-agent): a host key (kept when it exists), sshd_config (public-key\n"
        "logins as you, port forwarding only), and authorized_keys allowing the gateway's key\n"
        "to reach 127.0.0.1:PORT (default 11434) and nothing else. Prints the host key\n"
        "fingerprint to pin in the gateway's policy and the command that runs the agent.\n"
        "Safe to run again (e.g. to change the gateway key or the port).\n");
}

/* Runs argv (no shell) and waits. Returns 0 when it exited 0, else MG_ECONFIG. */
/* mkdir -p with mode 0700 for what it creates. */
static int make_dirs(const char *path)
{
    char tmp[PATH_MAX];
    size_t n = strlen(path);
    if (n >= sizeof(tmp))
        return MG_EINVAL;
    memcpy(tmp, path, n + 1);
    for (char *p = tmp + 1; *p; p++) {
        if (*p != '/')
            continue;
        *p = '\0';
        if (mkdir(tmp, 0700) != 0 && errno != EEXIST)
            return MG_ECONFIG;
        *p = '/';
    }
    if (mkdir(tmp, 0700) != 0 && errno != EEXIST)
        return MG_ECONFIG;
    return 0;
}

/* Writes text to path through a temporary file and a rename, so a reader never sees half. */
static int write_file(const char *path, const char *text, mode_t mode)
{
    char tmp[PATH_MAX];
    int rc = MG_ECONFIG;
    FILE *f = NULL;
    if (snprintf(tmp, sizeof(tmp), "%s.tmp", path) >= (int)sizeof(tmp))
        return MG_EINVAL;
    int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC, mode);
    if (fd < 0)
        goto out;
    f = fdopen(fd, "w");
    if (f == NULL) {
        close(fd);
        goto out;
    }
    if (fputs(text, f) == EOF)
        goto out;
    if (fclose(f) != 0) {
        f = NULL;
        goto out;
    }
    f = NULL;
    if (chmod(tmp, mode) != 0 || rename(tmp, path) != 0)
        goto out;
    rc = 0;
out:
    if (f != NULL)
        fclose(f);
    if (rc != 0) {
        fprintf(stderr, "moongate-agent: cannot write %s: %s\n", path, strerror(errno));
        unlink(tmp);
    }
    return rc;
}

static int read_line(const char *path, char *out, size_t outlen)
{
    FILE *f = fopen(path, "r");
    if (f == NULL)
        return MG_ECONFIG;
    int rc = fgets(out, (int)outlen, f) != NULL ? 0 : MG_ECONFIG;
    fclose(f);
    out[strcspn(out, "\r\n")] = '\0';
    return rc;
}

int mg_agent_setup_main(int argc, char **argv)
{
    mg_agent_setup_args_t args;
    char err[512];
    if (mg_agent_setup_args_parse(argc, argv, &args, err, sizeof(err)) != 0) {
        fprintf(stderr, "moongate-agent: %s\n", err);
        return 2;
    }
    if (args.help) {
        setup_usage(stdout);
        return 0;
    }

    char given[PATH_MAX], dir[PATH_MAX];
    const char *home = getenv("HOME");
    if (args.dir != NULL) {
        if (snprintf(given, sizeof(given), "%s", args.dir) >= (int)sizeof(given))
            goto too_long;
    } else if (home != NULL && home[0] == '/') {
        if (snprintf(given, sizeof(given), "%s/.config/moongate-agent", home) >= (int)sizeof(given))
            goto too_long;
    } else {
        fprintf(stderr, "moongate-agent: $HOME is not set; pass --dir\n");
        return 2;
    }
    if (make_dirs(given) != 0 || realpath(given, dir) == NULL) {
        fprintf(stderr, "moongate-agent: cannot create %s: %s\n", given, strerror(errno));
        return 1;
    }
    /* sshd_config paths are unquoted and --sshd-inetd splits on spaces. */
    if (dir[strcspn(dir, " \t\n\"'\\")] != '\0') {
        fprintf(stderr, "moongate-agent: %s has a space or a quote; pass another --dir\n", dir);
        return 2;
    }
    chmod(dir, 0700);

    char key[PATH_MAX], pub[PATH_MAX], cfg[PATH_MAX], ak[PATH_MAX];
    if (snprintf(key, sizeof(key), "%s/ssh_host_ed25519_key", dir) >= (int)sizeof(key) ||
        snprintf(pub, sizeof(pub), "%s.pub", key) >= (int)sizeof(pub) ||
        snprintf(cfg, sizeof(cfg), "%s/sshd_config", dir) >= (int)sizeof(cfg) ||
        snprintf(ak, sizeof(ak), "%s/authorized_keys", dir) >= (int)sizeof(ak))
        goto too_long;

    bool have_key = access(key, F_OK) == 0;
    if (!have_key) {
        char *kg[] = { "ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C",
                       "moongate-agent host key", "-f", key, NULL };
        if (mg_agent_run(kg, false) != 0) {
            fprintf(stderr, "moongate-agent: ssh-keygen failed (is openssh-client installed?)\n");
            return 1;
        }
    }
    char publine[1024], fp[64];
    if (read_line(pub, publine, sizeof(publine)) != 0 ||
        mg_agent_pubkey_fingerprint(publine, fp, sizeof(fp)) != 0) {
        fprintf(stderr, "moongate-agent: cannot read the host key %s (delete %s and %s to "
                        "make a new one)\n", pub, key, pub);
        return 1;
    }

    char config[4096];
    int n = snprintf(config, sizeof(config),
        "# moongate-agent: a private sshd, started per connection by\n"
        "#   moongate-agent --sshd-inetd 'SSHD -i -e -f %s'\n"
        "# It runs as the user who runs the agent and only lets the gateway forward to the\n"
        "# port named in authorized_keys. Rewritten by `moongate-agent setup`.\n"
        "HostKey %s\n"
        "AuthorizedKeysFile %s\n"
        "PubkeyAuthentication yes\n"
        "AuthenticationMethods publickey\n"
        "PasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\n"
        "HostbasedAuthentication no\n"
        "StrictModes no\n"
        "UsePAM no\n"
        "AllowTcpForwarding yes\n"
        "AllowStreamLocalForwarding no\n"
        "AllowAgentForwarding no\n"
        "GatewayPorts no\n"
        "PermitTunnel no\n"
        "PermitTTY no\n"
        "X11Forwarding no\n"
        "PermitUserEnvironment no\n"
        "PrintMotd no\n"
        "PrintLastLog no\n"
        "UseDNS no\n"
        "# The gateway keeps WebSockets spare until it needs them; sshd must not give up on one\n"
        "# before the SSH login starts (only the gateway reaches this sshd, through the agent).\n"
        "LoginGraceTime 30\n"
        "PidFile none\n"
        "LogLevel INFO\n",
        cfg, key, ak);
    if (n < 0 || (size_t)n >= sizeof(config))
        goto too_long;
    char akline[16384 + 128];
    if (mg_agent_authorized_line(args.gateway_key, args.llm_port, akline,
                                 sizeof(akline) - 1) != 0)
        goto too_long;
    size_t akn = strlen(akline);
    akline[akn] = '\n';
    akline[akn + 1] = '\0';
    if (write_file(cfg, config, 0600) != 0 || write_file(ak, akline, 0600) != 0)
        return 1;
    akline[akn] = '\0';

    const char *sshd = mg_agent_find_sshd();
    if (sshd == NULL) {
        fprintf(stderr, "moongate-agent: no sshd found (install openssh-server; the agent "
                        "runs it, no service needs to be enabled)\n");
        sshd = "/usr/sbin/sshd";
    } else {
        char *check[] = { (char *)sshd, "-t", "-f", cfg, NULL };
        if (mg_agent_run(check, false) != 0) {
            fprintf(stderr, "moongate-agent: `%s -t -f %s` refused the config (above)\n",
                    sshd, cfg);
            return 1;
        }
    }

    /* The user unit's settings (moongate-agent.service): written once, then the user's. */
    char envf[PATH_MAX], envtext[PATH_MAX * 2 + 512];
    if (snprintf(envf, sizeof(envf), "%s/agent.env", dir) >= (int)sizeof(envf))
        goto too_long;
    bool have_env = access(envf, F_OK) == 0;
    if (!have_env) {
        n = snprintf(envtext, sizeof(envtext),
                     "# moongate-agent's settings for `systemctl --user start moongate-agent`.\n"
                     "# Kept by `moongate-agent setup` once written.\n"
                     "MOONGATE_GATEWAY=wss://HOST/tunnel\n"
                     "MOONGATE_TOKEN=\n"
                     "MOONGATE_SSHD_INETD=%s -i -e -f %s\n",
                     sshd, cfg);
        if (n < 0 || (size_t)n >= sizeof(envtext))
            goto too_long;
        if (write_file(envf, envtext, 0600) != 0)
            return 1;
    }

    const struct passwd *pw = getpwuid(getuid());
    const char *user = pw != NULL ? pw->pw_name : "THIS_USER";
    printf("moongate-agent: %s in %s (host key %s)\n\n", have_key ? "updated" : "set up", dir,
           have_key ? "kept" : "created");
    printf("1. The gateway's key may forward to 127.0.0.1:%d and nothing else "
           "(%s):\n\n   %s\n\n", args.llm_port, ak, akline);
    printf("2. Pin this machine's host key in the gateway's policy route for this user;\n"
           "   the gateway logs in as %s (the user sshd runs as):\n\n"
           "   transport = \"agent\", ssh_user = \"%s\", host_key = \"%s\",\n"
           "   target_host = \"127.0.0.1\", target_port = %d\n\n",
           user, user, fp, args.llm_port);
    printf("3. Run the agent (the token from the gateway's operator):\n\n"
           "   MOONGATE_TOKEN=... moongate-agent --gateway wss://HOST/tunnel "
           "--sshd-inetd '%s -i -e -f %s'\n\n"
           "   or as a user service: put the gateway's URL and the token in %s (%s),\n"
           "   then systemctl --user enable --now moongate-agent\n",
           sshd, cfg, envf, have_env ? "kept as it was" : "written");
    return 0;

too_long:
    fprintf(stderr, "moongate-agent: a path or the key is too long\n");
    return 2;
}
