/*
 * llm_fake: the answers of a fake Ollama and a fake OpenAI-compatible server (vLLM, llama.cpp's
 * server), for mg-upstream. The shapes are the real ones, field for field, with final usage
 * records a test can predict:
 *
 *   POST /api/generate, /api/chat        Ollama: NDJSON when the body's "stream" is not false
 *                                        (one line per token, then the "done": true record with
 *                                        prompt_eval_count, eval_count and the durations), else
 *                                        one JSON record. /api/generate's last record carries
 *                                        a "context" array of N numbers (query context=N).
 *   POST /v1/chat/completions,           OpenAI: Server-Sent Events when "stream" is true (one
 *        /v1/completions                 chunk per token, the finish chunk, then, when the body
 *                                        asks for stream_options.include_usage, a chunk with
 *                                        "choices": [] and "usage", and "data: [DONE]"; with
 *                                        include_usage every chunk says "usage": null as vLLM
 *                                        does), else one JSON body with "usage".
 *
 * The counts: prompt tokens are the words of the prompt (the "prompt" field, or the contents of
 * "messages"), at least 1; completion tokens are the body's max_tokens (OpenAI) or
 * options.num_predict (Ollama), else 5. The query overrides both (prompt_tokens=, tokens=), and
 * sets the pause between tokens (interval_ms=, default 0), padding bytes added to each token's
 * text (pad=), and a wait before the response head (delay_ms=: a cold model loading). The model is the body's "model", else "fake-model".
 */
#ifndef MG_TEST_LLM_FAKE_H
#define MG_TEST_LLM_FAKE_H

#include <stdbool.h>
#include <stddef.h>

typedef enum mg_test_llm_api {
    MG_TEST_LLM_NONE,
    MG_TEST_LLM_OLLAMA_GENERATE,
    MG_TEST_LLM_OLLAMA_CHAT,
    MG_TEST_LLM_OPENAI_CHAT,
    MG_TEST_LLM_OPENAI_COMPLETIONS,
} mg_test_llm_api_t;

typedef struct mg_test_llm {
    mg_test_llm_api_t api;
    bool stream, include_usage;
    char model[128];
    unsigned prompt_tokens, completion_tokens, interval_ms, pad, context;
    unsigned delay_ms; /* before the response head: a model loading */
    unsigned sent;     /* tokens written so far */
    int phase;         /* private */
} mg_test_llm_t;

/* The API that serves path, or MG_TEST_LLM_NONE. */
mg_test_llm_api_t mg_test_llm_route(const char *path);

/* Reads the request (body, query may be NULL). Returns 0, or -1 when the body is not a JSON
   object (the server answers 400). */
int mg_test_llm_start(mg_test_llm_t *l, mg_test_llm_api_t api, const char *query,
                      const char *body, size_t len);

/* The response's Content-Type. */
const char *mg_test_llm_content_type(const mg_test_llm_t *l);

/* The room mg_test_llm_next() needs for its longest piece. */
size_t mg_test_llm_piece_max(const mg_test_llm_t *l);

/*
 * The next piece of a streamed response (a line or an event) into buf[0, cap), cap at least
 * mg_test_llm_piece_max(): returns its length, 0 when the stream has ended. For a response that
 * does not stream, the first call gives the whole body.
 */
size_t mg_test_llm_next(mg_test_llm_t *l, char *buf, size_t cap);

#endif
