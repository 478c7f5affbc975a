"""map_port, unmap and mapped: one mapping, asked of the protocols in turn.

What works where. miniupnpd (the lab's "upnp" gateway, OpenWrt and other
open router firmware) answers all three: UPnP-IGD on its HTTP port (5000 in
the lab), NAT-PMP and PCP both on UDP 5351. A plain NAT without a daemon
answers nothing, or an ICMP port unreachable that ends that protocol's try
at once ("unreachable"). miniupnpd in *secure mode* (the lab's, OpenWrt's)
maps only to the address that asks: PCP and NAT-PMP here refuse up front to
map for another host ("third-party"); UPnP asks and the gateway refuses
(fault 606 or 718). Its usual permission rules allow internal and external
ports 1024-65535 only. A refused *external* port is no error for PCP and
NAT-PMP: miniupnpd grants the next allowed one, which the returned
:class:`Mapping` carries. But a PCP or NAT-PMP request for an internal port
below 1024 makes miniupnpd 2.3 walk all 65535 external ports before it
refuses, deaf to every client for about a minute; so PCP and NAT-PMP are
never asked for internal ports below 1024 here ("low-port"). UPnP refuses
those at once (fault 718).

Mappings are requested with a short lifetime (``lifetime``, 120 s by
default; gateways may grant another, e.g. miniupnpd raises PCP lifetimes to
its ``min_lifetime``) and are meant to be deleted after use: :func:`unmap`,
or the :func:`mapped` context manager. PCP and NAT-PMP talk only to the
default gateway of this network namespace (:func:`default_gateway`, from
``/proc/thread-self/net/route``) unless ``gateway`` says otherwise; SSDP
replies are accepted only from that gateway when it is known, and only with
a LOCATION (and control URL) on the replying address itself.

Every failure is a :class:`PortMapError` with a stable ``code``: the
decoders' ``pcp-*``, ``natpmp-*`` and ``upnp-*`` (``pcp-bad-nonce``,
``natpmp-refused``, ``upnp-fault-718``, ...), the transports' ``timeout``,
``unreachable``, ``no-gateway``, ``third-party``, ``low-port``,
``network``, and ``no-mapping`` from :func:`map_port` when every protocol
failed (its ``failures`` say why each did)."""

from __future__ import annotations

import asyncio
import contextlib
from typing import AsyncIterator, Dict, Optional, Sequence

from ._common import Mapping, PortMapError, _check_lifetime, _check_port, _ipv4
from ._exchange import DEFAULT_TIMEOUT
from .gateway import default_gateway
from .natpmp import _map_natpmp, _unmap_natpmp
from .pcp import _map_pcp, _unmap_pcp
from .upnp import _map_upnp, _unmap_upnp

__all__ = ["PROTOCOLS", "map_port", "unmap", "mapped"]


PROTOCOLS = ("pcp", "natpmp", "upnp")
LOW_PORTS = 1024                        # PCP/NAT-PMP never asked to map below this


async def map_port(internal_addr: str, internal_port: int, *, gateway: Optional[str] = None,
                   lifetime: int = 120, external_port: Optional[int] = None,
                   protocols: Sequence[str] = PROTOCOLS,
                   timeout: float = DEFAULT_TIMEOUT) -> Mapping:
    """Ask the gateway to forward inbound TCP to ``internal_addr:internal_port``.

    ``protocols`` are tried in order; the first granted mapping is returned.
    ``gateway`` defaults to :func:`default_gateway` (PCP and NAT-PMP need
    it; UPnP then accepts SSDP replies from it only). ``external_port``
    None asks for the internal port (the gateway may grant another, PCP and
    NAT-PMP say which). ``internal_addr`` "0.0.0.0" means this host's
    address toward the gateway. ``timeout`` bounds each protocol's try.
    Raises :class:`PortMapError` ``"no-mapping"`` with ``failures`` (one
    error per protocol) when none was granted."""
    _ipv4(internal_addr or "0.0.0.0", "internal_addr")
    _check_port(internal_port, "internal_port")
    _check_lifetime(lifetime)
    want = internal_port if external_port is None else _check_port(external_port, "external_port")
    unknown = [p for p in protocols if p not in PROTOCOLS]
    if unknown or not protocols:
        raise ValueError(f"protocols are some of {PROTOCOLS}: {tuple(protocols)!r}")
    if gateway is not None:
        _ipv4(gateway, "gateway")
    if not timeout > 0:
        raise ValueError(f"timeout must be positive: {timeout!r}")
    gw = gateway or default_gateway()
    loop = asyncio.get_running_loop()
    failures: Dict[str, PortMapError] = {}
    for protocol in protocols:
        deadline = loop.time() + timeout
        try:
            if protocol == "upnp":
                return await _map_upnp(gw, internal_addr, internal_port, want, lifetime, deadline)
            if gw is None:
                raise PortMapError("no-gateway", "no default IPv4 gateway in this namespace")
            if internal_port < LOW_PORTS:
                raise PortMapError("low-port", f"{protocol}: not asking for internal port "
                                   f"{internal_port} (below {LOW_PORTS}: miniupnpd's default "
                                   "permissions refuse it only after a minute-long stall)")
            runner = _map_pcp if protocol == "pcp" else _map_natpmp
            return await runner(gw, internal_addr, internal_port, want, lifetime, deadline)
        except PortMapError as exc:
            failures[protocol] = exc
    why = "; ".join(f"{p}: {e}" for p, e in failures.items())
    raise PortMapError("no-mapping", f"no port mapping for {internal_addr}:{internal_port} "
                       f"({why})", failures=failures)


async def unmap(mapping: Mapping, *, timeout: float = DEFAULT_TIMEOUT) -> None:
    """Delete ``mapping`` at its gateway: PCP lifetime 0 with its nonce,
    NAT-PMP lifetime 0, UPnP DeletePortMapping. Raises PortMapError when the
    gateway does not confirm (callers cleaning up may ignore it: the mapping
    expires with its lifetime anyway)."""
    deadline = asyncio.get_running_loop().time() + timeout
    if mapping.protocol == "pcp":
        await _unmap_pcp(mapping, deadline)
    elif mapping.protocol == "natpmp":
        await _unmap_natpmp(mapping, deadline)
    elif mapping.protocol == "upnp":
        await _unmap_upnp(mapping, deadline)
    else:
        raise ValueError(f"not a mapping of {PROTOCOLS}: {mapping.protocol!r}")


@contextlib.asynccontextmanager
async def mapped(internal_addr: str, internal_port: int, **kwargs) -> AsyncIterator[Mapping]:
    """``async with mapped(addr, port) as m:`` a :func:`map_port` mapping,
    deleted on the way out (a failed deletion is ignored: it expires)."""
    mapping = await map_port(internal_addr, internal_port, **kwargs)
    try:
        yield mapping
    finally:
        with contextlib.suppress(PortMapError, OSError):
            await unmap(mapping, timeout=kwargs.get("timeout", DEFAULT_TIMEOUT))
