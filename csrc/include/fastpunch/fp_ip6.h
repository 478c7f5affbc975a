/* fp_ip6.h - IPv6 header build and parse (RFC 8200). */
#ifndef FASTPUNCH_FP_IP6_H
#define FASTPUNCH_FP_IP6_H

#include <stddef.h>
#include <stdint.h>

#define FP_IPV6_HLEN 40
/* extension headers a parse walks past at most before it refuses the
 * datagram (RFC 8200 §4.1 recommends at most one of each kind) */
#define FP_IPV6_MAX_EXT 8

#define FP_IP6_HOPOPTS 0
#define FP_IP6_ROUTING 43
#define FP_IP6_FRAGMENT 44
#define FP_IP6_ESP 50
#define FP_IP6_AH 51
#define FP_IP6_NONE 59
#define FP_IP6_DSTOPTS 60

/* A parsed or to-be-built IPv6 header. Addresses as on the wire. */
struct fp_ipv6 {
    uint8_t tclass;        /* traffic class                                  */
    uint32_t flow;         /* flow label, 20 bits                            */
    uint16_t payload_len;  /* everything after the fixed 40 bytes            */
    uint8_t next;          /* the fixed header's next header                 */
    uint8_t hop_limit;
    uint8_t proto;         /* parse: the upper layer after the extension headers */
    uint16_t ext_len;      /* parse: bytes of extension headers walked past  */
    uint8_t saddr[16];
    uint8_t daddr[16];
};

/* Parse an IPv6 header and walk its extension headers: hop-by-hop,
 * routing, destination options and AH are skipped (bounds-checked each),
 * an atomic fragment header (offset 0, no more fragments: RFC 6946) too; a
 * real fragment is FP_E_IP_FRAGMENT, ESP, a routing header with segments
 * left (we are not its final destination), more than FP_IPV6_MAX_EXT
 * headers, or one running past the payload, is FP_E_IP6_EXTHDR. A payload
 * length past the buffer (a longer buffer is allowed: link padding), or zero
 * behind a hop-by-hop header (a jumbogram), is FP_E_IP6_PAYLEN. proto and
 * ext_len say where the upper layer starts. Returns 0 or a negative code. */
int fp_ipv6_parse(const uint8_t *buf, size_t len, struct fp_ipv6 *out);

/* Write the fixed header (no extension headers) for a datagram carrying
 * payload_len bytes of protocol proto after it. Returns 40 or a negative
 * code (FP_E_TOOBIG past 65535 bytes of payload, FP_E_INVAL for a flow
 * label past 20 bits). */
int fp_ipv6_build(uint8_t *buf, size_t cap, const struct fp_ipv6 *h, uint8_t proto,
                  size_t payload_len);

#endif
