/*
 * gate: bounded concurrency for one costly step, with a bounded first-come first-served queue of
 * those waiting for their turn. The pool passes every new SSH connection through one gate, so
 * that a herd of users arriving at once (a gateway restart, a morning peak) runs at most
 * max_running handshakes together and the rest wait in arrival order, instead of starting them
 * all and having them time out together (sshd's MaxStartups makes the same choice on the other
 * side).
 *
 * A ticket that enters while a slot is free runs at once. Otherwise it waits at the tail of the
 * queue, or is refused when max_queued are already waiting. When a running ticket leaves, the
 * slot goes to the head of the queue: the grant callback is told, inside mg__gate_leave(), so it
 * must only note the grant (the pool arms a timer) and not call back into the gate. A waiting
 * ticket may leave at any time (whoever wanted it gave up), which frees its place and grants
 * nothing.
 *
 * The gate keeps no deadlines: whoever holds a ticket decides how long it may wait, and leaves.
 * It allocates nothing; tickets live in their owners' memory. Internal to the pool.
 */
#ifndef MOONGATE_POOL_GATE_H
#define MOONGATE_POOL_GATE_H

#include "moongate/list.h"

#include <stdbool.h>
#include <stdint.h>

typedef struct mg__gate mg__gate_t;
typedef struct mg__gate_ticket mg__gate_ticket_t;

typedef enum mg__gate_state {
    MG__GATE_OUT = 0, /* not in the gate: never entered, refused, or left */
    MG__GATE_QUEUED,  /* waiting for a slot */
    MG__GATE_RUNNING, /* holds a slot */
} mg__gate_state_t;

struct mg__gate_ticket {
    /* read-only */
    mg__gate_state_t state;
    uint64_t entered_at;  /* the caller's clock at mg__gate_enter() */
    /* private */
    mg_list_t node;
};

/* A slot went to t, which was waiting. Runs inside mg__gate_leave() of the ticket that left. */
typedef void (*mg__gate_grant_fn)(mg__gate_t *g, mg__gate_ticket_t *t, void *arg);

struct mg__gate {
    /* read-only */
    int max_running;       /* 0: no bound (every ticket runs at once) */
    int max_queued;
    int running;
    int queued;
    int peak_running;      /* the most that ever ran at once */
    uint64_t refused;      /* tickets refused for a full queue */
    /* private */
    mg_list_t queue;       /* the waiting tickets, the oldest first */
    mg__gate_grant_fn on_grant;
    void *arg;
};

/* Sets up an empty gate. max_running 0 means no bound; max_queued 0 means none waits. */
void mg__gate_init(mg__gate_t *g, int max_running, int max_queued, mg__gate_grant_fn on_grant,
                   void *arg);

/* A ticket that is in no gate. */
void mg__gate_ticket_init(mg__gate_ticket_t *t);

/*
 * t enters the gate at time now. Returns 0 (t runs now), MG_EAGAIN (t waits; the grant callback
 * says when it runs), MG_EQUEUEFULL (refused: max_queued are waiting; t stays out) or MG_ESTATE
 * (t is in the gate already).
 */
int mg__gate_enter(mg__gate_t *g, mg__gate_ticket_t *t, uint64_t now);

/*
 * t leaves: a waiting one gives up its place, a running one its slot, which goes to the oldest
 * waiting ticket (granted before this returns). A ticket that is out is left alone.
 */
void mg__gate_leave(mg__gate_t *g, mg__gate_ticket_t *t);

/* Whether a slot is free now, with nobody waiting for it. */
bool mg__gate_has_room(const mg__gate_t *g);

#endif
