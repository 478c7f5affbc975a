"""netfilter backend against the real kernel, inside fresh namespaces."""

import os
import subprocess
import sys
import textwrap

import pytest

from fastpunch import netfilter
from fastpunch._netns import inside
from fastpunch.errors import NetfilterError

pytestmark = pytest.mark.live


def test_a_refused_ruleset_raises_with_libnftables_message_and_changes_nothing(veth):
    nft = netfilter.Nftables()
    bad = netfilter.Table("fastpunch_1_bad0", (netfilter.Chain(
        "out", "output", ("tcp sport 1 accept", "this is not nft syntax")),))
    with inside(veth.ns_a):
        with pytest.raises(NetfilterError) as err:
            nft.run(bad.apply_commands())
        assert "syntax error" in err.value.detail
        assert "fastpunch_1_bad0" not in nft.tables()   # atomic: nothing half-applied


def test_stale_tables_of_dead_processes_are_swept_and_live_ones_kept(veth):
    nft = netfilter.Nftables()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = netfilter.Table(f"fastpunch_{dead.pid}_rst0",
                            (netfilter.Chain("out", "output", ("counter",)),))
    mine = netfilter.Table(netfilter.owned_table_name("live"),
                           (netfilter.Chain("out", "output", ("counter",)),))
    with inside(veth.ns_a):
        nft.run(stale.apply_commands())
        nft.run(mine.apply_commands())
        try:
            removed = netfilter.sweep_stale(nft)
            assert stale.name in removed
            assert stale.name not in nft.tables()
            assert mine.name in nft.tables()
        finally:
            nft.run(mine.delete_commands())


def test_the_sweep_leaves_tables_of_other_pid_namespaces(veth):
    """Two containers sharing a network namespace, not a PID namespace: a
    pid of the other's that is not running here is not stale."""
    nft = netfilter.Nftables()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    here = netfilter.pid_namespace()
    theirs = netfilter.Table(f"fastpunch_{dead.pid}_ns{here + 1}_rst0",
                             (netfilter.Chain("out", "output", ("counter",)),))
    ours = netfilter.Table(f"fastpunch_{dead.pid}_ns{here}_rst1",
                           (netfilter.Chain("out", "output", ("counter",)),))
    legacy = netfilter.Table(f"fastpunch_{dead.pid}_rst2",
                             (netfilter.Chain("out", "output", ("counter",)),))
    with inside(veth.ns_a):
        for t in (theirs, ours, legacy):
            nft.run(t.apply_commands())
        try:
            assert netfilter.sweep_stale(nft, unmarked=False) == [ours.name]
            assert netfilter.sweep_stale(nft) == [legacy.name]       # the sweep command's
            assert theirs.name in nft.tables()
        finally:
            nft.run(theirs.delete_commands())


def test_a_crashed_holder_leaves_a_table_that_the_sweep_removes(veth):
    """kill -9 mid-flow: no cleanup code runs, the sweep finds the table by pid."""
    code = textwrap.dedent(f"""
        import os, signal
        from fastpunch import netfilter
        from fastpunch._netns import inside
        with inside({veth.ns_a!r}):
            g = netfilter.suppress_rsts([netfilter.RstSuppression(40100)]).apply()
            print(g.table.name, flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == -9, proc.stderr
    name = proc.stdout.strip()
    nft = netfilter.Nftables()
    with inside(veth.ns_a):
        assert name in nft.tables()
        assert name in netfilter.sweep_stale(nft)
        assert name not in nft.tables()


def _without_capabilities(code: str) -> subprocess.CompletedProcess:
    """Run code as uid 0 but with an empty capability bounding set: exec then
    grants no capabilities, like a locked-down container's root."""
    return subprocess.run(["setpriv", "--bounding-set=-all", "--inh-caps=-all", "--",
                           sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)


def test_capability_check_reads_the_effective_set():
    proc = _without_capabilities(
        "from fastpunch import _caps; print(_caps.missing(_caps.CAP_NET_RAW, _caps.CAP_NET_ADMIN))")
    assert proc.stdout.strip() == "['CAP_NET_RAW', 'CAP_NET_ADMIN']", proc.stderr


def test_without_cap_net_raw_raw_sockets_fail_naming_the_capability():
    proc = _without_capabilities(textwrap.dedent("""
        from fastpunch.packet import RawSender, RawReceiver
        from fastpunch.errors import InsufficientPrivilegeError
        for cls in (RawSender, RawReceiver):
            try:
                cls()
            except InsufficientPrivilegeError as e:
                print("OK", e.capability, isinstance(e, PermissionError))
    """))
    assert proc.stdout.split("\n")[:2] == ["OK CAP_NET_RAW True"] * 2, proc.stderr


def test_without_cap_net_admin_rules_fail_naming_the_capability():
    proc = _without_capabilities(textwrap.dedent("""
        from fastpunch import netfilter
        from fastpunch.errors import InsufficientPrivilegeError
        try:
            netfilter.Nftables().run("list tables")
        except InsufficientPrivilegeError as e:
            print("OK", e.capability)
    """))
    assert "OK CAP_NET_ADMIN" in proc.stdout, proc.stderr


def test_cli_demo_without_privileges_says_so_in_one_line_and_exit_77():
    proc = _without_capabilities("import sys; from fastpunch.cli import main; sys.exit(main(['demo', '--engine']))")
    assert proc.returncode == 77
    assert "Traceback" not in proc.stderr
    assert "needs CAP_SYS_ADMIN and CAP_NET_ADMIN and CAP_NET_RAW" in proc.stderr


def test_cli_demo_runs_and_reports(capsys):
    from fastpunch.cli import main

    if os.geteuid() != 0:
        pytest.skip("the demo needs root")
    assert main(["demo", "--engine", "--json"]) == 0
    out = capsys.readouterr().out
    import json

    report = json.loads(out.strip().splitlines()[-1])
    assert report["malformed"] == 0
    assert report["segments_received"] >= 3 and report["timestamps"] is True


def test_a_scoped_table_is_removed_in_its_namespace_from_any_thread(veth):
    """spoof's rewrite table outlives the punch thread: whoever closes the
    connection (another thread, another namespace) must still delete it."""
    nft = netfilter.Nftables()
    with inside(veth.ns_a):
        table = netfilter.spoof_rewrite(40200, "198.51.100.7", 40300, "203.0.113.1").apply()
        text = nft.run(f"list table ip {table.table.name}")
        assert "ip saddr set 198.51.100.7 notrack" in text
        assert "ip saddr set 203.0.113.1 notrack" in text
    table.remove()                      # here: the test's own namespace
    with inside(veth.ns_a):
        assert table.table.name not in nft.tables()
    table.remove()                      # twice: nothing to do, no error


@pytest.mark.parametrize("args", [(0, "198.51.100.7", 1, "203.0.113.1"),
                                  (1, "198.51.100.7", 70000, "203.0.113.1"),
                                  (1, "not-an-address", 2, "203.0.113.1"),
                                  (1, "198.51.100.7", 2, "203.0.113.1; flush ruleset")])
def test_spoof_rewrite_refuses_bad_ports_and_addresses(args):
    with pytest.raises(ValueError):
        netfilter.spoof_rewrite(*args)


def test_kept_contexts_survive_threads_racing_their_eviction():
    """More namespaces than kept contexts, several threads at once: a
    context evicted (and freed) between one thread's lookup and its command
    must not be used (that was a use-after-free); every command answers."""
    import threading

    from fastpunch._netns import VethPair
    from tests.conftest import require_root

    require_root("libnftables in namespaces")
    with VethPair() as p1, VethPair() as p2, VethPair() as p3:
        spaces = [p.ns_a for p in (p1, p2, p3)] + [p.ns_b for p in (p1, p2, p3)]
        assert len(spaces) > netfilter.KEPT_CONTEXTS
        errors, done = [], []

        def churn(offset):
            nft = netfilter.Nftables()
            try:
                for i in range(60):
                    with inside(spaces[(i + offset) % len(spaces)]):
                        assert nft.tables() == []
                done.append(offset)
            except BaseException as exc:           # reported below, not lost in the thread
                errors.append(exc)

        threads = [threading.Thread(target=churn, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors, errors
        assert sorted(done) == [0, 1, 2, 3]
