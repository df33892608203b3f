/*
 * agent_util: the pure parts of moongate-agent (the program that dials out from a user's machine
 * to the gateway's /tunnel endpoint, docs/tunnel.md), kept apart from the event loop so they can
 * be tested alone.
 *
 * - the reconnect schedule: exponential backoff with jitter, the random source injected;
 * - parsing: the gateway URL (ws:// or wss://), HOST:PORT, the --sshd-inetd command line, the
 *   control messages the gateway sends in text frames;
 * - the command line of the agent and of `moongate-agent setup`;
 * - the checks and strings `setup` needs: an OpenSSH public key line, its SHA256 fingerprint,
 *   the restricted authorized_keys line.
 *
 * Nothing here touches libuv or libwebsockets. Functions return 0 or a negative code from
 * moongate/error.h; the ones that take err/errlen write a one-line reason there on failure.
 */
#ifndef MOONGATE_AGENT_UTIL_H
#define MOONGATE_AGENT_UTIL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define MG_AGENT_BACKOFF_BASE_MS 1000u
#define MG_AGENT_BACKOFF_MAX_MS 60000u
/* A WebSocket that stayed open this long resets the schedule (see mg_agent_backoff_reset). */
#define MG_AGENT_BACKOFF_STABLE_MS 10000u
#define MG_AGENT_MAX_CONNECTIONS_DEFAULT 10
/* Seconds between two looks at what a --gateway name resolves to (--resolve-interval). */
#define MG_AGENT_RESOLVE_INTERVAL_DEFAULT_S 30
#define MG_AGENT_RESOLVE_INTERVAL_MAX_S 86400
#define MG_AGENT_ID_HEX_LEN 32   /* 16 random bytes (moongate/tunnel_protocol.h: 16 to 64) */
#define MG_AGENT_TOKEN_MAX 4096

/* ---- reconnect schedule ---- */

typedef uint32_t (*mg_agent_rand_fn)(void *ctx);

typedef struct mg_agent_backoff {
    /* private */
    uint32_t base_ms;
    uint32_t max_ms;
    uint32_t step_ms;     /* the next wait is random in [step/2, step] */
    mg_agent_rand_fn rand;
    void *rand_ctx;
} mg_agent_backoff_t;

/* Starts at base_ms (the first wait is in [base/2, base]) and doubles up to max_ms. */
void mg_agent_backoff_init(mg_agent_backoff_t *b, uint32_t base_ms, uint32_t max_ms,
                           mg_agent_rand_fn rand, void *rand_ctx);

/* The next wait in milliseconds, random in [step/2, step]; then the step doubles (capped). */
uint32_t mg_agent_backoff_next(mg_agent_backoff_t *b);

/* The next wait is the maximum, exactly (a refused token: never a tight loop); the step stays
   at the maximum afterwards. */
uint32_t mg_agent_backoff_next_max(mg_agent_backoff_t *b);

/* Back to the first step: called once a WebSocket has stayed up MG_AGENT_BACKOFF_STABLE_MS. */
void mg_agent_backoff_reset(mg_agent_backoff_t *b);

/* ---- parsing ---- */

typedef struct mg_agent_url {
    bool tls;             /* wss:// */
    char host[256];       /* without brackets for an IPv6 literal */
    int port;             /* 80 or 443 when the URL names none */
    char path[1024];      /* "/tunnel" when the URL has no path */
    char host_header[300];/* the Host header: host, or host:port when the port is not the default */
} mg_agent_url_t;

/* ws://HOST[:PORT][/PATH] or wss://...; no user info, no fragment, no spaces.
   Returns 0 or MG_EINVAL (with a reason in err). */
int mg_agent_url_parse(const char *url, mg_agent_url_t *out, char *err, size_t errlen);

/* HOST:PORT or [V6]:PORT, port 1-65535. Returns 0 or MG_EINVAL. */
int mg_agent_hostport_parse(const char *s, char *host, size_t hostlen, int *port);

/* Splits cmd on spaces and tabs (no quoting, no shell). On success *argv_out is a NULL-ended
   array in one allocation (free it with free()) and *argc_out its length. Returns 0, MG_EINVAL
   (empty), or MG_ENOMEM. */
int mg_agent_split_command(const char *cmd, char ***argv_out, int *argc_out);

/* Writes cmd into out with a leading "~" of each word ("~" alone or "~/...") replaced by home,
   as a shell would: the command runs without one. Returns 0; MG_EINVAL for "~name" (another
   user's home) or a "~" without a home (err says which); MG_ENOMEM when out is too small. */
int mg_agent_expand_home(const char *cmd, const char *home, char *out, size_t cap, char *err,
                         size_t errlen);

/* A bearer token: 1 to MG_AGENT_TOKEN_MAX visible ASCII characters (no spaces or controls: it
   goes into a header line). Returns 0 or MG_EINVAL. */
int mg_agent_token_check(const char *token);

/* Writes 2*n lowercase hex characters of bytes and a NUL into out (2*n+1 bytes). */
void mg_agent_hex(const uint8_t *bytes, size_t n, char *out);

enum mg_agent_control {
    MG_AGENT_CONTROL_UNKNOWN = 0,  /* valid JSON object, a type we do not know (ignored) */
    MG_AGENT_CONTROL_OPEN = 1,     /* {"type":"open"} */
};

/* Reads a control message (a JSON object with a string member "type"). Returns one of
   mg_agent_control, or MG_EINVAL when it is not a JSON object. */
int mg_agent_control_parse(const char *s, size_t n);

/* ---- command lines ---- */

#define MG_AGENT_GATEWAYS_MAX 8   /* --gateway given this many times at most */

typedef struct mg_agent_args {
    const char *gateways[MG_AGENT_GATEWAYS_MAX]; /* each --gateway, as given */
    mg_agent_url_t urls[MG_AGENT_GATEWAYS_MAX];
    int n_gateways;             /* at least 1 */
    bool tls;                   /* one of them is wss:// */
    const char *token;          /* --token, else $MOONGATE_TOKEN */
    bool token_from_argv;
    const char *ssh;            /* --ssh HOST:PORT (default 127.0.0.1:22 when no --sshd-inetd) */
    char ssh_host[256];
    int ssh_port;
    const char *sshd_inetd;     /* --sshd-inetd CMD */
    const char *ca_file;
    int max_connections;
    int resolve_interval_s;     /* --resolve-interval: seconds between resolves of a name */
    bool once;
    int verbose;                /* -v: debug, -vv: trace */
    bool help;
    bool version;
} mg_agent_args_t;

/* Parses argv[1..] of the agent (argv[0] is the program). env_token is $MOONGATE_TOKEN or NULL.
   --help and --version stop parsing and succeed. Returns 0 or MG_EINVAL (reason in err). */
int mg_agent_args_parse(int argc, char **argv, const char *env_token, mg_agent_args_t *out,
                        char *err, size_t errlen);

typedef struct mg_agent_setup_args {
    const char *dir;            /* NULL: the caller picks ~/.config/moongate-agent */
    const char *gateway_key;
    int llm_port;               /* 11434 */
    bool help;
} mg_agent_setup_args_t;

/* Parses the arguments after "setup". Returns 0 or MG_EINVAL (reason in err). */
int mg_agent_setup_args_parse(int argc, char **argv, mg_agent_setup_args_t *out,
                              char *err, size_t errlen);

/* ---- setup helpers ---- */

/* Checks an OpenSSH public key line "TYPE BASE64 [COMMENT]": a known key type, a blob that
   decodes and names the same type, no options in front, one line. Returns 0 or MG_EINVAL. */
int mg_agent_pubkey_check(const char *line, char *err, size_t errlen);

/* The OpenSSH fingerprint of a public key line: "SHA256:" and unpadded base64 of the blob's
   SHA-256. Returns 0, MG_EINVAL (not a key line) or MG_ENOMEM (out too small; 52 bytes is
   enough). */
int mg_agent_pubkey_fingerprint(const char *line, char *out, size_t outlen);

/* The authorized_keys line that lets key forward to 127.0.0.1:llm_port and nothing else.
   Returns 0, or MG_ENOMEM when out is too small. */
int mg_agent_authorized_line(const char *key, int llm_port, char *out, size_t outlen);

#endif
