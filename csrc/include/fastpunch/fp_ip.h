/* fp_ip.h - IPv4 header build and parse (RFC 791). */
#ifndef FASTPUNCH_FP_IP_H
#define FASTPUNCH_FP_IP_H

#include <stddef.h>
#include <stdint.h>

#define FP_IPV4_MIN_HLEN 20
#define FP_IPV4_MAX_HLEN 60
#define FP_IPPROTO_TCP 6

#define FP_IP_RF 0x8000u /* reserved ("evil") bit */
#define FP_IP_DF 0x4000u
#define FP_IP_MF 0x2000u
#define FP_IP_OFFMASK 0x1fffu

/* A parsed or to-be-built IPv4 header. Addresses in host order. */
struct fp_ipv4 {
    uint8_t hlen;          /* header length in bytes (IHL * 4)             */
    uint8_t tos;
    uint16_t total_len;    /* whole datagram, header included              */
    uint16_t id;
    uint16_t frag;         /* flags (FP_IP_RF|DF|MF) | offset in 8-byte units */
    uint8_t ttl;
    uint8_t proto;
    uint16_t check;        /* as read from the wire, host order            */
    uint32_t saddr;
    uint32_t daddr;
    const uint8_t *options; /* parse: points into the buffer; build: copied */
    uint8_t options_len;    /* multiple of 4 when building                 */
};

/* Parse an IPv4 header. Checks version, IHL, total length against len (a
 * longer buffer is allowed: link padding), and the header checksum when
 * verify is non-zero. Returns 0 or a negative FP_E_* code. */
int fp_ipv4_parse(const uint8_t *buf, size_t len, int verify, struct fp_ipv4 *out);

/* Write the header for a datagram carrying payload_len bytes after it:
 * hlen, total_len and check are computed (the corresponding fields of h are
 * ignored). Returns the header length or a negative FP_E_* code. */
int fp_ipv4_build(uint8_t *buf, size_t cap, const struct fp_ipv4 *h, size_t payload_len);

#endif
