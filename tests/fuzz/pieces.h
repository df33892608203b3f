/*
 * pieces: how the fuzz targets split an input, so that each runs fed whole and fed in
 * pseudo-random pieces and can check that both tell the same story.
 */
#ifndef MG_FUZZ_PIECES_H
#define MG_FUZZ_PIECES_H

#include <stddef.h>
#include <stdint.h>

/* The size of the next piece of the left bytes: all of them when *seed is 0, else 1 to max
   bytes as the seed (advanced here) says. */
static inline size_t fuzz_piece_len(uint32_t *seed, size_t left, size_t max)
{
    if (*seed == 0)
        return left;
    *seed = *seed * 1103515245u + 12345u;
    size_t want = 1 + (*seed >> 16) % max;
    return want < left ? want : left;
}

#endif
