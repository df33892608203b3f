/*
 * moongate-agent, internal: the state main_agent_tunnel.c (the WebSockets and the local SSH
 * streams behind them) and main_agent_nodes.c (which gateway addresses get WebSockets) share.
 *
 *   mg_agent_t   one run of the agent: the libwebsockets context, the gateways, the conns
 *   gateway_t    one --gateway: its nodes, and for a name its resolver
 *   node_t       one gateway address: its WebSockets' backoff and reconnects
 *   conn_t       one WebSocket and its local SSH stream
 */
#ifndef MOONGATE_MAIN_AGENT_TUNNEL_H
#define MOONGATE_MAIN_AGENT_TUNNEL_H

#include "main_agent.h"

#include "core/buf.h"
#include "moongate/list.h"

#include <libwebsockets.h>

#include <stdint.h>
#include <sys/socket.h>

#define COMP "agent"
#define FRAME_MAX (64 * 1024)     /* the largest frame we send, and our read buffer */
#define CONTROL_MAX 4096          /* the longest control message we read */

typedef struct conn conn_t;
typedef struct gateway gateway_t;

/*
 * One gateway node: its own WebSockets, backoff and reconnects, so a node that goes away costs
 * only its own tunnels. A --gateway with an address literal is one node; one with a name has a
 * node per address the name resolves to (agent_addrs.h), dialled directly with the name kept
 * for the Host header, the TLS SNI and the certificate check. Such a node is retired when its
 * address leaves the answer: it drains (main_agent_nodes.c) and is freed once its last conn is.
 */
typedef struct node {
    mg_agent_t *a;
    gateway_t *gw;
    mg_list_t link;             /* in gw->nodes */
    const mg_agent_url_t *url;
    mg_agent_addr_t addr;       /* a name's node: its address */
    const char *connect_host;   /* what lws dials: the URL's literal, or addr.text */
    mg_agent_backoff_t backoff;
    uv_timer_t reconnect_timer; /* reconnects; once retired, the drain's tick */
    int n_ws;                   /* WebSockets to it opening or open */
    unsigned attempt;           /* attempts since one last stayed up (the backoff's count) */
    bool probing;               /* a failed connect is being looked into (main_agent_probe.c) */
    bool retired;               /* its address left the answer: no reconnects, draining */
    bool timer_closed;
    uint64_t retired_ms;
    int refs;                   /* conns that point at it */
    char gateway[];             /* for the logs: the URL, or "URL at ADDRESS" for a name */
} node_t;

/* One --gateway. */
struct gateway {
    mg_agent_t *a;
    const char *text;           /* as given */
    const mg_agent_url_t *url;
    mg_list_t nodes;            /* node_t, live and retired */
    mg_agent_resolver_t *resolver; /* NULL for an address literal */
    mg_agent_backoff_t backoff; /* resolve retries while the name has no node */
    int resolve_status;         /* the last resolve's failure, 0 after a success */
    int left_out;               /* addresses over the cap in the last answer */
};

struct mg_agent {
    uv_loop_t *loop;
    const mg_agent_args_t *args;
    char id[MG_AGENT_ID_HEX_LEN + 1];
    char **inetd_argv;
    char **child_env;      /* this process's environment minus MOONGATE_TOKEN */
    struct sockaddr_storage ssh_addr;
    struct lws_context *ctx;
    lws_retry_bo_t idle_policy;
    gateway_t gateways[MG_AGENT_GATEWAYS_MAX];
    int n_gateways;
    uv_timer_t stop_timer;
    uv_signal_t sigterm, sigint;
    conn_t *conns;
    int n_wsi;             /* wsis lws has not destroyed yet */
    unsigned seq;          /* numbers WebSockets in the logs */
    bool stopping;
    bool finished;
    int exit_code;
    char sendbuf[LWS_PRE + FRAME_MAX];
    char readbuf[FRAME_MAX];
};

struct conn {
    mg_agent_t *a;
    node_t *node;          /* the gateway node it goes to */
    conn_t *next, **pprev;
    unsigned n;
    bool extra;            /* opened for an "open" message: not reopened when it closes */
    struct lws *wsi;       /* NULL once the WebSocket is gone */
    bool ws_done;          /* ws_gone ran */
    bool wsi_alive;        /* lws still holds the wsi (until WSI_DESTROY) */
    bool established;
    bool refused;          /* the gateway answered the upgrade with 401 or 403 */
    uint64_t last_io_ms;   /* a byte last went either way (a retired node's drain) */
    char tls_why[1024];    /* why the gateway's certificate was not trusted, or "" */
    uint64_t opened_ms;

    /* gateway -> sshd */
    size_t local_queued;
    bool ws_rx_paused;
    /* sshd -> gateway */
    mg__buf_t out;
    bool local_paused;
    /* the WebSocket is to close (code, reason) once out is empty */
    bool close_pending;
    bool close_sent;       /* our close frame is out; the gateway's echo ends the WebSocket */
    int close_code;
    const char *close_reason;

    char control[CONTROL_MAX];
    size_t control_n;
    bool control_overflow;

    /* the local stream: rd and wr are the same TCP handle, or the child's stdout and stdin */
    uv_tcp_t tcp;
    uv_pipe_t child_in, child_out;
    uv_process_t proc;
    uv_stream_t *rd, *wr;
    bool local_started;
    bool local_closing;
    bool proc_running;
    int handles;           /* local libuv handles not yet closed */
    int hold;              /* > 0 while a call that may end the conn is on the stack */
};


/* ---- main_agent_tunnel.c ---- */

/* Opens a WebSocket to nd: its baseline one, or (extra) one the gateway asked for. */
void mg__agent_open_ws(node_t *nd, bool extra);

/* Closes c's WebSocket with code and reason once what sshd sent has gone out (at once when it
   is still in its handshake). c may be freed before this returns. */
void mg__agent_conn_close(conn_t *c, int code, const char *reason);

uint64_t mg__agent_now_ms(const mg_agent_t *a);
uint32_t mg__agent_random_u32(void *ctx);   /* for mg_agent_backoff_init */

/* ---- main_agent_nodes.c ---- */

/* Starts gw: an address literal is one node, dialled now; a name's nodes come with its first
   answer. Returns 0 or MG_ENOMEM. */
int mg__agent_gateway_start(gateway_t *gw);

/* Frees nd if it is retired (or the agent finished) and nothing points at it any more. */
void mg__agent_node_maybe_free(node_t *nd);

/* Stopping: no more lookups, reconnects or drain ticks. */
void mg__agent_nodes_stop(mg_agent_t *a);

/* Finished: closes every node's timer (a node with no conn left goes with it). */
void mg__agent_nodes_close(mg_agent_t *a);

/* After the loop: frees what is left. */
void mg__agent_nodes_free(mg_agent_t *a);

#endif
