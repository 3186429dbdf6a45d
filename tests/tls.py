"""TLS for the tests: origins on loopback with trustme certificates, a handshake delayer, and
a client and server over memory BIOs."""

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
        await asyncio.wait_for(server.wait_closed(), 10)


@pytest.fixture
async def secure_origin(tls_ca: trustme.CA) -> AsyncIterator[TLSOrigin]:
    """The origin app over TLS on 127.0.0.1, certified for localhost and 127.0.0.1."""
    async with tls_origin(server_context(tls_ca, "localhost", "127.0.0.1")) as origin:
        yield origin


class MemoryPeers:
    """A real TLS client and server joined by memory BIOs, for tests that need the exact bytes.

    Each step returns what one side wrote, so a test decides when (and in what pieces) the
    other side reads it.
    """

    def __init__(
        self,
        ca: trustme.CA,
        *,
        maximum: ssl.TLSVersion = ssl.TLSVersion.TLSv1_3,
        client_alpn: list[str] | None = None,
        server_alpn: list[str] | None = None,
        tickets: int | None = None,
        server_curve: str | None = None,
        sni: str | None = "api.test",
    ) -> None:
        """``sni`` None: the client sends none (and checks no name; the chain it still checks)."""
        client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ca.configure_trust(client_ctx)
        client_ctx.maximum_version = maximum
        client_ctx.check_hostname = sni is not None
        if client_alpn is not None:
            client_ctx.set_alpn_protocols(client_alpn)
        server_ctx = server_context(ca, sni or "api.test")
        if server_alpn is not None:
            server_ctx.set_alpn_protocols(server_alpn)
        if tickets is not None:
            server_ctx.num_tickets = tickets
        if server_curve is not None:
            server_ctx.set_ecdh_curve(server_curve)  # the only group it takes: a retry
        self._to_client, self._from_client = ssl.MemoryBIO(), ssl.MemoryBIO()
        self._to_server, self._from_server = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.client = client_ctx.wrap_bio(self._to_client, self._from_client, server_hostname=sni)
        self.server = server_ctx.wrap_bio(self._to_server, self._from_server, server_side=True)

    def handshake(self) -> list[tuple[str, bytes]]:
        """Both sides' handshake flights in the order they were written: (side, bytes)."""
        flights: list[tuple[str, bytes]] = []
        done = {"client": False, "upstream": False}
        while not all(done.values()):
            for side, peer in (("client", self.client), ("upstream", self.server)):
                if not done[side]:
                    try:
                        peer.do_handshake()
                        done[side] = True
                    except ssl.SSLWantReadError:
                        pass
                written = self._take(side)
                if written:
                    flights.append((side, written))
        return flights

    def send(self, side: str, data: bytes) -> bytes:
        """``side`` writes ``data``; returns the records it became (handed to the peer)."""
        (self.client if side == "client" else self.server).write(data)
        return self._take(side)

    def read(self, side: str) -> bytes:
        """``side`` reads what has reached it (tickets are taken in on the way)."""
        try:
            return (self.client if side == "client" else self.server).read(1 << 20)
        except ssl.SSLWantReadError:
            return b""

    def close(self, side: str) -> bytes:
        """``side`` sends its close_notify alert; returns its record."""
        with contextlib.suppress(ssl.SSLWantReadError):  # it would wait for the peer's
            (self.client if side == "client" else self.server).unwrap()
        return self._take(side)

    def _take(self, side: str) -> bytes:
        """What ``side`` wrote, handed to its peer's input as well."""
        out = self._from_client if side == "client" else self._from_server
        data = out.read()
        (self._to_server if side == "client" else self._to_client).write(data)
        return data
