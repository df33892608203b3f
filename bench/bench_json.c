/*
 * bench_json: what writing an error body costs, with moongate's own JSON writer (moongate/json.h,
 * what the gateway uses) and with jansson (json_pack and json_dumps, the library it reads
 * untrusted JSON with), in the same run.
 *
 * The body is the one a refused request gets in OpenAI's shape (src/gateway/request.c):
 *   {"error":{"message":...,"type":...,"param":null,"code":...,"request_id":...}}
 * It is written on every 401, 429 and 503, so in an overload it is written once per request.
 * Both outputs are checked to be the same document (jansson parses both) before timing.
 *
 *   bench_json [iterations]     (default 1000000)
 */
#include "moongate/json.h"

#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static const char message[] = "Rate limit reached for user alice: at most 100 requests a minute";
static const char type[] = "rate_limit_exceeded";
static const char code[] = "rate_limited";
static const char request_id[] = "9f1c2e4b7a6d8e0f1a2b3c4d5e6f7a8b";

static double now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e9 + (double)ts.tv_nsec;
}

/* Ours: the calls request.c makes. Returns the body's length; copies it to out if not NULL. */
static size_t ours(char *out, size_t cap)
{
    mg_json_t j;
    mg_json_init(&j, 16 * 1024);
    mg_json_begin_object(&j);
    mg_json_key(&j, "error");
    mg_json_begin_object(&j);
    mg_json_key(&j, "message");
    mg_json_string(&j, message);
    mg_json_key(&j, "type");
    mg_json_string(&j, type);
    mg_json_key(&j, "param");
    mg_json_null(&j);
    mg_json_key(&j, "code");
    mg_json_string(&j, code);
    mg_json_key(&j, "request_id");
    mg_json_string(&j, request_id);
    mg_json_end_object(&j);
    mg_json_end_object(&j);
    size_t len = 0;
    const char *body = mg_json_buf(&j, &len);
    if (body == NULL)
        len = 0;
    else if (out != NULL)
        snprintf(out, cap, "%s", body);
    mg_json_free(&j);
    return len;
}

static size_t theirs(char *out, size_t cap)
{
    json_t *v = json_pack("{s:{s:s,s:s,s:n,s:s,s:s}}", "error", "message", message, "type", type,
                          "param", "code", code, "request_id", request_id);
    char *body = v != NULL ? json_dumps(v, JSON_COMPACT | JSON_PRESERVE_ORDER) : NULL;
    size_t len = body != NULL ? strlen(body) : 0;
    if (body != NULL && out != NULL)
        snprintf(out, cap, "%s", body);
    free(body);
    json_decref(v);
    return len;
}

static bool same_document(const char *a, const char *b)
{
    json_t *x = json_loads(a, 0, NULL), *y = json_loads(b, 0, NULL);
    bool same = x != NULL && y != NULL && json_equal(x, y);
    json_decref(x);
    json_decref(y);
    return same;
}

static double time_it(size_t (*fn)(char *, size_t), long n, size_t *sink)
{
    double t0 = now_ns();
    for (long i = 0; i < n; i++)
        *sink += fn(NULL, 0);
    return (now_ns() - t0) / (double)n;
}

int main(int argc, char **argv)
{
    long n = argc > 1 ? atol(argv[1]) : 1000000;
    if (n <= 0) {
        fprintf(stderr, "usage: bench_json [iterations]\n");
        return 2;
    }
    char a[1024], b[1024];
    ours(a, sizeof(a));
    theirs(b, sizeof(b));
    if (!same_document(a, b)) {
        fprintf(stderr, "bench_json: the two bodies differ:\n  %s\n  %s\n", a, b);
        return 1;
    }
    size_t sink = 0;
    /* Warm both (allocator, caches), then interleave two rounds each. */
    time_it(ours, n / 10 + 1, &sink);
    time_it(theirs, n / 10 + 1, &sink);
    double o1 = time_it(ours, n, &sink), t1 = time_it(theirs, n, &sink);
    double o2 = time_it(ours, n, &sink), t2 = time_it(theirs, n, &sink);
    double o = o1 < o2 ? o1 : o2, t = t1 < t2 ? t1 : t2;
    printf("error body (%zu bytes), %ld iterations, the better of two rounds:\n", strlen(a), n);
    printf("  %-32s %8.0f ns\n", "moongate's writer (json.h)", o);
    printf("  %-32s %8.0f ns\n", "jansson (json_pack + json_dumps)", t);
    printf("  ratio jansson / ours: %.2fx\n", t / o);
    return sink == 0;
}
