/*
 * policy: the operator's decisions, scripted in LuaJIT.
 *
 * A policy file returns a table of hooks (authenticate, admit, limits, route, agent_auth,
 * on_event, shutdown); docs/policy.md is the contract a policy author reads. This module loads
 * that file into a LuaJIT state of its own, calls the hooks with plain data (copies, never C
 * pointers) and turns their results into the C values below, validated: a hook that returns the
 * wrong type is an error that names the hook and its file:line.
 *
 * Every hook call is bounded in time (the policy code runs in LuaJIT's interpreter with an
 * instruction-count hook that checks a deadline) and the state's memory is capped (a custom
 * allocator). A hook that throws, runs too long, allocates too much or returns a bad result is
 * logged once with its traceback and fails closed: a request is refused with a 5xx, limits and
 * shutdown take the safe defaults from the options.
 *
 * A state is reference-counted. mg_policy_acquire() pins the current state for one request and
 * mg_policy_release() unpins it; every request hook takes the pinned state, so a request that
 * started before a reload finishes on the state it started on. mg_policy_reload() builds a new
 * state beside the old one and swaps only if the file loads, runs and returns valid hooks; the
 * old state's timers are cancelled at the swap and the state is freed when its last pin goes.
 * The shared dictionary (moongate.dict) belongs to the policy, not to a state, and survives.
 *
 * Single-threaded: every function runs on the loop's thread.
 */
#ifndef MOONGATE_POLICY_H
#define MOONGATE_POLICY_H

#include "moongate/pool.h"
#include "moongate/settings.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <uv.h>

typedef struct mg_policy mg_policy_t;
typedef struct mg_policy_state mg_policy_state_t;

/* One request header; name is lower-case. Both strings are NUL-terminated. */
typedef struct mg_policy_header {
    const char *name;
    const char *value;
} mg_policy_header_t;

/*
 * A request as the hooks see it. The caller (the HTTP front end) owns every string; the policy
 * copies what it needs during the call and keeps nothing afterwards.
 */
typedef struct mg_policy_request {
    const char *method;      /* "POST" */
    const char *path;        /* "/api/generate?x=1", the request target as received */
    const char *decoded_path; /* "/api/generate": decoded, dot segments removed; may be NULL */
    const char *remote_addr; /* "203.0.113.7" or "::1"; may be NULL */
    const mg_policy_header_t *headers;
    size_t nheaders;
    /* Nonzero: one request's number. Its hooks (authenticate, admit, route) then share one
       Lua table, built once; 0 builds one per hook call. */
    uint64_t seq;
} mg_policy_request_t;

#define MG_POLICY_MAX_HEADERS 8
#define MG_POLICY_HEADER_NAME_MAX 64
#define MG_POLICY_HEADER_VALUE_MAX 512
#define MG_POLICY_MESSAGE_MAX 256

/* A response header a hook asked for (retry-after, www-authenticate). */
typedef struct mg_policy_out_header {
    char name[MG_POLICY_HEADER_NAME_MAX];
    char value[MG_POLICY_HEADER_VALUE_MAX];
} mg_policy_out_header_t;

/*
 * The outcome of authenticate, admit, agent_auth and route. When allow is false the request is
 * answered with status, message and headers; when true, user holds the user id (authenticate,
 * agent_auth) and status is 0.
 */
typedef struct mg_policy_decision {
    bool allow;
    int status;                          /* 400..599 when refused */
    char user[MG_USER_ID_MAX + 1];       /* validated: mg_pool_user_id_valid() rules */
    char message[MG_POLICY_MESSAGE_MAX]; /* for the client; never a traceback */
    int nheaders;
    mg_policy_out_header_t headers[MG_POLICY_MAX_HEADERS];
    /* authenticate: the request header that held the credential it checked (lower case;
       "authorization" unless the hook said otherwise, "" for none). The gateway's own
       credential does not travel upstream unless the route says so. */
    char credential[MG_POLICY_HEADER_NAME_MAX];
} mg_policy_decision_t;

/* The shape of error bodies (docs/policy.md, "Errors"). */
typedef enum mg_error_format {
    MG_ERROR_FORMAT_AUTO = 0, /* by the path: /v1/... OpenAI's, /api/... Ollama's, else plain */
    MG_ERROR_FORMAT_PLAIN,    /* {"error": "message", "request_id": "..."}: Ollama's shape */
    MG_ERROR_FORMAT_OPENAI,   /* {"error": {"message", "type", "code", "param", "request_id"}} */
} mg_error_format_t;

#define MG_ROUTE_HEADER_RULES_MAX 16
#define MG_ROUTE_HEADER_VALUE_MAX 2048
#define MG_ROUTE_HEADER_BYTES 4096

/* One rule for the upstream request's fields: set name to value, or remove name. */
typedef struct mg_policy_header_rule {
    uint16_t name_off, name_len;  /* in the route's rule_buf; the name is lower case */
    uint16_t value_off, value_len;
    bool remove;
} mg_policy_header_rule_t;

typedef enum mg_route_transport {
    MG_ROUTE_TCP = 0, /* dial host:port */
    MG_ROUTE_AGENT,   /* the user's moongate-agent WebSocket */
} mg_route_transport_t;

/* Where a user's tunnel goes: the result of the route hook. Empty strings mean "not given". */
typedef struct mg_policy_route {
    mg_route_transport_t transport;
    char host[256];            /* the user's sshd (tcp only) */
    int port;                  /* 1..65535 */
    char ssh_user[64];
    char key[1024];            /* private key file */
    char key_passphrase[256];  /* optional */
    char known_hosts[1024];    /* known_hosts file; required unless host_key is pinned */
    char host_key[128];        /* optional pinned fingerprint, "SHA256:<base64>" */
    char target_host[256];     /* where the channel goes on the user's machine */
    int target_port;
    /* For the upstream request (docs/policy.md, "route"): */
    mg_policy_header_rule_t rules[MG_ROUTE_HEADER_RULES_MAX]; /* fields set or removed */
    int nrules;
    char rule_buf[MG_ROUTE_HEADER_BYTES];
    char host_header[256];     /* the Host sent; "" for target_host:target_port */
    bool forward_credential;   /* let authenticate's credential header through */
    uint32_t head_timeout_ms;  /* until the response head; 0: UPSTREAM_HEAD_TIMEOUT */
    uint32_t idle_timeout_ms;  /* the longest pause between response bytes; 0: none */
    mg_error_format_t error_format; /* AUTO: the policy's choice */
} mg_policy_route_t;

/* Handed to the shutdown hook. */
typedef struct mg_policy_shutdown_info {
    const char *reason; /* "SIGTERM", "SIGINT", "api", ... */
    int in_flight;      /* requests being served */
    int connections;    /* SSH connections open */
} mg_policy_shutdown_info_t;

/* How to shut down: the result of the shutdown hook. */
typedef struct mg_policy_shutdown {
    uint64_t grace_ms;
    bool notify_clients;
    bool force_after_grace;
    char message[MG_POLICY_MESSAGE_MAX];
} mg_policy_shutdown_t;

/* A finished request, for the "request" event. Strings may be NULL; -1 for a count not known. */
typedef struct mg_policy_request_info {
    const char *method;
    const char *path;
    int status;
    uint64_t bytes_in;        /* request body bytes */
    uint64_t bytes_out;       /* response body bytes */
    double ttfb_ms;           /* to the first response byte; -1 without one */
    double duration_ms;
    const char *model;
    int64_t prompt_tokens;
    int64_t completion_tokens;
    const char *outcome;      /* NULL when complete; else why it was cut */
} mg_policy_request_info_t;

/* Handed to on_event. Strings may be NULL. */
typedef struct mg_policy_event {
    const char *type;    /* "connection_opened", "connection_closed", "connection_unhealthy",
                            "agent_joined", "agent_left", "request", ... */
    const char *user;
    uint64_t conn_id;    /* 0 when not about a connection */
    const char *message;
    const mg_policy_request_info_t *request; /* for "request" */
} mg_policy_event_t;

/* Stats providers (the pool). Return 0, or a negative code when the user is unknown. */
typedef int (*mg_policy_user_stats_fn)(void *ctx, const char *user, mg_pool_user_stats_t *out);
typedef void (*mg_policy_pool_stats_fn)(void *ctx, mg_pool_stats_t *out);

/* Wall-clock time in milliseconds since the epoch; replaceable for tests. */
typedef uint64_t (*mg_policy_clock_fn)(void *ctx);

/*
 * Where the Lua library (lua/: the default policy and the moongate.* modules) is when neither
 * the options nor $MOONGATE_LUA_DIR name it: the source tree's for a program run inside the tree
 * it was built in; else beside the running program (<prefix>/bin/../share/moongate/lua, as
 * `cmake --install` lays it out); else the compiled-in install path. Writes into buf when it
 * needs to; returns the directory.
 */
const char *mg_policy_default_lua_dir(char *buf, size_t cap);

typedef struct mg_policy_options {
    const char *path;          /* the policy file; NULL runs lua/moongate/default.lua */
    const char *lua_dir;       /* where lua/ lives; NULL: $MOONGATE_LUA_DIR, else
                                  mg_policy_default_lua_dir() */
    size_t memory_limit;       /* bytes per state; 64 MiB */
    uint32_t hook_timeout_ms;  /* per hook call and timer callback; 50 */
    uint32_t load_timeout_ms;  /* running the file's main chunk; 1000 */
    size_t dict_max_entries;   /* 100000 */
    size_t dict_max_bytes;     /* keys + string values; 16 MiB */
    /*
     * moongate.dict in Redis, shared by every node that names the same one:
     * redis[s]://[[user]:password@]host[:port][/db] (MOONGATE_REDIS_URL). NULL or "": the
     * in-process dictionary. A hook waits for Redis without blocking the loop, at most
     * redis_timeout_ms per call (MOONGATE_REDIS_TIMEOUT; 20), then the call fails and the
     * policy decides (docs/policy.md, "Cluster-wide dictionary").
     */
    const char *redis_url;
    uint32_t redis_timeout_ms;
    /* For rediss://: the CA file to trust (NULL: the system's store; MOONGATE_REDIS_CA), and a
       client certificate chain and key (MOONGATE_REDIS_CERT, MOONGATE_REDIS_KEY), for a Redis
       whose tls-auth-clients asks for one. */
    const char *redis_ca_file, *redis_cert_file, *redis_key_file;
    int max_timers;            /* per state; 1024 */
    /*
     * false (the default): policy code runs in the interpreter and every call is bounded.
     * true: the JIT compiles it; faster for heavy policies, but a compiled loop is never
     * interrupted, so hook_timeout_ms no longer holds. Benchmarks only.
     */
    bool jit;
    /*
     * Adds moongate.debug_spin(ms), which keeps the loop busy in C for ms milliseconds where
     * no time budget can stop it: for testing the watchdog (MOONGATE_DEBUG_FUNCTIONS). false.
     */
    bool debug_functions;
    mg_pool_limits_t default_limits;     /* limits when a hook fails or says nothing */
    mg_policy_shutdown_t default_shutdown;
} mg_policy_options_t;

/*
 * For the watchdog, from a signal handler on the loop's thread: writes into buf which policy
 * call is running ("in the policy's route hook (policy.lua:12), at policy.lua:15, in the C
 * function find"), or that none is. Reads the running state's stack; allocates nothing.
 */
void mg_policy_describe_running(char *buf, size_t len);

/* Fills in the defaults above; limits and shutdown come from s (NULL: mg_settings_init()). */
void mg_policy_options_init(mg_policy_options_t *o, const mg_settings_t *s);

/*
 * Loads the policy. Returns 0 and *out, or:
 *   MG_EINVAL   an option is out of range;
 *   MG_ECONFIG  the file did not load, run or validate; err says "FILE:LINE: message";
 *   MG_ENOMEM.
 * The options are copied (strings too).
 */
int mg_policy_new(uv_loop_t *loop, const mg_policy_options_t *o, mg_policy_t **out, char *err,
                  size_t errlen);

/*
 * Cancels the current state's timers (their callbacks are told "shutdown") and drops the
 * policy. States still pinned stay valid until released; the memory goes with the last of them.
 * Timer handles close asynchronously: run the loop afterwards.
 */
void mg_policy_free(mg_policy_t *p);

/* The Lua library this policy loads the default policy and moongate.* modules from. */
const char *mg_policy_lua_dir(const mg_policy_t *p);

/*
 * For `moongate -t`: when the policy routes with the default policy's route (it has no route
 * hook of its own, or it builds on require "moongate.default"), the SSH key and known_hosts
 * files that route names (MOONGATE_SSH_KEY, MOONGATE_KNOWN_HOSTS or their defaults) into key
 * and known_hosts, and returns 1. Returns 0 when the policy routes its own way, or a negative
 * code when the route cannot be read.
 */
int mg_policy_default_route_files(mg_policy_t *p, char *key, size_t keycap, char *known_hosts,
                                  size_t khcap);

void mg_policy_set_stats_fn(mg_policy_t *p, mg_policy_user_stats_fn user_fn,
                            mg_policy_pool_stats_fn pool_fn, void *ctx);
void mg_policy_set_clock(mg_policy_t *p, mg_policy_clock_fn fn, void *ctx);

/*
 * Builds a new state from the file, runs it, checks its hooks and swaps it in. Returns 0, or
 * MG_ECONFIG (err has "FILE:LINE: message"; "reload failed: ..." is logged) and the old
 * policy keeps serving. The old state's timers are told "reload".
 */
int mg_policy_reload(mg_policy_t *p, char *err, size_t errlen);

/* Pins the current state for one request. Never NULL. Pair with mg_policy_release(). */
mg_policy_state_t *mg_policy_acquire(mg_policy_t *p);
void mg_policy_release(mg_policy_state_t *st);

/* Which load a state came from: 1 for the first, +1 per successful reload. */
uint64_t mg_policy_state_generation(const mg_policy_state_t *st);

/*
 * The request hooks. Each always fills *out (or *route) with the decision to act on, and
 * returns 0 when the hook ran and gave a valid answer (allow or refuse), or, when it failed
 * (the decision is then a refusal with status 500 and the failure is logged):
 *   MG_ETIMEDOUT  it ran past hook_timeout_ms;
 *   MG_ENOMEM     it hit memory_limit;
 *   MG_EINVAL     it threw, or returned a result of the wrong type or out of range;
 *   MG_ESTATE     called from inside another hook.
 */
int mg_policy_authenticate(mg_policy_state_t *st, const mg_policy_request_t *req,
                           mg_policy_decision_t *out);
int mg_policy_admit(mg_policy_state_t *st, const mg_policy_request_t *req, const char *user,
                    mg_policy_decision_t *out);
/* On success *route is filled and out->allow is true; a refusal leaves *route zeroed. */
int mg_policy_route(mg_policy_state_t *st, const mg_policy_request_t *req, const char *user,
                    mg_policy_route_t *route, mg_policy_decision_t *out);
/*
 * The same three, for a caller that can wait: with the shared dictionary in Redis, a hook that
 * touches it waits for the answer without blocking the loop. They return as above, or
 * MG_EAGAIN: the hook is waiting, and done(ctx, rc) follows from the loop with *out (and
 * *route) filled and rc as above. req's strings, user, out and route must stay valid until
 * then. Without Redis they never wait.
 */
typedef void (*mg_policy_done_fn)(void *ctx, int rc);
int mg_policy_authenticate_wait(mg_policy_state_t *st, const mg_policy_request_t *req,
                                mg_policy_decision_t *out, mg_policy_done_fn done, void *ctx);
int mg_policy_admit_wait(mg_policy_state_t *st, const mg_policy_request_t *req,
                         const char *user, mg_policy_decision_t *out, mg_policy_done_fn done,
                         void *ctx);
int mg_policy_route_wait(mg_policy_state_t *st, const mg_policy_request_t *req,
                         const char *user, mg_policy_route_t *route, mg_policy_decision_t *out,
                         mg_policy_done_fn done, void *ctx);

/* token is the agent's bearer token; req is its upgrade request. */
int mg_policy_agent_auth(mg_policy_state_t *st, const char *token,
                         const mg_policy_request_t *req, mg_policy_decision_t *out);

/*
 * The hooks outside a request run on the current state. Each fills *out with the hook's answer,
 * or with the defaults from the options when the hook fails (same codes as above).
 */
int mg_policy_limits(mg_policy_t *p, const char *user, mg_pool_limits_t *out);
int mg_policy_shutdown(mg_policy_t *p, const mg_policy_shutdown_info_t *info,
                       mg_policy_shutdown_t *out);
/* Errors are logged and returned; there is nothing to fail closed. */
int mg_policy_event(mg_policy_t *p, const mg_policy_event_t *ev);

/* True if the current policy file defines on_event (the default one does nothing of note). */
bool mg_policy_has_on_event(mg_policy_t *p);

/* The policy file's error_format (AUTO when it says none). */
mg_error_format_t mg_policy_error_format(const mg_policy_state_t *st);

/* An mg_pool_limits_fn over mg_policy_limits(): ctx is the mg_policy_t. */
int mg_policy_pool_limits_fn(void *ctx, const char *user, mg_pool_limits_t *out);

/* The Redis back end's books (for /metrics). */
typedef struct mg_redis_stats {
    bool up;               /* connected and answering AUTH/SELECT */
    uint64_t commands;     /* sent */
    uint64_t errors;       /* answered with an error, or lost with the connection */
    uint64_t timeouts;     /* waits that ran out */
    uint64_t unavailable;  /* calls failed at once: not connected, or too many out */
    int in_flight;
} mg_redis_stats_t;

/* False when the dictionary is in-process; else true and *out. */
bool mg_policy_redis_stats(mg_policy_t *p, mg_redis_stats_t *out);

/*
 * For `moongate -t`: connects to o->redis_url (with o's TLS files) on loop, which must not be
 * running, for at most timeout_ms. Returns 0 once AUTH, SELECT and PING have answered (msg says
 * how fast), MG_ECONFIG (a bad URL or TLS file) or MG_ECONNECT (msg says why), with nothing
 * logged.
 */
int mg_policy_redis_probe(uv_loop_t *loop, const mg_policy_options_t *o, uint32_t timeout_ms,
                          char *msg, size_t cap);

/* Bytes the current state uses, and its limit (for /metrics). */
size_t mg_policy_memory_used(mg_policy_t *p);

#endif
