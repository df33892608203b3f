/*
 * gate: bounded concurrency for one costly step, with a bounded first-come first-served queue of
 * those waiting for their turn. The pool passes every new SSH connection through one gate, so
 * that a herd of users arriving at once (a gateway restart, a morning peak) runs a bounded
 * number of handshakes together and the rest wait in arrival order, instead of starting them
 * all and having them time out together.
 *
 * Two bounds apply: max_running over the whole gate (the gateway's own CPU), and group_max per
 * named group (the pool names a group after the SSH server a connection dials, whose
 * MaxStartups would drop the surplus: OpenSSH's default starts refusing at 10 unauthenticated
 * connections). A ticket runs only while both have a free slot.
 *
 * A ticket that enters while it could run runs at once. Otherwise it waits at the tail of the
 * queue, or is refused when max_queued are already waiting. When a running ticket leaves, its
 * slot goes to the oldest waiting ticket that can run (first come, first served among those
 * that can; one server's backlog does not hold up the others). The grant callback is told
 * inside mg__gate_leave(), so it must only note the grant (the pool arms a timer) and not call
 * back into the gate. A waiting ticket may leave at any time (whoever wanted it gave up), which
 * frees its place and grants nothing.
 *
 * The gate keeps no deadlines: whoever holds a ticket decides how long it may wait, and leaves.
 * Tickets live in their owners' memory; the gate allocates only its named groups, each while a
 * ticket in the gate belongs to it. Internal to the pool.
 */
#ifndef MOONGATE_POOL_GATE_H
#define MOONGATE_POOL_GATE_H

#include "moongate/list.h"

#include <stdbool.h>
#include <stdint.h>

#define MG__GATE_GROUP_BUCKETS 64
#define MG__GATE_GROUP_NAME_MAX 300

typedef struct mg__gate mg__gate_t;
typedef struct mg__gate_ticket mg__gate_ticket_t;
typedef struct mg__gate_group mg__gate_group_t;

typedef enum mg__gate_state {
    MG__GATE_OUT = 0, /* not in the gate: never entered, refused, or left */
    MG__GATE_QUEUED,  /* waiting for a slot */
    MG__GATE_RUNNING, /* holds a slot */
} mg__gate_state_t;

struct mg__gate_ticket {
    /* read-only */
    mg__gate_state_t state;
    uint64_t entered_at;     /* the caller's clock at mg__gate_enter() */
    mg__gate_group_t *group; /* while in the gate; NULL: none */
    /* private */
    mg_list_t node;
};

/* A slot went to t, which was waiting. Runs inside mg__gate_leave() of the ticket that left. */
typedef void (*mg__gate_grant_fn)(mg__gate_t *g, mg__gate_ticket_t *t, void *arg);

struct mg__gate {
    /* read-only */
    int max_running;       /* 0: no bound (every ticket runs at once, as far as its group goes) */
    int max_queued;
    int group_max;         /* 0: groups have no bound */
    int running;
    int queued;
    int peak_running;      /* the most that ever ran at once */
    uint64_t refused;      /* tickets refused for a full queue */
    /* private */
    mg_list_t queue;       /* the waiting tickets, the oldest first */
    mg__gate_group_t *groups[MG__GATE_GROUP_BUCKETS];
    mg__gate_grant_fn on_grant;
    void *arg;
};

/*
 * Sets up an empty gate. max_running 0 means no bound; max_queued 0 means none waits;
 * group_max 0 means no bound per group.
 */
void mg__gate_init(mg__gate_t *g, int max_running, int max_queued, int group_max,
                   mg__gate_grant_fn on_grant, void *arg);

/* Frees what the gate still holds (groups of tickets never let out); the tickets are forgotten. */
void mg__gate_destroy(mg__gate_t *g);

/* A ticket that is in no gate. */
void mg__gate_ticket_init(mg__gate_ticket_t *t);

/*
 * t enters the gate at time now, in the group named group (NULL or "": none; a name is cut at
 * MG__GATE_GROUP_NAME_MAX bytes). Returns 0 (t runs now), MG_EAGAIN (t waits; the grant
 * callback says when it runs), MG_EQUEUEFULL (refused: max_queued are waiting; t stays out) or
 * MG_ESTATE (t is in the gate already). A group that cannot be allocated is left out: t is
 * then bounded by the gate alone.
 */
int mg__gate_enter(mg__gate_t *g, mg__gate_ticket_t *t, const char *group, uint64_t now);

/*
 * t leaves: a waiting one gives up its place, a running one its slot (and its group's), which
 * goes to the oldest waiting ticket that can run (granted before this returns). A ticket that
 * is out is left alone.
 */
void mg__gate_leave(mg__gate_t *g, mg__gate_ticket_t *t);

/* How many tickets of the group named name run now (0 for a name no ticket in the gate has). */
int mg__gate_group_running(const mg__gate_t *g, const char *name);

#endif
