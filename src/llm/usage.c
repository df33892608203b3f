/*
 * usage: reading the cost of an LLM response as it passes. See usage.h.
 *
 * The body is cut into units: the whole body (JSON), each line (NDJSON), each event's data
 * (SSE). A unit is gathered into `buf`: whole while it fits, else its head (HEAD_KEEP bytes)
 * and a tail that slides along. A unit worth reading (a quick search for the keys that matter
 * says so, so that the many token lines of a stream cost a memchr each) is parsed with jansson
 * when it is whole, or has its fields found in the head and tail when it is not.
 */
#include "usage.h"

#include "moongate/error.h"

#include <jansson.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#define UNIT_MAX (16 * 1024)   /* bytes of a unit kept whole */
#define HEAD_KEEP 1024         /* of a longer unit: its first bytes, and the rest of buf its tail */

enum sse_state { SSE_FIELD, SSE_VALUE_START, SSE_VALUE, SSE_SKIP, SSE_CR };

struct mg_usage_scanner {
    mg_usage_format_t format;
    mg_usage_t result;
    /* the unit being gathered, in a buffer that grows to UNIT_MAX as units need: most are a
       few hundred bytes, and a fixed 16 KiB per response made malloc grow and trim the heap on
       every request (bench scenario 1) */
    char *buf;
    size_t cap, len;           /* bytes allocated and in use */
    bool lost;                 /* out of memory: nothing more is read */
    uint64_t unit_bytes;       /* bytes of the unit so far (more than len once it slid) */
    /* SSE: the line being read */
    enum sse_state sse;
    char field[8];
    size_t field_len;
    bool event_has_data;
};

mg_usage_format_t mg_usage_format(const char *ct, size_t len)
{
    size_t n = 0;
    while (n < len && ct[n] != ';' && ct[n] != ' ' && ct[n] != '\t')
        n++;
    static const struct {
        const char *type;
        mg_usage_format_t f;
    } known[] = {
        { "application/json", MG_USAGE_JSON },
        { "application/x-ndjson", MG_USAGE_NDJSON },
        { "application/ndjson", MG_USAGE_NDJSON },
        { "text/event-stream", MG_USAGE_SSE },
    };
    for (size_t i = 0; i < sizeof(known) / sizeof(known[0]); i++)
        if (strlen(known[i].type) == n && strncasecmp(ct, known[i].type, n) == 0)
            return known[i].f;
    return MG_USAGE_NONE;
}

static void result_reset(mg_usage_t *u)
{
    memset(u, 0, sizeof(*u));
    u->prompt_tokens = u->completion_tokens = -1;
    u->total_duration_ns = u->load_duration_ns = -1;
    u->prompt_eval_duration_ns = u->eval_duration_ns = -1;
}

int mg_usage_scanner_new(mg_usage_format_t f, mg_usage_scanner_t **out)
{
    if (f == MG_USAGE_NONE)
        return MG_EINVAL;
    mg_usage_scanner_t *s = malloc(sizeof(*s));
    if (s == NULL)
        return MG_ENOMEM;
    s->format = f;
    result_reset(&s->result);
    s->buf = NULL;
    s->cap = 0;
    s->lost = false;
    s->len = 0;
    s->unit_bytes = 0;
    s->sse = SSE_FIELD;
    s->field_len = 0;
    s->event_has_data = false;
    *out = s;
    return 0;
}

void mg_usage_scanner_free(mg_usage_scanner_t *s)
{
    if (s == NULL)
        return;
    free(s->buf);
    free(s);
}

/* ---- gathering a unit ---- */

/* Makes room for n more bytes, up to UNIT_MAX. False when memory ran out. */
static bool unit_room(mg_usage_scanner_t *s, size_t n)
{
    if (s->len + n <= s->cap || s->cap == UNIT_MAX)
        return true;
    size_t cap = s->cap ? s->cap : 256;
    while (cap < s->len + n && cap < UNIT_MAX)
        cap *= 2;
    if (cap > UNIT_MAX)
        cap = UNIT_MAX;
    char *b = realloc(s->buf, cap);
    if (b == NULL) {
        s->lost = true;
        return false;
    }
    s->buf = b;
    s->cap = cap;
    return true;
}

static void unit_append(mg_usage_scanner_t *s, const char *p, size_t n)
{
    s->unit_bytes += n;
    if (s->lost || !unit_room(s, n))
        return;
    while (n > 0) {
        if (s->len == UNIT_MAX) {
            /* Slide the tail: keep the head and the newer half of what follows it. */
            size_t tail = UNIT_MAX - HEAD_KEEP, keep = tail / 2;
            memmove(s->buf + HEAD_KEEP, s->buf + UNIT_MAX - keep, keep);
            s->len = HEAD_KEEP + keep;
        }
        size_t k = UNIT_MAX - s->len < n ? UNIT_MAX - s->len : n;
        memcpy(s->buf + s->len, p, k);
        s->len += k;
        p += k;
        n -= k;
    }
}

static void unit_reset(mg_usage_scanner_t *s)
{
    s->len = 0;
    s->unit_bytes = 0;
}

/* ---- reading a unit ---- */

static bool is_ws(char c)
{
    return c == ' ' || c == '\t' || c == '\r' || c == '\n';
}

/*
 * Where the value of "key" starts in text: after the last occurrence of "key" followed by
 * optional whitespace and a colon. Inside a JSON string a quote is escaped, so the byte
 * sequence cannot come from a string's contents. NULL if none.
 */
static const char *find_value(const char *text, size_t len, const char *key)
{
    size_t kl = strlen(key);
    const char *found = NULL;
    for (const char *p = text; (size_t)(text + len - p) > kl + 2;) {
        const char *q = memchr(p, '"', (size_t)(text + len - p));
        if (q == NULL || (size_t)(text + len - q) < kl + 3)
            break;
        if (memcmp(q + 1, key, kl) == 0 && q[kl + 1] == '"') {
            const char *v = q + kl + 2;
            while (v < text + len && is_ws(*v))
                v++;
            if (v < text + len && *v == ':') {
                v++;
                while (v < text + len && is_ws(*v))
                    v++;
                if (v < text + len)
                    found = v;
            }
        }
        p = q + 1;
    }
    return found;
}

/* The JSON value that starts at v (anything may follow it), or NULL. */
static json_t *value_at(const char *v, const char *end)
{
    json_error_t e;
    return json_loadb(v, (size_t)(end - v), JSON_DISABLE_EOF_CHECK | JSON_DECODE_ANY, &e);
}

static int64_t int_of(json_t *v)
{
    if (json_is_integer(v) && json_integer_value(v) >= 0)
        return (int64_t)json_integer_value(v);
    if (json_is_real(v) && json_real_value(v) >= 0 && json_real_value(v) < 9.0e18)
        return (int64_t)json_real_value(v);
    return -1;
}

/* The model's name, made safe for a log line and a label: a byte outside '!'..'~' reads '?'. */
static void take_model(mg_usage_t *u, json_t *v)
{
    if (json_is_string(v) && json_string_length(v) > 0 &&
        json_string_length(v) <= MG_USAGE_MODEL_MAX) {
        const char *m = json_string_value(v);
        size_t n = json_string_length(v);
        for (size_t i = 0; i < n; i++)
            u->model[i] = m[i] > ' ' && m[i] <= '~' ? m[i] : '?';
        u->model[n] = '\0';
    }
}

/* OpenAI's usage object (chat and completions: prompt/completion; responses: input/output). */
static bool take_usage_object(mg_usage_t *u, json_t *o)
{
    if (!json_is_object(o))
        return false;
    int64_t p = int_of(json_object_get(o, "prompt_tokens"));
    int64_t c = int_of(json_object_get(o, "completion_tokens"));
    if (p < 0)
        p = int_of(json_object_get(o, "input_tokens"));
    if (c < 0)
        c = int_of(json_object_get(o, "output_tokens"));
    if (p < 0 && c < 0)
        return false;
    u->prompt_tokens = p;
    u->completion_tokens = c;
    return true;
}

static const char *const ollama_keys[] = {
    "prompt_eval_count", "eval_count", "total_duration", "load_duration",
    "prompt_eval_duration", "eval_duration",
};

static int64_t *ollama_field(mg_usage_t *u, size_t i)
{
    int64_t *fields[] = { &u->prompt_tokens, &u->completion_tokens, &u->total_duration_ns,
                          &u->load_duration_ns, &u->prompt_eval_duration_ns,
                          &u->eval_duration_ns };
    return fields[i];
}

/* A whole unit, parsed. Returns true if it held usage (into u). */
static bool read_whole(const char *text, size_t len, bool ollama_done, mg_usage_t *u)
{
    json_error_t e;
    json_t *root = json_loadb(text, len, 0, &e);
    if (!json_is_object(root)) {
        json_decref(root);
        return false;
    }
    mg_usage_t got;
    result_reset(&got);
    bool found = take_usage_object(&got, json_object_get(root, "usage"));
    if (!found && (!ollama_done || json_is_true(json_object_get(root, "done")))) {
        for (size_t i = 0; i < sizeof(ollama_keys) / sizeof(ollama_keys[0]); i++) {
            int64_t v = int_of(json_object_get(root, ollama_keys[i]));
            *ollama_field(&got, i) = v;
            found = found || (i < 2 && v >= 0);
        }
    }
    if (found) {
        take_model(&got, json_object_get(root, "model"));
        got.found = true;
        *u = got;
    }
    json_decref(root);
    return found;
}

/* A unit longer than buf: its head (model) and tail (the counts), searched. */
static bool read_windows(const char *head, size_t hlen, const char *tail, size_t tlen,
                         mg_usage_t *u)
{
    mg_usage_t got;
    result_reset(&got);
    bool found = false;
    const char *v = find_value(tail, tlen, "usage");
    if (v != NULL) {
        json_t *o = value_at(v, tail + tlen);
        found = take_usage_object(&got, o);
        json_decref(o);
    }
    if (!found) {
        for (size_t i = 0; i < sizeof(ollama_keys) / sizeof(ollama_keys[0]); i++) {
            v = find_value(tail, tlen, ollama_keys[i]);
            json_t *n = v ? value_at(v, tail + tlen) : NULL;
            *ollama_field(&got, i) = int_of(n);
            json_decref(n);
            found = found || (i < 2 && *ollama_field(&got, i) >= 0);
        }
    }
    if (!found)
        return false;
    v = find_value(head, hlen, "model");
    if (v != NULL) {
        json_t *m = value_at(v, head + hlen);
        take_model(&got, m);
        json_decref(m);
    }
    got.found = true;
    *u = got;
    return true;
}

/* A unit is complete: read it if it may hold usage. */
static void unit_end(mg_usage_scanner_t *s)
{
    if (s->lost || s->len == 0) {
        unit_reset(s);
        return;
    }
    const char *text = s->buf;
    size_t len = s->len;
    /* The quick test: a stream's token lines and events never name these keys. */
    bool ndjson = s->format == MG_USAGE_NDJSON;
    bool worth;
    if (ndjson) {
        /* Only the last record has eval_count; "done" may have slid out of a long one. */
        const char *done = find_value(text, len, "done");
        worth = (done != NULL && (size_t)(text + len - done) >= 4 && memcmp(done, "true", 4) == 0) ||
                find_value(text, len, "eval_count") != NULL;
    } else {
        /* OpenAI streams with include_usage say "usage": null in every other chunk. */
        const char *u = find_value(text, len, "usage");
        worth = (u != NULL && !((size_t)(text + len - u) >= 4 && memcmp(u, "null", 4) == 0)) ||
                find_value(text, len, "eval_count") != NULL;
    }
    if (worth) {
        if (s->unit_bytes == len)
            read_whole(text, len, ndjson, &s->result);
        else
            read_windows(text, HEAD_KEEP, text + HEAD_KEEP, len - HEAD_KEEP, &s->result);
    }
    unit_reset(s);
}

/* ---- the three framings ---- */

static void feed_lines(mg_usage_scanner_t *s, const char *p, size_t n)
{
    while (n > 0) {
        const char *nl = memchr(p, '\n', n);
        size_t k = nl ? (size_t)(nl - p) : n;
        unit_append(s, p, k);
        if (nl == NULL)
            return;
        unit_end(s);
        p += k + 1;
        n -= k + 1;
    }
}

/* One SSE line ended. */
static void sse_line_end(mg_usage_scanner_t *s, bool blank)
{
    if (blank) {
        if (s->event_has_data)
            unit_end(s);
        s->event_has_data = false;
        unit_reset(s);
    }
    s->field_len = 0;
}

static void feed_sse(mg_usage_scanner_t *s, const char *p, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        char c = p[i];
        if (s->sse == SSE_CR) {
            s->sse = SSE_FIELD;
            if (c == '\n')
                continue; /* CRLF is one line end */
        }
        if (c == '\r' || c == '\n') {
            bool blank = s->sse == SSE_FIELD && s->field_len == 0;
            if (s->sse == SSE_FIELD && s->field_len == 4 && memcmp(s->field, "data", 4) == 0) {
                /* "data" with no colon: an empty data line */
                if (s->event_has_data)
                    unit_append(s, "\n", 1);
                s->event_has_data = true;
            }
            sse_line_end(s, blank);
            s->sse = c == '\r' ? SSE_CR : SSE_FIELD;
            continue;
        }
        switch (s->sse) {
        case SSE_FIELD:
            if (c == ':') {
                bool data = s->field_len == 4 && memcmp(s->field, "data", 4) == 0;
                s->sse = data ? SSE_VALUE_START : SSE_SKIP;
                if (data) {
                    if (s->event_has_data)
                        unit_append(s, "\n", 1);
                    s->event_has_data = true;
                }
            } else if (s->field_len < sizeof(s->field)) {
                s->field[s->field_len++] = c;
            } else {
                s->sse = SSE_SKIP;
            }
            break;
        case SSE_VALUE_START:
            s->sse = SSE_VALUE;
            if (c == ' ')
                break; /* one space after the colon is not part of the value */
            /* fall through */
        case SSE_VALUE: {
            /* The rest of the line up to its end, in one append. */
            size_t j = i;
            while (j < n && p[j] != '\r' && p[j] != '\n')
                j++;
            unit_append(s, p + i, j - i);
            i = j - 1;
            break;
        }
        case SSE_SKIP:
        case SSE_CR:
            break;
        }
    }
}

void mg_usage_feed(mg_usage_scanner_t *s, const char *data, size_t len)
{
    switch (s->format) {
    case MG_USAGE_JSON:
        unit_append(s, data, len);
        break;
    case MG_USAGE_NDJSON:
        feed_lines(s, data, len);
        break;
    case MG_USAGE_SSE:
        feed_sse(s, data, len);
        break;
    case MG_USAGE_NONE:
        break;
    }
}

void mg_usage_result(mg_usage_scanner_t *s, mg_usage_t *out)
{
    /* What is left is the body (JSON), or a last line without its newline. */
    if (s->format == MG_USAGE_JSON || (s->format == MG_USAGE_NDJSON && s->unit_bytes > 0))
        unit_end(s);
    *out = s->result;
}

void mg_usage_model_family(const char *model, char out[33])
{
    const char *base = strrchr(model, '/');
    base = base ? base + 1 : model;
    size_t n = 0;
    while (n < 32 && ((base[n] >= 'a' && base[n] <= 'z') || (base[n] >= 'A' && base[n] <= 'Z'))) {
        out[n] = (char)(base[n] | 0x20);
        n++;
    }
    if (n == 0)
        memcpy(out, "other", 6);
    else
        out[n] = '\0';
}
