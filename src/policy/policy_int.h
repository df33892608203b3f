/*
 * Private to src/policy*.c: the policy's internal types and the functions its files share.
 * Nothing outside the policy module includes this header (tests of the dictionary aside).
 *
 *   policy.c       the engine: options, states, the one hook-call path, reload
 *   policy_hooks.c the hooks: requests into Lua values, results into validated C values
 *   policy_lib.c   the `moongate` Lua module (log, clock, stats, timers, dict, env)
 *   policy_dict.c  the shared dictionary, plain C (no Lua)
 *   policy_redis.c the dictionary's Redis back end (its own connection on the loop)
 *   policy_redis_proto.c   the URL, scripts, commands and answers: what is said to Redis
 *   policy_jwt.c   HS256 JWT verification and the small JSON reader it needs
 *   policy_pattern.c  string.find/match/gmatch/gsub with a bound on their work
 */
#ifndef MOONGATE_POLICY_INT_H
#define MOONGATE_POLICY_INT_H

#include "moongate/list.h"
#include "moongate/policy.h"

#include <lua.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <uv.h>

/* ---- the shared dictionary ---- */

typedef struct mg_dict mg_dict_t;

typedef enum mg_dict_type {
    MG_DICT_NUMBER = 1,
    MG_DICT_STRING,
} mg_dict_type_t;

/* A value. For a string, str points into the dictionary and is valid until the next change. */
typedef struct mg_dict_value {
    mg_dict_type_t type;
    double num;
    const char *str;
    size_t len;
} mg_dict_value_t;

#define MG_DICT_KEY_MAX 1024

/* Returns 0, MG_EINVAL (a zero limit) or MG_ENOMEM. */
int mg__dict_new(size_t max_entries, size_t max_bytes, mg_dict_t **out);
void mg__dict_free(mg_dict_t *d);

/* True and *out filled when key is present and not expired at now (ms). */
bool mg__dict_get(mg_dict_t *d, const char *key, size_t klen, uint64_t now, mg_dict_value_t *out);

/*
 * Sets key to *v (v NULL deletes it) with a time to live (0: none). Returns 0, or
 *   MG_EINVAL  key empty or longer than MG_DICT_KEY_MAX;
 *   MG_ENOMEM  the dictionary is full (entries or bytes) even after dropping expired entries.
 */
int mg__dict_set(mg_dict_t *d, const char *key, size_t klen, const mg_dict_value_t *v,
                 uint64_t ttl_ms, uint64_t now);

/*
 * Adds by to the number at key. A missing (or expired) key starts from 0 and takes ttl_ms (0:
 * none); an existing key keeps its expiry. Returns 0 with the new value in *out, or MG_EINVAL
 * (bad key, or the value is a string) or MG_ENOMEM (full).
 */
int mg__dict_incr(mg_dict_t *d, const char *key, size_t klen, double by, uint64_t ttl_ms,
                  uint64_t now, double *out);

/* Milliseconds key has left to live: -1 none, -2 missing. */
int64_t mg__dict_ttl(mg_dict_t *d, const char *key, size_t klen, uint64_t now);

void mg__dict_usage(const mg_dict_t *d, size_t *entries, size_t *bytes, size_t *max_entries,
                    size_t *max_bytes);

/*
 * The token bucket step (lua/moongate/token_bucket.lua) on the dictionary: key holds the time
 * at which the bucket is full again (full_at, in the bucket's clock, seconds). Taking n tokens
 * at now moves it n * interval later, unless that leaves more than burst tokens of debt: then
 * nothing changes and *allowed is false. *value is the new full_at when allowed, else the
 * seconds of debt over the burst. Returns 0, MG_EINVAL (bad key, or key holds a string) or
 * MG_ENOMEM.
 */
int mg__dict_take_bucket(mg_dict_t *d, const char *key, size_t klen, double n, double interval,
                         double burst, double now_s, uint64_t now_ms, bool *allowed,
                         double *value);

/* ---- the Redis back end (policy_redis.c) ---- */

typedef struct mg_redis mg_redis_t;
typedef struct mg__redis_op mg__redis_op_t;

typedef enum mg__rdict_op {
    MG_RDICT_GET = 1,
    MG_RDICT_SET,    /* has_value false deletes */
    MG_RDICT_DELETE,
    MG_RDICT_INCR,
    MG_RDICT_TTL,
    MG_RDICT_TAKE_BUCKET,
} mg__rdict_op_t;

/* One dictionary operation, its arguments checked. */
typedef struct mg__rdict_req {
    mg__rdict_op_t op;
    const char *key;
    size_t klen;
    bool has_value;
    mg_dict_value_t value;
    uint64_t ttl_ms;
    double by;                          /* incr */
    double n, interval, burst, now;     /* take_bucket */
} mg__rdict_req_t;

/* Results of the operation have been pushed on the coroutine given (nres of them). */
typedef void (*mg__redis_done_fn)(void *ctx, int nres);

/* Where Redis is: MOONGATE_REDIS_URL, parsed. */
typedef struct mg__redis_addr {
    char host[256];
    int port;       /* 6379 */
    char user[128]; /* "" for none (AUTH password alone) */
    char pass[256]; /* "" for none (no AUTH) */
    int db;         /* 0 */
    bool tls;       /* rediss:// */
    char name[300]; /* redis://host:port/db, without the password: for logs */
} mg__redis_addr_t;

/* What the back end is given: the URL, and for rediss:// the CA to trust (NULL: the system's
   store) and a client certificate and key (both or neither). */
typedef struct mg__redis_conf {
    const char *url;
    const char *ca_file, *cert_file, *key_file;
} mg__redis_conf_t;

/* Parses redis[s]://[[user]:password@]host[:port][/db] (user and password %-escaped; an IPv6
   host in brackets). Returns 0, or MG_ECONFIG with err saying why. */
int mg__redis_parse_url(const char *url, mg__redis_addr_t *r, char *err, size_t errlen);

/* Starts connecting (and keeps at it). Returns 0, MG_ECONFIG (a bad URL, TLS files that do
   not load; err says why) or MG_ENOMEM. */
int mg__redis_new(uv_loop_t *loop, const mg__redis_conf_t *conf, mg_redis_t **out, char *err,
                  size_t errlen);
/* Operations still out hear of it with no reply. Handles close asynchronously. */
void mg__redis_free(mg_redis_t *r);
const char *mg__redis_name(const mg_redis_t *r);
void mg__redis_get_stats(const mg_redis_t *r, mg_redis_stats_t *out);
/* A wait for an answer ran out after ms (for the books and the "slow" line). */
void mg__redis_note_timeout(mg_redis_t *r, uint32_t ms);

/*
 * Sends q. Returns 0 and *op: done(ctx, nres) runs once with the results pushed on co (the
 * value; or nil and a message when Redis failed), unless mg__redis_op_cancel(*op) comes first.
 * Or fails at once with err: MG_ECONNECT (not connected), MG_EQUEUEFULL (too many out),
 * MG_EINVAL (a value too large), MG_ENOMEM.
 */
int mg__redis_dict_start(mg_redis_t *r, const mg__rdict_req_t *q, lua_State *co,
                         mg__redis_done_fn done, void *ctx, mg__redis_op_t **op, char *err,
                         size_t errlen);
/* The reply, when it comes, is dropped. */
void mg__redis_op_cancel(mg__redis_op_t *op);

/* ---- what is said to Redis and what its answers mean (policy_redis_proto.c) ---- */

/* The server-side scripts (incr with a time to live, the token bucket), loaded once per
   connection and run by their SHA-1. */
enum { MG_REDIS_SCRIPT_INCR, MG_REDIS_SCRIPT_TAKE, MG_REDIS_SCRIPTS };
extern const char *const mg__redis_scripts[MG_REDIS_SCRIPTS];

/* One operation as a command: argc words, pointing into the struct's own buffers. */
typedef struct mg__redis_cmd {
    int argc;
    const char *argv[9];
    size_t lens[9];
    char *key, *sval;   /* owned: the key with its prefix, a string value with "s:" */
    char num[4][32];
} mg__redis_cmd_t;

/* Builds q's command (sha: the scripts' SHA-1s in hex). Returns 0 or MG_ENOMEM. A string value
   is not checked for size here. */
int mg__redis_cmd_build(const mg__rdict_req_t *q, const char sha[][41], mg__redis_cmd_t *c);
void mg__redis_cmd_free(mg__redis_cmd_t *c);

/* Writes v in decimal at p (no NUL); returns the end. */
char *mg__redis_put_uint(char *p, size_t v);

/* A reader of answers that refuses an array of more than a few elements before hiredis
   allocates it, noting the count claimed in *refused_elements. NULL: out of memory. */
struct redisReader;
struct redisReader *mg__redis_reader_new(int *refused_elements);

/* Pushes op's results from Redis's answer rep (NULL: the connection closed first): the value,
   or nil and a message. Returns how many, 1 or 2. */
struct redisReply;
int mg__redis_push_results(lua_State *L, mg__rdict_op_t op, const struct redisReply *rep);

/* ---- the engine ---- */

typedef enum mg_hook {
    MG_HOOK_AUTHENTICATE = 0,
    MG_HOOK_ADMIT,
    MG_HOOK_LIMITS,
    MG_HOOK_ROUTE,
    MG_HOOK_AGENT_AUTH,
    MG_HOOK_ON_EVENT,
    MG_HOOK_SHUTDOWN,
    MG_HOOK_COUNT,
} mg_hook_t;

extern const char *const mg__hook_names[MG_HOOK_COUNT];

/* "auto", "plain", "openai", "ollama". Returns 0, or MG_EINVAL. */
int mg__policy_error_format_parse(const char *s, mg_error_format_t *out);

#define MG_POLICY_REQ_SLOTS 64

typedef struct mg_policy_timer mg_policy_timer_t;
typedef struct mg__pcall mg__pcall_t;

struct mg_policy {
    uv_loop_t *loop;
    mg_policy_options_t opts; /* path and lua_dir point at the copies below */
    char *path;
    char *lua_dir;
    mg_policy_state_t *current;
    mg_dict_t *dict;
    mg_redis_t *redis; /* the dictionary's back end when MOONGATE_REDIS_URL is set, else NULL */
    bool shared_in_redis; /* moongate.dict is in Redis (stays set while redis goes at the end) */
    mg_policy_user_stats_fn user_stats_fn;
    mg_policy_pool_stats_fn pool_stats_fn;
    void *stats_ctx;
    mg_policy_clock_fn clock_fn;
    void *clock_ctx;
    uint64_t generations;
    /* One for the owner until mg_policy_free(), one per live state. */
    int refs;
    bool freeing;
    bool reloading; /* guards against a reload started from inside a reload */
};

struct mg_policy_state {
    mg_policy_t *policy;
    lua_State *L;
    /* One while current, one per pin, one per timer handle not yet closed. */
    int refs;
    bool retired;
    uint64_t generation;

    /* The allocator's books. */
    size_t mem_used;
    size_t mem_limit;
    bool mem_capped; /* false while building error messages, so they cannot fail */
    bool mem_hit;    /* an allocation was refused during the current call */

    /* The time bound of the current call (the count hook reads these). */
    bool in_call;
    bool timed_out;
    uint64_t deadline_ns;
    uint32_t budget_ms;
    const char *call_what, *call_where; /* the current call's, for the watchdog */
    mg__pcall_t *running; /* the coroutine call now running, when it is one (it may wait) */
    mg__pcall_t *pc_pool; /* finished calls kept with their coroutine and timer, for reuse */
    int pc_pooled;

    bool rebuild;         /* memory stays high after a failed call: replace the state */
    char last_error[512]; /* the first line of the last failure, for load errors */

    int hook_ref[MG_HOOK_COUNT];
    char hook_where[MG_HOOK_COUNT][160]; /* "file.lua:12", for error messages */
    int req_ref[MG_POLICY_REQ_SLOTS]; /* recent requests' tables (registry), by seq % slots */
    uint64_t req_seq[MG_POLICY_REQ_SLOTS];
    bool hook_from_file[MG_HOOK_COUNT]; /* else the default's */
    mg_error_format_t error_format;     /* the policy table's error_format */

    mg_list_t timers;
    int ntimers;
    int64_t next_timer_id;
};

struct mg_policy_timer {
    uv_timer_t handle;
    mg_policy_state_t *st;
    mg_list_t node;             /* on st->timers, newest first, until it closes */
    int64_t id;
    bool repeat;
    bool closing;
};

/*
 * The one path by which C calls Lua. Stack on entry: ... fn arg1..argn. On success (0): ...
 * r1..rnres. On failure (a negative code): ... (function and arguments gone), the failure logged
 * once with what (e.g. "authenticate") and where (file:line) and its traceback.
 */
int mg__policy_pcall(mg_policy_state_t *st, const char *what, const char *where, int nargs,
                     int nres, uint32_t budget_ms);

/*
 * Called with a call's result once it finished after waiting: rc as mg__policy_pcall's, and on
 * 0 the results on the state's stack (... r1..rnres) for the callee to read and pop.
 */
typedef void (*mg__pcall_done_fn)(void *ctx, int rc);

/*
 * mg__policy_pcall(), but the call may wait for the Redis back end: it runs in a coroutine, and
 * a moongate.dict call inside it yields until Redis answers (or the wait runs out; the wait
 * counts against budget_ms). Returns as mg__policy_pcall() when it finished without waiting,
 * or MG_EAGAIN when it is waiting: done(ctx, rc) follows from the loop, on a state kept alive
 * until then. Without a Redis back end (or with done NULL) it is mg__policy_pcall().
 */
int mg__policy_pcall_wait(mg_policy_state_t *st, const char *what, const char *where,
                          int nargs, int nres, uint32_t budget_ms, mg__pcall_done_fn done,
                          void *ctx);

/* A done function for calls whose end nobody waits for (on_event, timers): failures are
   logged already. */
void mg__policy_call_forget(void *ctx, int rc);

/*
 * For the dictionary's functions: sends q to Redis and yields the running call until the
 * answer (then the results are the function's), or returns what a call that cannot wait gets:
 * nil and why (not in a call that may wait, or Redis unavailable). Use as
 * `return mg__policy_redis_call(L, &q);`.
 */
int mg__policy_redis_call(lua_State *L, const mg__rdict_req_t *q);

/* Writes "file:line" of the function at idx into buf. */
void mg__policy_where(lua_State *L, int idx, char *buf, size_t len);

/* The state whose allocator L uses: C functions find their state this way, so Lua holds no
 * pointer to it. */
static inline mg_policy_state_t *mg__policy_state_of(lua_State *L)
{
    void *ud;
    lua_getallocf(L, &ud);
    return ud;
}

uint64_t mg__policy_now_ms(mg_policy_t *p);
void mg__policy_state_unref(mg_policy_state_t *st);

/* policy_hooks.c: pushes the stats table the admit hook and moongate.stats() see. */
void mg__policy_push_user_stats(lua_State *L, mg_policy_t *p, const char *user);

/* policy_lib.c: registers package.preload.moongate (needs the state's policy). */
void mg__policy_lib_open(mg_policy_state_t *st);
/* policy_lib.c: cancels every timer of st, calling each callback with reason. */
void mg__policy_timers_cancel(mg_policy_state_t *st, const char *reason);

/*
 * policy_jwt.c: verifies an HS256 JWT against secret at now_s (seconds) with leeway_s. On
 * success pushes the claims table and returns 0; otherwise pushes nothing, writes a short
 * reason ("expired", "bad signature", ...) and returns MG_EINVAL.
 */
int mg__jwt_verify_hs256(lua_State *L, const char *token, size_t tlen, const char *secret,
                         size_t slen, double now_s, double leeway_s, char *reason,
                         size_t reasonlen);

/*
 * policy_pattern.c: a check function of the pattern matcher, run every 1024 or so steps of
 * matching. Returns 0 to go on, or a negative code with a short reason in why ("time budget of
 * 50 ms exceeded"); the pattern function then raises "FILE:LINE: <why> in string.find".
 */
typedef int (*mg__pattern_check_fn)(lua_State *L, void *ctx, char *why, size_t whylen);

/*
 * policy_pattern.c: replaces string.find, match, gmatch and gsub in L's string table (which
 * string methods go through too) with moongate's matcher: LuaJIT's semantics, results and
 * errors, but bounded. check (NULL for none) is asked every so many steps whether to go on;
 * recursion stops at 200 levels ("pattern too complex") in any case. Needs the string library
 * open; does nothing without it.
 */
void mg__pattern_open(lua_State *L, mg__pattern_check_fn check, void *ctx);

/*
 * policy_pattern.c: mg__pattern_open() for a policy state, right after luaL_openlibs. Its check
 * is the running call's deadline: past it the call is marked timed out (so it fails with
 * MG_ETIMEDOUT) and the pattern function raises "time budget of N ms exceeded in string.find".
 */
void mg__policy_open_patterns(lua_State *L);

/* States alive in the process (for tests: a retired state must go with its last pin). */
int mg__policy_live_states(void);

/* The same rule as mg_pool_user_id_valid(), kept here so policy does not link the pool. */
bool mg__policy_user_id_valid(const char *id, size_t len);

#endif
