/*
 * `moongate -t` as the unit's ExecStartPre and ExecReload run it: the real program against
 * real files, each broken one on its own (a missing, empty or mismatched file, an expired
 * certificate, a listen address that is not this machine's, a policy that does not load), each
 * reported on one line with what to do and exit status 1; a port in use is noted but is not a
 * problem (the running gateway holds it when a reload is checked); several problems are all
 * reported; and a policy with its own route is not asked for the default route's files.
 */
#include "gwtest.h"
#include "redis.h"

#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/x509.h>

typedef struct world {
    mg_test_sshd_t sshd;    /* for its key and known_hosts files */
    char dir[MG_TEST_PATH_MAX];
    char crt[MG_TEST_PATH_MAX + 16], key[MG_TEST_PATH_MAX + 16];
    char other_key[MG_TEST_PATH_MAX + 16];
    char expired_crt[MG_TEST_PATH_MAX + 16], expired_key[MG_TEST_PATH_MAX + 16];
} world_t;

static int openssl_req(const char *key, const char *crt)
{
    char *argv[] = { "openssl", "req", "-x509", "-newkey", "ed25519", "-nodes", "-keyout",
                     (char *)key, "-out", (char *)crt, "-days", "30", "-subj", "/CN=gw.test",
                     NULL };
    int code = -1;
    return mg_test_proc_run(argv, NULL, 20000, &code) == 0 && code == 0 ? 0 : -1;
}

/* A certificate whose last day was yesterday (openssl req cannot date one in the past). */
static int write_expired(const char *crt, const char *key)
{
    EVP_PKEY *pk = EVP_PKEY_Q_keygen(NULL, NULL, "ED25519");
    X509 *x = X509_new();
    int rc = -1;
    if (pk == NULL || x == NULL)
        goto out;
    X509_set_version(x, 2);
    ASN1_INTEGER_set(X509_get_serialNumber(x), 7);
    X509_gmtime_adj(X509_getm_notBefore(x), -3 * 86400L);
    X509_gmtime_adj(X509_getm_notAfter(x), -86400L);
    X509_NAME *name = X509_get_subject_name(x);
    X509_NAME_add_entry_by_txt(name, "CN", MBSTRING_ASC, (const unsigned char *)"old.test", -1,
                               -1, 0);
    X509_set_issuer_name(x, name);
    X509_set_pubkey(x, pk);
    if (X509_sign(x, pk, NULL) <= 0)
        goto out;
    FILE *f = fopen(crt, "w"), *g = fopen(key, "w");
    if (f != NULL && g != NULL && PEM_write_X509(f, x) == 1 &&
        PEM_write_PrivateKey(g, pk, NULL, NULL, 0, NULL, NULL) == 1)
        rc = 0;
    if (f != NULL)
        fclose(f);
    if (g != NULL)
        fclose(g);
out:
    X509_free(x);
    EVP_PKEY_free(pk);
    return rc;
}

static int group_setup(void **state)
{
    world_t *w = calloc(1, sizeof(*w));
    if (w == NULL || mg_test_sshd_start(&w->sshd, NULL) != 0 ||
        mg_test_mkdtemp(w->dir, sizeof(w->dir), "mg-check") != 0)
        return -1;
    snprintf(w->crt, sizeof(w->crt), "%s/tls.crt", w->dir);
    snprintf(w->key, sizeof(w->key), "%s/tls.key", w->dir);
    snprintf(w->other_key, sizeof(w->other_key), "%s/other.key", w->dir);
    snprintf(w->expired_crt, sizeof(w->expired_crt), "%s/old.crt", w->dir);
    snprintf(w->expired_key, sizeof(w->expired_key), "%s/old.key", w->dir);
    char other_crt[MG_TEST_PATH_MAX + 16];
    snprintf(other_crt, sizeof(other_crt), "%s/other.crt", w->dir);
    if (openssl_req(w->key, w->crt) != 0 || openssl_req(w->other_key, other_crt) != 0 ||
        write_expired(w->expired_crt, w->expired_key) != 0)
        return -1;
    *state = w;
    return 0;
}

static int group_teardown(void **state)
{
    world_t *w = *state;
    mg_test_sshd_stop(&w->sshd);
    free(w);
    mg_test_cleanup_all();
    return 0;
}

/* `moongate -t ARGS` with the environment vars (NAME=value, NULL-ended) over a clean one:
   the default route's files are the test sshd's, TLS is off; run under prefix (an argv,
   NULL-ended, e.g. unshare ...) when it is not NULL. Returns the exit status. */
static int check_under(const world_t *w, const char *const *prefix, const char *const *args,
                       const char *const *vars, char **out)
{
    char kvar[MG_TEST_PATH_MAX + 32], khvar[MG_TEST_PATH_MAX + 32];
    snprintf(kvar, sizeof(kvar), "MOONGATE_SSH_KEY=%s", w->sshd.client_key);
    snprintf(khvar, sizeof(khvar), "MOONGATE_KNOWN_HOSTS=%s", w->sshd.known_hosts);
    const char *base[] = { kvar, khvar, "MOONGATE_TLS_CERT=", "MOONGATE_TLS_KEY=",
                           "MOONGATE_LISTEN=127.0.0.1:0" };
    const char *env[32];
    size_t n = 0;
    for (const char *const *v = vars; v != NULL && *v != NULL && n < 24; v++)
        env[n++] = *v;
    for (size_t i = 0; i < sizeof(base) / sizeof(base[0]); i++) {
        bool given = false;
        size_t k = strcspn(base[i], "=") + 1;
        for (const char *const *v = vars; v != NULL && *v != NULL; v++)
            given = given || strncmp(*v, base[i], k) == 0;
        if (!given)
            env[n++] = base[i];
    }
    env[n] = NULL;
    static char *envp[1024];
    gw_env_merge(envp, sizeof(envp) / sizeof(envp[0]), env);
    char bin[MG_TEST_PATH_MAX];
    char *argv[32];
    int k = 0;
    for (const char *const *p = prefix; p != NULL && *p != NULL && k < 12; p++)
        argv[k++] = (char *)*p;
    argv[k++] = (char *)gw_binary(bin, sizeof(bin));
    argv[k++] = "-t";
    for (const char *const *a = args; a != NULL && *a != NULL && k < 31; a++)
        argv[k++] = (char *)*a;
    argv[k] = NULL;
    return gw_run(argv, w->dir, "/", envp, 20000, out);
}

static int check(const world_t *w, const char *const *args, const char *const *vars, char **out)
{
    return check_under(w, NULL, args, vars, out);
}

/* This machine has ::1 on its loopback (then a resolver gives it first for a name with both). */
static bool has_ipv6_loopback(void)
{
    char *text = NULL;
    if (mg_test_read_file("/proc/net/if_inet6", &text, NULL) != 0)
        return false;
    bool yes = strstr(text, "00000000000000000000000000000001") != NULL;
    free(text);
    return yes;
}

static void expect(int code, int want, const char *out, const char *needle)
{
    if (code != want || strstr(out, needle) == NULL)
        fail_msg("exit %d (wanted %d), wanted \"%s\" in:\n%s", code, want, needle, out);
}

static void test_all_good(void **state)
{
    world_t *w = *state;
    char cv[MG_TEST_PATH_MAX + 48], kv[MG_TEST_PATH_MAX + 48], *out = NULL;
    snprintf(cv, sizeof(cv), "MOONGATE_TLS_CERT=%s", w->crt);
    snprintf(kv, sizeof(kv), "MOONGATE_TLS_KEY=%s", w->key);
    const char *vars[] = { cv, kv, NULL };
    int code = check(w, NULL, vars, &out);
    print_message("%s", out);
    expect(code, 0, out, "moongate: ready to start\n");
    expect(code, 0, out, "listen address 127.0.0.1:0 can be bound");
    expect(code, 0, out, "CN=gw.test");
    if (strstr(out, " 29 days left") == NULL && strstr(out, " 30 days left") == NULL)
        fail_msg("no days left in:\n%s", out);
    expect(code, 0, out, "policy (built-in) is valid (Lua library: ");
    expect(code, 0, out, "the default route's SSH key");
    assert_null(strstr(out, "problem"));
    free(out);
}

typedef struct broken {
    const char *what;
    const char *vars[4];
    const char *args[4];
    const char *needle;
} broken_t;

static void test_each_broken_file(void **state)
{
    world_t *w = *state;
    char empty[MG_TEST_PATH_MAX + 16], junk[MG_TEST_PATH_MAX + 16], bad_policy[MG_TEST_PATH_MAX + 16];
    snprintf(empty, sizeof(empty), "%s/empty", w->dir);
    snprintf(junk, sizeof(junk), "%s/junk.pem", w->dir);
    snprintf(bad_policy, sizeof(bad_policy), "%s/bad.lua", w->dir);
    assert_int_equal(mg_test_write_file(empty, "", 0, 0600), 0);
    assert_int_equal(mg_test_write_file(junk, "not a certificate\n", 18, 0600), 0);
    const char *lua = "return {\n  route = function( end,\n}\n";
    assert_int_equal(mg_test_write_file(bad_policy, lua, strlen(lua), 0600), 0);

    char v[8][MG_TEST_PATH_MAX + 48];
    snprintf(v[0], sizeof(v[0]), "MOONGATE_TLS_CERT=%s", w->crt);
    snprintf(v[1], sizeof(v[1]), "MOONGATE_TLS_KEY=%s", w->key);
    snprintf(v[2], sizeof(v[2]), "MOONGATE_TLS_KEY=%s", w->other_key);
    snprintf(v[3], sizeof(v[3]), "MOONGATE_TLS_CERT=%s", w->expired_crt);
    snprintf(v[4], sizeof(v[4]), "MOONGATE_TLS_KEY=%s", w->expired_key);
    snprintf(v[5], sizeof(v[5]), "MOONGATE_TLS_CERT=%s", junk);
    snprintf(v[6], sizeof(v[6]), "MOONGATE_KNOWN_HOSTS=%s", empty);
    const broken_t cases[] = {
        { "no SSH key", { "MOONGATE_SSH_KEY=/nonexistent/id_ed25519" }, { NULL },
          "problem: SSH key /nonexistent/id_ed25519: No such file or directory "
          "(MOONGATE_SSH_KEY); make one with ssh-keygen" },
        { "an empty known_hosts", { v[6] }, { NULL }, "is empty (MOONGATE_KNOWN_HOSTS)" },
        { "no TLS certificate", { "MOONGATE_TLS_CERT=/nonexistent/tls.crt", v[1] }, { NULL },
          "problem: TLS certificate /nonexistent/tls.crt: No such file or directory" },
        { "not a certificate", { v[5], v[1] }, { NULL }, "cannot be loaded" },
        { "a key of another certificate", { v[0], v[2] }, { NULL }, "does not match" },
        { "an expired certificate", { v[3], v[4] }, { NULL }, "expired" },
        { "a listen address of another machine", { NULL }, { "-l", "192.0.2.1:8080" },
          "problem: listen address 192.0.2.1:8080: not an address of this machine" },
        { "a listen address that is no address", { "MOONGATE_LISTEN=nowhere" }, { NULL },
          "MOONGATE_LISTEN" },
        { "a policy that does not load", { NULL }, { "-c", bad_policy }, "bad.lua:2:" },
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        char *out = NULL;
        int code = check(w, cases[i].args, cases[i].vars, &out);
        print_message("%-38s -> %.*s\n", cases[i].what, (int)strcspn(strstr(out, "problem")
                      ? strstr(out, "problem") : out, "\n"), strstr(out, "problem")
                      ? strstr(out, "problem") : out);
        expect(code, 1, out, cases[i].needle);
        expect(code, 1, out, "moongate: 1 problem: not ready to start\n");
        free(out);
    }
}

static void test_port_in_use_is_not_a_problem(void **state)
{
    world_t *w = *state;
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = { .sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
    socklen_t len = sizeof(a);
    assert_int_equal(bind(fd, (struct sockaddr *)&a, sizeof(a)), 0);
    assert_int_equal(listen(fd, 1), 0);
    assert_int_equal(getsockname(fd, (struct sockaddr *)&a, &len), 0);
    char addr[64], *out = NULL;
    snprintf(addr, sizeof(addr), "127.0.0.1:%u", (unsigned)ntohs(a.sin_port));
    const char *args[] = { "-l", addr, NULL };
    int code = check(w, args, NULL, &out);
    close(fd);
    expect(code, 0, out, "is in use (by the running moongate, if this checks a reload");
    free(out);
}

static void test_every_problem_is_reported(void **state)
{
    world_t *w = *state;
    const char *vars[] = { "MOONGATE_SSH_KEY=/nonexistent/key",
                           "MOONGATE_KNOWN_HOSTS=/nonexistent/known_hosts",
                           "MOONGATE_TLS_CERT=/nonexistent/crt", "MOONGATE_TLS_KEY=/nonexistent/key",
                           NULL };
    const char *args[] = { "-l", "192.0.2.1:8080", NULL };
    char *out = NULL;
    int code = check(w, args, vars, &out);
    expect(code, 1, out, "moongate: 4 problems: not ready to start\n");
    expect(code, 1, out, "192.0.2.1:8080");
    expect(code, 1, out, "/nonexistent/crt");
    expect(code, 1, out, "/nonexistent/key");
    expect(code, 1, out, "/nonexistent/known_hosts");
    free(out);
}

static void test_own_route_needs_no_default_files(void **state)
{
    world_t *w = *state;
    char policy[MG_TEST_PATH_MAX + 16], *out = NULL;
    snprintf(policy, sizeof(policy), "%s/own.lua", w->dir);
    const char *lua = "return {\n"
                      "  authenticate = function(req) return 'alice' end,\n"
                      "  route = function(req, user) return { host = '127.0.0.1', port = 22,\n"
                      "    ssh_user = 'u', key = '/k', known_hosts = '/kh' } end,\n"
                      "}\n";
    assert_int_equal(mg_test_write_file(policy, lua, strlen(lua), 0600), 0);
    const char *vars[] = { "MOONGATE_SSH_KEY=/nonexistent/key", NULL };
    const char *args[] = { "-c", policy, NULL };
    int code = check(w, args, vars, &out);
    expect(code, 0, out, "ready to start");
    assert_null(strstr(out, "SSH key"));
    free(out);

    /* One that builds on moongate.default's route is asked for them. */
    lua = "local default = require 'moongate.default'\n"
          "local route = default.route_with{ target_port = 8081 }\n"
          "return { route = function(req, user) return route end }\n";
    assert_int_equal(mg_test_write_file(policy, lua, strlen(lua), 0600), 0);
    code = check(w, args, vars, &out);
    expect(code, 1, out, "SSH key /nonexistent/key");
    free(out);
}

/* With MOONGATE_REDIS_URL: a Redis that answers is reported with its time; one that does not
   is a warning (a node must start while Redis is down); a URL or TLS file that cannot work is a
   problem. */
static void test_redis(void **state)
{
    world_t *w = *state;
    mg_test_redis_t redis;
    assert_int_equal(mg_test_redis_start(&redis, "pw"), 0);
    char url[128], wrong[128], refused[128], *out = NULL;
    snprintf(url, sizeof(url), "MOONGATE_REDIS_URL=redis://:pw@127.0.0.1:%u/3",
             (unsigned)redis.port);
    snprintf(wrong, sizeof(wrong), "MOONGATE_REDIS_URL=redis://:nope@127.0.0.1:%u",
             (unsigned)redis.port);
    uint16_t free_port;
    assert_int_equal(mg_test_free_port(&free_port), 0);
    snprintf(refused, sizeof(refused), "MOONGATE_REDIS_URL=redis://127.0.0.1:%u",
             (unsigned)free_port);

    const char *good_vars[] = { url, NULL };
    int code = check(w, NULL, good_vars, &out);
    expect(code, 0, out, "moongate: redis redis://127.0.0.1:");
    expect(code, 0, out, "/3 answered in ");
    expect(code, 0, out, "moongate: ready to start\n");
    assert_null(strstr(out, "pw@")); /* the password is never shown */
    free(out);

    const char *wrong_vars[] = { wrong, NULL };
    code = check(w, NULL, wrong_vars, &out);
    expect(code, 0, out, "moongate: warning: redis redis://127.0.0.1:");
    expect(code, 0, out, "WRONGPASS");
    expect(code, 0, out, "the gateway starts anyway");
    expect(code, 0, out, "moongate: ready to start\n");
    assert_null(strstr(out, "nope"));
    free(out);

    const char *refused_vars[] = { refused, NULL };
    code = check(w, NULL, refused_vars, &out);
    expect(code, 0, out, "connection refused; the gateway starts anyway");
    free(out);

    /* TLS where there is none, and none where there is. */
    char tls_on_plain[128];
    snprintf(tls_on_plain, sizeof(tls_on_plain), "MOONGATE_REDIS_URL=rediss://:pw@127.0.0.1:%u",
             (unsigned)redis.port);
    const char *tp_vars[] = { tls_on_plain, NULL };
    code = check(w, NULL, tp_vars, &out);
    expect(code, 0, out, "no TLS handshake within 1 s: is it a plain redis:// port?");
    free(out);
    mg_test_redis_t tls;
    assert_int_equal(mg_test_redis_start_tls(&tls, NULL, true), 0);
    char tv[4][MG_TEST_PATH_MAX + 64];
    snprintf(tv[0], sizeof(tv[0]), "MOONGATE_REDIS_URL=redis://127.0.0.1:%u", (unsigned)tls.port);
    const char *pt_vars[] = { tv[0], NULL };
    code = check(w, NULL, pt_vars, &out);
    expect(code, 0, out, "before it answered: is it a TLS port (rediss://)?");
    free(out);
    snprintf(tv[0], sizeof(tv[0]), "MOONGATE_REDIS_URL=rediss://127.0.0.1:%u", (unsigned)tls.port);
    snprintf(tv[1], sizeof(tv[1]), "MOONGATE_REDIS_CA=%s", tls.ca);
    snprintf(tv[2], sizeof(tv[2]), "MOONGATE_REDIS_CERT=%s", tls.client_cert);
    snprintf(tv[3], sizeof(tv[3]), "MOONGATE_REDIS_KEY=%s", tls.client_key);
    const char *tls_vars[] = { tv[0], tv[1], tv[2], tv[3], NULL };
    code = check(w, NULL, tls_vars, &out);
    expect(code, 0, out, "moongate: redis rediss://127.0.0.1:");
    expect(code, 0, out, "/0 answered in ");
    assert_null(strstr(out, "warning"));
    free(out);
    mg_test_redis_stop(&tls);

    const char *bad_vars[] = { "MOONGATE_REDIS_URL=rediss://127.0.0.1",
                               "MOONGATE_REDIS_CA=/nonexistent/ca.pem", NULL };
    code = check(w, NULL, bad_vars, &out);
    expect(code, 1, out, "problem: MOONGATE_REDIS_CA: ");
    free(out);
    const char *url_vars[] = { "MOONGATE_REDIS_URL=http://127.0.0.1", NULL };
    code = check(w, NULL, url_vars, &out);
    expect(code, 1, out, "problem: MOONGATE_REDIS_URL: must start with redis://");
    free(out);
    mg_test_redis_stop(&redis);
}

/* A name whose first address refuses (::1, where Redis listens on 127.0.0.1 only, as
   localhost often is): the next address is tried. The name is in a private /etc/hosts, bound
   over the machine's in moongate's own mount namespace. */
static void test_redis_name_with_two_addresses(void **state)
{
    world_t *w = *state;
    if (geteuid() != 0 || gw_sh(w->dir, "unshare -m true", 5000, NULL) != 0 ||
        access("/etc/nsswitch.conf", F_OK) != 0) {
        print_message("skipped: needs root and unshare -m to mount a private /etc/hosts\n");
        skip();
    }
    mg_test_redis_t redis;
    assert_int_equal(mg_test_redis_start(&redis, NULL), 0);
    char hosts[MG_TEST_PATH_MAX + 16], nss[MG_TEST_PATH_MAX + 16];
    snprintf(hosts, sizeof(hosts), "%s/hosts", w->dir);
    snprintf(nss, sizeof(nss), "%s/nsswitch.conf", w->dir);
    static const char h[] = "127.0.0.1 localhost\n::1 redis.test\n127.0.0.1 redis.test\n";
    assert_int_equal(mg_test_write_file(hosts, h, strlen(h), 0644), 0);
    assert_int_equal(mg_test_write_file(nss, "hosts: files\n", 13, 0644), 0);
    char mount[3 * MG_TEST_PATH_MAX], url[96];
    snprintf(mount, sizeof(mount), "mount --bind '%s' /etc/hosts && "
             "mount --bind '%s' /etc/nsswitch.conf && exec \"$@\"", hosts, nss);
    snprintf(url, sizeof(url), "MOONGATE_REDIS_URL=redis://redis.test:%u", (unsigned)redis.port);
    const char *prefix[] = { "unshare", "-m", "--", "sh", "-c", mount, "sh", NULL };
    const char *vars[] = { url, NULL };
    char *out = NULL;
    int code = check_under(w, prefix, NULL, vars, &out);
    expect(code, 0, out, "moongate: redis redis://redis.test:");
    expect(code, 0, out, "(at 127.0.0.1");
    /* Where the machine has ::1, the resolver gives it first, and it was tried first. */
    if (has_ipv6_loopback())
        expect(code, 0, out, "(at 127.0.0.1, after 1 other address)");
    else
        print_message("no ::1 here: the name's first address was 127.0.0.1\n");
    free(out);
    mg_test_redis_stop(&redis);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_all_good),
        cmocka_unit_test(test_each_broken_file),
        cmocka_unit_test(test_port_in_use_is_not_a_problem),
        cmocka_unit_test(test_every_problem_is_reported),
        cmocka_unit_test(test_own_route_needs_no_default_files),
        cmocka_unit_test(test_redis),
        cmocka_unit_test(test_redis_name_with_two_addresses),
    };
    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
