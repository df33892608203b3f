/*
 * Shared pieces of the soak and fault suite (tests/soak): two sizes for every test, the
 * figures of a process (RSS and open descriptors, from /proc), the gateway's /stats, a log
 * follower that reads only what is new, a load of client threads that records every request's
 * outcome with its start and end (so a test can ask, afterwards, what failed when), a policy
 * for many users, and restarting a killed sshd or mg-upstream on the same port.
 *
 * Sizes: short by default (every CI run), the full sizes with MG_SOAK=long. The
 * sanitizer build (MG_SANITIZE, a compile definition of tests/CMakeLists.txt) picks its own
 * counts: its programs are slower, and its RSS says nothing of leaks (ASan's quarantine keeps
 * freed memory), so there RSS is printed but only LeakSanitizer's report at exit decides.
 *
 * Everything runs on 127.0.0.1, every wait has a deadline, and every process is started through
 * tests/support/proc.c, which kills what is left when the test ends.
 */
#ifndef MG_SOAK_H
#define MG_SOAK_H

#include "gwtest.h"

#include <dirent.h>
#include <pthread.h>
#include <stdatomic.h>
#include <sys/stat.h>

#ifdef MG_SANITIZE
#define SOAK_SANITIZED true
#else
#define SOAK_SANITIZED false
#endif

/* ---- sizes ---- */

static inline bool soak_long(void)
{
    const char *m = getenv("MG_SOAK");
    return m != NULL && strcmp(m, "long") == 0;
}

/* The count for this run: short or long, in the plain or the sanitizer build. */
static inline int soak_pick(int short_plain, int short_asan, int long_plain, int long_asan)
{
    if (soak_long())
        return SOAK_SANITIZED ? long_asan : long_plain;
    return SOAK_SANITIZED ? short_asan : short_plain;
}

static inline const char *soak_mode(void)
{
    return soak_long() ? (SOAK_SANITIZED ? "long, sanitizers" : "long")
                       : (SOAK_SANITIZED ? "short, sanitizers" : "short");
}

/* ---- a process's figures ---- */

typedef struct soak_figures {
    long rss_kb;    /* VmRSS */
    int fds;        /* descriptors (see soak_measure()) */
} soak_figures_t;

static inline long soak_rss_kb(pid_t pid)
{
    char path[64], line[256];
    snprintf(path, sizeof(path), "/proc/%d/status", (int)pid);
    FILE *f = fopen(path, "re");
    long kb = -1;
    if (f == NULL)
        return -1;
    while (fgets(line, sizeof(line), f))
        if (strncmp(line, "VmRSS:", 6) == 0)
            kb = atol(line + 6);
    fclose(f);
    return kb;
}

/* Inodes of the TCP sockets whose local port is port (not listening), from /proc/net/tcp{,6}. */
static inline size_t soak_port_inodes(uint16_t port, unsigned long *out, size_t cap)
{
    static const char *const files[] = { "/proc/net/tcp", "/proc/net/tcp6" };
    size_t n = 0;
    for (size_t i = 0; i < 2; i++) {
        FILE *f = fopen(files[i], "re");
        char line[512];
        if (f == NULL)
            continue;
        while (fgets(line, sizeof(line), f) && n < cap) {
            unsigned lport, st;
            unsigned long inode;
            if (sscanf(line, " %*u: %*[0-9A-Fa-f]:%x %*[0-9A-Fa-f]:%*x %x %*s %*s %*s %*s %*s %lu",
                       &lport, &st, &inode) == 3 &&
                lport == port && st != 0x0A && inode != 0)
                out[n++] = inode;
        }
        fclose(f);
    }
    return n;
}

/*
 * The open descriptors of pid; *clients (may be NULL) gets how many of them are sockets
 * accepted on port (client connections, agent WebSockets among them).
 */
static inline int soak_fd_count_port(pid_t pid, uint16_t port, int *clients)
{
    static unsigned long inodes[65536];
    size_t ni = port ? soak_port_inodes(port, inodes, 65536) : 0;
    char path[64];
    snprintf(path, sizeof(path), "/proc/%d/fd", (int)pid);
    DIR *d = opendir(path);
    if (d == NULL)
        return -1;
    int n = 0, c = 0;
    struct dirent *de;
    while ((de = readdir(d)) != NULL) {
        if (de->d_name[0] == '.')
            continue;
        n++;
        char link[320], target[64];
        snprintf(link, sizeof(link), "%s/%s", path, de->d_name);
        ssize_t k = readlink(link, target, sizeof(target) - 1);
        unsigned long inode;
        if (ni == 0 || k <= 0)
            continue;
        target[k] = '\0';
        if (sscanf(target, "socket:[%lu]", &inode) != 1)
            continue;
        for (size_t i = 0; i < ni; i++)
            if (inodes[i] == inode) {
                c++;
                break;
            }
    }
    closedir(d);
    if (clients)
        *clients = c;
    return n;
}

static inline int soak_fd_count(pid_t pid)
{
    return soak_fd_count_port(pid, 0, NULL);
}

/* RSS and the descriptors of pid, those accepted on port (client connections) left out. */
static inline soak_figures_t soak_measure(pid_t pid, uint16_t port)
{
    int clients = 0;
    int fds = soak_fd_count_port(pid, port, &clients);
    return (soak_figures_t){ soak_rss_kb(pid), fds - clients };
}

/* ---- the gateway's /stats and /metrics ---- */

typedef struct soak_gw_stats {
    long in_flight;
    long total_connections;   /* pool: open or opening */
    long ready_connections;
    long users;               /* pool: users with a connection or a waiter */
    long busy_channels;
    long idle_channels;
    long waiters;
    long cleaned;             /* cleanup.total_cleaned */
    long exchanges;
    long clients;             /* moongate_client_connections, the /metrics request left out */
    long agents;              /* moongate_agent_connections */
    long ssh_opened;          /* moongate_ssh_connections_opened_total */
    long ssh_closed;          /* moongate_ssh_connections_closed_total */
} soak_gw_stats_t;

/* The number after "key": (the first occurrence), or -1. */
static inline long soak_json_long(const char *json, const char *key)
{
    char pat[96];
    snprintf(pat, sizeof(pat), "\"%s\":", key);
    const char *p = strstr(json, pat);
    return p ? atol(p + strlen(pat)) : -1;
}

/* The value of the sample "name " (with its labels, if any) in Prometheus text, or -1. */
static inline long soak_metric_long(const char *text, const char *sample)
{
    char pat[160];
    snprintf(pat, sizeof(pat), "\n%s ", sample);
    const char *p = strstr(text, pat);
    return p ? atol(p + strlen(pat)) : -1;
}

/* GET path into r (initialized here; the caller frees it). 0 for a 200 with a body. */
static inline int soak_get(const gw_t *g, const char *path, mg_test_http_response_t *r)
{
    char req[256];
    int n = snprintf(req, sizeof(req), "GET %s HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", path);
    mg_test_http_response_init(r);
    r->keep_body = true;
    int rc = gw_exchange(g->port, req, (size_t)n, r, 5000, NULL);
    if (rc == 0 && (r->status != 200 || r->body == NULL))
        rc = MG_EINVAL;
    return rc;
}

/*
 * GET /metrics, then GET /stats (in that order: the /metrics request then finds the previous
 * reading's /stats connection gone). Returns 0 or the error of either exchange.
 */
static inline int soak_stats(const gw_t *g, soak_gw_stats_t *st)
{
    mg_test_http_response_t r;
    int rc = soak_get(g, "/metrics", &r);
    if (rc == 0) {
        st->clients = soak_metric_long(r.body, "moongate_client_connections") - 1;
        st->agents = soak_metric_long(r.body, "moongate_agent_connections");
        st->ssh_opened = soak_metric_long(r.body, "moongate_ssh_connections_opened_total");
        st->ssh_closed = soak_metric_long(r.body, "moongate_ssh_connections_closed_total");
    }
    mg_test_http_response_free(&r);
    if (rc != 0)
        return rc;
    rc = soak_get(g, "/stats", &r);
    if (rc == 0) {
        /* The pool's own fields come before its list of connections, which repeats some. */
        st->in_flight = soak_json_long(r.body, "in_flight");
        st->total_connections = soak_json_long(r.body, "total_connections");
        st->ready_connections = soak_json_long(r.body, "ready_connections");
        st->users = soak_json_long(r.body, "users");
        st->busy_channels = soak_json_long(r.body, "busy_channels");
        st->idle_channels = soak_json_long(r.body, "idle_channels");
        st->waiters = soak_json_long(r.body, "waiters");
        st->cleaned = soak_json_long(r.body, "total_cleaned");
        st->exchanges = soak_json_long(r.body, "exchanges");
    }
    mg_test_http_response_free(&r);
    return rc;
}

/* ---- waiting for a condition ---- */

typedef bool (*soak_cond_fn)(void *arg);

/* Polls cond every poll_ms until it holds or timeout_ms pass. Returns whether it held. */
static inline bool soak_wait(soak_cond_fn cond, void *arg, int timeout_ms, int poll_ms)
{
    double end = mg_test_now_ms() + timeout_ms;
    for (;;) {
        if (cond(arg))
            return true;
        if (mg_test_now_ms() > end)
            return false;
        mg_test_sleep_ms(poll_ms);
    }
}

/*
 * The gateway at rest: nothing in flight, no busy channel, nobody waiting, no client connection
 * but agents' WebSockets (and the probe's own), `connections` pool connections (-1: any
 * number) and, with fds >= 0, at most fds descriptors besides the pool's connections and
 * client sockets.
 */
typedef struct soak_quiet {
    const gw_t *g;
    int fds;
    long connections;
    int conn_fds;            /* descriptors of one pool connection: 1 over TCP, 0 over agents */
    soak_gw_stats_t st;      /* the last reading */
    soak_figures_t fig;
} soak_quiet_t;

static inline bool soak_quiet_cond(void *arg)
{
    soak_quiet_t *q = arg;
    if (soak_stats(q->g, &q->st) != 0)
        return false;
    q->fig = soak_measure(q->g->proc.pid, q->g->port);
    q->fig.fds -= q->conn_fds * (int)q->st.total_connections;
    if (q->st.in_flight != 0 || q->st.busy_channels != 0 || q->st.waiters != 0 ||
        q->st.clients != q->st.agents)
        return false;
    if (q->connections >= 0 && q->st.total_connections != q->connections)
        return false;
    return q->fds < 0 || q->fig.fds <= q->fds;
}

/*
 * Waits (up to timeout_ms) for the gateway to be at rest as above and returns its figures: RSS,
 * and the descriptors besides the pool's connections and client sockets. conn_fds: 1 when the
 * pool's connections are TCP connections of their own, 0 when they ride agents' WebSockets
 * (client sockets already). Fails the test, with the last reading, if it does not come to rest.
 */
static inline soak_figures_t soak_wait_quiet_ex(const gw_t *g, int fds, long connections,
                                                int conn_fds, int timeout_ms,
                                                soak_gw_stats_t *st_out)
{
    soak_quiet_t q = { .g = g, .fds = fds, .connections = connections, .conn_fds = conn_fds };
    if (!soak_wait(soak_quiet_cond, &q, timeout_ms, 50)) {
        gw_print_log_tail(g, 40);
        fail_msg("the gateway did not come to rest within %d ms: in flight %ld, busy channels "
                 "%ld, waiters %ld, client connections %ld (agents %ld), pool connections %ld "
                 "(want %ld), %d other descriptors (want at most %d)",
                 timeout_ms, q.st.in_flight, q.st.busy_channels, q.st.waiters, q.st.clients,
                 q.st.agents, q.st.total_connections, connections, q.fig.fds, fds);
    }
    if (st_out)
        *st_out = q.st;
    return q.fig;
}

/* soak_wait_quiet_ex() for a pool of TCP connections. */
static inline soak_figures_t soak_wait_quiet(const gw_t *g, int fds, long connections,
                                             int timeout_ms, soak_gw_stats_t *st_out)
{
    return soak_wait_quiet_ex(g, fds, connections, 1, timeout_ms, st_out);
}

static inline void soak_print_figures(const char *what, soak_figures_t before,
                                      soak_figures_t after)
{
    print_message("%s: RSS %ld -> %ld KiB (%+ld), descriptors %d -> %d (%+d)\n", what,
                  before.rss_kb, after.rss_kb, after.rss_kb - before.rss_kb, before.fds,
                  after.fds, after.fds - before.fds);
}

/*
 * Fails unless the descriptors came back to the baseline exactly and (outside the sanitizer
 * build, whose RSS holds ASan's quarantine) RSS grew by at most rss_bound_kb.
 */
static inline void soak_assert_flat(const gw_t *g, const char *what, soak_figures_t before,
                                    soak_figures_t after, long rss_bound_kb)
{
    soak_print_figures(what, before, after);
    if (after.fds > before.fds) {
        gw_print_log_tail(g, 30);
        fail_msg("%s: the gateway holds %d more descriptors than at the baseline", what,
                 after.fds - before.fds);
    }
    if (SOAK_SANITIZED) {
        print_message("%s: RSS not checked in the sanitizer build (its quarantine holds freed "
                      "memory); LeakSanitizer checks at exit\n", what);
        return;
    }
    if (after.rss_kb - before.rss_kb > rss_bound_kb)
        fail_msg("%s: RSS grew by %ld KiB, more than the bound of %ld KiB", what,
                 after.rss_kb - before.rss_kb, rss_bound_kb);
}

/* ---- the log, read as it grows ---- */

typedef struct soak_follow {
    const char *path;
    long off;       /* bytes already looked at (whole lines only) */
} soak_follow_t;

/* Starts following path from its current end. */
static inline void soak_follow_init(soak_follow_t *f, const char *path)
{
    struct stat sb;
    f->path = path;
    f->off = stat(path, &sb) == 0 ? (long)sb.st_size : 0;
}

/*
 * Reads the whole lines added since the last call and counts those holding needle; stops after
 * the line holding the max-th (max <= 0: no limit), so that the next call starts after it.
 */
static inline int soak_follow_count(soak_follow_t *f, const char *needle, int max)
{
    FILE *fp = fopen(f->path, "re");
    if (fp == NULL)
        return 0;
    int n = 0;
    if (fseek(fp, f->off, SEEK_SET) == 0) {
        static char line[16384];
        while (fgets(line, sizeof(line), fp)) {
            size_t len = strlen(line);
            if (len == 0 || line[len - 1] != '\n')
                break; /* a line still being written: next time */
            f->off += (long)len;
            if (strstr(line, needle) && ++n == max)
                break;
        }
    }
    fclose(fp);
    return n;
}

/* Waits up to timeout_ms for count more lines holding needle. */
static inline bool soak_follow_wait(soak_follow_t *f, const char *needle, int count,
                                    int timeout_ms)
{
    double end = mg_test_now_ms() + timeout_ms;
    int seen = 0;
    for (;;) {
        seen += soak_follow_count(f, needle, count - seen);
        if (seen >= count)
            return true;
        if (mg_test_now_ms() > end)
            return false;
        mg_test_sleep_ms(5);
    }
}

/* ---- a policy for many users ---- */

typedef struct soak_policy {
    int max_connections;     /* 0: the gateway's default */
    int max_channels;
    int idle_timeout_ms;
    int queue_timeout_ms;
    const char *extra;       /* Lua appended inside the returned table, or NULL */
    int generation;          /* written into a comment, so reloads differ */
} soak_policy_t;

/*
 * Writes (through a rename, so a reload never reads half a file) a policy admitting every
 * bearer token "tok-NAME" as user NAME, routed to the test's sshd and upstream_port, with the
 * limits of o. broken: a policy that fails to load, for the reload storm.
 */
static inline void soak_write_policy(const char *path, const mg_test_sshd_t *sshd,
                                     uint16_t upstream_port, const soak_policy_t *o, bool broken)
{
    char route[2048], limits[512] = "", text[8192];
    gw_route_fields(route, sizeof(route), sshd, upstream_port);
    if (o->max_connections || o->max_channels || o->idle_timeout_ms || o->queue_timeout_ms) {
        int n = snprintf(limits, sizeof(limits),
                         "  limits = function(user)\n"
                         "    local l = {}\n"
                         "    for k, v in pairs(mg.defaults.limits) do l[k] = v end\n");
        if (o->max_connections)
            n += snprintf(limits + n, sizeof(limits) - (size_t)n, "    l.max_connections = %d\n",
                          o->max_connections);
        if (o->max_channels)
            n += snprintf(limits + n, sizeof(limits) - (size_t)n, "    l.max_channels = %d\n",
                          o->max_channels);
        if (o->idle_timeout_ms)
            n += snprintf(limits + n, sizeof(limits) - (size_t)n, "    l.idle_timeout_ms = %d\n",
                          o->idle_timeout_ms);
        if (o->queue_timeout_ms)
            n += snprintf(limits + n, sizeof(limits) - (size_t)n,
                          "    l.queue_timeout_ms = %d\n", o->queue_timeout_ms);
        snprintf(limits + n, sizeof(limits) - (size_t)n, "    return l\n  end,\n");
    }
    int n = snprintf(text, sizeof(text),
                     "-- soak policy, generation %d\n"
                     "local mg = require \"moongate\"\n"
                     "return {\n"
                     "  authenticate = function(req)\n"
                     "    local t = req.headers[\"authorization\"]\n"
                     "    local name = t and t:match(\"^Bearer tok%%-([%%w_]+)$\")\n"
                     "    if name then return name end\n"
                     "    return nil, 401, \"bad or missing token\"\n"
                     "  end,\n"
                     "%s"
                     "  route = function(req, user)\n"
                     "    return { %s }\n"
                     "  end,\n"
                     "%s%s"
                     "}\n",
                     o->generation, limits, route, o->extra ? o->extra : "",
                     broken ? "  admit = function(req, user) return true end,,\n" : "");
    assert_true(n > 0 && n < (int)sizeof(text));
    char tmp[MG_TEST_PATH_MAX + 8];
    snprintf(tmp, sizeof(tmp), "%s.tmp", path);
    assert_int_equal(mg_test_write_file(tmp, text, (size_t)n, 0600), 0);
    assert_int_equal(rename(tmp, path), 0);
}

/* Starts g with the policy above. */
static inline void soak_gw_start(gw_t *g, const mg_test_sshd_t *sshd, uint16_t upstream_port,
                                 const soak_policy_t *o, const char *const *env)
{
    gw_prepare(g);
    soak_write_policy(g->policy, sshd, upstream_port, o, false);
    gw_launch(g, "127.0.0.1:0", env);
}

/* ---- outcomes ---- */

/* What became of a request: an HTTP status (complete, body as expected), or one of these. */
enum {
    SOAK_CUT = -1,        /* a response that began but ended before it was complete */
    SOAK_TIMEOUT = -2,    /* the client's own deadline passed */
    SOAK_CONNECT = -3,    /* no connection to the gateway */
    SOAK_CLOSED = -4,     /* closed before any response */
    SOAK_MALFORMED = -5,  /* a response the client could not parse */
    SOAK_BAD_BODY = -6,   /* complete, but not the body asked for */
};

static inline const char *soak_outcome_name(int o, char *buf, size_t cap)
{
    switch (o) {
    case SOAK_CUT: return "cut";
    case SOAK_TIMEOUT: return "client-timeout";
    case SOAK_CONNECT: return "no-connection";
    case SOAK_CLOSED: return "closed-without-response";
    case SOAK_MALFORMED: return "malformed";
    case SOAK_BAD_BODY: return "wrong-body";
    default: snprintf(buf, cap, "%d", o); return buf;
    }
}

/* Counts by outcome. */
typedef struct soak_tally {
    uint64_t n;
    uint64_t by[610];   /* index: outcome + 10 */
} soak_tally_t;

static inline void soak_tally_add(soak_tally_t *t, int outcome)
{
    int i = outcome + 10;
    if (i < 0 || i >= 610)
        i = 0;
    t->by[i]++;
    t->n++;
}

static inline uint64_t soak_tally_get(const soak_tally_t *t, int outcome)
{
    return t->by[outcome + 10];
}

static inline uint64_t soak_tally_failed(const soak_tally_t *t)
{
    return t->n - soak_tally_get(t, 200);
}

/* "1234 requests: 1230 ok; failed: 3x 502, 1x cut" */
static inline void soak_tally_print(const char *what, const soak_tally_t *t)
{
    char line[1024];
    int n = snprintf(line, sizeof(line), "%s: %llu requests, %llu ok", what,
                     (unsigned long long)t->n, (unsigned long long)soak_tally_get(t, 200));
    bool first = true;
    for (int i = 0; i < 610; i++) {
        if (i == 210 || t->by[i] == 0 || n >= (int)sizeof(line) - 64)
            continue;
        char b[16];
        n += snprintf(line + n, sizeof(line) - (size_t)n, "%s%llux %s", first ? "; failed: " : ", ",
                      (unsigned long long)t->by[i], soak_outcome_name(i - 10, b, sizeof(b)));
        first = false;
    }
    print_message("%s%s\n", line, first ? "; none failed" : "");
}

/* ---- a load of client threads ---- */

/* One kind of request and what its answer must be. */
typedef struct soak_req {
    const char *path;
    const char *headers;      /* complete lines, e.g. the Authorization line */
    const char *body_equals;  /* the body must be this, or NULL */
    int lines;                /* > 0: the body must hold this many lines */
    int64_t body_len;         /* >= 0: the body must be this long (0 means unchecked) */
} soak_req_t;

/* A request as it went: when it started and ended (mg_test_now_ms) and its outcome. */
typedef struct soak_event {
    double start, end;
    int outcome;
} soak_event_t;

#define SOAK_MAX_THREADS 64
#define SOAK_EVENTS_MAX 200000

typedef struct soak_load soak_load_t;

typedef struct soak_thread {
    soak_load_t *load;
    int index;
    pthread_t th;
    bool started;
    soak_event_t *ev;
    size_t nev;
    uint64_t dropped;         /* events past SOAK_EVENTS_MAX (counted, not kept) */
    soak_tally_t tally;
} soak_thread_t;

struct soak_load {
    uint16_t port;
    const soak_req_t *reqs;   /* thread i sends reqs[i % nreqs] (one kind per thread) */
    int nreqs;
    int nthreads;
    int timeout_ms;           /* each request's deadline (default 30000) */
    int pause_ms;             /* between two requests of a thread (default 0) */
    atomic_bool stop;
    atomic_uint_fast64_t done, ok;
    soak_thread_t t[SOAK_MAX_THREADS];
};

/* The outcome of one exchange with the gateway. */
static inline int soak_classify(int rc, const mg_test_http_response_t *r, const soak_req_t *q)
{
    if (rc == MG_ECONNECT)
        return SOAK_CONNECT;
    if (rc == MG_EINVAL)
        return SOAK_MALFORMED;
    if (rc == MG_ETIMEDOUT)
        return SOAK_TIMEOUT;
    if (!r->complete)
        return r->headers_done ? SOAK_CUT : SOAK_CLOSED;
    if (r->status != 200)
        return r->status;
    if (q->body_equals && (r->body == NULL || strcmp(r->body, q->body_equals) != 0))
        return SOAK_BAD_BODY;
    if (q->lines > 0) {
        int lines = 0;
        for (size_t i = 0; i < r->body_len; i++)
            lines += r->body[i] == '\n';
        if (lines != q->lines)
            return SOAK_BAD_BODY;
    }
    if (q->body_len > 0 && (int64_t)r->body_received != q->body_len)
        return SOAK_BAD_BODY;
    return 200;
}

/* One request of kind q to port; returns its outcome. */
static inline int soak_request(uint16_t port, const soak_req_t *q, int timeout_ms)
{
    char *req = NULL;
    size_t len = 0;
    if (mg_test_http_request(&req, &len, "GET", q->path, q->headers, NULL, 0) != 0)
        return SOAK_MALFORMED;
    mg_test_http_response_t r;
    mg_test_http_response_init(&r);
    r.keep_body = q->body_equals != NULL || q->lines > 0;
    int rc = gw_exchange(port, req, len, &r, timeout_ms, NULL);
    free(req);
    int o = soak_classify(rc, &r, q);
    mg_test_http_response_free(&r);
    return o;
}

static inline void *soak_thread_run(void *arg)
{
    soak_thread_t *t = arg;
    soak_load_t *l = t->load;
    const soak_req_t *q = &l->reqs[t->index % l->nreqs];
    int timeout = l->timeout_ms > 0 ? l->timeout_ms : 30000;
    while (!atomic_load(&l->stop)) {
        double start = mg_test_now_ms();
        int o = soak_request(l->port, q, timeout);
        double end = mg_test_now_ms();
        if (t->nev < SOAK_EVENTS_MAX)
            t->ev[t->nev++] = (soak_event_t){ start, end, o };
        else
            t->dropped++;
        soak_tally_add(&t->tally, o);
        atomic_fetch_add(&l->done, 1);
        if (o == 200)
            atomic_fetch_add(&l->ok, 1);
        if (l->pause_ms > 0)
            mg_test_sleep_ms(l->pause_ms);
    }
    return NULL;
}

/* Starts the threads (fields port, reqs, nreqs, nthreads and the options set by the caller). */
static inline void soak_load_start(soak_load_t *l)
{
    assert_true(l->nthreads > 0 && l->nthreads <= SOAK_MAX_THREADS && l->nreqs > 0);
    atomic_store(&l->stop, false);
    atomic_store(&l->done, 0);
    atomic_store(&l->ok, 0);
    for (int i = 0; i < l->nthreads; i++) {
        soak_thread_t *t = &l->t[i];
        *t = (soak_thread_t){ .load = l, .index = i };
        t->ev = malloc(sizeof(soak_event_t) * SOAK_EVENTS_MAX);
        assert_non_null(t->ev);
        assert_int_equal(pthread_create(&t->th, NULL, soak_thread_run, t), 0);
        t->started = true;
    }
}

/* Stops the threads (each finishes its request in flight) and joins them. */
static inline void soak_load_stop(soak_load_t *l)
{
    atomic_store(&l->stop, true);
    for (int i = 0; i < l->nthreads; i++)
        if (l->t[i].started) {
            pthread_join(l->t[i].th, NULL);
            l->t[i].started = false;
        }
}

static inline void soak_load_free(soak_load_t *l)
{
    soak_load_stop(l);
    for (int i = 0; i < l->nthreads; i++) {
        free(l->t[i].ev);
        l->t[i].ev = NULL;
    }
}

/* Every thread's tally together. */
static inline soak_tally_t soak_load_tally(const soak_load_t *l)
{
    soak_tally_t all = { 0 };
    for (int i = 0; i < l->nthreads; i++) {
        for (int k = 0; k < 610; k++)
            all.by[k] += l->t[i].tally.by[k];
        all.n += l->t[i].tally.n;
    }
    return all;
}

/* The tally of the requests (after soak_load_stop()) that started in [from, to). */
static inline soak_tally_t soak_load_tally_between(const soak_load_t *l, double from, double to)
{
    soak_tally_t t = { 0 };
    for (int i = 0; i < l->nthreads; i++)
        for (size_t k = 0; k < l->t[i].nev; k++)
            if (l->t[i].ev[k].start >= from && l->t[i].ev[k].start < to)
                soak_tally_add(&t, l->t[i].ev[k].outcome);
    return t;
}

/* Waits up to timeout_ms until n more requests have succeeded. */
static inline bool soak_load_wait_ok(soak_load_t *l, uint64_t n, int timeout_ms)
{
    uint64_t want = atomic_load(&l->ok) + n;
    double end = mg_test_now_ms() + timeout_ms;
    while (atomic_load(&l->ok) < want) {
        if (mg_test_now_ms() > end)
            return false;
        mg_test_sleep_ms(5);
    }
    return true;
}

/* Prints every failed request (up to max), with its times relative to t0. */
static inline void soak_load_print_failures(const soak_load_t *l, double t0, int max)
{
    int shown = 0;
    for (int i = 0; i < l->nthreads; i++)
        for (size_t k = 0; k < l->t[i].nev && shown < max; k++) {
            const soak_event_t *e = &l->t[i].ev[k];
            if (e->outcome == 200)
                continue;
            char b[16];
            print_message("  thread %d: %s, from %+.0f to %+.0f ms\n", i,
                          soak_outcome_name(e->outcome, b, sizeof(b)), e->start - t0,
                          e->end - t0);
            shown++;
        }
}

/* ---- one raw client, read at the test's own pace ---- */

typedef struct soak_client {
    int fd;
    mg_test_http_response_t r;
    bool eof;
    double eof_at;
} soak_client_t;

/*
 * Sends GET path with headers (complete lines) on a new connection whose receive buffer is
 * small (64 KiB), so that a client that reads slowly holds the stream back soon.
 */
static inline void soak_client_open(soak_client_t *c, uint16_t port, const char *headers,
                                    const char *path)
{
    memset(c, 0, sizeof(*c));
    char *req = NULL;
    size_t len = 0;
    assert_int_equal(mg_test_http_request(&req, &len, "GET", path, headers, NULL, 0), 0);
    c->fd = gw_connect(port, 2000);
    assert_true(c->fd >= 0);
    int rcv = 64 * 1024;
    setsockopt(c->fd, SOL_SOCKET, SO_RCVBUF, &rcv, sizeof(rcv));
    assert_int_equal(send(c->fd, req, len, MSG_NOSIGNAL), (ssize_t)len);
    free(req);
    mg_test_http_response_init(&c->r);
}

/* Reads what is there (max bytes at most, 0: all), without waiting; returns the bytes read. */
static inline size_t soak_client_read(soak_client_t *c, size_t max)
{
    static char buf[65536];
    size_t got = 0;
    while (!c->eof && (max == 0 || got < max)) {
        size_t want = max == 0 || max - got > sizeof(buf) ? sizeof(buf) : max - got;
        ssize_t n = recv(c->fd, buf, want, MSG_DONTWAIT);
        if (n > 0) {
            got += (size_t)n;
            assert_int_equal(mg_test_http_response_feed(&c->r, buf, (size_t)n, NULL), 0);
        } else if (n == 0 || (errno != EAGAIN && errno != EINTR)) {
            c->eof = true;
            c->eof_at = mg_test_now_ms();
            mg_test_http_response_eof(&c->r);
        } else {
            break;
        }
    }
    return got;
}

/* Closes the client's connection: with a FIN, or (reset) with a RST. */
static inline void soak_client_close(soak_client_t *c, bool reset)
{
    if (reset) {
        struct linger lg = { .l_onoff = 1, .l_linger = 0 };
        setsockopt(c->fd, SOL_SOCKET, SO_LINGER, &lg, sizeof(lg));
    }
    close(c->fd);
    c->fd = -1;
    mg_test_http_response_free(&c->r);
}

/* ---- sshd and mg-upstream again on the same port ---- */

/*
 * Starts sshd again with the config of s (same port, same keys) after mg_test_sshd_kill(s),
 * as p (stop it with soak_proc_tree_stop()). Returns 0 or MG_ETIMEDOUT.
 */
static inline int soak_sshd_respawn(const mg_test_sshd_t *s, mg_test_proc_t *p)
{
    char log[MG_TEST_PATH_MAX + 16];
    snprintf(log, sizeof(log), "%s.again", s->log);
    char *argv[] = { "/usr/sbin/sshd", "-D", "-e", "-f", (char *)s->config, NULL };
    mg_test_spawn_opts_t so = { .stderr_path = log, .stdout_path = log };
    /* The port was just freed by the kill: sshd binds with SO_REUSEADDR, but retry a moment. */
    for (int attempt = 0; attempt < 20; attempt++) {
        if (mg_test_proc_spawn(p, argv, &so) != 0)
            return MG_ECLOSED;
        if (mg_test_wait_port(s->port, 5000, p) == 0)
            return 0;
        mg_test_proc_stop(p, 1000);
        mg_test_sleep_ms(100);
    }
    return MG_ETIMEDOUT;
}

/* Ends p and every descendant (sshd's connection children). */
static inline void soak_proc_tree_stop(mg_test_proc_t *p)
{
    if (p->pid <= 0)
        return;
    pid_t tree[1024];
    size_t n = 0;
    mg_test_proc_descendants(p->pid, tree, 1024, &n);
    for (size_t i = 0; i < n; i++)
        kill(tree[i], SIGKILL);
    mg_test_proc_stop(p, 2000);
}

/* An mg-upstream run by the test itself, so that it can be killed and brought back. */
typedef struct soak_upstream {
    mg_test_proc_t proc;
    uint16_t port;
    char dir[MG_TEST_PATH_MAX];
    char log[MG_TEST_PATH_MAX];
} soak_upstream_t;

/* Starts mg-upstream on port (0 the first time: it picks one). Returns 0 or an error. */
static inline int soak_upstream_start(soak_upstream_t *u, uint16_t port)
{
    char bin[MG_TEST_PATH_MAX * 2], pf[MG_TEST_PATH_MAX], listen[32];
    int err;
    if ((err = mg_test_upstream_binary(bin, sizeof(bin))) != 0)
        return err;
    if (u->dir[0] == '\0' && (err = mg_test_mkdtemp(u->dir, sizeof(u->dir), "mg-soak-up")) != 0)
        return err;
    mg_test_path_join(pf, sizeof(pf), u->dir, "port");
    mg_test_path_join(u->log, sizeof(u->log), u->dir, "upstream.log");
    unlink(pf);
    snprintf(listen, sizeof(listen), "127.0.0.1:%u", (unsigned)port);
    char *argv[] = { bin, "-l", listen, "--port-file", pf, NULL };
    mg_test_spawn_opts_t so = { .stdout_path = u->log, .stderr_path = u->log };
    for (int attempt = 0; attempt < 20; attempt++) {
        if ((err = mg_test_proc_spawn(&u->proc, argv, &so)) != 0)
            return err;
        double end = mg_test_now_ms() + 5000;
        char *text = NULL;
        while (mg_test_read_file(pf, &text, NULL) != 0) {
            if (mg_test_proc_wait(&u->proc, 0) == 0 || mg_test_now_ms() > end)
                break;
            mg_test_sleep_ms(2);
        }
        if (text != NULL) {
            u->port = (uint16_t)atoi(text);
            free(text);
            return 0;
        }
        mg_test_proc_stop(&u->proc, 1000);
        if (port == 0)
            return MG_ECLOSED;
        mg_test_sleep_ms(100); /* the port of the killed one: try again in a moment */
    }
    return MG_ETIMEDOUT;
}

/* SIGKILL, as an upstream that dies. */
static inline void soak_upstream_kill(soak_upstream_t *u)
{
    mg_test_proc_kill(&u->proc, SIGKILL);
    mg_test_proc_wait(&u->proc, 5000);
}

static inline void soak_upstream_stop(soak_upstream_t *u)
{
    if (u->proc.pid > 0)
        mg_test_proc_stop(&u->proc, 5000);
    if (u->dir[0] != '\0') {
        mg_test_rm_rf(u->dir);
        mg_test_forget_dir(u->dir);
        u->dir[0] = '\0';
    }
}

/* ---- the gateway at rest ---- */

/*
 * Settings for a gateway whose figures at rest are compared: the cleanup sweeps often (each
 * sweep also hands freed heap pages back, malloc_trim) and kept-alive upstream channels go
 * soon, so that idle connections can close. An SSH connection that carried a stream held back
 * at its buffers' high-water marks keeps some of that memory until it closes, so such tests
 * compare the gateway with no connection open, before and after (the policy's idle timeout
 * SOAK_IDLE_MS closes them).
 */
static const char *const soak_sweep_often[] = { "CLEANUP_INTERVAL=200", "UPSTREAM_KEEPALIVE=300",
                                                NULL };
#define SOAK_SWEEP_WAIT_MS 500 /* two sweeps and more */
#define SOAK_IDLE_MS 1500

/* ---- the parts a soak test runs against ---- */

/* An sshd and an mg-upstream shared by a program's tests, a gateway and a load for each test,
   and what a fault test kills and brings back: its own sshd and mg-upstream. */
typedef struct soak_world {
    mg_test_sshd_t sshd;
    mg_test_upstream_t up;
    gw_t gw;
    soak_load_t load;
    mg_test_sshd_t own_sshd;    /* for a test that kills it */
    mg_test_proc_t sshd_again;  /* that sshd restarted on its port */
    soak_upstream_t own_up;     /* for a test that kills the upstream */
} soak_world_t;

static inline int soak_group_setup(void **state)
{
    soak_world_t *w = calloc(1, sizeof(*w));
    if (w == NULL || mg_test_sshd_start(&w->sshd, NULL) != 0 ||
        mg_test_upstream_start(&w->up) != 0)
        return -1;
    *state = w;
    return 0;
}

/* After each test, pass or fail: nothing it started outlives it. */
static inline int soak_test_teardown(void **state)
{
    soak_world_t *w = *state;
    soak_load_free(&w->load);
    w->load = (soak_load_t){ 0 };
    gw_kill(&w->gw);
    soak_proc_tree_stop(&w->sshd_again);
    if (w->own_sshd.dir[0])
        mg_test_sshd_stop(&w->own_sshd);
    w->own_sshd.dir[0] = '\0';
    soak_upstream_stop(&w->own_up);
    return 0;
}

static inline int soak_group_teardown(void **state)
{
    soak_world_t *w = *state;
    soak_test_teardown(state);
    mg_test_upstream_stop(&w->up);
    mg_test_sshd_stop(&w->sshd);
    free(w);
    mg_test_cleanup_all();
    return 0;
}

#endif
