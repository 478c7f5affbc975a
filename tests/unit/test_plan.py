"""The CCS's strategy plan (candidates and evidence; version 1's for mixed
pairs), the planner's stages, and reconnect backoff."""

from __future__ import annotations

import pytest

from fastpunch.proto.backoff import Backoff
from fastpunch.proto.candidates import Candidate
from fastpunch.proto.kinds import CandidateKind
from fastpunch.proto.plan import legacy_plan, plan, relay_first_helps
from fastpunch.proto.wire import NextInfo
from fastpunch.punch.planner import stages_of

MAPPED = (Candidate(CandidateKind.MAPPED, "203.0.113.10", 40000, 1),)


def side(mapping, crafted=True, candidates=None, nat="unknown"):
    return NextInfo(port=1, isn=1, nat=nat, mapping=mapping, crafted=crafted,
                    candidates=candidates)


@pytest.mark.parametrize("a,b,expected", [
    ("preserve", "preserve", ("symmetric", "relay")),
    ("independent", "independent", ("symmetric", "relay")),       # the reflexive port is exact
    ("none", "none", ("symmetric", "spoof", "relay")),
    ("preserve", "random", ("symmetric", "spray", "relay")),
    ("random", "random", ("relay",)),                             # nothing direct: at once
    ("preserve", "sequential", ("symmetric", "predict", "relay")),
    ("unknown", "unknown", ("symmetric", "relay")),               # candidates decide
])
def test_plan_from_evidence_always_ends_on_the_relay(a, b, expected):
    assert plan(side(a), side(b)) == expected == plan(side(b), side(a))


@pytest.mark.parametrize("a,b,helps", [
    ("sequential", "random", True),        # guessing on both sides: seconds, mostly relay
    ("random", "random", True),            # relay only: start there
    ("sequential", "sequential", False),   # both predictable: a round trip or so
    ("preserve", "random", False),         # one spray toward a known port: fast
    ("independent", "random", False),
    ("none", "none", False),
    ("unknown", "random", False),          # no evidence: punch first
])
def test_relay_first_auto_starts_on_the_relay_where_the_punch_rests_on_guessing(a, b, helps):
    assert relay_first_helps(side(a), side(b)) is helps
    assert relay_first_helps(side(b), side(a)) is helps


def test_relay_first_auto_punches_first_with_a_port_mapping_or_a_shared_lan():
    assert not relay_first_helps(side("sequential", candidates=MAPPED), side("random"))
    assert not relay_first_helps(side("sequential"), side("random"), lan=True)


def test_a_port_mapping_makes_two_random_napts_worth_a_race_and_a_spray_needless():
    assert plan(side("random", candidates=MAPPED), side("random")) == ("symmetric", "relay")
    assert plan(side("preserve", candidates=MAPPED), side("random")) == ("symmetric", "relay")


def test_two_devices_on_one_lan_race_their_lan_pair_whatever_their_nat():
    assert plan(side("random"), side("random"), lan=True) == ("symmetric", "relay")
    # and nothing is sprayed beside the LAN pair
    assert plan(side("preserve"), side("random"), lan=True) == ("symmetric", "relay")


def test_without_crafting_only_kernel_strategies_and_the_relay():
    assert plan(side("preserve", crafted=False), side("preserve")) == ("simopen", "relay")
    # a port mapping needs no crafted packet
    assert plan(side("random", crafted=False, candidates=MAPPED), side("random")) == \
        ("upnp", "simopen", "relay")


def test_a_version_1_device_gets_version_1s_plan_and_an_old_guess_reads_as_evidence():
    assert plan(side(None, nat="nat"), side(None, nat="nat"), legacy=True) == \
        ("symmetric", "nat", "simopen", "relay") == legacy_plan("nat", "nat")
    assert legacy_plan("napt-random", "napt-random") == ("relay",)
    assert legacy_plan("upnp", "napt-random", crafted=False) == ("upnp", "simopen", "relay")
    # a version-2 peer without mapping evidence: its NAT class stands in
    assert plan(side(None, nat="napt-random"), side("preserve")) == \
        ("symmetric", "spray", "relay")


def test_racing_strategies_run_together_and_the_others_in_slots_of_their_own():
    names = lambda stages: [[s.name for s in st] for st in stages]  # noqa: E731
    assert names(stages_of(("symmetric", "predict", "spray", "spoof", "relay"))) == \
        [["symmetric", "predict", "spray"], ["spoof"]]
    assert names(stages_of(("upnp", "symmetric", "nat", "simopen", "relay"))) == \
        [["upnp"], ["symmetric", "nat"], ["simopen"]]
    # forced strategies (both sides alike) replace the plan, in their order
    assert names(stages_of(("symmetric", "nat", "simopen", "relay"), only=["simopen", "nat"])) \
        == [["simopen"], ["nat"]]
    assert names(stages_of(("spoof", "teleport", "relay"))) == [["spoof"]]   # unknown: skipped


def test_backoff_is_exponential_capped_and_fully_jittered():
    seen = []
    b = Backoff(base=0.5, cap=4.0, uniform=lambda lo, hi: seen.append((lo, hi)) or hi)
    delays = [b.next_delay() for _ in range(6)]
    assert delays == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    assert all(lo == 0.0 for lo, _ in seen)
    b.reset()
    assert b.next_delay() == 0.5
    with pytest.raises(ValueError):
        Backoff(base=2, cap=1)


def test_a_stage_that_never_settles_is_stopped_after_its_slot_and_the_relay_connects(
        monkeypatch):
    import asyncio
    import socket

    from fastpunch.punch import planner
    from fastpunch.punch.base import Report

    class Hang:                      # a strategy whose loop died without settling
        name, budget, crafted, races = "hang", 0.05, False, False

        async def run(self, ctx, slot, attempt, cancel):
            await asyncio.Event().wait()

    monkeypatch.setitem(planner.STRATEGIES, "hang", Hang())
    monkeypatch.setattr(planner, "OVERRUN", 0.05)

    async def relay():
        a, b = socket.socketpair()
        b.close()
        return a

    async def main():
        import time

        report = Report("peer")
        sock, how = await asyncio.wait_for(
            planner.punch(None, ["hang", "relay"], time.time(), report, relay=relay,
                          relay_after=0.2), 2.0)
        sock.close()
        return report, how

    report, how = asyncio.run(main())
    assert how == "relay"
    assert (report.attempts[0].reason, report.attempts[0].ok) == ("timeout", False)
    assert "after its slot" in report.attempts[0].detail


def test_the_device_refuses_a_relay_first_mode_it_does_not_know():
    from fastpunch.client import _relay_first_mode

    assert _relay_first_mode(True).value == "yes" and _relay_first_mode(False).value == "no"
    assert _relay_first_mode("auto").value == "auto"
    with pytest.raises(ValueError, match="relay_first"):
        _relay_first_mode("maybe")
