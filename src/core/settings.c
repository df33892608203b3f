#include "moongate/settings.h"

#include "moongate/error.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

void mg_settings_init(mg_settings_t *s)
{
    *s = (mg_settings_t){
        .max_connections_per_user = 3,
        .max_idle_ms = 300000,
        .cleanup_interval_ms = 30000,
        .keepalive_interval_ms = 60000,
        .keepalive_max_misses = 3,
        .max_channels = 10,
        .connect_timeout_ms = 30000,
        .queue_max = 100,
        .queue_timeout_ms = 30000,
        .max_handshakes = 64,
        .max_handshakes_per_server = 6,
        .handshake_queue_max = 4096,
        .shutdown_grace_ms = 30000,
        .shutdown_force_after_grace = true,
        .shutdown_notify_clients = true,
        .log_level = MG_LOG_INFO,
        .log_format = MG_LOG_TEXT,
    };
}

int mg_settings_env_u64(const char *name, uint64_t lo, uint64_t hi, uint64_t *out, char *err,
                        size_t errlen)
{
    const char *v = getenv(name);
    if (v == NULL || *v == '\0')
        return 0;
    char *end;
    errno = 0;
    unsigned long long n = strtoull(v, &end, 10);
    if (*v == '-' || *v == '+' || errno != 0 || *end != '\0' || n < lo || n > hi) {
        snprintf(err, errlen, "%s: must be a whole number from %llu to %llu, got \"%s\"", name,
                 (unsigned long long)lo, (unsigned long long)hi, v);
        return MG_ECONFIG;
    }
    *out = n;
    return 0;
}

static int read_int(const char *name, int lo, int hi, int *out, char *err, size_t errlen)
{
    uint64_t n = (uint64_t)*out;
    int rc = mg_settings_env_u64(name, (uint64_t)lo, (uint64_t)hi, &n, err, errlen);
    if (rc == 0)
        *out = (int)n;
    return rc;
}

int mg_settings_env_bool(const char *name, bool *out, char *err, size_t errlen)
{
    const char *v = getenv(name);
    if (v == NULL || *v == '\0')
        return 0;
    if (strcasecmp(v, "true") == 0 || strcmp(v, "1") == 0 || strcasecmp(v, "yes") == 0) {
        *out = true;
        return 0;
    }
    if (strcasecmp(v, "false") == 0 || strcmp(v, "0") == 0 || strcasecmp(v, "no") == 0) {
        *out = false;
        return 0;
    }
    snprintf(err, errlen, "%s: must be true or false, got \"%s\"", name, v);
    return MG_ECONFIG;
}

int mg_settings_from_env(mg_settings_t *s, char *err, size_t errlen)
{
    mg_settings_t n = *s;
    int rc;
    if ((rc = read_int("MAX_CONNECTIONS_PER_USER", 1, 1000, &n.max_connections_per_user, err,
                       errlen)) ||
        (rc = mg_settings_env_u64("MAX_IDLE_TIME", 1000, 86400000, &n.max_idle_ms, err, errlen)) ||
        (rc = mg_settings_env_u64("CLEANUP_INTERVAL", 100, 86400000, &n.cleanup_interval_ms, err, errlen)) ||
        (rc = mg_settings_env_u64("SSH_KEEPALIVE_INTERVAL", 2000, 3600000, &n.keepalive_interval_ms, err,
                       errlen)) ||
        (rc = read_int("SSH_KEEPALIVE_MAX_MISSES", 1, 100, &n.keepalive_max_misses, err,
                       errlen)) ||
        (rc = read_int("SSH_MAX_CHANNELS", 1, 1000, &n.max_channels, err, errlen)) ||
        (rc = mg_settings_env_u64("SSH_CONNECTION_TIMEOUT", 100, 600000, &n.connect_timeout_ms, err,
                       errlen)) ||
        (rc = read_int("QUEUE_MAX_PER_USER", 0, 100000, &n.queue_max, err, errlen)) ||
        (rc = mg_settings_env_u64("QUEUE_TIMEOUT", 1, 600000, &n.queue_timeout_ms, err, errlen)) ||
        (rc = read_int("MOONGATE_MAX_HANDSHAKES", 0, 100000, &n.max_handshakes, err, errlen)) ||
        (rc = read_int("MOONGATE_MAX_HANDSHAKES_PER_SERVER", 0, 100000,
                       &n.max_handshakes_per_server, err, errlen)) ||
        (rc = read_int("MOONGATE_HANDSHAKE_QUEUE_MAX", 0, 1000000, &n.handshake_queue_max, err,
                       errlen)) ||
        (rc = mg_settings_env_u64("SHUTDOWN_GRACE_PERIOD", 0, 3600000, &n.shutdown_grace_ms, err,
                       errlen)) ||
        (rc = mg_settings_env_bool("SHUTDOWN_FORCE_AFTER_GRACE", &n.shutdown_force_after_grace, err,
                        errlen)) ||
        (rc = mg_settings_env_bool("SHUTDOWN_NOTIFY_CLIENTS", &n.shutdown_notify_clients, err, errlen)))
        return rc;

    const char *lvl = getenv("MOONGATE_LOG_LEVEL");
    if (lvl != NULL && *lvl != '\0' && mg_log_level_parse(lvl, &n.log_level) != 0) {
        snprintf(err, errlen,
                 "MOONGATE_LOG_LEVEL: must be error, warn, info, debug or trace, got \"%s\"", lvl);
        return MG_ECONFIG;
    }
    const char *fmt = getenv("MOONGATE_LOG_FORMAT");
    if (fmt != NULL && *fmt != '\0' && mg_log_format_parse(fmt, &n.log_format) != 0) {
        snprintf(err, errlen, "MOONGATE_LOG_FORMAT: must be text or json, got \"%s\"", fmt);
        return MG_ECONFIG;
    }
    *s = n;
    return 0;
}
