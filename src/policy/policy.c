/*
 * The policy engine: LuaJIT states, the one path by which C calls into them, and reload.
 *
 * Each state is a lua_State of its own, made with lua_newstate() over an allocator that counts
 * bytes and refuses to go past the memory limit. Policy code runs in LuaJIT's interpreter (the
 * JIT is switched off) because only the interpreter honours the instruction-count hook that
 * enforces each call's time budget; docs/policy.md has the measurements behind that choice.
 *
 * The stack of every state's main thread keeps one slot for good: index 1 holds the message
 * handler that every call uses, so no call allocates a closure for it. Everything above index 1
 * is transient; each entry point leaves the stack at height 1.
 *
 * The hook conversions (Lua results to C structs) live in policy_hooks.c.
 */
#include "policy_int.h"

#include "moongate/error.h"
#include "moongate/log.h"

#include <errno.h>
#include <lauxlib.h>
#include <limits.h>
#include <luajit.h>
#include <lualib.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

/* The installed Lua library (CMake: <prefix>/share/moongate/lua) and, for a program run where
   it was built, the source tree's. */
#ifndef MG_LUA_DIR
#define MG_LUA_DIR "/usr/local/share/moongate/lua"
#endif
#ifndef MG_LUA_SOURCE_DIR
#define MG_LUA_SOURCE_DIR "lua"
#endif

#define LOG "policy"

/* Instructions between two checks of the deadline: about a microsecond of interpretation. */
#define COUNT_HOOK_INSTRUCTIONS 1000

static int live_states;

/* The state whose call is running, for the watchdog (mg_policy_describe_running). */
static mg_policy_state_t *calling;

int mg__policy_live_states(void)
{
    return live_states;
}

const char *const mg__hook_names[MG_HOOK_COUNT] = {
    "authenticate", "admit", "limits", "route", "agent_auth", "on_event", "shutdown",
};

static void copy_str(char *dst, size_t cap, const char *src)
{
    if (cap == 0)
        return;
    size_t n = src != NULL ? strlen(src) : 0;
    if (n >= cap)
        n = cap - 1;
    if (n > 0)
        memcpy(dst, src, n);
    dst[n] = '\0';
}

void mg_policy_options_init(mg_policy_options_t *o, const mg_settings_t *s)
{
    mg_settings_t defaults;
    if (s == NULL) {
        mg_settings_init(&defaults);
        s = &defaults;
    }
    memset(o, 0, sizeof(*o));
    o->memory_limit = 64u << 20;
    o->hook_timeout_ms = 50;
    o->load_timeout_ms = 1000;
    o->dict_max_entries = 100000;
    o->dict_max_bytes = 16u << 20;
    o->max_timers = 1024;
    o->redis_timeout_ms = 20;
    o->jit = false;
    o->default_limits.max_connections = s->max_connections_per_user;
    o->default_limits.max_channels = s->max_channels;
    o->default_limits.idle_timeout_ms = s->max_idle_ms;
    o->default_limits.queue_max = s->queue_max;
    o->default_limits.queue_timeout_ms = s->queue_timeout_ms;
    o->default_shutdown.grace_ms = s->shutdown_grace_ms;
    o->default_shutdown.notify_clients = s->shutdown_notify_clients;
    o->default_shutdown.force_after_grace = s->shutdown_force_after_grace;
    copy_str(o->default_shutdown.message, sizeof(o->default_shutdown.message),
             "The gateway is shutting down.");
}

uint64_t mg__policy_now_ms(mg_policy_t *p)
{
    if (p->clock_fn != NULL)
        return p->clock_fn(p->clock_ctx);
    struct timespec ts;
    if (clock_gettime(CLOCK_REALTIME, &ts) != 0)
        return 0;
    return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

bool mg__policy_user_id_valid(const char *id, size_t len)
{
    if (len == 0 || len > MG_USER_ID_MAX)
        return false;
    for (size_t i = 0; i < len; i++) {
        unsigned char c = (unsigned char)id[i];
        bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
                  c == '.' || c == '_' || c == '-' || c == '@' || c == '+' || c == ':';
        if (!ok)
            return false;
    }
    return true;
}

/*
 * A call in a coroutine of its own. It holds a reference to its state while it waits, and its
 * timer bounds the wait: the Redis timeout, or what is left of the call's budget if less.
 */
struct mg__pcall {
    mg_policy_state_t *st;
    lua_State *co;
    int co_ref;
    int nres;
    uint32_t budget_ms;
    uint64_t deadline_ns;
    bool timed_out;
    char what[32];
    char where[224];
    mg__pcall_done_fn done;
    void *ctx;
    mg__redis_op_t *op;   /* the answer being waited for */
    uint32_t wait_ms;
    bool wait_is_budget;  /* the wait ends at the budget, not at the Redis timeout */
    uv_timer_t timer;
    bool timer_init;
    mg__pcall_t *next_free; /* in st->pc_pool */
};

/* Finished calls kept per state: most hooks never wait, and a call's coroutine, registry
   reference and timer cost more to make than to keep. */
#define PCALL_POOL_MAX 32

/* ---- memory and time bounds ---- */

/*
 * The state's allocator. It refuses growth past the limit while mem_capped is set, which is
 * while Lua code runs (call_lua); C building arguments or reading results is never refused, so
 * it never meets an error outside a protected call. Frees and shrinks always succeed, so the
 * collector can always give memory back.
 */
static void *state_alloc(void *ud, void *ptr, size_t osize, size_t nsize)
{
    mg_policy_state_t *st = ud;
    if (nsize == 0) {
        free(ptr);
        st->mem_used -= osize;
        return NULL;
    }
    if (nsize > osize && st->mem_capped && st->mem_used - osize + nsize > st->mem_limit) {
        st->mem_hit = true;
        return NULL;
    }
    void *q = realloc(ptr, nsize);
    if (q == NULL)
        return NULL;
    st->mem_used = st->mem_used - osize + nsize;
    return q;
}

/*
 * Runs every COUNT_HOOK_INSTRUCTIONS instructions while a call is in progress. Past the
 * deadline it raises an error, and it re-arms itself to run at every instruction: a policy that
 * catches the error with pcall is stopped again at its next instruction outside the pcall.
 */
static void count_hook(lua_State *L, lua_Debug *ar)
{
    mg_policy_state_t *st = mg__policy_state_of(L);
    if (!st->in_call)
        return;
    if (!st->timed_out && uv_hrtime() < st->deadline_ns)
        return;
    if (!st->timed_out) {
        st->timed_out = true;
        lua_sethook(L, count_hook, LUA_MASKCOUNT, 1);
    }
    /* luaL_error cannot place an error raised from a hook: name the running line here. */
    if (lua_getinfo(L, "Sl", ar) != 0 && ar->currentline > 0)
        lua_pushfstring(L, "%s:%d: time budget of %d ms exceeded", ar->short_src,
                        ar->currentline, (int)st->budget_ms);
    else
        lua_pushfstring(L, "time budget of %d ms exceeded", (int)st->budget_ms);
    lua_error(L);
}

/*
 * The message handler of every call. The limit is lifted while it builds the traceback so that
 * reporting an out-of-memory failure cannot itself run out of memory.
 *
 *   in:  [1]=error object      out: [top]=message with traceback
 */
static int message_handler(lua_State *L)
{
    mg_policy_state_t *st = mg__policy_state_of(L);
    bool capped = st->mem_capped;
    st->mem_capped = false;
    const char *msg = lua_tostring(L, 1);
    if (msg == NULL)
        msg = lua_pushfstring(L, "(error object is a %s value)", luaL_typename(L, 1));
    luaL_traceback(L, L, msg, 1);
    st->mem_capped = capped;
    return 1;
}

void mg_policy_describe_running(char *buf, size_t len)
{
    mg_policy_state_t *st = calling;
    if (st == NULL || !st->in_call) {
        snprintf(buf, len, "not in a policy call");
        return;
    }
    /* The innermost frame with a line is the policy's; a C function above it is what spins. */
    lua_State *L = st->running != NULL ? st->running->co : st->L;
    lua_Debug ar;
    char at[256] = "", cfn[96] = "";
    for (int level = 0; level < 32 && lua_getstack(L, level, &ar); level++) {
        if (lua_getinfo(L, "Sln", &ar) == 0)
            break;
        if (ar.currentline > 0) {
            snprintf(at, sizeof(at), ", at %s:%d", ar.short_src, ar.currentline);
            break;
        }
        if (level == 0 && ar.what != NULL && strcmp(ar.what, "C") == 0)
            snprintf(cfn, sizeof(cfn), ", in the C function %s", ar.name ? ar.name : "?");
    }
    snprintf(buf, len, "in the policy's %s call (%s)%s%s", st->call_what ? st->call_what : "?",
             st->call_where ? st->call_where : "?", at, cfn);
}

void mg__policy_where(lua_State *L, int idx, char *buf, size_t len)
{
    lua_Debug ar;
    lua_pushvalue(L, idx);
    if (lua_isfunction(L, -1) && lua_getinfo(L, ">S", &ar) != 0) {
        if (ar.what != NULL && strcmp(ar.what, "C") == 0)
            snprintf(buf, len, "[C]");
        else
            snprintf(buf, len, "%s:%d", ar.short_src, ar.linedefined);
    } else {
        lua_pop(L, 1);
        snprintf(buf, len, "?");
    }
}

/* Flattens a traceback to one log line: "a\n\tb" becomes "a | b". */
static void flatten(char *dst, size_t cap, const char *src)
{
    size_t j = 0;
    for (size_t i = 0; src[i] != '\0' && j + 4 < cap; i++) {
        if (src[i] == '\n') {
            dst[j++] = ' ';
            dst[j++] = '|';
            dst[j++] = ' ';
            while (src[i + 1] == '\t')
                i++;
        } else {
            dst[j++] = src[i];
        }
    }
    dst[j] = '\0';
}

/*
 * A failed call's books: its code, last_error, the log line, and a collection after running
 * out of memory. rc is lua_pcall's or lua_resume's.
 *
 *   in: ... message        out: ...
 */
static int call_failed(mg_policy_state_t *st, const char *what, const char *where, int rc,
                       bool log)
{
    lua_State *L = st->L;
    int code = MG_EINVAL;
    if (st->timed_out)
        code = MG_ETIMEDOUT;
    else if (rc == LUA_ERRMEM || st->mem_hit)
        code = MG_ENOMEM;
    const char *msg = lua_tostring(L, -1);
    if (msg == NULL)
        msg = "(error object is not a string)";
    if (code == MG_ENOMEM && rc == LUA_ERRMEM)
        msg = "not enough memory (the state's memory limit was reached)";
    /* The first line (the error itself) is kept for load errors; the log gets it all. */
    size_t n = strcspn(msg, "\n");
    if (n >= sizeof(st->last_error))
        n = sizeof(st->last_error) - 1;
    memcpy(st->last_error, msg, n);
    st->last_error[n] = '\0';
    if (log) {
        char line[1800];
        flatten(line, sizeof(line), msg);
        mg_log_error(LOG, "%s (%s) failed: %s", what, where, line);
    }
    lua_pop(L, 1);

    if (code == MG_ENOMEM) {
        /* Garbage is the usual culprit. If the state still holds most of its limit after a full
         * collection, its globals hold the memory and only a fresh state will do. */
        lua_gc(L, LUA_GCCOLLECT, 0);
        if (st->mem_used > st->mem_limit / 2)
            st->rebuild = true;
    }
    return code;
}

/* Marks st as running a call until deadline_ns (for the count hook and the watchdog). */
static void call_enter(mg_policy_state_t *st, const char *what, const char *where,
                       uint32_t budget_ms, uint64_t deadline_ns, bool timed_out)
{
    st->in_call = true;
    st->call_what = what;
    st->call_where = where;
    calling = st;
    st->timed_out = timed_out;
    st->mem_hit = false;
    st->budget_ms = budget_ms;
    st->deadline_ns = deadline_ns;
    st->mem_capped = true;
}

static void call_leave(mg_policy_state_t *st)
{
    st->mem_capped = false;
    st->in_call = false;
    st->running = NULL;
    calling = NULL;
    if (st->timed_out)
        lua_sethook(st->L, count_hook, LUA_MASKCOUNT, COUNT_HOOK_INSTRUCTIONS);
}

/*
 * Calls the function below nargs arguments on st's stack, with the time budget, the memory
 * limit and the traceback handler. Logs a failure when log is set.
 *
 *   in:  ... fn a1..an        out (0): ... r1..rnres        out (<0): ...
 */
static int call_lua(mg_policy_state_t *st, const char *what, const char *where, int nargs,
                    int nres, uint32_t budget_ms, bool log)
{
    lua_State *L = st->L;
    if (st->in_call) {
        lua_pop(L, nargs + 1);
        mg_log_error(LOG, "%s (%s) called from inside another hook: refused", what, where);
        return MG_ESTATE;
    }
    call_enter(st, what, where, budget_ms, uv_hrtime() + (uint64_t)budget_ms * 1000000u, false);
    int rc = lua_pcall(L, nargs, nres, 1);
    call_leave(st);
    if (rc == 0)
        return 0;
    return call_failed(st, what, where, rc, log);
}

/* After a call: a state that kept its memory after a collection is replaced. */
static void maybe_rebuild(mg_policy_state_t *st)
{
    mg_policy_t *p = st->policy;
    if (st->rebuild && p->current == st && !p->freeing && !p->reloading) {
        st->rebuild = false;
        mg_log_warn(LOG, "state holds %zu bytes after a collection (limit %zu): reloading",
                    st->mem_used, st->mem_limit);
        char err[512];
        (void)mg_policy_reload(p, err, sizeof(err));
    }
}

int mg__policy_pcall(mg_policy_state_t *st, const char *what, const char *where, int nargs,
                     int nres, uint32_t budget_ms)
{
    int rc = call_lua(st, what, where, nargs, nres, budget_ms, true);
    maybe_rebuild(st);
    return rc;
}

/* ---- calls that may wait for Redis ---- */

static void pcall_closed(uv_handle_t *h)
{
    free(h->data);
}

static void pcall_free(mg__pcall_t *pc)
{
    mg_policy_state_t *st = pc->st;
    /* A coroutine that returned can run another function; one that failed, or still waits
       (its budget ended the wait), cannot. */
    if (lua_status(pc->co) == 0 && st->pc_pooled < PCALL_POOL_MAX) {
        lua_settop(pc->co, 0);
        pc->next_free = st->pc_pool;
        st->pc_pool = pc;
        st->pc_pooled++;
        return;
    }
    if (pc->co_ref != LUA_NOREF)
        luaL_unref(pc->st->L, LUA_REGISTRYINDEX, pc->co_ref);
    if (pc->timer_init)
        uv_close((uv_handle_t *)&pc->timer, pcall_closed);
    else
        free(pc);
}

/*
 * Runs (or resumes, with nargs values on the coroutine) pc's coroutine until it finishes or
 * waits. Returns 0 with the results moved to the state's stack, MG_EAGAIN when it waits, or a
 * failure code (logged).
 */
static int pcall_run(mg__pcall_t *pc, int nargs)
{
    mg_policy_state_t *st = pc->st;
    lua_State *L = st->L, *co = pc->co;
    if (st->in_call) {
        /* Cannot happen: waits end from the loop, never inside another call. */
        lua_settop(co, 0);
        mg_log_error(LOG, "%s (%s) resumed inside another call: refused", pc->what, pc->where);
        return MG_ESTATE;
    }
    call_enter(st, pc->what, pc->where, pc->budget_ms, pc->deadline_ns, pc->timed_out);
    st->running = pc;
    int rc = lua_resume(co, nargs);
    pc->timed_out = st->timed_out;
    bool waiting = rc == LUA_YIELD && pc->op != NULL;
    call_leave(st);
    if (waiting)
        return MG_EAGAIN;
    if (pc->op != NULL) {
        /* An operation started, but the coroutine did not yield for it: nothing may hear its
           answer or its timer now (mg__policy_redis_call refuses where it cannot yield; this
           is the guard behind that). */
        mg__redis_op_cancel(pc->op);
        pc->op = NULL;
        uv_timer_stop(&pc->timer);
    }
    if (rc == 0) {
        lua_settop(co, pc->nres);
        lua_xmove(co, L, pc->nres);
        return 0;
    }
    if (rc == LUA_YIELD) {
        lua_settop(co, 0);
        lua_pushfstring(L, "%s: a hook may not yield (coroutine.yield outside a coroutine "
                           "of its own)", pc->where);
        return call_failed(st, pc->what, pc->where, LUA_ERRRUN, true);
    }
    /* The traceback, built with the limit lifted as the message handler does. */
    const char *msg = lua_tostring(co, -1);
    bool capped = st->mem_capped;
    st->mem_capped = false;
    luaL_traceback(L, co, msg != NULL ? msg : "(error object is not a string)", 0);
    st->mem_capped = capped;
    lua_settop(co, 0);
    return call_failed(st, pc->what, pc->where, rc, true);
}

/* The end of a call that waited: its caller hears, then the state may go. */
static void pcall_finish(mg__pcall_t *pc, int rc)
{
    mg_policy_state_t *st = pc->st;
    mg__pcall_done_fn done = pc->done;
    void *ctx = pc->ctx;
    pcall_free(pc);
    done(ctx, rc);
    lua_settop(st->L, 1);
    maybe_rebuild(st);
    mg__policy_state_unref(st);
}

static void pcall_step(mg__pcall_t *pc, int nargs)
{
    int rc = pcall_run(pc, nargs);
    if (rc != MG_EAGAIN)
        pcall_finish(pc, rc);
}

/* Redis answered: the results are on the coroutine. */
static void pcall_answered(void *arg, int nres)
{
    mg__pcall_t *pc = arg;
    uv_timer_stop(&pc->timer);
    pc->op = NULL;
    pcall_step(pc, nres);
}

static void pcall_wait_over(uv_timer_t *t)
{
    mg__pcall_t *pc = t->data;
    mg_policy_t *p = pc->st->policy;
    mg__redis_op_cancel(pc->op);
    pc->op = NULL;
    if (pc->wait_is_budget) {
        /* The call's budget is spent (the hook's, not Redis's): it fails as one that ran too
           long. */
        lua_settop(pc->co, 0);
        lua_pushfstring(pc->st->L, "%s: time budget of %d ms exceeded waiting for redis",
                        pc->where, (int)pc->budget_ms);
        pc->st->timed_out = true;
        int rc = call_failed(pc->st, pc->what, pc->where, LUA_ERRRUN, true);
        pc->st->timed_out = false;
        pcall_finish(pc, rc);
        return;
    }
    if (p->redis != NULL)
        mg__redis_note_timeout(p->redis, pc->wait_ms);
    lua_pushnil(pc->co);
    lua_pushfstring(pc->co, "redis unavailable: no answer within %d ms", (int)pc->wait_ms);
    pcall_step(pc, 2);
}

int mg__policy_pcall_wait(mg_policy_state_t *st, const char *what, const char *where,
                          int nargs, int nres, uint32_t budget_ms, mg__pcall_done_fn done,
                          void *ctx)
{
    lua_State *L = st->L;
    if (st->policy->redis == NULL || done == NULL || st->in_call)
        return mg__policy_pcall(st, what, where, nargs, nres, budget_ms);
    mg__pcall_t *pc = st->pc_pool;
    if (pc != NULL) {
        st->pc_pool = pc->next_free;
        st->pc_pooled--;
        /* What the last call left: everything but the coroutine and the timer (a libuv
           handle, which must stay where it is). */
        pc->timed_out = pc->wait_is_budget = false;
        pc->op = NULL;
        pc->wait_ms = 0;
        pc->next_free = NULL;
    } else {
        pc = calloc(1, sizeof(*pc));
        if (pc == NULL) {
            lua_pop(L, nargs + 1);
            return MG_ENOMEM;
        }
        pc->st = st;
        pc->co = lua_newthread(L);
        pc->co_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    }
    lua_xmove(L, pc->co, nargs + 1);
    pc->nres = nres;
    pc->budget_ms = budget_ms;
    pc->deadline_ns = uv_hrtime() + (uint64_t)budget_ms * 1000000u;
    copy_str(pc->what, sizeof(pc->what), what);
    copy_str(pc->where, sizeof(pc->where), where);
    pc->done = done;
    pc->ctx = ctx;
    int rc = pcall_run(pc, nargs);
    if (rc == MG_EAGAIN) {
        st->refs++; /* until pcall_finish */
        return MG_EAGAIN;
    }
    pcall_free(pc);
    maybe_rebuild(st);
    return rc;
}

void mg__policy_call_forget(void *ctx, int rc)
{
    (void)ctx;
    (void)rc;
}

int mg__policy_redis_call(lua_State *L, const mg__rdict_req_t *q)
{
    mg_policy_state_t *st = mg__policy_state_of(L);
    mg_policy_t *p = st->policy;
    mg__pcall_t *pc = st->running;
    if (p->redis == NULL) {
        lua_pushnil(L);
        lua_pushliteral(L, "redis unavailable: the gateway is shutting down");
        return 2;
    }
    if (pc == NULL || pc->co != L) {
        lua_pushnil(L);
        const char *what = st->call_what;
        if (!st->in_call || what == NULL || strcmp(what, "load") == 0)
            what = "the file's main chunk";
        lua_pushfstring(L, "the shared dictionary is in redis and %s cannot wait for it "
                           "(only authenticate, admit, route, on_event and timers can); use "
                           "moongate.node_dict there", what);
        return 2;
    }
    if (!lua_isyieldable(L)) {
        /* Inside a C function that called back into Lua (a gsub replacement, a sort
           comparator): a yield cannot cross it. */
        lua_pushnil(L);
        lua_pushliteral(L, "the shared dictionary is in redis and cannot be waited for inside "
                           "a function called by C (a string.gsub replacement, a table.sort "
                           "comparator, ...); call it outside");
        return 2;
    }
    char err[256] = "redis unavailable: out of memory";
    int rc = mg__redis_dict_start(p->redis, q, L, pcall_answered, pc, &pc->op, err,
                                  sizeof(err));
    if (rc != 0) {
        lua_pushnil(L);
        lua_pushstring(L, err);
        return 2;
    }
    if (!pc->timer_init) {
        uv_timer_init(p->loop, &pc->timer);
        pc->timer.data = pc;
        pc->timer_init = true;
    }
    uint64_t now = uv_hrtime();
    uint64_t left_ms = pc->deadline_ns > now ? (pc->deadline_ns - now + 999999) / 1000000 : 1;
    /* Which bound ends the wait is decided here, not from the clock when the timer fires: the
     * loop's clock has millisecond steps, so a timer may fire just before the deadline. */
    pc->wait_is_budget = left_ms < p->opts.redis_timeout_ms;
    pc->wait_ms = pc->wait_is_budget ? (uint32_t)left_ms : p->opts.redis_timeout_ms;
    /* The loop's clock is that of the iteration's start: a timer set from it could end early. */
    uv_update_time(p->loop);
    uv_timer_start(&pc->timer, pcall_wait_over, pc->wait_ms, 0);
    return lua_yield(L, 0);
}

bool mg_policy_redis_stats(mg_policy_t *p, mg_redis_stats_t *out)
{
    if (p->redis == NULL)
        return false;
    mg__redis_get_stats(p->redis, out);
    return true;
}

/* ---- states ---- */

/* Leaves the standard libraries a policy needs and removes the ones that would let it escape
 * its bounds: the JIT (jit.on would lift the time bound), the FFI and io (raw memory and
 * files), debug, C modules, bytecode loading and finalizers. This is robustness against
 * mistakes, not a security boundary: the operator writes the policy. */
static const char sandbox_lua[] =
    "local loaded, preload = package.loaded, package.preload\n"
    "for _, name in ipairs{'io', 'ffi', 'jit', 'debug'} do _G[name] = nil; loaded[name] = nil end\n"
    "for k in pairs(preload) do preload[k] = nil end\n"
    "local os_ = os\n"
    "os = { time = os_.time, clock = os_.clock, date = os_.date, difftime = os_.difftime }\n"
    "loaded.os = os\n"
    "string.dump = nil\n"
    "dofile, loadfile, newproxy, module = nil, nil, nil, nil\n"
    "package.loadlib, package.cpath = nil, ''\n"
    "package.loaders[3], package.loaders[4] = nil, nil\n"
    "local load_, loadstring_ = load, loadstring\n"
    "load = function(chunk, name, mode, env)\n"
    "  return load_(chunk, name, 't', env)\n"
    "end\n"
    "loadstring = function(s, name)\n"
    "  if type(s) == 'string' and s:byte(1) == 27 then return nil, 'bytecode is not allowed' end\n"
    "  return loadstring_(s, name)\n"
    "end\n"
    "local gc = collectgarbage\n"
    "collectgarbage = function(opt, arg)\n"
    "  if opt == nil or opt == 'collect' or opt == 'count' or opt == 'step' then\n"
    "    return gc(opt, arg)\n"
    "  end\n"
    "  error(\"collectgarbage('\" .. tostring(opt) .. \"') is not allowed in a policy\", 2)\n"
    "end\n"
    "package.path = ...\n";

static void state_free(mg_policy_state_t *st)
{
    mg_policy_t *p = st->policy;
    while (st->pc_pool != NULL) {
        mg__pcall_t *pc = st->pc_pool;
        st->pc_pool = pc->next_free;
        if (pc->timer_init)
            uv_close((uv_handle_t *)&pc->timer, pcall_closed);
        else
            free(pc);
    }
    if (st->L != NULL)
        lua_close(st->L);
    free(st);
    live_states--;
    if (--p->refs == 0) {
        mg__dict_free(p->dict);
        free(p->path);
        free(p->lua_dir);
        free(p);
    }
}

void mg__policy_state_unref(mg_policy_state_t *st)
{
    if (--st->refs == 0)
        state_free(st);
}

/* Sets err to the state's last error, or to fmt. */
static int load_fail(char *err, size_t errlen, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static int load_fail(char *err, size_t errlen, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, errlen, fmt, ap);
    va_end(ap);
    return MG_ECONFIG;
}

/*
 * Loads and runs a policy file, leaving what it returned on the stack.
 *
 *   in:  ...        out (0): ... hooks        out (<0): ...
 */
static int run_file(mg_policy_state_t *st, const char *file, char *err, size_t errlen)
{
    lua_State *L = st->L;
    int rc = luaL_loadfilex(L, file, "t");
    if (rc != 0) {
        const char *msg = lua_tostring(L, -1);
        if (rc == LUA_ERRFILE && msg != NULL && strncmp(msg, "cannot open", 11) == 0)
            rc = load_fail(err, errlen, "%s:0: %s", file, msg);
        else
            rc = load_fail(err, errlen, "%s", msg != NULL ? msg : "cannot load");
        lua_pop(L, 1);
        return rc;
    }
    /* Passes the file's path as the chunk's argument, as the standalone interpreter does. */
    lua_pushstring(L, file);
    rc = call_lua(st, "load", file, 1, 1, st->policy->opts.load_timeout_ms, false);
    if (rc != 0)
        return load_fail(err, errlen, "%s", st->last_error);
    return 0;
}

/* The last line of file: the best place to point at for an error in the table it returned,
 * which a policy file usually ends with. */
static int chunk_last_line(const char *file)
{
    FILE *f = fopen(file, "r");
    if (f == NULL)
        return 0;
    int lines = 0, c, last = '\n';
    while ((c = getc(f)) != EOF) {
        if (c == '\n')
            lines++;
        last = c;
    }
    fclose(f);
    return last == '\n' ? lines : lines + 1;
}

/*
 * Checks the table the policy returned and takes each hook from it, or from the defaults.
 *
 *   in:  ... defaults hooks        out (0 or <0): ...  (both tables popped)
 */
static int take_hooks(mg_policy_state_t *st, const char *file, char *err, size_t errlen)
{
    lua_State *L = st->L;
    int rc = 0;
    int def = lua_gettop(L) - 1;
    int hooks = lua_gettop(L);
    if (!lua_istable(L, hooks)) {
        rc = load_fail(err, errlen, "%s:%d: the policy must return a table of hooks, got %s",
                       file, chunk_last_line(file), luaL_typename(L, hooks));
        goto out;
    }
    /* A misspelt hook would silently take the default: say so. */
    lua_pushnil(L);
    while (lua_next(L, hooks) != 0) {
        bool known = false;
        for (int h = 0; h < MG_HOOK_COUNT && lua_type(L, -2) == LUA_TSTRING; h++)
            known = known || strcmp(lua_tostring(L, -2), mg__hook_names[h]) == 0;
        /* The one setting a policy table holds besides hooks. */
        if (lua_type(L, -2) == LUA_TSTRING && strcmp(lua_tostring(L, -2), "error_format") == 0)
            known = true;
        if (!known) {
            lua_pushvalue(L, -2);
            mg_log_warn(LOG, "%s: unknown hook '%s' ignored", file,
                        lua_isstring(L, -1) ? lua_tostring(L, -1) : luaL_typename(L, -1));
            lua_pop(L, 1);
        }
        lua_pop(L, 1);
    }
    lua_getfield(L, hooks, "error_format");
    if (!lua_isnil(L, -1)) {
        const char *f = lua_type(L, -1) == LUA_TSTRING ? lua_tostring(L, -1) : "";
        if (mg__policy_error_format_parse(f, &st->error_format) != 0) {
            rc = load_fail(err, errlen, "%s:%d: error_format must be \"openai\", \"ollama\", "
                           "\"plain\" or \"auto\", got %s", file, chunk_last_line(file),
                           lua_type(L, -1) == LUA_TSTRING ? f : luaL_typename(L, -1));
            lua_pop(L, 1);
            goto out;
        }
    }
    lua_pop(L, 1);
    for (int h = 0; h < MG_HOOK_COUNT; h++) {
        lua_getfield(L, hooks, mg__hook_names[h]);
        st->hook_from_file[h] = !lua_isnil(L, -1);
        if (lua_isnil(L, -1)) {
            lua_pop(L, 1);
            lua_getfield(L, def, mg__hook_names[h]);
        }
        if (!lua_isfunction(L, -1)) {
            rc = load_fail(err, errlen, "%s:%d: hook '%s' must be a function or nil, got %s",
                           file, chunk_last_line(file), mg__hook_names[h],
                           luaL_typename(L, -1));
            lua_pop(L, 1);
            goto out;
        }
        mg__policy_where(L, -1, st->hook_where[h], sizeof(st->hook_where[h]));
        st->hook_ref[h] = luaL_ref(L, LUA_REGISTRYINDEX);
    }
out:
    lua_settop(L, def - 1);
    return rc;
}

/*
 * Builds a state from p's file: sandboxed libraries, the moongate module, the default hooks,
 * then the file's hooks over them. Returns 0 and *out with one reference, or MG_ECONFIG or
 * MG_ENOMEM with err set.
 */
static int state_new(mg_policy_t *p, mg_policy_state_t **out, char *err, size_t errlen)
{
    int rc = 0;
    *out = NULL;
    mg_policy_state_t *st = calloc(1, sizeof(*st));
    if (st == NULL) {
        snprintf(err, errlen, "out of memory");
        return MG_ENOMEM;
    }
    mg_list_init(&st->timers);
    live_states++;
    st->policy = p;
    p->refs++;
    st->refs = 1;
    st->mem_limit = p->opts.memory_limit;
    for (int h = 0; h < MG_HOOK_COUNT; h++)
        st->hook_ref[h] = LUA_NOREF;
    for (int i = 0; i < MG_POLICY_REQ_SLOTS; i++)
        st->req_ref[i] = LUA_NOREF;

    st->L = lua_newstate(state_alloc, st);
    if (st->L == NULL) {
        rc = load_fail(err, errlen, "cannot create a Lua state (out of memory)");
        goto out;
    }
    lua_State *L = st->L;
    lua_pushcfunction(L, message_handler); /* stays at index 1 */
    luaL_openlibs(L);
    mg__policy_open_patterns(L); /* LuaJIT's own matcher cannot be interrupted */
    /* After luaL_openlibs: opening the jit library switches the JIT back on. */
    luaJIT_setmode(L, 0, LUAJIT_MODE_ENGINE | (p->opts.jit ? LUAJIT_MODE_ON : LUAJIT_MODE_OFF));
    lua_sethook(L, count_hook, LUA_MASKCOUNT, COUNT_HOOK_INSTRUCTIONS);

    const char *file = p->path;
    char default_file[1100];
    snprintf(default_file, sizeof(default_file), "%s/moongate/default.lua", p->lua_dir);
    if (file == NULL)
        file = default_file;

    /* lua/ comes before the policy's own directory, so `require "moongate.x"` always means
     * the helper we ship, whatever files sit beside the policy. */
    char dir[1024];
    copy_str(dir, sizeof(dir), file);
    char *slash = strrchr(dir, '/');
    if (slash != NULL)
        *slash = '\0';
    else
        copy_str(dir, sizeof(dir), ".");
    lua_pushfstring(L, "%s/?.lua;%s/?/init.lua;%s/?.lua;%s/?/init.lua", p->lua_dir, p->lua_dir,
                    dir, dir);
    if (luaL_loadbufferx(L, sandbox_lua, sizeof(sandbox_lua) - 1, "=sandbox", "t") != 0) {
        rc = load_fail(err, errlen, "sandbox: %s", lua_tostring(L, -1));
        goto out;
    }
    lua_insert(L, -2);
    if (call_lua(st, "sandbox", "sandbox", 1, 0, p->opts.load_timeout_ms, false) != 0) {
        rc = load_fail(err, errlen, "sandbox: %s", st->last_error);
        goto out;
    }
    mg__policy_lib_open(st);

    /* ... defaults */
    if (access(default_file, R_OK) != 0) {
        rc = load_fail(err, errlen,
                       "%s:0: the Lua library is not there (%s): install it with `cmake --install`, "
                       "or set MOONGATE_LUA_DIR to the directory holding moongate/default.lua",
                       default_file, strerror(errno));
        goto out;
    }
    rc = run_file(st, default_file, err, errlen);
    if (rc != 0)
        goto out;
    if (file != default_file) {
        /* ... defaults hooks */
        rc = run_file(st, file, err, errlen);
        if (rc != 0)
            goto out;
    } else {
        /* ... defaults defaults */
        lua_pushvalue(L, -1);
    }
    rc = take_hooks(st, file, err, errlen);
    if (rc != 0)
        goto out;
    st->generation = ++p->generations;
    lua_gc(L, LUA_GCCOLLECT, 0);

out:
    if (rc != 0) {
        if (rc != MG_ECONFIG && rc != MG_ENOMEM)
            rc = MG_ECONFIG;
        st->retired = true;
        mg__policy_timers_cancel(st, "reload");
        mg__policy_state_unref(st);
        return rc;
    }
    lua_settop(st->L, 1);
    *out = st;
    return 0;
}

/* Takes st out of service: no new timers, the old ones told why, the current reference gone. */
static void state_retire(mg_policy_state_t *st, const char *reason)
{
    st->retired = true;
    mg__policy_timers_cancel(st, reason);
    mg__policy_state_unref(st);
}

static bool has_default_policy(const char *dir)
{
    char f[PATH_MAX + 32];
    int n = snprintf(f, sizeof(f), "%s/moongate/default.lua", dir);
    return n > 0 && (size_t)n < sizeof(f) && access(f, R_OK) == 0;
}

const char *mg_policy_default_lua_dir(char *buf, size_t cap)
{
    char exe[PATH_MAX];
    size_t n = sizeof(exe);
    if (uv_exepath(exe, &n) != 0)
        return MG_LUA_DIR;
    char *slash = strrchr(exe, '/');
    if (slash == NULL)
        return MG_LUA_DIR;
    *slash = '\0';
    /* A program run where it was built uses the tree it was built from, so an installed copy of
       an older library never shadows the one being worked on. */
    size_t bl = strlen(MG_BUILD_DIR);
    if (strncmp(exe, MG_BUILD_DIR, bl) == 0 && (exe[bl] == '\0' || exe[bl] == '/') &&
        has_default_policy(MG_LUA_SOURCE_DIR))
        return MG_LUA_SOURCE_DIR;
    /* Beside the running program: <prefix>/bin/moongate finds <prefix>/share/moongate/lua,
       wherever the tree was installed (or unpacked); else the compiled-in install path. */
    int w = snprintf(buf, cap, "%s/../share/moongate/lua", exe);
    if (w > 0 && (size_t)w < cap && has_default_policy(buf))
        return buf;
    return MG_LUA_DIR;
}

int mg_policy_new(uv_loop_t *loop, const mg_policy_options_t *o, mg_policy_t **out, char *err,
                  size_t errlen)
{
    *out = NULL;
    if (errlen > 0)
        err[0] = '\0';
    if (loop == NULL || o == NULL || o->memory_limit < (1u << 20) || o->hook_timeout_ms == 0 ||
        o->load_timeout_ms == 0 || o->max_timers < 0) {
        snprintf(err, errlen, "invalid policy options");
        return MG_EINVAL;
    }
    mg_policy_t *p = calloc(1, sizeof(*p));
    if (p == NULL)
        return MG_ENOMEM;
    p->loop = loop;
    p->opts = *o;
    p->refs = 1;
    char found[PATH_MAX];
    const char *dir = o->lua_dir;
    if (dir == NULL)
        dir = getenv("MOONGATE_LUA_DIR");
    if (dir == NULL || dir[0] == '\0')
        dir = mg_policy_default_lua_dir(found, sizeof(found));
    p->lua_dir = strdup(dir);
    p->path = o->path != NULL ? strdup(o->path) : NULL;
    int rc = mg__dict_new(o->dict_max_entries, o->dict_max_bytes, &p->dict);
    if (rc == 0 && (p->lua_dir == NULL || (o->path != NULL && p->path == NULL)))
        rc = MG_ENOMEM;
    if (rc != 0) {
        snprintf(err, errlen, "%s", mg_strerror(rc));
        goto fail;
    }
    if (o->redis_url != NULL && o->redis_url[0] != '\0') {
        if (o->redis_timeout_ms == 0 || o->redis_timeout_ms > 60000) {
            snprintf(err, errlen, "invalid policy options: redis_timeout_ms");
            rc = MG_EINVAL;
            goto fail;
        }
        mg__redis_conf_t rc_conf = { .url = o->redis_url, .ca_file = o->redis_ca_file,
                                     .cert_file = o->redis_cert_file,
                                     .key_file = o->redis_key_file };
        if ((rc = mg__redis_new(loop, &rc_conf, &p->redis, err, errlen)) != 0)
            goto fail;
        p->shared_in_redis = true;
    }
    /* The caller's strings; p->redis has what it needs. */
    p->opts.redis_url = p->opts.redis_ca_file = NULL;
    p->opts.redis_cert_file = p->opts.redis_key_file = NULL;
    p->opts.path = p->path;
    p->opts.lua_dir = p->lua_dir;
    rc = state_new(p, &p->current, err, errlen);
    if (rc != 0)
        goto fail;
    if (o->jit)
        mg_log_warn(LOG, "the JIT is on: hook calls are not bounded in time");
    mg_log_info(LOG, "loaded %s", p->path != NULL ? p->path : "the default policy");
    *out = p;
    return 0;

fail:
    p->freeing = true;
    mg__redis_free(p->redis);
    p->redis = NULL;
    if (--p->refs == 0) {
        mg__dict_free(p->dict);
        free(p->path);
        free(p->lua_dir);
        free(p);
    }
    return rc;
}

const char *mg_policy_lua_dir(const mg_policy_t *p)
{
    return p->lua_dir;
}

/* Runs in the policy's sandbox with its route hook's origin as the argument. */
static const char default_route_lua[] =
    "local own = ...\n"
    "if own and package.loaded['moongate.default'] == nil then return nil end\n"
    "local r = require('moongate.default').route()\n"
    "return r.key, r.known_hosts\n";

int mg_policy_default_route_files(mg_policy_t *p, char *key, size_t keycap, char *known_hosts,
                                  size_t khcap)
{
    mg_policy_state_t *st = p->current;
    lua_State *L = st->L;
    int top = lua_gettop(L);
    int rc = MG_ECONFIG;
    if (luaL_loadbufferx(L, default_route_lua, sizeof(default_route_lua) - 1, "=check", "t") != 0)
        goto out;
    lua_pushboolean(L, p->path != NULL && st->hook_from_file[MG_HOOK_ROUTE]);
    if (lua_pcall(L, 1, 2, 0) != 0)
        goto out;
    if (lua_isnil(L, -2) && lua_isnil(L, -1)) {
        rc = 0;
        goto out;
    }
    const char *k = lua_tostring(L, -2), *kh = lua_tostring(L, -1);
    copy_str(key, keycap, k != NULL ? k : "");
    copy_str(known_hosts, khcap, kh != NULL ? kh : "");
    rc = 1;
out:
    lua_settop(L, top);
    return rc;
}

void mg_policy_free(mg_policy_t *p)
{
    if (p == NULL)
        return;
    p->freeing = true;
    /* Calls waiting for Redis hear that it is gone and finish (on the current state). */
    mg_redis_t *r = p->redis;
    p->redis = NULL;
    mg__redis_free(r);
    mg_policy_state_t *st = p->current;
    p->current = NULL;
    /* The policy's own reference goes first, so the last state to go frees it. */
    p->refs--;
    state_retire(st, "shutdown");
}

void mg_policy_set_stats_fn(mg_policy_t *p, mg_policy_user_stats_fn user_fn,
                            mg_policy_pool_stats_fn pool_fn, void *ctx)
{
    p->user_stats_fn = user_fn;
    p->pool_stats_fn = pool_fn;
    p->stats_ctx = ctx;
}

void mg_policy_set_clock(mg_policy_t *p, mg_policy_clock_fn fn, void *ctx)
{
    p->clock_fn = fn;
    p->clock_ctx = ctx;
}

int mg_policy_reload(mg_policy_t *p, char *err, size_t errlen)
{
    char buf[512];
    if (err == NULL || errlen == 0) {
        err = buf;
        errlen = sizeof(buf);
    }
    if (p->reloading || p->freeing) {
        snprintf(err, errlen, "a reload is already in progress");
        return MG_ESTATE;
    }
    p->reloading = true;
    mg_policy_state_t *st;
    int rc = state_new(p, &st, err, errlen);
    p->reloading = false;
    if (rc != 0) {
        mg_log_error(LOG, "reload failed: %s", err);
        return MG_ECONFIG;
    }
    mg_policy_state_t *old = p->current;
    p->current = st;
    mg_log_info(LOG, "reloaded %s (generation %llu)", p->path != NULL ? p->path : "the default policy",
                (unsigned long long)st->generation);
    state_retire(old, "reload");
    return 0;
}

mg_policy_state_t *mg_policy_acquire(mg_policy_t *p)
{
    p->current->refs++;
    return p->current;
}

void mg_policy_release(mg_policy_state_t *st)
{
    mg__policy_state_unref(st);
}

uint64_t mg_policy_state_generation(const mg_policy_state_t *st)
{
    return st->generation;
}

size_t mg_policy_memory_used(mg_policy_t *p)
{
    return p->current->mem_used;
}

int mg__policy_error_format_parse(const char *s, mg_error_format_t *out)
{
    static const struct {
        const char *name;
        mg_error_format_t f;
    } names[] = {
        { "auto", MG_ERROR_FORMAT_AUTO },
        { "plain", MG_ERROR_FORMAT_PLAIN },
        { "openai", MG_ERROR_FORMAT_OPENAI },
        { "ollama", MG_ERROR_FORMAT_PLAIN }, /* Ollama's errors are {"error": "..."} */
    };
    for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++)
        if (strcmp(s, names[i].name) == 0) {
            *out = names[i].f;
            return 0;
        }
    return MG_EINVAL;
}

mg_error_format_t mg_policy_error_format(const mg_policy_state_t *st)
{
    return st->error_format;
}

bool mg_policy_has_on_event(mg_policy_t *p)
{
    return p->current->hook_from_file[MG_HOOK_ON_EVENT];
}
