"""The CCS's address probes on its relay and probe ports (wire constants,
shared by the server, ``fastpunch.ccs.relay``, and the device,
``fastpunch.netcheck.probes``):

    device -> CCS   "FPW1" token[16] pad[16]
    CCS -> device   addr[4|16] port[2] the address and port this connection came from:
                                       4 bytes over IPv4, 16 over IPv6

``token`` is zeros, or the probe token the CCS gave the device at login
(AuthOk, protocol 5): the CCS then records the address as one of that
device's, in this connection's family (the IPv6 address of a device that
logged in over IPv4, say), and checks candidates of that family against it.

    device -> CCS   "FPF1" pad[32]
    CCS -> device   verdict[1]         "O" let in, "R" answered with RST, "D" dropped,
                                       "B" busy (too many probes at once)
"""

import ipaddress

WHOAMI = b"FPW1"
FILTERING = b"FPF1"
PAD = 32
TOKEN = 16                           # the probe token's bytes at the front of the pad


def reply_of(ip: str, port: int) -> bytes:
    """The CCS's answer to a "who am I" from ``ip``:``port`` (unmapped)."""
    return ipaddress.ip_address(ip).packed + port.to_bytes(2, "big")


def parse_reply(data: bytes) -> tuple:
    """(address, port) of an answer of 6 (IPv4) or 18 (IPv6) bytes."""
    if len(data) not in (6, 18):
        raise ValueError(f"a who-am-I answer of {len(data)} bytes")
    return str(ipaddress.ip_address(data[:-2])), int.from_bytes(data[-2:], "big")
VERDICT_BYTES = {b"O": "open", b"R": "rst", b"D": "drop", b"B": "busy"}
