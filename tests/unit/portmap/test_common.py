"""fastpunch.portmap's PortMapError and Mapping."""

from __future__ import annotations

import pytest

from fastpunch import portmap as pm
from fastpunch.errors import FastpunchError
from fastpunch.portmap import PortMapError

from .helpers import NONCE


def test_port_map_error_is_a_fastpunch_error():
    err = PortMapError("timeout", "nothing")
    assert isinstance(err, FastpunchError) and isinstance(err, Exception)
    assert err.code == "timeout" and err.result is None and err.failures == {}


def test_mapping_is_frozen():
    m = pm.Mapping("pcp", "10.1.0.1", "10.1.0.2", 1, "203.0.113.10", 1, 120, nonce=NONCE)
    with pytest.raises(AttributeError):
        m.external_port = 2             # type: ignore[misc]
    assert "nonce" not in repr(m)
