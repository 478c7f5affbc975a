/* fp_seq.c - the per-flow tracking block: just enough of RFC 9293's segment
 * arrival rules (§3.10.7.3 SYN-SENT, §3.10.7.4 other states) to drive a
 * crafted three-way handshake, simultaneous open included, and to hand a
 * correct set of numbers to the kernel afterwards. */
#include <string.h>

#include "fastpunch/fp_errors.h"
#include "fastpunch/fp_seq.h"

#define FP_MAX_WSCALE 14

int fp_flow_init(struct fp_flow *f, uint32_t iss, uint32_t rcv_wnd, int rcv_wscale)
{
    if (rcv_wscale > FP_MAX_WSCALE)
        return -FP_E_INVAL;
    memset(f, 0, sizeof *f);
    f->state = FP_CLOSED;
    f->iss = iss;
    f->snd_una = iss;
    f->snd_nxt = iss;
    f->rcv_wnd = rcv_wnd;
    f->want_wscale = rcv_wscale >= 0;
    f->rcv_wscale = rcv_wscale >= 0 ? (uint8_t)rcv_wscale : 0;
    return 0;
}

/* The window field for our next segment: unscaled in SYNs (RFC 7323 §2.2). */
static uint16_t window_field(const struct fp_flow *f, int syn)
{
    uint32_t w = f->rcv_wnd;
    if (!syn && f->wscale_ok)
        w >>= f->rcv_wscale;
    return w > 0xffff ? 0xffff : (uint16_t)w;
}

static void make(const struct fp_flow *f, uint16_t flags, uint32_t seq, struct fp_reply *r)
{
    r->flags = flags;
    r->seq = seq;
    r->ack = (flags & FP_TCP_ACK) ? f->rcv_nxt : 0;
    r->window = window_field(f, flags & FP_TCP_SYN);
}

int fp_flow_syn_sent(struct fp_flow *f, struct fp_reply *syn)
{
    if (f->state != FP_CLOSED && f->state != FP_SYN_SENT)
        return -FP_E_INVAL;
    f->state = FP_SYN_SENT;
    f->snd_nxt = f->iss + 1;
    make(f, FP_TCP_SYN, f->iss, syn);
    return 0;
}

/* Record the peer's SYN: irs, rcv_nxt, its window and whether scaling holds. */
static void take_syn(struct fp_flow *f, uint32_t seq, uint16_t window, int peer_wscale)
{
    f->irs = seq;
    f->rcv_nxt = seq + 1;
    if (peer_wscale >= 0 && f->want_wscale) {
        f->wscale_ok = 1;
        f->snd_wscale = (uint8_t)(peer_wscale > FP_MAX_WSCALE ? FP_MAX_WSCALE : peer_wscale);
    } else {
        f->wscale_ok = 0;
        f->snd_wscale = 0;
        f->rcv_wscale = 0;
    }
    f->snd_wnd = window; /* a SYN's window is never scaled */
    f->snd_wl1 = seq;
}

int fp_flow_assume_syn(struct fp_flow *f, uint32_t irs, uint16_t peer_window,
                       int peer_wscale, struct fp_reply *synack)
{
    if (f->state != FP_CLOSED)
        return -FP_E_INVAL;
    take_syn(f, irs, peer_window, peer_wscale);
    f->state = FP_SYN_RECEIVED;
    f->snd_nxt = f->iss + 1;
    make(f, FP_TCP_SYN | FP_TCP_ACK, f->iss, synack);
    return 0;
}

int fp_seq_acceptable(uint32_t rcv_nxt, uint32_t rcv_wnd, uint32_t seq, uint32_t seg_len)
{
    if (seg_len == 0) {
        if (rcv_wnd == 0)
            return seq == rcv_nxt;
        return !fp_before(seq, rcv_nxt) && fp_before(seq, rcv_nxt + rcv_wnd);
    }
    if (rcv_wnd == 0)
        return 0;
    uint32_t last = seq + seg_len - 1;
    return (!fp_before(seq, rcv_nxt) && fp_before(seq, rcv_nxt + rcv_wnd)) ||
           (!fp_before(last, rcv_nxt) && fp_before(last, rcv_nxt + rcv_wnd));
}

void fp_rst_for(const struct fp_tcp *seg, uint32_t payload_len, struct fp_reply *rst)
{
    rst->window = 0;
    if (seg->flags & FP_TCP_ACK) {
        rst->flags = FP_TCP_RST;
        rst->seq = seg->ack;
        rst->ack = 0;
    } else {
        uint32_t len = payload_len + !!(seg->flags & FP_TCP_SYN) + !!(seg->flags & FP_TCP_FIN);
        rst->flags = FP_TCP_RST | FP_TCP_ACK;
        rst->seq = 0;
        rst->ack = seg->seq + len;
    }
}

void fp_flow_ack(const struct fp_flow *f, struct fp_reply *ack)
{
    make(f, FP_TCP_ACK, f->snd_nxt, ack);
}

int fp_flow_send(struct fp_flow *f, uint32_t len, int fin, struct fp_reply *seg)
{
    if (f->state != FP_ESTABLISHED)
        return -FP_E_INVAL;
    uint16_t flags = FP_TCP_ACK | (len ? FP_TCP_PSH : 0) | (fin ? FP_TCP_FIN : 0);
    make(f, flags, f->snd_nxt, seg);
    f->snd_nxt += len + (fin ? 1u : 0u);
    return 0;
}

static int peer_wscale_of(const struct fp_tcp *seg)
{
    return (seg->opts.present & FP_OPT_WSCALE) ? seg->opts.wscale : -1;
}

static void update_window(struct fp_flow *f, const struct fp_tcp *seg)
{
    /* RFC 9293 §3.10.7.4 fifth check: take SND.WND from the newest segment. */
    if (fp_before(f->snd_wl1, seg->seq) ||
        (f->snd_wl1 == seg->seq && !fp_before(seg->ack, f->snd_wl2))) {
        f->snd_wnd = (uint32_t)seg->window << (f->wscale_ok ? f->snd_wscale : 0);
        f->snd_wl1 = seg->seq;
        f->snd_wl2 = seg->ack;
    }
}

static int input_syn_sent(struct fp_flow *f, const struct fp_tcp *seg, int *action,
                          struct fp_reply *r)
{
    uint16_t fl = seg->flags;
    if (fl & FP_TCP_ACK) {
        /* first check: the ACK must cover our SYN and nothing beyond */
        if (!fp_after(seg->ack, f->iss) || fp_after(seg->ack, f->snd_nxt)) {
            if (!(fl & FP_TCP_RST)) {
                fp_rst_for(seg, 0, r);
                *action = FP_ACT_SEND;
            }
            return FP_EV_BAD_ACK;
        }
    }
    if (fl & FP_TCP_RST) {
        if (fl & FP_TCP_ACK) {
            f->state = FP_RESET;
            return FP_EV_RESET;
        }
        return FP_EV_IGNORED;
    }
    if (!(fl & FP_TCP_SYN))
        return FP_EV_IGNORED;

    take_syn(f, seg->seq, seg->window, peer_wscale_of(seg));
    if (fl & FP_TCP_ACK) {
        f->snd_una = seg->ack;
        f->snd_wl2 = seg->ack;
        f->state = FP_ESTABLISHED;
        make(f, FP_TCP_ACK, f->snd_nxt, r);
        *action = FP_ACT_SEND;
        return FP_EV_ESTABLISHED;
    }
    /* simultaneous open: answer the peer's SYN with our SYN-ACK */
    f->state = FP_SYN_RECEIVED;
    make(f, FP_TCP_SYN | FP_TCP_ACK, f->iss, r);
    *action = FP_ACT_SEND;
    return FP_EV_NONE;
}

static int input_synchronized(struct fp_flow *f, const struct fp_tcp *seg, uint32_t payload_len,
                              int *action, struct fp_reply *r)
{
    uint16_t fl = seg->flags;
    uint32_t seg_len = payload_len + !!(fl & FP_TCP_SYN) + !!(fl & FP_TCP_FIN);

    /* A repeat of the peer's SYN (its retransmission timer or the symmetric
     * strategy's periodic resend) while we have not seen our SYN acked:
     * answer with our SYN-ACK again. Once established, a challenge ACK. */
    if ((fl & FP_TCP_SYN) && seg->seq == f->irs) {
        if (f->state == FP_SYN_RECEIVED) {
            if ((fl & FP_TCP_ACK) && fp_after(seg->ack, f->snd_una) &&
                !fp_after(seg->ack, f->snd_nxt)) {
                /* the peer's SYN-ACK crossing ours (simultaneous open) */
                f->snd_una = seg->ack;
                f->snd_wl1 = seg->seq;
                f->snd_wl2 = seg->ack;
                f->snd_wnd = (uint32_t)seg->window; /* SYN window: unscaled */
                f->state = FP_ESTABLISHED;
                fp_flow_ack(f, r);
                *action = FP_ACT_SEND;
                return FP_EV_ESTABLISHED;
            }
            make(f, FP_TCP_SYN | FP_TCP_ACK, f->iss, r);
            *action = FP_ACT_SEND;
            return FP_EV_SYN_RETRANSMIT;
        }
        fp_flow_ack(f, r);
        *action = FP_ACT_SEND;
        return FP_EV_SYN_RETRANSMIT;
    }

    /* first check: sequence number acceptability */
    if (!fp_seq_acceptable(f->rcv_nxt, f->rcv_wnd, seg->seq, seg_len)) {
        if (!(fl & FP_TCP_RST)) {
            fp_flow_ack(f, r);
            *action = FP_ACT_SEND;
        }
        return FP_EV_UNACCEPTABLE;
    }
    /* second check: RST. Exact match resets; in-window otherwise earns a
     * challenge ACK (RFC 5961 §3.2, adopted by RFC 9293). */
    if (fl & FP_TCP_RST) {
        if (seg->seq == f->rcv_nxt) {
            f->state = FP_RESET;
            return FP_EV_RESET;
        }
        fp_flow_ack(f, r);
        *action = FP_ACT_SEND;
        return FP_EV_UNACCEPTABLE;
    }
    /* fourth check: a SYN other than the peer's own in a synchronized state */
    if (fl & FP_TCP_SYN) {
        fp_flow_ack(f, r);
        *action = FP_ACT_SEND;
        return FP_EV_UNACCEPTABLE;
    }
    /* fifth check: ACK */
    if (!(fl & FP_TCP_ACK))
        return FP_EV_IGNORED;
    int ev = FP_EV_NONE;
    if (f->state == FP_SYN_RECEIVED) {
        if (!fp_after(seg->ack, f->snd_una) || fp_after(seg->ack, f->snd_nxt)) {
            fp_rst_for(seg, payload_len, r);
            *action = FP_ACT_SEND;
            return FP_EV_BAD_ACK;
        }
        f->state = FP_ESTABLISHED;
        f->snd_una = seg->ack;
        f->snd_wl1 = seg->seq - 1; /* force the window update below */
        ev = FP_EV_ESTABLISHED;
    } else if (fp_after(seg->ack, f->snd_nxt)) {
        fp_flow_ack(f, r);
        *action = FP_ACT_SEND;
        return FP_EV_BAD_ACK;
    } else if (fp_after(seg->ack, f->snd_una)) {
        f->snd_una = seg->ack;
    }
    if (!fp_before(seg->ack, f->snd_una))
        update_window(f, seg);

    /* seventh/eighth: in-order data and FIN advance rcv_nxt and are acked */
    uint32_t adv = payload_len + !!(fl & FP_TCP_FIN);
    if (adv && seg->seq == f->rcv_nxt) {
        f->rcv_nxt += adv;
        fp_flow_ack(f, r);
        *action = FP_ACT_SEND;
    } else if (adv) {
        fp_flow_ack(f, r); /* out of order: duplicate ACK, data not kept */
        *action = FP_ACT_SEND;
    }
    return ev;
}

int fp_flow_input(struct fp_flow *f, const struct fp_tcp *seg, uint32_t payload_len,
                  int *action, struct fp_reply *reply)
{
    *action = FP_ACT_NONE;
    switch (f->state) {
    case FP_SYN_SENT:
        return input_syn_sent(f, seg, action, reply);
    case FP_SYN_RECEIVED:
    case FP_ESTABLISHED:
        return input_synchronized(f, seg, payload_len, action, reply);
    case FP_CLOSED:
        /* RFC 9293 §3.10.7.1: everything in CLOSED is answered with RST */
        if (!(seg->flags & FP_TCP_RST)) {
            fp_rst_for(seg, payload_len, reply);
            *action = FP_ACT_SEND;
        }
        return FP_EV_IGNORED;
    default:
        return FP_EV_IGNORED;
    }
}
