/*
 * Redis's answers to the dictionary's operations, as the Lua values a hook gets back. Apart from
 * policy_redis.c so that its fuzz target (tests/fuzz/fuzz_redis_answer.c) needs only hiredis's
 * reader and Lua. An answer is untrusted: anything but the shape asked for is an error to the
 * hook, never a crash or a value of the wrong type.
 */
#include "policy_int.h"

#include <hiredis/hiredis.h>
#include <lauxlib.h>
#include <stdlib.h>
#include <string.h>

static bool parse_number(const char *s, size_t n, double *out)
{
    char buf[64];
    if (n == 0 || n >= sizeof(buf))
        return false;
    memcpy(buf, s, n);
    buf[n] = '\0';
    char *end;
    *out = strtod(buf, &end);
    return *end == '\0';
}

/* Pushes a stored value: a number, a string, or nil. */
static void push_value(lua_State *L, const redisReply *rep)
{
    if (rep->type != REDIS_REPLY_STRING) {
        lua_pushnil(L);
        return;
    }
    double d;
    if (rep->len >= 2 && rep->str[0] == 's' && rep->str[1] == ':')
        lua_pushlstring(L, rep->str + 2, rep->len - 2);
    else if (parse_number(rep->str, rep->len, &d))
        lua_pushnumber(L, d);
    else
        lua_pushlstring(L, rep->str, rep->len); /* written by someone else: as it is */
}

int mg__redis_push_results(lua_State *L, mg__rdict_op_t op, const redisReply *rep)
{
    if (rep == NULL) {
        lua_pushnil(L);
        lua_pushliteral(L, "redis unavailable: the connection closed");
        return 2;
    }
    if (rep->type == REDIS_REPLY_ERROR) {
        lua_pushnil(L);
        if (op == MG_RDICT_INCR && strstr(rep->str, "not a valid float") != NULL)
            lua_pushliteral(L, "not a number");
        else
            lua_pushfstring(L, "redis error: %s", rep->str);
        return 2;
    }
    double d;
    switch (op) {
    case MG_RDICT_GET:
        push_value(L, rep);
        return 1;
    case MG_RDICT_SET:
    case MG_RDICT_DELETE:
        lua_pushboolean(L, 1);
        return 1;
    case MG_RDICT_INCR:
        if (rep->type == REDIS_REPLY_STRING && parse_number(rep->str, rep->len, &d)) {
            lua_pushnumber(L, d);
            return 1;
        }
        break;
    case MG_RDICT_TTL:
        if (rep->type == REDIS_REPLY_INTEGER) {
            if (rep->integer == -2)
                lua_pushnil(L);
            else
                lua_pushnumber(L, (lua_Number)rep->integer);
            return 1;
        }
        break;
    case MG_RDICT_TAKE_BUCKET:
        if (rep->type == REDIS_REPLY_ARRAY && rep->elements == 2 &&
            rep->element[0]->type == REDIS_REPLY_INTEGER &&
            rep->element[1]->type == REDIS_REPLY_STRING &&
            parse_number(rep->element[1]->str, rep->element[1]->len, &d)) {
            lua_pushboolean(L, rep->element[0]->integer == 1);
            lua_pushnumber(L, d);
            return 2;
        }
        break;
    }
    lua_pushnil(L);
    lua_pushliteral(L, "redis error: an answer of the wrong type");
    return 2;
}
