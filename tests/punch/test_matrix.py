"""A reduced compatibility matrix (fastpunch.lab.matrix, `fastpunch lab
matrix`) holds the issue's goals for "auto": every pair where one side is
not a random NAPT connects directly in every trial, every trial ends
connected (on the relay when it cannot go direct), two devices behind one
gateway connect over their LAN in a few packets, and cameras and viewers
crowded behind two gateways with colliding ports all go direct."""

from __future__ import annotations

import pytest

from fastpunch.lab import matrix
from tests.conftest import require_root

pytestmark = pytest.mark.lab

PAIRS = [("nat", "nat"), ("nat-rst", "nat-rst"), ("nat-rst", "strict"), ("firewall", "cgn"),
         ("nat", "napt-random"), ("napt-sequential", "cgn"), ("napt-random", "napt-random"),
         ("upnp", "napt-random")]
TRIALS = 3
UNITS = ([matrix.Unit("pair", a, b) for a, b in PAIRS]
         + [matrix.Unit("lan", "nat", "nat", hairpin="off")]
         + matrix.crowded_units([("nat", "nat")], hosts=2)
         + matrix.parse_dual("napt-random/firewall-rst:napt-random/firewall,none/firewall:nat"))


@pytest.mark.timeout(240)
def test_reduced_matrix_meets_the_auto_goals():
    require_root("the compatibility matrix")
    result = matrix.run_matrix(UNITS, ["auto"], TRIALS, trial_timeout=20, log=print)
    units = {(u["kind"], u["a"], u["b"]): u for u in matrix.units_of(result)}
    cells = {key: u["cells"]["auto"] for key, u in units.items()}
    assert set(cells) == {(u.kind, u.a, u.b) for u in UNITS}
    for (kind, a, b), cell in cells.items():
        assert cell["trials"] == TRIALS * (2 if kind == "crowded" else 1), (kind, a, b, cell)

    problems = matrix.check(result)
    details = {u["name"]: [t["report_lines"] or t["error"] for t in u["trials"]["auto"]
                           if not t["ok"]] for u in matrix.units_of(result)}
    assert not problems, (problems, details)
    # what the check stands for, spelled out
    for (kind, a, b), cell in cells.items():
        assert cell["ok"] == cell["trials"], (kind, a, b, cell)
        if ("napt-random" not in (a, b) and kind != "dual") or kind == "lan":
            assert cell["direct"] == cell["trials"], (kind, a, b, cell)
    # the mapped candidate takes the random side's SYNs in the race: no spray
    mapped = cells[("pair", "upnp", "napt-random")]
    assert mapped["strategies"] == {"symmetric": TRIALS}, mapped
    assert all(k.endswith("-mapped") for k in mapped["accept_pairs"]), mapped
    # two random NAPTs: the relay at once, no direct attempt on either side
    randoms = units[("pair", "napt-random", "napt-random")]
    assert randoms["cells"]["auto"]["relay"] == TRIALS
    for t in randoms["trials"]["auto"]:
        assert [a["strategy"] for a in t["attempts"]] == ["relay"], t
        assert [a["strategy"] for a in t["accept_attempts"]] == ["relay"], t
        assert t["sent"] == t["accept_sent"] == 0, t
    # one LAN: the host pair, both sides, a handful of packets
    lan = cells[("lan", "nat", "nat")]
    assert lan["pairs"] == lan["accept_pairs"] == {"host-host": TRIALS}, lan
    assert lan["sent"]["max"] < matrix.LAN_PACKETS and \
        lan["accept_sent"]["max"] < matrix.LAN_PACKETS, lan

    # dual stack: IPv6 past two random NAPTs; no family in common, the relay
    v6 = cells[("dual", "napt-random", "napt-random")]
    assert v6["direct"] == TRIALS and v6["families"] == {"IPv6": TRIALS}, v6
    assert cells[("dual", "nat", "nat")]["relay"] == TRIALS

    # and the page renders from the same result, every section present
    text = matrix.render(result, "test")
    for heading in ("## Summary", "## Legend", "## Pairs of profiles", "### `auto`",
                    "## Same LAN", "## Crowded", "## Dual stack", "## The known limit"):
        assert heading in text, heading
    assert "| `nat` |" in text and "matrix --check` on this run: **passed**" in text
