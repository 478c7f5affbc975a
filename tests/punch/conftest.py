"""A lab with a CCS in its core and two enrolled devices, cam (site a) and
viewer (site b), each on an event loop in its site; everything torn down
whatever the outcome."""

from __future__ import annotations

import contextlib

import pytest

from fastpunch.lab import Lab
from tests.conftest import require_root

from .harness import LabCCS


@pytest.fixture
def lab_pair(tmp_path):
    require_root("a punching lab test")

    @contextlib.contextmanager
    def make(a: str, b: str, **lab_kw):
        with Lab(a=a, b=b, **lab_kw) as lab:
            ccs = LabCCS(lab, str(tmp_path))
            try:
                ccs.enroll("cam", "viewer")
                ccs.enroll("viewer")
                cam = ccs.device("a", "cam")
                viewer = ccs.device("b", "viewer")
                for loop, dev in (cam, viewer):       # natcheck's evidence, as on a device
                    loop.run(dev.ready(15))           # that has been up a while
                try:
                    yield lab, ccs, cam, viewer
                finally:
                    for loop, dev in (cam, viewer):
                        loop.run(dev.close())
            finally:
                ccs.close()

    return make


def tables_in(lab, where: str) -> list:
    """fastpunch nftables tables in one lab namespace."""
    out = lab.run(where, ["nft", "list", "tables"]).stdout
    return [line.split()[-1] for line in out.splitlines() if "fastpunch_" in line]


def connect_pair(cam, viewer, strategies=None, timeout: float = 60):
    """cam connects to viewer, viewer accepts: returns both PeerConnections
    (or raises what the connecting side raised)."""
    (la, a), (lb, b) = cam, viewer
    accepting = lb.submit(b.accept(strategies=strategies))
    try:
        ca = la.run(a.connect("viewer", strategies=strategies), timeout)
    except BaseException:
        try:
            accepting.result(timeout)
        except BaseException:
            pass
        raise
    return ca, accepting.result(timeout)
