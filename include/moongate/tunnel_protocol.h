/*
 * tunnel_protocol: what moongate's agent endpoint (/tunnel) and moongate-agent agree on, in one
 * place (docs/tunnel.md tells the whole protocol). Constants only; any program that speaks the
 * protocol may include it.
 *
 * The agent opens a WebSocket to GET /tunnel offering the subprotocol below, with its token as
 * "Authorization: Bearer ..." and its id in the agent-id header: 16 to 64 characters of
 * [0-9A-Za-z_-], the same for every WebSocket of one run of the agent, so that the gateway can
 * tell a reconnecting agent from a new one. Binary messages carry the bytes of one SSH
 * connection each way; text messages carry control messages from the gateway, JSON objects with
 * a "type". Close codes are RFC 6455's.
 */
#ifndef MOONGATE_TUNNEL_PROTOCOL_H
#define MOONGATE_TUNNEL_PROTOCOL_H

#define MG_TUNNEL_PATH "/tunnel"
#define MG_TUNNEL_SUBPROTOCOL "moongate-tunnel.v1"
#define MG_TUNNEL_AGENT_ID_HEADER "X-Moongate-Agent"
#define MG_TUNNEL_AGENT_ID_MIN 16
#define MG_TUNNEL_AGENT_ID_MAX 64
/* The longest message either side accepts; a longer one is closed with 1009. */
#define MG_TUNNEL_MESSAGE_MAX (1024 * 1024)

/* Control messages, gateway to agent. "open": open one more WebSocket now. */
#define MG_TUNNEL_CONTROL_OPEN "{\"type\":\"open\"}"

/* The close codes either side sends. */
#define MG_TUNNEL_CLOSE_NORMAL 1000         /* an SSH stream ended, a drain, a replaced session */
#define MG_TUNNEL_CLOSE_PROTOCOL_ERROR 1002 /* an unmasked frame, a bad control frame */
#define MG_TUNNEL_CLOSE_POLICY 1008         /* over the user's agent connection limit */
#define MG_TUNNEL_CLOSE_TOO_BIG 1009        /* a message over 1 MiB */
#define MG_TUNNEL_CLOSE_INTERNAL 1011       /* out of memory, the local sshd unreachable */

#endif
