/*
 * The node set of a --gateway name: see agent_addrs.h.
 */
#include "agent_addrs.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

bool mg_agent_host_is_literal(const char *host)
{
    unsigned char buf[sizeof(struct in6_addr)];
    return inet_pton(AF_INET, host, buf) == 1 || inet_pton(AF_INET6, host, buf) == 1;
}

bool mg_agent_addr_equal(const mg_agent_addr_t *a, const mg_agent_addr_t *b)
{
    size_t n = a->family == AF_INET ? 4 : 16;
    return a->family == b->family && memcmp(a->bytes, b->bytes, n) == 0;
}

static int addr_cmp(const void *x, const void *y)
{
    const mg_agent_addr_t *a = x, *b = y;
    if (a->family != b->family)
        return a->family == AF_INET ? -1 : 1;
    return memcmp(a->bytes, b->bytes, a->family == AF_INET ? 4 : 16);
}

/* Fills a from one resolver entry; false for a family we do not dial. */
static bool addr_from(const struct addrinfo *ai, mg_agent_addr_t *a)
{
    memset(a, 0, sizeof(*a));
    if (ai->ai_family == AF_INET && ai->ai_addrlen >= sizeof(struct sockaddr_in)) {
        const struct sockaddr_in *sin = (const struct sockaddr_in *)ai->ai_addr;
        a->family = AF_INET;
        memcpy(a->bytes, &sin->sin_addr, 4);
    } else if (ai->ai_family == AF_INET6 && ai->ai_addrlen >= sizeof(struct sockaddr_in6)) {
        const struct sockaddr_in6 *sin6 = (const struct sockaddr_in6 *)ai->ai_addr;
        a->family = AF_INET6;
        memcpy(a->bytes, &sin6->sin6_addr, 16);
    } else {
        return false;
    }
    return inet_ntop(a->family, a->bytes, a->text, sizeof(a->text)) != NULL;
}

int mg_agent_addrs_pick(const struct addrinfo *res, mg_agent_addr_t *out, int cap)
{
    if (cap > MG_AGENT_ADDRS_SEEN)
        cap = MG_AGENT_ADDRS_SEEN;
    bool any_v4 = false;
    for (const struct addrinfo *ai = res; ai != NULL; ai = ai->ai_next)
        any_v4 = any_v4 || ai->ai_family == AF_INET;
    int want = any_v4 ? AF_INET : AF_INET6;
    int n = 0;
    for (const struct addrinfo *ai = res; ai != NULL && n < cap; ai = ai->ai_next) {
        mg_agent_addr_t a;
        if (ai->ai_family != want || !addr_from(ai, &a))
            continue;
        bool seen = false;
        for (int i = 0; i < n && !seen; i++)
            seen = mg_agent_addr_equal(&out[i], &a);
        if (!seen)
            out[n++] = a;
    }
    qsort(out, (size_t)n, sizeof(out[0]), addr_cmp);
    return n;
}

int mg_agent_addrs_plan(const mg_agent_addr_t *cur, int n_cur, const mg_agent_addr_t *fresh,
                        int n_fresh, int cap, bool *keep, mg_agent_addr_t *add, int *n_add)
{
    int kept = 0;
    for (int i = 0; i < n_cur; i++) {
        keep[i] = false;
        for (int k = 0; k < n_fresh && !keep[i]; k++)
            keep[i] = mg_agent_addr_equal(&cur[i], &fresh[k]);
        kept += keep[i];
    }
    int added = 0, left_out = 0;
    for (int k = 0; k < n_fresh; k++) {
        bool have = false;
        for (int i = 0; i < n_cur && !have; i++)
            have = keep[i] && mg_agent_addr_equal(&cur[i], &fresh[k]);
        if (have)
            continue;
        if (kept + added < cap)
            add[added++] = fresh[k];
        else
            left_out++;
    }
    *n_add = added;
    return left_out;
}
