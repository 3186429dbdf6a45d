"""Graceful drain: readiness drops, serving goes on through the grace, in-flight work finishes."""

from __future__ import annotations

import asyncio
import hashlib
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest

from tests.conftest import (
    LogCapture,
    Origin,
    RawOrigin,
    RunningProxy,
    pattern,
    proxy_process,
    read_head,
)
from tests.test_access import Connection
from tests.test_limits import until
from tests.test_tunnelling import echo, open_tunnel


async def test_upload_in_flight_completes_during_drain(
    proxy: RunningProxy, origin: Origin, client: aiohttp.ClientSession
) -> None:
    """An upload still sending when the drain starts arrives whole; late arrivals get 503."""
    parts = [bytes([i]) * 50_000 for i in range(20)]
    half_sent = asyncio.Event()

    async def slow_body() -> AsyncIterator[bytes]:
        for i, part in enumerate(parts):
            if i == 10:
                half_sent.set()
            await asyncio.sleep(0.05)
            yield part

    async def upload() -> dict[str, object]:
        async with client.post(origin.url("/echo"), data=slow_body(), proxy=proxy.url) as resp:
            assert resp.status == 200
            result: dict[str, object] = await resp.json()
            return result

    uploading = asyncio.create_task(upload())
    await asyncio.wait_for(half_sent.wait(), 10)
    draining = asyncio.create_task(proxy.server.drain(grace=0.3, drain_timeout=10))
    await asyncio.sleep(0.05)

    async with client.get(proxy.admin_url + "/readyz") as resp:
        assert resp.status == 503
    async with client.get(origin.url("/echo"), proxy=proxy.url) as resp:
        assert resp.status == 200  # still serving during the grace period

    await asyncio.sleep(0.4)  # past the grace: new requests are turned away
    async with aiohttp.ClientSession() as late, late.get(origin.url("/echo"), proxy=proxy.url) as r:
        assert r.status == 503
        assert r.headers["Proxy-Status"].startswith("tracing-proxy; error=")
        assert r.headers["Connection"] == "close"
    assert proxy.sample("proxy_denied_total", reason="shutting_down") == 1

    echo = await asyncio.wait_for(uploading, 10)
    assert echo["body_sha256"] == hashlib.sha256(b"".join(parts)).hexdigest()
    assert await asyncio.wait_for(draining, 15) is True  # drain_timeout=10 bounds it
    assert proxy.server.lifecycle.in_flight == 0


async def test_drain_gives_up_after_the_drain_timeout(
    proxy: RunningProxy, origin: Origin, client: aiohttp.ClientSession
) -> None:
    """A request longer than the drain timeout does not hold the shutdown: drain returns False."""

    async def slow() -> None:
        url = origin.url("/slow-headers?ms=2000")
        async with client.get(url, proxy=proxy.url) as resp:
            await resp.read()

    request = asyncio.create_task(slow())
    await asyncio.sleep(0.1)
    assert await proxy.server.drain(grace=0, drain_timeout=0.2) is False
    await proxy.server.close()
    request.cancel()
    await asyncio.gather(request, return_exceptions=True)


async def test_sigterm_lets_an_upload_a_download_and_a_tunnel_finish(
    origin: Origin, raw_origin: Callable[[Any], Awaitable[RawOrigin]]
) -> None:
    """After SIGTERM an upload, a download and a tunnel in flight all complete; exit code 0."""
    echo_origin = await raw_origin(echo)
    halfway = [asyncio.Event() for _ in range(3)]
    terminated = asyncio.Event()
    parts = 20  # each transfer sends or receives 20 parts, 50 ms apart: about 1 s

    async def upload(proxy_url: str) -> str:
        async def body() -> AsyncIterator[bytes]:
            for i in range(parts):
                if i == parts // 2:
                    halfway[0].set()
                    await terminated.wait()
                await asyncio.sleep(0.05)
                yield pattern(50_000, seed=i)

        async with (
            aiohttp.ClientSession() as session,
            session.post(origin.url("/echo"), data=body(), proxy=proxy_url) as resp,
        ):
            assert resp.status == 200
            return str((await resp.json())["body_sha256"])

    async def download(proxy_url: str) -> bytes:
        url = origin.url(f"/stream?size={parts * 65536}&delay_ms=100")  # about 2 s
        async with (
            aiohttp.ClientSession() as session,
            session.get(url, proxy=proxy_url) as resp,
        ):
            assert resp.status == 200
            first = await resp.content.readexactly(parts // 2 * 65536)
            halfway[1].set()
            return first + await resp.read()

    async def tunnel(proxy_url: str) -> bytes:
        opened = await open_tunnel(proxy_url, f"127.0.0.1:{echo_origin.port}")
        assert opened.status == 200
        echoed = b""
        for i in range(parts):
            if i == parts // 2:
                halfway[2].set()
                await terminated.wait()
            await asyncio.sleep(0.05)
            opened.writer.write(pattern(1000, seed=i))
            echoed += await opened.reader.readexactly(1000)
        opened.writer.write_eof()
        assert await opened.reader.read() == b""  # the echo origin closed its side too
        opened.writer.close()
        return echoed

    async with proxy_process(
        "--admin-listen",
        "off",
        "--connect-ports",
        str(echo_origin.port),
        "--shutdown-grace",
        "0.2",
        "--drain-timeout",
        "30",
    ) as (process, proxy_url):
        transfers = asyncio.gather(upload(proxy_url), download(proxy_url), tunnel(proxy_url))
        await asyncio.wait_for(asyncio.gather(*(event.wait() for event in halfway)), 10)
        process.send_signal(signal.SIGTERM)
        terminated.set()
        uploaded, downloaded, echoed = await asyncio.wait_for(transfers, 20)
        # Back well before the 30 s drain timeout: the drain saw all three end.
        assert await asyncio.wait_for(process.wait(), 20) == 0

    assert (
        uploaded
        == hashlib.sha256(b"".join(pattern(50_000, seed=i) for i in range(parts))).hexdigest()
    )
    assert downloaded == pattern(parts * 65536)
    assert echoed == b"".join(pattern(1000, seed=i) for i in range(parts))


@pytest.fixture
async def draining(proxy: RunningProxy) -> AsyncIterator[Callable[[], Awaitable[None]]]:
    """Starts the drain (a grace long enough for the test) on demand; cancels it afterwards."""
    tasks: list[asyncio.Task[bool]] = []

    async def start() -> None:
        tasks.append(asyncio.create_task(proxy.server.drain(grace=60, drain_timeout=10)))
        await until(lambda: proxy.server.lifecycle.draining)

    yield start
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


@pytest.mark.parametrize("version", ["1.1", "1.0"])
@pytest.mark.parametrize("path", ["/echo", "/stream?size=300000&cl=1", "/healthz"])
async def test_keep_alive_connection_gets_connection_close_while_draining(
    proxy: RunningProxy,
    origin: Origin,
    draining: Callable[[], Awaitable[None]],
    version: str,
    path: str,
) -> None:
    """Once draining, each response says Connection: close and its connection closes after it."""
    target = path if path == "/healthz" else origin.url(path)
    keep = "Connection: keep-alive\r\n" if version == "1.0" else ""
    request = f"GET {target} HTTP/{version}\r\nHost: {origin.authority}\r\n{keep}\r\n".encode()
    await draining()
    connection = await Connection.open(proxy)
    try:
        answer = await connection.ask(request)
        assert answer.status == 200  # still served in the grace period ...
        assert answer.fields["connection"] == "close"  # ... but the last on its connection
        assert await connection.closed()
    finally:
        connection.close()


async def test_response_under_way_when_the_drain_begins_closes_its_connection_after_it(
    proxy: RunningProxy, origin: Origin, draining: Callable[[], Awaitable[None]]
) -> None:
    """A response whose head left before the drain is completed, then its connection closes."""
    size = 5 * 65536
    url = origin.url(f"/stream?size={size}&cl=1&delay_ms=50")
    connection = await Connection.open(proxy)
    try:
        connection.writer.write(f"GET {url} HTTP/1.1\r\nHost: {origin.authority}\r\n\r\n".encode())
        head = await asyncio.wait_for(read_head(connection.reader), 10)
        assert b"Connection:" not in head  # sent before the drain: keep-alive was still true
        await draining()
        assert await asyncio.wait_for(connection.reader.readexactly(size), 10) == pattern(size)
        assert await connection.closed()
    finally:
        connection.close()


async def test_idle_keep_alive_connection_is_closed_when_the_drain_begins(
    proxy: RunningProxy, origin: Origin, draining: Callable[[], Awaitable[None]]
) -> None:
    """A keep-alive connection idle when the drain starts is closed then, not met with a 503."""
    connection = await Connection.open(proxy)
    try:
        request = f"GET {origin.url('/echo')} HTTP/1.1\r\nHost: {origin.authority}\r\n\r\n"
        assert (await connection.ask(request.encode())).status == 200
        await draining()
        assert await connection.closed()
    finally:
        connection.close()


async def test_download_cut_off_at_shutdown_is_logged_and_counted_as_an_error(
    proxy: RunningProxy, origin: Origin, logs: LogCapture
) -> None:
    """A download still running when shutdown cancels its handler is an error, not a clean 200."""
    reader, writer = await proxy.connect()
    url = origin.url("/stream?size=20000000&cl=1&delay_ms=50")  # about 15 s: never finishes here
    writer.write(f"GET {url} HTTP/1.1\r\nHost: {origin.authority}\r\n\r\n".encode())
    first = await asyncio.wait_for(reader.readexactly(100_000), 10)
    assert first.startswith(b"HTTP/1.1 200 OK\r\n")
    rest = asyncio.ensure_future(reader.read())  # keeps reading until the proxy cuts it off
    try:
        await proxy.server.close()  # the drain skipped, as after a second SIGTERM
        assert len(first) + len(await asyncio.wait_for(rest, 10)) < 20_000_000
    finally:
        rest.cancel()
        writer.close()
    (line,) = logs.events("access")
    assert (line["status"], line["error"]) == (200, "http_response_incomplete")
    host = origin.authority
    error = "http_response_incomplete"
    assert proxy.sample("proxy_upstream_errors_total", host=host, error=error) == 1
