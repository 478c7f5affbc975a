/* fp_errors.c - names and sentences for result codes. */
#include "fastpunch/fp_errors.h"

struct fp_reason_entry {
    const char *name;
    const char *text;
};

static const struct fp_reason_entry reasons[FP_E_LAST - FP_E_BASE] = {
    [FP_E_TRUNCATED - FP_E_BASE] = {"truncated", "buffer is shorter than the header requires"},
    [FP_E_IP_VERSION - FP_E_BASE] = {"ip-version", "IP version is not 4 (nor 6 where IPv6 is read)"},
    [FP_E_IP_IHL - FP_E_BASE] = {"ip-ihl", "IHL is below 5 or extends past the buffer"},
    [FP_E_IP_TOTLEN - FP_E_BASE] = {"ip-total-length",
                                    "total length is below the header length or past the buffer"},
    [FP_E_IP_CHECKSUM - FP_E_BASE] = {"ip-checksum", "IPv4 header checksum does not verify"},
    [FP_E_IP_FRAGMENT - FP_E_BASE] = {"ip-fragment", "datagram is a fragment"},
    [FP_E_IP_PROTO - FP_E_BASE] = {"ip-protocol", "IP payload is not TCP"},
    [FP_E_IP_OPTIONS - FP_E_BASE] = {"ip-options", "IPv4 options must be a multiple of 4, at most 40 bytes"},
    [FP_E_TCP_DOFF - FP_E_BASE] = {"tcp-data-offset",
                                   "TCP data offset is below 5 or extends past the segment"},
    [FP_E_TCP_CHECKSUM - FP_E_BASE] = {"tcp-checksum", "TCP checksum does not verify"},
    [FP_E_OPT_TRUNCATED - FP_E_BASE] = {"tcp-option-truncated",
                                        "a TCP option's length is missing, below 2, or overruns the header"},
    [FP_E_OPT_LENGTH - FP_E_BASE] = {"tcp-option-length", "a known TCP option has the wrong length"},
    [FP_E_OPT_DUPLICATE - FP_E_BASE] = {"tcp-option-duplicate", "a TCP option appears more than once"},
    [FP_E_OPT_SPACE - FP_E_BASE] = {"tcp-option-space", "TCP options do not fit in 40 bytes"},
    [FP_E_NOSPACE - FP_E_BASE] = {"no-space", "output buffer is too small"},
    [FP_E_TOOBIG - FP_E_BASE] = {"too-big", "datagram would exceed 65535 bytes"},
    [FP_E_INVAL - FP_E_BASE] = {"invalid-argument", "argument out of range"},
    [FP_E_IP6_PAYLEN - FP_E_BASE] = {"ip6-payload-length",
                                     "IPv6 payload length is past the buffer, or zero behind a "
                                     "hop-by-hop header (a jumbogram)"},
    [FP_E_IP6_EXTHDR - FP_E_BASE] = {"ip6-extension-header",
                                     "an IPv6 extension header is refused: ESP, routing with "
                                     "segments left, more than 8, or one running past the payload"},
};

const char *fp_reason_name(int code)
{
    if (code < 0)
        code = -code;
    if (code >= FP_E_BASE && code < FP_E_LAST)
        return reasons[code - FP_E_BASE].name;
    return code == 0 ? "ok" : "system-error";
}

const char *fp_reason_text(int code)
{
    if (code < 0)
        code = -code;
    if (code >= FP_E_BASE && code < FP_E_LAST)
        return reasons[code - FP_E_BASE].text;
    return code == 0 ? "success" : "system error";
}
