/* fp_tcp.h - TCP header and options build/parse (RFC 9293, RFC 7323, RFC 2018),
 * whole IPv4+TCP segments, and the batch builder for sendmmsg. */
#ifndef FASTPUNCH_FP_TCP_H
#define FASTPUNCH_FP_TCP_H

#include <stddef.h>
#include <stdint.h>

#include "fp_ip.h"
#include "fp_ip6.h"

#define FP_TCP_MIN_HLEN 20
#define FP_TCP_MAX_OPTLEN 40

/* Control bits, as in the 16-bit word after the sequence numbers (low 9 bits
 * + the reserved/AE bits we carry through unchanged). */
#define FP_TCP_FIN 0x001u
#define FP_TCP_SYN 0x002u
#define FP_TCP_RST 0x004u
#define FP_TCP_PSH 0x008u
#define FP_TCP_ACK 0x010u
#define FP_TCP_URG 0x020u
#define FP_TCP_ECE 0x040u
#define FP_TCP_CWR 0x080u
#define FP_TCP_AE  0x100u
#define FP_TCP_FLAGMASK 0xfffu /* reserved bits + AE + the eight classic flags */

/* Option kinds. */
#define FP_TCPOPT_EOL 0
#define FP_TCPOPT_NOP 1
#define FP_TCPOPT_MSS 2
#define FP_TCPOPT_WSCALE 3
#define FP_TCPOPT_SACK_PERM 4
#define FP_TCPOPT_SACK 5
#define FP_TCPOPT_TIMESTAMP 8

/* Which options a struct fp_tcp_opts carries. */
#define FP_OPT_MSS 0x01u
#define FP_OPT_WSCALE 0x02u
#define FP_OPT_SACK_PERM 0x04u
#define FP_OPT_TIMESTAMP 0x08u
#define FP_OPT_SACK 0x10u

#define FP_MAX_SACK_BLOCKS 4

struct fp_sack_block {
    uint32_t left, right;
};

struct fp_tcp_opts {
    uint8_t present;        /* FP_OPT_* bits                                */
    uint8_t wscale;         /* shift count as sent (parse keeps values > 14) */
    uint16_t mss;
    uint32_t ts_val, ts_ecr;
    uint8_t sack_count;     /* blocks in sack[]                             */
    uint8_t unknown;        /* parse: options of kinds we do not interpret  */
    struct fp_sack_block sack[FP_MAX_SACK_BLOCKS];
};

/* A TCP header. seq/ack/ports in host order. */
struct fp_tcp {
    uint16_t sport, dport;
    uint32_t seq, ack;
    uint8_t doff;           /* header length in bytes                       */
    uint16_t flags;         /* FP_TCP_* bits                                */
    uint16_t window;        /* the raw 16-bit field (unscaled)              */
    uint16_t check;         /* as read, host order                          */
    uint16_t urg;
    struct fp_tcp_opts opts;
};

/* Encode options in the layout Linux uses (MSS | SACK_PERM+TS | NOP,WS |
 * NOP,NOP,SACK), padded to a multiple of 4. Returns the byte count or
 * FP_E_OPT_SPACE / FP_E_INVAL. */
int fp_tcp_opts_encode(const struct fp_tcp_opts *o, uint8_t *out, size_t cap);

/* Decode an option block. Any layout is survivable: a truncated or
 * overrunning option, a known option of the wrong length, or a duplicate
 * returns a negative FP_E_OPT_* code and leaves *o partially filled. */
int fp_tcp_opts_decode(const uint8_t *p, size_t len, struct fp_tcp_opts *o);

/* A whole parsed IPv4/TCP segment; pointers refer into the parsed buffer. */
struct fp_segment {
    struct fp_ipv4 ip;
    struct fp_tcp tcp;
    const uint8_t *payload;
    uint32_t payload_len;
};

#define FP_VERIFY_IP 0x1
#define FP_VERIFY_TCP 0x2

/* Parse an IPv4 datagram carrying TCP. verify: FP_VERIFY_* bits. */
int fp_segment_parse(const uint8_t *buf, size_t len, int verify, struct fp_segment *out);

/* Parse count datagrams laid out stride bytes apart with lengths lens[]
 * (a recvmmsg buffer). out[i] and status[i] (0 or a negative FP_E_* code)
 * describe datagram i. Returns how many parsed, or -FP_E_TOOBIG (nothing
 * parsed, every status[i] -FP_E_TOOBIG) for a layout that wraps size_t. */
long fp_segment_parse_batch(const uint8_t *buf, size_t stride, const uint32_t *lens,
                            size_t count, int verify, struct fp_segment *out, int32_t *status);

/* Build one IPv4/TCP segment into buf: both checksums computed. The
 * ip.hlen/total_len/check, tcp.doff/check fields of the inputs are ignored.
 * Returns the datagram length or a negative FP_E_* code. */
int fp_segment_build(uint8_t *buf, size_t cap, const struct fp_ipv4 *ip,
                     const struct fp_tcp *tcp, const uint8_t *payload, size_t payload_len);

/* Per-segment variations for fp_segment_build_batch: any array may be NULL.
 * When seqs is NULL, segment i gets tcp->seq + i * payload_len (a stream). */
struct fp_batch_vary {
    const uint32_t *saddrs;  /* host order */
    const uint32_t *daddrs;
    const uint16_t *sports;
    const uint16_t *dports;
    const uint32_t *seqs;
    const uint8_t *ttls;
};

/* Build count segments into out, one every stride bytes. Segment i carries
 * payload_len bytes from payloads + i * payload_len (or none when payloads is
 * NULL or payload_len is 0); IP id of segment i is ip->id + i. lens[i] gets
 * each datagram's length. Returns count or a negative FP_E_* code. */
long fp_segment_build_batch(uint8_t *out, size_t stride, size_t count,
                            const struct fp_ipv4 *ip, const struct fp_tcp *tcp,
                            const uint8_t *payloads, size_t payload_len,
                            const struct fp_batch_vary *vary, uint32_t *lens);

/* The same over IPv6. A parsed segment6's TCP part starts after the
 * extension headers (ip.ext_len bytes into the payload); verify takes
 * FP_VERIFY_TCP only (IPv6 has no header checksum). */
struct fp_segment6 {
    struct fp_ipv6 ip;
    struct fp_tcp tcp;
    const uint8_t *payload;
    uint32_t payload_len;
};

int fp_segment6_parse(const uint8_t *buf, size_t len, int verify, struct fp_segment6 *out);

long fp_segment6_parse_batch(const uint8_t *buf, size_t stride, const uint32_t *lens,
                             size_t count, int verify, struct fp_segment6 *out,
                             int32_t *status);

/* One IPv6/TCP datagram, no extension headers, TCP checksum filled. */
int fp_segment6_build(uint8_t *buf, size_t cap, const struct fp_ipv6 *ip,
                      const struct fp_tcp *tcp, const uint8_t *payload, size_t payload_len);

/* Per-segment fields of an IPv6 batch (NULL: the template's). */
struct fp_batch_vary6 {
    const uint8_t *daddrs;   /* 16 bytes per segment, as on the wire */
    const uint16_t *sports;
    const uint16_t *dports;
    const uint32_t *seqs;
    const uint8_t *hop_limits;
};

long fp_segment6_build_batch(uint8_t *out, size_t stride, size_t count,
                             const struct fp_ipv6 *ip, const struct fp_tcp *tcp,
                             const uint8_t *payloads, size_t payload_len,
                             const struct fp_batch_vary6 *vary, uint32_t *lens);

#endif
