/*
 * Tests of src/policy/policy_jwt.c through moongate.jwt_verify(): valid, expired, not yet valid,
 * tampered and malformed tokens.
 */
#include "test_policy_util.h"

static const char jwt_policy[] =
    "local mg = require 'moongate'\n"
    "return { authenticate = function(req)\n"
    "  local tok = (req.headers.authorization or ''):match('^Bearer (.+)$') or ''\n"
    "  local leeway = req.path == '/leeway' and 30 or 0\n"
    "  local claims, why = mg.jwt_verify(tok, 'k3y', { leeway = leeway })\n"
    "  if not claims then return nil, 401, why end\n"
    "  if claims.roles then\n"
    "    assert(claims.roles[1] == 'a' and claims.roles[2] == 'b' and claims.n.x == 1.5)\n"
    "    assert(claims.t == true and claims.f == false and claims.z == nil)\n"
    "  end\n"
    "  return claims.sub\n"
    "end }\n";

#define HS256 "{\"alg\":\"HS256\",\"typ\":\"JWT\"}"

static mg_policy_t *jwt_policy_new(void)
{
    mg_policy_t *p = tp_policy_src("jwt.lua", jwt_policy);
    mg_policy_set_clock(p, tp_clock, NULL);
    return p;
}

/* Authenticates token (on path) and returns the decision's user or message. */
static const char *check(mg_policy_t *p, const char *token, const char *path)
{
    static mg_policy_decision_t d;
    tp_req_t r;
    const mg_policy_request_t *req = tp_request(&r, token);
    r.req.path = path != NULL ? path : "/";
    mg_policy_state_t *st = mg_policy_acquire(p);
    assert_int_equal(mg_policy_authenticate(st, req, &d), 0);
    mg_policy_release(st);
    return d.allow ? d.user : d.message;
}

static long now_s(void)
{
    return (long)(tp_clock_ms / 1000);
}

static void test_jwt_valid(void **state)
{
    mg_policy_t *p = jwt_policy_new();
    char payload[512], tok[4096];
    snprintf(payload, sizeof(payload),
             "{\"sub\":\"alice\",\"exp\":%ld,\"nbf\":%ld,\"roles\":[\"a\",\"b\"],"
             "\"n\":{\"x\":1.5},\"t\":true,\"f\":false,\"z\":null}", now_s() + 60, now_s() - 10);
    make_jwt(HS256, payload, "k3y", tok);
    assert_string_equal(check(p, tok, NULL), "alice");

    /* Escapes decode; no exp or nbf is fine. */
    make_jwt("{ \"alg\" : \"HS256\" }", "{\"sub\":\"\\u0061li\\u0063e\",\"x\":\"\\ud83d\\ude00\\n\"}",
             "k3y", tok);
    assert_string_equal(check(p, tok, NULL), "alice");
    tp_free(p);
}

static void test_jwt_expired(void **state)
{
    mg_policy_t *p = jwt_policy_new();
    char payload[512], tok[4096];
    snprintf(payload, sizeof(payload), "{\"sub\":\"alice\",\"exp\":%ld}", now_s() - 10);
    make_jwt(HS256, payload, "k3y", tok);
    assert_string_equal(check(p, tok, NULL), "expired");
    assert_string_equal(check(p, tok, "/leeway"), "alice");
    snprintf(payload, sizeof(payload), "{\"sub\":\"alice\",\"exp\":%ld}", now_s());
    make_jwt(HS256, payload, "k3y", tok);
    assert_string_equal(check(p, tok, NULL), "expired");

    snprintf(payload, sizeof(payload), "{\"sub\":\"alice\",\"nbf\":%ld}", now_s() + 10);
    make_jwt(HS256, payload, "k3y", tok);
    assert_string_equal(check(p, tok, NULL), "not yet valid");
    assert_string_equal(check(p, tok, "/leeway"), "alice");

    make_jwt(HS256, "{\"sub\":\"alice\",\"exp\":\"tomorrow\"}", "k3y", tok);
    assert_string_equal(check(p, tok, NULL), "malformed: exp and nbf must be numbers");
    tp_free(p);
}

static void test_jwt_tampered(void **state)
{
    mg_policy_t *p = jwt_policy_new();
    char tok[4096], other[4096];
    make_jwt(HS256, "{\"sub\":\"alice\"}", "k3y", tok);
    assert_string_equal(check(p, tok, NULL), "alice");

    /* Another payload under the first signature. */
    make_jwt(HS256, "{\"sub\":\"admin\"}", "k3y", other);
    char *sig = strrchr(tok, '.');
    char *osig = strrchr(other, '.');
    memcpy(osig, sig, strlen(sig) + 1);
    assert_string_equal(check(p, other, NULL), "bad signature");

    make_jwt(HS256, "{\"sub\":\"alice\"}", "wrong", other);
    assert_string_equal(check(p, other, NULL), "bad signature");

    /* A flipped signature bit, and a truncated signature. */
    strcpy(other, tok);
    char *last = other + strlen(other) - 2;
    *last = *last == 'A' ? 'B' : 'A';
    assert_string_equal(check(p, other, NULL), "bad signature");
    strcpy(other, tok);
    other[strlen(other) - 3] = '\0';
    assert_string_equal(check(p, other, NULL), "bad signature");

    /* The header cannot choose another algorithm. */
    make_jwt("{\"alg\":\"none\"}", "{\"sub\":\"alice\"}", "k3y", other);
    assert_string_equal(check(p, other, NULL), "unsupported algorithm (only HS256)");
    make_jwt("{\"alg\":\"HS512\"}", "{\"sub\":\"alice\"}", "k3y", other);
    assert_string_equal(check(p, other, NULL), "unsupported algorithm (only HS256)");
    tp_free(p);
}

static void test_jwt_malformed(void **state)
{
    mg_policy_t *p = jwt_policy_new();
    assert_string_equal(check(p, "abc", NULL), "malformed: not three parts");
    assert_string_equal(check(p, "a.b", NULL), "malformed: not three parts");
    assert_string_equal(check(p, "a.b.c.d", NULL), "malformed: not three parts");
    assert_string_equal(check(p, "!!!!.eyJ9.abc", NULL), "malformed: not base64url");
    assert_string_equal(check(p, "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ4In0=.abc", NULL),
                        "malformed: not base64url");
    char tok[4096];
    make_jwt("not json", "{}", "k3y", tok);
    assert_string_equal(check(p, tok, NULL), "malformed: header is not a JSON object");
    make_jwt("[\"alg\"]", "{}", "k3y", tok);
    assert_string_equal(check(p, tok, NULL), "malformed: header is not a JSON object");
    make_jwt(HS256, "{\"sub\":\"alice\"", "k3y", tok);
    assert_string_equal(check(p, tok, NULL), "malformed: claims are not a JSON object");
    make_jwt(HS256, "{\"sub\":\"alice\"} x", "k3y", tok);
    assert_string_equal(check(p, tok, NULL), "malformed: claims are not a JSON object");
    /* A claim given twice is refused, not read as the first or the last. */
    make_jwt(HS256, "{\"sub\":\"alice\",\"sub\":\"mallory\"}", "k3y", tok);
    assert_string_equal(check(p, tok, NULL), "malformed: claims are not a JSON object");
    /* Nesting deeper than the reader allows. */
    char deep[256] = "{\"a\":";
    for (int i = 0; i < 40; i++)
        strcat(deep, "[");
    make_jwt(HS256, deep, "k3y", tok);
    assert_string_equal(check(p, tok, NULL), "malformed: claims are not a JSON object");
    assert_string_equal(check(p, "", NULL), "malformed: bad length");
    tp_free(p);
}

int main(void)
{
    mg_log_set_level(MG_LOG_WARN);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_jwt_valid, tp_setup, tp_teardown),
        cmocka_unit_test_setup_teardown(test_jwt_expired, tp_setup, tp_teardown),
        cmocka_unit_test_setup_teardown(test_jwt_tampered, tp_setup, tp_teardown),
        cmocka_unit_test_setup_teardown(test_jwt_malformed, tp_setup, tp_teardown),
    };
    int rc = cmocka_run_group_tests(tests, NULL, NULL);
    tp_cleanup_dir();
    return rc;
}
