"""fastpunch.portmap's exported surface (trio-style guard): the package
exports the client API and nothing else; each module's wire-level names
are where callers find them."""

import inspect

from fastpunch import portmap
from fastpunch.portmap import _common, _exchange, client, gateway, http, natpmp, pcp, upnp


def test_package_exports():
    assert sorted(portmap.__all__) == sorted([
        "DEFAULT_TIMEOUT", "Mapping", "PROTOCOLS", "PortMapError", "default_gateway",
        "map_port", "mapped", "unmap"])
    public = {name for name, value in vars(portmap).items()
              if not name.startswith("_") and not inspect.ismodule(value)}
    assert public == set(portmap.__all__)


def test_package_exports_are_the_modules_own():
    assert portmap.PortMapError is _common.PortMapError
    assert portmap.Mapping is _common.Mapping
    assert portmap.DEFAULT_TIMEOUT is _exchange.DEFAULT_TIMEOUT
    assert portmap.PROTOCOLS is client.PROTOCOLS
    assert (portmap.map_port, portmap.unmap, portmap.mapped) == \
        (client.map_port, client.unmap, client.mapped)
    assert portmap.default_gateway is gateway.default_gateway


def test_module_exports():
    expected = {
        client: ["PROTOCOLS", "map_port", "unmap", "mapped"],
        pcp: ["PCP_PORT", "PCP_RESULTS", "PcpMapResponse", "pcp_map_request",
              "pcp_decode_map_response"],
        natpmp: ["NATPMP_PORT", "NATPMP_RESULTS", "NatPmpAddress", "NatPmpMapResponse",
                 "natpmp_address_request", "natpmp_decode_address_response",
                 "natpmp_map_request", "natpmp_decode_map_response"],
        upnp: ["SSDP_ADDR", "IGD_DEVICE", "WANIP_SERVICES", "IgdService", "UPNP_ERRORS",
               "ssdp_msearch", "ssdp_location", "parse_root_description", "soap_envelope",
               "soap_get_external_ip", "soap_add_port_mapping", "soap_delete_port_mapping",
               "parse_soap_response"],
        http: ["HttpResponse", "http_request", "parse_http_response"],
        gateway: ["default_gateway", "parse_proc_net_route"],
    }
    for module, names in expected.items():
        assert sorted(module.__all__) == sorted(names), module.__name__
        for name in names:
            value = getattr(module, name)
            # defined there, not passed through from another module
            assert getattr(value, "__module__", module.__name__) == module.__name__, name


def test_defaults():
    assert portmap.PROTOCOLS == ("pcp", "natpmp", "upnp")
    assert portmap.DEFAULT_TIMEOUT == 1.5

