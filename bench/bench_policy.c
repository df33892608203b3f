/*
 * bench_policy: what the policy costs one request.
 *
 * One request's policy work is acquire, authenticate, admit, route, release; this program runs
 * that sequence in a loop and prints the nanoseconds per request for:
 *
 *   default      lua/moongate/default.lua (bearer token from MOONGATE_TOKENS, admit all,
 *                the default route)
 *   rate_limit   examples/policies/rate_limit.lua (100 per minute per user, on the shared
 *                dictionary; the clock moves 0.6 s per request so every request is admitted)
 *   heavy        the default policy with an admit hook that runs a 1000-iteration Lua loop,
 *                to show where the JIT would matter
 *
 * each with policy code in the interpreter (what moongate runs: the time bound needs it) and
 * with the JIT on (for comparison only). The target is 5 us per request.
 *
 *   bench_policy [iterations]
 */
#include "moongate/log.h"
#include "moongate/policy.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <uv.h>

#define TARGET_NS 5000.0

static uint64_t fake_ms = 1700000000000ull;
static uint64_t step_ms;

static uint64_t fake_clock(void *ctx)
{
    fake_ms += step_ms;
    return fake_ms;
}

static int fake_user_stats(void *ctx, const char *user, mg_pool_user_stats_t *out)
{
    memset(out, 0, sizeof(*out));
    out->connections = 1;
    out->leases = 2;
    out->limits.max_connections = 3;
    return 0;
}

static int one_request(mg_policy_t *p, const mg_policy_request_t *req)
{
    mg_policy_decision_t d;
    mg_policy_route_t route;
    mg_policy_state_t *st = mg_policy_acquire(p);
    int rc = mg_policy_authenticate(st, req, &d);
    if (rc == 0 && d.allow) {
        char user[MG_USER_ID_MAX + 1];
        memcpy(user, d.user, sizeof(user));
        rc = mg_policy_admit(st, req, user, &d);
        if (rc == 0 && d.allow)
            rc = mg_policy_route(st, req, user, &route, &d);
    }
    mg_policy_release(st);
    return rc == 0 && d.allow ? 0 : -1;
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

/* Runs one case; returns the median of 5 runs in ns per request, or a negative number. */
static double run_case(uv_loop_t *loop, const char *path, bool jit, uint64_t clock_step,
                       long iterations)
{
    mg_policy_options_t o;
    mg_policy_options_init(&o, NULL);
    o.path = path;
    o.lua_dir = MG_SOURCE_DIR "/lua";
    o.jit = jit;
    mg_policy_t *p;
    char err[512];
    if (mg_policy_new(loop, &o, &p, err, sizeof(err)) != 0) {
        fprintf(stderr, "bench_policy: %s\n", err);
        return -1;
    }
    step_ms = clock_step;
    mg_policy_set_clock(p, fake_clock, NULL);
    mg_policy_set_stats_fn(p, fake_user_stats, NULL, NULL);

    mg_policy_header_t headers[] = {
        { "host", "gateway.example.com" },
        { "authorization", "Bearer bench-token-0123456789abcdef" },
        { "content-type", "application/json" },
        { "user-agent", "bench/1.0" },
        { "accept", "*/*" },
    };
    mg_policy_request_t req = { .method = "POST", .path = "/api/generate",
                                .decoded_path = "/api/generate", .remote_addr = "203.0.113.7",
                                .headers = headers, .nheaders = 5 };

    double runs[5];
    double result = 0;
    for (long i = 0; i < iterations / 10; i++) {
        if (one_request(p, &req) != 0) {
            fprintf(stderr, "bench_policy: %s: a request was refused\n", path ? path : "default");
            result = -1;
            goto out;
        }
    }
    for (int r = 0; r < 5; r++) {
        uint64_t t0 = uv_hrtime();
        for (long i = 0; i < iterations; i++)
            (void)one_request(p, &req);
        runs[r] = (double)(uv_hrtime() - t0) / (double)iterations;
    }
    qsort(runs, 5, sizeof(runs[0]), cmp_double);
    result = runs[2];
out:
    mg_policy_free(p);
    uv_run(loop, UV_RUN_NOWAIT);
    return result;
}

int main(int argc, char **argv)
{
    long iterations = argc > 1 ? atol(argv[1]) : 200000;
    if (iterations < 10)
        iterations = 10;
    mg_log_set_level(MG_LOG_ERROR);
    setenv("MOONGATE_TOKENS", "alice:another-token,bench:bench-token-0123456789abcdef", 1);

    char heavy[256];
    snprintf(heavy, sizeof(heavy), "/tmp/bench_policy_heavy_%d.lua", (int)getpid());
    FILE *f = fopen(heavy, "w");
    if (f == NULL)
        return 1;
    fputs("local default = require 'moongate.default'\n"
          "return { authenticate = default.authenticate,\n"
          "  admit = function(req, user, stats)\n"
          "    local x = 0\n"
          "    for i = 1, 1000 do x = (x * 31 + i) % 1000003 end\n"
          "    return x >= 0\n"
          "  end }\n", f);
    fclose(f);

    struct {
        const char *name;
        const char *path;
        uint64_t step;
    } cases[] = {
        { "default", NULL, 0 },
        { "rate_limit", MG_SOURCE_DIR "/examples/policies/rate_limit.lua", 600 },
        { "heavy", heavy, 0 },
    };
    uv_loop_t loop;
    uv_loop_init(&loop);
    printf("policy cost per request (acquire + authenticate + admit + route + release), "
           "%ld iterations, median of 5\n", iterations);
    printf("%-12s %-12s %10s %12s\n", "case", "engine", "ns/req", "of 5 us");
    int rc = 0;
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        for (int jit = 0; jit <= 1; jit++) {
            double ns = run_case(&loop, cases[i].path, jit, cases[i].step,
                                 strcmp(cases[i].name, "heavy") == 0 ? iterations / 10 : iterations);
            if (ns < 0) {
                rc = 1;
                continue;
            }
            printf("%-12s %-12s %10.0f %11.0f%%\n", cases[i].name,
                   jit ? "jit (unbounded)" : "interpreter", ns, 100.0 * ns / TARGET_NS);
        }
    }
    uv_loop_close(&loop);
    remove(heavy);
    return rc;
}
