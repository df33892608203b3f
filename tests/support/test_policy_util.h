/*
 * Helpers shared by the policy tests: policy files in a temporary directory, a captured stderr
 * (to check what was logged), requests, and running the loop for a while.
 */
#ifndef MG_TEST_POLICY_UTIL_H
#define MG_TEST_POLICY_UTIL_H

#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#include "moongate/error.h"
#include "moongate/log.h"
#include "moongate/policy.h"
#include "policy/policy_int.h"

#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <uv.h>


/* The test directory (made on first use), the loop the policies run on, and the clock they read
   (tp_clock: set tp_clock_ms to move it). */
extern char tp_dir[256];
extern uv_loop_t tp_loop;
extern uint64_t tp_clock_ms;

void tp_mkdir(void);

/* Writes content to name in the test directory; returns the path (static, one per name slot). */
const char *tp_write(const char *name, const char *content);

void tp_cleanup_dir(void);

/* ---- stderr capture ---- */


void tp_capture_begin(void);

/* Returns what was written to stderr since tp_capture_begin() (free it), and echoes it. */
char *tp_capture_end(void);

int tp_count(const char *hay, const char *needle);

/* ---- policies ---- */


mg_policy_t *tp_policy_opts(const char *path, void (*tweak)(mg_policy_options_t *));

mg_policy_t *tp_policy(const char *path);

/* Loads source as a policy file named name. */
mg_policy_t *tp_policy_src(const char *name, const char *src);

/* Frees the policy and runs the loop until its timer handles are closed. */
void tp_free(mg_policy_t *p);

void tp_stop_cb(uv_timer_t *t);

/* Runs the loop for ms milliseconds. */
void tp_run_for(uint64_t ms);

int tp_setup(void **state);

int tp_teardown(void **state);

/* A request with an optional bearer token. */
typedef struct tp_req {
    mg_policy_header_t headers[4];
    char auth[600];
    mg_policy_request_t req;
} tp_req_t;

const mg_policy_request_t *tp_request(tp_req_t *r, const char *token);

/* Runs authenticate on the current state. */
int tp_auth(mg_policy_t *p, const char *token, mg_policy_decision_t *d);

int tp_admit(mg_policy_t *p, const char *user, mg_policy_decision_t *d);

const char *tp_header(const mg_policy_decision_t *d, const char *name);

/* A controllable clock: reads tp_clock_ms. */
uint64_t tp_clock(void *ctx);

/* ---- JWTs ---- */

#include <openssl/evp.h>
#include <openssl/hmac.h>

void b64url(const unsigned char *in, size_t n, char *out);

/* Signs header.payload with secret into out. */
void make_jwt(const char *header, const char *payload, const char *secret, char *out);

#endif
