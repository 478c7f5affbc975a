"""The CCS's address probes on its relay and probe ports (wire constants,
shared by the server, ``fastpunch.ccs.relay``, and the device,
``fastpunch.netcheck.probes``):

    device -> CCS   "FPW1" pad[32]
    CCS -> device   ipv4[4] port[2]    the address and port this connection came from

    device -> CCS   "FPF1" pad[32]
    CCS -> device   verdict[1]         "O" let in, "R" answered with RST, "D" dropped,
                                       "B" busy (too many probes at once)
"""

WHOAMI = b"FPW1"
FILTERING = b"FPF1"
PAD = 32
VERDICT_BYTES = {b"O": "open", b"R": "rst", b"D": "drop", b"B": "busy"}
