/*
 * HS256 JSON Web Tokens (RFC 7519 with the RFC 7515 compact serialisation), verified for the
 * policy's moongate.jwt_verify().
 *
 * Only HS256 is accepted, whatever the header asks for: the header cannot pick the algorithm
 * (no "none", no confusion with public-key algorithms). The signature is checked before the
 * claims are read, with a constant-time comparison. Then exp and nbf, when present, must be
 * numbers and hold at the given time, within the leeway.
 *
 * The token's parts are decoded into fixed buffers on the C stack, and the JSON (read by
 * jansson) becomes Lua values under a protected call: the Lua calls that build the claims table
 * may raise an error (out of memory), and a longjmp must not leak a heap buffer.
 */
#include "policy_int.h"

#include "moongate/error.h"

#include <jansson.h>
#include <lauxlib.h>
#include <math.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define JWT_MAX 8192
#define JSON_MAX_DEPTH 16

static int b64url_value(unsigned char c)
{
    if (c >= 'A' && c <= 'Z')
        return c - 'A';
    if (c >= 'a' && c <= 'z')
        return c - 'a' + 26;
    if (c >= '0' && c <= '9')
        return c - '0' + 52;
    if (c == '-')
        return 62;
    if (c == '_')
        return 63;
    return -1;
}

/* Decodes unpadded base64url. Returns the length, or -1 if src is not base64url. */
static long b64url_decode(const char *src, size_t n, unsigned char *dst, size_t cap)
{
    if (n % 4 == 1)
        return -1;
    size_t out = 0;
    uint32_t acc = 0;
    int bits = 0;
    for (size_t i = 0; i < n; i++) {
        int v = b64url_value((unsigned char)src[i]);
        if (v < 0)
            return -1;
        acc = (acc << 6) | (uint32_t)v;
        bits += 6;
        if (bits >= 8) {
            bits -= 8;
            if (out >= cap)
                return -1;
            dst[out++] = (unsigned char)(acc >> bits);
        }
    }
    /* Leftover bits must be zero, so each token has exactly one encoding. */
    if ((acc & ((1u << bits) - 1)) != 0)
        return -1;
    return (long)out;
}

/* ---- JSON to Lua values ---- */

/*
 * jansson reads the JSON (strictly: one value, nothing after it, no duplicate member, which a
 * token must not have either); this builds the Lua value. A JSON null leaves its key unset;
 * numbers are Lua numbers; nesting deeper than JSON_MAX_DEPTH is refused.
 *   in: ...        out (true): ... value        out (false): ... (possibly with partial values)
 */
static bool push_json(lua_State *L, json_t *v, int depth)
{
    switch (json_typeof(v)) {
    case JSON_OBJECT: {
        if (depth >= JSON_MAX_DEPTH || !lua_checkstack(L, 4))
            return false;
        lua_createtable(L, 0, (int)json_object_size(v));
        const char *key;
        json_t *member;
        json_object_foreach(v, key, member) {
            if (json_is_null(member))
                continue;
            lua_pushstring(L, key);
            if (!push_json(L, member, depth + 1))
                return false;
            lua_rawset(L, -3);
        }
        return true;
    }
    case JSON_ARRAY: {
        if (depth >= JSON_MAX_DEPTH || !lua_checkstack(L, 4))
            return false;
        lua_createtable(L, (int)json_array_size(v), 0);
        size_t i;
        json_t *item;
        json_array_foreach(v, i, item) {
            if (json_is_null(item))
                continue;
            if (!push_json(L, item, depth + 1))
                return false;
            lua_rawseti(L, -2, (int)i + 1);
        }
        return true;
    }
    case JSON_STRING:
        lua_pushlstring(L, json_string_value(v), json_string_length(v));
        return true;
    case JSON_INTEGER:
    case JSON_REAL:
        lua_pushnumber(L, json_number_value(v));
        return true;
    case JSON_TRUE:
    case JSON_FALSE:
        lua_pushboolean(L, json_is_true(v));
        return true;
    case JSON_NULL:
        break;
    }
    return false;
}

/* Runs under lua_pcall (so that a Lua error, out of memory, cannot leak the jansson tree):
   pushes the table of the object at its light userdata argument, or nil. */
static int push_json_object(lua_State *L)
{
    json_t *v = lua_touserdata(L, 1);
    if (!push_json(L, v, 0)) {
        lua_settop(L, 1);
        lua_pushnil(L);
    }
    return 1;
}

/* Parses a JSON object and pushes it as a table. On failure pushes nothing and returns false;
   a Lua error (out of memory) is raised again once the tree is freed. */
static bool push_claims(lua_State *L, const unsigned char *s, size_t n)
{
    lua_pushcfunction(L, push_json_object);
    json_error_t err;
    json_t *v = json_loadb((const char *)s, n, JSON_REJECT_DUPLICATES | JSON_DECODE_INT_AS_REAL,
                           &err);
    if (v == NULL || !json_is_object(v)) {
        json_decref(v);
        lua_pop(L, 1);
        return false;
    }
    lua_pushlightuserdata(L, v);
    int rc = lua_pcall(L, 1, 1, 0);
    json_decref(v);
    if (rc != 0)
        lua_error(L);
    if (lua_isnil(L, -1)) {
        lua_pop(L, 1);
        return false;
    }
    return true;
}

/* ---- the token ---- */

static int fail(char *reason, size_t len, const char *why)
{
    snprintf(reason, len, "%s", why);
    return MG_EINVAL;
}

/*
 * Reads claim name of the claims table at the top as a number into *out. Returns 0 if absent,
 * 1 if a number, -1 if something else.
 *
 *   in: ... claims        out: ... claims
 */
static int claim_time(lua_State *L, const char *name, double *out)
{
    lua_getfield(L, -1, name);
    int rc = 0;
    if (lua_type(L, -1) == LUA_TNUMBER) {
        *out = lua_tonumber(L, -1);
        rc = 1;
    } else if (!lua_isnil(L, -1)) {
        rc = -1;
    }
    lua_pop(L, 1);
    return rc;
}

int mg__jwt_verify_hs256(lua_State *L, const char *token, size_t tlen, const char *secret,
                         size_t slen, double now_s, double leeway_s, char *reason,
                         size_t reasonlen)
{
    if (tlen == 0 || tlen > JWT_MAX)
        return fail(reason, reasonlen, "malformed: bad length");
    const char *dot1 = memchr(token, '.', tlen);
    const char *dot2 = dot1 != NULL ? memchr(dot1 + 1, '.', tlen - (size_t)(dot1 + 1 - token)) : NULL;
    if (dot1 == NULL || dot2 == NULL ||
        memchr(dot2 + 1, '.', tlen - (size_t)(dot2 + 1 - token)) != NULL)
        return fail(reason, reasonlen, "malformed: not three parts");

    unsigned char header[JWT_MAX], payload[JWT_MAX], sig[64];
    long hn = b64url_decode(token, (size_t)(dot1 - token), header, sizeof(header));
    long pn = b64url_decode(dot1 + 1, (size_t)(dot2 - dot1 - 1), payload, sizeof(payload));
    long sn = b64url_decode(dot2 + 1, tlen - (size_t)(dot2 + 1 - token), sig, sizeof(sig));
    if (hn <= 0 || pn <= 0 || sn < 0)
        return fail(reason, reasonlen, "malformed: not base64url");

    if (!push_claims(L, header, (size_t)hn))
        return fail(reason, reasonlen, "malformed: header is not a JSON object");
    lua_getfield(L, -1, "alg");
    bool hs256 = lua_type(L, -1) == LUA_TSTRING && strcmp(lua_tostring(L, -1), "HS256") == 0;
    lua_pop(L, 2);
    if (!hs256)
        return fail(reason, reasonlen, "unsupported algorithm (only HS256)");

    unsigned char mac[EVP_MAX_MD_SIZE];
    unsigned int maclen = 0;
    if (HMAC(EVP_sha256(), secret, (int)slen, (const unsigned char *)token,
             (size_t)(dot2 - token), mac, &maclen) == NULL)
        return fail(reason, reasonlen, "HMAC failed");
    if (sn != (long)maclen || CRYPTO_memcmp(mac, sig, maclen) != 0)
        return fail(reason, reasonlen, "bad signature");

    if (!push_claims(L, payload, (size_t)pn))
        return fail(reason, reasonlen, "malformed: claims are not a JSON object");
    double exp = 0, nbf = 0; /* (set when claim_time says the claim is there) */
    int has_exp = claim_time(L, "exp", &exp);
    int has_nbf = claim_time(L, "nbf", &nbf);
    const char *why = NULL;
    if (has_exp < 0 || has_nbf < 0)
        why = "malformed: exp and nbf must be numbers";
    else if (has_exp > 0 && now_s >= exp + leeway_s)
        why = "expired";
    else if (has_nbf > 0 && now_s + leeway_s < nbf)
        why = "not yet valid";
    if (why != NULL) {
        lua_pop(L, 1);
        return fail(reason, reasonlen, why);
    }
    return 0;
}
