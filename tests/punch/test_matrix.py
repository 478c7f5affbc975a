"""A reduced compatibility matrix (scripts/compat-matrix) holds the issue's
goals for "auto": pairs without a port-translating NAT connect directly in
every trial, and every trial ends connected, on the relay when it cannot go
direct."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os

import pytest

from tests.conftest import require_root

pytestmark = pytest.mark.lab

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PAIRS = [("nat", "nat"), ("nat-rst", "nat-rst"), ("nat-rst", "strict"), ("firewall", "cgn"),
         ("nat", "napt-random"), ("napt-sequential", "cgn"), ("napt-random", "napt-random"),
         ("upnp", "napt-random")]
TRIALS = 3


def load_matrix():
    """The script's functions (it has no .py suffix, so load it by path)."""
    path = os.path.join(ROOT, "scripts", "compat-matrix")
    loader = importlib.machinery.SourceFileLoader("compat_matrix", path)
    spec = importlib.util.spec_from_loader("compat_matrix", loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


@pytest.mark.timeout(240)
def test_reduced_matrix_meets_the_auto_goals():
    require_root("the compatibility matrix")
    matrix = load_matrix()
    result = matrix.run_matrix(PAIRS, ["auto"], TRIALS, trial_timeout=20, log=print)
    cells = {(p["a"], p["b"]): p["cells"]["auto"] for p in result["pairs"]}
    assert set(cells) == set(PAIRS)
    assert all(c["trials"] == TRIALS for c in cells.values())

    problems = matrix.check(result)
    details = {f"{p['a']}:{p['b']}": [t["report_lines"] or t["error"]
                                      for t in p["trials"]["auto"] if not t["ok"]]
               for p in result["pairs"]}
    assert not problems, (problems, details)
    # what the check stands for, spelled out
    for (a, b), cell in cells.items():
        assert cell["ok"] == TRIALS, (a, b, cell)
        if "napt-random" not in (a, b):
            assert cell["direct"] == TRIALS, (a, b, cell)
    assert cells[("napt-random", "napt-random")]["relay"] == TRIALS
    # natcheck found the mapping; the random NAPT side just connects in
    assert cells[("upnp", "napt-random")]["strategies"] == {"upnp": TRIALS}
    # and the markdown renders from the same result
    text = matrix.render(result, "test")
    assert "| `nat` |" in text and "## `auto`" in text
