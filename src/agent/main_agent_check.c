/*
 * moongate-agent's start-up checks: --sshd-inetd is looked at before the first connection, so
 * a missing sshd, a config file that is not there or one sshd refuses is reported at once,
 * with what to do, rather than as a 502 on the gateway's first request. Also the helpers that
 * run a program to its end, shared with `moongate-agent setup`.
 */
#include "main_agent.h"

#include "moongate/error.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

int mg_agent_run(char *const argv[], bool quiet)
{
    pid_t pid = fork();
    if (pid < 0)
        return MG_ECONFIG;
    if (pid == 0) {
        if (quiet) {
            int fd = open("/dev/null", O_WRONLY);
            if (fd >= 0) {
                dup2(fd, 1);
                dup2(fd, 2);
            }
        } else {
            dup2(2, 1); /* what the program says goes where the agent's messages go */
        }
        execvp(argv[0], argv);
        fprintf(stderr, "moongate-agent: cannot run %s: %s\n", argv[0], strerror(errno));
        _exit(127);
    }
    int status = 0;
    while (waitpid(pid, &status, 0) < 0)
        if (errno != EINTR)
            return MG_ECONFIG;
    return WIFEXITED(status) && WEXITSTATUS(status) == 0 ? 0 : MG_ECONFIG;
}

const char *mg_agent_find_sshd(void)
{
    static const char *const paths[] = { "/usr/sbin/sshd", "/usr/local/sbin/sshd", "/sbin/sshd" };
    for (size_t i = 0; i < sizeof(paths) / sizeof(paths[0]); i++)
        if (access(paths[i], X_OK) == 0)
            return paths[i];
    return NULL;
}

/* Whether file names an executable the way execvp finds it: a path as it is, a bare name on
   $PATH. */
static bool executable(const char *file)
{
    if (strchr(file, '/') != NULL)
        return access(file, X_OK) == 0;
    const char *path = getenv("PATH");
    if (path == NULL)
        path = "/usr/local/bin:/usr/bin:/bin";
    while (*path) {
        size_t n = strcspn(path, ":");
        char full[PATH_MAX];
        int w = snprintf(full, sizeof(full), "%.*s/%s", (int)n, n > 0 ? path : ".", file);
        if (w > 0 && (size_t)w < sizeof(full) && access(full, X_OK) == 0)
            return true;
        path += n + (path[n] == ':');
    }
    return false;
}

int mg_agent_check_inetd(const char *cmd, char *expanded, size_t cap)
{
    char err[512];
    int rc = mg_agent_expand_home(cmd, getenv("HOME"), expanded, cap, err, sizeof(err));
    if (rc == MG_ENOMEM) {
        fprintf(stderr, "moongate-agent: --sshd-inetd is too long\n");
        return 2;
    }
    if (rc != 0) {
        fprintf(stderr, "moongate-agent: --sshd-inetd: %s\n", err);
        return 2;
    }
    char **argv = NULL;
    int argc = 0;
    if (mg_agent_split_command(expanded, &argv, &argc) != 0) {
        fprintf(stderr, "moongate-agent: --sshd-inetd needs a command\n");
        return 2;
    }
    int code = 2;
    const char *config = NULL;
    for (int i = 1; i + 1 < argc; i++)
        if (strcmp(argv[i], "-f") == 0)
            config = argv[i + 1];
    const char *base = strrchr(argv[0], '/');
    base = base != NULL ? base + 1 : argv[0];
    if (!executable(argv[0])) {
        fprintf(stderr, "moongate-agent: --sshd-inetd: %s is not an executable %s (install "
                        "openssh-server, or give sshd's full path)\n", argv[0],
                strchr(argv[0], '/') != NULL ? "file" : "on $PATH");
    } else if (config != NULL && access(config, R_OK) != 0) {
        fprintf(stderr, "moongate-agent: --sshd-inetd: cannot read the config file %s (%s); "
                        "`moongate-agent setup` writes one\n", config, strerror(errno));
    } else if (strcmp(base, "sshd") == 0) {
        /* sshd's own check of its config and keys: the first connection would fail the same
           way, with the message lost to the gateway. */
        char *check[] = { argv[0], "-t", config != NULL ? "-f" : NULL, (char *)config, NULL };
        if (mg_agent_run(check, false) != 0)
            fprintf(stderr, "moongate-agent: `%s -t%s%s` refused the configuration (sshd's "
                            "message is above)\n", argv[0], config != NULL ? " -f " : "",
                    config != NULL ? config : "");
        else
            code = 0;
    } else {
        code = 0;
    }
    free(argv);
    return code;
}
