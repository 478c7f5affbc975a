"""Which strategies to try, in which order, from both sides' NAT guesses.
Pure function: the CCS sends the result with every rendezvous."""

from __future__ import annotations

CRAFTED = {"spoof", "symmetric", "nat", "predict", "spray"}   # need raw sockets + TCP_REPAIR
PRESERVING = {"open", "firewall", "firewall-liberal", "nat", "nat-rst", "strict", "cgn", "upnp", "unknown"}


def plan(a_nat: str, b_nat: str, crafted: bool = True) -> tuple[str, ...]:
    """Ordered strategy names; "relay" always last (it always works).
    ``crafted`` is false when either side cannot craft packets (no
    CAP_NET_RAW / CAP_NET_ADMIN): then only a gateway's port mapping and
    kernel simultaneous open are tried, so neither side's raw SYNs leave NAT
    state the other cannot use."""
    sides = {a_nat, b_nat}
    # a gateway's port mapping needs no crafted packet: first whenever offered
    steps: list[str] = ["upnp"] if "upnp" in sides else []
    if not crafted:
        return tuple(steps) + ("simopen", "relay")
    if sides <= {"open", "firewall", "firewall-liberal"}:
        # spoof works only where symmetric does too (docs/punch.md): after it
        steps += ["symmetric", "spoof", "simopen"]
    elif "napt-random" in sides:
        steps += ["spray"] if not sides <= {"napt-random"} else []
    elif "napt-sequential" in sides:
        steps += ["predict", "symmetric"]
    else:
        steps += ["symmetric", "nat", "simopen"]
    return tuple(steps) + ("relay",)
