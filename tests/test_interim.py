"""Interim responses: 100 Continue only once a request is accepted (RFC 9110 §10.1.1), and 1xx."""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from proxy.rules.policy import Credential
from tests.conftest import Origin, RunningProxy, answer, read_head
from tests.test_bad_input import status_lines
from tests.test_forwarding import raw_exchange

StartProxy = Callable[..., Awaitable[RunningProxy]]


def expecting(target: str, *fields: str) -> bytes:
    """The head of a 5-byte PUT that waits for 100 Continue."""
    lines = [f"PUT {target} HTTP/1.1", "Host: x", "Content-Length: 5", "Expect: 100-continue"]
    return ("\r\n".join([*lines, *fields]) + "\r\n\r\n").encode()


async def read_response(reader: asyncio.StreamReader) -> bytes:
    """One response head and its Content-Length body."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    return head + await asyncio.wait_for(reader.readexactly(length), 10)


# Each refusal the proxy decides on: settings, target (origin -> URL), extra fields, status line.
REFUSALS: dict[
    str, tuple[dict[str, Any], Callable[[Origin, RunningProxy], str], tuple[str, ...], bytes]
] = {
    "no_credentials": (
        {"proxy_auth": Credential("u", "p")},
        lambda origin, proxy: origin.url("/echo"),
        (),
        b"HTTP/1.1 407 Proxy Authentication Required",
    ),
    "client_not_allowed": (
        {"allow_clients": ("10.0.0.0/8",)},
        lambda origin, proxy: origin.url("/echo"),
        (),
        b"HTTP/1.1 403 Forbidden",
    ),
    "destination_denied": (
        {"deny_destinations": ("127.0.0.1/32",)},
        lambda origin, proxy: origin.url("/echo"),
        (),
        b"HTTP/1.1 403 Forbidden",
    ),
    "loop_by_via": (
        {},
        lambda origin, proxy: origin.url("/echo"),
        ("Via: 1.1 tracing-proxy",),
        b"HTTP/1.1 508 Loop Detected",
    ),
    "loop_to_our_own_listener": (
        {},
        lambda origin, proxy: f"{proxy.url}/echo",
        (),
        b"HTTP/1.1 508 Loop Detected",
    ),
}


@pytest.mark.parametrize("name", list(REFUSALS))
async def test_100_continue_is_not_sent_before_a_refusal(
    start_proxy: StartProxy, origin: Origin, name: str
) -> None:
    """A refused request gets its final status without a 100 and says Connection: close."""
    changes, target, fields, status = REFUSALS[name]
    proxy = await start_proxy(**changes)
    reader, writer = await proxy.connect()
    try:
        writer.write(expecting(target(origin, proxy), *fields))
        response = await read_response(reader)
        assert status_lines(response) == [status]
        assert b"\r\nConnection: close\r\n" in response
        # A client that stops waiting sends its body anyway; the proxy then closes.
        writer.write(b"hello")
        rest = await asyncio.wait_for(reader.read(-1), 10)
    finally:
        writer.close()
    assert rest == b""


async def test_100_continue_then_the_body_is_forwarded(proxy: RunningProxy, origin: Origin) -> None:
    """An accepted request gets 100 Continue, then the origin receives the body (no Expect)."""
    reader, writer = await proxy.connect()
    try:
        writer.write(expecting(origin.url("/echo"), "Connection: close"))
        interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
        writer.write(b"hello")
        received = await asyncio.wait_for(reader.read(-1), 10)
    finally:
        writer.close()
    assert status_lines(received) == [b"HTTP/1.1 200 OK"]
    echo = json.loads(received.split(b"\r\n\r\n", 1)[1])
    assert echo["body_sha256"] == hashlib.sha256(b"hello").hexdigest()
    assert "expect" not in [name.lower() for name, _ in echo["headers"]]


async def test_unknown_expectation_gets_417(proxy: RunningProxy, origin: Origin) -> None:
    """An expectation other than 100-continue is answered 417, without a 100 (RFC 9110 §10.1.1)."""
    reader, writer = await proxy.connect()
    try:
        writer.write(
            f"PUT {origin.url('/echo')} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n"
            "Expect: something-else\r\nConnection: close\r\n\r\n".encode()
        )
        received = await asyncio.wait_for(reader.read(-1), 10)
    finally:
        writer.close()
    assert status_lines(received) == [b"HTTP/1.1 417 Expectation Failed"]
    assert b"Proxy-Status: tracing-proxy; error=http_request_error" in received
    assert proxy.sample("proxy_denied_total", reason="unsupported_expectation") == 1


EARLY_HINTS = (
    b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload; as=style\r\n"
    b"Connection: X-Hop\r\nX-Hop: 1\r\n\r\n"
)


async def hints_then_ok(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, state: Any
) -> None:
    """A 103 Early Hints, a moment later the 200."""
    state.received.append(await read_head(reader))
    writer.write(EARLY_HINTS)
    await writer.drain()
    await asyncio.sleep(0.05)
    writer.write(b"HTTP/1.1 102 Processing\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    await writer.drain()


async def test_103_early_hints_are_forwarded(proxy: RunningProxy, raw_origin: Any) -> None:
    """Every 1xx but 101 reaches an HTTP/1.1 client before the final answer (RFC 9110 §15.2)."""
    upstream = await raw_origin(hints_then_ok)
    _, received = await raw_exchange(
        proxy, f"GET {upstream.url('/')} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()
    )
    assert status_lines(received) == [
        b"HTTP/1.1 103 Early Hints",
        b"HTTP/1.1 102 Processing",
        b"HTTP/1.1 200 OK",
    ]
    hints = received.split(b"\r\n\r\n", 1)[0].split(b"\r\n")
    assert hints[1:] == [b"Link: </style.css>; rel=preload; as=style", b"Via: 1.1 tracing-proxy"]
    assert received.endswith(b"\r\n\r\nok")


async def test_1xx_is_not_sent_to_an_http10_client(proxy: RunningProxy, raw_origin: Any) -> None:
    """An HTTP/1.0 client gets only the final answer (RFC 9110 §15.2)."""
    upstream = await raw_origin(hints_then_ok)
    _, received = await raw_exchange(proxy, f"GET {upstream.url('/')} HTTP/1.0\r\n\r\n".encode())
    assert status_lines(received) == [b"HTTP/1.0 200 OK"]


async def test_connection_pooled_after_early_hints_is_reused(
    proxy: RunningProxy, raw_origin: Any
) -> None:
    """After a 103 the upstream connection goes back to the pool and serves the next request."""
    ok = EARLY_HINTS + b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    upstream = await raw_origin(answer(ok, times=2))
    for _ in range(2):
        _, received = await raw_exchange(
            proxy,
            f"GET {upstream.url('/')} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode(),
        )
        assert status_lines(received) == [b"HTTP/1.1 103 Early Hints", b"HTTP/1.1 200 OK"]
    host = f"127.0.0.1:{upstream.port}"
    assert upstream.connections == 1
    assert proxy.sample("proxy_upstream_connections_total", host=host, kind="reused") == 1
