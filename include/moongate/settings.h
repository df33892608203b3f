/*
 * Settings: the numbers the core runs by, with their defaults, read from the environment.
 *
 *   variable                     field                        default   range
 *   MAX_CONNECTIONS_PER_USER     max_connections_per_user     3         1..1000
 *   MAX_IDLE_TIME                max_idle_ms                  300000    1000..86400000
 *   CLEANUP_INTERVAL             cleanup_interval_ms          30000     100..86400000
 *   SSH_KEEPALIVE_INTERVAL       keepalive_interval_ms        60000     2000..3600000
 *   SSH_KEEPALIVE_MAX_MISSES     keepalive_max_misses         3         1..100
 *   SSH_MAX_CHANNELS             max_channels                 10        1..1000
 *   SSH_CONNECTION_TIMEOUT       connect_timeout_ms           30000     100..600000
 *   QUEUE_MAX_PER_USER           queue_max                    100       0..100000
 *   QUEUE_TIMEOUT                queue_timeout_ms             30000     1..600000
 *   MOONGATE_MAX_HANDSHAKES      max_handshakes               64        0..100000 (0: no bound)
 *   MOONGATE_MAX_HANDSHAKES_PER_SERVER max_handshakes_per_server 6       0..100000 (0: no bound)
 *   MOONGATE_HANDSHAKE_QUEUE_MAX handshake_queue_max          4096      0..1000000
 *   SHUTDOWN_GRACE_PERIOD        shutdown_grace_ms            30000     0..3600000
 *   SHUTDOWN_FORCE_AFTER_GRACE   shutdown_force_after_grace   true      true/false/1/0/yes/no
 *   SHUTDOWN_NOTIFY_CLIENTS      shutdown_notify_clients      true      true/false/1/0/yes/no
 *   MOONGATE_LOG_LEVEL           log_level                    info      error..trace
 *   MOONGATE_LOG_FORMAT          log_format                   text      text, json
 *
 * Times are milliseconds. A variable that is set but is not a number, or is out of range, is an
 * error naming the variable; an unset or empty one keeps the default.
 */
#ifndef MOONGATE_SETTINGS_H
#define MOONGATE_SETTINGS_H

#include "moongate/log.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* The longest user id, in bytes, wherever a user is named (the pool, the policy, metrics). */
#define MG_USER_ID_MAX 128

typedef struct mg_settings {
    int max_connections_per_user;
    uint64_t max_idle_ms;
    uint64_t cleanup_interval_ms;
    uint64_t keepalive_interval_ms;
    int keepalive_max_misses;
    int max_channels;
    uint64_t connect_timeout_ms;
    int queue_max;
    uint64_t queue_timeout_ms;
    int max_handshakes;        /* new SSH connections in handshake+auth at once, all users */
    int max_handshakes_per_server; /* of those, with any one SSH server (host:port) */
    int handshake_queue_max;   /* new connections waiting for one of those slots */
    uint64_t shutdown_grace_ms;
    bool shutdown_force_after_grace;
    bool shutdown_notify_clients;
    mg_log_level_t log_level;
    mg_log_format_t log_format;
} mg_settings_t;

/* Fills in the defaults above. */
void mg_settings_init(mg_settings_t *s);

/*
 * Overrides the defaults with the environment. Returns 0, or MG_ECONFIG with a message such as
 * "SSH_MAX_CHANNELS: must be a whole number from 1 to 1000, got \"ten\"" in err. On error *s is
 * left as it was.
 */
int mg_settings_from_env(mg_settings_t *s, char *err, size_t errlen);

/*
 * The environment's readers, for every setting the program takes: an unset or empty variable
 * leaves *out alone and returns 0; a value that is not a whole number from lo to hi (no sign),
 * or not true/false/1/0/yes/no, returns MG_ECONFIG with a message naming the variable.
 */
int mg_settings_env_u64(const char *name, uint64_t lo, uint64_t hi, uint64_t *out, char *err,
                        size_t errlen);
int mg_settings_env_bool(const char *name, bool *out, char *err, size_t errlen);

#endif
