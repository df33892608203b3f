/*
 * Unit tests for src/llm/usage.c: the usage an Ollama or OpenAI-compatible response reports, read
 * from JSON bodies, NDJSON streams and SSE streams, each fed whole and split at every offset
 * (with the same result), bodies too long to keep whole, and text that only looks like usage.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "moongate/error.h"
#include "llm/usage.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static void scan(mg_usage_format_t f, const char *in, size_t len, size_t split, mg_usage_t *u)
{
    mg_usage_scanner_t *s;
    assert_int_equal(mg_usage_scanner_new(f, &s), 0);
    if (split == 0) {
        mg_usage_feed(s, in, len);
    } else {
        for (size_t off = 0; off < len; off += split)
            mg_usage_feed(s, in + off, len - off < split ? len - off : split);
    }
    mg_usage_result(s, u);
    mg_usage_scanner_free(s);
}

/* Scans in whole, byte by byte and in pieces of every size up to 64: all must agree. */
static void expect(mg_usage_format_t f, const char *in, const char *model, int64_t prompt,
                   int64_t completion)
{
    size_t len = strlen(in);
    mg_usage_t whole;
    scan(f, in, len, 0, &whole);
    if (model == NULL) {
        assert_false(whole.found);
    } else {
        if (!whole.found)
            fail_msg("no usage found in:\n%.300s", in);
        assert_string_equal(whole.model, model);
        assert_int_equal(whole.prompt_tokens, prompt);
        assert_int_equal(whole.completion_tokens, completion);
    }
    for (size_t split = 1; split <= 64 && split < len; split++) {
        mg_usage_t u;
        scan(f, in, len, split, &u);
        assert_int_equal(u.found, whole.found);
        assert_string_equal(u.model, whole.model);
        assert_int_equal(u.prompt_tokens, whole.prompt_tokens);
        assert_int_equal(u.completion_tokens, whole.completion_tokens);
        assert_int_equal(u.eval_duration_ns, whole.eval_duration_ns);
    }
}

static void test_formats(void **state)
{
    static const struct {
        const char *ct;
        mg_usage_format_t f;
    } cases[] = {
        { "application/json", MG_USAGE_JSON },
        { "application/json; charset=utf-8", MG_USAGE_JSON },
        { "Application/JSON", MG_USAGE_JSON },
        { "application/x-ndjson", MG_USAGE_NDJSON },
        { "text/event-stream", MG_USAGE_SSE },
        { "text/event-stream;charset=UTF-8", MG_USAGE_SSE },
        { "text/plain", MG_USAGE_NONE },
        { "application/jsonx", MG_USAGE_NONE },
        { "", MG_USAGE_NONE },
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++)
        assert_int_equal(mg_usage_format(cases[i].ct, strlen(cases[i].ct)), cases[i].f);
    mg_usage_scanner_t *s;
    assert_int_equal(mg_usage_scanner_new(MG_USAGE_NONE, &s), MG_EINVAL);
}

static void test_ollama_stream_and_json(void **state)
{
    static const char stream[] =
        "{\"model\":\"llama3.1:8b\",\"created_at\":\"2026-12-02T10:00:00Z\","
        "\"message\":{\"role\":\"assistant\",\"content\":\"The\"},\"done\":false}\n"
        "{\"model\":\"llama3.1:8b\",\"message\":{\"role\":\"assistant\",\"content\":\" sky\"},"
        "\"done\":false}\n"
        "{\"model\":\"llama3.1:8b\",\"created_at\":\"2026-12-02T10:00:01Z\",\"message\":"
        "{\"role\":\"assistant\",\"content\":\"\"},\"done_reason\":\"stop\",\"done\":true,"
        "\"total_duration\":5043500667,\"load_duration\":2525154833,\"prompt_eval_count\":26,"
        "\"prompt_eval_duration\":383809000,\"eval_count\":298,\"eval_duration\":2121237000}\n";
    expect(MG_USAGE_NDJSON, stream, "llama3.1:8b", 26, 298);
    mg_usage_t u;
    scan(MG_USAGE_NDJSON, stream, sizeof(stream) - 1, 0, &u);
    assert_int_equal(u.total_duration_ns, 5043500667LL);
    assert_int_equal(u.load_duration_ns, 2525154833LL);
    assert_int_equal(u.prompt_eval_duration_ns, 383809000);
    assert_int_equal(u.eval_duration_ns, 2121237000);

    /* The last line without its newline; and the same record as one JSON body. */
    static const char last[] = "{\"model\":\"m\",\"done\":true,\"prompt_eval_count\":1,"
                               "\"eval_count\":2}";
    expect(MG_USAGE_NDJSON, last, "m", 1, 2);
    expect(MG_USAGE_JSON, last, "m", 1, 2);
    /* A cached prompt: no prompt_eval_count. */
    expect(MG_USAGE_JSON, "{\"model\":\"m\",\"done\":true,\"eval_count\":7}", "m", -1, 7);
    /* A stream that stopped before its last record. */
    expect(MG_USAGE_NDJSON, "{\"model\":\"m\",\"done\":false}\n{\"model\":\"m\",\"do", NULL, 0,
           0);
}

static void test_openai_json_and_sse(void **state)
{
    static const char body[] =
        "{\"id\":\"chatcmpl-1\",\"object\":\"chat.completion\",\"model\":\"gpt-4o-mini\","
        "\"choices\":[{\"index\":0,\"message\":{\"role\":\"assistant\",\"content\":\"Hi\"},"
        "\"finish_reason\":\"stop\"}],\"usage\":{\"prompt_tokens\":19,\"completion_tokens\":10,"
        "\"total_tokens\":29}}";
    expect(MG_USAGE_JSON, body, "gpt-4o-mini", 19, 10);
    /* The Responses API's names. */
    expect(MG_USAGE_JSON, "{\"model\":\"o3\",\"usage\":{\"input_tokens\":5,\"output_tokens\":6}}",
           "o3", 5, 6);

    static const char sse[] =
        "data: {\"id\":\"c\",\"model\":\"Qwen/Qwen2.5-7B\",\"choices\":[{\"index\":0,\"delta\":"
        "{\"content\":\"Hel\"}}],\"usage\":null}\n\n"
        ": a comment\n"
        "event: message\ndata: {\"id\":\"c\",\"model\":\"Qwen/Qwen2.5-7B\",\"choices\":[{\"index\":0,"
        "\"delta\":{\"content\":\"lo\"}}],\"usage\":null}\n\n"
        "data: {\"id\":\"c\",\"model\":\"Qwen/Qwen2.5-7B\",\"choices\":[],\"usage\":"
        "{\"prompt_tokens\":12,\"completion_tokens\":2,\"total_tokens\":14}}\n\n"
        "data: [DONE]\n\n";
    expect(MG_USAGE_SSE, sse, "Qwen/Qwen2.5-7B", 12, 2);
    /* CRLF and CR line ends, and an event's data on two lines. */
    static const char crlf[] =
        "data: {\"model\":\"llama\",\r\ndata: \"usage\":{\"prompt_tokens\":3,"
        "\"completion_tokens\":4}}\r\n\r\ndata: [DONE]\r\r";
    expect(MG_USAGE_SSE, crlf, "llama", 3, 4);
    /* A stream without usage (the client did not ask for it). */
    expect(MG_USAGE_SSE,
           "data: {\"model\":\"m\",\"choices\":[{\"delta\":{\"content\":\"x\"}}]}\n\ndata: [DONE]\n\n",
           NULL, 0, 0);
}

static void test_lookalikes_and_garbage(void **state)
{
    /* Usage named inside the text is escaped there: it is not the response's usage. */
    expect(MG_USAGE_JSON,
           "{\"model\":\"m\",\"choices\":[{\"message\":{\"content\":\"say \\\"usage\\\": "
           "{\\\"prompt_tokens\\\": 999}\"}}]}",
           NULL, 0, 0);
    expect(MG_USAGE_JSON, "{\"usage\": \"none\"}", NULL, 0, 0);
    expect(MG_USAGE_JSON, "{\"usage\":{\"prompt_tokens\":-3}}", NULL, 0, 0);
    expect(MG_USAGE_JSON, "not json at all \"usage\":{", NULL, 0, 0);
    expect(MG_USAGE_NDJSON, "\n\n\"done\":true\n{\"done\":true}\n", NULL, 0, 0);
    expect(MG_USAGE_SSE, "data: {\"usage\":{\"prompt_tokens\":1}\n\n", NULL, 0, 0);
    expect(MG_USAGE_JSON, "", NULL, 0, 0);
}

static void test_long_units(void **state)
{
    /* A long completion in one JSON body: the usage at its end, the model at its start. */
    size_t fill = 300 * 1024;
    char *big = malloc(fill + 512);
    assert_non_null(big);
    int n = snprintf(big, 512, "{\"model\":\"mistral-nemo\",\"choices\":[{\"message\":{\"content\":\"");
    memset(big + n, 'w', fill);
    snprintf(big + n + fill, 512, "\"}}],\"usage\":{\"prompt_tokens\":7,\"completion_tokens\":"
             "65000}}");
    mg_usage_t u;
    for (size_t split = 0; split <= 4096; split = split ? split * 4 : 1) {
        scan(MG_USAGE_JSON, big, strlen(big), split, &u);
        assert_true(u.found);
        assert_string_equal(u.model, "mistral-nemo");
        assert_int_equal(u.prompt_tokens, 7);
        assert_int_equal(u.completion_tokens, 65000);
    }
    /* An Ollama record with a context array far longer than what is kept. */
    n = snprintf(big, 512, "{\"model\":\"llama3\",\"response\":\"\",\"done\":true,\"context\":[");
    size_t off = (size_t)n;
    while (off < fill)
        off += (size_t)snprintf(big + off, 16, "12345,");
    snprintf(big + off, 512, "1],\"total_duration\":10,\"prompt_eval_count\":4096,"
             "\"eval_count\":512}\n");
    scan(MG_USAGE_NDJSON, big, strlen(big), 1000, &u);
    assert_true(u.found);
    assert_string_equal(u.model, "llama3");
    assert_int_equal(u.prompt_tokens, 4096);
    assert_int_equal(u.completion_tokens, 512);
    assert_int_equal(u.total_duration_ns, 10);
    free(big);
}

static void test_model_family(void **state)
{
    static const char *const cases[][2] = {
        { "llama3.1:8b", "llama" },   { "Qwen/Qwen2.5-7B-Instruct", "qwen" },
        { "gpt-4o-mini", "gpt" },     { "mistral-nemo", "mistral" },
        { "deepseek-r1:14b", "deepseek" }, { "phi3", "phi" },
        { "7b-model", "other" },      { "", "other" },
        { "a/b/c/Gemma2", "gemma" },
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        char fam[33];
        mg_usage_model_family(cases[i][0], fam);
        assert_string_equal(fam, cases[i][1]);
    }
    char fam[33];
    mg_usage_model_family("abcdefghijklmnopqrstuvwxyzabcdefghijklmnop", fam);
    assert_int_equal(strlen(fam), 32);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_formats),
        cmocka_unit_test(test_ollama_stream_and_json),
        cmocka_unit_test(test_openai_json_and_sse),
        cmocka_unit_test(test_lookalikes_and_garbage),
        cmocka_unit_test(test_long_units),
        cmocka_unit_test(test_model_family),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
