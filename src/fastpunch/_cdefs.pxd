# cython: language_level=3
# The C declarations of csrc/, declared once. _engine.pyx is the only user.
from libc.stdint cimport int32_t, uint8_t, uint16_t, uint32_t, uint64_t

cdef extern from "fastpunch/fp_errors.h" nogil:
    int FP_E_BASE
    int FP_E_IP_OPTIONS
    const char *fp_reason_name(int code)
    const char *fp_reason_text(int code)

cdef extern from "fastpunch/fp_checksum.h" nogil:
    ctypedef uint16_t fp_sum16
    uint64_t fp_csum_add(uint64_t sum, const void *buf, size_t len)
    fp_sum16 fp_csum_fold(uint64_t sum)
    fp_sum16 fp_csum(const void *buf, size_t len)
    uint64_t fp_csum_pseudo(uint32_t saddr, uint32_t daddr, uint8_t proto, uint16_t len)
    uint64_t fp_csum_pseudo6(const uint8_t *saddr, const uint8_t *daddr, uint8_t proto,
                             uint32_t len)
    fp_sum16 fp_csum_replace2(fp_sum16 check, uint16_t old_wire, uint16_t new_wire)
    fp_sum16 fp_csum_replace4(fp_sum16 check, uint32_t old_wire, uint32_t new_wire)
    void fp_csum_many(const uint8_t *base, size_t stride, size_t len, size_t count,
                      fp_sum16 *out)

cdef extern from "fastpunch/fp_ip.h" nogil:
    uint16_t FP_IP_DF, FP_IP_MF, FP_IP_RF, FP_IP_OFFMASK
    struct fp_ipv4:
        uint8_t hlen
        uint8_t tos
        uint16_t total_len
        uint16_t id
        uint16_t frag
        uint8_t ttl
        uint8_t proto
        uint16_t check
        uint32_t saddr
        uint32_t daddr
        const uint8_t *options
        uint8_t options_len

cdef extern from "fastpunch/fp_ip6.h" nogil:
    int FP_IPV6_HLEN
    struct fp_ipv6:
        uint8_t tclass
        uint32_t flow
        uint16_t payload_len
        uint8_t next
        uint8_t hop_limit
        uint8_t proto
        uint16_t ext_len
        uint8_t saddr[16]
        uint8_t daddr[16]

cdef extern from "fastpunch/fp_tcp.h" nogil:
    uint8_t FP_OPT_MSS, FP_OPT_WSCALE, FP_OPT_SACK_PERM, FP_OPT_TIMESTAMP, FP_OPT_SACK
    int FP_MAX_SACK_BLOCKS
    int FP_VERIFY_IP, FP_VERIFY_TCP
    struct fp_sack_block:
        uint32_t left
        uint32_t right
    struct fp_tcp_opts:
        uint8_t present
        uint8_t wscale
        uint16_t mss
        uint32_t ts_val
        uint32_t ts_ecr
        uint8_t sack_count
        uint8_t unknown
        fp_sack_block sack[4]
    struct fp_tcp:
        uint16_t sport
        uint16_t dport
        uint32_t seq
        uint32_t ack
        uint8_t doff
        uint16_t flags
        uint16_t window
        uint16_t check
        uint16_t urg
        fp_tcp_opts opts
    struct fp_segment:
        fp_ipv4 ip
        fp_tcp tcp
        const uint8_t *payload
        uint32_t payload_len
    struct fp_batch_vary:
        const uint32_t *saddrs
        const uint32_t *daddrs
        const uint16_t *sports
        const uint16_t *dports
        const uint32_t *seqs
        const uint8_t *ttls

    int fp_tcp_opts_encode(const fp_tcp_opts *o, uint8_t *out, size_t cap)
    int fp_tcp_opts_decode(const uint8_t *p, size_t len, fp_tcp_opts *o)
    int fp_segment_parse(const uint8_t *buf, size_t len, int verify, fp_segment *out)
    long fp_segment_parse_batch(const uint8_t *buf, size_t stride, const uint32_t *lens,
                                size_t count, int verify, fp_segment *out, int32_t *status)
    int fp_segment_build(uint8_t *buf, size_t cap, const fp_ipv4 *ip, const fp_tcp *tcp,
                         const uint8_t *payload, size_t payload_len)
    long fp_segment_build_batch(uint8_t *out, size_t stride, size_t count,
                                const fp_ipv4 *ip, const fp_tcp *tcp,
                                const uint8_t *payloads, size_t payload_len,
                                const fp_batch_vary *vary, uint32_t *lens)

    struct fp_segment6:
        fp_ipv6 ip
        fp_tcp tcp
        const uint8_t *payload
        uint32_t payload_len
    struct fp_batch_vary6:
        const uint8_t *daddrs
        const uint16_t *sports
        const uint16_t *dports
        const uint32_t *seqs
        const uint8_t *hop_limits
    int fp_segment6_parse(const uint8_t *buf, size_t len, int verify, fp_segment6 *out)
    long fp_segment6_parse_batch(const uint8_t *buf, size_t stride, const uint32_t *lens,
                                 size_t count, int verify, fp_segment6 *out, int32_t *status)
    int fp_segment6_build(uint8_t *buf, size_t cap, const fp_ipv6 *ip, const fp_tcp *tcp,
                          const uint8_t *payload, size_t payload_len)
    long fp_segment6_build_batch(uint8_t *out, size_t stride, size_t count,
                                 const fp_ipv6 *ip, const fp_tcp *tcp,
                                 const uint8_t *payloads, size_t payload_len,
                                 const fp_batch_vary6 *vary, uint32_t *lens)

cdef extern from "fastpunch/fp_seq.h" nogil:
    int fp_before(uint32_t a, uint32_t b)
    int fp_after(uint32_t a, uint32_t b)
    int fp_between(uint32_t x, uint32_t lo, uint32_t hi)
    enum:
        FP_CLOSED, FP_SYN_SENT, FP_SYN_RECEIVED, FP_ESTABLISHED, FP_RESET
    enum:
        FP_ACT_NONE, FP_ACT_SEND
    struct fp_reply:
        uint16_t flags
        uint32_t seq
        uint32_t ack
        uint16_t window
    struct fp_flow:
        uint8_t state
        uint8_t snd_wscale
        uint8_t rcv_wscale
        uint8_t wscale_ok
        uint8_t want_wscale
        uint32_t iss, irs
        uint32_t snd_una, snd_nxt, snd_wnd, snd_wl1, snd_wl2
        uint32_t rcv_nxt, rcv_wnd
    int fp_flow_init(fp_flow *f, uint32_t iss, uint32_t rcv_wnd, int rcv_wscale)
    int fp_flow_syn_sent(fp_flow *f, fp_reply *syn)
    int fp_flow_assume_syn(fp_flow *f, uint32_t irs, uint16_t peer_window, int peer_wscale,
                           fp_reply *synack)
    int fp_seq_acceptable(uint32_t rcv_nxt, uint32_t rcv_wnd, uint32_t seq, uint32_t seg_len)
    int fp_flow_input(fp_flow *f, const fp_tcp *seg, uint32_t payload_len, int *action,
                      fp_reply *reply)
    void fp_rst_for(const fp_tcp *seg, uint32_t payload_len, fp_reply *rst)
    void fp_flow_ack(const fp_flow *f, fp_reply *ack)
    int fp_flow_send(fp_flow *f, uint32_t len, int fin, fp_reply *seg)

cdef extern from "fastpunch/fp_size.h" nogil:
    int fp_size_mul(size_t a, size_t b, size_t *out)
    int fp_size_add(size_t a, size_t b, size_t *out)
    int fp_size_span(size_t count, size_t stride, size_t length, size_t *out)

cdef extern from "fastpunch/fp_rawio.h" nogil:
    int FP_RAW_MARK_DENIED
    int fp_raw_open_send(int sndbuf, uint32_t mark)
    int fp_raw_open_recv(uint32_t saddr, uint32_t daddr, uint16_t sport, uint16_t dport,
                         int rcvbuf)
    struct fp_match:
        uint32_t saddr, daddr
        uint16_t sport, dport
    int FP_MAX_MATCHES
    int fp_raw_open_recv_any(const fp_match *m, int count, int rcvbuf)
    long fp_raw_send_batch(int fd, const uint8_t *buf, size_t stride, const uint32_t *lens,
                           size_t count)
    long fp_raw_send_each(int fd, const uint8_t *buf, size_t stride, const uint32_t *lens,
                          size_t count)
    long fp_raw_recv_batch(int fd, uint8_t *buf, size_t stride, uint32_t *lens, size_t count)
    struct fp_match6:
        uint8_t saddr[16]
        uint8_t daddr[16]
        uint16_t sport, dport
    int fp_raw6_open_send(int sndbuf, uint32_t mark)
    int fp_raw6_open_recv_any(const fp_match6 *m, int count, int rcvbuf)
