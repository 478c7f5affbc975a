"""Teardown is guaranteed, names are unique, errors are clear."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from fastpunch.lab import Lab, LabError, sweep_stale
from fastpunch.lab.topology import lab_namespaces
from tests.lab.probes import TcpServer, connect

pytestmark = pytest.mark.lab


def ours(tag):
    return [name for name, _ in lab_namespaces() if name.startswith(tag + "-")]


def test_context_manager_removes_everything_even_when_the_block_fails(lab_factory):
    lab = Lab(a="nat", b="cgn")
    with pytest.raises(RuntimeError):
        with lab:
            assert len(ours(lab.tag)) == 1 + 2 + 3     # inet + nat site + cgn site
            lab.spawn("a", ["sleep", "60"])
            raise RuntimeError("boom")
    assert ours(lab.tag) == []
    assert all(p.poll() is not None for p in lab._procs) and lab._procs == []


def test_two_labs_run_at_once_with_distinct_names(lab_factory):
    one, two = lab_factory(a="nat"), lab_factory(a="nat")
    assert one.tag != two.tag and not set(one.namespaces) & set(two.namespaces)
    for lab in (one, two):                           # same addresses, separate worlds
        with TcpServer(lab, "inet", lab.ccs_addr, 7100):
            assert connect(lab, "a", lab.ccs_addr, 7100) == "ok"


def test_a_killed_owner_leaves_a_lab_that_the_sweep_removes():
    code = textwrap.dedent("""
        import os, signal
        from fastpunch.lab import Lab
        lab = Lab(a="nat").up()
        print(lab.tag, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == -9, proc.stderr
    tag = proc.stdout.strip()
    assert len(ours(tag)) == 3
    removed = sweep_stale()
    assert sorted(removed) == sorted(f"{tag}-{r}" for r in ("inet", "ha", "ga"))
    assert ours(tag) == []


def test_the_sweep_leaves_live_labs_alone(lab_factory):
    lab = lab_factory(a="open")
    removed = sweep_stale()
    assert not set(removed) & set(lab.namespaces)
    assert set(lab.namespaces) <= {name for name, _ in lab_namespaces()}


@pytest.mark.parametrize("kwargs, message", [
    (dict(a="carrier-pigeon"), "unknown profile 'carrier-pigeon'"),
    (dict(), "at least one site"),
    (dict(A="nat"), "site names"),
])
def test_bad_specs_are_refused_before_anything_is_built(kwargs, message):
    with pytest.raises(LabError, match=message):
        Lab(**kwargs)


def test_unknown_place_names_the_choices(lab_factory):
    lab = lab_factory(a="nat")
    with pytest.raises(LabError, match="sites: a"):
        lab.ns("gw-z")


def test_without_capabilities_the_lab_names_them():
    proc = subprocess.run(
        ["setpriv", "--bounding-set=-all", "--inh-caps=-all", "--", sys.executable, "-c",
         "from fastpunch.lab import Lab\n"
         "try:\n Lab(a='nat').up()\n"
         "except PermissionError as e:\n print('OK', e.capability)"],
        capture_output=True, text=True, timeout=60)
    assert "OK CAP_SYS_ADMIN and CAP_NET_ADMIN" in proc.stdout, proc.stderr


def test_a_miniupnpd_too_old_for_the_lab_is_named_with_the_way_out(monkeypatch):
    import shutil

    from fastpunch.errors import KernelFeatureMissing
    from fastpunch.lab import topology

    if not shutil.which("miniupnpd") and not os.path.exists("/usr/sbin/miniupnpd"):
        pytest.skip("no Debian miniupnpd to show the refusal with")
    monkeypatch.setattr(topology, "_MINIUPNPD_CANDIDATES", ("/usr/sbin/miniupnpd",))
    monkeypatch.delenv("FASTPUNCH_MINIUPNPD", raising=False)
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(KernelFeatureMissing) as err:
        topology.find_miniupnpd()
    message = str(err.value)
    assert "scripts/build-miniupnpd" in message and "found only /usr/sbin/miniupnpd" in message
