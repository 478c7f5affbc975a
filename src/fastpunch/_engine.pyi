"""Type stubs for the native module fastpunch._engine (see _engine.pyx)."""

import enum
from ipaddress import IPv4Address, IPv6Address
from typing import NamedTuple, Optional, Sequence, Tuple, Union

from typing_extensions import Buffer, disjoint_base

_Address = Union[str, int, IPv4Address]
# build(), tcp_checksum(), SegmentBatch.fill() and RawReceiver take IPv6 too
_Address46 = Union[str, int, bytes, IPv4Address, IPv6Address]

ENGINE_MARK: int

class Flags(enum.IntFlag):
    FIN = 1
    SYN = 2
    RST = 4
    PSH = 8
    ACK = 16
    URG = 32
    ECE = 64
    CWR = 128
    AE = 256

class FlowState(enum.IntEnum):
    CLOSED = 0
    SYN_SENT = 1
    SYN_RECEIVED = 2
    ESTABLISHED = 3
    RESET = 4

class FlowEvent(enum.IntEnum):
    NONE = 0
    ESTABLISHED = 1
    RESET = 2
    UNACCEPTABLE = 3
    BAD_ACK = 4
    IGNORED = 5
    SYN_RETRANSMIT = 6

class Reply(NamedTuple):
    flags: int
    seq: int
    ack: int
    window: int

def reason_name(code: int) -> str: ...
def flags_str(flags: int) -> str: ...
def ip_to_int(a: _Address) -> int: ...
def int_to_ip(a: int) -> str: ...
def checksum(data: Buffer) -> int: ...
def tcp_checksum(src: _Address46, dst: _Address46, segment: Buffer) -> int: ...
def checksum_update(check: int, old: int, new: int, width: int = 16) -> int: ...
def checksum_many(data: Buffer, stride: int, length: int, out: Buffer) -> None: ...
def seq_before(a: int, b: int) -> bool: ...
def seq_after(a: int, b: int) -> bool: ...
def seq_between(x: int, lo: int, hi: int) -> bool: ...
def seq_acceptable(rcv_nxt: int, rcv_wnd: int, seq: int, seg_len: int) -> bool: ...

@disjoint_base
class TCPOptions:
    def __init__(
        self,
        *,
        mss: Optional[int] = None,
        wscale: Optional[int] = None,
        sack_permitted: bool = False,
        timestamp: Optional[Tuple[int, int]] = None,
        sack: Sequence[Tuple[int, int]] = (),
    ) -> None: ...
    @staticmethod
    def decode(data: Buffer) -> "TCPOptions": ...
    def encode(self) -> bytes: ...
    @property
    def mss(self) -> Optional[int]: ...
    @property
    def wscale(self) -> Optional[int]: ...
    @property
    def sack_permitted(self) -> bool: ...
    @property
    def timestamp(self) -> Optional[Tuple[int, int]]: ...
    @property
    def sack(self) -> Tuple[Tuple[int, int], ...]: ...
    @property
    def unknown(self) -> int: ...

@disjoint_base
class Segment:
    version: int
    family: int
    src: str
    dst: str
    src_int: int
    dst_int: int
    tos: int
    traffic_class: int
    flow_label: Optional[int]
    next_header: Optional[int]
    ext_header_length: int
    total_length: int
    ip_header_length: int
    ip_id: Optional[int]
    df: Optional[bool]
    ip_flags: Optional[int]
    ttl: int
    hop_limit: int
    ip_checksum: Optional[int]
    ip_options: bytes
    sport: int
    dport: int
    seq: int
    ack: int
    tcp_header_length: int
    flags: int
    flags_str: str
    window: int
    tcp_checksum: int
    urgent: int
    options: TCPOptions
    payload: bytes
    payload_length: int
    seg_len: int

def parse(data: Buffer, *, verify: bool = True) -> Segment: ...
def build(
    src: _Address46,
    dst: _Address46,
    sport: int,
    dport: int,
    seq: int = 0,
    ack: int = 0,
    flags: int = ...,
    window: int = 65535,
    options: Optional[TCPOptions] = None,
    payload: Optional[Buffer] = None,
    ttl: int = 64,
    ip_id: int = 0,
    tos: int = 0,
    df: bool = True,
    urgent: int = 0,
    ip_options: Optional[Buffer] = None,
    flow_label: int = 0,
) -> bytes: ...

@disjoint_base
class SegmentBatch:
    capacity: int
    stride: int
    def __init__(self, capacity: int, stride: int = 2048) -> None: ...
    def fill(
        self,
        count: int,
        src: _Address46,
        dst: _Address46,
        sport: int,
        dport: int,
        seq: int = 0,
        ack: int = 0,
        flags: int = ...,
        window: int = 65535,
        options: Optional[TCPOptions] = None,
        payloads: Optional[Buffer] = None,
        payload_len: int = 0,
        ttl: int = 64,
        ip_id: int = 0,
        tos: int = 0,
        df: bool = True,
        sports: Optional[Buffer] = None,
        dports: Optional[Buffer] = None,
        seqs: Optional[Buffer] = None,
        ttls: Optional[Buffer] = None,
        saddrs: Optional[Buffer] = None,
        daddrs: Optional[Buffer] = None,
    ) -> int: ...
    def __len__(self) -> int: ...
    def __getitem__(self, i: int, /) -> bytes: ...
    @property
    def lengths(self) -> list[int]: ...
    @property
    def buffer(self) -> memoryview: ...

@disjoint_base
class ParsedBatch:
    capacity: int
    stride: int
    count: int
    good: int
    def __init__(self, capacity: int = 1024, stride: int = 2048, verify: bool = True) -> None: ...
    def parse_from(self, data: Buffer, stride: int, lens: Buffer) -> int: ...
    def column(self, name: str) -> memoryview: ...
    def reason(self, i: int) -> Optional[str]: ...
    def __len__(self) -> int: ...
    def __getitem__(self, i: int, /) -> Segment: ...

@disjoint_base
class FlowTracker:
    def __init__(self, iss: int, rcv_wnd: int = 65535, wscale: Optional[int] = 7) -> None: ...
    def syn_sent(self) -> Reply: ...
    def assume_syn(self, irs: int, window: int = 65535, wscale: Optional[int] = None) -> Reply: ...
    def input(self, seg: Segment) -> Tuple[FlowEvent, Optional[Reply]]: ...
    def ack(self) -> Reply: ...
    def send(self, length: int, fin: bool = False) -> Reply: ...
    state: FlowState
    iss: int
    irs: int
    snd_una: int
    snd_nxt: int
    snd_wnd: int
    rcv_nxt: int
    rcv_wnd: int
    snd_wscale: int
    rcv_wscale: int
    wscale_ok: bool

def rst_for(seg: Segment) -> Reply: ...

class RawSender:
    version: int
    def __init__(self, sndbuf: int = 0, mark: int = 0, family: int = 4) -> None: ...
    def fileno(self) -> int: ...
    def send(self, datagram: bytes) -> int: ...
    def send_batch(self, batch: SegmentBatch, start: int = 0, count: int = -1) -> int: ...
    def send_each(self, batch: SegmentBatch, start: int = 0, count: int = -1) -> int: ...
    def close(self) -> None: ...
    def __enter__(self) -> "RawSender": ...
    def __exit__(self, *exc: object) -> None: ...

@disjoint_base
class RawReceiver:
    def __init__(
        self,
        src: Optional[_Address46] = None,
        dst: Optional[_Address46] = None,
        sport: int = 0,
        dport: int = 0,
        rcvbuf: int = 0,
        capacity: int = 64,
        stride: int = 2048,
        matches: Optional[Sequence[Tuple[Optional[_Address46], Optional[_Address46], int, int]]] = None,
        family: Optional[int] = None,
    ) -> None: ...
    version: int
    def fileno(self) -> int: ...
    def recv_many(self) -> list[bytes]: ...
    def recv_into(self, batch: ParsedBatch) -> int: ...
    def close(self) -> None: ...
    def __enter__(self) -> "RawReceiver": ...
    def __exit__(self, *exc: object) -> None: ...
