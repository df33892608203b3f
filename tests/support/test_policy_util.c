/*
 * test_policy_util: see test_policy_util.h.
 */
#include "test_policy_util.h"

char tp_dir[256];

void tp_mkdir(void)
{
    if (tp_dir[0] != '\0')
        return;
    snprintf(tp_dir, sizeof(tp_dir), "/tmp/mg-policy-test-XXXXXX");
    assert_non_null(mkdtemp(tp_dir));
}

const char *tp_write(const char *name, const char *content)
{
    static char paths[8][512];
    static int next;
    tp_mkdir();
    char *path = paths[next++ % 8];
    snprintf(path, 512, "%s/%s", tp_dir, name);
    FILE *f = fopen(path, "w");
    assert_non_null(f);
    fputs(content, f);
    fclose(f);
    return path;
}

void tp_cleanup_dir(void)
{
    if (tp_dir[0] == '\0')
        return;
    char cmd[300];
    snprintf(cmd, sizeof(cmd), "rm -rf '%s'", tp_dir);
    assert_int_equal(system(cmd), 0);
    tp_dir[0] = '\0';
}

static int tp_saved_stderr = -1;

static char tp_capture_path[300];

void tp_capture_begin(void)
{
    tp_mkdir();
    fflush(stderr);
    snprintf(tp_capture_path, sizeof(tp_capture_path), "%s/stderr.txt", tp_dir);
    int fd = open(tp_capture_path, O_CREAT | O_TRUNC | O_WRONLY, 0600);
    assert_true(fd >= 0);
    tp_saved_stderr = dup(2);
    dup2(fd, 2);
    close(fd);
}

char *tp_capture_end(void)
{
    fflush(stderr);
    dup2(tp_saved_stderr, 2);
    close(tp_saved_stderr);
    FILE *f = fopen(tp_capture_path, "r");
    assert_non_null(f);
    char *buf = calloc(1, 1 << 20);
    size_t n = fread(buf, 1, (1 << 20) - 1, f);
    buf[n] = '\0';
    fclose(f);
    fputs(buf, stderr);
    return buf;
}

int tp_count(const char *hay, const char *needle)
{
    int n = 0;
    for (const char *p = strstr(hay, needle); p != NULL; p = strstr(p + 1, needle))
        n++;
    return n;
}

uv_loop_t tp_loop;

mg_policy_t *tp_policy_opts(const char *path, void (*tweak)(mg_policy_options_t *))
{
    mg_policy_options_t o;
    mg_policy_options_init(&o, NULL);
    o.path = path;
    o.lua_dir = MG_SOURCE_DIR "/lua";
    if (tweak != NULL)
        tweak(&o);
    mg_policy_t *p = NULL;
    char err[512];
    int rc = mg_policy_new(&tp_loop, &o, &p, err, sizeof(err));
    if (rc != 0)
        fail_msg("mg_policy_new(%s): %s", path != NULL ? path : "default", err);
    return p;
}

mg_policy_t *tp_policy(const char *path)
{
    return tp_policy_opts(path, NULL);
}

mg_policy_t *tp_policy_src(const char *name, const char *src)
{
    return tp_policy(tp_write(name, src));
}

void tp_free(mg_policy_t *p)
{
    mg_policy_free(p);
    uv_run(&tp_loop, UV_RUN_NOWAIT);
    uv_run(&tp_loop, UV_RUN_NOWAIT);
}

void tp_stop_cb(uv_timer_t *t)
{
    uv_stop(t->loop);
}

void tp_run_for(uint64_t ms)
{
    uv_timer_t t;
    uv_timer_init(&tp_loop, &t);
    uv_timer_start(&t, tp_stop_cb, ms, 0);
    uv_run(&tp_loop, UV_RUN_DEFAULT);
    uv_close((uv_handle_t *)&t, NULL);
    uv_run(&tp_loop, UV_RUN_NOWAIT);
}

int tp_setup(void **state)
{
    assert_int_equal(uv_loop_init(&tp_loop), 0);
    return 0;
}

int tp_teardown(void **state)
{
    uv_run(&tp_loop, UV_RUN_NOWAIT);
    assert_int_equal(mg__policy_live_states(), 0);
    assert_int_equal(uv_loop_close(&tp_loop), 0);
    return 0;
}

const mg_policy_request_t *tp_request(tp_req_t *r, const char *token)
{
    memset(r, 0, sizeof(*r));
    size_t n = 0;
    r->headers[n++] = (mg_policy_header_t){ "content-type", "application/json" };
    r->headers[n++] = (mg_policy_header_t){ "user-agent", "test/1.0" };
    if (token != NULL) {
        snprintf(r->auth, sizeof(r->auth), "Bearer %s", token);
        r->headers[n++] = (mg_policy_header_t){ "authorization", r->auth };
    }
    r->req.method = "POST";
    r->req.path = "/api/generate";
    r->req.remote_addr = "203.0.113.7";
    r->req.headers = r->headers;
    r->req.nheaders = n;
    return &r->req;
}

int tp_auth(mg_policy_t *p, const char *token, mg_policy_decision_t *d)
{
    tp_req_t r;
    mg_policy_state_t *st = mg_policy_acquire(p);
    int rc = mg_policy_authenticate(st, tp_request(&r, token), d);
    mg_policy_release(st);
    return rc;
}

int tp_admit(mg_policy_t *p, const char *user, mg_policy_decision_t *d)
{
    tp_req_t r;
    mg_policy_state_t *st = mg_policy_acquire(p);
    int rc = mg_policy_admit(st, tp_request(&r, NULL), user, d);
    mg_policy_release(st);
    return rc;
}

const char *tp_header(const mg_policy_decision_t *d, const char *name)
{
    for (int i = 0; i < d->nheaders; i++) {
        if (strcmp(d->headers[i].name, name) == 0)
            return d->headers[i].value;
    }
    return NULL;
}

uint64_t tp_clock_ms = 1700000000000ull;

uint64_t tp_clock(void *ctx)
{
    return tp_clock_ms;
}

void b64url(const unsigned char *in, size_t n, char *out)
{
    static const char a[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    size_t j = 0;
    for (size_t i = 0; i < n; i += 3) {
        uint32_t v = (uint32_t)in[i] << 16;
        if (i + 1 < n)
            v |= (uint32_t)in[i + 1] << 8;
        if (i + 2 < n)
            v |= in[i + 2];
        out[j++] = a[(v >> 18) & 63];
        out[j++] = a[(v >> 12) & 63];
        if (i + 1 < n)
            out[j++] = a[(v >> 6) & 63];
        if (i + 2 < n)
            out[j++] = a[v & 63];
    }
    out[j] = '\0';
}

void make_jwt(const char *header, const char *payload, const char *secret, char *out)
{
    char h[1024], p[2048], sig[128];
    b64url((const unsigned char *)header, strlen(header), h);
    b64url((const unsigned char *)payload, strlen(payload), p);
    char signing[4096];
    snprintf(signing, sizeof(signing), "%s.%s", h, p);
    unsigned char mac[EVP_MAX_MD_SIZE];
    unsigned int maclen;
    HMAC(EVP_sha256(), secret, (int)strlen(secret), (unsigned char *)signing, strlen(signing),
         mac, &maclen);
    b64url(mac, maclen, sig);
    int n = snprintf(out, 4096, "%s.%s", signing, sig); /* out holds 4096 bytes */
    assert_true(n > 0 && n < 4096);
}
