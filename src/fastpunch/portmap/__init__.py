"""Ask the gateway for an inbound TCP port mapping: PCP, NAT-PMP, UPnP-IGD.

A device behind a home router that runs a port-mapping daemon (miniupnpd
and many consumer routers) can have the router forward one external TCP
port to it; the peer then connects in directly, no punching needed. Three
protocols, tried in this order by :func:`map_port`: PCP (RFC 6887), NAT-PMP
(RFC 6886), UPnP-IGD (SSDP, the root description, SOAP).

Everything the wire carries is encoded and decoded by pure functions
(``pcp_*``, ``natpmp_*``, ``ssdp_*``, ``parse_root_description``,
``soap_*``, ``parse_http_response``, in the modules below), tested byte by
byte without a network; the asyncio transports around them bound every
wait (about 1.5 s per protocol) and every size (a reply, an HTTP head, a
64 KiB XML document). Standard library only.

This module is the public face only. The modules:

* ``client``: :func:`map_port`, :func:`unmap`, :func:`mapped`, the
  protocols asked in order (what works where, the failure codes);
* ``pcp``: PCP MAP requests and replies, and mapping over them;
* ``natpmp``: NAT-PMP address and mapping requests and replies, likewise;
* ``upnp``: SSDP discovery, the root description, SOAP, the control-URL
  cache, and mapping over them;
* ``http``: the HTTP/1.1 request builder and response parser (chunked);
* ``gateway``: the default gateway from ``/proc/net/route``, this host's
  address toward a gateway;
* ``_exchange``: the asyncio UDP exchange (retry schedule, ICMP errors)
  PCP and NAT-PMP share;
* ``_common``: :class:`PortMapError`, :class:`Mapping`, the field checks.
"""

from ._common import Mapping as Mapping
from ._common import PortMapError as PortMapError
from ._exchange import DEFAULT_TIMEOUT as DEFAULT_TIMEOUT
from .client import PROTOCOLS as PROTOCOLS
from .client import map_port as map_port
from .client import mapped as mapped
from .client import unmap as unmap
from .gateway import default_gateway as default_gateway

__all__ = ["PortMapError", "Mapping", "map_port", "unmap", "mapped", "PROTOCOLS",
           "DEFAULT_TIMEOUT", "default_gateway"]
