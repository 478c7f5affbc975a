"""A device on a kernel without nf_tables connects and tells why it did so
without crafted segments. The camera runs as the CLI in its own process
whose seccomp filter fails the netfilter netlink socket, as a vendor kernel
without CONFIG_NF_TABLES answers (libnftables would exit() that process);
the viewer is an ordinary device."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from fastpunch.lab.topology import CCS_ADDR
from tests import seccomp

from .harness import CCS_PORT

pytestmark = [pytest.mark.lab, pytest.mark.live]

ROOT = __file__.rsplit("/tests/", 1)[0]
KERNEL_ONLY = {"simopen", "upnp", "relay"}        # strategies that need no crafted segment


@pytest.mark.skipif(not seccomp.supported(), reason="no seccomp syscall table for this machine")
def test_a_device_without_nf_tables_connects_by_kernel_open_and_says_why(lab_pair, tmp_path):
    with lab_pair("nat", "nat") as (lab, ccs, _cam, (lv, viewer)):
        # (a name of its own: the fixture's cam is logged in already)
        ccs.enroll("nonft", "viewer")
        key_file = tmp_path / "nonft.json"
        key_file.write_text(json.dumps({"name": "nonft", "key": ccs.keys["nonft"].hex()}))
        accepting = lv.submit(viewer.accept())
        child = textwrap.dedent(f"""
            import sys
            sys.path.insert(0, {ROOT!r})
            from tests.seccomp import deny_nfnetlink
            deny_nfnetlink()
            from fastpunch.cli import main
            sys.exit(main(["connect", "--to", "viewer", "--verbose",
                           "--ccs", "{CCS_ADDR}:{CCS_PORT}", "--name", "nonft",
                           "--key-file", {str(key_file)!r}, "--ca", {ccs.paths["ca"]!r},
                           "--server-name", "localhost"]))
        """)
        log = open(tmp_path / "child.log", "w+")    # (a file: nobody reads a pipe meanwhile)
        child = subprocess.Popen(["ip", "netns", "exec", lab.ns("a"), sys.executable, "-c", child],
                                 stdout=subprocess.PIPE, stderr=log, text=True)
        try:
            conn = accepting.result(90)
            # the viewer's half of the secure channel's handshake (the CLI
            # connects, secures, reports and closes)
            conn.secure().close()
            stdout, _ = child.communicate(timeout=60)
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
            log.seek(0)
            stderr = log.read()
            log.close()
        assert child.returncode == 0, stderr
        summary = json.loads(stdout.splitlines()[-1])
        report = summary["report"]
        # it connected, and only by what needs no crafted segment: between two
        # port-preserving NATs, kernel simultaneous open goes direct
        assert {a["strategy"] for a in report["attempts"]} <= KERNEL_ONLY, report
        assert (summary["path"], summary["strategy"]) == ("direct", "simopen"), summary
        # ... and said why, in the report a user reads, and in its log
        assert "gathering: no crafted strategies here: nf_tables" in stdout, stdout
        assert "netfilter netlink socket" in stdout and "no crafted strategies" in stderr
        # the peer's report says why its plan had none either
        lines = "\n".join(conn.report.lines())
        assert "nonft announced it cannot craft segments" in lines, lines
        assert conn.strategy == summary["strategy"]
