"""The benchmark origin on N loopback ports at once (one host label per port).

    python -m benchmarks.ports_origin N

Prints the ports as a JSON list on the first line of stdout.
"""

from __future__ import annotations

import asyncio
import json
import sys

import uvloop
from aiohttp import web

from benchmarks.origin import handle


async def main(count: int) -> None:
    server = web.Server(handle, access_log=None)
    loop = asyncio.get_running_loop()
    ports = []
    for _ in range(count):
        listener = await loop.create_server(server, "127.0.0.1", 0, backlog=128)
        ports.append(listener.sockets[0].getsockname()[1])
    print(json.dumps(ports), flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    uvloop.run(main(int(sys.argv[1])))
