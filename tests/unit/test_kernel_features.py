"""A missing kernel feature is an exception naming it, never the end of the
process. The feature is taken away for real: a child process whose seccomp
filter fails the syscall, as a kernel without the feature does."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from tests import seccomp

ROOT = __file__.rsplit("/tests/", 1)[0]


def run_child(body: str, deny: str = "deny_nfnetlink") -> subprocess.CompletedProcess:
    code = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {ROOT!r})
        from tests import seccomp
        seccomp.{deny}()
    """) + textwrap.dedent(body)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)


@pytest.mark.skipif(not seccomp.supported(), reason="no seccomp syscall table for this machine")
def test_libnftables_itself_exits_the_process_without_nfnetlink():
    # the hazard the probe exists for: the library calls exit(3) itself
    out = run_child("""
        import ctypes
        ctypes.CDLL("libnftables.so.1").nft_ctx_new(0)
        print("still alive")
    """)
    assert out.returncode == 3 and "still alive" not in out.stdout
    assert "Unable to initialize Netlink socket" in out.stderr


@pytest.mark.skipif(not seccomp.supported(), reason="no seccomp syscall table for this machine")
def test_without_nfnetlink_every_netfilter_call_raises_kernel_feature_missing():
    out = run_child("""
        from fastpunch import netfilter
        from fastpunch.errors import KernelFeatureMissing
        for call in (lambda: netfilter.Nftables().run("list tables"),
                     lambda: netfilter.suppress_rsts([netfilter.RstSuppression(40000)]).apply(),
                     netfilter.sweep_stale):
            try:
                call()
            except KernelFeatureMissing as exc:
                print("missing:", exc.feature, "|", exc)
        print("still alive")
    """)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[-1] == "still alive"
    assert [line.split(" |")[0] for line in lines[:-1]] == ["missing: nf_tables"] * 3
    assert "netfilter netlink socket" in lines[0]


@pytest.mark.skipif(not seccomp.supported(), reason="no seccomp syscall table for this machine")
@pytest.mark.parametrize("deny, error, named", [
    ("deny_nfnetlink", "KernelFeatureMissing", "nf_tables"),
    ("deny_raw", "InsufficientPrivilegeError", "CAP_NET_RAW"),
    ("deny_repair", "KernelFeatureMissing", "TCP_REPAIR"),
    ("deny_mark", "KernelFeatureMissing", "SO_MARK"),
])
def test_each_missing_feature_is_named_before_a_punch_and_the_device_plans_without_it(
        deny, error, named):
    from fastpunch import _caps

    if _caps.missing(_caps.CAP_NET_RAW, _caps.CAP_NET_ADMIN):
        pytest.skip("the probes pass only where the privileges are held")
    out = run_child("""
        from fastpunch.punch.driver import require_privileges
        from fastpunch.netcheck.gatherer import crafted_capability
        try:
            require_privileges()
            print("nothing missing")
        except Exception as exc:
            print("raised", type(exc).__name__, getattr(exc, "feature", None) or exc.capability)
        cap = crafted_capability()
        print("crafted", cap.crafted, "|", cap.why)
        print("still alive")
    """, deny=deny)
    assert out.returncode == 0, out.stderr
    raised, crafted, alive = out.stdout.splitlines()
    assert raised == f"raised {error} {named}"
    assert crafted.startswith("crafted False | ") and named in crafted
    assert alive == "still alive"


def test_the_probes_pass_where_everything_is_there():
    from fastpunch import _caps

    if _caps.missing(_caps.CAP_NET_RAW, _caps.CAP_NET_ADMIN):
        pytest.skip("needs CAP_NET_RAW and CAP_NET_ADMIN")
    from fastpunch.netcheck.gatherer import crafted_capability

    assert crafted_capability().crafted


def test_a_passing_error_is_not_taken_for_a_missing_feature(monkeypatch):
    import errno
    import socket

    from fastpunch import _features
    from fastpunch.netcheck import gatherer

    def no_fds(*a, **kw):
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr(socket, "socket", no_fds)
    with pytest.raises(OSError) as err:          # as it is: not KernelFeatureMissing
        _features.probe_raw()
    assert err.value.errno == errno.EMFILE and type(err.value) is OSError
    monkeypatch.setattr(_features, "require_crafted", lambda: no_fds())
    g = gatherer.Gatherer("nat", name="cam")
    cap = g.crafted()
    assert not cap.crafted and not cap.lasting and "Too many open files" in cap.why
    # the next punch asks again, and gets the real answer once it passes
    monkeypatch.setattr(_features, "require_crafted", lambda: None)
    assert g.crafted().crafted


@pytest.mark.skipif(not seccomp.supported(), reason="no seccomp syscall table for this machine")
def test_sweep_without_nf_tables_says_so_and_goes_on():
    out = run_child("""
        from fastpunch import cli
        print("rc", cli.main(["sweep"]))
    """)
    assert out.returncode == 0, out.stderr
    assert "rc 0" in out.stdout and "stale namespaces" in out.stdout
    assert "no nftables tables swept: nf_tables is not available" in out.stderr
