"""The NAT lab: a small internet in network namespaces with real Linux
netfilter gateways of every kind. See docs/lab.md.

``fastpunch.lab.deploy`` puts a CCS in a lab's core and devices in its
hosts (``LabCCS``, ``LoopThread``); ``fastpunch.lab.matrix`` is the
compatibility matrix (``fastpunch lab matrix``, docs/compatibility.md)."""

from fastpunch.lab.profiles import PROFILES as PROFILES
from fastpunch.lab.topology import CCS_ADDR as CCS_ADDR
from fastpunch.lab.topology import Host as Host
from fastpunch.lab.topology import RELAY_ADDR as RELAY_ADDR
from fastpunch.lab.topology import Lab as Lab
from fastpunch.lab.topology import LabError as LabError
from fastpunch.lab.topology import Site as Site
from fastpunch.lab.topology import sweep_stale as sweep_stale

PROFILE_NAMES = tuple(sorted(PROFILES)) + ("cgn",)

__all__ = ["CCS_ADDR", "Host", "Lab", "LabError", "PROFILES", "PROFILE_NAMES", "RELAY_ADDR",
           "Site", "sweep_stale"]
