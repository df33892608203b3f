/*
 * A growable byte buffer with a read offset: bytes are appended at the end and consumed from the
 * front. Internal to moongate's libraries.
 */
#ifndef MOONGATE_BUF_H
#define MOONGATE_BUF_H

#include <stddef.h>

typedef struct mg__buf {
    char *data;
    size_t off;  /* first unconsumed byte */
    size_t len;  /* end of the bytes held */
    size_t cap;
} mg__buf_t;

static inline size_t mg__buf_size(const mg__buf_t *b)
{
    return b->len - b->off;
}

/* Appends n bytes. Returns 0 or MG_ENOMEM (then the buffer is unchanged). */
int mg__buf_append(mg__buf_t *b, const void *p, size_t n);

/* Drops n bytes from the front; an emptied buffer larger than keep_cap gives its memory back. */
void mg__buf_consume(mg__buf_t *b, size_t n, size_t keep_cap);

void mg__buf_free(mg__buf_t *b);

#endif
