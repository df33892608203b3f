/*
 * The Debian package, as an operator gets it: scripts/build-deb.sh builds it from this tree,
 * dpkg installs it on this machine, and then
 *   - its dependencies come from the shared libraries, the moongate user exists, the unit is
 *     enabled (not started), /etc/moongate holds the two conffiles, the environment file
 *     readable by root and the moongate group only;
 *   - `moongate -t` and a real request (to a real sshd and mg-upstream) run through the
 *     installed /usr/bin/moongate as the moongate user, configured the way the unit is (the
 *     policy in /etc/moongate, the settings from its environment file), with the source and
 *     build trees hidden by an empty mount over them (unshare -m);
 *   - `dpkg --purge` leaves no file of it behind.
 * It changes the machine, so it runs only as root with dpkg and cpack, and never where a
 * moongate package is already installed.
 */
#include "gwtest.h"

#include <grp.h>
#include <pwd.h>
#include <sys/stat.h>

#define DEB_PATH_MAX (MG_TEST_PATH_MAX + 64)

typedef struct world {
    mg_test_sshd_t sshd;
    mg_test_upstream_t up;
    char dir[MG_TEST_PATH_MAX];
    char deb[DEB_PATH_MAX];
    bool installed;     /* by this test: purged at the end whatever happens */
    bool can_hide;      /* unshare -m works here */
} world_t;

static int run(const world_t *w, char *const argv[], int timeout_ms, char **out)
{
    return gw_run(argv, w->dir, "/", NULL, timeout_ms, out);
}

static int sh(const world_t *w, const char *script, char **out)
{
    return gw_sh(w->dir, script, 60000, out);
}

static bool package_installed(const world_t *w)
{
    char *out = NULL;
    int code = sh(w, "dpkg-query -W -f='${Status}' moongate 2>/dev/null", &out);
    bool yes = code == 0 && strstr(out, "install ok installed") != NULL;
    free(out);
    return yes;
}

static int group_setup(void **state)
{
    world_t *w = calloc(1, sizeof(*w));
    if (w == NULL || mg_test_mkdtemp(w->dir, sizeof(w->dir), "mg-package") != 0)
        return -1;
    *state = w;
    return 0;
}

static int group_teardown(void **state)
{
    world_t *w = *state;
    if (w->installed) {
        char *argv[] = { "dpkg", "--purge", "moongate", NULL };
        mg_test_proc_run(argv, NULL, 60000, NULL);
    }
    mg_test_upstream_stop(&w->up);
    mg_test_sshd_stop(&w->sshd);
    free(w);
    mg_test_cleanup_all();
    return 0;
}

static void skip_unless_possible(world_t *w)
{
    if (geteuid() != 0 || access("/usr/bin/dpkg", X_OK) != 0 ||
        access("/usr/bin/cpack", X_OK) != 0) {
        print_message("skipped: installing a package needs root, dpkg and cpack\n");
        skip();
    }
    if (!w->installed && package_installed(w)) {
        print_message("skipped: a moongate package is installed here; this test would replace "
                      "it\n");
        skip();
    }
}

static void expect_in(const char *text, const char *needle, const char *what)
{
    if (strstr(text, needle) == NULL)
        fail_msg("%s: wanted \"%s\" in:\n%s", what, needle, text);
}

static void test_build_and_install(void **state)
{
    world_t *w = *state;
    skip_unless_possible(w);

    char cmd[4 * MG_TEST_PATH_MAX], *out = NULL;
    snprintf(cmd, sizeof(cmd), "BUILD_DIR='%s/build' '%s/scripts/build-deb.sh' '%s'", w->dir,
             MG_SOURCE_DIR, w->dir);
    char *argv[] = { "sh", "-c", cmd, NULL };
    int code = run(w, argv, 600000, &out);
    if (code != 0)
        fail_msg("build-deb.sh exited %d:\n%s", code, out);
    char *last = strrchr(out, '/');
    assert_non_null(last);
    while (last > out && last[-1] != '\n')
        last--;
    last[strcspn(last, "\n")] = '\0';
    snprintf(w->deb, sizeof(w->deb), "%s", last);
    free(out);
    assert_int_equal(access(w->deb, R_OK), 0);

    /* What the package says it needs: the libraries the programs link, found by dpkg-shlibdeps. */
    snprintf(cmd, sizeof(cmd), "dpkg-deb -f '%s' Depends", w->deb);
    assert_int_equal(sh(w, cmd, &out), 0);
    static const char *const needs[] = { "adduser", "libssh2-1", "libuv1", "libssl3",
                                         "libwebsockets", "libjansson4", "libhttp-parser",
                                         "luajit" };
    for (size_t i = 0; i < sizeof(needs) / sizeof(needs[0]); i++)
        expect_in(out, needs[i], "Depends");
    free(out);

    snprintf(cmd, sizeof(cmd), "dpkg -i '%s'", w->deb);
    w->installed = true;
    code = sh(w, cmd, &out);
    if (code != 0)
        fail_msg("dpkg -i exited %d:\n%s", code, out);
    free(out);

    /* The user, and the environment file only it and root can read. */
    struct passwd *pw = getpwnam("moongate");
    assert_non_null(pw);
    assert_true(pw->pw_uid < 1000);
    struct group *gr = getgrnam("moongate");
    assert_non_null(gr);
    struct stat st;
    assert_int_equal(stat("/etc/moongate/moongate.env", &st), 0);
    assert_int_equal(st.st_mode & 0777, 0640);
    assert_int_equal(st.st_uid, 0);
    assert_int_equal(st.st_gid, gr->gr_gid);
    assert_int_equal(stat("/etc/moongate/policy.lua", &st), 0);

    assert_int_equal(sh(w, "dpkg-query -W -f='${Conffiles}' moongate", &out), 0);
    expect_in(out, "/etc/moongate/policy.lua", "conffiles");
    expect_in(out, "/etc/moongate/moongate.env", "conffiles");
    free(out);

    /* Enabled: started at the next boot, not by the install. */
    char link[256];
    ssize_t n = readlink("/etc/systemd/system/multi-user.target.wants/moongate.service", link,
                         sizeof(link) - 1);
    assert_true(n > 0);
    link[n] = '\0';
    expect_in(link, "/systemd/system/moongate.service", "the enable link");
    assert_int_equal(access("/usr/lib/systemd/system/moongate.service", R_OK), 0);
    assert_int_equal(access("/usr/lib/systemd/user/moongate-agent.service", R_OK), 0);
    assert_int_equal(sh(w, "grep -x 'ExecStart=/usr/bin/moongate -c /etc/moongate/policy.lua' "
                           "/usr/lib/systemd/system/moongate.service", NULL), 0);
    assert_int_equal(access("/usr/share/man/man8/moongate.8", R_OK), 0);
    assert_int_equal(access("/usr/share/man/man1/moongate-agent.1", R_OK), 0);
}

/* The words that run a program as the moongate user with the trees it was built from hidden. */
static const char *const *hidden_as_moongate(world_t *w, char *script, size_t cap)
{
    static const char *words[8];
    int n = 0;
    if (w->can_hide) {
        /* The build tree may sit inside the source tree: hide it first. */
        snprintf(script, cap,
                 "mount -t tmpfs -o ro none '%s' && "
                 "{ [ ! -d '%s' ] || mount -t tmpfs -o ro none '%s'; } && "
                 "exec setpriv --reuid=moongate --regid=moongate --clear-groups \"$@\"",
                 MG_BINARY_DIR, MG_SOURCE_DIR, MG_SOURCE_DIR);
        words[n++] = "unshare";
        words[n++] = "-m";
        words[n++] = "--";
    } else {
        snprintf(script, cap, "exec setpriv --reuid=moongate --regid=moongate --clear-groups "
                              "\"$@\"");
    }
    words[n++] = "sh";
    words[n++] = "-c";
    words[n++] = script;
    words[n++] = "sh";
    words[n] = NULL;
    return words;
}

/* The operator's part: the key and known_hosts the policy names, the settings in the
   environment file. Returns the settings as NAME=value strings (static). */
static const char *const *configure(world_t *w)
{
    char cmd[6 * MG_TEST_PATH_MAX];
    snprintf(cmd, sizeof(cmd),
             "install -m 0640 -g moongate '%s' /etc/moongate/id_ed25519 && "
             "install -m 0640 -g moongate '%s' /etc/moongate/known_hosts && "
             "printf '%%s\\n' 'MOONGATE_TOKENS=alice:alice-package-token' "
             "'MOONGATE_SSH_HOST=127.0.0.1' 'MOONGATE_SSH_PORT=%u' 'MOONGATE_SSH_USER=%s' "
             "'MOONGATE_TARGET_PORT=%u' >> /etc/moongate/moongate.env",
             w->sshd.client_key, w->sshd.known_hosts, (unsigned)w->sshd.port, w->sshd.user,
             (unsigned)w->up.port);
    assert_int_equal(sh(w, cmd, NULL), 0);

    /* Read it as systemd's EnvironmentFile= does: NAME=value lines, # comments. */
    static char lines[64][512];
    static const char *env[65];
    char *text = NULL;
    assert_int_equal(mg_test_read_file("/etc/moongate/moongate.env", &text, NULL), 0);
    int n = 0;
    for (char *line = strtok(text, "\n"); line != NULL && n < 64; line = strtok(NULL, "\n")) {
        line += strspn(line, " \t");
        if (*line == '#' || strchr(line, '=') == NULL)
            continue;
        snprintf(lines[n], sizeof(lines[n]), "%s", line);
        env[n] = lines[n];
        n++;
    }
    env[n] = NULL;
    free(text);
    assert_true(n >= 5);
    return env;
}

static void test_check_and_request_through_the_package(void **state)
{
    world_t *w = *state;
    skip_unless_possible(w);
    if (!package_installed(w))
        fail_msg("not installed (see the test before)");
    assert_int_equal(mg_test_sshd_start(&w->sshd, NULL), 0);
    assert_int_equal(mg_test_upstream_start(&w->up), 0);
    w->can_hide = sh(w, "unshare -m true", NULL) == 0;
    if (!w->can_hide)
        print_message("unshare -m is not allowed here: the trees stay visible\n");
    const char *const *env = configure(w);

    /* moongate -t, as ExecStartPre runs it. */
    char script[4 * MG_TEST_PATH_MAX];
    const char *const *pre = hidden_as_moongate(w, script, sizeof(script));
    char *argv[16];
    int n = 0;
    for (; pre[n] != NULL; n++)
        argv[n] = (char *)pre[n];
    const char *check[] = { "/usr/bin/moongate", "-t", "-c", "/etc/moongate/policy.lua", NULL };
    for (int i = 0; check[i] != NULL; i++)
        argv[n++] = (char *)check[i];
    argv[n] = NULL;
    char *out = NULL;
    int code = run(w, argv, 30000, &out);
    if (code != 0 || strstr(out, "(Lua library: /usr/bin/../share/moongate/lua)") == NULL)
        fail_msg("moongate -t exited %d:\n%s", code, out);
    free(out);

    /* The service's own command, as its user, with its settings. */
    gw_t g;
    gw_prepare(&g);
    snprintf(g.policy, sizeof(g.policy), "/etc/moongate/policy.lua");
    g.program = "/usr/bin/moongate";
    g.exec_prefix = pre;
    gw_launch(&g, "127.0.0.1:0", env);
    char status[64], exe[256] = "";
    snprintf(status, sizeof(status), "/proc/%d/exe", (int)g.proc.pid);
    ssize_t len = readlink(status, exe, sizeof(exe) - 1);
    exe[len > 0 ? len : 0] = '\0';
    assert_string_equal(exe, "/usr/bin/moongate");
    struct stat st;
    snprintf(status, sizeof(status), "/proc/%d", (int)g.proc.pid);
    assert_int_equal(stat(status, &st), 0);
    assert_int_equal(st.st_uid, getpwnam("moongate")->pw_uid);

    mg_test_http_response_t r;
    code = gw_request(&g, "GET", "/hello", "Authorization: Bearer alice-package-token\r\n", NULL,
                      0, &r, 10000);
    gw_expect_status(&g, code, &r, 200, "through the package's moongate");
    assert_string_equal(r.body, "hello\n");
    mg_test_http_response_free(&r);
    code = gw_request(&g, "GET", "/hello", NULL, NULL, 0, &r, 10000);
    gw_expect_status(&g, code, &r, 401, "without a token");
    mg_test_http_response_free(&r);
    gw_stop(&g);
}

static void test_purge_leaves_nothing(void **state)
{
    world_t *w = *state;
    skip_unless_possible(w);
    char *out = NULL;
    int code = sh(w, "dpkg --purge moongate", &out);
    if (code != 0)
        fail_msg("dpkg --purge exited %d:\n%s", code, out);
    free(out);
    w->installed = false;
    assert_false(package_installed(w));
    static const char *const gone[] = {
        "/usr/bin/moongate", "/usr/bin/moongate-agent", "/usr/share/moongate",
        "/etc/moongate", "/usr/lib/systemd/system/moongate.service",
        "/usr/lib/systemd/user/moongate-agent.service", "/usr/share/man/man8/moongate.8",
        "/etc/systemd/system/multi-user.target.wants/moongate.service",
    };
    for (size_t i = 0; i < sizeof(gone) / sizeof(gone[0]); i++) {
        struct stat st;
        if (lstat(gone[i], &st) == 0)
            fail_msg("left behind: %s", gone[i]);
    }
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_build_and_install),
        cmocka_unit_test(test_check_and_request_through_the_package),
        cmocka_unit_test(test_purge_leaves_nothing),
    };
    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
