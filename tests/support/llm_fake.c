/*
 * The fake LLM servers' answers. See llm_fake.h.
 */
#include "llm_fake.h"

#include <jansson.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define DEFAULT_MODEL "fake-model"
#define CREATED_AT "2026-12-02T10:00:00.000000Z"
#define CREATED 1796205600

static const char *const words[] = { "Hello", " from", " the", " fake", " model", "." };
#define NWORDS (sizeof(words) / sizeof(words[0]))

enum phase { P_TOKENS, P_FINISH, P_USAGE, P_DONE, P_END };

mg_test_llm_api_t mg_test_llm_route(const char *path)
{
    if (strcmp(path, "/api/generate") == 0)
        return MG_TEST_LLM_OLLAMA_GENERATE;
    if (strcmp(path, "/api/chat") == 0)
        return MG_TEST_LLM_OLLAMA_CHAT;
    if (strcmp(path, "/v1/chat/completions") == 0)
        return MG_TEST_LLM_OPENAI_CHAT;
    if (strcmp(path, "/v1/completions") == 0)
        return MG_TEST_LLM_OPENAI_COMPLETIONS;
    return MG_TEST_LLM_NONE;
}

static bool is_openai(const mg_test_llm_t *l)
{
    return l->api == MG_TEST_LLM_OPENAI_CHAT || l->api == MG_TEST_LLM_OPENAI_COMPLETIONS;
}

static unsigned count_words(const char *s)
{
    unsigned n = 0;
    bool in = false;
    for (; s && *s; s++) {
        bool space = *s == ' ' || *s == '\t' || *s == '\n' || *s == '\r';
        n += !space && !in;
        in = !space;
    }
    return n;
}

/* The words of the prompt: "prompt" (a string), or every message's "content". */
static unsigned prompt_words(json_t *root)
{
    unsigned n = count_words(json_string_value(json_object_get(root, "prompt")));
    json_t *msgs = json_object_get(root, "messages");
    size_t i;
    json_t *m;
    json_array_foreach(msgs, i, m)
        n += count_words(json_string_value(json_object_get(m, "content")));
    return n ? n : 1;
}

static unsigned query_num(const char *query, const char *key, unsigned dflt)
{
    size_t klen = strlen(key);
    for (const char *p = query; p && *p; p = strchr(p, '&'), p = p ? p + 1 : NULL)
        if (strncmp(p, key, klen) == 0 && p[klen] == '=')
            return (unsigned)strtoul(p + klen + 1, NULL, 10);
    return dflt;
}

int mg_test_llm_start(mg_test_llm_t *l, mg_test_llm_api_t api, const char *query,
                      const char *body, size_t len)
{
    memset(l, 0, sizeof(*l));
    l->api = api;
    json_error_t e;
    json_t *root = json_loadb(body ? body : "", len, 0, &e);
    if (!json_is_object(root)) {
        json_decref(root);
        return -1;
    }
    const char *model = json_string_value(json_object_get(root, "model"));
    snprintf(l->model, sizeof(l->model), "%s", model && *model ? model : DEFAULT_MODEL);
    json_t *stream = json_object_get(root, "stream");
    /* Ollama streams unless told not to; OpenAI only when told to. */
    l->stream = is_openai(l) ? json_is_true(stream) : !json_is_false(stream);
    l->include_usage = json_is_true(
        json_object_get(json_object_get(root, "stream_options"), "include_usage"));
    json_t *max = is_openai(l) ? json_object_get(root, "max_tokens")
                               : json_object_get(json_object_get(root, "options"), "num_predict");
    l->completion_tokens = json_is_integer(max) && json_integer_value(max) > 0
                               ? (unsigned)json_integer_value(max)
                               : 5;
    l->prompt_tokens = prompt_words(root);
    json_decref(root);
    l->prompt_tokens = query_num(query, "prompt_tokens", l->prompt_tokens);
    l->completion_tokens = query_num(query, "tokens", l->completion_tokens);
    if (l->completion_tokens > 100000)
        l->completion_tokens = 100000;
    l->interval_ms = query_num(query, "interval_ms", 0);
    l->delay_ms = query_num(query, "delay_ms", 0);
    l->pad = query_num(query, "pad", 0);
    if (l->pad > 60000)
        l->pad = 60000;
    l->context = query_num(query, "context", 16);
    if (l->context > 100000)
        l->context = 100000;
    return 0;
}

const char *mg_test_llm_content_type(const mg_test_llm_t *l)
{
    if (!l->stream)
        return "application/json";
    return is_openai(l) ? "text/event-stream" : "application/x-ndjson";
}

/* A bounded writer into the caller's buffer. */
typedef struct out {
    char *buf;
    size_t cap, len;
} out_t;

__attribute__((format(printf, 2, 3)))
static void put(out_t *o, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(o->buf + o->len, o->cap - o->len, fmt, ap);
    va_end(ap);
    if (n > 0)
        o->len += (size_t)n < o->cap - o->len ? (size_t)n : o->cap - o->len - 1;
}

static void put_pad(out_t *o, unsigned n)
{
    for (unsigned i = 0; i < n && o->len + 1 < o->cap; i++)
        o->buf[o->len++] = 'x';
    o->buf[o->len] = '\0';
}

/* Token i's text, JSON-escaped already (the words need none), then the padding. */
static void put_token(out_t *o, const mg_test_llm_t *l, unsigned i)
{
    put(o, "%s", words[i % NWORDS]);
    put_pad(o, l->pad);
}

static void put_ollama_counts(out_t *o, const mg_test_llm_t *l)
{
    put(o, "\"total_duration\":%u,\"load_duration\":%u,\"prompt_eval_count\":%u,"
           "\"prompt_eval_duration\":%u,\"eval_count\":%u,\"eval_duration\":%u",
        5000000u + l->completion_tokens * 1000u, 1000000u, l->prompt_tokens,
        l->prompt_tokens * 10000u, l->completion_tokens, l->completion_tokens * 20000u);
}

static void put_context(out_t *o, const mg_test_llm_t *l)
{
    put(o, ",\"context\":[");
    for (unsigned i = 0; i < l->context; i++)
        put(o, "%s%u", i ? "," : "", 100000 + i);
    put(o, "]");
}

static void put_openai_usage(out_t *o, const mg_test_llm_t *l)
{
    put(o, "\"usage\":{\"prompt_tokens\":%u,\"completion_tokens\":%u,\"total_tokens\":%u}",
        l->prompt_tokens, l->completion_tokens, l->prompt_tokens + l->completion_tokens);
}

/* One OpenAI chunk: token i's text, or the finish (i == -1), as an SSE event. */
static void openai_chunk(out_t *o, const mg_test_llm_t *l, long i)
{
    bool chat = l->api == MG_TEST_LLM_OPENAI_CHAT;
    put(o, "data: {\"id\":\"%s-fake\",\"object\":\"%s\",\"created\":%u,\"model\":\"%s\","
           "\"choices\":[{\"index\":0,",
        chat ? "chatcmpl" : "cmpl", chat ? "chat.completion.chunk" : "text_completion",
        CREATED, l->model);
    if (chat) {
        put(o, "\"delta\":{");
        if (i >= 0) {
            put(o, "%s\"content\":\"", i == 0 ? "\"role\":\"assistant\"," : "");
            put_token(o, l, (unsigned)i);
            put(o, "\"");
        }
        put(o, "},");
    } else {
        put(o, "\"text\":\"");
        if (i >= 0)
            put_token(o, l, (unsigned)i);
        put(o, "\",");
    }
    put(o, "\"finish_reason\":%s}]", i >= 0 ? "null" : "\"stop\"");
    if (l->include_usage)
        put(o, ",\"usage\":null");
    put(o, "}\n\n");
}

static size_t next_openai(mg_test_llm_t *l, out_t *o)
{
    switch (l->phase) {
    case P_TOKENS:
        openai_chunk(o, l, l->sent++);
        if (l->sent == l->completion_tokens)
            l->phase = P_FINISH;
        break;
    case P_FINISH:
        openai_chunk(o, l, -1);
        l->phase = l->include_usage ? P_USAGE : P_DONE;
        break;
    case P_USAGE:
        put(o, "data: {\"id\":\"%s-fake\",\"object\":\"%s\",\"created\":%u,\"model\":\"%s\","
               "\"choices\":[],",
            l->api == MG_TEST_LLM_OPENAI_CHAT ? "chatcmpl" : "cmpl",
            l->api == MG_TEST_LLM_OPENAI_CHAT ? "chat.completion.chunk" : "text_completion",
            CREATED, l->model);
        put_openai_usage(o, l);
        put(o, "}\n\n");
        l->phase = P_DONE;
        break;
    case P_DONE:
        put(o, "data: [DONE]\n\n");
        l->phase = P_END;
        break;
    }
    return o->len;
}

static size_t next_ollama(mg_test_llm_t *l, out_t *o)
{
    bool chat = l->api == MG_TEST_LLM_OLLAMA_CHAT;
    if (l->phase == P_TOKENS) {
        put(o, "{\"model\":\"%s\",\"created_at\":\"%s\",", l->model, CREATED_AT);
        put(o, chat ? "\"message\":{\"role\":\"assistant\",\"content\":\"" : "\"response\":\"");
        put_token(o, l, l->sent++);
        put(o, chat ? "\"},\"done\":false}\n" : "\",\"done\":false}\n");
        if (l->sent == l->completion_tokens)
            l->phase = P_FINISH;
    } else if (l->phase == P_FINISH) {
        put(o, "{\"model\":\"%s\",\"created_at\":\"%s\",", l->model, CREATED_AT);
        put(o, chat ? "\"message\":{\"role\":\"assistant\",\"content\":\"\"}," : "\"response\":\"\",");
        put(o, "\"done\":true,\"done_reason\":\"stop\"");
        if (!chat)
            put_context(o, l);
        put(o, ",");
        put_ollama_counts(o, l);
        put(o, "}\n");
        l->phase = P_END;
    }
    return o->len;
}

size_t mg_test_llm_piece_max(const mg_test_llm_t *l)
{
    size_t tokens = l->stream ? 1 : l->completion_tokens;
    return 1024 + sizeof(l->model) + 12 * (size_t)l->context + tokens * (8 + (size_t)l->pad);
}

size_t mg_test_llm_next(mg_test_llm_t *l, char *buf, size_t cap)
{
    out_t o = { buf, cap, 0 };
    buf[0] = '\0';
    if (l->phase == P_END)
        return 0;
    if (l->phase == P_TOKENS && l->completion_tokens == 0)
        l->phase = P_FINISH;
    if (l->stream)
        return is_openai(l) ? next_openai(l, &o) : next_ollama(l, &o);

    /* One body: the whole completion, then the counts. */
    const char *field = l->api == MG_TEST_LLM_OLLAMA_GENERATE ? "\"response\":\"" : "";
    switch (l->api) {
    case MG_TEST_LLM_OLLAMA_GENERATE:
    case MG_TEST_LLM_OLLAMA_CHAT:
        put(&o, "{\"model\":\"%s\",\"created_at\":\"%s\",%s", l->model, CREATED_AT,
            l->api == MG_TEST_LLM_OLLAMA_CHAT ? "\"message\":{\"role\":\"assistant\","
                                                "\"content\":\""
                                              : field);
        for (unsigned i = 0; i < l->completion_tokens; i++)
            put_token(&o, l, i);
        put(&o, l->api == MG_TEST_LLM_OLLAMA_CHAT ? "\"}," : "\",");
        put(&o, "\"done\":true,\"done_reason\":\"stop\"");
        if (l->api == MG_TEST_LLM_OLLAMA_GENERATE)
            put_context(&o, l);
        put(&o, ",");
        put_ollama_counts(&o, l);
        put(&o, "}\n");
        break;
    default: {
        bool chat = l->api == MG_TEST_LLM_OPENAI_CHAT;
        put(&o, "{\"id\":\"%s-fake\",\"object\":\"%s\",\"created\":%u,\"model\":\"%s\","
                "\"choices\":[{\"index\":0,%s",
            chat ? "chatcmpl" : "cmpl", chat ? "chat.completion" : "text_completion", CREATED,
            l->model, chat ? "\"message\":{\"role\":\"assistant\",\"content\":\"" : "\"text\":\"");
        for (unsigned i = 0; i < l->completion_tokens; i++)
            put_token(&o, l, i);
        put(&o, "\"%s,\"finish_reason\":\"stop\"}],", chat ? "}" : "");
        put_openai_usage(&o, l);
        put(&o, "}\n");
        break;
    }
    }
    l->phase = P_END;
    return o.len;
}
