"""1 GiB each way through the proxy process: byte-exact, with the proxy's memory bounded."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from benchmarks.procfs import peak_rss_mb
from tests.conftest import proxy_process

GIB = 1024**3
CHUNK = hashlib.sha256(b"block").digest() * 8192  # 256 KiB of fixed bytes
RSS_LIMIT_MB = 100


def expected_digest(size: int) -> str:
    digest = hashlib.sha256()
    for _ in range(size // len(CHUNK)):
        digest.update(CHUNK)
    return digest.hexdigest()


async def hashing_sink(request: web.Request) -> web.Response:
    digest = hashlib.sha256()
    size = 0
    async for data in request.content.iter_any():
        digest.update(data)
        size += len(data)
    return web.json_response({"size": size, "sha256": digest.hexdigest()})


async def source(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse()
    response.content_length = GIB
    await response.prepare(request)
    for _ in range(GIB // len(CHUNK)):
        await response.write(CHUNK)
    await response.write_eof()
    return response


@pytest.fixture
async def big_origin() -> AsyncIterator[str]:
    app = web.Application(client_max_size=2 * GIB)
    app.router.add_put("/sink", hashing_sink)
    app.router.add_get("/source", source)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        yield f"http://127.0.0.1:{server.port}"
    finally:
        await server.close()


async def test_one_gib_upload_and_download_with_bounded_memory(big_origin: str) -> None:
    """A 1 GiB PUT and a 1 GiB GET arrive byte-exact while the proxy stays under 100 MB."""
    async with proxy_process("--admin-listen", "off") as (process, proxy_url):
        await transfer_both_ways(big_origin, process.pid, proxy_url)


async def transfer_both_ways(big_origin: str, pid: int, proxy_url: str) -> None:

    async def body() -> AsyncIterator[bytes]:
        for _ in range(GIB // len(CHUNK)):
            yield CHUNK

    want = await asyncio.to_thread(expected_digest, GIB)
    timeout = aiohttp.ClientTimeout(total=300)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        headers = {"Content-Length": str(GIB)}
        async with session.put(
            big_origin + "/sink", data=body(), headers=headers, proxy=proxy_url
        ) as resp:
            assert resp.status == 200
            assert await resp.json() == {"size": GIB, "sha256": want}
        after_upload = peak_rss_mb(pid)

        digest = hashlib.sha256()
        size = 0
        async with session.get(big_origin + "/source", proxy=proxy_url) as resp:
            async for data in resp.content.iter_any():
                digest.update(data)
                size += len(data)
    assert (size, digest.hexdigest()) == (GIB, want)
    assert after_upload < RSS_LIMIT_MB
    assert peak_rss_mb(pid) < RSS_LIMIT_MB
