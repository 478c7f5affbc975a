"""fastpunch.portmap.http: the request's bytes, responses parsed
(Content-Length, chunked, until the end), malformed and oversized ones
refused."""

from __future__ import annotations

import pytest

from fastpunch.portmap import http as pm

from .helpers import raises


def test_http_request_bytes():
    req = pm.http_request("POST", "http://10.1.0.1:5000/ctl/IPConn?x=1", b"<xml/>",
                          [("SOAPAction", '"urn:x#Y"')])
    head, _, body = req.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[0] == b"POST /ctl/IPConn?x=1 HTTP/1.1"
    assert b"Host: 10.1.0.1:5000" in lines and b"Connection: close" in lines
    assert b'SOAPAction: "urn:x#Y"' in lines and b"Content-Length: 6" in lines
    assert body == b"<xml/>"
    get = pm.http_request("GET", "http://10.1.0.1/rootDesc.xml")
    assert get.startswith(b"GET /rootDesc.xml HTTP/1.1\r\nHost: 10.1.0.1:80\r\n")
    assert b"Content-Length" not in get and get.endswith(b"\r\n\r\n")


HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/xml\r\n"


def test_http_response_content_length():
    full = HEAD + b"Content-Length: 5\r\n\r\nhello"
    for cut in (10, len(full) - 1):
        assert pm.parse_http_response(full[:cut]) is None
    got = pm.parse_http_response(full + b"trailing junk ignored")
    assert (got.status, got.reason, got.body) == (200, "OK", b"hello")
    assert got.headers["content-type"] == "text/xml"
    raises("upnp-truncated", pm.parse_http_response, full[:-1], eof=True)
    raises("upnp-truncated", pm.parse_http_response, full[:10], eof=True)


def test_http_response_chunked_and_until_eof():
    chunked = HEAD + b"Transfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n1\r\n!\r\n0\r\n\r\n"
    assert pm.parse_http_response(chunked).body == b"hello!"
    with_trailer = chunked[:-2] + b"X-Trailer: 1\r\n\r\n"
    assert pm.parse_http_response(with_trailer).body == b"hello!"
    for cut in (len(HEAD) + 35, len(chunked) - 1):
        assert pm.parse_http_response(chunked[:cut]) is None
        raises("upnp-truncated", pm.parse_http_response, chunked[:cut], eof=True)
    until_eof = HEAD + b"\r\nall of it"
    assert pm.parse_http_response(until_eof) is None
    assert pm.parse_http_response(until_eof, eof=True).body == b"all of it"


@pytest.mark.parametrize("data,code", [
    (b"HTTP/1.1 2000 OK\r\n\r\n", "upnp-malformed"),
    (b"ICY 200 OK\r\n\r\n", "upnp-malformed"),
    (b"HTTP/1.1 OK\r\n\r\n", "upnp-malformed"),
    (HEAD + b"Content-Length: \xb2\r\n\r\n", "upnp-malformed"),    # '²' is isdigit()
    (HEAD + b"Content-Length: -1\r\n\r\n", "upnp-malformed"),
    (HEAD + b"Content-Length: 70000\r\n\r\n", "upnp-oversized"),
    (HEAD + b"Transfer-Encoding: chunked\r\n\r\nzz\r\n", "upnp-malformed"),
    (HEAD + b"Transfer-Encoding: chunked\r\n\r\n0x5\r\nhello\r\n", "upnp-malformed"),
    (HEAD + b"Transfer-Encoding: chunked\r\n\r\n5\r\nhelloXX0\r\n\r\n", "upnp-malformed"),
    (HEAD + b"Transfer-Encoding: chunked\r\n\r\nfffff\r\n", "upnp-oversized"),
    (HEAD + b"Transfer-Encoding: chunked\r\n\r\n" + b"1" * 100, "upnp-malformed"),
    (b"HTTP/1.1 200 OK\r\n" + b"X: " + b"y" * pm.MAX_HEAD, "upnp-oversized"),
    (b"HTTP/1.1 200 OK\r\n" + b"X: " + b"y" * pm.MAX_HEAD + b"\r\n\r\n", "upnp-oversized"),
])
def test_http_response_malformed(data, code):
    raises(code, pm.parse_http_response, data)


def test_http_body_until_eof_is_bounded():
    raises("upnp-oversized", pm.parse_http_response, HEAD + b"\r\n" + b"x" * (pm.MAX_XML + 1))
