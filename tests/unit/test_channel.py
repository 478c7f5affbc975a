"""The secure channel: the sans-IO machine linked in memory, every kind of
tampering a relay could try, and the blocking and asyncio glue over real
sockets."""

from __future__ import annotations

import asyncio
import hashlib
import os
import random as pyrandom
import socket
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastpunch.channel import SecureSocket, secure_streams
from fastpunch.errors import FastpunchError, LocalProtocolError, RemoteProtocolError
from fastpunch.proto import channel as C
from fastpunch.proto.channel import (
    HEADER_BYTES, MAX_BODY, MAX_PLAINTEXT, NEED_DATA, TAG_BYTES, Channel, ChannelUsageError,
    ChannelViolation, Cipher, Closed, Confirmed, Data, RecordType,
)

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))
CIPHERS = [Cipher.AES_256_GCM, Cipher.CHACHA20_POLY1305]


def seeded(seed: int):
    rng = pyrandom.Random(seed)
    return lambda n: rng.randbytes(n)


def drain(ch: Channel) -> tuple[bytes, list]:
    """All plaintext and the non-data events the machine yields now."""
    data, events = bytearray(), []
    while True:
        ev = ch.next_event()
        if ev is NEED_DATA:
            return bytes(data), events
        if isinstance(ev, Data):
            data += ev.data
        else:
            events.append(ev)
            if isinstance(ev, Closed):
                return bytes(data), events


def pair(key_i=KEY, key_r=KEY, cipher_i=None, cipher_r=None, rand_i=None, rand_r=None):
    """Two machines, handshake done (or the error it raised)."""
    a = Channel("initiator", key_i, cipher=cipher_i, **({"random": rand_i} if rand_i else {}))
    b = Channel("responder", key_r, cipher=cipher_r, **({"random": rand_r} if rand_r else {}))
    b.receive_data(a.start())
    a.receive_data(b.start())
    assert a.next_event() is NEED_DATA and b.next_event() is NEED_DATA
    ca, cb = a.data_to_send(), b.data_to_send()
    assert ca and cb
    return a, b, ca, cb


def confirmed_pair(**kw):
    a, b, ca, cb = pair(**kw)
    b.receive_data(ca)
    a.receive_data(cb)
    assert a.next_event() == Confirmed() and b.next_event() == Confirmed()
    assert a.confirmed and b.confirmed
    return a, b


def records(stream: bytes) -> list[bytes]:
    """Split a byte stream into records by their headers."""
    out, pos = [], 0
    while pos < len(stream):
        length = int.from_bytes(stream[pos + 1:pos + 3], "big")
        out.append(stream[pos:pos + HEADER_BYTES + length])
        pos += HEADER_BYTES + length
    return out


def code_of(ch: Channel, data: bytes, eof: bool = True) -> str:
    ch.receive_data(data)
    if eof:
        ch.receive_data(b"")
    with pytest.raises(ChannelViolation) as info:
        drain(ch)
    return info.value.code


# -- handshake and data ------------------------------------------------------------------

@pytest.mark.parametrize("cipher", CIPHERS, ids=["aes-gcm", "chacha20"])
def test_handshake_then_data_both_ways(cipher):
    a, b, ca, cb = pair(cipher_i=cipher)
    assert not a.confirmed and not b.confirmed
    with pytest.raises(ChannelUsageError) as info:
        a.send_data(b"too early")
    assert info.value.code == "not-confirmed"
    b.receive_data(ca)
    a.receive_data(cb)
    assert a.next_event() == Confirmed() and b.next_event() == Confirmed()
    assert a.cipher is b.cipher is cipher
    b.receive_data(a.send_data(b"ping" * 5000))
    assert drain(b) == (b"ping" * 5000, [])
    a.receive_data(b.send_data(b"pong"))
    assert drain(a) == (b"pong", [])
    b.receive_data(a.close())
    b.receive_data(b"")
    assert drain(b) == (b"", [Closed()])
    assert b.next_event() == Closed()            # stays closed
    a.receive_data(b.close())
    assert drain(a) == (b"", [Closed()])


def test_initiator_chooses_the_cipher():
    a, b = confirmed_pair(cipher_i=Cipher.CHACHA20_POLY1305, cipher_r=Cipher.AES_256_GCM)
    assert a.cipher is b.cipher is Cipher.CHACHA20_POLY1305
    b.receive_data(a.send_data(b"x" * 40000))
    assert drain(b)[0] == b"x" * 40000


def test_large_writes_are_cut_into_16k_records():
    a, b = confirmed_pair()
    wire = bytes(a.send_data(os.urandom(3 * MAX_PLAINTEXT + 5)))
    lengths = [len(r) - HEADER_BYTES for r in records(wire)]
    assert lengths == [MAX_BODY] * 3 + [5 + TAG_BYTES]
    assert all(r[0] == RecordType.DATA for r in records(wire))


@pytest.mark.parametrize("cipher", CIPHERS, ids=["aes-gcm", "chacha20"])
@settings(max_examples=60, deadline=None)
@given(messages=st.lists(st.binary(max_size=40000), max_size=6),
       cuts=st.lists(st.integers(1, 70000), max_size=30), data=st.data())
def test_round_trip_under_any_chunking(cipher, messages, cuts, data):
    a = Channel("initiator", KEY, cipher=cipher)
    b = Channel("responder", KEY, cipher=cipher)
    # Everything a sends, in order; fed to b in arbitrary pieces.
    a_wire = bytearray(a.start())
    b_wire = bytearray(b.start())
    a.receive_data(bytes(b_wire))
    a.next_event()
    a_wire += a.data_to_send()
    b.receive_data(bytes(a_wire[:HEADER_BYTES + C.HELLO_BODY_BYTES]))
    b.next_event()
    a.receive_data(b.data_to_send())
    assert a.next_event() == Confirmed()
    for m in messages:
        a_wire += a.send_data(m)
    a_wire += a.close()
    b = Channel("responder", KEY, cipher=cipher, random=lambda n: bytes(b_wire[3 + 3:3 + 3 + n]))
    assert b.start() == bytes(b_wire)          # same hello, so the same keys
    got, events, pos = bytearray(), [], 0
    points = sorted({min(c, len(a_wire)) for c in cuts} | {len(a_wire)})
    for end in points:
        b.receive_data(bytes(a_wire[pos:end]))
        pos = end
        d, ev = drain(b)
        got += d
        events += ev
    assert bytes(got) == b"".join(messages)
    assert events == [Confirmed(), Closed()]
    # and the other way round, b -> a, in data-drawn pieces
    back = data.draw(st.binary(max_size=50000))
    wire = bytes(b.send_data(back)) + b.close()
    out = bytearray()
    i = 0
    while i < len(wire):
        step = data.draw(st.integers(1, 9000))
        a.receive_data(wire[i:i + step])
        i += step
        out += drain(a)[0]
    assert bytes(out) == back


# -- tampering -----------------------------------------------------------------------------

PLAIN = bytes(range(100))           # one data record: body = 100 + 16 = 116 bytes


def victim():
    """A receiver ready for data, and the sender's first data record and close."""
    a, b = confirmed_pair()
    rec = bytes(a.send_data(PLAIN))
    assert len(rec) == HEADER_BYTES + len(PLAIN) + TAG_BYTES
    return a, b, rec


def flip(rec: bytes, bit: int) -> bytes:
    out = bytearray(rec)
    out[bit // 8] ^= 0x80 >> (bit % 8)
    return bytes(out)


def header_expectation(bit: int) -> str:
    """What the spec says a flipped header bit must give (stream then ends)."""
    if bit < 8:                                       # the type byte, DATA = 0x03
        new_type = RecordType.DATA ^ (0x80 >> bit)
        return "unexpected-record" if new_type in (RecordType.HELLO, RecordType.CONFIRM) \
            else "unknown-record-type"
    new_len = (len(PLAIN) + TAG_BYTES) ^ (0x8000 >> (bit - 8))
    if new_len > MAX_BODY:
        return "record-too-large"
    if new_len > len(PLAIN) + TAG_BYTES:
        return "truncated"                            # waits for bytes that never come
    return "bad-record-mac"                           # authenticates the wrong span


@pytest.mark.parametrize("bit", range(HEADER_BYTES * 8))
def test_any_header_bit_flip_is_rejected(bit):
    _, b, rec = victim()
    assert code_of(b, flip(rec, bit)) == header_expectation(bit)


def test_header_bit_expectations_cover_every_outcome():
    # Guard against the parametrized test above checking only one code.
    assert {header_expectation(b) for b in range(24)} == {
        "unexpected-record", "unknown-record-type", "record-too-large", "truncated",
        "bad-record-mac"}


def test_record_type_is_authenticated():
    _, b, rec = victim()
    forged = bytes([RecordType.CLOSE]) + rec[1:]      # data relabelled close
    assert code_of(b, forged) == "bad-record-mac"


@pytest.mark.parametrize("region", ["ciphertext", "tag"])
def test_every_body_bit_flip_is_bad_record_mac(region):
    _, _, rec = victim()
    lo = HEADER_BYTES if region == "ciphertext" else len(rec) - TAG_BYTES
    hi = len(rec) - TAG_BYTES if region == "ciphertext" else len(rec)
    for bit in range(lo * 8, hi * 8):
        _, b, rec = victim()
        assert code_of(b, flip(rec, bit), eof=False) == "bad-record-mac", bit


def test_untampered_record_passes():
    # The control for the flip tests: the same record unflipped is accepted.
    _, b, rec = victim()
    b.receive_data(rec)
    assert drain(b) == (PLAIN, [])


def test_replayed_record():
    a, b = confirmed_pair()
    r1 = bytes(a.send_data(b"pay 10 coins"))
    b.receive_data(r1)
    assert drain(b)[0] == b"pay 10 coins"
    assert code_of(b, r1, eof=False) == "bad-record-mac"


def test_reordered_records():
    a, b = confirmed_pair()
    r1, r2 = bytes(a.send_data(b"first")), bytes(a.send_data(b"second"))
    assert code_of(b, r2 + r1, eof=False) == "bad-record-mac"


def test_dropped_record():
    a, b = confirmed_pair()
    r1, r2, r3 = (bytes(a.send_data(m)) for m in (b"one", b"two", b"three"))
    b.receive_data(r1)
    assert drain(b)[0] == b"one"
    assert code_of(b, r3, eof=False) == "bad-record-mac"


def test_dropped_close_is_truncation():
    _, b, rec = victim()
    b.receive_data(rec)
    assert drain(b)[0] == PLAIN
    assert code_of(b, b"") == "truncated"


@pytest.mark.parametrize("keep", [1, HEADER_BYTES, HEADER_BYTES + 50])
def test_eof_inside_a_record_is_truncation(keep):
    _, b, rec = victim()
    assert code_of(b, rec[:keep]) == "truncated"


def test_eof_during_handshake_is_truncation():
    a = Channel("initiator", KEY)
    a.start()
    assert code_of(a, b"") == "truncated"


@pytest.mark.parametrize("who", ["initiator", "responder"])
def test_wrong_session_key_fails_confirm_on_both_ends(who):
    a, b, ca, cb = pair(key_r=OTHER_KEY)
    target, confirm = (a, cb) if who == "initiator" else (b, ca)
    assert code_of(target, confirm, eof=False) == "confirm-failed"
    assert not target.confirmed


NONCE_AT = HEADER_BYTES + 3                          # version, cipher, role, nonce[32]


@pytest.mark.parametrize("side", ["initiator", "responder"])
@pytest.mark.parametrize("byte", [0, 17, 31])
def test_altered_hello_nonce_fails_confirm(side, byte):
    """The hellos are cleartext, but both confirms cover both of them."""
    a = Channel("initiator", KEY)
    b = Channel("responder", KEY)
    ha, hb = bytearray(a.start()), bytearray(b.start())
    (ha if side == "initiator" else hb)[NONCE_AT + byte] ^= 0x01
    b.receive_data(bytes(ha))
    a.receive_data(bytes(hb))
    assert b.next_event() is NEED_DATA and a.next_event() is NEED_DATA
    ca, cb = a.data_to_send(), b.data_to_send()
    assert code_of(a, cb, eof=False) == "confirm-failed"
    assert code_of(b, ca, eof=False) == "confirm-failed"


@pytest.mark.parametrize("offset,value,code", [
    (HEADER_BYTES + 0, 2, "bad-hello"),              # version
    (HEADER_BYTES + 1, 0, "bad-hello"),              # cipher id 0
    (HEADER_BYTES + 1, 3, "bad-hello"),              # cipher id 3
    (HEADER_BYTES + 2, 0, "bad-hello"),              # role 0
    (HEADER_BYTES + 2, 2, "role-conflict"),          # initiator claims responder
])
def test_altered_hello_fields_are_refused(offset, value, code):
    hello = bytearray(Channel("initiator", KEY).start())
    hello[offset] = value
    b = Channel("responder", KEY)
    b.start()
    assert code_of(b, bytes(hello), eof=False) == code


def test_cipher_downgrade_fails_confirm():
    a = Channel("initiator", KEY, cipher=Cipher.AES_256_GCM)
    b = Channel("responder", KEY)
    hello = bytearray(a.start())
    hello[HEADER_BYTES + 1] = Cipher.CHACHA20_POLY1305
    b.receive_data(bytes(hello))
    a.receive_data(b.start())
    b.next_event(), a.next_event()
    assert b.cipher is Cipher.CHACHA20_POLY1305 and a.cipher is Cipher.AES_256_GCM
    assert code_of(a, b.data_to_send(), eof=False) == "confirm-failed"


def test_data_before_confirm_is_refused():
    a, b, ca, cb = pair()
    a.receive_data(cb)
    assert a.next_event() == Confirmed()
    rec = bytes(a.send_data(b"secret"))
    # The relay withholds a's confirm and forwards its data record.
    assert code_of(b, rec, eof=False) == "unexpected-record"
    assert not b.confirmed


def test_data_right_after_confirm_is_accepted():
    # The control for the test above: with the confirm in front, it passes.
    a, b, ca, cb = pair()
    a.receive_data(cb)
    assert a.next_event() == Confirmed()
    b.receive_data(ca + bytes(a.send_data(b"secret")))
    assert drain(b) == (b"secret", [Confirmed()])


def test_oversized_length_is_refused_before_the_body_arrives():
    _, b, _ = victim()
    header = bytes([RecordType.DATA]) + (MAX_BODY + 1).to_bytes(2, "big")
    assert code_of(b, header, eof=False) == "record-too-large"


def test_largest_legal_record_is_accepted():
    a, b = confirmed_pair()
    b.receive_data(a.send_data(b"z" * MAX_PLAINTEXT))
    assert drain(b)[0] == b"z" * MAX_PLAINTEXT


@pytest.mark.parametrize("rtype", [0, 5, 0x17, 0xFF])
def test_unknown_record_type(rtype):
    _, b, rec = victim()
    assert code_of(b, bytes([rtype]) + rec[1:], eof=False) == "unknown-record-type"


def test_second_hello_and_second_confirm_are_unexpected():
    a, b, ca, cb = pair()
    b.receive_data(ca)
    assert b.next_event() == Confirmed()
    assert code_of(b, a._my_hello, eof=False) == "unexpected-record"
    a2, b2, ca2, _ = pair()
    assert code_of(b2, ca2 + ca2, eof=False) == "unexpected-record"


def test_bytes_after_close_are_unexpected():
    a, b, rec = victim()
    tail = bytes(a.send_data(b"x"))
    b.receive_data(rec + tail + a.close())
    assert drain(b) == (PLAIN + b"x", [Closed()])
    assert code_of(b, tail, eof=False) == "unexpected-record"


def test_role_conflict_and_malformed_hello():
    a1, a2 = Channel("initiator", KEY), Channel("initiator", KEY)
    a1.start()
    assert code_of(a1, a2.start(), eof=False) == "role-conflict"
    b = Channel("responder", KEY)
    b.start()
    short = bytes([RecordType.HELLO, 0, 10]) + bytes(10)
    assert code_of(b, short, eof=False) == "bad-hello"
    b = Channel("responder", KEY)
    hello = bytearray(Channel("initiator", KEY).start())
    hello[HEADER_BYTES] = 9                        # version
    b.start()
    assert code_of(b, bytes(hello), eof=False) == "bad-hello"


def test_reflected_hello_is_refused():
    a = Channel("initiator", KEY)
    hello = a.start()
    assert code_of(a, hello, eof=False) == "role-conflict"


def test_own_records_reflected_back_fail():
    a, b = confirmed_pair()
    rec = bytes(a.send_data(b"to b"))
    assert code_of(a, rec, eof=False) == "bad-record-mac"


def test_errors_are_sticky_and_close_the_machine():
    a, b, rec = victim()
    bad = flip(rec, HEADER_BYTES * 8 + 3)
    b.receive_data(bad)
    with pytest.raises(C.BadRecordMAC) as first:
        b.next_event()
    good = bytes(a.send_data(b"later"))
    b.receive_data(good)
    with pytest.raises(C.BadRecordMAC) as again:
        b.next_event()
    assert again.value is first.value
    assert b.closed
    with pytest.raises(ChannelUsageError) as info:
        b.send_data(b"reply")
    assert info.value.code == "closed"
    assert b.close() == b""


def test_error_hierarchy():
    for cls in (C.BadHello, C.RoleConflict, C.UnknownRecordType, C.UnexpectedRecord,
                C.RecordTooLarge, C.BadRecordMAC, C.ConfirmFailed, C.BadClose, C.Truncated,
                C.RecordLimit):
        assert issubclass(cls, ChannelViolation)
        assert issubclass(cls, RemoteProtocolError) and issubclass(cls, FastpunchError)
    assert issubclass(ChannelUsageError, LocalProtocolError)
    codes = [cls.code for cls in ChannelViolation.__subclasses__()]
    assert len(codes) == len(set(codes)) and "channel-violation" not in codes


# -- nonces, counters, keys -----------------------------------------------------------------

def test_directions_use_different_keys_and_nonces():
    a, b = confirmed_pair()
    assert a._send_seq == b._send_seq == 1              # each sent its confirm as record 0
    ra, rb = bytes(a.send_data(PLAIN)), bytes(b.send_data(PLAIN))
    assert ra[:HEADER_BYTES] == rb[:HEADER_BYTES]       # same type, same length
    assert ra != rb                                     # same counter, same plaintext
    assert a._send_iv != b._send_iv and a._send_iv == b._recv_iv and b._send_iv == a._recv_iv
    assert a._send_aead is not a._recv_aead


def test_counter_advances_so_repeats_encrypt_differently():
    a, _ = confirmed_pair()
    seqs, bodies = [], []
    for _ in range(3):
        bodies.append(bytes(a.send_data(PLAIN)))
        seqs.append(a._send_seq)
    assert seqs == [2, 3, 4]
    assert len(set(bodies)) == 3


def test_refuses_to_send_past_the_last_counter():
    a, b = confirmed_pair()
    a._send_seq = 2 ** 64 - 2
    a.send_data(b"one")                                  # counter 2**64-2
    a.send_data(b"two")                                  # counter 2**64-1, the last
    with pytest.raises(ChannelUsageError) as info:
        a.send_data(b"three")
    assert info.value.code == "record-limit"
    with pytest.raises(ChannelUsageError):
        a.close()
    a._send_seq = 2 ** 64 - 1
    with pytest.raises(ChannelUsageError):                # 2 records needed, 1 left
        a.send_data(b"y" * (MAX_PLAINTEXT + 1))


def test_same_session_key_twice_gives_different_traffic():
    a1, b1 = confirmed_pair()
    a2, b2 = confirmed_pair()
    assert a1._my_nonce != a2._my_nonce
    assert bytes(a1.send_data(PLAIN)) != bytes(a2.send_data(PLAIN))
    # A record of one connection is refused by the other.
    assert code_of(b2, bytes(a1.send_data(b"cross")), eof=False) == "bad-record-mac"


def test_same_nonces_would_give_the_same_traffic():
    # The control for the test above: it is the nonces that make the difference.
    a1, b1 = confirmed_pair(rand_i=seeded(1), rand_r=seeded(2))
    a2, b2 = confirmed_pair(rand_i=seeded(1), rand_r=seeded(2))
    assert bytes(a1.send_data(PLAIN)) == bytes(a2.send_data(PLAIN))


def test_relay_sees_no_plaintext_and_no_key():
    marker = b"SECRET-MARKER-" * 50
    a, b, ca, cb = pair()
    wire = a._my_hello + ca + b._my_hello + cb
    b.receive_data(ca)
    a.receive_data(cb)
    a.next_event(), b.next_event()
    wire += bytes(a.send_data(marker)) + bytes(b.send_data(marker))
    assert b"SECRET-MARKER" not in wire and KEY not in wire
    for r in records(wire):
        assert r[0] != RecordType.DATA or b"SECRET" not in r


def test_bad_arguments():
    with pytest.raises(ChannelUsageError):
        Channel("initiator", b"short")
    with pytest.raises(ChannelUsageError):
        Channel("observer", KEY)
    ch = Channel("initiator", KEY)
    with pytest.raises(ChannelUsageError) as info:
        ch.next_event()
    assert info.value.code == "not-started"


# -- cipher choice -----------------------------------------------------------------------------

X86 = "processor\t: 0\nflags\t\t: fpu sse2 {}\n"
ARM = "processor\t: 0\nFeatures\t: fp asimd {}\n"


@pytest.mark.parametrize("text,machine,want", [
    (X86.format("aes pclmulqdq avx2"), "x86_64", True),
    (X86.format("pclmulqdq avx2"), "x86_64", False),
    (X86.format("aes avx2"), "x86_64", False),
    (ARM.format("aes pmull sha2"), "aarch64", True),
    (ARM.format("sha2 pmull"), "aarch64", False),
    (X86.format("aes pclmulqdq"), "riscv64", False),
    ("", "x86_64", False),
])
def test_cpu_prefers_aes(text, machine, want):
    assert C.cpu_prefers_aes(text, machine) is want


def test_default_cipher_matches_this_cpu():
    import platform
    with open("/proc/cpuinfo") as f:
        aes = C.cpu_prefers_aes(f.read(), platform.machine())
    assert C.default_cipher() is (Cipher.AES_256_GCM if aes else Cipher.CHACHA20_POLY1305)


# -- over real sockets ---------------------------------------------------------------------------

BIG = 8 * 1024 * 1024


def test_secure_socket_over_socketpair_carries_8_mib():
    payload = os.urandom(BIG)
    left, right = socket.socketpair()
    result, errors = {}, []

    def responder():
        try:
            with SecureSocket(right, "responder", KEY) as s:
                h, n = hashlib.sha256(), 0
                while True:
                    chunk = s.recv(1 << 20)
                    if not chunk:
                        break
                    h.update(chunk)
                    n += len(chunk)
                result.update(n=n, digest=h.digest())
                s.sendall(b"got " + str(n).encode())
        except Exception as exc:                     # surfaced below
            errors.append(exc)

    t = threading.Thread(target=responder)
    t.start()
    with SecureSocket(left, "initiator", KEY) as s:
        assert s.channel.confirmed
        s.sendall(payload[:1000])
        s.sendall(memoryview(payload)[1000:])
        s.close_write()                              # our close record; keep reading
        reply = b""
        while True:
            chunk = s.recv(100)
            if not chunk:
                break
            reply += chunk
    t.join(30)
    assert not errors, errors
    assert result == {"n": BIG, "digest": hashlib.sha256(payload).digest()}
    assert reply == b"got %d" % BIG


def test_secure_socket_wrong_key_raises_confirm_failed_on_both():
    left, right = socket.socketpair()
    errors = []

    def responder():
        try:
            SecureSocket(right, "responder", OTHER_KEY)
        except ChannelViolation as exc:
            errors.append(exc.code)
        finally:
            right.close()

    t = threading.Thread(target=responder)
    t.start()
    with pytest.raises(ChannelViolation) as info:
        SecureSocket(left, "initiator", KEY)
    left.close()
    t.join(10)
    assert info.value.code == "confirm-failed"
    assert errors == ["confirm-failed"]


def test_secure_socket_truncation_is_an_error():
    left, right = socket.socketpair()
    t = threading.Thread(target=lambda: SecureSocket(right, "responder", KEY).sendall(b"hi"))
    t.start()
    s = SecureSocket(left, "initiator", KEY)
    t.join(10)
    assert s.recv(10) == b"hi"
    right.close()                                    # EOF, no close record
    with pytest.raises(C.Truncated):
        s.recv(10)
    s.close()


def test_asyncio_over_loopback_tcp_carries_8_mib():
    payload = os.urandom(BIG)

    async def main():
        got = {}

        async def on_conn(reader, writer):
            sr, sw = await secure_streams(reader, writer, "responder", KEY)
            h, n = hashlib.sha256(), 0
            head = await sr.readexactly(16)
            h.update(head)
            n += 16
            while True:
                chunk = await sr.read(1 << 20)
                if not chunk:
                    break
                h.update(chunk)
                n += len(chunk)
            got.update(n=n, digest=h.digest())
            sw.write(h.digest())
            await sw.drain()
            sw.close()
            await sw.wait_closed()

        server = await asyncio.start_server(on_conn, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        sr, sw = await secure_streams(reader, writer, "initiator", KEY)
        for off in range(0, BIG, 1_000_003):
            sw.write(payload[off:off + 1_000_003])
            await sw.drain()
        sw.write(b"")
        sw.write_eof()                                # our close record; keep reading
        await sw.drain()
        digest = await sr.readexactly(32)
        assert await sr.read() == b""
        assert sr.at_eof()
        with pytest.raises(asyncio.IncompleteReadError):
            await sr.readexactly(1)
        sw.close()
        await sw.wait_closed()
        server.close()
        await server.wait_closed()
        return got, digest

    got, digest = asyncio.run(asyncio.wait_for(main(), 60))
    want = hashlib.sha256(payload).digest()
    assert got == {"n": BIG, "digest": want}
    assert digest == want


def test_confirm_is_still_owed_when_the_peers_confirm_arrives_with_its_hello():
    a = Channel("initiator", KEY)
    b = Channel("responder", OTHER_KEY)
    ha, hb = a.start(), b.start()
    a.receive_data(hb)
    assert a.next_event() is NEED_DATA
    ca = a.data_to_send()
    b.receive_data(ha + ca)                     # hello and failing confirm in one read
    with pytest.raises(C.ConfirmFailed):
        b.next_event()
    cb = b.data_to_send()
    assert cb and cb[0] == RecordType.CONFIRM
    assert code_of(a, cb, eof=False) == "confirm-failed"


def test_key_schedule_matches_the_documentation():
    """Derive the keys independently, as docs/channel.md states them, and open
    the initiator's confirm and first data record and the responder's data."""
    import hmac

    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    a, b, ca, cb = pair(cipher_i=Cipher.AES_256_GCM)
    ha, hb = a._my_hello, b._my_hello
    nonce_i, nonce_r = ha[6:38], hb[6:38]
    transcript = hashlib.sha256(b"fastpunch-channel-v1" + ha + hb).digest()
    okm = HKDF(algorithm=hashes.SHA256(), length=152, salt=nonce_i + nonce_r,
               info=b"fastpunch-channel-v1 keys" + transcript).derive(KEY)
    i2r = AESGCM(okm[0:32]), int.from_bytes(okm[32:44], "big")
    r2i = AESGCM(okm[44:76]), int.from_bytes(okm[76:88], "big")

    def open_(direction, seq, rec):
        aead, iv = direction
        return aead.decrypt((iv ^ seq).to_bytes(12, "big"), rec[HEADER_BYTES:], rec[:HEADER_BYTES])

    assert open_(i2r, 0, ca) == hmac.new(okm[88:120], b"fastpunch-channel-v1 initiator confirm"
                                         + transcript, hashlib.sha256).digest()
    assert open_(r2i, 0, cb) == hmac.new(okm[120:152], b"fastpunch-channel-v1 responder confirm"
                                         + transcript, hashlib.sha256).digest()
    b.receive_data(ca)
    a.receive_data(cb)
    a.next_event(), b.next_event()
    assert open_(i2r, 1, bytes(a.send_data(b"to responder"))) == b"to responder"
    assert open_(r2i, 1, bytes(b.send_data(b"to initiator"))) == b"to initiator"
    assert open_(r2i, 2, b.close()) == b""


def test_records_before_a_bad_one_are_released_then_the_error():
    a, b = confirmed_pair()
    r1, r2, r3 = (bytes(a.send_data(m)) for m in (b"one", b"two", b"three"))
    b.receive_data(r1 + r2 + flip(r3, len(r3) * 8 - 1))
    assert b.next_event().data == b"onetwo"            # authentic, so released
    with pytest.raises(C.BadRecordMAC):
        b.next_event()


def test_runs_of_records_are_opened_together_and_capped():
    a, b = confirmed_pair()
    n = C.RUN_RECORDS + 3
    payload = os.urandom(n * MAX_PLAINTEXT)
    b.receive_data(a.send_data(payload))
    first, second = b.next_event(), b.next_event()
    assert len(first.data) == C.RUN_RECORDS * MAX_PLAINTEXT
    assert bytes(first.data) + bytes(second.data) == payload
    assert b.next_event() is NEED_DATA


def test_without_encrypt_into_and_decrypt_into():
    """cryptography < 45 has no *_into: the one-record-at-a-time path."""
    a, b = confirmed_pair()
    for ch in (a, b):
        ch._encrypt_into = ch._decrypt_into = None
    payload = os.urandom(3 * MAX_PLAINTEXT + 7)
    wire = bytes(a.send_data(payload))
    assert [len(r) for r in records(wire)] == [HEADER_BYTES + MAX_BODY] * 3 + [26]
    b.receive_data(wire + a.close())
    assert drain(b) == (payload, [Closed()])
    a2, b2 = confirmed_pair()
    b2._decrypt_into = None
    r1, r2 = bytes(a2.send_data(b"one")), bytes(a2.send_data(b"two"))
    assert code_of(b2, r1 + flip(r2, 40), eof=False) == "bad-record-mac"


def test_two_threads_sealing_at_once_never_share_a_nonce():
    # a resumable session's reader seals ACKs while its writer seals data:
    # every record counter (the nonce) is taken once, whatever the threads do
    import threading
    import time as _time

    a, _ = confirmed_pair()
    used, seal = [], a._encrypt_into or a._send_aead.encrypt
    lock = threading.Lock()

    def recording(nonce, *rest):
        with lock:
            used.append(nonce)
        _time.sleep(0)                      # invite a switch mid-record
        return seal(nonce, *rest)

    if a._encrypt_into is not None:
        a._encrypt_into = recording
    else:
        a._send_aead = type("Rec", (), {"encrypt": staticmethod(recording)})()
    data = os.urandom(3 * MAX_PLAINTEXT + 5)
    threads = [threading.Thread(target=lambda: [a.send_data(data) for _ in range(50)])
               for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(used) == 3 * 50 * 4 and len(set(used)) == len(used)


# -- read_into / recv_into: records opened straight into the caller's buffer -------------

def test_read_into_opens_whole_records_that_fit_and_leaves_the_rest():
    a, b = confirmed_pair()
    msg = os.urandom(3 * MAX_PLAINTEXT + 100)
    b.receive_data(a.send_data(msg))
    out = bytearray(2 * MAX_PLAINTEXT + 50)            # room for two whole records
    n = b.read_into(out)
    assert n == 2 * MAX_PLAINTEXT and out[:n] == msg[:n]
    assert b.read_into(bytearray(MAX_PLAINTEXT - 1)) == 0    # the next does not fit
    n2 = b.read_into(out)                              # the third and the short last one
    assert out[:n2] == msg[n:] and n2 == MAX_PLAINTEXT + 100
    assert drain(b) == (b"", [])
    assert b.read_into(out) == 0                       # nothing left
    b.receive_data(a.send_data(b"x" * 100))
    tail, events = drain(b)                            # next_event still reads them
    assert tail == b"x" * 100 and events == []


def test_read_into_leaves_what_is_not_data_to_next_event():
    a, b = confirmed_pair()
    b.receive_data(a.send_data(b"") + a.close())        # (an empty send makes no record)
    assert b.read_into(bytearray(1 << 16)) == 0
    assert b.next_event() == Closed()
    fresh = Channel("responder", KEY)
    assert fresh.read_into(bytearray(100)) == 0         # before any hello: nothing to read


def test_read_into_refuses_a_tampered_record_and_keeps_refusing():
    a, b = confirmed_pair()
    stream = bytearray(a.send_data(os.urandom(2 * MAX_PLAINTEXT)))
    stream[HEADER_BYTES + MAX_BODY + HEADER_BYTES + 10] ^= 1     # inside the second record
    b.receive_data(bytes(stream))
    out = bytearray(4 * MAX_PLAINTEXT)
    assert b.read_into(out) == MAX_PLAINTEXT           # the authentic first one is released
    with pytest.raises(ChannelViolation) as err:
        b.read_into(out)
    assert err.value.code == "bad-record-mac"
    with pytest.raises(ChannelViolation):
        b.next_event()                                  # the channel stays failed
    with pytest.raises(TypeError):
        confirmed_pair()[1].read_into(bytes(100))       # read-only


@pytest.mark.parametrize("size", [1, 1000, MAX_PLAINTEXT, 5 * MAX_PLAINTEXT + 7, 1 << 20])
def test_recv_into_delivers_the_stream_exactly_at_any_buffer_size(size):
    left, right = socket.socketpair()
    payload = os.urandom(300_000)
    box: dict = {}

    def serve():
        s = SecureSocket(right, "responder", KEY)
        got, buf = bytearray(), bytearray(size)
        while n := s.recv_into(buf):
            got += buf[:n]
        box["got"] = bytes(got)
        s.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    s = SecureSocket(left, "initiator", KEY)
    s.sendall(payload)
    s.close_write()
    t.join(30)
    s.close()
    assert box["got"] == payload


def test_recv_into_honours_nbytes_and_mixes_with_recv():
    left, right = socket.socketpair()
    box: dict = {}

    def serve():
        s = SecureSocket(right, "responder", KEY)
        buf = bytearray(64)
        parts = [bytes(buf[:s.recv_into(buf, 10)])]      # a record taken in part...
        parts.append(s.recv(5))                          # ...the rest by either call
        parts.append(bytes(buf[:s.recv_into(buf)]))
        with pytest.raises(ValueError):
            s.recv_into(buf, -1)
        assert s.recv_into(bytearray(0)) == 0
        box["parts"] = parts
        box["end"] = s.recv_into(buf)
        s.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    s = SecureSocket(left, "initiator", KEY)
    s.sendall(b"0123456789abcdefghij")
    s.close_write()
    t.join(30)
    s.close()
    assert b"".join(box["parts"]) == b"0123456789abcdefghij" and box["parts"][0] == b"0123456789"
    assert box["end"] == 0
