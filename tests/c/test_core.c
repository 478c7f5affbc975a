/* Known-answer tests of the C core, plain C, no Python: built for every
 * target the devices run on (x86_64 glibc and musl, aarch64, armv7) and run
 * there (under qemu-user for ARM) by scripts/cross-check. What differs
 * between those targets is what is checked: byte order, alignment (batches
 * laid out at odd strides), the width of size_t (32 bits on armv7: sizes
 * that wrap there must be refused), and the C library.
 *
 * The segment below is scapy's bytes for the same fields (an independent
 * oracle), from scapy 2.5:
 *   raw(IP(src="198.51.100.1", dst="203.0.113.7", id=0x1234, ttl=64, flags="DF") /
 *       TCP(sport=40000, dport=443, seq=0xdeadbeef, flags="S", window=64240,
 *           options=[("MSS", 1460), ("SAckOK", b""), ("Timestamp", (0x01020304, 0)),
 *                    ("NOP", None), ("WScale", 7)]) / b"hi") */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fastpunch/fp_checksum.h"
#include "fastpunch/fp_errors.h"
#include "fastpunch/fp_seq.h"
#include "fastpunch/fp_size.h"
#include "fastpunch/fp_tcp.h"

static int failures, checks;

#define CHECK(c) do { checks++; if (!(c)) { failures++; \
    fprintf(stderr, "%s:%d: check failed: %s\n", __FILE__, __LINE__, #c); } } while (0)

/* IP(src=198.51.100.1, dst=203.0.113.7, id=0x1234, ttl=64, DF) /
 * TCP(40000 -> 443, seq=0xdeadbeef, SYN, window=64240, MSS 1460, SAckOK,
 *     Timestamp(0x01020304, 0), NOP, WScale 7) / "hi" */
static const uint8_t SCAPY_SYN[62] = {
    0x45,0x00,0x00,0x3e,0x12,0x34,0x40,0x00,0x40,0x06,0xc2,0x49,0xc6,0x33,0x64,0x01,
    0xcb,0x00,0x71,0x07,0x9c,0x40,0x01,0xbb,0xde,0xad,0xbe,0xef,0x00,0x00,0x00,0x00,
    0xa0,0x02,0xfa,0xf0,0x3e,0xc8,0x00,0x00,0x02,0x04,0x05,0xb4,0x04,0x02,0x08,0x0a,
    0x01,0x02,0x03,0x04,0x00,0x00,0x00,0x00,0x01,0x03,0x03,0x07,0x68,0x69};

static void fill_syn(struct fp_ipv4 *ip, struct fp_tcp *tcp)
{
    memset(ip, 0, sizeof *ip);
    memset(tcp, 0, sizeof *tcp);
    ip->saddr = 0xc6336401u;           /* 198.51.100.1 */
    ip->daddr = 0xcb007107u;           /* 203.0.113.7 */
    ip->id = 0x1234;
    ip->ttl = 64;
    ip->frag = FP_IP_DF;
    ip->proto = FP_IPPROTO_TCP;
    tcp->sport = 40000;
    tcp->dport = 443;
    tcp->seq = 0xdeadbeefu;
    tcp->flags = FP_TCP_SYN;
    tcp->window = 64240;
    tcp->opts.present = FP_OPT_MSS | FP_OPT_SACK_PERM | FP_OPT_TIMESTAMP | FP_OPT_WSCALE;
    tcp->opts.mss = 1460;
    tcp->opts.wscale = 7;
    tcp->opts.ts_val = 0x01020304u;
}

static void test_checksums(void)
{
    /* RFC 1071 section 3's example: the folded sum is 0xddf2 */
    static const uint8_t rfc[8] = {0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7};
    fp_sum16 c = fp_csum(rfc, sizeof rfc);
    uint8_t wire[2];
    memcpy(wire, &c, 2);
    CHECK(wire[0] == 0x22 && wire[1] == 0x0d);      /* ~0xddf2 in wire order */
    /* at an odd address */
    uint8_t odd[9] = {0xff, 0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7};
    fp_sum16 c2 = fp_csum(odd + 1, 8);
    CHECK(c2 == c);
    /* an odd length: the last byte counts as its high half, 00 01 f2 -> 0x0001 + 0xf200 */
    fp_sum16 c3 = fp_csum(rfc, 3);
    memcpy(wire, &c3, 2);
    CHECK(wire[0] == (uint8_t)~0xf2 && wire[1] == (uint8_t)~0x01);
    /* an IPv4 header whose checksum is b861 (a common textbook example) */
    uint8_t hdr[20] = {0x45,0x00,0x00,0x73,0x00,0x00,0x40,0x00,0x40,0x11,0x00,0x00,
                       0xc0,0xa8,0x00,0x01,0xc0,0xa8,0x00,0xc7};
    fp_sum16 h = fp_csum(hdr, 20);
    memcpy(wire, &h, 2);
    CHECK(wire[0] == 0xb8 && wire[1] == 0x61);
    /* incremental update (RFC 1624) equals a full recompute */
    memcpy(hdr + 10, &h, 2);
    uint16_t old_ttl, new_ttl;
    memcpy(&old_ttl, hdr + 8, 2);
    hdr[8] = 0x3f;
    memcpy(&new_ttl, hdr + 8, 2);
    fp_sum16 inc = fp_csum_replace2(h, old_ttl, new_ttl);
    hdr[10] = hdr[11] = 0;
    CHECK(inc == fp_csum(hdr, 20));
}

static void test_build_matches_scapy_and_parses_back(void)
{
    struct fp_ipv4 ip;
    struct fp_tcp tcp;
    fill_syn(&ip, &tcp);
    uint8_t buf[128];
    int n = fp_segment_build(buf, sizeof buf, &ip, &tcp, (const uint8_t *)"hi", 2);
    CHECK(n == (int)sizeof SCAPY_SYN);
    CHECK(n > 0 && memcmp(buf, SCAPY_SYN, sizeof SCAPY_SYN) == 0);
    if (n > 0 && memcmp(buf, SCAPY_SYN, sizeof SCAPY_SYN) != 0)
        for (int i = 0; i < n; i++)
            if (buf[i] != SCAPY_SYN[i])
                fprintf(stderr, "  byte %d: built %02x, scapy %02x\n", i, buf[i], SCAPY_SYN[i]);
    struct fp_segment s;
    CHECK(fp_segment_parse(SCAPY_SYN, sizeof SCAPY_SYN, FP_VERIFY_IP | FP_VERIFY_TCP, &s) == 0);
    CHECK(s.ip.saddr == ip.saddr && s.ip.daddr == ip.daddr && s.ip.id == 0x1234);
    CHECK(s.tcp.sport == 40000 && s.tcp.dport == 443 && s.tcp.seq == 0xdeadbeefu);
    CHECK(s.tcp.flags == FP_TCP_SYN && s.tcp.window == 64240);
    CHECK(s.tcp.opts.mss == 1460 && s.tcp.opts.wscale == 7 && s.tcp.opts.ts_val == 0x01020304u);
    CHECK(s.payload_len == 2 && memcmp(s.payload, "hi", 2) == 0);
    /* one flipped payload bit: the TCP checksum no longer verifies */
    uint8_t bad[sizeof SCAPY_SYN];
    memcpy(bad, SCAPY_SYN, sizeof bad);
    bad[61] ^= 0x01;
    CHECK(fp_segment_parse(bad, sizeof bad, FP_VERIFY_TCP, &s) == -FP_E_TCP_CHECKSUM);
    /* truncated anywhere: refused with a reason, never read past */
    for (size_t len = 0; len < sizeof SCAPY_SYN; len++) {
        uint8_t *copy = malloc(len ? len : 1);          /* exact size: ASan-able */
        memcpy(copy, SCAPY_SYN, len);
        int rc = fp_segment_parse(copy, len, 0, &s);
        CHECK(rc <= -FP_E_BASE && rc > -FP_E_LAST);
        free(copy);
    }
}

static void test_batches_at_odd_strides(void)
{
    /* 7 segments 67 bytes apart: every header lands unaligned somewhere */
    enum { COUNT = 7, STRIDE = 67 };
    struct fp_ipv4 ip;
    struct fp_tcp tcp;
    fill_syn(&ip, &tcp);
    uint8_t *area = calloc(COUNT, STRIDE);
    uint32_t lens[COUNT];
    long built = fp_segment_build_batch(area, STRIDE, COUNT, &ip, &tcp, NULL, 0, NULL, lens);
    CHECK(built == COUNT);
    struct fp_segment out[COUNT];
    int32_t status[COUNT];
    long parsed = fp_segment_parse_batch(area, STRIDE, lens, COUNT,
                                         FP_VERIFY_IP | FP_VERIFY_TCP, out, status);
    CHECK(parsed == COUNT);
    for (int i = 0; i < COUNT; i++) {
        CHECK(status[i] == 0 && out[i].ip.id == (uint16_t)(0x1234 + i));
        CHECK(out[i].tcp.seq == 0xdeadbeefu && out[i].tcp.opts.mss == 1460);
    }
    fp_sum16 sums[COUNT];
    fp_csum_many(area, STRIDE, 20, COUNT, sums);
    for (int i = 0; i < COUNT; i++)
        CHECK(sums[i] == 0);                    /* a valid header sums to zero */
    free(area);
}

static void test_sequence_arithmetic(void)
{
    CHECK(fp_before(0xfffffff0u, 0x10u));        /* across the wrap */
    CHECK(fp_after(0x10u, 0xfffffff0u));
    CHECK(!fp_before(5, 5) && !fp_after(5, 5));
    CHECK(fp_between(0, 0xfffffffeu, 2));
    CHECK(!fp_between(3, 0xfffffffeu, 2));
    CHECK(fp_seq_acceptable(1000, 100, 1050, 10));
    CHECK(!fp_seq_acceptable(1000, 100, 1200, 10));
}

static void test_sizes_refuse_what_wraps_here(void)
{
    size_t out = 12345;
    /* ParsedBatch(capacity=70000, stride=65535): 4.6 GB; wraps a 32-bit size_t */
    int rc = fp_size_mul(70000, 65535, &out);
    if (sizeof(size_t) == 4) {
        CHECK(rc == -FP_E_TOOBIG && out == 12345);
    } else {
        CHECK(rc == 0 && out == (size_t)70000 * 65535);
    }
    CHECK(fp_size_add(SIZE_MAX, 1, &out) == -FP_E_TOOBIG);
    CHECK(fp_size_span(0, 65535, 100, &out) == 0 && out == 0);
    CHECK(fp_size_span(3, 100, 60, &out) == 0 && out == 260);
    CHECK(fp_size_span(SIZE_MAX / 2, 4, 1, &out) == -FP_E_TOOBIG);
    struct fp_ipv4 ip;
    struct fp_tcp tcp;
    fill_syn(&ip, &tcp);
    uint8_t one[128];
    uint32_t lens[4];
    /* a batch whose layout wraps size_t: refused before a byte is written */
    CHECK(fp_segment_build_batch(one, SIZE_MAX / 2, 4, &ip, &tcp, NULL, 0, NULL, lens)
          == -FP_E_TOOBIG);
    CHECK(fp_segment_build_batch(one, 100, 4, &ip, &tcp, one, SIZE_MAX / 2, NULL, lens) < 0);
    /* a payload length whose sum with the header wraps to a small one */
    CHECK(fp_segment_build_batch(one, 100, 1, &ip, &tcp, one, SIZE_MAX - 10, NULL, lens)
          == -FP_E_TOOBIG);
    CHECK(fp_segment_build(one, sizeof one, &ip, &tcp, one, SIZE_MAX - 10) == -FP_E_TOOBIG);
    struct fp_segment segs[4];
    int32_t status[4] = {7, 7, 7, 7};
    CHECK(fp_segment_parse_batch(one, SIZE_MAX / 2, lens, 4, 0, segs, status) == -FP_E_TOOBIG);
    CHECK(status[0] == -FP_E_TOOBIG && status[3] == -FP_E_TOOBIG);
}

/* raw(IPv6(src="2001:db8::1", dst="2001:db8:ffff::7", hlim=64, fl=0xabcde, tc=0x28) /
 *     TCP(the SYN above, MSS 1440) / b"hi"), scapy 2.5 */
static const uint8_t SCAPY_SYN6[82] = {
    0x62,0x8a,0xbc,0xde,0x00,0x2a,0x06,0x40,0x20,0x01,0x0d,0xb8,0x00,0x00,0x00,0x00,
    0x00,0x00,0x00,0x00,0x00,0x00,0x00,0x01,0x20,0x01,0x0d,0xb8,0xff,0xff,0x00,0x00,
    0x00,0x00,0x00,0x00,0x00,0x00,0x00,0x07,0x9c,0x40,0x01,0xbb,0xde,0xad,0xbe,0xef,
    0x00,0x00,0x00,0x00,0xa0,0x02,0xfa,0xf0,0x49,0x9f,0x00,0x00,0x02,0x04,0x05,0xa0,
    0x04,0x02,0x08,0x0a,0x01,0x02,0x03,0x04,0x00,0x00,0x00,0x00,0x01,0x03,0x03,0x07,
    0x68,0x69};

static void test_ipv6_matches_scapy_and_refuses_by_reason(void)
{
    struct fp_ipv6 ip;
    struct fp_tcp tcp;
    memset(&ip, 0, sizeof ip);
    fill_syn(&(struct fp_ipv4){0}, &tcp);
    tcp.opts.mss = 1440;
    memcpy(ip.saddr, SCAPY_SYN6 + 8, 16);
    memcpy(ip.daddr, SCAPY_SYN6 + 24, 16);
    ip.hop_limit = 64;
    ip.flow = 0xabcde;
    ip.tclass = 0x28;
    uint8_t buf[256];
    int n = fp_segment6_build(buf, sizeof buf, &ip, &tcp, (const uint8_t *)"hi", 2);
    CHECK(n == (int)sizeof SCAPY_SYN6);
    CHECK(n > 0 && memcmp(buf, SCAPY_SYN6, sizeof SCAPY_SYN6) == 0);

    struct fp_segment6 s;
    CHECK(fp_segment6_parse(SCAPY_SYN6, sizeof SCAPY_SYN6, FP_VERIFY_TCP, &s) == 0);
    CHECK(s.ip.flow == 0xabcde && s.ip.tclass == 0x28 && s.ip.hop_limit == 64);
    CHECK(s.ip.proto == 6 && s.ip.ext_len == 0 && s.ip.payload_len == 42);
    CHECK(s.tcp.sport == 40000 && s.tcp.seq == 0xdeadbeefu && s.tcp.opts.mss == 1440);
    CHECK(s.payload_len == 2 && memcmp(s.payload, "hi", 2) == 0);

    /* behind a destination-options header: walked past, checksum still right */
    uint8_t ext[90];
    memcpy(ext, SCAPY_SYN6, 40);
    ext[4] = 0, ext[5] = 42 + 8, ext[6] = FP_IP6_DSTOPTS;
    memcpy(ext + 40, (const uint8_t[8]){6, 0, 1, 4, 0, 0, 0, 0}, 8);
    memcpy(ext + 48, SCAPY_SYN6 + 40, 42);
    CHECK(fp_segment6_parse(ext, sizeof ext, FP_VERIFY_TCP, &s) == 0);
    CHECK(s.ip.ext_len == 8 && s.ip.next == FP_IP6_DSTOPTS && s.tcp.dport == 443);
    ext[40 + 1] = 9;                              /* it now claims 80 bytes */
    CHECK(fp_segment6_parse(ext, sizeof ext, 0, &s) == -FP_E_IP6_EXTHDR);
    ext[40 + 1] = 0;
    ext[6] = FP_IP6_ESP;
    CHECK(fp_segment6_parse(ext, sizeof ext, 0, &s) == -FP_E_IP6_EXTHDR);
    ext[6] = FP_IP6_FRAGMENT;                     /* offset 0, M 0: atomic, walked */
    memcpy(ext + 40, (const uint8_t[8]){6, 0, 0, 0, 0, 0, 0, 7}, 8);
    CHECK(fp_segment6_parse(ext, sizeof ext, FP_VERIFY_TCP, &s) == 0);
    ext[43] = 1;                                  /* more fragments */
    CHECK(fp_segment6_parse(ext, sizeof ext, 0, &s) == -FP_E_IP_FRAGMENT);

    uint8_t bad[82];
    memcpy(bad, SCAPY_SYN6, sizeof bad);
    bad[81] ^= 1;
    CHECK(fp_segment6_parse(bad, sizeof bad, FP_VERIFY_TCP, &s) == -FP_E_TCP_CHECKSUM);
    CHECK(fp_segment6_parse(bad, sizeof bad, 0, &s) == 0);
    CHECK(fp_segment6_parse(SCAPY_SYN6, 81, 0, &s) == -FP_E_IP6_PAYLEN);
    CHECK(fp_segment6_parse(SCAPY_SYN6, 39, 0, &s) == -FP_E_TRUNCATED);
    ip.flow = 0x100000;
    CHECK(fp_segment6_build(buf, sizeof buf, &ip, &tcp, NULL, 0) == -FP_E_INVAL);
    ip.flow = 0;
    CHECK(fp_segment6_build(buf, 60, &ip, &tcp, NULL, 0) == -FP_E_NOSPACE);

    /* a batch at an odd stride: each segment is what build makes */
    enum { COUNT6 = 5, STRIDE6 = 101 };
    static uint8_t out[COUNT6 * STRIDE6];
    uint32_t lens[COUNT6];
    uint16_t sports[COUNT6] = {1, 2, 3, 4, 65535};
    struct fp_batch_vary6 vary = {.sports = sports};
    CHECK(fp_segment6_build_batch(out, STRIDE6, COUNT6, &ip, &tcp, NULL, 0, &vary, lens) ==
          COUNT6);
    for (int i = 0; i < COUNT6; i++) {
        struct fp_tcp t = tcp;
        t.sport = sports[i];
        int m = fp_segment6_build(buf, sizeof buf, &ip, &t, NULL, 0);
        CHECK(m > 0 && lens[i] == (uint32_t)m && memcmp(out + i * STRIDE6, buf, (size_t)m) == 0);
    }
    /* a layout that wraps size_t is refused, never written */
    CHECK(fp_segment6_build_batch(out, (size_t)-1 / 2, 3, &ip, &tcp, NULL, 0, NULL, lens) ==
          -FP_E_TOOBIG);
}

int main(void)
{
    test_checksums();
    test_build_matches_scapy_and_parses_back();
    test_batches_at_odd_strides();
    test_ipv6_matches_scapy_and_refuses_by_reason();
    test_sequence_arithmetic();
    test_sizes_refuse_what_wraps_here();
    printf("test_core: %d checks, %d failed (size_t %zu bits, %s-endian)\n", checks, failures,
           sizeof(size_t) * 8, *(const uint8_t *)&(uint16_t){1} ? "little" : "big");
    return failures ? 1 : 0;
}
