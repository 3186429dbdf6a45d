"""WebSocket through the proxy (RFC 6455 §4.1): the handshake forwarded, then a relay."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
import websockets.asyncio.client
import websockets.asyncio.server

from tests.conftest import LogCapture, RawOrigin, RunningProxy, answer, read_head
from tests.test_bad_input import send_and_read, status_lines

StartProxy = Callable[..., Awaitable[RunningProxy]]
StartRaw = Callable[[Any], Awaitable[RawOrigin]]

# RFC 6455 §1.3: the accept value is derived from the key with this GUID.
_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def accept_for(key: str) -> str:
    return base64.b64encode(hashlib.sha1(key.encode() + _GUID).digest()).decode()


async def _echo(connection: websockets.asyncio.server.ServerConnection) -> None:
    async for message in connection:
        await connection.send(message)


@pytest.fixture
async def ws_origin() -> AsyncIterator[int]:
    """A WebSocket echo origin from the websockets library; yields its port."""
    async with websockets.asyncio.server.serve(_echo, "127.0.0.1", 0, compression=None) as server:
        yield next(iter(server.sockets)).getsockname()[1]


async def test_aiohttp_ws_connect_with_proxy_gets_a_websocket(
    proxy: RunningProxy, ws_origin: int, logs: LogCapture
) -> None:
    """aiohttp's ws_connect (GET ws://...) via the proxy echoes, and is counted like a tunnel."""
    host = f"127.0.0.1:{ws_origin}"
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(f"ws://{host}/chat", proxy=proxy.url) as ws,
    ):
        await ws.send_str("hello")
        assert await asyncio.wait_for(ws.receive_str(), 10) == "hello"
        await ws.send_bytes(b"\x00\xff" * 1000)
        assert await asyncio.wait_for(ws.receive_bytes(), 10) == b"\x00\xff" * 1000
        assert proxy.sample("proxy_tunnels_open") == 1
    (relayed,) = await logs.wait_for("websocket")
    (handshake,) = logs.events("access")
    assert (handshake["status"], handshake["method"], handshake["path"]) == (101, "GET", "/chat")
    assert handshake["ttfb_ms"] is not None
    assert relayed["request_id"] == handshake["request_id"]
    assert (relayed["host"], relayed["target"], relayed["status"]) == (host, host, 101)
    assert relayed["outcome"] == "closed"
    assert relayed["bytes_in"] > 2000
    assert relayed["bytes_out"] > 2000
    requests = proxy.sample("proxy_upstream_requests_total", host=host, method="GET", code="101")
    assert requests == 1
    assert proxy.sample("proxy_tunnels_total", host=host, outcome="closed") == 1
    assert (
        proxy.sample("proxy_tunnel_bytes_total", host=host, direction="sent") == relayed["bytes_in"]
    )
    assert proxy.sample("proxy_tunnel_seconds_count", host=host) == 1
    assert proxy.sample("proxy_upstream_connect_seconds_count", host=host) == 1  # not twice
    assert proxy.sample("proxy_tunnels_open") == 0
    assert proxy.sample("proxy_requests_in_flight") == 0


def masked_text_frame(text: bytes) -> bytes:
    """A client's final text frame (RFC 6455 §5.2), masked as clients must."""
    mask = os.urandom(4)
    masked = bytes(byte ^ mask[index % 4] for index, byte in enumerate(text))
    return struct.pack("!BB", 0x81, 0x80 | len(text)) + mask + masked


def handshake(target: str, key: str, *fields: str) -> bytes:
    lines = [
        f"GET {target} HTTP/1.1",
        "Host: x",
        "Connection: keep-alive, Upgrade",
        "Upgrade: websocket",
        f"Sec-WebSocket-Key: {key}",
        "Sec-WebSocket-Version: 13",
        *fields,
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def test_raw_http_target_with_upgrade_websocket_switches(
    proxy: RunningProxy, ws_origin: int
) -> None:
    """`GET http://...` with Upgrade: websocket gets the origin's 101, then frames both ways."""
    key = base64.b64encode(os.urandom(16)).decode()
    reader, writer = await proxy.connect()
    try:
        writer.write(handshake(f"http://127.0.0.1:{ws_origin}/raw", key))
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert status_lines(head) == [b"HTTP/1.1 101 Switching Protocols"]
        fields = head.lower().split(b"\r\n")
        assert b"upgrade: websocket" in fields
        assert b"connection: upgrade" in fields
        assert f"sec-websocket-accept: {accept_for(key)}".lower().encode() in fields
        writer.write(masked_text_frame(b"ping through"))
        echoed = await asyncio.wait_for(reader.readexactly(2 + len(b"ping through")), 10)
        assert echoed == b"\x81" + bytes([len(b"ping through")]) + b"ping through"
    finally:
        writer.close()


async def test_websocket_to_a_denied_destination_gets_403_and_no_dial(
    start_proxy: StartProxy, raw_origin: StartRaw
) -> None:
    """The handshake passes the same destination rules as any request: 403, nothing dialled."""
    upstream = await raw_origin(lambda reader, writer, state: read_head(reader))
    proxy = await start_proxy(deny_destinations=("127.0.0.1/32",))
    async with aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await session.ws_connect(f"ws://127.0.0.1:{upstream.port}/", proxy=proxy.url)
    assert refused.value.status == 403
    assert upstream.connections == 0


async def test_declined_handshake_is_relayed_and_the_connection_lives_on(
    proxy: RunningProxy, raw_origin: StartRaw
) -> None:
    """An origin that answers the handshake 403 is relayed; the next request is served."""
    forbidden = b"HTTP/1.1 403 Forbidden\r\nContent-Length: 3\r\n\r\nno\n"
    upstream = await raw_origin(answer(forbidden, times=2))
    key = base64.b64encode(os.urandom(16)).decode()
    request = handshake(upstream.url("/ws"), key) + (
        f"GET {upstream.url('/next')} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()
    )
    reader, writer = await proxy.connect()
    try:
        writer.write(request)
        received = await asyncio.wait_for(reader.read(-1), 10)
    finally:
        writer.close()
    assert status_lines(received) == [b"HTTP/1.1 403 Forbidden", b"HTTP/1.1 403 Forbidden"]
    first = upstream.received[0].lower()
    assert b"\r\nupgrade: websocket\r\n" in first
    assert b"\r\nconnection: upgrade\r\n" in first
    assert b"keep-alive" not in first


async def test_idle_websocket_is_closed_like_a_tunnel(
    start_proxy: StartProxy, ws_origin: int, logs: LogCapture
) -> None:
    """No frame either way for --tunnel-idle-timeout: the proxy ends it, counted idle_timeout."""
    proxy = await start_proxy(tunnel_idle_timeout=0.3)
    host = f"127.0.0.1:{ws_origin}"
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(f"ws://{host}/", proxy=proxy.url, autoping=False, heartbeat=None) as ws,
    ):
        message = await asyncio.wait_for(ws.receive(), 10)
        assert message.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
    (line,) = await logs.wait_for("websocket")
    assert (line["outcome"], line["closed_by"]) == ("idle_timeout", "idle_timeout")
    assert proxy.sample("proxy_tunnels_total", host=host, outcome="idle_timeout") == 1


async def test_websockets_client_through_connect_still_works(
    start_proxy: StartProxy, ws_origin: int, logs: LogCapture
) -> None:
    """The websockets library, which tunnels with CONNECT, echoes through the proxy."""
    proxy = await start_proxy(connect_ports=(ws_origin,))
    async with websockets.asyncio.client.connect(
        f"ws://127.0.0.1:{ws_origin}/", proxy=proxy.url, compression=None
    ) as ws:
        await ws.send("via connect")
        assert await asyncio.wait_for(ws.recv(), 10) == "via connect"
    await logs.wait_for("tunnel")
    assert proxy.sample("proxy_tunnels_total", host=f"127.0.0.1:{ws_origin}", outcome="closed") == 1


async def test_websocket_open_after_the_drain_is_closed_at_shutdown(
    proxy: RunningProxy, ws_origin: int, logs: LogCapture
) -> None:
    """The drain waits for an open WebSocket; shutdown then ends it, logged as shutdown."""
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(f"ws://127.0.0.1:{ws_origin}/", proxy=proxy.url) as ws,
    ):
        assert proxy.sample("proxy_requests_in_flight") == 1
        assert await proxy.server.drain(0, 0.1) is False
        await asyncio.wait_for(proxy.server.close(), 5)
        message = await asyncio.wait_for(ws.receive(), 10)
        assert message.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
    (line,) = await logs.wait_for("websocket")
    assert (line["outcome"], line["closed_by"]) == ("shutdown", "shutdown")


async def test_websocket_handshake_during_the_grace_period_still_switches(
    proxy: RunningProxy, ws_origin: int
) -> None:
    """While draining, a 101 keeps its Connection: upgrade (no Connection: close) and works."""
    draining = asyncio.create_task(proxy.server.drain(grace=60, drain_timeout=10))
    try:
        await asyncio.sleep(0)  # the drain has begun
        assert proxy.server.lifecycle.draining
        async with (
            aiohttp.ClientSession() as session,
            session.ws_connect(f"ws://127.0.0.1:{ws_origin}/", proxy=proxy.url) as ws,
        ):
            await ws.send_str("while draining")
            assert (await asyncio.wait_for(ws.receive(), 10)).data == "while draining"
    finally:
        draining.cancel()
        await asyncio.gather(draining, return_exceptions=True)


async def test_101_to_a_request_without_upgrade_is_502(
    proxy: RunningProxy, raw_origin: StartRaw, logs: LogCapture
) -> None:
    """An upstream that switches protocols unasked gets no relay: 502 http_protocol_error."""

    async def script(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, state: Any
    ) -> None:
        await read_head(reader)
        writer.write(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n\r\n"
        )
        await writer.drain()
        await reader.read()

    upstream = await raw_origin(script)
    data, closed = await send_and_read(
        proxy, f"GET {upstream.url('/')} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()
    )
    assert status_lines(data) == [b"HTTP/1.1 502 Bad Gateway"]
    assert b"error=http_protocol_error" in data
    assert closed


async def test_open_websocket_holds_one_of_its_hosts_pool_connections(
    start_proxy: StartProxy, ws_origin: int, logs: LogCapture
) -> None:
    """While a WebSocket is open it counts against --pool-limit-per-host; after, it does not."""
    proxy = await start_proxy(pool_limit_per_host=1, pool_wait_timeout=0.2)
    url = f"http://127.0.0.1:{ws_origin}/"
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(url.replace("http", "ws"), proxy=proxy.url) as ws:
            async with session.get(url, proxy=proxy.url) as resp:
                assert resp.status == 503
                assert "connection_limit_reached" in resp.headers["Proxy-Status"]
            await ws.send_str("still open")
            assert await asyncio.wait_for(ws.receive_str(), 10) == "still open"
        await logs.wait_for("websocket")
        async with session.get(url, proxy=proxy.url) as resp:
            assert resp.status == 426  # the websockets origin's answer to a plain GET
