"""1 GiB each way through the proxy process: byte-exact, with the proxy's memory bounded."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import sys
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

GIB = 1024**3
CHUNK = hashlib.sha256(b"block").digest() * 8192  # 256 KiB of fixed bytes
RSS_LIMIT_MB = 100


def peak_rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


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


@pytest.fixture
async def proxy_process() -> AsyncIterator[tuple[int, str]]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "proxy",
        "--listen",
        "127.0.0.1:0",
        "--admin-listen",
        "off",
        stdout=asyncio.subprocess.PIPE,
        env={k: v for k, v in os.environ.items() if not k.startswith("PROXY_")},
    )
    assert process.stdout is not None
    listening = json.loads(await asyncio.wait_for(process.stdout.readline(), 30))
    drain = asyncio.ensure_future(process.stdout.read())  # keep the log pipe flowing
    try:
        yield process.pid, str(listening["proxy"])
    finally:
        process.terminate()
        await process.wait()
        await drain


async def test_one_gib_upload_and_download_with_bounded_memory(
    big_origin: str, proxy_process: tuple[int, str]
) -> None:
    """A 1 GiB PUT and a 1 GiB GET arrive byte-exact while the proxy stays under 100 MB."""
    pid, proxy_url = proxy_process

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
