/*
 * proxy: one HTTP exchange with a user's upstream, over a pooled SSH channel.
 *
 * An exchange takes a channel to the target, sends the request head and the body the caller
 * feeds it, and reports the upstream's response as it arrives: the head, then each piece of
 * body, then the end. Channels are reused: when the upstream keeps its connection alive, the
 * channel (with its pool lease) waits idle for the user's next request to the same target, for
 * up to keepalive_ms. A request that fails on a reused channel before any response byte came
 * back is sent once more on a fresh channel, when what was sent fits in the replay buffer
 * (the upstream may have closed the idle connection just as the request went out).
 *
 * Flow control: mg_exchange_write_body() returns MG_EAGAIN when the channel cannot take more,
 * and on_body_writable says when to go on. mg_exchange_pause() stops reading the response
 * (the SSH window then stops the upstream) until mg_exchange_resume().
 *
 * Callbacks are never called from inside mg_exchange_start() or the other calls here; on_done
 * is called exactly once per exchange, unless the caller aborted it, and the exchange is freed
 * when on_done returns.
 */
#ifndef MOONGATE_PROXY_H
#define MOONGATE_PROXY_H

#include "moongate/http1.h"
#include "moongate/pool.h"
#include "moongate/ssh_conn.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>
#include <uv.h>

typedef struct mg_proxy mg_proxy_t;
typedef struct mg_exchange mg_exchange_t;

typedef struct mg_proxy_opts {
    uint64_t head_timeout_ms;  /* from the end of the request to the response head; 120 s */
    uint64_t keepalive_ms;     /* how long an idle channel waits for the next request; 10 s */
    size_t replay_max;         /* bytes of a request kept for a retry; 64 KiB */
} mg_proxy_opts_t;

typedef struct mg_exchange_cbs {
    /* The response head (a final status). */
    void (*on_head)(mg_exchange_t *x, const mg_http1_resp_head_t *head);
    /* A piece of decoded response body; buf is valid during the call. */
    void (*on_body)(mg_exchange_t *x, const char *buf, size_t len);
    /* mg_exchange_write_body() may take more. */
    void (*on_body_writable)(mg_exchange_t *x);
    /*
     * The exchange is over: status 0 when the whole response arrived, else why not (before or
     * after the head: the caller knows whether it saw one). message is for a person.
     */
    void (*on_done)(mg_exchange_t *x, int status, const char *message);
} mg_exchange_cbs_t;

typedef struct mg_exchange_req {
    const char *user;
    const mg_ssh_conn_opts_t *route; /* must stay valid until on_done or abort */
    const char *target_host;
    int target_port;
    const char *method;              /* for the response parser (HEAD has no body) */
    const char *head;                /* the request head to send upstream (copied) */
    size_t head_len;
    bool has_body;                   /* false: the request ends with its head */
    uint32_t head_timeout_ms;        /* until the response head; 0: the proxy's */
    uint32_t idle_timeout_ms;        /* the longest silence once the head is in (not counted
                                        while paused); 0: none. Past it, MG_ETIMEDOUT. */
} mg_exchange_req_t;

typedef struct mg_proxy_stats {
    uint64_t exchanges;      /* started */
    uint64_t reused;         /* served on an idle channel */
    uint64_t retried;        /* sent again after a reused channel failed */
    int active;              /* exchanges in progress */
    int idle_channels;
} mg_proxy_stats_t;

void mg_proxy_opts_init(mg_proxy_opts_t *o);

int mg_proxy_new(uv_loop_t *loop, mg_pool_t *pool, const mg_proxy_opts_t *o, mg_proxy_t **out);

/* Closes idle channels; from now on channels are not kept for reuse. */
void mg_proxy_drain(mg_proxy_t *px);

/* Frees the proxy once no exchange is active; idle channels are closed. Run the loop after. */
void mg_proxy_free(mg_proxy_t *px);

void mg_proxy_stats(const mg_proxy_t *px, mg_proxy_stats_t *out);

/*
 * Starts an exchange. Returns 0 and *out (callbacks follow), or at once a negative code with
 * a message in err: MG_EQUEUEFULL, MG_EBACKOFF, MG_ESHUTDOWN, MG_EINVAL (the pool's reasons).
 */
int mg_exchange_start(mg_proxy_t *px, const mg_exchange_req_t *req,
                      const mg_exchange_cbs_t *cbs, void *data, mg_exchange_t **out,
                      char *err, size_t errlen);

/* Sends request body bytes as they are (the caller frames a chunked body). Returns the bytes
   taken (> 0), MG_EAGAIN (on_body_writable follows), or MG_ESTATE. */
ssize_t mg_exchange_write_body(mg_exchange_t *x, const char *buf, size_t len);

/* The request body is complete. */
void mg_exchange_end_body(mg_exchange_t *x);

void mg_exchange_pause(mg_exchange_t *x);
void mg_exchange_resume(mg_exchange_t *x);

/* The client went away: the channel closes at once (the upstream sees its connection end) and
   no callback follows. */
void mg_exchange_abort(mg_exchange_t *x);

void *mg_exchange_data(const mg_exchange_t *x);
/* True once response bytes arrived (a failure after that cannot be shown as an error page). */
bool mg_exchange_got_head(const mg_exchange_t *x);
uint64_t mg_exchange_conn_id(const mg_exchange_t *x);

#endif
