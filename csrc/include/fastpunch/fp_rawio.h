/* fp_rawio.h - raw IPv4 sockets: IP_HDRINCL send with sendmmsg, receive with
 * recvmmsg behind a classic BPF filter scoped to one flow. Linux only. */
#ifndef FASTPUNCH_FP_RAWIO_H
#define FASTPUNCH_FP_RAWIO_H

#include <stddef.h>
#include <stdint.h>

/* Open a non-blocking IPPROTO_RAW socket (IP_HDRINCL implied). Returns the
 * descriptor or -errno (-EPERM without CAP_NET_RAW). sndbuf > 0 sets SO_SNDBUF;
 * mark != 0 sets SO_MARK so netfilter rules can tell the engine's own segments
 * from the kernel's; it needs CAP_NET_ADMIN, and without it the result is
 * FP_RAW_MARK_DENIED (distinct from the -EPERM of a missing CAP_NET_RAW). */
#define FP_RAW_MARK_DENIED (-1000)
int fp_raw_open_send(int sndbuf, uint32_t mark);

/* Open a non-blocking raw IPPROTO_TCP socket that sees only segments matching
 * the given IPv4 4-tuple (host order; 0 is a wildcard), first fragments only.
 * The filter is attached before anything queued earlier is drained, so the
 * socket never yields a foreign packet. Returns the descriptor or -errno. */
int fp_raw_open_recv(uint32_t saddr, uint32_t daddr, uint16_t sport, uint16_t dport,
                     int rcvbuf);

/* One clause of a receive filter: an IPv4 4-tuple, host order, 0 = any. */
struct fp_match {
    uint32_t saddr, daddr;
    uint16_t sport, dport;
};
#define FP_MAX_MATCHES 16   /* clauses in one filter (BPF jumps are 8-bit) */
#define FP_BPF_MAX (8 + 9 * FP_MAX_MATCHES)   /* instructions a filter needs at most */

/* Open a receive socket as above that sees the segments matching ANY of
 * count clauses (1..FP_MAX_MATCHES): one socket for every crafted flow of a
 * punch (its own port toward every peer candidate, spray's source ports
 * toward one peer port). Returns the descriptor or -errno (-EINVAL for a
 * bad count). */
int fp_raw_open_recv_any(const struct fp_match *m, int count, int rcvbuf);

/* Write the classic BPF program for count clauses into prog (cap entries;
 * FP_BPF_MAX always suffices). Returns the instruction count or -EINVAL.
 * Exposed so the filter can be tested on its own. */
struct sock_filter;
int fp_bpf_match_filter(struct sock_filter *prog, int cap, const struct fp_match *m, int count);
int fp_bpf_flow_filter(struct sock_filter *prog, int cap, uint32_t saddr, uint32_t daddr,
                       uint16_t sport, uint16_t dport);

/* Send count datagrams laid out stride bytes apart with lengths lens[]: each
 * is addressed to the destination in its own IP header (IPv4 or IPv6, as
 * the header's version says). Uses sendmmsg in
 * chunks. Returns the number sent (possibly short when the socket buffer
 * fills: EAGAIN after at least one) or -errno when none was sent. */
long fp_raw_send_batch(int fd, const uint8_t *buf, size_t stride, const uint32_t *lens,
                       size_t count);

/* The same, one sendto(2) per datagram (the baseline sendmmsg is measured
 * against). */
long fp_raw_send_each(int fd, const uint8_t *buf, size_t stride, const uint32_t *lens,
                      size_t count);

/* Receive up to count datagrams with recvmmsg into buf (stride bytes each);
 * lens[i] gets each length (truncated datagrams are cut at stride). Returns
 * the count received (0 when none is waiting) or -errno. */
long fp_raw_recv_batch(int fd, uint8_t *buf, size_t stride, uint32_t *lens, size_t count);

/* ---- IPv6 ------------------------------------------------------------
 *
 * Send: an AF_INET6 IPPROTO_RAW socket; Linux sets IPV6_HDRINCL on it by
 * itself (inet6_create), so the datagram goes out with our own header, as
 * IP_HDRINCL does for IPv4. The destination is taken from each header.
 *
 * Receive: an AF_INET6 raw socket never hands its reader the IPv6 header
 * (RFC 3542 §3), so a filter there cannot see addresses, and a parse could
 * not check the pseudo-header checksum. The engine reads IPv6 from an
 * AF_PACKET SOCK_DGRAM socket for ETH_P_IPV6 instead: whole datagrams from
 * the network header on, behind a classic BPF filter on the 4-tuple that
 * is attached before the socket is bound to ETH_P_IPV6, so no packet ever
 * passes without it (outgoing copies reach only ETH_P_ALL sockets; the
 * filter refuses PACKET_OUTGOING all the same). Segments with extension
 * headers before TCP do not pass the filter (its offsets are the fixed
 * header's). Both need CAP_NET_RAW. */

int fp_raw6_open_send(int sndbuf, uint32_t mark);

/* One clause of an IPv6 receive filter: addresses as on the wire (all
 * zero = any), ports host order (0 = any). */
struct fp_match6 {
    uint8_t saddr[16], daddr[16];
    uint16_t sport, dport;
};
#define FP_BPF6_MAX (6 + 21 * FP_MAX_MATCHES)

int fp_bpf6_match_filter(struct sock_filter *prog, int cap, const struct fp_match6 *m,
                         int count);

/* The AF_PACKET receive socket above, seeing what matches any of count
 * clauses (1..FP_MAX_MATCHES). Returns the descriptor or -errno. Read it
 * with fp_raw_recv_batch. */
int fp_raw6_open_recv_any(const struct fp_match6 *m, int count, int rcvbuf);

/* Send on it with fp_raw_send_batch / fp_raw_send_each: they address each
 * datagram by the version and destination in its own header. */

#endif
