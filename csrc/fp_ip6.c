/* fp_ip6.c - IPv6 header build and parse, extension headers walked. */
#include <string.h>

#include "fastpunch/fp_errors.h"
#include "fastpunch/fp_ip6.h"
#include "fp_wire.h"

int fp_ipv6_parse(const uint8_t *buf, size_t len, struct fp_ipv6 *out)
{
    if (len < FP_IPV6_HLEN)
        return -FP_E_TRUNCATED;
    if (buf[0] >> 4 != 6)
        return -FP_E_IP_VERSION;
    uint32_t word = rd32(buf);
    size_t plen = rd16(buf + 4);
    if (plen > len - FP_IPV6_HLEN)
        return -FP_E_IP6_PAYLEN;
    if (plen == 0 && buf[6] == FP_IP6_HOPOPTS)
        return -FP_E_IP6_PAYLEN;                   /* a jumbogram (RFC 2675) */

    uint8_t next = buf[6];
    size_t off = 0;                                /* into the payload */
    const uint8_t *p = buf + FP_IPV6_HLEN;
    for (int n = 0;; n++) {
        size_t hlen;
        if (next != FP_IP6_HOPOPTS && next != FP_IP6_ROUTING && next != FP_IP6_DSTOPTS &&
            next != FP_IP6_FRAGMENT && next != FP_IP6_AH && next != FP_IP6_ESP)
            break;                                 /* the upper layer (or 59) */
        if (next == FP_IP6_ESP || n >= FP_IPV6_MAX_EXT)
            return -FP_E_IP6_EXTHDR;
        if (plen - off < 8)
            return -FP_E_IP6_EXTHDR;
        const uint8_t *h = p + off;
        if (next == FP_IP6_FRAGMENT) {
            uint16_t fo = rd16(h + 2);             /* offset << 3 | res | M */
            if (fo & 0xfff9)                       /* an offset, or more fragments */
                return -FP_E_IP_FRAGMENT;
            hlen = 8;
        } else if (next == FP_IP6_AH) {
            hlen = ((size_t)h[1] + 2) * 4;
        } else {
            /* a routing header with segments left: we are not the final
             * destination, and the pseudo-header's address is another's
             * (RFC 8200 §8.1), so nothing after it is ours to read */
            if (next == FP_IP6_ROUTING && h[3] != 0)
                return -FP_E_IP6_EXTHDR;
            hlen = ((size_t)h[1] + 1) * 8;
        }
        if (hlen > plen - off)
            return -FP_E_IP6_EXTHDR;
        next = h[0];
        off += hlen;
    }

    out->tclass = (uint8_t)(word >> 20);
    out->flow = word & 0xfffff;
    out->payload_len = (uint16_t)plen;
    out->next = buf[6];
    out->hop_limit = buf[7];
    out->proto = next;
    out->ext_len = (uint16_t)off;
    memcpy(out->saddr, buf + 8, 16);
    memcpy(out->daddr, buf + 24, 16);
    return 0;
}

int fp_ipv6_build(uint8_t *buf, size_t cap, const struct fp_ipv6 *h, uint8_t proto,
                  size_t payload_len)
{
    if (h->flow > 0xfffff)
        return -FP_E_INVAL;
    if (payload_len > 0xffff)
        return -FP_E_TOOBIG;
    if (cap < FP_IPV6_HLEN)
        return -FP_E_NOSPACE;
    wr32(buf, (uint32_t)6 << 28 | (uint32_t)h->tclass << 20 | h->flow);
    wr16(buf + 4, (uint16_t)payload_len);
    buf[6] = proto;
    buf[7] = h->hop_limit;
    memcpy(buf + 8, h->saddr, 16);
    memcpy(buf + 24, h->daddr, 16);
    return FP_IPV6_HLEN;
}
