/* fp_errors.h - result codes shared by every fastpunch C module.
 *
 * Every function returns 0 (or a non-negative count/length) on success and a
 * negative code on failure. Negative values below FP_E_BASE are -errno from the
 * kernel; values at or above it name a specific reason a packet was refused.
 */
#ifndef FASTPUNCH_FP_ERRORS_H
#define FASTPUNCH_FP_ERRORS_H

#define FP_E_BASE 4096

enum fp_reason {
    FP_OK = 0,
    /* IPv4 */
    FP_E_TRUNCATED = FP_E_BASE, /* buffer shorter than the header claims       */
    FP_E_IP_VERSION,            /* version field is not 4 (nor 6 where v6 is read) */
    FP_E_IP_IHL,                /* IHL below 5 or beyond the buffer            */
    FP_E_IP_TOTLEN,             /* total length below IHL or beyond the buffer */
    FP_E_IP_CHECKSUM,           /* header checksum does not verify             */
    FP_E_IP_FRAGMENT,           /* a fragment: no whole TCP header inside      */
    FP_E_IP_PROTO,              /* not TCP                                     */
    FP_E_IP_OPTIONS,            /* IPv4 options longer than 40 bytes           */
    /* TCP */
    FP_E_TCP_DOFF,              /* data offset below 5 or beyond the segment   */
    FP_E_TCP_CHECKSUM,          /* TCP checksum does not verify                */
    FP_E_OPT_TRUNCATED,         /* option length byte missing or overruns      */
    FP_E_OPT_LENGTH,            /* a known option has the wrong length         */
    FP_E_OPT_DUPLICATE,         /* a known option appears twice                */
    FP_E_OPT_SPACE,             /* options to build exceed 40 bytes            */
    /* build-side */
    FP_E_NOSPACE,               /* caller buffer too small                     */
    FP_E_TOOBIG,                /* datagram would exceed 65535 bytes           */
    FP_E_INVAL,                 /* argument out of range                       */
    /* IPv6 (after the others: codes already published keep their values) */
    FP_E_IP6_PAYLEN,            /* payload length past the buffer, or a jumbogram */
    FP_E_IP6_EXTHDR,            /* an extension header refused: ESP, too many,
                                   or one running past the payload              */
    FP_E_LAST
};

/* Short stable identifier ("truncated", "ip-checksum", ...) for a code. */
const char *fp_reason_name(int code);
/* Human sentence for a code (reason codes only; errno codes say "system error"). */
const char *fp_reason_text(int code);

#endif
