"""Which strategies to try, in which order, from both sides' NAT guesses.
Pure function: the CCS sends the result with every rendezvous."""

from __future__ import annotations

PRESERVING = {"open", "firewall", "nat", "nat-rst", "strict", "cgn", "upnp", "unknown"}


def plan(a_nat: str, b_nat: str) -> tuple[str, ...]:
    """Ordered strategy names; "relay" always last (it always works)."""
    sides = {a_nat, b_nat}
    steps: list[str] = []
    if "upnp" in sides:
        steps.append("upnp")
    if sides <= {"open", "firewall"}:
        steps += ["spoof", "symmetric", "simopen"]
    elif "napt-random" in sides:
        steps += ["spray"] if not sides <= {"napt-random"} else []
    elif "napt-sequential" in sides:
        steps += ["predict", "symmetric"]
    else:
        steps += ["symmetric", "nat", "simopen"]
    return tuple(steps) + ("relay",)
