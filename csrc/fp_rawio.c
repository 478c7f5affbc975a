/* fp_rawio.c - raw IPv4 and IPv6 socket I/O with batching and per-flow BPF filters. */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <arpa/inet.h>
#include <errno.h>
#include <linux/filter.h>
#include <linux/if_ether.h>
#include <linux/if_packet.h>
#include <netinet/in.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#include "fastpunch/fp_rawio.h"
#include "fp_wire.h"

/* at most this many packets queued before the filter are drained (the
 * queue is bounded by the receive buffer anyway) */
#define FP_DRAIN_MAX 65536

#define BATCH_CHUNK 256 /* mmsghdr entries per sendmmsg/recvmmsg call */

/* An IPPROTO_RAW send socket of ``family`` (IPv4: IP_HDRINCL implied;
 * IPv6: the caller's datagram carries its own IPv6 header, docs/engine.md),
 * with SO_SNDBUF and SO_MARK as asked. */
static int open_send(int family, int sndbuf, uint32_t mark)
{
    int fd = socket(family, SOCK_RAW | SOCK_NONBLOCK | SOCK_CLOEXEC, IPPROTO_RAW);
    if (fd < 0)
        return -errno;
    if (sndbuf > 0 && setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &sndbuf, sizeof sndbuf) < 0) {
        int e = errno;
        close(fd);
        return -e;
    }
    if (mark && setsockopt(fd, SOL_SOCKET, SO_MARK, &mark, sizeof mark) < 0) {
        int e = errno;
        close(fd);
        return e == EPERM ? FP_RAW_MARK_DENIED : -e;
    }
    return fd;
}

int fp_raw_open_send(int sndbuf, uint32_t mark)
{
    return open_send(AF_INET, sndbuf, mark);
}

int fp_bpf_match_filter(struct sock_filter *prog, int cap, const struct fp_match *m, int count)
{
    /* The packet seen by an AF_INET raw socket starts at the IP header.
     *
     *     ld  proto;  jne TCP      -> reject
     *     ldh frag;   jset 0x1fff  -> reject      first fragments only
     *     ldx 4 * IHL
     *     clause k:  each given field: ld; jne value -> clause k + 1
     *                ret accept
     *     reject:    ret 0
     *
     * Jumps are forward only and 8 bits wide; FP_MAX_MATCHES clauses of at
     * most 9 instructions keep every offset far below 255. Offsets to the
     * next clause and to "reject" are filled in once the layout is known. */
    if (count < 1 || count > FP_MAX_MATCHES || !m)
        return -EINVAL;
    struct sock_filter p[FP_BPF_MAX];
    int n = 0;
    int to_reject[2], nrej = 0;       /* the two header tests */
    int to_next[8 * FP_MAX_MATCHES], nnext = 0;
    int clause_start[FP_MAX_MATCHES + 1];
#define EMIT(c, k) (p[n++] = (struct sock_filter)BPF_STMT((c), (k)))
#define JUMP(c, k) (p[n++] = (struct sock_filter)BPF_JUMP((c), (k), 0, 0))
    EMIT(BPF_LD | BPF_B | BPF_ABS, 9); /* protocol */
    to_reject[nrej++] = n;
    JUMP(BPF_JMP | BPF_JEQ | BPF_K, IPPROTO_TCP); /* jf -> reject */
    EMIT(BPF_LD | BPF_H | BPF_ABS, 6);
    to_reject[nrej++] = -n;
    JUMP(BPF_JMP | BPF_JSET | BPF_K, 0x1fff); /* jt -> reject */
    EMIT(BPF_LDX | BPF_B | BPF_MSH, 0); /* X = IHL * 4 */
    int next_of[8 * FP_MAX_MATCHES];    /* clause whose start each to_next jumps to */
    for (int c = 0; c < count; c++) {
        clause_start[c] = n;
        const struct fp_match *k = &m[c];
        if (k->saddr) {
            EMIT(BPF_LD | BPF_W | BPF_ABS, 12);
            next_of[nnext] = c + 1, to_next[nnext++] = n;
            JUMP(BPF_JMP | BPF_JEQ | BPF_K, k->saddr);
        }
        if (k->daddr) {
            EMIT(BPF_LD | BPF_W | BPF_ABS, 16);
            next_of[nnext] = c + 1, to_next[nnext++] = n;
            JUMP(BPF_JMP | BPF_JEQ | BPF_K, k->daddr);
        }
        if (k->sport) {
            EMIT(BPF_LD | BPF_H | BPF_IND, 0);
            next_of[nnext] = c + 1, to_next[nnext++] = n;
            JUMP(BPF_JMP | BPF_JEQ | BPF_K, k->sport);
        }
        if (k->dport) {
            EMIT(BPF_LD | BPF_H | BPF_IND, 2);
            next_of[nnext] = c + 1, to_next[nnext++] = n;
            JUMP(BPF_JMP | BPF_JEQ | BPF_K, k->dport);
        }
        EMIT(BPF_RET | BPF_K, 0x40000); /* accept the whole packet */
    }
    int reject_at = n;
    clause_start[count] = reject_at;    /* "the clause after the last" rejects */
    EMIT(BPF_RET | BPF_K, 0);
#undef EMIT
#undef JUMP
    for (int i = 0; i < nrej; i++) {
        if (to_reject[i] >= 0) { /* JEQ: fall through on match, reject on mismatch */
            p[to_reject[i]].jf = (uint8_t)(reject_at - to_reject[i] - 1);
        } else { /* JSET: reject when a fragment offset bit is set */
            p[-to_reject[i]].jt = (uint8_t)(reject_at + to_reject[i] - 1);
        }
    }
    for (int i = 0; i < nnext; i++)
        p[to_next[i]].jf = (uint8_t)(clause_start[next_of[i]] - to_next[i] - 1);
    if (n > cap)
        return -EINVAL;
    memcpy(prog, p, sizeof(struct sock_filter) * (size_t)n);
    return n;
}

int fp_bpf_flow_filter(struct sock_filter *prog, int cap, uint32_t saddr, uint32_t daddr,
                       uint16_t sport, uint16_t dport)
{
    struct fp_match one = {saddr, daddr, sport, dport};
    return fp_bpf_match_filter(prog, cap, &one, 1);
}

/* Attach fprog to a fresh receive socket fd without letting through what
 * queued before it: packets that arrive between socket() and the filter
 * bypass it. A drop-everything filter goes first, the queue it closed is
 * drained, then the real filter replaces it: the drain ends (nothing new can
 * queue meanwhile, however much traffic there is) and drops no packet the
 * real filter would have let in after it was attached. Returns fd, or
 * -errno with fd closed. */
static int attach_drained(int fd, const struct sock_fprog *fprog, int rcvbuf)
{
    struct sock_filter none[] = {BPF_STMT(BPF_RET | BPF_K, 0)};
    struct sock_fprog drop_all = {.len = 1, .filter = none};
    int e = 0;
    if (rcvbuf > 0 && setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &rcvbuf, sizeof rcvbuf) < 0)
        e = errno;
    if (!e && setsockopt(fd, SOL_SOCKET, SO_ATTACH_FILTER, &drop_all, sizeof drop_all) < 0)
        e = errno;
    if (!e) {
        uint8_t scratch[64];
        for (int i = 0; i < FP_DRAIN_MAX; i++)
            if (recv(fd, scratch, sizeof scratch, MSG_DONTWAIT | MSG_TRUNC) < 0)
                break;
    }
    if (!e && setsockopt(fd, SOL_SOCKET, SO_ATTACH_FILTER, fprog, sizeof *fprog) < 0)
        e = errno;
    if (e) {
        close(fd);
        return -e;
    }
    return fd;
}

int fp_raw_open_recv_any(const struct fp_match *m, int count, int rcvbuf)
{
    struct sock_filter prog[FP_BPF_MAX];
    int n = fp_bpf_match_filter(prog, FP_BPF_MAX, m, count);
    if (n < 0)
        return n;
    struct sock_fprog fprog = {.len = (unsigned short)n, .filter = prog};

    int fd = socket(AF_INET, SOCK_RAW | SOCK_NONBLOCK | SOCK_CLOEXEC, IPPROTO_TCP);
    if (fd < 0)
        return -errno;
    return attach_drained(fd, &fprog, rcvbuf);
}

int fp_raw_open_recv(uint32_t saddr, uint32_t daddr, uint16_t sport, uint16_t dport, int rcvbuf)
{
    struct fp_match one = {saddr, daddr, sport, dport};
    return fp_raw_open_recv_any(&one, 1, rcvbuf);
}

union fp_sockaddr {
    struct sockaddr_in v4;
    struct sockaddr_in6 v6;
};

/* Where a datagram goes: the destination in its own header, of its own
 * version (an IPv4 socket is given IPv4 datagrams, an IPv6 one IPv6). */
static socklen_t dest_of(const uint8_t *pkt, uint32_t len, union fp_sockaddr *sa)
{
    memset(sa, 0, sizeof *sa);
    if (len >= 40 && pkt[0] >> 4 == 6) {
        sa->v6.sin6_family = AF_INET6;
        memcpy(&sa->v6.sin6_addr, pkt + 24, 16);
        return sizeof sa->v6;
    }
    sa->v4.sin_family = AF_INET;
    if (len >= 20)
        memcpy(&sa->v4.sin_addr.s_addr, pkt + 16, 4); /* already network order */
    return sizeof sa->v4;
}

long fp_raw_send_batch(int fd, const uint8_t *buf, size_t stride, const uint32_t *lens,
                       size_t count)
{
    struct mmsghdr msgs[BATCH_CHUNK];
    struct iovec iovs[BATCH_CHUNK];
    union fp_sockaddr addrs[BATCH_CHUNK];
    size_t done = 0;

    while (done < count) {
        size_t n = count - done < BATCH_CHUNK ? count - done : BATCH_CHUNK;
        for (size_t i = 0; i < n; i++) {
            const uint8_t *pkt = buf + (done + i) * stride;
            uint32_t len = lens[done + i];
            socklen_t alen = dest_of(pkt, len, &addrs[i]);
            iovs[i].iov_base = (void *)pkt;
            iovs[i].iov_len = len;
            memset(&msgs[i].msg_hdr, 0, sizeof msgs[i].msg_hdr);
            msgs[i].msg_hdr.msg_name = &addrs[i];
            msgs[i].msg_hdr.msg_namelen = alen;
            msgs[i].msg_hdr.msg_iov = &iovs[i];
            msgs[i].msg_hdr.msg_iovlen = 1;
        }
        int r = sendmmsg(fd, msgs, (unsigned)n, 0);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            return done ? (long)done : -errno;
        }
        done += (size_t)r;
        if ((size_t)r < n)
            break; /* the socket buffer filled: report a short count */
    }
    return (long)done;
}

long fp_raw_send_each(int fd, const uint8_t *buf, size_t stride, const uint32_t *lens,
                      size_t count)
{
    size_t done = 0;
    while (done < count) {
        const uint8_t *pkt = buf + done * stride;
        union fp_sockaddr sa;
        socklen_t alen = dest_of(pkt, lens[done], &sa);
        ssize_t r = sendto(fd, pkt, lens[done], 0, (struct sockaddr *)&sa, alen);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            return done ? (long)done : -errno;
        }
        done++;
    }
    return (long)done;
}

long fp_raw_recv_batch(int fd, uint8_t *buf, size_t stride, uint32_t *lens, size_t count)
{
    struct mmsghdr msgs[BATCH_CHUNK];
    struct iovec iovs[BATCH_CHUNK];
    size_t n = count < BATCH_CHUNK ? count : BATCH_CHUNK;

    for (size_t i = 0; i < n; i++) {
        iovs[i].iov_base = buf + i * stride;
        iovs[i].iov_len = stride;
        memset(&msgs[i].msg_hdr, 0, sizeof msgs[i].msg_hdr);
        msgs[i].msg_hdr.msg_iov = &iovs[i];
        msgs[i].msg_hdr.msg_iovlen = 1;
    }
    for (;;) {
        int r = recvmmsg(fd, msgs, (unsigned)n, MSG_DONTWAIT, NULL);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK)
                return 0;
            return -errno;
        }
        for (int i = 0; i < r; i++)
            lens[i] = msgs[i].msg_len > stride ? (uint32_t)stride : msgs[i].msg_len;
        return r;
    }
}

/* ---------------------------------------------------------------- IPv6 */

int fp_raw6_open_send(int sndbuf, uint32_t mark)
{
    return open_send(AF_INET6, sndbuf, mark);
}

static int all_zero(const uint8_t *a, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (a[i])
            return 0;
    return 1;
}

int fp_bpf6_match_filter(struct sock_filter *prog, int cap, const struct fp_match6 *m,
                         int count)
{
    /* The packet an AF_PACKET SOCK_DGRAM socket sees starts at the IPv6
     * header:
     *
     *     ld  pkttype;  jeq OUTGOING -> reject (the stub at 4)
     *     ldb [6];      jeq TCP -> clauses, else -> the stub
     *     stub: ret 0
     *     clause k:  each given word / port: ld; jne value -> clause k + 1
     *                ret accept
     *     reject:    ret 0
     *
     * The stub right after the header tests keeps their jumps short
     * however many clauses follow (jumps are forward and 8 bits wide); a
     * clause is at most 21 instructions. */
    if (count < 1 || count > FP_MAX_MATCHES || !m)
        return -EINVAL;
    struct sock_filter p[FP_BPF6_MAX];
    int n = 0;
    int to_next[10 * FP_MAX_MATCHES], next_of[10 * FP_MAX_MATCHES], nnext = 0;
    int clause_start[FP_MAX_MATCHES + 1];
#define EMIT(c, k) (p[n++] = (struct sock_filter)BPF_STMT((c), (k)))
#define JUMP(c, k, t, f) (p[n++] = (struct sock_filter)BPF_JUMP((c), (k), (t), (f)))
    EMIT(BPF_LD | BPF_W | BPF_ABS, (uint32_t)(SKF_AD_OFF + SKF_AD_PKTTYPE));
    JUMP(BPF_JMP | BPF_JEQ | BPF_K, PACKET_OUTGOING, 2, 0);      /* -> the stub */
    EMIT(BPF_LD | BPF_B | BPF_ABS, 6);                           /* next header */
    JUMP(BPF_JMP | BPF_JEQ | BPF_K, IPPROTO_TCP, 1, 0);          /* -> clause 0 */
    EMIT(BPF_RET | BPF_K, 0);                                    /* the stub */
    for (int c = 0; c < count; c++) {
        clause_start[c] = n;
        const struct fp_match6 *k = &m[c];
        for (int half = 0; half < 2; half++) {
            const uint8_t *a = half ? k->daddr : k->saddr;
            if (all_zero(a, 16))
                continue;
            for (int w = 0; w < 4; w++) {
                EMIT(BPF_LD | BPF_W | BPF_ABS, (uint32_t)((half ? 24 : 8) + 4 * w));
                next_of[nnext] = c + 1, to_next[nnext++] = n;
                JUMP(BPF_JMP | BPF_JEQ | BPF_K, rd32(a + 4 * w), 0, 0);
            }
        }
        if (k->sport) {
            EMIT(BPF_LD | BPF_H | BPF_ABS, 40);
            next_of[nnext] = c + 1, to_next[nnext++] = n;
            JUMP(BPF_JMP | BPF_JEQ | BPF_K, k->sport, 0, 0);
        }
        if (k->dport) {
            EMIT(BPF_LD | BPF_H | BPF_ABS, 42);
            next_of[nnext] = c + 1, to_next[nnext++] = n;
            JUMP(BPF_JMP | BPF_JEQ | BPF_K, k->dport, 0, 0);
        }
        EMIT(BPF_RET | BPF_K, 0x40000);                          /* accept the datagram */
    }
    clause_start[count] = n;                                     /* the final reject */
    EMIT(BPF_RET | BPF_K, 0);
#undef EMIT
#undef JUMP
    for (int i = 0; i < nnext; i++)
        p[to_next[i]].jf = (uint8_t)(clause_start[next_of[i]] - to_next[i] - 1);
    if (n > cap)
        return -EINVAL;
    memcpy(prog, p, sizeof(struct sock_filter) * (size_t)n);
    return n;
}

int fp_raw6_open_recv_any(const struct fp_match6 *m, int count, int rcvbuf)
{
    struct sock_filter prog[FP_BPF6_MAX];
    int n = fp_bpf6_match_filter(prog, FP_BPF6_MAX, m, count);
    if (n < 0)
        return n;
    struct sock_fprog fprog = {.len = (unsigned short)n, .filter = prog};
    /* Protocol 0: a packet socket receives nothing until it is bound to a
     * protocol, so the filter goes on first and no packet ever passes
     * without it (no drain needed, unlike the IPv4 raw socket). */
    int fd = socket(AF_PACKET, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -errno;
    int e = 0;
    if (rcvbuf > 0 && setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &rcvbuf, sizeof rcvbuf) < 0)
        e = errno;
    if (!e && setsockopt(fd, SOL_SOCKET, SO_ATTACH_FILTER, &fprog, sizeof fprog) < 0)
        e = errno;
    struct sockaddr_ll sll;
    memset(&sll, 0, sizeof sll);
    sll.sll_family = AF_PACKET;
    sll.sll_protocol = htons(ETH_P_IPV6);           /* every interface (ifindex 0) */
    if (!e && bind(fd, (struct sockaddr *)&sll, sizeof sll) < 0)
        e = errno;
    if (e) {
        close(fd);
        return -e;
    }
    return fd;
}
