"""A CCS node's metrics, health and readiness, over plain HTTP.

    GET /metrics  ->  Prometheus exposition (text, or OpenMetrics if the
                      scraper's Accept asks for it): the server's counters
                      plus the process and platform collectors
    GET /healthz  ->  200 while the event loop serves (this answer is proof)
    GET /readyz   ->  200 when the device listener is up, the registry
                      answers and the key store reads; else 503. Either way
                      a JSON body: {"ready", "node", "checks": {name: "ok" | why}}

The exposition is prometheus_client's (label values escaped by it) from a
private CollectorRegistry, so nothing registered globally in the process
leaks in and two servers in one process do not collide. Without
prometheus_client, /metrics answers 503 saying so; health and readiness
still answer. Bind this to an address only the monitoring system reaches
(it reveals fleet size).
"""

from __future__ import annotations

import asyncio
import json
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    from fastpunch.ccs.server import CCSServer

READY_TIMEOUT = 2.0      # seconds for the registry's answer to a readiness probe
MISSING = ("prometheus_client is not installed (pip install 'fastpunch[ccs]'): no metrics; "
           "/healthz and /readyz still answer")


class CCSCollector:
    """The server's own counters (its Metrics, its relay), read at each scrape."""

    def __init__(self, server: "CCSServer") -> None:
        self.server = server

    def collect(self):
        from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily,
                                            HistogramMetricFamily)

        from fastpunch.ccs.server import LATENCY_BUCKETS

        server = self.server
        m, relay, node = server.metrics, server.relay, [server.node]

        def one(family, value):
            family.add_metric(node, value)
            return family

        yield one(GaugeMetricFamily("fastpunch_ccs_connected_devices",
                                    "Authenticated devices connected to this node.",
                                    labels=["node"]), server.connected)
        yield one(CounterMetricFamily("fastpunch_ccs_auth_failures_total",
                                      "Connections that failed device authentication.",
                                      labels=["node"]), m.auth_failures)
        yield one(CounterMetricFamily("fastpunch_ccs_protocol_errors_total",
                                      "Connections closed for protocol violations.",
                                      labels=["node"]), m.protocol_errors)
        rendezvous = CounterMetricFamily("fastpunch_ccs_rendezvous_total", "Rendezvous by result.",
                                         labels=["node", "result"])
        rendezvous.add_metric(node + ["ok"], m.rendezvous_ok)
        for code, count in sorted(m.rendezvous_refused.items()):
            rendezvous.add_metric(node + [code], count)
        yield rendezvous
        latency = HistogramMetricFamily("fastpunch_ccs_rendezvous_seconds",
                                        "Time from a request to both sides' info sent.",
                                        labels=["node"])
        buckets = [(str(bound), count) for bound, count in zip(LATENCY_BUCKETS, m.latency_buckets)]
        latency.add_metric(node, buckets + [("+Inf", m.rendezvous_ok)], m.latency_sum)
        yield latency
        yield one(CounterMetricFamily("fastpunch_ccs_relay_bytes_total",
                                      "Bytes moved by the relay (both directions).",
                                      labels=["node"]), relay.bytes_total)
        yield one(GaugeMetricFamily("fastpunch_ccs_relays_active", "Relays joined and running.",
                                    labels=["node"]), len(relay.pairs))
        yield one(CounterMetricFamily("fastpunch_ccs_relays_total", "Relays joined since start.",
                                      labels=["node"]), relay.relays_total)


def registry_for(server: "CCSServer"):
    """A private CollectorRegistry: the server's counters, the process's
    (CPU, memory, open files) and the platform's (Python version).
    Raises ImportError without prometheus_client."""
    from prometheus_client import CollectorRegistry, PlatformCollector, ProcessCollector

    registry = CollectorRegistry(auto_describe=False)
    registry.register(CCSCollector(server))
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    return registry


def render(server: "CCSServer") -> str:
    """The text exposition, once (for a script or a test)."""
    from prometheus_client import generate_latest

    return generate_latest(registry_for(server)).decode()


def _listening(server: "CCSServer") -> Optional[str]:
    """None if the device listener accepts, else why not."""
    return None if server.serving else "not listening: the listener is closed or its accept loop stopped"


def _keystore_reads(store) -> None:
    """One real read, and one key opened (a sealed store's master key is
    checked with it)."""
    row = store.db.execute("SELECT name FROM devices LIMIT 1").fetchone()
    if row is not None:
        store.key_for(row[0])


async def readiness(server: "CCSServer") -> tuple:
    """(ready, {check: "ok" or why not})."""
    checks = {}
    checks["listener"] = _listening(server) or "ok"
    try:
        await asyncio.wait_for(server.registry.ping(), READY_TIMEOUT)
        checks["registry"] = "ok"
    except asyncio.TimeoutError:
        checks["registry"] = f"no answer within {READY_TIMEOUT:g} s"
    except Exception as exc:                # whatever the backend raised, said as it said it
        checks["registry"] = str(exc) or type(exc).__name__
    try:
        _keystore_reads(server.keystore)
        checks["keystore"] = "ok"
    except Exception as exc:                # sqlite3.Error, KeyStoreError, ...
        checks["keystore"] = f"{type(exc).__name__}: {exc}"
    return all(v == "ok" for v in checks.values()), checks


def _response(status: str, ctype: str, body: bytes, head_only: bool) -> bytes:
    return (b"HTTP/1.1 " + status.encode() + b"\r\nContent-Type: " + ctype.encode() +
            b"\r\nContent-Length: " + str(len(body)).encode() +
            b"\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n" +
            (b"" if head_only else body))


async def serve(server: "CCSServer", host: str, port: int) -> asyncio.AbstractServer:
    from fastpunch.ccs.events import event

    try:
        from prometheus_client.exposition import choose_encoder

        registry, missing = registry_for(server), None
    except ImportError as exc:
        registry, missing = None, f"{MISSING} ({exc})"
        event("metrics-unavailable", reason=missing)

    async def answer(method: bytes, path: bytes, headers: dict) -> bytes:
        head_only = method == b"HEAD"
        if method not in (b"GET", b"HEAD"):
            return _response("405 Method Not Allowed", "text/plain", b"GET only\n", False)
        if path == b"/healthz":
            return _response("200 OK", "text/plain", b"ok\n", head_only)
        if path == b"/readyz":
            ready, checks = await readiness(server)
            body = json.dumps({"ready": ready, "node": server.node, "checks": checks}).encode()
            return _response("200 OK" if ready else "503 Service Unavailable",
                             "application/json", body + b"\n", head_only)
        if path == b"/metrics":
            if registry is None:
                return _response("503 Service Unavailable", "text/plain; charset=utf-8",
                                 (missing or MISSING).encode() + b"\n", head_only)
            encoder, ctype = choose_encoder(headers.get("accept", ""))
            return _response("200 OK", ctype, encoder(registry), head_only)
        return _response("404 Not Found", "text/plain", b"see /metrics, /healthz, /readyz\n",
                         head_only)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            lines = head.split(b"\r\n")
            parts = lines[0].split()
            headers = {}
            for line in lines[1:]:
                name, sep, value = line.partition(b":")
                if sep:
                    headers[name.strip().lower().decode("latin-1")] = \
                        value.strip().decode("latin-1")
            if len(parts) < 2:
                writer.write(_response("400 Bad Request", "text/plain", b"bad request\n", False))
            else:
                writer.write(await answer(parts[0], parts[1].split(b"?")[0], headers))
            await writer.drain()
        except (asyncio.TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                ConnectionError):
            pass
        finally:
            writer.close()

    return await asyncio.start_server(handle, host, port)
