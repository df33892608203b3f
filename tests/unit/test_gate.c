/*
 * Unit tests for src/pool/gate.c: the bounds (the gate's and a group's), the order of grants,
 * refusals, and tickets that leave while waiting. The gate keeps no time of its own, so nothing here waits.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "pool/gate.h"

#include "moongate/error.h"

#define N 8

typedef struct grants {
    mg__gate_ticket_t *order[64]; /* the tickets granted, in the order they were */
    int n;
} grants_t;

static void on_grant(mg__gate_t *g, mg__gate_ticket_t *t, void *arg)
{
    grants_t *gr = arg;
    assert_int_equal(t->state, MG__GATE_RUNNING);
    assert_true(gr->n < 64);
    gr->order[gr->n++] = t;
}

static void init_tickets(mg__gate_ticket_t *t, int n)
{
    for (int i = 0; i < n; i++)
        mg__gate_ticket_init(&t[i]);
}

static void test_bound_and_fifo(void **state)
{
    mg__gate_t g;
    grants_t gr = { 0 };
    mg__gate_ticket_t t[N];
    init_tickets(t, N);
    mg__gate_init(&g, 2, 10, 0, on_grant, &gr);

    assert_int_equal(mg__gate_enter(&g, &t[0], NULL, 100), 0);
    assert_int_equal(mg__gate_enter(&g, &t[1], NULL, 101), 0);
    for (int i = 2; i < N; i++)
        assert_int_equal(mg__gate_enter(&g, &t[i], NULL, 100 + i), MG_EAGAIN);
    assert_int_equal(g.running, 2);
    assert_int_equal(g.queued, N - 2);
    assert_int_equal(t[5].entered_at, 105);

    /* Each slot that frees goes to the oldest waiting ticket, one at a time. */
    mg__gate_leave(&g, &t[1]);
    assert_int_equal(gr.n, 1);
    assert_ptr_equal(gr.order[0], &t[2]);
    mg__gate_leave(&g, &t[0]);
    mg__gate_leave(&g, &t[2]);
    assert_int_equal(gr.n, 3);
    assert_ptr_equal(gr.order[1], &t[3]);
    assert_ptr_equal(gr.order[2], &t[4]);
    assert_int_equal(g.running, 2);
    assert_int_equal(g.peak_running, 2);
    for (int i = 3; i < N; i++)
        mg__gate_leave(&g, &t[i]);
    assert_int_equal(gr.n, N - 2);
    assert_ptr_equal(gr.order[N - 3], &t[N - 1]);
    assert_int_equal(g.running, 0);
    assert_int_equal(g.queued, 0);
}

static void test_full_queue_refuses(void **state)
{
    mg__gate_t g;
    grants_t gr = { 0 };
    mg__gate_ticket_t t[4];
    init_tickets(t, 4);
    mg__gate_init(&g, 1, 2, 0, on_grant, &gr);

    assert_int_equal(mg__gate_enter(&g, &t[0], NULL, 0), 0);
    assert_int_equal(mg__gate_enter(&g, &t[1], NULL, 0), MG_EAGAIN);
    assert_int_equal(mg__gate_enter(&g, &t[2], NULL, 0), MG_EAGAIN);
    assert_int_equal(mg__gate_enter(&g, &t[3], NULL, 0), MG_EQUEUEFULL);
    assert_int_equal(t[3].state, MG__GATE_OUT);
    assert_int_equal(g.refused, 1);
    /* A refused ticket's leave is a no-op: no slot, no place. */
    mg__gate_leave(&g, &t[3]);
    assert_int_equal(g.running, 1);
    assert_int_equal(g.queued, 2);
    /* A place that frees takes one more. */
    mg__gate_leave(&g, &t[2]);
    assert_int_equal(gr.n, 0);
    assert_int_equal(mg__gate_enter(&g, &t[3], NULL, 0), MG_EAGAIN);
    assert_int_equal(mg__gate_enter(&g, &t[3], NULL, 0), MG_ESTATE);
    mg__gate_leave(&g, &t[0]);
    assert_ptr_equal(gr.order[0], &t[1]);
    mg__gate_leave(&g, &t[1]);
    assert_ptr_equal(gr.order[1], &t[3]);
    mg__gate_leave(&g, &t[3]);
    assert_int_equal(g.running + g.queued, 0);
}

static void test_leave_while_queued(void **state)
{
    mg__gate_t g;
    grants_t gr = { 0 };
    mg__gate_ticket_t t[4];
    init_tickets(t, 4);
    mg__gate_init(&g, 1, 10, 0, on_grant, &gr);

    assert_int_equal(mg__gate_enter(&g, &t[0], NULL, 0), 0);
    for (int i = 1; i < 4; i++)
        assert_int_equal(mg__gate_enter(&g, &t[i], NULL, 0), MG_EAGAIN);
    /* The middle one gives up: the slot skips it. Leaving twice changes nothing. */
    mg__gate_leave(&g, &t[2]);
    mg__gate_leave(&g, &t[2]);
    assert_int_equal(gr.n, 0);
    assert_int_equal(g.queued, 2);
    mg__gate_leave(&g, &t[0]);
    mg__gate_leave(&g, &t[1]);
    assert_int_equal(gr.n, 2);
    assert_ptr_equal(gr.order[0], &t[1]);
    assert_ptr_equal(gr.order[1], &t[3]);
    assert_int_equal(t[2].state, MG__GATE_OUT);
    mg__gate_leave(&g, &t[3]);
    assert_int_equal(g.running + g.queued, 0);
}

static void test_no_bound(void **state)
{
    mg__gate_t g;
    mg__gate_ticket_t t[N];
    init_tickets(t, N);
    mg__gate_init(&g, 0, 0, 0, NULL, NULL);
    for (int i = 0; i < N; i++)
        assert_int_equal(mg__gate_enter(&g, &t[i], NULL, 0), 0);
    assert_int_equal(g.peak_running, N);
    for (int i = 0; i < N; i++)
        mg__gate_leave(&g, &t[i]);
    assert_int_equal(g.running, 0);
}

static void test_no_queue(void **state)
{
    mg__gate_t g;
    mg__gate_ticket_t t[2];
    init_tickets(t, 2);
    mg__gate_init(&g, 1, 0, 0, NULL, NULL);
    assert_int_equal(mg__gate_enter(&g, &t[0], NULL, 0), 0);
    assert_int_equal(mg__gate_enter(&g, &t[1], NULL, 0), MG_EQUEUEFULL);
    mg__gate_leave(&g, &t[0]);
    assert_int_equal(mg__gate_enter(&g, &t[1], NULL, 0), 0);
    mg__gate_leave(&g, &t[1]);
}

static void test_groups(void **state)
{
    mg__gate_t g;
    grants_t gr = { 0 };
    mg__gate_ticket_t t[6];
    init_tickets(t, 6);
    /* Three at once in all, two at once with any one server. */
    mg__gate_init(&g, 3, 10, 2, on_grant, &gr);

    assert_int_equal(mg__gate_enter(&g, &t[0], "a:22", 0), 0);
    assert_int_equal(mg__gate_enter(&g, &t[1], "a:22", 0), 0);
    assert_int_equal(mg__gate_enter(&g, &t[2], "a:22", 0), MG_EAGAIN); /* a is full */
    assert_int_equal(mg__gate_enter(&g, &t[3], "b:22", 0), 0);         /* b is not: overtakes */
    assert_int_equal(mg__gate_enter(&g, &t[4], "b:22", 0), MG_EAGAIN); /* the gate is full */
    assert_int_equal(mg__gate_enter(&g, &t[5], NULL, 0), MG_EAGAIN);
    assert_int_equal(mg__gate_group_running(&g, "a:22"), 2);
    assert_int_equal(mg__gate_group_running(&g, "b:22"), 1);
    assert_int_equal(g.running, 3);

    /* b's slot frees: a's waiting ticket is older but a is still full, so b's gets it. */
    mg__gate_leave(&g, &t[3]);
    assert_int_equal(gr.n, 1);
    assert_ptr_equal(gr.order[0], &t[4]);
    /* One of a's frees: its own waiting ticket, the oldest of all, runs. */
    mg__gate_leave(&g, &t[0]);
    assert_ptr_equal(gr.order[1], &t[2]);
    assert_int_equal(mg__gate_group_running(&g, "a:22"), 2);
    /* The one without a server waits for any slot. */
    mg__gate_leave(&g, &t[1]);
    assert_ptr_equal(gr.order[2], &t[5]);
    assert_null(t[5].group);
    for (int i = 0; i < 6; i++)
        mg__gate_leave(&g, &t[i]);
    assert_int_equal(g.running + g.queued, 0);
    /* Groups go with their last ticket. */
    assert_int_equal(mg__gate_group_running(&g, "a:22"), 0);
    for (size_t b = 0; b < MG__GATE_GROUP_BUCKETS; b++)
        assert_null(g.groups[b]);
    mg__gate_destroy(&g);
}

static void test_group_of_refused_ticket_goes(void **state)
{
    mg__gate_t g;
    mg__gate_ticket_t t[3];
    init_tickets(t, 3);
    mg__gate_init(&g, 0, 1, 1, NULL, NULL);
    assert_int_equal(mg__gate_enter(&g, &t[0], "a:22", 0), 0);
    assert_int_equal(mg__gate_enter(&g, &t[1], "a:22", 0), MG_EAGAIN);
    assert_int_equal(mg__gate_enter(&g, &t[2], "c:22", 0), 0); /* no gate-wide bound */
    mg__gate_leave(&g, &t[2]);
    assert_int_equal(mg__gate_enter(&g, &t[2], "c:22", 0), 0);
    mg__gate_leave(&g, &t[2]);
    assert_int_equal(mg__gate_enter(&g, &t[2], "a:22", 0), MG_EQUEUEFULL);
    assert_null(t[2].group);
    mg__gate_leave(&g, &t[0]);
    mg__gate_leave(&g, &t[1]);
    for (size_t b = 0; b < MG__GATE_GROUP_BUCKETS; b++)
        assert_null(g.groups[b]);
    mg__gate_destroy(&g);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_bound_and_fifo),
        cmocka_unit_test(test_full_queue_refuses),
        cmocka_unit_test(test_leave_while_queued),
        cmocka_unit_test(test_no_bound),
        cmocka_unit_test(test_no_queue),
        cmocka_unit_test(test_groups),
        cmocka_unit_test(test_group_of_refused_ticket_goes),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
