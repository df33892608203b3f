#include "moongate/log.h"

#include "moongate/error.h"

#include <stdio.h>
#include <string.h>
#include <sys/time.h>
#include <time.h>

static mg_log_level_t log_level = MG_LOG_INFO;

static const char *const level_names[] = { "error", "warn", "info", "debug", "trace" };

void mg_log_set_level(mg_log_level_t level)
{
    log_level = level;
}

bool mg_log_enabled(mg_log_level_t level)
{
    return level <= log_level;
}

int mg_log_level_parse(const char *name, mg_log_level_t *out)
{
    for (int i = 0; i <= MG_LOG_TRACE; i++) {
        if (strcmp(name, level_names[i]) == 0) {
            *out = (mg_log_level_t)i;
            return 0;
        }
    }
    return MG_EINVAL;
}

const char *mg_log_level_name(mg_log_level_t level)
{
    return level <= MG_LOG_TRACE ? level_names[level] : "?";
}

size_t mg_log_format(char *line, size_t cap, mg_log_level_t level, const char *component,
                     const char *fmt, va_list ap)
{
    if (cap < 2)
        return 0;
    struct timeval tv;
    struct tm tm;
    gettimeofday(&tv, NULL);
    gmtime_r(&tv.tv_sec, &tm);
    int n = snprintf(line, cap, "%04d-%02d-%02dT%02d:%02d:%02d.%03dZ %-5s %s: ",
                     tm.tm_year + 1900, tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min,
                     tm.tm_sec, (int)(tv.tv_usec / 1000), mg_log_level_name(level), component);
    if (n < 0)
        return 0;
    size_t len = (size_t)n < cap ? (size_t)n : cap - 1;
    int m = vsnprintf(line + len, cap - len, fmt, ap);
    len += m < 0 ? 0 : (size_t)m;
    if (len > cap - 2)
        len = cap - 2;
    line[len++] = '\n';
    return len;
}

void mg_logv(mg_log_level_t level, const char *component, const char *fmt, va_list ap)
{
    if (!mg_log_enabled(level))
        return;
    /* One fwrite per line, so lines from concurrent writers do not interleave. */
    char line[2048];
    size_t len = mg_log_format(line, sizeof(line), level, component, fmt, ap);
    fwrite(line, 1, len, stderr);
}

void mg_log(mg_log_level_t level, const char *component, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    mg_logv(level, component, fmt, ap);
    va_end(ap);
}
