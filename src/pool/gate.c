/*
 * gate: see gate.h. A counter of running tickets and one list of waiting ones, the oldest
 * first. Slots are handed out eagerly: whenever one frees, it goes at once to the oldest waiting
 * ticket that can run. So a free slot means no waiting ticket can take it, and a ticket that
 * enters may run at once whenever it can, without overtaking anyone who could have. Groups
 * sit in a small hash table, each counted by the tickets in the gate that belong to it.
 */
#include "gate.h"

#include "moongate/error.h"

#include <stdlib.h>
#include <string.h>

struct mg__gate_group {
    mg__gate_group_t *next; /* hash chain */
    uint32_t hash;
    int running;
    int refs;               /* tickets in the gate (running or queued) of this group */
    char name[];
};

static uint32_t hash_name(const char *s)
{
    uint32_t h = 2166136261u; /* FNV-1a */
    for (; *s; s++)
        h = (h ^ (uint8_t)*s) * 16777619u;
    return h;
}

void mg__gate_init(mg__gate_t *g, int max_running, int max_queued, int group_max,
                   mg__gate_grant_fn on_grant, void *arg)
{
    *g = (mg__gate_t){
        .max_running = max_running > 0 ? max_running : 0,
        .max_queued = max_queued > 0 ? max_queued : 0,
        .group_max = group_max > 0 ? group_max : 0,
        .on_grant = on_grant,
        .arg = arg,
    };
    mg_list_init(&g->queue);
}

void mg__gate_destroy(mg__gate_t *g)
{
    for (size_t b = 0; b < MG__GATE_GROUP_BUCKETS; b++) {
        while (g->groups[b] != NULL) {
            mg__gate_group_t *grp = g->groups[b];
            g->groups[b] = grp->next;
            free(grp);
        }
    }
    mg_list_init(&g->queue);
    g->running = g->queued = 0;
}

void mg__gate_ticket_init(mg__gate_ticket_t *t)
{
    *t = (mg__gate_ticket_t){ .state = MG__GATE_OUT };
    mg_list_init(&t->node);
}

static mg__gate_group_t *group_find(const mg__gate_t *g, const char *name, uint32_t h)
{
    for (mg__gate_group_t *grp = g->groups[h % MG__GATE_GROUP_BUCKETS]; grp; grp = grp->next) {
        if (grp->hash == h && strcmp(grp->name, name) == 0)
            return grp;
    }
    return NULL;
}

/* The group named name with one more reference, made if need be; NULL without a name or memory. */
static mg__gate_group_t *group_ref(mg__gate_t *g, const char *name)
{
    if (name == NULL || name[0] == '\0' || g->group_max == 0)
        return NULL;
    size_t len = strnlen(name, MG__GATE_GROUP_NAME_MAX);
    char cut[MG__GATE_GROUP_NAME_MAX + 1];
    memcpy(cut, name, len);
    cut[len] = '\0';
    uint32_t h = hash_name(cut);
    mg__gate_group_t *grp = group_find(g, cut, h);
    if (grp == NULL) {
        grp = calloc(1, sizeof(*grp) + len + 1);
        if (grp == NULL)
            return NULL;
        grp->hash = h;
        memcpy(grp->name, cut, len + 1);
        grp->next = g->groups[h % MG__GATE_GROUP_BUCKETS];
        g->groups[h % MG__GATE_GROUP_BUCKETS] = grp;
    }
    grp->refs++;
    return grp;
}

static void group_unref(mg__gate_t *g, mg__gate_group_t *grp)
{
    if (grp == NULL || --grp->refs > 0)
        return;
    mg__gate_group_t **pp = &g->groups[grp->hash % MG__GATE_GROUP_BUCKETS];
    while (*pp != grp)
        pp = &(*pp)->next;
    *pp = grp->next;
    free(grp);
}

int mg__gate_group_running(const mg__gate_t *g, const char *name)
{
    const mg__gate_group_t *grp = name ? group_find(g, name, hash_name(name)) : NULL;
    return grp ? grp->running : 0;
}

static bool gate_free(const mg__gate_t *g)
{
    return g->max_running == 0 || g->running < g->max_running;
}

static bool group_free(const mg__gate_t *g, const mg__gate_group_t *grp)
{
    return grp == NULL || grp->running < g->group_max;
}

static void run(mg__gate_t *g, mg__gate_ticket_t *t)
{
    t->state = MG__GATE_RUNNING;
    g->running++;
    if (t->group != NULL)
        t->group->running++;
    if (g->running > g->peak_running)
        g->peak_running = g->running;
}

int mg__gate_enter(mg__gate_t *g, mg__gate_ticket_t *t, const char *group, uint64_t now)
{
    if (t->state != MG__GATE_OUT)
        return MG_ESTATE;
    t->entered_at = now;
    t->group = group_ref(g, group);
    if (gate_free(g) && group_free(g, t->group)) {
        run(g, t);
        return 0;
    }
    if (g->queued >= g->max_queued) {
        g->refused++;
        group_unref(g, t->group);
        t->group = NULL;
        return MG_EQUEUEFULL;
    }
    t->state = MG__GATE_QUEUED;
    mg_list_insert_tail(&g->queue, &t->node);
    g->queued++;
    return MG_EAGAIN;
}

/* The oldest waiting ticket that can run now, or NULL. */
static mg__gate_ticket_t *next_runnable(const mg__gate_t *g)
{
    if (!gate_free(g))
        return NULL;
    mg_list_t *n;
    mg_list_foreach(n, &g->queue) {
        mg__gate_ticket_t *t = mg_list_entry(n, mg__gate_ticket_t, node);
        if (group_free(g, t->group))
            return t;
    }
    return NULL;
}

void mg__gate_leave(mg__gate_t *g, mg__gate_ticket_t *t)
{
    if (t->state == MG__GATE_OUT)
        return;
    bool was_running = t->state == MG__GATE_RUNNING;
    if (was_running) {
        g->running--;
        if (t->group != NULL)
            t->group->running--;
    } else {
        mg_list_remove(&t->node);
        g->queued--;
    }
    t->state = MG__GATE_OUT;
    group_unref(g, t->group);
    t->group = NULL;
    if (!was_running)
        return;
    /* One slot freed (and one of a group): at most one waiting ticket can run for it. */
    mg__gate_ticket_t *next = next_runnable(g);
    if (next == NULL)
        return;
    mg_list_remove(&next->node);
    g->queued--;
    run(g, next);
    if (g->on_grant != NULL)
        g->on_grant(g, next, g->arg);
}
