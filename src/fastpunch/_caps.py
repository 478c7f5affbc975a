"""Which Linux capabilities this process holds, so operations can say exactly
what is missing before they fail halfway (uid 0 is neither necessary nor
sufficient: a container's root may lack them, a non-root service may have them)."""

from __future__ import annotations

from fastpunch.errors import InsufficientPrivilegeError

CAP_NET_ADMIN = 12
CAP_NET_RAW = 13
CAP_SYS_ADMIN = 21

_NAMES = {CAP_NET_ADMIN: "CAP_NET_ADMIN", CAP_NET_RAW: "CAP_NET_RAW",
          CAP_SYS_ADMIN: "CAP_SYS_ADMIN"}


def effective() -> int:
    """The effective capability mask (CapEff of /proc/self/status)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    return 0


def missing(*caps: int) -> list[str]:
    have = effective()
    return [_NAMES[c] for c in caps if not have >> c & 1]


def require(action: str, *caps: int) -> None:
    """Raise InsufficientPrivilegeError naming every capability ``action`` lacks."""
    lacking = missing(*caps)
    if lacking:
        raise InsufficientPrivilegeError(" and ".join(lacking), action)
