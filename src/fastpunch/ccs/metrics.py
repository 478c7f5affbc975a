"""Prometheus text exposition of a CCS node, served over plain HTTP.

    GET /metrics  ->  text/plain; version=0.0.4

No client library: the format is a few lines of text. Bind it to an
address only the monitoring system reaches (it reveals fleet size).
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fastpunch.ccs.server import CCSServer


def render(server: "CCSServer") -> str:
    from fastpunch.ccs.server import LATENCY_BUCKETS

    m, relay = server.metrics, server.relay
    node = f'node="{server.node}"'
    out = [
        "# HELP fastpunch_ccs_connected_devices Authenticated devices connected to this node.",
        "# TYPE fastpunch_ccs_connected_devices gauge",
        f"fastpunch_ccs_connected_devices{{{node}}} {server.connected}",
        "# HELP fastpunch_ccs_auth_failures_total Connections that failed device authentication.",
        "# TYPE fastpunch_ccs_auth_failures_total counter",
        f"fastpunch_ccs_auth_failures_total{{{node}}} {m.auth_failures}",
        "# HELP fastpunch_ccs_protocol_errors_total Connections closed for protocol violations.",
        "# TYPE fastpunch_ccs_protocol_errors_total counter",
        f"fastpunch_ccs_protocol_errors_total{{{node}}} {m.protocol_errors}",
        "# HELP fastpunch_ccs_rendezvous_total Rendezvous by result.",
        "# TYPE fastpunch_ccs_rendezvous_total counter",
        f'fastpunch_ccs_rendezvous_total{{{node},result="ok"}} {m.rendezvous_ok}',
    ]
    for code, count in sorted(m.rendezvous_refused.items()):
        out.append(f'fastpunch_ccs_rendezvous_total{{{node},result="{code}"}} {count}')
    out += [
        "# HELP fastpunch_ccs_rendezvous_seconds Time from a request to both sides' info sent.",
        "# TYPE fastpunch_ccs_rendezvous_seconds histogram",
    ]
    for bound, count in zip(LATENCY_BUCKETS, m.latency_buckets):
        out.append(f'fastpunch_ccs_rendezvous_seconds_bucket{{{node},le="{bound}"}} {count}')
    out += [
        f'fastpunch_ccs_rendezvous_seconds_bucket{{{node},le="+Inf"}} {m.rendezvous_ok}',
        f"fastpunch_ccs_rendezvous_seconds_sum{{{node}}} {m.latency_sum:.6f}",
        f"fastpunch_ccs_rendezvous_seconds_count{{{node}}} {m.rendezvous_ok}",
        "# HELP fastpunch_ccs_relay_bytes_total Bytes moved by the relay (both directions).",
        "# TYPE fastpunch_ccs_relay_bytes_total counter",
        f"fastpunch_ccs_relay_bytes_total{{{node}}} {relay.bytes_total}",
        "# HELP fastpunch_ccs_relays_active Relays joined and running.",
        "# TYPE fastpunch_ccs_relays_active gauge",
        f"fastpunch_ccs_relays_active{{{node}}} {len(relay.pairs)}",
        "# HELP fastpunch_ccs_relays_total Relays joined since start.",
        "# TYPE fastpunch_ccs_relays_total counter",
        f"fastpunch_ccs_relays_total{{{node}}} {relay.relays_total}",
    ]
    return "\n".join(out) + "\n"


async def serve(server: "CCSServer", host: str, port: int) -> asyncio.AbstractServer:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            parts = head.split(b"\r\n", 1)[0].split()
            if len(parts) >= 2 and parts[0] == b"GET" and parts[1].split(b"?")[0] == b"/metrics":
                body, status = render(server).encode(), b"200 OK"
                ctype = b"text/plain; version=0.0.4; charset=utf-8"
            else:
                body, status, ctype = b"see /metrics\n", b"404 Not Found", b"text/plain"
            writer.write(b"HTTP/1.1 " + status + b"\r\nContent-Type: " + ctype +
                         b"\r\nContent-Length: " + str(len(body)).encode() +
                         b"\r\nConnection: close\r\n\r\n" + body)
            await writer.drain()
        except (asyncio.TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                ConnectionError):
            pass
        finally:
            writer.close()

    return await asyncio.start_server(handle, host, port)
