"""The secure channel between two devices, as a sans-IO machine.

A device-to-device TCP stream (direct, or through a relay) is wrapped in
authenticated records under a 32-byte session key that the CCS issued to this
pair. The machine never touches a socket: ``start()`` returns our hello,
``receive_data(bytes)`` buffers what arrived (``b""`` means EOF),
``next_event()`` returns the next event (``Confirmed``, ``Data``, ``Closed``)
or ``NEED_DATA``, ``data_to_send()`` returns bytes the handshake owes the peer
(our confirm, once the peer's hello is in), ``send_data(bytes)`` and
``close()`` return records to write. Randomness is injected.

Wire format (all integers big-endian)::

    record  = type:u8  length:u16  body[length]          header = the first 3 bytes
    hello   = body: version:u8  cipher:u8  role:u8  nonce[32]       (cleartext, 35 bytes)
    confirm = body: AEAD(HMAC-SHA256(confirm key, label || transcript hash))
    data    = body: AEAD(application bytes), 0..16384 bytes of plaintext
    close   = body: AEAD(empty)

Every record after the hello is AEAD-sealed with the header as associated data
and ``nonce = iv XOR counter`` (counter: records sent in that direction, the
confirm being 0). The counter is never sent: a replayed, reordered or dropped
record is decrypted under the wrong nonce and fails as ``bad-record-mac``.

Key schedule (HKDF-SHA256, RFC 5869, fastpunch._aead)::

    transcript = SHA-256("fastpunch-channel-v1" || initiator hello record || responder hello record)
    okm = HKDF(ikm=session key, salt=initiator nonce || responder nonce,
               info="fastpunch-channel-v1 keys" || transcript, length=152)
        = i2r key[32] i2r iv[12] r2i key[32] r2i iv[12]
          initiator confirm key[32] responder confirm key[32]

    exporter secret = HKDF(ikm=session key, salt=initiator nonce || responder nonce,
                           info="fastpunch-channel-v1 exporter" || transcript, length=32)
    exporter(label, n) = HKDF-Expand(exporter secret, info=label, n)

The exporter gives layers above (the resumable session) secrets bound to this
one channel: both ends get the same bytes, nobody who lacks the session key
or saw other hellos does.

The cipher is the initiator's choice (its hello's cipher byte); the
responder's byte is only its preference. Both hellos are inside the
transcript, so a relay that rewrites either (cipher, role, nonce) makes the
two ends derive different keys and the confirm fails.

Rule 1 (after h11): the states and what each may receive live in the tables
below. A record the peer may not send is a :class:`ChannelViolation` (a
RemoteProtocolError) with a stable ``code``; after one, the machine is closed
and re-raises it. A call we may not make is a :class:`ChannelUsageError`.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import os
import platform
import struct
import threading
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Optional, Union

from fastpunch import _aead

from fastpunch.errors import LocalProtocolError, RemoteProtocolError

__all__ = [
    "Role", "Cipher", "RecordType", "RecvState", "SendState", "Channel",
    "Confirmed", "Data", "Closed", "NEED_DATA", "Event",
    "ChannelViolation", "BadHello", "RoleConflict", "UnknownRecordType", "UnexpectedRecord",
    "RecordTooLarge", "BadRecordMAC", "ConfirmFailed", "BadClose", "Truncated", "RecordLimit",
    "ChannelUsageError",
    "VERSION", "HEADER_BYTES", "MAX_PLAINTEXT", "TAG_BYTES", "MAX_BODY", "NONCE_BYTES",
    "KEY_BYTES", "MAX_RECORDS", "HELLO_BODY_BYTES", "cpu_prefers_aes", "default_cipher",
]

VERSION = 1
HEADER = struct.Struct("!BH")
_unpack_header = HEADER.unpack_from
HEADER_BYTES = HEADER.size                 # 3
MAX_PLAINTEXT = 16384                      # bytes of application data per record
TAG_BYTES = 16
MAX_BODY = MAX_PLAINTEXT + TAG_BYTES       # the largest length a header may carry
NONCE_BYTES = 32                           # each side's hello nonce
KEY_BYTES = 32                             # the CCS-issued session key
MAX_RECORDS = 2 ** 64                      # counters 0 .. 2**64-1 per direction
HELLO = struct.Struct("!BBB32s")
HELLO_BODY_BYTES = HELLO.size              # 35
CONFIRM_BODY_BYTES = 32 + TAG_BYTES
RUN_RECORDS = 64                           # data records opened into one Data event, at most

_LABEL = b"fastpunch-channel-v1"
_KEYS_INFO = _LABEL + b" keys"
_EXPORTER_INFO = _LABEL + b" exporter"
_CONFIRM_LABEL = {"initiator": _LABEL + b" initiator confirm",
                  "responder": _LABEL + b" responder confirm"}


class Role(enum.Enum):
    INITIATOR = 1
    RESPONDER = 2


class Cipher(enum.IntEnum):
    AES_256_GCM = 1
    CHACHA20_POLY1305 = 2


class RecordType(enum.IntEnum):
    HELLO = 1
    CONFIRM = 2
    DATA = 3
    CLOSE = 4


class RecvState(enum.Enum):
    HELLO = "hello"          # waiting for the peer's hello
    CONFIRM = "confirm"      # keys derived, waiting for the peer's confirm
    OPEN = "open"            # peer confirmed: data and close accepted
    CLOSED = "closed"        # the peer's close record was received
    ERROR = "error"          # a violation was raised; it is raised again


class SendState(enum.Enum):
    IDLE = "idle"            # start() not called yet
    HELLO = "hello"          # hello sent, confirm owed once the peer's hello is in
    CONFIRM = "confirm"      # our confirm produced; waiting for the peer's
    OPEN = "open"            # both confirms done: send_data allowed
    CLOSED = "closed"        # close() called (or an error happened)


#: What the peer may send in each receive state, and where each record leads.
RECV_TRANSITIONS: dict[RecvState, dict[RecordType, RecvState]] = {
    RecvState.HELLO: {RecordType.HELLO: RecvState.CONFIRM},
    RecvState.CONFIRM: {RecordType.CONFIRM: RecvState.OPEN},
    RecvState.OPEN: {RecordType.DATA: RecvState.OPEN, RecordType.CLOSE: RecvState.CLOSED},
    RecvState.CLOSED: {},
    RecvState.ERROR: {},
}

_KNOWN_TYPES = frozenset(int(t) for t in RecordType)
_FULL_DATA_HEADER = HEADER.pack(RecordType.DATA, MAX_BODY)
# the AEADs: cryptography's where installed, else the process's own libcrypto
# (fastpunch._aead; a device install without cryptography). Chosen at the
# first handshake, not at import: a missing libcrypto is then the
# handshake's KernelFeatureMissing, never a failure of every command that
# merely imports the package.
_BACKEND: Optional[tuple] = None
_KNOWN_CIPHERS = frozenset(int(c) for c in Cipher)


def aead_backend() -> tuple:
    """(name, {Cipher: AEAD class}, the InvalidTag exceptions to catch)."""
    global _BACKEND
    if _BACKEND is None:
        name, aes, chacha, invalid = _aead.select()
        _BACKEND = (name, {Cipher.AES_256_GCM: aes, Cipher.CHACHA20_POLY1305: chacha}, invalid)
    return _BACKEND


# -- errors ---------------------------------------------------------------------------
class ChannelViolation(RemoteProtocolError):
    """The peer (or something between us) sent bytes the channel refuses.

    ``code`` is stable and fit for counters and tests; see docs/channel.md."""

    code = "channel-violation"

    def __init__(self, message: str) -> None:
        super().__init__(f"{message} ({self.code})")


class BadHello(ChannelViolation):
    code = "bad-hello"


class RoleConflict(ChannelViolation):
    code = "role-conflict"


class UnknownRecordType(ChannelViolation):
    code = "unknown-record-type"


class UnexpectedRecord(ChannelViolation):
    code = "unexpected-record"


class RecordTooLarge(ChannelViolation):
    code = "record-too-large"


class BadRecordMAC(ChannelViolation):
    code = "bad-record-mac"


class ConfirmFailed(ChannelViolation):
    code = "confirm-failed"


class BadClose(ChannelViolation):
    code = "bad-close"


class Truncated(ChannelViolation):
    code = "truncated"


class RecordLimit(ChannelViolation):
    code = "record-limit"


class ChannelUsageError(LocalProtocolError):
    """We asked the channel for something its state forbids (``code``:
    "not-started", "already-started", "not-confirmed", "closed", "record-limit",
    "bad-argument")."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{message} ({code})")
        self.code = code


# -- events ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Confirmed:
    """The peer proved it holds the session key and saw our hello."""


@dataclass(frozen=True)
class Data:
    """Application bytes from one or more consecutive data records.
    ``data`` is bytes-like: a bytearray when records were opened in place."""

    data: Union[bytes, bytearray]


@dataclass(frozen=True)
class Closed:
    """The peer sent its close record: its stream ended cleanly."""


class _Sentinel:
    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


NEED_DATA = _Sentinel("NEED_DATA")
Event = Union[Confirmed, Data, Closed, _Sentinel]


# -- the cipher the CPU runs fastest --------------------------------------------------
def cpu_prefers_aes(cpuinfo: str, machine: str) -> bool:
    """True when AES-GCM has hardware support: AES-NI and PCLMULQDQ on x86,
    the AES and PMULL extensions on arm64. Pure: give it /proc/cpuinfo's text."""
    machine = machine.lower()
    if machine in ("x86_64", "amd64", "i386", "i686", "x86"):
        key, need = "flags", {"aes", "pclmulqdq"}
    elif machine in ("aarch64", "arm64", "armv8l", "armv8b"):
        key, need = "features", {"aes", "pmull"}
    else:
        return False
    for line in cpuinfo.splitlines():
        name, sep, value = line.partition(":")
        if sep and name.strip().lower() == key:
            return need <= set(value.split())
    return False


@lru_cache(maxsize=1)
def default_cipher() -> Cipher:
    """AES-256-GCM where the CPU accelerates it, else ChaCha20-Poly1305.
    Reads /proc/cpuinfo once per process (a local file, not a peer)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            text = f.read()
    except OSError:
        return Cipher.CHACHA20_POLY1305
    aes = cpu_prefers_aes(text, platform.machine())
    return Cipher.AES_256_GCM if aes else Cipher.CHACHA20_POLY1305


def _role(value: Union[str, Role]) -> Role:
    if isinstance(value, Role):
        return value
    try:
        return Role[str(value).upper()]
    except KeyError:
        raise ChannelUsageError("bad-argument",
                                f"role must be 'initiator' or 'responder', not {value!r}") from None


# -- the machine ----------------------------------------------------------------------
class Channel:
    """One end of a secure channel. ``role`` is "initiator" or "responder"
    (the two ends must differ); ``session_key`` the 32 bytes the CCS issued."""

    def __init__(self, role: Union[str, Role], session_key: bytes, *,
                 random: Callable[[int], bytes] = os.urandom,
                 cipher: Optional[Cipher] = None) -> None:
        self.role = _role(role)
        if not isinstance(session_key, (bytes, bytearray)) or len(session_key) != KEY_BYTES:
            raise ChannelUsageError("bad-argument", f"session key must be {KEY_BYTES} bytes")
        self._session_key = bytes(session_key)
        self._random = random
        self.preferred_cipher = Cipher(cipher) if cipher is not None else default_cipher()
        #: The cipher in use, known once both hellos are in (the initiator's choice).
        self.cipher: Optional[Cipher] = None
        self._set_recv_state(RecvState.HELLO)
        self.send_state = SendState.IDLE
        self._buf = bytearray()
        self._pos = 0                      # bytes of _buf already consumed
        self._eof = False
        self._error: Optional[ChannelViolation] = None
        self._out = bytearray()            # owed to the peer (our confirm)
        self._my_hello: Optional[bytes] = None
        self._my_nonce: Optional[bytes] = None
        self._send_aead = self._recv_aead = None
        self._send_iv = self._recv_iv = 0
        self._send_seq = self._recv_seq = 0
        # Sealing is atomic: a record counter (the nonce) is taken and used,
        # and the send state read and changed, under this lock. Two threads
        # that seal at once (a caller's misuse; the records may still reach
        # the wire out of order, which the peer refuses) never share a
        # nonce, nor, on the libcrypto backend, one EVP context
        self._seal_lock = threading.RLock()
        self._peer_confirm: Optional[bytes] = None
        self._encrypt_into = self._decrypt_into = None
        self._invalid_tag: tuple = (_aead.InvalidTag,)   # (the backend's, from the hello on)
        self._exporter_secret: Optional[bytes] = None

    # -- state ----------------------------------------------------------------------
    @property
    def confirmed(self) -> bool:
        """Both ends proved the key: application data may flow."""
        return self.recv_state in (RecvState.OPEN, RecvState.CLOSED) and \
            self.send_state in (SendState.OPEN, SendState.CLOSED)

    @property
    def eof(self) -> bool:
        """receive_data(b"") was called: the stream under us ended."""
        return self._eof

    @property
    def closed(self) -> bool:
        return self.recv_state in (RecvState.CLOSED, RecvState.ERROR)

    def _fail(self, exc: ChannelViolation) -> ChannelViolation:
        self._set_recv_state(RecvState.ERROR)
        self.send_state = SendState.CLOSED
        self._error = exc
        self._buf = bytearray()
        self._pos = 0
        return exc

    # -- handshake ------------------------------------------------------------------
    def start(self) -> bytes:
        """Our hello record (send it first)."""
        if self.send_state is not SendState.IDLE:
            raise ChannelUsageError("closed" if self.send_state is SendState.CLOSED
                                    else "already-started", "start() was already called")
        nonce = bytes(self._random(NONCE_BYTES))
        if len(nonce) != NONCE_BYTES:
            raise ChannelUsageError("bad-argument", "random(n) must return n bytes")
        body = HELLO.pack(VERSION, int(self.preferred_cipher), self.role.value, nonce)
        self._my_nonce = nonce
        self._my_hello = HEADER.pack(RecordType.HELLO, len(body)) + body
        self.send_state = SendState.HELLO
        return self._my_hello

    def data_to_send(self) -> bytes:
        """Bytes the handshake owes the peer (our confirm); write them after
        each next_event(), also one that raised: a peer's hello and a failing
        confirm can arrive together, and the peer should still get our
        confirm so it reports "confirm-failed" rather than "truncated"."""
        out = bytes(self._out)
        self._out.clear()
        return out

    def _on_hello(self, record: bytes) -> None:
        body = record[HEADER_BYTES:]
        if len(body) != HELLO_BODY_BYTES:
            raise BadHello(f"hello body is {len(body)} bytes, not {HELLO_BODY_BYTES}")
        version, cipher, role, nonce = HELLO.unpack(body)
        if version != VERSION:
            raise BadHello(f"peer speaks channel version {version}, we speak {VERSION}")
        if cipher not in _KNOWN_CIPHERS:
            raise BadHello(f"unknown cipher {cipher}")
        if role not in (1, 2):
            raise BadHello(f"unknown role {role}")
        if role == self.role.value:
            raise RoleConflict(f"both ends claim to be the {self.role.name.lower()}")
        if nonce == self._my_nonce:
            raise BadHello("the peer's hello carries our own nonce (a reflection)")
        if self.role is Role.INITIATOR:
            first, second = self._my_hello, record
            i_nonce, r_nonce = self._my_nonce, nonce
            self.cipher = self.preferred_cipher
        else:
            first, second = record, self._my_hello
            i_nonce, r_nonce = nonce, self._my_nonce
            self.cipher = Cipher(cipher)
        transcript = hashlib.sha256(_LABEL + first + second).digest()
        okm = _aead.hkdf(self._session_key, i_nonce + r_nonce, _KEYS_INFO + transcript, 152)
        i2r_key, i2r_iv, r2i_key, r2i_iv = okm[0:32], okm[32:44], okm[44:76], okm[76:88]
        i_confirm, r_confirm = okm[88:120], okm[120:152]
        _name, aeads, self._invalid_tag = aead_backend()
        aead = aeads[self.cipher]
        if self.role is Role.INITIATOR:
            send = (i2r_key, i2r_iv, i_confirm, "initiator")
            recv = (r2i_key, r2i_iv, r_confirm, "responder")
        else:
            send = (r2i_key, r2i_iv, r_confirm, "responder")
            recv = (i2r_key, i2r_iv, i_confirm, "initiator")
        self._send_aead, self._send_iv = aead(send[0]), int.from_bytes(send[1], "big")
        self._recv_aead, self._recv_iv = aead(recv[0]), int.from_bytes(recv[1], "big")
        self._exporter_secret = _aead.hkdf(self._session_key, i_nonce + r_nonce,
                                           _EXPORTER_INFO + transcript, 32)
        self._encrypt_into = getattr(self._send_aead, "encrypt_into", None)
        self._decrypt_into = getattr(self._recv_aead, "decrypt_into", None)
        my_confirm = hmac.new(send[2], _CONFIRM_LABEL[send[3]] + transcript,
                              hashlib.sha256).digest()
        self._peer_confirm = hmac.new(recv[2], _CONFIRM_LABEL[recv[3]] + transcript,
                                      hashlib.sha256).digest()
        if self.send_state is SendState.HELLO:
            self._out += self._seal(RecordType.CONFIRM, my_confirm)
            self.send_state = SendState.CONFIRM

    def exporter(self, label: bytes, length: int) -> bytes:
        """``length`` bytes (1..255*32) bound to this channel and ``label``: the
        same at both ends once both hellos are in. Layers above derive their
        own secrets from it (see proto.session); it reveals nothing of the
        record keys."""
        if self._exporter_secret is None:
            raise ChannelUsageError("not-started", "no exporter before both hellos are in")
        if not isinstance(label, (bytes, bytearray)) or not 1 <= length <= 255 * 32:
            raise ChannelUsageError("bad-argument", "exporter(label: bytes, 1 <= length <= 8160)")
        return _aead.hkdf_expand(self._exporter_secret, bytes(label), length)

    # -- nonces ---------------------------------------------------------------------
    def _next_send_nonce(self) -> bytes:
        seq = self._send_seq
        if seq >= MAX_RECORDS:
            raise ChannelUsageError("record-limit", "2**64 records sent under this key: reconnect")
        self._send_seq = seq + 1
        return (self._send_iv ^ seq).to_bytes(12, "big")

    def _next_recv_nonce(self) -> bytes:
        seq = self._recv_seq
        if seq >= MAX_RECORDS:
            raise RecordLimit("the peer sent more than 2**64 records under one key")
        self._recv_seq = seq + 1
        return (self._recv_iv ^ seq).to_bytes(12, "big")

    def _seal(self, rtype: RecordType, plaintext) -> bytes:
        header = HEADER.pack(rtype, len(plaintext) + TAG_BYTES)
        with self._seal_lock:
            return header + self._send_aead.encrypt(self._next_send_nonce(), plaintext, header)

    # -- receiving ------------------------------------------------------------------
    def receive_data(self, data) -> None:
        """Buffer bytes from the peer; ``b""`` means the stream ended (EOF)."""
        if not data:
            self._eof = True
            return
        if self._eof:
            raise ChannelUsageError("closed", "data after EOF")
        if self.recv_state is RecvState.ERROR:
            return
        if self._pos:
            # Drop consumed records in bulk, once per arrival: no per-record memmove.
            del self._buf[:self._pos]
            self._pos = 0
        self._buf += data

    def next_event(self) -> Event:
        if self._error is not None:
            raise self._error
        if self._my_hello is None:
            raise ChannelUsageError("not-started", "call start() before reading the peer's records")
        try:
            while True:
                event = self._next_record()
                if event is not None:
                    return event
        except ChannelViolation as exc:
            raise self._fail(exc)

    def _set_recv_state(self, state: RecvState) -> None:
        """Every change of receive state goes through here (after asyncpg)."""
        self.recv_state = state
        self._allowed = RECV_TRANSITIONS[state]

    def _next_record(self) -> Optional[Event]:
        """Consume at most one record; None when it yields nothing to show
        (the hello, an empty data record): the caller loops, never recurses.
        Record types stay ints on this path (RecordType is an IntEnum, so the
        table's keys match them): one 16 KiB record costs a few microseconds."""
        buf, pos = self._buf, self._pos
        avail = len(buf) - pos
        if avail < HEADER_BYTES:
            return self._starved(avail)
        rtype, length = _unpack_header(buf, pos)
        nxt = self._allowed.get(rtype)
        if nxt is None:
            if rtype not in _KNOWN_TYPES:
                raise UnknownRecordType(f"record type {rtype}")
            raise UnexpectedRecord(f"{RecordType(rtype).name.lower()} record while waiting "
                                   f"for {self.recv_state.value}")
        if length > MAX_BODY:
            raise RecordTooLarge(f"record body of {length} bytes (at most {MAX_BODY})")
        end = pos + HEADER_BYTES + length
        if len(buf) < end:
            return self._starved(avail)
        if rtype == RecordType.DATA and self._decrypt_into is not None:
            return self._open_data_run(buf, pos)
        if rtype == RecordType.HELLO:
            record = bytes(buf[pos:end])
            self._pos = end
            self._on_hello(record)
            self._set_recv_state(nxt)
            return None
        plaintext = None
        nonce = self._next_recv_nonce()
        if length >= TAG_BYTES:
            with memoryview(buf) as view, view[pos + HEADER_BYTES:end] as body:
                try:
                    plaintext = self._recv_aead.decrypt(nonce, body, buf[pos:pos + HEADER_BYTES])
                except self._invalid_tag:
                    pass
        self._pos = end
        if rtype == RecordType.DATA:
            if plaintext is None:
                raise BadRecordMAC(f"data record #{self._recv_seq - 1} failed authentication "
                                   "(altered, replayed, reordered or dropped)")
            return Data(plaintext) if plaintext else None
        if rtype == RecordType.CONFIRM:
            if plaintext is None or not hmac.compare_digest(plaintext, self._peer_confirm):
                raise ConfirmFailed("the peer's confirm does not verify: it holds a different "
                                    "session key, or a hello was altered in transit")
            self._set_recv_state(nxt)
            if self.send_state is SendState.CONFIRM:
                self.send_state = SendState.OPEN
            return Confirmed()
        # CLOSE
        if plaintext is None:
            raise BadRecordMAC(f"close record #{self._recv_seq - 1} failed authentication")
        if plaintext:
            raise BadClose("close record carries data")
        self._set_recv_state(nxt)
        return Closed()

    def read_into(self, dst) -> int:
        """Open the complete data records at the head of what was received
        straight into ``dst`` (a writable buffer), as many as fit whole, with
        no buffer of the channel's own between the cipher and the caller.
        Returns the plaintext bytes written: 0 when nothing can be read that
        way (no complete data record next, or the first does not fit in
        ``dst``, or an empty one): then next_event() says what comes. Bytes
        of ``dst`` past the count are undefined (a record that fails
        authentication may have been written there before it was refused,
        and it raises BadRecordMAC at the next call, as in next_event)."""
        with memoryview(dst) as view:
            if view.readonly:
                raise TypeError("read_into needs a writable buffer")
            if self._error is not None:
                raise self._error
            if self._decrypt_into is None or self.recv_state is not RecvState.OPEN:
                return 0
            buf, pos = self._buf, self._pos
            if len(buf) - pos < HEADER_BYTES:
                return 0
            rtype, length = _unpack_header(buf, pos)
            if rtype != RecordType.DATA or not TAG_BYTES < length <= MAX_BODY \
                    or len(buf) < pos + HEADER_BYTES + length:
                return 0
            with view.cast("B") as out:
                if out.nbytes < length - TAG_BYTES:
                    return 0
                try:
                    return self._open_data_run(buf, pos, out)
                except ChannelViolation as exc:
                    raise self._fail(exc)

    def _open_data_run(self, buf: bytearray, pos: int, into=None):
        """Open the complete data records that follow one another from pos
        (at most RUN_RECORDS) into one buffer: one event, one allocation and
        no per-record Python objects for a whole TCP read. A record that
        fails stops the run: the records before it are released, and the
        next call raises for it (they were authentic; it is not). ``into``
        (read_into): the caller's buffer instead, as many records as fit
        whole; the count written is returned instead of an event."""
        end_of_data, runs, total = len(buf), [], 0
        room = into.nbytes if into is not None else None
        p = pos
        while len(runs) < RUN_RECORDS and end_of_data - p >= HEADER_BYTES:
            rtype, length = _unpack_header(buf, p)
            if rtype != RecordType.DATA or not TAG_BYTES <= length <= MAX_BODY \
                    or end_of_data < p + HEADER_BYTES + length:
                break
            if room is not None and total + length - TAG_BYTES > room:
                break
            runs.append((p, length))
            total += length - TAG_BYTES
            p += HEADER_BYTES + length
        if not runs:                        # the first record's length < TAG_BYTES
            self._next_recv_nonce()
            self._pos = pos + HEADER_BYTES + _unpack_header(buf, pos)[1]
            raise BadRecordMAC(f"data record #{self._recv_seq - 1} is shorter than a tag")
        out = bytearray(total) if into is None else into
        decrypt_into, iv, seq, w = self._decrypt_into, self._recv_iv, self._recv_seq, 0
        failed = False
        with memoryview(buf) as src, memoryview(out) as dst:
            for p, length in runs:
                if seq >= MAX_RECORDS:
                    failed = True
                    break
                size = length - TAG_BYTES
                body = p + HEADER_BYTES
                aad = _FULL_DATA_HEADER if length == MAX_BODY else buf[p:body]
                try:
                    decrypt_into((iv ^ seq).to_bytes(12, "big"), src[body:body + length],
                                 aad, dst[w:w + size])
                except self._invalid_tag:
                    failed = True
                    break
                seq += 1
                w += size
                self._pos = body + length
        opened, self._recv_seq = seq - self._recv_seq, seq
        if failed and not opened:
            if seq >= MAX_RECORDS:
                raise RecordLimit("the peer sent more than 2**64 records under one key")
            self._recv_seq = seq + 1
            self._pos = pos + HEADER_BYTES + runs[0][1]
            raise BadRecordMAC(f"data record #{seq} failed authentication "
                               "(altered, replayed, reordered or dropped)")
        if into is not None:
            return w
        if w < total:
            del out[w:]                     # drop what the failed record left behind
        return Data(out) if w else None

    def _starved(self, avail: int) -> Event:
        if not self._eof:
            return NEED_DATA
        if avail == 0 and self.recv_state is RecvState.CLOSED:
            return Closed()
        where = "inside a record" if avail else "without a close record"
        raise Truncated(f"the stream ended {where}")

    # -- sending --------------------------------------------------------------------
    def send_data(self, data) -> bytearray:
        """Encrypt application bytes into records of at most 16 KiB each.
        Returns one buffer holding all of them (write it whole)."""
        with self._seal_lock:
            return self._send_data(data)

    def _send_data(self, data) -> bytearray:
        if self.send_state is not SendState.OPEN:
            if self.send_state is SendState.CLOSED:
                raise ChannelUsageError("closed", "the channel is closed")
            raise ChannelUsageError("not-confirmed", "no data before both confirms")
        if self.recv_state is RecvState.ERROR:
            raise ChannelUsageError("closed", "the channel failed")
        src = memoryview(data).cast("B")
        n = src.nbytes
        if n == 0:
            return bytearray()
        return self._seal_data(src, n)

    def _seal_data(self, src: memoryview, n: int) -> bytearray:
        records = -(-n // MAX_PLAINTEXT)
        if self._send_seq + records > MAX_RECORDS:
            raise ChannelUsageError("record-limit", "2**64 records sent under this key: reconnect")
        if self._encrypt_into is None:      # cryptography < 45
            parts = []
            for off in range(0, n, MAX_PLAINTEXT):
                parts.append(self._seal(RecordType.DATA, src[off:off + MAX_PLAINTEXT]))
            return bytearray(b"".join(parts))
        out = bytearray(n + records * (HEADER_BYTES + TAG_BYTES))
        encrypt_into, iv, seq, w = self._encrypt_into, self._send_iv, self._send_seq, 0
        full = n - n % MAX_PLAINTEXT                 # bytes going into full-size records
        with memoryview(out) as dst:
            # Full records share one header (also their associated data).
            for off in range(0, full, MAX_PLAINTEXT):
                dst[w:w + HEADER_BYTES] = _FULL_DATA_HEADER
                w += HEADER_BYTES
                encrypt_into((iv ^ seq).to_bytes(12, "big"), src[off:off + MAX_PLAINTEXT],
                             _FULL_DATA_HEADER, dst[w:w + MAX_BODY])
                seq += 1
                w += MAX_BODY
            if full < n:
                size = n - full + TAG_BYTES
                header = HEADER.pack(RecordType.DATA, size)
                dst[w:w + HEADER_BYTES] = header
                w += HEADER_BYTES
                encrypt_into((iv ^ seq).to_bytes(12, "big"), src[full:], header,
                             dst[w:w + size])
                seq += 1
        self._send_seq = seq
        return out

    def close(self) -> bytes:
        """Our close record (b"" if no keys exist yet, or already closed).
        We may still receive until the peer's own close."""
        with self._seal_lock:
            return self._close()

    def _close(self) -> bytes:
        if self.send_state in (SendState.CLOSED, SendState.IDLE, SendState.HELLO) \
                or self.recv_state is RecvState.ERROR:
            self.send_state = SendState.CLOSED
            return b""
        record = self._seal(RecordType.CLOSE, b"")
        self.send_state = SendState.CLOSED
        return record
