"""A device install (``pip install fastpunch``: the package and cryptography,
no extras) does its whole job: these run the library in child processes
where the extras' packages cannot be imported, as on a camera that has only
what the device install brings."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap

import pytest

from tests.conftest import require_root

pytestmark = pytest.mark.live

ROOT = __file__.rsplit("/tests/", 1)[0]
# what only the extras bring ([lab], [ccs], [redis], [test]), and cffi,
# which fastpunch itself no longer uses (cryptography still installs it and
# loads its _cffi_backend)
EXTRAS_ONLY = ("pyroute2", "uvloop", "redis", "cffi", "scapy", "pytest")


def run_device_child(body: str, *, netns: str = "") -> subprocess.CompletedProcess:
    code = textwrap.dedent(f"""
        import sys
        for name in {EXTRAS_ONLY!r}:
            sys.modules[name] = None        # import raises ImportError, as when not installed
    """) + textwrap.dedent(body)
    cmd = [sys.executable, "-c", code]
    if netns:
        cmd = ["ip", "netns", "exec", netns, *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60)


def test_the_device_modules_and_cli_import_without_the_extras():
    out = run_device_child("""
        import fastpunch, fastpunch.client, fastpunch.punch, fastpunch.netcheck
        import fastpunch.handoff, fastpunch.channel, fastpunch.portmap, fastpunch.netfilter
        from fastpunch import cli
        assert fastpunch.Device is fastpunch.client.Device
        try:
            cli.main(["--help"])
        except SystemExit as exc:          # argparse's --help
            assert exc.code == 0
        print("imported")
    """)
    assert out.returncode == 0, out.stderr
    assert "imported" in out.stdout and "natcheck" in out.stdout and "sweep" in out.stdout


def test_rst_suppression_loads_libnftables_without_cffi(veth):
    out = run_device_child("""
        from fastpunch import netfilter
        table = netfilter.suppress_rsts([netfilter.RstSuppression(40000, "198.51.100.2", 40001)])
        table.apply()
        names = netfilter.Nftables().tables()
        assert table.table.name in names, names
        table.remove()
        assert table.table.name not in netfilter.Nftables().tables()
        print("applied and removed", table.table.name)
    """, netns=veth.ns_a)
    assert out.returncode == 0, out.stderr
    assert "applied and removed fastpunch_" in out.stdout


def test_sweep_removes_a_stale_namespace_without_pyroute2():
    require_root("creating a namespace")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    name = f"fpt{dead.pid}x0a"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        out = run_device_child("""
            from fastpunch import cli
            raise SystemExit(cli.main(["sweep"]))
        """)
        assert out.returncode == 0, out.stderr
        removed = re.search(r"removed \d+ stale nftables tables, (\d+) stale namespaces", out.stdout)
        assert removed and int(removed.group(1)) >= 1, out.stdout
        assert name not in os.listdir("/run/netns")
    finally:
        if os.path.exists(f"/run/netns/{name}"):
            subprocess.run(["ip", "netns", "delete", name])


def test_the_lab_without_pyroute2_names_the_extra_to_install():
    out = run_device_child("""
        from fastpunch.errors import KernelFeatureMissing
        from fastpunch.lab import Lab
        try:
            Lab(a="nat", b="nat").up()
        except KernelFeatureMissing as exc:
            print("missing:", exc)
    """)
    assert out.returncode == 0, out.stderr
    assert "missing:" in out.stdout and "fastpunch[lab]" in out.stdout
