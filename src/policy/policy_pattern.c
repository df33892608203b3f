/*
 * Lua patterns with a bound on their work: string.find, match, gmatch and gsub for policy states.
 *
 * LuaJIT matches patterns by backtracking in C, where the count hook that bounds a policy call
 * never runs: string.find(string.rep("a", 3000), string.rep("a-", 20) .. "b") would hold the
 * event loop for longer than the gateway will live. These functions take the place of LuaJIT's
 * four. They implement the pattern language of the Lua 5.1 manual (section 5.4.1) as LuaJIT 2.1
 * has it, corners included, so that a policy sees the same results and the same errors:
 *
 *   - the classes are ASCII only, and %g (printable but not space) exists, as in Lua 5.2;
 *   - a pattern ends at its first zero byte (use %z), but string.find still searches for a
 *     plain string over its whole length when it holds none of ^$*+?.([%-;
 *   - errors in a pattern are raised only when the match reaches them;
 *   - init is made a 32-bit integer the x86-64 way (out of range is INT32_MIN, so from the
 *     start) and an init past the end means the end; gsub's count takes the low 32 bits;
 *   - gmatch takes '^' literally; an empty match advances one byte, a longer one may be
 *     followed by an empty match where it ended;
 *   - in a gsub replacement, '%' before a non-digit stands for that byte, and a trailing '%'
 *     for a zero byte.
 *
 * What differs is that they stop. Every step (a pattern item tried, a subject byte scanned by a
 * repetition or %b, 32 bytes of a set, a back reference or a replacement) is counted, and every
 * CHECK_STEPS steps a check function says whether to go on; in a policy state it is the
 * running call's deadline, and past it the call fails with "FILE:LINE: time budget of 50 ms
 * exceeded in string.find". Recursion stops at MAX_DEPTH levels ("pattern too complex", the
 * same limit as LuaJIT's), so the C stack cannot overflow.
 *
 * The matcher does not know policy states: mg__pattern_open() installs it in any lua_State with
 * any check function (the tests compare it with LuaJIT's own in plain states), and
 * mg__policy_open_patterns() is that call with the policy's deadline. Each function keeps the
 * check function in its first upvalue, a userdata; nothing in it is reachable from Lua.
 *
 * Errors are raised with luaL_error, which LuaJIT prefixes with the caller's position as it
 * does its own; the matcher holds no resource that an error could leak.
 */
#define _GNU_SOURCE /* memmem */
#include "policy_int.h"

#include "moongate/error.h"

#include <lauxlib.h>
#include <stdio.h>
#include <string.h>

#define MAX_CAPTURES 32 /* LUA_MAXCAPTURES */
#define MAX_DEPTH 200   /* LuaJIT's LJ_MAX_XLEVEL: the same patterns are "too complex" */
#define CHECK_STEPS 1024

/* The length of a capture still open, and of a position capture "()". */
#define CAP_OPEN (-1)
#define CAP_POSITION (-2)

typedef struct pattern_guard {
    mg__pattern_check_fn check; /* NULL: depth is the only bound */
    void *ctx;
} pattern_guard_t;

/* One match attempt's state: the subject, the captures so far, and the budget. */
typedef struct matcher {
    lua_State *L;
    const char *fname; /* "find", for the error that stops it */
    const pattern_guard_t *guard;
    const char *subject;
    const char *end;
    size_t left; /* steps until the next check */
    int depth;
    int ncap;
    struct {
        const char *start;
        ptrdiff_t len; /* or CAP_OPEN, CAP_POSITION */
    } cap[MAX_CAPTURES];
} matcher_t;

static void matcher_init(matcher_t *m, lua_State *L, const char *fname, const char *s,
                         size_t len)
{
    m->L = L;
    m->fname = fname;
    m->guard = lua_touserdata(L, lua_upvalueindex(1));
    m->subject = s;
    m->end = s + len;
    m->left = CHECK_STEPS;
    m->depth = 0;
    m->ncap = 0;
}

/* Raises msg as LuaJIT's matcher would: at the caller's position. */
static void fail(matcher_t *m, const char *msg)
{
    luaL_error(m->L, "%s", msg);
}

/* Spends cost steps. Every CHECK_STEPS of them the check function may stop the match. */
static void charge(matcher_t *m, size_t cost)
{
    if (cost < m->left) {
        m->left -= cost;
        return;
    }
    m->left = CHECK_STEPS;
    if (m->guard->check == NULL)
        return;
    char why[128] = "stopped";
    if (m->guard->check(m->L, m->guard->ctx, why, sizeof(why)) != 0)
        luaL_error(m->L, "%s in string.%s", why, m->fname);
}

/* ---- single-character classes ---- */

static bool is_lower(unsigned c) { return c >= 'a' && c <= 'z'; }
static bool is_upper(unsigned c) { return c >= 'A' && c <= 'Z'; }
static bool is_digit(unsigned c) { return c >= '0' && c <= '9'; }

/* Whether c is in the class of %letter; a letter that names no class stands for itself. */
static bool class_has(unsigned c, unsigned letter)
{
    unsigned name = is_upper(letter) ? letter - 'A' + 'a' : letter;
    bool alpha = is_lower(c) || is_upper(c);
    bool in;
    switch (is_lower(name) ? name : 0) {
    case 'a': in = alpha; break;
    case 'c': in = c < 32 || c == 127; break;
    case 'd': in = is_digit(c); break;
    case 'g': in = c > 32 && c < 127; break;
    case 'l': in = is_lower(c); break;
    case 'p': in = c > 32 && c < 127 && !alpha && !is_digit(c); break;
    case 's': in = c == ' ' || (c >= '\t' && c <= '\r'); break;
    case 'u': in = is_upper(c); break;
    case 'w': in = alpha || is_digit(c); break;
    case 'x': in = is_digit(c) || ((c | 0x20) >= 'a' && (c | 0x20) <= 'f'); break;
    case 'z': in = c == 0; break;
    default: return c == letter;
    }
    return is_upper(letter) ? !in : in;
}

/* Whether c is in the set that opens at p ('[') and closes at close (its ']'). */
static bool set_has(unsigned c, const char *p, const char *close)
{
    bool member = true;
    p++;
    if (*p == '^') {
        member = false;
        p++;
    }
    for (; p < close; p++) {
        if (*p == '%') {
            p++;
            if (class_has(c, (unsigned char)*p))
                return member;
        } else if (p[1] == '-' && p + 2 < close) {
            if ((unsigned char)p[0] <= c && c <= (unsigned char)p[2])
                return member;
            p += 2;
        } else if ((unsigned char)*p == c) {
            return member;
        }
    }
    return !member;
}

/* Whether c matches the single-character class p..end (a byte, '.', %x or a set). */
static bool item_has(unsigned c, const char *p, const char *end)
{
    switch (*p) {
    case '.': return true;
    case '%': return class_has(c, (unsigned char)p[1]);
    case '[': return set_has(c, p, end - 1);
    default: return (unsigned char)*p == c;
    }
}

/* Where the single-character class at p ends, or an error if it is malformed. */
static const char *item_end(matcher_t *m, const char *p)
{
    if (*p == '%') {
        if (p[1] == '\0')
            fail(m, "malformed pattern (ends with '%')");
        return p + 2;
    }
    if (*p != '[')
        return p + 1;
    p++;
    if (*p == '^')
        p++;
    /* The first member may be ']' itself; a '%' hides the byte after it. */
    do {
        if (*p == '\0')
            fail(m, "malformed pattern (missing ']')");
        if (*p == '%' && p[1] != '\0')
            p++;
        p++;
    } while (*p != ']');
    return p + 1;
}

/* ---- the matcher ---- */

static const char *match(matcher_t *m, const char *s, const char *p);

/* The subject byte at s, or the zero byte past its end, as %f and %b see it. */
static unsigned byte_at(const matcher_t *m, const char *s)
{
    return s < m->end ? (unsigned char)*s : 0;
}

/* %bxy at s, with p pointing at x: the end of the balanced run, or NULL. */
static const char *match_balance(matcher_t *m, const char *s, const char *p)
{
    if (p[0] == '\0' || p[1] == '\0')
        fail(m, "unbalanced pattern");
    if (s >= m->end || *s != p[0])
        return NULL;
    size_t open = 1;
    while (++s < m->end) {
        charge(m, 1);
        if (*s == p[1]) {
            if (--open == 0)
                return s + 1;
        } else if (*s == p[0]) {
            open++;
        }
    }
    return NULL;
}

/* %1-%9 (digit is the character) at s: the end of the repeated text, or NULL. */
static const char *match_backref(matcher_t *m, const char *s, int digit)
{
    int i = digit - '1';
    if (i < 0 || i >= m->ncap || m->cap[i].len == CAP_OPEN)
        fail(m, "invalid capture index");
    if (m->cap[i].len == CAP_POSITION)
        return NULL; /* a position is not text: it matches nothing */
    size_t len = (size_t)m->cap[i].len;
    charge(m, len / 32);
    if ((size_t)(m->end - s) < len || memcmp(m->cap[i].start, s, len) != 0)
        return NULL;
    return s + len;
}

/* The item p..ep repeated as often as it matches, then fewer times, before the rest. */
static const char *match_greedy(matcher_t *m, const char *s, const char *p, const char *ep)
{
    size_t cost = 1 + (size_t)(ep - p) / 32;
    size_t n = 0;
    while (s + n < m->end && item_has((unsigned char)s[n], p, ep)) {
        charge(m, cost);
        n++;
    }
    for (;;) {
        const char *r = match(m, s + n, ep + 1);
        if (r != NULL || n == 0)
            return r;
        n--;
    }
}

/* The item p..ep repeated as few times as lets the rest match. */
static const char *match_lazy(matcher_t *m, const char *s, const char *p, const char *ep)
{
    size_t cost = (size_t)(ep - p) / 32;
    for (;;) {
        const char *r = match(m, s, ep + 1);
        if (r != NULL)
            return r;
        charge(m, cost);
        if (s >= m->end || !item_has((unsigned char)*s, p, ep))
            return NULL;
        s++;
    }
}

static const char *capture_open(matcher_t *m, const char *s, const char *p, ptrdiff_t kind)
{
    if (m->ncap >= MAX_CAPTURES)
        fail(m, "too many captures");
    m->cap[m->ncap].start = s;
    m->cap[m->ncap].len = kind;
    m->ncap++;
    const char *r = match(m, s, p);
    if (r == NULL)
        m->ncap--;
    return r;
}

static const char *capture_close(matcher_t *m, const char *s, const char *p)
{
    int i = m->ncap - 1;
    while (i >= 0 && m->cap[i].len != CAP_OPEN)
        i--;
    if (i < 0)
        fail(m, "invalid pattern capture");
    m->cap[i].len = s - m->cap[i].start;
    const char *r = match(m, s, p);
    if (r == NULL)
        m->cap[i].len = CAP_OPEN;
    return r;
}

static const char *leave(matcher_t *m, const char *r)
{
    m->depth--;
    return r;
}

/*
 * Matches the pattern p (up to its zero byte) at s. Returns where the match ends, or NULL.
 *
 * Each level of recursion is a choice to come back to (a capture, a repetition, a '?'); an
 * item that leaves no choice loops instead. The levels are those of LuaJIT's matcher, so that
 * the same patterns meet MAX_DEPTH.
 */
static const char *match(matcher_t *m, const char *s, const char *p)
{
    if (++m->depth > MAX_DEPTH)
        fail(m, "pattern too complex");
    for (;;) {
        charge(m, 1);
        switch (*p) {
        case '\0':
            return leave(m, s);
        case '(':
            if (p[1] == ')')
                return leave(m, capture_open(m, s, p + 2, CAP_POSITION));
            return leave(m, capture_open(m, s, p + 1, CAP_OPEN));
        case ')':
            return leave(m, capture_close(m, s, p + 1));
        case '$':
            if (p[1] == '\0')
                return leave(m, s == m->end ? s : NULL);
            break; /* elsewhere a '$' is a byte */
        case '%':
            if (p[1] == 'b') {
                s = match_balance(m, s, p + 2);
                if (s == NULL)
                    return leave(m, NULL);
                p += 4;
                continue;
            }
            if (p[1] == 'f') {
                p += 2;
                if (*p != '[')
                    fail(m, "missing '[' after '%f' in pattern");
                const char *ep = item_end(m, p);
                charge(m, (size_t)(ep - p) / 16);
                unsigned before = s == m->subject ? 0 : (unsigned char)s[-1];
                if (set_has(before, p, ep - 1) || !set_has(byte_at(m, s), p, ep - 1))
                    return leave(m, NULL);
                p = ep;
                continue;
            }
            if (is_digit((unsigned char)p[1])) {
                s = match_backref(m, s, (unsigned char)p[1]);
                if (s == NULL)
                    return leave(m, NULL);
                p += 2;
                continue;
            }
            break;
        }

        const char *ep = item_end(m, p);
        charge(m, (size_t)(ep - p) / 32);
        bool one = s < m->end && item_has((unsigned char)*s, p, ep);
        switch (*ep) {
        case '?':
            if (one) {
                const char *r = match(m, s + 1, ep + 1);
                if (r != NULL)
                    return leave(m, r);
            }
            p = ep + 1;
            continue;
        case '*':
            return leave(m, match_greedy(m, s, p, ep));
        case '+':
            return leave(m, one ? match_greedy(m, s + 1, p, ep) : NULL);
        case '-':
            return leave(m, match_lazy(m, s, p, ep));
        default:
            if (!one)
                return leave(m, NULL);
            s++;
            p = ep;
        }
    }
}

/* Runs the pattern at s from the top: no captures, no depth. */
static const char *match_at(matcher_t *m, const char *s, const char *p)
{
    m->ncap = 0;
    m->depth = 0;
    return match(m, s, p);
}

/* ---- results ---- */

/*
 * Pushes capture i; when the pattern has no captures, capture 0 is the whole match s..e. A
 * string costs steps for its length: a replacement may copy a long capture many times.
 *
 *   in:  ...        out: ... capture
 */
static void push_capture(matcher_t *m, int i, const char *s, const char *e)
{
    if (i >= m->ncap) {
        if (i != 0)
            fail(m, "invalid capture index");
        charge(m, (size_t)(e - s) / 32);
        lua_pushlstring(m->L, s, (size_t)(e - s));
    } else if (m->cap[i].len == CAP_OPEN) {
        fail(m, "unfinished capture");
    } else if (m->cap[i].len == CAP_POSITION) {
        lua_pushinteger(m->L, m->cap[i].start - m->subject + 1);
    } else {
        charge(m, (size_t)m->cap[i].len / 32);
        lua_pushlstring(m->L, m->cap[i].start, (size_t)m->cap[i].len);
    }
}

/* Pushes every capture, or the whole match when there are none and s is not NULL (find
 * passes NULL: it returns the bounds instead). Returns how many it pushed. */
static int push_captures(matcher_t *m, const char *s, const char *e)
{
    int n = m->ncap == 0 && s != NULL ? 1 : m->ncap;
    luaL_checkstack(m->L, n, "too many captures");
    for (int i = 0; i < n; i++)
        push_capture(m, i, s, e);
    return n;
}

/* A number argument made an int32_t as LuaJIT's lj_num2int does on x86-64: truncated, and
 * INT32_MIN when out of range or NaN. */
static int32_t num_to_int32(lua_Number n)
{
    if (n > -2147483649.0 && n < 2147483648.0)
        return (int32_t)n;
    return INT32_MIN;
}

/* A number argument as luaL_optint makes it on x86-64: to 64 bits (INT64_MIN when out of
 * range or NaN), then the low 32 bits. */
static int num_to_int_wrapped(lua_Number n)
{
    int64_t v = INT64_MIN;
    if (n >= -9223372036854775808.0 && n < 9223372036854775808.0)
        v = (int64_t)n;
    return (int)(int32_t)(uint32_t)(uint64_t)v;
}

/* Whether string.find must treat p as a pattern: it holds one of LuaJIT's special bytes,
 * zero bytes included in the search. */
static bool has_specials(const char *p, size_t len)
{
    for (size_t i = 0; i < len; i++) {
        if (p[i] != '\0' && strchr("^$*+?.([%-", p[i]) != NULL)
            return true;
    }
    return false;
}

/*
 * string.find (find true) and string.match.
 *
 *   in:  [1]=s [2]=pattern [3]=init [4]=plain        out: start end captures... | captures... | nil
 */
static int pattern_search(lua_State *L, bool find)
{
    size_t slen, plen;
    const char *s = luaL_checklstring(L, 1, &slen);
    const char *p = luaL_checklstring(L, 2, &plen);
    int64_t init = num_to_int32(luaL_optnumber(L, 3, 1));
    if (init < 0)
        init += (int64_t)slen;
    else
        init--;
    if (init < 0)
        init = 0;
    if (init > (int64_t)slen)
        init = (int64_t)slen;

    if (find && (lua_toboolean(L, 4) || !has_specials(p, plen))) {
        const char *q = plen == 0 ? s + init : memmem(s + init, slen - (size_t)init, p, plen);
        if (q == NULL) {
            lua_pushnil(L);
            return 1;
        }
        lua_pushinteger(L, q - s + 1);
        lua_pushinteger(L, q - s + (ptrdiff_t)plen);
        return 2;
    }

    matcher_t m;
    matcher_init(&m, L, find ? "find" : "match", s, slen);
    bool anchored = *p == '^';
    if (anchored)
        p++;
    for (const char *at = s + init;; at++) {
        const char *e = match_at(&m, at, p);
        if (e != NULL) {
            if (!find)
                return push_captures(&m, at, e);
            lua_pushinteger(L, at - s + 1);
            lua_pushinteger(L, e - s);
            return push_captures(&m, NULL, NULL) + 2;
        }
        if (anchored || at == m.end)
            break;
    }
    lua_pushnil(L);
    return 1;
}

static int l_find(lua_State *L)
{
    return pattern_search(L, true);
}

static int l_match(lua_State *L)
{
    return pattern_search(L, false);
}

/*
 * The iterator string.gmatch returns; the offset to go on from is its fourth upvalue.
 *
 *   upvalues: [1]=guard [2]=s [3]=pattern [4]=offset        out: captures... | nothing
 */
static int gmatch_next(lua_State *L)
{
    size_t slen;
    const char *s = lua_tolstring(L, lua_upvalueindex(2), &slen);
    const char *p = lua_tostring(L, lua_upvalueindex(3));
    size_t from = (size_t)lua_tonumber(L, lua_upvalueindex(4));
    matcher_t m;
    matcher_init(&m, L, "gmatch", s, slen);
    for (size_t i = from; i <= slen; i++) {
        const char *e = match_at(&m, s + i, p);
        if (e != NULL) {
            /* After an empty match, go on one byte further; after any other, where it ended. */
            size_t next = (size_t)(e - s) + (e == s + i ? 1 : 0);
            lua_pushnumber(L, (lua_Number)next);
            lua_replace(L, lua_upvalueindex(4));
            return push_captures(&m, s + i, e);
        }
    }
    return 0;
}

/*   in:  [1]=s [2]=pattern        out: iterator */
static int l_gmatch(lua_State *L)
{
    luaL_checkstring(L, 1);
    luaL_checkstring(L, 2);
    lua_settop(L, 2);
    lua_pushvalue(L, lua_upvalueindex(1));
    lua_insert(L, 1);
    lua_pushinteger(L, 0);
    lua_pushcclosure(L, gmatch_next, 4);
    return 1;
}

/* Adds the string replacement at index 3 for the match s..e: %0 the match, %1-%9 captures,
 * '%' before anything else that byte. */
static void add_template(matcher_t *m, luaL_Buffer *b, const char *s, const char *e)
{
    size_t len;
    const char *r = lua_tolstring(m->L, 3, &len);
    charge(m, len / 32);
    for (size_t i = 0; i < len; i++) {
        if (r[i] != '%') {
            luaL_addchar(b, r[i]);
            continue;
        }
        /* r[len] is the string's terminating zero: a trailing '%' adds a zero byte. */
        i++;
        if (!is_digit((unsigned char)r[i])) {
            luaL_addchar(b, r[i]);
        } else if (r[i] == '0') {
            charge(m, (size_t)(e - s) / 32);
            luaL_addlstring(b, s, (size_t)(e - s));
        } else {
            push_capture(m, r[i] - '1', s, e);
            luaL_addvalue(b);
        }
    }
}

/*
 * Adds the replacement for the match s..e: the string's expansion, the function's result for
 * the captures, or the table's value for the first capture; nil or false keeps the match.
 *
 *   in:  ... [buffer]        out: ... [buffer with the replacement]
 */
static void add_replacement(matcher_t *m, luaL_Buffer *b, const char *s, const char *e)
{
    lua_State *L = m->L;
    switch (lua_type(L, 3)) {
    case LUA_TFUNCTION: {
        lua_pushvalue(L, 3);
        int n = push_captures(m, s, e);
        lua_call(L, n, 1);
        break;
    }
    case LUA_TTABLE:
        push_capture(m, 0, s, e);
        lua_gettable(L, 3);
        break;
    default:
        add_template(m, b, s, e);
        return;
    }
    if (!lua_toboolean(L, -1)) {
        lua_pop(L, 1);
        lua_pushlstring(L, s, (size_t)(e - s));
    } else if (!lua_isstring(L, -1)) {
        luaL_error(L, "invalid replacement value (a %s)", luaL_typename(L, -1));
    }
    luaL_addvalue(b);
}

/*   in:  [1]=s [2]=pattern [3]=replacement [4]=max        out: result count */
static int l_gsub(lua_State *L)
{
    size_t slen;
    const char *src = luaL_checklstring(L, 1, &slen);
    const char *p = luaL_checkstring(L, 2);
    int rtype = lua_type(L, 3);
    int max = lua_isnoneornil(L, 4) ? (int)(slen + 1) : num_to_int_wrapped(luaL_checknumber(L, 4));
    bool anchored = *p == '^';
    if (anchored)
        p++;
    if (rtype != LUA_TNUMBER && rtype != LUA_TSTRING && rtype != LUA_TFUNCTION &&
        rtype != LUA_TTABLE)
        luaL_argerror(L, 3, "string/function/table expected");

    luaL_Buffer b;
    luaL_buffinit(L, &b);
    matcher_t m;
    matcher_init(&m, L, "gsub", src, slen);
    const char *at = src;
    int n = 0;
    while (n < max) {
        const char *e = match_at(&m, at, p);
        if (e != NULL) {
            n++;
            add_replacement(&m, &b, at, e);
        }
        if (e != NULL && e > at)
            at = e;
        else if (at < m.end)
            luaL_addchar(&b, *at++);
        else
            break;
        if (anchored)
            break;
    }
    luaL_addlstring(&b, at, (size_t)(m.end - at));
    luaL_pushresult(&b);
    lua_pushinteger(L, n);
    return 2;
}

/* ---- installing ---- */

void mg__pattern_open(lua_State *L, mg__pattern_check_fn check, void *ctx)
{
    static const luaL_Reg fns[] = {
        { "find", l_find },
        { "match", l_match },
        { "gmatch", l_gmatch },
        { "gsub", l_gsub },
    };
    /* ... string guard */
    lua_getglobal(L, "string");
    if (!lua_istable(L, -1)) {
        lua_pop(L, 1);
        return;
    }
    pattern_guard_t *g = lua_newuserdata(L, sizeof(*g));
    g->check = check;
    g->ctx = ctx;
    for (size_t i = 0; i < sizeof(fns) / sizeof(fns[0]); i++) {
        lua_pushvalue(L, -1);
        lua_pushcclosure(L, fns[i].func, 1);
        lua_setfield(L, -3, fns[i].name);
    }
    lua_pop(L, 2);
}

/*
 * The check function of policy states: past the running call's deadline it marks the call
 * timed out, as the count hook does. It also makes the hook run at every instruction, as the
 * hook itself does once the deadline has passed, so that a pcall around the pattern function
 * cannot keep the policy running; the call path restores the hook's interval afterwards.
 */
static int policy_deadline(lua_State *L, void *ctx, char *why, size_t whylen)
{
    mg_policy_state_t *st = mg__policy_state_of(L);
    if (!st->in_call || (!st->timed_out && uv_hrtime() < st->deadline_ns))
        return 0;
    if (!st->timed_out) {
        st->timed_out = true;
        lua_Hook hook = lua_gethook(L);
        if (hook != NULL)
            lua_sethook(L, hook, lua_gethookmask(L), 1);
    }
    snprintf(why, whylen, "time budget of %d ms exceeded", (int)st->budget_ms);
    return MG_ETIMEDOUT;
}

void mg__policy_open_patterns(lua_State *L)
{
    mg__pattern_open(L, policy_deadline, NULL);
}
