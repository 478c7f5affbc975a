/* libFuzzer harness over the C parsers, built with ASan + UBSan.
 *
 * Every input: fp_segment_parse with each verify mode, fp_segment6_parse
 * (IPv6, extension headers walked) with and without the checksum, fp_tcp_opts_decode,
 * the flow block fed whatever parses, and a round trip: a segment that parses
 * is rebuilt from its fields and must parse back to the same fields. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "fastpunch/fp_errors.h"
#include "fastpunch/fp_seq.h"
#include "fastpunch/fp_tcp.h"

#define CHECK(c) do { if (!(c)) __builtin_trap(); } while (0)

static void round_trip(const struct fp_segment *s)
{
    struct fp_tcp_opts o = s->tcp.opts;
    if ((o.present & FP_OPT_WSCALE) && o.wscale > 14)
        return; /* parse keeps what the peer sent; build refuses it by design */
    struct fp_tcp tcp = s->tcp;
    struct fp_ipv4 ip = s->ip;
    uint8_t buf[65536 + 128];
    int n = fp_segment_build(buf, sizeof buf, &ip, &tcp, s->payload, s->payload_len);
    if (n == -FP_E_OPT_SPACE || n == -FP_E_TOOBIG)
        return; /* unknown options dropped + our layout may need more room */
    CHECK(n > 0);
    struct fp_segment r;
    CHECK(fp_segment_parse(buf, (size_t)n, FP_VERIFY_IP | FP_VERIFY_TCP, &r) == 0);
    CHECK(r.ip.saddr == s->ip.saddr && r.ip.daddr == s->ip.daddr);
    CHECK(r.ip.ttl == s->ip.ttl && r.ip.id == s->ip.id && r.ip.tos == s->ip.tos);
    CHECK(r.ip.options_len == s->ip.options_len);
    CHECK(r.tcp.sport == s->tcp.sport && r.tcp.dport == s->tcp.dport);
    CHECK(r.tcp.seq == s->tcp.seq && r.tcp.ack == s->tcp.ack);
    CHECK(r.tcp.flags == s->tcp.flags && r.tcp.window == s->tcp.window);
    CHECK(r.tcp.opts.present == s->tcp.opts.present);
    CHECK(r.payload_len == s->payload_len);
    CHECK(memcmp(r.payload, s->payload, s->payload_len) == 0);
}

static void round_trip6(const struct fp_segment6 *s)
{
    struct fp_tcp_opts o = s->tcp.opts;
    if ((o.present & FP_OPT_WSCALE) && o.wscale > 14)
        return;
    struct fp_tcp tcp = s->tcp;
    struct fp_ipv6 ip = s->ip;
    uint8_t buf[65536 + 128];
    int n = fp_segment6_build(buf, sizeof buf, &ip, &tcp, s->payload, s->payload_len);
    if (n == -FP_E_OPT_SPACE || n == -FP_E_TOOBIG)
        return;
    CHECK(n > 0);
    struct fp_segment6 r;
    CHECK(fp_segment6_parse(buf, (size_t)n, FP_VERIFY_TCP, &r) == 0);
    CHECK(memcmp(r.ip.saddr, s->ip.saddr, 16) == 0 && memcmp(r.ip.daddr, s->ip.daddr, 16) == 0);
    CHECK(r.ip.hop_limit == s->ip.hop_limit && r.ip.tclass == s->ip.tclass);
    CHECK(r.ip.flow == s->ip.flow && r.ip.ext_len == 0);   /* (extension headers not rebuilt) */
    CHECK(r.tcp.sport == s->tcp.sport && r.tcp.dport == s->tcp.dport);
    CHECK(r.tcp.seq == s->tcp.seq && r.tcp.ack == s->tcp.ack);
    CHECK(r.tcp.flags == s->tcp.flags && r.tcp.window == s->tcp.window);
    CHECK(r.tcp.opts.present == s->tcp.opts.present);
    CHECK(r.payload_len == s->payload_len);
    CHECK(memcmp(r.payload, s->payload, s->payload_len) == 0);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct fp_segment6 s6;
    for (int verify = 0; verify < 4; verify += 2) {   /* (v6 has no IP checksum) */
        int rc = fp_segment6_parse(data, size, verify, &s6);
        CHECK(rc == 0 || (rc <= -FP_E_BASE && rc > -FP_E_LAST));
        if (rc == 0) {
            CHECK(s6.ip.ext_len <= s6.ip.payload_len);
            CHECK((size_t)FP_IPV6_HLEN + s6.ip.payload_len <= size);
            CHECK(s6.payload >= data && s6.payload + s6.payload_len <= data + size);
            if (verify)
                round_trip6(&s6);
            struct fp_flow f;
            struct fp_reply r;
            int action;
            fp_flow_init(&f, 0x1234, 65535, 7);
            fp_flow_syn_sent(&f, &r);
            fp_flow_input(&f, &s6.tcp, s6.payload_len, &action, &r);
        }
    }
    struct fp_segment s;
    for (int verify = 0; verify < 4; verify++) {
        int rc = fp_segment_parse(data, size, verify, &s);
        CHECK(rc == 0 || (rc <= -FP_E_BASE && rc > -FP_E_LAST));
        if (rc == 0) {
            CHECK(s.payload >= data && s.payload + s.payload_len <= data + size);
            if (verify == 3)
                round_trip(&s);
            struct fp_flow f;
            struct fp_reply r;
            int action;
            fp_flow_init(&f, 0x1234, 65535, 7);
            fp_flow_syn_sent(&f, &r);
            fp_flow_input(&f, &s.tcp, s.payload_len, &action, &r);
            fp_flow_input(&f, &s.tcp, s.payload_len, &action, &r);
            fp_flow_init(&f, s.tcp.ack - 1, 0, -1);
            fp_flow_assume_syn(&f, s.tcp.seq, s.tcp.window, -1, &r);
            fp_flow_input(&f, &s.tcp, s.payload_len, &action, &r);
        }
    }
    struct fp_tcp_opts o;
    int rc = fp_tcp_opts_decode(data, size > 40 ? 40 : size, &o);
    CHECK(rc == 0 || (rc <= -FP_E_BASE && rc > -FP_E_LAST));
    if (rc == 0) {
        uint8_t out[40];
        (void)fp_tcp_opts_encode(&o, out, sizeof out);
    }
    return 0;
}
