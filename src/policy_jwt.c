/*
 * HS256 JSON Web Tokens (RFC 7519 with the RFC 7515 compact serialisation), verified for the
 * policy's moongate.jwt_verify().
 *
 * Only HS256 is accepted, whatever the header asks for: the header cannot pick the algorithm
 * (no "none", no confusion with public-key algorithms). The signature is checked before the
 * claims are read, with a constant-time comparison. Then exp and nbf, when present, must be
 * numbers and hold at the given time, within the leeway.
 *
 * Everything here works in fixed buffers on the C stack: the Lua calls that build the claims
 * table may raise an error (out of memory), and a longjmp must not leak a heap buffer.
 */
#include "moongate/policy_int.h"

#include "moongate/error.h"

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

/* ---- a JSON reader that builds Lua values ---- */

typedef struct json {
    lua_State *L;
    const char *p;
    const char *end;
    int depth;
} json_t;

static void skip_ws(json_t *j)
{
    while (j->p < j->end && (*j->p == ' ' || *j->p == '\t' || *j->p == '\n' || *j->p == '\r'))
        j->p++;
}

static bool json_value(json_t *j);

static int hex4(const char *p)
{
    int v = 0;
    for (int i = 0; i < 4; i++) {
        int c = (unsigned char)p[i], d;
        if (c >= '0' && c <= '9')
            d = c - '0';
        else if (c >= 'a' && c <= 'f')
            d = c - 'a' + 10;
        else if (c >= 'A' && c <= 'F')
            d = c - 'A' + 10;
        else
            return -1;
        v = v * 16 + d;
    }
    return v;
}

static size_t utf8_put(unsigned char *o, unsigned cp)
{
    if (cp < 0x80) {
        o[0] = (unsigned char)cp;
        return 1;
    }
    if (cp < 0x800) {
        o[0] = (unsigned char)(0xc0 | (cp >> 6));
        o[1] = (unsigned char)(0x80 | (cp & 0x3f));
        return 2;
    }
    if (cp < 0x10000) {
        o[0] = (unsigned char)(0xe0 | (cp >> 12));
        o[1] = (unsigned char)(0x80 | ((cp >> 6) & 0x3f));
        o[2] = (unsigned char)(0x80 | (cp & 0x3f));
        return 3;
    }
    o[0] = (unsigned char)(0xf0 | (cp >> 18));
    o[1] = (unsigned char)(0x80 | ((cp >> 12) & 0x3f));
    o[2] = (unsigned char)(0x80 | ((cp >> 6) & 0x3f));
    o[3] = (unsigned char)(0x80 | (cp & 0x3f));
    return 4;
}

/* Reads a string at j->p (after the opening quote was seen) and pushes it. */
static bool json_string(json_t *j)
{
    /* The decoded string is never longer than its encoding, which fits in a token. */
    unsigned char buf[JWT_MAX];
    size_t n = 0;
    j->p++;
    while (j->p < j->end && *j->p != '"') {
        unsigned char c = (unsigned char)*j->p;
        if (c < 0x20 || n + 4 > sizeof(buf))
            return false;
        if (c != '\\') {
            buf[n++] = c;
            j->p++;
            continue;
        }
        if (j->end - j->p < 2)
            return false;
        char e = j->p[1];
        j->p += 2;
        switch (e) {
        case '"': buf[n++] = '"'; break;
        case '\\': buf[n++] = '\\'; break;
        case '/': buf[n++] = '/'; break;
        case 'b': buf[n++] = '\b'; break;
        case 'f': buf[n++] = '\f'; break;
        case 'n': buf[n++] = '\n'; break;
        case 'r': buf[n++] = '\r'; break;
        case 't': buf[n++] = '\t'; break;
        case 'u': {
            if (j->end - j->p < 4)
                return false;
            int cp = hex4(j->p);
            if (cp < 0)
                return false;
            j->p += 4;
            if (cp >= 0xd800 && cp <= 0xdbff) {
                if (j->end - j->p < 6 || j->p[0] != '\\' || j->p[1] != 'u')
                    return false;
                int lo = hex4(j->p + 2);
                if (lo < 0xdc00 || lo > 0xdfff)
                    return false;
                j->p += 6;
                cp = 0x10000 + ((cp - 0xd800) << 10) + (lo - 0xdc00);
            } else if (cp >= 0xdc00 && cp <= 0xdfff) {
                return false;
            }
            n += utf8_put(buf + n, (unsigned)cp);
            break;
        }
        default:
            return false;
        }
    }
    if (j->p >= j->end)
        return false;
    j->p++;
    lua_pushlstring(j->L, (const char *)buf, n);
    return true;
}

static bool json_number(json_t *j)
{
    char buf[64];
    size_t n = 0;
    while (j->p + n < j->end && n < sizeof(buf) - 1 && strchr("+-0123456789.eE", j->p[n]) != NULL &&
           j->p[n] != '\0')
        n++;
    if (n == 0 || n == sizeof(buf) - 1)
        return false;
    memcpy(buf, j->p, n);
    buf[n] = '\0';
    char *endp;
    double v = strtod(buf, &endp);
    if (endp != buf + n || !isfinite(v))
        return false;
    j->p += n;
    lua_pushnumber(j->L, v);
    return true;
}

static bool json_literal(json_t *j, const char *word)
{
    size_t n = strlen(word);
    if ((size_t)(j->end - j->p) < n || memcmp(j->p, word, n) != 0)
        return false;
    j->p += n;
    return true;
}

/*   in: ...        out (true): ... value        out (false): ... (possibly with partial values) */
static bool json_container(json_t *j, bool object)
{
    lua_State *L = j->L;
    if (++j->depth > JSON_MAX_DEPTH || !lua_checkstack(L, 4))
        return false;
    j->p++;
    lua_newtable(L);
    int t = lua_gettop(L);
    int index = 1;
    skip_ws(j);
    if (j->p < j->end && *j->p == (object ? '}' : ']')) {
        j->p++;
        j->depth--;
        return true;
    }
    for (;;) {
        skip_ws(j);
        if (object) {
            if (j->p >= j->end || *j->p != '"' || !json_string(j))
                return false;
            skip_ws(j);
            if (j->p >= j->end || *j->p != ':')
                return false;
            j->p++;
        } else {
            lua_pushinteger(L, index++);
        }
        if (!json_value(j))
            return false;
        /* ... t key value; a JSON null (nil) leaves the key unset */
        if (lua_isnil(L, -1))
            lua_pop(L, 2);
        else
            lua_rawset(L, t);
        skip_ws(j);
        if (j->p < j->end && *j->p == ',') {
            j->p++;
            continue;
        }
        if (j->p < j->end && *j->p == (object ? '}' : ']')) {
            j->p++;
            break;
        }
        return false;
    }
    j->depth--;
    return true;
}

static bool json_value(json_t *j)
{
    skip_ws(j);
    if (j->p >= j->end)
        return false;
    switch (*j->p) {
    case '{': return json_container(j, true);
    case '[': return json_container(j, false);
    case '"': return json_string(j);
    case 't':
        if (!json_literal(j, "true"))
            return false;
        lua_pushboolean(j->L, 1);
        return true;
    case 'f':
        if (!json_literal(j, "false"))
            return false;
        lua_pushboolean(j->L, 0);
        return true;
    case 'n':
        if (!json_literal(j, "null"))
            return false;
        lua_pushnil(j->L);
        return true;
    default:
        return json_number(j);
    }
}

/* Parses a JSON object and pushes it as a table. On failure pushes nothing and returns false. */
static bool json_object(lua_State *L, const unsigned char *s, size_t n)
{
    int top = lua_gettop(L);
    json_t j = { L, (const char *)s, (const char *)s + n, 0 };
    skip_ws(&j);
    bool ok = j.p < j.end && *j.p == '{' && json_value(&j);
    skip_ws(&j);
    if (!ok || j.p != j.end) {
        lua_settop(L, top);
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

    if (!json_object(L, header, (size_t)hn))
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

    if (!json_object(L, payload, (size_t)pn))
        return fail(reason, reasonlen, "malformed: claims are not a JSON object");
    double exp, nbf;
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
