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

__version__ = "0.1.0"

__all__ = [
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
