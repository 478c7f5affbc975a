"""fastpunch.liveness: the settings, what they bound, and the socket options
they set on a real kernel socket; the CCS's advertised period on the wire."""

from __future__ import annotations

import errno
import math
import os
import socket

import pytest

from fastpunch import liveness
from fastpunch.liveness import Keepalive, KeepaliveError, PathLost
from fastpunch.proto import wire
from fastpunch.proto.connection import Connection, ProtocolViolation, Role
from tests.unit.test_candidates import login


@pytest.mark.parametrize("period", [0, -1, 3601, 1.5, True, "10", None])
def test_a_period_outside_whole_seconds_1_3600_is_refused(period):
    with pytest.raises(ValueError, match="whole seconds"):
        Keepalive(period)


@pytest.mark.parametrize("timeout", [0, 0.5, 3601, math.nan, True, "3"])
def test_a_bad_timeout_is_refused(timeout):
    with pytest.raises(ValueError, match="timeout"):
        Keepalive(10, timeout)


@pytest.mark.parametrize("period,interval,dead,idle", [
    (10, 2, 16.0, 16.0),       # the default: probes at 10, 12, 14 s; the check at 16 s ends it
    (1, 1, 4.0, 4.0),          # probes at 1, 2 and 3 s, the check at 4 s finds 4 s passed
    (60, 15, 105.0, 105.0),
    (3600, 900, 6300.0, 6300.0),
])
def test_derived_values_follow_the_kernels_keepalive_timer(period, interval, dead, idle):
    k = Keepalive(period)
    assert (k.interval, k.user_timeout, k.idle_detection(), k.busy_detection()) == \
        (interval, dead, idle, dead)
    # within two periods while idle, as docs/liveness.md promises, from 3 s up
    if period >= 3:
        assert k.idle_detection() <= 2 * period


@pytest.mark.parametrize("period", [1, 2, 4, 10, 25, 60, 3600])
def test_the_default_timeout_survives_two_lost_probes_in_a_row(period):
    # the check that ends the stream is the one after the third probe: the
    # first two may be lost (docs/liveness.md)
    k = Keepalive(period)
    assert k.probes == liveness.LOST_PROBES + 1 == 3
    # the check at period + 2 intervals falls short of the timeout even a
    # whole interval late (the kernel's timers run late by an eighth of
    # their delay at most); the one at period + 3 intervals reaches it
    assert k.user_timeout - (k.period + 2 * k.interval) >= k.interval
    assert k.user_timeout <= k.period + 3 * k.interval
    assert k.idle_detection() == k.period + 3 * k.interval


def test_a_long_timeout_waits_for_the_probe_after_it():
    # probes at 10, 12, 14, ...: the first check with 15 s passed is at 16 s
    k = Keepalive(10, timeout=15)
    assert k.idle_detection() == 16.0 and k.busy_detection() == 15.0
    assert k.probes == 3        # checks at 12, 14, 16 s: the third sees 3 probes out


def test_a_long_timeout_stays_within_the_kernels_probe_cap_and_applies():
    # 300 s of 2 s probes would be 146: the kernel refuses TCP_KEEPCNT > 127
    k = Keepalive(10, timeout=300)
    assert k.probes == liveness.MAX_PROBES
    a, b = _tcp_pair()
    with a, b:
        liveness.apply(a, k)
        assert a.getsockopt(socket.IPPROTO_TCP, liveness.TCP_KEEPCNT) == 127
        assert a.getsockopt(socket.IPPROTO_TCP, liveness.TCP_USER_TIMEOUT) == 300_000


def test_resolve_orders_application_ccs_and_default():
    assert liveness.resolve(None) == liveness.DEFAULT
    assert liveness.resolve(None, 25) == Keepalive(25)
    assert liveness.resolve(7, 25) == Keepalive(7)
    assert liveness.resolve(7.0) == Keepalive(7)
    assert liveness.resolve(Keepalive(3, 4), 25) == Keepalive(3, 4)
    assert liveness.resolve(False, 25) is None and liveness.resolve(0) is None
    with pytest.raises(ValueError):
        liveness.resolve(2.5)


def _tcp_pair():
    srv = socket.create_server(("127.0.0.1", 0))
    a = socket.create_connection(srv.getsockname())
    b, _ = srv.accept()
    srv.close()
    return a, b


def test_apply_sets_every_option_on_a_kernel_socket_and_none_clears_them():
    a, b = _tcp_pair()
    with a, b:
        k = Keepalive(7, timeout=4)
        liveness.apply(a, k)
        got = [a.getsockopt(level, opt) for level, opt, _ in k.socket_options()]
        assert got == [1, 7, 1, k.probes, 4000]
        liveness.apply(a, None)
        assert a.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 0
        assert a.getsockopt(socket.IPPROTO_TCP, liveness.TCP_USER_TIMEOUT) == 0


def test_a_socket_that_refuses_an_option_names_it():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        with pytest.raises(KeepaliveError) as err:
            liveness.apply(udp, liveness.DEFAULT)
    assert err.value.option == "TCP_KEEPIDLE" and "cannot set TCP_KEEPIDLE" in str(err.value)
    assert isinstance(err.value, OSError)


def test_only_etimedout_means_the_path_is_lost():
    lost = liveness.path_lost(TimeoutError(errno.ETIMEDOUT, "Connection timed out"),
                              Keepalive(10))
    assert isinstance(lost, PathLost) and isinstance(lost, ConnectionError)
    assert lost.code == "path-lost" and "keepalive every 10 s" in str(lost)
    assert lost.errno == errno.ETIMEDOUT
    assert liveness.path_lost(ConnectionResetError(errno.ECONNRESET, "reset"), None) is None
    assert liveness.path_lost(socket.timeout("timed out"), None) is None    # a recv timeout
    assert liveness.path_lost(lost, None) is None                           # not twice


# -- the CCS advertises its period (protocol version 3) ----------------------------------
def _login(version: int, keepalive):
    return login(version, keepalive=keepalive)[2]


def test_authok_carries_the_keepalive_period_from_version_3_only():
    assert _login(3, 25).keepalive == 25
    assert _login(2, 25).keepalive is None            # left out for a version-2 device
    assert _login(3, None).keepalive is None


def test_a_version_2_frame_with_the_keepalive_field_is_refused():
    ok = wire.AuthOk(bytes(32), "203.0.113.10", 4000, 15, keepalive=25)
    frame = bytearray(wire.encode(ok, 3))
    frame[0] = 2
    with pytest.raises(wire.WireError) as err:
        wire.decode_frame(frame)
    assert err.value.code == "unknown-field"


def test_a_refused_hello_names_the_version_the_ccs_answered_in():
    client = Connection(Role.CLIENT)
    client.hello("cam", bytes(32), os.urandom)
    # what a version-2 CCS answers a version-3 Hello (its decoder says bad-version)
    client.receive_data(wire.encode(wire.Error("bad-version", "protocol version 3, expected "
                                                              "1 or 2"), 2))
    with pytest.raises(ProtocolViolation) as err:
        client.next_event()
    assert err.value.code == "version-refused" and err.value.version == 2


def test_a_device_refuses_a_bad_keepalive_when_made_not_at_its_first_stream():
    from fastpunch.client import Device

    with pytest.raises(ValueError, match="whole seconds"):
        Device(("127.0.0.1", 7443), "cam", bytes(32), ca_file="ca.pem", keepalive=2.5)
    dev = Device(("127.0.0.1", 7443), "cam", bytes(32), ca_file="ca.pem", keepalive=False)
    assert dev.keepalive is None
    dev.keepalive = 30
    assert dev.keepalive == Keepalive(30)
    with pytest.raises(ValueError):
        dev.keepalive = -1
    assert dev.keepalive == Keepalive(30)                 # unchanged by the refusal


@pytest.mark.parametrize("text,want", [("0", False), ("15", Keepalive(15))])
def test_the_keepalive_flag_takes_whole_seconds_or_0(text, want):
    from fastpunch.tools import _keepalive

    assert _keepalive(text) == want


@pytest.mark.parametrize("text", ["-3", "2.5", "ten", "4000"])
def test_the_keepalive_flag_refuses_the_rest_with_the_range(text):
    import argparse

    from fastpunch.tools import _keepalive

    with pytest.raises(argparse.ArgumentTypeError, match="1-3600, or 0 for none"):
        _keepalive(text)
