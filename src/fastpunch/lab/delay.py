"""One-way delay for a lab link, without netem (this kernel lacks sch_netem
and sch_fq): packets are queued to userspace with NFQUEUE and their verdicts
held for the delay. Pure-Python nfnetlink_queue client, no library needed.

The iptables NFQUEUE target is used because nft's ``queue`` statement needs
NFT_QUEUE, which this kernel does not build; it is the one rule the lab does
not write through libnftables. Packets are released in arrival order with a
batch verdict, so the link never reorders. Without this process running, a
queued packet is dropped (no --queue-bypass): a lab that lost its delay shows
it instead of silently measuring a faster path.

The lab runs one per delayed site in its core namespace, on the core's end
of the site's access link (queue number = site index), so packets are held
after their gateway translated them, as on a real link:
    python -m fastpunch.lab.delay --queue 1 --ms 20
"""

from __future__ import annotations

import argparse
import collections
import errno
import os
import select
import signal
import socket
import struct
import sys
import time

NETLINK_NETFILTER = 12
NFNL_SUBSYS_QUEUE = 3
NFQNL_MSG_PACKET, NFQNL_MSG_VERDICT, NFQNL_MSG_CONFIG, NFQNL_MSG_VERDICT_BATCH = 0, 1, 2, 3
NFQA_CFG_CMD, NFQA_CFG_PARAMS, NFQA_CFG_QUEUE_MAXLEN = 1, 2, 3
NFQNL_CFG_CMD_BIND = 1
NFQNL_COPY_META = 1
NFQA_PACKET_HDR, NFQA_VERDICT_HDR = 1, 2
NF_ACCEPT = 1
NLM_F_REQUEST, NLM_F_ACK = 1, 4
NLMSG_ERROR = 2
NLMSG_HDR = struct.Struct("=IHHII")


def _attr(kind: int, payload: bytes) -> bytes:
    head = struct.pack("=HH", 4 + len(payload), kind)
    return head + payload + b"\0" * (-len(payload) % 4)


class NfQueue:
    """A bound nfnetlink_queue socket."""

    def __init__(self, queue: int, maxlen: int = 65536) -> None:
        self.queue = queue
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
        self.sock.bind((0, 0))
        self.seq = 0
        self._request(NFQNL_MSG_CONFIG, _attr(NFQA_CFG_CMD, struct.pack("!BBH", NFQNL_CFG_CMD_BIND, 0, socket.AF_INET)), ack=True)
        self._request(NFQNL_MSG_CONFIG, _attr(NFQA_CFG_PARAMS, struct.pack("!IB", 0, NFQNL_COPY_META)) +
                      _attr(NFQA_CFG_QUEUE_MAXLEN, struct.pack("!I", maxlen)), ack=True)
        self.sock.setblocking(False)

    def _request(self, msg: int, attrs: bytes, ack: bool = False) -> None:
        self.seq += 1
        body = struct.pack("!BBH", socket.AF_UNSPEC, 0, self.queue) + attrs
        flags = NLM_F_REQUEST | (NLM_F_ACK if ack else 0)
        self.sock.send(NLMSG_HDR.pack(NLMSG_HDR.size + len(body), NFNL_SUBSYS_QUEUE << 8 | msg,
                                      flags, self.seq, 0) + body)
        if ack:
            reply = self.sock.recv(65536)
            _, kind, _, _, _ = NLMSG_HDR.unpack_from(reply)
            if kind == NLMSG_ERROR:
                (code,) = struct.unpack_from("=i", reply, NLMSG_HDR.size)
                if code:
                    raise OSError(-code, f"nfqueue config: {os.strerror(-code)}")

    def packet_ids(self) -> list[int]:
        """Ids of every packet waiting in the socket (non-blocking)."""
        ids = []
        while True:
            try:
                data = self.sock.recv(1 << 16)
            except BlockingIOError:
                return ids
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:     # the kernel dropped some: carry on
                    continue
                raise
            off = 0
            while off + NLMSG_HDR.size <= len(data):
                length, kind, _, _, _ = NLMSG_HDR.unpack_from(data, off)
                if length < NLMSG_HDR.size:
                    break
                if kind == (NFNL_SUBSYS_QUEUE << 8 | NFQNL_MSG_PACKET):
                    a = off + NLMSG_HDR.size + 4           # past nfgenmsg
                    end = off + length
                    while a + 4 <= end:
                        alen, akind = struct.unpack_from("=HH", data, a)
                        if alen < 4:
                            break
                        if akind & 0x7FFF == NFQA_PACKET_HDR:
                            ids.append(struct.unpack_from("!I", data, a + 4)[0])
                            break
                        a += (alen + 3) & ~3
                off += (length + 3) & ~3

    def accept_through(self, packet_id: int) -> None:
        """Accept every queued packet with an id up to packet_id (batch verdict)."""
        self._request(NFQNL_MSG_VERDICT_BATCH,
                      _attr(NFQA_VERDICT_HDR, struct.pack("!II", NF_ACCEPT, packet_id)))

    def fileno(self) -> int:
        return self.sock.fileno()


def run(queue: int, delay_s: float) -> None:
    q = NfQueue(queue)
    pending: collections.deque = collections.deque()    # (due, id), in arrival order
    print(f"delaying queue {queue} by {delay_s * 1000:.1f} ms", flush=True)
    while True:
        timeout = max(0.0, pending[0][0] - time.monotonic()) if pending else None
        ready, _, _ = select.select([q], [], [], timeout)
        now = time.monotonic()
        if ready:
            for pid in q.packet_ids():
                pending.append((now + delay_s, pid))
        last = None
        while pending and pending[0][0] <= now:
            last = pending.popleft()[1]
        if last is not None:
            q.accept_through(last)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queue", type=int, required=True)
    parser.add_argument("--ms", type=float, required=True)
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
    try:
        run(args.queue, args.ms / 1000)
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
