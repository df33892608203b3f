/*
 * usage: what an LLM response says it cost, read as it streams past; not a byte of it changes.
 *
 * Three shapes are recognised by the response's Content-Type:
 *   - one JSON body (application/json): OpenAI's "usage" object, or Ollama's record when it
 *     does not stream;
 *   - NDJSON (application/x-ndjson): Ollama's streams, whose last line says "done": true and
 *     carries the counts (prompt_eval_count, eval_count) and the durations;
 *   - Server-Sent Events (text/event-stream): OpenAI-compatible streams, where the usage comes
 *     in an event of its own when the client asked for stream_options.include_usage (vLLM and
 *     llama.cpp's server send it the same way).
 * Anything else is not looked at. A unit (the body, a line, an event's data) is kept whole up to
 * 16 KiB and parsed with jansson; a longer one (a long completion in one JSON body, an Ollama
 * record with a large context) keeps its first 1 KiB and its last 15 KiB, where those fields
 * are, and the fields are found there. The memory of a scanner is fixed.
 */
#ifndef MOONGATE_USAGE_H
#define MOONGATE_USAGE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

typedef enum mg_usage_format {
    MG_USAGE_NONE,
    MG_USAGE_JSON,
    MG_USAGE_NDJSON,
    MG_USAGE_SSE,
} mg_usage_format_t;

#define MG_USAGE_MODEL_MAX 127

typedef struct mg_usage {
    bool found;                  /* a usage record was read */
    char model[MG_USAGE_MODEL_MAX + 1]; /* "" when not said; bytes outside ! to ~ read ? */
    int64_t prompt_tokens;       /* -1 when not said */
    int64_t completion_tokens;
    int64_t total_duration_ns;   /* Ollama's; -1 when not said */
    int64_t load_duration_ns;
    int64_t prompt_eval_duration_ns;
    int64_t eval_duration_ns;
} mg_usage_t;

/* The format a Content-Type value names (parameters and case ignored). */
mg_usage_format_t mg_usage_format(const char *content_type, size_t len);

typedef struct mg_usage_scanner mg_usage_scanner_t;

/* A scanner for a response of format f (not NONE). Returns 0, MG_EINVAL or MG_ENOMEM. */
int mg_usage_scanner_new(mg_usage_format_t f, mg_usage_scanner_t **out);
void mg_usage_scanner_free(mg_usage_scanner_t *s);

/* The next body bytes, decoded (as the client gets them), in pieces of any size. */
void mg_usage_feed(mg_usage_scanner_t *s, const char *data, size_t len);

/* What was found once the body ended (or was cut): found is false if nothing was. */
void mg_usage_result(mg_usage_scanner_t *s, mg_usage_t *out);

/*
 * The family of a model name, for a metric label of bounded cardinality: the leading letters
 * of its last path element, lower case ("llama3.1:8b" -> "llama", "Qwen/Qwen2.5-7B" -> "qwen",
 * "gpt-4o-mini" -> "gpt"); "other" when there are none. out has room for 32 bytes.
 */
void mg_usage_model_family(const char *model, char out[33]);

#endif
