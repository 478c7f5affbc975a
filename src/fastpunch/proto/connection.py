"""The CCS connection as a sans-IO state machine (client and server roles).

Rule 1 (after h11): everything that affects states and transitions lives in
the table below. ``receive_data(bytes)`` buffers, ``next_event()`` returns the
next message or NEED_DATA, ``send(message)`` returns the bytes to write.
A message the peer may not send in the current state is a
RemoteProtocolError with a stable ``code``; one we may not send is a
LocalProtocolError. Authentication is checked here (the machine is told the
device key by its owner), so no message after Hello is ever acted on for an
unauthenticated peer.

Versions: the client says Hello in its ``version``; the server answers in
the version of that Hello (any of ``wire.VERSIONS``) and so does everything
after it. An older server refuses a newer Hello with an Error in its own
version: the client raises ProtocolViolation("version-refused") and its
owner may try again with an older version.
"""

from __future__ import annotations

import enum
import os
from typing import Callable, Optional, Union

from fastpunch.errors import LocalProtocolError, RemoteProtocolError
from fastpunch.proto import auth, wire
from fastpunch.proto.wire import (
    AuthOk, AuthResponse, Challenge, Error, Heartbeat, HeartbeatAck, Hello, RendezvousAnswer,
    RendezvousOffer, RendezvousReady, RendezvousRefused, RendezvousRequest, WireError,
)

__all__ = ["State", "Role", "Connection", "NEED_DATA", "CLOSED", "ProtocolViolation"]


class State(enum.Enum):
    HELLO = "hello"              # waiting for the client's Hello
    CHALLENGE = "challenge"      # server owes a Challenge
    RESPONSE = "response"        # client owes its AuthResponse
    VERDICT = "verdict"          # server owes AuthOk (or Error)
    READY = "ready"              # authenticated both ways
    CLOSED = "closed"


class Role(enum.Enum):
    CLIENT = "client"
    SERVER = "server"


_READY_CLIENT = {Heartbeat, RendezvousRequest, RendezvousAnswer, wire.Abandon}
_READY_SERVER = {HeartbeatAck, RendezvousOffer, RendezvousReady, RendezvousRefused,
                 wire.PeerLeft}

# (state, sender) -> {message type: next state}. Error from the server is
# allowed in every state and always leads to CLOSED.
TRANSITIONS: dict[tuple[State, Role], dict[type, State]] = {
    (State.HELLO, Role.CLIENT): {Hello: State.CHALLENGE},
    (State.CHALLENGE, Role.SERVER): {Challenge: State.RESPONSE},
    (State.RESPONSE, Role.CLIENT): {AuthResponse: State.VERDICT},
    (State.VERDICT, Role.SERVER): {AuthOk: State.READY},
    (State.READY, Role.CLIENT): {m: State.READY for m in _READY_CLIENT},
    (State.READY, Role.SERVER): {m: State.READY for m in _READY_SERVER},
}


class ProtocolViolation(RemoteProtocolError):
    """``version``: for "version-refused", the protocol version the CCS
    answered in (the newest it speaks, to try next)."""

    def __init__(self, code: str, message: str, version: Optional[int] = None) -> None:
        super().__init__(f"{message} ({code})")
        self.code = code
        self.version = version


class _Sentinel:
    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


# the key an unknown device's proof is checked under: random per process, never
# told anyone, so no proof matches it (and the machine fails the login anyway);
# it only makes that failure cost what a wrong key for a known device costs
_DUMMY_KEY = os.urandom(auth.KEY_BYTES)

NEED_DATA = _Sentinel("NEED_DATA")
CLOSED = _Sentinel("CLOSED")


class Connection:
    """One end of a device <-> CCS connection."""

    def __init__(self, role: Role, version: int = wire.VERSION) -> None:
        if version not in wire.VERSIONS:
            raise ValueError(f"protocol version {version} is not one of {wire.VERSIONS}")
        self.role = role
        self.version = version          # the server's follows the client's Hello
        self.state = State.HELLO
        self._buf = bytearray()
        self._eof = False
        self.name: Optional[str] = None          # the device, once Hello is seen/sent
        self.client_nonce: Optional[bytes] = None
        self.server_nonce: Optional[bytes] = None
        self._key: Optional[bytes] = None
        self._known = False             # server: the Hello named an enrolled device
        self.authenticated = False

    @property
    def peer_role(self) -> Role:
        return Role.SERVER if self.role is Role.CLIENT else Role.CLIENT

    # -- state ------------------------------------------------------------------------
    def _advance(self, msg: wire.Message, sender: Role) -> None:
        if isinstance(msg, Error) and sender is Role.SERVER:
            self.state = State.CLOSED
            return
        allowed = TRANSITIONS.get((self.state, sender), {})
        nxt = allowed.get(type(msg))
        if nxt is None:
            text = (f"{sender.value} may not send {type(msg).__name__} in state "
                    f"{self.state.value}")
            if sender is self.role:
                raise LocalProtocolError(text)
            code = "unauthenticated" if self.state is not State.READY and \
                type(msg) in _READY_CLIENT | _READY_SERVER else "out-of-order"
            raise ProtocolViolation(code, text)
        self.state = nxt

    # -- receiving --------------------------------------------------------------------
    def receive_data(self, data: bytes) -> None:
        if data:
            self._buf += data
        else:
            self._eof = True

    def next_event(self) -> Union[wire.Message, _Sentinel]:
        if self.state is State.CLOSED:
            return CLOSED
        frame_v = wire.frame_version(self._buf)
        older = self.role is Role.CLIENT and self.state is not State.READY and \
            frame_v in wire.VERSIONS and frame_v < self.version
        expect = None if older or (self.role is Role.SERVER and self.state is State.HELLO) \
            else self.version
        try:
            msg = wire.decode_frame(self._buf, expect)
        except WireError:
            self.state = State.CLOSED
            raise
        if older and msg is not None:
            # an older CCS: all it can have to say to our Hello is no
            self.state = State.CLOSED
            reason = msg.reason if isinstance(msg, Error) else type(msg).__name__
            raise ProtocolViolation("version-refused", f"the CCS speaks protocol version "
                                                       f"{frame_v}, not {self.version}: {reason}",
                                    frame_v)
        if msg is not None and self.role is Role.SERVER and isinstance(msg, Hello):
            self.version = frame_v
        if msg is None:
            if self._eof:
                self.state = State.CLOSED
                return CLOSED
            return NEED_DATA
        try:
            self._advance(msg, self.peer_role)
        except ProtocolViolation:
            self.state = State.CLOSED
            raise
        self._on_receive(msg)
        return msg

    def _on_receive(self, msg: wire.Message) -> None:
        if isinstance(msg, Hello):
            if len(msg.nonce) != auth.NONCE_BYTES:
                self.state = State.CLOSED
                raise ProtocolViolation("bad-nonce", "client nonce must be 32 bytes")
            self.name, self.client_nonce = msg.name, msg.nonce
        elif isinstance(msg, Challenge):
            if len(msg.nonce) != auth.NONCE_BYTES:
                self.state = State.CLOSED
                raise ProtocolViolation("bad-nonce", "server nonce must be 32 bytes")
            self.server_nonce = msg.nonce
        elif isinstance(msg, AuthResponse):
            # the proof is computed and compared for an unknown name too (under
            # the dummy key): failing takes the same time either way
            good = auth.verify(
                auth.client_proof(self._key, self.name, self.server_nonce, self.client_nonce),
                msg.mac)
            if not (good and self._known):
                # The caller answers with Error("auth-failed") and closes.
                self.state = State.VERDICT
                self.authenticated = False
                raise ProtocolViolation("auth-failed", f"device {self.name!r} failed to prove its key")
            self.authenticated = True
        elif isinstance(msg, AuthOk):
            if not auth.verify(auth.server_proof(self._key, self.name, self.server_nonce,
                                                 self.client_nonce), msg.mac):
                self.state = State.CLOSED
                raise ProtocolViolation("server-auth-failed", "the CCS did not prove the device key")
            self.authenticated = True

    # -- sending ----------------------------------------------------------------------
    def send(self, msg: wire.Message) -> bytes:
        if self.state is State.CLOSED:
            raise LocalProtocolError("connection is closed")
        if isinstance(msg, AuthOk) and not self.authenticated:
            raise LocalProtocolError("AuthOk before the device proved its key")
        self._advance(msg, self.role)
        if isinstance(msg, Hello):
            self.name, self.client_nonce = msg.name, msg.nonce
        elif isinstance(msg, Challenge):
            self.server_nonce = msg.nonce
        return wire.encode(msg, self.version)

    # -- the authentication steps, with the secrets they need -----------------------
    def hello(self, name: str, key: bytes, random: Callable[[int], bytes]) -> bytes:
        """Client: start, remembering the key to check the server's proof."""
        self._key = key
        return self.send(Hello(name, random(auth.NONCE_BYTES)))

    def challenge(self, key: Optional[bytes], random: Callable[[int], bytes]) -> bytes:
        """Server: after Hello. ``key`` is None for an unknown device: the
        exchange still runs (nothing reveals which names exist, not even
        its time: the proof is checked under a dummy key) and fails."""
        self._known = key is not None
        self._key = key if key is not None else _DUMMY_KEY
        return self.send(Challenge(random(auth.NONCE_BYTES)))

    def respond(self) -> bytes:
        """Client: after Challenge."""
        return self.send(AuthResponse(auth.client_proof(self._key, self.name, self.server_nonce,
                                                        self.client_nonce)))

    def accept(self, addr: str, port: int, heartbeat: int, node: Optional[str] = None,
               probe_port: Optional[int] = None, probe_port2: Optional[int] = None,
               keepalive: Optional[int] = None, *, probe_token: Optional[bytes] = None,
               alt_addr: Optional[str] = None) -> bytes:
        """Server: after a verified AuthResponse."""
        return self.send(AuthOk(auth.server_proof(self._key, self.name, self.server_nonce,
                                                  self.client_nonce), addr, port, heartbeat, node,
                                probe_port, probe_port2, keepalive, probe_token, alt_addr))

    def error(self, code: str, reason: str) -> bytes:
        """Server: a fatal error; the connection is closed afterwards. The
        reason is cut to the field's cap in bytes, not characters (a cut at
        256 characters of non-ASCII text overflowed it, and the encoder's
        refusal aborted the connection without any Error frame)."""
        data = wire.encode(Error(wire.fit(code, wire.CODE), wire.fit(reason)), self.version)
        self.state = State.CLOSED
        return data
