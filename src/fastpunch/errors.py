"""The one exception hierarchy of fastpunch.

Every error a caller can see is a :class:`FastpunchError`. Where a built-in
exception already names the situation, ours also derives from it, so callers
may catch either (``MalformedPacket`` is a ``ValueError``,
``InsufficientPrivilegeError`` a ``PermissionError``).
"""

from __future__ import annotations

import errno as _errno
import os as _os

__all__ = [
    "FastpunchError",
    "MalformedPacket",
    "PacketBuildError",
    "InsufficientPrivilegeError",
    "KernelFeatureMissing",
    "NetfilterError",
    "LocalProtocolError",
    "RemoteProtocolError",
    "error_from_code",
]


class FastpunchError(Exception):
    """Base class of every fastpunch error."""


class MalformedPacket(FastpunchError, ValueError):
    """A byte string is not a well-formed IPv4/TCP datagram.

    ``reason`` is a stable identifier (``"ip-checksum"``, ``"tcp-option-length"``, ...)
    fit for counters and tests; the message is a sentence for people.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{message} ({reason})")
        self.reason = reason


class PacketBuildError(FastpunchError, ValueError):
    """The fields given cannot make a datagram (options over 40 bytes, over 64 KiB, ...).

    ``reason`` is the same kind of stable identifier as :class:`MalformedPacket`'s.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{message} ({reason})")
        self.reason = reason


class InsufficientPrivilegeError(FastpunchError, PermissionError):
    """The process lacks a Linux capability an operation needs.

    ``capability`` names it (``"CAP_NET_RAW"``, ``"CAP_NET_ADMIN"``).
    """

    def __init__(self, capability: str, action: str) -> None:
        super().__init__(
            _errno.EPERM,
            f"{action} needs {capability}: run as root, or grant it to the interpreter "
            f"(setcap {capability.lower().replace(' and ', ',')}+ep), or run inside a user "
            "namespace that has it",
        )
        self.capability = capability


class KernelFeatureMissing(FastpunchError, OSError):
    """The running kernel or system lacks a feature (a module, a library)."""

    def __init__(self, feature: str, hint: str) -> None:
        super().__init__(_errno.ENOSYS, f"{feature} is not available: {hint}")
        self.feature = feature


class NetfilterError(FastpunchError, OSError):
    """nftables refused a ruleset; ``detail`` carries libnftables' own message."""

    def __init__(self, message: str, detail: str = "") -> None:
        super().__init__(f"{message}: {detail.strip()}" if detail else message)
        self.detail = detail


class LocalProtocolError(FastpunchError):
    """We asked a protocol machine to do something its state forbids."""


class RemoteProtocolError(FastpunchError):
    """The peer sent something its protocol forbids."""


#: Capability that an EPERM from each kind of operation means is missing.
_CAPABILITY_FOR = {
    "raw-socket": ("CAP_NET_RAW", "opening a raw IP socket"),
    "netfilter": ("CAP_NET_ADMIN", "changing nftables rules"),
    "tcp-repair": ("CAP_NET_ADMIN", "TCP_REPAIR"),
}


def error_from_code(code: int, reason: str, text: str, operation: str) -> Exception:
    """Turn a negative engine code into the exception to raise.

    ``reason``/``text`` are the engine's own name and sentence for packet
    reason codes; ``operation`` says which kind of call failed (a key of
    ``_CAPABILITY_FOR``, or any label) so EPERM names the right capability.
    """
    code = -code if code < 0 else code
    if code >= 4096:
        if operation == "build":
            return PacketBuildError(reason, text)
        return MalformedPacket(reason, text)
    if code in (_errno.EPERM, _errno.EACCES) and operation in _CAPABILITY_FOR:
        cap, action = _CAPABILITY_FOR[operation]
        return InsufficientPrivilegeError(cap, action)
    if code == _errno.EPERM and operation == "raw-send":
        return OSError(code, "raw send: Operation not permitted (a netfilter rule in the output "
                             "path dropped the datagram)")
    return OSError(code, f"{operation}: {_os.strerror(code)}")
