/*
 * agent_addrs: which addresses of a --gateway name the agent keeps tunnels to, apart from the
 * event loop so it can be tested with made-up resolver answers.
 *
 * A --gateway whose host is a name stands for every node that name resolves to: each address
 * is a node of its own (its own WebSockets, backoff and reconnects), dialled directly while the
 * name stays the Host header, the TLS SNI and the name the certificate must carry. The name is
 * resolved again periodically; the answer is turned into a node set here:
 *
 *   - one family: the IPv4 addresses when the answer has any, else the IPv6 ones, so that a
 *     dual-stack node (an A and an AAAA record) is one node, not two;
 *   - deduplicated and sorted by address bytes, so the order does not follow the resolver's
 *     rotation of round-robin answers;
 *   - at most MG_AGENT_ADDRS_MAX nodes per name: the nodes already kept stay while their address
 *     is still in the answer (a new address never evicts a working node), and free places go to
 *     the new addresses in sorted order.
 *
 * Nothing here touches libuv or libwebsockets.
 */
#ifndef MOONGATE_AGENT_ADDRS_H
#define MOONGATE_AGENT_ADDRS_H

#include <netdb.h>
#include <stdbool.h>
#include <stdint.h>

#define MG_AGENT_ADDRS_MAX 8      /* nodes one --gateway name gives at most */
#define MG_AGENT_ADDRS_SEEN 64    /* addresses of one answer looked at; the rest are dropped */

typedef struct mg_agent_addr {
    int family;                   /* AF_INET or AF_INET6 */
    uint8_t bytes[16];            /* 4 used for AF_INET */
    char text[48];                /* numeric: "127.0.0.2", "2001:db8::1" */
} mg_agent_addr_t;

/* Whether host (as in a URL, without brackets) is an IPv4 or IPv6 literal: no resolving. */
bool mg_agent_host_is_literal(const char *host);

/*
 * Reduces a resolver's answer to the addresses that may become nodes: one family (IPv4 when
 * there is any), no duplicates, sorted by bytes. Writes at most cap (<= MG_AGENT_ADDRS_SEEN)
 * into out and returns how many; entries that are neither AF_INET nor AF_INET6 are skipped.
 */
int mg_agent_addrs_pick(const struct addrinfo *res, mg_agent_addr_t *out, int cap);

/* Whether a and b are the same address. */
bool mg_agent_addr_equal(const mg_agent_addr_t *a, const mg_agent_addr_t *b);

/*
 * The node set a fresh answer asks for. cur: the addresses of the nodes the name has now
 * (n_cur <= cap); fresh: the answer as mg_agent_addrs_pick() left it. Sets keep[i] for each
 * cur[i] that is still in fresh (the others are to be retired), and writes into add the
 * addresses to start nodes for (at most cap - kept; *n_add their count), in fresh's order.
 * Returns how many addresses of fresh found no place (0 unless the name gives more than cap).
 */
int mg_agent_addrs_plan(const mg_agent_addr_t *cur, int n_cur, const mg_agent_addr_t *fresh,
                        int n_fresh, int cap, bool *keep, mg_agent_addr_t *add, int *n_add);

#endif
