"""fastpunch: direct TCP connections between devices behind NATs and firewalls.

The public surface is re-exported here explicitly; modules starting with an
underscore are private.
"""

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

from fastpunch.client import (
    AuthenticationError as AuthenticationError,
    CCSError as CCSError,
    Device as Device,
    NextInfo as NextInfo,
    RelayError as RelayError,
    RendezvousRefusedError as RendezvousRefusedError,
)

__version__ = "0.1.0"

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
    "__version__",
]
