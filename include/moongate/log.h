/*
 * Logging: one line per event on stderr,
 *
 *     2026-11-26T15:20:43.123Z info  ssh: user=alice conn=3 ready in 27 ms
 *
 * Levels run from error (always shown) to trace. The level is process-wide; set it once at
 * start-up (MOONGATE_LOG_LEVEL) or through mg_log_set_level(). mg_log() is cheap when the level is
 * off: test mg_log_enabled() first only to skip building expensive arguments.
 */
#ifndef MOONGATE_LOG_H
#define MOONGATE_LOG_H

#include <stdarg.h>
#include <stddef.h>
#include <stdbool.h>

typedef enum mg_log_level {
    MG_LOG_ERROR = 0,
    MG_LOG_WARN,
    MG_LOG_INFO,
    MG_LOG_DEBUG,
    MG_LOG_TRACE,
} mg_log_level_t;

void mg_log_set_level(mg_log_level_t level);

/* Whether a line at level would be written (so a caller can skip building one). */
bool mg_log_enabled(mg_log_level_t level);

/* Parses "error", "warn", "info", "debug" or "trace". Returns 0, or MG_EINVAL. */
int mg_log_level_parse(const char *name, mg_log_level_t *out);
const char *mg_log_level_name(mg_log_level_t level);

/* Writes one line: time, level, component (a short module name), message. */
void mg_log(mg_log_level_t level, const char *component, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
void mg_logv(mg_log_level_t level, const char *component, const char *fmt, va_list ap);

/*
 * Formats one log line, newline included, into line (cap bytes, at least 2) and returns its
 * length; longer lines are cut. Writes nothing: for writers that cannot use stdio (the
 * watchdog's signal handler).
 */
size_t mg_log_format(char *line, size_t cap, mg_log_level_t level, const char *component,
                     const char *fmt, va_list ap);

#define mg_log_error(comp, ...) mg_log(MG_LOG_ERROR, comp, __VA_ARGS__)
#define mg_log_warn(comp, ...) \
    do { if (mg_log_enabled(MG_LOG_WARN)) mg_log(MG_LOG_WARN, comp, __VA_ARGS__); } while (0)
#define mg_log_info(comp, ...) \
    do { if (mg_log_enabled(MG_LOG_INFO)) mg_log(MG_LOG_INFO, comp, __VA_ARGS__); } while (0)
#define mg_log_debug(comp, ...) \
    do { if (mg_log_enabled(MG_LOG_DEBUG)) mg_log(MG_LOG_DEBUG, comp, __VA_ARGS__); } while (0)
#define mg_log_trace(comp, ...) \
    do { if (mg_log_enabled(MG_LOG_TRACE)) mg_log(MG_LOG_TRACE, comp, __VA_ARGS__); } while (0)

#endif
