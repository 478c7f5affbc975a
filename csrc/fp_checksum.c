/* fp_checksum.c - Internet checksum, written for throughput.
 *
 * The main loop loads 64-bit words and adds each 32-bit half into one of four
 * independent 64-bit accumulators: no carry chain between iterations, so the
 * adds issue in parallel and the compiler may vectorise the loop. A 64-bit
 * accumulator receiving 33-bit values cannot overflow before 2^31 iterations
 * (16 GiB), far beyond any datagram.
 */
#include <string.h>

#include "fastpunch/fp_checksum.h"

static inline uint64_t load64(const uint8_t *p)
{
    uint64_t v;
    memcpy(&v, p, sizeof v);
    return v;
}

uint64_t fp_csum_add(uint64_t sum, const void *buf, size_t len)
{
    const uint8_t *p = buf;
    uint64_t a0 = sum, a1 = 0, a2 = 0, a3 = 0;

    while (len >= 32) {
        uint64_t w0 = load64(p), w1 = load64(p + 8), w2 = load64(p + 16), w3 = load64(p + 24);
        a0 += (w0 & 0xffffffffu) + (w0 >> 32);
        a1 += (w1 & 0xffffffffu) + (w1 >> 32);
        a2 += (w2 & 0xffffffffu) + (w2 >> 32);
        a3 += (w3 & 0xffffffffu) + (w3 >> 32);
        p += 32;
        len -= 32;
    }
    while (len >= 8) {
        uint64_t w = load64(p);
        a1 += (w & 0xffffffffu) + (w >> 32);
        p += 8;
        len -= 8;
    }
    if (len >= 4) {
        uint32_t w;
        memcpy(&w, p, 4);
        a2 += w;
        p += 4;
        len -= 4;
    }
    if (len >= 2) {
        uint16_t w;
        memcpy(&w, p, 2);
        a3 += w;
        p += 2;
        len -= 2;
    }
    if (len) {
        /* odd trailing byte: pad with a zero byte in wire order */
        uint8_t last[2] = {p[0], 0};
        uint16_t w;
        memcpy(&w, last, 2);
        a3 += w;
    }
    /* Fold the four accumulators without losing carries: each is < 2^62 here
     * for any realistic length, so fold each to 32 bits first. */
    a0 = (a0 & 0xffffffffu) + (a0 >> 32);
    a1 = (a1 & 0xffffffffu) + (a1 >> 32);
    a2 = (a2 & 0xffffffffu) + (a2 >> 32);
    a3 = (a3 & 0xffffffffu) + (a3 >> 32);
    return a0 + a1 + a2 + a3;
}

fp_sum16 fp_csum_fold(uint64_t sum)
{
    sum = (sum & 0xffffffffu) + (sum >> 32);
    sum = (sum & 0xffffffffu) + (sum >> 32);
    sum = (sum & 0xffffu) + (sum >> 16);
    sum = (sum & 0xffffu) + (sum >> 16);
    sum = (sum & 0xffffu) + (sum >> 16);
    return (fp_sum16)~sum;
}

fp_sum16 fp_csum(const void *buf, size_t len)
{
    return fp_csum_fold(fp_csum_add(0, buf, len));
}

static inline uint32_t to_wire32(uint32_t host)
{
    uint8_t b[4] = {(uint8_t)(host >> 24), (uint8_t)(host >> 16), (uint8_t)(host >> 8),
                    (uint8_t)host};
    uint32_t w;
    memcpy(&w, b, 4);
    return w;
}

static inline uint16_t to_wire16(uint16_t host)
{
    uint8_t b[2] = {(uint8_t)(host >> 8), (uint8_t)host};
    uint16_t w;
    memcpy(&w, b, 2);
    return w;
}

uint64_t fp_csum_pseudo(uint32_t saddr, uint32_t daddr, uint8_t proto, uint16_t len)
{
    return (uint64_t)to_wire32(saddr) + to_wire32(daddr) + to_wire16(proto) + to_wire16(len);
}

uint64_t fp_csum_pseudo6(const uint8_t saddr[16], const uint8_t daddr[16], uint8_t proto,
                         uint32_t len)
{
    uint64_t sum = fp_csum_add(0, saddr, 16);
    sum = fp_csum_add(sum, daddr, 16);
    return sum + to_wire32(len) + to_wire32(proto);
}

fp_sum16 fp_csum_replace2(fp_sum16 check, uint16_t old_wire, uint16_t new_wire)
{
    uint64_t sum = (uint16_t)~check;
    sum += (uint16_t)~old_wire;
    sum += new_wire;
    return fp_csum_fold(sum);
}

fp_sum16 fp_csum_replace4(fp_sum16 check, uint32_t old_wire, uint32_t new_wire)
{
    uint64_t sum = (uint16_t)~check;
    sum += (uint32_t)~old_wire;
    sum += new_wire;
    return fp_csum_fold(sum);
}

void fp_csum_many(const uint8_t *base, size_t stride, size_t len, size_t count, fp_sum16 *out)
{
    for (size_t i = 0; i < count; i++)
        out[i] = fp_csum(base + i * stride, len);
}
