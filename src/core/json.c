#include "moongate/json.h"

#include "moongate/error.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---- mg_strbuf_t ---- */

void mg_strbuf_init(mg_strbuf_t *sb, size_t max)
{
    *sb = (mg_strbuf_t){ .max = max };
}

void mg_strbuf_free(mg_strbuf_t *sb)
{
    free(sb->data);
    sb->data = NULL;
    sb->len = 0;
    sb->cap = 0;
}

void mg_strbuf_reset(mg_strbuf_t *sb)
{
    mg_strbuf_truncate(sb, 0);
}

void mg_strbuf_truncate(mg_strbuf_t *sb, size_t len)
{
    if (len >= sb->len)
        return;
    sb->len = len;
    sb->data[len] = '\0';
}

/*
 * Makes room for n more bytes and the NUL after them. Fails, changing nothing, when the limit
 * would be passed; the capacity never exceeds max + 1, so a small limit also bounds the memory.
 */
static int reserve(mg_strbuf_t *sb, size_t n)
{
    if (n > sb->max - sb->len || n >= SIZE_MAX - sb->len)
        return MG_ENOMEM;
    size_t need = sb->len + n + 1;
    if (need <= sb->cap)
        return 0;
    size_t cap = sb->cap ? sb->cap : 256;
    while (cap < need)
        cap = cap > SIZE_MAX / 2 ? need : cap * 2;
    if (sb->max != SIZE_MAX && cap > sb->max + 1)
        cap = sb->max + 1;
    char *d = realloc(sb->data, cap);
    if (d == NULL)
        return MG_ENOMEM;
    sb->data = d;
    sb->cap = cap;
    return 0;
}

int mg_strbuf_append(mg_strbuf_t *sb, const void *p, size_t n)
{
    int rc = reserve(sb, n);
    if (rc != 0)
        return rc;
    if (n > 0)
        memcpy(sb->data + sb->len, p, n);
    sb->len += n;
    sb->data[sb->len] = '\0';
    return 0;
}

int mg_strbuf_append_str(mg_strbuf_t *sb, const char *s)
{
    return mg_strbuf_append(sb, s, strlen(s));
}

int mg_strbuf_append_char(mg_strbuf_t *sb, char c)
{
    return mg_strbuf_append(sb, &c, 1);
}

int mg_strbuf_append_u64(mg_strbuf_t *sb, uint64_t v)
{
    char tmp[20];
    size_t i = sizeof(tmp);
    do {
        tmp[--i] = (char)('0' + v % 10);
        v /= 10;
    } while (v != 0);
    return mg_strbuf_append(sb, tmp + i, sizeof(tmp) - i);
}

int mg_strbuf_append_i64(mg_strbuf_t *sb, int64_t v)
{
    if (v >= 0)
        return mg_strbuf_append_u64(sb, (uint64_t)v);
    /* Negate in unsigned arithmetic: -INT64_MIN does not fit an int64_t. */
    char tmp[21];
    uint64_t u = (uint64_t)0 - (uint64_t)v;
    size_t i = sizeof(tmp);
    do {
        tmp[--i] = (char)('0' + u % 10);
        u /= 10;
    } while (u != 0);
    tmp[--i] = '-';
    return mg_strbuf_append(sb, tmp + i, sizeof(tmp) - i);
}

int mg_strbuf_append_double(mg_strbuf_t *sb, double v)
{
    if (isnan(v))
        return mg_strbuf_append_str(sb, "NaN");
    if (isinf(v))
        return mg_strbuf_append_str(sb, v > 0 ? "+Inf" : "-Inf");

    /*
     * The fewest significant digits that survive a round trip: most values people write (0.25,
     * 60, 1e-05) need 15 or fewer; any double needs at most 17.
     */
    char tmp[32];
    int n = 0;
    for (int prec = 15; prec <= 17; prec++) {
        n = snprintf(tmp, sizeof(tmp), "%.*g", prec, v);
        if (n <= 0 || (size_t)n >= sizeof(tmp))
            return MG_EINVAL; /* cannot happen for a finite double */
        if (strtod(tmp, NULL) == v)
            break;
    }
    /* A process whose LC_NUMERIC uses a decimal comma would otherwise write invalid output. */
    for (int i = 0; i < n; i++)
        if (tmp[i] == ',')
            tmp[i] = '.';
    return mg_strbuf_append(sb, tmp, (size_t)n);
}

/* ---- mg_json_t ---- */

/*
 * state[0] describes the document, state[1..depth] the open containers:
 *   ST_OBJECT  the container is an object (else an array);
 *   ST_MEMBER  it already holds a member (so the next one needs a comma); for the document,
 *              the top-level value has been started;
 *   ST_KEY     a key has been written and its value has not (objects only).
 */
enum {
    ST_OBJECT = 1,
    ST_MEMBER = 2,
    ST_KEY = 4,
};

void mg_json_init(mg_json_t *j, size_t max_size)
{
    *j = (mg_json_t){ 0 };
    mg_strbuf_init(&j->buf, max_size);
}

void mg_json_free(mg_json_t *j)
{
    mg_strbuf_free(&j->buf);
    mg_json_reset(j);
}

void mg_json_reset(mg_json_t *j)
{
    mg_strbuf_reset(&j->buf);
    j->err = 0;
    j->depth = 0;
    j->state[0] = 0;
}

int mg_json_error(const mg_json_t *j)
{
    return j->err;
}

static int fail(mg_json_t *j, int err)
{
    j->err = err;
    return err;
}

static int put(mg_json_t *j, const char *p, size_t n)
{
    int rc = mg_strbuf_append(&j->buf, p, n);
    return rc != 0 ? fail(j, rc) : 0;
}

/* Checks that a value may come next and writes the comma before it if one is due. */
static int before_value(mg_json_t *j)
{
    if (j->err != 0)
        return j->err;
    uint8_t *st = &j->state[j->depth];
    if (j->depth == 0) {
        if (*st & ST_MEMBER)
            return fail(j, MG_EINVAL); /* a document holds one value */
        *st |= ST_MEMBER;
        return 0;
    }
    if (*st & ST_OBJECT) {
        if (!(*st & ST_KEY))
            return fail(j, MG_EINVAL); /* a value in an object needs its key first */
        *st &= (uint8_t)~ST_KEY;
        return 0;
    }
    if (*st & ST_MEMBER)
        return put(j, ",", 1);
    *st |= ST_MEMBER;
    return 0;
}

/* Byte length of the valid UTF-8 sequence at s (n bytes left, s[0] >= 0x80), or 0 if invalid. */
static size_t utf8_len(const unsigned char *s, size_t n)
{
    unsigned char c = s[0];
    size_t len;
    unsigned char lo = 0x80, hi = 0xBF; /* the range allowed for the second byte */
    if (c >= 0xC2 && c <= 0xDF) {
        len = 2;
    } else if (c >= 0xE0 && c <= 0xEF) {
        len = 3;
        if (c == 0xE0)
            lo = 0xA0; /* overlong */
        else if (c == 0xED)
            hi = 0x9F; /* UTF-16 surrogates */
    } else if (c >= 0xF0 && c <= 0xF4) {
        len = 4;
        if (c == 0xF0)
            lo = 0x90; /* overlong */
        else if (c == 0xF4)
            hi = 0x8F; /* past U+10FFFF */
    } else {
        return 0;
    }
    if (n < len || s[1] < lo || s[1] > hi)
        return 0;
    for (size_t i = 2; i < len; i++)
        if (s[i] < 0x80 || s[i] > 0xBF)
            return 0;
    return len;
}

/* Writes s as a quoted, escaped JSON string. Runs of bytes that need no escape go in one copy. */
static int put_string(mg_json_t *j, const char *str, size_t n)
{
    static const char hex[] = "0123456789abcdef";
    const unsigned char *s = (const unsigned char *)str;
    size_t run = 0; /* start of the pending unescaped run */
    size_t i = 0;
    int rc = put(j, "\"", 1);

    while (rc == 0 && i < n) {
        unsigned char c = s[i];
        if (c >= 0x20 && c != '"' && c != '\\' && c < 0x80) {
            i++;
            continue;
        }
        if (c >= 0x80) {
            size_t len = utf8_len(s + i, n - i);
            if (len > 0) {
                i += len;
                continue;
            }
        }
        rc = put(j, str + run, i - run);
        if (rc != 0)
            break;
        if (c >= 0x80) {
            rc = put(j, "\\ufffd", 6);
        } else if (c < 0x20) {
            char esc[6] = { '\\', 'u', '0', '0', hex[c >> 4], hex[c & 15] };
            rc = put(j, esc, sizeof(esc));
        } else {
            char esc[2] = { '\\', (char)c };
            rc = put(j, esc, sizeof(esc));
        }
        run = ++i;
    }
    if (rc == 0)
        rc = put(j, str + run, n - run);
    if (rc == 0)
        rc = put(j, "\"", 1);
    return rc;
}

static int begin(mg_json_t *j, uint8_t kind, char open)
{
    int rc = before_value(j);
    if (rc != 0)
        return rc;
    if (j->depth >= MG_JSON_MAX_DEPTH)
        return fail(j, MG_EINVAL);
    rc = put(j, &open, 1);
    if (rc != 0)
        return rc;
    j->state[++j->depth] = kind;
    return 0;
}

static int end(mg_json_t *j, uint8_t kind, char close)
{
    if (j->err != 0)
        return j->err;
    if (j->depth == 0)
        return fail(j, MG_EINVAL);
    uint8_t st = j->state[j->depth];
    if ((st & ST_OBJECT) != kind || (st & ST_KEY))
        return fail(j, MG_EINVAL); /* the wrong container, or a key left without its value */
    int rc = put(j, &close, 1);
    if (rc != 0)
        return rc;
    j->depth--;
    return 0;
}

int mg_json_begin_object(mg_json_t *j)
{
    return begin(j, ST_OBJECT, '{');
}

int mg_json_end_object(mg_json_t *j)
{
    return end(j, ST_OBJECT, '}');
}

int mg_json_begin_array(mg_json_t *j)
{
    return begin(j, 0, '[');
}

int mg_json_end_array(mg_json_t *j)
{
    return end(j, 0, ']');
}

int mg_json_key_n(mg_json_t *j, const char *key, size_t n)
{
    if (j->err != 0)
        return j->err;
    uint8_t *st = &j->state[j->depth];
    if (j->depth == 0 || !(*st & ST_OBJECT) || (*st & ST_KEY) || key == NULL)
        return fail(j, MG_EINVAL);
    int rc = 0;
    if (*st & ST_MEMBER)
        rc = put(j, ",", 1);
    if (rc == 0)
        rc = put_string(j, key, n);
    if (rc == 0)
        rc = put(j, ":", 1);
    *st |= ST_MEMBER | ST_KEY;
    return rc;
}

int mg_json_key(mg_json_t *j, const char *key)
{
    if (key == NULL)
        return j->err != 0 ? j->err : fail(j, MG_EINVAL);
    return mg_json_key_n(j, key, strlen(key));
}

int mg_json_string_n(mg_json_t *j, const char *s, size_t n)
{
    if (s == NULL)
        return mg_json_null(j);
    int rc = before_value(j);
    return rc != 0 ? rc : put_string(j, s, n);
}

int mg_json_string(mg_json_t *j, const char *s)
{
    return mg_json_string_n(j, s, s != NULL ? strlen(s) : 0);
}

static int put_rc(mg_json_t *j, int rc)
{
    return rc != 0 ? fail(j, rc) : 0;
}

int mg_json_int(mg_json_t *j, int64_t v)
{
    int rc = before_value(j);
    return rc != 0 ? rc : put_rc(j, mg_strbuf_append_i64(&j->buf, v));
}

int mg_json_uint(mg_json_t *j, uint64_t v)
{
    int rc = before_value(j);
    return rc != 0 ? rc : put_rc(j, mg_strbuf_append_u64(&j->buf, v));
}

int mg_json_double(mg_json_t *j, double v)
{
    if (!isfinite(v))
        return mg_json_null(j);
    int rc = before_value(j);
    return rc != 0 ? rc : put_rc(j, mg_strbuf_append_double(&j->buf, v));
}

int mg_json_bool(mg_json_t *j, bool v)
{
    int rc = before_value(j);
    return rc != 0 ? rc : (v ? put(j, "true", 4) : put(j, "false", 5));
}

int mg_json_null(mg_json_t *j)
{
    int rc = before_value(j);
    return rc != 0 ? rc : put(j, "null", 4);
}

const char *mg_json_buf(const mg_json_t *j, size_t *len)
{
    if (j->err != 0 || j->depth != 0 || !(j->state[0] & ST_MEMBER))
        return NULL;
    if (len != NULL)
        *len = j->buf.len;
    return j->buf.data;
}
