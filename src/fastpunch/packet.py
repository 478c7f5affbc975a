"""Build, parse and send IPv4/TCP segments: the Python face of the C engine.

>>> from fastpunch.packet import build, parse, Flags, TCPOptions
>>> syn = build("192.0.2.1", "198.51.100.2", 40000, 443, seq=1000, flags=Flags.SYN,
...             options=TCPOptions(mss=1460, wscale=7, sack_permitted=True))
>>> parse(syn).flags_str
'S'
"""

from fastpunch._engine import (
    ENGINE_MARK as ENGINE_MARK,
    Flags as Flags,
    FlowEvent as FlowEvent,
    FlowState as FlowState,
    FlowTracker as FlowTracker,
    ParsedBatch as ParsedBatch,
    RawReceiver as RawReceiver,
    RawSender as RawSender,
    Reply as Reply,
    Segment as Segment,
    SegmentBatch as SegmentBatch,
    TCPOptions as TCPOptions,
    build as build,
    checksum as checksum,
    checksum_many as checksum_many,
    checksum_update as checksum_update,
    flags_str as flags_str,
    int_to_ip as int_to_ip,
    ip_to_int as ip_to_int,
    parse as parse,
    reason_name as reason_name,
    rst_for as rst_for,
    seq_acceptable as seq_acceptable,
    seq_after as seq_after,
    seq_before as seq_before,
    seq_between as seq_between,
    tcp_checksum as tcp_checksum,
)
from fastpunch.errors import MalformedPacket as MalformedPacket
from fastpunch.errors import PacketBuildError as PacketBuildError

__all__ = [
    "ENGINE_MARK", "Flags", "FlowEvent", "FlowState", "FlowTracker", "MalformedPacket", "PacketBuildError", "ParsedBatch",
    "RawReceiver", "RawSender", "Reply", "Segment", "SegmentBatch", "TCPOptions", "build",
    "checksum", "checksum_many", "checksum_update", "flags_str", "int_to_ip", "ip_to_int",
    "parse", "reason_name", "rst_for", "seq_acceptable", "seq_after", "seq_before",
    "seq_between", "tcp_checksum",
]
