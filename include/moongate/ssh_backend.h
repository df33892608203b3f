/*
 * ssh_backend: the pool backend that makes real SSH connections.
 *
 * The pool decides when a user needs another connection; this backend starts an mg_ssh_conn_t
 * for it and reports its progress back (ready, health, failure, close). The open_arg of
 * mg_pool_acquire() is a `const mg_ssh_conn_opts_t *` saying where and how to connect (the
 * policy's route for that user); it is copied when a connection opens.
 *
 * A lease from the pool is one channel slot: open one channel on mg_ssh_backend_conn(lease)
 * and release the lease in that channel's on_close, not before, so the slot is free in the
 * SSH session by the time the pool hands it out again.
 */
#ifndef MOONGATE_SSH_BACKEND_H
#define MOONGATE_SSH_BACKEND_H

#include "moongate/pool.h"
#include "moongate/ssh_conn.h"

typedef struct mg_ssh_backend {
    uv_loop_t *loop;
    /* How long a non-forced close waits for a connection's channels before ending them. */
    uint64_t close_wait_ms;
    /* Optional: told of every connection event, after the pool (metrics, policy events). */
    void (*observer)(void *arg, mg_ssh_conn_t *c, mg_ssh_event_t ev);
    void *observer_arg;
    /*
     * For routes with opts->agent: start the connection over one of the user's agent
     * WebSockets, now or when one arrives, as mg_ssh_conn_start(loop, opts, transport, cb, pc)
     * followed by mg_pool_conn_set_backend_data(pc, conn); or report mg_pool_conn_failed(pc)
     * later. Returns 0, or an error with a message (no agent connected, ...).
     */
    int (*agent_open)(void *arg, mg_pool_conn_t *pc, const mg_ssh_conn_opts_t *opts,
                      mg_ssh_conn_cb cb, char *err, size_t errlen);
    /* The pool closes pc before agent_open started its connection. */
    void (*agent_cancel)(void *arg, mg_pool_conn_t *pc);
    void *agent_arg;
} mg_ssh_backend_t;

extern const mg_pool_backend_t mg_ssh_pool_backend;

/* Sets up a backend context for mg_pool_new(loop, settings, &mg_ssh_pool_backend, b, ...). */
void mg_ssh_backend_init(mg_ssh_backend_t *b, uv_loop_t *loop, const mg_settings_t *settings);

/* The SSH connection behind a lease (or any ready pool connection). */
mg_ssh_conn_t *mg_ssh_backend_conn(const mg_pool_conn_t *pc);

#endif
