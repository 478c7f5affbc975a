/* A bounded, deterministic driver for tests/fuzz/fuzz_parse.c where no
 * libFuzzer exists (cross-built targets under qemu-user, musl): random
 * inputs and mutations (bit flips, byte sets, truncations, lengths poked)
 * of a valid SYN, fed to the same LLVMFuzzerTestOneInput, whose checks trap.
 *     fuzz_main [iterations] [seed] */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static uint64_t state;

static uint32_t next(void)
{
    state ^= state << 13;
    state ^= state >> 7;
    state ^= state << 17;
    return (uint32_t)(state >> 11);
}

static const uint8_t SEED[62] = {
    0x45,0x00,0x00,0x3e,0x12,0x34,0x40,0x00,0x40,0x06,0xc2,0x49,0xc6,0x33,0x64,0x01,
    0xcb,0x00,0x71,0x07,0x9c,0x40,0x01,0xbb,0xde,0xad,0xbe,0xef,0x00,0x00,0x00,0x00,
    0xa0,0x02,0xfa,0xf0,0x3e,0xc8,0x00,0x00,0x02,0x04,0x05,0xb4,0x04,0x02,0x08,0x0a,
    0x01,0x02,0x03,0x04,0x00,0x00,0x00,0x00,0x01,0x03,0x03,0x07,0x68,0x69};

/* the same SYN over IPv6 behind a destination-options header (8 bytes) */
static const uint8_t SEED6[90] = {
    0x60,0x01,0x23,0x45,0x00,0x32,0x3c,0x40,
    0x20,0x01,0x0d,0xb8,0,0,0,0,0,0,0,0,0,0,0,0x01,
    0x20,0x01,0x0d,0xb8,0,0,0,0,0,0,0,0,0,0,0,0x02,
    0x06,0x00,0x01,0x04,0x00,0x00,0x00,0x00,
    0x9c,0x40,0x01,0xbb,0xde,0xad,0xbe,0xef,0x00,0x00,0x00,0x00,
    0xa0,0x02,0xfa,0xf0,0x00,0x00,0x00,0x00,0x02,0x04,0x05,0xb4,0x04,0x02,0x08,0x0a,
    0x01,0x02,0x03,0x04,0x00,0x00,0x00,0x00,0x01,0x03,0x03,0x07,0x68,0x69};

int main(int argc, char **argv)
{
    long iterations = argc > 1 ? atol(argv[1]) : 200000;
    state = argc > 2 ? strtoull(argv[2], NULL, 0) : 0x9e3779b97f4a7c15ull;
    uint8_t buf[256];
    for (long i = 0; i < iterations; i++) {
        size_t len;
        if (i % 4 == 0) {                       /* random bytes, random length */
            len = next() % sizeof buf;
            for (size_t j = 0; j < len; j++)
                buf[j] = (uint8_t)next();
            if (len)                            /* v4 or v6 */
                buf[0] = (uint8_t)((buf[0] & 0x0f) | (i % 8 ? 0x40 : 0x60));
        } else {                                /* mutations of a valid SYN */
            int six = i % 4 == 2;
            memcpy(buf, six ? SEED6 : SEED, six ? sizeof SEED6 : sizeof SEED);
            len = six ? sizeof SEED6 : sizeof SEED;
            int edits = 1 + next() % 4;
            for (int e = 0; e < edits; e++) {
                uint32_t r = next(), at = r % len;
                switch ((r >> 16) % 5) {
                case 0: buf[at] ^= (uint8_t)(1u << (next() % 8)); break;
                case 1: buf[at] = (uint8_t)next(); break;
                case 2: len = at; break;                        /* truncate */
                case 3: buf[32] = (uint8_t)((next() % 16) << 4); break;    /* doff */
                default: buf[40 + next() % 20] = (uint8_t)(next() % 42); break; /* options */
                }
                if (len == 0)
                    break;
            }
        }
        uint8_t *exact = malloc(len ? len : 1);  /* exact size: overreads are real */
        memcpy(exact, buf, len);
        LLVMFuzzerTestOneInput(exact, len);
        free(exact);
    }
    printf("fuzz_main: %ld inputs, no check failed\n", iterations);
    return 0;
}
