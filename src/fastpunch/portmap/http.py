"""The tiny HTTP/1.1 client side UPnP-IGD needs, pure: a request builder
(:func:`http_request`, Connection: close, for an http:// URL with a literal
IPv4 address) and a response parser (:func:`parse_http_response`:
Content-Length, chunked, or up to the end of the connection). Heads over
16 KiB and bodies over 64 KiB are refused. Errors are ``upnp-*``
:class:`~fastpunch.portmap.PortMapError` codes: HTTP here only ever
carries UPnP. The head splitting and status line check serve SSDP replies
too (:func:`fastpunch.portmap.upnp.ssdp_location`)."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple
from urllib.parse import urlsplit

from ._common import PortMapError, _digits

__all__ = ["HttpResponse", "http_request", "parse_http_response"]


MAX_HEAD = 16 * 1024        # an HTTP or SSDP head
MAX_XML = 64 * 1024         # a description or SOAP body


@dataclass(frozen=True)
class HttpResponse:
    status: int
    reason: str
    headers: Dict[str, str]     # lower-case names
    body: bytes


def _split_head(data: bytes, what: str) -> Tuple[str, Dict[str, str], int]:
    """(start line, headers, offset of the body) of a complete head."""
    end = data.find(b"\r\n\r\n")
    if end < 0:
        raise PortMapError("upnp-malformed", f"{what}: no end of head")
    if end > MAX_HEAD:
        raise PortMapError("upnp-oversized", f"{what}: a head over {MAX_HEAD} bytes")
    try:
        lines = data[:end].decode("iso-8859-1").split("\r\n")
    except UnicodeDecodeError as exc:       # pragma: no cover - latin-1 decodes anything
        raise PortMapError("upnp-malformed", f"{what}: undecodable head") from exc
    headers: Dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep or not name.strip() or name != name.strip():
            raise PortMapError("upnp-malformed", f"{what}: bad header line {line[:60]!r}")
        headers[name.lower()] = value.strip()
    return lines[0], headers, end + 4


def _status(line: str, what: str) -> Tuple[int, str]:
    parts = line.split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or len(parts[1]) != 3 \
            or not _digits(parts[1], 3):
        raise PortMapError("upnp-malformed", f"{what}: bad status line {line[:60]!r}")
    return int(parts[1]), parts[2] if len(parts) > 2 else ""


def _http_url(url: str, what: str) -> Tuple[str, int, str]:
    """(IPv4 host, port, path?query) of an http:// URL with a literal address."""
    try:
        parts = urlsplit(url)
        port = parts.port or 80
    except ValueError as exc:
        raise PortMapError("upnp-bad-url", f"{what}: bad URL {url[:100]!r}") from exc
    host = parts.hostname or ""
    try:
        ipaddress.IPv4Address(host)
    except ValueError as exc:
        raise PortMapError("upnp-bad-url", f"{what}: not an http://IPv4 URL: {url[:100]!r}") \
            from exc
    if parts.scheme != "http":
        raise PortMapError("upnp-bad-url", f"{what}: not an http:// URL: {url[:100]!r}")
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return host, port, target


def http_request(method: str, url: str, body: bytes = b"",
                 headers: Sequence[Tuple[str, str]] = ()) -> bytes:
    """An HTTP/1.1 request (Connection: close) for an http://IPv4 URL."""
    host, port, target = _http_url(url, "request")
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host}:{port}", "Connection: close",
             "User-Agent: Linux UPnP/1.1 fastpunch"]
    lines += [f"{name}: {value}" for name, value in headers]
    if body or method == "POST":
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("iso-8859-1") + body


def _dechunk(data: bytes, eof: bool) -> Optional[bytes]:
    body, pos = bytearray(), 0
    while True:
        end = data.find(b"\r\n", pos)
        if end < 0:
            if len(data) - pos > 64:
                raise PortMapError("upnp-malformed", "HTTP: a chunk size line too long")
            break
        size_text = data[pos:end].split(b";", 1)[0].strip()
        if not 0 < len(size_text) <= 8 or size_text.strip(b"0123456789abcdefABCDEF"):
            raise PortMapError("upnp-malformed", "HTTP: bad chunk size")
        size = int(size_text, 16)
        if len(body) + size > MAX_XML:
            raise PortMapError("upnp-oversized", f"HTTP: a body over {MAX_XML} bytes")
        if size == 0:
            if data.find(b"\r\n\r\n", end) < 0:     # the trailer's end (none: CRLF CRLF)
                break
            return bytes(body)
        if len(data) < end + 2 + size + 2:
            break
        if data[end + 2 + size:end + 4 + size] != b"\r\n":
            raise PortMapError("upnp-malformed", "HTTP: a chunk without its CRLF")
        body += data[end + 2:end + 2 + size]
        pos = end + 4 + size
    if eof:
        raise PortMapError("upnp-truncated", "HTTP: the connection closed inside a chunked body")
    return None


def parse_http_response(data: bytes, eof: bool = False) -> Optional[HttpResponse]:
    """The response in ``data`` once complete (Content-Length, chunked, or
    up to the end of the connection when ``eof``); None while more is
    needed. Heads over 16 KiB and bodies over 64 KiB are refused."""
    data = bytes(data)
    if data.find(b"\r\n\r\n") < 0:
        if len(data) > MAX_HEAD:
            raise PortMapError("upnp-oversized", f"HTTP: a head over {MAX_HEAD} bytes")
        if eof:
            raise PortMapError("upnp-truncated", f"HTTP: the connection closed after "
                               f"{len(data)} bytes, inside the head")
        return None
    line, headers, start = _split_head(data, "HTTP response")
    status, reason = _status(line, "HTTP response")
    rest = data[start:]
    if "chunked" in headers.get("transfer-encoding", "").lower():
        body = _dechunk(rest, eof)
        if body is None:
            return None
    elif "content-length" in headers:
        text = headers["content-length"]
        if not _digits(text, 9):
            raise PortMapError("upnp-malformed", f"HTTP: bad Content-Length {text[:20]!r}")
        length = int(text)
        if length > MAX_XML:
            raise PortMapError("upnp-oversized", f"HTTP: a body of {length} bytes "
                               f"(at most {MAX_XML})")
        if len(rest) < length:
            if eof:
                raise PortMapError("upnp-truncated", f"HTTP: {len(rest)} of {length} body "
                                   "bytes before the connection closed")
            return None
        body = rest[:length]
    else:
        if len(rest) > MAX_XML:
            raise PortMapError("upnp-oversized", f"HTTP: a body over {MAX_XML} bytes")
        if not eof:
            return None
        body = rest
    return HttpResponse(status, reason, headers, body)
