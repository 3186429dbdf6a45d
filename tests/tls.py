"""TLS origins on loopback for the tests: trustme certificates, and a handshake delayer."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import trustme
from aiohttp import web

from tests.conftest import origin_app


@dataclass
class TLSOrigin:
    """``origin_app()`` served over TLS; remembers the client ports it saw (one per connection)."""

    host: str
    port: int
    peers: set[int] = field(default_factory=set)

    @property
    def authority(self) -> str:
        return f"{self.host}:{self.port}"

    def url(self, path: str, scheme: str = "https") -> str:
        return f"{scheme}://{self.authority}{path}"


def server_context(ca: trustme.CA, *names: str) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(*names).configure_cert(context)
    return context


@contextlib.asynccontextmanager
async def tls_origin(
    context: ssl.SSLContext | None, host: str = "127.0.0.1"
) -> AsyncIterator[TLSOrigin]:
    """Serve the shared origin app over TLS on ``host`` (no context: in the clear); torn down
    on exit."""
    state = TLSOrigin(host, 0)

    @web.middleware
    async def remember_peer(request: web.Request, handler: Any) -> web.StreamResponse:
        transport = request.transport
        if transport is not None:
            state.peers.add(transport.get_extra_info("peername")[1])
        response: web.StreamResponse = await handler(request)
        return response

    app = origin_app()
    app.middlewares.append(remember_peer)
    runner = web.AppRunner(app, auto_decompress=False)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, 0, ssl_context=context)
        await site.start()
        state.port = runner.addresses[0][1]
        yield state
    finally:
        await runner.cleanup()


@contextlib.asynccontextmanager
async def delayed_handshake(target: TLSOrigin, delay: float) -> AsyncIterator[int]:
    """A TCP relay in front of ``target`` that accepts at once and relays nothing for ``delay``.

    TCP connect completes immediately; the client's ClientHello waits ``delay`` before it
    reaches the TLS server, so the handshake (and only the handshake) takes that much
    longer. Yields the relay's port.
    """
    tasks: set[asyncio.Task[None]] = set()

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while chunk := await reader.read(65536):
                writer.write(chunk)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        tasks.add(task)
        try:
            await asyncio.sleep(delay)
            up_reader, up_writer = await asyncio.open_connection(target.host, target.port)
            await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        finally:
            writer.close()
            tasks.discard(task)

    server = await asyncio.start_server(handle, target.host, 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        for task in list(tasks):
            task.cancel()
        server.close()
        await server.wait_closed()


@pytest.fixture
async def secure_origin(tls_ca: trustme.CA) -> AsyncIterator[TLSOrigin]:
    """The origin app over TLS on 127.0.0.1, certified for localhost and 127.0.0.1."""
    async with tls_origin(server_context(tls_ca, "localhost", "127.0.0.1")) as origin:
        yield origin
