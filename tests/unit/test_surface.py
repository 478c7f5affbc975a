"""The exported surface and the exception hierarchy (trio-style guard)."""

import argparse
import errno

import pytest

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
        "RemoteProtocolError", "Keepalive", "PathLost", "read_credentials", "__version__"])


def test_hierarchy_lets_callers_catch_builtins():
    assert issubclass(errors.MalformedPacket, ValueError)
    assert issubclass(errors.PacketBuildError, ValueError)
    assert issubclass(errors.InsufficientPrivilegeError, PermissionError)
    assert issubclass(errors.KernelFeatureMissing, OSError)
    assert issubclass(errors.NetfilterError, OSError)
    assert issubclass(fastpunch.AuthenticationError, PermissionError)
    assert issubclass(fastpunch.PathLost, ConnectionError)
    for cls in (errors.MalformedPacket, errors.InsufficientPrivilegeError,
                errors.LocalProtocolError, errors.RemoteProtocolError,
                fastpunch.CCSError, fastpunch.RelayError, fastpunch.RendezvousRefusedError,
                fastpunch.PathLost):
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


def test_the_command_tells_its_version_and_every_default():
    import contextlib
    import io

    from fastpunch import __version__
    from fastpunch.cli import build_parser, main

    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and out.getvalue().strip() == f"fastpunch {__version__}"
    parser = build_parser()

    def helps(p, path):
        text = p.format_help()
        yield path, p, text
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, child in action.choices.items():
                    yield from helps(child, path + [name])

    seen = 0
    for path, p, text in helps(parser, []):
        for action in p._actions:
            if not action.option_strings or action.default in (None, False, "",
                                                                argparse.SUPPRESS):
                continue
            seen += 1
            assert "default" in (p._get_formatter()._get_help_string(action) or ""), \
                (path, action.option_strings)
    assert seen > 40
    # the device agent guesses like every other device command
    run = parser.parse_args(["device", "run", "--ccs", "h:1", "--name", "n", "--key-file", "k",
                             "--ca", "c"])
    assert run.nat == "auto"
    natcheck = parser.parse_args(["natcheck", "--ccs", "h:1", "--name", "n", "--key-file", "k",
                                  "--ca", "c", "--timeout", "5"])
    assert natcheck.timeout == 5.0 and not hasattr(natcheck, "strategy")
    assert "wait for the peer" not in next(p for path, p, _ in helps(parser, [])
                                           if path == ["natcheck"]).format_help()


def test_a_command_loads_only_its_own_module_and_parses_as_with_every_command():
    """`fastpunch device run` on a gateway builds only the device command's
    parser: the server's key store (sqlite3), the lab, the camera and the
    agent stay out of its memory. Each command parses as the full parser
    would, and --help still lists every command."""
    import subprocess
    import sys

    from fastpunch.cli import COMMANDS, build_parser

    child = ("import sys\nfrom fastpunch.cli import build_parser\n"
             "p = build_parser(['device', 'run'])\n"
             "a = p.parse_args(['device', 'run', '--ccs', 'h:1', '--name', 'n', '--key-file', "
             "'k', '--ca', 'c'])\nassert a.nat == 'auto'\n"
             "print(' '.join(sorted(sys.modules)))")
    r = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    loaded = set(r.stdout.split())
    for heavy in ("sqlite3", "fastpunch.ccs.keystore", "fastpunch.ccs.admin", "fastpunch.lab",
                  "fastpunch.camera", "fastpunch.agent", "statistics", "xml.sax.saxutils",
                  "shutil", "fastpunch.ccs.pki"):
        assert heavy not in loaded, heavy
    everything = build_parser()
    words = [w for names, _, _ in COMMANDS for w in names] + ["demo", "sweep", "version"]
    subs = next(a for a in everything._actions if isinstance(a, argparse._SubParsersAction))
    assert sorted(subs.choices) == sorted(words)
    for word in words:
        alone = build_parser([word, "--help"])
        mine = next(a for a in alone._actions if isinstance(a, argparse._SubParsersAction))
        assert mine.choices[word].format_help() == subs.choices[word].format_help(), word
    for odd in ([], ["--debug"], ["no-such-command"], ["--", "device"]):
        assert sorted(next(a for a in build_parser(odd)._actions
                           if isinstance(a, argparse._SubParsersAction)).choices) == sorted(words)


def test_help_width_follows_columns_and_skips_nonsense(monkeypatch):
    from fastpunch.cli import _columns

    monkeypatch.setenv("COLUMNS", "120")
    assert _columns() == 120
    for odd in ("0", "-5", "wide"):
        monkeypatch.setenv("COLUMNS", odd)
        assert _columns() > 0                      # the terminal's width, else 80


def test_the_demo_says_what_its_rate_is_and_how_it_connected():
    from fastpunch.labdemo import summary_lines

    report = {"path": "direct", "strategy": "symmetric", "connect_seconds": 0.088,
              "cipher": "AES_256_GCM", "frames": 250, "codec": "h264", "size": "640x360",
              "decode_errors": [], "video_bytes": 460000, "video_MB_per_s": 0.044,
              "bytes_through_ccs": 0}
    first, video, ccs = summary_lines(report, 250)
    assert first == "connected directly, by symmetric in 88 ms (encrypted, AES_256_GCM)"
    assert "0.46 MB, the stream's bitrate 0.35 Mbit/s (real time" in video
    assert ccs == "bytes of video through the CCS: 0"
    relayed = summary_lines({**report, "path": "relay", "strategy": "relay"}, 250)[0]
    assert relayed.startswith("connected through the CCS relay in") and "via" not in relayed
