"""fastpunch: direct TCP connections between devices behind NATs and firewalls.

The public surface is re-exported here explicitly; modules starting with an
underscore are private.
"""

from typing import TYPE_CHECKING

from fastpunch.errors import (
    FastpunchError as FastpunchError,
    InsufficientPrivilegeError as InsufficientPrivilegeError,
    KernelFeatureMissing as KernelFeatureMissing,
    LocalProtocolError as LocalProtocolError,
    MalformedPacket as MalformedPacket,
    NetfilterError as NetfilterError,
    PacketBuildError as PacketBuildError,
    RemoteProtocolError as RemoteProtocolError,
)
from fastpunch.credentials import read_credentials as read_credentials
from fastpunch.liveness import Keepalive as Keepalive, PathLost as PathLost

__version__ = "0.1.0"

# The device API pulls in asyncio and the CCS protocol; engine-only users
# (a gateway that just crafts segments) should not pay for that at import.
_CLIENT = ("AuthenticationError", "CCSError", "Device", "NextInfo", "RelayError",
           "RendezvousRefusedError")

if TYPE_CHECKING:       # what the lazy __getattr__ below returns, for type checkers
    from fastpunch.client import (
        AuthenticationError as AuthenticationError,
        CCSError as CCSError,
        Device as Device,
        NextInfo as NextInfo,
        RelayError as RelayError,
        RendezvousRefusedError as RendezvousRefusedError,
    )


def __getattr__(name: str):
    if name in _CLIENT:
        from fastpunch import client

        return getattr(client, name)
    raise AttributeError(f"module 'fastpunch' has no attribute {name!r}")

__all__ = [
    "AuthenticationError",
    "CCSError",
    "Device",
    "NextInfo",
    "RelayError",
    "RendezvousRefusedError",
    "FastpunchError",
    "InsufficientPrivilegeError",
    "KernelFeatureMissing",
    "LocalProtocolError",
    "MalformedPacket",
    "NetfilterError",
    "PacketBuildError",
    "RemoteProtocolError",
    "Keepalive",
    "PathLost",
    "read_credentials",
    "__version__",
]
