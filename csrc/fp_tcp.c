/* fp_tcp.c - TCP options, whole-segment build/parse and the batch builder. */
#include <string.h>

#include "fastpunch/fp_checksum.h"
#include "fastpunch/fp_errors.h"
#include "fastpunch/fp_size.h"
#include "fastpunch/fp_tcp.h"
#include "fp_wire.h"

int fp_tcp_opts_encode(const struct fp_tcp_opts *o, uint8_t *out, size_t cap)
{
    uint8_t buf[64];
    size_t n = 0;
    unsigned present = o->present;

    if ((present & FP_OPT_WSCALE) && o->wscale > 14)
        return -FP_E_INVAL;
    if ((present & FP_OPT_SACK) && (o->sack_count == 0 || o->sack_count > FP_MAX_SACK_BLOCKS))
        return -FP_E_INVAL;

    if (present & FP_OPT_MSS) {
        buf[n++] = FP_TCPOPT_MSS;
        buf[n++] = 4;
        wr16(buf + n, o->mss);
        n += 2;
    }
    if (present & FP_OPT_TIMESTAMP) {
        if (present & FP_OPT_SACK_PERM) {
            buf[n++] = FP_TCPOPT_SACK_PERM;
            buf[n++] = 2;
        } else {
            buf[n++] = FP_TCPOPT_NOP;
            buf[n++] = FP_TCPOPT_NOP;
        }
        buf[n++] = FP_TCPOPT_TIMESTAMP;
        buf[n++] = 10;
        wr32(buf + n, o->ts_val);
        wr32(buf + n + 4, o->ts_ecr);
        n += 8;
    } else if (present & FP_OPT_SACK_PERM) {
        buf[n++] = FP_TCPOPT_NOP;
        buf[n++] = FP_TCPOPT_NOP;
        buf[n++] = FP_TCPOPT_SACK_PERM;
        buf[n++] = 2;
    }
    if (present & FP_OPT_WSCALE) {
        buf[n++] = FP_TCPOPT_NOP;
        buf[n++] = FP_TCPOPT_WSCALE;
        buf[n++] = 3;
        buf[n++] = o->wscale;
    }
    if (present & FP_OPT_SACK) {
        if (n + 4 + 8 * (size_t)o->sack_count > FP_TCP_MAX_OPTLEN)
            return -FP_E_OPT_SPACE;
        buf[n++] = FP_TCPOPT_NOP;
        buf[n++] = FP_TCPOPT_NOP;
        buf[n++] = FP_TCPOPT_SACK;
        buf[n++] = (uint8_t)(2 + 8 * o->sack_count);
        for (unsigned i = 0; i < o->sack_count; i++) {
            wr32(buf + n, o->sack[i].left);
            wr32(buf + n + 4, o->sack[i].right);
            n += 8;
        }
    }
    if (n > FP_TCP_MAX_OPTLEN)
        return -FP_E_OPT_SPACE;
    if (n > cap)
        return -FP_E_NOSPACE;
    memcpy(out, buf, n);
    return (int)n; /* every group above is 4-byte aligned: no padding needed */
}

int fp_tcp_opts_decode(const uint8_t *p, size_t len, struct fp_tcp_opts *o)
{
    memset(o, 0, sizeof *o);
    size_t i = 0;
    while (i < len) {
        uint8_t kind = p[i];
        if (kind == FP_TCPOPT_EOL)
            break;
        if (kind == FP_TCPOPT_NOP) {
            i++;
            continue;
        }
        if (i + 1 >= len)
            return -FP_E_OPT_TRUNCATED;
        size_t olen = p[i + 1];
        if (olen < 2 || i + olen > len)
            return -FP_E_OPT_TRUNCATED;
        const uint8_t *v = p + i + 2;
        unsigned bit = 0;
        switch (kind) {
        case FP_TCPOPT_MSS:
            if (olen != 4)
                return -FP_E_OPT_LENGTH;
            bit = FP_OPT_MSS;
            o->mss = rd16(v);
            break;
        case FP_TCPOPT_WSCALE:
            if (olen != 3)
                return -FP_E_OPT_LENGTH;
            bit = FP_OPT_WSCALE;
            o->wscale = v[0];
            break;
        case FP_TCPOPT_SACK_PERM:
            if (olen != 2)
                return -FP_E_OPT_LENGTH;
            bit = FP_OPT_SACK_PERM;
            break;
        case FP_TCPOPT_TIMESTAMP:
            if (olen != 10)
                return -FP_E_OPT_LENGTH;
            bit = FP_OPT_TIMESTAMP;
            o->ts_val = rd32(v);
            o->ts_ecr = rd32(v + 4);
            break;
        case FP_TCPOPT_SACK:
            if (olen < 10 || (olen - 2) % 8 || (olen - 2) / 8 > FP_MAX_SACK_BLOCKS)
                return -FP_E_OPT_LENGTH;
            bit = FP_OPT_SACK;
            o->sack_count = (uint8_t)((olen - 2) / 8);
            for (unsigned b = 0; b < o->sack_count; b++) {
                o->sack[b].left = rd32(v + 8 * b);
                o->sack[b].right = rd32(v + 8 * b + 4);
            }
            break;
        default:
            if (o->unknown < 255)
                o->unknown++;
            break;
        }
        if (bit) {
            if (o->present & bit)
                return -FP_E_OPT_DUPLICATE;
            o->present |= (uint8_t)bit;
        }
        i += olen;
    }
    return 0;
}

int fp_segment_parse(const uint8_t *buf, size_t len, int verify, struct fp_segment *out)
{
    int rc = fp_ipv4_parse(buf, len, verify & FP_VERIFY_IP, &out->ip);
    if (rc < 0)
        return rc;
    if (out->ip.proto != FP_IPPROTO_TCP)
        return -FP_E_IP_PROTO;
    if (out->ip.frag & (FP_IP_MF | FP_IP_OFFMASK))
        return -FP_E_IP_FRAGMENT;

    const uint8_t *t = buf + out->ip.hlen;
    size_t tlen = out->ip.total_len - out->ip.hlen;
    if (tlen < FP_TCP_MIN_HLEN)
        return -FP_E_TRUNCATED;
    size_t doff = (size_t)(t[12] >> 4) * 4;
    if (doff < FP_TCP_MIN_HLEN || doff > tlen)
        return -FP_E_TCP_DOFF;
    if (verify & FP_VERIFY_TCP) {
        uint64_t s = fp_csum_pseudo(out->ip.saddr, out->ip.daddr, FP_IPPROTO_TCP, (uint16_t)tlen);
        if (fp_csum_fold(fp_csum_add(s, t, tlen)) != 0)
            return -FP_E_TCP_CHECKSUM;
    }

    struct fp_tcp *h = &out->tcp;
    h->sport = rd16(t);
    h->dport = rd16(t + 2);
    h->seq = rd32(t + 4);
    h->ack = rd32(t + 8);
    h->doff = (uint8_t)doff;
    h->flags = (uint16_t)(rd16(t + 12) & FP_TCP_FLAGMASK);
    h->window = rd16(t + 14);
    h->check = rd16(t + 16);
    h->urg = rd16(t + 18);
    out->payload = t + doff;
    out->payload_len = (uint32_t)(tlen - doff);
    return fp_tcp_opts_decode(t + FP_TCP_MIN_HLEN, doff - FP_TCP_MIN_HLEN, &h->opts);
}

/* A parse batch's layout, count * stride bytes, refused (every status
 * TOOBIG) when it wraps size_t: no buffer can hold it. Both families. */
static int refuse_layout(size_t count, size_t stride, int32_t *status)
{
    size_t span;
    if (fp_size_mul(count, stride, &span) == 0)
        return 0;
    for (size_t i = 0; i < count; i++)
        status[i] = -FP_E_TOOBIG;
    return -FP_E_TOOBIG;
}

long fp_segment_parse_batch(const uint8_t *buf, size_t stride, const uint32_t *lens,
                            size_t count, int verify, struct fp_segment *out, int32_t *status)
{
    long ok = 0;
    if (refuse_layout(count, stride, status) < 0)
        return -FP_E_TOOBIG;
    for (size_t i = 0; i < count; i++) {
        size_t len = lens[i] < stride ? lens[i] : stride;
        status[i] = fp_segment_parse(buf + i * stride, len, verify, &out[i]);
        ok += status[i] == 0;
    }
    return ok;
}

/* Fill both checksums of a datagram whose IP header is ihl bytes and whose
 * TCP part (header + data) is tlen bytes. */
static void finish_checksums(uint8_t *p, size_t ihl, size_t tcp_hlen, size_t tlen,
                             uint32_t saddr, uint32_t daddr)
{
    uint8_t *t = p + ihl;
    p[10] = p[11] = 0;
    fp_sum16 ic = fp_csum(p, ihl);
    memcpy(p + 10, &ic, 2);
    t[16] = t[17] = 0;
    uint64_t s = fp_csum_pseudo(saddr, daddr, FP_IPPROTO_TCP, (uint16_t)tlen);
    s = fp_csum_add(s, t, tcp_hlen);                      /* tcp_hlen is a multiple of 4 */
    s = fp_csum_add(s, t + tcp_hlen, tlen - tcp_hlen);
    fp_sum16 tc = fp_csum_fold(s);
    memcpy(t + 16, &tc, 2);
}

static int write_tcp_header(uint8_t *t, const struct fp_tcp *h, const uint8_t *opts, int optlen)
{
    size_t doff = FP_TCP_MIN_HLEN + (size_t)optlen;
    wr16(t, h->sport);
    wr16(t + 2, h->dport);
    wr32(t + 4, h->seq);
    wr32(t + 8, h->ack);
    wr16(t + 12, (uint16_t)((doff / 4) << 12 | (h->flags & FP_TCP_FLAGMASK)));
    wr16(t + 14, h->window);
    t[16] = t[17] = 0;
    wr16(t + 18, h->urg);
    memcpy(t + FP_TCP_MIN_HLEN, opts, (size_t)optlen);
    return (int)doff;
}

int fp_segment_build(uint8_t *buf, size_t cap, const struct fp_ipv4 *ip,
                     const struct fp_tcp *tcp, const uint8_t *payload, size_t payload_len)
{
    uint8_t opts[FP_TCP_MAX_OPTLEN];
    int optlen = fp_tcp_opts_encode(&tcp->opts, opts, sizeof opts);
    if (optlen < 0)
        return optlen;
    if (payload_len > 0xffff)                /* (before the sum below could wrap) */
        return -FP_E_TOOBIG;
    size_t tlen = FP_TCP_MIN_HLEN + (size_t)optlen + payload_len;
    struct fp_ipv4 iph = *ip;
    iph.proto = FP_IPPROTO_TCP;
    int ihl = fp_ipv4_build(buf, cap, &iph, tlen);
    if (ihl < 0)
        return ihl;
    if ((size_t)ihl + tlen > cap)
        return -FP_E_NOSPACE;
    int doff = write_tcp_header(buf + ihl, tcp, opts, optlen);
    if (payload_len)
        memcpy(buf + ihl + doff, payload, payload_len);
    finish_checksums(buf, (size_t)ihl, (size_t)doff, tlen, iph.saddr, iph.daddr);
    return (int)((size_t)ihl + tlen);
}

/* Segment i's TCP part in a batch: the ports and sequence number that vary
 * (each array optional; by default the sequence advances by the payload),
 * and its payload. Both families. */
static void vary_tcp(uint8_t *t, size_t i, const uint16_t *sports, const uint16_t *dports,
                     const uint32_t *seqs, uint32_t seq, size_t doff, const uint8_t *payloads,
                     size_t payload_len)
{
    if (sports)
        wr16(t, sports[i]);
    if (dports)
        wr16(t + 2, dports[i]);
    wr32(t + 4, seqs ? seqs[i] : seq + (uint32_t)(i * payload_len));
    if (payload_len)
        memcpy(t + doff, payloads + i * payload_len, payload_len);
}

long fp_segment_build_batch(uint8_t *out, size_t stride, size_t count,
                            const struct fp_ipv4 *ip, const struct fp_tcp *tcp,
                            const uint8_t *payloads, size_t payload_len,
                            const struct fp_batch_vary *vary, uint32_t *lens)
{
    static const struct fp_batch_vary none;
    if (!vary)
        vary = &none;
    if (!payloads)
        payload_len = 0;

    /* Build the first header once; every other segment starts as a copy. */
    uint8_t tmpl[FP_IPV4_MAX_HLEN + FP_TCP_MIN_HLEN + FP_TCP_MAX_OPTLEN];
    int hdr = fp_segment_build(tmpl, sizeof tmpl, ip, tcp, NULL, 0);
    if (hdr < 0)
        return hdr;
    size_t ihl = (size_t)(tmpl[0] & 0x0f) * 4;
    size_t doff = (size_t)hdr - ihl;
    if (payload_len > 0xffff)                /* (before the sum below could wrap) */
        return -FP_E_TOOBIG;
    size_t dlen = (size_t)hdr + payload_len;
    if (dlen > 0xffff)
        return -FP_E_TOOBIG;
    if (stride < dlen)
        return -FP_E_NOSPACE;
    /* the layout the caller's buffer must hold, (count - 1) * stride + dlen
     * bytes, refused if it wraps size_t (a 32-bit target): no buffer can be
     * that large. (payloads, count * payload_len, is no larger: payload_len
     * <= dlen <= stride.) */
    size_t span;
    if (fp_size_span(count, stride, dlen, &span) < 0)
        return -FP_E_TOOBIG;
    wr16(tmpl + 2, (uint16_t)dlen);

    for (size_t i = 0; i < count; i++) {
        uint8_t *p = out + i * stride;
        uint8_t *t = p + ihl;
        uint32_t saddr = vary->saddrs ? vary->saddrs[i] : ip->saddr;
        uint32_t daddr = vary->daddrs ? vary->daddrs[i] : ip->daddr;
        memcpy(p, tmpl, (size_t)hdr);
        wr16(p + 4, (uint16_t)(ip->id + i));
        if (vary->ttls)
            p[8] = vary->ttls[i];
        wr32(p + 12, saddr);
        wr32(p + 16, daddr);
        vary_tcp(t, i, vary->sports, vary->dports, vary->seqs, tcp->seq, doff, payloads,
                 payload_len);
        finish_checksums(p, ihl, doff, doff + payload_len, saddr, daddr);
        lens[i] = (uint32_t)dlen;
    }
    return (long)count;
}

/* ---------------------------------------------------------------- IPv6 */

/* The TCP part of a segment (its header at t, tlen bytes with data): the
 * fields, options decoded, payload located. Shared by both families. */
static int parse_tcp_part(const uint8_t *t, size_t tlen, struct fp_tcp *h,
                          const uint8_t **payload, uint32_t *payload_len)
{
    if (tlen < FP_TCP_MIN_HLEN)
        return -FP_E_TRUNCATED;
    size_t doff = (size_t)(t[12] >> 4) * 4;
    if (doff < FP_TCP_MIN_HLEN || doff > tlen)
        return -FP_E_TCP_DOFF;
    h->sport = rd16(t);
    h->dport = rd16(t + 2);
    h->seq = rd32(t + 4);
    h->ack = rd32(t + 8);
    h->doff = (uint8_t)doff;
    h->flags = (uint16_t)(rd16(t + 12) & FP_TCP_FLAGMASK);
    h->window = rd16(t + 14);
    h->check = rd16(t + 16);
    h->urg = rd16(t + 18);
    *payload = t + doff;
    *payload_len = (uint32_t)(tlen - doff);
    return fp_tcp_opts_decode(t + FP_TCP_MIN_HLEN, doff - FP_TCP_MIN_HLEN, &h->opts);
}

int fp_segment6_parse(const uint8_t *buf, size_t len, int verify, struct fp_segment6 *out)
{
    int rc = fp_ipv6_parse(buf, len, &out->ip);
    if (rc < 0)
        return rc;
    if (out->ip.proto != FP_IPPROTO_TCP)
        return -FP_E_IP_PROTO;
    const uint8_t *t = buf + FP_IPV6_HLEN + out->ip.ext_len;
    size_t tlen = (size_t)out->ip.payload_len - out->ip.ext_len;
    if (tlen >= FP_TCP_MIN_HLEN && (verify & FP_VERIFY_TCP)) {
        size_t doff = (size_t)(t[12] >> 4) * 4;
        if (doff >= FP_TCP_MIN_HLEN && doff <= tlen) {   /* (else: the reason below) */
            uint64_t s = fp_csum_pseudo6(out->ip.saddr, out->ip.daddr, FP_IPPROTO_TCP,
                                         (uint32_t)tlen);
            if (fp_csum_fold(fp_csum_add(s, t, tlen)) != 0)
                return -FP_E_TCP_CHECKSUM;
        }
    }
    return parse_tcp_part(t, tlen, &out->tcp, &out->payload, &out->payload_len);
}

long fp_segment6_parse_batch(const uint8_t *buf, size_t stride, const uint32_t *lens,
                             size_t count, int verify, struct fp_segment6 *out,
                             int32_t *status)
{
    long ok = 0;
    if (refuse_layout(count, stride, status) < 0)
        return -FP_E_TOOBIG;
    for (size_t i = 0; i < count; i++) {
        size_t len = lens[i] < stride ? lens[i] : stride;
        status[i] = fp_segment6_parse(buf + i * stride, len, verify, &out[i]);
        ok += status[i] == 0;
    }
    return ok;
}

static void finish_checksum6(uint8_t *p, size_t tcp_hlen, size_t tlen)
{
    uint8_t *t = p + FP_IPV6_HLEN;
    t[16] = t[17] = 0;
    uint64_t s = fp_csum_pseudo6(p + 8, p + 24, FP_IPPROTO_TCP, (uint32_t)tlen);
    s = fp_csum_add(s, t, tcp_hlen);                      /* tcp_hlen is a multiple of 4 */
    s = fp_csum_add(s, t + tcp_hlen, tlen - tcp_hlen);
    fp_sum16 tc = fp_csum_fold(s);
    memcpy(t + 16, &tc, 2);
}

int fp_segment6_build(uint8_t *buf, size_t cap, const struct fp_ipv6 *ip,
                      const struct fp_tcp *tcp, const uint8_t *payload, size_t payload_len)
{
    uint8_t opts[FP_TCP_MAX_OPTLEN];
    int optlen = fp_tcp_opts_encode(&tcp->opts, opts, sizeof opts);
    if (optlen < 0)
        return optlen;
    if (payload_len > 0xffff)                /* (before the sum below could wrap) */
        return -FP_E_TOOBIG;
    size_t tlen = FP_TCP_MIN_HLEN + (size_t)optlen + payload_len;
    int ihl = fp_ipv6_build(buf, cap, ip, FP_IPPROTO_TCP, tlen);
    if (ihl < 0)
        return ihl;
    if ((size_t)ihl + tlen > cap)
        return -FP_E_NOSPACE;
    int doff = write_tcp_header(buf + ihl, tcp, opts, optlen);
    if (payload_len)
        memcpy(buf + ihl + doff, payload, payload_len);
    finish_checksum6(buf, (size_t)doff, tlen);
    return (int)((size_t)ihl + tlen);
}

long fp_segment6_build_batch(uint8_t *out, size_t stride, size_t count,
                             const struct fp_ipv6 *ip, const struct fp_tcp *tcp,
                             const uint8_t *payloads, size_t payload_len,
                             const struct fp_batch_vary6 *vary, uint32_t *lens)
{
    static const struct fp_batch_vary6 none;
    if (!vary)
        vary = &none;
    if (!payloads)
        payload_len = 0;
    uint8_t tmpl[FP_IPV6_HLEN + FP_TCP_MIN_HLEN + FP_TCP_MAX_OPTLEN];
    int hdr = fp_segment6_build(tmpl, sizeof tmpl, ip, tcp, NULL, 0);
    if (hdr < 0)
        return hdr;
    size_t doff = (size_t)hdr - FP_IPV6_HLEN;
    if (payload_len > 0xffff - doff)         /* the IPv6 payload length field */
        return -FP_E_TOOBIG;
    size_t dlen = (size_t)hdr + payload_len;
    if (stride < dlen)
        return -FP_E_NOSPACE;
    size_t span;
    if (fp_size_span(count, stride, dlen, &span) < 0)
        return -FP_E_TOOBIG;
    wr16(tmpl + 4, (uint16_t)(doff + payload_len));

    for (size_t i = 0; i < count; i++) {
        uint8_t *p = out + i * stride;
        uint8_t *t = p + FP_IPV6_HLEN;
        memcpy(p, tmpl, (size_t)hdr);
        if (vary->hop_limits)
            p[7] = vary->hop_limits[i];
        if (vary->daddrs)
            memcpy(p + 24, vary->daddrs + 16 * i, 16);
        vary_tcp(t, i, vary->sports, vary->dports, vary->seqs, tcp->seq, doff, payloads,
                 payload_len);
        finish_checksum6(p, doff, doff + payload_len);
        lens[i] = (uint32_t)dlen;
    }
    return (long)count;
}
