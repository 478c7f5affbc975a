"""The raw handshake shared by the crafted strategies: RST suppression scoped
to the flow, the engine's RawFlow, the ISN check, and the TCP_REPAIR hand-off."""

from __future__ import annotations

import logging
import select
import threading
import time

from fastpunch import _caps, netfilter
from fastpunch.handoff import repair_socket
from fastpunch.punch.base import Attempt, PunchContext, PunchFailed, sleep_until
from fastpunch._engine import FlowEvent, FlowState
from fastpunch.rawflow import HandshakeFailed, RawFlow


# The first SYN of an active open (the opener) dies one hop past our own NAT:
# it opens our mapping without reaching the far gateway, which might answer
# it with a RST that closes the mapping again (LAB-NOTES 1). It is not only
# about RSTs: without it the two full SYNs race each side's own mapping, and
# one is dropped whenever a SYN beats the far side's own (131 ms median
# instead of 124, measured in the lab before its delay moved past NAT).
#
# When the full SYN follows: the opener leaves FIRST_GAP before the common
# start (or as soon as the flow is set up). Toward a peer whose gateway never
# answers an unsolicited SYN with a RST (NEVER_RESETS), the full SYN leaves at the start, at least
# MIN_GAP after the opener: a SYN that arrives before the far side's opener
# is only dropped (or let in), and the peer's own SYN completes the handshake. Measured
# in the 20 ms lab (delay on the access links): 83 ms from the start against
# kernel simultaneous open's 81 (one peer round trip); a full SYN FIRST_GAP
# after the opener took 101-113. Toward a gateway that may answer with a RST
# (nat-rst, or not known) the full SYN keeps the whole FIRST_GAP after the
# opener: that gap absorbs the two sides' start skew, and a RST'd SYN costs
# far more: a restart (RawFlow.connect reopens our mapping at once, since
# the RST closed it; before it did, a zero-delay nat-rst pair with a 2 ms gap
# went to the relay in 1 trial of 3).
FIRST_TTL = 2
FIRST_GAP = 0.03
MIN_GAP = 0.002
# a peer behind these comes from another port after a RST made it start over
PORT_TRANSLATING = {"napt-sequential", "napt-random"}
NEVER_RESETS = {"open", "firewall", "firewall-liberal", "nat", "strict", "cgn", "upnp",
                 "napt-sequential", "napt-random"}


log = logging.getLogger("fastpunch.punch")


def require_privileges() -> None:
    """Raw sockets (CAP_NET_RAW), nftables and TCP_REPAIR (CAP_NET_ADMIN)."""
    _caps.require("crafted handshake and kernel hand-off", _caps.CAP_NET_RAW, _caps.CAP_NET_ADMIN)


def handshake(ctx: PunchContext, deadline: float, attempt: Attempt, *, active: bool,
              resend: float, peer_ports=None, start: float = 0.0):
    """Set everything up (sockets, the nftables table), then wait for
    ``start`` so the first SYN leaves on time, and run the handshake."""
    require_privileges()
    if peer_ports is not None and len(peer_ports) > 1:
        return _handshake_many(ctx, deadline, attempt, list(peer_ports), resend, start)
    netfilter.sweep_stale()        # tables of crashed fastpunch processes, in this namespace
    # The table before the receive socket: a peer SYN that came before the
    # table was answered with a RST by our kernel, and the peer starts over
    # (from another port, behind a port-translating NAT), so that SYN must
    # not complete the open. In this order the engine never sees one (seen
    # in the matrix: an `open` side whose setup ran late completed on such a
    # SYN, 1 trial in 10).
    guard = netfilter.suppress_rsts(
        [netfilter.RstSuppression(ctx.local_port, ctx.peer_ip, ctx.peer_port)])
    with guard:
        flow = RawFlow(ctx.local_ip, ctx.local_port, ctx.peer_ip, ctx.peer_port, iss=ctx.iss,
                       mss=ctx.mss, wscale=ctx.wscale, sack_permitted=ctx.sack_permitted,
                       timestamps=ctx.timestamps, peer_isn=ctx.peer_isn)
        confirming = False
        try:
            # the opener leaves FIRST_GAP ahead, the full SYN at the start
            sleep_until(start - FIRST_GAP if active else start)
            timeout = deadline - time.time()
            if timeout <= 0:
                raise PunchFailed("no-time", "the strategy's time slot had passed")
            try:
                if active:
                    gap = FIRST_GAP
                    if ctx.peer_nat in NEVER_RESETS:
                        gap = max(MIN_GAP, start - time.time())
                    flow.connect(timeout=timeout, resend_every=resend, survive_rst=True,
                                 first_ttl=FIRST_TTL, first_gap=gap,
                                 early=ctx.peer_nat not in PORT_TRANSLATING)
                else:
                    from fastpunch._engine import TCPOptions

                    flow.answer_assumed(ctx.peer_isn, TCPOptions(
                        mss=ctx.peer_mss, wscale=ctx.peer_wscale,
                        sack_permitted=ctx.peer_sack_permitted,
                        timestamp=(0, 0) if ctx.peer_timestamps else None),
                        timeout=timeout, resend_every=resend)
            except HandshakeFailed as exc:
                reason = "reset" if "reset" in str(exc) else "timeout"
                raise PunchFailed(reason, str(exc)) from None
            sock = repair_socket(flow.handoff_state(), late=flow.late_data)
            confirming = _confirm_in_background(flow, deadline, resend, attempt)
            return sock
        finally:
            attempt.sent, attempt.seen = flow.stats.sent, flow.stats.received
            attempt.events = flow.stats.events if confirming else list(flow.stats.events)
            if not confirming:
                flow.close()


def _confirm_in_background(flow: RawFlow, deadline: float, resend: float,
                           attempt: Attempt) -> bool:
    """A flow completed on the peer's SYN alone was handed off before the
    peer had shown it got ours: watch for that until the slot ends (after
    it, the peer has moved on anyway), resending our SYN (RawFlow.confirm),
    then close the raw sockets. The caller has the kernel socket already.
    Returns whether the flow is now this thread's to close."""
    if flow.tracker.state == FlowState.ESTABLISHED:
        return False                       # the peer's SYN-ACK came: nothing to confirm

    def body() -> None:
        try:
            if not flow.confirm(max(0.5, deadline - time.time()), resend):
                attempt.detail = "handed off on the peer's SYN; the peer never confirmed"
                log.warning("%s:%d never confirmed the flow handed off on its SYN",
                            flow.peer[0], flow.peer[1])
        except Exception:                  # a fault here must not outlive the thread
            log.exception("confirming the flow with %s:%d", flow.peer[0], flow.peer[1])
        finally:
            flow.close()

    threading.Thread(target=body, name=f"fastpunch-confirm-{flow.local[1]}",
                     daemon=True).start()
    return True


def _handshake_many(ctx: PunchContext, deadline: float, attempt: Attempt, ports: list,
                    resend: float, start: float = 0.0):
    """Simultaneous open toward several candidate peer ports at once, one
    crafted flow each (same local port and ISN); the first to complete wins."""
    netfilter.sweep_stale()
    flows = []
    # the table before the receive sockets, as in handshake(); and the open
    # completes on the peer's SYN-ACK, not its SYN: a peer behind a
    # sequential NAPT that starts over after a RST comes from the next port,
    # and only its answer shows which candidate is current
    guard = netfilter.suppress_rsts(
        [netfilter.RstSuppression(ctx.local_port, ctx.peer_ip, p) for p in ports])
    try:
        with guard:
            for port in ports:
                flows.append(RawFlow(ctx.local_ip, ctx.local_port, ctx.peer_ip, port,
                                     iss=ctx.iss, mss=ctx.mss, wscale=ctx.wscale,
                                     sack_permitted=ctx.sack_permitted,
                                     timestamps=ctx.timestamps, peer_isn=ctx.peer_isn))
            sleep_until(start)
            for f in flows:
                f._send(f.tracker.syn_sent())
                f._note("sent SYN")
            next_resend = time.time() + resend
            while True:
                now = time.time()
                if now >= deadline:
                    raise PunchFailed("timeout", f"no candidate of {ports[0]}..{ports[-1]} "
                                                 f"answered before the slot ended")
                if now >= next_resend:
                    for f in flows:
                        if f.tracker.state == FlowState.SYN_SENT:
                            f.resend_syn()
                    next_resend = now + resend
                ready, _, _ = select.select([f.rx for f in flows], [], [],
                                            max(0.0, min(deadline, next_resend) - now))
                for f in flows:
                    if f.rx not in ready:
                        continue
                    for event in f.pump():
                        if event == FlowEvent.RESET:
                            f.restart()
                    if f.tracker.state == FlowState.ESTABLISHED:
                        attempt.detail = f"peer port {f.peer[1]} (announced {ports[0]})"
                        return repair_socket(f.handoff_state(), late=f.late_data)
    finally:
        attempt.sent = sum(f.stats.sent for f in flows)
        attempt.seen = sum(f.stats.received for f in flows)
        attempt.events = sorted(e for f in flows for e in f.stats.events)[:200]
        for f in flows:
            f.close()
