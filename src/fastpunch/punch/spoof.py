"""``spoof``: for stateful firewalls without NAT. Every segment we send the
peer carries the CCS's address as its source, so the peer's firewall takes
it for traffic from the CCS that the peer itself opened.

How, for our side (the peer does the mirror image):

1. A SYN with TTL 2 from our real address and port to the CCS's address at
   the *peer's* port. It opens a conntrack entry in our firewall whose reply
   direction is ``CCS:peer_port -> us:our_port``, and dies one hop later
   (or, where the CCS sits within two hops, as in the lab, the CCS drops the
   RST its kernel would answer with: see ``CCSServer`` and docs/punch.md).
2. A stateless host rewrite (``netfilter.spoof_rewrite``): our segments to
   the peer leave with source ``CCS:our_port``; the peer's, arriving as
   ``CCS:peer_port``, get the peer's address back before the raw receiver
   and the TCP stack see them.
3. The ``symmetric`` handshake over that, then the kernel hand-off; the
   rewrite table lives as long as the socket.
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
firewalls whose conntrack entries expire before traffic refreshes them
(the entry stays in SYN_RECV, 60 s on Linux). Where it works, ``symmetric``
also does, and faster; the planner tries ``symmetric`` first.
"""

from __future__ import annotations

import socket
import struct
import time

from fastpunch import netfilter
from fastpunch._engine import Reply
from fastpunch.handoff import repair_socket
from fastpunch.punch.base import Attempt, PunchContext, PunchFailed, sleep_until, tie
from fastpunch.punch.rawsession import FIRST_GAP, FIRST_TTL, require_privileges
from fastpunch.rawflow import HandshakeFailed, RawFlow

NAME = "spoof"
RESEND = 0.2
# initiator sends X, responder answers Y, initiator Z, responder W
CHECK_WITHIN = 1.5          # seconds for the four messages (TCP resends a lost one in 0.2-0.6 s)
CHECK = (b"fastpunch spoof X", b"fastpunch spoof Y", b"fastpunch spoof Z", b"fastpunch spoof W")


def run(ctx: PunchContext, deadline: float, attempt: Attempt, start: float = 0.0):
    require_privileges()
    if not ctx.ccs_ip:
        raise PunchFailed("no-ccs-address", "spoof needs the CCS's address")
    netfilter.sweep_stale()
    flow = _SpoofFlow((ctx.ccs_ip, ctx.peer_port), ctx.local_ip, ctx.local_port, ctx.peer_ip,
                      ctx.peer_port, iss=ctx.iss, mss=ctx.mss, wscale=ctx.wscale,
                      sack_permitted=ctx.sack_permitted, timestamps=ctx.timestamps,
                      peer_isn=ctx.peer_isn)
    rewrite = netfilter.spoof_rewrite(ctx.local_port, ctx.peer_ip, ctx.peer_port, ctx.ccs_ip)
    sock = None
    try:
        with flow.rst_suppression():
            rewrite.apply()
            sleep_until(start - FIRST_GAP)        # the full SYN leaves at the start
            timeout = deadline - time.time()
            if timeout <= 0:
                raise PunchFailed("no-time", "the strategy's time slot had passed")
            try:
                flow.connect(timeout=timeout, resend_every=RESEND, survive_rst=True,
                             first_ttl=FIRST_TTL, first_gap=FIRST_GAP,
                             first_to=(ctx.ccs_ip, ctx.peer_port))
            except HandshakeFailed as exc:
                reason = "reset" if "reset" in str(exc) else "timeout"
                raise PunchFailed(reason, str(exc)) from None
            _settle_own_firewall(flow)
            sock = repair_socket(flow.handoff_state(), late=flow.late_data)
        _check_both_ways(sock, ctx.role == "initiator", deadline, flow._note)
        # the rewrite lives as long as the connection
        tie(sock, rewrite.remove)
        attempt.detail = f"rewrite table {rewrite.table.name}"
        return sock
    except BaseException:
        if sock is not None:
            # abort (RST, no FIN_WAIT): the port is the next strategy's
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()
        rewrite.remove()
        raise
    finally:
        attempt.sent, attempt.seen = flow.stats.sent, flow.stats.received
        attempt.events = list(flow.stats.events)
        flow.close()


class _SpoofFlow(RawFlow):
    """A RawFlow whose every SYN-ACK to the peer also goes the short way
    toward the CCS (``opener``). When the peer's SYN reached us first, our
    firewall's entry is in SYN_SENT2, where Linux conntrack takes the peer's
    ACK for INVALID; our own SYN-ACK in the original direction moves it to
    SYN_RECV, where that ACK is fine (seen in the matrix: 1 trial in 10
    deadlocked without it)."""

    def __init__(self, opener: tuple, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.opener = opener

    def _send(self, r, payload: bytes = b"", ttl: int = 64, to=None) -> None:
        super()._send(r, payload, ttl, to)
        if to is None and r.flags & 0x12 == 0x12:
            super()._send(r, b"", FIRST_TTL, self.opener)


def _settle_own_firewall(flow: _SpoofFlow) -> None:
    """Our firewall's entry for the flow saw our SYN and, in reply, the
    peer's SYN or SYN-ACK: SYN_SENT2 or SYN_RECV. From there Linux conntrack
    takes a FIN in the reply direction for INVALID (the flow could not
    close) and drops the entry after 60 s of quiet. A SYN-ACK and an ACK
    from us, on the same short-lived path as the first SYN, complete its
    handshake: ESTABLISHED whichever of the two states it was in."""
    ack, opener = flow.tracker.ack(), flow.opener
    flow._send(Reply(0x12, flow.iss, ack.ack, ack.window), ttl=FIRST_TTL, to=opener)
    flow._send(ack, ttl=FIRST_TTL, to=opener)
    flow._note(f"sent SYN-ACK and ACK to {opener[0]}:{opener[1]} with TTL {FIRST_TTL} "
               "(settle our firewall's entry)")


def _check_both_ways(sock: socket.socket, initiator: bool, deadline: float, note) -> None:
    """X, Y, Z, W alternately; the initiator's verdict rests on W, the
    responder's on Z (after which W passes a firewall Y already passed)."""
    mine = (0, 2) if initiator else (1, 3)
    deadline = min(deadline, time.time() + CHECK_WITHIN)
    dropped = ("data-dropped", "a firewall on the path drops data on the spoofed flow "
                               "(strict TCP window tracking?)")
    for i, message in enumerate(CHECK):
        if i in mine:
            sock.sendall(message)
            continue
        got = b""
        while len(got) < len(message):
            left = deadline - time.time()
            if left <= 0:
                raise PunchFailed(dropped[0], f"check message {i + 1} of 4 did not arrive: "
                                              + dropped[1])
            sock.settimeout(left)
            try:
                chunk = sock.recv(len(message) - len(got))
            except socket.timeout:
                continue
            except ConnectionResetError:        # the peer's check failed first
                raise PunchFailed(dropped[0], f"the peer gave up before check message "
                                              f"{i + 1} of 4: " + dropped[1]) from None
            if not chunk:
                raise PunchFailed("closed", "the peer closed the flow during the check")
            got += chunk
        if got != message:
            raise PunchFailed("not-our-peer", f"unexpected check message {got!r}")
        note(f"check message {i + 1} of 4 arrived")
    sock.settimeout(None)
