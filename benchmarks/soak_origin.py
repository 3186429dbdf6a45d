"""The soak's origin: deterministic bodies, upload digests, resets on request, and a TCP echo.

Runs as its own process and prints ``{"http": PORT, "echo": PORT}`` once both listen.

- ``GET /bytes?size=N&seed=S[&chunked=1]``: ``body(N, S)``, with Content-Length unless chunked.
- ``POST /upload``: the sha256 hex of the body received, as text.
- ``GET /reset?at=head``: a TCP reset once the request is read, no response at all.
- ``GET /reset?at=body&size=N``: headers for ``N`` bytes, half of them, then a TCP reset.
- the echo port sends back every byte it receives and closes after the client's FIN.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
from functools import lru_cache

import uvloop
from aiohttp import web

from benchmarks.resets import reset

CHUNK = 65536


@lru_cache(maxsize=64)
def body(size: int, seed: int) -> bytes:
    """The same pseudo-random bytes for the same (size, seed), in every process."""
    return random.Random(seed).randbytes(size)


@lru_cache(maxsize=64)
def digest(size: int, seed: int) -> str:
    return hashlib.sha256(body(size, seed)).hexdigest()


async def _bytes(request: web.Request) -> web.StreamResponse:
    data = body(int(request.query["size"]), int(request.query["seed"]))
    response = web.StreamResponse()
    if request.query.get("chunked") != "1":
        response.content_length = len(data)
    await response.prepare(request)
    try:
        for offset in range(0, len(data), CHUNK):
            await response.write(data[offset : offset + CHUNK])
        await response.write_eof()
    except ConnectionError:
        pass  # the proxy gave up on this download
    return response


async def _upload(request: web.Request) -> web.Response:
    received = hashlib.sha256()
    try:
        async for chunk in request.content.iter_any():
            received.update(chunk)
    except ConnectionError:
        return web.Response(status=499)  # never sent: the proxy gave up on this upload
    return web.Response(text=received.hexdigest())


async def _reset_handler(request: web.Request) -> web.StreamResponse:
    transport = request.transport
    assert transport is not None
    if request.query["at"] == "head":
        reset(transport)
        return web.Response()  # never sent: the connection is gone
    size = int(request.query["size"])
    response = web.StreamResponse()
    response.content_length = size
    await response.prepare(request)
    await response.write(body(size, 0)[: size // 2])
    await asyncio.sleep(0.01)  # let the half reach the proxy before the reset
    reset(transport)
    return response


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(CHUNK):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


def app() -> web.Application:
    application = web.Application()
    application.router.add_get("/bytes", _bytes)
    application.router.add_post("/upload", _upload)
    application.router.add_get("/reset", _reset_handler)
    return application


async def main() -> None:
    runner = web.AppRunner(app(), access_log=None, handle_signals=True)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, backlog=1024)
    await site.start()
    echo = await asyncio.start_server(_echo, "127.0.0.1", 0, backlog=1024)
    http_port = runner.addresses[0][1]
    echo_port = echo.sockets[0].getsockname()[1]
    print(json.dumps({"http": http_port, "echo": echo_port}), flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    uvloop.run(main())
