/*
 * Tests of src/policy/policy.c and src/policy/policy_hooks.c: every hook and its default,
 * results of the wrong type, the time and memory bounds, errors failing closed, and reload.
 */
#include "test_policy_util.h"

/* ---- defaults ---- */

static void test_default_authenticate_refuses_without_tokens(void **state)
{
    unsetenv("MOONGATE_TOKENS");
    mg_policy_t *p = tp_policy(NULL);
    mg_policy_decision_t d;
    assert_int_equal(tp_auth(p, "anything", &d), 0);
    assert_false(d.allow);
    assert_int_equal(d.status, 401);
    assert_non_null(strstr(d.message, "MOONGATE_TOKENS"));
    assert_string_equal(tp_header(&d, "www-authenticate"), "Bearer realm=\"moongate\"");
    tp_free(p);
}

static void test_default_authenticate_with_tokens(void **state)
{
    setenv("MOONGATE_TOKENS", "alice:s3cret,bob@example.com:other", 1);
    mg_policy_t *p = tp_policy(NULL);
    unsetenv("MOONGATE_TOKENS");
    mg_policy_decision_t d;
    assert_int_equal(tp_auth(p, "s3cret", &d), 0);
    assert_true(d.allow);
    assert_string_equal(d.user, "alice");
    assert_int_equal(tp_auth(p, "other", &d), 0);
    assert_string_equal(d.user, "bob@example.com");
    assert_int_equal(tp_auth(p, "wrong", &d), 0);
    assert_false(d.allow);
    assert_int_equal(d.status, 401);
    assert_string_equal(d.message, "invalid token");
    assert_int_equal(tp_auth(p, NULL, &d), 0);
    assert_false(d.allow);
    assert_string_equal(d.message, "missing bearer token");
    tp_free(p);
}

static void test_default_bad_token_spec_fails_load(void **state)
{
    setenv("MOONGATE_TOKENS", "alice", 1);
    mg_policy_options_t o;
    mg_policy_options_init(&o, NULL);
    o.lua_dir = MG_SOURCE_DIR "/lua";
    mg_policy_t *p;
    char err[512];
    assert_int_equal(mg_policy_new(&tp_loop, &o, &p, err, sizeof(err)), MG_ECONFIG);
    unsetenv("MOONGATE_TOKENS");
    assert_non_null(strstr(err, "MOONGATE_TOKENS: each entry must be user:token"));
}

static void test_default_admit_limits_route_shutdown(void **state)
{
    mg_settings_t s;
    mg_settings_init(&s);
    mg_policy_t *p = tp_policy(NULL);
    mg_policy_decision_t d;
    assert_int_equal(tp_admit(p, "alice", &d), 0);
    assert_true(d.allow);
    assert_string_equal(d.user, "alice");

    mg_pool_limits_t l;
    assert_int_equal(mg_policy_limits(p, "alice", &l), 0);
    assert_int_equal(l.max_connections, 3);
    assert_int_equal(l.max_channels, 10);
    assert_int_equal(l.idle_timeout_ms, 300000);
    assert_int_equal(l.queue_max, s.queue_max);
    assert_int_equal(l.queue_timeout_ms, s.queue_timeout_ms);

    tp_req_t r;
    mg_policy_route_t route;
    mg_policy_state_t *st = mg_policy_acquire(p);
    assert_int_equal(mg_policy_route(st, tp_request(&r, NULL), "alice", &route, &d), 0);
    mg_policy_release(st);
    assert_true(d.allow);
    assert_int_equal(route.transport, MG_ROUTE_TCP);
    assert_string_equal(route.host, "127.0.0.1");
    assert_int_equal(route.port, 22);
    assert_string_equal(route.ssh_user, "llm");
    assert_string_equal(route.key, "/etc/moongate/id_ed25519");
    assert_string_equal(route.known_hosts, "/etc/moongate/known_hosts");
    assert_string_equal(route.target_host, "127.0.0.1");
    assert_int_equal(route.target_port, 11434);
    assert_string_equal(route.host_key, "");

    mg_policy_shutdown_t sd;
    mg_policy_shutdown_info_t info = { "SIGTERM", 2, 1 };
    assert_int_equal(mg_policy_shutdown(p, &info, &sd), 0);
    assert_int_equal(sd.grace_ms, 30000);
    assert_true(sd.notify_clients);
    assert_true(sd.force_after_grace);

    mg_policy_event_t ev = { .type = "connection_opened", .user = "alice", .conn_id = 7 };
    assert_int_equal(mg_policy_event(p, &ev), 0);

    st = mg_policy_acquire(p);
    assert_int_equal(mg_policy_agent_auth(st, "nope", tp_request(&r, NULL), &d), 0);
    mg_policy_release(st);
    assert_false(d.allow);
    assert_int_equal(d.status, 401);
    tp_free(p);
}

static void test_default_route_from_env(void **state)
{
    setenv("MOONGATE_SSH_USER", "ollama", 1);
    setenv("MOONGATE_TARGET_PORT", "8080", 1);
    setenv("MOONGATE_AGENT_TOKENS", "carol:agent-token", 1);
    mg_policy_t *p = tp_policy(NULL);
    unsetenv("MOONGATE_SSH_USER");
    unsetenv("MOONGATE_TARGET_PORT");
    unsetenv("MOONGATE_AGENT_TOKENS");
    tp_req_t r;
    mg_policy_route_t route;
    mg_policy_decision_t d;
    mg_policy_state_t *st = mg_policy_acquire(p);
    assert_int_equal(mg_policy_route(st, tp_request(&r, NULL), "alice", &route, &d), 0);
    assert_string_equal(route.ssh_user, "ollama");
    assert_int_equal(route.target_port, 8080);
    assert_int_equal(mg_policy_agent_auth(st, "agent-token", tp_request(&r, NULL), &d), 0);
    assert_true(d.allow);
    assert_string_equal(d.user, "carol");
    mg_policy_release(st);
    tp_free(p);
}

/* ---- custom hooks ---- */

static const char custom_src[] =
    "local mg = require 'moongate'\n"
    "return {\n"
    "  authenticate = function(req)\n"
    "    assert(req.method == 'POST' and req.path == '/api/generate')\n"
    "    assert(req.remote_addr == '203.0.113.7')\n"
    "    assert(req.headers['content-type'] == 'application/json')\n"
    "    local h = req.headers.authorization\n"
    "    if h == 'Bearer good' then return 'alice' end\n"
    "    return nil, 403, 'go away', { ['x-reason'] = 'test', ['retry-after'] = 5 }\n"
    "  end,\n"
    "  admit = function(req, user, stats)\n"
    "    assert(stats.known == true and stats.connections == 2 and stats.queued == 1)\n"
    "    assert(stats.in_flight == 4 and stats.channels == 3 and stats.max_connections == 3)\n"
    "    if user == 'alice' then return true end\n"
    "    return false, 429, 'slow down', { ['retry-after'] = '12' }\n"
    "  end,\n"
    "  limits = function(user)\n"
    "    if user == 'alice' then return { max_connections = 1, queue_max = 0 } end\n"
    "  end,\n"
    "  route = function(req, user)\n"
    "    if user ~= 'alice' then return nil, 404, 'no machine for ' .. user end\n"
    "    return { transport = 'agent', ssh_user = 'a', key = '/k', key_passphrase = 'pw',\n"
    "             host_key = 'SHA256:' .. string.rep('A', 43), target_port = 8000 }\n"
    "  end,\n"
    "  on_event = function(ev)\n"
    "    mg.dict.set('event', ev.type .. ' ' .. ev.user .. ' ' .. ev.conn .. ' ' .. ev.message)\n"
    "  end,\n"
    "  shutdown = function(info)\n"
    "    return { grace_ms = 5000, notify_clients = false, message = info.reason .. ' ' ..\n"
    "             info.in_flight }\n"
    "  end,\n"
    "  agent_auth = function(token, req) if token == 'tok' then return 'agent-1' end end,\n"
    "}\n";

static int fake_user_stats(void *ctx, const char *user, mg_pool_user_stats_t *out)
{
    memset(out, 0, sizeof(*out));
    out->connections = 2;
    out->leases = 3;
    out->waiters = 1;
    out->limits.max_connections = 3;
    return 0;
}

static void test_custom_hooks(void **state)
{
    mg_policy_t *p = tp_policy_src("custom.lua", custom_src);
    mg_policy_set_stats_fn(p, fake_user_stats, NULL, NULL);
    mg_policy_decision_t d;
    assert_int_equal(tp_auth(p, "good", &d), 0);
    assert_true(d.allow);
    assert_string_equal(d.user, "alice");
    assert_int_equal(tp_auth(p, "bad", &d), 0);
    assert_false(d.allow);
    assert_int_equal(d.status, 403);
    assert_string_equal(d.message, "go away");
    assert_int_equal(d.nheaders, 2);
    assert_string_equal(tp_header(&d, "x-reason"), "test");
    assert_string_equal(tp_header(&d, "retry-after"), "5");

    assert_int_equal(tp_admit(p, "alice", &d), 0);
    assert_true(d.allow);
    assert_int_equal(tp_admit(p, "bob", &d), 0);
    assert_false(d.allow);
    assert_int_equal(d.status, 429);
    assert_string_equal(d.message, "slow down");
    assert_string_equal(tp_header(&d, "retry-after"), "12");

    mg_pool_limits_t l;
    assert_int_equal(mg_policy_limits(p, "alice", &l), 0);
    assert_int_equal(l.max_connections, 1);
    assert_int_equal(l.queue_max, 0);
    assert_int_equal(l.max_channels, 10); /* not given: the default */
    assert_int_equal(mg_policy_pool_limits_fn(p, "bob", &l), 0);
    assert_int_equal(l.max_connections, 3);

    tp_req_t r;
    mg_policy_route_t route;
    mg_policy_state_t *st = mg_policy_acquire(p);
    assert_int_equal(mg_policy_route(st, tp_request(&r, NULL), "alice", &route, &d), 0);
    assert_true(d.allow);
    assert_int_equal(route.transport, MG_ROUTE_AGENT);
    assert_string_equal(route.key_passphrase, "pw");
    assert_int_equal(route.target_port, 8000);
    assert_string_equal(route.target_host, "127.0.0.1");
    assert_int_equal(strncmp(route.host_key, "SHA256:AAAA", 11), 0);
    assert_int_equal(mg_policy_route(st, tp_request(&r, NULL), "bob", &route, &d), 0);
    assert_false(d.allow);
    assert_int_equal(d.status, 404);
    assert_string_equal(d.message, "no machine for bob");
    assert_int_equal(mg_policy_agent_auth(st, "tok", tp_request(&r, NULL), &d), 0);
    assert_string_equal(d.user, "agent-1");
    mg_policy_release(st);

    mg_policy_event_t ev = { .type = "connection_closed", .user = "alice", .conn_id = 42, .message = "bye" };
    assert_int_equal(mg_policy_event(p, &ev), 0);
    mg_dict_value_t v;
    assert_true(mg__dict_get(p->dict, "event", 5, mg__policy_now_ms(p), &v));
    assert_int_equal(v.type, MG_DICT_STRING);
    assert_string_equal(v.str, "connection_closed alice 42 bye");

    mg_policy_shutdown_t sd;
    mg_policy_shutdown_info_t info = { "SIGTERM", 3, 1 };
    assert_int_equal(mg_policy_shutdown(p, &info, &sd), 0);
    assert_int_equal(sd.grace_ms, 5000);
    assert_false(sd.notify_clients);
    assert_true(sd.force_after_grace);
    assert_string_equal(sd.message, "SIGTERM 3");
    tp_free(p);
}

static void test_repeated_headers_are_joined(void **state)
{
    mg_policy_t *p = tp_policy_src("hdr.lua",
        "return { authenticate = function(req) return req.headers['x-a'] == '1, 2' and 'u' "
        "or nil end }\n");
    mg_policy_header_t h[2] = { { "x-a", "1" }, { "x-a", "2" } };
    mg_policy_request_t req = { .method = "GET", .path = "/", .headers = h, .nheaders = 2 };
    mg_policy_decision_t d;
    mg_policy_state_t *st = mg_policy_acquire(p);
    assert_int_equal(mg_policy_authenticate(st, &req, &d), 0);
    assert_true(d.allow);
    mg_policy_release(st);
    tp_free(p);
}

/* ---- wrong results ---- */

typedef struct bad_case {
    const char *src;       /* the hooks table's body */
    const char *expect;    /* in the log line */
} bad_case_t;

static void run_bad(const bad_case_t *c, int hook)
{
    char src[1024];
    snprintf(src, sizeof(src), "return {\n%s\n}\n", c->src);
    mg_policy_t *p = tp_policy_src("bad.lua", src);
    mg_policy_decision_t d;
    tp_req_t r;
    mg_policy_route_t route;
    mg_pool_limits_t l;
    mg_policy_shutdown_t sd;
    mg_policy_state_t *st = mg_policy_acquire(p);
    tp_capture_begin();
    int rc = 0;
    switch (hook) {
    case MG_HOOK_AUTHENTICATE:
        rc = mg_policy_authenticate(st, tp_request(&r, NULL), &d);
        break;
    case MG_HOOK_ADMIT:
        rc = mg_policy_admit(st, tp_request(&r, NULL), "alice", &d);
        break;
    case MG_HOOK_ROUTE:
        rc = mg_policy_route(st, tp_request(&r, NULL), "alice", &route, &d);
        assert_string_equal(route.host, "");
        break;
    case MG_HOOK_LIMITS:
        rc = mg_policy_limits(p, "alice", &l);
        assert_int_equal(l.max_connections, 3);
        break;
    case MG_HOOK_SHUTDOWN:
        rc = mg_policy_shutdown(p, NULL, &sd);
        assert_int_equal(sd.grace_ms, 30000);
        break;
    }
    char *log = tp_capture_end();
    assert_int_equal(rc, MG_EINVAL);
    if (hook == MG_HOOK_AUTHENTICATE || hook == MG_HOOK_ADMIT || hook == MG_HOOK_ROUTE) {
        assert_false(d.allow);
        assert_int_equal(d.status, 500);
    }
    char where[300];
    snprintf(where, sizeof(where), "%s (%s/bad.lua:2) returned a bad result", mg__hook_names[hook],
             tp_dir);
    if (strstr(log, where) == NULL || strstr(log, c->expect) == NULL)
        fail_msg("expected \"%s\" and \"%s\" in: %s", where, c->expect, log);
    assert_int_equal(tp_count(log, "returned a bad result"), 1);
    free(log);
    mg_policy_release(st);
    tp_free(p);
}

static void test_wrong_result_types(void **state)
{
    static const struct { int hook; bad_case_t c; } cases[] = {
        { MG_HOOK_AUTHENTICATE, { "authenticate = function() return {} end",
                                  "must return a user id (string)" } },
        { MG_HOOK_AUTHENTICATE, { "authenticate = function() return 42 end", "got number" } },
        { MG_HOOK_AUTHENTICATE, { "authenticate = function() return 'a b' end",
                                  "\"a b\" is not a valid user id" } },
        { MG_HOOK_AUTHENTICATE, { "authenticate = function() return string.rep('a', 129) end",
                                  "is not a valid user id" } },
        { MG_HOOK_AUTHENTICATE, { "authenticate = function() return nil, 200 end",
                                  "from 400 to 599" } },
        { MG_HOOK_AUTHENTICATE, { "authenticate = function() return nil, 401, {} end",
                                  "message of a refusal must be a string" } },
        { MG_HOOK_AUTHENTICATE, { "authenticate = function() return nil, 401, 'x', "
                                  "{ ['x-a'] = 'a\\r\\nset-cookie: 1' } end",
                                  "header x-a must have" } },
        { MG_HOOK_AUTHENTICATE, { "authenticate = function() return nil, 401, 'x', "
                                  "{ ['X-Upper'] = '1' } end", "header X-Upper" } },
        { MG_HOOK_ADMIT, { "admit = function() end", "must return true, or false" } },
        { MG_HOOK_ADMIT, { "admit = function() return 'yes' end", "got string" } },
        { MG_HOOK_ADMIT, { "admit = function() return false, 429.5 end", "from 400 to 599" } },
        { MG_HOOK_ROUTE, { "route = function() return 'host' end", "must return a table" } },
        { MG_HOOK_ROUTE, { "route = function() return { host = 'h', key = 'k', "
                           "known_hosts = 'kh' } end", "ssh_user and key are required" } },
        { MG_HOOK_ROUTE, { "route = function() return { host = 'h', ssh_user = 'u', key = 'k', "
                           "known_hosts = 'kh', prot = 22 } end", "unknown field prot" } },
        { MG_HOOK_ROUTE, { "route = function() return { host = 'h', ssh_user = 'u', key = 'k', "
                           "known_hosts = 'kh', port = 70000 } end", "field port must be" } },
        { MG_HOOK_ROUTE, { "route = function() return { host = 'h', ssh_user = 'u', key = 'k', "
                           "known_hosts = 'kh', transport = 'udp' } end", "\"tcp\" or \"agent\"" } },
        { MG_HOOK_ROUTE, { "route = function() return { host = 'h', ssh_user = 'u', key = 'k' } "
                           "end", "give known_hosts or host_key" } },
        { MG_HOOK_ROUTE, { "route = function() return { host = 'h', ssh_user = 'u', key = 'k', "
                           "host_key = 'MD5:aa' } end", "field host_key must be" } },
        { MG_HOOK_ROUTE, { "route = function() return { ssh_user = 'u', key = 'k', "
                           "known_hosts = 'kh' } end", "field host is required" } },
#define R "route = function() return { host = 'h', ssh_user = 'u', key = 'k', known_hosts = 'kh', "
        { MG_HOOK_ROUTE, { R "headers = { host = 'evil' } } end", "headers: \"host\" is not" } },
        { MG_HOOK_ROUTE, { R "headers = { ['content-length'] = '0' } } end",
                           "\"content-length\" is not" } },
        { MG_HOOK_ROUTE, { R "headers = { ['X-Up'] = '1' } } end", "\"X-Up\" is not" } },
        { MG_HOOK_ROUTE, { R "headers = { a = 'x\\r\\nb: 1' } } end",
                           "headers.a must be a string" } },
        { MG_HOOK_ROUTE, { R "headers = { a = true } } end", "headers.a must be a string" } },
        { MG_HOOK_ROUTE, { R "headers = { a = string.rep('v', 2049) } } end",
                           "at most 2048 bytes" } },
        { MG_HOOK_ROUTE, { R "headers = { [1] = 'x' } } end", "a key of type number" } },
        { MG_HOOK_ROUTE, { R "headers = 'x' } end", "field headers must be a table" } },
        { MG_HOOK_ROUTE, { R "host_header = 'a b' } end", "field host_header must be" } },
        { MG_HOOK_ROUTE, { R "head_timeout_ms = 10 } end", "field head_timeout_ms must be" } },
        { MG_HOOK_ROUTE, { R "idle_timeout_ms = 'x' } end", "field idle_timeout_ms must be" } },
        { MG_HOOK_ROUTE, { R "error_format = 'xml' } end", "field error_format must be" } },
        { MG_HOOK_ROUTE, { R "forward_credential = 1 } end", "must be a boolean" } },
#undef R
        { MG_HOOK_AUTHENTICATE, { "authenticate = function() return 'a', { credential = 'Host' } "
                                  "end", "credential must name a request header" } },
        { MG_HOOK_AUTHENTICATE, { "authenticate = function() return 'a', { cred = 'x' } end",
                                  "unknown field cred" } },
        { MG_HOOK_AUTHENTICATE, { "authenticate = function() return 'a', 'x' end",
                                  "the second result with a user must be a table" } },
        { MG_HOOK_LIMITS, { "limits = function() return { max_connections = '3' } end",
                            "field max_connections must be a whole number" } },
        { MG_HOOK_LIMITS, { "limits = function() return { max_connections = 2.5 } end",
                            "got number 2.5" } },
        { MG_HOOK_LIMITS, { "limits = function() return { max_channels = 0 } end",
                            "field max_channels" } },
        { MG_HOOK_LIMITS, { "limits = function() return 3 end", "must return a table or nil" } },
        { MG_HOOK_SHUTDOWN, { "shutdown = function() return { grace_ms = -1 } end",
                              "field grace_ms" } },
        { MG_HOOK_SHUTDOWN, { "shutdown = function() return { notify_clients = 'yes' } end",
                              "field notify_clients must be a boolean" } },
        { MG_HOOK_SHUTDOWN, { "shutdown = function() return 'now' end",
                              "must return a table or nil" } },
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++)
        run_bad(&cases[i].c, cases[i].hook);
}

/* A route's rules for the upstream request, and authenticate's credential. */
static void test_route_rules_and_credential(void **state)
{
    mg_policy_t *p = tp_policy_src("rules.lua",
        "return {\n"
        "  authenticate = function(req)\n"
        "    if req.headers['x-api-key'] then return 'k', { credential = 'x-api-key' } end\n"
        "    if req.headers['x-none'] then return 'n', { credential = false } end\n"
        "    return 'a'\n"
        "  end,\n"
        "  route = function() return { host = 'h', ssh_user = 'u', key = 'k', known_hosts = 'kh',\n"
        "    headers = { origin = false, authorization = 'Bearer up', ['x-b'] = 7 },\n"
        "    host_header = 'localhost:11434', forward_credential = true,\n"
        "    head_timeout_ms = 600000, idle_timeout_ms = 30000, error_format = 'ollama' } end,\n"
        "  error_format = 'openai',\n"
        "}\n");
    mg_policy_state_t *st = mg_policy_acquire(p);
    assert_int_equal(mg_policy_error_format(st), MG_ERROR_FORMAT_OPENAI);
    mg_policy_decision_t d;
    tp_req_t r;
    assert_int_equal(mg_policy_authenticate(st, tp_request(&r, "t"), &d), 0);
    assert_string_equal(d.credential, "authorization");
    mg_policy_header_t hk[] = { { "x-api-key", "1" } };
    mg_policy_request_t req = { .method = "GET", .path = "/", .headers = hk, .nheaders = 1 };
    assert_int_equal(mg_policy_authenticate(st, &req, &d), 0);
    assert_string_equal(d.user, "k");
    assert_string_equal(d.credential, "x-api-key");
    hk[0].name = "x-none";
    assert_int_equal(mg_policy_authenticate(st, &req, &d), 0);
    assert_string_equal(d.credential, "");

    mg_policy_route_t route;
    assert_int_equal(mg_policy_route(st, tp_request(&r, NULL), "a", &route, &d), 0);
    assert_true(d.allow);
    assert_int_equal(route.nrules, 3);
    /* sorted by name: authorization, origin, x-b */
    static const char *const names[] = { "authorization", "origin", "x-b" };
    static const char *const values[] = { "Bearer up", NULL, "7" };
    for (int i = 0; i < 3; i++) {
        const mg_policy_header_rule_t *k = &route.rules[i];
        assert_int_equal(k->name_len, strlen(names[i]));
        assert_memory_equal(route.rule_buf + k->name_off, names[i], k->name_len);
        assert_int_equal(k->remove, values[i] == NULL);
        if (values[i]) {
            assert_int_equal(k->value_len, strlen(values[i]));
            assert_memory_equal(route.rule_buf + k->value_off, values[i], k->value_len);
        }
    }
    assert_string_equal(route.host_header, "localhost:11434");
    assert_true(route.forward_credential);
    assert_int_equal(route.head_timeout_ms, 600000);
    assert_int_equal(route.idle_timeout_ms, 30000);
    assert_int_equal(route.error_format, MG_ERROR_FORMAT_PLAIN);
    mg_policy_release(st);
    tp_free(p);
}

static void test_hook_not_a_function(void **state)
{
    const char *path = tp_write("notfn.lua", "local x = 1\nreturn {\n  admit = 42,\n}\n");
    mg_policy_options_t o;
    mg_policy_options_init(&o, NULL);
    o.path = path;
    o.lua_dir = MG_SOURCE_DIR "/lua";
    mg_policy_t *p;
    char err[512], want[600];
    assert_int_equal(mg_policy_new(&tp_loop, &o, &p, err, sizeof(err)), MG_ECONFIG);
    snprintf(want, sizeof(want), "%s:4: hook 'admit' must be a function or nil, got number", path);
    assert_string_equal(err, want);

    o.path = tp_write("notable.lua", "return 'hooks'\n");
    assert_int_equal(mg_policy_new(&tp_loop, &o, &p, err, sizeof(err)), MG_ECONFIG);
    assert_non_null(strstr(err, "the policy must return a table of hooks, got string"));

    o.path = tp_write("syntax.lua", "return {\n  admit = function( end,\n}\n");
    assert_int_equal(mg_policy_new(&tp_loop, &o, &p, err, sizeof(err)), MG_ECONFIG);
    assert_non_null(strstr(err, "syntax.lua:2:"));

    o.path = "/nonexistent/policy.lua";
    assert_int_equal(mg_policy_new(&tp_loop, &o, &p, err, sizeof(err)), MG_ECONFIG);
    assert_non_null(strstr(err, "/nonexistent/policy.lua:0: cannot open"));

    /* A Lua directory without the library says so, and how to fix it. */
    o.path = NULL;
    o.lua_dir = "/nonexistent";
    assert_int_equal(mg_policy_new(&tp_loop, &o, &p, err, sizeof(err)), MG_ECONFIG);
    assert_non_null(strstr(err, "/nonexistent/moongate/default.lua:0: the Lua library is not there"));
    assert_non_null(strstr(err, "MOONGATE_LUA_DIR"));
}

/* This test runs from the build tree, so it uses the source tree's library, whatever is installed
   under the prefix. */
static void test_default_lua_dir_in_the_build_tree(void **state)
{
    (void)state;
    char buf[4096];
    assert_string_equal(mg_policy_default_lua_dir(buf, sizeof(buf)), MG_SOURCE_DIR "/lua");
}

/* ---- failures fail closed ---- */

static void test_hook_that_throws(void **state)
{
    mg_policy_t *p = tp_policy_src("throw.lua",
        "local function helper() error('boom') end\n"
        "return {\n"
        "  authenticate = function(req) helper() end,\n"
        "  admit = function() error({}) end,\n"
        "  limits = function() error('no limits') end,\n"
        "  shutdown = function() error('no shutdown') end,\n"
        "  on_event = function() error('no event') end,\n"
        "}\n");
    mg_policy_decision_t d;
    tp_capture_begin();
    assert_int_equal(tp_auth(p, "x", &d), MG_EINVAL);
    char *log = tp_capture_end();
    assert_false(d.allow);
    assert_int_equal(d.status, 500);
    assert_string_equal(d.message, "policy error");
    assert_int_equal(tp_count(log, "authenticate ("), 1);
    assert_non_null(strstr(log, "throw.lua:3) failed:"));
    assert_non_null(strstr(log, "throw.lua:1: boom"));
    assert_non_null(strstr(log, "stack traceback:"));
    assert_non_null(strstr(log, "in function 'helper'"));
    assert_null(strstr(log, "\n\t")); /* the traceback is flattened onto the one line */
    free(log);

    tp_capture_begin();
    assert_int_equal(tp_admit(p, "alice", &d), MG_EINVAL);
    log = tp_capture_end();
    assert_false(d.allow);
    assert_int_equal(d.status, 500);
    assert_non_null(strstr(log, "error object is a table value"));
    free(log);

    mg_pool_limits_t l;
    assert_int_equal(mg_policy_limits(p, "alice", &l), MG_EINVAL);
    assert_int_equal(l.max_connections, 3);
    mg_policy_shutdown_t sd;
    assert_int_equal(mg_policy_shutdown(p, NULL, &sd), MG_EINVAL);
    assert_int_equal(sd.grace_ms, 30000);
    assert_string_equal(sd.message, "The gateway is shutting down.");
    mg_policy_event_t ev = { .type = "x" };
    assert_int_equal(mg_policy_event(p, &ev), MG_EINVAL);
    tp_free(p);
}

static void test_runaway_hook_is_stopped(void **state)
{
    mg_policy_t *p = tp_policy_src("runaway.lua",
        "local n = 0\n"
        "return {\n"
        "  authenticate = function(req)\n"
        "    n = n + 1\n"
        "    if n == 1 then while true do end end\n"
        "    if n == 2 then\n"
        "      -- catching the error must not keep it running\n"
        "      while true do pcall(function() while true do end end) end\n"
        "    end\n"
        "    if n == 3 then\n"
        "      local co = coroutine.wrap(function() while true do end end)\n"
        "      while true do pcall(co) end\n"
        "    end\n"
        "    return 'alice'\n"
        "  end,\n"
        "}\n");
    mg_policy_decision_t d;
    for (int i = 0; i < 3; i++) {
        uint64_t t0 = uv_hrtime();
        tp_capture_begin();
        assert_int_equal(tp_auth(p, NULL, &d), MG_ETIMEDOUT);
        char *log = tp_capture_end();
        uint64_t ms = (uv_hrtime() - t0) / 1000000;
        assert_false(d.allow);
        assert_int_equal(d.status, 500);
        assert_true(ms >= 50);
        assert_true(ms < 1000);
        assert_non_null(strstr(log, "time budget of 50 ms exceeded"));
        free(log);
    }
    /* The state still serves. */
    assert_int_equal(tp_auth(p, NULL, &d), 0);
    assert_true(d.allow);
    tp_free(p);
}

static void tweak_memory(mg_policy_options_t *o)
{
    o->memory_limit = 16u << 20;
    o->hook_timeout_ms = 2000;
}

static void test_allocation_bomb(void **state)
{
    mg_policy_t *p = tp_policy_opts(tp_write("bomb.lua",
        "local mg = require 'moongate'\n"
        "return {\n"
        "  authenticate = function(req)\n"
        "    if req.headers.authorization == 'Bearer local' then\n"
        "      local t = {}\n"
        "      while true do t[#t + 1] = string.rep('x', 65536) .. #t end\n"
        "    elseif req.headers.authorization == 'Bearer global' then\n"
        "      hoard = hoard or {}\n"
        "      while true do hoard[#hoard + 1] = string.rep('y', 65536) .. #hoard end\n"
        "    elseif req.headers.authorization == 'Bearer big' then\n"
        "      local s = string.rep('z', 64 * 1024 * 1024)\n"
        "    end\n"
        "    return 'alice'\n"
        "  end,\n"
        "}\n"), tweak_memory);
    mg_policy_decision_t d;
    const char *bombs[] = { "local", "big" };
    for (int i = 0; i < 2; i++) {
        tp_capture_begin();
        assert_int_equal(tp_auth(p, bombs[i], &d), MG_ENOMEM);
        char *log = tp_capture_end();
        assert_false(d.allow);
        assert_int_equal(d.status, 500);
        assert_non_null(strstr(log, "memory"));
        free(log);
        assert_true(mg_policy_memory_used(p) < (8u << 20));
        /* Garbage only: the same state still serves. */
        mg_policy_state_t *st = mg_policy_acquire(p);
        assert_int_equal(mg_policy_state_generation(st), 1);
        mg_policy_release(st);
        assert_int_equal(tp_auth(p, "ok", &d), 0);
        assert_true(d.allow);
    }

    /* Memory held by a global survives a collection: the state is replaced from the file. */
    tp_capture_begin();
    assert_int_equal(tp_auth(p, "global", &d), MG_ENOMEM);
    char *log = tp_capture_end();
    assert_non_null(strstr(log, "reloading"));
    free(log);
    mg_policy_state_t *st = mg_policy_acquire(p);
    assert_int_equal(mg_policy_state_generation(st), 2);
    mg_policy_release(st);
    assert_true(mg_policy_memory_used(p) < (4u << 20));
    assert_int_equal(tp_auth(p, "ok", &d), 0);
    assert_true(d.allow);
    tp_free(p);
}

/* ---- reload ---- */

static void test_reload_success_and_failure(void **state)
{
    const char *path = tp_write("reload.lua",
        "return { authenticate = function() return 'first' end }\n");
    mg_policy_t *p = tp_policy(path);
    mg_policy_decision_t d;
    assert_int_equal(tp_auth(p, NULL, &d), 0);
    assert_string_equal(d.user, "first");

    tp_write("reload.lua", "return { authenticate = function() return 'second' end }\n");
    char err[512];
    assert_int_equal(mg_policy_reload(p, err, sizeof(err)), 0);
    assert_int_equal(tp_auth(p, NULL, &d), 0);
    assert_string_equal(d.user, "second");
    assert_int_equal(mg__policy_live_states(), 1);

    /* A syntax error, an error while running, a bad hook: each keeps "second". */
    static const char *broken[] = {
        "return { authenticate = function() return 'third' end\n",
        "local x = nil\nlocal y = x.field\nreturn {}\n",
        "return { authenticate = 'third' }\n",
        "while true do end\n",
    };
    static const char *expect[] = {
        "reload.lua:2: '}' expected",
        "reload.lua:2: attempt to index local 'x'",
        "reload.lua:1: hook 'authenticate' must be a function or nil, got string",
        "reload.lua:1: time budget of 1000 ms exceeded",
    };
    for (int i = 0; i < 4; i++) {
        tp_write("reload.lua", broken[i]);
        tp_capture_begin();
        assert_int_equal(mg_policy_reload(p, err, sizeof(err)), MG_ECONFIG);
        char *log = tp_capture_end();
        if (strstr(err, expect[i]) == NULL)
            fail_msg("expected \"%s\" in \"%s\"", expect[i], err);
        char line[700];
        snprintf(line, sizeof(line), "reload failed: %s", err);
        assert_non_null(strstr(log, line));
        assert_int_equal(tp_count(log, "reload failed"), 1);
        free(log);
        assert_int_equal(tp_auth(p, NULL, &d), 0);
        assert_string_equal(d.user, "second");
        assert_int_equal(mg__policy_live_states(), 1);
    }
    tp_free(p);
}

static void test_request_in_flight_across_reload(void **state)
{
    const char *path = tp_write("inflight.lua",
        "return { authenticate = function() return 'old' end,\n"
        "         admit = function(req, user) return user == 'old' end }\n");
    mg_policy_t *p = tp_policy(path);
    tp_req_t r;
    mg_policy_decision_t d;
    mg_policy_state_t *old = mg_policy_acquire(p);
    assert_int_equal(mg_policy_authenticate(old, tp_request(&r, NULL), &d), 0);
    assert_string_equal(d.user, "old");

    tp_write("inflight.lua",
             "return { authenticate = function() return 'new' end,\n"
             "         admit = function(req, user) return user == 'new' end }\n");
    assert_int_equal(mg_policy_reload(p, NULL, 0), 0);
    assert_int_equal(mg__policy_live_states(), 2);

    /* The request that started on the old state finishes there. */
    assert_int_equal(mg_policy_admit(old, tp_request(&r, NULL), "old", &d), 0);
    assert_true(d.allow);
    assert_int_equal(mg_policy_state_generation(old), 1);

    /* A new request sees the new policy. */
    mg_policy_state_t *cur = mg_policy_acquire(p);
    assert_int_equal(mg_policy_state_generation(cur), 2);
    assert_int_equal(mg_policy_authenticate(cur, tp_request(&r, NULL), &d), 0);
    assert_string_equal(d.user, "new");
    mg_policy_release(cur);

    /* The old state goes with its last request. */
    mg_policy_release(old);
    assert_int_equal(mg__policy_live_states(), 1);
    tp_free(p);
}

static void test_free_with_request_in_flight(void **state)
{
    mg_policy_t *p = tp_policy_src("free.lua", "return { authenticate = function() return 'u' end }\n");
    mg_policy_state_t *st = mg_policy_acquire(p);
    mg_policy_free(p);
    tp_req_t r;
    mg_policy_decision_t d;
    assert_int_equal(mg_policy_authenticate(st, tp_request(&r, NULL), &d), 0);
    assert_string_equal(d.user, "u");
    mg_policy_release(st);
    uv_run(&tp_loop, UV_RUN_NOWAIT);
}

/* ---- timers ---- */

static char cancelled_reason[64];

static int record_cancel(void *ctx, const char *user, mg_pool_user_stats_t *out)
{
    /* The timer callbacks report through moongate.stats(), the only way out of the state that
     * still works while the policy is being freed. */
    snprintf(cancelled_reason, sizeof(cancelled_reason), "%s", user);
    return MG_EINVAL;
}

static const char timers_src[] =
    "local mg = require 'moongate'\n"
    "local tag = ...\n"
    "mg.every(5, function(reason)\n"
    "  if reason then mg.dict.set('every_cancelled', reason); mg.stats('every:' .. reason)\n"
    "  else mg.dict.incr('ticks') end\n"
    "end)\n"
    "mg.after(5, function(reason) mg.dict.set('after', reason or 'fired') end)\n"
    "mg.after(100000, function(reason) mg.dict.set('late', reason or 'fired') end)\n"
    "local id = mg.after(5, function() mg.dict.set('cancelled_by_id', 'fired') end)\n"
    "assert(mg.cancel(id) == true and mg.cancel(id) == false)\n"
    "return {}\n";

static void test_timers_cancelled_on_reload(void **state)
{
    const char *path = tp_write("timers.lua", timers_src);
    mg_policy_t *p = tp_policy(path);
    mg_policy_set_stats_fn(p, record_cancel, NULL, NULL);
    tp_run_for(60);
    uint64_t now = mg__policy_now_ms(p);
    mg_dict_value_t v;
    assert_true(mg__dict_get(p->dict, "ticks", 5, now, &v));
    double ticks = v.num;
    assert_true(ticks >= 2);
    assert_true(mg__dict_get(p->dict, "after", 5, now, &v));
    assert_string_equal(v.str, "fired");
    assert_false(mg__dict_get(p->dict, "cancelled_by_id", 15, now, &v));

    /* The new state has no timers of its own. */
    tp_write("timers.lua", "return {}\n");
    assert_int_equal(mg_policy_reload(p, NULL, 0), 0);
    assert_true(mg__dict_get(p->dict, "every_cancelled", 15, now, &v));
    assert_string_equal(v.str, "reload");
    assert_true(mg__dict_get(p->dict, "late", 4, now, &v));
    assert_string_equal(v.str, "reload");
    tp_run_for(30);
    assert_true(mg__dict_get(p->dict, "ticks", 5, now, &v));
    assert_true(v.num == ticks);
    assert_int_equal(mg__policy_live_states(), 1);

    /* Shutdown cancels too. */
    tp_write("timers.lua", timers_src);
    assert_int_equal(mg_policy_reload(p, NULL, 0), 0);
    cancelled_reason[0] = '\0';
    tp_free(p);
    assert_string_equal(cancelled_reason, "every:shutdown");
}

static void test_timer_errors_are_bounded(void **state)
{
    mg_policy_t *p = tp_policy_src("timer_err.lua",
        "local mg = require 'moongate'\n"
        "mg.after(1, function() while true do end end)\n"
        "mg.every(1, function() mg.dict.incr('n'); error('tick') end)\n"
        "return {}\n");
    tp_capture_begin();
    tp_run_for(120);
    char *log = tp_capture_end();
    assert_non_null(strstr(log, "time budget of 50 ms exceeded"));
    assert_non_null(strstr(log, "timer_err.lua:3: tick"));
    free(log);
    mg_dict_value_t v;
    assert_true(mg__dict_get(p->dict, "n", 1, mg__policy_now_ms(p), &v));
    assert_true(v.num >= 2);
    tp_free(p);
}

/* ---- the dictionary across reloads ---- */

static void test_dict_survives_reload(void **state)
{
    const char *path = tp_write("dict.lua",
        "local mg = require 'moongate'\n"
        "return { authenticate = function()\n"
        "  local n = mg.dict.incr('count')\n"
        "  mg.dict.set('name', 'v' .. n)\n"
        "  return 'u' .. n\n"
        "end }\n");
    mg_policy_t *p = tp_policy(path);
    mg_policy_decision_t d;
    assert_int_equal(tp_auth(p, NULL, &d), 0);
    assert_int_equal(tp_auth(p, NULL, &d), 0);
    assert_string_equal(d.user, "u2");
    assert_int_equal(mg_policy_reload(p, NULL, 0), 0);
    assert_int_equal(tp_auth(p, NULL, &d), 0);
    assert_string_equal(d.user, "u3");
    mg_dict_value_t v;
    assert_true(mg__dict_get(p->dict, "name", 4, mg__policy_now_ms(p), &v));
    assert_string_equal(v.str, "v3");
    tp_free(p);
}

int main(void)
{
    mg_log_set_level(MG_LOG_INFO);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_default_lua_dir_in_the_build_tree),
        cmocka_unit_test_setup_teardown(test_default_authenticate_refuses_without_tokens, tp_setup, tp_teardown),
        cmocka_unit_test_setup_teardown(test_default_authenticate_with_tokens, tp_setup, tp_teardown),
        cmocka_unit_test_setup_teardown(test_default_bad_token_spec_fails_load, tp_setup, tp_teardown),
        cmocka_unit_test_setup_teardown(test_default_admit_limits_route_shutdown, tp_setup, tp_teardown),
        cmocka_unit_test_setup_teardown(test_default_route_from_env, tp_setup, tp_teardown),
        cmocka_unit_test_setup_teardown(test_custom_hooks, tp_setup, tp_teardown),
        cmocka_unit_test_setup_teardown(test_repeated_headers_are_joined, tp_setup, tp_teardown),
        cmocka_unit_test_setup_teardown(test_wrong_result_types, tp_setup, tp_teardown),
        cmocka_unit_test_setup_teardown(test_hook_not_a_function, tp_setup, tp_teardown),
        cmocka_unit_test_setup_teardown(test_hook_that_throws, tp_setup, tp_teardown),
        cmocka_unit_test_setup_teardown(test_runaway_hook_is_stopped, tp_setup, tp_teardown),
        cmocka_unit_test_setup_teardown(test_allocation_bomb, tp_setup, tp_teardown),
        cmocka_unit_test_setup_teardown(test_reload_success_and_failure, tp_setup, tp_teardown),
        cmocka_unit_test_setup_teardown(test_request_in_flight_across_reload, tp_setup, tp_teardown),
        cmocka_unit_test_setup_teardown(test_free_with_request_in_flight, tp_setup, tp_teardown),
        cmocka_unit_test_setup_teardown(test_timers_cancelled_on_reload, tp_setup, tp_teardown),
        cmocka_unit_test_setup_teardown(test_timer_errors_are_bounded, tp_setup, tp_teardown),
        cmocka_unit_test_setup_teardown(test_dict_survives_reload, tp_setup, tp_teardown),
        cmocka_unit_test_setup_teardown(test_route_rules_and_credential, tp_setup, tp_teardown),
    };
    int rc = cmocka_run_group_tests(tests, NULL, NULL);
    tp_cleanup_dir();
    return rc;
}
