/*
 * libFuzzer target for moongate's pattern functions (src/policy/policy_pattern.c): they must answer
 * exactly as LuaJIT's own string.find, match, gmatch and gsub do.
 *
 * The first input byte picks the function and its extra arguments (init, plain, the replacement
 * and gsub's count); the second, how many of the following bytes are the pattern (at most 32);
 * the subject is what remains (at most 64). Each input runs in two plain states, one with
 * LuaJIT's functions and one with ours, and the results (types, values, bytes) or the error
 * messages must be the same; any difference aborts.
 *
 * LuaJIT's matcher cannot be stopped, and a pattern of 32 bytes can keep it busy for longer than
 * any fuzzer waits. Ours runs first, with a check function that stops it after a few million
 * steps; since both take the same steps, an input that stops ours is one LuaJIT would spend too
 * long on, and it is not run there.
 */
#include "moongate/error.h"
#include "policy/policy_int.h"

#include <lauxlib.h>
#include <lualib.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define PATTERN_MAX 32
#define SUBJECT_MAX 64
#define CHECKS_MAX 2000 /* about two million steps */

static const char prelude[] =
    "calls = 0\n"
    "function F(...)\n"
    "  calls = calls + 1\n"
    "  if calls % 3 == 0 then return nil end\n"
    "  if calls % 5 == 0 then return false end\n"
    "  return table.concat({ select('#', ...), ... }, ',')\n"
    "end\n"
    "T = { a = 'A', b = false, ab = 'AB', [1] = 'one', [2] = 2, c = {} }\n";

static const char *const templates[] = { "%0", "%1", "<%2|%1>", "x%%y", "%", "%a", "", "%9" };
static const double numbers[] = { 1, 2, 0, -1, -3, 5, 70, -70, 2147483648.0, 4294967297.0 };

static lua_State *native, *ours;
static int checks_left;
static int stopped;

static int stop_after(lua_State *L, void *ctx, char *why, size_t whylen)
{
    if (--checks_left > 0)
        return 0;
    stopped = 1;
    snprintf(why, whylen, "too long for the fuzzer");
    return MG_ETIMEDOUT;
}

static lua_State *state_new(int with_ours)
{
    lua_State *L = luaL_newstate();
    if (L == NULL)
        abort();
    luaL_openlibs(L);
    if (with_ours)
        mg__pattern_open(L, stop_after, NULL);
    if (luaL_loadbuffer(L, prelude, sizeof(prelude) - 1, "=prelude") != 0 ||
        lua_pcall(L, 0, 0, 0) != 0)
        abort();
    return L;
}

/* A growing description of what a call gave. */
typedef struct out {
    char buf[16384];
    size_t len;
} out_t;

static void put(out_t *o, const char *s, size_t n)
{
    if (n > sizeof(o->buf) - o->len)
        n = sizeof(o->buf) - o->len;
    memcpy(o->buf + o->len, s, n);
    o->len += n;
}

/* Appends the values from index first to the top: types and exact bytes. */
static void put_values(out_t *o, lua_State *L, int first)
{
    char tmp[48];
    for (int i = first; i <= lua_gettop(L); i++) {
        size_t n;
        const char *s;
        switch (lua_type(L, i)) {
        case LUA_TNUMBER:
            put(o, tmp, (size_t)snprintf(tmp, sizeof(tmp), " n%.17g", lua_tonumber(L, i)));
            break;
        case LUA_TSTRING:
            s = lua_tolstring(L, i, &n);
            put(o, tmp, (size_t)snprintf(tmp, sizeof(tmp), " s%zu:", n));
            put(o, s, n);
            break;
        default:
            s = luaL_typename(L, i);
            put(o, " ", 1);
            put(o, s, strlen(s));
        }
    }
}

/*
 * Runs the case in L and describes the outcome in o.
 *
 *   in:  (empty)        out: (empty)
 */
static void run(lua_State *L, int mode, const char *p, size_t plen, const char *s, size_t slen,
                out_t *o)
{
    static const char *const names[] = { "find", "find", "match", "gmatch",
                                         "gsub", "gsub", "gsub", "gsub" };
    int fn = mode & 7;
    double num = numbers[(mode >> 3) % (sizeof(numbers) / sizeof(numbers[0]))];
    const char *tmpl = templates[(mode >> 3) % (sizeof(templates) / sizeof(templates[0]))];
    o->len = 0;
    lua_pushnumber(L, 0);
    lua_setglobal(L, "calls");

    lua_getglobal(L, "string");
    lua_getfield(L, -1, names[fn]);
    lua_remove(L, -2);
    lua_pushlstring(L, s, slen);
    lua_pushlstring(L, p, plen);
    int nargs = 2;
    switch (fn) {
    case 0:
    case 2:
        lua_pushnumber(L, num);
        nargs = 3;
        break;
    case 1:
        lua_pushnumber(L, num);
        lua_pushboolean(L, 1);
        nargs = 4;
        break;
    case 4:
        lua_pushstring(L, tmpl);
        nargs = 3;
        break;
    case 5:
        lua_getglobal(L, "T");
        nargs = 3;
        break;
    case 6:
        lua_getglobal(L, "F");
        nargs = 3;
        break;
    case 7:
        lua_pushstring(L, tmpl);
        lua_pushnumber(L, num);
        nargs = 4;
        break;
    }
    int rc = lua_pcall(L, nargs, LUA_MULTRET, 0);
    /* gmatch: call the iterator until it has no more to give; each match makes progress. */
    for (int i = 0; fn == 3 && rc == 0 && i <= 2 * SUBJECT_MAX + 2; i++) {
        lua_pushvalue(L, 1);
        lua_settop(L, 2);
        rc = lua_pcall(L, 0, LUA_MULTRET, 0);
        if (rc == 0 && lua_gettop(L) == 1)
            break;
        put(o, " |", 2);
        put_values(o, L, 2);
        lua_settop(L, 1);
    }
    if (rc != 0) {
        put(o, " error ", 7);
        const char *msg = lua_tostring(L, -1);
        put(o, msg != NULL ? msg : "?", msg != NULL ? strlen(msg) : 1);
    } else if (fn != 3) {
        put_values(o, L, 1);
    }
    lua_settop(L, 0);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 2)
        return 0;
    if (native == NULL) {
        native = state_new(0);
        ours = state_new(1);
    }
    int mode = data[0];
    size_t plen = data[1] % (PATTERN_MAX + 1);
    if (plen > size - 2)
        plen = size - 2;
    const char *p = (const char *)data + 2;
    const char *s = p + plen;
    size_t slen = size - 2 - plen;
    if (slen > SUBJECT_MAX)
        slen = SUBJECT_MAX;

    static out_t want, got;
    checks_left = CHECKS_MAX;
    stopped = 0;
    run(ours, mode, p, plen, s, slen, &got);
    if (!stopped) {
        run(native, mode, p, plen, s, slen, &want);
        if (want.len != got.len || memcmp(want.buf, got.buf, want.len) != 0) {
            fprintf(stderr, "mode %d, pattern %zu bytes, subject %zu bytes\nluajit:%.*s\nours:  %.*s\n",
                    mode, plen, slen, (int)want.len, want.buf, (int)got.len, got.buf);
            abort();
        }
    }
    lua_gc(native, LUA_GCSTEP, 0);
    lua_gc(ours, LUA_GCSTEP, 0);
    return 0;
}
