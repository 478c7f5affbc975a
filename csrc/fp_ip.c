/* fp_ip.c - IPv4 header build and parse. */
#include <string.h>

#include "fastpunch/fp_checksum.h"
#include "fastpunch/fp_errors.h"
#include "fastpunch/fp_ip.h"
#include "fp_wire.h"

int fp_ipv4_parse(const uint8_t *buf, size_t len, int verify, struct fp_ipv4 *out)
{
    if (len < FP_IPV4_MIN_HLEN)
        return -FP_E_TRUNCATED;
    if (buf[0] >> 4 != 4)
        return -FP_E_IP_VERSION;
    size_t hlen = (size_t)(buf[0] & 0x0f) * 4;
    if (hlen < FP_IPV4_MIN_HLEN || hlen > len)
        return -FP_E_IP_IHL;
    size_t total = rd16(buf + 2);
    if (total < hlen || total > len)
        return -FP_E_IP_TOTLEN;
    if (verify && fp_csum(buf, hlen) != 0)
        return -FP_E_IP_CHECKSUM;

    out->hlen = (uint8_t)hlen;
    out->tos = buf[1];
    out->total_len = (uint16_t)total;
    out->id = rd16(buf + 4);
    out->frag = rd16(buf + 6);
    out->ttl = buf[8];
    out->proto = buf[9];
    out->check = rd16(buf + 10);
    out->saddr = rd32(buf + 12);
    out->daddr = rd32(buf + 16);
    out->options = hlen > FP_IPV4_MIN_HLEN ? buf + FP_IPV4_MIN_HLEN : NULL;
    out->options_len = (uint8_t)(hlen - FP_IPV4_MIN_HLEN);
    return 0;
}

int fp_ipv4_build(uint8_t *buf, size_t cap, const struct fp_ipv4 *h, size_t payload_len)
{
    size_t olen = h->options_len;
    if (olen % 4 || olen > FP_IPV4_MAX_HLEN - FP_IPV4_MIN_HLEN || (olen && !h->options))
        return -FP_E_IP_OPTIONS;
    size_t hlen = FP_IPV4_MIN_HLEN + olen;
    if (hlen + payload_len > 0xffff)
        return -FP_E_TOOBIG;
    if (cap < hlen)
        return -FP_E_NOSPACE;

    buf[0] = (uint8_t)(0x40 | hlen / 4);
    buf[1] = h->tos;
    wr16(buf + 2, (uint16_t)(hlen + payload_len));
    wr16(buf + 4, h->id);
    wr16(buf + 6, h->frag);
    buf[8] = h->ttl;
    buf[9] = h->proto;
    buf[10] = buf[11] = 0;
    wr32(buf + 12, h->saddr);
    wr32(buf + 16, h->daddr);
    if (olen)
        memcpy(buf + FP_IPV4_MIN_HLEN, h->options, olen);
    fp_sum16 c = fp_csum(buf, hlen);
    memcpy(buf + 10, &c, 2);
    return (int)hlen;
}
