/*
 * The `moongate` Lua module: what a policy can ask of the gateway.
 *
 *   log, debug, info, warn, error     logging, with the caller's file:line
 *   now, now_ms, monotonic_ms         the clock
 *   env                               the environment
 *   stats, pool_stats                 the pool's numbers, through the stats provider
 *   every, after, cancel              timers on the loop
 *   dict.get/set/incr/delete/ttl/take_bucket/usage   the shared dictionary (policy_dict.c,
 *                                        or Redis: policy_redis.c); node_dict: always this node's
 *   jwt_verify, secure_compare        tokens (policy_jwt.c)
 *   defaults                          the limits and shutdown the gateway would use
 *
 * C functions find their state through the allocator's userdata (mg__policy_state_of), so no
 * C pointer is ever visible to Lua. Timers are referred to by number; their functions live in a
 * registry table keyed by that number.
 */
#include "policy_int.h"

#include "moongate/error.h"
#include "moongate/log.h"

#include <lauxlib.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/sha.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define LOG "policy"
#define TIMERS_KEY "moongate.timers"

/* ---- logging ---- */

/* Joins the arguments from index first with spaces, as print() would. */
static void log_args(lua_State *L, int first, mg_log_level_t level)
{
    if (!mg_log_enabled(level))
        return;
    luaL_Buffer b;
    luaL_buffinit(L, &b);
    int top = lua_gettop(L);
    for (int i = first; i <= top; i++) {
        if (i > first)
            luaL_addchar(&b, ' ');
        int t = lua_type(L, i);
        if (t == LUA_TSTRING || t == LUA_TNUMBER) {
            lua_pushvalue(L, i);
            luaL_addvalue(&b);
        } else if (t == LUA_TBOOLEAN) {
            luaL_addstring(&b, lua_toboolean(L, i) ? "true" : "false");
        } else {
            luaL_addstring(&b, luaL_typename(L, i));
        }
    }
    luaL_pushresult(&b);
    lua_Debug ar;
    char where[96] = "?";
    if (lua_getstack(L, 1, &ar) && lua_getinfo(L, "Sl", &ar))
        snprintf(where, sizeof(where), "%s:%d", ar.short_src, ar.currentline);
    mg_log(level, LOG, "%s: %s", where, lua_tostring(L, -1));
    lua_pop(L, 1);
}

static int l_log(lua_State *L)
{
    mg_log_level_t level;
    if (mg_log_level_parse(luaL_checkstring(L, 1), &level) != 0)
        return luaL_argerror(L, 1, "a level: error, warn, info, debug or trace");
    log_args(L, 2, level);
    return 0;
}

static int l_error(lua_State *L) { log_args(L, 1, MG_LOG_ERROR); return 0; }
static int l_warn(lua_State *L) { log_args(L, 1, MG_LOG_WARN); return 0; }
static int l_info(lua_State *L) { log_args(L, 1, MG_LOG_INFO); return 0; }
static int l_debug(lua_State *L) { log_args(L, 1, MG_LOG_DEBUG); return 0; }

/* ---- clock and environment ---- */

static int l_now(lua_State *L)
{
    lua_pushnumber(L, (lua_Number)mg__policy_now_ms(mg__policy_state_of(L)->policy) / 1000.0);
    return 1;
}

static int l_now_ms(lua_State *L)
{
    lua_pushnumber(L, (lua_Number)mg__policy_now_ms(mg__policy_state_of(L)->policy));
    return 1;
}

static int l_monotonic_ms(lua_State *L)
{
    lua_pushnumber(L, (lua_Number)(uv_hrtime() / 1000) / 1000.0);
    return 1;
}

static int l_env(lua_State *L)
{
    const char *v = getenv(luaL_checkstring(L, 1));
    if (v == NULL)
        lua_pushnil(L);
    else
        lua_pushstring(L, v);
    return 1;
}

/* ---- stats ---- */

static int l_stats(lua_State *L)
{
    mg__policy_push_user_stats(L, mg__policy_state_of(L)->policy, luaL_checkstring(L, 1));
    return 1;
}

static int l_pool_stats(lua_State *L)
{
    mg_policy_t *p = mg__policy_state_of(L)->policy;
    if (p->pool_stats_fn == NULL) {
        lua_pushnil(L);
        return 1;
    }
    mg_pool_stats_t s;
    memset(&s, 0, sizeof(s));
    p->pool_stats_fn(p->stats_ctx, &s);
    lua_createtable(L, 0, 7);
    lua_pushinteger(L, s.total_connections);
    lua_setfield(L, -2, "connections");
    lua_pushinteger(L, s.ready_connections);
    lua_setfield(L, -2, "ready");
    lua_pushinteger(L, s.users);
    lua_setfield(L, -2, "users");
    lua_pushinteger(L, s.leases - s.idle_leases);
    lua_setfield(L, -2, "channels");
    lua_pushinteger(L, s.idle_leases);
    lua_setfield(L, -2, "idle_channels");
    lua_pushinteger(L, s.waiters);
    lua_setfield(L, -2, "queued");
    lua_pushboolean(L, s.draining);
    lua_setfield(L, -2, "draining");
    return 1;
}

/* ---- timers ---- */

/* Unlinks t, forgets its function and closes its handle; the close callback frees it. */
static void timer_close_cb(uv_handle_t *h)
{
    mg_policy_timer_t *t = h->data;
    mg_policy_state_t *st = t->st;
    free(t);
    mg__policy_state_unref(st);
}

static void timer_remove(mg_policy_state_t *st, mg_policy_timer_t *t)
{
    if (t->closing)
        return;
    t->closing = true;
    mg_list_remove(&t->node);
    st->ntimers--;
    lua_getfield(st->L, LUA_REGISTRYINDEX, TIMERS_KEY);
    lua_pushnil(st->L);
    lua_rawseti(st->L, -2, (int)t->id);
    lua_pop(st->L, 1);
    uv_close((uv_handle_t *)&t->handle, timer_close_cb);
}

/*   in: ...        out: ... fn (or nil) */
static void push_timer_fn(mg_policy_state_t *st, mg_policy_timer_t *t)
{
    lua_getfield(st->L, LUA_REGISTRYINDEX, TIMERS_KEY);
    lua_rawgeti(st->L, -1, (int)t->id);
    lua_remove(st->L, -2);
}

static void timer_cb(uv_timer_t *h)
{
    mg_policy_timer_t *t = h->data;
    mg_policy_state_t *st = t->st;
    lua_State *L = st->L;
    st->refs++; /* the callback may cause a reload that retires st */
    push_timer_fn(st, t);
    char fn_where[160], where[200];
    mg__policy_where(L, -1, fn_where, sizeof(fn_where));
    snprintf(where, sizeof(where), "#%lld, %s", (long long)t->id, fn_where);
    if (!t->repeat)
        timer_remove(st, t); /* t stays allocated until its close callback */
    if (lua_isfunction(L, -1))
        (void)mg__policy_pcall_wait(st, "timer", where, 0, 0, st->policy->opts.hook_timeout_ms,
                                    mg__policy_call_forget, NULL);
    lua_settop(L, 1);
    mg__policy_state_unref(st);
}

static int timer_start(lua_State *L, bool repeat)
{
    mg_policy_state_t *st = mg__policy_state_of(L);
    double ms = luaL_checknumber(L, 1);
    luaL_checktype(L, 2, LUA_TFUNCTION);
    if (!(ms >= 1 && ms <= 86400000.0 * 30))
        return luaL_argerror(L, 1, "milliseconds from 1 to 30 days");
    if (st->retired) {
        lua_pushnil(L);
        lua_pushliteral(L, "the policy is being replaced");
        return 2;
    }
    if (st->ntimers >= st->policy->opts.max_timers) {
        lua_pushnil(L);
        lua_pushfstring(L, "too many timers (at most %d)", st->policy->opts.max_timers);
        return 2;
    }
    int64_t id = ++st->next_timer_id;
    /* The function is stored before the C side exists: storing may raise an error, and then
     * nothing has been allocated that could leak. */
    lua_getfield(L, LUA_REGISTRYINDEX, TIMERS_KEY);
    lua_pushvalue(L, 2);
    lua_rawseti(L, -2, (int)id);
    lua_pop(L, 1);
    mg_policy_timer_t *t = calloc(1, sizeof(*t));
    if (t == NULL || uv_timer_init(st->policy->loop, &t->handle) != 0) {
        free(t);
        lua_getfield(L, LUA_REGISTRYINDEX, TIMERS_KEY);
        lua_pushnil(L);
        lua_rawseti(L, -2, (int)id);
        lua_pushnil(L);
        lua_pushliteral(L, "out of memory");
        return 2;
    }
    t->handle.data = t;
    t->st = st;
    t->id = id;
    t->repeat = repeat;
    mg_list_insert_head(&st->timers, &t->node);
    st->ntimers++;
    st->refs++; /* dropped in timer_close_cb */
    uint64_t u = (uint64_t)ms;
    uv_timer_start(&t->handle, timer_cb, u, repeat ? u : 0);
    lua_pushnumber(L, (lua_Number)id);
    return 1;
}

static int l_every(lua_State *L) { return timer_start(L, true); }
static int l_after(lua_State *L) { return timer_start(L, false); }

static int l_cancel(lua_State *L)
{
    mg_policy_state_t *st = mg__policy_state_of(L);
    lua_Number id = luaL_checknumber(L, 1);
    mg_list_t *n;
    mg_list_foreach(n, &st->timers) {
        mg_policy_timer_t *t = mg_list_entry(n, mg_policy_timer_t, node);
        if ((lua_Number)t->id == id) {
            timer_remove(st, t);
            lua_pushboolean(L, 1);
            return 1;
        }
    }
    lua_pushboolean(L, 0);
    return 1;
}

void mg__policy_timers_cancel(mg_policy_state_t *st, const char *reason)
{
    if (st->L == NULL)
        return;
    lua_State *L = st->L;
    while (!mg_list_empty(&st->timers)) {
        mg_policy_timer_t *t =
            mg_list_entry(mg_list_first(&st->timers), mg_policy_timer_t, node);
        char fn_where[160], where[220];
        push_timer_fn(st, t);
        mg__policy_where(L, -1, fn_where, sizeof(fn_where));
        snprintf(where, sizeof(where), "#%lld, %s, cancelled: %s", (long long)t->id,
                 fn_where, reason);
        timer_remove(st, t);
        if (lua_isfunction(L, -1)) {
            lua_pushstring(L, reason);
            (void)mg__policy_pcall(st, "timer", where, 1, 0, st->policy->opts.hook_timeout_ms);
        }
        lua_settop(L, 1);
    }
}

/* ---- the dictionary ---- */

static uint64_t opt_ttl(lua_State *L, int idx)
{
    if (lua_isnoneornil(L, idx))
        return 0;
    double ttl = luaL_checknumber(L, idx);
    if (!(ttl >= 0 && ttl <= 1e15))
        luaL_argerror(L, idx, "a time to live in milliseconds, 0 or more");
    return (uint64_t)ttl;
}

static int dict_full(lua_State *L, mg_dict_t *d)
{
    size_t n, b, mn, mb;
    mg__dict_usage(d, &n, &b, &mn, &mb);
    lua_pushnil(L);
    lua_pushfstring(L, "dictionary full (%d of %d entries, %d of %d bytes)", (int)n, (int)mn,
                    (int)b, (int)mb);
    return 2;
}

static const char *check_key(lua_State *L, size_t *klen)
{
    const char *k = luaL_checklstring(L, 1, klen);
    if (*klen == 0 || *klen > MG_DICT_KEY_MAX)
        luaL_argerror(L, 1, "a key of 1 to 1024 bytes");
    return k;
}

/*
 * moongate.dict goes to Redis when the policy has it, moongate.node_dict never: the functions
 * are the same, and their upvalue says which table they belong to.
 */
static bool in_redis(lua_State *L, mg_policy_t *p)
{
    return p->shared_in_redis && !lua_toboolean(L, lua_upvalueindex(1));
}

static int l_dict_get(lua_State *L)
{
    mg_policy_t *p = mg__policy_state_of(L)->policy;
    size_t klen;
    const char *k = check_key(L, &klen);
    if (in_redis(L, p))
        return mg__policy_redis_call(L, &(mg__rdict_req_t){ .op = MG_RDICT_GET, .key = k,
                                                            .klen = klen });
    mg_dict_value_t v;
    if (!mg__dict_get(p->dict, k, klen, mg__policy_now_ms(p), &v))
        lua_pushnil(L);
    else if (v.type == MG_DICT_NUMBER)
        lua_pushnumber(L, v.num);
    else
        lua_pushlstring(L, v.str, v.len);
    return 1;
}

static int l_dict_set(lua_State *L)
{
    mg_policy_t *p = mg__policy_state_of(L)->policy;
    size_t klen;
    const char *k = check_key(L, &klen);
    mg_dict_value_t v = { 0 };
    const mg_dict_value_t *vp = &v;
    int t = lua_type(L, 2);
    if (t == LUA_TNUMBER) {
        v.type = MG_DICT_NUMBER;
        v.num = lua_tonumber(L, 2);
    } else if (t == LUA_TSTRING) {
        v.type = MG_DICT_STRING;
        v.str = lua_tolstring(L, 2, &v.len);
    } else if (t == LUA_TNIL || t == LUA_TNONE) {
        vp = NULL;
    } else {
        return luaL_argerror(L, 2, "a string, a number or nil");
    }
    uint64_t ttl = opt_ttl(L, 3);
    if (in_redis(L, p))
        return mg__policy_redis_call(L, &(mg__rdict_req_t){ .op = MG_RDICT_SET, .key = k,
                                                            .klen = klen, .has_value = vp != NULL,
                                                            .value = v, .ttl_ms = ttl });
    if (mg__dict_set(p->dict, k, klen, vp, ttl, mg__policy_now_ms(p)) != 0)
        return dict_full(L, p->dict);
    lua_pushboolean(L, 1);
    return 1;
}

static int l_dict_delete(lua_State *L)
{
    mg_policy_t *p = mg__policy_state_of(L)->policy;
    size_t klen;
    const char *k = check_key(L, &klen);
    if (in_redis(L, p))
        return mg__policy_redis_call(L, &(mg__rdict_req_t){ .op = MG_RDICT_DELETE, .key = k,
                                                            .klen = klen });
    (void)mg__dict_set(p->dict, k, klen, NULL, 0, mg__policy_now_ms(p));
    lua_pushboolean(L, 1);
    return 1;
}

static int l_dict_incr(lua_State *L)
{
    mg_policy_t *p = mg__policy_state_of(L)->policy;
    size_t klen;
    const char *k = check_key(L, &klen);
    double by = luaL_optnumber(L, 2, 1);
    uint64_t ttl = opt_ttl(L, 3);
    if (in_redis(L, p))
        return mg__policy_redis_call(L, &(mg__rdict_req_t){ .op = MG_RDICT_INCR, .key = k,
                                                            .klen = klen, .by = by,
                                                            .ttl_ms = ttl });
    double out;
    int rc = mg__dict_incr(p->dict, k, klen, by, ttl, mg__policy_now_ms(p), &out);
    if (rc == MG_EINVAL) {
        lua_pushnil(L);
        lua_pushliteral(L, "not a number");
        return 2;
    }
    if (rc != 0)
        return dict_full(L, p->dict);
    lua_pushnumber(L, out);
    return 1;
}

static int l_dict_ttl(lua_State *L)
{
    mg_policy_t *p = mg__policy_state_of(L)->policy;
    size_t klen;
    const char *k = check_key(L, &klen);
    if (in_redis(L, p))
        return mg__policy_redis_call(L, &(mg__rdict_req_t){ .op = MG_RDICT_TTL, .key = k,
                                                            .klen = klen });
    int64_t ttl = mg__dict_ttl(p->dict, k, klen, mg__policy_now_ms(p));
    if (ttl == -2)
        lua_pushnil(L);
    else
        lua_pushnumber(L, (lua_Number)ttl);
    return 1;
}

/* dict.take_bucket(key, n, interval, burst, now): true, full_at | false, debt | nil, err */
static int l_dict_take_bucket(lua_State *L)
{
    mg_policy_t *p = mg__policy_state_of(L)->policy;
    size_t klen;
    const char *k = check_key(L, &klen);
    double n = luaL_checknumber(L, 2), interval = luaL_checknumber(L, 3);
    double burst = luaL_checknumber(L, 4), now = luaL_checknumber(L, 5);
    luaL_argcheck(L, n >= 0 && n <= 1e9, 2, "0 to 1e9 tokens");
    luaL_argcheck(L, interval > 0 && interval <= 1e9, 3, "a positive interval");
    luaL_argcheck(L, burst >= 1 && burst <= 1e12, 4, "a burst of at least 1");
    luaL_argcheck(L, now >= 0 && now <= 1e12, 5, "seconds since the epoch");
    if (in_redis(L, p))
        return mg__policy_redis_call(L, &(mg__rdict_req_t){ .op = MG_RDICT_TAKE_BUCKET,
                                                            .key = k, .klen = klen, .n = n,
                                                            .interval = interval,
                                                            .burst = burst, .now = now });
    bool allowed;
    double value;
    int rc = mg__dict_take_bucket(p->dict, k, klen, n, interval, burst, now,
                                  mg__policy_now_ms(p), &allowed, &value);
    if (rc == MG_EINVAL) {
        lua_pushnil(L);
        lua_pushliteral(L, "not a number");
        return 2;
    }
    if (rc != 0)
        return dict_full(L, p->dict);
    lua_pushboolean(L, allowed);
    lua_pushnumber(L, value);
    return 2;
}

static int l_dict_usage(lua_State *L)
{
    mg_policy_t *p = mg__policy_state_of(L)->policy;
    size_t n, b, mn, mb;
    mg__dict_usage(p->dict, &n, &b, &mn, &mb);
    lua_createtable(L, 0, 4);
    lua_pushnumber(L, (lua_Number)n);
    lua_setfield(L, -2, "entries");
    lua_pushnumber(L, (lua_Number)b);
    lua_setfield(L, -2, "bytes");
    lua_pushnumber(L, (lua_Number)mn);
    lua_setfield(L, -2, "max_entries");
    lua_pushnumber(L, (lua_Number)mb);
    lua_setfield(L, -2, "max_bytes");
    return 1;
}

/* ---- tokens ---- */

static int l_jwt_verify(lua_State *L)
{
    mg_policy_t *p = mg__policy_state_of(L)->policy;
    size_t tlen, slen;
    const char *token = luaL_checklstring(L, 1, &tlen);
    const char *secret = luaL_checklstring(L, 2, &slen);
    double leeway = 0;
    if (lua_istable(L, 3)) {
        lua_getfield(L, 3, "leeway");
        leeway = luaL_optnumber(L, -1, 0);
        lua_pop(L, 1);
    }
    char reason[128];
    double now = (double)mg__policy_now_ms(p) / 1000.0;
    if (mg__jwt_verify_hs256(L, token, tlen, secret, slen, now, leeway, reason, sizeof(reason)) != 0) {
        lua_pushnil(L);
        lua_pushstring(L, reason);
        return 2;
    }
    return 1;
}

/*
 * SHA-256 through a digest context kept for the process: OpenSSL 3's one-shot SHA256() looks the
 * algorithm up (with locks) on every call, which cost more than the rest of a request's hooks.
 * Single-threaded, like the rest of the module.
 */
static void sha256(const void *data, size_t n, unsigned char out[SHA256_DIGEST_LENGTH])
{
    static EVP_MD *md;
    static EVP_MD_CTX *ctx;
    if (md == NULL)
        md = EVP_MD_fetch(NULL, "SHA256", NULL);
    if (ctx == NULL)
        ctx = EVP_MD_CTX_new();
    unsigned int len;
    if (md == NULL || ctx == NULL || EVP_DigestInit_ex(ctx, md, NULL) != 1 ||
        EVP_DigestUpdate(ctx, data, n) != 1 || EVP_DigestFinal_ex(ctx, out, &len) != 1)
        SHA256(data, n, out);
}

/* Compares digests rather than the strings, so the time taken says nothing about either, not
 * even where they first differ or how long the secret is. */
static int l_secure_compare(lua_State *L)
{
    size_t an, bn;
    const char *a = luaL_checklstring(L, 1, &an);
    const char *b = luaL_checklstring(L, 2, &bn);
    unsigned char da[SHA256_DIGEST_LENGTH], db[SHA256_DIGEST_LENGTH];
    sha256(a, an, da);
    sha256(b, bn, db);
    lua_pushboolean(L, CRYPTO_memcmp(da, db, sizeof(da)) == 0 && an == bn);
    return 1;
}

/* moongate.sha256(s [, "hex"]): for keying tables by a secret's digest instead of the secret. */
static int l_sha256(lua_State *L)
{
    size_t n;
    const char *s = luaL_checklstring(L, 1, &n);
    unsigned char d[SHA256_DIGEST_LENGTH];
    sha256(s, n, d);
    const char *fmt = luaL_optstring(L, 2, "raw");
    if (strcmp(fmt, "hex") == 0) {
        static const char digits[] = "0123456789abcdef";
        char hex[2 * SHA256_DIGEST_LENGTH];
        for (int i = 0; i < SHA256_DIGEST_LENGTH; i++) {
            hex[2 * i] = digits[d[i] >> 4];
            hex[2 * i + 1] = digits[d[i] & 15];
        }
        lua_pushlstring(L, hex, sizeof(hex));
    } else {
        lua_pushlstring(L, (const char *)d, sizeof(d));
    }
    return 1;
}

/* ---- for tests ---- */

/* moongate.debug_spin(ms): busy in C, where no time budget reaches (opts.debug_functions). */
static int l_debug_spin(lua_State *L)
{
    lua_Number ms = luaL_checknumber(L, 1);
    luaL_argcheck(L, ms >= 0 && ms <= 60000, 1, "0 to 60000 ms");
    uint64_t end = uv_hrtime() + (uint64_t)(ms * 1e6);
    while (uv_hrtime() < end)
        ;
    return 0;
}

/* ---- the module ---- */

static const luaL_Reg lib[] = {
    {"log", l_log},
    {"error", l_error},
    {"warn", l_warn},
    {"info", l_info},
    {"debug", l_debug},
    {"now", l_now},
    {"now_ms", l_now_ms},
    {"monotonic_ms", l_monotonic_ms},
    {"env", l_env},
    {"stats", l_stats},
    {"pool_stats", l_pool_stats},
    {"every", l_every},
    {"after", l_after},
    {"cancel", l_cancel},
    {"jwt_verify", l_jwt_verify},
    {"secure_compare", l_secure_compare},
    {"sha256", l_sha256},
    {NULL, NULL},
};

static const luaL_Reg dict_lib[] = {
    {"get", l_dict_get},
    {"set", l_dict_set},
    {"incr", l_dict_incr},
    {"delete", l_dict_delete},
    {"ttl", l_dict_ttl},
    {"take_bucket", l_dict_take_bucket},
    {"usage", l_dict_usage},
    {NULL, NULL},
};

/*
 * Builds the module and puts it in package.loaded, where require finds it.
 *
 *   in: ...        out: ...
 */
void mg__policy_lib_open(mg_policy_state_t *st)
{
    lua_State *L = st->L;
    const mg_policy_options_t *o = &st->policy->opts;

    lua_newtable(L);
    lua_setfield(L, LUA_REGISTRYINDEX, TIMERS_KEY);

    lua_newtable(L);
    luaL_setfuncs(L, lib, 0);
    if (o->debug_functions) {
        lua_pushcfunction(L, l_debug_spin);
        lua_setfield(L, -2, "debug_spin");
    }
    /* dict and node_dict: the same functions, told apart by their upvalue */
    lua_newtable(L);
    lua_pushboolean(L, 0);
    luaL_setfuncs(L, dict_lib, 1);
    lua_setfield(L, -2, "dict");
    lua_newtable(L);
    lua_pushboolean(L, 1);
    luaL_setfuncs(L, dict_lib, 1);
    lua_setfield(L, -2, "node_dict");

    /* ... mg */
    lua_createtable(L, 0, 2);
    lua_createtable(L, 0, 5);
    lua_pushinteger(L, o->default_limits.max_connections);
    lua_setfield(L, -2, "max_connections");
    lua_pushinteger(L, o->default_limits.max_channels);
    lua_setfield(L, -2, "max_channels");
    lua_pushnumber(L, (lua_Number)o->default_limits.idle_timeout_ms);
    lua_setfield(L, -2, "idle_timeout_ms");
    lua_pushinteger(L, o->default_limits.queue_max);
    lua_setfield(L, -2, "queue_max");
    lua_pushnumber(L, (lua_Number)o->default_limits.queue_timeout_ms);
    lua_setfield(L, -2, "queue_timeout_ms");
    lua_setfield(L, -2, "limits");
    lua_createtable(L, 0, 4);
    lua_pushnumber(L, (lua_Number)o->default_shutdown.grace_ms);
    lua_setfield(L, -2, "grace_ms");
    lua_pushboolean(L, o->default_shutdown.notify_clients);
    lua_setfield(L, -2, "notify_clients");
    lua_pushboolean(L, o->default_shutdown.force_after_grace);
    lua_setfield(L, -2, "force_after_grace");
    lua_pushstring(L, o->default_shutdown.message);
    lua_setfield(L, -2, "message");
    lua_setfield(L, -2, "shutdown");
    lua_setfield(L, -2, "defaults");

#ifdef MG_VERSION
    lua_pushliteral(L, MG_VERSION);
    lua_setfield(L, -2, "version");
#endif
    lua_pushstring(L, o->lua_dir);
    lua_setfield(L, -2, "lua_dir");

    /* ... mg */
    lua_getglobal(L, "package");
    lua_getfield(L, -1, "loaded");
    lua_pushvalue(L, -3);
    lua_setfield(L, -2, "moongate");
    lua_pop(L, 3);
}
