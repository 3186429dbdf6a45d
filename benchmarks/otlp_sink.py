"""An OTLP/HTTP traces endpoint for ``make bench``: accepts every export with an empty 200.

Runs as its own process on uvloop and prints its port on the first line of stdout; the
proxy's CPU is what is measured, so the bodies are read and not decoded.
"""

from __future__ import annotations

import asyncio
import sys

import uvloop
from aiohttp import web


async def handle(request: web.BaseRequest) -> web.Response:
    await request.read()
    return web.Response(body=b"", content_type="application/x-protobuf")


async def main(port: int) -> None:
    server = web.Server(handle, access_log=None)
    loop = asyncio.get_running_loop()
    listener = await loop.create_server(server, "127.0.0.1", port)
    print(listener.sockets[0].getsockname()[1], flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    uvloop.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 0))
