/*
 * libFuzzer target for Redis's answers (src/policy/policy_redis_proto.c). See README.md beside
 * it.
 *
 * The first input byte chooses the dictionary operation and seeds the split pattern; the rest
 * is what a Redis (or something that says it is one) sends. hiredis's reader cuts it into
 * answers, fed whole and in pseudo-random pieces; every answer becomes the hook's results.
 * Invariants checked: both feeds give the same answers, to the same results; an operation gets
 * 1 or 2 results, of the types its documentation promises (GET a number, string or nil; SET
 * and DELETE true; INCR and TTL a number or nil; TAKE_BUCKET a boolean and a number), and an
 * error is always nil and a string.
 */
#include "policy/policy_int.h"
#include "pieces.h"

#include <hiredis/hiredis.h>
#include <lauxlib.h>
#include <lualib.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define ANSWERS_MAX 64

static void check(lua_State *L, mg__rdict_op_t op, int n)
{
    int base = lua_gettop(L) - n;
    int t1 = lua_type(L, base + 1), t2 = n == 2 ? lua_type(L, base + 2) : LUA_TNONE;
    bool ok;
    if (n == 2 && t1 == LUA_TNIL)
        ok = t2 == LUA_TSTRING;
    else if (op == MG_RDICT_TAKE_BUCKET)
        ok = n == 2 && t1 == LUA_TBOOLEAN && t2 == LUA_TNUMBER;
    else if (n != 1)
        ok = false;
    else if (op == MG_RDICT_GET)
        ok = t1 == LUA_TNUMBER || t1 == LUA_TSTRING || t1 == LUA_TNIL;
    else if (op == MG_RDICT_SET || op == MG_RDICT_DELETE)
        ok = t1 == LUA_TBOOLEAN;
    else
        ok = t1 == LUA_TNUMBER || (op == MG_RDICT_TTL && t1 == LUA_TNIL);
    if (!ok) {
        fprintf(stderr, "operation %d: %d results of types %s, %s\n", (int)op, n,
                lua_typename(L, t1), t2 == LUA_TNONE ? "-" : lua_typename(L, t2));
        abort();
    }
}

/* Feeds data in pieces; leaves each answer's results, as one string, in out. Returns how many
   answers, or -1 once the reader refused the bytes. */
static int run(lua_State *L, mg__rdict_op_t op, const uint8_t *data, size_t len, uint32_t seed,
               char out[ANSWERS_MAX][96])
{
    int refused = 0;
    redisReader *rd = mg__redis_reader_new(&refused);
    if (rd == NULL)
        abort();
    int answers = 0;
    size_t off = 0;
    while (off < len && answers >= 0) {
        size_t n = fuzz_piece_len(&seed, len - off, 61);
        if (redisReaderFeed(rd, (const char *)data + off, n) != REDIS_OK)
            abort();
        off += n;
        void *reply;
        while (answers >= 0 && answers < ANSWERS_MAX) {
            if (redisReaderGetReply(rd, &reply) != REDIS_OK) {
                answers = -1;
                break;
            }
            if (reply == NULL)
                break;
            int top = lua_gettop(L);
            int k = mg__redis_push_results(L, op, reply);
            freeReplyObject(reply);
            if (k < 1 || k > 2 || lua_gettop(L) != top + k)
                abort();
            check(L, op, k);
            snprintf(out[answers], 96, "%s %.60s", lua_typename(L, lua_type(L, top + 1)),
                     lua_type(L, top + k) == LUA_TSTRING ? lua_tostring(L, top + k) : "");
            if (lua_type(L, top + 1) == LUA_TNUMBER)
                snprintf(out[answers], 96, "n %.17g", lua_tonumber(L, top + 1));
            lua_settop(L, top);
            answers++;
        }
    }
    redisReaderFree(rd);
    return answers;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static lua_State *L;
    if (L == NULL && (L = luaL_newstate()) == NULL)
        abort();
    if (size < 1)
        return 0;
    mg__rdict_op_t op = (mg__rdict_op_t)(MG_RDICT_GET + data[0] % 6);
    uint32_t seed = (uint32_t)data[0] << 8 | 1;
    static char a[ANSWERS_MAX][96], b[ANSWERS_MAX][96];
    int na = run(L, op, data + 1, size - 1, 0, a);
    int nb = run(L, op, data + 1, size - 1, seed, b);
    /* An input the reader refuses may be refused after fewer answers when cut differently. */
    if (na >= 0 && nb >= 0 && na != nb) {
        fprintf(stderr, "fed whole and in pieces, %d and %d answers\n", na, nb);
        abort();
    }
    for (int i = 0; i < na && i < nb; i++)
        if (strcmp(a[i], b[i]) != 0) {
            fprintf(stderr, "answer %d: \"%s\" fed whole, \"%s\" in pieces\n", i, a[i], b[i]);
            abort();
        }
    return 0;
}
