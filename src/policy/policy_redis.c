/*
 * The shared dictionary's Redis back end (MOONGATE_REDIS_URL): one connection on the loop that
 * carries the dictionary's operations. What is said on it (the URL, the scripts, the commands,
 * what the answers mean) is in policy_redis_proto.c.
 *
 * The connection is ours: a libuv TCP handle, OpenSSL over memory BIOs for rediss://, and
 * hiredis's reader for the answers (Debian 12's hiredis 0.14 has no TLS, and its libuv adapter
 * ignores the poll error by which libuv reports a refused connect). The host is resolved with
 * uv_getaddrinfo and its addresses tried in turn; AUTH, SELECT, SCRIPT LOAD of the scripts and a
 * PING go first, and the connection is up when the PING answers. One that fails or drops is
 * retried with a backoff from 100 ms to 2 s for as long as the gateway runs; while it is down,
 * every operation fails at once (no wait), so an unreachable Redis costs a request nothing but
 * the policy's fallback.
 *
 * Operations. Redis answers in order, so the operations out wait in a FIFO, at most
 * MAX_IN_FLIGHT of them. Commands queued in one loop iteration go in one write (in the prepare
 * phase, before the loop polls), at most OUT_MAX bytes queued. The waiting side (policy.c)
 * bounds each wait and may cancel it; a cancelled operation's answer is read and dropped.
 *
 * Answers are hostile input like any other: hiredis's reader checks the protocol, and one
 * answer may not grow past VALUE_MAX; either failing ends the connection.
 *
 * Logging is per change of state (connected, down, slow, back), never per operation.
 */
#include "policy_int.h"

#include "core/buf.h"

#include "moongate/error.h"
#include "moongate/log.h"

#include <arpa/inet.h>
#include <hiredis/hiredis.h>
#include <lauxlib.h>
#include <openssl/err.h>
#include <openssl/sha.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define LOG "redis"
#define MAX_IN_FLIGHT 4096
#define OUT_MAX (16 * 1024 * 1024) /* commands not yet written, bytes */
#define OUT_KEEP (64 * 1024)       /* an output buffer larger than this is let go when empty */
#define CONNECT_TIMEOUT_MS 1000
#define BACKOFF_MIN_MS 100
#define BACKOFF_MAX_MS 2000
#define VALUE_MAX (1024 * 1024)
#define ADDRS_MAX 8

typedef enum conn_state {
    R_DOWN = 0,  /* waiting to retry */
    R_RESOLVING,
    R_CONNECTING, /* until the PING after AUTH and SELECT answers */
    R_UP,
} conn_state_t;

typedef struct rconn rconn_t;

struct mg_redis {
    uv_loop_t *loop;
    mg__redis_addr_t a;
    SSL_CTX *tls;         /* NULL: plain redis:// */
    bool has_client_cert;
    bool quiet;           /* a probe (moongate -t): the caller reports, not the log */
    char why_down[400];   /* the last reason the connection failed */
    const uint64_t *probe_deadline;

    conn_state_t state;
    rconn_t *c;           /* the connection being made or in use */
    uv_getaddrinfo_t gai;
    bool resolving;
    struct sockaddr_storage addrs[ADDRS_MAX]; /* what the name resolved to, tried in order */
    int n_addrs, addr_i;
    uv_timer_t timer;     /* the retry's backoff, and the connect's time limit */
    uv_prepare_t flusher; /* writes what was queued, before the loop polls */
    int handles;          /* of timer and flusher, not yet closed */
    uint32_t backoff_ms;
    bool down_reported;   /* "unavailable" logged for this outage */
    bool slow;            /* "slow" logged; cleared by the next answer in time */
    bool freeing;

    mg__buf_t out;        /* commands queued, not yet written */
    int setup_left;       /* answers to AUTH/SELECT/SCRIPT LOAD/PING still to come */
    char sha[MG_REDIS_SCRIPTS][41]; /* of mg__redis_scripts, in hex */
    mg__redis_op_t *head, *tail; /* operations waiting for their answer, in order */

    int in_flight;
    mg_redis_stats_t stats;
};

struct mg__redis_op {
    mg__redis_op_t *next;
    mg__rdict_op_t op;
    lua_State *co;           /* where the results go */
    mg__redis_done_fn done;  /* NULL once cancelled */
    void *ctx;
};

static void finish_op(mg_redis_t *r, mg__redis_op_t *o, redisReply *rep);
static void maybe_free(mg_redis_t *r);

/* ---- TLS ---- */

static void tls_reason(char *buf, size_t cap)
{
    unsigned long e = ERR_get_error();
    if (e == 0)
        snprintf(buf, cap, "no reason given");
    else
        ERR_error_string_n(e, buf, cap);
    ERR_clear_error();
}

/* The client context: the CA to trust (else the system's), and a certificate of ours when
   Redis asks for one (its tls-auth-clients, on by default). */
static int tls_ctx_new(const mg__redis_conf_t *conf, SSL_CTX **out, char *err, size_t errlen)
{
    char why[256];
    SSL_CTX *ctx = SSL_CTX_new(TLS_client_method());
    if (ctx == NULL) {
        tls_reason(why, sizeof(why));
        snprintf(err, errlen, "redis TLS: %s", why);
        return MG_ENOMEM;
    }
    SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION);
    /* Redis never renegotiates; a server that asks would make SSL_write want a read. */
    SSL_CTX_set_options(ctx, SSL_OP_NO_RENEGOTIATION);
    SSL_CTX_set_mode(ctx, SSL_MODE_RELEASE_BUFFERS);
    SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER, NULL);
    int ok = conf->ca_file != NULL ? SSL_CTX_load_verify_locations(ctx, conf->ca_file, NULL)
                                   : SSL_CTX_set_default_verify_paths(ctx);
    const char *what = "MOONGATE_REDIS_CA";
    if (ok == 1 && conf->cert_file != NULL) {
        what = "MOONGATE_REDIS_CERT";
        ok = SSL_CTX_use_certificate_chain_file(ctx, conf->cert_file);
        if (ok == 1) {
            what = "MOONGATE_REDIS_KEY";
            ok = SSL_CTX_use_PrivateKey_file(ctx, conf->key_file, SSL_FILETYPE_PEM) == 1 &&
                 SSL_CTX_check_private_key(ctx) == 1;
        }
    }
    if (ok != 1) {
        tls_reason(why, sizeof(why));
        snprintf(err, errlen, "%s: %s", conf->ca_file == NULL && conf->cert_file == NULL
                                            ? "the system's CA store" : what, why);
        SSL_CTX_free(ctx);
        return MG_ECONFIG;
    }
    *out = ctx;
    return 0;
}

/* ---- the connection ---- */

/*
 * One connection attempt: its socket, its TLS session (memory BIOs: the socket is libuv's) and
 * the reader of its answers. r lets go of it (c->r = NULL) when it fails or closes; it is
 * freed when its handle has closed, after libuv has cancelled its writes.
 */
struct rconn {
    uv_tcp_t tcp;
    uv_connect_t connect;
    mg_redis_t *r;
    SSL *ssl;           /* NULL: plain */
    BIO *rbio, *wbio;   /* ciphertext in and out; owned by ssl */
    bool tcp_up;        /* connected */
    bool ready;         /* connected and, with TLS, the handshake done: commands may go */
    redisReader *reader;
    size_t since_answer; /* bytes read since the last whole answer */
    int refused_elements; /* an array header the reader refused (mg__redis_reader_new) */
    char in[16384];
};

typedef struct wreq {
    uv_write_t req;
    char data[];
} wreq_t;

static void connect_start(mg_redis_t *r);
static void conn_lost(mg_redis_t *r, const char *why);
static bool try_next_addr(mg_redis_t *r);

static void on_retry(uv_timer_t *t)
{
    connect_start(t->data);
}

static void conn_closed(uv_handle_t *h)
{
    rconn_t *c = h->data;
    if (c->ssl != NULL)
        SSL_free(c->ssl);
    if (c->reader != NULL)
        redisReaderFree(c->reader);
    free(c);
}

/* Ends the connection: every operation still out gets "connection closed". */
static void conn_drop(mg_redis_t *r)
{
    rconn_t *c = r->c;
    if (c != NULL) {
        r->c = NULL;
        c->r = NULL;
        uv_close((uv_handle_t *)&c->tcp, conn_closed);
    }
    mg__buf_consume(&r->out, mg__buf_size(&r->out), OUT_KEEP);
    r->setup_left = 0;
    uv_prepare_stop(&r->flusher);
    mg__redis_op_t *o = r->head;
    r->head = r->tail = NULL;
    while (o != NULL) {
        mg__redis_op_t *next = o->next;
        finish_op(r, o, NULL);
        o = next;
    }
}

static void conn_lost(mg_redis_t *r, const char *why)
{
    bool was_up = r->state == R_UP;
    /* In TLS 1.3 a server that wants a client certificate says so after our handshake is
       over, and hangs up while our first command is on its way: the alert, or a reset. */
    bool no_cert = !was_up && r->c != NULL && r->c->ready && r->c->ssl != NULL &&
                   !r->has_client_cert;
    uv_timer_stop(&r->timer);
    r->state = R_DOWN;
    r->stats.up = false;
    conn_drop(r);
    if (r->freeing)
        return;
    snprintf(r->why_down, sizeof(r->why_down), "%s%s", why,
             no_cert ? "; Redis may want a client certificate (tls-auth-clients): set "
                       "MOONGATE_REDIS_CERT and MOONGATE_REDIS_KEY" : "");
    if (r->quiet)
        ;
    else if (was_up)
        mg_log_warn(LOG, "%s: connection lost (%s); the shared dictionary fails every call at "
                    "once until it is back; reconnecting", r->a.name, why);
    else if (!r->down_reported)
        mg_log_warn(LOG, "%s: cannot connect (%s); the shared dictionary fails every call at "
                    "once until it is back; retrying", r->a.name, r->why_down);
    r->down_reported = true;
    uv_timer_start(&r->timer, on_retry, r->backoff_ms, 0);
    r->backoff_ms = r->backoff_ms * 2 > BACKOFF_MAX_MS ? BACKOFF_MAX_MS : r->backoff_ms * 2;
}

static void on_written(uv_write_t *req, int status)
{
    rconn_t *c = req->handle->data;
    free(req);
    if (status < 0 && c->r != NULL) {
        char why[128];
        snprintf(why, sizeof(why), "write: %s", uv_strerror(status));
        conn_lost(c->r, why);
    }
}

/* Writes w, its len bytes filled in; w is freed when written (or at once if it cannot go). */
static int conn_write_go(rconn_t *c, wreq_t *w, size_t len)
{
    uv_buf_t b = uv_buf_init(w->data, (unsigned)len);
    int rc = uv_write(&w->req, (uv_stream_t *)&c->tcp, &b, 1, on_written);
    if (rc != 0) {
        free(w);
        return MG_ECONNECT;
    }
    return 0;
}

static int conn_write(rconn_t *c, const char *data, size_t len)
{
    wreq_t *w = malloc(sizeof(*w) + len);
    if (w == NULL)
        return MG_ENOMEM;
    memcpy(w->data, data, len);
    return conn_write_go(c, w, len);
}

/* Sends what TLS has written into its BIO, read straight into the write. */
static int tls_send(rconn_t *c)
{
    size_t n = BIO_ctrl_pending(c->wbio);
    if (n == 0)
        return 0;
    wreq_t *w = malloc(sizeof(*w) + n);
    if (w == NULL)
        return MG_ENOMEM;
    if (BIO_read(c->wbio, w->data, (int)n) != (int)n) {
        free(w);
        return MG_EINVAL;
    }
    return conn_write_go(c, w, n);
}

/* Sends the commands queued in r->out. It runs in the loop's prepare phase, just before the
   loop waits for I/O, so that the commands of one iteration go in one write and none waits for
   the next poll to end. */
static void flush(mg_redis_t *r)
{
    rconn_t *c = r->c;
    uv_prepare_stop(&r->flusher);
    size_t n = mg__buf_size(&r->out);
    if (c == NULL || !c->ready || n == 0)
        return;
    const char *data = r->out.data + r->out.off;
    int rc;
    if (c->ssl != NULL) {
        /* A memory BIO takes it all: SSL_write returns only when all is written. */
        ERR_clear_error();
        rc = SSL_write(c->ssl, data, (int)n) > 0 ? tls_send(c) : MG_EINVAL;
        ERR_clear_error(); /* leave the shared queue as we found it */
    } else {
        rc = conn_write(c, data, n);
    }
    mg__buf_consume(&r->out, n, OUT_KEEP);
    if (rc != 0)
        conn_lost(r, "cannot write");
}

static void on_flush(uv_prepare_t *h)
{
    flush(h->data);
}

/* Queues a command in Redis's protocol (*argc, then $len and the bytes of each argument), to
   go in the loop's prepare phase. */
static int queue_argv(mg_redis_t *r, int argc, const char **argv, const size_t *lens)
{
    size_t len = 16;
    for (int i = 0; i < argc; i++)
        len += 32 + lens[i];
    size_t queued = mg__buf_size(&r->out);
    if (r->c != NULL)
        queued += uv_stream_get_write_queue_size((uv_stream_t *)&r->c->tcp);
    if (queued + len > OUT_MAX)
        return MG_EQUEUEFULL;
    size_t before = r->out.len;
    char head[32], *p = head;
    *p++ = '*';
    p = mg__redis_put_uint(p, (size_t)argc);
    *p++ = '\r';
    *p++ = '\n';
    int rc = mg__buf_append(&r->out, head, (size_t)(p - head));
    for (int i = 0; i < argc && rc == 0; i++) {
        p = head;
        *p++ = '$';
        p = mg__redis_put_uint(p, lens[i]);
        *p++ = '\r';
        *p++ = '\n';
        rc = mg__buf_append(&r->out, head, (size_t)(p - head));
        if (rc == 0)
            rc = mg__buf_append(&r->out, argv[i], lens[i]);
        if (rc == 0)
            rc = mg__buf_append(&r->out, "\r\n", 2);
    }
    if (rc != 0) {
        r->out.len = before; /* none of it */
        return rc;
    }
    if (r->c != NULL && r->c->ready)
        uv_prepare_start(&r->flusher, on_flush);
    return 0;
}

static void went_up(mg_redis_t *r)
{
    uv_timer_stop(&r->timer);
    r->state = R_UP;
    r->stats.up = true;
    r->backoff_ms = BACKOFF_MIN_MS;
    if (r->quiet)
        ;
    else if (r->down_reported)
        mg_log_info(LOG, "%s: connected again; the shared dictionary is back", r->a.name);
    else
        mg_log_info(LOG, "%s: connected; the shared dictionary is cluster-wide", r->a.name);
    r->down_reported = false;
}

/* An answer to AUTH, SELECT or the PING after them: the last one brings the connection up. */
static void setup_answer(mg_redis_t *r, const redisReply *rep)
{
    if (rep->type == REDIS_REPLY_ERROR) {
        if (!r->down_reported && !r->quiet)
            mg_log_error(LOG, "%s: refused: %s; the shared dictionary fails every call at once "
                         "until it is accepted; retrying", r->a.name, rep->str);
        r->down_reported = true;
        conn_lost(r, rep->str);
        return;
    }
    if (--r->setup_left == 0)
        went_up(r);
}

static void answer(mg_redis_t *r, redisReply *rep)
{
    if (r->setup_left > 0) {
        setup_answer(r, rep);
        return;
    }
    mg__redis_op_t *o = r->head;
    if (o == NULL) {
        conn_lost(r, "an answer to no question");
        return;
    }
    r->head = o->next;
    if (r->head == NULL)
        r->tail = NULL;
    bool flushed = rep->type == REDIS_REPLY_ERROR && strncmp(rep->str, "NOSCRIPT", 8) == 0;
    finish_op(r, o, rep);
    if (flushed && r->c != NULL) /* a new connection loads them again */
        conn_lost(r, "its scripts were flushed (SCRIPT FLUSH); loading them again");
}

/* Hands the plain text read to the reader and every whole answer on. */
static void conn_feed(rconn_t *c, const char *data, size_t len)
{
    mg_redis_t *r = c->r;
    if (redisReaderFeed(c->reader, data, len) != REDIS_OK) {
        conn_lost(r, "out of memory");
        return;
    }
    c->since_answer += len;
    for (;;) {
        void *reply = NULL;
        if (redisReaderGetReply(c->reader, &reply) != REDIS_OK) {
            char why[160];
            if (c->refused_elements > 0)
                snprintf(why, sizeof(why), "protocol error: an array of %d elements",
                         c->refused_elements);
            else
                snprintf(why, sizeof(why), "protocol error: %s", c->reader->errstr);
            conn_lost(r, why);
            return;
        }
        if (reply == NULL)
            break;
        /* What follows this answer is still in the reader's buffer. */
        c->since_answer = c->reader->len - c->reader->pos;
        answer(r, reply);
        freeReplyObject(reply);
        if (c->r == NULL)
            return; /* the answer ended the connection */
    }
    /* The bytes since the last whole answer are one answer in the making (the reader takes
       an array's elements in as they come, so its buffer alone would not tell): no answer of
       ours is that large. */
    if (c->since_answer > VALUE_MAX + 4096)
        conn_lost(r, "protocol error: an answer over 1 MiB");
}

static void tls_failed(rconn_t *c, int ret)
{
    char why[400], ossl[256];
    long v = SSL_get_verify_result(c->ssl);
    if (v != X509_V_OK)
        snprintf(why, sizeof(why), "TLS: the server's certificate is not trusted: %s",
                 X509_verify_cert_error_string(v));
    else if (SSL_get_error(c->ssl, ret) == SSL_ERROR_SSL) {
        tls_reason(ossl, sizeof(ossl));
        snprintf(why, sizeof(why), "TLS: %s", ossl);
    } else {
        snprintf(why, sizeof(why), "TLS: the handshake failed");
    }
    ERR_clear_error();
    conn_lost(c->r, why);
}

/* Drives the handshake on what has arrived; once done, the queued commands go. */
static void tls_step(rconn_t *c)
{
    ERR_clear_error();
    int ret = SSL_do_handshake(c->ssl);
    if (tls_send(c) != 0) {
        conn_lost(c->r, "cannot write");
        return;
    }
    if (ret == 1) {
        c->ready = true;
        flush(c->r);
        return;
    }
    if (SSL_get_error(c->ssl, ret) != SSL_ERROR_WANT_READ)
        tls_failed(c, ret);
}

static void on_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *buf)
{
    rconn_t *c = h->data;
    (void)suggested;
    *buf = uv_buf_init(c->in, sizeof(c->in));
}

static void on_read(uv_stream_t *s, ssize_t n, const uv_buf_t *buf)
{
    rconn_t *c = s->data;
    if (c->r == NULL || n == 0)
        return;
    if (n < 0) {
        char why[160];
        /* A TLS port hangs up on a plain PING, with a reset when the PING is still unread. */
        snprintf(why, sizeof(why), "%s%s", n == UV_EOF ? "closed by redis" : uv_strerror((int)n),
                 c->ssl == NULL && c->r->state != R_UP
                     ? " before it answered: is it a TLS port (rediss://)?" : "");
        conn_lost(c->r, why);
        return;
    }
    if (c->ssl == NULL) {
        conn_feed(c, buf->base, (size_t)n);
        return;
    }
    if (BIO_write(c->rbio, buf->base, (int)n) != (int)n) {
        conn_lost(c->r, "out of memory");
        return;
    }
    if (!c->ready) {
        tls_step(c);
        if (c->r == NULL || !c->ready)
            return;
    }
    char plain[16384];
    int k = 0;
    /* The thread's error queue is shared (libssh2 and our front end use OpenSSL too): what
       SSL_get_error reads must be this call's own. */
    ERR_clear_error();
    while (c->r != NULL && (k = SSL_read(c->ssl, plain, sizeof(plain))) > 0) {
        conn_feed(c, plain, (size_t)k);
        ERR_clear_error();
    }
    if (c->r != NULL && k <= 0) {
        int e = SSL_get_error(c->ssl, k);
        if (e == SSL_ERROR_ZERO_RETURN)
            conn_lost(c->r, "closed by redis");
        else if (e != SSL_ERROR_WANT_READ)
            tls_failed(c, k);
        else if (tls_send(c) != 0) /* TLS 1.3 may answer a key update */
            conn_lost(c->r, "cannot write");
    }
}

static void on_connected(uv_connect_t *req, int status)
{
    rconn_t *c = req->data;
    if (c->r == NULL)
        return;
    if (status < 0) {
        if (!try_next_addr(c->r))
            conn_lost(c->r, uv_strerror(status));
        return;
    }
    c->tcp_up = true;
    uv_tcp_nodelay(&c->tcp, 1);
    if (uv_read_start((uv_stream_t *)&c->tcp, on_alloc, on_read) != 0) {
        conn_lost(c->r, "cannot read");
        return;
    }
    if (c->ssl != NULL) {
        tls_step(c);
        return;
    }
    c->ready = true;
    flush(c->r);
}

static void on_connect_timeout(uv_timer_t *t)
{
    mg_redis_t *r = t->data;
    if (r->state != R_CONNECTING)
        return;
    const rconn_t *c = r->c;
    if (c != NULL && c->tcp_up && c->ssl != NULL && !c->ready)
        conn_lost(r, "no TLS handshake within 1 s: is it a plain redis:// port?");
    else if (c != NULL && c->tcp_up)
        conn_lost(r, "connected, but no answer to PING within 1 s");
    else if (!try_next_addr(r))
        conn_lost(r, "no connection within 1 s");
}

static bool is_ip(const char *host)
{
    unsigned char a[16];
    return inet_pton(AF_INET, host, a) == 1 || inet_pton(AF_INET6, host, a) == 1;
}

/* TLS for c: the server's name is checked against its certificate (a name, or an address). */
static int conn_tls(mg_redis_t *r, rconn_t *c)
{
    c->ssl = SSL_new(r->tls);
    c->rbio = BIO_new(BIO_s_mem());
    c->wbio = BIO_new(BIO_s_mem());
    if (c->ssl == NULL || c->rbio == NULL || c->wbio == NULL) {
        BIO_free(c->rbio);
        BIO_free(c->wbio);
        return MG_ENOMEM;
    }
    SSL_set_bio(c->ssl, c->rbio, c->wbio);
    SSL_set_connect_state(c->ssl);
    X509_VERIFY_PARAM *vp = SSL_get0_param(c->ssl);
    if (is_ip(r->a.host))
        return X509_VERIFY_PARAM_set1_ip_asc(vp, r->a.host) == 1 ? 0 : MG_ENOMEM;
    if (SSL_set_tlsext_host_name(c->ssl, r->a.host) != 1 || SSL_set1_host(c->ssl, r->a.host) != 1)
        return MG_ENOMEM;
    return 0;
}

/* A new connection to addr with AUTH, SELECT and PING queued ahead of everything else. */
static int conn_open(mg_redis_t *r, const struct sockaddr *addr)
{
    rconn_t *c = calloc(1, sizeof(*c));
    if (c == NULL)
        return MG_ENOMEM;
    c->r = r;
    c->reader = mg__redis_reader_new(&c->refused_elements);
    if (c->reader == NULL || (r->tls != NULL && conn_tls(r, c) != 0) ||
        uv_tcp_init(r->loop, &c->tcp) != 0) {
        if (c->reader)
            redisReaderFree(c->reader);
        if (c->ssl)
            SSL_free(c->ssl);
        free(c);
        return MG_ENOMEM;
    }
    c->tcp.data = c;
    c->connect.data = c;
    r->c = c;
    r->state = R_CONNECTING;
    int rc = uv_tcp_connect(&c->connect, &c->tcp, addr, on_connected);
    if (rc != 0) {
        conn_lost(r, uv_strerror(rc));
        return 0;
    }
    const char *argv[3];
    size_t lens[3];
    if (r->a.pass[0] != '\0') {
        int n = 0;
        argv[n++] = "AUTH";
        if (r->a.user[0] != '\0')
            argv[n++] = r->a.user;
        argv[n++] = r->a.pass;
        for (int i = 0; i < n; i++)
            lens[i] = strlen(argv[i]);
        rc |= queue_argv(r, n, argv, lens);
        r->setup_left++;
    }
    if (r->a.db != 0) {
        char db[16];
        snprintf(db, sizeof(db), "%d", r->a.db);
        argv[0] = "SELECT";
        argv[1] = db;
        lens[0] = 6;
        lens[1] = strlen(db);
        rc |= queue_argv(r, 2, argv, lens);
        r->setup_left++;
    }
    for (int i = 0; i < MG_REDIS_SCRIPTS; i++) {
        argv[0] = "SCRIPT";
        argv[1] = "LOAD";
        argv[2] = mg__redis_scripts[i];
        lens[0] = 6;
        lens[1] = 4;
        lens[2] = strlen(mg__redis_scripts[i]);
        rc |= queue_argv(r, 3, argv, lens);
        r->setup_left++;
    }
    argv[0] = "PING";
    lens[0] = 4;
    rc |= queue_argv(r, 1, argv, lens);
    r->setup_left++;
    if (rc != 0) {
        conn_lost(r, "out of memory");
        return 0;
    }
    uv_timer_start(&r->timer, on_connect_timeout, CONNECT_TIMEOUT_MS, 0);
    return 0;
}

static void on_resolved(uv_getaddrinfo_t *req, int status, struct addrinfo *res)
{
    mg_redis_t *r = req->data;
    r->resolving = false;
    if (r->freeing) {
        uv_freeaddrinfo(res);
        maybe_free(r);
        return;
    }
    if (status != 0 || res == NULL) {
        uv_freeaddrinfo(res);
        char why[400];
        snprintf(why, sizeof(why), "cannot resolve %s: %s", r->a.host,
                 status ? uv_strerror(status) : "no address");
        conn_lost(r, why);
        return;
    }
    r->n_addrs = 0;
    for (struct addrinfo *ai = res; ai != NULL && r->n_addrs < ADDRS_MAX; ai = ai->ai_next) {
        if ((ai->ai_family != AF_INET && ai->ai_family != AF_INET6) ||
            ai->ai_addrlen > sizeof(r->addrs[0]))
            continue;
        struct sockaddr_storage *ss = &r->addrs[r->n_addrs++];
        memcpy(ss, ai->ai_addr, ai->ai_addrlen);
        ((struct sockaddr_in *)ss)->sin_port = htons((uint16_t)r->a.port); /* same in v6 */
    }
    uv_freeaddrinfo(res);
    r->addr_i = 0;
    if (r->n_addrs == 0)
        conn_lost(r, "its name gives no IPv4 or IPv6 address");
    else if (conn_open(r, (struct sockaddr *)&r->addrs[0]) != 0)
        conn_lost(r, "out of memory");
}

/* A connect that failed before reaching Redis tries the name's next address, if it has one
   (localhost may give ::1 first to a Redis bound to 127.0.0.1). */
static bool try_next_addr(mg_redis_t *r)
{
    if (r->freeing || r->c == NULL || r->c->tcp_up || r->addr_i + 1 >= r->n_addrs)
        return false;
    conn_drop(r); /* nothing was taken yet: operations wait for the connect */
    r->addr_i++;
    if (conn_open(r, (struct sockaddr *)&r->addrs[r->addr_i]) != 0)
        conn_lost(r, "out of memory");
    return true;
}

static void connect_start(mg_redis_t *r)
{
    if (r->freeing || r->state != R_DOWN)
        return;
    r->state = R_RESOLVING;
    struct addrinfo hints = { .ai_socktype = SOCK_STREAM };
    r->gai.data = r;
    int rc = uv_getaddrinfo(r->loop, &r->gai, on_resolved, r->a.host, NULL, &hints);
    if (rc != 0) {
        char why[400];
        snprintf(why, sizeof(why), "cannot resolve %s: %s", r->a.host, uv_strerror(rc));
        conn_lost(r, why);
        return;
    }
    r->resolving = true;
}

int mg__redis_new(uv_loop_t *loop, const mg__redis_conf_t *conf, mg_redis_t **out, char *err,
                  size_t errlen)
{
    *out = NULL;
    mg_redis_t *r = calloc(1, sizeof(*r));
    if (r == NULL)
        return MG_ENOMEM;
    int rc = mg__redis_parse_url(conf->url, &r->a, err, errlen);
    if (rc == 0 && !r->a.tls && (conf->ca_file || conf->cert_file)) {
        snprintf(err, errlen, "MOONGATE_REDIS_CA and MOONGATE_REDIS_CERT are for TLS: "
                              "MOONGATE_REDIS_URL must then start with rediss://");
        rc = MG_ECONFIG;
    }
    if (rc == 0 && (conf->cert_file == NULL) != (conf->key_file == NULL)) {
        snprintf(err, errlen, "MOONGATE_REDIS_CERT and MOONGATE_REDIS_KEY: give both or neither");
        rc = MG_ECONFIG;
    }
    if (rc == 0 && r->a.tls)
        rc = tls_ctx_new(conf, &r->tls, err, errlen);
    r->has_client_cert = conf->cert_file != NULL;
    if (rc != 0) {
        free(r);
        return rc;
    }
    for (int i = 0; i < MG_REDIS_SCRIPTS; i++) {
        unsigned char md[SHA_DIGEST_LENGTH];
        SHA1((const unsigned char *)mg__redis_scripts[i], strlen(mg__redis_scripts[i]), md);
        for (int k = 0; k < SHA_DIGEST_LENGTH; k++)
            snprintf(r->sha[i] + 2 * k, 3, "%02x", md[k]);
    }
    r->loop = loop;
    r->backoff_ms = BACKOFF_MIN_MS;
    uv_timer_init(loop, &r->timer);
    r->timer.data = r;
    uv_prepare_init(loop, &r->flusher);
    r->flusher.data = r;
    r->handles = 2;
    connect_start(r);
    *out = r;
    return 0;
}

/* r goes when its handles have closed and no resolution is out. */
static void maybe_free(mg_redis_t *r)
{
    if (r->handles > 0 || r->resolving)
        return;
    SSL_CTX_free(r->tls);
    mg__buf_free(&r->out);
    free(r);
}

static void handle_closed(uv_handle_t *h)
{
    mg_redis_t *r = h->data;
    r->handles--;
    maybe_free(r);
}

void mg__redis_free(mg_redis_t *r)
{
    if (r == NULL)
        return;
    r->freeing = true;
    r->state = R_DOWN;
    r->stats.up = false;
    conn_drop(r); /* pending operations hear of it with no reply */
    if (r->resolving)
        uv_cancel((uv_req_t *)&r->gai);
    uv_close((uv_handle_t *)&r->timer, handle_closed);
    uv_close((uv_handle_t *)&r->flusher, handle_closed);
}

const char *mg__redis_name(const mg_redis_t *r)
{
    return r->a.name;
}

void mg__redis_get_stats(const mg_redis_t *r, mg_redis_stats_t *out)
{
    *out = r->stats;
    out->in_flight = r->in_flight;
}

void mg__redis_note_timeout(mg_redis_t *r, uint32_t ms)
{
    r->stats.timeouts++;
    if (!r->slow && r->state == R_UP) {
        r->slow = true;
        mg_log_warn(LOG, "%s: slow: no answer within %u ms; calls that wait longer take the "
                    "policy's fallback", r->a.name, (unsigned)ms);
    }
}

/* ---- operations ---- */

/* o's answer (NULL: the connection closed first) goes to the coroutine, unless cancelled. */
static void finish_op(mg_redis_t *r, mg__redis_op_t *o, redisReply *rep)
{
    r->in_flight--;
    if (rep != NULL && rep->type != REDIS_REPLY_ERROR) {
        if (r->slow && o->done != NULL) {
            r->slow = false;
            mg_log_info(LOG, "%s: answering in time again", r->a.name);
        }
    } else {
        r->stats.errors++;
    }
    mg__redis_done_fn done = o->done;
    void *ctx = o->ctx;
    lua_State *co = o->co;
    mg__rdict_op_t op = o->op;
    free(o);
    if (done != NULL)
        done(ctx, mg__redis_push_results(co, op, rep));
}

int mg__redis_dict_start(mg_redis_t *r, const mg__rdict_req_t *q, lua_State *co,
                         mg__redis_done_fn done, void *ctx, mg__redis_op_t **out, char *err,
                         size_t errlen)
{
    *out = NULL;
    snprintf(err, errlen, "redis unavailable: out of memory"); /* unless something else */
    /* Only a connection that is up, or that reached Redis and is setting up, takes
       operations: while a connect is still out (a dropped SYN waits the whole connect
       timeout), every call fails at once. */
    if (r->freeing || r->state == R_DOWN || r->state == R_RESOLVING || r->c == NULL ||
        !r->c->tcp_up) {
        r->stats.unavailable++;
        snprintf(err, errlen, "redis unavailable: not connected to %s", r->a.name);
        return MG_ECONNECT;
    }
    if (r->in_flight >= MAX_IN_FLIGHT) {
        r->stats.unavailable++;
        snprintf(err, errlen, "redis unavailable: %d calls already waiting", r->in_flight);
        return MG_EQUEUEFULL;
    }
    if (q->op == MG_RDICT_SET && q->has_value && q->value.type == MG_DICT_STRING &&
        q->value.len > VALUE_MAX) {
        snprintf(err, errlen, "value too large for redis (over %d bytes)", VALUE_MAX);
        return MG_EINVAL;
    }

    mg__redis_cmd_t cmd;
    int rc = mg__redis_cmd_build(q, r->sha, &cmd);
    if (rc != 0)
        return rc;
    mg__redis_op_t *o = calloc(1, sizeof(*o));
    rc = o != NULL ? queue_argv(r, cmd.argc, cmd.argv, cmd.lens) : MG_ENOMEM;
    if (rc == 0) {
        *o = (mg__redis_op_t){ .op = q->op, .co = co, .done = done, .ctx = ctx };
        if (r->tail != NULL)
            r->tail->next = o;
        else
            r->head = o;
        r->tail = o;
        r->in_flight++;
        r->stats.commands++;
        *out = o;
    } else {
        free(o);
        if (rc == MG_EQUEUEFULL) {
            r->stats.unavailable++;
            snprintf(err, errlen, "redis unavailable: %d MiB of commands not yet written",
                     OUT_MAX >> 20);
        }
    }
    mg__redis_cmd_free(&cmd);
    return rc;
}

void mg__redis_op_cancel(mg__redis_op_t *o)
{
    if (o != NULL)
        o->done = NULL;
}

/* ---- a probe, for moongate -t ---- */

static void probe_tick(uv_timer_t *t)
{
    mg_redis_t *r = t->data;
    if (r->state == R_UP || uv_now(t->loop) >= *(uint64_t *)r->probe_deadline)
        uv_stop(t->loop);
}

int mg_policy_redis_probe(uv_loop_t *loop, const mg_policy_options_t *o, uint32_t timeout_ms,
                          char *msg, size_t cap)
{
    mg__redis_conf_t conf = { .url = o->redis_url, .ca_file = o->redis_ca_file,
                              .cert_file = o->redis_cert_file, .key_file = o->redis_key_file };
    mg_redis_t *r = NULL;
    int rc = mg__redis_new(loop, &conf, &r, msg, cap);
    if (rc != 0)
        return rc;
    r->quiet = true;
    uint64_t t0 = uv_hrtime();
    uint64_t deadline = uv_now(loop) + timeout_ms;
    r->probe_deadline = &deadline;
    uv_timer_t tick;
    uv_timer_init(loop, &tick);
    tick.data = r;
    uv_timer_start(&tick, probe_tick, 5, 5);
    uv_run(loop, UV_RUN_DEFAULT);
    uv_close((uv_handle_t *)&tick, NULL);
    if (r->state == R_UP) {
        char ip[64] = "?";
        uv_ip_name((const struct sockaddr *)&r->addrs[r->addr_i], ip, sizeof(ip));
        char tried[64] = "";
        if (r->addr_i > 0)
            snprintf(tried, sizeof(tried), ", after %d other address%s", r->addr_i,
                     r->addr_i == 1 ? "" : "es");
        snprintf(msg, cap, "%s answered in %.1f ms (at %s%s)", r->a.name,
                 (double)(uv_hrtime() - t0) / 1e6, ip, tried);
        rc = 0;
    } else {
        snprintf(msg, cap, "%s: %s", r->a.name,
                 r->why_down[0] ? r->why_down : "no connection yet");
        rc = MG_ECONNECT;
    }
    mg__redis_free(r);
    uv_run(loop, UV_RUN_NOWAIT);
    return rc;
}
