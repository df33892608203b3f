/*
 * upstream: run mg-upstream for a test (see upstream.h).
 */
#define _GNU_SOURCE
#include "upstream.h"

#include "http_client.h"

#include "moongate/error.h"

#include <dirent.h>
#include <errno.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

static bool executable(const char *path)
{
    return access(path, X_OK) == 0;
}

int mg_test_upstream_binary(char *out, size_t cap)
{
    const char *env = getenv("MG_UPSTREAM");
    if (env && *env && executable(env))
        return snprintf(out, cap, "%s", env) < (int)cap ? 0 : MG_EINVAL;

    env = getenv("MG_BINARY_DIR");
    if (env && *env && snprintf(out, cap, "%s/tests/mg-upstream", env) < (int)cap &&
        executable(out))
        return 0;

    char self[MG_TEST_PATH_MAX * 4];
    ssize_t n = readlink("/proc/self/exe", self, sizeof self - 1);
    if (n > 0) {
        self[n] = '\0';
        char *slash = strrchr(self, '/');
        if (slash) {
            *slash = '\0';
            if (snprintf(out, cap, "%s/mg-upstream", self) < (int)cap && executable(out))
                return 0;
        }
    }
    return MG_ECONFIG;
}

static int start(mg_test_upstream_t *u, bool capture)
{
    char bin[MG_TEST_PATH_MAX * 2], port_file[MG_TEST_PATH_MAX];
    char *text = NULL;
    int err;

    memset(u, 0, sizeof *u);
    if ((err = mg_test_upstream_binary(bin, sizeof bin)) != 0)
        return err;
    if ((err = mg_test_mkdtemp(u->dir, sizeof u->dir, "mg-upstream")) != 0)
        return err;
    if ((err = mg_test_path_join(port_file, sizeof port_file, u->dir, "port")) != 0 ||
        (err = mg_test_path_join(u->log, sizeof u->log, u->dir, "upstream.log")) != 0)
        goto fail;
    if (capture && ((err = mg_test_path_join(u->capture, sizeof u->capture, u->dir,
                                             "capture")) != 0 ||
                    mkdir(u->capture, 0700) != 0)) {
        err = err ? err : -errno;
        goto fail;
    }

    char *argv[] = { bin, "-l", "127.0.0.1:0", "--port-file", port_file,
                     capture ? "--capture" : NULL, u->capture, NULL };
    mg_test_spawn_opts_t so = { .stdout_path = u->log, .stderr_path = u->log };
    if ((err = mg_test_proc_spawn(&u->proc, argv, &so)) != 0)
        goto fail;

    /* The port file appears (by rename, whole) only once the socket listens. */
    double deadline = mg_test_now_ms() + 5000;
    while (mg_test_read_file(port_file, &text, NULL) != 0) {
        if (mg_test_proc_wait(&u->proc, 0) == 0) {
            err = MG_ECLOSED;
            goto fail;
        }
        if (mg_test_now_ms() >= deadline) {
            err = MG_ETIMEDOUT;
            goto fail;
        }
        mg_test_sleep_ms(2);
    }
    int port = atoi(text);
    free(text);
    if (port <= 0 || port > 65535) {
        err = MG_EINVAL;
        goto fail;
    }
    u->port = (uint16_t)port;
    u->pid = u->proc.pid;
    return 0;

fail:
    if (mg_test_read_file(u->log, &text, NULL) == 0) {
        fprintf(stderr, "--- %s ---\n%s--- end ---\n", u->log, text);
        free(text);
    }
    mg_test_proc_stop(&u->proc, 1000);
    mg_test_rm_rf(u->dir);
    mg_test_forget_dir(u->dir);
    u->dir[0] = '\0';
    return err;
}

int mg_test_upstream_stop(mg_test_upstream_t *u)
{
    if (u->pid > 0) {
        mg_test_proc_stop(&u->proc, 5000);
        u->pid = 0;
        /* A sanitizer report or a crash in mg-upstream would otherwise vanish with its dir. */
        int code = mg_test_proc_exit_code(&u->proc);
        char *text = NULL;
        if (code != 0 && mg_test_read_file(u->log, &text, NULL) == 0) {
            fprintf(stderr, "mg-upstream exited with %d\n--- %s ---\n%s--- end ---\n", code,
                    u->log, text);
            free(text);
        }
    }
    if (u->dir[0] != '\0') {
        mg_test_rm_rf(u->dir);
        mg_test_forget_dir(u->dir);
        u->dir[0] = '\0';
    }
    return 0;
}

/* The unsigned number after "\"key\":" in json, or -1. */
static long long json_number(const char *json, const char *key)
{
    char pat[64];
    snprintf(pat, sizeof pat, "\"%s\":", key);
    const char *p = strstr(json, pat);
    return p ? strtoll(p + strlen(pat), NULL, 10) : -1;
}

int mg_test_upstream_stats(const mg_test_upstream_t *u, mg_test_upstream_stats_t *st)
{
    static const char req[] = "GET /stats HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n";
    mg_test_http_response_t r;
    mg_test_http_response_init(&r);
    r.keep_body = true;
    int err = mg_test_http_fetch(u->port, req, sizeof req - 1, &r, 2000);
    if (err == 0 && (r.status != 200 || r.body == NULL))
        err = MG_EINVAL;
    if (err == 0) {
        long long v[5] = {
            json_number(r.body, "connections_accepted"), json_number(r.body, "connections_closed"),
            json_number(r.body, "connections_open"), json_number(r.body, "requests_served"),
            json_number(r.body, "aborted_responses"),
        };
        for (int i = 0; i < 5; i++)
            if (v[i] < 0)
                err = MG_EINVAL;
        st->connections_accepted = (uint64_t)v[0];
        st->connections_closed = (uint64_t)v[1];
        st->connections_open = (uint64_t)v[2];
        st->requests_served = (uint64_t)v[3];
        st->aborted_responses = (uint64_t)v[4];
    }
    mg_test_http_response_free(&r);
    return err;
}

int mg_test_upstream_start(mg_test_upstream_t *u)
{
    return start(u, false);
}

int mg_test_upstream_start_capture(mg_test_upstream_t *u)
{
    return start(u, true);
}

/* The capture files' numbers, in order. Returns how many (at most cap). */
static size_t capture_files(const mg_test_upstream_t *u, unsigned long *ids, size_t cap)
{
    size_t n = 0;
    DIR *d = opendir(u->capture);
    if (d == NULL)
        return 0;
    struct dirent *de;
    while ((de = readdir(d)) != NULL && n < cap) {
        char *end;
        unsigned long id = strtoul(de->d_name, &end, 10);
        if (end != de->d_name && strcmp(end, ".raw") == 0)
            ids[n++] = id;
    }
    closedir(d);
    for (size_t i = 1; i < n; i++)
        for (size_t j = i; j > 0 && ids[j - 1] > ids[j]; j--) {
            unsigned long t = ids[j];
            ids[j] = ids[j - 1];
            ids[j - 1] = t;
        }
    return n;
}

int mg_test_upstream_captured(const mg_test_upstream_t *u, char **out, size_t *len)
{
    enum { MAX_FILES = 4096 };
    static unsigned long ids[MAX_FILES];
    size_t n = capture_files(u, ids, MAX_FILES), total = 0;
    char *all = malloc(1);
    if (all == NULL)
        return MG_ENOMEM;
    for (size_t i = 0; i < n; i++) {
        char path[MG_TEST_PATH_MAX + 32], *data = NULL;
        size_t dlen = 0;
        snprintf(path, sizeof path, "%s/%lu.raw", u->capture, ids[i]);
        if (mg_test_read_file(path, &data, &dlen) != 0)
            continue;
        char *grown = realloc(all, total + dlen + 1);
        if (grown == NULL) {
            free(data);
            free(all);
            return MG_ENOMEM;
        }
        all = grown;
        memcpy(all + total, data, dlen);
        total += dlen;
        free(data);
    }
    all[total] = '\0';
    *out = all;
    if (len)
        *len = total;
    return 0;
}

int mg_test_upstream_capture_clear(const mg_test_upstream_t *u)
{
    enum { MAX_FILES = 4096 };
    static unsigned long ids[MAX_FILES];
    size_t n = capture_files(u, ids, MAX_FILES);
    for (size_t i = 0; i < n; i++) {
        char path[MG_TEST_PATH_MAX + 32];
        snprintf(path, sizeof path, "%s/%lu.raw", u->capture, ids[i]);
        /* A connection still open keeps writing to its file: empty it rather than unlink. */
        if (truncate(path, 0) != 0)
            return -errno;
    }
    return 0;
}
