"""Minimal network-namespace plumbing (pyroute2): two namespaces joined by a
veth pair, for the engine's live tests and benchmarks. The NAT lab builds its
topologies on the same calls.

Names carry the creating pid (``fpt<pid>x<n>a``) so a crashed run's leftovers
are recognisable and :func:`sweep_stale` removes them.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
from dataclasses import dataclass
from typing import Iterator

from fastpunch import _caps
from fastpunch._proc import pid_alive
from fastpunch.errors import KernelFeatureMissing

PREFIX = "fpt"
_counter = itertools.count()
_links = itertools.count()


def _pyroute2():
    try:
        import pyroute2
        from pyroute2 import netns
    except ImportError as exc:
        raise KernelFeatureMissing("pyroute2", "pip install 'fastpunch[lab]' (pyroute2)") from exc
    return pyroute2, netns


@contextlib.contextmanager
def inside(ns: str) -> Iterator[None]:
    """Run the block with the current thread in namespace ``ns``. Sockets made
    inside stay in that namespace after the block."""
    _, netns = _pyroute2()
    netns.pushns(ns)
    try:
        yield
    finally:
        netns.popns()


_SIOCETHTOOL = 0x8946
_ETHTOOL_STXCSUM = 0x00000017


def disable_tx_checksum(ifname: str) -> None:
    """Turn off TX checksum offload on ``ifname`` (current namespace).

    A veth left with offload on hands locally generated segments to the peer
    as CHECKSUM_PARTIAL: raw sockets there see an unfinished checksum. With it
    off the kernel writes real checksums, so what the engine receives can be
    verified exactly as a NIC would deliver it.
    """
    import ctypes
    import fcntl
    import socket
    import struct

    value = ctypes.create_string_buffer(struct.pack("II", _ETHTOOL_STXCSUM, 0), 8)
    ifr = struct.pack("16sP", ifname.encode(), ctypes.addressof(value))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        fcntl.ioctl(s.fileno(), _SIOCETHTOOL, ifr)


def create_namespace(name: str) -> str:
    """A new network namespace with its loopback up."""
    pyroute2, netns = _pyroute2()
    netns.create(name)
    with pyroute2.NetNS(name) as ipr:
        ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
    return name


def veth_between(ns1: str, name1: str, ns2: str, name2: str) -> None:
    """A veth pair with end ``name1`` in ``ns1`` and ``name2`` in ``ns2``, both
    up, TX checksum offload off. The pair is made in the root namespace under
    temporary names (only unique there) and renamed once moved."""
    pyroute2, _ = _pyroute2()
    k = next(_links)
    tmp = [f"fv{os.getpid() % 100000}x{k}{side}"[-15:] for side in "ab"]
    with pyroute2.IPRoute() as ipr:
        ipr.link("add", ifname=tmp[0], kind="veth", peer=tmp[1])
        for t, ns in zip(tmp, (ns1, ns2)):
            ipr.link("set", index=ipr.link_lookup(ifname=t)[0], net_ns_fd=ns)
    for t, ns, final in ((tmp[0], ns1, name1), (tmp[1], ns2, name2)):
        with pyroute2.NetNS(ns) as ipr:
            idx = ipr.link_lookup(ifname=t)[0]
            ipr.link("set", index=idx, ifname=final)
            ipr.link("set", index=idx, state="up")
        with inside(ns):
            disable_tx_checksum(final)


@dataclass
class VethPair:
    """Namespaces ``ns_a`` and ``ns_b`` joined by veth ``if_a``/``if_b`` with
    ``addr_a``/``addr_b`` (RFC 5737 TEST-NET-2 by default; IPv6 addresses
    from 2001:db8::/32, RFC 3849, with prefixlen 64 for an IPv6 pair)."""

    addr_a: str = "198.51.100.1"
    addr_b: str = "198.51.100.2"
    prefixlen: int = 24

    def __post_init__(self) -> None:
        n = next(_counter)
        tag = f"{PREFIX}{os.getpid()}x{n}"
        self.ns_a, self.ns_b = f"{tag}a", f"{tag}b"
        self.if_a, self.if_b = f"{tag}a"[-15:], f"{tag}b"[-15:]
        self._created: list[str] = []

    def up(self) -> "VethPair":
        _caps.require("creating network namespaces", _caps.CAP_SYS_ADMIN, _caps.CAP_NET_ADMIN)
        pyroute2, _ = _pyroute2()
        try:
            for ns in (self.ns_a, self.ns_b):
                self._created.append(create_namespace(ns))
            veth_between(self.ns_a, self.if_a, self.ns_b, self.if_b)
            for ifname, ns, addr in ((self.if_a, self.ns_a, self.addr_a),
                                     (self.if_b, self.ns_b, self.addr_b)):
                # an IPv6 address skips duplicate address detection: a fresh
                # link of two namespaces has no duplicate, and a tentative
                # address cannot be bound for the second or so DAD takes
                extra = {"flags": 0x02} if ":" in addr else {}      # IFA_F_NODAD
                with pyroute2.NetNS(ns) as ipr:
                    ipr.addr("add", index=ipr.link_lookup(ifname=ifname)[0], address=addr,
                             prefixlen=self.prefixlen, **extra)
        except BaseException:
            self.down()
            raise
        return self

    def down(self) -> None:
        _, netns = _pyroute2()
        for ns in self._created:  # the veth pair dies with its namespaces
            with contextlib.suppress(OSError, FileNotFoundError):
                netns.remove(ns)
        self._created.clear()

    def __enter__(self) -> "VethPair":
        return self.up()

    def __exit__(self, *exc) -> None:
        self.down()


_RUN_NETNS = "/run/netns"
_MNT_DETACH, _UMOUNT_NOFOLLOW = 2, 8


def listed() -> list[str]:
    """Names in /run/netns (where ``ip netns`` and pyroute2 bind-mount them)."""
    return sorted(os.listdir(_RUN_NETNS)) if os.path.isdir(_RUN_NETNS) else []


def remove(name: str) -> None:
    """Remove a named namespace as ``ip netns delete`` does (detach its bind
    mount, unlink the name), without pyroute2, which a device install lacks
    (``fastpunch sweep`` runs there). OSError if it cannot."""
    import ctypes

    if "/" in name or "\0" in name or name in ("", ".", ".."):
        raise ValueError(f"not a namespace name: {name!r}")
    path = os.path.join(_RUN_NETNS, name)
    libc = ctypes.CDLL(None, use_errno=True)
    # (NOFOLLOW: a symlink planted in /run/netns must not detach its target)
    if libc.umount2(path.encode(), _MNT_DETACH | _UMOUNT_NOFOLLOW) != 0:
        err = ctypes.get_errno()
        if err != 22:                       # EINVAL: not mounted (a half-made name): unlink it
            raise OSError(err, os.strerror(err), path)
    os.unlink(path)


def ours(prefix: str = PREFIX) -> list[str]:
    """Namespaces whose names say this library made them."""
    return [ns for ns in listed() if re.match(rf"^{prefix}\d+x\d+[ab]$", ns)]


def sweep_stale(prefix: str = PREFIX) -> list[str]:
    """Remove namespaces left by processes that no longer exist."""
    removed = []
    for ns in ours(prefix):
        pid = int(re.match(rf"^{prefix}(\d+)x", ns).group(1))
        if not pid_alive(pid):
            with contextlib.suppress(OSError):
                remove(ns)
                removed.append(ns)
    return removed
