/*
 * gate: see gate.h. A counter of running tickets and one list of waiting ones; a slot passes
 * from a ticket that leaves straight to the head of the list, so nobody who arrived later can
 * take it first.
 */
#include "gate.h"

#include "moongate/error.h"

void mg__gate_init(mg__gate_t *g, int max_running, int max_queued, mg__gate_grant_fn on_grant,
                   void *arg)
{
    *g = (mg__gate_t){
        .max_running = max_running > 0 ? max_running : 0,
        .max_queued = max_queued > 0 ? max_queued : 0,
        .on_grant = on_grant,
        .arg = arg,
    };
    mg_list_init(&g->queue);
}

void mg__gate_ticket_init(mg__gate_ticket_t *t)
{
    *t = (mg__gate_ticket_t){ .state = MG__GATE_OUT };
    mg_list_init(&t->node);
}

bool mg__gate_has_room(const mg__gate_t *g)
{
    return g->queued == 0 && (g->max_running == 0 || g->running < g->max_running);
}

static void run(mg__gate_t *g, mg__gate_ticket_t *t)
{
    t->state = MG__GATE_RUNNING;
    g->running++;
    if (g->running > g->peak_running)
        g->peak_running = g->running;
}

int mg__gate_enter(mg__gate_t *g, mg__gate_ticket_t *t, uint64_t now)
{
    if (t->state != MG__GATE_OUT)
        return MG_ESTATE;
    t->entered_at = now;
    if (mg__gate_has_room(g)) {
        run(g, t);
        return 0;
    }
    if (g->queued >= g->max_queued) {
        g->refused++;
        return MG_EQUEUEFULL;
    }
    t->state = MG__GATE_QUEUED;
    mg_list_insert_tail(&g->queue, &t->node);
    g->queued++;
    return MG_EAGAIN;
}

void mg__gate_leave(mg__gate_t *g, mg__gate_ticket_t *t)
{
    if (t->state == MG__GATE_QUEUED) {
        mg_list_remove(&t->node);
        g->queued--;
        t->state = MG__GATE_OUT;
        return;
    }
    if (t->state != MG__GATE_RUNNING)
        return;
    t->state = MG__GATE_OUT;
    g->running--;
    /* One slot freed, one grant (a bound lowered meanwhile is not a case: it is fixed). */
    mg_list_t *n = mg_list_first(&g->queue);
    if (n == NULL || (g->max_running > 0 && g->running >= g->max_running))
        return;
    mg__gate_ticket_t *next = mg_list_entry(n, mg__gate_ticket_t, node);
    mg_list_remove(&next->node);
    g->queued--;
    run(g, next);
    if (g->on_grant != NULL)
        g->on_grant(g, next, g->arg);
}
