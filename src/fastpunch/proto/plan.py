"""Which strategies to try, in which order, from both sides' NAT guesses.
Pure function: the CCS sends the result with every rendezvous."""

from __future__ import annotations

CRAFTED = {"spoof", "symmetric", "nat", "predict", "spray"}   # need raw sockets + TCP_REPAIR
PRESERVING = {"open", "firewall", "nat", "nat-rst", "strict", "cgn", "upnp", "unknown"}


def plan(a_nat: str, b_nat: str, crafted: bool = True) -> tuple[str, ...]:
    """Ordered strategy names; "relay" always last (it always works).
    ``crafted`` is false when either side cannot craft packets (no
    CAP_NET_RAW / CAP_NET_ADMIN): then only kernel simultaneous open is
    tried, so neither side's raw SYNs leave NAT state the other cannot use."""
    if not crafted:
        return ("simopen", "relay")
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
