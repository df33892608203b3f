#include "buf.h"

#include "moongate/error.h"

#include <stdlib.h>
#include <string.h>

int mg__buf_append(mg__buf_t *b, const void *p, size_t n)
{
    if (n == 0)
        return 0;
    if (b->cap - b->len < n) {
        /* Reclaim the consumed front before growing. */
        if (b->off > 0) {
            memmove(b->data, b->data + b->off, b->len - b->off);
            b->len -= b->off;
            b->off = 0;
        }
        if (b->cap - b->len < n) {
            size_t cap = b->cap ? b->cap : 4096;
            while (cap - b->len < n)
                cap *= 2;
            char *d = realloc(b->data, cap);
            if (d == NULL)
                return MG_ENOMEM;
            b->data = d;
            b->cap = cap;
        }
    }
    memcpy(b->data + b->len, p, n);
    b->len += n;
    return 0;
}

void mg__buf_consume(mg__buf_t *b, size_t n, size_t keep_cap)
{
    b->off += n;
    if (b->off < b->len)
        return;
    b->off = b->len = 0;
    if (b->cap > keep_cap) {
        free(b->data);
        b->data = NULL;
        b->cap = 0;
    }
}

void mg__buf_free(mg__buf_t *b)
{
    free(b->data);
    *b = (mg__buf_t){0};
}

