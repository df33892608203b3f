/*
 * Tests for src/agent/agent_util.c: moongate-agent's reconnect schedule (with an injected random
 * source), the gateway URL and HOST:PORT parsing, the --sshd-inetd split, control messages,
 * the command lines of the agent and of `setup`, and the key helpers.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "agent/agent_util.h"
#include "moongate/error.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* A random source that returns the values it is given, in turn. */
typedef struct seq {
    const uint32_t *v;
    size_t n, i;
} seq_t;

static uint32_t seq_next(void *ctx)
{
    seq_t *s = ctx;
    uint32_t v = s->v[s->i % s->n];
    s->i++;
    return v;
}

static uint32_t always_zero(void *ctx)
{
    return 0;
}

static uint32_t always_max(void *ctx)
{
    return UINT32_MAX;
}

static void test_backoff_low_end_doubles_to_cap(void **state)
{
    mg_agent_backoff_t b;
    mg_agent_backoff_init(&b, 1000, 60000, always_zero, NULL);
    /* rand 0 gives the lowest wait, half the step. */
    static const uint32_t want[] = { 500, 1000, 2000, 4000, 8000, 16000, 30000, 30000 };
    for (size_t i = 0; i < sizeof(want) / sizeof(want[0]); i++)
        assert_int_equal(mg_agent_backoff_next(&b), want[i]);
}

static void test_backoff_high_end(void **state)
{
    mg_agent_backoff_t b;
    mg_agent_backoff_init(&b, 1000, 60000, always_max, NULL);
    /* UINT32_MAX % (span) lands somewhere in range; the range is what matters. */
    uint32_t step = 1000;
    for (int i = 0; i < 20; i++) {
        uint32_t w = mg_agent_backoff_next(&b);
        assert_true(w >= step / 2 && w <= step);
        step = step * 2 > 60000 ? 60000 : step * 2;
    }
}

static void test_backoff_exact_values(void **state)
{
    /* span for step 1000 is 501: 500 + v % 501. */
    static const uint32_t vals[] = { 500, 501, 1001 };
    seq_t s = { vals, 3, 0 };
    mg_agent_backoff_t b;
    mg_agent_backoff_init(&b, 1000, 60000, seq_next, &s);
    assert_int_equal(mg_agent_backoff_next(&b), 1000);          /* 500 + 500 */
    assert_int_equal(mg_agent_backoff_next(&b), 1000 + 501 % 1001); /* step 2000: span 1001 */
    assert_int_equal(mg_agent_backoff_next(&b), 2000 + 1001 % 2001);
}

static void test_backoff_every_wait_in_range(void **state)
{
    srand(7);
    mg_agent_backoff_t b;
    static uint32_t vals[4096];
    for (size_t i = 0; i < 4096; i++)
        vals[i] = (uint32_t)rand() * 2654435761u;
    seq_t s = { vals, 4096, 0 };
    mg_agent_backoff_init(&b, MG_AGENT_BACKOFF_BASE_MS, MG_AGENT_BACKOFF_MAX_MS, seq_next, &s);
    for (int round = 0; round < 50; round++) {
        uint32_t step = 1000;
        for (int i = 0; i < 12; i++) {
            uint32_t w = mg_agent_backoff_next(&b);
            assert_true(w >= step / 2);
            assert_true(w <= step);
            assert_true(w <= 60000);
            step = step * 2 > 60000 ? 60000 : step * 2;
        }
        mg_agent_backoff_reset(&b);
    }
}

static void test_backoff_reset_and_max(void **state)
{
    mg_agent_backoff_t b;
    mg_agent_backoff_init(&b, 1000, 60000, always_zero, NULL);
    mg_agent_backoff_next(&b);
    mg_agent_backoff_next(&b);
    mg_agent_backoff_next(&b);
    mg_agent_backoff_reset(&b);
    assert_int_equal(mg_agent_backoff_next(&b), 500);
    /* A refused token waits the whole maximum, and stays at the top after. */
    assert_int_equal(mg_agent_backoff_next_max(&b), 60000);
    assert_int_equal(mg_agent_backoff_next(&b), 30000);
    mg_agent_backoff_reset(&b);
    assert_int_equal(mg_agent_backoff_next(&b), 500);
}

static void test_url_parse(void **state)
{
    mg_agent_url_t u;
    char err[256];
    assert_int_equal(mg_agent_url_parse("ws://gw.example.com:8080/tunnel", &u, err,
                                        sizeof(err)), 0);
    assert_false(u.tls);
    assert_string_equal(u.host, "gw.example.com");
    assert_int_equal(u.port, 8080);
    assert_string_equal(u.path, "/tunnel");
    assert_string_equal(u.host_header, "gw.example.com:8080");

    assert_int_equal(mg_agent_url_parse("wss://gw.example.com/tunnel", &u, err, sizeof(err)), 0);
    assert_true(u.tls);
    assert_int_equal(u.port, 443);
    assert_string_equal(u.host_header, "gw.example.com");

    assert_int_equal(mg_agent_url_parse("WSS://gw.example.com", &u, err, sizeof(err)), 0);
    assert_string_equal(u.path, "/tunnel");

    assert_int_equal(mg_agent_url_parse("ws://127.0.0.1:9/a/b?x=1", &u, err, sizeof(err)), 0);
    assert_string_equal(u.host, "127.0.0.1");
    assert_string_equal(u.path, "/a/b?x=1");
    assert_int_equal(u.port, 9);

    assert_int_equal(mg_agent_url_parse("ws://[::1]:8080/tunnel", &u, err, sizeof(err)), 0);
    assert_string_equal(u.host, "::1");
    assert_string_equal(u.host_header, "[::1]:8080");
    assert_int_equal(mg_agent_url_parse("ws://[::1]/t", &u, err, sizeof(err)), 0);
    assert_string_equal(u.host_header, "[::1]");
    assert_int_equal(u.port, 80);

    static const char *const bad[] = {
        "http://gw/tunnel", "ws//gw", "ws://", "ws://:80/t", "ws://gw:0/t", "ws://gw:65536/t",
        "ws://gw:80x/t", "ws://gw:/t", "ws://user:pw@gw/t", "ws://gw/t#frag", "ws://gw/t x",
        "ws://g w/t", "ws://[::1/t", "ws://[zz]/t", "ws://gw?x", "ws://gw/t\n", "",
        "ws://gw:123456/t",
    };
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        err[0] = '\0';
        if (mg_agent_url_parse(bad[i], &u, err, sizeof(err)) != MG_EINVAL)
            fail_msg("accepted \"%s\"", bad[i]);
        assert_true(err[0] != '\0');
    }
}

static void test_hostport(void **state)
{
    char host[64];
    int port = 0;
    assert_int_equal(mg_agent_hostport_parse("127.0.0.1:22", host, sizeof(host), &port), 0);
    assert_string_equal(host, "127.0.0.1");
    assert_int_equal(port, 22);
    assert_int_equal(mg_agent_hostport_parse("localhost:2222", host, sizeof(host), &port), 0);
    assert_string_equal(host, "localhost");
    assert_int_equal(mg_agent_hostport_parse("[::1]:22", host, sizeof(host), &port), 0);
    assert_string_equal(host, "::1");
    static const char *const bad[] = { "127.0.0.1", "127.0.0.1:", ":22", "h:0", "h:70000",
                                       "h:2 2", "[::1]", "a/b:22", "" };
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++)
        if (mg_agent_hostport_parse(bad[i], host, sizeof(host), &port) != MG_EINVAL)
            fail_msg("accepted \"%s\"", bad[i]);
    char tiny[4];
    assert_int_equal(mg_agent_hostport_parse("example:22", tiny, sizeof(tiny), &port), MG_EINVAL);
}

static void test_split_command(void **state)
{
    char **argv = NULL;
    int argc = 0;
    assert_int_equal(mg_agent_split_command("  /usr/sbin/sshd -i\t-f  /x/sshd_config ", &argv,
                                            &argc), 0);
    assert_int_equal(argc, 4);
    assert_string_equal(argv[0], "/usr/sbin/sshd");
    assert_string_equal(argv[1], "-i");
    assert_string_equal(argv[2], "-f");
    assert_string_equal(argv[3], "/x/sshd_config");
    assert_null(argv[4]);
    free(argv);
    assert_int_equal(mg_agent_split_command("sshd", &argv, &argc), 0);
    assert_int_equal(argc, 1);
    assert_null(argv[1]);
    free(argv);
    assert_int_equal(mg_agent_split_command("   ", &argv, &argc), MG_EINVAL);
    assert_int_equal(mg_agent_split_command("", &argv, &argc), MG_EINVAL);
}

static void test_expand_home(void **state)
{
    char out[64], err[256];
    assert_int_equal(mg_agent_expand_home("/usr/sbin/sshd -i -f ~/.config/a/sshd_config", "/home/u",
                                          out, sizeof(out), err, sizeof(err)), 0);
    assert_string_equal(out, "/usr/sbin/sshd -i -f /home/u/.config/a/sshd_config");
    /* Only a word's first character; the spacing is kept. */
    assert_int_equal(mg_agent_expand_home(" ~ a~b\t~/x ", "/h", out, sizeof(out), err,
                                          sizeof(err)), 0);
    assert_string_equal(out, " /h a~b\t/h/x ");
    assert_int_equal(mg_agent_expand_home("sshd -f ~bob/x", "/h", out, sizeof(out), err,
                                          sizeof(err)), MG_EINVAL);
    assert_non_null(strstr(err, "\"~bob/x\": ~NAME"));
    assert_int_equal(mg_agent_expand_home("sshd -f ~/x", NULL, out, sizeof(out), err,
                                          sizeof(err)), MG_EINVAL);
    assert_non_null(strstr(err, "$HOME"));
    assert_int_equal(mg_agent_expand_home("sshd -f ~/x", "relative", out, sizeof(out), err,
                                          sizeof(err)), MG_EINVAL);
    /* Without a ~ no home is needed. */
    assert_int_equal(mg_agent_expand_home("sshd -i", NULL, out, sizeof(out), err, sizeof(err)), 0);
    assert_string_equal(out, "sshd -i");
    /* Exactly full, and one byte over. */
    assert_int_equal(mg_agent_expand_home("~/abc", "/h", out, 7, err, sizeof(err)), 0);
    assert_string_equal(out, "/h/abc");
    assert_int_equal(mg_agent_expand_home("~/abc", "/h", out, 6, err, sizeof(err)), MG_ENOMEM);
    assert_int_equal(mg_agent_expand_home("", "/h", out, 1, err, sizeof(err)), 0);
    assert_string_equal(out, "");
}

static void test_token_and_hex(void **state)
{
    assert_int_equal(mg_agent_token_check("abc.DEF-123_~"), 0);
    assert_int_equal(mg_agent_token_check(""), MG_EINVAL);
    assert_int_equal(mg_agent_token_check("a b"), MG_EINVAL);
    assert_int_equal(mg_agent_token_check("a\r\nX-Evil: 1"), MG_EINVAL);
    assert_int_equal(mg_agent_token_check("caf\xc3\xa9"), MG_EINVAL);
    char *big = malloc(MG_AGENT_TOKEN_MAX + 2);
    memset(big, 'a', MG_AGENT_TOKEN_MAX + 1);
    big[MG_AGENT_TOKEN_MAX + 1] = '\0';
    assert_int_equal(mg_agent_token_check(big), MG_EINVAL);
    big[MG_AGENT_TOKEN_MAX] = '\0';
    assert_int_equal(mg_agent_token_check(big), 0);
    free(big);

    const uint8_t b[] = { 0x00, 0x9f, 0xa0, 0xff };
    char hex[9];
    mg_agent_hex(b, sizeof(b), hex);
    assert_string_equal(hex, "009fa0ff");
}

static void test_control_parse(void **state)
{
#define CTL(s) mg_agent_control_parse(s, strlen(s))
    assert_int_equal(CTL("{\"type\":\"open\"}"), MG_AGENT_CONTROL_OPEN);
    assert_int_equal(CTL(" { \"type\" : \"open\" } \n"), MG_AGENT_CONTROL_OPEN);
    assert_int_equal(CTL("{\"n\":[1,{\"a\":null}],\"type\":\"open\",\"x\":true}"),
                     MG_AGENT_CONTROL_OPEN);
    assert_int_equal(CTL("{\"type\":\"close\"}"), MG_AGENT_CONTROL_UNKNOWN);
    assert_int_equal(CTL("{\"type\":\"opened\"}"), MG_AGENT_CONTROL_UNKNOWN);
    assert_int_equal(CTL("{\"kind\":\"open\"}"), MG_AGENT_CONTROL_UNKNOWN);
    assert_int_equal(CTL("{\"type\":1}"), MG_AGENT_CONTROL_UNKNOWN);
    assert_int_equal(CTL("{}"), MG_AGENT_CONTROL_UNKNOWN);
    assert_int_equal(CTL("{\"s\":\"a\\\"b\\u00e9\",\"type\":\"open\"}"), MG_AGENT_CONTROL_OPEN);
    static const char *const bad[] = {
        "", "open", "[\"type\",\"open\"]", "{\"type\":\"open\"", "{\"type\":\"open\"}}",
        "{\"type\" \"open\"}", "{type:\"open\"}", "{\"type\":\"open\",}", "{\"a\":\"\\q\"}",
        "{\"a\":\"\\u12\"}", "{\"a\":tru}", "{\"a\":}",
        "{\"type\":\"open\",\"type\":\"open\"}",
    };
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++)
        if (CTL(bad[i]) != MG_EINVAL)
            fail_msg("accepted %s", bad[i]);
    /* Nesting is bounded (jansson's limit, 2048): a deeper message is refused, not a crash. */
    enum { DEEP = 5000 };
    static char deep[2 * DEEP + 16];
    size_t k = 0;
    k += (size_t)sprintf(deep, "{\"a\":");
    for (int i = 0; i < DEEP; i++)
        deep[k++] = '[';
    for (int i = 0; i < DEEP; i++)
        deep[k++] = ']';
    deep[k++] = '}';
    assert_int_equal(mg_agent_control_parse(deep, k), MG_EINVAL);
    assert_int_equal(CTL("{\"a\":[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]],"
                         "\"type\":\"open\"}"),
                     MG_AGENT_CONTROL_OPEN);
    assert_int_equal(CTL("{\"type\":\"open\\u0000\"}"), MG_EINVAL); /* no NUL in a string */
    /* Only the bytes given count: no reading past n. */
    assert_int_equal(mg_agent_control_parse("{\"type\":\"open\"}XYZ", 15), MG_AGENT_CONTROL_OPEN);
    assert_int_equal(mg_agent_control_parse("{\"type\":\"open\"}", 10), MG_EINVAL);
#undef CTL
}

static int parse(const char *env_token, mg_agent_args_t *a, char *err, size_t errlen, ...)
{
    char *argv[32];
    int argc = 0;
    argv[argc++] = "moongate-agent";
    va_list ap;
    va_start(ap, errlen);
    for (char *s; (s = va_arg(ap, char *)) != NULL;)
        argv[argc++] = s;
    va_end(ap);
    argv[argc] = NULL;
    return mg_agent_args_parse(argc, argv, env_token, a, err, errlen);
}

static void test_args(void **state)
{
    mg_agent_args_t a;
    char err[256];
    assert_int_equal(parse("envtok", &a, err, sizeof(err), "--gateway", "wss://gw/tunnel",
                           NULL), 0);
    assert_string_equal(a.token, "envtok");
    assert_false(a.token_from_argv);
    assert_string_equal(a.ssh_host, "127.0.0.1");
    assert_int_equal(a.ssh_port, 22);
    assert_int_equal(a.max_connections, MG_AGENT_MAX_CONNECTIONS_DEFAULT);
    assert_int_equal(a.resolve_interval_s, MG_AGENT_RESOLVE_INTERVAL_DEFAULT_S);
    assert_false(a.once);
    assert_int_equal(a.n_gateways, 1);
    assert_true(a.urls[0].tls);
    assert_true(a.tls);

    /* Every node of a cluster: --gateway more than once, each its own URL. */
    assert_int_equal(parse("envtok", &a, err, sizeof(err), "--gateway", "ws://n1:8080/tunnel",
                           "--gateway=wss://n2/tunnel", NULL), 0);
    assert_int_equal(a.n_gateways, 2);
    assert_string_equal(a.gateways[0], "ws://n1:8080/tunnel");
    assert_string_equal(a.urls[0].host, "n1");
    assert_int_equal(a.urls[0].port, 8080);
    assert_false(a.urls[0].tls);
    assert_string_equal(a.urls[1].host, "n2");
    assert_true(a.urls[1].tls);
    assert_true(a.tls);
    assert_int_not_equal(parse("envtok", &a, err, sizeof(err), "--gateway", "ws://n1/t",
                               "--gateway", "ws://n1/t", NULL), 0);
    assert_non_null(strstr(err, "given twice"));
    assert_int_not_equal(parse("envtok", &a, err, sizeof(err), "--gateway", "ws://n1/t",
                               "--gateway", "http://n2/t", NULL), 0);

    assert_int_equal(parse("envtok", &a, err, sizeof(err), "--gateway=ws://gw:81/t",
                           "--token", "argtok", "--ssh=[::1]:2222", "--max-connections", "3",
                           "--once", "-vv", "--resolve-interval", "5", NULL), 0);
    assert_string_equal(a.token, "argtok");
    assert_true(a.token_from_argv);
    assert_string_equal(a.ssh_host, "::1");
    assert_int_equal(a.ssh_port, 2222);
    assert_int_equal(a.max_connections, 3);
    assert_true(a.once);
    assert_int_equal(a.verbose, 2);
    assert_int_equal(a.resolve_interval_s, 5);

    assert_int_equal(parse(NULL, &a, err, sizeof(err), "--gateway", "wss://gw/t",
                           "--token", "t", "--sshd-inetd", "/usr/sbin/sshd -i -f /x",
                           "--ca-file", "/etc/ssl/ca.pem", NULL), 0);
    assert_string_equal(a.sshd_inetd, "/usr/sbin/sshd -i -f /x");
    assert_string_equal(a.ca_file, "/etc/ssl/ca.pem");

    /* --help and --version win over anything missing. */
    assert_int_equal(parse(NULL, &a, err, sizeof(err), "--help", NULL), 0);
    assert_true(a.help);
    assert_int_equal(parse(NULL, &a, err, sizeof(err), "-V", NULL), 0);
    assert_true(a.version);

    struct {
        const char *env;
        const char *args[8];
        const char *says;
    } bad[] = {
        { "t", { NULL }, "--gateway" },
        { NULL, { "--gateway", "ws://gw/t", NULL }, "MOONGATE_TOKEN" },
        { "", { "--gateway", "ws://gw/t", NULL }, "MOONGATE_TOKEN" },
        { "t", { "--gateway", "http://gw/t", NULL }, "ws://" },
        { "t", { "--gateway", NULL }, "needs a value" },
        { "t", { "--gateway", "ws://gw/t", "--token", "a b", NULL }, "visible ASCII" },
        { "t", { "--gateway", "ws://gw/t", "--ssh", "gw", NULL }, "HOST:PORT" },
        { "t", { "--gateway", "ws://gw/t", "--ssh", "a:1", "--sshd-inetd", "x", NULL },
          "exclude" },
        { "t", { "--gateway", "ws://gw/t", "--sshd-inetd", "  ", NULL }, "needs a command" },
        { "t", { "--gateway", "ws://gw/t", "--ca-file", "x.pem", NULL }, "wss://" },
        { "t", { "--gateway", "ws://gw/t", "--max-connections", "0", NULL }, "1 to 1000" },
        { "t", { "--gateway", "ws://gw/t", "--max-connections", "5x", NULL }, "1 to 1000" },
        { "t", { "--gateway", "ws://gw/t", "--resolve-interval", "0", NULL }, "seconds" },
        { "t", { "--gateway", "ws://gw/t", "--resolve-interval", "86401", NULL }, "seconds" },
        { "t", { "--gateway", "ws://gw/t", "--insecure", NULL }, "unknown option" },
        { "t", { "--gateway", "ws://gw/t", "extra", NULL }, "unexpected argument" },
    };
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        char *argv[10] = { "moongate-agent" };
        int argc = 1;
        for (int k = 0; bad[i].args[k] != NULL; k++)
            argv[argc++] = (char *)bad[i].args[k];
        err[0] = '\0';
        assert_int_equal(mg_agent_args_parse(argc, argv, bad[i].env, &a, err, sizeof(err)),
                         MG_EINVAL);
        if (strstr(err, bad[i].says) == NULL)
            fail_msg("case %zu: \"%s\" does not mention \"%s\"", i, err, bad[i].says);
    }
}

/* An ed25519 public key made with ssh-keygen, and its fingerprint from `ssh-keygen -lf`. */
static const char KEY[] =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGebHZHZQrz6yjmdWA3GID7RnHF/EmSX+KTBBjsLJnUd gw";
static const char KEY_FP[] = "SHA256:YVdCFhHcipvJrQshJxEWPfEj1uHTTxYL8hjf6GegGpA";

static void test_setup_args_and_keys(void **state)
{
    mg_agent_setup_args_t s;
    char err[256];
    char *ok[] = { "--dir", "/tmp/x", "--gateway-key", (char *)KEY, "--llm-port=8080" };
    assert_int_equal(mg_agent_setup_args_parse(5, ok, &s, err, sizeof(err)), 0);
    assert_string_equal(s.dir, "/tmp/x");
    assert_int_equal(s.llm_port, 8080);
    char *dflt[] = { "--gateway-key", (char *)KEY };
    assert_int_equal(mg_agent_setup_args_parse(2, dflt, &s, err, sizeof(err)), 0);
    assert_null(s.dir);
    assert_int_equal(s.llm_port, 11434);

    char *nokey[] = { "--dir", "/tmp/x" };
    assert_int_equal(mg_agent_setup_args_parse(2, nokey, &s, err, sizeof(err)), MG_EINVAL);
    char *badport[] = { "--gateway-key", (char *)KEY, "--llm-port", "0" };
    assert_int_equal(mg_agent_setup_args_parse(4, badport, &s, err, sizeof(err)), MG_EINVAL);
    char *spacedir[] = { "--gateway-key", (char *)KEY, "--dir", "/tmp/a b" };
    assert_int_equal(mg_agent_setup_args_parse(4, spacedir, &s, err, sizeof(err)), MG_EINVAL);

    assert_int_equal(mg_agent_pubkey_check(KEY, err, sizeof(err)), 0);
    char fp[64];
    assert_int_equal(mg_agent_pubkey_fingerprint(KEY, fp, sizeof(fp)), 0);
    assert_string_equal(fp, KEY_FP);
    assert_int_equal(mg_agent_pubkey_fingerprint(KEY, fp, 20), MG_ENOMEM);

    static const char *const badkeys[] = {
        "restrict ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGebHZHZQrz6yjmdWA3GID7RnHF/EmSX+KTBBjsLJnUd",
        "ssh-rsa AAAAC3NzaC1lZDI1NTE5AAAAIGebHZHZQrz6yjmdWA3GID7RnHF/EmSX+KTBBjsLJnUd x",
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGebHZHZQrz6yjmdWA3GID7RnHF/EmSX+KTBBjsLJnU x",
        "ssh-ed25519 !!!!",
        "ssh-ed25519",
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGebHZHZQrz6yjmdWA3GID7RnHF/EmSX+KTBBjsLJnUd x\n"
        "ssh-ed25519 AAAA",
    };
    for (size_t i = 0; i < sizeof(badkeys) / sizeof(badkeys[0]); i++)
        if (mg_agent_pubkey_check(badkeys[i], err, sizeof(err)) != MG_EINVAL)
            fail_msg("accepted key %zu", i);

    char line[512];
    assert_int_equal(mg_agent_authorized_line(KEY, 11434, line, sizeof(line)), 0);
    assert_string_equal(line, "restrict,port-forwarding,permitopen=\"127.0.0.1:11434\" "
                              "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGebHZHZQrz6yjmdWA3GID7RnHF/"
                              "EmSX+KTBBjsLJnUd gw");
    assert_int_equal(mg_agent_authorized_line(KEY, 11434, line, 40), MG_ENOMEM);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_backoff_low_end_doubles_to_cap),
        cmocka_unit_test(test_backoff_high_end),
        cmocka_unit_test(test_backoff_exact_values),
        cmocka_unit_test(test_backoff_every_wait_in_range),
        cmocka_unit_test(test_backoff_reset_and_max),
        cmocka_unit_test(test_url_parse),
        cmocka_unit_test(test_hostport),
        cmocka_unit_test(test_split_command),
        cmocka_unit_test(test_expand_home),
        cmocka_unit_test(test_token_and_hex),
        cmocka_unit_test(test_control_parse),
        cmocka_unit_test(test_args),
        cmocka_unit_test(test_setup_args_and_keys),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
