"""A minimal origin for benchmarks: answers every request with a fixed body chosen by path.

``/64k`` answers 64 KiB, ``/10m`` 10 MiB, anything else 13 bytes. Runs as its own process
on uvloop and prints its port on the first line of stdout.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from typing import Final

import uvloop
from aiohttp import web

SMALL: Final = b"Hello, world\n"
BODIES: Final = {"/64k": b"x" * (64 << 10), "/10m": b"x" * (10 << 20)}


async def handle(request: web.BaseRequest) -> web.Response:
    await request.read()
    return web.Response(body=BODIES.get(request.path, SMALL), content_type="text/plain")


async def main(port: int) -> None:
    # wrk stops mid-download at the end of a run; aiohttp would log each cut as an error.
    logging.getLogger("aiohttp.server").setLevel(logging.CRITICAL)
    server = web.Server(handle, access_log=None)
    loop = asyncio.get_running_loop()
    listener = await loop.create_server(server, "127.0.0.1", port, backlog=1024)
    print(listener.sockets[0].getsockname()[1], flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    uvloop.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 0))
