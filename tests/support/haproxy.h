/*
 * haproxy: a real HAProxy (Debian's haproxy package) in front of gateway nodes for a test.
 *
 * mg_test_haproxy_start() writes a configuration that balances HTTP round robin over the given
 * 127.0.0.1 ports, health-checks each with GET /healthz every 100 ms (one failure takes a node
 * out, two successes bring it back), with retry a request that could not reach a node is tried
 * on another (docs/scale-out.md's configuration; without, a test sees what the nodes alone do),
 * and allows long streams; then runs `haproxy -db -f CONFIG` on a free port of 127.0.0.1 and
 * returns once it accepts. The child is stopped with mg_test_haproxy_stop() or, like every
 * child of the tests, when the test process ends.
 */
#ifndef MG_TEST_HAPROXY_H
#define MG_TEST_HAPROXY_H

#include "proc.h"

#include <stdint.h>

#define MG_TEST_HAPROXY_MAX_NODES 4

typedef struct mg_test_haproxy {
    uint16_t port;                 /* the front end: 127.0.0.1:port */
    char dir[MG_TEST_PATH_MAX];    /* its config and log */
    char log[MG_TEST_PATH_MAX + 16];
    mg_test_proc_t proc;
    bool running;
} mg_test_haproxy_t;

/* Returns 0, MG_EINVAL (no haproxy, or too many nodes), or what starting it returned. */
int mg_test_haproxy_start(mg_test_haproxy_t *h, const uint16_t *node_ports, int n, bool retry);
void mg_test_haproxy_stop(mg_test_haproxy_t *h);

#endif
