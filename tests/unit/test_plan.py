"""The CCS's strategy plan, the planner's step list, and reconnect backoff."""

from __future__ import annotations

import pytest

from fastpunch.proto.backoff import Backoff
from fastpunch.proto.plan import plan
from fastpunch.punch.planner import steps_of


@pytest.mark.parametrize("a,b,expected", [
    ("nat", "nat", ("symmetric", "nat", "simopen", "relay")),
    ("firewall", "open", ("symmetric", "spoof", "simopen", "relay")),
    ("firewall-liberal", "firewall", ("symmetric", "spoof", "simopen", "relay")),
    ("nat", "napt-random", ("spray", "relay")),
    ("napt-random", "napt-random", ("relay",)),
    ("nat", "napt-sequential", ("predict", "symmetric", "relay")),
    ("upnp", "nat", ("upnp", "symmetric", "nat", "simopen", "relay")),
])
def test_plan_orders_strategies_and_always_ends_on_the_relay(a, b, expected):
    assert plan(a, b) == expected == plan(b, a)


def test_without_crafting_only_kernel_simopen_and_the_relay():
    assert plan("nat", "nat", crafted=False) == ("simopen", "relay")
    # a port mapping needs no crafted packet
    assert plan("upnp", "napt-random", crafted=False) == ("upnp", "simopen", "relay")


def test_planner_runs_only_what_it_has_in_plan_order():
    assert steps_of(("upnp", "symmetric", "nat", "simopen", "relay")) == \
        ["upnp", "symmetric", "nat", "simopen"]
    assert steps_of(("symmetric", "nat", "simopen", "relay"), only=["simopen", "nat"]) == \
        ["nat", "simopen"]
    assert steps_of(("spray", "relay")) == ["spray"]
    assert steps_of(("spoof", "teleport", "relay")) == ["spoof"]   # unknown: skipped alike


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
