/* fp_seq.h - sequence-number arithmetic modulo 2^32 and the per-flow tracking
 * block that drives a crafted handshake (RFC 9293 §3.4, §3.10.7). */
#ifndef FASTPUNCH_FP_SEQ_H
#define FASTPUNCH_FP_SEQ_H

#include <stdint.h>

#include "fp_tcp.h"

/* The kernel's helpers (include/net/tcp.h), same names, same meaning. */
static inline int fp_before(uint32_t a, uint32_t b) { return (int32_t)(a - b) < 0; }
static inline int fp_after(uint32_t a, uint32_t b) { return fp_before(b, a); }
/* lo <= x <= hi, modulo 2^32 */
static inline int fp_between(uint32_t x, uint32_t lo, uint32_t hi) { return hi - lo >= x - lo; }

enum fp_flow_state {
    FP_CLOSED = 0,
    FP_SYN_SENT,
    FP_SYN_RECEIVED,
    FP_ESTABLISHED,
    FP_RESET,       /* the peer reset the flow: terminal */
};

/* What fp_flow_input asks the caller to do. */
enum fp_flow_action {
    FP_ACT_NONE = 0,   /* nothing to send                                 */
    FP_ACT_SEND,       /* send the segment described in the reply         */
};

/* What fp_flow_input observed. */
enum fp_flow_event {
    FP_EV_NONE = 0,        /* accepted, no state change                   */
    FP_EV_ESTABLISHED,     /* this segment completed the handshake        */
    FP_EV_RESET,           /* an acceptable RST: flow is dead             */
    FP_EV_UNACCEPTABLE,    /* failed the acceptability test (dropped)     */
    FP_EV_BAD_ACK,         /* ACK outside what we sent (dropped)          */
    FP_EV_IGNORED,         /* nothing usable for this state (dropped)     */
    FP_EV_SYN_RETRANSMIT,  /* the peer repeated its SYN                   */
};

/* Numbers for one segment we should send. */
struct fp_reply {
    uint16_t flags;
    uint32_t seq, ack;
    uint16_t window;      /* the 16-bit field to put on the wire */
};

/* The tracking block. Field names are RFC 9293's. */
struct fp_flow {
    uint8_t state;            /* enum fp_flow_state */
    uint8_t snd_wscale;       /* shift the peer applies to its windows (its WS) */
    uint8_t rcv_wscale;       /* shift we announce for our windows (our WS)    */
    uint8_t wscale_ok;        /* both SYNs carried WS: windows are scaled       */
    uint8_t want_wscale;      /* we announce WS in our SYN / SYN-ACK            */
    uint32_t iss, irs;
    uint32_t snd_una, snd_nxt, snd_wnd, snd_wl1, snd_wl2;
    uint32_t rcv_nxt, rcv_wnd;
};

/* Start a flow with our ISS and receive window (bytes). rcv_wscale < 0
 * means "do not announce window scaling". */
int fp_flow_init(struct fp_flow *f, uint32_t iss, uint32_t rcv_wnd, int rcv_wscale);

/* We sent our SYN: CLOSED -> SYN_SENT, snd_nxt = iss + 1. */
int fp_flow_syn_sent(struct fp_flow *f, struct fp_reply *syn);

/* The peer's SYN is known out of band (the "nat" strategy's unsolicited
 * SYN-ACK): CLOSED -> SYN_RECEIVED with irs, and the SYN-ACK to send.
 * peer_wscale < 0: the peer did not announce window scaling. */
int fp_flow_assume_syn(struct fp_flow *f, uint32_t irs, uint16_t peer_window,
                       int peer_wscale, struct fp_reply *synack);

/* RFC 9293 §3.10.7.4 acceptability test of a segment of seg_len octets
 * (SYN and FIN count) starting at seq, against rcv_nxt/rcv_wnd. */
int fp_seq_acceptable(uint32_t rcv_nxt, uint32_t rcv_wnd, uint32_t seq, uint32_t seg_len);

/* Process one received segment (already parsed; payload_len bytes of data).
 * Returns an enum fp_flow_event; action and reply say what to send back. */
int fp_flow_input(struct fp_flow *f, const struct fp_tcp *seg, uint32_t payload_len,
                  int *action, struct fp_reply *reply);

/* The RST answering an unwanted segment (RFC 9293 §3.10.7.1). */
void fp_rst_for(const struct fp_tcp *seg, uint32_t payload_len, struct fp_reply *rst);

/* We send len bytes of data (plus FIN when fin): the segment's numbers
 * (PSH|ACK, or FIN|ACK) and snd_nxt advanced past it. Only in ESTABLISHED. */
int fp_flow_send(struct fp_flow *f, uint32_t len, int fin, struct fp_reply *seg);

/* A plain ACK for the flow's current numbers. */
void fp_flow_ack(const struct fp_flow *f, struct fp_reply *ack);

#endif
