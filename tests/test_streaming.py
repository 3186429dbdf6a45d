"""Large bodies each way through the proxy process (1 GiB over HTTP/1.1, 256 MiB over HTTP/2):
byte-exact, with the proxy's memory bounded."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator

import aiohttp
import httpx
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from benchmarks.procfs import peak_rss_mb
from tests import test_intercept
from tests.conftest import pattern, proxy_process
from tests.h2_origin import H2Origin
from tests.test_intercept import CAFiles, intercept_flags

GIB = 1024**3
CHUNK = hashlib.sha256(b"block").digest() * 8192  # 256 KiB of fixed bytes
RSS_LIMIT_MB = 100

# The interception fixture: a CA for the proxy to mint with.
ca_files = test_intercept.ca_files


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


H2_SIZE = 256 * 1024**2  # more than the RSS limit, so nothing can hold it whole


async def test_256_mib_each_way_over_http2_byte_exact_with_bounded_memory(
    ca_files: CAFiles, tls_ca_file: str, tls_h2_origin: H2Origin
) -> None:
    """Over HTTP/2 on both legs (interception, an h2 origin), a 256 MiB upload and download
    arrive byte-exact while the proxy stays under 100 MB: the windows hold both directions."""
    flags = intercept_flags(ca_files, tls_ca_file, tls_h2_origin.port)
    async with proxy_process(*flags, "--admin-listen", "off") as (process, proxy_url):

        async def body() -> AsyncIterator[bytes]:
            for _ in range(H2_SIZE // len(CHUNK)):
                yield CHUNK

        async with httpx.AsyncClient(
            http2=True, proxy=proxy_url, verify=ca_files.client_context(), trust_env=False
        ) as client:
            async with asyncio.timeout(300):
                up = await client.post(tls_h2_origin.url("/echo"), content=body())
                digest = hashlib.sha256()
                size = 0
                url = tls_h2_origin.url(f"/stream?size={H2_SIZE}")
                async with client.stream("GET", url) as down:
                    async for data in down.aiter_raw():
                        digest.update(data)
                        size += len(data)
        peak = peak_rss_mb(process.pid)
    want_up = await asyncio.to_thread(expected_digest, H2_SIZE)
    want_down = await asyncio.to_thread(lambda: hashlib.sha256(pattern(H2_SIZE)).hexdigest())
    assert (up.http_version, down.http_version) == ("HTTP/2", "HTTP/2")
    echoed = up.json()
    assert (echoed["version"], echoed["body_len"], echoed["body_sha256"]) == ("2", H2_SIZE, want_up)
    assert (size, digest.hexdigest()) == (H2_SIZE, want_down)
    assert peak < RSS_LIMIT_MB
