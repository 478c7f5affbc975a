"""The project's one vocabulary for roles, NAT behaviour and candidates.

Every value is a ``str`` enum whose value is what the wire carries, so a
message field and a Python comparison use the same word. Values a newer peer
may send that this build does not know decode as ``UNKNOWN`` (``parse``), never
as an error: the wire validates the field's size, the meaning degrades.
"""

from __future__ import annotations

import enum
from typing import Type, TypeVar

__all__ = ["Role", "Mapping", "Filtering", "CandidateKind", "NatClass", "RelayFirst", "parse"]

E = TypeVar("E", bound=enum.Enum)


class Role(str, enum.Enum):
    """A side of one rendezvous: the initiator asked for it (``connect()``),
    the responder answered (``accept()``). The initiator is also ICE's
    *controlling* agent: it nominates the candidate pair both sides use."""
    INITIATOR = "initiator"
    RESPONDER = "responder"


class Mapping(str, enum.Enum):
    """How our gateway maps an internal (address, port) to an external one
    (RFC 4787 section 4.1), as natcheck's probes showed it."""
    NONE = "none"                  # no NAT: the external address is our own
    PRESERVE = "preserve"          # external port == internal port (Linux masquerade)
    INDEPENDENT = "independent"    # same external port for every destination, but another
    #                                number (endpoint-independent, port-changing)
    SEQUENTIAL = "sequential"      # each new mapping takes the next port(s): predictable
    RANDOM = "random"              # a new random port per destination: only a spray or a relay
    UNKNOWN = "unknown"            # not probed (yet), or the probes disagreed

    @property
    def translates(self) -> bool:
        """The external port of the next flow is not the one a probe saw."""
        return self in (Mapping.SEQUENTIAL, Mapping.RANDOM)


class Filtering(str, enum.Enum):
    """What our gateway does with an unsolicited inbound SYN (RFC 4787 5)."""
    OPEN = "open"                  # lets it in: no stateful filter
    DROP = "drop"                  # drops it silently (most home routers)
    RST = "rst"                    # answers it with a RST itself (RFC 5382 REQ-4 says it must
    #                                not, for 6 s; many do)
    UNKNOWN = "unknown"


class CandidateKind(str, enum.Enum):
    """Where an address a peer may reach us at comes from (RFC 8445 5.1.1)."""
    HOST = "host"                  # an address of one of our own interfaces (the LAN)
    MAPPED = "mapped"              # a port our gateway forwards to us (PCP, NAT-PMP, UPnP-IGD)
    SRFLX = "srflx"                # server-reflexive: what the CCS saw for the very port we punch from
    PREDICTED = "predicted"        # a guess: a sequential NAPT's next port, a preserved port
    PRFLX = "prflx"                # peer-reflexive: learned during the punch, never announced

    @property
    def type_preference(self) -> int:
        """RFC 8445 5.1.2.2 type preference (0..126, higher first). A granted
        mapping is as good as a public address; a guess ranks below what was
        seen."""
        return _TYPE_PREFERENCE[self]


_TYPE_PREFERENCE = {CandidateKind.HOST: 126, CandidateKind.MAPPED: 118,
                    CandidateKind.PRFLX: 110, CandidateKind.SRFLX: 100,
                    CandidateKind.PREDICTED: 60}


class RelayFirst(str, enum.Enum):
    """What a connecting device asks of a rendezvous (protocol version 4)."""
    NO = "no"                      # punch, the relay only as the fallback
    YES = "yes"                    # both sides on the relay at once, the punch behind it
    AUTO = "auto"                  # YES where the punch is likely slow or to fail (plan.py)


class NatClass(str, enum.Enum):
    """The one-word summary of a gateway natcheck reports and a device
    announces (the lab's profile names, where natcheck can tell them
    apart). Since candidates, it no longer decides the plan: the mapping and
    filtering evidence and the candidates do; it stays for reports, for old
    peers, and as the name people read."""
    OPEN = "open"
    FIREWALL = "firewall"
    NAT = "nat"
    NAT_RST = "nat-rst"
    NAPT_EI = "napt-ei"
    NAPT_SEQUENTIAL = "napt-sequential"
    NAPT_RANDOM = "napt-random"
    UPNP = "upnp"
    UNKNOWN = "unknown"


def parse(cls: Type[E], value) -> E:
    """``cls(value)``, or ``cls.UNKNOWN`` for a value this build does not know."""
    try:
        return cls(value)
    except ValueError:
        return cls["UNKNOWN"]
