/* fp_size.h - overflow-checked size arithmetic for buffers and offsets.
 *
 * Every multiplication or addition that sizes a buffer or an offset into one
 * goes through these: on a 32-bit gateway (armv7) capacity * stride wraps
 * long before memory runs out, and a wrapped size allocates a small buffer
 * that later receives overrun. Each returns 0 and stores the result, or
 * -FP_E_TOOBIG and leaves *out untouched. */
#ifndef FASTPUNCH_FP_SIZE_H
#define FASTPUNCH_FP_SIZE_H

#include <stddef.h>

#include "fastpunch/fp_errors.h"

static inline int fp_size_mul(size_t a, size_t b, size_t *out)
{
    size_t r;
    if (__builtin_mul_overflow(a, b, &r))
        return -FP_E_TOOBIG;
    *out = r;
    return 0;
}

static inline int fp_size_add(size_t a, size_t b, size_t *out)
{
    size_t r;
    if (__builtin_add_overflow(a, b, &r))
        return -FP_E_TOOBIG;
    *out = r;
    return 0;
}

/* count regions of len bytes, stride bytes apart: the bytes they span,
 * (count - 1) * stride + len, or 0 for none. */
static inline int fp_size_span(size_t count, size_t stride, size_t len, size_t *out)
{
    size_t r;
    if (count == 0) {
        *out = 0;
        return 0;
    }
    if (fp_size_mul(count - 1, stride, &r) < 0 || fp_size_add(r, len, &r) < 0)
        return -FP_E_TOOBIG;
    *out = r;
    return 0;
}

#endif
