/*
 * What moongate says to Redis and what it makes of the answers, apart from the connection
 * (policy_redis.c): the URL, the server-side scripts, each dictionary operation as a command,
 * and each answer as the Lua values a hook gets back. Nothing here does I/O, so the fuzz target
 * of the answers (tests/fuzz/fuzz_redis_answer.c) needs only hiredis's reader and Lua. An
 * answer is untrusted: anything but the shape asked for is an error to the hook, never a crash
 * or a value of the wrong type.
 */
#include "policy_int.h"

#include "moongate/error.h"

#include <ctype.h>
#include <hiredis/hiredis.h>
#include <lauxlib.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define KEY_PREFIX "moongate:"

/* ---- the scripts ---- */

static const char incr_script[] =
    "local new = redis.call('EXISTS', KEYS[1]) == 0\n"
    "local v = redis.call('INCRBYFLOAT', KEYS[1], ARGV[1])\n"
    "local ttl = tonumber(ARGV[2])\n"
    "if new and ttl > 0 then redis.call('PEXPIRE', KEYS[1], ttl) end\n"
    "return v\n";

/* The token bucket of lua/moongate/token_bucket.lua in one step; the same arithmetic as
   mg__dict_take_bucket() (doubles both), so both back ends give the same answers. */
static const char take_script[] =
    "local now, n = tonumber(ARGV[1]), tonumber(ARGV[2])\n"
    "local interval, burst = tonumber(ARGV[3]), tonumber(ARGV[4])\n"
    "local full_at = tonumber(redis.call('GET', KEYS[1]) or '') or now\n"
    "if full_at < now then full_at = now end\n"
    "local new_full_at = full_at + n * interval\n"
    "local over = new_full_at - now - burst * interval\n"
    "if over > interval * 0.01 then return {0, string.format('%.17g', over)} end\n"
    "local ttl = math.ceil((new_full_at - now) * 1000)\n"
    "if ttl < 1 then ttl = 1 end\n"
    "redis.call('SET', KEYS[1], string.format('%.17g', new_full_at), 'PX', ttl)\n"
    "return {1, string.format('%.17g', new_full_at)}\n";

const char *const mg__redis_scripts[MG_REDIS_SCRIPTS] = { incr_script, take_script };

/* ---- the URL ---- */

static int url_fail(char *err, size_t errlen, const char *why)
{
    snprintf(err, errlen, "MOONGATE_REDIS_URL: %s (redis[s]://[[user]:password@]host[:port][/db])",
             why);
    return MG_ECONFIG;
}

/* Undoes %XX in a user or password. Returns false on a bad escape or no room. */
static bool url_unescape(char *dst, size_t cap, const char *src, size_t n)
{
    size_t j = 0;
    for (size_t i = 0; i < n; i++) {
        char c = src[i];
        if (c == '%') {
            if (i + 2 >= n || !isxdigit((unsigned char)src[i + 1]) ||
                !isxdigit((unsigned char)src[i + 2]))
                return false; /* (strtol alone would take "%+1" and "% 1") */
            char hex[3] = { src[i + 1], src[i + 2], 0 };
            char *end;
            long v = strtol(hex, &end, 16);
            if (end != hex + 2 || v == 0)
                return false;
            c = (char)v;
            i += 2;
        }
        if (j + 1 >= cap)
            return false;
        dst[j++] = c;
    }
    dst[j] = '\0';
    return true;
}

int mg__redis_parse_url(const char *url, mg__redis_addr_t *r, char *err, size_t errlen)
{
    const char *p;
    if (strncmp(url, "redis://", 8) == 0) {
        p = url + 8;
        r->tls = false;
    } else if (strncmp(url, "rediss://", 9) == 0) {
        p = url + 9;
        r->tls = true;
    } else {
        return url_fail(err, errlen, "must start with redis:// (or rediss:// for TLS)");
    }
    const char *at = strrchr(p, '@');
    const char *slash = strchr(at ? at : p, '/');
    r->user[0] = r->pass[0] = '\0';
    if (at != NULL) {
        const char *colon = memchr(p, ':', (size_t)(at - p));
        if (colon == NULL)
            return url_fail(err, errlen, "the part before @ needs a colon: :password or "
                                         "user:password");
        if (!url_unescape(r->user, sizeof(r->user), p, (size_t)(colon - p)) ||
            !url_unescape(r->pass, sizeof(r->pass), colon + 1, (size_t)(at - colon - 1)))
            return url_fail(err, errlen, "bad user or password (too long, or a bad %-escape)");
        if (r->pass[0] == '\0')
            return url_fail(err, errlen, "empty password");
        p = at + 1;
    }
    size_t hl = slash ? (size_t)(slash - p) : strlen(p);
    const char *port = NULL;
    const char *hs = p;
    size_t hn = hl;
    if (hl > 0 && p[0] == '[') {
        const char *close = memchr(p, ']', hl);
        if (close == NULL)
            return url_fail(err, errlen, "unclosed [ in the host");
        hs = p + 1;
        hn = (size_t)(close - p - 1);
        if (close + 1 < p + hl) {
            if (close[1] != ':')
                return url_fail(err, errlen, "junk after ]");
            port = close + 2;
        }
    } else {
        const char *colon = memchr(p, ':', hl);
        if (colon != NULL) {
            hn = (size_t)(colon - p);
            port = colon + 1;
        }
    }
    if (hn == 0 || hn >= sizeof(r->host))
        return url_fail(err, errlen, "no host, or a host too long");
    memcpy(r->host, hs, hn);
    r->host[hn] = '\0';
    r->port = 6379;
    if (port != NULL) {
        size_t pn = (size_t)(p + hl - port);
        char buf[8];
        char *end;
        if (pn == 0 || pn >= sizeof(buf))
            return url_fail(err, errlen, "bad port");
        memcpy(buf, port, pn);
        buf[pn] = '\0';
        long v = strtol(buf, &end, 10);
        if (*end != '\0' || v < 1 || v > 65535)
            return url_fail(err, errlen, "bad port");
        r->port = (int)v;
    }
    r->db = 0;
    if (slash != NULL && slash[1] != '\0') {
        char *end;
        long v = strtol(slash + 1, &end, 10);
        if (*end != '\0' || v < 0 || v > 1000000)
            return url_fail(err, errlen, "the database after / must be a number");
        r->db = (int)v;
    }
    snprintf(r->name, sizeof(r->name), "%s://%s%s%s:%d/%d", r->tls ? "rediss" : "redis",
             strchr(r->host, ':') ? "[" : "",
             r->host, strchr(r->host, ':') ? "]" : "", r->port, r->db);
    return 0;
}

/* ---- operations as commands ---- */

char *mg__redis_put_uint(char *p, size_t v)
{
    char tmp[24];
    int n = 0;
    do {
        tmp[n++] = (char)('0' + v % 10);
        v /= 10;
    } while (v != 0);
    while (n > 0)
        *p++ = tmp[--n];
    return p;
}

/* A number as text Redis reads back exactly: whole numbers (counts, bursts) as integers,
   without printf's cost; the rest with 17 significant digits. */
static void fmt_num(char *buf, size_t cap, double v)
{
    if (v == (double)(int64_t)v && v > -1e15 && v < 1e15 && cap >= 24) {
        int64_t i = (int64_t)v;
        char *p = buf;
        if (i < 0) {
            *p++ = '-';
            i = -i;
        }
        *mg__redis_put_uint(p, (size_t)i) = '\0';
        return;
    }
    snprintf(buf, cap, "%.17g", v);
}

int mg__redis_cmd_build(const mg__rdict_req_t *q, const char sha[][41], mg__redis_cmd_t *c)
{
    memset(c, 0, sizeof(*c));
    size_t klen = sizeof(KEY_PREFIX) - 1 + q->klen;
    char *key = c->key = malloc(klen);
    if (key == NULL)
        return MG_ENOMEM;
    memcpy(key, KEY_PREFIX, sizeof(KEY_PREFIX) - 1);
    memcpy(key + sizeof(KEY_PREFIX) - 1, q->key, q->klen);

    char *n1 = c->num[0], *n2 = c->num[1], *n3 = c->num[2], *n4 = c->num[3];
    const size_t nl = sizeof(c->num[0]);
#define ARG(s, n) (c->argv[c->argc] = (s), c->lens[c->argc] = (n), c->argc++)
#define ARGS(s) ARG(s, strlen(s))
    switch (q->op) {
    case MG_RDICT_GET:
        ARGS("GET");
        ARG(key, klen);
        break;
    case MG_RDICT_DELETE:
        ARGS("DEL");
        ARG(key, klen);
        break;
    case MG_RDICT_TTL:
        ARGS("PTTL");
        ARG(key, klen);
        break;
    case MG_RDICT_SET:
        if (!q->has_value) {
            ARGS("DEL");
            ARG(key, klen);
            break;
        }
        ARGS("SET");
        ARG(key, klen);
        if (q->value.type == MG_DICT_NUMBER) {
            fmt_num(n1, nl, q->value.num);
            ARGS(n1);
        } else {
            char *sval = c->sval = malloc(q->value.len + 2);
            if (sval == NULL) {
                mg__redis_cmd_free(c);
                return MG_ENOMEM;
            }
            sval[0] = 's';
            sval[1] = ':';
            memcpy(sval + 2, q->value.str, q->value.len);
            ARG(sval, q->value.len + 2);
        }
        if (q->ttl_ms > 0) {
            snprintf(n2, nl, "%llu", (unsigned long long)q->ttl_ms);
            ARGS("PX");
            ARGS(n2);
        }
        break;
    case MG_RDICT_INCR:
        ARGS("EVALSHA");
        ARG(sha[MG_REDIS_SCRIPT_INCR], 40);
        ARGS("1");
        ARG(key, klen);
        fmt_num(n1, nl, q->by);
        ARGS(n1);
        snprintf(n2, nl, "%llu", (unsigned long long)q->ttl_ms);
        ARGS(n2);
        break;
    case MG_RDICT_TAKE_BUCKET:
        ARGS("EVALSHA");
        ARG(sha[MG_REDIS_SCRIPT_TAKE], 40);
        ARGS("1");
        ARG(key, klen);
        fmt_num(n1, nl, q->now);
        ARGS(n1);
        fmt_num(n2, nl, q->n);
        ARGS(n2);
        fmt_num(n3, nl, q->interval);
        ARGS(n3);
        fmt_num(n4, nl, q->burst);
        ARGS(n4);
        break;
    }
#undef ARG
#undef ARGS

    return 0;
}

void mg__redis_cmd_free(mg__redis_cmd_t *c)
{
    free(c->key);
    free(c->sval);
    c->key = c->sval = NULL;
}

/* ---- the reader ---- */

/* No answer of ours is an array of more than 2; hiredis 0.14 allocates an array's element
   pointers as soon as it reads its header, so a header claiming two billion would be 16 GB. */
#define ANSWER_ELEMENTS_MAX 16

static redisReplyObjectFunctions bounded_fns;
static void *(*default_create_array)(const redisReadTask *, int);

static void *create_array(const redisReadTask *t, int elements)
{
    if (elements > ANSWER_ELEMENTS_MAX) {
        if (t->privdata != NULL)
            *(int *)t->privdata = elements;
        return NULL; /* the reader fails the input */
    }
    return default_create_array(t, elements);
}

redisReader *mg__redis_reader_new(int *refused_elements)
{
    redisReader *rd = redisReaderCreate();
    if (rd == NULL)
        return NULL;
    /* hiredis's own functions make the answers (freeReplyObject frees them); only arrays go
       through the bound first. */
    if (default_create_array == NULL) {
        bounded_fns = *rd->fn;
        default_create_array = bounded_fns.createArray;
        bounded_fns.createArray = create_array;
    }
    rd->fn = &bounded_fns;
    rd->privdata = refused_elements;
    return rd;
}

/* ---- answers as Lua values ---- */

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
