"""Graceful drain: readiness drops, serving goes on through the grace, in-flight work finishes."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator

import aiohttp

from tests.conftest import Origin, RunningProxy


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
    await half_sent.wait()
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

    echo = await uploading
    assert echo["body_sha256"] == hashlib.sha256(b"".join(parts)).hexdigest()
    assert await draining is True
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
