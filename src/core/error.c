#include "moongate/error.h"

#include <uv.h>

const char *mg_strerror(int err)
{
    switch (err) {
    case MG_OK: return "success";
    case MG_EAGAIN: return "try again";
    case MG_ENOMEM: return "out of memory";
    case MG_EINVAL: return "invalid argument";
    case MG_ESTATE: return "not possible in the current state";
    case MG_ECHANLIMIT: return "channel limit reached";
    case MG_ECONNLIMIT: return "connection limit exceeded";
    case MG_EQUEUEFULL: return "wait queue full";
    case MG_ETIMEDOUT: return "timed out";
    case MG_ECONNECT: return "could not connect";
    case MG_EHOSTKEY: return "host key verification failed";
    case MG_EAUTH: return "authentication failed";
    case MG_ESSH: return "SSH protocol error";
    case MG_ECLOSED: return "closed";
    case MG_ESHUTDOWN: return "shutting down";
    case MG_ECANCELED: return "cancelled";
    case MG_EBACKOFF: return "backing off after a failed connect";
    case MG_EOPEN: return "channel open refused";
    case MG_ECONFIG: return "invalid configuration";
    case MG_EBUSY: return "too many SSH handshakes waiting";
    }
    /* The rest are libuv's and the system's (errno as -errno, getaddrinfo's as UV_EAI_*, UV_EOF):
       libuv names the ones it knows and gives the number of the others. */
    static _Thread_local char buf[64];
    return uv_strerror_r(err, buf, sizeof(buf));
}
