"""What the network around this device is: its interfaces and routes, what
its gateway does (natcheck, with the CCS's probes), and the candidates of
the next punch port. Tailscale's ``net/netcheck`` is the model: one typed
report, gathered at login and in the background, an input to the punch,
never the plan by itself.

Modules: ``interfaces`` (host addresses), ``route`` (source address, path
MTU and the MSS to announce), ``probes`` (the CCS's whoami and filtering
probes), ``natcheck`` (the NAT report), ``gather`` (candidates).
"""

from fastpunch.netcheck.gather import Gathered as Gathered
from fastpunch.netcheck.gather import gather as gather
from fastpunch.netcheck.natcheck import NatReport as NatReport
from fastpunch.netcheck.natcheck import Probe as Probe
from fastpunch.netcheck.natcheck import classify as classify
from fastpunch.netcheck.natcheck import natcheck as natcheck

__all__ = ["Gathered", "NatReport", "Probe", "classify", "gather", "natcheck"]
