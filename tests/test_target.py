"""Request forms and host labels, checked against aiohttp's real request parser."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiohttp import web
from yarl import URL

from proxy.rules.hostpatterns import HostPatterns
from proxy.rules.target import (
    TargetError,
    absolute_target,
    forward_target,
    host_label,
    inner_target,
)


@pytest.mark.parametrize(
    ("url", "label"),
    [
        ("http://API.Example.com/x", "api.example.com"),
        ("http://api.example.com:80/x", "api.example.com"),
        ("http://127.0.0.1:8081/", "127.0.0.1:8081"),
        ("http://[::1]:8081/", "[::1]:8081"),
        ("http://[::1]/", "[::1]"),
        ("https://API.example.com:443/x", "api.example.com"),
        ("https://api.example.com:8443/x", "api.example.com:8443"),
        ("https://[::1]:443/", "[::1]"),
    ],
)
def test_host_label_keeps_only_non_default_ports(url: str, label: str) -> None:
    """The label is the lower-case host, with :port only when it is not the default."""
    assert host_label(URL(url)) == label


def test_userinfo_and_fragment_are_stripped() -> None:
    """Userinfo (it would become Authorization) and the fragment are not sent upstream."""
    target = forward_target(URL("http://user:pw@h:81/p?q#frag"))
    assert str(target.url) == "http://h:81/p?q"
    assert target.host == "h:81"


@pytest.mark.parametrize("url", ["ftp://h/", "file:///etc/passwd", "ws://h/"])
def test_only_http_and_https_are_forwarded(url: str) -> None:
    """Other schemes are refused with a message for the client."""
    with pytest.raises(TargetError):
        forward_target(URL(url))


UPGRADE = HostPatterns(["api.example.com", "*.internal.test", "[::1]", "10.0.0.1"])


@pytest.mark.parametrize(
    ("url", "upstream", "label"),
    [
        ("https://api.example.com/x", "https://api.example.com/x", "api.example.com"),
        # --upgrade-to-https: no port -> 443 (RFC 9110 §4.2.2), an explicit port is kept
        ("http://api.example.com/x?q", "https://api.example.com/x?q", "api.example.com"),
        ("http://API.example.com:8080/x", "https://api.example.com:8080/x", "api.example.com:8080"),
        ("http://a.internal.test/", "https://a.internal.test/", "a.internal.test"),
        ("http://[::1]/", "https://[::1]/", "[::1]"),
        ("http://10.0.0.1:8443/", "https://10.0.0.1:8443/", "10.0.0.1:8443"),
        # not matching: stays http
        ("http://internal.test/", "http://internal.test/", "internal.test"),
        ("http://other.example.com/", "http://other.example.com/", "other.example.com"),
    ],
)
def test_upgrade_to_https_rules(url: str, upstream: str, label: str) -> None:
    """Which requests go upstream as https, to which port, under which host label."""
    target = forward_target(URL(url), UPGRADE)
    assert str(target.url) == upstream
    assert target.url.port == URL(upstream).port
    assert target.host == label


def test_upgraded_target_without_port_dials_443() -> None:
    """An upgraded request with no port goes to 443, not to http's 80."""
    assert forward_target(URL("http://api.example.com/"), UPGRADE).url.port == 443


async def _parsed(line: bytes) -> URL | None:
    """absolute_target() of a request line parsed by aiohttp's real server on a socket."""
    seen: list[Any] = []

    async def handler(request: web.BaseRequest) -> web.Response:
        seen.append(absolute_target(request))
        return web.Response()

    server = web.Server(handler)
    loop = asyncio.get_running_loop()
    listener = await loop.create_server(server, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(line + b"\r\nHost: x\r\nConnection: close\r\n\r\n")
    await asyncio.wait_for(reader.read(-1), 10)
    writer.close()
    listener.close()
    await server.shutdown(10)
    result: URL | None = seen[0]
    return result


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (b"GET http://other.example:8080/metrics HTTP/1.1", "http://other.example:8080/metrics"),
        (b"GET HTTP://Other.Example/x HTTP/1.1", "http://Other.Example/x"),
        (b"GET /metrics HTTP/1.1", None),
        (b"OPTIONS * HTTP/1.1", None),
        (b"CONNECT example.test:443 HTTP/1.1", None),
    ],
)
async def test_absolute_target_tells_the_forms_apart(line: bytes, expected: str | None) -> None:
    """Only absolute-form targets are returned; origin-form, * and CONNECT are not."""
    target = await _parsed(line)
    assert (None if target is None else str(target)) == expected


@pytest.mark.parametrize(
    ("url", "forwarded"),
    [
        ("ws://h/chat?x=1", "http://h/chat?x=1"),
        ("ws://h:8080/", "http://h:8080/"),
        ("http://h/chat", "http://h/chat"),
        ("wss://h/chat", "https://h/chat"),
        ("wss://h:8443/", "https://h:8443/"),
    ],
)
def test_websocket_handshake_targets(url: str, forwarded: str) -> None:
    """A WebSocket handshake may name ws:// or wss:// (RFC 6455 §3): forwarded as http(s)://."""
    target = forward_target(URL(url), websocket=True)
    assert (str(target.url), target.websocket) == (forwarded, True)


@pytest.mark.parametrize("url", ["ws://h/", "wss://h/"])
def test_ws_and_wss_without_a_handshake_are_refused(url: str) -> None:
    """ws:// and wss:// name WebSocket resources: only a WebSocket handshake may use them."""
    with pytest.raises(TargetError):
        forward_target(URL(url))


@pytest.mark.parametrize(
    ("origin", "target", "expected", "label"),
    [
        ("https://api.example:443", "/x?q=1", "https://api.example/x?q=1", "api.example"),
        ("https://api.example:8443", "/", "https://api.example:8443/", "api.example:8443"),
        ("http://h:80", "/a%20b", "http://h/a%20b", "h"),
        ("http://h:80", "//other.example/x", "http://h//other.example/x", "h"),
        ("http://127.0.0.1:8080", "http://127.0.0.1:8080/p", "http://127.0.0.1:8080/p", None),
        ("http://[::1]:8080", "/p", "http://[::1]:8080/p", "[::1]:8080"),
        ("https://h:443", "https://H/p", "https://h/p", "h"),
    ],
)
def test_inner_target_goes_to_the_connect_target(
    origin: str, target: str, expected: str, label: str | None
) -> None:
    """Origin-form is appended to the CONNECT's target; absolute-form must name that target."""
    # As aiohttp's parser builds them: origin-form is a path, never an authority.
    url = (
        URL(target)
        if "://" in target
        else URL.build(
            path=target.partition("?")[0], query_string=target.partition("?")[2], encoded=True
        )
    )
    result = inner_target(URL(origin), url)
    assert str(result.url) == expected
    assert result.url.host == URL(origin).host
    if label is not None:
        assert result.host == label


@pytest.mark.parametrize("target", ["http://other.example/x", "http://h:81/x", "*"])
def test_inner_target_refuses_another_target(target: str) -> None:
    """A request inside a CONNECT to h:80 may not name another host, another port, or '*'."""
    with pytest.raises(TargetError):
        inner_target(URL("http://h:80"), URL(target))


@pytest.mark.parametrize(
    ("origin", "target", "upstream"),
    [
        # CONNECT api.example.com:80, then GET /x: the same request as GET http://api.example.com/x
        ("http://api.example.com:80", "/x?q", "https://api.example.com/x?q"),
        ("http://api.example.com:80", "http://api.example.com/x", "https://api.example.com/x"),
        ("http://api.example.com:8080", "/x", "https://api.example.com:8080/x"),
        ("http://[::1]:80", "/", "https://[::1]/"),
        ("http://other.example:80", "/x", "http://other.example/x"),
        ("https://api.example.com:443", "/x", "https://api.example.com/x"),
    ],
)
def test_upgrade_to_https_applies_inside_a_connect(origin: str, target: str, upstream: str) -> None:
    """--upgrade-to-https holds for plain HTTP inside CONNECT host:80 as for absolute-form."""
    url = (
        URL(target)
        if "://" in target
        else URL.build(
            path=target.partition("?")[0], query_string=target.partition("?")[2], encoded=True
        )
    )
    result = inner_target(URL(origin), url, UPGRADE)
    assert str(result.url) == upstream
    assert result.url.port == URL(upstream).port
    assert result.host == forward_target(URL(upstream)).host
