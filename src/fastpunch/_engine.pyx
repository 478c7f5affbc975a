# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Binding of the C segment engine (csrc/). The Python face is fastpunch.packet.

Errors: every negative code from C goes through _error(), the one place that
turns codes into exceptions (fastpunch.errors.error_from_code).
"""
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.bytearray cimport PyByteArray_AS_STRING
from cpython.mem cimport PyMem_Free, PyMem_Malloc
cdef extern from "Python.h":
    Py_ssize_t PY_SSIZE_T_MAX
from libc.stdint cimport int32_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcpy, memset

from fastpunch._cdefs cimport *

import collections
import enum

from fastpunch import errors as _errors

cdef extern from "arpa/inet.h" nogil:
    int inet_pton(int af, const char *src, void *dst)
    uint32_t ntohl(uint32_t)
    uint32_t htonl(uint32_t)
cdef extern from "sys/socket.h" nogil:
    int AF_INET
    int AF_INET6
cdef extern from "arpa/inet.h" nogil:
    const char *inet_ntop(int af, const void *src, char *dst, int size)
cdef extern from "unistd.h" nogil:
    int close(int fd)


# ---------------------------------------------------------------- errors

cdef object _error(long code, str operation):
    cdef int c = <int>(-code if code < 0 else code)
    return _errors.error_from_code(
        c, fp_reason_name(c).decode(), fp_reason_text(c).decode(), operation)


cdef Py_ssize_t _area(Py_ssize_t count, Py_ssize_t size, str what) except -1:
    """count * size as a buffer size, refused when it overflows (on a 32-bit
    build capacity * stride wraps long before memory runs out, and a wrapped
    size would allocate a buffer that later receives overrun)."""
    cdef size_t out
    if count < 0 or size < 0 or fp_size_mul(<size_t>count, <size_t>size, &out) < 0 \
            or out > <size_t>PY_SSIZE_T_MAX:
        raise OverflowError(f"{what}: {count} x {size} bytes does not fit in memory")
    return <Py_ssize_t>out


cdef Py_ssize_t _span(Py_ssize_t count, Py_ssize_t stride, Py_ssize_t length,
                      str what) except -1:
    """Bytes that count regions of length bytes, stride apart, span."""
    cdef size_t out
    if count < 0 or stride < 0 or length < 0 or \
            fp_size_span(<size_t>count, <size_t>stride, <size_t>length, &out) < 0 \
            or out > <size_t>PY_SSIZE_T_MAX:
        raise OverflowError(f"{what}: {count} regions of {length} bytes, {stride} apart, "
                            "do not fit in memory")
    return <Py_ssize_t>out


def reason_name(int code):
    """Stable identifier of an engine result code (for tests and logs)."""
    return fp_reason_name(code).decode()


# ---------------------------------------------------------------- constants

class Flags(enum.IntFlag):
    """TCP control bits (RFC 9293 §3.1, RFC 3168, RFC 9768 AE)."""
    FIN = 0x001
    SYN = 0x002
    RST = 0x004
    PSH = 0x008
    ACK = 0x010
    URG = 0x020
    ECE = 0x040
    CWR = 0x080
    AE = 0x100


cdef str _FLAG_LETTERS = "FSRPAUEC"


def flags_str(int flags):
    """Flags as letters in scapy's order ("S", "SA", "FPA", ...)."""
    return "".join([_FLAG_LETTERS[i] for i in range(8) if flags & (1 << i)])


class FlowState(enum.IntEnum):
    CLOSED = FP_CLOSED
    SYN_SENT = FP_SYN_SENT
    SYN_RECEIVED = FP_SYN_RECEIVED
    ESTABLISHED = FP_ESTABLISHED
    RESET = FP_RESET


class FlowEvent(enum.IntEnum):
    NONE = 0
    ESTABLISHED = 1
    RESET = 2
    UNACCEPTABLE = 3
    BAD_ACK = 4
    IGNORED = 5
    SYN_RETRANSMIT = 6


Reply = collections.namedtuple("Reply", "flags seq ack window")
Reply.__doc__ = "Numbers of one segment to send: control bits, SEQ, ACK, window field."

cdef object _reply(const fp_reply *r):
    return Reply(r.flags, r.seq, r.ack, r.window)


# ---------------------------------------------------------------- addresses

cdef int _addr(object a, uint32_t *out) except -1:
    cdef uint32_t net
    if isinstance(a, int):
        if not 0 <= a <= 0xffffffff:
            raise ValueError(f"IPv4 address out of range: {a!r}")
        out[0] = <uint32_t>a
        return 0
    if isinstance(a, str):
        b = (<str>a).encode("ascii", "replace")
        if b"\0" not in b and inet_pton(AF_INET, b, &net) == 1:
            out[0] = ntohl(net)
            return 0
        raise ValueError(f"not an IPv4 address: {a!r}")
    if hasattr(a, "packed") and getattr(a, "version", 0) == 4:   # ipaddress.IPv4Address
        out[0] = <uint32_t>int(a)
        return 0
    raise TypeError(f"IPv4 address must be str, int or IPv4Address, not {type(a).__name__}")


cdef bint _is_v6(object a):
    """An IPv6 address as build()/tcp_checksum() take one: text with a
    colon, an IPv6Address, or 16 bytes as on the wire."""
    if isinstance(a, str):
        return ":" in <str>a
    if isinstance(a, (bytes, bytearray)):
        return len(a) == 16
    return getattr(a, "version", 0) == 6 and hasattr(a, "packed")


cdef int _addr6(object a, uint8_t *out) except -1:
    if isinstance(a, str):
        b = (<str>a).encode("ascii", "replace")
        if b"\0" not in b and inet_pton(AF_INET6, b, out) == 1:
            return 0
        raise ValueError(f"not an IPv6 address: {a!r}")
    cdef bytes raw
    if isinstance(a, (bytes, bytearray)) and len(a) == 16:
        raw = bytes(a)
        memcpy(out, <const char *>raw, 16)
        return 0
    if getattr(a, "version", 0) == 6 and hasattr(a, "packed"):      # ipaddress.IPv6Address
        raw = bytes(a.packed)
        if len(raw) != 16:
            raise ValueError(f"an IPv6 address packs to 16 bytes, not {len(raw)}: {a!r}")
        memcpy(out, <const char *>raw, 16)
        return 0
    raise TypeError(f"IPv6 address must be str, 16 bytes or IPv6Address, "
                    f"not {type(a).__name__}")


cdef str _ntop6(const uint8_t *a):
    cdef char text[48]
    inet_ntop(AF_INET6, a, text, sizeof(text))
    return text.decode("ascii")


cdef int _family(object src, object dst) except -1:
    """6 when both addresses are IPv6, 4 when neither is; a mix is an error."""
    cdef bint s6 = _is_v6(src), d6 = _is_v6(dst)
    if s6 != d6:
        raise ValueError(f"source and destination are of different families: {src!r}, {dst!r}")
    return 6 if s6 else 4


cdef str _ntoa(uint32_t a):
    return f"{a >> 24}.{(a >> 16) & 255}.{(a >> 8) & 255}.{a & 255}"


def ip_to_int(a):
    """Host-order integer of an IPv4 address given as str, int or IPv4Address."""
    cdef uint32_t v
    _addr(a, &v)
    return v


def int_to_ip(uint32_t a):
    return _ntoa(a)


# ---------------------------------------------------------------- checksums

cdef inline int _wire_to_int(fp_sum16 v) noexcept nogil:
    cdef uint8_t *b = <uint8_t *>&v
    return b[0] << 8 | b[1]


cdef inline fp_sum16 _int_to_wire16(uint32_t v) noexcept nogil:
    cdef fp_sum16 w
    cdef uint8_t *b = <uint8_t *>&w
    b[0] = (v >> 8) & 0xff
    b[1] = v & 0xff
    return w


cdef inline uint32_t _int_to_wire32(uint32_t v) noexcept nogil:
    cdef uint32_t w
    cdef uint8_t *b = <uint8_t *>&w
    b[0] = v >> 24
    b[1] = (v >> 16) & 0xff
    b[2] = (v >> 8) & 0xff
    b[3] = v & 0xff
    return w


def checksum(const uint8_t[::1] data not None):
    """RFC 1071 Internet checksum of data, as the big-endian value on the wire.

    Over a region that includes its own correct checksum field the result is 0.
    """
    cdef fp_sum16 c
    with nogil:
        c = fp_csum(&data[0] if data.shape[0] else NULL, <size_t>data.shape[0])
    return _wire_to_int(c)


def tcp_checksum(src, dst, const uint8_t[::1] segment not None):
    """Checksum of a TCP segment (header + data) under the IPv4 pseudo-header,
    or the IPv6 one (RFC 8200 §8.1) when the addresses are IPv6.

    With the checksum field zeroed this is the value to store; over a segment
    carrying a correct checksum it is 0.
    """
    cdef uint32_t s, d
    cdef uint8_t s6[16]
    cdef uint8_t d6[16]
    cdef uint64_t acc6
    if _family(src, dst) == 6:
        _addr6(src, s6)
        _addr6(dst, d6)
        if segment.shape[0] > 0xffff:
            raise ValueError("a TCP segment is at most 65535 bytes (no jumbograms)")
        acc6 = fp_csum_pseudo6(s6, d6, 6, <uint32_t>segment.shape[0])
        acc6 = fp_csum_add(acc6, &segment[0] if segment.shape[0] else NULL,
                           <size_t>segment.shape[0])
        return _wire_to_int(fp_csum_fold(acc6))
    _addr(src, &s)
    _addr(dst, &d)
    if segment.shape[0] > 0xffff:
        raise ValueError("a TCP segment is at most 65535 bytes")
    cdef uint64_t acc = fp_csum_pseudo(s, d, 6, <uint16_t>segment.shape[0])
    acc = fp_csum_add(acc, &segment[0] if segment.shape[0] else NULL, <size_t>segment.shape[0])
    return _wire_to_int(fp_csum_fold(acc))


def checksum_update(int check, unsigned long old, unsigned long new, int width=16):
    """RFC 1624 incremental update of checksum ``check`` when a ``width``-bit
    field (16 or 32) changes from ``old`` to ``new``. Values are big-endian ints."""
    if not 0 <= check <= 0xffff:
        raise ValueError("checksum must be a 16-bit value")
    cdef fp_sum16 c = _int_to_wire16(<uint32_t>check)
    if width == 16:
        if old > 0xffff or new > 0xffff:
            raise ValueError("16-bit field values must be below 65536")
        return _wire_to_int(fp_csum_replace2(c, _int_to_wire16(<uint32_t>old),
                                             _int_to_wire16(<uint32_t>new)))
    if width == 32:
        if old > 0xffffffff or new > 0xffffffff:
            raise ValueError("32-bit field values must be below 2**32")
        return _wire_to_int(fp_csum_replace4(c, _int_to_wire32(<uint32_t>old),
                                             _int_to_wire32(<uint32_t>new)))
    raise ValueError("width must be 16 or 32")


def checksum_many(const uint8_t[::1] data not None, Py_ssize_t stride, Py_ssize_t length,
                  uint16_t[::1] out not None):
    """Checksum len(out) regions of ``length`` bytes placed ``stride`` bytes apart
    in data; out[i] receives region i's checksum in wire byte order (as memcpy'd
    into a header). Validates a received batch in one call."""
    cdef Py_ssize_t count = out.shape[0]
    if stride < length or length < 0:
        raise ValueError("stride must be at least length")
    if _span(count, stride, length, "checksum_many") > data.shape[0]:
        raise ValueError("data is too short for that many regions")
    if count == 0:
        return
    with nogil:
        fp_csum_many(&data[0], <size_t>stride, <size_t>length, <size_t>count, &out[0])


# ---------------------------------------------------------------- sequence numbers

def seq_before(uint32_t a, uint32_t b):
    """a precedes b modulo 2**32 (the kernel's before())."""
    return bool(fp_before(a, b))


def seq_after(uint32_t a, uint32_t b):
    return bool(fp_after(a, b))


def seq_between(uint32_t x, uint32_t lo, uint32_t hi):
    """lo <= x <= hi modulo 2**32."""
    return bool(fp_between(x, lo, hi))


def seq_acceptable(uint32_t rcv_nxt, uint32_t rcv_wnd, uint32_t seq, uint32_t seg_len):
    """RFC 9293 §3.10.7.4 acceptability test (seg_len counts SYN and FIN)."""
    return bool(fp_seq_acceptable(rcv_nxt, rcv_wnd, seq, seg_len))


# ---------------------------------------------------------------- TCP options

cdef class TCPOptions:
    """TCP options of a segment: MSS, window scale, SACK-permitted, timestamps,
    SACK blocks. Immutable; absent options read as None (or False / ())."""
    cdef fp_tcp_opts o

    def __init__(self, *, mss=None, wscale=None, bint sack_permitted=False,
                 timestamp=None, sack=()):
        memset(&self.o, 0, sizeof(self.o))
        if mss is not None:
            if not 0 <= mss <= 0xffff:
                raise ValueError("mss must fit in 16 bits")
            self.o.present |= FP_OPT_MSS
            self.o.mss = mss
        if wscale is not None:
            if not 0 <= wscale <= 14:
                raise ValueError("wscale must be 0..14 (RFC 7323 §2.3)")
            self.o.present |= FP_OPT_WSCALE
            self.o.wscale = wscale
        if sack_permitted:
            self.o.present |= FP_OPT_SACK_PERM
        if timestamp is not None:
            tsval, tsecr = timestamp
            self.o.present |= FP_OPT_TIMESTAMP
            self.o.ts_val = tsval
            self.o.ts_ecr = tsecr
        blocks = tuple(sack)
        if blocks:
            if len(blocks) > FP_MAX_SACK_BLOCKS:
                raise ValueError("at most 4 SACK blocks fit in a TCP header")
            self.o.present |= FP_OPT_SACK
            self.o.sack_count = <uint8_t>len(blocks)
            for i, (left, right) in enumerate(blocks):
                self.o.sack[i].left = left
                self.o.sack[i].right = right
        cdef uint8_t scratch[40]
        cdef int n = fp_tcp_opts_encode(&self.o, scratch, 40)
        if n < 0:
            raise _error(n, "build")

    @staticmethod
    cdef TCPOptions _wrap(const fp_tcp_opts *o):
        cdef TCPOptions t = TCPOptions.__new__(TCPOptions)
        t.o = o[0]
        return t

    @staticmethod
    def decode(const uint8_t[::1] data not None):
        """Parse a raw option block (the bytes after the fixed TCP header)."""
        cdef fp_tcp_opts o
        if data.shape[0] > 40:
            raise _errors.MalformedPacket("tcp-option-space", "TCP options exceed 40 bytes")
        cdef int rc = fp_tcp_opts_decode(&data[0] if data.shape[0] else NULL,
                                         <size_t>data.shape[0], &o)
        if rc < 0:
            raise _error(rc, "parse")
        return TCPOptions._wrap(&o)

    def encode(self):
        """The option block in the layout Linux sends (4-byte aligned)."""
        cdef uint8_t buf[40]
        cdef int n = fp_tcp_opts_encode(&self.o, buf, 40)
        if n < 0:
            raise _error(n, "build")
        return PyBytes_FromStringAndSize(<char *>buf, n)

    @property
    def mss(self):
        return self.o.mss if self.o.present & FP_OPT_MSS else None

    @property
    def wscale(self):
        return self.o.wscale if self.o.present & FP_OPT_WSCALE else None

    @property
    def sack_permitted(self):
        return bool(self.o.present & FP_OPT_SACK_PERM)

    @property
    def timestamp(self):
        if self.o.present & FP_OPT_TIMESTAMP:
            return (self.o.ts_val, self.o.ts_ecr)
        return None

    @property
    def sack(self):
        if not self.o.present & FP_OPT_SACK:
            return ()
        return tuple([(self.o.sack[i].left, self.o.sack[i].right)
                      for i in range(self.o.sack_count)])

    @property
    def unknown(self):
        """How many options of kinds we do not interpret were skipped."""
        return self.o.unknown

    def _key(self):
        return (self.mss, self.wscale, self.sack_permitted, self.timestamp, self.sack)

    def __eq__(self, other):
        if not isinstance(other, TCPOptions):
            return NotImplemented
        return self._key() == other._key()

    def __hash__(self):
        return hash(self._key())

    def __repr__(self):
        parts = []
        for name, value in zip(("mss", "wscale", "sack_permitted", "timestamp", "sack"),
                               self._key()):
            if value not in (None, False, ()):
                parts.append(f"{name}={value!r}")
        return f"TCPOptions({', '.join(parts)})"


# ---------------------------------------------------------------- parse

cdef class Segment:
    """A parsed IPv4/TCP or IPv6/TCP datagram (``version`` says which).
    Fields are read lazily from the C struct. On IPv6, ``tos`` is the
    traffic class and ``ttl`` the hop limit; the fields IPv6 does not have
    (``ip_id``, ``ip_checksum``, ``ip_flags``, ``df``) are None."""
    cdef fp_segment s          # the TCP part and payload, for either family
    cdef fp_ipv6 ip6           # the IPv6 header when version == 6
    cdef uint8_t _version
    cdef bytes _data

    @property
    def version(self):
        """4 or 6."""
        return self._version

    @property
    def family(self):
        """socket.AF_INET or socket.AF_INET6."""
        return AF_INET6 if self._version == 6 else AF_INET

    @property
    def src(self):
        return _ntop6(self.ip6.saddr) if self._version == 6 else _ntoa(self.s.ip.saddr)

    @property
    def dst(self):
        return _ntop6(self.ip6.daddr) if self._version == 6 else _ntoa(self.s.ip.daddr)

    @property
    def src_int(self):
        if self._version == 6:
            return int.from_bytes(PyBytes_FromStringAndSize(<char *>self.ip6.saddr, 16), "big")
        return self.s.ip.saddr

    @property
    def dst_int(self):
        if self._version == 6:
            return int.from_bytes(PyBytes_FromStringAndSize(<char *>self.ip6.daddr, 16), "big")
        return self.s.ip.daddr

    @property
    def tos(self):
        return self.ip6.tclass if self._version == 6 else self.s.ip.tos

    @property
    def traffic_class(self):
        return self.tos

    @property
    def flow_label(self):
        """IPv6's 20-bit flow label (None on IPv4)."""
        return self.ip6.flow if self._version == 6 else None

    @property
    def next_header(self):
        """IPv6's fixed header's next header field (None on IPv4): 6, or the
        first extension header walked past."""
        return self.ip6.next if self._version == 6 else None

    @property
    def ext_header_length(self):
        """Bytes of IPv6 extension headers before TCP (0 on IPv4)."""
        return self.ip6.ext_len if self._version == 6 else 0

    @property
    def total_length(self):
        return 40 + self.ip6.payload_len if self._version == 6 else self.s.ip.total_len

    @property
    def ip_header_length(self):
        """Bytes before the TCP header: IPv4's IHL * 4, or IPv6's 40 plus its
        extension headers."""
        return 40 + self.ip6.ext_len if self._version == 6 else self.s.ip.hlen

    @property
    def ip_id(self):
        return None if self._version == 6 else self.s.ip.id

    @property
    def df(self):
        return None if self._version == 6 else bool(self.s.ip.frag & FP_IP_DF)

    @property
    def ip_flags(self):
        """The three IP flag bits as an int (RF=4, DF=2, MF=1); None on IPv6."""
        return None if self._version == 6 else self.s.ip.frag >> 13

    @property
    def ttl(self):
        return self.ip6.hop_limit if self._version == 6 else self.s.ip.ttl

    @property
    def hop_limit(self):
        return self.ttl

    @property
    def ip_checksum(self):
        return None if self._version == 6 else self.s.ip.check

    @property
    def ip_options(self):
        """IPv4's header options, or IPv6's extension headers, as bytes."""
        if self._version == 6:
            return self._data[40:40 + self.ip6.ext_len]
        return self._data[20:self.s.ip.hlen]

    @property
    def sport(self):
        return self.s.tcp.sport

    @property
    def dport(self):
        return self.s.tcp.dport

    @property
    def seq(self):
        return self.s.tcp.seq

    @property
    def ack(self):
        return self.s.tcp.ack

    @property
    def tcp_header_length(self):
        return self.s.tcp.doff

    @property
    def flags(self):
        return self.s.tcp.flags

    @property
    def flags_str(self):
        return flags_str(self.s.tcp.flags)

    @property
    def window(self):
        return self.s.tcp.window

    @property
    def tcp_checksum(self):
        return self.s.tcp.check

    @property
    def urgent(self):
        return self.s.tcp.urg

    @property
    def options(self):
        return TCPOptions._wrap(&self.s.tcp.opts)

    @property
    def payload(self):
        cdef Py_ssize_t start
        if self._version == 6:
            start = 40 + self.ip6.ext_len + self.s.tcp.doff
            return self._data[start:40 + self.ip6.payload_len]
        start = self.s.ip.hlen + self.s.tcp.doff
        return self._data[start:self.s.ip.total_len]

    @property
    def payload_length(self):
        return self.s.payload_len

    @property
    def seg_len(self):
        """SEG.LEN of RFC 9293: payload plus one for SYN and one for FIN."""
        return self.s.payload_len + (self.s.tcp.flags & 2) // 2 + (self.s.tcp.flags & 1)

    def __repr__(self):
        if self._version == 6:
            return (f"<Segment [{self.src}]:{self.sport} > [{self.dst}]:{self.dport} "
                    f"[{self.flags_str}] seq={self.seq} ack={self.ack} win={self.window} "
                    f"len={self.s.payload_len}>")
        return (f"<Segment {self.src}:{self.sport} > {self.dst}:{self.dport} "
                f"[{self.flags_str}] seq={self.seq} ack={self.ack} win={self.window} "
                f"len={self.s.payload_len}>")


cdef Segment _parse(bytes data, int verify):
    cdef Segment seg = Segment.__new__(Segment)
    cdef const uint8_t *buf = <const uint8_t *>PyBytes_AS_STRING(data)
    cdef size_t n = <size_t>PyBytes_GET_SIZE(data)
    cdef int rc
    cdef fp_segment6 s6
    if n and buf[0] >> 4 == 6:
        rc = fp_segment6_parse(buf, n, verify, &s6)
        if rc < 0:
            raise _error(rc, "parse")
        memset(&seg.s.ip, 0, sizeof(fp_ipv4))
        seg.s.tcp = s6.tcp
        seg.s.payload = s6.payload
        seg.s.payload_len = s6.payload_len
        seg.ip6 = s6.ip
        seg._version = 6
    else:
        rc = fp_segment_parse(buf, n, verify, &seg.s)
        if rc < 0:
            raise _error(rc, "parse")
        seg._version = 4
    seg._data = data
    return seg


def parse(data, *, bint verify=True):
    """Parse one IPv4 or IPv6 datagram carrying TCP (the version nibble
    decides).

    Raises MalformedPacket (a ValueError) with a ``reason`` for anything that
    is not a well-formed, complete, unfragmented IPv4/TCP or IPv6/TCP
    datagram (IPv6 extension headers are walked past or refused, never
    mistaken for TCP); checksums are verified unless ``verify`` is false.
    Never crashes on any input.
    """
    if type(data) is not bytes:
        data = bytes(data)
    return _parse(<bytes>data, FP_VERIFY_IP | FP_VERIFY_TCP if verify else 0)


# ---------------------------------------------------------------- batch parse

# (name, array typecode) of the columns ParsedBatch fills in C.
_COLUMNS = (("status", "i"), ("src", "I"), ("dst", "I"), ("sport", "H"), ("dport", "H"),
            ("seq", "I"), ("ack", "I"), ("flags", "H"), ("window", "H"),
            ("payload_length", "I"), ("mss", "H"), ("ts_val", "I"), ("version", "B"))


cdef class ParsedBatch:
    """Up to ``capacity`` datagrams parsed in one C call, read as columns.

    ``RawReceiver.recv_into(batch)`` receives straight into the batch's own
    buffer (recvmmsg) and parses; ``parse_from()`` copies a buffer in first.
    Columns are memoryviews (zero copy) over C arrays: ``status`` is 0 for a
    good datagram or the negative reason code (see ``reason_name``);
    ``mss``/``ts_val`` are 0 when the option is absent. ``batch[i]`` gives a
    full ``Segment`` (or raises MalformedPacket for a bad one). IPv4 and IPv6
    datagrams may be mixed: ``version`` says which each is (0 for a bad
    one), and ``src``/``dst`` (IPv4 host-order ints) are 0 for IPv6 ones,
    whose addresses ``batch[i]`` gives.
    """
    cdef readonly Py_ssize_t capacity
    cdef readonly Py_ssize_t stride
    cdef readonly Py_ssize_t count
    cdef readonly Py_ssize_t good
    cdef int verify
    cdef uint8_t *_buf
    cdef uint32_t *_lens
    cdef fp_segment *_segs
    cdef int32_t *_status
    cdef object _arrays        # dict name -> array.array
    cdef uint32_t *_src
    cdef uint32_t *_dst
    cdef uint16_t *_sport
    cdef uint16_t *_dport
    cdef uint32_t *_seq
    cdef uint32_t *_ack
    cdef uint16_t *_flags
    cdef uint16_t *_window
    cdef uint32_t *_plen
    cdef uint16_t *_mss
    cdef uint32_t *_tsval
    cdef uint8_t *_version

    def __cinit__(self, Py_ssize_t capacity=1024, Py_ssize_t stride=2048, bint verify=True):
        if capacity <= 0 or stride < 60 or stride > 65535:
            raise ValueError("capacity must be positive and stride within 60..65535")
        self.capacity, self.stride, self.verify = capacity, stride, (
            FP_VERIFY_IP | FP_VERIFY_TCP if verify else 0)
        self._buf = <uint8_t *>PyMem_Malloc(_area(capacity, stride, "ParsedBatch"))
        self._lens = <uint32_t *>PyMem_Malloc(_area(capacity, sizeof(uint32_t), "ParsedBatch"))
        self._segs = <fp_segment *>PyMem_Malloc(_area(capacity, sizeof(fp_segment),
                                                      "ParsedBatch"))
        if self._buf == NULL or self._lens == NULL or self._segs == NULL:
            raise MemoryError()
        import array as _array
        self._arrays = {name: _array.array(code, bytes(_array.array(code).itemsize * capacity))
                        for name, code in _COLUMNS}
        self._status = <int32_t *>_addr_of(self._arrays["status"])
        self._src = <uint32_t *>_addr_of(self._arrays["src"])
        self._dst = <uint32_t *>_addr_of(self._arrays["dst"])
        self._sport = <uint16_t *>_addr_of(self._arrays["sport"])
        self._dport = <uint16_t *>_addr_of(self._arrays["dport"])
        self._seq = <uint32_t *>_addr_of(self._arrays["seq"])
        self._ack = <uint32_t *>_addr_of(self._arrays["ack"])
        self._flags = <uint16_t *>_addr_of(self._arrays["flags"])
        self._window = <uint16_t *>_addr_of(self._arrays["window"])
        self._plen = <uint32_t *>_addr_of(self._arrays["payload_length"])
        self._mss = <uint16_t *>_addr_of(self._arrays["mss"])
        self._tsval = <uint32_t *>_addr_of(self._arrays["ts_val"])
        self._version = <uint8_t *>_addr_of(self._arrays["version"])

    def __dealloc__(self):
        PyMem_Free(self._buf)
        PyMem_Free(self._lens)
        PyMem_Free(self._segs)

    cdef Py_ssize_t _parse(self, Py_ssize_t count) noexcept nogil:
        cdef Py_ssize_t i
        cdef fp_segment *s
        cdef fp_segment6 s6
        cdef const uint8_t *d
        cdef size_t n
        cdef long good = 0
        for i in range(count):
            s = &self._segs[i]
            d = self._buf + i * self.stride
            n = min(<size_t>self._lens[i], <size_t>self.stride)
            if n and d[0] >> 4 == 6:
                self._status[i] = fp_segment6_parse(d, n, self.verify, &s6)
                memset(&s.ip, 0, sizeof(fp_ipv4))
                s.tcp = s6.tcp
                s.payload = s6.payload
                s.payload_len = s6.payload_len
                self._version[i] = 6
            else:
                self._status[i] = fp_segment_parse(d, n, self.verify, s)
                self._version[i] = 4
            good += self._status[i] == 0
            if self._status[i] != 0:
                memset(s, 0, sizeof(fp_segment))
                self._version[i] = 0
            self._src[i] = s.ip.saddr
            self._dst[i] = s.ip.daddr
            self._sport[i] = s.tcp.sport
            self._dport[i] = s.tcp.dport
            self._seq[i] = s.tcp.seq
            self._ack[i] = s.tcp.ack
            self._flags[i] = s.tcp.flags
            self._window[i] = s.tcp.window
            self._plen[i] = s.payload_len
            self._mss[i] = s.tcp.opts.mss if s.tcp.opts.present & FP_OPT_MSS else 0
            self._tsval[i] = s.tcp.opts.ts_val if s.tcp.opts.present & FP_OPT_TIMESTAMP else 0
        self.count = count
        self.good = good
        return good

    def parse_from(self, const uint8_t[::1] data not None, Py_ssize_t stride,
                   const uint32_t[::1] lens not None):
        """Copy len(lens) datagrams, one every ``stride`` bytes of data, and
        parse them. Returns how many parsed."""
        cdef Py_ssize_t count = lens.shape[0], i, n
        if count > self.capacity:
            raise ValueError(f"at most {self.capacity} datagrams")
        if stride < 0:
            raise ValueError("stride must not be negative")
        if count and _span(count, stride, min(lens[count - 1], stride),
                           "ParsedBatch.parse_from") > data.shape[0]:
            raise ValueError("data is too short for those lengths")
        with nogil:
            for i in range(count):
                n = min(<Py_ssize_t>lens[i], stride, self.stride)
                memcpy(self._buf + i * self.stride, &data[0] + i * stride, n)
                self._lens[i] = <uint32_t>n
            n = self._parse(count)
        return n

    def column(self, str name):
        """One column as a zero-copy memoryview of the first ``count`` rows."""
        return memoryview(self._arrays[name])[:self.count]

    def __len__(self):
        return self.count

    def __getitem__(self, Py_ssize_t i):
        if i < 0:
            i += self.count
        if not 0 <= i < self.count:
            raise IndexError("datagram index out of range")
        data = PyBytes_FromStringAndSize(<char *>self._buf + i * self.stride, self._lens[i])
        return _parse(data, self.verify)

    def reason(self, Py_ssize_t i):
        """None for a good datagram, else the MalformedPacket reason name."""
        if not 0 <= i < self.count:
            raise IndexError("datagram index out of range")
        return None if self._status[i] == 0 else fp_reason_name(self._status[i]).decode()


cdef void *_addr_of(object arr) except NULL:
    cdef const uint8_t[::1] view = memoryview(arr).cast("B")
    return <void *>&view[0]


# ---------------------------------------------------------------- build

cdef int _fill_headers(fp_ipv4 *ip, fp_tcp *tcp, src, dst, uint16_t sport, uint16_t dport,
                       uint32_t seq, uint32_t ack, uint16_t flags, uint16_t window,
                       TCPOptions options, uint8_t ttl, uint16_t ip_id, uint8_t tos, bint df,
                       uint16_t urgent) except -1:
    memset(ip, 0, sizeof(fp_ipv4))
    memset(tcp, 0, sizeof(fp_tcp))
    _addr(src, &ip.saddr)
    _addr(dst, &ip.daddr)
    ip.ttl = ttl
    ip.id = ip_id
    ip.tos = tos
    ip.frag = FP_IP_DF if df else 0
    ip.proto = 6
    tcp.sport = sport
    tcp.dport = dport
    tcp.seq = seq
    tcp.ack = ack
    tcp.flags = flags & 0xfff
    tcp.window = window
    tcp.urg = urgent
    if options is not None:
        tcp.opts = options.o
    return 0


cdef int _fill_headers6(fp_ipv6 *ip, fp_tcp *tcp, src, dst, uint16_t sport, uint16_t dport,
                        uint32_t seq, uint32_t ack, uint16_t flags, uint16_t window,
                        TCPOptions options, uint8_t hop_limit, uint16_t ip_id, uint8_t tclass,
                        uint32_t flow_label, uint16_t urgent) except -1:
    if ip_id:
        raise ValueError("IPv6 has no identification field: ip_id is for IPv4")
    if flow_label > 0xfffff:
        raise ValueError(f"an IPv6 flow label has 20 bits: {flow_label}")
    memset(ip, 0, sizeof(fp_ipv6))
    memset(tcp, 0, sizeof(fp_tcp))
    _addr6(src, ip.saddr)
    _addr6(dst, ip.daddr)
    ip.hop_limit = hop_limit
    ip.tclass = tclass
    ip.flow = flow_label
    tcp.sport = sport
    tcp.dport = dport
    tcp.seq = seq
    tcp.ack = ack
    tcp.flags = flags & 0xfff
    tcp.window = window
    tcp.urg = urgent
    if options is not None:
        tcp.opts = options.o
    return 0


def build(src, dst, uint16_t sport, uint16_t dport, uint32_t seq=0, uint32_t ack=0,
          uint16_t flags=Flags.SYN, uint16_t window=65535, TCPOptions options=None,
          const uint8_t[::1] payload=None, uint8_t ttl=64, uint16_t ip_id=0, uint8_t tos=0,
          bint df=True, uint16_t urgent=0, const uint8_t[::1] ip_options=None,
          uint32_t flow_label=0):
    """Build one IPv4/TCP datagram with both checksums, or, when src and dst
    are IPv6 addresses, one IPv6/TCP datagram (no extension headers; ``ttl``
    is its hop limit, ``tos`` its traffic class, ``flow_label`` its flow
    label; IPv6 has no ``ip_id`` nor header options, and never fragments in
    flight, so ``df`` has no field to set); returns bytes."""
    cdef fp_ipv4 ip
    cdef fp_ipv6 ip6
    cdef fp_tcp tcp
    cdef Py_ssize_t plen = payload.shape[0] if payload is not None else 0
    cdef const uint8_t *pptr = &payload[0] if plen else NULL
    cdef int version = _family(src, dst)
    if version == 6:
        if ip_options is not None and ip_options.shape[0]:
            raise ValueError("IPv6 has no header options (extension headers are not built)")
        _fill_headers6(&ip6, &tcp, src, dst, sport, dport, seq, ack, flags, window, options,
                       ttl, ip_id, tos, flow_label, urgent)
    else:
        if flow_label:
            raise ValueError("a flow label is IPv6's: the addresses are IPv4")
        _fill_headers(&ip, &tcp, src, dst, sport, dport, seq, ack, flags, window, options,
                      ttl, ip_id, tos, df, urgent)
    if version == 4 and ip_options is not None and ip_options.shape[0]:
        if ip_options.shape[0] > 40:
            raise _error(-FP_E_IP_OPTIONS, "build")
        ip.options = &ip_options[0]
        ip.options_len = <uint8_t>ip_options.shape[0]
    cdef Py_ssize_t cap = 120 + plen
    cdef uint8_t stackbuf[1600]
    cdef uint8_t *buf = stackbuf
    if cap > 1600:
        buf = <uint8_t *>PyMem_Malloc(cap)
        if buf == NULL:
            raise MemoryError()
    cdef int n
    try:
        if version == 6:
            n = fp_segment6_build(buf, <size_t>cap, &ip6, &tcp, pptr, <size_t>plen)
        else:
            n = fp_segment_build(buf, <size_t>cap, &ip, &tcp, pptr, <size_t>plen)
        if n < 0:
            raise _error(n, "build")
        return PyBytes_FromStringAndSize(<char *>buf, n)
    finally:
        if buf != stackbuf:
            PyMem_Free(buf)


cdef class SegmentBatch:
    """A reusable buffer of up to ``capacity`` datagrams, one every ``stride``
    bytes, built in one C call and sent in one sendmmsg loop."""
    cdef readonly Py_ssize_t capacity
    cdef readonly Py_ssize_t stride
    cdef Py_ssize_t count
    cdef bytearray _buf
    cdef uint8_t *_ptr
    cdef uint32_t *_lens

    def __cinit__(self, Py_ssize_t capacity, Py_ssize_t stride=2048):
        if capacity <= 0 or stride < 40 or stride > 65535:
            raise ValueError("capacity must be positive and stride within 40..65535")
        self.capacity = capacity
        self.stride = stride
        self.count = 0
        self._buf = bytearray(_area(capacity, stride, "SegmentBatch"))
        self._ptr = <uint8_t *>PyByteArray_AS_STRING(self._buf)
        self._lens = <uint32_t *>PyMem_Malloc(_area(capacity, sizeof(uint32_t), "SegmentBatch"))
        if self._lens == NULL:
            raise MemoryError()

    def __dealloc__(self):
        PyMem_Free(self._lens)

    def fill(self, Py_ssize_t count, src, dst, uint16_t sport, uint16_t dport,
             uint32_t seq=0, uint32_t ack=0, uint16_t flags=Flags.SYN,
             uint16_t window=65535, TCPOptions options=None,
             const uint8_t[::1] payloads=None, Py_ssize_t payload_len=0,
             uint8_t ttl=64, uint16_t ip_id=0, uint8_t tos=0, bint df=True,
             const uint16_t[::1] sports=None, const uint16_t[::1] dports=None,
             const uint32_t[::1] seqs=None, const uint8_t[::1] ttls=None,
             const uint32_t[::1] saddrs=None, const uint32_t[::1] daddrs=None):
        """Build ``count`` segments from one template in one C call.

        Segment i carries payloads[i*payload_len:(i+1)*payload_len] (a stream
        chopped into equal segments; seq advances by payload_len unless seqs is
        given) and takes sports[i], dports[i], seqs[i], ttls[i], saddrs[i],
        daddrs[i] (host-order ints) from whichever arrays are given. Returns count.
        With IPv6 src and dst the segments are IPv6 (ttls are hop limits; one
        address pair for the batch, so no saddrs/daddrs; ip_id must be 0).
        """
        cdef fp_ipv4 ip
        cdef fp_ipv6 ip6
        cdef fp_tcp tcp
        cdef fp_batch_vary vary
        cdef fp_batch_vary6 vary6
        if not 0 <= count <= self.capacity:
            raise ValueError(f"count must be within 0..{self.capacity}")
        # what varies per segment, checked alike for both families
        cdef const uint16_t *sp = _vary16(sports, count, "sports")
        cdef const uint16_t *dp = _vary16(dports, count, "dports")
        cdef const uint32_t *sq = _vary32(seqs, count, "seqs")
        cdef const uint8_t *tl = _vary8(ttls, count, "ttls")
        if _family(src, dst) == 6:
            if saddrs is not None or daddrs is not None:
                raise ValueError("saddrs/daddrs are IPv4 ints: an IPv6 batch has one address pair")
            _fill_headers6(&ip6, &tcp, src, dst, sport, dport, seq, ack, flags, window,
                           options, ttl, ip_id, tos, 0, 0)
            memset(&vary6, 0, sizeof(vary6))
            vary6.sports, vary6.dports, vary6.seqs, vary6.hop_limits = sp, dp, sq, tl
            return self._finish(count, payloads, payload_len, NULL, NULL, &ip6, &tcp, &vary6)
        _fill_headers(&ip, &tcp, src, dst, sport, dport, seq, ack, flags, window, options,
                      ttl, ip_id, tos, df, 0)
        memset(&vary, 0, sizeof(vary))
        vary.sports, vary.dports, vary.seqs, vary.ttls = sp, dp, sq, tl
        vary.saddrs = _vary32(saddrs, count, "saddrs")
        vary.daddrs = _vary32(daddrs, count, "daddrs")
        return self._finish(count, payloads, payload_len, &ip, &vary, NULL, &tcp, NULL)

    cdef Py_ssize_t _finish(self, Py_ssize_t count, const uint8_t[::1] payloads,
                            Py_ssize_t payload_len, fp_ipv4 *ip, fp_batch_vary *vary,
                            fp_ipv6 *ip6, fp_tcp *tcp, fp_batch_vary6 *vary6) except -1:
        """The C batch build of either family (ip or ip6 given)."""
        cdef const uint8_t *pptr = NULL
        if payload_len < 0:
            raise ValueError("payload_len must not be negative")
        if payload_len:
            if payloads is None or payloads.shape[0] < _area(count, payload_len,
                                                             "SegmentBatch.fill"):
                raise ValueError("payloads must hold count * payload_len bytes")
            if count:
                pptr = &payloads[0]
        cdef long rc
        with nogil:
            if ip6 != NULL:
                rc = fp_segment6_build_batch(self._ptr, <size_t>self.stride, <size_t>count,
                                             ip6, tcp, pptr, <size_t>payload_len, vary6,
                                             self._lens)
            else:
                rc = fp_segment_build_batch(self._ptr, <size_t>self.stride, <size_t>count,
                                            ip, tcp, pptr, <size_t>payload_len, vary,
                                            self._lens)
        if rc < 0:
            self.count = 0
            raise _error(rc, "build")
        self.count = count
        return count

    def __len__(self):
        return self.count

    def __getitem__(self, Py_ssize_t i):
        if i < 0:
            i += self.count
        if not 0 <= i < self.count:
            raise IndexError("segment index out of range")
        return PyBytes_FromStringAndSize(<char *>self._ptr + i * self.stride, self._lens[i])

    @property
    def lengths(self):
        return [self._lens[i] for i in range(self.count)]

    @property
    def buffer(self):
        """The whole underlying buffer (capacity * stride bytes)."""
        return memoryview(self._buf)


cdef int _need(Py_ssize_t have, Py_ssize_t count, str name) except -1:
    if have < count:
        raise ValueError(f"{name} has {have} entries, fewer than count={count}")
    return 0


cdef const uint16_t *_vary16(const uint16_t[::1] a, Py_ssize_t count, str what) except? NULL:
    """A per-segment array of a batch (None: not varied), checked to hold count."""
    if a is None:
        return NULL
    _need(a.shape[0], count, what)
    return &a[0] if count else NULL


cdef const uint32_t *_vary32(const uint32_t[::1] a, Py_ssize_t count, str what) except? NULL:
    if a is None:
        return NULL
    _need(a.shape[0], count, what)
    return &a[0] if count else NULL


cdef const uint8_t *_vary8(const uint8_t[::1] a, Py_ssize_t count, str what) except? NULL:
    if a is None:
        return NULL
    _need(a.shape[0], count, what)
    return &a[0] if count else NULL


# ---------------------------------------------------------------- flow tracking

cdef class FlowTracker:
    """Sequence-number state of one crafted TCP flow (RFC 9293 names).

    Feed it every segment of the flow received with input(); it says what
    happened and which segment (if any) to send back.
    """
    cdef fp_flow f

    def __init__(self, uint32_t iss, uint32_t rcv_wnd=65535, wscale=7):
        cdef int ws = -1 if wscale is None else wscale
        cdef int rc = fp_flow_init(&self.f, iss, rcv_wnd, ws)
        if rc < 0:
            raise ValueError("wscale must be None or 0..14")

    def syn_sent(self):
        """We send our SYN now; returns its numbers."""
        cdef fp_reply r
        if fp_flow_syn_sent(&self.f, &r) < 0:
            raise _errors.LocalProtocolError(
                f"cannot send a SYN in state {FlowState(self.f.state).name}")
        return _reply(&r)

    def assume_syn(self, uint32_t irs, uint16_t window=65535, wscale=None):
        """The peer's SYN is known out of band (its exchanged ISN): move to
        SYN-RECEIVED and return the SYN-ACK to send."""
        cdef fp_reply r
        cdef int ws = -1 if wscale is None else wscale
        if fp_flow_assume_syn(&self.f, irs, window, ws, &r) < 0:
            raise _errors.LocalProtocolError(
                f"cannot assume a SYN in state {FlowState(self.f.state).name}")
        return _reply(&r)

    def input(self, Segment seg not None):
        """Process a received segment: returns (FlowEvent, Reply or None)."""
        cdef fp_reply r
        cdef int action = 0
        cdef int ev = fp_flow_input(&self.f, &seg.s.tcp, seg.s.payload_len, &action, &r)
        return FlowEvent(ev), (_reply(&r) if action == FP_ACT_SEND else None)

    def ack(self):
        cdef fp_reply r
        fp_flow_ack(&self.f, &r)
        return _reply(&r)

    def send(self, uint32_t length, bint fin=False):
        """We send ``length`` bytes (and FIN when ``fin``): returns the segment's
        numbers and advances snd_nxt past it. Only once ESTABLISHED."""
        cdef fp_reply r
        if fp_flow_send(&self.f, length, fin, &r) < 0:
            raise _errors.LocalProtocolError(
                f"cannot send data in state {FlowState(self.f.state).name}")
        return _reply(&r)

    @property
    def state(self):
        return FlowState(self.f.state)

    @property
    def iss(self):
        return self.f.iss

    @property
    def irs(self):
        return self.f.irs

    @property
    def snd_una(self):
        return self.f.snd_una

    @property
    def snd_nxt(self):
        return self.f.snd_nxt

    @property
    def snd_wnd(self):
        """Peer's receive window in bytes (scaled)."""
        return self.f.snd_wnd

    @property
    def rcv_nxt(self):
        return self.f.rcv_nxt

    @property
    def rcv_wnd(self):
        return self.f.rcv_wnd

    @property
    def snd_wscale(self):
        return self.f.snd_wscale

    @property
    def rcv_wscale(self):
        return self.f.rcv_wscale

    @property
    def wscale_ok(self):
        return bool(self.f.wscale_ok)

    def __repr__(self):
        return (f"<FlowTracker {self.state.name} iss={self.f.iss} irs={self.f.irs} "
                f"snd_una={self.f.snd_una} snd_nxt={self.f.snd_nxt} rcv_nxt={self.f.rcv_nxt}>")


def rst_for(Segment seg not None):
    """The RST answering an unwanted segment (RFC 9293 §3.10.7.1)."""
    cdef fp_reply r
    fp_rst_for(&seg.s.tcp, seg.s.payload_len, &r)
    return _reply(&r)


# ---------------------------------------------------------------- raw sockets

#: SO_MARK the engine puts on its own segments so that RST-suppression rules
#: (fastpunch.netfilter.RstSuppression) drop the kernel's RSTs and not ours.
ENGINE_MARK = 0x46500001


cdef int _version_of(object family) except -1:
    """4 or 6 from 4, 6, socket.AF_INET or socket.AF_INET6."""
    if family in (4, AF_INET):
        return 4
    if family in (6, AF_INET6):
        return 6
    raise ValueError(f"family must be 4, 6, AF_INET or AF_INET6, not {family!r}")


cdef class _RawSocket:
    """What both raw sockets share: one descriptor, closed exactly once."""
    cdef int fd
    cdef readonly int version      # 4 or 6: the IP version it sends or sees

    def __cinit__(self, *args, **kwargs):
        self.fd = -1

    def __dealloc__(self):
        if self.fd >= 0:
            close(self.fd)

    def fileno(self):
        return self.fd

    cdef int _check_open(self) except -1:
        if self.fd < 0:
            raise ValueError("raw socket is closed")
        return 0

    def close(self):
        if self.fd >= 0:
            close(self.fd)
            self.fd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


cdef class RawSender(_RawSocket):
    """Non-blocking IP_HDRINCL raw socket; each datagram goes to the address in
    its own header. ``family`` 6: an IPv6 one (IPPROTO_RAW, on which Linux
    sets IPV6_HDRINCL), for IPv6 datagrams. Needs CAP_NET_RAW; ``mark``
    (SO_MARK, 0 for none) needs CAP_NET_ADMIN."""

    def __cinit__(self, int sndbuf=0, uint32_t mark=0, family=4):
        self.version = _version_of(family)
        cdef int fd = (fp_raw6_open_send(sndbuf, mark) if self.version == 6
                       else fp_raw_open_send(sndbuf, mark))
        if fd == FP_RAW_MARK_DENIED:
            raise _errors.InsufficientPrivilegeError("CAP_NET_ADMIN", "marking raw packets (SO_MARK)")
        if fd < 0:
            raise _error(fd, "raw-socket")
        self.fd = fd

    def send(self, bytes datagram not None):
        """Send one datagram; returns 1, or raises (BlockingIOError when full)."""
        self._check_open()
        cdef uint32_t n = <uint32_t>PyBytes_GET_SIZE(datagram)
        cdef const uint8_t *d = <const uint8_t *>PyBytes_AS_STRING(datagram)
        if not n or d[0] >> 4 != self.version:
            raise ValueError(f"an IPv{self.version} sender sends IPv{self.version} datagrams")
        cdef long rc = fp_raw_send_each(self.fd, d, n, &n, 1)
        if rc < 0:
            raise _error(rc, "raw-send")
        return rc

    def send_batch(self, SegmentBatch batch not None, Py_ssize_t start=0, Py_ssize_t count=-1):
        """sendmmsg the batch's segments [start, start+count); returns how many
        the kernel took (short when the socket buffer fills)."""
        return self._send(batch, start, count, True)

    def send_each(self, SegmentBatch batch not None, Py_ssize_t start=0, Py_ssize_t count=-1):
        """The same with one sendto(2) per segment: the baseline for send_batch."""
        return self._send(batch, start, count, False)

    cdef long _send(self, SegmentBatch batch, Py_ssize_t start, Py_ssize_t count,
                    bint batched) except -1:
        self._check_open()
        if count < 0:
            count = batch.count - start
        if start < 0 or count < 0 or start + count > batch.count:
            raise ValueError("start/count outside the batch")
        cdef long rc
        cdef const uint8_t *base = batch._ptr + start * batch.stride
        if count and base[0] >> 4 != self.version:
            raise ValueError(f"an IPv{self.version} sender sends IPv{self.version} datagrams")
        with nogil:
            if batched:
                rc = fp_raw_send_batch(self.fd, base, <size_t>batch.stride,
                                       batch._lens + start, <size_t>count)
            else:
                rc = fp_raw_send_each(self.fd, base, <size_t>batch.stride,
                                      batch._lens + start, <size_t>count)
        if rc < 0:
            raise _error(rc, "raw-send")
        return rc


cdef class RawReceiver(_RawSocket):
    """Non-blocking raw TCP receive socket that sees only one flow's segments
    (a classic BPF filter on the 4-tuple; None/0 are wildcards), or with
    ``matches`` (up to 16 ``(src, dst, sport, dport)`` clauses) the segments
    of any of several: one socket for every crafted flow of a punch. Use
    fileno() with loop.add_reader(). Needs CAP_NET_RAW.

    IPv6 addresses (or ``family=6`` with no address given) make it an IPv6
    receiver: an AF_PACKET socket for ETH_P_IPV6 (a raw AF_INET6 socket
    never shows its reader the IPv6 header: docs/engine.md), whose filter
    also refuses the kernel's copies of what this host sends; it yields
    whole IPv6 datagrams, which parse() and ParsedBatch read."""
    cdef Py_ssize_t capacity, stride
    cdef uint8_t *_buf
    cdef uint32_t *_lens

    def __cinit__(self, src=None, dst=None, uint16_t sport=0, uint16_t dport=0, int rcvbuf=0,
                  Py_ssize_t capacity=64, Py_ssize_t stride=2048, matches=None, family=None):
        cdef uint32_t s = 0, d = 0
        if matches is not None:
            matches = list(matches)            # (once: a generator would be used up here)
        addrs = [a for a in ([src, dst] if matches is None else
                             [x for clause in matches for x in tuple(clause)[:2]])
                 if a is not None]
        v6 = [_is_v6(a) for a in addrs]
        if any(v6) and not all(v6):
            raise ValueError("a receiver's addresses are all IPv4 or all IPv6")
        self.version = 6 if (v6 and v6[0]) else 4
        if family is not None:
            if addrs and _version_of(family) != self.version:
                raise ValueError(f"family {family!r} but IPv{self.version} addresses")
            self.version = _version_of(family)
        if capacity <= 0 or stride < 60:
            raise ValueError("capacity must be positive and stride at least 60")
        if self.version == 6:
            self._open6(src, dst, sport, dport, rcvbuf, capacity, stride, matches)
            return
        if src is not None:
            _addr(src, &s)
        if dst is not None:
            _addr(dst, &d)
        if capacity <= 0 or stride < 60:
            raise ValueError("capacity must be positive and stride at least 60")
        self.capacity = capacity
        self.stride = stride
        self._buf = <uint8_t *>PyMem_Malloc(_area(capacity, stride, "RawReceiver"))
        self._lens = <uint32_t *>PyMem_Malloc(_area(capacity, sizeof(uint32_t), "RawReceiver"))
        if self._buf == NULL or self._lens == NULL:
            raise MemoryError()
        cdef fp_match clauses[16]
        cdef int n = 1, fd
        if matches is None:
            clauses[0].saddr, clauses[0].daddr = s, d
            clauses[0].sport, clauses[0].dport = sport, dport
        else:
            if src is not None or dst is not None or sport or dport:
                raise ValueError("give either matches or src/dst/sport/dport, not both")
            matches = list(matches)
            if not 1 <= len(matches) <= FP_MAX_MATCHES:
                raise ValueError(f"matches: 1 to {FP_MAX_MATCHES} (src, dst, sport, dport) "
                                 f"clauses, not {len(matches)}")
            n = len(matches)
            for i, clause in enumerate(matches):
                c_src, c_dst, c_sport, c_dport = clause
                clauses[i].saddr = clauses[i].daddr = 0
                if c_src is not None:
                    _addr(c_src, &clauses[i].saddr)
                if c_dst is not None:
                    _addr(c_dst, &clauses[i].daddr)
                if not (0 <= (c_sport or 0) <= 65535 and 0 <= (c_dport or 0) <= 65535):
                    raise ValueError(f"matches[{i}]: ports are 0..65535")
                clauses[i].sport, clauses[i].dport = c_sport or 0, c_dport or 0
        fd = fp_raw_open_recv_any(clauses, n, rcvbuf)
        if fd < 0:
            raise _error(fd, "raw-socket")
        self.fd = fd

    cdef int _open6(self, src, dst, uint16_t sport, uint16_t dport, int rcvbuf,
                    Py_ssize_t capacity, Py_ssize_t stride, matches) except -1:
        self.capacity = capacity
        self.stride = stride
        self._buf = <uint8_t *>PyMem_Malloc(_area(capacity, stride, "RawReceiver"))
        self._lens = <uint32_t *>PyMem_Malloc(_area(capacity, sizeof(uint32_t), "RawReceiver"))
        if self._buf == NULL or self._lens == NULL:
            raise MemoryError()
        cdef fp_match6 clauses[16]
        memset(clauses, 0, sizeof(clauses))
        if matches is None:
            matches = [(src, dst, sport, dport)]
        elif src is not None or dst is not None or sport or dport:
            raise ValueError("give either matches or src/dst/sport/dport, not both")
        matches = list(matches)
        if not 1 <= len(matches) <= FP_MAX_MATCHES:
            raise ValueError(f"matches: 1 to {FP_MAX_MATCHES} (src, dst, sport, dport) "
                             f"clauses, not {len(matches)}")
        for i, clause in enumerate(matches):
            c_src, c_dst, c_sport, c_dport = clause
            if c_src is not None:
                _addr6(c_src, clauses[i].saddr)
            if c_dst is not None:
                _addr6(c_dst, clauses[i].daddr)
            if not (0 <= (c_sport or 0) <= 65535 and 0 <= (c_dport or 0) <= 65535):
                raise ValueError(f"matches[{i}]: ports are 0..65535")
            clauses[i].sport, clauses[i].dport = c_sport or 0, c_dport or 0
        cdef int fd = fp_raw6_open_recv_any(clauses, len(matches), rcvbuf)
        if fd < 0:
            raise _error(fd, "raw-socket")
        self.fd = fd
        return 0

    def __dealloc__(self):          # the base class closes the descriptor
        PyMem_Free(self._buf)
        PyMem_Free(self._lens)

    def recv_many(self):
        """Every datagram waiting (up to capacity), as a list of bytes; [] if none."""
        self._check_open()
        cdef long n
        with nogil:
            n = fp_raw_recv_batch(self.fd, self._buf, <size_t>self.stride, self._lens,
                                  <size_t>self.capacity)
        if n < 0:
            raise _error(n, "raw-recv")
        return [PyBytes_FromStringAndSize(<char *>self._buf + i * self.stride, self._lens[i])
                for i in range(n)]

    def recv_into(self, ParsedBatch batch not None):
        """recvmmsg straight into ``batch``'s buffer and parse everything in C.
        Returns how many datagrams arrived (0 when none is waiting); see
        ``batch.good`` and ``batch.column("status")`` for which parsed."""
        self._check_open()
        cdef long n
        with nogil:
            n = fp_raw_recv_batch(self.fd, batch._buf, <size_t>batch.stride, batch._lens,
                                  <size_t>batch.capacity)
            if n >= 0:
                batch._parse(n)
        if n < 0:
            raise _error(n, "raw-recv")
        return n
