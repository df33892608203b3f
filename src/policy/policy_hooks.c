/*
 * The hooks: plain C data in, validated C values out.
 *
 * Each entry point pushes the hook and its arguments as fresh Lua values (the policy keeps no
 * reference to C memory), calls it through mg__policy_pcall(), and reads the results back
 * strictly: a result of the wrong type or out of range is an error that names the hook and the
 * file:line where it is defined, and the request it was deciding fails closed.
 *
 * The memory limit applies only while Lua code runs (inside the call); the few allocations made
 * here to build arguments and read results are not capped, so they cannot raise an error outside
 * a protected call.
 */
#include "policy_int.h"

#include "moongate/error.h"
#include "moongate/http1.h"
#include "moongate/log.h"

#include <lauxlib.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define LOG "policy"

static void copy_bytes(char *dst, size_t cap, const char *src, size_t n)
{
    if (n >= cap)
        n = cap - 1;
    memcpy(dst, src, n);
    dst[n] = '\0';
}

static void decision_clear(mg_policy_decision_t *d)
{
    d->allow = false;
    d->status = 0;
    d->user[0] = '\0';
    d->message[0] = '\0';
    d->nheaders = 0;
    d->credential[0] = '\0';
}

/* The answer to a request whose hook failed: refused, and nothing about why for the client. */
static void decision_fail(mg_policy_decision_t *d)
{
    decision_clear(d);
    d->status = 500;
    copy_bytes(d->message, sizeof(d->message), "policy error", 12);
}

static int bad_result(mg_policy_state_t *st, mg_hook_t h, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static int bad_result(mg_policy_state_t *st, mg_hook_t h, const char *fmt, ...)
{
    char msg[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    mg_log_error(LOG, "%s (%s) returned a bad result: %s", mg__hook_names[h], st->hook_where[h],
                 msg);
    return MG_EINVAL;
}

/*   in: ...        out: ... req
 * A request with a seq gets the table its earlier hooks got: the state keeps the tables of the
 * last MG_POLICY_REQ_SLOTS requests (by seq), enough for the requests whose hooks wait for
 * Redis at the same time. */
static void push_request(mg_policy_state_t *st, const mg_policy_request_t *req)
{
    lua_State *L = st->L;
    unsigned slot = req != NULL ? (unsigned)(req->seq % MG_POLICY_REQ_SLOTS) : 0;
    if (req != NULL && req->seq != 0 && req->seq == st->req_seq[slot] &&
        st->req_ref[slot] != LUA_NOREF) {
        lua_rawgeti(L, LUA_REGISTRYINDEX, st->req_ref[slot]);
        return;
    }
    lua_createtable(L, 0, 5);
    if (req == NULL) {
        lua_newtable(L);
        lua_setfield(L, -2, "headers");
        return;
    }
    if (req->method != NULL) {
        lua_pushstring(L, req->method);
        lua_setfield(L, -2, "method");
    }
    if (req->path != NULL) {
        lua_pushstring(L, req->path);
        lua_setfield(L, -2, "path");
    }
    if (req->decoded_path != NULL) {
        lua_pushstring(L, req->decoded_path);
        lua_setfield(L, -2, "decoded_path");
    }
    if (req->remote_addr != NULL) {
        lua_pushstring(L, req->remote_addr);
        lua_setfield(L, -2, "remote_addr");
    }
    /* ... req headers */
    lua_createtable(L, 0, (int)req->nheaders);
    for (size_t i = 0; i < req->nheaders; i++) {
        const mg_policy_header_t *hd = &req->headers[i];
        if (hd->name == NULL || hd->value == NULL)
            continue;
        lua_pushstring(L, hd->name);
        lua_pushvalue(L, -1);
        lua_rawget(L, -3);
        /* ... req headers name old */
        if (lua_isstring(L, -1)) {
            /* A repeated header reads as one, its values joined as HTTP allows. */
            lua_pushliteral(L, ", ");
            lua_pushstring(L, hd->value);
            lua_concat(L, 3);
        } else {
            lua_pop(L, 1);
            lua_pushstring(L, hd->value);
        }
        lua_rawset(L, -3);
    }
    lua_setfield(L, -2, "headers");
    if (req->seq != 0) {
        /* ... req req: the registry keeps the second. */
        lua_pushvalue(L, -1);
        if (st->req_ref[slot] == LUA_NOREF)
            st->req_ref[slot] = luaL_ref(L, LUA_REGISTRYINDEX);
        else
            lua_rawseti(L, LUA_REGISTRYINDEX, st->req_ref[slot]);
        st->req_seq[slot] = req->seq;
    }
}

/* Reads an integer that must be whole and within [min, max]. */
static bool to_int(lua_State *L, int idx, double min, double max, double *out)
{
    if (lua_type(L, idx) != LUA_TNUMBER)
        return false;
    double v = lua_tonumber(L, idx);
    if (v != floor(v) || v < min || v > max)
        return false;
    *out = v;
    return true;
}

static bool header_name_ok(const char *s, size_t n)
{
    if (n == 0 || n >= MG_POLICY_HEADER_NAME_MAX)
        return false;
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        if (!((c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || strchr("!#$%&'*+-.^_`|~", c)))
            return false;
    }
    return true;
}

/* Rejects control characters: a value must not be able to smuggle in a header of its own. */
static bool value_ok(const char *s, size_t n, size_t max)
{
    if (n > max)
        return false;
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        if ((c < 0x20 && c != '\t') || c == 0x7f)
            return false;
    }
    return true;
}

static bool header_value_ok(const char *s, size_t n)
{
    return value_ok(s, n, MG_POLICY_HEADER_VALUE_MAX - 1);
}

/*
 * Reads a refusal: status, message and headers at idx, idx+1, idx+2 (each may be nil).
 *
 *   in: ... (results)        out: ... (unchanged)
 */
static int read_refusal(mg_policy_state_t *st, mg_hook_t h, int idx, int default_status,
                        const char *default_message, mg_policy_decision_t *out)
{
    lua_State *L = st->L;
    decision_clear(out);
    double status = default_status;
    if (!lua_isnil(L, idx) && !to_int(L, idx, 400, 599, &status))
        return bad_result(st, h, "the status of a refusal must be a whole number from 400 to "
                                 "599, got %s", luaL_typename(L, idx));
    out->status = (int)status;
    size_t n;
    const char *msg = default_message;
    n = strlen(msg);
    if (lua_type(L, idx + 1) == LUA_TSTRING)
        msg = lua_tolstring(L, idx + 1, &n);
    else if (!lua_isnil(L, idx + 1))
        return bad_result(st, h, "the message of a refusal must be a string, got %s",
                          luaL_typename(L, idx + 1));
    copy_bytes(out->message, sizeof(out->message), msg, n);

    int t = idx + 2;
    if (lua_isnil(L, t))
        return 0;
    if (!lua_istable(L, t))
        return bad_result(st, h, "the headers of a refusal must be a table, got %s",
                          luaL_typename(L, t));
    lua_pushnil(L);
    while (lua_next(L, t) != 0) {
        /* ... key value */
        size_t kn = 0, vn = 0;
        const char *k = lua_type(L, -2) == LUA_TSTRING ? lua_tolstring(L, -2, &kn) : NULL;
        int vt = lua_type(L, -1);
        const char *v = vt == LUA_TSTRING || vt == LUA_TNUMBER ? lua_tolstring(L, -1, &vn) : NULL;
        if (k == NULL || !header_name_ok(k, kn) || v == NULL || !header_value_ok(v, vn)) {
            int rc = bad_result(st, h, "header %s must have a lower-case token name and a "
                                       "string or number value without control characters",
                                k != NULL ? k : "(not a string)");
            lua_pop(L, 2);
            return rc;
        }
        if (out->nheaders == MG_POLICY_MAX_HEADERS) {
            lua_pop(L, 2);
            return bad_result(st, h, "a refusal may carry at most %d headers",
                              MG_POLICY_MAX_HEADERS);
        }
        mg_policy_out_header_t *oh = &out->headers[out->nheaders++];
        copy_bytes(oh->name, sizeof(oh->name), k, kn);
        copy_bytes(oh->value, sizeof(oh->value), v, vn);
        lua_pop(L, 1);
    }
    return 0;
}

static int check_fields(mg_policy_state_t *st, mg_hook_t h, int t, const char *const *names,
                        int seen);

/*
 * Reads what authenticate says about the user it named, {credential = "x-api-key" | false},
 * at idx (nil: the defaults).
 */
static int read_user_opts(mg_policy_state_t *st, mg_hook_t h, int idx, mg_policy_decision_t *out)
{
    static const char *const names[] = { "credential", NULL };
    lua_State *L = st->L;
    copy_bytes(out->credential, sizeof(out->credential), "authorization", 13);
    if (lua_isnil(L, idx))
        return 0;
    if (!lua_istable(L, idx))
        return bad_result(st, h, "the second result with a user must be a table "
                                 "{credential = ...} or nil, got %s", luaL_typename(L, idx));
    int seen = 0;
    lua_getfield(L, idx, "credential");
    seen += !lua_isnil(L, -1);
    int rc = 0;
    if (lua_type(L, -1) == LUA_TBOOLEAN && !lua_toboolean(L, -1)) {
        out->credential[0] = '\0';
    } else if (lua_type(L, -1) == LUA_TSTRING) {
        size_t n;
        const char *c = lua_tolstring(L, -1, &n);
        if (!header_name_ok(c, n) || !mg_http1_field_editable(c, n))
            rc = bad_result(st, h, "credential must name a request header in lower case that "
                                   "the gateway does not set itself, got \"%.*s\"",
                            (int)(n > 64 ? 64 : n), c);
        else
            copy_bytes(out->credential, sizeof(out->credential), c, n);
    } else if (!lua_isnil(L, -1)) {
        rc = bad_result(st, h, "credential must be a header name or false, got %s",
                        luaL_typename(L, -1));
    }
    lua_pop(L, 1);
    return rc ? rc : check_fields(st, h, idx, names, seen);
}

/*
 * Reads "user[, opts]" or "nil, status, message, headers" at idx..idx+3. Only authenticate's
 * user carries options (with_opts).
 */
static int read_user(mg_policy_state_t *st, mg_hook_t h, int idx, bool with_opts,
                     mg_policy_decision_t *out)
{
    lua_State *L = st->L;
    int t = lua_type(L, idx);
    if (t == LUA_TSTRING) {
        size_t n;
        const char *user = lua_tolstring(L, idx, &n);
        if (!mg__policy_user_id_valid(user, n))
            return bad_result(st, h, "\"%.*s\" is not a valid user id (1 to %d letters, digits "
                                     "and . _ - @ + :)", (int)(n > 64 ? 64 : n), user,
                              MG_USER_ID_MAX);
        decision_clear(out);
        out->allow = true;
        copy_bytes(out->user, sizeof(out->user), user, n);
        return with_opts ? read_user_opts(st, h, idx + 1, out) : 0;
    }
    if (t == LUA_TNIL || (t == LUA_TBOOLEAN && !lua_toboolean(L, idx)))
        return read_refusal(st, h, idx + 1, 401, "Unauthorized", out);
    return bad_result(st, h, "must return a user id (string), or nil, status, message, headers; "
                             "got %s", luaL_typename(L, idx));
}

/*
 * Pushes hook h of st, calls it with the nargs values pushed after it, and leaves nres
 * results. Returns the call's code.
 *
 *   in: ... fn a1..an        out (0): ... r1..rnres        out (<0): ...
 */
static int call_hook(mg_policy_state_t *st, mg_hook_t h, int nargs, int nres)
{
    return mg__policy_pcall(st, mg__hook_names[h], st->hook_where[h], nargs, nres,
                            st->policy->opts.hook_timeout_ms);
}

int mg_policy_agent_auth(mg_policy_state_t *st, const char *token,
                         const mg_policy_request_t *req, mg_policy_decision_t *out)
{
    lua_State *L = st->L;
    lua_rawgeti(L, LUA_REGISTRYINDEX, st->hook_ref[MG_HOOK_AGENT_AUTH]);
    if (token != NULL)
        lua_pushstring(L, token);
    else
        lua_pushnil(L);
    push_request(st, req);
    int rc = call_hook(st, MG_HOOK_AGENT_AUTH, 2, 4);
    if (rc == 0)
        rc = read_user(st, MG_HOOK_AGENT_AUTH, 2, false, out);
    if (rc != 0)
        decision_fail(out);
    lua_settop(L, 1);
    return rc;
}

/*   in: ...        out: ... stats */
static void push_user_stats(lua_State *L, mg_policy_t *p, const char *user)
{
    mg_pool_user_stats_t s;
    memset(&s, 0, sizeof(s));
    bool known = p->user_stats_fn != NULL && user != NULL &&
                 p->user_stats_fn(p->stats_ctx, user, &s) == 0;
    if (!known)
        memset(&s, 0, sizeof(s));
    lua_createtable(L, 0, 9);
    lua_pushinteger(L, s.leases - s.idle_leases + s.waiters);
    lua_setfield(L, -2, "in_flight");
    lua_pushinteger(L, s.waiters);
    lua_setfield(L, -2, "queued");
    lua_pushinteger(L, s.connections);
    lua_setfield(L, -2, "connections");
    lua_pushinteger(L, s.opening);
    lua_setfield(L, -2, "opening");
    lua_pushinteger(L, s.leases - s.idle_leases);
    lua_setfield(L, -2, "channels");
    lua_pushinteger(L, s.idle_leases);
    lua_setfield(L, -2, "idle_channels");
    lua_pushboolean(L, known);
    lua_setfield(L, -2, "known");
    if (known) {
        lua_pushinteger(L, s.limits.max_connections);
        lua_setfield(L, -2, "max_connections");
        lua_pushinteger(L, s.limits.max_channels);
        lua_setfield(L, -2, "max_channels");
    }
}

void mg__policy_push_user_stats(lua_State *L, mg_policy_t *p, const char *user)
{
    push_user_stats(L, p, user);
}

/* ---- tables of fields (route, limits, shutdown) ---- */

/*
 * Fails on a key that is not in names: a misspelt field must not silently take a default.
 * seen is how many of the names the field readers found; when the table holds just as many
 * keys, none is unknown and no name needs comparing (the usual, fast case).
 */
static int check_fields(mg_policy_state_t *st, mg_hook_t h, int t, const char *const *names,
                        int seen)
{
    lua_State *L = st->L;
    int keys = 0;
    lua_pushnil(L);
    while (lua_next(L, t) != 0) {
        lua_pop(L, 1);
        keys++;
    }
    if (keys == seen)
        return 0;
    lua_pushnil(L);
    while (lua_next(L, t) != 0) {
        lua_pop(L, 1);
        bool known = false;
        if (lua_type(L, -1) == LUA_TSTRING) {
            for (int i = 0; names[i] != NULL && !known; i++)
                known = strcmp(lua_tostring(L, -1), names[i]) == 0;
        }
        if (!known) {
            int rc = bad_result(st, h, "unknown field %s%s",
                                lua_type(L, -1) == LUA_TSTRING ? lua_tostring(L, -1) : "of type ",
                                lua_type(L, -1) == LUA_TSTRING ? "" : luaL_typename(L, -1));
            lua_pop(L, 1);
            return rc;
        }
    }
    return 0;
}

/* Reads t.name as a string into buf; absent leaves buf as it is. */
static int field_str(mg_policy_state_t *st, mg_hook_t h, int t, const char *name, char *buf,
                     size_t cap, int *seen)
{
    lua_State *L = st->L;
    int rc = 0;
    lua_getfield(L, t, name);
    *seen += !lua_isnil(L, -1);
    if (lua_type(L, -1) == LUA_TSTRING) {
        size_t n;
        const char *s = lua_tolstring(L, -1, &n);
        if (n >= cap || memchr(s, '\0', n) != NULL)
            rc = bad_result(st, h, "field %s must be a string shorter than %zu bytes, without "
                                   "NUL", name, cap);
        else
            copy_bytes(buf, cap, s, n);
    } else if (!lua_isnil(L, -1)) {
        rc = bad_result(st, h, "field %s must be a string, got %s", name, luaL_typename(L, -1));
    }
    lua_pop(L, 1);
    return rc;
}

static int field_num(mg_policy_state_t *st, mg_hook_t h, int t, const char *name, double min,
                     double max, double *out, int *seen)
{
    lua_State *L = st->L;
    int rc = 0;
    lua_getfield(L, t, name);
    *seen += !lua_isnil(L, -1);
    if (!lua_isnil(L, -1) && !to_int(L, -1, min, max, out)) {
        /* lua_tostring would turn the number on the stack into a string: read it as a number. */
        if (lua_type(L, -1) == LUA_TNUMBER)
            rc = bad_result(st, h, "field %s must be a whole number from %.0f to %.0f, got "
                                   "number %.14g", name, min, max, lua_tonumber(L, -1));
        else
            rc = bad_result(st, h, "field %s must be a whole number from %.0f to %.0f, got %s",
                            name, min, max, luaL_typename(L, -1));
    }
    lua_pop(L, 1);
    return rc;
}

static int field_bool(mg_policy_state_t *st, mg_hook_t h, int t, const char *name, bool *out,
                      int *seen)
{
    lua_State *L = st->L;
    int rc = 0;
    lua_getfield(L, t, name);
    *seen += !lua_isnil(L, -1);
    if (lua_type(L, -1) == LUA_TBOOLEAN)
        *out = lua_toboolean(L, -1);
    else if (!lua_isnil(L, -1))
        rc = bad_result(st, h, "field %s must be a boolean, got %s", name, luaL_typename(L, -1));
    lua_pop(L, 1);
    return rc;
}

static bool fingerprint_ok(const char *s)
{
    if (strncmp(s, "SHA256:", 7) != 0)
        return false;
    size_t n = strlen(s + 7);
    if (n < 43 || n > 44)
        return false;
    for (const char *c = s + 7; *c != '\0'; c++) {
        if (!((*c >= 'A' && *c <= 'Z') || (*c >= 'a' && *c <= 'z') || (*c >= '0' && *c <= '9') ||
              *c == '+' || *c == '/' || *c == '='))
            return false;
    }
    return true;
}

/* A Host value: a name or address and maybe a port, nothing that could end the field. */
static bool host_value_ok(const char *s)
{
    if (*s == '\0')
        return false;
    for (; *s != '\0'; s++)
        if (!((*s >= 'a' && *s <= 'z') || (*s >= 'A' && *s <= 'Z') || (*s >= '0' && *s <= '9') ||
              strchr(".-_:[]", *s)))
            return false;
    return true;
}

static int rule_cmp(const mg_policy_header_rule_t *a, const mg_policy_header_rule_t *b,
                    const char *buf)
{
    size_t n = a->name_len < b->name_len ? a->name_len : b->name_len;
    int c = memcmp(buf + a->name_off, buf + b->name_off, n);
    return c != 0 ? c : (int)a->name_len - (int)b->name_len;
}

/*
 * Reads t.headers, {name = "value" (set) | false (remove)}, into the route's rules, sorted by
 * name so that the upstream sees them in an order that does not depend on Lua's table.
 *
 *   in: ... t        out: ... t
 */
static int read_header_rules(mg_policy_state_t *st, int t, mg_policy_route_t *r, int *seen)
{
    const mg_hook_t h = MG_HOOK_ROUTE;
    lua_State *L = st->L;
    lua_getfield(L, t, "headers");
    int ht = lua_gettop(L);
    int rc = 0;
    if (lua_isnil(L, ht)) {
        lua_pop(L, 1);
        return 0;
    }
    (*seen)++;
    if (!lua_istable(L, ht)) {
        rc = bad_result(st, h, "field headers must be a table {name = \"value\" | false}, got %s",
                        luaL_typename(L, ht));
        lua_pop(L, 1);
        return rc;
    }
    size_t used = 0;
    lua_pushnil(L);
    while (rc == 0 && lua_next(L, ht) != 0) {
        /* ... headers key value */
        size_t kn = 0, vn = 0;
        const char *k = lua_type(L, -2) == LUA_TSTRING ? lua_tolstring(L, -2, &kn) : NULL;
        int vt = lua_type(L, -1);
        bool remove = vt == LUA_TBOOLEAN && !lua_toboolean(L, -1);
        const char *v = vt == LUA_TSTRING || vt == LUA_TNUMBER ? lua_tolstring(L, -1, &vn) : NULL;
        if (k == NULL || !header_name_ok(k, kn) || !mg_http1_field_editable(k, kn))
            rc = bad_result(st, h, "headers: %s%s%s is not a header the route may set or "
                                   "remove "
                                   "(a lower-case name; not Host, Content-Length, "
                                   "Transfer-Encoding, Connection, hop-by-hop fields, Expect, "
                                   "X-Forwarded-For/-Proto or X-Request-Id)",
                            k != NULL ? "\"" : "a key of type ",
                            k != NULL ? k : luaL_typename(L, -2), k != NULL ? "\"" : "");
        else if (!remove && (v == NULL || !value_ok(v, vn, MG_ROUTE_HEADER_VALUE_MAX)))
            rc = bad_result(st, h, "headers.%s must be a string of at most %d bytes without "
                                   "control characters, or false to remove the header",
                            k, MG_ROUTE_HEADER_VALUE_MAX);
        else if (r->nrules == MG_ROUTE_HEADER_RULES_MAX)
            rc = bad_result(st, h, "headers: at most %d rules", MG_ROUTE_HEADER_RULES_MAX);
        else if (used + kn + (remove ? 0 : vn) > sizeof(r->rule_buf))
            rc = bad_result(st, h, "headers: the names and values must fit in %zu bytes",
                            sizeof(r->rule_buf));
        if (rc == 0) {
            mg_policy_header_rule_t *rule = &r->rules[r->nrules++];
            rule->remove = remove;
            rule->name_off = (uint16_t)used;
            rule->name_len = (uint16_t)kn;
            memcpy(r->rule_buf + used, k, kn);
            used += kn;
            rule->value_off = (uint16_t)used;
            rule->value_len = remove ? 0 : (uint16_t)vn;
            if (!remove)
                memcpy(r->rule_buf + used, v, vn);
            used += rule->value_len;
        }
        lua_pop(L, 1);
    }
    if (rc != 0)
        lua_pop(L, 1); /* the key lua_next left */
    lua_pop(L, 1);
    for (int i = 1; rc == 0 && i < r->nrules; i++)
        for (int j = i; j > 0 && rule_cmp(&r->rules[j - 1], &r->rules[j], r->rule_buf) > 0; j--) {
            mg_policy_header_rule_t tmp = r->rules[j];
            r->rules[j] = r->rules[j - 1];
            r->rules[j - 1] = tmp;
        }
    return rc;
}

/*   in: ... t        out: ... t */
static int read_route(mg_policy_state_t *st, int t, mg_policy_route_t *r)
{
    static const char *const names[] = {
        "transport", "host", "port", "ssh_user", "key", "key_passphrase", "known_hosts",
        "host_key", "target_host", "target_port", "headers", "host_header",
        "forward_credential", "head_timeout_ms", "idle_timeout_ms", "error_format", NULL,
    };
    const mg_hook_t h = MG_HOOK_ROUTE;
    int rc = 0, seen = 0;
    char transport[16] = "tcp";
    double port = 22, target_port = 11434;
    copy_bytes(r->target_host, sizeof(r->target_host), "127.0.0.1", 9);
    if (rc == 0)
        rc = field_str(st, h, t, "transport", transport, sizeof(transport), &seen);
    if (rc == 0)
        rc = field_str(st, h, t, "host", r->host, sizeof(r->host), &seen);
    if (rc == 0)
        rc = field_num(st, h, t, "port", 1, 65535, &port, &seen);
    if (rc == 0)
        rc = field_str(st, h, t, "ssh_user", r->ssh_user, sizeof(r->ssh_user), &seen);
    if (rc == 0)
        rc = field_str(st, h, t, "key", r->key, sizeof(r->key), &seen);
    if (rc == 0)
        rc = field_str(st, h, t, "key_passphrase", r->key_passphrase, sizeof(r->key_passphrase),
                       &seen);
    if (rc == 0)
        rc = field_str(st, h, t, "known_hosts", r->known_hosts, sizeof(r->known_hosts), &seen);
    if (rc == 0)
        rc = field_str(st, h, t, "host_key", r->host_key, sizeof(r->host_key), &seen);
    if (rc == 0)
        rc = field_str(st, h, t, "target_host", r->target_host, sizeof(r->target_host), &seen);
    if (rc == 0)
        rc = field_num(st, h, t, "target_port", 1, 65535, &target_port, &seen);
    if (rc == 0)
        rc = read_header_rules(st, t, r, &seen);
    if (rc == 0)
        rc = field_str(st, h, t, "host_header", r->host_header, sizeof(r->host_header), &seen);
    if (rc == 0)
        rc = field_bool(st, h, t, "forward_credential", &r->forward_credential, &seen);
    double head_timeout = 0, idle_timeout = 0;
    if (rc == 0)
        rc = field_num(st, h, t, "head_timeout_ms", 1000, 3600000, &head_timeout, &seen);
    if (rc == 0)
        rc = field_num(st, h, t, "idle_timeout_ms", 1000, 3600000, &idle_timeout, &seen);
    char format[16] = "auto";
    if (rc == 0)
        rc = field_str(st, h, t, "error_format", format, sizeof(format), &seen);
    if (rc == 0)
        rc = check_fields(st, h, t, names, seen);
    if (rc != 0)
        return rc;
    if (mg__policy_error_format_parse(format, &r->error_format) != 0)
        return bad_result(st, h, "field error_format must be \"openai\", \"ollama\", "
                                 "\"plain\" or \"auto\", got \"%s\"", format);
    if (r->host_header[0] != '\0' && !host_value_ok(r->host_header))
        return bad_result(st, h, "field host_header must be a host name or address, maybe "
                                 "with :port");
    r->head_timeout_ms = (uint32_t)head_timeout;
    r->idle_timeout_ms = (uint32_t)idle_timeout;
    r->port = (int)port;
    r->target_port = (int)target_port;
    if (strcmp(transport, "tcp") == 0)
        r->transport = MG_ROUTE_TCP;
    else if (strcmp(transport, "agent") == 0)
        r->transport = MG_ROUTE_AGENT;
    else
        return bad_result(st, h, "field transport must be \"tcp\" or \"agent\", got \"%s\"",
                          transport);
    if (r->transport == MG_ROUTE_TCP && r->host[0] == '\0')
        return bad_result(st, h, "field host is required for transport \"tcp\"");
    if (r->ssh_user[0] == '\0' || r->key[0] == '\0')
        return bad_result(st, h, "fields ssh_user and key are required");
    if (r->host_key[0] != '\0' && !fingerprint_ok(r->host_key))
        return bad_result(st, h, "field host_key must be a fingerprint \"SHA256:<base64>\"");
    if (r->host_key[0] == '\0' && r->known_hosts[0] == '\0')
        return bad_result(st, h, "the host key must be checked: give known_hosts or host_key");
    if (r->target_host[0] == '\0')
        return bad_result(st, h, "field target_host must not be empty");
    return 0;
}

/* ---- the request hooks, which may wait for Redis ---- */

/* One request hook's call: where its answer goes. */
typedef struct hook_call {
    mg_policy_state_t *st;
    mg_hook_t h;
    const char *user;            /* admit, route */
    mg_policy_decision_t *out;
    mg_policy_route_t *route;    /* route */
    mg_policy_done_fn done;
    void *ctx;
} hook_call_t;

/* Reads the hook's results (at 2..5 after a successful call) into the call's outputs. */
static int hook_read(const hook_call_t *hc, int rc)
{
    mg_policy_state_t *st = hc->st;
    lua_State *L = st->L;
    mg_policy_decision_t *out = hc->out;
    if (rc == 0) {
        int t = lua_type(L, 2);
        switch (hc->h) {
        case MG_HOOK_AUTHENTICATE:
            rc = read_user(st, MG_HOOK_AUTHENTICATE, 2, true, out);
            break;
        case MG_HOOK_ADMIT:
            if (t == LUA_TBOOLEAN && lua_toboolean(L, 2)) {
                decision_clear(out);
                out->allow = true;
                copy_bytes(out->user, sizeof(out->user), hc->user, strlen(hc->user));
            } else if (t == LUA_TBOOLEAN) {
                rc = read_refusal(st, MG_HOOK_ADMIT, 3, 403, "Forbidden", out);
            } else {
                rc = bad_result(st, MG_HOOK_ADMIT, "must return true, or false, status, "
                                                   "message, headers; got %s",
                                luaL_typename(L, 2));
            }
            break;
        default: /* MG_HOOK_ROUTE */
            if (t == LUA_TTABLE) {
                rc = read_route(st, 2, hc->route);
                if (rc == 0) {
                    decision_clear(out);
                    out->allow = true;
                    copy_bytes(out->user, sizeof(out->user), hc->user, strlen(hc->user));
                }
            } else if (t == LUA_TNIL || (t == LUA_TBOOLEAN && !lua_toboolean(L, 2))) {
                rc = read_refusal(st, MG_HOOK_ROUTE, 3, 503, "No route for this user", out);
            } else {
                rc = bad_result(st, MG_HOOK_ROUTE, "must return a table, or nil, status, "
                                                   "message, headers; got %s",
                                luaL_typename(L, 2));
            }
            break;
        }
    }
    if (rc != 0)
        decision_fail(out);
    if (hc->route != NULL && (rc != 0 || !out->allow))
        memset(hc->route, 0, sizeof(*hc->route));
    lua_settop(L, 1);
    return rc;
}

static void hook_waited(void *arg, int rc)
{
    hook_call_t *hc = arg;
    rc = hook_read(hc, rc);
    mg_policy_done_fn done = hc->done;
    void *ctx = hc->ctx;
    free(hc);
    done(ctx, rc);
}

/*   in: ... fn a1..an        out: ...
 * Calls the hook; its answer is read now, or by hook_waited when it waits for Redis. */
static int hook_run(const hook_call_t *tmpl, int nargs)
{
    mg_policy_state_t *st = tmpl->st;
    hook_call_t *hc = NULL;
    if (tmpl->done != NULL && st->policy->redis != NULL) {
        hc = malloc(sizeof(*hc));
        if (hc == NULL) {
            lua_pop(st->L, nargs + 1);
            decision_fail(tmpl->out);
            return MG_ENOMEM;
        }
        *hc = *tmpl;
    }
    int rc = mg__policy_pcall_wait(st, mg__hook_names[tmpl->h], st->hook_where[tmpl->h], nargs,
                                   4, st->policy->opts.hook_timeout_ms,
                                   hc != NULL ? hook_waited : NULL, hc);
    if (rc == MG_EAGAIN)
        return rc;
    free(hc);
    return hook_read(tmpl, rc);
}

int mg_policy_authenticate_wait(mg_policy_state_t *st, const mg_policy_request_t *req,
                                mg_policy_decision_t *out, mg_policy_done_fn done, void *ctx)
{
    lua_State *L = st->L;
    lua_rawgeti(L, LUA_REGISTRYINDEX, st->hook_ref[MG_HOOK_AUTHENTICATE]);
    push_request(st, req);
    hook_call_t hc = { .st = st, .h = MG_HOOK_AUTHENTICATE, .out = out, .done = done,
                       .ctx = ctx };
    return hook_run(&hc, 1);
}

int mg_policy_admit_wait(mg_policy_state_t *st, const mg_policy_request_t *req,
                         const char *user, mg_policy_decision_t *out, mg_policy_done_fn done,
                         void *ctx)
{
    lua_State *L = st->L;
    lua_rawgeti(L, LUA_REGISTRYINDEX, st->hook_ref[MG_HOOK_ADMIT]);
    push_request(st, req);
    lua_pushstring(L, user);
    push_user_stats(L, st->policy, user);
    hook_call_t hc = { .st = st, .h = MG_HOOK_ADMIT, .user = user, .out = out, .done = done,
                       .ctx = ctx };
    return hook_run(&hc, 3);
}

int mg_policy_route_wait(mg_policy_state_t *st, const mg_policy_request_t *req,
                         const char *user, mg_policy_route_t *route, mg_policy_decision_t *out,
                         mg_policy_done_fn done, void *ctx)
{
    lua_State *L = st->L;
    memset(route, 0, sizeof(*route));
    lua_rawgeti(L, LUA_REGISTRYINDEX, st->hook_ref[MG_HOOK_ROUTE]);
    push_request(st, req);
    lua_pushstring(L, user);
    hook_call_t hc = { .st = st, .h = MG_HOOK_ROUTE, .user = user, .out = out, .route = route,
                       .done = done, .ctx = ctx };
    return hook_run(&hc, 2);
}

int mg_policy_authenticate(mg_policy_state_t *st, const mg_policy_request_t *req,
                           mg_policy_decision_t *out)
{
    return mg_policy_authenticate_wait(st, req, out, NULL, NULL);
}

int mg_policy_admit(mg_policy_state_t *st, const mg_policy_request_t *req, const char *user,
                    mg_policy_decision_t *out)
{
    return mg_policy_admit_wait(st, req, user, out, NULL, NULL);
}

int mg_policy_route(mg_policy_state_t *st, const mg_policy_request_t *req, const char *user,
                    mg_policy_route_t *route, mg_policy_decision_t *out)
{
    return mg_policy_route_wait(st, req, user, route, out, NULL, NULL);
}

int mg_policy_limits(mg_policy_t *p, const char *user, mg_pool_limits_t *out)
{
    static const char *const names[] = {
        "max_connections", "max_channels", "idle_timeout_ms", "queue_max", "queue_timeout_ms",
        NULL,
    };
    const mg_hook_t h = MG_HOOK_LIMITS;
    mg_policy_state_t *st = mg_policy_acquire(p);
    lua_State *L = st->L;
    const mg_pool_limits_t *d = &p->opts.default_limits;
    *out = *d;
    lua_rawgeti(L, LUA_REGISTRYINDEX, st->hook_ref[h]);
    lua_pushstring(L, user);
    int rc = call_hook(st, h, 1, 1);
    if (rc == 0 && lua_istable(L, 2)) {
        double mc = d->max_connections, mch = d->max_channels, idle = (double)d->idle_timeout_ms,
               qm = d->queue_max, qt = (double)d->queue_timeout_ms;
        int seen = 0;
        rc = field_num(st, h, 2, "max_connections", 1, 1000, &mc, &seen);
        if (rc == 0)
            rc = field_num(st, h, 2, "max_channels", 1, 1000, &mch, &seen);
        if (rc == 0)
            rc = field_num(st, h, 2, "idle_timeout_ms", 1000, 86400000, &idle, &seen);
        if (rc == 0)
            rc = field_num(st, h, 2, "queue_max", 0, 100000, &qm, &seen);
        if (rc == 0)
            rc = field_num(st, h, 2, "queue_timeout_ms", 1, 600000, &qt, &seen);
        if (rc == 0)
            rc = check_fields(st, h, 2, names, seen);
        if (rc == 0) {
            out->max_connections = (int)mc;
            out->max_channels = (int)mch;
            out->idle_timeout_ms = (uint64_t)idle;
            out->queue_max = (int)qm;
            out->queue_timeout_ms = (uint64_t)qt;
        }
    } else if (rc == 0 && !lua_isnil(L, 2)) {
        rc = bad_result(st, h, "must return a table or nil, got %s", luaL_typename(L, 2));
    }
    if (rc != 0)
        *out = *d;
    lua_settop(L, 1);
    mg_policy_release(st);
    return rc;
}

int mg_policy_pool_limits_fn(void *ctx, const char *user, mg_pool_limits_t *out)
{
    return mg_policy_limits(ctx, user, out);
}

int mg_policy_shutdown(mg_policy_t *p, const mg_policy_shutdown_info_t *info,
                       mg_policy_shutdown_t *out)
{
    static const char *const names[] = {
        "grace_ms", "notify_clients", "force_after_grace", "message", NULL,
    };
    const mg_hook_t h = MG_HOOK_SHUTDOWN;
    mg_policy_state_t *st = mg_policy_acquire(p);
    lua_State *L = st->L;
    const mg_policy_shutdown_t *d = &p->opts.default_shutdown;
    *out = *d;
    lua_rawgeti(L, LUA_REGISTRYINDEX, st->hook_ref[h]);
    lua_createtable(L, 0, 3);
    if (info != NULL) {
        lua_pushstring(L, info->reason != NULL ? info->reason : "unknown");
        lua_setfield(L, -2, "reason");
        lua_pushinteger(L, info->in_flight);
        lua_setfield(L, -2, "in_flight");
        lua_pushinteger(L, info->connections);
        lua_setfield(L, -2, "connections");
    }
    int rc = call_hook(st, h, 1, 1);
    if (rc == 0 && lua_istable(L, 2)) {
        double grace = (double)d->grace_ms;
        int seen = 0;
        rc = field_num(st, h, 2, "grace_ms", 0, 3600000, &grace, &seen);
        if (rc == 0)
            rc = field_bool(st, h, 2, "notify_clients", &out->notify_clients, &seen);
        if (rc == 0)
            rc = field_bool(st, h, 2, "force_after_grace", &out->force_after_grace, &seen);
        if (rc == 0)
            rc = field_str(st, h, 2, "message", out->message, sizeof(out->message), &seen);
        if (rc == 0)
            rc = check_fields(st, h, 2, names, seen);
        out->grace_ms = (uint64_t)grace;
    } else if (rc == 0 && !lua_isnil(L, 2)) {
        rc = bad_result(st, h, "must return a table or nil, got %s", luaL_typename(L, 2));
    }
    if (rc != 0)
        *out = *d;
    lua_settop(L, 1);
    mg_policy_release(st);
    return rc;
}

static void set_str(lua_State *L, const char *k, const char *v)
{
    if (v == NULL)
        return;
    lua_pushstring(L, v);
    lua_setfield(L, -2, k);
}

/* A count or time, left out when it is not known (negative). */
static void set_num(lua_State *L, const char *k, double v)
{
    if (v < 0)
        return;
    lua_pushnumber(L, v);
    lua_setfield(L, -2, k);
}

/*   in: ... ev        out: ... ev (with the request's fields) */
static void push_request_info(lua_State *L, const mg_policy_request_info_t *ri)
{
    set_str(L, "method", ri->method);
    set_str(L, "path", ri->path);
    set_num(L, "status", ri->status);
    set_num(L, "bytes_in", (double)ri->bytes_in);
    set_num(L, "bytes_out", (double)ri->bytes_out);
    set_num(L, "ttfb_ms", ri->ttfb_ms);
    set_num(L, "duration_ms", ri->duration_ms);
    set_str(L, "model", ri->model);
    set_num(L, "prompt_tokens", (double)ri->prompt_tokens);
    set_num(L, "completion_tokens", (double)ri->completion_tokens);
    set_str(L, "outcome", ri->outcome);
}

int mg_policy_event(mg_policy_t *p, const mg_policy_event_t *ev)
{
    mg_policy_state_t *st = mg_policy_acquire(p);
    lua_State *L = st->L;
    lua_rawgeti(L, LUA_REGISTRYINDEX, st->hook_ref[MG_HOOK_ON_EVENT]);
    lua_createtable(L, 0, ev->request != NULL ? 15 : 4);
    lua_pushstring(L, ev->type != NULL ? ev->type : "unknown");
    lua_setfield(L, -2, "type");
    if (ev->user != NULL) {
        lua_pushstring(L, ev->user);
        lua_setfield(L, -2, "user");
    }
    if (ev->conn_id != 0) {
        lua_pushnumber(L, (lua_Number)ev->conn_id);
        lua_setfield(L, -2, "conn");
    }
    if (ev->message != NULL) {
        lua_pushstring(L, ev->message);
        lua_setfield(L, -2, "message");
    }
    if (ev->request != NULL)
        push_request_info(L, ev->request);
    /* It may wait for Redis (a quota counted in the shared dictionary); nobody waits for it. */
    int rc = mg__policy_pcall_wait(st, mg__hook_names[MG_HOOK_ON_EVENT],
                                   st->hook_where[MG_HOOK_ON_EVENT], 1, 0,
                                   st->policy->opts.hook_timeout_ms, mg__policy_call_forget,
                                   NULL);
    if (rc == MG_EAGAIN)
        rc = 0;
    lua_settop(L, 1);
    mg_policy_release(st);
    return rc;
}
