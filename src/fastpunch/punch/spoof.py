"""``spoof``: for stateful firewalls without NAT. Every segment we send the
peer carries the CCS's address as its source, so the peer's firewall takes
it for traffic from the CCS that the peer itself opened.

How, for our side (the peer does the mirror image):

1. A SYN with TTL 2 from our real address and port to the CCS's address at
   the *peer's* port (the machine's opener). It opens a conntrack entry in
   our firewall whose reply direction is ``CCS:peer_port -> us:our_port``,
   and dies one hop later (or, where the CCS sits within two hops, as in
   the lab, the CCS drops the RST its kernel would answer with: see
   ``CCSServer`` and docs/punch.md).
2. A stateless host rewrite (``netfilter.spoof_rewrite``): our segments to
   the peer leave with source ``CCS:our_port``; the peer's, arriving as
   ``CCS:peer_port``, get the peer's address back before the raw receiver
   and the TCP stack see them.
3. A simultaneous open over that (the punch machine, one flow), every
   SYN-ACK also mirrored the short way to our firewall (an entry that saw
   the peer's SYN first, SYN_SENT2, would take the peer's ACK for INVALID),
   then a SYN-ACK and ACK the same way to settle our entry (``settle``),
   and the kernel hand-off; the rewrite table lives as long as the socket.
4. A four-message check on the handed-off socket (X, Y, Z, W) proves data
   passes both firewalls both ways, and both sides reach the same verdict:
   our firewall's entry has seen nothing from us since the first SYN, so a
   firewall that tracks TCP windows strictly (``nf_conntrack_tcp_be_liberal
   =0``, Linux's default) drops the peer's segments as soon as they
   acknowledge our data. The handshake passes such a firewall; data does
   not. The check turns that into a clean failure, and the plan falls
   through.

Where it cannot work: strict window tracking (above); senders behind egress
filtering (BCP 38) that drops spoofed sources, which is most real networks;
any NAT (the peer's reply direction is its own address, not ours). Where it
works, ``symmetric`` also does, and faster: plans put spoof after it, in a
slot of its own (its rewrite changes every segment of the 4-tuple).
"""

from __future__ import annotations

import asyncio
import socket
import time
from typing import Optional

from fastpunch import netfilter
from fastpunch.netcheck.route import mss_toward
from fastpunch.proto.punch import PairPlan
from fastpunch.punch.base import Attempt, PunchContext, PunchFailed, abort, tie
from fastpunch.punch.driver import Race, require_privileges
from fastpunch.punch.strategy import FIRST_GAP, FIRST_TTL, Slot, Strategy

CHECK_WITHIN = 1.5          # seconds for the four messages (TCP resends a lost one in 0.2-0.6 s)
# initiator sends X, responder answers Y, initiator Z, responder W
CHECK = (b"fastpunch spoof X", b"fastpunch spoof Y", b"fastpunch spoof Z", b"fastpunch spoof W")


class Spoof(Strategy):
    name = "spoof"
    budget = 3.0
    crafted = True

    async def run(self, ctx: PunchContext, slot: Slot, attempt: Attempt,
                  cancel: Optional[asyncio.Event] = None) -> socket.socket:
        require_privileges()
        if not ctx.ccs_ip:
            raise PunchFailed("no-ccs-address", "spoof needs the CCS's address")
        opener = (ctx.ccs_ip, ctx.peer_port)
        race = Race(ctx, slot.end, attempt, nominator=ctx.initiator, cancel=cancel,
                    confirm=False)
        race.add([PairPlan((ctx.local_ip, ctx.local_port), (ctx.peer_ip, ctx.peer_port),
                           self.name, "spoofed", 0, start=slot.start + FIRST_GAP,
                           opener_ttl=FIRST_TTL, opener_lead=FIRST_GAP, opener_to=opener,
                           mirror_to=opener, mss=mss_toward(ctx.peer_ip))])
        race.on_complete = lambda m: m.settle(opener, FIRST_TTL, time.time())
        rewrite = netfilter.spoof_rewrite(ctx.local_port, ctx.peer_ip, ctx.peer_port,
                                          ctx.ccs_ip)
        sock = None
        try:
            rewrite.apply()
            sock = await race.run()
            await _check_both_ways(sock, ctx.initiator, slot.end, attempt)
            tie(sock, rewrite.remove)          # the rewrite lives as long as the connection
            attempt.detail = f"rewrite table {rewrite.table.name}"
            return sock
        except BaseException:
            if sock is not None:
                abort(sock)                    # RST, no FIN_WAIT: the port is the next slot's
            rewrite.remove()
            raise


async def _check_both_ways(sock: socket.socket, initiator: bool, deadline: float,
                           attempt: Attempt) -> None:
    """X, Y, Z, W alternately; the initiator's verdict rests on W, the
    responder's on Z (after which W passes a firewall Y already passed)."""
    loop = asyncio.get_running_loop()
    mine = (0, 2) if initiator else (1, 3)
    deadline = min(deadline, time.time() + CHECK_WITHIN)
    dropped = ("data-dropped", "a firewall on the path drops data on the spoofed flow "
                               "(strict TCP window tracking?)")
    sock.setblocking(False)
    t0 = time.time()
    for i, message in enumerate(CHECK):
        if i in mine:
            await loop.sock_sendall(sock, message)
            continue
        got = b""
        while len(got) < len(message):
            left = deadline - time.time()
            if left <= 0:
                raise PunchFailed(dropped[0], f"check message {i + 1} of 4 did not arrive: "
                                              + dropped[1])
            try:
                chunk = await asyncio.wait_for(loop.sock_recv(sock, len(message) - len(got)),
                                               left)
            except asyncio.TimeoutError:
                continue
            except ConnectionResetError:        # the peer's check failed first
                raise PunchFailed(dropped[0], f"the peer gave up before check message "
                                              f"{i + 1} of 4: " + dropped[1]) from None
            if not chunk:
                raise PunchFailed("closed", "the peer closed the flow during the check")
            got += chunk
        if got != message:
            raise PunchFailed("not-our-peer", f"unexpected check message {got!r}")
        attempt.events.append((round(time.time() - t0, 4), f"check message {i + 1} of 4 arrived"))
    sock.setblocking(True)


STRATEGY = Spoof()
