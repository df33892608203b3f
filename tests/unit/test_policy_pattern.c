/*
 * Tests of src/policy/policy_pattern.c: moongate's string.find, match, gmatch and gsub.
 *
 * The differential tests run the same Lua expression in two plain states, one with LuaJIT's own
 * pattern functions and one with ours (no check function), and require the same results and the
 * same errors: first a hand-written table that walks every feature, corner and error, then a few
 * thousand cases generated from a fixed seed. The policy tests check what ours add: a runaway
 * pattern in a hook is stopped at the call's time budget, even under pcall, and the state serves
 * the next call; a pattern nested too deeply fails with "pattern too complex".
 */
#include "test_policy_util.h"

#include <lauxlib.h>
#include <lualib.h>

/* ---- the differential harness ---- */

/* Helpers both states define. G collects what gmatch yields into one flat list: for each match,
 * how many values, then the values. F is a replacement function whose answer varies with how
 * often it has been called (a string of its arguments, nil, false). Neither uses patterns. */
static const char prelude[] =
    "function G(s, p)\n"
    "  local it, out = string.gmatch(s, p), {}\n"
    "  local function add(n, ...)\n"
    "    if n == 0 then return false end\n"
    "    out[#out + 1] = n\n"
    "    for i = 1, n do out[#out + 1] = (select(i, ...)) end\n"
    "    return true\n"
    "  end\n"
    "  local function step(...) return add(select('#', ...), ...) end\n"
    "  while step(it()) do end\n"
    "  return unpack(out)\n"
    "end\n"
    "calls = 0\n"
    "function F(...)\n"
    "  calls = calls + 1\n"
    "  if calls % 3 == 0 then return nil end\n"
    "  if calls % 5 == 0 then return false end\n"
    "  return table.concat({ select('#', ...), ... }, ',')\n"
    "end\n"
    "T = { a = 'A', b = false, ab = 'AB', [1] = 'one', [2] = 2, ['%'] = 'pct' }\n";

static lua_State *diff_state(bool ours)
{
    lua_State *L = luaL_newstate();
    assert_non_null(L);
    luaL_openlibs(L);
    if (ours)
        mg__pattern_open(L, NULL, NULL);
    assert_int_equal(luaL_loadbuffer(L, prelude, sizeof(prelude) - 1, "=prelude"), 0);
    assert_int_equal(lua_pcall(L, 0, 0, 0), 0);
    return L;
}

/* Drops the "chunk:line: " that an error raised from Lua code starts with. */
static const char *strip_position(const char *msg)
{
    const char *p = msg;
    while (*p != '\0' && *p != ':' && *p != ' ')
        p++;
    if (*p != ':' || p[1] < '0' || p[1] > '9')
        return msg;
    p++;
    while (*p >= '0' && *p <= '9')
        p++;
    return strncmp(p, ": ", 2) == 0 ? p + 2 : msg;
}

/* Appends a printable form of the value at idx: its type, and its bytes escaped. */
static void describe_value(lua_State *L, int idx, luaL_Buffer *b)
{
    char tmp[64];
    switch (lua_type(L, idx)) {
    case LUA_TNUMBER:
        snprintf(tmp, sizeof(tmp), "n:%.17g", lua_tonumber(L, idx));
        luaL_addstring(b, tmp);
        break;
    case LUA_TSTRING: {
        size_t len;
        const char *s = lua_tolstring(L, idx, &len);
        luaL_addstring(b, "s:\"");
        for (size_t i = 0; i < len; i++) {
            unsigned char c = (unsigned char)s[i];
            if (c < 32 || c >= 127 || c == '"' || c == '\\') {
                snprintf(tmp, sizeof(tmp), "\\x%02x", c);
                luaL_addstring(b, tmp);
            } else {
                luaL_addchar(b, (char)c);
            }
        }
        luaL_addchar(b, '"');
        break;
    }
    case LUA_TBOOLEAN:
        luaL_addstring(b, lua_toboolean(L, idx) ? "true" : "false");
        break;
    default:
        luaL_addstring(b, luaL_typename(L, idx));
    }
}

/*
 * Runs "return <expr>" in L and writes what came of it to out: "ok" and every result, or "error"
 * and the message without its position (the message with it goes to raw, when not NULL).
 */
static void eval(lua_State *L, const char *expr, char *out, size_t cap, char *raw, size_t rawcap)
{
    lua_settop(L, 0);
    lua_pushfstring(L, "return %s", expr);
    int rc = luaL_loadbuffer(L, lua_tostring(L, 1), lua_objlen(L, 1), "=case");
    if (rc == 0)
        rc = lua_pcall(L, 0, LUA_MULTRET, 0);
    int top = lua_gettop(L);
    luaL_Buffer b;
    luaL_buffinit(L, &b);
    if (rc != 0) {
        const char *msg = lua_tostring(L, top);
        if (msg == NULL)
            msg = "(not a string)";
        if (raw != NULL)
            snprintf(raw, rawcap, "%s", msg);
        luaL_addstring(&b, "error ");
        luaL_addstring(&b, strip_position(msg));
    } else {
        luaL_addstring(&b, "ok");
        for (int i = 2; i <= top; i++) {
            luaL_addchar(&b, ' ');
            describe_value(L, i, &b);
        }
        if (raw != NULL)
            raw[0] = '\0';
    }
    luaL_pushresult(&b);
    snprintf(out, cap, "%s", lua_tostring(L, -1));
    lua_settop(L, 0);
}

typedef struct diff {
    lua_State *native;
    lua_State *ours;
    int cases;
    int errors;       /* cases in which both raised an error */
    int failures;     /* cases that differ */
    int raw_differs;  /* errors equal but for their position */
} diff_t;

static void diff_open(diff_t *d)
{
    memset(d, 0, sizeof(*d));
    d->native = diff_state(false);
    d->ours = diff_state(true);
    /* The second state really runs ours. */
    lua_getglobal(d->native, "string");
    lua_getfield(d->native, -1, "gsub");
    lua_getglobal(d->ours, "string");
    lua_getfield(d->ours, -1, "gsub");
    assert_true(lua_tocfunction(d->native, -1) != lua_tocfunction(d->ours, -1));
    lua_settop(d->native, 0);
    lua_settop(d->ours, 0);
}

static void diff_close(diff_t *d)
{
    lua_close(d->native);
    lua_close(d->ours);
}

/* Sets a global in both states. */
static void diff_set_string(diff_t *d, const char *name, const char *s, size_t len)
{
    lua_pushlstring(d->native, s, len);
    lua_setglobal(d->native, name);
    lua_pushlstring(d->ours, s, len);
    lua_setglobal(d->ours, name);
}

static void diff_set_number(diff_t *d, const char *name, double n)
{
    lua_pushnumber(d->native, n);
    lua_setglobal(d->native, name);
    lua_pushnumber(d->ours, n);
    lua_setglobal(d->ours, name);
}

/* Runs expr in both states and counts a failure when they disagree; context says which case
 * it was when the expression alone does not. */
static void diff_check(diff_t *d, const char *expr, const char *context)
{
    static char want[16384], got[16384], want_raw[1024], got_raw[1024];
    diff_set_number(d, "calls", 0);
    eval(d->native, expr, want, sizeof(want), want_raw, sizeof(want_raw));
    eval(d->ours, expr, got, sizeof(got), got_raw, sizeof(got_raw));
    d->cases++;
    if (strcmp(want, got) != 0) {
        if (d->failures++ < 30)
            print_message("DIFFERS: %s%s\n  luajit: %s\n  ours:   %s\n", expr,
                          context != NULL ? context : "", want, got);
        return;
    }
    if (strncmp(want, "error", 5) == 0) {
        d->errors++;
        if (strcmp(want_raw, got_raw) != 0 && d->raw_differs++ < 5)
            print_message("position differs: %s%s\n  luajit: %s\n  ours:   %s\n", expr,
                          context != NULL ? context : "", want_raw, got_raw);
    }
}

/* ---- the hand-written table ---- */

static const char *const table_cases[] = {
    /* Single bytes and '.'. */
    "string.find('hello', 'l')",
    "string.find('hello', 'lo')",
    "string.find('hello', 'xyz')",
    "string.find('hello', '.')",
    "string.find('', '.')",
    "string.find('', '')",
    "string.match('hello', '..')",
    "string.match('a\\0b', 'a.b')",
    "string.match('a\\0b', '%z')",
    "string.find('a\\0b', '%Z+')",
    /* Every class and its complement, over every byte. */
    "string.gsub(ALL, '%a', '')", "string.gsub(ALL, '%A', '')",
    "string.gsub(ALL, '%c', '')", "string.gsub(ALL, '%C', '')",
    "string.gsub(ALL, '%d', '')", "string.gsub(ALL, '%D', '')",
    "string.gsub(ALL, '%g', '')", "string.gsub(ALL, '%G', '')",
    "string.gsub(ALL, '%l', '')", "string.gsub(ALL, '%L', '')",
    "string.gsub(ALL, '%p', '')", "string.gsub(ALL, '%P', '')",
    "string.gsub(ALL, '%s', '')", "string.gsub(ALL, '%S', '')",
    "string.gsub(ALL, '%u', '')", "string.gsub(ALL, '%U', '')",
    "string.gsub(ALL, '%w', '')", "string.gsub(ALL, '%W', '')",
    "string.gsub(ALL, '%x', '')", "string.gsub(ALL, '%X', '')",
    "string.gsub(ALL, '%z', '')", "string.gsub(ALL, '%Z', '')",
    "string.gsub(ALL, '[%a%d]', '')", "string.gsub(ALL, '[^%s%p]', '')",
    /* A letter that names no class, and escapes of everything else. */
    "string.gsub(ALL, '%q', '')", "string.gsub(ALL, '%Q', '')", "string.gsub(ALL, '%b', '')",
    "string.gsub(ALL, '%e', '')", "string.gsub(ALL, '%_', '')", "string.gsub(ALL, '%\\200', '')",
    "string.find('a.b', '%.')", "string.find('a%b', '%%')", "string.find('a]b', '%]')",
    "string.find('a(b', '%(')", "string.find('a)b', '%)')", "string.find('a-b', '%-')",
    "string.find('a^b', '%^')", "string.find('a$b', '%$')", "string.find('a[b', '%[')",
    "string.find('a*b', '%*')", "string.find('a+b', '%+')", "string.find('a?b', '%?')",
    "string.find('a b', '% ')", "string.find('a\\0b', '%\\0')",
    /* Sets. */
    "string.match('hello world', '[aeiou]+')",
    "string.match('hello world', '[^aeiou]+')",
    "string.match('x-y', '[a-]+')", "string.match('x-y', '[-a]+')", "string.match('-a-', '[-a]+')",
    "string.match('ab]c', '[]]')", "string.match('ab]c', '[^]]+')", "string.match(']]]x', '[]a]+')",
    "string.match('ab^c', '[b^]+')", "string.match('^^a', '[\\\\^]+')", "string.match('^a', '[%^a]+')",
    "string.match('a%b', '[%%]')", "string.match('a]b', '[%]]')", "string.match('a-b', '[%-]')",
    "string.match('az09', '[a-z]+')", "string.match('az09', '[0-9]+')", "string.match('bcd', '[z-a]')",
    "string.match('a1_-', '[%w_]+')", "string.match('a1_-', '[_%w]+')", "string.match('x', '[%a-z]')",
    "string.match('-', '[%a-z]')", "string.match('5', '[%d-]')", "string.match('a', '[a-a]')",
    "string.match('\\200\\255', '[\\128-\\255]+')", "string.match('abc', '[^]')",
    "string.match(']', '[]')", "string.match('a', '[^a-]')", "string.match('-', '[^a-]')",
    "string.match('ab', '[a][b]')", "string.match('[', '[[]')", "string.match('x[', '[^[]')",
    /* Quantifiers. */
    "string.match('aaab', 'a*')", "string.match('aaab', 'a+')", "string.match('aaab', 'a-')",
    "string.match('aaab', 'a-b')", "string.match('aaab', 'a?')", "string.match('aaab', 'a?a?a?a?b')",
    "string.match('b', 'a+')", "string.match('b', 'a*b')", "string.match('<a><b>', '<(.-)>')",
    "string.match('<a><b>', '<(.*)>')", "string.find('aaa', 'a-', 2)", "string.find('aaa', '.-$')",
    "string.match('ab', '*')", "string.match('a*', 'a*')", "string.match('+', '+')",
    "string.match('?x', '?x')", "string.match('-', '-')", "string.match('ab', 'a**')",
    "string.match('xyz', 'x?y?z?w?')", "string.match('key = value', '(%w+)%s*=%s*(%w+)')",
    /* Anchors. */
    "string.find('hello', '^h')", "string.find('hello', '^e')", "string.find('hello', 'o$')",
    "string.find('hello', 'l$')", "string.find('a$b', 'a$b')", "string.find('a^b', 'a^b')",
    "string.find('^a', '^^a')", "string.find('hello', '^hello$')", "string.find('', '^$')",
    "string.find('x', '$')", "string.find('x', '^')", "string.match('a$', '$$')",
    "string.find('ab', '^b', 2)", "string.match('ab', '^b', 2)", "string.find('ab', '^b', -1)",
    /* Captures. */
    "string.match('hello', '(h)(e)(l)(l)(o)')", "string.find('hello', '(l)(l)')",
    "string.match('hello', '()ll()')", "string.find('hello', '()')", "string.match('', '()')",
    "string.match('hello', '((l)(l))')", "string.match('hello', '(h(e(l)))')",
    "string.match('abc', '(a)()(b)()(c)')", "string.match('abc', '()()()')",
    "string.match('abc', '(a')", "string.find('abc', '(a')", "string.match('abc', 'a)')",
    "string.match('abc', '(a))')", "string.match('abc', '((a)')", "string.gsub('abc', '(', 'x')",
    "string.match('abc', ')')", "string.match('x', '()x)')",
    "string.match(string.rep('a', 40), string.rep('(a)', 32))",
    "string.match(string.rep('a', 40), string.rep('(a)', 33))",
    "string.match(string.rep('a', 40), string.rep('()', 32))",
    "string.match(string.rep('a', 40), string.rep('()', 33))",
    "select('#', string.match(string.rep('a', 40), string.rep('(a)', 32)))",
    /* Back references. */
    "string.match('abab', '(ab)%1')", "string.match('abac', '(ab)%1')",
    "string.find('xaax', '(a)%1')", "string.match('aa', '(a)%2')", "string.match('aa', '%1')",
    "string.match('aa', '(a%1)')", "string.match('aa', '(a)%0')", "string.match('aa', '()%1')",
    "string.match('1aa', '()%1')", "string.match('say \"hi\" ok', '([\"\\'])(.-)%1')",
    "string.match('abcabc', '(a)(b)(c)%1%2%3')", "string.match('aa', '(a)(a)(a)(a)(a)(a)(a)(a)(a)%9')",
    "string.match(string.rep('a', 20), '(a)(a)(a)(a)(a)(a)(a)(a)(a)(a)%9')",
    "string.match('', '(.-)%1')", "string.match('x', '(%1)')",
    /* %b. */
    "string.match('f(a(b)c)d', '%b()')", "string.match('f(a(b)c d', '%b()')",
    "string.match('(x', '%b()')", "string.match('x)', '%b()')", "string.match('aXbXb', '%bab')",
    "string.match('[[]]', '%b[]')", "string.match('<<>>', '%b<>.')", "string.match('aa', '%baa')",
    "string.match('abba', '%bab')", "string.match('x', '%b')", "string.match('x', '%bx')",
    "string.match('', '%bxy')", "string.match('(', '%b(')", "string.match('()', '%b()%b()')",
    "string.gsub('(a)(b)((c))', '%b()', '#')",
    /* %f. */
    "string.find('THE (quick) fox', '%f[%a]%a+')", "string.gsub('the quick fox', '%f[%w]%w+', 'X')",
    "string.find('abc', '%f[%l]')", "string.find('abc', '%f[^%l]')", "string.find('', '%f[%z]')",
    "string.find('a', '%f[%z]')", "string.find('a', '%f[^%z]')", "string.find('a b', '%f[%s]')",
    "string.match('x', '%f')", "string.match('x', '%fa')", "string.match('x', '%f[a')",
    "string.match('x', '%f[')", "string.gsub('THE (quick) fox', '%f[%a]', '|')",
    "string.gsub('ab  cd', '%f[%S]', '<')", "string.gsub('ab  cd', '%f[%s]', '>')",
    /* Malformed patterns, and errors raised only when the match reaches them. */
    "string.find('a', '%')", "string.find('a', 'a%')", "string.find('a', '[a')",
    "string.find('a', '[')", "string.find('a', '[^')", "string.find('a', '[%')",
    "string.find('a', '[a%]')", "string.find('a', '[]')", "string.find('a', '[^]')",
    "string.find('a', 'b%')", "string.find('a', 'b[')", "string.find('a', 'x(')",
    "string.find('a', 'a(')", "string.find('', '%')", "string.find('b', '^a%')",
    "string.gsub('aaa', 'a%', 'x')", "G('aaa', 'b[')", "G('aaa', 'a[')",
    /* Patterns end at their first zero byte; find's plain search does not. */
    "string.find('a\\0b', '\\0b')", "string.find('a\\0b', 'a\\0.')", "string.find('a\\0b', '\\0.')",
    "string.match('a\\0b', 'a\\0b')", "string.match('ab', 'x\\0')", "string.gsub('a\\0b', '\\0', '-')",
    "string.find('a\\0b', '[\\0]')", "string.find('a\\0b', '%z')", "string.find('x\\0', '\\0', 1, true)",
    "G('a\\0b', '\\0')", "string.find('ab', 'b\\0%')",
    /* find's plain search. */
    "string.find('a.b', '.', 1, true)", "string.find('a.b', '.', 3, true)",
    "string.find('a+b', '+', 1, 1)", "string.find('a+b', '+', 1, false)", "string.find('a+b', '+', 1, nil)",
    "string.find('a(b', '(', 1, true)", "string.find('a(b', '(')", "string.find('abc', '', 10, true)",
    "string.find('abc', '', 2, true)", "string.find('abc', 'c', -1, true)", "string.find('abcabc', 'abc', 2, true)",
    "string.find('ab', 'abc', 1, true)", "string.find('a;b', ';')", "string.find('a]b', ']')",
    "string.find('a{b', '{')", "string.find('a!b', '!')",
    /* init. */
    "string.find('hello', 'l', 1)", "string.find('hello', 'l', 4)", "string.find('hello', 'l', 5)",
    "string.find('hello', 'l', 0)", "string.find('hello', 'l', -1)", "string.find('hello', 'l', -2)",
    "string.find('hello', 'l', -100)", "string.find('hello', 'l', 100)", "string.find('hello', '', 100)",
    "string.find('hello', '', 6)", "string.find('hello', '', 7)", "string.find('hello', '$', 100)",
    "string.match('hello', '.*', 3)", "string.match('hello', '.*', -2)", "string.match('hello', '()', 100)",
    "string.find('hello', 'l', 2.9)", "string.find('hello', 'l', -2.9)", "string.find('hello', 'l', '3')",
    "string.find('hello', 'l', ' 0x3 ')", "string.find('hello', 'e', 2^31)", "string.find('hello', 'e', -2^31)",
    "string.find('hello', 'e', 2^31 - 1)", "string.find('hello', 'e', -2^31 - 1)", "string.find('hello', 'e', 2^32 + 2)",
    "string.find('hello', 'e', 1e300)", "string.find('hello', 'e', -1e300)", "string.find('hello', 'e', 1/0)",
    "string.find('hello', 'e', -1/0)", "string.find('hello', 'e', 0/0)", "string.match('hello', '.', 2^40)",
    "string.find('hello', 'l', nil)", "string.find('hello', 'l', {})", "string.find('hello', 'l', 'x')",
    "string.find('hello', 'l', true)", "string.match('hello', 'l', '')",
    /* Argument checks and coercions. */
    "string.find()", "string.find('a')", "string.find(nil, 'a')", "string.find('a', nil)",
    "string.find({}, 'a')", "string.find('a', {})", "string.find(12345, 3)", "string.find(12345, 3.5)",
    "string.match()", "string.match(1.5, '%.')", "string.match('a', true)", "string.gmatch()",
    "string.gmatch('a')", "G(123, 2)", "string.gsub()", "string.gsub('a')", "string.gsub('a', 'a')",
    "string.gsub('a', 'a', true)", "string.gsub('a', 'a', nil)", "string.gsub('a', 'a', 'b', 'x')",
    "string.gsub('a', 'a', 'b', {})", "string.gsub('a', 'a', true, 'x')", "string.gsub(1, 1, 2)",
    "string.gsub('a1', 1, 2.5)", "string.gsub(nil, 'a', 'b')", "string.gsub('a', nil, 'b')",
    "('hello'):find('l')", "('hello'):match('(h)(e)')", "('hello'):gsub('l', 'L')",
    "select('#', ('x'):find('y'))", "select('#', string.find('x', 'x'))", "select('#', string.match('x', 'y'))",
    "select('#', string.gsub('x', 'y', 'z'))", "string.find('abc', 'b', 1, true, 'extra')",
    /* gmatch. */
    "G('hello world from lua', '%a+')", "G('k1=v1, k2=v2', '(%w+)=(%w+)')", "G('abc', '')",
    "G('abc', '.-')", "G('abc', '%a*')", "G('abc', 'x*')", "G('', '')", "G('', 'x')",
    "G('abc', '()')", "G('aXbXc', '()X()')", "G('^a^b', '^.')", "G('abc', '^a')", "G('^abc', '^a')",
    "G('ab', '^')", "G('a,b,,c', '([^,]*)')", "G('aaa', 'a-')", "G('aab', 'a*b?')",
    "G('one two', '(%a+)')", "G('x', '(x')", "G('x', 'y)')", "G('abcd', '%f[%a]%a')",
    "G('a(b)c(d)', '%b()')", "G('xyz', '$')", "G('x$', '$')", "G('a.b.c', '[^.]+')",
    "G('aaa', '()a()')", "G(string.rep('ab', 10), 'ab')",
    /* gsub with a string replacement. */
    "string.gsub('hello world', 'o', '0')", "string.gsub('hello world', '(o)', '[%1]')",
    "string.gsub('hello', '', '-')", "string.gsub('hello', 'x*', '-')", "string.gsub('hello', '.-', '-')",
    "string.gsub('hello', 'l+', '%0%0')", "string.gsub('hello', '(l)(l)', '%2%1')",
    "string.gsub('hello', 'l', '%%')", "string.gsub('hello', 'l', '%')", "string.gsub('hello', 'l', 'x%')",
    "string.gsub('hello', 'l', '%a')", "string.gsub('hello', 'l', '%.')", "string.gsub('hello', 'l', '%\\0')",
    "string.gsub('hello', 'l', '%1')", "string.gsub('hello', 'l', '%2')", "string.gsub('hello', '(l)', '%2')",
    "string.gsub('hello', '(l)', '%9')", "string.gsub('hello', 'l', '%0%1')", "string.gsub('hello', '()l', '%1')",
    "string.gsub('hello', '(l', '%1')", "string.gsub('hello', 'l', 5)", "string.gsub('hello', 'l', 1.5)",
    "string.gsub('hello', 'l', '')", "string.gsub('hello', '^h', 'J')", "string.gsub('hello', '^l', 'J')",
    "string.gsub('hello', '^', '>')", "string.gsub('hello', '$', '<')", "string.gsub('hello', '^$', '<')",
    "string.gsub('', '', 'x')", "string.gsub('', '^', 'x')", "string.gsub('', 'x*', 'y')",
    "string.gsub('abc', '%w', '%0%0', 2)", "string.gsub('abc', '%w', '%0%0', 0)",
    "string.gsub('abc', '%w', '%0%0', -1)", "string.gsub('abc', '%w', '%0%0', 1.9)",
    "string.gsub('abc', '%w', '%0%0', '2')", "string.gsub('abc', '%w', '%0%0', 100)",
    "string.gsub('abc', '%w', '%0%0', 2^31)", "string.gsub('abc', '%w', '%0%0', 2^32 + 2)",
    "string.gsub('abc', '%w', '%0%0', 2^40)", "string.gsub('abc', '%w', '%0%0', -2^32 + 1)",
    "string.gsub('abc', '%w', '%0%0', 1e300)", "string.gsub('abc', '%w', '%0%0', 0/0)",
    "string.gsub('abc', '%w', '%0%0', 1/0)", "string.gsub('abc', '%w', '%0%0', nil)",
    "string.gsub('abc', '', '-', 2)", "string.gsub('abc', '^', '-', 5)", "string.gsub('a\\0b', '%z', '%%z')",
    "string.gsub('abc', '%w', '\\0%0')",
    /* gsub with a table. */
    "string.gsub('a b ab c', '%w+', T)", "string.gsub('a b', '(%w)', T)", "string.gsub('abc', '()', T)",
    "string.gsub('abc', '()(b)', T)", "string.gsub('a%', '%%', T)", "string.gsub('abc', '', T)",
    "string.gsub('c', 'c', { c = {} })", "string.gsub('c', 'c', { c = true })", "string.gsub('c', 'c', { c = 7 })",
    "string.gsub('c', 'c', { c = 7.5 })", "string.gsub('c', 'c', setmetatable({}, { __index = function(t, k) return k .. k end }))",
    "string.gsub('c', '(c', T)", "string.gsub('c', 'c', { c = print })",
    /* gsub with a function. */
    "string.gsub('a b c d e f g', '%w', F)", "string.gsub('ab cd ef', '(%w)(%w)', F)",
    "string.gsub('abc', '()', F)", "string.gsub('abc', '', F)", "string.gsub('abc', '%w', F, 2)",
    "string.gsub('abc', '%w', function() return {} end)", "string.gsub('abc', '%w', function() return true end)",
    "string.gsub('abc', '%w', function() return 1, 2 end)", "string.gsub('abc', '%w', function() end)",
    "string.gsub('abc', '%w', function(c) return c:upper() end)",
    "string.gsub('abc', '%w', function(c) return (string.gsub(c, '.', '%0%0')) end)",
    "string.gsub('abc', '%w', function(c) error('boom') end)",
    "string.gsub('abc', '%w', function(c) error({}) end)",
    "string.gsub('abc', '(a', F)", "string.gsub('abc', 'b', coroutine.wrap(function(c) coroutine.yield('Y') end))",
    "string.gsub('abc', '%w', string.upper)", "string.gsub('abc', '(%w)', string.rep)",
    /* Depth: LuaJIT stops at 200 levels of its matcher, and so do we. */
    "string.find(string.rep('a', 300), string.rep('a?', 199))",
    "string.find(string.rep('a', 300), string.rep('a?', 200))",
    "string.find(string.rep('a', 300), string.rep('a?', 201))",
    "string.find('', string.rep('a*', 199))", "string.find('', string.rep('a*', 200))",
    "string.find('', string.rep('a-', 200))", "string.find('', string.rep('a-', 199))",
    "string.find(string.rep('a', 300), string.rep('a', 300))",
    "string.find(string.rep('a', 300), string.rep('%f[a]a', 300))",
    "string.find(string.rep('a', 300), string.rep('a?', 100000))",
    "string.gsub(string.rep('a', 250), string.rep('a?', 199), 'x')",
    "string.find('x', string.rep('()', 31) .. string.rep('x?', 170))",
    "string.find('x', string.rep('()', 31) .. string.rep('x?', 169))",
    "string.find(string.rep('(', 10) .. 'x', string.rep('%(?', 198) .. 'x')",
    "G(string.rep('a', 300), string.rep('a?', 250))",
    /* Errors at various points of a gsub and a gmatch. */
    "string.gsub('abc', 'c%', 'x')", "string.gsub('abc', '%w', '%2')", "G('abc', 'c(')",
    "G('abc', '%1')",
};

static void test_table_matches_luajit(void **state)
{
    diff_t d;
    diff_open(&d);
    char all[256];
    for (int i = 0; i < 256; i++)
        all[i] = (char)i;
    diff_set_string(&d, "ALL", all, sizeof(all));
    size_t n = sizeof(table_cases) / sizeof(table_cases[0]);
    for (size_t i = 0; i < n; i++)
        diff_check(&d, table_cases[i], NULL);
    print_message("hand-written: %d cases, %d of them errors, %d differ, %d differ in position\n",
                  d.cases, d.errors, d.failures, d.raw_differs);
    assert_int_equal(d.failures, 0);
    diff_close(&d);
}

/* ---- generated cases ---- */

static uint64_t rng_state = 0x9e3779b97f4a7c15ull;

static uint32_t rng(uint32_t n)
{
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return (uint32_t)(rng_state % n);
}

/* Pieces of patterns: items (valid and not), then what may follow an item. */
static const char *const items[] = {
    "a", "a", "b", "b", "c", ".", ".", "%a", "%d", "%s", "%w", "%p", "%l", "%u", "%x", "%c",
    "%g", "%z", "%A", "%S", "%W", "%D", "%Z", "%%", "%.", "%-", "%]", "%(", "[ab]", "[^a]",
    "[a-c]", "[]]", "[^]]", "[%a_]", "[%]a]", "[a-]", "[-a]", "[%d-]", "[^%s]", "[^%)(]", " ",
    "(", "(", ")", ")", "()", "%1", "%1", "%2", "%0", "%b()", "%bab", "%b", "%f[%w]", "%f[^a]",
    "%f[%z]", "%f[a", "%f", "[", "[^", "%", "]", "^", "$", "-", "*", "+", "?", "\0", "\xe9",
};
static const char *const quantifiers[] = { "", "", "", "", "*", "+", "-", "?" };
static const char subject_bytes[] = "aaabbbc()01 _%]-^$.A\0\xe9";
static const char *const templates[] = {
    "%0", "%1", "%2", "<%1|%2>", "x%%y", "%", "%a", "[%0]", "", "%9", "-", "%%1", "%\xe9",
};
static const double inits[] = { 1, 1, 1, 2, 3, 0, -1, -2, -5, 5, 17, 100, -100, 2147483648.0,
                                -2147483649.0, 1e300, 2.5 };
static const double counts[] = { 1, 2, 3, 0, -1, 4294967297.0, 1e300, 1.5 };

static size_t gen_pattern(char *out, size_t cap)
{
    size_t n = 0;
    if (rng(6) == 0)
        out[n++] = '^';
    int pieces = 1 + (int)rng(5);
    for (int i = 0; i < pieces; i++) {
        const char *it = items[rng(sizeof(items) / sizeof(items[0]))];
        size_t l = *it == '\0' ? 1 : strlen(it);
        const char *q = quantifiers[rng(sizeof(quantifiers) / sizeof(quantifiers[0]))];
        if (n + l + strlen(q) + 2 >= cap)
            break;
        memcpy(out + n, it, l);
        n += l;
        memcpy(out + n, q, strlen(q));
        n += strlen(q);
    }
    if (rng(6) == 0)
        out[n++] = '$';
    return n;
}

static size_t gen_subject(char *out, size_t cap)
{
    size_t n = rng(17);
    for (size_t i = 0; i < n && i < cap; i++)
        out[i] = subject_bytes[rng(sizeof(subject_bytes) - 1)];
    return n < cap ? n : cap;
}

/* Writes len bytes of src to dst as a Lua string body, for messages. */
static void quote(char *dst, size_t cap, const char *src, size_t len)
{
    size_t j = 0;
    dst[0] = '\0';
    for (size_t k = 0; k < len && j + 5 < cap; k++) {
        unsigned char c = (unsigned char)src[k];
        j += (size_t)snprintf(dst + j, cap - j, c < 32 || c > 126 ? "\\%u" : "%c", c);
    }
}

#define GENERATED_CASES 4000

static void test_generated_match_luajit(void **state)
{
    static const char *const exprs[] = {
        "string.find(S, P)", "string.find(S, P, I)", "string.find(S, P, I, true)",
        "string.match(S, P)", "string.match(S, P, I)", "G(S, P)", "string.gsub(S, P, R)",
        "string.gsub(S, P, R, N)", "string.gsub(S, P, T)", "string.gsub(S, P, F, N)",
    };
    diff_t d;
    diff_open(&d);
    for (int i = 0; i < GENERATED_CASES; i++) {
        char p[64], s[32];
        size_t plen = gen_pattern(p, sizeof(p));
        size_t slen = gen_subject(s, sizeof(s));
        const char *r = templates[rng(sizeof(templates) / sizeof(templates[0]))];
        double init = inits[rng(sizeof(inits) / sizeof(inits[0]))];
        double count = counts[rng(sizeof(counts) / sizeof(counts[0]))];
        diff_set_string(&d, "P", p, plen);
        diff_set_string(&d, "S", s, slen);
        diff_set_string(&d, "R", r, strlen(r));
        diff_set_number(&d, "I", init);
        diff_set_number(&d, "N", count);
        char context[400], pq[160], sq[100];
        quote(pq, sizeof(pq), p, plen);
        quote(sq, sizeof(sq), s, slen);
        snprintf(context, sizeof(context), " with S='%s' P='%s' R='%s' I=%g N=%g", sq, pq, r,
                 init, count);
        for (size_t e = 0; e < sizeof(exprs) / sizeof(exprs[0]); e++)
            diff_check(&d, exprs[e], context);
    }
    print_message("generated: %d patterns, %d cases, %d of them errors, %d differ, "
                  "%d differ in position\n", GENERATED_CASES, d.cases, d.errors, d.failures,
                  d.raw_differs);
    assert_int_equal(d.failures, 0);
    diff_close(&d);
}


/* ---- a check function ---- */

static int stop_after(lua_State *L, void *ctx, char *why, size_t whylen)
{
    int *left = ctx;
    if (--*left > 0)
        return 0;
    snprintf(why, whylen, "stopped by the test");
    return MG_ETIMEDOUT;
}

/* With a check function, each of the four stops a runaway match with its own name, and a
 * match that needs no more steps than allowed is untouched. */
static void test_check_function_stops_each_function(void **state)
{
    static const struct {
        const char *expr, *want;
    } cases[] = {
        { "string.find(S, P)", "stopped by the test in string.find" },
        { "string.match(S, P)", "stopped by the test in string.match" },
        { "string.gsub(S, P, 'x')", "stopped by the test in string.gsub" },
        { "G(S, P)", "stopped by the test in string.gmatch" },
        { "S:find(P, 10)", "stopped by the test in string.find" },
    };
    int left;
    lua_State *L = luaL_newstate();
    luaL_openlibs(L);
    mg__pattern_open(L, stop_after, &left);
    assert_int_equal(luaL_loadbuffer(L, prelude, sizeof(prelude) - 1, "=prelude"), 0);
    assert_int_equal(lua_pcall(L, 0, 0, 0), 0);
    assert_int_equal(luaL_dostring(L, "S = string.rep('a', 3000); P = string.rep('a-', 20) .. 'b'"),
                     0);
    char out[512];
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        left = 100;
        eval(L, cases[i].expr, out, sizeof(out), NULL, 0);
        assert_int_equal(left, 0);
        assert_non_null(strstr(out, cases[i].want));
    }
    left = 100;
    eval(L, "string.gsub(S, 'a', 'b')", out, sizeof(out), NULL, 0);
    assert_true(left > 0);
    assert_true(strncmp(out, "ok ", 3) == 0);
    lua_close(L);
}

/* ---- through the policy ---- */

static const char runaway_src[] =
    "local s = string.rep('a', 3000)\n"
    "local p = string.rep('a-', 20) .. 'b'\n"
    "return {\n"
    "  authenticate = function(req)\n"
    "    local how = req.headers.authorization\n"
    "    if how == 'Bearer find' then string.find(s, p)\n"
    "    elseif how == 'Bearer match' then s:match(p)\n"
    "    elseif how == 'Bearer gsub' then string.gsub(s, p, 'x')\n"
    "    elseif how == 'Bearer gmatch' then for _ in string.gmatch(s, p) do end\n"
    "    elseif how == 'Bearer pcall' then\n"
    "      -- a caught timeout must not let the hook go on\n"
    "      local ok, err = pcall(string.find, s, p)\n"
    "      return 'caught ' .. tostring(err)\n"
    "    elseif how == 'Bearer pcall loop' then\n"
    "      while true do pcall(string.gsub, s, p, 'x') end\n"
    "    elseif how == 'Bearer big set' then\n"
    "      string.find(s, '[' .. string.rep('b', 1e6) .. 'a]-c')\n"
    "    elseif how == 'Bearer big frontier' then\n"
    "      string.gsub(string.rep(s, 30), '%f[' .. string.rep('b', 1e6) .. ']', '')\n"
    "    elseif how == 'Bearer deep' then\n"
    "      return 'deep ' .. tostring(string.find(string.rep('a', 1000), string.rep('a?', 100000)))\n"
    "    end\n"
    "    return 'alice'\n"
    "  end,\n"
    "}\n";

/* A pathological pattern in a hook is stopped within a few times the budget, with the name of
 * the function in the error; then the state serves the next call. */
static void test_runaway_pattern_times_out(void **state)
{
    static const struct {
        const char *how, *where;
    } cases[] = {
        { "find", "pattern.lua:6: time budget of 50 ms exceeded in string.find" },
        { "match", "pattern.lua:7: time budget of 50 ms exceeded in string.match" },
        { "gsub", "pattern.lua:8: time budget of 50 ms exceeded in string.gsub" },
        { "gmatch", "pattern.lua:9: time budget of 50 ms exceeded in string.gmatch" },
        { "pcall", "pattern.lua:13: time budget of 50 ms exceeded" },
        { "pcall loop", "time budget of 50 ms exceeded" },
        /* Sets a megabyte long: every test of a byte against them counts. */
        { "big set", "pattern.lua:17: time budget of 50 ms exceeded in string.find" },
        { "big frontier", "pattern.lua:19: time budget of 50 ms exceeded in string.gsub" },
    };
    mg_policy_t *p = tp_policy_src("pattern.lua", runaway_src);
    mg_policy_decision_t d;
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        uint64_t t0 = uv_hrtime();
        tp_capture_begin();
        int rc = tp_auth(p, cases[i].how, &d);
        char *log = tp_capture_end();
        double ms = (double)(uv_hrtime() - t0) / 1e6;
        print_message("%-10s stopped after %.1f ms (budget 50 ms)\n", cases[i].how, ms);
        assert_int_equal(rc, MG_ETIMEDOUT);
        assert_false(d.allow);
        assert_int_equal(d.status, 500);
        assert_true(ms >= 50);
        assert_true(ms < 250);
        assert_non_null(strstr(log, cases[i].where));
        assert_null(strstr(log, "caught"));
        free(log);

        assert_int_equal(tp_auth(p, "next", &d), 0);
        assert_true(d.allow);
        assert_string_equal(d.user, "alice");
    }
    tp_free(p);
}

/* Nesting past 200 levels is an error of the pattern, not a crash and not a timeout. */
static void test_deep_pattern_is_too_complex(void **state)
{
    mg_policy_t *p = tp_policy_src("pattern.lua", runaway_src);
    mg_policy_decision_t d;
    uint64_t t0 = uv_hrtime();
    tp_capture_begin();
    assert_int_equal(tp_auth(p, "deep", &d), MG_EINVAL);
    char *log = tp_capture_end();
    assert_true(uv_hrtime() - t0 < 50000000u);
    assert_false(d.allow);
    assert_non_null(strstr(log, "pattern.lua:21: pattern too complex"));
    free(log);
    assert_int_equal(tp_auth(p, "next", &d), 0);
    assert_true(d.allow);
    tp_free(p);

    /* In a plain state, as deep as memory allows. */
    lua_State *L = luaL_newstate();
    luaL_openlibs(L);
    mg__pattern_open(L, NULL, NULL);
    char out[256];
    static const char *const deep[] = {
        "string.find(string.rep('a', 1e6), string.rep('a?', 1e6))",
        "string.match(string.rep('a', 1e6), string.rep('(', 31) .. string.rep('a*', 1e6))",
        "string.gsub(string.rep('(', 1e5), string.rep('%(?', 1e5), '')",
        "string.gmatch('', string.rep('a-', 1e6))()",
    };
    for (size_t i = 0; i < sizeof(deep) / sizeof(deep[0]); i++) {
        eval(L, deep[i], out, sizeof(out), NULL, 0);
        assert_string_equal(out, "error pattern too complex");
    }
    lua_close(L);
}

int main(void)
{
    mg_log_set_level(MG_LOG_INFO);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_table_matches_luajit),
        cmocka_unit_test(test_generated_match_luajit),
        cmocka_unit_test(test_check_function_stops_each_function),
        cmocka_unit_test_setup_teardown(test_runaway_pattern_times_out, tp_setup, tp_teardown),
        cmocka_unit_test_setup_teardown(test_deep_pattern_is_too_complex, tp_setup, tp_teardown),
    };
    int rc = cmocka_run_group_tests(tests, NULL, NULL);
    tp_cleanup_dir();
    return rc;
}
