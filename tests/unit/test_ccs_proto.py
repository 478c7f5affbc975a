"""The CCS protocol machines, byte level: client and server linked in memory,
and every malformed, oversized, out-of-order, unauthenticated or replayed
input refused with a stable code."""

from __future__ import annotations

import os
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastpunch.errors import LocalProtocolError, RemoteProtocolError
from fastpunch.proto import auth, wire
from fastpunch.proto.connection import CLOSED, NEED_DATA, Connection, ProtocolViolation, Role, State
from fastpunch.proto.wire import WireError

KEY = bytes(range(32))


def seeded(seed: int):
    import random

    rng = random.Random(seed)
    return lambda n: bytes(rng.getrandbits(8) for _ in range(n))


def pump(src_bytes: bytes, dst: Connection):
    dst.receive_data(src_bytes)
    events = []
    while (ev := dst.next_event()) is not NEED_DATA and ev is not CLOSED:
        events.append(ev)
    return events


def handshake(client_key=KEY, server_key=KEY, seed=1):
    client, server = Connection(Role.CLIENT), Connection(Role.SERVER)
    [hello] = pump(client.hello("cam-1", client_key, seeded(seed)), server)
    assert hello == wire.Hello("cam-1", hello.nonce)
    [challenge] = pump(server.challenge(server_key, seeded(seed + 1)), client)
    return client, server, client.respond()


def test_mutual_authentication_and_reflexive_address():
    client, server, response = handshake()
    [resp] = pump(response, server)
    assert server.authenticated and server.state is State.VERDICT
    [ok] = pump(server.accept("203.0.113.10", 40000, 15), client)
    assert (ok.addr, ok.port, ok.heartbeat) == ("203.0.113.10", 40000, 15)
    assert client.authenticated and client.state is server.state is State.READY


def test_wrong_key_is_refused_and_the_client_learns_why():
    client, server, response = handshake(client_key=b"\x01" * 32)
    with pytest.raises(ProtocolViolation) as err:
        pump(response, server)
    assert err.value.code == "auth-failed" and not server.authenticated
    with pytest.raises(LocalProtocolError):
        server.accept("203.0.113.10", 1, 15)      # the machine refuses to let it in
    [error] = pump(server.error("auth-failed", "bad key"), client)
    assert error == wire.Error("auth-failed", "bad key") and client.state is State.CLOSED


def test_unknown_device_runs_the_same_exchange_and_fails():
    client, server, response = handshake(server_key=None)
    with pytest.raises(ProtocolViolation) as err:
        pump(response, server)
    assert err.value.code == "auth-failed"


def test_a_replayed_response_does_not_authenticate():
    _, _, recorded = handshake(seed=1)
    # a new connection: same client nonce replayed, but a fresh server nonce
    server2 = Connection(Role.SERVER)
    pump(wire.encode(wire.Hello("cam-1", seeded(1)(32))), server2)
    server2.challenge(KEY, seeded(99))
    with pytest.raises(ProtocolViolation) as err:
        pump(recorded, server2)
    assert err.value.code == "auth-failed"


def test_a_server_without_the_key_is_detected_by_the_device():
    client, server, response = handshake()
    pump(response, server)
    forged = wire.encode(wire.AuthOk(b"\0" * 32, "203.0.113.10", 1, 15))
    with pytest.raises(ProtocolViolation) as err:
        pump(forged, client)
    assert err.value.code == "server-auth-failed"


def ready_pair():
    client, server, response = handshake()
    pump(response, server)
    pump(server.accept("203.0.113.10", 40000, 15), client)
    return client, server


def test_rendezvous_messages_flow_once_ready():
    client, server = ready_pair()
    req = wire.RendezvousRequest(request=7, peer="viewer", port=40000, isn=123, mss=1460,
                                 sack_permitted=True, timestamps=True, nat="nat", wscale=7)
    assert pump(client.send(req), server) == [req]
    offer = wire.RendezvousOffer(request=9, peer="cam-1")
    assert pump(server.send(offer), client) == [offer]
    ready = wire.RendezvousReady(request=7, peer="viewer", addr="203.0.113.20", key=os.urandom(32),
                                 plan=("symmetric", "relay"), start_at=1_700_000_000_000,
                                 role="initiator", relay_token=os.urandom(32),
                                 relay_addr="203.0.113.1", relay_port=7444, port=40001, isn=9, mss=1400,
                                 sack_permitted=False, timestamps=True, nat="napt-random")
    assert pump(server.send(ready), client) == [ready]
    assert pump(client.send(wire.Heartbeat(1)), server) == [wire.Heartbeat(1)]


def test_bytes_arriving_one_at_a_time():
    client, server = ready_pair()
    data = client.send(wire.Heartbeat(5))
    events = []
    for i in range(len(data)):
        events += pump(data[i:i + 1], server)
    assert events == [wire.Heartbeat(5)]


def test_eof_closes():
    server = Connection(Role.SERVER)
    server.receive_data(b"")
    assert server.next_event() is CLOSED and server.state is State.CLOSED


@pytest.mark.parametrize("first, code", [
    (wire.RendezvousRequest(request=1, peer="x", port=1, isn=1, mss=1, sack_permitted=False,
                            timestamps=False, nat="nat"), "unauthenticated"),
    (wire.Heartbeat(1), "unauthenticated"),
    (wire.AuthResponse(b"\0" * 32), "out-of-order"),
    (wire.Challenge(b"\0" * 32), "out-of-order"),          # a server message from a client
])
def test_messages_before_authentication_are_refused(first, code):
    server = Connection(Role.SERVER)
    with pytest.raises(ProtocolViolation) as err:
        pump(wire.encode(first), server)
    assert err.value.code == code and server.state is State.CLOSED


def test_a_second_hello_is_out_of_order():
    server = Connection(Role.SERVER)
    hello = wire.encode(wire.Hello("a", b"\0" * 32))
    pump(hello, server)
    with pytest.raises(ProtocolViolation) as err:
        pump(hello, server)
    assert err.value.code == "out-of-order"


def test_short_nonce_is_refused():
    server = Connection(Role.SERVER)
    with pytest.raises(ProtocolViolation) as err:
        pump(wire.encode(wire.Hello("a", b"\0" * 8)), server)
    assert err.value.code == "bad-nonce"


def test_local_misuse_is_a_local_error():
    client = Connection(Role.CLIENT)
    with pytest.raises(LocalProtocolError):
        client.send(wire.Heartbeat(1))


def frame(type_id, payload, version=wire.VERSION, length=None):
    return struct.pack("!BBH", version, type_id, len(payload) if length is None else length) + payload


def field(fid, value):
    return struct.pack("!BH", fid, len(value)) + value


NONCE32 = field(2, b"\0" * 32)


@pytest.mark.parametrize("data, code", [
    (frame(1, field(1, b"cam") + NONCE32, version=9), "bad-version"),
    (frame(1, b"", length=wire.MAX_FRAME + 1), "frame-too-large"),
    (frame(200, b""), "unknown-type"),
    (frame(1, field(1, b"cam") + b"\x02\x00"), "truncated-field"),
    (frame(1, field(1, b"cam") + struct.pack("!BH", 2, 40) + b"\0" * 3), "truncated-field"),
    (frame(1, field(1, b"cam") + NONCE32 + field(9, b"x")), "unknown-field"),
    (frame(1, field(1, b"cam") + field(1, b"cam") + NONCE32), "duplicate-field"),
    (frame(1, field(1, b"x" * 65) + NONCE32), "bad-field-size"),
    (frame(1, field(1, b"\xff\xfe") + NONCE32), "bad-field-value"),
    (frame(1, NONCE32), "missing-field"),
])
def test_malformed_frames_get_stable_codes(data, code):
    server = Connection(Role.SERVER)
    with pytest.raises(WireError) as err:
        pump(data, server)
    assert err.value.code == code and server.state is State.CLOSED
    assert isinstance(err.value, RemoteProtocolError)


def test_bad_bool_and_address_values():
    buf = bytearray(frame(5, field(1, b"\0\0\0\1") + field(10, b"\0\1") + field(11, b"\0" * 4)
                          + field(12, b"\5\xb4") + field(14, b"\x02") + field(15, b"\1")
                          + field(16, b"nat")))
    with pytest.raises(WireError) as err:
        wire.decode_frame(buf)
    assert err.value.code == "bad-field-value"


def test_encode_refuses_oversized_fields():
    with pytest.raises(ValueError):
        wire.encode(wire.Hello("x" * 65, b"\0" * 32))
    with pytest.raises(ValueError):
        wire.encode(wire.Error("c", "r" * 300))


@settings(max_examples=2000, deadline=None)
@given(st.lists(st.one_of(
    st.binary(max_size=64),
    st.builds(lambda t, p: frame(t, p), st.integers(0, 255), st.binary(max_size=80)),
    st.builds(lambda p: frame(1, p), st.binary(max_size=80)),
), max_size=6))
def test_fuzz_the_server_machine_with_random_frames(chunks):
    """Random frames: the machine yields messages, waits for data, or raises
    a RemoteProtocolError with a code. Nothing else, ever."""
    server = Connection(Role.SERVER)
    for chunk in chunks:
        server.receive_data(chunk)
        while True:
            try:
                ev = server.next_event()
            except RemoteProtocolError as exc:
                assert exc.code
                return
            if ev is NEED_DATA or ev is CLOSED:
                break
            if isinstance(ev, wire.Hello):
                server.challenge(KEY, os.urandom)


@settings(max_examples=500, deadline=None)
@given(st.text(min_size=1, max_size=20), st.binary(min_size=32, max_size=32),
       st.binary(min_size=32, max_size=32))
def test_proofs_bind_every_input(name, s_nonce, c_nonce):
    p = auth.client_proof(KEY, name, s_nonce, c_nonce)
    assert p != auth.server_proof(KEY, name, s_nonce, c_nonce)
    assert p != auth.client_proof(KEY, name + "x", s_nonce, c_nonce)
    assert p != auth.client_proof(KEY, name, c_nonce, s_nonce) or s_nonce == c_nonce


def _ready(addr: str, relay_addr: str = "198.51.100.1", **kw) -> wire.RendezvousReady:
    return wire.RendezvousReady(
        request=1, peer="cam", addr=addr, key=b"k" * 32, plan=("nat",), start_at=1,
        role="initiator", relay_token=b"t" * 32, relay_addr=relay_addr, relay_port=7444,
        port=40000, isn=1, mss=1440, sack_permitted=True, timestamps=True, nat="none", **kw)


def test_address_fields_carry_ipv6_from_version_5_and_ipv4_alike_in_every_version():
    six = _ready("2001:db8:a::10", "2001:db8::1", local_addr="2001:db8:a::10")
    back = wire.decode_frame(bytearray(wire.encode(six, 5)))
    assert (back.addr, back.relay_addr, back.local_addr) == \
        ("2001:db8:a::10", "2001:db8::1", "2001:db8:a::10")
    # an IPv4 address is the same 4 bytes in version 4 and 5: a version-4 peer reads it
    four = _ready("203.0.113.10")
    assert wire.encode(four, 5)[1:] == wire.encode(four, 4)[1:]
    # a dual-stack socket's mapped spelling goes out as the IPv4 address
    assert wire.decode_frame(bytearray(wire.encode(_ready("::ffff:203.0.113.10"), 5))).addr \
        == "203.0.113.10"
    # never an IPv6 address to a peer that spoke version 4
    with pytest.raises(ValueError, match="version 5"):
        wire.encode(six, 4)
    ok = wire.encode(wire.AuthOk(b"m" * 32, "2001:db8:a::10", 5, 15, probe_token=b"p" * 16,
                                 alt_addr="198.51.100.1"), 5)
    msg = wire.decode_frame(bytearray(ok))
    assert (msg.addr, msg.probe_token, msg.alt_addr) == ("2001:db8:a::10", b"p" * 16,
                                                          "198.51.100.1")


@pytest.mark.parametrize("raw, version, code", [
    (b"\x20\x01\x0d\xb8" + b"\0" * 12, 4, "bad-field-size"),     # 16 bytes in a version-4 frame
    (b"\1\2\3\4\5", 5, "bad-field-size"),                         # neither 4 nor 16
    (b"\0" * 10 + b"\xff\xff" + b"\xcb\0\x71\x0a", 5, "bad-field-value"),   # mapped
])
def test_malformed_address_fields_are_refused(raw, version, code):
    payload = field(1, b"m" * 32) + field(2, raw) + field(3, b"\0\5") + field(4, b"\0\x0f")
    with pytest.raises(WireError) as err:
        wire.decode_frame(bytearray(struct.pack("!BBH", version, 65, len(payload)) + payload))
    assert err.value.code == code
