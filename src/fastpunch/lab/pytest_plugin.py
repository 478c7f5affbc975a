"""pytest fixtures for tests and benchmarks that need a lab.

Installed as a pytest11 entry point: ``def test_x(lab_factory): lab =
lab_factory(a="nat", b="napt-random")``. Every lab is torn down after the
test, whatever its outcome."""

from __future__ import annotations

import os

import pytest

from fastpunch.lab.topology import Lab


@pytest.fixture
def lab_factory():
    labs: list[Lab] = []

    def make(**kwargs) -> Lab:
        if os.geteuid() != 0:
            pytest.skip("the NAT lab needs root (namespaces, nftables)")
        lab = Lab(**kwargs)
        labs.append(lab)
        return lab.up()

    yield make
    for lab in labs:
        lab.down()
