/*
 * The agent program for the person who runs it: `moongate-agent setup` (its files, the route it
 * prints with the LLM port, the user unit's settings kept on a second run) and the start-up
 * checks of --sshd-inetd, each broken case reported at once with exit status 2 and what to do,
 * where it used to be a 502 on the gateway's first request; and the line that says why it
 * cannot reach the gateway: nothing listening, a plain HTTP port given as wss://, a certificate
 * it does not trust or one for another name (a real TLS moongate, a real mg-upstream).
 */
#include "gwtest.h"

#include <sys/stat.h>

#define SSHD_PATH "/usr/sbin/sshd" /* Debian's, as tests/support/sshd.c runs it */

typedef struct world {
    char home[MG_TEST_PATH_MAX];    /* $HOME for the agent */
    char dir[MG_TEST_PATH_MAX + 32];     /* setup's directory: $HOME/.config/moongate-agent */
    char gateway_key[1024];
} world_t;

/* Runs the agent with argv (after the program) and HOME; returns its exit status, its stdout
   and stderr together in *out (free it). */
static int agent(const world_t *w, const char *const *args, char **out)
{
    char bin[MG_TEST_PATH_MAX], home[MG_TEST_PATH_MAX + 8];
    gw_program(bin, sizeof(bin), "moongate-agent");
    snprintf(home, sizeof(home), "HOME=%s", w->home);
    char *argv[16] = { bin };
    int n = 1;
    for (; args[n - 1] != NULL && n < 15; n++)
        argv[n] = (char *)args[n - 1];
    argv[n] = NULL;
    const char *env[] = { home, "MOONGATE_TOKEN=agent-token", NULL };
    static char *envp[1024];
    gw_env_merge(envp, sizeof(envp) / sizeof(envp[0]), env);
    return gw_run(argv, w->home, NULL, envp, 20000, out);
}

static int group_setup(void **state)
{
    world_t *w = calloc(1, sizeof(*w));
    if (w == NULL || mg_test_mkdtemp(w->home, sizeof(w->home), "mg-agent-home") != 0)
        return -1;
    snprintf(w->dir, sizeof(w->dir), "%s/.config/moongate-agent", w->home);
    /* sshd -t as root wants its privilege separation directory. */
    if (geteuid() == 0 && mkdir("/run/sshd", 0755) != 0 && errno != EEXIST)
        return -1;
    char key[MG_TEST_PATH_MAX + 8], pub[MG_TEST_PATH_MAX + 16];
    snprintf(key, sizeof(key), "%s/gw_key", w->home);
    char *kg[] = { "ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "gateway", "-f", key,
                   NULL };
    int code = -1;
    if (mg_test_proc_run(kg, NULL, 20000, &code) != 0 || code != 0)
        return -1;
    snprintf(pub, sizeof(pub), "%s.pub", key);
    char *text = NULL;
    if (mg_test_read_file(pub, &text, NULL) != 0)
        return -1;
    text[strcspn(text, "\n")] = '\0';
    snprintf(w->gateway_key, sizeof(w->gateway_key), "%s", text);
    free(text);
    *state = w;
    return 0;
}

static int group_teardown(void **state)
{
    free(*state);
    mg_test_cleanup_all();
    return 0;
}

static void expect_in(const char *text, const char *needle)
{
    if (strstr(text, needle) == NULL)
        fail_msg("wanted \"%s\" in:\n%s", needle, text);
}

static void test_setup_prints_the_route_with_the_llm_port(void **state)
{
    world_t *w = *state;
    char *out = NULL;
    const char *args[] = { "setup", "--gateway-key", w->gateway_key, "--llm-port", "8081", NULL };
    int code = agent(w, args, &out);
    if (code != 0)
        fail_msg("setup exited %d:\n%s", code, out);
    expect_in(out, "target_port = 8081");
    expect_in(out, "permitopen=\"127.0.0.1:8081\"");
    expect_in(out, "host_key = \"SHA256:");
    expect_in(out, "agent.env (written)");
    free(out);

    char path[MG_TEST_PATH_MAX * 2], *text = NULL;
    snprintf(path, sizeof(path), "%s/authorized_keys", w->dir);
    assert_int_equal(mg_test_read_file(path, &text, NULL), 0);
    expect_in(text, "permitopen=\"127.0.0.1:8081\"");
    expect_in(text, w->gateway_key);
    free(text);

    /* The user unit's settings: the command that runs this sshd, private to the user. */
    snprintf(path, sizeof(path), "%s/agent.env", w->dir);
    struct stat st;
    assert_int_equal(stat(path, &st), 0);
    assert_int_equal(st.st_mode & 0777, 0600);
    assert_int_equal(mg_test_read_file(path, &text, NULL), 0);
    char want[MG_TEST_PATH_MAX * 2];
    snprintf(want, sizeof(want), " -i -e -f %s/sshd_config\n", w->dir);
    expect_in(text, "MOONGATE_SSHD_INETD=/");
    expect_in(text, want);
    expect_in(text, "MOONGATE_GATEWAY=");
    free(text);

    /* Run again for another port: the user's settings stay as they were. */
    const char *mine = "MOONGATE_GATEWAY=wss://gw.example/tunnel\nMOONGATE_TOKEN=mine\n";
    assert_int_equal(mg_test_write_file(path, mine, strlen(mine), 0600), 0);
    const char *again[] = { "setup", "--gateway-key", w->gateway_key, "--llm-port", "9090", NULL };
    code = agent(w, again, &out);
    assert_int_equal(code, 0);
    expect_in(out, "target_port = 9090");
    expect_in(out, "agent.env (kept as it was)");
    free(out);
    assert_int_equal(mg_test_read_file(path, &text, NULL), 0);
    assert_string_equal(text, mine);
    free(text);
}

/* The agent with --sshd-inetd CMD against a gateway nothing listens on, once. */
static int inetd(const world_t *w, const char *cmd, char **out)
{
    const char *args[] = { "--gateway", "ws://127.0.0.1:1/tunnel", "--sshd-inetd", cmd, "--once",
                           NULL };
    return agent(w, args, out);
}

static void test_inetd_checked_at_start(void **state)
{
    world_t *w = *state;
    char cfg[MG_TEST_PATH_MAX * 2], bad[MG_TEST_PATH_MAX * 2], cmd[MG_TEST_PATH_MAX * 3];
    snprintf(cfg, sizeof(cfg), "%s/sshd_config", w->dir);
    assert_int_equal(access(cfg, R_OK), 0); /* from the setup test */
    char *out = NULL;

    /* "~/" is this user's home, as in the help's example: sshd accepts the config, and the
       agent goes on to dial (and, --once, gives up with 1: a runtime error, not a bad argument). */
    int code = inetd(w, SSHD_PATH " -i -e -f ~/.config/moongate-agent/sshd_config", &out);
    if (code != 1 || strstr(out, "--sshd-inetd") != NULL)
        fail_msg("exit %d:\n%s", code, out);
    free(out);

    code = inetd(w, SSHD_PATH " -i -f ~root/x", &out);
    assert_int_equal(code, 2);
    expect_in(out, "~NAME (another user's home) is not expanded");
    free(out);

    code = inetd(w, "no-such-sshd -i", &out);
    assert_int_equal(code, 2);
    expect_in(out, "no-such-sshd is not an executable on $PATH");
    free(out);

    code = inetd(w, "/nonexistent/sshd -i", &out);
    assert_int_equal(code, 2);
    expect_in(out, "/nonexistent/sshd is not an executable file");
    free(out);

    snprintf(cmd, sizeof(cmd), SSHD_PATH " -i -e -f %s/missing_config", w->dir);
    code = inetd(w, cmd, &out);
    assert_int_equal(code, 2);
    expect_in(out, "cannot read the config file");
    expect_in(out, "moongate-agent setup");
    free(out);

    /* A config sshd itself refuses: its own message, then ours. */
    snprintf(bad, sizeof(bad), "%s/bad_config", w->home);
    const char *text = "NoSuchOption yes\n";
    assert_int_equal(mg_test_write_file(bad, text, strlen(text), 0600), 0);
    snprintf(cmd, sizeof(cmd), SSHD_PATH " -i -e -f %s", bad);
    code = inetd(w, cmd, &out);
    assert_int_equal(code, 2);
    expect_in(out, "NoSuchOption");
    expect_in(out, "refused the configuration");
    free(out);
}

/* The agent once against url (extra arguments after it); its output in *out. */
static int once(const world_t *w, const char *url, const char *extra, char **out)
{
    const char *args[] = { "--gateway", url, "--once", extra, extra ? "" : NULL, NULL };
    if (extra != NULL) {
        args[3] = "--ca-file";
        args[4] = extra;
    }
    return agent(w, args, out);
}

static void test_says_why_it_cannot_connect(void **state)
{
    world_t *w = *state;
    char url[256], *out = NULL;
    uint16_t free_port = 0;
    assert_int_equal(mg_test_free_port(&free_port), 0);
    snprintf(url, sizeof(url), "ws://127.0.0.1:%u/tunnel", (unsigned)free_port);
    int code = once(w, url, NULL, &out);
    assert_int_equal(code, 1);
    expect_in(out, "connection refused: nothing listens on 127.0.0.1:");
    free(out);

    /* A plain HTTP moongate where wss:// was meant: it answers the TLS hello with a 400. */
    gw_t plain;
    gw_start_policy(&plain, "return {}\n", 0, NULL);
    snprintf(url, sizeof(url), "wss://127.0.0.1:%u/tunnel", (unsigned)plain.port);
    code = once(w, url, NULL, &out);
    gw_stop(&plain);
    expect_in(out, "answered in plain HTTP, not TLS: use ws://");
    free(out);

    /* A moongate serving TLS with a certificate for gw.test, signed by itself. */
    char crt[MG_TEST_PATH_MAX + 16], key[MG_TEST_PATH_MAX + 16];
    snprintf(crt, sizeof(crt), "%s/gw.crt", w->home);
    snprintf(key, sizeof(key), "%s/gw.key", w->home);
    char *gen[] = { "openssl", "req", "-x509", "-newkey", "ed25519", "-nodes", "-keyout", key,
                    "-out", crt, "-days", "2", "-subj", "/CN=gw.test", "-addext",
                    "subjectAltName=DNS:gw.test", NULL };
    assert_int_equal(gw_run(gen, w->home, NULL, NULL, 20000, NULL), 0);
    char ec[MG_TEST_PATH_MAX + 48], ek[MG_TEST_PATH_MAX + 48];
    snprintf(ec, sizeof(ec), "MOONGATE_TLS_CERT=%s", crt);
    snprintf(ek, sizeof(ek), "MOONGATE_TLS_KEY=%s", key);
    const char *env[] = { ec, ek, NULL };
    gw_t g;
    gw_start_policy(&g, "return {}\n", 0, env);
    snprintf(url, sizeof(url), "wss://127.0.0.1:%u/tunnel", (unsigned)g.port);
    code = once(w, url, NULL, &out);
    expect_in(out, "the gateway's TLS certificate is not trusted: self-signed certificate "
                   "(certificate /CN=gw.test, issued by /CN=gw.test; trusting the system's CAs");
    free(out);
    /* Trusted with --ca-file, but asked for by another name. */
    code = once(w, url, crt, &out);
    expect_in(out, "the gateway's TLS certificate (/CN=gw.test) is not for the name 127.0.0.1");
    free(out);
    gw_stop(&g);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_setup_prints_the_route_with_the_llm_port),
        cmocka_unit_test(test_inetd_checked_at_start),
        cmocka_unit_test(test_says_why_it_cannot_connect),
    };
    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
