"""What gathering reads of the host's interfaces, in a fresh namespace."""

import pytest

from fastpunch._netns import inside
from fastpunch.netcheck.interfaces import interfaces, prefix_of

pytestmark = pytest.mark.live


def test_an_up_interface_is_listed_with_its_address_and_prefix(veth):
    with inside(veth.ns_a):
        found = interfaces()
    assert [(i.name, i.addr, i.prefix) for i in found] == [(veth.if_a, veth.addr_a, 24)]


def test_a_non_contiguous_netmask_gives_no_prefix_instead_of_an_error():
    assert prefix_of("255.255.255.0") == 24 and prefix_of("255.255.0.0") == 16
    assert prefix_of("255.0.255.0") == 0
