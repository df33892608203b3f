/*
 * chunk: appending a piece of a body to a buffer as one HTTP/1.1 chunk. Internal to moongate's
 * libraries (the HTTP server and the request's upload to the upstream).
 */
#ifndef MOONGATE_HTTP_CHUNK_H
#define MOONGATE_HTTP_CHUNK_H

#include "core/buf.h"

/* Appends n bytes as one chunk: its size line, the bytes, CRLF; nothing for n == 0 (that would
   be the last chunk). Returns 0 or MG_ENOMEM (then the buffer is unchanged). */
int mg__http1_append_chunk(mg__buf_t *b, const void *p, size_t n);

#endif
