/*
 * Tests for src/agent/agent_addrs.c: which addresses of a --gateway name become nodes, from
 * made-up resolver answers: one family, deduplicated, a stable order whatever the resolver's
 * rotation, the cap, and what a fresh answer keeps, retires and adds.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "agent/agent_addrs.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>

/* A resolver answer built from numeric addresses, as getaddrinfo would chain it. */
typedef struct answer {
    struct addrinfo ai[MG_AGENT_ADDRS_SEEN + 8];
    struct sockaddr_storage sa[MG_AGENT_ADDRS_SEEN + 8];
    int n;
} answer_t;

static struct addrinfo *answer(answer_t *a, const char *const *ips)
{
    memset(a, 0, sizeof(*a));
    for (; *ips != NULL; ips++, a->n++) {
        struct addrinfo *ai = &a->ai[a->n];
        struct sockaddr_in *sin = (struct sockaddr_in *)&a->sa[a->n];
        struct sockaddr_in6 *sin6 = (struct sockaddr_in6 *)&a->sa[a->n];
        if (inet_pton(AF_INET, *ips, &sin->sin_addr) == 1) {
            sin->sin_family = AF_INET;
            ai->ai_addrlen = sizeof(*sin);
        } else {
            assert_int_equal(inet_pton(AF_INET6, *ips, &sin6->sin6_addr), 1);
            sin6->sin6_family = AF_INET6;
            ai->ai_addrlen = sizeof(*sin6);
        }
        ai->ai_family = a->sa[a->n].ss_family;
        ai->ai_socktype = SOCK_STREAM;
        ai->ai_addr = (struct sockaddr *)&a->sa[a->n];
        if (a->n > 0)
            a->ai[a->n - 1].ai_next = ai;
    }
    return a->n > 0 ? &a->ai[0] : NULL;
}

/* The picked addresses as one string, "a b c". */
static const char *joined(const mg_agent_addr_t *v, int n)
{
    static char out[2048];
    size_t o = 0;
    out[0] = '\0';
    for (int i = 0; i < n; i++)
        o += (size_t)snprintf(out + o, sizeof(out) - o, "%s%s", i ? " " : "", v[i].text);
    return out;
}

static int pick(const char *const *ips, mg_agent_addr_t *out)
{
    answer_t a;
    return mg_agent_addrs_pick(answer(&a, ips), out, MG_AGENT_ADDRS_SEEN);
}

static void test_literal(void **state)
{
    assert_true(mg_agent_host_is_literal("127.0.0.1"));
    assert_true(mg_agent_host_is_literal("::1"));
    assert_true(mg_agent_host_is_literal("2001:db8::7"));
    assert_false(mg_agent_host_is_literal("localhost"));
    assert_false(mg_agent_host_is_literal("gw.example.com"));
    assert_false(mg_agent_host_is_literal("127.0.0"));
    assert_false(mg_agent_host_is_literal("[::1]"));
}

static void test_pick_sorts_dedups_one_family(void **state)
{
    mg_agent_addr_t v[MG_AGENT_ADDRS_SEEN];
    /* One address: itself. */
    const char *one[] = { "10.0.0.9", NULL };
    assert_int_equal(pick(one, v), 1);
    assert_string_equal(joined(v, 1), "10.0.0.9");
    assert_int_equal(v[0].family, AF_INET);

    /* getaddrinfo lists an address once per socket type and rotates round-robin answers: the
       same set comes out the same, by bytes (10.0.0.10 after 10.0.0.9, not as text). */
    const char *rot1[] = { "10.0.0.10", "10.0.0.9", "10.0.0.10", "192.168.1.1", NULL };
    const char *rot2[] = { "192.168.1.1", "10.0.0.9", "10.0.0.10", "10.0.0.9", NULL };
    int n = pick(rot1, v);
    assert_int_equal(n, 3);
    assert_string_equal(joined(v, n), "10.0.0.9 10.0.0.10 192.168.1.1");
    n = pick(rot2, v);
    assert_string_equal(joined(v, n), "10.0.0.9 10.0.0.10 192.168.1.1");

    /* A dual-stack answer gives its IPv4 nodes only, wherever the resolver put them. */
    const char *dual[] = { "2001:db8::2", "2001:db8::1", "10.0.0.2", "10.0.0.1", NULL };
    n = pick(dual, v);
    assert_string_equal(joined(v, n), "10.0.0.1 10.0.0.2");
    /* IPv6 only: those. */
    const char *v6[] = { "2001:db8::2", "::1", "2001:db8::2", NULL };
    n = pick(v6, v);
    assert_string_equal(joined(v, n), "::1 2001:db8::2");
    assert_int_equal(v[0].family, AF_INET6);

    /* Nothing, and the cap on what is looked at. */
    assert_int_equal(mg_agent_addrs_pick(NULL, v, MG_AGENT_ADDRS_SEEN), 0);
    answer_t a;
    const char *many[MG_AGENT_ADDRS_SEEN + 5];
    char text[MG_AGENT_ADDRS_SEEN + 4][16];
    for (int i = 0; i < MG_AGENT_ADDRS_SEEN + 4; i++) {
        snprintf(text[i], sizeof(text[i]), "10.1.0.%d", i + 1);
        many[i] = text[i];
    }
    many[MG_AGENT_ADDRS_SEEN + 4] = NULL;
    assert_int_equal(mg_agent_addrs_pick(answer(&a, many), v, 1000), MG_AGENT_ADDRS_SEEN);
    assert_int_equal(mg_agent_addrs_pick(answer(&a, many), v, 3), 3);
    assert_string_equal(joined(v, 3), "10.1.0.1 10.1.0.2 10.1.0.3");
}

/* Runs a plan of fresh over cur (both lists of addresses), and says what it did. */
typedef struct plan {
    bool keep[MG_AGENT_ADDRS_MAX];
    mg_agent_addr_t add[MG_AGENT_ADDRS_MAX];
    int n_add;
    int left_out;
} plan_t;

static void plan(const char *const *cur_ips, const char *const *fresh_ips, plan_t *p)
{
    mg_agent_addr_t cur[MG_AGENT_ADDRS_SEEN], fresh[MG_AGENT_ADDRS_SEEN];
    int n_cur = cur_ips != NULL ? pick(cur_ips, cur) : 0;
    int n_fresh = pick(fresh_ips, fresh);
    assert_true(n_cur <= MG_AGENT_ADDRS_MAX);
    memset(p, 0, sizeof(*p));
    p->left_out = mg_agent_addrs_plan(cur, n_cur, fresh, n_fresh, MG_AGENT_ADDRS_MAX, p->keep,
                                      p->add, &p->n_add);
}

static void test_plan_add_remove_keep(void **state)
{
    plan_t p;
    /* The first answer: every address is a new node. */
    const char *ab[] = { "10.0.0.2", "10.0.0.1", NULL };
    plan(NULL, ab, &p);
    assert_int_equal(p.n_add, 2);
    assert_string_equal(joined(p.add, p.n_add), "10.0.0.1 10.0.0.2");
    assert_int_equal(p.left_out, 0);

    /* The same answer again, in another order: nothing changes. */
    const char *ba[] = { "10.0.0.1", "10.0.0.2", NULL };
    plan(ab, ba, &p);
    assert_true(p.keep[0] && p.keep[1]);
    assert_int_equal(p.n_add, 0);

    /* 10.0.0.2 leaves: only it is retired. */
    const char *a[] = { "10.0.0.1", NULL };
    plan(ab, a, &p);
    assert_true(p.keep[0]);
    assert_false(p.keep[1]);
    assert_int_equal(p.n_add, 0);

    /* It returns, with a third: both are added, the kept one stays. */
    const char *abc[] = { "10.0.0.3", "10.0.0.1", "10.0.0.2", NULL };
    plan(a, abc, &p);
    assert_true(p.keep[0]);
    assert_string_equal(joined(p.add, p.n_add), "10.0.0.2 10.0.0.3");

    /* The name moves to IPv6 only: every IPv4 node goes, the new ones come. */
    const char *v6[] = { "2001:db8::1", NULL };
    plan(ab, v6, &p);
    assert_false(p.keep[0] || p.keep[1]);
    assert_string_equal(joined(p.add, p.n_add), "2001:db8::1");
}

static void test_plan_cap(void **state)
{
    plan_t p;
    /* Ten addresses for a cap of eight: the first eight by bytes, two left out. */
    const char *ten[] = { "10.0.0.10", "10.0.0.9", "10.0.0.8", "10.0.0.7", "10.0.0.6",
                          "10.0.0.5", "10.0.0.4", "10.0.0.3", "10.0.0.2", "10.0.0.1", NULL };
    plan(NULL, ten, &p);
    assert_int_equal(MG_AGENT_ADDRS_MAX, 8);
    assert_int_equal(p.n_add, 8);
    assert_int_equal(p.left_out, 2);
    assert_string_equal(joined(p.add, p.n_add),
                        "10.0.0.1 10.0.0.2 10.0.0.3 10.0.0.4 10.0.0.5 10.0.0.6 10.0.0.7 "
                        "10.0.0.8");

    /* A lower address appearing does not evict a working node: the set is full, it waits. */
    const char *eight[] = { "10.0.0.3", "10.0.0.4", "10.0.0.5", "10.0.0.6", "10.0.0.7",
                            "10.0.0.8", "10.0.0.9", "10.0.0.10", NULL };
    const char *nine[] = { "10.0.0.1", "10.0.0.3", "10.0.0.4", "10.0.0.5", "10.0.0.6",
                           "10.0.0.7", "10.0.0.8", "10.0.0.9", "10.0.0.10", NULL };
    plan(eight, nine, &p);
    for (int i = 0; i < 8; i++)
        assert_true(p.keep[i]);
    assert_int_equal(p.n_add, 0);
    assert_int_equal(p.left_out, 1);

    /* One of the kept ones leaves: the waiting address takes its place. */
    const char *nine_minus[] = { "10.0.0.1", "10.0.0.3", "10.0.0.4", "10.0.0.5", "10.0.0.6",
                                 "10.0.0.7", "10.0.0.8", "10.0.0.9", NULL };
    plan(eight, nine_minus, &p);
    assert_false(p.keep[7]); /* 10.0.0.10, last by bytes */
    assert_string_equal(joined(p.add, p.n_add), "10.0.0.1");
    assert_int_equal(p.left_out, 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_literal),
        cmocka_unit_test(test_pick_sorts_dedups_one_family),
        cmocka_unit_test(test_plan_add_remove_keep),
        cmocka_unit_test(test_plan_cap),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
