"""Suite-wide rules.

* FASTPUNCH_REQUIRE_LIVE=1 (set by .ci/run): a skipped test is a failure. CI
  must exercise every live, lab, capture and fuzz test; a missing tool or
  privilege there is a broken CI machine, not a reason to pass.
* At the end of the session nothing this suite created may remain: no
  namespaces of ours, no fastpunch nftables tables.
"""

from __future__ import annotations

import os
import re
import subprocess

import pytest

REQUIRE_LIVE = os.environ.get("FASTPUNCH_REQUIRE_LIVE") == "1"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if REQUIRE_LIVE and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = f"skipped while FASTPUNCH_REQUIRE_LIVE=1: {reason}"


def require_root(what: str = "this test") -> None:
    if os.geteuid() != 0:
        pytest.skip(f"{what} needs root (network namespaces, raw sockets, nftables)")


def _leftovers() -> tuple[list[str], list[str]]:
    netns_dir = "/run/netns"
    spaces = sorted(n for n in (os.listdir(netns_dir) if os.path.isdir(netns_dir) else [])
                    if re.match(r"^fp", n))
    try:
        out = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True,
                             timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        out = ""
    tables = re.findall(r"table \S+ (fastpunch_\S+)", out)
    return spaces, tables


def _ours_or_orphaned(name: str) -> bool:
    """Names carry their creator's pid (fpl<pid>x.., fpt<pid>x.., fastpunch_<pid>_..).
    A leftover counts against this suite if this process made it, or if its
    maker is dead (a crashed child); a live other process's (another test
    run, a `fastpunch lab up` keeper someone started) is not ours to judge."""
    from fastpunch._proc import pid_alive

    m = re.match(r"^(?:fp[a-z]|fastpunch_)(\d+)", name)
    if m is None:
        return True
    pid = int(m.group(1))
    return pid == os.getpid() or not pid_alive(pid)


@pytest.fixture(scope="session", autouse=True)
def nothing_left_behind():
    before = _leftovers() if os.geteuid() == 0 else ([], [])
    yield
    if os.geteuid() != 0:
        return
    spaces, tables = _leftovers()
    new_spaces = sorted(n for n in set(spaces) - set(before[0]) if _ours_or_orphaned(n))
    new_tables = sorted(n for n in set(tables) - set(before[1]) if _ours_or_orphaned(n))
    assert not new_spaces and not new_tables, (
        f"the suite left namespaces {new_spaces} and nftables tables {new_tables}")
