/*
 * The pure parts of moongate-agent: reconnect schedule, parsing, command lines, key checks.
 * See agent_util.h.
 */
#include "agent_util.h"

#include "core/fingerprint.h"
#include "moongate/error.h"
#include "moongate/tunnel_protocol.h"

#include <jansson.h>
#include <openssl/evp.h>

#include <ctype.h>
#include <errno.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

static int fail(char *err, size_t errlen, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static int fail(char *err, size_t errlen, const char *fmt, ...)
{
    if (err != NULL && errlen > 0) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err, errlen, fmt, ap);
        va_end(ap);
    }
    return MG_EINVAL;
}

/* ---- reconnect schedule ---- */

void mg_agent_backoff_init(mg_agent_backoff_t *b, uint32_t base_ms, uint32_t max_ms,
                           mg_agent_rand_fn rand, void *rand_ctx)
{
    b->base_ms = base_ms > 0 ? base_ms : 1;
    b->max_ms = max_ms >= b->base_ms ? max_ms : b->base_ms;
    b->step_ms = b->base_ms;
    b->rand = rand;
    b->rand_ctx = rand_ctx;
}

uint32_t mg_agent_backoff_next(mg_agent_backoff_t *b)
{
    uint32_t step = b->step_ms;
    uint32_t lo = step / 2;
    uint32_t span = step - lo + 1;
    uint32_t wait = lo + b->rand(b->rand_ctx) % span;
    b->step_ms = step > b->max_ms / 2 ? b->max_ms : step * 2;
    return wait;
}

uint32_t mg_agent_backoff_next_max(mg_agent_backoff_t *b)
{
    b->step_ms = b->max_ms;
    return b->max_ms;
}

void mg_agent_backoff_reset(mg_agent_backoff_t *b)
{
    b->step_ms = b->base_ms;
}

/* ---- parsing ---- */

static bool is_regname_char(int c)
{
    return isalnum(c) || c == '-' || c == '.' || c == '_';
}

static bool is_v6_char(int c)
{
    return isxdigit(c) || c == ':' || c == '.';
}

/* Parses decimal digits [s, e) as a port 1-65535. */
static int parse_port(const char *s, const char *e, int *port)
{
    if (s == e || e - s > 5)
        return MG_EINVAL;
    long v = 0;
    for (const char *p = s; p < e; p++) {
        if (!isdigit((unsigned char)*p))
            return MG_EINVAL;
        v = v * 10 + (*p - '0');
    }
    if (v < 1 || v > 65535)
        return MG_EINVAL;
    *port = (int)v;
    return 0;
}

/*
 * Reads "host[:port]" or "[v6][:port]" from [s, e). *port is left alone when there is none;
 * *v6 says whether the host was bracketed.
 */
static int parse_authority(const char *s, const char *e, char *host, size_t hostlen, int *port,
                           bool *v6, bool need_port)
{
    const char *hs, *he, *p;
    *v6 = false;
    if (s < e && *s == '[') {
        hs = s + 1;
        he = memchr(hs, ']', (size_t)(e - hs));
        if (he == NULL)
            return MG_EINVAL;
        for (p = hs; p < he; p++)
            if (!is_v6_char((unsigned char)*p))
                return MG_EINVAL;
        if (memchr(hs, ':', (size_t)(he - hs)) == NULL)
            return MG_EINVAL;
        *v6 = true;
        p = he + 1;
    } else {
        hs = s;
        for (p = s; p < e && *p != ':'; p++)
            if (!is_regname_char((unsigned char)*p))
                return MG_EINVAL;
        he = p;
    }
    if (he == hs || (size_t)(he - hs) >= hostlen)
        return MG_EINVAL;
    if (p < e) {
        if (*p != ':' || parse_port(p + 1, e, port) != 0)
            return MG_EINVAL;
    } else if (need_port) {
        return MG_EINVAL;
    }
    memcpy(host, hs, (size_t)(he - hs));
    host[he - hs] = '\0';
    return 0;
}

int mg_agent_url_parse(const char *url, mg_agent_url_t *out, char *err, size_t errlen)
{
    memset(out, 0, sizeof(*out));
    for (const char *c = url; *c; c++)
        if ((unsigned char)*c <= 0x20 || (unsigned char)*c >= 0x7f)
            return fail(err, errlen, "gateway URL has a space or a control character");
    const char *p;
    if (strncasecmp(url, "wss://", 6) == 0) {
        out->tls = true;
        out->port = 443;
        p = url + 6;
    } else if (strncasecmp(url, "ws://", 5) == 0) {
        out->port = 80;
        p = url + 5;
    } else {
        return fail(err, errlen, "gateway URL must start with ws:// or wss:// (got \"%s\")", url);
    }
    if (strchr(p, '#') != NULL)
        return fail(err, errlen, "gateway URL must not have a #fragment");
    const char *e = p + strcspn(p, "/?");
    if (memchr(p, '@', (size_t)(e - p)) != NULL)
        return fail(err, errlen, "gateway URL must not carry user info (the token goes in "
                                 "MOONGATE_TOKEN)");
    bool v6;
    if (parse_authority(p, e, out->host, sizeof(out->host), &out->port, &v6, false) != 0)
        return fail(err, errlen, "gateway URL has a bad host or port: \"%.*s\"", (int)(e - p), p);
    const char *path = *e == '\0' ? MG_TUNNEL_PATH : e;
    if (*path != '/')
        return fail(err, errlen, "gateway URL path must start with /");
    if (strlen(path) >= sizeof(out->path))
        return fail(err, errlen, "gateway URL path is too long");
    memcpy(out->path, path, strlen(path) + 1);
    bool dflt = out->port == (out->tls ? 443 : 80);
    int n;
    if (dflt)
        n = snprintf(out->host_header, sizeof(out->host_header), v6 ? "[%s]" : "%s", out->host);
    else
        n = snprintf(out->host_header, sizeof(out->host_header), v6 ? "[%s]:%d" : "%s:%d",
                     out->host, out->port);
    if (n < 0 || (size_t)n >= sizeof(out->host_header))
        return fail(err, errlen, "gateway host is too long");
    return 0;
}

int mg_agent_hostport_parse(const char *s, char *host, size_t hostlen, int *port)
{
    bool v6;
    return parse_authority(s, s + strlen(s), host, hostlen, port, &v6, true);
}

int mg_agent_split_command(const char *cmd, char ***argv_out, int *argc_out)
{
    static const char sep[] = " \t";
    size_t len = strlen(cmd);
    int n = 0;
    for (const char *p = cmd + strspn(cmd, sep); *p; p += strspn(p, sep)) {
        n++;
        p += strcspn(p, sep);
    }
    if (n == 0)
        return MG_EINVAL;
    /* One block: the pointer array, then a copy of cmd cut into words in place. */
    char **argv = malloc((size_t)(n + 1) * sizeof(char *) + len + 1);
    if (argv == NULL)
        return MG_ENOMEM;
    char *copy = (char *)(argv + n + 1);
    memcpy(copy, cmd, len + 1);
    int i = 0;
    for (char *p = copy + strspn(copy, sep); *p; p += strspn(p, sep)) {
        argv[i++] = p;
        p += strcspn(p, sep);
        if (*p)
            *p++ = '\0';
    }
    argv[i] = NULL;
    *argv_out = argv;
    *argc_out = n;
    return 0;
}

int mg_agent_expand_home(const char *cmd, const char *home, char *out, size_t cap, char *err,
                         size_t errlen)
{
    static const char sep[] = " \t";
    size_t o = 0;
    for (const char *p = cmd; *p;) {
        size_t gap = strspn(p, sep), word = strcspn(p + gap, sep);
        const char *w = p + gap, *rest = w;
        size_t hl = 0;
        if (word > 0 && w[0] == '~') {
            if (word > 1 && w[1] != '/')
                return fail(err, errlen, "\"%.*s\": ~NAME (another user's home) is not expanded; "
                            "write the whole path", (int)word, w);
            if (home == NULL || home[0] != '/')
                return fail(err, errlen, "\"%.*s\": ~ needs $HOME, which is not an absolute "
                            "path here; write the whole path", (int)word, w);
            hl = strlen(home);
            rest = w + 1;
        }
        size_t tail = word - (size_t)(rest - w);
        if (o + gap + hl + tail >= cap)
            return MG_ENOMEM;
        memcpy(out + o, p, gap);
        if (hl > 0)
            memcpy(out + o + gap, home, hl);
        memcpy(out + o + gap + hl, rest, tail);
        o += gap + hl + tail;
        p = w + word;
    }
    if (o >= cap)
        return MG_ENOMEM;
    out[o] = '\0';
    return 0;
}

int mg_agent_token_check(const char *token)
{
    size_t n = strlen(token);
    if (n == 0 || n > MG_AGENT_TOKEN_MAX)
        return MG_EINVAL;
    for (size_t i = 0; i < n; i++)
        if ((unsigned char)token[i] <= 0x20 || (unsigned char)token[i] >= 0x7f)
            return MG_EINVAL;
    return 0;
}

void mg_agent_hex(const uint8_t *bytes, size_t n, char *out)
{
    static const char digits[] = "0123456789abcdef";
    for (size_t i = 0; i < n; i++) {
        out[2 * i] = digits[bytes[i] >> 4];
        out[2 * i + 1] = digits[bytes[i] & 15];
    }
    out[2 * n] = '\0';
}

/* ---- control messages ---- */

int mg_agent_control_parse(const char *s, size_t n)
{
    /* jansson reads the whole of it, strictly (one value, nothing after it, no duplicate
       member, nesting bounded). */
    json_error_t err;
    json_t *v = json_loadb(s, n, JSON_REJECT_DUPLICATES, &err);
    if (v == NULL)
        return MG_EINVAL;
    int rc = MG_EINVAL;
    if (json_is_object(v)) {
        json_t *type = json_object_get(v, "type");
        rc = json_is_string(type) && json_string_length(type) == 4 &&
                     memcmp(json_string_value(type), "open", 4) == 0
                 ? MG_AGENT_CONTROL_OPEN
                 : MG_AGENT_CONTROL_UNKNOWN;
    }
    json_decref(v);
    return rc;
}

/* ---- command lines ---- */

/*
 * Matches argv[*i] against a long option that takes a value, as "--name VALUE" or
 * "--name=VALUE". Returns 1 and *val on a match, 0 when it is another option, MG_EINVAL when
 * the value is missing.
 */
static int opt_value(int argc, char **argv, int *i, const char *name, const char **val)
{
    const char *a = argv[*i];
    size_t n = strlen(name);
    if (strncmp(a, name, n) != 0)
        return 0;
    if (a[n] == '=') {
        *val = a + n + 1;
        return 1;
    }
    if (a[n] != '\0')
        return 0;
    if (*i + 1 >= argc)
        return MG_EINVAL;
    *val = argv[++*i];
    return 1;
}

static int parse_int(const char *s, int lo, int hi, int *out)
{
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno != 0 || end == s || *end != '\0' || v < lo || v > hi)
        return MG_EINVAL;
    *out = (int)v;
    return 0;
}

int mg_agent_args_parse(int argc, char **argv, const char *env_token, mg_agent_args_t *out,
                        char *err, size_t errlen)
{
    static const char *const valued[] = {
        "--gateway", "--token", "--ssh", "--sshd-inetd", "--ca-file", "--max-connections",
        "--resolve-interval",
    };
    memset(out, 0, sizeof(*out));
    out->max_connections = MG_AGENT_MAX_CONNECTIONS_DEFAULT;
    out->resolve_interval_s = MG_AGENT_RESOLVE_INTERVAL_DEFAULT_S;
    const char *maxconn = NULL, *interval = NULL;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (strcmp(a, "--help") == 0 || strcmp(a, "-h") == 0) {
            out->help = true;
            return 0;
        }
        if (strcmp(a, "--version") == 0 || strcmp(a, "-V") == 0) {
            out->version = true;
            return 0;
        }
        if (strcmp(a, "--once") == 0) {
            out->once = true;
            continue;
        }
        if (strcmp(a, "--verbose") == 0) {
            out->verbose++;
            continue;
        }
        if (a[0] == '-' && a[1] == 'v' && a[strspn(a + 1, "v") + 1] == '\0') {
            out->verbose += (int)strlen(a + 1);
            continue;
        }
        const char *gateway = NULL;
        const char **slots[] = {
            &gateway, &out->token, &out->ssh, &out->sshd_inetd, &out->ca_file, &maxconn,
            &interval,
        };
        bool matched = false;
        for (size_t k = 0; k < sizeof(valued) / sizeof(valued[0]) && !matched; k++) {
            const char *val = NULL;
            int rc = opt_value(argc, argv, &i, valued[k], &val);
            if (rc < 0)
                return fail(err, errlen, "%s needs a value", valued[k]);
            if (rc == 1) {
                *slots[k] = val;
                matched = true;
            }
        }
        if (gateway != NULL) {
            if (out->n_gateways == MG_AGENT_GATEWAYS_MAX)
                return fail(err, errlen, "--gateway: at most %d", MG_AGENT_GATEWAYS_MAX);
            for (int g = 0; g < out->n_gateways; g++)
                if (strcmp(out->gateways[g], gateway) == 0)
                    return fail(err, errlen, "--gateway %s is given twice", gateway);
            out->gateways[out->n_gateways++] = gateway;
        }
        if (matched)
            continue;
        if (a[0] == '-')
            return fail(err, errlen, "unknown option %s (see --help)", a);
        return fail(err, errlen, "unexpected argument \"%s\" (see --help)", a);
    }

    if (out->n_gateways == 0)
        return fail(err, errlen, "--gateway ws[s]://HOST[:PORT]/tunnel is required");
    for (int g = 0; g < out->n_gateways; g++) {
        if (mg_agent_url_parse(out->gateways[g], &out->urls[g], err, errlen) != 0)
            return MG_EINVAL;
        out->tls = out->tls || out->urls[g].tls;
    }
    if (out->token != NULL) {
        out->token_from_argv = true;
    } else if (env_token != NULL && env_token[0] != '\0') {
        out->token = env_token;
    } else {
        return fail(err, errlen, "no token: set MOONGATE_TOKEN (or pass --token, which other "
                                 "users can see in ps)");
    }
    if (mg_agent_token_check(out->token) != 0)
        return fail(err, errlen, "the token must be 1 to %d visible ASCII characters, without "
                                 "spaces", MG_AGENT_TOKEN_MAX);
    if (out->ssh != NULL && out->sshd_inetd != NULL)
        return fail(err, errlen, "--ssh and --sshd-inetd exclude each other");
    if (out->sshd_inetd != NULL) {
        if (out->sshd_inetd[strspn(out->sshd_inetd, " \t")] == '\0')
            return fail(err, errlen, "--sshd-inetd needs a command, e.g. "
                                     "'/usr/sbin/sshd -i -f ~/.config/moongate-agent/sshd_config'");
    } else {
        const char *ssh = out->ssh != NULL ? out->ssh : "127.0.0.1:22";
        if (mg_agent_hostport_parse(ssh, out->ssh_host, sizeof(out->ssh_host),
                                    &out->ssh_port) != 0)
            return fail(err, errlen, "--ssh wants HOST:PORT, e.g. 127.0.0.1:22 (got \"%s\")", ssh);
    }
    if (out->ca_file != NULL && !out->tls)
        return fail(err, errlen, "--ca-file needs a wss:// gateway");
    if (out->ca_file != NULL && out->ca_file[0] == '\0')
        return fail(err, errlen, "--ca-file needs a file name");
    if (maxconn != NULL && parse_int(maxconn, 1, 1000, &out->max_connections) != 0)
        return fail(err, errlen, "--max-connections wants a number from 1 to 1000 (got \"%s\")",
                    maxconn);
    if (interval != NULL && parse_int(interval, 1, MG_AGENT_RESOLVE_INTERVAL_MAX_S,
                                      &out->resolve_interval_s) != 0)
        return fail(err, errlen, "--resolve-interval wants seconds from 1 to %d (got \"%s\")",
                    MG_AGENT_RESOLVE_INTERVAL_MAX_S, interval);
    return 0;
}

int mg_agent_setup_args_parse(int argc, char **argv, mg_agent_setup_args_t *out,
                              char *err, size_t errlen)
{
    memset(out, 0, sizeof(*out));
    out->llm_port = 11434;
    const char *port = NULL;
    for (int i = 0; i < argc; i++) {
        const char *a = argv[i];
        const char *val = NULL;
        int rc;
        if (strcmp(a, "--help") == 0 || strcmp(a, "-h") == 0) {
            out->help = true;
            return 0;
        }
        if ((rc = opt_value(argc, argv, &i, "--dir", &val)) != 0) {
            if (rc < 0)
                return fail(err, errlen, "--dir needs a value");
            out->dir = val;
        } else if ((rc = opt_value(argc, argv, &i, "--gateway-key", &val)) != 0) {
            if (rc < 0)
                return fail(err, errlen, "--gateway-key needs a value");
            out->gateway_key = val;
        } else if ((rc = opt_value(argc, argv, &i, "--llm-port", &val)) != 0) {
            if (rc < 0)
                return fail(err, errlen, "--llm-port needs a value");
            port = val;
        } else {
            return fail(err, errlen, "setup: unexpected argument \"%s\" (see setup --help)", a);
        }
    }
    if (out->gateway_key == NULL)
        return fail(err, errlen, "setup: --gateway-key 'ssh-ed25519 AAAA... comment' is "
                                 "required (the gateway's public key)");
    if (mg_agent_pubkey_check(out->gateway_key, err, errlen) != 0)
        return MG_EINVAL;
    if (port != NULL && parse_int(port, 1, 65535, &out->llm_port) != 0)
        return fail(err, errlen, "--llm-port wants a port from 1 to 65535 (got \"%s\")", port);
    if (out->dir != NULL) {
        if (out->dir[0] == '\0')
            return fail(err, errlen, "--dir needs a directory");
        /* The sshd command line is split on spaces and sshd_config takes unquoted paths. */
        if (out->dir[strcspn(out->dir, " \t\n\"'\\")] != '\0')
            return fail(err, errlen, "--dir must not contain spaces, quotes or backslashes");
    }
    return 0;
}

/* ---- setup helpers ---- */

static const char *const key_types[] = {
    "ssh-ed25519", "ssh-rsa", "ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521", "sk-ssh-ed25519@openssh.com", "sk-ecdsa-sha2-nistp256@openssh.com",
};

/*
 * Splits a key line into its type and base64 blob and decodes the blob into a fresh buffer.
 * Returns 0, MG_EINVAL or MG_ENOMEM.
 */
static int decode_key(const char *line, char *err, size_t errlen, unsigned char **blob,
                      size_t *blob_n)
{
    int rc = MG_EINVAL;
    unsigned char *buf = NULL;
    if (line[strcspn(line, "\r\n")] != '\0') {
        fail(err, errlen, "the gateway key must be one line");
        goto out;
    }
    size_t tn = strcspn(line, " \t");
    bool known = false;
    for (size_t i = 0; i < sizeof(key_types) / sizeof(key_types[0]); i++)
        if (strlen(key_types[i]) == tn && memcmp(line, key_types[i], tn) == 0)
            known = true;
    if (!known) {
        fail(err, errlen, "the gateway key must start with its type (e.g. ssh-ed25519), "
                          "without options: got \"%.*s\"", (int)(tn > 40 ? 40 : tn), line);
        goto out;
    }
    const char *b64 = line + tn + strspn(line + tn, " \t");
    size_t bn = strcspn(b64, " \t");
    if (bn == 0 || bn % 4 != 0 || bn > 16384) {
        fail(err, errlen, "the gateway key's base64 part is missing or malformed");
        goto out;
    }
    buf = malloc(bn / 4 * 3 + 1);
    if (buf == NULL) {
        rc = MG_ENOMEM;
        goto out;
    }
    int n = EVP_DecodeBlock(buf, (const unsigned char *)b64, (int)bn);
    if (n < 0) {
        fail(err, errlen, "the gateway key's base64 part does not decode");
        goto out;
    }
    /* EVP_DecodeBlock counts the padding as zero bytes. */
    if (b64[bn - 1] == '=')
        n--;
    if (b64[bn - 2] == '=')
        n--;
    uint32_t inner = n >= 4 ? ((uint32_t)buf[0] << 24 | (uint32_t)buf[1] << 16 |
                               (uint32_t)buf[2] << 8 | buf[3]) : UINT32_MAX;
    if (inner != tn || (size_t)n < 4 + tn || memcmp(buf + 4, line, tn) != 0) {
        fail(err, errlen, "the gateway key's blob does not match its type %.*s", (int)tn, line);
        goto out;
    }
    for (const char *c = b64 + bn; *c; c++)
        if ((unsigned char)*c < 0x20 || (unsigned char)*c == 0x7f) {
            fail(err, errlen, "the gateway key's comment has a control character");
            goto out;
        }
    *blob = buf;
    *blob_n = (size_t)n;
    buf = NULL; /* transferred */
    rc = 0;
out:
    free(buf);
    return rc;
}

int mg_agent_pubkey_check(const char *line, char *err, size_t errlen)
{
    unsigned char *blob = NULL;
    size_t n = 0;
    int rc = decode_key(line, err, errlen, &blob, &n);
    free(blob);
    return rc;
}

int mg_agent_pubkey_fingerprint(const char *line, char *out, size_t outlen)
{
    unsigned char *blob = NULL;
    size_t n = 0;
    int rc = decode_key(line, NULL, 0, &blob, &n);
    if (rc != 0)
        goto out;
    unsigned char md[32];
    unsigned int mdn = 0;
    if (EVP_Digest(blob, n, md, &mdn, EVP_sha256(), NULL) != 1 || mdn != sizeof(md)) {
        rc = MG_EINVAL;
        goto out;
    }
    rc = mg_fingerprint_sha256(md, out, outlen);
out:
    free(blob);
    return rc;
}

int mg_agent_authorized_line(const char *key, int llm_port, char *out, size_t outlen)
{
    int n = snprintf(out, outlen, "restrict,port-forwarding,permitopen=\"127.0.0.1:%d\" %s",
                     llm_port, key);
    return n < 0 || (size_t)n >= outlen ? MG_ENOMEM : 0;
}
