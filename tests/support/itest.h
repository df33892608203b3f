/*
 * Shared pieces of the integration tests: running the loop until something happens (always
 * with a deadline), an SSH connection whose events are recorded, and an HTTP exchange over one
 * channel that writes with backpressure and parses (and hashes) the response as it streams.
 */
#ifndef MG_ITEST_H
#define MG_ITEST_H

#include "http_client.h"
#include "proc.h"
#include "sshd.h"
#include "upstream.h"

#include "moongate/error.h"
#include "moongate/ssh_conn.h"

#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <cmocka.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---- the loop ---- */

typedef bool (*itest_cond_fn)(void *arg);

void itest_wake(uv_timer_t *t);

/* Runs the loop until cond(arg) holds or timeout_ms pass. Returns whether cond held. */
bool itest_run_until(uv_loop_t *loop, itest_cond_fn cond, void *arg, int timeout_ms);

bool itest_flag(void *arg);

/* Runs the loop for ms, whatever happens. */
void itest_run_for(uv_loop_t *loop, int ms);

/* Closes every handle left and runs the loop dry; fails the test if anything stays open. */
void itest_loop_close(uv_loop_t *loop);

/* Waits (1 s at most) until the file at path contains needle, e.g. a line in sshd's log. */
bool itest_file_contains(const char *path, const char *needle);

/* ---- one SSH connection ---- */

typedef struct itest_conn {
    mg_ssh_conn_t *c;
    bool ready;
    bool closed;
    bool healthy;
    int health_changes;
    int status;
    char error[512];
} itest_conn_t;

void itest_conn_event(mg_ssh_conn_t *c, mg_ssh_event_t ev, void *data);

bool itest_conn_settled(void *arg);

bool itest_conn_closed(void *arg);

/* Route options for the test sshd with quick, test-sized timers. */
void itest_opts(mg_ssh_conn_opts_t *o, const mg_test_sshd_t *sshd);

/* Starts a connection and runs the loop until it is ready or has failed. */
void itest_connect(uv_loop_t *loop, const mg_ssh_conn_opts_t *o, itest_conn_t *ic);

void itest_disconnect(uv_loop_t *loop, itest_conn_t *ic);

/* ---- one HTTP exchange over a channel ---- */

typedef struct itest_fetch {
    mg_ssh_chan_t *ch;
    /* the request: head, then body_len bytes of the deterministic stream */
    char *head;
    size_t head_len, head_off;
    uint64_t body_len, body_off;
    mg_test_stream_t body_gen;
    mg_test_sha256_t body_sha;
    char body_sha_hex[65];
    bool stop_reading;         /* leave reading off once the head has arrived (flow tests) */
    mg_test_http_response_t resp;
    bool opened, eof, closed;
    int open_status, close_status;
    int write_eagains;
    double chunk_times[512];   /* arrival time of each on_data, for timing checks */
    int n_chunk_times;
} itest_fetch_t;


void itest_on_open(mg_ssh_chan_t *ch, int status);

void itest_on_data(mg_ssh_chan_t *ch, const char *buf, size_t len);

void itest_on_eof(mg_ssh_chan_t *ch);

void itest_on_writable(mg_ssh_chan_t *ch);

void itest_on_close(mg_ssh_chan_t *ch, int status);


/* Writes as much of the request as the channel takes; on_writable resumes it. */
void itest_fetch_pump(itest_fetch_t *f);

/*
 * Starts method path on a new channel of c to 127.0.0.1:target_port; with body_len > 0 the body
 * is that many bytes of the deterministic stream. The response is hashed, not kept, unless
 * keep_body.
 */
int itest_fetch_start(itest_fetch_t *f, mg_ssh_conn_t *c, uint16_t target_port,
               const char *method, const char *path, uint64_t body_len,
               bool keep_body);

bool itest_fetch_closed(void *arg);

void itest_fetch_free(itest_fetch_t *f);

#endif
