/*
 * http1_int: what the two halves of the HTTP/1.1 codec (http1.c, http1_request.c) share.
 * Internal to src/http.
 */
#ifndef MOONGATE_HTTP1_INT_H
#define MOONGATE_HTTP1_INT_H

#include <stdint.h>

/* 1 for the bytes RFC 9110 5.6.2 allows in a token (methods, field names), else 0. */
extern const uint8_t mg__http1_tchar[256];

#endif
