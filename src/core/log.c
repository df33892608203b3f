#include "moongate/log.h"

#include "moongate/error.h"

#include <stdio.h>
#include <string.h>
#include <sys/time.h>
#include <time.h>

static mg_log_level_t log_level = MG_LOG_INFO;
static mg_log_format_t log_format = MG_LOG_TEXT;

static const char *const level_names[] = { "error", "warn", "info", "debug", "trace" };

void mg_log_set_level(mg_log_level_t level)
{
    log_level = level;
}

void mg_log_set_format(mg_log_format_t format)
{
    log_format = format;
}

int mg_log_format_parse(const char *name, mg_log_format_t *out)
{
    if (strcmp(name, "text") == 0)
        *out = MG_LOG_TEXT;
    else if (strcmp(name, "json") == 0)
        *out = MG_LOG_JSON;
    else
        return MG_EINVAL;
    return 0;
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

/* Appends to a line of cap bytes, keeping three for the end ("\"}\n"). A line that runs out
   of room is cut between escapes and characters, never inside one. */
typedef struct out {
    char *p;
    size_t len, cap;
    bool full;
} out_t;

static void put_n(out_t *o, const char *s, size_t n, bool whole)
{
    size_t room = o->cap - 3 - o->len;
    if (o->full)
        return;
    if (n > room) {
        o->full = true;
        if (whole)
            return;
        n = room;
    }
    memcpy(o->p + o->len, s, n);
    o->len += n;
}

/* ASCII that may be cut anywhere. */
static void put(out_t *o, const char *s, size_t n)
{
    put_n(o, s, n, false);
}

static void puts_(out_t *o, const char *s)
{
    put_n(o, s, strlen(s), true);
}

/* The length of the valid UTF-8 sequence at s (n bytes left), or 0. */
static size_t utf8_len(const unsigned char *s, size_t n)
{
    size_t len;
    unsigned min;
    unsigned cp;
    if (s[0] >= 0xc2 && s[0] <= 0xdf) {
        len = 2, min = 0x80, cp = s[0] & 0x1f;
    } else if (s[0] >= 0xe0 && s[0] <= 0xef) {
        len = 3, min = 0x800, cp = s[0] & 0x0f;
    } else if (s[0] >= 0xf0 && s[0] <= 0xf4) {
        len = 4, min = 0x10000, cp = s[0] & 0x07;
    } else {
        return 0;
    }
    if (n < len)
        return 0;
    for (size_t i = 1; i < len; i++) {
        if ((s[i] & 0xc0) != 0x80)
            return 0;
        cp = (cp << 6) | (s[i] & 0x3f);
    }
    if (cp < min || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff))
        return 0;
    return len;
}

/* s as a JSON string's contents: control bytes escaped, invalid UTF-8 as U+FFFD. */
static void put_json(out_t *o, const char *s, size_t n)
{
    static const char hex[] = "0123456789abcdef";
    const unsigned char *u = (const unsigned char *)s;
    size_t i = 0;
    while (i < n) {
        size_t run = i;
        while (run < n && u[run] >= 0x20 && u[run] < 0x80 && u[run] != '"' && u[run] != '\\')
            run++;
        put(o, s + i, run - i);
        i = run;
        if (i >= n)
            break;
        unsigned char c = u[i];
        if (c == '"' || c == '\\') {
            char e[2] = { '\\', (char)c };
            put_n(o, e, 2, true);
            i++;
        } else if (c < 0x20) {
            char e[6] = { '\\', 'u', '0', '0', hex[c >> 4], hex[c & 15] };
            put_n(o, e, 6, true);
            i++;
        } else {
            size_t l = utf8_len(u + i, n - i);
            if (l > 0) {
                put_n(o, s + i, l, true);
                i += l;
            } else {
                puts_(o, "\\ufffd");
                i++;
            }
        }
    }
}

/* One leading NAME=VALUE field of msg: its name and value (quotes and escapes still in a
   quoted value) and where the next word starts. Returns false at the first word that is not
   one. */
typedef struct field {
    const char *name, *value;
    size_t name_len, value_len;
    bool quoted;
} field_t;

static bool next_field(const char **msg, field_t *f)
{
    const char *p = *msg;
    const char *n = p;
    while ((*p >= 'a' && *p <= 'z') || *p == '_')
        p++;
    if (p == n || *p != '=')
        return false;
    f->name = n;
    f->name_len = (size_t)(p - n);
    p++;
    if (*p == '"') {
        const char *v = ++p;
        while (*p && *p != '"')
            p += (*p == '\\' && p[1]) ? 2 : 1;
        if (*p != '"')
            return false;
        f->value = v;
        f->value_len = (size_t)(p - v);
        f->quoted = true;
        p++;
    } else {
        f->value = p;
        while (*p && *p != ' ')
            p++;
        f->value_len = (size_t)(p - f->value);
        f->quoted = false;
    }
    if (*p != ' ' && *p != '\0')
        return false;
    while (*p == ' ')
        p++;
    *msg = p;
    return true;
}

static void put_field(out_t *o, const field_t *f)
{
    if (!f->quoted && f->value_len == 1 && f->value[0] == '-')
        return; /* nothing known */
    puts_(o, ",\"");
    if (f->name_len == 3 && memcmp(f->name, "req", 3) == 0)
        puts_(o, "request_id");
    else
        put(o, f->name, f->name_len);
    puts_(o, "\":");
    bool digits = !f->quoted && f->value_len > 0 && f->value_len < 16 &&
                  (f->value[0] != '0' || f->value_len == 1);
    for (size_t i = 0; digits && i < f->value_len; i++)
        digits = f->value[i] >= '0' && f->value[i] <= '9';
    if (digits) {
        put(o, f->value, f->value_len);
        return;
    }
    puts_(o, "\"");
    if (!f->quoted) {
        put_json(o, f->value, f->value_len);
    } else {
        /* Undo the text form's \" and \\ before escaping for JSON. */
        for (size_t i = 0; i < f->value_len; i++) {
            if (f->value[i] == '\\' && i + 1 < f->value_len)
                i++;
            put_json(o, f->value + i, 1);
        }
    }
    puts_(o, "\"");
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
    char when[64];
    snprintf(when, sizeof(when), "%04d-%02d-%02dT%02d:%02d:%02d.%03dZ", tm.tm_year + 1900,
             tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec,
             (int)(tv.tv_usec / 1000));
    if (log_format == MG_LOG_TEXT) {
        int n = snprintf(line, cap, "%s %-5s %s: ", when, mg_log_level_name(level), component);
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

    if (cap < 128) /* room for the members before msg */
        return 0;
    char msg[2048];
    vsnprintf(msg, sizeof(msg), fmt, ap);
    out_t o = { .p = line, .cap = cap };
    puts_(&o, "{\"time\":\"");
    puts_(&o, when);
    puts_(&o, "\",\"level\":\"");
    puts_(&o, mg_log_level_name(level));
    puts_(&o, "\",\"component\":\"");
    put_json(&o, component, strlen(component));
    puts_(&o, "\"");
    /* Each field whole or not at all, leaving room for the msg member's start. */
    const char *rest = msg;
    field_t f;
    o.cap -= 8;
    while (next_field(&rest, &f)) {
        char one[1024];
        out_t fo = { .p = one, .cap = sizeof(one) };
        put_field(&fo, &f);
        if (!fo.full)
            put_n(&o, one, fo.len, true);
    }
    o.cap += 8;
    o.full = false;
    puts_(&o, ",\"msg\":\"");
    put_json(&o, rest, strlen(rest));
    line[o.len++] = '"';
    line[o.len++] = '}';
    line[o.len++] = '\n';
    return o.len;
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
