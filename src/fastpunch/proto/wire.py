"""The CCS wire format: versioned, length-prefixed frames of typed fields.

    frame  = version:u8  type:u8  length:u16   payload[length]     (length <= MAX_FRAME)
    field  = id:u8  length:u16  value[length]                       (per-field caps)

Every message is a frozen dataclass; its fields, their wire ids, kinds and
size caps are data (``FIELDS``), so encoding, decoding and validation are one
loop each. Decoding refuses, with a stable error code, anything malformed,
oversized, unknown, duplicated or missing. No I/O here.

Versions. Version 2 adds candidates and NAT evidence to the
next-connection info, a session id to RendezvousReady, a second probe port
to AuthOk, and the messages Abandon and PeerLeft. Version 3 adds the
keepalive period a CCS advertises in AuthOk. Version 4 adds relay-first:
A asks for it ("yes" or "auto") in RendezvousRequest, and the CCS says in both Readys
whether the rendezvous is relay-first (both sides join the relay at once,
the punch goes on behind it). Version 5 adds IPv6: every address field
takes 4 or 16 bytes (an IPv4 address is 4 bytes in every version, so a
version-4 peer reads them as before; a 16-byte one is refused in a frame of
an earlier version), and AuthOk carries ``probe_token`` (the device's
"who am I" probes carry it, so the CCS learns, from a connection the device
made itself, the address it has in the family it did not log in over) and
``alt_addr`` (the CCS's address in that other family). A field or message
carries the version it appeared in (``since``); a frame of version N may not
hold a field of a later version (``unknown-field``, as a version-N decoder
would say), and ``encode(msg, N)`` leaves later fields out, so a CCS speaks
version N to a device that said Hello in version N.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import socket
import struct
from dataclasses import dataclass
from typing import Any, ClassVar, Optional

from fastpunch.errors import RemoteProtocolError
from fastpunch.proto import candidates as _candidates

__all__ = ["VERSION", "MAX_FRAME", "WireError", "Message", "encode", "decode_frame", "MESSAGES",
           "fit"]

VERSION = 5
VERSIONS = (1, 2, 3, 4, 5)       # a CCS accepts each; a device speaks the newest the CCS takes
MAX_FRAME = 8192          # bytes of payload; every field is capped far below this
HEADER = struct.Struct("!BBH")
FIELD = struct.Struct("!BH")


class WireError(RemoteProtocolError):
    """The peer sent bytes that are not a valid frame. ``code`` is stable."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{message} ({code})")
        self.code = code


def _ipv4_packed(text: str) -> bytes:
    """A dotted quad's 4 bytes (a CCS encodes addresses on every rendezvous:
    inet_pton is the strict parse at a tenth of ipaddress's cost; its
    refusals are ipaddress's ValueError)."""
    try:
        return socket.inet_pton(socket.AF_INET, text)
    except (OSError, TypeError):
        return ipaddress.IPv4Address(text).packed     # raises its own, clear ValueError


def _ip_packed(text: str) -> bytes:
    """An IPv4 (4 bytes) or IPv6 (16 bytes) address; an IPv4-mapped IPv6
    one is its IPv4 address (a dual-stack socket's view of an IPv4 peer)."""
    if ":" not in text:
        return _ipv4_packed(text)
    try:
        ip = ipaddress.IPv6Address(text)
    except ValueError:
        raise ValueError(f"{text!r} is not an IPv4 or IPv6 address") from None
    return ip.ipv4_mapped.packed if ip.ipv4_mapped is not None else ip.packed


def _ip_text(raw: bytes) -> str:
    if len(raw) == 4:
        return socket.inet_ntop(socket.AF_INET, raw)
    if len(raw) == 16:
        ip = ipaddress.IPv6Address(raw)
        if ip.ipv4_mapped is not None:
            raise ValueError("an IPv4-mapped IPv6 address: send the IPv4 address")
        return str(ip)
    raise ValueError(f"an address of {len(raw)} bytes")


IP_SINCE = 5       # the version whose address fields may hold IPv6 (16 bytes)

# field kinds: (encode, decode, fixed size or None; a tuple: one of those sizes)
def _u(n: int):
    fmt = {1: "!B", 2: "!H", 4: "!I", 8: "!Q"}[n]
    return (lambda v: struct.pack(fmt, v), lambda b: struct.unpack(fmt, b)[0], n)


_KINDS = {
    "u8": _u(1), "u16": _u(2), "u32": _u(4), "u64": _u(8),
    "bool": (lambda v: b"\x01" if v else b"\x00", lambda b: {b"\x00": False, b"\x01": True}[b], 1),
    "bytes": (bytes, bytes, None),
    "str": (lambda v: v.encode("utf-8"), lambda b: b.decode("utf-8"), None),
    "ip": (_ip_packed, _ip_text, (4, 16)),
    "strs": (lambda v: "\n".join(v).encode("utf-8"),
             lambda b: tuple(b.decode("utf-8").split("\n")) if b else (), None),
    "cands": (lambda v: _candidates.encode(v), lambda b: _candidates.decode(b), None),
}


@dataclass(frozen=True)
class Message:
    """Base of every message. Subclasses declare TYPE, FIELDS and SINCE:
    FIELDS maps attribute -> (wire id, kind, max bytes, required[, since])."""

    TYPE: ClassVar[int] = 0
    FIELDS: ClassVar[dict] = {}
    SINCE: ClassVar[int] = 1


def _msg(type_id: int, fields: dict, since: int = 1):
    def wrap(cls):
        cls.TYPE = type_id
        cls.FIELDS = {name: spec if len(spec) == 5 else spec + (1,)
                      for name, spec in fields.items()}
        cls.SINCE = since
        return dataclass(frozen=True)(cls)
    return wrap


NAME = 64          # device names
NONCE = 32
MAC = 32
REASON = 256
RELAY_TOKEN = 32
CODE = 32          # error and refusal codes
PROBE_TOKEN = 16


def fit(text: str, cap: int = REASON) -> str:
    """``text`` cut to a string field's cap in UTF-8 bytes, on a character
    boundary: a cut by characters overflows the field with non-ASCII text,
    and the encoder's refusal then loses the whole message."""
    data = text.encode("utf-8")
    return text if len(data) <= cap else data[:cap].decode("utf-8", "ignore")


# -- client -> server -----------------------------------------------------------------
@_msg(1, {"name": (1, "str", NAME, True), "nonce": (2, "bytes", NONCE, True)})
class Hello(Message):
    name: str
    nonce: bytes


@_msg(2, {"mac": (1, "bytes", MAC, True)})
class AuthResponse(Message):
    mac: bytes


@_msg(3, {"seq": (1, "u32", 4, True)})
class Heartbeat(Message):
    seq: int


NEXT_INFO = {
    "port": (10, "u16", 2, True), "isn": (11, "u32", 4, True), "mss": (12, "u16", 2, True),
    "wscale": (13, "u8", 1, False), "sack_permitted": (14, "bool", 1, True),
    "timestamps": (15, "bool", 1, True), "nat": (16, "str", 32, True),
    "local_addr": (17, "ip", 16, False), "crafted": (19, "bool", 1, False),
    # version 2: where the peer may reach us, and what natcheck saw of our gateway
    "candidates": (20, "cands", _candidates.WIRE_BYTES, False, 2),
    "mapping": (21, "str", 16, False, 2), "filtering": (22, "str", 16, False, 2),
    # version 5: how our IPv6 firewall treats an unsolicited SYN (natcheck's is IPv4's)
    "filtering6": (25, "str", 16, False, 5),
}


@_msg(4, {"request": (1, "u32", 4, True), "peer": (2, "str", NAME, True), **NEXT_INFO,
          "relay_first": (24, "str", 8, False, 4)})
class RendezvousRequest(Message):
    """A asks for B, with A's next-connection info."""
    request: int
    peer: str
    port: int
    isn: int
    mss: int
    sack_permitted: bool
    timestamps: bool
    nat: str
    wscale: Optional[int] = None
    local_addr: Optional[str] = None
    crafted: Optional[bool] = None
    candidates: Optional[tuple] = None
    mapping: Optional[str] = None
    filtering: Optional[str] = None
    filtering6: Optional[str] = None       # version 5
    relay_first: Optional[str] = None      # version 4: kinds.RelayFirst ("yes", "auto")


STANDING = 0       # RendezvousAnswer.request of info announced ahead of any offer


@_msg(5, {"request": (1, "u32", 4, True), **NEXT_INFO})
class RendezvousAnswer(Message):
    """B's next-connection info for an offered rendezvous; with request
    ``STANDING`` (0), for the next offer, ahead of it (the CCS then answers
    that offer itself and B's RendezvousReady carries request 0)."""
    request: int
    port: int
    isn: int
    mss: int
    sack_permitted: bool
    timestamps: bool
    nat: str
    wscale: Optional[int] = None
    local_addr: Optional[str] = None
    crafted: Optional[bool] = None
    candidates: Optional[tuple] = None
    mapping: Optional[str] = None
    filtering: Optional[str] = None
    filtering6: Optional[str] = None


@_msg(6, {"session": (1, "u64", 8, True), "code": (2, "str", 32, True),
          "reason": (3, "str", REASON, True)}, since=2)
class Abandon(Message):
    """A side gives up a rendezvous it was Ready for (its connect() was
    cancelled, it failed): the CCS tells the peer (PeerLeft), which stops."""
    session: int
    code: str
    reason: str


# -- server -> client -----------------------------------------------------------------
@_msg(64, {"nonce": (1, "bytes", NONCE, True)})
class Challenge(Message):
    nonce: bytes


@_msg(65, {"mac": (1, "bytes", MAC, True), "addr": (2, "ip", 16, True),
           "port": (3, "u16", 2, True), "heartbeat": (4, "u16", 2, True),
           "node": (5, "str", NAME, False), "probe_port": (6, "u16", 2, False),
           "probe_port2": (7, "u16", 2, False, 2), "keepalive": (8, "u16", 2, False, 3),
           "probe_token": (9, "bytes", PROBE_TOKEN, False, 5),
           "alt_addr": (10, "ip", 16, False, 5)})
class AuthOk(Message):
    """Server proof, and the address and port the CCS sees (reflexive).
    ``node`` names the CCS node, for logs; ``probe_port`` is where it answers
    "who am I" probes (the relay port) for the device's natcheck;
    ``probe_port2`` a second port that answers them, so natcheck can tell
    whether a mapping depends on the destination port; ``keepalive`` the
    period (seconds) of the keepalives devices should keep their peer
    streams alive with (fastpunch.liveness). Version 5: ``probe_token``
    is what this device's "who am I" probes carry so the CCS ties their
    address to it (fastpunch.proto.probe), ``alt_addr`` the CCS's address in
    the family this login did not use (an IPv6 one after an IPv4 login and
    the other way round), where such probes go."""
    mac: bytes
    addr: str
    port: int
    heartbeat: int
    node: Optional[str] = None
    probe_port: Optional[int] = None
    probe_port2: Optional[int] = None
    keepalive: Optional[int] = None
    probe_token: Optional[bytes] = None
    alt_addr: Optional[str] = None


@_msg(66, {"seq": (1, "u32", 4, True)})
class HeartbeatAck(Message):
    seq: int


@_msg(67, {"request": (1, "u32", 4, True), "peer": (2, "str", NAME, True)})
class RendezvousOffer(Message):
    """To B: peer wants to connect; answer with RendezvousAnswer."""
    request: int
    peer: str


PEER_INFO = {
    "peer": (2, "str", NAME, True), "addr": (3, "ip", 16, True), "key": (4, "bytes", 32, True),
    "plan": (5, "strs", 256, True), "start_at": (6, "u64", 8, True), "role": (7, "str", 16, True),
    "relay_token": (8, "bytes", RELAY_TOKEN, True), "relay_addr": (9, "ip", 16, True),
    "relay_port": (18, "u16", 2, True),
    "session": (23, "u64", 8, False, 2),
    "relay_first": (24, "bool", 1, False, 4),
    **NEXT_INFO,
}


@_msg(68, {"request": (1, "u32", 4, True), **PEER_INFO})
class RendezvousReady(Message):
    """The peer's info, the per-pair session key, the plan and a common start
    time (ms since the epoch). ``role`` is "initiator" or "responder".
    ``relay_token`` admits this side, once, to the CCS relay for this pair
    at ``relay_addr``:``relay_port``."""
    request: int
    peer: str
    addr: str
    key: bytes
    plan: tuple
    start_at: int
    role: str
    relay_token: bytes
    relay_addr: str
    relay_port: int
    port: int
    isn: int
    mss: int
    sack_permitted: bool
    timestamps: bool
    nat: str
    wscale: Optional[int] = None
    local_addr: Optional[str] = None
    crafted: Optional[bool] = None
    candidates: Optional[tuple] = None
    mapping: Optional[str] = None
    filtering: Optional[str] = None
    filtering6: Optional[str] = None
    session: Optional[int] = None
    relay_first: Optional[bool] = None     # version 4: this rendezvous is relay-first


@_msg(69, {"request": (1, "u32", 4, True), "code": (2, "str", 32, True),
           "reason": (3, "str", REASON, True)})
class RendezvousRefused(Message):
    request: int
    code: str
    reason: str


@_msg(70, {"code": (1, "str", 32, True), "reason": (2, "str", REASON, True)})
class Error(Message):
    """Fatal: the server closes the connection after it."""
    code: str
    reason: str


@_msg(71, {"session": (1, "u64", 8, True), "peer": (2, "str", NAME, True),
           "code": (3, "str", 32, True), "reason": (4, "str", REASON, True)}, since=2)
class PeerLeft(Message):
    """The peer of a rendezvous this side is Ready for went away (it
    disconnected from the CCS, or sent Abandon): stop punching and do not
    wait at the relay."""
    session: int
    peer: str
    code: str
    reason: str


MESSAGES: dict[int, type] = {cls.TYPE: cls for cls in (
    Hello, AuthResponse, Heartbeat, RendezvousRequest, RendezvousAnswer, Abandon,
    Challenge, AuthOk, HeartbeatAck, RendezvousOffer, RendezvousReady, RendezvousRefused, Error,
    PeerLeft)}


def encode(msg: Message, version: int = VERSION) -> bytes:
    """The frame of ``msg`` in ``version``: fields newer than it are left
    out (they are all optional); a message newer than it is refused."""
    if version not in VERSIONS:
        raise ValueError(f"protocol version {version} is not one of {VERSIONS}")
    if msg.SINCE > version:
        raise ValueError(f"{type(msg).__name__} needs protocol version {msg.SINCE}")
    parts = []
    for name, (fid, kind, cap, required, since) in msg.FIELDS.items():
        value = getattr(msg, name)
        if value is None or since > version:
            if required:
                raise ValueError(f"{type(msg).__name__}.{name} is required")
            continue
        raw = _KINDS[kind][0](value)
        if kind == "ip" and len(raw) == 16 and version < IP_SINCE:
            raise ValueError(f"{type(msg).__name__}.{name} is an IPv6 address: protocol "
                             f"version {IP_SINCE} or later carries it, not {version}")
        if len(raw) > cap:
            raise ValueError(f"{type(msg).__name__}.{name} is {len(raw)} bytes, cap {cap}")
        parts.append(FIELD.pack(fid, len(raw)) + raw)
    payload = b"".join(parts)
    if len(payload) > MAX_FRAME:
        raise ValueError(f"{type(msg).__name__} exceeds the {MAX_FRAME}-byte frame cap")
    return HEADER.pack(version, msg.TYPE, len(payload)) + payload


def frame_version(buf: bytes) -> Optional[int]:
    """The version byte of the frame at the front of ``buf`` (None: empty)."""
    return buf[0] if buf else None


def decode_frame(buf: bytearray, version: Optional[int] = None) -> Optional[Message]:
    """Take one whole frame off the front of ``buf`` and decode it; None when
    the frame is not complete yet. Raises WireError for anything invalid,
    a frame of another version than ``version`` (when given) included."""
    if len(buf) < HEADER.size:
        return None
    frame_v, type_id, length = HEADER.unpack_from(buf)
    if frame_v not in VERSIONS or (version is not None and frame_v != version):
        want = version if version is not None else " or ".join(map(str, VERSIONS))
        raise WireError("bad-version", f"protocol version {frame_v}, expected {want}")
    if length > MAX_FRAME:
        raise WireError("frame-too-large", f"frame of {length} bytes, cap {MAX_FRAME}")
    cls = MESSAGES.get(type_id)
    if cls is None or cls.SINCE > frame_v:
        raise WireError("unknown-type", f"unknown message type {type_id}")
    if len(buf) < HEADER.size + length:
        return None
    payload = bytes(buf[HEADER.size:HEADER.size + length])
    del buf[:HEADER.size + length]
    by_id = {fid: (name, kind, cap) for name, (fid, kind, cap, _, since) in cls.FIELDS.items()
             if since <= frame_v}
    values: dict[str, Any] = {}
    off = 0
    while off < len(payload):
        if off + FIELD.size > len(payload):
            raise WireError("truncated-field", f"{cls.__name__}: field header cut short")
        fid, flen = FIELD.unpack_from(payload, off)
        off += FIELD.size
        if off + flen > len(payload):
            raise WireError("truncated-field", f"{cls.__name__}: field {fid} overruns the frame")
        if fid not in by_id:
            raise WireError("unknown-field", f"{cls.__name__}: unknown field {fid}")
        name, kind, cap = by_id[fid]
        if name in values:
            raise WireError("duplicate-field", f"{cls.__name__}.{name} given twice")
        fixed = _KINDS[kind][2]
        if flen > cap or (fixed is not None and flen not in
                          (fixed if isinstance(fixed, tuple) else (fixed,))) or \
                (kind == "ip" and flen == 16 and frame_v < IP_SINCE):
            raise WireError("bad-field-size", f"{cls.__name__}.{name}: {flen} bytes")
        try:
            values[name] = _KINDS[kind][1](payload[off:off + flen])
        except (UnicodeDecodeError, KeyError, ValueError) as exc:
            # (a CandidateError is a ValueError with its own code in the text)
            raise WireError("bad-field-value", f"{cls.__name__}.{name}: {exc}") from None
        off += flen
    missing = [n for n, (_, _, _, req, _) in cls.FIELDS.items() if req and n not in values]
    if missing:
        raise WireError("missing-field", f"{cls.__name__} lacks {', '.join(missing)}")
    return cls(**values)


@dataclass(frozen=True)
class NextInfo:
    """A device's next-connection info: the port a peer should aim at
    (``port``: the server-reflexive port of the one it punches from; a
    version-1 peer knows only this), its ISN and TCP options, its NAT guess,
    whether it can craft segments, and (version 2) its candidates and what
    natcheck saw of its gateway's mapping and filtering."""
    port: int
    isn: int
    mss: int = 1460
    sack_permitted: bool = True
    timestamps: bool = True
    nat: str = "unknown"
    wscale: Optional[int] = 7
    local_addr: Optional[str] = None
    crafted: Optional[bool] = None
    candidates: Optional[tuple] = None
    mapping: Optional[str] = None
    filtering: Optional[str] = None
    filtering6: Optional[str] = None       # version 5: the IPv6 firewall's, probed over IPv6

    def fields(self) -> dict:
        """The fields as keyword arguments of a message (shallow: the
        candidates stay Candidate objects)."""
        return {name: getattr(self, name) for name in _NEXT_INFO_NAMES}

    def to_json(self) -> dict:
        """For a message between CCS nodes: plain JSON values (the
        candidates in their wire form, hex)."""
        out = self.fields()
        if self.candidates is not None:
            out["candidates"] = _candidates.encode(self.candidates).hex()
        return out

    @classmethod
    def from_json(cls, data: dict) -> "NextInfo":
        data = dict(data)
        c = data.get("candidates")
        if isinstance(c, str):
            data["candidates"] = _candidates.decode(bytes.fromhex(c))
        return cls(**data)


_NEXT_INFO_NAMES = tuple(f.name for f in dataclasses.fields(NextInfo))


def next_info_of(msg: Message) -> NextInfo:
    return NextInfo(**{name: getattr(msg, name) for name in _NEXT_INFO_NAMES})


def fields_of(msg: Message) -> dict:
    return {f.name: getattr(msg, f.name) for f in dataclasses.fields(msg)}
