"""Candidates on the wire and in pairs: RFC 8445 priorities, the bounded and
validated list, version 2 of the CCS protocol beside version 1, and the
CCS's check that a device cannot aim its peer at third parties."""

from __future__ import annotations

import os
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastpunch.proto import candidates as cands
from fastpunch.proto import wire
from fastpunch.proto.candidates import Candidate, CandidateError, form_pairs, pair_priority
from fastpunch.proto.connection import Connection, ProtocolViolation, Role, State
from fastpunch.proto.kinds import CandidateKind as K
from fastpunch.proto.kinds import Mapping, Role as Side, parse

HOST = Candidate(K.HOST, "10.1.0.2", 40000, cands.priority(K.HOST), 24)
SRFLX = Candidate(K.SRFLX, "203.0.113.10", 40001, cands.priority(K.SRFLX))
MAPPED = Candidate(K.MAPPED, "203.0.113.10", 41000, cands.priority(K.MAPPED))


def test_priorities_follow_rfc_8445():
    assert cands.priority(K.HOST) == (126 << 24) | (65535 << 8) | 255
    assert cands.priority(K.HOST) > cands.priority(K.MAPPED) > cands.priority(K.SRFLX) > \
        cands.priority(K.PREDICTED)
    # 6.1.2.3, and the same number whichever side computes it
    g, d = 1000, 7
    assert pair_priority(g, d) == (1 << 32) * 7 + 2 * 1000 + 1
    assert pair_priority(d, g) == (1 << 32) * 7 + 2 * 1000


def test_a_list_round_trips_in_a_version_2_frame():
    info = dict(port=40001, isn=7, mss=1460, sack_permitted=True, timestamps=True, nat="nat",
                candidates=(HOST, SRFLX, MAPPED), mapping="preserve", filtering="drop")
    msg = wire.RendezvousAnswer(request=9, **info)
    assert wire.decode_frame(bytearray(wire.encode(msg))) == msg


def test_version_1_frames_leave_version_2_fields_out_and_may_not_carry_them():
    msg = wire.RendezvousAnswer(request=9, port=1, isn=2, mss=1460, sack_permitted=True,
                                timestamps=True, nat="nat", candidates=(HOST,), mapping="random")
    old = wire.decode_frame(bytearray(wire.encode(msg, 1)))
    assert old.candidates is None and old.mapping is None and old.port == 1
    # a version-1 frame with a version-2 field: what a version-1 decoder says
    v2 = wire.encode(msg)
    forged = bytearray(v2)
    forged[0] = 1
    with pytest.raises(wire.WireError) as err:
        wire.decode_frame(forged)
    assert err.value.code == "unknown-field"
    left = wire.encode(wire.PeerLeft(1, "cam", "peer-gone", "gone"))
    forged = bytearray(left)
    forged[0] = 1
    with pytest.raises(wire.WireError) as err:
        wire.decode_frame(forged)
    assert err.value.code == "unknown-type"
    with pytest.raises(ValueError, match="needs protocol version 2"):
        wire.encode(wire.PeerLeft(1, "cam", "x", "y"), 1)


def login(version: int, **accept_kw):
    """(client, server, AuthOk as the client decoded it) after a login in
    ``version``; ``accept_kw`` go to the server's accept()."""
    accept_kw = {"probe_port": 7444, "probe_port2": 7445, **accept_kw}
    client = Connection(Role.CLIENT, version)
    server = Connection(Role.SERVER)
    key = bytes(32)
    server.receive_data(client.hello("cam", key, os.urandom))
    server.next_event()
    client.receive_data(server.challenge(key, os.urandom))
    client.next_event()
    server.receive_data(client.respond())
    server.next_event()
    client.receive_data(server.accept("203.0.113.10", 4000, 15, **accept_kw))
    ok = client.next_event()
    return client, server, ok


def test_a_ccs_answers_each_device_in_the_version_of_its_hello():
    client, server, ok = login(1)
    assert server.version == 1 and ok.probe_port == 7444 and ok.probe_port2 is None
    assert client.state is server.state is State.READY
    # a version-2 message cannot go to a version-1 device
    with pytest.raises(ValueError):
        server.send(wire.PeerLeft(1, "b", "peer-gone", "gone"))
    client, server, ok = login(2)
    assert server.version == 2 and ok.probe_port2 == 7445


def test_an_older_ccs_refusing_our_hello_is_version_refused_not_garbage():
    client = Connection(Role.CLIENT)
    client.hello("cam", bytes(32), os.urandom)
    # what a version-1 CCS answers a version-2 Hello (its decoder says bad-version)
    client.receive_data(wire.encode(wire.Error("bad-version", "protocol version 2, expected 1"),
                                    1))
    with pytest.raises(ProtocolViolation) as err:
        client.next_event()
    assert err.value.code == "version-refused" and "version 1" in str(err.value)


def test_an_error_reason_is_cut_to_its_cap_in_bytes():
    server = Connection(Role.SERVER)
    frame = server.error("bad", "é" * 256)             # 512 bytes of UTF-8
    got = wire.decode_frame(bytearray(frame))
    assert got.code == "bad" and len(got.reason.encode()) <= wire.REASON


@pytest.mark.parametrize("data,code", [
    (bytes([9, 4]) + bytes(11), "bad-kind"),
    (bytes([1, 5]) + bytes(11), "bad-family"),
    (bytes([1, 4, 10, 0]), "truncated"),
    (bytes([1, 4, 127, 0, 0, 1]) + struct.pack("!HIB", 1, 0, 0), "bad-address"),
    (bytes([1, 4, 224, 0, 0, 1]) + struct.pack("!HIB", 1, 0, 0), "bad-address"),
    (bytes([1, 4, 0, 0, 0, 0]) + struct.pack("!HIB", 1, 0, 0), "bad-address"),
    (bytes([1, 4, 10, 0, 0, 1]) + struct.pack("!HIB", 0, 0, 0), "bad-port"),
    (bytes([1, 4, 10, 0, 0, 1]) + struct.pack("!HIB", 1, 0, 33), "bad-prefix"),
    (2 * (bytes([1, 4, 10, 0, 0, 1]) + struct.pack("!HIB", 1, 0, 0)), "duplicate"),
    (b"".join(bytes([1, 4, 10, 0, 0, i + 1]) + struct.pack("!HIB", 1, 0, 0)
              for i in range(17)), "too-many"),
])
def test_malformed_lists_are_refused_with_a_stable_code(data, code):
    with pytest.raises(CandidateError) as err:
        cands.decode(data)
    assert err.value.code == code
    # and inside a frame: the frame is refused, naming the field
    good = wire.encode(wire.RendezvousAnswer(request=1, port=1, isn=1, mss=1460,
                                             sack_permitted=True, timestamps=True, nat="nat"))
    frame = bytearray(good) + struct.pack("!BH", 20, len(data)) + data
    struct.pack_into("!H", frame, 2, len(frame) - 4)
    if len(data) <= cands.WIRE_BYTES:
        with pytest.raises(wire.WireError) as err:
            wire.decode_frame(frame)
        assert err.value.code == "bad-field-value" and code in str(err.value)


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=420))
def test_any_bytes_decode_to_candidates_or_a_candidate_error(data):
    try:
        out = cands.decode(data)
    except CandidateError:
        return
    assert cands.encode(out) == data


def test_the_ccs_drops_candidates_aimed_at_someone_else():
    theirs = (HOST, SRFLX, MAPPED,
              Candidate(K.SRFLX, "198.51.100.77", 9, 1),           # a third party
              Candidate(K.HOST, "198.51.100.78", 9, 1),            # a public "LAN" address
              Candidate(K.HOST, "203.0.113.10", 9, 1),             # our own public one: fine
              Candidate(K.SRFLX, "2001:db8::1", 9, 1))
    kept, dropped = cands.sanitize(theirs, "203.0.113.10")
    assert kept == (HOST, SRFLX, MAPPED, theirs[5])
    assert [(c.addr, why.split(" ")[0]) for c, why in dropped] == [
        ("198.51.100.77", "not"), ("198.51.100.78", "a"), ("2001:db8::1", "the")]
    assert "no IPv6 address" in dropped[2][1]


def test_ipv6_candidates_are_kept_only_near_where_the_ccs_saw_the_device():
    seen6 = "2001:db8:a:1::10"
    theirs = (SRFLX,
              Candidate(K.HOST, seen6, 9, 5),                         # the address seen
              Candidate(K.HOST, "2001:db8:a:1:aaaa::77", 9, 5),       # its /64 (temporary)
              Candidate(K.HOST, "fd00:1::5", 9, 5, 64),               # a LAN's (ULA)
              Candidate(K.SRFLX, seen6, 9, 3),                        # NAT66's reflexive
              Candidate(K.HOST, "2001:db8:b::1", 9, 5),               # another site's
              Candidate(K.SRFLX, "2001:db8:a:1::99", 9, 3),           # not what was seen
              Candidate(K.HOST, "fe80::1", 9, 5, 64))                 # link-local
    kept, dropped = cands.sanitize(theirs, "203.0.113.10", seen=[seen6], ports={6: [9]})
    assert kept == theirs[:5]
    assert [c.addr for c, _ in dropped] == ["2001:db8:b::1", "2001:db8:a:1::99", "fe80::1"]
    assert "link-local" in dropped[2][1]
    # a neighbour in its /64 only on a port the device probed from: not
    # someone else's machine on the café's network at a port of its choice
    other = Candidate(K.HOST, "2001:db8:a:1:bbbb::1", 22, 5)
    kept, dropped = cands.sanitize((theirs[1], other), "203.0.113.10", seen=[seen6],
                                   ports={6: [9]})
    assert kept == (theirs[1],) and "port 22" in dropped[0][1]
    kept, _ = cands.sanitize((theirs[2],), "203.0.113.10", seen=[seen6])
    assert kept == ()                                            # no probe ports known
    # Teredo's /64 is a relay's clients, not a site: no neighbours there
    teredo = "2001:0:4136:e378:8000:63bf:3fff:fdd2"
    kept, _ = cands.sanitize((Candidate(K.HOST, "2001:0:4136:e378::9", 9, 5),
                              Candidate(K.HOST, teredo, 9, 5)), "203.0.113.10",
                             seen=[teredo], ports={6: [9]})
    assert [c.addr for c in kept] == [teredo]
    # logged in over IPv6, seen over IPv4 by a probe: the same rules, each family its own
    kept, dropped = cands.sanitize((SRFLX, theirs[1]), seen6, seen=["203.0.113.10"])
    assert kept == (SRFLX, theirs[1])
    # a probe's claim never overrides the login's family
    kept, _ = cands.sanitize((theirs[1],), seen6, seen=["2001:db8:b::1"])
    assert kept == (theirs[1],)


def test_ipv6_pairs_form_between_global_addresses_and_in_their_family_only():
    ours = (HOST, SRFLX, Candidate(K.HOST, "2001:db8:a::10", 40000, cands.priority(K.HOST, 65534)))
    theirs = (Candidate(K.HOST, "10.9.0.3", 50000, cands.priority(K.HOST), 24),
              Candidate(K.SRFLX, "198.51.100.20", 50000, cands.priority(K.SRFLX)),
              Candidate(K.HOST, "2001:db8:b::20", 50000, cands.priority(K.HOST, 65534)),
              Candidate(K.HOST, "fd00:9::3", 50000, cands.priority(K.HOST, 65533), 64))
    pairs = form_pairs(ours, theirs, Side.INITIATOR, our_public="203.0.113.10",
                       peer_public="198.51.100.20")
    # the global IPv6 host pairs across gateways (no NAT); the foreign LAN's
    # IPv4 and the ULA do not; each pair's base is of the remote's family
    assert [(p.ours.addr, p.remote.addr) for p in pairs] == [
        ("2001:db8:a::10", "2001:db8:b::20"), ("203.0.113.10", "198.51.100.20")]
    assert pairs[0].kind == "host-host"
    # without an IPv6 candidate of ours, nothing toward theirs
    v4_only = form_pairs((HOST, SRFLX), theirs, Side.INITIATOR, our_public="203.0.113.10",
                         peer_public="198.51.100.20")
    assert [p.remote.addr for p in v4_only] == ["198.51.100.20"]
    # both sides order the same logical pairs alike
    back = form_pairs(theirs[1:3], ours, Side.RESPONDER, our_public="198.51.100.20",
                      peer_public="203.0.113.10")
    assert sorted(p.priority for p in back) == sorted(p.priority for p in pairs)


def test_pairs_toward_lan_candidates_only_behind_one_public_address():
    ours = (HOST, SRFLX)
    theirs = (Candidate(K.HOST, "10.1.0.3", 50000, cands.priority(K.HOST), 24),
              Candidate(K.SRFLX, "203.0.113.10", 50000, cands.priority(K.SRFLX)))
    same = form_pairs(ours, theirs, Side.INITIATOR, our_public="203.0.113.10",
                      peer_public="203.0.113.10")
    assert [p.kind for p in same] == ["host-host", "srflx-srflx"]
    apart = form_pairs(ours, (Candidate(K.HOST, "10.2.0.2", 50000, 1, 24), theirs[1]),
                       Side.INITIATOR, our_public="203.0.113.10", peer_public="203.0.113.20")
    assert [p.kind for p in apart] == ["srflx-srflx"]
    # both sides order the same logical pairs alike
    back = form_pairs(theirs, ours, Side.RESPONDER, our_public="203.0.113.10",
                      peer_public="203.0.113.10")
    assert [p.priority for p in back] == [p.priority for p in same]


def test_a_lan_address_inside_the_others_prefix_pairs_even_across_public_addresses():
    ours = (Candidate(K.HOST, "192.168.7.2", 40000, cands.priority(K.HOST), 24),)
    theirs = (Candidate(K.HOST, "192.168.7.9", 50000, cands.priority(K.HOST), 24),)
    got = form_pairs(ours, theirs, Side.RESPONDER, our_public="203.0.113.10",
                     peer_public="203.0.113.20")
    assert [p.remote.addr for p in got] == ["192.168.7.9"]


def test_unknown_words_from_a_newer_peer_read_as_unknown():
    assert parse(Mapping, "preserve") is Mapping.PRESERVE
    assert parse(Mapping, "quantum") is Mapping.UNKNOWN


def test_what_a_device_announces_is_normalized_and_the_encoder_refuses_duplicates():
    twin = Candidate(K.SRFLX, HOST.addr, HOST.port, 1)        # an open host's reflexive address
    loop = Candidate(K.SRFLX, "127.0.0.1", 40000, 1)          # a CCS on this very host
    assert cands.normalize([HOST, twin, loop, SRFLX]) == (HOST, SRFLX)
    with pytest.raises(CandidateError) as err:
        cands.encode([HOST, twin])
    assert err.value.code == "duplicate"


def host(addr, prefix):
    return Candidate(K.HOST, addr, 50000, cands.priority(K.HOST), prefix)


def test_a_short_or_one_sided_prefix_does_not_make_a_stranger_a_neighbour():
    b = (host("192.168.7.9", 24), Candidate(K.SRFLX, "203.0.113.20", 50000, 1))
    # 10.0.0.1/1 and 192.168.0.1/1 between them cover every private range
    hostile = (host("10.0.0.1", 1), host("192.168.0.1", 1))
    assert not cands.same_lan(hostile, b) and not cands.same_lan(b, hostile)
    # a long enough prefix claimed by one side only: the other's LAN says no
    wide = (host("192.168.0.1", 16),)
    assert not cands.same_lan(wide, b)
    got = form_pairs(b, wide, Side.RESPONDER, our_public="203.0.113.20",
                     peer_public="203.0.113.66")
    assert got == []
    # mutual: a real neighbour on the LAN, and only its on-link addresses pair
    peer = (host("192.168.7.2", 24), host("10.9.0.2", 24))
    assert cands.same_lan(peer, b)
    got = form_pairs(b, peer, Side.RESPONDER, our_public="203.0.113.20",
                     peer_public="203.0.113.66")
    assert [p.remote.addr for p in got] == ["192.168.7.2"]


def test_the_ccs_drops_candidates_carrying_its_own_address():
    theirs = (host("10.0.0.5", 24), host("10.0.0.7", 24))
    kept, dropped = cands.sanitize(theirs, "203.0.113.10", refused={"10.0.0.5"})
    assert kept == theirs[1:] and [why for _, why in dropped] == ["the CCS's own address"]


def test_the_ccs_gives_lan_addresses_only_to_a_neighbour():
    from fastpunch.ccs.server import CCSServer

    server = CCSServer(None, None, public_addr="198.51.100.1")
    a = wire.NextInfo(port=1, isn=1, nat="nat", candidates=(
        host("10.0.0.1", 1), Candidate(K.SRFLX, "203.0.113.10", 40000, 1),
        Candidate(K.SRFLX, "198.51.100.1", 7443, 1)))          # the CCS itself
    b = wire.NextInfo(port=2, isn=2, nat="nat", candidates=(
        host("192.168.7.9", 24), Candidate(K.SRFLX, "203.0.113.20", 50000, 1)))
    a_out, b_out, lan = server._screen("a", "203.0.113.10", {}, a, "b", "203.0.113.20", {}, b)
    assert not lan
    assert [c.addr for c in b_out.candidates] == ["203.0.113.20"]     # b's LAN kept from a
    assert [c.addr for c in a_out.candidates] == ["203.0.113.10"]
    # a real neighbour, by both prefixes, learns the LAN address
    a = wire.NextInfo(port=1, isn=1, nat="nat", candidates=(host("192.168.7.2", 24),))
    a_out, b_out, lan = server._screen("a", "203.0.113.10", {}, a, "b", "203.0.113.20", {}, b)
    assert lan and "192.168.7.9" in [c.addr for c in b_out.candidates]
