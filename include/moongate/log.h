/*
 * Logging: one line per event on stderr,
 *
 *     2026-11-26T15:20:43.123Z info  ssh: user=alice conn=3 ready in 27 ms
 *
 * or, in the JSON format (MOONGATE_LOG_FORMAT=json), one object per line for log shippers:
 *
 *     {"time":"2026-11-26T15:20:43.123Z","level":"info","component":"ssh","user":"alice",
 *      "conn":3,"msg":"ready in 27 ms"}
 *
 * A message's leading NAME=VALUE words (VALUE bare, or "quoted" with \" and \\ escapes) are
 * its fields: JSON members of their own (req becomes request_id; digits a number; "-" left
 * out), the rest the msg. Text lines carry them as written.
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

typedef enum mg_log_format {
    MG_LOG_TEXT = 0,
    MG_LOG_JSON,
} mg_log_format_t;

void mg_log_set_level(mg_log_level_t level);
void mg_log_set_format(mg_log_format_t format);

/* Parses "text" or "json". Returns 0, or MG_EINVAL. */
int mg_log_format_parse(const char *name, mg_log_format_t *out);

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
 * Formats one log line, newline included, into line (cap bytes, at least 2; 128 for JSON) and
 * returns its length (0 when cap is too small); longer lines are cut, a JSON one still whole. Writes nothing: for writers that cannot use stdio (the
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
