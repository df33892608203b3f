/*
 * The gateway knowing what it carries, end to end: the real moongate program, a real sshd, and
 * mg-upstream playing Ollama and an OpenAI-compatible server (tests/support/llm_fake.h) while
 * capturing every byte it receives.
 *
 *   - credentials: the header authenticate read never reaches the upstream unless the route
 *     lets it through; a route's header rules set and remove fields and override Host;
 *   - usage: NDJSON, SSE and JSON responses served byte for byte as the upstream sent them,
 *     their usage in the policy's "request" event, the access log and /metrics, with the exact
 *     counts; nothing for a response without usage or with a broken record; streams paced as
 *     the upstream sent them;
 *   - error bodies in OpenAI's shape under /v1 and the plain (Ollama's) one elsewhere, and the
 *     real openai and ollama npm clients reading them (tests/sdk/sdk_check.mjs), and streams
 *     with their usage;
 *   - a route's idle timeout cutting a stream that went quiet, and its head timeout waiting
 *     longer than the global one.
 */
#include "gwtest.h"

#define ALICE "Authorization: Bearer alice-token\r\n"

typedef struct world {
    mg_test_sshd_t sshd;
    mg_test_upstream_t up;   /* with capture */
    gw_t gw;
} world_t;

static void write_policy(const world_t *w, const char *path)
{
    char route[2048];
    gw_route_fields(route, sizeof(route), &w->sshd, w->up.port);
    char text[8192];
    int n = snprintf(
        text, sizeof(text),
        "local mg = require \"moongate\"\n"
        "return {\n"
        "  authenticate = function(req)\n"
        "    local t = req.headers[\"authorization\"]\n"
        "    if t == \"Bearer alice-token\" then return \"alice\" end\n"
        "    if t == \"Bearer bob-token\" then return \"bob\" end\n"
        "    if t == \"Bearer carol-token\" then return \"carol\" end\n"
        "    if req.headers[\"x-api-key\"] == \"dave-key\" then\n"
        "      return \"dave\", { credential = \"x-api-key\" }\n"
        "    end\n"
        "    if t == \"Bearer limited-token\" then return \"limited\" end\n"
        "    if t == \"Bearer erin-token\" then return \"erin\" end\n"
        "    return nil, 401, \"bad or missing token\"\n"
        "  end,\n"
        "  admit = function(req, user)\n"
        "    if user == \"limited\" then\n"
        "      return false, 429, \"slow down\", { [\"retry-after\"] = \"7\" }\n"
        "    end\n"
        "    return true\n"
        "  end,\n"
        "  route = function(req, user)\n"
        "    local r = { %s }\n"
        "    if user == \"bob\" then\n"
        "      r.headers = { authorization = \"Bearer vllm-key\", origin = false,\n"
        "                    [\"x-added\"] = \"yes\" }\n"
        "      r.host_header = \"localhost:11434\"\n"
        "      r.idle_timeout_ms = 1000\n"
        "    elseif user == \"erin\" then\n"
        "      r.target_port = 1\n" /* nothing listens there */
        "      r.error_format = \"openai\"\n"
        "    elseif user == \"carol\" then\n"
        "      r.forward_credential = true\n"
        "      r.head_timeout_ms = 5000\n"
        "    end\n"
        "    return r\n"
        "  end,\n"
        "  on_event = function(ev)\n"
        "    if ev.type == \"request\" then\n"
        "      mg.info(string.format(\"usage user=%%s path=%%s status=%%d model=%%s prompt=%%s \"\n"
        "        .. \"completion=%%s\", ev.user or \"-\", ev.path, ev.status, ev.model or \"-\",\n"
        "        tostring(ev.prompt_tokens), tostring(ev.completion_tokens)))\n"
        "      mg.info(string.format(\"bytes path=%%s in=%%d out=%%d ttfb=%%s id=%%s\", ev.path,\n"
        "        ev.bytes_in, ev.bytes_out, ev.ttfb_ms and \"yes\" or \"no\", ev.message))\n"
        "    end\n"
        "  end,\n"
        "}\n",
        route);
    assert_true(n > 0 && n < (int)sizeof(text));
    assert_int_equal(mg_test_write_file(path, text, (size_t)n, 0600), 0);
}

static int group_setup(void **state)
{
    world_t *w = calloc(1, sizeof(*w));
    if (w == NULL || mg_test_sshd_start(&w->sshd, NULL) != 0 ||
        mg_test_upstream_start_capture(&w->up) != 0)
        return -1;
    *state = w;
    return 0;
}

static int group_teardown(void **state)
{
    world_t *w = *state;
    gw_kill(&w->gw);
    mg_test_upstream_stop(&w->up);
    mg_test_sshd_stop(&w->sshd);
    free(w);
    mg_test_cleanup_all();
    return 0;
}

static gw_t *gateway(world_t *w)
{
    if (!w->gw.running) {
        gw_prepare(&w->gw);
        write_policy(w, w->gw.policy);
        static const char *const env[] = { "UPSTREAM_HEAD_TIMEOUT=1000",
                                           "MOONGATE_METRICS_PER_USER=2", NULL };
        gw_launch(&w->gw, "127.0.0.1:0", env);
    }
    gw_assert_alive(&w->gw);
    return &w->gw;
}

/* One POST to port (the gateway's or the upstream's), its response kept in r. */
static int post(uint16_t port, const char *path, const char *headers, const char *body,
                mg_test_http_response_t *r, int timeout_ms)
{
    char *req = NULL;
    size_t len = 0;
    assert_int_equal(mg_test_http_request(&req, &len, "POST", path, headers, body, strlen(body)),
                     0);
    mg_test_http_response_init(r);
    r->keep_body = true;
    int rc = gw_exchange(port, req, len, r, timeout_ms, NULL);
    free(req);
    return rc;
}

/* What reached the upstream since the last call. */
static char *upstream_saw(world_t *w)
{
    char *out = NULL;
    assert_int_equal(mg_test_upstream_captured(&w->up, &out, NULL), 0);
    assert_int_equal(mg_test_upstream_capture_clear(&w->up), 0);
    return out;
}

static void expect_in(const char *hay, const char *needle, bool present, const char *who)
{
    bool found = strstr(hay, needle) != NULL;
    if (found != present)
        fail_msg("%s: \"%s\" %s upstream; it saw:\n%s", who, needle,
                 present ? "did not arrive" : "arrived", hay);
}

/* ---- credentials and header rules ---- */

static void test_credentials_and_header_rules(void **state)
{
    world_t *w = *state;
    gw_t *g = gateway(w);
    mg_test_http_response_t r;
    assert_int_equal(mg_test_upstream_capture_clear(&w->up), 0);

    /* alice: the gateway's token stays here; everything else goes on. */
    int rc = post(g->port, "/echo", ALICE "Origin: https://app.example\r\n", "{}", &r, 10000);
    gw_expect_status(g, rc, &r, 200, "alice");
    mg_test_http_response_free(&r);
    char *up = upstream_saw(w);
    expect_in(up, "alice-token", false, "alice");
    expect_in(up, "\r\nAuthorization:", false, "alice");
    expect_in(up, "\r\nOrigin: https://app.example\r\n", true, "alice");
    free(up);

    /* bob's route: its own Authorization for the upstream, no Origin, a Host of its own. */
    rc = post(g->port, "/echo",
              "Authorization: Bearer bob-token\r\nOrigin: https://app.example\r\n"
              "X-Added: from the client\r\n", "{}", &r, 10000);
    gw_expect_status(g, rc, &r, 200, "bob");
    mg_test_http_response_free(&r);
    up = upstream_saw(w);
    expect_in(up, "bob-token", false, "bob");
    expect_in(up, "\r\nauthorization: Bearer vllm-key\r\n", true, "bob");
    expect_in(up, "Origin", false, "bob");
    expect_in(up, "from the client", false, "bob");
    expect_in(up, "\r\nx-added: yes\r\n", true, "bob");
    expect_in(up, "\r\nHost: localhost:11434\r\n", true, "bob");
    free(up);

    /* carol's route lets her credential through. */
    rc = post(g->port, "/echo", "Authorization: Bearer carol-token\r\n", "{}", &r, 10000);
    gw_expect_status(g, rc, &r, 200, "carol");
    mg_test_http_response_free(&r);
    up = upstream_saw(w);
    expect_in(up, "\r\nAuthorization: Bearer carol-token\r\n", true, "carol");
    free(up);

    /* dave authenticates with X-Api-Key: that goes, his own Authorization stays. */
    rc = post(g->port, "/echo", "X-Api-Key: dave-key\r\nAuthorization: Bearer sk-upstream\r\n",
              "{}", &r, 10000);
    gw_expect_status(g, rc, &r, 200, "dave");
    mg_test_http_response_free(&r);
    up = upstream_saw(w);
    expect_in(up, "dave-key", false, "dave");
    expect_in(up, "\r\nAuthorization: Bearer sk-upstream\r\n", true, "dave");
    free(up);
}

/* ---- usage ---- */

typedef struct llm_case {
    const char *path;
    const char *body;
    const char *ctype;        /* NULL: the request's default */
    const char *log;          /* the event's line; NULL: no usage */
    bool streamed;            /* X-Accel-Buffering: no expected */
} llm_case_t;

/* The same request straight to the upstream and through the gateway: the same body back. */
static void expect_served_unchanged(world_t *w, gw_t *g, const llm_case_t *c)
{
    char headers[256];
    snprintf(headers, sizeof(headers), ALICE "Content-Type: %s\r\n",
             c->ctype ? c->ctype : "application/json");
    mg_test_http_response_t direct, via;
    int rc = post(w->up.port, c->path, headers, c->body, &direct, 10000);
    assert_int_equal(rc, 0);
    assert_int_equal(direct.status, 200);
    rc = post(g->port, c->path, headers, c->body, &via, 10000);
    gw_expect_status(g, rc, &via, 200, c->path);
    if (via.body_received != direct.body_received ||
        memcmp(via.body, direct.body, (size_t)direct.body_received) != 0)
        fail_msg("%s: the body through the gateway differs from the upstream's:\n%s\n---\n%s",
                 c->path, via.body, direct.body);
    const char *xab = mg_test_http_response_header(&via, "x-accel-buffering");
    if (c->streamed) {
        assert_non_null(xab);
        assert_string_equal(xab, "no");
        /* Cache-Control as the upstream sent it (the fake's streams say no-cache). */
        const char *cc = mg_test_http_response_header(&direct, "cache-control");
        const char *got = mg_test_http_response_header(&via, "cache-control");
        assert_true((cc == NULL) == (got == NULL));
        if (cc)
            assert_string_equal(got, cc);
    } else {
        assert_null(xab);
    }
    mg_test_http_response_free(&direct);
    mg_test_http_response_free(&via);
}

static void test_usage_accounting(void **state)
{
    world_t *w = *state;
    gw_t *g = gateway(w);
    static const llm_case_t cases[] = {
        /* Ollama, streamed: the last NDJSON line. */
        { "/api/chat",
          "{\"model\":\"llama3.1:8b\",\"messages\":[{\"role\":\"user\",\"content\":\"one two "
          "three\"}]}",
          NULL, "usage user=alice path=/api/chat status=200 model=llama3.1:8b prompt=3 "
                "completion=5", true },
        /* Ollama, one record of some 36 KB (its context): the counts are in its tail. */
        { "/api/generate?context=3000&tokens=7",
          "{\"model\":\"qwen2.5:7b\",\"prompt\":\"a b\",\"stream\":false}", NULL,
          "usage user=alice path=/api/generate?context=3000&tokens=7 status=200 "
          "model=qwen2.5:7b prompt=2 completion=7", false },
        /* OpenAI-compatible, streamed with include_usage: the event with "usage". */
        { "/v1/chat/completions?tokens=4",
          "{\"model\":\"gpt-oss:20b\",\"stream\":true,\"stream_options\":{\"include_usage\":"
          "true},\"messages\":[{\"role\":\"user\",\"content\":\"x\"}]}",
          NULL, "usage user=alice path=/v1/chat/completions?tokens=4 status=200 "
                "model=gpt-oss:20b prompt=1 completion=4", true },
        /* Streamed without include_usage: nothing to read. */
        { "/v1/chat/completions?tokens=3",
          "{\"model\":\"gpt-oss:20b\",\"stream\":true,\"messages\":[]}", NULL,
          "usage user=alice path=/v1/chat/completions?tokens=3 status=200 model=- prompt=nil "
          "completion=nil", true },
        /* A broken record served as it came, and not counted. */
        { "/echo", "{\"done\":true,\"eval_count\":\"many\",\"prompt_eval_count\":[\n{{{\n",
          "application/x-ndjson",
          "usage user=alice path=/echo status=200 model=- prompt=nil completion=nil", true },
    };
    double prompt0 = gw_metric(g, "moongate_tokens_total{kind=\"prompt\"}");
    double completion0 = gw_metric(g, "moongate_tokens_total{kind=\"completion\"}");
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        expect_served_unchanged(w, g, &cases[i]);
        if (!gw_wait_log(g, cases[i].log, 1, 5000)) {
            gw_print_log_tail(g, 20);
            fail_msg("no event line \"%s\"", cases[i].log);
        }
    }
    assert_true(gw_wait_log(g, "model=llama3.1:8b prompt_tokens=3 completion_tokens=5", 1, 2000));
    /* The echo: as many bytes back as went up, a first byte, and the request's id. */
    char line[128];
    snprintf(line, sizeof(line), "bytes path=/echo in=%zu out=%zu ttfb=yes id=",
             strlen(cases[4].body), strlen(cases[4].body));
    assert_true(gw_wait_log(g, line, 1, 5000)); /* the event's second line: it may lag */
    assert_true(gw_log_count(g, "model=qwen2.5:7b prompt_tokens=2 completion_tokens=7") == 1);
    assert_true(gw_metric(g, "moongate_tokens_total{kind=\"prompt\"}") - prompt0 == 3 + 2 + 1);
    assert_true(gw_metric(g, "moongate_tokens_total{kind=\"completion\"}") - completion0 == 5 + 7 + 4);
    assert_true(gw_metric(g, "moongate_model_requests_total{family=\"llama\"}") == 1);
    assert_true(gw_metric(g, "moongate_model_requests_total{family=\"qwen\"}") == 1);
    assert_true(gw_metric(g, "moongate_model_requests_total{family=\"gpt\"}") == 1);
    /* MOONGATE_METRICS_PER_USER=2: alice and bob came first (test_credentials_and_header_rules),
       carol and dave count as one. */
    assert_true(gw_metric(g, "moongate_user_prompt_tokens_total{user=\"alice\"}") == 6);
    assert_true(gw_metric(g, "moongate_user_completion_tokens_total{user=\"alice\"}") == 16);
    assert_true(gw_metric(g, "moongate_user_requests_total{user=\"bob\"}") == 1);
    assert_true(gw_metric(g, "moongate_user_requests_total{user=\"(other)\"}") == 2);
    assert_true(gw_metric(g, "moongate_user_requests_total{user=\"carol\"}") == -1);
    assert_int_equal(mg_test_upstream_capture_clear(&w->up), 0);
}

/*
 * Reading usage must not hold a stream back: every piece arrives on its own, as far from the
 * one before as the upstream sent them (bench scenario 2 measures the same to the millisecond;
 * a test allows for a loaded machine and a sanitizer build).
 */
static void expect_paced(gw_t *g, const char *method, const char *path, const char *body,
                         int pieces, int interval_ms)
{
    char *req = NULL;
    size_t len = 0;
    assert_int_equal(mg_test_http_request(&req, &len, method, path,
                                          ALICE "Content-Type: application/json\r\n", body,
                                          body ? strlen(body) : 0), 0);
    mg_test_http_response_t r;
    mg_test_http_response_init(&r);
    static gw_arrivals_t arr;
    memset(&arr, 0, sizeof(arr));
    int rc = gw_exchange(g->port, req, len, &r, 20000, &arr);
    free(req);
    gw_expect_status(g, rc, &r, 200, path);
    mg_test_http_response_free(&r);
    if (arr.n < pieces)
        fail_msg("%s: %d pieces arrived in %d reads: the stream was held back", path, pieces,
                 arr.n);
    double worst = 0;
    for (int i = 1; i < pieces; i++) {
        double excess = arr.t[i] - arr.t[i - 1] - interval_ms;
        if (excess < 0)
            excess = -excess;
        if (excess > worst)
            worst = excess;
    }
    print_message("%s: %d pieces, worst gap %.1f ms off the upstream's %d ms\n", path, pieces,
                  worst, interval_ms);
    assert_true(worst < 40); /* a piece held back a whole interval would be 50 ms off */
}

static void test_stream_timing_unchanged(void **state)
{
    world_t *w = *state;
    gw_t *g = gateway(w);
    expect_paced(g, "GET", "/stream?chunks=15&interval_ms=50", NULL, 15, 50);
    expect_paced(g, "POST", "/v1/chat/completions?tokens=15&interval_ms=50",
                 "{\"model\":\"m\",\"stream\":true,\"stream_options\":{\"include_usage\":true},"
                 "\"messages\":[]}", 15, 50);
    expect_paced(g, "POST", "/api/chat?tokens=15&interval_ms=50",
                 "{\"model\":\"m\",\"messages\":[]}", 15, 50);
    assert_int_equal(mg_test_upstream_capture_clear(&w->up), 0);
}

/* ---- examples/policies/token_quota.lua in the real gateway ---- */

static void test_quota_example(void **state)
{
    world_t *w = *state;
    gw_t q;
    gw_prepare(&q);
    char *text = NULL;
    size_t len = 0;
    assert_int_equal(mg_test_read_file(MG_SOURCE_DIR "/examples/policies/token_quota.lua", &text,
                                       &len), 0);
    assert_int_equal(mg_test_write_file(q.policy, text, len, 0600), 0);
    free(text);
    char e[8][MG_TEST_PATH_MAX + 32];
    snprintf(e[0], sizeof(e[0]), "MOONGATE_SSH_PORT=%u", (unsigned)w->sshd.port);
    snprintf(e[1], sizeof(e[1]), "MOONGATE_SSH_USER=%s", w->sshd.user);
    snprintf(e[2], sizeof(e[2]), "MOONGATE_SSH_KEY=%s", w->sshd.client_key);
    snprintf(e[3], sizeof(e[3]), "MOONGATE_KNOWN_HOSTS=%s", w->sshd.known_hosts);
    snprintf(e[4], sizeof(e[4]), "MOONGATE_TARGET_PORT=%u", (unsigned)w->up.port);
    const char *env[] = { e[0], e[1], e[2], e[3], e[4], "MOONGATE_SSH_HOST=127.0.0.1",
                          "MOONGATE_TOKENS=alice:alice-token", "MOONGATE_DAILY_TOKENS=20",
                          NULL };
    gw_launch(&q, "127.0.0.1:0", env);
    /* Each chat costs 3 + 5 tokens: 8, 16, 24. The quota of 20 is used up after the third. */
    static const char body[] =
        "{\"model\":\"llama3.1:8b\",\"messages\":[{\"role\":\"user\",\"content\":\"one two three\"}]}";
    mg_test_http_response_t r;
    for (int i = 0; i < 3; i++) {
        int rc = post(q.port, "/api/chat", ALICE, body, &r, 10000);
        gw_expect_status(&q, rc, &r, 200, "under the quota");
        mg_test_http_response_free(&r);
        /* The event that counts the tokens comes as the request ends: wait for its log line. */
        assert_true(gw_wait_log(&q, "completion_tokens=5", i + 1, 5000));
    }
    int rc = post(q.port, "/api/chat", ALICE, body, &r, 10000);
    gw_expect_status(&q, rc, &r, 429, "past the quota");
    static const char want[] = "{\"error\":\"daily token quota of 20 used up\",\"request_id\":\"";
    if (strncmp(r.body, want, sizeof(want) - 1) != 0)
        fail_msg("the refusal: %s", r.body);
    assert_non_null(mg_test_http_response_header(&r, "retry-after"));
    mg_test_http_response_free(&r);
    rc = post(q.port, "/v1/chat/completions", ALICE, "{}", &r, 10000);
    gw_expect_status(&q, rc, &r, 429, "past the quota, OpenAI's shape");
    long retry = atol(mg_test_http_response_header(&r, "retry-after"));
    assert_true(retry >= 1 && retry <= 86400);
    assert_non_null(strstr(r.body, "\"code\":\"rate_limit_exceeded\""));
    mg_test_http_response_free(&r);
    gw_stop(&q);
}

/* ---- error bodies ---- */

static void test_error_shapes(void **state)
{
    world_t *w = *state;
    gw_t *g = gateway(w);
    mg_test_http_response_t r;
    int rc = post(g->port, "/v1/chat/completions", "X-Request-Id: req-openai-1\r\n", "{}", &r,
                  5000);
    gw_expect_status(g, rc, &r, 401, "no token under /v1");
    assert_true(gw_json_valid(r.body, (size_t)r.body_received));
    assert_non_null(strstr(r.body, "{\"error\":{\"message\":\"bad or missing token\","
                                    "\"type\":\"authentication_error\",\"param\":null,"
                                    "\"code\":\"invalid_api_key\","
                                    "\"request_id\":\"req-openai-1\"}}"));
    assert_string_equal(mg_test_http_response_header(&r, "x-request-id"), "req-openai-1");
    mg_test_http_response_free(&r);

    rc = post(g->port, "/api/chat", "X-Request-Id: req-ollama-1\r\n", "{}", &r, 5000);
    gw_expect_status(g, rc, &r, 401, "no token under /api");
    assert_string_equal(r.body,
                        "{\"error\":\"bad or missing token\",\"request_id\":\"req-ollama-1\"}");
    mg_test_http_response_free(&r);

    /* erin's route says "openai": her upstream's failure under /api takes OpenAI's shape. */
    rc = post(g->port, "/api/chat", "Authorization: Bearer erin-token\r\n", "{}", &r, 10000);
    gw_expect_status(g, rc, &r, 502, "erin, nothing listening");
    assert_true(gw_json_valid(r.body, (size_t)r.body_received));
    static const char open_obj[] = "{\"error\":{\"message\":";
    if (strncmp(r.body, open_obj, sizeof(open_obj) - 1) != 0 ||
        !strstr(r.body, "\"type\":\"server_error\",\"param\":null,\"code\":\"bad_gateway\""))
        fail_msg("erin's error: %s", r.body);
    mg_test_http_response_free(&r);
}

/* ---- timeouts ---- */

static void test_route_timeouts(void **state)
{
    world_t *w = *state;
    gw_t *g = gateway(w);
    /* bob's stream pauses 3 s between lines; his route allows 1 s of silence. */
    char *req = NULL;
    size_t len = 0;
    assert_int_equal(mg_test_http_request(&req, &len, "GET", "/stream?chunks=3&interval_ms=3000",
                                          "Authorization: Bearer bob-token\r\n", NULL, 0),
                     0);
    mg_test_http_response_t r;
    mg_test_http_response_init(&r);
    double t0 = mg_test_now_ms();
    int rc = gw_exchange(g->port, req, len, &r, 10000, NULL);
    double took = mg_test_now_ms() - t0;
    free(req);
    assert_int_equal(r.status, 200);
    assert_false(r.complete);
    assert_int_equal(rc, MG_ECLOSED);
    assert_true(took > 900 && took < 2900);
    mg_test_http_response_free(&r);
    assert_true(gw_wait_log(g, "sent nothing for 1000 ms mid-response", 1, 2000));

    /* A cold model: the head comes after 2 s. The global timeout (1 s) gives up; carol's
       route waits 5 s. */
    static const char body[] = "{\"model\":\"slow\",\"stream\":false}";
    rc = post(g->port, "/api/generate?delay_ms=2000", ALICE, body, &r, 10000);
    gw_expect_status(g, rc, &r, 504, "alice, cold model");
    mg_test_http_response_free(&r);
    rc = post(g->port, "/api/generate?delay_ms=2000", "Authorization: Bearer carol-token\r\n",
              body, &r, 10000);
    gw_expect_status(g, rc, &r, 200, "carol, cold model");
    assert_non_null(strstr(r.body, "\"done\":true"));
    mg_test_http_response_free(&r);
}

/* ---- the real clients ---- */

static void test_real_sdks(void **state)
{
    world_t *w = *state;
    gw_t *g = gateway(w);
    if (system("command -v npm >/dev/null 2>&1 && command -v node >/dev/null 2>&1") != 0) {
        print_message("SKIPPED: npm or node is not installed (scripts/install-deps.sh installs "
                      "them), so the openai and ollama clients cannot run\n");
        skip();
    }
    /* The clients are installed once per build tree, from the lock file, and again only when
       it changes. */
    const char *dir = MG_BINARY_DIR "/tests/sdk-node";
    char cmd[4096];
    snprintf(cmd, sizeof(cmd),
             "set -e; d='%s'; s='%s/tests/sdk'; mkdir -p \"$d\";"
             " cp \"$s/package.json\" \"$s/package-lock.json\" \"$s/sdk_check.mjs\" \"$d/\";"
             " if ! cmp -s \"$d/package-lock.json\" \"$d/node_modules/.moongate-lock\"; then"
             "   (cd \"$d\" && timeout 300 npm ci --no-audit --no-fund --silent) >&2;"
             "   cp \"$d/package-lock.json\" \"$d/node_modules/.moongate-lock\"; fi",
             dir, MG_SOURCE_DIR);
    if (system(cmd) != 0)
        fail_msg("npm ci in %s failed: is the npm registry reachable?", dir);
    char out[MG_TEST_PATH_MAX];
    assert_int_equal(mg_test_path_join(out, sizeof(out), g->dir, "sdk_check.out"), 0);
    snprintf(cmd, sizeof(cmd), "cd '%s' && timeout 60 node sdk_check.mjs http://127.0.0.1:%u "
             "> '%s' 2>&1", dir, (unsigned)g->port, out);
    int rc = system(cmd);
    char *text = NULL;
    assert_int_equal(mg_test_read_file(out, &text, NULL), 0);
    print_message("%s", text);
    bool ok = rc == 0 && strstr(text, " passed, 0 failed") != NULL;
    free(text);
    if (!ok) {
        gw_print_log_tail(g, 20);
        fail_msg("the openai and ollama clients did not read the gateway as they should");
    }
}

static void test_exits_cleanly(void **state)
{
    world_t *w = *state;
    gw_stop(gateway(w));
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_credentials_and_header_rules),
        cmocka_unit_test(test_usage_accounting),
        cmocka_unit_test(test_stream_timing_unchanged),
        cmocka_unit_test(test_quota_example),
        cmocka_unit_test(test_error_shapes),
        cmocka_unit_test(test_route_timeouts),
        cmocka_unit_test(test_real_sdks),
        cmocka_unit_test(test_exits_cleanly),
    };
    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
