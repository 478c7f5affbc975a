"""The exported surface and the exception hierarchy (trio-style guard)."""

import errno

import fastpunch
import fastpunch.packet
from fastpunch import errors


def test_packet_exports():
    assert sorted(fastpunch.packet.__all__) == sorted([
        "ENGINE_MARK", "Flags", "FlowEvent", "FlowState", "FlowTracker", "MalformedPacket",
        "PacketBuildError", "ParsedBatch", "RawReceiver", "RawSender", "Reply", "Segment", "SegmentBatch",
        "TCPOptions", "build", "checksum", "checksum_many", "checksum_update", "flags_str",
        "int_to_ip", "ip_to_int", "parse", "reason_name", "rst_for", "seq_acceptable",
        "seq_after", "seq_before", "seq_between", "tcp_checksum"])
    for name in fastpunch.packet.__all__:
        assert getattr(fastpunch.packet, name) is not None


def test_top_level_exports():
    assert sorted(fastpunch.__all__) == sorted([
        "AuthenticationError", "CCSError", "Device", "NextInfo", "RelayError",
        "RendezvousRefusedError", "FastpunchError", "InsufficientPrivilegeError", "KernelFeatureMissing",
        "LocalProtocolError", "MalformedPacket", "NetfilterError", "PacketBuildError",
        "RemoteProtocolError", "__version__"])


def test_hierarchy_lets_callers_catch_builtins():
    assert issubclass(errors.MalformedPacket, ValueError)
    assert issubclass(errors.PacketBuildError, ValueError)
    assert issubclass(errors.InsufficientPrivilegeError, PermissionError)
    assert issubclass(errors.KernelFeatureMissing, OSError)
    assert issubclass(errors.NetfilterError, OSError)
    assert issubclass(fastpunch.AuthenticationError, PermissionError)
    for cls in (errors.MalformedPacket, errors.InsufficientPrivilegeError,
                errors.LocalProtocolError, errors.RemoteProtocolError,
                fastpunch.CCSError, fastpunch.RelayError, fastpunch.RendezvousRefusedError):
        assert issubclass(cls, errors.FastpunchError)


def test_codes_map_to_the_right_exceptions():
    e = errors.error_from_code(-errno.EPERM, "", "", "raw-socket")
    assert isinstance(e, errors.InsufficientPrivilegeError) and e.capability == "CAP_NET_RAW"
    e = errors.error_from_code(-errno.EPERM, "", "", "raw-send")
    assert type(e) is PermissionError and "netfilter" in str(e)
    e = errors.error_from_code(-errno.EAGAIN, "", "", "raw-send")
    assert isinstance(e, BlockingIOError)
    e = errors.error_from_code(-4096, "truncated", "short", "parse")
    assert isinstance(e, errors.MalformedPacket) and e.reason == "truncated"
    e = errors.error_from_code(-4096, "truncated", "short", "build")
    assert isinstance(e, errors.PacketBuildError)


def test_reason_names_are_stable():
    assert fastpunch.packet.reason_name(4096) == "truncated"
    assert fastpunch.packet.reason_name(-4100) == "ip-checksum"
    assert fastpunch.packet.reason_name(-1) == "system-error"


def test_the_privilege_hint_is_a_command_that_works():
    err = errors.InsufficientPrivilegeError("CAP_NET_RAW and CAP_NET_ADMIN", "crafting")
    assert "setcap cap_net_raw,cap_net_admin+ep" in str(err)
