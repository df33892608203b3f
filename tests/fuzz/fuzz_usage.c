/*
 * libFuzzer target for the usage scanner (src/llm/usage.c). See README.md beside it.
 *
 * The first input byte chooses the format (JSON, NDJSON, SSE) and seeds the split pattern; the
 * rest is a response body from an upstream. Each input runs fed whole and in pseudo-random
 * pieces, and both runs must find the same usage. Invariants checked: no crash or sanitizer
 * report; counts are -1 or not negative; the model is a NUL-terminated string within bounds.
 */
#include "llm/usage.h"
#include "pieces.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static void run(mg_usage_format_t f, const uint8_t *data, size_t len, uint32_t seed,
                mg_usage_t *u)
{
    mg_usage_scanner_t *s;
    if (mg_usage_scanner_new(f, &s) != 0)
        abort();
    size_t off = 0;
    while (off < len) {
        size_t n = fuzz_piece_len(&seed, len - off, 97);
        char *piece = malloc(n);
        if (!piece)
            abort();
        memcpy(piece, data + off, n);
        mg_usage_feed(s, piece, n);
        free(piece);
        off += n;
    }
    mg_usage_result(s, u);
    mg_usage_scanner_free(s);
    if (u->prompt_tokens < -1 || u->completion_tokens < -1 ||
        strnlen(u->model, sizeof(u->model)) == sizeof(u->model))
        abort();
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 1)
        return 0;
    mg_usage_format_t f = (mg_usage_format_t)(1 + data[0] % 3);
    uint32_t seed = (uint32_t)data[0] << 8 | 1;
    mg_usage_t a, b;
    run(f, data + 1, size - 1, 0, &a);
    run(f, data + 1, size - 1, seed, &b);
    if (a.found != b.found || a.prompt_tokens != b.prompt_tokens ||
        a.completion_tokens != b.completion_tokens || strcmp(a.model, b.model) != 0) {
        fprintf(stderr, "fed whole and in pieces, the scanner found different usage\n");
        abort();
    }
    return 0;
}
