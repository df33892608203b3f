/*
 * json: a bounded text buffer and a streaming JSON writer on top of it.
 *
 * mg_strbuf_t is a growable byte buffer with a hard size limit, fixed when it is initialised:
 * an append that would pass the limit fails with MG_ENOMEM and leaves the buffer as it was, so
 * a response body can never grow without bound. Its bytes are always followed by a NUL. The
 * metrics module renders /metrics into one.
 *
 * mg_json_t writes one JSON document into its own mg_strbuf_t, value by value: objects,
 * arrays, keys, strings, numbers, booleans and null. It places the commas and colons itself and
 * refuses calls that would produce malformed JSON (a value in an object without a key, a key in
 * an array, closing the wrong container, a second top-level value) with MG_EINVAL. Errors are
 * sticky: after the first failure every call returns that same code and writes nothing, so a
 * caller may write a whole document and look at the result once, at mg_json_buf().
 *
 * Strings are escaped for JSON: quote and backslash get a backslash, every control character
 * (U+0000 to U+001F) becomes \u00XX, valid UTF-8 passes through unchanged and each byte of an
 * invalid UTF-8 sequence becomes U+FFFD, so the output is valid JSON whatever the input.
 * Doubles are written in the shortest form that reads back to the same value; NaN and the
 * infinities, which JSON cannot express, are written as null.
 *
 * Neither type allocates until the first write, and neither is thread-safe.
 */
#ifndef MOONGATE_JSON_H
#define MOONGATE_JSON_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* ---- the bounded buffer ---- */

/* Pass as max to mg_strbuf_init() for a buffer limited only by memory. */
#define MG_STRBUF_UNBOUNDED SIZE_MAX

typedef struct mg_strbuf {
    char *data;  /* read-only: the bytes, NUL-terminated; NULL until the first write */
    size_t len;  /* read-only: bytes held, not counting the NUL */
    size_t cap;  /* private */
    size_t max;  /* private: the most bytes it may hold */
} mg_strbuf_t;

/* Prepares an empty buffer that will hold at most max bytes. Allocates nothing. */
void mg_strbuf_init(mg_strbuf_t *sb, size_t max);

/* Frees the memory; the buffer is empty afterwards and may be used again with the same limit. */
void mg_strbuf_free(mg_strbuf_t *sb);

/* Empties the buffer and keeps its memory. */
void mg_strbuf_reset(mg_strbuf_t *sb);

/* Shortens the buffer to len bytes (no-op if it already holds no more). */
void mg_strbuf_truncate(mg_strbuf_t *sb, size_t len);

/*
 * The appenders below return 0, or MG_ENOMEM when the bytes would pass the limit or memory runs
 * out; on failure the buffer is unchanged.
 */
int mg_strbuf_append(mg_strbuf_t *sb, const void *p, size_t n);
int mg_strbuf_append_str(mg_strbuf_t *sb, const char *s);
int mg_strbuf_append_char(mg_strbuf_t *sb, char c);
int mg_strbuf_append_u64(mg_strbuf_t *sb, uint64_t v);
int mg_strbuf_append_i64(mg_strbuf_t *sb, int64_t v);

/*
 * Appends v in the shortest decimal form that reads back (strtod) to the same double, as C's
 * %g writes it ("0.001", "2.5", "1e+20"). NaN and the infinities are written the way the
 * Prometheus text format spells them: "NaN", "+Inf", "-Inf".
 */
int mg_strbuf_append_double(mg_strbuf_t *sb, double v);

/* ---- the JSON writer ---- */

/* Containers may nest this deep; one more begin_object/begin_array fails with MG_EINVAL. */
#define MG_JSON_MAX_DEPTH 32

typedef struct mg_json {
    mg_strbuf_t buf;                      /* read-only: the text so far */
    int err;                              /* private: the first error, or 0 */
    unsigned depth;                       /* private: open containers */
    uint8_t state[MG_JSON_MAX_DEPTH + 1]; /* private: per level, see json.c */
} mg_json_t;

/* Prepares a writer whose document may be at most max_size bytes. Allocates nothing. */
void mg_json_init(mg_json_t *j, size_t max_size);

/* Frees the text. The writer may be used again as after mg_json_reset(). */
void mg_json_free(mg_json_t *j);

/* Starts a new document, keeping the memory and the size limit; clears a sticky error. */
void mg_json_reset(mg_json_t *j);

/*
 * Each writer call returns 0, or the writer's first error: MG_ENOMEM (the document would pass
 * max_size, or out of memory) or MG_EINVAL (the call would make the JSON malformed, or nesting
 * passes MG_JSON_MAX_DEPTH).
 */
int mg_json_begin_object(mg_json_t *j);
int mg_json_end_object(mg_json_t *j);
int mg_json_begin_array(mg_json_t *j);
int mg_json_end_array(mg_json_t *j);

/* A member name; only directly inside an object, and each must be followed by one value. */
int mg_json_key(mg_json_t *j, const char *key);
int mg_json_key_n(mg_json_t *j, const char *key, size_t n);

/* A string value, escaped as the header says; NULL writes null. */
int mg_json_string(mg_json_t *j, const char *s);
int mg_json_string_n(mg_json_t *j, const char *s, size_t n);

int mg_json_int(mg_json_t *j, int64_t v);
int mg_json_uint(mg_json_t *j, uint64_t v);
int mg_json_double(mg_json_t *j, double v); /* non-finite values are written as null */
int mg_json_bool(mg_json_t *j, bool v);
int mg_json_null(mg_json_t *j);

/* The writer's sticky error: 0, MG_ENOMEM or MG_EINVAL. */
int mg_json_error(const mg_json_t *j);

/*
 * The finished document, NUL-terminated, and its length in *len (len may be NULL). Returns NULL
 * if a call failed or the document is incomplete (no value yet, or a container still open).
 * The text belongs to the writer and stays valid until the next call on it.
 */
const char *mg_json_buf(const mg_json_t *j, size_t *len);

#endif
